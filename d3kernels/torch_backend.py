"""LlamaD3's torch backend: its passes written with torch's own primitives.

``F.scaled_dot_product_attention``, ``F.rms_norm`` and matmuls (``quant.linear`` for a
weight-only quantized projection: torch's own int4/int8 kernels where
``QuantizedWeight.prepare_torch`` found one, else the dequantized weight): the CPU path and the
eager baseline on a GPU. A decode step gathers the rows that run a layer and scatters the result
back; skipped layers' K/V come from one batched matmul per run of layers. Its building blocks
(:meth:`TorchBackend.qkv`, :meth:`~TorchBackend.finish_layer`, :meth:`~TorchBackend.head`) also
make ``LlamaD3.logits`` and ``d3kernels.eval.masked_logits`` on either backend.
"""
from __future__ import annotations

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


class TorchBackend(Backend):
    """Runs a LlamaD3's passes with torch ops; holds no weights of its own (``self.m``'s)."""

    def __init__(self, model):
        self.m = model

    # ---- building blocks ----------------------------------------------------------------------

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
        x = x + quant.linear(attn.transpose(1, 2).reshape(B, T, -1), m.w_o[j])
        gate, up = quant.linear(self._norm(x, m.mlp_norm[j]), m.w_gate_up[j]).chunk(2, -1)
        return x + quant.linear(F.silu(gate) * up, m.w_down[j])

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm + vocab projection. x [..., H] -> logits [..., V], float32 at least."""
        logits = quant.linear(self._norm(x, self.m.final_norm), self.m.lm_head)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

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
        into ``cache`` when given (with a start > 0 a cache is required). Returns the residual
        stream after the last layer, [B, T, H]. mask_mode: history entries that ``cache.written``
        marks missing (``mask`` backfill) are excluded from attention. rows: None (batch row b
        is cache row b) or a long tensor [B] of the cache row of each batch row.
        """
        if start is not None and any(start):
            return self._forward_chunk(ids, lengths, cache, start, mask_mode, rows)
        m = self.m
        B, T = ids.shape
        crows = slice(None, B) if rows is None else rows
        cos, sin = m.rope_cos[:T, None], m.rope_sin[:T, None]
        mask = None
        if min(lengths) != T:  # padded rows: causal and key < length
            idx = torch.arange(T, device=m.device)
            valid = idx[None, :] < torch.tensor(lengths, device=m.device)[:, None]
            mask = (idx[None, :, None] >= idx[None, None, :]) & valid[:, None, :]
            mask = mask[:, None]
        x = m.embed[ids]
        for j in range(m.config.num_layers):
            q, k, v = self.qkv(j, x, cos, sin)
            if cache is not None:
                cache.k[j, crows, :, :T] = k
                cache.v[j, crows, :, :T] = v
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                  enable_gqa=True)
            x = self.finish_layer(j, x, attn)
        return x

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
        crows = slice(None, B) if rows is None else rows
        real, cols = valid.nonzero(as_tuple=True)  # the real tokens: row, index in the chunk
        slots = pos[real, cols]
        real_rows = real if rows is None else rows[real]  # their cache rows
        span = max(s + n for s, n in zip(start, lengths))
        mask = (torch.arange(span, device=dev)[None, None, :] <= pos[:, :, None])[:, None]
        x = m.embed[ids]
        for j in range(m.config.num_layers):
            q, k, v = self.qkv(j, x, cos, sin)
            cache.k[j][real_rows, :, slots] = k[real, :, cols]
            cache.v[j][real_rows, :, slots] = v[real, :, cols]
            # mask mode: the chunk's own slots are marked written (prefill), history may not be
            mask_j = mask & cache.written[j, crows, None, None, :span] if mask_mode else mask
            attn = F.scaled_dot_product_attention(q, cache.k[j, crows, :, :span],
                                                  cache.v[j, crows, :, :span], attn_mask=mask_j,
                                                  enable_gqa=True)
            x = self.finish_layer(j, x, attn)
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
        return sampling(self.head(x[torch.arange(ids.shape[0], device=dev), last]))

    def decode_step(self, tokens: torch.Tensor, positions: list[int], kept: tuple[int, ...],
                    cache: KVCache, sampling: Sampling, deferred: bool, mode: str,
                    mark: torch.Tensor) -> torch.Tensor:
        """Backend.decode_step. Positions all equal (a batch of prompts of one length) index the
        cache with that slot and need no attention mask; otherwise each row gets its own
        slot and causal mask."""
        m = self.m
        B = tokens.shape[0]
        deferred = deferred and mode == "propagate"
        runs = skipped_runs(kept, m.config.num_layers) if mode == "propagate" else ()
        uniform = min(positions) == max(positions)
        if uniform:
            p = positions[0]
            cache.written[:, :B, p] = mark[:, None]
            cos, sin = m.rope_cos[p], m.rope_sin[p]
            span, mask = p + 1, None
        else:
            rows = torch.arange(B, device=m.device)
            pos = torch.tensor(positions, device=m.device)
            cache.written[:, rows, pos] = mark[:, None]
            cos, sin = m.rope_cos[pos][:, None, None], m.rope_sin[pos][:, None, None]
            span = max(positions) + 1
            mask = (torch.arange(span, device=m.device) <= pos[:, None])[:, None, None]
        x = m.embed[tokens][:, None]  # [B, 1, H]
        runs = iter(enumerate(runs))
        run = next(runs, None)

        def fill(s, run):  # s: the run's ordinal in this step, its row of the stash
            if not deferred:
                self._backfill(run, x, cos, sin, positions, cache)
            elif uniform:
                cache.stash[s, :B, p] = x[:, 0]
            else:
                cache.stash[s][rows, pos] = x[:, 0]

        for j in kept:
            while run is not None and run[1][0] < j:  # skipped layers below j see this residual
                fill(*run)
                run = next(runs, None)
            q, k, v = self.qkv(j, x, cos, sin)
            if uniform:
                cache.k[j, :B, :, p] = k[:, :, 0]
                cache.v[j, :B, :, p] = v[:, :, 0]
            else:
                cache.k[j, :B][rows, :, pos] = k[:, :, 0]
                cache.v[j, :B][rows, :, pos] = v[:, :, 0]
            # mask mode: written[j] is False past each row's position and where layer j was
            # skipped, so it is the whole mask
            mask_j = cache.written[j, :B, None, None, :span] if mode == "mask" else mask
            attn = F.scaled_dot_product_attention(q, cache.k[j, :B, :, :span],
                                                  cache.v[j, :B, :, :span], attn_mask=mask_j,
                                                  enable_gqa=True)
            x = self.finish_layer(j, x, attn)
        while run is not None:
            fill(*run)
            run = next(runs, None)
        return sampling(self.head(x[:, 0]))

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
        cache.written[:, row_t, pos] = torch.tensor(marks, device=dev)
        cos, sin = m.rope_cos[pos][:, None, None], m.rope_sin[pos][:, None, None]
        span = max(positions) + 1
        causal = (torch.arange(span, device=dev) <= pos[:, None])[:, None, None]  # [R,1,1,span]
        x = m.embed[torch.as_tensor(tokens, device=dev)][:, None]  # [R, 1, H]

        def pick(t, idx):  # rows idx of t, without a copy when idx is every row
            return t if idx is None else t[idx]

        for j in range(L):
            run = [r for r in range(R) if j in keeps[r]]
            if starts is not None:
                for s, stashed in starts.get(j, {}).items():
                    t = torch.tensor(stashed, device=dev)
                    cache.stash[s][row_t[t], pos[t]] = x[t, 0]
            elif mode == "propagate" and len(run) < R:
                skip = [r for r in range(R) if j not in keeps[r]]
                s_idx = torch.tensor(skip, device=dev)
                self._backfill((j, j + 1), x[s_idx], cos[s_idx], sin[s_idx],
                               [positions[r] for r in skip], cache, row_t[s_idx])
            if not run:
                continue
            r_idx = None if len(run) == R else torch.tensor(run, device=dev)
            crow = pick(row_t, r_idx)
            xr = pick(x, r_idx)
            q, k, v = self.qkv(j, xr, pick(cos, r_idx), pick(sin, r_idx))
            # two advanced indices split by a slice: [n, kv_heads, D]
            cache.k[j, crow, :, pick(pos, r_idx)] = k[:, :, 0]
            cache.v[j, crow, :, pick(pos, r_idx)] = v[:, :, 0]
            mask = pick(causal, r_idx)
            if mode == "mask":
                mask = mask & cache.written[j, crow, None, None, :span]
            attn = F.scaled_dot_product_attention(q, cache.k[j, crow, :, :span],
                                                  cache.v[j, crow, :, :span], attn_mask=mask,
                                                  enable_gqa=True)
            out = self.finish_layer(j, xr, attn)
            if r_idx is None:
                x = out
            else:
                x[r_idx] = out
        return sampling(self.head(x[:, 0]))

    def backfill_states(self, states: torch.Tensor, layers: list[int], pos: torch.Tensor,
                        rows: torch.Tensor, cache: KVCache) -> None:
        """Backend.backfill_states: one batched matmul over the group's layers."""
        m = self.m
        lid = torch.tensor(layers, device=m.device)
        k, v = self._kv(lid, states)
        cos, sin = m.rope_cos[pos][:, None], m.rope_sin[pos][:, None]
        # indices split by a slice: the broadcast [n, M] dims come first
        cache.k[lid[:, None], rows[None], :, pos[None]] = _rope(k, cos, sin)
        cache.v[lid[:, None], rows[None], :, pos[None]] = v

    def _backfill(self, run: tuple[int, int], x: torch.Tensor, cos, sin, positions: list[int],
                  cache: KVCache, rows: torch.Tensor | None = None) -> None:
        """Eager backfill: K/V of skipped layers [a, b) at the rows' slots, from their shared
        input x [B, 1, H]. rows: None (batch row b is cache row b, cos/sin as decode_step makes
        them) or the cache row of each batch row (cos/sin [B, 1, 1, D])."""
        a, b = run
        B = x.shape[0]
        k, v = self._kv(slice(a, b), x[:, 0])  # [n, B, kv_heads, D]
        if rows is None and min(positions) == max(positions):
            p = positions[0]
            cache.k[a:b, :B, :, p] = _rope(k, cos, sin)
            cache.v[a:b, :B, :, p] = v
        else:
            pos = torch.tensor(positions, device=self.m.device)
            rows = torch.arange(B, device=self.m.device) if rows is None else rows
            # advanced indices split by a slice put the row dim first: [B, n, kv_heads, D]
            cache.k[a:b][:, rows, :, pos] = _rope(k, cos[:, 0], sin[:, 0]).transpose(0, 1)
            cache.v[a:b][:, rows, :, pos] = v.transpose(0, 1)
