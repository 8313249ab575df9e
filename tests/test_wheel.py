"""The built wheel works on its own: shipped thresholds, calibration entry point, no generic top-level module.

Builds the wheel from this checkout (and from its sdist), installs it into an
empty folder and runs Python from a folder outside the checkout with only that
install on the path (plus the environment's dependencies: torch, pydantic,
transformers). A checkout without symlinks must refuse to build.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.engine_run import DEFAULT_MODEL, ROOT

SHIPPED = sorted(p.name for p in (ROOT / "configs").glob("*.json"))


# The two package folders that are symlinks to top-level folders (see setup.py).
LINKS = {"vllm_topt/configs": "../configs", "vllm_topt/calibration": "../calibration"}


def pip_wheel(source: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(out), str(source)], cwd=out, capture_output=True, text=True, timeout=300)


def build_wheel(source: Path, out: Path) -> Path:
    proc = pip_wheel(source, out)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (path,) = out.glob("vllm_topt-*.whl")
    return path


def install(wheel: Path, target: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return target


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(ROOT, tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    return install(wheel, tmp_path_factory.mktemp("site"))


@pytest.fixture(scope="module")
def sdist_installed(tmp_path_factory) -> Path:
    """This checkout's sdist, unpacked, built to a wheel and installed: what pip does with a source archive."""
    dist = tmp_path_factory.mktemp("sdist")
    # setuptools' own PEP 517 hook: `python -m build` is not a dependency of this project.
    sdist = "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])"
    subprocess.run([sys.executable, "-c", sdist, str(dist)], check=True, cwd=ROOT, capture_output=True, timeout=300)
    (archive,) = dist.glob("vllm_topt-*.tar.gz")
    shutil.unpack_archive(archive, dist / "unpacked")
    (source,) = (dist / "unpacked").iterdir()
    assert not any((source / link).is_symlink() for link in LINKS)  # the sdist carries the files themselves
    return install(build_wheel(source, tmp_path_factory.mktemp("sdist_wheel")), tmp_path_factory.mktemp("sdist_site"))


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
    assert found["resolved"] == str(installed / "vllm_topt" / "configs" / "smollm2-135m-instruct.k48.post-softmax.quality.json")
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


def test_wheel_built_from_the_sdist_carries_every_shipped_file(sdist_installed, tmp_path):
    package = sdist_installed / "vllm_topt"
    for path in (ROOT / "configs").glob("*.json"):
        assert (package / "configs" / path.name).read_bytes() == path.read_bytes(), path.name
    assert sorted(p.name for p in (package / "configs").glob("*.json")) == SHIPPED
    assert (sorted(p.name for p in (package / "calibration").glob("*.py"))
            == sorted(p.name for p in (ROOT / "calibration").glob("*.py")))
    proc = run_outside(sdist_installed, tmp_path, str(sdist_installed / "bin" / "vllm-topt-calibrate"), "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage: vllm-topt-calibrate" in proc.stdout


def copy_of_checkout(dest: Path) -> Path:
    """The checkout's files (tracked and new, not ignored), symlinks kept as symlinks."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, listed):
        source, target = ROOT / name, dest / name
        if not source.is_symlink() and not source.is_file():
            continue  # deleted in the working tree
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, target)
    return dest


# What a checkout or unpacked archive without symlink support leaves in place of a link.
BROKEN_LINKS = {
    "text file": lambda path, target: path.write_text(target),  # git with core.symlinks=false
    "empty folder": lambda path, target: path.mkdir(),
}


@pytest.mark.parametrize("broken", sorted(BROKEN_LINKS))
def test_build_without_symlinks_fails_and_names_the_fix(broken, tmp_path):
    tree = copy_of_checkout(tmp_path / "tree")
    for link, target in LINKS.items():
        assert (tree / link).is_symlink(), link
        (tree / link).unlink()
        BROKEN_LINKS[broken](tree / link, target)
    out = tmp_path / "out"
    out.mkdir()
    proc = pip_wheel(tree, out)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert not list(out.glob("*.whl"))
    assert "vllm-topt cannot be built" in output, output[-3000:]
    expected = {"text file": "vllm_topt/configs is a 10-byte file holding '../configs'",
                "empty folder": "vllm_topt/configs holds no *.json files"}[broken]
    assert expected in output and "vllm_topt/calibration" in output, output[-3000:]
    assert "git config core.symlinks true" in output
