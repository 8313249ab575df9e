"""The C++ Top-θ CPU decode kernel (`csrc/topt_cpu.cpp`): build, load, call.

The source registers typed torch ops (`torch.ops.vllm_topt.topt_decode`,
`...update_v_block_sums`) with a schema: named arguments, named results. It is
built on first use (about a minute) into torch's extension cache, or ahead of
time with `python -m vllm_topt.kernels.cpu.cpp` (`make setup` does this), under a
name that carries this host's instruction sets (`build_key`: the build uses
-march=native and must not be reused on another CPU). The
placement, SDC and VMC-scope codes are compiled in from `vllm_topt.method.rules`, so the
C++ and Python enums cannot disagree. Same contract as
`torch_decode.topt_decode_paged`; both are tested against the reference.
"""

from __future__ import annotations

import collections
import functools
import os
from pathlib import Path

import torch

from vllm_topt.kernels.cpu.build_key import host_build_key
from vllm_topt.kernels.cpu.torch_decode import KEY_LAYOUT_TRANSPOSED, density_counts_from_totals
from vllm_topt.method.rules import DensityCounts, Placement, Sdc, ToptRule, VmcScope

SOURCE = Path(__file__).resolve().parent / "csrc" / "topt_cpu.cpp"
# The extension (and its build folder) is named `vllm_topt_cpu_<build key>`: see extension_name.
EXTENSION_PREFIX = "vllm_topt_cpu"
# Largest KV block the kernel takes (its per-block score buffers are sized by it).
MAX_BLOCK_SIZE = 256
# The page TOPT serves with on CPU (CPU_ATTN's default too). The kernel reads V
# row by row, so a larger page costs no extra V traffic, and K streams faster in
# longer runs (measured with benchmarks/decode_cpu.py --block-size 32/64/128).
CPU_DEFAULT_BLOCK_SIZE = 128


def code_defines() -> list[str]:
    """-D flags that give the C++ source the Python codes and limits."""
    return ([f"-DTOPT_PLACEMENT_{p.name}={p.code}" for p in Placement] + [f"-DTOPT_SDC_{s.name}={s.code}" for s in Sdc]
            + [f"-DTOPT_VMC_SCOPE_{v.name}={v.code}" for v in VmcScope] + [f"-DTOPT_MAX_BLOCK_SIZE={MAX_BLOCK_SIZE}"])


# Set to 1, the process loads a build that times the kernel's phases (csrc/topt_cpu.cpp, TOPT_PHASES;
# read with `phase_profile`): for benchmarks/profile_cpu.py, not for serving. Its own extension name.
PROFILE_ENV = "VLLM_TOPT_CPU_PROFILE"


def profiling() -> bool:
    return os.environ.get(PROFILE_ENV, "0") == "1"


def compiler_flags() -> list[str]:
    # -fopenmp: ATen's parallel_for is an OpenMP region compiled into this extension.
    profile = ["-DTOPT_PROFILE_PHASES"] if profiling() else []
    return ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", *code_defines(), *profile]


@functools.lru_cache(maxsize=1)
def extension_name() -> str:
    """The extension's name, hence its folder in torch's cache: one per instruction-set flags and compiler flags."""
    return f"{EXTENSION_PREFIX}_{host_build_key(compiler_flags())}"


