"""LlamaD3(backend="triton"): the fused kernels assembled into prefill and decode steps.

On the CPU the kernels run in Triton's interpreter (tiny model, fp32 and fp16); GPU-only tests
cover bf16, realistic shapes and CUDA-graph replay.
"""
import pytest
import torch

import reference
from d3kernels import PRESETS, DepthSchedule, LlamaD3
from d3kernels.sampling import Sampling
from tests.ops.conftest import CUDA, DEVICE, TOL, gpu, rel_err
from tests.test_d3_generation import oracle

TINY_SEED = 11


@pytest.fixture(scope="module")
def tiny_triton():
    return LlamaD3.random("tiny", dtype=torch.float32, device=DEVICE, seed=TINY_SEED,
                          backend="triton")


@pytest.fixture(scope="module")
def tiny_torch64():
    return LlamaD3.random("tiny", dtype=torch.float64, seed=TINY_SEED, backend="torch")


@pytest.mark.parametrize("order", ["lower", "upper", (4, 2, 6, 3, 5)], ids=str)
def test_d3_tokens_match_oracle(tiny_triton, order):
    s = DepthSchedule(alpha=0.75, start=1, head=2, tail=1, order=order)
    prompt = torch.randint(0, 512, (13,)).tolist()
    out = tiny_triton.generate(prompt, 7, s, stop_tokens=())
    tokens, depths = oracle(tiny_triton, prompt, 7, s)
    assert out.depths[0] == depths and min(depths) < 8
    assert out.tokens[0] == tokens


def test_batch_of_different_lengths_equals_alone(tiny_triton):
    s = DepthSchedule(alpha=0.8, head=2, tail=1)
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (1, 17)]
    batch = tiny_triton.generate(prompts, 4, s, stop_tokens=())
    for prompt, tokens in zip(prompts, batch.tokens):
        assert tiny_triton.generate(prompt, 4, s, stop_tokens=()).tokens[0] == tokens


def _teacher_forced_cache(model, prompts, steps, schedule):
    """Prefill, then decode the given tokens (same for every backend); return the KV cache."""
    L = model.config.num_layers
    B, lengths = len(prompts), [len(p) for p in prompts]
    cache = model.new_cache(B, max(lengths) + len(steps[0]) + 1)
    ids = torch.zeros(B, max(lengths), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, :len(p)] = torch.tensor(p)
    with torch.inference_mode():
        model.prefill(ids.to(model.device), lengths, cache, Sampling())
        for i, col in enumerate(zip(*steps), start=1):
            kept = schedule.kept_layers(schedule.depth(i, L), L)
            model.decode_step(torch.tensor(col, device=model.device),
                              [n + i - 1 for n in lengths], kept, cache, Sampling())
        model.flush_backfill(cache)  # deferred by default: fill the skipped layers' entries
    span = max(lengths) + len(steps[0])
    # [L, B, span, kv_heads, D]: each row's positions in order
    return tuple(torch.stack([cache.gather_row(t, b, span) for b in range(B)], 1).float()
                 for t in (cache.k, cache.v))


def _assert_same_cache(model, ref_model, prompts, steps, schedule, dtype):
    """The two models' KV caches after the same teacher-forced decode agree on every slot each
    row wrote, to the tolerance of ``dtype``."""
    k, v = _teacher_forced_cache(model, prompts, steps, schedule)
    k_ref, v_ref = _teacher_forced_cache(ref_model, prompts, steps, schedule)
    for r, n in enumerate(len(p) + len(steps[0]) for p in prompts):
        assert rel_err(k[:, r, :n], k_ref[:, r, :n]) <= TOL[dtype]
        assert rel_err(v[:, r, :n], v_ref[:, r, :n]) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] +
                         ([torch.bfloat16] if CUDA else []))
