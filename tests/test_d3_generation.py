"""D³ generation with the KV cache against the masked-recompute oracle, token for token."""
import pytest
import torch

import reference
from d3kernels import DepthSchedule, LlamaD3, StreamedToken

SCHEDULES = [  # (alpha, start, min_depth, head, tail)
    (0.8, 0, None, 2, 1),
    (0.9, 3, None, 1, 2),
    (0.6, 1, 5, 2, 2),
    (0.97, 0, None, 0, 0),
]
# Every schedule with each built-in order, and explicit orders for two of the (head, tail) pairs.
CASES = [(params, order) for params in SCHEDULES for order in ("lower", "upper")] + [
    (SCHEDULES[0], (5, 2, 6, 3, 4)),
    (SCHEDULES[2], (4, 2, 5, 3)),
]


@pytest.fixture(scope="module")
def tiny64():
    return LlamaD3.random("tiny", dtype=torch.float64, seed=7)


def oracle(model, prompt, n, s: DepthSchedule):
    weights = {k: v.double().cpu() for k, v in model.state_dict().items()}  # oracle on the CPU
    order = s.order if isinstance(s.order, str) else list(s.order)
    return reference.d3_generate(weights, model.config, prompt, n, alpha=s.alpha, start=s.start,
                                 min_depth=s.min_depth, head=s.head, tail=s.tail, order=order)


@pytest.mark.parametrize("params, order", CASES, ids=str)
def test_tiny_matches_oracle(tiny64, params, order):
    alpha, start, min_depth, head, tail = params
    s = DepthSchedule(alpha=alpha, start=start, min_depth=min_depth, head=head, tail=tail,
                      order=order)
    prompt = torch.randint(0, tiny64.config.vocab_size, (11,)).tolist()
    out = tiny64.generate(prompt, 14, s, stop_tokens=())
    tokens, depths = oracle(tiny64, prompt, 14, s)
    assert out.depths[0] == depths
    assert min(depths) < tiny64.config.num_layers  # the schedule really skipped layers
    assert out.tokens[0] == tokens


def test_alpha_one_is_full_depth_greedy(tiny64):
    prompt = torch.randint(0, tiny64.config.vocab_size, (6,)).tolist()
    full = tiny64.generate(prompt, 10, DepthSchedule(alpha=1.0), stop_tokens=())
    default = tiny64.generate(prompt, 10, None, stop_tokens=())
    assert full.tokens == default.tokens and full.depths[0] == [8] * 10
    seq = list(prompt)  # greedy from full recompute, no cache at all
    for _ in range(10):
        seq.append(int(tiny64.logits([seq])[0, -1].argmax()))
    assert full.tokens[0] == seq[len(prompt):]
    assert full.stats.layer_ratio == 1.0 and full.stats.work_ratio == 1.0


@pytest.mark.parametrize("schedule", [None, DepthSchedule(alpha=0.8, head=2, tail=1)],
                         ids=["full", "d3"])
def test_batch_of_different_lengths_equals_alone(tiny64, schedule):
    prompts = [torch.randint(0, tiny64.config.vocab_size, (n,)).tolist() for n in (3, 17, 1, 9)]
    batch = tiny64.generate(prompts, 12, schedule, stop_tokens=())
    for prompt, tokens, depths in zip(prompts, batch.tokens, batch.depths):
        alone = tiny64.generate(prompt, 12, schedule, stop_tokens=())
        assert alone.tokens[0] == tokens and alone.depths[0] == depths


def test_rows_stop_at_their_own_stop_token(tiny64):
    prompts = [torch.randint(0, tiny64.config.vocab_size, (n,)).tolist() for n in (4, 7)]
    free = tiny64.generate(prompts, 10, stop_tokens=())
    stop = free.tokens[0][3]  # row 0 stops on its 4th token; row 1 maybe never
    out = tiny64.generate(prompts, 10, stop_tokens=[stop])
    for row in range(2):
        expected = free.tokens[row]
        if stop in expected:
            expected = expected[:expected.index(stop) + 1]
        assert out.tokens[row] == expected
    assert len(out.tokens[0]) <= 4


