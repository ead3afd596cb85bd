"""``d3kernels serve`` under tensor parallel (design.md §11): rank 0 serves HTTP, rank 1 follows
its engine operations (d3kernels/serve.py's module doc). Two gloo ranks spawned by
tests/test_tensor_parallel.py's harness; the client runs inside rank 0.

Concurrent requests (greedy, seeded sampling, a stop string that cancels its request mid-reply,
a streamed chat, then one more after them) get the tp=1 server's replies token for token; an
unseeded one completes; rank 0 shuts down and the follower returns. A follower that dies fails
the open requests with a 500 and /health turns 503, with no hang.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("fastapi", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx", reason="the dev extra is not installed")

from d3kernels import DepthSchedule  # noqa: E402
from d3kernels.engine import Engine  # noqa: E402
from d3kernels.serve import BackgroundServer, create_app, follow  # noqa: E402
from tests.test_calibrate import tiny64, tiny_dir  # noqa: E402,F401 (the CLI's checkpoint)
from tests.test_serve import tiny_chat_model, wait_healthy  # noqa: E402
from tests.test_tensor_parallel import _spawn  # noqa: E402

D3 = DepthSchedule(alpha=0.8, head=1, tail=1)
OPTIONS = dict(model_name="tiny", max_batch=2, max_seq_len=96, schedule=D3, page_size=4)


def _completion(url: str, prompt: str, **extra) -> dict:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 10, "temperature": 0,
            "return_token_ids": True, **extra}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    return {"status": r.status_code, **r.json()}


def _chat_stream(url: str) -> list[int]:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
            "temperature": 0, "stream": True, "return_token_ids": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: {")]
    return chunks[-1]["token_ids"]  # the last chunk carries them


def _ids(reply: dict) -> list[int]:
    assert reply["status"] == 200, reply
    return reply["choices"][0]["token_ids"]


def _ask(url: str, stop: str | None) -> dict:
    """The requests both servers answer (four at once on two rows, then one more)."""
    with ThreadPoolExecutor(4) as pool:
        greedy = pool.submit(_completion, url, "The sea")
        seeded = pool.submit(_completion, url, "A bird", temperature=0.9, top_k=20, seed=3)
        stopped = pool.submit(_completion, url, "Stop here", **({"stop": stop} if stop else {}))
        chat = pool.submit(_chat_stream, url)
        out = {"greedy": _ids(greedy.result()), "seeded": _ids(seeded.result()),
               "stopped": stopped.result()["choices"][0]["text"], "chat": chat.result()}
    out["after"] = _ids(_completion(url, "Later", d3=False))
    return out


def _serving_ranks(rank, size, stop):
    model = tiny_chat_model(tp=size)
    if rank:
        follow(model, **OPTIONS)
        return {}
    with BackgroundServer(create_app(model, **OPTIONS)) as server:
        out = _ask(server.url, stop)
        unseeded = _completion(server.url, "Anything", temperature=1.0)
        out["unseeded"] = len(_ids(unseeded))
    return out


def test_tp2_server_replies_equal_tp1_server(tmp_path):
    with BackgroundServer(create_app(tiny_chat_model(), **OPTIONS)) as server:
        plain = _completion(server.url, "Stop here")["choices"][0]["text"]
        stop = plain[4:6]  # cuts the reply short: the request is cancelled mid-reply
        want = _ask(server.url, stop)
    assert want["stopped"] == plain[:plain.index(stop)]
    got = _spawn(_serving_ranks, 2, tmp_path, stop)[0]
    assert got.pop("unseeded") == 10
    assert got == want


def _failing_follower(rank, size):
    model = tiny_chat_model(tp=size)
    if rank:
        steps = []
        step = Engine.step

        def dying(self):
            steps.append(1)
            if len(steps) == 3:
                raise RuntimeError("injected follower fault")
            return step(self)

        Engine.step = dying
        try:
            follow(model, **OPTIONS)
        except RuntimeError as e:
            dist.destroy_process_group()  # what a dying process does to its connections
            return {"error": str(e)}
        return {"error": None}
    with BackgroundServer(create_app(model, **OPTIONS)) as server:
        t0 = time.monotonic()
        reply = _completion(server.url, "The sea", max_tokens=20)
        health = httpx.get(server.url + "/health", timeout=10)
        return {"reply": reply, "seconds": time.monotonic() - t0,
                "health": (health.status_code, health.json())}


def test_a_dying_follower_fails_requests_and_health(tmp_path):
    rank0, rank1 = _spawn(_failing_follower, 2, tmp_path)
    assert rank1["error"] == "injected follower fault"
    assert rank0["reply"]["status"] == 500
    assert "tensor-parallel group failed" in rank0["reply"]["error"]["message"]
    assert rank0["health"] == (503, {"status": "engine thread stopped"})
    assert rank0["seconds"] < 30


def test_cli_serve_under_torchrun(tiny_dir):
    """`torchrun --nproc-per-node 2 -m d3kernels serve --tp 2` on an HF directory (each rank
    reads its slices): rank 0 answers on the port, the same ids as the model at tp=1, and on
    SIGTERM both ranks shut down cleanly and promptly (the follower ignores the signal and
    stops when rank 0 tells it)."""
    import os
    import signal
    import subprocess
    import sys

    from d3kernels import LlamaD3
    from tests.test_tensor_parallel import _port

    port = _port()
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.Popen(
        [torchrun, "--nproc-per-node", "2", "--master-port", str(_port()), "-m", "d3kernels",
         "serve", "--model", str(tiny_dir), "--dtype", "float32", "--tp", "2", "--port",
         str(port), "--max-batch", "2", "--max-seq-len", "64", "--full-depth",
         "--served-name", "tiny"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, 90)
        reply = _completion(url, "The harbour")
        proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
        t0 = time.monotonic()
        proc.wait(60)
        # torchrun SIGKILLs workers still running 30 s after its SIGTERM: ours were done
        assert time.monotonic() - t0 < 20
        log = proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    one = LlamaD3.from_pretrained(str(tiny_dir), dtype=torch.float32, backend="torch")
    with BackgroundServer(create_app(one, model_name="tiny", max_batch=2,
                                     max_seq_len=64)) as server:
        want = _completion(server.url, "The harbour")
    assert _ids(reply) == _ids(want)
    assert log.count("d3kernels serve: tiny on") == 1, log
    # rank 0 shut down cleanly; the follower left without an error (torchrun itself exits 1
    # with a SignalException traceback on SIGTERM, whatever its workers do)
    assert "Application shutdown complete" in log and "Error" not in log.replace(
        "SignalException", ""), log
