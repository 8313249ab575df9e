"""The Triton decode kernel against the reference, in the Triton interpreter (no GPU).

The cache is vLLM 0.32's CUDA layout (TRITON_ATTN's views of one
[num_blocks, H_kv, block_size, 2d] tensor), written with the slot-mapping
semantics of `reshape_and_cache_flash` (see `benchmarks.cuda_paged`).
Shapes are tiny: the interpreter runs every program in Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch

from tests.cases import RULES, rule_id
from tests.interpret import interpreter_env, load_interpreted
from benchmarks import cuda_paged as paged
from vllm_topt.method.rules import DensityCounts, ToptRule
from vllm_topt.method.reference import topt_attention_reference

(td,) = load_interpreted("vllm_topt.kernels.triton.decode")
assert td.INTERPRETED


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter():
    with interpreter_env():
        yield



# bs=16: n <= k, exactly one block, one row past it, one short of three blocks,
# five blocks (two kernel tiles of 64 tokens).
LENGTHS = [5, 16, 17, 47, 70]


@dataclass
class CudaPagedBatch:
    kv_cache: torch.Tensor  # logical [num_blocks, H_kv, bs, 2d], vLLM's strides
    key_cache: torch.Tensor  # [num_blocks, bs, H_kv, d] views, as TRITON_ATTN splits them
    value_cache: torch.Tensor
    block_table: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32
    v_block_sums: torch.Tensor  # [num_blocks, H_kv, d] float32
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


def build_batch(keys, values, block_size, dtype=torch.float32, layout="LBNHC", seed=0, extra_blocks=3):
    """Shuffled physical blocks; each sequence written as a prefill chunk then token by token."""
    gen = torch.Generator().manual_seed(seed)
    H_kv, d = keys[0].shape[1:]
    blocks_per_seq = [max(math.ceil(k.shape[0] / block_size), 1) for k in keys]
    num_blocks = sum(blocks_per_seq) + extra_blocks
    physical = torch.randperm(num_blocks, generator=gen)
    kv_cache = paged.allocate_kv_cache(num_blocks, block_size, H_kv, d, dtype, layout=layout, generator=gen)
    key_cache, value_cache = paged.kv_cache_views(kv_cache, d)
    v_sums = torch.full((num_blocks, H_kv, d), 1e3)  # stale sums: the first write of a block resets them
    block_table = torch.full((len(keys), max(blocks_per_seq) + 1), int(physical[-1]), dtype=torch.int32)
    start = 0
    for i, (k, v) in enumerate(zip(keys, values)):
        ids = physical[start : start + blocks_per_seq[i]]
        start += blocks_per_seq[i]
        block_table[i, : len(ids)] = ids
        n = k.shape[0]
        prefill = max(n - 3, 0)
        for lo, hi in [(0, prefill)] + [(j, j + 1) for j in range(prefill, n)]:
            if hi <= lo:
                continue
            slots = paged.sequence_slots(ids, hi, block_size, start=lo)
            # A padding token (slot -1) rides along, as in vLLM's padded batches.
            slots = torch.cat([slots, torch.tensor([-1])]).to(torch.int32)
            kk = torch.cat([k[lo:hi], torch.randn(1, H_kv, d, generator=gen)]).to(dtype)
            vv = torch.cat([v[lo:hi], torch.randn(1, H_kv, d, generator=gen)]).to(dtype)
            paged.write_kv(kk, vv, key_cache, value_cache, slots)
            td.update_v_block_sums(v_sums, vv, slots, block_size)
    seq_lens = torch.tensor([k.shape[0] for k in keys], dtype=torch.int32)
    return CudaPagedBatch(
        kv_cache, key_cache, value_cache, block_table, seq_lens, v_sums,
        [k.to(dtype) for k in keys], [v.to(dtype) for v in values],
    )


def random_sequences(lengths, H_kv, d, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, H_kv, d, generator=gen) for n in lengths], [torch.randn(n, H_kv, d, generator=gen) for n in lengths]


def thresholds_for(query, keys, rule: ToptRule, scale: float, seed: int, soft_cap=None) -> torch.Tensor:
    """Per (sequence, head) thresholds at random quantiles of the row: keep a few to a few dozen."""
    gen = torch.Generator().manual_seed(seed)
    H = query.shape[1]
    theta = torch.zeros(len(keys), H)
    for i, k in enumerate(keys):
        if k.shape[0] == 0:
            continue
        G = H // k.shape[1]
        s = scale * torch.einsum("hd,nhd->hn", query[i].float(), k.float().repeat_interleave(G, dim=1))
        if soft_cap:
            s = soft_cap * torch.tanh(s / soft_cap)
        domain = torch.softmax(s, dim=-1) if rule.placement == "post-softmax" else s
        levels = 0.6 + 0.35 * torch.rand(H, generator=gen)
        theta[i] = torch.stack([torch.quantile(domain[h], levels[h]) for h in range(H)])
    return theta


def run_both(query, batch, theta, rule, scale, soft_cap=None, **kwargs):
    counters = td.new_counters(query.shape[0], device="cpu")
    out = td.topt_decode(
        query, batch.key_cache, batch.value_cache, batch.block_table, batch.seq_lens, theta, rule, scale,
        v_block_sums=batch.v_block_sums, logits_soft_cap=soft_cap, counters=counters, **kwargs,
    )
    refs, ref_rows = [], []
    for i in range(query.shape[0]):
        if batch.keys[i].shape[0] == 0:  # a padding row: output 0, not counted
            refs.append(torch.zeros_like(query[i]))
            ref_rows.append(DensityCounts())
            continue
        o, c = topt_attention_reference(
            query[i], batch.keys[i], batch.values[i], theta[i], rule, scale, batch.key_cache.shape[1], soft_cap
        )
        refs.append(o)
        ref_rows.append(c)
    return out, counters, torch.stack(refs), ref_rows


def assert_counts_match(counters: torch.Tensor, ref_rows: list[DensityCounts], slack: int = 0):
    """Per row: totals exactly; kept / read counts within `slack` (an element on its threshold may flip)."""
    for i, ref in enumerate(ref_rows):
        got = DensityCounts(**dict(zip(td.COUNTER_FIELDS, counters[i].tolist())))
        for field in ("rows", "elements_visible", "v_rows_visible", "v_blocks_visible", "thresholded_rows",
                      "thresholded_target"):
            assert getattr(got, field) == getattr(ref, field), (i, field, got, ref)
        for field in ("elements_kept", "v_rows_read", "v_blocks_read", "thresholded_kept"):
            assert abs(getattr(got, field) - getattr(ref, field)) <= slack, (i, field, got, ref)


@pytest.mark.parametrize("rule", RULES, ids=rule_id)
@pytest.mark.parametrize("H,H_kv", [(3, 1), (8, 2), (2, 2)], ids=["gqa3", "gqa4", "mha"])
def test_matches_reference(rule, H, H_kv):
    d, bs, scale = 64, 16, 0.125 * 3
    keys, values = random_sequences(LENGTHS, H_kv, d, seed=H * 10 + H_kv)
    query = torch.randn(len(LENGTHS), H, d, generator=torch.Generator().manual_seed(1))
    batch = build_batch(keys, values, bs, seed=H)
    theta = thresholds_for(query, batch.keys, rule, scale, seed=2)
    out, counters, ref, ref_rows = run_both(query, batch, theta, rule, scale, num_segments=2)
    assert_counts_match(counters, ref_rows)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    total = td.counters_to_density(counters)
    if not rule.dense:
        assert total.elements_kept < total.elements_visible  # the rule really dropped elements
        assert total.v_blocks_read < total.v_blocks_visible  # and skipped whole V blocks


def hot_page_batch(lengths, hot_pages, H, H_kv, d, bs, seed):
    """Keys boosted toward their group's mean query in the `hot_pages` of each row (every other page is
    dropped whole under a tight θ); each page's V shifted by its own offset (distinct page means)."""
    gen = torch.Generator().manual_seed(seed)
    keys, values = random_sequences(lengths, H_kv, d, seed)
    query = torch.randn(len(lengths), H, d, generator=gen)
    for i, (n, hot) in enumerate(zip(lengths, hot_pages)):
        direction = query[i].view(H_kv, H // H_kv, d).mean(dim=1)
        direction = direction / direction.norm(dim=-1, keepdim=True)
        page = torch.arange(n) // bs
        boosted = torch.isin(page, torch.tensor(hot))
        keys[i] += 10.0 * boosted[:, None, None] * direction
        values[i] += 3.0 * torch.randn(page[-1] + 1, H_kv, d, generator=gen)[page]
    return query, build_batch(keys, values, bs, seed=seed)


def top_thresholds(query, keys, rule: ToptRule, scale: float, keep: int) -> torch.Tensor:
    """θ per (row, head) halfway between the `keep`-th and the next largest value of the rule's domain."""
    theta = torch.zeros(query.shape[:2])
    for i, k in enumerate(keys):
        G = query.shape[1] // k.shape[1]
        s = scale * torch.einsum("hd,nhd->hn", query[i].float(), k.float().repeat_interleave(G, dim=1))
        domain = torch.softmax(s, dim=-1) if rule.placement == "post-softmax" else s
        theta[i] = domain.topk(keep + 1, dim=-1).values[:, -2:].mean(dim=-1)
    return theta


BLOCK_RULES = [r for r in RULES if r.block_vmc]


@pytest.mark.parametrize("tile_tokens", [16, 64], ids=["page-per-step", "4-pages-per-step"])
@pytest.mark.parametrize("rule", BLOCK_RULES, ids=rule_id)
def test_block_vmc_with_dead_pages(rule, tile_tokens):
    """Block-wise VMC where whole pages are dropped (their mass from the scores kernel's page log-sum-exp),
    rows end mid-page (a dead last page in row 0, a read one in row 1), 3-way GQA: equal to the reference,
    and clearly unlike sequence VMC."""
    d, bs, H, H_kv, scale = 64, 16, 6, 2, 0.125
    lengths, hot = [70, 45, 100], [[1], [2], [0, 4]]
    query, batch = hot_page_batch(lengths, hot, H, H_kv, d, bs, seed=21)
    theta = top_thresholds(query, batch.keys, rule, scale, keep=6)
    kwargs = {"num_segments": 2, "tile_tokens": tile_tokens}
    out, counters, ref, ref_rows = run_both(query, batch, theta, rule, scale, **kwargs)
    assert all(r.v_blocks_visible - r.v_blocks_read >= 2 for r in ref_rows)  # dead pages in every row
    assert_counts_match(counters, ref_rows)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    sequence = replace(rule, vmc_scope="sequence")
    out_seq, _, ref_seq, _ = run_both(query, batch, theta, sequence, scale, **kwargs)
    torch.testing.assert_close(out_seq, ref_seq, atol=2e-5, rtol=1e-4)
    assert (out - out_seq).abs().amax() > 0.5  # the scope matters here: the test can tell them apart


@pytest.mark.parametrize("layout", paged.LAYOUTS)
@pytest.mark.parametrize("block_size", [16, 32])
def test_block_sizes_layouts_soft_cap(block_size, layout):
    rule = ToptRule("post-softmax", "none", True, k=16)
    lengths = [block_size - 1, block_size, block_size + 1, 3 * block_size + 7]
    keys, values = random_sequences(lengths, 2, 64, seed=block_size)
    query = torch.randn(len(lengths), 6, 64, generator=torch.Generator().manual_seed(3)) * 3
    batch = build_batch(keys, values, block_size, layout=layout)
    theta = thresholds_for(query, batch.keys, rule, 0.125, seed=4, soft_cap=5.0)
    out, counters, ref, ref_rows = run_both(query, batch, theta, rule, 0.125, soft_cap=5.0, num_segments=2)
    assert_counts_match(counters, ref_rows, slack=1)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_segment_split_and_padding_rows():
    """One segment or four give the same result; a seq_len 0 row (batch padding) outputs 0, uncounted."""
    rule = ToptRule("pre-softmax", "exact", True, k=8)
    lengths = [150, 0, 33]
    keys, values = random_sequences(lengths, 1, 64, seed=11)
    query = torch.randn(len(lengths), 4, 64, generator=torch.Generator().manual_seed(12))
    batch = build_batch(keys, values, 16)
    theta = thresholds_for(query, batch.keys, rule, 0.25, seed=13)
    out1, c1, ref, ref_rows = run_both(query, batch, theta, rule, 0.25, num_segments=1)
    out4, c4, _, _ = run_both(query, batch, theta, rule, 0.25, num_segments=4, tile_tokens=16)
    assert_counts_match(c1, ref_rows)
    assert torch.equal(c1, c4)
    torch.testing.assert_close(out1, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out4, ref, atol=2e-5, rtol=1e-4)
    assert torch.all(out4[1] == 0) and torch.all(c4[1] == 0)


def test_counters_accumulate_into_one_row():
    """A row stride of 0 sums the batch into one counter row, across calls, on the device."""
    rule = ToptRule("post-softmax", "none", True, k=8)
    keys, values = random_sequences([40, 90], 2, 64, seed=14)
    query = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(15))
    batch = build_batch(keys, values, 16)
    theta = thresholds_for(query, batch.keys, rule, 0.125, seed=16)
    total = td.new_counters(1, device="cpu")
    for _ in range(2):
        td.topt_decode(
            query, batch.key_cache, batch.value_cache, batch.block_table, batch.seq_lens, theta, rule, 0.125,
            v_block_sums=batch.v_block_sums, counters=total.expand(2, -1), num_segments=1,
        )
    ref = DensityCounts()
    for i in range(2):
        ref.add(topt_attention_reference(query[i], keys[i], values[i], theta[i], rule, 0.125, 16)[1])
    assert td.counters_to_density(total) == ref.add(DensityCounts(**ref.as_dict()))


