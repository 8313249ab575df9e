"""The TOPT backend once, for every platform: capabilities and refusals, the batch split, the layer glue.

A platform backend (`cpu.py`, `cuda.py`) is a dense vLLM backend (its KV
layout, cache write, metadata and prefill kernel) with these mixins in front:

- `ToptBackendMixin` declares what TOPT serves on the Backend class, as
  vLLM's own backends do; `config_refusals` reads the same declarations
  against a whole engine config, so the front-end process refuses a
  configuration before any engine starts, and `layer_refusals` is the
  worker's last line of defence for one attention layer.
- `ToptBuilderMixin` pulls decode rows (query length 1) to the front, splits
  the batch with vLLM's helpers and builds the parent's metadata for the
  prefill part. Its `build` runs on every step, a replayed CUDA graph's
  included, so it also begins each step's telemetry (and, where no Python
  runs inside a replayed forward, reports it).
- `ToptImplMixin` runs decode rows through the platform's Top-θ kernel and
  the rest through the parent's dense `forward`, and keeps the per-block V
  sums that VMC reads. Sliding-window layers (Gemma-3's local layers) run
  wholly on the parent's dense kernel, which handles the window; telemetry
  counts their decode rows as fully kept.

Platform classes add only what differs: the kernel call, the cache views,
device buffers.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.utils import split_decodes_and_prefills
from vllm.v1.worker.ubatch_utils import UBatchSlice, split_attn_metadata

from vllm_topt import telemetry
from vllm_topt.config.layers import ToptProcessConfig, process_config
from vllm_topt.config.support import (
    ALIBI,
    ATTENTION_SINKS,
    ENCODER_DECODER,
    SLIDING_WINDOW,
    UnsupportedModelError,
    refusal,
    text_config,
    unsupported_model_features,
)
from vllm_topt.config.thresholds import LayerPlan
from vllm_topt.log import get_logger
from vllm_topt.method.rules import DensityCounts, window_counters
from vllm_topt.plugin import BACKEND_NAME
from vllm_topt.request_modes import row_modes

logger = get_logger()

DECODE_QUERY_LEN = 1  # a decode row: one new query token


# --------------------------------------------------------------------------- capabilities


class ToptBackendMixin:
    """What TOPT serves, declared on the platform's Backend class (put it before the dense parent)."""

    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]
    platform_name: ClassVar[str] = "?"
    dense_alternative: ClassVar[str] = "a dense backend"
    dense_parent: ClassVar[str] = "?"  # the dense backend whose kernel runs prefill and sliding-window layers
    default_block_size: ClassVar[int | None] = None  # None: the platform's own default

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @classmethod
    def supports_kv_cache_dtype(cls, kv_cache_dtype) -> bool:
        # Our list decides, as vLLM 0.32's base class does: from 0.33 CPU_ATTN overrides this and
        # accepts float16/bfloat16 caches whatever the list says.
        return kv_cache_dtype is None or kv_cache_dtype in cls.supported_kv_cache_dtypes

    # vLLM's selector reads these (validate_configuration) ...
    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True  # those layers run on the dense parent; a model with no other layer is refused

    @classmethod
    def supports_sink(cls) -> bool:
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
    def supports_alibi_sqrt(cls) -> bool:
        return False

    @classmethod
    def supports_kv_connector(cls) -> bool:
        return False  # blocks filled by a connector would bypass the V-sum update

    # ... and these are TOPT's own, read by config_refusals / layer_refusals.
    @classmethod
    def supports_speculative_decoding(cls) -> bool:
        return False  # draft rows have query length > 1 and would run dense

    @classmethod
    def supports_kv_sharing(cls) -> bool:
        return False  # a layer reading another's cache gets no V sums

    @classmethod
    def supports_pipeline_parallelism(cls) -> bool:
        return False  # not tested

    @classmethod
    def config_refusals(cls, vllm_config) -> list[str]:
        """Every feature of this engine configuration that TOPT cannot serve (front end, before start-up)."""
        model_config, cache_config = vllm_config.model_config, vllm_config.cache_config
        text = text_config(model_config.hf_config)
        found = {name: True for name in unsupported_model_features(model_config.hf_config)}
        found |= {
            f"KV cache dtype {cache_config.cache_dtype}": not cls.supports_kv_cache_dtype(cache_config.cache_dtype),
            f"head size {model_config.get_head_size()}": not cls.supports_head_size(model_config.get_head_size()),
            f"dtype {model_config.dtype}": not cls.supports_dtype(model_config.dtype),
            "speculative decoding": vllm_config.speculative_config is not None
            and not cls.supports_speculative_decoding(),
            "KV sharing across layers": bool(getattr(text, "num_kv_shared_layers", 0)) and not cls.supports_kv_sharing(),
            "pipeline parallelism": vllm_config.parallel_config.pipeline_parallel_size > 1
            and not cls.supports_pipeline_parallelism(),
        }
        return [name for name, present in found.items() if present]

    @classmethod
    def layer_refusals(cls, *, head_size: int, alibi_slopes, sliding_window, sinks, kv_cache_dtype: str,
                       attn_type: str, kv_sharing_target_layer_name) -> list[str]:
        """The same refusals from the arguments vLLM gives one attention layer (the worker's last check)."""
        found = {
            ALIBI: alibi_slopes is not None,
            SLIDING_WINDOW: sliding_window is not None and not cls.supports_sliding_window(),
            ATTENTION_SINKS: sinks is not None and not cls.supports_sink(),
            f"KV cache dtype {kv_cache_dtype}": not cls.supports_kv_cache_dtype(kv_cache_dtype),
            f"head size {head_size}": not cls.supports_head_size(head_size),
            ENCODER_DECODER: not cls.supports_attn_type(attn_type),
            "KV sharing across layers": kv_sharing_target_layer_name is not None and not cls.supports_kv_sharing(),
        }
        return [name for name, present in found.items() if present]

    @classmethod
    def refusal(cls, features: list[str], where: str | None = None) -> UnsupportedModelError:
        return refusal(features, where or f"on {cls.platform_name}", cls.dense_alternative)

    @classmethod
    def check_config(cls, vllm_config) -> None:
        """Raise, naming every unsupported feature and the dense alternative, if TOPT cannot serve this."""
        refused = cls.config_refusals(vllm_config)
        if refused:
            raise cls.refusal(refused, f"model {vllm_config.model_config.model} on {cls.platform_name}")