def test_kv_cache_matches_float64_torch_backend(tiny_torch64, dtype):
    """Every cache entry, backfilled ones included, against the float64 torch backend."""
    model = LlamaD3(tiny_torch64.config, tiny_torch64.state_dict(), dtype=dtype, device=DEVICE,
                    backend="triton")
    s = DepthSchedule(alpha=0.6, head=2, tail=2, order="upper")
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (6, 11)]
    steps = [torch.randint(0, 512, (4,)).tolist() for _ in prompts]
    _assert_same_cache(model, tiny_torch64, prompts, steps, s, dtype)


def test_fused_sampling(tiny_triton):
    prompt = [3, 1, 4]
    s = DepthSchedule(alpha=0.5, head=1, tail=1)  # shallow steps keep the interpreter quick
    a = tiny_triton.generate(prompt, 3, s, temperature=1.0, seed=5, stop_tokens=())
    b = tiny_triton.generate(prompt, 3, s, temperature=1.0, seed=5, stop_tokens=())
    assert a.tokens == b.tokens
    greedy = tiny_triton.generate(prompt, 3, s, stop_tokens=())
    top1 = tiny_triton.generate(prompt, 3, s, temperature=0.8, top_k=1, seed=1, stop_tokens=())
    nucleus = tiny_triton.generate(prompt, 3, s, temperature=0.8, top_p=1e-6, seed=1,
                                   stop_tokens=())
    assert top1.tokens == greedy.tokens == nucleus.tokens


def test_wide_top_k_sizes_the_greedy_scratch(tiny_triton):
    """top_k past MAX_FUSED_TOP_K samples with torch from logits the kernel makes greedy: its
    step buffers hold the greedy candidates' scratch, none sized for that top_k."""
    from d3kernels.triton_backend import MAX_FUSED_TOP_K

    s = DepthSchedule(alpha=0.5, head=1, tail=1)
    tiny_triton.generate([3, 1, 4], 2, s, temperature=0.8, top_k=MAX_FUSED_TOP_K + 1, seed=1,
                         stop_tokens=())
    held = {k for b in tiny_triton._backend._buffers.values() for k in b.scratch}
    assert None in held and MAX_FUSED_TOP_K + 1 not in held


def test_lookahead_reads_each_steps_own_tokens(tiny_triton):
    """decode_step returns the backend's token buffer, which the next step overwrites in place:
    the decode loop one step ahead (the default on CUDA, forced here) must read step i's tokens
    before step i + 1 runs, not after."""
    s = DepthSchedule(alpha=0.5, head=1, tail=1)  # shallow steps keep the interpreter quick
    prompts = [[3, 1, 4], [2, 7]]
    first = tiny_triton.generate(prompts, 4, s, stop_tokens=(), _lookahead=False)
    ahead = tiny_triton.generate(prompts, 4, s, stop_tokens=(), _lookahead=True)
    assert ahead.tokens == first.tokens