def test_short_rows_are_dense():
    """n <= k: every element kept, output equals dense attention, nothing counted as thresholded."""
    rule = ToptRule("post-softmax", "none", True, k=64)
    keys, values = random_sequences([10, 64], 2, 64, seed=5)
    query = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(6))
    batch = build_batch(keys, values, 32)
    theta = torch.full((2, 4), 0.5)  # would drop nearly everything if applied
    counters = td.new_counters(2, device="cpu")
    out = td.topt_decode(
        query, batch.key_cache, batch.value_cache, batch.block_table, batch.seq_lens, theta, rule, 0.125,
        v_block_sums=batch.v_block_sums, counters=counters, num_segments=2,
    )
    total = td.counters_to_density(counters)
    assert total.elements_kept == total.elements_visible and total.thresholded_rows == 0
    for i, (k, v) in enumerate(zip(keys, values)):
        dense = torch.nn.functional.scaled_dot_product_attention(
            query[i][:, None], k.repeat_interleave(2, 1).transpose(0, 1), v.repeat_interleave(2, 1).transpose(0, 1),
            scale=0.125,
        )[:, 0]
        torch.testing.assert_close(out[i], dense, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_caches(dtype):
    rule = ToptRule("pre-softmax", "exact", True, k=8)
    keys, values = random_sequences([40, 97], 2, 64, seed=7)
    query = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(8)).to(dtype)
    batch = build_batch(keys, values, 16, dtype=dtype)
    theta = thresholds_for(query, batch.keys, rule, 0.125, seed=9)
    out, counters, ref, ref_rows = run_both(query, batch, theta, rule, 0.125, num_segments=2)
    assert out.dtype == dtype
    assert_counts_match(counters, ref_rows, slack=2)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("row_gather", [False, True], ids=["block", "row-gather"])
