"""Early-exit LM head: final RMSNorm + vocab projection + token choice, logits only on request.

Phase 1 (grid: vocab tile × row tile) computes one tile of logits per program and keeps, per row,
the tile's best (value, index) pair — greedy, or Gumbel-max sampling with the noise added to every
logit — or, for top-k sampling, the tile's top-k pairs. Phase 2 (a few rows per program) reduces
those candidates to the token id. Logits are never stored unless ``logits_out`` is given. Top-k
candidate lists longer than one phase-2 block are first cut down in parallel (grid: row × chunk,
each chunk to its own top-k), so phase 2 never scans more than _CHUNK candidates. The vocab
projection may be weight-only int4/int8 (a QuantizedWeight), dequantized tile by tile in
registers by the same kernel (d3kernels/ops/_quant.py).

A (value, index) pair travels as one int64 key: the float's bits mapped to an order-preserving
int32 in the high word, ``0x7FFFFFFF - index`` in the low word. Keys order by value, then by the
smaller index, so one integer max gives torch.argmax's tie rule, and keys are never equal.
Top-k lists are extracted with k passes of max (no tl.sort: Triton's interpreter sorts a 16x128
block in seconds; k <= 64 passes over a register tile are cheap on a GPU).

Sampling noise: ``tl.rand(seed, offset + row * V + vocab_index)`` (Philox), so a token's noise
depends only on the seed, the offset, its batch row and its vocab index, whichever rows run and
however the vocab is tiled. ``seed`` and ``offset`` are read from int64 device tensors inside the
kernels, so a captured CUDA graph replays with whatever values they hold: advance the offset
in place between steps (e.g. ``offset += M * V``) to draw fresh noise at every replay.

Vocab slices (tensor parallelism): ``vocab_start``/``vocab_size`` make a weight of V rows entries
vocab_start.. of a larger vocabulary, with global indices in keys and noise; ``keys_out`` stops
after phase 1 with each row's best keys (one, or its top-k), and ``lm_head_select`` runs phase 2
on every slice's keys side by side: the token the whole weight would give, for the price of
exchanging max(top_k, 1) int64 per row and rank.

Scratch: the candidates (R x ceil(V / BLOCK_V) x max(top_k, 1) int64, plus the cut-down levels)
live in a caller's ``scratch`` buffer (``lm_head_scratch``), or come from torch's caching allocator
when none is given. ``positions`` lets the selection also advance a decode step's positions.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from d3kernels.ops._checks import FLOAT_DTYPES, check_launchable, check_rows, check_tensor
from d3kernels.ops._quant import load_weight_tile, weight_operand
from d3kernels.ops._tuning import autotune, dot_precision
from d3kernels.ops.rms_norm import check_eps, load_rows, rms_rstd
from d3kernels.quant import QuantizedWeight

BLOCK_V = 128  # vocab columns per tile; fixed so the candidates' layout is known before launch
MAX_TOP_K = 64
_CHUNK = 2048  # candidates that phase 2 (and a cut-down program) scans at once; > 2 * MAX_TOP_K
_KEY_MIN = tl.constexpr(-(2 ** 63))  # below every key: pads loads and masks columns

# Decode-sized row tiles: the LM head runs on one token per sequence. The weight read is the whole
# cost; the configs trade K depth against loads in flight.
_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_K": 256}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_K": 64}, num_warps=4, num_stages=6),
    triton.Config({"BLOCK_M": 16, "BLOCK_K": 128}, num_warps=8, num_stages=5),
    triton.Config({"BLOCK_M": 32, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_K": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]


@triton.jit
def _pack(val, idx):
    """(fp32 value, int32 index) -> int64 key, larger value first, then smaller index."""
    bits = val.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - idx).to(tl.int64)


@triton.jit
def _unpack(key):
    ordered = (key >> 32).to(tl.int32)
    bits = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    idx = 0x7FFFFFFF - (key & 0x7FFFFFFF).to(tl.int32)
    return bits.to(tl.float32, bitcast=True), idx


@triton.jit
def _gumbel(seed, offsets):
    return -tl.log(-tl.log(tl.rand(seed, offsets)))


@triton.jit
def _store_top(keys, dst, mask, KP: tl.constexpr):
    """Store the KP largest keys of each row of ``keys`` [N, C], largest first, at dst[n] + j."""
    for j in range(KP):
        best = tl.max(keys, axis=1)
        tl.store(dst + j, best, mask=mask)
        keys = tl.where(keys == best[:, None], _KEY_MIN, keys)


@autotune(_CONFIGS, key=["M_BUCKET", "H", "V", "WFMT", "GROUP"])
@triton.jit
def _lm_head_tile_kernel(
    x_ptr, nw_ptr, w_ptr, ws_ptr, wo_ptr, rows_ptr, seed_ptr, offset_ptr, logits_ptr, cand_ptr,
    R, H, V, vocab_start, vocab_size, eps, inv_temp,
    M_BUCKET,  # read only by the autotuner's key
    stride_x, stride_w, stride_ws, stride_l, stride_c,
    HAS_ROWS: tl.constexpr, WRITE_LOGITS: tl.constexpr, NOISE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, WFMT: tl.constexpr, GROUP: tl.constexpr,
    KP: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (vocab tile v, row tile): the KP best keys of each row over the tile at
    cand[r, v*KP : (v+1)*KP], best first; score = logit, or logit/T + Gumbel noise when NOISE.
    The weight's V rows are vocab entries vocab_start.. of a vocabulary of vocab_size: keys and
    noise use those global indices (a tensor-parallel rank's slice draws what the whole would).
    The weight (data w, scales ws, offsets wo; WFMT/GROUP: d3kernels/ops/_quant.py) is
    dequantized tile by tile to x's dtype before the dot."""
    pid_v = tl.program_id(0)
    r = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_mask = r < R
    if HAS_ROWS:
        b = tl.load(rows_ptr + r, mask=r_mask, other=0).to(tl.int64)
        r_mask = r_mask & (b >= 0)  # -1: a padding slot of a fixed-size row list
    else:
        b = r.to(tl.int64)
    x_row = x_ptr + b * stride_x
    rstd = rms_rstd(x_row, r_mask, H, eps, BLOCK_M, BLOCK_K)

    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    c_mask = cols < V
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < H
        h = load_rows(x_row, k, r_mask, k_mask, rstd, nw_ptr, True)
        wk = load_weight_tile(w_ptr, ws_ptr, wo_ptr, k, cols, k_mask[:, None] & c_mask[None, :],
                              stride_w, stride_ws, GROUP, WFMT).to(h.dtype)
        acc = tl.dot(h, wk, acc, input_precision=DOT_PRECISION)
    if WRITE_LOGITS:
        tl.store(logits_ptr + b[:, None] * stride_l + cols[None, :], acc,
                 mask=r_mask[:, None] & c_mask[None, :])
    g_cols = vocab_start + cols
    if NOISE:
        noise_base = tl.load(offset_ptr) + b * vocab_size
        acc = acc * inv_temp + _gumbel(tl.load(seed_ptr), noise_base[:, None] + g_cols[None, :])
    keys = tl.where(c_mask[None, :], _pack(acc, g_cols[None, :]), _KEY_MIN)
    _store_top(keys, cand_ptr + r * stride_c + pid_v * KP, r_mask, KP)


