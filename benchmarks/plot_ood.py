"""Perplexity against element density on each out-of-domain text, one point per threshold file.

    python benchmarks/plot_ood.py benchmarks/results/accuracy_ood_*.json --plot benchmarks/results/ood_operating_points.png

Reads the results of `benchmarks/accuracy.py --task perplexity --domain ...` (it runs no model): for each
threshold file scored, its Top-θ point and its exact top-k baseline (top-k at the file's k, or, for keep-mass
files, top-k at Top-θ's own per-layer density) on every domain, one panel per (model, domain). The shipped
files (under configs/) are drawn as stars and named. The shaded box is the quality goal: within 1% of dense
at no more than 10% of attention elements. For a file that leaves layers dense (Gemma-3's sliding-window
layers), elements are counted over its thresholded layers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GOAL_LOSS_PCT = 1.0  # the quality goal: perplexity within 1% of dense ...
GOAL_ELEMENTS_PCT = 10.0  # ... at no more than 10% of attention elements
SHIPPED_PREFIX = "configs/"
BASELINES = ("topk", "topk-equal")  # accuracy.py's exact top-k rows
ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="accuracy.py JSON files with --domain rows")
    p.add_argument("--plot", help="write the figure here (PNG)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown (docs/accuracy.md)")
    return p.parse_args(argv)


def file_label(thresholds: str, model: str) -> str:
    """A threshold file's short name: its file name without the model prefix and the placement suffix."""
    name = Path(thresholds).name.removesuffix(".json").removesuffix(".post-softmax")
    for prefix in (model.lower() + ".", model.lower().replace("-instruct", "") + "."):
        name = name.removeprefix(prefix)
    return name.replace(".post-softmax", "")


def dense_layers(thresholds: str) -> set[int]:
    """The layers a threshold file leaves dense (Gemma-3's sliding-window layers), if the file is here."""
    path = ROOT / thresholds
    return set(json.loads(path.read_text())["dense_layers"]) if path.exists() else set()


def elements_pct(row: dict, dense: set[int]) -> float:
    """Elements kept, in percent: over the thresholded layers when the file leaves some layers dense (their
    elements are all kept and would hide what Top-θ does), else over all layers."""
    per_layer = row.get("per_layer_element_density")
    if not dense or not per_layer:
        return 100 * row["element_density"]
    kept = [d for layer, d in enumerate(per_layer) if layer not in dense]
    return 100 * sum(kept) / len(kept)


def points(results: list[dict]) -> list[dict]:
    """One row per (model, domain, threshold file, method): Top-θ or its top-k baseline."""
    rows = []
    for result in results:
        thresholds = result["thresholds"]
        untouched = dense_layers(thresholds)
        dense = {row["domain"]: row["score"] for row in result["rows"] if row["backend"] == "dense"}
        for row in result["rows"]:
            if row.get("domain") is None or row["backend"] == "dense":
                continue
            rows.append({"model": row["model"], "domain": row["domain"], "thresholds": thresholds,
                         "label": file_label(thresholds, row["model"]), "method": row["backend"],
                         "shipped": thresholds.startswith(SHIPPED_PREFIX), "loss_pct": 100 * row["rel_change"],
                         "ppl": row["score"], "dense_ppl": dense[row["domain"]], "windows": f"{row['n']} x {row['window']}",
                         "elements_pct": elements_pct(row, untouched), "thresholded_only": bool(untouched),
                         "v_rows_pct": 100 * row["v_row_density"]})
    return rows


def baseline_of(rows: list[dict], r: dict) -> dict | None:
    """The top-k row scored beside Top-θ row `r` (same model, domain and file)."""
    return next((b for b in rows if b["method"] in BASELINES and
                 (b["model"], b["domain"], b["thresholds"]) == (r["model"], r["domain"], r["thresholds"])), None)


def top_theta(rows: list[dict]) -> list[dict]:
    return sorted((r for r in rows if r["method"] not in BASELINES),
                  key=lambda r: (r["model"], not r["shipped"], r["label"], r["domain"]))