def test_backend_choice_and_errors(monkeypatch):
    assert LlamaD3.random("tiny").backend == ("triton" if CUDA else "torch")
    assert LlamaD3.random("tiny", dtype=torch.float64).backend == "torch"
    with pytest.raises(ValueError, match="float64"):
        LlamaD3.random("tiny", dtype=torch.float64, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        LlamaD3.random("tiny", backend="triton", device="cpu")


@gpu
@pytest.mark.parametrize("preset, quantize, group", [
    ("smollm2-135m", None, None), ("llama-2-7b", None, None), ("llama-3-8b", None, None),
    ("llama-2-7b", "int4", 128), ("llama-2-7b", "int8", None)])
def test_gpu_triton_matches_torch_backend(preset, quantize, group):
    """Real layer shapes, 6 layers deep: bf16 rounding compounds with depth, and each layer's
    kernels are what is under test (the whole-depth behaviour is tested on the tiny model).
    With int4/int8 weights the torch backend (fp32) runs the same quantized weights."""
    torch.manual_seed(0)
    config = PRESETS[preset].replace(num_layers=6)
    triton_model = LlamaD3.random(config, dtype=torch.bfloat16, device="cuda", backend="triton",
                                  max_seq_len=1024, quantize=quantize, group_size=group)
    torch_model = LlamaD3(config, triton_model.state_dict(), dtype=torch.float32, device="cuda",
                          backend="torch", max_seq_len=1024)
    s = DepthSchedule(alpha=0.8, head=1, tail=1)
    prompts = [torch.randint(0, config.vocab_size, (n,)).tolist() for n in (37, 200)]
    steps = [torch.randint(0, config.vocab_size, (6,)).tolist() for _ in prompts]
    _assert_same_cache(triton_model, torch_model, prompts, steps, s, torch.bfloat16)


@gpu
def test_gpu_cuda_graph_replay_equals_eager():
    kwargs = dict(dtype=torch.bfloat16, device="cuda", backend="triton", seed=3)
    graphed = LlamaD3.random("smollm2-135m", cuda_graphs=True, **kwargs)
    eager = LlamaD3.random("smollm2-135m", cuda_graphs=False, **kwargs)
    s = DepthSchedule(alpha=0.9, head=4, tail=2)
    prompts = [torch.randint(0, 49152, (n,)).tolist() for n in (20, 33)]
    for sampling in (dict(), dict(temperature=0.9, top_k=20, seed=4)):
        a = graphed.generate(prompts, 24, s, stop_tokens=(), **sampling)
        b = eager.generate(prompts, 24, s, stop_tokens=(), **sampling)
        assert a.tokens == b.tokens
    assert len(graphed._backend._graphs) > 1  # one graph per distinct depth was captured


@pytest.mark.parametrize("backfill, order", [("propagate", "lower"), ("propagate", (4, 2, 6, 3)),
                                             ("mask", "upper")], ids=str)
def test_decode_step_launch_budget(tiny_triton, backfill, order):
    """A steady D³ decode step (default deferred timing) is at most 5 launches per kept layer
    plus 3 for the rest (embedding, LM head, position update), and no torch kernels at all:
    the norms ride in the GEMM prologues, the split-KV merge in attention, the stash copies
    in the down projections, the written marks in the embedding, the position update in the
    LM head."""
    from d3kernels.ops._launches import count_launches

    model, L = tiny_triton, tiny_triton.config.num_layers
    s = DepthSchedule(alpha=0.6, head=2, tail=1, order=order)
    kept = s.kept_layers(s.depth(3, L), L)
    assert 0 < len(kept) < L - 1 and len(set(kept)) == len(kept)
    prompts = [torch.randint(0, 512, (9,)).tolist()] * 2
    cache = model.new_cache(2, 32)
    ids = torch.tensor(prompts, device=DEVICE)
    with torch.inference_mode():
        nxt = model.prefill(ids, [9, 9], cache, Sampling(), backfill=backfill)
        # the first step copies tokens and positions in and sizes the stash, once
        nxt = model.decode_step(nxt, [9, 9], kept, cache, Sampling(), backfill=backfill)
        with count_launches() as launches:
            model.decode_step(nxt, [10, 10], kept, cache, Sampling(), backfill=backfill)
    n = len(kept)
    assert dict(launches) == {"_decode_embed_kernel": 1, "_qkv_rope_kernel": n,
                              "_decode_kernel": n, "_down_residual_kernel": 2 * n,
                              "_gate_up_kernel": n, "_lm_head_tile_kernel": 1,
                              "_select_kernel": 1}
    assert sum(launches.values()) <= 5 * n + 3


@gpu
def test_gpu_engine_graphs_equal_ungraphed():
    """Real CUDA graphs for the engine's steps (one per set of layers any row keeps, replayed
    for every mix of rows), bf16, mixed lengths and depths, deferred and mask: the tokens of
    kernel-by-kernel decoding, and fewer graphs than steps."""
    from d3kernels import Engine

    kwargs = dict(dtype=torch.bfloat16, device="cuda", backend="triton", seed=3)
    models = [LlamaD3.random("smollm2-135m", cuda_graphs=g, **kwargs) for g in (True, False)]
    s = DepthSchedule(alpha=0.95, head=4, tail=2)
    work = [(torch.randint(0, 49152, (n,)).tolist(), k) for n, k in
            ((20, 24), (7, 9), (33, 17), (12, 30), (5, 12), (40, 8))]
    for backfill in ("propagate", "mask"):
        outs = []
        for model in models:
            engine = Engine(model, max_batch=4, schedule=s, backfill=backfill)
            reqs = [engine.submit(p, k, stop_tokens=()) for p, k in work]
            list(engine.run())
            outs.append(([r.tokens for r in reqs], engine.stats.decode_steps))
        assert outs[0][0] == outs[1][0]
        rows_graphs = [k for k in models[0]._backend._graphs if k[0] == "rows"]
        assert 0 < len(rows_graphs) < outs[0][1]


@pytest.fixture(scope="module", params=[("int4", 32), ("int8", None)], ids=["int4", "int8"])
def tiny_quantized(request):
    """The same quantized weights on both backends (fp32 activations)."""
    fmt, group = request.param
    torch_model = LlamaD3.random("tiny", dtype=torch.float32, seed=TINY_SEED, quantize=fmt,
                                 group_size=group, backend="torch")
    triton_model = LlamaD3(torch_model.config, torch_model.state_dict(), dtype=torch.float32,
                           device=DEVICE, backend="triton")
    return triton_model, torch_model


def test_quantized_d3_tokens_match_oracle_and_torch_backend(tiny_quantized):
    """Every projection kernel on int4/int8 weights (dequantized in registers): D³ tokens of a
    ragged batch == the torch backend on the same weights == the oracle on the dequantized
    weights; after a flush (the KV backfill on quantized K/V rows) the caches agree."""
    model, torch_model = tiny_quantized
    assert model.weight_format == torch_model.weight_format != "float32"
    s = DepthSchedule(alpha=0.75, head=2, tail=1)
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (11, 4)]
    out = model.generate(prompts, 7, s, stop_tokens=())
    assert out.tokens == torch_model.generate(prompts, 7, s, stop_tokens=()).tokens
    weights = model.dequantized_state_dict()
    tokens, depths = reference.d3_generate(weights, model.config, prompts[0], 7, alpha=0.75,
                                           head=2, tail=1, order="lower")
    assert out.depths[0] == depths and min(depths) < 8 and out.tokens[0] == tokens
    steps = [torch.randint(0, 512, (3,)).tolist() for _ in prompts]
    _assert_same_cache(model, torch_model, prompts, steps, s, torch.float32)


