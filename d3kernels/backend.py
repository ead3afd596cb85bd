"""The interface LlamaD3's two backends implement: its passes over the shared weights and cache.

``LlamaD3`` (d3kernels.model) owns the weights, the config, the RoPE tables, the public API and
its argument checks, and the bookkeeping both backends share: the ``KVCache.written`` marks a
pass will leave, the deferred-backfill debts (``KVCache.defer``, settling owed entries before a
pass reads or overwrites them), the stash's size and the backfill byte counts. It then calls its
backend, which only computes: it reads the model's weights and writes the cache's K/V (and
stash, and ``written`` where a method says so). ``TorchBackend`` (d3kernels.torch_backend) runs
the passes with torch's own primitives; ``TritonBackend`` (d3kernels.triton_backend) on the
fused kernels of d3kernels.ops, with CUDA graphs on a GPU.

Shapes: B batch rows, T tokens, R requests, M stashed states, L layers, H hidden, V vocabulary.
Cache entries are named by (layer, cache row, position), e.g. ``cache.written[j, row, pos]``;
the paged cache stores them at page slots its block table gives (``KVCache.slots``,
docs/design.md §10), and every pass writes only positions the model has reserved.
Every method gets arguments the model has already checked; none validates them again.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from d3kernels.kv_cache import KVCache
from d3kernels.sampling import RowSampling, Sampling


class Backend(ABC):
    """One way to run LlamaD3's passes (see the module doc for what the model does around them).

    Full-sequence logits without a cache (``LlamaD3.logits``, ``d3kernels.eval.masked_logits``)
    are not a backend pass: they always run the torch backend's building blocks, the reference
    path of the model's own numbers, whichever backend decodes.
    """

    @abstractmethod
    def prefill(self, ids: torch.Tensor, lengths: list[int], cache: KVCache,
                sampling: Sampling | RowSampling, start: list[int] | None, mode: str,
                rows: list[int] | None) -> torch.Tensor:
        """Full-depth pass over right-padded prompts ids [B, T] (long), row b holding lengths[b]
        real tokens. Writes their K/V at every layer into slots start[b]..start[b]+lengths[b]-1
        (start None: from 0) of cache row rows[b] (rows None: row b), attending to that row's
        history below start[b] (mode ``"mask"``: only to the entries ``cache.written`` marks;
        the model has already marked the prompt's own slots written). Returns the next token
        [B] (long) after each row's last real token, chosen by ``sampling`` (a RowSampling: row
        b's own rule)."""

    @abstractmethod
    def decode_step(self, tokens: torch.Tensor, positions: list[int], kept: tuple[int, ...],
                    cache: KVCache, sampling: Sampling, deferred: bool, mode: str,
                    mark: torch.Tensor) -> torch.Tensor:
        """One decode pass of cache rows 0..B-1 running the ascending layers ``kept``: tokens
        [B] (long), row b's newest token, at slot positions[b]. Writes ``cache.written[:, b,
        positions[b]] = mark`` (bool [L], made by the model once per layer set) and kept layers'
        K/V at those slots. Skipped layers pass the residual through; mode ``"propagate"`` and
        not ``deferred``: their K/V there come from the residual reaching them (eager backfill);
        ``deferred``: the residual entering the step's s-th skipped run goes to
        ``cache.stash[s, b, positions[b]]`` (the model has sized the stash and recorded the
        debts); ``"mask"``: nothing is written for them and attention at layer j reads
        ``cache.written[j]`` as its validity mask. Returns the next tokens [B] (long; the triton
        backend's is a buffer the next step reads and overwrites)."""

    @abstractmethod
    def decode_rows(self, tokens: list[int] | torch.Tensor, rows: list[int],
                    positions: list[int], kept: list[tuple[int, ...]], cache: KVCache,
                    sampling: Sampling | RowSampling, mode: str,
                    starts: dict[int, dict[int, list[int]]] | None,
                    marks: list[list[bool]]) -> torch.Tensor:
        """One decode pass where request r (newest token tokens[r] at slot positions[r] of cache
        row rows[r]) runs its own ascending layers kept[r]. Writes ``cache.written[j, rows[r],
        positions[r]] = marks[j][r]`` and each request's kept layers' K/V at its slot. Skipped
        layers as in :meth:`decode_step`, per request: ``starts`` None and mode
        ``"propagate"``: eager backfill; ``starts`` given (deferred: layer a -> {ordinal s: the
        indices r of the requests whose s-th skipped run starts at a}, the stash sized and the
        debts recorded by the model): the residual of request r entering that run goes to
        ``cache.stash[s, rows[r], positions[r]]``; ``"mask"``: nothing for them, attention reads
        ``cache.written``. Returns the next tokens [R] (long) in request order (the triton
        backend's is a view of a buffer the next call overwrites)."""

    @abstractmethod
    def backfill_states(self, states: torch.Tensor, layers: list[int], pos: torch.Tensor,
                        rows: torch.Tensor, cache: KVCache) -> None:
        """K/V of each of ``layers`` at (cache row rows[m], slot pos[m]) from the residual
        states [M, H] stashed there (the state entering layer j is the one entering its skipped
        run): the deferred-backfill flush of one group of layers, in one launch or one batched
        matmul. pos, rows: long or int [M] on the model's device. Writes K/V only: the model
        marks the entries written and counts the bytes."""
