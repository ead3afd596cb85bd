"""The CLI as a user runs it: `python -m d3kernels generate|chat` on the real model."""
import subprocess
import sys

import pytest
import torch

from d3kernels import cli


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


@pytest.mark.parametrize("capabilities, want", [
    ({"avx512_f": True, "avx512_bf16": True}, torch.bfloat16),
    ({"avx512_f": True, "avx512_bf16": False}, torch.float32),  # AVX-512 alone emulates bf16
    ({"architecture": "aarch64", "bf16": True}, torch.float32),  # unmeasured: fp32
])
def test_auto_dtype_on_cpu_is_bf16_only_with_native_bf16(capabilities, want, monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities, raising=False)
    assert cli.auto_dtype("cpu")[0] == want


def test_native_bf16_read_from_cpuinfo_where_torch_cannot_say(monkeypatch, tmp_path):
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(cli, "_CPUINFO", cpuinfo)
    assert not cli.cpu_has_native_bf16()  # unreadable: assume none
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert cli.cpu_has_native_bf16()
    cpuinfo.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16x\nbugs\t\t: avx512_bf16\n")
    assert not cli.cpu_has_native_bf16()


@pytest.mark.parametrize("bf16, want", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_dtype_on_cuda(bf16, want, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert cli.auto_dtype("cuda:0")[0] == want


@pytest.mark.parametrize("flag, want", [
    ([], (torch.bfloat16, "auto", None)),
    (["--dtype", "float32"], (torch.float32, "auto", None)),
    (["--quantize", "none"], (torch.bfloat16, None, None)),
    (["--quantize", "int4", "--group-size", "64"], (torch.bfloat16, "int4", 64))])
def test_cli_loads_with_the_auto_or_the_named_dtype(flag, want, monkeypatch, capsys):
    """By default the checkpoint's own quantization with bf16 activations (the fast path on an
    AVX512_BF16 CPU); --dtype, --quantize and --group-size choose others."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True},
                        raising=False)
    seen = []

    def from_pretrained(source, dtype, device, quantize, group_size):
        seen.append((dtype, quantize, group_size))
        raise ValueError("stop before loading")

    monkeypatch.setattr(cli.LlamaD3, "from_pretrained", from_pretrained)
    assert cli.main(["generate", "x", *flag]) == 2
    assert seen == [want]
    want = want[0]
    assert f"in {str(want).removeprefix('torch.')} on cpu" in capsys.readouterr().err
