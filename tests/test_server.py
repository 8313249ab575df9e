"""The real OpenAI-compatible server with `--attention-backend topt`, and start-up refusals."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.engine_run import DEFAULT_MODEL, ROOT
from tests.serving import START_TIMEOUT_S, complete, free_port, server_command, server_env, serving
from tests.model_folders import sliding_window_model, variant_of_default_model
from tests.test_thresholds import valid_file_dict


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    # The server's default (the quality file), and the speed file as a request point.
    with serving(log_path, {"telemetry_interval_s": 1, "request_points": {"speed": "speed"}}) as base:
        yield base, log_path


def test_completions(server):
    base, _ = server
    assert "Paris" in complete(base, "The capital of France is")


def test_chat_completions(server):
    base, _ = server
    r = requests.post(
        f"{base}/v1/chat/completions",
        json={
            "model": "default", "temperature": 0, "max_tokens": 40,
            "messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        },
        timeout=300,
    )
    r.raise_for_status()
    assert "Paris" in r.json()["choices"][0]["message"]["content"]


def test_concurrent_requests_and_telemetry_line(server):
    base, log_path = server
    essay = " ".join(["The city council met on Tuesday to discuss the new budget for parks and libraries."] * 30)
    prompts = [f"{essay}\nQuestion {i}: what did the council discuss?\nAnswer:" for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        texts = list(pool.map(lambda p: complete(base, p, 64), prompts))
    assert all(t.strip() for t in texts)
    time.sleep(2)
    lines = [l for l in log_path.read_text().splitlines() if "topt: decode kept" in l]
    assert lines, "no telemetry line in the server log"
    kept = float(lines[-1].split("decode kept ")[1].split("%")[0])
    assert kept < 50.0, lines[-1]


def test_metrics_endpoint_shows_the_log_lines_sparsity(server):
    """After decodes, vLLM's own /metrics carries the TOPT series, equal to the last telemetry line."""
    from prometheus_client.parser import text_string_to_metric_families

    base, log_path = server
    for _ in range(10):  # until a report falls due during a decode (interval 1 s)
        complete(base, "Write a short story about a lighthouse keeper.", 64, ignore_eos=True)
        if "topt: decode kept" in log_path.read_text():
            break
    time.sleep(2)  # idle: the last report is written before the scrape
    r = requests.get(f"{base}/metrics", timeout=30)
    r.raise_for_status()
    every = [s for f in text_string_to_metric_families(r.text) for s in f.samples]
    samples = {s.name: s.value for s in every if not s.labels}
    by_group = {(s.name, s.labels["layer_group"]): s.value for s in every
                if s.labels.get("request_mode") == "sparse"}
    assert "vllm:num_requests_running" in {s.name for s in every}  # vLLM's own series on the same page
    line = [l for l in log_path.read_text().splitlines() if "topt: decode kept" in l][-1]
    kept = float(line.split("decode kept ")[1].split("%")[0])
    v_rows = float(line.split("read ")[1].split("% of V rows")[0])
    v_blocks = float(line.split("V rows and ")[1].split("% of V blocks")[0])
    kept_over_k = float(line.split("kept/k ")[1].split(" ")[0])
    assert round(100 * samples["vllm_topt:element_density"], 1) == kept, (samples, line)
    assert round(100 * samples["vllm_topt:v_row_density"], 1) == v_rows, (samples, line)
    assert round(100 * samples["vllm_topt:v_block_density"], 1) == v_blocks, (samples, line)
    assert round(samples["vllm_topt:kept_over_k"], 2) == kept_over_k, (samples, line)
    assert samples["vllm_topt:reporting_processes"] == 1
    kept_total = sum(v for (name, _), v in by_group.items() if name == "vllm_topt:attention_elements_kept_total")
    visible = sum(v for (name, _), v in by_group.items() if name == "vllm_topt:attention_elements_visible_total")
    assert kept_total / visible == pytest.approx(samples["vllm_topt:element_density"])
    assert by_group[("vllm_topt:decode_rows_total", "thresholded")] > 0


