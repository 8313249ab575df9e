"""Gemma-3-270M through the real engine and server: sliding-window layers on CPU_ATTN's kernel, the
global layers through Top-θ, in one batch.

Gemma-3 has 18 layers, 5 sliding-window (512 tokens) to 1 global, 4 query / 1 KV head of size 256.
Three processes, each started once: dense CPU_ATTN and TOPT with `disable_sparsity` (token-identical
greedy output, prompts past the window), and the OpenAI server with the shipped thresholds (counters of
both kinds of layer on a 4k-token prompt).
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import GEMMA_MODEL as GEMMA
from tests.engine_run import run_engine
from tests.serving import complete, serving
from vllm_topt.calibration.data import bbc_articles

WINDOW = 512
GLOBAL_LAYERS = [5, 11, 17]
NUM_LAYERS, NUM_HEADS, NUM_KV_HEADS = 18, 4, 1
MAX_TOKENS = 24


def news_ids(tokens: int) -> list[int]:
    """`tokens` token ids of held-out BBC news, starting with Gemma's <bos>."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(GEMMA)
    ids = tokenizer.encode("\n\n".join(bbc_articles("heldout")[:40]))
    assert ids[0] == tokenizer.bos_token_id and len(ids) >= tokens
    return ids[:tokens]


def news_prompt(words: int) -> str:
    return " ".join(" ".join(bbc_articles("heldout")[:12]).split()[:words]) + "\n\nIn short,"


# Below the window, and two past it (about 700 and 1300 tokens).
PROMPTS = ["The capital of France is", news_prompt(500), news_prompt(950)]


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory, gemma_model):
    return tmp_path_factory.mktemp("gemma")


def engine(tmp_dir, backend: str, label: str, topt: dict | None = None) -> dict:
    # Whole prompts per step: this module tests the layer routing, test_engine.py the mixed batches.
    spec = {"backend": backend, "model": str(GEMMA), "prompts": PROMPTS, "max_tokens": MAX_TOKENS,
            "max_num_batched_tokens": 2048}
    if topt is not None:
        spec["topt"] = topt
    return run_engine(spec, tmp_dir, label)


def test_disable_sparsity_gives_cpu_attn_tokens(tmp_dir):
    dense = engine(tmp_dir, "CPU_ATTN", "gemma-dense")
    stats_path = tmp_dir / "no_sparsity.json"
    topt = engine(tmp_dir, "TOPT", "gemma-no-sparsity",
                  {"disable_sparsity": True, "stats_file": str(stats_path), "telemetry_interval_s": 0})
    assert max(dense["prompt_lens"]) > 2 * WINDOW
    assert topt["token_ids"] == dense["token_ids"]
    assert "15 sliding-window layers run on CPU_ATTN's dense kernel" in topt["log"]
    per_layer = json.loads(stats_path.read_text())["per_layer"]
    assert sorted(map(int, per_layer)) == list(range(NUM_LAYERS))  # every layer went through TOPT's forward
    for counts in per_layer.values():
        assert counts["elements_kept"] == counts["elements_visible"] > 0


@pytest.fixture(scope="module")
def served(tmp_dir):
    """The server with the shipped thresholds; one greedy completion of a 4k-token prompt."""
    stats_path, log_path = tmp_dir / "served.json", tmp_dir / "server.log"
    prompt = news_ids(4000)
    with serving(log_path, {"stats_file": str(stats_path), "telemetry_interval_s": 0}, model=GEMMA,
                 extra_args=["--max-model-len", "4200"]) as base:
        text = complete(base, prompt, max_tokens=MAX_TOKENS, ignore_eos=True)
    return {"text": text, "prompt_len": len(prompt), "stats": json.loads(stats_path.read_text()),
            "log": log_path.read_text()}


def test_server_answers_with_topt_on_gemma(served):
    assert served["text"].strip()
    lines = [line for line in served["log"].splitlines() if "topt: decode kept" in line]
    assert lines and "3 of 18 layers thresholded" in lines[-1], lines[-1:]
    kept = float(lines[-1].split("decode kept ")[1].split("%")[0])
    assert kept < 50.0, lines[-1]


def test_global_layers_are_sparse_and_sliding_layers_dense(served):
    per_layer = {int(layer): counts for layer, counts in served["stats"]["per_layer"].items()}
    assert sorted(per_layer) == list(range(NUM_LAYERS))
    for layer, counts in per_layer.items():
        rows = counts["rows"]
        assert rows >= MAX_TOKENS - 1  # every decode step of the one request
        if layer in GLOBAL_LAYERS:
            assert counts["elements_kept"] < 0.1 * counts["elements_visible"], (layer, counts)
            assert counts["elements_visible"] >= rows * NUM_HEADS * served["prompt_len"]
        else:  # a sliding-window layer: its window, every element kept
            assert counts["elements_kept"] == counts["elements_visible"] == rows * NUM_HEADS * WINDOW, (layer, counts)
            assert counts["v_rows_read"] == rows * NUM_KV_HEADS * WINDOW
