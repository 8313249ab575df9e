"""What an attention layer of this process needs: options, rule and its heads' thresholds.

With tensor parallelism vLLM shards query heads contiguously: rank r of
`tp_size` holds global heads [r * H / tp_size, (r + 1) * H / tp_size). Each
rank applies the thresholds of exactly those heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vllm_topt import telemetry
from vllm_topt.options import ToptOptions, options_from_vllm_config, resolve_thresholds
from vllm_topt.reference import ToptRule
from vllm_topt.thresholds import LayerThresholds, ThresholdFile


def local_head_slice(num_heads_total: int, tp_rank: int, tp_size: int) -> slice:
    """The global query heads that tensor-parallel rank `tp_rank` serves."""
    if num_heads_total % tp_size:
        raise ValueError(f"{num_heads_total} query heads cannot be split across {tp_size} ranks")
    per_rank = num_heads_total // tp_size
    return slice(tp_rank * per_rank, (tp_rank + 1) * per_rank)


@dataclass(frozen=True)
class ToptLayerConfig:
    rule: ToptRule
    thresholds: LayerThresholds | None


@dataclass
class ToptProcessConfig:
    options: ToptOptions
    file: ThresholdFile
    path: Path
    heads: slice
    stats_file: str | None
    _layers: dict[int, ToptLayerConfig] = field(default_factory=dict)

    first_layer: int = 0  # where once-per-step batch kinds are counted

    @property
    def last_layer(self) -> int:  # where once-per-step telemetry is reported
        return self.file.model.num_layers - 1

    @property
    def needs_v_block_sums(self) -> bool:
        return self.file.compensation.vmc and not self.options.disable_sparsity

    def for_layer(self, layer: int) -> ToptLayerConfig:
        cfg = self._layers.get(layer)
        if cfg is None:
            cfg = self._layers[layer] = self._build_layer(layer)
        return cfg

    def _build_layer(self, layer: int) -> ToptLayerConfig:
        rule = self.file.rule_for_layer(layer, self.options.disable_sparsity)
        return ToptLayerConfig(rule, None if rule.dense else self.file.layer_thresholds(layer, self.heads))


_cache: dict[tuple[int, int], ToptProcessConfig] = {}


def build_layer_config(vllm_config, num_local_heads: int) -> ToptProcessConfig:
    """One shared config per (engine config, head count): every layer of a process reuses it."""
    key = (id(vllm_config), num_local_heads)
    if key not in _cache:
        _cache[key] = _process_config(vllm_config, num_local_heads)
    return _cache[key]


def clear_cache() -> None:
    _cache.clear()


def _process_config(vllm_config, num_local_heads: int) -> ToptProcessConfig:
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    options = options_from_vllm_config(vllm_config)
    model_config = vllm_config.model_config
    thresholds, path = resolve_thresholds(options, model_config.hf_config, model_config.model)
    tp_rank, tp_size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    heads = local_head_slice(thresholds.model.num_heads, tp_rank, tp_size)
    if heads.stop - heads.start != num_local_heads:
        raise ValueError(
            f"TOPT: rank {tp_rank} serves {num_local_heads} query heads but the threshold file "
            f"{path} splits into {heads.stop - heads.start} per rank"
        )
    stats_file = options.stats_file
    if stats_file and tp_size > 1:
        stats_file = f"{stats_file}.rank{tp_rank}"
    telemetry.configure(thresholds.target_k, options.disable_sparsity)
    return ToptProcessConfig(options, thresholds, path, heads, stats_file)
