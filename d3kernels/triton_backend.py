"""LlamaD3's triton backend: prefill and decode steps on the fused kernels of d3kernels.ops.

A decode layer is five launches: RMSNorm, QKV+RoPE+cache write, split-KV attention, O projection
with the residual add, RMSNorm, gate/up with silu·mul, down with the residual add (the residual
is updated in place). Skipped layers cost one ``kv_backfill`` launch per run of consecutive
skipped layers (``propagate``/eager), or one stash copy per run when the backfill is deferred
(``LlamaD3.flush_backfill`` later fills a whole run's stashed states in one ``kv_backfill``
launch); the LM head picks the token without writing logits. In ``mask`` mode skipped layers
cost nothing and attention at layer j reads ``cache.written[j]`` as its validity mask. On a GPU
each distinct (batch, layer set, mode) decode step is captured once as a CUDA graph and replayed
after that.
"""
from __future__ import annotations

import torch

from d3kernels.kv_cache import KVCache
from d3kernels.ops.attention import attention_decode, attention_prefill
from d3kernels.ops.kv_backfill import kv_backfill
from d3kernels.ops.lm_head import lm_head
from d3kernels.ops.qkv_rope import qkv_rope
from d3kernels.ops.rms_norm import rms_norm
from d3kernels.ops.swiglu import down_residual, swiglu_gate_up
from d3kernels.sampling import Sampling
from d3kernels.schedule import skipped_runs

MAX_FUSED_TOP_K = 64  # lm_head samples among at most this many candidates per row