def test_stop_token_on_the_first_step_ends_only_that_row(tiny64):
    s = DepthSchedule(alpha=0.8, head=2, tail=1)
    prompts = [torch.randint(0, tiny64.config.vocab_size, (n,)).tolist() for n in (6, 9, 2)]
    free = tiny64.generate(prompts, 10, s, stop_tokens=())
    stop = free.tokens[1][0]  # row 1's prefill token
    out = tiny64.generate(prompts, 10, s, stop_tokens=[stop])
    assert out.tokens[1] == [stop] and out.depths[1] == [tiny64.config.num_layers]
    for row in (0, 2):
        alone = tiny64.generate(prompts[row], 10, s, stop_tokens=[stop])
        assert out.tokens[row] == alone.tokens[0] and out.depths[row] == alone.depths[0]
    assert out.stats.decode_tokens == sum(len(t) - 1 for t in out.tokens)


@pytest.mark.parametrize("lookahead", [False, True], ids=["read-first", "lookahead"])
@pytest.mark.parametrize("timing", ["eager", "deferred"])
def test_cancelled_stream_leaves_the_model_usable(tiny64, timing, lookahead):
    s = DepthSchedule(alpha=0.8, head=2, tail=1)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    kw = dict(stop_tokens=(), backfill_timing=timing, _lookahead=lookahead)
    expected = tiny64.generate(prompts, 12, s, **kw)
    stream = tiny64.stream(prompts, 12, s, **kw)
    first = [next(stream) for _ in range(8)]  # four steps of two rows
    stream.close()
    assert stream.output is None and next(stream, None) is None
    assert [e.token for e in first if e.row == 0] == expected.tokens[0][:4]
    again = tiny64.generate(prompts, 12, s, **kw)
    assert again.tokens == expected.tokens and again.depths == expected.depths


STOP_CASES = {  # which of the free run's tokens stop generation: (row, index) pairs
    "no stop": (),
    "one row stops": ((0, 3),),
    "every row stops early": ((0, 2), (1, 5), (2, 4)),  # the step past the last is discarded
    "every row stops on T_0": ((0, 0), (1, 0), (2, 0)),
}


@pytest.mark.parametrize("case", STOP_CASES)
def test_lookahead_changes_nothing_but_timing(tiny64, case):
    """The decode loop one step ahead (the default on CUDA; forced here on the CPU) gives the
    same tokens, depths, stream order and counted stats as reading each step first, also when
    the step it enqueued past the last stop is discarded."""
    s = DepthSchedule(alpha=0.8, head=2, tail=1)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [2, 7, 1, 8]]
    free = tiny64.generate(prompts, 10, s, stop_tokens=())
    stops = {free.tokens[r][k] for r, k in STOP_CASES[case]}
    runs = []
    for lookahead in (False, True):
        stream = tiny64.stream(prompts, 10, s, stop_tokens=stops, backfill_timing="eager",
                               _lookahead=lookahead)
        runs.append((list(stream), stream.output))
    (events, out), (events_ahead, out_ahead) = runs
    assert events_ahead == events
    assert (out_ahead.tokens, out_ahead.depths) == (out.tokens, out.depths)
    fields = ("prefill_tokens", "decode_tokens", "decode_steps", "layers_run", "full_bytes",
              "d3_bytes", "backfill_bytes")
    assert [getattr(out_ahead.stats, f) for f in fields] == [getattr(out.stats, f)
                                                            for f in fields]
    if case.startswith("every"):
        assert max(map(len, out.tokens)) < 10  # all stopped early: one step was discarded
    assert out.stats.decode_steps == max(map(len, out.tokens)) - 1


