"""Per-layer budgets (calibration/budget.py) and block-wise VMC in the calibration attention."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.engine_run import run_engine
from tests.test_calibration import MODEL, Layer, cli, refusal
from vllm_topt.calibration.data import bbc_articles
from vllm_topt.calibration import calibrate
from vllm_topt.calibration.attention import CalibrationSession, set_session, topt_calibrate_attention
from vllm_topt.calibration.budget import allocate
from vllm_topt.config.thresholds import LayerThresholds, load_threshold_file
from vllm_topt.method.reference import topt_attention_reference
from vllm_topt.method.rules import ToptRule

CANDIDATES = (8, 16, 32, 64, 128)


def curve(scale: float) -> dict[int, float]:
    """An error that halves with each doubling of k, times `scale`."""
    return {k: scale * 8 / k for k in CANDIDATES}


# ------------------------------------------------------------------ allocation


def test_allocation_spends_the_budget_where_the_error_falls_fastest():
    errors = {0: curve(10.0), 1: curve(1.0), 2: curve(1.0), 3: curve(0.1)}
    allocation = allocate(errors, budget_k=32)
    assert sum(allocation.layer_k.values()) <= 32 * 4
    k = allocation.layer_k
    assert k[0] > k[3]
    assert k[0] >= max(k[1], k[2]) and min(k[1], k[2]) >= k[3]  # layers 1 and 2 tie: a step may split them


def test_equal_curves_get_the_uniform_k():
    errors = {layer: curve(1.0) for layer in range(6)}
    assert allocate(errors, budget_k=32).layer_k == {layer: 32 for layer in range(6)}


def test_allocation_jumps_over_a_flat_step():
    # Layer 0 gains nothing from 16 but a lot from 32: greedy must see past the flat step.
    errors = {0: {8: 1.0, 16: 1.0, 32: 0.0, 64: 0.0, 128: 0.0}, 1: {k: 0.01 * 8 / k for k in CANDIDATES}}
    allocation = allocate(errors, budget_k=20)
    assert allocation.layer_k[0] == 32 and allocation.layer_k[1] == 8


# ------------------------------------------------------------------ the calibration attention


def attention(mode, rule, q, k, v, table=None, block_size=32, **session_args):
    B, H, T, _ = q.shape
    session = CalibrationSession(1, H, T, [rule], mode=mode, tables=[table], block_size=block_size,
                                 chunk_elements=B * H * T * 37, **session_args)  # several row chunks
    set_session(session)
    try:
        out, _ = topt_calibrate_attention(Layer(), q, k, v, None, scaling=0.25)
    finally:
        set_session(None)
    return out, session


def random_qkv(T=150, H=4, H_kv=2, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(1, h, T, d, generator=gen) for h in (H, H_kv, H_kv))


@pytest.mark.parametrize("scope", ["sequence", "block"])
@pytest.mark.parametrize("placement, sdc", [("post-softmax", "none"), ("pre-softmax", "exact"),
                                            ("pre-softmax", "exp-threshold")])
def test_apply_mode_matches_the_reference_row_by_row(scope, placement, sdc):
    q, k, v = random_qkv()
    T, H = q.shape[2], q.shape[1]
    rule = ToptRule(placement, sdc, True, k=8, vmc_scope=scope)
    table = LayerThresholds([9, 50, 150], [[0.02 if placement == "post-softmax" else 0.5] * 3] * H, placement)
    out, _ = attention("apply", rule, q, k, v, table)
    for i in range(T):
        n = i + 1
        ref, _ = topt_attention_reference(q[0, :, i], k[0, :, :n].transpose(0, 1), v[0, :, :n].transpose(0, 1),
                                          table.lookup(torch.tensor([n])).float().reshape(-1), rule, 0.25, 32)
        torch.testing.assert_close(out[0, i], ref, atol=1e-5, rtol=1e-4)


def test_block_vmc_is_closer_to_dense_than_sequence_vmc():
    q, k, v = random_qkv(T=400, seed=3)
    # Real V drifts along the sequence (that is what a block's own mean captures): a random walk plus noise.
    v = 0.1 * v.cumsum(dim=2) + 0.3 * v
    dense, _ = attention("dense", ToptRule(k=16), q, k, v)
    errors = {}
    for scope in ("sequence", "block"):
        out, _ = attention("topk", ToptRule(k=16, vmc_scope=scope), q, k, v, block_size=16)
        errors[scope] = float((out - dense).norm() / dense.norm())
    assert errors["block"] < 0.9 * errors["sequence"], errors


def test_profile_errors_are_the_top_k_outputs_errors():
    """Profile mode's error for candidate k is what top-k mode at that k outputs, against dense."""
    q, k, v = random_qkv(T=200, seed=5)
    rule = ToptRule("post-softmax", "none", True, k=32, vmc_scope="block")
    dense, _ = attention("dense", rule, q, k, v)
    out, session = attention("profile", rule, q, k, v, profile_ks=CANDIDATES)
    torch.testing.assert_close(out, dense)  # the model sees dense attention while profiling
    for i, cand in enumerate(CANDIDATES):
        topk, _ = attention("topk", ToptRule("post-softmax", "none", True, k=cand, vmc_scope="block"), q, k, v)
        expected = float((topk - dense).double().pow(2).sum())
        assert session.profile_error[0, i].item() == pytest.approx(expected, rel=1e-4, abs=1e-9)
    assert session.profile_norm[0].item() == pytest.approx(float(dense.double().pow(2).sum()), rel=1e-5)
    assert list(session.profile_error[0]) == sorted(session.profile_error[0], reverse=True)


