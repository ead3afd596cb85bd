"""Shared helpers for kernel tests: devices, dtypes, the tolerance table, NaN poisoning."""
from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# Triton's interpreter mishandles bf16 dot/arithmetic (design.md §6): bf16 is tested on a GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
# design.md §5: relative error vs the float64 reference. fp32 dots run as IEEE fp32 on a GPU too
# (ops._tuning.dot_precision), so fp32 is held to 1e-5 everywhere.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (bf16, realistic shapes, graphs)")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere makes it NaN, which fails any ≤ check."""
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm()).item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not out.isnan().any(), "output has NaN: an element was never written"
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]:.3g} for {dtype}"


def poisoned(shape, dtype, device=DEVICE) -> torch.Tensor:
    """An output buffer full of NaN, so any element a kernel fails to write fails the test."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def randn(*shape, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype=dtype, device=DEVICE)


def rand_quantized(*shape, fmt: str, group_size: int, scale: float = 1.0):
    """A random weight [..., N, K] quantized to ``fmt`` ("int4"/"int8") with ``group_size``,
    on DEVICE, and its float64 dequantization by the reference (the oracle's weight)."""
    import reference
    from d3kernels.quant import quantize

    w = quantize(torch.randn(*shape, dtype=torch.float64) * scale, fmt, group_size).to(DEVICE)
    return w, reference.dequantize(w)
