"""Which keep rule travels: exact oracle rules at equal element density, per text.

    python benchmarks/keep_rule_study.py --model models/qwen2.5-coder-0.5b-instruct \\
        --thresholds benchmarks/results/qwen2.5-coder-0.5b-instruct.k48.post-softmax.former-quality.json \\
        --rules fixed:52 ratio:0.1 topp:0.9 --json benchmarks/results/keep_rule_study_qwen0.5b.json

Before a calibration objective is built, this asks what an ideal rule of
each shape would lose: every row of every thresholded layer is cut by an
exact rule computed from that row's own dense scores (no calibration, no
thresholds), with the file's placement and compensation, and scored by
decode-equivalent perplexity (benchmarks/accuracy.py's perplexity task) on
BBC held-out and on out-of-domain text. Rules:

- fixed:K   exactly K per row (the paper's top-k; rows with n <= K dense);
- ratio:R   exactly max(MIN_KEPT, ceil(R n)) per row: a k that grows with n;
- topp:P    the fewest largest elements whose dense mass reaches P (per head and row);
- layer:L:K fixed:K on layer L only, every other layer dense (a layer's perplexity sensitivity).

Rows print as they finish (relative perplexity change and SPEC §7 densities).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from accuracy import perplexity_windows  # noqa: E402

from vllm_topt.calibration import attention  # noqa: E402
from vllm_topt.calibration.attention import CalibrationSession, mass_cut, set_session  # noqa: E402
from vllm_topt.calibration.calibrate import load_model  # noqa: E402
from vllm_topt.calibration.loss import perplexity, window_nll  # noqa: E402
from vllm_topt.config.thresholds import load_threshold_file  # noqa: E402
from vllm_topt.kernels.cpu.cpp import CPU_DEFAULT_BLOCK_SIZE  # noqa: E402

MIN_KEPT = 8  # a ratio rule never keeps fewer per row


def rank_keep(domain: torch.Tensor, causal: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Keep the `kept` [C] (or [B, H, C]) largest elements of each row."""
    index = domain.argsort(dim=-1, descending=True)
    rank = torch.arange(domain.shape[-1], device=domain.device)
    keep_sorted = (rank < kept[..., None]).expand(domain.shape)
    return torch.zeros(domain.shape, dtype=torch.bool, device=domain.device).scatter_(-1, index, keep_sorted) & causal


def rule_keep(rule: str):
    """The keep function of a rule spec: (domain [B, H, C, r1], causal [C, r1], n [C]) -> keep."""
    name, *arg = rule.split(":")
    if name in ("fixed", "layer"):
        k = int(arg[-1])
        return lambda domain, causal, n: rank_keep(domain, causal, n.clamp(max=k).to(domain.device))
    if name == "ratio":
        r = float(arg[0])
        return lambda domain, causal, n: rank_keep(
            domain, causal, torch.clamp((n * r).ceil().long(), min=MIN_KEPT).clamp(max=n).to(domain.device))
    if name == "topp":
        mass = float(arg[0])

        return lambda domain, causal, n: (domain > mass_cut(domain, domain, mass)[..., None]) & causal
    raise SystemExit(f"unknown rule {rule!r}: fixed:K, ratio:R, topp:P or layer:L:K")


def run_rule(model, file, windows, rule: str | None, block_size: int) -> dict:
    """Perplexity and densities of one rule (None: dense) over the windows."""
    plan = file.layer_plan()
    rules = [p.rule for p in plan]
    if rule and rule.startswith("layer:"):
        only = int(rule.split(":")[1])
        rules = [r if i == only else replace(r, dense=True) for i, r in enumerate(rules)]
    keep_fn = rule_keep(rule) if rule else None
    original = attention._topk_keep

    def oracle_keep(domain, k, causal, short, top=None):
        n = causal.sum(dim=-1).cpu()
        return keep_fn(domain, causal, n), domain.new_zeros(domain.shape[:-1])

    session = CalibrationSession(file.model.num_layers, file.model.num_heads, max(map(len, windows)), rules,
                                 mode="topk" if rule else "dense", tables=None, block_size=block_size)
    set_session(session)
    attention._topk_keep = oracle_keep
    nll = count = 0.0
    start = time.monotonic()
    try:
        for ids in windows:
            a, b = window_nll(model, ids)
            nll, count = nll + a, count + b
    finally:
        attention._topk_keep = original
        set_session(None)
    c = session.counts
    return {"rule": rule or "dense", "ppl": perplexity(nll, count), "wall_s": time.monotonic() - start,
            "element_density": c.element_density if rule else 1.0,
            "v_row_density": c.v_row_density if rule else 1.0,
            "v_block_density": c.v_block_density if rule else 1.0}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--thresholds", required=True, help="the file whose layers, placement and compensation apply")
    p.add_argument("--rules", nargs="+", required=True)
    p.add_argument("--texts", nargs="+", default=["bbc", "licences", "python-code", "docs-prose"],
                   help="bbc (held-out split) or an out-of-domain domain name")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=CPU_DEFAULT_BLOCK_SIZE)
    p.add_argument("--json", default=None, help="append the rows here")
    args = p.parse_args(argv)
    for rule in args.rules:
        rule_keep(rule)  # refuse a bad spec before loading the model
    file = load_threshold_file(args.thresholds)
    _, tokenizer, model = load_model(args.model)
    rows = []
    for text in args.texts:
        windows, _ = perplexity_windows(tokenizer, args.window, args.windows, domain=None if text == "bbc" else text)
        dense = run_rule(model, file, windows, None, args.block_size)
        print(f"{text:12s} dense ppl {dense['ppl']:.4f} ({dense['wall_s']:.0f} s)", flush=True)
        for rule in args.rules:
            row = run_rule(model, file, windows, rule, args.block_size) | {"text": text}
            row["rel_change_pct"] = 100 * (row["ppl"] / dense["ppl"] - 1)
            rows.append(row)
            print(f"{text:12s} {rule:14s} {row['rel_change_pct']:+7.3f}%  elements {row['element_density']:.3f}  "
                  f"V rows {row['v_row_density']:.3f}  V blocks {row['v_block_density']:.3f}", flush=True)
    if args.json:
        path = Path(args.json)
        old = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(old + rows, indent=1))


if __name__ == "__main__":
    main()
