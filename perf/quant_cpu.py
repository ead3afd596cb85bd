"""CPU decode of SmolLM2-135M in its own Q4_1 against float LlamaD3 and llama.cpp (issue 13 §3).

    python -m perf.quant_cpu --out DIR [--max-new-tokens 128] [--reps 3] [--threads N]

One run on one machine, the same GGUF, the same chat-templated prompt tokens, greedy, no stop
token: LlamaD3 on the GGUF's Q4_1 layers + Q8_0 LM head with bfloat16 activations (full depth,
D³ at the CLI's default schedule and at α 0.98), LlamaD3 dequantized to float32 (full depth,
D³ α 0.98) and to bfloat16 (full depth), and llama.cpp through llama-cpp-python
(``pip install .[bench-llamacpp]``; reported as absent, with the reason, where it does not
import). After a warm-up run of each, the runs are repeated --reps times, interleaved so drift
hits all alike; figures are medians.

Decode tokens/s: LlamaD3 from generate's own decode timer, llama.cpp from its own perf counters
(``llama_perf_context``: n_eval / t_eval); both exclude the prompt. Also reported for both:
wall-clock minus prompt eval, over the same decode tokens (adds sampling and the Python loop).
Achieved GB/s counts the stored bytes a step reads (quantized: values + scales + offsets; the
generate stats' d3_bytes, which equal full_bytes at full depth) over the decode time. Writes
quant_cpu.md and quant_cpu.json under --out.
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from d3kernels import DepthSchedule, LlamaD3
from d3kernels.models_registry import resolve_model_source
from perf.provenance import run_info, write_report
from perf.report import PROMPT, copy_bandwidth

# The CLI's default schedule (d3kernels/cli.py) and the stronger one perf/report.py measures.
CLI_SCHEDULE = DepthSchedule(alpha=0.995, head=4, tail=2, order="lower")
DEEP_SCHEDULE = DepthSchedule(alpha=0.98, head=4, tail=2, order="lower")
LLAMA_CPP = "llama.cpp (llama-cpp-python)"
REFERENCE = "LlamaD3 Q4_1 full depth"  # what the token agreement and the goals compare to
GOALS = {"full_vs_llamacpp": 0.8, "realized_over_work": 0.9}  # issue 13 §3


@dataclass
class Run:
    tokens: list[int]
    decode_tokens: int
    decode_seconds: float       # the engine's own decode timer
    wall_decode_seconds: float  # wall-clock of the call minus prompt eval
    stats: object = None        # LlamaD3's GenerationStats


def llamad3_runner(model: LlamaD3, ids: list[int], schedule: DepthSchedule | None):
    def run(n: int) -> Run:
        t0 = time.perf_counter()
        out = model.generate([ids], n, schedule, stop_tokens=())
        wall = time.perf_counter() - t0
        s = out.stats
        return Run(out.tokens[0], s.decode_tokens, s.decode_seconds, wall - s.prefill_seconds, s)
    return run


def import_llama_cpp():
    """The llama_cpp module, or the reason it is absent."""
    try:
        return importlib.import_module("llama_cpp"), None
    except (ImportError, OSError) as e:  # OSError: installed, but its shared library won't load
        return None, f"import llama_cpp failed: {type(e).__name__}: {e}"


def llamacpp_runner(llama_cpp, gguf: Path, ids: list[int], max_new: int):
    threads = torch.get_num_threads()
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=max(512, len(ids) + max_new),
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    ctx = llm._ctx.ctx

    def run(n: int) -> Run:
        llm.reset()  # else generate reuses the cached prompt and skips its eval
        llama_cpp.llama_perf_context_reset(ctx)
        t0 = time.perf_counter()
        # temp 0 is llama.cpp's greedy sampler; the k-th token is yielded before it is evaluated,
        # so n tokens take n - 1 decode evals, as in LlamaD3
        tokens = list(itertools.islice(llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0),
                                       n))
        wall = time.perf_counter() - t0
        perf = llama_cpp.llama_perf_context(ctx)
        return Run(tokens, perf.n_eval, perf.t_eval_ms / 1e3, wall - perf.t_p_eval_ms / 1e3)
    return run, threads, getattr(llama_cpp, "__version__", "?")


def cpu_model() -> str:
    """The CPU's model name and whether it has native bf16 (avx512_bf16 / amx_bf16)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), "unknown")
    flags = next((set(line.split(":", 1)[1].split()) for line in info.splitlines()
                  if line.startswith("flags")), set())
    bf16 = sorted(flags & {"avx512_bf16", "amx_bf16"})
    return f"{name}, native bf16: {', '.join(bf16) if bf16 else 'no'}"


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions (median is reported)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads, and llama.cpp's (default: torch's); on a CPU shared "
                         "with other jobs, 1 avoids threads spinning against each other")
    ap.add_argument("--out", default="perf/out")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 2:
        ap.error("--max-new-tokens must be at least 2 (decode starts at the second token)")
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        with torch.inference_mode():
            result = _run(args)
    finally:
        torch.set_num_threads(threads)
    write_report(args.out, "quant_cpu", result, markdown(result))
    return result


