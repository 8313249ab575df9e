"""--keep-mass: thresholds calibrated to each row's top-P set instead of its top-k.

The cut is checked against its definition on random rows; the CLI's refusals
come before the weights load; a small real SmolLM2 run writes a valid file whose
layers keep unequal shares, as a mass budget does and a top-k one does not.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_calibration import MODEL, cli, refusal
from vllm_topt.calibration import calibrate
from vllm_topt.calibration.attention import mass_cut
from vllm_topt.config.thresholds import load_threshold_file


@pytest.mark.parametrize("mass", [0.5, 0.9, 0.99])
def test_the_cut_leaves_the_fewest_largest_elements_holding_the_mass(mass):
    torch.manual_seed(0)
    scores = torch.randn(3, 4, 50, 200) * torch.linspace(0.5, 4, 4)[None, :, None, None]  # flat to peaked heads
    p = torch.softmax(scores, dim=-1)
    cut = mass_cut(p, p, mass)
    kept = p > cut[..., None]
    kept_mass = (p * kept).sum(dim=-1)
    assert bool((kept_mass >= mass - 1e-6).all())  # the set holds the mass
    smallest_kept = p.masked_fill(~kept, 2.0).amin(dim=-1)
    assert bool((kept_mass - smallest_kept < mass).all())  # and no smaller set of the largest does
    pre = mass_cut(p, scores, mass)  # pre-softmax: the same element, read in the score domain
    assert torch.equal(scores > pre[..., None], kept)


def test_bad_keep_mass_arguments_are_refused_before_the_weights_load(tmp_path, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the arguments were checked")

    monkeypatch.setattr(calibrate, "load_weights", no_weights)
    out = ["--model", MODEL, "--out", str(tmp_path / "x.json")]
    assert "between 0 and 1" in refusal([*out, "--keep-mass", "1"])
    assert "between 0 and 1" in refusal([*out, "--keep-mass", "0"])
    assert "drop --budget-k" in refusal([*out, "--keep-mass", "0.9", "--budget-k", "32"])
    assert "drop --layer-k" in refusal([*out, "--keep-mass", "0.9", "--layer-k", "0:64"])


def test_a_keep_mass_file_spends_its_budget_unevenly_across_layers(tmp_path):
    out = tmp_path / "mass.json"
    proc = cli("--model", MODEL, "--num-seqs", "2", "--seq-len", "256", "--heldout-seqs", "1", "--k", "16",
               "--keep-mass", "0.9", "--vmc-scope", "block", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = json.loads(out.read_text())
    assert raw["provenance"]["keep_mass"]["mass"] == 0.9
    # A top-k file keeps about k per row in every layer; a top-P file keeps what holds each layer's mass.
    per_layer = raw["provenance"]["heldout"]["kept_over_k_per_layer"].values()
    assert max(per_layer) / min(per_layer) > 1.5, sorted(per_layer)
    load_threshold_file(out)  # and it is a valid file for the backend


def test_a_keep_mass_run_reports_its_mass_and_mean_kept_not_kept_over_k():
    from vllm_topt import telemetry
    from vllm_topt.method.rules import DensityCounts

    # 10 long rows kept 480 elements; the file's k=16 is only where dense rows end.
    per_layer = {0: DensityCounts(rows=12, elements_visible=6000, elements_kept=500, v_rows_visible=3000,
                                  v_rows_read=600, v_blocks_visible=40, v_blocks_read=30, thresholded_rows=10,
                                  thresholded_kept=480, thresholded_target=160)}
    mass = telemetry.summary_line(per_layer, telemetry.RunMode(16, False, 1, 1, (0,), keep_mass=0.85))
    assert "keep mass 0.85, rows with n <= 16 dense" in mass and "mean kept 48.0 on rows with n > k" in mass
    assert "kept/k" not in mass
    top_k = telemetry.summary_line(per_layer, telemetry.RunMode(16, False, 1, 1, (0,)))
    assert "k=16, 1 of 1 layers thresholded" in top_k and "kept/k 3.00 on rows with n > k" in top_k


def test_the_floor_joins_the_top_p_set_with_the_top_k():
    from vllm_topt.calibration.attention import row_cut

    torch.manual_seed(1)
    scores = torch.randn(2, 4, 30, 120) * torch.linspace(0.5, 6, 4)[None, :, None, None]  # flat to peaked heads
    p = torch.softmax(scores, dim=-1)
    k = 16
    top_p = p > row_cut(p, p, k, 0.85)[..., None]
    top_k = p > row_cut(p, p, k)[..., None]
    assert bool((top_k.sum(dim=-1) == k).all())  # exactly k without a mass
    floored = p > row_cut(p, p, k, 0.85, floor=True)[..., None]
    assert torch.equal(floored, top_p | top_k)
    assert bool((floored.sum(dim=-1) >= k).all()) and bool((top_p.sum(dim=-1) < k).any())  # the floor bound


def test_the_floor_needs_a_keep_mass_file(tmp_path, monkeypatch):
    monkeypatch.setattr(calibrate, "load_weights", lambda *a, **k: pytest.fail("weights loaded before the check"))
    out = ["--model", MODEL, "--out", str(tmp_path / "x.json")]
    assert "--keep-mass-floor adds a floor to a keep-mass file" in refusal([*out, "--keep-mass-floor"])
    assert "--keep-mass-floor adds a floor" in refusal([*out, "--keep-mass-floor", "--target-loss", "--search", "mean-k"])
