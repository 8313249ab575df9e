"""Calibrate Top-θ thresholds for a Hugging Face model on real text.

    python -m calibration.calibrate --model models/SmolLM2-135M-Instruct \\
        --k 32 --out configs/smollm2-135m-instruct.k32.post-softmax.json

For every calibration sequence and every (layer, query head) row with n > k,
record the (k+1)-th largest element in the placement's domain (probabilities
for post-softmax, scores for pre-softmax); with top-k during calibration (on
by default) each layer's attention is cut to its exact top-k, so later layers
see sparsified inputs. Per (layer, head, n) aggregate mean + 0.1·std, smooth
across n onto a geometric grid, and write the threshold file. Finally apply
the thresholds to held-out articles and report kept/k.
"""

from __future__ import annotations

import argparse
import datetime
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from calibration.attention import ATTN_IMPL_NAME, CalibrationSession, register_attention, set_session
from calibration.data import BBC_PACKAGE, bbc_articles, token_sequences
from vllm_topt import __version__
from vllm_topt.reference import ToptRule
from vllm_topt.thresholds import (
    SCHEMA_VERSION,
    Compensation,
    LayerThresholds,
    ModelIdentity,
    Provenance,
    ThresholdFile,
)

STD_WEIGHT = 0.1  # the paper's mean + 0.1·std
SMOOTH_HALF_WIDTH = 0.15  # smoothing window in ln(n) on each side of a grid point


