"""qkv_rope: Q/K/V projection + RoPE epilogue + paged cache write, against the float64
reference (the cache read back through reference.gather_pages)."""
import pytest
import torch

import reference
from d3kernels.config import LlamaConfig
from d3kernels.model import rope_tables
from d3kernels.ops._quant import weight_operand
from d3kernels.ops._tuning import only_config
from d3kernels.ops.qkv_rope import _qkv_rope_kernel, qkv_rope
from d3kernels.quant import quantize
from tests.ops.conftest import (CUDA, DEVICE, DTYPES, assert_close, gpu, poisoned, rand_quantized,
                                randn)
from tests.ops.paged import pages_for, shuffled_block_table, slot_mask

EPS = 1e-5

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _config(H, num_heads, num_kv, D, scaling=None, theta=10000.0):
    return LlamaConfig(vocab_size=32, hidden_size=H, intermediate_size=16, num_layers=1,
                       num_heads=num_heads, num_kv_heads=num_kv, head_dim=D, rope_theta=theta,
                       rope_scaling=scaling)


def _reference(x, w, start, cfg, norm=None):
    """float64 q [B, T, heads, D], k and v [B, T, kv_heads, D], positions [B, T]; x is RMS-normed
    with weight ``norm`` first when given."""
    B, T, _ = x.shape
    D = cfg.head_dim
    h = x.double().cpu()
    if norm is not None:
        h = reference.rms_norm(h, norm.double().cpu(), EPS)
    qkv = h @ w.double().cpu().T
    q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
    pos = start.long().cpu()[:, None] + torch.arange(T)
    inv_freq = reference.rope_inv_freq(D, cfg.rope_theta, cfg.rope_scaling)
    q = reference.apply_rope(q.reshape(B, T, cfg.num_heads, D), pos, inv_freq)
    k = reference.apply_rope(k.reshape(B, T, cfg.num_kv_heads, D), pos, inv_freq)
    return q, k, v.reshape(B, T, cfg.num_kv_heads, D), pos


def _norm_weight(H, dtype):
    """An RMSNorm weight away from 1."""
    return (torch.rand(H, dtype=torch.float64) + 0.5).to(dtype=dtype, device=DEVICE)


