"""Continuous batching: every request gets exactly what it gets alone (float32/float64),
whatever joins or leaves the batch around it; rows are never lost or leaked; faults stay in
their own row."""
import random

import pytest
import torch

from d3kernels import DepthSchedule, Engine, KVCache, LlamaD3
from d3kernels.sampling import RowSampling, Sampling
from tests.ops.conftest import DEVICE, TOL, rel_err

LOWER = DepthSchedule(alpha=0.8, head=1, tail=1)
UPPER = DepthSchedule(alpha=0.85, start=2, head=2, tail=1, order="upper")
EXPLICIT = DepthSchedule(alpha=0.7, head=1, tail=2, order=(3, 1, 4, 2, 5))
SCHEDULES = [LOWER, UPPER, EXPLICIT, DepthSchedule.full()]


@pytest.fixture(scope="module")
def tiny64():
    return LlamaD3.random("tiny", dtype=torch.float64, seed=7)


def _prompt(rng: random.Random, model, n: int) -> list[int]:
    return [rng.randrange(model.config.vocab_size) for _ in range(n)]


def _alone(model, req, backfill="propagate"):
    s = req.sampling
    return model.generate(req.prompt, req.max_new_tokens, req.schedule, temperature=s.temperature,
                          top_k=s.top_k, top_p=s.top_p, seed=s.seed,
                          stop_tokens=req.stop_tokens, backfill=backfill)


def _assert_drained(engine: Engine):
    assert engine.idle and not engine.running and not engine.waiting
    assert engine.free_slots == engine.max_batch  # no leaked row


@pytest.mark.parametrize("backfill", ["propagate", "mask"])
def test_every_request_equals_alone(tiny64, backfill):
    """Mixed prompt lengths, lengths, schedules and orders; requests join while others run."""
    rng = random.Random(1)
    engine = Engine(tiny64, max_batch=4, max_seq_len=48, stop_tokens=(), backfill=backfill)
    reqs = [engine.submit(_prompt(rng, tiny64, rng.randint(1, 20)), rng.randint(1, 16),
                          SCHEDULES[k % len(SCHEDULES)]) for k in range(10)]
    events, owed = [], 0
    for event in engine.run():
        events.append(event)
        owed = max(owed, engine.cache.pending_backfill)
        if len(reqs) < 16 and len(events) % 7 == 0:  # late arrivals into a running batch
            reqs.append(engine.submit(_prompt(rng, tiny64, rng.randint(1, 12)),
                                      rng.randint(2, 12), SCHEDULES[len(reqs) % 4]))
    assert len(reqs) == 16
    _assert_drained(engine)
    # deferred by default: requests owed entries, their rows dropped them unpaid
    assert (owed > 0) == (backfill == "propagate")
    assert engine.cache.pending_backfill == 0 and engine.cache.backfill_bytes == 0
    for req in reqs:
        alone = _alone(tiny64, req, backfill)
        assert req.tokens == alone.tokens[0], req.id
        assert req.depths == alone.depths[0], req.id
        assert req.finish_reason == "length" and len(req.tokens) == req.max_new_tokens
        assert [e.token for e in events if e.row == req.id] == req.tokens
        assert [e.index for e in events if e.row == req.id] == list(range(len(req.tokens)))
    # rows at different depths shared steps, and no step ran more layers than its rows needed
    assert engine.stats.layer_ratio > 1 and engine.stats.union_layer_ratio >= 1
    assert engine.stats.generated_tokens == len(events)


def test_engine_defers_backfill_and_drops_it_with_the_row(tiny64):
    """Deferred (the default): running rows owe their skipped entries (several runs per step
    here) until flush_backfill fills them with eager's values, and a released row drops
    what it owes; backfill_timing="eager" fills them every step. Tokens are the same."""
    rng = random.Random(4)
    prompts = [_prompt(rng, tiny64, n) for n in (5, 9, 3)]
    engines = [Engine(tiny64, max_batch=2, max_seq_len=24, schedule=EXPLICIT, stop_tokens=(),
                      backfill_timing=t) for t in ("eager", "deferred")]
    reqs = [[e.submit(p, 6) for p in prompts] for e in engines]
    for engine in engines:
        for _ in range(4):  # the first two requests are four tokens in, the third waits
            engine.step()
    eager, deferred = (e.cache for e in engines)
    assert eager.pending_backfill == 0 and eager.backfill_bytes > 0
    assert deferred.pending_backfill > 0 and deferred.backfill_bytes == 0
    assert deferred.stash.shape[0] == 2  # two skipped runs at once (order 3, 1, 4, ...)
    assert tiny64.flush_backfill(deferred) > 0 and deferred.pending_backfill == 0
    assert torch.equal(deferred.written, eager.written)
    for x, y in ((deferred.k, eager.k), (deferred.v, eager.v)):
        assert rel_err(x, y) <= 1e-12
    paid = deferred.backfill_bytes
    for engine in engines:
        list(engine.run())
        _assert_drained(engine)
    assert [r.tokens for r in reqs[0]] == [r.tokens for r in reqs[1]]
    assert deferred.pending_backfill == 0 and deferred.backfill_bytes == paid


