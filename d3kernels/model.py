"""LlamaD3: a Llama-family decoder whose decode step runs any subset of its layers (D³).

Weights are stacked per kind ([L, ...] tensors), so a layer is an index and a run of layers a
slice; the KV cache is static and written by index. ``prefill`` and ``decode_step`` are separate;
``generate`` (d3kernels.generation) drives them with a DepthSchedule. The passes themselves run
in a backend (d3kernels.backend): d3kernels.torch_backend or d3kernels.triton_backend.
"""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import torch

from d3kernels import quant
from d3kernels.backend import Backend
from d3kernels.config import PRESETS, LlamaConfig
from d3kernels.kv_cache import KVCache
from d3kernels.parallel import tensor_parallel
from d3kernels.quant import QuantizedWeight
from d3kernels.sampling import Sampling
from d3kernels.schedule import DepthSchedule, skipped_runs
from d3kernels.stats import WeightBytes
from d3kernels.torch_backend import TorchBackend

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "torch", "triton")
BACKFILL_MODES = ("propagate", "mask")
BACKFILL_TIMINGS = ("eager", "deferred")


def hf_weight_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama checkpoint must hold, Hugging Face names -> shapes."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, H), "model.norm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, H)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (cfg.q_size, H),
            p + "self_attn.k_proj.weight": (cfg.kv_size, H),
            p + "self_attn.v_proj.weight": (cfg.kv_size, H),
            p + "self_attn.o_proj.weight": (H, cfg.q_size),
            p + "post_attention_layernorm.weight": (H,),
            p + "mlp.gate_proj.weight": (I, H),
            p + "mlp.up_proj.weight": (I, H),
            p + "mlp.down_proj.weight": (H, I),
        })
    return shapes


def rope_tables(cfg: LlamaConfig, length: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, head_dim] for rotate-half RoPE, computed in float64 then cast."""
    d = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    s = cfg.rope_scaling
    if s is not None:  # llama3: slow long wavelengths by `factor`, blend the middle band
        wavelen = 2 * math.pi / inv_freq
        lo = s["original_max_position_embeddings"] / s["low_freq_factor"]
        hi = s["original_max_position_embeddings"] / s["high_freq_factor"]
        smooth = ((s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"])
                  / (s["high_freq_factor"] - s["low_freq_factor"]))
        blended = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
        inv_freq = torch.where(wavelen < hi, inv_freq,
                               torch.where(wavelen > lo, inv_freq / s["factor"], blended))
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype=dtype, device=device), angles.sin().to(dtype=dtype, device=device)


def _resolve_backend(backend: str, dtype: torch.dtype, device: torch.device) -> str:
    """'auto' is triton on CUDA and torch elsewhere; triton needs a GPU or Triton's
    interpreter."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and dtype != torch.float64 else "torch"
    if backend == "triton":
        if dtype == torch.float64:
            raise ValueError("backend='triton' runs float32, float16 and bfloat16; use "
                             "backend='torch' for float64")
        if device.type != "cuda" and not (device.type == "cpu"
                                          and os.environ.get("TRITON_INTERPRET") == "1"):
            raise ValueError(f"backend='triton' needs a CUDA device (got {device}); on a CPU set "
                             "TRITON_INTERPRET=1 before importing triton to run the kernels in "
                             "Triton's interpreter (slow, for tests), or use backend='torch'")
    return backend


def _check_quantize(quantize, group_size, config: LlamaConfig | None = None) -> int | None:
    """Check LlamaD3's quantize/group_size before any loading (config None: what can be
    checked without it). With a config, returns the group size to quantize with: one for every
    projection, int4's default the largest of GROUP_SIZES dividing all their input sizes."""
    if quantize not in quant.QUANTIZE:
        raise ValueError(f"quantize must be one of {quant.QUANTIZE}, got {quantize!r}")
    if group_size is not None and (quantize not in quant.FORMATS
                                   or group_size not in quant.GROUP_SIZES):
        raise ValueError(f"group_size must be one of {quant.GROUP_SIZES} and goes with "
                         f"quantize='int4' or 'int8', got group_size={group_size!r} with "
                         f"quantize={quantize!r}")
    if config is None or quantize not in quant.FORMATS:
        return group_size
    ks = {"hidden_size (QKV, gate/up, LM head)": config.hidden_size,
          "num_heads * head_dim (O)": config.q_size,
          "intermediate_size (down)": config.intermediate_size}
    if group_size is None and quantize == "int4":
        group_size = next((g for g in sorted(quant.GROUP_SIZES, reverse=True)
                           if all(k % g == 0 for k in ks.values())), None)
        if group_size is None:
            raise ValueError(f"quantize='int4' needs a group size dividing every projection's "
                             f"input size {sorted(set(ks.values()))}; none of "
                             f"{quant.GROUP_SIZES} does")
    for what, k in ks.items():
        if group_size is not None and k % group_size:
            raise ValueError(f"group_size {group_size} does not divide {what} = {k}")
    return group_size


def _is_int(x) -> bool:
    """An int index (bool is an int in Python, but never a row, slot or layer here)."""
    return isinstance(x, int) and not isinstance(x, bool)


