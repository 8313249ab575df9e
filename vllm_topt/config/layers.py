"""What the attention layers of one process need: options, and each layer's rule and θ(n) for its heads.

With tensor parallelism vLLM shards query heads contiguously: rank r of
`tp_size` holds global heads [r * H / tp_size, (r + 1) * H / tp_size). Each
rank applies the thresholds of exactly those heads.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from vllm_topt import telemetry
from vllm_topt.config.options import (
    ToptOptions,
    load_cached,
    options_from_vllm_config,
    request_modes_of,
    resolve_request_points,
    resolve_thresholds,
)
from vllm_topt.config.thresholds import LayerPlan, ThresholdFile
from vllm_topt.method.rules import DENSE_MODE_CODE, ToptRule

DENSE_PLAN = LayerPlan(ToptRule(dense=True), None)  # what a request asking for dense gets on every layer


def local_head_slice(num_heads_total: int, tp_rank: int, tp_size: int) -> slice:
    """The global query heads that tensor-parallel rank `tp_rank` serves."""
    if num_heads_total % tp_size:
        raise ValueError(f"{num_heads_total} query heads cannot be split across {tp_size} ranks")
    per_rank = num_heads_total // tp_size
    return slice(tp_rank * per_rank, (tp_rank + 1) * per_rank)


@dataclass(frozen=True)
class ToptProcessConfig:
    """The options and every layer's plan, for the query heads this rank serves."""

    options: ToptOptions
    file: ThresholdFile
    path: Path
    heads: slice
    stats_file: str | None
    layers: tuple[LayerPlan, ...]
    # Each request point's layer plans (`request_points`), for request modes 2, 3, ...
    point_layers: tuple[tuple[LayerPlan, ...], ...] = ()

    def for_layer(self, layer: int) -> LayerPlan:
        return self.layers[layer]

    def for_mode(self, layer: int, mode: int) -> LayerPlan:
        """Layer `layer`'s plan for a row in request mode `mode` (0: the server's file, 1: dense, 2...: a point)."""
        if mode == 0:
            return self.layers[layer]
        return DENSE_PLAN if mode == DENSE_MODE_CODE else self.point_layers[mode - DENSE_MODE_CODE - 1][layer]

    def plans_of_layer(self, layer: int) -> list[LayerPlan]:
        """Layer `layer`'s plan in every request mode, by code."""
        return [self.for_mode(layer, mode) for mode in range(len(self.mode_names))]

    @property
    def mode_names(self) -> tuple[str, ...]:
        return request_modes_of(self.options)

    @property
    def mode(self) -> telemetry.RunMode:
        thresholded = tuple(self.file.thresholded_layers())
        return telemetry.RunMode(self.file.target_k, self.options.disable_sparsity,
                                 len(thresholded), self.file.model.num_layers, thresholded, self.mode_names,
                                 self.file.keep_mass())


def process_config(vllm_config, num_local_heads: int) -> ToptProcessConfig:
    """The config of this process's layers (the same object for every layer with these settings)."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    options = options_from_vllm_config(vllm_config)
    model_config = vllm_config.model_config
    _, path = resolve_thresholds(options, model_config.hf_config, model_config.model)
    points = tuple(path for _, _, path, _ in resolve_request_points(options, model_config.hf_config,
                                                                     model_config.model))
    return _process_config(options, path, get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size(),
                           num_local_heads, points)


@functools.lru_cache(maxsize=8)
def _process_config(options: ToptOptions, path: Path, tp_rank: int, tp_size: int,
                    num_local_heads: int, point_paths: tuple[Path, ...] = ()) -> ToptProcessConfig:
    # Keyed by value: every layer of a process asks with the same settings and shares one plan.
    file = load_cached(str(path.resolve()))
    heads = local_head_slice(file.model.num_heads, tp_rank, tp_size)
    if heads.stop - heads.start != num_local_heads:
        raise ValueError(
            f"TOPT: rank {tp_rank} serves {num_local_heads} query heads but the threshold file "
            f"{path} splits into {heads.stop - heads.start} per rank"
        )
    stats_file = options.stats_file
    if stats_file and tp_size > 1:
        stats_file = f"{stats_file}.rank{tp_rank}"
    plan = tuple(file.layer_plan(heads, options.disable_sparsity))
    point_plans = tuple(tuple(load_cached(str(p.resolve())).layer_plan(heads, options.disable_sparsity))
                        for p in point_paths)
    return ToptProcessConfig(options, file, path, heads, stats_file, plan, point_plans)

