"""A bounded load test of ``d3kernels serve``: N chat requests at several concurrencies, full
depth vs D³ (continuous admission and waves), through the HTTP API as clients see it.

    .venv/bin/python -m perf.serve_bench                       # SmolLM2, 64 requests, c = 1 4 8
    .venv/bin/python -m perf.serve_bench --requests 16 --concurrency 1 8 --out perf/out/serve

For each server setting (full depth; D³ with --alpha, admitted continuously; D³ admitted in
waves of --max-batch) and each concurrency c, c clients send the prompts of the shipped set
(cycled) one after another, streaming. Per request: time to first token (submit -> first text
chunk) and per-token latency ((end - first chunk) / (tokens - 1)); per run: throughput (tokens
generated / wall time), medians and p95s. Every request runs to ``--max-tokens`` or the model's
end of turn (the same prompts, so the settings see comparable work; the token counts are
reported). Each run is bounded by --timeout seconds. Writes serve_bench.json and a markdown
table (serve_bench.md) under --out and prints the table.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx
import torch

from d3kernels import DepthSchedule, LlamaD3
from d3kernels.eval import load_prompts
from d3kernels.serve import BackgroundServer, create_app


def _p95(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, int(0.95 * len(xs)))]


async def _client(url: str, name: str, prompts: list[str], next_i: list[int], n: int,
                  max_tokens: int, out: list[dict]) -> None:
    async with httpx.AsyncClient(timeout=600) as http:
        while next_i[0] < n:
            i = next_i[0]
            next_i[0] += 1
            body = {"model": name, "messages": [{"role": "user", "content": prompts[i % len(
                prompts)]}], "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            t0 = time.perf_counter()
            first, tokens = None, 0
            async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    data = json.loads(line[6:])
                    if first is None and data["choices"] and data["choices"][0]["delta"].get(
                            "content"):
                        first = time.perf_counter()
                    if data.get("usage"):
                        tokens = data["usage"]["completion_tokens"]
            end = time.perf_counter()
            first = end if first is None else first
            out.append({"ttft": first - t0, "tokens": tokens, "seconds": end - t0,
                        "per_token": (end - first) / (tokens - 1) if tokens > 1 else None})


def bench_one(url: str, name: str, prompts: list[str], n: int, concurrency: int,
              max_tokens: int, timeout: float) -> dict:
    """n requests from ``concurrency`` clients; the figures of design.md §8's serving view."""
    done: list[dict] = []

    async def main():
        next_i = [0]
        await asyncio.wait_for(asyncio.gather(*(
            _client(url, name, prompts, next_i, n, max_tokens, done)
            for _ in range(concurrency))), timeout)

    t0 = time.perf_counter()
    asyncio.run(main())
    wall = time.perf_counter() - t0
    ttft = [d["ttft"] for d in done]
    per_token = [d["per_token"] for d in done if d["per_token"] is not None]
    tokens = sum(d["tokens"] for d in done)
    return {"concurrency": concurrency, "requests": len(done), "tokens": tokens,
            "seconds": wall, "tokens_per_s": tokens / wall,
            "ttft_median_s": statistics.median(ttft), "ttft_p95_s": _p95(ttft),
            "per_token_median_s": statistics.median(per_token) if per_token else None,
            "per_token_p95_s": _p95(per_token) if per_token else None}


def settings(alpha: float, max_batch: int) -> list[tuple[str, DepthSchedule | None, int]]:
    d3 = DepthSchedule(alpha=alpha, head=4, tail=2, order="lower")
    return [("full depth", None, 1), (f"D³ α {alpha}", d3, 1),
            (f"D³ α {alpha} waves", d3, max_batch)]


def run(model, name: str, prompts: list[str], requests: int, concurrencies: list[int],
        max_tokens: int, alpha: float, max_batch: int, max_seq_len: int,
        timeout: float) -> list[dict]:
    rows = []
    for label, schedule, min_free in settings(alpha, max_batch):
        app = create_app(model, model_name=name, max_batch=max_batch, max_seq_len=max_seq_len,
                         schedule=schedule, min_free=min_free, max_queue=requests)
        with BackgroundServer(app) as server:
            # warm-up: first calls pay one-time costs (allocations, lazy inits)
            bench_one(server.url, name, prompts, 2, 2, 4, timeout)
            for c in concurrencies:
                row = {"setting": label, "min_free": min_free,
                       **bench_one(server.url, name, prompts, requests, c, max_tokens, timeout)}
                print(f"  {label:22s} c={c}: {row['tokens_per_s']:.1f} tok/s", file=sys.stderr,
                      flush=True)
                rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    def ms(x):
        return "—" if x is None else f"{1000 * x:.0f}"

    out = ["| setting | c | requests | tokens | tok/s | TTFT median / p95 (ms) | per-token "
           "median / p95 (ms) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['setting']} | {r['concurrency']} | {r['requests']} | {r['tokens']} | "
                   f"{r['tokens_per_s']:.1f} | {ms(r['ttft_median_s'])} / {ms(r['ttft_p95_s'])} "
                   f"| {ms(r['per_token_median_s'])} / {ms(r['per_token_p95_s'])} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="perf.serve_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--quantize", default="none", choices=["none", "auto"],
                   help="none: float weights in --dtype; auto: the checkpoint's own format")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--alpha", type=float, default=0.98)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--timeout", type=float, default=600, help="seconds per run, at most")
    p.add_argument("--out", default="perf/out/serve")
    args = p.parse_args(argv)
    if args.requests < 1 or min(args.concurrency) < 1 or args.max_tokens < 2:
        p.error("--requests and --concurrency must be >= 1, --max-tokens >= 2")
    load_before = os.getloadavg()  # a shared machine's other work shows in every figure
    model = LlamaD3.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                    quantize=None if args.quantize == "none" else "auto")
    rows = run(model, Path(str(args.model)).name, load_prompts(None), args.requests,
               args.concurrency, args.max_tokens, args.alpha, args.max_batch,
               args.max_seq_len, args.timeout)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "dtype": args.dtype, "quantize": args.quantize,
            "max_tokens": args.max_tokens, "max_batch": args.max_batch,
            "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "load_average_before": load_before, "load_average_after": os.getloadavg()}
    (out / "serve_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / "serve_bench.md").write_text(table(rows) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
