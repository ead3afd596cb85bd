"""Hugging Face Llama checkpoint directories: config.json + single or sharded safetensors."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from d3kernels.config import LlamaConfig


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"checkpoint file {path} is truncated or corrupt: {e}") from e


def load_hf_dir(path: str | Path):
    """(LlamaConfig, weights, Tokenizer or None) from a directory saved by ``save_pretrained``."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"checkpoint directory {path} has no config.json")
    config = LlamaConfig.from_hf_dict(json.loads(config_file.read_text()))
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
        shard = path / name
        if not shard.is_file():
            raise FileNotFoundError(f"checkpoint shard {shard} listed in the index is missing")
        weights.update(_load_safetensors(shard))
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from d3kernels.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_hf_dir(path)
    return config, weights, tokenizer
