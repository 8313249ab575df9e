"""Run-time sparsity counters: per layer, readable from Python, logged periodically.

The counters live in the process that runs attention (the worker). Read them
with `snapshot()` in that process, or from anywhere through the JSON file the
`stats_file` option names; the server logs one summary line per
`telemetry_interval_s`:

    topt: decode kept 5.4% of attention elements, read 8.4% of V rows and 53.7% of V blocks
          (k=32, kept/k 0.91 on rows with n > k, 5.0k rows)

Two sources feed the per-layer counts. The CPU backend records Python counts
as each layer runs. On a device, every layer's kernels add to its row of one
counter bank (`counter_bank`, [modes, layers, NUM_COUNTERS] int64: the server's
mode, requests that asked to decode dense, one per request point) without a host sync, so a
replayed CUDA graph counts too; a report copies the whole bank to
the host once, without blocking, and is written when the copy has landed
(`poll_report`, called by the metadata builder, the code that runs on every
step whether or not the step replays a graph). Counts added while vLLM warms
up and captures graphs are dropped at the first step after capture
(`note_capture`, `begin_step`).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from vllm_topt import metrics
from vllm_topt.method.rules import NUM_COUNTERS, RESERVED_MODES, DensityCounts

_lock = threading.Lock()
# Per request mode code (0: the server's file; 1 dense, 2... request points: `vllm_xargs: {"topt": ...}`), per
# layer. Kept apart by mode so that the log line and /metrics describe the server's operating point.
_by_mode: dict[int, dict[int, DensityCounts]] = {}
_state = {"last_tick": time.monotonic(), "capture_seen": False}


@dataclass
class _Bank:
    """Every layer's device counters and the host buffer a report copies them into.

    Plane m counts the rows of requests in mode code m (`request_modes`: 0 the server's file, 1 dense, 2...
    the request points); row = layer index."""

    counters: torch.Tensor  # [modes, layers, NUM_COUNTERS] int64, on the device; kernels add to it
    host: torch.Tensor  # same shape, pinned on CUDA: the landing place of the one copy per report
    copy_done: Any = None  # a CUDA event while a copy is in flight


_bank: list[_Bank] = []  # zero or one


@dataclass(frozen=True)
class RunMode:
    """What the summary line says the run does."""

    target_k: int | None
    disable_sparsity: bool = False
    thresholded_layers: int | None = None  # of num_layers; the rest are dense (e.g. sliding-window layers)
    num_layers: int | None = None
    thresholded_layer_ids: tuple[int, ...] = ()  # which ones (the /metrics layer groups)
    request_modes: tuple[str, ...] = RESERVED_MODES  # the names of the mode codes (`request_modes_of`)
    keep_mass: float | None = None  # a keep-mass file: its k is only the dense-row limit, not a count to keep

    def label(self) -> str:
        if self.disable_sparsity:
            return "disable_sparsity"
        k = f"k={self.target_k}" if self.keep_mass is None else \
            f"keep mass {self.keep_mass:g}, rows with n <= {self.target_k} dense"
        if self.num_layers is None:
            return k
        return f"{k}, {self.thresholded_layers} of {self.num_layers} layers thresholded"


# Forward passes by batch kind, counted once per step (at the first attention layer).
_batches = {"decode_only": 0, "prefill_only": 0, "mixed": 0}


def record(layer: int, counts: DensityCounts, mode: int = 0) -> None:
    """Add one layer's counts of rows in request mode `mode` (0: the server's file)."""
    with _lock:
        _by_mode.setdefault(mode, {}).setdefault(layer, DensityCounts()).add(counts)


def record_batch(num_decodes: int, has_prefill: bool) -> None:
    kind = "mixed" if num_decodes and has_prefill else "decode_only" if num_decodes else "prefill_only"
    with _lock:
        _batches[kind] += 1


def batch_counts() -> dict[str, int]:
    with _lock:
        return dict(_batches)


def counter_bank(num_layers: int, device, num_modes: int = 2) -> torch.Tensor:
    """The process's device counters, [num_modes, num_layers, NUM_COUNTERS] int64, zeroed; made once, before any
    capture.

    Layer i's kernels add to row i of a plane (`layer_counters`); a graph captured on them keeps adding on
    replay."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with _lock:
        if _bank:
            bank = _bank[0]
            modes, layers = bank.counters.shape[:2]
            if bank.counters.device != device or layers < num_layers or modes < num_modes:
                raise RuntimeError(f"TOPT counter bank holds {layers} layers and {modes} modes on "
                                   f"{bank.counters.device}, not {num_layers} and {num_modes} on {device}")
            return bank.counters
        counters = torch.zeros(num_modes, num_layers, NUM_COUNTERS, dtype=torch.int64, device=device)
        host = torch.zeros(num_modes, num_layers, NUM_COUNTERS, dtype=torch.int64, pin_memory=counters.is_cuda)
        _bank.append(_Bank(counters, host))
        return counters