def _run(args) -> dict:
    """Load the models, measure every decoder; the result dict (no files written)."""
    n, load_before = args.max_new_tokens, os.getloadavg()
    gguf = resolve_model_source("smollm2-135m-instruct")
    models = {
        "Q4_1": LlamaD3.from_pretrained(gguf, dtype=torch.bfloat16),
        "float32": LlamaD3.from_pretrained(gguf, dtype=torch.float32, quantize=None),
        "bfloat16": LlamaD3.from_pretrained(gguf, dtype=torch.bfloat16, quantize=None),
    }
    ids = models["Q4_1"].tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    rows = {  # name -> (model key, schedule)
        REFERENCE: ("Q4_1", None),
        "LlamaD3 Q4_1 D³ α 0.995": ("Q4_1", CLI_SCHEDULE),
        "LlamaD3 Q4_1 D³ α 0.98": ("Q4_1", DEEP_SCHEDULE),
        "LlamaD3 float32 full depth": ("float32", None),
        "LlamaD3 float32 D³ α 0.98": ("float32", DEEP_SCHEDULE),
        "LlamaD3 bfloat16 full depth": ("bfloat16", None),
    }
    runners = {name: llamad3_runner(models[key], ids, s) for name, (key, s) in rows.items()}

    llama_cpp, absent = import_llama_cpp()
    llamacpp = None
    if llama_cpp is not None:
        runners[LLAMA_CPP], threads, version = llamacpp_runner(llama_cpp, gguf, ids, n)
        llamacpp = {"version": version, "n_threads": threads,
                    "decode_timing": "llama_perf_context: n_eval / t_eval (its own counters)"}

    for run in runners.values():  # warm-up: first calls allocate and pick kernels
        run(n)
    runs = {name: [] for name in runners}
    for _ in range(args.reps):
        for name, run in runners.items():
            runs[name].append(run(n))

    ref_tokens = runs[REFERENCE][0].tokens
    results = {}
    for name, rs in runs.items():
        r0 = rs[0]
        seconds = statistics.median(r.decode_seconds for r in rs)
        row = {
            "decode_tokens": r0.decode_tokens,
            "decode_tokens_per_s_reps": [r.decode_tokens / r.decode_seconds for r in rs],
            "wall_decode_tokens_per_s": statistics.median(r.decode_tokens / r.wall_decode_seconds
                                                          for r in rs),
            "same_tokens_as_reference": common_prefix(r0.tokens, ref_tokens),
        }
        row["decode_tokens_per_s"] = statistics.median(row["decode_tokens_per_s_reps"])
        if r0.stats is not None:
            key, schedule = rows[name]
            s = r0.stats
            row.update(weights=models[key].weight_format, activations=str(
                models[key].dtype).removeprefix("torch."),
                schedule=schedule.to_dict() if schedule else None,
                mean_layers_per_token=s.mean_layers_per_token, layer_ratio=s.layer_ratio,
                work_ratio=s.work_ratio, bytes_per_step=s.d3_bytes / s.decode_steps,
                GBps=s.d3_bytes / seconds / 1e9)
        else:
            row.update(weights="Q4_1 + Q8_0 head (GGUF, mmap)",
                       activations="float32 (Q8_1 into the dot products)")
        results[name] = row
    for name, row in results.items():  # D³ against full depth on the same weights
        if row.get("schedule"):
            full = results[next(other for other, (key, sched) in rows.items()
                                if sched is None and key == rows[name][0])]
            row["realized_speedup"] = row["decode_tokens_per_s"] / full["decode_tokens_per_s"]
            row["realized_over_work"] = row["realized_speedup"] / row["work_ratio"]

    result = {
        **run_info("cpu"), "cpu": cpu_model(), "model": str(gguf.name), "prompt_tokens": len(ids),
        "new_tokens": n, "reps": args.reps, "rows": results,
        "resident_weight_MB": {models[k].weight_format: models[k].resident_weight_bytes() / 2**20
                               for k in models},
        "copy_bandwidth_GBps": copy_bandwidth(torch.device("cpu")),
        "llama_cpp": llamacpp, "llama_cpp_absent": absent,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
    }
    if llamacpp is not None:
        result["resident_weight_MB"]["llama.cpp: the GGUF file, memory-mapped"] = (
            gguf.stat().st_size / 2**20)
        ref, cpp = results[REFERENCE], results[LLAMA_CPP]
        result["q4_1_full_vs_llamacpp"] = ref["decode_tokens_per_s"] / cpp["decode_tokens_per_s"]
        result["q4_1_full_vs_llamacpp_wall"] = (ref["wall_decode_tokens_per_s"]
                                                / cpp["wall_decode_tokens_per_s"])
    result["goals"] = goals(result)
    return result


