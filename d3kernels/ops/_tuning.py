"""Autotuning that stays cheap in Triton's interpreter, where every config would run for real."""
from __future__ import annotations

import contextlib
import os

import torch
import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision for inputs of ``dtype``: fp32 multiplies as IEEE fp32 (tf32
    would miss the fp32 tolerance, design §5); fp16/bf16 use the tensor cores as usual ("tf32"
    only names the default setting for them)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def autotune(configs: list[triton.Config], key: list[str], **kwargs):
    """``triton.autotune`` over ``configs`` on a GPU; only the first config in the interpreter.

    The returned tuner keeps the whole list as ``all_configs``, so a test can run each config
    in turn under the interpreter with :func:`only_config`.
    """
    tune = triton.autotune(configs=configs[:1] if interpreting() else configs, key=key, **kwargs)

    def wrap(fn):
        tuner = tune(fn)
        tuner.all_configs = list(configs)
        return tuner

    return wrap


@contextlib.contextmanager
def only_config(tuner, config: triton.Config):
    """Within the block, ``tuner`` (a kernel made by :func:`autotune`) runs ``config`` alone,
    with no tuning and no remembered choice; afterwards it is as it was."""
    saved = tuner.configs, tuner.cache
    tuner.configs, tuner.cache = [config], {}
    try:
        yield
    finally:
        tuner.configs, tuner.cache = saved


def m_bucket(m: int, cap: int, floor: int = 1) -> int:
    """Autotune key for a row or token count: its next power of two clamped to [floor, cap], so
    decode sizes tune apart while every count past cap (prefill lengths) shares one tuning."""
    return max(floor, min(triton.next_power_of_2(m), cap))


# Configs of the QKV-with-RoPE GEMMs (qkv_rope, kv_backfill): a program owns BLOCK_HALF matching
# columns of both halves of one head, so RoPE happens in its epilogue. Small-M configs serve decode
# (a GEMV per row group, bound by the weight read: small N tiles give enough programs to fill the
# GPU); the large-M ones serve prefill. The first one is also the interpreter's.
HALF_HEAD_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_HALF": 16, "BLOCK_K": 256}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_HALF": 32, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_HALF": 16, "BLOCK_K": 512}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_HALF": 32, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_HALF": 32, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_HALF": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_HALF": 32, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_HALF": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]


def prune_half_head(configs, named_args, **kwargs):
    """Drop configs whose half-head block is wider than the (power-of-two padded) half head,
    read from the kernel's ``HALF`` argument."""
    half = max(16, triton.next_power_of_2(named_args["HALF"]))
    return [c for c in configs if c.kwargs["BLOCK_HALF"] <= half]
