"""Threshold files: the versioned schema, loading, validation and lookup.

A threshold file holds, for one model and one target k, a threshold per
(layer, query head) on a grid of row lengths n (SPEC §2). Lookup between grid
points is piecewise linear in ln(n); beyond the grid it follows the
"loglog-slope" rule documented in `extrapolate` below.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vllm_topt.config.identity import ModelIdentity, model_fingerprint
from vllm_topt.config.support import sliding_window_layers, text_config
from vllm_topt.method.rules import Placement, Sdc, ToptRule, VmcScope, layer_rules

SCHEMA_VERSION = 1
# A shipped file named *.quality.json is a model's quality operating point; the other is its default.
QUALITY_SUFFIX = ".quality.json"
EXTRAPOLATION_RULE = "loglog-slope"
# Fit the beyond-the-grid slope on grid points with n >= n_max / 2.
EXTRAPOLATION_FIT_FRACTION = 0.5

class ThresholdFileError(ValueError):
    """A threshold file cannot be used; the message names the file and the fix."""


class Compensation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sdc: Sdc = Sdc.NONE
    vmc: bool = True
    # "block": each V block's dropped mass times its own mean(V) (SPEC §4); files
    # without the field compensate over the whole sequence, as before.
    vmc_scope: VmcScope = VmcScope.SEQUENCE
    # The KV page (tokens) block-wise VMC was calibrated at; the served page should be the same.
    block_size: int | None = Field(default=None, gt=0)


class Provenance(BaseModel):
    model_config = ConfigDict(extra="allow")

    data: str
    num_sequences: int
    max_seq_len: int
    tool: str
    date: str
    topk_during_calibration: bool = True
    aggregation: str = "mean+0.1*std"


class ThresholdFile(BaseModel):
    """Schema version 1 of a threshold file (see README, "Threshold files")."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int
    model: ModelIdentity
    target_k: int = Field(gt=0)
    layer_k: dict[int, int] = Field(default_factory=dict)
    dense_layers: list[int] = Field(default_factory=list)
    # Why a dense layer is dense, e.g. its sliding window (the dense kernel runs it) or --dense-layers.
    dense_layer_reasons: dict[int, str] = Field(default_factory=dict)
    placement: Placement
    compensation: Compensation
    extrapolation: Literal["loglog-slope"] = EXTRAPOLATION_RULE
    n_grid: list[int]
    # Layers with their own k (`layer_k`) may have their own grid (rows with n <= their k stay dense).
    layer_n_grid: dict[int, list[int]] = Field(default_factory=dict)
    # [layer][query head][grid point of that layer's grid]; null for a dense layer.
    thresholds: list[list[list[float]] | None]
    provenance: Provenance

    @model_validator(mode="after")
    def _check_shapes_and_values(self) -> "ThresholdFile":
        m = self.model
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(
                f"unknown schema_version {self.schema_version}; this vllm-topt "
                f"reads version {SCHEMA_VERSION}"
            )
        if m.num_heads % m.num_kv_heads:
            raise ValueError("model.num_heads must be a multiple of model.num_kv_heads")
        for name, grid in [("n_grid", self.n_grid)] + [(f"layer_n_grid[{i}]", g) for i, g in self.layer_n_grid.items()]:
            if len(grid) < 2 or any(b <= a for a, b in zip(grid, grid[1:])) or grid[0] < 1:
                raise ValueError(f"{name} must hold at least 2 strictly increasing positive lengths")
        if len(self.thresholds) != m.num_layers:
            raise ValueError(
                f"thresholds has {len(self.thresholds)} layers, model.num_layers is {m.num_layers}"
            )
        for layer in list(self.layer_k) + self.dense_layers + list(self.layer_n_grid):
            if not 0 <= layer < m.num_layers:
                raise ValueError(f"layer index {layer} out of range 0..{m.num_layers - 1}")
        unexplained = sorted(set(self.dense_layer_reasons) - set(self.dense_layers))
        if unexplained:
            raise ValueError(f"dense_layer_reasons names layer {unexplained[0]}, which is not in dense_layers")
        if self.placement is Placement.POST_SOFTMAX and self.compensation.sdc is not Sdc.NONE:
            raise ValueError("SDC applies to pre-softmax placement only; set compensation.sdc to 'none'")
        for layer, per_head in enumerate(self.thresholds):
            if per_head is None:
                if layer not in self.dense_layers:
                    raise ValueError(f"layer {layer} has no thresholds but is not in dense_layers")
                continue
            if len(per_head) != m.num_heads:
                raise ValueError(
                    f"layer {layer} has thresholds for {len(per_head)} heads, model.num_heads is {m.num_heads}"
                )
            grid = self.grid_for_layer(layer)
            for head, values in enumerate(per_head):
                if len(values) != len(grid):
                    raise ValueError(
                        f"layer {layer} head {head}: {len(values)} values for {len(grid)} grid points"
                    )
                for value in values:
                    if not math.isfinite(value):
                        raise ValueError(f"layer {layer} head {head}: non-finite threshold {value}")
                    if self.placement is Placement.POST_SOFTMAX and not 0.0 < value <= 1.0:
                        raise ValueError(
                            f"layer {layer} head {head}: post-softmax threshold {value} is not a probability in (0, 1]"
                        )
        return self

    def k_for_layer(self, layer: int) -> int:
        return self.layer_k.get(layer, self.target_k)

    def is_dense_layer(self, layer: int) -> bool:
        return layer in self.dense_layers

    def keep_mass(self) -> float | None:
        """P of a file calibrated to each row's top-P set (--keep-mass); its k is then only the dense-row limit."""
        record = getattr(self.provenance, "keep_mass", None)
        return record["mass"] if record else None

    def thresholded_layers(self) -> list[int]:
        """The layers Top-θ applies to (the rest are dense: sliding-window layers, --dense-layers)."""
        return [layer for layer in range(self.model.num_layers) if not self.is_dense_layer(layer)]

    def layer_rules(self, disable_sparsity: bool = False) -> list[ToptRule]:
        """What each layer does with a decode row under this file."""
        return layer_rules(self.model.num_layers, self.placement, self.compensation.sdc, self.compensation.vmc,
                           self.target_k, self.layer_k, self.dense_layers, disable_sparsity,
                           self.compensation.vmc_scope)

    def rule_for_layer(self, layer: int, disable_sparsity: bool = False) -> ToptRule:
        return self.layer_rules(disable_sparsity)[layer]

    def layer_plan(self, heads: slice = slice(None), disable_sparsity: bool = False) -> "list[LayerPlan]":
        """Every layer's rule and θ(n) for the query heads `heads`: the one way from a file to per-layer rules."""
        return [LayerPlan(rule, None if rule.dense else self.layer_thresholds(layer, heads))
                for layer, rule in enumerate(self.layer_rules(disable_sparsity))]

    def grid_for_layer(self, layer: int) -> list[int]:
        return self.layer_n_grid.get(layer, self.n_grid)

    def layer_thresholds(self, layer: int, heads: slice = slice(None)) -> "LayerThresholds | None":
        """θ(n) of one layer for the query heads `heads`; None for a dense layer."""
        values = self.thresholds[layer]
        if values is None:
            return None
        return LayerThresholds(self.grid_for_layer(layer), values[heads], self.placement)


