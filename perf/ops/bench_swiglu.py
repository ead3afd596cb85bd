"""pytest-benchmark suite (GPU only): the SwiGLU MLP with residual add vs eager, compile, Liger.

    python -m pytest perf/ops/bench_swiglu.py --benchmark-only [--benchmark-json=out.json]

``residual + (silu(x @ gate.T) * (x @ up.T)) @ down.T`` at Llama-2-7B (H 4096, I 11008) and
Llama-3-8B (H 4096, I 14336) shapes, bf16, decode batches 1, 8, 32 and a 2048-token prefill.
d3kernels runs ``swiglu_gate_up`` then ``down_residual`` (in place, into caller buffers). Each round
runs the MLP ``calls`` times then synchronizes (warm-up rounds first, median reported;
perf/ops/timing.py), so the table's times are per round; extra_info holds the per-call time,
achieved GB/s (weights plus activations), its fraction of a device-to-device copy measured in the
same run (perf/ops/conftest.py), and TFLOP/s.
Groups hold one shape, so the table's columns compare the implementations. Liger-Kernel's column
(its silu·mul kernel between torch matmuls) appears only where it is installed.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("GPU benchmark: needs CUDA", allow_module_level=True)

from d3kernels.ops.swiglu import down_residual, swiglu_gate_up  # noqa: E402
from perf.ops.timing import measure  # noqa: E402

try:
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction
except ImportError:
    LigerSiLUMulFunction = None

MODELS = {"llama2-7b": (4096, 11008), "llama3-8b": (4096, 14336)}
DTYPE = torch.bfloat16
IMPLS = ["d3kernels", "eager", "compile"] + (["liger"] if LigerSiLUMulFunction is not None
                                             else [])
# One compiled graph per (shape, model): keep dynamo from falling back to eager.
torch._dynamo.config.cache_size_limit = 64


@pytest.fixture(scope="module", params=list(MODELS))
def weights(request):
    """Stacked [2I, H] gate/up and [H, I] down weights at Llama scales (never zeros)."""
    H, inter = MODELS[request.param]
    torch.manual_seed(0)
    w_gate_up = torch.randn(2 * inter, H, device="cuda", dtype=DTYPE) * H ** -0.5
    w_down = torch.randn(H, inter, device="cuda", dtype=DTYPE) * inter ** -0.5
    return request.param, w_gate_up, w_down


def _impl(name: str, w_gate_up: torch.Tensor, w_down: torch.Tensor, h: torch.Tensor):
    """The MLP under test: (x, residual) -> residual + mlp(x)."""
    inter = w_down.shape[1]
    gate, up = w_gate_up[:inter], w_gate_up[inter:]
    if name == "d3kernels":
        def mlp(x, r):
            down_residual(swiglu_gate_up(x, w_gate_up, out=h), w_down, r)
            return r
        return mlp
    if name == "liger":
        return lambda x, r: LigerSiLUMulFunction.apply(x @ gate.T, x @ up.T) @ w_down.T + r

    def mlp(x, r):
        return (F.silu(x @ gate.T) * (x @ up.T)) @ w_down.T + r

    return torch.compile(mlp, dynamic=False) if name == "compile" else mlp


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("M", [1, 8, 32, 2048])
def test_swiglu_mlp(benchmark, copy_gbps, weights, impl, M):
    model, w_gate_up, w_down = weights
    H, inter = w_down.shape
    torch.manual_seed(M)
    x = torch.randn(M, H, device="cuda", dtype=DTYPE)
    r = torch.randn(M, H, device="cuda", dtype=DTYPE)
    fn = _impl(impl, w_gate_up, w_down, torch.empty(M, inter, device="cuda", dtype=DTYPE))
    # Weights, x read, h written and read back, residual read and written.
    nbytes = (3 * inter * H + 3 * M * H + 2 * M * inter) * x.element_size()
    benchmark.group = f"swiglu {model} M={M}"
    benchmark.extra_info.update(impl=impl, model=model, M=M, H=H, I=inter, dtype=str(DTYPE))
    measure(benchmark, lambda: fn(x, r), nbytes=nbytes, flops=6 * M * H * inter,
            copy_gbps=copy_gbps)
