"""swiglu_gate_up and down_residual, alone and composed, against the float64 reference; float
and weight-only int8/int4 weights (the reference multiplies by the reference dequantization)."""
from __future__ import annotations

import pytest
import torch

import reference
from d3kernels.ops._quant import weight_operand
from d3kernels.ops._tuning import only_config
from d3kernels.ops.swiglu import (_down_residual_kernel, _gate_up_kernel, down_residual,
                                  swiglu_gate_up)
from d3kernels.quant import quantize
from tests.ops.conftest import (CUDA, DEVICE, DTYPES, assert_close, gpu, poisoned, rand_quantized,
                                randn)
from tests.ops.paged import shuffled_block_table

EPS = 1e-5

SHAPES = [(M, H, inter) for M in (1, 3, 17, 40) for H in (96, 200) for inter in (160, 352)]
# Active-row subsets need at least two rows.
MLP_CASES = [(*shape, use_rows) for shape in SHAPES for use_rows in (False, True)
             if shape[0] > 1 or not use_rows]


# Weight-only formats as (fmt, group size): int4 in small and large groups, int8 grouped as
# GGUF's Q8_0 and per row (None: G = K, quantize="int8"'s default).
QUANTS = [("int4", 32), ("int4", 128), ("int8", 32), ("int8", None)]


def _weights(H, inter, dtype):
    """Llama-like scales, so every product is O(1) and silu sees both signs."""
    w_gate_up = randn(2 * inter, H, dtype=dtype, scale=H ** -0.5)
    w_down = randn(H, inter, dtype=dtype, scale=inter ** -0.5)
    return w_gate_up, w_down


def _weight(N, K, dtype, quant):
    """An [N, K] weight at Llama scale: float of ``dtype`` (quant None) or quantized to quant =
    (fmt, group size); and the float64 CPU weight the reference multiplies by."""
    if quant is None:
        w = randn(N, K, dtype=dtype, scale=K ** -0.5)
        return w, w.double().cpu()
    w, ref = rand_quantized(N, K, fmt=quant[0], group_size=quant[1], scale=K ** -0.5)
    return w, ref.cpu()


