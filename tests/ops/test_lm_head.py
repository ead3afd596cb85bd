"""lm_head: final norm + vocab projection + greedy / Gumbel-max sampling, against the reference."""
import pytest
import torch

import reference
from d3kernels.ops import lm_head as lm_head_module
from d3kernels.ops._quant import weight_operand
from d3kernels.ops._tuning import only_config
from d3kernels.ops.lm_head import (_lm_head_tile_kernel, lm_head, lm_head_candidates,
                                   lm_head_scratch, lm_head_select)
from d3kernels.quant import QuantizedWeight, quantize
from tests.ops.conftest import (CUDA, DEVICE, DTYPES, assert_close, gpu, poisoned, rand_quantized,
                                randn)

EPS = 1e-5


def _activations(M, H, dtype):
    x = randn(M, H, dtype=dtype, scale=3.0)
    norm = (torch.rand(H, dtype=torch.float64) + 0.5).to(dtype=dtype, device=DEVICE)
    return x, norm


def _inputs(M, H, V, dtype, scale=1.0):
    return *_activations(M, H, dtype), randn(V, H, dtype=dtype, scale=scale * H ** -0.5)


def _inputs_and_ref(M, H, V, dtype, fmt=None, group_size=32, scale=1.0):
    """x, norm, the weight [V, H] (float, or a QuantizedWeight in ``fmt``) and the weight the
    reference multiplies by (the same, or the float64 dequantization)."""
    if fmt is None:
        x, norm, w = _inputs(M, H, V, dtype, scale)
        return x, norm, w, w
    w, w_ref = rand_quantized(V, H, fmt=fmt, group_size=group_size, scale=scale * H ** -0.5)
    return *_activations(M, H, dtype), w, w_ref


def _ref_logits(x, norm, w):
    return reference.lm_head(x.double().cpu(), norm.double().cpu(), w.double().cpu(), EPS)


def _assert_greedy(tokens, logits, ref):
    """tokens is exactly torch.argmax of the kernel's own logits; against the reference, each
    token's logit is the row max within twice the kernel's logit error, and where the
    reference's top two are further apart than that, the token is the reference argmax."""
    tokens, logits = tokens.cpu(), logits.cpu()
    assert torch.equal(tokens, logits.argmax(dim=1))
    tol = 2 * (logits.double() - ref).abs().max().item() + 1e-12
    picked = ref.gather(1, tokens[:, None])[:, 0]
    assert (picked >= ref.max(dim=1).values - tol).all()
    top2 = ref.topk(2, dim=1).values
    clear = top2[:, 0] - top2[:, 1] > tol
    assert clear.any()
    assert torch.equal(tokens[clear], ref.argmax(dim=1)[clear])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, H, V, rows", [
    (1, 96, 1000, None),
    (5, 200, 2050, None),          # vocab just past a 128-column tile boundary
    (17, 96, 300, None),           # rows just past a 16-row tile
    (6, 200, 1000, [5, 1, 3]),
])
def test_lm_head_greedy_and_logits(M, H, V, rows, dtype):
    torch.manual_seed(M * 7 + V + DTYPES.index(dtype))
    x, norm, w = _inputs(M, H, V, dtype)
    ref = _ref_logits(x, norm, w)
    logits = poisoned((M, V), torch.float32)
    tokens = torch.full((M,), -1, dtype=torch.int64, device=DEVICE)
    rows_t = None if rows is None else torch.tensor(rows, dtype=torch.int32, device=DEVICE)
    out = lm_head(x, norm, w, EPS, rows=rows_t, logits_out=logits, tokens_out=tokens)
    assert out is tokens
    active = torch.arange(M) if rows is None else torch.tensor(rows)
    assert_close(logits[active.to(DEVICE)], ref[active], dtype)
    _assert_greedy(tokens[active.to(DEVICE)], logits[active.to(DEVICE)], ref[active])
    inactive = torch.tensor([b for b in range(M) if b not in active.tolist()], dtype=torch.long)
    if len(inactive):
        assert logits[inactive.to(DEVICE)].isnan().all()
        assert (tokens[inactive.to(DEVICE)] == -1).all()
    # without logits_out: the same tokens, fresh buffer
    assert torch.equal(lm_head(x, norm, w, EPS, rows=rows_t)[active.to(DEVICE)],
                       tokens[active.to(DEVICE)])


