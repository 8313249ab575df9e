"""Fetch a pinned wheel from PyPI once (pip download, no dependencies) into a cache folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def download_command(requirement: str, dest: Path) -> list[str]:
    """The pip command that downloads the wheel of `requirement` into `dest` (wheels only, no dependencies)."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest),
            requirement]


def download_wheel(requirement: str, dest: Path) -> Path:
    """The wheel of `requirement` ("name==version") in `dest`, downloaded if missing."""
    name, _, version = requirement.partition("==")
    # By version too: the folder may hold other releases of the same project (e.g. vllm 0.33 and 0.34).
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(dest.glob(pattern))
    if not found:
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run(download_command(requirement, dest), check=True)
        found = sorted(dest.glob(pattern))
    if not found:
        raise FileNotFoundError(f"pip download {requirement} produced no wheel in {dest}")
    return found[0]
