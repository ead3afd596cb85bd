"""``d3kernels serve``: an OpenAI-compatible HTTP server over the continuous-batching Engine.

    app = create_app(model, max_batch=8, schedule=DepthSchedule(alpha=0.995))
    uvicorn.run(app, host="127.0.0.1", port=8000)       # or: d3kernels serve --port 8000

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (the tokenizer's chat
template applied), both plain JSON or server-sent events (``"stream": true``, ending with
``data: [DONE]``); ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text).
Extensions of the OpenAI request: ``"d3"`` (``false``: full depth; an object with any of
alpha/start/min_depth/head/tail/order: those fields over the server's schedule; absent or
``true``: the server's schedule) and ``"return_token_ids"`` (the reply's ids in the choice).
Every reply carries ``"d3": {"layer_ratio", "schedule"}`` (in a stream: in the last chunk).

Threads: one engine thread owns the :class:`~d3kernels.engine.Engine` (it is not thread-safe)
and runs its steps; the asyncio event loop of the HTTP server only exchanges messages with it
(a ``queue.Queue`` of commands in, ``loop.call_soon_threadsafe`` of events out), so a slow
client never stalls a step and a step never stalls the HTTP layer. Text is decoded and stop
strings are matched on the engine thread, so a stop string ends its request (and frees its
row) at the step that completed it.

Tensor parallel (``model.tp``, design.md §11): every rank runs :func:`run`. Rank 0 serves
HTTP; the other ranks run :func:`follow`, an engine with the same options and no server. Before
each step (and every half second while idle) rank 0's engine thread broadcasts the engine
operations it made since the last one (submits, with an unseeded sampler's seed drawn there,
and cancels) and whether to step; the followers replay them and step with it, so every rank's
engine makes the same passes and collectives. A failed collective ends the server: every open
request gets a 500, and ``/health`` reports the engine thread stopped.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import queue
import random
import signal
import threading
import time
import uuid
from typing import Literal

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from d3kernels.engine import Engine, Request
from d3kernels.parallel import TensorParallelError
from d3kernels.schedule import DepthSchedule

log = logging.getLogger("d3kernels.serve")


# ---- errors ------------------------------------------------------------------------------------

class APIError(Exception):
    """An error reply in the OpenAI format: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        kind = {400: "invalid_request_error", 404: "not_found_error", 422: "invalid_request_error",
                429: "rate_limit_error"}.get(self.status, "server_error")
        return JSONResponse({"error": {"message": self.message, "type": kind,
                                       "param": self.param, "code": self.code}},
                            status_code=self.status, headers=self.headers)


# ---- request bodies ----------------------------------------------------------------------------

class D3Options(BaseModel):
    """The ``"d3"`` extension: schedule fields that replace the server's (DepthSchedule)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    alpha: float | None = Field(None, gt=0, le=1)
    start: int | None = Field(None, ge=0)
    min_depth: int | None = Field(None, ge=0)
    head: int | None = Field(None, ge=0)
    tail: int | None = Field(None, ge=0)
    order: Literal["lower", "upper"] | list[int] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Common(BaseModel):
    """Fields both endpoints take. Unknown fields are refused (extra="forbid"), so a feature
    this server lacks (logprobs, penalties, tools, ...) fails loudly instead of being ignored;
    strict: "5" is not an int, 1.0 is not an int."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    d3: bool | D3Options = True
    return_token_ids: bool = False

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n=1 is supported (one choice per request; send {n} "
                             "requests instead)")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4 or not all(stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] = Field(...)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ValueError("one prompt per request (a string, a list of token ids, or a "
                                 "list of one string)")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("the prompt is empty")
        return prompt


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) \
            else "".join(p.text for p in self.content)


class ChatRequest(_Common):
    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


