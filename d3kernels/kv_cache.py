"""Static KV cache: preallocated once per generation, written by index, never resized mid-step."""
from __future__ import annotations

import torch

from d3kernels.config import LlamaConfig


class KVCache:
    """k, v: [L, batch_size, kv_heads, seq_len, head_dim] in the model's dtype.

    One stacked tensor per kind, so a run of layers is a slice (one write for many layers).
    Zero-filled: attention masks unused slots, and zeros keep a masked product finite.
    """

    def __init__(self, config: LlamaConfig, batch_size: int, seq_len: int, dtype: torch.dtype,
                 device: torch.device):
        shape = (config.num_layers, batch_size, config.num_kv_heads, seq_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def seq_len(self) -> int:
        return self.k.shape[3]