# --------------------------------------------------------------------------- the batch split


@dataclass
class ToptBatch:
    """Which rows of a batch go through Top-θ; built once per step by the metadata builder."""

    num_decodes: int
    num_decode_tokens: int
    decode_seq_lens: torch.Tensor
    decode_block_table: torch.Tensor
    # The dense parent's metadata for the requests after the decodes (the whole batch's in a builder of
    # sliding-window layers only, which never use it); None: no such requests.
    prefill: Any | None
    first_layer: int  # where this step's batch kind is counted (the model's first TOPT layer)
    last_layer: int  # where this step's telemetry is reported, after every layer has counted
    # Int32 [num_decodes] on the host: the decode rows' request mode codes (`request_modes`: 0 the server's
    # file, 1 dense, 2... a request point); None when every row is 0.
    modes: torch.Tensor | None = None
    # The same as device data, int32 [>= num_decodes], on platforms whose kernels read it (CUDA).
    row_modes: torch.Tensor | None = None


def rows_by_mode(batch: ToptBatch) -> list[tuple[int, torch.Tensor | None]]:
    """(mode code, its decode rows' indices) for each mode in the batch; rows None: every decode row."""
    if batch.modes is None:
        return [(0, None)]
    return [(mode, (batch.modes == mode).nonzero().flatten()) for mode in batch.modes.unique().tolist()]


def split_decode_rows(cam: CommonAttentionMetadata) -> tuple[int, int, CommonAttentionMetadata | None]:
    """(decode requests, their tokens, the common metadata of the rest or None).

    Decode requests must come first (the builder's `reorder_batch_threshold`);
    a decode row elsewhere would run dense, so it is refused instead.
    """
    num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(
        cam, decode_threshold=DECODE_QUERY_LEN)
    if num_prefills == 0:
        return num_decodes, num_decode_tokens, None
    query_lens = cam.query_start_loc_cpu[1:] - cam.query_start_loc_cpu[:-1]
    if num_decode_tokens != num_decodes or bool((query_lens[num_decodes:] == DECODE_QUERY_LEN).any()):
        raise RuntimeError(f"TOPT expects decode requests first in the batch; query lengths {query_lens.tolist()}")
    if num_decodes == 0:
        return 0, 0, cam
    rest = UBatchSlice(slice(num_decodes, cam.num_reqs), slice(num_decode_tokens, cam.num_actual_tokens))
    return num_decodes, num_decode_tokens, split_attn_metadata([rest], cam)[0]