def test_skipped_v_is_not_read(row_gather):
    """Poison all V the keep-set does not need (whole blocks; rows with row gather): output unchanged."""
    rule = ToptRule("post-softmax", "none", True, k=4)
    n, bs = 128, 16
    keys, values = random_sequences([n], 1, 64, seed=10)
    # Keys 37 and 38 dominate; everything else is far below θ.
    query = (keys[0][37, 0] + keys[0][38, 0])[None, None, :] * 4
    batch = build_batch(keys, values, bs)
    theta = torch.full((1, 1), 1e-3)
    args = (query, batch.key_cache, batch.value_cache, batch.block_table, batch.seq_lens, theta, rule, 0.125)
    kwargs = {"v_block_sums": batch.v_block_sums, "row_gather": row_gather, "num_segments": 2}
    counters = td.new_counters(1, device="cpu")
    out = td.topt_decode(*args, counters=counters, **kwargs)
    kept_rows = counters[0, td.COUNTER_FIELDS.index("v_rows_read")].item()
    assert td.counters_to_density(counters).v_blocks_read == 1 and kept_rows < bs
    ref, _ = topt_attention_reference(query[0], keys[0], values[0], theta[0], rule, 0.125, bs)
    torch.testing.assert_close(out[0], ref, atol=2e-5, rtol=1e-4)
    needed = torch.zeros(n, dtype=torch.bool)
    if row_gather:
        s = 0.125 * keys[0][:, 0] @ query[0, 0]
        needed = torch.softmax(s, dim=0) > 1e-3
    else:
        needed[(37 // bs) * bs : (37 // bs + 1) * bs] = True
    slots = paged.sequence_slots(batch.block_table[0].long(), n, bs)[~needed]
    batch.value_cache[slots // bs, slots % bs] = float("nan")
    out2 = td.topt_decode(*args, **kwargs)
    torch.testing.assert_close(out, out2)


def test_v_block_sums_match_cpu_rule_and_values():
    """The Triton V-sum update: equal to the CPU path's rule and to the sums of the written rows."""
    from vllm_topt.kernels.cpu.torch_decode import update_v_block_sums as cpu_update

    lengths, bs = [5, 40, 33], 16
    keys, values = random_sequences(lengths, 2, 64, seed=17)
    batch = build_batch(keys, values, bs)
    cpu_sums = torch.full_like(batch.v_block_sums, 1e3)
    for i, v in enumerate(values):
        cpu_update(cpu_sums, v, paged.sequence_slots(batch.block_table[i].long(), v.shape[0], bs), bs)
    for i, v in enumerate(values):
        ids = batch.block_table[i].long()
        for j in range(math.ceil(v.shape[0] / bs)):
            expected = v[j * bs : (j + 1) * bs].sum(dim=0)
            torch.testing.assert_close(batch.v_block_sums[ids[j]], expected, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(batch.v_block_sums[ids[j]], cpu_sums[ids[j]], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("placement", ["post-softmax", "pre-softmax"])
def test_device_threshold_lookup(placement):
    from vllm_topt.config.thresholds import LayerThresholds

    gen = torch.Generator().manual_seed(18)
    grid = [33, 64, 128, 256, 512]
    if placement == "post-softmax":
        values = (torch.rand(6, len(grid), generator=gen) * 0.05 + 1e-3).tolist()
    else:
        values = (torch.randn(6, len(grid), generator=gen) + 2).tolist()
    host = LayerThresholds(grid, values, placement)
    n = torch.tensor([0, 1, 20, 33, 50, 64, 100, 511, 512, 513, 4000, 131072], dtype=torch.int32)
    got = td.DeviceThresholds(host, "cpu").lookup(n)
    torch.testing.assert_close(got, host.lookup(n).float(), atol=1e-6, rtol=1e-5)


def test_cache_views_are_vllms():
    """Our cache allocation has the strides vLLM 0.32 gives a TRITON_ATTN layer, for both layouts."""
    kv_interface = pytest.importorskip("vllm.v1.kv_cache_interface")
    from vllm.v1.kv_cache_layout import KVCacheLayout

    num_blocks, bs, H_kv, d = 5, 16, 2, 64
    spec = kv_interface.FullAttentionSpec(block_size=bs, num_kv_heads=H_kv, head_size=d, dtype=torch.float32)
    page = spec.page_size_bytes
    for layout in paged.LAYOUTS:
        tensor = kv_interface.KVCacheTensor(size=page * num_blocks, layers=["l0"], layer_stride=page * num_blocks,
                                            block_stride=page)
        raw = torch.zeros(page * num_blocks, dtype=torch.int8)
        theirs = kv_interface.create_kv_cache_views(raw, spec, num_blocks, KVCacheLayout[layout], tensor)[0]
        ours = paged.allocate_kv_cache(num_blocks, bs, H_kv, d, torch.float32, layout=layout, fill="zeros")
        assert theirs.shape == ours.shape and theirs.stride() == ours.stride()
        # And writing through the views lands where vLLM's views read it.
        k, v = torch.randn(3, H_kv, d), torch.randn(3, H_kv, d)
        slots = torch.tensor([17, 18, 40])
        for cache in (theirs, ours):
            paged.write_kv(k, v, *paged.kv_cache_views(cache, d), slots)
        assert torch.equal(theirs, ours)
