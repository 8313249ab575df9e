"""The CUDA backend's glue, run on CPU: decode routing, KV-write V sums, counters, batch split.

vLLM's CUDA ops cannot run with the CPU build, so the parent's KV write is
replaced by the torch scatter with reshape_and_cache_flash's semantics, the
Triton kernels run in the interpreter, and the engine config is a stub.
"""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.interpret import interpreter_env, load_interpreted
from vllm_topt import request_modes, telemetry
from benchmarks import cuda_paged as paged
from vllm_topt.config.layers import DENSE_PLAN
from vllm_topt.config.thresholds import LayerPlan
from vllm_topt.method.rules import DENSE_MODE_CODE, RESERVED_MODES, DensityCounts, ToptRule
from vllm_topt.method.reference import topt_attention_reference
from vllm_topt.config.thresholds import LayerThresholds

td, cuda_memory, cuda_backend = load_interpreted("vllm_topt.kernels.triton.decode",
                                                 "vllm_topt.backends.cuda_memory", "vllm_topt.backends.cuda")
from vllm_topt.backends import core  # noqa: E402

H, H_KV, D, BS = 4, 2, 64, 16
NUM_LAYERS = 3
MAX_MODEL_LEN = 256


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter():
    with interpreter_env():
        yield


@pytest.fixture
def topt(monkeypatch):
    rule = ToptRule("post-softmax", "none", True, k=8)
    values = [[0.08, 0.03, 0.012], [0.06, 0.02, 0.01], [0.1, 0.04, 0.02], [0.05, 0.02, 0.008]]
    plan = LayerPlan(rule, LayerThresholds([8, 64, 256], values, "post-softmax"))
    config = SimpleNamespace(
        for_layer=lambda layer: plan, layers=(plan,) * NUM_LAYERS,
        options=SimpleNamespace(telemetry_interval_s=0.0), stats_file=None, mode=telemetry.RunMode(8),
        mode_names=RESERVED_MODES, point_plans={},  # point_plans: mode code -> its plan (every layer)
    )
    # As ToptProcessConfig's, through this stub's (monkeypatched) for_layer.
    config.for_mode = lambda layer, mode: (config.for_layer(layer) if mode == 0 else DENSE_PLAN
                                           if mode == DENSE_MODE_CODE else config.point_plans[mode])
    config.plans_of_layer = lambda layer: [config.for_mode(layer, m) for m in range(len(config.mode_names))]
    vllm_config = stub_vllm_config()
    for module in (core, cuda_backend):
        monkeypatch.setattr(module, "process_config", lambda cfg, heads: config)
    monkeypatch.setattr(cuda_backend, "get_current_vllm_config", lambda: vllm_config)
    monkeypatch.setattr(cuda_memory, "_shared", {})
    monkeypatch.setattr(cuda_memory, "_row_modes", {})

    def cache_write(self, layer, key, value, kv_cache, slot_mapping):  # reshape_and_cache_flash's semantics
        paged.write_kv(key, value, *paged.kv_cache_views(kv_cache, self.head_size), slot_mapping)

    monkeypatch.setattr(cuda_backend.TritonAttentionImpl, "do_kv_cache_update", cache_write)
    telemetry.reset()
    yield config
    telemetry.reset()


def stub_vllm_config(max_num_seqs=4, capture_sizes=(), context=None):
    return SimpleNamespace(
        scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs),
        compilation_config=SimpleNamespace(cudagraph_capture_sizes=list(capture_sizes),
                                           static_forward_context=context or {}),
        model_config=SimpleNamespace(max_model_len=MAX_MODEL_LEN), cache_config=SimpleNamespace(block_size=BS),
    )


def decode_metadata(seq_lens, block_table, scratch, num_segments=2):
    from vllm.v1.attention.backends.triton_attn import TritonAttentionMetadata

    B = len(seq_lens)
    qsl = torch.arange(B + 1, dtype=torch.int32)
    seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
    empty = torch.empty(0)
    base = TritonAttentionMetadata(
        num_actual_tokens=B, max_query_len=1, query_start_loc=qsl, max_seq_len=int(seq_lens.max()),
        seq_lens=seq_lens, block_table=block_table, slot_mapping=torch.arange(B), seq_threshold_3D=8,
        num_par_softmax_segments=16, softmax_segm_output=empty, softmax_segm_max=empty, softmax_segm_expsum=empty,
        causal=True,
    )
    batch = core.ToptBatch(B, B, seq_lens, block_table, prefill=None, first_layer=0, last_layer=0)
    return core.extend_metadata(cuda_backend.ToptCudaMetadata, base, topt=batch, topt_num_segments=num_segments,
                                topt_scratch=scratch, topt_theta=torch.zeros(4, H))


