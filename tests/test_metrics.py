"""The sparsity series on /metrics: reports written by attention processes, summed by the API server's collector.

The real server's scrape is in tests/test_server.py; here the pieces, without an engine.
"""

from __future__ import annotations

import multiprocessing

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from vllm_topt import metrics, telemetry
from vllm_topt.method.rules import DensityCounts


def report(per_layer: dict[int, DensityCounts], thresholded=(0,)) -> dict:
    mode = telemetry.RunMode(32, False, len(thresholded), len(per_layer), tuple(thresholded))
    return telemetry.stats_dict(per_layer, mode)


def scrape(registry) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a registry's text exposition."""
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def counts(rows, kept, visible=100, thresholded_target=0) -> DensityCounts:
    return DensityCounts(rows=rows, elements_visible=visible, elements_kept=kept, v_rows_visible=visible // 2,
                         v_rows_read=kept // 2, v_blocks_visible=10, v_blocks_read=5,
                         thresholded_rows=rows if thresholded_target else 0, thresholded_kept=kept if
                         thresholded_target else 0, thresholded_target=thresholded_target)


@pytest.fixture
def exchange(tmp_path, monkeypatch):
    monkeypatch.setenv(metrics.EXCHANGE_ENV, str(tmp_path))
    return tmp_path


def test_ranks_and_layer_groups_add_up(exchange, monkeypatch):
    """Two processes (say TP ranks) with a thresholded layer 0 and a dense layer 1: series are their sums."""
    rank0 = {0: counts(4, 10, thresholded_target=8), 1: counts(4, 100)}
    rank1 = {0: counts(4, 30, thresholded_target=8), 1: counts(4, 100)}
    for pid, per_layer in ((101, rank0), (102, rank1)):
        monkeypatch.setattr(metrics.os, "getpid", lambda pid=pid: pid)
        metrics.publish(report(per_layer))
    assert sorted(p.name for p in exchange.iterdir()) == ["101.json", "102.json"]
    registry = CollectorRegistry()
    registry.register(metrics.ToptCollector(exchange))
    got = scrape(registry)
    group = lambda g, mode="sparse": (("layer_group", g), ("request_mode", mode))  # noqa: E731
    assert got[("vllm_topt:attention_elements_kept_total", group("thresholded"))] == 40
    assert got[("vllm_topt:attention_elements_kept_total", group("dense"))] == 200
    assert got[("vllm_topt:decode_rows_total", group("thresholded"))] == 8
    assert got[("vllm_topt:thresholded_target_total", group("thresholded"))] == 16
    assert got[("vllm_topt:thresholded_target_total", group("dense"))] == 0
    everything = telemetry.total({i: c for i, c in enumerate([*rank0.values(), *rank1.values()])})
    assert got[("vllm_topt:element_density", ())] == pytest.approx(everything.element_density)
    assert got[("vllm_topt:v_block_density", ())] == pytest.approx(everything.v_block_density)
    assert got[("vllm_topt:kept_over_k", ())] == pytest.approx(40 / 16)
    assert got[("vllm_topt:reporting_processes", ())] == 2


def test_no_report_no_series_and_a_torn_file_is_skipped(exchange):
    registry = CollectorRegistry()
    registry.register(metrics.ToptCollector(exchange))
    assert not scrape(registry)
    (exchange / "7.json").write_text('{"per_layer": {"0": ')  # a writer that died mid-write
    metrics.publish(report({0: counts(2, 5, thresholded_target=4)}))
    assert scrape(registry)[("vllm_topt:reporting_processes", ())] == 1


def test_a_report_is_published_with_the_log_line(exchange, caplog):
    """telemetry writes the same stats dict to the exchange as to its stats file."""
    import logging

    telemetry.reset()
    try:
        telemetry.record(0, counts(3, 12, thresholded_target=6))
        telemetry._write_report(logging.getLogger("topt-test"), None, telemetry.RunMode(32, False, 1, 1, (0,)))
        written = metrics.read_reports(exchange)
        assert len(written) == 1 and written[0]["total"]["elements_kept"] == 12
        assert written[0]["thresholded_layer_ids"] == [0]
    finally:
        telemetry.reset()


def test_a_top_process_makes_its_own_directory_and_children_inherit_it(tmp_path, monkeypatch):
    """A server started from a shell (or test runner) that has the variable set must not read the parent's
    reports; processes vLLM starts (multiprocessing children) use their server's directory."""
    monkeypatch.setenv(metrics.EXCHANGE_ENV, str(tmp_path / "inherited"))
    monkeypatch.setattr(metrics, "_owned", {})
    monkeypatch.setattr(multiprocessing, "parent_process", lambda: None)
    own = metrics.prepare_exchange()
    assert own != tmp_path / "inherited" and own.is_dir()
    assert metrics.prepare_exchange() == own  # once per process
    monkeypatch.setattr(multiprocessing, "parent_process", lambda: object())
    assert metrics.prepare_exchange() == own  # a child reads the variable its server set
    monkeypatch.delenv(metrics.EXCHANGE_ENV)
    assert metrics.prepare_exchange() is None  # a child of a process that never selected TOPT


def test_the_collector_is_in_vllms_multiprocess_registry(exchange, tmp_path, monkeypatch):
    """With --api-server-count > 1 vLLM serves /metrics from a fresh multiprocess registry."""
    from vllm.v1.metrics import prometheus

    multiproc = tmp_path / "prom"
    multiproc.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(multiproc))
    monkeypatch.setattr(prometheus, "get_prometheus_registry", prometheus.get_prometheus_registry)
    metrics.install_collector(exchange)
    metrics.publish(report({0: counts(2, 5, thresholded_target=4)}))
    registry = prometheus.get_prometheus_registry()
    assert registry is not prometheus.REGISTRY
    key = ("vllm_topt:attention_elements_kept_total", (("layer_group", "thresholded"), ("request_mode", "sparse")))
    assert scrape(registry)[key] == 5


def test_requests_in_other_modes_are_counted_apart(exchange):
    """Dense and request-point rows get their own series; the density gauges (like the log line) describe the
    rows in the server's mode."""
    import logging

    telemetry.reset()
    try:
        telemetry.record(0, counts(4, 10, thresholded_target=8))
        telemetry.record(0, counts(2, 100), mode=1)
        telemetry.record(0, counts(3, 20), mode=2)
        logger = logging.getLogger("topt-test")
        with pytest.MonkeyPatch.context() as mp:
            lines = []
            mp.setattr(logger, "info", lines.append)
            telemetry._write_report(logger, None, telemetry.RunMode(32, False, 1, 1, (0,), ("sparse", "dense", "q")))
        assert "requests asking for dense: 2 rows, all kept" in lines[0] and "decode kept 10.0%" in lines[0], lines
        assert "requests asking for q: 3 rows, kept 20.0% of elements" in lines[0], lines
    finally:
        telemetry.reset()
    registry = CollectorRegistry()
    registry.register(metrics.ToptCollector(exchange))
    got = scrape(registry)
    labels = lambda mode: (("layer_group", "thresholded"), ("request_mode", mode))  # noqa: E731
    assert got[("vllm_topt:decode_rows_total", labels("dense"))] == 2
    assert got[("vllm_topt:attention_elements_kept_total", labels("dense"))] == 100
    assert got[("vllm_topt:attention_elements_kept_total", labels("sparse"))] == 10
    assert got[("vllm_topt:attention_elements_kept_total", labels("q"))] == 20
    assert got[("vllm_topt:element_density", ())] == pytest.approx(0.1)
