"""attention_prefill / attention_decode vs reference.causal_gqa_attention in float64.

Cache slots past what each row may read are filled with NaN, so a kernel that reads one fails.
"""
import zlib

import pytest
import torch

from d3kernels.ops.attention import (MAX_SPLITS, _DECODE_CONFIGS, _PREFILL_CONFIGS, _prune_fp32,
                                     attention_decode, attention_decode_splits,
                                     attention_decode_workspace, attention_prefill)
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


def ref_prefill(q, k_cache, v_cache, start, lengths):
    B, T = q.shape[:2]
    t_max = k_cache.shape[2]
    start, lengths = start.long().cpu(), lengths.long().cpu()
    q_pos = start[:, None] + torch.arange(T)
    k_pos = torch.arange(t_max).expand(B, t_max)
    ref = causal_gqa_attention(q.double().cpu(), _ref_kv(k_cache), _ref_kv(v_cache), q_pos, k_pos)
    ref[torch.arange(T)[None, :] >= lengths[:, None]] = 0.0  # padded queries are zeros
    return ref


def ref_decode(q, k_cache, v_cache, context_lens):
    B = q.shape[0]
    t_max = k_cache.shape[2]
    q_pos = context_lens.long().cpu()[:, None] - 1
    k_pos = torch.arange(t_max).expand(B, t_max)
    return causal_gqa_attention(q.double().cpu()[:, None], _ref_kv(k_cache), _ref_kv(v_cache),
                                q_pos, k_pos)[:, 0]


def i32(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


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


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_active_rows_with_workspace(dtype):
    """Only the listed rows are written; a NaN-filled workspace needs no clearing; the split
    count comes from the workspace."""
    _seed("decode-rows", dtype)
    D, Hq, Hkv, B, t_max = 64, 6, 2, 5, 70
    ctx = [9, 70, 1, 33, 50]
    q = randn(B, Hq, D, dtype=dtype)
    k, v = make_cache(B, Hkv, t_max, D, dtype, ctx)
    workspace = attention_decode_workspace(B, Hq, D, 3, DEVICE)
    for w in workspace:
        w.fill_(float("nan"))
    rows, untouched = [4, 1, 2], [0, 3]
    out = poisoned(q.shape, dtype)
    out[untouched] = SENTINEL
    attention_decode(q, k, v, i32(ctx), rows=i32(rows), out=out, workspace=workspace)
    assert (out[untouched] == SENTINEL).all()
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
    (dict(workspace=attention_decode_workspace(2, 4, 16, 2, DEVICE)[1]), "workspace must be"),
])
def test_decode_bad_input(over, match):
    with pytest.raises(ValueError, match=match):
        attention_decode(**_decode_args(**over))


@pytest.mark.parametrize("with_rows", [False, True])
def test_opcheck(with_rows):
    rows = i32([1]) if with_rows else None
    p = _prefill_args()
    torch.library.opcheck(torch.ops.d3kernels.attention_prefill.default,
                          (*p.values(), rows, torch.zeros_like(p["q"])),
                          test_utils=("test_schema", "test_faketensor"))
    d = _decode_args()
    po, plse = attention_decode_workspace(2, 4, 16, 2, DEVICE)
    torch.library.opcheck(torch.ops.d3kernels.attention_decode.default,
                          (*d.values(), rows, torch.zeros_like(d["q"]), po, plse),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    """The wrappers trace into one graph (the custom ops are opaque nodes, no graph breaks)."""
    p, d = _prefill_args(), _decode_args()

    def step(p, d):
        return attention_prefill(**p), attention_decode(**d, num_splits=2)

    pre, dec = torch.compile(step, fullgraph=True, backend="aot_eager")(p, d)
    torch.testing.assert_close(pre, attention_prefill(**p))
    torch.testing.assert_close(dec, attention_decode(**d, num_splits=2))


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
    workspace = attention_decode_workspace(B, Hq, D, attention_decode_splits(B, Hkv, t_max,
                                                                            DEVICE), DEVICE)
    attention_decode(q, k, v, ctx, out=out, workspace=workspace)  # compile + autotune first
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attention_decode(q, k, v, ctx, out=out, workspace=workspace)
    for lens in ([5, 100, 1024, 600], [1, 1023, 64, 129]):
        ctx.copy_(i32(lens))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, ref_decode(q, k, v, ctx), dtype)
