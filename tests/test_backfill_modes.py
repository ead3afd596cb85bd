"""Backfill modes (issue 4 §1, design.md §2): ``mask`` against the oracle, and deferred
``propagate`` backfill (the default) against eager (same cache, fewer weight bytes read, none
for a reply nothing reads; a stash of one hidden vector per skipped run and position)."""
import pytest
import torch

import reference
from d3kernels import DepthSchedule, KVCache, LlamaD3
from d3kernels.stats import backfill_layer_bytes
from tests.ops.conftest import DEVICE, TOL, gpu, rel_err
from tests.test_chat import chat_oracle, random_turns

SCHEDULES = [  # (alpha, start, min_depth, head, tail)
    (0.8, 0, None, 2, 1),
    (0.7, 1, None, 1, 2),
    (0.6, 0, 4, 1, 1),
]
CASES = [(params, order) for params in SCHEDULES for order in ("lower", "upper")]


@pytest.fixture(scope="module")
def tiny64():
    return LlamaD3.random("tiny", dtype=torch.float64, seed=7)


@pytest.fixture(scope="module")
def tiny64_mask(tiny64):
    """The same weights, mask mode as the model's default."""
    return LlamaD3(tiny64.config, tiny64.state_dict(), dtype=torch.float64, backfill="mask")


def schedule_of(params, order):
    alpha, start, min_depth, head, tail = params
    return DepthSchedule(alpha=alpha, start=start, min_depth=min_depth, head=head, tail=tail,
                         order=order)


def oracle(model, prompt, n, s: DepthSchedule, backfill):
    weights = {k: v.double().cpu() for k, v in model.state_dict().items()}
    order = s.order if isinstance(s.order, str) else list(s.order)
    return reference.d3_generate(weights, model.config, prompt, n, alpha=s.alpha, start=s.start,
                                 min_depth=s.min_depth, head=s.head, tail=s.tail, order=order,
                                 backfill=backfill)


def prompt_of(n, seed):
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---- mask mode --------------------------------------------------------------------------------

@pytest.mark.parametrize("case", range(len(CASES)), ids=[str(c) for c in CASES])
def test_mask_matches_oracle(tiny64, tiny64_mask, case):
    s = schedule_of(*CASES[case])
    prompt = prompt_of(9, seed=case)
    tokens, depths = oracle(tiny64, prompt, 12, s, "mask")
    per_call = tiny64.generate(prompt, 12, s, stop_tokens=(), backfill="mask")
    per_model = tiny64_mask.generate(prompt, 12, s, stop_tokens=())
    assert min(depths) < tiny64.config.num_layers
    assert per_call.depths[0] == depths and per_call.tokens[0] == tokens
    assert per_model.tokens[0] == tokens
    assert per_call.stats.backfill_bytes == 0  # mask mode fills nothing


def test_modes_agree_within_a_reply_and_differ_across_turns(tiny64):
    """Kept sets are nested within a reply, so no kept query ever reads a skipped entry: one
    reply is the same in both modes. The next turn's prefill reads them: a chat differs (so
    the chat oracle tests discriminate between the modes)."""
    s = schedule_of(SCHEDULES[2], "lower")
    for seed in range(3):
        prompt = prompt_of(7, seed)
        assert tiny64.generate(prompt, 12, s, stop_tokens=(), backfill="mask").tokens \
            == tiny64.generate(prompt, 12, s, stop_tokens=()).tokens
    differ = 0
    for seed in range(3):
        turns = random_turns(512, (7, 4, 4), seed=seed)
        replies = {}
        for mode in ("mask", "propagate"):
            conv = tiny64.chat(schedule=s, stop_tokens=(), max_seq_len=64, backfill=mode)
            replies[mode] = [conv.send_tokens(t, 8).tokens[0] for t in turns]
        assert replies["mask"][0] == replies["propagate"][0]
        differ += replies["mask"] != replies["propagate"]
    assert differ > 0


def test_per_call_overrides_the_model(tiny64, tiny64_mask):
    s = schedule_of(SCHEDULES[0], "upper")
    prompt = prompt_of(8, seed=5)
    assert tiny64_mask.generate(prompt, 10, s, stop_tokens=(), backfill="propagate").tokens \
        == tiny64.generate(prompt, 10, s, stop_tokens=()).tokens
    assert tiny64_mask.backfill == "mask" and tiny64.backfill == "propagate"


