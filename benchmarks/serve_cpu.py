"""End-to-end decode throughput and time to first token: CPU_ATTN vs TOPT, real HTTP server.

    python benchmarks/serve_cpu.py --prompt-tokens 2048 8192 --batch 1 8 --new-tokens 64

For each backend, one `python -m vllm.entrypoints.openai.api_server` process
(the real engine and server, one at a time in memory) serves streaming
completions. Per (prompt length P, batch B):

- a cold request of P held-out tokens measures the time to first token of a
  full prefill (TTFT cold), and leaves its prompt in the prefix cache;
- B concurrent requests share that P-token prefix and add 16 tokens of their
  own, so their prefill is short (dense prefill of B distinct 8k prompts takes
  many minutes on a small CPU); each then decodes `--new-tokens` tokens with
  `ignore_eos`. Decode tok/s = tokens after each request's first, over the
  time from the last first token to the last token.

Each request is greedy, so the two backends can be compared token by token as
well (first-token agreement is printed). TOPT's own telemetry (kept elements,
V rows, V blocks) is read back from its stats file.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
SUFFIX_TOKENS = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def heldout_ids(model: Path, tokens: int) -> list[int]:
    from transformers import AutoTokenizer

    from calibration.data import bbc_articles

    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = tokenizer.encode("\n\n".join(bbc_articles("heldout")), add_special_tokens=False)
    return ids[: tokens + 64 * SUFFIX_TOKENS]


class Server:
    def __init__(self, model: Path, backend: str, max_len: int, max_seqs: int, stats_file: str, log_path: Path):
        self.port = free_port()
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", "bench", "--attention-backend", backend, "--dtype", "float32",
            "--max-model-len", str(max_len), "--max-num-seqs", str(max_seqs), "--enforce-eager",
            "--host", "127.0.0.1", "--port", str(self.port),
        ]
        if backend == "TOPT":
            cmd += ["--additional-config", json.dumps({"topt": {"stats_file": stats_file, "telemetry_interval_s": 1}})]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{backend} server exited:\n{log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{backend} server did not start; see {log_path}")
            time.sleep(2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def stream(self, prompt: list[int], max_tokens: int) -> dict:
        """One streaming completion: send time, token arrival times, tokens."""
        body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                "ignore_eos": True, "stream": True}
        start = time.perf_counter()
        arrivals, text = [], []
        with requests.post(f"{self.base}/v1/completions", json=body, stream=True, timeout=3600) as resp:
            resp.raise_for_status()
            for line in resp.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                choice = json.loads(line[6:])["choices"][0]
                if choice.get("text") is not None:
                    arrivals.append(time.perf_counter())
                    text.append(choice.get("text", ""))
        return {"start": start, "arrivals": arrivals, "text": "".join(text)}


def run_case(server: Server, ids: list[int], prompt_tokens: int, batch: int, new_tokens: int) -> dict:
    prefix = ids[:prompt_tokens]
    cold = server.stream(prefix, 1)  # full prefill; its blocks stay in the prefix cache
    prompts = [prefix + ids[prompt_tokens + i * SUFFIX_TOKENS: prompt_tokens + (i + 1) * SUFFIX_TOKENS]
               for i in range(batch)]
    with concurrent.futures.ThreadPoolExecutor(batch) as pool:
        results = list(pool.map(lambda p: server.stream(p, new_tokens), prompts))
    first = [r["arrivals"][0] for r in results]
    last = max(r["arrivals"][-1] for r in results)
    decoded = sum(len(r["arrivals"]) - 1 for r in results)
    decode_window = last - max(first)
    # Chunks may carry several tokens; count tokens from the request size.
    decode_tokens = batch * (new_tokens - 1)
    return {
        "prompt_tokens": prompt_tokens, "batch": batch, "new_tokens": new_tokens,
        "ttft_cold_s": cold["arrivals"][0] - cold["start"],
        "ttft_batch_s": sum(f - r["start"] for f, r in zip(first, results)) / batch,
        "decode_tok_s": decode_tokens / decode_window if decode_window > 0 else float("nan"),
        "chunks": decoded, "texts": [r["text"] for r in results],
    }


def run_backend(backend: str, args, ids: list[int], workdir: Path) -> tuple[list[dict], dict | None]:
    stats_file = str(workdir / "topt_stats.json")
    max_len = max(args.prompt_tokens) + SUFFIX_TOKENS + args.new_tokens + 8
    server = Server(args.model, backend, max_len, max(args.batch), stats_file, workdir / f"{backend}.log")
    try:
        rows = []
        for prompt_tokens in args.prompt_tokens:
            for batch in args.batch:
                print(f"  {backend}: prompt {prompt_tokens}, batch {batch}", flush=True)
                rows.append({"backend": backend, **run_case(server, ids, prompt_tokens, batch, args.new_tokens)})
        time.sleep(2)  # let the last telemetry tick land
    finally:
        server.stop()
    stats = json.loads(Path(stats_file).read_text()) if backend == "TOPT" and Path(stats_file).exists() else None
    return rows, stats


def print_table(dense: list[dict], topt: list[dict]) -> None:
    cols = ("prompt", "B", "CPU_ATTN tok/s", "TOPT tok/s", "TOPT x", "TTFT cold dense s", "TTFT cold TOPT s",
            "TTFT batch dense s", "TTFT batch TOPT s", "same text")
    print(" | ".join(cols))
    print(" | ".join("---" for _ in cols))
    for d, t in zip(dense, topt):
        same = sum(a == b for a, b in zip(d["texts"], t["texts"]))
        print(" | ".join([
            str(d["prompt_tokens"]), str(d["batch"]), f"{d['decode_tok_s']:.2f}", f"{t['decode_tok_s']:.2f}",
            f"{t['decode_tok_s'] / d['decode_tok_s']:.2f}", f"{d['ttft_cold_s']:.1f}", f"{t['ttft_cold_s']:.1f}",
            f"{d['ttft_batch_s']:.2f}", f"{t['ttft_batch_s']:.2f}", f"{same}/{d['batch']}",
        ]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[2048, 8000])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    ids = heldout_ids(args.model, max(args.prompt_tokens))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        dense, _ = run_backend("CPU_ATTN", args, ids, workdir)
        topt, stats = run_backend("TOPT", args, ids, workdir)
    print(f"\n{args.model.name}, float32, {os.cpu_count()} CPUs, {args.new_tokens} new tokens per request")
    print_table(dense, topt)
    if stats:
        t = stats["total"]
        print(f"TOPT telemetry over the run (all cases, decode rows): {100 * t['element_density']:.1f}% of attention "
              f"elements kept, {100 * t['v_row_density']:.1f}% of V rows and {100 * t['v_block_density']:.1f}% of "
              f"V blocks read, kept/k {t['kept_over_k']:.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"dense": dense, "topt": topt, "topt_stats": stats}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
