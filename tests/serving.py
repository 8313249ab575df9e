"""Start the real OpenAI-compatible server for tests, and talk to it."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.engine_run import DEFAULT_MODEL, ROOT

START_TIMEOUT_S = 400


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(port: int, topt: dict | None, model: Path = DEFAULT_MODEL, extra_args=(),
                   backend: str = "topt") -> list[str]:
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", "default",
        "--attention-backend", backend, "--dtype", "float32",
        "--max-model-len", "4096", "--max-num-seqs", "8", "--enforce-eager",
        "--host", "127.0.0.1", "--port", str(port),
    ]
    if topt is not None:
        cmd += ["--additional-config", json.dumps({"topt": topt})]
    return cmd + list(extra_args)


def server_env(**overrides) -> dict:
    return dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", PYTHONUNBUFFERED="1", **overrides)


@contextlib.contextmanager
def serving(log_path: Path, topt: dict | None, model: Path = DEFAULT_MODEL, extra_args=(), backend: str = "topt",
            env: dict | None = None):
    """A running server (its base URL) logging to `log_path`; stopped on exit. `env`: more variables."""
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(server_command(port, topt, model, extra_args, backend), cwd=ROOT,
                                env=server_env(**(env or {})), stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, log_path.read_text()[-4000:]
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "server did not start:\n" + log_path.read_text()[-4000:]
            time.sleep(2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def complete(base: str, prompt: str | list[int], max_tokens: int = 40, **params) -> str:
    """Greedy completion; `params` are more request fields (e.g. vLLM's ignore_eos)."""
    r = requests.post(
        f"{base}/v1/completions",
        json={"model": "default", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **params},
        timeout=300,
    )
    r.raise_for_status()
    return r.json()["choices"][0]["text"]
