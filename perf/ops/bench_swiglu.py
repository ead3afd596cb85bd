"""pytest-benchmark suite (GPU only): a decode layer's MLP and O projection vs eager, compile, Liger.

    python -m pytest perf/ops/bench_swiglu.py --benchmark-only [--benchmark-json=out.json]

MLP: ``r + (silu(h @ gate.T) * (h @ up.T)) @ down.T`` with ``h = rms_norm(r)``, at Llama-2-7B
(H 4096, I 11008) and, marked ``extra``, Llama-3-8B (H 4096, I 14336) shapes, bf16, decode
batches 1, 8, 32 and (``extra``) a 2048-token prefill. d3kernels runs
``swiglu_gate_up(r, norm_weight=...)`` (the norm in its prologue) then ``down_residual`` (in
place, into caller buffers): two launches. O projection: ``r + attn @ w_o.T`` (Llama-2-7B,
4096 x 4096), d3kernels' ``down_residual``. Each round runs the op ``calls`` times then
synchronizes (warm-up rounds first, median reported; perf/ops/timing.py), so the table's times
are per round; extra_info holds the per-call time, kernel launches, achieved GB/s (weights plus
activations), its fraction of a device-to-device copy measured in the same run
(perf/ops/conftest.py), and TFLOP/s. Groups hold one shape, so the table's columns compare the
implementations. Liger-Kernel's column (its silu·mul kernel between torch matmuls) appears only
where it is installed. ``test_swiglu_mlp_quantized`` and ``test_o_proj_quantized``: the same
shapes with weight-only int4 (group 128) or int8 (one scale per row) weights against the torch
composite on torch's own weight-only kernel where ``QuantizedWeight.prepare_torch`` has one for
CUDA, else dequantizing per call (extra_info ``torch_path`` says which); GB/s counts the
format's bytes (values, scales, offsets).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("GPU benchmark: needs CUDA", allow_module_level=True)

from d3kernels.ops.swiglu import down_residual, swiglu_gate_up  # noqa: E402
from d3kernels.quant import linear, quantize  # noqa: E402
from perf.ops.timing import OURS, measure  # noqa: E402

try:
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction
except ImportError:
    LigerSiLUMulFunction = None

MODELS = {"llama2-7b": (4096, 11008), "llama3-8b": (4096, 14336)}
DTYPE, EPS = torch.bfloat16, 1e-5
IMPLS = [OURS, "eager", "compile"] + (["liger"] if LigerSiLUMulFunction is not None else [])
M_PARAMS = [1, 8, 32, pytest.param(2048, marks=pytest.mark.extra)]
# Quantized weights: batch 8 is extra too (the GPU check times batch 1 and 32, within its budget).
QUANT_M_PARAMS = [1, pytest.param(8, marks=pytest.mark.extra), 32,
                  pytest.param(2048, marks=pytest.mark.extra)]
GROUP = {"int4": 128, "int8": None}  # int8: quantize's default, one group per row (G = K)


@pytest.fixture(scope="module",
                params=["llama2-7b", pytest.param("llama3-8b", marks=pytest.mark.extra)])
def weights(request):
    """Stacked [2I, H] gate/up and [H, I] down weights and an [H] norm weight at Llama scales
    (never zeros)."""
    H, inter = MODELS[request.param]
    torch.manual_seed(0)
    w_gate_up = torch.randn(2 * inter, H, device="cuda", dtype=DTYPE) * H ** -0.5
    w_down = torch.randn(H, inter, device="cuda", dtype=DTYPE) * inter ** -0.5
    norm = torch.rand(H, device="cuda", dtype=DTYPE) + 0.5
    return request.param, w_gate_up, w_down, norm


@pytest.fixture(scope="module", params=["int4", "int8"])
def quantized(request, weights):
    """The MLP's weights quantized to ``fmt`` (see GROUP), each prepared for torch's own
    weight-only kernel where it has one; and the torch paths taken."""
    model, w_gate_up, w_down, norm = weights
    fmt = request.param
    w_gate_up, w_down = (quantize(w, fmt, GROUP[fmt]) for w in (w_gate_up, w_down))
    paths = sorted({w.prepare_torch(DTYPE) for w in (w_gate_up, w_down)})
    return model, fmt, w_gate_up, w_down, norm, "+".join(paths)


def _mlp(name: str, w_gate_up: torch.Tensor, w_down: torch.Tensor, norm: torch.Tensor,
         h: torch.Tensor):
    """The MLP under test: r -> r + mlp(rms_norm(r)) (d3kernels: r updated in place)."""
    H, inter = w_down.shape
    gate, up = w_gate_up[:inter], w_gate_up[inter:]
    if name == OURS:
        def mlp(r):
            down_residual(swiglu_gate_up(r, w_gate_up, out=h, norm_weight=norm, eps=EPS),
                          w_down, r)
            return r
        return mlp
    if name == "liger":
        def mlp(r):
            x = F.rms_norm(r, (H,), norm, EPS)
            return LigerSiLUMulFunction.apply(x @ gate.T, x @ up.T) @ w_down.T + r
        return mlp

    def mlp(r):
        x = F.rms_norm(r, (H,), norm, EPS)
        return (F.silu(x @ gate.T) * (x @ up.T)) @ w_down.T + r

    return torch.compile(mlp, dynamic=False) if name == "compile" else mlp


def _quantized_mlp(name: str, w_gate_up, w_down, norm: torch.Tensor, h: torch.Tensor):
    """The MLP on QuantizedWeights: d3kernels' two launches, or the torch composite (one
    weight-only linear over the stacked gate/up rows)."""
    if name == OURS:
        return _mlp(OURS, w_gate_up, w_down, norm, h)
    H, inter = w_down.shape

    def mlp(r):
        gate, up = linear(F.rms_norm(r, (H,), norm, EPS), w_gate_up).split(inter, dim=-1)
        return linear(F.silu(gate) * up, w_down) + r

    return mlp


def _bench_mlp(benchmark, copy_gbps, model, fn, w_gate_up, w_down, impl, M, fmt=None):
    H, inter = w_down.shape
    torch.manual_seed(M)
    r = torch.randn(M, H, device="cuda", dtype=DTYPE)
    # Weights read: the format's own bytes (values, scales, offsets) when quantized.
    w_bytes = sum(w.nbytes if fmt else w.numel() * w.element_size() for w in (w_gate_up, w_down))
    # Weights and norm weight, r read (norm), h written and read back, r read and written.
    nbytes = w_bytes + (H + 3 * M * H + 2 * M * inter) * r.element_size()
    benchmark.group = f"swiglu_mlp {model} M={M}" + (f" {fmt}" if fmt else "")
    benchmark.extra_info.update(impl=impl, model=model, M=M, H=H, I=inter, dtype=str(DTYPE),
                                weights=fmt or str(DTYPE))
    measure(benchmark, lambda: fn(r), nbytes=nbytes, flops=6 * M * H * inter,
            copy_gbps=copy_gbps)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("M", M_PARAMS)
def test_swiglu_mlp(benchmark, copy_gbps, weights, impl, M):
    model, w_gate_up, w_down, norm = weights
    inter = w_down.shape[1]
    fn = _mlp(impl, w_gate_up, w_down, norm, torch.empty(M, inter, device="cuda", dtype=DTYPE))
    _bench_mlp(benchmark, copy_gbps, model, fn, w_gate_up, w_down, impl, M)


@pytest.mark.parametrize("impl", [OURS, "eager"])
@pytest.mark.parametrize("M", QUANT_M_PARAMS)
def test_swiglu_mlp_quantized(benchmark, copy_gbps, quantized, impl, M):
    model, fmt, w_gate_up, w_down, norm, torch_path = quantized
    inter = w_down.shape[1]
    fn = _quantized_mlp(impl, w_gate_up, w_down, norm,
                        torch.empty(M, inter, device="cuda", dtype=DTYPE))
    benchmark.extra_info.update(group_size=w_down.group_size, torch_path=torch_path)
    _bench_mlp(benchmark, copy_gbps, model, fn, w_gate_up, w_down, impl, M, fmt)


def _bench_o_proj(benchmark, copy_gbps, impl, M, fmt=None):
    """Time ``impl`` on r + attn @ w_o.T; ``fmt``: w_o quantized to "int4"/"int8" (None: bf16)."""
    H = 4096
    torch.manual_seed(M)
    w_o = torch.randn(H, H, device="cuda", dtype=DTYPE) * H ** -0.5
    w_bytes = w_o.numel() * w_o.element_size()
    if fmt is not None:
        w_o = quantize(w_o, fmt, GROUP[fmt])
        w_bytes = w_o.nbytes
        benchmark.extra_info.update(group_size=w_o.group_size,
                                    torch_path=w_o.prepare_torch(DTYPE))
    attn = torch.randn(M, H, device="cuda", dtype=DTYPE)
    r = torch.randn(M, H, device="cuda", dtype=DTYPE)
    if impl == OURS:
        def fn():
            down_residual(attn, w_o, r)
    else:
        def o_proj(a, res):
            return res + linear(a, w_o)

        op = torch.compile(o_proj, dynamic=False) if impl == "compile" else o_proj

        def fn():
            op(attn, r)
    # Weight, attention output read, residual read and written.
    nbytes = w_bytes + 3 * M * H * r.element_size()
    benchmark.group = f"o_proj llama2-7b M={M}" + (f" {fmt}" if fmt else "")
    benchmark.extra_info.update(impl=impl, model="llama2-7b", M=M, H=H, dtype=str(DTYPE),
                                weights=fmt or str(DTYPE))
    measure(benchmark, fn, nbytes=nbytes, flops=2 * M * H * H, copy_gbps=copy_gbps)


@pytest.mark.parametrize("impl", [OURS, "eager", "compile"])
@pytest.mark.parametrize("M", M_PARAMS)
def test_o_proj(benchmark, copy_gbps, impl, M):
    _bench_o_proj(benchmark, copy_gbps, impl, M)


@pytest.mark.parametrize("impl", [OURS, "eager"])
@pytest.mark.parametrize("M", QUANT_M_PARAMS)
@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_o_proj_quantized(benchmark, copy_gbps, fmt, impl, M):
    _bench_o_proj(benchmark, copy_gbps, impl, M, fmt)
