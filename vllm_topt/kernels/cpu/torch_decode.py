"""Batched Top-θ decode over vLLM's CPU paged KV cache (vectorised torch).

K is read in full (gathered per sequence, as every score is needed); V is read
only for the (sequence, KV head, block) triples where at least one query head
of the group keeps at least one row (SPEC §5). VMC takes the mean of V from
per-block V sums kept beside the cache (`update_v_block_sums`), so it never
reads V rows that were dropped; block-wise VMC weights each block's mean by
the mass it dropped.
"""

from __future__ import annotations

import torch

from vllm_topt.method.rules import DensityCounts, Placement, Sdc, ToptRule

# Layouts of one K block inside vLLM's CPU cache, by attention ISA:
# "vec"/"vec16" store K transposed ([head_size, block_size]) for the dot products.
KEY_LAYOUT_TRANSPOSED = "transposed"
KEY_LAYOUT_ROWS = "rows"


def gather_scores(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    key_layout: str,
    scale: float,
) -> torch.Tensor:
    """Scores of every decode query against its sequence's blocks.

    query: [B, H, d]; key_cache: [num_blocks, H_kv, block_size, d] (a view of
    the CPU cache); block_table: [B, nb]. Returns [B, H_kv, G, nb * block_size]
    in float32 (positions past a sequence's length are garbage; mask them).
    """
    B, H, d = query.shape
    _, H_kv, bs, _ = key_cache.shape
    nb = block_table.shape[1]
    G = H // H_kv
    q = query.float().view(B, H_kv, 1, G, d)
    # One gather of the sequence's K blocks, per KV head: [B, H_kv, nb, bs, d].
    k_blocks = key_cache[block_table[:, None, :], torch.arange(H_kv)[None, :, None]].float()
    if key_layout == KEY_LAYOUT_TRANSPOSED:
        k_blocks = k_blocks.view(B, H_kv, nb, d, bs)  # each block is stored as [d, bs]
    else:
        k_blocks = k_blocks.transpose(-1, -2)
    scores = torch.matmul(q, k_blocks)  # [B, H_kv, nb, G, bs], K read once
    return scores.transpose(2, 3).reshape(B, H_kv, G, nb * bs).mul_(scale)


def topt_decode_paged(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    theta: torch.Tensor | None,
    rule: ToptRule,
    scale: float,
    key_layout: str = KEY_LAYOUT_TRANSPOSED,
    v_block_sums: torch.Tensor | None = None,
    logits_soft_cap: float | None = None,
) -> tuple[torch.Tensor, DensityCounts]:
    """Top-θ attention for B decode queries (one per sequence).

    theta: [B, H] thresholds for each sequence's length (None when dense).
    v_block_sums: [num_blocks, H_kv, d] float32, needed for VMC.
    Returns the output [B, H, d] (query dtype) and the density counts.
    """
    B, H, d = query.shape
    _, H_kv, bs, _ = value_cache.shape
    G = H // H_kv
    seq_lens = seq_lens.long()
    nb = int((int(seq_lens.max()) + bs - 1) // bs)
    table = block_table[:, :nb].long()

    scores = gather_scores(query, key_cache, table, key_layout, scale)
    if logits_soft_cap:
        scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
    N = nb * bs
    visible = (torch.arange(N) < seq_lens[:, None])[:, None, None, :]  # [B, 1, 1, N]
    scores.masked_fill_(~visible, float("-inf"))
    m = scores.amax(dim=-1, keepdim=True)
    e = torch.exp(scores - m)  # 0 past each sequence's length
    S = e.sum(dim=-1, keepdim=True)

    sparse = not rule.dense and theta is not None
    short = seq_lens <= rule.k  # n <= k: never sparsified
    if sparse:
        th = theta.float().view(B, H_kv, G, 1)
        p = e / S
        # Invisible positions have p = 0 < θ and s = -inf, so they are never kept.
        keep = (p > th) if rule.placement is Placement.POST_SOFTMAX else (scores > th)
        if bool(short.any()):
            keep[short] = visible[short].expand(-1, H_kv, G, N)
        if rule.placement is Placement.POST_SOFTMAX:
            weights = p.masked_fill_(~keep, 0.0)  # kept elements keep their dense p
        else:
            weights = _pre_softmax_weights(e, S, m, keep, visible, th, rule)
    else:
        keep = visible.expand(B, H_kv, G, N)
        weights = e.div_(S)

    rows_needed = keep.any(dim=2)  # [B, H_kv, N]: GQA union
    blocks_needed = rows_needed.view(B, H_kv, nb, bs).any(dim=3)  # [B, H_kv, nb]
    out = _weighted_v_sum(weights, blocks_needed, value_cache, table, G, bs, d)
    if sparse and rule.vmc:
        if v_block_sums is None:
            raise ValueError("VMC needs per-block V sums (v_block_sums)")
        rest = 1.0 - weights.sum(dim=-1, keepdim=True)
        if rule.block_vmc:
            dropped = e.masked_fill(keep, 0.0).view(B, H_kv, G, nb, bs).sum(dim=-1)  # d_b, up to 1 / S
            out += rest * _block_v_mean(dropped, v_block_sums, table, seq_lens, bs)
        else:
            out += rest * _v_mean(v_block_sums, table, seq_lens, bs)[:, :, None]
    counts = _density_counts(keep, rows_needed, blocks_needed, seq_lens, short, sparse, rule.k, H, bs)
    return out.reshape(B, H, d).to(query.dtype), counts


def _pre_softmax_weights(e, S, m, keep, visible, th, rule: ToptRule) -> torch.Tensor:
    """SPEC §4 for pre-softmax placement: kept exp-scores over S_K + D."""
    e_kept = e.masked_fill(~keep, 0.0)
    S_K = e_kept.sum(dim=-1, keepdim=True)
    if rule.sdc is Sdc.EXACT:
        D = S - S_K
    elif rule.sdc is Sdc.EXP_THRESHOLD:
        dropped = (visible & ~keep).sum(dim=-1, keepdim=True).to(e.dtype)
        D = dropped * torch.exp(th - m)
    else:
        D = torch.zeros_like(S_K)
    return e_kept.div_((S_K + D).clamp(min=torch.finfo(e.dtype).tiny))


def _weighted_v_sum(weights, blocks_needed, value_cache, table, G, bs, d) -> torch.Tensor:
    """Σ_j w_j v_j reading only the V blocks marked needed."""
    B, H_kv, nb = blocks_needed.shape
    b, h, j = blocks_needed.nonzero(as_tuple=True)
    v_sel = value_cache[table[b, j], h]  # [M, bs, d]: the only V reads
    w_sel = weights.view(B, H_kv, G, nb, bs)[b, h, :, j]  # [M, G, bs]
    contrib = torch.bmm(w_sel, v_sel.float())  # [M, G, d]
    out = torch.zeros(B * H_kv, G, d, dtype=torch.float32)
    out.index_add_(0, b * H_kv + h, contrib)
    return out.view(B, H_kv, G, d)


def _v_mean(v_block_sums, table, seq_lens, bs) -> torch.Tensor:
    """mean(v_1..v_n) per (sequence, KV head) from per-block sums: O(blocks · d)."""
    nb = table.shape[1]
    used = (torch.arange(nb) * bs < seq_lens[:, None]).float()  # [B, nb]
    sums = (v_block_sums[table] * used[:, :, None, None]).sum(dim=1)  # [B, H_kv, d]
    return sums / seq_lens[:, None, None].float()


def _block_v_mean(dropped, v_block_sums, table, seq_lens, bs) -> torch.Tensor:
    """Block-wise VMC's mean (SPEC §4): Σ_b d_b · mean(V of b) / Σ_b d_b, [B, H_kv, G, d].

    dropped: [B, H_kv, G, nb], each block's dropped mass (any common scale).
    """
    nb = table.shape[1]
    rows = (seq_lens[:, None] - torch.arange(nb) * bs).clamp(min=1, max=bs).float()  # [B, nb]
    means = v_block_sums[table] / rows[:, :, None, None]  # [B, nb, H_kv, d]
    share = dropped / dropped.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(dropped.dtype).tiny)
    return torch.matmul(share, means.transpose(1, 2))  # [B, H_kv, G, d]


