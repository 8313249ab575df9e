"""TOPT on vLLM's CUDA platform: TRITON_ATTN's cache and prefill, Top-θ decode in Triton.

Reuses TRITON_ATTN's KV layout, KV write and metadata. Decode requests (query
length 1, pulled to the front of every batch) go through the Triton Top-θ
kernel (`vllm_topt.kernels.triton_decode`); prefill and other multi-token
requests run TRITON_ATTN's dense `unified_attention` on their part of the batch.

Per layer it keeps, on the device: the per-block V sums for VMC (updated at
every KV write), the layer's thresholds (θ(n) looked up by a kernel) and the
SPEC §7 counters, which the kernel adds to without a host sync; they are read
(one sync) when telemetry reports. Full CUDA graphs cover decode-only batches
(the launch grid depends on the batch size only); everything a graph touches
is allocated before capture, by the metadata builder's first `build`.

Not supported (the backend says so at selection, or the layer refuses at
start-up): FP8 / quantized KV caches, sliding windows, ALiBi, attention
sinks, multimodal prefix attention, non-decoder attention, KV sharing across
layers, KV connectors, speculative decoding, batch invariance, fused output
quantization.

Memory beyond what vLLM's profiling sizes the KV cache for (leave room with
--gpu-memory-utilization): per layer with VMC, fp32 V sums of 1/block_size
of that layer's KV cache (6% at block size 16); per KV-cache group, page max
scores of max_num_seqs x heads x max_model_len / block_size floats.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import (
    AttentionCGSupport,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadata,
    TritonAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills

from vllm_topt import telemetry
from vllm_topt.kernels.triton_decode import (
    COUNTER_FIELDS,
    SUPPORTED_BLOCK_SIZES,
    SUPPORTED_DTYPES,
    SUPPORTED_HEAD_SIZES,
    DeviceThresholds,
    ToptScratch,
    choose_num_segments,
    new_counters,
    topt_decode,
    update_v_block_sums,
)
from vllm_topt.layer_state import ToptLayerConfig, build_layer_config
from vllm_topt.support import refusal, unsupported_layer_features
from vllm_topt.log import get_logger
from vllm_topt.reference import DensityCounts

logger = get_logger()


class ToptCudaBackend(TritonAttentionBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = list(SUPPORTED_DTYPES)
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16"]
    forward_includes_kv_cache_update: bool = False

    @staticmethod
    def get_name() -> str:
        return "TOPT"

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
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        return (capability.major, capability.minor) >= (8, 0)

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_rswa(cls) -> bool:
        return False

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @classmethod
    def supports_batch_invariance(cls) -> bool:
        return False

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        return False

    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @classmethod
    def supports_alibi_sqrt(cls) -> bool:
        return False

    @classmethod
    def supports_kv_connector(cls) -> bool:
        return False  # blocks filled by a connector would bypass the V-sum update


@dataclass
class ToptCudaMetadata(TritonAttentionMetadata):
    """TRITON_ATTN's metadata for the whole batch, plus the decode/prefill split."""

    topt_num_decodes: int = 0
    topt_num_decode_tokens: int = 0
    topt_decode_seq_lens: torch.Tensor | None = None
    topt_decode_block_table: torch.Tensor | None = None
    topt_num_segments: int = 1
    topt_scratch: ToptScratch | None = None
    topt_theta: torch.Tensor | None = None  # [max decodes, H] θ buffer, shared by the layers in turn
    # TRITON_ATTN metadata for the requests after the decodes (None: no prefill).
    topt_prefill: TritonAttentionMetadata | None = None