def test_sampled_requests_equal_alone(tiny64):
    """Each request samples with its own seeded generator, unaffected by its neighbours."""
    rng = random.Random(2)
    engine = Engine(tiny64, max_batch=3, max_seq_len=40, schedule=LOWER, stop_tokens=())
    reqs = [engine.submit(_prompt(rng, tiny64, 4 + 3 * k), 6 + k, temperature=0.9, top_k=40,
                          seed=100 + k) for k in range(4)]
    reqs.append(engine.submit(_prompt(rng, tiny64, 5), 8))  # a greedy one among them
    list(engine.run())
    _assert_drained(engine)
    for req in reqs:
        assert req.tokens == _alone(tiny64, req).tokens[0]


def test_many_requests_lose_none_and_leak_no_row():
    """Admission and release under load: 60 requests of mixed lengths, some stopping early on a
    stop token, some cancelled, some submitted mid-run; every one ends once, every row returns."""
    model = LlamaD3.random("tiny", dtype=torch.float32, seed=3)
    rng = random.Random(3)
    stop = {rng.randrange(model.config.vocab_size) for _ in range(40)}  # frequent early stops
    engine = Engine(model, max_batch=5, max_seq_len=40, schedule=LOWER, stop_tokens=stop)
    reqs = [engine.submit(_prompt(rng, model, rng.randint(1, 24)), rng.randint(1, 16))
            for _ in range(30)]
    seen: dict[int, int] = {}
    for step in range(10_000):
        if engine.idle:
            break
        for event in engine.step():
            seen[event.row] = seen.get(event.row, 0) + 1
        assert len(engine.running) + engine.free_slots == engine.max_batch
        assert len({r.slot for r in engine.running}) == len(engine.running)
        if step % 2 == 0 and len(reqs) < 60:
            reqs.append(engine.submit(_prompt(rng, model, rng.randint(1, 24)),
                                      rng.randint(1, 16)))
        if step % 11 == 5 and engine.running:
            engine.cancel(engine.running[0])
    _assert_drained(engine)
    assert len(reqs) == 60 and len({r.id for r in reqs}) == 60
    for req in reqs:
        assert req.done and req.slot is None
        assert seen.get(req.id, 0) == len(req.tokens) <= req.max_new_tokens
        if req.finish_reason == "stop":
            assert req.tokens[-1] in stop and not set(req.tokens[:-1]) & stop
        elif req.finish_reason == "length":
            assert len(req.tokens) == req.max_new_tokens and not set(req.tokens) & stop
        else:
            assert req.finish_reason == "cancelled"
    reasons = {r.finish_reason for r in reqs}
    assert reasons == {"stop", "length", "cancelled"}


def test_stop_token_on_the_first_step_frees_the_row(tiny64):
    """A request whose prefill token is a stop token ends with that one token; its neighbours,
    and the request that takes over its row, are unaffected."""
    rng = random.Random(4)
    p0, p1, p2 = (_prompt(rng, tiny64, n) for n in (7, 11, 5))
    first = tiny64.generate(p0, 1, stop_tokens=()).tokens[0][0]
    engine = Engine(tiny64, max_batch=2, max_seq_len=32, schedule=LOWER)
    a = engine.submit(p0, 10, stop_tokens=[first])
    b = engine.submit(p1, 10, stop_tokens=())
    c = engine.submit(p2, 10, stop_tokens=())
    engine.step()  # a and b prefilled; a stops at once and gives its row back
    assert a.done and a.tokens == [first] and a.finish_reason == "stop" and a.depths == [8]
    assert engine.free_slots == 1 and c.status == "waiting"
    list(engine.run())
    _assert_drained(engine)
    for req in (b, c):
        assert req.tokens == _alone(tiny64, req).tokens[0]


