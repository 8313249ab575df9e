"""TOPT on vLLM's CPU platform.

Reuses CPU_ATTN's metadata, KV layout and KV write. Decode tokens (query
length 1, pulled to the front of the batch) go through Top-θ over the paged
cache; prefill tokens stay on the dense C++ kernel.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from vllm import _custom_ops as ops
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills

from vllm_topt import telemetry
from vllm_topt.cpu_decode import (
    KEY_LAYOUT_ROWS,
    KEY_LAYOUT_TRANSPOSED,
    topt_decode_paged,
    update_v_block_sums,
)
from vllm_topt.cpu_kernel import load_extension, topt_decode_paged_cpp, update_v_block_sums_cpp
from vllm_topt.log import get_logger
from vllm_topt.layer_state import ToptLayerConfig, build_layer_config
from vllm_topt.plugin import CPU_DENSE_BACKEND
from vllm_topt.support import refusal, unsupported_layer_features

logger = get_logger()

CPP_MAX_BLOCK_SIZE = 256  # kMaxBlockSize in csrc/topt_cpu.cpp


class ToptCpuBackend(CPUAttentionBackend):
    supported_kv_cache_dtypes = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "TOPT"

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @staticmethod
    def get_impl_cls() -> type["ToptCpuImpl"]:
        return ToptCpuImpl

    @staticmethod
    def get_builder_cls() -> type["ToptCpuMetadataBuilder"]:
        return ToptCpuMetadataBuilder


@dataclass
class ToptCpuMetadata(CPUAttentionMetadata):
    """CPU_ATTN's metadata for the whole batch, plus the decode/prefill split."""

    topt_num_decodes: int = 0
    topt_decode_seq_lens: torch.Tensor | None = None
    topt_decode_block_table: torch.Tensor | None = None
    # Dense-kernel metadata for the prefill requests only (None: no prefill).
    topt_prefill: CPUAttentionMetadata | None = None


class ToptCpuMetadataBuilder(CPUAttentionMetadataBuilder):
    # Pull decode requests (query length 1) to the front of every batch.
    reorder_batch_threshold = 1

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # Fail at engine start, not at the first decode, if TOPT cannot read this cache.
        layout = probe_key_layout(self.isa, self.dtype, self.head_dim, self.block_size)
        kernel = build_layer_config(vllm_config, self.num_heads).options.cpu_kernel
        if kernel == "cpp" and self.block_size > CPP_MAX_BLOCK_SIZE:
            raise NotImplementedError(
                f"TOPT's C++ kernel takes KV blocks of at most {CPP_MAX_BLOCK_SIZE} tokens, not {self.block_size}: "
                "pass --block-size 128 (the default)."
            )
        if kernel == "cpp" and layout != KEY_LAYOUT_TRANSPOSED:
            raise NotImplementedError(
                f"TOPT's C++ kernel reads the transposed K layout, but attention ISA {self.isa!r} stores K "
                "rows; choose --additional-config '{\"topt\": {\"cpu_kernel\": \"torch\"}}'."
            )

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> ToptCpuMetadata:
        cam = common_attn_metadata
        full = super().build(common_prefix_len, cam, fast_build)
        num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(cam, decode_threshold=1)
        query_lens = cam.query_start_loc_cpu[1:] - cam.query_start_loc_cpu[:-1]
        if num_decode_tokens != num_decodes or bool((query_lens[num_decodes:] == 1).any()):
            # A decode row outside the front of the batch would run dense: refuse instead.
            raise RuntimeError(f"TOPT expects decode requests first in the batch; query lengths {query_lens.tolist()}")
        if num_prefills == 0:
            prefill = None
        elif num_decodes == 0:
            prefill = full
        else:
            prefill = super().build(common_prefix_len, _prefill_part(cam, num_decodes, num_decode_tokens), fast_build)
        return ToptCpuMetadata(
            **{f.name: getattr(full, f.name) for f in dataclasses.fields(CPUAttentionMetadata)},
            topt_num_decodes=num_decodes,
            topt_decode_seq_lens=cam.seq_lens[:num_decodes],
            topt_decode_block_table=cam.block_table_tensor[:num_decodes],
            topt_prefill=prefill,
        )


def _prefill_part(cam: CommonAttentionMetadata, num_decodes: int, num_decode_tokens: int) -> CommonAttentionMetadata:
    """The common metadata of the requests after the first `num_decodes`."""
    qsl = cam.query_start_loc[num_decodes:] - cam.query_start_loc[num_decodes]
    qsl_cpu = cam.query_start_loc_cpu[num_decodes:] - cam.query_start_loc_cpu[num_decodes]
    seq_lens = cam.seq_lens[num_decodes:]
    return dataclasses.replace(
        cam,
        query_start_loc=qsl,
        query_start_loc_cpu=qsl_cpu,
        seq_lens=seq_lens,
        num_reqs=cam.num_reqs - num_decodes,
        num_actual_tokens=cam.num_actual_tokens - num_decode_tokens,
        max_query_len=int((qsl_cpu[1:] - qsl_cpu[:-1]).max()),
        max_seq_len=int(seq_lens.max()),
        block_table_tensor=cam.block_table_tensor[num_decodes:],
        slot_mapping=cam.slot_mapping[num_decode_tokens:],
    )