class ProjectedLayer(torch.nn.Module):  # an attention module with an output projection
    layer_idx = 0

    def __init__(self, H, d, hidden, seed):
        super().__init__()
        self.o_proj = torch.nn.Linear(H * d, hidden)
        with torch.no_grad():
            self.o_proj.weight.copy_(torch.randn(hidden, H * d, generator=torch.Generator().manual_seed(seed)))


def test_residual_profile_errors_are_o_proj_errors_over_each_rows_residual():
    """The residual objective: ||o_proj(o_topk - o)||² / ||h||², row by row, summed; the norm counts rows."""
    q, k, v = random_qkv(T=160, seed=7)
    B, H, T, d = q.shape
    rule = ToptRule("post-softmax", "none", True, k=16, vmc_scope="block")
    layer = ProjectedLayer(H, d, hidden=24, seed=8)
    residual_sq = torch.rand(B, T, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 50 + 0.5
    session = CalibrationSession(1, H, T, [rule], mode="profile", profile_ks=CANDIDATES,
                                 profile_objective="residual", chunk_elements=B * H * T * 37)
    session.residual_sq[0] = residual_sq
    set_session(session)
    try:
        out, _ = topt_calibrate_attention(layer, q, k, v, None, scaling=0.25)
    finally:
        set_session(None)
    dense, _ = attention("dense", rule, q, k, v)
    torch.testing.assert_close(out, dense)
    W = layer.o_proj.weight.detach().double()
    for i, cand in enumerate(CANDIDATES):
        topk, _ = attention("topk", ToptRule("post-softmax", "none", True, k=cand, vmc_scope="block"), q, k, v)
        change = (topk - dense).double().reshape(B, T, H * d) @ W.T  # [B, T, hidden]: what o_proj adds
        expected = float((change.pow(2).sum(-1) / residual_sq).sum())
        assert session.profile_error[0, i].item() == pytest.approx(expected, rel=1e-4, abs=1e-12)
    assert session.profile_norm[0].item() == 0  # rows are counted by ResidualNorms' hook, not here
    assert list(session.profile_error[0]) == sorted(session.profile_error[0], reverse=True)


def test_residual_objective_needs_an_output_projection():
    q, k, v = random_qkv(T=40)
    session = CalibrationSession(1, 4, 40, [ToptRule(k=8)], mode="profile", profile_ks=(8, 16),
                                 profile_objective="residual")
    set_session(session)
    try:
        with pytest.raises(ValueError, match="needs the attention's o_proj.*--budget-objective attention"):
            topt_calibrate_attention(Layer(), q, k, v, None, scaling=0.25)
    finally:
        set_session(None)


# ------------------------------------------------------------------ the CLI


def test_bad_budget_arguments_are_refused_before_the_weights_load(tmp_path, monkeypatch):
    monkeypatch.setattr(calibrate, "load_weights", lambda *a, **k: pytest.fail("weights loaded before the checks"))
    out = ["--model", MODEL, "--out", str(tmp_path / "x.json"), "--seq-len", "512"]
    assert "drop --layer-k" in refusal([*out, "--budget-k", "32", "--layer-k", "0:64"])
    assert "--k 64 and --budget-k 32: give one" in refusal([*out, "--budget-k", "32", "--k", "64"])
    assert "--budget-k 4 is outside --budget-candidates 8 .. 256" in refusal([*out, "--budget-k", "4"])
    assert "--budget-candidates 600: --seq-len 512" in refusal([*out, "--budget-k", "32",
                                                                 "--budget-candidates", "16,32,600"])
    assert "--budget-seqs 9: must be between 1 and --num-seqs 4" in refusal(
        [*out, "--budget-k", "32", "--num-seqs", "4", "--budget-seqs", "9"])
    assert "--block-size 0" in refusal([*out, "--block-size", "0"])
    assert "add --budget-k MEAN_K" in refusal([*out, "--budget-objective", "residual"])


def test_residual_objective_run_records_its_objective(tmp_path):
    """A real model through ResidualNorms' hooks: every layer's rows are counted, the file says how it was chosen."""
    out = tmp_path / "residual.json"
    proc = cli("--model", MODEL, "--budget-k", "32", "--budget-candidates", "8,16,32,64,128", "--budget-seqs", "1",
               "--num-seqs", "1", "--seq-len", "256", "--heldout-seqs", "1", "--vmc-scope", "block",
               "--budget-objective", "residual", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    file = load_threshold_file(out)
    budget = json.loads(out.read_text())["provenance"]["budget"]
    assert budget["objective_name"] == "residual" and "residual" in budget["objective"]
    ks = [file.k_for_layer(layer) for layer in range(file.model.num_layers)]
    assert sum(ks) <= 32 * len(ks) and len(set(ks)) > 1, ks
    for layer, errors in budget["relative_error"].items():
        curve = [errors[str(k)] for k in (8, 16, 32, 64, 128)]
        assert curve[0] > 0 and curve == sorted(curve, reverse=True), (layer, curve)


@pytest.fixture(scope="module")
def budget_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("budget") / "budget.json"
    proc = cli("--model", MODEL, "--budget-k", "32", "--budget-candidates", "8,16,32,64,128", "--budget-seqs", "1",
               "--num-seqs", "2", "--seq-len", "512", "--heldout-seqs", "1", "--vmc-scope", "block",
               "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "budget       mean k" in proc.stdout and "block VMC" in proc.stdout, proc.stdout
    return out


def test_budget_run_records_its_allocation(budget_file):
    out = budget_file
    file = load_threshold_file(out)
    assert file.compensation.vmc_scope == "block" and file.target_k == 32
    ks = [file.k_for_layer(layer) for layer in range(file.model.num_layers)]
    assert sum(ks) <= 32 * len(ks) and len(set(ks)) > 1, ks  # a real allocation, within the budget
    budget = json.loads(out.read_text())["provenance"]["budget"]
    assert budget["mean_k"] == pytest.approx(sum(ks) / len(ks)) and budget["candidates"] == [8, 16, 32, 64, 128]
    for layer, k in enumerate(ks):
        assert file.grid_for_layer(layer)[0] == k + 1  # each layer's grid starts above its own k


def test_budget_file_is_served_with_its_layer_ks(tmp_path, budget_file):
    """The engine thresholds each layer at its allocated k (counters), with block-wise VMC."""
    file = load_threshold_file(budget_file)
    words = " ".join(bbc_articles("heldout")[:12]).split()
    prompt = f"{' '.join(words[:700])}\n\nSummarise the news above in one sentence:"
    stats = tmp_path / "stats.json"
    topt = {"thresholds": str(budget_file), "stats_file": str(stats), "telemetry_interval_s": 0}
    spec = {"backend": "TOPT", "topt": topt, "prompts": [prompt], "max_tokens": 16, "ignore_eos": True}
    run_engine(spec, tmp_path, "budget")
    per_layer = json.loads(stats.read_text())["per_layer"]
    for layer in range(file.model.num_layers):
        c = per_layer[str(layer)]
        k = file.k_for_layer(layer)
        assert c["thresholded_rows"] > 0 and c["thresholded_target"] == k * c["thresholded_rows"], (layer, k, c)
