"""qkv_rope: Q/K/V projection + RoPE epilogue + cache write, against the float64 reference."""
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


def _run_case(seed, B, T, H, num_kv, ratio, D, dtype, rows, t_max, scaling=None, norm=False,
              quant=None):
    """One call against the reference; with ``norm`` x is an un-normed residual (scale 3) and
    the op normalizes it in its prologue. ``quant`` = (fmt, group size): the weight is a
    QuantizedWeight and the reference runs on its float64 dequantization. -1 in ``rows``: a
    padding slot."""
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
    start = torch.randint(0, t_max - T + 1, (B,), dtype=torch.int32).to(DEVICE)
    q_ref, k_ref, v_ref, pos = _reference(x, w_ref, start, cfg, norm_weight)
    active = list(range(B)) if rows is None else [b for b in rows if b >= 0]

    # cache: random sentinels everywhere, NaN where this call must write
    k_cache, v_cache = randn(B, num_kv, t_max, D, dtype=dtype), randn(B, num_kv, t_max, D,
                                                                        dtype=dtype)
    written = torch.zeros(B, 1, t_max, 1, dtype=torch.bool)
    for b in active:
        written[b, 0, pos[b]] = True
    written = written.expand(B, num_kv, t_max, D).to(DEVICE)
    k_cache[written], v_cache[written] = float("nan"), float("nan")
    k_before, v_before = k_cache.clone(), v_cache.clone()
    q_out = poisoned((B, T, cfg.num_heads, D), dtype)

    rows_t = None if rows is None else torch.tensor(rows, dtype=torch.int32, device=DEVICE)
    q = qkv_rope(x, w, cos, sin, start, k_cache, v_cache, num_heads=cfg.num_heads,
                 num_kv_heads=num_kv, rows=rows_t, q_out=q_out, norm_weight=norm_weight, eps=EPS)
    assert q is q_out
    idx = torch.tensor(active)
    assert_close(q[idx.to(DEVICE)], q_ref[idx], dtype)
    k_got = torch.stack([k_cache[b][:, pos[b].to(DEVICE)].transpose(0, 1) for b in active])
    v_got = torch.stack([v_cache[b][:, pos[b].to(DEVICE)].transpose(0, 1) for b in active])
    assert_close(k_got, k_ref[idx], dtype)
    assert_close(v_got, v_ref[idx], dtype)
    # nothing else moved: other slots keep their sentinels, other rows of q stay poisoned
    assert torch.equal(k_cache[~written], k_before[~written])
    assert torch.equal(v_cache[~written], v_before[~written])
    inactive = [b for b in range(B) if b not in active]
    if inactive:
        assert q[torch.tensor(inactive, device=DEVICE)].isnan().all()


