"""The engine on a paged KV cache: pages follow the requests, a short pool preempts and
recomputes without changing any output, shared prompt prefixes are prefilled once, and nothing
leaks (rows, pages, reference counts, the prefix index)."""
import random

import pytest
import torch

from d3kernels import DepthSchedule, Engine, KVCache, LlamaD3
from d3kernels.kv_cache import CacheFull
from tests.ops.conftest import DEVICE

SCHEDULES = [DepthSchedule(alpha=0.8, head=1, tail=1),
             DepthSchedule(alpha=0.85, start=2, head=2, tail=1, order="upper"),
             DepthSchedule(alpha=0.7, head=1, tail=2, order=(3, 1, 4, 2, 5)),
             DepthSchedule.full()]


@pytest.fixture(scope="module")
def tiny64():
    return LlamaD3.random("tiny", dtype=torch.float64, seed=11)


def _alone(model, req, backfill, timing):
    s = req.sampling
    return model.generate(req.prompt, req.max_new_tokens, req.schedule, temperature=s.temperature,
                          top_k=s.top_k, top_p=s.top_p, seed=s.seed, stop_tokens=req.stop_tokens,
                          backfill=backfill, backfill_timing=timing)


def _assert_empty(engine: Engine):
    """Nothing leaked: rows, pages, reference counts, prefix index, debts."""
    c = engine.cache
    assert engine.idle and engine.free_slots == engine.max_batch
    assert engine.pages_in_use == 0 and c.free_pages == c.num_pages
    assert not any(c.refs) and set(c._key) == set(c._idle)  # indexed pages kept, idle
    assert (c.block_table == -1).all() and all(p == -1 for row in c.table for p in row)
    assert c.pending_backfill == 0


