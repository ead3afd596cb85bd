"""Input checks shared by every op wrapper: a clear ValueError naming the argument, before
launch."""
from __future__ import annotations

import os
import weakref

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t, *, ndim: int | None = None, shape: tuple | None = None,
                 dtype=None, device: torch.device | None = None, contiguous: bool = True) -> None:
    """Raise ValueError unless ``t`` is a tensor with the given rank, shape, dtype(s) and device.

    ``shape`` may hold None for a free dimension; ``dtype`` is one dtype or a tuple of them.
    ``contiguous`` checks that the innermost dimension is dense (stride 1), which is what the
    kernels need; outer strides are passed to the kernels.
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {list(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = ["*" if s is None else s for s in shape]
            raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if dtype is not None:
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        if t.dtype not in allowed:
            raise ValueError(f"{name} must have dtype {' or '.join(map(str, allowed))}, "
                             f"got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    if contiguous and t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides "
                         f"{list(t.stride())}")


def check_rows(rows, batch: int, device: torch.device) -> None:
    """``rows``: None (all rows) or an int32 tensor [R] of distinct row indices in [0, batch);
    an entry -1 is a padding slot, skipped (so a fixed-size row list, e.g. in a CUDA graph,
    can hold fewer rows).

    Values are not read here: that would be a host sync inside a captured decode step. The
    contract is the caller's: an index >= batch (or below -1) reads and writes out of bounds.
    LlamaD3 checks its row lists on the host before they reach the device.
    """
    if rows is None:
        return
    check_tensor("rows", rows, ndim=1, dtype=torch.int32, device=device)
    if rows.numel() > batch:
        raise ValueError(f"rows has {rows.numel()} entries but the batch has only {batch} rows")


def check_launchable(t: torch.Tensor) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors under its interpreter."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise ValueError(f"Triton kernels need CUDA tensors (got {t.device}); on a machine without a "
                     "GPU set TRITON_INTERPRET=1 before importing triton to run them in Triton's "
                     "interpreter, or use backend='torch'")


def check_page_size(name: str, cache: torch.Tensor, dim: int = 1) -> int:
    """Page size S = ``cache.shape[dim]`` of a paged KV cache ([P, S, Hkv, D], or [L, P, S, Hkv,
    D] with ``dim=2``); it must be a power of two (1 allowed), so the kernels split a position
    into page and offset with a shift and a mask. Returns S."""
    page_size = cache.shape[dim]
    if page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"{name}: page_size (dim {dim}) must be a power of two, got {page_size}")
    return page_size


def check_block_table(block_table, batch: int, num_pages: int, device: torch.device) -> None:
    """``block_table``: int32 [batch, NP] on ``device``, last dim dense; entry [b, i] is the page
    (of a cache with ``num_pages`` pages) holding positions i*S..(i+1)*S-1 of row b, -1 for none.

    Values are checked to lie in [-1, num_pages) with one host sync (min and max read together),
    because an out-of-range page index reads and writes outside the cache; then not again until
    torch's version counter says the table changed (in-place writes through any view count;
    writes that bypass autograd's counter, e.g. through ``.data`` or a kernel of your own, do
    not: pass a fresh tensor then). The check is skipped
    while a CUDA graph is being captured on ``device``, and while torch.compile traces the
    caller (a data-dependent branch there is a graph break, an error under fullgraph): a sync
    would break either, and both replay tables the caller built (and checked) on the host.
    """
    check_tensor("block_table", block_table, ndim=2, dtype=torch.int32, device=device)
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table must have one row per batch row ({batch}), got shape "
                         f"{list(block_table.shape)}")
    if block_table.numel() == 0:
        return
    if torch.compiler.is_compiling():
        return
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    base = block_table if block_table._base is None else block_table._base
    key = (block_table.storage_offset(), tuple(block_table.shape), block_table.stride(),
           num_pages)
    version = _version(block_table)
    seen = _CHECKED_TABLES.get(id(base))
    if version is not None and seen is not None and seen.get(key) == version:
        return
    lo, hi = torch.stack(torch.aminmax(block_table)).tolist()  # one device-to-host copy
    if lo < -1 or hi >= num_pages:
        bad = f"max {hi}" if hi >= num_pages else f"min {lo}"
        raise ValueError(f"block_table: entries must be in [-1, P={num_pages}) (page indices of "
                         f"k_cache, -1 for none), got {bad}")
    if version is not None:
        if id(base) not in _CHECKED_TABLES:  # forget it with the tensor: ids are reused
            _CHECKED_TABLES[id(base)] = {}
            weakref.finalize(base, _CHECKED_TABLES.pop, id(base), None)
        _CHECKED_TABLES[id(base)][key] = version


# A table checked once is not checked again until it changes: id of its base tensor (dropped
# when the tensor dies, so a reused id or address is never mistaken for it) -> {(offset, shape,
# strides, pages): version counter when checked}. A decode step passes the same table to every
# layer's kernels; without this each launch would sync. Inference tensors keep no version
# counter: always checked.
_CHECKED_TABLES: dict[int, dict[tuple, int]] = {}


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference tensor
        return None