def test_mask_batch_equals_alone(tiny64):
    s = schedule_of(SCHEDULES[0], "lower")
    prompts = [prompt_of(n, seed=n) for n in (3, 11, 1, 7)]
    batch = tiny64.generate(prompts, 10, s, stop_tokens=(), backfill="mask")
    for prompt, tokens, depths in zip(prompts, batch.tokens, batch.depths):
        alone = tiny64.generate(prompt, 10, s, stop_tokens=(), backfill="mask")
        assert alone.tokens[0] == tokens and alone.depths[0] == depths


def test_mask_cache_marks_skipped_entries_unwritten(tiny64):
    s = schedule_of(SCHEDULES[0], "lower")
    L = tiny64.config.num_layers
    out = tiny64.generate([1, 2, 3], 6, s, stop_tokens=(), backfill="mask")
    written = tiny64.cache.gather_row(tiny64.cache.written, 0)
    assert written[:, :3].all()  # the prompt, full depth
    for i, depth in enumerate(out.depths[0][1:], start=1):  # slot 2 + i holds T_{i-1}
        kept = s.kept_layers(depth, L)
        assert written[:, 2 + i].tolist() == [j in kept for j in range(L)]
    assert not written[:, 3 + 5:].any()


@pytest.mark.parametrize("order", ["lower", "upper"])
def test_mask_three_turn_chat_matches_oracle(tiny64, order):
    s = DepthSchedule(alpha=0.7, head=1, tail=2, order=order)
    turns = random_turns(512, (9, 5, 7), seed=3)
    conv = tiny64.chat(schedule=s, stop_tokens=(), max_seq_len=96, backfill="mask")
    outs = [conv.send_tokens(t, 10) for t in turns]
    expected = chat_oracle(tiny64, turns, 10, s, backfill="mask")
    assert [(o.tokens[0], o.depths[0]) for o in outs] == expected
    assert min(expected[0][1]) < tiny64.config.num_layers
    assert expected != chat_oracle(tiny64, turns, 10, s)  # differs from propagate


def test_smollm2_mask_three_turns_match_oracle(smollm2_f64):
    model = smollm2_f64
    s = DepthSchedule(alpha=0.85, head=4, tail=2, order="lower")
    conv = model.chat(schedule=s, max_seq_len=256, backfill="mask")
    outs = [conv.send(text, 6) for text in ("Name a color.", "Another one?", "Thanks!")]
    turns = [t.new_ids for t in conv.turns]
    assert not any(t.rebuilt for t in conv.turns)
    expected = chat_oracle(model, turns, 6, s, stop_tokens=model.tokenizer.stop_token_ids,
                           backfill="mask")
    assert [(o.tokens[0], o.depths[0]) for o in outs] == expected
    assert min(outs[0].depths[0]) < 30
    prop = model.chat(schedule=s, max_seq_len=256)  # the modes part ways at turn 3 here
    assert [prop.send(text, 6).tokens[0] for text in ("Name a color.", "Another one?",
                                                      "Thanks!")] != [o.tokens[0] for o in outs]


def test_bad_backfill_values(tiny64):
    with pytest.raises(ValueError, match="backfill must be one of"):
        LlamaD3.random("tiny", backfill="zero")
    with pytest.raises(ValueError, match="backfill_timing must be one of"):
        LlamaD3.random("tiny", backfill_timing="later")
    with pytest.raises(ValueError, match="backfill must be one of"):
        tiny64.generate([1, 2], 3, backfill="Mask")
    with pytest.raises(ValueError, match="backfill_timing must be one of"):
        tiny64.generate([1, 2], 3, backfill_timing=True)
    with pytest.raises(ValueError, match="backfill must be one of"):
        tiny64.chat(backfill="none")
    with pytest.raises(ValueError, match="flush_backfill"):
        tiny64.generate([1, 2], 3, flush_backfill="yes")
    with pytest.raises(ValueError, match="backfill must be"):
        reference.llama_forward(tiny64.state_dict(), tiny64.config, torch.tensor([[1]]),
                                backfill="drop")


@pytest.fixture(scope="module")
def tiny_triton_mask():
    """Triton backend (the interpreter on the CPU), fp32, mask mode as the model's default."""
    return LlamaD3.random("tiny", dtype=torch.float32, device=DEVICE, seed=11,
                          backend="triton", backfill="mask")


