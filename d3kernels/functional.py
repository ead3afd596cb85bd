"""The functional API: every fused Triton op, for other inference stacks to import.

Every op validates its inputs (a ValueError naming the argument, before any launch), takes
``rows`` (the active batch rows, so rows that skip a layer cost nothing; ``kv_backfill`` takes
``cache_rows``, the cache row of each state, instead), accepts caller-owned
output buffers (allocation-free, CUDA-graph capturable) and is registered as a
``torch.ops.d3kernels.*`` custom op with a fake implementation for torch.compile. Every GEMM
that follows an RMSNorm can normalize its input on load (``lm_head`` and ``kv_backfill`` always;
``qkv_rope`` and ``swiglu_gate_up`` given ``norm_weight=``), so a decode layer needs no
``rms_norm`` launch; fp32 inputs multiply in IEEE fp32 everywhere. The kernels themselves live
one per module in ``d3kernels/ops/``.

``rows`` contract: int32 indices into the batch, distinct; -1 marks a padding slot that is
skipped, so a fixed-size list (a CUDA graph's) can hold fewer rows. Values are read on the
device only, never checked (that would be a host sync in the step): an index out of range
reads and writes out of bounds. ``decode_embed`` (a decode step's embedding and bookkeeping) is
here too.
"""
from d3kernels.ops.attention import (attention_decode, attention_decode_splits,
                                     attention_decode_workspace, attention_prefill)
from d3kernels.ops.decode_embed import decode_embed
from d3kernels.ops.kv_backfill import kv_backfill
from d3kernels.ops.lm_head import lm_head
from d3kernels.ops.qkv_rope import qkv_rope
from d3kernels.ops.rms_norm import rms_norm
from d3kernels.ops.swiglu import down_residual, swiglu_gate_up

__all__ = ["attention_decode", "attention_decode_splits", "attention_decode_workspace",
           "attention_prefill", "decode_embed", "down_residual", "kv_backfill", "lm_head",
           "qkv_rope", "rms_norm", "swiglu_gate_up"]
