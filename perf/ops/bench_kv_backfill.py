"""pytest-benchmark: kv_backfill against torch eager and torch.compile composites (GPU only).

    python -m pytest perf/ops/bench_kv_backfill.py --benchmark-only [--benchmark-json=out.json]

Llama-2-7B shapes, bf16: the K/V of 16 skipped layers (8..23, the middle half a D³ step drops)
filled for 1 token (an eager backfill) and for 64 tokens at different rows and positions (a
deferred one), into a paged cache (16-slot pages, each row's pages shuffled in the pool). The
torch composite is the engine's batched path (one norm, one batched matmul over a contiguous run
of layers, cache writes indexed through the block table); "loop" is a Python loop over layers.
``test_kv_backfill_quantized``: the same with the stack quantized weight-only, int4 (group 128) or
int8 (one scale per row), against the torch composite with one weight-only linear per layer
(torch's own kernel where ``QuantizedWeight.prepare_torch`` has one for CUDA, else dequantizing per
call: extra_info ``torch_path``). extra_info: per-call time, kernel launches, GB/s (K/V weights
read + cache written) and its fraction of a copy's bandwidth measured in the same run
(perf/ops/conftest.py); quantized weights count their own bytes (values, scales, offsets). Each
round runs the op ``calls`` times then synchronizes (warm-up rounds first, median reported;
perf/ops/timing.py), so the table's times are per round.
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("GPU benchmark: needs CUDA", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402

from d3kernels.config import LlamaConfig  # noqa: E402
from d3kernels.model import rope_tables  # noqa: E402
from d3kernels.ops.kv_backfill import kv_backfill  # noqa: E402
from d3kernels.quant import quantize  # noqa: E402
from perf.ops.timing import OURS, measure  # noqa: E402

CFG = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                  num_heads=32, num_kv_heads=32, head_dim=128)
# A 512-slot cache: the cost does not depend on its length.
DTYPE, EPS, BATCH, T_MAX, PAGE = torch.bfloat16, 1e-5, 8, 512, 16
FIRST, LAST = 8, 24  # the skipped run [8, 24)
GROUP = {"int4": 128, "int8": None}  # int8: quantize's default, one group per row (G = K)
# One xdist worker for the module in the GPU check's parallel warm-up: one copy of the fixtures.
pytestmark = pytest.mark.xdist_group("kv_backfill")


@pytest.fixture(scope="module")
def state():
    """Stacked Llama-2-7B attention weights, paged cache and its block table (each row's
    T_MAX positions in pages shuffled through a pool with a spare page a row), random, bf16."""
    L, H = CFG.num_layers, CFG.hidden_size
    w_qkv = torch.randn(L, CFG.q_size + 2 * CFG.kv_size, H, dtype=DTYPE, device="cuda") * H ** -0.5
    norm = torch.rand(L, H, dtype=DTYPE, device="cuda") + 0.5
    pages = T_MAX // PAGE
    table = torch.randperm(BATCH * (pages + 1), device="cuda")[:BATCH * pages]
    table = table.view(BATCH, pages).to(torch.int32)
    shape = (L, BATCH * (pages + 1), PAGE, CFG.num_kv_heads, CFG.head_dim)
    k_cache = torch.zeros(shape, dtype=DTYPE, device="cuda")
    v_cache = torch.zeros(shape, dtype=DTYPE, device="cuda")
    cos, sin = rope_tables(CFG, T_MAX, DTYPE, "cuda")
    return w_qkv, norm, table, k_cache, v_cache, cos, sin


@pytest.fixture(scope="module")
def quantized(state):
    """fmt -> (the stacked w_qkv quantized, its K/V rows [L, 2K, H] prepared for torch's kernel,
    the torch path), each format made on first use."""
    made = {}

    def get(fmt):
        if fmt not in made:
            wq = quantize(state[0], fmt, GROUP[fmt])
            w_kv = wq[:, CFG.q_size:].contiguous()
            made[fmt] = wq, w_kv, w_kv.prepare_torch(DTYPE)
        return made[fmt]

    return get


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def torch_backfill(x, norm, w_qkv, cos, sin, positions, rows, table, k_cache, v_cache, a: int,
                   b: int):
    """The engine's batched path for the contiguous run of layers [a, b)."""
    normed = F.rms_norm(x, (x.shape[-1],), None, EPS) * norm[a:b, None, :]  # [n, M, H]
    kv = torch.matmul(normed, w_qkv[a:b, CFG.q_size:].transpose(1, 2))  # [n, M, 2K]
    _rope_and_write(kv, cos, sin, positions, rows, table, k_cache, v_cache, a, b)


