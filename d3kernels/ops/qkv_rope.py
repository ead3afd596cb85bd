"""QKV projection with rotate-half RoPE in the epilogue and K/V written straight into the cache.

One launch computes ``x @ w_qkv.T`` for every token of the active rows (optionally RMS-normalizing
x on load, so the layer's input norm needs no launch of its own), rotates Q and K, returns Q and
stores K and V at each token's slot of the paged cache (its page looked up in the row's block
table, one index load per token). The rotation pairs column i of a head with
column i + D/2, so a program owns matching column blocks of both halves of one head (two
accumulators) and can rotate them without seeing any other program's output. The weight may be
float or weight-only int8/int4, dequantized tile by tile in registers (d3kernels/ops/_quant.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from d3kernels.ops._checks import (FLOAT_DTYPES, check_block_table, check_launchable,
                                   check_page_size, check_rows, check_tensor)
from d3kernels.ops._quant import load_weight_tile, weight_operand
from d3kernels.ops._tuning import (HALF_HEAD_CONFIGS, autotune, dot_precision, m_bucket,
                                   prune_half_head)
from d3kernels.ops.rms_norm import check_norm, load_rows, rms_rstd
from d3kernels.quant import QuantizedWeight

# BLOCK_HALF columns of each half of a head per program: all the shared configs, decode
# (BLOCK_M 16, 32) and prefill (64, 128) tiles; the first one is also the interpreter's.
_CONFIGS = HALF_HEAD_CONFIGS


@triton.jit
def rope_rotate_half(acc_lo, acc_hi, cos_ptr, sin_ptr, pos, cols, stride_cos, stride_sin, HALF,
                     mask):
    """Rotate-half RoPE of a [BLOCK_M, BLOCK_HALF] tile pair, columns ``cols`` of the low and high
    half of one head at positions ``pos``: out[i] = x[i] cos[i] - x[i+D/2] sin[i],
    out[i+D/2] = x[i+D/2] cos[i+D/2] + x[i] sin[i+D/2]. Also kv_backfill's epilogue."""
    cos_row = cos_ptr + pos.to(tl.int64)[:, None] * stride_cos + cols[None, :]
    sin_row = sin_ptr + pos.to(tl.int64)[:, None] * stride_sin + cols[None, :]
    cos_lo = tl.load(cos_row, mask=mask, other=0.0).to(tl.float32)
    cos_hi = tl.load(cos_row + HALF, mask=mask, other=0.0).to(tl.float32)
    sin_lo = tl.load(sin_row, mask=mask, other=0.0).to(tl.float32)
    sin_hi = tl.load(sin_row + HALF, mask=mask, other=0.0).to(tl.float32)
    return acc_lo * cos_lo - acc_hi * sin_lo, acc_hi * cos_hi + acc_lo * sin_hi


@autotune(_CONFIGS, key=["M_BUCKET", "H", "HALF", "HAS_NORM", "WFMT", "GROUP"],
          prune_configs_by={"early_config_prune": prune_half_head})
