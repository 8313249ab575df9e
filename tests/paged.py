"""Build vLLM CPU paged KV caches for tests, with vLLM's own cache-write op."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm import _custom_ops as ops
from vllm_topt.kernels.cpu.torch_decode import update_v_block_sums


@dataclass
class PagedBatch:
    key_cache: torch.Tensor  # [num_blocks, H_kv, bs, d] (view of the CPU cache)
    value_cache: torch.Tensor
    block_table: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32
    v_block_sums: torch.Tensor  # [num_blocks, H_kv, d] float32
    keys: list[torch.Tensor]  # per sequence [n, H_kv, d]
    values: list[torch.Tensor]


def build_paged_batch(keys, values, block_size, dtype=torch.float32, isa="vec", seed=0, extra_blocks=3) -> PagedBatch:
    """Scatter each sequence's K/V into shuffled physical blocks of one cache."""
    gen = torch.Generator().manual_seed(seed)
    H_kv, d = keys[0].shape[1:]
    blocks_per_seq = [(k.shape[0] + block_size - 1) // block_size for k in keys]
    num_blocks = sum(blocks_per_seq) + extra_blocks
    physical = torch.randperm(num_blocks, generator=gen)
    cache = torch.randn(num_blocks, H_kv, 2 * block_size, d, generator=gen).to(dtype)  # stale garbage
    key_cache, value_cache = cache.chunk(2, dim=2)
    v_sums = torch.full((num_blocks, H_kv, d), 1e3)  # stale sums must be reset on first write
    max_blocks = max(blocks_per_seq) + 1
    block_table = torch.zeros(len(keys), max_blocks, dtype=torch.int32)
    start = 0
    for i, (k, v) in enumerate(zip(keys, values)):
        ids = physical[start : start + blocks_per_seq[i]]
        start += blocks_per_seq[i]
        block_table[i, : len(ids)] = ids
        block_table[i, len(ids) :] = physical[-1]  # padding entries point anywhere
        pos = torch.arange(k.shape[0])
        slots = ids[pos // block_size].long() * block_size + pos % block_size
        ops.cpu_attn_reshape_and_cache(
            k.to(dtype), v.to(dtype), key_cache, value_cache, slots, isa,
            k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto",
        )
        update_v_block_sums(v_sums, v.to(dtype), slots, block_size)
    seq_lens = torch.tensor([k.shape[0] for k in keys], dtype=torch.int32)
    return PagedBatch(
        key_cache, value_cache, block_table, seq_lens, v_sums,
        [k.to(dtype) for k in keys], [v.to(dtype) for v in values],
    )
