"""A Hugging Face attention function that records and applies Top-θ statistics.

Registered as transformers attention implementation "topt_calibrate". Each
layer computes the dense scores exactly as eager attention does (same scale,
RoPE already applied by the model), then, depending on the session's mode:

- "collect": records, for every row with n > k, the (k+1)-th largest element
  in the placement's domain, and (with top-k during calibration) cuts the row
  to its exact top-k so later layers see sparsified inputs (SPEC §6). With
  `keep_mass` P the recorded element is instead the largest one outside the
  row's top-P set (the fewest largest elements whose dense p sums to P), and
  the cut keeps that set: a head whose rows are flat gets a lower θ, so keeps
  more, than a head whose rows are peaked;
- "apply": applies calibrated thresholds as serving does and counts kept
  elements per row (the held-out check);
- "topk": keeps exactly the k largest elements of every row with n > k (the
  paper's top-k baseline), with the same placement domain and compensation;
- "profile": plain attention for the model, and for every thresholded layer and
  every candidate k in `profile_ks`, the squared error of that layer's top-k
  output (with the rule's compensation) against the dense output
  (`profile_error`, over `profile_norm`): what per-layer budgets allocate from.
  With `profile_objective` "residual" the error is taken after the layer's
  output projection (what is added to the residual stream) and divided, row
  by row, by the squared norm of the residual stream entering the layer
  (`ResidualNorms`); `profile_norm` then counts rows;
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

from vllm_topt.method.rules import DensityCounts, ToptRule, window_counters
from vllm_topt.method.reference import kept_weights
from vllm_topt.config.thresholds import LayerThresholds

ATTN_IMPL_NAME = "topt_calibrate"


@dataclass
class CalibrationSession:
    num_layers: int
    num_heads: int
    max_len: int
    rules: list[ToptRule]  # per layer
    mode: str = "collect"
    topk_during_calibration: bool = True
    keep_mass: float | None = None  # "collect": calibrate to each row's top-P set instead of its top-k
    keep_mass_floor: bool = False  # with keep_mass: the top-P set joined with the row's top k (at least k kept)
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
    # Query rows per chunk: [B, H, rows, T] scores of at most this many elements (64 MiB in float32).
    chunk_elements: int = 1 << 24
    device: str = "cpu"  # where the statistics accumulate (the model's device)
    counts: DensityCounts = field(init=False)
    counts_by_layer: list[DensityCounts] = field(init=False)
    # "profile" mode: Σ ||o_topk - o||² per (layer, candidate k), and Σ ||o||² per layer.
    profile_ks: tuple[int, ...] = ()
    profile_objective: str = "attention"  # or "residual": errors after o_proj, over the residual stream
    residual_sq: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> ||h_t||² [B, T], this sequence
    profile_error: torch.Tensor = field(init=False)
    profile_norm: torch.Tensor = field(init=False)
    # Scored runs ("dense" and "apply" modes with full logits): [Σ next-token NLL, tokens scored].
    next_token_loss: torch.Tensor = field(init=False)

    def __post_init__(self):
        shape = (self.num_layers, self.num_heads, self.max_len)
        self.value_sum = torch.zeros(shape, dtype=torch.float64, device=self.device)
        self.value_sq_sum = torch.zeros(shape, dtype=torch.float64, device=self.device)
        self.value_count = torch.zeros(shape, dtype=torch.float64, device=self.device)
        self.kept_by_layer = torch.zeros(self.num_layers, dtype=torch.float64)
        self.rows_by_layer = torch.zeros(self.num_layers, dtype=torch.float64)
        self.counts = DensityCounts()
        self.counts_by_layer = [DensityCounts() for _ in range(self.num_layers)]
        self.profile_error = torch.zeros(self.num_layers, len(self.profile_ks), dtype=torch.float64)
        self.profile_norm = torch.zeros(self.num_layers, dtype=torch.float64)
        self.next_token_loss = torch.zeros(2, dtype=torch.float64)


_session: CalibrationSession | None = None


def set_session(session: CalibrationSession | None) -> None:
    global _session
    _session = session


def topt_calibrate_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, H, T, d]; key/value [B, H_kv, T, d]. Returns ([B, T, H, d], None).

    Query rows are processed in chunks (`query_chunk_rows`), so memory grows
    linearly with T rather than with T²; every row's result is the same as
    with one chunk, and the statistics and counts are sums over rows.
    """
    session = _session
    assert session is not None, "set_session() before running the model"
    layer = module.layer_idx
    # Sliding-window layers (Gemma-3's local layers) see their last `window` keys; TOPT keeps them dense.
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if window is not None and not session.rules[layer].dense:
        raise ValueError(f"layer {layer} has a sliding window ({window}) but a sparse rule; "
                         "the threshold file must list it in dense_layers")
    B, H, T, d = query.shape
    group = H // key.shape[1]
    k_all = key.repeat_interleave(group, dim=1).float()
    v_all = value.repeat_interleave(group, dim=1).float()
    scale = scaling if scaling is not None else d**-0.5
    # Σ V over each prefix, [B, H, T, d]: VMC's means come from it in O(T · d).
    v_prefix = v_all.cumsum(dim=2)
    step = query_chunk_rows(session, B, H, T)
    out_proj = output_projection(session, module)
    out = torch.empty(B, H, T, d, dtype=torch.float32, device=query.device)
    for r0 in range(0, T, step):
        r1 = min(r0 + step, T)
        out[:, :, r0:r1] = _attend_rows(session, layer, query[:, :, r0:r1].float(), k_all[:, :, :r1],
                                        v_all[:, :, :r1], v_prefix[:, :, :r1], r0, scale, key.shape[1],
                                        window, out_proj)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def query_chunk_rows(session: "CalibrationSession", B: int, H: int, T: int) -> int:
    """Rows per chunk: a [B, H, rows, T] score tensor of at most `chunk_elements` elements."""
    return max(1, min(T, session.chunk_elements // max(B * H * T, 1)))


def _attend_rows(session, layer, q, k_all, v_all, v_prefix, r0, scale, num_kv_heads, window=None, out_proj=None):
    """Attention of query rows r0 .. r0+C-1 (row i sees keys 0..i, so n = i + 1) over keys [:r1];
    with a sliding window, row i sees keys i-window+1..i."""
    rule = session.rules[layer]
    B, H, C, _ = q.shape
    r1 = k_all.shape[2]
    n = torch.arange(r0 + 1, r1 + 1)  # row lengths of this chunk
    position = torch.arange(r1)[None, :]
    causal = position < n[:, None]
    if window is not None:
        causal &= position >= n[:, None] - window
    causal = causal.to(q.device)  # [C, r1]
    scores = (q @ k_all.transpose(-1, -2)) * scale  # [B, H, C, r1]
    scores = scores.masked_fill(~causal, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    shape = (B, H, num_kv_heads, n)

    if session.mode == "profile" and not rule.dense:
        dense_out = p @ v_all
        _profile_layer(session, layer, rule, scores, p, causal, n, v_all, v_prefix, dense_out, out_proj)
        return dense_out
    if session.mode in ("dense", "profile") or rule.dense:
        keep, weights = None, p
        if session.mode in ("apply", "topk"):
            _count_density(session, layer, None, rule, shape, window)
    else:
        domain = p if rule.placement == "post-softmax" else scores
        short = (n <= rule.k).to(q.device)  # rows with n <= k stay dense
        if session.mode == "collect":
            keep, theta = _collect_and_cut(session, layer, rule, domain, n, short, p)
        elif session.mode == "topk":
            keep, theta = _topk_keep(domain, rule.k, causal, short)
            _count_density(session, layer, keep, rule, shape)
        else:
            theta = session.tables[layer].lookup(n).float().T.to(q.device)[None].expand(B, H, C)  # [B, H, C]
            keep = domain > theta[..., None]
            keep[:, :, short] = causal[short]
            _count_kept(session, layer, keep, ~short)
            _count_density(session, layer, keep, rule, shape)
        if keep is None:
            weights = p
        else:
            return _sparse_output(rule, scores, p, keep, causal, theta, v_all, v_prefix, n, session.block_size)
    return weights @ v_all


def _sparse_output(rule, scores, p, keep, causal, theta, v_all, v_prefix, n, block_size):
    """SPEC §4: the kept elements' weighted V, plus VMC's dropped mass times its mean."""
    if rule.placement == "post-softmax":
        weights = p.masked_fill(~keep, 0.0)  # kept elements keep their dense p
    else:
        weights = kept_weights(scores, keep & causal, theta, rule)
    out = weights @ v_all
    if rule.vmc:
        rest = 1.0 - weights.sum(dim=-1, keepdim=True)
        if rule.block_vmc:
            out = out + rest * _block_means(p.masked_fill(keep, 0.0), v_all, v_prefix, n, block_size)
        else:
            out = out + rest * v_prefix[:, :, n - 1] / n.to(out.device, out.dtype)[:, None]
    return out


def output_projection(session, module):
    """The layer's o_proj weight [hidden, H·d] when profiling the residual objective, else None."""
    if session.mode != "profile" or session.profile_objective != "residual":
        return None
    proj = getattr(module, "o_proj", None)
    if proj is None:
        raise ValueError(f"the residual budget objective needs the attention's o_proj; "
                         f"{type(module).__name__} has none: use --budget-objective attention")
    return proj.weight.detach().float()


def _profile_layer(session, layer, rule, scores, p, causal, n, v_all, v_prefix, dense_out, out_proj=None) -> None:
    """Squared error of each candidate k's top-k output against the dense one (rows with n > k).

    With `out_proj` ([hidden, H·d]) the error is mapped into the residual
    stream first (o_proj is linear, so its bias cancels) and each row's error
    is divided by that row's residual ||h||², so that no single token (a
    massive-activation sink) sets a layer's weight; `ResidualNorms` counts
    the rows in `profile_norm`.
    """
    domain = p if rule.placement == "post-softmax" else scores
    row_sq = None
    if out_proj is None:
        session.profile_norm[layer] += float(dense_out.double().pow(2).sum())
    else:
        row_sq = session.residual_sq[layer][:, (n - 1).to(dense_out.device)].double()  # [B, C]
    top = min(max(session.profile_ks) + 1, domain.shape[-1])
    values, index = torch.topk(domain, top, dim=-1)  # one sort serves every candidate
    for i, k in enumerate(session.profile_ks):
        keep, theta = _topk_keep(domain, k, causal, (n <= k).to(p.device), (values, index))
        if keep is None:
            continue  # every row has n <= k: nothing dropped, no error
        out = _sparse_output(rule, scores, p, keep, causal, theta, v_all, v_prefix, n, session.block_size)
        session.profile_error[layer, i] += _squared_error(out - dense_out, out_proj, row_sq)


def _squared_error(error, out_proj=None, row_sq=None) -> float:
    """Σ ||error||² over rows; with `out_proj`, Σ ||o_proj(error)||² / ||h||² (the residual objective)."""
    if out_proj is None:
        return float(error.double().pow(2).sum())
    B, H, C, d = error.shape
    residual = error.transpose(1, 2).reshape(B, C, H * d) @ out_proj.T  # [B, C, hidden]
    return float((residual.double().pow(2).sum(-1) / row_sq).sum())


def _block_means(dropped_p, v_all, v_prefix, n, block_size):
    """SPEC §4 block-wise VMC: Σ_b (d_b / Σ_c d_c) · mean(V of block b), [B, H, C, d].

    dropped_p [B, H, C, r1]: the dense p of each dropped element (0 if kept or
    not visible); n [C]: the rows' lengths. A row's last block holds its
    visible rows only, so its mean comes from the prefix sums.
    """
    B, H, C, r1 = dropped_p.shape
    pad = (-r1) % block_size
    nb = (r1 + pad) // block_size
    dropped = F.pad(dropped_p, (0, pad)).view(B, H, C, nb, block_size).sum(dim=-1)  # d_b, [B, H, C, nb]
    share = dropped / dropped.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(dropped.dtype).tiny)
    full_mean = F.pad(v_all, (0, 0, 0, pad)).view(B, H, nb, block_size, -1).sum(dim=3) / block_size
    means = share @ full_mean  # right for every block but each row's last, which may be partial
    device = dropped_p.device
    last = ((n - 1) // block_size).to(device)  # [C]
    first_row = last * block_size
    end_sum = v_prefix[:, :, (n - 1).to(device)]  # Σ V over rows 0..n-1, [B, H, C, d]
    before = v_prefix[:, :, (first_row - 1).clamp(min=0)] * (first_row > 0)[:, None].to(v_prefix.dtype)
    last_mean = (end_sum - before) / (n.to(device) - first_row)[:, None].to(v_prefix.dtype)
    last_share = share.gather(-1, last.expand(B, H, C)[..., None])  # [B, H, C, 1]
    return means + last_share * (last_mean - full_mean[:, :, last])


def _collect_and_cut(session, layer, rule, domain, n, short, p):
    """Record the (k+1)-th largest element of each long row (n > k), or with `keep_mass` the largest
    element outside its top-P set.

    Returns the keep mask (exact top-k, or top-P set, per long row when
    cutting, None for dense) and the per-row cut value, which stands in for θ
    in compensation.
    """
    k = rule.k
    if bool(short.all()):
        return None, domain.amax(dim=-1)
    kth1 = row_cut(p, domain, k, session.keep_mass, session.keep_mass_floor)
    long = ~short
    samples = kth1[:, :, long].double()  # [B, H, rows with n > k]
    index = (n[long.cpu()] - 1).to(session.value_sum.device)
    session.value_sum[layer].index_add_(1, index, samples.sum(dim=0).to(session.value_sum.device))
    session.value_sq_sum[layer].index_add_(1, index, (samples**2).sum(dim=0).to(session.value_sum.device))
    session.value_count[layer, :, index] += samples.shape[0]
    if not session.topk_during_calibration:
        return None, kth1
    keep = domain > kth1[..., None]
    keep[:, :, short] = True  # n <= k rows stay dense (masked positions carry p = 0 / s = -inf)
    return keep, kth1


def row_cut(p, domain, k: int, mass: float | None = None, floor: bool = False) -> torch.Tensor:
    """Per row, the value the kept elements lie strictly above: the (k+1)-th largest (exactly k kept), or
    with `mass` the largest outside the top-P set, or with `floor` too, below both (the top-P set joined with
    the top k, since a short row's top-P set can be a handful of elements)."""
    kth1 = torch.topk(domain, k + 1, dim=-1).values[..., k] if mass is None or floor else None
    if mass is None:
        return kth1
    cut = mass_cut(p, domain, mass)
    return torch.minimum(cut, kth1) if floor else cut


def mass_cut(p, domain, mass: float) -> torch.Tensor:
    """Per row, the domain value of the largest element outside the row's top-`mass` set: the fewest
    largest elements whose p sums to at least `mass` lie strictly above it."""
    values, index = p.sort(dim=-1, descending=True)
    inside = (values.cumsum(dim=-1) - values) < mass  # the larger elements hold less than `mass`
    first_out = inside.sum(dim=-1, keepdim=True).clamp(max=p.shape[-1] - 1)
    return domain.gather(-1, index.gather(-1, first_out))[..., 0]


def _topk_keep(domain, k, causal, short, top=None):
    """Exactly the k largest elements of every row with n > k; rows with n <= k dense.

    Returns the keep mask (None when every row is short) and the (k+1)-th
    largest value per row, which stands in for θ in SDC "exp-threshold".
    `top`: (values, index) of a descending topk of at least k + 1, to reuse.
    """
    if bool(short.all()):
        return None, domain.amax(dim=-1)
    values, index = torch.topk(domain, k + 1, dim=-1) if top is None else top
    keep = torch.zeros(domain.shape, dtype=torch.bool, device=domain.device).scatter_(-1, index[..., :k], True)
    keep &= causal  # only if a visible element underflowed to p = 0 could top-k pick a masked one
    keep[:, :, short] = causal[short]  # n <= k rows stay dense
    return keep, values[..., k]


def _count_density(session, layer, keep, rule, shape, window=None) -> None:
    """SPEC §7 counts for one layer call over a chunk of rows of B sequences.

    shape = (B, H, H_kv, n) with n the chunk's row lengths; keep [B, H, C, r1]
    (causal), or None when every element is kept (dense layer, or every row
    has n <= k; a sliding-window layer sees its window only).
    """
    B, H, H_kv, n = shape
    bs = session.block_size
    dense = window_counters(n, window, H, H_kv, bs).sum(dim=0) * B
    counts = DensityCounts.from_counters(dense.tolist())
    if keep is not None:
        C, r1 = keep.shape[2], keep.shape[3]
        union = keep.view(B, H_kv, H // H_kv, C, r1).any(dim=2)  # GQA union
        pad = (-r1) % bs
        blocks = F.pad(union, (0, pad)).view(B, H_kv, C, (r1 + pad) // bs, bs).any(dim=-1)
        counts.elements_kept = int(keep.sum())
        counts.v_rows_read = int(union.sum())
        counts.v_blocks_read = int(blocks.sum())
    long = n > rule.k  # rows the threshold applies to, unless the layer is dense
    if keep is not None and not rule.dense and bool(long.any()):
        counts.thresholded_rows = B * H * int(long.sum())
        counts.thresholded_kept = int(keep[:, :, long.to(keep.device)].sum())
        counts.thresholded_target = counts.thresholded_rows * rule.k
    session.counts.add(counts)
    session.counts_by_layer[layer].add(counts)


def _count_kept(session, layer, keep, long) -> None:
    kept = keep[:, :, long].sum(dim=-1).double().cpu()  # rows with n > k
    session.kept_by_layer[layer] += kept.sum()
    session.rows_by_layer[layer] += kept.numel()


class ResidualNorms:
    """Records each row's ||h||² at every decoder layer's input (the residual stream).

    A context manager around a profile session with the "residual" objective:
    a forward pre-hook on every decoder layer (a module holding `self_attn`
    with a `layer_idx`) stores the current sequence's per-row norms in
    `residual_sq` and counts its rows in `profile_norm`; removed on exit.
    """

    def __init__(self, model, session: CalibrationSession):
        self.session = session
        self.layers = {m.self_attn.layer_idx: m for m in model.modules()
                       if hasattr(getattr(m, "self_attn", None), "layer_idx")}
        if len(self.layers) != session.num_layers:
            raise ValueError(f"found {len(self.layers)} decoder layers with self_attn, the model has "
                             f"{session.num_layers}: use --budget-objective attention")
        for module in self.layers.values():
            output_projection(session, module.self_attn)  # refuses a layer without o_proj now, not mid-run
        self.handles = []

    def __enter__(self):
        for layer, module in self.layers.items():
            self.handles.append(module.register_forward_pre_hook(self._hook(layer), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _hook(self, layer: int):
        def add_norm(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]  # [B, T, hidden]
            row_sq = hidden.double().pow(2).sum(-1)
            self.session.residual_sq[layer] = row_sq.clamp(min=torch.finfo(torch.float64).tiny)
            self.session.profile_norm[layer] += row_sq.numel()
        return add_norm


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPL_NAME, topt_calibrate_attention)
