"""Record in each shipped threshold file what it was calibrated on, for files made before these fields existed.

    python scripts/record_identity.py            # rewrites configs/*.json in place

Adds `model.source`, `model.vocab_hash` (from the GGUF's tokenizer, saved and
reloaded as scripts/build_model.py does, so it equals what the server computes
from the built folder), `model.weights` (the GGUF and its quantisation),
`compensation.block_size` (block-wise VMC was calibrated at the CPU page,
128 tokens) and, where a measurement is on file, `provenance.heldout.perplexity`
(from benchmarks/accuracy.py results). Values already present are kept.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from build_model import MODEL_SPECS, assemble_gguf, weights_source

from vllm_topt.calibration.loss import perplexity_entry
from vllm_topt.config.identity import vocabulary_hash
from vllm_topt.config.thresholds import ThresholdFile
from vllm_topt.kernels.cpu.cpp import CPU_DEFAULT_BLOCK_SIZE

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# Each shipped file's held-out perplexity run (BBC held-out split, benchmarks/accuracy.py --task perplexity).
PERPLEXITY_RESULTS = {
    "smollm2-135m-instruct.k32.post-softmax.json": "accuracy_perplexity_smollm2_speed_bbc.json",
    "smollm2-135m-instruct.k48.post-softmax.quality.json": "quality_point_smollm2.json",
    "qwen2.5-coder-0.5b-instruct.k32.post-softmax.json": "accuracy_perplexity_qwen0.5b_speed_bbc.json",
    "qwen2.5-coder-1.5b-instruct.k48.post-softmax.quality.json": "accuracy_perplexity_qwen1.5b_quality_bbc.json",
    "gemma3-270m.k32.post-softmax.json": "accuracy_perplexity_gemma3_bbc.json",
}


def gguf_vocabulary(gguf: Path) -> str:
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        return vocabulary_hash(AutoTokenizer.from_pretrained(tmp))


def heldout_perplexity(config_name: str) -> dict | None:
    result_name = PERPLEXITY_RESULTS.get(config_name)
    if result_name is None:
        return None
    result = json.loads((RESULTS / result_name).read_text())
    target = f"configs/{config_name}"
    for row in result["rows"]:
        if row.get("thresholds") == target and row.get("backend") == "topt":  # benchmarks/accuracy.py rows
            return perplexity_entry(row["text"], row["n"], row["window"], row["score"] / (1 + row["rel_change"]),
                                    row["score"], f"benchmarks/results/{result_name}", row["element_density"],
                                    row["v_row_density"])
        if row.get("file") == target and row.get("mode") == "topt" and row.get("text") == "bbc":  # quality_point
            return perplexity_entry(result["texts"]["bbc"], result["windows_per_text"], result["window"],
                                    row["dense"], row["ppl"], f"benchmarks/results/{result_name}", row["elem"], row["vrow"])
    sys.exit(f"{result_name} has no Top-θ row for {target}")


def migrate(path: Path) -> None:
    key = path.name.split(".k")[0]
    spec = MODEL_SPECS[key]
    gguf = assemble_gguf(spec)
    raw = json.loads(path.read_text())
    model = raw["model"]
    model.setdefault("source", spec.folder)
    model.setdefault("vocab_hash", gguf_vocabulary(gguf))
    model.setdefault("weights", weights_source(gguf))
    if raw["compensation"].get("vmc_scope") == "block":
        raw["compensation"].setdefault("block_size", CPU_DEFAULT_BLOCK_SIZE)
    perplexity = heldout_perplexity(path.name)
    if perplexity and "heldout" in raw["provenance"]:
        raw["provenance"]["heldout"].setdefault("perplexity", perplexity)
    # Written as vllm-topt-calibrate writes a file (and validated on the way).
    path.write_text(ThresholdFile.model_validate(raw).model_dump_json(indent=1, exclude_unset=True) + "\n")
    print(f"{path.name}: {model['vocab_hash']}, {model['weights']}")


if __name__ == "__main__":
    for config in sorted((ROOT / "configs").glob("*.json")):
        migrate(config)
