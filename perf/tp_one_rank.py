"""tp=1 inside a process group costs nothing (issue 11 §4): one GPU, NCCL, world size 1.

    python -m perf.tp_one_rank [--preset llama-3.2-1b] [--device cuda] [--dtype bfloat16]
        [--tokens 64] [--reps 3] [--out perf/out]

What ``torchrun --nproc-per-node 1 -m d3kernels generate ... --tp 1`` does: the same model
decodes the same prompt (greedy, full depth and D³ α 0.98 head 4 tail 2) without a process
group, then built again (the same weights) inside a one-rank group — NCCL on a GPU, gloo on a
CPU — with ``tp=1``, which makes no tensor-parallel state and so no collective. Decode time
per reply (``GenerationStats.decode_seconds``), median of --reps interleaved repetitions after
one warm-up each; the tokens must be identical. Writes tp_one_rank.md under --out and prints it.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics

import torch
import torch.distributed as dist

from d3kernels import DepthSchedule, LlamaD3
from d3kernels.config import PRESETS

D3 = DepthSchedule(alpha=0.98, head=4, tail=2, order="lower")
PROMPT = list(range(1, 33))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llama-3.2-1b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="perf/out")
    args = ap.parse_args(argv)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    alone = LlamaD3.random(args.preset, dtype=dtype, device=device, backend=args.backend,
                           max_seq_len=len(PROMPT) + args.tokens)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{_port()}", rank=0, world_size=1,
                            **({"device_id": device} if device.type == "cuda" else {}))
    try:
        grouped = LlamaD3(alone.config, alone.state_dict(), dtype=dtype, device=device,
                          backend=args.backend, max_seq_len=alone.max_seq_len, tp=1)
        assert grouped.tp is None  # tp=1: no TP state, so not one collective
        rows = []
        for name, schedule in (("full depth", None), ("D³ α 0.98", D3)):
            times = {"no process group": [], "one-rank group, tp=1": []}
            tokens = {}
            for rep in range(args.reps + 1):  # rep 0: warm-up (compile, graphs), untimed
                for label, model in zip(times, (alone, grouped)):
                    out = model.generate([PROMPT], args.tokens, schedule, stop_tokens=())
                    tokens[label] = out.tokens
                    if rep:
                        times[label].append(out.stats.decode_seconds)
            a, b = tokens.values()
            if a != b:
                raise AssertionError(f"{name}: the grouped model's tokens differ")
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"schedule": name, **{k: 1e3 * v for k, v in med.items()},
                         "ratio": med["one-rank group, tp=1"] / med["no process group"]})
    finally:
        dist.destroy_process_group()
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    lines = [f"{gpu}, {args.preset} random weights, {args.dtype}, {alone.backend} backend, "
             f"{dist.Backend.NCCL if device.type == 'cuda' else dist.Backend.GLOO} group of "
             f"one; {args.tokens} tokens, decode ms per reply, median of {args.reps}", "",
             "| schedule | no process group | one-rank group, tp=1 | ratio |",
             "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r['schedule']} | {r['no process group']:.1f} | "
              f"{r['one-rank group, tp=1']:.1f} | {r['ratio']:.3f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tp_one_rank.md"), "w") as f:
        f.write(text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
