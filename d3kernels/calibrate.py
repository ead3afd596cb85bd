"""A calibrated skip order: which flex layers a model can lose most cheaply (issue 5 §2).

    cal = calibrate(model, load_held_text(), head=4, tail=2)   # CalibrationResult
    cal.order                       # flex layers, least important first: the skip order
    cal.schedule(alpha=0.99).save("calibrated_schedule.json")  # order = that permutation
    print(cal.format_table())

The loss is the mean next-token NLL (nats per token, pooled over every scored position of the
calibration text) under teacher forcing at full sequence length, with some flex layers skipped
at *every* position (:func:`d3kernels.eval.masked_logits` with a keep mask whose column j is
False; a skipped layer passes the residual through and its K/V still come from the residual as
it reaches it: ``propagate``, design.md §2).

1. *Alone*: the loss with each flex layer j skipped by itself, minus the full-depth loss.
2. *Greedy*: starting from nothing dropped, repeatedly drop the flex layer whose removal, on top
   of those already dropped, gives the smallest loss. The drop sequence is the skip order D³
   uses (the pass of depth n drops its first L - n entries), so it is chosen the way the
   schedule consumes it: nested sets, each the cheapest extension of the previous one. The first
   greedy step evaluates exactly the alone set, so it is not recomputed.

Cost: 1 + F(F + 1)/2 forward passes over the calibration tokens for F flex layers (F = 24 on
SmolLM2-135M with head 4, tail 2: 301 passes). One pass over 256 tokens of SmolLM2 takes ~0.47 s
in float32 on 2 CPU cores, so the default ``max_tokens=256`` calibrates in about 2.5 minutes
there; cost is linear in ``max_tokens``. ``greedy_steps=k`` bounds the quadratic part for deep
models: after k greedy picks the rest follow in order of their alone delta (one pass each, to
record the loss curve).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from d3kernels.eval import _reply_nll, masked_logits
from d3kernels.schedule import DepthSchedule


@dataclass(frozen=True)
class CalibrationResult:
    """What :func:`calibrate` measured (losses: mean NLL per token, nats).

    flex: the flex layers, ascending; base_nll: the full-depth loss; alone_nll[j]: the loss with
    flex layer j alone skipped; order: the greedy drop order (a permutation of ``flex``);
    greedy_nll[k]: the loss with order[:k + 1] skipped together; candidates[k]: for greedy step
    k, {layer: loss with order[:k] plus that layer skipped} over every layer still kept (steps
    after ``greedy_steps`` are not searched and have no entry); tokens: scored positions.
    """

    num_layers: int
    head: int
    tail: int
    tokens: int
    base_nll: float
    alone_nll: dict[int, float]
    order: tuple[int, ...]
    greedy_nll: tuple[float, ...]
    candidates: tuple[dict[int, float], ...]

    @property
    def flex(self) -> tuple[int, ...]:
        return tuple(range(self.head, self.num_layers - self.tail))

    @property
    def alone_delta(self) -> dict[int, float]:
        """Loss increase when each flex layer is skipped alone."""
        return {j: v - self.base_nll for j, v in self.alone_nll.items()}

    def schedule(self, alpha: float = 0.98, start: int = 0,
                 min_depth: int | None = None) -> DepthSchedule:
        """A DepthSchedule with this head/tail and the calibrated order (explicit permutation)."""
        s = DepthSchedule(alpha=alpha, start=start, min_depth=min_depth, head=self.head,
                          tail=self.tail, order=self.order)
        s.validate(self.num_layers)
        return s

    def format_table(self) -> str:
        """Per flex layer: its alone delta and rank, and where greedy dropped it with the loss
        increase after that drop (cumulative)."""
        delta = self.alone_delta
        rank = {j: r for r, j in enumerate(sorted(delta, key=lambda j: (delta[j], j)), 1)}
        step = {j: k for k, j in enumerate(self.order)}
        head = (f"{'layer':>5} {'alone ΔNLL':>11} {'alone rank':>10} {'greedy step':>11} "
                f"{'ΔNLL after step':>15}")
        lines = [f"full-depth NLL {self.base_nll:.4f} nats/token over {self.tokens} tokens; "
                 f"core layers 0-{self.head - 1} and {self.num_layers - self.tail}-"
                 f"{self.num_layers - 1} always run", head, "-" * len(head)]
        for j in self.flex:
            k = step[j]
            lines.append(f"{j:>5} {delta[j]:+11.4f} {rank[j]:>10} {k + 1:>11} "
                         f"{self.greedy_nll[k] - self.base_nll:+15.4f}")
        lines.append(f"calibrated order: {','.join(map(str, self.order))}")
        return "\n".join(lines)


def _token_rows(model, texts_or_ids, max_tokens: int) -> list[list[int]]:
    """Calibration sequences as token-id lists, cut so their total is at most max_tokens.

    A string or a list of strings is tokenized as plain text (no chat template: the text is
    read as it is); a list of ints is one sequence; a list of lists of ints, several."""
    tok = model.tokenizer
    if isinstance(texts_or_ids, str):
        texts_or_ids = [texts_or_ids]
    if not isinstance(texts_or_ids, (list, tuple)) or not texts_or_ids:
        raise ValueError("texts_or_ids must be a non-empty string, list of strings, list of "
                         "token ids or list of token-id lists")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in texts_or_ids):
        texts_or_ids = [list(texts_or_ids)]
    rows = []
    for r, item in enumerate(texts_or_ids):
        if isinstance(item, str):
            if not item.strip():
                raise ValueError(f"texts_or_ids[{r}]: the text is empty")
            if tok is None:
                raise ValueError(f"texts_or_ids[{r}] is a string but the model has no "
                                 "tokenizer: pass token ids")
            ids = tok.encode(item)
        elif isinstance(item, (list, tuple)) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in item):
            ids = list(item)
        else:
            raise ValueError(f"texts_or_ids[{r}] must be a string or a list of token ids")
        bad = [t for t in ids if not 0 <= t < model.config.vocab_size]
        if bad:
            raise ValueError(f"texts_or_ids[{r}]: token id {bad[0]} is outside the vocabulary "
                             f"(0..{model.config.vocab_size - 1})")
        rows.append(ids)
    # Keep whole sequences in order until the budget runs out; cut the last one to fit.
    out, left = [], max_tokens
    for ids in rows:
        ids = ids[:min(left, model.max_seq_len)]
        if len(ids) >= 2:  # one position is a prefix, the rest are scored
            out.append(ids)
            left -= len(ids)
        if left < 2:
            break
    if not out:
        raise ValueError("texts_or_ids: no sequence has the 2 tokens needed to score one")
    return out


def calibrate(model, texts_or_ids, *, head: int = 4, tail: int = 2, max_tokens: int = 256,
              greedy_steps: int | None = None, progress: bool = True) -> CalibrationResult:
    """Measure how much the loss grows when flex layers are skipped; return the greedy order.

    model: a LlamaD3. texts_or_ids: calibration text (a string or strings, tokenized as plain
    text) or token ids (a list, or a list of lists); sequences are taken in order up to
    ``max_tokens`` tokens in all, and scored together as one right-padded batch [B, T] (causal
    attention: the padding never reaches a real position). head/tail: the core layers, never
    skipped; the flex layers head..L-tail-1 are ranked. greedy_steps: None searches every step;
    k stops the search after k drops and appends the rest by alone delta. progress: a tqdm bar
    on stderr, one tick per forward pass. Bad input raises ValueError naming the argument
    before any forward pass. See the module docstring for what is measured and its cost.
    """
    L = model.config.num_layers
    for name, value in (("head", head), ("tail", tail)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if head + tail >= L:
        raise ValueError(f"head + tail ({head} + {tail}) must be below the model's {L} layers "
                         "(no flex layer left to rank)")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
        raise ValueError(f"max_tokens must be an int >= 2, got {max_tokens!r}")
    flex = list(range(head, L - tail))
    if greedy_steps is not None and (isinstance(greedy_steps, bool)
                                     or not isinstance(greedy_steps, int) or greedy_steps < 1):
        raise ValueError(f"greedy_steps must be None or an int >= 1, got {greedy_steps!r}")
    steps = len(flex) if greedy_steps is None else min(greedy_steps, len(flex))
    rows = _token_rows(model, texts_or_ids, max_tokens)

    T = max(map(len, rows))
    batch = torch.tensor([ids + [0] * (T - len(ids)) for ids in rows])
    n_tokens = sum(len(ids) - 1 for ids in rows)

    from tqdm.auto import tqdm

    F_ = len(flex)
    passes = 1 + sum(F_ - k for k in range(steps)) + (F_ - steps)
    bar = tqdm(total=passes, desc="d3kernels calibrate", unit="pass", file=sys.stderr,
               disable=not progress)

    def loss(dropped) -> float:
        keep = torch.ones(T, L, dtype=torch.bool)
        keep[:, list(dropped)] = False
        logits = masked_logits(model, batch, None if not dropped else keep)
        # Each row's own length: padded positions are neither scored nor predicted from.
        total = sum(float(_reply_nll(logits[b], ids, 1).sum()) for b, ids in enumerate(rows))
        bar.update()
        return total / n_tokens

    base = loss(())
    order, greedy, candidates = [], [], []
    remaining = list(flex)
    for k in range(steps):
        bar.set_postfix_str(f"greedy step {k + 1}/{steps}")
        cand = {j: loss(order + [j]) for j in remaining}
        best = min(remaining, key=lambda j: (cand[j], j))  # ties: the lower layer
        candidates.append(cand)
        order.append(best)
        greedy.append(cand[best])
        remaining.remove(best)
    alone = candidates[0]
    for j in sorted(remaining, key=lambda j: (alone[j], j)):
        order.append(j)
        greedy.append(loss(order))
    bar.close()
    return CalibrationResult(num_layers=L, head=head, tail=tail, tokens=n_tokens, base_nll=base,
                             alone_nll=dict(alone), order=tuple(order), greedy_nll=tuple(greedy),
                             candidates=tuple(candidates))
