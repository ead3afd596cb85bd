"""pytest-benchmark: the early-exit lm_head against torch eager and torch.compile (GPU only).

    python -m pytest perf/ops/bench_lm_head.py --benchmark-only [--benchmark-json=out.json]

Final norm + vocab projection + token choice at Llama-3-8B (vocab 128256) and Llama-2-7B (32000)
shapes, hidden 4096, bf16, batch 1, 8 and 32; greedy and top-k 50 sampling at temperature 0.8.
The torch composite materializes fp32 logits, then argmax or topk + softmax + multinomial.
extra_info: per-call time, GB/s (weight + input read) and its fraction of a copy's bandwidth
measured in the same run (perf/ops/conftest.py), and on the triton rows the speedups. Each round
runs the op ``calls`` times then synchronizes (warm-up rounds first, median reported;
perf/ops/timing.py), so the table's times are per round.
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("GPU benchmark: needs CUDA", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402

from d3kernels.ops.lm_head import lm_head  # noqa: E402
from d3kernels.sampling import sample  # noqa: E402
from perf.ops.timing import measure, record_speedups  # noqa: E402

H, DTYPE, EPS, TEMPERATURE, TOP_K = 4096, torch.bfloat16, 1e-5, 0.8, 50
VOCABS = {"llama3-8b": 128256, "llama2-7b": 32000}


@pytest.fixture(scope="module")
def weights():
    return {name: torch.randn(V, H, dtype=DTYPE, device="cuda") * H ** -0.5
            for name, V in VOCABS.items()}


def torch_lm_head(x, norm, weight, greedy: bool):
    logits = F.linear(F.rms_norm(x, (H,), norm, EPS), weight).float()
    if greedy:
        return logits.argmax(dim=-1)
    return sample(logits, TEMPERATURE, TOP_K)


_compiled = torch.compile(torch_lm_head)


@pytest.mark.parametrize("impl", ["triton", "eager", "compile"])
@pytest.mark.parametrize("mode", ["greedy", "top_k"])
@pytest.mark.parametrize("batch", [1, 8, 32])
@pytest.mark.parametrize("model", list(VOCABS))
def test_lm_head(benchmark, copy_gbps, weights, model, batch, mode, impl):
    weight = weights[model]
    x = torch.randn(batch, H, dtype=DTYPE, device="cuda")
    norm = torch.rand(H, dtype=DTYPE, device="cuda") + 0.5
    greedy = mode == "greedy"
    tokens = torch.empty(batch, dtype=torch.int64, device="cuda")
    seed = torch.tensor([1234], dtype=torch.int64, device="cuda")
    offset = torch.zeros(1, dtype=torch.int64, device="cuda")
    kw = {} if greedy else dict(temperature=TEMPERATURE, top_k=TOP_K, seed=seed, offset=offset)
    fns = {
        "triton": lambda: lm_head(x, norm, weight, EPS, tokens_out=tokens, **kw),
        "eager": lambda: torch_lm_head(x, norm, weight, greedy),
        "compile": lambda: _compiled(x, norm, weight, greedy),
    }
    nbytes = x.element_size() * (weight.numel() + x.numel())
    benchmark.extra_info.update(model=model, vocab=weight.shape[0], batch=batch, mode=mode,
                                impl=impl)
    per_call = measure(benchmark, fns[impl], nbytes=nbytes, copy_gbps=copy_gbps)
    if impl == "triton":
        record_speedups(benchmark, per_call, {k: f for k, f in fns.items() if k != impl})
