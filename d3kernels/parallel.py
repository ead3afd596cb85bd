"""Tensor parallelism for LlamaD3 on torch.distributed (design.md §11).

Megatron-style split over the ``size`` ranks of a process group (NCCL between GPUs, gloo on
CPUs), rank r holding:

- Q/K/V and gate/up column-parallel: its heads' rows of q_proj, its KV heads' rows of k_proj
  and v_proj, its slice of the intermediate rows of gate_proj and up_proj;
- O and down row-parallel: the matching columns of o_proj and down_proj, so each rank's product
  is a partial sum of the layer's output, completed by one all-reduce after O and one after
  down (a skipped layer runs neither);
- embedding and LM head vocab-parallel: rows ``vocab_range`` of each (the split need not be
  even). The embedding looks up its own rows (zeros elsewhere) and all-reduces; the LM head
  picks the next token without gathering the logits (:meth:`TensorParallel.argmax`, and
  :meth:`TensorParallel.sample` for temperature and top-k sampling; top-p gathers them);
- norms whole (they are small and every rank needs them).

KV heads: with ``num_kv_heads % size == 0`` each rank holds kv_heads/size of them; with
``size % num_kv_heads == 0`` (more ranks than KV heads) each KV head is replicated on the
size/kv_heads ranks whose query heads read it, the standard replication (one KV head per rank).
Anything else, or heads or the intermediate size not divisible by ``size``, is refused.

A rank runs the model on a per-rank config (:meth:`TensorParallel.local_config`: heads/size,
its KV heads, intermediate/size; hidden size, vocabulary and layers unchanged), so its KV cache,
backfill and deferred flush handle its own heads with the single-process code.

``tp=1`` (or no process group) is :func:`tensor_parallel` returning None: the model then makes
no collective and no check at all.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib

import torch
import torch.distributed as dist

from d3kernels.config import LlamaConfig
from d3kernels.sampling import RowSampling, Sampling, gumbel, top_k_mask

# HF weight name suffix -> (what it is split by, the dim split): "heads", "kv_heads",
# "intermediate" and "vocab" ranges; dim 0 is column-parallel (output rows), 1 row-parallel.
_SPLITS = {
    "self_attn.q_proj.weight": ("heads", 0),
    "self_attn.k_proj.weight": ("kv_heads", 0),
    "self_attn.v_proj.weight": ("kv_heads", 0),
    "self_attn.o_proj.weight": ("heads", 1),
    "mlp.gate_proj.weight": ("intermediate", 0),
    "mlp.up_proj.weight": ("intermediate", 0),
    "mlp.down_proj.weight": ("intermediate", 1),
    "model.embed_tokens.weight": ("vocab", 0),
    "lm_head.weight": ("vocab", 0),
}


class TensorParallelError(RuntimeError):
    """A tensor-parallel collective failed: another rank raised or exited (its own error is in
    its output), or the group timed out. The process group has been torn down."""


def tensor_parallel(tp, config: LlamaConfig, group=None) -> "TensorParallel | None":
    """The TP state for a model of ``config`` split over ``tp`` ranks, or None for tp=1.

    tp > 1 needs an initialised torch.distributed process group (``group``, default the world)
    of exactly tp ranks, and a config that splits (see the module doc). Raises ValueError
    naming the sizes before anything is loaded.
    """
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be an int >= 1, got {tp!r}")
    if tp == 1:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"tp={tp} needs a torch.distributed process group: start under "
                         f"`torchrun --nproc-per-node {tp}` (or call "
                         f"torch.distributed.init_process_group) before building the model")
    world = dist.get_world_size(group)
    if tp != world:
        raise ValueError(f"tp={tp} must equal the process group's size, got a group of {world} "
                         f"rank(s)" + (" (tp is larger than the world size)" if tp > world
                                       else ""))
    h, kv, inter = config.num_heads, config.num_kv_heads, config.intermediate_size
    if h % tp:
        raise ValueError(f"tp={tp} does not divide num_heads={h}")
    if kv % tp and tp % kv:
        raise ValueError(f"tp={tp} and num_kv_heads={kv}: one must divide the other (KV heads "
                         f"split over the ranks, or each replicated on tp/num_kv_heads ranks)")
    if inter % tp:
        raise ValueError(f"tp={tp} does not divide intermediate_size={inter}")
    if config.vocab_size < tp:
        raise ValueError(f"tp={tp} is larger than vocab_size={config.vocab_size}")
    return TensorParallel(config, tp, dist.get_rank(group), group)


class TensorParallel:
    """Rank ``rank`` of ``size`` in ``group``: its shard ranges, the shard rules and the
    collectives of a step. Build it with :func:`tensor_parallel`."""

    def __init__(self, config: LlamaConfig, size: int, rank: int, group=None):
        self.config, self.size, self.rank, self.group = config, size, rank, group
        self.broken: BaseException | None = None  # the error that tore the group down
        d, h, kv = config.head_dim, config.num_heads, config.num_kv_heads
        hq = h // size
        per_kv = max(kv // size, 1)
        first_kv = rank * kv // size  # replicated: the KV head rank r's query heads read
        inter = config.intermediate_size // size
        V = config.vocab_size
        self.vocab_range = (rank * V // size, (rank + 1) * V // size)
        self.ranges = {"heads": (rank * hq * d, (rank + 1) * hq * d),
                       "kv_heads": (first_kv * d, (first_kv + per_kv) * d),
                       "intermediate": (rank * inter, (rank + 1) * inter),
                       "vocab": self.vocab_range}
        self._local = config.replace(num_heads=hq, num_kv_heads=per_kv,
                                     intermediate_size=inter)
        self._vocab_max = -(-V // size)  # the largest rank's vocab slice (for padded gathers)

    def __repr__(self) -> str:
        return f"TensorParallel(rank {self.rank} of {self.size})"

    def local_config(self) -> LlamaConfig:
        """This rank's config: its heads, KV heads and intermediate size; the rest unchanged."""
        return self._local

    # ---- sharding -----------------------------------------------------------------------------

    def shard(self, name: str) -> tuple[int, int, int] | None:
        """(dim, start, stop) of this rank's part of HF weight ``name``; None: held whole."""
        for suffix, (what, dim) in _SPLITS.items():
            if name.endswith(suffix):
                return (dim, *self.ranges[what])
        return None

    def shard_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of this rank's part of a weight of full shape ``shape``."""
        cut = self.shard(name)
        if cut is None:
            return tuple(shape)
        dim, a, b = cut
        return tuple(b - a if i == dim else s for i, s in enumerate(shape))

    def take(self, name: str, w, full_shape: tuple[int, ...]):
        """This rank's part of weight ``name``: ``w`` as given when it already has the shard's
        shape, else sliced from the full weight (a QuantizedWeight only along its rows N).
        Raises ValueError for any other shape."""
        want = self.shard_shape(name, full_shape)
        if tuple(w.shape) == want:
            return w
        if tuple(w.shape) != tuple(full_shape):
            raise ValueError(f"checkpoint tensor {name!r} has shape {list(w.shape)}, expected "
                             f"{list(full_shape)} (whole) or {list(want)} (rank {self.rank}'s "
                             f"shard at tp={self.size})")
        dim, a, b = self.shard(name)
        if dim == 0:
            return w[a:b]
        if not isinstance(w, torch.Tensor):
            raise ValueError(f"checkpoint tensor {name!r}: a quantized weight cannot be split "
                             f"along its input dim here; load it with from_pretrained(..., tp=) "
                             f"(which reads each rank's blocks) or pass rank {self.rank}'s "
                             f"shard {list(want)}")
        return w[:, a:b]

    # ---- collectives --------------------------------------------------------------------------

    def _run(self, op, *args, **kwargs):
        """A collective, turned into a TensorParallelError (and the group torn down) when it
        fails: a peer raised and left, or the group's timeout passed."""
        if self.broken is not None:
            raise TensorParallelError(f"rank {self.rank}: the tensor-parallel group was torn "
                                      f"down after an earlier error: {self.broken}")
        try:
            return op(*args, group=self.group, **kwargs)
        except Exception as e:  # gloo/NCCL raise RuntimeError subclasses (DistBackendError)
            err = TensorParallelError(
                f"rank {self.rank} of {self.size}: a tensor-parallel collective failed ("
                f"another rank raised or exited, see its output, or the group timed out); the "
                f"process group is torn down: {type(e).__name__}: {e}")
            self.abort(err)
            raise err from e

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """[size, *t.shape]: every rank's t (one all-gather into one tensor, stacked on dim 0 as
        gloo and NCCL both take it)."""
        t = t.contiguous()
        every = torch.empty((self.size * t.shape[0], *t.shape[1:]), dtype=t.dtype,
                            device=t.device)
        self._run(dist.all_gather_single, every, t)
        return every.view(self.size, *t.shape)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum t over the ranks, in place; returns t."""
        self._run(dist.all_reduce, t)
        return t

    def embed(self, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel embedding: ``table`` [V_r, H] holds rows vocab_range; ids (long, any
        shape) -> [*ids.shape, H], each rank's own rows summed over the ranks."""
        a, b = self.vocab_range
        mine = (ids >= a) & (ids < b)
        x = table[torch.where(mine, ids - a, 0)] * mine[..., None]
        return self.all_reduce(x)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """The global argmax [B] (long) of vocab-parallel logits [B, V_r] without gathering
        them: each rank offers its best (value, index) and all ranks pick the same winner, the
        lowest index among equal values (torch.argmax's rule on the whole row)."""
        value, index = logits.max(dim=-1)
        every = self.gather(torch.stack([value.double(),
                                          (index + self.vocab_range[0]).double()], -1))
        best = every[..., 0].max(dim=0).values  # [B]
        # the lowest index among the ranks holding the best value (ranks own ascending slices)
        index = torch.where(every[..., 0] == best, every[..., 1], float("inf")).min(dim=0).values
        return index.long()

    def sample(self, logits: torch.Tensor, sampling: Sampling | RowSampling) -> torch.Tensor:
        """The token [B] (long) ``sampling`` (a Sampling, or a RowSampling: one per row) draws
        from vocab-parallel logits [B, V_r] (float), the same on every rank and the same as
        ``sampling`` on the whole logits at tp=1, provided the ranks' generators are in the
        same state (bind samplers with ``Sampling.on(device, tp)``; an unbound sampling row is
        refused with a ValueError, since each rank would draw its own noise).

        Every rank draws the same whole [rows, V] Gumbel noise that tp=1 draws, and takes its
        slice. Temperature (and greedy rows of a RowSampling) offer each rank's best
        (score, index) per row; top-k offers each rank's top_k (logit, index) pairs per row
        (its slice's members of the global top_k are among them). One all-gather of those
        16-byte candidates (padded to the most candidates any row offers); every rank then
        keeps each row's top_k candidates by logit (ties: smaller index) and picks the best
        score = logit / temperature + noise[index] (ties: smaller index), tp=1's rule. Top-p
        needs the whole sorted distribution: any row with a nucleus makes the whole batch
        all-gather the logits and sample them with the shared generators (no broadcast).
        """
        groups = ([(slice(r, r + 1), s) for r, s in enumerate(sampling.samplings)]
                  if isinstance(sampling, RowSampling) else [(slice(None), sampling)])
        unbound = [r for r, (_, s) in enumerate(groups) if s.temperature > 0
                   and s.generator is None]
        if unbound:
            which = f"rows {unbound} have" if len(groups) > 1 else "the sampler has"
            raise ValueError(f"sampling: under tensor parallel every rank must draw the same "
                             f"noise, but {which} no generator: bind samplers with "
                             f"Sampling.on(model.device, model.tp), as generate, chat and "
                             f"Engine.submit do")
        if any(s.temperature > 0 and s.top_p is not None and s.top_p < 1 for _, s in groups):
            return sampling(self.gather_logits(logits))
        dev, V = logits.device, self.config.vocab_size
        a, b = self.vocab_range
        noise, top_ks, keys, row_k = [], [], [], []
        for rows, s in groups:  # in row order: each generator draws as it does at tp=1
            x = logits[rows]
            g = None if s.temperature == 0 else gumbel(s.generator, x.shape[0], V, x.dtype, dev)
            top_k = s.top_k if g is not None and s.top_k is not None and s.top_k < V else None
            # top-k rows rank by logit; the others by their final score (greedy: the logit)
            keys.append(x if g is None or top_k else x / s.temperature + g[:, a:b])
            noise.append(g)
            top_ks.append(top_k)
            row_k += [top_k or 1] * x.shape[0]
        key = torch.cat(keys)
        B, n = key.shape[0], max(row_k)  # n: candidates per rank and row, alike on every rank
        c = min(n, b - a)
        local = torch.arange(b - a, device=dev)
        mine = torch.where(top_k_mask(key, c), local, b - a).topk(c, largest=False).values
        offer = torch.stack([key.gather(1, mine).double(), (mine + a).double()], -1)
        pad = torch.tensor([float("-inf"), V], dtype=torch.float64, device=dev)
        offer = torch.cat([offer, pad.expand(B, n - c, 2)], dim=1)  # index V: never kept
        every = self.gather(offer).transpose(0, 1).reshape(B, self.size * n, 2)
        every = every.gather(1, every[..., 1].argsort(-1)[..., None].expand(-1, -1, 2))
        cand, index = every.unbind(-1)  # [B, size * n], in index order
        # each row keeps its k best candidates by key, ties to the smaller index (stable sort)
        best_first = cand.sort(dim=-1, descending=True, stable=True).indices
        ranked = torch.arange(cand.shape[1], device=dev) < torch.tensor(row_k, device=dev)[:, None]
        keep = torch.zeros_like(ranked).scatter(1, best_first, ranked)
        at = index.long().clamp(max=V - 1)
        score = torch.cat([  # top-k: tp=1's logits / temperature + noise, element by element
            cand[rows] if top_k is None else
            (cand[rows].to(logits.dtype) / s.temperature + g.gather(1, at[rows])).double()
            for (rows, s), g, top_k in zip(groups, noise, top_ks)])
        best = score.masked_fill(~keep, float("-inf")).argmax(-1, keepdim=True)  # smaller index
        return index.gather(1, best)[:, 0].long()

    def shared_seed(self, device: torch.device) -> int:
        """A random seed, the same on every rank: rank 0 draws it from torch's default
        generator (so torch.manual_seed on rank 0 repeats it) and broadcasts it from ``device``
        (the model's: NCCL takes this rank's GPU). A collective: every rank calls it at the
        same point."""
        seed = (torch.randint(2 ** 62, (1,)) if self.rank == 0
                else torch.zeros(1, dtype=torch.long))
        return int(self.broadcast(seed.to(device)).item())

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The whole logits [..., V] from every rank's vocab slice [..., V_r] (all-gather,
        padded to the largest slice): for the samplers that need the whole distribution and
        for ``LlamaD3.logits``."""
        pad = self._vocab_max - logits.shape[-1]
        every = self.gather(torch.nn.functional.pad(logits, (0, pad)))
        V = self.config.vocab_size
        return torch.cat([every[r, ..., :(r + 1) * V // self.size - r * V // self.size]
                          for r in range(self.size)], dim=-1)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s t on every rank, in place (group rank; the world's for the default
        group); returns t."""
        self._run(dist.broadcast, t, src=self._global_rank(src))
        return t

    def broadcast_objects(self, objects: list, src: int = 0) -> list:
        """Rank ``src``'s picklable objects on every rank: ``objects`` (a list of as many
        entries on every rank) is filled in place with src's; returns it. For host-side
        decisions one rank makes (a chat's next line, a server's engine operations)."""
        self._run(dist.broadcast_object_list, objects, src=self._global_rank(src))
        return objects

    def _global_rank(self, src: int) -> int:
        """The world rank of group rank ``src`` (what torch.distributed's src= takes)."""
        return dist.get_global_rank(self.group, src) if self.group is not None else src

    def check_same(self, what: str, value: str, device: torch.device) -> None:
        """Raise ValueError on every rank unless ``value`` (a description, e.g. of the
        checkpoint) is the same on every rank: one all-gather of its digest, on ``device`` (the
        model's: NCCL takes this rank's GPU)."""
        mine = torch.tensor(list(hashlib.sha256(value.encode()).digest()), dtype=torch.uint8)
        every = self.gather(mine.to(device))
        differ = [r for r in range(self.size) if not torch.equal(every[r], every[0])]
        if differ:
            raise ValueError(f"tensor parallel: ranks {differ} have a different {what} than "
                             f"rank 0 (rank {self.rank}: {value})")

    # ---- faults -------------------------------------------------------------------------------

    def abort(self, error: BaseException) -> None:
        """Tear the process group down after ``error`` (idempotent): peers blocked in a
        collective with this rank fail at once instead of waiting for the timeout."""
        if self.broken is not None:
            return
        self.broken = error
        if dist.is_initialized():
            with contextlib.suppress(Exception):  # already torn down from elsewhere
                dist.destroy_process_group(self.group)

    @contextlib.contextmanager
    def guard(self):
        """Around one model pass: any exception tears the group down before it propagates, so
        no rank is left waiting in a collective this one will never join."""
        try:
            yield
        except BaseException as e:
            self.abort(e)
            raise


def init_gloo(rank: int, size: int, init_method: str, timeout_s: float = 60.0) -> None:
    """Start a gloo process group (CPU tensors): for tests, scripts and perf/tp_cpu.py."""
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=timeout_s))
