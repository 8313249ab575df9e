"""The sparsity counters as Prometheus series on the server's own `/metrics`, next to vLLM's.

The counters live in the processes that run attention (engine cores, and
tensor-parallel workers); `/metrics` is served by the API server, which sees
none of them. vLLM's stat loggers run in the API server too, and its
Prometheus multiprocess mode only aggregates processes that share the
directory it creates for `--api-server-count` > 1. So the route here works in
both modes:

1. when TOPT is selected, the API server's config check makes an exchange
   directory and names it in `VLLM_TOPT_METRICS_DIR`, which every process
   vLLM starts afterwards inherits (`prepare_exchange`);
2. each attention process writes its report (the stats dict behind the log
   line, `telemetry.stats_dict`) there as `<pid>.json` whenever it logs one;
3. a collector in the API server's registry (the one vLLM's `/metrics`
   serves, multiprocess or not) sums every file at each scrape: ranks and
   engines add up because each counts its own heads and requests.

A scrape therefore shows the numbers of the last log line of every process.
"""

from __future__ import annotations

import atexit
import json
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path

from vllm_topt.method.rules import SPARSE_MODE
from vllm_topt.log import get_logger
from vllm_topt.method.rules import COUNTER_FIELDS, DensityCounts

logger = get_logger()

EXCHANGE_ENV = "VLLM_TOPT_METRICS_DIR"
PREFIX = "vllm_topt:"
LAYER_GROUP_LABEL = "layer_group"  # "thresholded": Top-θ layers; "dense": sliding-window and --dense-layers
# "sparse": the server's thresholds; "dense" or a request point's name: requests that asked for it
REQUEST_MODE_LABEL = "request_mode"

# counter field -> (series name without `_total`, help text)
COUNTER_SERIES = {
    "rows": ("decode_rows", "Decode query rows attended (one per sequence and layer)."),
    "elements_visible": ("attention_elements_visible", "Attention elements (query head x key) dense attention "
                                                       "would compute."),
    "elements_kept": ("attention_elements_kept", "Attention elements Top-θ kept."),
    "v_rows_visible": ("v_rows_visible", "V-cache rows (KV head x token) dense attention would read."),
    "v_rows_read": ("v_rows_read", "V-cache rows read."),
    "v_blocks_visible": ("v_blocks_visible", "V-cache blocks (KV head x page) dense attention would read."),
    "v_blocks_read": ("v_blocks_read", "V-cache blocks read."),
    "thresholded_rows": ("thresholded_rows", "Query-head rows the threshold applied to (n > k)."),
    "thresholded_kept": ("thresholded_kept", "Elements kept on thresholded rows."),
    "thresholded_target": ("thresholded_target", "k summed over thresholded rows (kept/k = kept / target)."),
}
assert tuple(COUNTER_SERIES) == COUNTER_FIELDS  # one series per counter, in counter order

# gauge -> (DensityCounts property, help text); over every layer of every process, sparse rows only (as the
# log line: requests that asked for dense are counted apart)
RATIO_SERIES = {
    "element_density": ("element_density", "Share of attention elements kept (the log line's 'kept')."),
    "v_row_density": ("v_row_density", "Share of V rows read."),
    "v_block_density": ("v_block_density", "Share of V blocks read."),
    "kept_over_k": ("kept_over_k", "Kept elements per k on thresholded rows."),
}


# --- the API server side: the exchange directory, and the collector ---------------------------------------


_owned: dict[str, Path] = {}


def prepare_exchange() -> Path | None:
    """The exchange directory: made by a top process (the API server, or a script running `vllm.LLM`) when
    it selects TOPT, and inherited by the processes vLLM starts from it (multiprocessing children). A top
    process never reuses a directory it inherited from its own parent shell or test runner."""
    if multiprocessing.parent_process() is not None:
        named = os.environ.get(EXCHANGE_ENV)
        return Path(named) if named else None
    if "path" not in _owned:
        path = Path(tempfile.mkdtemp(prefix="vllm-topt-metrics-"))
        _owned["path"] = path
        os.environ[EXCHANGE_ENV] = str(path)
        owner = os.getpid()
        atexit.register(lambda: os.getpid() == owner and shutil.rmtree(path, ignore_errors=True))
    return _owned["path"]


