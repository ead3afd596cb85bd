"""Paged-cache fixtures of the op tests that write the cache: shuffled block tables in a pool
larger than the rows need, and the pool slots a set of (row, position) pairs lands on."""
from __future__ import annotations

import torch

from tests.ops.conftest import DEVICE


def shuffled_block_table(pages: list[int], num_cols: int, num_pages: int,
                         seed: int) -> torch.Tensor:
    """int32 [len(pages), num_cols] on DEVICE: row b holds ``pages[b]`` distinct pages of a
    ``num_pages`` pool, drawn from a random permutation (so a row's pages are neither contiguous
    nor in order, and some pool pages belong to no row), then -1 (no page) in its other columns.
    """
    need = sum(pages)
    if need > num_pages or max(pages, default=0) > num_cols:
        raise ValueError(f"pages {pages} do not fit {num_cols} columns of a {num_pages}-page pool")
    perm = torch.randperm(num_pages, generator=torch.Generator().manual_seed(seed))[:need]
    table = torch.full((len(pages), num_cols), -1, dtype=torch.int32)
    for b, chunk in enumerate(perm.split(pages)):
        table[b, :len(chunk)] = chunk.to(torch.int32)
    return table.to(DEVICE)


def pages_for(end: torch.Tensor, page_size: int) -> list[int]:
    """Pages each row needs to hold positions 0 .. end[b] - 1 (end: int [B])."""
    return [-(-int(e) // page_size) for e in end.tolist()]


def slot_mask(block_table: torch.Tensor, rows, positions, num_pages: int,
              page_size: int) -> torch.Tensor:
    """bool [P, S] on DEVICE: True at the pool slot of each (rows[i], positions[i]) pair that
    lies behind a page (pairs behind a -1 entry land nowhere)."""
    table = block_table.long().cpu()
    rows, positions = torch.as_tensor(rows).long().cpu(), torch.as_tensor(positions).long().cpu()
    page = table[rows, positions // page_size]
    mask = torch.zeros(num_pages, page_size, dtype=torch.bool)
    mask[page[page >= 0], (positions % page_size)[page >= 0]] = True
    return mask.to(DEVICE)
