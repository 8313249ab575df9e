"""vLLM 0.32's CUDA paged KV cache (TRITON_ATTN), built and written without vLLM.

In vLLM 0.32 a layer's cache is one tensor with the *logical* shape
`[num_blocks, num_kv_heads, block_size, 2 * head_size]` (K then V in the last
dim) and physical strides set by the resolved KV-cache layout (LBNHC, vLLM's
default when no backend declares a preference, stores it as
`[num_blocks, block_size, num_kv_heads, 2 * head_size]`; LBHNC as the logical
order). TRITON_ATTN reads and writes it through

    key_cache, value_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)

i.e. two strided views `[num_blocks, block_size, num_kv_heads, head_size]`.
`kv_cache_views` does the same, so the Triton kernel sees exactly what it sees
inside vLLM. `write_kv` is a torch scatter with the semantics of vLLM's
`triton_reshape_and_cache_flash` (slot = block * block_size + offset; a
negative slot is a padding token and is skipped); the CUDA op itself cannot
run with the CPU build of vLLM.
"""

from __future__ import annotations

import torch

LAYOUTS = ("LBNHC", "LBHNC")


def allocate_kv_cache(
    num_blocks: int, block_size: int, num_kv_heads: int, head_size: int, dtype: torch.dtype,
    device="cpu", layout: str = "LBNHC", fill: str = "randn", generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One layer's cache: logical [num_blocks, H_kv, block_size, 2 * d] with `layout`'s strides."""
    if layout == "LBNHC":
        physical = (num_blocks, block_size, num_kv_heads, 2 * head_size)
        to_logical = (0, 2, 1, 3)
    elif layout == "LBHNC":
        physical = (num_blocks, num_kv_heads, block_size, 2 * head_size)
        to_logical = (0, 1, 2, 3)
    else:
        raise ValueError(f"layout {layout!r}: expected one of {LAYOUTS}")
    if fill == "randn":  # stale garbage, as a reused cache holds
        raw = torch.randn(physical, generator=generator, dtype=torch.float32).to(dtype).to(device)
    else:
        raw = torch.zeros(physical, dtype=dtype, device=device)
    return raw.permute(*to_logical)


def kv_cache_views(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(key_cache, value_cache), each [num_blocks, block_size, H_kv, d], as TRITON_ATTN splits them."""
    key_cache, value_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return key_cache, value_cache


def write_kv(
    key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """key/value [T, H_kv, d] into the cache at `slot_mapping` [T] (reshape_and_cache_flash semantics)."""
    block_size = key_cache.shape[1]
    slots = slot_mapping.long()
    valid = slots >= 0
    slots, key, value = slots[valid], key[: slot_mapping.shape[0]][valid], value[: slot_mapping.shape[0]][valid]
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, offsets] = key.to(key_cache.dtype)
    value_cache[blocks, offsets] = value.to(value_cache.dtype)


def sequence_slots(block_ids: torch.Tensor, length: int, block_size: int, start: int = 0) -> torch.Tensor:
    """Slots of positions start..length-1 of a sequence whose blocks are `block_ids`."""
    pos = torch.arange(start, length, device=block_ids.device)
    return block_ids[pos // block_size].long() * block_size + pos % block_size
