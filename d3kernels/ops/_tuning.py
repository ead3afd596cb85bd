"""Autotuning that stays cheap in Triton's interpreter, where every config would run for real."""
from __future__ import annotations

import os

import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotune(configs: list[triton.Config], key: list[str], **kwargs):
    """``triton.autotune`` over ``configs`` on a GPU; only the first config in the interpreter."""
    return triton.autotune(configs=configs[:1] if interpreting() else configs, key=key, **kwargs)
