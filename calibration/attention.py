"""A Hugging Face attention function that records and applies Top-θ statistics.

Registered as transformers attention implementation "topt_calibrate". Each
layer computes the dense scores exactly as eager attention does (same scale,
RoPE already applied by the model), then, depending on the session's mode:

- "collect": records, for every row with n > k, the (k+1)-th largest element
  in the placement's domain, and (with top-k during calibration) cuts the row
  to its exact top-k so later layers see sparsified inputs (SPEC §6);
- "apply": applies calibrated thresholds as serving does and counts kept
  elements per row (the held-out check);
- "dense": plain attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_topt.reference import ToptRule, kept_weights
from vllm_topt.thresholds import LayerThresholds

ATTN_IMPL_NAME = "topt_calibrate"


@dataclass
class CalibrationSession:
    num_layers: int
    num_heads: int
    max_len: int
    rules: list[ToptRule]  # per layer
    mode: str = "collect"
    topk_during_calibration: bool = True
    tables: list[LayerThresholds | None] | None = None  # "apply" mode
    # Sums over samples of the (k+1)-th largest value, per (layer, head, n-1).
    value_sum: torch.Tensor = field(init=False)
    value_sq_sum: torch.Tensor = field(init=False)
    value_count: torch.Tensor = field(init=False)
    # Held-out accounting ("apply" mode), rows with n > k only.
    kept_sum: float = 0.0
    kept_rows: int = 0
    kept_by_layer: torch.Tensor = field(init=False)
    rows_by_layer: torch.Tensor = field(init=False)

    def __post_init__(self):
        shape = (self.num_layers, self.num_heads, self.max_len)
        self.value_sum = torch.zeros(shape, dtype=torch.float64)
        self.value_sq_sum = torch.zeros(shape, dtype=torch.float64)
        self.value_count = torch.zeros(shape, dtype=torch.float64)
        self.kept_by_layer = torch.zeros(self.num_layers, dtype=torch.float64)
        self.rows_by_layer = torch.zeros(self.num_layers, dtype=torch.float64)


_session: CalibrationSession | None = None


def set_session(session: CalibrationSession | None) -> None:
    global _session
    _session = session


def topt_calibrate_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, H, T, d]; key/value [B, H_kv, T, d]. Returns ([B, T, H, d], None)."""
    session = _session
    assert session is not None, "set_session() before running the model"
    layer = module.layer_idx
    rule = session.rules[layer]
    B, H, T, d = query.shape
    group = H // key.shape[1]
    k_all = key.repeat_interleave(group, dim=1).float()
    v_all = value.repeat_interleave(group, dim=1).float()
    scale = scaling if scaling is not None else d**-0.5
    scores = (query.float() @ k_all.transpose(-1, -2)) * scale  # [B, H, T, T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    n = torch.arange(1, T + 1)
    p = torch.softmax(scores, dim=-1)

    if session.mode == "dense" or rule.dense:
        keep, weights = None, p
    else:
        domain = p if rule.placement == "post-softmax" else scores
        if session.mode == "collect":
            keep, theta = _collect_and_cut(session, layer, rule, domain)
        else:
            theta = session.tables[layer].lookup(n).float().T[None].expand(B, H, T)  # [B, H, T]
            keep = domain > theta[..., None]
            keep[:, :, : rule.k] = causal[: rule.k]  # n <= k rows stay dense
            _count_kept(session, layer, keep, rule.k)
        if keep is None:
            weights = p
        elif rule.placement == "post-softmax":
            weights = p.masked_fill(~keep, 0.0)  # kept elements keep their dense p
        else:
            weights = kept_weights(scores, keep & causal, theta, rule)
    out = weights @ v_all
    if rule.vmc and keep is not None:
        running_mean = v_all.cumsum(dim=2) / n[None, None, :, None]
        out = out + (1.0 - weights.sum(dim=-1, keepdim=True)) * running_mean
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _collect_and_cut(session, layer, rule, domain):
    """Record the (k+1)-th largest element of each long row (n > k).

    Returns the keep mask (exact top-k per long row when cutting, None for
    dense) and the per-row cut value, which stands in for θ in compensation.
    """
    T = domain.shape[-1]
    k = rule.k
    if T <= k:
        return None, domain.amax(dim=-1)
    kth1 = torch.topk(domain, k + 1, dim=-1).values[..., k]  # leaves exactly k strictly above
    samples = kth1[:, :, k:].double()  # rows with n = i + 1 > k
    session.value_sum[layer, :, k:] += samples.sum(dim=0)
    session.value_sq_sum[layer, :, k:] += (samples**2).sum(dim=0)
    session.value_count[layer, :, k:] += samples.shape[0]
    if not session.topk_during_calibration:
        return None, kth1
    keep = domain > kth1[..., None]
    keep[:, :, :k] = True  # n <= k rows stay dense (masked positions carry p = 0 / s = -inf)
    return keep, kth1


def _count_kept(session, layer, keep, k) -> None:
    kept = keep[:, :, k:].sum(dim=-1).double()  # rows with n > k
    session.kept_by_layer[layer] += kept.sum()
    session.rows_by_layer[layer] += kept.numel()


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPL_NAME, topt_calibrate_attention)