CASES = [  # (B, T, H, num_kv, ratio, D, rows, t_max, fused norm)
    (2, 1, 96, 2, 1, 64, None, 40, False),          # decode, MHA
    (3, 17, 200, 1, 8, 128, [2, 0], 48, False),     # prefill past a 16-token block, GQA 8, subset
    (4, 17, 96, 2, 3, 128, [1, 3], 40, False),      # GQA 3, head_dim 128, subset
    (5, 1, 200, 1, 3, 64, [4, 0, 2], 24, False),    # decode subset, rows out of order
    (1, 1, 200, 2, 1, 128, None, 24, False),        # batch 1
    (2, 1, 96, 2, 1, 64, None, 40, True),           # norm prologue: decode, MHA
    (3, 17, 200, 1, 8, 128, [2, 0], 48, True),      # norm prologue: prefill, GQA 8, subset
    (5, 1, 200, 1, 3, 64, [4, 0, 2], 24, True),     # norm prologue: GQA 3, rows out of order
    (1, 1, 96, 1, 3, 128, None, 24, True),          # norm prologue: batch 1, GQA 3
    (1, 1, 200, 2, 8, 64, [0], 24, True),           # norm prologue: batch 1 through rows, GQA 8
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_qkv_rope_matches_reference(case, dtype):
    B, T, H, num_kv, ratio, D, rows, t_max, norm = case
    _run_case(10 * CASES.index(case) + DTYPES.index(dtype), B, T, H, num_kv, ratio, D, dtype,
              rows, t_max, norm=norm)


QUANT_CASES = [  # (fmt, G), (B, T, H, num_kv, ratio, D, rows, t_max, fused norm); N = 240..640
    (("int4", 32), (3, 1, 96, 1, 3, 48, [2, -1, 0], 16, True)),   # GQA 3, D 48, -1 padding
    (("int4", 128), (2, 17, 256, 2, 1, 64, None, 40, False)),     # prefill, MHA, 2 groups
    (("int8", 32), (4, 3, 160, 1, 8, 32, [3, 1], 24, True)),      # GQA 8, 5 groups, subset
    (("int8", 200), (2, 1, 200, 2, 3, 64, [1, -1], 24, False)),   # per-row scale (G = K)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant, case", QUANT_CASES,
                         ids=[f"{f}-g{g}" for (f, g), _ in QUANT_CASES])
def test_qkv_rope_quantized_matches_reference(quant, case, dtype):
    """Weight-only int4/int8 against the float64 reference on the dequantized weight."""
    B, T, H, num_kv, ratio, D, rows, t_max, norm = case
    _run_case(300 + 10 * QUANT_CASES.index((quant, case)) + DTYPES.index(dtype), B, T, H,
              num_kv, ratio, D, dtype, rows, t_max, norm=norm, quant=quant)


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
    k_cache = torch.zeros(B, nkv, t_max, D, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    q = qkv_rope(x, w[2], cos, sin, start, k_cache, v_cache, num_heads=nh, num_kv_heads=nkv)
    q_ref, k_ref, v_ref, pos = _reference(x, w_ref[2], start, cfg)
    assert_close(q, q_ref, torch.float32)
    for b in range(B):
        assert_close(k_cache[b][:, pos[b].to(DEVICE)].transpose(0, 1), k_ref[b], torch.float32)
        assert_close(v_cache[b][:, pos[b].to(DEVICE)].transpose(0, 1), v_ref[b], torch.float32)


@pytest.mark.parametrize("quant", [None, ("int4", 32)], ids=["float", "int4"])
@pytest.mark.parametrize("index", range(len(_qkv_rope_kernel.all_configs)))
@pytest.mark.skipif(CUDA, reason="an interpreter sweep: on a GPU each config costs a compile")
def test_qkv_rope_every_config(index, quant):
    """Each config the GPU autotuner may pick, with the norm prologue and active rows: head_dim
    128 so every BLOCK_HALF fits a half head, H = 136 (int4: 160, five groups) so every BLOCK_K
    has a ragged last block."""
    with only_config(_qkv_rope_kernel, _qkv_rope_kernel.all_configs[index]):
        _run_case(500 + index, 3, 2, 136 if quant is None else 160, 1, 2, 128, torch.float32,
                  [2, 0], 8, norm=True, quant=quant)


def test_qkv_rope_llama3_scaling():
    _run_case(11, 2, 17, 96, 1, 8, 64, torch.float32, None, 200, scaling=LLAMA3_SCALING)


def test_qkv_rope_allocates_q_and_writes_strided_cache_view():
    """q_out omitted; the cache is one layer of a stacked [L, B, ...] cache."""
    torch.manual_seed(3)
    B, T, H, nkv, nh, D, L, t_max = 2, 3, 96, 2, 6, 64, 3, 16
    cfg = _config(H, nh, nkv, D)
    cos, sin = rope_tables(cfg, t_max, torch.float32, DEVICE)
    x = randn(B, T, H)
    w = randn(cfg.q_size + 2 * cfg.kv_size, H, scale=H ** -0.5)
    start = torch.tensor([5, 0], dtype=torch.int32, device=DEVICE)
    stacked_k = torch.zeros(L, B + 1, nkv, t_max, D, device=DEVICE)
    stacked_v = torch.zeros_like(stacked_k)
    q = qkv_rope(x, w, cos, sin, start, stacked_k[1, :B], stacked_v[1, :B], num_heads=nh,
                 num_kv_heads=nkv)
    q_ref, k_ref, v_ref, _ = _reference(x, w, start, cfg)
    assert_close(q, q_ref, torch.float32)
    assert_close(stacked_k[1, 0, :, 5:8].transpose(0, 1), k_ref[0], torch.float32)
    assert_close(stacked_v[1, 1, :, 0:3].transpose(0, 1), v_ref[1], torch.float32)
    assert stacked_k[0].abs().sum() == 0 and stacked_k[2].abs().sum() == 0
    assert stacked_k[1, B].abs().sum() == 0


def _small_inputs(dtype=torch.float32):
    B, T, H, nh, nkv, D, t_max = 2, 1, 32, 2, 1, 32, 8
    cos, sin = rope_tables(_config(H, nh, nkv, D), t_max, dtype, DEVICE)
    return dict(x=randn(B, T, H, dtype=dtype), w_qkv=randn((nh + 2 * nkv) * D, H, dtype=dtype),
                cos=cos, sin=sin, start=torch.tensor([1, 3], dtype=torch.int32, device=DEVICE),
                k_cache=torch.zeros(B, nkv, t_max, D, dtype=dtype, device=DEVICE),
                v_cache=torch.zeros(B, nkv, t_max, D, dtype=dtype, device=DEVICE),
                num_heads=nh, num_kv_heads=nkv)


@pytest.mark.parametrize("change, name", [
    (dict(w_qkv=torch.zeros(100, 32)), "w_qkv"),
    (dict(start=torch.tensor([1, 3])), "start"),
    (dict(num_heads=0), "num_heads"),
    (dict(x=torch.zeros(2, 1, 32, dtype=torch.float16)), "k_cache"),
    (dict(rows=torch.tensor([0, 1, 1])), "rows"),
    (dict(v_cache=torch.zeros(2, 1, 8, 64)[..., :32]), "v_cache"),  # other strides
    (dict(cos=torch.zeros(8, 16)), "cos"),
    (dict(q_out=torch.zeros(2, 1, 2, 16)), "q_out"),
    (dict(norm_weight=torch.ones(31)), "norm_weight"),
    (dict(norm_weight=torch.ones(32, dtype=torch.float16)), "norm_weight"),
    (dict(norm_weight=torch.ones(32), eps=-1.0), "eps"),
])
def test_qkv_rope_bad_input(change, name):
    kwargs = _small_inputs()
    kwargs.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v
                   for k, v in change.items()})
    with pytest.raises(ValueError, match=name):
        qkv_rope(**kwargs)


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
            kw["k_cache"], kw["v_cache"], q_out,
            torch.tensor([1], dtype=torch.int32, device=DEVICE), 2, 1,
            _norm_weight(32, torch.float32) if norm else None, EPS)
    torch.library.opcheck(torch.ops.d3kernels.qkv_rope.default, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


@gpu
@pytest.mark.parametrize("num_kv", [32, 8])  # Llama-2-7B, Llama-3-8B
@pytest.mark.parametrize("T", [1, 33])
def test_qkv_rope_llama_shapes_bf16(num_kv, T):
    torch.manual_seed(num_kv + T)
    B, H, nh, D, t_max = 4, 4096, 32, 128, 512
    cfg = _config(H, nh, num_kv, D, theta=500000.0)
    cos, sin = rope_tables(cfg, t_max, torch.bfloat16, DEVICE)
    x = randn(B, T, H, dtype=torch.bfloat16)
    w = randn(cfg.q_size + 2 * cfg.kv_size, H, dtype=torch.bfloat16, scale=H ** -0.5)
    start = torch.tensor([0, 100, 300, 7], dtype=torch.int32, device=DEVICE)
    k_cache = torch.zeros(B, num_kv, t_max, D, dtype=torch.bfloat16, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    q = qkv_rope(x, w, cos, sin, start, k_cache, v_cache, num_heads=nh, num_kv_heads=num_kv)
    q_ref, k_ref, v_ref, pos = _reference(x, w, start, cfg)
    assert_close(q, q_ref, torch.bfloat16)
    for b in range(B):
        p = pos[b].to(DEVICE)
        assert_close(k_cache[b][:, p].transpose(0, 1), k_ref[b], torch.bfloat16)
        assert_close(v_cache[b][:, p].transpose(0, 1), v_ref[b], torch.bfloat16)


@gpu
@pytest.mark.parametrize("quant", [("int4", 128), ("int4", 32), ("int8", 4096)])
@pytest.mark.parametrize("T", [1, 33])
def test_qkv_rope_quantized_llama_shapes_bf16(quant, T):
    """Llama-3-8B's attention input (32/8 heads) with a quantized w_qkv, bf16: the norm
    prologue, rows with a padding slot."""
    _run_case(600 + T + quant[1], 4, T, 4096, 8, 4, 128, torch.bfloat16, [3, -1, 0], 512,
              norm=True, quant=quant)
