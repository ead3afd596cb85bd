"""Continuous batching: requests join and leave a running batch, each at its own D³ depth.

    engine = Engine(model, max_batch=8, schedule=DepthSchedule(alpha=0.99))
    a = engine.submit("Name three rivers.", max_new_tokens=64)
    b = engine.submit(ids, max_new_tokens=16, schedule=DepthSchedule.full(), temperature=0.7)
    for event in engine.run():      # StreamedToken(row=request id, token, index, depth)
        ...                         # engine.submit / engine.cancel are fine in here
    a.tokens, a.depths, a.finish_reason, a.text

The cache is paged (d3kernels.kv_cache, docs/design.md §10): ``max_batch`` rows (block tables) over
a pool of ``num_pages`` pages of ``page_size`` tokens, taken as requests grow and given back when
they end, so the engine's memory follows its tokens, not max_batch × max_seq_len. Each
:meth:`Engine.step` first takes the page each running request's next token needs (when the pool is
short it preempts the most recently admitted request: its pages go back, it returns to the front of
the queue and is recomputed when readmitted, losing nothing); then it admits waiting requests, in
submission order, while a row and the pages of their prompts are free (keeping a free page per
running request, which will soon need one), and prefills them together at full depth (their T_0);
then it runs one decode pass over the requests that were already running, each at its own step i and
so at its own depth n_i (``LlamaD3.decode_rows``: a layer runs only on the rows that keep it). Each
step gives every running request one token. A request that stops (a stop token, its
``max_new_tokens``, or :meth:`Engine.cancel`) frees its row and pages at once.

Shared prefixes (``prefix_sharing``, on by default): the full pages a prefill wrote are indexed
by their tokens (and all before them); a request whose prompt starts with the same tokens points
its block table at those pages (reference counted) and prefills only the rest. Only
prefill-written pages are shared: a page holding decode tokens had layers skipped, so its K/V
are not what a prefill of the same tokens writes (docs/design.md §10). A preempted request is
recomputed: its prompt is prefilled again (sharing what it can) and its generated tokens are
fed back through decode passes at their own depths, their choices ignored, so its cache and its
later tokens are what they would have been.
In float32/float64 a request's tokens are exactly what ``model.generate`` gives it alone
(tests/test_engine.py; in bf16/fp16 its batch-mates change the rounding — matmul blocking,
padding — as in any batched decoder, so it may drift from its solo run). With prefix sharing
that holds up to rounding: a shared prefix's K/V come from another request's prefill and the
rest of the prompt is prefilled as a chunk on top, which rounds differently from one whole
prefill (the float64 tests, tests/test_paged_engine.py, compare tokens exactly;
``prefix_sharing=False`` keeps float32 exact, preemption included). Where it is exact:
on the torch backend for greedy and seeded sampling; on the triton backend for greedy
requests and for seeded ones whose draw is not fused into the LM head kernel (top_p, or top_k
> 64). A seeded temperature/top-k request on triton draws T_0 as ``generate`` does, then its
later tokens with torch from kernel logits (one LM head pass serves every request, where the
fused draw would need one per request seed): repeatable, unaffected by its neighbours, but
not ``generate``'s tokens.

Both backends run the engine. The triton backend drives its kernels with ``rows=`` in the
cache-row layout (``TritonBackend.decode_rows``: -1-padded row tables uploaded once per step,
so on a GPU one CUDA graph per set of kept layers serves every row set), and prefills each
admitted prompt as its own batch of one on its cache row.

Where D³ pays in a mixed batch: a row that skips layer j saves layer j's attention and MLP
compute for that row, but layer j's weights are read as long as ANY row keeps it. At small
batch (bandwidth-bound decode) the saving is the layers no running request needs:
``EngineStats.union_layer_ratio`` counts them, beside the per-request ``layer_ratio``.
Admitting in waves (``min_free``) keeps rows at the same step i, so the union shrinks with
the schedule, at the cost of rows left idle until their wave ends: on SmolLM2 (CPU, 24
requests, batch 8, α 0.98; perf/RESULTS.md) ``min_free=8`` raised D³'s throughput 6–17% over
continuous admission (union layer ratio 1.37× → 2.21×) and cut its median per-token latency
13–26%, while full depth, which has nothing to align, lost 21–27%.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import torch

from d3kernels.generation import StreamedToken, _plan, right_padded
from d3kernels.kv_cache import CacheFull, KVCache
from d3kernels.sampling import RowSampling, Sampling
from d3kernels.schedule import DepthSchedule
from d3kernels.stats import step_bytes


@dataclass(eq=False)
class Request:
    """One submitted prompt and what the engine has made of it so far.

    status: ``"waiting"`` (queued), ``"running"`` (holds cache row ``slot``) or ``"finished"``;
    finish_reason: ``"stop"`` (a stop token, kept as the last token), ``"length"``
    (max_new_tokens reached) or ``"cancelled"``. tokens / depths: generated ids and the depth
    of the pass that made each; token_times: ``time.perf_counter()`` when each was made.
    fed: how many of ``tokens`` have been fed back through a decode pass (their K/V are in the
    cache); below len(tokens) - 1 while a preempted request is being recomputed.
    preemptions: how many times it lost its pages.
    """

    id: int
    prompt: list[int]
    max_new_tokens: int
    schedule: DepthSchedule
    sampling: Sampling
    stop_tokens: frozenset[int]
    submitted_at: float
    status: str = "waiting"
    finish_reason: str | None = None
    slot: int | None = None
    tokens: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    text: str | None = None
    fed: int = 0
    preemptions: int = 0

    @property
    def done(self) -> bool:
        return self.status == "finished"


@dataclass
class EngineStats:
    """Counters over an engine's life. row_steps: (request, decode step) pairs; layers_run:
    Σ n_i over them; layer_passes: Σ over decode steps of the layers any row ran (what a
    bandwidth-bound step reads); decode_steps / prefills: passes run. full_bytes / run_bytes:
    Σ over decode steps of ``step_bytes`` at full depth and at what the step ran (the weights of
    the layers any row kept, each row's KV over its own layers and context).

    Paged cache: preemptions (requests that gave their pages back), recomputed_tokens (prompt
    and generated tokens run again after one), shared_prefix_tokens (prompt tokens a prefill
    skipped because their pages were shared), peak_pages (most pages in use at once; the
    engine's ``pages_in_use`` is the current count)."""

    num_layers: int
    prefills: int = 0
    prefill_tokens: int = 0
    decode_steps: int = 0
    row_steps: int = 0
    layers_run: int = 0
    layer_passes: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    full_bytes: int = 0
    run_bytes: int = 0
    preemptions: int = 0
    recomputed_tokens: int = 0
    shared_prefix_tokens: int = 0
    peak_pages: int = 0

    @property
    def layer_ratio(self) -> float:
        """Per request, as in GenerationStats: L · row_steps / Σ n_i."""
        return self.num_layers * self.row_steps / self.layers_run if self.layers_run else 1.0

    @property
    def union_layer_ratio(self) -> float:
        """Per decode step: L · steps / Σ layers any running row kept."""
        return (self.num_layers * self.decode_steps / self.layer_passes
                if self.layer_passes else 1.0)

    @property
    def work_ratio(self) -> float:
        """Decode bytes at full depth over the bytes the steps read: design.md §8's work ratio
        for a mixed batch (what a bandwidth-bound step can gain from it)."""
        return self.full_bytes / self.run_bytes if self.run_bytes else 1.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0


class Engine:
    """A running batch of up to ``max_batch`` requests over one paged KV cache: rows of up to
    ``max_seq_len`` tokens (default: the model's) in a pool of ``num_pages`` pages of
    ``page_size`` tokens (a power of two; default 16). num_pages None: enough for every row's
    full length (max_batch · ceil(max_seq_len / page_size), what a static cache reserves:
    ~3 GB for SmolLM2 in float32 with the defaults, so set max_seq_len or num_pages to what
    requests need); fewer bounds the memory, and when running requests outgrow it the newest is
    preempted and recomputed later (module docstring). ``schedule`` (None: full depth),
    ``stop_tokens`` (None: the tokenizer's) and ``backfill`` (None: the model's mode) are the
    defaults of :meth:`submit`. backfill_timing (None: the model's, ``"deferred"`` by default):
    deferred, a ``propagate`` step stashes what its skipped layers' K/V need and a request's
    row drops that debt when it is released, unpaid (no pass reads a finished request's cache);
    ``model.flush_backfill(engine.cache)`` fills what the running rows owe. ``"eager"`` fills
    skipped layers every step. min_free: admit waiting requests only when at least this many
    rows are free (or none is running); 1 (default) is plain continuous batching, ``max_batch``
    admits in waves. prefix_sharing: reuse the prefill-written pages of a prompt prefix another
    request already holds. Either backend (see the module docstring for what each guarantees).
    """

    def __init__(self, model, max_batch: int = 8, max_seq_len: int | None = None,
                 schedule: DepthSchedule | None = None, *, stop_tokens=None,
                 backfill: str | None = None, backfill_timing: str | None = None,
                 min_free: int = 1, page_size: int = 16, num_pages: int | None = None,
                 prefix_sharing: bool = True):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if max_seq_len is None:
            max_seq_len = model.max_seq_len
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) \
                or not 2 <= max_seq_len <= model.max_seq_len:
            raise ValueError(f"max_seq_len must be an int in [2, {model.max_seq_len}] (the "
                             f"model's max_seq_len), got {max_seq_len!r}")
        if isinstance(min_free, bool) or not isinstance(min_free, int) \
                or not 1 <= min_free <= max_batch:
            raise ValueError(f"min_free must be an int in [1, max_batch={max_batch}], got "
                             f"{min_free!r}")
        if not isinstance(prefix_sharing, bool):
            raise ValueError(f"prefix_sharing must be a bool, got {prefix_sharing!r}")
        if schedule is not None:
            if not isinstance(schedule, DepthSchedule):
                raise ValueError(f"schedule must be a DepthSchedule or None, got {schedule!r}")
            schedule.validate(model.config.num_layers)
        if num_pages is None:
            num_pages = max_batch * KVCache.row_pages(max_seq_len, page_size)
        self.model = model
        self.backfill, self.backfill_timing = model.resolve_backfill(backfill, backfill_timing)
        self.schedule = schedule
        self.stop_tokens = stop_tokens
        self.min_free = min_free
        self.prefix_sharing = prefix_sharing
        self.cache = KVCache(model.config, max_batch, max_seq_len, model.dtype, model.device,
                             page_size=page_size, num_pages=num_pages)
        self.stats = EngineStats(model.config.num_layers)
        self._free = list(range(max_batch - 1, -1, -1))  # popped from the end: lowest row first
        self._waiting: deque[Request] = deque()
        self._running: dict[int, Request] = {}  # cache row -> request, in admission order
        self._next_id = 0

    # ---- queue --------------------------------------------------------------------------------

    @property
    def max_batch(self) -> int:
        return self.cache.batch_size

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def pages_in_use(self) -> int:
        """Pages of the cache's pool held by running requests now."""
        return self.cache.pages_in_use

    @property
    def waiting(self) -> list[Request]:
        return list(self._waiting)

    @property
    def running(self) -> list[Request]:
        return list(self._running.values())

    @property
    def idle(self) -> bool:
        return not self._waiting and not self._running

    def submit(self, prompt, max_new_tokens: int = 64, schedule: DepthSchedule | None = None,
               *, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None,
               stop_tokens=None) -> Request:
        """Queue one prompt (a string or a list of token ids); returns its :class:`Request`.

        Checked here, before it is queued (ValueError naming the argument): an empty prompt, a
        token outside the vocabulary, a prompt plus max_new_tokens past the cache's rows
        (``max_seq_len``) or past the whole page pool, bad sampling options or schedule.
        schedule / stop_tokens None: the engine's.
        """
        one = "submit takes one prompt (a string or a list of token ids); submit each prompt of " \
              "a batch separately"
        if isinstance(prompt, (list, tuple)) and prompt and not isinstance(prompt[0], int):
            raise ValueError(one)
        schedule = self.schedule if schedule is None else schedule
        stop_tokens = self.stop_tokens if stop_tokens is None else stop_tokens
        plan = _plan(self.model, prompt, max_new_tokens, schedule, temperature, top_k, top_p,
                     seed, stop_tokens)
        if len(plan.prompts) != 1:  # e.g. a 2-D tensor
            raise ValueError(one)
        ids = plan.prompts[0]
        if len(ids) + max_new_tokens > self.cache.seq_len:  # the rule of generate
            raise ValueError(f"prompt of {len(ids)} tokens plus max_new_tokens={max_new_tokens} "
                             f"exceeds the engine's rows (max_seq_len={self.cache.seq_len})")
        # the last token is never fed back, so it takes no slot
        pages = -(-(len(ids) + max_new_tokens - 1) // self.cache.page_size)
        if pages > self.cache.num_pages:
            raise ValueError(f"prompt of {len(ids)} tokens plus max_new_tokens={max_new_tokens} "
                             f"needs {pages} pages of {self.cache.page_size} tokens but the "
                             f"pool has num_pages={self.cache.num_pages}")
        req = Request(self._next_id, ids, max_new_tokens, plan.schedule, plan.sampling,
                      plan.stop_tokens, time.perf_counter())
        self._next_id += 1
        self._waiting.append(req)
        return req

    def cancel(self, request: Request) -> bool:
        """Stop a waiting or running request now (finish_reason ``"cancelled"``), freeing its
        row for the next admission; the other requests are unaffected. Returns False if it had
        already finished. A request of another engine raises ValueError."""
        if request.done:
            return False
        if request.status == "waiting" and request in self._waiting:
            self._waiting.remove(request)
        elif request.slot is None or self._running.get(request.slot) is not request:
            raise ValueError(f"request {request.id} was not submitted to this engine")
        self._finish(request, "cancelled")
        return True

    def _release(self, req: Request) -> None:
        """Give req's cache row and pages back (the lowest free row is admitted next) and
        drop the backfill it still owes: nothing will read it."""
        self.cache.release(req.slot)
        del self._running[req.slot]
        self._free.append(req.slot)
        self._free.sort(reverse=True)
        req.slot = None

    def _finish(self, req: Request, reason: str) -> None:
        if req.slot is not None:
            self._release(req)
        req.status, req.finish_reason = "finished", reason
        if self.model.tokenizer is not None:
            req.text = self.model.tokenizer.decode(req.tokens)

    def _take(self, req: Request, token: int, depth: int, now: float) -> StreamedToken:
        req.tokens.append(token)
        req.depths.append(depth)
        req.token_times.append(now)
        self.stats.generated_tokens += 1
        event = StreamedToken(req.id, token, len(req.tokens) - 1, depth)
        if token in req.stop_tokens:
            self._finish(req, "stop")
        elif len(req.tokens) == req.max_new_tokens:
            self._finish(req, "length")
        return event

    # ---- passes -------------------------------------------------------------------------------

    def _preempt(self, req: Request) -> None:
        """Give a running request's row and pages back and queue it first again: readmitted,
        it is recomputed (its tokens so far are kept)."""
        self._release(req)
        req.status, req.fed = "waiting", 0
        req.preemptions += 1
        self.stats.preemptions += 1
        self._waiting.appendleft(req)

    def _reserve_decode(self, decoding: list[Request]) -> list[Request]:
        """Take the page each request's next decode write needs; while the pool is short,
        preempt the most recently admitted. Returns the requests still running."""
        while decoding:
            try:
                self.cache.reserve([(r.slot, len(r.prompt) + r.fed, len(r.prompt) + r.fed + 1)
                                    for r in decoding])
                return decoding
            except CacheFull:
                self._preempt(decoding.pop())
        return decoding

    def _admit(self) -> list[tuple[Request, int]]:
        """Move waiting requests into free rows, in order, while the pages their prompts need
        (less what they share) are free; each takes its shared prefix pages and reserves the
        rest. A request whose next full prompt page another request admitted in this step
        is about to prefill waits a step and then shares it (admission stays in order).
        Returns (request, prompt tokens already cached) pairs."""
        cache, admitted = self.cache, []
        S, pending = cache.page_size, set()  # keys of full pages this step's prefills will index
        # min_free > 1 admits in waves: rows that start together stay at the same step i, so
        # they drop layers together and a step reads fewer layers' weights (module docstring)
        may_admit = not self._running or len(self._free) >= self.min_free
        while may_admit and self._waiting and self._free:
            req = self._waiting[0]
            shared = cache.prefix_pages(req.prompt) if self.prefix_sharing else []
            if pending:
                keys = cache.page_keys(req.prompt, (len(req.prompt) - 1) // S)
                if len(shared) < len(keys) and keys[len(shared)] in pending:
                    break
            # new pages for the rest of the prompt, and the shared pages no row holds now; and
            # one page of headroom per running request (it will cross into a new page), so an
            # admission does not preempt a neighbour at once (unless nothing runs)
            cost = -(-len(req.prompt) // cache.page_size) - len(shared) \
                + sum(cache.refs[p] == 0 for p in shared)
            if cost + len(self._running) > cache.free_pages:
                break  # in order: later requests wait too
            self._waiting.popleft()
            req.slot, req.status = self._free.pop(), "running"
            self._running[req.slot] = req
            covered = cache.share_prefix(req.slot, req.prompt) if self.prefix_sharing else 0
            cache.reserve([(req.slot, covered, len(req.prompt))])
            admitted.append((req, covered))
            if self.prefix_sharing:
                pending.update(cache.page_keys(req.prompt, len(req.prompt) // S)[covered // S:])
        return admitted

    @torch.inference_mode()
    def step(self) -> list[StreamedToken]:
        """Take the pages this step's decode needs (preempting if the pool is short), admit
        what fits and prefill it, then one decode pass over the requests already running.
        Returns one StreamedToken per new token (``row`` is the request's id); a request being
        recomputed after a preemption makes none until it has caught up."""
        m, L, cache = self.model, self.model.config.num_layers, self.cache
        t0 = time.perf_counter()
        running = list(self._running.values())
        decoding = self._reserve_decode(list(running))
        # a step that had to preempt admits nothing: the pages it freed belong to the others
        admitted = self._admit() if len(decoding) == len(running) else []
        events = []
        if admitted:
            starts = [c for _, c in admitted]
            chunks = [r.prompt[c:] for r, c in admitted]
            lengths = [len(c) for c in chunks]
            # a recomputed prompt's choice is ignored: greedy, so no sampler draws for it
            samplings = [Sampling() if r.tokens else r.sampling for r, _ in admitted]
            try:
                nxt = m.prefill(right_padded(chunks).to(m.device), lengths, cache,
                                RowSampling(samplings), starts if any(starts) else None,
                                backfill=self.backfill,
                                rows=[r.slot for r, _ in admitted]).tolist()
            except BaseException:  # out of memory, Ctrl-C: back to the queue, rows freed
                for r, _ in reversed(admitted):
                    self._release(r)
                    r.status = "waiting"
                    self._waiting.appendleft(r)
                raise
            self.stats.prefills += 1
            self.stats.prefill_tokens += sum(lengths)
            self.stats.shared_prefix_tokens += sum(starts)
            now = time.perf_counter()
            for (r, _), t, n in zip(admitted, nxt, lengths):
                if self.prefix_sharing:
                    cache.index_prefix(r.slot, r.prompt)
                if r.tokens:
                    self.stats.recomputed_tokens += n
                else:
                    events.append(self._take(r, t, L, now))
        if decoding:
            # request r feeds its token fed (its newest, unless it is being recomputed) at the
            # slot after it and runs the layers of its step fed + 1
            depths = [r.schedule.depth(r.fed + 1, L) for r in decoding]
            kept = [r.schedule.kept_layers(d, L) for r, d in zip(decoding, depths)]
            replay = [r.fed + 1 < len(r.tokens) for r in decoding]
            tokens = [r.tokens[r.fed] for r in decoding]  # checked on the host, uploaded once
            positions = [len(r.prompt) + r.fed for r in decoding]
            samplings = [Sampling() if again else r.sampling for r, again in zip(decoding, replay)]
            nxt = m.decode_rows(tokens, [r.slot for r in decoding], positions, kept, cache,
                                RowSampling(samplings), backfill=self.backfill,
                                backfill_timing=self.backfill_timing).tolist()
            union = len(set().union(*kept))
            contexts = [p + 1 for p in positions]
            elem = m.weight_bytes
            self.stats.decode_steps += 1
            self.stats.row_steps += len(decoding)
            self.stats.layers_run += sum(depths)
            self.stats.layer_passes += union
            self.stats.full_bytes += step_bytes(m.config, L, contexts, elem)
            self.stats.run_bytes += step_bytes(m.config, union, contexts, elem, depths)
            now = time.perf_counter()
            for r, t, d, again in zip(decoding, nxt, depths, replay):
                r.fed += 1
                if again:
                    self.stats.recomputed_tokens += 1
                else:
                    events.append(self._take(r, t, d, now))
        self.stats.peak_pages = cache.peak_pages
        self.stats.seconds += time.perf_counter() - t0
        return events

    def run(self) -> Iterator[StreamedToken]:
        """Step until no request is waiting or running, yielding each token as it is made.
        Requests submitted (or cancelled) while iterating are taken into account."""
        while not self.idle:
            yield from self.step()
