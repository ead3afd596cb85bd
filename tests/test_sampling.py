"""d3kernels.sampling: Gumbel-max draws from softmax(logits / T) restricted by top-k and top-p.

The distribution tests draw N tokens at once (one row per draw, each with its own noise) from a
small hand-written vocabulary and hold each token's count to its binomial law under the
distribution written out here independently of the sampler: |count - N p| <= 5 sd, sd =
sqrt(N p (1 - p)). Five standard deviations: a correct sampler exceeds it with probability
< 6e-7 per token (normal tail; N p >= 300 here, so the approximation holds), so another seed
would not make the test flaky, while at N = 40000 it is at most 1.3 % of N: ignoring the
temperature, a wrong top-k cut or the unscaled nucleus shifts some count by several times that.
Tokens outside the kept set must never be drawn.
"""
from __future__ import annotations

import math

import pytest
import torch

from d3kernels.sampling import RowSampling, Sampling, sample, top_k_mask

N = 40_000
LOGITS = [1.0, 2.0, 0.5, 0.5, 0.5, -1.0, 0.0]


def _softmax(values: list[float], temperature: float) -> list[float]:
    e = [math.exp(v / temperature) for v in values]
    return [x / sum(e) for x in e]


def _nucleus(probs: dict[int, float], top_p: float) -> dict[int, float]:
    """The most probable tokens (ties: smaller id) until their mass reaches top_p, renormed."""
    kept, mass = {}, 0.0
    for t in sorted(probs, key=lambda t: (-probs[t], t)):
        if mass >= top_p:
            break
        kept[t] = probs[t]
        mass += probs[t]
    return {t: p / mass for t, p in kept.items()}


def _restricted(kept: list[int], temperature: float) -> dict[int, float]:
    """softmax(logits / T) over the token ids ``kept`` only."""
    return dict(zip(kept, _softmax([LOGITS[t] for t in kept], temperature)))


def _assert_draws(counts: torch.Tensor, want: dict[int, float]) -> None:
    for t, n in enumerate(counts.tolist()):
        p = want.get(t, 0.0)
        if p == 0:
            assert n == 0, f"token {t} is outside the kept set but was drawn {n} times"
            continue
        sd = math.sqrt(N * p * (1 - p))
        assert abs(n - N * p) <= 5 * sd, f"token {t}: {n} draws, expected {N * p:.0f} ± {sd:.0f}"


def _draw(dtype=torch.float32, **options) -> torch.Tensor:
    gen = torch.Generator().manual_seed(17)
    logits = torch.tensor(LOGITS, dtype=dtype).expand(N, -1)
    tokens = sample(logits, generator=gen, **options)
    assert tokens.shape == (N,) and tokens.dtype == torch.long
    return torch.bincount(tokens, minlength=len(LOGITS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_temperature_draws_softmax(dtype):
    _assert_draws(_draw(dtype, temperature=0.7), _restricted(list(range(len(LOGITS))), 0.7))


def test_top_k_keeps_exactly_k_ties_to_the_smaller_index():
    # the 4th largest value, 0.5, is held by ids 2, 3 and 4: ids 2 and 3 make up the four
    _assert_draws(_draw(temperature=0.7, top_k=4), _restricted([1, 0, 2, 3], 0.7))
    mask = top_k_mask(torch.tensor([LOGITS, LOGITS[::-1]]), 4)
    assert mask.tolist() == [[True, True, True, True, False, False, False],
                             [False, False, True, True, False, True, True]]


def test_top_p_is_the_nucleus_of_the_scaled_distribution():
    # at T = 0.5 the nucleus of 0.8 is {1, 0} (0.77 + 0.10); at T = 1 it holds five ids
    probs = _restricted(list(range(len(LOGITS))), 0.5)
    _assert_draws(_draw(temperature=0.5, top_p=0.8), _nucleus(probs, 0.8))
    # top-k first, then the nucleus of what it kept: {1, 0, 2} (0.39 + 0.24 + 0.18; id 3
    # ties with 2 and is left out, the larger index)
    probs = _restricted([1, 0, 2, 3], 2.0)
    _assert_draws(_draw(temperature=2.0, top_k=4, top_p=0.7), _nucleus(probs, 0.7))


def test_noise_depends_on_generator_row_and_index_only():
    """The documented draw: argmax(logits / T - log(-log U)), U one torch.rand([B, V]) from the
    generator; so a batch's rows draw what they would draw alone, row by row, from that U."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    u = torch.rand(3, 50, generator=torch.Generator().manual_seed(5))
    want = (logits / 0.8 - torch.log(-torch.log(u))).argmax(-1)
    got = sample(logits, 0.8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, want)
    cut = torch.full_like(logits, float("-inf")).scatter(1, logits.topk(5).indices,
                                                         logits.topk(5).values)
    want = (cut / 0.8 - torch.log(-torch.log(u))).argmax(-1)
    assert torch.equal(sample(logits, 0.8, 5, generator=torch.Generator().manual_seed(5)), want)


def test_greedy_and_one_token_ties_go_to_the_smallest_index():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0]])
    assert sample(logits).tolist() == [1]
    gen = torch.Generator().manual_seed(0)
    assert [sample(logits, 1.0, 1, generator=gen).item() for _ in range(20)] == [1] * 20


def test_row_sampling_rows_draw_from_their_own_generators():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    rows = [Sampling(0.9, seed=4).on(torch.device("cpu")), Sampling(),
            Sampling(1.3, top_k=6, seed=9).on(torch.device("cpu"))]
    got = RowSampling(rows)(logits)
    alone = [Sampling(0.9, seed=4).on(torch.device("cpu"))(logits[:1]),
             logits[1:2].argmax(-1),
             Sampling(1.3, top_k=6, seed=9).on(torch.device("cpu"))(logits[2:])]
    assert torch.equal(got, torch.cat(alone))
