"""Kernel-level CPU decode attention: CPU_ATTN vs TOPT (sparsity off) vs TOPT (calibrated).

    python benchmarks/capture_qkv.py --model models/Qwen2.5-Coder-0.5B-Instruct \
        --contexts 1024 4096 16384 --out .cache/captures/qwen2.5-coder-0.5b-16k.pt
    python benchmarks/decode_cpu.py --capture .cache/captures/qwen2.5-coder-0.5b-16k.pt \
        --thresholds configs/qwen2.5-coder-0.5b-instruct.k32.post-softmax.json

Real K/V/Q captured from the model on held-out text are written with vLLM's own
cache-write op into one paged cache per layer (128-token pages by default;
shuffled physical blocks, as a long-running server's allocator leaves them),
for each context length and
batch size. Batch row i holds the first `context - i` tokens and decodes the
query captured at that position. One timed "step" runs attention for every
layer in turn, so the working set is the whole model's KV cache, not one
layer's sitting in the last-level cache. All three paths read the same cache in
the same run, taking turns step by step (a shared VM's speed drifts over
seconds; turns give every path the same drift); the table gives the median step time, the ratio to CPU_ATTN, the
densities TOPT achieved (SPEC §7) and its deviation from dense attention, and
SPEC §5's ceiling for the measured V-row density, (|K| + |V|) / (|K| + ρ|V|),
with the fraction of it reached.

`--block-vmc` also times the file's thresholds with block-wise VMC (SPEC §4)
in the same run, for the cost of compensating per V block instead of per
sequence, and its deviation from dense attention.

`--dense-requests N` also times each batch with its last N requests asking to
decode dense (`"vllm_xargs": {"topt": "dense"}`), as the backend runs them:
each mode's rows in a kernel call of their own. "sparse row cost" is what a
request in the server's mode pays per row there, over its cost in the
all-sparse step (1.00: nothing extra); "modes µs/step" is the per-step
bookkeeping of per-request modes when no request names one (the processor's
state update and the builder's check), beside the step times above.

`--load 0 1` times every case on an idle machine and again with one competing
single-threaded busy process (started and stopped by the script), as a server's
other processes and tenants compete for the cores. The kernel sizes its thread
team per call (csrc/topt_cpu.cpp, TeamPolicy): "solo %" is the share of the
TOPT paths' calls it ran on the calling thread alone, and `--fixed-team` also times TOPT
with the whole team on every call, same run, for what the adaptive team buys.
`--bind` pins the OpenMP threads one per core, as `vllm serve` does
(OMP_PROC_BIND/OMP_PLACES from VLLM_CPU_OMP_THREADS_BIND); without it the OS
places them, as the threads of a plain PyTorch program.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from competing_load import competing_load  # noqa: E402  (benchmarks/, the script's folder)

BIND_MARK = "TOPT_BENCH_BOUND"  # set once the process runs with the binding


def bound_cpus(threads_bind: str) -> list[int]:
    """The cores of a VLLM_CPU_OMP_THREADS_BIND value ("0,2,4-7"); `auto`, empty or `nobind`: every allowed core."""
    if threads_bind.strip() in ("", "auto", "nobind"):
        return sorted(os.sched_getaffinity(0))
    cpus = []
    # vLLM separates tensor-parallel ranks' lists with "|"; this one process binds to all of them.
    for part in threads_bind.replace("|", ",").split(","):
        first, _, last = part.strip().partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def rerun_bound_if_asked() -> None:
    """`--bind`: OpenMP reads its binding when it loads (with torch), so start again with it set."""
    if "--bind" not in sys.argv or os.environ.get(BIND_MARK):
        return
    cpus = bound_cpus(os.environ.get("VLLM_CPU_OMP_THREADS_BIND", ""))
    env = dict(os.environ, OMP_PROC_BIND="true", OMP_PLACES=",".join(f"{{{c}}}" for c in cpus),
               **{BIND_MARK: ",".join(map(str, cpus))})
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


rerun_bound_if_asked()

import torch  # noqa: E402
from tqdm import tqdm

from vllm import _custom_ops as ops

from vllm_topt.kernels.cpu.cpp import set_team_mode, team_counts, topt_decode_paged_cpp, update_v_block_sums_cpp
from vllm_topt.method.rules import DensityCounts, ToptRule
from vllm_topt.config.thresholds import load_threshold_file

ISA = "vec"  # vLLM's CPU attention ISA for float32 caches with 32-multiple blocks on x86


@dataclass
class LayerCache:
    key_cache: torch.Tensor  # [num_blocks, H_kv, bs, d] views of one CPU cache tensor
    value_cache: torch.Tensor
    v_block_sums: torch.Tensor
    query: torch.Tensor  # [B, H, d]


@dataclass
class Batch:
    layers: list[LayerCache]
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    scheduler_metadata: torch.Tensor
    query_start_loc: torch.Tensor
    max_seq_len: int


def build_batch(capture: dict, context: int, batch: int, block_size: int, seed: int = 0) -> Batch:
    """Paged caches (one per layer) for `batch` sequences of `context - i` tokens."""
    k_all, v_all = capture["k"], capture["v"]  # [L, T, H_kv, d]
    L, _, H_kv, d = k_all.shape
    q = capture["q"][context][:, :batch]  # [L, B, H, d]
    H = q.shape[2]
    seq_lens = torch.tensor([context - i for i in range(batch)], dtype=torch.int32)
    blocks_per_seq = [math.ceil(int(n) / block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq)
    physical = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
    block_table = torch.zeros(batch, max(blocks_per_seq), dtype=torch.int32)
    slots = []
    start = 0
    for i, nb in enumerate(blocks_per_seq):
        ids = physical[start : start + nb]
        start += nb
        block_table[i, :nb] = ids.to(torch.int32)
        pos = torch.arange(int(seq_lens[i]))
        slots.append(ids[pos // block_size] * block_size + pos % block_size)
    layers = []
    for layer in range(L):
        cache = torch.empty(num_blocks, H_kv, 2 * block_size, d)
        key_cache, value_cache = cache.chunk(2, dim=2)
        sums = torch.zeros(num_blocks, H_kv, d)
        for i in range(batch):
            n = int(seq_lens[i])
            k, v = k_all[layer, :n].contiguous(), v_all[layer, :n].contiguous()
            ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots[i], ISA,
                                           k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
            update_v_block_sums_cpp(sums, v, slots[i], block_size)
        layers.append(LayerCache(key_cache, value_cache, sums, q[layer].contiguous()))
    query_start_loc = torch.arange(batch + 1, dtype=torch.int32)
    meta = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=batch, num_heads=H, num_kv_heads=H_kv, head_dim=d, seq_lens=seq_lens, dtype=torch.float32,
        query_start_loc=query_start_loc, causal=True, sliding_window_size=-1, isa=ISA, enable_kv_split=True,
    )
    return Batch(layers, block_table, seq_lens, meta, query_start_loc, int(seq_lens.max()))


def dense_step(batch: Batch, scale: float, outputs: list[torch.Tensor]) -> None:
    """CPU_ATTN's decode call (as `CPUAttentionBackendImpl.forward` makes it), every layer."""
    for layer, out in zip(batch.layers, outputs):
        ops.cpu_attention_with_kv_cache(
            query=layer.query, key_cache=layer.key_cache, value_cache=layer.value_cache, output=out,
            query_start_loc=batch.query_start_loc, seq_lens=batch.seq_lens, scale=scale, causal=True,
            alibi_slopes=None, sliding_window=-1, block_table=batch.block_table, softcap=0.0,
            scheduler_metadata=batch.scheduler_metadata, s_aux=None,
        )


