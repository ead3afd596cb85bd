"""pytest-benchmark suite: one decode step at several depths, and whole D³ generations.

    python -m pytest perf/test_bench_decode.py --benchmark-only [--benchmark-json=out.json]

Random SmolLM2-135M-shaped weights (no download), batch 1, float32 on the CPU (bfloat16 on a
GPU). Compare medians within one run: a depth-d step should cost about d/L of a full step
plus the LM head.
"""
import pytest
import torch

from d3kernels import DepthSchedule, LlamaD3
from d3kernels.sampling import Sampling

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
CONTEXT = 256


@pytest.fixture(scope="module")
def model():
    return LlamaD3.random("smollm2-135m", dtype=DTYPE, device=DEVICE, seed=0)


@pytest.fixture(scope="module")
def primed(model):
    """A cache holding CONTEXT tokens of a random prompt."""
    prompt = torch.randint(0, model.config.vocab_size, (1, CONTEXT), device=DEVICE)
    cache = model.new_cache(1, CONTEXT + 1)
    with torch.inference_mode():
        model.prefill(prompt, [CONTEXT], cache, Sampling())
    return cache


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("depth", [30, 20, 10, 6])
def test_decode_step(benchmark, model, primed, depth):
    kept = DepthSchedule(alpha=0.5, head=4, tail=2).kept_layers(depth, model.config.num_layers)
    token = torch.tensor([17], device=DEVICE)

    def step():
        with torch.inference_mode():
            model.decode_step(token, [CONTEXT], kept, primed, Sampling())
        _sync()

    benchmark.extra_info["depth"] = depth
    benchmark(step)


@pytest.mark.parametrize("alpha", [1.0, 0.98, 0.95])
def test_generate_64_tokens(benchmark, model, alpha):
    prompt = torch.randint(0, model.config.vocab_size, (32,)).tolist()
    schedule = DepthSchedule(alpha=alpha, head=4, tail=2)
    result = benchmark.pedantic(lambda: model.generate(prompt, 64, schedule, stop_tokens=()),
                                rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(layer_ratio=result.stats.layer_ratio,
                                work_ratio=result.stats.work_ratio)