@pytest.mark.parametrize("fmt", [None, "int4"])
@pytest.mark.parametrize("index", range(len(_lm_head_tile_kernel.all_configs)))
@pytest.mark.skipif(CUDA, reason="an interpreter sweep: on a GPU each config costs a compile")
def test_lm_head_every_config(index, fmt):
    """Each config the GPU autotuner may pick: fp32 logits and greedy tokens of two active rows;
    H = 136 (int4: 160, 5 groups of 32) gives every BLOCK_K a ragged last block, V = 200 a
    ragged second vocab tile."""
    M, H, V = 3, 136 if fmt is None else 160, 200
    torch.manual_seed(800 + index)
    x, norm, w, w_ref = _inputs_and_ref(M, H, V, torch.float32, fmt)
    rows = torch.tensor([2, 0], dtype=torch.int32, device=DEVICE)
    logits = poisoned((M, V), torch.float32)
    with only_config(_lm_head_tile_kernel, _lm_head_tile_kernel.all_configs[index]):
        tokens = lm_head(x, norm, w, EPS, rows=rows, logits_out=logits)
    active = rows.long()
    ref = _ref_logits(x, norm, w_ref)[active.cpu()]
    assert_close(logits[active], ref, torch.float32)
    _assert_greedy(tokens[active], logits[active], ref)
    assert logits[1].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fmt, G, M, H, V, rows", [
    ("int4", 32, 3, 96, 300, None),             # 3 groups a row; V: a ragged third tile
    ("int4", 128, 6, 256, 1000, [5, -1, 1, 3]),  # 2 groups a row; -1: a padding slot
    ("int8", 32, 5, 160, 1000, [4, 0, -1]),      # 5 groups, ragged against BLOCK_K 128
    ("int8", 200, 4, 200, 700, None),            # per-row scale (G = K), H not a power of two
])
def test_lm_head_quantized_greedy_and_logits(fmt, G, M, H, V, rows, dtype):
    """A QuantizedWeight: logits and greedy tokens against the reference on its float64
    dequantization; rows= subsets leave other rows' outputs and positions untouched."""
    torch.manual_seed(M * 11 + V + G + (dtype == torch.float16))
    x, norm, w, w_ref = _inputs_and_ref(M, H, V, dtype, fmt, G)
    ref = _ref_logits(x, norm, w_ref)
    logits = poisoned((M, V), torch.float32)
    tokens = torch.full((M,), -1, dtype=torch.int64, device=DEVICE)
    positions = torch.arange(M, dtype=torch.int32, device=DEVICE) * 10
    rows_t = None if rows is None else torch.tensor(rows, dtype=torch.int32, device=DEVICE)
    lm_head(x, norm, w, EPS, rows=rows_t, logits_out=logits, tokens_out=tokens,
            positions=positions)
    active = [b for b in (range(M) if rows is None else rows) if b >= 0]
    idle = [b for b in range(M) if b not in active]
    assert_close(logits[active], ref[active], dtype)
    _assert_greedy(tokens[active], logits[active], ref[active])
    assert logits[idle].isnan().all() and (tokens[idle] == -1).all()
    assert positions.tolist() == [10 * b + (b in active) for b in range(M)]


@pytest.mark.parametrize("fmt, G", [("int4", 32), ("int8", 32)])
def test_lm_head_quantized_sampling_stays_in_top_k(fmt, G):
    """Sampling a QuantizedWeight: top_k = 1 is greedy, top-k draws lie in the top k of the
    reference logits on the dequantized weight, and the draws are not all one token."""
    torch.manual_seed(12)
    x, norm, w, w_ref = _inputs_and_ref(17, 64, 500, torch.float32, fmt, G, scale=0.3)
    ref = _ref_logits(x, norm, w_ref)
    greedy = lm_head(x, norm, w, EPS)
    assert torch.equal(_sample(x, norm, w, top_k=1, seed=5, offset=0), greedy)
    top = ref.topk(5, dim=1).indices
    tokens = _sample(x, norm, w, top_k=5, seed=6, offset=0).cpu()
    assert (top == tokens[:, None]).any(dim=1).all()
    assert len(set(tokens.tolist())) > 1


def test_lm_head_greedy_ties_pick_the_smallest_index():
    torch.manual_seed(1)
    x, norm, w = _inputs(3, 64, 700, torch.float32)
    w[650] = w[9] = w[300] = 4 * w[0].abs().max() * torch.sign(x[0] * norm)  # same logit thrice
    tokens = lm_head(x[:1], norm, w, EPS)
    assert tokens.item() == 9


