"""pytest-benchmark: qkv_rope against torch eager and torch.compile composites (GPU only).

    python -m pytest perf/ops/bench_qkv_rope.py --benchmark-only [--benchmark-json=out.json]

A decode layer's attention input, bf16, Llama-2-7B (32/32 heads) and, marked ``extra``, Llama-3-8B
(32/8): the input RMSNorm, the QKV projection, RoPE and the write into a paged cache (16-slot
pages, each row's pages shuffled in the pool), from the residual stream (d3kernels: one
``qkv_rope(..., norm_weight=...)`` launch). Decode at batch 1, 8, 32 (one token per
row, rows at different cache positions; the cost does not depend on the context) and, ``extra``, a
2048-token prefill. ``test_qkv_rope_quantized``: the same shapes with a weight-only int4 (group
128) or int8 (one scale per row) w_qkv against the torch composite on torch's own weight-only
kernel where ``QuantizedWeight.prepare_torch`` has one for CUDA, else dequantizing per call
(extra_info ``torch_path`` says which). extra_info: per-call time, kernel launches, GB/s and its
fraction of a copy's bandwidth measured in the same run (perf/ops/conftest.py; the figure for
decode), TFLOP/s (for prefill). Each round runs the op ``calls`` times then synchronizes (warm-up
rounds first, median reported; perf/ops/timing.py), so the table's times are per round.
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("GPU benchmark: needs CUDA", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402

from d3kernels.config import LlamaConfig  # noqa: E402
from d3kernels.model import rope_tables  # noqa: E402
from d3kernels.ops.qkv_rope import qkv_rope  # noqa: E402
from d3kernels.quant import linear, quantize  # noqa: E402
from perf.ops.timing import OURS, measure  # noqa: E402

H, D, T_MAX, EPS, PAGE = 4096, 128, 4096, 1e-5, 16
DTYPE = torch.bfloat16
MODELS = {"llama2-7b": (32, 32), "llama3-8b": (32, 8)}
SHAPES = {"decode-b1": (1, 1), "decode-b8": (8, 1), "decode-b32": (32, 1),
          "prefill-2048": (1, 2048)}
SHAPE_PARAMS = [*list(SHAPES)[:3], pytest.param("prefill-2048", marks=pytest.mark.extra)]
MODEL_PARAMS = ["llama2-7b", pytest.param("llama3-8b", marks=pytest.mark.extra)]
# Quantized weights: batch 8 is extra too (the GPU check times batch 1 and 32, within its budget).
QUANT_SHAPE_PARAMS = ["decode-b1", pytest.param("decode-b8", marks=pytest.mark.extra),
                      "decode-b32", pytest.param("prefill-2048", marks=pytest.mark.extra)]
GROUP = {"int4": 128, "int8": None}  # int8: quantize's default, one group per row (G = K)


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def torch_qkv_rope(x, norm, w, cos, sin, start, k_cache, v_cache, block_table, nh: int,
                   nkv: int):
    """The same op from torch primitives: RMSNorm, linear (a float or quantized w), RoPE by
    gathered tables, cache write indexed through the block table."""
    B, T, _ = x.shape
    h = F.rms_norm(x, (H,), norm, EPS)
    q, k, v = linear(h, w).view(B, T, nh + 2 * nkv, D).split([nh, nkv, nkv], dim=2)
    pos = start.long()[:, None] + torch.arange(T, device=x.device)
    cos, sin = cos[pos][:, :, None], sin[pos][:, :, None]
    rows = torch.arange(B, device=x.device)[:, None].expand(B, T)
    page, slot = block_table.long()[rows, pos // PAGE], pos % PAGE
    k_cache[page, slot] = _rope(k, cos, sin)
    v_cache[page, slot] = v
    return _rope(q, cos, sin)


_compiled = torch.compile(torch_qkv_rope, dynamic=False)


def _bench(benchmark, copy_gbps, model, shape, impl, fmt=None):
    """Time ``impl`` on one shape; ``fmt``: w_qkv quantized to "int4"/"int8" (None: bf16)."""
    nh, nkv = MODELS[model]
    B, T = SHAPES[shape]
    cfg = LlamaConfig(vocab_size=32000, hidden_size=H, intermediate_size=11008, num_layers=1,
                      num_heads=nh, num_kv_heads=nkv, head_dim=D, rope_theta=500000.0)
    cos, sin = rope_tables(cfg, T_MAX, DTYPE, "cuda")
    x = torch.randn(B, T, H, dtype=DTYPE, device="cuda")
    norm = torch.rand(H, dtype=DTYPE, device="cuda") + 0.5
    w = torch.randn((nh + 2 * nkv) * D, H, dtype=DTYPE, device="cuda") * H ** -0.5
    # weights read: the format's own bytes (values, scales, offsets) when quantized
    w_bytes = w.numel() * w.element_size()
    if fmt is not None:
        w = quantize(w, fmt, GROUP[fmt])
        w_bytes = w.nbytes
        benchmark.extra_info.update(group_size=w.group_size, torch_path=w.prepare_torch(DTYPE))
    start = (torch.arange(B, dtype=torch.int32, device="cuda") * 97) % (T_MAX - T + 1)
    # every row's T_MAX positions in pages shuffled through a pool with a spare page a row
    pages = T_MAX // PAGE
    block_table = torch.randperm(B * (pages + 1), device="cuda")[:B * pages].view(B, pages)
    block_table = block_table.to(torch.int32)
    k_cache = torch.zeros(B * (pages + 1), PAGE, nkv, D, dtype=DTYPE, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    q_out = torch.empty(B, T, nh, D, dtype=DTYPE, device="cuda")
    args = (x, norm, w, cos, sin, start, k_cache, v_cache, block_table, nh, nkv)
    fn = {
        OURS: lambda: qkv_rope(x, w, cos, sin, start, k_cache, v_cache, block_table,
                               num_heads=nh, num_kv_heads=nkv, q_out=q_out, norm_weight=norm,
                               eps=EPS),
        "eager": lambda: torch_qkv_rope(*args),
        "compile": lambda: _compiled(*args),
    }[impl]
    elem = x.element_size()
    # weights, norm weight, x, q/k/v written (the block table's few bytes left out)
    nbytes = w_bytes + elem * (H + x.numel() + B * T * (nh + 2 * nkv) * D)
    benchmark.group = f"qkv_rope {model} {shape}" + (f" {fmt}" if fmt else "")
    benchmark.extra_info.update(impl=impl, model=model, shape=shape, dtype=str(DTYPE),
                                weights=fmt or str(DTYPE))
    flops = 2 * B * T * (nh + 2 * nkv) * D * H
    measure(benchmark, fn, nbytes=nbytes, flops=flops, copy_gbps=copy_gbps)


@pytest.mark.parametrize("impl", [OURS, "eager", "compile"])
@pytest.mark.parametrize("shape", SHAPE_PARAMS)
@pytest.mark.parametrize("model", MODEL_PARAMS)
def test_qkv_rope(benchmark, copy_gbps, model, shape, impl):
    _bench(benchmark, copy_gbps, model, shape, impl)


@pytest.mark.parametrize("impl", [OURS, "eager"])
@pytest.mark.parametrize("shape", QUANT_SHAPE_PARAMS)
@pytest.mark.parametrize("model", MODEL_PARAMS)
@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_qkv_rope_quantized(benchmark, copy_gbps, fmt, model, shape, impl):
    _bench(benchmark, copy_gbps, model, shape, impl, fmt)
