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
    with serving(log_path, {"telemetry_interval_s": 1}) as base:
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


# A front-end refusal: the API server process exits before any engine process starts.
FRONT_END_REFUSAL_S = 120


def start_and_expect_refusal(topt: dict, expected: str, model: Path = DEFAULT_MODEL, extra_args=()) -> str:
    start = time.monotonic()
    proc = subprocess.run(
        server_command(free_port(), topt, model, extra_args), cwd=ROOT, env=server_env(),
        capture_output=True, text=True, timeout=START_TIMEOUT_S,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert expected in output, output[-3000:]
    assert "EngineCore" not in output, "refused only after an engine process started:\n" + output[-3000:]
    assert time.monotonic() - start < FRONT_END_REFUSAL_S, output[-3000:]
    return output


def test_refuses_thresholds_of_another_model(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps(valid_file_dict()))
    out = start_and_expect_refusal({"thresholds": str(path)}, "was calibrated for tiny")
    assert str(path) in out


def test_refuses_missing_threshold_file(tmp_path):
    start_and_expect_refusal({"thresholds": str(tmp_path / "nope.json")}, "does not exist")


def test_refuses_unknown_topt_key():
    start_and_expect_refusal({"treshold": "x"}, "Known keys: thresholds")


def test_refuses_model_without_shipped_thresholds(tmp_path):
    # The default model's config with another maximum length: a different model.
    model = variant_of_default_model(tmp_path, "other-model", max_position_embeddings=4096)
    start_and_expect_refusal({}, "no shipped threshold file", model=model)


def test_refuses_sliding_window_model_before_the_engine_starts(tmp_path):
    # The same check (vllm_topt.config.support) refuses it in calibration: tests/test_calibration.py.
    out = start_and_expect_refusal({}, "TOPT does not support sliding-window attention on every layer",
                                   model=sliding_window_model(tmp_path))
    assert "CPU_ATTN" in out


# Every other refusal of ToptBackendMixin.config_refusals / the CPU kernel check, through the real front end.
FRONT_END_REFUSALS = {
    "fp8-kv-cache": ((), ["--kv-cache-dtype", "fp8"], "TOPT does not support KV cache dtype fp8"),
    "block-size-over-kernel-limit": ((), ["--block-size", "512"], "at most 256 tokens"),
    "pipeline-parallelism": ((), ["--pipeline-parallel-size", "2"], "TOPT does not support pipeline parallelism"),
    "speculative-decoding": ((), ["--speculative-config", json.dumps(
        {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2})],
        "TOPT does not support speculative decoding"),
    "alibi": ({"alibi": True}, [], "TOPT does not support ALiBi"),
    "kv-sharing": ({"num_kv_shared_layers": 2}, [], "TOPT does not support KV sharing across layers"),
}


@pytest.mark.parametrize("case", list(FRONT_END_REFUSALS))
def test_front_end_refuses_what_topt_cannot_serve(tmp_path, case):
    config_changes, args, expected = FRONT_END_REFUSALS[case]
    model = variant_of_default_model(tmp_path, case, **dict(config_changes)) if config_changes else DEFAULT_MODEL
    out = start_and_expect_refusal({}, expected, model=model, extra_args=args)
    assert "CPU_ATTN" in out or "cpu_kernel" in out or "--block-size" in out
