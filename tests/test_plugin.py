"""Registration and platform selection (no engine): CPU honours TOPT, CUDA refuses clearly."""

from __future__ import annotations

import pickle

import pytest
import torch

from vllm_topt import plugin


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


def test_cuda_backend_refuses_with_reason(member, monkeypatch):
    """What CudaPlatform.get_attn_backend_cls does with a selected backend (its module
    cannot be imported with the CPU wheel): resolve the class, ask validate_configuration."""
    from vllm.platforms.interface import DeviceCapability
    from vllm.v1.attention.backends import registry

    monkeypatch.setitem(registry._ATTN_OVERRIDES, member, plugin.CUDA_BACKEND_PATH)
    backend_class = member.get_class()
    assert backend_class.get_name() == "TOPT"
    reasons = backend_class.validate_configuration(device_capability=DeviceCapability(9, 0), **selector()._asdict())
    assert reasons and "TOPT's CUDA decode kernel is not available" in reasons[0]