def _run_case(seed, B, T, H, num_kv, ratio, D, dtype, rows, t_max, page_size, scaling=None,
              norm=False, quant=None, start=None, holes=()):
    """One call against the reference; with ``norm`` x is an un-normed residual (scale 3) and
    the op normalizes it in its prologue. ``quant`` = (fmt, group size): the weight is a
    QuantizedWeight and the reference runs on its float64 dequantization. -1 in ``rows``: a
    padding slot. The cache is paged (``page_size``): each row holds the pages its positions
    need, shuffled in a pool with spare pages, -1 past them and at the (row, column) ``holes``
    (the tokens there are not written). ``start``: each row's first position (random when
    None)."""
    torch.manual_seed(seed)
    cfg = _config(H, num_kv * ratio, num_kv, D, scaling)
    cos, sin = rope_tables(cfg, t_max, dtype, DEVICE)
    x = randn(B, T, H, dtype=dtype, scale=3.0 if norm else 1.0)
    N = cfg.q_size + 2 * cfg.kv_size
    if quant is None:
        w = w_ref = randn(N, H, dtype=dtype, scale=H ** -0.5)
    else:
        w, w_ref = rand_quantized(N, H, fmt=quant[0], group_size=quant[1], scale=H ** -0.5)
    norm_weight = _norm_weight(H, dtype) if norm else None
    if start is None:
        start = torch.randint(0, t_max - T + 1, (B,), dtype=torch.int32)
    start = torch.as_tensor(start, dtype=torch.int32).to(DEVICE)
    q_ref, k_ref, v_ref, pos = _reference(x, w_ref, start, cfg, norm_weight)
    active = list(range(B)) if rows is None else [b for b in rows if b >= 0]

    pages = pages_for(start + T, page_size)
    num_pages = sum(pages) + 3
    table = shuffled_block_table(pages, -(-t_max // page_size), num_pages, seed)
    for b, col in holes:
        table[b, col] = -1
    # cache: random sentinels everywhere, NaN in the slots this call must write
    k_cache, v_cache = (randn(num_pages, page_size, num_kv, D, dtype=dtype) for _ in "kv")
    written = slot_mask(table, [b for b in active for _ in range(T)], pos[active].flatten(),
                        num_pages, page_size)
    k_cache[written], v_cache[written] = float("nan"), float("nan")
    k_before, v_before = k_cache.clone(), v_cache.clone()
    q_out = poisoned((B, T, cfg.num_heads, D), dtype)

    rows_t = None if rows is None else torch.tensor(rows, dtype=torch.int32, device=DEVICE)
    q = qkv_rope(x, w, cos, sin, start, k_cache, v_cache, table, num_heads=cfg.num_heads,
                 num_kv_heads=num_kv, rows=rows_t, q_out=q_out, norm_weight=norm_weight, eps=EPS)
    assert q is q_out
    idx = torch.tensor(active)
    assert_close(q[idx.to(DEVICE)], q_ref[idx], dtype)
    # each active token's K/V read back through the block table, those behind a page
    behind = table.long().cpu()[idx[:, None], pos[idx] // page_size] >= 0
    for cache, ref in ((k_cache, k_ref), (v_cache, v_ref)):
        got = reference.gather_pages(cache, table).cpu()[idx[:, None], pos[idx]]
        assert_close(got[behind], ref[idx][behind], dtype)
    # nothing else moved: other slots and spare pages keep their sentinels, other rows of q
    # stay poisoned
    assert torch.equal(k_cache[~written], k_before[~written])
    assert torch.equal(v_cache[~written], v_before[~written])
    inactive = [b for b in range(B) if b not in active]
    if inactive:
        assert q[torch.tensor(inactive, device=DEVICE)].isnan().all()


CASES = [  # (B, T, H, num_kv, ratio, D, rows, t_max, fused norm, page size)
    (2, 1, 96, 2, 1, 64, None, 40, False, 16),       # decode, MHA
    (3, 17, 200, 1, 8, 128, [2, 0], 48, False, 4),   # prefill past a 16-token block, GQA 8
    (4, 17, 96, 2, 3, 128, [1, 3], 40, False, 1),    # GQA 3, head_dim 128, subset, 1-slot pages
    (5, 1, 200, 1, 3, 64, [4, 0, 2], 24, False, 16),  # decode subset, rows out of order
    (1, 1, 200, 2, 1, 128, None, 24, False, 4),      # batch 1
    (2, 1, 96, 2, 1, 64, None, 40, True, 1),         # norm prologue: decode, MHA
    (3, 17, 200, 1, 8, 128, [2, 0], 48, True, 16),   # norm prologue: prefill, GQA 8, subset
    (5, 1, 200, 1, 3, 64, [4, 0, 2], 24, True, 4),   # norm prologue: GQA 3, rows out of order
    (1, 1, 96, 1, 3, 128, None, 24, True, 16),       # norm prologue: batch 1, GQA 3
    (1, 1, 200, 2, 8, 64, [0], 24, True, 4),         # norm prologue: batch 1 through rows
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_qkv_rope_matches_reference(case, dtype):
    B, T, H, num_kv, ratio, D, rows, t_max, norm, page_size = case
    _run_case(10 * CASES.index(case) + DTYPES.index(dtype), B, T, H, num_kv, ratio, D, dtype,
              rows, t_max, page_size, norm=norm)


QUANT_CASES = [  # (fmt, G), (B, T, H, num_kv, ratio, D, rows, t_max, fused norm, page size)
    (("int4", 32), (3, 1, 96, 1, 3, 48, [2, -1, 0], 16, True, 16)),   # GQA 3, -1 padding
    (("int4", 128), (2, 17, 256, 2, 1, 64, None, 40, False, 4)),      # prefill, 2 groups
    (("int8", 32), (4, 3, 160, 1, 8, 32, [3, 1], 24, True, 1)),       # GQA 8, 5 groups
    (("int8", 200), (2, 1, 200, 2, 3, 64, [1, -1], 24, False, 16)),   # per-row scale (G = K)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant, case", QUANT_CASES,
                         ids=[f"{f}-g{g}" for (f, g), _ in QUANT_CASES])
def test_qkv_rope_quantized_matches_reference(quant, case, dtype):
    """Weight-only int4/int8 against the float64 reference on the dequantized weight."""
    B, T, H, num_kv, ratio, D, rows, t_max, norm, page_size = case
    _run_case(300 + 10 * QUANT_CASES.index((quant, case)) + DTYPES.index(dtype), B, T, H,
              num_kv, ratio, D, dtype, rows, t_max, page_size, norm=norm, quant=quant)


@pytest.mark.parametrize("T, start", [(1, [3, 4, 7, 8]), (5, [0, 3, 4, 8])],
                         ids=["decode", "prefill"])
def test_qkv_rope_page_boundaries(T, start):
    """Page size 4: decode tokens on the last slot of a page and on the first of the next
    (a row's last page then holds that one token); prefill runs starting on, just before and
    just after a page boundary, ending on one (start 3) or one past it (start 0, 4 and 8)."""
    _run_case(40 + T, 4, T, 64, 1, 3, 32, torch.float32, None, 16, 4, start=start)


def test_qkv_rope_drops_writes_behind_missing_pages():
    """-1 in the middle of a row's table (page 1 of row 0, page 2 of row 2): the prefill
    tokens there write nothing to the cache, every other token does, and Q is whole."""
    _run_case(44, 3, 9, 64, 2, 1, 32, torch.float32, [0, 2], 16, 4, start=[2, 0, 5],
              holes=[(0, 1), (2, 2)])


def test_qkv_rope_quantized_layer_of_a_stack():
    """w_qkv[j] of a stacked QuantizedWeight (the engine's call): data and scales are views
    at an offset into the stack."""
    torch.manual_seed(5)
    B, T, H, nkv, nh, D, L, t_max = 2, 1, 64, 1, 3, 32, 3, 8
    cfg = _config(H, nh, nkv, D)
    cos, sin = rope_tables(cfg, t_max, torch.float32, DEVICE)
    x = randn(B, T, H)
    w, w_ref = rand_quantized(L, cfg.q_size + 2 * cfg.kv_size, H, fmt="int4", group_size=32,
                              scale=H ** -0.5)
    start = torch.tensor([3, 0], dtype=torch.int32, device=DEVICE)
    # a contiguous cache: one t_max-slot page per row, the identity table
    k_cache = torch.zeros(B, t_max, nkv, D, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    table = torch.arange(B, dtype=torch.int32, device=DEVICE)[:, None]
    q = qkv_rope(x, w[2], cos, sin, start, k_cache, v_cache, table, num_heads=nh,
                 num_kv_heads=nkv)
    q_ref, k_ref, v_ref, pos = _reference(x, w_ref[2], start, cfg)
    assert_close(q, q_ref, torch.float32)
    for b in range(B):
        assert_close(k_cache[b, pos[b].to(DEVICE)], k_ref[b], torch.float32)
        assert_close(v_cache[b, pos[b].to(DEVICE)], v_ref[b], torch.float32)


@pytest.mark.parametrize("quant", [None, ("int4", 32)], ids=["float", "int4"])
@pytest.mark.parametrize("index", range(len(_qkv_rope_kernel.all_configs)))
@pytest.mark.skipif(CUDA, reason="an interpreter sweep: on a GPU each config costs a compile")
def test_qkv_rope_every_config(index, quant):
    """Each config the GPU autotuner may pick, with the norm prologue and active rows: head_dim
    128 so every BLOCK_HALF fits a half head, H = 136 (int4: 160, five groups) so every BLOCK_K
    has a ragged last block."""
    with only_config(_qkv_rope_kernel, _qkv_rope_kernel.all_configs[index]):
        _run_case(500 + index, 3, 2, 136 if quant is None else 160, 1, 2, 128, torch.float32,
                  [2, 0], 8, 4, norm=True, quant=quant)


def test_qkv_rope_llama3_scaling():
    _run_case(11, 2, 17, 96, 1, 8, 64, torch.float32, None, 200, 16, scaling=LLAMA3_SCALING)


def test_qkv_rope_allocates_q_and_writes_strided_cache_view():
    """q_out omitted; the cache is one layer of a stacked [L, P, S, ...] paged cache (pages
    of 4 slots: row 0's tokens 5..7 in its page 1, row 1's 0..2 in its page 0)."""
    torch.manual_seed(3)
    B, T, H, nkv, nh, D, L, t_max, S, P = 2, 3, 96, 2, 6, 64, 3, 16, 4, 6
    cfg = _config(H, nh, nkv, D)
    cos, sin = rope_tables(cfg, t_max, torch.float32, DEVICE)
    x = randn(B, T, H)
    w = randn(cfg.q_size + 2 * cfg.kv_size, H, scale=H ** -0.5)
    start = torch.tensor([5, 0], dtype=torch.int32, device=DEVICE)
    table = torch.tensor([[4, 1, -1, -1], [3, -1, -1, -1]], dtype=torch.int32, device=DEVICE)
    stacked_k = torch.zeros(L, P, S, nkv, D, device=DEVICE)
    stacked_v = torch.zeros_like(stacked_k)
    q = qkv_rope(x, w, cos, sin, start, stacked_k[1], stacked_v[1], table, num_heads=nh,
                 num_kv_heads=nkv)
    q_ref, k_ref, v_ref, _ = _reference(x, w, start, cfg)
    assert_close(q, q_ref, torch.float32)
    assert_close(stacked_k[1, 1, 1:4], k_ref[0], torch.float32)
    assert_close(stacked_v[1, 3, 0:3], v_ref[1], torch.float32)
    assert stacked_k[0].abs().sum() == 0 and stacked_k[2].abs().sum() == 0
    assert stacked_k[1, [0, 2, 4, 5]].abs().sum() == 0 and stacked_k[1, 1, 0].abs().sum() == 0
    assert stacked_k[1, 3, 3].abs().sum() == 0


def _small_inputs(dtype=torch.float32):
    """Two rows of two 4-slot pages each in a 5-page pool."""
    B, T, H, nh, nkv, D, t_max, S, P = 2, 1, 32, 2, 1, 32, 8, 4, 5
    cos, sin = rope_tables(_config(H, nh, nkv, D), t_max, dtype, DEVICE)
    return dict(x=randn(B, T, H, dtype=dtype), w_qkv=randn((nh + 2 * nkv) * D, H, dtype=dtype),
                cos=cos, sin=sin, start=torch.tensor([1, 3], dtype=torch.int32, device=DEVICE),
                k_cache=torch.zeros(P, S, nkv, D, dtype=dtype, device=DEVICE),
                v_cache=torch.zeros(P, S, nkv, D, dtype=dtype, device=DEVICE),
                block_table=shuffled_block_table([2, 2], 2, P, seed=0),
                num_heads=nh, num_kv_heads=nkv)


def _table(*rows):
    return torch.tensor(rows, dtype=torch.int32)


@pytest.mark.parametrize("change, name", [
    (dict(block_table=_table([0, 5], [1, 2])), r"block_table: entries must be in \[-1, P=5\)"),
    (dict(block_table=_table([0, -2], [1, 2])), r"block_table: entries .* got min -2"),
    (dict(block_table=_table([0, 1], [2, 3]).long()), "block_table must have dtype"),
    (dict(block_table=_table([0, 1])), r"block_table must have one row per batch row \(2\)"),
    (dict(k_cache=torch.zeros(5, 12, 1, 32), v_cache=torch.zeros(5, 12, 1, 32)),
     r"k_cache: page_size \(dim 1\) must be a power of two, got 12"),
    (dict(k_cache=torch.zeros(5, 4, 2, 32)), "k_cache"),  # kv heads
    (dict(w_qkv=torch.zeros(100, 32)), "w_qkv"),
    (dict(start=torch.tensor([1, 3])), "start"),
    (dict(num_heads=0), "num_heads"),
    (dict(x=torch.zeros(2, 1, 32, dtype=torch.float16)), "k_cache"),
    (dict(rows=torch.tensor([0, 1, 1])), "rows"),
    (dict(v_cache=torch.zeros(5, 4, 1, 64)[..., :32]), "v_cache"),  # other strides
    (dict(cos=torch.zeros(8, 16)), "cos"),
    (dict(q_out=torch.zeros(2, 1, 2, 16)), "q_out"),
    (dict(norm_weight=torch.ones(31)), "norm_weight"),
    (dict(norm_weight=torch.ones(32, dtype=torch.float16)), "norm_weight"),
    (dict(norm_weight=torch.ones(32), eps=-1.0), "eps"),
])
def test_qkv_rope_bad_input(change, name):
    """ValueError naming the argument, before any launch: the cache is as it was."""
    kwargs = _small_inputs()
    kwargs.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v
                   for k, v in change.items()})
    with pytest.raises(ValueError, match=name):
        qkv_rope(**kwargs)
    assert kwargs["k_cache"].abs().sum() == 0 and kwargs["v_cache"].abs().sum() == 0


@pytest.mark.parametrize("w_qkv", [
    quantize(torch.randn(100, 32), "int4", 32),     # N
    quantize(torch.randn(128, 64), "int8", 32),     # K
    quantize(torch.randn(2, 128, 32), "int4", 32),  # a stack, not one matrix
    quantize(torch.randn(128, 32), "int8").to("meta"),  # device
], ids=["N", "K", "stacked", "device"])
def test_qkv_rope_bad_quantized_weight(w_qkv):
    """A QuantizedWeight of the wrong shape or device: ValueError naming w_qkv, nothing written."""
    kwargs = _small_inputs()
    q_out = poisoned((2, 1, 2, 32), torch.float32)
    with pytest.raises(ValueError, match="w_qkv"):
        qkv_rope(**{**kwargs, "w_qkv": w_qkv.to(DEVICE) if w_qkv.device.type != "meta"
                    else w_qkv}, q_out=q_out)
    assert kwargs["k_cache"].abs().sum() == 0 and kwargs["v_cache"].abs().sum() == 0
    assert q_out.isnan().all()


def _op_weight(w, fmt):
    """The custom op's weight arguments (data, scale, offset, group, wfmt) for ``w`` as given
    or quantized to ``fmt``."""
    if fmt is not None:
        w = quantize(w, fmt, 16)
    return weight_operand("w_qkv", w, tuple(w.shape), torch.float32, DEVICE)


@pytest.mark.parametrize("norm, fmt", [(False, None), (True, None), (True, "int4"),
                                       (False, "int8")])
def test_qkv_rope_opcheck(norm, fmt):
    kw = _small_inputs()
    q_out = torch.empty(2, 1, 2, 32, device=DEVICE)
    args = (kw["x"], *_op_weight(kw["w_qkv"], fmt), kw["cos"], kw["sin"], kw["start"],
            kw["k_cache"], kw["v_cache"], kw["block_table"], q_out,
            torch.tensor([1], dtype=torch.int32, device=DEVICE), 2, 1,
            _norm_weight(32, torch.float32) if norm else None, EPS)
    torch.library.opcheck(torch.ops.d3kernels.qkv_rope.default, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


@gpu
@pytest.mark.parametrize("num_kv", [32, 8])  # Llama-2-7B, Llama-3-8B
@pytest.mark.parametrize("T", [1, 33])
def test_qkv_rope_llama_shapes_bf16(num_kv, T):
    """Llama shapes, bf16, 16-slot pages shuffled in a pool with spare pages."""
    torch.manual_seed(num_kv + T)
    B, H, nh, D, t_max, S = 4, 4096, 32, 128, 512, 16
    cfg = _config(H, nh, num_kv, D, theta=500000.0)
    cos, sin = rope_tables(cfg, t_max, torch.bfloat16, DEVICE)
    x = randn(B, T, H, dtype=torch.bfloat16)
    w = randn(cfg.q_size + 2 * cfg.kv_size, H, dtype=torch.bfloat16, scale=H ** -0.5)
    start = torch.tensor([0, 100, 300, 7], dtype=torch.int32, device=DEVICE)
    pages = pages_for(start + T, S)
    table = shuffled_block_table(pages, t_max // S, sum(pages) + 8, seed=T)
    k_cache = torch.zeros(sum(pages) + 8, S, num_kv, D, dtype=torch.bfloat16, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    q = qkv_rope(x, w, cos, sin, start, k_cache, v_cache, table, num_heads=nh,
                 num_kv_heads=num_kv)
    q_ref, k_ref, v_ref, pos = _reference(x, w, start, cfg)
    assert_close(q, q_ref, torch.bfloat16)
    rows = torch.arange(B)[:, None]
    assert_close(reference.gather_pages(k_cache, table).cpu()[rows, pos], k_ref, torch.bfloat16)
    assert_close(reference.gather_pages(v_cache, table).cpu()[rows, pos], v_ref, torch.bfloat16)


@gpu
@pytest.mark.parametrize("quant", [("int4", 128), ("int4", 32), ("int8", 4096)])
@pytest.mark.parametrize("T", [1, 33])
def test_qkv_rope_quantized_llama_shapes_bf16(quant, T):
    """Llama-3-8B's attention input (32/8 heads) with a quantized w_qkv, bf16: the norm
    prologue, rows with a padding slot."""
    _run_case(600 + T + quant[1], 4, T, 4096, 8, 4, 128, torch.bfloat16, [3, -1, 0], 512, 16,
              norm=True, quant=quant)
