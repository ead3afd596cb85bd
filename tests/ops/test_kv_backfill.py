"""kv_backfill: norm + K/V projection + RoPE + paged cache write of many layers and tokens, one
launch, against the float64 reference (the cache read back through reference.gather_pages)."""
import pytest
import torch
import torch.nn.functional as F

import reference
from d3kernels.config import LlamaConfig
from d3kernels.model import rope_tables
from d3kernels.ops._quant import weight_operand
from d3kernels.ops._tuning import only_config
from d3kernels.ops.kv_backfill import _kv_backfill_kernel, kv_backfill
from d3kernels.ops.qkv_rope import qkv_rope
from d3kernels.quant import quantize
from tests.ops.conftest import (CUDA, DEVICE, DTYPES, TOL, assert_close, gpu, rand_quantized,
                                randn, rel_err)
from tests.ops.paged import pages_for, shuffled_block_table, slot_mask

EPS = 1e-5


def _config(H, num_heads, num_kv, D, L, theta=10000.0):
    return LlamaConfig(vocab_size=32, hidden_size=H, intermediate_size=16, num_layers=L,
                       num_heads=num_heads, num_kv_heads=num_kv, head_dim=D, rope_theta=theta)


def _weights(cfg, dtype, quant=None):
    """Norm weights [L, H] and stacked w_qkv [L, N, H]: float in ``dtype``, or a QuantizedWeight
    with ``quant`` = (fmt, group size); and the float64 weight the reference multiplies by."""
    H = cfg.hidden_size
    norm = (torch.rand(cfg.num_layers, H, dtype=torch.float64) + 0.5).to(dtype=dtype, device=DEVICE)
    shape = (cfg.num_layers, cfg.q_size + 2 * cfg.kv_size, H)
    if quant is None:
        w = randn(*shape, dtype=dtype, scale=H ** -0.5)
        return norm, w, w
    w, w_ref = rand_quantized(*shape, fmt=quant[0], group_size=quant[1], scale=H ** -0.5)
    return norm, w, w_ref


def _reference(x, layers, norm, w, positions, cfg):
    """{layer: (k [M, kv_heads, D], v [M, kv_heads, D])} in float64."""
    M, D = x.shape[0], cfg.head_dim
    inv_freq = reference.rope_inv_freq(D, cfg.rope_theta, cfg.rope_scaling)
    out = {}
    for layer in layers:
        h = reference.rms_norm(x.double().cpu(), norm[layer].double().cpu(), EPS)
        k, v = (h @ w[layer, cfg.q_size:].double().cpu().T).split(cfg.kv_size, dim=-1)
        k = reference.apply_rope(k.reshape(1, M, cfg.num_kv_heads, D),
                                 positions.long().cpu()[None], inv_freq)[0]
        out[layer] = k, v.reshape(M, cfg.num_kv_heads, D)
    return out