@triton.jit
def _top_candidates_kernel(cand_ptr, out_ptr, n_cand, stride_c, stride_o,
                           KP: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, chunk): the KP best of the chunk's BLOCK candidates at out[row, chunk*KP]."""
    r = tl.program_id(0)
    chunk = tl.program_id(1)
    j = chunk * BLOCK + tl.arange(0, BLOCK)
    keys = tl.load(cand_ptr + r * stride_c + j, mask=j < n_cand, other=_KEY_MIN)
    one = tl.zeros((1,), dtype=tl.int32)  # a [1] row so _store_top serves 1-D candidates too
    _store_top(keys[None, :], out_ptr + r * stride_o + chunk * KP + one, one == 0, KP)


@triton.jit
def _select_kernel(
    cand_ptr, rows_ptr, seed_ptr, offset_ptr, tokens_ptr, pos_ptr,
    R, V, n_cand, top_k, inv_temp, stride_c,
    HAS_ROWS: tl.constexpr, TOP_K_SAMPLE: tl.constexpr, ADVANCE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK: tl.constexpr,
):
    """BLOCK_R active rows per program: the token of each row's best key (greedy, or Gumbel-max
    already in the keys), or Gumbel-max over its top_k best logit keys (TOP_K_SAMPLE).
    ADVANCE: also pos[b] += 1, the decode step's position update without a launch of its own."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < R
    if HAS_ROWS:
        b = tl.load(rows_ptr + r, mask=r_mask, other=0).to(tl.int64)
        r_mask = r_mask & (b >= 0)  # -1: a padding slot of a fixed-size row list
    else:
        b = r.to(tl.int64)
    j = tl.arange(0, BLOCK)
    keys = tl.load(cand_ptr + r[:, None] * stride_c + j[None, :],
                   mask=r_mask[:, None] & (j < n_cand)[None, :], other=_KEY_MIN)
    best = tl.max(keys, axis=1)
    if TOP_K_SAMPLE:
        kth = best
        for _ in range(top_k - 1):  # walk down to the k-th largest key (keys are distinct)
            kth = tl.max(tl.where(keys < kth[:, None], keys, _KEY_MIN), axis=1)
        logit, idx = _unpack(keys)
        noise = _gumbel(tl.load(seed_ptr), tl.load(offset_ptr) + b[:, None] * V + idx)
        # padding (fewer than top_k real candidates) decodes to an index >= V
        chosen = (keys >= kth[:, None]) & (idx < V)
        best = tl.max(tl.where(chosen, _pack(logit * inv_temp + noise, idx), _KEY_MIN), axis=1)
    tl.store(tokens_ptr + b, _unpack(best)[1].to(tl.int64), mask=r_mask)
    if ADVANCE:
        tl.store(pos_ptr + b, tl.load(pos_ptr + b, mask=r_mask) + 1, mask=r_mask)


def _scratch_sizes(rows: int, V: int, top_k: int) -> list[int]:
    """int64 elements of each candidate level for ``rows`` rows: the tile kernel's, then those of
    each cut-down pass (top-k lists longer than _CHUNK)."""
    kp = max(top_k, 1)
    n = triton.cdiv(V, BLOCK_V) * kp
    sizes = [rows * n]
    while n > _CHUNK:
        n = triton.cdiv(n, _CHUNK) * kp
        sizes.append(rows * n)
    return sizes


def lm_head_scratch(rows: int, vocab_size: int, top_k: int | None = None,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """The int64 scratch ``lm_head`` needs for ``rows`` active rows (top_k as passed; None for
    greedy or plain sampling): pass it as ``scratch=`` so a call allocates nothing."""
    return torch.empty(sum(_scratch_sizes(rows, vocab_size, top_k or 0)), dtype=torch.int64,
                       device=device)


def _sample_top_k(temperature: float, top_k: int, vocab_size: int) -> int:
    """The top-k the kernels sample with: 0 for greedy, plain sampling or top_k >= the whole
    vocabulary (every token a candidate)."""
    return top_k if temperature > 0 and 0 < top_k < vocab_size else 0


def _launch(x, norm_weight, weight, w_scale, w_offset, group, wfmt, eps, temperature, top_k,
            seed, offset, rows, logits_out, tokens_out, scratch, positions, vocab_start,
            vocab_size, keys_out):
    M, H = x.shape
    V = weight.shape[0]
    R = M if rows is None else rows.shape[0]
    if R == 0:
        return
    sample = temperature > 0
    top_k = _sample_top_k(temperature, top_k, vocab_size)
    kp = max(top_k, 1)  # candidates kept per tile and row
    tiles = triton.cdiv(V, BLOCK_V)
    sizes = _scratch_sizes(R, V, top_k)
    if scratch is None:
        scratch = torch.empty(sum(sizes), dtype=torch.int64, device=x.device)
    levels = scratch[:sum(sizes)].split(sizes)
    cand = levels[0].view(R, tiles * kp)
    inv_temp = 1.0 / temperature if sample else 1.0
    # unread pointer arguments get a placeholder tensor
    rows_arg = cand if rows is None else rows
    seed, offset = (seed, offset) if sample else (cand, cand)
    grid = lambda meta: (tiles, triton.cdiv(R, meta["BLOCK_M"]))  # noqa: E731
    _lm_head_tile_kernel[grid](
        x, norm_weight, weight, w_scale, w_offset, rows_arg, seed, offset,
        cand if logits_out is None else logits_out, cand,
        R, H, V, vocab_start, vocab_size, eps, inv_temp, min(triton.next_power_of_2(R), 64),
        x.stride(0), weight.stride(0), w_scale.stride(0),
        0 if logits_out is None else logits_out.stride(0), cand.stride(0),
        HAS_ROWS=rows is not None, WRITE_LOGITS=logits_out is not None,
        NOISE=sample and not top_k, DOT_PRECISION=dot_precision(x.dtype), WFMT=wfmt,
        GROUP=group, KP=kp, BLOCK_V=BLOCK_V,
    )
    n_cand = cand.shape[1]
    # the last level (keys_out) cuts each row down to its kp best in one chunk
    for level in levels[1:] + ((keys_out,) if keys_out is not None else ()):
        chunks = triton.cdiv(n_cand, _CHUNK)
        out = level.view(R, chunks * kp) if level is not keys_out else keys_out
        _top_candidates_kernel[(R, chunks)](cand, out, n_cand, cand.stride(0), out.stride(0),
                                           KP=kp, BLOCK=min(_CHUNK, triton.next_power_of_2(
                                               n_cand)))
        cand, n_cand = out, out.shape[1]
    if keys_out is None:
        _select(cand, rows, seed, offset, tokens_out, positions, vocab_size, top_k, inv_temp)


def _select(cand, rows, seed, offset, tokens_out, positions, vocab_size, top_k, inv_temp):
    """Phase 2: each active row's token from its candidate keys cand [R, n] (see _select_kernel;
    ``seed``/``offset`` placeholders when greedy)."""
    R, n_cand = cand.shape
    rows_arg = cand if rows is None else rows
    block = triton.next_power_of_2(n_cand)
    block_r = max(1, min(16, _CHUNK // block))  # rows per program: a block of <= _CHUNK keys
    _select_kernel[(triton.cdiv(R, block_r),)](
        cand, rows_arg, seed, offset, tokens_out, cand if positions is None else positions,
        R, vocab_size, n_cand, top_k, inv_temp, cand.stride(0),
        HAS_ROWS=rows is not None, TOP_K_SAMPLE=top_k > 0, ADVANCE=positions is not None,
        BLOCK_R=block_r, BLOCK=block,
    )


@torch.library.custom_op("d3kernels::lm_head",
                         mutates_args=("logits_out", "tokens_out", "scratch", "positions",
                                       "keys_out"))
def _lm_head_op(x: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor,
                w_scale: torch.Tensor, w_offset: torch.Tensor, group: int, wfmt: int, eps: float,
                temperature: float, top_k: int, seed: Optional[torch.Tensor],
                offset: Optional[torch.Tensor],
                rows: Optional[torch.Tensor], logits_out: Optional[torch.Tensor],
                tokens_out: Optional[torch.Tensor], scratch: Optional[torch.Tensor],
                positions: Optional[torch.Tensor], vocab_start: int, vocab_size: int,
                keys_out: Optional[torch.Tensor]) -> None:
    _launch(x, norm_weight, weight, w_scale, w_offset, group, wfmt, eps, temperature, top_k,
            seed, offset, rows, logits_out, tokens_out, scratch, positions, vocab_start,
            vocab_size, keys_out)


@_lm_head_op.register_fake
def _(x, norm_weight, weight, w_scale, w_offset, group, wfmt, eps, temperature, top_k, seed,
      offset, rows, logits_out, tokens_out, scratch, positions, vocab_start, vocab_size,
      keys_out):
    return None


@torch.library.custom_op("d3kernels::lm_head_select", mutates_args=("tokens_out", "positions"))
def _lm_head_select_op(keys: torch.Tensor, vocab_size: int, temperature: float, top_k: int,
                       seed: Optional[torch.Tensor], offset: Optional[torch.Tensor],
                       rows: Optional[torch.Tensor], tokens_out: torch.Tensor,
                       positions: Optional[torch.Tensor]) -> None:
    if keys.shape[0] == 0:
        return
    top_k = _sample_top_k(temperature, top_k, vocab_size)
    seed, offset = (seed, offset) if temperature > 0 else (keys, keys)
    _select(keys, rows, seed, offset, tokens_out, positions, vocab_size, top_k,
            1.0 / temperature if temperature > 0 else 1.0)


@_lm_head_select_op.register_fake
def _(keys, vocab_size, temperature, top_k, seed, offset, rows, tokens_out, positions):
    return None


def _scalar_tensor(name: str, value, device: torch.device) -> torch.Tensor:
    """An int64 [1] tensor on ``device``: a tensor is checked and used as is (graph-safe)."""
    if isinstance(value, torch.Tensor):
        check_tensor(name, value, dtype=torch.int64, device=device)
        if value.numel() != 1:
            raise ValueError(f"{name} must hold one value, got shape {list(value.shape)}")
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int or an int64 tensor, got {type(value).__name__}")
    return torch.tensor([value], dtype=torch.int64, device=device)


def lm_head(x: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor | QuantizedWeight,
            eps: float, *, temperature: float = 0.0, top_k: int | None = None, seed=None,
            offset=0,
            rows: torch.Tensor | None = None, logits_out: torch.Tensor | None = None,
            tokens_out: torch.Tensor | None = None, scratch: torch.Tensor | None = None,
            positions: torch.Tensor | None = None, vocab_start: int = 0,
            vocab_size: int | None = None, keys_out: torch.Tensor | None = None) -> torch.Tensor:
    """Final RMSNorm + vocab projection + greedy or sampled token, one pass over the vocab.

    Args:
        x: [M, H] fp32/fp16/bf16, last hidden states (before the final norm).
        norm_weight: [H], x's dtype, the final norm's weight.
        weight: [V, H], the vocab projection (any V, e.g. 128256): a float tensor of x's
            dtype, or a QuantizedWeight (int4/int8, dequantized tile by tile in registers).
        eps: RMSNorm epsilon.
        temperature: 0 for greedy (argmax; ties go to the smallest index, as torch.argmax);
            > 0 samples softmax(logits / temperature) by Gumbel-max.
        top_k: None, or 1..64: sample among the top_k logits only (ties at the k-th value go to
            the smaller index). Ignored when greedy; top_k >= V samples the whole vocab.
        seed: int or int64 tensor [1] on x's device, the Philox seed; None draws one from torch's
            default CPU generator (follows torch.manual_seed). Only read when sampling.
        offset: int or int64 tensor [1] on x's device, added to the noise counter
            ``row * V + vocab_index``: give each step a new offset (advancing by M * V keeps
            every draw of a run distinct). Pass tensors to keep a captured CUDA graph
            replayable: the kernels read them at run time (an int is copied to the device).
        rows: None (all rows) or int32 [R] of distinct rows of x to process; other entries of
            the outputs are left as they were.
        logits_out: optional fp32 [M, V] buffer that receives the logits (processed rows only).
        tokens_out: optional int64 [M] buffer for the token ids; allocated when None.
        scratch: optional int64 buffer of at least ``lm_head_scratch(R, V, top_k)``'s size for
            the candidates (R = active rows); allocated per call when None. With tokens_out
            and scratch given a call allocates nothing.
        positions: optional int32 [M]: each processed row's entry is incremented by one once
            its token is chosen (a decode step's position update, folded into the last launch).
        vocab_start, vocab_size: ``weight``'s V rows are entries vocab_start..vocab_start+V-1
            of a vocabulary of vocab_size (default: V, from 0), e.g. a tensor-parallel rank's
            slice. Token ids, keys and the noise counter use those global indices.
        keys_out: optional int64 [R, lm_head_candidates(temperature, top_k, vocab_size)]: make
            no choice (tokens_out and positions must be None) but write each active row's
            candidates, in rows' order: its best key (greedy, or plain sampling, the noise
            already added) or its top_k best logit keys (top-k sampling; missing ones are the
            smallest int64). A key is the fp32 score's order-preserving bits in the high word
            and 0x7FFFFFFF - index in the low one. Every slice's keys side by side, passed to
            :func:`lm_head_select` with the same sampling arguments, pick the token that
            ``lm_head`` on the whole weight picks (tensor parallelism exchanges only these).

    Returns:
        int64 [M] token ids (``tokens_out`` when given; unprocessed rows of a fresh buffer hold
        uninitialized values), or ``keys_out`` when given. fp32 logits (fp32 inputs multiply
        in IEEE fp32 on a GPU too, no tf32); no [M, V] tensor exists unless ``logits_out``
        asks.
    """
    check_tensor("x", x, ndim=2, dtype=FLOAT_DTYPES)
    M, H = x.shape
    dev, dt = x.device, x.dtype
    check_tensor("norm_weight", norm_weight, shape=(H,), dtype=dt, device=dev)
    w = weight_operand("weight", weight, (None, H), dt, dev)
    V = w.data.shape[0]
    if V == 0:
        raise ValueError("weight must have at least one vocab row")
    check_eps(eps)
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be an int >= 0, got {vocab_start!r}")
    vocab_size = vocab_start + V if vocab_size is None else vocab_size
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) \
            or not vocab_start + V <= vocab_size < 2 ** 31:
        raise ValueError(f"vocab_size must be an int in [vocab_start + V, 2**31) = "
                         f"[{vocab_start + V}, 2**31) (weight has V={V} rows from "
                         f"vocab_start={vocab_start}), got {vocab_size!r}")
    _check_sampling(temperature, top_k)
    check_rows(rows, M, dev)
    R = M if rows is None else rows.numel()
    if logits_out is not None:
        check_tensor("logits_out", logits_out, shape=(M, V), dtype=torch.float32, device=dev)
    if keys_out is not None:
        if tokens_out is not None or positions is not None:
            raise ValueError("keys_out makes no choice: pass neither tokens_out nor positions "
                             "with it (lm_head_select takes them)")
        check_tensor("keys_out", keys_out, dtype=torch.int64, device=dev, shape=(
            R, lm_head_candidates(temperature, top_k, vocab_size)))
    elif tokens_out is None:
        tokens_out = torch.empty((M,), dtype=torch.int64, device=dev)
    else:
        check_tensor("tokens_out", tokens_out, shape=(M,), dtype=torch.int64, device=dev)
    if positions is not None:
        check_tensor("positions", positions, shape=(M,), dtype=torch.int32, device=dev)
    if scratch is not None:
        check_tensor("scratch", scratch, ndim=1, dtype=torch.int64, device=dev)
        need = sum(_scratch_sizes(R, V, _sample_top_k(temperature, top_k or 0, vocab_size)))
        if scratch.numel() < need:
            raise ValueError(f"scratch holds {scratch.numel()} elements, this call needs {need} "
                             "(see lm_head_scratch)")
    seed, offset = _noise_tensors(temperature, seed, offset, dev)
    check_launchable(x)
    _lm_head_op(x, norm_weight, w.data, w.scale, w.offset, w.group, w.wfmt, float(eps),
                float(temperature), top_k or 0, seed, offset, rows, logits_out, tokens_out,
                scratch, positions, vocab_start, vocab_size, keys_out)
    return tokens_out if keys_out is None else keys_out


def lm_head_candidates(temperature: float, top_k: int | None, vocab_size: int) -> int:
    """How many candidate keys per row ``lm_head(..., keys_out=)`` writes: top_k for top-k
    sampling below the whole vocabulary, else 1."""
    return max(_sample_top_k(temperature, top_k or 0, vocab_size), 1)


def lm_head_select(keys: torch.Tensor, vocab_size: int, *, temperature: float = 0.0,
                   top_k: int | None = None, seed=None, offset=0,
                   rows: torch.Tensor | None = None, tokens_out: torch.Tensor | None = None,
                   positions: torch.Tensor | None = None) -> torch.Tensor:
    """The token of each row from candidate keys, as ``lm_head`` would choose on the whole
    vocabulary: the largest key (greedy, plain sampling), or Gumbel-max over the top_k largest
    logit keys with the same noise as ``lm_head`` (top-k sampling). One launch.

    Args:
        keys: int64 [R, n], row r's candidates: every vocab slice's ``lm_head(keys_out=)``
            side by side (any order), with the same temperature, top_k, seed and offset.
        vocab_size: the whole vocabulary (the noise counter's row stride).
        temperature, top_k, seed, offset: as ``lm_head`` (a seed of None draws one from
            torch's default generator, so tensor-parallel ranks must pass one they share).
        rows, tokens_out, positions: as ``lm_head``: row r's token goes to
            tokens_out[rows[r]] (rows None: tokens_out[r]; -1 entries skipped), positions of
            those rows advance by one. tokens_out: int64 [M], allocated [R] when None.

    Returns ``tokens_out``. Raises ValueError for bad arguments before any launch.
    """
    check_tensor("keys", keys, ndim=2, dtype=torch.int64)
    dev = keys.device
    R = keys.shape[0]
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) \
            or not 1 <= vocab_size < 2 ** 31:
        raise ValueError(f"vocab_size must be an int in [1, 2**31), got {vocab_size!r}")
    _check_sampling(temperature, top_k)
    need = lm_head_candidates(temperature, top_k, vocab_size)
    if keys.shape[1] < need:
        raise ValueError(f"keys must hold at least {need} candidates per row for this "
                         f"temperature and top_k, got {keys.shape[1]}")
    if keys.shape[1] > _CHUNK:
        raise ValueError(f"keys may hold at most {_CHUNK} candidates per row, got "
                         f"{keys.shape[1]}")
    if tokens_out is None:
        if rows is not None:
            raise ValueError("rows needs tokens_out (the rows index into it)")
        tokens_out = torch.empty((R,), dtype=torch.int64, device=dev)
    else:
        check_tensor("tokens_out", tokens_out, ndim=1, dtype=torch.int64, device=dev)
    M = tokens_out.shape[0]
    check_rows(rows, M, dev)
    if rows is None and R > M:
        raise ValueError(f"keys has {R} rows but tokens_out only {M}")
    if rows is not None and rows.numel() != R:
        raise ValueError(f"rows must hold one row per keys row ({R}), got {rows.numel()}")
    if positions is not None:
        check_tensor("positions", positions, shape=(M,), dtype=torch.int32, device=dev)
    seed, offset = _noise_tensors(temperature, seed, offset, dev)
    check_launchable(keys)
    _lm_head_select_op(keys, vocab_size,
                       float(temperature), top_k or 0, seed, offset, rows, tokens_out, positions)
    return tokens_out


def _check_sampling(temperature, top_k) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or not 1 <= top_k <= MAX_TOP_K):
        raise ValueError(f"top_k must be None or an int in [1, {MAX_TOP_K}], got {top_k!r}")


def _noise_tensors(temperature, seed, offset, dev):
    """(seed, offset) as int64 [1] device tensors when sampling (None seed: drawn from torch's
    default generator); (None, None) when greedy, which reads neither and must not copy them to
    the device (graph capture)."""
    if not temperature > 0:
        return None, None
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, ()))
    return _scalar_tensor("seed", seed, dev), _scalar_tensor("offset", offset, dev)
