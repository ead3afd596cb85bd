"""The D³ decoding loop: prefill at full depth, then one decode pass per token at depth n_i."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from d3kernels.kv_cache import KVCache
from d3kernels.sampling import Sampling
from d3kernels.schedule import DepthSchedule
from d3kernels.stats import GenerationStats, step_bytes


@dataclass(frozen=True)
class StreamedToken:
    """One generated token: which prompt it extends, its id, its index i and its pass's depth."""

    row: int
    token: int
    index: int
    depth: int


@dataclass
class GenerationOutput:
    """tokens[r] / depths[r]: the ids generated for prompt r and the depth of each one's pass
    (stop token included); texts[r]: their decoded text when the model has a tokenizer."""

    tokens: list[list[int]]
    depths: list[list[int]]
    stats: GenerationStats
    texts: list[str] | None = None


@dataclass
class _Plan:
    prompts: list[list[int]]
    max_new_tokens: int
    schedule: DepthSchedule
    sampling: Sampling
    stop_tokens: frozenset[int]
    cache: KVCache | None = None       # a cache that already holds each row's history
    past_lengths: list[int] | None = None  # tokens of history per row in ``cache``
    backfill: str = "propagate"
    backfill_timing: str = "deferred"
    flush_backfill: bool = False


def _as_token_lists(model, prompts) -> list[list[int]]:
    """One prompt or a batch, as strings, id lists or a tensor -> a list of id lists."""
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                    and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a string, a list of token ids, or a non-empty list of "
                         f"those, got {prompts!r}")
    out = []
    for r, p in enumerate(prompts):
        if isinstance(p, str):
            if model.tokenizer is None:
                raise ValueError(f"prompts[{r}] is a string but the model has no tokenizer: "
                                 "pass token ids")
            p = model.tokenizer.encode(p)
        if not isinstance(p, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in p):
            raise ValueError(f"prompts[{r}] must be a string or a list of int token ids")
        if not p:
            raise ValueError(f"prompts[{r}] is empty: a prompt needs at least one token")
        bad = [t for t in p if not 0 <= t < model.config.vocab_size]
        if bad:
            raise ValueError(f"prompts[{r}]: token id {bad[0]} is outside the vocabulary "
                             f"[0, {model.config.vocab_size})")
        out.append(list(p))
    return out


def right_padded(prompts: list[list[int]]) -> torch.Tensor:
    """Token id lists -> long [B, longest] on the CPU, each row right-padded with 0."""
    ids = torch.zeros(len(prompts), max(len(p) for p in prompts), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, :len(p)] = torch.tensor(p)
    return ids


