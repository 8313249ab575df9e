"""The batched CPU decode path against the reference, on vLLM's real paged layout."""

from __future__ import annotations


import pytest
import torch

from tests.cases import RULES, rule_id
from tests.paged import build_paged_batch
from vllm_topt.kernels.cpu.torch_decode import KEY_LAYOUT_TRANSPOSED, topt_decode_paged, update_v_block_sums
from vllm_topt.kernels.cpu.cpp import (
    TEAM_MODES, set_team_mode, team_counts, topt_decode_paged_cpp, update_v_block_sums_cpp,
)
from vllm_topt.method.rules import DensityCounts, ToptRule
from vllm_topt.method.reference import topt_attention_reference


# Both fast paths, vectorised torch and the C++ kernel, must match the reference.
IMPLEMENTATIONS = {"torch": topt_decode_paged, "cpp": topt_decode_paged_cpp}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def decode(request):
    return IMPLEMENTATIONS[request.param]


# Ragged lengths around block edges (bs=32): n <= k, exactly one block, one
# row past it, one short of two blocks, and a longer row.
LENGTHS = [5, 8, 32, 33, 63, 150]


def random_sequences(lengths, H_kv, d, seed):
    gen = torch.Generator().manual_seed(seed)
    keys = [torch.randn(n, H_kv, d, generator=gen) for n in lengths]
    values = [torch.randn(n, H_kv, d, generator=gen) for n in lengths]
    return keys, values


def thresholds_for(query, keys, rule: ToptRule, scale: float, seed: int) -> torch.Tensor:
    """Per (sequence, head) thresholds that keep a few to a few dozen elements."""
    gen = torch.Generator().manual_seed(seed)
    H = query.shape[1]
    G = H // keys[0].shape[1]
    theta = torch.empty(len(keys), H)
    for i, k in enumerate(keys):
        s = scale * torch.einsum("hd,nhd->hn", query[i].float(), k.float().repeat_interleave(G, dim=1))
        domain = torch.softmax(s, dim=-1) if rule.placement == "post-softmax" else s
        levels = 0.6 + 0.35 * torch.rand(H, generator=gen)
        theta[i] = torch.stack([torch.quantile(domain[h], levels[h]) for h in range(H)])
    return theta


def run_both(decode, query, batch, theta, rule, scale, block_size, soft_cap=None):
    fast, fast_counts = decode(
        query, batch.key_cache, batch.value_cache, batch.block_table, batch.seq_lens, theta, rule,
        scale, KEY_LAYOUT_TRANSPOSED, batch.v_block_sums, soft_cap,
    )
    ref_counts = DensityCounts()
    refs = []
    for i in range(query.shape[0]):
        out, counts = topt_attention_reference(
            query[i], batch.keys[i], batch.values[i], theta[i], rule, scale, block_size, soft_cap
        )
        refs.append(out)
        ref_counts.add(counts)
    return fast, fast_counts, torch.stack(refs), ref_counts


def assert_counts_close(fast: DensityCounts, ref: DensityCounts, slack: int = 2):
    assert fast.rows == ref.rows
    assert fast.elements_visible == ref.elements_visible
    assert fast.v_rows_visible == ref.v_rows_visible
    assert fast.v_blocks_visible == ref.v_blocks_visible
    # Float rounding may flip an element sitting exactly on its threshold.
    assert abs(fast.elements_kept - ref.elements_kept) <= slack
    assert abs(fast.v_rows_read - ref.v_rows_read) <= slack
    assert abs(fast.v_blocks_read - ref.v_blocks_read) <= slack
    assert fast.thresholded_rows == ref.thresholded_rows
    assert fast.thresholded_target == ref.thresholded_target
    assert abs(fast.thresholded_kept - ref.thresholded_kept) <= slack


@pytest.mark.parametrize("rule", RULES, ids=rule_id)
@pytest.mark.parametrize("H,H_kv", [(8, 2), (4, 4), (9, 3), (14, 2), (10, 2)])  # G = 4, 1, 3, 7, 5
def test_matches_reference_random(decode, rule, H, H_kv):
    d, bs, scale = 64, 32, 0.125 * 3
    keys, values = random_sequences(LENGTHS, H_kv, d, seed=H * 10 + H_kv)
    query = torch.randn(len(LENGTHS), H, d, generator=torch.Generator().manual_seed(1))
    batch = build_paged_batch(keys, values, bs)
    theta = thresholds_for(query, batch.keys, rule, scale, seed=2)
    fast, fc, ref, rc = run_both(decode, query, batch, theta, rule, scale, bs)
    assert_counts_close(fc, rc)
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=1e-4)
    if not rule.dense:
        assert fc.elements_kept < fc.elements_visible  # the rule really dropped elements


