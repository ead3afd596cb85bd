"""Paged KV cache in the engine: memory, throughput and prefix sharing, in one run.

    python -m perf.paged_cache_bench [--model smollm2-135m-instruct] [--dtype bfloat16]
                                     [--requests 64] [--max-batch 8] [--pool-fraction 0.25]
                                     [--shared-requests 32] [--system-tokens 200] [--reps 2]
                                     [--out perf/out]

Part 1, memory: the same mixed-length requests (perf/engine_bench.py's workload) go through
``d3kernels.Engine`` with a pool that gives every row its full length (what a static cache
reserves: max_batch × max_seq_len) and with a pool of ``--pool-fraction`` of that, which
makes the engine preempt; at full depth and with a D³ schedule. Reported per run: KV bytes
reserved, KV bytes in use at the peak, preemptions and recomputed tokens, tokens/s, per-token
latency (median, p90) and time to first token (median).

Part 2, prefix sharing: ``--shared-requests`` chat prompts behind one common system prompt of
about ``--system-tokens`` tokens, with prefix sharing off and on, ``--reps`` times each,
interleaved: prefill tokens, shared tokens, time to first token (median) and tokens/s.

All requests arrive at t = 0, stop tokens off. Writes paged_cache.md and paged_cache.json
under --out.
"""
from __future__ import annotations

import argparse
import os
import random

import torch

from d3kernels import DepthSchedule, LlamaD3
from d3kernels.eval import load_prompts
from perf.engine_bench import DTYPES, run, workload
from perf.provenance import run_info, write_report


def shared_workload(model, n: int, system_tokens: int, seed: int,
                    new_tokens: tuple[int, int]) -> list[tuple[list[int], int]]:
    """n chat prompts behind one system prompt of about system_tokens tokens (the shipped
    prompts joined until long enough)."""
    rng = random.Random(seed)
    tok, texts = model.tokenizer, load_prompts()
    system = ""
    while len(tok.encode(system)) < system_tokens:
        system += texts[len(system) % len(texts)] + " "
    return [(tok.encode_chat([{"role": "system", "content": system.strip()},
                              {"role": "user", "content": texts[k % len(texts)]}]),
             rng.randint(*new_tokens)) for k in range(n)]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="(default: %(default)s)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES),
                    help="(default: %(default)s; the CPU's int4 kernel is fast in bf16)")
    ap.add_argument("--requests", type=int, default=64, help="(default: %(default)s)")
    ap.add_argument("--max-batch", type=int, default=8, help="(default: %(default)s)")
    ap.add_argument("--page-size", type=int, default=16, help="(default: %(default)s)")
    ap.add_argument("--pool-fraction", type=float, default=0.25,
                    help="the small pool, as a fraction of the full one (default: %(default)s)")
    ap.add_argument("--new-tokens", type=int, nargs=2, default=[16, 96], metavar=("MIN", "MAX"))
    ap.add_argument("--shared-requests", type=int, default=32, help="(default: %(default)s)")
    ap.add_argument("--system-tokens", type=int, default=200, help="(default: %(default)s)")
    ap.add_argument("--reps", type=int, default=2,
                    help="prefix-sharing runs of each kind, interleaved (default: %(default)s)")
    ap.add_argument("--alpha", type=float, default=0.98, help="D³ alpha (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="perf/out")
    args = ap.parse_args(argv)

    model = LlamaD3.from_pretrained(args.model, dtype=DTYPES[args.dtype], device=args.device)
    d3 = DepthSchedule(alpha=args.alpha, head=4, tail=2)
    requests = workload(model, args.requests, args.seed, tuple(args.new_tokens))
    max_seq_len = max(len(p) + n for p, n in requests)
    full_pool = args.max_batch * -(-max_seq_len // args.page_size)
    small_pool = max(-(-max_seq_len // args.page_size), int(full_pool * args.pool_fraction))
    run(model, [(p[:8], 4) for p, _ in requests[:args.max_batch]], d3, args.max_batch,
        max_seq_len)  # warm up
    result = {**run_info(model.device), "model": args.model, "dtype": args.dtype,
              "requests": args.requests, "max_batch": args.max_batch,
              "page_size": args.page_size, "max_seq_len": max_seq_len,
              "prompt_tokens": sum(len(p) for p, _ in requests), "schedule": d3.to_dict(),
              "memory": {}, "sharing": {}}
    for pool_name, pages in (("full pool", full_pool), ("small pool", small_pool)):
        for name, schedule in (("full depth", None), ("D³", d3)):
            print(f"paged_cache_bench: {pool_name} ({pages} pages) {name} ...", flush=True)
            result["memory"][f"{pool_name}, {name}"] = dict(
                pages=pages, **run(model, requests, schedule, args.max_batch, max_seq_len,
                                   page_size=args.page_size, num_pages=pages))
    shared = shared_workload(model, args.shared_requests, args.system_tokens, args.seed,
                             (16, 48))
    result["system_prompt_tokens"] = len(os.path.commonprefix([p for p, _ in shared]))
    shared_len = max(len(p) + n for p, n in shared)
    for rep in range(1, args.reps + 1):  # interleaved: a noisy machine hits both alike
        for sharing in (False, True):
            print(f"paged_cache_bench: prefix sharing {sharing}, rep {rep} ...", flush=True)
            result["sharing"][f"{'on' if sharing else 'off'}, rep {rep}"] = run(
                model, shared, d3, args.max_batch, shared_len, page_size=args.page_size,
                prefix_sharing=sharing)
    write_report(args.out, "paged_cache", result, markdown(result))
    return result


def markdown(r: dict) -> str:
    mb = 2**20
    lines = [f"# Paged KV cache: {r['model']} ({r['dtype']}, {r['device']}, torch {r['torch']}, "
             f"{r['date']}, commit {r['commit']})", "",
             f"{r['requests']} requests, {r['prompt_tokens']} prompt tokens, max batch "
             f"{r['max_batch']}, rows of {r['max_seq_len']} tokens, pages of {r['page_size']}; "
             f"D³ schedule {r['schedule']}", "",
             "| pool, run | pages | KV reserved (MiB) | KV peak in use (MiB) | preemptions | "
             "recomputed tokens | tokens/s | latency/token median (ms) | p90 (ms) | "
             "first token median (ms) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, x in r["memory"].items():
        lines.append(f"| {key} | {x['pages']} | {x['reserved_kv_bytes'] / mb:.1f} | "
                     f"{x['peak_kv_bytes'] / mb:.1f} | {x['preemptions']} | "
                     f"{x['recomputed_tokens']} | {x['tokens_per_s']:.1f} | "
                     f"{x['latency_ms_median']:.1f} | {x['latency_ms_p90']:.1f} | "
                     f"{x['first_token_ms_median']:.0f} |")
    lines += ["", f"Prefix sharing: {len(r['sharing'])} runs (interleaved) of the same requests "
              f"behind a {r['system_prompt_tokens']}-token prompt prefix (system prompt + "
              "template), "
              "D³ schedule", "",
              "| sharing | prefill tokens | shared tokens | first token median (ms) | tokens/s |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for key, x in r["sharing"].items():
        lines.append(f"| {key} | {x['prefill_tokens']} | {x['shared_prefix_tokens']} | "
                     f"{x['first_token_ms_median']:.0f} | {x['tokens_per_s']:.1f} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
