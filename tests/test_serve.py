"""``d3kernels serve``: the real ``openai`` client against a server on 127.0.0.1 started here.

Replies equal ``generate``'s (and ``Conversation``'s) token for token, alone or among 32
concurrent clients; stop strings, usage, errors, the queue bound, disconnects, engine faults and
shutdown. The model is the random tiny preset in float32 with a small byte-level tokenizer whose
extra ids decode to ASCII (``<u300>``), so random replies are text a stop string can match.
Every wait is bounded in time.
"""
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytest.importorskip("uvicorn", reason="the serve extra is not installed")
openai = pytest.importorskip("openai", reason="the dev extra (openai client) is not installed")
httpx = pytest.importorskip("httpx", reason="the dev extra is not installed")
from tokenizers import pre_tokenizers  # noqa: E402

from d3kernels import DepthSchedule, LlamaD3  # noqa: E402
from d3kernels.serve import BackgroundServer, create_app  # noqa: E402
from d3kernels.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = "tiny"
D3 = DepthSchedule(alpha=0.8, head=1, tail=1)
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_chat_model(seed: int = 7, tp: int = 1) -> LlamaD3:
    """The tiny preset (vocab 512) in float32 on the torch backend, with a tokenizer: the 256
    byte symbols, <|im_start|> and <|im_end|> (EOS) and user-defined ``<uN>`` up to 512.
    tp: split over that many ranks of the current process group."""
    model = LlamaD3.random("tiny", dtype=torch.float32, seed=seed, backend="torch", tp=tp)
    n = model.config.vocab_size
    # alphabet() comes in a different order each call: sorted, every instance (the server's
    # and the tests' reference) encodes alike
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["<|im_start|>", "<|im_end|>"]
    tokens += [f"<u{i}>" for i in range(len(tokens), n)]
    model.tokenizer = Tokenizer.from_gguf_fields({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": [],
        "tokenizer.ggml.token_type": [1] * 256 + [3, 3] + [4] * (n - 258),
        "tokenizer.ggml.eos_token_id": 257, "tokenizer.chat_template": TEMPLATE})
    return model


