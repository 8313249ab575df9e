"""Which build of the C++ kernel fits this host: a key from the CPU's instruction sets.

The kernel is compiled with -march=native, so a library built on one CPU (say
with AVX-512) dies with an illegal instruction on another that lacks some of
those instructions. torch's extension cache is keyed by name only, and its
folder travels (a Docker image, a shared home), so the name carries this key:
a host with other instruction sets, or other compiler flags, gets a build of its own.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

KEY_LENGTH = 12  # hex digits
# /proc/cpuinfo keys that list instruction-set extensions: x86 `flags`, Arm `Features`,
# s390x `features`, RISC-V `isa`.
CPUINFO_KEYS = ("flags", "features", "isa")
# sysctl names (macOS) that list them: Intel `machdep.cpu.*features`, Apple silicon `hw.optional.*`.
SYSCTL_PREFIXES = ("machdep.cpu.features", "machdep.cpu.leaf7_features", "machdep.cpu.extfeatures", "hw.optional.")


def build_key(machine: str, isa_flags: Iterable[str], compiler_flags: Sequence[str]) -> str:
    """A short hex key for (architecture, set of instruction-set flags, compiler flags).

    The flags are a set (their order in /proc/cpuinfo carries no meaning); the
    compiler flags keep their order, which can matter to the compiler."""
    text = "\n".join([machine, " ".join(sorted(set(isa_flags))), " ".join(compiler_flags)])
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


def isa_flags_from_cpuinfo(text: str) -> tuple[str, ...]:
    """The first processor's instruction-set flags from /proc/cpuinfo text (every core of a host has the same)."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in CPUINFO_KEYS:
            return tuple(value.split())
    return ()


def isa_flags_from_sysctl(text: str) -> tuple[str, ...]:
    """Instruction-set flags from `sysctl -a` text: the listed features, and each hw.optional.* that is 1."""
    flags: list[str] = []
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        name, value = name.strip(), value.strip()
        if not sep or not name.startswith(SYSCTL_PREFIXES):
            continue
        if name.startswith("hw.optional."):
            if value == "1":
                flags.append(name)
        else:
            flags.extend(value.split())
    return tuple(flags)


def host_isa_flags() -> tuple[str, ...]:
    """This host's instruction-set flags, from what the platform offers; () where nothing does
    (the key then rests on the architecture and compiler flags alone)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        return isa_flags_from_cpuinfo(cpuinfo.read_text(errors="replace"))
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-a"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ()
        return isa_flags_from_sysctl(out)
    return ()


def host_build_key(compiler_flags: Sequence[str]) -> str:
    """`build_key` for this host."""
    return build_key(platform.machine(), host_isa_flags(), compiler_flags)
