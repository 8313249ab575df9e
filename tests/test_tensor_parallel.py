"""Tensor parallelism: each rank applies the thresholds of its own global heads."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from tests.test_thresholds import fake_hf_config, valid_file_dict
from vllm_topt.config import layers as layer_state
from vllm_topt.config.layers import local_head_slice


def test_local_head_slice():
    assert local_head_slice(8, 0, 2) == slice(0, 4)
    assert local_head_slice(8, 1, 2) == slice(4, 8)
    assert local_head_slice(9, 2, 3) == slice(6, 9)
    with pytest.raises(ValueError):
        local_head_slice(9, 0, 2)


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_each_rank_looks_up_its_own_heads(tmp_path, monkeypatch, tp_size):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(valid_file_dict()))
    hf_config = fake_hf_config()
    vllm_config = SimpleNamespace(
        additional_config={"topt": {"thresholds": str(path)}},
        model_config=SimpleNamespace(hf_config=hf_config, model="tiny"),
    )
    import vllm.distributed as dist

    n = torch.tensor([40, 100, 300, 1000])
    per_rank = []
    for rank in range(tp_size):
        monkeypatch.setattr(dist, "get_tensor_model_parallel_rank", lambda: rank)
        monkeypatch.setattr(dist, "get_tensor_model_parallel_world_size", lambda: tp_size)
        cfg = layer_state.process_config(vllm_config, 4 // tp_size)
        per_rank.append(cfg.for_layer(1).thresholds.lookup(n))
    joined = torch.cat(per_rank, dim=1)
    assert joined.shape == (4, 4)
    # Heads were calibrated with distinct thresholds ((h + 1) / 4 scaling): rank order must match head order.
    ratios = joined / joined[:, :1]
    torch.testing.assert_close(ratios, torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=joined.dtype).expand(4, 4))
