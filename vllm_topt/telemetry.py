"""Run-time sparsity counters: per layer, readable from Python, logged periodically.

The counters live in the process that runs attention (the worker). Read them
with `snapshot()` in that process, or from anywhere through the JSON file the
`stats_file` option names; the server logs one summary line per
`telemetry_interval_s`:

    topt: decode kept 5.4% of attention elements, read 8.4% of V rows and 53.7% of V blocks
          (k=32, kept/k 0.91 on rows with n > k, 5.0k rows)
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass

import torch

from vllm_topt.method.rules import NUM_COUNTERS, DensityCounts

_lock = threading.Lock()
_per_layer: dict[int, DensityCounts] = {}
_state = {"last_tick": time.monotonic()}
# Per-layer counter tensors a device kernel adds to (COUNTER_FIELDS order, [rows, NUM_COUNTERS]);
# moved into the per-layer counts (one sync) when a report is due.
_device_counters: dict[int, torch.Tensor] = {}


@dataclass(frozen=True)
class RunMode:
    """What the summary line says the run does."""

    target_k: int | None
    disable_sparsity: bool = False
    thresholded_layers: int | None = None  # of num_layers; the rest are dense (e.g. sliding-window layers)
    num_layers: int | None = None

    def label(self) -> str:
        if self.disable_sparsity:
            return "disable_sparsity"
        if self.num_layers is None:
            return f"k={self.target_k}"
        return f"k={self.target_k}, {self.thresholded_layers} of {self.num_layers} layers thresholded"


# Forward passes by batch kind, counted once per step (at the first attention layer).
_batches = {"decode_only": 0, "prefill_only": 0, "mixed": 0}


def record(layer: int, counts: DensityCounts) -> None:
    with _lock:
        _per_layer.setdefault(layer, DensityCounts()).add(counts)


def record_batch(num_decodes: int, has_prefill: bool) -> None:
    kind = "mixed" if num_decodes and has_prefill else "decode_only" if num_decodes else "prefill_only"
    with _lock:
        _batches[kind] += 1


def batch_counts() -> dict[str, int]:
    with _lock:
        return dict(_batches)


def register_device_counters(layer: int, counters: torch.Tensor) -> None:
    """A layer's device counter tensor; read and zeroed at each report."""
    with _lock:
        _device_counters[layer] = counters


def flush_device_counters() -> None:
    with _lock:
        device = list(_device_counters.items())
    for layer, counters in device:
        values = counters.reshape(-1, NUM_COUNTERS).sum(dim=0).tolist()
        counters.zero_()
        if values[0]:
            record(layer, DensityCounts.from_counters(values))


def reset() -> None:
    with _lock:
        _per_layer.clear()
        _device_counters.clear()
        for kind in _batches:
            _batches[kind] = 0


def snapshot() -> dict[int, DensityCounts]:
    with _lock:
        return {layer: DensityCounts(**c.as_dict()) for layer, c in sorted(_per_layer.items())}


def total(per_layer: dict[int, DensityCounts] | None = None) -> DensityCounts:
    result = DensityCounts()
    for counts in (snapshot() if per_layer is None else per_layer).values():
        result.add(counts)
    return result


def _human(count: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


def summary_line(per_layer: dict[int, DensityCounts] | None = None, mode: RunMode = RunMode(None)) -> str:
    t = total(per_layer)
    kept_over_k = "n/a" if t.kept_over_k is None else f"{t.kept_over_k:.2f}"
    return (
        f"topt: decode kept {100 * t.element_density:.1f}% of attention elements, "
        f"read {100 * t.v_row_density:.1f}% of V rows and {100 * t.v_block_density:.1f}% of V blocks "
        f"({mode.label()}, kept/k {kept_over_k} on rows with n > k, {_human(t.rows)} rows)"
    )


def stats_dict(per_layer: dict[int, DensityCounts] | None = None, mode: RunMode = RunMode(None)) -> dict:
    per_layer = snapshot() if per_layer is None else per_layer
    t = total(per_layer)
    return {
        "pid": os.getpid(),
        "time": time.time(),
        "target_k": mode.target_k,
        "disable_sparsity": mode.disable_sparsity,
        "thresholded_layers": mode.thresholded_layers,
        "num_layers": mode.num_layers,
        "total": t.as_dict()
        | {
            "element_density": t.element_density,
            "v_row_density": t.v_row_density,
            "v_block_density": t.v_block_density,
            "kept_over_k": t.kept_over_k,
        },
        "per_layer": {str(layer): c.as_dict() for layer, c in per_layer.items()},
        "batches": batch_counts(),
    }


def maybe_report(interval_s: float, logger, stats_file: str | None, mode: RunMode) -> None:
    """Log the summary line and write the stats file if the interval elapsed."""
    now = time.monotonic()
    if now - _state["last_tick"] < interval_s:
        return
    _state["last_tick"] = now
    flush_device_counters()
    per_layer = snapshot()
    if not per_layer:
        return
    logger.info(summary_line(per_layer, mode))
    if stats_file:
        tmp = f"{stats_file}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(stats_dict(per_layer, mode), f)
        os.replace(tmp, stats_file)


def read_stats_file(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