def goals(r: dict) -> dict:
    """Issue 13 §3's CPU goals: met, not met, or unmeasured (None)."""
    ratio = r.get("q4_1_full_vs_llamacpp")
    q4_d3 = [row["realized_over_work"] for name, row in r["rows"].items()
             if name.startswith("LlamaD3 Q4_1 D³")]
    return {"full_depth_at_least_0.8x_llamacpp": None if ratio is None
            else ratio >= GOALS["full_vs_llamacpp"],
            "d3_realized_at_least_0.9x_work_ratio": all(
                x >= GOALS["realized_over_work"] for x in q4_d3)}


def _x(v, fmt=".2f", suffix="×") -> str:
    return "–" if v is None else f"{v:{fmt}}{suffix}"


def _load(avg) -> str:
    return " / ".join(f"{x:.2f}" for x in avg)


def _met(v) -> str:
    return "unmeasured" if v is None else ("met" if v else "not met")


def markdown(r: dict) -> str:
    lines = [f"SmolLM2-135M-Instruct ({r['model']}), batch 1, {r['prompt_tokens']}-token chat "
             f"prompt, {r['new_tokens']} new tokens, greedy, no stop token; median of {r['reps']} "
             f"interleaved repetitions after a warm-up — {r['device']} ({r['cpu']}), torch "
             f"{r['torch']}, {r['date']}, commit {r['commit']}; load average (1, 5, 15 min) "
             f"{_load(r['load_average_before'])} before, {_load(r['load_average_after'])} after",
             "",
             "| decoder | weights | activations | decode tok/s | wall decode tok/s | "
             "layers/token | work ratio | realized | realized / work | GB/s (stored bytes) | "
             "tokens = Q4_1 full |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in r["rows"].items():
        layers = row.get("mean_layers_per_token")
        gbps = row.get("GBps")
        lines.append(
            f"| {name} | {row['weights']} | {row['activations']} | "
            f"{row['decode_tokens_per_s']:.1f} | {row['wall_decode_tokens_per_s']:.1f} | "
            f"{'–' if layers is None else f'{layers:.1f}'} | "
            f"{_x(row.get('work_ratio')) if row.get('schedule') else '–'} | "
            f"{_x(row.get('realized_speedup'))} | {_x(row.get('realized_over_work'), suffix='')} | "
            f"{'–' if gbps is None else f'{gbps:.1f}'} | "
            f"{row['same_tokens_as_reference']}/{r['new_tokens']} |")
    if r["llama_cpp"] is None:
        lines += ["", f"llama.cpp: absent ({r['llama_cpp_absent']})."]
    else:
        c = r["llama_cpp"]
        lines += ["", f"llama.cpp: llama-cpp-python {c['version']}, n_threads {c['n_threads']}; "
                      f"decode tok/s from {c['decode_timing']}."]
    lines += ["", "| figure | value |", "| --- | ---: |"]
    if "q4_1_full_vs_llamacpp" in r:
        lines += [f"| LlamaD3 Q4_1 full depth / llama.cpp | {_x(r['q4_1_full_vs_llamacpp'])} |",
                  f"| same, wall-clock decode | {_x(r['q4_1_full_vs_llamacpp_wall'])} |"]
    lines += [f"| resident weights, {fmt} | {mb:.1f} MB |"
              for fmt, mb in r["resident_weight_MB"].items()]
    lines.append(f"| copy bandwidth (read + write) | {r['copy_bandwidth_GBps']:.1f} GB/s |")
    g = r["goals"]
    lines += ["", "Issue 13 §3 goals: LlamaD3 Q4_1 full depth ≥ 0.8 × llama.cpp's decode tok/s: "
              f"{_met(g['full_depth_at_least_0.8x_llamacpp'])}; Q4_1 D³ realized ≥ 0.9 × work "
              f"ratio: {_met(g['d3_realized_at_least_0.9x_work_ratio'])}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
