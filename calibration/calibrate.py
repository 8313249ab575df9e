"""Calibrate Top-θ thresholds for a Hugging Face model on real text.

    vllm-topt-calibrate --model models/SmolLM2-135M-Instruct \\
        --k 32 --out configs/smollm2-135m-instruct.k32.post-softmax.json
    vllm-topt-calibrate --model MODEL --data chats.jsonl --device cuda --out mymodel.k32.json

(`python -m calibration.calibrate` in a checkout is the same command.)

For every calibration sequence and every (layer, query head) row with n > k,
record the (k+1)-th largest element in the placement's domain (probabilities
for post-softmax, scores for pre-softmax); with top-k during calibration (on
by default) each layer's attention is cut to its exact top-k, so later layers
see sparsified inputs. Per (layer, head, n) aggregate mean + 0.1·std, smooth
across n onto a geometric grid (per layer, from that layer's k), and write the
threshold file. Finally apply the thresholds to held-out text and report
kept/k and the densities.

With --budget-k, a dense profile pass first allocates each layer's k under
that mean (calibration/budget.py); the thresholds are then calibrated per
layer as with --layer-k. With --target-loss, a search finds the sparsest file
whose held-out perplexity loss meets the target (calibration/target.py): over
the keep mass P of --keep-mass, over mean-k budgets fed by the same profile,
or (the default, --search best) both, keeping the sparser file that met it;
every trial is a complete calibration.

Every file records its held-out perplexity loss against dense attention
(calibration/loss.py), on the held-out split of the data or on --eval-data;
`vllm-topt-calibrate --show FILE` prints what a file records.

Sliding-window layers (Gemma-2/3's local layers, read from the model config)
run with their window and are recorded as dense, with the reason, since the
dense kernel serves them.

Every argument is checked against the model's config before any text is
read, and the data before the weights load. The statistics are checkpointed
to OUT.checkpoint.pt after every sequence: an interrupted run (Ctrl-C, a lost
machine) continues with the same command plus --resume, and ends with the
same thresholds as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from vllm_topt import __version__
from vllm_topt.calibration.attention import (ATTN_IMPL_NAME, CalibrationSession, ResidualNorms, register_attention,
                                             set_session)
from vllm_topt.calibration.checkpoint import Checkpoint, CheckpointError, checkpoint_path
from vllm_topt.calibration.budget import (DEFAULT_CANDIDATES, DEFAULT_OBJECTIVE, OBJECTIVES, Allocation, allocate,
                                          relative_errors)
from vllm_topt.calibration.data import Corpus, DataError, load_corpus, token_sequences
from vllm_topt.calibration.domains import check_not_evaluation_text
from vllm_topt.calibration.loss import perplexity, perplexity_entry, window_nll
from vllm_topt.calibration.target import (BOTH, DEFAULT_TARGET_LOSS_PCT, KEEP_MASS, MEAN_K, SEARCH_MEAN_K, SEARCHES,
                                          SELECTION_RULE, SearchResult, Trial, best_of, knob_of, search,
                                          search_ladder)
from vllm_topt.kernels.cpu.cpp import CPU_DEFAULT_BLOCK_SIZE
from vllm_topt.method.rules import DensityCounts, Placement, Sdc, ToptRule, VmcScope, layer_rules
from vllm_topt.config.support import (
    UnsupportedModelError,
    check_model_supported,
    sliding_window_layers,
    sliding_window_size,
    text_config,
)
from vllm_topt.config.identity import vocabulary_hash, weights_description
from vllm_topt.config.thresholds import (
    SCHEMA_VERSION,
    Compensation,
    ModelIdentity,
    Provenance,
    ThresholdFile,
    describe,
    load_threshold_file,
)

PROG = "vllm-topt-calibrate"
DEFAULT_K = 32
KEEP_MASS_DENSE_ROWS = 16  # a keep-mass file's default k: rows this short stay dense
DEFAULT_BUDGET_SEQS = 8
STD_WEIGHT = 0.1  # the paper's mean + 0.1·std
SMOOTH_HALF_WIDTH = 0.15  # smoothing window in ln(n) on each side of a grid point
KEEP_MASS_RULE = ("θ(layer, head, n) from the largest element outside each row's top-P set (the fewest largest "
                  "elements whose dense attention mass reaches P), mean + 0.1·std as for top-k")
KEEP_MASS_FLOOR_RULE = "rows with n > k keep the union of their top-P set and their k largest elements"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_DTYPE = {"cuda": "bfloat16", "cpu": "float32"}


class CalibrationError(SystemExit):
    """A bad argument or input, found before the long work starts; the message names the flag and the fix."""

    def __init__(self, message: str):
        super().__init__(f"{PROG}: error: {message}")


def parse_layer_k(text: str) -> dict[int, int]:
    try:
        pairs = [item.split(":") for item in text.split(",") if item.strip()]
        return {int(layer): int(k) for layer, k in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LAYER:K[,LAYER:K...], e.g. '0:512,1:512'") from None


def parse_percent(text: str) -> float:
    try:
        return float(text.strip().removesuffix("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage, e.g. '0.5' or '0.5%'") from None


def parse_layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LAYER[,LAYER...], e.g. '0,1'") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Hugging Face model folder (as served by vLLM)")
    p.add_argument("--out", help="threshold file to write (JSON)")
    p.add_argument("--show", metavar="FILE", help="print what a threshold file records (its rule, held-out loss, "
                                                    "densities and, for --target-loss files, the search) and exit")
    p.add_argument("--data", action="append", default=None, metavar="PATH",
                   help="calibration text (repeatable): a .jsonl file ('text' or chat 'messages' per line), a "
                        "plain-text file, or a folder of .txt/.md/.jsonl files; default: BBC News 2004-05 (the "
                        "out-of-domain evaluation text of calibration/domains.py is refused)")
    p.add_argument("--k", type=int, default=None, help=f"target kept elements per row (default {DEFAULT_K})")
    p.add_argument("--placement", choices=[p.value for p in Placement], default=Placement.POST_SOFTMAX.value)
    p.add_argument("--sdc", choices=[s.value for s in Sdc], default=None,
                   help="softmax denominator compensation (pre-softmax only; default exact there)")
    p.add_argument("--no-vmc", action="store_true", help="disable V-mean compensation")
    p.add_argument("--vmc-scope", choices=[v.value for v in VmcScope], default=VmcScope.SEQUENCE.value,
                   help="VMC over the whole sequence (the paper's) or per V block (SPEC §4; default sequence)")
    p.add_argument("--block-size", type=int, default=CPU_DEFAULT_BLOCK_SIZE,
                   help="the serving KV page size: block-wise VMC's blocks and the held-out V-block density "
                        f"(default {CPU_DEFAULT_BLOCK_SIZE}, TOPT's CPU page; vLLM on CUDA uses 16)")
    p.add_argument("--budget-k", type=int, default=None, metavar="MEAN_K",
                   help="allocate k per layer from calibration data, at this mean k over the thresholded layers "
                        "(instead of one --k; see calibration/budget.py)")
    p.add_argument("--budget-candidates", type=parse_layers, default=None, metavar="K,...",
                   help=f"the k a layer may get (default {','.join(map(str, DEFAULT_CANDIDATES))})")
    p.add_argument("--budget-seqs", type=int, default=None,
                   help=f"calibration sequences the allocation profiles (default {DEFAULT_BUDGET_SEQS})")
    p.add_argument("--target-loss", type=parse_percent, nargs="?", const=DEFAULT_TARGET_LOSS_PCT, default=None,
                   metavar="PCT", help="search for the sparsest file whose held-out perplexity is at most PCT%% "
                   f"above dense (given without a value: {DEFAULT_TARGET_LOSS_PCT}%%, a margin for text from other "
                   "domains; see calibration/target.py)")
    p.add_argument("--search", choices=list(SEARCHES), default=BOTH,
                   help="what --target-loss varies: the keep mass P of --keep-mass (--k stays the dense-row "
                        "limit), the mean-k budget of --budget-k, or both, keeping the sparser file that meets "
                        "the target (best, the default)")
    p.add_argument("--eval-data", action="append", default=None, metavar="PATH",
                   help="text to measure the held-out loss on (repeatable; every document of it), instead of the "
                        "held-out split of the calibration data")
    p.add_argument("--budget-objective", choices=list(OBJECTIVES), default=DEFAULT_OBJECTIVE,
                   help="what the allocation minimises: each layer's attention-output error relative to that output "
                        "(attention), or its change to the residual stream relative to the stream (residual)")
    p.add_argument("--keep-mass", type=float, default=None, metavar="P",
                   help="calibrate each head's θ to the row's top-P set (the fewest largest elements holding "
                        "attention mass P, e.g. 0.9) instead of its top-k: heads with flat rows keep more; "
                        f"rows with n <= --k stay dense (default {KEEP_MASS_DENSE_ROWS})")
    p.add_argument("--keep-mass-floor", action="store_true",
                   help="with keep mass (--keep-mass or a --target-loss search over it): every row with n > --k "
                        "also keeps its k largest elements (the top-P set joined with the top k)")
    p.add_argument("--layer-k", type=parse_layer_k, default={}, metavar="LAYER:K,...",
                   help="per-layer k, e.g. '0:512,1:512' (the paper's first layers); each layer gets its own n grid")
    p.add_argument("--dense-layers", type=parse_layers, default=[], metavar="LAYER,...",
                   help="layers that stay dense, e.g. '0,1' (sliding-window layers always do: the dense kernel "
                        "serves them)")
    p.add_argument("--num-seqs", type=int, default=48, help="calibration sequences (default 48)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per calibration sequence")
    p.add_argument("--heldout-seqs", type=int, default=8, help="held-out sequences for the kept/k check")
    p.add_argument("--grid-points", type=int, default=24, help="n-grid points between k+1 and --seq-len")
    p.add_argument("--no-topk-during-calibration", action="store_true",
                   help="calibrate on dense attention (the paper always cuts to top-k)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the model runs (auto: cuda if torch sees a GPU, else cpu)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="model weights dtype (auto: bfloat16 on cuda, float32 on cpu); attention runs in float32")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run recorded in OUT.checkpoint.pt")
    p.add_argument("--name", default=None, help="model name recorded in the file (default: folder name)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.show is None:
        missing = [flag for flag in ("--model", "--out") if getattr(args, flag[2:]) is None]
        if missing:
            raise CalibrationError(f"{' and '.join(missing)} required (or --show FILE to read a file)")
    if args.sdc is None:
        args.sdc = "exact" if args.placement == "pre-softmax" else "none"
    if args.budget_k is not None and args.k is not None:
        raise CalibrationError(f"--k {args.k} and --budget-k {args.budget_k}: give one (--budget-k sets the mean k "
                               "and allocates each layer's)")
    if args.target_loss is not None:
        check_search_flags(args)
    if args.keep_mass is not None:
        if not 0 < args.keep_mass < 1:
            raise CalibrationError(f"--keep-mass {args.keep_mass}: give an attention mass between 0 and 1, e.g. 0.9")
        given = [flag for flag, value in (("--budget-k", args.budget_k), ("--target-loss", args.target_loss),
                                          ("--layer-k", args.layer_k)) if value]
        if given:
            raise CalibrationError(f"--keep-mass sets every head's budget from its own rows; drop {given[0]} "
                                   "(or drop --keep-mass)")
    if args.keep_mass_floor and not keeps_mass(args):
        raise CalibrationError("--keep-mass-floor adds a floor to a keep-mass file; add --keep-mass P (or "
                               "--target-loss with --search keep-mass or best), or drop --keep-mass-floor")
    if args.k is None:
        args.k = (KEEP_MASS_DENSE_ROWS if keeps_mass(args) else
                  DEFAULT_K if args.budget_k is None else args.budget_k)  # the file's target_k
    if args.budget_candidates is None:
        args.budget_candidates = list(DEFAULT_CANDIDATES)
    if args.budget_seqs is None:
        args.budget_seqs = DEFAULT_BUDGET_SEQS
    return args


def check_search_flags(args) -> None:
    """--target-loss's flags: what each search varies may not also be fixed by hand."""
    fixed = [("--keep-mass", args.keep_mass), ("--budget-k", args.budget_k), ("--layer-k", args.layer_k)]
    if args.search == "keep-mass":
        fixed += [("--budget-candidates", args.budget_candidates), ("--budget-seqs", args.budget_seqs),
                  ("--budget-objective", None if args.budget_objective == DEFAULT_OBJECTIVE else args.budget_objective)]
        why, other = "searches the keep mass P (--search keep-mass)", " or use --search mean-k or best"
    else:
        fixed.insert(0, ("--k", args.k))  # the mean-k search sets every k
        why = "searches the mean-k budget" if args.search == "mean-k" else \
            "runs both searches, keep mass and mean k (--search best, the default)"
        other = "" if args.search == "mean-k" else " or search one with --search keep-mass or mean-k"
    given = [flag for flag, value in fixed if value]
    if given:
        if given[0] in ("--keep-mass", "--budget-k", "--layer-k"):
            other = ""
        raise CalibrationError(f"--target-loss {why}; drop {given[0]} (or drop --target-loss{other})")


