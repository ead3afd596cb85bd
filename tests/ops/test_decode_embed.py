"""decode_embed: a decode step's embedding gather, context lengths and written marks (per page
slot of the paged cache, through the block table)."""
from __future__ import annotations

import pytest
import torch

from d3kernels.ops.decode_embed import decode_embed
from tests.ops.conftest import DEVICE, DTYPES, poisoned, randn
from tests.ops.paged import pages_for, shuffled_block_table


def _case(M, V, H, T, L, S, dtype, seed):
    """Embeddings, positions in [0, T), a shuffled table of S-slot pages holding each row's
    positions 0..pos (-1 past them, 2 spare pages) and random marks over the whole pool."""
    torch.manual_seed(seed)
    embed = randn(V, H, dtype=dtype)
    pos = torch.randint(0, T, (M,), dtype=torch.int32, device=DEVICE)
    pages = pages_for(pos + 1, S)
    table = shuffled_block_table(pages, -(-T // S), sum(pages) + 2, seed)
    written = torch.rand(L, sum(pages) + 2, S, device=DEVICE) < 0.5
    mark = torch.rand(L, device=DEVICE) < 0.5
    return embed, pos, table, written, mark


def _expect(written, table, pos, rows, mark):
    """The reference marks: written[:, table[b, pos[b] // S], pos[b] % S] = mark (or its column
    b) for each row b in ``rows`` behind a page."""
    want, S = written.clone(), written.shape[2]
    for b in rows:
        p = int(pos[b])
        page = int(table[b, p // S])
        if page >= 0:
            want[:, page, p % S] = mark if mark.dim() == 1 else mark[:, b]
    return want


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,V,H,T,L,S", [(1, 50, 96, 5, 3, 1), (4, 300, 1100, 33, 30, 16),
                                         (4, 40, 64, 13, 5, 4)])
def test_decode_embed_all_rows(dtype, M, V, H, T, L, S):
    embed, pos, table, written, mark = _case(M, V, H, T, L, S, dtype, seed=M * 31 + H)
    tokens = torch.randint(0, V, (M,), device=DEVICE)
    residual = poisoned((M, H), dtype)
    context = torch.full((M,), -7, dtype=torch.int32, device=DEVICE)
    want = _expect(written, table, pos, range(M), mark)
    assert decode_embed(tokens, embed, pos, residual, context, written=written, mark=mark,
                        block_table=table) is residual
    assert torch.equal(residual, embed[tokens])  # a copy: exact in every dtype
    assert torch.equal(context, pos + 1)
    assert torch.equal(written, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_embed_rows_leave_others_untouched(dtype):
    M, V, H, T, L, S = 6, 40, 72, 9, 4, 4
    embed, pos, table, _, mark = _case(M, V, H, T, L, S, dtype, seed=5)
    rows = torch.tensor([4, 1], dtype=torch.int32, device=DEVICE)
    tokens = torch.tensor([7, 39], device=DEVICE)
    residual = poisoned((M, H), dtype)
    context = torch.full((M,), -7, dtype=torch.int32, device=DEVICE)
    # a strided view of a larger pool, as a layer-sliced cache.written could be
    big = torch.zeros(L + 1, table.max() + 3, S, dtype=torch.bool, device=DEVICE)
    view = big[1:, 1:]
    decode_embed(tokens, embed, pos, residual, context, rows=rows, written=view, mark=mark,
                 block_table=table)
    for r, b in enumerate(rows.tolist()):
        assert torch.equal(residual[b], embed[tokens[r]])
        assert context[b] == pos[b] + 1
        p = int(pos[b])
        assert torch.equal(view[:, table[b, p // S], p % S], mark)
    others = [b for b in range(M) if b not in rows.tolist()]
    assert residual[others].isnan().all() and (context[others] == -7).all()
    assert big.sum() == mark.sum() * len(rows)  # nothing else written


def test_decode_embed_page_boundaries_and_missing_pages():
    """Page size 4: marks at the last slot of a page and the first of the next (3, 4, 7, 8);
    a row whose page at pos is -1 (none allocated) or whose pos is past its table (NP*S) or
    negative marks nothing (the mark store stays in the pool)."""
    L, M, V, H, S = 3, 7, 10, 8, 4
    embed = randn(V, H)
    pos = torch.tensor([3, 4, 7, 8, 5, 12, -1], dtype=torch.int32, device=DEVICE)
    table = shuffled_block_table([1, 2, 2, 3, 2, 3, 1], 3, 16, seed=9)
    table[4, 1] = -1  # row 4's pos 5
    written = torch.zeros(L, 16, S, dtype=torch.bool, device=DEVICE)
    mark = torch.tensor([True, False, True], device=DEVICE)
    decode_embed(torch.arange(M, device=DEVICE), embed, pos, torch.empty(M, H, device=DEVICE),
                 torch.empty(M, dtype=torch.int32, device=DEVICE), written=written, mark=mark,
                 block_table=table)
    assert torch.equal(written, _expect(torch.zeros_like(written), table, pos, range(4), mark))
    assert written.sum() == 4 * mark.sum()


def test_decode_embed_per_row_marks():
    """mark [L, M] (here a strided view): each active row stores its own column."""
    M, V, H, T, L, S = 4, 30, 40, 6, 5, 4
    embed, pos, table, written, _ = _case(M, V, H, T, L, S, torch.float32, seed=8)
    mark = (torch.rand(M, L, device=DEVICE) < 0.5).t()  # [L, M], not contiguous
    rows = torch.tensor([2, 0, 3], dtype=torch.int32, device=DEVICE)
    want = _expect(written, table, pos, rows.tolist(), mark)
    decode_embed(torch.tensor([1, 2, 3], device=DEVICE), embed, pos, poisoned((M, H),
                 torch.float32), torch.zeros(M, dtype=torch.int32, device=DEVICE), rows=rows,
                 written=written, mark=mark, block_table=table)
    assert torch.equal(written, want)


def _table(*rows):
    return torch.tensor(rows, dtype=torch.int32, device=DEVICE)

@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_embed_vocab_slices_sum_to_the_embedding(dtype):
    """Tensor parallelism: each rank's slice of the table embeds its own ids and zeros the
    others, so the slices' residuals sum to the whole table's rows (exactly: one nonzero term);
    the marks and context lengths are written the same by every slice. Uneven slices, and
    rows= with a padding slot."""
    M, V, H, T, L, S = 5, 37, 40, 9, 3, 4
    embed, pos, table, written, mark = _case(M, V, H, T, L, S, dtype, seed=8)
    rows = torch.tensor([3, -1, 0, 4], dtype=torch.int32, device=DEVICE)
    tokens = torch.tensor([36, 5, 0, 20], device=DEVICE)  # each slice's edges among them
    total = torch.zeros(M, H, dtype=torch.float64, device=DEVICE)
    want_marks = _expect(written, table, pos, [3, 0, 4], mark)
    for a, b in ((0, 1), (1, 21), (21, V)):
        residual = poisoned((M, H), dtype)
        context = torch.full((M,), -7, dtype=torch.int32, device=DEVICE)
        marks = written.clone()
        decode_embed(tokens, embed[a:b], pos, residual, context, rows=rows, written=marks,
                     mark=mark, block_table=table, vocab_start=a)
        for r, row in enumerate(rows.tolist()):
            if row >= 0:
                tok = int(tokens[r])
                assert torch.equal(residual[row], embed[tok] if a <= tok < b
                                   else torch.zeros_like(embed[0]))
                total[row] += residual[row].double()
        assert residual[[1, 2]].isnan().all()  # not active
        assert torch.equal(context[[3, 0, 4]], pos[[3, 0, 4]] + 1)
        assert torch.equal(marks, want_marks)
    assert torch.equal(total[[3, 0, 4]], embed[tokens[[0, 2, 3]]].double())


def test_decode_embed_bad_input():
    """ValueError naming the argument, before any launch: nothing written."""
    embed, pos, table, written, mark = _case(3, 10, 8, 4, 2, 2, torch.float32, seed=1)
    res = torch.zeros(3, 8, device=DEVICE)
    ctx = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    tokens = torch.zeros(3, dtype=torch.long, device=DEVICE)
    before = written.clone()
    P = written.shape[1]
    marks = dict(written=written, mark=mark, block_table=table)
    for kwargs, name in [
        (dict(tokens=tokens.int()), "tokens"),
        (dict(pos=pos.long()), "pos"),
        (dict(residual=res.half()), "residual"),
        (dict(written=written), "written, mark and block_table go together"),
        (dict(written=written, mark=mark), "written, mark and block_table go together"),
        (dict(marks, mark=mark[:1]), "mark"),
        (dict(rows=torch.zeros(2, dtype=torch.int32, device=DEVICE)), "rows"),
        (dict(vocab_start=-1), "vocab_start"),
        (dict(marks, block_table=_table([0, 1], [0, 1], [0, P])),
         rf"block_table: entries must be in \[-1, P={P}\)"),
        (dict(marks, block_table=_table([0, 1], [0, 1], [0, -3])), "block_table: entries"),
        (dict(marks, block_table=table.long()), "block_table must have dtype"),
        (dict(marks, block_table=table[:2]), r"block_table must have one row per batch row"),
        (dict(marks, written=torch.zeros(2, P, 3, dtype=torch.bool, device=DEVICE)),
         r"written: page_size \(dim 2\) must be a power of two, got 3"),
    ]:
        args = dict(tokens=tokens, embed=embed, pos=pos, residual=res, context=ctx) | kwargs
        with pytest.raises(ValueError, match=name):
            decode_embed(args.pop("tokens"), args.pop("embed"), args.pop("pos"),
                         args.pop("residual"), args.pop("context"), **args)
        assert torch.equal(written, before) and not res.any() and not ctx.any(), name


def test_decode_embed_opcheck():
    embed, pos, table, written, mark = _case(3, 10, 8, 4, 2, 2, torch.float32, seed=2)
    args = (torch.tensor([1, 9, 0], device=DEVICE), embed, pos, torch.empty(3, 8, device=DEVICE),
            torch.empty(3, dtype=torch.int32, device=DEVICE), None, written, mark, table, 0)
    torch.library.opcheck(torch.ops.d3kernels.decode_embed.default, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))
