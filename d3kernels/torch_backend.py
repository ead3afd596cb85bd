"""LlamaD3's torch backend: its passes written with torch's own primitives.

``F.scaled_dot_product_attention``, ``F.rms_norm`` and matmuls (``quant.linear`` for a
weight-only quantized projection: torch's own int4/int8 kernels where
``QuantizedWeight.prepare_torch`` found one, else the dequantized weight): the CPU path and the
eager baseline on a GPU. A decode step gathers the rows that run a layer and scatters the result
back; skipped layers' K/V come from one batched matmul per run of layers. K/V live in the
cache's pages: a pass writes through the block table and gathers its rows' context per layer.
Its building blocks (:meth:`TorchBackend.qkv`, :meth:`~TorchBackend.finish_layer`,
:meth:`~TorchBackend.head`) also make ``LlamaD3.logits`` and ``d3kernels.eval.masked_logits`` on
either backend.

Under tensor parallelism (``model.tp``, d3kernels.parallel) the same passes run on the rank's
shards and its own heads; the backend adds the step's collectives: the embedding's all-reduce,
one all-reduce after O and one after down in each layer it runs, and the LM head's token
exchange (:meth:`TorchBackend.pick`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from d3kernels import quant
from d3kernels.backend import Backend
from d3kernels.kv_cache import KVCache
from d3kernels.sampling import RowSampling, Sampling
from d3kernels.schedule import skipped_runs


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class _Context(NamedTuple):
    """Where a pass's rows read their history: positions 0..span-1 of cache rows ``rows``, as
    page slots [R, span] gathered through the block table, or (``slots`` None: a static cache,
    whose rows own their pages in order) rows of a strided view of the pool, with no gather."""
    rows: torch.Tensor | slice
    span: int
    slots: torch.Tensor | None

    def pick(self, idx: torch.Tensor) -> "_Context":
        """The context of rows idx (long) of this one."""
        return _Context(self.rows[idx], self.span, None if self.slots is None else self.slots[idx])

    def read(self, cache: KVCache, t: torch.Tensor, j: int) -> torch.Tensor:
        """Layer j of t (k, v [L, P, S, ...] or written [L, P, S]) at these positions:
        [R, span, ...]."""
        if self.slots is None:
            return t[j].view(cache.batch_size, -1, *t.shape[3:])[self.rows, :self.span]
        return cache.flat(t)[j, self.slots]


class TorchBackend(Backend):
    """Runs a LlamaD3's passes with torch ops; holds no weights of its own (``self.m``'s)."""

    def __init__(self, model):
        self.m = model

    # ---- building blocks ----------------------------------------------------------------------

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        """A row-parallel product's partial sum completed over the ranks (tp=1: x itself)."""
        return x if self.m.tp is None else self.m.tp.all_reduce(x)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [*ids.shape, H] of ids (long); vocab-parallel under TP."""
        m = self.m
        return m.embed[ids] if m.tp is None else m.tp.embed(m.embed, ids)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, self.m.config.rms_norm_eps)

    def qkv(self, j: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Layer j's normed Q, K, V with RoPE. x [B, T, H] -> [B, heads, T, D] each.

        cos/sin broadcast against [B, T, heads, D]; Q and K are rotated in one op.
        """
        m, cfg = self.m, self.m.config
        B, T, _ = x.shape
        qkv = quant.linear(self._norm(x, m.attn_norm[j]), m.w_qkv[j])
        qkv = qkv.view(B, T, cfg.num_heads + 2 * cfg.num_kv_heads, cfg.head_dim)
        qk = _rope(qkv[:, :, :cfg.num_heads + cfg.num_kv_heads], cos, sin)
        q, k = qk.transpose(1, 2).split([cfg.num_heads, cfg.num_kv_heads], dim=1)
        return q, k, qkv[:, :, cfg.num_heads + cfg.num_kv_heads:].transpose(1, 2)

    def finish_layer(self, j: int, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Output projection + residual, then the SwiGLU MLP + residual. attn [B, heads, T, D]."""
        m = self.m
        B, _, T, _ = attn.shape
        x = x + self._reduce(quant.linear(attn.transpose(1, 2).reshape(B, T, -1), m.w_o[j]))
        gate, up = quant.linear(self._norm(x, m.mlp_norm[j]), m.w_gate_up[j]).chunk(2, -1)
        return x + self._reduce(quant.linear(F.silu(gate) * up, m.w_down[j]))

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm + this rank's vocab projection: x [..., H] -> logits [..., V] (under TP
        [..., V_r], the rank's vocabulary slice), float32 at least."""
        logits = quant.linear(self._norm(x, self.m.final_norm), self.m.lm_head)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm + vocab projection. x [..., H] -> logits [..., V], float32 at least
        (under TP all-gathered from the ranks' slices)."""
        logits = self._head(x)
        return logits if self.m.tp is None else self.m.tp.gather_logits(logits)

    def pick(self, sampling: Sampling | RowSampling, x: torch.Tensor) -> torch.Tensor:
        """The next token [B] (long) after hidden states x [B, H]. Under TP the same on every
        rank, and tp=1's: greedy, temperature and top-k sampling exchange a few (value, index)
        candidates per rank and row, never the logits (TensorParallel.argmax and .sample);
        top-p all-gathers the logits and every rank samples them with the same generator
        state (samplers bound with ``Sampling.on(device, tp)``), so no broadcast is needed."""
        tp = self.m.tp
        if tp is None:
            return sampling(self._head(x))
        if sampling.temperature == 0:
            return tp.argmax(self._head(x))
        return tp.sample(self._head(x), sampling)

    def _kv(self, layers: slice | torch.Tensor, states: torch.Tensor):
        """K (before RoPE) and V of ``layers`` (a slice, or a long tensor of n layers) from
        their shared input states [M, H]: one batched matmul. Returns k, v [n, M, kv_heads, D]."""
        m, cfg = self.m, self.m.config
        normed = self._norm(states, None) * m.attn_norm[layers, None, :]  # [n, M, H]
        w_kv = quant.as_float(m.w_qkv[layers, cfg.q_size:], normed.dtype)
        kv = torch.matmul(normed, w_kv.transpose(1, 2))  # [n, M, 2K]
        return kv.view(kv.shape[0], states.shape[0], 2, cfg.num_kv_heads, cfg.head_dim).unbind(2)

    # ---- passes -------------------------------------------------------------------------------

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Full-depth logits [B, T, V] (float32 at least) for ids [B, T] (long); no cache."""
        return self.head(self.forward(ids, [ids.shape[1]] * ids.shape[0], cache=None))

    def forward(self, ids: torch.Tensor, lengths: list[int], cache: KVCache | None,
                start: list[int] | None = None, mask_mode: bool = False,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """All layers over right-padded ids [B, T]; row b holds lengths[b] real tokens.

        start: None (every row begins at position 0) or the cache position of ids[b, 0] per
        row, for a chunk that extends a cache already holding positions 0..start[b]-1: the
        chunk attends to that history and causally within itself. Writes K/V of the real tokens
        into ``cache`` when given (with a start > 0 a cache is required; its pages must be
        reserved). Returns the residual stream after the last layer, [B, T, H]. mask_mode:
        history entries that ``cache.written`` marks missing (``mask`` backfill) are excluded
        from attention. rows: None (batch row b is cache row b) or a long tensor [B] of the
        cache row of each batch row.
        """
        if start is not None and any(start):
            return self._forward_chunk(ids, lengths, cache, start, mask_mode, rows)
        m = self.m
        B, T = ids.shape
        dev = m.device
        cos, sin = m.rope_cos[:T, None], m.rope_sin[:T, None]
        mask = None
        real = torch.arange(T, device=dev)[None, :] < torch.tensor(lengths, device=dev)[:, None]
        if min(lengths) != T:  # padded rows: causal and key < length
            idx = torch.arange(T, device=dev)
            mask = ((idx[None, :, None] >= idx[None, None, :]) & real[:, None, :])[:, None]
        if cache is not None:  # the real tokens' page slots: padding must not touch pages
            b_idx, cols = real.nonzero(as_tuple=True)
            slots = cache.slots(b_idx if rows is None else rows[b_idx], cols)
            kf, vf = cache.flat(cache.k), cache.flat(cache.v)
        x = self.embed(ids)
        for j in range(m.config.num_layers):
            q, k, v = self.qkv(j, x, cos, sin)
            if cache is not None:
                kf[j, slots] = k[b_idx, :, cols]
                vf[j, slots] = v[b_idx, :, cols]
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                  enable_gqa=True)
            x = self.finish_layer(j, x, attn)
        return x

    @staticmethod
    def _context(cache: KVCache, rows: torch.Tensor | slice, span: int) -> "_Context":
        """Where rows (cache rows: a long tensor [R], or a slice) read positions 0..span-1."""
        if cache.static:
            return _Context(rows, span, None)
        rows = torch.arange(cache.batch_size, device=cache.k.device)[rows] \
            if isinstance(rows, slice) else rows
        return _Context(rows, span, cache.slots(rows[:, None],
                                                torch.arange(span, device=rows.device)[None]))

    @staticmethod
    def _attend(cache: KVCache, j: int, q: torch.Tensor, ctx: "_Context",
                mask: torch.Tensor | None, mask_mode: bool) -> torch.Tensor:
        """SDPA of q [R, heads, Tq, D] against layer j's K/V at ctx's positions; in mask mode
        only the entries ``cache.written`` marks count."""
        if mask_mode:
            written = ctx.read(cache, cache.written, j)[:, None, None, :]
            mask = written if mask is None else mask & written
        return F.scaled_dot_product_attention(q, ctx.read(cache, cache.k, j).transpose(1, 2),
                                              ctx.read(cache, cache.v, j).transpose(1, 2),
                                              attn_mask=mask, enable_gqa=True)

    def _forward_chunk(self, ids: torch.Tensor, lengths: list[int], cache: KVCache,
                       start: list[int], mask_mode: bool = False,
                       rows: torch.Tensor | None = None) -> torch.Tensor:
        """forward for a chunk at positions start[b]..start[b]+lengths[b]-1 of each row, on top
        of the history already in ``cache``: K/V of the real tokens go to those slots, and each
        query attends to cache slots 0..its own position."""
        m = self.m
        B, T = ids.shape
        dev = m.device
        st = torch.tensor(start, device=dev)
        pos = st[:, None] + torch.arange(T, device=dev)  # [B, T]
        valid = torch.arange(T, device=dev)[None, :] < torch.tensor(lengths, device=dev)[:, None]
        rope_pos = pos.clamp(max=m.max_seq_len - 1)  # padded tokens may run past the table
        cos, sin = m.rope_cos[rope_pos][:, :, None], m.rope_sin[rope_pos][:, :, None]
        crows = torch.arange(B, device=dev) if rows is None else rows
        real, cols = valid.nonzero(as_tuple=True)  # the real tokens: row, index in the chunk
        slots = cache.slots(crows[real], pos[real, cols])
        span = max(s + n for s, n in zip(start, lengths))
        ctx = self._context(cache, crows, span)
        mask = (torch.arange(span, device=dev)[None, None, :] <= pos[:, :, None])[:, None]
        kf, vf = cache.flat(cache.k), cache.flat(cache.v)
        x = self.embed(ids)
        for j in range(m.config.num_layers):
            q, k, v = self.qkv(j, x, cos, sin)
            kf[j, slots] = k[real, :, cols]
            vf[j, slots] = v[real, :, cols]
            # mask mode: the chunk's own slots are marked written (prefill), history may not be
            x = self.finish_layer(j, x, self._attend(cache, j, q, ctx, mask, mask_mode))
        return x

    def prefill(self, ids: torch.Tensor, lengths: list[int], cache: KVCache,
                sampling: Sampling | RowSampling, start: list[int] | None, mode: str,
                rows: list[int] | None) -> torch.Tensor:
        """Backend.prefill: one batched :meth:`forward`, then the LM head at each row's last
        real token."""
        dev = self.m.device
        x = self.forward(ids, lengths, cache, start, mode == "mask",
                         None if rows is None else torch.tensor(rows, device=dev))
        last = torch.tensor(lengths, device=dev) - 1
        return self.pick(sampling, x[torch.arange(ids.shape[0], device=dev), last])

    def decode_step(self, tokens: torch.Tensor, positions: list[int], kept: tuple[int, ...],
                    cache: KVCache, sampling: Sampling, deferred: bool, mode: str,
                    mark: torch.Tensor) -> torch.Tensor:
        """Backend.decode_step. Positions all equal (a batch of prompts of one length) need no
        causal mask; otherwise each row gets its own."""
        m = self.m
        B = tokens.shape[0]
        dev = m.device
        deferred = deferred and mode == "propagate"
        runs = skipped_runs(kept, m.config.num_layers) if mode == "propagate" else ()
        rows = torch.arange(B, device=dev)
        pos = torch.tensor(positions, device=dev)
        slot = cache.slots(rows, pos)  # [B]: each row's page slot for this token
        cache.flat(cache.written)[:, slot] = mark[:, None]
        span = max(positions) + 1
        ctx = self._context(cache, slice(None, B), span)
        if min(positions) == max(positions):
            cos, sin = m.rope_cos[positions[0]], m.rope_sin[positions[0]]
            mask = None
        else:
            cos, sin = m.rope_cos[pos][:, None, None], m.rope_sin[pos][:, None, None]
            mask = (torch.arange(span, device=dev) <= pos[:, None])[:, None, None]
        x = self.embed(tokens)[:, None]  # [B, 1, H]
        kf, vf = cache.flat(cache.k), cache.flat(cache.v)
        runs = iter(enumerate(runs))
        run = next(runs, None)

        def fill(s, run):  # s: the run's ordinal in this step, its row of the stash
            if deferred:
                cache.flat(cache.stash)[s, slot] = x[:, 0]
            else:
                self._backfill(run, x, cos, sin, slot, cache)

        for j in kept:
            while run is not None and run[1][0] < j:  # skipped layers below j see this residual
                fill(*run)
                run = next(runs, None)
            q, k, v = self.qkv(j, x, cos, sin)
            kf[j, slot] = k[:, :, 0]
            vf[j, slot] = v[:, :, 0]
            # mask mode: written[j] is False where layer j was skipped
            x = self.finish_layer(j, x, self._attend(cache, j, q, ctx, mask, mode == "mask"))
        while run is not None:
            fill(*run)
            run = next(runs, None)
        return self.pick(sampling, x[:, 0])

    def decode_rows(self, tokens: list[int] | torch.Tensor, rows: list[int],
                    positions: list[int], kept: list[tuple[int, ...]], cache: KVCache,
                    sampling: Sampling | RowSampling, mode: str,
                    starts: dict[int, dict[int, list[int]]] | None,
                    marks: list[list[bool]]) -> torch.Tensor:
        """Backend.decode_rows: layer j gathers the rows that keep it, runs them as one batch
        and scatters their residual back; the rows that skip it keep theirs."""
        m, dev, L = self.m, self.m.device, self.m.config.num_layers
        R = len(rows)
        keeps = [frozenset(k) for k in kept]
        row_t, pos = torch.tensor(rows, device=dev), torch.tensor(positions, device=dev)
        slot = cache.slots(row_t, pos)
        cache.flat(cache.written)[:, slot] = torch.tensor(marks, device=dev)
        cos, sin = m.rope_cos[pos][:, None, None], m.rope_sin[pos][:, None, None]
        span = max(positions) + 1
        ctx = self._context(cache, row_t, span)
        causal = (torch.arange(span, device=dev) <= pos[:, None])[:, None, None]  # [R,1,1,span]
        x = self.embed(torch.as_tensor(tokens, device=dev))[:, None]  # [R, 1, H]
        kf, vf = cache.flat(cache.k), cache.flat(cache.v)

        def pick(t, idx):  # rows idx of t, without a copy when idx is every row
            return t if idx is None else t[idx]

        for j in range(L):
            run = [r for r in range(R) if j in keeps[r]]
            if starts is not None:
                for s, stashed in starts.get(j, {}).items():
                    t = torch.tensor(stashed, device=dev)
                    cache.flat(cache.stash)[s, slot[t]] = x[t, 0]
            elif mode == "propagate" and len(run) < R:
                s_idx = torch.tensor([r for r in range(R) if j not in keeps[r]], device=dev)
                self._backfill((j, j + 1), x[s_idx], cos[s_idx], sin[s_idx], slot[s_idx], cache)
            if not run:
                continue
            r_idx = None if len(run) == R else torch.tensor(run, device=dev)
            xr = pick(x, r_idx)
            q, k, v = self.qkv(j, xr, pick(cos, r_idx), pick(sin, r_idx))
            kf[j, pick(slot, r_idx)] = k[:, :, 0]
            vf[j, pick(slot, r_idx)] = v[:, :, 0]
            attn = self._attend(cache, j, q, ctx if r_idx is None else ctx.pick(r_idx),
                                pick(causal, r_idx),
                                mode == "mask")
            out = self.finish_layer(j, xr, attn)
            if r_idx is None:
                x = out
            else:
                x[r_idx] = out
        return self.pick(sampling, x[:, 0])

    def backfill_states(self, states: torch.Tensor, layers: list[int], pos: torch.Tensor,
                        rows: torch.Tensor, cache: KVCache) -> None:
        """Backend.backfill_states: one batched matmul over the group's layers."""
        m = self.m
        lid = torch.tensor(layers, device=m.device)
        k, v = self._kv(lid, states)
        cos, sin = m.rope_cos[pos][:, None], m.rope_sin[pos][:, None]
        slots = cache.slots(rows, pos)
        cache.flat(cache.k)[lid[:, None], slots[None]] = _rope(k, cos, sin)
        cache.flat(cache.v)[lid[:, None], slots[None]] = v

    def _backfill(self, run: tuple[int, int], x: torch.Tensor, cos, sin,
                  slots: torch.Tensor, cache: KVCache) -> None:
        """Eager backfill: K/V of skipped layers [a, b) at page slots ``slots`` [B] from their
        shared input x [B, 1, H]; cos/sin [D] (one position) or [B, 1, 1, D]."""
        a, b = run
        k, v = self._kv(slice(a, b), x[:, 0])  # [n, B, kv_heads, D]
        if cos.dim() > 1:
            cos, sin = cos[:, 0], sin[:, 0]  # [B, 1, D] against [n, B, kv_heads, D]
        cache.flat(cache.k)[a:b, slots] = _rope(k, cos, sin)
        cache.flat(cache.v)[a:b, slots] = v
