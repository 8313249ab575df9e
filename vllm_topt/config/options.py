"""Run-time options, read from vLLM's `--additional-config '{"topt": {...}}'`."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vllm_topt.config.thresholds import (
    QUALITY_SUFFIX,
    ThresholdFile,
    ThresholdFileError,
    check_matches_model,
    find_shipped_thresholds,
    load_threshold_file,
    shipped_config_files,
)


class ToptOptions(BaseModel):
    """Every key of the `topt` block (README, "Configuration")."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # frozen: hashable, a cache key

    thresholds: str | None = None
    """Path of a threshold file; default: the shipped file matching the model."""
    operating_point: Literal["speed", "quality"] = "speed"
    """Which shipped file, when `thresholds` is not given: "speed" (k=32) or
    "quality" (within 1% of dense perplexity at <= 10% of elements, where shipped)."""
    disable_sparsity: bool = False
    """Run the TOPT code path keeping every element (A/B tests)."""
    telemetry_interval_s: float = Field(default=10.0, ge=0.0)
    """Seconds between telemetry log lines; 0 logs after every decode step."""
    stats_file: str | None = None
    """If set, each telemetry tick also writes the per-layer counters as JSON here."""
    cpu_kernel: Literal["cpp", "torch"] = "cpp"
    """CPU decode implementation: the C++ kernel (built at set-up) or vectorised torch."""


class ToptConfigError(ValueError):
    """The `topt` configuration cannot be used; the message says how to fix it."""


def options_from_vllm_config(vllm_config) -> ToptOptions:
    extra = getattr(vllm_config, "additional_config", None) or {}
    if isinstance(extra, str):
        extra = json.loads(extra)
    block = extra.get("topt", {})
    try:
        return ToptOptions.model_validate(block)
    except ValidationError as exc:
        raise ToptConfigError(
            f"invalid --additional-config 'topt' block {block!r}:\n{exc}\n"
            f"Known keys: {', '.join(ToptOptions.model_fields)}."
        ) from exc


def resolve_thresholds(options: ToptOptions, hf_config, model_name: str) -> tuple[ThresholdFile, Path]:
    """Load the threshold file for the served model, or explain how to get one."""
    if options.thresholds:
        path = Path(options.thresholds).expanduser()
    else:
        path = find_shipped_thresholds(hf_config, options.operating_point)
        if path is None and options.operating_point == "quality":
            raise ThresholdFileError(
                f"TOPT ships no quality threshold file for model {model_name} (shipped: "
                f"{', '.join(p.name for p in shipped_config_files() if p.name.endswith(QUALITY_SUFFIX))}). "
                "Drop \"operating_point\" for the k=32 file, or calibrate a quality point with "
                f"`vllm-topt-calibrate --model {model_name} --budget-k 48 --vmc-scope block --out thresholds.json` "
                "and pass it as \"thresholds\"."
            )
        if path is None:
            raise ThresholdFileError(
                f"TOPT has no shipped threshold file for model {model_name}. Calibrate one with "
                f"`vllm-topt-calibrate --model {model_name} --out thresholds.json` and pass it "
                "with --additional-config '{\"topt\": {\"thresholds\": \"thresholds.json\"}}'."
            )
    thresholds = load_cached(str(path.resolve()))
    check_matches_model(thresholds, hf_config, path)
    return thresholds, path


@functools.lru_cache(maxsize=4)
def load_cached(path: str) -> ThresholdFile:
    # Every attention layer resolves the same file; parse it once per process.
    return load_threshold_file(path)