def parse_layer_k(text: str) -> dict[int, int]:
    pairs = [item.split(":") for item in text.split(",") if item.strip()]
    return {int(layer): int(k) for layer, k in pairs}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m calibration.calibrate", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="Hugging Face model folder (as served by vLLM)")
    p.add_argument("--out", required=True, help="threshold file to write (JSON)")
    p.add_argument("--k", type=int, default=32, help="target kept elements per row (default 32)")
    p.add_argument("--placement", choices=["post-softmax", "pre-softmax"], default="post-softmax")
    p.add_argument("--sdc", choices=["none", "exact", "exp-threshold"], default=None,
                   help="softmax denominator compensation (pre-softmax only; default exact there)")
    p.add_argument("--no-vmc", action="store_true", help="disable V-mean compensation")
    p.add_argument("--layer-k", type=parse_layer_k, default={}, help="per-layer k, e.g. '0:128,1:128'")
    p.add_argument("--dense-layers", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                   help="layers that stay dense, e.g. '0,1'")
    p.add_argument("--num-seqs", type=int, default=48, help="calibration sequences (default 48)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per calibration sequence")
    p.add_argument("--heldout-seqs", type=int, default=8, help="held-out sequences for the kept/k check")
    p.add_argument("--grid-points", type=int, default=24, help="n-grid points between k+1 and --seq-len")
    p.add_argument("--no-topk-during-calibration", action="store_true",
                   help="calibrate on dense attention (the paper always cuts to top-k)")
    p.add_argument("--name", default=None, help="model name recorded in the file (default: folder name)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.sdc is None:
        args.sdc = "exact" if args.placement == "pre-softmax" else "none"
    return args


def load_model(path: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    register_attention()
    config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=ATTN_IMPL_NAME)
    model.eval()
    return config, tokenizer, model


def layer_rules(args, num_layers: int) -> list[ToptRule]:
    return [
        ToptRule(
            placement=args.placement, sdc=args.sdc, vmc=not args.no_vmc,
            k=args.layer_k.get(layer, args.k), dense=layer in args.dense_layers,
        )
        for layer in range(num_layers)
    ]


def geometric_grid(k: int, max_len: int, points: int) -> list[int]:
    lo, hi = math.log(k + 1), math.log(max_len)
    grid = sorted({round(math.exp(lo + (hi - lo) * i / (points - 1))) for i in range(points)})
    return [n for n in grid if k < n <= max_len]


def aggregate(session: CalibrationSession, rules, grid: list[int], placement: str) -> list[list[list[float]] | None]:
    """mean + 0.1·std per (layer, head, n), smoothed across n onto the grid."""
    count = session.value_count
    mean = session.value_sum / count.clamp(min=1)
    var = (session.value_sq_sum / count.clamp(min=1) - mean**2).clamp(min=0)
    stat = mean + STD_WEIGHT * var.sqrt()  # [L, H, max_len] indexed by n - 1
    log_n = torch.log(torch.arange(1, session.max_len + 1, dtype=torch.float64))
    post = placement == "post-softmax"
    result: list[list[list[float]] | None] = []
    for layer, rule in enumerate(rules):
        if rule.dense:
            result.append(None)
            continue
        layer_values = []
        for g in grid:
            # Count-weighted average over n within ±15% (in ln n) of the grid point.
            window = (log_n - math.log(g)).abs() <= SMOOTH_HALF_WIDTH
            window &= count[layer, 0] > 0
            if not bool(window.any()):
                raise RuntimeError(f"layer {layer}: no samples near n={g}; lower k or raise --seq-len")
            w = count[layer, :, window]
            y = stat[layer, :, window]
            y = y.clamp(min=1e-30).log() if post else y
            avg = (w * y).sum(dim=1) / w.sum(dim=1)
            layer_values.append(avg.exp() if post else avg)
        per_head = torch.stack(layer_values, dim=1)  # [H, G]
        if post:
            per_head = per_head.clamp(min=1e-12, max=1.0)
        result.append(per_head.tolist())
    return result


def run_sequences(model, sequences, session, desc: str) -> None:
    set_session(session)
    with torch.inference_mode():
        for ids in tqdm(sequences, desc=desc, unit="seq"):
            model(torch.tensor([ids]), use_cache=False)
    set_session(None)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.monotonic()
    config, tokenizer, model = load_model(args.model)
    file, heldout = calibrate(args, config, tokenizer, model)
    write_file(file, args.out)
    print_summary(file, heldout, args.out, time.monotonic() - start)


def write_file(file: ThresholdFile, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(file.model_dump_json(indent=1) + "\n")


def calibrate(args, config, tokenizer, model) -> tuple[ThresholdFile, dict]:
    """Collect statistics on calibration text, build the file, check it on held-out text."""
    L, H = config.num_hidden_layers, config.num_attention_heads
    rules = layer_rules(args, L)
    if min(r.k for r in rules) >= args.seq_len:
        raise SystemExit("--seq-len must exceed k")

    calib = token_sequences(tokenizer, bbc_articles("calibration"), args.seq_len, args.num_seqs)
    session = CalibrationSession(L, H, args.seq_len, rules, topk_during_calibration=not args.no_topk_during_calibration)
    run_sequences(model, calib, session, "calibrating")

    grid = geometric_grid(min(r.k for r in rules if not r.dense), args.seq_len, args.grid_points)
    thresholds = aggregate(session, rules, grid, args.placement)
    name = args.name or Path(args.model).name
    file = ThresholdFile(
        schema_version=SCHEMA_VERSION,
        model=ModelIdentity.from_hf_config(config, name=name),
        target_k=args.k,
        layer_k={layer: k for layer, k in args.layer_k.items()},
        dense_layers=args.dense_layers,
        placement=args.placement,
        compensation=Compensation(sdc=args.sdc, vmc=not args.no_vmc),
        n_grid=grid,
        thresholds=thresholds,
        provenance=Provenance(
            data=f"BBC News 2004-05 ({BBC_PACKAGE}), calibration split (9 of every 10 articles)",
            num_sequences=len(calib),
            max_seq_len=args.seq_len,
            tool=f"vllm-topt {__version__} calibration.calibrate",
            date=datetime.date.today().isoformat(),
            topk_during_calibration=not args.no_topk_during_calibration,
        ),
    )
    heldout = heldout_check(model, tokenizer, file, rules, args)
    file.provenance.heldout = heldout  # type: ignore[attr-defined]
    return file, heldout


def heldout_check(model, tokenizer, file: ThresholdFile, rules, args) -> dict:
    """Apply the thresholds to held-out articles as serving does; kept/k per row."""
    sequences = token_sequences(tokenizer, bbc_articles("heldout"), args.seq_len, args.heldout_seqs)
    tables = [
        None if values is None else LayerThresholds(file.n_grid, values, file.placement)
        for values in file.thresholds
    ]
    session = CalibrationSession(len(rules), file.model.num_heads, args.seq_len, rules, mode="apply", tables=tables)
    run_sequences(model, sequences, session, "held-out check")
    sparse = [layer for layer, r in enumerate(rules) if not r.dense]
    per_layer = {
        layer: float(session.kept_by_layer[layer] / session.rows_by_layer[layer].clamp(min=1)) / rules[layer].k
        for layer in sparse
    }
    kept_mean = float(session.kept_by_layer.sum() / session.rows_by_layer.sum().clamp(min=1))
    k_mean = sum(rules[layer].k * float(session.rows_by_layer[layer]) for layer in sparse) / float(session.rows_by_layer.sum())
    return {
        "data": "BBC News held-out split (every 10th article)",
        "num_sequences": len(sequences),
        "seq_len": args.seq_len,
        "mean_kept_per_row": kept_mean,
        "kept_over_k": kept_mean / k_mean,
        "kept_over_k_per_layer": per_layer,
    }


def print_summary(file: ThresholdFile, heldout: dict, out: str, seconds: float) -> None:
    ratios = heldout["kept_over_k_per_layer"].values()
    print()
    print(f"wrote {out}")
    print(f"  model        {file.model.name} ({file.model.num_layers} layers, {file.model.num_heads} q / "
          f"{file.model.num_kv_heads} kv heads, head {file.model.head_size}, {file.model.fingerprint})")
    print(f"  rule         k={file.target_k}, {file.placement}, sdc={file.compensation.sdc}, vmc={file.compensation.vmc}")
    print(f"  grid         n = {file.n_grid[0]} .. {file.n_grid[-1]} ({len(file.n_grid)} points); beyond: {file.extrapolation}")
    print(f"  calibration  {file.provenance.num_sequences} sequences x {file.provenance.max_seq_len} tokens")
    print(f"  held-out     {heldout['num_sequences']} sequences: mean kept {heldout['mean_kept_per_row']:.1f} per row, "
          f"kept/k = {heldout['kept_over_k']:.3f} (layers: {min(ratios):.2f} .. {max(ratios):.2f})")
    print(f"  time         {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
