"""pytest-benchmark: qkv_rope against torch eager and torch.compile composites (GPU only).

    python -m pytest perf/ops/bench_qkv_rope.py --benchmark-only [--benchmark-json=out.json]

A decode layer's attention input, bf16, Llama-2-7B (32/32 heads) and, marked ``extra``,
Llama-3-8B (32/8): the input RMSNorm, the QKV projection, RoPE and the cache write, from the
residual stream (d3kernels: one ``qkv_rope(..., norm_weight=...)`` launch). Decode at batch 1, 8,
32 (one token per row, rows at different cache positions; the cost does not depend on the
context) and, ``extra``, a 2048-token prefill. extra_info: per-call time, kernel launches, GB/s
and its fraction of a copy's bandwidth measured in the same run (perf/ops/conftest.py; the
figure for decode), TFLOP/s (for prefill). Each round runs the op ``calls`` times then
synchronizes (warm-up rounds first, median reported; perf/ops/timing.py), so the table's times
are per round.
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("GPU benchmark: needs CUDA", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402

from d3kernels.config import LlamaConfig  # noqa: E402
from d3kernels.model import rope_tables  # noqa: E402
from d3kernels.ops.qkv_rope import qkv_rope  # noqa: E402
from perf.ops.timing import OURS, measure  # noqa: E402

H, D, T_MAX, EPS = 4096, 128, 4096, 1e-5
DTYPE = torch.bfloat16
MODELS = {"llama2-7b": (32, 32), "llama3-8b": (32, 8)}
SHAPES = {"decode-b1": (1, 1), "decode-b8": (8, 1), "decode-b32": (32, 1),
          "prefill-2048": (1, 2048)}


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def torch_qkv_rope(x, norm, w, cos, sin, start, k_cache, v_cache, nh: int, nkv: int):
    """The same op from torch primitives: RMSNorm, linear, RoPE by gathered tables, indexed
    cache write."""
    B, T, _ = x.shape
    h = F.rms_norm(x, (H,), norm, EPS)
    q, k, v = F.linear(h, w).view(B, T, nh + 2 * nkv, D).split([nh, nkv, nkv], dim=2)
    pos = start.long()[:, None] + torch.arange(T, device=x.device)
    cos, sin = cos[pos][:, :, None], sin[pos][:, :, None]
    rows = torch.arange(B, device=x.device)[:, None].expand(B, T)
    k_cache[rows, :, pos] = _rope(k, cos, sin)
    v_cache[rows, :, pos] = v
    return _rope(q, cos, sin)


_compiled = torch.compile(torch_qkv_rope, dynamic=False)


@pytest.mark.parametrize("impl", [OURS, "eager", "compile"])
@pytest.mark.parametrize("shape", [*list(SHAPES)[:3],
                                   pytest.param("prefill-2048", marks=pytest.mark.extra)])
@pytest.mark.parametrize("model", ["llama2-7b", pytest.param("llama3-8b", marks=pytest.mark.extra)])
def test_qkv_rope(benchmark, copy_gbps, model, shape, impl):
    nh, nkv = MODELS[model]
    B, T = SHAPES[shape]
    cfg = LlamaConfig(vocab_size=32000, hidden_size=H, intermediate_size=11008, num_layers=1,
                      num_heads=nh, num_kv_heads=nkv, head_dim=D, rope_theta=500000.0)
    cos, sin = rope_tables(cfg, T_MAX, DTYPE, "cuda")
    x = torch.randn(B, T, H, dtype=DTYPE, device="cuda")
    norm = torch.rand(H, dtype=DTYPE, device="cuda") + 0.5
    w = torch.randn((nh + 2 * nkv) * D, H, dtype=DTYPE, device="cuda") * H ** -0.5
    start = (torch.arange(B, dtype=torch.int32, device="cuda") * 97) % (T_MAX - T + 1)
    k_cache = torch.zeros(B, nkv, T_MAX, D, dtype=DTYPE, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    q_out = torch.empty(B, T, nh, D, dtype=DTYPE, device="cuda")
    args = (x, norm, w, cos, sin, start, k_cache, v_cache, nh, nkv)
    fn = {
        OURS: lambda: qkv_rope(x, w, cos, sin, start, k_cache, v_cache, num_heads=nh,
                               num_kv_heads=nkv, q_out=q_out, norm_weight=norm, eps=EPS),
        "eager": lambda: torch_qkv_rope(*args),
        "compile": lambda: _compiled(*args),
    }[impl]
    elem = x.element_size()
    # weights, norm weight, x, q/k/v written
    nbytes = elem * (w.numel() + H + x.numel() + B * T * (nh + 2 * nkv) * D)
    benchmark.group = f"qkv_rope {model} {shape}"
    benchmark.extra_info.update(impl=impl, model=model, shape=shape, dtype=str(DTYPE))
    measure(benchmark, fn, nbytes=nbytes, flops=2 * B * T * w.numel(), copy_gbps=copy_gbps)
