"""Plot accuracy against V-row density from sweep and accuracy-harness results.

    python benchmarks/plot_accuracy.py --sweep benchmarks/results/sweep_smollm2.json \\
        --tasks benchmarks/results/accuracy_humaneval164_qwen*.json \\
        --out benchmarks/results/accuracy_vs_density.png

One panel for the perplexity sweep (relative change against dense, per
placement: Top-θ as a curve over k, exact top-k as the paper's baseline,
compensation ablations as single markers) and one panel per task of the
`benchmarks/accuracy.py` files (score against V-row density, dense as a
dashed line per model).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SCORE_LABEL = {"humaneval": "HumanEval pass@1", "needle": "needle retrieval rate", "perplexity": "perplexity"}
STYLE = {("topt", "post-softmax"): ("C0", "o", "-"), ("topt", "pre-softmax"): ("C1", "s", "-"),
         ("topk", "post-softmax"): ("C2", "^", "--"), ("topk", "pre-softmax"): ("C3", "v", "--")}


def plot_sweep(ax, sweep: dict) -> None:
    rows = sweep["rows"]
    dense = next(r for r in rows if r["method"] == "dense")
    defaults = {"post-softmax": ("none", True), "pre-softmax": ("exact", True)}
    curves: dict[tuple, list[dict]] = defaultdict(list)
    ablations = []
    for r in rows:
        if r["method"] == "dense":
            continue
        if (r["sdc"], r["vmc"]) == defaults[r["placement"]]:
            curves[(r["method"], r["placement"])].append(r)
        else:
            ablations.append(r)
    for (method, placement), points in sorted(curves.items()):
        points.sort(key=lambda r: r["k"])
        color, marker, line = STYLE[(method, placement)]
        # Exact top-k keeps the same elements with the same weights in either placement (sweep.py).
        label = f"Top-θ {placement}" if method == "topt" else "exact top-k (same k)"
        xs = [100 * r["v_row_density"] for r in points]
        ys = [100 * r["rel_change"] for r in points]
        ax.plot(xs, ys, line, color=color, marker=marker, label=label)
        if method == "topt":
            for r, x, y in zip(points, xs, ys):
                ax.annotate(f"k={r['k']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for r in ablations:
        ax.scatter(100 * r["v_row_density"], 100 * r["rel_change"], marker="x", color="gray", zorder=3)
        ax.annotate(f"{r['placement'].split('-')[0]} sdc={r['sdc']} vmc={'on' if r['vmc'] else 'off'}",
                    (100 * r["v_row_density"], 100 * r["rel_change"]), textcoords="offset points",
                    xytext=(4, -8), fontsize=6, color="gray")
    ax.axhline(0.0, color="k", linestyle=":", label=f"dense (ppl {dense['ppl']:.2f})")
    ax.axhline(1.0, color="r", linestyle=":", linewidth=0.8, label="+1% (target)")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylim(bottom=-1.0)
    ax.set_xlabel("V rows read in decode (%)")
    ax.set_ylabel("perplexity change vs dense (%)")
    ax.set_title(f"Held-out BBC perplexity, {sweep['model']}\n{sweep['windows']} x {sweep['window']} tokens")
    ax.legend(fontsize=7)


def plot_task(ax, task: str, files: list[dict]) -> None:
    # One colour per model: a file may hold only TOPT rows at another k (run with --backends TOPT).
    models = list(dict.fromkeys(Path(data["model"]).name for data in files))
    for data in files:
        color = f"C{models.index(Path(data['model']).name)}"
        rows = data["rows"]
        dense = next((r for r in rows if r["k"] is None), None)
        label = f"{Path(data['model']).name} ({rows[0]['n']} cases)"
        if dense is not None:
            ax.axhline(100 * dense["score"], color=color, linestyle="--", linewidth=0.8, label=f"dense, {label}")
        for r in rows:
            if r["k"] is None:
                continue
            ax.scatter(100 * r["v_row_density"], 100 * r["score"], color=color, marker="o",
                       label=f"Top-θ k={r['k']} {r['placement']}, {label}")
            ax.annotate(f"k={r['k']}", (100 * r["v_row_density"], 100 * r["score"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("V rows read in decode (%)")
    ax.set_ylabel(f"{SCORE_LABEL[task]} (%)")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 105)
    ax.set_title(SCORE_LABEL[task])
    ax.legend(fontsize=6)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", nargs="*", default=[], help="benchmarks/sweep.py result files")
    p.add_argument("--tasks", nargs="*", default=[], help="benchmarks/accuracy.py result files (humaneval, needle)")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)

    sweeps = [json.loads(Path(f).read_text()) for f in args.sweep]
    by_task: dict[str, list[dict]] = defaultdict(list)
    for f in args.tasks:
        data = json.loads(Path(f).read_text())
        by_task[data["task"]].append(data)
    panels = len(sweeps) + len(by_task)
    if not panels:
        raise SystemExit("nothing to plot: pass --sweep and/or --tasks files")
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.8), squeeze=False)
    axes = list(axes[0])
    for ax, sweep in zip(axes, sweeps):
        plot_sweep(ax, sweep)
    for ax, (task, files) in zip(axes[len(sweeps):], sorted(by_task.items())):
        plot_task(ax, task, files)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
