"""rms_norm (optionally fused with the residual add) against the float64 reference."""
from __future__ import annotations

import pytest
import torch

import reference
from d3kernels.ops import rms_norm as rms_norm_mod
from d3kernels.ops._tuning import only_config
from d3kernels.ops.rms_norm import _rms_norm_kernel, rms_norm
from tests.ops.conftest import CUDA, DEVICE, DTYPES, assert_close, gpu, poisoned, randn

EPS = 1e-5


def _inputs(M, H, dtype, seed, pad=0):
    """x with a row stride of H + pad, a weight away from 1, a residual."""
    torch.manual_seed(seed)
    x = randn(M, H + pad, dtype=dtype)[:, :H]
    weight = (1 + 0.5 * randn(H)).to(dtype)
    residual = randn(M, H, dtype=dtype)
    return x, weight, residual


def _ref(x, weight, residual=None):
    """float64 reference of the fused op: (norm(s) * weight, s) with s = x (+ residual)."""
    s = x.double().cpu()
    if residual is not None:
        s = s + residual.double().cpu()
    return reference.rms_norm(s, weight.double().cpu(), EPS), s


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,H,pad", [(1, 96, 0), (5, 200, 8), (3, 1000, 24), (2, 4096, 0)])
def test_rms_norm(dtype, M, H, pad):
    x, weight, _ = _inputs(M, H, dtype, seed=M * 7919 + H + pad)
    out = poisoned((M, H), dtype)
    got, res = rms_norm(x, weight, EPS, out=out)
    assert got is out and res is None
    assert_close(out, _ref(x, weight)[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,H,pad", [(1, 96, 0), (4, 200, 40), (2, 2048, 0)])
@pytest.mark.parametrize("inplace", [False, True])
def test_rms_norm_residual(dtype, M, H, pad, inplace):
    x, weight, residual = _inputs(M, H, dtype, seed=M * 131 + H + pad + inplace)
    ref_out, ref_s = _ref(x, weight, residual)
    res_out = residual if inplace else poisoned((M, H), dtype)
    out, res = rms_norm(x, weight, EPS, residual, out=poisoned((M, H), dtype),
                        residual_out=res_out)
    assert res is res_out
    assert_close(out, ref_out, dtype)
    assert_close(res, ref_s, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_allocates(dtype):
    x, weight, residual = _inputs(3, 96, dtype, seed=11)
    residual_before = residual.clone()
    out, res = rms_norm(x, weight, EPS, residual)
    assert res is not residual and torch.equal(residual, residual_before)
    ref_out, ref_s = _ref(x, weight, residual)
    assert_close(out, ref_out, dtype)
    assert_close(res, ref_s, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual,inplace", [(False, False), (True, False), (True, True)])
def test_rms_norm_chunked(dtype, with_residual, inplace):
    """Rows longer than the block: the two-pass loop over chunks, with a ragged last chunk."""
    M, H = 3, 200
    x, weight, residual = _inputs(M, H, dtype, seed=300 + 2 * with_residual + inplace, pad=5)
    ref_out, ref_s = _ref(x, weight, residual if with_residual else None)
    out = poisoned((M, H), dtype)
    res_out = None
    if with_residual:
        res_out = residual if inplace else poisoned((M, H), dtype)
    rms_norm_mod._launch(x, weight, EPS, residual if with_residual else None, None, out, res_out,
                         max_block=64)
    assert_close(out, ref_out, dtype)
    if with_residual:
        assert_close(res_out, ref_s, dtype)


@pytest.mark.parametrize("index", range(len(_rms_norm_kernel.all_configs)))
@pytest.mark.skipif(CUDA, reason="an interpreter sweep: on a GPU each config costs a compile")
def test_rms_norm_every_config(index):
    """Each warp count the GPU autotuner may pick, fused residual and active rows, fp32."""
    M, H = 4, 200
    x, weight, residual = _inputs(M, H, torch.float32, seed=1000 + index)
    rows = torch.tensor([3, 0], dtype=torch.int32, device=DEVICE)
    ref_out, ref_s = _ref(x, weight, residual)
    out = poisoned((M, H), torch.float32)
    with only_config(_rms_norm_kernel, _rms_norm_kernel.all_configs[index]):
        rms_norm(x, weight, EPS, residual, rows=rows, out=out, residual_out=residual)
    active = rows.long().cpu()
    assert_close(out[active], ref_out[active], torch.float32)
    assert_close(residual[active], ref_s[active], torch.float32)
    assert out[torch.tensor([1, 2])].isnan().all()


def test_rms_norm_large_hidden():
    """H = 16384 runs as two chunks of MAX_BLOCK."""
    x, weight, residual = _inputs(2, 16384, torch.float32, seed=5)
    ref_out, ref_s = _ref(x, weight, residual)
    out, res = rms_norm(x, weight, EPS, residual, out=poisoned((2, 16384), torch.float32))
    assert_close(out, ref_out, torch.float32)
    assert_close(res, ref_s, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunked", [False, True])
def test_rms_norm_rows(dtype, chunked):
    """Only the listed rows are written; the others keep their sentinel values."""
    M, H = 6, 200
    x, weight, residual = _inputs(M, H, dtype, seed=77 + chunked)
    rows = torch.tensor([4, 1, 2], dtype=torch.int32, device=DEVICE)
    ref_out, ref_s = _ref(x, weight, residual)
    out = poisoned((M, H), dtype)
    res = residual.clone()
    if chunked:
        rms_norm_mod._launch(x, weight, EPS, res, rows, out, res, max_block=64)
    else:
        rms_norm(x, weight, EPS, res, rows=rows, out=out, residual_out=res)
    active = rows.long().cpu()
    idle = torch.tensor([0, 3, 5])
    assert_close(out[active], ref_out[active], dtype)
    assert_close(res[active], ref_s[active], dtype)
    assert out[idle].isnan().all(), "rows not listed must not be written"
    assert torch.equal(res[idle], residual[idle]), "rows not listed must keep their residual"


def test_rms_norm_empty_rows():
    x, weight, residual = _inputs(2, 96, torch.float32, seed=1)
    out = poisoned((2, 96), torch.float32)
    rms_norm(x, weight, EPS, residual, rows=torch.empty(0, dtype=torch.int32, device=DEVICE),
             out=out, residual_out=residual)
    assert out.isnan().all()


def test_rms_norm_bad_input():
    x, weight, residual = _inputs(3, 96, torch.float32, seed=2)
    cases = [
        (dict(x=x[0]), "x"),
        (dict(x=x.long()), "x"),
        (dict(weight=weight[:64]), "weight"),
        (dict(residual=residual.half()), "residual"),
        (dict(residual=residual[:2]), "residual"),
        (dict(out=torch.empty(3, 95)), "out"),
        (dict(residual=None, residual_out=residual), "residual_out"),
        (dict(rows=torch.tensor([0, 1], device=DEVICE)), "rows"),
        (dict(rows=torch.zeros(4, dtype=torch.int32, device=DEVICE)), "rows"),
        (dict(eps=-1.0), "eps"),
        (dict(x=x.t().contiguous().t()), "x"),
    ]
    for override, name in cases:
        args = dict(x=x, weight=weight, eps=EPS, residual=residual, rows=None, out=None,
                    residual_out=None) | override
        with pytest.raises(ValueError, match=rf"^{name}\b"):
            rms_norm(args.pop("x"), args.pop("weight"), args.pop("eps"), args.pop("residual"),
                     **args)
    out = torch.empty(3, 96)
    with pytest.raises(ValueError, match="^out and residual_out"):
        rms_norm(x, weight, EPS, residual, out=out, residual_out=out)


def test_rms_norm_opcheck():
    x, weight, residual = _inputs(3, 96, torch.float32, seed=3)
    rows = torch.tensor([2, 0], dtype=torch.int32, device=DEVICE)
    for args in [(x, weight, EPS, None, None, torch.empty_like(x), None),
                 (x, weight, EPS, residual, rows, torch.empty_like(x), residual)]:
        torch.library.opcheck(torch.ops.d3kernels.rms_norm.default, args,
                              test_utils=("test_schema", "test_faketensor",
                                          "test_aot_dispatch_dynamic"))


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,H", [(32, 4096), (2048, 4096), (7, 16384), (3, 11008)])
def test_rms_norm_gpu_shapes(dtype, M, H):
    x, weight, residual = _inputs(M, H, dtype, seed=M + H)
    ref_out, ref_s = _ref(x, weight, residual)
    out, res = rms_norm(x, weight, EPS, residual, out=poisoned((M, H), dtype),
                        residual_out=residual)
    assert_close(out, ref_out, dtype)
    assert_close(res, ref_s, dtype)


@gpu
def test_rms_norm_cuda_graph():
    """The in-place decode call captures and replays with caller-provided buffers."""
    M, H, dtype = 8, 4096, torch.bfloat16
    x, weight, residual = _inputs(M, H, dtype, seed=9)
    rows = torch.tensor([6, 0, 3], dtype=torch.int32, device=DEVICE)
    out = poisoned((M, H), dtype)
    start = residual.clone()
    rms_norm(x, weight, EPS, residual, rows=rows, out=out, residual_out=residual)  # autotune
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rms_norm(x, weight, EPS, residual, rows=rows, out=out, residual_out=residual)
    residual.copy_(start)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref_out, ref_s = _ref(x, weight, start)
    active = rows.long()
    assert_close(out[active], ref_out[active.cpu()], dtype)
    assert_close(residual[active], ref_s[active.cpu()], dtype)
