"""Bad input to generate: a clear error naming the argument, raised before any work."""
import pytest
import torch

from d3kernels import DepthSchedule, LlamaD3


@pytest.fixture
def fresh():
    return LlamaD3.random("tiny", max_seq_len=64)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[]), "prompts"),
    (dict(prompts=[[1, 2], []]), r"prompts\[1\] is empty"),
    (dict(prompts=[1, 2, 512]), "token id 512 is outside the vocabulary"),
    (dict(prompts=[[3], [-1]]), "token id -1"),
    (dict(prompts="hello"), "no tokenizer"),
    (dict(prompts=[[1.5, 2]]), r"prompts\[0\]"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(prompts=[list(range(50))], max_new_tokens=15), "exceeds the cache"),
    (dict(schedule=DepthSchedule(head=6, tail=3)), "head \\+ tail"),
    (dict(schedule=DepthSchedule(head=2, tail=2, min_depth=9)), "min_depth"),
    (dict(schedule=0.9), "schedule"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=1.5), "top_p"),
    (dict(stop_tokens=[999]), "stop_tokens"),
])
def test_bad_generate_arguments(fresh, kwargs, match):
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fresh.generate(args.pop("prompts"), **args)
    with pytest.raises(ValueError, match=match):
        args2 = dict(prompts=[[1, 2, 3]], max_new_tokens=4) | kwargs
        fresh.stream(args2.pop("prompts"), **args2)  # checked when called, not when iterated
    assert fresh.cache is None  # nothing was allocated or run


def test_bad_call_leaves_cache_intact(fresh):
    fresh.generate([[1, 2, 3]], 5, stop_tokens=())
    k, v = fresh.cache.k.clone(), fresh.cache.v.clone()
    with pytest.raises(ValueError):
        fresh.generate([[1, 2, 3], [7, 600]], 5)
    assert torch.equal(fresh.cache.k, k) and torch.equal(fresh.cache.v, v)