def print_table(rows: list[dict]) -> None:
    """One line per (model, domain, file): Top-θ, then its top-k baseline."""
    print(f"{'model':<28} {'domain':<12} {'file':<28} {'Top-θ':>8} {'elements':>9} {'V rows':>7} "
          f"{'top-k':>8} {'elements':>9}")
    for r in sorted(top_theta(rows), key=lambda r: (r["model"], r["domain"], r["elements_pct"])):
        base = baseline_of(rows, r)
        baseline = "-" if base is None else f"{base['loss_pct']:>+7.2f}% {base['elements_pct']:>8.1f}%"
        name = r["label"] + (" *" if r["shipped"] else "") + (" †" if r["thresholded_only"] else "")
        print(f"{r['model']:<28} {r['domain']:<12} {name:<28} {r['loss_pct']:>+7.2f}% {r['elements_pct']:>8.1f}% "
              f"{r['v_rows_pct']:>6.1f}% {baseline:>18}")
    print("* shipped (configs/); perplexity vs dense; top-k: exact top-k at the file's k, or at Top-θ's per-layer "
          "density for keep-mass files; † elements over the thresholded layers only (V rows over all)")


def print_markdown(rows: list[dict]) -> None:
    """The table for docs/accuracy.md: dense, Top-θ and its top-k baseline per (model, file, domain)."""
    print("| model | file | domain | windows | dense ppl | Top-θ ppl | Top-θ elements / V rows | top-k ppl | "
          "top-k elements / V rows |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in top_theta(rows):
        base = baseline_of(rows, r)
        name = (f"`{Path(r['thresholds']).name}`" + (" (shipped)" if r["shipped"] else "")
                + (" †" if r["thresholded_only"] else ""))
        topk = ("- | -" if base is None else f"{base['ppl']:.3f} ({base['loss_pct']:+.2f}%) | "
                f"{base['elements_pct']:.1f}% / {base['v_rows_pct']:.1f}%")
        print(f"| {r['model']} | {name} | {r['domain']} | {r['windows']} | {r['dense_ppl']:.3f} | "
              f"{r['ppl']:.3f} (**{r['loss_pct']:+.2f}%**) | {r['elements_pct']:.1f}% / {r['v_rows_pct']:.1f}% | {topk} |")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    domains = sorted({r["domain"] for r in rows})
    fig, axes = plt.subplots(len(models), len(domains), figsize=(5 * len(domains), 4 * len(models)), squeeze=False)
    for model_axes, model in zip(axes, models):
        for ax, domain in zip(model_axes, domains):
            panel = [r for r in rows if r["model"] == model and r["domain"] == domain]
            ax.add_patch(plt.Rectangle((0, -100), GOAL_ELEMENTS_PCT, 100 + GOAL_LOSS_PCT, color="tab:green",
                                       alpha=0.08, linewidth=0))
            ax.axhline(GOAL_LOSS_PCT, color="grey", linewidth=0.8, linestyle=":")
            ax.axvline(GOAL_ELEMENTS_PCT, color="grey", linewidth=0.8, linestyle=":")
            for r in panel:
                baseline = r["method"] in BASELINES
                marker = "x" if baseline else ("*" if r["shipped"] else "o")
                color = "tab:grey" if baseline else ("tab:red" if r["shipped"] else "tab:blue")
                ax.scatter(r["elements_pct"], r["loss_pct"], marker=marker, color=color,
                           s=120 if r["shipped"] and not baseline else 36, zorder=3)
                if not baseline:
                    ax.annotate(r["label"], (r["elements_pct"], r["loss_pct"]), fontsize=7,
                                xytext=(4, 3), textcoords="offset points")
            ys = [r["loss_pct"] for r in panel]
            ax.set_xlim(0, max(GOAL_ELEMENTS_PCT, max(r["elements_pct"] for r in panel)) + 2)
            ax.set_ylim(min(-0.5, min(ys) - 0.3), max(GOAL_LOSS_PCT + 0.5, max(ys) + 0.3))
            ax.set_xlabel("attention elements kept (%)")
            ax.set_ylabel("perplexity vs dense (%)")
            scope = " (elements of the thresholded layers)" if any(r["thresholded_only"] for r in panel) else ""
            ax.set_title(f"{model}\n{domain}{scope}", fontsize=9)
            ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker=m, color=c, linestyle="", markersize=s, label=label)
               for m, c, s, label in (("*", "tab:red", 11, "Top-θ, shipped file"), ("o", "tab:blue", 6, "Top-θ"),
                                      ("x", "tab:grey", 6, "exact top-k at about the same density"))]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main(argv=None) -> None:
    args = parse_args(argv)
    results = [json.loads(Path(name).read_text()) for name in args.results]
    missing = [name for name, result in zip(args.results, results)
               if not any(row.get("domain") for row in result.get("rows", []))]
    if missing:
        raise SystemExit(f"{', '.join(missing)}: no --domain rows; give results of "
                         f"`benchmarks/accuracy.py --task perplexity --domain ood`")
    rows = points(results)
    print_markdown(rows) if args.markdown else print_table(rows)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
