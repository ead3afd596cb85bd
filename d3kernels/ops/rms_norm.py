"""RMSNorm, optionally fused with the residual add that precedes it in every Llama block, and the
normalize-on-load prologue that the GEMMs after a norm fold in instead of launching it.

One program per row. A row of up to ``MAX_BLOCK`` elements is held in registers and read once;
a longer one is walked in ``MAX_BLOCK`` chunks twice (sum of squares, then scale), the second
pass hitting L2.

The prologue (:func:`rms_rstd`, :func:`load_rows`, used by qkv_rope, swiglu_gate_up, lm_head and
kv_backfill): each GEMM program first walks its rows once for their rstd (x is a few rows at
decode, read from L2), then scales every x tile by rstd · weight as it loads it and rounds it to
x's dtype as this op stores its output, so the GEMM multiplies what rms_norm then the GEMM would
(up to the order of the sum of squares).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from d3kernels.ops._checks import FLOAT_DTYPES, check_launchable, check_rows, check_tensor
from d3kernels.ops._tuning import autotune

# Rows up to this length stay in registers (16 warps: 16 fp32 values per thread per live vector).
MAX_BLOCK = 8192


@triton.jit
def rms_rstd(x_rows, row_mask, H, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """1 / sqrt(mean(x²) + eps) in fp32 of the BLOCK_M rows starting at pointers ``x_rows`` (rows
    off ``row_mask`` read as zeros), walking H in BLOCK_K chunks."""
    sumsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        xk = tl.load(x_rows[:, None] + k[None, :], mask=row_mask[:, None] & (k < H)[None, :],
                     other=0.0).to(tl.float32)
        sumsq += tl.sum(xk * xk, axis=1)
    return tl.rsqrt(sumsq / H + eps)


@triton.jit
def load_rows(x_rows, k, row_mask, k_mask, rstd, nw_ptr, NORM: tl.constexpr):
    """The [BLOCK_M, BLOCK_K] GEMM operand x[rows, k] in x's dtype (masked entries 0). With NORM,
    RMS-normed on load: x · rstd · nw[k] in fp32, rounded to x's dtype as rms_norm stores it
    (``rstd`` from :func:`rms_rstd`; without NORM neither it nor ``nw_ptr`` is read)."""
    xk = tl.load(x_rows[:, None] + k[None, :], mask=row_mask[:, None] & k_mask[None, :],
                 other=0.0)
    if NORM:
        g = tl.load(nw_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
        xk = (xk.to(tl.float32) * rstd[:, None] * g[None, :]).to(x_rows.dtype.element_ty)
    return xk


@autotune(
    [triton.Config({}, num_warps=w) for w in (4, 8, 16)],
    key=["BLOCK_H", "NUM_CHUNKS", "HAS_RESIDUAL"],
    # The residual update may be in place (res_out is res): each timing run must see the original.
    restore_value=["res_out_ptr"],
)
@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, rows_ptr,
                     H, stride_x, stride_res, stride_out, stride_res_out, eps,
                     HAS_RESIDUAL: tl.constexpr, HAS_ROWS: tl.constexpr,
                     BLOCK_H: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    pid = tl.program_id(0)
    if HAS_ROWS:
        row = tl.load(rows_ptr + pid).to(tl.int64)
        if row < 0:  # a padding slot of a fixed-size row list
            return
    else:
        row = pid.to(tl.int64)
    x_row = x_ptr + row * stride_x
    out_row = out_ptr + row * stride_out
    if HAS_RESIDUAL:  # res_ptr is None otherwise
        res_row = res_ptr + row * stride_res
        res_out_row = res_out_ptr + row * stride_res_out
    cols = tl.arange(0, BLOCK_H)

    if NUM_CHUNKS == 1:
        mask = cols < H
        s = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            s += tl.load(res_row + cols, mask=mask, other=0.0).to(tl.float32)
            s_stored = s.to(res_out_ptr.dtype.element_ty)
            tl.store(res_out_row + cols, s_stored, mask=mask)
            # Normalize the residual as stored, i.e. what the next layer will add to.
            s = s_stored.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(s * s, axis=0) / H + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_row + cols, (s * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        sq = tl.zeros([BLOCK_H], dtype=tl.float32)
        for c in range(NUM_CHUNKS):
            offs = c * BLOCK_H + cols
            mask = offs < H
            s = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                s += tl.load(res_row + offs, mask=mask, other=0.0).to(tl.float32)
                s_stored = s.to(res_out_ptr.dtype.element_ty)
                tl.store(res_out_row + offs, s_stored, mask=mask)
                s = s_stored.to(tl.float32)
            sq += s * s
        rstd = tl.rsqrt(tl.sum(sq, axis=0) / H + eps)
        # The second pass re-reads the stored residual (or x, which out may alias): make the
        # first pass's stores visible to every thread of the program.
        tl.debug_barrier()
        for c in range(NUM_CHUNKS):
            offs = c * BLOCK_H + cols
            mask = offs < H
            if HAS_RESIDUAL:
                s = tl.load(res_out_row + offs, mask=mask, other=0.0).to(tl.float32)
            else:
                s = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_row + offs, (s * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


def check_eps(eps) -> None:
    """The RMSNorm epsilon: a number >= 0 (NaN refused)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")


