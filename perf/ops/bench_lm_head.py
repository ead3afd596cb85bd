"""pytest-benchmark: the early-exit lm_head against torch eager and torch.compile (GPU only).

    python -m pytest perf/ops/bench_lm_head.py --benchmark-only [--benchmark-json=out.json]

Final norm + vocab projection + token choice at Llama-2-7B (vocab 32000) and, marked ``extra``,
Llama-3-8B (128256) shapes, hidden 4096, bf16, batch 1, 8 and 32; greedy and (``extra``) top-k
50 sampling at temperature 0.8. The torch composite materializes fp32 logits, then argmax or
topk + softmax + multinomial. ``test_lm_head_quantized``: the same with the weight quantized from
the bf16 one, int8 with a scale per row (torch's int8 kernel's layout) and int4 in groups of 128,
and, marked ``extra``, int8 in GGUF Q8_0's groups of 32 (SmolLM2's LM head) and torch.compile;
torch runs its own weight-only kernel where d3kernels.quant has one for the device (extra_info
``torch_path``) and dequantizes per call elsewhere. extra_info: per-call time, kernel launches,
GB/s (weight + input read; a quantized weight's values, scales and offsets) and its fraction of
a copy's bandwidth measured in the same run (perf/ops/conftest.py). Each round runs the op
``calls`` times then synchronizes (warm-up rounds first, median reported; perf/ops/timing.py),
so the table's times are per round.
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("GPU benchmark: needs CUDA", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402

from d3kernels.ops.lm_head import lm_head, lm_head_scratch  # noqa: E402
from d3kernels.quant import linear, quantize  # noqa: E402
from d3kernels.sampling import sample  # noqa: E402
from perf.ops.timing import OURS, measure  # noqa: E402

H, DTYPE, EPS, TEMPERATURE, TOP_K = 4096, torch.bfloat16, 1e-5, 0.8, 50
VOCABS = {"llama2-7b": 32000, "llama3-8b": 128256}
# quantize()'s format and group size (None: one group per row)
FORMATS = {"int8": ("int8", None), "int4": ("int4", 128), "int8-g32": ("int8", 32)}


@pytest.fixture(scope="module")
def weights():
    """One [V, H] projection per model and format ("bf16" or a FORMATS key), made at first use
    (the extra model's is 1 GiB in bf16), with the path torch's composite takes for it."""
    made = {}

    def get(model, fmt="bf16"):
        if (model, "bf16") not in made:
            w = torch.randn(VOCABS[model], H, dtype=DTYPE, device="cuda") * H ** -0.5
            made[model, "bf16"] = w, "linear"
        if (model, fmt) not in made:
            w = quantize(made[model, "bf16"][0], *FORMATS[fmt])
            made[model, fmt] = w, w.prepare_torch(DTYPE)
        return made[model, fmt]

    return get


def torch_lm_head(x, norm, weight, greedy: bool):
    logits = linear(F.rms_norm(x, (H,), norm, EPS), weight).float()
    if greedy:
        return logits.argmax(dim=-1)
    return sample(logits, TEMPERATURE, TOP_K)


_compiled = torch.compile(torch_lm_head, dynamic=False)


@pytest.mark.parametrize("impl", [OURS, "eager", "compile"])
@pytest.mark.parametrize("mode", ["greedy", pytest.param("top_k", marks=pytest.mark.extra)])
@pytest.mark.parametrize("batch", [1, 8, 32])
@pytest.mark.parametrize("model", ["llama2-7b", pytest.param("llama3-8b", marks=pytest.mark.extra)])
def test_lm_head(benchmark, copy_gbps, weights, model, batch, mode, impl):
    _bench(benchmark, copy_gbps, *weights(model), model, batch, mode, impl)


@pytest.mark.parametrize("impl", [OURS, "eager", pytest.param("compile", marks=pytest.mark.extra)])
@pytest.mark.parametrize("mode", ["greedy", pytest.param("top_k", marks=pytest.mark.extra)])
# batch 8 extra: the GPU check times batch 1 and 32, within its budget
@pytest.mark.parametrize("batch", [1, pytest.param(8, marks=pytest.mark.extra), 32])
@pytest.mark.parametrize("fmt", ["int8", "int4", pytest.param("int8-g32", marks=pytest.mark.extra)])
@pytest.mark.parametrize("model", ["llama2-7b", pytest.param("llama3-8b", marks=pytest.mark.extra)])
def test_lm_head_quantized(benchmark, copy_gbps, weights, model, fmt, batch, mode, impl):
    _bench(benchmark, copy_gbps, *weights(model, fmt), model, batch, mode, impl, fmt)


def _bench(benchmark, copy_gbps, weight, torch_path, model, batch, mode, impl, fmt="bf16"):
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
    nbytes = weight.nbytes + x.nbytes
    benchmark.group = f"lm_head {model} B={batch} {mode}" + ("" if fmt == "bf16" else f" {fmt}")
    benchmark.extra_info.update(impl=impl, model=model, vocab=weight.shape[0], batch=batch,
                                mode=mode, dtype=str(DTYPE), weight=fmt,
                                torch_path=None if impl == OURS else torch_path)
    measure(benchmark, fn, nbytes=nbytes, copy_gbps=copy_gbps)
