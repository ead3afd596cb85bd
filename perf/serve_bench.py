"""A bounded load test of ``d3kernels serve``: N chat requests at several concurrencies, full
depth vs D³ (continuous admission and waves), through the HTTP API as clients see it.

    .venv/bin/python -m perf.serve_bench                       # SmolLM2, 64 requests, c = 1 4 8
    .venv/bin/python -m perf.serve_bench --requests 16 --concurrency 1 8 --out perf/out/serve

For each server setting (full depth; D³ with --alpha, admitted continuously; D³ admitted in
waves of --max-batch), a ``d3kernels serve`` process of its own; at each concurrency c, c clients send the prompts of the shipped set
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
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from d3kernels.eval import load_prompts


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


def settings(alpha: float, max_batch: int) -> list[tuple[str, list[str]]]:
    """Each server setting and its ``d3kernels serve`` options."""
    d3 = ["--alpha", str(alpha), "--head", "4", "--tail", "2", "--order", "lower"]
    return [("full depth", ["--full-depth"]), (f"D³ α {alpha}", d3),
            (f"D³ α {alpha} waves", d3 + ["--min-free", str(max_batch)])]


class ServerProcess:
    """``d3kernels serve`` in its own process on a free 127.0.0.1 port (the clients' JSON and
    SSE work stays out of its GIL), stopped with SIGTERM on exit."""

    def __init__(self, options: list[str], startup_timeout: float = 300):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.cmd = [sys.executable, "-m", "d3kernels", "serve", "--port", str(port), *options]
        self.startup_timeout = startup_timeout

    def __enter__(self) -> "ServerProcess":
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stderr.read()}")
            if time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"the server did not start in {self.startup_timeout} s")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def run(url: str, name: str, label: str, prompts: list[str], requests: int,
        concurrencies: list[int], max_tokens: int, timeout: float) -> list[dict]:
    """One server setting at each concurrency, after a warm-up (first calls pay one-time
    costs: allocations, lazy inits)."""
    bench_one(url, name, prompts, 2, 2, 4, timeout)
    rows = []
    for c in concurrencies:
        rows.append({"setting": label, **bench_one(url, name, prompts, requests, c, max_tokens,
                                                    timeout)})
        print(f"  {label:22s} c={c}: {rows[-1]['tokens_per_s']:.1f} tok/s", file=sys.stderr,
              flush=True)
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
    p.add_argument("--quantize", default="none", choices=["none", "auto", "int8", "int4"],
                   help="as in d3kernels serve (default: float weights in --dtype)")
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
    name = "bench"
    common = ["--model", args.model, "--dtype", args.dtype, "--quantize", args.quantize,
              "--max-batch", str(args.max_batch), "--max-seq-len", str(args.max_seq_len),
              "--max-queue", str(args.requests), "--served-name", name]
    rows = []
    for label, options in settings(args.alpha, args.max_batch):
        with ServerProcess(common + options) as server:
            rows += run(server.url, name, label, load_prompts(None), args.requests,
                        args.concurrency, args.max_tokens, args.timeout)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "dtype": args.dtype, "quantize": args.quantize,
            "max_tokens": args.max_tokens, "max_batch": args.max_batch,
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "load_average_before": load_before, "load_average_after": os.getloadavg()}
    (out / "serve_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / "serve_bench.md").write_text(table(rows) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
