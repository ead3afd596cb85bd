"""Compile d3kernels' Triton kernels for Hopper (sm90) without a GPU, in every variant that
tests/ops/test_gpu_compile.py checks. Triton's interpreter never compiles a kernel, so GPU-only
compile errors (a return type mismatch, a bad cast, too much shared memory) pass every CPU test.

    python -m tests.ops.gpu_compile_worker KERNEL...   (names: the keys of KERNELS)

prints one JSON line: {"unavailable": why} when triton cannot compile for the target here at all
(no NVIDIA backend, no ptxas: a one-line kernel fails), else {"results": [one per variant:
kernel, group, mode, full, ok, error, shared, seconds]}. Must run without TRITON_INTERPRET=1 (the
interpreter replaces jit functions). Signatures come from each kernel's own argument list; the
table below gives only what the arguments do not say.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time
from typing import NamedTuple

import torch
import triton
import triton.language as tl

ACTS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# WFMT (d3kernels/ops/_quant.py) -> (name, weight data type, GROUP). A float weight's scale and
# offset pointers are the data itself (weight_operand's placeholder), GROUP 1.
FORMATS = {0: ("float", None, 1), 1: ("int8", "i8", 32), 2: ("int4", "u8", 128)}
# Pointer element types by argument name where not the activation dtype; scalars are i32 unless
# listed as floats.
PTR_TYPES = {**dict.fromkeys(["rows_ptr", "start_ptr", "len_ptr", "ctx_ptr", "pos_ptr",
                              "crow_ptr", "layers_ptr", "sidx_ptr", "cnt_ptr", "bt_ptr"], "i32"),
             **dict.fromkeys(["seed_ptr", "offset_ptr", "cand_ptr", "tok_ptr", "tokens_ptr"],
                             "i64"),
             **dict.fromkeys(["valid_ptr", "written_ptr", "mark_ptr"], "u8"),
             **dict.fromkeys(["po_ptr", "plse_ptr", "logits_ptr"], "fp32")}
FLOAT_SCALARS = {"eps", "inv_temp", "qk_scale"}
SM90 = ("cuda", 90, 32)
SM90_SHARED = 232448  # bytes of shared memory one block may use on Hopper (227 KiB)
# The self-check of test_gpu_compile.py: compile with the early-return load_weight_tile that
# hid a GPU-only "return type mismatch" from the interpreter tests.
EARLY_RETURN_ENV = "D3K_GPU_COMPILE_EARLY_RETURN"
FULL_ENV = "D3K_GPU_COMPILE_FULL"  # =1: every variant down to a cubin (minutes)
FULL_GROUPS = ("float-fp32", "int4-bf16", "fp32", "bf16", "any")  # see full_compile


class Spec(NamedTuple):
    """One kernel: its module under d3kernels.ops and name; whether it takes a weight through
    load_weight_tile (w_ptr/ws_ptr/wo_ptr, WFMT, GROUP); the activation dtypes it runs in (()
    when no argument has one); constexprs its launcher derives from shapes (the autotuned ones
    come from its first config); and modes: the settings of its flags, each with the pointer
    arguments its launcher passes as None (compiled as None constexprs, as a launch does)."""

    module: str
    name: str
    quantized: bool = False
    acts: tuple = tuple(ACTS)
    const: dict = {}
    modes: dict = {"default": {}}
    ptr_types: dict = {}


KERNELS = {
    "qkv_rope": Spec(
        "qkv_rope", "_qkv_rope_kernel", quantized=True,
        const=dict(NUM_HEADS=9, NUM_KV=3, PAGE_SIZE=16),
        modes={"rows+norm": dict(HAS_ROWS=True, HAS_NORM=True),
               "bare": dict(HAS_ROWS=False, HAS_NORM=False, nw_ptr=None)}),
    "kv_backfill": Spec("kv_backfill", "_kv_backfill_kernel", quantized=True,
                        const=dict(NUM_KV=3, PAGE_SIZE=16)),
    "gate_up": Spec(
        "swiglu", "_gate_up_kernel", quantized=True,
        modes={"rows+norm": dict(HAS_ROWS=True, HAS_NORM=True),
               "bare": dict(HAS_ROWS=False, HAS_NORM=False, rows_ptr=None, nw_ptr=None)}),
    "down_residual": Spec(
        "swiglu", "_down_residual_kernel", quantized=True,
        modes={"rows+stash": dict(HAS_ROWS=True, HAS_STASH=True, PAGE=16),
               "bare": dict(HAS_ROWS=False, HAS_STASH=False, PAGE=1, rows_ptr=None,
                            stash_ptr=None, sidx_ptr=None, pos_ptr=None, bt_ptr=None)}),
    "lm_head_tile": Spec(
        "lm_head", "_lm_head_tile_kernel", quantized=True, const=dict(BLOCK_V=128),
        modes={"rows+logits+noise": dict(HAS_ROWS=True, WRITE_LOGITS=True, NOISE=True, KP=1),
               "top_k": dict(HAS_ROWS=False, WRITE_LOGITS=False, NOISE=False, KP=8)}),
    "lm_head_top_candidates": Spec(
        "lm_head", "_top_candidates_kernel", acts=(), const=dict(KP=8, BLOCK=2048),
        ptr_types=dict(out_ptr="i64")),
    "lm_head_select": Spec(
        "lm_head", "_select_kernel", acts=(),
        modes={"rows+top_k+advance": dict(HAS_ROWS=True, TOP_K_SAMPLE=True, ADVANCE=True,
                                          BLOCK_R=1, BLOCK=2048),
               "greedy": dict(HAS_ROWS=False, TOP_K_SAMPLE=False, ADVANCE=False, BLOCK_R=16,
                              BLOCK=128)}),
    "attention_prefill": Spec(
        "attention", "_prefill_kernel",
        # the first config's BLOCK_N is 32: 64-slot pages load one page index per key tile,
        # 16-slot pages one per key
        modes={"rows+valid, D=64, GQA 3, page 64": dict(
                   HAS_ROWS=True, HAS_VALID=True, NUM_HEADS=9, GROUP=3, HEAD_DIM=64,
                   PAGE_SIZE=64),
               "bare, D=128, MHA, page 16": dict(
                   HAS_ROWS=False, HAS_VALID=False, NUM_HEADS=32, GROUP=1, HEAD_DIM=128,
                   PAGE_SIZE=16, rows_ptr=None, valid_ptr=None)}),
    "attention_decode": Spec(
        "attention", "_decode_kernel",
        modes={"rows+valid, 4 splits, D=64, GQA 3, page 64": dict(
                   HAS_ROWS=True, HAS_VALID=True, KV_HEADS=3, GROUP=3, GROUP_PAD=16,
                   HEAD_DIM=64, PAGE_SIZE=64, NUM_SPLITS=4, SPLITS_PAD=4),
               "bare, 1 split, D=128, MHA, page 16": dict(
                   HAS_ROWS=False, HAS_VALID=False, KV_HEADS=32, GROUP=1, GROUP_PAD=16,
                   HEAD_DIM=128, PAGE_SIZE=16, NUM_SPLITS=1, SPLITS_PAD=2, rows_ptr=None,
                   valid_ptr=None)}),
    "decode_embed": Spec(
        "decode_embed", "_decode_embed_kernel", const=dict(BLOCK_H=1024),
        modes={"rows+written": dict(HAS_ROWS=True, HAS_WRITTEN=True, PAGE_SIZE=16, BLOCK_L=32),
               "bare": dict(HAS_ROWS=False, HAS_WRITTEN=False, PAGE_SIZE=1, BLOCK_L=1)}),
    "rms_norm": Spec(
        "rms_norm", "_rms_norm_kernel",
        modes={"residual+rows, one chunk": dict(HAS_RESIDUAL=True, HAS_ROWS=True, BLOCK_H=1024,
                                                NUM_CHUNKS=1),
               "bare, two chunks": dict(HAS_RESIDUAL=False, HAS_ROWS=False, BLOCK_H=8192,
                                        NUM_CHUNKS=2, res_ptr=None, rows_ptr=None)}),
}


def groups(spec: Spec) -> list[tuple[int | None, str | None]]:
    """(WFMT, activation dtype) pairs a kernel is compiled for; None where it has none."""
    fmts = list(FORMATS) if spec.quantized else [None]
    return [(f, a) for f in fmts for a in (spec.acts or (None,))]


def group_name(wfmt: int | None, act: str | None) -> str:
    return "-".join(x for x in (None if wfmt is None else FORMATS[wfmt][0], act) if x) or "any"


def variants(spec: Spec):
    """(group, mode, fn, signature, constexprs, options) of every variant of ``spec``'s kernel,
    its first mode first."""
    from triton.runtime.jit import JITFunction

    from d3kernels.ops._tuning import dot_precision

    kernel = getattr(importlib.import_module(f"d3kernels.ops.{spec.module}"), spec.name)
    fn = kernel if isinstance(kernel, JITFunction) else kernel.fn  # an autotuner's .fn
    config = getattr(kernel, "all_configs", [None])[0]
    options = {} if config is None else dict(num_warps=config.num_warps,
                                              num_stages=config.num_stages)
    for wfmt, act in groups(spec):
        ptr_types = dict(PTR_TYPES, **spec.ptr_types)
        fixed = dict(spec.const, **(config.kwargs if config else {}))
        if act is not None and "DOT_PRECISION" in fn.arg_names:
            fixed["DOT_PRECISION"] = dot_precision(ACTS[act])
        if wfmt is not None:
            _, data, fixed["GROUP"] = FORMATS[wfmt]
            fixed["WFMT"] = wfmt
            scale = "fp16" if data else act
            ptr_types.update(w_ptr=data or act, ws_ptr=scale, wo_ptr=scale)
        for mode, settings in spec.modes.items():
            values = dict(fixed, **settings)
            unknown = set(values) - set(fn.arg_names)
            if unknown:
                raise KeyError(f"{spec.name} has no arguments {sorted(unknown)}: fix KERNELS")
            sig, const = {}, {}
            for p in fn.params:
                if p.is_constexpr or values.get(p.name, 0) is None:
                    if p.name not in values:
                        raise KeyError(f"{spec.name}: no value for constexpr {p.name}: add it "
                                       f"to KERNELS in {__file__}")
                    sig[p.name], const[p.name] = "constexpr", values[p.name]
                elif p.name.endswith("_ptr"):
                    if not (ptr_types.get(p.name) or act):
                        raise KeyError(f"{spec.name}: no element type for {p.name}: add it to "
                                       f"PTR_TYPES or the kernel's ptr_types in {__file__}")
                    sig[p.name] = "*" + (ptr_types.get(p.name) or act)
                else:
                    sig[p.name] = "fp32" if p.name in FLOAT_SCALARS else "i32"
            yield group_name(wfmt, act), mode, fn, sig, const, options


def full_compile(spec: Spec, group: str, mode: str) -> bool:
    """Whether a variant is compiled down to a cubin (LLVM, ptxas, shared memory) rather than
    through Triton's front end and sm90 TTGIR passes only (where type errors surface), which
    keeps a cold run near a minute on 2 cores: the first mode of the fp32 (float weight) group,
    the largest shared-memory tiles, and of the bf16 (int4 weight) group, the deployed path, or
    of the one group of a kernel without activations; every variant with FULL_ENV=1."""
    first = mode == next(iter(spec.modes))
    return os.environ.get(FULL_ENV) == "1" or first and group in FULL_GROUPS


def compile_sm90(fn, sig: dict, const: dict, options: dict, full: bool = True,
                 cached: bool = True) -> int | None:
    """Compile for sm90, pointers 16-byte aligned as torch allocates them: through every stage
    to a cubin (full), else through TTGIR only; with triton.compile and its cache where full and
    cached. Returns the shared memory the kernel needs in bytes (None short of full)."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig[name].startswith("*")}
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    target = GPUTarget(*SM90)
    if full and cached:
        kernel = triton.compile(src, target=target, options=options)
        if not kernel.asm.get("cubin"):
            raise RuntimeError("triton.compile produced no cubin")
        return kernel.metadata.shared
    # triton.compile's own steps (alike in Triton 3.6 and 3.9), outside its cache
    backend = make_backend(target)
    opts = backend.parse_options(dict(options))
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    stages = {}
    backend.add_stages(stages, opts, src.language)
    module = src.make_ir(target, opts, backend.get_codegen_implementation(opts),
                         backend.get_module_map(), context)
    metadata = {}
    for ext in list(stages)[list(stages).index("ttir"):] if full else ("ttir", "ttgir"):
        module = stages[ext](module, metadata)
    if full and not module:
        raise RuntimeError("no cubin")
    return metadata["shared"] if full else None


