"""vLLM general plugin: registers the TOPT attention backend and checks configurations in the front end.

vLLM calls `register()` in every process (API server, engine core, workers),
possibly more than once; every step here is idempotent. What it touches in
vLLM is listed in `vllm_topt.vllm_support.VLLM_TOUCHPOINTS`.
"""

from __future__ import annotations

import functools

from vllm_topt.log import get_logger
from vllm_topt.vllm_support import UnsupportedVllmError, check_vllm_version

logger = get_logger()

BACKEND_NAME = "TOPT"

CPU_BACKEND_PATH = "vllm_topt.backends.cpu.ToptCpuBackend"
CUDA_BACKEND_PATH = "vllm_topt.backends.cuda.ToptCudaBackend"


class ToptUnavailableError(RuntimeError):
    """TOPT was selected, but the plugin stood down in this process (the message says why and what to do)."""


@functools.lru_cache(maxsize=1)
def register() -> None:
    """Entry point of `vllm.general_plugins` (runs once per process).

    vLLM calls its plugins with no try block, so an exception here would stop
    every vLLM process on the machine, dense serving included. Nothing escapes:
    on any failure the plugin logs one warning, registers nothing of its own and
    only a run that selects TOPT is refused (`_refuse_topt_runs`).
    """
    try:
        from vllm.platforms import current_platform

        check_vllm_version()
        topt_backend_member()
        _teach_platform(type(current_platform), current_platform.is_cpu())
    except Exception as exc:  # noqa: BLE001 - see the docstring
        _stand_down(exc)


def _stand_down(exc: Exception) -> None:
    reason = str(exc) if isinstance(exc, UnsupportedVllmError) else (
        f"its vLLM entry point failed ({type(exc).__name__}: {exc}). Report it with this log, or uninstall "
        "vllm-topt.")
    message = f"TOPT is not available in this process: {reason}"
    logger.warning("%s vLLM itself runs as usual; only --attention-backend topt is refused.", message)
    try:
        _refuse_topt_runs(message)
    except Exception:  # noqa: BLE001 - vLLM then rejects the unknown backend name itself
        logger.debug("could not install the TOPT refusal", exc_info=True)


def _refuse_topt_runs(message: str) -> None:
    """Make `--attention-backend topt` parse, and fail in the front end with `message` before any engine starts."""
    from vllm.platforms import current_platform

    topt_backend_member()
    platform_cls = type(current_platform)
    if platform_cls.__dict__.get("_topt_patched", False):
        return
    original_check = platform_cls.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config, *args, **kwargs):
        if is_topt_selected(vllm_config.attention_config.backend):
            raise ToptUnavailableError(message)
        original_check(cls, vllm_config, *args, **kwargs)

    platform_cls.check_and_update_config = classmethod(check_and_update_config)
    platform_cls._topt_patched = True


def backend_path(is_cpu: bool) -> str:
    return CPU_BACKEND_PATH if is_cpu else CUDA_BACKEND_PATH