def test_triton_mask_matches_oracle(tiny_triton_mask):
    """Triton, fp32: a batch of rows at different positions in mask mode gives the oracle's
    tokens, fills nothing and leaves the skipped entries unwritten."""
    model = tiny_triton_mask
    L = model.config.num_layers
    s = DepthSchedule(alpha=0.7, head=2, tail=1, order="upper")
    prompts = [prompt_of(n, seed=n) for n in (6, 3)]
    out = model.generate(prompts, 3, s, stop_tokens=())
    for r, prompt in enumerate(prompts):
        tokens, depths = oracle(model, prompt, 3, s, "mask")
        assert out.tokens[r] == tokens and out.depths[r] == depths
    assert min(out.depths[0]) < L and out.stats.backfill_bytes == 0
    for r, prompt in enumerate(prompts):
        written = model.cache.gather_row(model.cache.written, r)
        assert written[:, :len(prompt)].all()
        for i, depth in enumerate(out.depths[r][1:], start=1):  # slot n-1+i holds T_{i-1}
            kept = s.kept_layers(depth, L)
            assert written[:, len(prompt) - 1 + i].tolist() == [j in kept for j in range(L)]


def test_triton_mask_two_turn_chat_matches_oracle(tiny_triton_mask):
    """Turn 2's prefill and decode steps read turn 1's skipped entries, which mask mode must
    ignore: these turns give different replies in the two modes."""
    model = tiny_triton_mask
    s = DepthSchedule(alpha=0.7, head=2, tail=1, order="upper")
    turns = random_turns(512, (6, 4), seed=2)
    conv = model.chat(schedule=s, stop_tokens=(), max_seq_len=32)
    outs = [conv.send_tokens(t, 3) for t in turns]
    expected = chat_oracle(model, turns, 3, s, backfill="mask")
    assert [(o.tokens[0], o.depths[0]) for o in outs] == expected
    assert expected != chat_oracle(model, turns, 3, s)  # differs from propagate


# ---- deferred propagate backfill --------------------------------------------------------------

def _used_slots_equal(a: KVCache, b: KVCache, ends: list[int], tol: float):
    for r, n in enumerate(ends):
        assert a.gather_row(a.written, r, n).all() and b.gather_row(b.written, r, n).all()
        for kind in ("k", "v"):
            x, y = a.gather_row(getattr(a, kind), r, n), b.gather_row(getattr(b, kind), r, n)
            assert rel_err(x, y) <= tol


def test_deferred_cache_equals_eager_after_flush(tiny64):
    s = schedule_of(SCHEDULES[0], "upper")
    prompts = [prompt_of(n, seed=n) for n in (5, 12, 2)]  # rows at different positions
    n = 10
    eager = tiny64.generate(prompts, n, s, stop_tokens=(), backfill_timing="eager")
    c_eager = KVCache(tiny64.config, 3, 32, tiny64.dtype, tiny64.device)
    c_def = KVCache(tiny64.config, 3, 32, tiny64.dtype, tiny64.device)
    out_e = tiny64.generate(prompts, n, s, stop_tokens=(), cache=c_eager, past_lengths=[0] * 3,
                            backfill_timing="eager")
    out_d = tiny64.generate(prompts, n, s, stop_tokens=(), cache=c_def, past_lengths=[0] * 3,
                            backfill_timing="deferred")
    assert out_d.tokens == out_e.tokens == eager.tokens
    ends = [len(p) + n - 1 for p in prompts]  # the last token is not in the cache
    assert c_def.pending_backfill > 0 and not c_def.gather_row(c_def.written, 0, ends[0]).all()
    assert out_d.stats.backfill_bytes == 0  # nothing filled yet
    # one skipped run per step (upper order): one hidden vector per page slot (3 rows of 2
    # pages of 16)
    assert c_def.stash.shape == (1, 6, 16, tiny64.config.hidden_size)
    assert c_def.stash_bytes == 3 * 32 * tiny64.config.hidden_size * 8 < c_def.kv_bytes
    assert c_eager.stash is None and c_eager.stash_bytes == 0
    filled = tiny64.flush_backfill(c_def)
    assert filled > 0 and c_def.pending_backfill == 0 and tiny64.flush_backfill(c_def) == 0
    _used_slots_equal(c_def, c_eager, ends, 1e-12)
    assert not c_def.gather_row(c_def.written, 0)[:, ends[0]:].any()


