"""Multi-turn chat on one KV cache (issue 4 §2) against the oracle run over the whole conversation.

The oracle (reference.d3_generate.d3_chat) recomputes the whole conversation at every step:
each prompt at full depth, each reply token's position with the layers of its pass, each
reply's last token at full depth (the next turn's prefill runs it). The engine must give the
same tokens while prefilling only what each turn adds.
"""
import re
import subprocess
import sys

import pytest
import torch

from d3kernels import Conversation, DepthSchedule, KVCache, LlamaD3
from d3kernels.sampling import Sampling
from reference.d3_generate import d3_chat
from tests.ops.conftest import DEVICE, TOL, rel_err


@pytest.fixture(scope="module")
def tiny64():
    return LlamaD3.random("tiny", dtype=torch.float64, seed=7)


def chat_oracle(model, turns, n, s: DepthSchedule, stop_tokens=(), backfill="propagate"):
    weights = {k: v.double().cpu() for k, v in model.state_dict().items()}
    order = s.order if isinstance(s.order, str) else list(s.order)
    return d3_chat(weights, model.config, turns, n, stop_tokens=stop_tokens, alpha=s.alpha,
                   start=s.start, min_depth=s.min_depth, head=s.head, tail=s.tail, order=order,
                   backfill=backfill)


