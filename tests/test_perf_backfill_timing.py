"""Smoke test of perf/backfill_timing.py (issue 4 §1) on the random tiny model, CPU, torch backend.

4 new tokens, not 2: with one decode step an eager backfill reads each skipped layer's K/V
weights once, exactly as one deferred flush does; from two steps on, deferred reads fewer.
One torch thread: on a CPU shared with other jobs, two threads of these tiny ops spin against
each other (measured 0.5 s with one thread, 32 s with two, on a loaded 2-core machine).
"""
import json

import torch

from perf import backfill_timing

ROW_FIELDS = {"batch", "prompt_tokens", "decode_steps", "decode_ms", "flush_ms",
              "deferred_decode_plus_flush_ms", "flushed_entries", "eager_backfill_bytes",
              "deferred_backfill_bytes", "max_abs_diff_k", "max_abs_diff_v", "written_equal",
              "tokens_equal", "layer_ratio", "work_ratio", "kv_cache_bytes", "stash_bytes",
              "stash_runs"}


def test_backfill_timing_smoke(tmp_path, capsys):
    threads = torch.get_num_threads()
    result = backfill_timing.main(["--preset", "tiny", "--device", "cpu", "--dtype", "float32",
                                   "--backend", "torch", "--tokens", "4", "--reps", "1",
                                   "--prompt-len", "8", "--batches", "1", "3", "--threads", "1",
                                   "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads  # --threads is undone on return
    saved = json.loads((tmp_path / "backfill_timing.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert "| D³ eager |" in (tmp_path / "backfill_timing.md").read_text()
    assert "D³ deferred decode + flush" in capsys.readouterr().out
    assert saved["backend"] == "torch" and saved["mask_skipped"] is None
    assert [row["batch"] for row in saved["rows"]] == [1, 3]
    for row in saved["rows"]:
        assert ROW_FIELDS <= set(row)
        assert set(row["decode_ms"]) == set(backfill_timing.MODES)
        assert all(t > 0 for t in row["decode_ms"].values()) and row["flush_ms"] > 0
        assert row["decode_steps"] == 3
        assert row["flushed_entries"] > 0
        assert row["written_equal"] and row["tokens_equal"]
        assert row["max_abs_diff_k"] < 1e-4 and row["max_abs_diff_v"] < 1e-4
        assert 0 < row["deferred_backfill_bytes"] < row["eager_backfill_bytes"]
        # the lower order skips one run per step: one hidden vector (96 fp32) per row and slot
        assert row["stash_runs"] == 1
        assert row["stash_bytes"] == row["cache_rows"] * row["cache_slots"] * 96 * 4
        assert 0 < row["stash_bytes"] < row["kv_cache_bytes"]
