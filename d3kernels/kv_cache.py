"""Static KV cache: preallocated once per generation, written by index, never resized mid-step."""
from __future__ import annotations

import torch

from d3kernels.config import LlamaConfig

# (a, b, s): skipped layers [a, b) whose shared input was stashed at ordinal s of its step
RunKey = tuple[int, int, int]


class KVCache:
    """k, v: [L, batch_size, kv_heads, seq_len, head_dim] in the model's dtype.

    One stacked tensor per kind, so a run of layers is a slice (one write for many layers).
    Zero-filled: attention masks unused slots, and zeros keep a masked product finite.

    written: bool [L, batch_size, seq_len], which (layer, row, slot) entries hold K/V of the
    current sequence. Every write sets it: a prefill sets all layers of its slots (and clears
    the row's slots after them), a decode step sets its kept layers, an eager ``propagate``
    backfill its skipped ones. In ``mask`` mode skipped layers stay False and attention at
    layer j ignores them; a deferred backfill leaves them False until it is flushed.

    Deferred ``propagate`` backfill (``backfill_timing="deferred"``, the default): a run of
    consecutive skipped layers [a, b) at one position is filled from one residual, the one
    entering the run, so a step stashes one hidden vector per skipped run. ``stash``
    [S, batch_size, seq_len, H] (allocated on first use): ``stash[s, row, slot]`` is the
    residual that entered the s-th skipped run of the pass at (row, slot); S is the most runs
    any step on this cache has skipped so far (1 for the ``lower`` and ``upper`` orders).
    ``deferred`` maps each cache row to what it still owes: {(a, b, s): [slot, ...]}.
    ``LlamaD3.flush_backfill`` fills it, one launch per group of layers owed by the same
    entries; a pass that reads a row's history settles that row first. ``backfill_bytes``:
    weight bytes read by backfills into this cache so far.
    """

    def __init__(self, config: LlamaConfig, batch_size: int, seq_len: int, dtype: torch.dtype,
                 device: torch.device):
        shape = (config.num_layers, batch_size, config.num_kv_heads, seq_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.written = torch.zeros(shape[:2] + (seq_len,), dtype=torch.bool, device=device)
        self.hidden_size = config.hidden_size
        self.stash: torch.Tensor | None = None
        self.deferred: dict[int, dict[RunKey, list[int]]] = {}
        # per owing row: bitmask of the layers it owes, and 1 + its highest owed slot (host
        # ints, so a step checks in O(rows) that it reads nothing still owed)
        self._owed_layers: dict[int, int] = {}
        self._owed_end: dict[int, int] = {}
        self.backfill_bytes = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def seq_len(self) -> int:
        return self.k.shape[3]

    @property
    def kv_bytes(self) -> int:
        """Bytes of the K and V tensors."""
        return 2 * self.k.numel() * self.k.element_size()

    @property
    def stash_bytes(self) -> int:
        """Bytes of the deferred-backfill stash (0 until a deferred step needs it)."""
        return 0 if self.stash is None else self.stash.numel() * self.stash.element_size()

    def get_stash(self, runs: int = 1) -> torch.Tensor:
        """The stash with room for ``runs`` skipped runs per step. Grown only when a step
        skips more runs than any before it (what it holds is copied over): a new tensor, so
        CUDA graphs that hold the old address must be re-captured (TritonBackend checks)."""
        held = 0 if self.stash is None else self.stash.shape[0]
        if runs > held:
            _, B, _, T, _ = self.k.shape
            grown = torch.zeros(runs, B, T, self.hidden_size, dtype=self.k.dtype,
                                device=self.k.device)
            if held:
                grown[:held] = self.stash
            self.stash = grown
        return self.stash

    def defer(self, row: int, slot: int, runs: tuple[tuple[int, int], ...],
              layers: int) -> None:
        """Record that the pass at (row, slot) stashed the input of each skipped run
        (runs[s] at ordinal s) and owes their K/V; layers: the bitmask of those layers."""
        owed = self.deferred.setdefault(row, {})
        for s, (a, b) in enumerate(runs):
            owed.setdefault((a, b, s), []).append(slot)
        self._owed_layers[row] = self._owed_layers.get(row, 0) | layers
        self._owed_end[row] = max(self._owed_end.get(row, 0), slot + 1)

    def must_settle(self, rows, slots, kept_layers) -> list[int]:
        """Indices i of the (rows[i], slots[i]) passes that would read or overwrite owed
        entries: the row owes an entry at slots[i] or later (the sequence is being rewritten)
        or at a layer in kept_layers[i] (a bitmask; reading it, the layer sets not nested)."""
        ends, owed = self._owed_end, self._owed_layers
        return [i for i, (r, p, k) in enumerate(zip(rows, slots, kept_layers))
                if r in ends and (ends[r] > p or owed[r] & k)]

    def take_backfill(self, rows=None) -> dict[int, dict[RunKey, list[int]]]:
        """Remove and return what ``rows`` (None: every row) owe, as in ``deferred``."""
        if rows is None:
            taken, self.deferred = self.deferred, {}
            self._owed_layers, self._owed_end = {}, {}
            return taken
        taken = {}
        for r in rows:
            if r in self.deferred:
                taken[r] = self.deferred.pop(r)
                del self._owed_layers[r], self._owed_end[r]
        return taken

    def drop_backfill(self, rows=None) -> int:
        """Forget what ``rows`` (None: every row) owe, for entries nothing will read (a
        released engine row, a cache reused for a new generation). Returns the (layer, row,
        slot) entries dropped."""
        return _entries(self.take_backfill(rows))

    @property
    def pending_backfill(self) -> int:
        """How many (layer, row, slot) entries a deferred backfill still owes."""
        return _entries(self.deferred)


def _entries(owed: dict[int, dict[RunKey, list[int]]]) -> int:
    return sum((b - a) * len(slots) for runs in owed.values() for (a, b, _), slots in runs.items())
