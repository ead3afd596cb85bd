"""LlamaD3's triton backend: its passes (d3kernels.backend.Backend) on the fused kernels of
d3kernels.ops; d3kernels.torch_backend runs the same passes with torch's own ops.

A decode step is ``decode_embed`` (embedding, context lengths, the step's ``written`` marks),
five launches per kept layer — QKV+RoPE+cache write with the input RMSNorm in its prologue,
single-launch split-KV attention, O projection + residual, gate/up with the MLP RMSNorm in its
prologue, down + residual (the residual is updated in place) — and the LM head (two launches;
its selection also advances the positions), into buffers made once per batch size. Skipped
layers cost nothing more by default (deferred ``propagate``: the down projection of the kept
layer below a skipped run also copies its output to ``KVCache.stash[s]`` for the step's s-th
run; ``LlamaD3.flush_backfill`` later fills many runs' stashed states in one ``kv_backfill``
launch per group of layers); eager ``propagate`` costs one ``kv_backfill`` launch per skipped
run. In ``mask`` mode attention at layer j reads ``cache.written[j]`` as its validity mask. On
a GPU each distinct (batch, layer set, mode) decode step is captured once as a CUDA graph and
replayed after that.

Continuous batching (``decode_rows``, ``prefill(rows=...)``) works in the cache-row layout: the
residual has one row per cache row, and each layer kernel gets, through ``rows=``, the cache rows
that run it, so nothing is gathered or scattered between layers (design.md §4.3).
"""
from __future__ import annotations

import torch

from dataclasses import dataclass, field

from d3kernels.backend import Backend
from d3kernels.kv_cache import KVCache
from d3kernels.ops.attention import (DecodeWorkspace, attention_decode, attention_decode_splits,
                                     attention_decode_workspace, attention_prefill)
from d3kernels.ops.decode_embed import decode_embed
from d3kernels.ops.kv_backfill import kv_backfill
from d3kernels.ops.lm_head import lm_head, lm_head_candidates, lm_head_scratch, lm_head_select
from d3kernels.ops.qkv_rope import qkv_rope
from d3kernels.ops.swiglu import down_residual, swiglu_gate_up
from d3kernels.sampling import RowSampling, Sampling
from d3kernels.schedule import skipped_runs

MAX_FUSED_TOP_K = 64  # lm_head samples among at most this many candidates per row
# decode_rows' row-index tensors are cached by row tuple; in a long-running engine the tuples
# keep changing, so the cache is dropped when it grows past this (no graph holds them)
MAX_ROW_SETS = 4096


@dataclass
class _StepBuffers:
    """Working memory of the decode steps of one batch size on one cache, allocated once: a step
    allocates nothing, and its CUDA graphs hold these addresses.

    tokens: int64 [B], the step's input and, once the LM head has run, its output (the next
    step's input); pos: int32 [B], each row's slot, advanced by one by the LM head;
    host_pos: what the host knows pos holds (None: unknown); the others are scratch.
    """

    tokens: torch.Tensor
    pos: torch.Tensor
    context: torch.Tensor
    residual: torch.Tensor
    q: torch.Tensor
    attn: torch.Tensor
    mlp: torch.Tensor
    workspace: DecodeWorkspace
    picked: torch.Tensor  # int64 [B]: decode_rows' tokens in request order
    # decode_rows' int32 [2L + 2, B] tables, uploaded in one copy per step: row 0 holds pos,
    # 1 + j the cache rows running layer j, L + 1 + j the stash ordinal each row's layer-j
    # output goes to, 2L + 1 the running rows (all padded with -1); None for decode_step
    table: torch.Tensor | None = None
    marks: torch.Tensor | None = None  # decode_rows' bool [L, B]: the step's written marks
    scratch: dict[int, torch.Tensor] = field(default_factory=dict)  # lm_head's, by top_k
    host_pos: list[int] | None = None