def random_turns(vocab, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


# ---- engine: a prefill that extends a cache ---------------------------------------------------

@pytest.mark.parametrize("backend_dtype", [("torch", torch.float64), ("triton", torch.float32)],
                         ids=["torch-f64", "triton-f32"])
def test_chunked_prefill_equals_one_prefill(tiny64, backend_dtype):
    """Prefilling [a | b] in two chunks (b at start = len(a)) gives the cache and next token of
    one prefill over a + b; rows of a batch may have different histories and chunk lengths."""
    backend, dtype = backend_dtype
    model = LlamaD3(tiny64.config, tiny64.state_dict(), dtype=dtype, backend=backend,
                    device=DEVICE if backend == "triton" else "cpu")
    seqs = random_turns(512, (13, 7), seed=1)
    cuts = [9, 2]
    B, n = 2, max(len(s) for s in seqs)
    one = model.new_cache(B, 32)
    ids = torch.zeros(B, n, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
    with torch.inference_mode():
        ref_next = model.prefill(ids.to(model.device), [len(s) for s in seqs], one, Sampling())
        ref_k, ref_v = one.k.clone(), one.v.clone()
        two = KVCache(model.config, B, 32, dtype, model.device)
        heads = [s[:c] for s, c in zip(seqs, cuts)]
        tails = [s[c:] for s, c in zip(seqs, cuts)]
        for part, start in ((heads, None), (tails, cuts)):
            lengths = [len(p) for p in part]
            chunk = torch.zeros(B, max(lengths), dtype=torch.long)
            for r, p in enumerate(part):
                chunk[r, :len(p)] = torch.tensor(p)
            nxt = model.prefill(chunk.to(model.device), lengths, two, Sampling(), start)
    assert nxt.tolist() == ref_next.tolist()
    tol = 1e-12 if dtype == torch.float64 else TOL[dtype]
    for r, s in enumerate(seqs):
        for got, ref in ((two.k, ref_k), (two.v, ref_v)):
            assert rel_err(two.gather_row(got, r, len(s)), one.gather_row(ref, r, len(s))) <= tol


def test_generate_continues_from_a_cache(tiny64):
    """generate(cache=, past_lengths=) equals generate over the whole sequence at full depth."""
    history, prompt = random_turns(512, (10, 4), seed=2)
    whole = tiny64.generate(history + prompt, 8, stop_tokens=())
    cache = KVCache(tiny64.config, 1, 64, tiny64.dtype, tiny64.device)
    tiny64.generate(history, 1, cache=cache, past_lengths=[0], stop_tokens=())
    out = tiny64.generate(prompt, 8, cache=cache, past_lengths=[10], stop_tokens=())
    assert out.tokens == whole.tokens and out.stats.prefill_tokens == 4
    with pytest.raises(ValueError, match="exceed the cache"):
        tiny64.generate(prompt, 60, cache=cache, past_lengths=[10])
    with pytest.raises(ValueError, match="past_lengths"):
        tiny64.generate(prompt, 8, cache=cache)


# ---- the conversation on a random tiny model (token level) ------------------------------------

SCHEDULES = [DepthSchedule(alpha=0.8, head=2, tail=1, order="lower"),
             DepthSchedule(alpha=0.7, start=1, head=1, tail=2, order="upper")]


@pytest.mark.parametrize("s", SCHEDULES, ids=["lower", "upper"])
def test_tiny_three_turns_match_oracle(tiny64, s):
    L = tiny64.config.num_layers
    turns = random_turns(512, (9, 5, 7), seed=3)
    conv = tiny64.chat(schedule=s, stop_tokens=(), max_seq_len=96)
    outs = [conv.send_tokens(t, 10) for t in turns]
    expected = chat_oracle(tiny64, turns, 10, s)
    for out, (tokens, depths) in zip(outs, expected):
        assert out.depths[0] == depths and min(depths) < L
        assert out.tokens[0] == tokens
        assert out.depths[0][0] == L  # the schedule restarts at i = 0 for each reply
    assert [o.depths[0] for o in outs] == [outs[0].depths[0]] * 3
    # The cache is reused: each turn prefills the previous reply's last token and its own ids.
    assert [t.prefill_tokens for t in conv.turns] == [9, 1 + 5, 1 + 7]
    assert [o.stats.prefill_tokens for o in outs] == [9, 6, 8]
    assert [t.cached_tokens for t in conv.turns] == [0, 9 + 9, 9 + 10 + 5 + 9]
    assert not any(t.rebuilt for t in conv.turns)
    assert conv.token_ids == turns[0] + outs[0].tokens[0] + turns[1] + outs[1].tokens[0] \
        + turns[2] + outs[2].tokens[0]
    assert conv.pending == outs[2].tokens[0][-1:] and len(conv) == len(conv.cached_ids) + 1


def test_tiny_reply_ending_on_a_stop_token(tiny64):
    """A reply that stops early leaves its stop token pending; it is prefilled next turn."""
    s = SCHEDULES[0]
    turns = random_turns(512, (6, 4, 5), seed=4)
    free = tiny64.chat(schedule=s, stop_tokens=()).send_tokens(turns[0], 10)
    stop = free.tokens[0][3]
    conv = Conversation(tiny64, schedule=s, stop_tokens=[stop], max_seq_len=96)
    outs = [conv.send_tokens(t, 10) for t in turns]
    assert outs[0].tokens[0][-1] == stop and len(outs[0].tokens[0]) <= 4
    expected = chat_oracle(tiny64, turns, 10, s, stop_tokens=(stop,))
    assert [(o.tokens[0], o.depths[0]) for o in outs] == expected
    assert conv.turns[1].prefill_tokens == 1 + 4


def test_over_capacity_leaves_the_conversation_usable(tiny64):
    s = SCHEDULES[0]
    turns = random_turns(512, (8, 6, 5), seed=5)
    conv = tiny64.chat(schedule=s, stop_tokens=(), max_seq_len=40)
    outs = [conv.send_tokens(turns[0], 8)]
    state = (list(conv.cached_ids), list(conv.pending), len(conv.turns))
    with pytest.raises(ValueError, match="exceed its cache"):  # 15 + 7 + 20 > 40
        conv.send_tokens(turns[1], 20)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        conv.send_tokens([1, 10**6], 4)
    assert (conv.cached_ids, conv.pending, len(conv.turns)) == state
    outs += [conv.send_tokens(turns[1], 8), conv.send_tokens(turns[2], 3)]
    assert len(conv) == 8 + 8 + 6 + 8 + 5 + 3 <= 40
    expected = chat_oracle(tiny64, turns, 8, s)
    assert [o.tokens[0] for o in outs[:2]] == [t for t, _ in expected[:2]]
    assert outs[2].tokens[0] == expected[2][0][:3]


def test_bad_arguments(tiny64):
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny64.chat(max_seq_len=tiny64.max_seq_len + 1)
    with pytest.raises(ValueError, match="head"):
        tiny64.chat(schedule=DepthSchedule(alpha=0.8, head=5, tail=5))
    conv = tiny64.chat()
    with pytest.raises(ValueError, match="chat template"):
        conv.send("hello")
    with pytest.raises(ValueError, match="empty"):
        conv.send_tokens([], 4)
    assert conv.turns == [] and conv.token_ids == []


# ---- the real model ---------------------------------------------------------------------------

def test_smollm2_three_turns_match_oracle(smollm2_f64):
    model = smollm2_f64
    s = DepthSchedule(alpha=0.9, head=4, tail=2, order="lower")
    conv = model.chat(schedule=s, max_seq_len=256)
    outs = [conv.send(text, 8) for text in ("Name a color.", "Another one?", "Thanks!")]
    turns = [t.new_ids for t in conv.turns]
    expected = chat_oracle(model, turns, 8, s, stop_tokens=model.tokenizer.stop_token_ids)
    assert [(o.tokens[0], o.depths[0]) for o in outs] == expected
    assert all(o.depths[0][0] == 30 for o in outs) and min(outs[0].depths[0]) < 30
    assert not any(t.rebuilt for t in conv.turns)
    # Only the new turn is prefilled: the previous reply's last token + the template's text.
    first = model.tokenizer.encode_chat(conv.messages[:1])
    assert conv.turns[0].prefill_tokens == len(first) and conv.turns[0].cached_tokens == 0
    for t in conv.turns[1:]:
        assert t.prefill_tokens == 1 + len(t.new_ids) < 20 < t.cached_tokens
    # The cache holds exactly the rendered conversation (ids may split differently).
    rendered = model.tokenizer.apply_chat_template(conv.messages, add_generation_prompt=False)
    assert rendered.startswith(model.tokenizer.decode(conv.token_ids, skip_special_tokens=False))
    assert [m["role"] for m in conv.messages] == ["user", "assistant"] * 3
    assert conv.messages[1]["content"] == outs[0].texts[0]


def test_smollm2_edited_history_falls_back_to_a_full_prefill(smollm2_f64):
    model = smollm2_f64
    s = DepthSchedule(alpha=0.9, head=4, tail=2)
    conv = model.chat(system="Be brief.", schedule=s, max_seq_len=256)
    conv.send("Hi", 4)
    conv.messages[-1]["content"] = "Hello! How can I help?"  # the cached text no longer matches
    out = conv.send("Name a fruit.", 4)
    assert conv.turns[-1].rebuilt and conv.turns[-1].cached_tokens == 0
    fresh = model.generate(model.tokenizer.encode_chat(conv.messages[:-1]), 4, s)
    assert out.tokens == fresh.tokens
    conv.send("And a vegetable?", 2)  # back to reusing the cache
    assert not conv.turns[-1].rebuilt and conv.turns[-1].cached_tokens > 0


def test_cli_chat_prefills_only_the_new_turn(smollm2_gguf_path):
    r = subprocess.run([sys.executable, "-m", "d3kernels", "chat", "--max-new-tokens", "6",
                        "--alpha", "0.9"], input="Hi there\nName a fruit\n", capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    turns = re.findall(r"-- turn (\d+): prefilled (\d+) tokens, (\d+) reused from the cache",
                       r.stderr)
    assert [t[0] for t in turns] == ["1", "2"]
    (_, first, reused1), (_, second, reused2) = turns
    assert reused1 == "0" and int(reused2) >= int(first) > int(second)
    assert r.stderr.count("layer ratio") == 2  # one stats line per reply


# ---- triton backend (Triton's interpreter on the CPU) -----------------------------------------

def test_triton_two_turns_match_oracle():
    model = LlamaD3.random("tiny", dtype=torch.float32, device=DEVICE, seed=11,
                           backend="triton")
    s = DepthSchedule(alpha=0.7, head=2, tail=1, order="upper")
    turns = random_turns(512, (6, 4), seed=6)
    conv = model.chat(schedule=s, stop_tokens=(), max_seq_len=32)
    outs = [conv.send_tokens(t, 4) for t in turns]
    expected = chat_oracle(model, turns, 4, s)
    assert [(o.tokens[0], o.depths[0]) for o in outs] == expected
    assert min(expected[0][1]) < 8
    assert conv.turns[1].prefill_tokens == 5 and conv.turns[1].cached_tokens == 9
