"""--target-loss: the sparsest per-layer budget whose held-out loss meets a target.

A budget is a mean k over the thresholded layers, allocated per layer from
the profiled error curves (calibration/budget.py). Each trial calibrates a
complete file at one budget and measures its held-out perplexity loss
(calibration/loss.py). The budgets tried come from a fixed ladder of mean k
(about 1.2x apart) inside the allowed candidates; a bisection over the
ladder, which takes the loss to fall as the budget grows, finds the smallest
rung that meets the target in about log2(rungs) trials. When no rung meets
it, the densest rung's file is the result, marked as missing the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

# Mean k the search may try, about 1.2x apart; kept inside --budget-candidates.
SEARCH_MEAN_K = (16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 128)
# When --target-loss is given without a value, in percent. Measured on SmolLM2 (docs/accuracy.md, "Calibrated
# to a loss target"): on the licence texts, the out-of-domain text that cost most, a file lost 4.6-6.7x its
# held-out loss (+0.11% -> +0.66%, +0.15% -> +1.02%, +0.29% -> +1.34%), so a held-out loss of 0.12% is what
# keeps every domain measured under the 1% promise.
DEFAULT_TARGET_LOSS_PCT = 0.12
RULE = ("bisection over the mean-k ladder (loss taken to fall as the budget grows): the smallest rung whose "
        "held-out perplexity loss is at most the target")


@dataclass
class Trial:
    """One budget's calibrated file and its held-out measurement."""

    mean_k_budget: int
    file_json: str  # the ThresholdFile, as written
    heldout: dict  # heldout_check's result, with "perplexity"

    @property
    def loss_pct(self) -> float:
        return self.heldout["perplexity"]["loss_pct"]

    def summary(self) -> dict:
        return {"mean_k_budget": self.mean_k_budget, "loss_pct": self.loss_pct,
                "element_density": self.heldout["element_density"], "v_row_density": self.heldout["v_row_density"]}

    def record(self) -> dict:
        return {"mean_k_budget": self.mean_k_budget, "file_json": self.file_json, "heldout": self.heldout}


@dataclass
class SearchResult:
    target_pct: float
    chosen: Trial
    trials: list[Trial]  # in the order they ran

    @property
    def met(self) -> bool:
        return self.chosen.loss_pct <= self.target_pct

    def provenance(self, ladder: list[int], eval_data: str) -> dict:
        """What the file records of how it was chosen (`provenance.target`)."""
        return {"target_loss_pct": self.target_pct, "met": self.met, "chosen_mean_k": self.chosen.mean_k_budget,
                "measured_on": eval_data, "ladder": ladder, "rule": RULE,
                "trials": [t.summary() for t in self.trials]}


def search_ladder(candidates: list[int]) -> list[int]:
    """The rungs inside the allowed per-layer k."""
    return [m for m in SEARCH_MEAN_K if candidates[0] <= m <= candidates[-1]]


def search(ladder: list[int], evaluate: Callable[[int], Trial], target_pct: float,
           report: Callable[[Trial, bool], None] = lambda trial, met: None) -> SearchResult:
    """Bisect the ladder for the smallest rung whose trial meets the target; the densest tried if none does."""
    lo, hi = 0, len(ladder) - 1
    trials: list[Trial] = []
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        trial = evaluate(ladder[mid])
        trials.append(trial)
        met = trial.loss_pct <= target_pct
        report(trial, met)
        if met:
            best, hi = trial, mid - 1
        else:
            lo = mid + 1
    chosen = best or max(trials, key=lambda t: t.mean_k_budget)
    return SearchResult(target_pct, chosen, trials)