def searched_knobs(args) -> tuple:
    """The knobs --target-loss searches (none without it)."""
    return () if args.target_loss is None else SEARCHES[args.search]


def allocates(args) -> bool:
    """Whether a dense profile pass allocates per-layer k (--budget-k, or --target-loss over mean k)."""
    return args.budget_k is not None or MEAN_K in searched_knobs(args)


def keeps_mass(args) -> bool:
    """Whether the file (or a searched one) keeps each row's top-P set: --keep-mass, or --target-loss over P."""
    return args.keep_mass is not None or KEEP_MASS in searched_knobs(args)


# ------------------------------------------------------------------ checks


def check_model_args(args, config) -> tuple[list[ToptRule], dict[int, str]]:
    """Every argument against the model's config, before any text is read; the per-layer rules and
    why each dense layer is dense."""
    name = args.name or Path(args.model).name
    try:
        check_model_supported(config, name)
    except UnsupportedModelError as exc:
        raise CalibrationError(str(exc)) from None
    cfg = text_config(config)
    L = cfg.num_hidden_layers
    positive = {"--k": args.k, "--num-seqs": args.num_seqs, "--heldout-seqs": args.heldout_seqs}
    for flag, value in positive.items():
        if value < 1:
            raise CalibrationError(f"{flag} {value}: must be at least 1")
    if args.grid_points < 2:
        raise CalibrationError(f"--grid-points {args.grid_points}: must be at least 2")
    max_positions = getattr(cfg, "max_position_embeddings", None)
    if max_positions and args.seq_len > max_positions:
        raise CalibrationError(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings "
                               f"{max_positions}; lower --seq-len")
    for flag, layers in (("--layer-k", list(args.layer_k)), ("--dense-layers", args.dense_layers)):
        bad = [layer for layer in layers if not 0 <= layer < L]
        if bad:
            raise CalibrationError(f"{flag}: layer {bad[0]} does not exist; the model has layers 0..{L - 1}")
    check_budget_args(args)
    both = sorted(set(args.layer_k) & set(args.dense_layers))
    if both:
        raise CalibrationError(f"layer {both[0]} is in both --layer-k and --dense-layers; give it one of them")
    reasons = dense_layer_reasons(args, cfg)
    windowed = sorted(set(args.layer_k) & set(sliding_window_layers(cfg)))
    if windowed:
        raise CalibrationError(f"--layer-k {windowed[0]}:{args.layer_k[windowed[0]]}: layer {windowed[0]} has a "
                               "sliding window, which TOPT serves on the dense kernel; drop it from --layer-k")
    if len(reasons) == L:
        raise CalibrationError(f"every layer would be dense ({describe_dense(reasons)}); nothing would be "
                               "thresholded: drop layers from --dense-layers")
    for layer, k in args.layer_k.items():
        if k < 1:
            raise CalibrationError(f"--layer-k {layer}:{k}: k must be at least 1")
    rules = args_layer_rules(args, L, reasons)
    for layer, rule in enumerate(rules):
        if rule.dense or rule.k + 1 < args.seq_len:
            continue
        flag = f"--layer-k {layer}:{rule.k}" if layer in args.layer_k else f"--k {rule.k}"
        raise CalibrationError(f"{flag}: --seq-len {args.seq_len} leaves layer {layer} too few rows longer than its "
                               f"k (calibration samples rows with n > k); raise --seq-len to {rule.k + 2} or more, "
                               "or lower k")
    return rules, reasons


