"""Smoke test of perf/tp_one_rank.py (issue 11 §4) on CPU: the tiny preset in a gloo group of
one; the script itself checks the grouped model's tokens equal the model's without a group."""
import torch.distributed as dist

from perf import tp_one_rank


def test_tp_one_rank_smoke(tmp_path, capsys):
    rows = tp_one_rank.main(["--preset", "tiny", "--device", "cpu", "--dtype", "float32",
                             "--tokens", "4", "--reps", "1", "--out", str(tmp_path)])
    assert [r["schedule"] for r in rows] == ["full depth", "D³ α 0.98"]
    assert all(r["ratio"] > 0 for r in rows)
    md = (tmp_path / "tp_one_rank.md").read_text()
    assert md in capsys.readouterr().out and "gloo group of one" in md
    assert not dist.is_initialized()  # the group is gone again
