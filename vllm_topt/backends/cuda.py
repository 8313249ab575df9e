"""TOPT on vLLM's CUDA platform: TRITON_ATTN's cache and prefill, Top-θ decode in Triton.

Everything shared with CPU (capabilities, refusals, batch split, layer glue) is
in `core`; this module holds the device buffers, graph-capture rules and the
kernel call.

Reuses TRITON_ATTN's KV layout, KV write and metadata. Decode requests (query
length 1, pulled to the front of every batch) go through the Triton Top-θ
kernel (`vllm_topt.kernels.triton.decode`); prefill and other multi-token
requests run TRITON_ATTN's dense `unified_attention` on their part of the batch.
Sliding-window layers run TRITON_ATTN on the whole batch (`core`).

Per layer it keeps, on the device: the per-block V sums for VMC (updated at
every KV write), the layer's thresholds (θ(n) looked up by a kernel) and its
row of the telemetry counter bank, which the kernels add to without a host
sync. Full CUDA graphs cover decode-only batches (the launch grid depends on
the batch size only), so nothing in `forward` may depend on running Python at
every step: sliding-window rows are counted with device ops, and the metadata
builder (whose `build` runs on every step, replayed or not) begins each
step's telemetry, drops what warm-up and capture counted, and writes the
reports. Everything a graph touches is allocated before capture: the counter
bank and the shared decode buffers in the layers' constructors (so that
vLLM's memory profiling counts them, `cuda_memory`), the per-layer state by
the metadata builder's first `build`. Per-request modes (`request_modes`) are
data too: each `build` copies the decode rows' modes into one persistent
device buffer; the kernels keep every element of a dense-mode row and add its
counts to the layer's second counter row.

Not supported (refused in the front-end process by `ToptBackendMixin.check_config`,
and again by each layer in the worker): FP8 / quantized KV caches, a sliding window on every layer, ALiBi,
attention sinks, multimodal prefix attention, non-decoder attention, KV sharing across
layers, KV connectors, speculative decoding, batch invariance, fused output
quantization.

Memory (`cuda_memory`): the decode buffers (page max scores of max_num_seqs x
heads x max_model_len / block_size floats, twice with block-wise VMC, plus
per-segment sums), once per process, allocated while the model is built so
that vLLM's profiling counts them; the fp32 V sums of VMC layers (1/block_size
of a bf16 layer's cache) come out of the KV budget vLLM profiled, logged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadata,
    TritonAttentionMetadataBuilder,
)

from vllm_topt import telemetry
from vllm_topt.backends.cuda_memory import DecodeBuffers, kernel_block_size, shared_decode_buffers, shared_row_modes
from vllm_topt.config.layers import ToptProcessConfig, process_config
from vllm_topt.config.options import options_from_vllm_config, resolve_request_points, resolve_thresholds
from vllm_topt.config.thresholds import ThresholdFileError, rule_difference
from vllm_topt.method.rules import DENSE_MODE_CODE, ToptRule
from vllm_topt.backends.core import (
    LayerState,
    ToptBackendMixin,
    ToptBatch,
    ToptBuilderMixin,
    ToptImplMixin,
    extend_metadata,
)
from vllm_topt.kernels.triton.decode import (
    SUPPORTED_BLOCK_SIZES,
    SUPPORTED_DTYPES,
    SUPPORTED_HEAD_SIZES,
    DeviceThresholds,
    ToptScratch,
    fp32_refusal,
    theta_by_mode,
    topt_decode,
    update_v_block_sums,
)

CUDA_DENSE_BACKEND = "--attention-backend TRITON_ATTN (dense)"
CUDA_DEFAULT_BLOCK_SIZE = 16  # vLLM's KV page on CUDA when --block-size is not given


class ToptCudaBackend(ToptBackendMixin, TritonAttentionBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = list(SUPPORTED_DTYPES)
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16"]
    forward_includes_kv_cache_update: bool = False
    platform_name: ClassVar[str] = "CUDA"
    dense_alternative: ClassVar[str] = CUDA_DENSE_BACKEND
    dense_parent: ClassVar[str] = "TRITON_ATTN"

    @staticmethod
    def get_impl_cls() -> type[ToptCudaImpl]:
        return ToptCudaImpl

    @staticmethod
    def get_builder_cls() -> type[ToptCudaMetadataBuilder]:
        return ToptCudaMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
        return list(SUPPORTED_BLOCK_SIZES)

    @classmethod
    def supports_block_size(cls, block_size: int | None) -> bool:
        # Larger pages are split into kernel blocks of 16/32/64 tokens by vLLM.
        return block_size is None or any(block_size % size == 0 for size in SUPPORTED_BLOCK_SIZES)

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(SUPPORTED_HEAD_SIZES)

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size in SUPPORTED_HEAD_SIZES

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        return (capability.major, capability.minor) >= (8, 0)

    @classmethod
    def check_config(cls, vllm_config) -> None:
        super().check_config(vllm_config)
        check_points_share_the_launch(vllm_config)

    @classmethod
    def config_refusals(cls, vllm_config) -> list[str]:
        refused = super().config_refusals(vllm_config)
        block_size = vllm_config.cache_config.block_size
        if block_size is not None and not cls.supports_block_size(block_size):
            refused.append(f"block size {block_size} (TOPT takes multiples of {min(SUPPORTED_BLOCK_SIZES)})")
        model_config = vllm_config.model_config
        if model_config.dtype == torch.float32:
            kernel_block = kernel_block_size(block_size or CUDA_DEFAULT_BLOCK_SIZE, SUPPORTED_BLOCK_SIZES)
            if reason := fp32_refusal(model_config.get_head_size(), kernel_block):
                refused.append(reason)
        return refused


def check_points_share_the_launch(vllm_config) -> None:
    """One launch serves every request mode's rows, so a request point may differ from the server's file in θ
    and k only (placement and compensation are the kernel's constexprs)."""
    options = options_from_vllm_config(vllm_config)
    model_config = vllm_config.model_config
    server, path = resolve_thresholds(options, model_config.hf_config, model_config.model)
    for name, point, point_path, _ in resolve_request_points(options, model_config.hf_config, model_config.model):
        if difference := rule_difference(server, point):
            raise ThresholdFileError(
                f"TOPT on CUDA decodes request point {name!r} ({point_path}) in the same kernel launch as the "
                f"server's file {path}, so the two may differ in thresholds and k only, but {difference}. Choose "
                "a point calibrated with the same placement and compensation, or serve on CPU, where any threshold "
                "file can be a request point.")


@dataclass
class ToptCudaMetadata(TritonAttentionMetadata):
    """TRITON_ATTN's metadata for the whole batch, plus the Top-θ split and the kernel's buffers."""

    topt: ToptBatch | None = None
    topt_num_segments: int = 1
    topt_scratch: ToptScratch | None = None
    topt_theta: torch.Tensor | None = None  # [max decodes, H] θ buffer, shared by the layers in turn


class ToptCudaMetadataBuilder(ToptBuilderMixin, TritonAttentionMetadataBuilder):
    # Full CUDA graphs for decode-only batches; mixed batches run attention eagerly.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    reports_telemetry: ClassVar[bool] = True  # a replayed decode step runs no Python in forward

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.supports_draft_decode_metadata_update = False  # build() splits the batch
        # The layers' shared buffers (made when the model was built); none for a group of dense window layers.
        self.topt_buffers: DecodeBuffers | None = None
        if not self.topt_windowed_only:
            self.topt_buffers = decode_buffers(vllm_config, self.num_heads_q, self.num_heads_kv, self.headdim,
                                               device)
            self.topt_buffers.scratch.check(1, self.num_heads_q, self.num_heads_kv, self.headdim,
                                            -(-vllm_config.model_config.max_model_len // self.block_size),
                                            self.topt_buffers.scratch.block_vmc)
        self.topt_row_modes = shared_row_modes(vllm_config, device)
        self._prepared_cache_ptr: int | None = None

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False) -> ToptCudaMetadata:
        self._prepare_layers()
        full = super().build(common_prefix_len, common_attn_metadata, fast_build)
        batch = self.topt_batch(common_prefix_len, common_attn_metadata, full, fast_build)
        # The step's per-request modes as device data: a replayed graph reads them from the same buffer.
        batch.row_modes = self.topt_row_modes.fill(batch.modes)
        buffers = self.topt_buffers
        if buffers is None:
            return extend_metadata(ToptCudaMetadata, full, topt=batch)
        if batch.num_decodes > buffers.theta.shape[0]:
            raise RuntimeError(f"TOPT: {batch.num_decodes} decode rows, buffers sized for {buffers.theta.shape[0]}")
        return extend_metadata(
            ToptCudaMetadata, full, topt=batch, topt_num_segments=buffers.segments.get(batch.num_decodes, 1),
            topt_scratch=buffers.scratch, topt_theta=buffers.theta,
        )

    def _capture_phase(self) -> bool:
        # True from start-up until vLLM's capture_model has captured every graph (and for good in eager mode,
        # where no capture is seen and so nothing is dropped).
        from vllm.compilation import monitor

        return monitor.cudagraph_capturing_enabled

    def _prepare_layers(self) -> None:
        """Allocate every layer's device state before any step (and so before graph capture)."""
        context = self.vllm_config.compilation_config.static_forward_context
        layers = [context[name] for name in self.layer_names if name in context]
        layers = [layer for layer in layers if isinstance(getattr(layer, "impl", None), ToptCudaImpl)]
        if not layers:
            return
        caches = [_cache_tensor(layer) for layer in layers]
        if any(cache is None for cache in caches) or caches[0].data_ptr() == self._prepared_cache_ptr:
            return
        for layer, cache in zip(layers, caches):
            layer.impl.layer_state(layer, cache)
        self._prepared_cache_ptr = caches[0].data_ptr()


def uses_block_vmc(topt: ToptProcessConfig) -> bool:
    """Whether a layer of this process runs block-wise VMC (its page sums need a second buffer plane)."""
    return any(plan.rule.block_vmc and not plan.rule.dense for plan in topt.layers)


def decode_buffers(vllm_config, num_heads: int, num_kv_heads: int, head_size: int, device) -> DecodeBuffers:
    """The process's shared decode buffers for these shapes."""
    block_vmc = uses_block_vmc(process_config(vllm_config, num_heads))
    return shared_decode_buffers(vllm_config, num_heads, num_kv_heads, head_size, block_vmc, device)


def model_device() -> torch.device:
    """The device the model is being built on (the platform's: this process's current CUDA device)."""
    from vllm.platforms import current_platform

    return torch.device(current_platform.device_type)


def _cache_tensor(layer) -> torch.Tensor | None:
    kv_cache = getattr(layer, "kv_cache", None)
    if isinstance(kv_cache, (list, tuple)):
        kv_cache = kv_cache[0] if kv_cache else None
    return kv_cache if isinstance(kv_cache, torch.Tensor) and kv_cache.numel() else None


@dataclass
class CudaLayerState(LayerState):
    thresholds: DeviceThresholds | None = None
    counters: torch.Tensor | None = None  # [modes, NUM_COUNTERS] int64: the layer's rows of the telemetry bank
    # The request points' θ(n) on this layer: (mode code, θ, k); and the rule the kernel runs, at the least k
    # of every mode (a row at or below its own mode's k gets a θ nothing falls below: `theta_by_mode`).
    point_thresholds: tuple[tuple[int, DeviceThresholds, int], ...] = ()
    kernel_rule: ToptRule | None = None


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class ToptCudaImpl(ToptImplMixin, TritonAttentionImpl):
    backend = ToptCudaBackend
    reports_in_forward: ClassVar[bool] = False  # the builder reports (see the module docstring)

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None, kv_cache_dtype: str,
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, sinks: torch.Tensor | None = None,
                 use_alibi_sqrt: bool = False, chunk_lookback: int = -1) -> None:
        if chunk_lookback not in (-1, None):
            raise self.backend.refusal(["chunked local attention"])
        vllm_config = get_current_vllm_config()
        self._init_topt(
            vllm_config, num_heads=num_heads, head_size=head_size, alibi_slopes=alibi_slopes,
            sliding_window=sliding_window, sinks=sinks, kv_cache_dtype=kv_cache_dtype, attn_type=attn_type,
            kv_sharing_target_layer_name=kv_sharing_target_layer_name,
        )
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks, use_alibi_sqrt,
                         chunk_lookback)
        self.supports_quant_query_input = False
        # Allocated now, while vLLM builds the model: its memory profiling then counts them, and a graph
        # captured later finds them in place.
        device = model_device()
        telemetry.counter_bank(len(self.topt.layers), device, len(self.topt.mode_names))
        shared_row_modes(vllm_config, device)
        if self.topt_window is None:
            decode_buffers(vllm_config, num_heads, num_kv_heads, head_size, device)

    def fused_output_quant_supported(self, quant_key) -> bool:
        return False

    def fused_rope_kvcache_supported(self) -> bool:
        return False  # the fused path would write K/V without the V-sum update

    def _new_state(self, state: LayerState, kv_cache: torch.Tensor) -> CudaLayerState:
        if _capturing():
            raise RuntimeError("TOPT layer state must be allocated before CUDA graph capture")
        sparse = not state.plan.rule.dense
        thresholds = DeviceThresholds(state.plan.thresholds, kv_cache.device) if sparse else None
        points = tuple((mode, DeviceThresholds(plan.thresholds, kv_cache.device), plan.rule.k)
                       for mode, plan in enumerate(self.topt.plans_of_layer(state.index))
                       if mode > DENSE_MODE_CODE and sparse)
        kernel_k = min([state.plan.rule.k] + [k for _, _, k in points])
        return CudaLayerState(**vars(state), thresholds=thresholds, counters=telemetry.layer_counters(state.index),
                              point_thresholds=points, kernel_rule=replace(state.plan.rule, k=kernel_k))

    def _capturing(self) -> bool:
        return _capturing()

    def _decode(self, layer, query, kv_cache, meta: ToptCudaMetadata, output, state: CudaLayerState) -> None:
        # (B, H_kv, N, 2d) -> two [num_blocks, block_size, H_kv, d] views, exactly as TRITON_ATTN reads them.
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        batch = meta.topt
        num_decodes = query.shape[0]
        theta = None
        if state.thresholds is not None:
            theta = state.thresholds.lookup(batch.decode_seq_lens, out=meta.topt_theta[:num_decodes])
            if state.point_thresholds:  # device ops only, whatever the step's modes: a graph replays them
                theta = theta_by_mode(theta, batch.decode_seq_lens, batch.row_modes, state.plan.rule,
                                      state.point_thresholds)
        topt_decode(
            query, key_cache, value_cache, batch.decode_block_table, batch.decode_seq_lens, theta, state.kernel_rule,
            self.scale, v_block_sums=state.v_block_sums, logits_soft_cap=self.logits_soft_cap or None,
            out=output, counters=state.counters[:1].expand(num_decodes, -1), row_modes=batch.row_modes,
            mode_counter_stride=state.counters.stride(0), scratch=meta.topt_scratch,
            num_segments=meta.topt_num_segments, max_pages=meta.topt_scratch.block_max.shape[2],
        )

    def _add_counters(self, state: CudaLayerState, counters: torch.Tensor, batch: ToptBatch) -> None:
        # Added on the device without a sync (and so replayed by a captured graph), read at report time:
        # each row to its mode's row of the layer's counters (0: the server's file, 1: dense, 2...: a point).
        if batch.row_modes is None:
            state.counters[:1] += counters.sum(dim=0, keepdim=True)
        else:
            state.counters.index_add_(0, batch.row_modes[: counters.shape[0]], counters)

    def _update_v_block_sums(self, v_block_sums, value, slot_mapping, block_size: int) -> None:
        update_v_block_sums(v_block_sums, value, slot_mapping, block_size)