@pytest.mark.parametrize("block_size", [32, 64, 128])
def test_block_sizes_and_soft_cap(decode, block_size):
    rule = ToptRule("post-softmax", "none", True, k=16)
    lengths = [block_size - 1, block_size, block_size + 1, 3 * block_size + 7]
    keys, values = random_sequences(lengths, 2, 64, seed=block_size)
    query = torch.randn(len(lengths), 6, 64, generator=torch.Generator().manual_seed(3)) * 3
    batch = build_paged_batch(keys, values, block_size)
    theta = thresholds_for(query, batch.keys, rule, 0.125, seed=4)
    fast, fc, ref, rc = run_both(decode, query, batch, theta, rule, 0.125, block_size, soft_cap=5.0)
    assert_counts_close(fc, rc)
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=1e-4)


def test_short_rows_are_dense(decode):
    """n <= k: every element kept, output equals dense attention."""
    rule = ToptRule("post-softmax", "none", True, k=64)
    keys, values = random_sequences([10, 64], 2, 64, seed=5)
    query = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(6))
    batch = build_paged_batch(keys, values, 32)
    theta = torch.full((2, 4), 0.5)  # would drop nearly everything if applied
    fast, counts = decode(
        query, batch.key_cache, batch.value_cache, batch.block_table, batch.seq_lens, theta, rule,
        0.125, KEY_LAYOUT_TRANSPOSED, batch.v_block_sums,
    )
    assert counts.elements_kept == counts.elements_visible
    for i, (k, v) in enumerate(zip(keys, values)):
        dense = torch.nn.functional.scaled_dot_product_attention(
            query[i][:, None], k.repeat_interleave(2, 1).transpose(0, 1), v.repeat_interleave(2, 1).transpose(0, 1),
            scale=0.125,
        )[:, 0]
        torch.testing.assert_close(fast[i], dense, atol=1e-5, rtol=1e-4)