def topt_step(batch: Batch, scale: float, rules, tables, outputs: list[torch.Tensor]) -> DensityCounts:
    """TOPT's decode call (as `ToptCpuImpl._decode` makes it), every layer."""
    total = DensityCounts()
    for layer, rule, table, out in zip(batch.layers, rules, tables, outputs):
        total.add(topt_layer(batch, layer, scale, rule, table, out))
    return total


def topt_layer(batch: Batch, layer: LayerCache, scale: float, rule, table, out: torch.Tensor) -> DensityCounts:
    """One layer's TOPT decode call (the C++ kernel looks θ up by row length and writes `out` in place)."""
    by_length = None if table is None else table.table_upto(batch.max_seq_len)
    _, counts = topt_decode_paged_cpp(
        layer.query, layer.key_cache, layer.value_cache, batch.block_table, batch.seq_lens, None, rule,
        scale, v_block_sums=layer.v_block_sums, out=out, theta_by_length=by_length,
    )
    return counts


def rows_of(batch: Batch, rows: torch.Tensor) -> Batch:
    """The sub-batch of `rows` (what `ToptCpuImpl._decode` hands the kernel for one request mode's rows)."""
    layers = [replace(layer, query=layer.query[rows]) for layer in batch.layers]
    return replace(batch, layers=layers, block_table=batch.block_table[rows], seq_lens=batch.seq_lens[rows],
                   max_seq_len=int(batch.seq_lens[rows].max()))


