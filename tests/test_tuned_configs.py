"""Shipped autotune winners (d3kernels/ops/_tuning.py): read, prefilled into a Triton tuner, used.

A one-program kernel stores its BLOCK meta-parameter, so the output says which config ran. On the
CPU it runs in Triton's interpreter; the tests that go through ``autotune``'s GPU path pretend
to be on a GPU (``interpreting`` and the device name patched).
"""
import json

import pytest
import torch
import triton
import triton.language as tl

from d3kernels.ops import _tuning
from d3kernels.ops._tuning import apply_tuned, config_json, dump_tuned, gpu_slug, load_tuned
from tests.ops.conftest import DEVICE

GPU = "Fake GPU 80GB"
CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((16, 4), (32, 4), (64, 8))]
NAME = f"{__name__}._which_block"


@triton.jit
def _which_block(out_ptr, n, BLOCK: tl.constexpr):
    tl.store(out_ptr, BLOCK)


def _key(n: int) -> tuple:
    return (n, "torch.int32")  # the tuner's key: n, then the dtype of the one tensor argument


def _write(path, kernels) -> None:
    path.write_text(json.dumps({"gpu": GPU, "kernels": kernels}))


def _entry(n: int, config: triton.Config) -> dict:
    return {"key": list(_key(n)), "config": config_json(config)}


def _launch(tuner, n: int) -> int:
    out = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    tuner[(1,)](out, n)
    return int(out.item())


@pytest.fixture
def on_fake_gpu(monkeypatch, tmp_path):
    """autotune() takes its GPU path, on a GPU named GPU, shipped files read from tmp_path."""
    monkeypatch.setattr(_tuning, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: GPU)
    monkeypatch.setattr(_tuning, "TUNED_DIR", tmp_path)
    monkeypatch.setattr(_tuning, "_TABLES", {})
    monkeypatch.setattr(_tuning, "_TUNERS", {})
    monkeypatch.delenv("D3KERNELS_TUNED_OUT", raising=False)
    monkeypatch.delenv("D3KERNELS_AUTOTUNE", raising=False)
    return tmp_path


def test_slug():
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert gpu_slug("NVIDIA H200") == "nvidia-h200"


def test_load_and_apply(tmp_path):
    _write(tmp_path / f"{gpu_slug(GPU)}.json", {NAME: [_entry(8, CONFIGS[2])]})
    table = load_tuned(GPU, [tmp_path])
    assert table == {NAME: {_key(8): config_json(CONFIGS[2])}}
    tuner = triton.autotune(CONFIGS, key=["n"])(_which_block)
    assert apply_tuned(tuner, table[NAME]) == 1
    assert tuner.cache == {_key(8): CONFIGS[2]}
    assert _launch(tuner, 8) == 64  # the shipped choice, no benchmarking


def test_first_launch_uses_shipped_winner(on_fake_gpu):
    _write(on_fake_gpu / f"{gpu_slug(GPU)}.json", {NAME: [_entry(8, CONFIGS[1])]})
    tuner = _tuning.autotune(CONFIGS, key=["n"])(_which_block)
    assert tuner.configs == CONFIGS and tuner.cache == {}  # nothing read before a launch
    assert _launch(tuner, 8) == 32
    assert tuner.tuned_gpu == GPU and "run" not in vars(tuner)  # later launches: plain tuner


@pytest.mark.parametrize("text", [None, "{not json", '{"kernels": []}', '{"gpu": "x"}'],
                         ids=["no file", "not json", "kernels not a dict", "no kernels"])
def test_unknown_gpu_or_malformed_file_autotunes_as_usual(on_fake_gpu, text):
    if text is not None:
        (on_fake_gpu / f"{gpu_slug(GPU)}.json").write_text(text)
    tuner = _tuning.autotune(CONFIGS, key=["n"])(_which_block)
    with pytest.warns(UserWarning, match="no tuned kernel configs" if text is None else
                      "malformed"):
        _tuning._prefill(tuner)
    assert tuner.cache == {} and tuner.tuned_gpu == GPU


def test_bad_entries_and_stale_configs_are_skipped(tmp_path):
    stale = triton.Config({"BLOCK": 128}, num_warps=4)
    _write(tmp_path / f"{gpu_slug(GPU)}.json",
           {NAME: [_entry(8, CONFIGS[2]), {"key": 5}, "junk", {"key": [[1]], "config": {}},
                   _entry(16, stale)]})
    with pytest.warns(UserWarning, match="skipped 3 malformed entries"):
        table = load_tuned(GPU, [tmp_path])
    tuner = triton.autotune(CONFIGS, key=["n"])(_which_block)
    with pytest.warns(UserWarning, match="1 tuned configs .* not among its configs"):
        assert apply_tuned(tuner, table[NAME]) == 1
    assert tuner.cache == {_key(8): CONFIGS[2]}


def test_no_benchmarking_picks_first_config_left_by_pruning(on_fake_gpu, monkeypatch):
    """D3KERNELS_AUTOTUNE=0: a key with no winner runs the first config pruning keeps."""
    monkeypatch.setenv("D3KERNELS_AUTOTUNE", "0")
    tuner = _tuning.autotune(CONFIGS, key=["n"], prune_configs_by={
        "early_config_prune": lambda configs, named_args, **kw: configs[1:]})(_which_block)
    with pytest.warns(UserWarning, match="no tuned kernel configs"):
        assert _launch(tuner, 3) == 32


def test_dump_then_load_round_trip(on_fake_gpu):
    shipped = {NAME: [_entry(8, CONFIGS[1])], "other.kernel": [_entry(4, CONFIGS[0])]}
    _write(on_fake_gpu / f"{gpu_slug(GPU)}.json", shipped)
    tuner = _tuning.autotune(CONFIGS, key=["n"])(_which_block)
    assert _launch(tuner, 8) == 32
    tuner.cache[_key(16)] = CONFIGS[2]  # as if tuned in this process
    out = on_fake_gpu / "out" / f"{gpu_slug(GPU)}.json"
    assert dump_tuned(out, GPU) == 3
    saved = json.loads(out.read_text())
    assert saved["gpu"] == GPU and saved["triton"] == triton.__version__
    assert load_tuned(GPU, [out.parent]) == {
        NAME: {_key(8): config_json(CONFIGS[1]), _key(16): config_json(CONFIGS[2])},
        "other.kernel": {_key(4): config_json(CONFIGS[0])}}