def filled_cache(impl, lengths, gen):
    """A paged cache (pages out of order) written through the layer's KV update: prefill chunk, then decodes."""
    pages = [math.ceil(n / BS) for n in lengths]
    kv_cache = paged.allocate_kv_cache(sum(pages) + 2, BS, H_KV, D, torch.float32, generator=gen)
    layer = SimpleNamespace(layer_name="model.layers.0.self_attn.attn", kv_cache=kv_cache)
    physical = torch.randperm(sum(pages) + 2, generator=gen)
    block_table = torch.zeros(len(lengths), max(pages), dtype=torch.int32)
    keys, values, start = [], [], 0
    for i, n in enumerate(lengths):
        ids = physical[start : start + pages[i]]
        start += pages[i]
        block_table[i, : len(ids)] = ids
        k, v = torch.randn(n, H_KV, D, generator=gen), torch.randn(n, H_KV, D, generator=gen)
        for lo, hi in [(0, n - 2), (n - 2, n - 1), (n - 1, n)]:  # a prefill chunk, then decode writes
            impl.do_kv_cache_update(layer, k[lo:hi], v[lo:hi], kv_cache, paged.sequence_slots(ids, hi, BS, lo).int())
        keys.append(k)
        values.append(v)
    return layer, kv_cache, block_table, keys, values


@pytest.mark.parametrize("vmc_scope", ["sequence", "block"])
def test_decode_rows_go_through_topt_with_v_sums_and_counters(topt, monkeypatch, vmc_scope):
    plan = topt.for_layer(0)
    monkeypatch.setattr(topt, "for_layer", lambda layer: LayerPlan(replace(plan.rule, vmc_scope=vmc_scope),
                                                                    plan.thresholds))
    impl = cuda_backend.ToptCudaImpl(H, D, 0.3, H_KV, None, None, "auto")
    lengths = [5, 40, 70]
    gen = torch.Generator().manual_seed(0)
    layer, kv_cache, block_table, keys, values = filled_cache(impl, lengths, gen)
    pages = [math.ceil(n / BS) for n in lengths]

    state = impl._state
    assert state.v_block_sums is not None
    for i, v in enumerate(values):
        for j in range(pages[i]):
            torch.testing.assert_close(state.v_block_sums[block_table[i, j]], v[j * BS : (j + 1) * BS].sum(0),
                                       atol=1e-4, rtol=1e-5)

    query = torch.randn(3, H, D, generator=gen)
    scratch = td.ToptScratch.allocate(4, H, H_KV, D, max(pages), capacity=8, device="cpu",
                                      block_vmc=vmc_scope == "block")
    meta = decode_metadata(lengths, block_table, scratch)
    output = torch.full((3, H, D), float("nan"))
    impl.forward(layer, query, query, query, kv_cache, meta, output)

    thresholds = topt.for_layer(0).thresholds.lookup(torch.tensor(lengths)).float()
    ref_counts = DensityCounts()
    for i in range(3):
        ref, counts = topt_attention_reference(query[i], keys[i], values[i], thresholds[i], topt.for_layer(0).rule,
                                               0.3, BS)
        torch.testing.assert_close(output[i], ref, atol=2e-5, rtol=1e-4)
        ref_counts.add(counts)
    assert ref_counts.elements_kept < ref_counts.elements_visible
    # The kernel added to the layer's row of the bank; a report moves it to the per-layer counts and zeroes it.
    assert not telemetry.snapshot()
    telemetry.flush()
    assert telemetry.snapshot()[0] == ref_counts
    assert int(state.counters.sum()) == 0