def test_cancel_mid_generation(tiny64):
    rng = random.Random(5)
    engine = Engine(tiny64, max_batch=2, max_seq_len=40, schedule=UPPER, stop_tokens=())
    a = engine.submit(_prompt(rng, tiny64, 9), 20)
    b = engine.submit(_prompt(rng, tiny64, 4), 12)
    c = engine.submit(_prompt(rng, tiny64, 13), 9)  # waits for a row
    d = engine.submit(_prompt(rng, tiny64, 6), 9)
    assert engine.cancel(d) and d.finish_reason == "cancelled" and d.tokens == []
    for _ in range(4):
        engine.step()
    assert len(a.tokens) == 4 and engine.cancel(a)
    assert a.finish_reason == "cancelled" and a.slot is None and engine.free_slots == 1
    assert a.tokens == _alone(tiny64, a).tokens[0][:4]  # what it had so far was right
    assert not engine.cancel(a)  # already finished
    list(engine.run())  # c takes a's row, over a's stale cache entries
    _assert_drained(engine)
    assert c.slot is None and c.tokens == _alone(tiny64, c).tokens[0]
    assert b.tokens == _alone(tiny64, b).tokens[0]


def test_smollm2_requests_equal_alone(smollm2_f64):
    """The real model, D³ lower and upper at once, chat prompts of different lengths."""
    tok = smollm2_f64.tokenizer
    engine = Engine(smollm2_f64, max_batch=2, max_seq_len=128, stop_tokens=())
    questions = ["Name three rivers.", "What is two plus two?", "Say hello in French."]
    reqs = [engine.submit(tok.encode_chat([{"role": "user", "content": q}]), 10,
                          DepthSchedule(alpha=0.9, order=order))
            for q, order in zip(questions, ["lower", "upper", "lower"])]
    list(engine.run())
    _assert_drained(engine)
    for req in reqs:
        assert req.tokens == _alone(smollm2_f64, req).tokens[0]
        assert req.text == tok.decode(req.tokens)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt=[]), "empty"),
    (dict(prompt=[1, 2, 10**6]), "outside the vocabulary"),
    (dict(prompt=[[1, 2], [3]]), "one prompt"),
    (dict(prompt=torch.tensor([[1, 2], [3, 4]])), "one prompt"),
    (dict(prompt=[1] * 29, max_new_tokens=4), "max_seq_len=32"),
    (dict(prompt=[1], max_new_tokens=0), "max_new_tokens"),
    (dict(prompt=[1], temperature=-1), "temperature"),
    (dict(prompt=[1], schedule=DepthSchedule(head=6, tail=6)), "head \\+ tail"),
    (dict(prompt=[1], stop_tokens=[-1]), "stop_tokens"),
])
def test_bad_request_is_refused_before_queueing(tiny64, kwargs, match):
    engine = Engine(tiny64, max_batch=2, max_seq_len=32)
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        engine.submit(kwargs.pop("prompt"), **kwargs)
    assert engine.idle and engine.free_slots == 2 and engine.step() == []


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_batch=0), "max_batch"),
    (dict(max_seq_len=10**9), "max_seq_len"),
    (dict(schedule="lower"), "schedule"),
    (dict(backfill="copy"), "backfill"),
    (dict(backfill_timing="later"), "backfill_timing"),
])
def test_bad_engine_arguments(tiny64, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Engine(tiny64, **kwargs)


# ---- triton backend (the interpreter on the CPU) -----------------------------------------------

TRITON_SCHEDULES = [DepthSchedule(alpha=0.7, head=1, tail=1),
                    DepthSchedule(alpha=0.75, start=1, head=2, tail=1, order="upper"),
                    DepthSchedule.full(),
                    DepthSchedule(alpha=0.6, head=1, tail=2, order=(3, 1, 4, 2, 5))]


@pytest.fixture(scope="module")
def tiny_triton():
    return LlamaD3.random("tiny", dtype=torch.float32, device=DEVICE, seed=7, backend="triton")


@pytest.mark.parametrize("backfill", ["propagate", "mask"])
def test_triton_requests_equal_alone(tiny_triton, backfill):
    """Requests of different prompt lengths and schedules (lower, upper, explicit, full) through
    two rows: the later ones wait and take the rows the first ones free. Greedy and nucleus
    requests get generate's tokens; a seeded temperature/top-k request draws T_0 as generate
    does and its later tokens with torch from kernel logits, which its neighbours do not
    change. (Interpreter time: mask mode runs greedy requests only.)"""
    model, rng = tiny_triton, random.Random(6)
    lower, upper, explicit, full = TRITON_SCHEDULES
    engine = Engine(model, max_batch=2, max_seq_len=24, stop_tokens=(), backfill=backfill)
    submit = engine.submit
    if backfill == "propagate":
        reqs = [submit(_prompt(rng, model, 5), 4, lower), submit(_prompt(rng, model, 9), 3, full),
                submit(_prompt(rng, model, 1), 3, explicit, temperature=0.8, top_p=0.9, seed=3)]
        sampled = submit(_prompt(rng, model, 3), 3, upper, temperature=0.9, top_k=20, seed=4)
    else:
        reqs = [submit(_prompt(rng, model, 5), 4, lower), submit(_prompt(rng, model, 9), 3, upper),
                submit(_prompt(rng, model, 2), 3, full)]
        sampled = None
    list(engine.run())
    _assert_drained(engine)
    for req in reqs:
        alone = _alone(model, req, backfill)
        assert req.tokens == alone.tokens[0] and req.depths == alone.depths[0], req.id
    assert engine.stats.layer_ratio > 1
    if sampled is not None:
        first = model.generate(sampled.prompt, 1, temperature=0.9, top_k=20, seed=4,
                               stop_tokens=())
        assert sampled.tokens[0] == first.tokens[0][0]
        solo = Engine(model, max_batch=1, max_seq_len=24, stop_tokens=())  # no neighbour
        again = solo.submit(sampled.prompt, 3, upper, temperature=0.9, top_k=20, seed=4)
        list(solo.run())
        assert again.tokens == sampled.tokens and again.depths == sampled.depths


def test_triton_engine_graphs_serve_every_row_set(tiny_triton, monkeypatch):
    """decode_rows' launches depend only on the set of layers any row keeps (its row lists are
    -1-padded tables uploaded each step), so one graph per such set serves every row set.
    With stand-in graphs (a replay runs the captured step), continuous batching with mixed
    lengths and depths gives the tokens it gives without graphs, and captures fewer graphs
    than it runs steps."""
    sched = DepthSchedule(alpha=0.8, head=2, tail=1)
    rng = random.Random(3)
    work = [(_prompt(rng, tiny_triton, n), k) for n, k in ((5, 9), (2, 4), (8, 7), (3, 8),
                                                           (6, 5))]

    def run():
        engine = Engine(tiny_triton, max_batch=3, schedule=sched)
        reqs = [engine.submit(p, k, stop_tokens=()) for p, k in work]
        list(engine.run())
        return [r.tokens for r in reqs], engine.stats.decode_steps

    plain, steps = run()
    backend, captured = tiny_triton._backend, []

    def capture(bufs, step):
        zero = torch.zeros(1, dtype=torch.int64, device=DEVICE)
        captured.append(step)

        class Graph:
            @staticmethod
            def replay():
                step(zero, zero)
        return Graph(), zero, zero

    monkeypatch.setattr(backend, "cuda_graphs", True)
    monkeypatch.setattr(backend, "_capture", capture)
    graphed, _ = run()
    backend._graphs.clear()
    assert graphed == plain
    assert 0 < len(captured) < steps


def _prefilled(model, prompts, rows, n_rows):
    """A cache of n_rows rows with prompt b prefilled into cache row rows[b]."""
    cache = KVCache(model.config, n_rows, 16, model.dtype, model.device)
    ids = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p)
    first = model.prefill(ids.to(model.device), [len(p) for p in prompts], cache, Sampling(),
                          rows=rows)
    return cache, first


