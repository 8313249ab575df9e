"""Top-θ decode attention over vLLM's CUDA paged KV cache, in Triton.

One query token per sequence (a decode row), a ragged batch (`seq_lens`), the
cache as TRITON_ATTN stores it: `key_cache`, `value_cache` are strided views
`[num_blocks, block_size, H_kv, d]` (see `benchmarks.cuda_paged`), pages
named by `block_table`. docs/SPEC.md is the meaning; `vllm_topt.method.reference`
is the source of truth the tests compare against.

Three launches, grid (sequence, KV head, segment) for the first two; one
program serves every query head of a KV group, so K is loaded once per group
and the group's heads go through `tl.dot` together (padded to >= 16 rows):

1. scores: read K in full; per head the segment's running max and exp-sum
   (online softmax) and, per page, the max score (and, for block-wise VMC, the
   page's log-sum-exp). With sparsity disabled it also accumulates V (split-K
   flash decoding): the dense path of the same kernel.
2. (sparse layers only) combine the segments' max and sum into the row's
   m and S; a page survives if any head of the group keeps any of its rows
   (SPEC §5, the GQA union), decided from the page max scores; only
   surviving pages are read (K again, to recompute their scores, and V).
   Rows with n <= k keep everything. VMC reads per-block V sums, never V;
   block-wise VMC weights each page's mean by the mass the page dropped
   (from the recomputed scores where the page is read, else from its
   log-sum-exp).
3. combine the segments' partial sums; SDC / VMC (SPEC §4); write the output
   and add the SPEC §7 counters to a device tensor (atomics, no host sync).

`topt_decode` launches them; `DeviceThresholds` looks θ(n) up on the device;
`update_v_block_sums` keeps the per-block V sums at KV-write time.
Nothing here imports vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vllm_topt.method.rules import (
    COUNTER_FIELDS,
    DENSE_MODE_CODE,
    NUM_COUNTERS,
    DensityCounts,
    Placement,
    Sdc,
    ToptRule,
)

# Codes and counter slots the kernels compare against, from the one definition in `method.rules`.
_SDC_EXACT = tl.constexpr(Sdc.EXACT.code)
_SDC_EXP_THRESHOLD = tl.constexpr(Sdc.EXP_THRESHOLD.code)
_NUM_COUNTERS = tl.constexpr(NUM_COUNTERS)
_ROWS, _ELEMENTS_VISIBLE, _ELEMENTS_KEPT, _V_ROWS_VISIBLE, _V_ROWS_READ, _V_BLOCKS_VISIBLE, _V_BLOCKS_READ, \
    _THRESHOLDED_ROWS, _THRESHOLDED_KEPT, _THRESHOLDED_TARGET = (
        tl.constexpr(COUNTER_FIELDS.index(name)) for name in (
            "rows", "elements_visible", "elements_kept", "v_rows_visible", "v_rows_read", "v_blocks_visible",
            "v_blocks_read", "thresholded_rows", "thresholded_kept", "thresholded_target"))
SUPPORTED_HEAD_SIZES = (64, 128, 256)
SUPPORTED_BLOCK_SIZES = (16, 32, 64)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_SEGMENTS = 64
_FLT_MIN = tl.constexpr(1.1754943508222875e-38)  # smallest normal float32: a denominator's floor
SPARSE_MAXNREG = 192
SCORES_MAXNREG_BLOCK_VMC = 64
# fp32 dots hold twice the registers: above head size 64 the sparse kernel spills hundreds of bytes to
# kilobytes on sm_80/sm_90 (Triton 3.6: d=128 with block-wise VMC; Triton 3.9: d=128 at 64-token blocks, d=256
# always) whatever its register ceiling or tile (python -m vllm_topt.kernels.triton.aot --full); such layers
# are refused rather than served slowly.
FP32_MAX_HEAD_SIZE = 64


@triton.jit
def _topt_scores_kernel(
    Q, K, V, BT, SEQ, BMAX, PM, PL, PACC,
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt, stride_bmb, stride_bmh,
    stride_pb, stride_ph,
    scale, soft_cap, stride_bmp,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    BS: tl.constexpr, PAGES: tl.constexpr, NSEG: tl.constexpr,
    SOFTCAP: tl.constexpr, DENSE: tl.constexpr, BLOCK_VMC: tl.constexpr, DOT_FP32: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Phase 1: per (sequence, KV head, segment): m, Σexp per head; page max scores (or dense V sums).

    Block-wise VMC: BMAX + stride_bmp (a plane of the same buffer) gets each page's log-sum-exp.
    (stride_bmp is the last runtime argument so that the other rules' kernels compile as before.)"""
    TILE: tl.constexpr = PAGES * BS
    b = tl.program_id(0)
    g = tl.program_id(1)
    seg = tl.program_id(2)
    n = tl.load(SEQ + b)
    num_pages = (n + BS - 1) // BS
    num_tiles = (num_pages + PAGES - 1) // PAGES
    per_seg = (num_tiles + NSEG - 1) // NSEG
    t_lo = seg * per_seg
    t_hi = tl.minimum(t_lo + per_seg, num_tiles)

    i = tl.arange(0, GP)
    head_ok = i < G
    h = g * G + i
    d = tl.arange(0, DP)
    d_ok = d < D
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + d[None, :], mask=head_ok[:, None] & d_ok[None, :],
                other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    tok_in = tl.arange(0, TILE)
    pg_in = tl.arange(0, PAGES)

    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DP], tl.float32)
    for t in range(t_lo, t_hi):
        tok = t * TILE + tok_in
        tok_ok = tok < n
        blk = tl.load(BT + b * stride_bt + tok // BS, mask=tok_ok, other=0).to(tl.int64)
        slot = tok % BS
        k = tl.load(
            K + blk[:, None] * stride_kb + slot[:, None] * stride_ks + g * stride_kh + d[None, :],
            mask=tok_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if DOT_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale
        if SOFTCAP:
            # cap * tanh(s / cap), tanh written with exp (no libdevice in the interpreter).
            s = soft_cap * (1.0 - 2.0 / (tl.exp(2.0 * s / soft_cap) + 1.0))
        s = tl.where(tok_ok[None, :], s, float("-inf"))
        if not DENSE:
            page_max = tl.max(tl.reshape(s, (GP, PAGES, BS)), axis=2)
            pg = t * PAGES + pg_in
            # One writer per (row, head, page): segments own disjoint tiles, programs disjoint heads. The
            # sparse kernel reads these (and the log-sum-exps below) in a later launch on the same
            # stream, so after this one ends: plain stores, no barrier.
            tl.store(BMAX + b * stride_bmb + h[:, None] * stride_bmh + pg[None, :], page_max,
                     mask=head_ok[:, None] & (pg < num_pages)[None, :])
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile holds a visible key
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if BLOCK_VMC:
            # What a page no head reads drops: all of its mass. From p, so no extra exp per key
            # (pages past the row: 1, not log(0)).
            page_ok = head_ok[:, None] & (pg < num_pages)[None, :]
            page_sum = tl.where(page_ok, tl.sum(tl.reshape(p, (GP, PAGES, BS)), axis=2), 1.0)
            page_lse = m_new[:, None] + tl.log(page_sum)
            tl.store(BMAX + stride_bmp + b * stride_bmb + h[:, None] * stride_bmh + pg[None, :], page_lse,
                     mask=page_ok)
        if DENSE:
            v = tl.load(
                V + blk[:, None] * stride_vb + slot[:, None] * stride_vs + g * stride_vh + d[None, :],
                mask=tok_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            if DOT_FP32:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=DOT_PREC)
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # Stored by every program, an empty segment's too (m = -inf, sums 0), so the later launches
    # that combine all NSEG slots never read a stale one.
    part = b * stride_pb + h * stride_ph + seg
    tl.store(PM + part, m_i, mask=head_ok)
    tl.store(PL + part, l_i, mask=head_ok)
    if DENSE:
        tl.store(PACC + part[:, None] * DP + d[None, :], acc, mask=head_ok[:, None])


@triton.jit
def _page_alive(page_max, m, S, theta, head_ok, pg_ok, POST: tl.constexpr):
    """[PAGES] 1 where some head of the group keeps a row of the page (GQA union), else 0.

    The sparse kernel's element test on the page's best score."""
    if POST:
        alive = tl.exp(page_max - m[:, None]) / S[:, None] > theta[:, None]
    else:
        alive = page_max > theta[:, None]
    alive = alive & head_ok[:, None] & pg_ok[None, :]
    return tl.max(alive.to(tl.int32), axis=0)


@triton.jit
def _topt_sparse_kernel(
    Q, K, V, BT, SEQ, THETA, VSUM, BMAX, PM, PL, PACC, PSK, PKEPT, PVSUM, PVMEAN, PDROP, PROWS, PPAGES, MODE,
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt, stride_bmb, stride_bmh,
    stride_pb, stride_ph, stride_kvpb, stride_kvph,
    stride_thb, stride_vsb, stride_vsh,
    scale, soft_cap, k_target, stride_bmp,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    BS: tl.constexpr, PAGES: tl.constexpr, NSEG: tl.constexpr,
    SOFTCAP: tl.constexpr, POST: tl.constexpr, VMC: tl.constexpr, BLOCK_VMC: tl.constexpr,
    ROW_GATHER: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PREC: tl.constexpr, DENSE_MODE: tl.constexpr,
):
    """Phase 2: per (sequence, KV head, segment): read only surviving pages; partial Σ w v, Σ w, counts.

    VMC's partial sums: Σ of the pages' V sums per KV head (PVSUM); block-wise, per head
    Σ_b d_b · mean(V of b) (PVMEAN) and Σ_b d_b (PDROP), d_b the mass page b dropped in units of
    exp(s - m), which replaces a read page's log-sum-exp at BMAX + stride_bmp."""
    TILE: tl.constexpr = PAGES * BS
    b = tl.program_id(0)
    g = tl.program_id(1)
    seg = tl.program_id(2)
    n = tl.load(SEQ + b)
    num_pages = (n + BS - 1) // BS
    num_tiles = (num_pages + PAGES - 1) // PAGES
    per_seg = (num_tiles + NSEG - 1) // NSEG
    t_lo = seg * per_seg
    t_hi = tl.minimum(t_lo + per_seg, num_tiles)

    i = tl.arange(0, GP)
    head_ok = i < G
    h = g * G + i
    d = tl.arange(0, DP)
    d_ok = d < D
    # Every segment's m and Σexp come from the scores kernel, an earlier launch on the same
    # stream: complete here, whichever program wrote them.
    # The row's max m and exp-sum S per head, combined over the segments.
    seg_part = b * stride_pb + h[:, None] * stride_ph + tl.arange(0, NSEG)[None, :]
    seg_m = tl.load(PM + seg_part, mask=head_ok[:, None], other=float("-inf"))
    m = tl.max(seg_m, axis=1)
    m = tl.where(m > float("-inf"), m, 0.0)  # empty rows (n = 0)
    S = tl.sum(tl.load(PL + seg_part, mask=head_ok[:, None], other=0.0) * tl.exp(seg_m - m[:, None]), axis=1)
    S = tl.where(S > 0.0, S, 1.0)
    # Rows with n <= k keep everything (SPEC §2), and so do the rows of requests that asked to decode dense
    # (MODE == DENSE_MODE): a threshold nothing falls below. Other modes bring their own θ (THETA's row).
    sparse_row = (n > k_target) & (tl.load(MODE + b) != DENSE_MODE)
    lowest = -1.0 if POST else float("-inf")
    theta = tl.load(THETA + b * stride_thb + h, mask=head_ok, other=0.0)
    theta = tl.where(sparse_row, theta, lowest)
    vmc_pages = tl.where(sparse_row, num_pages, 0)  # VMC applies to thresholded rows only

    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + d[None, :], mask=head_ok[:, None] & d_ok[None, :],
                other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    tok_in = tl.arange(0, TILE)
    pg_in = tl.arange(0, PAGES)
    acc = tl.zeros([GP, DP], tl.float32)
    s_kept = tl.zeros([GP], tl.float32)
    n_kept = tl.zeros([GP], tl.int32)
    rows_read = tl.zeros([TILE], tl.int32)
    pages_read = tl.zeros([PAGES], tl.int32)
    v_sum = tl.zeros([DP], tl.float32)
    for t in range(t_lo, t_hi):
        pg = t * PAGES + pg_in
        pg_ok = pg < num_pages
        page_max = tl.load(BMAX + b * stride_bmb + h[:, None] * stride_bmh + pg[None, :],
                           mask=head_ok[:, None] & pg_ok[None, :], other=float("-inf"))
        page_alive = _page_alive(page_max, m, S, theta, head_ok, pg_ok, POST)
        if VMC and not BLOCK_VMC:
            vmc_ok = pg < vmc_pages
            pblk = tl.load(BT + b * stride_bt + pg, mask=vmc_ok, other=0).to(tl.int64)
            sums = tl.load(VSUM + pblk[:, None] * stride_vsb + g * stride_vsh + d[None, :],
                           mask=vmc_ok[:, None] & d_ok[None, :], other=0.0)
            v_sum += tl.sum(sums, axis=0)
        if tl.max(page_alive, axis=0) > 0:
            tok = t * TILE + tok_in
            tok_alive = tl.reshape(tl.broadcast_to(page_alive[:, None], (PAGES, BS)), (TILE,)) > 0
            tok_ok = tok_alive & (tok < n)
            blk = tl.load(BT + b * stride_bt + tok // BS, mask=tok_ok, other=0).to(tl.int64)
            slot = tok % BS
            k = tl.load(
                K + blk[:, None] * stride_kb + slot[:, None] * stride_ks + g * stride_kh + d[None, :],
                mask=tok_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            if DOT_FP32:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale
            if SOFTCAP:
                # cap * tanh(s / cap), tanh written with exp (no libdevice in the interpreter).
                s = soft_cap * (1.0 - 2.0 / (tl.exp(2.0 * s / soft_cap) + 1.0))
            s = tl.where(tok_ok[None, :], s, float("-inf"))
            e = tl.exp(s - m[:, None])
            if POST:
                keep = e / S[:, None] > theta[:, None]
            else:
                keep = s > theta[:, None]
            keep = keep & tok_ok[None, :] & head_ok[:, None]
            w = tl.where(keep, e, 0.0)
            s_kept += tl.sum(w, axis=1)
            if BLOCK_VMC:
                # A read page's dropped mass replaces its log-sum-exp (read back after the loop).
                lost = tl.sum(tl.reshape(tl.where(keep, 0.0, e), (GP, PAGES, BS)), axis=2)
                # Only this program writes (or reads) these pages in this launch: its segment's, its heads'.
                tl.store(BMAX + stride_bmp + b * stride_bmb + h[:, None] * stride_bmh + pg[None, :], lost,
                         mask=head_ok[:, None] & (page_alive > 0)[None, :])
            keep_i = keep.to(tl.int32)
            n_kept += tl.sum(keep_i, axis=1)
            row_needed = tl.max(keep_i, axis=0)  # [TILE]
            rows_read += row_needed
            pages_read += tl.max(tl.reshape(row_needed, (PAGES, BS)), axis=1)
            if ROW_GATHER:
                v_ok = (row_needed > 0) & tok_ok
            else:
                v_ok = tok_ok
            v = tl.load(
                V + blk[:, None] * stride_vb + slot[:, None] * stride_vs + g * stride_vh + d[None, :],
                mask=v_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            if DOT_FP32:
                acc += tl.dot(w, v.to(tl.float32), input_precision=DOT_PREC)
            else:
                acc += tl.dot(w.to(v.dtype), v)

    part = b * stride_pb + h * stride_ph + seg
    tl.store(PACC + part[:, None] * DP + d[None, :], acc, mask=head_ok[:, None])
    tl.store(PSK + part, s_kept, mask=head_ok)
    tl.store(PKEPT + part, n_kept, mask=head_ok)
    kv_part = b * stride_kvpb + g * stride_kvph + seg
    tl.store(PROWS + kv_part, tl.sum(rows_read, axis=0))
    tl.store(PPAGES + kv_part, tl.sum(pages_read, axis=0))
    if BLOCK_VMC:
        # A second pass over the pages, once acc is stored: beside acc, a second [GP, DP] accumulator
        # would cost the main loop ~25 registers.
        # The barrier (bar.sync: every thread of this program waits, and its earlier global stores
        # become visible to the others) orders the main loop's dropped-mass stores before the loads
        # below: the thread that stored an element need not be the one that loads it (the layouts
        # differ). No other program touches these pages, so nothing wider is needed. The loads take
        # a stored mass exactly where the main loop stored one: page_alive is recomputed from the
        # same inputs.
        tl.debug_barrier()  # the dropped masses stored above, by other threads
        v_mean = tl.zeros([GP, DP], tl.float32)
        dropped = tl.zeros([GP], tl.float32)
        for t in range(t_lo, t_hi):
            pg = t * PAGES + pg_in
            vmc_ok = pg < vmc_pages
            page_at = b * stride_bmb + h[:, None] * stride_bmh + pg[None, :]
            ok = head_ok[:, None] & vmc_ok[None, :]
            page_max = tl.load(BMAX + page_at, mask=ok, other=float("-inf"))
            page_alive = _page_alive(page_max, m, S, theta, head_ok, vmc_ok, POST)
            # A page no head reads dropped all of its mass: exp(log-sum-exp - m).
            x = tl.load(BMAX + stride_bmp + page_at, mask=ok, other=0.0)
            lost = tl.where(page_alive[None, :] > 0, x, tl.where(ok, tl.exp(x - m[:, None]), 0.0))
            pblk = tl.load(BT + b * stride_bt + pg, mask=vmc_ok, other=0).to(tl.int64)
            sums = tl.load(VSUM + pblk[:, None] * stride_vsb + g * stride_vsh + d[None, :],
                           mask=vmc_ok[:, None] & d_ok[None, :], other=0.0)
            rows = tl.maximum(tl.minimum(n - pg * BS, BS), 1)  # the page's visible rows (the last is partial)
            v_mean += tl.sum(lost[:, :, None] * (sums / rows[:, None].to(tl.float32))[None, :, :], axis=1)
            dropped += tl.sum(lost, axis=1)
        tl.store(PVMEAN + part[:, None] * DP + d[None, :], v_mean, mask=head_ok[:, None])
        tl.store(PDROP + part, dropped, mask=head_ok)
    elif VMC:
        tl.store(PVSUM + kv_part * DP + d, v_sum)


@triton.jit
def _topt_combine_kernel(
    OUT, SEQ, THETA, PM, PL, PACC, PSK, PKEPT, PVSUM, PVMEAN, PDROP, PROWS, PPAGES, CNT, MODE,
    stride_ob, stride_oh, stride_pb, stride_ph, stride_kvpb, stride_kvph, stride_thb, stride_cnt, stride_cnt_mode,
    k_target,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BS: tl.constexpr,
    NSEG: tl.constexpr, DENSE: tl.constexpr, POST: tl.constexpr, SDC: tl.constexpr, VMC: tl.constexpr,
    BLOCK_VMC: tl.constexpr, COUNT: tl.constexpr, DENSE_MODE: tl.constexpr,
):
    """Phase 3: per (sequence, KV head): combine segments, compensate, write output and counters."""
    b = tl.program_id(0)
    g = tl.program_id(1)
    n = tl.load(SEQ + b)
    num_pages = (n + BS - 1) // BS
    i = tl.arange(0, GP)
    head_ok = i < G
    h = g * G + i
    d = tl.arange(0, DP)
    d_ok = d < D
    segs = tl.arange(0, NSEG)
    # The row's max m and exp-sum S per head, combined over the segments.
    seg_part = b * stride_pb + h[:, None] * stride_ph + tl.arange(0, NSEG)[None, :]
    seg_m = tl.load(PM + seg_part, mask=head_ok[:, None], other=float("-inf"))
    m = tl.max(seg_m, axis=1)
    m = tl.where(m > float("-inf"), m, 0.0)  # empty rows (n = 0)
    S = tl.sum(tl.load(PL + seg_part, mask=head_ok[:, None], other=0.0) * tl.exp(seg_m - m[:, None]), axis=1)
    S = tl.where(S > 0.0, S, 1.0)
    mode = tl.load(MODE + b)  # the row's request mode (DENSE_MODE: it asked to decode dense)
    sparse_row = (n > k_target) & (mode != DENSE_MODE)

    # PM, PL above and the partials below come from the earlier launches on the same stream (the
    # scores kernel, and the sparse kernel on sparse layers): complete here, nothing to synchronise.
    acc = tl.zeros([GP, DP], tl.float32)
    dropped_v = tl.zeros([GP, DP], tl.float32)  # block-wise VMC: Σ_b d_b · mean(V of b)
    dropped = tl.zeros([GP], tl.float32)  # and Σ_b d_b
    for sg in range(NSEG):
        part = b * stride_pb + h * stride_ph + sg
        if DENSE:
            l_s = tl.load(PL + part, mask=head_ok, other=0.0)
            m_s = tl.load(PM + part, mask=head_ok, other=float("-inf"))
            x = tl.load(PACC + part[:, None] * DP + d[None, :], mask=(head_ok & (l_s > 0.0))[:, None], other=0.0)
            acc += x * tl.exp(m_s - m)[:, None]
        else:
            sk_s = tl.load(PSK + part, mask=head_ok, other=0.0)
            acc += tl.load(PACC + part[:, None] * DP + d[None, :], mask=(head_ok & (sk_s > 0.0))[:, None],
                           other=0.0)
        if BLOCK_VMC:
            # A segment that dropped nothing adds nothing to Σ_b d_b · mean_b.
            d_s = tl.load(PDROP + part, mask=head_ok, other=0.0)
            dropped += d_s
            dropped_v += tl.load(PVMEAN + part[:, None] * DP + d[None, :], mask=(head_ok & (d_s > 0.0))[:, None],
                                 other=0.0)

    kv_part = b * stride_kvpb + g * stride_kvph + segs
    if DENSE:
        out = acc / S[:, None]
        kept = n * G
        rows_read = n
        pages_read = num_pages
    else:
        part = b * stride_pb + h[:, None] * stride_ph + segs[None, :]
        s_kept = tl.sum(tl.load(PSK + part, mask=head_ok[:, None], other=0.0), axis=1)
        n_kept = tl.sum(tl.load(PKEPT + part, mask=head_ok[:, None], other=0), axis=1)
        if POST:
            denom = S
        else:
            if SDC == _SDC_EXACT:  # exact: the dropped mass itself
                dropped_mass = S - s_kept
            elif SDC == _SDC_EXP_THRESHOLD:  # exp-threshold: (n - |K|) exp(θ - m)
                theta = tl.load(THETA + b * stride_thb + h, mask=head_ok, other=0.0)
                n_dropped = (n - n_kept).to(tl.float32)
                dropped_mass = tl.where(n_dropped > 0.0, n_dropped * tl.exp(theta - m), 0.0)
            else:
                dropped_mass = tl.zeros([GP], tl.float32)
            denom = tl.maximum(s_kept + dropped_mass, _FLT_MIN)
        out = acc / denom[:, None]
        if VMC:
            # VMC on rows the threshold applied to; elsewhere the kept weights sum to 1.
            if BLOCK_VMC:
                # Each page's mean in proportion to the mass it dropped (nothing dropped: no term).
                v_mean = dropped_v / tl.maximum(dropped, _FLT_MIN)[:, None]
            else:
                v_sum = tl.sum(tl.load(PVSUM + kv_part[:, None] * DP + d[None, :]), axis=0)
                v_mean = (v_sum / tl.maximum(n, 1).to(tl.float32))[None, :]
            weight = tl.where(sparse_row, 1.0 - s_kept / denom, 0.0)
            out += weight[:, None] * v_mean
        kept = tl.sum(tl.where(head_ok, n_kept, 0), axis=0)
        rows_read = tl.sum(tl.load(PROWS + kv_part), axis=0)
        pages_read = tl.sum(tl.load(PPAGES + kv_part), axis=0)

    out = tl.where(n > 0, out, 0.0)
    tl.store(OUT + b * stride_ob + h[:, None] * stride_oh + d[None, :], out.to(OUT.dtype.element_ty),
             mask=head_ok[:, None] & d_ok[None, :])

    if COUNT:
        # One vector atomic of the counters (COUNTER_FIELDS order); padding rows (n = 0) add nothing.
        f = tl.arange(0, 16)
        val = tl.where(f == _ROWS, (g == 0).to(tl.int64), 0)
        val = tl.where(f == _ELEMENTS_VISIBLE, (n * G).to(tl.int64), val)
        val = tl.where(f == _ELEMENTS_KEPT, kept.to(tl.int64), val)
        val = tl.where(f == _V_ROWS_VISIBLE, n.to(tl.int64), val)
        val = tl.where(f == _V_ROWS_READ, rows_read.to(tl.int64), val)
        val = tl.where(f == _V_BLOCKS_VISIBLE, num_pages.to(tl.int64), val)
        val = tl.where(f == _V_BLOCKS_READ, pages_read.to(tl.int64), val)
        if not DENSE:
            thresholded = tl.where(sparse_row, 1, 0).to(tl.int64)
            val = tl.where(f == _THRESHOLDED_ROWS, G * thresholded, val)
            val = tl.where(f == _THRESHOLDED_KEPT, kept.to(tl.int64) * thresholded, val)
            val = tl.where(f == _THRESHOLDED_TARGET, (k_target * G) * thresholded, val)
        # Atomic because several programs add to one counter row: a row's KV heads, and with a row
        # stride of 0 every row of the batch. Integer adds commute, so the sums are exact in any
        # order; nothing in this launch reads the counters (the host or a later launch does, after
        # it, in stream order), so no ordering between programs is needed.
        num_fields = tl.where(n > 0, _NUM_COUNTERS, 0)
        # A row in request mode m counts m * stride_cnt_mode further on (the bank's plane of that mode).
        tl.atomic_add(CNT + b * stride_cnt + mode * stride_cnt_mode + f, val, mask=f < num_fields)


# Decided when this module is imported (TRITON_INTERPRET=1 then): the kernels run on CPU
# tensors in the Triton interpreter, whose bf16/fp16 tl.dot is unreliable, so dots go fp32.
INTERPRETED = type(_topt_scores_kernel).__name__ == "InterpretedFunction"


@dataclass
class SegmentBuffers:
    """One launch's views of the scratch: per segment partial results."""

    seg_max: torch.Tensor  # [B, H, S] float32
    seg_sum: torch.Tensor  # [B, H, S] float32
    seg_acc: torch.Tensor  # [B, H, S, d_pad] float32
    seg_kept_mass: torch.Tensor  # [B, H, S] float32
    seg_kept: torch.Tensor  # [B, H, S] int32
    seg_rows: torch.Tensor  # [B, H_kv, S] int32
    seg_pages: torch.Tensor  # [B, H_kv, S] int32
    seg_vsum: torch.Tensor  # [B, H_kv, S, d_pad] float32
    seg_vmean: torch.Tensor | None  # block-wise VMC: [B, H, S, d_pad] float32, Σ_b d_b · mean(V of b)
    seg_dropped: torch.Tensor | None  # block-wise VMC: [B, H, S] float32, Σ_b d_b


@dataclass
class ToptScratch:
    """Work buffers: allocate once (e.g. per metadata builder), reuse across layers and steps.

    Per-segment buffers are flat, sized for `capacity` = max over launches of
    batch x segments, and viewed per launch; `block_max` holds, per decode row,
    per head and per page, the page's max score ([max_batch, H, max_pages] float32).
    `block_vmc` (a layer with block-wise VMC will launch): also the pages'
    log-sum-exp and the per-segment block-VMC sums.
    """

    # [1 or, with block-wise VMC, 2, max_batch, H, max_pages]: the pages' max score and log-sum-exp, in
    # one buffer so that the kernels reach both from one pointer (a second one costs registers).
    page_stats: torch.Tensor
    num_heads: int
    num_kv_heads: int
    head_size: int
    capacity: int
    flat_f32: torch.Tensor
    flat_i32: torch.Tensor
    dummy: torch.Tensor  # stands in for absent optional inputs
    no_modes: torch.Tensor  # [max_batch] int32 zeros: every row in the server's mode (row_modes=None)

    @classmethod
    def allocate(cls, max_batch: int, num_heads: int, num_kv_heads: int, head_size: int, max_pages: int,
                 capacity: int | None = None, device="cuda", block_vmc: bool = False) -> ToptScratch:
        capacity = capacity or max_batch * MAX_SEGMENTS
        dp = triton.next_power_of_2(head_size)
        f32 = capacity * (num_heads * (3 + dp) + num_kv_heads * dp + (num_heads * (1 + dp) if block_vmc else 0))
        i32 = capacity * (num_heads + 2 * num_kv_heads)
        planes = 2 if block_vmc else 1
        return cls(
            page_stats=torch.empty(planes, max_batch, num_heads, max(max_pages, 1), dtype=torch.float32, device=device),
            num_heads=num_heads, num_kv_heads=num_kv_heads, head_size=head_size, capacity=capacity,
            flat_f32=torch.empty(f32, dtype=torch.float32, device=device),
            flat_i32=torch.empty(i32, dtype=torch.int32, device=device),
            dummy=torch.zeros(1, dtype=torch.float32, device=device),
            no_modes=torch.zeros(max_batch, dtype=torch.int32, device=device),
        )

    @property
    def block_max(self) -> torch.Tensor:
        return self.page_stats[0]

    @property
    def nbytes(self) -> int:
        """Device bytes these buffers hold."""
        return sum(t.numel() * t.element_size()
                   for t in (self.page_stats, self.flat_f32, self.flat_i32, self.dummy, self.no_modes))

    @property
    def block_vmc(self) -> bool:
        return self.page_stats.shape[0] == 2

    def segments(self, batch: int, segments: int) -> SegmentBuffers:
        if batch * segments > self.capacity:
            raise ValueError(f"TOPT scratch holds {self.capacity} (row, segment) pairs, not {batch} x {segments}")
        H, H_kv, dp = self.num_heads, self.num_kv_heads, triton.next_power_of_2(self.head_size)
        f32, i32 = _Carver(self.flat_f32, batch, segments), _Carver(self.flat_i32, batch, segments)
        return SegmentBuffers(
            seg_max=f32.take(H), seg_sum=f32.take(H), seg_kept_mass=f32.take(H), seg_acc=f32.take(H, dp),
            seg_vsum=f32.take(H_kv, dp), seg_vmean=f32.take(H, dp) if self.block_vmc else None,
            seg_dropped=f32.take(H) if self.block_vmc else None,
            seg_kept=i32.take(H), seg_rows=i32.take(H_kv), seg_pages=i32.take(H_kv),
        )

    def check(self, batch: int, num_heads: int, num_kv_heads: int, head_size: int, pages: int,
              block_vmc: bool = False):
        problems = []
        if self.block_max.shape[0] < batch:
            problems.append(f"batch {batch} > {self.block_max.shape[0]}")
        if (self.num_heads, self.num_kv_heads, self.head_size) != (num_heads, num_kv_heads, head_size):
            problems.append("head counts or head size differ")
        if self.block_max.shape[2] < pages:
            problems.append(f"{pages} pages per row > {self.block_max.shape[2]}")
        if block_vmc and not self.block_vmc:
            problems.append("block-wise VMC needs buffers allocated with block_vmc=True")
        if problems:
            raise ValueError("TOPT scratch buffers do not fit this launch: " + "; ".join(problems))


class _Carver:
    def __init__(self, flat: torch.Tensor, batch: int, segments: int):
        self.flat, self.batch, self.segments, self.offset = flat, batch, segments, 0

    def take(self, heads: int, inner: int | None = None) -> torch.Tensor:
        shape = (self.batch, heads, self.segments) + ((inner,) if inner else ())
        size = self.batch * heads * self.segments * (inner or 1)
        view = self.flat[self.offset : self.offset + size].view(shape)
        self.offset += size
        return view


def choose_num_segments(batch: int, num_kv_heads: int, max_seq_len: int | None = None, tile_tokens: int = 64,
                        target_programs: int = 528) -> int:
    """Segments per sequence so that batch x KV heads x segments fills the GPU (a power of two).

    Depends on the batch size only (plus `max_seq_len` when given): under a
    CUDA graph the launch grid is fixed at capture, so pass no `max_seq_len` there.
    """
    want = triton.cdiv(target_programs, max(batch * num_kv_heads, 1))
    if max_seq_len is not None:
        want = min(want, max(triton.cdiv(max_seq_len, 4 * tile_tokens), 1))
    return min(triton.next_power_of_2(max(want, 1)), MAX_SEGMENTS)


# --- launch configurations ----------------------------------------------------------------------------
# The one place the launchers choose constexprs and launch options: `topt_decode`,
# `DeviceThresholds.lookup` and `update_v_block_sums` call these, and so does the
# ahead-of-time compile check (`vllm_topt.kernels.triton.aot`), which therefore
# compiles exactly what the backend launches.


def dot_in_fp32(dtype: torch.dtype, kv_dtype: torch.dtype) -> bool:
    """Whether the decode kernels' dots run in fp32 (IEEE): fp32 query or cache, or the interpreter."""
    return dtype == torch.float32 or kv_dtype == torch.float32 or INTERPRETED


def fp32_refusal(head_size: int, block_size: int) -> str | None:
    """Why an fp32 layer of this head size and kernel block cannot run spill-free, or None."""
    if head_size > FP32_MAX_HEAD_SIZE:
        return (f"fp32 at head size {head_size} (its decode kernel spills registers above {FP32_MAX_HEAD_SIZE}; "
                "serve bf16 or fp16)")
    return None


def decode_tile_tokens(head_size: int, block_size: int, dot_fp32: bool, tile_tokens: int | None = None) -> int:
    """Keys per loop step of the scores and sparse kernels (a power of two >= the block size)."""
    if tile_tokens is None:
        # Keys per loop step; larger tiles spill registers at d=256 or with fp32 dots (ptxas, sm_90).
        tile_tokens = 64 if head_size <= 128 and not dot_fp32 else 32
    return max(triton.next_power_of_2(tile_tokens), block_size)


@dataclass(frozen=True)
class DecodeLaunch:
    """`topt_decode`'s kernel keyword arguments besides tensors, strides and scalars: per kernel its
    constexprs and launch options (num_warps, num_stages). `sparse` is None on the dense path."""

    tile_tokens: int
    num_segments: int
    scores: dict
    sparse: dict | None
    combine: dict


def decode_launch(
    head_size: int,
    group_size: int,
    block_size: int,
    dtype: torch.dtype,
    kv_dtype: torch.dtype,
    rule: ToptRule,
    *,
    dense: bool,
    soft_cap: bool,
    count: bool,
    num_segments: int,
    tile_tokens: int | None = None,
    row_gather: bool = False,
    num_warps: int = 8,
    num_stages: int = 2,
) -> DecodeLaunch:
    """The three decode kernels' constexprs and options for one shape and rule (see `topt_decode`).

    dense: the dense path (rule.dense, or no θ); soft_cap: logits soft-capping on;
    count: counters are written; num_segments: key-range splits per row.
    """
    dot_fp32 = dot_in_fp32(dtype, kv_dtype)
    if torch.float32 in (dtype, kv_dtype) and not INTERPRETED and (reason := fp32_refusal(head_size, block_size)):
        raise ValueError(f"TOPT's CUDA decode kernel does not run {reason}")
    tile_tokens = decode_tile_tokens(head_size, block_size, dot_fp32, tile_tokens)
    nseg = num_segments
    if nseg & (nseg - 1) or nseg > MAX_SEGMENTS:
        raise ValueError(f"num_segments {nseg}: a power of two <= {MAX_SEGMENTS}")
    vmc = rule.vmc and not dense
    block_vmc = rule.block_vmc and not dense
    post = rule.placement is Placement.POST_SOFTMAX
    common = {
        "G": group_size, "GP": max(16, triton.next_power_of_2(group_size)), "D": head_size,
        "DP": triton.next_power_of_2(head_size), "BS": block_size, "NSEG": nseg,
    }
    kernel_opts = {"num_warps": num_warps, "num_stages": num_stages}
    pages = tile_tokens // block_size
    dot_prec = "ieee" if dot_fp32 else None  # None: the default (tensor cores) for bf16/fp16
    scores = dict(PAGES=pages, SOFTCAP=soft_cap, DENSE=dense, BLOCK_VMC=block_vmc, DOT_FP32=dot_fp32,
                  DOT_PREC=dot_prec, **common, **kernel_opts)
    if block_vmc and not dot_fp32:
        # With the pages' log-sum-exp this kernel needs 50-64 registers, where ptxas (Triton 3.6 and 3.9)
        # aims at 48 (five CTAs per SM) and spills a few bytes; this ceiling (four CTAs) keeps it spill-free.
        scores["maxnreg"] = SCORES_MAXNREG_BLOCK_VMC
    sparse = None
    if not dense:
        sparse = dict(PAGES=pages, SOFTCAP=soft_cap, POST=post, VMC=vmc, BLOCK_VMC=block_vmc,
                      ROW_GATHER=row_gather, DOT_FP32=dot_fp32, DOT_PREC=dot_prec, DENSE_MODE=DENSE_MODE_CODE,
                      **common, **kernel_opts)
        if (head_size > 128 or block_vmc) and not INTERPRETED:
            # At d=256, or with block-wise VMC, ptxas (sm_80/sm_90) caps this kernel at 128 registers and
            # spills a few bytes; a higher ceiling keeps it spill-free (tests/test_triton_compile.py).
            sparse["maxnreg"] = SPARSE_MAXNREG
    combine = dict(DENSE=dense, POST=post, SDC=rule.sdc.code, VMC=vmc, BLOCK_VMC=block_vmc, COUNT=count,
                   DENSE_MODE=DENSE_MODE_CODE, **common, num_warps=4)
    return DecodeLaunch(tile_tokens, nseg, scores, sparse, combine)


def topt_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    theta: torch.Tensor | None,
    rule: ToptRule,
    scale: float,
    v_block_sums: torch.Tensor | None = None,
    logits_soft_cap: float | None = None,
    out: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
    row_modes: torch.Tensor | None = None,
    mode_counter_stride: int = 0,
    scratch: ToptScratch | None = None,
    num_segments: int | None = None,
    max_seq_len: int | None = None,
    max_pages: int | None = None,
    tile_tokens: int | None = None,
    row_gather: bool = False,
    num_warps: int = 8,
    num_stages: int = 2,
) -> torch.Tensor:
    """Top-θ attention for B decode rows over the paged cache; returns `out` [B, H, d].

    query: [B, H, d]; key_cache, value_cache: [num_blocks, block_size, H_kv, d]
    (strided views are fine; the last dim must be contiguous); block_table
    [B, >= pages] int32; seq_lens [B] int32 (keys 1..n, the new token included;
    0 marks a padding row, whose output is 0 and which is not counted);
    theta [B, H] float32 for each row's n (None or rule.dense: dense attention);
    v_block_sums [num_blocks, H_kv, d] float32 (see `update_v_block_sums`),
    needed for VMC (block-wise VMC also needs a scratch allocated with
    block_vmc=True, or none). counters: [B, 10] int64 (COUNTER_FIELDS order) the
    kernel adds each row's SPEC §7 counts to (a row stride of 0 sums the
    batch into one row); nothing here synchronises with the host.
    row_modes: [>= B] int32, each row's request mode code (None: all 0). A row
    in DENSE_MODE_CODE keeps every element, with no compensation (as n <= k);
    the other modes are thresholded with the row's θ. A row in mode m adds its
    counts m * `mode_counter_stride` elements further on in `counters`.
    scratch: reusable work buffers (allocated per call if None); max_pages:
    the most pages any row spans (default: the block table's width).
    num_segments: key-range splits per row (a power of two; default by batch
    size, and `max_seq_len` if given). tile_tokens (keys per loop step, a
    power of two >= block size), num_warps, num_stages: launch tuning;
    row_gather: inside a surviving block read only the V rows some head keeps.
    """
    B, H, D = query.shape
    _, BS, H_kv, Dk = key_cache.shape
    if Dk != D or value_cache.shape != key_cache.shape:
        raise ValueError(f"cache views {tuple(key_cache.shape)} / {tuple(value_cache.shape)} do not match query {D}")
    if H % H_kv:
        raise ValueError(f"{H} query heads are not a multiple of {H_kv} KV heads")
    if BS % 16 or BS & (BS - 1):
        raise ValueError(f"block size {BS}: the kernel needs a power of two >= 16")
    for name, t in (("query", query), ("key_cache", key_cache), ("value_cache", value_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}'s last dim must be contiguous")
    G = H // H_kv
    dense = rule.dense or theta is None
    vmc = rule.vmc and not dense
    block_vmc = rule.block_vmc and not dense
    if vmc and v_block_sums is None:
        raise ValueError("VMC needs per-block V sums (v_block_sums)")
    device = query.device
    max_pages = max_pages or block_table.shape[1]
    soft_cap = float(logits_soft_cap or 0.0)
    nseg = num_segments or choose_num_segments(
        B, H_kv, max_seq_len, decode_tile_tokens(D, BS, dot_in_fp32(query.dtype, key_cache.dtype), tile_tokens))
    launch = decode_launch(D, G, BS, query.dtype, key_cache.dtype, rule, dense=dense, soft_cap=bool(soft_cap),
                           count=counters is not None, num_segments=nseg, tile_tokens=tile_tokens,
                           row_gather=row_gather, num_warps=num_warps, num_stages=num_stages)
    if scratch is None:
        scratch = ToptScratch.allocate(B, H, H_kv, D, 0 if dense else max_pages, B * nseg, device, block_vmc)
    scratch.check(B, H, H_kv, D, 0 if dense else max_pages, block_vmc)
    if out is None:
        out = torch.empty_like(query)
    sc = scratch.segments(B, nseg)
    bmax = scratch.block_max
    stride_pb, stride_ph = sc.seg_max.stride(0), sc.seg_max.stride(1)
    stride_kvpb, stride_kvph = sc.seg_rows.stride(0), sc.seg_rows.stride(1)
    theta_t = scratch.dummy if dense else theta
    modes = scratch.no_modes if row_modes is None else row_modes
    if modes.numel() < B or modes.dtype != torch.int32:
        raise ValueError(f"row_modes: int32 [>= {B}], not {modes.dtype} {tuple(modes.shape)}")
    vsum_t = v_block_sums if vmc else scratch.dummy
    # Block-wise VMC's buffers; dummies for other rules.
    vmean, dropped = (sc.seg_vmean, sc.seg_dropped) if block_vmc else (scratch.dummy,) * 2
    stride_bmp = scratch.page_stats.stride(0) if block_vmc else 0

    _topt_scores_kernel[(B, H_kv, nseg)](
        query, key_cache, value_cache, block_table, seq_lens, bmax, sc.seg_max, sc.seg_sum, sc.seg_acc,
        query.stride(0), query.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_table.stride(0), bmax.stride(0), bmax.stride(1),
        stride_pb, stride_ph,
        scale, soft_cap, stride_bmp,
        **launch.scores,
    )
    if not dense:
        _topt_sparse_kernel[(B, H_kv, nseg)](
            query, key_cache, value_cache, block_table, seq_lens, theta_t, vsum_t, bmax,
            sc.seg_max, sc.seg_sum, sc.seg_acc, sc.seg_kept_mass, sc.seg_kept, sc.seg_vsum, vmean, dropped,
            sc.seg_rows, sc.seg_pages, modes,
            query.stride(0), query.stride(1),
            key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
            value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
            block_table.stride(0), bmax.stride(0), bmax.stride(1),
            stride_pb, stride_ph, stride_kvpb, stride_kvph,
            theta_t.stride(0), vsum_t.stride(0), vsum_t.stride(1) if vmc else 0,
            scale, soft_cap, rule.k, stride_bmp,
            **launch.sparse,
        )
    cnt = counters if counters is not None else scratch.dummy
    _topt_combine_kernel[(B, H_kv)](
        out, seq_lens, theta_t, sc.seg_max, sc.seg_sum, sc.seg_acc, sc.seg_kept_mass, sc.seg_kept, sc.seg_vsum,
        vmean, dropped, sc.seg_rows, sc.seg_pages, cnt, modes,
        out.stride(0), out.stride(1), stride_pb, stride_ph, stride_kvpb, stride_kvph,
        theta_t.stride(0), counters.stride(0) if counters is not None else 0, mode_counter_stride,
        rule.k,
        **launch.combine,
    )
    return out


def new_counters(rows: int, device="cuda") -> torch.Tensor:
    return torch.zeros(rows, NUM_COUNTERS, dtype=torch.int64, device=device)


def counters_to_density(counters: torch.Tensor) -> DensityCounts:
    """Sum a [R, 10] counter tensor into DensityCounts (one host sync: call it off the hot path)."""
    return DensityCounts.from_counters(counters.reshape(-1, NUM_COUNTERS).sum(dim=0).tolist())


# --- θ(n) on the device ------------------------------------------------------------------------


@triton.jit
def _threshold_lookup_kernel(OUT, SEQ, GRID, TABLE, SLOPE, stride_ob, H, NG,
                             HP: tl.constexpr, NGP: tl.constexpr, POST: tl.constexpr):
    """LayerThresholds.lookup for one row: piecewise linear in ln n, loglog-slope beyond the grid."""
    b = tl.program_id(0)
    n = tl.load(SEQ + b)
    x = tl.log(tl.maximum(n, 1).to(tl.float32))
    j = tl.arange(0, NGP)
    grid = tl.load(GRID + j, mask=j < NG, other=float("inf"))
    idx = tl.minimum(tl.maximum(tl.sum((grid < x).to(tl.int32), axis=0), 1), NG - 1)
    x0 = tl.load(GRID + idx - 1)
    x1 = tl.load(GRID + idx)
    x_last = tl.load(GRID + NG - 1)
    hh = tl.arange(0, HP)
    h_ok = hh < H
    y0 = tl.load(TABLE + hh * NG + idx - 1, mask=h_ok, other=0.0)
    y1 = tl.load(TABLE + hh * NG + idx, mask=h_ok, other=0.0)
    frac = tl.minimum(tl.maximum((x - x0) / (x1 - x0), 0.0), 1.0)
    inside = y0 + (y1 - y0) * frac
    last = tl.load(TABLE + hh * NG + NG - 1, mask=h_ok, other=0.0)
    slope = tl.load(SLOPE + hh, mask=h_ok, other=0.0)
    y = tl.where(x > x_last, last + slope * (x - x_last), inside)
    if POST:
        y = tl.exp(y)
    tl.store(OUT + b * stride_ob + hh, y, mask=h_ok)


def threshold_lookup_launch(num_heads: int, num_points: int, post: bool) -> dict:
    """`_threshold_lookup_kernel`'s constexprs and options (see `DeviceThresholds.lookup`)."""
    return {"HP": triton.next_power_of_2(num_heads), "NGP": triton.next_power_of_2(num_points), "POST": post,
            "num_warps": 1}


class DeviceThresholds:
    """One layer's `LayerThresholds` on the device: θ for every row in one launch, no host sync."""

    def __init__(self, layer_thresholds, device):
        self.post = layer_thresholds.placement == Placement.POST_SOFTMAX
        self.grid = layer_thresholds.log_n.to(device=device, dtype=torch.float32).contiguous()
        self.table = layer_thresholds.table.to(device=device, dtype=torch.float32).contiguous()  # [H, NG]
        self.slope = layer_thresholds.slope.to(device=device, dtype=torch.float32).contiguous()
        self.num_heads, self.num_points = self.table.shape

    def lookup(self, seq_lens: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """θ [B, H] float32 for row lengths seq_lens [B]."""
        B = seq_lens.shape[0]
        if out is None:
            out = torch.empty(B, self.num_heads, dtype=torch.float32, device=seq_lens.device)
        if B:
            _threshold_lookup_kernel[(B,)](
                out, seq_lens, self.grid, self.table, self.slope, out.stride(0), self.num_heads, self.num_points,
                **threshold_lookup_launch(self.num_heads, self.num_points, self.post),
            )
        return out


def keep_every_element(post: bool) -> float:
    """A θ nothing falls below (the kernels' `lowest`): probabilities are >= 0, scores > -inf."""
    return -1.0 if post else float("-inf")


def theta_by_mode(theta: torch.Tensor, seq_lens: torch.Tensor, row_modes: torch.Tensor, rule: ToptRule,
                  points) -> torch.Tensor:
    """θ [B, H] for rows in their request modes, for a kernel run at the least k of every mode.

    theta: the server's file's θ for every row (mode 0, at rule.k); points: (mode code, DeviceThresholds, k)
    of the request points on this layer. A row takes its mode's θ, or one nothing falls below when its row
    length is at or below its mode's k (SPEC §2). Device ops only, no host sync."""
    lowest = keep_every_element(rule.placement is Placement.POST_SOFTMAX)
    B = theta.shape[0]
    modes = row_modes[:B, None]
    out = theta.masked_fill((seq_lens <= rule.k)[:, None], lowest)
    for code, thresholds, k in points:
        mine = thresholds.lookup(seq_lens).masked_fill_((seq_lens <= k)[:, None], lowest)
        out = torch.where(modes == code, mine, out)
    return out


# --- per-block V sums, kept at KV-write time ---------------------------------------------------------


@triton.jit
def _vsum_reset_kernel(VSUM, SLOT, stride_vsb, BS: tl.constexpr, HD: tl.constexpr, HDP: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(SLOT + t).to(tl.int64)
    # A block is (re)filled from offset 0: its sum starts afresh (negative slots are padding).
    if (slot >= 0) & (slot % BS == 0):
        j = tl.arange(0, HDP)
        tl.store(VSUM + (slot // BS) * stride_vsb + j, tl.zeros([HDP], tl.float32), mask=j < HD)


@triton.jit
def _vsum_add_kernel(VSUM, VAL, SLOT, stride_vsb, stride_vsh, stride_t, stride_h,
                     BS: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(SLOT + t).to(tl.int64)
    if slot >= 0:
        d = tl.arange(0, DP)
        v = tl.load(VAL + t * stride_t + h * stride_h + d, mask=d < D, other=0.0).to(tl.float32)
        tl.atomic_add(VSUM + (slot // BS) * stride_vsb + h * stride_vsh + d, v, mask=d < D)


def v_block_sum_launches(block_size: int, num_kv_heads: int, head_size: int) -> tuple[dict, dict]:
    """(`_vsum_reset_kernel`'s, `_vsum_add_kernel`'s) constexprs and options (see `update_v_block_sums`)."""
    hd = num_kv_heads * head_size
    reset = {"BS": block_size, "HD": hd, "HDP": triton.next_power_of_2(hd), "num_warps": 4}
    add = {"BS": block_size, "D": head_size, "DP": triton.next_power_of_2(head_size), "num_warps": 1}
    return reset, add


def update_v_block_sums(v_block_sums: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
                        block_size: int) -> None:
    """Σ v per (block, KV head) as the cache is written (same rule as the CPU path's).

    v_block_sums: [num_blocks, H_kv, d] float32 contiguous per block; value
    [T, H_kv, d]; slot_mapping [T'] (T' <= T; negative slots are padding).
    A write at offset 0 restarts the block's sum; prefix-cached blocks are
    never rewritten and keep theirs. Two launches, no host sync.
    """
    T = slot_mapping.shape[0]
    if T == 0:
        return
    _, H_kv, D = v_block_sums.shape
    if v_block_sums.stride(1) != D or v_block_sums.stride(2) != 1:
        raise ValueError("v_block_sums must be contiguous within a block")
    if value.stride(-1) != 1:
        value = value.contiguous()
    reset, add = v_block_sum_launches(block_size, H_kv, D)
    _vsum_reset_kernel[(T,)](v_block_sums, slot_mapping, v_block_sums.stride(0), **reset)
    _vsum_add_kernel[(T, H_kv)](v_block_sums, value, slot_mapping, v_block_sums.stride(0), v_block_sums.stride(1),
                                value.stride(0), value.stride(1), **add)