@pytest.mark.parametrize("rule", [
    ToptRule("post-softmax", "none", True, k=8, vmc_scope="block"),
    ToptRule("pre-softmax", "exp-threshold", True, k=8),
], ids=["post-block-vmc", "pre-exp-threshold-vmc"])
def test_rows_asking_for_dense_keep_every_element_beside_sparse_rows_and_count_apart(topt, monkeypatch, rule):
    """Per-request modes as device data: the builder's row modes make row 1 dense in the same launch."""
    plan = topt.for_layer(0)
    thresholds = plan.thresholds
    if rule.placement.value == "pre-softmax":  # thresholds on the score itself
        thresholds = LayerThresholds([8, 64, 256], [[2.0, 1.5, 1.0]] * H, "pre-softmax")
    monkeypatch.setattr(topt, "for_layer", lambda layer: LayerPlan(rule, thresholds))
    impl = cuda_backend.ToptCudaImpl(H, D, 0.3, H_KV, None, None, "auto")
    lengths = [40, 70, 70]
    gen = torch.Generator().manual_seed(1)
    layer, kv_cache, block_table, keys, values = filled_cache(impl, lengths, gen)
    query = 3 * torch.randn(3, H, D, generator=gen)
    scratch = td.ToptScratch.allocate(4, H, H_KV, D, block_table.shape[1], capacity=8, device="cpu",
                                      block_vmc=rule.block_vmc)
    meta = decode_metadata(lengths, block_table, scratch)
    dense = torch.tensor([False, True, False])
    meta.topt.modes = dense.to(torch.int32)
    modes = request_modes.RowModes(4, "cpu")
    meta.topt.row_modes = modes.fill(meta.topt.modes)
    output = torch.full((3, H, D), float("nan"))
    impl.forward(layer, query, query, query, kv_cache, meta, output)

    theta = thresholds.lookup(torch.tensor(lengths)).float()
    sparse_counts, dense_counts = DensityCounts(), DensityCounts()
    for i in range(3):
        row_rule = replace(rule, dense=True) if dense[i] else rule
        ref, counts = topt_attention_reference(query[i], keys[i], values[i], theta[i], row_rule, 0.3, BS)
        torch.testing.assert_close(output[i], ref, atol=2e-5, rtol=1e-4)
        (dense_counts if dense[i] else sparse_counts).add(counts)
    assert sparse_counts.elements_kept < sparse_counts.elements_visible
    assert dense_counts.elements_kept == dense_counts.elements_visible
    telemetry.flush()
    assert telemetry.snapshot()[0] == sparse_counts
    assert telemetry.snapshot(DENSE_MODE_CODE)[0] == dense_counts
    # A step whose requests say nothing: the buffer goes back to all sparse.
    assert int(modes.fill(None).sum()) == 0 and not modes.dirty