def _sample(x, norm, w, **kw):
    return lm_head(x, norm, w, EPS, temperature=kw.pop("temperature", 0.7), **kw)


def test_lm_head_sampling_is_repeatable_and_offset_dependent():
    torch.manual_seed(2)
    x, norm, w = _inputs(16, 96, 500, torch.float32, scale=0.3)  # flat-ish: many tokens likely
    a = _sample(x, norm, w, seed=123, offset=0)
    assert torch.equal(a, _sample(x, norm, w, seed=123, offset=0))
    b = _sample(x, norm, w, seed=123, offset=16 * 500)
    c = _sample(x, norm, w, seed=124, offset=0)
    assert (a != b).sum() >= 4 and (a != c).sum() >= 4
    # a row's draw depends on its batch row, not on which other rows run
    rows = torch.tensor([11, 2], dtype=torch.int32, device=DEVICE)
    sub = _sample(x, norm, w, seed=123, offset=0, rows=rows)
    assert torch.equal(sub[rows.long()], a[rows.long()])
    # seed and offset as device tensors (what a captured graph reads): same draws as ints
    seed_t = torch.tensor([123], dtype=torch.int64, device=DEVICE)
    offset_t = torch.tensor([16 * 500], dtype=torch.int64, device=DEVICE)
    assert torch.equal(_sample(x, norm, w, seed=seed_t, offset=offset_t), b)
    offset_t -= 16 * 500  # advanced in place, as between graph replays
    assert torch.equal(_sample(x, norm, w, seed=seed_t, offset=offset_t), a)


def _frequencies(x, norm, w, calls, **kw):
    M, V = x.shape[0], w.shape[0]
    counts = torch.zeros(V, dtype=torch.float64)
    for i in range(calls):
        tokens = _sample(x, norm, w, seed=99, offset=i * M * V, **kw).cpu()
        counts += torch.bincount(tokens, minlength=V).double()
    return counts / (M * calls)


@pytest.mark.parametrize("top_k, draws, tol, fmt", [
    (None, 4000, 0.03, None), (5, 2000, 0.04, None), (None, 4000, 0.03, "int4")])
def test_lm_head_sampling_distribution(top_k, draws, tol, fmt):
    """Draws of one row's token over V = 40 match softmax(logits / T) (renormalized over the
    top_k); tol is over 3.5 standard deviations of a frequency. fmt: the weight quantized
    (G = 32), the reference logits from its dequantization."""
    torch.manual_seed(3)
    temperature = 0.8
    x1, norm, w, w_ref = _inputs_and_ref(1, 32, 40, torch.float32, fmt, scale=1.5)
    x = x1.expand(draws // 10, 32).contiguous()  # rows x 10 offsets, all independent noise
    ref = _ref_logits(x1, norm, w_ref)[0] / temperature
    if top_k is not None:
        ref = ref.masked_fill(ref < ref.topk(top_k).values[-1], float("-inf"))
    probs = ref.softmax(dim=0)
    assert probs.max() < 0.6  # a distribution worth testing
    freq = _frequencies(x, norm, w, 10, temperature=temperature, top_k=top_k)
    assert (freq - probs).abs().max() < tol
    if top_k is not None:
        assert freq[probs == 0].sum() == 0


def test_lm_head_top_k_one_is_greedy_and_top_k_stays_in_top_k():
    torch.manual_seed(4)
    x, norm, w = _inputs(17, 96, 1000, torch.float32, scale=0.3)
    ref = _ref_logits(x, norm, w)
    greedy = lm_head(x, norm, w, EPS)
    for offset in (0, 17 * 1000):
        assert torch.equal(_sample(x, norm, w, top_k=1, seed=5, offset=offset), greedy)
    for k in (5, 64):
        top = ref.topk(k, dim=1).indices
        tokens = _sample(x, norm, w, top_k=k, seed=6, offset=0).cpu()
        assert (top == tokens[:, None]).any(dim=1).all()
        assert len(set(tokens.tolist())) > 1


def test_lm_head_cut_down_stage(monkeypatch):
    """Candidate lists longer than one phase-2 block are first cut down in parallel: same tokens."""
    torch.manual_seed(5)
    x, norm, w = _inputs(3, 64, 1000, torch.float32, scale=0.3)
    sampled = _sample(x, norm, w, top_k=5, seed=7, offset=3)
    greedy = lm_head(x, norm, w, EPS)
    monkeypatch.setattr(lm_head_module, "_CHUNK", 16)  # 8 tiles x 8 candidates: 64 -> 32 -> 16
    assert torch.equal(_sample(x, norm, w, top_k=5, seed=7, offset=3), sampled)
    monkeypatch.setattr(lm_head_module, "_CHUNK", 4)  # greedy: 8 tile maxima -> 2
    assert torch.equal(lm_head(x, norm, w, EPS), greedy)


@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (0.8, None), (0.8, 5)])
def test_lm_head_scratch_and_positions(monkeypatch, temperature, top_k):
    """A caller's scratch (cut-down levels included) gives the same tokens as the allocating
    call, and ``positions`` is advanced by one at the processed rows only."""
    torch.manual_seed(9)
    monkeypatch.setattr(lm_head_module, "_CHUNK", 16)  # top_k 5: 8 tiles x 5 -> 15 candidates
    x, norm, w = _inputs(5, 64, 1000, torch.float32, scale=0.3)
    rows = torch.tensor([4, 0, 2], dtype=torch.int32, device=DEVICE)
    kw = dict(temperature=temperature, top_k=top_k, seed=3, offset=0, rows=rows)
    want = lm_head(x, norm, w, EPS, **kw)[rows.long()]
    positions = torch.arange(5, dtype=torch.int32, device=DEVICE) * 10
    scratch = torch.full((lm_head_scratch(3, 1000, top_k).numel(),), -5, dtype=torch.int64,
                         device=DEVICE)
    got = lm_head(x, norm, w, EPS, scratch=scratch, positions=positions, **kw)
    assert torch.equal(got[rows.long()], want)
    assert positions.tolist() == [1, 10, 21, 30, 41]