def test_deferred_reads_fewer_backfill_bytes(tiny64):
    s = schedule_of(SCHEDULES[0], "lower")
    L, n = tiny64.config.num_layers, 16
    per_layer = backfill_layer_bytes(tiny64.config, 8)
    eager = tiny64.generate([1, 2, 3], n, s, stop_tokens=(), backfill_timing="eager")
    deferred = tiny64.generate([1, 2, 3], n, s, stop_tokens=(), backfill_timing="deferred",
                               flush_backfill=True)
    assert deferred.tokens == eager.tokens
    skipped = [L - d for d in eager.depths[0][1:]]
    assert eager.stats.backfill_bytes == sum(skipped) * per_layer
    # deferred: each layer skipped at some step is read once, at the flush
    owed = {j for d in eager.depths[0][1:] for a, b in _runs(s, d, L) for j in range(a, b)}
    assert deferred.stats.backfill_bytes == len(owed) * per_layer
    assert 0 < deferred.stats.backfill_bytes < eager.stats.backfill_bytes / 2
    assert tiny64.cache.pending_backfill == 0  # flushed at the end of the call


def _runs(s, depth, L):
    from d3kernels.schedule import skipped_runs

    return skipped_runs(s.kept_layers(depth, L), L)


@pytest.mark.parametrize("order", ["lower", "upper"])
def test_deferred_three_turn_chat_matches_oracle(tiny64, order):
    s = DepthSchedule(alpha=0.7, head=1, tail=2, order=order)
    turns = random_turns(512, (9, 5, 7), seed=8)
    conv = tiny64.chat(schedule=s, stop_tokens=(), max_seq_len=96, backfill_timing="deferred")
    eager = tiny64.chat(schedule=s, stop_tokens=(), max_seq_len=96, backfill_timing="eager")
    outs = [conv.send_tokens(t, 10) for t in turns]
    outs_e = [eager.send_tokens(t, 10) for t in turns]
    expected = chat_oracle(tiny64, turns, 10, s)
    assert [(o.tokens[0], o.depths[0]) for o in outs] == expected
    assert [o.tokens for o in outs_e] == [o.tokens for o in outs]
    # turn k's prefill flushed reply k-1: fewer bytes than eager, but some
    for d, e in zip(outs[1:], outs_e[:-1]):
        assert 0 < d.stats.backfill_bytes < e.stats.backfill_bytes
    assert conv._cache.pending_backfill > 0  # the last reply's entries are still owed
    assert conv.flush_backfill() > 0
    _used_slots_equal(conv._cache, eager._cache, [len(conv.cached_ids)], 1e-12)


def test_rebuild_drops_what_it_overwrites(tiny64):
    """A prefill from position 0 on a cache owing deferred entries drops them."""
    s = schedule_of(SCHEDULES[0], "lower")
    cache = KVCache(tiny64.config, 1, 40, tiny64.dtype, tiny64.device)
    tiny64.generate([1, 2, 3], 8, s, stop_tokens=(), cache=cache, past_lengths=[0],
                    backfill_timing="deferred")
    assert cache.pending_backfill > 0
    out = tiny64.generate([4, 5], 8, s, stop_tokens=(), cache=cache, past_lengths=[0],
                          backfill_timing="deferred", flush_backfill=True)
    assert out.tokens == tiny64.generate([4, 5], 8, s, stop_tokens=()).tokens
    written = cache.gather_row(cache.written, 0)
    assert cache.pending_backfill == 0 and written[:, :2 + 7].all()
    assert not written[:, 2 + 7:].any()


def test_a_plain_reply_pays_no_backfill(tiny64):
    """The defaults defer, and nothing reads a reply's skipped entries: generate fills none,
    and the next generate on the model's cache drops what the last one owed, unpaid."""
    L = tiny64.config.num_layers
    assert tiny64.backfill_timing == "deferred" and tiny64.chat().backfill_timing == "deferred"
    s = schedule_of(SCHEDULES[0], "lower")
    first = tiny64.generate([prompt_of(6, 1), prompt_of(3, 2)], 10, s, stop_tokens=())
    cache, paid = tiny64.cache, tiny64.cache.backfill_bytes
    assert min(first.depths[0]) < L and first.stats.backfill_bytes == 0
    assert cache.pending_backfill > 0
    second = tiny64.generate(prompt_of(5, 3), 10, s, stop_tokens=())
    assert tiny64.cache is cache and second.stats.backfill_bytes == 0
    assert cache.backfill_bytes == paid  # nothing flushed
    owed = sum(L - d for d in second.depths[0][1:])  # only the second reply's entries
    assert cache.pending_backfill == owed and tiny64.flush_backfill() == owed


