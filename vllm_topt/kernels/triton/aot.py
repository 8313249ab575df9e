"""Compile every Triton kernel of `decode` ahead of time for a named GPU, with no GPU: registers, spills, smem.

    python -m vllm_topt.kernels.triton.aot [--json OUT] [--targets sm_90,sm_80] [--jobs N] [--full | --heaviest]
    python -m vllm_topt.kernels.triton.aot --triton 3.6.0 --json OUT   # the same under another Triton

What is compiled is what the CUDA backend launches: `backend_launches` runs the
real launchers (`topt_decode`, `DeviceThresholds.lookup`, `update_v_block_sums`,
whose constexprs and launch options come from `decode.decode_launch`,
`decode.threshold_lookup_launch` and `decode.v_block_sum_launches`) on CPU
tensors laid out as the backend lays out its own (vLLM's paged cache views,
the metadata builder's scratch, θ and counter buffers, segments per batch
size), with the kernels replaced by recorders. Each recorded launch is
specialised by Triton's own JIT binder for the target (argument types, 16-byte
alignment and divisibility, ints equal to 1), exactly as `kernel[grid](...)`
would on that GPU, and compiled with
`triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32))`
down to a cubin with Triton's bundled ptxas. Registers and spills come from
that ptxas run's own `-v` report (`CompiledKernel.n_regs`/`n_spills` are only
filled when a binary is loaded on a device); shared memory is Triton's
allocation (`metadata.shared`) plus ptxas' static smem.

What is covered (`launch_plan`): on every target x head size (64, 128, 256) x
dtype (bf16, fp16), each kernel's heaviest launches (sparse post-softmax + VMC
over the sequence and per block + soft-cap, and dense + soft-cap, 8-way GQA; at
block size 64 too where that makes the tile larger); and per head size every
rule (dense; post-softmax +- VMC; pre-softmax x SDC none / exact / exp-threshold
+- VMC; VMC over the sequence or per block), soft-capping on and
off, block sizes 16/32/64, group sizes 1, 2, 3, 6, 7, 8, 16 (the shipped
configs' 3, 6, 7 among them) and batches giving 64, 8 and 1 segments per row
(1 also turns the segment strides into constants), spread over the targets
and dtypes. `--full` adds fp32 and MQA-like group sizes (32, 64); `--heaviest`
keeps only the heaviest launches of each cell (where spills would show first).
Identical specialisations are compiled once.

Exit status 1 if a kernel fails to compile or spills. Needs torch and triton
only (no vLLM, no GPU, no network); `--triton VERSION` first installs that
Triton (pip, --no-deps) into the user cache and re-runs this module with it
first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

TARGETS = {"sm_90": 90, "sm_80": 80}
# Dynamic shared memory a block may opt into (CUDA programming guide, compute capabilities).
MAX_SHARED = {90: 227 * 1024, 80: 163 * 1024}
KERNELS = ("_topt_scores_kernel", "_topt_sparse_kernel", "_topt_combine_kernel", "_threshold_lookup_kernel",
           "_vsum_reset_kernel", "_vsum_add_kernel")
# @triton.jit functions of `decode` that only kernels call (compiled inside them).
DEVICE_FUNCTIONS = ("_page_alive",)
DTYPES = ("bf16", "fp16", "fp32")
SDC_NAMES = ("none", "exact", "exp-threshold")


# --- what the backend launches -------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One attention layer as the CUDA backend sees it, and one decode step of it."""

    head_size: int
    dtype: str  # model (query, cache, output) dtype: bf16 / fp16 / fp32
    group_size: int  # query heads per KV head
    num_kv_heads: int
    block_size: int
    placement: str = "post-softmax"
    sdc: str = "none"
    vmc: bool = True
    vmc_scope: str = "sequence"  # or "block" (SPEC §4)
    dense: bool = False  # a dense layer (or sparsity disabled): no θ
    soft_cap: float = 0.0
    batch: int = 1  # decode rows in the step (sets the segments per row, as the metadata builder does)
    max_decodes: int = 256
    max_model_len: int = 4096


