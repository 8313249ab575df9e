"""The Top-θ reference: SPEC §2-5 in plain torch, one sequence at a time.

Slow and obvious on purpose. The types (`ToptRule`, `DensityCounts`) live in
`vllm_topt.method.rules`. Every fast path is tested against
`topt_attention_reference`; read docs/SPEC.md beside this file's comments.
"""

from __future__ import annotations

import math
import torch

from vllm_topt.method.rules import DensityCounts, Placement, Sdc, ToptRule, VmcScope


def keep_mask(scores: torch.Tensor, theta: torch.Tensor, rule: ToptRule) -> torch.Tensor:
    """SPEC §2-3: which of a row's n elements survive, per query head.

    scores: [..., n] (scale and soft-cap already applied); theta: [...] for this n.
    """
    n = scores.shape[-1]
    if rule.dense or n <= rule.k:
        return torch.ones_like(scores, dtype=torch.bool)
    if rule.placement is Placement.POST_SOFTMAX:
        p = torch.softmax(scores, dim=-1)
        return p > theta[..., None]
    return scores > theta[..., None]


def kept_weights(scores: torch.Tensor, keep: torch.Tensor, theta: torch.Tensor, rule: ToptRule) -> torch.Tensor:
    """SPEC §4: the weight of each kept element (0 for dropped ones), like scores [..., n]."""
    m = scores.max(dim=-1, keepdim=True).values
    e = torch.exp(scores - m)
    S = e.sum(dim=-1, keepdim=True)
    if rule.dense or rule.placement is Placement.POST_SOFTMAX:
        # Post-softmax keeps the dense probabilities of the kept elements.
        return torch.where(keep, e / S, torch.zeros_like(e))
    e_kept = torch.where(keep, e, torch.zeros_like(e))
    S_K = e_kept.sum(dim=-1, keepdim=True)
    if rule.sdc is Sdc.EXACT:
        D = S - S_K
    elif rule.sdc is Sdc.EXP_THRESHOLD:
        # Masked positions (score -inf) are not visible, so never "dropped".
        dropped = (~keep & torch.isfinite(scores)).sum(dim=-1, keepdim=True).to(e.dtype)
        D = dropped * torch.exp(theta[..., None].to(e.dtype) - m)
    else:
        D = torch.zeros_like(S_K)
    # An empty kept set with sdc="none" has nothing to normalise: weights 0.
    return e_kept / (S_K + D).clamp(min=torch.finfo(e.dtype).tiny)


def compensation_mean(scores: torch.Tensor, keep: torch.Tensor, v: torch.Tensor, rule: ToptRule,
                      block_size: int) -> torch.Tensor:
    """SPEC §4: the V mean that VMC adds per unit of dropped mass, [d].

    scores, keep: [n]; v: [n, d]. "sequence": mean(v_1..v_n). "block": the
    blocks' means weighted by the dense probability each block dropped.
    """
    if rule.vmc_scope is VmcScope.SEQUENCE:
        return v.mean(dim=0)
    n = v.shape[0]
    dropped_p = torch.where(keep, torch.zeros_like(scores), torch.softmax(scores, dim=-1))
    total = dropped_p.sum()
    if total <= 0:
        return torch.zeros(v.shape[1], dtype=v.dtype)
    mean = torch.zeros(v.shape[1], dtype=v.dtype)
    for j0 in range(0, n, block_size):
        block = slice(j0, min(j0 + block_size, n))
        mean += dropped_p[block].sum() / total * v[block].mean(dim=0)
    return mean


def topt_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor | None,
    rule: ToptRule,
    scale: float,
    block_size: int,
    logits_soft_cap: float | None = None,
) -> tuple[torch.Tensor, DensityCounts]:
    """Top-θ decode attention for one query token of one sequence.

    q: [H, d]; k, v: [n, H_kv, d] (keys 1..n, the new token included);
    theta: [H] thresholds looked up for this n (ignored when dense).
    Returns the output [H, d] (q's dtype) and the density counts.
    """
    H, d = q.shape
    n, H_kv, _ = k.shape
    group = H // H_kv
    kv_head = torch.arange(H) // group  # SPEC §1: g = h // (H / H_kv)
    qf, kf, vf = q.float(), k.float(), v.float()
    if theta is None:
        theta = torch.zeros(H)
    theta = theta.float()

    out = torch.empty(H, d, dtype=torch.float32)
    keep_all = torch.empty(H, n, dtype=torch.bool)
    for h in range(H):
        g = int(kv_head[h])
        scores = scale * (kf[:, g, :] @ qf[h])  # [n]
        if logits_soft_cap:
            scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
        keep = keep_mask(scores[None], theta[h : h + 1], rule)
        w = kept_weights(scores[None], keep, theta[h : h + 1], rule)[0]  # [n]
        o = w @ vf[:, g, :]
        if rule.vmc and not rule.dense:
            o = o + (1.0 - w.sum()) * compensation_mean(scores, keep[0], vf[:, g, :], rule, block_size)
        out[h] = o
        keep_all[h] = keep[0]

    counts = DensityCounts(rows=1, elements_visible=H * n, elements_kept=int(keep_all.sum()))
    if not rule.dense and n > rule.k:
        counts.thresholded_rows = H
        counts.thresholded_kept = counts.elements_kept
        counts.thresholded_target = H * rule.k
    blocks_per_seq = math.ceil(n / block_size)
    block_of_row = torch.arange(n) // block_size
    for g in range(H_kv):
        rows_needed = keep_all[g * group : (g + 1) * group].any(dim=0)  # GQA union
        blocks_needed = torch.zeros(blocks_per_seq, dtype=torch.bool)
        blocks_needed[block_of_row[rows_needed]] = True
        counts.v_rows_visible += n
        counts.v_rows_read += int(rows_needed.sum())
        counts.v_blocks_visible += blocks_per_seq
        counts.v_blocks_read += int(blocks_needed.sum())
    return out.to(q.dtype), counts
