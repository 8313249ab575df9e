"""What a threshold file was calibrated on, and whether the served model is that model.

The config fingerprint catches a different geometry; models that share one
(fine-tunes of a base, a base and its Coder variant) are told apart by the
model's name and a hash of its tokenizer's vocabulary. The weights' source and
quantisation are recorded for humans (the shipped files come from dequantised
4-bit GGUF files).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

# The file a model folder built by scripts/build_model.py carries: where its weights came from.
WEIGHTS_SOURCE_FILE = "SOURCE.txt"


# Config keys that identify a model's attention geometry and weights layout.
# Two models with the same values here share a fingerprint (e.g. fine-tunes of
# one base, or a base and its Coder variant); thresholds usually do not transfer
# between them, so a file also records the model's name and vocabulary, checked
# at start-up (`identity_mismatches`).
FINGERPRINT_KEYS = (
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "rope_theta",
    "max_position_embeddings",
    "tie_word_embeddings",
)


def _rope_theta(hf_config) -> float | None:
    theta = getattr(hf_config, "rope_theta", None)
    if theta is None:
        params = getattr(hf_config, "rope_parameters", None) or {}
        theta = params.get("rope_theta") if isinstance(params, dict) else None
    return None if theta is None else float(theta)


def model_identity_values(hf_config) -> dict:
    """The config values the fingerprint covers, read from a HF config."""
    values = {}
    for key in FINGERPRINT_KEYS:
        if key == "rope_theta":
            values[key] = _rope_theta(hf_config)
        elif key == "head_dim":
            head_dim = getattr(hf_config, "head_dim", None)
            if head_dim is None:
                head_dim = hf_config.hidden_size // hf_config.num_attention_heads
            values[key] = int(head_dim)
        elif key == "num_key_value_heads":
            values[key] = getattr(hf_config, key, None) or hf_config.num_attention_heads
        else:
            value = getattr(hf_config, key, None)
            values[key] = list(value) if isinstance(value, (list, tuple)) else value
    return values


def model_fingerprint(hf_config) -> str:
    blob = json.dumps(model_identity_values(hf_config), sort_keys=True)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()[:16]


class ModelIdentity(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    architecture: str
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_size: int = Field(gt=0)
    fingerprint: str
    # What the file was calibrated on, beyond the config: files written before these fields
    # existed load without them (their name is still checked, as a warning).
    source: str | None = None
    """The model path or hub id calibration loaded."""
    vocab_hash: str | None = None
    """`vocabulary_hash` of its tokenizer."""
    weights: str | None = None
    """Where the weights came from and their quantisation (e.g. a dequantised 4-bit GGUF)."""

    @classmethod
    def from_hf_config(cls, hf_config, name: str, source: str | None = None, vocab_hash: str | None = None,
                       weights: str | None = None) -> "ModelIdentity":
        values = model_identity_values(hf_config)
        return cls(
            name=name,
            architecture=(values["architectures"] or ["unknown"])[0],
            num_layers=values["num_hidden_layers"],
            num_heads=values["num_attention_heads"],
            num_kv_heads=values["num_key_value_heads"],
            head_size=values["head_dim"],
            fingerprint=model_fingerprint(hf_config),
            source=source,
            vocab_hash=vocab_hash,
            weights=weights,
        )


def vocabulary_hash(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary (token -> id, added tokens included)."""
    blob = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_vocabulary_hash(tokenizer_path: str, **from_pretrained) -> str:
    """`vocabulary_hash` of the tokenizer at a path or hub id (transformers' AutoTokenizer)."""
    from transformers import AutoTokenizer

    return vocabulary_hash(AutoTokenizer.from_pretrained(tokenizer_path, **from_pretrained))


def weights_description(model_path: str, hf_config) -> str:
    """Where a model's weights came from and their quantisation, as far as its folder tells."""
    source = Path(model_path) / WEIGHTS_SOURCE_FILE
    if source.is_file():
        return source.read_text().strip().splitlines()[0]
    quantization = getattr(hf_config, "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
        return f"{model_path}, {method} quantisation"
    return f"{model_path}, {getattr(hf_config, 'torch_dtype', None) or 'unquantised'} weights"


def model_name_key(name: str) -> str:
    """The part of a model path or hub id that names the model: its last component, case-folded."""
    return Path(name.rstrip("/")).name.lower()


def identity_mismatches(identity: ModelIdentity, served_model: str, served_vocab_hash: str | None) -> list[str]:
    """How the served model differs from the one a file was calibrated on, beyond the config (empty: none)."""
    found = []
    recorded = {model_name_key(n) for n in (identity.name, identity.source) if n}
    if model_name_key(served_model) not in recorded:
        found.append(f"model name: the file's is {identity.name!r}"
                     + (f" ({identity.source})" if identity.source else "") + f", the served model is {served_model!r}")
    if identity.vocab_hash and served_vocab_hash and identity.vocab_hash != served_vocab_hash:
        found.append(f"tokenizer vocabulary: the file's hash is {identity.vocab_hash}, "
                     f"the served model's {served_vocab_hash}")
    return found
