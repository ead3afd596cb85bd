"""pytest-benchmark: the early-exit lm_head against torch eager and torch.compile (GPU only).

    python -m pytest perf/ops/bench_lm_head.py --benchmark-only [--benchmark-json=out.json]

Final norm + vocab projection + token choice at Llama-2-7B (vocab 32000) and, marked ``extra``,
Llama-3-8B (128256) shapes, hidden 4096, bf16, batch 1, 8 and 32; greedy and (``extra``) top-k
50 sampling at temperature 0.8. The torch composite materializes fp32 logits, then argmax or topk + softmax
+ multinomial. extra_info: per-call time, kernel launches, GB/s (weight + input read) and its
fraction of a copy's bandwidth measured in the same run (perf/ops/conftest.py). Each round runs
the op ``calls`` times then synchronizes (warm-up rounds first, median reported;
perf/ops/timing.py), so the table's times are per round.
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("GPU benchmark: needs CUDA", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402

from d3kernels.ops.lm_head import lm_head, lm_head_scratch  # noqa: E402
from d3kernels.sampling import sample  # noqa: E402
from perf.ops.timing import OURS, measure  # noqa: E402

H, DTYPE, EPS, TEMPERATURE, TOP_K = 4096, torch.bfloat16, 1e-5, 0.8, 50
VOCABS = {"llama2-7b": 32000, "llama3-8b": 128256}


@pytest.fixture(scope="module")
def weights():
    """One [V, H] projection per model, made at first use (the extra model's is 1 GiB)."""
    made = {}

    def get(model):
        if model not in made:
            made[model] = torch.randn(VOCABS[model], H, dtype=DTYPE, device="cuda") * H ** -0.5
        return made[model]

    return get


def torch_lm_head(x, norm, weight, greedy: bool):
    logits = F.linear(F.rms_norm(x, (H,), norm, EPS), weight).float()
    if greedy:
        return logits.argmax(dim=-1)
    return sample(logits, TEMPERATURE, TOP_K)


_compiled = torch.compile(torch_lm_head, dynamic=False)


@pytest.mark.parametrize("impl", [OURS, "eager", "compile"])
@pytest.mark.parametrize("mode", ["greedy", pytest.param("top_k", marks=pytest.mark.extra)])
@pytest.mark.parametrize("batch", [1, 8, 32])
@pytest.mark.parametrize("model", ["llama2-7b", pytest.param("llama3-8b", marks=pytest.mark.extra)])
def test_lm_head(benchmark, copy_gbps, weights, model, batch, mode, impl):
    weight = weights(model)
    x = torch.randn(batch, H, dtype=DTYPE, device="cuda")
    norm = torch.rand(H, dtype=DTYPE, device="cuda") + 0.5
    greedy = mode == "greedy"
    tokens = torch.empty(batch, dtype=torch.int64, device="cuda")
    seed = torch.tensor([1234], dtype=torch.int64, device="cuda")
    offset = torch.zeros(1, dtype=torch.int64, device="cuda")
    kw = {} if greedy else dict(temperature=TEMPERATURE, top_k=TOP_K, seed=seed, offset=offset)
    # caller-owned output and scratch, as in a captured decode step: the call allocates nothing
    scratch = lm_head_scratch(batch, weight.shape[0], kw.get("top_k"), "cuda")
    fn = {
        OURS: lambda: lm_head(x, norm, weight, EPS, tokens_out=tokens, scratch=scratch, **kw),
        "eager": lambda: torch_lm_head(x, norm, weight, greedy),
        "compile": lambda: _compiled(x, norm, weight, greedy),
    }[impl]
    nbytes = x.element_size() * (weight.numel() + x.numel())
    benchmark.group = f"lm_head {model} B={batch} {mode}"
    benchmark.extra_info.update(impl=impl, model=model, vocab=weight.shape[0], batch=batch,
                                mode=mode, dtype=str(DTYPE))
    measure(benchmark, fn, nbytes=nbytes, copy_gbps=copy_gbps)
