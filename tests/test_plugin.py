"""Registration and platform selection (no engine): CPU honours TOPT; CUDA resolves its Triton backend."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

from vllm_topt import plugin, vllm_support


@pytest.fixture(scope="module")
def member():
    plugin.register()
    plugin.register()  # idempotent
    return plugin.topt_backend_member()


def selector(**overrides):
    from vllm.v1.attention.selector import AttentionSelectorConfig

    return AttentionSelectorConfig(head_size=64, dtype=torch.float32, kv_cache_dtype="auto", block_size=32, **overrides)


def test_member_survives_pickling_into_fresh_processes(member):
    # Spawned engine processes unpickle the config before loading plugins.
    payload = pickle.dumps(member)
    assert b"vllm_topt.plugin" in payload and pickle.loads(payload) is member


def test_cpu_platform_selects_topt_and_keeps_others(member):
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    assert CpuPlatform.get_attn_backend_cls(member, selector()) == plugin.CPU_BACKEND_PATH
    dense = CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CPU_ATTN, selector())
    assert dense == AttentionBackendEnum.CPU_ATTN.get_path()
    with pytest.raises(NotImplementedError, match="not MLA"):
        CpuPlatform.get_attn_backend_cls(member, selector(use_mla=True))


def cuda_backend_class(member, monkeypatch):
    """What CudaPlatform.get_attn_backend_cls resolves for a selected backend (its module
    cannot be imported with the CPU wheel); it then asks validate_configuration."""
    from vllm.v1.attention.backends import registry

    monkeypatch.setitem(registry._ATTN_OVERRIDES, member, plugin.CUDA_BACKEND_PATH)
    return member.get_class()


def test_cuda_backend_accepts_supported_configurations(member, monkeypatch):
    from vllm.platforms.interface import DeviceCapability
    from vllm.v1.attention.backend import AttentionCGSupport

    backend = cuda_backend_class(member, monkeypatch)
    assert backend.get_name() == "TOPT"
    for head_size, dtype, block_size in [(128, torch.bfloat16, 16), (64, torch.float16, 32), (256, torch.float32, 64)]:
        config = selector()._replace(head_size=head_size, dtype=dtype, block_size=block_size)
        assert backend.validate_configuration(device_capability=DeviceCapability(9, 0), **config._asdict()) == []
    assert backend.get_builder_cls()._cudagraph_support == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    assert backend.get_builder_cls().reorder_batch_threshold == 1


def test_cuda_backend_refuses_what_its_kernel_cannot_do(member, monkeypatch):
    from vllm.platforms.interface import DeviceCapability

    backend = cuda_backend_class(member, monkeypatch)

    def reasons(capability=(9, 0), **overrides):
        config = selector()._replace(**overrides)._asdict()
        return backend.validate_configuration(device_capability=DeviceCapability(*capability), **config)

    assert "head_size not supported" in reasons(head_size=80)
    assert "kv_cache_dtype not supported" in reasons(kv_cache_dtype="fp8")
    assert "block_size not supported" in reasons(block_size=8)
    # Sliding-window layers are served (TRITON_ATTN's kernel runs them); a model with a window on every
    # layer is refused by config_refusals instead (tests/test_cuda_refusals.py).
    assert reasons(has_sliding_window=True) == []
    assert "attention sinks not supported" in reasons(has_sink=True)
    assert "MLA not supported" in reasons(use_mla=True)
    assert "KV connector not supported" in reasons(use_kv_connector=True)
    assert "compute capability not supported" in reasons(capability=(7, 5))


def test_batch_split_hands_the_parent_the_requests_after_the_decodes():
    """The shared split (both platforms): decodes first, the rest sliced with vLLM's own helper."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from vllm_topt.backends.core import split_decode_rows

    # Two decodes, then prefills of 5 and 3 tokens.
    qsl = torch.tensor([0, 1, 2, 7, 10], dtype=torch.int32)
    seq_lens = torch.tensor([40, 9, 5, 20], dtype=torch.int32)
    table = torch.arange(16, dtype=torch.int32).view(4, 4)
    slots = torch.arange(10)
    cam = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq_lens, num_reqs=4, num_actual_tokens=10,
        max_query_len=5, max_seq_len=40, block_table_tensor=table, slot_mapping=slots,
        seq_lens_cpu_upper_bound=seq_lens,
    )
    num_decodes, num_decode_tokens, part = split_decode_rows(cam)
    assert (num_decodes, num_decode_tokens) == (2, 2)
    assert part.num_reqs == 2 and part.num_actual_tokens == 8 and part.max_query_len == 5
    assert part.query_start_loc.tolist() == [0, 5, 8] and part.query_start_loc_cpu.tolist() == [0, 5, 8]
    assert part.seq_lens.tolist() == [5, 20] and part.max_seq_len >= 20  # vLLM keeps an upper bound
    assert torch.equal(part.block_table_tensor, table[2:]) and torch.equal(part.slot_mapping, slots[2:])
    assert split_decode_rows(dataclasses.replace(cam, query_start_loc_cpu=torch.tensor([0, 1, 2, 3, 4]),
                                                 num_actual_tokens=4))[2] is None
    with pytest.raises(RuntimeError, match="decode requests first"):
        split_decode_rows(dataclasses.replace(cam, query_start_loc_cpu=torch.tensor([0, 1, 6, 7, 10])))


def test_vllm_version_outside_the_supported_range_is_refused():
    import re

    from packaging.version import Version

    first, end = vllm_support.SUPPORTED_VLLM
    (major, minor), (end_major, end_minor) = Version(first).release[:2], Version(end).release[:2]
    last = f"{end_major}.{end_minor - 1}.4" if end_minor else f"{end_major - 1}.99.0"  # the last supported minor
    for version in (f"{first}.0", f"{major}.{minor}.3+cpu", last):
        vllm_support.check_vllm_version(version)
    below = f"{major}.{minor - 1}.2" if minor else f"{major - 1}.99.0"
    for version in (below, f"{end}.0", f"{end_major + 1}.0.0"):
        with pytest.raises(vllm_support.UnsupportedVllmError,
                           match=re.escape(f"supports vLLM >= {first}, < {end}; this is vLLM {version}")):
            vllm_support.check_vllm_version(version)


def test_wrapped_platform_methods_pass_every_argument_through(member):
    """The CPU wrapper forwards positional and keyword arguments it does not know to vLLM's method."""
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    by_keyword = CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CPU_ATTN, selector(), num_heads=8)
    by_position = CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CPU_ATTN, selector(), 8)
    assert by_keyword == by_position == AttentionBackendEnum.CPU_ATTN.get_path()


def test_small_machines_get_a_binding_for_every_core():
    # vLLM's `auto` binding would leave a 2-core machine's model one thread.
    assert plugin.every_core_binding([1, 3]) == "1,3"
    assert plugin.every_core_binding(list(range(16))) is None  # one core of many: keep `auto`
    assert plugin.every_core_binding([0]) is None  # nothing to give
