"""TOPT on vLLM's CPU platform: CPU_ATTN's cache, KV write and prefill; Top-θ decode in C++ or torch.

Everything shared with CUDA is in `core`; this module holds the CPU kernel
choice, the K-layout probe and the cache views.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm import _custom_ops as ops
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from vllm_topt import telemetry
from vllm_topt.backends.core import (
    LayerState,
    ToptBackendMixin,
    ToptBatch,
    ToptBuilderMixin,
    ToptImplMixin,
    extend_metadata,
    rows_by_mode,
)
from vllm_topt.config.options import options_from_vllm_config
from vllm_topt.config.thresholds import LayerPlan
from vllm_topt.kernels.cpu.cpp import (
    CPU_DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE, load_extension, topt_decode_paged_cpp, update_v_block_sums_cpp,
)
from vllm_topt.kernels.cpu.torch_decode import (
    KEY_LAYOUT_ROWS,
    KEY_LAYOUT_TRANSPOSED,
    topt_decode_paged,
    update_v_block_sums,
)
from vllm_topt.method.rules import DensityCounts

CPU_DENSE_BACKEND = "--attention-backend CPU_ATTN (dense)"


class ToptCpuBackend(ToptBackendMixin, CPUAttentionBackend):
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]
    platform_name: ClassVar[str] = "CPU"
    dense_alternative: ClassVar[str] = CPU_DENSE_BACKEND
    dense_parent: ClassVar[str] = "CPU_ATTN"
    default_block_size: ClassVar[int | None] = CPU_DEFAULT_BLOCK_SIZE

    @staticmethod
    def get_impl_cls() -> type[ToptCpuImpl]:
        return ToptCpuImpl

    @staticmethod
    def get_builder_cls() -> type[ToptCpuMetadataBuilder]:
        return ToptCpuMetadataBuilder

    @classmethod
    def check_config(cls, vllm_config) -> None:
        super().check_config(vllm_config)
        check_cpu_kernel_config(vllm_config)


def check_cpu_kernel_config(vllm_config) -> None:
    """The chosen CPU kernel can read this cache: block size and the K layout of vLLM's attention ISA."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    kernel = options_from_vllm_config(vllm_config).cpu_kernel
    block_size = vllm_config.cache_config.block_size
    model_config = vllm_config.model_config
    if kernel == "cpp" and block_size > MAX_BLOCK_SIZE:
        raise NotImplementedError(
            f"TOPT's C++ kernel takes KV blocks of at most {MAX_BLOCK_SIZE} tokens, not {block_size}: "
            f"pass --block-size {CPU_DEFAULT_BLOCK_SIZE} (the default)."
        )
    isa = _get_attn_isa(model_config.dtype, block_size, model_config.get_head_size(),
                        vllm_config.cache_config.cache_dtype)
    layout = probe_key_layout(isa, model_config.dtype, model_config.get_head_size(), block_size)
    if kernel == "cpp" and layout != KEY_LAYOUT_TRANSPOSED:
        raise NotImplementedError(
            f"TOPT's C++ kernel reads the transposed K layout, but attention ISA {isa!r} stores K "
            "rows; choose --additional-config '{\"topt\": {\"cpu_kernel\": \"torch\"}}'."
        )


@dataclass
class ToptCpuMetadata(CPUAttentionMetadata):
    """CPU_ATTN's metadata for the whole batch, plus the Top-θ split."""

    topt: ToptBatch | None = None


class ToptCpuMetadataBuilder(ToptBuilderMixin, CPUAttentionMetadataBuilder):
    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False) -> ToptCpuMetadata:
        full = super().build(common_prefix_len, common_attn_metadata, fast_build)
        batch = self.topt_batch(common_prefix_len, common_attn_metadata, full, fast_build)
        return extend_metadata(ToptCpuMetadata, full, topt=batch)


@dataclass
class CpuLayerState(LayerState):
    key_layout: str | None = None


