"""Checkpoint loaders: each returns (LlamaConfig, HF-named weights, Tokenizer or None)."""
from __future__ import annotations

from pathlib import Path

from d3kernels.loaders.gguf import load_gguf
from d3kernels.loaders.hf_dir import load_hf_dir


def load_checkpoint(src: str | Path, keep_quantized: bool = False, tp: int = 1):
    """Dispatch on what ``src`` is: a known model name, a .gguf file or an HF directory.
    keep_quantized: a GGUF's Q4_0/Q4_1/Q8_0 tensors stay quantized (see load_gguf). tp > 1:
    only this rank's shard of each tensor is read (d3kernels.parallel; the config is checked
    against tp before any tensor is)."""
    from d3kernels.models_registry import resolve_model_source

    path = resolve_model_source(src)
    if path.is_dir():
        return load_hf_dir(path, tp)
    return load_gguf(path, keep_quantized, tp)


__all__ = ["load_checkpoint", "load_gguf", "load_hf_dir"]