def unavailable() -> str | None:
    """Why triton cannot compile for sm90 here at all (a one-line kernel fails), or None."""
    try:
        compile_sm90(_copy, dict(x_ptr="*fp32", y_ptr="*fp32", n="i32", BLOCK="constexpr"),
                     dict(BLOCK=16), {}, cached=False)  # so a cached cubin cannot hide ptxas
    except Exception as exc:  # noqa: BLE001 -- any failure here means no compiler for the target
        return f"triton cannot compile a trivial kernel for sm90 here: {_brief(exc)}"
    return None


@triton.jit
def _copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def _brief(exc: Exception) -> str:
    """What a CompilationError wraps (its callee's, which wraps e.g. the TypeError), and the
    kernel's source line where the outermost one was raised; other errors as they are."""
    from triton.compiler.errors import CompilationError

    root = exc
    while isinstance(root, CompilationError) and (root.__cause__ or root.__context__):
        root = root.__cause__ or root.__context__
    message = " ".join(str(root).split())[:600]
    code = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and ln.strip() != "^"]
    where = f" (at: {code[-1]})" if root is not exc and code else ""
    return f"{type(root).__name__}: {message}{where}"


@triton.jit
def _early_return_load_weight_tile(w_ptr, s_ptr, o_ptr, offs_k, offs_n, mask, stride_w,
                                   stride_s, GROUP: tl.constexpr, WFMT: tl.constexpr):
    """load_weight_tile before 7e3535c, for the self-check only: Triton compiles the code after
    the float weight's early return too, so a 16-bit float tile meets the fp32 dequantized one."""
    n = offs_n[None, :].to(tl.int64)
    k = offs_k[:, None]
    if WFMT == 0:
        return tl.load(w_ptr + n * stride_w + k, mask=mask, other=0.0)
    g = k // GROUP
    scale = tl.load(s_ptr + n * stride_s + g, mask=mask, other=0.0).to(tl.float32)
    if WFMT == 1:
        q = tl.load(w_ptr + n * stride_w + k, mask=mask, other=0).to(tl.float32)
        return q * scale
    byte = tl.load(w_ptr + n * stride_w + k // 2, mask=mask, other=0).to(tl.int32)
    u = (byte >> ((k & 1) * 4)) & 15
    offset = tl.load(o_ptr + n * stride_s + g, mask=mask, other=0.0).to(tl.float32)
    return u.to(tl.float32) * scale + offset


def main(kernels: list[str]) -> dict:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: the interpreter replaces jit functions")
    why = unavailable()
    if why:
        return {"unavailable": why}
    if os.environ.get(EARLY_RETURN_ENV) == "1":  # in every module that calls it
        for spec in KERNELS.values():
            if spec.quantized:
                module = importlib.import_module(f"d3kernels.ops.{spec.module}")
                module.load_weight_tile = _early_return_load_weight_tile
    results = []
    for kernel in kernels:
        spec = KERNELS[kernel]
        for group, mode, fn, sig, const, options in variants(spec):
            full = full_compile(spec, group, mode)
            start = time.perf_counter()
            try:
                shared = compile_sm90(fn, sig, const, options, full)
                error = None if shared is None or shared <= SM90_SHARED else \
                    f"needs {shared} bytes of shared memory, sm90 has {SM90_SHARED}"
            except Exception as exc:  # noqa: BLE001 -- reported per variant
                shared, error = None, _brief(exc)
            results.append(dict(kernel=kernel, group=group, mode=mode, full=full,
                                ok=error is None, error=error, shared=shared,
                                seconds=round(time.perf_counter() - start, 2)))
    return {"results": results}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