@pytest.mark.parametrize("placement", ["post-softmax", "pre-softmax"])
def test_rows_of_a_request_point_use_its_thresholds_and_k_in_the_same_launch(topt, monkeypatch, placement):
    """A request point (mode 2: its own θ(n) and a larger k) beside rows of the server's file and a dense row:
    each row as the reference gives it under its own mode's plan, counted in its mode's plane."""
    if placement == "pre-softmax":
        rule = ToptRule("pre-softmax", "exp-threshold", True, k=8)
        server = LayerThresholds([8, 64, 256], [[2.0, 1.5, 1.0]] * H, "pre-softmax")
        point = LayerThresholds([8, 64, 256], [[1.0, 0.5, 0.2]] * H, "pre-softmax")
    else:
        rule = ToptRule("post-softmax", "none", True, k=8, vmc_scope="block")
        server = topt.for_layer(0).thresholds
        point = LayerThresholds([8, 64, 256], [[0.02, 0.01, 0.004]] * H, "post-softmax")
    point_rule = replace(rule, k=36)
    monkeypatch.setattr(topt, "for_layer", lambda layer: LayerPlan(rule, server))
    monkeypatch.setattr(topt, "mode_names", RESERVED_MODES + ("wide",))
    topt.point_plans[2] = LayerPlan(point_rule, point)
    impl = cuda_backend.ToptCudaImpl(H, D, 0.3, H_KV, None, None, "auto")
    lengths = [40, 70, 70, 30]  # row 3: n <= the point's k, above the server's (kept whole)
    codes = torch.tensor([0, 2, 1, 2], dtype=torch.int32)
    gen = torch.Generator().manual_seed(2)
    layer, kv_cache, block_table, keys, values = filled_cache(impl, lengths, gen)
    query = 3 * torch.randn(len(lengths), H, D, generator=gen)
    scratch = td.ToptScratch.allocate(8, H, H_KV, D, block_table.shape[1], capacity=16, device="cpu",
                                      block_vmc=rule.block_vmc)
    meta = decode_metadata(lengths, block_table, scratch)
    meta.topt.modes = codes
    meta.topt.row_modes = request_modes.RowModes(8, "cpu").fill(codes)
    output = torch.full((len(lengths), H, D), float("nan"))
    impl.forward(layer, query, query, query, kv_cache, meta, output)

    plans = {0: (rule, server), 1: (replace(rule, dense=True), server), 2: (point_rule, point)}
    expected = {code: DensityCounts() for code in plans}
    for i, code in enumerate(codes.tolist()):
        row_rule, thresholds = plans[code]
        theta = thresholds.lookup(torch.tensor([lengths[i]])).float()[0]
        ref, counts = topt_attention_reference(query[i], keys[i], values[i], theta, row_rule, 0.3, BS)
        torch.testing.assert_close(output[i], ref, atol=2e-5, rtol=1e-4, msg=lambda m: f"row {i}: {m}")
        expected[code].add(counts)
    assert expected[2].elements_kept < expected[2].elements_visible
    telemetry.flush()
    for code in plans:
        got = telemetry.snapshot(code)[0]
        # The kernel runs at the least k of the modes: a row between that and its own k is kept whole but counted
        # as thresholded; the element, V-row and V-block counts are exact.
        assert (got.rows, got.elements_kept, got.v_rows_read, got.v_blocks_read) == (
            expected[code].rows, expected[code].elements_kept, expected[code].v_rows_read,
            expected[code].v_blocks_read), code


def builder_stub(max_decodes=8, layer_names=(), context=None):
    builder = cuda_backend.ToptCudaMetadataBuilder.__new__(cuda_backend.ToptCudaMetadataBuilder)
    builder.layer_names = list(layer_names)
    builder.vllm_config = stub_vllm_config(max_decodes, context=context)
    builder.topt_buffers = cuda_memory.shared_decode_buffers(builder.vllm_config, H, H_KV, D, False, "cpu")
    builder.topt_row_modes = cuda_memory.shared_row_modes(builder.vllm_config, "cpu")
    builder._prepared_cache_ptr = None
    return builder


def common_metadata(query_lens, seq_lens):
    from vllm.v1.attention.backend import CommonAttentionMetadata

    qsl = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    B = len(query_lens)
    return CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=torch.tensor(seq_lens, dtype=torch.int32), num_reqs=B,
        num_actual_tokens=int(qsl[-1]), max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        block_table_tensor=torch.arange(B * 8, dtype=torch.int32).view(B, 8), slot_mapping=torch.arange(int(qsl[-1])),
        seq_lens_cpu_upper_bound=torch.tensor(seq_lens, dtype=torch.int32),
    )


@pytest.fixture
def parent_build(monkeypatch):
    from vllm.v1.attention.backends.triton_attn import (
        TritonAttentionMetadata,
        TritonAttentionMetadataBuilder,
    )

    def build(self, common_prefix_len, cam, fast_build=False):
        empty = torch.empty(0)
        return TritonAttentionMetadata(
            num_actual_tokens=cam.num_actual_tokens, max_query_len=cam.max_query_len,
            query_start_loc=cam.query_start_loc, max_seq_len=cam.max_seq_len, seq_lens=cam.seq_lens,
            block_table=cam.block_table_tensor, slot_mapping=cam.slot_mapping, seq_threshold_3D=8,
            num_par_softmax_segments=16, softmax_segm_output=empty, softmax_segm_max=empty,
            softmax_segm_expsum=empty, causal=True,
        )

    monkeypatch.setattr(TritonAttentionMetadataBuilder, "build", build)


