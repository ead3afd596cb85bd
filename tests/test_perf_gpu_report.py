"""perf/gpu_report.py on the CPU: its figures need a GPU (on the CPU every op has run when it
returns, so the lookahead gap and the bandwidths mean nothing here), so these only check that
each row runs and lands in the report's tables: the --formats option, a row per weight format
with its bytes counted as stored and its tokens/s over bf16's (issue 13 §3), torch's kernel
path, failed rows, and the lookahead measurement (issue 9 §3)."""
import importlib.util

import pytest
import torch

from d3kernels import DepthSchedule, LlamaD3
from d3kernels.stats import step_bytes
from perf.gpu_report import (FORMATS, add_bf16_ratios, markdown, measure_row, parse_args,
                             plot)
from perf.provenance import run_info


def test_formats_option():
    assert parse_args([]).formats == ["bf16"]  # today's report: bf16 weights only
    args = parse_args(["--formats", "bf16", "int4", "int8", "int4"])
    assert args.formats == ["bf16", "int4", "int8"]  # each once, in the order given
    assert parse_args(["--formats", "int8"]).formats == ["int8"]
    assert args.torch_formats == args.formats  # torch eager runs every format by default
    args = parse_args(["--formats", "bf16", "int4", "int8", "--torch-formats", "int4", "bf16"])
    assert args.torch_formats == ["bf16", "int4"]  # in --formats' order
    with pytest.raises(SystemExit):
        parse_args(["--formats", "int3"])
    with pytest.raises(SystemExit):  # torch eager runs the models the triton rows built
        parse_args(["--formats", "bf16", "--torch-formats", "int4"])
    with pytest.raises(SystemExit):
        parse_args(["--presets", "llama-9b"])
    # issue 13's GPU formats: int4 in groups of 128, int8 with a scale per row (no group_size)
    assert FORMATS == {"bf16": {}, "int8": {"quantize": "int8"},
                       "int4": {"quantize": "int4", "group_size": 128}}


def test_rows_per_format_run_on_the_cpu(tmp_path):
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8]]
    s = DepthSchedule(alpha=0.8, head=2, tail=1)
    # tiny's K (96, 160) takes no group of 128: int4 in groups of 32 here. Float rows are
    # float32 on the CPU; they stand in the "bf16" slot the ratios divide by.
    kinds = {"bf16": {}, "int4": {"quantize": "int4", "group_size": 32},
             "int8": {"quantize": "int8"}}
    rows, models = [], {}
    for fmt, kw in kinds.items():
        model = models[fmt] = LlamaD3.random("tiny", dtype=torch.float32, seed=1,
                                             backend="torch", **kw)
        row = measure_row(model, prompts, 6, 1, s, 10.0, lookahead_gap=fmt == "bf16")
        cfg = model.config
        assert row["full_step_bytes"] == step_bytes(cfg, cfg.num_layers, [4 + 3] * 2,
                                                    model.weight_bytes)
        assert row["full_GBps"] == pytest.approx(row["full_step_bytes"] * row[
            "full_tokens_per_s"] / 2 / 1e9)
        assert row["full_fraction_of_copy"] == pytest.approx(row["full_GBps"] / 10.0)
        assert row["work_ratio"] > 1 and row["realized_over_work"] == pytest.approx(
            row["realized"] / row["work_ratio"])
        assert row["weights"] == model.weight_format
        assert row["resident_weight_bytes"] == model.resident_weight_bytes()
        assert row["torch_paths"] == model.torch_paths
        assert ("d3_ms_per_step_no_lookahead" in row) == (fmt == "bf16")
        rows.append({"preset": "tiny", "batch": 2, "format": fmt, "backend": "torch eager",
                     **row})
    # the stored bytes: int4 (values + scales + offsets) < int8 < float32
    step = {r["format"]: r["full_step_bytes"] for r in rows}
    assert step["int4"] < step["int8"] < step["bf16"]
    assert rows[0]["torch_paths"] == {}
    assert set(rows[1]["torch_paths"].values()) == {"int4pack"}
    assert set(rows[2]["torch_paths"].values()) == {"int8pack"}

    rows += [{"preset": "tiny", "batch": 2, "format": "int8", "backend": "triton",
              "error": "RuntimeError: no kernel | here"},
             {"preset": "tiny", "batch": 1, "format": "bf16", "backend": "transformers generate",
              "full_tokens_per_s": 12.5}]
    add_bf16_ratios(rows)
    assert rows[0]["full_vs_bf16"] == rows[0]["d3_vs_bf16"] == 1
    assert rows[1]["full_vs_bf16"] == pytest.approx(rows[1]["full_tokens_per_s"]
                                                    / rows[0]["full_tokens_per_s"])
    assert rows[2]["d3_vs_bf16"] == pytest.approx(rows[2]["d3_tokens_per_s"]
                                                  / rows[0]["d3_tokens_per_s"])
    assert "full_vs_bf16" not in rows[3] and "full_vs_bf16" not in rows[4]

    result = {**run_info("cpu"), "copy_bandwidth_GBps": 10.0, "schedule": s.to_dict(),
              "new_tokens": 6, "prompt_len": 4, "rows": rows, "interrupted": True,
              "formats": {fmt: FORMATS[fmt] for fmt in ("bf16", "int4", "int8")},
              "torch_formats": ["bf16", "int4", "int8"]}
    md = markdown(result)
    assert "random weights as bf16, int4 (groups of 128), int8 (a scale per row)" in md
    assert "torch eager on" not in md
    assert "; torch eager on bf16, int4 only" in markdown({**result,
                                                           "torch_formats": ["bf16", "int4"]})
    assert "| preset | batch | format | backend | full tok/s | x bf16 |" in md
    r = rows[1]
    assert (f"| tiny | 2 | int4 | torch eager | {r['full_tokens_per_s']:.1f} | "
            f"{r['full_vs_bf16']:.2f}x | {r['full_GBps']:.0f} ({r['full_fraction_of_copy']:.0%})"
            f" | {r['d3_tokens_per_s']:.1f} | {r['d3_vs_bf16']:.2f}x |") in md
    assert "| tiny | 2 | int8 | triton | failed: RuntimeError: no kernel / here |" in md
    assert "| tiny | 1 | bf16 | transformers generate | 12.5 |" in md
    assert "Stopped at its deadline" in md
    # the weights table: one line per format and backend, torch's kernels named
    assert f"| tiny | int4 | torch eager | {models['int4'].weight_format} | " in md
    assert "| int4pack |" in md and "| int8pack |" in md and "| linear |" in md
    # the lookahead table: the first format only
    sync, ahead = rows[0]["d3_ms_per_step_no_lookahead"], rows[0]["d3_ms_per_step"]
    assert "| without lookahead | with lookahead | saved |" in md
    assert f"| tiny | 2 | bf16 | torch eager | {sync:.3f} | {ahead:.3f} |" in md
    plot(result, tmp_path / "gpu_report.png")  # failed and transformers rows have no bars
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "gpu_report.png").stat().st_size > 0