def topt_backend_member():
    """The `AttentionBackendEnum.TOPT` member, created in this process if needed."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    member = AttentionBackendEnum._member_map_.get(BACKEND_NAME)
    if member is None:
        member = AttentionBackendEnum.register(BACKEND_NAME, backend_path(current_platform.is_cpu()))
        # Spawned engine processes unpickle the config before they load
        # plugins, so a by-value lookup of this run-time member would fail
        # there; pickle it as a call that registers it on arrival instead.
        member.__reduce_ex__ = _reduce_topt_member
    return member


def _reduce_topt_member(protocol):
    return (topt_backend_member, ())


def is_topt_selected(backend) -> bool:
    return backend is not None and getattr(backend, "name", None) == BACKEND_NAME


def _teach_platform(platform_cls, is_cpu: bool) -> None:
    """Check TOPT configurations in the front end; on CPU, also make the platform select TOPT."""
    if platform_cls.__dict__.get("_topt_patched", False):
        return
    original_check = platform_cls.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config, *args, **kwargs):
        original_check(cls, vllm_config, *args, **kwargs)
        if is_topt_selected(vllm_config.attention_config.backend):
            check_topt_config(vllm_config, is_cpu)
            from vllm_topt import request_modes
            from vllm_topt.metrics import serve_metrics

            serve_metrics()  # the sparsity series on this server's /metrics
            request_modes.install(vllm_config)  # `"vllm_xargs": {"topt": "dense"}` per request

    platform_cls.check_and_update_config = classmethod(check_and_update_config)
    if not is_cpu:
        # The KV budget vLLM profiles leaves room for TOPT's V sums (only when TOPT serves).
        from vllm.v1.worker.gpu_worker import Worker

        from vllm_topt.backends.cuda_memory import install_kv_budget_hook

        install_kv_budget_hook(Worker)
    if is_cpu:
        original_select = platform_cls.get_attn_backend_cls.__func__

        def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
            # The CPU platform replaces every other backend by CPU_ATTN; TOPT was checked in the front end.
            if not is_topt_selected(selected_backend):
                return original_select(cls, selected_backend, attn_selector_config, *args, **kwargs)
            if attn_selector_config.use_mla or attn_selector_config.use_sparse:
                raise NotImplementedError(
                    "TOPT supports multi-head / grouped-query attention models, not MLA or "
                    "natively sparse attention; drop --attention-backend topt for this model."
                )
            logger.info("Using TOPT (Top-θ) attention backend on CPU.")
            return CPU_BACKEND_PATH

        platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    platform_cls._topt_patched = True


def backend_class(is_cpu: bool):
    from vllm.utils.import_utils import resolve_obj_by_qualname

    return resolve_obj_by_qualname(backend_path(is_cpu))


def check_topt_config(vllm_config, is_cpu: bool) -> None:
    """Fail in the front-end process, before the engine starts, on anything TOPT cannot serve."""
    from vllm_topt.config.options import check_served_identity, options_from_vllm_config, resolve_thresholds_checked
    from vllm_topt.config.support import sliding_window_layers, text_config
    from vllm_topt.config.thresholds import describe, page_size_warning

    model_config = vllm_config.model_config
    if model_config is None:
        return
    backend = backend_class(is_cpu)
    options = options_from_vllm_config(vllm_config)
    cache_config = vllm_config.cache_config
    if backend.default_block_size and not cache_config.user_specified_block_size:
        cache_config.block_size = backend.default_block_size
    backend.check_config(vllm_config)
    thresholds, path, notes = resolve_thresholds_checked(options, model_config.hf_config, model_config.model)
    vocabulary = served_vocabulary_hash(model_config)
    notes += check_served_identity(thresholds, path, model_config.model, vocabulary,
                                   options.allow_model_mismatch)
    for note in notes:
        logger.warning("TOPT threshold file %s: %s", path, note)
    if warning := page_size_warning(thresholds, cache_config.block_size, path):
        logger.warning(warning)
    mode = "sparsity disabled" if options.disable_sparsity else describe(thresholds)
    logger.info("TOPT thresholds: %s (%s; serving block size %s)", path, mode, cache_config.block_size)
    check_request_points(options, model_config, vocabulary, cache_config.block_size)
    windowed = sliding_window_layers(text_config(model_config.hf_config))
    if windowed:
        logger.info("TOPT: %d sliding-window layers run on %s's dense kernel", len(windowed),
                    backend.dense_parent)
    if is_cpu:
        _warn_about_cpu_binding()


def check_request_points(options, model_config, vocabulary: str | None, block_size: int) -> None:
    """The request points load and match the served model as the server's file must; each is logged."""
    from vllm_topt.config.options import check_served_identity, resolve_request_points
    from vllm_topt.config.thresholds import describe, page_size_warning

    for name, point, path, tolerated in resolve_request_points(options, model_config.hf_config, model_config.model):
        notes = tolerated + check_served_identity(point, path, model_config.model, vocabulary,
                                                  options.allow_model_mismatch)
        for note in notes + [page_size_warning(point, block_size, path)]:
            if note:
                logger.warning("TOPT request point %r (%s): %s", name, path, note)
        logger.info("TOPT request point %r (\"vllm_xargs\": {\"topt\": \"%s\"}): %s (%s)", name, name, path,
                    describe(point))


def served_vocabulary_hash(model_config) -> str | None:
    """The served tokenizer's vocabulary hash, or None (logged) when it cannot be read here."""
    from vllm_topt.config.identity import load_vocabulary_hash

    try:
        return load_vocabulary_hash(model_config.tokenizer, revision=model_config.tokenizer_revision,
                                    trust_remote_code=model_config.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - a tokenizer TOPT cannot read is vLLM's to refuse, not ours
        logger.warning("TOPT could not read the tokenizer %s (%s): its vocabulary is not checked against the "
                       "threshold file.", model_config.tokenizer, exc)
        return None


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
