"""End-to-end decode tokens/s: TOPT vs CPU_ATTN on the same prompt, same run.

    python benchmarks/decode_throughput.py --prompt-tokens 2048 --new-tokens 128

Each backend runs in its own process (one engine in memory at a time). Decode
time is the time of a `max_tokens = 1 + new` request minus that of a
`max_tokens = 1` request (the prefill), best of `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = "BENCH_RESULT_JSON:"


def prompt_ids(tokenizer, tokens: int) -> list[int]:
    sys.path.insert(0, str(ROOT))
    from vllm_topt.calibration.data import bbc_articles

    ids = tokenizer.encode("\n\n".join(bbc_articles("heldout")), add_special_tokens=False)
    return ids[:tokens]


def run_one(args) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(
        model=args.model, dtype="float32", max_model_len=args.prompt_tokens + args.new_tokens + 16,
        max_num_seqs=max(8, args.batch), enforce_eager=True, seed=0, attention_backend=args.backend,
    )
    if args.backend == "TOPT":
        # Telemetry ticks at most once a second, off the timed path's critical cost.
        kwargs["additional_config"] = {"topt": {"stats_file": args.stats_file, "telemetry_interval_s": 1}}
    llm = LLM(**kwargs)
    ids = prompt_ids(llm.get_tokenizer(), args.prompt_tokens)
    # Distinct prompts per batch slot (no prefix-cache sharing across the batch).
    prompts = [TokensPrompt(prompt_token_ids=ids[i:] + ids[:i]) for i in range(args.batch)]

    def timed(max_tokens: int) -> tuple[float, int]:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)

    prefill, decode = [], []
    for _ in range(args.repeats):
        llm.reset_prefix_cache()
        prefill.append(timed(1)[0])
        llm.reset_prefix_cache()
        total, _ = timed(1 + args.new_tokens)
        decode.append(total - prefill[-1])
    if args.backend == "TOPT":
        time.sleep(1.1)  # one more decode step after the interval writes the final counters
        timed(2)
    new_tokens = args.batch * args.new_tokens
    return {"prefill_s": min(prefill), "decode_s": min(decode), "decode_tok_s": new_tokens / min(decode)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--backend", help=argparse.SUPPRESS)  # internal: run one engine
    p.add_argument("--stats-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.backend:
        print(MARKER + json.dumps(run_one(args)), flush=True)
        return

    results = {}
    for backend in ("CPU_ATTN", "TOPT"):
        stats_file = str(Path(tempfile.gettempdir()) / f"topt-bench-{os.getpid()}.json")
        cmd = [sys.executable, __file__, "--backend", backend, "--stats-file", stats_file] + sys.argv[1:]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        line = next((l for l in out.stdout.splitlines() if l.startswith(MARKER)), None)
        if line is None:
            sys.exit(f"{backend} run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        results[backend] = json.loads(line[len(MARKER):])
        if backend == "TOPT":
            results[backend]["stats"] = json.loads(Path(stats_file).read_text())["total"]
            Path(stats_file).unlink()

    dense, topt = results["CPU_ATTN"], results["TOPT"]
    s = topt["stats"]
    print(f"\nmodel {Path(args.model).name}, prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, batch {args.batch}")
    print(f"{'backend':<10} {'prefill s':>10} {'decode s':>10} {'decode tok/s':>13} {'vs dense':>9}")
    for name, r in results.items():
        print(f"{name:<10} {r['prefill_s']:>10.2f} {r['decode_s']:>10.2f} {r['decode_tok_s']:>13.2f} "
              f"{r['decode_tok_s'] / dense['decode_tok_s']:>8.2f}x")
    print(f"TOPT densities: elements {100 * s['element_density']:.1f}%, V rows {100 * s['v_row_density']:.1f}%, "
          f"V blocks {100 * s['v_block_density']:.1f}%")


if __name__ == "__main__":
    main()