def check_norm(norm_weight, eps, hidden: int, dtype: torch.dtype, device: torch.device) -> None:
    """The arguments of a GEMM's fused norm prologue: ``norm_weight`` None or [hidden] of the
    input's dtype, ``eps`` a number >= 0."""
    if norm_weight is not None:
        check_tensor("norm_weight", norm_weight, shape=(hidden,), dtype=dtype, device=device)
    check_eps(eps)


def _launch(x, weight, eps, residual, rows, out, residual_out, max_block: int = MAX_BLOCK) -> None:
    """Launch over the active rows; ``max_block`` below MAX_BLOCK lets tests force chunking."""
    M, H = x.shape
    n_rows = M if rows is None else rows.numel()
    if n_rows == 0 or H == 0:
        return
    block = min(triton.next_power_of_2(H), max_block)
    has_res = residual is not None
    _rms_norm_kernel[(n_rows,)](
        x, residual, weight, out,
        # Without a residual the slot is never touched; out stands in so the autotuner's
        # restore_value has a tensor to save.
        residual_out if has_res else out, rows,
        H, x.stride(0), residual.stride(0) if has_res else 0, out.stride(0),
        residual_out.stride(0) if has_res else 0, eps,
        HAS_RESIDUAL=has_res, HAS_ROWS=rows is not None,
        BLOCK_H=block, NUM_CHUNKS=triton.cdiv(H, block),
    )


@torch.library.custom_op("d3kernels::rms_norm", mutates_args=("out", "residual_out"))
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: Optional[torch.Tensor], rows: Optional[torch.Tensor],
                 out: torch.Tensor, residual_out: Optional[torch.Tensor]) -> None:
    _launch(x, weight, eps, residual, rows, out, residual_out)


@_rms_norm_op.register_fake
def _(x, weight, eps, residual, rows, out, residual_out) -> None:
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None, *, rows: torch.Tensor | None = None,
             out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm of x, or of ``x + residual`` with the sum returned as the new residual.

    x: [M, H] fp32/fp16/bf16 (rows may be strided, the last dim must be dense); weight: [H], any
    float dtype; eps: float >= 0.
    Without residual: ``out = x / sqrt(mean(x²) + eps) * weight``; returns ``(out, None)``.
    With residual [M, H] (x's dtype): ``s = x + residual`` is added in fp32 and stored in x's
    dtype into ``residual_out`` (which may be ``residual`` itself, for the in-place update of the
    decode step); ``out`` is the norm of the stored ``s``. Returns ``(out, residual_out)``.
    rows: None or int32 [R] of distinct row indices: only those rows are read and written; the
    other rows of ``out``/``residual_out`` keep what they held (uninitialized in buffers this
    function allocates). out, residual_out: optional [M, H] buffers of x's dtype; passing both
    makes the call allocation-free (CUDA-graph capturable). Accumulates in fp32.
    """
    check_tensor("x", x, ndim=2, dtype=FLOAT_DTYPES)
    M, H = x.shape
    dev = x.device
    check_tensor("weight", weight, shape=(H,), dtype=FLOAT_DTYPES, device=dev)
    check_eps(eps)
    if residual is not None:
        check_tensor("residual", residual, shape=(M, H), dtype=x.dtype, device=dev)
    elif residual_out is not None:
        raise ValueError("residual_out is given but residual is None: there is no sum to store")
    if out is not None:
        check_tensor("out", out, shape=(M, H), dtype=x.dtype, device=dev)
    if residual_out is not None:
        check_tensor("residual_out", residual_out, shape=(M, H), dtype=x.dtype, device=dev)
        if residual_out is out:
            raise ValueError("out and residual_out must be different tensors")
    check_rows(rows, M, dev)
    check_launchable(x)
    if out is None:
        out = torch.empty((M, H), dtype=x.dtype, device=dev)
    if residual is not None and residual_out is None:
        residual_out = torch.empty((M, H), dtype=x.dtype, device=dev)
    torch.ops.d3kernels.rms_norm(x, weight, float(eps), residual, rows, out, residual_out)
    return out, residual_out