class ToptCudaMetadataBuilder(TritonAttentionMetadataBuilder):
    # Full CUDA graphs for decode-only batches; mixed batches run attention eagerly.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    # Pull decode requests (query length 1) to the front of every batch.
    reorder_batch_threshold = 1

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.supports_draft_decode_metadata_update = False  # build() splits the batch
        self.max_decodes = max_decode_rows(vllm_config)
        # Rows never span more pages than max_model_len needs (the block table may be wider).
        max_pages = -(-vllm_config.model_config.max_model_len // self.block_size)
        segments = {b: choose_num_segments(b, self.num_heads_kv) for b in range(1, self.max_decodes + 1)}
        self.topt_segments = segments
        self.topt_scratch = ToptScratch.allocate(
            self.max_decodes, self.num_heads_q, self.num_heads_kv, self.headdim, max_pages,
            capacity=max(b * s for b, s in segments.items()), device=device,
        )
        self.topt_theta = torch.zeros(self.max_decodes, self.num_heads_q, dtype=torch.float32, device=device)
        self._prepared_cache_ptr: int | None = None

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> ToptCudaMetadata:
        cam = common_attn_metadata
        self._prepare_layers()
        full = super().build(common_prefix_len, cam, fast_build)
        num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(cam, decode_threshold=1)
        if num_prefills:
            query_lens = cam.query_start_loc_cpu[1:] - cam.query_start_loc_cpu[:-1]
            if num_decode_tokens != num_decodes or bool((query_lens[num_decodes:] == 1).any()):
                # A decode row outside the front of the batch would run dense: refuse instead.
                raise RuntimeError(
                    f"TOPT expects decode requests first in the batch; query lengths {query_lens.tolist()}"
                )
        if num_decodes > self.max_decodes:
            raise RuntimeError(f"TOPT: {num_decodes} decode rows, buffers sized for {self.max_decodes}")
        if num_prefills == 0:
            prefill = None
        elif num_decodes == 0:
            prefill = full
        else:
            prefill = _prefill_part(full, cam, num_decodes, num_decode_tokens)
        return ToptCudaMetadata(
            **{f.name: getattr(full, f.name) for f in dataclasses.fields(TritonAttentionMetadata)},
            topt_num_decodes=num_decodes,
            topt_num_decode_tokens=num_decode_tokens,
            topt_decode_seq_lens=cam.seq_lens[:num_decodes],
            topt_decode_block_table=cam.block_table_tensor[:num_decodes],
            topt_num_segments=self.topt_segments.get(num_decodes, 1),
            topt_scratch=self.topt_scratch,
            topt_theta=self.topt_theta,
            topt_prefill=prefill,
        )

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
            layer.impl.prepare(layer, cache)
        self._prepared_cache_ptr = caches[0].data_ptr()


def max_decode_rows(vllm_config) -> int:
    """The most decode rows one step can hold (full-graph capture sizes included)."""
    capture_sizes = vllm_config.compilation_config.cudagraph_capture_sizes or []
    return max([vllm_config.scheduler_config.max_num_seqs, *capture_sizes])


def _cache_tensor(layer) -> torch.Tensor | None:
    kv_cache = getattr(layer, "kv_cache", None)
    if isinstance(kv_cache, (list, tuple)):
        kv_cache = kv_cache[0] if kv_cache else None
    return kv_cache if isinstance(kv_cache, torch.Tensor) and kv_cache.numel() else None


def _prefill_part(full: TritonAttentionMetadata, cam: CommonAttentionMetadata, num_decodes: int,
                  num_decode_tokens: int) -> TritonAttentionMetadata:
    """TRITON_ATTN metadata of the requests after the first `num_decodes` (no host sync)."""
    qsl_cpu = cam.query_start_loc_cpu[num_decodes:] - cam.query_start_loc_cpu[num_decodes]
    causal = full.causal
    if isinstance(causal, torch.Tensor) and causal.dim() > 0:
        causal = causal[num_decodes:]
    return dataclasses.replace(
        full,
        num_actual_tokens=cam.num_actual_tokens - num_decode_tokens,
        max_query_len=int((qsl_cpu[1:] - qsl_cpu[:-1]).max()),
        query_start_loc=cam.query_start_loc[num_decodes:] - cam.query_start_loc[num_decodes],
        seq_lens=cam.seq_lens[num_decodes:],
        block_table=cam.block_table_tensor[num_decodes:],
        slot_mapping=cam.slot_mapping[num_decode_tokens:],
        causal=causal,
    )


@dataclass
class _LayerState:
    index: int
    config: ToptLayerConfig
    thresholds: DeviceThresholds | None
    v_block_sums: torch.Tensor | None  # [num_blocks, H_kv, d] float32, for VMC
    counters: torch.Tensor  # [max decodes, 10] int64, SPEC §7, accumulated on the device
    cache_ptr: int


# Per-process registry of every TOPT layer's device counters, read when telemetry reports.
_COUNTERS: dict[int, torch.Tensor] = {}
_last_flush = [time.monotonic()]


class ToptCudaImpl(TritonAttentionImpl):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
        use_alibi_sqrt: bool = False,
        chunk_lookback: int = -1,
    ) -> None:
        vllm_config = get_current_vllm_config()
        missing = unsupported_layer_features(
            alibi_slopes=alibi_slopes, sliding_window=sliding_window, sinks=sinks,
            kv_cache_dtype=kv_cache_dtype, supported_kv_cache_dtypes=ToptCudaBackend.supported_kv_cache_dtypes,
            is_decoder=attn_type == AttentionType.DECODER,
        )
        cuda_only = {
            "speculative decoding": getattr(vllm_config, "speculative_config", None) is not None,
            "KV sharing across layers": kv_sharing_target_layer_name is not None,
            f"head size {head_size}": head_size not in SUPPORTED_HEAD_SIZES,
            "chunked local attention": chunk_lookback not in (-1, None),
        }
        missing += [name for name, present in cuda_only.items() if present]
        if missing:
            raise refusal(missing, "on CUDA", "--attention-backend TRITON_ATTN (dense)")
        super().__init__(
            num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
            logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks, use_alibi_sqrt, chunk_lookback,
        )
        self.supports_quant_query_input = False
        self.topt = build_layer_config(vllm_config, num_heads)
        self._max_decodes = max_decode_rows(vllm_config)
        self._state: _LayerState | None = None

    def fused_output_quant_supported(self, quant_key) -> bool:
        return False

    def fused_rope_kvcache_supported(self) -> bool:
        return False  # the fused path would write K/V without the V-sum update

    def prepare(self, layer, kv_cache: torch.Tensor) -> _LayerState:
        """The layer's device state for this KV cache allocation (idempotent)."""
        state = self._state
        if state is not None and state.cache_ptr == kv_cache.data_ptr():
            return state
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("TOPT layer state must be allocated before CUDA graph capture")
        from vllm.model_executor.models.utils import extract_layer_index

        index = extract_layer_index(layer.layer_name)
        cfg = self.topt.for_layer(index)
        device = kv_cache.device
        sparse = not cfg.rule.dense
        v_sums = None
        if sparse and cfg.rule.vmc:
            v_sums = torch.zeros(kv_cache.shape[0], self.num_kv_heads, self.head_size, dtype=torch.float32,
                                 device=device)
        thresholds = DeviceThresholds(cfg.thresholds, device) if sparse else None
        counters = new_counters(self._max_decodes, device)
        _COUNTERS[index] = counters
        self._state = _LayerState(index, cfg, thresholds, v_sums, counters, kv_cache.data_ptr())
        return self._state

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: ToptCudaMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("TOPT does not fuse output quantization")
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        num_decodes = attn_metadata.topt_num_decodes
        prefill = attn_metadata.topt_prefill
        state = self.prepare(layer, kv_cache)
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if state.index == self.topt.first_layer and not capturing:
            telemetry.record_batch(num_decodes, prefill is not None)
        if num_decodes:
            self._decode(query[:num_decodes], kv_cache, attn_metadata, output[:num_decodes], state)
        if prefill is not None:
            start = attn_metadata.topt_num_decode_tokens
            super().forward(
                layer, query[start:], key[start:], value[start:], kv_cache, prefill, output[start:],
            )
        if state.index == self.topt.last_layer and not capturing:
            _maybe_report(self.topt)
        return output

    def _decode(self, query, kv_cache, meta: ToptCudaMetadata, output, state: _LayerState) -> None:
        # (B, H_kv, N, 2d) -> two [num_blocks, block_size, H_kv, d] views, exactly as TRITON_ATTN reads them.
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        num_decodes = query.shape[0]
        seq_lens = meta.topt_decode_seq_lens
        theta = None
        if state.thresholds is not None:
            theta = state.thresholds.lookup(seq_lens, out=meta.topt_theta[:num_decodes])
        topt_decode(
            query, key_cache, value_cache, meta.topt_decode_block_table, seq_lens, theta, state.config.rule,
            self.scale, v_block_sums=state.v_block_sums, logits_soft_cap=self.logits_soft_cap or None,
            out=output, counters=state.counters[:num_decodes], scratch=meta.topt_scratch,
            num_segments=meta.topt_num_segments, max_pages=meta.topt_scratch.block_max.shape[2],
        )

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        state = self.prepare(layer, kv_cache)
        if state.v_block_sums is not None:
            update_v_block_sums(state.v_block_sums, value, slot_mapping, kv_cache.shape[2])


def _maybe_report(topt) -> None:
    """Once per telemetry interval: move the device counters into telemetry (one sync) and report."""
    interval = topt.options.telemetry_interval_s
    now = time.monotonic()
    if now - _last_flush[0] < interval:
        return
    _last_flush[0] = now
    for layer, counters in sorted(_COUNTERS.items()):
        values = counters.sum(dim=0).tolist()
        counters.zero_()
        if values[0]:
            telemetry.record(layer, DensityCounts(**dict(zip(COUNTER_FIELDS, values))))
    telemetry.maybe_report(interval, logger, topt.stats_file)