@pytest.mark.parametrize("backfill, timing", [("propagate", "eager"), ("propagate", "deferred"),
                                              ("mask", None)])
def test_triton_decode_rows_matches_torch_backend(tiny_triton, backfill, timing):
    """Rows at different positions keeping different layer sets (layers 5 and 6 kept by no row,
    0, 3 and 7 by all), two steps: the next tokens and every cache entry (backfilled ones
    included; deferred: once flushed) agree with the float64 torch backend on the same
    weights."""
    ref = LlamaD3(tiny_triton.config, tiny_triton.state_dict(), dtype=torch.float64,
                  backend="torch")
    rng = random.Random(8)
    prompts = [_prompt(rng, ref, n) for n in (4, 7, 2)]
    rows = [2, 0, 3]  # cache row of each request; row 1 stays empty
    steps = [[(0, 1, 2, 3, 4, 7), (0, 1, 3, 7), (0, 2, 3, 4, 7)],
             [(0, 1, 3, 7), (0, 3, 7), (0, 3, 4, 7)]]  # nested: depths only fall
    caches, tokens = [], []
    with torch.inference_mode():
        for model in (tiny_triton, ref):
            cache, nxt = _prefilled(model, prompts, rows, 4)
            out = [nxt.tolist()]
            for i, kept in enumerate(steps):
                sampling = Sampling() if i == 0 else RowSampling([Sampling()] * len(rows))
                feed = torch.tensor(tokens[0][i] if tokens else out[i], device=model.device)
                out.append(model.decode_rows(feed, rows, [len(p) + i for p in prompts], kept,
                                             cache, sampling, backfill=backfill,
                                             backfill_timing=timing).tolist())
            assert (cache.pending_backfill > 0) == (timing == "deferred")
            model.flush_backfill(cache)
            caches.append(cache)
            tokens.append(out)
    assert tokens[0] == tokens[1]
    got, want = caches
    assert torch.equal(got.written, want.written)
    for r, n in zip(rows, (len(p) + len(steps) for p in prompts)):
        # entries a mask-mode step leaves unwritten hold whatever was there (the torch
        # backend's prefill writes its padding): only written ones must agree
        written = got.gather_row(got.written, r, n)[:, :, None, None]
        for kind in ("k", "v"):
            x, y = (c.gather_row(getattr(c, kind), r, n) for c in (got, want))
            assert rel_err(x * written, y * written) <= TOL[torch.float32]
    assert not got.gather_row(got.k, 1).any()  # the empty row was never touched
    if backfill == "mask":  # layers no row kept hold nothing at the step slots
        assert not got.gather_row(got.written, rows[0])[5:7, len(prompts[0])].any()
    assert got.backfill_bytes * 2 == want.backfill_bytes  # same layers filled, half the bytes


