"""What a D³ schedule costs in quality and buys in speed, on a model and prompts (issue 5 §1).

    results = evaluate(model, prompts, schedules, max_new_tokens=32, held_text=load_held_text())
    write_csv(results, "out/eval.csv"); plot(results, "out/eval.png")
    best = best_under_budget(results, max_nll_increase=0.1)

For each schedule, every prompt is decoded greedily (chat-templated when the tokenizer has a
template; the model's stop tokens) and compared with the full-depth greedy output of the same
prompt:

- ``exact_match``: the fraction of prompts whose D³ output equals full depth's, token for token;
  ``first_divergence[r]``: the index of the first generated token that differs (None: identical).
- ``nll``: mean negative log-likelihood per generated token (stop token included, pooled over
  all prompts) of the D³ outputs under the full-depth model, one ``model.logits`` pass over
  prompt + output; ``full_nll``: the same for the full-depth outputs; ``delta_nll`` the increase.
- ``held_ppl``: perplexity of a held text read as consecutive replies of ``held_reply_tokens``
  tokens (default: ``max_new_tokens``, the prompts' reply length) to a short prefix, held token
  t of each reply predicted by a pass at the depth n_t the schedule gives generated token t
  (design.md §2: positions before the reply at full depth), by masked full-sequence recompute
  (:func:`masked_logits`); ``full_held_ppl``: the same at full depth. One reply as long as the
  whole held text would put its late tokens at min_depth for any alpha < 1.
- ``layer_ratio``, ``work_ratio`` and ``realized_speedup`` (design.md §8), from timed runs with
  stop tokens disabled, so D³ and full depth decode the same number of steps on the same prompts:
  each prompt alone (batch 1), full depth then D³ back to back, within the same run;
  realized = D³ decode tokens/s over full-depth decode tokens/s.

Weight formats (``formats=``, issue 13 §2): extra rows, each the model's checkpoint in another
weight format at full depth (:func:`with_weights`), compared with the *float* weights (the
model's dequantization, ``quantize=None``, in the same activation dtype) at full depth rather
than with the model's own full depth: ``exact_match``/``first_divergence`` of its greedy
replies vs the float weights'; ``nll`` of the float weights' replies under the format's model
(``full_nll``: under the float weights; so ΔNLL is what the format loses predicting them);
``held_ppl`` of the held text at full depth; ``work_ratio`` = float bytes / the format's bytes
per step; ``realized_speedup`` = its decode tokens/s over the float weights', timed back to back.
Their ``weights`` names the format (None on the D³ rows).

Nothing here is fetched: the default prompt set and held text ship in ``d3kernels/data``.
"""
from __future__ import annotations

import csv
import itertools
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from d3kernels import quant
from d3kernels.model import LlamaD3
from d3kernels.schedule import DepthSchedule

DATA_DIR = Path(__file__).parent / "data"
HELD_INSTRUCTION = "Write a short passage of descriptive prose about a small seaside town."

CSV_FIELDS = ("alpha", "start", "min_depth", "head", "tail", "order", "exact_match",
              "mean_first_divergence", "nll", "full_nll", "delta_nll", "held_ppl",
              "full_held_ppl", "layer_ratio", "work_ratio", "decode_tokens_per_s",
              "full_decode_tokens_per_s", "realized_speedup", "mean_new_tokens")
# Weight formats to evaluate (see with_weights); "int4:32" etc. also name a group size.
FORMAT_NAMES = ("auto", "none", "int8", "int4")


# ---- data ---------------------------------------------------------------------------------------

def load_prompts(path: str | Path | None = None) -> list[str]:
    """Prompts from a file, one per line; blank lines and lines starting with '#' are skipped.
    None: the shipped set (``d3kernels/data/prompts.txt``, written for d3kernels, Apache-2.0)."""
    path = DATA_DIR / "prompts.txt" if path is None else Path(path)
    prompts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line; '#' lines are comments)")
    return prompts


def load_held_text(path: str | Path | None = None) -> str:
    """A held text to score; None: the shipped one (``d3kernels/data/held.txt``, ~420 words,
    written for d3kernels, Apache-2.0)."""
    path = DATA_DIR / "held.txt" if path is None else Path(path)
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise ValueError(f"{path}: the held text is empty")
    return text


