"""The C++ kernel's build is keyed by the host's instruction sets, so a cached build never runs on the wrong CPU."""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from pathlib import Path

import torch.utils.cpp_extension

from tests.engine_run import ROOT

from vllm_topt.kernels.cpu import cpp
from vllm_topt.kernels.cpu.build_key import (
    KEY_LENGTH, build_key, host_isa_flags, isa_flags_from_cpuinfo, isa_flags_from_sysctl,
)

AVX2_HOST = ("fpu", "sse2", "avx", "avx2", "fma", "bmi2")
FLAGS = ["-O3", "-march=native"]


def test_key_changes_with_instruction_sets_architecture_and_compiler_flags():
    key = build_key("x86_64", AVX2_HOST, FLAGS)
    assert len(key) == KEY_LENGTH and int(key, 16) >= 0
    assert build_key("x86_64", (*AVX2_HOST, "avx512f"), FLAGS) != key
    assert build_key("x86_64", AVX2_HOST[:-1], FLAGS) != key
    assert build_key("aarch64", AVX2_HOST, FLAGS) != key
    assert build_key("x86_64", AVX2_HOST, ["-O3", "-march=x86-64-v3"]) != key


def test_key_is_stable_under_reordered_or_repeated_flags():
    key = build_key("x86_64", AVX2_HOST, FLAGS)
    assert build_key("x86_64", tuple(reversed(AVX2_HOST)), FLAGS) == key
    assert build_key("x86_64", [*AVX2_HOST, "avx2"], FLAGS) == key


def test_flags_are_read_from_cpuinfo_and_sysctl_text():
    x86 = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx512f\nbugs\t\t: spectre_v1\n" \
          "processor\t: 1\nflags\t\t: fpu sse2 avx512f\n"
    assert isa_flags_from_cpuinfo(x86) == ("fpu", "sse2", "avx512f")
    assert isa_flags_from_cpuinfo("processor\t: 0\nFeatures\t: fp asimd sve\n") == ("fp", "asimd", "sve")
    assert isa_flags_from_cpuinfo("processor\t: 0\n") == ()
    sysctl = ("machdep.cpu.features: FPU SSE2 AVX1.0\nmachdep.cpu.leaf7_features: AVX2 BMI2\n"
              "hw.optional.arm.FEAT_SME: 0\nhw.optional.neon: 1\nhw.ncpu: 8\n")
    assert isa_flags_from_sysctl(sysctl) == ("FPU", "SSE2", "AVX1.0", "AVX2", "BMI2", "hw.optional.neon")


def test_load_extension_builds_under_the_hosts_key(monkeypatch):
    seen = {}
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kw: seen.update(kw))
    cpp.load_extension.__wrapped__()  # the uncached body: the real extension stays loaded as it was
    key = build_key(platform.machine(), host_isa_flags(), cpp.compiler_flags())
    assert seen["name"] == cpp.extension_name() == f"{cpp.EXTENSION_PREFIX}_{key}"
    assert seen["extra_cflags"] == cpp.compiler_flags() and "-march=native" in seen["extra_cflags"]
    if platform.system() == "Linux":
        assert host_isa_flags()  # /proc/cpuinfo always lists them


def test_prebuild_command_builds_under_the_key_and_says_where():
    # `make setup` runs it; the first build takes about a minute, later ones find the cache.
    proc = subprocess.run([sys.executable, "-m", "vllm_topt.kernels.cpu.cpp"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.fullmatch(r"built (\S+) in (\S+)", proc.stdout.strip().splitlines()[-1])
    assert match and match[1] == cpp.extension_name(), proc.stdout
    folder = Path(match[2])
    assert folder.name == cpp.extension_name() and (folder / f"{cpp.extension_name()}.so").is_file()