def _plan(model, prompts, max_new_tokens, schedule, temperature, top_k, top_p, seed,
          stop_tokens, cache=None, past_lengths=None, backfill=None, backfill_timing=None,
          flush_backfill=False, sampling: Sampling | None = None) -> _Plan:
    """Validate every argument before any work, so bad input changes nothing. sampling: a
    sampler already bound to the model (a conversation's, one random stream across turns)
    instead of a new one; binding comes last, as under tensor parallel it is a collective."""
    token_lists = _as_token_lists(model, prompts)
    backfill, backfill_timing = model.resolve_backfill(backfill, backfill_timing)
    if not isinstance(flush_backfill, bool):
        raise ValueError(f"flush_backfill must be a bool, got {flush_backfill!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if (cache is None) != (past_lengths is None):
        raise ValueError("cache and past_lengths go together: pass both (to continue from a "
                         "cache holding history) or neither")
    if cache is None:
        longest = max(len(p) for p in token_lists)
        if longest + max_new_tokens > model.max_seq_len:
            raise ValueError(f"prompt of {longest} tokens plus max_new_tokens={max_new_tokens} "
                             f"exceeds the cache (max_seq_len={model.max_seq_len})")
    else:
        if not isinstance(cache, KVCache):
            raise ValueError(f"cache must be a KVCache, got {type(cache).__name__}")
        if cache.k.dtype != model.dtype or cache.k.device.type != model.device.type \
                or cache.k.shape[0] != model.config.num_layers:
            raise ValueError("cache was not made for this model (its layers, dtype or device "
                             "differ)")
        if len(token_lists) > cache.batch_size:
            raise ValueError(f"{len(token_lists)} prompts but the cache has "
                             f"{cache.batch_size} rows")
        past_lengths = list(past_lengths)
        if len(past_lengths) != len(token_lists) or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in past_lengths):
            raise ValueError(f"past_lengths must hold one int >= 0 per prompt, got "
                             f"{past_lengths!r}")
        capacity = min(cache.seq_len, model.max_seq_len)
        for r, (n, p) in enumerate(zip(past_lengths, token_lists)):
            if n + len(p) + max_new_tokens > capacity:
                raise ValueError(f"row {r}: {n} cached tokens + a prompt of {len(p)} tokens + "
                                 f"max_new_tokens={max_new_tokens} exceed the cache "
                                 f"({capacity} tokens)")
    schedule = DepthSchedule.full() if schedule is None else schedule
    if not isinstance(schedule, DepthSchedule):
        raise ValueError(f"schedule must be a DepthSchedule or None, got {schedule!r}")
    schedule.validate(model.config.num_layers)
    unbound = Sampling(temperature, top_k, top_p, seed)
    if stop_tokens is None:
        stop_tokens = (model.tokenizer.stop_token_ids if model.tokenizer is not None
                       else model.config.eos_token_ids)
    stop_tokens = frozenset(stop_tokens)
    if not all(isinstance(t, int) and 0 <= t < model.config.vocab_size for t in stop_tokens):
        raise ValueError(f"stop_tokens must be token ids in [0, {model.config.vocab_size}), "
                         f"got {sorted(stop_tokens)}")
    if sampling is None:
        sampling = unbound.on(model.device, model.tp)
    return _Plan(token_lists, max_new_tokens, schedule, sampling, stop_tokens, cache,
                 past_lengths, backfill, backfill_timing, flush_backfill)