# ---- masked full-sequence forward ---------------------------------------------------------------

@torch.inference_mode()
def masked_logits(model, input_ids, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, T, V] over input_ids [B, T] (or [T]) where position t runs layer j only where
    keep[b, t, j] (keep [B, T, L] or [T, L] bool; None: every layer everywhere).

    A skipped layer passes position t's residual through unchanged, while every later position
    still attends to the K/V that layer computes from t's residual as it reaches the layer: D³'s
    ``propagate`` semantics by construction (the oracle's masked recompute, design.md §2), on the
    model's own torch building blocks. float32 logits (float64 for a float64 model); no cache.
    """
    ids = torch.as_tensor(input_ids, device=model.device)
    if ids.dim() == 1:
        ids = ids[None]
    L = model.config.num_layers
    B, T = ids.shape
    if T == 0 or T > model.max_seq_len:
        raise ValueError(f"input_ids: need 1..{model.max_seq_len} tokens, got {T}")
    if keep is not None:
        keep = torch.as_tensor(keep, device=model.device, dtype=torch.bool)
        if keep.dim() == 2 and tuple(keep.shape) == (T, L):
            keep = keep[None].expand(B, T, L)
        if tuple(keep.shape) != (B, T, L):
            raise ValueError(f"keep must be [B, T, L] = {[B, T, L]}, got {list(keep.shape)}")
    cos, sin = model.rope_cos[:T, None], model.rope_sin[:T, None]
    x = model._torch.embed(ids)  # vocab-parallel under tensor parallel
    for j in range(L):
        q, k, v = model._torch.qkv(j, x, cos, sin)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out = model._torch.finish_layer(j, x, attn)
        x = out if keep is None else torch.where(keep[:, :, j, None], out, x)
    return model._torch.head(x)


def reply_keep(schedule: DepthSchedule, num_layers: int, prefix_len: int, total_len: int,
               reply_len: int | None = None) -> torch.Tensor:
    """keep [total_len, L] for a sequence of ``prefix_len`` prompt tokens then a reply: the pass
    at position prefix_len - 1 + i predicts reply token i at depth n_i; earlier positions (the
    prompt) run at full depth. reply_len: the schedule restarts every reply_len tokens (the text
    read as consecutive replies of that length, each one's first token predicted at full depth,
    as a chat's next turn would; earlier replies keep the depths they ran at)."""
    keep = torch.ones(total_len, num_layers, dtype=torch.bool)
    for p in range(prefix_len, total_len):
        i = p - (prefix_len - 1)
        depth = schedule.depth(i if reply_len is None else i % reply_len, num_layers)
        if depth < num_layers:
            kept = schedule.kept_layers(depth, num_layers)
            keep[p] = False
            keep[p, list(kept)] = True
    return keep


def _reply_nll(logits: torch.Tensor, ids: list[int], prefix_len: int) -> torch.Tensor:
    """Per-token NLL (float64) of ids[prefix_len:] under logits [T, V] of ids."""
    targets = torch.tensor(ids[prefix_len:], device=logits.device)
    pred = logits[prefix_len - 1:len(ids) - 1]  # float32, or float64 for a float64 model
    return F.cross_entropy(pred, targets, reduction="none").double().cpu()


# ---- weight formats -----------------------------------------------------------------------------

def parse_format(spec: str) -> tuple[str | None, int | None]:
    """A weight format as (quantize, group_size) for :func:`with_weights`: "auto", "none",
    "int8", "int4", or "int8:G" / "int4:G" with a group size G in 32, 64, 128."""
    name, colon, group = str(spec).partition(":")
    ok = name in FORMAT_NAMES and (not colon or name in quant.FORMATS and group.isdigit()
                                   and int(group) in quant.GROUP_SIZES)
    if not ok:
        raise ValueError(f"weight format must be one of {', '.join(FORMAT_NAMES)}, or int8:G / "
                         f"int4:G with G in {quant.GROUP_SIZES}; got {spec!r}")
    return (None if name == "none" else name), (int(group) if group else None)


def with_weights(model: LlamaD3, quantize: str | None, group_size: int | None = None) -> LlamaD3:
    """The model with its weights in another format (same checkpoint, activation dtype, device,
    backend, tokenizer and backfill): "auto" is the model itself, None its float weights (a
    quantized model's dequantization), "int8"/"int4" those float weights quantized at load.
    A float model in bf16/fp16 is quantized from its weights as rounded to that dtype; int4
    without a group size takes the model's default (LlamaD3: 64 on SmolLM2, hidden 576)."""
    if quantize == "auto":
        return model
    cfg = model.config
    # float64 for a float64 model, else float32 (what QuantizedWeight.dequantize computes in)
    work = torch.float64 if model.dtype == torch.float64 else torch.float32
    return LlamaD3(cfg, model.dequantized_state_dict(work), tokenizer=model.tokenizer,
                   dtype=model.dtype, device=model.device, backend=model.backend,
                   max_seq_len=model.max_seq_len, backfill=model.backfill,
                   backfill_timing=model.backfill_timing, quantize=quantize,
                   group_size=group_size)


# ---- results ------------------------------------------------------------------------------------

@dataclass
class ScheduleResult:
    """One schedule's metrics (see the module docstring); ``tokens`` are its greedy outputs.
    ``weights``: None for a D³ schedule row (the model's own weights, against its full depth);
    a weight-format row's format (e.g. ``"int4 g64"``, full depth, against the float weights)."""

    schedule: DepthSchedule
    exact_match: float
    first_divergence: list[int | None]
    nll: float
    full_nll: float
    held_ppl: float | None
    full_held_ppl: float | None
    layer_ratio: float
    work_ratio: float
    decode_tokens_per_s: float
    full_decode_tokens_per_s: float
    mean_new_tokens: float
    tokens: list[list[int]] = field(default_factory=list, repr=False)
    full_lengths: list[int] = field(default_factory=list, repr=False)
    weights: str | None = None

    @property
    def label(self) -> str:
        """The schedule (:func:`describe`), or a weight-format row's format."""
        return describe(self.schedule) if self.weights is None else f"weights {self.weights}"

    @property
    def delta_nll(self) -> float:
        return self.nll - self.full_nll

    @property
    def realized_speedup(self) -> float:
        if not self.full_decode_tokens_per_s:
            return float("nan")
        return self.decode_tokens_per_s / self.full_decode_tokens_per_s

    @property
    def mean_first_divergence(self) -> float:
        """Mean index of the first differing token; an identical output counts as the length
        of the full-depth output (it did not diverge within it: a lower bound)."""
        vals = [n if d is None else d for d, n in zip(self.first_divergence, self.full_lengths)]
        return sum(vals) / len(vals) if vals else float("nan")

    def row(self) -> dict:
        """The CSV row: schedule fields then metrics (None and NaN as empty cells), then
        ``weights`` on a weight-format row."""
        s = self.schedule
        order = s.order if isinstance(s.order, str) else ",".join(map(str, s.order))
        row = {"alpha": s.alpha, "start": s.start, "min_depth": s.min_depth, "head": s.head,
               "tail": s.tail, "order": order}
        for name in CSV_FIELDS[6:]:
            row[name] = getattr(self, name)
        if self.weights is not None:
            row["weights"] = self.weights
        return {k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                for k, v in row.items()}


def describe(schedule: DepthSchedule) -> str:
    """A short label: 'a=0.99 lower' plus whatever differs from the defaults."""
    s = schedule
    if s.is_full_depth:
        return "full depth (a=1)"
    # an explicit order (e.g. calibrated) by its first layers dropped, so two differ in the table
    order = s.order
    if not isinstance(order, str):
        order = "order " + ",".join(map(str, order[:3])) + ",…"
    label = f"a={s.alpha:g} {order}"
    if s.start:
        label += f" start={s.start}"
    if s.min_depth is not None:
        label += f" min={s.min_depth}"
    if (s.head, s.tail) != (4, 2):
        label += f" h/t={s.head}/{s.tail}"
    return label


# ---- the sweep ----------------------------------------------------------------------------------

def schedule_grid(alphas=(1.0, 0.995, 0.99, 0.98), starts=(0,), min_depths=(None,), heads=(4,),
                  tails=(2,), orders=("lower",)) -> list[DepthSchedule]:
    """Every combination as a DepthSchedule (invalid ones raise ValueError). alpha = 1 decodes at
    full depth whatever the rest, so it appears once."""
    out, seen_full = [], False
    for a, st, md, h, t, o in itertools.product(alphas, starts, min_depths, heads, tails, orders):
        s = DepthSchedule(alpha=a, start=st, min_depth=md, head=h, tail=t, order=o)
        if s.is_full_depth:
            if seen_full:
                continue
            seen_full = True
        if s not in out:
            out.append(s)
    return out


def _prompt_ids(model, prompts, chat: bool) -> list[list[int]]:
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings or of token-id lists")
    tok = model.tokenizer
    out = []
    for r, p in enumerate(prompts):
        if isinstance(p, str):
            if tok is None:
                raise ValueError(f"prompts[{r}] is a string but the model has no tokenizer: pass "
                                 "token ids")
            p = (tok.encode_chat([{"role": "user", "content": p}])
                 if chat and tok.chat_template is not None else tok.encode(p))
        out.append(list(p))
    return out


def _held_ids(model, held_text, chat: bool) -> tuple[list[int], int] | None:
    """(prefix + held ids, prefix length). A string: the reply to HELD_INSTRUCTION under the chat
    template, or (no template) the tokenized text whose first token is the prefix. Token ids: the
    first is the prefix, the rest the reply."""
    if held_text is None:
        return None
    tok = model.tokenizer
    if isinstance(held_text, str):
        if tok is None:
            raise ValueError("held_text is a string but the model has no tokenizer: pass ids")
        if chat and tok.chat_template is not None:
            prefix = tok.encode_chat([{"role": "user", "content": HELD_INSTRUCTION}])
            return prefix + tok.encode(held_text, add_special_tokens=False), len(prefix)
        ids = tok.encode(held_text)
    else:
        ids = [int(t) for t in held_text]
    if len(ids) < 2:
        raise ValueError("held_text must give at least 2 tokens (a prefix and one to score)")
    return ids, 1


def _timed(runs, prompts: list[list[int]], n: int, kwargs: dict, repeats: int):
    """Each prompt alone, stop tokens off, the runs ((model, schedule) pairs: full depth and
    D³, or the float weights and a weight format) timed back to back (so a load spike on the
    machine hits both), the fastest of ``repeats`` kept per prompt. Returns, per run, (decode
    tokens, decode seconds, steps, layers run, full bytes, D³ bytes) summed over prompts."""
    def run(p, m, sched):
        s = m.generate([p], n, sched, temperature=0.0, stop_tokens=(), **kwargs).stats
        return (s.decode_tokens, s.decode_seconds, s.decode_steps, s.layers_run, s.full_bytes,
                s.d3_bytes)

    totals = [[0, 0.0, 0, 0, 0, 0] for _ in runs]
    for p in prompts:
        best = [None] * len(runs)
        for _ in range(repeats):
            for k, (m, sched) in enumerate(runs):
                r = run(p, m, sched)
                if best[k] is None or r[1] < best[k][1]:
                    best[k] = r
        for tot, r in zip(totals, best):
            for k, v in enumerate(r):
                tot[k] += v
    return totals


def _divergence(outputs: list[list[int]], reference: list[list[int]]) -> list[int | None]:
    """Per prompt, the index of the first token where output and reference differ (where the
    shorter ends, for a prefix); None where they are equal."""
    return [None if a == b else next((i for i, (x, y) in enumerate(zip(a, b)) if x != y),
                                     min(len(a), len(b)))
            for a, b in zip(outputs, reference)]


def evaluate(model, prompts, schedules, max_new_tokens: int = 32, held_text=None, *,
             progress: bool = True, chat: bool = True,
             timing_repeats: int = 1, held_reply_tokens: int | None = None,
             generate_kwargs: dict | None = None, formats=None) -> list[ScheduleResult]:
    """Measure each schedule against full depth on ``prompts`` (module docstring for the metrics).

    prompts: strings (chat-templated when ``chat`` and the tokenizer has a template) or token-id
    lists. schedules: DepthSchedules (alpha = 1 gives the full-depth row: agreement 1, ΔNLL 0).
    held_text: a string, token ids (the first is the prefix), or None to skip held perplexity.
    held_reply_tokens: the schedule restarts every N held tokens (consecutive replies of N
    tokens; see :func:`reply_keep`); None: N = max_new_tokens, the replies the prompts get.
    N at least the held text's length reads it as one reply, whose late tokens then all run at
    min_depth for any alpha < 1.
    timing_repeats: timed runs of each prompt per schedule; the fastest is kept.
    progress: a tqdm bar on stderr. generate_kwargs: more arguments for every ``generate`` call
    (e.g. a backfill mode; within one reply it changes speed, never tokens: design.md §2).
    formats: weight formats (:func:`parse_format` strings: "auto", "none", "int8", "int4",
    "int4:32", ...) to evaluate after the schedules, each at full depth against the float
    weights (module docstring); every format's model is built before any decoding, so a bad
    one fails first. None: no weight rows.
    Returns one ScheduleResult per schedule, in order, then one per format.
    """
    kw = dict(generate_kwargs or {})
    fixed = {"temperature", "top_k", "top_p", "seed", "stop_tokens", "stream"} & set(kw)
    if fixed:
        raise ValueError(f"generate_kwargs: {sorted(fixed)} are set by evaluate (greedy; the "
                         "model's stop tokens for quality, none for timing)")
    schedules = list(schedules)
    L = model.config.num_layers
    if not schedules or not all(isinstance(s, DepthSchedule) for s in schedules):
        raise ValueError("schedules must be a non-empty list of DepthSchedule")
    for s in schedules:
        s.validate(L)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 2:
        raise ValueError(f"max_new_tokens must be an int >= 2 (one decode step to time), got "
                         f"{max_new_tokens!r}")
    if timing_repeats < 1:
        raise ValueError(f"timing_repeats must be >= 1, got {timing_repeats}")
    if held_reply_tokens is not None and (isinstance(held_reply_tokens, bool) or not isinstance(
            held_reply_tokens, int) or held_reply_tokens < 1):
        raise ValueError(f"held_reply_tokens must be None or an int >= 1, got "
                         f"{held_reply_tokens!r}")
    if held_reply_tokens is None:
        held_reply_tokens = max_new_tokens
    specs = [parse_format(f) for f in dict.fromkeys(formats or ())]
    ids = _prompt_ids(model, prompts, chat)
    held = _held_ids(model, held_text, chat)
    float_model = with_weights(model, None) if specs else None
    variants = [float_model if spec == (None, None) else with_weights(model, *spec)
                for spec in specs]
    from tqdm.auto import tqdm

    def log(msg):
        if progress:
            tqdm.write(f"d3kernels eval: {msg}", file=sys.stderr)

    nll_cache: dict[tuple, torch.Tensor] = {}  # the models all live until evaluate returns

    def output_nll(m, outputs: list[list[int]]) -> float:
        """Mean NLL per token of the outputs under model m."""
        total, count = 0.0, 0
        for p, gen in zip(ids, outputs):
            key = (id(m), tuple(p), tuple(gen))
            if key not in nll_cache:
                logits = m.logits(torch.tensor([p + gen]))[0]
                nll_cache[key] = _reply_nll(logits, p + gen, len(p))
            total += float(nll_cache[key].sum())
            count += len(gen)
        return total / count

    def held_ppl(m, schedule) -> float | None:
        if held is None:
            return None
        seq, prefix = held
        keep = None if schedule is None or schedule.is_full_depth \
            else reply_keep(schedule, L, prefix, len(seq), held_reply_tokens)
        logits = masked_logits(m, torch.tensor([seq]), keep)[0]
        return math.exp(float(_reply_nll(logits, seq, prefix).mean()))

    log(f"full-depth baseline on {len(ids)} prompts, {max_new_tokens} new tokens each")
    full = model.generate(ids, max_new_tokens, None, temperature=0.0, **kw)
    full_nll = output_nll(model, full.tokens)
    full_held = held_ppl(model, None)
    # Warm-up: neither timed run pays first-call costs (allocation, compilation, graphs).
    model.generate([ids[0]], 2, None, stop_tokens=(), **kw)
    for s in schedules:
        model.generate([ids[0]], min(max_new_tokens, 4), s, stop_tokens=(), **kw)

    results = []
    bar = tqdm(schedules, desc="d3kernels eval", unit="schedule", file=sys.stderr,
               disable=not progress)
    for s in bar:
        bar.set_postfix_str(describe(s))
        out = model.generate(ids, max_new_tokens, s, temperature=0.0, **kw)
        divergence = _divergence(out.tokens, full.tokens)
        best_full, best_d3 = _timed(((model, None), (model, s)), ids, max_new_tokens, kw,
                                    timing_repeats)
        tokens, seconds, steps, layers, full_bytes, d3_bytes = best_d3
        results.append(ScheduleResult(
            schedule=s,
            exact_match=sum(d is None for d in divergence) / len(ids),
            first_divergence=divergence,
            nll=output_nll(model, out.tokens),
            full_nll=full_nll,
            held_ppl=held_ppl(model, s),
            full_held_ppl=full_held,
            layer_ratio=L * steps / layers if layers else 1.0,
            work_ratio=full_bytes / d3_bytes if d3_bytes else 1.0,
            decode_tokens_per_s=tokens / seconds if seconds else 0.0,
            full_decode_tokens_per_s=best_full[0] / best_full[1] if best_full[1] else 0.0,
            mean_new_tokens=sum(map(len, out.tokens)) / len(ids),
            tokens=out.tokens,
            full_lengths=[len(t) for t in full.tokens],
        ))
    bar.close()
    if not variants:
        return results

    log(f"weight formats {', '.join(v.weight_format for v in variants)} at full depth, against "
        f"the {float_model.weight_format} weights")
    base = float_model.generate(ids, max_new_tokens, None, temperature=0.0, **kw)
    base_nll = output_nll(float_model, base.tokens)
    base_held = held_ppl(float_model, None)
    for m in {id(v): v for v in (float_model, *variants)}.values():  # warm-up, as above
        m.generate([ids[0]], 2, None, stop_tokens=(), **kw)
    for m in variants:
        out = m.generate(ids, max_new_tokens, None, temperature=0.0, **kw)
        divergence = _divergence(out.tokens, base.tokens)
        best_base, best = _timed(((float_model, None), (m, None)), ids, max_new_tokens, kw,
                                 timing_repeats)
        results.append(ScheduleResult(
            schedule=DepthSchedule.full(),
            exact_match=sum(d is None for d in divergence) / len(ids),
            first_divergence=divergence,
            nll=output_nll(m, base.tokens),  # the float weights' replies, scored by m
            full_nll=base_nll,
            held_ppl=held_ppl(m, None),
            full_held_ppl=base_held,
            layer_ratio=1.0,
            work_ratio=best_base[5] / best[5],  # bytes per full-depth step: float / format
            decode_tokens_per_s=best[0] / best[1] if best[1] else 0.0,
            full_decode_tokens_per_s=best_base[0] / best_base[1] if best_base[1] else 0.0,
            mean_new_tokens=sum(map(len, out.tokens)) / len(ids),
            tokens=out.tokens,
            full_lengths=[len(t) for t in base.tokens],
            weights=m.weight_format,
        ))
    return results


# ---- choosing, writing, plotting ----------------------------------------------------------------

def best_under_budget(results: list[ScheduleResult], max_nll_increase: float | None = None,
                      min_agreement: float | None = None) -> ScheduleResult | None:
    """The fastest result (realized speedup, then work ratio) whose delta_nll <= max_nll_increase
    and exact_match >= min_agreement (each budget only when given; at least one is needed).
    None when no result meets the budget. The results must be of one kind, D³ schedule rows or
    weight-format rows: their speedups are against different baselines."""
    if max_nll_increase is None and min_agreement is None:
        raise ValueError("best_under_budget: give max_nll_increase, min_agreement or both")
    if len({r.weights is None for r in results}) > 1:
        raise ValueError("best_under_budget: pass D³ schedule rows or weight-format rows, not "
                         "both (their speedups are against different baselines)")
    ok = [r for r in results
          if (max_nll_increase is None or r.delta_nll <= max_nll_increase)
          and (min_agreement is None or r.exact_match >= min_agreement)]
    if not ok:
        return None

    def speed(r):
        sp = r.realized_speedup
        return (-math.inf if math.isnan(sp) else sp, r.work_ratio)

    return max(ok, key=speed)


def pareto_front(results: list[ScheduleResult], quality: str = "delta_nll") -> list[int]:
    """Indices of the results no other beats on both realized speedup and quality (lower
    delta_nll, or higher exact_match), sorted by speedup."""
    sign = -1.0 if quality == "delta_nll" else 1.0
    pts = [(r.realized_speedup, sign * getattr(r, quality)) for r in results]
    front = [i for i, (s, q) in enumerate(pts)
             if not any(s2 >= s and q2 >= q and (s2 > s or q2 > q) for s2, q2 in pts)]
    return sorted(front, key=lambda i: pts[i][0])


def write_csv(results: list[ScheduleResult], path: str | Path) -> Path:
    """One row per result: alpha, start, min_depth, head, tail, order, then the metrics; when
    there are weight-format rows, a last column ``weights`` (empty on the D³ rows)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = CSV_FIELDS + (("weights",) if any(r.weights for r in results) else ())
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in results:
            w.writerow(r.row())
    return path


def plot(results: list[ScheduleResult], path: str | Path, title: str | None = None) -> Path:
    """A PNG: ΔNLL and exact-match rate against realized speedup, one point per schedule, the
    Pareto front of each drawn as a line; weight-format rows (against the float weights) as
    green squares off the front. Needs matplotlib (``pip install d3kernels[plot]``)."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install 'd3kernels[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    d3 = [r for r in results if r.weights is None]
    formats = [r for r in results if r.weights is not None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (quality, label) in zip(axes, (("delta_nll", "ΔNLL vs full depth (nats/token)"),
                                           ("exact_match", "exact match with full depth"))):
        for rows, style in ((d3, dict(color="tab:blue")),
                            (formats, dict(color="tab:green", marker="s",
                                           label="weights vs float, full depth"))):
            if not rows:
                continue
            ax.scatter([r.realized_speedup for r in rows], [getattr(r, quality) for r in rows],
                       zorder=2, **style)
            for r in rows:
                ax.annotate(r.label, (r.realized_speedup, getattr(r, quality)), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        xs = [r.realized_speedup for r in d3]
        ys = [getattr(r, quality) for r in d3]
        front = pareto_front(d3, quality)
        ax.plot([xs[i] for i in front], [ys[i] for i in front], color="tab:red", marker="o",
                markerfacecolor="none", markersize=10, zorder=1, label="Pareto front")
        ax.set_xlabel("realized decode speedup (× full depth)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(title or "D³ schedules: quality against realized speedup")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_table(results: list[ScheduleResult]) -> str:
    """A fixed-width table of the main metrics, one line per schedule; weight-format rows
    after them, under a line saying what they are compared with."""
    head = (f"{'schedule':<28} {'match':>5} {'1st div':>7} {'ΔNLL':>7} {'held ppl':>9} "
            f"{'layer':>6} {'work':>6} {'realized':>8}")
    lines = [head, "-" * len(head)]
    d3 = [r for r in results if r.weights is None]
    formats = [r for r in results if r.weights is not None]
    for r in d3 + formats:
        if formats and r is formats[0]:
            lines.append("-- weight formats at full depth, against the float weights' replies "
                         "and speed:")
        ppl = "-" if r.held_ppl is None else (f"{r.held_ppl:.2f}" if r.held_ppl < 1e5
                                              else f"{r.held_ppl:.2e}")
        lines.append(f"{r.label:<28} {r.exact_match:5.2f} "
                     f"{r.mean_first_divergence:7.1f} {r.delta_nll:+7.3f} {ppl:>9} "
                     f"{r.layer_ratio:5.2f}x {r.work_ratio:5.2f}x {r.realized_speedup:7.2f}x")
    return "\n".join(lines)