# depths 8, 7, 6, 5, 5, 4, ...: the step at depth 6 skips layers 1 and 3, two runs
SEVERAL_RUNS = dict(alpha=0.9, head=1, tail=2, order=(3, 1, 4, 2, 5))


def test_several_skipped_runs_grow_the_stash(tiny64):
    """An order whose steps skip several runs: the stash grows mid-generation from one
    vector per position to two (what it held is kept), and deferred + flush equals eager."""
    s = DepthSchedule(**SEVERAL_RUNS)
    prompts = [prompt_of(n, seed=n) for n in (5, 9)]
    c_e, c_d = (KVCache(tiny64.config, 2, 24, tiny64.dtype, tiny64.device) for _ in range(2))
    out_e = tiny64.generate(prompts, 8, s, stop_tokens=(), cache=c_e, past_lengths=[0, 0],
                            backfill_timing="eager")
    stream = tiny64.stream(prompts, 8, s, stop_tokens=(), cache=c_d, past_lengths=[0, 0])
    runs = [0 if c_d.stash is None else c_d.stash.shape[0] for e in stream if e.row == 0]
    assert runs == [0, 1, 2, 2, 2, 2, 2, 2]  # after the prefill, then after each step
    assert stream.output.tokens == out_e.tokens and out_e.depths[0][:4] == [8, 7, 6, 5]
    assert c_d.stash_bytes == 2 * 2 * 32 * tiny64.config.hidden_size * 8  # 2 pages of 16 a row
    assert tiny64.flush_backfill(c_d) > 0
    _used_slots_equal(c_d, c_e, [len(p) + 7 for p in prompts], 1e-12)


def test_steps_out_of_order_settle_what_they_read(tiny64):
    """decode_step driven by hand with kept sets that are not nested (a layer skipped at one
    slot is kept at the next) and a rewrite of slots already decoded: the deferred cache
    settles what a pass would read or overwrite first, so tokens and the flushed cache are
    eager's."""
    from d3kernels.sampling import Sampling

    steps = [((0, 1, 2, 4, 5, 6, 7), 3), ((0, 1, 2, 3, 6, 7), 4), ((0, 2, 4, 5, 7), 5),
             ((0, 1, 3, 7), 4), ((0, 5, 6, 7), 5)]  # (kept, slot): slots 4 and 5 again
    results = []
    for timing in ("eager", "deferred"):
        cache = KVCache(tiny64.config, 1, 16, tiny64.dtype, tiny64.device)
        with torch.inference_mode():
            tok = tiny64.prefill(torch.tensor([[5, 6, 7]]), [3], cache, Sampling())
            tokens = []
            for kept, slot in steps:
                tok = tiny64.decode_step(tok, [slot], kept, cache, Sampling(),
                                         backfill_timing=timing)
                tokens.append(tok.item())
            tiny64.flush_backfill(cache)
        results.append((tokens, cache))
    (t_e, c_e), (t_d, c_d) = results
    assert t_d == t_e
    _used_slots_equal(c_d, c_e, [6], 1e-12)


