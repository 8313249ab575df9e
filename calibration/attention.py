"""A Hugging Face attention function that records and applies Top-θ statistics.

Registered as transformers attention implementation "topt_calibrate". Each
layer computes the dense scores exactly as eager attention does (same scale,
RoPE already applied by the model), then, depending on the session's mode:

- "collect": records, for every row with n > k, the (k+1)-th largest element
  in the placement's domain, and (with top-k during calibration) cuts the row
  to its exact top-k so later layers see sparsified inputs (SPEC §6);
- "apply": applies calibrated thresholds as serving does and counts kept
  elements per row (the held-out check);
- "topk": keeps exactly the k largest elements of every row with n > k (the
  paper's top-k baseline), with the same placement domain and compensation;
- "dense": plain attention.

In "apply" and "topk" modes the session also accumulates SPEC §7 density
counts over every row, as decode telemetry counts them (`counts`, and
`counts_by_layer`): rows with n <= k and dense layers count as fully kept,
V rows are the GQA union, V blocks are pages of `block_size` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vllm_topt.reference import DensityCounts, ToptRule, kept_weights
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
    # SPEC §7 density of every row ("apply" and "topk" modes), V pages of block_size tokens.
    block_size: int = 32
    counts: DensityCounts = field(init=False)
    counts_by_layer: list[DensityCounts] = field(init=False)

    def __post_init__(self):
        shape = (self.num_layers, self.num_heads, self.max_len)
        self.value_sum = torch.zeros(shape, dtype=torch.float64)
        self.value_sq_sum = torch.zeros(shape, dtype=torch.float64)
        self.value_count = torch.zeros(shape, dtype=torch.float64)
        self.kept_by_layer = torch.zeros(self.num_layers, dtype=torch.float64)
        self.rows_by_layer = torch.zeros(self.num_layers, dtype=torch.float64)
        self.counts = DensityCounts()
        self.counts_by_layer = [DensityCounts() for _ in range(self.num_layers)]


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
        if session.mode in ("apply", "topk"):
            _count_density(session, layer, None, rule, (B, H, key.shape[1], T))
    else:
        domain = p if rule.placement == "post-softmax" else scores
        if session.mode == "collect":
            keep, theta = _collect_and_cut(session, layer, rule, domain)
        elif session.mode == "topk":
            keep, theta = _topk_keep(domain, rule.k, causal)
            _count_density(session, layer, keep, rule, (B, H, key.shape[1], T))
        else:
            theta = session.tables[layer].lookup(n).float().T[None].expand(B, H, T)  # [B, H, T]
            keep = domain > theta[..., None]
            keep[:, :, : rule.k] = causal[: rule.k]  # n <= k rows stay dense
            _count_kept(session, layer, keep, rule.k)
            _count_density(session, layer, keep, rule, (B, H, key.shape[1], T))
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


def _topk_keep(domain, k, causal):
    """Exactly the k largest elements of every row with n > k; rows with n <= k dense.

    Returns the keep mask (None when every row is short) and the (k+1)-th
    largest value per row, which stands in for θ in SDC "exp-threshold".
    """
    T = domain.shape[-1]
    if T <= k:
        return None, domain.amax(dim=-1)
    values, index = torch.topk(domain, k + 1, dim=-1)
    keep = torch.zeros(domain.shape, dtype=torch.bool).scatter_(-1, index[..., :k], True)
    keep &= causal  # only if a visible element underflowed to p = 0 could top-k pick a masked one
    keep[:, :, :k] = causal[:k]  # n <= k rows stay dense
    return keep, values[..., k]


def _count_density(session, layer, keep, rule, shape) -> None:
    """SPEC §7 counts for one layer call over all T rows of B sequences.

    shape = (B, H, H_kv, T); keep [B, H, T, T] (causal), or None when every
    element is kept (dense layer, or every row has n <= k).
    """
    B, H, H_kv, T = shape
    bs = session.block_size
    triangle = T * (T + 1) // 2  # elements (or V rows) visible to rows n = 1..T
    blocks_visible = sum((n + bs - 1) // bs for n in range(1, T + 1))
    counts = DensityCounts(
        rows=B * T,
        elements_visible=B * H * triangle,
        v_rows_visible=B * H_kv * triangle,
        v_blocks_visible=B * H_kv * blocks_visible,
    )
    if keep is None:
        counts.elements_kept = counts.elements_visible
        counts.v_rows_read = counts.v_rows_visible
        counts.v_blocks_read = counts.v_blocks_visible
    else:
        union = keep.view(B, H_kv, H // H_kv, T, T).any(dim=2)  # GQA union
        pad = (-T) % bs
        blocks = F.pad(union, (0, pad)).view(B, H_kv, T, (T + pad) // bs, bs).any(dim=-1)
        counts.elements_kept = int(keep.sum())
        counts.v_rows_read = int(union.sum())
        counts.v_blocks_read = int(blocks.sum())
    long_rows = max(T - rule.k, 0)  # rows with n > k, thresholded unless the layer is dense
    if keep is not None and long_rows and not rule.dense:
        counts.thresholded_rows = B * H * long_rows
        counts.thresholded_kept = int(keep[:, :, rule.k :].sum())
        counts.thresholded_target = counts.thresholded_rows * rule.k
    session.counts.add(counts)
    session.counts_by_layer[layer].add(counts)


def _count_kept(session, layer, keep, k) -> None:
    kept = keep[:, :, k:].sum(dim=-1).double()  # rows with n > k
    session.kept_by_layer[layer] += kept.sum()
    session.rows_by_layer[layer] += kept.numel()


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPL_NAME, topt_calibrate_attention)
