"""The C++ Top-θ CPU decode kernel (`csrc/topt_cpu.cpp`), built with torch's extension tooling.

Built on first use (about a minute) into torch's extension cache, or ahead of
time with `python -m vllm_topt.cpu_kernel` (`make setup` does this). Same
contract as `cpu_decode.topt_decode_paged`; both are tested against the reference.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from vllm_topt.cpu_decode import KEY_LAYOUT_TRANSPOSED, density_counts_from_totals
from vllm_topt.reference import DensityCounts, ToptRule

SOURCE = Path(__file__).resolve().parent / "csrc" / "topt_cpu.cpp"
PLACEMENT_CODES = {"post-softmax": 0, "pre-softmax": 1}
SDC_CODES = {"none": 0, "exact": 1, "exp-threshold": 2}


@functools.lru_cache(maxsize=1)
def load_extension():
    from torch.utils.cpp_extension import load

    return load(
        name="vllm_topt_cpu",
        sources=[str(SOURCE)],
        # -fopenmp: ATen's parallel_for is an OpenMP region compiled into this extension.
        extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


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
    """Same contract as `cpu_decode.topt_decode_paged`; `out` ([B, H, d] contiguous float32) is
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
    totals = load_extension().topt_decode(
        out, query, key_cache, value_cache, _int32(block_table), _int32(seq_lens),
        theta if sparse else _EMPTY, by_length, v_block_sums if (sparse and rule.vmc) else _EMPTY,
        rule.k, PLACEMENT_CODES[rule.placement], SDC_CODES[rule.sdc], rule.vmc, float(scale),
        float(logits_soft_cap or 0.0),
    )
    kept, rows_read, blocks_read, kept_thresholded, keys, blocks, thresholded_seqs = totals
    counts = density_counts_from_totals(
        B, keys, blocks, thresholded_seqs, H, key_cache.shape[1], rule.k, kept, rows_read, blocks_read,
        kept_thresholded,
    )
    return out.to(query.dtype), counts


def update_v_block_sums_cpp(
    v_block_sums: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor, block_size: int
) -> None:
    """C++ twin of `cpu_decode.update_v_block_sums` (same semantics, no per-call torch ops)."""
    load_extension().update_v_block_sums(v_block_sums, value, slot_mapping.to(torch.int64), block_size)


_EMPTY = torch.empty(0)


def _int32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int32 else t.to(torch.int32)


if __name__ == "__main__":
    load_extension()
    print(f"built {load_extension().__file__}")
