"""Run-time options, read from vLLM's `--additional-config '{"topt": {...}}'`."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vllm_topt.config.identity import identity_mismatches
from vllm_topt.method.rules import RESERVED_MODES
from vllm_topt.config.thresholds import (
    QUALITY_SUFFIX,
    ThresholdFile,
    ThresholdFileError,
    check_matches_model,
    find_shipped_thresholds,
    load_threshold_file,
    shipped_config_files,
)


SHIPPED_POINTS = ("speed", "quality")
POINT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class ToptOptions(BaseModel):
    """Every key of the `topt` block (README, "Configuration")."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # frozen: hashable, a cache key

    thresholds: str | None = None
    """Path of a threshold file; default: the shipped file matching the model."""
    operating_point: Literal[SHIPPED_POINTS] | None = None
    """Which shipped file, when `thresholds` is not given: "quality" (per-layer budget at mean
    k=48, the default wherever one ships) or "speed" (k=32: fewer elements, more loss)."""
    allow_model_mismatch: bool = False
    """Serve a threshold file whose recorded model name, vocabulary or config fingerprint differ
    from the served model's (logged); a different attention geometry is still refused."""
    disable_sparsity: bool = False
    """Run the TOPT code path keeping every element (A/B tests)."""
    telemetry_interval_s: float = Field(default=10.0, ge=0.0)
    """Seconds between telemetry log lines; 0 logs after every decode step."""
    stats_file: str | None = None
    """If set, each telemetry tick also writes the per-layer counters as JSON here."""
    cpu_kernel: Literal["cpp", "torch"] = "cpp"
    """CPU decode implementation: the C++ kernel (built at set-up) or vectorised torch."""
    request_points: tuple[tuple[str, str], ...] = ()
    """Operating points a request may choose with `"vllm_xargs": {"topt": NAME}`, given as an object
    name -> "speed" or "quality" (that shipped file of the served model) or the path of a threshold file.
    Kept as (name, source) pairs, in the given order: the options are a cache key."""

    @field_validator("request_points", mode="before")
    @classmethod
    def _point_names_and_sources(cls, points) -> tuple[tuple[str, str], ...]:
        if isinstance(points, dict):
            points = tuple(points.items())
        for name, source in points:
            if name in RESERVED_MODES or not POINT_NAME.fullmatch(name):
                raise ValueError(f"request point name {name!r}: use letters, digits, '-', '_' or '.', not "
                                 + " or ".join(repr(m) for m in RESERVED_MODES) + " (those are built in)")
            if source not in SHIPPED_POINTS and not source.endswith(".json"):
                raise ValueError(f"request point {name!r}: {source!r} is neither a shipped operating point ("
                                 + ", ".join(repr(p) for p in SHIPPED_POINTS) + ") nor a threshold file (*.json)")
        return tuple(points)

    @model_validator(mode="after")
    def _one_way_to_pick_the_file(self) -> "ToptOptions":
        if self.thresholds and self.operating_point:
            raise ValueError(f"\"thresholds\" ({self.thresholds}) and \"operating_point\" "
                             f"({self.operating_point}) contradict each other: an operating point picks a "
                             "shipped file, \"thresholds\" names one. Give one of them.")
        return self


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


DEFAULT_OPERATING_POINT = "quality"
FALLBACK_OPERATING_POINT = "speed"


def resolve_thresholds(options: ToptOptions, hf_config, model_name: str) -> tuple[ThresholdFile, Path]:
    """Load the threshold file for the served model, or explain how to get one."""
    thresholds, path, _ = resolve_thresholds_checked(options, hf_config, model_name)
    return thresholds, path


def resolve_thresholds_checked(options: ToptOptions, hf_config, model_name: str) -> tuple[ThresholdFile, Path, list[str]]:
    """`resolve_thresholds`, plus the differences from the served model that `allow_model_mismatch` let through."""
    path = Path(options.thresholds).expanduser() if options.thresholds else shipped_path(options, hf_config, model_name)
    thresholds = load_cached(str(path.resolve()))
    tolerated = check_matches_model(thresholds, hf_config, path, options.allow_model_mismatch)
    return thresholds, path, tolerated