def test_lookahead_undoes_the_discarded_steps_draw(tiny64):
    """A sampler that outlives the call (a chat's) is left as if the discarded step never
    ran, so the next call draws what it would have drawn."""
    from d3kernels.generation import _plan, _run

    s = DepthSchedule(alpha=0.8, head=2, tail=1)
    free = tiny64.generate([5, 6, 7], 10, s, temperature=1.0, seed=3, stop_tokens=())
    stop = [free.tokens[0][3]]

    def two_calls(lookahead):
        plan = _plan(tiny64, [5, 6, 7], 10, s, 1.0, None, None, 3, stop)
        outs = []
        for _ in range(2):  # one sampler through both, as in Conversation
            run = _run(tiny64, plan, lookahead)
            try:
                while True:
                    next(run)
            except StopIteration as done:
                outs.append(done.value.tokens)
        return outs, plan.sampling.generator.get_state()

    (first, _), state = want = two_calls(False)
    assert len(first[0]) < 10  # stopped early: with the lookahead a step is discarded
    got = two_calls(True)
    assert got[0] == want[0] and torch.equal(got[1], state)


def test_streaming_callback_and_iterator(tiny64):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    s = DepthSchedule(alpha=0.8, head=2, tail=1)
    seen: list[StreamedToken] = []
    out = tiny64.generate(prompts, 6, s, stream=seen.append, stop_tokens=())
    stream = tiny64.stream(prompts, 6, s, stop_tokens=())
    events = list(stream)
    assert events == seen and len(events) == 12
    assert stream.output.tokens == out.tokens
    for row in range(2):
        assert [e.token for e in events if e.row == row] == out.tokens[row]
        assert [e.depth for e in events if e.row == row] == out.depths[row]


def test_sampling_is_seeded_and_respects_top_k(tiny64):
    prompt = [5, 6, 7]
    a = tiny64.generate(prompt, 12, temperature=1.0, seed=123, stop_tokens=())
    b = tiny64.generate(prompt, 12, temperature=1.0, seed=123, stop_tokens=())
    c = tiny64.generate(prompt, 12, temperature=1.0, seed=124, stop_tokens=())
    assert a.tokens == b.tokens and a.tokens != c.tokens
    greedy = tiny64.generate(prompt, 12, stop_tokens=())
    top1 = tiny64.generate(prompt, 12, temperature=0.7, top_k=1, seed=1, stop_tokens=())
    assert top1.tokens == greedy.tokens
    nucleus = tiny64.generate(prompt, 12, temperature=0.7, top_p=1e-6, seed=1, stop_tokens=())
    assert nucleus.tokens == greedy.tokens


def test_stats(tiny64):
    s = DepthSchedule(alpha=0.8, head=2, tail=1)
    out = tiny64.generate([[1, 2, 3, 4]], 20, s, stop_tokens=())
    st = out.stats
    assert st.decode_steps == 19 and st.decode_tokens == 19 and st.prefill_tokens == 4
    assert st.layers_run == sum(out.depths[0][1:])
    assert st.layer_ratio == pytest.approx(8 * 19 / st.layers_run)
    assert 1 < st.work_ratio < st.layer_ratio  # the LM head is read at every depth
    assert st.decode_tokens_per_s > 0 and st.prefill_tokens_per_s > 0


@pytest.mark.parametrize("order", ["lower", "upper"])
def test_smollm2_matches_oracle(smollm2_f64, smollm2_tokenizer, order):
    prompt = smollm2_tokenizer.encode_chat([{"role": "user", "content": "Name three colors."}])
    s = DepthSchedule(alpha=0.9, head=4, tail=2, order=order)
    out = smollm2_f64.generate(prompt, 10, s, stop_tokens=())
    tokens, depths = oracle(smollm2_f64, prompt, 10, s)
    assert out.depths[0] == depths and depths[-1] < 30
    assert out.tokens[0] == tokens