def layer_span(layer_names) -> tuple[int, int]:
    """The first and last layer index among `layer_names`."""
    from vllm.model_executor.models.utils import extract_layer_index

    indices = [extract_layer_index(name) for name in layer_names] or [0]
    return min(indices), max(indices)


class ToptBuilderMixin:
    """The dense builder's metadata for the whole batch, plus the `ToptBatch` split (put it before the parent)."""

    reorder_batch_threshold: int = DECODE_QUERY_LEN  # decode requests first
    # Whether `build` writes the telemetry reports (where Python in `forward` does not run on every step).
    reports_telemetry: ClassVar[bool] = False

    @functools.cached_property
    def topt_layer_span(self) -> tuple[int, int]:
        # Each KV-cache group has its own builder (Gemma-3: one for its global layers, five for its sliding
        # ones); a step is counted once, at the first and last TOPT layer of this rank. Parsed once.
        return layer_span(list(self._topt_layers()) or self.layer_names)

    @functools.cached_property
    def topt_windowed_only(self) -> bool:
        """Whether every layer of this builder has a sliding window (they run the parent on the whole batch)."""
        layers = self._topt_layers()
        return bool(self.layer_names) and all(
            name in layers and layers[name].impl.topt_window is not None for name in self.layer_names)

    @functools.cached_property
    def topt_counts_steps(self) -> bool:
        """Whether this builder's layers include the rank's first TOPT layer (it begins each step's telemetry)."""
        return bool(self.layer_names) and layer_span(self.layer_names)[0] == self.topt_layer_span[0]

    def _topt_layers(self) -> dict:
        context = self.vllm_config.compilation_config.static_forward_context
        return {name: layer for name, layer in context.items()
                if isinstance(getattr(layer, "impl", None), ToptImplMixin)}

    def topt_batch(self, common_prefix_len: int, cam: CommonAttentionMetadata, full, fast_build: bool) -> ToptBatch:
        num_decodes, num_decode_tokens, rest = split_decode_rows(cam)
        if rest is None:
            prefill = None
        elif num_decodes == 0 or self.topt_windowed_only:
            prefill = full
        else:
            prefill = super().build(common_prefix_len, rest, fast_build)
        first, last = self.topt_layer_span
        if self.topt_counts_steps:
            self._topt_step(num_decodes, rest is not None)
        return ToptBatch(num_decodes, num_decode_tokens, cam.seq_lens[:num_decodes],
                         cam.block_table_tensor[:num_decodes], prefill, first, last, row_modes(num_decodes))

    def _topt_step(self, num_decodes: int, has_prefill: bool) -> None:
        """Telemetry at the start of a step: its batch kind, warm-up counts dropped, a due report."""
        telemetry.begin_step(num_decodes, has_prefill, capture_phase=self._capture_phase())
        layers = self._topt_layers()
        if self.reports_telemetry and layers:
            topt = next(iter(layers.values())).impl.topt
            telemetry.poll_report(topt.options.telemetry_interval_s, logger, topt.stats_file, topt.mode)

    def _capture_phase(self) -> bool:
        """Whether vLLM is still warming up and capturing graphs (steps so far are not real requests)."""
        return False


def extend_metadata(cls, parent_metadata, **extra):
    """An instance of the platform metadata class `cls` (a subclass of the parent's) with `extra` set."""
    parent_fields = {f.name: getattr(parent_metadata, f.name) for f in dataclasses.fields(parent_metadata)}
    return cls(**parent_fields, **extra)


# --------------------------------------------------------------------------- the layer glue


@dataclass
class LayerState:
    """One attention layer's TOPT state for one KV-cache allocation."""

    index: int
    plan: LayerPlan
    v_block_sums: torch.Tensor | None  # [num_blocks, H_kv, d] float32, for VMC
    cache_ptr: int


