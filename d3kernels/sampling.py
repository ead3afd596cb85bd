"""Next-token choice from logits: greedy, temperature, top-k and top-p (nucleus).

Sampling is Gumbel-max: the token is the argmax, over the tokens top-k and top-p keep, of
``logits / temperature + g`` with ``g = -log(-log U)``, U ~ ``torch.rand([B, V])`` from the
sampler's generator over the whole vocabulary. That draws from softmax(logits / temperature)
restricted to the kept tokens, and a token's noise depends only on the generator's state, its
batch row and its vocabulary index: tensor-parallel ranks, each holding a slice of the vocabulary
and the same generator state, reach tp=1's token by exchanging a few candidates instead of the
logits (:meth:`d3kernels.parallel.TensorParallel.sample`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    """How to pick each next token. temperature 0 is greedy; seed makes sampling repeatable.

    ``generator`` is built from ``seed`` on the model's device by :meth:`on`; ``draws``
    counts the noise a fused sampler has consumed, so each step's noise is fresh.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    generator: torch.Generator | None = None
    draws: int = 0

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0:
            raise ValueError(f"temperature must be a number >= 0, got {t!r}")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"top_k must be an int >= 1 or None, got {k!r}")
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float))
                              or not 0 < p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1] or None, got {p!r}")
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")

    def on(self, device: torch.device, tp=None) -> "Sampling":
        """A copy whose random generator lives on ``device``, seeded when a seed is set.

        tp: the model's :class:`~d3kernels.parallel.TensorParallel` (None: not split). Under
        tensor parallelism the ranks must draw the same noise, so an unseeded sampler that
        samples gets one seed drawn by rank 0 and broadcast (a collective: every rank binds its
        samplers at the same point, as generate, chat and Engine.submit do); the copy carries
        it as its seed, for the fused samplers that read ``seed``.
        """
        seed = self.seed
        if seed is None and tp is not None and self.temperature > 0:
            seed = tp.shared_seed(device)
        gen = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        return Sampling(self.temperature, self.top_k, self.top_p, seed, gen)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return sample(logits, self.temperature, self.top_k, self.top_p, self.generator)


def gumbel(generator: torch.Generator | None, rows: int, vocab: int, dtype: torch.dtype,
           device: torch.device) -> torch.Tensor:
    """Gumbel noise [rows, vocab] of ``dtype``: -log(-log U), U ~ torch.rand from ``generator``
    (None: torch's default for ``device``), one draw of rows * vocab uniforms."""
    u = torch.rand((rows, vocab), generator=generator, dtype=dtype, device=device)
    # U = 0 (2^-24 per element in float32) would make the noise -inf: a kept token unpickable
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(dtype).tiny)))


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """bool [B, V]: exactly ``k`` (1..V) True per row of logits [B, V], at its k largest values;
    ties at the k-th value go to the smaller index (the triton LM head's rule)."""
    kth = logits.topk(k, dim=-1).values[:, -1:]
    above = logits > kth
    at = logits == kth
    return above | (at & (at.cumsum(-1) <= k - above.sum(-1, keepdim=True)))


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids [B] (long) from logits [B, V] (float).

    temperature 0 is greedy (argmax; ties to the smallest index). Otherwise Gumbel-max over
    the kept tokens (module doc), one draw of B * V uniforms from ``generator`` (None: torch's
    default) whatever the options; ties to the smallest index. top_k (< V): keep the top_k
    largest logits, exactly top_k (:func:`top_k_mask`). top_p (< 1): then keep the nucleus of
    softmax(logits / temperature) over those: most probable first (ties: smaller index), a
    token dropped once the ones before it reach top_p (the first always stays).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    B, V = logits.shape
    scaled = logits / temperature
    if top_k is not None and top_k < V:
        scaled = scaled.masked_fill(~top_k_mask(logits, top_k), float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_scaled, order = scaled.sort(dim=-1, descending=True, stable=True)
        probs = sorted_scaled.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        scaled = scaled.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return (scaled + gumbel(generator, B, V, scaled.dtype, scaled.device)).argmax(dim=-1)


class RowSampling:
    """Each row of a batch picks its token its own way (the engine's requests): a list of
    :class:`Sampling`, one per row, called like one. Greedy rows cost one argmax together."""

    def __init__(self, samplings: list[Sampling]):
        self.samplings = list(samplings)
        self.temperature = max(s.temperature for s in self.samplings)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        return torch.cat([s(logits[r:r + 1]) for r, s in enumerate(self.samplings)])