def test_bf16_cache(decode):
    rule = ToptRule("pre-softmax", "exact", True, k=8)
    keys, values = random_sequences([40, 97], 2, 64, seed=7)
    query = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    batch = build_paged_batch(keys, values, 32, dtype=torch.bfloat16)
    theta = thresholds_for(query, batch.keys, rule, 0.125, seed=9)
    fast, fc, ref, rc = run_both(decode, query, batch, theta, rule, 0.125, 32)
    assert_counts_close(fc, rc, slack=4)
    torch.testing.assert_close(fast.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_skipped_blocks_are_not_read(decode):
    """Poison every V block the keep-set does not need: the output must not change."""
    rule = ToptRule("post-softmax", "none", True, k=4)
    n, bs = 256, 32
    keys, values = random_sequences([n], 1, 64, seed=10)
    # One strong key in block 2 dominates; everything else is far below θ.
    query = keys[0][70, 0][None, None, :] * 4
    batch = build_paged_batch(keys, values, bs)
    theta = torch.full((1, 1), 1e-3)
    out, counts = decode(
        query, batch.key_cache, batch.value_cache, batch.block_table, batch.seq_lens, theta, rule,
        0.125, KEY_LAYOUT_TRANSPOSED, batch.v_block_sums,
    )
    assert counts.v_blocks_read < counts.v_blocks_visible
    needed_block = int(batch.block_table[0, 70 // bs])
    poisoned = batch.value_cache.clone()
    mask = torch.ones(poisoned.shape[0], dtype=torch.bool)
    mask[needed_block] = False
    batch.value_cache[mask] = float("nan")
    out2, _ = decode(
        query, batch.key_cache, batch.value_cache, batch.block_table, batch.seq_lens, theta, rule,
        0.125, KEY_LAYOUT_TRANSPOSED, batch.v_block_sums,
    )
    torch.testing.assert_close(out, out2)
    batch.value_cache.copy_(poisoned)


def test_long_rows_split_across_chunks(decode):
    """Sequences long enough to be split into several key chunks (combined online softmax)."""
    rule = ToptRule("pre-softmax", "exp-threshold", True, k=16)
    keys, values = random_sequences([2000, 700, 33], 2, 64, seed=11)
    query = torch.randn(3, 6, 64, generator=torch.Generator().manual_seed(12)) * 2
    batch = build_paged_batch(keys, values, 32)
    theta = thresholds_for(query, batch.keys, rule, 0.125, seed=13)
    fast, fc, ref, rc = run_both(decode, query, batch, theta, rule, 0.125, 32)
    assert_counts_close(fc, rc)
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=1e-4)


def test_cpp_reads_only_kept_v_rows():
    """Inside a block it reads, the C++ kernel touches only rows some head keeps."""
    rule = ToptRule("post-softmax", "none", True, k=4)
    keys, values = random_sequences([300], 2, 64, seed=14)
    query = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(15)) * 3
    batch = build_paged_batch(keys, values, 32)
    theta = thresholds_for(query, batch.keys, rule, 0.125, seed=16)
    args = (batch.key_cache, batch.value_cache, batch.block_table, batch.seq_lens, theta, rule, 0.125,
            KEY_LAYOUT_TRANSPOSED, batch.v_block_sums)
    out, counts = topt_decode_paged_cpp(query, *args)
    assert counts.v_rows_read < counts.v_rows_visible
    # Rows kept by some head of the group, from the reference's own keep rule.
    scores = 0.125 * torch.einsum("hd,nhd->hn", query[0], keys[0].repeat_interleave(2, dim=1))
    kept = torch.softmax(scores, dim=-1) > theta[0][:, None]  # [H, n]
    needed = kept.view(2, 2, -1).any(dim=1)  # [H_kv, n]
    for h in range(2):
        for j in (~needed[h]).nonzero().flatten().tolist():
            block = int(batch.block_table[0, j // 32])
            batch.value_cache[block, h, j % 32] = float("nan")
    out2, _ = topt_decode_paged_cpp(query, *args)
    torch.testing.assert_close(out, out2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_v_block_sums_match_torch(dtype):
    """Prefill writes, decode writes, a refilled block and padding slots (-1)."""
    gen = torch.Generator().manual_seed(17)
    bs, H_kv, d = 32, 2, 64
    expected = torch.full((6, H_kv, d), 1e3)  # stale sums must be reset on first write
    actual = expected.clone()
    writes = [
        torch.arange(0, 70),  # a prefill over blocks 0-2
        torch.tensor([70, -1, -1]),  # a decode step, padded
        torch.arange(96, 100),  # block 3 refilled from offset 0
        torch.tensor([101, 5 * bs]),  # two sequences' decode rows
    ]
    for slots in writes:
        value = torch.randn(slots.shape[0], H_kv, d, generator=gen).to(dtype)
        update_v_block_sums(expected, value, slots, bs)
        update_v_block_sums_cpp(actual, value, slots, bs)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_cpp_threshold_table_by_length_matches_per_row():
    """The backend's path: θ looked up inside the kernel from a per-length table."""
    from vllm_topt.config.thresholds import LayerThresholds

    rule = ToptRule("post-softmax", "none", True, k=8)
    lengths = [5, 40, 150, 97]
    keys, values = random_sequences(lengths, 2, 64, seed=18)
    query = torch.randn(len(lengths), 6, 64, generator=torch.Generator().manual_seed(19)) * 2
    batch = build_paged_batch(keys, values, 32)
    table = LayerThresholds([9, 40, 160], [[0.08, 0.03, 0.01]] * 6, "post-softmax")
    args = (query, batch.key_cache, batch.value_cache, batch.block_table, batch.seq_lens)
    per_row, rc = topt_decode_paged_cpp(*args, table.lookup_memoised(batch.seq_lens), rule, 0.125,
                                        v_block_sums=batch.v_block_sums)
    by_length, bc = topt_decode_paged_cpp(*args, None, rule, 0.125, v_block_sums=batch.v_block_sums,
                                          theta_by_length=table.table_upto(150))
    assert bc == rc and bc.elements_kept < bc.elements_visible
    torch.testing.assert_close(by_length, per_row, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="theta table shorter"):
        topt_decode_paged_cpp(*args, None, rule, 0.125, v_block_sums=batch.v_block_sums,
                              theta_by_length=table.table_upto(150)[:100])


# ------------------------------------------------------------------ head size 256 (Gemma-3)


@pytest.mark.parametrize("rule", RULES, ids=rule_id)
@pytest.mark.parametrize("H,H_kv", [(4, 1), (8, 2)])
def test_head_size_256_random(decode, rule, H, H_kv):
    d, bs, scale = 256, 128, 256**-0.5
    lengths = [5, 127, 128, 129, 700]
    keys, values = random_sequences(lengths, H_kv, d, seed=H + 256)
    query = torch.randn(len(lengths), H, d, generator=torch.Generator().manual_seed(14)) * 2
    batch = build_paged_batch(keys, values, bs)
    theta = thresholds_for(query, batch.keys, rule, scale, seed=15)
    fast, fc, ref, rc = run_both(decode, query, batch, theta, rule, scale, bs)
    assert_counts_close(fc, rc)
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=1e-4)


GEMMA_CONTEXTS = (600, 1500)  # below and well past its 512-token sliding window


@pytest.fixture(scope="module")
def gemma_capture(gemma_model):
    """Real decode-time Q/K/V of Gemma-3-270M (head size 256, 4 query / 1 KV head) on held-out text."""
    from benchmarks.capture_qkv import capture

    return capture(str(gemma_model), list(GEMMA_CONTEXTS), queries=3, threads=None)


@pytest.mark.parametrize("context", GEMMA_CONTEXTS)
def test_head_size_256_on_captured_gemma(decode, gemma_model, gemma_capture, context):
    """The global layers of Gemma-3 with their shipped thresholds: both fast paths equal the reference."""
    from transformers import AutoConfig

    from vllm_topt.config.options import ToptOptions, resolve_thresholds

    file, _ = resolve_thresholds(ToptOptions(), AutoConfig.from_pretrained(gemma_model), "gemma3-270m")
    cap, bs = gemma_capture, 128
    plans = file.layer_plan()
    sparse = [layer for layer, plan in enumerate(plans) if not plan.rule.dense]
    assert sparse == [5, 11, 17]  # the global layers; the sliding ones are dense in the file
    for layer in sparse:
        queries = cap["q"][context][layer]  # [R, H, d], row i decodes a sequence of context - i tokens
        lengths = [context - i for i in range(queries.shape[0])]
        keys = [cap["k"][layer, :n] for n in lengths]
        values = [cap["v"][layer, :n] for n in lengths]
        batch = build_paged_batch(keys, values, bs)
        theta = plans[layer].thresholds.lookup(batch.seq_lens).float()
        fast, fc, ref, rc = run_both(decode, queries, batch, theta, plans[layer].rule, cap["scale"], bs)
        assert_counts_close(fc, rc)
        torch.testing.assert_close(fast, ref, atol=2e-5, rtol=1e-4)
        assert fc.elements_kept < 0.5 * fc.elements_visible  # real sparsity on real tensors


@pytest.fixture
def team_mode():
    """Sets the C++ kernel's team mode for one test (counts zeroed), adaptive again afterwards."""
    def set_mode(mode):
        set_team_mode(mode)
        team_counts(reset=True)
    yield set_mode
    set_team_mode("adaptive")
    team_counts(reset=True)


@pytest.mark.parametrize("mode", TEAM_MODES)
@pytest.mark.parametrize("rule", [r for r in RULES if not r.dense][:4], ids=rule_id)
def test_cpp_team_modes_match_reference(team_mode, mode, rule):
    """The whole thread team, the calling thread alone and the adaptive choice between them all
    give the reference's output, and the kernel counts which one ran each call."""
    team_mode(mode)
    keys, values = random_sequences([2000, 700, 33, 5], 2, 64, seed=21)
    query = torch.randn(4, 6, 64, generator=torch.Generator().manual_seed(22)) * 2
    batch = build_paged_batch(keys, values, 32)
    theta = thresholds_for(query, batch.keys, rule, 0.125, seed=23)
    calls = 3
    for _ in range(calls):
        fast, fc, ref, rc = run_both(topt_decode_paged_cpp, query, batch, theta, rule, 0.125, 32)
        assert_counts_close(fc, rc)
        torch.testing.assert_close(fast, ref, atol=2e-5, rtol=1e-4)
    counts = team_counts()
    assert counts.team_calls + counts.solo_calls == calls
    team_runs = torch.get_num_threads() > 1 and mode != "solo"
    if mode != "adaptive":  # adaptive: whichever the timings chose
        assert counts.team_calls == (calls if team_runs else 0)
        assert counts.solo_calls == (0 if team_runs else calls)


def test_cpp_team_mode_refuses_unknown_names():
    with pytest.raises(ValueError, match="one of adaptive, team, solo"):
        set_team_mode("dynamic")
