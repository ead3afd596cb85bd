"""Continuous batching benchmark: a stream of mixed-length requests, full depth vs D³.

    python -m perf.engine_bench [--model smollm2-135m-instruct | --preset llama-2-7b]
                                [--device cpu] [--backends auto] [--requests 24] [--max-batch 8]
                                [--out perf/out]

The same requests (chat prompts from the shipped set, or random ids for a random preset; lengths
and max_new_tokens drawn from a seeded generator; stop tokens off, so both runs make the same
tokens count) go through ``d3kernels.Engine`` twice in one run, at full depth and with a D³
schedule, after a short warm-up, on each backend asked for (the same weights) and for each
``--min-free`` (Engine admission: 1 = as rows free up, max batch = in waves). All arrive at
t = 0.
Reported per run: generated tokens/s, per-token latency (the gaps between a request's
consecutive tokens: median and p90) and time to first token (median), the per-request layer
ratio and the union layer ratio (layers any running row kept: what a bandwidth-bound step
reads; engine.py explains why it caps D³'s gain in a mixed batch), and the work ratio (bytes,
``EngineStats.work_ratio``: those layers' weights plus each row's own KV). Writes engine.md and
engine.json under --out.
"""
from __future__ import annotations

import argparse
import random
import statistics

import torch

from d3kernels import DepthSchedule, Engine, LlamaD3
from d3kernels.eval import load_prompts
from perf.provenance import run_info, write_report
from perf.report import _sync

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def workload(model, n: int, seed: int, new_tokens: tuple[int, int]) -> list[tuple[list[int], int]]:
    """n (prompt ids, max_new_tokens) pairs; prompts cycle through the shipped set."""
    rng = random.Random(seed)
    tok = model.tokenizer
    if tok is not None:
        texts = load_prompts()
        prompts = [tok.encode_chat([{"role": "user", "content": texts[k % len(texts)]}])
                   for k in range(n)]
    else:
        prompts = [[rng.randrange(model.config.vocab_size) for _ in range(rng.randint(16, 256))]
                   for _ in range(n)]
    return [(p, rng.randint(*new_tokens)) for p in prompts]


