"""Every GPU check of the Triton Top-θ decode kernel, in one run (< 8 minutes on an H200).

    python benchmarks/gpu_check.py --out .cache/gpu_check [--capture PATH] [--peak-gbps 4800]
    python benchmarks/gpu_check.py --interpret --smoke --out .cache/gpu_check_cpu   # CPU, Triton interpreter

Needs torch and triton only (no vLLM, no network): it imports
`vllm_topt.kernels` and `vllm_topt.method.reference` from this checkout.

1. Correctness against `topt_attention_reference` (the source of truth):
   bf16 head 128 GQA 4:1 and 8:1, ragged batches of 1..64 rows with contexts
   1k..128k (and rows with n <= k, lengths on block edges), block sizes
   16/32/64, head sizes 64/256, fp16/fp32, every placement / SDC / VMC mode
   (VMC over the sequence and per block), the row-gather variant, SPEC §7
   counters per row; plus: V that is skipped is really not read (NaN
   poisoning), the V-block-sum update, θ(n) lookup on the device, and the
   kernel inside a CUDA graph (no host sync).
2. With --capture PATH, the same on real attention (format below).
3. A benchmark table on "structured" random data (a controlled fraction of V
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

Capture file (torch.save dict), either
  {"q": [L, B, Hq, D], "k": [L, T, Hkv, D], "v": [L, T, Hkv, D],
   "thresholds": [L, Hq] (optional), "k_target": int (optional),
   "placement": "post-softmax" | "pre-softmax" (optional), "scale": float (optional),
   "seq_lens": [B] (optional; default: every query sees all T keys)}
or the file `benchmarks/capture_qkv.py` writes (q = {context: [L, P, Hq, D]},
query i of context c seeing c - i keys). Thresholds given are used for every
row length; without them each head keeps its top 2% (at least k_target) by
quantile. Layers are checked up to --capture-layers.

Writes <out>/gpu_check.json and prints the tables; exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    return parser.parse_args(argv)


ARGS = parse_args()
if ARGS.interpret:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch
import triton

sys.path.insert(0, str(ROOT))
from benchmarks import cuda_paged as paged
from vllm_topt.kernels.triton import decode as td
from vllm_topt.method.rules import DensityCounts, ToptRule
from vllm_topt.method.reference import topt_attention_reference

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
        ("fp32 gqa4:1 head128", ragged8[:5], 32, 8, 128, 16, torch.float32, [RULES["post+vmc"], RULES["dense"]], {}),
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
    """The atomic V-sum update: chunked writes, padding slots, stale sums reset at offset 0."""
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


# --- 2. a capture of real attention ---------------------------------------------------------------------


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


# --- 3. benchmark ------------------------------------------------------------------------------------------


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
    checks = report["correctness"] + report.get("capture", [])
    failed = [c["case"] for c in checks if not c["ok"]]
    report["failed"] = failed
    report["elapsed_s"] = time.monotonic() - START
    path = out_dir / "gpu_check.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"\n{len(checks) - len(failed)}/{len(checks)} checks passed; wrote {path} "
          f"({report['elapsed_s']:.0f} s)")
    for name in failed:
        print(f"FAILED: {name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