def _tokens(M, B, t_max, gen):
    """M distinct (row, position) pairs, in random order."""
    flat = torch.randperm(B * t_max, generator=gen)[:M]
    return (flat % t_max).to(torch.int32).to(DEVICE), (flat // t_max).to(torch.int32).to(DEVICE)


CASES = [  # (H, num_kv, ratio, D, L, B, t_max, page size)
    (96, 2, 3, 64, 6, 3, 20, 4),
    (200, 1, 8, 128, 5, 2, 24, 16),
]


def _paged_cache(positions, cache_rows, B, t_max, page_size, L, num_kv, D, dtype, seed,
                 holes=()):
    """A block table giving each row the pages up to its last listed position (-1 past them and
    at the (row, column) ``holes``), shuffled in a pool with 3 spare pages, and k, v caches
    [L, P, S, num_kv, D] of random sentinels."""
    ends = torch.zeros(B, dtype=torch.long)
    ends.scatter_reduce_(0, cache_rows.long().cpu(), positions.long().cpu() + 1, "amax")
    pages = pages_for(ends, page_size)
    table = shuffled_block_table(pages, -(-t_max // page_size), sum(pages) + 3, seed)
    for b, col in holes:
        table[b, col] = -1
    shape = (L, sum(pages) + 3, page_size, num_kv, D)
    return table, randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)


def _check(seed, H, num_kv, ratio, D, L, B, t_max, page_size, layers, M, dtype, quant=None,
           tokens=None, holes=()):
    """One launch over ``layers`` × M random (row, position) pairs (or ``tokens`` =
    (positions, cache_rows)) against the reference: the listed slots (NaN before) hold the
    reference K/V, every other slot of the paged cache keeps its sentinel; tokens behind a -1
    entry (``holes``, see _paged_cache) write nothing. ``quant`` = (fmt, group size): a
    quantized w_qkv, the reference on its dequantization."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = _config(H, num_kv * ratio, num_kv, D, L)
    cos, sin = rope_tables(cfg, t_max, dtype, DEVICE)
    norm, w, w_ref = _weights(cfg, dtype, quant)
    x = randn(M, H, dtype=dtype, scale=3.0)
    positions, cache_rows = _tokens(M, B, t_max, gen) if tokens is None else (
        torch.tensor(t, dtype=torch.int32, device=DEVICE) for t in tokens)
    table, k_cache, v_cache = _paged_cache(positions, cache_rows, B, t_max, page_size, L,
                                           num_kv, D, dtype, seed, holes)
    written = torch.zeros(k_cache.shape[:3], dtype=torch.bool, device=DEVICE)
    written[layers] = slot_mask(table, cache_rows, positions, k_cache.shape[1], page_size)
    k_cache[written], v_cache[written] = float("nan"), float("nan")
    k_before, v_before = k_cache.clone(), v_cache.clone()

    kv_backfill(x, torch.tensor(layers, dtype=torch.int32, device=DEVICE), norm, w, cos, sin,
                positions, cache_rows, table, k_cache, v_cache, q_size=cfg.q_size, eps=EPS)

    ref = _reference(x, layers, norm, w_ref, positions, cfg)
    rows_, pos_ = cache_rows.long().cpu(), positions.long().cpu()
    behind = table.long().cpu()[rows_, pos_ // page_size] >= 0
    for layer in layers:
        for cache, want in zip((k_cache, v_cache), ref[layer]):
            got = reference.gather_pages(cache[layer], table).cpu()[rows_, pos_]
            assert_close(got[behind], want[behind], dtype)
    assert torch.equal(k_cache[~written], k_before[~written])
    assert torch.equal(v_cache[~written], v_before[~written])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layers, M", [
    ([1, 2, 3], 13),   # a contiguous run
    ([4, 0, 2], 1),    # scattered, out of order
    ([4, 0, 2], 13),
    ([3], 1),          # one layer, one token
])
@pytest.mark.parametrize("case", CASES)
def test_kv_backfill_matches_reference(case, layers, M, dtype):
    seed = 100 * CASES.index(case) + 10 * len(layers) + M + DTYPES.index(dtype) + layers[0]
    _check(seed, *case, layers, M, dtype)


QUANT_CASES = [  # (fmt, G), (H, num_kv, ratio, D, L, B, t_max, page size), layers, M
    (("int4", 32), (96, 1, 3, 48, 4, 2, 12, 1), [3, 0, 2], 5),    # GQA 3, D 48, 3 groups
    (("int4", 128), (256, 2, 1, 64, 3, 2, 20, 4), [1, 2], 13),    # MHA, 2 groups
    (("int8", 32), (160, 1, 8, 32, 3, 2, 16, 16), [2, 0], 3),     # GQA 8, 5 groups
    (("int8", 200), (200, 2, 3, 64, 3, 3, 20, 1), [0, 2], 4),     # per-row scale (G = K)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant, case, layers, M", QUANT_CASES,
                         ids=[f"{f}-g{g}" for (f, g), *_ in QUANT_CASES])
def test_kv_backfill_quantized_matches_reference(quant, case, layers, M, dtype):
    """Weight-only int4/int8 stacks (data and scales each with their own layer stride) against
    the float64 reference on the dequantized weights."""
    seed = 700 + 10 * [q for q, *_ in QUANT_CASES].index(quant) + DTYPES.index(dtype)
    _check(seed, *case, layers, M, dtype, quant=quant)


@pytest.mark.parametrize("quant", [None, ("int4", 32)], ids=["float", "int4"])
@pytest.mark.parametrize("index", range(len(_kv_backfill_kernel.all_configs)))
@pytest.mark.skipif(CUDA, reason="an interpreter sweep: on a GPU each config costs a compile")
def test_kv_backfill_every_config(index, quant):
    """Each config the GPU autotuner may pick, fp32: head_dim 128 so every BLOCK_HALF fits a
    half head, H = 136 (int4: 160, five groups) so every BLOCK_K has a ragged last block."""
    with only_config(_kv_backfill_kernel, _kv_backfill_kernel.all_configs[index]):
        _check(900 + index, 136 if quant is None else 160, 1, 2, 128, 3, 2, 8, 4, [2, 0], 3,
               torch.float32, quant=quant)


def test_kv_backfill_page_boundaries_and_missing_pages():
    """Page size 4: tokens on the last slot of a page and on the first of the next (3, 4; 7,
    8), two of them behind -1 entries (row 0's page 1, row 1's page 2) which write nothing."""
    _check(31, 64, 1, 3, 32, 3, 2, 16, 4, [2, 0], 6, torch.float32,
           tokens=([3, 4, 7, 8, 4, 11], [0, 0, 1, 1, 1, 0]), holes=[(0, 1), (1, 2)])


@pytest.mark.parametrize("quant", [None, ("int4", 32)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_backfill_equals_per_layer_path(dtype, quant):
    """Same K/V as running qkv_rope on the layer's normed input, layer by layer (one token per
    row, different positions): the deferred fill agrees with the eager one, float or quantized
    (qkv_rope then gets the layer ``w[j]`` of the stack)."""
    torch.manual_seed(7 + DTYPES.index(dtype))
    H, nkv, nh, D, L, B, t_max = 96, 2, 6, 64, 4, 3, 20
    cfg = _config(H, nh, nkv, D, L)
    cos, sin = rope_tables(cfg, t_max, dtype, DEVICE)
    norm, w, _ = _weights(cfg, dtype, quant)
    x = randn(B, H, dtype=dtype, scale=2.0)
    positions = torch.tensor([4, 0, 19], dtype=torch.int32, device=DEVICE)
    rows = torch.arange(B, dtype=torch.int32, device=DEVICE)
    layers = [0, 2, 3]
    table = shuffled_block_table([5, 5, 5], 5, 17, seed=7)  # 4-slot pages
    k_fill = torch.zeros(L, 17, 4, nkv, D, dtype=dtype, device=DEVICE)
    v_fill = torch.zeros_like(k_fill)
    kv_backfill(x, torch.tensor(layers, dtype=torch.int32, device=DEVICE), norm, w, cos, sin,
                positions, rows, table, k_fill, v_fill, q_size=cfg.q_size, eps=EPS)
    k_step, v_step = torch.zeros_like(k_fill), torch.zeros_like(v_fill)
    for layer in layers:
        normed = F.rms_norm(x, (H,), norm[layer], EPS)
        qkv_rope(normed[:, None], w[layer], cos, sin, positions, k_step[layer], v_step[layer],
                 table, num_heads=nh, num_kv_heads=nkv)
    for filled, stepped in ((k_fill, k_step), (v_fill, v_step)):
        assert (filled != 0).sum() == (stepped != 0).sum() > 0
        assert rel_err(filled, stepped) <= TOL[dtype]


def test_kv_backfill_no_tokens_or_layers_is_a_no_op():
    cfg = _config(32, 2, 1, 32, 2)
    cos, sin = rope_tables(cfg, 4, torch.float32, DEVICE)
    norm, w, _ = _weights(cfg, torch.float32)
    k = torch.zeros(2, 1, 4, 1, 32, device=DEVICE)
    v = torch.zeros_like(k)
    table = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)
    none = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    kv_backfill(randn(0, 32), torch.tensor([1], dtype=torch.int32, device=DEVICE), norm, w, cos,
                sin, none, none, table, k, v, q_size=64, eps=EPS)
    one = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    kv_backfill(randn(1, 32), none, norm, w, cos, sin, one, one, table, k, v, q_size=64, eps=EPS)
    assert k.abs().sum() == 0 and v.abs().sum() == 0


def _small_inputs():
    """Two rows of two 4-slot pages each in a 5-page pool."""
    L, H, nh, nkv, D, t_max, M, S, P = 2, 32, 2, 1, 32, 8, 3, 4, 5
    cfg = _config(H, nh, nkv, D, L)
    cos, sin = rope_tables(cfg, t_max, torch.float32, DEVICE)
    norm, w, _ = _weights(cfg, torch.float32)
    idx = torch.tensor([0, 3, 5], dtype=torch.int32, device=DEVICE)
    return dict(x=randn(M, H), layers=torch.tensor([1, 0], dtype=torch.int32, device=DEVICE),
                norm_weight=norm, w_qkv=w, cos=cos, sin=sin, positions=idx,
                cache_rows=torch.tensor([0, 1, 1], dtype=torch.int32, device=DEVICE),
                block_table=shuffled_block_table([2, 2], 2, P, seed=0),
                k_cache=torch.zeros(L, P, S, nkv, D, device=DEVICE),
                v_cache=torch.zeros(L, P, S, nkv, D, device=DEVICE), q_size=nh * D, eps=EPS)


def _table(*rows):
    return torch.tensor(rows, dtype=torch.int32)


@pytest.mark.parametrize("change, name", [
    (dict(block_table=_table([0, 5], [1, 2])), r"block_table: entries must be in \[-1, P=5\)"),
    (dict(block_table=_table([0, -2], [1, 2])), r"block_table: entries .* got min -2"),
    (dict(block_table=_table([0, 1], [2, 3]).long()), "block_table must have dtype"),
    (dict(block_table=_table(0, 1)), "block_table must have 2 dimensions"),
    (dict(k_cache=torch.zeros(2, 5, 12, 1, 32), v_cache=torch.zeros(2, 5, 12, 1, 32)),
     r"k_cache: page_size \(dim 2\) must be a power of two, got 12"),
    (dict(layers=torch.tensor([1, 0])), "layers"),
    (dict(positions=torch.zeros(2, dtype=torch.int32)), "positions"),
    (dict(cache_rows=torch.zeros(3, dtype=torch.int64)), "cache_rows"),
    (dict(q_size=32), "w_qkv"),
    (dict(norm_weight=torch.ones(3, 32)), "norm_weight"),
    (dict(k_cache=torch.zeros(2, 5, 4, 1, 32, dtype=torch.float16)), "k_cache"),
    (dict(v_cache=torch.zeros(2, 5, 4, 1, 64)[..., :32]), "v_cache"),
    (dict(eps=-1.0), "eps"),
])
def test_kv_backfill_bad_input(change, name):
    """ValueError naming the argument, before any launch: the cache is as it was."""
    kwargs = _small_inputs()
    kwargs.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v
                   for k, v in change.items()})
    with pytest.raises(ValueError, match=name):
        kv_backfill(**kwargs)
    assert kwargs["k_cache"].abs().sum() == 0 and kwargs["v_cache"].abs().sum() == 0


@pytest.mark.parametrize("w_qkv", [
    quantize(torch.randn(2, 100, 32), "int4", 32),   # N
    quantize(torch.randn(3, 128, 32), "int8", 32),   # L
    quantize(torch.randn(2, 128, 64), "int4", 32),   # K
    quantize(torch.randn(128, 32), "int8", 32),      # one matrix, not a stack
    quantize(torch.randn(2, 128, 32), "int4", 32).to("meta"),  # device
], ids=["N", "L", "K", "unstacked", "device"])
def test_kv_backfill_bad_quantized_weight(w_qkv):
    """A QuantizedWeight of the wrong shape or device: ValueError naming w_qkv, nothing written."""
    kwargs = _small_inputs()
    with pytest.raises(ValueError, match="w_qkv"):
        kv_backfill(**{**kwargs, "w_qkv": w_qkv.to(DEVICE) if w_qkv.device.type != "meta"
                       else w_qkv})
    assert kwargs["k_cache"].abs().sum() == 0 and kwargs["v_cache"].abs().sum() == 0


@pytest.mark.parametrize("fmt", [None, "int4", "int8"])
def test_kv_backfill_opcheck(fmt):
    kw = _small_inputs()
    w = kw["w_qkv"] if fmt is None else quantize(kw["w_qkv"], fmt, 16)
    args = (kw["x"], kw["layers"], kw["norm_weight"],
            *weight_operand("w_qkv", w, tuple(w.shape), torch.float32, DEVICE), kw["cos"],
            kw["sin"], kw["positions"], kw["cache_rows"], kw["block_table"], kw["k_cache"],
            kw["v_cache"],
            kw["q_size"], EPS)
    torch.library.opcheck(torch.ops.d3kernels.kv_backfill.default, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


@gpu
@pytest.mark.parametrize("M", [1, 64])
def test_kv_backfill_llama2_7b_shapes_bf16(M):
    """16 of Llama-2-7B's 32 layers (the skipped half of a D³ step), bf16, 16-slot pages
    shuffled in a pool with spare pages."""
    torch.manual_seed(M)
    gen = torch.Generator().manual_seed(M)
    H, nh, D, L, B, t_max = 4096, 32, 128, 32, 8, 256
    cfg = _config(H, nh, nh, D, L)
    cos, sin = rope_tables(cfg, t_max, torch.bfloat16, DEVICE)
    norm, w, _ = _weights(cfg, torch.bfloat16)
    x = randn(M, H, dtype=torch.bfloat16)
    positions, cache_rows = _tokens(M, B, t_max, gen)
    table, k_cache, v_cache = _paged_cache(positions, cache_rows, B, t_max, 16, L, nh, D,
                                           torch.bfloat16, M)
    k_cache.zero_()
    v_cache.zero_()
    layers = list(range(8, 24))
    kv_backfill(x, torch.tensor(layers, dtype=torch.int32, device=DEVICE), norm, w, cos, sin,
                positions, cache_rows, table, k_cache, v_cache, q_size=cfg.q_size, eps=EPS)
    ref = _reference(x, layers, norm, w, positions, cfg)
    rows_, pos_ = cache_rows.long().cpu(), positions.long().cpu()
    for layer in layers:
        for cache, want in zip((k_cache, v_cache), ref[layer]):
            got = reference.gather_pages(cache[layer], table).cpu()[rows_, pos_]
            assert_close(got, want, torch.bfloat16)
    assert k_cache[:8].abs().sum() == 0 and k_cache[24:].abs().sum() == 0


@gpu
@pytest.mark.parametrize("quant", [("int4", 128), ("int4", 32), ("int8", 4096)])
@pytest.mark.parametrize("M", [1, 64])
def test_kv_backfill_quantized_llama3_shapes_bf16(quant, M):
    """Layers 3, 1, 2 of a 5-layer Llama-3-8B-shaped stack (32/8 heads), quantized, bf16."""
    _check(800 + M + quant[1], 4096, 8, 4, 128, 5, 8, 256, 16, [3, 1, 2], M, torch.bfloat16,
           quant=quant)
