"""LlamaD3 (torch backend) against the reference: logits, loaders, state and KV cache."""
import pytest
import torch

import reference
from d3kernels import LlamaConfig, LlamaD3
from tests.test_reference_vs_hf import CASES, rel_err, tiny_hf_llama

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_logits_match_reference(case, dtype):
    hf = tiny_hf_llama(**CASES[case], seed=1)
    model = LlamaD3.from_hf(hf, dtype=dtype)
    weights = {k: v.double() for k, v in model.state_dict().items()}
    ids = torch.randint(0, model.config.vocab_size, (3, 37))
    expected = reference.llama_forward(weights, model.config, ids)
    got = model.logits(ids)
    assert not got.isnan().any()
    assert rel_err(got, expected) <= TOL[dtype]


def test_from_hf_matches_hf(hf_smollm2, smollm2_f32, smollm2_tokenizer):
    ids = torch.tensor([smollm2_tokenizer.encode("def fibonacci(n):\n    return")])
    with torch.no_grad():
        expected = hf_smollm2(ids).logits
    assert rel_err(smollm2_f32.logits(ids), expected) <= 1e-4
    wrapped = LlamaD3.from_hf(hf_smollm2)
    assert rel_err(wrapped.logits(ids), expected) <= 1e-5


@pytest.mark.parametrize("preset", ["tiny", "smollm2-135m"])
def test_random_presets(preset):
    model = LlamaD3.random(preset, seed=3)
    again = LlamaD3.random(preset, seed=3)
    assert torch.equal(model.w_qkv, again.w_qkv)
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    logits = model.logits(ids)
    assert logits.shape == (1, 9, model.config.vocab_size) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_state_dict_roundtrip():
    model = LlamaD3.random("tiny", seed=5)
    copy = LlamaD3(model.config, {k: v.clone() for k, v in model.state_dict().items()})
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    assert torch.equal(copy.logits(ids), model.logits(ids))


@pytest.mark.parametrize("shard", [False, True])
def test_hf_directory_loader(tmp_path, shard):
    hf = tiny_hf_llama(heads=6, kv_heads=2, seed=2)
    hf.save_pretrained(tmp_path, max_shard_size="100KB" if shard else "1GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == shard
    model = LlamaD3.from_pretrained(tmp_path)
    ids = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        expected = hf(ids).logits
    assert rel_err(model.logits(ids), expected) <= 1e-5


def test_checkpoint_errors(tmp_path):
    hf = tiny_hf_llama(seed=2)
    hf.save_pretrained(tmp_path / "ok")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        LlamaD3.from_pretrained(tmp_path / "nowhere")
    # truncated weights file
    bad = tmp_path / "truncated"
    hf.save_pretrained(bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        LlamaD3.from_pretrained(bad)
    # a shard listed in the index is missing
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="100KB")
    next(sharded.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="shard"):
        LlamaD3.from_pretrained(sharded)
    # a tensor missing from the weights
    weights = dict(hf.state_dict())
    del weights["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        LlamaD3(LlamaConfig.from_hf_dict(hf.config.to_dict()), weights)
    # no config.json
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        LlamaD3.from_pretrained(empty)


def test_non_llama_config(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 10}))
    with pytest.raises(ValueError, match="not a Llama"):
        LlamaD3.from_pretrained(tmp_path)


def test_bad_model_arguments():
    model = LlamaD3.random("tiny")
    with pytest.raises(ValueError, match="dtype"):
        LlamaD3(model.config, model.state_dict(), dtype=torch.int32)
    with pytest.raises(ValueError, match="backend"):
        LlamaD3(model.config, model.state_dict(), backend="cuda-magic")
    with pytest.raises(ValueError, match="preset"):
        LlamaD3.random("llama-9")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.logits(torch.tensor([[1, 2, 512]]))
    with pytest.raises(ValueError, match="input_ids"):
        model.logits(torch.zeros(1, 0, dtype=torch.long))