@pytest.mark.parametrize("temperature, top_k, fmt", [
    (0.0, None, None), (0.8, None, None), (0.8, 5, None), (0.8, 40, None), (0.8, 5, "int4")])
def test_lm_head_vocab_slices_pick_what_the_whole_picks(temperature, top_k, fmt):
    """Tensor parallelism's LM head: each vocab slice writes its candidate keys (global indices,
    global noise), the slices' keys side by side go to lm_head_select, and the token is the one
    lm_head picks on the whole weight: greedy, Gumbel-max, and top-k (a slice of 30 rows is
    smaller than top_k 40: padded keys). Uneven slices, padded rows; the outputs poisoned."""
    torch.manual_seed(11)
    M, H, V = 5, 64, 1000
    x, norm, w, _ = _inputs_and_ref(M, H, V, torch.float32, fmt, scale=0.3)
    rows = torch.tensor([4, -1, 0, 2], dtype=torch.int32, device=DEVICE)
    kw = dict(temperature=temperature, top_k=top_k, seed=21, offset=3 * M * V)
    poison = -7
    want = lm_head(x, norm, w, EPS, rows=rows, tokens_out=torch.full(
        (M,), poison, dtype=torch.int64, device=DEVICE), **kw)
    width = lm_head_candidates(temperature, top_k, V)
    assert width == (top_k if temperature > 0 and top_k else 1)
    keys = [lm_head(x, norm, w[a:b], EPS, rows=rows, vocab_start=a, vocab_size=V,
                    keys_out=torch.full((4, width), poison, dtype=torch.int64, device=DEVICE),
                    **kw) for a, b in ((0, 30), (30, 650), (650, V))]
    tokens = torch.full((M,), poison, dtype=torch.int64, device=DEVICE)
    positions = torch.arange(M, dtype=torch.int32, device=DEVICE) * 10
    got = lm_head_select(torch.cat(keys[::-1], dim=1), V, rows=rows, tokens_out=tokens,
                         positions=positions, **kw)
    assert got is tokens
    assert torch.equal(got, want)  # rows 1 and 3 not processed: still poison in both
    assert got[1].item() == poison and got[0].item() != poison
    assert positions.tolist() == [1, 10, 21, 30, 41]