@triton.jit
def _qkv_rope_kernel(
    x_ptr, nw_ptr, w_ptr, ws_ptr, wo_ptr, cos_ptr, sin_ptr, start_ptr, rows_ptr, q_ptr, k_ptr,
    v_ptr, bt_ptr,
    M, T, H, HALF, POS_LIMIT, eps,
    M_BUCKET,  # read only by the autotuner's key
    stride_xb, stride_xt, stride_wn, stride_sn, stride_cos, stride_sin,
    stride_qb, stride_qt, stride_qh,
    stride_cp, stride_cs, stride_ch, stride_btb,
    PAGE_SIZE: tl.constexpr,  # a power of two: page and offset are a shift and a mask
    NUM_HEADS: tl.constexpr, NUM_KV: tl.constexpr, HAS_ROWS: tl.constexpr,
    HAS_NORM: tl.constexpr, DOT_PRECISION: tl.constexpr, WFMT: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    half_blocks = tl.cdiv(HALF, BLOCK_HALF)
    head = pid_n // half_blocks  # over the Q heads, then the K heads, then the V heads
    cols = (pid_n % half_blocks) * BLOCK_HALF + tl.arange(0, BLOCK_HALF)
    col_mask = cols < HALF

    # Tokens of all active rows are flattened into M = R*T, so a decode batch shares one M tile
    # and reads the weights once.
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < M
    r = m // T
    t = m % T
    if HAS_ROWS:
        b = tl.load(rows_ptr + r, mask=m_mask, other=0)
        m_mask = m_mask & (b >= 0)  # -1: a padding slot of a fixed-size row list
    else:
        b = r
    b = b.to(tl.int64)
    pos = tl.load(start_ptr + b, mask=m_mask, other=0) + t

    n_lo = head * 2 * HALF + cols  # weight rows of the head's low half; + HALF: its high half
    x_row = x_ptr + b * stride_xb + t * stride_xt
    rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)  # read only with a norm
    if HAS_NORM:
        rstd = rms_rstd(x_row, m_mask, H, eps, BLOCK_M, BLOCK_K)
    acc_lo = tl.zeros((BLOCK_M, BLOCK_HALF), dtype=tl.float32)
    acc_hi = tl.zeros((BLOCK_M, BLOCK_HALF), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < H
        xk = load_rows(x_row, k, m_mask, k_mask, rstd, nw_ptr, HAS_NORM)
        w_mask = k_mask[:, None] & col_mask[None, :]
        w_lo = load_weight_tile(w_ptr, ws_ptr, wo_ptr, k, n_lo, w_mask, stride_wn, stride_sn,
                                GROUP, WFMT)
        w_hi = load_weight_tile(w_ptr, ws_ptr, wo_ptr, k, n_lo + HALF, w_mask, stride_wn,
                                stride_sn, GROUP, WFMT)
        acc_lo = tl.dot(xk, w_lo.to(xk.dtype), acc_lo, input_precision=DOT_PRECISION)
        acc_hi = tl.dot(xk, w_hi.to(xk.dtype), acc_hi, input_precision=DOT_PRECISION)

    # RoPE on Q and K heads; V heads pass through.
    # A position past the cache or the tables is the caller's bug; masking keeps memory safe.
    tile_mask = m_mask[:, None] & col_mask[None, :] & ((pos >= 0) & (pos < POS_LIMIT))[:, None]
    rot_lo, rot_hi = rope_rotate_half(acc_lo, acc_hi, cos_ptr, sin_ptr, pos, cols, stride_cos,
                                      stride_sin, HALF, tile_mask)
    is_v = head >= NUM_HEADS + NUM_KV
    out_lo = tl.where(is_v, acc_lo, rot_lo)
    out_hi = tl.where(is_v, acc_hi, rot_hi)

    if head < NUM_HEADS:
        dst = q_ptr + (b * stride_qb + t * stride_qt + head * stride_qh)[:, None] + cols[None, :]
    else:
        # the token's page: block_table[b, pos // S]; -1 (no page) drops the write
        in_cache = m_mask & (pos >= 0) & (pos < POS_LIMIT)
        page = tl.load(bt_ptr + b * stride_btb + pos // PAGE_SIZE, mask=in_cache, other=-1)
        tile_mask = tile_mask & (page >= 0)[:, None]
        kv_head = (head - NUM_HEADS) % NUM_KV
        offs = (page.to(tl.int64) * stride_cp + (pos % PAGE_SIZE).to(tl.int64) * stride_cs
                + kv_head * stride_ch)[:, None] + cols[None, :]
        if is_v:
            dst = v_ptr + offs
        else:
            dst = k_ptr + offs
    tl.store(dst, out_lo.to(dst.dtype.element_ty), mask=tile_mask)
    tl.store(dst + HALF, out_hi.to(dst.dtype.element_ty), mask=tile_mask)


def _launch(x, w_qkv, w_scale, w_offset, group, wfmt, cos, sin, start, k_cache, v_cache,
            block_table, q_out, rows, num_heads, num_kv_heads, norm_weight, eps):
    B, T, H = x.shape
    R = B if rows is None else rows.shape[0]
    M = R * T
    head_dim = k_cache.shape[-1]
    if M == 0:
        return
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),  # noqa: E731
                         (num_heads + 2 * num_kv_heads)
                         * triton.cdiv(head_dim // 2, meta["BLOCK_HALF"]))
    _qkv_rope_kernel[grid](
        x, norm_weight, w_qkv, w_scale, w_offset, cos, sin, start,
        start if rows is None else rows, q_out, k_cache, v_cache, block_table,
        M, T, H, head_dim // 2, min(block_table.shape[1] * k_cache.shape[1], cos.shape[0]), eps,
        m_bucket(M, cap=256),
        x.stride(0), x.stride(1), w_qkv.stride(0), w_scale.stride(0), cos.stride(0),
        sin.stride(0),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        PAGE_SIZE=k_cache.shape[1], NUM_HEADS=num_heads, NUM_KV=num_kv_heads,
        HAS_ROWS=rows is not None,
        HAS_NORM=norm_weight is not None, DOT_PRECISION=dot_precision(x.dtype), WFMT=wfmt,
        GROUP=group,
    )


@torch.library.custom_op("d3kernels::qkv_rope", mutates_args=("k_cache", "v_cache", "q_out"))
def _qkv_rope_op(x: torch.Tensor, w_qkv: torch.Tensor, w_scale: torch.Tensor,
                 w_offset: torch.Tensor, group: int, wfmt: int, cos: torch.Tensor,
                 sin: torch.Tensor, start: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, block_table: torch.Tensor, q_out: torch.Tensor,
                 rows: Optional[torch.Tensor], num_heads: int, num_kv_heads: int,
                 norm_weight: Optional[torch.Tensor], eps: float) -> None:
    """w_qkv, w_scale, w_offset, group, wfmt: the weight as ``weight_operand`` splits it."""
    _launch(x, w_qkv, w_scale, w_offset, group, wfmt, cos, sin, start, k_cache, v_cache,
            block_table, q_out, rows, num_heads, num_kv_heads, norm_weight, eps)


@_qkv_rope_op.register_fake
def _(x, w_qkv, w_scale, w_offset, group, wfmt, cos, sin, start, k_cache, v_cache, block_table,
      q_out, rows, num_heads, num_kv_heads, norm_weight, eps):
    return None


def qkv_rope(x: torch.Tensor, w_qkv: torch.Tensor | QuantizedWeight, cos: torch.Tensor,
             sin: torch.Tensor, start: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor, block_table: torch.Tensor, *, num_heads: int,
             num_kv_heads: int,
             rows: torch.Tensor | None = None,
             q_out: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
             eps: float = 1e-5) -> torch.Tensor:
    """[RMSNorm +] Q/K/V projection + rotate-half RoPE + KV-cache write, one launch.

    Args:
        x: [B, T, H] fp32/fp16/bf16, the attention input: already RMS-normed, or the residual
            stream when ``norm_weight`` is given.
        w_qkv: [Q + 2K, H]: Q = num_heads*D query rows, then K = num_kv_heads*D key rows, then
            K value rows (the engine's ``w_qkv[j]``). A float tensor of x's dtype, or a
            QuantizedWeight (int8/int4, dequantized in registers and rounded to x's dtype
            before each dot) on x's device.
        cos, sin: [T_max', D] float RoPE tables (``d3kernels.model.rope_tables``; llama3 scaling
            already folded in), rows indexed by cache position.
        start: int32 [B], cache position of x[b, 0]; token t of row b sits at start[b] + t.
        k_cache, v_cache: [P, S, num_kv_heads, D], x's dtype, one layer of the stacked paged
            cache (``cache.k[j]``; a strided view is fine, the last dim dense; both must have
            the same strides); S, the page size, a power of two. K (rotated) and V of token t
            of row b (position p = start[b] + t) are written at
            ``[block_table[b, p // S], p % S]``; nothing else is touched. Positions must be
            < min(NP*S, T_max'): tokens past that, or behind a -1 page, are not written.
        block_table: int32 [B, NP], on x's device: row b's pages in position order, -1 for
            none (values checked in [-1, P) with one host sync, except while a CUDA graph is
            being captured). Rows may share pages; two tokens must not write the same slot.
        num_heads, num_kv_heads: head counts (GQA allowed); D = k_cache.shape[-1], even.
        rows: None (all rows) or int32 [R] of distinct batch rows to process; other rows of the
            cache and of ``q_out`` are left as they were.
        q_out: optional [B, T, num_heads, D] buffer (x's dtype) for Q; allocated when None.
        norm_weight: None, or [H] in x's dtype, the layer's input-norm weight: each token is
            projected as ``rms_norm(x, norm_weight, eps)`` rounded to x's dtype (what
            ``rms_norm`` then this op without a norm computes), its rstd computed in-kernel.
        eps: the RMSNorm epsilon (>= 0), read only with ``norm_weight``.

    Returns:
        q [B, T, num_heads, D] with RoPE applied (``q_out`` when given; rows not processed hold
        whatever was there, uninitialized memory for a fresh buffer). fp32 accumulation; fp32
        inputs multiply in IEEE fp32 on a GPU too (no tf32).
    """
    check_tensor("x", x, ndim=3, dtype=FLOAT_DTYPES)
    B, T, H = x.shape
    dev, dt = x.device, x.dtype
    for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    check_tensor("k_cache", k_cache, ndim=4, dtype=dt, device=dev)
    D = k_cache.shape[-1]
    if D % 2:
        raise ValueError(f"k_cache: head_dim must be even for RoPE, got {D}")
    check_tensor("k_cache", k_cache, shape=(None, None, num_kv_heads, D))
    check_page_size("k_cache", k_cache)
    check_tensor("v_cache", v_cache, shape=tuple(k_cache.shape), dtype=dt, device=dev)
    if v_cache.stride() != k_cache.stride():
        raise ValueError(f"v_cache must have k_cache's strides {list(k_cache.stride())}, got "
                         f"{list(v_cache.stride())}")
    wq = weight_operand("w_qkv", w_qkv, ((num_heads + 2 * num_kv_heads) * D, H), dt, dev)
    check_tensor("cos", cos, shape=(None, D), dtype=FLOAT_DTYPES, device=dev)
    check_tensor("sin", sin, shape=tuple(cos.shape), dtype=FLOAT_DTYPES, device=dev)
    check_tensor("start", start, shape=(B,), dtype=torch.int32, device=dev)
    check_rows(rows, B, dev)
    check_norm(norm_weight, eps, H, dt, dev)
    check_block_table(block_table, B, k_cache.shape[0], dev)
    if q_out is None:
        q_out = torch.empty((B, T, num_heads, D), dtype=dt, device=dev)
    else:
        check_tensor("q_out", q_out, shape=(B, T, num_heads, D), dtype=dt, device=dev)
    check_launchable(x)
    _qkv_rope_op(x, *wq, cos, sin, start, k_cache, v_cache, block_table, q_out, rows,
                 num_heads, num_kv_heads, norm_weight, float(eps))
    return q_out