class ToptImplMixin:
    """Decode rows through Top-θ, the rest through the dense parent (put it before the parent Impl).

    A platform Impl sets `backend` and implements `_decode` and `_update_v_block_sums`;
    it may extend `_new_state`.
    """

    backend: ClassVar[type[ToptBackendMixin]]
    # Whether the last layer's `forward` writes the telemetry reports (Python runs in it on every step).
    reports_in_forward: ClassVar[bool] = True

    def _init_topt(self, vllm_config, *, num_heads: int, head_size: int, alibi_slopes, sliding_window, sinks,
                   kv_cache_dtype: str, attn_type: str, kv_sharing_target_layer_name) -> None:
        refused = self.backend.layer_refusals(
            head_size=head_size, alibi_slopes=alibi_slopes, sliding_window=sliding_window, sinks=sinks,
            kv_cache_dtype=kv_cache_dtype, attn_type=attn_type,
            kv_sharing_target_layer_name=kv_sharing_target_layer_name,
        )
        if refused:
            raise self.backend.refusal(refused)
        self.topt: ToptProcessConfig = process_config(vllm_config, num_heads)
        self.topt_window: int | None = sliding_window  # set: the dense parent runs this layer
        self._state: LayerState | None = None

    def layer_state(self, layer, kv_cache: torch.Tensor) -> LayerState:
        """The layer's state for this KV cache allocation (made on first use, again if the cache moves)."""
        state = self._state
        if state is not None and state.cache_ptr == kv_cache.data_ptr():
            return state
        from vllm.model_executor.models.utils import extract_layer_index

        index = extract_layer_index(layer.layer_name)
        plan = self.topt.for_layer(index)
        if self.topt_window is not None and not plan.rule.dense:  # the front end checks this; so does the worker
            raise RuntimeError(f"TOPT: layer {index} has a sliding window but thresholds in {self.topt.path}; "
                               "recalibrate with `vllm-topt-calibrate` (it records sliding-window layers as dense)")
        v_sums = None
        if any(not p.rule.dense and p.rule.vmc for p in self.topt.plans_of_layer(index)):  # any mode's VMC
            v_sums = torch.zeros(kv_cache.shape[0], self.num_kv_heads, self.head_size, dtype=torch.float32,
                                 device=kv_cache.device)
        self._state = self._new_state(LayerState(index, plan, v_sums, kv_cache.data_ptr()), kv_cache)
        return self._state

    def _new_state(self, state: LayerState, kv_cache: torch.Tensor) -> LayerState:
        return state

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("TOPT does not fuse output quantization")
        if attn_metadata is None:  # profiling run: vLLM's backends return a filled output
            return output.fill_(0)
        batch: ToptBatch = attn_metadata.topt
        state = self.layer_state(layer, kv_cache)
        if self._capturing():
            telemetry.note_capture()
        if self.topt_window is not None:
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output)
            if batch.num_decodes:  # device ops only: a captured graph replays them
                self._count_window_rows(state, batch, kv_cache.shape[2])
        else:
            self._forward_split(layer, query, key, value, kv_cache, attn_metadata, output, state)
        if self.reports_in_forward and state.index == batch.last_layer:
            options = self.topt.options
            telemetry.maybe_report(options.telemetry_interval_s, logger, self.topt.stats_file, self.topt.mode)
        return output

    def _forward_split(self, layer, query, key, value, kv_cache, attn_metadata, output, state: LayerState) -> None:
        """Decode rows through Top-θ, the requests after them through the dense parent."""
        batch: ToptBatch = attn_metadata.topt
        if batch.num_decodes:
            self._decode(layer, query[: batch.num_decodes], kv_cache, attn_metadata,
                         output[: batch.num_decodes], state)
        if batch.prefill is not None:
            start = batch.num_decode_tokens
            super().forward(layer, query[start:], key[start:], value[start:], kv_cache, batch.prefill,
                            output[start:])

    def _count_window_rows(self, state: LayerState, batch: ToptBatch, block_size: int) -> None:
        """Telemetry of a sliding-window layer's decode rows: every key of the window kept."""
        counters = window_counters(batch.decode_seq_lens, self.topt_window, self.num_heads, self.num_kv_heads,
                                   block_size)
        self._add_counters(state, counters, batch)

    def _add_counters(self, state: LayerState, counters: torch.Tensor, batch: ToptBatch) -> None:
        """Add per-row SPEC §7 counters ([rows, NUM_COUNTERS]) to the layer's telemetry, by request mode."""
        for mode, rows in rows_by_mode(batch):
            picked = counters if rows is None else counters[rows]
            telemetry.record(state.index, DensityCounts.from_counters(picked.sum(dim=0).tolist()), mode)

    def _capturing(self) -> bool:
        """Whether this forward is being captured into a CUDA graph (it then runs only as a replay)."""
        return False

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        state = self.layer_state(layer, kv_cache)
        if state.v_block_sums is not None:
            self._update_v_block_sums(state.v_block_sums, value, slot_mapping, kv_cache.shape[2])

    def _decode(self, layer, query, kv_cache, attn_metadata, output, state: LayerState) -> None:
        raise NotImplementedError

    def _update_v_block_sums(self, v_block_sums, value, slot_mapping, block_size: int) -> None:
        raise NotImplementedError
