"""End-to-end decode throughput and time to first token: CPU_ATTN vs TOPT, real HTTP server.

    python benchmarks/serve_cpu.py --prompt-tokens 2048 8192 --batch 1 8 --new-tokens 64

For each backend, one `python -m vllm.entrypoints.openai.api_server` process
(the real engine and server, one at a time in memory) serves streaming
completions. Per (prompt length P, batch B):

- a cold request of P held-out tokens (a window of the text no other case
  uses) measures the time to first token of a full prefill (TTFT cold), and
  leaves its prompt in the prefix cache;
- B concurrent requests share that P-token prefix and add 16 tokens of their
  own (or, with `--distinct`, each gets its own P-token prompt, prefilled in
  full), so their prefill is short (dense prefill of B distinct 8k prompts takes
  many minutes on a small CPU). Their KV pages for the prefix are shared, so
  the B rows read the same prefix pages, as with a shared system prompt.
  Shared pages are read B times per layer and may sit in the last-level
  cache, which favours whichever backend is compute-bound; `--distinct`
  measures the memory-bound case. Each decodes `--new-tokens` tokens with
  `ignore_eos`. Decode tok/s = B x
  (new tokens - 1) over the time from the last first token to the last
  token; the best of `--repeats` runs counts.

`--load 0 1` runs every case on an idle machine and again with one competing
single-threaded busy process (started and stopped by the script around the
case), as the API server's neighbours and other tenants share the cores.

Requests are greedy; the table gives how many outputs equal dense's and the
mean common prefix of the two texts (Top-θ changes the attention output, so
greedy text drifts apart at some point; accuracy is measured by
benchmarks/accuracy.py). TOPT's own telemetry (kept elements,
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

from competing_load import competing_load  # noqa: E402  (benchmarks/, the script's folder)
from vllm_topt.plugin import every_core_binding  # noqa: E402

DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
SUFFIX_TOKENS = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def heldout_ids(model: Path) -> list[int]:
    from transformers import AutoTokenizer

    from vllm_topt.calibration.data import bbc_articles

    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = tokenizer.encode("\n\n".join(bbc_articles("heldout")), add_special_tokens=False)
    return ids


class Server:
    def __init__(self, model: Path, backend: str, max_len: int, max_seqs: int, stats_file: str, log_path: Path,
                 operating_point: str | None = None):
        self.port = free_port()
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", "bench", "--attention-backend", backend, "--dtype", "float32",
            "--max-model-len", str(max_len), "--max-num-seqs", str(max_seqs), "--enforce-eager",
            "--host", "127.0.0.1", "--port", str(self.port),
        ]
        if backend == "TOPT":
            topt = {"stats_file": stats_file, "telemetry_interval_s": 1}
            topt |= {"operating_point": operating_point} if operating_point else {}
            cmd += ["--additional-config", json.dumps({"topt": topt})]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", every_core_binding() or "auto")
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


def run_case(server: Server, ids: list[int], window: int, prompt_tokens: int, batch: int, new_tokens: int,
             repeats: int, distinct: bool) -> dict:
    # Each case reads its own window of the text, so its first request really is a cold prefill.
    span = prompt_tokens + 2 * repeats * batch * SUFFIX_TOKENS
    case_len = span * (1 + repeats * batch) if distinct else span
    text = ids[window * case_len:][:case_len]
    prefix = text[:prompt_tokens]
    cold = server.stream(prefix, 1)  # full prefill; its blocks stay in the prefix cache
    best = first_texts = None
    for rep in range(repeats):
        if distinct:  # every row its own prompt: no page is shared, each row is prefilled in full
            prompts = [text[span * (1 + rep * batch + i):][:prompt_tokens] for i in range(batch)]
        else:
            suffixes = [text[prompt_tokens + (rep * batch + i) * SUFFIX_TOKENS:][:SUFFIX_TOKENS] for i in range(batch)]
            prompts = [prefix + sfx for sfx in suffixes]
        with concurrent.futures.ThreadPoolExecutor(batch) as pool:
            results = list(pool.map(lambda p: server.stream(p, new_tokens), prompts))
        first = [r["arrivals"][0] for r in results]
        decode_window = max(r["arrivals"][-1] for r in results) - max(first)
        # ignore_eos: every request returns exactly new_tokens tokens.
        tok_s = batch * (new_tokens - 1) / decode_window
        first_texts = first_texts or [r["text"] for r in results]  # same prompts for both backends
        if best is None or tok_s > best["decode_tok_s"]:
            best = {"decode_tok_s": tok_s, "ttft_batch_s": sum(f - r["start"] for f, r in zip(first, results)) / batch}
    return {
        "prompt_tokens": prompt_tokens, "batch": batch, "new_tokens": new_tokens, "repeats": repeats,
        "distinct_prompts": distinct, "ttft_cold_s": cold["arrivals"][0] - cold["start"], **best,
        "texts": first_texts,
    }


def cases(args) -> list[tuple[int, int, int]]:
    """(prompt tokens, batch, competing processes); each case reads its own window of the text."""
    return [(p, b, load) for p in args.prompt_tokens for b in args.batch for load in args.load]


def text_needed(args) -> int:
    spans = [p + 2 * args.repeats * b * SUFFIX_TOKENS for p, b, _ in cases(args)]
    return len(spans) * max(spans) * ((1 + args.repeats * max(args.batch)) if args.distinct else 1)


def run_backend(backend: str, args, ids: list[int], workdir: Path,
                operating_point: str | None = None) -> tuple[list[dict], dict | None]:
    label = f"{backend} {operating_point}" if operating_point else backend
    stats_file = str(workdir / f"topt_stats_{operating_point or 'default'}.json")
    max_len = max(args.prompt_tokens) + SUFFIX_TOKENS + args.new_tokens + 8
    server = Server(args.model, backend, max_len, max(args.batch), stats_file, workdir / f"{label}.log",
                    operating_point)
    try:
        rows = []
        for window, (prompt_tokens, batch, load) in enumerate(cases(args)):
            print(f"  {label}: prompt {prompt_tokens}, batch {batch}, load {load}", flush=True)
            with competing_load(load):
                row = run_case(server, ids, window, prompt_tokens, batch, args.new_tokens, args.repeats,
                               args.distinct)
            rows.append({"backend": backend, "operating_point": operating_point, "load": load, **row})
        time.sleep(2)  # let the last telemetry tick land
    finally:
        server.stop()
    stats = json.loads(Path(stats_file).read_text()) if backend == "TOPT" and Path(stats_file).exists() else None
    return rows, stats


def print_table(dense: list[dict], topt: list[dict], label: str = "TOPT") -> None:
    cols = ("prompt", "B", "load", "CPU_ATTN tok/s", f"{label} tok/s", f"{label} x", "TTFT cold dense s",
            f"TTFT cold {label} s", "TTFT batch dense s", f"TTFT batch {label} s", "same text", "common prefix")
    print(" | ".join(cols))
    print(" | ".join("---" for _ in cols))
    for d, t in zip(dense, topt):
        same = sum(a == b for a, b in zip(d["texts"], t["texts"]))
        common = sum(len(os.path.commonprefix([a, b])) / max(len(a), 1) for a, b in zip(d["texts"], t["texts"]))
        print(" | ".join([
            str(d["prompt_tokens"]), str(d["batch"]), str(d["load"]), f"{d['decode_tok_s']:.2f}", f"{t['decode_tok_s']:.2f}",
            f"{t['decode_tok_s'] / d['decode_tok_s']:.2f}", f"{d['ttft_cold_s']:.1f}", f"{t['ttft_cold_s']:.1f}",
            f"{d['ttft_batch_s']:.2f}", f"{t['ttft_batch_s']:.2f}", f"{same}/{d['batch']}",
            f"{100 * common / d['batch']:.0f}%",
        ]))


def print_telemetry(stats: dict | None, label: str) -> None:
    if stats:
        t = stats["total"]
        print(f"{label} telemetry over the run (all cases, decode rows): {100 * t['element_density']:.1f}% of "
              f"attention elements kept, {100 * t['v_row_density']:.1f}% of V rows and "
              f"{100 * t['v_block_density']:.1f}% of V blocks read, kept/k {t['kept_over_k']:.2f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[2048, 8000])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="batch runs per case; the fastest counts")
    parser.add_argument("--distinct", action="store_true",
                        help="no shared prefix: every row gets its own prompt, prefilled in full")
    parser.add_argument("--load", type=int, nargs="+", default=[0],
                        help="competing single-threaded busy processes per case (e.g. 0 1: idle and busy)")
    parser.add_argument("--operating-points", nargs="+", choices=["speed", "quality"], default=None,
                        help="one TOPT server per operating point, same run (default: the server's default file)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    ids = heldout_ids(args.model)
    if len(ids) < text_needed(args):
        raise SystemExit(f"held-out text has {len(ids)} tokens; these cases need {text_needed(args)}: "
                         "run fewer cases per call (e.g. one --load or --prompt-tokens at a time) or --repeats 1")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        dense, _ = run_backend("CPU_ATTN", args, ids, workdir)
        points = {point: run_backend("TOPT", args, ids, workdir, point) for point in args.operating_points or [None]}
    prompts = "distinct prompts" if args.distinct else "shared prefix"
    binding = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", every_core_binding() or "auto")
    print(f"\n{args.model.name}, float32, {os.cpu_count()} CPUs (engine OMP binding {binding!r}), "
          f"{args.new_tokens} new tokens per request, {prompts}; load = competing busy processes")
    for point, (topt, stats) in points.items():
        label = f"TOPT {point}" if point else "TOPT"
        print_table(dense, topt, label)
        print_telemetry(stats, label)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        topt, stats = next(iter(points.values()))
        Path(args.json).write_text(json.dumps({
            "omp_threads_bind": binding, "dense": dense, "topt": topt, "topt_stats": stats,
            "operating_points": {point or "default": {"topt": t, "topt_stats": st} for point, (t, st) in points.items()},
        }, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