def test_builder_splits_decodes_from_prefills(parent_build):
    builder = builder_stub()
    mixed = builder.build(0, common_metadata([1, 1, 5, 3], [40, 9, 5, 20]))
    assert (mixed.topt.num_decodes, mixed.topt.num_decode_tokens) == (2, 2)
    assert mixed.topt.decode_seq_lens.tolist() == [40, 9] and mixed.topt.decode_block_table.shape[0] == 2
    assert mixed.topt.prefill.query_start_loc.tolist() == [0, 5, 8] and mixed.topt.prefill.num_actual_tokens == 8
    assert mixed.topt_num_segments == builder.topt_buffers.segments[2]
    decode_only = builder.build(0, common_metadata([1, 1, 1], [3, 4, 5]))
    assert decode_only.topt.num_decodes == 3 and decode_only.topt.prefill is None
    prefill_only = builder.build(0, common_metadata([4, 2], [4, 9]))
    assert prefill_only.topt.num_decodes == 0 and prefill_only.topt.prefill.num_actual_tokens == 6
    assert set(decode_only.topt.row_modes.tolist()) == {0}  # nobody asked for a mode
    with pytest.raises(RuntimeError, match="decode requests first"):
        builder.build(0, common_metadata([1, 4, 1], [3, 9, 5]))
    with pytest.raises(RuntimeError, match="buffers sized for"):
        builder_stub(max_decodes=2).build(0, common_metadata([1, 1, 1], [3, 4, 5]))


def test_sliding_window_layer_counts_its_window_on_the_device(topt, monkeypatch):
    """A sliding-window layer runs TRITON_ATTN's forward (the parent's); its decode rows add fully-kept window
    counts to the layer's device counters, which telemetry reads like the kernel's."""
    from vllm_topt.method.rules import window_counters

    window, lengths = 24, [5, 40, 70]
    monkeypatch.setattr(topt, "for_layer", lambda layer: LayerPlan(ToptRule(dense=True), None))
    impl = cuda_backend.ToptCudaImpl(H, D, 0.3, H_KV, None, window, "auto")
    assert impl.topt_window == window
    kv_cache = paged.allocate_kv_cache(16, BS, H_KV, D, torch.float32, generator=torch.Generator().manual_seed(0))
    layer = SimpleNamespace(layer_name="model.layers.0.self_attn.attn", kv_cache=kv_cache)
    state = impl.layer_state(layer, kv_cache)
    assert state.v_block_sums is None and state.thresholds is None
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    batch = core.ToptBatch(3, 3, seq_lens, torch.zeros(3, 5, dtype=torch.int32), prefill=None, first_layer=0,
                           last_layer=0)
    impl._count_window_rows(state, batch, BS)
    telemetry.flush_device_counters()
    counts = telemetry.snapshot()[0]
    assert counts == DensityCounts.from_counters(window_counters(seq_lens, window, H, H_KV, BS).sum(0).tolist())
    assert counts.elements_kept == counts.elements_visible == H * (5 + window + window)
    assert counts.v_blocks_visible == H_KV * (1 + 2 + 3)  # rows 40 and 70 span 2 and 3 pages of 16


def test_the_builder_copies_the_decode_rows_modes_into_the_device_buffer(topt, monkeypatch, parent_build):
    """Per-request modes reach the kernels as data: one persistent buffer, rewritten by every build."""
    builder = builder_stub()
    codes = np.zeros(8, dtype=np.int32)
    monkeypatch.setitem(request_modes._current, "modes", SimpleNamespace(codes=codes))
    codes[1], codes[2] = 1, 2
    meta = builder.build(0, common_metadata([1, 1, 1, 4], [3, 4, 5, 9]))
    assert meta.topt.modes.tolist() == [0, 1, 2]
    assert meta.topt.row_modes.tolist() == [0, 1, 2, 0, 0, 0, 0, 0]
    assert meta.topt.row_modes.data_ptr() == builder.topt_row_modes.tensor.data_ptr()  # what a graph captured
    codes[:] = 0
    meta = builder.build(0, common_metadata([1, 1], [3, 4]))
    assert meta.topt.modes is None and meta.topt.row_modes.tolist() == [0] * 8