def mixed_step(parts: list[tuple[Batch, list, list, torch.Tensor]], scale: float, outputs: list[torch.Tensor]) -> None:
    """TOPT's decode when some requests asked for dense, as `ToptCpuImpl._decode` runs it: every layer, each
    mode's rows (a sub-batch with their rules) in a kernel call of their own, the output scattered back."""
    for i, out in enumerate(outputs):
        for sub, rules, tables, rows in parts:
            part = torch.empty_like(out[rows])
            topt_layer(sub, sub.layers[i], scale, rules[i], tables[i], part)
            out[rows] = part


def mode_bookkeeping_us(batch_size: int, steps: int = 20000) -> float:
    """Microseconds per step of the per-request-mode work a step does when no request names a mode: the
    processor's `update_state` (no batch change) and the builder's `row_modes` (None: the layers' usual path)."""
    from types import SimpleNamespace

    from vllm_topt import request_modes

    config = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=256), additional_config={})
    processor = request_modes.ToptRequestModes(config, torch.device("cpu"), False)
    start = time.perf_counter()
    for _ in range(steps):
        processor.update_state(None)
        if request_modes.row_modes(batch_size) is not None:
            raise AssertionError("no request named a mode")
    return 1e6 * (time.perf_counter() - start) / steps


def ceiling(v_row_density: float) -> float:
    """SPEC §5: the speedup bound when K is read in full and V rows at this density (|K| = |V|)."""
    return 2.0 / (1.0 + v_row_density)


def time_steps(fn, repeats: int) -> float:
    return time_interleaved({"step": fn}, repeats)["step"]


def time_interleaved(steps: dict, repeats: int) -> dict:
    """Median seconds of each step, the steps taking turns repeat by repeat: a shared VM's speed drifts
    over seconds, and turns give every path the same drift (one path's repeats in a row gave the
    same case 2.9-4.3 ms from run to run)."""
    for fn in steps.values():
        fn()  # warm-up (first touch, lazy tables)
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def with_team_mode(mode: str, fn):
    """`fn` run with the kernel's thread team fixed to `mode`, the adaptive team restored after."""
    def run():
        set_team_mode(mode)
        try:
            fn()
        finally:
            set_team_mode("adaptive")
    return run


def layer_rules(path: str | None, num_layers: int, num_heads: int):
    """(rules, tables) per layer from a threshold file; dense rules when none is given."""
    if path is None:
        return [ToptRule(dense=True)] * num_layers, [None] * num_layers, None
    f = load_threshold_file(path)
    if f.model.num_layers != num_layers or f.model.num_heads != num_heads:
        raise SystemExit(f"{path} is for {f.model.num_layers} layers x {f.model.num_heads} heads, "
                         f"the capture has {num_layers} x {num_heads}: pass the capture's model's file")
    plan = f.layer_plan()
    return [p.rule for p in plan], [p.thresholds for p in plan], f


