"""Smoke test of perf/paged_cache_bench.py on the real SmolLM2 with a few short requests: every
run drains, the small pool preempts, prefix sharing saves prefill tokens, the report is
written."""
import json

from perf import paged_cache_bench


def test_paged_cache_bench_smoke(tmp_path):
    result = paged_cache_bench.main([
        "--requests", "6", "--max-batch", "3", "--new-tokens", "8", "12", "--page-size", "4",
        "--pool-fraction", "0.6", "--shared-requests", "4", "--system-tokens", "40",
        "--reps", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "paged_cache.json").read_text())
    assert saved["memory"].keys() == result["memory"].keys() and len(saved["memory"]) == 4
    full, small = saved["memory"]["full pool, D³"], saved["memory"]["small pool, D³"]
    assert full["preemptions"] == 0 and full["peak_kv_bytes"] <= full["reserved_kv_bytes"]
    assert small["reserved_kv_bytes"] < full["reserved_kv_bytes"]
    assert small["peak_kv_bytes"] <= small["reserved_kv_bytes"] and small["preemptions"] > 0
    assert full["tokens"] == small["tokens"]  # every request ran to its max_new_tokens
    off, on = saved["sharing"]["off, rep 1"], saved["sharing"]["on, rep 1"]
    assert off["shared_prefix_tokens"] == 0 < on["shared_prefix_tokens"]
    assert on["prefill_tokens"] + on["shared_prefix_tokens"] == off["prefill_tokens"]
    assert saved["system_prompt_tokens"] >= 40
    assert "| small pool, D³ |" in (tmp_path / "paged_cache.md").read_text()
