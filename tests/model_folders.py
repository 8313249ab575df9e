"""Model folders for refusal tests: the default model's files with a changed config.

The weights are symlinked, not copied; the tests that use these folders are
refused from the config alone, before any weights load.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.engine_run import DEFAULT_MODEL


def variant_of_default_model(root: Path, name: str, **config_changes) -> Path:
    model = root / name
    model.mkdir()
    for f in DEFAULT_MODEL.iterdir():
        if f.name != "config.json":
            (model / f.name).symlink_to(f)
    config = json.loads((DEFAULT_MODEL / "config.json").read_text()) | config_changes
    (model / "config.json").write_text(json.dumps(config))
    return model


def sliding_window_model(root: Path) -> Path:
    """The default model's geometry as a Mistral model with a 64-token sliding window."""
    return variant_of_default_model(root, "sliding-window-model", architectures=["MistralForCausalLM"],
                                    model_type="mistral", sliding_window=64)
