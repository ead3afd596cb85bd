"""The work ratio's byte count (design.md §8) against one written out here from the config:
weights once per step, each row's KV over its own context once per layer it runs (issue 9 §1:
the count used to multiply the KV read by the batch twice)."""
import pytest
import torch

import reference
from d3kernels import DepthSchedule, Engine, LlamaD3

S = DepthSchedule(alpha=0.8, head=1, tail=1)


@pytest.fixture(scope="module")
def tiny64():
    return LlamaD3.random("tiny", dtype=torch.float64, seed=5)


def expected_bytes(cfg, elem: int, steps) -> int:
    """steps: per decode step, (layers whose weights it reads, [(context, depth) per row])."""
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layer = 2 * H + H * q + 2 * H * kv + q * H + 3 * H * I  # 2 norms, Q K V O, gate up down
    total = 0
    for layers, rows in steps:
        total += layers * layer + V * H + H  # the layers run, LM head, final norm
        total += len(rows) * H  # each row's embedding
        total += sum(depth * 2 * kv * context for context, depth in rows)  # K and V per layer
    return total * elem


@pytest.mark.parametrize("lengths", [[7], [6, 6, 6], [3, 17, 9]], ids=["b1", "b3", "ragged"])
def test_generate_counts_each_row_its_own_context(tiny64, lengths):
    cfg, L, n = tiny64.config, tiny64.config.num_layers, 12
    g = torch.Generator().manual_seed(len(lengths))
    prompts = [torch.randint(0, cfg.vocab_size, (k,), generator=g).tolist() for k in lengths]
    out = tiny64.generate(prompts, n, S, stop_tokens=())
    depths = out.depths[0][1:]  # step i's depth, the same for every row
    assert min(depths) < L
    # step i reads T_{i-1} at slot len + i - 1: each row attends to len + i entries
    full = expected_bytes(cfg, 8, [(L, [(k + i, L) for k in lengths]) for i in range(1, n)])
    d3 = expected_bytes(cfg, 8, [(d, [(k + i, d) for k in lengths])
                                 for i, d in enumerate(depths, start=1)])
    st = out.stats
    assert st.full_bytes == pytest.approx(full, rel=0.01)
    assert st.d3_bytes == pytest.approx(d3, rel=0.01)
    assert st.work_ratio == pytest.approx(full / d3, rel=0.01)


def test_engine_counts_the_union_of_layers_and_each_rows_own_kv(tiny64):
    """Two requests admitted together, skipping from opposite ends (so the union of their kept
    layers exceeds either), one leaving early: weights of the union, KV per row and depth."""
    cfg, L = tiny64.config, tiny64.config.num_layers
    upper = DepthSchedule(alpha=0.8, head=1, tail=1, order="upper")
    engine = Engine(tiny64, max_batch=2, max_seq_len=24, stop_tokens=())
    a = engine.submit([1, 2, 3, 4, 5], 8, S)
    b = engine.submit([6, 7, 8, 9, 10], 5, upper)
    list(engine.run())

    def kept(req, i):
        s = req.schedule
        return set(reference.kept_layers(req.depths[i], L, s.head, s.tail, s.order))

    steps = []
    for i in range(1, 8):  # decode step i makes token i of every request still running
        running = [r for r in (a, b) if i < r.max_new_tokens]
        union = set().union(*(kept(r, i) for r in running))
        steps.append((len(union), [(5 + i, r.depths[i]) for r in running]))
    assert any(layers > max(d for _, d in rows) for layers, rows in steps)
    full = expected_bytes(cfg, 8, [(L, [(c, L) for c, _ in rows]) for _, rows in steps])
    assert engine.stats.full_bytes == pytest.approx(full, rel=0.01)
    assert engine.stats.run_bytes == pytest.approx(expected_bytes(cfg, 8, steps), rel=0.01)
    assert 1 < engine.stats.work_ratio < engine.stats.layer_ratio
    # a request alone counts what generate counts
    solo = Engine(tiny64, max_batch=1, max_seq_len=24, stop_tokens=())
    solo.submit([1, 2, 3, 4, 5], 8, S)
    list(solo.run())
    alone = tiny64.generate([1, 2, 3, 4, 5], 8, S, stop_tokens=()).stats
    assert (solo.stats.full_bytes, solo.stats.run_bytes) == (alone.full_bytes, alone.d3_bytes)
