"""Every vLLM name the plugin relies on still exists: one test per touchpoint, failing if vLLM renames it."""

from __future__ import annotations

import importlib

import pytest

from vllm_topt.vllm_support import VLLM_TOUCHPOINTS


@pytest.mark.parametrize("touchpoint", VLLM_TOUCHPOINTS)
def test_vllm_touchpoint_exists(touchpoint):
    module_name, _, attribute_path = touchpoint.partition(":")
    try:
        target = importlib.import_module(module_name)
    except ImportError:  # another platform's module (vllm.platforms.cuda in a CPU build): read its source instead
        from tests.vllm_sources import installed, resolve

        assert resolve(installed(), touchpoint), f"vLLM renamed or removed {touchpoint}: TOPT relies on it"
        return
    for name in attribute_path.split("."):
        assert hasattr(target, name), f"vLLM renamed or removed {touchpoint}: TOPT relies on it"
        target = getattr(target, name)


def test_touchpoints_cover_every_vllm_import_of_the_package():
    """A new `from vllm... import X` in the package must be listed, so that it is tested above."""
    import ast
    from pathlib import Path

    listed = {(t.partition(":")[0], t.partition(":")[2].split(".")[0]) for t in VLLM_TOUCHPOINTS}
    package = Path(__file__).resolve().parent.parent / "vllm_topt"
    missing = []
    for path in package.rglob("*.py"):
        if "calibration" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vllm":
                missing += [f"{path.name}: {node.module}:{a.name}" for a in node.names
                            if (node.module, a.name) not in listed and not _is_module(node.module, a.name)]
    assert not missing, f"list these in vllm_topt.vllm_support.VLLM_TOUCHPOINTS: {missing}"


def _is_module(package: str, name: str) -> bool:
    try:
        importlib.import_module(f"{package}.{name}")
        return True
    except ImportError:
        return False
