"""The calibration checkpoint: the statistics after every sequence, so no interrupted run is lost.

One file next to the output, OUT.checkpoint.pt, replaced atomically after each
sequence (written to a temporary file, then renamed), so a Ctrl-C or a lost
machine leaves the last complete sequence on disk, never a half-written one.
It records the run's key (model fingerprint, data hash, every argument that
changes the statistics): `--resume` continues only the same run, and the sums
continue in the same order, so the result equals an uninterrupted run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from vllm_topt.method.rules import DensityCounts

CHECKPOINT_SUFFIX = ".checkpoint.pt"
# What each session mode accumulates (vllm_topt.calibration.attention.CalibrationSession).
SESSION_TENSORS = {
    "collect": ("value_sum", "value_sq_sum", "value_count"),
    "apply": ("kept_by_layer", "rows_by_layer", "next_token_loss"),
    "profile": ("profile_error", "profile_norm"),
    "dense": ("next_token_loss",),
}


class CheckpointError(ValueError):
    """A checkpoint cannot be continued or would be overwritten; the message says what to do."""


def checkpoint_path(out: Path) -> Path:
    return out.with_name(out.name + CHECKPOINT_SUFFIX)


class Checkpoint:
    def __init__(self, path: Path, key: dict, state: dict):
        self.path = path
        self.key = key
        self.state = state

    @classmethod
    def open(cls, path: Path, key: dict, resume: bool) -> "Checkpoint":
        """The run's checkpoint: continued with `resume`, else new (refusing to overwrite an old one)."""
        key = json.loads(json.dumps(key))  # the form it takes on disk
        if not resume:
            if path.exists():
                done = cls(path, key, _load(path)).sequences_done()
                raise CheckpointError(f"{path} holds an interrupted run ({done} sequences done); continue it with "
                                      "--resume, or delete the file to start over")
            return cls(path, key, {"key": key, "phases": {}})
        if not path.exists():
            raise CheckpointError(f"--resume: there is no checkpoint {path} (it is removed once the threshold file "
                                  "is written); run without --resume to start")
        state = _load(path)
        differ = [name for name in sorted(set(key) | set(state["key"])) if key.get(name) != state["key"].get(name)]
        if differ:
            detail = "; ".join(f"{name}: {state['key'].get(name)!r} there, {key.get(name)!r} here" for name in differ)
            raise CheckpointError(f"--resume: {path} was written by a different run ({detail}). Rerun with its "
                                  "arguments and data, or delete the file to start over")
        return cls(path, key, state)

    def sequences_done(self) -> int:
        return sum(p["done"] for p in self.state["phases"].values())

    def restore(self, phase: str, session) -> int:
        """Load `phase`'s saved sums into the session; the number of sequences they cover."""
        saved = self.state["phases"].get(phase)
        if saved is None:
            return 0
        for name, tensor in saved["tensors"].items():
            getattr(session, name).copy_(tensor)
        session.counts = DensityCounts(**saved["counts"])
        session.counts_by_layer = [DensityCounts(**c) for c in saved["counts_by_layer"]]
        return saved["done"]

    def save(self, phase: str, done: int, session) -> None:
        self.state["phases"][phase] = {
            "done": done,
            "tensors": {name: getattr(session, name).detach().cpu().clone() for name in SESSION_TENSORS[session.mode]},
            "counts": session.counts.as_dict(),
            "counts_by_layer": [c.as_dict() for c in session.counts_by_layer],
        }
        self._write()

    def trial(self, name: str) -> dict | None:
        """A finished --target-loss trial's record (None: not run yet)."""
        return self.state.get("trials", {}).get(name)

    def save_trial(self, name: str, record: dict, phases: list[str]) -> None:
        """Keep a finished trial's record and drop its phases' sums: it never runs again."""
        self.state.setdefault("trials", {})[name] = record
        for phase in phases:
            self.state["phases"].pop(phase, None)
        self._write()

    def _write(self) -> None:
        partial = self.path.with_name(self.path.name + ".partial")
        torch.save(self.state, partial)
        os.replace(partial, self.path)


def _load(path: Path) -> dict:
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which, do not guess
        raise CheckpointError(f"{path} is not a readable calibration checkpoint ({exc}); delete it to start over") \
            from exc
