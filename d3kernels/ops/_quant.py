"""Weight operands of the projection kernels: float, or weight-only int8/int4 dequantized in
registers (the formats: d3kernels/quant.py).

Every projection kernel (qkv_rope, swiglu_gate_up, down_residual, lm_head, kv_backfill) loads
its weight tiles through :func:`load_weight_tile` with a ``WFMT`` constexpr, so a quantized
variant is the same kernel compiled for another format: same ``rows=`` handling, same norm
prologue and epilogues, one code path per op. On the host, :func:`weight_operand` checks a
weight and splits it into the kernel's arguments.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from d3kernels.ops._checks import check_tensor
from d3kernels.quant import QuantizedWeight

WFMT_FLOAT, WFMT_INT8, WFMT_INT4 = 0, 1, 2


class WeightOperand(NamedTuple):
    """What a kernel takes for one weight: data (float [..., N, K] | int8 [..., N, K] | uint8
    [..., N, K/2]), scale and offset (float16 [..., N, K/G], or data itself as an unread
    placeholder), the group size G (1 for a float weight: unused) and the WFMT constexpr."""

    data: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    group: int
    wfmt: int


def weight_operand(name: str, w, shape: tuple, dtype: torch.dtype,
                   device: torch.device) -> WeightOperand:
    """Check ``w`` (a float tensor of ``dtype`` or a QuantizedWeight) against ``shape`` (None:
    any size) and ``device``; raise ValueError naming ``name`` otherwise."""
    if isinstance(w, QuantizedWeight):
        if len(w.shape) != len(shape) or any(s is not None and s != d
                                             for s, d in zip(shape, w.shape)):
            want = ["*" if s is None else s for s in shape]
            raise ValueError(f"{name} must have shape {want}, got {list(w.shape)}")
        if w.device != device:
            raise ValueError(f"{name} must be on {device}, got {w.device}")
        for part, t in (("data", w.data), ("scale", w.scale), ("offset", w.offset)):
            if t is not None and t.numel() and t.stride(-1) != 1:
                raise ValueError(f"{name}.{part} must be contiguous in its last dimension")
        if w.offset is not None and w.offset.stride() != w.scale.stride():
            raise ValueError(f"{name}: scale and offset must share strides (one stride is "
                             f"passed for both)")
        fmt = WFMT_INT4 if w.fmt == "int4" else WFMT_INT8
        return WeightOperand(w.data, w.scale, w.offset if w.offset is not None else w.scale,
                             w.group_size, fmt)
    check_tensor(name, w, shape=shape, dtype=dtype, device=device)
    return WeightOperand(w, w, w, 1, WFMT_FLOAT)  # one GROUP for every float K: one compile


@triton.jit
def load_weight_tile(w_ptr, s_ptr, o_ptr, offs_k, offs_n, mask, stride_w, stride_s,
                     GROUP: tl.constexpr, WFMT: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] tile w[offs_n, offs_k]ᵀ of a row-major [N, K] weight as fp32
    (float weights: in their own dtype), masked entries 0.

    w_ptr/s_ptr/o_ptr point at the matrix's data, scale and offset; stride_w is the data's row
    stride in elements (bytes for int4: K/2 per row when dense), stride_s the scales' row stride.
    int8: q · scale; int4: u · scale + offset, u the nibble of byte k // 2 (low for even k).
    """
    n = offs_n[None, :].to(tl.int64)
    k = offs_k[:, None]
    # One return: Triton compiles the statements after an early return too, and a 16-bit float
    # tile and the fp32 dequantized one would be a return type mismatch.
    if WFMT == 0:
        tile = tl.load(w_ptr + n * stride_w + k, mask=mask, other=0.0)
    else:
        g = k // GROUP
        scale = tl.load(s_ptr + n * stride_s + g, mask=mask, other=0.0).to(tl.float32)
        if WFMT == 1:
            q = tl.load(w_ptr + n * stride_w + k, mask=mask, other=0).to(tl.float32)
            tile = q * scale
        else:
            byte = tl.load(w_ptr + n * stride_w + k // 2, mask=mask, other=0).to(tl.int32)
            u = (byte >> ((k & 1) * 4)) & 15
            offset = tl.load(o_ptr + n * stride_s + g, mask=mask, other=0.0).to(tl.float32)
            tile = u.to(tl.float32) * scale + offset
    return tile
