"""Per-request modes: `"vllm_xargs": {"topt": "dense"}` decodes one request with every element kept, and
`{"topt": NAME}` with one of the operating points the server loaded (`request_points`).

Nothing in vLLM carries a request's parameters to an attention backend. The
one per-request state vLLM keeps in batch-row order, where the attention
metadata builder can read it, is the logits processors': with the V1 model
runner each custom processor is told every step which request sits in which
row of the persistent batch (`update_state`), before the batch's attention
metadata is built, and its `validate_params` runs in the API server at
admission, so an unknown value is a 400 before the request is queued.

So, when TOPT is selected, the plugin adds `ToptRequestModes` to the model's
logits processors (`install`). It never changes logits; it keeps one mode code
per batch row (0: the server's file, 1: dense, 2...: the request points, in the
order given; `config.options.request_modes_of`), and the builder reads the
codes of the decode rows (decodes come first in the batch, in persistent-batch
order) as data for the kernel.

On CPU the layers split the batch by these codes. On CUDA the builder copies
them into one persistent device buffer (`RowModes`) that the kernels read, so
the choice is data inside a captured graph, not control flow. Under vLLM's V2
model runner (which keys processor state by request slot, not batch row) it
is not supported yet: a request that asks for a mode is refused at admission
with the reason (`ToptRequestModesV2`), never decoded sparse.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from vllm_topt.config.options import options_from_vllm_config, request_modes_of
from vllm_topt.method.rules import RESERVED_MODES, SPARSE_MODE

XARG_KEY = "topt"
V1_PROCESSOR = "vllm_topt.request_modes:ToptRequestModes"
V2_PROCESSOR = "vllm_topt.request_modes:ToptRequestModesV2"

_current: dict[str, "ToptRequestModes"] = {}  # this engine process's processor (one model runner)
# The modes this process's server accepts, by code (set by `install` from the configuration, in the API
# server as in the engine: `validate_params` has no configuration of its own).
_accepted = {"modes": RESERVED_MODES}


def accepted_modes() -> tuple[str, ...]:
    return _accepted["modes"]


def accept_modes_of(vllm_config) -> None:
    _accepted["modes"] = request_modes_of(options_from_vllm_config(vllm_config))


def requested_mode(sampling_params) -> str | None:
    """The request's `topt` value, checked: None when it says nothing."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    if XARG_KEY not in extra:
        return None
    value, modes = extra[XARG_KEY], accepted_modes()
    if value not in modes:
        raise ValueError(f"vllm_xargs.{XARG_KEY}={value!r} is not a TOPT mode of this server; allowed: "
                         + ", ".join(repr(m) for m in modes) + f" (leaving it out means {SPARSE_MODE!r})")
    return value


def mode_code(sampling_params) -> int:
    """The request's mode as the code the kernels read (0 when it says nothing)."""
    mode = requested_mode(sampling_params)
    return 0 if mode is None else accepted_modes().index(mode)


def _v1_base():
    from vllm.v1.sample.logits_processor import LogitsProcessor

    return LogitsProcessor


class ToptRequestModes(_v1_base()):
    """Row modes of the persistent batch: how each request decodes. Logits pass through unchanged."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        requested_mode(sampling_params)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.codes = np.zeros(vllm_config.scheduler_config.max_num_seqs, dtype=np.int32)
        _current["modes"] = self
        accept_modes_of(vllm_config)  # the engine process may not have run `install`

    def is_argmax_invariant(self) -> bool:
        return True  # it never changes logits

    def update_state(self, batch_update) -> None:
        if batch_update is None:
            return
        from vllm.v1.sample.logits_processor import MoveDirectionality

        for index in batch_update.removed:
            self.codes[index] = 0
        for index, params, _, _ in batch_update.added:
            self.codes[index] = mode_code(params)
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                self.codes[[a, b]] = self.codes[[b, a]]
            else:
                self.codes[b], self.codes[a] = self.codes[a], 0

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


def row_modes(num_rows: int) -> torch.Tensor | None:
    """Int32 [num_rows]: the mode codes of the batch's first rows (the decodes); None when all are 0."""
    modes = _current.get("modes")
    if modes is None or not num_rows or not modes.codes[:num_rows].any():
        return None
    return torch.from_numpy(modes.codes[:num_rows].copy())


class RowModes:
    """A persistent device copy of the decode rows' mode codes (int32 [max rows]) the CUDA kernels read.

    Filled by the metadata builder before each step's forward, so a replayed graph reads the step's flags.
    One per process and device, shared by every builder (they fill it with the same flags)."""

    def __init__(self, rows: int, device) -> None:
        self.tensor = torch.zeros(rows, dtype=torch.int32, device=device)
        self.dirty = False  # whether a row may hold a code other than 0

    def fill(self, codes: torch.Tensor | None) -> torch.Tensor:
        """Write this step's codes (host int32 [num_decodes] or None: all 0); returns the whole buffer."""
        if codes is None:
            if self.dirty:
                self.tensor.zero_()
                self.dirty = False
            return self.tensor
        if len(codes) > len(self.tensor):
            raise RuntimeError(f"TOPT: {len(codes)} decode rows, row modes sized for {len(self.tensor)}")
        self.tensor[: len(codes)].copy_(codes.to(torch.int32), non_blocking=True)
        self.tensor[len(codes):].zero_()
        self.dirty = True
        return self.tensor


def _v2_base():
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor

    return LogitsProcessor


@functools.cache
def _v2_processor():
    class ToptRequestModesV2(_v2_base()):
        """Under vLLM's V2 model runner: refuse requests that ask for a mode (not supported there yet)."""

        @classmethod
        def validate_params(cls, sampling_params) -> None:
            if requested_mode(sampling_params) is not None:
                raise ValueError(f"vllm_xargs.{XARG_KEY} needs vLLM's V1 model runner: start the server with "
                                 "VLLM_USE_V2_MODEL_RUNNER=0 to choose TOPT modes per request")

        def add_request(self, req_idx: int, sampling_params) -> bool:
            return False  # never changes logits

        def apply(self, logits, *args, **kwargs):
            return logits

    return ToptRequestModesV2


def __getattr__(name: str):
    if name == "ToptRequestModesV2":  # built on first use: the V2 interface may not exist in every vLLM
        return _v2_processor()
    raise AttributeError(name)


def install(vllm_config) -> None:
    """Add the processor that carries per-request modes to this configuration (once; generate models only),
    and accept the modes its `topt` block defines."""
    accept_modes_of(vllm_config)
    model_config = vllm_config.model_config
    if getattr(model_config, "runner_type", "generate") != "generate":
        return
    processor = V2_PROCESSOR if vllm_config.use_v2_model_runner else V1_PROCESSOR
    current = list(model_config.logits_processors or [])
    if processor not in current:
        model_config.logits_processors = current + [processor]
