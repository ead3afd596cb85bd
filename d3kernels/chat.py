"""Multi-turn chat on one KV cache: each turn prefills only what the conversation added.

design.md §2: the prompt of every turn runs at full depth on top of the cached history, and the
D³ schedule restarts at i = 0 for each reply. A reply's last token was never passed through the
model (no decode pass consumed it), so it is not in the cache when the reply ends: it is kept
as ``pending`` and prefilled, at full depth, at the head of the next turn.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from d3kernels.generation import GenerationOutput, StreamedToken, _plan, _run
from d3kernels.kv_cache import KVCache
from d3kernels.sampling import Sampling
from d3kernels.schedule import DepthSchedule


@dataclass(frozen=True)
class Turn:
    """What one ``send`` did.

    new_ids: the ids this turn added after the previous reply (the previous reply's last token
    not included). prefill_tokens: how many tokens its prefill ran (pending token included; the
    whole conversation when ``rebuilt``). cached_tokens: history reused from the cache, not
    recomputed. rebuilt: the cache was refilled from position 0 (see ``Conversation.send``).
    """

    new_ids: list[int]
    prefill_tokens: int
    cached_tokens: int
    rebuilt: bool
    output: GenerationOutput


class Conversation:
    """A chat with a LlamaD3 that keeps one KV cache across turns (no recompute of history).

    ``model.chat(system=..., schedule=..., temperature=..., ...)`` or ``Conversation(model, ...)``.

    Args:
        model: a LlamaD3 (either backend).
        system: an optional system message (text turns only).
        schedule: the D³ schedule of every reply (None: full depth); it restarts at i = 0 for
            each reply.
        temperature, top_k, top_p, seed: sampling, as in ``generate``; one random stream runs
            through the whole conversation.
        stop_tokens: None uses the tokenizer's (or config's) end tokens; () disables.
        max_seq_len: the conversation's capacity in tokens (its own cache, allocated on the
            first turn); None: ``model.max_seq_len``.
        backfill, backfill_timing: ``"propagate"`` | ``"mask"`` and ``"eager"`` | ``"deferred"``
            (None: the model's, by default propagate/deferred; see :class:`d3kernels.LlamaD3`).
            Deferred: each reply's skipped-layer K/V is filled in one batched launch per group
            of layers when the next turn's prefill is about to read it (or on
            :meth:`flush_backfill`); a reply no turn follows never pays for it.

    Attributes:
        messages: the chat so far ([{"role", "content"}], text turns only).
        cached_ids: the ids in the cache, slot by slot.
        pending: the ids generated but not in the cache yet (the last reply's last token).
        turns: a :class:`Turn` per reply.

    Every argument is checked before any work; a turn that fails its checks (over capacity,
    bad ids, ...) raises ``ValueError`` and leaves the conversation as it was.
    """

    def __init__(self, model, system: str | None = None,
                 schedule: DepthSchedule | None = None, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop_tokens=None, max_seq_len: int | None = None,
                 backfill: str | None = None, backfill_timing: str | None = None):
        if max_seq_len is None:
            max_seq_len = model.max_seq_len
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) \
                or not 1 <= max_seq_len <= model.max_seq_len:
            raise ValueError(f"max_seq_len must be an int in [1, {model.max_seq_len}] (the "
                             f"model's max_seq_len), got {max_seq_len!r}")
        if system is not None and not isinstance(system, str):
            raise ValueError(f"system must be a string or None, got {system!r}")
        self.model = model
        self.schedule = schedule
        self.max_seq_len = max_seq_len
        self.stop_tokens = stop_tokens
        self._sampling_args = (temperature, top_k, top_p, seed)
        # Validates schedule, sampling and stop tokens now, not at the first turn.
        plan = _plan(model, [[0]], 1, schedule, *self._sampling_args, stop_tokens,
                     backfill=backfill, backfill_timing=backfill_timing)
        self._sampling: Sampling = plan.sampling
        self.backfill, self.backfill_timing = plan.backfill, plan.backfill_timing
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.cached_ids: list[int] = []
        self.pending: list[int] = []
        self.turns: list[Turn] = []
        self._cache: KVCache | None = None

    # ---- state --------------------------------------------------------------------------------

    @property
    def token_ids(self) -> list[int]:
        """The whole conversation's ids: cached, then pending."""
        return self.cached_ids + self.pending

    def __len__(self) -> int:
        return len(self.cached_ids) + len(self.pending)

    def reset(self) -> None:
        """Forget every turn (the system message stays); the cache is kept for reuse."""
        self.messages = [m for m in self.messages[:1] if m["role"] == "system"]
        self.cached_ids, self.pending, self.turns = [], [], []

    def flush_backfill(self) -> int:
        """Fill the K/V a deferred backfill still owes (the next turn would do it anyway), so
        the cache is complete now. Returns the (layer, slot) entries filled."""
        return 0 if self._cache is None else self.model.flush_backfill(self._cache)

    # ---- turns --------------------------------------------------------------------------------

    def send(self, text: str, max_new_tokens: int = 128,
             stream: Callable[[StreamedToken], None] | None = None) -> GenerationOutput:
        """Add a user message, reply to it, and return the reply's GenerationOutput
        (``texts[0]`` is the reply text; ``stats.prefill_tokens`` the tokens prefilled).

        The whole conversation is rendered with the chat template; what is new is the rendered
        text after the text already in the cache (the pending token included), tokenized and
        prefilled after the pending token at full depth.
        """
        tok = self.model.tokenizer
        if tok is None or tok.chat_template is None:
            raise ValueError("send needs a model whose tokenizer has a chat template; drive a "
                             "model without one with send_tokens(ids)")
        if not isinstance(text, str):
            raise ValueError(f"text must be a string, got {text!r}")
        messages = self.messages + [{"role": "user", "content": text}]
        rendered = tok.apply_chat_template(messages, add_generation_prompt=True)
        known = tok.decode(self.token_ids, skip_special_tokens=False)
        if rendered.startswith(known):
            new_ids = tok.encode(rendered[len(known):], add_special_tokens=False)
            out = self._turn(new_ids, max_new_tokens, stream, rebuild=False)
        else:
            # The template re-renders history differently from what was generated (it trims
            # or rewrites content, or the reply stopped on a token the template does not
            # write): fall back to re-prefilling the whole conversation from position 0.
            # Correct, but it recomputes every earlier turn.
            out = self._turn(tok.encode(rendered, add_special_tokens=False), max_new_tokens,
                             stream, rebuild=True)
        self.messages = messages + [{"role": "assistant", "content": out.texts[0]}]
        return out

    def send_tokens(self, new_ids: list[int], max_new_tokens: int = 128,
                    stream: Callable[[StreamedToken], None] | None = None) -> GenerationOutput:
        """The token-level turn ``send`` uses: prefill [pending + new_ids] after the cached
        history at full depth, then generate the reply with the schedule from i = 0.

        new_ids: what the turn adds after the previous reply (for the first turn, the whole
        prompt), e.g. the end-of-turn marker, the user message and the assistant header.
        Does not touch ``messages``.
        """
        return self._turn(new_ids, max_new_tokens, stream, rebuild=False)

    def _turn(self, new_ids, max_new_tokens, stream, rebuild: bool) -> GenerationOutput:
        m = self.model
        if isinstance(new_ids, torch.Tensor):
            new_ids = new_ids.tolist()
        if not isinstance(new_ids, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in new_ids):
            raise ValueError(f"new_ids must be a list of int token ids, got {new_ids!r}")
        if rebuild:
            past, prefill = 0, list(new_ids)
        else:
            past, prefill = len(self.cached_ids), self.pending + list(new_ids)
        if not prefill:
            raise ValueError("new_ids is empty: a turn needs at least one token to prefill")
        if isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool) \
                and past + len(prefill) + max_new_tokens > self.max_seq_len:
            raise ValueError(
                f"the conversation would exceed its cache: {past} cached tokens + "
                f"{len(prefill)} to prefill + max_new_tokens={max_new_tokens} > max_seq_len="
                f"{self.max_seq_len}; start a new conversation (or reset()), or ask for fewer "
                "tokens")
        if self._cache is None:
            self._cache = KVCache(m.config, 1, self.max_seq_len, m.dtype, m.device)
        # Every other argument (ids in the vocabulary, max_new_tokens) is checked here.
        plan = _plan(m, [prefill], max_new_tokens, self.schedule, *self._sampling_args,
                     self.stop_tokens, self._cache, [past], self.backfill, self.backfill_timing,
                     sampling=self._sampling)  # one random stream across turns
        if rebuild:  # slots 0.. are overwritten: until this turn ends, nothing is cached
            self.cached_ids, self.pending = [], []
        run = _run(m, plan)
        while True:  # the history slots stay intact if this raises (a callback, ^C)
            try:
                event = next(run)
            except StopIteration as done:
                out: GenerationOutput = done.value
                break
            if stream is not None:
                stream(event)
        reply = out.tokens[0]
        # Every reply token but the last went through a decode pass (its K/V is cached).
        self.cached_ids = self.cached_ids[:past] + prefill + reply[:-1]
        self.pending = reply[-1:]
        self.turns.append(Turn(list(new_ids), len(prefill), past, rebuild, out))
        return out
