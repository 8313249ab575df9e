"""vLLM general plugin: registers the TOPT attention backend.

vLLM calls `register()` in every process (API server, engine core, workers),
possibly more than once; every step here is idempotent.
"""

from __future__ import annotations

from vllm_topt.log import get_logger


logger = get_logger()

BACKEND_NAME = "TOPT"
CPU_BACKEND_PATH = "vllm_topt.backends.cpu.ToptCpuBackend"
CUDA_BACKEND_PATH = "vllm_topt.backends.cuda.ToptCudaBackend"
# CPU_ATTN's default too. The C++ kernel reads V row by row, so a larger page
# costs no extra V traffic, and K streams faster in longer runs (measured with
# benchmarks/decode_cpu.py --block-size 32/64/128).
CPU_DEFAULT_BLOCK_SIZE = 128
CPU_DENSE_BACKEND = "--attention-backend CPU_ATTN (dense)"

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm.platforms import current_platform

    topt_backend_member()
    if current_platform.is_cpu():
        _teach_cpu_platform()
    _registered = True


def _backend_path() -> str:
    from vllm.platforms import current_platform

    return CPU_BACKEND_PATH if current_platform.is_cpu() else CUDA_BACKEND_PATH


def topt_backend_member():
    """The `AttentionBackendEnum.TOPT` member, created in this process if needed."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    member = AttentionBackendEnum._member_map_.get(BACKEND_NAME)
    if member is None:
        member = AttentionBackendEnum.register(BACKEND_NAME, _backend_path())
        # Spawned engine processes unpickle the config before they load
        # plugins, so a by-value lookup of this run-time member would fail
        # there; pickle it as a call that registers it on arrival instead.
        member.__reduce_ex__ = _reduce_topt_member
    return member


def _reduce_topt_member(protocol):
    return (topt_backend_member, ())


def is_topt_selected(backend) -> bool:
    return backend is not None and getattr(backend, "name", None) == BACKEND_NAME


def _teach_cpu_platform() -> None:
    """Make the CPU platform honour TOPT; it replaces other backends by CPU_ATTN."""
    from vllm.platforms.cpu import CpuPlatform

    if getattr(CpuPlatform, "_topt_patched", False):
        return
    original_select = CpuPlatform.get_attn_backend_cls.__func__
    original_check = CpuPlatform.check_and_update_config.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if not is_topt_selected(selected_backend):
            return original_select(cls, selected_backend, attn_selector_config, num_heads)
        if attn_selector_config.use_mla or attn_selector_config.use_sparse:
            raise NotImplementedError(
                "TOPT supports multi-head / grouped-query attention models, not MLA or "
                "natively sparse attention; drop --attention-backend topt for this model."
            )
        logger.info("Using TOPT (Top-θ) attention backend on CPU.")
        return CPU_BACKEND_PATH

    def check_and_update_config(cls, vllm_config) -> None:
        original_check(cls, vllm_config)
        if is_topt_selected(vllm_config.attention_config.backend):
            _check_topt_config(vllm_config)

    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)
    CpuPlatform._topt_patched = True


def _check_topt_config(vllm_config) -> None:
    """Fail in the front-end process, before the engine starts, on a bad set-up."""
    from vllm_topt.options import options_from_vllm_config, resolve_thresholds
    from vllm_topt.support import check_model_supported

    model_config = vllm_config.model_config
    if model_config is None:
        return
    check_model_supported(model_config.hf_config, model_config.model, CPU_DENSE_BACKEND)
    options = options_from_vllm_config(vllm_config)
    thresholds, path = resolve_thresholds(options, model_config.hf_config, model_config.model)
    cache_config = vllm_config.cache_config
    if not cache_config.user_specified_block_size:
        cache_config.block_size = CPU_DEFAULT_BLOCK_SIZE
    mode = "sparsity disabled" if options.disable_sparsity else f"k={thresholds.target_k}, {thresholds.placement}"
    logger.info("TOPT thresholds: %s (%s, block size %d)", path, mode, cache_config.block_size)
    _warn_about_cpu_binding()


def _warn_about_cpu_binding() -> None:
    from vllm import envs

    if envs.VLLM_CPU_OMP_THREADS_BIND == "auto" and (binding := every_core_binding()):
        logger.warning(
            "vLLM's default VLLM_CPU_OMP_THREADS_BIND=auto reserves one of this machine's %d cores for its "
            "scheduler, so the model runs on one thread fewer. Set VLLM_CPU_OMP_THREADS_BIND=%s to give it every "
            "core (on 2 cores this made generation 1.5-1.8x faster).", binding.count(",") + 1, binding)


def every_core_binding(cpus: list[int] | None = None) -> str | None:
    """A VLLM_CPU_OMP_THREADS_BIND value for every allowed core, on machines with 2-4 cores; else None.

    vLLM's `auto` binding reserves a core per worker for its scheduler process;
    on a small machine that is a large share (half of 2 cores).
    """
    import os

    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else cpus
    return ",".join(map(str, cpus)) if 2 <= len(cpus) <= 4 else None
