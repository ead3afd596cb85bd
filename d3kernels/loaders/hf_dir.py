"""Hugging Face Llama checkpoint directories: config.json + single or sharded safetensors."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from d3kernels.config import LlamaConfig
from d3kernels.parallel import TensorParallel, tensor_parallel


def _load_safetensors(path: Path, tp: TensorParallel | None) -> dict[str, torch.Tensor]:
    """Every tensor of one file; under TP only this rank's shard of each (a slice read)."""
    try:
        if tp is None:
            return load_file(path)
        out = {}
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                cut = tp.shard(name)
                if cut is None:
                    out[name] = f.get_tensor(name)
                    continue
                dim, a, b = cut
                part = f.get_slice(name)
                out[name] = part[a:b] if dim == 0 else part[:, a:b]
        return out
    except (SafetensorError, OSError) as e:
        raise ValueError(f"checkpoint file {path} is truncated or corrupt: {e}") from e


def load_hf_dir(path: str | Path, tp: int = 1):
    """(LlamaConfig, weights, Tokenizer or None) from a directory saved by ``save_pretrained``.
    tp > 1: each weight is this rank's shard (d3kernels.parallel)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"checkpoint directory {path} has no config.json")
    config = LlamaConfig.from_hf_dict(json.loads(config_file.read_text()))
    tp_state = tensor_parallel(tp, config)
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        shard_names = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        shard_names = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"checkpoint directory {path} has no model.safetensors or "
                                "model.safetensors.index.json (only safetensors are supported)")
    weights = {}
    for name in shard_names:
        shard_file = path / name
        if not shard_file.is_file():
            raise FileNotFoundError(f"checkpoint shard {shard_file} listed in the index is "
                                    f"missing")
        weights.update(_load_safetensors(shard_file, tp_state))
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from d3kernels.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_hf_dir(path)
    return config, weights, tokenizer
