"""attention_prefill / attention_decode on a paged KV cache vs reference.causal_gqa_attention in
float64 on the gathered contiguous cache (reference.gather_pages).

Every cache is a shuffled pool with spare pages: each row's pages are a random draw, entries past
them are -1 (or, where a test says so, a -1 hole inside the context). Every slot no row may read
(spare pages, slots past a row's end) is NaN, so a kernel that reads one fails; with a ``valid``
mask, so are the slots it excludes. Page sizes 1, 4, 16 take the per-key page gather of the
interpreter's 32-key tiles; ``WHOLE`` (64) takes the one-index-per-tile path.
"""
import zlib

import pytest
import torch

from d3kernels.ops._launches import count_launches
from d3kernels.ops._tuning import only_config
from d3kernels.ops.attention import (MAX_SPLITS, _DECODE_CONFIGS, _PREFILL_CONFIGS, _decode_kernel,
                                     _prefill_kernel, _prune_fp32, attention_decode,
                                     attention_decode_splits, attention_decode_workspace,
                                     attention_prefill)
from reference import causal_gqa_attention, gather_pages
from tests.ops.conftest import CUDA, DEVICE, DTYPES, assert_close, gpu, poisoned, randn
from tests.ops.paged import pages_for, shuffled_block_table, slot_mask

# The block sizes the interpreter runs (first autotune config), for "just past a block" lengths.
PREFILL_BN = _PREFILL_CONFIGS[0].kwargs["BLOCK_N"]
PREFILL_BM = _PREFILL_CONFIGS[0].kwargs["BLOCK_M"]
DECODE_BN = _DECODE_CONFIGS[0].kwargs["BLOCK_N"]
# (head_dim, q heads, kv heads, page size): GQA ratios 1, 3 and 8, each with another page size.
HEADS = [(64, 4, 4, 16), (64, 6, 2, 1), (128, 8, 1, 4)]
WHOLE = 2 * max(PREFILL_BN, DECODE_BN)  # a page holding whole key tiles
SENTINEL = -3.25


def _seed(*key) -> None:
    torch.manual_seed(zlib.crc32(repr(key).encode()))