def rule_variants() -> list[dict]:
    """Every rule a threshold file can give a layer, kernel-wise (SDC is pre-softmax only)."""
    sparse = [dict(placement="post-softmax", sdc="none", vmc=vmc) for vmc in (True, False)]
    sparse += [dict(placement="pre-softmax", sdc=sdc, vmc=vmc) for sdc in SDC_NAMES for vmc in (True, False)]
    sparse += [dict(rule, vmc_scope="block") for rule in sparse if rule["vmc"]]
    # A dense layer still passes its file's placement / SDC to the combine kernel (VMC is off there).
    dense = [dict(placement="post-softmax", sdc="none", vmc=True, dense=True)]
    dense += [dict(placement="pre-softmax", sdc=sdc, vmc=True, dense=True) for sdc in SDC_NAMES]
    return sparse + dense


def batch_for_segments(num_kv_heads: int, segments: int, max_decodes: int) -> int:
    """The smallest batch the metadata builder gives `segments` segments per row."""
    from vllm_topt.kernels.triton import decode

    for b in range(1, max_decodes + 1):
        if decode.choose_num_segments(b, num_kv_heads) == segments:
            return b
    raise ValueError(f"no batch <= {max_decodes} gets {segments} segments with {num_kv_heads} KV heads")


SPARSE_HEAVY = dict(placement="post-softmax", sdc="none", vmc=True)  # every sparse-kernel feature but SDC
SPARSE_HEAVY_BLOCK = dict(SPARSE_HEAVY, vmc_scope="block")  # the same with block-wise VMC (more state)
DENSE_RULE = dict(placement="pre-softmax", sdc="exp-threshold", vmc=True, dense=True)
# (block size, group size, KV heads, segments per row) beyond the base (16, 8, 8, 64).
STRUCTURES = ((32, 1, 16, 1), (64, 3, 3, 8), (32, 7, 4, 8), (64, 16, 4, 1), (16, 2, 8, 1), (64, 6, 2, 64))
SOFT_CAP = 50.0  # Gemma 2's


def _shape(dtype, head_size, *, block_size=16, group_size=8, num_kv_heads=8, segments=64, **rule):
    """`segments` None: the largest batch (the fewest segments)."""
    batch = Shape.max_decodes if segments is None else batch_for_segments(num_kv_heads, segments, Shape.max_decodes)
    return Shape(head_size, dtype, group_size, num_kv_heads, block_size, batch=batch, **rule)