class ToptCpuImpl(CPUAttentionBackendImpl):
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
    ) -> None:
        missing = unsupported_layer_features(
            alibi_slopes=alibi_slopes, sliding_window=sliding_window, sinks=sinks,
            kv_cache_dtype=kv_cache_dtype, supported_kv_cache_dtypes=ToptCpuBackend.supported_kv_cache_dtypes,
            is_decoder=attn_type == AttentionType.DECODER,
        )
        if missing:
            raise refusal(missing, "on CPU", CPU_DENSE_BACKEND)
        super().__init__(
            num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
            kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks,
        )
        self.topt = build_layer_config(get_current_vllm_config(), num_heads)
        self._decode_impl, self._update_v_sums = decode_implementation(self.topt.options.cpu_kernel)
        self._layer_index: int | None = None
        self._key_layout: str | None = None
        self._v_block_sums: torch.Tensor | None = None

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: ToptCpuMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attn_metadata is None:  # warm-up
            return output
        if self._layer_index is None:
            self._layer_index = layer_index_of(layer.layer_name)
        num_decodes = attn_metadata.topt_num_decodes
        prefill = attn_metadata.topt_prefill
        if self._layer_index == self.topt.first_layer:
            telemetry.record_batch(num_decodes, prefill is not None)
        if num_decodes:
            self._decode(layer, query[:num_decodes], kv_cache, attn_metadata, output[:num_decodes])
        if prefill is not None:
            super().forward(
                layer, query[num_decodes:], key[num_decodes:], value[num_decodes:], kv_cache,
                prefill, output[num_decodes:], output_scale, output_block_scale,
            )
        return output

    def _decode(self, layer, query, kv_cache, meta: ToptCpuMetadata, output) -> None:
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        key_cache, value_cache = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, -1).chunk(2, dim=2)
        if self._key_layout is None:
            self._key_layout = probe_key_layout(layer.isa, kv_cache.dtype, self.head_size, block_size)
        cfg: ToptLayerConfig = self.topt.for_layer(self._layer_index)
        seq_lens = meta.topt_decode_seq_lens
        table = meta.topt_decode_block_table
        if self._decode_impl is topt_decode_paged_cpp:
            # The C++ kernel looks θ up by row length itself and writes the layer's output in place.
            by_length = None if cfg.rule.dense else cfg.thresholds.table_upto(meta.max_seq_len)
            direct = output.dtype == torch.float32 and output.is_contiguous()
            out, counts = topt_decode_paged_cpp(
                query, key_cache, value_cache, table, seq_lens, None, cfg.rule, self.scale, self._key_layout,
                self._v_block_sums, self.logits_soft_cap or None,
                out=output.view(query.shape) if direct else None, theta_by_length=by_length,
            )
            if not direct:
                output.view(out.shape).copy_(out)
        else:
            theta = None if cfg.rule.dense else cfg.thresholds.lookup_memoised(seq_lens)
            out, counts = topt_decode_paged(
                query, key_cache, value_cache, table, seq_lens, theta, cfg.rule, self.scale, self._key_layout,
                self._v_block_sums, self.logits_soft_cap or None,
            )
            output.view(out.shape).copy_(out)
        telemetry.record(self._layer_index, counts)
        if self._layer_index == self.topt.last_layer:  # once per step, after every layer counted
            telemetry.maybe_report(self.topt.options.telemetry_interval_s, logger, self.topt.stats_file)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if not self.topt.needs_v_block_sums:
            return
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        sums = self._v_block_sums
        if sums is None or sums.shape[0] != num_blocks:
            sums = self._v_block_sums = torch.zeros(num_blocks, num_kv_heads, self.head_size, dtype=torch.float32)
        self._update_v_sums(sums, value, slot_mapping, block_size)


def decode_implementation(name: str):
    """(decode, V-sum update) for option `cpu_kernel`; the C++ kernel must load or TOPT stops."""
    if name == "torch":
        return topt_decode_paged, update_v_block_sums
    try:
        load_extension()
    except Exception as exc:  # a compiler error is not a reason to run something else silently
        raise RuntimeError(
            "TOPT could not build its C++ CPU kernel (needs g++ and ninja; `make setup` builds it ahead "
            "of time). Fix the build, or choose the vectorised torch path with "
            "--additional-config '{\"topt\": {\"cpu_kernel\": \"torch\"}}'."
        ) from exc
    return topt_decode_paged_cpp, update_v_block_sums_cpp


def layer_index_of(layer_name: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(layer_name)


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
        f"{head_size}, block size {block_size}). Serve with --dtype float32, or use --attention-backend "
        "CPU_ATTN for dense attention."
    )
