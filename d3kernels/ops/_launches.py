"""Counting the kernel launches of a piece of code, for tests and benchmarks (not the hot path).

Triton launches are counted where every kernel goes through, JITFunction.run (InterpretedFunction
under Triton's interpreter), by name. Torch ops are counted with a dispatch mode: every aten op
that does work on a tensor counts as one launch (views, metadata and bare allocations do not);
the d3kernels custom ops are not counted themselves, their Triton kernels are. Host-side copies
(``torch.tensor(list, device=...)``) count too: on a GPU they are transfers inside the step.
"""
from __future__ import annotations

import contextlib
from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

# aten ops that allocate or describe a tensor without launching a kernel
_FREE = {"empty", "empty_strided", "empty_like", "detach", "detach_", "lift_fresh", "alias", "set_",
         "resize_", "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel", "is_same_size"}


class _AtenCounter(TorchDispatchMode):
    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ns = func.namespace
        name = func._schema.name.split("::")[-1]
        if ns == "aten" and not func.is_view and name not in _FREE:
            self.counts[f"aten.{name}"] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_launches():
    """``with count_launches() as c:`` — afterwards ``c`` maps each launched kernel's name
    (Triton kernels by function name, torch ops as ``aten.<op>``) to its launch count;
    ``sum(c.values())`` is the total. Warm up first: autotuning's timing runs would count too."""
    counts: Counter = Counter()
    saved = JITFunction.run, InterpretedFunction.run

    def counted(original):
        def run(self, *args, **kwargs):
            if not kwargs.get("warmup", False):
                counts[self.fn.__name__ if hasattr(self, "fn") else self.__name__] += 1
            return original(self, *args, **kwargs)
        return run

    JITFunction.run, InterpretedFunction.run = counted(saved[0]), counted(saved[1])
    try:
        with _AtenCounter(counts):
            yield counts
    finally:
        JITFunction.run, InterpretedFunction.run = saved