def layer_counters(layer: int) -> torch.Tensor:
    """Layer `layer`'s rows of the counter bank, [modes, NUM_COUNTERS] (a view: adding to it adds to the bank):
    row m for the rows in request mode m (0: the server's file)."""
    with _lock:
        if not _bank:
            raise RuntimeError("TOPT counter bank not allocated (counter_bank) before the layer's first step")
        return _bank[0].counters[:, layer]


def note_capture() -> None:
    """A forward ran under CUDA-graph capture: what warm-up and capture counted is dropped at the next real step."""
    _state["capture_seen"] = True


def begin_step(num_decodes: int, has_prefill: bool, capture_phase: bool = False) -> None:
    """Once per engine step, before its forward (the metadata builder's `build`).

    capture_phase: vLLM is still warming up and capturing graphs; the first step
    after that drops everything counted so far, if a capture ran.
    """
    if _state["capture_seen"] and not capture_phase:
        _discard_warmup()
    record_batch(num_decodes, has_prefill)


def _discard_warmup() -> None:
    with _lock:
        _state["capture_seen"] = False
        _by_mode.clear()
        for kind in _batches:
            _batches[kind] = 0
        for bank in _bank:
            bank.counters.zero_()
            bank.copy_done = None


def _start_copy(bank: _Bank) -> None:
    """Move the bank to the host (one copy, non-blocking) and zero it; stream order keeps the two apart."""
    bank.host.copy_(bank.counters, non_blocking=bank.counters.is_cuda)
    bank.counters.zero_()
    if bank.counters.is_cuda:
        bank.copy_done = torch.cuda.Event()
        bank.copy_done.record()
    else:
        bank.copy_done = None
        _fold(bank)


def _fold(bank: _Bank) -> None:
    """Add the landed host copy into the per-layer counts."""
    bank.copy_done = None
    for mode, plane in enumerate(bank.host.tolist()):
        for layer, values in enumerate(plane):
            if values[0]:
                record(layer, DensityCounts.from_counters(values), mode)


def flush() -> None:
    """Move the device counters into the per-layer counts now (waits for the device: off the hot path)."""
    for bank in list(_bank):
        if bank.copy_done is not None:
            bank.copy_done.synchronize()
            _fold(bank)
        _start_copy(bank)
        if bank.copy_done is not None:
            bank.copy_done.synchronize()
            _fold(bank)


flush_device_counters = flush


def reset() -> None:
    with _lock:
        _by_mode.clear()
        _bank.clear()
        _state["capture_seen"] = False
        for kind in _batches:
            _batches[kind] = 0


def snapshot(mode: int = 0) -> dict[int, DensityCounts]:
    """Per-layer counts of the rows in request mode `mode`: 0 (default) the server's file, 1 dense, 2... points."""
    with _lock:
        source = _by_mode.get(mode, {})
        return {layer: DensityCounts(**c.as_dict()) for layer, c in sorted(source.items())}