def test_window_rows_of_requests_asking_for_dense_are_counted_apart(topt, monkeypatch):
    from vllm_topt.method.rules import window_counters

    impl, layer, kv_cache = window_layer(topt, monkeypatch)
    lengths = [5, 40, 70]
    meta = window_metadata(lengths)
    meta.topt.modes = torch.tensor([0, 1, 0], dtype=torch.int32)
    meta.topt.row_modes = request_modes.RowModes(4, "cpu").fill(meta.topt.modes)
    impl._count_window_rows(impl._state, meta.topt, BS)
    rows = window_counters(torch.tensor(lengths), 24, H, H_KV, BS)
    telemetry.flush()
    assert telemetry.snapshot()[0] == DensityCounts.from_counters(rows[[0, 2]].sum(0).tolist())
    assert telemetry.snapshot(DENSE_MODE_CODE)[0] == DensityCounts.from_counters(rows[1].tolist())


def test_sliding_window_layer_with_thresholds_is_refused(topt, monkeypatch):
    monkeypatch.setattr(topt, "path", "old.json", raising=False)
    impl = cuda_backend.ToptCudaImpl(H, D, 0.3, H_KV, None, 24, "auto")
    kv_cache = paged.allocate_kv_cache(4, BS, H_KV, D, torch.float32, generator=torch.Generator().manual_seed(0))
    layer = SimpleNamespace(layer_name="model.layers.0.self_attn.attn", kv_cache=kv_cache)
    with pytest.raises(RuntimeError, match="sliding window but thresholds.*recalibrate"):
        impl.layer_state(layer, kv_cache)


# --------------------------------------------------------------------------- CUDA graphs: what a replay runs


def window_layer(topt, monkeypatch, index=0, window=24):
    monkeypatch.setattr(topt, "for_layer", lambda layer: LayerPlan(ToptRule(dense=True), None))
    impl = cuda_backend.ToptCudaImpl(H, D, 0.3, H_KV, None, window, "auto")
    kv_cache = paged.allocate_kv_cache(16, BS, H_KV, D, torch.float32, generator=torch.Generator().manual_seed(0))
    layer = SimpleNamespace(layer_name=f"model.layers.{index}.self_attn.attn", kv_cache=kv_cache, impl=impl)
    impl.layer_state(layer, kv_cache)  # as the builder's first build does, before any capture
    return impl, layer, kv_cache


def window_metadata(lengths):
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    batch = core.ToptBatch(len(lengths), len(lengths), seq_lens, torch.zeros(len(lengths), 5, dtype=torch.int32),
                           prefill=None, first_layer=0, last_layer=0)
    return SimpleNamespace(topt=batch)


def test_window_rows_are_counted_inside_a_captured_forward(topt, monkeypatch):
    """Under capture, Python in forward runs once and only device work is replayed: the window rows must be
    added to the bank by that one run (device ops), or a replayed step would never count them."""
    from vllm_topt.method.rules import window_counters

    impl, layer, kv_cache = window_layer(topt, monkeypatch)
    monkeypatch.setattr(cuda_backend.TritonAttentionImpl, "forward", lambda self, *a, **k: None)
    monkeypatch.setattr(cuda_backend, "_capturing", lambda: True)
    lengths = [5, 40, 0]  # the last row pads the batch up to the graph's size: no row, no keys
    q = torch.zeros(3, H, D)
    impl.forward(layer, q, q, q, kv_cache, window_metadata(lengths), torch.zeros(3, H, D))
    bank_row = impl._state.counters
    want = window_counters(torch.tensor(lengths), 24, H, H_KV, BS).sum(0)
    assert torch.equal(bank_row[0], want) and int(want[0]) == 2


def test_warm_up_and_capture_counts_are_dropped_at_the_first_real_step(topt, monkeypatch):
    impl, layer, kv_cache = window_layer(topt, monkeypatch)
    monkeypatch.setattr(cuda_backend.TritonAttentionImpl, "forward", lambda self, *a, **k: None)
    capturing = {"now": False}
    monkeypatch.setattr(cuda_backend, "_capturing", lambda: capturing["now"])
    q = torch.zeros(2, H, D)
    meta = window_metadata([30, 40])

    def step():
        impl.forward(layer, q, q, q, kv_cache, meta, torch.zeros(2, H, D))

    step()  # a warm-up run before capture (eager)
    capturing["now"] = True
    step()  # the capture
    capturing["now"] = False
    telemetry.begin_step(2, False, capture_phase=True)  # vLLM still capturing other sizes: nothing dropped
    assert int(impl._state.counters[0, 0]) == 4
    telemetry.begin_step(2, False, capture_phase=False)  # the first real step
    assert int(impl._state.counters.sum()) == 0 and not telemetry.snapshot()
    assert telemetry.batch_counts()["decode_only"] == 1
    step()
    telemetry.flush()
    assert telemetry.snapshot()[0].rows == 2


