"""Where vllm-topt keeps downloads and caches: a per-user folder, never inside the package.

`VLLM_TOPT_CACHE_DIR` overrides it; otherwise it is `$XDG_CACHE_HOME/vllm-topt`
(`~/.cache/vllm-topt` when XDG_CACHE_HOME is unset), as the XDG base-directory
convention says.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_DIR_ENV = "VLLM_TOPT_CACHE_DIR"


def cache_dir() -> Path:
    explicit = os.environ.get(CACHE_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "vllm-topt"
