"""The C++ Top-θ CPU decode kernel (`csrc/topt_cpu.cpp`), built with torch's extension tooling.

Built on first use (about a minute) into torch's extension cache, or ahead of
time with `python -m vllm_topt.cpu_kernel` (`make setup` does this). Same
contract as `cpu_decode.topt_decode_paged`; both are tested against the reference.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from vllm_topt.cpu_decode import KEY_LAYOUT_TRANSPOSED, batch_density_counts
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
        extra_cflags=["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno"],
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
) -> tuple[torch.Tensor, DensityCounts]:
    if key_layout != KEY_LAYOUT_TRANSPOSED:
        raise NotImplementedError("the C++ kernel reads the transposed K layout of vLLM's 'vec' CPU ISA")
    sparse = not rule.dense and theta is not None
    if sparse and rule.vmc and v_block_sums is None:
        raise ValueError("VMC needs per-block V sums (v_block_sums)")
    seq_lens = seq_lens.to(torch.int32)
    sparse_rows = seq_lens > rule.k if sparse else torch.zeros_like(seq_lens, dtype=torch.bool)
    empty = torch.empty(0)
    out, counts = load_extension().topt_decode(
        query.float().contiguous(), key_cache, value_cache, block_table.to(torch.int32), seq_lens,
        theta.float().contiguous() if sparse else empty, sparse_rows,
        v_block_sums if (sparse and rule.vmc) else empty,
        PLACEMENT_CODES[rule.placement], SDC_CODES[rule.sdc], rule.vmc, float(scale), float(logits_soft_cap or 0.0),
    )
    kept, rows_read, blocks_read, kept_thresholded = counts.sum(dim=(0, 1)).tolist()
    return out.to(query.dtype), batch_density_counts(
        seq_lens, sparse_rows, query.shape[1], key_cache.shape[1], key_cache.shape[2], rule.k,
        kept, rows_read, blocks_read, kept_thresholded,
    )


if __name__ == "__main__":
    load_extension()
    print(f"built {load_extension().__file__}")
