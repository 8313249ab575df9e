"""Fetch a pinned wheel from PyPI once (pip download, no dependencies) into a cache folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def download_wheel(requirement: str, dest: Path) -> Path:
    """The wheel of `requirement` ("name==version") in `dest`, downloaded if missing."""
    name = requirement.split("==")[0].replace("-", "_")
    found = sorted(dest.glob(f"{name}-*.whl"))
    if not found:
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), requirement],
            check=True,
        )
        found = sorted(dest.glob(f"{name}-*.whl"))
    if not found:
        raise FileNotFoundError(f"pip download {requirement} produced no wheel in {dest}")
    return found[0]
