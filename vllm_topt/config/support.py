"""What TOPT cannot serve, said once for calibration, the front-end check and the backends.

Sliding-window layers are served (on the dense kernel); a model whose every
layer has a window is refused. `unsupported_model_features` reads a Hugging
Face config (the calibration CLI before it reads any text; the backends'
`config_refusals` before the engine starts, `vllm_topt/backends/core.py`,
which also checks one layer's arguments in the worker with the same names).
`refusal` turns the names into the one message that says what to do instead.
"""

from __future__ import annotations

SLIDING_WINDOW = "sliding-window attention"
# Sliding-window layers run on the dense kernel; a model with no other layer leaves TOPT nothing to do.
SLIDING_WINDOW_EVERY_LAYER = "sliding-window attention on every layer"
ALIBI = "ALiBi"
ATTENTION_SINKS = "attention sinks"
MLA = "multi-head latent attention (MLA)"
ENCODER_DECODER = "encoder or cross-attention"

# Model types whose attention carries learned sink logits or ALiBi biases
# without a config flag saying so.
SINK_MODEL_TYPES = ("gpt_oss",)
ALIBI_MODEL_TYPES = ("bloom",)


class UnsupportedModelError(NotImplementedError):
    """The model uses attention TOPT cannot serve; the message names the feature and the alternative."""


def text_config(hf_config):
    """The language model's config (multimodal configs nest it)."""
    get = getattr(hf_config, "get_text_config", None)
    return get() if callable(get) else hf_config


def sliding_window_layers(cfg) -> list[int]:
    """The layers that attend within a sliding window (TOPT runs them on the platform's dense kernel)."""
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:
        return [layer for layer, kind in enumerate(layer_types) if "sliding" in str(kind)]
    if getattr(cfg, "use_sliding_window", None) is False:  # Qwen2 carries a window it does not use
        return []
    if sliding_window_size(cfg):
        return list(range(cfg.num_hidden_layers))  # no per-layer types: the window applies everywhere
    return []


def sliding_window_size(cfg) -> int | None:
    return getattr(cfg, "sliding_window", None) or getattr(cfg, "interleaved_sliding_window", None)


def has_alibi(cfg) -> bool:
    attn_config = getattr(cfg, "attn_config", None)
    nested = attn_config.get("alibi") if isinstance(attn_config, dict) else getattr(attn_config, "alibi", False)
    return bool(getattr(cfg, "alibi", False) or nested) or getattr(cfg, "model_type", None) in ALIBI_MODEL_TYPES


def unsupported_model_features(hf_config) -> list[str]:
    """The features of this model's attention that TOPT refuses (empty: servable)."""
    cfg = text_config(hf_config)
    found = {
        SLIDING_WINDOW_EVERY_LAYER: len(sliding_window_layers(cfg)) == cfg.num_hidden_layers,
        ALIBI: has_alibi(cfg),
        ATTENTION_SINKS: getattr(cfg, "model_type", None) in SINK_MODEL_TYPES,
        MLA: getattr(cfg, "kv_lora_rank", None) is not None,
        ENCODER_DECODER: bool(getattr(hf_config, "is_encoder_decoder", False)),
    }
    return [name for name, present in found.items() if present]


def refusal(features: list[str], where: str, dense_backend: str = "a dense backend") -> UnsupportedModelError:
    return UnsupportedModelError(
        f"TOPT does not support {', '.join(features)} ({where}); serve this model with "
        f"{dense_backend} instead. No threshold file can make TOPT serve it, so none is calibrated for it."
    )


def check_model_supported(hf_config, model: str, dense_backend: str = "a dense backend") -> None:
    """Raise `UnsupportedModelError` if TOPT cannot serve this model."""
    features = unsupported_model_features(hf_config)
    if features:
        raise refusal(features, f"model {model}", dense_backend)