# ---- the engine thread -------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class Job:
    """One HTTP request in the engine. Created on the event loop; ``request`` and the decoding
    state are the engine thread's; the event loop reads only ``events``.

    events: ("accepted",) | ("error", status, message) first, then ("delta", text)* and one
    ("done", finish_reason, completion_tokens, layer_ratio, token_ids).
    """

    ids: list[int]
    max_tokens: int
    schedule: DepthSchedule
    sampling: dict
    stops: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)
    request: Request | None = None
    admitted: bool = False       # read on the loop for the queue bound: set by the engine thread
    finished: bool = False
    text: str = ""               # decoded so far (engine thread)
    sent: int = 0                # characters of ``text`` posted as deltas
    decoder: object = None

    def post(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class EngineThread:
    """Owns the Engine; runs steps while there is work, and applies submit/cancel commands
    between steps. Requests whose step raised fail with a 500; the thread keeps running."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.tokenizer = engine.model.tokenizer
        self._tp = engine.model.tp
        self._ops: list[tuple] = []  # under TP: engine operations not yet sent to the followers
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: dict[int, Job] = {}  # engine request id -> job
        self._stopping = False
        self.counts = {"stop": 0, "length": 0, "cancelled": 0, "failed": 0}
        self.snapshot = self._snapshot()
        self._thread = threading.Thread(target=self._loop, name="d3kernels-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: Job) -> None:
        self._commands.put(("submit", job))

    def cancel(self, job: Job) -> None:
        self._commands.put(("cancel", job))

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel what is left (each job gets its "done"), then end the thread."""
        self._commands.put(("stop", None))
        self._thread.join(timeout)

    # -- engine thread only --

    def _loop(self) -> None:
        try:
            self._serve()
        except TensorParallelError as err:  # a follower is gone: nothing can step any more
            log.error("tensor-parallel serving stopped: %s", err)
            self._stopping = True
            for job in list(self._jobs.values()):
                self._fail(job, f"the tensor-parallel group failed: {err}")
            while True:  # commands already queued: their requests fail too
                try:
                    _, job = self._commands.get_nowait()
                except queue.Empty:
                    break
                if job is not None and not job.finished:
                    job.finished = True
                    job.post("error", 500, f"the tensor-parallel group failed: {err}")

    def _serve(self) -> None:
        while not self._stopping:
            # idle: wait for a command; busy: take what came in since the last step
            block = self.engine.idle
            while True:
                try:
                    cmd, job = self._commands.get(block=block, timeout=0.5 if block else None)
                except queue.Empty:
                    break
                try:
                    self._apply(cmd, job)
                except Exception as err:  # noqa: BLE001 - e.g. a tokenizer fault: this job only
                    log.exception("engine command %s failed", cmd)
                    if job is not None and not job.finished:
                        job.finished = True
                        job.post("error", 500, f"{type(err).__name__}: {err}")
                block = False
            step = not self.engine.idle and not self._stopping
            self._sync("step" if step else "idle")
            if step:
                self._step()
            self.snapshot = self._snapshot()
        self._sync("stop")

    def _sync(self, action: str) -> None:
        """Under TP: send the followers the engine operations since the last sync and what to
        do next ("step", "idle" or "stop"); one broadcast (nothing without TP)."""
        if self._tp is None:
            return
        box = [self._ops, action]
        self._ops = []
        self._tp.broadcast_objects(box)

    def _cancel(self, request: Request) -> None:
        self.engine.cancel(request)
        if self._tp is not None:
            self._ops.append(("cancel", request.id))

    def _apply(self, cmd: str, job: Job | None) -> None:
        e = self.engine
        if cmd == "submit":
            sampling = job.sampling
            if self._tp is not None and sampling["temperature"] > 0 and sampling["seed"] is None:
                # drawn here and sent with the submit: binding it makes no collective
                sampling = sampling | {"seed": random.getrandbits(62)}
            try:
                job.request = e.submit(job.ids, job.max_tokens, job.schedule, **sampling,
                                       stop_tokens=None)
            except ValueError as err:
                job.finished = True
                job.post("error", 400, str(err))
                return
            if self._tp is not None:
                self._ops.append(("submit", job.ids, job.max_tokens, job.schedule, sampling))
            job.decoder = self.tokenizer.stream_decoder()
            self._jobs[job.request.id] = job
            job.post("accepted")
        elif cmd == "cancel":
            if job.request is not None and not job.finished:
                self._cancel(job.request)
                self._done(job, "cancelled")
        elif cmd == "stop":
            self._stopping = True
            for j in list(self._jobs.values()):
                self._cancel(j.request)
                self._done(j, "cancelled")

    def _step(self) -> None:
        e = self.engine
        running = e.running
        # what Engine.step will touch: the running rows and the requests it admits (module
        # docstring of engine.py: in order, into free rows, once min_free rows are free)
        admits = not running or e.free_slots >= e.min_free
        touched = running + (e.waiting[:e.free_slots] if admits else [])
        try:
            events = e.step()
        except TensorParallelError:
            raise  # the group is gone: _loop ends the server
        except Exception as err:  # noqa: BLE001 - any engine fault fails its requests only
            log.exception("engine step failed; failing %d requests", len(touched))
            if self._tp is not None:  # the guard has torn the group down: the server ends
                raise TensorParallelError(f"rank 0's engine step failed: "
                                          f"{type(err).__name__}: {err}") from err
            for req in touched:
                e.cancel(req)
                if req.id in self._jobs:
                    self._fail(self._jobs[req.id], f"the engine failed on this request: "
                                                   f"{type(err).__name__}: {err}")
            return
        for ev in events:
            job = self._jobs.get(ev.row)
            if job is None:
                continue
            job.admitted = True
            try:
                self._take(job, ev.token)
            except Exception as err:  # noqa: BLE001 - e.g. the tokenizer: this job only
                log.exception("decoding request %d failed", ev.row)
                self._cancel(job.request)
                self._fail(job, f"{type(err).__name__}: {err}")

    def _fail(self, job: Job, message: str) -> None:
        """End a job whose engine request is already cancelled with a 500."""
        self._jobs.pop(job.request.id, None)
        job.finished = True
        self.counts["failed"] += 1
        job.post("error", 500, message)

    def _take(self, job: Job, token: int) -> None:
        job.text += job.decoder.push(token)
        if job.request.done:
            job.text += job.decoder.flush()
        if self._emit(job):
            if not job.request.done:
                self._cancel(job.request)
            self._done(job, "stop")
        elif job.request.done:
            self._done(job, job.request.finish_reason)

    def _emit(self, job: Job) -> bool:
        """Post the text no stop string can still claim; True if a stop string appeared (the
        text before it is posted, the stop string and what follows are dropped)."""
        text, sent = job.text, job.sent
        cut = min((i for i in (text.find(s, sent) for s in job.stops) if i >= 0), default=-1)
        if cut >= 0:
            end = cut
        elif job.request.done:
            end = len(text)
        else:
            # hold back the longest tail that starts some stop string: the next token may
            # complete it (stop strings match across token boundaries)
            hold = max((k for s in job.stops for k in range(1, min(len(s), len(text) - sent + 1))
                        if text.endswith(s[:k])), default=0)
            end = len(text) - hold
        if end > sent:
            job.post("delta", text[sent:end])
            job.sent = end
        return cut >= 0

    def _done(self, job: Job, reason: str) -> None:
        self._jobs.pop(job.request.id, None)
        job.finished = True
        self.counts[reason] += 1
        req, L = job.request, self.engine.model.config.num_layers
        decode = req.depths[1:]  # T_0 is the prefill's, always full depth
        ratio = L * len(decode) / sum(decode) if decode else 1.0
        job.post("done", reason, len(req.tokens), ratio, list(req.tokens))

    def _snapshot(self) -> dict:
        e, s = self.engine, self.engine.stats
        return {"running": len(e.running), "rows_in_use": e.max_batch - e.free_slots,
                "rows": e.max_batch, "pages_in_use": e.pages_in_use,
                "pages": e.cache.num_pages, "preemptions": s.preemptions,
                "shared_prefix_tokens": s.shared_prefix_tokens,
                "generated_tokens": s.generated_tokens, "tokens_per_s": s.tokens_per_s,
                "layer_ratio": s.layer_ratio, "union_layer_ratio": s.union_layer_ratio,
                "work_ratio": s.work_ratio, "prefill_tokens": s.prefill_tokens,
                "finished": dict(self.counts)}


# ---- the HTTP layer ----------------------------------------------------------------------------

_METRICS = [  # name, type, help, snapshot key
    ("requests_running", "gauge", "requests holding a cache row", "running"),
    ("requests_waiting", "gauge", "requests waiting for a cache row", "waiting"),
    ("cache_rows_in_use", "gauge", "KV cache rows held by requests", "rows_in_use"),
    ("cache_rows", "gauge", "KV cache rows (--max-batch)", "rows"),
    ("cache_pages_in_use", "gauge", "KV cache pages held by requests", "pages_in_use"),
    ("cache_pages", "gauge", "KV cache pages in the pool (--kv-pages)", "pages"),
    ("preemptions_total", "counter", "requests preempted (pages given back, recomputed later)",
     "preemptions"),
    ("shared_prefix_tokens_total", "counter", "prompt tokens whose shared pages were reused",
     "shared_prefix_tokens"),
    ("generated_tokens_total", "counter", "tokens generated", "generated_tokens"),
    ("prompt_tokens_total", "counter", "prompt tokens prefilled", "prefill_tokens"),
    ("tokens_per_second", "gauge", "generated tokens per second of engine step time",
     "tokens_per_s"),
    ("layer_ratio", "gauge", "L * row steps / layers run, over all decode steps",
     "layer_ratio"),
    ("union_layer_ratio", "gauge", "L * steps / layers any row ran (what a step reads)",
     "union_layer_ratio"),
    ("work_ratio", "gauge", "decode bytes at full depth / bytes read", "work_ratio"),
]


def _server_engine(model, *, max_batch: int = 8, max_seq_len: int | None = None,
                   schedule: DepthSchedule | None = None, min_free: int = 1,
                   page_size: int = 16, num_pages: int | None = None) -> Engine:
    """The Engine a server runs (its options and their defaults, in one place: under tensor
    parallel every rank's engine must be built alike)."""
    return Engine(model, max_batch=max_batch, max_seq_len=max_seq_len, schedule=schedule,
                  min_free=min_free, page_size=page_size, num_pages=num_pages)


def create_app(model, *, model_name: str = "d3kernels", max_queue: int = 64,
               **engine_options) -> FastAPI:
    """An ASGI app serving ``model`` (a LlamaD3 with a tokenizer) under ``model_name``.

    engine_options: max_batch (8) / max_seq_len (the model's) / min_free (1) / page_size (16) /
    num_pages (every row's full length): the Engine's (cache rows, tokens per row, admission
    waves, KV page pool); schedule: the default D³ schedule (None: full depth). max_queue:
    requests that may wait for a row before new ones get 429. The engine thread starts with the
    app's lifespan and stops (cancelling what is left) when the server shuts down.
    """
    if model.tokenizer is None:
        raise ValueError("model: serving text needs a model with a tokenizer")
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model_name must be a non-empty string, got {model_name!r}")
    if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
        raise ValueError(f"max_queue must be an int >= 1, got {max_queue!r}")
    if model.tp is not None and model.tp.rank != 0:
        raise ValueError(f"model: under tensor parallel rank 0 serves and rank "
                         f"{model.tp.rank} follows: call run() (or follow()) on every rank")
    engine = _server_engine(model, **engine_options)
    schedule = engine_options.get("schedule")
    worker = EngineThread(engine)
    tok, num_layers, seq_len = model.tokenizer, model.config.num_layers, engine.cache.seq_len
    default = schedule or DepthSchedule.full()
    jobs: set[Job] = set()  # live jobs (event loop only): the queue bound counts them
    rejected = [0]

    async def lifespan(app):
        worker.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, worker.stop)

    app = FastAPI(title="d3kernels", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, err: RequestValidationError):
        errors = err.errors()
        # a union field fails once per branch: report the branch that got furthest (a "d3"
        # object's bad field, not "d3 is not a bool")
        first = max((e for e in errors if e["loc"][:2] == errors[0]["loc"][:2]),
                    key=lambda e: len(e["loc"]))
        if first["type"] == "json_invalid":
            return APIError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', '')}",
                            code="json_invalid").response()
        loc = [str(x) for x in first["loc"] if x != "body"]
        # a union's failed branch names its type (e.g. "str", "list[int]"); drop those
        param = ".".join(x for x in loc if not any(c in x for c in "[]") and x not in
                         ("str", "int", "bool", "float", "D3Options", "function-after"))
        param = param or None
        msg = first["msg"].removeprefix("Value error, ")
        return APIError(422, f"{param}: {msg}" if param else msg, param=param,
                        code="invalid_value").response()

    def schedule_of(d3) -> DepthSchedule:
        if d3 is True:
            return default
        if d3 is False:
            return DepthSchedule.full()
        given = d3.model_dump(exclude_none=True)
        base = default if not default.is_full_depth else DepthSchedule()
        try:
            s = dataclasses.replace(base, **given)
            s.validate(num_layers)
        except ValueError as err:
            raise APIError(422, f"d3: {err}", param="d3", code="invalid_value")
        return s

    async def submit(body: _Common, ids: list[int], max_tokens: int | None) -> Job:
        if body.model != model_name:
            raise APIError(404, f"model {body.model!r} is not served here (this server serves "
                                f"{model_name!r})", param="model", code="model_not_found")
        if max_tokens is None:  # chat: what the context leaves
            max_tokens = max(1, seq_len - len(ids))
        if len(ids) + max_tokens > seq_len:
            raise APIError(400, f"this server's context is {seq_len} tokens (max_seq_len): the "
                                f"prompt's {len(ids)} tokens plus max_tokens={max_tokens} exceed "
                                "it", param="max_tokens", code="context_length_exceeded")
        waiting = sum(not (j.admitted or j.finished) for j in jobs)
        if waiting >= max_queue:
            rejected[0] += 1
            raise APIError(429, f"the queue is full ({waiting} requests waiting for "
                                f"{engine.max_batch} rows); retry later", code="queue_full",
                           headers={"Retry-After": "1"})
        sampling = dict(temperature=body.temperature, top_k=body.top_k,
                        top_p=None if body.top_p == 1 else body.top_p, seed=body.seed)
        job = Job(ids, max_tokens, schedule_of(body.d3), sampling, body.stop or [],
                  asyncio.get_running_loop())
        jobs.add(job)
        worker.submit(job)
        try:
            first = await job.events.get()
        except BaseException:  # the handler was cancelled (the client left): drop the job
            jobs.discard(job)
            worker.cancel(job)
            raise
        if first[0] == "error":
            jobs.discard(job)
            raise APIError(first[1], first[2])
        return job

    async def reply(job: Job, body: _Common, kind: str, http: HTTPRequest):
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"

        def tail(done) -> tuple[dict, dict]:
            _, reason, n_out, ratio, token_ids = done
            usage = {"prompt_tokens": len(job.ids), "completion_tokens": n_out,
                     "total_tokens": len(job.ids) + n_out}
            d3 = {"layer_ratio": ratio, "schedule": job.schedule.to_dict()}
            return usage, d3

        if body.stream:
            return StreamingResponse(stream(job, body, kind, rid, created, obj, tail),
                                     media_type="text/event-stream")
        return await collect(job, body, kind, rid, created, obj, tail, http)

    async def collect(job, body, kind, rid, created, obj, tail, http):
        parts = []
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():  # nobody to answer: free the row
                        worker.cancel(job)
                        return PlainTextResponse("", status_code=499)
                    continue
                if ev[0] == "delta":
                    parts.append(ev[1])
                elif ev[0] == "error":
                    raise APIError(ev[1], ev[2], code="engine_error")
                else:
                    break
        finally:
            jobs.discard(job)
        usage, d3 = tail(ev)
        text = "".join(parts)
        choice = {"index": 0, "finish_reason": ev[1]}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        if body.return_token_ids:
            choice["token_ids"] = ev[4]
        return {"id": rid, "object": obj, "created": created, "model": model_name,
                "choices": [choice], "usage": usage, "d3": d3}

    async def stream(job, body, kind, rid, created, obj, tail):
        obj += ".chunk" if kind == "chat" else ""

        def event(data: dict) -> str:
            return f"data: {json.dumps(data)}\n\n"

        def chunk(delta: dict, reason=None, **extra) -> str:
            choice = {"index": 0, "finish_reason": reason}
            if kind == "chat":
                choice["delta"] = delta
            else:
                choice.update(text=delta.get("content", ""), logprobs=None)
            return event({"id": rid, "object": obj, "created": created, "model": model_name,
                          "choices": [choice], **extra})

        try:
            if kind == "chat":
                yield chunk({"role": "assistant"})
            while True:
                ev = await job.events.get()
                if ev[0] == "delta":
                    yield chunk({"content": ev[1]})
                elif ev[0] == "error":  # the status line went out already: an error event
                    yield event({"error": {"message": ev[2], "type": "server_error",
                                           "param": None, "code": "engine_error"}})
                    break
                else:
                    usage, d3 = tail(ev)
                    extra = {"d3": d3}
                    if body.return_token_ids:
                        extra["token_ids"] = ev[4]
                    yield chunk({}, ev[1], **extra)
                    if body.stream_options is not None and body.stream_options.include_usage:
                        yield event({"id": rid, "object": obj, "created": created,
                                     "model": model_name, "choices": [], "usage": usage})
                    break
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the task is cancelled here) or the reply ended
            jobs.discard(job)
            if not job.finished:
                worker.cancel(job)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        ids = tok.encode(body.prompt) if isinstance(body.prompt, str) else list(body.prompt)
        job = await submit(body, ids, 16 if body.max_tokens is None else body.max_tokens)
        return await reply(job, body, "completion", http)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: HTTPRequest):
        if tok.chat_template is None:
            raise APIError(400, "this model's tokenizer has no chat template: use "
                                "/v1/completions", param="messages")
        ids = tok.encode_chat([{"role": m.role, "content": m.text()} for m in body.messages])
        job = await submit(body, ids, body.max_completion_tokens or body.max_tokens)
        return await reply(job, body, "chat", http)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "d3kernels", "max_model_len": seq_len}]}

    @app.get("/health")
    async def health():
        if not worker.alive:
            return JSONResponse({"status": "engine thread stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        # waiting: counted on the HTTP side, which also sees requests not yet handed to the
        # engine thread (it takes commands between steps)
        snap = worker.snapshot | {"waiting": sum(not (j.admitted or j.finished) for j in jobs)}
        lines = []
        for name, kind, help_, key in _METRICS:
            lines += [f"# HELP d3kernels_{name} {help_}", f"# TYPE d3kernels_{name} {kind}",
                      f"d3kernels_{name} {snap[key]}"]
        lines += ["# HELP d3kernels_requests_finished_total requests ended, by reason",
                  "# TYPE d3kernels_requests_finished_total counter"]
        lines += [f'd3kernels_requests_finished_total{{reason="{r}"}} {n}'
                  for r, n in snap["finished"].items()]
        lines += ["# HELP d3kernels_requests_rejected_total requests refused with 429",
                  "# TYPE d3kernels_requests_rejected_total counter",
                  f"d3kernels_requests_rejected_total {rejected[0]}"]
        return PlainTextResponse("\n".join(lines) + "\n",
                                 media_type="text/plain; version=0.0.4")

    return app


class BackgroundServer:
    """uvicorn serving ``app`` on 127.0.0.1 at a free port in a daemon thread: for tests and
    benchmarks in one process. ``with BackgroundServer(app) as s: ... s.url``; leaving the
    block shuts it down as a signal would (waits up to 20 s)."""

    def __init__(self, app, log_level: str = "warning"):
        import socket

        import uvicorn

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self.server.serve(sockets=[self._sock])), daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the server did not start within 20 s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(20)
        self._sock.close()


def follow(model, *, model_name: str | None = None, max_queue: int | None = None,
           **engine_options) -> None:
    """A tensor-parallel rank other than 0 of a server: an Engine with ``create_app``'s engine
    options (the same as rank 0's; model_name and max_queue, rank 0's server options, are
    accepted so every rank can be given the same options, and ignored) replays rank 0's
    engine operations and steps with it (module doc) until rank 0 stops. SIGINT and SIGTERM
    are ignored here (when called from the main thread): rank 0 shuts the server down and
    tells the followers. Raises TensorParallelError if rank 0 goes away without that."""
    tp = model.tp
    if tp is None or tp.rank == 0:
        raise ValueError("model: follow() is for the ranks other than 0 of a tensor-parallel "
                         "model; rank 0 serves (create_app / run)")
    engine = _server_engine(model, **engine_options)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    requests: dict[int, Request] = {}
    while True:
        ops, action = tp.broadcast_objects([None, None])
        for op in ops:
            if op[0] == "submit":
                ids, max_tokens, sched, sampling = op[1:]
                req = engine.submit(ids, max_tokens, sched, **sampling, stop_tokens=None)
                requests[req.id] = req
            else:
                engine.cancel(requests.pop(op[1]))
        if action == "stop":
            return
        if action == "step":
            engine.step()
            for rid in [rid for rid, req in requests.items() if req.done]:
                del requests[rid]


def run(model, *, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 30.0,
        log_level: str = "info", **app_options) -> None:
    """Serve ``model`` with uvicorn until SIGINT/SIGTERM (``create_app``'s options apply).

    On a signal uvicorn stops accepting connections and waits up to ``shutdown_timeout``
    seconds for the open ones (running requests finish their replies); then it cancels what
    is left and the engine thread cancels their requests and stops. Under tensor parallel
    every rank calls it with the same options: rank 0 serves, the others :func:`follow`.
    """
    if model.tp is not None and model.tp.rank != 0:
        follow(model, **app_options)
        return
    import uvicorn

    app = create_app(model, **app_options)
    uvicorn.run(app, host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=shutdown_timeout)
