"""D³ ``propagate`` backfill: K/V of skipped layers for many tokens, all layers in one launch.

For every listed (token, layer) pair: the layer's own input RMSNorm of the token's
residual-stream state, its K/V projections (rows q_size: of the stacked w_qkv), RoPE on K at the
token's position, and the write into the stacked paged cache through the block table
(design.md §2, §4.2). The grid is
layer × token tile × output tile, so the launch reads each listed layer's K/V weights once per
token tile, whatever the number of layers; the norm statistic is per token and recomputed per
program (x is tiny). The weights may be float or weight-only int8/int4, dequantized tile by tile
in registers (d3kernels/ops/_quant.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from d3kernels.ops._checks import (FLOAT_DTYPES, check_block_table, check_launchable,
                                   check_page_size, check_tensor)
from d3kernels.ops._quant import load_weight_tile, weight_operand
from d3kernels.ops._tuning import (HALF_HEAD_CONFIGS, autotune, dot_precision, m_bucket,
                                   prune_half_head)
from d3kernels.ops.qkv_rope import rope_rotate_half
from d3kernels.ops.rms_norm import check_eps, load_rows, rms_rstd
from d3kernels.quant import QuantizedWeight

# As in qkv_rope, a program owns BLOCK_HALF matching columns of both halves of one K or V head,
# so RoPE happens in its epilogue. Few tokens (one step's backfill) is the common case: only
# qkv_rope's decode and mid-size tiles (BLOCK_M <= 64), not its BLOCK_M 128 prefill ones.
_CONFIGS = HALF_HEAD_CONFIGS[:6]


@autotune(_CONFIGS, key=["M_BUCKET", "H", "HALF", "WFMT", "GROUP"],
          prune_configs_by={"early_config_prune": prune_half_head})
@triton.jit
def _kv_backfill_kernel(
    x_ptr, layers_ptr, nw_ptr, w_ptr, ws_ptr, wo_ptr, cos_ptr, sin_ptr, pos_ptr, crow_ptr, k_ptr,
    v_ptr, bt_ptr,
    M, H, HALF, Q_SIZE, POS_LIMIT, eps,
    M_BUCKET,  # read only by the autotuner's key
    stride_x, stride_nl, stride_wl, stride_wn, stride_sl, stride_sn, stride_cos, stride_sin,
    stride_cl, stride_cp, stride_cs, stride_ch, stride_btb,
    PAGE_SIZE: tl.constexpr,  # a power of two: page and offset are a shift and a mask
    NUM_KV: tl.constexpr, DOT_PRECISION: tl.constexpr, WFMT: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_K: tl.constexpr,
):
    m_tiles = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    # Token tiles of one layer are neighbours in launch order: they share that layer's weights.
    layer = tl.load(layers_ptr + pid // m_tiles).to(tl.int64)
    m = (pid % m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < M
    half_blocks = tl.cdiv(HALF, BLOCK_HALF)
    head = pid_n // half_blocks  # over the K heads, then the V heads
    cols = (pid_n % half_blocks) * BLOCK_HALF + tl.arange(0, BLOCK_HALF)
    col_mask = cols < HALF

    x_row = x_ptr + m.to(tl.int64) * stride_x
    rstd = rms_rstd(x_row, m_mask, H, eps, BLOCK_M, BLOCK_K)

    nw_row = nw_ptr + layer * stride_nl
    # the layer's matrix (data, scales, offsets) and the head's low-half rows; + HALF: high half
    w_layer = w_ptr + layer * stride_wl
    ws_layer = ws_ptr + layer * stride_sl
    wo_layer = wo_ptr + layer * stride_sl
    n_lo = Q_SIZE + head * 2 * HALF + cols
    acc_lo = tl.zeros((BLOCK_M, BLOCK_HALF), dtype=tl.float32)
    acc_hi = tl.zeros((BLOCK_M, BLOCK_HALF), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < H
        # the normed input in the model's dtype, as the per-layer path feeds its projection
        h = load_rows(x_row, k, m_mask, k_mask, rstd, nw_row, True)
        w_mask = k_mask[:, None] & col_mask[None, :]
        w_lo = load_weight_tile(w_layer, ws_layer, wo_layer, k, n_lo, w_mask, stride_wn,
                                stride_sn, GROUP, WFMT)
        w_hi = load_weight_tile(w_layer, ws_layer, wo_layer, k, n_lo + HALF, w_mask, stride_wn,
                                stride_sn, GROUP, WFMT)
        acc_lo = tl.dot(h, w_lo.to(h.dtype), acc_lo, input_precision=DOT_PRECISION)
        acc_hi = tl.dot(h, w_hi.to(h.dtype), acc_hi, input_precision=DOT_PRECISION)

    # A position past the cache or the tables is the caller's bug; masking keeps memory safe.
    pos = tl.load(pos_ptr + m, mask=m_mask, other=0)
    crow = tl.load(crow_ptr + m, mask=m_mask, other=0).to(tl.int64)
    in_cache = m_mask & (pos >= 0) & (pos < POS_LIMIT)
    # the token's page: block_table[cache_rows[m], pos // S]; -1 (no page) drops the write
    page = tl.load(bt_ptr + crow * stride_btb + pos // PAGE_SIZE, mask=in_cache, other=-1)
    tile_mask = (in_cache & (page >= 0))[:, None] & col_mask[None, :]
    is_k = head < NUM_KV
    offs = (layer * stride_cl + page.to(tl.int64) * stride_cp
            + (pos % PAGE_SIZE).to(tl.int64) * stride_cs
            + (head % NUM_KV) * stride_ch)[:, None] + cols[None, :]
    if is_k:
        out_lo, out_hi = rope_rotate_half(acc_lo, acc_hi, cos_ptr, sin_ptr, pos, cols, stride_cos,
                                          stride_sin, HALF, tile_mask)
        dst = k_ptr + offs
    else:
        out_lo = acc_lo
        out_hi = acc_hi
        dst = v_ptr + offs
    tl.store(dst, out_lo.to(dst.dtype.element_ty), mask=tile_mask)
    tl.store(dst + HALF, out_hi.to(dst.dtype.element_ty), mask=tile_mask)


def _launch(x, layers, norm_weight, w_qkv, w_scale, w_offset, group, wfmt, cos, sin, positions,
            cache_rows, block_table, k_cache, v_cache, q_size, eps):
    M, H = x.shape
    NL = layers.shape[0]
    page_size, num_kv, head_dim = k_cache.shape[2], k_cache.shape[3], k_cache.shape[4]
    if M == 0 or NL == 0:
        return
    grid = lambda meta: (NL * triton.cdiv(M, meta["BLOCK_M"]),  # noqa: E731
                         2 * num_kv * triton.cdiv(head_dim // 2, meta["BLOCK_HALF"]))
    _kv_backfill_kernel[grid](
        x, layers, norm_weight, w_qkv, w_scale, w_offset, cos, sin, positions, cache_rows,
        k_cache, v_cache, block_table,
        M, H, head_dim // 2, q_size, min(block_table.shape[1] * page_size, cos.shape[0]), eps,
        m_bucket(M, cap=64),
        x.stride(0), norm_weight.stride(0), w_qkv.stride(0), w_qkv.stride(1),
        w_scale.stride(0), w_scale.stride(1), cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        block_table.stride(0),
        PAGE_SIZE=page_size, NUM_KV=num_kv, DOT_PRECISION=dot_precision(x.dtype), WFMT=wfmt,
        GROUP=group,
    )


@torch.library.custom_op("d3kernels::kv_backfill", mutates_args=("k_cache", "v_cache"))
def _kv_backfill_op(x: torch.Tensor, layers: torch.Tensor, norm_weight: torch.Tensor,
                    w_qkv: torch.Tensor, w_scale: torch.Tensor, w_offset: torch.Tensor,
                    group: int, wfmt: int, cos: torch.Tensor, sin: torch.Tensor,
                    positions: torch.Tensor, cache_rows: torch.Tensor,
                    block_table: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    q_size: int, eps: float) -> None:
    """w_qkv, w_scale, w_offset, group, wfmt: the weight as ``weight_operand`` splits it."""
    _launch(x, layers, norm_weight, w_qkv, w_scale, w_offset, group, wfmt, cos, sin, positions,
            cache_rows, block_table, k_cache, v_cache, q_size, eps)


@_kv_backfill_op.register_fake
def _(x, layers, norm_weight, w_qkv, w_scale, w_offset, group, wfmt, cos, sin, positions,
      cache_rows, block_table, k_cache, v_cache, q_size, eps):
    return None


def kv_backfill(x: torch.Tensor, layers: torch.Tensor, norm_weight: torch.Tensor,
                w_qkv: torch.Tensor | QuantizedWeight, cos: torch.Tensor, sin: torch.Tensor,
                positions: torch.Tensor, cache_rows: torch.Tensor, block_table: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, *, q_size: int,
                eps: float) -> None:
    """Fill the KV cache of skipped layers for many tokens in one launch (``propagate`` mode).

    For every token m and every layer l in ``layers``:
    ``h = rmsnorm(x[m]) * norm_weight[l]``; ``k, v = h @ W_k[l].T, h @ W_v[l].T`` (W_k, W_v the
    rows ``q_size:`` of ``w_qkv[l]``); RoPE on k at ``p = positions[m]``; then
    ``k_cache[l, block_table[cache_rows[m], p // S], p % S] = k`` and likewise v. Nothing else
    is written.

    Args:
        x: [M, H] fp32/fp16/bf16, residual-stream states as they reach the skipped layers
            (not normed).
        layers: int32 [NL], layer indices to fill (any order, distinct).
        norm_weight: [L, H], x's dtype: every layer's input-norm weight (the engine's attn_norm).
        w_qkv: [L, q_size + 2*kv_heads*D, H], the stacked QKV weights (Q rows unread): a float
            tensor of x's dtype, or a QuantizedWeight (int8/int4, dequantized in registers and
            rounded to x's dtype before each dot) on x's device.
        cos, sin: [T_max', D] float RoPE tables (``d3kernels.model.rope_tables``).
        positions: int32 [M], cache positions (< min(NP*S, T_max'); others, and those behind
            a -1 page, are not written).
        cache_rows: int32 [M], rows of ``block_table`` (values in [0, B) are the caller's
            contract, not read here: that would be a host sync).
        block_table: int32 [B, NP], on x's device: each row's pages in position order, -1 for
            none (values checked in [-1, P) with one host sync, except while a CUDA graph is
            being captured).
        k_cache, v_cache: [L, P, S, kv_heads, D], x's dtype, the stacked paged cache (same
            strides, the last dim dense); S, the page size, a power of two.
        q_size: num_heads * D, where the K rows of w_qkv start.
        eps: the RMSNorm epsilon.

    Two tokens may share a row at different positions; the (page, slot) pairs written should be
    distinct.
    fp32 accumulation; fp32 inputs multiply in IEEE fp32 on a GPU too (no tf32).
    """
    check_tensor("x", x, ndim=2, dtype=FLOAT_DTYPES)
    M, H = x.shape
    dev, dt = x.device, x.dtype
    check_tensor("k_cache", k_cache, ndim=5, dtype=dt, device=dev)
    L, P, _, num_kv, D = k_cache.shape
    check_page_size("k_cache", k_cache, dim=2)
    if D % 2:
        raise ValueError(f"k_cache: head_dim must be even for RoPE, got {D}")
    check_tensor("v_cache", v_cache, shape=tuple(k_cache.shape), dtype=dt, device=dev)
    if v_cache.stride() != k_cache.stride():
        raise ValueError(f"v_cache must have k_cache's strides {list(k_cache.stride())}, got "
                         f"{list(v_cache.stride())}")
    if isinstance(q_size, bool) or not isinstance(q_size, int) or q_size < 0:
        raise ValueError(f"q_size must be an int >= 0, got {q_size!r}")
    check_eps(eps)
    check_tensor("layers", layers, ndim=1, dtype=torch.int32, device=dev)
    if layers.shape[0] > L:
        raise ValueError(f"layers has {layers.shape[0]} entries but the cache has only {L} layers")
    check_tensor("norm_weight", norm_weight, shape=(L, H), dtype=dt, device=dev)
    wq = weight_operand("w_qkv", w_qkv, (L, q_size + 2 * num_kv * D, H), dt, dev)
    check_tensor("cos", cos, shape=(None, D), dtype=FLOAT_DTYPES, device=dev)
    check_tensor("sin", sin, shape=tuple(cos.shape), dtype=FLOAT_DTYPES, device=dev)
    check_tensor("positions", positions, shape=(M,), dtype=torch.int32, device=dev)
    check_tensor("cache_rows", cache_rows, shape=(M,), dtype=torch.int32, device=dev)
    # any number of rows: cache_rows index them
    check_tensor("block_table", block_table, ndim=2)
    check_block_table(block_table, block_table.shape[0], P, dev)
    check_launchable(x)
    _kv_backfill_op(x, layers, norm_weight, *wq, cos, sin, positions, cache_rows, block_table,
                    k_cache, v_cache, q_size, float(eps))