@pytest.mark.parametrize("change, name", [
    (dict(vocab_start=-1), "vocab_start"),
    (dict(vocab_size=49), "vocab_size"),  # the weight's 50 rows do not fit
    (dict(vocab_start=10, vocab_size=59), "vocab_size"),
    (dict(keys_out=torch.zeros(2, 2, dtype=torch.int64)), "keys_out"),  # greedy: 1 per row
    (dict(keys_out=torch.zeros(2, 1, dtype=torch.int64),
          tokens_out=torch.zeros(2, dtype=torch.int64)), "tokens_out"),
])
def test_lm_head_bad_slice_input(change, name):
    kwargs = dict(x=randn(2, 32), norm_weight=torch.ones(32, device=DEVICE),
                  weight=randn(50, 32), eps=EPS)
    kwargs.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v
                   for k, v in change.items()})
    with pytest.raises(ValueError, match=name):
        lm_head(**kwargs)


@pytest.mark.parametrize("change, name", [
    (dict(keys=torch.zeros(2, 3, dtype=torch.int32)), "keys"),
    (dict(top_k=5, temperature=1.0), "candidates"),  # 3 keys per row, top_k 5 needs 5
    (dict(vocab_size=0), "vocab_size"),
    (dict(rows=torch.tensor([0, 1], dtype=torch.int32)), "rows needs tokens_out"),
    (dict(tokens_out=torch.zeros(1, dtype=torch.int64)), "tokens_out only 1"),
])
def test_lm_head_select_bad_input(change, name):
    kwargs = dict(keys=torch.zeros(2, 3, dtype=torch.int64), vocab_size=50)
    kwargs.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v
                   for k, v in change.items()})
    with pytest.raises(ValueError, match=name):
        lm_head_select(**kwargs)


@pytest.mark.parametrize("change, name", [
    (dict(weight=torch.zeros(50, 31)), "weight"),
    (dict(norm_weight=torch.ones(32, dtype=torch.float16)), "norm_weight"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=1.0, top_k=65), "top_k"),
    (dict(temperature=1.0, top_k=0), "top_k"),
    (dict(temperature=1.0, seed=torch.tensor([1], dtype=torch.int32)), "seed"),
    (dict(temperature=1.0, offset=1.5), "offset"),
    (dict(logits_out=torch.zeros(2, 50, dtype=torch.float16)), "logits_out"),
    (dict(tokens_out=torch.zeros(2, dtype=torch.int32)), "tokens_out"),
    (dict(rows=torch.tensor([0], dtype=torch.int64)), "rows"),
    (dict(scratch=torch.zeros(1, dtype=torch.int64)), "scratch"),  # 2 rows need 2
    (dict(positions=torch.zeros(2, dtype=torch.int64)), "positions"),
    (dict(weight=quantize(torch.randn(50, 64), "int8", 32)), "weight"),  # H = 32 wanted
    (dict(weight=quantize(torch.randn(2, 50, 32), "int4", 32)), "weight"),  # a stack
])
def test_lm_head_bad_input(change, name):
    kwargs = dict(x=randn(2, 32), norm_weight=torch.ones(32, device=DEVICE),
                  weight=randn(50, 32), eps=EPS)
    kwargs.update({k: v.to(DEVICE) if isinstance(v, (torch.Tensor, QuantizedWeight)) else v
                   for k, v in change.items()})
    with pytest.raises(ValueError, match=name):
        lm_head(**kwargs)


@pytest.mark.parametrize("temperature, top_k, with_logits, fmt", [
    (0.0, 0, True, None), (1.0, 4, False, None), (0.0, 0, True, "int4"), (1.0, 4, False, "int8")])
