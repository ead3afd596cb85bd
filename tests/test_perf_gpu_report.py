"""perf/gpu_report.py's lookahead measurement (issue 9 §3), run on the CPU: the gap it measures
needs a GPU (on the CPU every op has run when it returns), so this only checks that it runs
and lands in the report's tables."""
import torch

from d3kernels import DepthSchedule, LlamaD3
from perf.gpu_report import decode_seconds_per_step, markdown
from perf.provenance import run_info


def test_lookahead_measurement_runs_on_the_cpu():
    model = LlamaD3.random("tiny", dtype=torch.float32, seed=1)
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8]]
    s = DepthSchedule(alpha=0.8, head=2, tail=1)
    row = {"preset": "tiny", "batch": 2, "backend": "torch eager"}
    ahead, stats = decode_seconds_per_step(model, prompts, 6, s, 1, lookahead=True)
    sync, stats_sync = decode_seconds_per_step(model, prompts, 6, s, 1, lookahead=False)
    assert ahead > 0 and sync > 0
    assert stats.decode_steps == stats_sync.decode_steps == 5
    assert stats.work_ratio == stats_sync.work_ratio > 1
    row.update(full_tokens_per_s=1.0, d3_tokens_per_s=2 / ahead, full_GBps=1.0,
               full_fraction_of_copy=0.5, layer_ratio=stats.layer_ratio,
               work_ratio=stats.work_ratio, realized=1.0, realized_over_work=1.0,
               d3_ms_per_step=1e3 * ahead, d3_ms_per_step_no_lookahead=1e3 * sync)
    md = markdown({**run_info("cpu"), "copy_bandwidth_GBps": 1.0, "schedule": s.to_dict(),
                   "new_tokens": 6, "prompt_len": 4, "rows": [row]})
    assert "| without lookahead | with lookahead | saved |" in md
    assert f"| tiny | 2 | torch eager | {1e3 * sync:.3f} | {1e3 * ahead:.3f} |" in md
