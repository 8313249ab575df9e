"""The reference against hand-computed cases and dense attention."""

from __future__ import annotations

import pytest
import torch

from vllm_topt.method.rules import ToptRule
from vllm_topt.method.reference import kept_weights, topt_attention_reference


def dense_attention(q, k, v, scale):
    group = q.shape[0] // k.shape[1]
    kk = k.repeat_interleave(group, dim=1).transpose(0, 1)
    vv = v.repeat_interleave(group, dim=1).transpose(0, 1)
    return torch.softmax(scale * (kk @ q[:, :, None])[..., 0], dim=-1)[:, None] @ vv


def random_case(H=4, H_kv=2, n=100, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(H, d, generator=g) * 2, torch.randn(n, H_kv, d, generator=g), torch.randn(n, H_kv, d, generator=g))


@pytest.mark.parametrize("rule", [ToptRule(dense=True), ToptRule("post-softmax", k=8), ToptRule("pre-softmax", "exact", k=8)])
def test_keep_everything_equals_dense(rule):
    q, k, v = random_case()
    theta = torch.full((4,), -1e9 if rule.placement == "pre-softmax" else 0.0)
    out, counts = topt_attention_reference(q, k, v, theta, rule, 0.25, 32)
    torch.testing.assert_close(out, dense_attention(q, k, v, 0.25)[:, 0], atol=1e-5, rtol=1e-5)
    assert counts.element_density == 1.0 and counts.v_block_density == 1.0


def test_exact_sdc_keeps_dense_probabilities():
    scores = torch.randn(3, 50)
    keep = scores > 0.5
    w = kept_weights(scores, keep, torch.full((3,), 0.5), ToptRule("pre-softmax", "exact", k=4))
    p = torch.softmax(scores, dim=-1)
    torch.testing.assert_close(w, torch.where(keep, p, torch.zeros(())))


def test_sdc_modes_order():
    """exp-threshold over-estimates the dropped mass: kept weights shrink vs exact; none renormalises."""
    scores = torch.randn(2, 64)
    theta = torch.full((2,), 0.8)
    keep = scores > theta[:, None]
    weights = {m: kept_weights(scores, keep, theta, ToptRule("pre-softmax", m, k=4)) for m in ("none", "exact", "exp-threshold")}
    torch.testing.assert_close(weights["none"].sum(-1), torch.ones(2))
    assert (weights["exact"].sum(-1) < 1).all()
    assert (weights["exp-threshold"].sum(-1) <= weights["exact"].sum(-1) + 1e-7).all()


def test_vmc_formula_by_hand():
    q, k, v = random_case(H=2, H_kv=1, n=40, d=8, seed=3)
    rule = ToptRule("post-softmax", vmc=True, k=4)
    theta = torch.tensor([0.03, 0.05])
    out, _ = topt_attention_reference(q, k, v, theta, rule, 0.5, 32)
    for h in range(2):
        p = torch.softmax(0.5 * k[:, 0] @ q[h], dim=0)
        kept = p > theta[h]
        expected = (p * kept) @ v[:, 0] + (1 - (p * kept).sum()) * v[:, 0].mean(0)
        torch.testing.assert_close(out[h], expected, atol=1e-6, rtol=1e-5)


def test_gqa_union_and_block_counts_by_hand():
    """Two query heads of one KV group each attend to one key: rows 3 and 40 -> blocks 0 and 1."""
    n, d, bs = 100, 128, 32
    k = torch.zeros(n, 1, d)
    k[torch.arange(n), 0, torch.arange(n) % d] = 1.0
    q = torch.zeros(2, d)
    q[0, 3] = q[1, 40] = 50.0
    v = torch.randn(n, 1, d)
    out, counts = topt_attention_reference(q, k, v, torch.tensor([0.5, 0.5]), ToptRule("post-softmax", vmc=False, k=4), 1.0, bs)
    assert counts.elements_visible == 200 and counts.elements_kept == 2
    assert counts.v_rows_visible == 100 and counts.v_rows_read == 2
    assert counts.v_blocks_visible == 4 and counts.v_blocks_read == 2


def test_rows_up_to_k_are_dense():
    q, k, v = random_case(n=8)
    out, counts = topt_attention_reference(q, k, v, torch.full((4,), 0.9), ToptRule("post-softmax", k=8), 0.25, 32)
    assert counts.elements_kept == counts.elements_visible
    torch.testing.assert_close(out, dense_attention(q, k, v, 0.25)[:, 0], atol=1e-5, rtol=1e-5)
