"""Run the real vLLM engine once and print its greedy outputs as JSON (used by tests).

    python -m tests.engine_run '{"backend": "TOPT", "topt": {...}, "prompts": [...], "max_tokens": 24}'

A separate process per engine keeps one engine in memory at a time and makes
each test module's engine start exactly once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
RESULT_MARKER = "ENGINE_RESULT_JSON:"
ENGINE_TIMEOUT_S = 600
# A single-rank engine runs in the test's engine process: the engine core in-process and its worker in the
# core's process, instead of three processes that each import vLLM (about 20 s apiece on 2 cores).
ONE_PROCESS_ENGINE = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def single_rank(spec: dict) -> bool:
    """Whether the engine has one rank, and so runs as one process (ONE_PROCESS_ENGINE)."""
    return spec.get("tensor_parallel_size", 1) == 1


def run_engine(spec: dict, log_dir: Path, label: str, **env) -> dict:
    """Run `main(spec)` in a fresh process; return its result plus the full log."""
    if single_rank(spec):
        env = {**ONE_PROCESS_ENGINE, **env}
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", PYTHONUNBUFFERED="1", **env)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.engine_run", json.dumps(spec)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S,
    )
    log = proc.stdout + proc.stderr
    (log_dir / f"engine-{label}.log").write_text(log)
    assert proc.returncode == 0, log[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith(RESULT_MARKER))
    result = json.loads(line[len(RESULT_MARKER) :])
    result["log"] = log
    return result


def main(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    kwargs = dict(
        model=str(spec.get("model", DEFAULT_MODEL)),
        dtype="float32",
        max_model_len=spec.get("max_model_len", 4096),
        max_num_seqs=spec.get("max_num_seqs", 8),
        # Small prefill chunks: long prompts prefill over several steps while
        # short ones already decode, so batches mix prefill and decode.
        max_num_batched_tokens=spec.get("max_num_batched_tokens", 256),
        enable_chunked_prefill=True,
        enforce_eager=True,
        gpu_memory_utilization=spec.get("gpu_memory_utilization", 0.3),
        seed=0,
        attention_backend=spec["backend"],
    )
    if "topt" in spec:
        kwargs["additional_config"] = {"topt": spec["topt"]}
    if "tensor_parallel_size" in spec:
        kwargs["tensor_parallel_size"] = spec["tensor_parallel_size"]
    if single_rank(spec):
        kwargs["distributed_executor_backend"] = "uni"  # the worker in this process (ONE_PROCESS_ENGINE)
    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 24), ignore_eos=spec.get("ignore_eos", False),
                            logprobs=spec.get("logprobs"))
    outputs = llm.generate(spec["prompts"], params, use_tqdm=False)
    result = {
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "texts": [o.outputs[0].text for o in outputs],
        "prompt_lens": [len(o.prompt_token_ids) for o in outputs],
    }
    if spec.get("logprobs"):
        # Per generated position: {token id: log-probability} of the top tokens.
        result["logprobs"] = [[{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]
                              for o in outputs]
    if "request_modes" in spec:
        result["mixed_token_ids"] = mixed_batch(llm, spec, params)
    if "point_batch" in spec:
        result["point_token_ids"] = one_mode_batch(llm, spec, params, spec["point_batch"])
    return result


def keep_stats(spec: dict, suffix: str) -> None:
    """Copy the stats file as it is now to `<stats_file>.<suffix>` (before the next batch adds to it)."""
    import shutil

    stats_file = spec.get("topt", {}).get("stats_file")
    if stats_file:
        shutil.copy(stats_file, f"{stats_file}.{suffix}")


def generate_in_modes(llm, spec: dict, params, modes: dict[int, str]) -> list[list[int]]:
    """The spec's prompts in one batch, prompt i asking TOPT for mode `modes[i]` (`"vllm_xargs"` through the
    server), the others saying nothing."""
    per_request = [params.clone() for _ in spec["prompts"]]
    for i, mode in modes.items():
        per_request[i].extra_args = {"topt": mode}
    outputs = llm.generate(spec["prompts"], per_request, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def mixed_batch(llm, spec: dict, params) -> list[list[int]]:
    """The same prompts again in one batch, each asking for its mode in `request_modes` ({index: mode}).

    The stats file as it was before this batch is kept as `<stats_file>.before_mixed`."""
    keep_stats(spec, "before_mixed")
    return generate_in_modes(llm, spec, params, {int(i): mode for i, mode in spec["request_modes"].items()})


def one_mode_batch(llm, spec: dict, params, mode: str) -> list[list[int]]:
    """Every prompt again in one batch, all asking for `mode`; the stats before it kept as `.before_point`."""
    keep_stats(spec, "before_point")
    return generate_in_modes(llm, spec, params, dict.fromkeys(range(len(spec["prompts"])), mode))


if __name__ == "__main__":
    result = main(json.loads(sys.argv[1]))
    print(RESULT_MARKER + json.dumps(result), flush=True)
