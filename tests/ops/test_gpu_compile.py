"""Every Triton kernel in d3kernels/ops compiles for a Hopper GPU (sm90), with no GPU here.

Triton's interpreter, which runs every other kernel test on a CPU, never compiles a kernel, so a
GPU-only compile error passes them all: load_weight_tile's early return was a "return type
mismatch" for fp16/bf16 float weights on any GPU, and no CPU test saw it. The compiles run in one
subprocess without TRITON_INTERPRET (tests/ops/gpu_compile_worker.py: the variants, and how far
each is compiled): each kernel in each weight format (projections: float, int8, int4) and
activation dtype (bf16, fp16, fp32), with its first autotune config, in one or two settings of
its flags. Skipped, with the reason, only where triton cannot compile a one-line kernel for sm90
(no NVIDIA backend, no working ptxas); a kernel that fails to compile fails its case.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ops.gpu_compile_worker import EARLY_RETURN_ENV, KERNELS, group_name, groups

ROOT = Path(__file__).resolve().parents[2]
CASES = [(kernel, group_name(*g)) for kernel, spec in KERNELS.items() for g in groups(spec)]


def _compile(kernels: list[str], **env: str) -> list[dict]:
    """The worker's per-variant results for ``kernels`` (a skip where nothing can compile)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    proc = subprocess.run([sys.executable, "-m", "tests.ops.gpu_compile_worker", *kernels],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode or not proc.stdout.strip():
        pytest.fail(f"gpu_compile_worker exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if "unavailable" in out:
        pytest.skip(out["unavailable"])
    return out["results"]


def _failures(results: list[dict], kernel: str, group: str) -> list[str]:
    mine = [r for r in results if r["kernel"] == kernel and r["group"] == group]
    assert mine, f"the worker compiled no variant of {kernel} {group}"
    return [f"{r['mode']}: {r['error']}" for r in mine if not r["ok"]]


@pytest.fixture(scope="module")
def compiled(request) -> list[dict]:
    """One worker run for the kernels of the selected cases (all of them unless -k narrows)."""
    chosen = {item.callspec.params["kernel"] for item in request.session.items
              if item.module is request.module and hasattr(item, "callspec")
              and "kernel" in item.callspec.params}
    return _compile([k for k in KERNELS if k in chosen])


@pytest.mark.parametrize("kernel,group", CASES, ids=[f"{k}-{g}" for k, g in CASES])
def test_compiles_for_sm90(compiled, kernel, group):
    failed = _failures(compiled, kernel, group)
    assert not failed, f"{kernel} ({group}) does not compile for sm90:\n" + "\n".join(failed)


def test_every_kernel_is_compiled():
    """A kernel added to d3kernels/ops (a jit function named *_kernel) gets a KERNELS entry."""
    found = {(path.stem, name) for path in (ROOT / "d3kernels" / "ops").glob("*.py")
             for name in re.findall(r"^def (\w+_kernel)\(", path.read_text(), re.M)}
    assert found == {(spec.module, spec.name) for spec in KERNELS.values()}


def test_catches_the_early_return_in_load_weight_tile():
    """The check fails on the bug it was written for: with load_weight_tile's early-return form
    (before 7e3535c), the fp16/bf16 float weights fail with a return type mismatch, and only
    they."""
    results = _compile(["down_residual"], **{EARLY_RETURN_ENV: "1"})
    failed = {g: _failures(results, "down_residual", g)
              for g in (group_name(*g) for g in groups(KERNELS["down_residual"]))}
    assert {g for g, f in failed.items() if f} == {"float-bf16", "float-fp16"}
    for g in ("float-bf16", "float-fp16"):
        assert all("return type" in f.lower() for f in failed[g]), failed[g]
