"""Fixtures shared by the per-op GPU benchmarks; their timing lives in perf/ops/timing.py.

The GPU check (perf/gpu_check.sh) runs ``-m "not extra"``: Llama-2-7B decode shapes only.
"""
from __future__ import annotations

import pytest
import torch

# torch.compile baselines are compiled per shape (dynamic=False, torch.compile's best case): more
# shapes of one function than dynamo's default limit of 8 would silently fall back to eager.
torch._dynamo.config.cache_size_limit = 64


def pytest_configure(config):
    config.addinivalue_line("markers", "extra: shapes beyond the GPU check's Llama-2-7B decode "
                            "set (Llama-3-8B, prefill)")
    # pytest-xdist's own marker (--dist loadgroup), declared for runs without the plugin
    config.addinivalue_line("markers", "xdist_group(name): run the group on one xdist worker")


@pytest.fixture(scope="session")
def copy_gbps() -> float:
    """GB/s of a 1 GiB device-to-device copy, bytes read + written, median of 20, measured once
    per run: the reference for each benchmark's ``bw_fraction``."""
    if not torch.cuda.is_available():
        pytest.skip("GPU benchmark: needs CUDA")
    from perf.report import copy_bandwidth

    return copy_bandwidth(torch.device("cuda"), mbytes=1024, reps=20)


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py here (pytest's default pattern is test_*.py), so ``pytest perf/ops``
    runs every benchmark; files named on the command line pytest collects by itself."""
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
