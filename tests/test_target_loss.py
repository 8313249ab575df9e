"""--target-loss: the search, its record in the file, --show, resume, and the loss a fresh run measures.

The runs are real (SmolLM2 through transformers) at small sizes: 256-token
sequences. The default runs both searches: keep mass P (twelve rungs) and
mean k with candidates up to k=32 (a ladder of 16..32).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.engine_run import ROOT
from tests.test_calibration import MODEL, cli, refusal
from vllm_topt.calibration import calibrate
from vllm_topt.calibration.target import (KEEP_MASS, MEAN_K, SEARCH_KEEP_MASS, SearchResult, Trial, best_of,
                                          search, search_ladder)
from vllm_topt.config.thresholds import describe, load_threshold_file

SMALL_RUN = ["--model", MODEL, "--num-seqs", "2", "--seq-len", "256", "--heldout-seqs", "1", "--vmc-scope", "block"]
TARGET_RUN = [*SMALL_RUN, "--budget-seqs", "1", "--budget-candidates", "8,16,24,32", "--target-loss", "0.05%"]
LADDERS = {KEEP_MASS: list(SEARCH_KEEP_MASS), MEAN_K: search_ladder([8, 16, 24, 32])}


# ------------------------------------------------------------------ the search


def trial_at(loss_of, knob=MEAN_K):
    """An evaluation whose loss is loss_of(the knob's value); records which rungs it was asked for."""
    asked = []

    def evaluate(value: float) -> Trial:
        asked.append(value)
        return Trial(value, "{}", {"perplexity": {"loss_pct": loss_of(value)}, "element_density": value / 500,
                                   "v_row_density": value / 300}, knob.name)
    return evaluate, asked


@pytest.mark.parametrize("target", [0.05, 0.3, 1.0, 3.0])
@pytest.mark.parametrize("knob, loss_of", [
    (MEAN_K, lambda k: 40.0 / k ** 1.5),  # falls as k grows: 0.22% at 48, 2.2% at 10
    (KEEP_MASS, lambda p: 0.4 * (1 - p) / (p - 0.4)),  # falls as P grows: 1.9% at 0.5, 0.02% at 0.98
])
def test_search_finds_the_smallest_rung_that_meets_the_target(target, knob, loss_of):
    ladder = list(knob.ladder)
    evaluate, asked = trial_at(loss_of, knob)
    result = search(knob, ladder, evaluate, target)
    meeting = [v for v in ladder if loss_of(v) <= target]
    expected = meeting[0] if meeting else ladder[-1]
    assert result.chosen.value == expected and result.met == bool(meeting)
    assert len(asked) <= math.ceil(math.log2(len(ladder) + 1)) and len(set(asked)) == len(asked)
    record = result.provenance(ladder, "text")
    assert record["searched"] == knob.name and record[f"chosen_{knob.name}"] == expected
    assert [t[knob.trial_key] for t in record["trials"]] == asked


def test_an_unreachable_target_gives_the_densest_file_marked_missed():
    evaluate, asked = trial_at(lambda k: 5.0)
    result = search(MEAN_K, [16, 24, 32], evaluate, 1.0)
    assert not result.met and result.chosen.value == 32 and asked[-1] == 32


def finished_search(knob, loss_pct: float, element_density: float) -> SearchResult:
    trial = Trial(1, "{}", {"perplexity": {"loss_pct": loss_pct}, "element_density": element_density,
                            "v_row_density": 0.2}, knob.name)
    return SearchResult(knob, 0.12, trial, [trial])


def test_best_of_keeps_the_sparser_file_that_met_the_target():
    mass, mean_k = finished_search(KEEP_MASS, 0.02, 0.068), finished_search(MEAN_K, 0.11, 0.084)
    assert best_of([mass, mean_k]) is mass and best_of([mean_k, mass]) is mass
    denser_mass = finished_search(KEEP_MASS, 0.10, 0.185)
    assert best_of([denser_mass, mean_k]) is mean_k
    missed = finished_search(KEEP_MASS, 0.14, 0.05)  # sparser, but it missed: never chosen over a file that met
    assert best_of([missed, mean_k]) is mean_k
    worse = finished_search(MEAN_K, 1.78, 0.087)  # none met: the lowest loss
    assert best_of([worse, missed]) is missed


def test_the_ladder_stays_inside_the_candidates():
    assert search_ladder([8, 16, 24, 32]) == [16, 20, 24, 28, 32]
    assert search_ladder([8, 12]) == []


def test_bad_target_arguments_are_refused_before_the_weights_load(tmp_path, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the arguments were checked")

    monkeypatch.setattr(calibrate, "load_weights", no_weights)
    out = ["--model", MODEL, "--out", str(tmp_path / "x.json")]
    mean_k = [*out, "--search", "mean-k", "--target-loss"]
    assert "--target-loss searches the mean-k budget; drop --k (or drop --target-loss)" in refusal(
        [*mean_k, "--k", "32"])
    assert "drop --budget-k" in refusal([*mean_k, "1", "--budget-k", "32"])
    assert "no mean k the search tries" in refusal([*mean_k, "--budget-candidates", "8,12"])
    assert "no mean k the search tries" in refusal([*out, "--target-loss", "--budget-candidates", "8,12"])
    assert "give a loss above 0%" in refusal([*out, "--target-loss", "0"])
    # Both searches (the default) set every k and P themselves.
    assert ("--target-loss runs both searches, keep mass and mean k (--search best, the default); drop --k (or drop "
            "--target-loss or search one with --search keep-mass or mean-k)") in refusal([*out, "--target-loss", "--k", "16"])
    assert "drop --keep-mass (or drop --target-loss)" in refusal([*out, "--target-loss", "--keep-mass", "0.9"])
    # The keep-mass search fixes P itself and allocates no per-layer k: those flags would be ignored.
    keep_mass = [*out, "--search", "keep-mass", "--target-loss"]
    assert "drop --keep-mass (or drop --target-loss)" in refusal([*keep_mass, "--keep-mass", "0.9"])
    for flag, value in (("--budget-candidates", "8,16"), ("--budget-seqs", "2"), ("--budget-objective", "residual")):
        assert f"drop {flag} (or drop --target-loss or use --search mean-k or best)" in refusal(
            [*keep_mass, flag, value])
    data = tmp_path / "mine.txt"
    data.write_text("\n\n".join(f"Paragraph {i} of the user's own text." for i in range(40)))
    assert "also calibration --data" in refusal([*out, "--data", str(data), "--eval-data", str(data)])
    assert "--eval-data: " in refusal([*out, "--eval-data", str(tmp_path / "missing.txt")])
    assert "--model and --out required" in refusal([])
    assert "--show " in refusal(["--show", str(tmp_path / "missing.json")])


# ------------------------------------------------------------------ a real search


@pytest.fixture(scope="module")
def target_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("target") / "target.json"
    proc = cli(*TARGET_RUN, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def checked_search(record: dict) -> tuple:
    """One search's record checked: its chosen rung is the smallest that met the target (the densest if none did)."""
    knob = MEAN_K if record["searched"] == MEAN_K.name else KEEP_MASS
    ladder = LADDERS[knob]
    trials = {t[knob.trial_key]: t for t in record["trials"]}
    assert 1 <= len(trials) <= math.ceil(math.log2(len(ladder) + 1)) and set(trials) <= set(ladder)
    met = sorted(v for v, t in trials.items() if t["loss_pct"] <= 0.05)
    chosen = record[f"chosen_{knob.name}"]
    assert record["met"] == bool(met) and chosen == (met[0] if met else max(trials))
    return knob, trials, trials[chosen]


def test_the_file_is_the_sparser_search_result_that_met_the_target(target_run):
    out, proc = target_run
    raw = json.loads(out.read_text())
    target = raw["provenance"]["target"]
    knob, trials, chosen = checked_search(target)
    (other,) = target["other_searches"]  # both searches ran; the other one is on record
    other_knob, other_trials, other_chosen = checked_search(other)
    assert {knob, other_knob} == {KEEP_MASS, MEAN_K}
    if target["met"] and other["met"]:
        assert chosen["element_density"] <= other_chosen["element_density"]
    elif not target["met"]:
        assert not other["met"] and chosen["loss_pct"] <= other_chosen["loss_pct"]
    # The chosen trial is the file: its own held-out record, and its rule.
    assert raw["provenance"]["heldout"]["perplexity"]["loss_pct"] == chosen["loss_pct"]
    assert raw["provenance"]["heldout"]["element_density"] == chosen["element_density"]
    if knob is KEEP_MASS:  # P from the search; k only the dense-row limit; no allocation
        assert raw["provenance"]["keep_mass"]["mass"] == target["chosen_keep_mass"]
        assert raw["target_k"] == calibrate.KEEP_MASS_DENSE_ROWS and "budget" not in raw["provenance"]
    else:
        assert raw["target_k"] == target["chosen_mean_k"] == raw["provenance"]["budget"]["mean_k_budget"]
        assert "keep_mass" not in raw["provenance"]
    for p in (trials if knob is KEEP_MASS else other_trials):
        assert f"keep mass {p:g}: held-out loss" in proc.stdout  # each trial reported as it finished
    for k in (trials if knob is MEAN_K else other_trials):
        assert f"mean k {k:g}: held-out loss" in proc.stdout
    assert "target       held-out loss <= +0.05%" in proc.stdout
    assert f"also searched {other_knob.label}" in proc.stdout


def test_the_recorded_loss_is_what_a_fresh_perplexity_run_measures(target_run):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import accuracy

    out, _ = target_run
    file = load_threshold_file(out)
    _, tokenizer, model = calibrate.load_model(MODEL)
    windows, _ = accuracy.perplexity_windows(tokenizer, 256, 1)  # the BBC held-out split, as calibration held out
    fresh = accuracy.perplexity_eval(model, windows, file, ("dense", "topt"), block_size=file.compensation.block_size,
                                     progress=False)
    recorded = file.provenance.heldout["perplexity"]
    assert fresh["dense"]["ppl"] == pytest.approx(recorded["dense"], rel=1e-6)
    assert fresh["topt"]["ppl"] == pytest.approx(recorded["topt"], rel=1e-6)
    assert fresh["topt"]["density"]["element_density"] == pytest.approx(recorded["element_density"], rel=1e-9)


def test_show_prints_the_loss_and_the_search(target_run):
    out, _ = target_run
    proc = cli("--show", str(out))
    assert proc.returncode == 0, proc.stderr
    file = load_threshold_file(out)
    trials = file.provenance.target["trials"]
    assert "loss         perplexity" in proc.stdout and "target       held-out loss <= +0.05%" in proc.stdout
    knob, _, _ = checked_search(file.provenance.target)
    for t in trials:
        assert f"{knob.label} {t[knob.trial_key]:>4g}: loss {t['loss_pct']:+.2f}%" in proc.stdout
    line = describe(file)  # the start-up log's line
    assert "calibrated to <= +0.05%" in line
    if knob is KEEP_MASS:
        assert f"keep mass {file.keep_mass():g} per head" in line and "kept/k" not in line


def test_an_interrupted_search_resumes_from_its_finished_trials(tmp_path, target_run):
    reference, _ = target_run
    out = tmp_path / "target.json"
    args = [*TARGET_RUN, "--out", str(out)]
    err_path = tmp_path / "stderr.txt"
    with err_path.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "calibration.calibrate", *args], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        first = None
        deadline = time.monotonic() + 300
        for line in proc.stdout:
            if ": held-out loss" in line:
                first = line.split(":")[1].strip()  # "keep mass 0.85" (the keep-mass search runs first)
                break
            assert time.monotonic() < deadline
        assert first is not None, err_path.read_text()[-2000:]
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
    assert proc.returncode in (0, 130)
    if proc.returncode == 0:
        pytest.fail("the search finished before it could be interrupted; the test needs a longer run")
    resumed = cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{first}: calibrating" not in resumed.stderr  # the finished trial was not run again
    assert f"{first}: held-out loss" in resumed.stdout  # but it is reported and counted
    a, b = json.loads(reference.read_text()), json.loads(out.read_text())
    assert b["thresholds"] == a["thresholds"] and b["provenance"]["target"] == a["provenance"]["target"]
    assert not calibrate.checkpoint_path(Path(out)).exists()
