"""Autotuning that stays cheap in Triton's interpreter, where every config would run for real,
and that starts from the winners shipped for the GPU at hand (``d3kernels/ops/tuned/``)."""
from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import re
import warnings
from pathlib import Path
from typing import Iterable

import torch
import triton
import triton.testing


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision for inputs of ``dtype``: fp32 multiplies as IEEE fp32 (tf32
    would miss the fp32 tolerance, design §5); fp16/bf16 use the tensor cores as usual ("tf32"
    only names the default setting for them)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def autotune(configs: list[triton.Config], key: list[str], **kwargs):
    """``triton.autotune`` over ``configs`` on a GPU; only the first config in the interpreter.

    The returned tuner keeps the whole list as ``all_configs``, so a test can run each config
    in turn under the interpreter with :func:`only_config`. On a GPU its first launch prefills
    the choices shipped for that GPU (:func:`apply_tuned`), so only keys without one benchmark.
    """
    if interpreting():
        bench = None  # one config: never benchmarked
    elif autotune_enabled():
        bench = functools.partial(triton.testing.do_bench, warmup=_BENCH_WARMUP_MS,
                                  rep=_BENCH_REP_MS)
    else:
        bench = _no_bench
    tune = triton.autotune(configs=configs[:1] if interpreting() else configs, key=key,
                           do_bench=bench, **kwargs)

    def wrap(fn):
        tuner = tune(fn)
        tuner.all_configs = list(configs)
        if not interpreting():
            _TUNERS[kernel_name(tuner)] = tuner
            launch = tuner.run

            def first_run(*args, **kw):
                # At the first launch, not at import: the GPU's name needs CUDA, and importing
                # d3kernels must not initialize it. Later launches go straight to the tuner.
                tuner.__dict__.pop("run", None)
                _prefill(tuner)
                return launch(*args, **kw)

            tuner.run = first_run
        return tuner

    return wrap


@contextlib.contextmanager
def only_config(tuner, config: triton.Config):
    """Within the block, ``tuner`` (a kernel made by :func:`autotune`) runs ``config`` alone,
    with no tuning and no remembered choice; afterwards it is as it was."""
    if not interpreting():
        _prefill(tuner)  # else a first launch inside the block would prefill the throwaway cache
    saved = tuner.configs, tuner.cache
    tuner.configs, tuner.cache = [config], {}
    try:
        yield
    finally:
        tuner.configs, tuner.cache = saved


# Shipped autotune winners: d3kernels/ops/tuned/<gpu_slug>.json, one file per GPU model, written
# by perf/gpu_check.sh. Environment:
#   D3KERNELS_AUTOTUNE=0     never benchmark: a key with no shipped winner runs the first config
#                            that survives pruning (correctness runs then compile one config a key);
#   D3KERNELS_TUNED_OUT=DIR  also read DIR/<gpu_slug>.json, and at exit write there every choice
#                            this process's tuners hold (shipped, read or tuned here), so a later
#                            process reuses them and the file can be committed as the shipped one.
TUNED_DIR = Path(__file__).with_name("tuned")
# triton.testing.do_bench's defaults (25 ms warm-up, 100 ms of repeats per config) suit long
# kernels; a 10-100 us decode kernel still gets over a hundred timed runs in 25 ms.
_BENCH_WARMUP_MS, _BENCH_REP_MS = 5, 25
_TUNERS: dict[str, object] = {}  # kernel_name -> tuner made by autotune() on a GPU
_TABLES: dict[str, dict[str, dict[tuple, dict]]] = {}  # GPU name -> its load_tuned table
_KEY_NOTE = ("key: the values of the kernel's autotune key arguments, then the dtype of each "
             "tensor argument (the key of Triton's Autotuner.cache, alike in Triton 3.6 and 3.9)")


def autotune_enabled() -> bool:
    return os.environ.get("D3KERNELS_AUTOTUNE", "1") != "0"


def _no_bench(kernel_call, quantiles=None):
    """The tuner's benchmark under D3KERNELS_AUTOTUNE=0: runs nothing and every config ties, so
    the first one left after pruning wins and nothing else compiles."""
    return [0.0, 0.0, 0.0]


