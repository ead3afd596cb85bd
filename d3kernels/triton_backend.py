"""LlamaD3's triton backend: prefill and decode steps on the fused kernels of d3kernels.ops.

A decode layer is five launches: RMSNorm, QKV+RoPE+cache write, split-KV attention, O projection
with the residual add, RMSNorm, gate/up with silu·mul, down with the residual add (the residual
is updated in place). Skipped layers cost one ``kv_backfill`` launch per run of consecutive
skipped layers (``propagate``/eager), or one stash copy per run when the backfill is deferred
(into ``KVCache.stash[s]`` for the step's s-th run; ``LlamaD3.flush_backfill`` later fills
many runs' stashed states in one ``kv_backfill`` launch per group of layers); the LM head
picks the token without writing logits. In ``mask`` mode skipped layers cost nothing and
attention at layer j reads ``cache.written[j]`` as its validity mask. On a GPU each distinct
(batch, layer set, mode) decode step is captured once as a CUDA graph and replayed after that.

Continuous batching (``decode_rows``, ``prefill(rows=...)``) works in the cache-row layout: the
residual has one row per cache row, and each layer kernel gets, through ``rows=``, the cache rows
that run it, so nothing is gathered or scattered between layers (design.md §4.3).
"""
from __future__ import annotations

import torch

from d3kernels.kv_cache import KVCache
from d3kernels.ops.attention import attention_decode, attention_decode_splits, attention_prefill
from d3kernels.ops.kv_backfill import kv_backfill
from d3kernels.ops.lm_head import lm_head
from d3kernels.ops.qkv_rope import qkv_rope
from d3kernels.ops.rms_norm import rms_norm
from d3kernels.ops.swiglu import down_residual, swiglu_gate_up
from d3kernels.sampling import RowSampling, Sampling
from d3kernels.schedule import skipped_runs

MAX_FUSED_TOP_K = 64  # lm_head samples among at most this many candidates per row
# decode_rows' row-index tensors are cached by row tuple; in a long-running engine the tuples
# keep changing, so the cache is dropped when it grows past this (no graph holds them)
MAX_ROW_SETS = 4096