def test_eager_runs_drop_nothing(topt, monkeypatch):
    impl, layer, kv_cache = window_layer(topt, monkeypatch)
    monkeypatch.setattr(cuda_backend.TritonAttentionImpl, "forward", lambda self, *a, **k: None)
    q = torch.zeros(2, H, D)
    impl.forward(layer, q, q, q, kv_cache, window_metadata([30, 40]), torch.zeros(2, H, D))
    telemetry.begin_step(2, False, capture_phase=True)  # eager mode: vLLM's capture flag never drops
    telemetry.flush()
    assert telemetry.snapshot()[0].rows == 2


def test_every_layer_counts_into_one_bank_read_with_one_copy(topt, monkeypatch):
    layers = [window_layer(topt, monkeypatch, index=i) for i in range(NUM_LAYERS)]
    monkeypatch.setattr(cuda_backend.TritonAttentionImpl, "forward", lambda self, *a, **k: None)
    q = torch.zeros(2, H, D)
    for impl, layer, kv_cache in layers:
        impl.forward(layer, q, q, q, kv_cache, window_metadata([30, 40]), torch.zeros(2, H, D))
    bank = telemetry._bank[0].counters
    rows = [impl._state.counters for impl, _, _ in layers]
    # Each layer's two rows (server's mode, asked for dense) are views of the bank's two planes.
    assert [r.data_ptr() for r in rows] == [bank[0, i].data_ptr() for i in range(NUM_LAYERS)]
    assert all(r.stride(0) == bank.stride(0) for r in rows)
    copies = []
    monkeypatch.setattr(telemetry, "_start_copy", lambda b, original=telemetry._start_copy: (copies.append(b),
                                                                                              original(b)))
    lines = []
    telemetry.poll_report(0.0, SimpleNamespace(info=lines.append), None, telemetry.RunMode(8))
    assert len(copies) == 1 and sorted(telemetry.snapshot()) == list(range(NUM_LAYERS))
    assert len(lines) == 1 and "of attention elements" in lines[0]


def test_reports_are_written_by_the_builder_not_by_forward(topt, monkeypatch, tmp_path):
    """A replayed decode step runs no Python in forward; the builder's build runs on every step."""
    impl, layer, kv_cache = window_layer(topt, monkeypatch)
    stats = tmp_path / "stats.json"
    monkeypatch.setattr(topt, "stats_file", str(stats))
    monkeypatch.setattr(cuda_backend.TritonAttentionImpl, "forward", lambda self, *a, **k: None)
    impl.topt = topt
    q = torch.zeros(2, H, D)
    impl.forward(layer, q, q, q, kv_cache, window_metadata([30, 40]), torch.zeros(2, H, D))
    assert not stats.exists()
    context = {layer.layer_name: layer}
    builder = builder_stub(layer_names=[layer.layer_name], context=context)
    monkeypatch.setattr(cuda_backend.ToptCudaMetadataBuilder, "_capture_phase", lambda self: False)
    builder.topt_batch(0, common_metadata([1, 1], [30, 40]), None, False)
    written = telemetry.read_stats_file(str(stats))
    assert written["total"]["rows"] == 2 and written["batches"]["decode_only"] == 1


# --------------------------------------------------------------------------- memory vLLM accounts for


def test_decode_rows_are_bounded_by_max_num_seqs_not_capture_sizes():
    config = stub_vllm_config(max_num_seqs=8, capture_sizes=[1, 2, 4, 8, 16, 256, 512])
    assert cuda_memory.max_decode_rows(config) == 8