def other_modes() -> list[int]:
    """The request modes other than the server's that have counts."""
    with _lock:
        return sorted(mode for mode in _by_mode if mode != 0)


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
    if mode.keep_mass is None:
        kept = f"kept/k {'n/a' if t.kept_over_k is None else f'{t.kept_over_k:.2f}'}"
    else:  # no k per row to compare with: the count itself
        kept = f"mean kept {'n/a' if not t.thresholded_rows else f'{t.thresholded_kept / t.thresholded_rows:.1f}'}"
    return (
        f"topt: decode kept {100 * t.element_density:.1f}% of attention elements, "
        f"read {100 * t.v_row_density:.1f}% of V rows and {100 * t.v_block_density:.1f}% of V blocks "
        f"({mode.label()}, {kept} on rows with n > k, {_human(t.rows)} rows)"
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
        "thresholded_layer_ids": list(mode.thresholded_layer_ids),
        "total": t.as_dict()
        | {
            "element_density": t.element_density,
            "v_row_density": t.v_row_density,
            "v_block_density": t.v_block_density,
            "kept_over_k": t.kept_over_k,
        },
        "per_layer": {str(layer): c.as_dict() for layer, c in per_layer.items()},
        # Requests that chose another mode, by mode name (e.g. "dense"): their per-layer counts.
        "request_modes": {mode_name(mode, code): {str(layer): c.as_dict() for layer, c in snapshot(code).items()}
                          for code in other_modes()},
        "batches": batch_counts(),
    }


def _due(interval_s: float) -> bool:
    now = time.monotonic()
    if now - _state["last_tick"] < interval_s:
        return False
    _state["last_tick"] = now
    return True


def maybe_report(interval_s: float, logger, stats_file: str | None, mode: RunMode) -> None:
    """Log the summary line and write the stats file if the interval elapsed (waits for device counters)."""
    if _due(interval_s):
        flush()
        _write_report(logger, stats_file, mode)


def poll_report(interval_s: float, logger, stats_file: str | None, mode: RunMode) -> None:
    """Once per step: when a report is due start the bank's copy; when the copy has landed, report.

    Never waits for the device: a report is written at the first step after its copy completed."""
    bank = _bank[0] if _bank else None
    if bank is not None and bank.copy_done is not None:
        if bank.copy_done.query():
            _fold(bank)
            _write_report(logger, stats_file, mode)
        return
    if not _due(interval_s):
        return
    if bank is not None:
        _start_copy(bank)
        if bank.copy_done is not None:
            return
    _write_report(logger, stats_file, mode)


def _write_report(logger, stats_file: str | None, mode: RunMode) -> None:
    per_layer = snapshot()
    if not per_layer and not other_modes():
        return
    line = summary_line(per_layer, mode) + "".join(_mode_part(mode, code) for code in other_modes())
    logger.info(line)
    stats = stats_dict(per_layer, mode)
    if stats_file:
        tmp = f"{stats_file}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(stats, f)
        os.replace(tmp, stats_file)
    metrics.publish(stats)


def mode_name(mode: RunMode, code: int) -> str:
    return mode.request_modes[code] if code < len(mode.request_modes) else f"mode {code}"


def _mode_part(mode: RunMode, code: int) -> str:
    """The log line's words on the rows of requests in mode `code`."""
    t = total(snapshot(code))
    if not t.rows:
        return ""
    if t.elements_kept == t.elements_visible:
        return f"; requests asking for {mode_name(mode, code)}: {_human(t.rows)} rows, all kept"
    return (f"; requests asking for {mode_name(mode, code)}: {_human(t.rows)} rows, kept "
            f"{100 * t.element_density:.1f}% of elements, read {100 * t.v_row_density:.1f}% of V rows")


def read_stats_file(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