def test_a_request_can_ask_for_dense_or_a_loaded_point_and_an_unknown_mode_is_a_400(server):
    """`"vllm_xargs": {"topt": "dense"}`: decoded with every element kept; `{"topt": "speed"}`: with the
    request point the server loaded; each counted apart on /metrics and in the log line. A value the server
    does not know is refused before the request is queued, naming the allowed ones."""
    base, log_path = server
    body = {"model": "default", "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}
    r = requests.post(f"{base}/v1/completions", json=body | {"vllm_xargs": {"topt": "dens"}}, timeout=60)
    assert r.status_code == 400, r.text
    assert "'dens' is not a TOPT mode of this server; allowed: 'sparse', 'dense', 'speed'" in r.text, r.text
    for mode in ("dense", "speed"):
        for _ in range(10):  # until a report with the mode's rows falls due (interval 1 s)
            r = requests.post(f"{base}/v1/completions", json=body | {"max_tokens": 64, "ignore_eos": True,
                                                                      "vllm_xargs": {"topt": mode}}, timeout=300)
            r.raise_for_status()
            if f"requests asking for {mode}" in log_path.read_text():
                break
        assert "Paris" in r.json()["choices"][0]["text"]
    time.sleep(2)
    from prometheus_client.parser import text_string_to_metric_families

    page = requests.get(f"{base}/metrics", timeout=30).text
    series = {(s.labels.get("request_mode"), s.name): s.value for f in text_string_to_metric_families(page)
              for s in f.samples if s.labels.get("layer_group") == "thresholded"}
    kept, visible = "vllm_topt:attention_elements_kept_total", "vllm_topt:attention_elements_visible_total"
    assert series[("dense", "vllm_topt:decode_rows_total")] > 0
    assert series[("dense", kept)] == series[("dense", visible)]
    assert series[("speed", "vllm_topt:decode_rows_total")] > 0
    assert series[("speed", kept)] < series[("speed", visible)]
    line = next(l for l in log_path.read_text().splitlines() if "TOPT request point 'speed'" in l)
    assert "smollm2-135m-instruct.k32.post-softmax.json" in line and "k=32" in line, line


def test_start_up_log_names_the_default_file_and_its_recorded_cost(server):
    """The default is the quality file; the operator sees which file and what it was measured to cost."""
    _, log_path = server
    line = next(l for l in log_path.read_text().splitlines() if "TOPT thresholds:" in l)
    assert "smollm2-135m-instruct.k48.post-softmax.quality.json" in line, line
    assert "perplexity +0.11% vs dense" in line and "of elements" in line and "V rows" in line, line


# A front-end refusal: the API server process exits before any engine process starts.
FRONT_END_REFUSAL_S = 120
# The refusing servers spend their time importing vLLM, one core each: two at a time halve the wait.
CONCURRENT_REFUSALS = 2

# case -> (topt options, config changes to the default model (or None), extra server args, expected text).
# Every refusal of ToptBackendMixin.config_refusals, the CPU kernel check and the threshold resolution.
FRONT_END_REFUSALS = {
    "thresholds-of-another-model": ("other-file", None, [], "was calibrated for tiny"),
    "missing-threshold-file": ("missing-file", None, [], "does not exist"),
    "unknown-topt-key": ({"treshold": "x"}, None, [], "Known keys: thresholds"),
    # The default model's config with another maximum length: a different model.
    "no-shipped-thresholds": ({}, {"max_position_embeddings": 4096}, [], "no shipped threshold file"),
    # The same check (vllm_topt.config.support) refuses it in calibration: tests/test_calibration.py.
    "sliding-window-on-every-layer": ({}, "sliding-window", [],
                                      "TOPT does not support sliding-window attention on every layer"),
    "fp8-kv-cache": ({}, None, ["--kv-cache-dtype", "fp8"], "TOPT does not support KV cache dtype fp8"),
    "block-size-over-kernel-limit": ({}, None, ["--block-size", "512"], "at most 256 tokens"),
    "pipeline-parallelism": ({}, None, ["--pipeline-parallel-size", "2"], "TOPT does not support pipeline parallelism"),
    "speculative-decoding": ({}, None, ["--speculative-config", json.dumps(
        {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2})],
        "TOPT does not support speculative decoding"),
    "alibi": ({}, {"alibi": True}, [], "TOPT does not support ALiBi"),
    "kv-sharing": ({}, {"num_kv_shared_layers": 2}, [], "TOPT does not support KV sharing across layers"),
    # The default model's config under another name (as Qwen2.5-0.5B-Instruct shares the Coder model's
    # config values): the shipped file matches by fingerprint, and its recorded name refuses it.
    "another-model-same-config": ({}, "renamed", [], "was made for another model (model name: the file's is"),
    "thresholds-with-operating-point": ("file-and-point", None, [], "contradict each other"),
}


def refusal_inputs(case: str, root: Path) -> tuple[dict, Path, list[str]]:
    topt, config_changes, args, _ = FRONT_END_REFUSALS[case]
    if topt == "other-file":
        path = root / "other.json"
        path.write_text(json.dumps(valid_file_dict()))
        topt = {"thresholds": str(path)}
    elif topt == "missing-file":
        topt = {"thresholds": str(root / "nope.json")}
    elif topt == "file-and-point":
        topt = {"thresholds": str(ROOT / "configs" / "smollm2-135m-instruct.k32.post-softmax.json"),
                "operating_point": "speed"}
    if config_changes == "sliding-window":
        model = sliding_window_model(root)
    elif config_changes == "renamed":
        model = variant_of_default_model(root, "Qwen2.5-0.5B-Instruct")
    elif config_changes:
        model = variant_of_default_model(root, case, **config_changes)
    else:
        model = DEFAULT_MODEL
    return topt, model, args


def run_refusing_server(topt: dict, model: Path, args: list[str]) -> tuple[int, str, float]:
    start = time.monotonic()
    proc = subprocess.run(server_command(free_port(), topt, model, args), cwd=ROOT, env=server_env(),
                          capture_output=True, text=True, timeout=START_TIMEOUT_S)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


@pytest.fixture(scope="module")
def refusals(tmp_path_factory) -> dict[str, tuple[int, str, float, dict]]:
    """Every case's (exit code, output, seconds, topt options), the servers run two at a time."""
    inputs = {case: refusal_inputs(case, tmp_path_factory.mktemp(case)) for case in FRONT_END_REFUSALS}
    with concurrent.futures.ThreadPoolExecutor(max_workers=CONCURRENT_REFUSALS) as pool:
        futures = {case: pool.submit(run_refusing_server, *spec) for case, spec in inputs.items()}
        return {case: (*future.result(), inputs[case][0]) for case, future in futures.items()}


@pytest.mark.parametrize("case", list(FRONT_END_REFUSALS))
def test_front_end_refuses_what_topt_cannot_serve(refusals, case):
    returncode, output, seconds, topt = refusals[case]
    expected = FRONT_END_REFUSALS[case][3]
    assert returncode != 0, output[-3000:]
    assert expected in output, output[-3000:]
    assert "EngineCore" not in output, "refused only after an engine process started:\n" + output[-3000:]
    assert seconds < FRONT_END_REFUSAL_S, output[-3000:]
    if "thresholds" in topt:
        assert topt["thresholds"] in output  # the message names the file
    if "does not support" in expected:
        assert "CPU_ATTN" in output or "cpu_kernel" in output  # and the dense backend to use instead
    if case == "block-size-over-kernel-limit":
        assert "--block-size 128" in output