def check_budget_args(args) -> None:
    if args.block_size < 1:
        raise CalibrationError(f"--block-size {args.block_size}: must be at least 1")
    if args.target_loss is not None:
        check_target_args(args)
    if not allocates(args):
        if args.budget_objective != DEFAULT_OBJECTIVE:
            raise CalibrationError(f"--budget-objective {args.budget_objective} chooses how --budget-k allocates; "
                                   "add --budget-k MEAN_K (or drop --budget-objective)")
        return
    if args.layer_k:
        raise CalibrationError("--budget-k allocates every layer's k; drop --layer-k (or drop --budget-k)")
    candidates = sorted(set(args.budget_candidates))
    if not candidates or candidates[0] < 1:
        raise CalibrationError(f"--budget-candidates {args.budget_candidates}: give k values of at least 1")
    if args.budget_k is not None and not candidates[0] <= args.budget_k <= candidates[-1]:
        raise CalibrationError(f"--budget-k {args.budget_k} is outside --budget-candidates {candidates[0]} .. "
                               f"{candidates[-1]}; pick a mean k in that range")
    if candidates[-1] + 1 >= args.seq_len:
        raise CalibrationError(f"--budget-candidates {candidates[-1]}: --seq-len {args.seq_len} leaves too few rows "
                               f"longer than it; raise --seq-len to {candidates[-1] + 2} or more, or drop it")
    if not 1 <= args.budget_seqs <= args.num_seqs:
        raise CalibrationError(f"--budget-seqs {args.budget_seqs}: must be between 1 and --num-seqs {args.num_seqs}")
    args.budget_candidates = candidates


