"""End-to-end decode report on the real model: LlamaD3 full depth and D³ against transformers.

    python -m perf.report [--device cpu] [--tokens 128] [--reps 3] [--out perf/out]

Everything is measured in this one run: decode tokens/s of transformers ``generate``, LlamaD3 at
full depth and LlamaD3 with D³ (same prompt, same token count, greedy, no stop token); the D³
layer ratio, work ratio and realized speedup (design.md §8); achieved bandwidth against a copy
measured here; and load times. Writes results.md and results.json under --out.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from d3kernels import DepthSchedule, LlamaD3
from d3kernels.models_registry import resolve_model_source
from d3kernels.stats import step_bytes
from perf.provenance import run_info, write_report

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device, mbytes: int = 512, reps: int = 10) -> float:
    """GB/s of a large device-to-device copy, counting bytes read + written (median)."""
    src = torch.randn(mbytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 2):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times[2:]) / 1e9


def timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per run")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions (median is reported)")
    ap.add_argument("--alpha", type=float, default=0.98)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers (saves ~40 s)")
    ap.add_argument("--out", default="perf/out")
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    out_dir = Path(args.out)
    n = args.tokens

    gguf = resolve_model_source("smollm2-135m-instruct")
    load_times = [timed(lambda: LlamaD3.from_pretrained(gguf, dtype=dtype, device=device),
                        device) for _ in range(args.reps)]
    model = LlamaD3.from_pretrained(gguf, dtype=dtype, device=device)
    ids = model.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    schedule = DepthSchedule(alpha=args.alpha, head=4, tail=2, order="lower")

    runners = {
        "LlamaD3 full depth": lambda k: model.generate([ids], k, None, stop_tokens=()),
        "LlamaD3 D³": lambda k: model.generate([ids], k, schedule, stop_tokens=()),
    }
    hf_load = None
    if not args.no_hf:
        import transformers

        t0 = time.perf_counter()
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=dtype).to(device).eval()
        hf_load = time.perf_counter() - t0
        hf_ids = torch.tensor([ids], device=device)

        def hf_generate(k):
            with torch.inference_mode():
                hf.generate(hf_ids, attention_mask=torch.ones_like(hf_ids), max_new_tokens=k,
                            min_new_tokens=k, do_sample=False, pad_token_id=0)

        runners["transformers generate"] = hf_generate

    for run in runners.values():  # warm-up: first calls allocate and pick kernels
        run(4)
    # Decode time per token = (time for n tokens - time for 1 token) / (n - 1), the same way
    # for every runner; interleaved repetitions so drift hits all of them alike.
    samples = {name: [] for name in runners}
    for _ in range(args.reps):
        for name, run in runners.items():
            samples[name].append((timed(lambda: run(n), device) - timed(lambda: run(1), device))
                                 / (n - 1))
    per_token = {name: statistics.median(v) for name, v in samples.items()}
    stats = model.generate([ids], n, schedule, stop_tokens=()).stats
    full_step = step_bytes(model.config, model.config.num_layers, [len(ids) + n // 2],
                           model.weight_bytes)  # batch 1, the mean context
    bandwidth = copy_bandwidth(device)
    full_tps = 1 / per_token["LlamaD3 full depth"]
    d3_tps = 1 / per_token["LlamaD3 D³"]
    realized = d3_tps / full_tps
    result = {
        **run_info(device), "dtype": args.dtype, "new_tokens": n, "prompt_tokens": len(ids),
        "schedule": schedule.to_dict(),
        "decode_tokens_per_s": {name: 1 / t for name, t in per_token.items()},
        "load_seconds_median": statistics.median(load_times),
        "transformers_load_seconds": hf_load,
        "copy_bandwidth_GBps": bandwidth,
        "full_depth_GBps": full_step * full_tps / 1e9,
        "layer_ratio": stats.layer_ratio, "work_ratio": stats.work_ratio,
        "realized_speedup": realized, "realized_over_work_ratio": realized / stats.work_ratio,
        "mean_layers_per_token": stats.mean_layers_per_token,
    }
    if "transformers generate" in per_token:
        result["full_depth_vs_transformers"] = full_tps * per_token["transformers generate"]
    write_report(out_dir, "results", result, markdown(result))
    return result


def markdown(r: dict) -> str:
    lines = [f"SmolLM2-135M-Instruct, {r['dtype']}, batch 1, {r['prompt_tokens']}-token prompt, "
             f"{r['new_tokens']} new tokens, greedy — {r['device']}, torch {r['torch']}, "
             f"{r['date']}, commit {r['commit']}", "",
             "| decoder | decode tokens/s |", "| --- | ---: |"]
    lines += [f"| {name} | {tps:.1f} |" for name, tps in r["decode_tokens_per_s"].items()]
    lines += ["", "| figure | value |", "| --- | ---: |"]
    if "full_depth_vs_transformers" in r:
        lines.append(f"| LlamaD3 full depth / transformers | {r['full_depth_vs_transformers']:.2f}x |")
    lines += [
        f"| D³ schedule | alpha {r['schedule']['alpha']}, head {r['schedule']['head']}, tail "
        f"{r['schedule']['tail']}, order {r['schedule']['order']} |",
        f"| mean layers per decode token | {r['mean_layers_per_token']:.1f} |",
        f"| layer ratio | {r['layer_ratio']:.2f}x |",
        f"| work ratio | {r['work_ratio']:.2f}x |",
        f"| realized D³ speedup | {r['realized_speedup']:.2f}x |",
        f"| realized / work ratio | {r['realized_over_work_ratio']:.2f} |",
        f"| full-depth achieved bandwidth | {r['full_depth_GBps']:.1f} GB/s "
        f"({r['full_depth_GBps'] / r['copy_bandwidth_GBps']:.0%} of copy) |",
        f"| copy bandwidth (read + write) | {r['copy_bandwidth_GBps']:.1f} GB/s |",
        f"| load GGUF + tokenizer (median) | {r['load_seconds_median']:.2f} s |",
    ]
    if r["transformers_load_seconds"] is not None:
        lines.append(f"| transformers load of the same GGUF | {r['transformers_load_seconds']:.1f} s |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
