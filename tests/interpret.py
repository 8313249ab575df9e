"""Load modules whose Triton kernels must run in the Triton interpreter (CPU, no GPU).

Kernels are decorated as interpreted functions when their module is imported
with TRITON_INTERPRET=1, and Triton reads the variable again at launch. So:
set it for the import (re-importing a module an earlier test loaded compiled),
and, through `interpreter_env`, while the tests that launch kernels run;
restore it otherwise, so other tests (and the engine processes they spawn)
keep their environment.
"""

from __future__ import annotations

import contextlib
import importlib
import os


@contextlib.contextmanager
def interpreter_env():
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def load_interpreted(*names: str):
    """Import (or re-import, in order) the named modules with the interpreter on."""
    with interpreter_env():
        kernels = importlib.import_module("vllm_topt.kernels.triton.decode")
        if not kernels.INTERPRETED:
            importlib.reload(kernels)
        modules = [
            kernels if name == kernels.__name__ else importlib.reload(importlib.import_module(name)) for name in names
        ]
    return modules
