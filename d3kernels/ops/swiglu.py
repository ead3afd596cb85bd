"""The SwiGLU MLP as two fused GEMMs: gate/up with a silu·mul epilogue, down with a residual add.

``swiglu_gate_up``: each program computes the gate tile and the matching up tile of the same
columns, so the [M, 2I] projection never reaches memory; given the MLP's norm weight it also
RMS-normalizes x on load, so the norm needs no launch of its own. ``down_residual``: the
residual tile is read, added to in fp32 and written back in the epilogue. Either weight may be
float or weight-only int8/int4, dequantized tile by tile in registers (d3kernels/ops/_quant.py).

Decode (a few rows) is bound by reading the weight: one BLOCK_M tile covers the whole batch, so
each weight element is read once, and thin N tiles give enough programs to keep every SM
streaming. Prefill uses ordinary square-ish tiles. Rows are addressed through ``rows`` inside the
kernel (no gather/scatter copies).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from d3kernels.ops._checks import (FLOAT_DTYPES, check_block_table, check_launchable,
                                   check_page_size, check_rows, check_tensor)
from d3kernels.ops._quant import load_weight_tile, weight_operand
from d3kernels.ops._tuning import autotune, dot_precision, m_bucket
from d3kernels.ops.rms_norm import check_norm, load_rows, rms_rstd
from d3kernels.quant import QuantizedWeight


def _configs(decode, prefill):
    """Decode tiles (BLOCK_M 16, 32) first: the interpreter runs only the first config."""
    tiles = [(bm, *d) for bm in (16, 32) for d in decode] + prefill
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w,
                          num_stages=s) for bm, bn, bk, w, s in tiles]


# (BLOCK_N, BLOCK_K, warps, stages) for decode; (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) for
# prefill. gate_up holds two accumulators, so its prefill tiles are a size smaller than down's.
# Every 16-bit config's pipeline stays under Hopper's 227 KB of shared memory per block (fp32
# ones that do not fit are skipped by the autotuner).
_GATE_UP_CONFIGS = _configs(
    decode=[(64, 128, 4, 4), (32, 128, 4, 4), (32, 256, 4, 3), (64, 256, 4, 2), (16, 256, 4, 4)],
    prefill=[(64, 64, 64, 4, 4), (128, 64, 64, 8, 3), (64, 128, 64, 4, 3), (128, 128, 32, 8, 3),
             (128, 64, 32, 4, 4)],
)
_DOWN_CONFIGS = _configs(
    decode=[(64, 128, 4, 4), (32, 128, 4, 4), (32, 256, 4, 3), (16, 256, 4, 4), (16, 512, 4, 3)],
    prefill=[(64, 64, 64, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 64, 8, 3),
             (128, 256, 64, 8, 3)],
)


def _prune_by_rows(configs, named_args, **kwargs):
    """Decode tiles for up to 32 rows (a taller tile only multiplies masked-out zero rows, a
    shorter one rereads the weight), prefill tiles beyond. Falls back to all the configs given,
    which in the interpreter is the single first one."""
    bucket = named_args["M_BUCKET"]
    if bucket <= 32:
        keep = [c for c in configs if c.kwargs["BLOCK_M"] <= bucket]
    else:
        keep = [c for c in configs if 64 <= c.kwargs["BLOCK_M"] <= bucket]
    return keep or configs


@autotune(_GATE_UP_CONFIGS, key=["M_BUCKET", "N", "K", "HAS_NORM", "WFMT", "GROUP"],
          prune_configs_by={"early_config_prune": _prune_by_rows})
@triton.jit
def _gate_up_kernel(x_ptr, nw_ptr, w_ptr, ws_ptr, wo_ptr, out_ptr, rows_ptr, R, N, K, M_BUCKET,
                    eps, stride_x, stride_w, stride_s, stride_out,
                    HAS_ROWS: tl.constexpr, HAS_NORM: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    WFMT: tl.constexpr, GROUP: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # out[row, n] = silu(h · w[n]) * (h · w[N + n]) for the R active rows, h = x[row] or its
    # RMSNorm (HAS_NORM).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < R
    if HAS_ROWS:
        row = tl.load(rows_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        m_mask = m_mask & (row >= 0)  # -1: a padding slot of a fixed-size row list
    else:
        row = offs_m.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N

    x_rows = x_ptr + row * stride_x
    rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)  # read only with a norm
    if HAS_NORM:
        rstd = rms_rstd(x_rows, m_mask, K, eps, BLOCK_M, BLOCK_K)
    # The up rows start N rows into the row-major [2N, K] weight, and into its scales/offsets.
    wu_ptr = w_ptr + N * stride_w
    wsu_ptr = ws_ptr + N * stride_s
    wou_ptr = wo_ptr + N * stride_s
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        xt = load_rows(x_rows, offs_k, m_mask, k_mask, rstd, nw_ptr, HAS_NORM)
        w_mask = k_mask[:, None] & n_mask[None, :]
        wg = load_weight_tile(w_ptr, ws_ptr, wo_ptr, offs_k, offs_n, w_mask, stride_w, stride_s,
                              GROUP, WFMT)
        wu = load_weight_tile(wu_ptr, wsu_ptr, wou_ptr, offs_k, offs_n, w_mask, stride_w,
                              stride_s, GROUP, WFMT)
        acc_g = tl.dot(xt, wg.to(xt.dtype), acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(xt, wu.to(xt.dtype), acc_u, input_precision=DOT_PRECISION)

    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    out_ptrs = out_ptr + row[:, None] * stride_out + offs_n[None, :]
    tl.store(out_ptrs, h.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@autotune(_DOWN_CONFIGS, key=["M_BUCKET", "N", "K", "WFMT", "GROUP"],
          prune_configs_by={"early_config_prune": _prune_by_rows},
          # The residual is updated in place: each timing run must start from the original.
          restore_value=["res_ptr"])
@triton.jit
def _down_residual_kernel(h_ptr, w_ptr, ws_ptr, wo_ptr, res_ptr, rows_ptr, stash_ptr, sidx_ptr,
                          pos_ptr, bt_ptr, BT_COLS, R, N, K, M_BUCKET, stride_h, stride_w, stride_s,
                          stride_res, stride_ss, stride_sp, stride_st, stride_bt,
                          PAGE: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_STASH: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, WFMT: tl.constexpr, GROUP: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # res[row, n] += h[row] · w[n] for the R active rows (HAS_STASH: the sum also goes to
    # stash[sidx[row], page, pos[row] % PAGE, n] where sidx[row] >= 0, page the block table's
    # entry for pos[row]; none behind a -1 page).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < R
    if HAS_ROWS:
        row = tl.load(rows_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        m_mask = m_mask & (row >= 0)  # -1: a padding slot of a fixed-size row list
    else:
        row = offs_m.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N

    h_rows = h_ptr + row * stride_h
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        ht = tl.load(h_rows[:, None] + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                     other=0.0)
        wt = load_weight_tile(w_ptr, ws_ptr, wo_ptr, offs_k, offs_n,
                              k_mask[:, None] & n_mask[None, :], stride_w, stride_s, GROUP, WFMT)
        acc = tl.dot(ht, wt.to(ht.dtype), acc, input_precision=DOT_PRECISION)

    mask = m_mask[:, None] & n_mask[None, :]
    res_ptrs = res_ptr + row[:, None] * stride_res + offs_n[None, :]
    res = tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
    new = (res + acc).to(res_ptr.dtype.element_ty)
    tl.store(res_ptrs, new, mask=mask)
    if HAS_STASH:
        s = tl.load(sidx_ptr + row, mask=m_mask, other=-1).to(tl.int64)
        pos = tl.load(pos_ptr + row, mask=m_mask & (s >= 0), other=0)
        # a position outside the row's pages is the caller's bug: store nothing (as qkv_rope)
        in_row = (pos >= 0) & (pos < BT_COLS * PAGE)
        page = tl.load(bt_ptr + row * stride_bt + pos // PAGE, mask=m_mask & (s >= 0) & in_row,
                       other=-1).to(tl.int64)
        keep = (s >= 0) & (page >= 0)
        tl.store(stash_ptr + s[:, None] * stride_ss + page[:, None] * stride_sp
                 + (pos % PAGE).to(tl.int64)[:, None] * stride_st + offs_n[None, :], new,
                 mask=mask & keep[:, None])


def _m_bucket(n_rows: int) -> int:
    """Autotuning key for the row count: 16, 32, ..., 256, so decode batches up to 16 share one
    tuning and so do prefill lengths past 128."""
    return m_bucket(n_rows, cap=256, floor=16)


def _grid(n_rows: int, n: int):
    return lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))


@torch.library.custom_op("d3kernels::swiglu_gate_up", mutates_args=("out",))
def _gate_up_op(x: torch.Tensor, w_gate_up: torch.Tensor, w_scale: torch.Tensor,
                w_offset: torch.Tensor, group: int, wfmt: int, rows: Optional[torch.Tensor],
                out: torch.Tensor, norm_weight: Optional[torch.Tensor], eps: float) -> None:
    """w_gate_up, w_scale, w_offset, group, wfmt: the weight as ``weight_operand`` splits it."""
    n_rows = x.shape[0] if rows is None else rows.numel()
    inter, hidden = out.shape[1], x.shape[1]
    if n_rows == 0 or inter == 0:
        return
    _gate_up_kernel[_grid(n_rows, inter)](
        x, norm_weight, w_gate_up, w_scale, w_offset, out, rows, n_rows, inter, hidden,
        _m_bucket(n_rows), eps, x.stride(0), w_gate_up.stride(0), w_scale.stride(0),
        out.stride(0), HAS_ROWS=rows is not None, HAS_NORM=norm_weight is not None,
        DOT_PRECISION=dot_precision(x.dtype), WFMT=wfmt, GROUP=group)


@_gate_up_op.register_fake
def _(x, w_gate_up, w_scale, w_offset, group, wfmt, rows, out, norm_weight, eps) -> None:
    return None


@torch.library.custom_op("d3kernels::down_residual", mutates_args=("residual", "stash"))
def _down_residual_op(h: torch.Tensor, w_down: torch.Tensor, w_scale: torch.Tensor,
                      w_offset: torch.Tensor, group: int, wfmt: int, residual: torch.Tensor,
                      rows: Optional[torch.Tensor], stash: Optional[torch.Tensor],
                      stash_index: Optional[torch.Tensor], positions: Optional[torch.Tensor],
                      block_table: Optional[torch.Tensor]) -> None:
    """w_down, w_scale, w_offset, group, wfmt: the weight as ``weight_operand`` splits it."""
    n_rows = h.shape[0] if rows is None else rows.numel()
    hidden, inter = residual.shape[1], h.shape[1]
    if n_rows == 0 or hidden == 0:
        return
    has_stash = stash is not None
    _down_residual_kernel[_grid(n_rows, hidden)](
        h, w_down, w_scale, w_offset, residual, rows, stash, stash_index, positions, block_table,
        block_table.shape[1] if has_stash else 0, n_rows, hidden, inter, _m_bucket(n_rows),
        h.stride(0), w_down.stride(0), w_scale.stride(0), residual.stride(0),
        *(stash.stride()[:3] if has_stash else (0, 0, 0)),
        block_table.stride(0) if has_stash else 0, PAGE=stash.shape[2] if has_stash else 1,
        HAS_ROWS=rows is not None, HAS_STASH=has_stash, DOT_PRECISION=dot_precision(h.dtype),
        WFMT=wfmt, GROUP=group)


@_down_residual_op.register_fake
def _(h, w_down, w_scale, w_offset, group, wfmt, residual, rows, stash, stash_index,
      positions, block_table) -> None:
    return None


def swiglu_gate_up(x: torch.Tensor, w_gate_up: torch.Tensor | QuantizedWeight, *,
                   rows: torch.Tensor | None = None, out: torch.Tensor | None = None,
                   norm_weight: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """``out = silu(h @ gate.T) * (h @ up.T)`` with gate, up = w_gate_up[:I], w_gate_up[I:] and
    h = x, or ``rms_norm(x, norm_weight, eps)`` when ``norm_weight`` is given.

    x: [M, H] fp32/fp16/bf16 (rows may be strided, the last dim must be dense);
    w_gate_up: [2I, H], gate rows first then up rows (the engine's stacking): a float tensor of
    x's dtype, or a QuantizedWeight (int8/int4, its scales stacked alike) on x's device,
    dequantized in registers and rounded to x's dtype before each dot.
    rows: None or int32 [R] of distinct row indices: only those rows of x are read and of out
    written; the other rows of out keep what they held (uninitialized if allocated here).
    out: optional [M, I] buffer of x's dtype (allocation-free, CUDA-graph capturable).
    norm_weight: None, or [H] in x's dtype, the MLP's norm weight: h is normed in-kernel (rstd per
    row in fp32) and rounded to x's dtype, as ``rms_norm`` then this op without a norm computes.
    eps: the RMSNorm epsilon (>= 0), read only with ``norm_weight``.
    Returns out. fp32 accumulation; fp32 inputs multiply in IEEE fp32 on a GPU too (no tf32).
    """
    check_tensor("x", x, ndim=2, dtype=FLOAT_DTYPES)
    M, H = x.shape
    wq = weight_operand("w_gate_up", w_gate_up, (None, H), x.dtype, x.device)
    if w_gate_up.shape[0] % 2:
        raise ValueError(f"w_gate_up must stack gate and up rows ([2I, H]), got "
                         f"{w_gate_up.shape[0]} rows")
    inter = w_gate_up.shape[0] // 2
    if out is not None:
        check_tensor("out", out, shape=(M, inter), dtype=x.dtype, device=x.device)
    check_rows(rows, M, x.device)
    check_norm(norm_weight, eps, H, x.dtype, x.device)
    check_launchable(x)
    if out is None:
        out = torch.empty((M, inter), dtype=x.dtype, device=x.device)
    torch.ops.d3kernels.swiglu_gate_up(x, *wq, rows, out, norm_weight, float(eps))
    return out


def down_residual(h: torch.Tensor, w_down: torch.Tensor | QuantizedWeight,
                  residual: torch.Tensor, *, rows: torch.Tensor | None = None,
                  stash: torch.Tensor | None = None, stash_index: torch.Tensor | None = None,
                  positions: torch.Tensor | None = None,
                  block_table: torch.Tensor | None = None) -> None:
    """In place: ``residual += h @ w_down.T``, added in fp32 and stored in residual's dtype.

    h: [M, I] fp32/fp16/bf16; residual: [M, H], h's dtype (rows of h and residual may be
    strided, last dims dense); w_down: [H, I], a float tensor of h's dtype or a QuantizedWeight
    (int8/int4) on h's device, dequantized in registers and rounded to h's dtype before each
    dot. rows: None or int32 [R] of distinct row indices: only those rows of h are read and of
    residual updated; the others are left untouched.
    stash: optional [R, P, S, H] in h's dtype, paged like the KV cache (outer dims may be
    strided, e.g. KVCache.stash), with stash_index and positions, int32 [M], and block_table,
    int32 [M, NP] (docs/design.md §10): the updated residual row b is also stored at
    ``stash[stash_index[b], block_table[b, p // S], p % S]`` (p = positions[b]) where
    stash_index[b] >= 0, p lies in [0, NP·S) and that page is not -1 (the deferred backfill's
    copy of the residual entering a skipped run, without a launch of its own).
    Allocates nothing (CUDA-graph capturable). fp32 inputs multiply in IEEE fp32 (no tf32).
    """
    check_tensor("h", h, ndim=2, dtype=FLOAT_DTYPES)
    M, inter = h.shape
    wq = weight_operand("w_down", w_down, (None, inter), h.dtype, h.device)
    check_tensor("residual", residual, shape=(M, w_down.shape[0]), dtype=h.dtype,
                 device=h.device)
    check_rows(rows, M, h.device)
    if len({stash is None, stash_index is None, positions is None, block_table is None}) > 1:
        raise ValueError("stash, stash_index, positions and block_table go together: pass all "
                         "or none")
    if stash is not None:
        check_tensor("stash", stash, shape=(None, None, None, w_down.shape[0]), dtype=h.dtype,
                     device=h.device)
        check_page_size("stash", stash, dim=2)
        check_block_table(block_table, M, stash.shape[1], h.device)
        check_tensor("stash_index", stash_index, shape=(M,), dtype=torch.int32,
                     device=h.device)
        check_tensor("positions", positions, shape=(M,), dtype=torch.int32, device=h.device)
    check_launchable(h)
    torch.ops.d3kernels.down_residual(h, *wq, residual, rows, stash, stash_index, positions,
                                      block_table)
