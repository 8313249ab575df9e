"""Device memory the CUDA backend holds beside vLLM's KV cache, where vLLM's memory accounting sees it.

vLLM sizes the KV cache from what its profiling run leaves free
(`--gpu-memory-utilization`). TOPT holds two more kinds of device memory:

- decode work buffers (per-page max scores and log-sum-exps, per-segment
  partial sums, θ): made once per process, shared by every metadata builder,
  and allocated while the model is built (`shared_decode_buffers`, called
  from the attention layer's constructor), so the profiling counts them as
  model memory. Sized for what one step can hold: `max_num_seqs` decode rows
  (vLLM caps full-graph decode batches at it) of up to `max_model_len` keys.
- per-block V sums, for VMC: `H_kv x d` fp32 per KV block per layer, 1/block_size
  of a bf16 layer's cache (6.25% at block size 16). They grow with the KV
  cache, so the KV budget vLLM profiled is shrunk by exactly their share
  (`kv_budget_with_v_sums`, through the worker hook `install_kv_budget_hook`),
  logged at start-up.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from vllm_topt.log import get_logger

logger = get_logger()

V_SUM_BYTES = 4  # fp32 per element


def max_decode_rows(vllm_config) -> int:
    """The most decode rows one step holds: vLLM caps full-graph decode batches at max_num_seqs."""
    return vllm_config.scheduler_config.max_num_seqs


def kernel_block_size(cache_block_size: int, supported: tuple[int, ...]) -> int:
    """The kernel block vLLM splits a cache block into: the largest supported size that divides it."""
    fitting = [size for size in supported if cache_block_size % size == 0]
    return max(fitting) if fitting else min(supported)


def max_pages(vllm_config, supported_block_sizes: tuple[int, ...]) -> int:
    """Pages of the longest row (the block table may be wider)."""
    block = kernel_block_size(vllm_config.cache_config.block_size, supported_block_sizes)
    return -(-vllm_config.model_config.max_model_len // block)


@dataclass
class DecodeBuffers:
    """One process's decode work buffers, shared by every builder and layer (layers run one at a time)."""

    scratch: object  # kernels.triton.decode.ToptScratch
    theta: torch.Tensor  # [max decodes, H] float32, θ of the layer being run
    segments: dict[int, int]  # decode rows -> key-range segments per row (fixed per batch size for graphs)

    @property
    def nbytes(self) -> int:
        return self.scratch.nbytes + self.theta.numel() * self.theta.element_size()


_shared: dict[tuple, DecodeBuffers] = {}


def _indexed(device) -> torch.device:
    """The device with its index: "cuda" and "cuda:0" name one device here (one key per device)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def shared_decode_buffers(vllm_config, num_heads: int, num_kv_heads: int, head_size: int, block_vmc: bool,
                          device) -> DecodeBuffers:
    """The process's decode buffers for these shapes (made on first call, logged with their size)."""
    from vllm_topt.kernels.triton.decode import SUPPORTED_BLOCK_SIZES, ToptScratch, choose_num_segments

    rows = max_decode_rows(vllm_config)
    pages = max_pages(vllm_config, SUPPORTED_BLOCK_SIZES)
    device = _indexed(device)
    key = (rows, pages, num_heads, num_kv_heads, head_size, block_vmc, device)
    if key not in _shared:
        segments = {b: choose_num_segments(b, num_kv_heads) for b in range(1, rows + 1)}
        scratch = ToptScratch.allocate(rows, num_heads, num_kv_heads, head_size, pages,
                                       capacity=max(b * s for b, s in segments.items()), device=device,
                                       block_vmc=block_vmc)
        theta = torch.zeros(rows, num_heads, dtype=torch.float32, device=device)
        buffers = DecodeBuffers(scratch, theta, segments)
        logger.info("TOPT: %.1f MiB of decode buffers (%d rows x %d pages x %d heads%s), counted as model memory",
                    buffers.nbytes / 2**20, rows, pages, num_heads, ", block-wise VMC" if block_vmc else "")
        _shared[key] = buffers
    return _shared[key]


_row_modes: dict[torch.device, object] = {}


def shared_row_modes(vllm_config, device):
    """The process's `request_modes.RowModes` on this device (made on first call, before any capture)."""
    from vllm_topt.request_modes import RowModes

    device = _indexed(device)
    if device not in _row_modes:
        _row_modes[device] = RowModes(max_decode_rows(vllm_config), device)
    return _row_modes[device]


# --------------------------------------------------------------------------- V sums in the KV budget


@dataclass(frozen=True)
class BlockBytes:
    """Bytes per KV block index, summed over this rank's attention layers."""

    kv_cache: int
    v_sums: int
    vmc_layers: int

    @property
    def v_sum_share(self) -> float:
        """The share of a KV budget the V sums take when both grow with the number of blocks."""
        return self.v_sums / (self.kv_cache + self.v_sums) if self.v_sums else 0.0


def block_bytes(vllm_config) -> BlockBytes:
    """KV-cache and V-sum bytes per block for this engine config (every layer with the same page)."""
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    from vllm_topt.config.layers import process_config

    model_config, cache_config, parallel = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    num_kv_heads = model_config.get_num_kv_heads(parallel)
    head_size = model_config.get_head_size()
    dtype = model_config.dtype if cache_config.cache_dtype == "auto" else STR_DTYPE_TO_TORCH_DTYPE[cache_config.cache_dtype]
    plans = process_config(vllm_config, model_config.get_num_attention_heads(parallel)).layers
    vmc_layers = sum(1 for plan in plans if not plan.rule.dense and plan.rule.vmc)
    kv_cache = len(plans) * 2 * cache_config.block_size * num_kv_heads * head_size * dtype.itemsize
    return BlockBytes(kv_cache, vmc_layers * num_kv_heads * head_size * V_SUM_BYTES, vmc_layers)


def kv_budget_with_v_sums(available: int, per_block: BlockBytes) -> int:
    """The KV-cache bytes that leave room for their V sums inside `available` (what vLLM profiled)."""
    if not per_block.v_sums:
        return available
    return available * per_block.kv_cache // (per_block.kv_cache + per_block.v_sums)


def install_kv_budget_hook(worker_cls) -> None:
    """Make `worker_cls.determine_available_memory` leave room for TOPT's V sums when TOPT serves.

    The one place TOPT changes what vLLM's GPU worker reports (vllm_support lists it)."""
    if worker_cls.__dict__.get("_topt_budget_hook", False):
        return
    original = worker_cls.determine_available_memory

    @functools.wraps(original)
    def determine_available_memory(self) -> int:
        available = original(self)
        from vllm_topt.plugin import is_topt_selected

        if not is_topt_selected(self.vllm_config.attention_config.backend):
            return available
        return reserve_v_sums(self.vllm_config, available)

    worker_cls.determine_available_memory = determine_available_memory
    worker_cls._topt_budget_hook = True


def reserve_v_sums(vllm_config, available: int) -> int:
    """`available` less the V sums' share, logged."""
    per_block = block_bytes(vllm_config)
    budget = kv_budget_with_v_sums(available, per_block)
    if budget != available:
        logger.info("TOPT: %.2f GiB of the %.2f GiB KV budget go to the per-block V sums of %d VMC layers "
                    "(%.1f%%); the KV cache gets %.2f GiB", (available - budget) / 2**30, available / 2**30,
                    per_block.vmc_layers, 100 * per_block.v_sum_share, budget / 2**30)
    return budget