def _guarded(method):
    """A model pass that, under tensor parallelism, tears the process group down before any
    exception leaves it (``TensorParallel.guard``), so no other rank waits for this one."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if self.tp is None:
            return method(self, *args, **kwargs)
        with self.tp.guard():
            return method(self, *args, **kwargs)
    return run


@functools.lru_cache(maxsize=4096)
def _layer_bits(layers: tuple[int, ...]) -> int:
    """A layer set as a bitmask (host int: cheap to intersect every step)."""
    return sum(1 << j for j in layers)


class LlamaD3:
    """A Llama decoder for D³ generation. Build it with ``from_pretrained``, ``from_hf`` or
    ``random``.

    Stacked weights (L layers, H hidden, I intermediate, Q = heads·head_dim,
    K = kv_heads·head_dim):
    ``attn_norm`` [L, H], ``w_qkv`` [L, Q+2K, H], ``w_o`` [L, H, Q], ``mlp_norm`` [L, H],
    ``w_gate_up`` [L, 2I, H], ``w_down`` [L, H, I], ``embed`` and ``lm_head`` [V, H] (one tensor
    when tied), ``final_norm`` [H]; all in ``dtype`` on ``device``, except that the projections
    and the LM head may be :class:`d3kernels.quant.QuantizedWeight` (weight-only int4/int8).

    quantize: ``"auto"`` (default) keeps each weight in the checkpoint's own format (a GGUF's
    Q4_0/Q4_1/Q8_0 stay quantized, floats stay float); ``None`` dequantizes everything to
    ``dtype``; ``"int8"``/``"int4"`` quantize the float projections and LM head at load (int4
    asymmetric per group of ``group_size``, default the largest of 128, 64, 32 dividing every
    projection's input size; int8 symmetric per row, or per group of ``group_size``).
    Embeddings and norms stay in ``dtype`` (a tied LM head is quantized beside a float
    embedding). ``dtype`` is the activations' dtype.

    backend: ``"torch"`` (:class:`d3kernels.torch_backend.TorchBackend`, torch's own ops),
    ``"triton"`` (:class:`d3kernels.triton_backend.TritonBackend`, the fused kernels) or
    ``"auto"`` (triton on CUDA, torch elsewhere). The model checks every call's arguments and
    keeps the bookkeeping both share (``written`` marks, deferred-backfill debts, byte counts),
    then its backend runs the pass (the interface: :class:`d3kernels.backend.Backend`).

    backfill: what a skipped layer leaves in the KV cache (design.md §2). ``"propagate"``
    (default): its K/V at that position are computed from the residual stream as it reaches
    the layer. ``"mask"``: they are never written and attention at that layer ignores them
    (both backends: the triton attention kernels read ``KVCache.written`` as a validity mask).
    backfill_timing (propagate only): ``"deferred"`` (default) keeps the residual entering each
    run of skipped layers (one hidden vector per run and position, ``KVCache.stash``) and
    fills the missing entries only when something will read them, one batched launch per
    group of layers: before a pass that reads that history (a prefill on that cache, e.g. a
    chat's next turn) or on :meth:`flush_backfill`. Within one reply no pass reads them (the
    kept sets are nested), and a cache thrown away (a new generation on the model's cache, a
    released engine row) never pays for them. ``"eager"`` fills them in every decode step.
    Once flushed, both give the same cache. Both can be overridden per call (``generate``,
    ``Conversation``, ``Engine``).

    tp: tensor parallelism over the ranks of the torch.distributed process group (design.md
    §11, d3kernels.parallel): every rank builds the model with the same arguments and runs the
    same calls (generate, chat, the engine), and every rank gets the same tokens. ``weights``
    may hold each tensor whole (this rank slices its part) or already as this rank's shard
    (``from_pretrained`` reads only those). ``config`` is then the rank's own (its heads, KV
    heads and intermediate size: its KV cache holds only its heads), ``full_config`` the
    model's; the weights are the rank's shards, ``embed`` and ``lm_head`` its vocabulary rows
    ``tp.vocab_range``. The LM head exchanges candidates, not logits (design.md §11). Both
    backends (the triton one without CUDA graphs). A pass that raises on one rank tears the
    group down, and the others raise :class:`d3kernels.parallel.TensorParallelError` from
    their next collective.
    """

    def __init__(self, config: LlamaConfig, weights: dict[str, torch.Tensor], *, tokenizer=None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 backend: str = "auto", max_seq_len: int | None = None,
                 cuda_graphs: bool = True, backfill: str = "propagate",
                 backfill_timing: str = "deferred", quantize: str | None = "auto",
                 group_size: int | None = None, tp: int = 1):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.tp = tensor_parallel(tp, config)
        self.full_config = config
        expected = hf_weight_shapes(config)
        if self.tp is not None:  # this rank's parts: the rest of the model is per rank
            # a tied model's head may come apart (state_dict of a quantized one): split it too
            whole = {"lm_head.weight": (config.vocab_size, config.hidden_size), **expected}
            weights = {n: self.tp.take(n, w, whole[n]) if n in whole else w
                       for n, w in weights.items()}
            expected = {n: self.tp.shard_shape(n, shape) for n, shape in expected.items()}
            config = self.tp.local_config()
        group_size = _check_quantize(quantize, group_size, config)
        device = torch.device(device)
        backend = _resolve_backend(backend, dtype, device)
        for name, shape in expected.items():
            if name not in weights:
                raise ValueError(f"checkpoint is missing tensor {name!r} (expected shape "
                                 f"{list(shape)})")
            if tuple(weights[name].shape) != shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape "
                                 f"{list(weights[name].shape)}, expected {list(shape)}")
        self.config = config
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.device = device
        self.backend = backend
        self.backfill, self.backfill_timing = "propagate", "deferred"
        self.backfill, self.backfill_timing = self.resolve_backfill(backfill, backfill_timing)
        self.max_seq_len = max_seq_len or min(config.max_position_embeddings, 8192)

        if quantize in quant.FORMATS:
            head_name = ("lm_head.weight" if "lm_head.weight" in weights
                         else "model.embed_tokens.weight")
            floats = [n for n in expected if (len(expected[n]) == 2 and "embed" not in n
                                              or n == head_name)
                      and not isinstance(weights[n], QuantizedWeight)]
            if not floats:
                raise ValueError(f"quantize={quantize!r}: the checkpoint has no float projection "
                                 f"weights to quantize (they are already quantized, e.g. "
                                 f"{next(iter(self._sources(weights)))}); use quantize='auto' "
                                 f"to keep them or None to dequantize them")

        def get(name):  # a float weight in dtype
            w = weights[name]
            w = w.dequantize(dtype) if isinstance(w, QuantizedWeight) else w
            return w.to(device=self.device, dtype=dtype)

        quantizing = quantize in quant.FORMATS

        def dense(w):  # a weight in float on the device: dtype, or as stored for quantizing
            if isinstance(w, QuantizedWeight):
                return w.to(self.device).dequantize(torch.float32 if quantizing else dtype)
            return w.to(self.device) if quantizing else w.to(self.device, dtype)

        def projection(parts):  # parts: one list of weights per layer, concatenated along N
            flat = [w for p in parts for w in p]
            if quantize is not None and quant.can_join(flat):  # the checkpoint's own format
                return quant.stack([quant.cat(p, 0) for p in parts]).to(self.device)
            kinds = {w.source if isinstance(w, QuantizedWeight) else "float" for w in flat}
            if quantize is not None and kinds != {"float"}:
                self.load_notes.append(f"a projection mixes {sorted(kinds)} weights: "
                                       f"dequantized to " + (quantize if quantizing
                                                             else str(dtype)))
            layers = (torch.cat([dense(w) for w in p]) for p in parts)  # one at a time
            if quantizing:
                return quant.stack([quant.quantize(w, quantize, group_size) for w in layers])
            return torch.stack(list(layers))

        def stack(*suffixes):
            return projection([[weights[f"model.layers.{i}.{s}"] for s in suffixes]
                               for i in range(config.num_layers)])

        def norms(suffix):
            return torch.stack([get(f"model.layers.{i}.{suffix}")
                                for i in range(config.num_layers)])

        self.load_notes: list[str] = []
        self.embed = get("model.embed_tokens.weight")
        # a tied model's head is its embedding, unless given apart (state_dict gives a quantized
        # or dequantized head of its own)
        shared = "lm_head.weight" not in weights
        head = weights["model.embed_tokens.weight" if shared else "lm_head.weight"]
        self.lm_head = projection([[head]])[0]
        if shared and not isinstance(self.lm_head, QuantizedWeight):
            self.lm_head = self.embed  # one tensor
        self.final_norm = get("model.norm.weight")
        self.attn_norm = norms("input_layernorm.weight")
        self.w_qkv = stack("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                           "self_attn.v_proj.weight")
        self.w_o = stack("self_attn.o_proj.weight")
        self.mlp_norm = norms("post_attention_layernorm.weight")
        self.w_gate_up = stack("mlp.gate_proj.weight", "mlp.up_proj.weight")
        self.w_down = stack("mlp.down_proj.weight")
        if backend == "torch":  # torch's own weight-only kernels, where they take this dtype
            self.torch_paths = {name: w.prepare_torch(dtype) for name, w in self.projections()
                                if isinstance(w, QuantizedWeight)}
        self.rope_cos, self.rope_sin = rope_tables(config, self.max_seq_len, dtype, self.device)
        self.cache: KVCache | None = None
        self._marks: dict[tuple[int, ...], torch.Tensor] = {}
        # the torch passes also make logits() and eval's masked recompute on either backend
        self._torch = TorchBackend(self)
        self._backend: Backend = self._torch
        if backend == "triton":  # imported here: triton is only needed by this backend
            from d3kernels.triton_backend import TritonBackend

            self._backend = TritonBackend(self, cuda_graphs)
        if self.tp is not None:  # one collective: the same model on every rank, before any work
            norms = float(self.final_norm.double().sum() + self.attn_norm.double().sum())
            self.tp.check_same("model", f"{self.full_config!r}, {dtype}, {backend}, "
                                        f"{self.weight_format}, norms sum {norms!r}", self.device)

    @staticmethod
    def _sources(weights: dict) -> set[str]:
        return {w.source for w in weights.values() if isinstance(w, QuantizedWeight)}

    def projections(self) -> list[tuple[str, torch.Tensor | QuantizedWeight]]:
        """(name, weight) of every stacked projection and the LM head."""
        return [("w_qkv", self.w_qkv), ("w_o", self.w_o), ("w_gate_up", self.w_gate_up),
                ("w_down", self.w_down), ("lm_head", self.lm_head)]

    @property
    def weight_format(self) -> str:
        """What the projections are stored as: the dtype, or the quantized formats
        (e.g. ``"Q4_1 + Q8_0 head"``, ``"int4 g128"``)."""
        def name(w):
            if not isinstance(w, QuantizedWeight):
                return str(w.dtype).removeprefix("torch.")
            return w.source if w.source != w.fmt else f"{w.fmt} g{w.group_size}"
        body, head = name(self.w_qkv), name(self.lm_head)
        return body if head == body else f"{body} + {head} head"

    @functools.cached_property
    def weight_bytes(self) -> WeightBytes:
        """Bytes a step reads of each weight, in the stored format (quantized: values, scales
        and offsets), for the work ratio and achieved bandwidth (d3kernels.stats)."""
        L, cfg = self.config.num_layers, self.config

        def size(w):
            return w.nbytes if isinstance(w, QuantizedWeight) else w.numel() * w.element_size()

        norms = self.attn_norm.element_size() * cfg.hidden_size
        kv_rows = self.w_qkv[:, cfg.q_size:]
        layer = (2 * norms + sum(size(w) for w in (self.w_qkv, self.w_o, self.w_gate_up,
                                                   self.w_down)) // L)
        return WeightBytes(layer=layer, backfill_layer=norms + size(kv_rows) // L,
                           head=size(self.lm_head) + norms,
                           embed_row=self.embed.element_size() * cfg.hidden_size,
                           kv_elem=self.embed.element_size())

    def resident_weight_bytes(self) -> int:
        """Bytes the model's weights hold in memory (a torch-kernel form beside a quantized
        weight counted too; a tied float head once)."""
        seen, total = set(), 0
        for w in (self.embed, self.final_norm, self.attn_norm, self.mlp_norm,
                  *(w for _, w in self.projections())):
            if id(w) in seen:
                continue
            seen.add(id(w))
            total += (w.resident_bytes if isinstance(w, QuantizedWeight)
                      else w.numel() * w.element_size())
        return total

    def resolve_backfill(self, backfill: str | None = None,
                         backfill_timing: str | None = None) -> tuple[str, str]:
        """(mode, timing) for a call: None means the model's own; bad values raise ValueError."""
        mode = self.backfill if backfill is None else backfill
        timing = self.backfill_timing if backfill_timing is None else backfill_timing
        if mode not in BACKFILL_MODES:
            raise ValueError(f"backfill must be one of {BACKFILL_MODES}, got {mode!r}")
        if timing not in BACKFILL_TIMINGS:
            raise ValueError(f"backfill_timing must be one of {BACKFILL_TIMINGS}, got "
                             f"{timing!r}")
        return mode, timing

    # ---- constructors -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, src: str | Path = "smollm2-135m-instruct", **kwargs) -> "LlamaD3":
        """Load an HF Llama checkpoint directory, a .gguf file, or a known model name.

        A GGUF's Q4_0/Q4_1/Q8_0 weights stay quantized unless ``quantize=None`` (see the class
        doc); the other keyword arguments go to the constructor. With ``tp=N`` each rank reads
        only its shard of each tensor from the file (design.md §11)."""
        from d3kernels.loaders import load_checkpoint

        _check_quantize(kwargs.get("quantize", "auto"), kwargs.get("group_size"))
        config, weights, tokenizer = load_checkpoint(
            src, keep_quantized=kwargs.get("quantize", "auto") is not None,
            tp=kwargs.get("tp", 1))
        return cls(config, weights, tokenizer=tokenizer, **kwargs)

    @classmethod
    def from_hf(cls, hf_model, tokenizer=None, **kwargs) -> "LlamaD3":
        """Wrap an in-memory transformers ``LlamaForCausalLM``; dtype/device default to its own."""
        config = LlamaConfig.from_hf_dict(hf_model.config.to_dict())
        weights = {k: v.detach() for k, v in hf_model.state_dict().items()}
        if config.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        first = weights["model.embed_tokens.weight"]
        kwargs.setdefault("dtype", first.dtype)
        kwargs.setdefault("device", first.device)
        return cls(config, weights, tokenizer=tokenizer, **kwargs)

    @classmethod
    def random(cls, preset: str | LlamaConfig = "tiny", *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", seed: int = 0, **kwargs) -> "LlamaD3":
        """Random weights in the shapes of a preset (see ``d3kernels.config.PRESETS``).

        Projections ~ N(0, 1/fan_in) so activations stay O(1) at any depth; norm weights
        ~ U(0.5, 1.5) so a kernel that ignores them fails its test. Other keyword arguments
        (backend, max_seq_len, cuda_graphs, tp) go to the constructor.

        With ``tp=N`` every rank draws each tensor whole, in the same order from the same
        generator as tp=1, and keeps only its shard: the tp=N model is exactly the tp=1 model
        split, at the cost of drawing every tensor on every rank (one whole tensor at a time).
        """
        if isinstance(preset, str):
            if preset not in PRESETS:
                raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
            config = PRESETS[preset]
        else:
            config = preset
        device = torch.device(device)
        # Drawn on the target device, one tensor at a time: a 7B preset never sits in host
        # memory in float32. The same seed gives different weights on CPU and GPU.
        gen = torch.Generator(device=device).manual_seed(seed)
        tp = tensor_parallel(kwargs.get("tp", 1), config)
        weights = {}
        for name, shape in hf_weight_shapes(config).items():
            if len(shape) == 1:
                w = torch.rand(shape, generator=gen, device=device) + 0.5
            else:
                w = torch.randn(shape, generator=gen, device=device)
                if "embed_tokens" not in name:
                    w /= math.sqrt(shape[1])
            if tp is not None:  # a copy: the whole tensor is freed at once
                w = tp.take(name, w, shape).clone()
            weights[name] = w.to(dtype)
        return cls(config, weights, dtype=dtype, device=device, **kwargs)

    def state_dict(self) -> dict[str, torch.Tensor | QuantizedWeight]:
        """Hugging Face-named views of the stacked weights, each in its stored format (a
        QuantizedWeight for a quantized projection): ``LlamaD3(config, model.state_dict())``
        rebuilds the same model. See :meth:`dequantized_state_dict` for floats."""
        cfg, Q, K, I = self.config, self.config.q_size, self.config.kv_size, \
            self.config.intermediate_size
        out = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.final_norm}
        if self.lm_head is not self.embed:  # a tied model's quantized head is its own tensor
            out["lm_head.weight"] = self.lm_head
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            out[p + "input_layernorm.weight"] = self.attn_norm[i]
            out[p + "self_attn.q_proj.weight"] = self.w_qkv[i, :Q]
            out[p + "self_attn.k_proj.weight"] = self.w_qkv[i, Q:Q + K]
            out[p + "self_attn.v_proj.weight"] = self.w_qkv[i, Q + K:]
            out[p + "self_attn.o_proj.weight"] = self.w_o[i]
            out[p + "post_attention_layernorm.weight"] = self.mlp_norm[i]
            out[p + "mlp.gate_proj.weight"] = self.w_gate_up[i, :I]
            out[p + "mlp.up_proj.weight"] = self.w_gate_up[i, I:]
            out[p + "mlp.down_proj.weight"] = self.w_down[i]
        return out

    def dequantized_state_dict(self, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
        """:meth:`state_dict` with every weight as a float tensor of ``dtype`` on the CPU
        (quantized ones dequantized): the weights the oracle runs."""
        return {k: quant.as_float(v, dtype).to("cpu", dtype)
                for k, v in self.state_dict().items()}

    # ---- the torch building blocks, on either backend ----------------------------------------

    # d3kernels.eval.masked_logits builds its masked recompute from these (TorchBackend's)
    # ---- passes: checks and shared bookkeeping here, the computing in self._backend ---------

    @_guarded
    @torch.inference_mode()
    def logits(self, input_ids) -> torch.Tensor:
        """Full-depth logits [B, T, V] for input_ids [B, T] (or [T]), float32 (float64 for a
        float64 model). No cache used."""
        ids = torch.as_tensor(input_ids, device=self.device)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [B, T] with T >= 1, got shape {list(ids.shape)}")
        self._check_ids(ids, "input_ids")
        if ids.shape[1] > self.max_seq_len:
            raise ValueError(f"input_ids: {ids.shape[1]} tokens exceed max_seq_len "
                             f"{self.max_seq_len}")
        return self._torch.logits(ids)

    def _check_ids(self, ids: torch.Tensor, what: str) -> None:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{what}: token id {bad} is outside the vocabulary "
                             f"[0, {self.config.vocab_size})")

    @_guarded
    def prefill(self, ids: torch.Tensor, lengths: list[int], cache: KVCache,
                sampling: Sampling, start: list[int] | None = None, *,
                backfill: str | None = None, rows: list[int] | None = None) -> torch.Tensor:
        """Full-depth pass over right-padded prompts ids [B, T]; fills cache slots 0..T-1.

        start: None, or per row the number of tokens already in ``cache`` (row b's history,
        slots 0..start[b]-1): the chunk is then written at slots start[b]..start[b]+lengths[b]-1
        and attends to that history (multi-turn chat; the caller checks that
        start[b] + lengths[b] fits the cache). Returns the next token [B] (long) after each
        row's last real token.

        Before it runs, deferred backfill owed to history slots it reads (slots < start[b]) is
        flushed, and any owed at slots it overwrites is dropped. backfill: None (the model's)
        or the mode; in ``mask`` mode history entries never written are not attended to.
        rows: None (batch row b goes to cache row b) or the distinct cache row of each batch
        row (the continuous-batching engine prefills new requests into free rows; the triton
        backend then runs one batch-of-one pass per prompt on its cache row, see
        ``TritonBackend.prefill``). sampling: a Sampling, or a RowSampling (one per row).
        """
        mode, _ = self.resolve_backfill(backfill)
        B, T = ids.shape
        lengths = list(lengths)
        if len(lengths) != B or not all(_is_int(n) and 1 <= n <= T for n in lengths):
            raise ValueError(f"lengths must hold one length in [1, {T}] per row of ids, got "
                             f"{lengths}")
        self._check_ids(ids, "ids")
        if rows is None and B > cache.batch_size:
            raise ValueError(f"ids has {B} rows but the cache only {cache.batch_size}")
        if rows is not None:
            rows = list(rows)
            if len(rows) != B or len(set(rows)) != B or not all(
                    _is_int(r) and 0 <= r < cache.batch_size for r in rows):
                raise ValueError(f"rows must hold {B} distinct cache rows in "
                                 f"[0, {cache.batch_size}), got {rows}")
        if start is not None and (len(start) != B or not all(_is_int(x) and x >= 0
                                                             for x in start)):
            raise ValueError(f"start must hold one position >= 0 per row ({B}), got {start}")
        first = [0] * B if start is None else start
        if any(x + n > min(cache.seq_len, self.max_seq_len) for x, n in zip(first, lengths)):
            raise ValueError(f"start + lengths exceeds the cache ({cache.seq_len} slots, "
                             f"max_seq_len {self.max_seq_len})")
        cache.reserve((b, f, f + n) for b, f, n in zip(range(B) if rows is None else rows,
                                                         first, lengths))
        self._begin_prefill(cache, lengths, start, rows)
        return self._backend.prefill(ids, lengths, cache, sampling, start, mode, rows)

    @_guarded
    def decode_step(self, tokens: torch.Tensor, positions: list[int], kept: tuple[int, ...],
                    cache: KVCache, sampling: Sampling, *, backfill: str | None = None,
                    backfill_timing: str | None = None) -> torch.Tensor:
        """One decode pass that runs only the layers in ``kept`` (ascending).

        tokens [B] long, the newest token of each row, at cache slot positions[b]. Skipped
        layers leave the residual unchanged. Their K/V at these slots (backfill None: the
        model's mode and timing): ``propagate``/eager fills them from the residual as it
        reaches them, one batched matmul per run of consecutive skipped layers; ``propagate``/
        deferred stashes that residual per run for :meth:`flush_backfill`; ``mask`` leaves them
        unwritten and attention ignores them. Returns the next token [B] (long); on the
        triton backend that is its token buffer, which the next step reads (pass it back as
        ``tokens``: no copy) and overwrites, so copy it first if you keep it.

        A row that owes deferred entries this pass would read (a kept layer it skipped before:
        kept sets that are not nested) or overwrite (a slot at or past this one: the sequence
        is rewritten) first gets them filled below this slot and dropped from it on; a reply
        driven by a DepthSchedule never needs this.
        """
        mode, timing = self.resolve_backfill(backfill, backfill_timing)
        L = self.config.num_layers
        B = tokens.shape[0]
        deferred = mode == "propagate" and timing == "deferred"
        skipped = L - len(kept)
        cache.reserve((b, p, p + 1) for b, p in enumerate(positions))
        if cache.deferred:
            settle = cache.must_settle(range(B), positions, [_layer_bits(kept)] * B)
            if settle:
                self._settle_backfill(cache, settle, [positions[b] for b in settle])
        # which layers' entries this step writes; the others at these slots stay missing
        filled = kept if mode == "mask" or deferred else tuple(range(L))
        mark = self._marks.get(filled)
        if mark is None:  # made once per layer set: no host copy in steady decoding
            mark = torch.tensor([j in filled for j in range(L)], device=self.device)
            self._marks[filled] = mark
        runs = skipped_runs(kept, L) if skipped and mode == "propagate" else ()
        if runs:
            if deferred:
                cache.get_stash(len(runs))  # before any capture: CUDA graphs hold its address
                owed = _layer_bits(tuple(range(L))) ^ _layer_bits(kept)
                for b, p in enumerate(positions):
                    cache.defer(b, p, runs, owed)
            else:
                cache.backfill_bytes += skipped * self.weight_bytes.backfill_layer
        return self._backend.decode_step(tokens, positions, kept, cache, sampling, deferred,
                                         mode, mark)

    @_guarded
    def decode_rows(self, tokens: list[int] | torch.Tensor, rows: list[int], positions: list[int],
                    kept: list[tuple[int, ...]], cache: KVCache, sampling, *,
                    backfill: str | None = None,
                    backfill_timing: str | None = None) -> torch.Tensor:
        """One decode pass over a batch whose rows run different layer sets (continuous
        batching: each request is at its own step i, so at its own depth).

        tokens: the newest token of each request (R ints, checked on the host, as the engine passes
        them; or a long tensor [R], whose ids are checked with a device->host read), at slot
        positions[r] of cache row rows[r] (distinct); kept[r]: the ascending layers request r runs;
        sampling: a Sampling, or a :class:`d3kernels.sampling.RowSampling` when requests pick their
        tokens differently. Layer j runs (QKV, attention, MLP) only on the rows that keep it; the
        others' residual passes through and, in ``propagate`` mode, their K/V at j come from it:
        eager fills them now, deferred (backfill_timing None: the model's) stashes the residual
        entering each of the row's skipped runs for :meth:`flush_backfill` (the engine drops what a
        row owes when it releases the row: nothing reads it); ``mask`` writes nothing for them. Owed
        entries a row's pass would read or overwrite are settled first, as in :meth:`decode_step`.
        Returns the next tokens [R] (long; on the triton backend a view of a buffer the next call
        overwrites: read or copy it first). Bad arguments raise ValueError before anything runs.

        Both backends: the torch one gathers the rows that run a layer and scatters the result
        back; the triton one passes them to every kernel as ``rows=`` in the cache-row layout
        (``TritonBackend.decode_rows``; on a GPU a CUDA graph per set of layers any row keeps).
        """
        mode, timing = self.resolve_backfill(backfill, backfill_timing)
        deferred = mode == "propagate" and timing == "deferred"
        cfg, L = self.config, self.config.num_layers
        rows, positions, kept = list(rows), list(positions), [tuple(k) for k in kept]
        R = len(rows)
        if isinstance(tokens, (list, tuple)):
            if len(tokens) != R or R == 0 or not all(_is_int(t) for t in tokens):
                raise ValueError(f"tokens must hold one int token id per row of rows ({R}), got "
                                 f"{tokens}")
            bad = [t for t in tokens if not 0 <= t < cfg.vocab_size]
            if bad:
                raise ValueError(f"tokens: token id {bad[0]} is outside the vocabulary "
                                 f"[0, {cfg.vocab_size})")
        elif not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or R == 0 \
                or tokens.shape[0] != R or tokens.dtype != torch.long:
            got = (f"{tokens.dtype} {list(tokens.shape)}" if isinstance(tokens, torch.Tensor)
                   else type(tokens))
            raise ValueError(f"tokens must be a list of ints or a 1-D long tensor with one token "
                             f"per row of rows ({R}), got {got}")
        else:
            self._check_ids(tokens, "tokens")
        if len(set(rows)) != R or not all(_is_int(r) and 0 <= r < cache.batch_size
                                          for r in rows):
            raise ValueError(f"rows must hold distinct cache rows in [0, {cache.batch_size}), "
                             f"got {rows}")
        capacity = min(cache.seq_len, self.max_seq_len)
        if len(positions) != R or not all(_is_int(p) and 0 <= p < capacity for p in positions):
            raise ValueError(f"positions must hold one slot in [0, {capacity}) per row, got "
                             f"{positions}")
        if len(kept) != R or not all(list(k) == sorted(set(k)) and all(
                _is_int(j) and 0 <= j < L for j in k) for k in kept):
            raise ValueError(f"kept must hold one ascending tuple of distinct layers in "
                             f"[0, {L}) per row, got {kept}")
        cache.reserve((r, p, p + 1) for r, p in zip(rows, positions))
        if cache.deferred:
            settle = cache.must_settle(rows, positions, [_layer_bits(k) for k in kept])
            if settle:
                self._settle_backfill(cache, [rows[i] for i in settle],
                                      [positions[i] for i in settle])
        keeps = [frozenset(k) for k in kept]
        # which layers' entries this pass writes at each row's slot: [L, R]
        marks = [[(mode == "propagate" and not deferred) or j in k for k in keeps]
                 for j in range(L)]
        starts = None
        if deferred:  # layer a -> {ordinal s: the requests whose s-th skipped run starts at a}
            starts = {}
            every = _layer_bits(tuple(range(L)))
            row_runs = [skipped_runs(k, L) for k in kept]
            if any(row_runs):
                cache.get_stash(max(map(len, row_runs)))
            for r, runs in enumerate(row_runs):
                if runs:
                    cache.defer(rows[r], positions[r], runs, every ^ _layer_bits(kept[r]))
                for s, (a, _) in enumerate(runs):
                    starts.setdefault(a, {}).setdefault(s, []).append(r)
        elif mode == "propagate":  # one backfill per layer that any row skips
            cache.backfill_bytes += sum(any(j not in k for k in keeps) for j in range(L)) \
                * self.weight_bytes.backfill_layer
        return self._backend.decode_rows(tokens, rows, positions, kept, cache, sampling, mode,
                                         starts, marks)

    def _begin_prefill(self, cache: KVCache, lengths: list[int], start: list[int] | None,
                       rows: list[int] | None = None):
        """Bookkeeping before a prefill writes slots start[b].. of cache rows rows[b] (None:
        b): settle what those rows owe (see :meth:`_settle_backfill`; other rows' debts stay
        owed) and mark its slots written at every layer (clearing the row's later slots,
        which are stale)."""
        B = len(lengths)
        rows = list(range(B)) if rows is None else rows
        first = [0] * B if start is None else list(start)
        if cache.deferred:
            self._settle_backfill(cache, rows, first)
        cache.clear_rows(rows, first)
        pos = [(b, p) for b, f, n in zip(rows, first, lengths) for p in range(f, f + n)]
        row_t, pos_t = torch.tensor(pos, device=self.device).unbind(1)
        cache.flat(cache.written)[:, cache.slots(row_t, pos_t)] = True

    def _settle_backfill(self, cache: KVCache, rows: list[int], first: list[int]) -> None:
        """Before a pass on cache row rows[i] that reads its slots below first[i] and writes
        from there on: fill what the row owes below first[i], forget what it owes from there
        on (overwritten, never read)."""
        reads = {}
        for r, f in zip(rows, first):
            for run, slots in cache.take_backfill([r]).get(r, {}).items():
                below = [p for p in slots if p < f]
                if below:
                    reads.setdefault(r, {})[run] = below
        self._fill_backfill(cache, reads)

    @_guarded
    def flush_backfill(self, cache: KVCache | None = None, rows: list[int] | None = None) -> int:
        """Fill every K/V entry a deferred ``propagate`` backfill still owes in ``cache``
        (default: the model's last cache), or only in its cache rows ``rows``. After it the
        cache equals the one eager backfill would have made. Returns the (layer, row, slot)
        entries filled.

        Layers owed by the same set of (row, slot) entries form one group, filled in one
        launch (torch: one batched matmul; triton: one ``kv_backfill`` launch over the group's
        layers and stashed states): each owed layer's weights are read once per flush. Each
        entry's state is the residual stashed at the start of its own skipped run (the same
        residual reaches every layer of the run).
        """
        cache = self.cache if cache is None else cache
        if cache is None or not cache.deferred:
            return 0
        return self._fill_backfill(cache, cache.take_backfill(rows))

    @torch.inference_mode()
    def _fill_backfill(self, cache: KVCache, owed: dict[int, dict[tuple, list[int]]]) -> int:
        """flush_backfill of ``owed`` (row -> {(a, b, s): slots}, as ``KVCache.deferred``),
        already taken out of the cache."""
        if not owed:
            return 0
        dev = self.device
        per_layer = self.weight_bytes.backfill_layer
        entries: dict[tuple, list[tuple[int, int, int]]] = {}  # run -> [(ordinal, row, slot)]
        for r, runs in owed.items():
            for run, slots in runs.items():
                entries.setdefault(run, []).extend((run[2], r, p) for p in slots)
        runs_of: dict[int, list[tuple]] = {}  # layer -> the runs that owe it
        for run in sorted(entries):
            for layer in range(run[0], run[1]):
                runs_of.setdefault(layer, []).append(run)
        groups: dict[tuple, list[int]] = {}  # each (row, slot) is in one run per layer at most
        for layer, runs in sorted(runs_of.items()):
            groups.setdefault(tuple(runs), []).append(layer)
        filled = 0
        for runs, layers in groups.items():
            src, rows, pos = (torch.tensor(c, device=dev)
                              for c in zip(*(e for run in runs for e in entries[run])))
            n, M = len(layers), len(src)
            slots = cache.slots(rows, pos)
            self._backend.backfill_states(cache.flat(cache.stash)[src, slots], layers, pos, rows,
                                          cache)
            cache.flat(cache.written)[torch.tensor(layers, device=dev)[:, None], slots[None]] = True
            cache.backfill_bytes += n * per_layer
            filled += n * M
        return filled

    def new_cache(self, batch_size: int, seq_len: int) -> KVCache:
        """A cache for batch_size rows of up to seq_len tokens, reusing the last one if it fits.
        A reused cache's old contents are thrown away, and with them any deferred backfill
        they still owe (nothing will read it; flush the cache first to keep it)."""
        c = self.cache
        if c is None or c.batch_size < batch_size or c.seq_len < seq_len:
            self.cache = c = KVCache(self.config, batch_size, seq_len, self.dtype, self.device)
        else:
            c.drop_backfill()
        return c

    def chat(self, system: str | None = None, schedule: DepthSchedule | None = None, **kwargs):
        """A :class:`d3kernels.chat.Conversation` that keeps one KV cache across turns; see
        there for every argument (sampling options, stop_tokens, max_seq_len)."""
        from d3kernels.chat import Conversation

        return Conversation(self, system=system, schedule=schedule, **kwargs)

    def generate(self, prompts, max_new_tokens: int = 64, schedule: DepthSchedule | None = None,
                 **kwargs):
        """D³ generation; see :func:`d3kernels.generation.generate` for every argument."""
        from d3kernels.generation import generate

        return generate(self, prompts, max_new_tokens, schedule, **kwargs)

    def stream(self, prompts, max_new_tokens: int = 64, schedule: DepthSchedule | None = None,
               **kwargs):
        """Iterator over :class:`d3kernels.generation.StreamedToken` as they are made."""
        from d3kernels.generation import generate_stream

        return generate_stream(self, prompts, max_new_tokens, schedule, **kwargs)