def _rows(M, seed):
    """None for a single row; otherwise a shuffled subset of about two thirds of the batch."""
    if M == 1:
        return None
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(M, generator=g)[: max(1, 2 * M // 3)]
    return perm.to(torch.int32).to(DEVICE)


def _norm_weight(H, dtype):
    """An RMSNorm weight away from 1."""
    return (torch.rand(H, dtype=torch.float64) + 0.5).to(dtype=dtype, device=DEVICE)


def _gate_up_ref(x, w_gate_up, norm=None):
    """float64 silu(h @ gate.T) * (h @ up.T), h = x or rms_norm(x, norm)."""
    x, w = x.double().cpu(), w_gate_up.double().cpu()
    if norm is not None:
        x = reference.rms_norm(x, norm.double().cpu(), EPS)
    gate, up = x @ w[: w.shape[0] // 2].T, x @ w[w.shape[0] // 2:].T
    return gate / (1 + torch.exp(-gate)) * up


def _idle(M, rows):
    mask = torch.ones(M, dtype=torch.bool)
    mask[rows.long().cpu()] = False
    return mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,H,inter,use_rows", MLP_CASES)
def test_swiglu_mlp(dtype, M, H, inter, use_rows):
    """gate_up then down_residual == residual + reference.swiglu_mlp; idle rows untouched."""
    seed = M * 100_003 + H * 1009 + inter * 7 + use_rows * 3 + DTYPES.index(dtype)
    torch.manual_seed(seed)
    x = randn(M, H, dtype=dtype)
    w_gate_up, w_down = _weights(H, inter, dtype)
    residual = randn(M, H, dtype=dtype, scale=0.5)
    start = residual.clone()
    rows = _rows(M, seed) if use_rows else None
    h = swiglu_gate_up(x, w_gate_up, rows=rows, out=poisoned((M, inter), dtype))
    down_residual(h, w_down, residual, rows=rows)

    w = w_gate_up.double().cpu()
    ref = start.double().cpu() + reference.swiglu_mlp(
        x.double().cpu(), w[:inter], w[inter:], w_down.double().cpu())
    if rows is None:
        assert_close(residual, ref, dtype)
        return
    active, idle = rows.long().cpu(), _idle(M, rows)
    residual, start = residual.cpu(), start.cpu()
    assert_close(residual[active], ref[active], dtype)
    assert torch.equal(residual[idle], start[idle]), "rows not listed must keep their residual"
    assert h.cpu()[idle].isnan().all(), "rows not listed must not be written"


def _check_gate_up(M, H, inter, dtype, rows, norm, seed, quant=None):
    """swiglu_gate_up on strided rows of x (an un-normed residual, scale 3, with ``norm``) against
    the reference, the weight float or quantized (``quant``, see _weight); rows not listed (and
    -1 padding slots) leave out poisoned."""
    torch.manual_seed(seed)
    x = randn(M, H + 24, dtype=dtype, scale=3.0 if norm else 1.0)[:, :H]
    w_gate_up, w_ref = _weight(2 * inter, H, dtype, quant)
    norm_weight = _norm_weight(H, dtype) if norm else None
    rows_t = None if rows is None else torch.tensor(rows, dtype=torch.int32, device=DEVICE)
    out = poisoned((M, inter), dtype)
    assert swiglu_gate_up(x, w_gate_up, rows=rows_t, out=out, norm_weight=norm_weight,
                          eps=EPS) is out
    ref = _gate_up_ref(x, w_ref, norm_weight)
    active = torch.arange(M) if rows is None else torch.tensor([r for r in rows if r >= 0])
    assert_close(out.cpu()[active], ref[active], dtype)
    if rows is not None:
        idle = torch.ones(M, dtype=torch.bool)
        idle[active] = False
        assert out.cpu()[idle].isnan().all(), "rows not listed must not be written"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,H,inter,rows,norm", [
    (1, 200, 352, None, False),
    (17, 96, 160, None, False),
    (40, 200, 160, None, False),
    (1, 200, 352, None, True),           # norm prologue, batch 1
    (1, 96, 160, [0], True),             # batch 1 through rows
    (17, 96, 160, [16, 3, 0, 9], True),  # rows out of order, one past a 16-row tile
    (40, 200, 160, None, True),
])
def test_swiglu_gate_up(dtype, M, H, inter, rows, norm):
    _check_gate_up(M, H, inter, dtype, rows, norm, seed=M * 1000 + H + inter + 7 * norm)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_gate_up_allocates(dtype):
    torch.manual_seed(4)
    x = randn(3, 96, dtype=dtype)
    w_gate_up, _ = _weights(96, 160, dtype)
    out = swiglu_gate_up(x, w_gate_up)
    assert out.shape == (3, 160) and out.dtype == dtype
    assert_close(out, _gate_up_ref(x, w_gate_up), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,H,inter", [(1, 96, 352), (17, 200, 160), (40, 96, 352)])
def test_down_residual(dtype, M, H, inter):
    torch.manual_seed(M * 999 + H + inter)
    h = randn(M, inter + 8, dtype=dtype)[:, :inter]
    _, w_down = _weights(H, inter, dtype)
    residual = randn(M, H + 16, dtype=dtype, scale=0.5)[:, :H]
    ref = residual.double().cpu() + h.double().cpu() @ w_down.double().cpu().T
    down_residual(h, w_down, residual)
    assert_close(residual, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_down_residual_rows(dtype):
    M, H, inter = 40, 200, 352
    torch.manual_seed(41)
    h = randn(M, inter, dtype=dtype)
    _, w_down = _weights(H, inter, dtype)
    residual = randn(M, H, dtype=dtype)
    start = residual.clone()
    rows = _rows(M, 41)
    down_residual(h, w_down, residual, rows=rows)
    ref = start.double().cpu() + h.double().cpu() @ w_down.double().cpu().T
    active, idle = rows.long().cpu(), _idle(M, rows)
    residual, start = residual.cpu(), start.cpu()
    assert_close(residual[active], ref[active], dtype)
    assert torch.equal(residual[idle], start[idle])


def _check_down_stash(dtype, H, inter, seed, quant=None):
    """The updated residual also lands at stash[stash_index[b], page, p % S] (p = positions[b],
    page its block-table entry) for the processed rows whose stash_index is >= 0, whose p lies
    in the row's table and whose page is not -1, and nowhere else; a -1 slot of rows is skipped
    and an unlisted row keeps its residual."""
    M, runs, PS, NP, P = 5, 3, 2, 4, 23
    torch.manual_seed(seed)
    h = randn(M, inter, dtype=dtype)
    w_down, w_ref = _weight(H, inter, dtype, quant)
    residual = randn(M, H, dtype=dtype)
    start = residual.clone()
    big = poisoned((runs, P + 2, PS, H + 8), dtype)  # strided pages and rows, as KVCache.stash
    stash = big[:, 1:P + 1, :, :H]
    # row 1 sits past its NP·S = 8 slots and row 4 before slot 0: neither is stored
    positions = torch.tensor([3, 9, 6, 1, -1], dtype=torch.int32, device=DEVICE)
    stash_index = torch.tensor([2, 0, 0, 1, 1], dtype=torch.int32, device=DEVICE)
    rows = torch.tensor([4, 0, -1, 2, 1], dtype=torch.int32, device=DEVICE)
    table = shuffled_block_table([NP] * M, NP, P, seed)
    table[2, 3] = -1  # row 2's position 6: no page, nothing stored
    down_residual(h, w_down, residual, rows=rows, stash=stash, stash_index=stash_index,
                  positions=positions, block_table=table)
    ref = start.double().cpu() + h.double().cpu() @ w_ref.T
    assert torch.equal(residual[3], start[3]), "a row not listed must keep its residual"
    written = torch.zeros(runs, P, PS, dtype=torch.bool)
    for b in (4, 0, 2, 1):
        assert_close(residual[b], ref[b], dtype)
        s, p = int(stash_index[b]), int(positions[b])
        page = int(table[b, p // PS]) if 0 <= p < NP * PS else -1
        if s >= 0 and page >= 0:  # the stored sum, bit for bit
            assert torch.equal(stash[s, page, p % PS], residual[b])
            written[s, page, p % PS] = True
    # only row 0: row 2 has no page, row 1 is past its table (it would land in another row's
    # page), row 4 before its first slot, row 3 is not processed
    assert written.sum() == 1
    assert stash.isnan().all(dim=-1).cpu().eq(~written).all()  # nothing else stored
    assert big[:, 0].isnan().all() and big[:, P + 1].isnan().all()
    assert big[..., H:].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_down_residual_stash(dtype):
    _check_down_stash(dtype, 96, 160, seed=43)


def test_swiglu_empty_rows():
    x = randn(3, 96)
    w_gate_up, w_down = _weights(96, 160, torch.float32)
    none = torch.empty(0, dtype=torch.int32, device=DEVICE)
    out = swiglu_gate_up(x, w_gate_up, rows=none, out=poisoned((3, 160), torch.float32))
    assert out.isnan().all()
    residual = randn(3, 96)
    start = residual.clone()
    down_residual(out, w_down, residual, rows=none)
    assert torch.equal(residual, start)


def i32z(n):
    return torch.zeros(n, dtype=torch.int32, device=DEVICE)


def test_swiglu_bad_input():
    x = randn(3, 96)
    w_gate_up, w_down = _weights(96, 160, torch.float32)
    h, residual = randn(3, 160), randn(3, 96)
    gate_up_cases = [
        (dict(x=x[0]), "x"),
        (dict(x=x.t().contiguous().t()), "x"),
        (dict(w_gate_up=w_gate_up[:, :64]), "w_gate_up"),
        (dict(w_gate_up=w_gate_up[:319]), "w_gate_up"),
        (dict(w_gate_up=w_gate_up.half()), "w_gate_up"),
        (dict(out=torch.empty(3, 320)), "out"),
        (dict(rows=torch.tensor([0], device=DEVICE)), "rows"),
        (dict(norm_weight=randn(95)), "norm_weight"),
        (dict(norm_weight=randn(96, dtype=torch.float16)), "norm_weight"),
        (dict(norm_weight=randn(96), eps=-1.0), "eps"),
    ]
    for override, name in gate_up_cases:
        args = dict(x=x, w_gate_up=w_gate_up, rows=None, out=None) | override
        with pytest.raises(ValueError, match=rf"^{name}\b"):
            swiglu_gate_up(args.pop("x"), args.pop("w_gate_up"), **args)
    down_cases = [
        (dict(h=h.long()), "h"),
        (dict(w_down=w_down[:, :100]), "w_down"),
        (dict(residual=residual[:, :95]), "residual"),
        (dict(residual=residual[:2]), "residual"),
        (dict(residual=residual.half()), "residual"),
        (dict(rows=torch.zeros(4, dtype=torch.int32, device=DEVICE)), "rows"),
        (dict(stash=randn(1, 3, 4, 96)), "stash, stash_index, positions and block_table"),
    ]
    table = torch.zeros(3, 2, dtype=torch.int32, device=DEVICE)
    stashed = dict(stash=poisoned((1, 3, 4, 96), torch.float32), stash_index=i32z(3),
                   positions=i32z(3),
                   block_table=table)
    down_cases += [(stashed | bad, name) for bad, name in [
        (dict(stash=randn(1, 3, 4, 95)), "stash"),
        (dict(stash=randn(1, 3, 6, 96)), "stash"),  # page size not a power of two
        (dict(stash_index=i32z(2)), "stash_index"),
        (dict(positions=torch.zeros(3, device=DEVICE)), "positions"),
        (dict(block_table=table.long()), "block_table"),
        (dict(block_table=table[:2]), "block_table"),
        (dict(block_table=table + 3), "block_table"),  # page 3 of a 3-page stash
        (dict(block_table=table - 2), "block_table"),
    ]]
    before = residual.clone()
    for override, name in down_cases:
        args = dict(h=h, w_down=w_down, residual=residual, rows=None) | override
        with pytest.raises(ValueError, match=rf"^{name}\b"):
            down_residual(args.pop("h"), args.pop("w_down"), args.pop("residual"), **args)
    assert torch.equal(residual, before) and stashed["stash"].isnan().all()  # nothing stored


@pytest.mark.parametrize("quant", [None, ("int4", 32), ("int8", None)])
def test_swiglu_opcheck(quant):
    x = randn(3, 96)
    w_gate_up = weight_operand("w_gate_up", _weight(320, 96, torch.float32, quant)[0],
                               (320, 96), torch.float32, DEVICE)
    w_down = weight_operand("w_down", _weight(96, 160, torch.float32, quant)[0], (96, 160),
                            torch.float32, DEVICE)
    rows = torch.tensor([2, -1, 0], dtype=torch.int32, device=DEVICE)
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    for r, norm in ((None, None), (rows, _norm_weight(96, torch.float32))):
        torch.library.opcheck(torch.ops.d3kernels.swiglu_gate_up.default,
                              (x, *w_gate_up, r, torch.empty(3, 160), norm, EPS),
                              test_utils=utils)
        torch.library.opcheck(torch.ops.d3kernels.down_residual.default,
                              (randn(3, 160), *w_down, randn(3, 96), r, randn(2, 5, 2, 96),
                               torch.tensor([1, -1, 0], dtype=torch.int32, device=DEVICE),
                               torch.tensor([1, 3, 0], dtype=torch.int32, device=DEVICE),
                               torch.tensor([[4, 0], [1, 2], [3, -1]], dtype=torch.int32,
                                            device=DEVICE)),
                              test_utils=utils)


# Quantized weights, (H, I) per group size: N not a power of two and K of several groups in both
# ops (gate_up: N = I, K = H; down: N = H, K = I); int8 per row has one group per row.
QUANT_SHAPES = {32: (96, 160), None: (96, 160), 128: (384, 640)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("M,rows,norm", [
    (17, None, False),                # every row, one past a 16-row tile
    (17, [16, -1, 3, 0, 9], True),    # norm prologue, rows out of order with a padding slot
])
def test_swiglu_gate_up_quantized(dtype, quant, M, rows, norm):
    H, inter = QUANT_SHAPES[quant[1]]
    _check_gate_up(M, H, inter, dtype, rows, norm, seed=QUANTS.index(quant) * 10 + norm,
                   quant=quant)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("quant", QUANTS)
def test_down_residual_quantized(dtype, quant):
    """Every row of strided h and residual (17: one past a 16-row tile)."""
    M, (H, inter) = 17, QUANT_SHAPES[quant[1]]
    torch.manual_seed(QUANTS.index(quant))
    h = randn(M, inter + 8, dtype=dtype)[:, :inter]
    w_down, w_ref = _weight(H, inter, dtype, quant)
    residual = randn(M, H + 16, dtype=dtype, scale=0.5)[:, :H]
    ref = residual.double().cpu() + h.double().cpu() @ w_ref.T
    down_residual(h, w_down, residual)
    assert_close(residual, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("quant", QUANTS)
def test_down_residual_quantized_stash(dtype, quant):
    H, inter = QUANT_SHAPES[quant[1]]
    _check_down_stash(dtype, H, inter, seed=50 + QUANTS.index(quant), quant=quant)


def test_swiglu_quantized_bad_input():
    """A QuantizedWeight of the wrong shape or device is refused, naming the argument."""
    x, h, residual = randn(3, 96), randn(3, 160), randn(3, 96)

    def q(N, K, fmt):
        return quantize(torch.randn(N, K), fmt, 32).to(DEVICE)

    w_gate_up = q(320, 96, "int4")
    for w, name in ((q(320, 64, "int4"), "w_gate_up"),       # K is not x's H
                    (w_gate_up[:319], "w_gate_up"),         # gate and up rows do not pair
                    (w_gate_up.to("meta"), "w_gate_up")):   # another device
        with pytest.raises(ValueError, match=rf"^{name}\b"):
            swiglu_gate_up(x, w)
    for w, name in ((q(96, 128, "int8"), "w_down"),        # K is not h's I
                    (q(80, 160, "int4"), "residual"),      # N is not residual's H
                    (quantize(torch.randn(2, 96, 160), "int8", 32).to(DEVICE), "w_down"),  # a stack
                    (q(96, 160, "int8").to("meta"), "w_down")):
        with pytest.raises(ValueError, match=rf"^{name}\b"):
            down_residual(h, w, residual)


@gpu
@pytest.mark.parametrize("M", [1, 32, 128])
@pytest.mark.parametrize("H,inter", [(4096, 11008), (4096, 14336)])
def test_swiglu_mlp_llama_shapes(M, H, inter):
    """bf16 at Llama-2-7B / Llama-3-8B MLP shapes, decode and a prefill-sized block."""
    dtype = torch.bfloat16
    torch.manual_seed(M + inter)
    x = randn(M, H, dtype=dtype)
    w_gate_up, w_down = _weights(H, inter, dtype)
    residual = randn(M, H, dtype=dtype, scale=0.5)
    start = residual.clone()
    rows = _rows(M, M)
    h = swiglu_gate_up(x, w_gate_up, rows=rows, out=poisoned((M, inter), dtype))
    down_residual(h, w_down, residual, rows=rows)
    w = w_gate_up.double().cpu()
    ref = start.double().cpu() + reference.swiglu_mlp(
        x.double().cpu(), w[:inter], w[inter:], w_down.double().cpu())
    active = slice(None) if rows is None else rows.long().cpu()
    assert_close(residual.cpu()[active], ref[active], dtype)


@gpu
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("M", [1, 32])
def test_swiglu_mlp_quantized_bf16(quant, M):
    """bf16 activations on quantized weights (bf16 dots run on a GPU only): the decode MLP with
    its norm prologue, active rows and the residual add."""
    dtype, H, inter = torch.bfloat16, 1024, 2816
    torch.manual_seed(M + QUANTS.index(quant))
    residual = randn(M, H, dtype=dtype)
    start = residual.clone()
    w_gate_up, gu_ref = _weight(2 * inter, H, dtype, quant)
    w_down, down_ref = _weight(H, inter, dtype, quant)
    norm = _norm_weight(H, dtype)
    rows = _rows(M, M)
    h = swiglu_gate_up(residual, w_gate_up, rows=rows, out=poisoned((M, inter), dtype),
                       norm_weight=norm, eps=EPS)
    down_residual(h, w_down, residual, rows=rows)
    x = start.double().cpu()
    ref = x + reference.swiglu_mlp(reference.rms_norm(x, norm.double().cpu(), EPS),
                                   gu_ref[:inter], gu_ref[inter:], down_ref)
    if rows is None:
        assert_close(residual, ref, dtype)
        return
    active, idle = rows.long().cpu(), _idle(M, rows)
    assert_close(residual.cpu()[active], ref[active], dtype)
    assert torch.equal(residual.cpu()[idle], start.cpu()[idle])
    assert h.cpu()[idle].isnan().all()


@gpu
def test_swiglu_cuda_graph():
    """The decode MLP (caller-provided buffers, in-place residual) captures and replays."""
    M, H, inter, dtype = 8, 4096, 11008, torch.bfloat16
    x = randn(M, H, dtype=dtype)
    w_gate_up, w_down = _weights(H, inter, dtype)
    residual = randn(M, H, dtype=dtype)
    start = residual.clone()
    h = poisoned((M, inter), dtype)
    rows = torch.tensor([5, 1, 2], dtype=torch.int32, device=DEVICE)

    def mlp():
        swiglu_gate_up(x, w_gate_up, rows=rows, out=h)
        down_residual(h, w_down, residual, rows=rows)

    mlp()  # autotune outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mlp()
    residual.copy_(start)
    graph.replay()
    torch.cuda.synchronize()
    w = w_gate_up.double().cpu()
    ref = start.double().cpu() + reference.swiglu_mlp(
        x.double().cpu(), w[:inter], w[inter:], w_down.double().cpu())
    active, idle = rows.long().cpu(), _idle(M, rows)
    residual, start = residual.cpu(), start.cpu()
    assert_close(residual[active], ref[active], dtype)
    assert torch.equal(residual[idle], start[idle])


# Every tile config the GPU autotuner may pick, on ragged tiles with active rows (fp32: the
# configs are tiles, not dtypes). 3 of 5 rows, H and I past several K and N blocks; int4 in
# groups of 32 (K 96: BLOCK_K both within and across groups), float with K 72.
EVERY_CONFIG_ROWS = [4, 0, 2]
SWEEP_K = {None: 72, ("int4", 32): 96}


@pytest.mark.parametrize("quant", SWEEP_K)
@pytest.mark.parametrize("index", range(len(_gate_up_kernel.all_configs)))
@pytest.mark.skipif(CUDA, reason="an interpreter sweep: on a GPU each config costs a compile")
def test_swiglu_gate_up_every_config(index, quant):
    with only_config(_gate_up_kernel, _gate_up_kernel.all_configs[index]):
        _check_gate_up(5, SWEEP_K[quant], 40, torch.float32, EVERY_CONFIG_ROWS, True,
                       seed=600 + index, quant=quant)


@pytest.mark.parametrize("quant", SWEEP_K)
@pytest.mark.parametrize("index", range(len(_down_residual_kernel.all_configs)))
@pytest.mark.skipif(CUDA, reason="an interpreter sweep: on a GPU each config costs a compile")
def test_down_residual_every_config(index, quant):
    M, H, inter = 5, 40, SWEEP_K[quant]
    torch.manual_seed(700 + index)
    h = randn(M, inter)
    w_down, w_ref = _weight(H, inter, torch.float32, quant)
    residual = randn(M, H)
    start = residual.clone().cpu()
    rows = torch.tensor(EVERY_CONFIG_ROWS, dtype=torch.int32, device=DEVICE)
    with only_config(_down_residual_kernel, _down_residual_kernel.all_configs[index]):
        down_residual(h, w_down, residual, rows=rows)
    ref = start.double() + h.double().cpu() @ w_ref.T
    active, idle = rows.long().cpu(), _idle(M, rows)
    assert_close(residual.cpu()[active], ref[active], torch.float32)
    assert torch.equal(residual.cpu()[idle], start[idle])
