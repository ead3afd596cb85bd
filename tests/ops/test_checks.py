"""The shared paged-cache input checks (d3kernels/ops/_checks.py): each bad block table or page
size is a ValueError naming the argument; good ones pass."""
import pytest
import torch

from d3kernels.ops._checks import check_block_table, check_page_size

CPU = torch.device("cpu")


def table(*rows):
    return torch.tensor(rows, dtype=torch.int32)


def test_block_table_accepts_pages_in_range_and_minus_one():
    check_block_table(table([3, 0, -1], [1, 1, 2]), 2, 4, CPU)  # shared page 1 is fine
    check_block_table(torch.empty(2, 0, dtype=torch.int32), 2, 4, CPU)  # no pages at all


@pytest.mark.parametrize("bad, batch, match", [
    (table([0, 4]), 1, r"block_table: entries must be in \[-1, P=4\).*got max 4"),
    (table([-2, 0]), 1, r"block_table: entries must be in \[-1, P=4\).*got min -2"),
    (torch.zeros(1, 2, dtype=torch.int64), 1, r"block_table must have dtype torch\.int32"),
    (table([0, 1]), 2, r"block_table must have one row per batch row \(2\)"),
    (torch.zeros(2, dtype=torch.int32), 2, r"block_table must have 2 dimensions"),
    (torch.zeros(2, 4, dtype=torch.int32)[:, ::2], 2, r"block_table must be contiguous"),
    ([[0]], 1, r"block_table must be a torch\.Tensor"),
])
def test_block_table_rejects(bad, batch, match):
    with pytest.raises(ValueError, match=match):
        check_block_table(bad, batch, 4, CPU)


def test_block_table_must_be_on_the_cache_device():
    with pytest.raises(ValueError, match="block_table must be on meta"):
        check_block_table(table([0]), 1, 4, torch.device("meta"))


@pytest.mark.parametrize("size", [1, 2, 16, 64])
def test_page_size_powers_of_two_pass(size):
    assert check_page_size("k_cache", torch.empty(3, size, 2, 4)) == size
    assert check_page_size("k_cache", torch.empty(2, 3, size, 2, 4), dim=2) == size


@pytest.mark.parametrize("size", [0, 3, 12])
def test_page_size_not_a_power_of_two_is_rejected(size):
    with pytest.raises(ValueError, match=rf"k_cache: page_size \(dim 1\) must be a power of two, "
                                         rf"got {size}"):
        check_page_size("k_cache", torch.empty(3, size, 2, 4))


def test_block_table_checked_again_only_when_it_changes(monkeypatch):
    """A table (or a view of it) checked once is not synced again until an in-place write
    bumps its version; then a bad entry is caught. Inference tensors are checked every time."""
    import d3kernels.ops._checks as checks

    calls = []
    real = torch.aminmax
    monkeypatch.setattr(checks.torch, "aminmax", lambda t: calls.append(1) or real(t))
    t = table([0, 1], [2, -1])
    for _ in range(3):
        check_block_table(t, 2, 4, CPU)
        check_block_table(t[:1], 1, 4, CPU)  # another view: checked once too
    assert len(calls) == 2
    check_block_table(t, 2, 5, CPU)  # another pool size: checked again
    t[1, 1] = 4
    with pytest.raises(ValueError, match="got max 4"):
        check_block_table(t, 2, 4, CPU)
    with torch.inference_mode():
        u = table([0, 1])
        check_block_table(u, 1, 4, CPU)
        check_block_table(u, 1, 4, CPU)
    assert len(calls) == 6
