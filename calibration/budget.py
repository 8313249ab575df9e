"""Per-layer budgets: each thresholded layer's k, allocated from calibration data under a mean-k budget.

A profile pass runs the model densely on a few calibration sequences. For
every thresholded layer and every candidate k it measures the relative error
of the layer's attention output when cut to its exact top-k (with the file's
placement and compensation) against the dense output. The budget is a mean k
over the thresholded layers (so the same total number of kept elements per
row as a uniform k would keep); it is spent greedily where the error falls
fastest per added element: start every layer at the smallest candidate, then
repeatedly take the upgrade (to any larger candidate) with the largest error
decrease per added k that still fits.

Two objectives (OBJECTIVES): "attention", the error relative to the
attention output itself (scale-free, every layer weighs the same), and
"residual", the error o_proj adds to the residual stream relative to that
stream, row by row: a layer whose attention writes large updates into a
small residual weighs more, one that barely moves the stream weighs less.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_CANDIDATES = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# --budget-objective -> what each layer's profiled error measures (recorded in the file's provenance).
OBJECTIVES = {
    "attention": ("relative squared L2 error of each layer's attention output, top-k with the file's placement and "
                  "compensation, on dense inputs"),
    "residual": ("squared L2 error of each layer's attention output after o_proj (its change to the residual "
                 "stream), top-k with the file's placement and compensation, on dense inputs, over each row's "
                 "squared residual-stream norm at the layer's input, averaged over rows"),
}
DEFAULT_OBJECTIVE = "attention"


@dataclass
class Allocation:
    budget_k: int  # the mean k allocated under
    layer_k: dict[int, int]  # every thresholded layer
    relative_error: dict[int, dict[int, float]]  # layer -> candidate k -> profiled error
    objective: str = DEFAULT_OBJECTIVE

    @property
    def mean_k(self) -> float:
        return sum(self.layer_k.values()) / len(self.layer_k)

    def provenance(self, num_sequences: int, seq_len: int) -> dict:
        """How the allocation was chosen, for the threshold file's provenance."""
        return {
            "mean_k_budget": self.budget_k,
            "mean_k": self.mean_k,
            "candidates": sorted(next(iter(self.relative_error.values()))),
            "objective": OBJECTIVES[self.objective],
            "objective_name": self.objective,
            "rule": "greedy: largest error decrease per added k",
            "profile_sequences": num_sequences,
            "profile_seq_len": seq_len,
            "relative_error": {str(layer): {str(k): e for k, e in errs.items()}
                               for layer, errs in self.relative_error.items()},
        }


def relative_errors(profile_error: torch.Tensor, profile_norm: torch.Tensor, layers: list[int],
                    candidates: list[int]) -> dict[int, dict[int, float]]:
    """Per layer and candidate: Σ ||o_topk - o||² / Σ ||o||² from a profile session's sums."""
    return {layer: {k: float(profile_error[layer, i] / profile_norm[layer].clamp(min=1e-30))
                    for i, k in enumerate(candidates)}
            for layer in layers}


def allocate(errors: dict[int, dict[int, float]], budget_k: int, objective: str = DEFAULT_OBJECTIVE) -> Allocation:
    """Greedy allocation of Σ k = budget_k · layers over the layers' error curves."""
    layers = sorted(errors)
    candidates = sorted(next(iter(errors.values())))
    index = {layer: 0 for layer in layers}
    left = budget_k * len(layers) - candidates[0] * len(layers)
    while True:
        best = None  # (error decrease per added k, layer, new index)
        for layer in layers:
            i = index[layer]
            for j in range(i + 1, len(candidates)):
                extra = candidates[j] - candidates[i]
                if extra > left:
                    break
                gain = (errors[layer][candidates[i]] - errors[layer][candidates[j]]) / extra
                if gain > 0 and (best is None or gain > best[0]):
                    best = (gain, layer, j)
        if best is None:
            break
        _, layer, j = best
        left -= candidates[j] - candidates[index[layer]]
        index[layer] = j
    return Allocation(budget_k, {layer: candidates[index[layer]] for layer in layers}, errors, objective)