class TritonBackend:
    """Runs a LlamaD3's passes on Triton kernels; holds no weights of its own."""

    def __init__(self, model, cuda_graphs: bool):
        self.m = model
        self.cuda_graphs = cuda_graphs and model.device.type == "cuda"
        self._layer_ids: dict[tuple[int, int], torch.Tensor] = {}
        self._row_ids: dict[int, torch.Tensor] = {}
        self._graphs: dict[tuple, tuple] = {}
        self._graph_cache: KVCache | None = None
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

    def _attention_and_mlp(self, j: int, residual: torch.Tensor, attn: torch.Tensor) -> None:
        """O projection + residual, then the SwiGLU MLP + residual; residual [M, H] in place."""
        m = self.m
        down_residual(attn, m.w_o[j], residual)
        h, _ = rms_norm(residual, m.mlp_norm[j], m.config.rms_norm_eps)
        down_residual(swiglu_gate_up(h, m.w_gate_up[j]), m.w_down[j], residual)

    @staticmethod
    def _fused(sampling: Sampling) -> bool:
        """Whether the LM head kernel can make the choice itself (greedy, temperature, top-k)."""
        return sampling.top_p is None and (sampling.top_k is None
                                           or sampling.top_k <= MAX_FUSED_TOP_K)

    def _pick(self, x: torch.Tensor, sampling: Sampling, seed, offset) -> torch.Tensor:
        """Next tokens [M] from last hidden states x [M, H] (final norm + LM head fused).

        seed, offset: the Philox seed and noise offset of this draw (ints, or device tensors
        inside a CUDA graph); unused when greedy.
        """
        m = self.m
        if not self._fused(sampling):  # nucleus or wide top-k: kernel logits, torch choice
            logits = torch.empty(x.shape[0], m.config.vocab_size, device=x.device)
            lm_head(x, m.final_norm, m.lm_head, m.config.rms_norm_eps, logits_out=logits)
            return sampling(logits)
        return lm_head(x, m.final_norm, m.lm_head, m.config.rms_norm_eps,
                       temperature=sampling.temperature, top_k=sampling.top_k, seed=seed,
                       offset=offset)

    def _next_offset(self, sampling: Sampling, rows: int) -> int:
        """Noise offset for this draw; each draw consumes rows * vocab counters."""
        offset = sampling.draws
        if sampling.temperature > 0:
            sampling.draws += rows * self.m.config.vocab_size
        return offset

    # ---- passes -------------------------------------------------------------------------------

    def prefill(self, ids: torch.Tensor, lengths: list[int], cache: KVCache,
                sampling: Sampling, start: list[int] | None = None,
                mode: str = "propagate") -> torch.Tensor:
        """Full-depth pass over right-padded ids [B, T]; fills cache slots start[b]..
        start[b]+T-1 (start None: 0), attending to the history already cached before them
        (mode ``"mask"``: only to the entries ``cache.written`` marks)."""
        m, cfg = self.m, self.m.config
        B, T = ids.shape
        start = torch.tensor([0] * B if start is None else start, dtype=torch.int32,
                             device=m.device)
        lens = torch.tensor(lengths, dtype=torch.int32, device=m.device)
        residual = m.embed[ids.reshape(-1)]  # [B*T, H], updated in place layer by layer
        for j in range(cfg.num_layers):
            k_cache, v_cache = cache.k[j, :B], cache.v[j, :B]
            h, _ = rms_norm(residual, m.attn_norm[j], cfg.rms_norm_eps)
            q = qkv_rope(h.view(B, T, -1), m.w_qkv[j], m.rope_cos, m.rope_sin, start, k_cache,
                         v_cache, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads)
            valid = cache.written[j, :B] if mode == "mask" else None
            attn = attention_prefill(q, k_cache, v_cache, start, lens, valid=valid)
            self._attention_and_mlp(j, residual, attn.view(B * T, cfg.q_size))
        last = residual.view(B, T, -1)[torch.arange(B, device=m.device), lens.long() - 1]
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
        runs = iter(() if mask else skipped_runs(kept, cfg.num_layers))
        run = next(runs, None)
        rows = self._rows(B) if run is not None else None

        def backfill(run):
            if deferred:  # a copy: the residual is updated in place afterwards
                cache.get_stash()[run[0], :B].index_put_((rows.long(), pos.long()), residual)
                return
            kv_backfill(residual, self._layers(run), m.attn_norm, m.w_qkv, m.rope_cos,
                        m.rope_sin, pos, rows, cache.k[:, :B], cache.v[:, :B],
                        q_size=cfg.q_size, eps=cfg.rms_norm_eps)

        for j in kept:
            while run is not None and run[0] < j:  # skipped layers below j see this residual
                backfill(run)
                run = next(runs, None)
            k_cache, v_cache = cache.k[j, :B], cache.v[j, :B]
            h, _ = rms_norm(residual, m.attn_norm[j], cfg.rms_norm_eps)
            q = qkv_rope(h[:, None], m.w_qkv[j], m.rope_cos, m.rope_sin, pos, k_cache, v_cache,
                         num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads)
            valid = cache.written[j, :B] if mask else None
            attn = attention_decode(q[:, 0], k_cache, v_cache, context, valid=valid)
            self._attention_and_mlp(j, residual, attn.view(B, cfg.q_size))
        while run is not None:
            backfill(run)
            run = next(runs, None)
        return self._pick(residual, sampling, seed, offset)

    def _positions_on_device(self, positions: list[int]) -> torch.Tensor:
        """Device int32 [B] positions; a step that follows the last advances it in place, so
        steady decoding copies nothing from the host."""
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
        attention reads ``cache.written`` as its validity mask."""
        mask = mode == "mask"
        deferred = deferred and not mask
        pos = self._positions_on_device(positions)
        if deferred:
            cache.get_stash()  # allocated before any capture: graphs hold its address
        if self.cuda_graphs and self._fused(sampling):
            return self._replay(tokens, pos, kept, cache, sampling, deferred, mask)
        return self._decode(tokens, pos, kept, cache, sampling, sampling.seed,
                            self._next_offset(sampling, tokens.shape[0]), deferred, mask)

    # ---- CUDA graphs --------------------------------------------------------------------------

    def _replay(self, tokens, pos, kept, cache, sampling, deferred=False,
                mask=False) -> torch.Tensor:
        """Replay (capturing on first use) the graph of this batch size, layer set and mode."""
        if cache is not self._graph_cache:  # graphs hold the cache's addresses
            self._graphs.clear()
            self._graph_cache = cache
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
