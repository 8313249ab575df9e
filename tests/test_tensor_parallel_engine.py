"""Tensor parallelism end to end: TP=3 (3 query heads per rank) against TP=1, same prompts.

Each rank applies the thresholds of its own global heads; the per-rank counters
must add up to the single-rank run's, layer by layer, and the tokens must agree.
(SmolLM2 has 9 query heads, so TP=2 is impossible; TP=3 runs on 2 cores with
one OpenMP thread per rank.)
"""

from __future__ import annotations

import json

import pytest

from tests.engine_run import run_engine

PROMPTS = [
    "The capital of France is",
    "Write a long story about a dragon and a knight who become friends. Once upon a time",
]
SPEC = {"backend": "TOPT", "prompts": PROMPTS, "max_tokens": 48}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    results = {}
    for tp in (1, 3):
        stats = tmp / f"tp{tp}.json"
        # The single-rank run uses the vectorised torch path, the sharded one the C++ kernel:
        # the comparison also cross-checks the two implementations end to end.
        kernel = "torch" if tp == 1 else "cpp"
        topt = {"stats_file": str(stats), "telemetry_interval_s": 0, "cpu_kernel": kernel}
        spec = dict(SPEC, topt=topt, tensor_parallel_size=tp)
        env = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"} if tp > 1 else {}
        result = run_engine(spec, tmp, f"tp{tp}", **env)
        files = [stats] if tp == 1 else [tmp / f"tp{tp}.json.rank{r}" for r in range(tp)]
        result["stats"] = [json.loads(f.read_text()) for f in files]
        results[tp] = result
    return results


def test_tp3_matches_tp1(runs):
    single, sharded = runs[1], runs[3]
    assert sharded["token_ids"] == single["token_ids"]
    (one,) = single["stats"]
    assert one["total"]["elements_kept"] < one["total"]["elements_visible"]
    for layer, counts in one["per_layer"].items():
        ranks = [s["per_layer"][layer] for s in sharded["stats"]]
        assert sum(r["elements_visible"] for r in ranks) == counts["elements_visible"]
        # Same heads, same thresholds: kept counts agree up to all-reduce rounding.
        kept = sum(r["elements_kept"] for r in ranks)
        assert abs(kept - counts["elements_kept"]) <= 0.002 * counts["elements_kept"] + 2, (layer, kept, counts)
