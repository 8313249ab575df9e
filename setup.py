"""Refuse to build a package without its thresholds and calibration tool.

Everything else lives in pyproject.toml. vllm_topt/configs and vllm_topt/calibration
are symlinks to the top-level configs/ and calibration/ folders. A checkout made
without symlink support (git with core.symlinks=false, some zip tools) turns them
into small text files holding the target path, or drops them; setuptools would
then stop with an unrelated message or, for an empty folder, build a wheel with no
configs at all. This check runs before any build step (metadata, sdist, wheel,
editable install), so each of them fails with the cause and the fix.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
# package folder -> (top-level folder it links to, a file pattern it must hold, one file it must hold)
LINKED_FOLDERS = {
    "vllm_topt/configs": ("configs", "*.json", None),
    "vllm_topt/calibration": ("calibration", "*.py", "calibrate.py"),
}
FIX = (
    "Check the links out as symlinks: `git config core.symlinks true && git checkout -- vllm_topt/configs "
    "vllm_topt/calibration` (on Windows, enable Developer Mode first), or clone again with symlinks enabled. "
    "Or replace each with a real symlink to the top-level folder of the same name (or a copy of that folder)."
)


def linked_folder_problem(link: str, target: str, pattern: str, required: str | None) -> str | None:
    """Why `link` does not carry the files of `target`, or None when it does."""
    path, source = ROOT / link, ROOT / target
    if path.is_file():
        head = path.read_text(errors="replace")[:80].strip()
        return f"{link} is a {path.stat().st_size}-byte file holding {head!r}, not a symlink to the folder {target}/"
    if not path.is_dir():
        return f"{link} is missing (it should be a symlink to the folder {target}/)"
    names = sorted(p.name for p in path.glob(pattern))
    if not names:
        return f"{link} holds no {pattern} files"
    if required and required not in names:
        return f"{link} holds no {required}"
    # A stale copy instead of the link: the checkout's own folder is the truth when it is there.
    if source.is_dir() and source.resolve() != path.resolve():
        expected = sorted(p.name for p in source.glob(pattern))
        if names != expected:
            return f"{link} is not {target}/: its {pattern} files differ ({names} vs {expected})"
    return None


def require_linked_folders() -> None:
    problems = [linked_folder_problem(link, *expected) for link, expected in LINKED_FOLDERS.items()]
    problems = [p for p in problems if p]
    if problems:
        raise SystemExit(f"error: vllm-topt cannot be built: {'; '.join(problems)}. {FIX}")


# setuptools' build backend runs this file as __main__, as `python setup.py` does.
if __name__ == "__main__":
    require_linked_folders()
    setup()