def test_triton_deferred_equals_eager(monkeypatch):
    """Triton interpreter, fp32, an order with two skipped runs per step: deferred + flush
    (one kv_backfill launch per group of layers) gives the eager cache; the stash grows
    mid-generation, and a CUDA graph captured before it grew is captured again, never
    replayed (it would write to the old stash): stand-in graphs run the step when replayed
    and check that they see the stash they were captured with. A two-turn deferred chat
    equals the oracle."""
    model = LlamaD3.random("tiny", dtype=torch.float32, device=DEVICE, seed=11,
                           backend="triton")
    s, L = DepthSchedule(**SEVERAL_RUNS), model.config.num_layers
    prompts = [prompt_of(n, seed=n) for n in (3, 2)]
    c_e, c_d = (KVCache(model.config, 2, 8, model.dtype, model.device) for _ in range(2))
    out_e = model.generate(prompts, 4, s, stop_tokens=(), cache=c_e, past_lengths=[0, 0],
                           backfill_timing="eager")
    backend, captured = model._backend, []

    def capture(bufs, step):
        stash, zero = c_d.stash, torch.zeros(1, dtype=torch.int64, device=DEVICE)
        # the step's layer set, from the closure TritonBackend._replay hands to _capture
        cells = dict(zip(step.__code__.co_freevars, step.__closure__))
        captured.append(len(cells["kept"].cell_contents))

        class Graph:
            @staticmethod
            def replay():
                assert c_d.stash is stash, "a graph replayed after its stash was replaced"
                step(zero, zero)
        return Graph(), zero, zero

    monkeypatch.setattr(backend, "cuda_graphs", True)
    monkeypatch.setattr(backend, "_capture", capture)
    out_d = model.generate(prompts, 4, s, stop_tokens=(), cache=c_d, past_lengths=[0, 0],
                           flush_backfill=True)
    assert out_d.tokens == out_e.tokens and out_e.depths[0] == [L, 7, 6, 5]
    assert captured == [7, 6, 5] and c_d.stash.shape[0] == 2
    assert 0 < out_d.stats.backfill_bytes < out_e.stats.backfill_bytes
    _used_slots_equal(c_d, c_e, [len(p) + 3 for p in prompts], TOL[torch.float32])
    # depth 7's graph was captured before the stash grew: the next reply captures it again
    again = model.generate(prompts, 2, s, stop_tokens=(), cache=c_d, past_lengths=[0, 0])
    assert again.tokens == [t[:2] for t in out_e.tokens] and captured == [7, 6, 5, 7]
    monkeypatch.undo()
    s = DepthSchedule(alpha=0.7, head=2, tail=1, order="upper")
    turns = random_turns(512, (6, 4), seed=6)
    conv = model.chat(schedule=s, stop_tokens=(), max_seq_len=32)  # deferred: the default
    outs = [conv.send_tokens(t, 4) for t in turns]
    assert [(o.tokens[0], o.depths[0]) for o in outs] == chat_oracle(model, turns, 4, s)


@gpu
def test_gpu_graphs_recaptured_when_the_stash_grows():
    """Real CUDA graphs, bf16: an order whose steps skip one more run each time (1 to 7)
    grows the stash mid-reply; graphed deferred decoding gives the tokens and, flushed, the
    cache of ungraphed decoding, also in a second reply at depths whose graphs were captured
    before the stash last grew."""
    kwargs = dict(dtype=torch.bfloat16, device="cuda", backend="triton", seed=3)
    models = [LlamaD3.random("smollm2-135m", cuda_graphs=g, **kwargs) for g in (True, False)]
    order = (8, 16, 24, 10, 18, 26) + tuple(j for j in range(4, 28)
                                              if j not in (8, 16, 24, 10, 18, 26))
    s = DepthSchedule(alpha=0.97, head=4, tail=2, order=order)
    prompts = [torch.randint(0, 49152, (n,)).tolist() for n in (20, 33)]
    caches = [KVCache(m.config, 2, 64, m.dtype, m.device) for m in models]
    for n in (12, 6):
        a, b = (m.generate(prompts, n, s, stop_tokens=(), cache=c, past_lengths=[0, 0],
                           flush_backfill=True) for m, c in zip(models, caches))
        assert a.tokens == b.tokens
        for x, y in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):
            # entry by entry: one filled from a stale stash would be far off
            tol = TOL[torch.bfloat16]
            torch.testing.assert_close(x.float(), y.float(), rtol=tol, atol=tol)
    assert caches[0].stash.shape[0] == 7


def test_smollm2_deferred_chat_equals_eager(smollm2_f64):
    """SmolLM2 float64: a deferred three-turn chat gives the eager replies (which
    test_chat holds to the oracle) and, once flushed, the eager cache."""
    model = smollm2_f64
    s = DepthSchedule(alpha=0.85, head=4, tail=2, order="upper")
    convs = [model.chat(schedule=s, max_seq_len=256, backfill_timing=t)
             for t in ("eager", "deferred")]
    texts = ("Name a color.", "Another one?", "Thanks!")
    eager, deferred = ([c.send(t, 6) for t in texts] for c in convs)
    assert [o.tokens for o in deferred] == [o.tokens for o in eager]
    assert min(eager[0].depths[0]) < 30
    assert sum(o.stats.backfill_bytes for o in deferred) \
        < sum(o.stats.backfill_bytes for o in eager[:-1])
    convs[1].flush_backfill()
    _used_slots_equal(convs[1]._cache, convs[0]._cache, [len(convs[0].cached_ids)], 1e-12)