def relative_error(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    num = sum(float((o - r).norm() ** 2) for o, r in zip(outs, refs))
    den = sum(float(r.norm() ** 2) for r in refs)
    return math.sqrt(num / den)


def select_layers(capture: dict, rules, tables, layers: list[int] | None):
    """Only `layers` of the capture (e.g. Gemma-3's global layers: its sliding ones run on CPU_ATTN)."""
    if layers is None:
        return capture, rules, tables
    index = torch.tensor(layers)
    chosen = dict(capture, k=capture["k"][index], v=capture["v"][index],
                  q={c: q[index] for c, q in capture["q"].items()})
    return chosen, [rules[i] for i in layers], [tables[i] for i in layers]


def mixed_timings(batch: Batch, scale: float, rules, tables, dense_rules, dense_requests: int, repeats: int,
                  H: int, d: int) -> tuple[float, float]:
    """(the mixed step, its server-mode rows' calls alone): the last `dense_requests` rows ask for dense."""
    bsz = len(batch.seq_lens)
    served, dense = torch.arange(bsz - dense_requests), torch.arange(bsz - dense_requests, bsz)
    server_part = (rows_of(batch, served), rules, tables, served)
    dense_part = (rows_of(batch, dense), dense_rules, [None] * len(rules), dense)
    outputs = [torch.empty(bsz, H, d) for _ in rules]
    t = time_interleaved({"mixed": functools.partial(mixed_step, [server_part, dense_part], scale, outputs),
                          "server rows": functools.partial(mixed_step, [server_part], scale, outputs)}, repeats)
    return t["mixed"], t["server rows"]


def run(args) -> list[dict]:
    capture = torch.load(args.capture)
    L, _, H_kv, d = capture["k"].shape
    H = capture["q"][capture["contexts"][0]].shape[2]
    scale = capture["scale"]
    rules, tables, file = layer_rules(args.thresholds, L, H)
    also_rules, also_tables, _ = layer_rules(args.also_thresholds, L, H)
    if args.layers is not None:
        also_rules, also_tables = [also_rules[i] for i in args.layers], [also_tables[i] for i in args.layers]
    capture, rules, tables = select_layers(capture, rules, tables, args.layers)
    L = len(rules)
    dense_rules = [ToptRule(dense=True)] * L
    block_rules = [replace(rule, vmc_scope="block") for rule in rules]
    contexts = args.contexts or capture["contexts"]
    rows = []
    cases = [(c, b, load) for c in contexts for b in args.batch for load in args.load]
    for context, bsz, load in tqdm(cases, desc="cases", unit="case"):
        batch = build_batch(capture, context, bsz, args.block_size)
        out_dense = [torch.empty(bsz, H, d) for _ in range(L)]
        out_off = [torch.empty(bsz, H, d) for _ in range(L)]
        out_topt = [torch.empty(bsz, H, d) for _ in range(L)]
        out_also = [torch.empty(bsz, H, d) for _ in range(L)] if args.also_thresholds else None
        out_block = [torch.empty(bsz, H, d) for _ in range(L)] if args.block_vmc else None
        steps = {
            "dense": functools.partial(dense_step, batch, scale, out_dense),
            "off": functools.partial(topt_step, batch, scale, dense_rules, [None] * L, out_off),
            "topt": functools.partial(topt_step, batch, scale, rules, tables, out_topt),
        }
        if args.fixed_team:
            steps["fixed"] = with_team_mode("team", functools.partial(topt_step, batch, scale, rules, tables,
                                                                      out_topt))
        if args.also_thresholds:
            steps["also"] = functools.partial(topt_step, batch, scale, also_rules, also_tables, out_also)
        if args.block_vmc:
            steps["block"] = functools.partial(topt_step, batch, scale, block_rules, tables, out_block)
        with competing_load(load):
            team_counts(reset=True)
            t = time_interleaved(steps, args.repeats)
            calls = team_counts(reset=True)  # every adaptive-team call of the TOPT paths
            t_dense, t_off, t_topt = t["dense"], t["off"], t["topt"]
            t_fixed, t_also, t_block = t.get("fixed"), t.get("also"), t.get("block")
            if args.dense_requests and bsz > args.dense_requests:
                mixed = mixed_timings(batch, scale, rules, tables, dense_rules, args.dense_requests, args.repeats,
                                      H, d)
        counts = topt_step(batch, scale, rules, tables, out_topt)
        kv_bytes = sum(layer.key_cache.element_size() for layer in batch.layers) * int(batch.seq_lens.sum()) * H_kv * d
        bound = ceiling(counts.v_row_density)
        rows.append({
            "context": context, "batch": bsz, "load": load, "block_size": args.block_size,
            "cpu_attn_ms": 1e3 * t_dense, "topt_off_ms": 1e3 * t_off, "topt_ms": 1e3 * t_topt,
            "speedup_topt": t_dense / t_topt, "speedup_topt_off": t_dense / t_off,
            "ceiling": bound, "of_ceiling": (t_dense / t_topt) / bound,
            "solo_calls": calls.solo_calls / max(1, calls.solo_calls + calls.team_calls),
            "element_density": counts.element_density, "v_row_density": counts.v_row_density,
            "v_block_density": counts.v_block_density, "kept_over_k": counts.kept_over_k,
            "rel_err_topt_off": relative_error(out_off, out_dense),
            "rel_err_topt": relative_error(out_topt, out_dense),
            "kv_cache_mb": 2 * kv_bytes / 2**20,
        })
        if args.fixed_team:
            rows[-1] |= {"topt_fixed_team_ms": 1e3 * t_fixed, "speedup_topt_fixed_team": t_dense / t_fixed}
        if args.also_thresholds:
            also = topt_step(batch, scale, also_rules, also_tables, out_also)
            rows[-1] |= {"also_ms": 1e3 * t_also, "speedup_also": t_dense / t_also,
                         "also_of_ceiling": (t_dense / t_also) / ceiling(also.v_row_density),
                         "also_element_density": also.element_density, "also_v_row_density": also.v_row_density,
                         "rel_err_also": relative_error(out_also, out_dense)}
        if args.dense_requests and bsz > args.dense_requests:
            t_mixed, t_server_rows = mixed
            served = bsz - args.dense_requests
            rows[-1] |= {"mixed_ms": 1e3 * t_mixed, "server_rows_ms": 1e3 * t_server_rows,
                         # What a request in the server's mode pays per row beside dense requests, vs in an
                         # all-sparse batch (1.0: nothing extra).
                         "server_row_cost": (t_server_rows / served) / (t_topt / bsz),
                         "bookkeeping_us": mode_bookkeeping_us(bsz)}
        if args.block_vmc:
            topt_step(batch, scale, block_rules, tables, out_block)
            rows[-1] |= {"topt_block_vmc_ms": 1e3 * t_block, "block_vmc_over_topt": t_block / t_topt,
                         "rel_err_topt_block_vmc": relative_error(out_block, out_dense)}
    return rows, file


def print_table(rows: list[dict], header: str) -> None:
    print(header)
    cols = ("ctx", "B", "load", "CPU_ATTN ms", "TOPT off ms", "TOPT ms", "TOPT x", "off x", "ceiling",
            "of ceiling", "solo %", "elem %", "V row %", "V blk %", "kept/k", "err off", "err TOPT")
    fixed = "topt_fixed_team_ms" in rows[0]
    block = "topt_block_vmc_ms" in rows[0]
    also = "also_ms" in rows[0]
    cols += ("2nd file ms", "2nd x", "2nd of ceiling", "2nd elem %", "2nd V row %", "2nd err") if also else ()
    cols += ("fixed-team ms", "fixed-team x") if fixed else ()
    cols += ("block-VMC ms", "block/TOPT time", "err block-VMC") if block else ()
    mixed = "mixed_ms" in rows[-1]
    cols += ("with dense req. ms", "its sparse rows ms", "sparse row cost", "modes µs/step") if mixed else ()
    print(" | ".join(cols))
    print(" | ".join("---" for _ in cols))
    for r in rows:
        extra = [f"{r['also_ms']:.2f}", f"{r['speedup_also']:.2f}", f"{100 * r['also_of_ceiling']:.0f}%",
                 f"{100 * r['also_element_density']:.1f}", f"{100 * r['also_v_row_density']:.1f}",
                 f"{r['rel_err_also']:.3f}"] if also else []
        extra += [f"{r['topt_fixed_team_ms']:.2f}", f"{r['speedup_topt_fixed_team']:.2f}"] if fixed else []
        extra += [f"{r['topt_block_vmc_ms']:.2f}", f"{r['block_vmc_over_topt']:.3f}",
                  f"{r['rel_err_topt_block_vmc']:.3f}"] if block else []
        extra += ([f"{r['mixed_ms']:.2f}", f"{r['server_rows_ms']:.2f}", f"{r['server_row_cost']:.2f}",
                   f"{r['bookkeeping_us']:.1f}"] if "mixed_ms" in r else ["-"] * 4) if mixed else []
        kk = "-" if r["kept_over_k"] is None else f"{r['kept_over_k']:.2f}"
        print(" | ".join([
            str(r["context"]), str(r["batch"]), str(r["load"]), f"{r['cpu_attn_ms']:.2f}", f"{r['topt_off_ms']:.2f}",
            f"{r['topt_ms']:.2f}", f"{r['speedup_topt']:.2f}", f"{r['speedup_topt_off']:.2f}",
            f"{r['ceiling']:.2f}", f"{100 * r['of_ceiling']:.0f}%", f"{100 * r['solo_calls']:.0f}",
            f"{100 * r['element_density']:.1f}", f"{100 * r['v_row_density']:.1f}",
            f"{100 * r['v_block_density']:.1f}", kk, f"{r['rel_err_topt_off']:.1e}", f"{r['rel_err_topt']:.3f}",
            *extra,
        ]))


def binding_label() -> str:
    cpus = os.environ.get(BIND_MARK)
    return f"OpenMP threads pinned to CPUs {cpus}" if cpus else "threads not pinned"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capture", required=True, help="file written by benchmarks/capture_qkv.py")
    parser.add_argument("--thresholds", default=None, help="the captured model's threshold file")
    parser.add_argument("--also-thresholds", default=None,
                        help="a second file of the same model, timed in the same run (e.g. the speed file beside "
                             "the quality file)")
    parser.add_argument("--contexts", type=int, nargs="*", default=None, help="default: the capture's")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--block-size", type=int, default=128, help="TOPT's and CPU_ATTN's default on CPU")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--load", type=int, nargs="+", default=[0],
                        help="competing single-threaded busy processes per timing (e.g. 0 1: idle and busy)")
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="time only these layers (default: all), e.g. a model's full-attention layers")
    parser.add_argument("--fixed-team", action="store_true",
                        help="also time TOPT with the whole thread team on every call (no adaptive team), same run")
    parser.add_argument("--bind", action="store_true",
                        help="pin the OpenMP threads one per core, as vllm serve does")
    parser.add_argument("--block-vmc", action="store_true",
                        help="also time the thresholds with block-wise VMC (SPEC §4), same run")
    parser.add_argument("--dense-requests", type=int, default=0, metavar="N",
                        help="also time each batch with its last N requests asking for dense (per-request modes), "
                             "as the backend runs them: the cost to the other requests, same run")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, file = run(args)
    model = file.model.name if file else Path(args.capture).stem
    which = "all layers" if args.layers is None else f"layers {', '.join(map(str, args.layers))}"
    header = (f"\n{model}: decode attention, {which} per step, median of {args.repeats}; "
              f"{torch.get_num_threads()} threads, {binding_label()}; TOPT x = CPU_ATTN time / TOPT time; "
              f"err = relative L2 deviation from CPU_ATTN's output; load = competing busy processes; "
              f"ceiling = SPEC §5 bound at the measured V-row density; "
              f"solo % = TOPT paths' calls the adaptive team ran on the calling thread alone")
    print_table(rows, header)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"model": model, "threads": torch.get_num_threads(), "binding": binding_label(),
                                               "thresholds": args.thresholds,
                                               "also_thresholds": args.also_thresholds, "rows": rows}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
