"""Shared pytest fixtures: the real SmolLM2-135M-Instruct checkpoint and its transformers peer."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter, which must be chosen before triton
# is first imported (design.md §6).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf, fetched into the d3kernels cache on first use."""
    from d3kernels.models_registry import resolve_model_source

    return resolve_model_source("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf_path):
    """transformers' LlamaForCausalLM from the same GGUF, float32, eval mode (~30 s to load)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf_path.parent,
                                                 gguf_file=smollm2_gguf_path.name,
                                                 dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_gguf_path):
    """transformers' tokenizer built from the same GGUF's metadata."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf_path.parent,
                                         gguf_file=smollm2_gguf_path.name)


@pytest.fixture(scope="session")
def smollm2_f32(smollm2_gguf_path):
    """LlamaD3 on the real SmolLM2 weights dequantized to float32."""
    from d3kernels import LlamaD3

    return LlamaD3.from_pretrained(smollm2_gguf_path, dtype=torch.float32, quantize=None)


@pytest.fixture(scope="session")
def smollm2_f64(smollm2_gguf_path):
    """LlamaD3 on the real SmolLM2 weights dequantized to float64: for exact comparisons with
    the oracle."""
    from d3kernels import LlamaD3

    return LlamaD3.from_pretrained(smollm2_gguf_path, dtype=torch.float64, quantize=None)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_f32):
    return smollm2_f32.tokenizer