def test_decode_buffers_are_allocated_when_the_layer_is_built(topt):
    """Before any builder or KV cache exists (vLLM's profiling runs in between), and shared by the builders."""
    assert not cuda_memory._shared
    cuda_backend.ToptCudaImpl(H, D, 0.3, H_KV, None, None, "auto")
    (buffers,) = cuda_memory._shared.values()
    assert buffers.theta.shape == (4, H)  # max_num_seqs rows
    assert buffers.scratch.block_max.shape == (4, H, MAX_MODEL_LEN // BS)
    builder = builder_stub(max_decodes=4)
    assert builder.topt_buffers is buffers


def test_a_group_of_window_layers_allocates_no_decode_buffers(topt, monkeypatch, parent_build):
    impl, layer, kv_cache = window_layer(topt, monkeypatch)
    assert not cuda_memory._shared
    builder = cuda_backend.ToptCudaMetadataBuilder.__new__(cuda_backend.ToptCudaMetadataBuilder)
    builder.layer_names = [layer.layer_name]
    builder.vllm_config = stub_vllm_config(context={layer.layer_name: layer})
    assert builder.topt_windowed_only
    monkeypatch.setattr(cuda_backend.TritonAttentionMetadataBuilder, "__init__", lambda self, *a: None)
    monkeypatch.setattr(cuda_backend.ToptCudaMetadataBuilder, "_capture_phase", lambda self: False)
    cuda_backend.ToptCudaMetadataBuilder.__init__(builder, None, builder.layer_names, builder.vllm_config, "cpu")
    assert builder.topt_buffers is None and not cuda_memory._shared
    meta = builder.build(0, common_metadata([1, 1], [30, 40]))
    assert meta.topt.num_decodes == 2 and meta.topt_scratch is None


def test_kv_budget_leaves_exactly_the_v_sums_the_layers_allocate(topt, monkeypatch):
    """The worker hook shrinks vLLM's KV budget by the V sums' share, by the bytes layer_state allocates."""
    num_blocks = 40
    impl = cuda_backend.ToptCudaImpl(H, D, 0.3, H_KV, None, None, "auto")
    kv_cache = paged.allocate_kv_cache(num_blocks, BS, H_KV, D, torch.bfloat16,
                                       generator=torch.Generator().manual_seed(0))
    layer = SimpleNamespace(layer_name="model.layers.0.self_attn.attn", kv_cache=kv_cache)
    v_sums = impl.layer_state(layer, kv_cache).v_block_sums
    v_sum_bytes_per_layer_block = v_sums.numel() * v_sums.element_size() // num_blocks
    kv_bytes_per_layer_block = kv_cache.numel() * kv_cache.element_size() // num_blocks

    monkeypatch.setattr("vllm_topt.config.layers.process_config", lambda cfg, heads: topt)
    vllm_config = SimpleNamespace(
        model_config=SimpleNamespace(get_num_kv_heads=lambda p: H_KV, get_head_size=lambda: D, dtype=torch.bfloat16,
                                     get_num_attention_heads=lambda p: H),
        cache_config=SimpleNamespace(block_size=BS, cache_dtype="auto"), parallel_config=None,
        attention_config=SimpleNamespace(backend=SimpleNamespace(name="TOPT")),
    )
    per_block = cuda_memory.block_bytes(vllm_config)
    assert per_block.kv_cache == NUM_LAYERS * kv_bytes_per_layer_block
    assert per_block.v_sums == NUM_LAYERS * v_sum_bytes_per_layer_block
    assert per_block.v_sum_share == pytest.approx(1 / (BS + 1))  # bf16: 4 B of V sum per 2 x BS x 2 B of K and V

    class Worker:
        def __init__(self, config):
            self.vllm_config = config

        def determine_available_memory(self):
            return 10 * 2**30

    cuda_memory.install_kv_budget_hook(Worker)
    budget = Worker(vllm_config).determine_available_memory()
    blocks = budget // per_block.kv_cache
    assert blocks * (per_block.kv_cache + per_block.v_sums) <= 10 * 2**30
    assert (blocks + 1) * (per_block.kv_cache + per_block.v_sums) > 10 * 2**30 - per_block.kv_cache
    dense = SimpleNamespace(**{**vars(vllm_config), "attention_config": SimpleNamespace(backend=None)})
    assert Worker(dense).determine_available_memory() == 10 * 2**30
