"""Next-token loss: what a threshold file costs at the model's output, on held-out text.

A file's loss is the relative change in perplexity over the same token
windows, Top-θ against dense attention: exp(Σ NLL_topt / T) / exp(Σ NLL_dense / T) - 1,
in percent. The calibration's held-out check records it in the file
(`provenance.heldout.perplexity`) and `--target-loss` searches on it;
`benchmarks/accuracy.py --task perplexity` measures it the same way.
"""

from __future__ import annotations

import math

import torch


def window_nll(model, ids: list[int], device: str = "cpu") -> tuple[float, int]:
    """Sum of -log p(token | prefix) over tokens 2..T of one window, and their count."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids], device=device), use_cache=False).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:], device=device), reduction="sum")
    return float(nll), len(ids) - 1


def perplexity(nll: float, tokens: int) -> float:
    return math.exp(nll / tokens)


def loss_pct(dense_ppl: float, topt_ppl: float) -> float:
    """The perplexity change in percent (+0.5 means 0.5% worse than dense)."""
    return 100 * (topt_ppl / dense_ppl - 1)


def perplexity_entry(data: str, windows: int, window: int, dense: float, topt: float, result: str,
                     element_density: float, v_row_density: float) -> dict:
    """A file's `provenance.heldout.perplexity`: where and how its loss was measured, and the loss."""
    return {"data": data, "windows": windows, "window": window, "dense": dense, "topt": topt,
            "loss_pct": loss_pct(dense, topt), "element_density": element_density,
            "v_row_density": v_row_density, "result": result}