def rule_difference(first: ThresholdFile, second: ThresholdFile) -> str | None:
    """How two files' layer rules differ other than in k (placement, compensation, dense layers); None: not."""
    for layer, (a, b) in enumerate(zip(first.layer_rules(), second.layer_rules())):
        differing = [f.name for f in dataclasses.fields(a)
                     if f.name != "k" and getattr(a, f.name) != getattr(b, f.name)]
        if differing:
            return f"layer {layer} has " + ", ".join(f"{name} {getattr(a, name)} vs {getattr(b, name)}"
                                                    for name in differing)
    return None


def load_threshold_file(path: str | Path) -> ThresholdFile:
    """Parse and validate a threshold file; errors name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ThresholdFileError(
            f"TOPT threshold file {path} does not exist. Pass an existing file with "
            "--additional-config '{\"topt\": {\"thresholds\": \"PATH\"}}' or create one "
            "with `vllm-topt-calibrate`."
        )
    try:
        raw = json.loads(path.read_text(), parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as exc:
        raise ThresholdFileError(f"TOPT threshold file {path} is not valid JSON: {exc}") from exc
    if isinstance(raw, dict) and raw.get("schema_version") not in (None, SCHEMA_VERSION):
        raise ThresholdFileError(
            f"TOPT threshold file {path} has unknown schema_version {raw.get('schema_version')!r}; "
            f"this vllm-topt reads version {SCHEMA_VERSION}. Upgrade vllm-topt or recalibrate."
        )
    try:
        return ThresholdFile.model_validate(raw)
    except ValidationError as exc:
        raise ThresholdFileError(
            f"TOPT threshold file {path} is malformed:\n{exc}\nRecalibrate with `vllm-topt-calibrate`."
        ) from exc


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed in a threshold file")


def check_matches_model(thresholds: ThresholdFile, hf_config, path: str | Path,
                        allow_mismatch: bool = False) -> list[str]:
    """Refuse thresholds calibrated for another model (start-up check); returns the differences
    `allow_mismatch` let through, for the caller to log. A different geometry is always refused."""
    served = ModelIdentity.from_hf_config(hf_config, name="served")
    mine = thresholds.model
    tolerated = []
    for field in ("num_layers", "num_heads", "num_kv_heads", "head_size"):
        if getattr(mine, field) != getattr(served, field):
            raise ThresholdFileError(
                f"TOPT threshold file {path} was calibrated for {mine.name} with "
                f"{field}={getattr(mine, field)}, but the served model has "
                f"{field}={getattr(served, field)}. Use the thresholds of this model or "
                "calibrate it with `vllm-topt-calibrate`."
            )
    if mine.fingerprint != served.fingerprint:
        difference = (f"config fingerprint: the file's is {mine.fingerprint} ({mine.name}), the served model's "
                      f"{served.fingerprint}")
        if not allow_mismatch:
            raise ThresholdFileError(
                f"TOPT threshold file {path} was calibrated for {mine.name} (fingerprint "
                f"{mine.fingerprint}), but the served model's config has fingerprint "
                f"{served.fingerprint}. Use the thresholds of this model or calibrate it "
                "with `vllm-topt-calibrate` (or set \"allow_model_mismatch\": true to serve it anyway)."
            )
        tolerated.append(difference)
    windowed = sliding_window_layers(text_config(hf_config))
    thresholded = [layer for layer in windowed if not thresholds.is_dense_layer(layer)]
    if thresholded:
        raise ThresholdFileError(
            f"TOPT threshold file {path} has thresholds for layers {thresholded}, which the served model runs "
            "with a sliding window: TOPT serves those on the dense kernel, and the file's other layers were "
            "calibrated with them sparse. Recalibrate with `vllm-topt-calibrate` (it records sliding-window "
            "layers as dense)."
        )
    return tolerated


# What block-wise VMC's page grain was measured to change (docs/accuracy.md, SmolLM2 k=32, BBC held-out).
PAGE_GRAIN_EFFECT = ("on SmolLM2 at k=32 held-out perplexity moved from +1.65% at 128-token pages to +1.33% at "
                     "16: a finer page helps a little, a coarser one tends towards sequence-wide VMC (+1.69%)")


def page_size_warning(thresholds: ThresholdFile, block_size: int, path: str | Path) -> str | None:
    """A warning when block-wise VMC runs at another page size than it was calibrated at (None: same, or n/a)."""
    comp = thresholds.compensation
    if comp.vmc_scope is not VmcScope.BLOCK or not comp.vmc or comp.block_size in (None, block_size):
        return None
    return (f"TOPT threshold file {path} calibrated block-wise VMC at {comp.block_size}-token KV pages, but this "
            f"server pages by {block_size} tokens; its recorded held-out loss holds at {comp.block_size} "
            f"(--block-size {comp.block_size}). Measured: {PAGE_GRAIN_EFFECT}.")


def describe(thresholds: ThresholdFile) -> str:
    """One line on what a file does and what it was measured to cost, for the start-up log."""
    comp = thresholds.compensation
    mass = thresholds.keep_mass()
    if mass is not None:
        floor = f", at least {thresholds.target_k} per row" if thresholds.provenance.keep_mass.get("at_least_k") else ""
        k = f"keep mass {mass:g} per head{floor} (rows with n <= {thresholds.target_k} dense)"
    else:
        k = f"mean k={thresholds.target_k} (per-layer budget)" if thresholds.layer_k else f"k={thresholds.target_k}"
    vmc = "no VMC" if not comp.vmc else (
        f"block VMC at {comp.block_size or '?'}-token pages" if comp.vmc_scope is VmcScope.BLOCK else "sequence VMC")
    line = (f"{k}, {thresholds.placement}, {vmc}, {len(thresholds.thresholded_layers())} of "
            f"{thresholds.model.num_layers} layers thresholded; calibrated on {thresholds.model.name}")
    heldout = getattr(thresholds.provenance, "heldout", None) or {}
    if not heldout:
        return line + "; no held-out measurement recorded"
    perplexity = heldout.get("perplexity") or {}
    loss = (f"perplexity {perplexity['loss_pct']:+.2f}% vs dense" if "loss_pct" in perplexity
            else "perplexity not recorded")
    # Files calibrated before densities were recorded carry them from their perplexity run.
    measured = {**perplexity, **heldout}
    densities = ", ".join(f"{measured[key]:.1%} {label}" for key, label in
                          (("element_density", "of elements"), ("v_row_density", "V rows"),
                           ("v_block_density", "V blocks")) if key in measured) or "densities not recorded"
    target = getattr(thresholds.provenance, "target", None)
    if target:
        loss += f" (calibrated to <= +{target['target_loss_pct']:g}%, {'met' if target['met'] else 'MISSED'})"
    # A keep-mass file has no k per row to keep (k is the dense-row limit): its kept count is the measure.
    kept = (f"mean kept {heldout.get('mean_kept_per_row', float('nan')):.1f} per row" if mass is not None
            else f"kept/k {heldout.get('kept_over_k', float('nan')):.2f}")
    return f"{line}; held-out ({heldout.get('data', 'unnamed data')}): {loss}, {densities}, {kept}"


def shipped_config_files() -> list[Path]:
    """Threshold files shipped with the package (vllm_topt/configs: the checkout's configs/, or the wheel's copy)."""
    return sorted((Path(__file__).parent.parent / "configs").glob("*.json"))


def find_shipped_thresholds(hf_config, operating_point: str = "speed") -> Path | None:
    """The shipped threshold file for the served model at an operating point (matched by fingerprint).

    "speed": the k=32 file; "quality": `*.quality.json`, chosen by
    `--target-loss` (a per-layer budget or a keep mass) with block-wise
    compensation. A shipped file that does not load is an error naming it,
    never skipped.
    """
    fingerprint = model_fingerprint(hf_config)
    quality = operating_point == "quality"
    for path in shipped_config_files():
        if path.name.endswith(QUALITY_SUFFIX) == quality and load_shipped(path).model.fingerprint == fingerprint:
            return path
    return None


@functools.lru_cache(maxsize=16)
def load_shipped(path: Path) -> ThresholdFile:
    try:
        return load_threshold_file(path)
    except ThresholdFileError as exc:
        raise ThresholdFileError(
            f"{exc}\nThis file ships with vllm-topt ({path.parent}): the installation is damaged. "
            "Reinstall vllm-topt (pip install --force-reinstall vllm-topt)."
        ) from exc


class LayerThresholds:
    """One layer's thresholds as tensors, with vectorised lookup θ(n).

    Values are interpolated piecewise linearly in ln(n), on ln θ for
    post-softmax (probabilities span decades) and on θ for pre-softmax
    (scores). Below the grid the first value holds. Beyond the grid the
    "loglog-slope" rule continues the trend of the top octave of the grid:
    the least-squares slope of the interpolated quantity against ln(n) over
    grid points with n >= n_max/2, clamped so the threshold never loosens
    beyond the grid (post: slope in [-1, 0], since the k-th largest
    probability cannot fall faster than 1/n; pre: slope >= 0).
    """

    def __init__(self, n_grid: list[int], values: list[list[float]], placement: str):
        self.placement = placement
        self.log_n = torch.tensor([math.log(n) for n in n_grid], dtype=torch.float64)
        table = torch.tensor(values, dtype=torch.float64)  # [H, G]
        self.table = table.log() if placement == Placement.POST_SOFTMAX else table
        self.slope = self._fit_slope()
        self._memo: torch.Tensor | None = None

    def _fit_slope(self) -> torch.Tensor:
        cutoff = self.log_n[-1] + math.log(EXTRAPOLATION_FIT_FRACTION)
        sel = self.log_n >= cutoff - 1e-12
        if int(sel.sum()) < 2:
            sel[-2:] = True
        x = self.log_n[sel]
        y = self.table[:, sel]
        xc = x - x.mean()
        slope = (y - y.mean(dim=1, keepdim=True)) @ xc / (xc @ xc)
        if self.placement == Placement.POST_SOFTMAX:
            return slope.clamp(min=-1.0, max=0.0)
        return slope.clamp(min=0.0)

    def lookup_memoised(self, n: torch.Tensor) -> torch.Tensor:
        """`lookup` as float32 from a per-length table, grown by doubling (the decode hot path)."""
        return self.table_upto(int(n.max()))[n.long()]

    def table_upto(self, n_max: int) -> torch.Tensor:
        """θ for every length 0..N-1 (N > n_max) as a float32 [N, H] table, grown by doubling."""
        if self._memo is None or self._memo.shape[0] <= n_max:
            size = 1 << max(n_max, 1023).bit_length()
            self._memo = self.lookup(torch.arange(size)).float().contiguous()
        return self._memo

    def lookup(self, n: torch.Tensor) -> torch.Tensor:
        """θ for row lengths n ([R] ints) -> [R, H] float64."""
        x = n.to(torch.float64).clamp(min=1).log()
        grid = self.log_n
        idx = torch.searchsorted(grid, x).clamp(1, len(grid) - 1)
        x0, x1 = grid[idx - 1], grid[idx]
        y0, y1 = self.table[:, idx - 1], self.table[:, idx]  # [H, R]
        frac = ((x - x0) / (x1 - x0)).clamp(0.0, 1.0)
        inside = y0 + (y1 - y0) * frac
        beyond = self.table[:, -1:] + self.slope[:, None] * (x - grid[-1])
        y = torch.where(x > grid[-1], beyond, inside).T
        return y.exp() if self.placement == Placement.POST_SOFTMAX else y


@dataclass(frozen=True)
class LayerPlan:
    """What one layer of a served (or benchmarked) model does: its rule and its heads' θ(n)."""

    rule: ToptRule
    thresholds: LayerThresholds | None  # None for a dense layer
