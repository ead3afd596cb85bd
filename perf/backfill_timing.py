"""Backfill timing (issue 4 §1): eager vs deferred backfill, with full depth and mask as bounds.

    python -m perf.backfill_timing [--model smollm2-135m-instruct | --preset llama-2-7b]
        [--device cpu|cuda] [--dtype float32|bfloat16|float16] [--backend auto|torch|triton]
        [--batches 1 8] [--tokens 64] [--reps 3] [--alpha 0.98 --head 4 --tail 2 --order lower]
        [--out perf/out]

On the same prompts and token count (greedy, stop tokens off, so every run decodes
tokens - 1 steps), per batch size, decode time per reply of:

- full depth (upper bound on time);
- D³ with ``backfill="mask"`` (no backfill work: the lower bound, though its attention reads
  a per-entry mask; skipped where ``model.resolve_backfill`` refuses it);
- D³ ``propagate`` / eager (skipped layers' K/V filled every step);
- D³ ``propagate`` / deferred (residual stashed per skipped run), and separately the
  ``model.flush_backfill(cache)`` that fills everything it owes; decode-only and decode + flush.

Decode time is ``GenerationStats.decode_seconds`` (host clock around each step, which ends with
the sampled tokens copied to the host, so a GPU step is complete when it is read); the flush is
timed with ``perf.report.timed`` (synchronize, perf_counter, synchronize). Median over --reps
interleaved repetitions (load drift hits every mode alike), after one untimed warm-up per mode
and batch (compilation, autotuning, CUDA graph capture: the first call is never timed).

The warm-up runs of eager and deferred (the latter with ``flush_backfill=True``) also check
that the two fill the cache alike: the cache is zeroed between them, and K and V are compared
at every (layer, row, slot) either marked written (the masks must be equal too). Their
``GenerationStats.backfill_bytes`` give the weight bytes each read for backfill, and the
cache's ``KVCache.kv_bytes`` / ``stash_bytes`` what the K/V tensors and the deferred stash
(one hidden vector per skipped run and position, for every row and slot of the cache) hold.

Writes backfill_timing.md and backfill_timing.json under --out and prints the table; progress
goes to stderr. Random-weight presets (``LlamaD3.random``) take random prompts of --prompt-len
tokens; the real model takes the shipped prompts (``d3kernels.eval.load_prompts``) under its
chat template, so a batch's rows differ in length.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from d3kernels import PRESETS, DepthSchedule, LlamaD3
from d3kernels.eval import load_prompts
from perf.gpu_report import PROMPT_LEN
from perf.provenance import run_info, write_report
from perf.report import timed

MODES = ("full depth", "D³ mask", "D³ eager", "D³ deferred")
_BACKFILL = {"full depth": {}, "D³ mask": {"backfill": "mask"},
             "D³ eager": {"backfill": "propagate", "backfill_timing": "eager"},
             "D³ deferred": {"backfill": "propagate", "backfill_timing": "deferred"}}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _order(text: str):
    return tuple(int(j) for j in text.split(",")) if text[:1].isdigit() else text


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", default=None,
                     help="checkpoint name or path (default: smollm2-135m-instruct)")
    src.add_argument("--preset", choices=sorted(PRESETS), default=None,
                     help="random weights in a preset's shapes instead of a checkpoint")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on CUDA, float32 elsewhere")
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per reply")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions (median reported)")
    ap.add_argument("--prompt-len", type=int, default=PROMPT_LEN,
                    help="prompt tokens per row for --preset (default: %(default)s)")
    ap.add_argument("--alpha", type=float, default=0.98)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--head", type=int, default=4)
    ap.add_argument("--tail", type=int, default=2)
    ap.add_argument("--order", type=_order, default="lower",
                    help="lower, upper, or a comma-separated list of flex layers")
    ap.add_argument("--seed", type=int, default=0, help="weights and random prompts")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's); on a CPU shared with other "
                         "jobs, 1 avoids threads spinning against each other")
    ap.add_argument("--out", default="perf/out")
    return ap


def _load(args, device, dtype) -> tuple[LlamaD3, str]:
    if args.preset is not None:
        model = LlamaD3.random(args.preset, dtype=dtype, device=device, seed=args.seed,
                               backend=args.backend,
                               max_seq_len=args.prompt_len + args.tokens + 8)
        return model, f"{args.preset} (random weights)"
    name = args.model or "smollm2-135m-instruct"
    return LlamaD3.from_pretrained(name, dtype=dtype, device=device, backend=args.backend), name


def _prompts(args, model: LlamaD3, batch: int) -> list[list[int]]:
    if args.preset is not None:
        gen = torch.Generator().manual_seed(args.seed + batch)
        return torch.randint(0, model.config.vocab_size, (batch, args.prompt_len),
                             generator=gen).tolist()
    texts = load_prompts()
    tok = model.tokenizer
    return [tok.encode_chat([{"role": "user", "content": texts[r % len(texts)]}])
            if tok.chat_template is not None else tok.encode(texts[r % len(texts)])
            for r in range(batch)]


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _compare(eager: tuple, deferred) -> dict:
    """Max |eager - deferred| of K and V over the entries either marks written (layer by layer,
    so a 7B cache needs no full-size float32 copies)."""
    k_e, v_e, w_e = eager  # the same static cache's pools: its rows own the same pages
    k_d, v_d, w_d = deferred.k, deferred.v, deferred.written
    out = dict.fromkeys(("max_abs_diff_k", "max_abs_diff_v", "max_abs_k", "max_abs_v"), 0.0)
    for j in range(k_e.shape[0]):
        both = (w_e[j] | w_d[j])[:, :, None, None]  # [P, S] page slots against [P, S, kv, D]
        for name, a, b in (("k", k_e[j], k_d[j]), ("v", v_e[j], v_d[j])):
            a = a.float()
            out[f"max_abs_diff_{name}"] = max(out[f"max_abs_diff_{name}"],
                                              float(((a - b.float()).abs() * both).amax()))
            out[f"max_abs_{name}"] = max(out[f"max_abs_{name}"], float((a.abs() * both).amax()))
    out["written_equal"] = bool(torch.equal(w_e, w_d))
    out["entries_compared"] = int((w_e | w_d).sum())
    return out


def measure_batch(model: LlamaD3, prompts, n: int, schedule: DepthSchedule, reps: int,
                  device: torch.device, modes: tuple[str, ...]) -> dict:
    """One batch: warm-ups (eager/deferred also checked against each other), then timed reps."""
    def gen(mode, **kw):
        sched = None if mode == "full depth" else schedule
        return model.generate(prompts, n, sched, stop_tokens=(), **_BACKFILL[mode], **kw)

    row: dict = {"batch": len(prompts), "prompt_tokens": [len(p) for p in prompts]}
    for mode in modes:
        if mode in ("D³ eager", "D³ deferred"):
            continue
        log(f"  warm-up {mode}")
        gen(mode)
    log("  warm-up D³ eager (kept for the cache check)")
    eager = gen("D³ eager")
    cache = model.cache
    kept = (cache.k.clone(), cache.v.clone(), cache.written.clone())
    cache.k.zero_()
    cache.v.zero_()
    log("  warm-up D³ deferred + flush (checked against eager)")
    deferred = gen("D³ deferred", flush_backfill=True)
    assert model.cache is cache, "the cache was reallocated between eager and deferred"
    row.update(_compare(kept, cache))
    del kept
    row.update({
        "decode_steps": eager.stats.decode_steps,
        "mean_layers_per_token": eager.stats.mean_layers_per_token,
        "layer_ratio": eager.stats.layer_ratio, "work_ratio": eager.stats.work_ratio,
        "tokens_equal": eager.tokens == deferred.tokens,
        "eager_backfill_bytes": eager.stats.backfill_bytes,
        "deferred_backfill_bytes": deferred.stats.backfill_bytes,
        "backfill_layer_bytes": model.weight_bytes.backfill_layer,
        "cache_rows": cache.batch_size, "cache_slots": cache.pages_per_row * cache.page_size,
        "kv_cache_bytes": cache.kv_bytes, "stash_bytes": cache.stash_bytes,
        "stash_runs": 0 if cache.stash is None else cache.stash.shape[0],
    })

    samples = {mode: [] for mode in modes}
    flush, total, flushed = [], [], 0
    for rep in range(reps):
        log(f"  rep {rep + 1}/{reps}")
        for mode in modes:
            s = gen(mode).stats
            samples[mode].append(s.decode_seconds)
            if mode == "D³ deferred":
                c = model.cache
                flushed = c.pending_backfill
                t = timed(lambda: model.flush_backfill(c), device)
                flush.append(t)
                total.append(s.decode_seconds + t)
    row["decode_ms"] = {m: 1e3 * statistics.median(v) for m, v in samples.items()}
    row["flush_ms"] = 1e3 * statistics.median(flush)
    row["deferred_decode_plus_flush_ms"] = 1e3 * statistics.median(total)
    row["flushed_entries"] = flushed
    row["decode_ms_samples"] = {m: [1e3 * t for t in v] for m, v in samples.items()}
    row["flush_ms_samples"] = [1e3 * t for t in flush]
    return row


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    if args.tokens < 2:
        raise SystemExit("--tokens must be >= 2 (one decode step at least)")
    out_dir = Path(args.out)
    schedule = DepthSchedule(alpha=args.alpha, start=args.start, head=args.head, tail=args.tail,
                             order=args.order)

    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        with torch.inference_mode():
            result = _run(args, device, dtype, dtype_name, schedule)
    finally:
        torch.set_num_threads(threads)
    write_report(out_dir, "backfill_timing", result, markdown(result))
    return result


def _run(args, device, dtype, dtype_name, schedule) -> dict:
    """Load the model and measure every batch size; the result dict (no files written)."""
    log(f"loading {args.preset or args.model or 'smollm2-135m-instruct'} "
        f"({dtype_name}, {device})")
    model, name = _load(args, device, dtype)
    try:
        model.resolve_backfill("mask")
        modes, mask_note = MODES, None
    except ValueError as e:
        modes, mask_note = tuple(m for m in MODES if m != "D³ mask"), str(e)
        log(f"skipping mask mode: {e}")
    rows = []
    for batch in args.batches:
        log(f"batch {batch}")
        prompts = _prompts(args, model, batch)
        rows.append(measure_batch(model, prompts, args.tokens, schedule, args.reps, device,
                                  modes))
        log("  " + json.dumps({k: v for k, v in rows[-1].items()
                               if not k.endswith("_samples")}))
    result = {
        "model": name, "backend": model.backend, "dtype": dtype_name,
        **run_info(device), "new_tokens": args.tokens, "reps": args.reps,
        "schedule": schedule.to_dict(), "mask_skipped": mask_note, "rows": rows,
    }
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def markdown(r: dict) -> str:
    s = r["schedule"]
    order = s["order"] if isinstance(s["order"], str) else ",".join(map(str, s["order"]))
    lines = [f"{r['model']}, {r['dtype']}, {r['backend']} backend — {r['device']}, torch "
             f"{r['torch']}, {r['date']}, commit {r['commit']}. D³ alpha {s['alpha']}, start "
             f"{s['start']}, head {s['head']}, tail {s['tail']}, order {order}; "
             f"{r['new_tokens']} new tokens ({r['new_tokens'] - 1} decode steps), greedy, no stop "
             f"tokens; milliseconds of decode per reply (the whole batch), median of "
             f"{r['reps']} after a warm-up.", ""]
    if r["mask_skipped"]:
        lines += [f"mask mode skipped: {r['mask_skipped']}", ""]
    lines += ["| batch | prompt tokens | full depth | D³ mask (no backfill) | D³ eager | "
              "D³ deferred decode | flush | D³ deferred decode + flush | "
              "eager / (deferred + flush) |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in r["rows"]:
        t = row["decode_ms"]
        p = row["prompt_tokens"]
        plen = str(p[0]) if min(p) == max(p) else f"{min(p)}–{max(p)}"
        mask = f"{t['D³ mask']:.1f}" if "D³ mask" in t else "n/a"
        lines.append(f"| {row['batch']} | {plen} | {t['full depth']:.1f} | {mask} | "
                     f"{t['D³ eager']:.1f} | {t['D³ deferred']:.1f} | {row['flush_ms']:.2f} | "
                     f"{row['deferred_decode_plus_flush_ms']:.1f} | "
                     f"{t['D³ eager'] / row['deferred_decode_plus_flush_ms']:.2f}x |")
    lines += ["", "| batch | layers per token | backfill weight bytes: eager | deferred | "
              "deferred / eager | max \\|Δk\\| (max \\|k\\|) | max \\|Δv\\| (max \\|v\\|) | "
              "written masks equal | tokens equal | KV cache (rows × slots) | deferred stash "
              "(runs) |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: |"]
    for row in r["rows"]:
        e, d = row["eager_backfill_bytes"], row["deferred_backfill_bytes"]
        lines.append(f"| {row['batch']} | {row['mean_layers_per_token']:.1f} | {_size(e)} | "
                     f"{_size(d)} | {d / e if e else float('nan'):.3f} | "
                     f"{row['max_abs_diff_k']:.2e} ({row['max_abs_k']:.2g}) | "
                     f"{row['max_abs_diff_v']:.2e} ({row['max_abs_v']:.2g}) | "
                     f"{'yes' if row['written_equal'] else 'NO'} | "
                     f"{'yes' if row['tokens_equal'] else 'NO'} | "
                     f"{_size(row['kv_cache_bytes'])} ({row['cache_rows']} × "
                     f"{row['cache_slots']}) | {_size(row['stash_bytes'])} "
                     f"({row['stash_runs']}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