@functools.lru_cache(maxsize=1)
def load_extension():
    """Build (if needed) and load the library; returns `torch.ops.vllm_topt`."""
    from torch.utils.cpp_extension import load

    load(
        name=extension_name(),
        sources=[str(SOURCE)],
        extra_cflags=compiler_flags(),
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.vllm_topt


@functools.lru_cache(maxsize=1)
def decode_totals_type():
    """A named tuple of `topt_decode`'s results, named as the op schema names them."""
    schema = load_extension().topt_decode.default._schema
    return collections.namedtuple("DecodeTotals", [r.name for r in schema.returns])


def topt_decode_paged_cpp(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    theta: torch.Tensor | None,
    rule: ToptRule,
    scale: float,
    key_layout: str = KEY_LAYOUT_TRANSPOSED,
    v_block_sums: torch.Tensor | None = None,
    logits_soft_cap: float | None = None,
    out: torch.Tensor | None = None,
    theta_by_length: torch.Tensor | None = None,
) -> tuple[torch.Tensor, DensityCounts]:
    """Same contract as `torch_decode.topt_decode_paged`; `out` ([B, H, d] contiguous float32) is
    written in place when given, and returned (as the query's dtype). Instead of per-row
    `theta`, the kernel can look thresholds up itself in `theta_by_length` ([N > max n, H]
    float32, `LayerThresholds.table`), which saves the per-layer torch ops of a lookup."""
    if key_layout != KEY_LAYOUT_TRANSPOSED:
        raise NotImplementedError("the C++ kernel reads the transposed K layout of vLLM's 'vec' CPU ISA")
    sparse = not rule.dense and (theta is not None or theta_by_length is not None)
    if sparse and rule.vmc and v_block_sums is None:
        raise ValueError("VMC needs per-block V sums (v_block_sums)")
    B, H, d = query.shape
    out = torch.empty(B, H, d) if out is None else out
    by_length = theta_by_length is not None
    if sparse:
        theta = theta_by_length if by_length else theta.float().contiguous()
    # Positional, in the schema's order (its names: csrc/topt_cpu.cpp): keyword binding costs the
    # dispatcher ~7 us a call, a few percent of a short decode step over every layer.
    totals = decode_totals_type()(*load_extension().topt_decode.default(
        out, query, key_cache, value_cache, _int32(block_table), _int32(seq_lens), theta if sparse else None,
        by_length, v_block_sums if (sparse and rule.vmc) else None, rule.k, rule.placement.code, rule.sdc.code,
        rule.vmc, rule.vmc_scope.code, float(scale), float(logits_soft_cap or 0.0),
    ))
    counts = density_counts_from_totals(
        B, totals.keys, totals.blocks, totals.thresholded_seqs, H, key_cache.shape[1], rule.k,
        totals.elements_kept, totals.v_rows_read, totals.v_blocks_read, totals.thresholded_kept,
    )
    return (out if out.dtype == query.dtype else out.to(query.dtype)), counts  # .to costs ~1 us even as a no-op


def update_v_block_sums_cpp(
    v_block_sums: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor, block_size: int
) -> None:
    """C++ twin of `torch_decode.update_v_block_sums` (same semantics, no per-call torch ops)."""
    load_extension().update_v_block_sums.default(v_block_sums, value, slot_mapping.to(torch.int64), block_size)


# How the kernel sizes each call's thread team (csrc/topt_cpu.cpp, TeamPolicy): "adaptive" (the
# default) runs on the calling thread alone while the whole team keeps costing more than that would
# (a core shared with another process), "team" and "solo" fix it, to measure one against the other.
TEAM_MODES = ("adaptive", "team", "solo")


def set_team_mode(mode: str) -> None:
    """Team sizing for this thread's later calls (one of TEAM_MODES)."""
    if mode not in TEAM_MODES:
        raise ValueError(f"team mode {mode!r}: one of {', '.join(TEAM_MODES)}")
    load_extension().set_team_mode.default(mode)


def team_counts(reset: bool = False):
    """This thread's calls so far: (team_calls, lost_team_calls, lost_windows, solo_calls), named;
    `reset` zeroes them after reading."""
    op = load_extension().team_counts.default
    names = [r.name for r in op._schema.returns]
    return collections.namedtuple("TeamCounts", names)(*op(reset))


def phase_profile(reset: bool = False) -> tuple[dict[str, float], int]:
    """The profile build's phase times so far ({phase: seconds}, summed over threads; "call" is the
    calling thread's wall time in the op) and the calls timed; `reset` zeroes them after reading."""
    if not profiling():
        raise RuntimeError(f"the phase profile needs the profile build: set {PROFILE_ENV}=1 before the kernel loads")
    names, nanoseconds, calls = load_extension().phase_profile.default(reset)
    return {name: ns * 1e-9 for name, ns in zip(names.split(","), nanoseconds)}, calls


def _int32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int32 else t.to(torch.int32)


if __name__ == "__main__":
    from torch.utils.cpp_extension import _get_build_directory

    load_extension()
    print(f"built {extension_name()} in {_get_build_directory(extension_name(), verbose=False)}")