@pytest.mark.parametrize("kwargs, match", [
    (dict(rows=[0, 0]), "rows must hold distinct"),
    (dict(rows=[0, 5]), "rows must hold distinct"),
    (dict(positions=[3, 16]), "positions"),
    (dict(kept=[(0, 7), (7, 0)]), "kept"),
    (dict(tokens=torch.tensor([1])), "tokens"),
])
def test_triton_decode_rows_bad_input(tiny_triton, kwargs, match):
    cache = KVCache(tiny_triton.config, 2, 16, tiny_triton.dtype, tiny_triton.device)
    args = {**dict(tokens=torch.tensor([1, 2]), rows=[0, 1], positions=[3, 4],
                   kept=[(0, 7), (0, 1, 7)]), **kwargs}
    with pytest.raises(ValueError, match=match):
        tiny_triton.decode_rows(args.pop("tokens"), args["rows"], args["positions"],
                                args["kept"], cache, Sampling())
    assert not cache.written.any()  # refused before anything ran


def test_engine_checks_ids_on_the_host(tiny64, monkeypatch):
    """The engine hands decode_rows host lists, checked there: no device->host read of ids
    it just uploaded (the tensor check, _check_ids, is never reached)."""
    engine = Engine(tiny64, max_batch=2, schedule=DepthSchedule(alpha=0.8, head=2, tail=1))
    reqs = [engine.submit([3, 5, 7], 4, stop_tokens=()), engine.submit([9], 3, stop_tokens=())]
    engine.step()  # admissions: prefill checks its ids as before

    def no_sync(*args):
        raise AssertionError("decode_rows read ids back from the device")

    monkeypatch.setattr(tiny64, "_check_ids", no_sync)
    list(engine.run())
    assert [len(r.tokens) for r in reqs] == [4, 3]