def torch_backfill_quantized(x, norm, w_kv, cos, sin, positions, rows, table, k_cache, v_cache,
                             a: int, b: int):
    """The batched path with quantized K/V rows w_kv [L, 2K, H]: one weight-only linear per
    layer (no batched quantized matmul in torch)."""
    normed = F.rms_norm(x, (x.shape[-1],), None, EPS) * norm[a:b, None, :]  # [n, M, H]
    kv = torch.stack([w_kv[layer].linear(normed[layer - a]) for layer in range(a, b)])
    _rope_and_write(kv, cos, sin, positions, rows, table, k_cache, v_cache, a, b)


def _rope_and_write(kv, cos, sin, positions, rows, table, k_cache, v_cache, a: int, b: int):
    """RoPE on K of kv [n, M, 2K] (layers [a, b)) and the cache writes through the table."""
    n, M = kv.shape[:2]
    k, v = kv.view(n, M, 2, CFG.num_kv_heads, CFG.head_dim).unbind(2)
    pos = positions.long()
    c, s = cos[pos][:, None], sin[pos][:, None]
    page, slot = table.long()[rows.long(), pos // PAGE], pos % PAGE
    k_cache[a:b][:, page, slot] = _rope(k, c, s)
    v_cache[a:b][:, page, slot] = v


def torch_backfill_loop(x, norm, w_qkv, cos, sin, positions, rows, table, k_cache, v_cache, a,
                        b):
    """One layer at a time: the per-layer launches a fused backfill replaces."""
    for layer in range(a, b):
        torch_backfill(x, norm, w_qkv, cos, sin, positions, rows, table, k_cache, v_cache,
                       layer, layer + 1)


_compiled = torch.compile(torch_backfill, dynamic=False)


def _tokens(tokens):
    """x [tokens, H] and distinct random (position, row) pairs; the layers [FIRST, LAST)."""
    gen = torch.Generator().manual_seed(tokens)
    flat = torch.randperm(BATCH * T_MAX, generator=gen)[:tokens]
    positions = (flat % T_MAX).to(torch.int32).cuda()
    rows = (flat // T_MAX).to(torch.int32).cuda()
    x = torch.randn(tokens, CFG.hidden_size, dtype=DTYPE, device="cuda")
    return x, positions, rows, torch.arange(FIRST, LAST, dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("impl", [OURS, "eager", "compile", "loop"])
@pytest.mark.parametrize("tokens", [1, 64])
def test_kv_backfill(benchmark, copy_gbps, state, tokens, impl):
    w_qkv, norm, table, k_cache, v_cache, cos, sin = state
    x, positions, rows, layers = _tokens(tokens)
    args = (x, norm, w_qkv, cos, sin, positions, rows, table, k_cache, v_cache)
    fn = {
        OURS: lambda: kv_backfill(x, layers, norm, w_qkv, cos, sin, positions, rows, table,
                                  k_cache, v_cache, q_size=CFG.q_size, eps=EPS),
        "eager": lambda: torch_backfill(*args, FIRST, LAST),
        "compile": lambda: _compiled(*args, FIRST, LAST),
        "loop": lambda: torch_backfill_loop(*args, FIRST, LAST),
    }[impl]
    n = LAST - FIRST
    nbytes = x.element_size() * n * (2 * CFG.kv_size * CFG.hidden_size + tokens * 2 * CFG.kv_size)
    benchmark.group = f"kv_backfill llama2-7b layers={n} tokens={tokens}"
    benchmark.extra_info.update(impl=impl, tokens=tokens, layers=n, dtype=str(DTYPE))
    measure(benchmark, fn, nbytes=nbytes, copy_gbps=copy_gbps)


@pytest.mark.parametrize("impl", [OURS, "eager"])
# 1 token (an eager backfill, not the default timing) extra: the GPU check's budget
@pytest.mark.parametrize("tokens", [pytest.param(1, marks=pytest.mark.extra), 64])
@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_kv_backfill_quantized(benchmark, copy_gbps, state, quantized, fmt, tokens, impl):
    _, norm, table, k_cache, v_cache, cos, sin = state
    wq, w_kv, torch_path = quantized(fmt)
    x, positions, rows, layers = _tokens(tokens)
    fn = {
        OURS: lambda: kv_backfill(x, layers, norm, wq, cos, sin, positions, rows, table,
                                  k_cache, v_cache, q_size=CFG.q_size, eps=EPS),
        "eager": lambda: torch_backfill_quantized(x, norm, w_kv, cos, sin, positions, rows,
                                                  table, k_cache, v_cache, FIRST, LAST),
    }[impl]
    n = LAST - FIRST
    nbytes = w_kv[FIRST:LAST].nbytes + x.element_size() * n * tokens * 2 * CFG.kv_size
    benchmark.group = f"kv_backfill llama2-7b layers={n} tokens={tokens} {fmt}"
    benchmark.extra_info.update(impl=impl, tokens=tokens, layers=n, dtype=str(DTYPE),
                                weights=fmt, group_size=wq.group_size, torch_path=torch_path)
    measure(benchmark, fn, nbytes=nbytes, copy_gbps=copy_gbps)