def read_reports(directory: Path) -> list[dict]:
    """Every process's last report; a file being replaced or half written is skipped (the next scrape has it)."""
    reports = []
    for path in sorted(directory.glob("*.json")):
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return reports


def layer_group(report: dict, layer: str) -> str:
    return "thresholded" if int(layer) in report.get("thresholded_layer_ids", ()) else "dense"


def report_modes(report: dict) -> dict[str, dict]:
    """A report's per-layer counts by request mode: the server's ("sparse"), then the modes requests chose."""
    return {SPARSE_MODE: report.get("per_layer", {})} | report.get("request_modes", {})


def sum_reports(reports: list[dict]) -> dict[tuple[str, str], DensityCounts]:
    """Counters per (layer group, request mode), summed over layers and processes."""
    groups: dict[tuple[str, str], DensityCounts] = {}
    for report in reports:
        for mode, per_layer in report_modes(report).items():
            for layer, counts in per_layer.items():
                groups.setdefault((layer_group(report, layer), mode), DensityCounts()).add(DensityCounts(**counts))
    return groups


class ToptCollector:
    """A custom Prometheus collector: reads the exchange directory at each scrape."""

    def __init__(self, directory: Path):
        self.directory = directory

    def describe(self):
        return []  # the series exist only once a process has reported: nothing to check at registration

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        reports = read_reports(self.directory)
        if not reports:
            return
        groups = sum_reports(reports)
        for field, (name, doc) in COUNTER_SERIES.items():
            family = CounterMetricFamily(PREFIX + name, doc, labels=[LAYER_GROUP_LABEL, REQUEST_MODE_LABEL])
            for labels, counts in sorted(groups.items()):
                family.add_metric(list(labels), getattr(counts, field))
            yield family
        total = DensityCounts()  # the operating point: sparse rows, as the log line
        for (_, mode), counts in groups.items():
            if mode == "sparse":
                total.add(counts)
        for name, (prop, doc) in RATIO_SERIES.items():
            value = getattr(total, prop)
            if value is not None:
                yield GaugeMetricFamily(PREFIX + name, doc, value=value)
        processes = GaugeMetricFamily(PREFIX + "reporting_processes", "Attention processes that have reported.",
                                      value=len(reports))
        yield processes


def _registered_once(registry, directory: Path) -> None:
    if not getattr(registry, "_topt_collector", None):
        registry.register(ToptCollector(directory))
        registry._topt_collector = True


def install_collector(directory: Path) -> None:
    """Put the collector in every registry vLLM's `/metrics` can serve from (global or multiprocess)."""
    import sys

    from prometheus_client import REGISTRY

    from vllm.v1.metrics import prometheus

    _registered_once(REGISTRY, directory)
    if getattr(prometheus.get_prometheus_registry, "_topt_wrapped", False):
        return
    original = prometheus.get_prometheus_registry

    def get_prometheus_registry():
        registry = original()
        _registered_once(registry, directory)
        return registry

    get_prometheus_registry._topt_wrapped = True
    prometheus.get_prometheus_registry = get_prometheus_registry
    # The /metrics router imports the function by name; if it is imported already, teach its copy too.
    router = sys.modules.get(ROUTER_MODULE)
    if router is not None and hasattr(router, "get_prometheus_registry"):
        router.get_prometheus_registry = get_prometheus_registry


ROUTER_MODULE = "vllm.entrypoints.serve.instrumentator.metrics"


def serve_metrics() -> None:
    """In the API server, when TOPT is selected: the exchange directory and the collector (never fatal)."""
    try:
        directory = prepare_exchange()
        if directory is not None:
            install_collector(directory)
    except Exception as exc:  # noqa: BLE001 - the server serves without the series, and says so
        logger.warning("TOPT: sparsity series are not on /metrics (%s: %s); the log line still reports them.",
                       type(exc).__name__, exc)


# --- the attention process side --------------------------------------------------------------------------


def publish(stats: dict) -> None:
    """Write this process's report where the API server's collector reads it (if a server set one up)."""
    named = os.environ.get(EXCHANGE_ENV)
    if not named or not os.path.isdir(named):
        return
    path = Path(named) / f"{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stats))
    os.replace(tmp, path)