def test_a_failed_prefill_puts_its_requests_back(tiny64, monkeypatch):
    """An exception inside a step (out of memory, Ctrl-C) leaves no half-admitted request:
    the next step admits them again and they finish as if nothing happened."""
    rng = random.Random(6)
    engine = Engine(tiny64, max_batch=2, max_seq_len=32, schedule=LOWER, stop_tokens=())
    reqs = [engine.submit(_prompt(rng, tiny64, n), 5) for n in (4, 7, 3)]
    real = tiny64.prefill
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tiny64, "prefill", flaky)
    with pytest.raises(KeyboardInterrupt):
        engine.step()
    assert engine.free_slots == 2 and engine.waiting == reqs
    assert all(r.status == "waiting" and r.slot is None and not r.tokens for r in reqs)
    list(engine.run())
    _assert_drained(engine)
    for req in reqs:
        assert req.tokens == _alone(tiny64, req).tokens[0]


def test_cancel_refuses_another_engines_request(tiny64):
    e1 = Engine(tiny64, max_batch=1, max_seq_len=16, stop_tokens=())
    e2 = Engine(tiny64, max_batch=1, max_seq_len=16, stop_tokens=())
    running, waiting = e1.submit([1, 2], 4), e1.submit([3], 4)
    mine = e2.submit([4, 5], 4)
    e1.step()
    e2.step()
    for req in (running, waiting):
        with pytest.raises(ValueError, match="not submitted to this engine"):
            e2.cancel(req)
    assert mine.status == "running" and running.status == "running"
    assert waiting.status == "waiting" and e2.free_slots == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(tokens=torch.tensor([1.0, 2.0])), "long tensor"),
    (dict(tokens=torch.tensor([1, 10**6])), "outside the vocabulary"),
    (dict(rows=[True, False]), "distinct cache rows"),
    (dict(positions=[3, 40]), "positions"),
    (dict(kept=[(0, 2), (3, 1)]), "ascending"),
    (dict(tokens=[1, 10**6]), "outside the vocabulary"),
    (dict(tokens=[1]), "one int token id per row"),
    (dict(tokens=[1, True]), "one int token id per row"),
])
def test_decode_rows_bad_input_changes_nothing(tiny64, kwargs, match):
    cache = tiny64.new_cache(2, 32)
    before = cache.written.clone()
    args = {**dict(tokens=torch.tensor([1, 2]), rows=[0, 1], positions=[3, 4],
                   kept=[(0, 1, 7), tuple(range(8))], cache=cache,
                   sampling=Sampling().on(tiny64.device)), **kwargs}
    with pytest.raises(ValueError, match=match):
        tiny64.decode_rows(**args)
    assert torch.equal(cache.written, before)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lengths=[3, 2]), "lengths"),
    (dict(lengths=[5]), "lengths"),
    (dict(rows=[True]), "distinct cache rows"),
    (dict(rows=[0, 1]), "distinct cache rows"),
    (dict(ids=torch.ones(1, 40, dtype=torch.long), lengths=[40]), "exceeds the cache"),
    (dict(ids=torch.tensor([[1, 2, 10**6]])), "outside the vocabulary"),
])
def test_prefill_bad_input_changes_nothing(tiny64, kwargs, match):
    cache = tiny64.new_cache(2, 32)
    before = cache.written.clone()
    args = {**dict(ids=torch.tensor([[1, 2, 3]]), lengths=[3], cache=cache,
                   sampling=Sampling().on(tiny64.device), rows=[1]), **kwargs}
    with pytest.raises(ValueError, match=match):
        tiny64.prefill(**args)
    assert torch.equal(cache.written, before)


def test_wave_admission(tiny64):
    """min_free=max_batch admits only into an empty batch: requests that run together started
    together, so the rows of every decode step share their step index i and depth."""
    rng = random.Random(8)
    engine = Engine(tiny64, max_batch=3, max_seq_len=40, schedule=LOWER, stop_tokens=(),
                    min_free=3)
    reqs = [engine.submit(_prompt(rng, tiny64, rng.randint(1, 12)), rng.randint(2, 9))
            for _ in range(8)]
    while not engine.idle:
        running_before = {r.id for r in engine.running}
        events = engine.step()
        admitted = {e.row for e in events if e.index == 0}
        assert not (admitted and running_before)  # a wave joins only an empty batch
        assert len({e.index for e in events}) == 1  # one step index across the batch
    _assert_drained(engine)
    for req in reqs:
        assert req.tokens == _alone(tiny64, req).tokens[0]
    with pytest.raises(ValueError, match="min_free"):
        Engine(tiny64, max_batch=3, min_free=4)
