"""Tensor parallelism on the triton backend (design.md §11): its fused kernels on each rank's
shards, Triton's interpreter on CPU, gloo between the ranks (tests/test_tensor_parallel.py's
harness). The step's collectives sit between the launches: the embedding's all-reduce
(decode_embed on the rank's vocab slice), one after O and one after down (rank 0 carries the
residual, the stash copy after the sum), and the LM head's candidate keys.

float32 (the interpreter runs no float64): tokens must equal the tp=1 triton model's token for
token — greedy (deferred and eager propagate, mask, streamed), fused Gumbel-max and top-k
sampling, which exchange only keys (gather_logits raises there), nucleus sampling on gathered
logits, a chat and the engine on a pool that preempts — and the KV cache gathered from the
ranks must equal tp=1's.
"""
from __future__ import annotations

import torch

from d3kernels import Engine, LlamaD3
from tests.test_tensor_parallel import (PROMPTS, SCHED, TP_CONFIG, TURNS, UPPER, _cache,
                                        _compare, _spawn)

MAX_LEN = 48
# the kernels take head_dim 16 and up: 4 heads over 2 KV heads, split by 2; TP_CONFIG's prime
# vocabulary (509) splits unevenly; 4 layers (the interpreter is slow): SCHED still skips 1-2
CONFIG = TP_CONFIG.replace(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                           num_layers=4)


def _model(tp: int) -> LlamaD3:
    return LlamaD3.random(CONFIG, dtype=torch.float32, seed=3, backend="triton", tp=tp,
                          max_seq_len=MAX_LEN)


def _no_gather(*args):
    raise AssertionError("the logits were gathered")


def _everything(model: LlamaD3) -> dict:
    """What every rank (and the tp=1 model) computes, compared key by key."""
    out = {}
    tp = model.tp
    if tp is not None:  # greedy and the fused draws exchange candidate keys only
        tp.gather_logits = _no_gather
    # few tokens each (the interpreter is slow); the engine's are what make it preempt
    g = model.generate(PROMPTS, 6, SCHED, stop_tokens=(), flush_backfill=True)
    out["generate"], out["depths"] = g.tokens, g.depths
    out["cache"] = _cache(model.cache)
    out["stream"] = [(e.row, e.token, e.index, e.depth)  # streaming: tokens as they come
                     for e in model.stream(PROMPTS, 4, SCHED, stop_tokens=())]
    out["eager"] = model.generate(PROMPTS, 4, SCHED, stop_tokens=(),
                                  backfill_timing="eager").tokens
    out["mask"] = model.generate(PROMPTS, 4, UPPER, stop_tokens=(), backfill="mask").tokens
    out["gumbel"] = model.generate(PROMPTS, 4, SCHED, stop_tokens=(), temperature=0.9,
                                   seed=11).tokens
    out["top_k"] = model.generate(PROMPTS, 4, SCHED, stop_tokens=(), temperature=1.5, top_k=5,
                                  seed=12).tokens
    if tp is not None:
        # unseeded: rank 0's seed, so the ranks agree with each other (not with tp=1)
        out["unseeded"] = model.generate(PROMPTS[:1], 4, SCHED, stop_tokens=(),
                                         temperature=1.5).tokens
        del tp.gather_logits  # nucleus needs the whole distribution: gathered
    out["top_p"] = model.generate(PROMPTS, 4, SCHED, stop_tokens=(), temperature=0.9,
                                  top_p=0.8, seed=13).tokens
    conv = model.chat(schedule=SCHED, stop_tokens=(), max_seq_len=MAX_LEN)
    out["chat"] = [conv.send_tokens(t, 4).tokens[0] for t in TURNS[:2]]
    # 4 pages of 4: a request is preempted and recomputed, a prompt page is shared
    engine = Engine(model, max_batch=2, max_seq_len=32, stop_tokens=(), page_size=4,
                    num_pages=4)
    reqs = [engine.submit(p, n, s) for p, n, s in
            zip(PROMPTS, (6, 5, 4), (SCHED, UPPER, None))]
    reqs.append(engine.submit(PROMPTS[0], 5, SCHED, temperature=0.7, seed=5))
    list(engine.run())
    out["engine"] = [r.tokens for r in reqs]
    stats = engine.stats
    out["engine_stats"] = (stats.preemptions, stats.recomputed_tokens, stats.shared_prefix_tokens)
    assert stats.preemptions > 0 and stats.shared_prefix_tokens > 0
    return out


def _rank_run(rank, size):
    return _everything(_model(size))


def test_triton_tp2_equals_tp1(tmp_path):
    ranks = _spawn(_rank_run, 2, tmp_path)
    assert ranks[0].pop("unseeded") == ranks[1].pop("unseeded")
    _compare(ranks, _everything(_model(1)), CONFIG.num_kv_heads)
