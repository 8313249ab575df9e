"""The Triton kernels compile for Hopper (sm_90) and Ampere (sm_80) without a GPU, and never spill registers.

`python -m vllm_topt.kernels.triton.aot` records what the CUDA backend launches
(the real launchers on CPU tensors laid out as the backend lays them out),
specialises each launch with Triton's own JIT binder for the target and
compiles it to a cubin with Triton's bundled ptxas, whose `-v` report gives
registers and spills. Every kernel, at head sizes 64/128/256 and bf16/fp16
on both targets, plus every rule, soft-capping, block size, group size and
segment count variant of its plan (see `aot.launch_plan`), must compile with
no spill and no stack frame.

Twice: with Triton 3.6 (what older GPU environments carry, our GPU machines
included; the kernels must not use newer-only features): the whole plan on
both targets. And with the environment's newer Triton: the heaviest launches
of every cell (`aot --heaviest`: where its register allocation would spill
first) on sm_90, the target newer GPUs' wheels compile for too; the rule and
structure variants there would repeat the 3.6 run's coverage at three times
the time. The test installs Triton 3.6 (pip, --no-deps, about 190 MB once) into the user cache,
`vllm_topt.cache.cache_dir() / "triton-3.6.0"`, and puts first on PYTHONPATH of
the compile process (torch stays the environment's). A failed install fails.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_topt.kernels.triton import aot

ROOT = Path(__file__).resolve().parent.parent
OLD_TRITON = "3.6.0"
NEWER_TRITON_TARGETS = ("sm_90",)
TIMEOUT_S = 1200


def compile_everything(tmp_path: Path, env: dict, targets: tuple[str, ...], heaviest: bool = False) -> dict:
    out = tmp_path / "aot.json"
    env = dict(env)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_topt.kernels.triton.aot", "--json", str(out), "--table", "all",
         "--targets", ",".join(targets), *(["--heaviest"] if heaviest else [])],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    print(proc.stdout[-20000:])
    tail = f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    assert out.exists(), f"the compile check wrote no report (exit {proc.returncode}):\n{tail}"
    report = json.loads(out.read_text())
    assert not report["failures"], "\n\n".join(report["failures"])[:20000]
    assert proc.returncode == 0, tail
    return report


def check_coverage(report: dict, targets: tuple[str, ...], heaviest: bool = False) -> None:
    results = report["results"]
    assert sorted(report["targets"]) == sorted(targets) == sorted({r["target"] for r in results})
    assert report["kernels_defined"] == sorted(aot.KERNELS) == report["kernels_compiled"]
    assert all(r["ok"] and not r["problems"] for r in results)
    seen = {(r["kernel"], r["target"], r["head_size"], r["dtype"]) for r in results}
    per_shape = ("_topt_scores_kernel", "_topt_sparse_kernel", "_topt_combine_kernel", "_vsum_add_kernel")
    missing = [key for key in itertools.product(per_shape, targets, (64, 128, 256), ("bf16", "fp16"))
               if key not in seen]
    assert not missing, f"not compiled: {missing}"
    for target in targets:
        kernels = {r["kernel"] for r in results if r["target"] == target}
        assert kernels == set(aot.KERNELS), target
    # Registers come from ptxas' own report of each compile.
    assert all(0 < r["registers"] <= 255 for r in results)
    if heaviest:
        return
    # Every flag value of every kernel occurs (rules, soft-cap, SDC codes, block sizes, segments).
    for kernel, flags in {
        "_topt_scores_kernel": ("DENSE", "SOFTCAP", "BLOCK_VMC", "BS", "NSEG"),
        "_topt_sparse_kernel": ("POST", "VMC", "BLOCK_VMC", "SOFTCAP", "BS", "NSEG"),
        "_topt_combine_kernel": ("DENSE", "POST", "SDC", "VMC", "BLOCK_VMC", "NSEG"),
    }.items():
        for flag in flags:
            values = {r["constexprs"][flag] for r in results if r["kernel"] == kernel}
            expected = {"BS": {16, 32, 64}, "NSEG": {1, 8, 64}, "SDC": {0, 1, 2}}.get(flag, {False, True})
            assert values == expected, (kernel, flag, values)


def test_kernels_compile_without_spills(tmp_path):
    report = compile_everything(tmp_path, dict(os.environ), NEWER_TRITON_TARGETS, heaviest=True)
    check_coverage(report, NEWER_TRITON_TARGETS, heaviest=True)
    assert report["heaviest"]
    import triton

    assert report["triton"]["version"] == triton.__version__


def test_kernels_compile_without_spills_on_triton_3_6(tmp_path):
    try:
        folder = aot.install_triton(OLD_TRITON)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"could not install Triton {OLD_TRITON} into {aot.side_triton_dir(OLD_TRITON)} "
                    f"(needs PyPI): {exc}")
    report = compile_everything(tmp_path, aot.side_env(folder), tuple(aot.TARGETS))
    check_coverage(report, tuple(aot.TARGETS))
    assert report["triton"]["version"] == OLD_TRITON
    assert Path(report["triton"]["path"]).resolve() == (folder / "triton").resolve()
