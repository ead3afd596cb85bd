"""Static KV cache: preallocated once per generation, written by index, never resized mid-step."""
from __future__ import annotations

import torch

from d3kernels.config import LlamaConfig


class KVCache:
    """k, v: [L, batch_size, kv_heads, seq_len, head_dim] in the model's dtype.

    One stacked tensor per kind, so a run of layers is a slice (one write for many layers).
    Zero-filled: attention masks unused slots, and zeros keep a masked product finite.

    written: bool [L, batch_size, seq_len], which (layer, row, slot) entries hold K/V of the
    current sequence. Every write sets it: a prefill sets all layers of its slots (and clears
    the row's slots after them), a decode step sets its kept layers, an eager ``propagate``
    backfill its skipped ones. In ``mask`` mode skipped layers stay False and attention at
    layer j ignores them; a deferred backfill leaves them False until it is flushed.

    Deferred ``propagate`` backfill (``backfill_timing="deferred"``): ``stash`` [L, batch_size,
    seq_len, H] (allocated on first use) keeps, per skipped run starting at layer a, the
    residual stream at (row, slot) as it reached layer a; ``deferred`` maps each run (a, b) to
    the (row, slot) pairs still to fill. ``LlamaD3.flush_backfill`` fills them, one launch per
    group of layers owed by the same entries. ``backfill_bytes``: weight bytes read by backfills into this cache so far.
    """

    def __init__(self, config: LlamaConfig, batch_size: int, seq_len: int, dtype: torch.dtype,
                 device: torch.device):
        shape = (config.num_layers, batch_size, config.num_kv_heads, seq_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.written = torch.zeros(shape[:2] + (seq_len,), dtype=torch.bool, device=device)
        self.hidden_size = config.hidden_size
        self.stash: torch.Tensor | None = None
        self.deferred: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self.backfill_bytes = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def seq_len(self) -> int:
        return self.k.shape[3]

    def get_stash(self) -> torch.Tensor:
        """The deferred-backfill state buffer, allocated once (CUDA graphs hold its address)."""
        if self.stash is None:
            L, B, _, T, _ = self.k.shape
            self.stash = torch.zeros(L, B, T, self.hidden_size, dtype=self.k.dtype,
                                     device=self.k.device)
        return self.stash

    @property
    def pending_backfill(self) -> int:
        """How many (layer, row, slot) entries a deferred backfill still owes."""
        return sum((b - a) * len(v) for (a, b), v in self.deferred.items())