class TritonBackend:
    """Runs a LlamaD3's passes on Triton kernels; holds no weights of its own."""

    def __init__(self, model, cuda_graphs: bool):
        self.m = model
        self.cuda_graphs = cuda_graphs and model.device.type == "cuda"
        self._layer_ids: dict[tuple[int, int], torch.Tensor] = {}
        self._row_ids: dict[int, torch.Tensor] = {}
        self._row_sets: dict[tuple[int, ...], torch.Tensor] = {}
        self._graphs: dict[tuple, tuple] = {}
        self._graph_cache: KVCache | None = None
        self._graph_stash: torch.Tensor | None = None
        self._pool = None
        self._positions: list[int] | None = None
        self._pos: torch.Tensor | None = None

    # ---- helpers ------------------------------------------------------------------------------

    def _layers(self, run: tuple[int, int]) -> torch.Tensor:
        """int32 device tensor of the layers [a, b), made once per run."""
        if run not in self._layer_ids:
            self._layer_ids[run] = torch.arange(*run, dtype=torch.int32, device=self.m.device)
        return self._layer_ids[run]

    def _rows(self, batch: int) -> torch.Tensor:
        """int32 device tensor 0..batch-1 (backfill's cache rows), made once per batch size."""
        if batch not in self._row_ids:
            self._row_ids[batch] = torch.arange(batch, dtype=torch.int32, device=self.m.device)
        return self._row_ids[batch]

    def _row_set(self, rows: tuple[int, ...]) -> torch.Tensor:
        """int32 device tensor of these cache rows (decode_rows' ``rows=``), made once per tuple
        so steady decoding does not copy row sets to the device at every step."""
        t = self._row_sets.get(rows)
        if t is None:
            if len(self._row_sets) >= MAX_ROW_SETS:
                self._row_sets.clear()
            t = self._row_sets[rows] = torch.tensor(rows, dtype=torch.int32, device=self.m.device)
        return t

    def _attention_and_mlp(self, j: int, residual: torch.Tensor, attn: torch.Tensor,
                           rows: torch.Tensor | None = None) -> None:
        """O projection + residual, then the SwiGLU MLP + residual; residual [M, H] in place.
        attn [M, Q]; rows: None (all M rows) or int32 [R]: only those rows are read and
        updated."""
        m = self.m
        down_residual(attn, m.w_o[j], residual, rows=rows)
        h, _ = rms_norm(residual, m.mlp_norm[j], m.config.rms_norm_eps, rows=rows)
        down_residual(swiglu_gate_up(h, m.w_gate_up[j], rows=rows), m.w_down[j], residual,
                      rows=rows)

    @staticmethod
    def _fused(sampling: Sampling) -> bool:
        """Whether the LM head kernel can make the choice itself (greedy, temperature, top-k)."""
        return sampling.top_p is None and (sampling.top_k is None
                                           or sampling.top_k <= MAX_FUSED_TOP_K)

    def _pick(self, x: torch.Tensor, sampling: Sampling | RowSampling, seed=None, offset=0,
              rows: torch.Tensor | None = None) -> torch.Tensor:
        """Next tokens (long) from last hidden states x [M, H]: [M], or [R] for ``rows``
        (int32 [R] rows of x, in the order of the result; the other rows are not read).

        The LM head kernel makes the choice itself (final norm + vocab projection + argmax or
        Gumbel-max in one pass) when one rule covers every row: greedy, or a Sampling with a
        temperature and top-k <= MAX_FUSED_TOP_K. Otherwise (nucleus, wide top-k, a sampling
        RowSampling, whose requests each have their own rule and generator) the kernel writes
        fp32 logits and ``sampling(logits)`` chooses with torch. seed, offset: the Philox seed
        and noise offset of a fused draw (ints, or device tensors inside a CUDA graph).
        """
        m = self.m
        per_row = isinstance(sampling, RowSampling)
        if not (sampling.temperature == 0 if per_row else self._fused(sampling)):
            logits = torch.empty(x.shape[0], m.config.vocab_size, device=x.device)
            lm_head(x, m.final_norm, m.lm_head, m.config.rms_norm_eps, rows=rows,
                    logits_out=logits)
            return sampling(logits if rows is None else logits.index_select(0, rows))
        tokens = lm_head(x, m.final_norm, m.lm_head, m.config.rms_norm_eps,
                         temperature=sampling.temperature,
                         top_k=None if per_row else sampling.top_k, seed=seed, offset=offset,
                         rows=rows)
        return tokens if rows is None else tokens.index_select(0, rows)

    def _next_offset(self, sampling: Sampling, rows: int) -> int:
        """Noise offset for this draw; each draw consumes rows * vocab counters."""
        offset = sampling.draws
        if sampling.temperature > 0:
            sampling.draws += rows * self.m.config.vocab_size
        return offset

    # ---- passes -------------------------------------------------------------------------------

    def prefill(self, ids: torch.Tensor, lengths: list[int], cache: KVCache,
                sampling: Sampling | RowSampling, start: list[int] | None = None,
                mode: str = "propagate", rows: list[int] | None = None) -> torch.Tensor:
        """Full-depth pass over right-padded ids [B, T] (long); fills cache slots start[b]..
        start[b]+T-1 (start None: 0), attending to the history already cached before them
        (mode ``"mask"``: only to the entries ``cache.written`` marks). Returns the next token
        [B] (long) after each row's last real token.

        rows: None (batch row b is cache row b: one batched pass) or the cache row of each
        batch row (the engine's admissions). Then each prompt runs as its own batch of one on
        the views ``cache.k[j, r:r+1]``: no cache-row-layout copy of the prompts, no padding,
        and each request's token is chosen exactly as ``generate`` would choose it alone (its
        own Sampling, batch row 0, its own noise offset; ``sampling`` a RowSampling gives
        each request its own). Prefill is compute-bound at realistic prompt lengths, so the
        extra weight reads of one pass per prompt cost little.
        """
        if rows is not None:
            samplings = (sampling.samplings if isinstance(sampling, RowSampling)
                         else [sampling] * len(rows))
            return torch.cat([
                self._prefill(ids[b:b + 1, :lengths[b]], lengths[b:b + 1], cache, samplings[b],
                              None if start is None else start[b:b + 1], mode, row)
                for b, row in enumerate(rows)])
        return self._prefill(ids, lengths, cache, sampling, start, mode)

    def _prefill(self, ids: torch.Tensor, lengths: list[int], cache: KVCache,
                 sampling: Sampling | RowSampling, start: list[int] | None, mode: str,
                 row0: int = 0) -> torch.Tensor:
        """prefill of ids [B, T] into the contiguous cache rows row0..row0+B-1."""
        m, cfg = self.m, self.m.config
        B, T = ids.shape
        rows = slice(row0, row0 + B)
        start = torch.tensor([0] * B if start is None else start, dtype=torch.int32,
                             device=m.device)
        lens = torch.tensor(lengths, dtype=torch.int32, device=m.device)
        residual = m.embed[ids.reshape(-1)]  # [B*T, H], updated in place layer by layer
        for j in range(cfg.num_layers):
            k_cache, v_cache = cache.k[j, rows], cache.v[j, rows]
            h, _ = rms_norm(residual, m.attn_norm[j], cfg.rms_norm_eps)
            q = qkv_rope(h.view(B, T, -1), m.w_qkv[j], m.rope_cos, m.rope_sin, start, k_cache,
                         v_cache, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads)
            valid = cache.written[j, rows] if mode == "mask" else None
            attn = attention_prefill(q, k_cache, v_cache, start, lens, valid=valid)
            self._attention_and_mlp(j, residual, attn.view(B * T, cfg.q_size))
        last = residual.view(B, T, -1)[torch.arange(B, device=m.device), lens.long() - 1]
        if isinstance(sampling, RowSampling):
            return self._pick(last, sampling)
        return self._pick(last, sampling, sampling.seed, self._next_offset(sampling, B))

    def backfill_states(self, states: torch.Tensor, layers: list[int], pos: torch.Tensor,
                        rows: torch.Tensor, cache: KVCache) -> None:
        """K/V of ``layers`` at (rows[m], pos[m]) from residual states [M, H]: one launch."""
        m, cfg = self.m, self.m.config
        layer_ids = torch.tensor(layers, dtype=torch.int32, device=m.device)
        kv_backfill(states.contiguous(), layer_ids, m.attn_norm, m.w_qkv, m.rope_cos,
                    m.rope_sin, pos.to(torch.int32), rows.to(torch.int32), cache.k, cache.v,
                    q_size=cfg.q_size, eps=cfg.rms_norm_eps)

    def _decode(self, tokens: torch.Tensor, pos: torch.Tensor, kept: tuple[int, ...],
                cache: KVCache, sampling: Sampling, seed, offset,
                deferred: bool = False, mask: bool = False) -> torch.Tensor:
        """The decode step's launches. tokens [B] long, pos int32 [B] slot of each token.
        deferred: stash the residual at each skipped run's start instead of backfilling.
        mask: no backfill; attention at layer j ignores entries ``cache.written[j]`` marks
        missing (the caller has marked this step's kept layers written)."""
        m, cfg = self.m, self.m.config
        B = tokens.shape[0]
        context = pos + 1
        residual = m.embed[tokens]  # [B, H]
        runs = iter(enumerate(() if mask else skipped_runs(kept, cfg.num_layers)))
        run = next(runs, None)
        rows = self._rows(B) if run is not None else None

        def backfill(s, run):  # s: the run's ordinal in this step
            if deferred:  # a copy: the residual is updated in place afterwards
                cache.stash[s, :B].index_put_((rows.long(), pos.long()), residual)
                return
            kv_backfill(residual, self._layers(run), m.attn_norm, m.w_qkv, m.rope_cos,
                        m.rope_sin, pos, rows, cache.k[:, :B], cache.v[:, :B],
                        q_size=cfg.q_size, eps=cfg.rms_norm_eps)

        for j in kept:
            while run is not None and run[1][0] < j:  # skipped layers below j see this residual
                backfill(*run)
                run = next(runs, None)
            k_cache, v_cache = cache.k[j, :B], cache.v[j, :B]
            h, _ = rms_norm(residual, m.attn_norm[j], cfg.rms_norm_eps)
            q = qkv_rope(h[:, None], m.w_qkv[j], m.rope_cos, m.rope_sin, pos, k_cache, v_cache,
                         num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads)
            valid = cache.written[j, :B] if mask else None
            attn = attention_decode(q[:, 0], k_cache, v_cache, context, valid=valid)
            self._attention_and_mlp(j, residual, attn.view(B, cfg.q_size))
        while run is not None:
            backfill(*run)
            run = next(runs, None)
        return self._pick(residual, sampling, seed, offset)

    def _positions_on_device(self, positions: list[int]) -> torch.Tensor:
        """Device int32 [B] positions; a step that follows the last advances it in place, so
        steady decoding copies nothing from the host (the same positions again, as when
        LlamaD3.decode_step marks the cache first, return the same tensor)."""
        if self._positions == list(positions):
            return self._pos
        if self._pos is not None and self._positions is not None \
                and len(positions) == len(self._positions) \
                and all(p == q + 1 for p, q in zip(positions, self._positions)):
            self._pos += 1
        else:
            self._pos = torch.tensor(positions, dtype=torch.int32, device=self.m.device)
        self._positions = list(positions)
        return self._pos

    def decode_step(self, tokens: torch.Tensor, positions: list[int], kept: tuple[int, ...],
                    cache: KVCache, sampling: Sampling, deferred: bool = False,
                    mode: str = "propagate") -> torch.Tensor:
        """mode ``"mask"``: skipped layers are not backfilled (``deferred`` is ignored) and
        attention reads ``cache.written`` as its validity mask. Deferred: the caller has sized
        ``cache.stash`` for this step's skipped runs (``KVCache.get_stash``)."""
        mask = mode == "mask"
        deferred = deferred and not mask
        pos = self._positions_on_device(positions)
        if self.cuda_graphs and self._fused(sampling):
            return self._replay(tokens, pos, kept, cache, sampling, deferred, mask)
        return self._decode(tokens, pos, kept, cache, sampling, sampling.seed,
                            self._next_offset(sampling, tokens.shape[0]), deferred, mask)

    def decode_rows(self, tokens: torch.Tensor, rows: list[int], positions: list[int],
                    kept: list[tuple[int, ...]], cache: KVCache,
                    sampling: Sampling | RowSampling, mode: str = "propagate",
                    starts: dict[int, dict[int, list[int]]] | None = None) -> torch.Tensor:
        """One decode pass where request r (cache row rows[r], newest token tokens[r] at slot
        positions[r]) runs its own ascending layer set kept[r]; returns the next tokens [R]
        (long), in request order. The caller (``LlamaD3.decode_rows``) has checked the
        arguments and marked ``cache.written``.

        Cache-row layout: the residual is [cache.batch_size, H] with each request's embedding
        at its cache row (one scatter of R rows), positions int32 [cache.batch_size]. Layer j
        runs its kernels with ``rows=`` the cache rows that keep j (index tensors cached per
        row tuple), reading and writing ``cache.k[j]``/``cache.v[j]`` in place; a layer no row
        keeps launches nothing. ``propagate``: the rows that skip a run of consecutive layers
        (the same rows skipping each) get those layers' K/V from one ``kv_backfill`` launch
        over their residual rows (a small index_select: kv_backfill takes states [M, H]).
        Deferred ``propagate`` (``starts`` given: layer a -> {ordinal s: the indices r of the
        requests whose s-th skipped run starts at a}, made by the caller with the stash sized
        and the debts recorded): at layer a those rows' residual is copied to
        ``cache.stash[s]`` at their slots instead. ``mask``: skipped layers write nothing and
        attention reads ``cache.written[j]``.

        Tokens: one fused greedy LM head over the running rows when every request is greedy
        (or one fused draw for a plain sampling Sampling); a RowSampling with sampling
        requests gets fp32 logits from one LM head pass and each request draws with torch
        from its own generator (see README, Continuous batching, for what that means for
        reproducibility). No CUDA graphs here: the row sets change at every step.
        """
        m, cfg = self.m, self.m.config
        L, n_rows = cfg.num_layers, cache.batch_size
        keeps = [frozenset(k) for k in kept]
        pos_host = [0] * n_rows  # rows not running are never read: any position will do
        for r, p in zip(rows, positions):
            pos_host[r] = p
        pos = torch.tensor(pos_host, dtype=torch.int32, device=m.device)
        context = pos + 1
        running = self._row_set(tuple(rows))
        residual = torch.empty(n_rows, cfg.hidden_size, dtype=m.dtype, device=m.device)
        residual.index_copy_(0, running.long(), m.embed[tokens])
        # per layer, the cache rows that run it and (propagate) those that skip it
        run_sets = [tuple(r for r, k in zip(rows, keeps) if j in k) for j in range(L)]
        skip_sets = [tuple(r for r, k in zip(rows, keeps) if j not in k) for j in range(L)]
        # from the cache's shape only: a row's split boundaries (and so its rounding) must not
        # depend on how many requests run beside it
        splits = attention_decode_splits(n_rows, cfg.num_kv_heads, cache.seq_len, m.device)
        for j in range(L):
            skip = skip_sets[j]
            if starts is not None:
                for s, stashed in starts.get(j, {}).items():
                    idx = self._row_set(tuple(rows[r] for r in stashed))
                    cache.stash[s].index_put_((idx.long(), pos.index_select(0, idx).long()),
                                              residual.index_select(0, idx))
            elif mode == "propagate" and skip and (j == 0 or skip_sets[j - 1] != skip):
                # these rows' residual stays as it is through the run: fill it all now
                b = j + 1
                while b < L and skip_sets[b] == skip:
                    b += 1
                idx = self._row_set(skip)
                kv_backfill(residual.index_select(0, idx), self._layers((j, b)), m.attn_norm,
                            m.w_qkv, m.rope_cos, m.rope_sin, pos.index_select(0, idx), idx,
                            cache.k, cache.v, q_size=cfg.q_size, eps=cfg.rms_norm_eps)
            if not run_sets[j]:
                continue
            idx = self._row_set(run_sets[j])
            h, _ = rms_norm(residual, m.attn_norm[j], cfg.rms_norm_eps, rows=idx)
            q = qkv_rope(h[:, None], m.w_qkv[j], m.rope_cos, m.rope_sin, pos, cache.k[j],
                         cache.v[j], num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                         rows=idx)
            valid = cache.written[j] if mode == "mask" else None
            attn = attention_decode(q[:, 0], cache.k[j], cache.v[j], context, rows=idx,
                                    valid=valid, num_splits=splits)
            self._attention_and_mlp(j, residual, attn.view(n_rows, cfg.q_size), idx)
        if isinstance(sampling, RowSampling):
            return self._pick(residual, sampling, rows=running)
        return self._pick(residual, sampling, sampling.seed,
                          self._next_offset(sampling, n_rows), rows=running)

    # ---- CUDA graphs --------------------------------------------------------------------------

    def _replay(self, tokens, pos, kept, cache, sampling, deferred=False,
                mask=False) -> torch.Tensor:
        """Replay (capturing on first use) the graph of this batch size, layer set and mode."""
        # graphs hold the cache's addresses, the stash's too (it is replaced when it grows)
        if cache is not self._graph_cache or cache.stash is not self._graph_stash:
            self._graphs.clear()
            self._graph_cache, self._graph_stash = cache, cache.stash
        greedy = sampling.temperature == 0
        key = (tokens.shape[0], kept, greedy, sampling.top_k,
               None if greedy else sampling.temperature, deferred, mask)
        if key not in self._graphs:
            self._graphs[key] = self._capture(tokens, pos, kept, cache, sampling, deferred, mask)
        graph, tok_in, pos_in, seed_in, offset_in, tok_out = self._graphs[key]
        tok_in.copy_(tokens)
        pos_in.copy_(pos)
        if not greedy:
            seed_in.fill_(sampling.seed if sampling.seed is not None
                          else int(torch.randint(2**31 - 1, (1,))))
            offset_in.fill_(self._next_offset(sampling, tokens.shape[0]))
        graph.replay()
        return tok_out.clone()

    def _capture(self, tokens, pos, kept, cache, sampling, deferred=False, mask=False):
        tok_in, pos_in = tokens.clone(), pos.clone()
        # The captured step reads seed and offset from device tensors, so replays draw anew.
        seed_in = torch.zeros(1, dtype=torch.int64, device=tokens.device)
        offset_in = torch.zeros(1, dtype=torch.int64, device=tokens.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # compile and autotune outside the capture
            self._decode(tok_in, pos_in, kept, cache, sampling, seed_in, offset_in, deferred,
                         mask)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            tok_out = self._decode(tok_in, pos_in, kept, cache, sampling, seed_in, offset_in,
                                   deferred, mask)
        return graph, tok_in, pos_in, seed_in, offset_in, tok_out