def _density_counts(keep, rows_needed, blocks_needed, seq_lens, short, sparse, k, H, bs) -> DensityCounts:
    long_rows = ~short if sparse else torch.zeros_like(short)
    kept, rows_read, blocks_read, kept_long = torch.stack(
        [keep.sum(), rows_needed.sum(), blocks_needed.sum(), keep[long_rows].sum()]
    ).tolist()
    return batch_density_counts(seq_lens, long_rows, H, rows_needed.shape[1], bs, k, kept, rows_read, blocks_read, kept_long)


def batch_density_counts(
    seq_lens, sparse_rows, H, H_kv, bs, k, kept, rows_read, blocks_read, kept_thresholded
) -> DensityCounts:
    """SPEC §7 counts of a decode batch from what the kernel read and kept.

    seq_lens: [B]; sparse_rows: [B] bool, the rows the threshold applied to.
    """
    keys, blocks, thresholded_seqs = torch.stack(
        [seq_lens.sum(), ((seq_lens + bs - 1) // bs).sum(), sparse_rows.sum()]
    ).tolist()
    return density_counts_from_totals(
        seq_lens.shape[0], keys, blocks, thresholded_seqs, H, H_kv, k, kept, rows_read, blocks_read, kept_thresholded
    )


def density_counts_from_totals(
    rows, keys, blocks, thresholded_seqs, H, H_kv, k, kept, rows_read, blocks_read, kept_thresholded
) -> DensityCounts:
    """SPEC §7 counts from batch totals: keys = Σ n, blocks = Σ ceil(n / bs)."""
    return DensityCounts(
        rows=rows,
        elements_visible=keys * H,
        elements_kept=kept,
        v_rows_visible=keys * H_kv,
        v_rows_read=rows_read,
        v_blocks_visible=blocks * H_kv,
        v_blocks_read=blocks_read,
        thresholded_rows=thresholded_seqs * H,
        thresholded_kept=kept_thresholded,
        thresholded_target=thresholded_seqs * H * k,
    )


def update_v_block_sums(
    v_block_sums: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor, block_size: int
) -> None:
    """Keep Σ v per (block, KV head) as the cache is written.

    A block is (re)filled from offset 0, so a write at offset 0 starts its sum
    afresh; prefix-cached blocks are never rewritten and keep their sums.
    """
    n = slot_mapping.shape[0]
    slots = slot_mapping.long()
    valid = slots >= 0
    if not bool(valid.all()):
        slots, value = slots[valid], value[:n][valid]
    blocks = slots // block_size
    fresh = blocks[slots % block_size == 0]
    v_block_sums[fresh] = 0.0
    v_block_sums.index_add_(0, blocks, value[: slots.shape[0]].float())
