"""perf/ops/summary.py: the per-op benchmark table, from a made-up pytest-benchmark JSON."""
from perf.ops.summary import main, markdown


def _bench(group, impl, us, **info):
    return {"group": group, "name": f"test[{impl}]", "extra_info": {"impl": impl, "us": us, **info}}


DATA = {"benchmarks": [
    _bench("qkv_rope B=1", "eager", 30.0, GBps=900.0, bw_fraction=0.3, kernel_launches=9),
    _bench("qkv_rope B=1", "d3kernels", 10.0, GBps=2700.0, bw_fraction=0.9, kernel_launches=1),
    _bench("qkv_rope B=1", "compile", 20.0, kernel_launches=3),
    _bench("lm_head B=8", "d3kernels", 12.0, TFLOPs=1.5),
    _bench("lm_head B=8", "compile", 10.0),
    {"group": "skipped", "name": "test[x]", "extra_info": {"impl": "d3kernels"}},  # no timing
]}
QUANTIZED = {"benchmarks": DATA["benchmarks"] + [
    _bench("o_proj M=1 int4", "d3kernels", 8.0, torch_path="int4pack-cuda"),
    _bench("o_proj M=1 int4", "eager", 16.0, torch_path="int4pack-cuda"),
    _bench("o_proj M=1 int8", "d3kernels", 8.0, torch_path="int8pack"),
    _bench("o_proj M=1 int8", "eager", 4.0, torch_path="int8pack"),
]}


def test_markdown_rows_speedups_and_verdict():
    text = markdown(DATA, "NVIDIA Test GPU")
    lines = text.splitlines()
    assert lines[0] == "NVIDIA Test GPU"
    rows = [line for line in lines if line.startswith("| qkv_rope")]
    assert [row.split(" | ")[1] for row in rows] == ["d3kernels", "compile", "eager"]
    assert rows[0] == "| qkv_rope B=1 | d3kernels | 10.0 | 2700 (90%) |  | 1 |  |"
    assert rows[2].endswith("| 9 | 3.00× |")
    assert "| lm_head B=8 | d3kernels | 12.0 |  | 1.5 |  |  |" in lines
    assert "skipped" not in text
    assert lines[-1] == ("d3kernels at least as fast as torch.compile on 1 of 2 shapes; slower "
                         "on: lm_head B=8 (0.83×).")


def test_quantized_verdict_against_torchs_own_op():
    lines = markdown(QUANTIZED).splitlines()
    assert lines[-2].startswith("d3kernels at least as fast as torch.compile on 1 of 2 shapes")
    assert lines[-1] == ("Weight-only int4/int8: d3kernels at least as fast as torch's own op "
                         "(eager) on 1 of 2 shapes; slower on: o_proj M=1 int8 (0.50×, torch "
                         "int8pack).")
    assert "Weight-only" not in markdown(DATA)


def test_cli_writes_the_table(tmp_path, capsys):
    import json

    src, out = tmp_path / "ops.json", tmp_path / "ops.md"
    src.write_text(json.dumps(DATA))
    assert main([str(src), "--out", str(out)]) == out.read_text() == capsys.readouterr().out
