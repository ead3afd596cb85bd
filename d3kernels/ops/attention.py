"""Attention over the paged KV cache: causal flash prefill and split-KV flash-decoding.

Both read keys/values only from one layer's paged cache ``k_cache, v_cache [P, S, kv_heads, D]``
(P pages of S slots, vLLM/FlashInfer "NHD" pages; any outer strides, k and v alike, e.g. the
view ``cache.k[j]`` of the stacked ``[L, P, S, kv_heads, D]`` cache) through an int32
``block_table [B, NP]``: position t of batch row b lives in page ``block_table[b, t // S]`` at
slot ``t % S``, so a row holds up to T_max = NP * S positions; pages may be shared by rows and
lie in any order. A -1 entry is no page: the keys behind it are excluded and never read. The
QKV op has already written the current tokens' K/V. GQA: query head h reads kv head
h // (Hq // kv_heads). Scale 1/sqrt(D), online softmax in base 2 with fp32 accumulation.

Page gathers: key tiles of BLOCK_N positions start at multiples of BLOCK_N, and S and BLOCK_N
are powers of two, so when BLOCK_N <= S a tile lies in one page and the kernels load ONE page
index per tile (a contiguous cache, S >= T_max, costs one scalar load per tile); when
BLOCK_N > S they gather the page index of every key (BLOCK_N / S distinct entries, broadcast
within a warp), and each key's D values stay one contiguous row. Addresses are int64. The page
size is a constexpr and part of the autotune keys: it decides which of the two a tile size takes.

Per-row context lengths and the block table are read on the device (CUDA-graph capturable; the
wrappers' one host sync, the range check of the table's values, is skipped while capturing),
and ``rows`` restricts a launch to the listed batch rows; other rows of ``out`` are left
untouched. ``valid`` (optional bool [P, S] per page slot, e.g. ``cache.written[j]`` of the
``mask`` backfill mode) excludes the cache entries it marks False, on top of the causal /
context-length limits; those entries are never read. Without it the kernels are compiled
without the mask (HAS_VALID=False).

Each op is one kernel launch; decode merges its KV splits inside that launch (the last split of
each row and kv head to finish does it, counted by atomics in the caller's workspace).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from d3kernels.ops._checks import (FLOAT_DTYPES, check_block_table, check_launchable,
                                   check_page_size, check_rows, check_tensor)
from d3kernels.ops._tuning import autotune, dot_precision

_LOG2E = 1.4426950408889634
# The merge keeps [splits, D] partials in registers; more splits than this buys no occupancy.
MAX_SPLITS = 64
# With a full cache a split still streams this many keys, so its launch cost stays amortized.
_MIN_SPLIT_KEYS = 128


def _as_bytes(valid: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A bool mask as uint8 (same bytes, no copy): the kernels load bytes and test != 0."""
    return valid.view(torch.uint8) if valid is not None and valid.dtype == torch.bool else valid


def _prune_fp32(configs, named_args, **kwargs):
    """fp32 is the correctness dtype: its IEEE dots run on the FMA units, where big tiles take
    tens of seconds to compile and win nothing. Tune bf16/fp16 only; fp32 takes the first config."""
    return configs[:1] if named_args["q_ptr"].dtype == torch.float32 else configs


# ---- prefill ------------------------------------------------------------------------------------

# The first config is the one the interpreter runs; the others are tuned on Hopper/Ampere
# (configs whose shared memory does not fit a card are skipped by the autotuner).
_PREFILL_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
]