def run(model, requests, schedule, max_batch: int, max_seq_len: int, min_free: int = 1,
        **engine_kwargs) -> dict:
    """Drain one engine over all requests; times, ratios and KV pages of that run.
    engine_kwargs: more Engine arguments (page_size, num_pages, prefix_sharing)."""
    engine = Engine(model, max_batch=max_batch, max_seq_len=max_seq_len, schedule=schedule,
                    stop_tokens=(), min_free=min_free, **engine_kwargs)
    reqs = [engine.submit(p, n) for p, n in requests]
    _sync(model.device)
    for _ in engine.run():
        pass
    _sync(model.device)
    gaps = [b - a for r in reqs for a, b in zip(r.token_times, r.token_times[1:])]
    gaps.sort()
    s = engine.stats
    return {
        "tokens": s.generated_tokens, "seconds": s.seconds, "tokens_per_s": s.tokens_per_s,
        "latency_ms_median": 1e3 * statistics.median(gaps),
        "latency_ms_p90": 1e3 * gaps[int(0.9 * (len(gaps) - 1))],
        "first_token_ms_median": 1e3 * statistics.median(r.token_times[0] - r.submitted_at
                                                         for r in reqs),
        "decode_steps": s.decode_steps, "mean_batch": s.row_steps / max(1, s.decode_steps),
        "layer_ratio": s.layer_ratio, "union_layer_ratio": s.union_layer_ratio,
        "work_ratio": s.work_ratio, "prefill_tokens": s.prefill_tokens,
        "reserved_kv_bytes": engine.cache.kv_bytes,
        "peak_kv_bytes": s.peak_pages * engine.cache.page_bytes, "preemptions": s.preemptions,
        "recomputed_tokens": s.recomputed_tokens, "shared_prefix_tokens": s.shared_prefix_tokens,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", default="smollm2-135m-instruct", help="(default: %(default)s)")
    src.add_argument("--preset", default=None, help="random weights of a preset instead")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--backends", nargs="+", default=["auto"], choices=["auto", "torch", "triton"],
                    help="each one runs full depth and D³ (default: auto; on a GPU try "
                         "triton torch)")
    ap.add_argument("--requests", type=int, default=24, help="(default: %(default)s)")
    ap.add_argument("--max-batch", type=int, default=8, help="(default: %(default)s)")
    ap.add_argument("--min-free", type=int, nargs="+", default=[1],
                    help="Engine min_free values to compare: 1 = continuous admission, "
                         "max batch = waves (default: 1)")
    ap.add_argument("--new-tokens", type=int, nargs=2, default=[16, 96], metavar=("MIN", "MAX"),
                    help="max_new_tokens drawn uniformly in [MIN, MAX] (default: 16 96)")
    ap.add_argument("--alpha", type=float, default=0.98, help="D³ alpha (default: %(default)s)")
    ap.add_argument("--head", type=int, default=4)
    ap.add_argument("--tail", type=int, default=2)
    ap.add_argument("--order", default="lower")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="perf/out")
    args = ap.parse_args(argv)

    kw = dict(dtype=DTYPES[args.dtype], device=args.device, backend=args.backends[0])
    model = (LlamaD3.random(args.preset, **kw) if args.preset
             else LlamaD3.from_pretrained(args.model, **kw))
    d3 = DepthSchedule(alpha=args.alpha, head=args.head, tail=args.tail, order=args.order)
    requests = workload(model, args.requests, args.seed, tuple(args.new_tokens))
    max_seq_len = max(len(p) + n for p, n in requests)
    warm = [(p[:8], 4) for p, _ in requests[:args.max_batch]]

    result = {
        **run_info(model.device), "model": args.preset or args.model, "dtype": args.dtype,
        "requests": args.requests, "max_batch": args.max_batch,
        "prompt_tokens": sum(len(p) for p, _ in requests),
        "schedule": d3.to_dict(), "runs": {}, "throughput_speedup": {},
    }
    for k, backend in enumerate(args.backends):
        if k:  # the same weights on another backend
            model = LlamaD3(model.config, model.state_dict(), tokenizer=model.tokenizer,
                            dtype=model.dtype, device=model.device, backend=backend)
        run(model, warm, d3, args.max_batch, max_seq_len)  # compile, allocate, warm up
        for min_free in args.min_free:
            runs = {}
            for name, schedule in (("full depth", None), ("D³", d3)):
                print(f"engine_bench: {model.backend} min_free {min_free} {name} ...",
                      flush=True)
                runs[name] = run(model, requests, schedule, args.max_batch, max_seq_len,
                                 min_free)
            key = f"{model.backend}, min_free {min_free}"
            result["runs"][key] = runs
            result["throughput_speedup"][key] = (runs["D³"]["tokens_per_s"]
                                                 / runs["full depth"]["tokens_per_s"])
    write_report(args.out, "engine", result, markdown(result))
    return result


def markdown(r: dict) -> str:
    lines = [f"# Continuous batching: {r['model']} ({r['dtype']}, {r['device']}, torch "
             f"{r['torch']}, {r['date']}, commit {r['commit']})", "",
             f"{r['requests']} requests, {r['prompt_tokens']} prompt tokens, max batch "
             f"{r['max_batch']}; D³ schedule {r['schedule']}", "",
             "| backend, admission | run | tokens | tokens/s | latency/token median (ms) | p90 (ms) | first token "
             "median (ms) | mean batch | layer ratio | union layer ratio | work ratio |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for backend, runs in r["runs"].items():
        for name, x in runs.items():
            lines.append(f"| {backend} | {name} | {x['tokens']} | {x['tokens_per_s']:.1f} | "
                         f"{x['latency_ms_median']:.1f} | {x['latency_ms_p90']:.1f} | "
                         f"{x['first_token_ms_median']:.0f} | {x['mean_batch']:.2f} | "
                         f"{x['layer_ratio']:.2f} | {x['union_layer_ratio']:.2f} | "
                         f"{x['work_ratio']:.2f} |")
    lines.append("")
    for key, ratio in r["throughput_speedup"].items():
        lines.append(f"D³ throughput / full depth ({key}): {ratio:.2f}×")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
