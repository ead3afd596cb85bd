"""pytest-benchmark suite (GPU only): residual-add + RMSNorm vs torch eager, torch.compile, Liger.

    python -m pytest perf/ops/bench_rms_norm.py --benchmark-only [--benchmark-json=out.json]

Llama-2-7B / Llama-3-8B hidden size (4096), bf16, decode batches 1, 8, 32 and a 2048-token
prefill, plain and with the in-place residual update of the decode hot path. Each round runs the
op ``calls`` times then synchronizes (warm-up rounds first, median reported), so the table's times
are per round; extra_info holds the per-call time, achieved GB/s and its fraction of a
device-to-device copy measured in the same run. Groups hold one shape, so the table's columns
compare the implementations. Liger-Kernel's column appears only where it is installed.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("GPU benchmark: needs CUDA", allow_module_level=True)

from d3kernels.ops.rms_norm import rms_norm  # noqa: E402

try:
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
except ImportError:
    LigerRMSNorm = None

H, EPS, DTYPE = 4096, 1e-5, torch.bfloat16
IMPLS = ["d3kernels", "eager", "compile"] + (["liger"] if LigerRMSNorm is not None else [])
# One compiled graph per (shape, variant): keep dynamo from falling back to eager.
torch._dynamo.config.cache_size_limit = 64


@pytest.fixture(scope="module")
def copy_gbps() -> float:
    """Bandwidth of a 1 GiB device-to-device copy, bytes read + written, median of 20."""
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(23):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * 4 / sorted(times[3:])[10] / 1e9


def timed(benchmark, fn, nbytes: int, copy_gbps: float) -> None:
    """Warm up (compile, autotune), then rounds of enough calls to last ~2 ms, median."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    calls = max(1, min(200, int(2.0 / max(start.elapsed_time(end), 1e-3))))

    def run():
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=20, warmup_rounds=3)
    per_call = benchmark.stats.stats.median / calls
    gbps = nbytes / per_call / 1e9
    benchmark.extra_info.update(calls=calls, us=per_call * 1e6, GBps=gbps,
                                bw_fraction=gbps / copy_gbps, copy_GBps=copy_gbps)


def _impl(name: str, residual: bool, weight: torch.Tensor, out: torch.Tensor):
    """The op under test: (x, r) -> normed output, adding x into r in place where residual."""
    if name == "d3kernels":
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
@pytest.mark.parametrize("residual", [False, True], ids=["norm", "add_norm"])
@pytest.mark.parametrize("M", [1, 8, 32, 2048])
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
    timed(benchmark, lambda: fn(x, r), nbytes, copy_gbps)