def launch_plan(full: bool = False, targets=tuple(TARGETS), heaviest: bool = False) -> list[tuple[str, Shape]]:
    """(target, shape) pairs the compile check covers.

    Default: on every target x head size x dtype (bf16, fp16) cell, the heaviest
    launches of each kernel: sparse post-softmax + VMC (over the sequence, and
    per block) + soft-cap, and dense + soft-cap, 8-way GQA, 64 segments per
    row, at block size 16 and, where a larger block makes a larger tile
    (`decode.decode_tile_tokens`: d=256), at block size 64 too. Then, per head
    size, every rule once (soft-capping on for half of them, so that each of
    pre-softmax's VMC x soft-cap pairs occurs) on each of the `STRUCTURES`
    (block size, group size, segment count), each sparse and dense, the
    (target, dtype) cells taking these in turn.
    `heaviest`: only those heavy launches of each cell (and fp32's), not the
    rule and structure variants.
    `full`: fp32 cells too, and MQA-like group sizes (32, 64) with the heavy
    rules at block sizes 16 and 64 on every cell. Either way fp32 heavy
    launches at block size 16 where the backend serves fp32
    (`decode.fp32_refusal`), and nothing it refuses.
    """
    from vllm_topt.kernels.triton import decode

    dtypes = DTYPES if full else ("bf16", "fp16")
    rules = rule_variants()  # 12 sparse (the last 4 block-wise VMC), then 4 dense
    # Two more dense rules, so that every structure is launched both sparse and dense.
    rules += [r for r in rules if r.get("dense") and (r["placement"] == "post-softmax" or r["sdc"] == "exact")]
    rest = []
    for i, rule in enumerate(rules):
        bs, g, kv, segs = STRUCTURES[i % len(STRUCTURES)]
        cap = SOFT_CAP if ((i >> 1) ^ i) & 1 else 0.0
        rest.append(dict(**rule, soft_cap=cap, block_size=bs, group_size=g, num_kv_heads=kv, segments=segs))
    heavy = [dict(**rule, soft_cap=SOFT_CAP) for rule in (SPARSE_HEAVY, SPARSE_HEAVY_BLOCK, DENSE_RULE)]
    pairs: list[tuple[str, Shape]] = []
    for d in (64, 128, 256):
        cells = [(t, dt) for dt in dtypes for t in targets]
        block_sizes = [16]
        if any(decode.decode_tile_tokens(d, 64, dt == "fp32") != decode.decode_tile_tokens(d, 16, dt == "fp32")
               for dt in dtypes):
            block_sizes.append(64)
        base = [dict(kw, block_size=bs) for bs in block_sizes for kw in heavy]
        if full:
            base += [dict(kw, block_size=bs, group_size=g, num_kv_heads=1, segments=None)
                     for bs in (16, 64) for g in (32, 64) for kw in heavy]
        for target, dtype in cells:
            pairs += [(target, _shape(dtype, d, **kw)) for kw in base]
        for i, kw in enumerate([] if heaviest else rest):
            # In turn over the cells; i // 2 shifts the turn so that alternating items reach every cell.
            target, dtype = cells[(i + i // 2) % len(cells)]
            pairs.append((target, _shape(dtype, d, **kw)))
        if not full:
            # fp32 where the backend serves it (see FP32_MAX_HEAD_SIZE), heavy rules at the default block.
            pairs += [(target, _shape("fp32", d, **dict(kw, block_size=16))) for target in targets for kw in heavy
                      if decode.fp32_refusal(d, 16) is None]
    # Configurations the backend refuses at start-up are not launched, so not compiled.
    return [(target, shape) for target, shape in pairs
            if shape.dtype != "fp32" or decode.fp32_refusal(shape.head_size, shape.block_size) is None]


@dataclass
class Launch:
    kernel: str
    grid: tuple
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](...)` records the launch instead of running it."""

    def __init__(self, name: str, launches: list[Launch]):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(Launch(self.name, tuple(grid), args, kwargs))


@contextlib.contextmanager
def recording():
    """Replace every kernel of `decode` by a recorder for the duration; yields the list of launches."""
    from vllm_topt.kernels.triton import decode

    launches: list[Launch] = []
    saved = {name: getattr(decode, name) for name in KERNELS}
    try:
        for name in KERNELS:
            setattr(decode, name, _Recorder(name, launches))
        yield launches
    finally:
        for name, fn in saved.items():
            setattr(decode, name, fn)


_TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def backend_launches(shape: Shape) -> list[Launch]:
    """The kernel launches of one decode step (θ lookup, attention) and one KV write of `shape`'s layer,
    with every buffer allocated as `vllm_topt.backends.cuda` allocates it (on the CPU)."""
    import torch

    from vllm_topt.kernels.triton import decode
    from vllm_topt.method.rules import ToptRule

    if decode.INTERPRETED:
        raise RuntimeError("vllm_topt.kernels.triton.decode was imported with TRITON_INTERPRET=1")
    dtype = getattr(torch, _TORCH_DTYPES[shape.dtype])
    D, BS, H_kv, B = shape.head_size, shape.block_size, shape.num_kv_heads, shape.batch
    H = shape.group_size * H_kv
    rule = ToptRule(placement=shape.placement, sdc=shape.sdc, vmc=shape.vmc, dense=shape.dense,
                    vmc_scope=shape.vmc_scope)
    # ToptCudaMetadataBuilder: segments per batch size, one scratch for the largest, θ buffer.
    segments = {b: decode.choose_num_segments(b, H_kv) for b in range(1, shape.max_decodes + 1)}
    max_pages = -(-shape.max_model_len // BS)
    scratch = decode.ToptScratch.allocate(shape.max_decodes, H, H_kv, D, max_pages,
                                          capacity=max(b * s for b, s in segments.items()), device="cpu",
                                          block_vmc=rule.block_vmc)
    theta_buf = torch.zeros(shape.max_decodes, H, dtype=torch.float32)
    # The layer state (ToptCudaImpl): V sums, θ table, counters.
    num_blocks = 8
    sparse = not rule.dense
    v_sums = torch.zeros(num_blocks, H_kv, D, dtype=torch.float32) if sparse and rule.vmc else None
    counters = decode.new_counters(shape.max_decodes, device="cpu")
    # vLLM's cache: logical [num_blocks, H_kv, BS, 2d] stored as [num_blocks, BS, H_kv, 2d]; TRITON_ATTN's views.
    kv_cache = torch.empty(num_blocks, BS, H_kv, 2 * D, dtype=dtype).permute(0, 2, 1, 3)
    key_cache, value_cache = kv_cache.transpose(1, 2).split(D, dim=-1)
    # The step: q/k/v as views of one projection output, the block table and lengths of the first B requests.
    qkv = torch.empty(B, (H + 2 * H_kv) * D, dtype=dtype)
    query = qkv[:, : H * D].view(B, H, D)
    value = qkv[:, (H + H_kv) * D :].view(B, H_kv, D)
    output = torch.empty(B, H, D, dtype=dtype)
    block_table = torch.zeros(shape.max_decodes, max_pages, dtype=torch.int32)[:B]
    seq_lens = torch.ones(shape.max_decodes, dtype=torch.int32)[:B]
    slot_mapping = torch.arange(B, dtype=torch.int64)

    with recording() as launches:
        theta = None
        if sparse:
            grid_points = 24  # the shipped configs' n_grid
            layer = SimpleNamespace(placement=rule.placement, log_n=torch.zeros(grid_points),
                                    table=torch.zeros(H, grid_points), slope=torch.zeros(H))
            theta = decode.DeviceThresholds(layer, "cpu").lookup(seq_lens, out=theta_buf[:B])
        decode.topt_decode(
            query, key_cache, value_cache, block_table, seq_lens, theta, rule, D**-0.5,
            v_block_sums=v_sums, logits_soft_cap=shape.soft_cap or None, out=output,
            counters=counters[:B], scratch=scratch, num_segments=segments[B], max_pages=scratch.block_max.shape[2],
        )
        if v_sums is not None:
            decode.update_v_block_sums(v_sums, value, slot_mapping, BS)
    return launches


# --- specialisation and compilation -----------------------------------------------------------------


@dataclass
class Job:
    """One kernel specialisation for one target: what `kernel[grid](...)` would compile there."""

    kernel: str
    target: str
    arch: int
    signature: dict
    constexprs: dict  # {(arg index,): value}, as Triton's JIT passes them
    attrs: dict
    options: dict
    labels: list = field(default_factory=list)  # the shapes that launch it

    def key(self) -> str:
        return repr((self.kernel, self.arch, sorted(self.signature.items()), sorted(self.constexprs.items()),
                     sorted(self.attrs.items()), sorted(self.options.items())))


def specialise(launch: Launch, target: str) -> Job:
    """Triton's JIT binding of a recorded launch for `target` (JITFunction.run up to compile, no driver).

    Uses the JIT's own binder (`create_function_from_signature`, `JITFunction._pack_args`; the same in
    Triton 3.6 and 3.9), so argument types, alignment and the ints specialised are Triton's decisions."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from vllm_topt.kernels.triton import decode

    fn = getattr(decode, launch.kernel)
    arch = TARGETS[target]
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    # As JITFunction.run does before binding (the knobs each Triton version has).
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return Job(launch.kernel, target, arch, dict(signature), dict(constexprs), dict(attrs), dict(options.__dict__))


_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas_log(log: str, name: str) -> dict | None:
    """Registers, spills, stack frame and static smem of entry `name` from a `ptxas -v` report."""
    at = log.find(f"Function properties for {name}")
    if at < 0:
        return None
    frame = _PTXAS_FRAME.search(log, at)
    used = _PTXAS_USED.search(log, at)
    if not frame or not used:
        return None
    return {
        "registers": int(used.group(1)), "stack_frame": int(frame.group(1)), "spill_stores": int(frame.group(2)),
        "spill_loads": int(frame.group(3)), "ptxas_smem": int(used.group(2) or 0),
    }


def rerun_ptxas(ptx: str, arch: int) -> str:
    """`ptxas -v` (Triton's bundled one for `arch`, its default flags) on the PTX; returns the report."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "--fmad=false", "-v", f"--gpu-name={sm_arch_from_capability(arch)}",
               str(src), "-o", str(Path(tmp) / "k.cubin")]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return proc.stderr + proc.stdout


def compile_job(job: Job) -> dict:
    """Compile one job to a cubin; returns its resource usage (or the error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vllm_topt.kernels.triton import decode

    fn = getattr(decode, job.kernel)
    constexprs = {fn.arg_names[k[0]]: _plain(v) for k, v in job.constexprs.items()}
    # The data type the kernel reads (query / output / values); the θ and V-sum kernels are fp32-only.
    data_arg = {"_topt_scores_kernel": "Q", "_topt_sparse_kernel": "Q", "_topt_combine_kernel": "OUT",
                "_vsum_add_kernel": "VAL"}.get(job.kernel)
    result = {"kernel": job.kernel, "target": job.target,
              "head_size": constexprs.get("D"), "dtype": job.signature[data_arg].lstrip("*") if data_arg else "fp32",
              "constexprs": {k: v for k, v in constexprs.items() if fn.params[fn.arg_names.index(k)].is_constexpr},
              "specialised": _specialisation(fn, job), "num_warps": job.options.get("num_warps"),
              "num_stages": job.options.get("num_stages"), "labels": job.labels}
    start = time.perf_counter()
    log = io.StringIO()
    try:
        # Triton prints ptxas' -v report when TRITON_DUMP_PTXAS_LOG is set (main sets it, and a fresh cache).
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, job.signature, job.constexprs, job.attrs),
                                      target=GPUTarget("cuda", job.arch, 32), options=job.options)
        usage = parse_ptxas_log(log.getvalue(), compiled.metadata.name)
        source = "triton's ptxas run"
        if usage is None:  # a cached binary, or a report in another format: run ptxas on the PTX again
            usage = parse_ptxas_log(rerun_ptxas(compiled.asm["ptx"], job.arch), compiled.metadata.name)
            source = "ptxas -v rerun"
        if usage is None:
            raise RuntimeError("no register / spill report from ptxas")
    except Exception as exc:  # noqa: BLE001 - reported, and fails the check
        text = f"{type(exc).__name__}: {exc}"
        return result | {"ok": False, "error": text[:6000], "seconds": round(time.perf_counter() - start, 2)}
    shared = int(compiled.metadata.shared)
    return result | usage | {
        "ok": True, "shared": shared, "shared_total": shared + usage["ptxas_smem"], "usage_from": source,
        "seconds": round(time.perf_counter() - start, 2),
    }


def _specialisation(fn, job: Job) -> dict:
    """What the JIT binder specialised beyond the declared constexprs: ints equal to 1 (made constants),
    ints divisible by 16, and pointers *not* 16-byte aligned."""
    equal_one, div16, unaligned = [], [], []
    for i, name in enumerate(fn.arg_names):
        kind = job.signature[name]
        if fn.params[i].is_constexpr:
            continue
        if kind == "constexpr":
            equal_one.append(name)
            continue
        divisible = any(attr[0] == "tt.divisibility" for attr in job.attrs.get((i,), []))
        if kind.startswith("*") and not divisible:
            unaligned.append(name)
        elif not kind.startswith("*") and divisible:
            div16.append(name)
    return {"equal_1": equal_one, "div_16": div16, "unaligned": unaligned}


def _plain(value):
    return value if isinstance(value, (bool, int, float, str, type(None))) else str(value)


def _label(shape: Shape) -> str:
    placement = "post" if shape.placement == "post-softmax" else f"pre/sdc={shape.sdc}"
    vmc = ("+bvmc" if shape.vmc_scope == "block" else "+vmc") if shape.vmc else ""
    rule = f"dense({placement})" if shape.dense else placement + vmc
    return (f"d={shape.head_size} {shape.dtype} G={shape.group_size} Hkv={shape.num_kv_heads} bs={shape.block_size} "
            f"B={shape.batch} {rule}" + (" softcap" if shape.soft_cap else ""))


def plan(pairs: list[tuple[str, Shape]]) -> list[Job]:
    """Every distinct kernel specialisation that the (target, shape) pairs launch."""
    jobs: dict[str, Job] = {}
    recorded: dict[Shape, list[Launch]] = {}
    for target, shape in pairs:
        if shape not in recorded:
            recorded[shape] = backend_launches(shape)
        for launch in recorded[shape]:
            job = specialise(launch, target)
            job = jobs.setdefault(job.key(), job)
            job.labels.append(_label(shape))
    # Heaviest first, for the process pool.
    weight = {"_topt_sparse_kernel": 4, "_topt_scores_kernel": 3, "_topt_combine_kernel": 2}
    return sorted(jobs.values(), key=lambda j: (-weight.get(j.kernel, 0), -_head_size(j)))


def _head_size(job: Job) -> int:
    from vllm_topt.kernels.triton import decode

    names = getattr(decode, job.kernel).arg_names
    return job.constexprs.get((names.index("D"),), 0) if "D" in names else 0


def kernels_defined() -> list[str]:
    """Names of every @triton.jit kernel in `decode` (so that a new one cannot go unchecked)."""
    from triton.runtime.jit import JITFunction

    from vllm_topt.kernels.triton import decode

    return sorted(name for name, value in vars(decode).items()
                  if isinstance(value, JITFunction) and name not in DEVICE_FUNCTIONS)


def _init_worker(env: dict) -> None:
    os.environ.update(env)


def run(targets=tuple(TARGETS), full: bool = False, jobs: int | None = None,
        pairs: list[tuple[str, Shape]] | None = None, heaviest: bool = False) -> dict:
    """Plan, compile (in a process pool) and return the report (see `main`)."""
    import torch
    import triton

    start = time.perf_counter()
    cache = tempfile.mkdtemp(prefix="topt-aot-cache-")
    # A fresh Triton cache so that ptxas really runs (and reports) for every kernel.
    env = {"TRITON_CACHE_DIR": cache, "TRITON_DUMP_PTXAS_LOG": "1"}
    os.environ.pop("TRITON_INTERPRET", None)
    try:
        pairs = launch_plan(full, targets, heaviest) if pairs is None else pairs
        planned = plan(pairs)
        plan_s = time.perf_counter() - start
        workers = max(1, min(jobs or len(os.sched_getaffinity(0)), len(planned)))
        if workers == 1:
            _init_worker(env)
            results = [compile_job(job) for job in planned]
        else:
            import multiprocessing

            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_init_worker, initargs=(env,)) as pool:
                results = list(pool.map(compile_job, planned, chunksize=1))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    for result in results:
        if result["ok"]:
            problems = []
            if result["spill_stores"] or result["spill_loads"]:
                problems.append(f"spills {result['spill_stores']} B stores / {result['spill_loads']} B loads")
            if result["stack_frame"]:
                problems.append(f"{result['stack_frame']} B stack frame")
            if result["shared_total"] > MAX_SHARED[TARGETS[result["target"]]]:
                problems.append(f"{result['shared_total']} B shared memory")
            result["problems"] = problems
    failures = [r for r in results if not r["ok"] or r["problems"]]
    defined = kernels_defined()
    compiled = sorted({r["kernel"] for r in results})
    if defined != sorted(KERNELS):
        failures.append({"kernel": ", ".join(sorted(set(defined) ^ set(KERNELS))), "ok": False,
                         "error": f"decode defines the kernels {defined}; this check knows {sorted(KERNELS)}"})
    return {
        "triton": {"version": triton.__version__, "path": str(Path(triton.__file__).parent)},
        "torch": torch.__version__, "python": sys.version.split()[0], "targets": list(targets), "full": full,
        "heaviest": heaviest,
        "kernels_defined": defined, "kernels_compiled": compiled,
        "num_launch_shapes": len(pairs), "num_compiled": len(results),
        "num_failed": len(failures), "failures": [_failure_text(r) for r in failures], "plan_seconds": round(plan_s, 1),
        "seconds": round(time.perf_counter() - start, 1), "workers": workers, "results": results,
    }


def _failure_text(r: dict) -> str:
    if "target" not in r:
        return f"{r['kernel']}: {r['error']}"
    where = f"{r['kernel']} {r['target']} {config_text(r)} (launched by {r['labels'][0]})"
    return f"{where}:\n{r['error']}" if not r["ok"] else f"{where}: {'; '.join(r['problems'])}"


# --- report -------------------------------------------------------------------------------------------

_SHORT = {"_topt_scores_kernel": "scores", "_topt_sparse_kernel": "sparse", "_topt_combine_kernel": "combine",
          "_threshold_lookup_kernel": "theta_lookup", "_vsum_reset_kernel": "vsum_reset",
          "_vsum_add_kernel": "vsum_add"}
_SHOWN = ("G", "D", "BS", "PAGES", "NSEG", "DENSE", "SOFTCAP", "POST", "SDC", "VMC", "BLOCK_VMC", "DOT_FP32",
          "COUNT", "HP", "NGP", "HD", "DP")


def config_text(result: dict) -> str:
    c = result["constexprs"]
    parts = []
    for name in _SHOWN:
        if name in c and not (name == "DP" and "D" in c):
            value = c[name]
            parts.append(name if value is True else f"{name}={value}" if value is not False else "")
    parts = [p for p in parts if p]
    parts.append(f"w={result['num_warps']}")
    if result["kernel"] in ("_topt_scores_kernel", "_topt_sparse_kernel"):
        parts.append(f"st={result['num_stages']}")
    spec = result.get("specialised", {})
    if spec.get("equal_1"):
        parts.append("1:" + ",".join(spec["equal_1"]))
    if spec.get("unaligned"):
        parts.append("unaligned:" + ",".join(spec["unaligned"]))
    if result["kernel"] == "_threshold_lookup_kernel" and spec.get("div_16"):
        parts.append("%16:" + ",".join(spec["div_16"]))
    return " ".join(parts)


def table(report: dict, target: str | None = None) -> str:
    rows = [("kernel", "target", "d", "dtype", "config", "regs", "spill st/ld", "smem", "s")]
    for r in sorted(report["results"], key=lambda r: (r["target"], _SHORT[r["kernel"]], r["head_size"] or 0,
                                                      r["dtype"], config_text(r))):
        if target and r["target"] != target:
            continue
        dtype, d = r["dtype"], r["head_size"] or "-"
        if r["ok"]:
            usage = (str(r["registers"]), f"{r['spill_stores']}/{r['spill_loads']}", str(r["shared_total"]))
        else:
            usage = ("ERROR", "-", "-")
        rows.append((_SHORT[r["kernel"]], r["target"], str(d), dtype, config_text(r), *usage, str(r["seconds"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


# --- another Triton, side by side -------------------------------------------------------------------


def side_triton_dir(version: str) -> Path:
    from vllm_topt.cache import cache_dir

    return cache_dir() / f"triton-{version}"


def install_triton(version: str, dest: Path | None = None) -> Path:
    """Triton `version` installed (pip --no-deps --target) into `dest` (default: the user cache); idempotent.

    Put the folder first on PYTHONPATH for `import triton` to pick it (torch stays the environment's)."""
    dest = Path(dest) if dest else side_triton_dir(version)
    marker = dest / ".vllm-topt-installed"
    if marker.exists() and (dest / "triton" / "__init__.py").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--no-compile", "--target", str(tmp), f"triton=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        (tmp / marker.name).write_text(f"triton=={version}\n")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def side_env(folder: Path, env: dict | None = None) -> dict:
    """An environment whose `import triton` is the one in `folder` (first on PYTHONPATH)."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(folder)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("TRITON_INTERPRET", None)
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the full report (every compiled specialisation) here")
    parser.add_argument("--targets", default="sm_90,sm_80", help=f"comma-separated, of {', '.join(TARGETS)}")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: one per usable core)")
    parser.add_argument("--full", action="store_true", help="also fp32 and MQA-like group sizes (32, 64)")
    parser.add_argument("--heaviest", action="store_true", help="only each cell's heaviest launches")
    parser.add_argument("--triton", metavar="VERSION", help="install this Triton into the user cache and use it")
    parser.add_argument("--table", default="sm_90", help="target whose table is printed ('all' for every one)")
    args = parser.parse_args(argv)
    if args.triton:
        folder = install_triton(args.triton)
        rest = ["--targets", args.targets, "--table", args.table]
        rest += (["--json", args.json] if args.json else []) + (["--jobs", str(args.jobs)] if args.jobs else [])
        rest += ["--full"] if args.full else []
        rest += ["--heaviest"] if args.heaviest else []
        return subprocess.run([sys.executable, "-m", "vllm_topt.kernels.triton.aot", *rest],
                              env=side_env(folder)).returncode
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown targets {unknown}: expected {', '.join(TARGETS)}")
    report = run(targets, args.full, args.jobs, heaviest=args.heaviest)
    print(table(report, None if args.table == "all" else args.table))
    for text in report["failures"]:
        print(f"\nFAILED {text}", file=sys.stderr)
    print(f"\nTriton {report['triton']['version']} ({report['triton']['path']}): {report['num_compiled']} "
          f"specialisations from {report['num_launch_shapes']} (target, shape) pairs, "
          f"{report['num_failed']} failed, {report['seconds']} s on {report['workers']} processes")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1, default=_plain))
    return 1 if report["num_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