class TritonBackend(Backend):
    """Runs a LlamaD3's passes on Triton kernels; holds no weights of its own (``self.m``'s)."""

    def __init__(self, model, cuda_graphs: bool):
        self.m = model
        # under TP a step's collectives run between the launches: no graphs (design.md §11)
        self.cuda_graphs = cuda_graphs and model.device.type == "cuda" and model.tp is None
        self._layer_ids: dict[tuple[int, int], torch.Tensor] = {}
        self._row_ids: dict[int, torch.Tensor] = {}
        self._row_sets: dict[tuple[int, ...], torch.Tensor] = {}
        self._fills: dict[tuple[int, int], torch.Tensor] = {}
        self._graphs: dict[tuple, tuple] = {}
        self._graph_cache: KVCache | None = None
        self._graph_stash: torch.Tensor | None = None
        self._pool = None
        self._buffers: dict[tuple[str, int], _StepBuffers] = {}
        # the first id of this rank's embedding rows (0 without tensor parallelism)
        self._vocab_start = 0 if model.tp is None else model.tp.vocab_range[0]

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

    def _fill(self, batch: int, value: int) -> torch.Tensor:
        """int32 device tensor [batch] of ``value`` (a stash ordinal), made once per pair."""
        key = (batch, value)
        if key not in self._fills:
            self._fills[key] = torch.full((batch,), value, dtype=torch.int32,
                                          device=self.m.device)
        return self._fills[key]

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
                           rows: torch.Tensor | None = None,
                           mlp_out: torch.Tensor | None = None) -> None:
        """O projection + residual, then the SwiGLU MLP (its norm in the gate/up prologue) +
        residual; residual [M, H] in place. attn [M, Q]; rows: None (all M rows) or int32 [R]:
        only those rows are read and updated; mlp_out: optional [M, I] gate/up buffer."""
        m = self.m
        self._down_residual(attn, m.w_o[j], residual, rows=rows)
        self._down_residual(swiglu_gate_up(residual, m.w_gate_up[j], rows=rows, out=mlp_out,
                                           norm_weight=m.mlp_norm[j], eps=m.config.rms_norm_eps),
                            m.w_down[j], residual, rows=rows)

    # ---- tensor parallelism: a step's collectives (design.md §11) ---------------------------

    def _summed(self, residual: torch.Tensor, launch) -> None:
        """Run ``launch``, which writes or adds this rank's partial sum into ``residual``, and
        complete the sum over the ranks (tp=1: just launch). Rank 0 carries the residual; the
        others zero it first, so a row the launch does not touch keeps rank 0's value and the
        all-reduce of the whole buffer adds only the partials."""
        tp = self.m.tp
        if tp is not None and tp.rank:
            residual.zero_()
        launch()
        if tp is not None:
            tp.all_reduce(residual)

    def _down_residual(self, h: torch.Tensor, w, residual: torch.Tensor, *,
                       rows: torch.Tensor | None = None, cache: KVCache | None = None,
                       stash_index: torch.Tensor | None = None, positions=None,
                       block_table=None) -> None:
        """``down_residual`` of a row-parallel projection (O or down), with the deferred stash
        copy when ``cache`` is given (stash_index, positions, block_table: down_residual's;
        residual row b is cache row b). Under TP each rank adds its partial product, one
        all-reduce completes the residual, and the stash copy is made after it, from the
        completed residual, with torch (:meth:`_stash_rows`)."""
        stash = None if cache is None else cache.stash
        if self.m.tp is None:
            down_residual(h, w, residual, rows=rows, stash=stash, stash_index=stash_index,
                          positions=positions, block_table=block_table)
            return
        self._summed(residual, lambda: down_residual(h, w, residual, rows=rows))
        if stash is not None:
            self._stash_rows(cache, residual, rows, stash_index, positions)

    @staticmethod
    def _stash_rows(cache: KVCache, residual: torch.Tensor, rows: torch.Tensor | None,
                    stash_index: torch.Tensor, positions: torch.Tensor) -> None:
        """down_residual's stash copy with torch: residual row b (cache row b) to stash run
        stash_index[b] at its slot positions[b], for the rows (None: all; -1 entries skipped)
        whose stash_index is >= 0. The pass has reserved those slots' pages."""
        b = torch.arange(residual.shape[0], device=residual.device) if rows is None \
            else rows.long()
        b = b[b >= 0]
        b = b[stash_index[b] >= 0]
        cache.flat(cache.stash)[stash_index[b].long(), cache.slots(b, positions[b].long())] = \
            residual[b]

    @staticmethod
    def _fused(sampling: Sampling) -> bool:
        """Whether the LM head kernel can make the choice itself (greedy, temperature, top-k)."""
        return sampling.top_p is None and (sampling.top_k is None
                                           or sampling.top_k <= MAX_FUSED_TOP_K)

    def _pick(self, x: torch.Tensor, sampling: Sampling | RowSampling, seed=None, offset=0,
              rows: torch.Tensor | None = None, **buffers) -> torch.Tensor:
        """Next tokens (long) from last hidden states x [M, H], for ``rows`` (None: all; or
        int32 [R] rows of x, the other rows not read): the fused choice returns [M] with the
        rows' entries written (``rows`` may hold -1 padding), the torch one [R] in rows' order.

        The LM head kernel makes the choice itself (final norm + vocab projection + argmax or
        Gumbel-max in one pass) when one rule covers every row: greedy, or a Sampling with a
        temperature and top-k <= MAX_FUSED_TOP_K. Otherwise (nucleus, wide top-k, a sampling
        RowSampling, whose requests each have their own rule and generator) the kernel writes
        fp32 logits and ``sampling(logits)`` chooses with torch. seed, offset: the Philox seed
        and noise offset of a fused draw (ints, or device tensors inside a CUDA graph).
        buffers: ``lm_head``'s tokens_out, scratch and positions (a decode step's).

        Under TP the rank's head holds the vocab slice ``tp.vocab_range``: a fused choice writes
        each row's candidate keys (one, or its top-k; global indices and noise), one all-gather
        exchanges them and ``lm_head_select`` picks the same token on every rank, the one tp=1
        picks (an unseeded draw first takes rank 0's seed). A torch choice goes through
        ``TensorParallel.sample`` on the rank's logits (candidates too, except for top-p).
        """
        m, tp = self.m, self.m.tp
        per_row = isinstance(sampling, RowSampling)
        V = m.config.vocab_size
        if not (sampling.temperature == 0 if per_row else self._fused(sampling)):
            logits = torch.empty(x.shape[0], m.lm_head.shape[0], device=x.device)
            lm_head(x, m.final_norm, m.lm_head, m.config.rms_norm_eps, rows=rows,
                    logits_out=logits, **buffers)
            logits = logits if rows is None else logits.index_select(0, rows)
            return sampling(logits) if tp is None else tp.sample(logits, sampling)
        choice = dict(temperature=sampling.temperature, offset=offset,
                      top_k=None if per_row else sampling.top_k)
        if tp is None:
            return lm_head(x, m.final_norm, m.lm_head, m.config.rms_norm_eps, seed=seed,
                           rows=rows, **choice, **buffers)
        if sampling.temperature > 0 and seed is None:  # every rank must draw the same noise
            seed = tp.broadcast(torch.randint(0, 2 ** 62, (1,), device=x.device))
        R = x.shape[0] if rows is None else rows.shape[0]
        keys = torch.empty(R, lm_head_candidates(sampling.temperature, choice["top_k"], V),
                           dtype=torch.int64, device=x.device)
        lm_head(x, m.final_norm, m.lm_head, m.config.rms_norm_eps, seed=seed, rows=rows,
                scratch=buffers.get("scratch"), vocab_start=tp.vocab_range[0], vocab_size=V,
                keys_out=keys, **choice)
        every = tp.gather(keys).transpose(0, 1).contiguous().view(R, -1)  # the ranks' keys
        tokens = buffers.get("tokens_out")
        if tokens is None:
            tokens = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
        return lm_head_select(every, V, seed=seed, rows=rows, tokens_out=tokens,
                              positions=buffers.get("positions"), **choice)

    def _next_offset(self, sampling: Sampling, rows: int) -> int:
        """Noise offset for this draw; each draw consumes rows * vocab counters."""
        offset = sampling.draws
        if sampling.temperature > 0:
            sampling.draws += rows * self.m.config.vocab_size
        return offset

    # ---- passes -------------------------------------------------------------------------------

    def prefill(self, ids: torch.Tensor, lengths: list[int], cache: KVCache,
                sampling: Sampling | RowSampling, start: list[int] | None, mode: str,
                rows: list[int] | None) -> torch.Tensor:
        """Full-depth pass over right-padded ids [B, T] (long); fills cache slots start[b]..
        start[b]+T-1 (start None: 0), attending to the history already cached before them
        (mode ``"mask"``: only to the entries ``cache.written`` marks). Returns the next token
        [B] (long) after each row's last real token.

        rows: None (batch row b is cache row b: one batched pass) or the cache row of each batch row
        (the engine's admissions). Then each prompt runs as its own batch of one on its cache row's
        block table ``cache.block_table[r:r+1]``: no cache-row-layout copy of the prompts, no
        padding, and each request's token is chosen as ``generate`` would choose it alone (its own
        Sampling, batch row 0, its own noise offset; ``sampling`` a RowSampling gives each request
        its own). Prefill is compute-bound at realistic prompt lengths, so the extra weight reads of
        one pass per prompt cost little.
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
        """prefill of ids [B, T] into the cache rows row0..row0+B-1."""
        m, cfg = self.m, self.m.config
        B, T = ids.shape
        table = cache.block_table[row0:row0 + B]
        start = torch.tensor([0] * B if start is None else start, dtype=torch.int32,
                             device=m.device)
        lens = torch.tensor(lengths, dtype=torch.int32, device=m.device)
        residual = m._torch.embed(ids.reshape(-1))  # [B*T, H], updated in place per layer
        for j in range(cfg.num_layers):
            k_cache, v_cache = cache.k[j], cache.v[j]
            q = qkv_rope(residual.view(B, T, -1), m.w_qkv[j], m.rope_cos, m.rope_sin, start,
                         k_cache, v_cache, table, num_heads=cfg.num_heads,
                         num_kv_heads=cfg.num_kv_heads, norm_weight=m.attn_norm[j],
                         eps=cfg.rms_norm_eps)
            valid = cache.written[j] if mode == "mask" else None
            attn = attention_prefill(q, k_cache, v_cache, table, start, lens, valid=valid)
            self._attention_and_mlp(j, residual, attn.view(B * T, cfg.q_size))
        last = residual.view(B, T, -1)[torch.arange(B, device=m.device), lens.long() - 1]
        if isinstance(sampling, RowSampling):
            return self._pick(last, sampling)
        return self._pick(last, sampling, sampling.seed, self._next_offset(sampling, B))

    def backfill_states(self, states: torch.Tensor, layers: list[int], pos: torch.Tensor,
                        rows: torch.Tensor, cache: KVCache) -> None:
        """Backend.backfill_states: K/V of ``layers`` at (rows[m], pos[m]) from residual
        states [M, H], in one ``kv_backfill`` launch."""
        m, cfg = self.m, self.m.config
        layer_ids = torch.tensor(layers, dtype=torch.int32, device=m.device)
        kv_backfill(states.contiguous(), layer_ids, m.attn_norm, m.w_qkv, m.rope_cos,
                    m.rope_sin, pos.to(torch.int32), rows.to(torch.int32), cache.block_table,
                    cache.k, cache.v,
                    q_size=cfg.q_size, eps=cfg.rms_norm_eps)

    def _step_buffers(self, batch: int, cache: KVCache, kind: str = "step") -> _StepBuffers:
        """The decode buffers of this batch size on ``cache``, made on first use (``kind``:
        "step" for decode_step, "rows" for decode_rows, which never share them); a new cache
        (another shape, another address) drops them all, and the graphs that hold them."""
        if cache is not self._graph_cache or cache.stash is not self._graph_stash:
            self._graphs.clear()
            if cache is not self._graph_cache:
                self._buffers.clear()
            self._graph_cache, self._graph_stash = cache, cache.stash
        bufs = self._buffers.get((kind, batch))
        if bufs is None:
            m, cfg, dev = self.m, self.m.config, self.m.device
            rows_kind = kind == "rows"
            table = (torch.full((2 * cfg.num_layers + 2, batch), -1, dtype=torch.int32,
                                device=dev) if rows_kind else None)
            # from the cache's shape only: in decode_rows a row's split boundaries (and so its
            # rounding) must not depend on how many requests run beside it
            splits = attention_decode_splits(batch, cfg.num_kv_heads,
                                             cache.pages_per_row * cache.page_size, dev)
            bufs = self._buffers[(kind, batch)] = _StepBuffers(
                tokens=torch.zeros(batch, dtype=torch.int64, device=dev),
                pos=(torch.zeros(batch, dtype=torch.int32, device=dev) if table is None
                     else table[0]),
                context=torch.zeros(batch, dtype=torch.int32, device=dev),
                residual=torch.empty(batch, cfg.hidden_size, dtype=m.dtype, device=dev),
                q=torch.empty(batch, 1, cfg.num_heads, cfg.head_dim, dtype=m.dtype, device=dev),
                attn=torch.empty(batch, cfg.num_heads, cfg.head_dim, dtype=m.dtype, device=dev),
                mlp=torch.empty(batch, cfg.intermediate_size, dtype=m.dtype, device=dev),
                workspace=attention_decode_workspace(batch, cfg.num_heads, cfg.head_dim, splits,
                                                     dev),
                picked=torch.zeros(batch, dtype=torch.int64, device=dev), table=table,
                marks=(torch.zeros(cfg.num_layers, batch, dtype=torch.bool, device=dev)
                       if rows_kind else None))
        return bufs

    def _scratch(self, bufs: _StepBuffers, sampling: Sampling | RowSampling) -> torch.Tensor:
        """lm_head's candidate scratch for this batch and the top-k its kernel samples with,
        made once (before a capture). A choice made with torch (nucleus, top-k past
        MAX_FUSED_TOP_K) runs the kernel greedy for its logits: it needs the greedy scratch, not
        one sized for its own top-k."""
        top_k = None if isinstance(sampling, RowSampling) or sampling.temperature == 0 \
            or not self._fused(sampling) else sampling.top_k
        if top_k not in bufs.scratch:
            bufs.scratch[top_k] = lm_head_scratch(bufs.tokens.shape[0], self.m.config.vocab_size,
                                                  top_k, self.m.device)
        return bufs.scratch[top_k]

    def _decode(self, bufs: _StepBuffers, kept: tuple[int, ...], cache: KVCache,
                sampling: Sampling, seed, offset, deferred: bool, mask: bool,
                mark: torch.Tensor) -> torch.Tensor:
        """The decode step's launches, on ``bufs`` (tokens and pos hold the step's input).

        decode_embed (embedding, context lengths, this step's ``written`` marks ``mark``),
        then per kept layer five launches: QKV+RoPE with the input norm in its prologue and
        the cache write, single-launch split-KV attention, O projection + residual, gate/up
        with the MLP norm in its prologue, down + residual; then the LM head, whose selection
        also advances pos. deferred: the residual entering each skipped run is stashed by the
        down projection of the kept layer below it (a run that starts at layer 0 costs one
        copy). Eager: one ``kv_backfill`` launch per skipped run. mask: no backfill; attention
        at layer j ignores entries ``cache.written[j]`` marks missing."""
        m, cfg = self.m, self.m.config
        B = bufs.tokens.shape[0]
        res, pos = bufs.residual, bufs.pos
        table = cache.block_table[:B]
        self._summed(res, lambda: decode_embed(
            bufs.tokens, m.embed, pos, res, bufs.context, written=cache.written, mark=mark,
            block_table=table, vocab_start=self._vocab_start))
        runs = () if mask else skipped_runs(kept, cfg.num_layers)
        stash_after: dict[int, torch.Tensor] = {}  # kept layer -> stash ordinal of its output
        if deferred:
            for s, (a, _) in enumerate(runs):
                if a == 0:  # no layer below to carry the copy
                    slots = cache.slots(self._rows(B).long(), pos.long())
                    cache.flat(cache.stash)[s].index_put_((slots,), res)
                else:
                    stash_after[a - 1] = self._fill(B, s)
            runs = ()
        runs = iter(runs)
        run = next(runs, None)

        def backfill(run):
            kv_backfill(res, self._layers(run), m.attn_norm, m.w_qkv, m.rope_cos, m.rope_sin,
                        pos, self._rows(B), table, cache.k, cache.v, q_size=cfg.q_size,
                        eps=cfg.rms_norm_eps)

        for j in kept:
            while run is not None and run[0] < j:  # skipped layers below j see this residual
                backfill(run)
                run = next(runs, None)
            k_cache, v_cache = cache.k[j], cache.v[j]
            qkv_rope(res[:, None], m.w_qkv[j], m.rope_cos, m.rope_sin, pos, k_cache, v_cache,
                     table, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                     q_out=bufs.q, norm_weight=m.attn_norm[j], eps=cfg.rms_norm_eps)
            attention_decode(bufs.q[:, 0], k_cache, v_cache, table, bufs.context,
                             valid=cache.written[j] if mask else None, out=bufs.attn,
                             workspace=bufs.workspace)
            self._down_residual(bufs.attn.view(B, cfg.q_size), m.w_o[j], res)
            swiglu_gate_up(res, m.w_gate_up[j], out=bufs.mlp, norm_weight=m.mlp_norm[j],
                           eps=cfg.rms_norm_eps)
            ordinal = stash_after.get(j)
            stashing = ordinal is not None
            self._down_residual(bufs.mlp, m.w_down[j], res, cache=cache if stashing else None,
                                stash_index=ordinal, positions=pos if stashing else None,
                                block_table=table if stashing else None)
        while run is not None:
            backfill(run)
            run = next(runs, None)
        return self._pick(res, sampling, seed, offset, tokens_out=bufs.tokens,
                          scratch=self._scratch(bufs, sampling), positions=pos)

    def decode_step(self, tokens: torch.Tensor, positions: list[int], kept: tuple[int, ...],
                    cache: KVCache, sampling: Sampling, deferred: bool, mode: str,
                    mark: torch.Tensor) -> torch.Tensor:
        """One decode step (the caller, ``LlamaD3.decode_step``, has checked the arguments,
        recorded deferred debts and sized ``cache.stash``). mark: bool [L], the layers whose
        entries this step writes at each row's slot (a tensor the caller keeps per layer set).
        mode ``"mask"``: no backfill (``deferred`` is ignored) and attention reads
        ``cache.written`` as its validity mask.

        Returns the next tokens [B] (long). With the fused LM head (greedy, temperature, top-k
        <= MAX_FUSED_TOP_K) this is the backend's token buffer for this batch size, which the
        next step reads as its input (pass it back: no copy) and then overwrites: copy it
        before the next step if you keep it. Steady decoding copies nothing from the host: the
        positions live on the device and the LM head advances them.
        """
        mask = mode == "mask"
        deferred = deferred and not mask
        B = tokens.shape[0]
        bufs = self._step_buffers(B, cache)
        if tokens is not bufs.tokens:
            bufs.tokens.copy_(tokens)
        if bufs.host_pos != list(positions):
            bufs.pos.copy_(torch.tensor(positions, dtype=torch.int32))
        bufs.host_pos = None  # unknown, should the step fail
        if self.cuda_graphs and self._fused(sampling):
            out = self._replay(bufs, kept, cache, sampling, deferred, mask, mark)
        else:
            out = self._decode(bufs, kept, cache, sampling, sampling.seed,
                               self._next_offset(sampling, B), deferred, mask, mark)
        bufs.host_pos = [p + 1 for p in positions]  # what the step's LM head left there
        return out

    def decode_rows(self, tokens: list[int] | torch.Tensor, rows: list[int], positions: list[int],
                    kept: list[tuple[int, ...]], cache: KVCache,
                    sampling: Sampling | RowSampling, mode: str,
                    starts: dict[int, dict[int, list[int]]] | None,
                    marks: list[list[bool]]) -> torch.Tensor:
        """One decode pass where request r (cache row rows[r], newest token tokens[r] at slot
        positions[r]) runs its own ascending layer set kept[r]; returns the next tokens [R]
        (long), in request order. The caller (``LlamaD3.decode_rows``) has checked the
        arguments and made ``starts`` and ``marks``; marks[j][r]: whether this pass writes
        layer j's entry of request r (the first launch stores them in ``cache.written``).

        Cache-row layout: residual, tokens and positions have one row per cache row. The host
        builds the step's tables (positions; per layer, the cache rows that run it; per layer,
        the stash ordinal of each row's output; the running rows; all padded with -1, which
        every op skips) and uploads them, the tokens and the ``written`` marks (three copies)
        into buffers made once per cache. Layer j
        runs its five kernels with ``rows=`` its padded row list, reading and writing
        ``cache.k[j]``/``cache.v[j]`` in place; a layer no row keeps launches nothing. So the
        launches depend only on the set of layers any row keeps, and on a GPU the step is a
        CUDA graph per such set (and mode and sampling rule), replayed whatever rows run it.

        Deferred ``propagate`` (``starts`` given: layer a -> {ordinal s: the indices r of the
        requests whose s-th skipped run starts at a}, made by the caller with the stash sized
        and the debts recorded): the down projection of layer a - 1 also copies those rows'
        output to ``cache.stash[s]`` (a run starting at layer 0 is copied from the embedding:
        one more launch, and no graph). Eager ``propagate``: the rows that skip a run of
        consecutive layers get its K/V from one ``kv_backfill`` launch (no graph: those
        launches follow the row sets). ``mask``: skipped layers write nothing and attention
        reads ``cache.written[j]``.

        Tokens: one fused LM head over the running rows when every request is greedy (or one
        fused draw for a plain sampling Sampling); a RowSampling with sampling requests gets
        fp32 logits from one LM head pass and each request draws with torch from its own
        generator (see README, Continuous batching, for what that means for
        reproducibility; no graph).
        """
        L, n, R = self.m.config.num_layers, cache.batch_size, len(rows)
        keeps = [frozenset(k) for k in kept]
        bufs = self._step_buffers(n, cache, "rows")
        table = torch.full((2 * L + 2, n), -1, dtype=torch.int32)
        tok = torch.zeros(n, dtype=torch.int64)  # in request order, as the running rows
        mark = torch.zeros(L, n, dtype=torch.bool)
        table[0] = 0
        table[0, rows] = torch.tensor(positions, dtype=torch.int32)
        tok[:R] = torch.as_tensor(tokens).cpu()
        mark[:, rows] = torch.tensor(marks, dtype=torch.bool)
        run_sets = [tuple(row for row, k in zip(rows, keeps) if j in k) for j in range(L)]
        for j, run in enumerate(run_sets):
            table[1 + j, :len(run)] = torch.tensor(run, dtype=torch.int32)
        for a, by_ordinal in (starts or {}).items():
            for s, requests in by_ordinal.items():
                if a > 0:  # layer a - 1's down projection makes the copy
                    table[L + a, [rows[r] for r in requests]] = s
        table[2 * L + 1, :R] = torch.tensor(rows, dtype=torch.int32)
        bufs.table.copy_(table)
        bufs.tokens.copy_(tok)
        bufs.marks.copy_(mark)
        union = tuple(j for j in range(L) if run_sets[j])
        eager = mode == "propagate" and starts is None
        fused = (sampling.temperature == 0 if isinstance(sampling, RowSampling)
                 else self._fused(sampling))
        head_run = starts is not None and 0 in starts
        if self.cuda_graphs and fused and not eager and not head_run:
            self._replay_rows(bufs, union, cache, sampling, mode)
        else:
            seed, offset = (None, 0) if isinstance(sampling, RowSampling) else \
                (sampling.seed, self._next_offset(sampling, n))
            out = self._rows_kernels(bufs, union, cache, sampling, seed, offset, mode,
                                     self._row_set(tuple(rows)),
                                     [tuple(r for r in rows if r not in run)
                                      for run in run_sets] if eager else None,
                                     starts[0] if head_run else None)
            if not fused:
                return out
        running = self._row_set(tuple(rows))
        return torch.index_select(bufs.tokens, 0, running, out=bufs.picked[:R])

    def _rows_kernels(self, bufs: _StepBuffers, union: tuple[int, ...], cache: KVCache,
                      sampling: Sampling | RowSampling, seed, offset, mode: str,
                      live: torch.Tensor | None = None, skip_sets=None,
                      head_stash=None) -> torch.Tensor | None:
        """decode_rows' launches on the uploaded tables; the fused LM head leaves each running
        row's token in bufs.tokens (returns None), otherwise the request-order tokens of the
        rows ``live`` (int32, unpadded; not read by the fused head). skip_sets
        (eager propagate): per layer, the cache rows that skip it; head_stash: {ordinal:
        request indices} of runs that start at layer 0 (their rows are the tables' running rows
        in request order)."""
        m, cfg = self.m, self.m.config
        L, n = cfg.num_layers, bufs.tokens.shape[0]
        res, pos, table = bufs.residual, bufs.pos, bufs.table
        running = table[2 * L + 1]
        pages = cache.block_table
        self._summed(res, lambda: decode_embed(
            bufs.tokens, m.embed, pos, res, bufs.context, rows=running, written=cache.written,
            mark=bufs.marks, block_table=pages, vocab_start=self._vocab_start))
        for s, requests in (head_stash or {}).items():  # the embedding enters these runs
            idx = running[requests].long()
            cache.flat(cache.stash)[s].index_put_((cache.slots(idx, pos[idx].long()),),
                                                  res[idx])
        # deferred: stash copies ride on the down projections (none before any run was skipped)
        deferred = mode == "propagate" and skip_sets is None and cache.stash is not None
        for j in range(L):
            skip = skip_sets[j] if skip_sets else ()
            if skip and (j == 0 or skip_sets[j - 1] != skip):
                # these rows' residual stays as it is through the run: fill it all now
                b = j + 1
                while b < L and skip_sets[b] == skip:
                    b += 1
                idx = self._row_set(skip)
                kv_backfill(res.index_select(0, idx), self._layers((j, b)), m.attn_norm,
                            m.w_qkv, m.rope_cos, m.rope_sin, pos.index_select(0, idx), idx,
                            pages, cache.k, cache.v, q_size=cfg.q_size, eps=cfg.rms_norm_eps)
            if j not in union:
                continue
            idx = table[1 + j]
            qkv_rope(res[:, None], m.w_qkv[j], m.rope_cos, m.rope_sin, pos, cache.k[j],
                     cache.v[j], pages, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                     rows=idx, q_out=bufs.q, norm_weight=m.attn_norm[j], eps=cfg.rms_norm_eps)
            attention_decode(bufs.q[:, 0], cache.k[j], cache.v[j], pages, bufs.context,
                             rows=idx,
                             valid=cache.written[j] if mode == "mask" else None, out=bufs.attn,
                             workspace=bufs.workspace)
            self._down_residual(bufs.attn.view(n, cfg.q_size), m.w_o[j], res, rows=idx)
            swiglu_gate_up(res, m.w_gate_up[j], rows=idx, out=bufs.mlp,
                           norm_weight=m.mlp_norm[j], eps=cfg.rms_norm_eps)
            self._down_residual(bufs.mlp, m.w_down[j], res, rows=idx,
                                cache=cache if deferred else None,
                                stash_index=table[L + 1 + j] if deferred else None,
                                positions=pos if deferred else None,
                                block_table=pages if deferred else None)
        fused = (sampling.temperature == 0 if isinstance(sampling, RowSampling)
                 else self._fused(sampling))
        if fused:
            self._pick(res, sampling, seed, offset, rows=running, tokens_out=bufs.tokens,
                       scratch=self._scratch(bufs, sampling))
            return None
        return self._pick(res, sampling, seed, offset, rows=live)

    # ---- CUDA graphs --------------------------------------------------------------------------

    def _replay(self, bufs: _StepBuffers, kept, cache, sampling, deferred, mask,
                mark) -> torch.Tensor:
        """Replay (capturing on first use) the graph of this batch size, layer set and mode; it
        reads and writes ``bufs`` in place, so a replay launches nothing else (a sampling draw
        first sets its seed and offset)."""
        key = ("step", bufs.tokens.shape[0], kept, deferred, mask) + self._sampling_key(sampling)
        self._run_graph(key, bufs, sampling, lambda seed, offset: self._decode(
            bufs, kept, cache, sampling, seed, offset, deferred, mask, mark))
        return bufs.tokens

    def _replay_rows(self, bufs: _StepBuffers, union, cache, sampling, mode) -> None:
        """decode_rows' graph for this set of kept layers (any row sets), mode and sampling."""
        key = ("rows", bufs.tokens.shape[0], union, mode) + self._sampling_key(sampling)
        self._run_graph(key, bufs, sampling, lambda seed, offset: self._rows_kernels(
            bufs, union, cache, sampling, seed, offset, mode))

    @staticmethod
    def _sampling_key(sampling) -> tuple:
        greedy = sampling.temperature == 0
        return (greedy,) if greedy else (sampling.top_k, sampling.temperature)

    def _run_graph(self, key, bufs: _StepBuffers, sampling, step) -> None:
        """Replay the graph under ``key``, capturing ``step(seed, offset)`` on first use."""
        if key not in self._graphs:
            self._graphs[key] = self._capture(bufs, step)
        graph, seed_in, offset_in = self._graphs[key]
        if sampling.temperature > 0:
            seed_in.fill_(sampling.seed if sampling.seed is not None
                          else int(torch.randint(2**31 - 1, (1,))))
            offset_in.fill_(self._next_offset(sampling, bufs.tokens.shape[0]))
        graph.replay()

    def _capture(self, bufs: _StepBuffers, step):
        """A CUDA graph of ``step(seed, offset)``, which reads and writes ``bufs``. The captured
        step reads seed and offset from device tensors, so replays draw anew."""
        seed_in = torch.zeros(1, dtype=torch.int64, device=bufs.tokens.device)
        offset_in = torch.zeros(1, dtype=torch.int64, device=bufs.tokens.device)
        # compile and autotune outside the capture: that runs a real step, which writes the
        # same cache entries the replay will and advances tokens and pos, so put those back
        saved = bufs.tokens.clone(), bufs.pos.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step(seed_in, offset_in)
        torch.cuda.current_stream().wait_stream(stream)
        bufs.tokens.copy_(saved[0])
        bufs.pos.copy_(saved[1])
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            step(seed_in, offset_in)
        return graph, seed_in, offset_in
