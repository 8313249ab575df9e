"""Capture real decode-time Q/K/V from a Hugging Face model on held-out text.

    python benchmarks/capture_qkv.py --model models/Qwen2.5-Coder-0.5B-Instruct \
        --contexts 1024 4096 16384 --queries 8 --out .cache/captures/qwen0.5b-16k.pt

One dense forward pass (SDPA) over `max(contexts)` tokens of held-out BBC
articles (never used for calibration) records, for every layer, K and V after
RoPE (what vLLM caches) and the queries at the last `--queries` positions
before each context length. Query i of context c is the decode query of a
sequence holding the first c - i tokens, so one capture gives a ragged batch of
`--queries` real sequences per context. Kept under .cache/ (hundreds of MB).

File format (torch.save dict):
  model, tokens, scale, contexts
  k, v: [L, T, H_kv, d] float32 (post-RoPE keys, values)
  q: {context: [L, queries, H, d] float32}, query i at position context - 1 - i
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CAPTURE_IMPL = "topt_capture"


def heldout_ids(tokenizer, tokens: int) -> list[int]:
    from vllm_topt.calibration.data import bbc_articles

    # A leading BOS as calibration's sequences have (Gemma degenerates without its <bos>).
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = bos + tokenizer.encode("\n\n".join(bbc_articles("heldout")), add_special_tokens=False)
    if len(ids) < tokens:
        raise SystemExit(f"held-out text has {len(ids)} tokens, fewer than the {tokens} asked for")
    return ids[:tokens]


def make_capture_attention(store: dict, positions: torch.Tensor):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, **kwargs):
        layer = module.layer_idx
        store["k"][layer] = key[0].transpose(0, 1).float().clone()  # [T, H_kv, d]
        store["v"][layer] = value[0].transpose(0, 1).float().clone()
        store["q"][layer] = query[0, :, positions].transpose(0, 1).float().clone()  # [P, H, d]
        store["scale"] = kwargs.get("scaling") or query.shape[-1] ** -0.5
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    return attention


def capture(model_path: str, contexts: list[int], queries: int, threads: int | None) -> dict:
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if threads:
        torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    total = max(contexts)
    ids = heldout_ids(tokenizer, total)
    # Positions whose queries decode: context c, sequence i holds c - i tokens.
    positions = torch.tensor([c - 1 - i for c in contexts for i in range(queries)])
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa")
    num_layers = model.config.num_hidden_layers
    store = {"k": [None] * num_layers, "v": [None] * num_layers, "q": [None] * num_layers}
    AttentionInterface.register(CAPTURE_IMPL, make_capture_attention(store, positions))
    # An attention function transformers does not know gets no mask, so SDPA would run plain causal
    # attention and lose Gemma-3's sliding windows; give it SDPA's masks.
    AttentionMaskInterface.register(CAPTURE_IMPL, sdpa_mask)
    model.set_attn_implementation(CAPTURE_IMPL)
    start = time.perf_counter()
    with torch.inference_mode():
        model(torch.tensor([ids]), logits_to_keep=1)
    print(f"forward over {total} tokens: {time.perf_counter() - start:.0f} s")
    q_all = torch.stack(store["q"])  # [L, P, H, d]
    q_by_context = {c: q_all[:, j * queries : (j + 1) * queries].contiguous() for j, c in enumerate(contexts)}
    return {
        "model": Path(model_path).name,
        "tokens": total,
        "scale": store["scale"],
        "contexts": contexts,
        "k": torch.stack(store["k"]),
        "v": torch.stack(store["v"]),
        "q": q_by_context,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--queries", type=int, default=8, help="decode queries (batch rows) per context")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    result = capture(args.model, sorted(args.contexts), args.queries, args.threads)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, args.out)
    k = result["k"]
    print(f"wrote {args.out}: {k.shape[0]} layers, {k.shape[1]} tokens, {k.shape[2]} KV heads, head size {k.shape[3]}")


if __name__ == "__main__":
    main()
