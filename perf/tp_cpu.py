"""The share of a decode step spent in tensor-parallel collectives, on CPU over gloo (issue 11 §4).

    python -m perf.tp_cpu [--tp 2] [--preset llama-3.2-1b] [--max-new-tokens 64] [--threads 1]

Spawns ``--tp`` gloo ranks on this machine, each holding its shard of a random-weight model of
the preset's shapes (float32, torch backend), and decodes one prompt greedily at full depth and
with D³ (α 0.98, head 4, tail 2, lower: the paper's setting), then with D³ and sampling:
temperature + top-k (the LM head exchanges k candidates per rank) and temperature + top-p (the
nucleus needs the whole distribution: the logits are all-gathered), one after the other in the
same run. Every collective a decode step makes is timed on rank 0 (wall clock around the call, so it
includes waiting for the slower rank) and its payload counted (all-reduce: the tensor; the LM
head's candidate all-gather: what this rank sends). Prints one markdown table: per decode step,
collectives, bytes, time in collectives and step time, and their ratio.
"""
from __future__ import annotations

import argparse
import socket
import time

import torch
import torch.multiprocessing as mp

from d3kernels import DepthSchedule, LlamaD3
from d3kernels.parallel import init_gloo

D3 = DepthSchedule(alpha=0.98, head=4, tail=2, order="lower")
PROMPT = list(range(1, 33))  # 32 token ids
RUNS = [("full depth", None, {}), ("D³ α 0.98", D3, {}),
        ("D³ α 0.98, T 0.8, top-k 50", D3, dict(temperature=0.8, top_k=50, seed=1)),
        ("D³ α 0.98, T 0.8, top-p 0.9", D3, dict(temperature=0.8, top_p=0.9, seed=1))]


class _Meter:
    """Wraps a model's TensorParallel._run and decode_step: collectives inside decode steps."""

    def __init__(self, model: LlamaD3):
        self.calls = self.bytes = self.steps = 0
        self.coll_s = self.step_s = 0.0
        self.decoding = False
        run, step = model.tp._run, model.decode_step

        def timed_run(op, *args, **kwargs):
            if not self.decoding:
                return run(op, *args, **kwargs)
            sent = args[-1]  # all_reduce(t) / all_gather_single(out, t)
            t0 = time.perf_counter()
            out = run(op, *args, **kwargs)
            self.coll_s += time.perf_counter() - t0
            self.calls += 1
            self.bytes += sent.numel() * sent.element_size()
            return out

        def timed_step(*args, **kwargs):
            self.decoding = True
            t0 = time.perf_counter()
            try:
                return step(*args, **kwargs)
            finally:
                self.step_s += time.perf_counter() - t0
                self.steps += 1
                self.decoding = False

        model.tp._run, model.decode_step = timed_run, timed_step


def _rank(rank: int, size: int, port: int, args, results) -> None:
    torch.set_num_threads(args.threads)
    init_gloo(rank, size, f"tcp://127.0.0.1:{port}")
    model = LlamaD3.random(args.preset, dtype=torch.float32, backend="torch", tp=size,
                           max_seq_len=256)
    model.generate([PROMPT], 4, D3, stop_tokens=())  # warm-up
    rows = []
    for name, schedule, sampling in RUNS:
        meter = _Meter(model)
        out = model.generate([PROMPT], args.max_new_tokens, schedule, stop_tokens=(), **sampling)
        n = meter.steps
        rows.append((name, sum(out.depths[0][1:]) / n, meter.calls / n, meter.bytes / n,
                     meter.coll_s / n * 1e3, meter.step_s / n * 1e3))
        del model.tp._run, model.decode_step  # back to the class's methods
    if rank == 0:
        results.put(rows)
    torch.distributed.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--preset", default="llama-3.2-1b")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_rank, args=(args.tp, port, args, results), nprocs=args.tp,
                       start_method="spawn")
    rows = results.get()
    print(f"tp={args.tp} gloo on CPU, {args.preset} shapes, float32, batch 1, prompt "
          f"{len(PROMPT)}, {args.max_new_tokens} tokens (greedy unless named), {args.threads} "
          f"thread(s) per rank; "
          f"per decode step on rank 0:\n")
    print("| run | mean depth | collectives | bytes sent | ms in collectives | ms per step "
          "| share |")
    print("|---|---|---|---|---|---|---|")
    for name, depth, calls, nbytes, coll, step in rows:
        print(f"| {name} | {depth:.1f} | {calls:.1f} | {nbytes / 1e3:.1f} kB | {coll:.2f} "
              f"| {step:.2f} | {coll / step:.0%} |")


if __name__ == "__main__":
    main()