def gpu_slug(name: str) -> str:
    """File stem of a GPU's tuned configs: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def kernel_name(tuner) -> str:
    """A tuner's name in the tuned files: the jitted function's module and name."""
    return f"{tuner.base_fn.__module__}.{tuner.base_fn.__name__}"


def config_json(config: triton.Config) -> dict:
    """A Config as JSON: its meta-parameters and the launch options Triton 3.6 and 3.9 share."""
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps,
            "num_stages": config.num_stages, "num_ctas": getattr(config, "num_ctas", 1),
            "maxnreg": getattr(config, "maxnreg", None)}


def _config_id(cfg: dict) -> str:
    return json.dumps(cfg, sort_keys=True, default=str)


def _read_tuned(path: Path) -> tuple[dict[str, dict[tuple, dict]], int]:
    """{kernel name: {key: config_json}} of one file and the count of malformed entries skipped;
    raises OSError, ValueError, KeyError, TypeError or AttributeError for a malformed file."""
    kernels = json.loads(path.read_text())["kernels"]
    entries = [(name, e) for name, es in kernels.items() for e in es]
    table: dict[str, dict[tuple, dict]] = {}
    bad = 0
    for name, e in entries:
        try:
            key, cfg = tuple(e["key"]), e["config"]
            hash(key)
            if not isinstance(cfg, dict) or not isinstance(cfg.get("kwargs"), dict):
                raise TypeError("config is not a config_json")
        except (KeyError, TypeError):
            bad += 1
            continue
        table.setdefault(str(name), {})[key] = cfg
    return table, bad


def load_tuned(gpu: str, dirs: Iterable[Path]) -> dict[str, dict[tuple, dict]]:
    """Winners for ``gpu`` from ``<dir>/<gpu_slug(gpu)>.json`` in each of ``dirs`` (a later file
    wins on the same key): {kernel name: {autotune key: config_json}}. No file, a malformed file
    or entry: skipped with a warning, and the kernels it would have covered autotune as usual."""
    paths = [Path(d) / f"{gpu_slug(gpu)}.json" for d in dirs]
    found = [p for p in paths if p.is_file()]
    if not found:
        warnings.warn(f"d3kernels: no tuned kernel configs for GPU {gpu!r} (looked for "
                      f"{', '.join(map(str, paths))}): each new shape autotunes at its first "
                      "launch", stacklevel=2)
    table: dict[str, dict[tuple, dict]] = {}
    for path in found:
        try:
            read, bad = _read_tuned(path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            warnings.warn(f"d3kernels: ignoring malformed {path} ({exc!r}): autotuning as usual",
                          stacklevel=2)
            continue
        if bad:
            warnings.warn(f"d3kernels: skipped {bad} malformed entries of {path}", stacklevel=2)
        for name, winners in read.items():
            table.setdefault(name, {}).update(winners)
    return table


def apply_tuned(tuner, winners: dict[tuple, dict]) -> int:
    """Prefill ``tuner.cache`` (Triton's Autotuner: key -> chosen Config) with ``winners``
    ({key: config_json}): a launch with such a key then runs that config and benchmarks nothing.
    A winner equal to none of ``tuner.configs`` (the list changed since it was tuned) is skipped
    with a warning; a choice this process already made stays. Returns how many winners apply."""
    by_id = {_config_id(config_json(c)): c for c in tuner.configs}
    stale = 0
    for key, cfg in winners.items():
        config = by_id.get(_config_id(cfg))
        if config is None:
            stale += 1
            continue
        tuner.cache.setdefault(key, config)
    if stale:
        warnings.warn(f"d3kernels: {stale} tuned configs of {kernel_name(tuner)} are not among "
                      "its configs any more: those keys autotune as usual", stacklevel=2)
    return len(winners) - stale


def _tuned_dirs() -> list[Path]:
    out = os.environ.get("D3KERNELS_TUNED_OUT")
    return [TUNED_DIR] + ([Path(out)] if out else [])


def _prefill(tuner) -> None:
    """Apply the current GPU's winners to ``tuner`` once. Never raises: the winners only save
    time, so any failure leaves the tuner autotuning as usual, with a warning."""
    if getattr(tuner, "tuned_gpu", None) is not None:
        return
    tuner.tuned_gpu = ""
    try:
        gpu = torch.cuda.get_device_name()
        if gpu not in _TABLES:
            _TABLES[gpu] = load_tuned(gpu, _tuned_dirs())
        apply_tuned(tuner, _TABLES[gpu].get(kernel_name(tuner), {}))
        tuner.tuned_gpu = gpu
    except Exception as exc:  # noqa: BLE001 -- see the docstring
        warnings.warn(f"d3kernels: tuned configs not applied ({exc!r}): autotuning as usual",
                      stacklevel=2)


def dump_tuned(path: Path, gpu: str) -> int:
    """Write to ``path`` (atomically) every winner known for ``gpu``: the readable entries already
    there, the ones this process read (shipped or earlier) and, for each kernel it launched, the
    choices its tuner holds (read and not stale, or tuned here). Returns the entry count."""
    try:
        table, _ = _read_tuned(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        table = {}
    for name, winners in _TABLES.get(gpu, {}).items():  # kernels this process never launched
        table.setdefault(name, {}).update(winners)
    for name, tuner in _TUNERS.items():  # launched: what was read (less stale configs) + tuned
        if getattr(tuner, "tuned_gpu", None) == gpu:
            table[name] = {key: config_json(c) for key, c in tuner.cache.items()}
    kernels = {}
    for name in sorted(table):
        entries = []
        for key, cfg in table[name].items():
            try:
                entries.append({"key": json.loads(json.dumps(list(key))), "config": cfg})
            except (TypeError, ValueError):  # a key Triton built from a non-JSON value
                continue
        kernels[name] = sorted(entries, key=lambda e: json.dumps(e["key"]))
    data = {"gpu": gpu, "triton": triton.__version__, "torch": torch.__version__,
            "key_note": _KEY_NOTE, "kernels": kernels}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return sum(map(len, kernels.values()))


def _dump_at_exit() -> None:
    """D3KERNELS_TUNED_OUT: write this process's choices for each GPU it tuned on."""
    for gpu in {getattr(t, "tuned_gpu", None) for t in _TUNERS.values()} - {None, ""}:
        try:
            dump_tuned(Path(os.environ["D3KERNELS_TUNED_OUT"]) / f"{gpu_slug(gpu)}.json", gpu)
        except OSError as exc:
            warnings.warn(f"d3kernels: could not write tuned configs ({exc!r})")


# Ties from D3KERNELS_AUTOTUNE=0 are no winners: only a tuning process writes.
if os.environ.get("D3KERNELS_TUNED_OUT") and autotune_enabled() and not interpreting():
    atexit.register(_dump_at_exit)


def m_bucket(m: int, cap: int, floor: int = 1) -> int:
    """Autotune key for a row or token count: its next power of two clamped to [floor, cap], so
    decode sizes tune apart while every count past cap (prefill lengths) shares one tuning."""
    return max(floor, min(triton.next_power_of_2(m), cap))


# Configs of the QKV-with-RoPE GEMMs (qkv_rope, kv_backfill): a program owns BLOCK_HALF matching
# columns of both halves of one head, so RoPE happens in its epilogue. Small-M configs serve decode
# (a GEMV per row group, bound by the weight read: small N tiles give enough programs to fill the
# GPU); the large-M ones serve prefill. The first one is also the interpreter's.
HALF_HEAD_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_HALF": 16, "BLOCK_K": 256}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_HALF": 32, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_HALF": 16, "BLOCK_K": 512}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_HALF": 32, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_HALF": 32, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_HALF": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_HALF": 32, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_HALF": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]


def prune_half_head(configs, named_args, **kwargs):
    """Drop configs whose half-head block is wider than the (power-of-two padded) half head,
    read from the kernel's ``HALF`` argument."""
    half = max(16, triton.next_power_of_2(named_args["HALF"]))
    return [c for c in configs if c.kwargs["BLOCK_HALF"] <= half]
