"""The CUDA backend's front-end refusals: the same core code as on CPU, on real engine configurations.

The CPU server tests (tests/test_server.py) prove the front end exits with these messages before an
engine starts; here the CUDA Backend class reads the same configurations. Its module imports on CPU
(vLLM's TRITON_ATTN classes import without a GPU).
"""

from __future__ import annotations

import pytest

from tests.engine_run import DEFAULT_MODEL
from tests.model_folders import sliding_window_model, variant_of_default_model


def engine_config(model=DEFAULT_MODEL, dtype="float32", **engine_args):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model), dtype=dtype, max_model_len=2048, **engine_args).create_engine_config()


@pytest.fixture(scope="module")
def cuda_backend():
    from vllm_topt.backends.cuda import ToptCudaBackend

    return ToptCudaBackend


def test_cuda_serves_the_default_model(cuda_backend):
    assert cuda_backend.config_refusals(engine_config()) == []


def test_cuda_serves_gemma3_with_its_sliding_window_layers(cuda_backend, gemma_model):
    # Its sliding-window layers run on TRITON_ATTN's kernel, the global layers through Top-θ.
    assert cuda_backend.config_refusals(engine_config(gemma_model, dtype="bfloat16")) == []


def test_cuda_refuses_fp32_where_its_kernel_spills(cuda_backend, gemma_model, tmp_path):
    # Above head size 64 the fp32 sparse decode kernel spills (aot --full); bf16 is served. SmolLM2's is 64.
    assert any("fp32 at head size 256" in r for r in cuda_backend.config_refusals(engine_config(gemma_model)))
    head128 = variant_of_default_model(tmp_path, "head128", head_dim=128)
    assert any("fp32 at head size 128" in r and "bf16" in r for r in cuda_backend.config_refusals(engine_config(head128)))
    assert cuda_backend.config_refusals(engine_config(head128, dtype="bfloat16")) == []


@pytest.mark.parametrize("case, expected", [
    ("fp8-kv-cache", "KV cache dtype fp8"),
    ("head-size-80", "head size 80"),
    ("sliding-window", "sliding-window attention on every layer"),
    ("alibi", "ALiBi"),
])
def test_cuda_refuses_what_its_kernel_cannot_serve(cuda_backend, tmp_path, case, expected):
    config = {
        "fp8-kv-cache": lambda: engine_config(kv_cache_dtype="fp8"),
        "head-size-80": lambda: engine_config(variant_of_default_model(tmp_path, "head80", head_dim=80)),
        "sliding-window": lambda: engine_config(sliding_window_model(tmp_path)),
        "alibi": lambda: engine_config(variant_of_default_model(tmp_path, "alibi", alibi=True)),
    }[case]()
    assert expected in cuda_backend.config_refusals(config)
    with pytest.raises(NotImplementedError, match=f"TOPT does not support .*{expected}.*TRITON_ATTN"):
        cuda_backend.check_config(config)


def test_topt_not_its_dense_parent_decides_which_kv_cache_dtypes_it_serves(cuda_backend):
    # From vLLM 0.33 CPU_ATTN overrides supports_kv_cache_dtype and accepts float16/bfloat16 whatever the list says.
    from vllm_topt.backends.cpu import ToptCpuBackend

    dtypes = (None, "auto", "float16", "bfloat16", "fp8")
    assert [ToptCpuBackend.supports_kv_cache_dtype(d) for d in dtypes] == [True, True, False, False, False]
    assert [cuda_backend.supports_kv_cache_dtype(d) for d in dtypes] == [True, True, True, True, False]


def test_cuda_takes_request_points_that_differ_in_thresholds_and_k_only(cuda_backend, tmp_path):
    """One launch serves every request mode's rows, so placement and compensation must match the server's file;
    k and θ may differ (a copy of the speed file at k=40 is served; the quality file, block VMC, is refused)."""
    import json

    from vllm_topt.config.thresholds import ThresholdFileError, find_shipped_thresholds
    from transformers import AutoConfig

    speed = find_shipped_thresholds(AutoConfig.from_pretrained(DEFAULT_MODEL), "speed")
    wider = json.loads(speed.read_text()) | {"target_k": 40}
    (tmp_path / "k40.json").write_text(json.dumps(wider))

    def config(points):
        return engine_config(additional_config={"topt": {"operating_point": "speed", "request_points": points}})

    cuda_backend.check_config(config({"k40": str(tmp_path / "k40.json")}))
    with pytest.raises(ThresholdFileError, match=r"request point 'quality' .* layer 0 has vmc_scope sequence vs "
                                                 r"block.*or serve on CPU"):
        cuda_backend.check_config(config({"quality": "quality"}))
