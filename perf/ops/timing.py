"""Timing shared by the per-op GPU benchmarks (perf/ops/bench_*.py).

Every measurement goes the same way: one call first, synchronized and never timed (torch.compile
compiles, Triton autotunes), then one CUDA-event-timed call to size a round at ``ROUND_SECONDS``
(1 to ``MAX_CALLS`` calls), then ``WARMUP_ROUNDS`` untimed and ``ROUNDS`` timed rounds, each
running the op ``calls`` times and synchronizing once, so launch and sync overheads are spread
over the round. The median round over ``calls`` is the time per call. ``measure`` records the
rounds through pytest-benchmark's ``benchmark.pedantic`` (the table's times are per round) and
fills ``benchmark.extra_info`` with the per-call figures and ``kernel_launches``, the launches of
one call as ``d3kernels.ops._launches.count_launches`` counts them (Triton kernels and aten ops;
the launch-budget tests count the same way). perf/ops/summary.py makes one table of the JSON,
with each shape's speedups.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from d3kernels.ops._launches import count_launches

ROUNDS, WARMUP_ROUNDS = 20, 3
ROUND_SECONDS, MAX_CALLS = 2e-3, 200
# The name every benchmark gives its d3kernels implementation (extra_info["impl"]).
OURS = "d3kernels"


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
    """Time fn through ``benchmark.pedantic``, record ``calls``, ``kernel_launches`` and
    ``record_rates`` in extra_info, return the median seconds per call. Launches are not counted
    for ``extra_info["impl"] == "compile"``: the counter sees Triton's JITFunction launches and
    eager aten ops, not the kernels of a torch.compile'd graph. Under --benchmark-disable (a
    warm-up pass: no stats, no count) the one timed sizing call stands in."""
    run, calls, one_call = _prepare(fn)
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    if benchmark.stats is None:
        return one_call
    per_call = benchmark.stats.stats.median / calls
    benchmark.extra_info["calls"] = calls
    if benchmark.extra_info.get("impl") != "compile":
        with count_launches() as launches:
            fn()
        torch.cuda.synchronize()
        benchmark.extra_info["kernel_launches"] = sum(launches.values())
    record_rates(benchmark, per_call, nbytes=nbytes, flops=flops, copy_gbps=copy_gbps)
    return per_call
