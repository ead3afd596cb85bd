"""Timing shared by the per-op GPU benchmarks (perf/ops/bench_*.py).

Every measurement goes the same way: one call first, synchronized and never timed (torch.compile
compiles, Triton autotunes), then one CUDA-event-timed call to size a round at ``ROUND_SECONDS``
(1 to ``MAX_CALLS`` calls), then ``WARMUP_ROUNDS`` untimed and ``ROUNDS`` timed rounds, each
running the op ``calls`` times and synchronizing once, so launch and sync overheads are spread
over the round. The median round over ``calls`` is the time per call. ``measure`` records the
rounds through pytest-benchmark's ``benchmark.pedantic`` (the table's times are per round) and
fills ``benchmark.extra_info`` with the per-call figures and ``kernel_launches``, the GPU kernels
one call launches, counted by ``count_launches`` (the one place launches are counted).
perf/ops/summary.py makes one table of the JSON, with each shape's speedups.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

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


def count_launches(fn: Callable[[], object]) -> int:
    """GPU kernels one call of fn launches: torch.profiler's CUDA kernel events, whoever launched
    them (Triton, cuBLAS, inductor); memory copies and sets are not kernels. Call fn once before,
    so compilation and autotuning launch nothing here."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
               for e in prof.events())


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
    ``record_rates`` in extra_info, return the median seconds per call. Under
    --benchmark-disable (a warm-up pass: no stats, launches not counted) the one timed sizing
    call stands in."""
    run, calls, one_call = _prepare(fn)
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    if benchmark.stats is None:
        return one_call
    per_call = benchmark.stats.stats.median / calls
    benchmark.extra_info["calls"] = calls
    try:
        benchmark.extra_info["kernel_launches"] = count_launches(fn)
    except RuntimeError as exc:  # a profiler that fails must not cost the timing
        benchmark.extra_info["kernel_launches_error"] = repr(exc)
    record_rates(benchmark, per_call, nbytes=nbytes, flops=flops, copy_gbps=copy_gbps)
    return per_call
