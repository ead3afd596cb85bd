"""Next-token choice from logits: greedy, temperature, top-k and top-p (nucleus)."""
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
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")

    def on(self, device: torch.device) -> "Sampling":
        """A copy whose random generator lives on ``device``, seeded when a seed is set."""
        gen = None
        if self.seed is not None:
            gen = torch.Generator(device=device).manual_seed(self.seed)
        return Sampling(self.temperature, self.top_k, self.top_p, self.seed, gen)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return sample(logits, self.temperature, self.top_k, self.top_p, self.generator)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids [B] (long) from logits [B, V]. temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the ones ranked above it already reach top_p; the first always stays
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


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
