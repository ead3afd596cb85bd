"""Timing shared by the per-op GPU benchmarks (perf/ops/bench_*.py).

Every measurement goes the same way: one call first, synchronized and never timed (torch.compile
compiles, Triton autotunes), then one CUDA-event-timed call to size a round at ``ROUND_SECONDS``
(1 to ``MAX_CALLS`` calls), then ``WARMUP_ROUNDS`` untimed and ``ROUNDS`` timed rounds, each
running the op ``calls`` times and synchronizing once, so launch and sync overheads are spread
over the round. The median round over ``calls`` is the time per call. ``measure`` records the
rounds through pytest-benchmark's ``benchmark.pedantic`` (the table's times are per round) and
fills ``benchmark.extra_info`` with the per-call figures; ``seconds_per_call`` times another
implementation the same way outside the table, for speedups.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping, Optional

import torch

ROUNDS, WARMUP_ROUNDS = 20, 3
ROUND_SECONDS, MAX_CALLS = 2e-3, 200


def _prepare(fn: Callable[[], object]) -> tuple[Callable[[], None], int, float]:
    """Warm up fn, then size a round: (round, calls per round, seconds of one timed call)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    one_ms = max(start.elapsed_time(end), 1e-3)
    calls = max(1, min(MAX_CALLS, int(ROUND_SECONDS * 1e3 / one_ms)))

    def run() -> None:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()

    return run, calls, one_ms / 1e3


def seconds_per_call(fn: Callable[[], object]) -> float:
    """Median seconds per call of fn, timed as ``measure`` does but not recorded."""
    run, calls, _ = _prepare(fn)
    for _ in range(WARMUP_ROUNDS):
        run()
    times = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / calls


def record_rates(benchmark, per_call: float, *, nbytes: Optional[int] = None,
                 flops: Optional[int] = None, copy_gbps: Optional[float] = None) -> None:
    """extra_info: ``us`` per call; with nbytes, ``GBps`` and (with copy_gbps) ``bw_fraction`` of
    the copy bandwidth and ``copy_GBps``; with flops, ``TFLOPs``."""
    info = {"us": per_call * 1e6}
    if nbytes is not None:
        gbps = nbytes / per_call / 1e9
        info["GBps"] = gbps
        if copy_gbps is not None:
            info.update(bw_fraction=gbps / copy_gbps, copy_GBps=copy_gbps)
    if flops is not None:
        info["TFLOPs"] = flops / per_call / 1e12
    benchmark.extra_info.update(info)


def measure(benchmark, fn: Callable[[], object], *, nbytes: Optional[int] = None,
            flops: Optional[int] = None, copy_gbps: Optional[float] = None) -> float:
    """Time fn through ``benchmark.pedantic``, record ``calls`` and ``record_rates`` in extra_info,
    return the median seconds per call. Under --benchmark-disable (no stats) the one timed
    sizing call stands in."""
    run, calls, one_call = _prepare(fn)
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    per_call = one_call if benchmark.stats is None else benchmark.stats.stats.median / calls
    benchmark.extra_info["calls"] = calls
    record_rates(benchmark, per_call, nbytes=nbytes, flops=flops, copy_gbps=copy_gbps)
    return per_call


def record_speedups(benchmark, per_call: float, others: Mapping[str, Callable[[], object]]) -> None:
    """extra_info ``speedup_vs_<name>``: each other implementation's time per call over per_call."""
    for name, other in others.items():
        benchmark.extra_info[f"speedup_vs_{name}"] = seconds_per_call(other) / per_call
