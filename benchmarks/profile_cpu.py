"""Where the CPU decode kernel's time goes: per phase, per layer call, against the memory floor.

    python benchmarks/profile_cpu.py --capture .cache/captures/smollm2-8k.pt \
        --thresholds configs/smollm2-135m-instruct.k48.post-softmax.quality.json

Loads the kernel's profile build (`VLLM_TOPT_CPU_PROFILE=1`, set by this
script: every TOPT_PHASE scope of csrc/topt_cpu.cpp adds its time) and runs the
same steps as benchmarks/decode_cpu.py (same caches, same calls, every layer).
Per case it prints:

- the time per layer call in Python (wall), in the C++ op ("call"), and the
  difference (the Python wrapper and the dispatcher);
- each phase in thread-µs per call (summed over the team's threads): entry
  (checks, task list, scratch, on the calling thread), scores (K·q), softmax
  (row max and exp-sum), combine (global max, sum, θ bound), wait (value tasks
  spinning for their group's combine), select (keep decisions and weights per
  V page), gather (the kept V rows), compensation (VMC's sums), finish (phase
  C), exit;
- bytes moved per step (K in full, V rows read, dense: K and V in full) and the
  time those bytes take at this machine's read bandwidth, measured here the
  same run (`read_bandwidth`: a sum over a buffer far larger than the last-level
  cache, all threads), and the share of that floor each backend reaches.

The profile build's timers cost a little themselves (tens of ns per scope);
step times and ratios to quote come from decode_cpu.py's plain build.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

# Before the kernel loads: the profile build (its own extension name).
os.environ["VLLM_TOPT_CPU_PROFILE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from decode_cpu import build_batch, dense_step, layer_rules, time_steps, topt_step  # noqa: E402
from vllm_topt.kernels.cpu.cpp import phase_profile  # noqa: E402

PHASES = ("entry", "scores", "softmax", "combine", "wait", "select", "gather", "compensation", "finish", "exit")
FLOAT_BYTES = 4


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of a streaming read (torch.sum over `gib` GiB of float32, every thread), best of `repeats`."""
    buf = torch.ones(int(gib * 2**30) // FLOAT_BYTES)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        float(buf.sum())
        best = min(best, time.perf_counter() - start)
    return buf.numel() * FLOAT_BYTES / best


def step_bytes(batch, counts, H_kv: int, d: int) -> tuple[float, float]:
    """(TOPT's bytes per step: K in full + V rows read, dense's: K and V in full), every layer."""
    keys = int(batch.seq_lens.sum()) * H_kv * len(batch.layers)
    k_bytes = keys * d * FLOAT_BYTES
    return k_bytes + counts.v_rows_read * d * FLOAT_BYTES, 2 * k_bytes


def profile_case(batch, scale, rules, tables, repeats: int, H: int, d: int, bandwidth: float) -> dict:
    L = len(batch.layers)
    bsz = len(batch.seq_lens)
    dense_out = [torch.empty(bsz, H, d) for _ in range(L)]
    topt_out = [torch.empty(bsz, H, d) for _ in range(L)]
    t_dense = time_steps(functools.partial(dense_step, batch, scale, dense_out), repeats)
    step = functools.partial(topt_step, batch, scale, rules, tables, topt_out)
    step()  # warm-up, not profiled
    phase_profile(reset=True)
    start = time.perf_counter()
    for _ in range(repeats):
        counts = step()
    wall = (time.perf_counter() - start) / repeats
    seconds, calls = phase_profile(reset=True)
    if calls != repeats * L:
        raise RuntimeError(f"the profile build timed {calls} calls, expected {repeats * L}: not the profile build?")
    H_kv = batch.layers[0].key_cache.shape[1]
    topt_bytes, dense_bytes = step_bytes(batch, counts, H_kv, d)
    per_call_us = {name: 1e6 * seconds[name] / calls for name in ("call", *PHASES)}
    return {
        "wall_us": 1e6 * wall / L, **{f"{k}_us": v for k, v in per_call_us.items()},
        "python_us": 1e6 * wall / L - per_call_us["call"],
        "cpu_attn_ms": 1e3 * t_dense, "topt_ms": 1e3 * wall,
        "topt_mb": topt_bytes / 2**20, "dense_mb": dense_bytes / 2**20,
        "topt_floor_ms": 1e3 * topt_bytes / bandwidth, "dense_floor_ms": 1e3 * dense_bytes / bandwidth,
        "v_row_density": counts.v_row_density,
    }


def print_table(rows: list[dict], bandwidth: float, threads: int) -> None:
    print(f"\nread bandwidth measured here: {bandwidth / 2**30:.1f} GiB/s ({threads} threads); "
          "phases in thread-µs per layer call (profile build)")
    cols = ("file", "ctx", "B", "wall µs/call", "C++ µs", "Python µs", *PHASES, "TOPT MiB/step", "TOPT ms",
            "floor ms", "of floor", "CPU_ATTN ms", "floor ms", "of floor")
    print(" | ".join(cols))
    print(" | ".join("---" for _ in cols))
    for r in rows:
        print(" | ".join([
            r["file"], str(r["context"]), str(r["batch"]), f"{r['wall_us']:.1f}", f"{r['call_us']:.1f}",
            f"{r['python_us']:.1f}", *(f"{r[p + '_us']:.1f}" for p in PHASES), f"{r['topt_mb']:.1f}",
            f"{r['topt_ms']:.2f}", f"{r['topt_floor_ms']:.2f}", f"{100 * r['topt_floor_ms'] / r['topt_ms']:.0f}%",
            f"{r['cpu_attn_ms']:.2f}", f"{r['dense_floor_ms']:.2f}",
            f"{100 * r['dense_floor_ms'] / r['cpu_attn_ms']:.0f}%",
        ]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capture", required=True, help="file written by benchmarks/capture_qkv.py")
    parser.add_argument("--thresholds", nargs="+", required=True, help="threshold files of the captured model")
    parser.add_argument("--contexts", type=int, nargs="*", default=None, help="default: the capture's")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    capture = torch.load(args.capture)
    L, _, _, d = capture["k"].shape
    H = capture["q"][capture["contexts"][0]].shape[2]
    plans = {Path(f).name: layer_rules(f, L, H)[:2] for f in args.thresholds}
    bandwidth = read_bandwidth()
    rows = []
    cases = [(c, b) for c in (args.contexts or capture["contexts"]) for b in args.batch]
    for context, bsz in tqdm(cases, desc="cases", unit="case"):
        batch = build_batch(capture, context, bsz, args.block_size)
        for name, (rules, tables) in plans.items():
            row = profile_case(batch, capture["scale"], rules, tables, args.repeats, H, d, bandwidth)
            rows.append({"file": name, "context": context, "batch": bsz, **row})
    print_table(rows, bandwidth, torch.get_num_threads())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"read_bandwidth": bandwidth, "threads": torch.get_num_threads(),
                                               "rows": rows}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
