"""DepthSchedule: the floor, warm-up, clamp, nesting and validation of design.md §2."""
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference
from d3kernels import DepthSchedule


def test_depth_formula_by_hand():
    s = DepthSchedule(alpha=0.9, start=2, head=2, tail=1)
    # i=0 is the prefill; i<=start are warm-up; then floor(10 * 0.9**(i-2)), clamped at 3.
    assert [s.depth(i, 10) for i in range(8)] == [10, 10, 10, 9, 8, 7, 6, 5]
    assert s.depth(40, 10) == 3
    assert DepthSchedule(alpha=0.5, head=1, tail=1, min_depth=5).depth(10, 10) == 5


def test_floor_in_float64():
    # Values a float32 power floors differently: every backend must use the float64 value.
    cases = [(50, 0.58, 1, 28), (75, 0.84, 1, 63), (90, 0.7, 1, 62)]
    for L, alpha, k, expected in cases:
        s = DepthSchedule(alpha=alpha, head=0, tail=0, min_depth=0)
        assert s.depth(k, L) == expected == math.floor(L * alpha ** k)


def test_alpha_one_is_full_depth():
    s = DepthSchedule(alpha=1.0, head=3, tail=2)
    assert all(s.depth(i, 12) == 12 for i in range(100))
    assert s.kept_layers(12, 12) == tuple(range(12))


def test_orders():
    L = 10
    lower = DepthSchedule(head=2, tail=2, order="lower")
    upper = DepthSchedule(head=2, tail=2, order="upper")
    assert lower.skip_order(L) == (2, 3, 4, 5, 6, 7)
    assert upper.skip_order(L) == (7, 6, 5, 4, 3, 2)
    assert lower.kept_layers(7, L) == (0, 1, 5, 6, 7, 8, 9)
    assert upper.kept_layers(7, L) == (0, 1, 2, 3, 4, 8, 9)
    explicit = DepthSchedule(head=2, tail=2, order=[4, 7, 2, 3, 5, 6])
    assert explicit.kept_layers(8, L) == (0, 1, 2, 3, 5, 6, 8, 9)
    assert explicit.kept_layers(4, L) == (0, 1, 8, 9)


@given(L=st.integers(2, 80), alpha=st.floats(0.5, 1.0), start=st.integers(0, 5),
       head=st.integers(0, 4), tail=st.integers(0, 4), extra=st.integers(0, 6),
       order=st.sampled_from(["lower", "upper"]))
def test_matches_reference_and_nests(L, alpha, start, head, tail, extra, order):
    if head + tail > L:
        return
    min_depth = min(L, head + tail + extra)
    s = DepthSchedule(alpha=alpha, start=start, min_depth=min_depth, head=head, tail=tail,
                      order=order)
    s.validate(L)
    previous = None
    for i in range(1, 60):
        n = s.depth(i, L)
        assert n == reference.depth_at(i, L, alpha, start, min_depth)
        kept = s.kept_layers(n, L)
        assert list(kept) == reference.kept_layers(n, L, head, tail, order)
        assert len(kept) == n
        assert set(range(head)) | set(range(L - tail, L)) <= set(kept)  # core layers stay
        if previous is not None:
            assert set(kept) <= previous  # depth never grows within a reply: nested sets
        previous = set(kept)


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=0.0), "alpha"), (dict(alpha=1.5), "alpha"), (dict(alpha=-0.2), "alpha"),
    (dict(alpha="0.9"), "alpha"), (dict(start=-1), "start"), (dict(head=-1), "head"),
    (dict(tail=1.5), "tail"), (dict(head=3, tail=2, min_depth=4), "min_depth"),
    (dict(order="middle"), "order"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DepthSchedule(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(head=6, tail=5), "head \\+ tail"), (dict(head=2, tail=2, min_depth=11), "min_depth"),
    (dict(head=2, tail=2, order=[2, 3, 4]), "permutation"),
    (dict(head=2, tail=2, order=[2, 3, 4, 5, 6, 6]), "permutation"),
])
def test_bad_against_model(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DepthSchedule(**kwargs).validate(10)


def test_save_load_roundtrip(tmp_path):
    s = DepthSchedule(alpha=0.95, start=3, min_depth=9, head=3, tail=2, order=[5, 3, 4, 6, 7])
    s.save(tmp_path / "s.json")
    assert DepthSchedule.load(tmp_path / "s.json") == s
    (tmp_path / "bad.json").write_text('{"alpha": 0.9, "beta": 1}')
    with pytest.raises(ValueError, match="beta"):
        DepthSchedule.load(tmp_path / "bad.json")