class LiveServer(BackgroundServer):
    """The server on 127.0.0.1, with the test's ways to talk to it."""

    def __exit__(self, *exc):
        super().__exit__(*exc)
        assert not self._thread.is_alive()

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0,
                             timeout=60, **kw)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {line.split(" ")[0]: float(line.split(" ")[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    def wait_metric(self, name: str, value: float, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.metrics()[name] != value:
            assert time.monotonic() < deadline, f"{name} never became {value}: {self.metrics()}"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def model():
    return tiny_chat_model()


@pytest.fixture(scope="module")
def live():
    """The server runs a model of its own (same seed, same weights as ``model``): the tests'
    reference generate calls never share a model with the engine thread."""
    with LiveServer(create_app(tiny_chat_model(), model_name=NAME, max_batch=4,
                               schedule=D3)) as s:
        yield s


def _ratio(model, depths):
    decode = depths[1:]
    return model.config.num_layers * len(decode) / sum(decode) if decode else 1.0


def _prompt(model, i: int) -> str:
    return "Count: " + " ".join(str(k) for k in range(i % 7 + 1)) + f" tail{i}"


def _stream_text(stream):
    """A streamed completion's text, finish reason, token ids and d3 (from the last chunk)."""
    text, last = "", None
    for chunk in stream:
        last = chunk
        if chunk.choices:
            c = chunk.choices[0]
            text += (c.delta.content or "") if hasattr(c, "delta") else c.text
            if c.finish_reason:
                done = (c.finish_reason, chunk.model_extra["token_ids"], chunk.model_extra["d3"])
    return text, done, last


# ---- replies equal the library's ---------------------------------------------------------------

@pytest.mark.parametrize("d3", [None, False, {"alpha": 0.7, "order": "upper", "tail": 2}])
def test_completions_equal_generate(live, model, d3):
    client = live.client()
    schedule = D3 if d3 is None else DepthSchedule.full() if d3 is False else DepthSchedule(
        alpha=0.7, head=1, tail=2, order="upper")  # the server's head with the given fields
    prompt = "Once upon a time"
    ref = model.generate(model.tokenizer.encode(prompt), 12, schedule)
    tokens, text = ref.tokens[0], model.tokenizer.decode(ref.tokens[0])
    extra = {"return_token_ids": True} | ({} if d3 is None else {"d3": d3})
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0,
                                  extra_body=extra)
    assert r.choices[0].model_extra["token_ids"] == tokens
    assert r.choices[0].text == text
    assert r.choices[0].finish_reason == ("stop" if len(tokens) < 12 else "length")
    n_prompt = len(model.tokenizer.encode(prompt))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
        (n_prompt, len(tokens), n_prompt + len(tokens))
    assert r.model_extra["d3"]["layer_ratio"] == pytest.approx(_ratio(model, ref.depths[0]))
    assert r.model_extra["d3"]["schedule"] == schedule.to_dict()
    if d3 is not False:
        assert r.model_extra["d3"]["layer_ratio"] > 1.2
    s_text, (reason, s_tokens, s_d3), usage = _stream_text(client.completions.create(
        model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=extra))
    assert (s_text, s_tokens, reason) == (text, tokens, r.choices[0].finish_reason)
    assert s_d3 == r.model_extra["d3"] and usage.usage == r.usage


def test_chat_equals_conversation(live, model):
    client = live.client()
    conv = model.chat(schedule=D3)
    ref = conv.send("Say something.", 10)
    messages = [{"role": "user", "content": "Say something."}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10,
                                       temperature=0, extra_body={"return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == ref.tokens[0]
    assert r.choices[0].message.content == ref.texts[0]
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(model.tokenizer.encode_chat(messages))
    # the next turn re-sends the history as text: the reply is generate's on its rendering
    # (Conversation's own ids may differ: random byte tokens do not survive decode + encode)
    messages += [{"role": "assistant", "content": ref.texts[0]},
                 {"role": "user", "content": "And more?"}]
    ref2 = model.generate(model.tokenizer.encode_chat(messages), 6, D3)
    text, (reason, tokens, _), _ = _stream_text(client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=6, temperature=0, stream=True,
        extra_body={"return_token_ids": True}))
    assert (text, tokens) == (model.tokenizer.decode(ref2.tokens[0]), ref2.tokens[0])
    assert reason == ("stop" if len(tokens) < 6 else "length")


def test_seeded_sampling_equals_generate(live, model):
    ids = model.tokenizer.encode("Hello")
    ref = model.generate(ids, 10, D3, temperature=0.9, top_k=50, top_p=0.9, seed=123)
    r = live.client().completions.create(model=NAME, prompt="Hello", max_tokens=10,
                                         temperature=0.9, top_p=0.9, seed=123,
                                         extra_body={"top_k": 50, "return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == ref.tokens[0]


def test_stop_strings_across_token_boundaries(live, model):
    client = live.client()
    prompt = "The list:"
    ref = model.generate(model.tokenizer.encode(prompt), 40, D3, stop_tokens=())
    pieces = [model.tokenizer.decode([t]) for t in ref.tokens[0]]
    # a stop string made of the end of one token and the start of the next ASCII token
    k = next(k for k in range(3, 39) if len(pieces[k]) > 2 and len(pieces[k + 1]) > 2
             and pieces[k].isascii() and pieces[k + 1].isascii())
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    full = model.tokenizer.decode(ref.tokens[0])
    expected = full[:full.index(stop)]
    # the first m tokens whose text contains the stop string are generated, no more
    m = next(m for m in range(1, 41) if stop in model.tokenizer.decode(ref.tokens[0][:m]))
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=40, temperature=0,
                                  stop=["never-there", stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, "stop")
    assert r.usage.completion_tokens == m
    text, (reason, tokens, _), _ = _stream_text(client.completions.create(
        model=NAME, prompt=prompt, max_tokens=40, temperature=0, stop=stop, stream=True,
        extra_body={"return_token_ids": True}))
    assert (text, reason, tokens) == (expected, "stop", ref.tokens[0][:m])


# ---- load -------------------------------------------------------------------------------------

def test_32_concurrent_clients_get_their_solo_replies(live, model):
    before = live.metrics()
    settings = [None, False, {"alpha": 0.9}, {"alpha": 0.7, "order": "upper"}]

    async def one(client, i):
        d3 = settings[i % 4]
        extra = {"return_token_ids": True} | ({} if d3 is None else {"d3": d3})
        kw = dict(model=NAME, max_tokens=3 + i % 9, temperature=0, extra_body=extra)
        if i % 2:
            s = await client.completions.create(prompt=_prompt(model, i), stream=True, **kw)
            async for chunk in s:
                if chunk.choices and chunk.choices[0].finish_reason:
                    return chunk.model_extra["token_ids"]
        r = await client.completions.create(prompt=_prompt(model, i), **kw)
        return r.choices[0].model_extra["token_ids"]

    async def run_all():
        async with openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="none",
                                      max_retries=0, timeout=120) as client:
            return await asyncio.wait_for(
                asyncio.gather(*(one(client, i) for i in range(32))), timeout=240)

    got = asyncio.run(run_all())
    for i, tokens in enumerate(got):
        d3 = settings[i % 4]
        schedule = D3 if d3 is None else DepthSchedule.full() if d3 is False else \
            DepthSchedule(**{"head": 1, "tail": 1, "order": "lower"} | d3)
        ref = model.generate(model.tokenizer.encode(_prompt(model, i)), 3 + i % 9, schedule)
        assert tokens == ref.tokens[0], i
    after = live.metrics()
    assert after["d3kernels_cache_rows_in_use"] == after["d3kernels_cache_pages_in_use"] == 0
    assert after["d3kernels_requests_running"] == after["d3kernels_requests_waiting"] == 0
    finished = sum(after[f'd3kernels_requests_finished_total{{reason="{r}"}}']
                   - before[f'd3kernels_requests_finished_total{{reason="{r}"}}']
                   for r in ("stop", "length"))
    assert finished == 32
    assert after["d3kernels_generated_tokens_total"] - before[
        "d3kernels_generated_tokens_total"] == sum(len(t) for t in got)


def test_disconnect_mid_stream_frees_the_row(live, model):
    before = live.metrics()['d3kernels_requests_finished_total{reason="cancelled"}']
    body = {"model": NAME, "prompt": "go", "max_tokens": 240, "temperature": 0, "stream": True,
            "d3": False}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", live.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: ")) != "data: [DONE]"
        # closed after one chunk: the request is cancelled and its row freed
    live.wait_metric('d3kernels_requests_finished_total{reason="cancelled"}', before + 1)
    live.wait_metric("d3kernels_cache_rows_in_use", 0)
    # and the server answers the next client as before
    ref = model.generate(model.tokenizer.encode("go"), 5, D3)
    r = live.client().completions.create(model=NAME, prompt="go", max_tokens=5, temperature=0,
                                         extra_body={"return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == ref.tokens[0]


# ---- a server whose engine the test holds -----------------------------------------------------

class Gate:
    """Wraps model.decode_rows: blocks while closed (at most 30 s), raises while ``fail``."""

    def __init__(self, model):
        self.inner, self.open, self.fail = model.decode_rows, threading.Event(), None
        self.open.set()

    def __call__(self, *args, **kwargs):
        assert self.open.wait(30)
        if self.fail is not None:
            err, self.fail = self.fail, None
            raise err
        return self.inner(*args, **kwargs)


@pytest.fixture()
def gated():
    m = tiny_chat_model()
    gate = Gate(m)
    m.decode_rows = gate
    with LiveServer(create_app(m, model_name=NAME, max_batch=1, max_queue=1)) as s:
        yield s, gate, m
        gate.open.set()


def test_queue_overflow_gets_429_with_retry_after(gated):
    live, gate, _ = gated
    gate.open.clear()
    body = {"model": NAME, "prompt": "a", "max_tokens": 4, "temperature": 0}
    results = []

    def post():
        results.append(httpx.post(live.url + "/v1/completions", json=body, timeout=60))

    first = threading.Thread(target=post)
    first.start()
    live.wait_metric("d3kernels_requests_running", 1)  # its prefill ran; its decode waits
    second = threading.Thread(target=post)  # waits for the one row: the queue is full
    second.start()
    live.wait_metric("d3kernels_requests_waiting", 1)
    r = httpx.post(live.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 429, r.text
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "queue_full"
    gate.open.set()
    first.join(30)
    second.join(30)
    assert [x.status_code for x in results] == [200, 200]
    live.wait_metric("d3kernels_cache_rows_in_use", 0)
    assert live.metrics()["d3kernels_requests_rejected_total"] >= 1


def test_engine_fault_fails_its_request_with_500_and_the_server_stays_up(gated):
    live, gate, m = gated
    gate.fail = RuntimeError("injected fault")
    client = live.client()
    with pytest.raises(openai.InternalServerError, match="injected fault"):
        client.completions.create(model=NAME, prompt="x", max_tokens=4, temperature=0)
    assert live.metrics()['d3kernels_requests_finished_total{reason="failed"}'] == 1
    assert live.metrics()["d3kernels_cache_rows_in_use"] == 0
    assert httpx.get(live.url + "/health", timeout=10).json() == {"status": "ok"}
    # the fault was one step's: the next request is served by the real decode
    ref = m.generate(m.tokenizer.encode("x"), 4, None)
    r = client.completions.create(model=NAME, prompt="x", max_tokens=4, temperature=0,
                                  extra_body={"return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == ref.tokens[0]


def test_disconnect_while_waiting_for_a_plain_reply_cancels_it(gated):
    live, gate, _ = gated
    gate.open.clear()  # the reply cannot finish before the client gives up
    body = {"model": NAME, "prompt": "a", "max_tokens": 200, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.url + "/v1/completions", json=body, timeout=0.5)
    time.sleep(1.5)  # the server looks for a disconnect every 0.5 s
    gate.open.set()
    live.wait_metric('d3kernels_requests_finished_total{reason="cancelled"}', 1)
    live.wait_metric("d3kernels_cache_rows_in_use", 0)
    assert live.metrics()["d3kernels_generated_tokens_total"] < 10


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("patch, status, param, words", [
    ({"model": "gpt-4"}, 404, "model", "not served"),
    ({"max_tokens": "5"}, 422, "max_tokens", "integer"),
    ({"max_tokens": 0}, 422, "max_tokens", "greater than or equal to 1"),
    ({"temperature": 3.0}, 422, "temperature", "less than or equal to 2"),
    ({"top_p": 0}, 422, "top_p", "greater than 0"),
    ({"n": 2}, 422, "n", "only n=1"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 422, "stop", "at most 4"),
    ({"d3": {"alpha": 2}}, 422, "d3.alpha", "less than or equal to 1"),
    ({"d3": {"head": 50}}, 422, "d3", "exceeds the model's"),
    ({"d3": {"speed": 1}}, 422, "d3.speed", "not permitted"),
    ({"logprobs": 3}, 422, "logprobs", "not permitted"),
    ({"prompt": ""}, 422, "prompt", "empty"),
    ({"prompt": [1, 9999]}, 400, None, "vocabulary"),
    ({"max_tokens": 250}, 400, "max_tokens", "256 tokens"),
])
def test_bad_completion_requests(live, patch, status, param, words):
    body = {"model": NAME, "prompt": "Hello there", "max_tokens": 4} | patch
    r = httpx.post(live.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


def test_bad_chat_requests_and_malformed_json(live):
    post = lambda **kw: httpx.post(live.url + "/v1/chat/completions", timeout=30, **kw)  # noqa
    r = post(content=b'{"model": "tiny", "messages": [', headers={"content-type":
                                                                   "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "json_invalid"
    r = post(json={"model": NAME, "messages": []})
    assert r.status_code == 422 and r.json()["error"]["param"] == "messages"
    r = post(json={"model": NAME, "messages": [{"role": "robot", "content": "hi"}]})
    assert r.status_code == 422 and r.json()["error"]["param"] == "messages.0.role"
    with pytest.raises(openai.UnprocessableEntityError, match="only n=1"):
        live.client().chat.completions.create(model=NAME, n=3,
                                              messages=[{"role": "user", "content": "hi"}])
    assert httpx.get(live.url + "/health", timeout=10).json() == {"status": "ok"}


def test_models_health_and_metrics(live):
    client = live.client()
    assert [m.id for m in client.models.list()] == [NAME]
    text = httpx.get(live.url + "/metrics", timeout=10).text
    for name in ("requests_running", "requests_waiting", "generated_tokens_total",
                 "tokens_per_second", "layer_ratio", "union_layer_ratio", "cache_rows_in_use",
                 "cache_pages_in_use", "cache_pages", "preemptions_total",
                 "shared_prefix_tokens_total"):
        assert f"# TYPE d3kernels_{name} " in text and f"\nd3kernels_{name} " in text


# ---- shutdown ---------------------------------------------------------------------------------

def wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> None:
    """Until the server process ``proc`` answers /health with 200; fails (with its output) if
    it exits or ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)


SERVER = """
import sys
from d3kernels.serve import run
from tests.test_serve import tiny_chat_model
run(tiny_chat_model(), host="127.0.0.1", port=int(sys.argv[1]), model_name="tiny")
"""


def test_sigterm_finishes_running_requests_and_exits():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], cwd=ROOT,
                            env=os.environ | {"PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(proc, url, 60)
        body = {"model": NAME, "prompt": "go", "max_tokens": 200, "temperature": 0,
                "stream": True, "d3": False}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)  # mid-stream
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        last = json.loads(rest[-2][len("data: "):])
        assert last["choices"][0]["finish_reason"] in ("length", "stop")
        # uvicorn re-raises the signal once its shutdown is complete: the exit is SIGTERM's
        assert proc.wait(30) in (0, -signal.SIGTERM)
        log = proc.stdout.read()
        assert "Application shutdown complete" in log and "Traceback" not in log, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("option, message", [
    (["--max-queue", "0"], "--max-queue must be >= 1"),
    (["--page-size", "12"], "--page-size must be a power of two"),
    (["--kv-pages", "0"], "--kv-pages must be >= 1"),
])
def test_cli_refuses_bad_options_before_loading(option, message):
    r = subprocess.run([sys.executable, "-m", "d3kernels", "serve", *option],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and message in r.stderr
    assert "loading" not in r.stderr


def test_smollm2_chat_turns_equal_conversation(smollm2_f32):
    """The real tokenizer and chat template: a two-turn chat through the API (history
    re-sent as text) gives Conversation's replies token for token."""
    model = smollm2_f32
    s = DepthSchedule(alpha=0.95, head=4, tail=2)
    conv = model.chat(schedule=s, max_seq_len=256)
    with LiveServer(create_app(model, model_name="smollm2", max_batch=2, max_seq_len=256,
                               schedule=s)) as live:
        client, messages = live.client(), []
        for text in ("Name a color.", "Another one?"):
            ref = conv.send(text, 8)
            messages.append({"role": "user", "content": text})
            r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=8,
                                               temperature=0,
                                               extra_body={"return_token_ids": True})
            assert r.choices[0].model_extra["token_ids"] == ref.tokens[0]
            assert r.choices[0].message.content == ref.texts[0]
            messages.append({"role": "assistant", "content": r.choices[0].message.content})
        assert not any(t.rebuilt for t in conv.turns)  # the history re-rendered identically


def test_serve_bench_smoke(live):
    """The bench's measurement on the tiny server (each setting's rows measure the same
    server here: the settings' options are only checked to parse), and its server process
    reporting a server that cannot start."""
    from d3kernels.cli import build_parser
    from perf.serve_bench import ServerProcess, run, settings, table

    with pytest.raises(RuntimeError, match="--max-queue must be >= 1"):
        with ServerProcess(["--max-queue", "0"], startup_timeout=60):
            pass
    rows = []
    for label, options in settings(0.8, 2):
        args = build_parser().parse_args(["serve", *options])
        assert args.full_depth or (args.alpha, args.min_free) in ((0.8, 1), (0.8, 2))
        rows += run(live.url, NAME, label, ["Hi.", "Count to three."], requests=4,
                    concurrencies=[1, 2], max_tokens=4, timeout=60)
    assert [(r["setting"], r["concurrency"]) for r in rows] == [
        (s, c) for s in ("full depth", "D³ α 0.8", "D³ α 0.8 waves") for c in (1, 2)]
    for r in rows:
        assert r["requests"] == 4 and 4 <= r["tokens"] <= 16 and r["tokens_per_s"] > 0
        assert 0 < r["ttft_median_s"] <= r["ttft_p95_s"]
    assert table(rows).count("\n") == len(rows) + 1
