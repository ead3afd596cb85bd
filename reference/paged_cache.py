"""Paged KV cache <-> contiguous rows, in plain torch: the oracle side of the paged ops' tests.

A paged pool holds fixed-size pages [P, S, ...]; a block table [B, NP] lists, per row, the page
holding each run of S positions: position t of row b is ``pool[block_table[b, t // S], t % S]``.
-1 marks a page not allocated.
"""
import torch


def gather_pages(pool: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """pool [P, S, *rest], block_table int [B, NP] -> [B, NP*S, *rest]: each row's positions in
    order; positions behind a -1 entry are zeros."""
    table = block_table.long().to(pool.device)
    rows = pool[table.clamp(min=0)]  # [B, NP, S, *rest]
    rows = rows.masked_fill((table < 0).view(*table.shape, *([1] * (pool.dim() - 1))), 0)
    return rows.flatten(1, 2)


def scatter_pages(rows: torch.Tensor, block_table: torch.Tensor, pool: torch.Tensor) -> None:
    """The inverse of gather_pages: writes rows [B, NP*S, *rest] into pool [P, S, *rest] through
    block_table [B, NP]; positions behind a -1 entry are dropped. A page listed twice gets one of
    its writers' values (callers give shared pages equal contents)."""
    B, NP = block_table.shape
    S = pool.shape[1]
    table = block_table.long().to(pool.device)
    paged = rows.reshape(B, NP, S, *rows.shape[2:])
    keep = table >= 0
    pool[table[keep]] = paged[keep].to(pool.dtype)
