"""The CLI as a user runs it: `python -m d3kernels generate|chat` on the real model."""
import subprocess
import sys

import pytest


def run_cli(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "d3kernels", *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_generate_streams_text_and_prints_stats(smollm2_gguf_path):
    r = run_cli("generate", "What is 2 + 2?", "--max-new-tokens", "12", "--alpha", "0.9",
                "--compare")
    assert r.returncode == 0, r.stderr
    assert "loaded in" in r.stderr
    out = r.stdout
    assert "-- full depth:" in out
    assert "depth per token: 30x1" in out  # T_0 comes from the full-depth prefill
    assert "layer ratio" in out and "work ratio" in out
    assert "realized decode speedup vs full depth" in out
    text = out.split("-- full depth:")[1].split("\n", 1)[1].split("\n-- ")[0]
    assert text.strip(), "no generated text was streamed"


def test_generate_trace_shows_each_depth(smollm2_gguf_path):
    r = run_cli("generate", "Hello", "--max-new-tokens", "5", "--alpha", "0.8", "--trace",
                "--raw")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("[")]
    assert len(lines) >= 2
    assert [int(ln.split("depth")[1].split()[0]) for ln in lines] == [30, 24, 19, 15, 12][:len(lines)]


def test_chat_two_turns(smollm2_gguf_path):
    r = run_cli("chat", "--max-new-tokens", "8", stdin="Hi there\nName a fruit\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("layer ratio") == 2  # one stats line per reply


@pytest.mark.parametrize("args, message", [
    (["generate", "x", "--alpha", "1.5"], "alpha"),
    (["generate", "x", "--head", "20", "--tail", "20"], "head + tail"),
    (["generate", "x", "--model", "/no/such/model"], "no/such/model"),
])
def test_bad_arguments_exit_2_with_a_message(args, message, smollm2_gguf_path):
    r = run_cli(*args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