def test_lm_head_opcheck(temperature, top_k, with_logits, fmt):
    x, norm, w = _inputs(2, 32, 300, torch.float32)
    # the op's weight arguments: data, scale, offset, group, format
    weight = weight_operand("weight", w if fmt is None else quantize(w, fmt, 32), (None, 32),
                            torch.float32, DEVICE)
    one = torch.ones(1, dtype=torch.int64, device=DEVICE)
    args = (x, norm, *weight, EPS, temperature, top_k, one, one,
            torch.tensor([1], dtype=torch.int32, device=DEVICE),
            torch.empty(2, 300, device=DEVICE) if with_logits else None,
            torch.empty(2, dtype=torch.int64, device=DEVICE),
            lm_head_scratch(1, 300, top_k, DEVICE),
            torch.zeros(2, dtype=torch.int32, device=DEVICE), 0, 300, None)
    torch.library.opcheck(torch.ops.d3kernels.lm_head.default, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("temperature, top_k", [(0.0, 0), (1.0, 4)])
def test_lm_head_keys_and_select_opcheck(temperature, top_k):
    """The candidate path's two ops (a vocab slice's keys, then the choice) under opcheck."""
    x, norm, w = _inputs(2, 32, 300, torch.float32)
    weight = weight_operand("weight", w[100:], (None, 32), torch.float32, DEVICE)
    one = torch.ones(1, dtype=torch.int64, device=DEVICE)
    keys = torch.empty(2, max(top_k, 1), dtype=torch.int64, device=DEVICE)
    args = (x, norm, *weight, EPS, temperature, top_k, one, one, None, None, None, None, None,
            100, 300, keys)
    torch.library.opcheck(torch.ops.d3kernels.lm_head.default, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))
    torch.ops.d3kernels.lm_head.default(*args)
    args = (keys, 300, temperature, top_k, one, one, None,
            torch.empty(2, dtype=torch.int64, device=DEVICE),
            torch.zeros(2, dtype=torch.int32, device=DEVICE))
    torch.library.opcheck(torch.ops.d3kernels.lm_head_select.default, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


@gpu
@pytest.mark.parametrize("V", [128256, 32000])
@pytest.mark.parametrize("M", [1, 8, 32])
def test_lm_head_llama_vocab_bf16(V, M):
    torch.manual_seed(V + M)
    x, norm, w = _inputs(M, 4096, V, torch.bfloat16)
    ref = _ref_logits(x, norm, w)
    logits = poisoned((M, V), torch.float32)
    tokens = lm_head(x, norm, w, EPS, logits_out=logits)
    assert_close(logits, ref, torch.bfloat16)
    _assert_greedy(tokens, logits, ref)
    top = ref.topk(50, dim=1).indices
    sampled = lm_head(x, norm, w, EPS, temperature=1.0, top_k=50, seed=1).cpu()
    assert (top == sampled[:, None]).any(dim=1).all()


@gpu
@pytest.mark.parametrize("fmt, G, V, H, M", [
    ("int8", 32, 49152, 576, 1),  # SmolLM2's LM head as its GGUF ships it (Q8_0)
    ("int8", 32, 49152, 576, 32),
    ("int4", 32, 49152, 576, 8),
    ("int4", 128, 32000, 4096, 8),  # Llama-2-7B's (making each 4096-wide weight takes seconds)
    ("int8", 4096, 32000, 4096, 1),  # a scale per row
])
def test_lm_head_quantized_bf16(fmt, G, V, H, M):
    torch.manual_seed(V + M + G)
    x, norm, w, w_ref = _inputs_and_ref(M, H, V, torch.bfloat16, fmt, G)
    ref = _ref_logits(x, norm, w_ref)
    logits = poisoned((M, V), torch.float32)
    tokens = lm_head(x, norm, w, EPS, logits_out=logits)
    assert_close(logits, ref, torch.bfloat16)
    _assert_greedy(tokens, logits, ref)
    # a top-50 draw: in the reference's top 50 up to twice the kernel's logit error (bf16 logits
    # can swap neighbours of the 50th)
    sampled = lm_head(x, norm, w, EPS, temperature=1.0, top_k=50, seed=1).cpu()
    tol = 2 * (logits.cpu().double() - ref).abs().max().item()
    assert (ref.gather(1, sampled[:, None])[:, 0] >= ref.topk(50, dim=1).values[:, -1] - tol).all()


@gpu
def test_lm_head_cuda_graph_replay_advances_offset():
    x, norm, w = _inputs(8, 256, 4096, torch.float16, scale=0.2)
    seed = torch.tensor([7], dtype=torch.int64, device=DEVICE)
    offset = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    tokens = torch.empty(8, dtype=torch.int64, device=DEVICE)
    kw = dict(temperature=1.0, top_k=20, seed=seed, offset=offset, tokens_out=tokens)
    lm_head(x, norm, w, EPS, **kw)  # warm-up: compile and autotune outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lm_head(x, norm, w, EPS, **kw)
    draws = []
    for step in range(3):
        offset.fill_(step * 8 * 4096)
        graph.replay()
        draws.append(tokens.clone())
        expect = lm_head(x, norm, w, EPS, temperature=1.0, top_k=20, seed=7,
                         offset=step * 8 * 4096)
        assert torch.equal(draws[-1], expect)
    assert not torch.equal(draws[0], draws[1]) or not torch.equal(draws[1], draws[2])

