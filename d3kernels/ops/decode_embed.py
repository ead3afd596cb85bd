"""The first launch of a decode step: token embeddings into the residual, plus the step's
bookkeeping that would otherwise cost launches of its own.

One program per active row b: ``residual[b] = embed[tokens[r]]`` (with ``vocab_start``, a
tensor-parallel rank's slice of the table: ``embed[tokens[r] - vocab_start]`` for its own ids,
zeros for the others, so the ranks' residuals sum to the embedding), ``context[b] = pos[b] + 1``
(the attention kernels' per-row key count) and, when ``written`` is given, the step's marks
``written[l, block_table[b, pos[b] // S], pos[b] % S] = mark[l]`` for every layer l (which
layers this step fills at that page slot: its kept layers, and the skipped ones too when they
are backfilled eagerly). Everything is read on the device, so a captured CUDA graph replays it
with whatever tokens, positions and block table the buffers hold.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from d3kernels.ops._checks import (FLOAT_DTYPES, check_block_table, check_launchable,
                                   check_page_size, check_rows, check_tensor)

_BLOCK_H = 1024  # hidden elements copied per loop iteration


@triton.jit
def _decode_embed_kernel(tok_ptr, emb_ptr, pos_ptr, res_ptr, ctx_ptr, rows_ptr, written_ptr,
                         mark_ptr, bt_ptr, H, L, T, vocab_start, V, stride_emb, stride_res,
                         stride_wl, stride_wp, stride_ml, stride_mb, stride_btb,
                         HAS_ROWS: tl.constexpr,
                         HAS_WRITTEN: tl.constexpr, PAGE_SIZE: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_L: tl.constexpr):
    r = tl.program_id(0)
    if HAS_ROWS:
        b = tl.load(rows_ptr + r).to(tl.int64)
        if b < 0:  # a padding slot of a fixed-size row list
            return
    else:
        b = r.to(tl.int64)
    # the id within this table; outside it (another rank's slice) the row is zeros. Always
    # inside without a vocab slice: ids are checked on the host.
    tok = tl.load(tok_ptr + r).to(tl.int64) - vocab_start + tl.zeros((BLOCK_H,), tl.int64)
    mine = (tok >= 0) & (tok < V)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        tl.store(res_ptr + b * stride_res + h, tl.load(emb_ptr + tok * stride_emb + h,
                                                       mask=(h < H) & mine, other=0.0),
                 mask=h < H)
    p = tl.load(pos_ptr + b)
    tl.store(ctx_ptr + b, p + 1)
    if HAS_WRITTEN:
        lay = tl.arange(0, BLOCK_L)
        m = tl.load(mark_ptr + lay * stride_ml + b * stride_mb, mask=lay < L, other=0)
        # a position past the row's pages is the caller's bug; masking keeps memory safe (as
        # qkv_rope); T = NP * S. A -1 page (none allocated) drops the marks, like the K/V write.
        # (p broadcast over the layers: every lane loads the same table entry, one transaction)
        p_l = p + tl.zeros_like(lay)
        in_cache = (lay < L) & (p_l >= 0) & (p_l < T)
        page = tl.load(bt_ptr + b * stride_btb + p_l // PAGE_SIZE, mask=in_cache, other=-1)
        slot = page.to(tl.int64) * stride_wp + p_l % PAGE_SIZE
        tl.store(written_ptr + lay * stride_wl + slot, m, mask=in_cache & (page >= 0))


@torch.library.custom_op("d3kernels::decode_embed",
                         mutates_args=("residual", "context", "written"))
def _decode_embed_op(tokens: torch.Tensor, embed: torch.Tensor, pos: torch.Tensor,
                     residual: torch.Tensor, context: torch.Tensor, rows: Optional[torch.Tensor],
                     written: Optional[torch.Tensor], mark: Optional[torch.Tensor],
                     block_table: Optional[torch.Tensor], vocab_start: int) -> None:
    R = tokens.shape[0]
    if R == 0:
        return
    has_w = written is not None
    # bool buffers travel as their bytes (no copy): the kernel stores 0/1 bytes
    w_arg = written.view(torch.uint8) if has_w else residual
    _decode_embed_kernel[(R,)](
        tokens, embed, pos, residual, context, rows if rows is not None else pos, w_arg,
        mark.view(torch.uint8) if has_w else pos, block_table if has_w else pos,
        embed.shape[1], written.shape[0] if has_w else 0,
        block_table.shape[1] * written.shape[2] if has_w else 0, vocab_start, embed.shape[0],
        embed.stride(0), residual.stride(0),
        written.stride(0) if has_w else 0, written.stride(1) if has_w else 0,
        mark.stride(0) if has_w else 0, mark.stride(1) if has_w and mark.dim() == 2 else 0,
        block_table.stride(0) if has_w else 0,
        HAS_ROWS=rows is not None, HAS_WRITTEN=has_w,
        PAGE_SIZE=written.shape[2] if has_w else 1, BLOCK_H=min(
            _BLOCK_H, triton.next_power_of_2(embed.shape[1])),
        BLOCK_L=triton.next_power_of_2(max(written.shape[0], 1)) if has_w else 1,
    )


@_decode_embed_op.register_fake
def _(tokens, embed, pos, residual, context, rows, written, mark, block_table,
      vocab_start) -> None:
    return None


def decode_embed(tokens: torch.Tensor, embed: torch.Tensor, pos: torch.Tensor,
                 residual: torch.Tensor, context: torch.Tensor, *,
                 rows: torch.Tensor | None = None, written: torch.Tensor | None = None,
                 mark: torch.Tensor | None = None,
                 block_table: torch.Tensor | None = None, vocab_start: int = 0) -> torch.Tensor:
    """Embed a decode step's tokens and do its bookkeeping, in one launch.

    Args:
        tokens: int64 [R], the newest token of each active row. Ids must lie in
            [0, V): they are not range-checked here (that would be a host sync inside a step);
            ``LlamaD3`` checks ids on the host before they reach the device.
        embed: [V, H] fp32/fp16/bf16, the embedding table.
        pos: int32 [M], the cache slot of each row's token (read, not changed).
        residual: [M, H], embed's dtype: row rows[r] (or r) receives embed[tokens[r]].
        context: int32 [M]: row b receives pos[b] + 1.
        rows: None (row r of tokens is row r of the buffers) or int32 [R] of distinct rows in
            [0, M) (values not range-checked, as for every op's ``rows``); other rows are left
            as they were.
        written: optional bool [L, P, S] per page slot (``cache.written``; the last dim dense,
            S a power of two), with mark: bool [L] (every row alike) or [L, M] (any strides;
            per row) and block_table: int32 [M, NP], row b's pages in position order, -1 for
            none (values checked in [-1, P) with one host sync, except while a CUDA graph is
            being captured): ``written[l, block_table[b, pos[b] // S], pos[b] % S] = mark[l]``
            (or ``mark[l, b]``) for every active row b. A pos[b] outside [0, NP*S) is the
            caller's bug and a -1 page is none: nothing is written for either.
        vocab_start: ``embed`` holds rows vocab_start..vocab_start+V-1 of a larger table (a
            tensor-parallel rank's slice): ids in that range take their row, any other id gets
            zeros (the all-reduce over the ranks completes the embedding). Default 0: the whole
            table, ids must lie in [0, V).

    Returns ``residual``. Allocates nothing (CUDA-graph capturable).

    Raises ValueError for bad arguments before any launch, with nothing written.
    """
    check_tensor("tokens", tokens, ndim=1, dtype=torch.int64)
    dev = tokens.device
    check_tensor("embed", embed, ndim=2, dtype=FLOAT_DTYPES, device=dev)
    check_tensor("residual", residual, ndim=2, dtype=embed.dtype, device=dev)
    check_tensor("residual", residual, shape=(None, embed.shape[1]))
    M = residual.shape[0]
    check_tensor("pos", pos, shape=(M,), dtype=torch.int32, device=dev)
    check_tensor("context", context, shape=(M,), dtype=torch.int32, device=dev)
    check_rows(rows, M, dev)
    R = tokens.shape[0]
    if rows is None and R > M:
        raise ValueError(f"tokens has {R} rows but residual only {M}")
    if rows is not None and rows.numel() != R:
        raise ValueError(f"rows must hold one row per token ({R}), got {rows.numel()}")
    if not (written is None) == (mark is None) == (block_table is None):
        raise ValueError("written, mark and block_table go together: pass all or none")
    if written is not None:
        check_tensor("written", written, ndim=3, dtype=torch.bool, device=dev)
        check_page_size("written", written, dim=2)
        check_block_table(block_table, M, written.shape[1], dev)
        if isinstance(mark, torch.Tensor) and mark.dim() == 2:
            check_tensor("mark", mark, shape=(written.shape[0], M), dtype=torch.bool,
                         device=dev, contiguous=False)
        else:
            check_tensor("mark", mark, shape=(written.shape[0],), dtype=torch.bool, device=dev)
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be an int >= 0, got {vocab_start!r}")
    check_launchable(tokens)
    _decode_embed_op(tokens, embed, pos, residual, context, rows, written, mark, block_table,
                     vocab_start)
    return residual