def test_quantized_engine_equals_torch_backend(tiny_quantized):
    """decode_rows (rows=, -1 padded tables) on quantized weights: the engine's tokens for
    requests at different depths equal the torch backend's."""
    from d3kernels import Engine

    work = [(torch.randint(0, 512, (n,)).tolist(), k, DepthSchedule(alpha=0.8, head=1, tail=1,
                                                                    order=o))
            for n, k, o in ((9, 5, "lower"), (4, 6, "upper"), (6, 3, "lower"))]
    outs = []
    for model in tiny_quantized:
        engine = Engine(model, max_batch=2, max_seq_len=32, stop_tokens=())
        reqs = [engine.submit(p, k, s) for p, k, s in work]
        list(engine.run())
        outs.append([r.tokens for r in reqs])
    assert outs[0] == outs[1]


def test_quantized_decode_step_launch_budget(tiny_quantized):
    """Quantized weights change the kernels' compiled format, not the step: 5 launches per
    kept layer + 3, as test_decode_step_launch_budget counts for float weights."""
    from d3kernels.ops._launches import count_launches

    model, L = tiny_quantized[0], tiny_quantized[0].config.num_layers
    s = DepthSchedule(alpha=0.6, head=2, tail=1)
    kept = s.kept_layers(s.depth(3, L), L)
    cache = model.new_cache(1, 24)
    with torch.inference_mode():
        nxt = model.prefill(torch.tensor([[5, 6, 7]], device=DEVICE), [3], cache, Sampling())
        nxt = model.decode_step(nxt, [3], kept, cache, Sampling())
        with count_launches() as launches:
            model.decode_step(nxt, [4], kept, cache, Sampling())
    assert sum(launches.values()) == 5 * len(kept) + 3