@triton.jit
def _page_slots(bt_row, n0, hi, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys offs_n = n0 + [0, BLOCK_N) of one batch row (n0 a multiple of BLOCK_N, n0 < hi):
    their page (int64; a scalar when the tile lies in one page, else one per key), slot in the
    page (int64) and ``ok``: below ``hi`` and behind a page (not -1). Nothing is read for the
    others, so the table is never read past the row's T_max (hi <= T_max)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    slot = (offs_n % PAGE_SIZE).to(tl.int64)
    if BLOCK_N <= PAGE_SIZE:  # the aligned tile is inside one page: one index per tile
        page = tl.load(bt_row + n0 // PAGE_SIZE).to(tl.int64)
        # No page: no key of the tile. (A per-tile limit, not live & (page >= 0): Triton's
        # interpreter gives & of a vector and a scalar a dtype its masked loads reject.)
        ok = offs_n < tl.where(page >= 0, hi, n0)
    else:
        live = offs_n < hi
        page = tl.load(bt_row + offs_n // PAGE_SIZE, mask=live, other=-1).to(tl.int64)
        ok = live & (page >= 0)
    return offs_n, page, slot, ok


@triton.jit
def _prefill_inner(acc, l_i, m_i, q, k_head, v_head, bt_row, valid_ptr, sc_p, sc_s, sval_p,
                   q_pos, lo, hi, qk_scale, offs_d, PAGE_SIZE: tl.constexpr,
                   BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_VALID: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """Online-softmax update over keys [lo, hi). MASKED: the causal diagonal (keys past some
    query). Keys behind a -1 page, and with HAS_VALID those whose ``valid`` entry is 0, are
    neither read nor attended to."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_n, page, slot, ok = _page_slots(bt_row, n0, hi, PAGE_SIZE, BLOCK_N)
        if HAS_VALID:
            ok = ok & (tl.load(valid_ptr + page * sval_p + slot, mask=ok, other=0) != 0)
        kv_off = (page * sc_p + slot * sc_s)[:, None] + offs_d[None, :]
        k = tl.load(k_head + kv_off, mask=ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            visible = (offs_n[None, :] <= q_pos[:, None]) & ok[None, :]
        else:
            visible = ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        # A fully excluded tile leaves m_i as it was (finite), so p = 0 and alpha = 1: no NaN.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + kv_off, mask=ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@autotune(_PREFILL_CONFIGS, key=["HEAD_DIM", "PAGE_SIZE"],
          prune_configs_by={"early_config_prune": _prune_fp32})
@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, start_ptr, len_ptr, rows_ptr, valid_ptr,
                    sq_b, sq_t, sq_h, sc_p, sc_s, sc_h, sbt_b, so_b, so_t, so_h, sval_p, T,
                    t_max, qk_scale,
                    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                    PAGE_SIZE: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_VALID: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Last query tiles have the most keys: launch them first so the tail of the grid is short.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    r = pid_bh // NUM_HEADS
    h = pid_bh % NUM_HEADS
    if HAS_ROWS:
        row = tl.load(rows_ptr + r).to(tl.int64)
        if row < 0:  # a padding slot of a fixed-size row list
            return
    else:
        row = r.to(tl.int64)
    kvh = h // GROUP
    start = tl.load(start_ptr + row)
    n_q = tl.minimum(tl.load(len_ptr + row), T)

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_valid = offs_m < n_q
    q = tl.load(q_ptr + row * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :],
                mask=q_valid[:, None], other=0.0)
    q_pos = start + offs_m

    # Keys [0, hi) are visible to some valid query of this tile; keys [0, diag) to all of its
    # queries (padded ones included), so those tiles need no causal mask.
    m_end = tl.minimum(m0 + BLOCK_M, n_q)
    hi = tl.where(m_end > m0, tl.minimum(start + m_end, t_max), 0)
    diag = tl.minimum(start + m0, hi) // BLOCK_N * BLOCK_N

    k_head = k_ptr + kvh * sc_h
    v_head = v_ptr + kvh * sc_h
    bt_row = bt_ptr + row * sbt_b
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Finite start value: a fully masked row then gives p = 0 and alpha = 1, never NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    acc, l_i, m_i = _prefill_inner(acc, l_i, m_i, q, k_head, v_head, bt_row, valid_ptr, sc_p,
                                   sc_s, sval_p, q_pos, 0, diag, qk_scale, offs_d, PAGE_SIZE,
                                   BLOCK_N, False, HAS_VALID, DOT_PRECISION)
    acc, l_i, m_i = _prefill_inner(acc, l_i, m_i, q, k_head, v_head, bt_row, valid_ptr, sc_p,
                                   sc_s, sval_p, q_pos, diag, hi, qk_scale, offs_d, PAGE_SIZE,
                                   BLOCK_N, True, HAS_VALID, DOT_PRECISION)

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o = tl.where(q_valid[:, None], o, 0.0)  # padded queries are written as zeros
    tl.store(o_ptr + row * so_b + h * so_h + offs_m[:, None] * so_t + offs_d[None, :],
             o.to(o_ptr.dtype.element_ty), mask=(offs_m < T)[:, None])


@torch.library.custom_op("d3kernels::attention_prefill", mutates_args=("out",))
def _attention_prefill_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_table: torch.Tensor, start: torch.Tensor, lengths: torch.Tensor,
                          rows: Optional[torch.Tensor], valid: Optional[torch.Tensor],
                          out: torch.Tensor) -> None:
    B, T, Hq, D = q.shape
    page_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    R = B if rows is None else rows.numel()
    if R == 0 or T == 0:
        return
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), R * Hq)  # noqa: E731
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_table, start, lengths, rows, _as_bytes(valid),
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        0 if valid is None else valid.stride(0), T, block_table.shape[1] * page_size,
        _LOG2E / math.sqrt(D),
        NUM_HEADS=Hq, GROUP=Hq // kv_heads, HEAD_DIM=D, PAGE_SIZE=page_size,
        HAS_ROWS=rows is not None, HAS_VALID=valid is not None,
        DOT_PRECISION=dot_precision(q.dtype))


@_attention_prefill_op.register_fake
def _(q, k_cache, v_cache, block_table, start, lengths, rows, valid, out) -> None:
    return None


# ---- decode -------------------------------------------------------------------------------------

# As for prefill: the first config is the interpreter's, the rest are tuned on the GPU.
_DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=2),
]


@triton.jit
def _merge_splits(po_ptr, plse_ptr, o_ptr, row, kvh, spo_b, spo_h, spo_s, spl_b, spl_h, so_b,
                  so_h, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
                  SPLITS_PAD: tl.constexpr):
    """out[h] = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M), M = max_s lse_s, for the GROUP
    query heads of kv head ``kvh``. Loads bypass L1 (.cg): the other splits' partials were
    written by other SMs, and only L2 is coherent across SMs."""
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    s_valid = offs_s < NUM_SPLITS
    # num_stages=1: the pipeliner must not multi-buffer these [splits, D] tiles in shared memory
    for g in tl.range(GROUP, num_stages=1):
        h = kvh * GROUP + g
        lse = tl.load(plse_ptr + row * spl_b + h * spl_h + offs_s, mask=s_valid,
                      other=float("-inf"), cache_modifier=".cg")
        m = tl.max(lse, 0)
        w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
        po = tl.load(po_ptr + row * spo_b + h * spo_h + offs_s[:, None] * spo_s + offs_d[None, :],
                     mask=s_valid[:, None], other=0.0, cache_modifier=".cg")
        den = tl.sum(w, 0)
        o = tl.sum(po * w[:, None], 0) / tl.where(den > 0, den, 1.0)
        tl.store(o_ptr + row * so_b + h * so_h + offs_d, o.to(o_ptr.dtype.element_ty))


@autotune(_DECODE_CONFIGS, key=["HEAD_DIM", "GROUP_PAD", "NUM_SPLITS", "PAGE_SIZE"],
          prune_configs_by={"early_config_prune": _prune_fp32})
@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, rows_ptr, valid_ptr, o_ptr, po_ptr,
                   plse_ptr, cnt_ptr, sq_b, sq_h, sc_p, sc_s, sc_h, sbt_b, so_b, so_h,
                   spo_b, spo_h, spo_s, spl_b, spl_h, scnt_b, sval_p, t_max, qk_scale,
                   KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                   HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
                   SPLITS_PAD: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_VALID: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program = (row, kv head, split); all GROUP query heads of that kv head share each K/V
    tile (a [GROUP_PAD, D] x [D, BLOCK_N] dot), so K/V is read once per kv head. With one split
    the program writes ``out``; with more, each writes its partial output and LSE, and the last
    of the (row, kv head)'s splits to finish merges them into ``out`` (no second launch)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    r = pid // KV_HEADS
    kvh = pid % KV_HEADS
    if HAS_ROWS:
        row = tl.load(rows_ptr + r).to(tl.int64)
        if row < 0:  # a padding slot of a fixed-size row list
            return
    else:
        row = r.to(tl.int64)
    ctx = tl.minimum(tl.load(ctx_ptr + row), t_max)
    # Splits divide this row's own context (not T_max), in whole key tiles, so short rows in a
    # long cache still spread over all splits; splits past the context get no keys.
    split_len = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * split_len
    hi = tl.minimum(lo + split_len, ctx)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    g_valid = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    q = tl.load(q_ptr + row * sq_b + heads[:, None] * sq_h + offs_d[None, :],
                mask=g_valid[:, None], other=0.0)
    k_head = k_ptr + kvh * sc_h
    v_head = v_ptr + kvh * sc_h
    bt_row = bt_ptr + row * sbt_b

    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    m_i = tl.full([GROUP_PAD], -1.0e30, dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):  # lo is a multiple of BLOCK_N, as _page_slots needs
        offs_n, page, slot, ok = _page_slots(bt_row, n0, hi, PAGE_SIZE, BLOCK_N)
        if HAS_VALID:  # excluded entries are never read; a fully excluded tile leaves m_i, l_i
            ok = ok & (tl.load(valid_ptr + page * sval_p + slot, mask=ok, other=0) != 0)
        kv_off = (page * sc_p + slot * sc_s)[:, None] + offs_d[None, :]
        k = tl.load(k_head + kv_off, mask=ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + kv_off, mask=ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # An empty split (no keys, or every key excluded by ``valid``) has a zero output with LSE
    # -inf, so the merge gives it zero weight (and the partials never need clearing).
    has_keys = l_i > 0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        tl.store(o_ptr + row * so_b + heads[:, None] * so_h + offs_d[None, :],
                 o.to(o_ptr.dtype.element_ty), mask=g_valid[:, None])
    else:
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(po_ptr + row * spo_b + heads[:, None] * spo_h + split * spo_s + offs_d[None, :],
                 o, mask=g_valid[:, None])
        tl.store(plse_ptr + row * spl_b + heads * spl_h + split, lse, mask=g_valid)
        # Arrival count, GPU memory model: the barrier orders every thread's partial stores
        # before the atomic (one thread runs it); its gpu-scope release publishes them (release
        # is cumulative over the barrier) and its acquire makes the partials of every split that
        # arrived earlier visible to this program, whose threads read them only after the
        # atomic's result is broadcast to them (another barrier, inside Triton's lowering of a
        # scalar atomic). No program waits for another, so no co-residency is assumed.
        tl.debug_barrier()
        cnt = cnt_ptr + row * scnt_b + kvh
        arrived = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
        if arrived == NUM_SPLITS - 1:
            # Every split has arrived and none touches the counter again: reset it, so the next
            # launch (or CUDA-graph replay) finds it zero; kernel boundaries order that store.
            tl.store(cnt, 0)
            _merge_splits(po_ptr, plse_ptr, o_ptr, row, kvh, spo_b, spo_h, spo_s, spl_b, spl_h,
                          so_b, so_h, GROUP, HEAD_DIM, NUM_SPLITS, SPLITS_PAD)


@torch.library.custom_op("d3kernels::attention_decode",
                         mutates_args=("out", "partial_out", "partial_lse", "counters"))
def _attention_decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         block_table: torch.Tensor, context_lens: torch.Tensor,
                         rows: Optional[torch.Tensor], valid: Optional[torch.Tensor],
                         out: torch.Tensor, partial_out: torch.Tensor, partial_lse: torch.Tensor,
                         counters: torch.Tensor) -> None:
    B, Hq, D = q.shape
    page_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_splits = partial_lse.shape[2]
    R = B if rows is None else rows.numel()
    if R == 0:
        return
    group = Hq // kv_heads
    _decode_kernel[(R * kv_heads, num_splits)](
        q, k_cache, v_cache, block_table, context_lens, rows, _as_bytes(valid), out, partial_out,
        partial_lse, counters, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        out.stride(0), out.stride(1),
        partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
        partial_lse.stride(0), partial_lse.stride(1), counters.stride(0),
        0 if valid is None else valid.stride(0), block_table.shape[1] * page_size,
        _LOG2E / math.sqrt(D),
        KV_HEADS=kv_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=D, PAGE_SIZE=page_size, NUM_SPLITS=num_splits,
        SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)),
        HAS_ROWS=rows is not None, HAS_VALID=valid is not None,
        DOT_PRECISION=dot_precision(q.dtype))


@_attention_decode_op.register_fake
def _(q, k_cache, v_cache, block_table, context_lens, rows, valid, out, partial_out, partial_lse,
      counters) -> None:
    return None


# ---- public API ---------------------------------------------------------------------------------

def _check_cache(q: torch.Tensor, k_cache, v_cache, block_table) -> int:
    """The paged cache [P, S, Hkv, D] (k and v alike, strides included) and its block table
    [B, NP] for q [B, ..., Hq, D] (values checked with one host sync, see check_block_table).
    Returns T_max = NP * S."""
    check_tensor("k_cache", k_cache, ndim=4, dtype=q.dtype, device=q.device)
    P, S, Hkv, D = k_cache.shape
    page_size = check_page_size("k_cache", k_cache)
    check_tensor("v_cache", v_cache, shape=tuple(k_cache.shape), dtype=q.dtype, device=q.device)
    if v_cache.stride() != k_cache.stride():  # the kernels address k and v with one offset
        raise ValueError(f"v_cache must have k_cache's strides {list(k_cache.stride())}, got "
                         f"{list(v_cache.stride())}")
    if D != q.shape[-1]:
        raise ValueError(f"k_cache has head_dim {D} but q has head_dim {q.shape[-1]}")
    if Hkv == 0:
        raise ValueError(f"k_cache must have kv_heads >= 1, got shape {list(k_cache.shape)}")
    if q.shape[-2] == 0 or q.shape[-2] % Hkv:
        raise ValueError(f"q has {q.shape[-2]} heads, which must be a positive multiple of the "
                         f"{Hkv} kv heads of k_cache")
    check_block_table(block_table, q.shape[0], P, q.device)
    return block_table.shape[1] * page_size


def _check_q(q, ndim: int) -> None:
    check_tensor("q", q, ndim=ndim, dtype=FLOAT_DTYPES)
    D = q.shape[-1]
    if D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"q: head_dim must be a power of two in [16, 256], got {D}")
    check_launchable(q)


def _check_out(out, q: torch.Tensor) -> None:
    if out is not None:
        check_tensor("out", out, shape=tuple(q.shape), dtype=q.dtype, device=q.device)


def _check_valid(valid, k_cache: torch.Tensor) -> None:
    """``valid``: None or bool/uint8 [P, S] (per page slot) on the cache's device, last
    dimension dense."""
    if valid is not None:
        check_tensor("valid", valid, shape=tuple(k_cache.shape[:2]),
                     dtype=(torch.bool, torch.uint8), device=k_cache.device)


def attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_table: torch.Tensor, start: torch.Tensor, lengths: torch.Tensor, *,
                      rows: torch.Tensor | None = None,
                      valid: torch.Tensor | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal GQA flash attention of a chunk of queries against the paged KV cache.

    Args:
        q: [B, T, Hq, D] fp32/fp16/bf16, RoPE applied; D a power of two in [16, 256].
        k_cache, v_cache: [P, S, kv_heads, D] pages, q's dtype, S a power of two, Hq a multiple
            of kv_heads; any outer strides, the same for both. K/V of this chunk must already
            be in the cache.
        block_table: int32 [B, NP] on q's device: position t of row b is at slot t % S of page
            block_table[b, t // S]; -1 = no page (those keys are excluded, never read). Pages
            may be shared between rows. T_max = NP * S.
        start: int32 [B], position of q[b, 0] (0 for a fresh prompt, > 0 for a chunk that
            extends an existing cache).
        lengths: int32 [B], valid queries of row b (rows right-padded to T, T <= T_max).
            Query t of row b sits at position start[b] + t and attends to cache positions
            0..start[b] + t; the caller guarantees start[b] + lengths[b] <= T_max.
        rows: None or int32 [R] of distinct batch rows to compute (-1 entries are padding,
            skipped); other rows of ``out`` are left untouched.
        valid: None or bool (or uint8) [P, S] per page slot: cache entries marked False (0)
            are excluded from attention and never read (e.g. ``cache.written[j]`` in ``mask``
            backfill mode). The caller keeps each query's own chunk entries valid; a query
            left with no valid key gets zeros.
        out: optional [B, T, Hq, D] output buffer in q's dtype (no allocation when given).

    Returns ``out`` [B, T, Hq, D]: padded queries (t >= lengths[b]) are zeros; rows not in
    ``rows`` keep their previous contents (zeros if ``out`` was allocated here).
    """
    _check_q(q, 4)
    t_max = _check_cache(q, k_cache, v_cache, block_table)
    B, T = q.shape[:2]
    if T > t_max:
        raise ValueError(f"q has {T} query positions but block_table holds only T_max = NP * S "
                         f"= {t_max}")
    check_tensor("start", start, shape=(B,), dtype=torch.int32, device=q.device)
    check_tensor("lengths", lengths, shape=(B,), dtype=torch.int32, device=q.device)
    check_rows(rows, B, q.device)
    _check_valid(valid, k_cache)
    _check_out(out, q)
    if out is None:
        out = torch.empty_like(q) if rows is None else torch.zeros_like(q)
    _attention_prefill_op(q, k_cache, v_cache, block_table, start, lengths, rows, valid, out)
    return out


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs are plenty
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def attention_decode_splits(num_rows: int, kv_heads: int, t_max: int,
                            device: torch.device) -> int:
    """Host-side split count for ``attention_decode`` from shapes only (CUDA-graph safe).

    Enough (row, kv head, split) programs to give every SM two, but no more splits than keep
    ``_MIN_SPLIT_KEYS`` keys per split of a full cache, and at most ``MAX_SPLITS``.
    """
    want = triton.cdiv(2 * _sm_count(torch.device(device)), max(1, num_rows * kv_heads))
    return max(1, min(want, triton.cdiv(t_max, _MIN_SPLIT_KEYS), MAX_SPLITS))


class DecodeWorkspace(NamedTuple):
    """Split-KV scratch of ``attention_decode``, from ``attention_decode_workspace``.

    partial_out: fp32 [batch, num_heads, num_splits, head_dim], each split's normalized output;
    partial_lse: fp32 [batch, num_heads, num_splits], its log2-sum-exp (-inf: no keys);
    counters: int32 [batch, num_heads], zero at rest. Entry [b, kvh] counts the finished splits
        of (row b, kv head kvh) during a launch (sized by query heads, which are at least the kv
        heads, so the workspace needs no kv head count); the last split resets it to zero.
    """
    partial_out: torch.Tensor
    partial_lse: torch.Tensor
    counters: torch.Tensor


def attention_decode_workspace(batch: int, num_heads: int, head_dim: int, num_splits: int,
                               device: torch.device) -> DecodeWorkspace:
    """Preallocated split-KV workspace for ``attention_decode(..., workspace=...)``: the
    partials need no clearing and the kernel leaves the counters zero, so one workspace serves
    every step and layer of a model, CUDA-graph replays included. It must not serve two
    launches in flight at once (e.g. on two streams): their counts and partials would mix."""
    return DecodeWorkspace(
        torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=device),
        torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=device),
        torch.zeros(batch, num_heads, dtype=torch.int32, device=device))


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_table: torch.Tensor, context_lens: torch.Tensor, *,
                     rows: torch.Tensor | None = None,
                     valid: torch.Tensor | None = None,
                     out: torch.Tensor | None = None, num_splits: int | None = None,
                     workspace: DecodeWorkspace | None = None) -> torch.Tensor:
    """Single-token GQA attention against the paged KV cache by split-KV flash-decoding, in one
    kernel launch: the last split of each (row, kv head) to finish merges the splits' partials.

    Args:
        q: [B, Hq, D] fp32/fp16/bf16, one query per row at position context_lens[b] - 1 (its K/V
            already in the cache); D a power of two in [16, 256].
        k_cache, v_cache: [P, S, kv_heads, D] pages, q's dtype, S a power of two, Hq a multiple
            of kv_heads; any outer strides, the same for both.
        block_table: int32 [B, NP] on q's device: position t of row b is at slot t % S of page
            block_table[b, t // S]; -1 = no page (those keys are excluded, never read). Pages
            may be shared between rows. T_max = NP * S. Read on the device.
        context_lens: int32 [B], keys row b attends (1..T_max; read on the device).
        rows: None or int32 [R] of distinct batch rows to compute (-1 entries are padding,
            skipped); other rows of ``out`` are left untouched. (A repeated row would also leave
            the workspace counters nonzero.)
        valid: None or bool (or uint8) [P, S] per page slot: cache entries marked False (0)
            are excluded from attention and never read (e.g. ``cache.written[j]`` in ``mask``
            backfill mode); read on the device, so a captured graph follows later changes to it. The
            caller keeps the query's own entry (context_lens[b] - 1) valid; splits whose keys
            are all excluded get zero weight in the merge.
        out: optional [B, Hq, D] output buffer in q's dtype.
        num_splits: KV splits per row (1..MAX_SPLITS); None: ``attention_decode_splits`` of the
            active rows, kv heads and T_max = NP * S, or the workspace's split count when one
            is given.
        workspace: optional ``attention_decode_workspace(B, Hq, D, num_splits, device)``, not
            used by another launch in flight at the same time.

    With ``out`` and ``workspace`` given the call allocates nothing and is exactly one kernel
    launch; its one host sync, the check of the block table's values, is skipped while a CUDA
    graph is being captured, so it can be captured and replayed with new ``context_lens`` and
    ``block_table`` values written in place. Without them, the allocations depend on shapes
    only (capturable too, from the graph's private pool), and zeroing a fresh workspace's
    counters is one more small launch.

    Returns ``out`` [B, Hq, D]; rows not in ``rows`` keep their previous contents (zeros if
    ``out`` was allocated here).
    """
    _check_q(q, 3)
    t_max = _check_cache(q, k_cache, v_cache, block_table)
    B, Hq, D = q.shape
    check_tensor("context_lens", context_lens, shape=(B,), dtype=torch.int32, device=q.device)
    check_rows(rows, B, q.device)
    _check_valid(valid, k_cache)
    _check_out(out, q)
    if num_splits is not None and (not isinstance(num_splits, int) or
                                   not 1 <= num_splits <= MAX_SPLITS):
        raise ValueError(f"num_splits must be an int in [1, {MAX_SPLITS}], got {num_splits!r}")
    if workspace is None:
        if num_splits is None:
            num_splits = attention_decode_splits(B if rows is None else rows.numel(),
                                                 k_cache.shape[2], t_max, q.device)
        workspace = attention_decode_workspace(B, Hq, D, num_splits, q.device)
    else:
        if not isinstance(workspace, (tuple, list)) or len(workspace) != 3:
            raise ValueError("workspace must be the triple (partial_out, partial_lse, counters) "
                             "from attention_decode_workspace")
        partial_out, partial_lse, counters = workspace
        check_tensor("workspace[1] (partial_lse)", partial_lse, shape=(B, Hq, None),
                     dtype=torch.float32, device=q.device)
        S = partial_lse.shape[2]
        check_tensor("workspace[0] (partial_out)", partial_out, shape=(B, Hq, S, D),
                     dtype=torch.float32, device=q.device)
        check_tensor("workspace[2] (counters)", counters, shape=(B, Hq), dtype=torch.int32,
                     device=q.device)
        if not 1 <= S <= MAX_SPLITS:
            raise ValueError(f"workspace holds {S} splits, must be in [1, {MAX_SPLITS}]")
        if num_splits is not None and num_splits != S:
            raise ValueError(f"num_splits={num_splits} but the workspace holds {S} splits")
    if out is None:
        out = torch.empty_like(q) if rows is None else torch.zeros_like(q)
    _attention_decode_op(q, k_cache, v_cache, block_table, context_lens, rows, valid, out,
                         *workspace)
    return out
