"""Test-session setup."""

import os

# Triton decides when a @triton.jit function is defined (its own standard
# library included) whether it runs in the interpreter. vLLM imports Triton,
# so once an engine test module is collected the interpreter can no longer be
# switched on. The Triton tests therefore live in tests/interpreted/ and run in
# a process of their own with TRITON_INTERPRET=1 from the start
# (tests/test_interpreted.py).
if os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore = ["interpreted"]


import pytest  # noqa: E402

from tests.engine_run import ROOT  # noqa: E402

GEMMA_MODEL = ROOT / "models" / "gemma3-270m"


@pytest.fixture(scope="session")
def gemma_model():
    """Gemma-3-270M's folder (sliding-window layers, head size 256); `make test` builds it."""
    if not (GEMMA_MODEL / "config.json").exists():
        pytest.fail(f"{GEMMA_MODEL} is missing: build it with `python scripts/build_model.py gemma3-270m` "
                    "(`make test` does)")
    return GEMMA_MODEL
