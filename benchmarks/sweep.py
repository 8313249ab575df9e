"""Sweep k, placement and compensation: held-out perplexity against density.

    python benchmarks/sweep.py --model models/SmolLM2-135M-Instruct \\
        --json benchmarks/results/sweep_smollm2.json

For every placement and every k it calibrates thresholds on the BBC
calibration split (`vllm_topt.calibration.calibrate`, top-k during calibration, the
placement's default compensation; files kept in a folder named after the
JSON, `<json stem>_thresholds/`), then scores decode-equivalent
perplexity on held-out BBC windows (`benchmarks/accuracy.py`'s perplexity
task: the reference math in Hugging Face, every row thresholded as decode
would) for Top-θ and for exact top-k with the same k and compensation
(once: pre-softmax top-k with exact SDC equals post-softmax top-k).
At `--ablation-k` it also scores Top-θ under every compensation of the
placement with the same thresholds (the threshold values live in the
placement's domain; only top-k-during-calibration ties them weakly to the
compensation used when calibrating).

Each row carries the SPEC §7 densities (elements, V rows, 32-token V pages).
Rows are appended to the JSON as they finish, so an interrupted sweep resumes.
`benchmarks/plot_accuracy.py` draws the curves.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from accuracy import perplexity_eval, perplexity_windows, shown  # noqa: E402

from vllm_topt.calibration import calibrate as calib  # noqa: E402
from vllm_topt.config.thresholds import Compensation, load_threshold_file  # noqa: E402

DEFAULT_COMPENSATION = {"post-softmax": ("none", True), "pre-softmax": ("exact", True)}
ABLATIONS = {
    "post-softmax": [("none", True), ("none", False)],
    "pre-softmax": [(sdc, vmc) for sdc in ("exact", "exp-threshold", "none") for vmc in (True, False)],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    p.add_argument("--ks", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    p.add_argument("--placements", nargs="+", default=["post-softmax", "pre-softmax"],
                   choices=["post-softmax", "pre-softmax"])
    p.add_argument("--ablation-k", type=int, default=64, help="k at which every compensation is scored")
    p.add_argument("--windows", type=int, default=2, help="held-out perplexity windows")
    p.add_argument("--window", type=int, default=2048, help="tokens per perplexity window")
    p.add_argument("--calib-seqs", type=int, default=12, help="calibration sequences per (k, placement)")
    p.add_argument("--calib-len", type=int, default=1024, help="tokens per calibration sequence")
    p.add_argument("--heldout-seqs", type=int, default=2, help="held-out sequences for calibration's kept/k check")
    p.add_argument("--no-topk", action="store_true", help="skip the exact top-k baseline")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", required=True, help="result rows (appended; an existing file resumes)")
    return p.parse_args(argv)


def thresholds_path(args, k: int, placement: str) -> Path:
    """Next to the result JSON, so a resumed sweep reuses its own calibrations only."""
    out = Path(args.json).resolve()
    return out.parent / f"{out.stem}_thresholds" / f"{Path(args.model).name.lower()}.k{k}.{placement}.json"


def calibrated_file(args, config, tokenizer, model, k: int, placement: str):
    """Calibrate once per (k, placement); reuse the file if an earlier run wrote it."""
    path = thresholds_path(args, k, placement)
    if not path.exists():
        resume = ["--resume"] if calib.checkpoint_path(path).exists() else []  # an interrupted sweep continues
        calib_args = calib.parse_args([
            "--model", args.model, "--out", str(path), "--k", str(k), "--placement", placement,
            "--num-seqs", str(args.calib_seqs), "--seq-len", str(args.calib_len),
            "--heldout-seqs", str(args.heldout_seqs), "--device", "cpu", *resume,
        ])
        file, _ = calib.calibrate(calib_args, config, tokenizer, model)
        calib.save_result(file, path)
    return load_threshold_file(path), path


def with_compensation(file, sdc: str, vmc: bool):
    return file.model_copy(update={"compensation": Compensation(sdc=sdc, vmc=vmc)})


def row_key(row: dict) -> tuple:
    return (row["method"], row["k"], row["placement"], row["sdc"], row["vmc"])


def result_row(method, k, placement, sdc, vmc, r, dense_ppl, path) -> dict:
    row = {"method": method, "k": k, "placement": placement, "sdc": sdc, "vmc": vmc,
           "ppl": r["ppl"], "rel_change": r["ppl"] / dense_ppl - 1.0 if dense_ppl else 0.0,
           "tokens": r["tokens"], "wall_s": r["wall_s"],
           "thresholds": None if path is None else shown(path)}
    d = r.get("density") or {"element_density": 1.0, "v_row_density": 1.0, "v_block_density": 1.0,
                             "kept_over_k": None}
    return row | {key: d[key] for key in ("element_density", "v_row_density", "v_block_density", "kept_over_k")}


def planned_runs(args) -> list[tuple]:
    """(k, placement, sdc, vmc, modes) in run order: defaults first, ablations after."""
    runs = []
    for placement in args.placements:
        for k in args.ks:
            sdc, vmc = DEFAULT_COMPENSATION[placement]
            # Exact top-k keeps the same set in either domain (softmax is monotone), and
            # pre-softmax with exact SDC gives kept elements their dense p: with both
            # placements swept, pre-softmax top-k would repeat post-softmax top-k.
            topk = not args.no_topk and not (placement == "pre-softmax" and "post-softmax" in args.placements)
            runs.append((k, placement, sdc, vmc, ("topt", "topk") if topk else ("topt",)))
    for placement in args.placements:
        if args.ablation_k in args.ks:
            for sdc, vmc in ABLATIONS[placement]:
                if (sdc, vmc) != DEFAULT_COMPENSATION[placement]:
                    runs.append((args.ablation_k, placement, sdc, vmc, ("topt",)))
    return runs


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.monotonic()
    out = Path(args.json)
    saved = json.loads(out.read_text()) if out.exists() else {"rows": []}
    rows = saved["rows"]
    invocations = saved.get("invocations") or ([saved["argv"]] if "argv" in saved else [])
    if sys.argv[1:] not in invocations:
        invocations.append(sys.argv[1:])
    done = {row_key(r) for r in rows}

    config, tokenizer, model = calib.load_model(args.model)
    windows, _ = perplexity_windows(tokenizer, args.window, args.windows)

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"model": Path(args.model).name, "windows": len(windows), "window": args.window,
                "calib_seqs": args.calib_seqs, "calib_len": args.calib_len, "invocations": invocations}
        out.write_text(json.dumps(meta | {"rows": rows}, indent=1) + "\n")

    dense_row = next((r for r in rows if r["method"] == "dense"), None)
    runs = planned_runs(args)
    for k, placement, sdc, vmc, modes in tqdm(runs, desc="sweep", unit="config"):
        file, path = calibrated_file(args, config, tokenizer, model, k, placement)
        if dense_row is None:
            r = perplexity_eval(model, windows, file, ("dense",))["dense"]
            dense_row = result_row("dense", None, None, None, None, r, r["ppl"], None)
            rows.append(dense_row)
            save()
        todo = tuple(m for m in modes if (m, k, placement, sdc, vmc) not in done)
        if not todo:
            continue
        results = perplexity_eval(model, windows, with_compensation(file, sdc, vmc), todo)
        for mode in todo:
            row = result_row(mode, k, placement, sdc, vmc, results[mode], dense_row["ppl"], path)
            rows.append(row)
            done.add(row_key(row))
        save()
    print_table(rows, args, time.monotonic() - start)
    print(f"wrote {out}")


def print_table(rows: list[dict], args, seconds: float) -> None:
    dense = next(r for r in rows if r["method"] == "dense")
    print(f"\nperplexity sweep: {Path(args.model).name}, {args.windows} x {args.window} held-out tokens, "
          f"dense ppl {dense['ppl']:.3f}, {seconds / 60:.1f} min")
    print(f"{'method':<6} {'k':>4} {'placement':<13} {'sdc':<13} {'vmc':<5} {'ppl':>8} {'vs dense':>9} "
          f"{'elements':>9} {'V rows':>7} {'V blocks':>9} {'kept/k':>7}")
    for r in sorted((r for r in rows if r["method"] != "dense"),
                    key=lambda r: (r["placement"], r["k"], r["method"], r["sdc"], not r["vmc"])):
        kk = "-" if r["kept_over_k"] is None else f"{r['kept_over_k']:.2f}"
        print(f"{r['method']:<6} {r['k']:>4} {r['placement']:<13} {r['sdc']:<13} {str(r['vmc']):<5} "
              f"{r['ppl']:>8.3f} {100 * r['rel_change']:>+8.2f}% {100 * r['element_density']:>8.1f}% "
              f"{100 * r['v_row_density']:>6.1f}% {100 * r['v_block_density']:>8.1f}% {kk:>7}")


if __name__ == "__main__":
    main()
