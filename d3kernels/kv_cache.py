"""Paged KV cache: fixed-size pages in one preallocated pool, addressed through block tables.

Every op that reads or writes K/V (d3kernels.ops, both backends) takes the pool and a block
table, so a stack that keeps its own pages (vLLM, FlashInfer users) can call them with its own
tables (docs/design.md §10). A contiguous per-row cache is the case where each row owns its pages
from the start (``num_pages=None``); the engine instead allocates pages as its requests grow.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Iterable

import torch

from d3kernels.config import LlamaConfig

# (a, b, s): skipped layers [a, b) whose shared input was stashed at ordinal s of its step
RunKey = tuple[int, int, int]


class CacheFull(RuntimeError):
    """Raised before any work when a pass needs more free pages than the pool has; nothing was
    allocated or written. The engine preempts a request and retries; elsewhere it means the
    pool (``num_pages``) is too small for what was asked."""


class KVCache:
    """k, v: [L, P, S, kv_heads, head_dim] in the model's dtype: P pages of S (``page_size``, a
    power of two) token slots per layer. One stacked tensor per kind, so a run of layers is a
    slice (one write for many layers). Zero-filled: attention masks unused slots, and zeros keep
    a masked product finite.

    block_table: int32 [batch_size, NP] on the cache's device (NP = ceil(seq_len / S) pages per
    row): position t of row r is slot ``t % S`` of page ``block_table[r, t // S]``; -1 means no
    page. A host mirror (``table``) is the allocator's truth; the device tensor is updated in
    place, so CUDA graphs that read it stay valid. ``num_pages`` None: P = batch_size · NP and
    row r owns pages r·NP .. r·NP + NP - 1 for the cache's life (``generate``, ``Conversation``);
    an int: pages are taken from a free list as rows grow (:meth:`reserve`) and given back by
    :meth:`release` (the engine). Reference counts let rows share full pages (the engine's
    prefix sharing); a write into a shared page first copies it (copy-on-write).

    written: bool [L, P, S], which (layer, page slot) entries hold K/V of their sequence. Every
    write sets it: a prefill sets all layers of its slots (and clears the row's slots after
    them), a decode step sets its kept layers, an eager ``propagate`` backfill its skipped ones.
    In ``mask`` mode skipped layers stay False and attention at layer j ignores them; a deferred
    backfill leaves them False until it is flushed.

    Deferred ``propagate`` backfill (``backfill_timing="deferred"``, the default): a run of
    consecutive skipped layers [a, b) at one position is filled from one residual, the one
    entering the run, so a step stashes one hidden vector per skipped run. ``stash``
    [R, P, S, H] (allocated on first use): ``stash[s, page, slot]`` is the residual that entered
    the s-th skipped run of the pass at that page slot; R is the most runs any step on this cache
    has skipped so far (1 for the ``lower`` and ``upper`` orders). ``deferred`` maps each cache
    row to what it still owes, by logical position: {(a, b, s): [position, ...]}.
    ``LlamaD3.flush_backfill`` fills it, one launch per group of layers owed by the same entries;
    a pass that reads a row's history settles that row first. ``backfill_bytes``: weight bytes
    read by backfills into this cache so far.
    """

    def __init__(self, config: LlamaConfig, batch_size: int, seq_len: int, dtype: torch.dtype,
                 device: torch.device, *, page_size: int = 16, num_pages: int | None = None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        per_row = self.row_pages(seq_len, page_size)
        static = num_pages is None
        if static:
            num_pages = batch_size * per_row
        elif isinstance(num_pages, bool) or not isinstance(num_pages, int) or num_pages < 1:
            raise ValueError(f"num_pages must be an int >= 1 or None, got {num_pages!r}")
        L = config.num_layers
        shape = (L, num_pages, page_size, config.num_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.written = torch.zeros(shape[:3], dtype=torch.bool, device=device)
        self.seq_len = seq_len
        self.hidden_size = config.hidden_size
        self.static = static
        self.table: list[list[int]] = [[-1] * per_row for _ in range(batch_size)]
        self.refs = [0] * num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # popped from the end: lowest first
        with torch.inference_mode(False):  # a normal tensor: its version counter tells the
            # ops' block-table check when it changed (d3kernels.ops._checks)
            self.block_table = torch.full((batch_size, per_row), -1, dtype=torch.int32,
                                          device=device)
        # prefix sharing (the engine): digest of a full page's tokens and all before it -> page,
        # for pages a full-depth prefill wrote; ``_key`` is the inverse. An indexed page no row
        # holds stays indexed in ``_idle`` (least recently released first) until a fresh page
        # is needed and none is free: a later request with the same prefix can still share it
        self._prefix: dict[bytes, int] = {}
        self._key: dict[int, bytes] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()
        self.peak_pages = 0
        if static:
            for r in range(batch_size):
                self._assign(r, 0, list(range(r * per_row, (r + 1) * per_row)))
            self._free = []
        self.stash: torch.Tensor | None = None
        self.deferred: dict[int, dict[RunKey, list[int]]] = {}
        # per owing row: bitmask of the layers it owes, and 1 + its highest owed slot (host
        # ints, so a step checks in O(rows) that it reads nothing still owed)
        self._owed_layers: dict[int, int] = {}
        self._owed_end: dict[int, int] = {}
        self.backfill_bytes = 0

    @staticmethod
    def row_pages(seq_len: int, page_size: int) -> int:
        """Pages a row of ``seq_len`` positions takes; ValueError naming the argument when
        seq_len is not an int >= 1 or page_size not a power of two."""
        for name, value in (("seq_len", seq_len), ("page_size", page_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size}")
        return -(-seq_len // page_size)

    # ---- shape --------------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self.block_table.shape[0]

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def pages_per_row(self) -> int:
        return self.block_table.shape[1]

    @property
    def page_bytes(self) -> int:
        """Bytes of K and V one page holds over all layers."""
        return 2 * self.k[:, 0].numel() * self.k.element_size()

    @property
    def kv_bytes(self) -> int:
        """Bytes of the K and V pools."""
        return 2 * self.k.numel() * self.k.element_size()

    @property
    def stash_bytes(self) -> int:
        """Bytes of the deferred-backfill stash (0 until a deferred step needs it)."""
        return 0 if self.stash is None else self.stash.numel() * self.stash.element_size()

    # ---- pages --------------------------------------------------------------------------------

    @property
    def free_pages(self) -> int:
        """Pages no row holds (indexed idle ones included: they are evicted on demand)."""
        return len(self._free) + len(self._idle)

    @property
    def pages_in_use(self) -> int:
        """Pages some row holds."""
        return self.num_pages - self.free_pages

    def _take_page(self) -> int:
        """A page for new contents: a free one, else the least recently released idle
        indexed one, which leaves the index."""
        if self._free:
            return self._free.pop()
        page, _ = self._idle.popitem(last=False)
        del self._prefix[self._key.pop(page)]
        return page

    def _assign(self, row: int, first: int, pages: list[int]) -> None:
        """Point row's page entries first, first+1, ... at ``pages`` (one device write)."""
        self.table[row][first:first + len(pages)] = pages
        for p in pages:
            self.refs[p] += 1
            self._idle.pop(p, None)
        self.block_table[row, first:first + len(pages)] = torch.tensor(pages, dtype=torch.int32)
        self.peak_pages = max(self.peak_pages, self.pages_in_use)

    def _unref(self, page: int) -> None:
        self.refs[page] -= 1
        if self.refs[page] == 0:
            if page in self._key:
                self._idle[page] = None
            else:
                self._free.append(page)

    def pages_needed(self, row: int, end: int, start: int = 0) -> int:
        """Free pages a write of positions start..end-1 of ``row`` takes: pages not yet
        allocated, and shared pages it would copy first."""
        S, t = self.page_size, self.table[row]
        return sum(t[i] < 0 or self.refs[t[i]] > 1 for i in range(start // S, -(-end // S)))

    def reserve(self, writes: Iterable[tuple[int, int, int]]) -> None:
        """Make every (row, start, end) writable at positions start..end-1: allocate the pages
        it lacks and copy shared ones it would write into (copy-on-write); a written page
        leaves the prefix index. Raises :class:`CacheFull` before changing anything when the
        free pages do not cover it all, ValueError when end passes the row's capacity."""
        writes = list(writes)
        S = self.page_size
        for row, start, end in writes:
            if start < 0 or end < start:
                raise ValueError(f"positions {start}..{end - 1} of row {row}: expected "
                                 f"0 <= start <= end")
            if end > self.pages_per_row * S:
                raise ValueError(f"position {end - 1} is past the cache's {self.pages_per_row} "
                                 f"pages of {S} per row")
        need = sum(self.pages_needed(r, e, s) for r, s, e in writes)
        if need > self.free_pages:
            raise CacheFull(f"the pass needs {need} free KV pages but {self.free_pages} of "
                            f"{self.num_pages} are free")
        for row, start, end in writes:
            t = self.table[row]
            for i in range(start // S, -(-end // S)):
                page = t[i]
                if page >= 0 and self.refs[page] > 1:
                    fresh = self._take_page()
                    self._copy_page(page, fresh)
                    self.refs[page] -= 1  # still held by another row
                    self._assign(row, i, [fresh])
                elif page < 0:
                    fresh = self._take_page()
                    self.written[:, fresh] = False  # a previous owner's marks
                    self._assign(row, i, [fresh])
                elif page in self._key:  # rewritten: no longer the prefix it was indexed as
                    del self._prefix[self._key.pop(page)]

    def _copy_page(self, src: int, dst: int) -> None:
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]
        self.written[:, dst] = self.written[:, src]
        if self.stash is not None:
            self.stash[:, dst] = self.stash[:, src]

    def release(self, row: int) -> None:
        """Give back row's pages (a shared page stays while another row holds it) and forget
        what it owes: nothing reads a released row. No-op for a static cache."""
        self.drop_backfill([row])
        if self.static:
            return
        # last page first: idle indexed pages are reused oldest first, so a prefix chain is
        # evicted from its tail and its head stays shareable longest
        for p in reversed(self.table[row]):
            if p >= 0:
                self._unref(p)
        self.table[row] = [-1] * self.pages_per_row
        self.block_table[row] = -1

    # ---- prefix sharing -----------------------------------------------------------------------

    def page_keys(self, tokens: list[int], pages: int) -> list[bytes]:
        """The prefix index's key of each of the first ``pages`` full pages of ``tokens``: a
        digest of tokens[:S·(i+1)], the page's tokens and all before them."""
        S, h, out = self.page_size, hashlib.blake2b(digest_size=16), []
        for i in range(pages):
            h.update(array("q", tokens[i * S:(i + 1) * S]).tobytes())
            out.append(h.copy().digest())
        return out

    def share_prefix(self, row: int, tokens: list[int]) -> int:
        """Point an empty row's first pages at indexed pages holding the same leading tokens
        (full pages only, and never the page of the last token: a prefill must still run it
        to get the next token). Returns the positions covered (a multiple of page_size)."""
        if self.static:
            raise ValueError("share_prefix: the rows of a static cache (num_pages=None) own "
                             "their pages; sharing needs a pool (num_pages=n)")
        if any(p >= 0 for p in self.table[row]):
            raise ValueError(f"share_prefix: row {row} holds pages; release it first")
        pages = self.prefix_pages(tokens)
        if pages:
            self._assign(row, 0, pages)
        return len(pages) * self.page_size

    def prefix_pages(self, tokens: list[int]) -> list[int]:
        """The indexed pages :meth:`share_prefix` would point a row holding ``tokens`` at."""
        pages = []
        for key in self.page_keys(tokens, (len(tokens) - 1) // self.page_size):
            if key not in self._prefix:
                break
            pages.append(self._prefix[key])
        return pages

    def index_prefix(self, row: int, tokens: list[int]) -> None:
        """Index row's full pages holding ``tokens`` (written at every layer by a prefill) for
        :meth:`share_prefix`. Decode-written pages are never indexed: with layers skipped their
        K/V differ from what a prefill of the same tokens writes (docs/design.md §10)."""
        for i, key in enumerate(self.page_keys(tokens, len(tokens) // self.page_size)):
            page = self.table[row][i]
            if page < 0:
                raise ValueError(f"index_prefix: row {row} holds no page for positions "
                                 f"{i * self.page_size}.. of its tokens")
            if key not in self._prefix and page not in self._key:
                self._prefix[key], self._key[page] = page, key

    # ---- addressing ---------------------------------------------------------------------------

    def slots(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat page-slot indices (page · S + position % S, long) of positions of rows (long
        tensors that broadcast), read from the device block table. A position behind no page
        maps to page 0: reads of it must be masked (the causal mask does), and writers reserve
        what they write first (every LlamaD3 pass does), as nothing here can drop a write."""
        S = self.page_size
        page = self.block_table[rows, positions // S].long().clamp(min=0)
        return page * S + positions % S

    def flat(self, t: torch.Tensor) -> torch.Tensor:
        """k, v [L, P, S, ...], written [L, P, S] or stash [R, P, S, H] viewed with their page
        slots flattened: [L, P·S, ...]."""
        return t.flatten(1, 2)

    def gather_row(self, t: torch.Tensor, row: int, end: int | None = None) -> torch.Tensor:
        """A copy of t (k, v, written or stash) at positions 0..end-1 (None: the row's
        capacity) of ``row`` in order: [L (or R), end, ...]; positions behind no page read
        page slot 0."""
        end = self.pages_per_row * self.page_size if end is None else end
        dev = self.k.device
        return self.flat(t)[:, self.slots(torch.tensor(row, device=dev),
                                          torch.arange(end, device=dev))]

    def clear_rows(self, rows: list[int], first: list[int]) -> None:
        """Mark row rows[i]'s positions from first[i] on not written (stale contents); pages
        another row shares are left alone (a write there copies them first)."""
        S, pages = self.page_size, []
        for r, f in zip(rows, first):
            t, i = self.table[r], f // S
            if f % S and i < len(t) and t[i] >= 0 and self.refs[t[i]] == 1:
                self.written[:, t[i], f % S:] = False
            i += f % S > 0
            pages += [p for p in t[i:] if p >= 0 and self.refs[p] == 1]
        if pages:
            self.written[:, torch.tensor(pages, device=self.k.device)] = False

    # ---- deferred backfill --------------------------------------------------------------------

    def get_stash(self, runs: int = 1) -> torch.Tensor:
        """The stash with room for ``runs`` skipped runs per step. Grown only when a step
        skips more runs than any before it (what it holds is copied over): a new tensor, so
        CUDA graphs that hold the old address must be re-captured (TritonBackend checks)."""
        held = 0 if self.stash is None else self.stash.shape[0]
        if runs > held:
            _, P, S, _, _ = self.k.shape
            grown = torch.zeros(runs, P, S, self.hidden_size, dtype=self.k.dtype,
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
