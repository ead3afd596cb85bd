"""pytest-benchmark suite (GPU only): residual-add + RMSNorm vs torch eager, torch.compile, Liger.

    python -m pytest perf/ops/bench_rms_norm.py --benchmark-only [--benchmark-json=out.json]

Llama-2-7B / Llama-3-8B hidden size (4096), bf16, decode batches 1, 8, 32 and, marked ``extra``,
a 2048-token prefill, plain and with the in-place residual update of the decode hot path. Each
round runs the op ``calls`` times then synchronizes (warm-up rounds first, median reported;
perf/ops/timing.py), so the table's times are per round; extra_info holds the per-call time,
kernel launches, achieved GB/s and its fraction of a device-to-device copy measured in the same
run (perf/ops/conftest.py). Groups hold one shape, so the table's columns compare the
implementations. Liger-Kernel's column appears only where it is installed.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("GPU benchmark: needs CUDA", allow_module_level=True)

from d3kernels.ops.rms_norm import rms_norm  # noqa: E402
from perf.ops.timing import OURS, measure  # noqa: E402

try:
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
except ImportError:
    LigerRMSNorm = None

H, EPS, DTYPE = 4096, 1e-5, torch.bfloat16
IMPLS = [OURS, "eager", "compile"] + (["liger"] if LigerRMSNorm is not None else [])


def _impl(name: str, residual: bool, weight: torch.Tensor, out: torch.Tensor):
    """The op under test: (x, r) -> normed output, adding x into r in place where residual."""
    if name == OURS:
        if residual:
            return lambda x, r: rms_norm(x, weight, EPS, r, out=out, residual_out=r)[0]
        return lambda x, r: rms_norm(x, weight, EPS, out=out)[0]
    if name == "liger":
        mod = LigerRMSNorm(H, eps=EPS).to(device="cuda", dtype=DTYPE)
        mod.weight.data.copy_(weight)
        norm = mod
    else:
        def norm(s):
            return F.rms_norm(s, (H,), weight, EPS)

    def add_norm(x, r):
        return norm(r.add_(x)) if residual else norm(x)

    return torch.compile(add_norm, dynamic=False) if name == "compile" else add_norm


@pytest.mark.parametrize("impl", IMPLS)
# The check times add_norm, the standalone norm a decode step still runs; plain norm is extra.
@pytest.mark.parametrize("residual", [pytest.param(False, marks=pytest.mark.extra), True],
                         ids=["norm", "add_norm"])
@pytest.mark.parametrize("M", [1, 8, 32, pytest.param(2048, marks=pytest.mark.extra)])
def test_rms_norm(benchmark, copy_gbps, impl, residual, M):
    torch.manual_seed(M)
    x = torch.randn(M, H, device="cuda", dtype=DTYPE)
    r = torch.randn(M, H, device="cuda", dtype=DTYPE)
    weight = 1 + 0.1 * torch.randn(H, device="cuda", dtype=DTYPE)
    fn = _impl(impl, residual, weight, torch.empty_like(x))
    # Minimal traffic: x (+ residual read and written) read, out written, weight read.
    nbytes = ((4 if residual else 2) * M * H + H) * x.element_size()
    benchmark.group = f"rms_norm H={H} M={M} {'add_norm' if residual else 'norm'}"
    benchmark.extra_info.update(impl=impl, M=M, H=H, residual=residual, dtype=str(DTYPE))
    measure(benchmark, lambda: fn(x, r), nbytes=nbytes, copy_gbps=copy_gbps)
