"""attention_prefill / attention_decode vs reference.causal_gqa_attention in float64.

Cache slots past what each row may read are filled with NaN, so a kernel that reads one fails;
with a ``valid`` mask, so are the entries it excludes.
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
from reference import causal_gqa_attention
from tests.ops.conftest import CUDA, DEVICE, DTYPES, assert_close, gpu, poisoned, randn

# The block sizes the interpreter runs (first autotune config), for "just past a block" lengths.
PREFILL_BN = _PREFILL_CONFIGS[0].kwargs["BLOCK_N"]
PREFILL_BM = _PREFILL_CONFIGS[0].kwargs["BLOCK_M"]
DECODE_BN = _DECODE_CONFIGS[0].kwargs["BLOCK_N"]
# (head_dim, q heads, kv heads): GQA ratios 1, 3 and 8.
HEADS = [(64, 4, 4), (64, 6, 2), (128, 8, 1)]
SENTINEL = -3.25


def _seed(*key) -> None:
    torch.manual_seed(zlib.crc32(repr(key).encode()))


def make_cache(B, kv_heads, t_max, D, dtype, valid):
    """k, v [B, kv_heads, t_max, D] with slots >= valid[b] of row b NaN.

    k is a layer view of a stacked [L, B, ...] cache and v a transposed [B, t_max, kv, D]
    buffer, so the kernels see two different stride patterns.
    """
    k = randn(2, B, kv_heads, t_max, D, dtype=dtype)[1]
    v = randn(B, t_max, kv_heads, D, dtype=dtype).transpose(1, 2)
    for b, n in enumerate(valid):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    return k, v


def _ref_kv(cache):
    """[B, kv, T, D] cache -> clean float64 [B, T, kv, D] on the CPU (unused NaN slots -> 0)."""
    return cache.double().cpu().nan_to_num(0.0).transpose(1, 2)


def _ref_valid(valid):
    return None if valid is None else valid.bool().cpu()


def ref_prefill(q, k_cache, v_cache, start, lengths, valid=None):
    B, T = q.shape[:2]
    t_max = k_cache.shape[2]
    start, lengths = start.long().cpu(), lengths.long().cpu()
    q_pos = start[:, None] + torch.arange(T)
    k_pos = torch.arange(t_max).expand(B, t_max)
    ref = causal_gqa_attention(q.double().cpu(), _ref_kv(k_cache), _ref_kv(v_cache), q_pos, k_pos,
                               _ref_valid(valid))
    ref[torch.arange(T)[None, :] >= lengths[:, None]] = 0.0  # padded queries are zeros
    return ref


def ref_decode(q, k_cache, v_cache, context_lens, valid=None):
    B = q.shape[0]
    t_max = k_cache.shape[2]
    q_pos = context_lens.long().cpu()[:, None] - 1
    k_pos = torch.arange(t_max).expand(B, t_max)
    return causal_gqa_attention(q.double().cpu()[:, None], _ref_kv(k_cache), _ref_kv(v_cache),
                                q_pos, k_pos, _ref_valid(valid))[:, 0]


def make_valid(t_max, own, k, v, p=0.5, drop=(), keep=()):
    """Random bool validity [B, t_max] (a KVCache.written[j] pattern), True with probability p,
    False on the (row, slice) pairs in ``drop``, True on those in ``keep`` and always True on
    each row's own entries own[b] = (first, end); the excluded entries of k, v become NaN, so a
    kernel that reads one fails."""
    B = len(own)
    valid = torch.rand(B, t_max, dtype=torch.float64) < p
    for b, sl in drop:
        valid[b, sl] = False
    for b, sl in keep:
        valid[b, sl] = True
    for b, (lo, hi) in enumerate(own):
        valid[b, lo:hi] = True
    valid = valid.to(DEVICE)
    k.masked_fill_(~valid[:, None, :, None], float("nan"))
    v.masked_fill_(~valid[:, None, :, None], float("nan"))
    return valid


def i32(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


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

@pytest.mark.parametrize("D,Hq,Hkv", HEADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_rows_of_different_lengths(dtype, D, Hq, Hkv):
    _seed("prefill", dtype, D, Hq, Hkv)
    T = PREFILL_BN + 1  # just past a key block
    lengths = [T, 17, 1]
    B, t_max = len(lengths), T + 7
    q = randn(B, T, Hq, D, dtype=dtype)
    k, v = make_cache(B, Hkv, t_max, D, dtype, lengths)
    start = i32([0] * B)
    out = poisoned(q.shape, dtype)
    res = attention_prefill(q, k, v, start, i32(lengths), out=out)
    assert res is out
    assert_close(out, ref_prefill(q, k, v, start, i32(lengths)), dtype)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("D,Hq,Hkv", HEADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_batch_one(dtype, D, Hq, Hkv, masked):
    """Batch 1: a fresh prompt one past a key block; or (masked) rows= and valid= with a chunk
    that starts three keys before a block boundary and ends past it."""
    _seed("prefill-b1", dtype, D, Hq, Hkv, masked)
    start, T = (PREFILL_BN - 3, 5) if masked else (0, PREFILL_BN + 1)
    t_max = start + T + 4
    q = randn(1, T, Hq, D, dtype=dtype)
    k, v = make_cache(1, Hkv, t_max, D, dtype, [start + T])
    valid = make_valid(t_max, [(start, start + T)], k, v) if masked else None
    out = poisoned(q.shape, dtype)
    attention_prefill(q, k, v, i32([start]), i32([T]), rows=i32([0]) if masked else None,
                      valid=valid, out=out)
    assert_close(out, ref_prefill(q, k, v, i32([start]), i32([T]), valid), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_chunk_extends_cache(dtype):
    """start > 0 (a new chunk after cached history), two query tiles, q a strided view of a fused
    QKV buffer."""
    _seed("chunk", dtype)
    D, Hq, Hkv = 64, 6, 2
    T = PREFILL_BM + 6
    start, lengths = [3, 0, 2 * PREFILL_BN + 8], [T, 5, 17]
    B, t_max = 3, 2 * PREFILL_BM + 16
    qkv = randn(B, T, (Hq + 2 * Hkv) * D, dtype=dtype)
    q = qkv[..., :Hq * D].view(B, T, Hq, D)
    k, v = make_cache(B, Hkv, t_max, D, dtype, [s + n for s, n in zip(start, lengths)])
    out = attention_prefill(q, k, v, i32(start), i32(lengths))
    assert_close(out, ref_prefill(q, k, v, i32(start), i32(lengths)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_large_scores(dtype):
    """q scaled by 20: scores span hundreds, so a missing max-rescale overflows or underflows."""
    _seed("prefill-large", dtype)
    D, Hq, Hkv, T = 64, 6, 2, 2 * PREFILL_BN + 3
    lengths, start = [T, 20], [0, 9]
    q = randn(2, T, Hq, D, dtype=dtype, scale=20.0)
    k, v = make_cache(2, Hkv, T + 9, D, dtype, [s + n for s, n in zip(start, lengths)])
    out = attention_prefill(q, k, v, i32(start), i32(lengths), out=poisoned(q.shape, dtype))
    assert_close(out, ref_prefill(q, k, v, i32(start), i32(lengths)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_active_rows(dtype):
    _seed("prefill-rows", dtype)
    D, Hq, Hkv, T, B = 64, 4, 2, 20, 4
    lengths, start = [20, 7, 13, 1], [0, 4, 30, 2]
    q = randn(B, T, Hq, D, dtype=dtype)
    k, v = make_cache(B, Hkv, 64, D, dtype, [s + n for s, n in zip(start, lengths)])
    rows, untouched = [2, 0], [1, 3]
    out = poisoned(q.shape, dtype)
    out[untouched] = SENTINEL
    attention_prefill(q, k, v, i32(start), i32(lengths), rows=i32(rows), out=out)
    assert (out[untouched] == SENTINEL).all()
    assert_close(out[rows], ref_prefill(q, k, v, i32(start), i32(lengths))[rows], dtype)


# ---- decode -------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_splits", [1, 3, 16])
@pytest.mark.parametrize("D,Hq,Hkv", HEADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_rows_of_different_lengths(dtype, D, Hq, Hkv, num_splits):
    """Contexts 1, 17, one past a key block, exactly two blocks and the full cache; 16 splits
    leave most splits empty."""
    _seed("decode", dtype, D, Hq, Hkv, num_splits)
    t_max = 2 * DECODE_BN + 10
    ctx = [1, 17, DECODE_BN + 1, 2 * DECODE_BN, t_max]
    q = randn(len(ctx), Hq, D, dtype=dtype)
    k, v = make_cache(len(ctx), Hkv, t_max, D, dtype, ctx)
    out = poisoned(q.shape, dtype)
    res = attention_decode(q, k, v, i32(ctx), out=out, num_splits=num_splits)
    assert res is out
    assert_close(out, ref_decode(q, k, v, i32(ctx)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_large_scores(dtype):
    _seed("decode-large", dtype)
    D, Hq, Hkv, t_max = 128, 8, 1, 3 * DECODE_BN + 5
    ctx = [t_max, 40, 2]
    q = randn(3, Hq, D, dtype=dtype, scale=20.0)
    k, v = make_cache(3, Hkv, t_max, D, dtype, ctx)
    out = attention_decode(q, k, v, i32(ctx), num_splits=2)
    assert_close(out, ref_decode(q, k, v, i32(ctx)), dtype)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("ctx", [1, 3 * DECODE_BN + 1])
@pytest.mark.parametrize("D,Hq,Hkv", HEADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_batch_one(dtype, D, Hq, Hkv, ctx, masked):
    """Batch 1 over 4 KV splits: context 1 (three empty splits) or one past three key blocks
    (every split has keys, the last just one); masked: rows= and valid= as well."""
    _seed("decode-b1", dtype, D, Hq, Hkv, ctx, masked)
    t_max = 4 * DECODE_BN
    q = randn(1, Hq, D, dtype=dtype)
    k, v = make_cache(1, Hkv, t_max, D, dtype, [ctx])
    valid = make_valid(t_max, [(ctx - 1, ctx)], k, v) if masked else None
    workspace = poisoned_workspace(1, Hq, D, 4)
    out = poisoned(q.shape, dtype)
    attention_decode(q, k, v, i32([ctx]), rows=i32([0]) if masked else None, valid=valid,
                     out=out, workspace=workspace)
    assert_counters_at_rest(workspace)
    assert_close(out, ref_decode(q, k, v, i32([ctx]), valid), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_workspace_reused(dtype):
    """One workspace (partials NaN at first) through consecutive calls with different rows,
    contexts, masks and caches, as in the layers and steps of a decode: each call is right and
    leaves every counter at zero."""
    _seed("decode-reuse", dtype)
    D, Hq, Hkv, B, t_max = 64, 6, 2, 3, 3 * DECODE_BN
    workspace = poisoned_workspace(B, Hq, D, 3)
    calls = [([t_max, 1, DECODE_BN + 1], None, False), ([5, 70, 2], [2, 0], True),
             ([DECODE_BN, 9, t_max], [1], False), ([40, 41, 42], None, True)]
    for ctx, rows, masked in calls:
        q = randn(B, Hq, D, dtype=dtype)
        k, v = make_cache(B, Hkv, t_max, D, dtype, ctx)
        valid = make_valid(t_max, [(n - 1, n) for n in ctx], k, v) if masked else None
        out = poisoned(q.shape, dtype)
        attention_decode(q, k, v, i32(ctx), rows=None if rows is None else i32(rows),
                         valid=valid, out=out, workspace=workspace)
        assert_counters_at_rest(workspace)
        rows = list(range(B)) if rows is None else rows
        assert_close(out[rows], ref_decode(q, k, v, i32(ctx), valid)[rows], dtype)


def test_decode_independent_of_num_splits():
    """Batch 1 and a mixed batch: every split count gives the reference result, and the results
    agree with each other to fp32 rounding."""
    _seed("decode-splits")
    D, Hq, Hkv, t_max = 64, 6, 2, 4 * DECODE_BN
    for ctx in ([3 * DECODE_BN + 1], [t_max, 1, 2 * DECODE_BN + 5]):
        q = randn(len(ctx), Hq, D)
        k, v = make_cache(len(ctx), Hkv, t_max, D, torch.float32, ctx)
        ref = ref_decode(q, k, v, i32(ctx))
        first = None
        for num_splits in (1, 2, 7, 16):
            out = attention_decode(q, k, v, i32(ctx), out=poisoned(q.shape, torch.float32),
                                   num_splits=num_splits)
            assert_close(out, ref, torch.float32)
            first = out if first is None else first
            torch.testing.assert_close(out, first, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_active_rows_with_workspace(dtype):
    """Only the listed rows are written; a NaN-filled workspace needs no clearing; the split
    count comes from the workspace."""
    _seed("decode-rows", dtype)
    D, Hq, Hkv, B, t_max = 64, 6, 2, 5, 70
    ctx = [9, 70, 1, 33, 50]
    q = randn(B, Hq, D, dtype=dtype)
    k, v = make_cache(B, Hkv, t_max, D, dtype, ctx)
    workspace = poisoned_workspace(B, Hq, D, 3)
    rows, untouched = [4, 1, 2], [0, 3]
    out = poisoned(q.shape, dtype)
    out[untouched] = SENTINEL
    attention_decode(q, k, v, i32(ctx), rows=i32(rows), out=out, workspace=workspace)
    assert (out[untouched] == SENTINEL).all()
    assert_counters_at_rest(workspace)
    assert_close(out[rows], ref_decode(q, k, v, i32(ctx))[rows], dtype)


def test_decode_default_splits_and_fresh_output():
    _seed("decode-default")
    D, Hq, Hkv, t_max = 64, 6, 2, 300
    ctx = [300, 129, 1]
    q = randn(3, Hq, D)
    k, v = make_cache(3, Hkv, t_max, D, torch.float32, ctx)
    assert 1 <= attention_decode_splits(3, Hkv, t_max, DEVICE) <= MAX_SPLITS
    assert_close(attention_decode(q, k, v, i32(ctx)), ref_decode(q, k, v, i32(ctx)),
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


def test_every_autotune_config():
    """Each config the GPU autotuner may pick, run alone under the interpreter, fp32, at a tiny
    shape where keys span two blocks of the smallest tile (and two decode splits)."""
    _seed("configs")
    D, Hq, Hkv, t_max = 16, 4, 2, 140
    start, lengths = [0, 130], [9, 7]
    q = randn(2, max(lengths), Hq, D)
    k, v = make_cache(2, Hkv, t_max, D, torch.float32, [s + n for s, n in zip(start, lengths)])
    ref = ref_prefill(q, k, v, i32(start), i32(lengths))
    for config in _prefill_kernel.all_configs:
        with only_config(_prefill_kernel, config):
            out = attention_prefill(q, k, v, i32(start), i32(lengths),
                                    out=poisoned(q.shape, torch.float32))
        assert_close(out, ref, torch.float32)
    ctx = [1, 130]
    ref = ref_decode(q[:, 0], k, v, i32(ctx))
    workspace = poisoned_workspace(2, Hq, D, 2)
    for config in _decode_kernel.all_configs:
        with only_config(_decode_kernel, config):
            out = attention_decode(q[:, 0], k, v, i32(ctx), workspace=workspace,
                                   out=poisoned(ref.shape, torch.float32))
        assert_counters_at_rest(workspace)
        assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_one_launch_each(num_splits):
    """attention_decode (split-KV and merge together) and attention_prefill are one kernel launch
    each, and nothing else, when the caller gives the buffers."""
    d = _decode_args(rows=i32([1, 0]), valid=torch.ones(2, 8, dtype=torch.bool, device=DEVICE))
    workspace = attention_decode_workspace(2, 4, 16, num_splits, DEVICE)
    out = torch.empty_like(d["q"])
    with count_launches() as launches:
        attention_decode(**d, out=out, workspace=workspace)
    assert dict(launches) == {"_decode_kernel": 1}
    assert_counters_at_rest(workspace)
    p = _prefill_args()
    out = torch.empty_like(p["q"])
    with count_launches() as launches:
        attention_prefill(**p, out=out)
    assert dict(launches) == {"_prefill_kernel": 1}


def test_decode_matches_last_prefill_query():
    """A decode step equals the last query of a prefill over the same cache."""
    _seed("decode-vs-prefill")
    D, Hq, Hkv, T = 64, 6, 2, 45
    q = randn(2, T, Hq, D)
    k, v = make_cache(2, Hkv, T, D, torch.float32, [T, 30])
    lengths = i32([T, 30])
    pre = attention_prefill(q, k, v, i32([0, 0]), lengths)
    dec = attention_decode(torch.stack([q[0, T - 1], q[1, 29]]), k, v, lengths, num_splits=2)
    torch.testing.assert_close(dec, torch.stack([pre[0, T - 1], pre[1, 29]]), rtol=1e-5,
                               atol=1e-6)


# ---- validity mask (backfill mode "mask") -------------------------------------------------------

@pytest.mark.parametrize("D,Hq,Hkv", HEADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_valid_mask(dtype, D, Hq, Hkv):
    """Contexts 1, 17, one past a key block, and a chunk whose history is two key blocks with
    the first one wholly excluded (a fully masked tile before the diagonal)."""
    _seed("prefill-valid", dtype, D, Hq, Hkv)
    start, lengths = [0, 10, PREFILL_BN - 3, 2 * PREFILL_BN + 3], [1, 7, 4, 8]
    B, T, t_max = len(lengths), max(lengths), 2 * PREFILL_BN + 16
    q = randn(B, T, Hq, D, dtype=dtype)
    k, v = make_cache(B, Hkv, t_max, D, dtype, [s + n for s, n in zip(start, lengths)])
    valid = make_valid(t_max, [(s, s + n) for s, n in zip(start, lengths)], k, v,
                       drop=[(3, slice(0, PREFILL_BN))])
    out = poisoned(q.shape, dtype)
    attention_prefill(q, k, v, i32(start), i32(lengths), valid=valid, out=out)
    assert_close(out, ref_prefill(q, k, v, i32(start), i32(lengths), valid), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_valid_mask_active_rows(dtype):
    """rows= with a uint8 mask; two query tiles; unlisted rows untouched."""
    _seed("prefill-valid-rows", dtype)
    D, Hq, Hkv, B = 64, 6, 2, 3
    T = PREFILL_BM + 3
    start, lengths = [5, 2 * PREFILL_BN + 1, 0], [T, 17, 9]
    t_max = max(s + n for s, n in zip(start, lengths)) + 3
    q = randn(B, T, Hq, D, dtype=dtype)
    k, v = make_cache(B, Hkv, t_max, D, dtype, [s + n for s, n in zip(start, lengths)])
    valid = make_valid(t_max, [(s, s + n) for s, n in zip(start, lengths)], k, v, p=0.3)
    rows, untouched = [1, 0], [2]
    out = poisoned(q.shape, dtype)
    out[untouched] = SENTINEL
    attention_prefill(q, k, v, i32(start), i32(lengths), rows=i32(rows),
                      valid=valid.to(torch.uint8), out=out)
    assert (out[untouched] == SENTINEL).all()
    ref = ref_prefill(q, k, v, i32(start), i32(lengths), valid)
    assert_close(out[rows], ref[rows], dtype)


@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("D,Hq,Hkv", HEADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_valid_mask(dtype, D, Hq, Hkv, num_splits):
    """Contexts 1, 17, one past a key block and the full cache, half the history excluded."""
    _seed("decode-valid", dtype, D, Hq, Hkv, num_splits)
    t_max = 2 * DECODE_BN + 10
    ctx = [1, 17, DECODE_BN + 1, t_max]
    q = randn(len(ctx), Hq, D, dtype=dtype)
    k, v = make_cache(len(ctx), Hkv, t_max, D, dtype, ctx)
    valid = make_valid(t_max, [(n - 1, n) for n in ctx], k, v)
    out = poisoned(q.shape, dtype)
    attention_decode(q, k, v, i32(ctx), valid=valid, out=out, num_splits=num_splits)
    assert_close(out, ref_decode(q, k, v, i32(ctx), valid), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_valid_mask_fully_masked_splits(dtype):
    """Whole splits (and whole key tiles inside a split) excluded, large scores, rows= and a
    NaN-filled workspace: an empty split must get zero weight in the merge, never NaN."""
    _seed("decode-valid-splits", dtype)
    D, Hq, Hkv, B = 64, 6, 2, 3
    t_max = 4 * DECODE_BN
    ctx = [t_max, 3 * DECODE_BN + 2, 2 * DECODE_BN + 1]
    q = randn(B, Hq, D, dtype=dtype, scale=10.0)
    k, v = make_cache(B, Hkv, t_max, D, dtype, ctx)
    # 3 splits of two key tiles each. Row 0: split 0 has an excluded tile before one with keys,
    # split 1 only the own entry, split 2 no keys; row 2: splits 0 and 1 wholly excluded.
    valid = make_valid(t_max, [(n - 1, n) for n in ctx], k, v, p=0.0,
                       keep=[(0, slice(DECODE_BN + 5, DECODE_BN + 9))])
    workspace = poisoned_workspace(B, Hq, D, 3)
    rows = [0, 2]
    out = poisoned(q.shape, dtype)
    attention_decode(q, k, v, i32(ctx), rows=i32(rows), valid=valid, out=out,
                     workspace=workspace)
    assert out[1].isnan().all()  # row 1 untouched
    assert_counters_at_rest(workspace)
    assert_close(out[rows], ref_decode(q, k, v, i32(ctx), valid)[rows], dtype)
    # row 2 has only its own entry: the output is exactly its value vector
    torch.testing.assert_close(out[2].float(), v[2, :, ctx[2] - 1].float().repeat_interleave(
        Hq // Hkv, 0))


def test_all_valid_mask_matches_no_mask():
    _seed("valid-all")
    D, Hq, Hkv, t_max = 64, 6, 2, 45
    q = randn(2, t_max, Hq, D)
    k, v = make_cache(2, Hkv, t_max, D, torch.float32, [t_max, 30])
    lengths, start = i32([t_max, 30]), i32([0, 0])
    ones = torch.ones(2, t_max, dtype=torch.bool, device=DEVICE)
    torch.testing.assert_close(attention_prefill(q, k, v, start, lengths, valid=ones),
                               attention_prefill(q, k, v, start, lengths), rtol=0, atol=0)
    torch.testing.assert_close(attention_decode(q[:, 0], k, v, lengths, valid=ones, num_splits=2),
                               attention_decode(q[:, 0], k, v, lengths, num_splits=2),
                               rtol=0, atol=0)


# ---- bad input, custom-op registration ----------------------------------------------------------

def _prefill_args(**over):
    B, T, Hq, Hkv, D, t_max = 2, 4, 4, 2, 16, 8
    args = dict(q=randn(B, T, Hq, D), k_cache=randn(B, Hkv, t_max, D),
                v_cache=randn(B, Hkv, t_max, D), start=i32([0, 0]), lengths=i32([4, 2]))
    args.update(over)
    return args


def _decode_args(**over):
    B, Hq, Hkv, D, t_max = 2, 4, 2, 16, 8
    args = dict(q=randn(B, Hq, D), k_cache=randn(B, Hkv, t_max, D),
                v_cache=randn(B, Hkv, t_max, D), context_lens=i32([3, 8]))
    args.update(over)
    return args


@pytest.mark.parametrize("over,match", [
    (dict(q=randn(2, 4, 16)), "q must have 4 dimensions"),
    (dict(q=randn(2, 4, 4, 16).to(torch.int32)), "q must have dtype"),
    (dict(q=randn(2, 4, 4, 24)), "q: head_dim must be a power of two"),
    (dict(q=randn(2, 4, 16, 4).transpose(2, 3)), "q must be contiguous"),
    (dict(k_cache=randn(2, 2, 8, 16, dtype=torch.float16)), "k_cache must have dtype"),
    (dict(v_cache=randn(2, 2, 9, 16)), "v_cache must have shape"),
    (dict(k_cache=randn(2, 3, 8, 16), v_cache=randn(2, 3, 8, 16)), "positive multiple"),
    (dict(q=randn(2, 4, 0, 16)), "positive multiple"),
    (dict(k_cache=randn(2, 2, 3, 16), v_cache=randn(2, 2, 3, 16)), "T_max"),
    (dict(start=torch.zeros(2, dtype=torch.int64)), "start must have dtype"),
    (dict(lengths=i32([4])), "lengths must have shape"),
    (dict(rows=torch.zeros(1, dtype=torch.int64)), "rows must have dtype"),
    (dict(out=randn(2, 4, 4, 8)), "out must have shape"),
    (dict(valid=torch.ones(2, 8, dtype=torch.int32, device=DEVICE)), "valid must have dtype"),
    (dict(valid=torch.ones(2, 7, dtype=torch.bool, device=DEVICE)), "valid must have shape"),
    (dict(valid=torch.ones(8, 2, dtype=torch.bool, device=DEVICE).t()), "valid must be contig"),
    (dict(valid=torch.ones(2, 8, dtype=torch.bool, device="meta")), "valid must be on"),
    (dict(valid=[[True] * 8] * 2), "valid must be a torch.Tensor"),
])
def test_prefill_bad_input(over, match):
    with pytest.raises(ValueError, match=match):
        attention_prefill(**_prefill_args(**over))


@pytest.mark.parametrize("over,match", [
    (dict(q=randn(2, 1, 4, 16)), "q must have 3 dimensions"),
    (dict(k_cache=randn(3, 2, 8, 16), v_cache=randn(3, 2, 8, 16)), "batch"),
    (dict(k_cache=randn(2, 2, 8, 32), v_cache=randn(2, 2, 8, 32)), "head_dim"),
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
    (dict(valid=torch.ones(2, 8, dtype=torch.float32, device=DEVICE)), "valid must have dtype"),
    (dict(valid=torch.ones(3, 8, dtype=torch.bool, device=DEVICE)), "valid must have shape"),
    (dict(valid=torch.ones(2, 8, dtype=torch.bool, device="meta")), "valid must be on"),
])
def test_decode_bad_input(over, match):
    with pytest.raises(ValueError, match=match):
        attention_decode(**_decode_args(**over))


@pytest.mark.parametrize("with_rows", [False, True])
def test_opcheck(with_rows):
    rows = i32([1]) if with_rows else None
    valid = torch.ones(2, 8, dtype=torch.bool, device=DEVICE) if with_rows else None
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
    D, Hq, t_max = 128, 32, 4096
    ctx = [4096, 1, 513, 2000]
    for dtype in DTYPES:
        q = randn(len(ctx), Hq, D, dtype=dtype)
        k, v = make_cache(len(ctx), Hkv, t_max, D, dtype, ctx)
        assert_close(attention_decode(q, k, v, i32(ctx)), ref_decode(q, k, v, i32(ctx)), dtype)
        start, lengths = [0, 700], [512, 300]
        qp = randn(2, 512, Hq, D, dtype=dtype)
        k, v = make_cache(2, Hkv, 1024, D, dtype, [s + n for s, n in zip(start, lengths)])
        out = attention_prefill(qp, k, v, i32(start), i32(lengths))
        assert_close(out, ref_prefill(qp, k, v, i32(start), i32(lengths)), dtype)


@gpu
def test_gpu_decode_cuda_graph():
    """Captured once with caller buffers; replays follow new context lengths written in place."""
    _seed("graph")
    D, Hq, Hkv, B, t_max = 128, 32, 8, 4, 1024
    dtype = torch.bfloat16
    q = randn(B, Hq, D, dtype=dtype)
    k, v = make_cache(B, Hkv, t_max, D, dtype, [t_max] * B)
    ctx = i32([5, 100, 1024, 600])
    out = torch.empty_like(q)
    num_splits = attention_decode_splits(B, Hkv, t_max, DEVICE)
    assert num_splits > 1  # the in-kernel merge is captured too
    workspace = attention_decode_workspace(B, Hq, D, num_splits, DEVICE)
    attention_decode(q, k, v, ctx, out=out, workspace=workspace)  # compile + autotune first
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attention_decode(q, k, v, ctx, out=out, workspace=workspace)
    for lens in ([5, 100, 1024, 600], [1, 1023, 64, 129]):
        ctx.copy_(i32(lens))
        graph.replay()
        torch.cuda.synchronize()
        assert_counters_at_rest(workspace)
        assert_close(out, ref_decode(q, k, v, ctx), dtype)


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
    k, v = make_cache(1, Hkv, t_max, D, dtype, [t_max])
    ctx = i32([t_max - 5])
    num_splits = attention_decode_splits(1, Hkv, t_max, DEVICE)
    assert num_splits >= 8
    workspace = attention_decode_workspace(1, Hq, D, num_splits, DEVICE)
    first = attention_decode(q, k, v, ctx, workspace=workspace)
    assert_close(first, ref_decode(q, k, v, ctx), dtype)
    out = torch.empty_like(q)
    for _ in range(50):
        workspace.partial_out.fill_(float("nan"))
        workspace.partial_lse.fill_(float("nan"))
        attention_decode(q, k, v, ctx, out=out, workspace=workspace)
        assert torch.equal(out, first)
    assert_counters_at_rest(workspace)
