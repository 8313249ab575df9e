"""Installed next to a vLLM it cannot serve, the plugin never stops vLLM: it stands down, and only TOPT is refused.

The plugin is made to believe vLLM is out of range by a `sitecustomize` that
patches the version the guard reads (`vllm_support.installed_vllm_version`) in
every process the server spawns; vLLM itself is not touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.engine_run import ROOT
from tests.serving import START_TIMEOUT_S, complete, free_port, server_command, server_env, serving

OUT_OF_RANGE_VERSION = "0.99.0"
STAND_DOWN_LINE = "TOPT is not available in this process"


def patched_site(root: Path, patch: str) -> dict:
    """Environment variables that run `patch` at the start of every Python process."""
    (root / "sitecustomize.py").write_text(textwrap.dedent(patch))
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(root), str(ROOT), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def out_of_range_env(tmp_path_factory) -> dict:
    return patched_site(tmp_path_factory.mktemp("site"), f"""
        import vllm_topt.vllm_support as support
        support.installed_vllm_version = lambda: {OUT_OF_RANGE_VERSION!r}
        """)


def test_dense_vllm_serves_beside_an_out_of_range_plugin(out_of_range_env, tmp_path):
    log_path = tmp_path / "dense.log"
    with serving(log_path, None, backend="CPU_ATTN", env=out_of_range_env) as base:
        assert "Paris" in complete(base, "The capital of France is")
    log = log_path.read_text()
    assert STAND_DOWN_LINE in log and f"this is vLLM {OUT_OF_RANGE_VERSION}" in log, log[-3000:]


def test_topt_is_refused_before_the_engine_starts_naming_the_range(out_of_range_env):
    from vllm_topt.vllm_support import SUPPORTED_VLLM

    proc = subprocess.run(server_command(free_port(), {}), cwd=ROOT, env=server_env(**out_of_range_env),
                          capture_output=True, text=True, timeout=START_TIMEOUT_S)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "ToptUnavailableError" in output, output[-3000:]
    assert f"supports vLLM >= {SUPPORTED_VLLM[0]}, < {SUPPORTED_VLLM[1]}" in output, output[-3000:]
    assert "EngineCore" not in output, "refused only after an engine process started:\n" + output[-3000:]


PROBE = """
from types import SimpleNamespace
from vllm.platforms import current_platform
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm_topt import plugin

plugin.register()  # must not raise
config = SimpleNamespace(attention_config=SimpleNamespace(backend=AttentionBackendEnum["TOPT"]))
try:
    type(current_platform).check_and_update_config(config)
except plugin.ToptUnavailableError as exc:
    print("REFUSED:", exc)
"""


@pytest.mark.parametrize("failure", ["version", "entry-point-bug"])
def test_any_failure_in_the_entry_point_is_a_warning_and_a_topt_refusal(tmp_path, failure):
    patch = {
        "version": f"import vllm_topt.vllm_support as s; s.installed_vllm_version = lambda: {OUT_OF_RANGE_VERSION!r}",
        "entry-point-bug": "import vllm_topt.plugin as p\n"
                           "def broken(*a, **k): raise KeyError('no such platform hook')\n"
                           "p._teach_platform = broken",
    }[failure]
    env = dict(os.environ, **patched_site(tmp_path, patch))
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert STAND_DOWN_LINE in output and "only --attention-backend topt is refused" in output, output[-3000:]
    refused = [line for line in output.splitlines() if line.startswith("REFUSED:")]
    assert refused, output[-3000:]
    expected = "supports vLLM >=" if failure == "version" else "KeyError: 'no such platform hook'"
    assert expected in refused[0], refused
