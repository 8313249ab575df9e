"""The built wheel works on its own: shipped thresholds, calibration entry point, no generic top-level module.

Builds the wheel from this checkout, installs it into an empty folder and runs
Python from a folder outside the checkout with only that install on the path
(plus the environment's dependencies: torch, pydantic, transformers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.engine_run import DEFAULT_MODEL, ROOT

SHIPPED = sorted(p.name for p in (ROOT / "configs").glob("*.json"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, cwd=out, capture_output=True, timeout=300)
    (path,) = out.glob("vllm_topt-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return target


def run_outside(installed: Path, tmp_path: Path, *command: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(installed), VLLM_TOPT_CACHE_DIR=str(tmp_path / "cache"))
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_carries_every_shipped_file_under_the_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(Path(n).name for n in names if n.startswith("vllm_topt/configs/")) == SHIPPED
    assert "vllm_topt/kernels/cpu/csrc/topt_cpu.cpp" in names
    assert "vllm_topt/calibration/calibrate.py" in names
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"vllm_topt"}, top_level
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "vllm-topt-calibrate = vllm_topt.calibration.calibrate:main" in text
    assert "topt = vllm_topt.plugin:register" in text


def test_installed_wheel_finds_shipped_thresholds_outside_the_checkout(installed, tmp_path):
    probe = f"""
import json, vllm_topt
from pathlib import Path
from transformers import AutoConfig
from vllm_topt.cache import cache_dir
from vllm_topt.config.options import ToptOptions, resolve_thresholds
from vllm_topt.config.thresholds import shipped_config_files
_, path = resolve_thresholds(ToptOptions(), AutoConfig.from_pretrained({str(DEFAULT_MODEL)!r}), "default")
print(json.dumps({{"package": vllm_topt.__file__, "shipped": [str(p) for p in shipped_config_files()],
                  "resolved": str(path), "cache": str(cache_dir())}}))
"""
    proc = run_outside(installed, tmp_path, sys.executable, "-c", probe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    inside = str(installed / "vllm_topt")
    assert found["package"].startswith(inside)
    assert sorted(Path(p).name for p in found["shipped"]) == SHIPPED
    assert all(p.startswith(inside) for p in found["shipped"])
    assert found["resolved"] == str(installed / "vllm_topt" / "configs" / "smollm2-135m-instruct.k32.post-softmax.json")
    assert found["cache"] == str(tmp_path / "cache")


def test_installed_calibration_entry_points_answer_help(installed, tmp_path):
    for command in ([str(installed / "bin" / "vllm-topt-calibrate"), "--help"],
                    [sys.executable, "-m", "vllm_topt.calibration", "--help"]):
        proc = run_outside(installed, tmp_path, *command)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "usage: vllm-topt-calibrate" in proc.stdout and "--data PATH" in proc.stdout and "--resume" in proc.stdout


def test_cache_folder_follows_xdg_and_the_override(monkeypatch, tmp_path):
    from vllm_topt.cache import CACHE_DIR_ENV, cache_dir

    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "vllm-topt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "vllm-topt"
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
