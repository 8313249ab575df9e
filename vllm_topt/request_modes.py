"""Per-request modes: `"vllm_xargs": {"topt": "dense"}` decodes one request with every element kept.

Nothing in vLLM carries a request's parameters to an attention backend. The
one per-request state vLLM keeps in batch-row order, where the attention
metadata builder can read it, is the logits processors': with the V1 model
runner each custom processor is told every step which request sits in which
row of the persistent batch (`update_state`), before the batch's attention
metadata is built, and its `validate_params` runs in the API server at
admission, so an unknown value is a 400 before the request is queued.

So, when TOPT is selected, the plugin adds `ToptRequestModes` to the model's
logits processors (`install`). It never changes logits; it keeps one flag per
batch row, and the builder reads the flags of the decode rows (decodes come
first in the batch, in persistent-batch order) as data for the kernel.

On CPU the layers split the batch by these flags. On CUDA the builder copies
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

XARG_KEY = "topt"
DENSE = "dense"
SPARSE = "sparse"  # the server's own threshold file (what a request that says nothing gets)
MODES = (SPARSE, DENSE)
V1_PROCESSOR = "vllm_topt.request_modes:ToptRequestModes"
V2_PROCESSOR = "vllm_topt.request_modes:ToptRequestModesV2"

_current: dict[str, "ToptRequestModes"] = {}  # this engine process's processor (one model runner)


def requested_mode(sampling_params) -> str | None:
    """The request's `topt` value, checked: None when it says nothing."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    if XARG_KEY not in extra:
        return None
    value = extra[XARG_KEY]
    if value not in MODES:
        raise ValueError(f"vllm_xargs.{XARG_KEY}={value!r} is not a TOPT mode; allowed: "
                         + ", ".join(repr(m) for m in MODES) + f" (leaving it out means {SPARSE!r})")
    return value


def _v1_base():
    from vllm.v1.sample.logits_processor import LogitsProcessor

    return LogitsProcessor


class ToptRequestModes(_v1_base()):
    """Row flags of the persistent batch: which requests decode dense. Logits pass through unchanged."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        requested_mode(sampling_params)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.dense = np.zeros(vllm_config.scheduler_config.max_num_seqs, dtype=bool)
        _current["modes"] = self

    def is_argmax_invariant(self) -> bool:
        return True  # it never changes logits

    def update_state(self, batch_update) -> None:
        if batch_update is None:
            return
        from vllm.v1.sample.logits_processor import MoveDirectionality

        for index in batch_update.removed:
            self.dense[index] = False
        for index, params, _, _ in batch_update.added:
            self.dense[index] = requested_mode(params) == DENSE
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                self.dense[[a, b]] = self.dense[[b, a]]
            else:
                self.dense[b], self.dense[a] = self.dense[a], False

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


def dense_rows(num_rows: int) -> torch.Tensor | None:
    """Bool [num_rows]: which of the batch's first rows (the decodes) decode dense; None when none do."""
    modes = _current.get("modes")
    if modes is None or not num_rows or not modes.dense[:num_rows].any():
        return None
    return torch.from_numpy(modes.dense[:num_rows].copy())


class RowModes:
    """A persistent device copy of the decode rows' modes (int32 [max rows], 1 = dense) the CUDA kernels read.

    Filled by the metadata builder before each step's forward, so a replayed graph reads the step's flags.
    One per process and device, shared by every builder (they fill it with the same flags)."""

    def __init__(self, rows: int, device) -> None:
        self.tensor = torch.zeros(rows, dtype=torch.int32, device=device)
        self.dirty = False  # whether a row may hold 1

    def fill(self, dense: torch.Tensor | None) -> torch.Tensor:
        """Write this step's flags (host bool [num_decodes] or None: all sparse); returns the whole buffer."""
        if dense is None:
            if self.dirty:
                self.tensor.zero_()
                self.dirty = False
            return self.tensor
        if len(dense) > len(self.tensor):
            raise RuntimeError(f"TOPT: {len(dense)} decode rows, row modes sized for {len(self.tensor)}")
        self.tensor[: len(dense)].copy_(dense.to(torch.int32), non_blocking=True)
        self.tensor[len(dense):].zero_()
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
    """Add the processor that carries per-request modes to this configuration (once; generate models only)."""
    model_config = vllm_config.model_config
    if getattr(model_config, "runner_type", "generate") != "generate":
        return
    processor = V2_PROCESSOR if vllm_config.use_v2_model_runner else V1_PROCESSOR
    current = list(model_config.logits_processors or [])
    if processor not in current:
        model_config.logits_processors = current + [processor]