def request_modes_of(options: ToptOptions) -> tuple[str, ...]:
    """The modes a request may name, by kernel code: 0 the server's file, 1 dense, then the request points."""
    return RESERVED_MODES + tuple(name for name, _ in options.request_points)


def resolve_request_points(options: ToptOptions, hf_config,
                           model_name: str) -> list[tuple[str, ThresholdFile, Path, list[str]]]:
    """Each request point's (name, file, path, tolerated differences), checked against the served model."""
    points = []
    for name, source in options.request_points:
        try:
            path = (shipped_path(ToptOptions(operating_point=source), hf_config, model_name)
                    if source in SHIPPED_POINTS else Path(source).expanduser())
            thresholds = load_cached(str(path.resolve()))
            tolerated = check_matches_model(thresholds, hf_config, path, options.allow_model_mismatch)
        except ThresholdFileError as exc:
            raise ThresholdFileError(f"TOPT request point {name!r} ({source}): {exc}") from exc
        points.append((name, thresholds, path, tolerated))
    return points


def calibrate_command(model_name: str) -> str:
    """The calibration that makes a quality file like the shipped ones, for error messages."""
    return f"`vllm-topt-calibrate --model {model_name} --budget-k 48 --vmc-scope block --out thresholds.json`"


def shipped_path(options: ToptOptions, hf_config, model_name: str) -> Path:
    """The shipped file at the chosen operating point; by default quality where one ships, else speed."""
    point = options.operating_point or DEFAULT_OPERATING_POINT
    path = find_shipped_thresholds(hf_config, point)
    if path is None and options.operating_point is None:
        path = find_shipped_thresholds(hf_config, FALLBACK_OPERATING_POINT)
    if path is None and point == "quality" and options.operating_point:
        raise ThresholdFileError(
            f"TOPT ships no quality threshold file for model {model_name} (shipped: "
            f"{', '.join(p.name for p in shipped_config_files() if p.name.endswith(QUALITY_SUFFIX))}). "
            "Drop \"operating_point\" for the shipped default, or calibrate a quality point with "
            f"{calibrate_command(model_name)} and pass it as \"thresholds\"."
        )
    if path is None:
        raise ThresholdFileError(
            f"TOPT has no shipped threshold file for model {model_name}. Calibrate one with "
            f"{calibrate_command(model_name)} and pass it with "
            "--additional-config '{\"topt\": {\"thresholds\": \"thresholds.json\"}}'."
        )
    return path


def check_served_identity(thresholds: ThresholdFile, path: Path, served_model: str, served_vocab_hash: str | None,
                          allow_mismatch: bool) -> list[str]:
    """Refuse a file made for another model (name, vocabulary); returns what to log instead.

    Files written before the vocabulary was recorded only warn on a name difference."""
    found = identity_mismatches(thresholds.model, served_model, served_vocab_hash)
    recorded = thresholds.model.vocab_hash is not None
    if found and recorded and not allow_mismatch:
        raise ThresholdFileError(
            f"TOPT threshold file {path} was made for another model ({'; '.join(found)}). Thresholds do not "
            f"transfer between models. Calibrate this one: {calibrate_command(served_model)}, then pass --additional-config "
            "'{\"topt\": {\"thresholds\": \"thresholds.json\"}}'; or, to serve it with this file anyway, add "
            "\"allow_model_mismatch\": true to the topt block."
        )
    notes = [f"{difference} (served anyway: allow_model_mismatch)" if recorded else
             f"{difference} (the file predates recorded vocabularies; recalibrate to have it checked)"
             for difference in found]
    if not recorded:
        notes.append(f"{path} records no tokenizer vocabulary, so it was not checked against the served model")
    return notes


@functools.lru_cache(maxsize=4)
def load_cached(path: str) -> ThresholdFile:
    # Every attention layer resolves the same file; parse it once per process.
    return load_threshold_file(path)
