"""Tensor parallelism (d3kernels.parallel, design.md §11) on CPU over gloo: each test spawns its
own process group (torch.multiprocessing, a deadline, every process reaped) whose ranks run the
same calls and save what they got; the parent compares it with the single-process model.

D³ tokens must equal tp=1's token for token (generate over ragged batches, propagate and mask,
seeded sampling, a 3-turn chat, the engine with mixed requests on a pool small enough to preempt
and share prefixes), the KV cache gathered from the ranks' heads must equal the single-process
cache, bad tp values must fail before any work, and a rank that raises inside a step must bring
every rank down with a clear error, quickly. Sampling
with temperature and top-k never gathers the logits, and unseeded samplers agree across ranks.
"""
from __future__ import annotations

import contextlib
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from d3kernels import DepthSchedule, Engine, LlamaD3
from d3kernels.config import LlamaConfig
from d3kernels.parallel import TensorParallel, TensorParallelError, init_gloo
from d3kernels.sampling import RowSampling, Sampling
from tests.ops.conftest import TOL, rel_err
from tests.test_calibrate import tiny64, tiny_dir  # noqa: F401 (the CLI's checkpoint)

# 12 heads over 6 KV heads (GQA 2) split by 2 and 3 ranks alike; a vocabulary of 509 splits
# unevenly (a prime), so the ranks' vocab slices differ in size.
TP_CONFIG = LlamaConfig(509, 96, 192, 6, 12, 6, 8, max_position_embeddings=128)
# one KV head: at tp=2 both ranks hold a copy of it (replicated KV heads)
MQA_CONFIG = TP_CONFIG.replace(num_kv_heads=1)
SCHED = DepthSchedule(alpha=0.8, head=1, tail=1)
UPPER = DepthSchedule(alpha=0.85, start=1, head=1, tail=2, order="upper")
PROMPTS = [[5, 17, 300, 2, 9], [44, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
TURNS = [[3, 14, 15, 92, 6], [53, 58], [97, 93, 23, 84]]
DEADLINE_S = 150


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(target, size: int, tmp_path, *args) -> list[dict]:
    """Run target(rank, size, *args) on ``size`` gloo ranks; returns what each rank saved
    (rank r's dict in tmp_path/r.pt). Kills every rank and fails past DEADLINE_S."""
    port = _port()
    ctx = mp.start_processes(_entry, args=(size, port, str(tmp_path), target, args),
                             nprocs=size, join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"tensor-parallel ranks still running after {DEADLINE_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    return [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(size)]


def _entry(rank, size, port, out, target, args):
    torch.set_num_threads(1)
    init_gloo(rank, size, f"tcp://127.0.0.1:{port}", timeout_s=60)
    result = target(rank, size, *args)
    torch.save(result, os.path.join(out, f"{rank}.pt"))
    if dist.is_initialized():
        dist.destroy_process_group()


def _model(kind: str, dtype, tp: int, gguf: str | None = None) -> LlamaD3:
    if kind == "smollm2":
        return LlamaD3.from_pretrained(gguf, dtype=dtype, quantize=None, backend="torch", tp=tp,
                                       max_seq_len=128)
    cfg = {"tp": TP_CONFIG, "mqa": MQA_CONFIG}[kind]
    return LlamaD3.random(cfg, dtype=dtype, seed=3, backend="torch", tp=tp)


def _cache(c) -> dict:
    return {"k": c.k.clone(), "v": c.v.clone(), "written": c.written.clone()}


ALL = ("logits", "mask", "sampled", "chat_propagate", "chat_mask", "engine")


@contextlib.contextmanager
def _logits_never_gathered(model: LlamaD3):
    """Under TP, any all-gather of the logits inside the block raises (and brings the ranks
    down): temperature and top-k sampling must exchange candidates only."""
    if model.tp is None:
        yield
        return

    def refuse(logits):
        raise AssertionError(f"gather_logits called with logits {list(logits.shape)}")

    model.tp.gather_logits = refuse
    try:
        yield
    finally:
        del model.tp.gather_logits


def _everything(model: LlamaD3, parts: tuple[str, ...] = ALL) -> dict:
    """What every rank (and the single-process model) computes: a ragged D³ generate and its
    flushed cache, then ``parts`` of ALL; compared key by key. Keys starting "unseeded" (tp > 1
    only) hold unseeded samplers' tokens, compared between the ranks."""
    out = {}
    if model.tp is not None:  # the ranks' own random streams differ: only an agreed seed helps
        torch.manual_seed(1000 + model.tp.rank)
    g = model.generate(PROMPTS, 10, SCHED, stop_tokens=(), flush_backfill=True)
    out["generate"], out["depths"] = g.tokens, g.depths
    out["cache"] = _cache(model.cache)
    if "logits" in parts:  # full-depth logits, all-gathered from the ranks' vocabulary slices
        out["logits"] = model.logits(PROMPTS[2])
    if "mask" in parts:
        out["mask"] = model.generate(PROMPTS, 10, UPPER, stop_tokens=(), backfill="mask").tokens
    if "sampled" in parts:
        out["sampled"] = model.generate(PROMPTS, 8, SCHED, stop_tokens=(), temperature=0.9,
                                        top_k=50, top_p=0.9, seed=11).tokens
        with _logits_never_gathered(model):
            for key, options in (("temperature", dict(temperature=0.8, seed=12)),
                                 ("top_k", dict(temperature=1.2, top_k=30, seed=13))):
                out[f"sampled_{key}"] = model.generate(PROMPTS, 6, SCHED, stop_tokens=(),
                                                       **options).tokens
            if model.tp is not None:
                out["unseeded"] = model.generate(PROMPTS, 4, SCHED, stop_tokens=(),
                                                 temperature=1.0, top_k=40).tokens
    for mode in ("propagate", "mask"):
        if f"chat_{mode}" not in parts:
            continue
        conv = model.chat(schedule=SCHED, stop_tokens=(), max_seq_len=96, backfill=mode)
        out[f"chat_{mode}"] = [conv.send_tokens(t, 8).tokens[0] for t in TURNS]
        conv.flush_backfill()
        out[f"chat_cache_{mode}"] = _cache(conv._cache)
    if "engine" not in parts:
        return out
    # a pool of 5 pages of 4: requests are preempted and recomputed, prompts share pages
    engine = Engine(model, max_batch=2, max_seq_len=48, stop_tokens=(), page_size=4,
                    num_pages=5)
    reqs = [engine.submit(p, n, s) for p, n, s in
            zip(PROMPTS + TURNS, (6, 9, 4, 7, 5, 8), (SCHED, UPPER, None) * 2)]
    reqs.append(engine.submit(PROMPTS[0], 6, SCHED, temperature=0.7, seed=5))
    reqs.append(engine.submit(TURNS[0], 7, UPPER, temperature=1.1, top_k=25, seed=6))
    unseeded = engine.submit(PROMPTS[1], 5, SCHED, temperature=1.0)
    with _logits_never_gathered(model):
        list(engine.run())
    out["engine"] = [r.tokens for r in reqs]
    stats = engine.stats
    out["engine_stats"] = (stats.preemptions, stats.recomputed_tokens, stats.shared_prefix_tokens)
    assert stats.preemptions > 0 and stats.shared_prefix_tokens > 0
    if model.tp is not None:
        out["unseeded_engine"] = unseeded.tokens
    return out


def _rank_run(rank, size, kind, dtype, gguf, parts):
    return _everything(_model(kind, dtype, size, gguf), parts)


def _smollm2_run(rank, size, gguf, parts):
    """fp64 (dequantized) with ``parts``; and the GGUF as it ships (Q4_1 layers split on block
    boundaries, Q8_0 head by rows; fp64 activations), generate only."""
    q4 = LlamaD3.from_pretrained(gguf, dtype=torch.float64, backend="torch", tp=size,
                                 max_seq_len=128)
    return {"f64": _rank_run(rank, size, "smollm2", torch.float64, gguf, parts),
            "q4": _everything(q4, ())}


def _gathered(ranks: list[dict], key: str, cache: str, kv_heads: int) -> dict:
    """The ranks' caches put back together: their KV heads side by side (dim 3 of
    [L, P, S, Hkv, D]); a head replicated on several ranks is taken once."""
    size = len(ranks)
    holders = range(size) if kv_heads >= size else range(0, size, size // kv_heads)
    out = {n: torch.cat([ranks[r][key][n] for r in holders], dim=3) for n in ("k", "v")}
    for r in range(size):  # the replicated copies and the marks agree across ranks
        assert torch.equal(ranks[r][key]["written"], ranks[0][key]["written"])
    out["written"] = ranks[0][key]["written"]
    return out


def _tol(t: torch.Tensor) -> float:
    """The relative error an all-reduce's summation order may leave (design.md §5's float32
    limit; float64's as the model tests hold it)."""
    return 1e-12 if t.dtype == torch.float64 else TOL[torch.float32]


def _compare(ranks: list[dict], single: dict, kv_heads: int) -> None:
    for key in ranks[0]:
        if key.startswith("unseeded"):
            assert all(got[key] == ranks[0][key] for got in ranks), f"{key}: ranks differ"
    for key, want in single.items():
        for r, got in enumerate(ranks):
            if key == "logits":
                assert rel_err(got[key], want) <= _tol(want), f"logits: rank {r}"
            elif not (key.endswith("cache") or key.startswith("chat_cache")):
                assert got[key] == want, f"{key}: rank {r} differs from tp=1"
        if key == "cache" or key.startswith("chat_cache"):
            got = _gathered(ranks, key, key, kv_heads)
            assert torch.equal(got["written"], want["written"]), key
            for n in ("k", "v"):
                err = rel_err(got[n], want[n])
                assert err <= _tol(want[n]), f"{key}.{n}: relative error {err:.3g}"


@pytest.mark.parametrize("size, parts", [(2, ALL), (3, ("sampled", "chat_mask", "engine"))])
def test_tiny_config_equals_tp1(size, parts, tmp_path):
    """fp64 on 2 ranks: everything (generate, mask, sampling, chat, engine, caches); on 3 (on 2
    cores, where every collective waits for a descheduled rank) a part of it."""
    ranks = _spawn(_rank_run, size, tmp_path, "tp", torch.float64, None, parts)
    single = _everything(_model("tp", torch.float64, 1), parts)
    _compare(ranks, single, TP_CONFIG.num_kv_heads)


def _fp32_and_mqa(rank, size):
    # the MQA model from whole weights: the constructor slices them (from_hf's path)
    whole = _model("mqa", torch.float64, 1).state_dict()
    mqa = LlamaD3(MQA_CONFIG, whole, dtype=torch.float64, backend="torch", tp=size)
    return {"fp32": _everything(_model("tp", torch.float32, size), ("engine",)),
            "mqa": _everything(mqa, ())}


def test_fp32_and_replicated_kv_heads(tmp_path):
    """fp32 tokens equal tp=1's too; one KV head replicated on both ranks of tp=2, the model
    built from whole weights that each rank slices."""
    ranks = _spawn(_fp32_and_mqa, 2, tmp_path)
    _compare([r["fp32"] for r in ranks],
             _everything(_model("tp", torch.float32, 1), ("engine",)), TP_CONFIG.num_kv_heads)
    _compare([r["mqa"] for r in ranks], _everything(_model("mqa", torch.float64, 1), ()), 1)


def test_smollm2_tp3_equals_tp1(smollm2_gguf_path, tmp_path):
    """SmolLM2 (9 heads, 3 KV heads) on 3 ranks, each reading its shard of the GGUF: a fp64
    ragged generate, a 3-turn chat and their caches equal the single-process model's, and so
    does a ragged generate on the GGUF's own Q4_1 blocks (the engine and the rest run on the
    tiny config: 3 ranks on 2 cores make collectives slow)."""
    parts, gguf = ("chat_propagate",), str(smollm2_gguf_path)
    ranks = _spawn(_smollm2_run, 3, tmp_path, gguf, parts)
    _compare([r["f64"] for r in ranks], _everything(_model("smollm2", torch.float64, 1, gguf),
                                                    parts), 3)
    q4 = LlamaD3.from_pretrained(gguf, dtype=torch.float64, backend="torch", max_seq_len=128)
    _compare([r["q4"] for r in ranks], _everything(q4, ()), 3)


def _sample_on_ranks(logits: torch.Tensor, sampler, size: int) -> list[torch.Tensor]:
    """TensorParallel.sample on each of ``size`` ranks' vocab slices of logits [B, V], in one
    process: a first pass collects every rank's offer (stopping at its all-gather), a second
    answers each rank's all-gather with them all. sampler() makes a freshly seeded sampler."""
    cfg = TP_CONFIG.replace(vocab_size=logits.shape[1])
    ranks = [TensorParallel(cfg, size, r) for r in range(size)]
    offers = []

    class Offered(Exception):
        pass

    def collect(t):
        offers.append(t)
        raise Offered

    for tp in ranks:
        tp.gather = collect
        with pytest.raises(Offered):
            tp.sample(logits[:, slice(*tp.vocab_range)], sampler())
        tp.gather = lambda t: torch.stack(offers)
    return [tp.sample(logits[:, slice(*tp.vocab_range)], sampler()) for tp in ranks]


@pytest.mark.parametrize("size", [2, 3])
def test_candidate_exchange_picks_tp1s_token_through_ties(size):
    """Integer logits on an uneven vocabulary of 23 tie often, at the top and at the k-th
    value: every rank's pick equals sample() on the whole logits (tp=1), for temperature,
    top-k (k = 1, past a rank's slice, >= V) and a RowSampling mixing them with greedy rows."""
    cpu = torch.device("cpu")

    def bound(t, k=None, seed=0):
        return lambda: Sampling(t, k, seed=seed).on(cpu)

    def rows(seed):
        return lambda: RowSampling([Sampling(0.8, seed=seed).on(cpu), Sampling(),
                                    Sampling(1.5, 5, seed=seed + 1).on(cpu),
                                    Sampling(0.6, 30, seed=seed + 2).on(cpu), Sampling()])

    for seed in range(12):
        logits = torch.randint(0, 4, (5, 23), generator=torch.Generator().manual_seed(seed))
        logits = logits.float()
        for sampler in (bound(0.7, None, seed), bound(1.0, 1, seed), bound(0.9, 3, seed),
                        bound(1.3, 10, seed), bound(0.5, 23, seed), rows(seed)):
            want = sampler()(logits)
            for r, got in enumerate(_sample_on_ranks(logits, sampler, size)):
                assert torch.equal(got, want), f"seed {seed}, rank {r}: {got} != {want}"


def test_an_unbound_sampler_is_refused_under_tp():
    """Each rank would draw its own noise: refused before any collective."""
    tp = TensorParallel(TP_CONFIG, 2, 0)
    logits = torch.zeros(2, tp.vocab_range[1])
    with pytest.raises(ValueError, match=r"the sampler has no generator: bind samplers with "
                                         r"Sampling.on\(model.device, model.tp\)"):
        tp.sample(logits, Sampling(0.7))
    with pytest.raises(ValueError, match=r"rows \[1\] have no generator"):
        tp.sample(logits, RowSampling([Sampling(), Sampling(0.7, top_k=3)]))


def test_tp_without_process_group_is_refused():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match=r"tp=2 needs a torch.distributed process group"):
        LlamaD3.random(TP_CONFIG, tp=2)
    with pytest.raises(ValueError, match=r"tp must be an int >= 1, got 0"):
        LlamaD3.random(TP_CONFIG, tp=0)


def _bad_tp_then_fault(rank, size):
    """Bad tp values (before any work: the group stays usable), then rank 1 raises inside its
    third decode step."""
    errors = {}
    cases = {"too_big": (TP_CONFIG, 3), "heads": (TP_CONFIG.replace(num_heads=9,
                                                                      num_kv_heads=3), 2),
             "kv_heads": (TP_CONFIG.replace(num_kv_heads=3), 2),
             "intermediate": (TP_CONFIG.replace(intermediate_size=191), 2)}
    for name, (cfg, tp) in cases.items():
        try:
            LlamaD3.random(cfg, tp=tp, backend="torch")
        except ValueError as e:
            errors[name] = str(e)
    try:  # a different checkpoint on each rank
        LlamaD3.random(TP_CONFIG, tp=2, seed=rank, backend="torch")
    except ValueError as e:
        errors["mismatch"] = str(e)
    real = dist.all_reduce, dist.all_gather_single, dist.broadcast
    dist.all_reduce = dist.all_gather_single = dist.broadcast = None  # any call would raise
    try:  # tp=1 in a process group is no TP state: not one collective
        one = LlamaD3.random(TP_CONFIG, tp=1, backend="torch")
        errors["tp1"] = (one.tp, one.generate(PROMPTS, 4, SCHED, stop_tokens=()).tokens)
    finally:
        dist.all_reduce, dist.all_gather_single, dist.broadcast = real
    model = _model("tp", torch.float64, size)
    if rank == 1:
        step = model._backend.decode_step
        calls = []

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("injected fault on rank 1")
            return step(*args, **kwargs)

        model._backend.decode_step = failing
    t0 = time.monotonic()
    try:
        model.generate(PROMPTS, 10, SCHED, stop_tokens=())
        errors["fault"] = "no error"
    except Exception as e:  # noqa: BLE001 (what each rank got is the test's subject)
        errors["fault"] = f"{type(e).__name__}: {e}"
    errors["fault_s"] = time.monotonic() - t0
    errors["group_alive"] = dist.is_initialized()
    return errors


def test_bad_tp_and_a_failing_rank(tmp_path):
    ranks = _spawn(_bad_tp_then_fault, 2, tmp_path)
    for got in ranks:
        assert "tp=3 must equal the process group's size, got a group of 2" in got["too_big"]
        assert "larger than the world size" in got["too_big"]
        assert got["heads"] == "tp=2 does not divide num_heads=9"
        assert "tp=2 and num_kv_heads=3: one must divide the other" in got["kv_heads"]
        assert got["intermediate"] == "tp=2 does not divide intermediate_size=191"
        assert "ranks [1] have a different model than rank 0" in got["mismatch"]
        assert got["fault_s"] < 30 and not got["group_alive"]
    want = LlamaD3.random(TP_CONFIG, backend="torch").generate(PROMPTS, 4, SCHED, stop_tokens=())
    assert ranks[0]["tp1"] == ranks[1]["tp1"] == (None, want.tokens)
    assert ranks[1]["fault"] == "RuntimeError: injected fault on rank 1"
    assert ranks[0]["fault"].startswith(
        f"{TensorParallelError.__name__}: rank 0 of 2: a tensor-parallel collective failed")



def test_cli_generate_under_torchrun(tiny_dir):
    """`torchrun --nproc-per-node 2 -m d3kernels generate --tp 2` on an HF directory of the tiny
    preset (test_calibrate's; each rank reads its safetensors slices): rank 0 prints the reply
    once, the same as tp=1's."""
    import subprocess
    import sys

    args = ["generate", "--model", str(tiny_dir), "--dtype", "float64", "--raw",
            "--alpha", "0.9", "--head", "1", "--tail", "1", "--max-new-tokens", "12",
            "The harbour wall"]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.run(cmd, capture_output=True, text=True, timeout=DEADLINE_S, env=env)
            for cmd in ([torchrun, "--nproc-per-node", "2", "--master-port", str(_port()), "-m",
                         "d3kernels", *args, "--tp", "2"],
                        [sys.executable, "-m", "d3kernels", *args])]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    # the reply and its depths, then a line of speeds (which differ)
    tp2, tp1 = (run.stdout.rstrip("\n").rsplit("\n", 1)[0] for run in runs)
    assert tp2 == tp1 and "-- 12 tokens | depth per token: " in tp1
    assert runs[0].stdout.count("-- 12 tokens") == 1  # printed once
    assert runs[0].stderr.count("d3kernels: loading") == 1
    assert "split over 2 ranks" in runs[0].stderr


def test_gguf_split_off_block_boundaries_is_refused(tmp_path):
    """A row-parallel split of quantized GGUF blocks must fall on a block boundary."""
    from types import SimpleNamespace

    import numpy as np
    from gguf import GGMLQuantizationType

    from d3kernels.loaders.gguf import _gguf_shard

    q41 = SimpleNamespace(shape=(64, 4), tensor_type=GGMLQuantizationType.Q4_1)  # [4, 64]
    data = np.arange(4 * 2 * 20, dtype=np.uint8).reshape(4, 40)  # 2 blocks of 20 bytes a row
    assert np.array_equal(_gguf_shard(data, (1, 32, 64), q41, "w", tmp_path), data[:, 20:])
    assert np.array_equal(_gguf_shard(data, (0, 1, 3), q41, "w", tmp_path), data[1:3])
    with pytest.raises(ValueError, match=r"w \(Q4_1, blocks of 32\) cannot be split at input "
                                         r"columns \[16, 48\) for tensor parallelism"):
        _gguf_shard(data, (1, 16, 48), q41, "w", tmp_path)
    f32 = SimpleNamespace(shape=(6, 2), tensor_type=GGMLQuantizationType.F32)
    floats = np.arange(12, dtype=np.float32).reshape(2, 6)
    assert np.array_equal(_gguf_shard(floats, (1, 2, 4), f32, "w", tmp_path), floats[:, 2:4])