def check_target_args(args) -> None:
    if args.target_loss <= 0:
        raise CalibrationError(f"--target-loss {args.target_loss}: give a loss above 0%, e.g. 0.5 (dense attention "
                               "is the only file with no loss)")
    if MEAN_K not in searched_knobs(args):
        return
    candidates = sorted(set(args.budget_candidates))
    if candidates and not search_ladder(candidates):
        raise CalibrationError(f"--budget-candidates {args.budget_candidates}: no mean k the search tries "
                               f"({', '.join(map(str, SEARCH_MEAN_K))}) lies between {candidates[0]} and "
                               f"{candidates[-1]}; widen the candidates")


DENSE_BY_FLAG = "--dense-layers"


def dense_layer_reasons(args, cfg) -> dict[int, str]:
    """The layers that stay dense and why: a sliding window (served by the dense kernel) or --dense-layers."""
    window = sliding_window_size(cfg)
    reasons = {layer: f"sliding-window attention (window {window}): served by the dense kernel"
               for layer in sliding_window_layers(cfg)}
    reasons |= {layer: DENSE_BY_FLAG for layer in args.dense_layers if layer not in reasons}
    return dict(sorted(reasons.items()))


def describe_dense(reasons: dict[int, str]) -> str:
    """'layers 0, 1 (--dense-layers); 15 sliding-window layers' for messages and the summary."""
    by_flag = [layer for layer, why in reasons.items() if why == DENSE_BY_FLAG]
    windowed = len(reasons) - len(by_flag)
    parts = [f"layers {', '.join(map(str, by_flag))} ({DENSE_BY_FLAG})"] if by_flag else []
    parts += [f"{windowed} sliding-window layers"] if windowed else []
    return "; ".join(parts) or "none"


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise CalibrationError(f"--device cuda: torch {torch.__version__} ({build}) sees no CUDA device; "
                               "run on a machine with a GPU and a CUDA build of torch, or pass --device cpu")
    return requested