class _HostTokens:
    """A step's tokens [B] (long) on their way to the host. On a GPU the copy starts now, into
    pinned memory, and ``tolist`` waits for it alone (an event), not for the steps enqueued
    after it; elsewhere every op has run by the time it returns, and the tokens are read now.
    Either way the read is taken before the next step runs: the triton backend returns its
    token buffer, which the next step overwrites in place."""

    def __init__(self, tokens: torch.Tensor):
        self._done = None
        if tokens.device.type == "cuda":
            self._tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._tokens.copy_(tokens, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record()
        else:
            self._tokens = tokens.tolist()

    def tolist(self) -> list[int]:
        if self._done is None:
            return self._tokens
        self._done.synchronize()
        return self._tokens.tolist()


@dataclass
class _Step:
    """A decode step enqueued on the device whose tokens the host has not read yet."""

    index: int               # it predicts T_index
    depth: int
    tokens: torch.Tensor     # on the device: the next step's input
    host: _HostTokens
    sampling_state: tuple    # the sampler's state before it, to undo a discarded step
    backfill_bytes: int      # what its eager backfill read
    enqueue_seconds: float   # host time to enqueue it (on the CPU: to run it)


def _sampling_state(s: Sampling) -> tuple:
    return s.draws, None if s.generator is None else s.generator.get_state()


def _restore_sampling(s: Sampling, state: tuple) -> None:
    s.draws = state[0]
    if state[1] is not None:
        s.generator.set_state(state[1])


@torch.inference_mode()
def _run(model, plan: _Plan, lookahead: bool | None = None) -> Iterator[StreamedToken]:
    """Yields tokens as they are made; returns the GenerationOutput (StopIteration.value).

    lookahead: enqueue step i + 1 on the device tokens of step i before the host reads them
    (``generate_stream`` says what that buys and costs); None: on a CUDA device, where kernels
    run asynchronously (elsewhere every op has run when it returns, so there is no wait to
    hide and a discarded step would cost its full time). False: read each step's tokens before
    enqueuing the next; for benchmarks of the difference.
    """
    if lookahead is None:
        lookahead = model.device.type == "cuda"
    cfg, L = model.config, model.config.num_layers
    elem = model.weight_bytes
    prompts = plan.prompts
    B, lengths = len(prompts), [len(p) for p in prompts]
    past = plan.past_lengths
    if plan.cache is None:
        cache = model.new_cache(B, max(lengths) + plan.max_new_tokens)
    else:
        cache = plan.cache
    ids = right_padded(prompts)
    tokens = [[] for _ in range(B)]
    depths = [[] for _ in range(B)]
    finished = [False] * B
    # step i reads T_{i-1}, at slot base[r] + i - 1 of row r
    base = list(lengths) if past is None else [n + p for n, p in zip(lengths, past)]

    def take(step_tokens: list[int], i: int, depth: int) -> Iterator[StreamedToken]:
        for r, t in enumerate(step_tokens):
            if not finished[r]:
                tokens[r].append(t)
                depths[r].append(depth)
                finished[r] = t in plan.stop_tokens
                yield StreamedToken(r, t, i, depth)

    def enqueue(i: int, prev: torch.Tensor) -> _Step | None:
        """Decode step i on the device tokens prev of step i - 1, if it is still needed as far
        as the host knows (a step never runs past max_new_tokens, so never past the cache)."""
        if i >= plan.max_new_tokens or all(finished):
            return None
        start = time.perf_counter()
        depth = plan.schedule.depth(i, L)
        state = _sampling_state(plan.sampling)
        before = cache.backfill_bytes
        nxt = model.decode_step(prev, [b + i - 1 for b in base],
                                plan.schedule.kept_layers(depth, L), cache, plan.sampling,
                                backfill=plan.backfill, backfill_timing=plan.backfill_timing)
        return _Step(i, depth, nxt, _HostTokens(nxt), state, cache.backfill_bytes - before,
                     time.perf_counter() - start)

    backfill_bytes0 = cache.backfill_bytes
    decode_tokens = layers_run = full_bytes = d3_bytes = steps = 0
    decode_seconds = prefill_seconds = 0.0
    discarded_bytes = 0
    ahead: _Step | None = None
    t0 = time.perf_counter()
    nxt = model.prefill(ids.to(model.device), lengths, cache, plan.sampling, past,
                        backfill=plan.backfill)
    current = _Step(0, L, nxt, _HostTokens(nxt), (), 0, 0.0)
    try:
        while current is not None:
            if lookahead:  # the device works on step i + 1 while the host reads step i
                ahead = enqueue(current.index + 1, current.tokens)
            step_tokens = current.host.tolist()  # the host needs them for stops and streaming
            i, depth = current.index, current.depth
            # each step's time: its enqueue and its read (a lookahead enqueue is the next one's)
            elapsed = time.perf_counter() - t0
            if lookahead:
                elapsed += current.enqueue_seconds - (ahead.enqueue_seconds if ahead else 0.0)
            if i == 0:
                prefill_seconds = elapsed
            else:
                steps += 1
                layers_run += depth
                contexts = [b + i for b in base]
                full_bytes += step_bytes(cfg, L, contexts, elem)
                d3_bytes += step_bytes(cfg, depth, contexts, elem)
                decode_tokens += sum(not f for f in finished)
                decode_seconds += elapsed
            yield from take(step_tokens, i, depth)
            t0 = time.perf_counter()  # the consumer's time between tokens is not counted
            if not lookahead:
                ahead = enqueue(i + 1, current.tokens)
            elif ahead is not None and all(finished):  # every row stopped on step i's token
                _restore_sampling(plan.sampling, ahead.sampling_state)
                discarded_bytes = ahead.backfill_bytes
                ahead = None
            current, ahead = ahead, None
    finally:
        if ahead is not None:  # closed mid-stream: the sampler as if the step never ran
            _restore_sampling(plan.sampling, ahead.sampling_state)

    if plan.flush_backfill:
        model.flush_backfill(cache)
    stats = GenerationStats(L, sum(lengths), prefill_seconds, decode_tokens, steps,
                            decode_seconds, layers_run, full_bytes, d3_bytes,
                            cache.backfill_bytes - backfill_bytes0 - discarded_bytes)
    texts = None
    if model.tokenizer is not None:
        texts = [model.tokenizer.decode(t) for t in tokens]
    return GenerationOutput(tokens, depths, stats, texts)


class TokenStream:
    """Iterator over StreamedToken; ``output`` holds the GenerationOutput once it is exhausted."""

    def __init__(self, run: Iterator[StreamedToken]):
        self._run = run
        self.output: GenerationOutput | None = None

    def __iter__(self):
        return self

    def __next__(self) -> StreamedToken:
        try:
            return next(self._run)
        except StopIteration as done:
            self.output = done.value
            raise StopIteration from None

    def close(self) -> None:
        """Cancel the generation now (``output`` stays None). The model and its cache stay
        usable: the next call starts afresh (a deferred backfill still owed is settled by the
        next prefill, as always). A step already enqueued ahead (CUDA, see
        :func:`generate_stream`) still runs; its sampler draw is undone."""
        self._run.close()


def generate_stream(model, prompts, max_new_tokens: int = 64,
                    schedule: DepthSchedule | None = None, *, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                    stop_tokens=None, cache: KVCache | None = None,
                    past_lengths: list[int] | None = None, backfill: str | None = None,
                    backfill_timing: str | None = None, flush_backfill: bool = False,
                    _lookahead: bool | None = None) -> TokenStream:
    """Generate up to ``max_new_tokens`` per prompt with the D³ depth schedule, as an iterator.

    prompts: a string, a list of token ids, or a batch of either (rows may differ in length).
    schedule: None decodes at full depth. temperature 0 is greedy; seed makes sampling
    repeatable. stop_tokens: None uses the tokenizer's (or config's) end tokens; () disables.
    cache, past_lengths: continue from a KVCache whose row r already holds past_lengths[r]
    tokens of history (slots 0..past_lengths[r]-1, complete at every layer): prompt r is
    prefilled at full depth at the positions after it, attending to it, and the schedule
    starts at i = 0 (multi-turn chat; :class:`d3kernels.chat.Conversation` drives this).
    None (both): a fresh cache, positions from 0. Generation writes the cache in place.
    backfill ("propagate" | "mask") and backfill_timing ("eager" | "deferred"): what skipped
    layers leave in the cache and when it is filled (see :class:`d3kernels.LlamaD3`); None:
    the model's. A deferred backfill is flushed by the next prefill on the cache; with
    flush_backfill=True it is flushed when this call ends, so the cache is complete.
    Every argument is checked here, before any work.

    On a CUDA device the loop runs one step ahead: step i + 1 is enqueued on the device tokens
    of step i before the host reads them (a copy to pinned memory that waits for step i
    alone), so the host's read, stop checks and streaming overlap the device's work instead of
    leaving it idle; stops and streaming run one step behind, and a token made for a row that
    has already stopped is dropped. When every row stops on a stop token, the step enqueued
    past it is discarded: it costs one decode pass of device time (which the next device work
    waits behind) and writes the K/V of the reply's last token at that token's slot, at that
    pass's depth; the next prefill over the slot overwrites it (the last token enters the
    cache with the next turn's prefill, design.md §2), and with deferred backfill the layers
    it skipped there stay owed until that prefill drops them (``flush_backfill=True`` fills
    them). Its sampler draw is undone and the stats count only the steps taken. No step runs
    past max_new_tokens, so none past the cache. Elsewhere (CPU), where every op has run when
    it returns, there is no wait to hide and each step's tokens are read before the next is
    enqueued. ``_lookahead`` (True / False) forces either way on any device: for benchmarks.
    """
    if _lookahead is not None and not isinstance(_lookahead, bool):
        raise ValueError(f"_lookahead must be a bool or None, got {_lookahead!r}")
    return TokenStream(_run(model, _plan(model, prompts, max_new_tokens, schedule, temperature,
                                         top_k, top_p, seed, stop_tokens, cache, past_lengths,
                                         backfill, backfill_timing, flush_backfill),
                            _lookahead))


def generate(model, prompts, max_new_tokens: int = 64, schedule: DepthSchedule | None = None, *,
             stream: Callable[[StreamedToken], None] | None = None, **kwargs) -> GenerationOutput:
    """:func:`generate_stream` run to the end; ``stream`` is called with each token as it comes."""
    tokens = generate_stream(model, prompts, max_new_tokens, schedule, **kwargs)
    for event in tokens:
        if stream is not None:
            stream(event)
    return tokens.output
