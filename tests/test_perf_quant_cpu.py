"""Smoke test of perf/quant_cpu.py (issue 13 §3) on the real SmolLM2 GGUF: 4 tokens, 1 rep, one
thread (a loaded 2-core machine makes two spin against each other), llama.cpp made unimportable
so the test needs no llama-cpp-python and checks its "absent" report."""
import json
import sys

import pytest
import torch

from perf import quant_cpu

ROWS = ["LlamaD3 Q4_1 full depth", "LlamaD3 Q4_1 D³ α 0.995", "LlamaD3 Q4_1 D³ α 0.98",
        "LlamaD3 float32 full depth", "LlamaD3 float32 D³ α 0.98", "LlamaD3 bfloat16 full depth"]


def test_quant_cpu_smoke_without_llama_cpp(tmp_path, monkeypatch, capsys, smollm2_gguf_path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    threads = torch.get_num_threads()
    result = quant_cpu.main(["--max-new-tokens", "4", "--reps", "1", "--threads", "1",
                             "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads  # --threads is undone on return
    saved = json.loads((tmp_path / "quant_cpu.json").read_text())
    assert saved == json.loads(json.dumps(result))
    md = (tmp_path / "quant_cpu.md").read_text()
    assert md in capsys.readouterr().out

    assert saved["llama_cpp"] is None
    assert f"llama.cpp: absent ({saved['llama_cpp_absent']})." in md
    assert saved["llama_cpp_absent"].startswith("import llama_cpp failed: ModuleNotFoundError")
    assert "q4_1_full_vs_llamacpp" not in saved
    assert saved["goals"]["full_depth_at_least_0.8x_llamacpp"] is None
    assert "≥ 0.8 × llama.cpp's decode tok/s: unmeasured" in md

    assert list(saved["rows"]) == ROWS
    assert saved["new_tokens"] == 4 and saved["prompt_tokens"] > 0
    for name, row in saved["rows"].items():
        assert row["decode_tokens"] == 3  # T_0 comes from the prefill
        assert row["decode_tokens_per_s_reps"] == [row["decode_tokens_per_s"]]  # 1 rep
        assert row["decode_tokens_per_s"] > 0 and row["wall_decode_tokens_per_s"] > 0
        assert row["GBps"] > 0 and row["bytes_per_step"] > 0
        assert 0 <= row["same_tokens_as_reference"] <= 4
        assert f"| {name} | {row['weights']} | {row['activations']} |" in md
        if row["schedule"] is None:
            assert row["mean_layers_per_token"] == 30 and row["work_ratio"] == 1
        else:
            assert row["work_ratio"] >= 1 and row["realized_speedup"] > 0
            assert row["realized_over_work"] == row["realized_speedup"] / row["work_ratio"]
    rows = saved["rows"]
    assert rows["LlamaD3 Q4_1 full depth"]["same_tokens_as_reference"] == 4
    assert rows["LlamaD3 Q4_1 full depth"]["weights"] == "Q4_1 + Q8_0 head"
    assert rows["LlamaD3 Q4_1 full depth"]["activations"] == "bfloat16"
    assert rows["LlamaD3 float32 full depth"]["weights"] == "float32"
    assert rows["LlamaD3 Q4_1 D³ α 0.995"]["schedule"]["alpha"] == 0.995
    # Q4_1 reads fewer bytes per step than bf16, which reads half of float32
    per_step = {k: rows[f"LlamaD3 {k} full depth"]["bytes_per_step"]
                for k in ("Q4_1", "bfloat16", "float32")}
    assert per_step["Q4_1"] < per_step["bfloat16"] < per_step["float32"]
    assert set(saved["resident_weight_MB"]) == {"Q4_1 + Q8_0 head", "float32", "bfloat16"}
    assert saved["resident_weight_MB"]["float32"] > saved["resident_weight_MB"]["bfloat16"]
    assert len(saved["load_average_before"]) == 3 and saved["copy_bandwidth_GBps"] > 0


def test_llamacpp_runner_times_decode_only(smollm2_gguf_path, smollm2_f32):
    """Where llama-cpp-python is installed: its runner re-evaluates the prompt on every call
    (no cached-prefix reuse), counts the n - 1 decode evals, and greedy-decodes what LlamaD3
    float32 does on the same prompt tokens for the first few tokens."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ids = smollm2_f32.tokenizer.encode_chat([{"role": "user", "content": quant_cpu.PROMPT}])
    run, threads, _ = quant_cpu.llamacpp_runner(llama_cpp, smollm2_gguf_path, ids, 4)
    assert threads == torch.get_num_threads()
    first, second = run(4), run(4)
    assert first.tokens == second.tokens and len(first.tokens) == 4
    assert first.decode_tokens == second.decode_tokens == 3
    assert 0 < second.decode_seconds <= second.wall_decode_seconds
    ours = smollm2_f32.generate([ids], 4, None, stop_tokens=()).tokens[0]
    assert quant_cpu.common_prefix(first.tokens, ours) >= 2