def i32(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


class Paged:
    """A shuffled paged cache holding positions 0..ends[b]-1 of each row b.

    Row b owns ceil(ends[b] / S) pages of a pool with ``spare`` pages more than needed
    (tests.ops.paged.shuffled_block_table); its table entries past them are -1 (NP = the most
    pages a row needs + ``extra``). ``share=(a, b)``: row b's first page is row a's (prefix
    sharing; the page b had stays unused). ``holes``: (row, page index) entries set to -1 inside
    the context. k and v [P, S, Hkv, D] are layer 1 of stacked [2, P, S, Hkv, D] caches (same
    outer strides, not contiguous). Slots no row may read are NaN.
    """

    def __init__(self, ends, Hkv, D, dtype, S, *, extra=1, spare=3, share=None, holes=()):
        counts = pages_for(torch.tensor(ends), S)
        self.P, self.S, self.NP = sum(counts) + spare, S, max(counts) + extra
        self.table = shuffled_block_table(counts, self.NP, self.P,
                                          seed=int(torch.randint(2**31, ())))
        if share is not None:
            self.table[share[1], 0] = self.table[share[0], 0]
        for b, i in holes:
            self.table[b, i] = -1
        self.k = randn(2, self.P, S, Hkv, D, dtype=dtype)[1]
        self.v = randn(2, self.P, S, Hkv, D, dtype=dtype)[1]
        self.poison(~self.slots([(b, range(n)) for b, n in enumerate(ends)]))

    @property
    def t_max(self) -> int:
        return self.NP * self.S

    def slots(self, spans):
        """bool [P, S]: the pool slots of the (row, positions) pairs in ``spans``."""
        rows = [b for b, positions in spans for _ in positions]
        positions = [t for _, positions in spans for t in positions]
        return slot_mask(self.table, rows, positions, self.P, self.S)

    def poison(self, mask):
        """NaN into k and v wherever ``mask`` [P, S] is True."""
        self.k.masked_fill_(mask[..., None, None], float("nan"))
        self.v.masked_fill_(mask[..., None, None], float("nan"))

    def args(self):
        return self.k, self.v, self.table

    def valid(self, own, p=0.5, drop=(), keep=()):
        """Random bool validity [P, S] per page slot (a KVCache.written[j] pattern), True with
        probability p, False on the (row, positions) pairs in ``drop``, True on those in
        ``keep`` and always True on each row's own positions own[b] = (first, end); the slots it
        excludes become NaN."""
        valid = (torch.rand(self.P, self.S, dtype=torch.float64) < p).to(DEVICE)
        valid &= ~self.slots(drop)
        valid |= self.slots([*keep, *((b, range(*se)) for b, se in enumerate(own))])
        self.poison(~valid)
        return valid

    def gathered(self, valid=None):
        """Clean float64 k, v [B, NP*S, Hkv, D] on the CPU and the keys that exist [B, NP*S]
        (behind a page, and valid)."""
        table = self.table.cpu()
        k, v = (gather_pages(c.double().cpu().nan_to_num(0.0), table) for c in (self.k, self.v))
        exists = torch.ones(self.P, self.S, dtype=torch.bool) if valid is None else valid
        return k, v, gather_pages(exists.bool().cpu(), table)


def ref_prefill(q, cache, start, lengths, valid=None):
    B, T = q.shape[:2]
    start, lengths = start.long().cpu(), lengths.long().cpu()
    q_pos = start[:, None] + torch.arange(T)
    k_pos = torch.arange(cache.t_max).expand(B, -1)
    k, v, exists = cache.gathered(valid)
    ref = causal_gqa_attention(q.double().cpu(), k, v, q_pos, k_pos, exists)
    ref[torch.arange(T)[None, :] >= lengths[:, None]] = 0.0  # padded queries are zeros
    return ref


def ref_decode(q, cache, context_lens, valid=None):
    B = q.shape[0]
    q_pos = context_lens.long().cpu()[:, None] - 1
    k_pos = torch.arange(cache.t_max).expand(B, -1)
    k, v, exists = cache.gathered(valid)
    return causal_gqa_attention(q.double().cpu()[:, None], k, v, q_pos, k_pos, exists)[:, 0]


def poisoned_workspace(B, Hq, D, num_splits):
    """A decode workspace whose partials are NaN (they never need clearing); counters zero."""
    workspace = attention_decode_workspace(B, Hq, D, num_splits, DEVICE)
    workspace.partial_out.fill_(float("nan"))
    workspace.partial_lse.fill_(float("nan"))
    return workspace


def assert_counters_at_rest(workspace):
    """The last split of each (row, kv head) resets its arrival counter: zero after every call."""
    assert (workspace.counters == 0).all(), workspace.counters


# ---- prefill ------------------------------------------------------------------------------------

@pytest.mark.parametrize("D,Hq,Hkv,S", HEADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_rows_of_different_lengths(dtype, D, Hq, Hkv, S):
    """Fresh prompts one past a key block, exactly one page, one past a page, and one token;
    rows 0 and 2 share their first page."""
    _seed("prefill", dtype, D, Hq, Hkv, S)
    T = PREFILL_BN + 1
    lengths = [T, S, S + 1, 1]
    q = randn(len(lengths), T, Hq, D, dtype=dtype)
    cache = Paged(lengths, Hkv, D, dtype, S, share=(0, 2))
    start = i32([0] * len(lengths))
    out = poisoned(q.shape, dtype)
    res = attention_prefill(q, *cache.args(), start, i32(lengths), out=out)
    assert res is out
    assert_close(out, ref_prefill(q, cache, start, i32(lengths)), dtype)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("D,Hq,Hkv,S", HEADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_batch_one(dtype, D, Hq, Hkv, S, masked):
    """Batch 1: a fresh prompt one past a key block; or (masked) rows= and valid= on pages of
    whole key tiles, with a chunk that starts three keys before a block boundary and ends past
    it."""
    _seed("prefill-b1", dtype, D, Hq, Hkv, S, masked)
    start, T = (PREFILL_BN - 3, 5) if masked else (0, PREFILL_BN + 1)
    cache = Paged([start + T], Hkv, D, dtype, WHOLE if masked else S)
    q = randn(1, T, Hq, D, dtype=dtype)
    valid = cache.valid([(start, start + T)]) if masked else None
    out = poisoned(q.shape, dtype)
    attention_prefill(q, *cache.args(), i32([start]), i32([T]),
                      rows=i32([0]) if masked else None, valid=valid, out=out)
    assert_close(out, ref_prefill(q, cache, i32([start]), i32([T]), valid), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_chunk_extends_cache(dtype):
    """start > 0 (a new chunk after cached history), two query tiles, q a strided view of a fused
    QKV buffer, rows 0 and 2 sharing their first page."""
    _seed("chunk", dtype)
    D, Hq, Hkv = 64, 6, 2
    T = PREFILL_BM + 6
    start, lengths = [3, 0, 2 * PREFILL_BN + 8], [T, 5, 17]
    B = len(start)
    qkv = randn(B, T, (Hq + 2 * Hkv) * D, dtype=dtype)
    q = qkv[..., :Hq * D].view(B, T, Hq, D)
    cache = Paged([s + n for s, n in zip(start, lengths)], Hkv, D, dtype, 16, share=(0, 2))
    out = attention_prefill(q, *cache.args(), i32(start), i32(lengths))
    assert_close(out, ref_prefill(q, cache, i32(start), i32(lengths)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_large_scores(dtype):
    """q scaled by 20: scores span hundreds, so a missing max-rescale overflows or underflows."""
    _seed("prefill-large", dtype)
    D, Hq, Hkv, T = 64, 6, 2, 2 * PREFILL_BN + 3
    lengths, start = [T, 20], [0, 9]
    q = randn(2, T, Hq, D, dtype=dtype, scale=20.0)
    cache = Paged([s + n for s, n in zip(start, lengths)], Hkv, D, dtype, 4)
    out = attention_prefill(q, *cache.args(), i32(start), i32(lengths),
                            out=poisoned(q.shape, dtype))
    assert_close(out, ref_prefill(q, cache, i32(start), i32(lengths)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_active_rows(dtype):
    """rows= lists two of four rows and a -1 padding slot; the others are untouched."""
    _seed("prefill-rows", dtype)
    D, Hq, Hkv, T, B = 64, 4, 2, 20, 4
    lengths, start = [20, 7, 13, 1], [0, 4, 30, 2]
    q = randn(B, T, Hq, D, dtype=dtype)
    cache = Paged([s + n for s, n in zip(start, lengths)], Hkv, D, dtype, 16)
    rows, untouched = [2, 0], [1, 3]
    out = poisoned(q.shape, dtype)
    out[untouched] = SENTINEL
    attention_prefill(q, *cache.args(), i32(start), i32(lengths), rows=i32([2, -1, 0]), out=out)
    assert (out[untouched] == SENTINEL).all()
    assert_close(out[rows], ref_prefill(q, cache, i32(start), i32(lengths))[rows], dtype)


# ---- decode -------------------------------------------------------------------------------------

FULL = 80  # a multiple of every page size the tests use below WHOLE


@pytest.mark.parametrize("num_splits", [1, 3, 16])
@pytest.mark.parametrize("D,Hq,Hkv,S", HEADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_rows_of_different_lengths(dtype, D, Hq, Hkv, S, num_splits):
    """Contexts 1, exactly one page, one past a page, one past a key block and the full table
    (its row has no -1 entry, the others have some); rows 3 and 4 share their first page;
    16 splits leave most splits empty."""
    _seed("decode", dtype, D, Hq, Hkv, S, num_splits)
    ctx = [1, S, S + 1, DECODE_BN + 1, FULL]
    cache = Paged(ctx, Hkv, D, dtype, S, extra=0, share=(3, 4))
    assert cache.t_max == FULL
    q = randn(len(ctx), Hq, D, dtype=dtype)
    out = poisoned(q.shape, dtype)
    res = attention_decode(q, *cache.args(), i32(ctx), out=out, num_splits=num_splits)
    assert res is out
    assert_close(out, ref_decode(q, cache, i32(ctx)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_large_scores(dtype):
    _seed("decode-large", dtype)
    D, Hq, Hkv = 128, 8, 1
    ctx = [3 * DECODE_BN + 5, 40, 2]
    q = randn(3, Hq, D, dtype=dtype, scale=20.0)
    cache = Paged(ctx, Hkv, D, dtype, 16)
    out = attention_decode(q, *cache.args(), i32(ctx), num_splits=2)
    assert_close(out, ref_decode(q, cache, i32(ctx)), dtype)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("ctx", [1, 3 * DECODE_BN + 1])
@pytest.mark.parametrize("D,Hq,Hkv,S", HEADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_batch_one(dtype, D, Hq, Hkv, S, ctx, masked):
    """Batch 1 over 4 KV splits: context 1 (three empty splits) or one past three key blocks
    (every split has keys, the last just one); masked: rows= and valid= as well, on pages of
    whole key tiles."""
    _seed("decode-b1", dtype, D, Hq, Hkv, S, ctx, masked)
    cache = Paged([ctx], Hkv, D, dtype, WHOLE if masked else S)
    q = randn(1, Hq, D, dtype=dtype)
    valid = cache.valid([(ctx - 1, ctx)]) if masked else None
    workspace = poisoned_workspace(1, Hq, D, 4)
    out = poisoned(q.shape, dtype)
    attention_decode(q, *cache.args(), i32([ctx]), rows=i32([0]) if masked else None,
                     valid=valid, out=out, workspace=workspace)
    assert_counters_at_rest(workspace)
    assert_close(out, ref_decode(q, cache, i32([ctx]), valid), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_workspace_reused(dtype):
    """One workspace (partials NaN at first) through consecutive calls with different rows,
    contexts, masks, caches and page sizes, as in the layers and steps of a decode: each call is
    right and leaves every counter at zero."""
    _seed("decode-reuse", dtype)
    D, Hq, Hkv, B = 64, 6, 2, 3
    workspace = poisoned_workspace(B, Hq, D, 3)
    calls = [([3 * DECODE_BN, 1, DECODE_BN + 1], None, False, 16),
             ([5, 70, 2], [2, 0], True, 1), ([DECODE_BN, 9, 96], [1], False, WHOLE),
             ([40, 41, 42], None, True, 4)]
    for ctx, rows, masked, S in calls:
        q = randn(B, Hq, D, dtype=dtype)
        cache = Paged(ctx, Hkv, D, dtype, S)
        valid = cache.valid([(n - 1, n) for n in ctx]) if masked else None
        out = poisoned(q.shape, dtype)
        attention_decode(q, *cache.args(), i32(ctx), rows=None if rows is None else i32(rows),
                         valid=valid, out=out, workspace=workspace)
        assert_counters_at_rest(workspace)
        rows = list(range(B)) if rows is None else rows
        assert_close(out[rows], ref_decode(q, cache, i32(ctx), valid)[rows], dtype)


def test_decode_independent_of_num_splits():
    """Batch 1 and a mixed batch: every split count gives the reference result, and the results
    agree with each other to fp32 rounding."""
    _seed("decode-splits")
    D, Hq, Hkv = 64, 6, 2
    for ctx in ([3 * DECODE_BN + 1], [4 * DECODE_BN, 1, 2 * DECODE_BN + 5]):
        q = randn(len(ctx), Hq, D)
        cache = Paged(ctx, Hkv, D, torch.float32, 4)
        ref = ref_decode(q, cache, i32(ctx))
        first = None
        for num_splits in (1, 2, 7, 16):
            out = attention_decode(q, *cache.args(), i32(ctx),
                                   out=poisoned(q.shape, torch.float32), num_splits=num_splits)
            assert_close(out, ref, torch.float32)
            first = out if first is None else first
            torch.testing.assert_close(out, first, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_active_rows_with_workspace(dtype):
    """Only the listed rows are written (a -1 entry of rows= is a padding slot); a NaN-filled
    workspace needs no clearing; the split count comes from the workspace."""
    _seed("decode-rows", dtype)
    D, Hq, Hkv, B = 64, 6, 2, 5
    ctx = [9, 70, 1, 33, 50]
    q = randn(B, Hq, D, dtype=dtype)
    cache = Paged(ctx, Hkv, D, dtype, 16)
    workspace = poisoned_workspace(B, Hq, D, 3)
    rows, untouched = [4, 1, 2], [0, 3]
    out = poisoned(q.shape, dtype)
    out[untouched] = SENTINEL
    attention_decode(q, *cache.args(), i32(ctx), rows=i32([4, 1, -1, 2]), out=out,
                     workspace=workspace)
    assert (out[untouched] == SENTINEL).all()
    assert_counters_at_rest(workspace)
    assert_close(out[rows], ref_decode(q, cache, i32(ctx))[rows], dtype)


def test_decode_default_splits_and_fresh_output():
    _seed("decode-default")
    D, Hq, Hkv = 64, 6, 2
    ctx = [300, 129, 1]
    q = randn(3, Hq, D)
    cache = Paged(ctx, Hkv, D, torch.float32, 16)
    assert 1 <= attention_decode_splits(3, Hkv, cache.t_max, DEVICE) <= MAX_SPLITS
    assert_close(attention_decode(q, *cache.args(), i32(ctx)), ref_decode(q, cache, i32(ctx)),
                 torch.float32)


def test_decode_splits_heuristic():
    """Shapes only: more splits for fewer rows, never more than a full cache can feed."""
    dev = torch.device("cuda") if CUDA else torch.device("cpu")
    one, many = (attention_decode_splits(b, 8, 4096, dev) for b in (1, 64))
    assert one >= many >= 1
    assert attention_decode_splits(1, 1, 100, dev) == 1
    assert attention_decode_splits(1, 1, 10**6, dev) <= MAX_SPLITS


def test_no_active_rows_writes_nothing():
    p, d = _prefill_args(), _decode_args()
    for fn, args, q in ((attention_prefill, p, p["q"]), (attention_decode, d, d["q"])):
        out = torch.full_like(q, SENTINEL)
        fn(**args, rows=i32([]), out=out)
        assert (out == SENTINEL).all()


def test_fp32_tunes_only_the_first_config():
    """The GPU autotuner's pruning (the interpreter never calls it: it runs one config)."""
    for configs in (_PREFILL_CONFIGS, _DECODE_CONFIGS):
        assert _prune_fp32(configs, {"q_ptr": randn(1)}) == configs[:1]
        assert _prune_fp32(configs, {"q_ptr": randn(1, dtype=torch.float16)}) == configs


@pytest.mark.parametrize("S", [16, WHOLE])
def test_every_autotune_config(S):
    """Each config the GPU autotuner may pick, run alone under the interpreter, fp32, at a tiny
    shape where keys span two blocks of the smallest tile (and two decode splits): with pages
    smaller than every tile (a page index per key) and with pages of 64 keys (one index per
    tile for BLOCK_N <= 64, per key for 128)."""
    _seed("configs", S)
    D, Hq, Hkv = 16, 4, 2
    start, lengths = [0, 130], [9, 7]
    q = randn(2, max(lengths), Hq, D)
    cache = Paged([s + n for s, n in zip(start, lengths)], Hkv, D, torch.float32, S)
    ref = ref_prefill(q, cache, i32(start), i32(lengths))
    for config in _prefill_kernel.all_configs:
        with only_config(_prefill_kernel, config):
            out = attention_prefill(q, *cache.args(), i32(start), i32(lengths),
                                    out=poisoned(q.shape, torch.float32))
        assert_close(out, ref, torch.float32)
    ctx = [1, 130]
    ref = ref_decode(q[:, 0], cache, i32(ctx))
    workspace = poisoned_workspace(2, Hq, D, 2)
    for config in _decode_kernel.all_configs:
        with only_config(_decode_kernel, config):
            out = attention_decode(q[:, 0], *cache.args(), i32(ctx), workspace=workspace,
                                   out=poisoned(ref.shape, torch.float32))
        assert_counters_at_rest(workspace)
        assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_one_launch_each(num_splits):
    """attention_decode (split-KV and merge together) and attention_prefill are one kernel launch
    each, and nothing else, when the caller gives the buffers and its block table was checked
    before (check_block_table syncs once per table version, as each layer of a step reuses it)."""
    d = _decode_args(rows=i32([1, 0]), valid=torch.ones(5, 4, dtype=torch.bool, device=DEVICE))
    workspace = attention_decode_workspace(2, 4, 16, num_splits, DEVICE)
    out = torch.empty_like(d["q"])
    attention_decode(**d, out=out, workspace=workspace)
    with count_launches() as launches:
        attention_decode(**d, out=out, workspace=workspace)
    assert dict(launches) == {"_decode_kernel": 1}
    assert_counters_at_rest(workspace)
    p = _prefill_args()
    out = torch.empty_like(p["q"])
    attention_prefill(**p, out=out)
    with count_launches() as launches:
        attention_prefill(**p, out=out)
    assert dict(launches) == {"_prefill_kernel": 1}


def test_decode_matches_last_prefill_query():
    """A decode step equals the last query of a prefill over the same cache, here one page per
    row (the contiguous layout as a paged one)."""
    _seed("decode-vs-prefill")
    D, Hq, Hkv, T = 64, 6, 2, 45
    q = randn(2, T, Hq, D)
    cache = Paged([T, 30], Hkv, D, torch.float32, WHOLE, extra=0, spare=0)
    lengths = i32([T, 30])
    pre = attention_prefill(q, *cache.args(), i32([0, 0]), lengths)
    dec = attention_decode(torch.stack([q[0, T - 1], q[1, 29]]), *cache.args(), lengths,
                           num_splits=2)
    torch.testing.assert_close(dec, torch.stack([pre[0, T - 1], pre[1, 29]]), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("S", [4, WHOLE])
def test_missing_page_inside_context(S):
    """A -1 entry inside a row's context: its keys are excluded (and, NaN, never read), in
    prefill and decode; with WHOLE pages it drops whole key tiles."""
    _seed("hole", S)
    D, Hq, Hkv = 32, 6, 2
    ends = [2 * WHOLE + 20, 40]
    cache = Paged(ends, Hkv, D, torch.float32, S, holes=[(0, 1)])
    start, lengths = i32([2 * WHOLE, 0]), i32([20, 40])
    q = randn(2, 40, Hq, D)
    out = attention_prefill(q, *cache.args(), start, lengths)
    assert_close(out, ref_prefill(q, cache, start, lengths), torch.float32)
    ctx = i32(ends)
    out = attention_decode(q[:, 0], *cache.args(), ctx, num_splits=3)
    assert_close(out, ref_decode(q[:, 0], cache, ctx), torch.float32)


# ---- validity mask (backfill mode "mask") -------------------------------------------------------

@pytest.mark.parametrize("D,Hq,Hkv,S", HEADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_valid_mask(dtype, D, Hq, Hkv, S):
    """Contexts 1, 17, one past a key block, and a chunk whose history is two key blocks with
    the first one wholly excluded (a fully masked tile before the diagonal)."""
    _seed("prefill-valid", dtype, D, Hq, Hkv, S)
    start, lengths = [0, 10, PREFILL_BN - 3, 2 * PREFILL_BN + 3], [1, 7, 4, 8]
    q = randn(len(lengths), max(lengths), Hq, D, dtype=dtype)
    cache = Paged([s + n for s, n in zip(start, lengths)], Hkv, D, dtype, S)
    valid = cache.valid([(s, s + n) for s, n in zip(start, lengths)],
                        drop=[(3, range(PREFILL_BN))])
    out = poisoned(q.shape, dtype)
    attention_prefill(q, *cache.args(), i32(start), i32(lengths), valid=valid, out=out)
    assert_close(out, ref_prefill(q, cache, i32(start), i32(lengths), valid), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_valid_mask_active_rows(dtype):
    """rows= with a uint8 mask; two query tiles; unlisted rows untouched."""
    _seed("prefill-valid-rows", dtype)
    D, Hq, Hkv, B = 64, 6, 2, 3
    T = PREFILL_BM + 3
    start, lengths = [5, 2 * PREFILL_BN + 1, 0], [T, 17, 9]
    q = randn(B, T, Hq, D, dtype=dtype)
    cache = Paged([s + n for s, n in zip(start, lengths)], Hkv, D, dtype, 4)
    valid = cache.valid([(s, s + n) for s, n in zip(start, lengths)], p=0.3)
    rows, untouched = [1, 0], [2]
    out = poisoned(q.shape, dtype)
    out[untouched] = SENTINEL
    attention_prefill(q, *cache.args(), i32(start), i32(lengths), rows=i32(rows),
                      valid=valid.to(torch.uint8), out=out)
    assert (out[untouched] == SENTINEL).all()
    ref = ref_prefill(q, cache, i32(start), i32(lengths), valid)
    assert_close(out[rows], ref[rows], dtype)


@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("D,Hq,Hkv,S", HEADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_valid_mask(dtype, D, Hq, Hkv, S, num_splits):
    """Contexts 1, 17, one past a key block and the full table, half the history excluded;
    rows 2 and 3 share their first page (and so its mask)."""
    _seed("decode-valid", dtype, D, Hq, Hkv, S, num_splits)
    ctx = [1, 17, DECODE_BN + 1, FULL]
    q = randn(len(ctx), Hq, D, dtype=dtype)
    cache = Paged(ctx, Hkv, D, dtype, S, extra=0, share=(2, 3))
    valid = cache.valid([(n - 1, n) for n in ctx])
    out = poisoned(q.shape, dtype)
    attention_decode(q, *cache.args(), i32(ctx), valid=valid, out=out, num_splits=num_splits)
    assert_close(out, ref_decode(q, cache, i32(ctx), valid), dtype)


@pytest.mark.parametrize("S", [16, WHOLE])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_valid_mask_fully_masked_splits(dtype, S):
    """Whole splits (and whole key tiles inside a split) excluded, large scores, rows= and a
    NaN-filled workspace: an empty split must get zero weight in the merge, never NaN."""
    _seed("decode-valid-splits", dtype, S)
    D, Hq, Hkv, B = 64, 6, 2, 3
    ctx = [4 * DECODE_BN, 3 * DECODE_BN + 2, 2 * DECODE_BN + 1]
    q = randn(B, Hq, D, dtype=dtype, scale=10.0)
    cache = Paged(ctx, Hkv, D, dtype, S)
    # 3 splits of two key tiles each. Row 0: split 0 has an excluded tile before one with keys,
    # split 1 only the own entry, split 2 no keys; row 2: splits 0 and 1 wholly excluded.
    valid = cache.valid([(n - 1, n) for n in ctx], p=0.0,
                        keep=[(0, range(DECODE_BN + 5, DECODE_BN + 9))])
    workspace = poisoned_workspace(B, Hq, D, 3)
    rows = [0, 2]
    out = poisoned(q.shape, dtype)
    attention_decode(q, *cache.args(), i32(ctx), rows=i32(rows), valid=valid, out=out,
                     workspace=workspace)
    assert out[1].isnan().all()  # row 1 untouched
    assert_counters_at_rest(workspace)
    assert_close(out[rows], ref_decode(q, cache, i32(ctx), valid)[rows], dtype)
    # row 2 has only its own entry: the output is exactly its value vector
    own = cache.v[cache.slots([(2, [ctx[2] - 1])])]  # [1, Hkv, D]
    torch.testing.assert_close(out[2].float(), own[0].float().repeat_interleave(Hq // Hkv, 0))


def test_all_valid_mask_matches_no_mask():
    _seed("valid-all")
    D, Hq, Hkv, T = 64, 6, 2, 45
    q = randn(2, T, Hq, D)
    cache = Paged([T, 30], Hkv, D, torch.float32, 4)
    lengths, start = i32([T, 30]), i32([0, 0])
    ones = torch.ones(cache.k.shape[:2], dtype=torch.bool, device=DEVICE)
    args = cache.args()
    torch.testing.assert_close(attention_prefill(q, *args, start, lengths, valid=ones),
                               attention_prefill(q, *args, start, lengths), rtol=0, atol=0)
    torch.testing.assert_close(attention_decode(q[:, 0], *args, lengths, valid=ones,
                                                num_splits=2),
                               attention_decode(q[:, 0], *args, lengths, num_splits=2),
                               rtol=0, atol=0)


# ---- bad input, custom-op registration ----------------------------------------------------------

# 5 pages of 4 slots, 2 pages a row: T_max = 8
P, S4 = 5, 4


def _table():
    return i32([[3, 0], [4, -1]])


def _prefill_args(**over):
    B, T, Hq, Hkv, D = 2, 4, 4, 2, 16
    args = dict(q=randn(B, T, Hq, D), k_cache=randn(P, S4, Hkv, D), v_cache=randn(P, S4, Hkv, D),
                block_table=_table(), start=i32([0, 0]), lengths=i32([4, 2]))
    args.update(over)
    return args


def _decode_args(**over):
    B, Hq, Hkv, D = 2, 4, 2, 16
    args = dict(q=randn(B, Hq, D), k_cache=randn(P, S4, Hkv, D), v_cache=randn(P, S4, Hkv, D),
                block_table=_table(), context_lens=i32([3, 4]))
    args.update(over)
    return args


@pytest.mark.parametrize("over,match", [
    (dict(q=randn(2, 4, 16)), "q must have 4 dimensions"),
    (dict(q=randn(2, 4, 4, 16).to(torch.int32)), "q must have dtype"),
    (dict(q=randn(2, 4, 4, 24)), "q: head_dim must be a power of two"),
    (dict(q=randn(2, 4, 16, 4).transpose(2, 3)), "q must be contiguous"),
    (dict(q=randn(2, 9, 4, 16)), r"block_table holds only T_max = NP \* S = 8"),
    (dict(k_cache=randn(P, S4, 2, 16, dtype=torch.float16)), "k_cache must have dtype"),
    (dict(k_cache=randn(P, 12, 2, 16), v_cache=randn(P, 12, 2, 16)),
     r"k_cache: page_size \(dim 1\) must be a power of two, got 12"),
    (dict(v_cache=randn(P, 8, 2, 16)), "v_cache must have shape"),
    (dict(v_cache=randn(P, 2, S4, 16).transpose(1, 2)), "v_cache must have k_cache's strides"),
    (dict(k_cache=randn(P, S4, 3, 16), v_cache=randn(P, S4, 3, 16)), "positive multiple"),
    (dict(q=randn(2, 4, 0, 16)), "positive multiple"),
    (dict(start=torch.zeros(2, dtype=torch.int64)), "start must have dtype"),
    (dict(lengths=i32([4])), "lengths must have shape"),
    (dict(rows=torch.zeros(1, dtype=torch.int64)), "rows must have dtype"),
    (dict(out=randn(2, 4, 4, 8)), "out must have shape"),
    (dict(valid=torch.ones(P, S4, dtype=torch.int32, device=DEVICE)), "valid must have dtype"),
    (dict(valid=torch.ones(2, 8, dtype=torch.bool, device=DEVICE)), "valid must have shape"),
    (dict(valid=torch.ones(S4, P, dtype=torch.bool, device=DEVICE).t()), "valid must be contig"),
    (dict(valid=torch.ones(P, S4, dtype=torch.bool, device="meta")), "valid must be on"),
    (dict(valid=[[True] * S4] * P), "valid must be a torch.Tensor"),
])
def test_prefill_bad_input(over, match):
    with pytest.raises(ValueError, match=match):
        attention_prefill(**_prefill_args(**over))


@pytest.mark.parametrize("over,match", [
    (dict(q=randn(2, 1, 4, 16)), "q must have 3 dimensions"),
    (dict(k_cache=randn(P, S4, 2, 32), v_cache=randn(P, S4, 2, 32)), "head_dim"),
    (dict(k_cache=randn(P, S4, 2, 16)[:, :, 0]), "k_cache must have 4 dimensions"),
    (dict(context_lens=torch.ones(2)), "context_lens must have dtype"),
    (dict(rows=i32([0, 1, 0])), "rows has 3 entries"),
    (dict(out=randn(2, 4, 16, dtype=torch.float16)), "out must have dtype"),
    (dict(num_splits=0), "num_splits"),
    (dict(num_splits=MAX_SPLITS + 1), "num_splits"),
    (dict(workspace=attention_decode_workspace(2, 4, 16, 2, DEVICE), num_splits=3), "workspace"),
    (dict(workspace=attention_decode_workspace(2, 4, 32, 2, DEVICE)), "partial_out"),
    (dict(workspace=attention_decode_workspace(2, 4, 16, 2, DEVICE)[:2]), "workspace must be"),
    (dict(workspace=attention_decode_workspace(2, 4, 16, 2, DEVICE)._replace(
        counters=torch.zeros(2, 4, dtype=torch.int64, device=DEVICE))), "counters"),
    (dict(workspace=attention_decode_workspace(2, 4, 16, 2, DEVICE)._replace(
        counters=torch.zeros(2, 2, dtype=torch.int32, device=DEVICE))), "counters"),
    (dict(valid=torch.ones(P, S4, dtype=torch.float32, device=DEVICE)), "valid must have dtype"),
    (dict(valid=torch.ones(3, S4, dtype=torch.bool, device=DEVICE)), "valid must have shape"),
    (dict(valid=torch.ones(P, S4, dtype=torch.bool, device="meta")), "valid must be on"),
])
def test_decode_bad_input(over, match):
    with pytest.raises(ValueError, match=match):
        attention_decode(**_decode_args(**over))


@pytest.mark.parametrize("table,match", [
    ([[3, 0], [4, P]], rf"block_table: entries must be in \[-1, P={P}\) .*got max {P}"),
    ([[3, -2], [4, -1]], r"block_table: entries must be in \[-1, P=5\) .*got min -2"),
    (torch.tensor([[3, 0], [4, -1]], dtype=torch.int64), "block_table must have dtype"),
    ([[3, 0]], "block_table must have one row per batch row"),
    ([3, 0, 4, -1], "block_table must have 2 dimensions"),
])
@pytest.mark.parametrize("op", ["prefill", "decode"])
def test_bad_block_table(op, table, match):
    """Raised before any launch: no kernel runs and ``out`` keeps its contents."""
    table = table.to(DEVICE) if isinstance(table, torch.Tensor) else i32(table)
    fn, args = ((attention_prefill, _prefill_args(block_table=table)) if op == "prefill" else
                (attention_decode, _decode_args(block_table=table)))
    out = torch.full_like(args["q"], SENTINEL)
    with count_launches() as launches, pytest.raises(ValueError, match=match):
        fn(**args, out=out)
    assert not {"_prefill_kernel", "_decode_kernel"} & set(launches)
    assert (out == SENTINEL).all()


@pytest.mark.parametrize("with_rows", [False, True])
def test_opcheck(with_rows):
    rows = i32([1]) if with_rows else None
    valid = torch.ones(P, S4, dtype=torch.bool, device=DEVICE) if with_rows else None
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    p = _prefill_args()
    torch.library.opcheck(torch.ops.d3kernels.attention_prefill.default,
                          (*p.values(), rows, valid, torch.zeros_like(p["q"])), test_utils=tests)
    d = _decode_args()
    workspace = attention_decode_workspace(2, 4, 16, 2, DEVICE)
    torch.library.opcheck(torch.ops.d3kernels.attention_decode.default,
                          (*d.values(), rows, valid, torch.zeros_like(d["q"]), *workspace),
                          test_utils=tests)
    assert_counters_at_rest(workspace)


def test_torch_compile_fullgraph():
    """The wrappers trace into one graph (the custom ops are opaque nodes, no graph breaks),
    with and without a caller's workspace."""
    p, d = _prefill_args(), _decode_args()
    workspace = attention_decode_workspace(2, 4, 16, 3, DEVICE)

    def step(p, d, workspace):
        return (attention_prefill(**p), attention_decode(**d, num_splits=2),
                attention_decode(**d, workspace=workspace))

    pre, dec, dec_ws = torch.compile(step, fullgraph=True, backend="aot_eager")(p, d, workspace)
    assert_counters_at_rest(workspace)
    torch.testing.assert_close(pre, attention_prefill(**p))
    torch.testing.assert_close(dec, attention_decode(**d, num_splits=2))
    torch.testing.assert_close(dec_ws, attention_decode(**d, num_splits=3))


# ---- GPU only: bf16, Llama shapes, CUDA graphs --------------------------------------------------

@gpu
@pytest.mark.parametrize("Hkv", [32, 8])  # Llama-2-7B, Llama-3-8B
def test_gpu_llama_shapes(Hkv):
    _seed("gpu", Hkv)
    D, Hq = 128, 32
    ctx = [4096, 1, 513, 2000]
    for dtype in DTYPES:
        q = randn(len(ctx), Hq, D, dtype=dtype)
        cache = Paged(ctx, Hkv, D, dtype, 16)
        assert_close(attention_decode(q, *cache.args(), i32(ctx)), ref_decode(q, cache, i32(ctx)),
                     dtype)
        start, lengths = [0, 700], [512, 300]
        qp = randn(2, 512, Hq, D, dtype=dtype)
        cache = Paged([s + n for s, n in zip(start, lengths)], Hkv, D, dtype, 16)
        out = attention_prefill(qp, *cache.args(), i32(start), i32(lengths))
        assert_close(out, ref_prefill(qp, cache, i32(start), i32(lengths)), dtype)


@gpu
def test_gpu_decode_cuda_graph():
    """Captured once with caller buffers; replays follow new context lengths and block tables
    written in place."""
    _seed("graph")
    D, Hq, Hkv, B, t_max = 128, 32, 8, 4, 1024
    dtype = torch.bfloat16
    q = randn(B, Hq, D, dtype=dtype)
    cache = Paged([t_max] * B, Hkv, D, dtype, 16, extra=0)
    ctx = i32([5, 100, 1024, 600])
    out = torch.empty_like(q)
    num_splits = attention_decode_splits(B, Hkv, cache.t_max, DEVICE)
    assert num_splits > 1  # the in-kernel merge is captured too
    workspace = attention_decode_workspace(B, Hq, D, num_splits, DEVICE)
    attention_decode(q, *cache.args(), ctx, out=out, workspace=workspace)  # compile + autotune
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attention_decode(q, *cache.args(), ctx, out=out, workspace=workspace)
    for lens, flip in (([5, 100, 1024, 600], False), ([1, 1023, 64, 129], True)):
        ctx.copy_(i32(lens))
        if flip:  # every row full: any permutation of the rows' pages is a valid table
            cache.table.copy_(cache.table.flip(0, 1))
        graph.replay()
        torch.cuda.synchronize()
        assert_counters_at_rest(workspace)
        assert_close(out, ref_decode(q, cache, ctx), dtype)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_merge_sees_every_split(dtype):
    """Batch 1, Llama-3-8B heads, the default (many) splits: calls back to back with the partials
    re-poisoned with NaN before each, so a merge that read a partial before its split's store was
    visible would give NaN or a different value. The merge order is fixed: every call must give
    the same bits."""
    _seed("gpu-merge", dtype)
    D, Hq, Hkv, t_max = 128, 32, 8, 4096
    q = randn(1, Hq, D, dtype=dtype)
    cache = Paged([t_max], Hkv, D, dtype, 16)
    ctx = i32([t_max - 5])
    num_splits = attention_decode_splits(1, Hkv, cache.t_max, DEVICE)
    assert num_splits >= 8
    workspace = attention_decode_workspace(1, Hq, D, num_splits, DEVICE)
    first = attention_decode(q, *cache.args(), ctx, workspace=workspace)
    assert_close(first, ref_decode(q, cache, ctx), dtype)
    out = torch.empty_like(q)
    for _ in range(50):
        workspace.partial_out.fill_(float("nan"))
        workspace.partial_lse.fill_(float("nan"))
        attention_decode(q, *cache.args(), ctx, out=out, workspace=workspace)
        assert torch.equal(out, first)
    assert_counters_at_rest(workspace)