def check_output(out: str) -> Path:
    """Fail now, not after the run, if the threshold file cannot be written."""
    path = Path(out).expanduser()
    if path.is_dir():
        raise CalibrationError(f"--out {out} is a folder; name the JSON file to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CalibrationError(f"--out {out}: cannot create its folder ({exc})") from None
    if not os.access(path.parent, os.W_OK):
        raise CalibrationError(f"--out {out}: the folder {path.parent} is not writable")
    return path


def args_layer_rules(args, num_layers: int, dense_reasons: dict[int, str], k: int | None = None,
                     layer_k: dict[int, int] | None = None) -> list[ToptRule]:
    """The rules the file will hold, before it exists (the same function builds them from a file); `k` and
    `layer_k` (a budget's allocation) stand in for the arguments'."""
    return layer_rules(num_layers, args.placement, args.sdc, not args.no_vmc, args.k if k is None else k,
                       args.layer_k if layer_k is None else layer_k, dense_reasons, vmc_scope=args.vmc_scope)


# ------------------------------------------------------------------ plan


@dataclass
class Plan:
    """A checked run: rules, device, data cut into sequences, and its checkpoint."""

    args: argparse.Namespace
    rules: list[ToptRule]
    dense_reasons: dict[int, str]  # dense layer -> why (its sliding window, or --dense-layers)
    device: str
    dtype: str
    out: Path
    corpus: Corpus
    calibration: list[list[int]]
    heldout: list[list[int]]
    heldout_data: str  # what the held-out sequences are (the split, or --eval-data)
    checkpoint: Checkpoint
    identity: ModelIdentity  # what the file will record as the model it was made for
    sequences_run: int = 0  # by this process, every phase (for the summary's time per sequence)

    @property
    def num_layers(self) -> int:
        return len(self.rules)


def prepare(args, config, tokenizer) -> Plan:
    """All checks and the data, before the weights load; raises CalibrationError."""
    rules, dense_reasons = check_model_args(args, config)
    device = resolve_device(args.device)
    dtype = DEFAULT_DTYPE[device] if args.dtype == "auto" else args.dtype
    out = check_output(args.out)
    try:
        corpus = load_corpus(args.data, tokenizer)
        check_not_evaluation_text(corpus.files)  # the OOD sets must stay unseen
        eval_corpus = eval_data_corpus(args.eval_data, corpus, tokenizer)
    except DataError as exc:
        raise CalibrationError(str(exc)) from None
    calibration = sequences_or_fail(tokenizer, corpus, "calibration", args.seq_len, args.num_seqs, "--num-seqs")
    if eval_corpus is None:
        heldout_data = corpus.heldout_description
        heldout = sequences_or_fail(tokenizer, corpus, "held-out", args.seq_len, args.heldout_seqs, "--heldout-seqs")
    else:
        heldout_data = f"{eval_corpus.source}, every document (--eval-data)"
        heldout = sequences_or_fail(tokenizer, eval_corpus, "every", args.seq_len, args.heldout_seqs, "--heldout-seqs")
    key = run_key(args, config, corpus, device, dtype) | {"--eval-data": eval_corpus and eval_corpus.sha256}
    try:
        checkpoint = Checkpoint.open(checkpoint_path(out), key, resume=args.resume)
    except CheckpointError as exc:
        raise CalibrationError(str(exc)) from None
    identity = ModelIdentity.from_hf_config(config, name=args.name or Path(args.model).name, source=args.model,
                                            vocab_hash=vocabulary_hash(tokenizer),
                                            weights=weights_description(args.model, config))
    return Plan(args, rules, dense_reasons, device, dtype, out, corpus, calibration, heldout, heldout_data, checkpoint,
                identity)


def eval_data_corpus(paths: list[str] | None, corpus: Corpus, tokenizer) -> Corpus | None:
    """--eval-data's corpus (None: measure on the calibration data's held-out split); never the calibration text."""
    if not paths:
        return None
    try:
        eval_corpus = load_corpus(paths, tokenizer)
    except DataError as exc:
        raise DataError(f"--eval-data: {exc}") from None
    check_not_evaluation_text(eval_corpus.files)  # the loss guides the search: the OOD sets must stay unseen
    shared = sorted({f["sha256"] for f in corpus.files or []} & {f["sha256"] for f in eval_corpus.files or []})
    if shared:
        raise DataError(f"--eval-data holds a file that is also calibration --data (SHA-256 {shared[0][:12]}...); "
                        "the loss must be measured on text the calibration did not read: drop it from one of them")
    return eval_corpus


def sequences_or_fail(tokenizer, corpus: Corpus, part: str, seq_len: int, count: int, flag: str) -> list[list[int]]:
    texts = {"held-out": corpus.heldout, "calibration": corpus.calibration,
             "every": corpus.calibration + corpus.heldout}[part]
    try:
        return token_sequences(tokenizer, texts, seq_len, count)
    except DataError as exc:
        raise CalibrationError(f"the {part} split of {corpus.source}: {exc}; "
                               f"lower {flag} or --seq-len, or add data") from None


def run_key(args, config, corpus: Corpus, device: str, dtype: str) -> dict:
    """What a checkpoint must agree on to be continued (everything that changes the statistics)."""
    return {
        "model fingerprint": ModelIdentity.from_hf_config(config, name="").fingerprint,
        "--data": corpus.sha256 or corpus.source,
        "--k": args.k, "--layer-k": sorted(args.layer_k.items()), "--dense-layers": sorted(args.dense_layers),
        "--placement": args.placement, "--sdc": args.sdc, "--no-vmc": args.no_vmc, "--vmc-scope": args.vmc_scope,
        "--block-size": args.block_size, "--budget-k": args.budget_k,
        "--budget-candidates": args.budget_candidates if allocates(args) else None,
        "--budget-seqs": args.budget_seqs if allocates(args) else None,
        "--budget-objective": args.budget_objective if allocates(args) else None,
        "--target-loss": args.target_loss, "--search": args.search if args.target_loss is not None else None,
        "--keep-mass": args.keep_mass, "--keep-mass-floor": args.keep_mass_floor,
        "--num-seqs": args.num_seqs, "--seq-len": args.seq_len, "--heldout-seqs": args.heldout_seqs,
        "--no-topk-during-calibration": args.no_topk_during_calibration, "--device": device, "--dtype": dtype,
    }


# ------------------------------------------------------------------ run


def load_model(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(config, tokenizer, model) with the calibration attention."""
    config, tokenizer = load_config_and_tokenizer(path)
    return config, tokenizer, load_weights(path, device, dtype)


def load_config_and_tokenizer(path: str):
    from transformers import AutoConfig, AutoTokenizer

    return AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def load_weights(path: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    register_attention()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=ATTN_IMPL_NAME)
    return model.to(device).eval()


def geometric_grid(k: int, max_len: int, points: int) -> list[int]:
    lo, hi = math.log(k + 1), math.log(max_len)
    grid = sorted({round(math.exp(lo + (hi - lo) * i / (points - 1))) for i in range(points)})
    return [n for n in grid if k < n <= max_len]


def layer_grids(rules: list[ToptRule], seq_len: int, points: int) -> list[list[int] | None]:
    """Each thresholded layer's grid, from its own k: its rows with n <= k stay dense."""
    return [None if rule.dense else geometric_grid(rule.k, seq_len, points) for rule in rules]


def aggregate(session: CalibrationSession, rules, grids, placement: str) -> list[list[list[float]] | None]:
    """mean + 0.1·std per (layer, head, n), smoothed across n onto each layer's grid."""
    count = session.value_count.cpu()
    mean = session.value_sum.cpu() / count.clamp(min=1)
    var = (session.value_sq_sum.cpu() / count.clamp(min=1) - mean**2).clamp(min=0)
    stat = mean + STD_WEIGHT * var.sqrt()  # [L, H, max_len] indexed by n - 1
    log_n = torch.log(torch.arange(1, session.max_len + 1, dtype=torch.float64))
    post = placement == "post-softmax"
    result: list[list[list[float]] | None] = []
    for layer, (rule, grid) in enumerate(zip(rules, grids)):
        if rule.dense:
            result.append(None)
            continue
        layer_values = []
        for g in grid:
            # Count-weighted average over n within ±15% (in ln n) of the grid point.
            window = (log_n - math.log(g)).abs() <= SMOOTH_HALF_WIDTH
            window &= count[layer, 0] > 0
            if not bool(window.any()):  # cannot happen for grid points in (k, seq_len]; checked anyway
                raise RuntimeError(f"layer {layer}: no samples near n={g}")
            w = count[layer, :, window]
            y = stat[layer, :, window]
            y = y.clamp(min=1e-30).log() if post else y
            avg = (w * y).sum(dim=1) / w.sum(dim=1)
            layer_values.append(avg.exp() if post else avg)
        per_head = torch.stack(layer_values, dim=1)  # [H, G]
        if post:
            per_head = per_head.clamp(min=1e-12, max=1.0)
        result.append(per_head.tolist())
    return result


def run_sequences(model, sequences, session, plan: Plan, phase: str, scored: bool = False) -> None:
    """Run the remaining sequences of `phase`, checkpointing the session after each one.

    `scored`: also add each sequence's next-token loss to `session.next_token_loss`.
    """
    done = plan.checkpoint.restore(phase, session)
    set_session(session)
    try:
        with torch.inference_mode():
            bar = tqdm(range(done, len(sequences)), initial=done, total=len(sequences), desc=phase, unit="seq")
            for i in bar:
                if scored:
                    nll, tokens = window_nll(model, sequences[i], plan.device)
                    session.next_token_loss += torch.tensor([nll, tokens], dtype=torch.float64)
                else:
                    # Only the attention statistics matter: skip the [T, vocab] logits (1.6 GB at 8k for SmolLM2).
                    model(torch.tensor([sequences[i]], device=plan.device), use_cache=False, logits_to_keep=1)
                plan.checkpoint.save(phase, i + 1, session)
                plan.sequences_run += 1
    finally:
        set_session(None)


def calibrate(args, config, tokenizer, model) -> tuple[ThresholdFile, dict]:
    """Check, collect statistics on calibration text, build the file, check it on held-out text."""
    plan = prepare(args, config, tokenizer)
    return run(plan, config, model)


def profile_errors(plan: Plan, model, num_heads: int) -> dict[int, dict[int, float]]:
    """Profile the first --budget-seqs calibration sequences densely; each thresholded layer's error per k."""
    args = plan.args
    session = CalibrationSession(plan.num_layers, num_heads, args.seq_len, plan.rules, mode="profile",
                                 device=plan.device, block_size=args.block_size,
                                 profile_ks=tuple(args.budget_candidates), profile_objective=args.budget_objective)
    norms = ResidualNorms(model, session) if args.budget_objective == "residual" else contextlib.nullcontext()
    with norms:
        run_sequences(model, plan.calibration[: args.budget_seqs], session, plan, "budget profile")
    layers = [layer for layer, rule in enumerate(plan.rules) if not rule.dense]
    return relative_errors(session.profile_error, session.profile_norm, layers, args.budget_candidates)


def dense_heldout_perplexity(plan: Plan, model, num_heads: int) -> float:
    """The held-out sequences' perplexity with dense attention (the loss's baseline, measured once)."""
    session = CalibrationSession(plan.num_layers, num_heads, plan.args.seq_len, plan.rules, mode="dense",
                                 device=plan.device)
    run_sequences(model, plan.heldout, session, plan, "held-out dense", scored=True)
    return perplexity(*session.next_token_loss.tolist())


def run(plan: Plan, config, model) -> tuple[ThresholdFile, dict]:
    args = plan.args
    H = text_config(config).num_attention_heads
    dense_ppl = dense_heldout_perplexity(plan, model, H)
    errors = profile_errors(plan, model, H) if allocates(args) else None
    if args.target_loss is not None:
        ladders = {knob: search_ladder(args.budget_candidates) if knob is MEAN_K else list(knob.ladder)
                   for knob in searched_knobs(args)}
        results = [target_search(plan, model, H, knob, ladder, errors, dense_ppl) for knob, ladder in ladders.items()]
        result = best_of(results)
        file = ThresholdFile.model_validate_json(result.chosen.file_json)
        target = result.provenance(ladders[result.knob], plan.heldout_data)
        others = [r.provenance(ladders[r.knob], plan.heldout_data) for r in results if r is not result]
        if others:
            target |= {"selection": SELECTION_RULE, "other_searches": others}
        file.provenance.target = target  # type: ignore[attr-defined]
        return file, result.chosen.heldout
    allocation = None if errors is None else allocate(errors, args.budget_k, args.budget_objective)
    return calibrate_at(plan, model, H, allocation, dense_ppl, args.keep_mass)


def target_search(plan: Plan, model, num_heads: int, knob, ladder: list, errors, dense_ppl: float) -> SearchResult:
    """The sparsest rung on the ladder whose file meets --target-loss; finished trials come from the checkpoint."""
    args = plan.args

    def evaluate(value) -> Trial:
        name = f"{knob.label} {value:g}"
        saved = plan.checkpoint.trial(name)
        if saved is not None:
            return Trial(**saved)
        if knob is MEAN_K:
            allocation, keep_mass = allocate(errors, value, args.budget_objective), None
        else:
            allocation, keep_mass = None, value
        file, heldout = calibrate_at(plan, model, num_heads, allocation, dense_ppl, keep_mass,
                                     phase_prefix=f"{name}: ")
        trial = Trial(value, file.model_dump_json(), heldout, knob.name)
        plan.checkpoint.save_trial(name, trial.record(), [f"{name}: calibrating", f"{name}: held-out check"])
        return trial

    def report(trial: Trial, met: bool) -> None:
        verdict = "meets it" if met else "misses it"
        tqdm.write(f"{PROG}: {knob.label} {trial.value:g}: held-out loss {trial.loss_pct:+.2f}% at "
                   f"{trial.heldout['element_density']:.1%} of elements; target +{args.target_loss:g}%: {verdict}")

    return search(knob, ladder, evaluate, args.target_loss, report)


def calibrate_at(plan: Plan, model, num_heads: int, allocation: Allocation | None, dense_ppl: float,
                 keep_mass: float | None, phase_prefix: str = "") -> tuple[ThresholdFile, dict]:
    """Calibrate a file (at one budget's allocation, or at the arguments' k) and check it on held-out text."""
    args = plan.args
    k, layer_k = args.k, dict(args.layer_k)
    if allocation is not None:
        k = allocation.budget_k
        layer_k = {layer: own_k for layer, own_k in allocation.layer_k.items() if own_k != k}
    rules = args_layer_rules(args, plan.num_layers, plan.dense_reasons, k, layer_k)
    session = CalibrationSession(plan.num_layers, num_heads, args.seq_len, rules, device=plan.device,
                                 topk_during_calibration=not args.no_topk_during_calibration,
                                 block_size=args.block_size, keep_mass=keep_mass,
                                 keep_mass_floor=args.keep_mass_floor)
    run_sequences(model, plan.calibration, session, plan, f"{phase_prefix}calibrating")
    grids = layer_grids(rules, args.seq_len, args.grid_points)
    thresholds = aggregate(session, rules, grids, args.placement)
    main_grid = geometric_grid(k, args.seq_len, args.grid_points)
    file = ThresholdFile(
        schema_version=SCHEMA_VERSION,
        model=plan.identity,
        target_k=k,
        layer_k=layer_k,
        dense_layers=sorted(plan.dense_reasons),
        dense_layer_reasons=plan.dense_reasons,
        placement=args.placement,
        compensation=Compensation(sdc=args.sdc, vmc=not args.no_vmc, vmc_scope=args.vmc_scope,
                                  block_size=args.block_size if args.vmc_scope == VmcScope.BLOCK else None),
        n_grid=main_grid,
        layer_n_grid={layer: g for layer, g in enumerate(grids) if g is not None and g != main_grid},
        thresholds=thresholds,
        provenance=Provenance(
            data=plan.corpus.description,
            num_sequences=len(plan.calibration),
            max_seq_len=args.seq_len,
            tool=f"vllm-topt {__version__} {PROG}",
            date=datetime.date.today().isoformat(),
            topk_during_calibration=not args.no_topk_during_calibration,
            data_files=plan.corpus.files,
            data_sha256=plan.corpus.sha256,
            device=plan.device,
            dtype=plan.dtype,
        ),
    )
    if keep_mass is not None:
        file.provenance.keep_mass = {"mass": keep_mass, "rule": KEEP_MASS_RULE}  # type: ignore[attr-defined]
        if args.keep_mass_floor:
            file.provenance.keep_mass |= {"at_least_k": True, "floor_rule": KEEP_MASS_FLOOR_RULE}  # type: ignore[attr-defined]
    if allocation is not None:
        file.provenance.budget = allocation.provenance(args.budget_seqs, args.seq_len)  # type: ignore[attr-defined]
    heldout = heldout_check(model, file, rules, plan, dense_ppl, f"{phase_prefix}held-out check")
    file.provenance.heldout = heldout  # type: ignore[attr-defined]
    return file, heldout


def heldout_check(model, file: ThresholdFile, rules, plan: Plan, dense_ppl: float, phase: str) -> dict:
    """Apply the thresholds to held-out text as serving does: its perplexity loss, kept/k per row, the densities."""
    tables = [file.layer_thresholds(layer) for layer in range(len(rules))]
    session = CalibrationSession(len(rules), file.model.num_heads, plan.args.seq_len, rules, mode="apply",
                                 tables=tables, device=plan.device, block_size=plan.args.block_size)
    run_sequences(model, plan.heldout, session, plan, phase, scored=True)
    sparse = [layer for layer, r in enumerate(rules) if not r.dense]
    per_layer = {
        layer: float(session.kept_by_layer[layer] / session.rows_by_layer[layer].clamp(min=1)) / rules[layer].k
        for layer in sparse
    }
    kept_mean = float(session.kept_by_layer.sum() / session.rows_by_layer.sum().clamp(min=1))
    k_mean = sum(rules[layer].k * float(session.rows_by_layer[layer]) for layer in sparse) / float(session.rows_by_layer.sum())
    c: DensityCounts = session.counts
    return {
        "data": plan.heldout_data,
        "num_sequences": len(plan.heldout),
        "seq_len": plan.args.seq_len,
        "mean_kept_per_row": kept_mean,
        "kept_over_k": kept_mean / k_mean,
        "kept_over_k_per_layer": per_layer,
        "element_density": c.element_density,
        "v_row_density": c.v_row_density,
        "v_block_density": c.v_block_density,
        "perplexity": perplexity_entry(plan.heldout_data, len(plan.heldout), plan.args.seq_len, dense_ppl,
                                       perplexity(*session.next_token_loss.tolist()), f"{PROG} held-out check",
                                       c.element_density, c.v_row_density),
    }


def save_result(file: ThresholdFile, path) -> None:
    """Write the threshold file, then drop the run's checkpoint (nothing is left to resume)."""
    write_file(file, path)
    checkpoint_path(Path(path)).unlink(missing_ok=True)


def write_file(file: ThresholdFile, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(file.model_dump_json(indent=1) + "\n")


def peak_memory() -> str:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux
    text = f"peak RSS {rss:.2f} GiB"
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated():
        text += f", peak CUDA memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    return text


def print_summary(file: ThresholdFile, heldout: dict, plan: Plan, seconds: float, seconds_per_seq: float) -> None:
    ratios = heldout["kept_over_k_per_layer"].values()
    grids = f"n = {file.n_grid[0]} .. {file.n_grid[-1]} ({len(file.n_grid)} points)"
    for layer, g in file.layer_n_grid.items():
        grids += f"; layer {layer}: {g[0]} .. {g[-1]}"
    print()
    print(f"wrote {plan.out}")
    print(f"  model        {file.model.name} ({file.model.num_layers} layers, {file.model.num_heads} q / "
          f"{file.model.num_kv_heads} kv heads, head {file.model.head_size}, {file.model.fingerprint})")
    layer_k = "".join(f", layer {layer}: k={k}" for layer, k in file.layer_k.items())
    vmc = f"{file.compensation.vmc_scope} VMC" if file.compensation.vmc else "no VMC"
    mass = file.keep_mass()
    floor = f", at least {file.target_k} per row" if mass is not None and file.provenance.keep_mass.get("at_least_k") else ""
    keep = (f"keep mass {mass:g} per head{floor}, rows with n <= {file.target_k} dense" if mass is not None
            else f"k={file.target_k}")
    print(f"  rule         {keep}{layer_k}, {file.placement}, sdc={file.compensation.sdc}, "
          f"{vmc}, dense: {describe_dense(plan.dense_reasons)}")
    budget = getattr(file.provenance, "budget", None)
    if budget:
        print(f"  budget       mean k {budget['mean_k']:.1f} (budget {budget['mean_k_budget']}), allocated from "
              f"{budget['profile_sequences']} profiled sequences; see provenance.budget")
    print(f"  grid         {grids}; beyond: {file.extrapolation}")
    print(f"  data         {file.provenance.data}")
    print(f"  calibration  {file.provenance.num_sequences} sequences x {file.provenance.max_seq_len} tokens "
          f"on {plan.device} ({plan.dtype}), {seconds_per_seq:.1f} s per sequence run (every phase)")
    kept_over_k = ("kept/k not a target (k is the dense-row limit of a keep-mass file)" if file.keep_mass() is not None
                   else f"kept/k = {heldout['kept_over_k']:.3f} (layers: {min(ratios):.2f} .. {max(ratios):.2f})")
    print(f"  held-out     {heldout['num_sequences']} sequences: mean kept {heldout['mean_kept_per_row']:.1f} per row, "
          f"{kept_over_k}; "
          f"elements {heldout['element_density']:.1%}, V rows {heldout['v_row_density']:.1%}, "
          f"V blocks {heldout['v_block_density']:.1%} ({plan.args.block_size}-token blocks)")
    for line in measured_lines(file):
        print(f"  {line}")
    print(f"  time         {seconds / 60:.1f} min, {peak_memory()}")


def measured_lines(file: ThresholdFile) -> list[str]:
    """The held-out loss and, for a --target-loss file, its search, as the summary and --show print them."""
    heldout = getattr(file.provenance, "heldout", None) or {}
    perplexity = heldout.get("perplexity")
    lines = []
    if perplexity:
        lines.append(f"loss         perplexity {perplexity['topt']:.4f} vs dense {perplexity['dense']:.4f}: "
                     f"{perplexity['loss_pct']:+.2f}% on {perplexity['windows']} x {perplexity['window']} tokens of "
                     f"{perplexity['data']}")
    target = getattr(file.provenance, "target", None)
    if target:
        knob = knob_of(target)
        verdict = "met" if target["met"] else "MISSED: no rung on the ladder met it"
        lines.append(f"target       held-out loss <= +{target['target_loss_pct']:g}%: {verdict}; {knob.label} "
                     f"{target[f'chosen_{knob.name}']:g} chosen from {len(target['trials'])} trials:")
        for t in sorted(target["trials"], key=lambda t: t[knob.trial_key]):
            lines.append(f"               {knob.label} {t[knob.trial_key]:>4g}: loss {t['loss_pct']:+.2f}%, elements "
                         f"{t['element_density']:.1%}, V rows {t['v_row_density']:.1%}")
        for other in target.get("other_searches", []):
            knob = knob_of(other)
            chosen = next(t for t in other["trials"] if t[knob.trial_key] == other[f"chosen_{knob.name}"])
            lines.append(f"               also searched {knob.label}: {knob.label} {chosen[knob.trial_key]:g} "
                         f"{'met' if other['met'] else 'missed'} it at {chosen['loss_pct']:+.2f}%, elements "
                         f"{chosen['element_density']:.1%} ({len(other['trials'])} trials); not chosen")
    return lines


def show(path: str) -> None:
    """--show FILE: what a threshold file records, without loading a model."""
    try:
        file = load_threshold_file(path)
    except Exception as exc:  # a missing, unreadable or invalid file: say which and why
        raise CalibrationError(f"--show {path}: {exc}") from None
    print(f"{path}")
    print(f"  model        {file.model.name} ({file.model.num_layers} layers, {file.model.fingerprint})")
    print(f"  summary      {describe(file)}")
    print(f"  data         {file.provenance.data}")
    for line in measured_lines(file):
        print(f"  {line}")
    if not getattr(file.provenance, "heldout", None):
        print("  loss         not recorded: measure it with benchmarks/accuracy.py --task perplexity")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.show is not None:
        show(args.show)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.monotonic()
    config, tokenizer = load_config_and_tokenizer(args.model)
    plan = prepare(args, config, tokenizer)
    model = load_weights(args.model, plan.device, DTYPES[plan.dtype])
    try:
        run_start = time.monotonic()
        file, heldout = run(plan, config, model)
    except KeyboardInterrupt:
        trials = len(plan.checkpoint.state.get("trials", {}))
        kept = f"{plan.checkpoint.sequences_done()} sequences" + (f" and {trials} finished trials" if trials else "")
        print(f"\n{PROG}: interrupted; {plan.checkpoint.path} holds {kept}. Continue with the same command plus "
              "--resume.", file=sys.stderr)
        raise SystemExit(130) from None
    save_result(file, plan.out)
    seconds_per_seq = (time.monotonic() - run_start) / max(plan.sequences_run, 1)
    print_summary(file, heldout, plan, time.monotonic() - start, seconds_per_seq)


if __name__ == "__main__":
    main()