class ToptCpuImpl(ToptImplMixin, CPUAttentionBackendImpl):
    backend = ToptCpuBackend

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None, kv_cache_dtype: str,
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, sinks: torch.Tensor | None = None) -> None:
        self._init_topt(
            get_current_vllm_config(), num_heads=num_heads, head_size=head_size, alibi_slopes=alibi_slopes,
            sliding_window=sliding_window, sinks=sinks, kv_cache_dtype=kv_cache_dtype, attn_type=attn_type,
            kv_sharing_target_layer_name=kv_sharing_target_layer_name,
        )
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        self._cpp = decode_uses_cpp(self.topt.options.cpu_kernel)

    def _new_state(self, state: LayerState, kv_cache: torch.Tensor) -> CpuLayerState:
        return CpuLayerState(**vars(state))

    def _decode(self, layer, query, kv_cache, meta: ToptCpuMetadata, output, state: CpuLayerState) -> None:
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        key_cache, value_cache = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, -1).chunk(2, dim=2)
        if state.key_layout is None:
            state.key_layout = probe_key_layout(layer.isa, kv_cache.dtype, self.head_size, block_size)
        batch = meta.topt
        caches = (key_cache, value_cache)
        rows = (batch.decode_block_table, batch.decode_seq_lens)
        if batch.modes is None:
            counts = self._decode_rows(query, caches, rows, meta.max_seq_len, state.plan, output, state)
            telemetry.record(state.index, counts)
            return
        # Requests that chose a mode (`request_modes`): each mode's rows through its own plan, apart.
        for mode, picked in rows_by_mode(batch):
            out = torch.empty_like(output[picked])
            counts = self._decode_rows(query[picked], caches, tuple(t[picked] for t in rows),
                                       int(batch.decode_seq_lens[picked].max()), self.topt.for_mode(state.index, mode),
                                       out, state)
            output[picked] = out
            telemetry.record(state.index, counts, mode)

    def _decode_rows(self, query, caches, rows, max_seq_len: int, plan: LayerPlan, output,
                     state: CpuLayerState) -> DensityCounts:
        """Decode `query`'s rows (block table, lengths) under `plan` into `output`; their counts."""
        (key_cache, value_cache), (block_table, seq_lens) = caches, rows
        rule, thresholds = plan.rule, plan.thresholds
        soft_cap = self.logits_soft_cap or None
        if self._cpp:
            # The C++ kernel looks θ up by row length itself and writes the layer's output in place.
            by_length = None if rule.dense else thresholds.table_upto(max_seq_len)
            direct = output.dtype == torch.float32 and output.is_contiguous()
            out, counts = topt_decode_paged_cpp(
                query, key_cache, value_cache, block_table, seq_lens, None, rule,
                self.scale, state.key_layout, state.v_block_sums, soft_cap,
                out=output.view(query.shape) if direct else None, theta_by_length=by_length,
            )
            if not direct:
                output.view(out.shape).copy_(out)
        else:
            theta = None if rule.dense else thresholds.lookup_memoised(seq_lens)
            out, counts = topt_decode_paged(
                query, key_cache, value_cache, block_table, seq_lens, theta, rule,
                self.scale, state.key_layout, state.v_block_sums, soft_cap,
            )
            output.view(out.shape).copy_(out)
        return counts

    def _update_v_block_sums(self, v_block_sums, value, slot_mapping, block_size: int) -> None:
        (update_v_block_sums_cpp if self._cpp else update_v_block_sums)(v_block_sums, value, slot_mapping, block_size)


def decode_uses_cpp(cpu_kernel: str) -> bool:
    """Whether option `cpu_kernel` selects the C++ kernel; it must then load, or TOPT stops."""
    if cpu_kernel == "torch":
        return False
    try:
        load_extension()
    except Exception as exc:  # a compiler error is not a reason to run something else silently
        raise RuntimeError(
            "TOPT could not build its C++ CPU kernel (needs g++ and ninja; `make setup` builds it ahead "
            "of time). Fix the build, or choose the vectorised torch path with "
            "--additional-config '{\"topt\": {\"cpu_kernel\": \"torch\"}}'."
        ) from exc
    return True


@functools.lru_cache(maxsize=None)
def probe_key_layout(isa: str, dtype: torch.dtype, head_size: int, block_size: int) -> str:
    """Find how vLLM's CPU cache write lays out a K block for this ISA.

    Writes random keys through the real op into a scratch cache and checks the
    two layouts the decode path can read; any other layout (e.g. AMX tiles)
    stops the server with a message rather than giving wrong attention.
    """
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(block_size, 1, head_size, generator=gen).to(dtype)
    cache = torch.zeros(1, 1, 2 * block_size, head_size, dtype=dtype)
    key_cache, value_cache = cache.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(
        keys, keys, key_cache, value_cache, torch.arange(block_size), isa,
        k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto",
    )
    block = key_cache[0, 0].contiguous()
    if torch.equal(block.view(head_size, block_size).T, keys[:, 0]):
        return KEY_LAYOUT_TRANSPOSED
    if torch.equal(block, keys[:, 0]):
        return KEY_LAYOUT_ROWS
    raise NotImplementedError(
        f"TOPT cannot read the CPU K-cache layout of attention ISA {isa!r} (dtype {dtype}, head size "
        f"{head_size}, block size {block_size}). Serve with --dtype float32, or use {CPU_DENSE_BACKEND} "
        "for dense attention."
    )
