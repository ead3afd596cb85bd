"""decode_embed: a decode step's embedding gather, context lengths and written marks."""
from __future__ import annotations

import pytest
import torch

from d3kernels.ops.decode_embed import decode_embed
from tests.ops.conftest import DEVICE, DTYPES, poisoned, randn


def _case(M, V, H, T, L, dtype, seed):
    torch.manual_seed(seed)
    embed = randn(V, H, dtype=dtype)
    pos = torch.randint(0, T, (M,), dtype=torch.int32, device=DEVICE)
    written = torch.rand(L, M, T, device=DEVICE) < 0.5
    mark = torch.rand(L, device=DEVICE) < 0.5
    return embed, pos, written, mark


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,V,H,T,L", [(1, 50, 96, 5, 3), (4, 300, 1100, 33, 30)])
def test_decode_embed_all_rows(dtype, M, V, H, T, L):
    embed, pos, written, mark = _case(M, V, H, T, L, dtype, seed=M * 31 + H)
    tokens = torch.randint(0, V, (M,), device=DEVICE)
    residual = poisoned((M, H), dtype)
    context = torch.full((M,), -7, dtype=torch.int32, device=DEVICE)
    want_written = written.clone()
    for b in range(M):
        want_written[:, b, pos[b]] = mark
    assert decode_embed(tokens, embed, pos, residual, context, written=written,
                        mark=mark) is residual
    assert torch.equal(residual, embed[tokens])  # a copy: exact in every dtype
    assert torch.equal(context, pos + 1)
    assert torch.equal(written, want_written)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_embed_rows_leave_others_untouched(dtype):
    M, V, H, T, L = 6, 40, 72, 9, 4
    embed, pos, written, mark = _case(M, V, H, T, L, dtype, seed=5)
    rows = torch.tensor([4, 1], dtype=torch.int32, device=DEVICE)
    tokens = torch.tensor([7, 39], device=DEVICE)
    residual = poisoned((M, H), dtype)
    context = torch.full((M,), -7, dtype=torch.int32, device=DEVICE)
    # a strided view, as decode steps pass cache.written[:, :M] of a larger cache
    big = torch.zeros(L, M + 2, T, dtype=torch.bool, device=DEVICE)
    view = big[:, :M]
    decode_embed(tokens, embed, pos, residual, context, rows=rows, written=view, mark=mark)
    for r, b in enumerate(rows.tolist()):
        assert torch.equal(residual[b], embed[tokens[r]])
        assert context[b] == pos[b] + 1
        assert torch.equal(big[:, b, pos[b]], mark)
    others = [b for b in range(M) if b not in rows.tolist()]
    assert residual[others].isnan().all() and (context[others] == -7).all()
    assert big.sum() == mark.sum() * len(rows)  # nothing else written


def test_decode_embed_marks_nothing_past_the_cache():
    """A slot outside [0, T) is the caller's bug, but the mark store stays in bounds: row 0 at
    slot T would otherwise land on row 1's slot 0, row 1 at -1 on row 0's last slot."""
    L, M, V, H, T = 3, 2, 10, 8, 5
    embed, _, _, mark = _case(M, V, H, T, L, torch.float32, seed=3)
    mark = torch.ones(L, dtype=torch.bool, device=DEVICE)
    big = torch.zeros(L, M + 1, T, dtype=torch.bool, device=DEVICE)
    for pos in ([T, 2], [1, -1]):
        big.zero_()
        pos = torch.tensor(pos, dtype=torch.int32, device=DEVICE)
        decode_embed(torch.tensor([1, 2], device=DEVICE), embed, pos,
                     torch.empty(M, H, device=DEVICE),
                     torch.empty(M, dtype=torch.int32, device=DEVICE), written=big[:, :M],
                     mark=mark)
        inside = [b for b in range(M) if 0 <= pos[b] < T]
        assert len(inside) == 1 and big.sum() == L
        assert big[:, inside[0], pos[inside[0]]].all()


def test_decode_embed_bad_input():
    embed, pos, written, mark = _case(3, 10, 8, 4, 2, torch.float32, seed=1)
    res = torch.empty(3, 8, device=DEVICE)
    ctx = torch.empty(3, dtype=torch.int32, device=DEVICE)
    tokens = torch.zeros(3, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="tokens"):
        decode_embed(tokens.int(), embed, pos, res, ctx)
    with pytest.raises(ValueError, match="pos"):
        decode_embed(tokens, embed, pos.long(), res, ctx)
    with pytest.raises(ValueError, match="residual"):
        decode_embed(tokens, embed, pos, res.half(), ctx)
    with pytest.raises(ValueError, match="written and mark"):
        decode_embed(tokens, embed, pos, res, ctx, written=written)
    with pytest.raises(ValueError, match="mark"):
        decode_embed(tokens, embed, pos, res, ctx, written=written, mark=mark[:1])
    with pytest.raises(ValueError, match="rows"):
        decode_embed(tokens, embed, pos, res, ctx, rows=torch.zeros(2, dtype=torch.int32))


def test_decode_embed_opcheck():
    embed, pos, written, mark = _case(3, 10, 8, 4, 2, torch.float32, seed=2)
    args = (torch.tensor([1, 9, 0], device=DEVICE), embed, pos, torch.empty(3, 8, device=DEVICE),
            torch.empty(3, dtype=torch.int32, device=DEVICE), None, written, mark)
    torch.library.opcheck(torch.ops.d3kernels.decode_embed.default, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


def test_decode_embed_per_row_marks():
    """mark [L, M] (here a strided view): each active row stores its own column."""
    M, V, H, T, L = 4, 30, 40, 6, 5
    embed, pos, written, _ = _case(M, V, H, T, L, torch.float32, seed=8)
    mark = (torch.rand(M, L, device=DEVICE) < 0.5).t()  # [L, M], not contiguous
    rows = torch.tensor([2, 0, 3], dtype=torch.int32, device=DEVICE)
    want = written.clone()
    for b in rows.tolist():
        want[:, b, pos[b]] = mark[:, b]
    decode_embed(torch.tensor([1, 2, 3], device=DEVICE), embed, pos, poisoned((M, H),
                 torch.float32), torch.zeros(M, dtype=torch.int32, device=DEVICE), rows=rows,
                 written=written, mark=mark)
    assert torch.equal(written, want)
