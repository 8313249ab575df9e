"""The method's types: placement and compensation codes, a layer's rule, the SPEC §7 counts.

Every kernel takes the codes from here: the C++ kernel is compiled with them
(`kernels/cpu/cpp.py` passes them as -D flags), the Triton kernels receive
them as constexprs, and `DensityCounts`' field order is the order of the
device counter tensors. There is no other definition.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, fields

import torch


class _Coded(str, enum.Enum):
    """A string-valued enum whose kernel code is its position in the declaration."""

    @functools.cached_property
    def code(self) -> int:  # cached: the decode path reads it for every layer call
        return list(type(self)).index(self)

    def __str__(self) -> str:
        return self.value


class Placement(_Coded):
    """Where the threshold applies (SPEC §2): to probabilities or to scores."""

    POST_SOFTMAX = "post-softmax"
    PRE_SOFTMAX = "pre-softmax"


class Sdc(_Coded):
    """Softmax-denominator compensation for pre-softmax placement (SPEC §4)."""

    NONE = "none"
    EXACT = "exact"
    EXP_THRESHOLD = "exp-threshold"


class VmcScope(_Coded):
    """Over what V-mean compensation spreads the dropped mass (SPEC §4).

    "sequence": the whole dropped mass times mean(V) of the row (the paper's VMC).
    "block": each V block's own dropped mass times that block's mean(V).
    """

    SEQUENCE = "sequence"
    BLOCK = "block"


# Request modes (`request_modes`): a request in the server's own operating point (what saying nothing gets),
# or one that keeps every element; a server's request points follow. A mode's code is its position: the
# kernels read the codes per row.
SPARSE_MODE = "sparse"
DENSE_MODE = "dense"
RESERVED_MODES = (SPARSE_MODE, DENSE_MODE)
DENSE_MODE_CODE = RESERVED_MODES.index(DENSE_MODE)


@dataclass(frozen=True)
class ToptRule:
    """What one layer does with a decode row (from the threshold file)."""

    placement: Placement = Placement.POST_SOFTMAX
    sdc: Sdc = Sdc.NONE  # pre-softmax only
    vmc: bool = True
    k: int = 64
    dense: bool = False  # dense layer, or sparsity disabled
    vmc_scope: VmcScope = VmcScope.SEQUENCE

    def __post_init__(self) -> None:
        # Accept the file's strings; keep the enums (and so their codes) inside.
        object.__setattr__(self, "placement", Placement(self.placement))
        object.__setattr__(self, "sdc", Sdc(self.sdc))
        object.__setattr__(self, "vmc_scope", VmcScope(self.vmc_scope))

    @property
    def block_vmc(self) -> bool:
        """VMC per V block (SPEC §4), on a thresholded layer."""
        return self.vmc and not self.dense and self.vmc_scope is VmcScope.BLOCK


def layer_rules(num_layers: int, placement: str, sdc: str, vmc: bool, k: int, layer_k: dict[int, int],
                dense_layers, disable_sparsity: bool = False,
                vmc_scope: str = VmcScope.SEQUENCE) -> list[ToptRule]:
    """Every layer's rule from a file's (or the calibration CLI's) settings; the one place they combine."""
    dense = set(dense_layers)
    return [
        ToptRule(placement=placement, sdc=sdc, vmc=vmc, k=layer_k.get(layer, k),
                 dense=disable_sparsity or layer in dense, vmc_scope=vmc_scope)
        for layer in range(num_layers)
    ]


@dataclass
class DensityCounts:
    """SPEC §7 accounting. "visible" is what dense attention would touch.

    The field order is the counter order of the device kernels (`COUNTER_FIELDS`).
    """

    rows: int = 0
    elements_visible: int = 0
    elements_kept: int = 0
    v_rows_visible: int = 0
    v_rows_read: int = 0
    v_blocks_visible: int = 0
    v_blocks_read: int = 0
    # Query-head rows the threshold applied to (n > k, layer not dense), the
    # elements they kept, and their target (k per row): kept/k = kept / target.
    thresholded_rows: int = 0
    thresholded_kept: int = 0
    thresholded_target: int = 0

    def add(self, other: "DensityCounts") -> "DensityCounts":
        for name in COUNTER_FIELDS:  # not fields(): this runs for every layer call
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_counters(cls, values) -> "DensityCounts":
        """From a counter vector in `COUNTER_FIELDS` order."""
        return cls(**dict(zip(COUNTER_FIELDS, (int(v) for v in values))))

    @property
    def element_density(self) -> float:
        return self.elements_kept / max(self.elements_visible, 1)

    @property
    def v_row_density(self) -> float:
        return self.v_rows_read / max(self.v_rows_visible, 1)

    @property
    def v_block_density(self) -> float:
        return self.v_blocks_read / max(self.v_blocks_visible, 1)

    @property
    def kept_over_k(self) -> float | None:
        return self.thresholded_kept / self.thresholded_target if self.thresholded_target else None


COUNTER_FIELDS = tuple(f.name for f in fields(DensityCounts))
NUM_COUNTERS = len(COUNTER_FIELDS)


def window_counters(seq_lens: torch.Tensor, window: int | None, num_heads: int, num_kv_heads: int,
                    block_size: int) -> torch.Tensor:
    """SPEC §7 counters of rows attended densely ([R, NUM_COUNTERS] int64, `COUNTER_FIELDS` order).

    Row r sees its last `window` keys (all `seq_lens[r]` without a window), every
    one kept; its V blocks are the pages those keys span. Torch ops only, so a
    captured CUDA graph replays them.
    """
    n = seq_lens.to(torch.int64)
    first = n - n if window is None else (n - window).clamp(min=0)
    keys = n - first
    blocks = (n - 1).div(block_size, rounding_mode="floor") - first.div(block_size, rounding_mode="floor") + 1
    zero = torch.zeros_like(n)
    by_field = {
        "rows": (n > 0).to(torch.int64),  # padding rows of a replayed graph (n = 0) are no rows
        "elements_visible": keys * num_heads, "elements_kept": keys * num_heads,
        "v_rows_visible": keys * num_kv_heads, "v_rows_read": keys * num_kv_heads,
        "v_blocks_visible": blocks * num_kv_heads, "v_blocks_read": blocks * num_kv_heads,
    }
    return torch.stack([by_field.get(name, zero) for name in COUNTER_FIELDS], dim=1)
