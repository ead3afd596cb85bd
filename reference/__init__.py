"""The oracle: plain PyTorch of every op, the Llama forward, the D³ schedule and D³ generation by
masked full-sequence recompute (design.md §2). Readable over fast; run it in float64.

Imports nothing from ``d3kernels``, so a test of either backend against it never tests code
against itself. Model weights are dicts named like Hugging Face Llama checkpoints; ``cfg`` is any
object with the attributes of ``d3kernels.LlamaConfig`` (duck-typed on purpose).
"""
from reference.attention import causal_gqa_attention
from reference.d3_generate import d3_generate
from reference.llama import llama_forward
from reference.lm_head import lm_head
from reference.mlp import swiglu_mlp
from reference.paged_cache import gather_pages, scatter_pages
from reference.quant import dequantize, dequantize_gguf, dequantize_int4, dequantize_int8
from reference.rmsnorm import rms_norm
from reference.rope import apply_rope, rope_inv_freq
from reference.schedule import depth_at, kept_layers, skip_order

__all__ = ["apply_rope", "causal_gqa_attention", "d3_generate", "depth_at", "dequantize",
           "dequantize_gguf", "dequantize_int4", "dequantize_int8", "gather_pages", "kept_layers",
           "llama_forward", "lm_head", "rms_norm", "rope_inv_freq", "scatter_pages", "skip_order",
           "swiglu_mlp"]