def _random_requests(engine, model, rng, n, prefixes, max_new=12):
    reqs = []
    vocab = model.config.vocab_size
    for k in range(n):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 20))]
        if rng.random() < 0.6:  # a shared system prompt, or a shared prefix of one
            prefix = rng.choice(prefixes)
            prompt = prefix[:rng.randint(len(prefix) // 2, len(prefix))] + prompt
        sampling = {} if rng.random() < 0.7 else dict(temperature=0.9, top_k=20,
                                                        seed=rng.randrange(1000))
        stop = frozenset(rng.sample(range(vocab), 40)) if rng.random() < 0.5 else frozenset()
        reqs.append(engine.submit(prompt, rng.randint(1, max_new), SCHEDULES[k % 4],
                                  stop_tokens=stop, **sampling))
    return reqs


@pytest.mark.parametrize("backfill, timing, n", [("propagate", "deferred", 200),
                                                 ("propagate", "eager", 40), ("mask", None, 40)])
def test_random_requests_on_a_short_pool_equal_alone(tiny64, backfill, timing, n):
    """Random lengths, stops, sampling, cancels and shared prefixes on a pool far too small for
    all of them: preemptions happen and lose nothing; every request gets its solo output (a
    cancelled one a prefix of it); afterwards every page is free."""
    rng = random.Random(n)
    vocab = tiny64.config.vocab_size
    prefixes = [[rng.randrange(vocab) for _ in range(m)] for m in (13, 24, 40)]
    engine = Engine(tiny64, max_batch=6, max_seq_len=72, page_size=4, num_pages=22,
                    stop_tokens=(), backfill=backfill, backfill_timing=timing)
    reqs = _random_requests(engine, tiny64, rng, n, prefixes)
    doomed = set(rng.sample(range(n), n // 10))  # cancelled after their second token
    peak_running = 0
    for event in engine.run():
        peak_running = max(peak_running, len(engine.running))
        held = {p for r in engine.running for p in engine.cache.table[r.slot] if p >= 0}
        assert engine.pages_in_use == len(held)  # every page in use belongs to a running row
        if event.row in doomed and event.index == 1:
            engine.cancel(reqs[event.row])  # False if that token was its last
    _assert_empty(engine)
    st = engine.stats
    assert st.preemptions > 0 and st.recomputed_tokens > 0, "the pool should have run short"
    assert st.shared_prefix_tokens > 0 and peak_running > 1
    # a preemption means a step found fewer free pages than its rows needed
    assert st.peak_pages >= engine.cache.num_pages - engine.max_batch
    for k, req in enumerate(reqs):
        alone = _alone(tiny64, req, backfill, timing)
        if k in doomed and req.finish_reason == "cancelled":
            assert req.tokens == alone.tokens[0][:len(req.tokens)], req.id
        else:
            assert req.tokens == alone.tokens[0], req.id
            assert req.depths == alone.depths[0], req.id
    assert sum(r.preemptions for r in reqs) == st.preemptions


def test_page_sizes_and_pools_give_the_same_tokens(tiny64):
    """Page size 1 and a pool with room for every row, page size 16 without sharing, and page
    size 4 on a pool that preempts, with shared prefixes: the same tokens."""
    rng = random.Random(3)
    prefix = [rng.randrange(512) for _ in range(12)]
    prompts = [(prefix if k % 2 else []) + [rng.randrange(512) for _ in range(rng.randint(1, 18))]
               for k in range(12)]
    outs = []
    for kwargs in (dict(page_size=1), dict(page_size=16, prefix_sharing=False),
                   dict(page_size=4, num_pages=12)):
        engine = Engine(tiny64, max_batch=4, max_seq_len=48, stop_tokens=(), **kwargs)
        reqs = [engine.submit(p, 1 + k % 9, SCHEDULES[k % 4]) for k, p in enumerate(prompts)]
        list(engine.run())
        _assert_empty(engine)
        outs.append([r.tokens for r in reqs])
    assert engine.stats.preemptions > 0 and engine.stats.shared_prefix_tokens > 0
    assert outs[0] == outs[1] == outs[2]


def test_float32_preemption_without_sharing_is_exact():
    """float32, prefix sharing off: requests preempted and recomputed still get exactly their
    solo tokens (the recompute prefills the whole prompt, as the first admission did)."""
    model = LlamaD3.random("tiny", dtype=torch.float32, seed=5)
    rng = random.Random(2)
    engine = Engine(model, max_batch=4, max_seq_len=40, page_size=4, num_pages=12,
                    stop_tokens=(), prefix_sharing=False)
    reqs = [engine.submit([rng.randrange(512) for _ in range(rng.randint(4, 20))], 10,
                          SCHEDULES[k % 4]) for k in range(8)]
    list(engine.run())
    _assert_empty(engine)
    assert engine.stats.preemptions > 0 and engine.stats.shared_prefix_tokens == 0
    for req in reqs:
        assert req.tokens == _alone(model, req, "propagate", None).tokens[0], req.id


def test_shared_system_prompt_is_prefilled_once(tiny64):
    """A common 40-token system prompt: later requests point at its pages (refcounted) and
    prefill only their own tokens; outputs equal solo generation."""
    rng = random.Random(5)
    system = [rng.randrange(512) for _ in range(40)]
    prompts = [system + [rng.randrange(512) for _ in range(rng.randint(1, 9))]
               for _ in range(8)]
    engine = Engine(tiny64, max_batch=2, max_seq_len=64, page_size=8, stop_tokens=())
    reqs = [engine.submit(p, 5, SCHEDULES[0]) for p in prompts]
    seen_shared = 0
    for _ in engine.run():
        seen_shared = max(seen_shared, max(engine.cache.refs))
    _assert_empty(engine)
    # the first request prefills all 40 (the second waits a step rather than prefill them
    # again beside it); every later one shares the 5 full pages, held by its neighbour or kept
    # indexed once idle
    assert engine.stats.shared_prefix_tokens == 40 * (len(prompts) - 1)
    assert engine.stats.prefill_tokens == sum(map(len, prompts)) - 40 * (len(prompts) - 1)
    assert seen_shared == 2  # two running requests held the same pages
    for req in reqs:
        assert req.tokens == _alone(tiny64, req, "propagate", None).tokens[0]


def test_decode_pages_are_never_shared(tiny64):
    """A request whose prompt is another's prompt + reply (a chat continued through the
    engine) shares only the pages the first prefill wrote (kept indexed after it finished),
    not the full pages its decode wrote."""
    engine = Engine(tiny64, max_batch=2, max_seq_len=64, page_size=4, stop_tokens=())
    first = engine.submit(list(range(10, 22)), 9, SCHEDULES[0])  # 12 prompt tokens: 3 pages
    list(engine.run())
    follow = first.prompt + first.tokens + [7, 8]  # 23 tokens: 5 full pages before the last
    second = engine.submit(follow, 3, SCHEDULES[0])
    list(engine.run())
    assert engine.stats.shared_prefix_tokens == 12
    assert second.tokens == _alone(tiny64, second, "propagate", None).tokens[0]
    _assert_empty(engine)


def test_kv_cache_pages_refcounts_and_copy_on_write(tiny64):
    cfg = tiny64.config
    c = KVCache(cfg, 3, 16, torch.float64, torch.device("cpu"), page_size=4, num_pages=5)
    c.reserve([(0, 0, 6)])  # two pages
    assert c.pages_in_use == 2 and c.table[0][:2] == [0, 1]
    assert c.block_table[0, :2].tolist() == [0, 1]
    c.k[:, 1] = 1.0
    c.index_prefix(0, list(range(6)))  # one full page
    assert c.share_prefix(1, list(range(6))) == 4 and c.refs[0] == 2
    before = (c.k.clone(), c.table[2][:], c.refs[:], c.free_pages)
    with pytest.raises(CacheFull, match="needs 4 free KV pages but 3"):
        c.reserve([(2, 0, 16)])
    assert torch.equal(c.k, before[0]) and c.table[2] == before[1] and c.refs == before[2]
    c.k[:, 0] = 2.0
    c.written[:, 0, :3] = True
    c.get_stash(1)[:, 0] = 3.0
    c.reserve([(1, 2, 3)])  # a write into the shared page 0: row 1 gets its own copy
    page = c.table[1][0]
    assert page != 0 and c.refs[0] == 1 and c.refs[page] == 1 and (c.k[:, page] == 2).all()
    assert torch.equal(c.written[:, page], c.written[:, 0]) and (c.stash[:, page] == 3).all()
    with pytest.raises(ValueError, match="row 1 holds pages"):
        c.share_prefix(1, list(range(6)))
    with pytest.raises(ValueError, match="holds no page for positions 4"):
        c.index_prefix(1, list(range(12)))
    with pytest.raises(ValueError, match="expected 0 <= start <= end"):
        c.reserve([(2, -1, 1)])
    assert int(c.block_table[1, 0]) == page
    with pytest.raises(ValueError, match="past the cache"):
        c.reserve([(0, 0, 17)])
    for r in range(3):
        c.release(r)
    assert c.free_pages == 5 and not any(c.refs) and list(c._idle) == [0]  # still indexed
    c.reserve([(0, 0, 16), (1, 0, 4)])  # every page: the idle indexed one is taken last
    assert c.table[1][0] == 0 and not c._prefix and not c._idle


@pytest.mark.parametrize("kwargs, match", [
    (dict(page_size=12), "page_size must be a power of two"),
    (dict(page_size=0), "page_size"),
    (dict(num_pages=0), "num_pages must be an int >= 1"),
    (dict(prefix_sharing=1), "prefix_sharing must be a bool"),
])
def test_bad_pool_arguments(tiny64, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Engine(tiny64, max_batch=2, max_seq_len=32, **kwargs)


def test_a_request_larger_than_the_pool_is_refused(tiny64):
    engine = Engine(tiny64, max_batch=2, max_seq_len=64, page_size=4, num_pages=5)
    with pytest.raises(ValueError, match="needs 6 pages of 4 tokens but the pool has "
                                         "num_pages=5"):
        engine.submit(list(range(18)), 4)  # writes positions 0..20
    assert engine.idle and engine.pages_in_use == 0
    engine.submit(list(range(17)), 4)  # positions 0..19: exactly the pool (the last token
    # is never written)
    assert len(list(engine.run())) == 4
    _assert_empty(engine)


@pytest.fixture(scope="module")
def tiny_triton():
    return LlamaD3.random("tiny", dtype=torch.float32, seed=11, device=DEVICE, backend="triton")


def test_triton_engine_on_a_short_pool_equals_alone(tiny_triton):
    """The triton backend under the same pressure (interpreter: few requests): the first
    three requests grow to 2 + 5 + 3 pages, more than the pool's 8, so preemption, recompute
    and a shared prefix all happen, and every request keeps its solo tokens."""
    rng = random.Random(9)
    prefix = [rng.randrange(512) for _ in range(12)]
    engine = Engine(tiny_triton, max_batch=3, max_seq_len=24, page_size=4, num_pages=8,
                    stop_tokens=())
    reqs = [engine.submit((prefix if k % 2 else []) + [rng.randrange(512) for _ in range(2 + k)],
                          6, SCHEDULES[k % 4]) for k in range(4)]
    list(engine.run())
    _assert_empty(engine)
    assert engine.stats.preemptions > 0 and engine.stats.shared_prefix_tokens > 0
    for req in reqs:
        assert req.tokens == _alone(tiny_triton, req, "propagate", None).tokens[0], req.id


def test_a_static_cache_does_not_share(tiny64):
    """Rows of a static cache own their pages (the torch backend reads them as one strided
    view): sharing pages into them is refused."""
    c = KVCache(tiny64.config, 2, 16, torch.float64, torch.device("cpu"), page_size=4)
    assert c.static and c.block_table.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    c.index_prefix(0, list(range(8)))
    with pytest.raises(ValueError, match="static cache"):
        c.share_prefix(1, list(range(9)))
    assert c.block_table.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and c.refs == [1] * 8
