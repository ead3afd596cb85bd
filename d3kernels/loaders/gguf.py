"""llama.cpp GGUF checkpoints (architecture "llama"): config, weights and tokenizer.

Q4_0, Q4_1 and Q8_0 tensors can stay quantized (d3kernels.quant); other quantized types are
dequantized to float32, with a warning naming them.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader
from gguf.quants import dequantize

from d3kernels.config import LlamaConfig
from d3kernels.model import hf_weight_shapes
from d3kernels.parallel import tensor_parallel
from d3kernels.quant import GGUF_NATIVE, QuantizedWeight, from_gguf
from d3kernels.tokenizer import Tokenizer


class _FastGGUFReader(GGUFReader):
    """GGUFReader whose field parsing slices a plain ndarray view of the file's memmap.

    The stock ``_get`` slices the ``np.memmap`` subclass once per field element (~100k times for a
    49k-token vocabulary), and every memmap slice pays for ``__array_finalize__``; a plain view of
    the same mapping parses SmolLM2's metadata in ~0.6 s instead of ~2.5 s, with identical arrays
    (tensor data included, still backed by the mapping).
    """

    def _get(self, offset, dtype, count=1, override_order=None):
        try:
            plain = self._plain_data
        except AttributeError:
            plain = self._plain_data = self.data.view(np.ndarray)
        count = int(count)
        end = offset + np.dtype(dtype).itemsize * count
        arr = plain[offset:end].view(dtype=dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None
                                               else override_order))


# Exceptions GGUFReader raises on short or garbled input (it has no error type of its own).
_CORRUPT_ERRORS = (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError)

# GGUF tensor name (after "blk.{i}.") -> HF Llama name (after "model.layers.{i}.").
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors that carry no weights of their own: rope_freqs encodes llama3 RoPE scaling (read into
# the config); attn_rot_embd is a leftover of old converters, recomputed at run time.
_NON_WEIGHT_TENSORS = {"rope_freqs.weight"}
_NON_WEIGHT_LAYER_TENSORS = {"attn_rot_embd"}


def _open_reader(path: Path) -> GGUFReader:
    try:
        try:
            return _FastGGUFReader(path)
        except (TypeError, AttributeError):
            # gguf changed its private reader API; the stock reader is slower but equivalent.
            return GGUFReader(path)
    except _CORRUPT_ERRORS as e:
        raise ValueError(f"{path} is truncated or not a GGUF file ({e})") from e


def _hf_name(gguf_name: str) -> str | None:
    """HF name for a GGUF tensor name; None for tensors that aren't weights."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    if gguf_name in _NON_WEIGHT_TENSORS:
        return None
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        if parts[2] in _LAYER_TENSORS:
            return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
        if parts[2].split(".")[0] in _NON_WEIGHT_LAYER_TENSORS:
            return None
    raise ValueError(f"GGUF tensor {gguf_name!r} is not part of a Llama model this loader supports")


def _unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved-pair RoPE -> HF rotate-half RoPE).

    ``w`` is [n_head * head_dim, in_features]. llama.cpp's converter maps each head's rows
    (2, head_dim/2) -> (head_dim/2, 2); this is the inverse, the same as transformers' GGUF loader.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_shard(data: np.ndarray, cut: tuple[int, int, int], tensor, hf_name: str,
                path: Path) -> np.ndarray:
    """Rows or columns [a, b) (cut = (dim, a, b), HF orientation [out, in]) of a GGUF 2-D
    tensor's data, still in the file's encoding: float elements, or whole quantized blocks (a
    column cut must fall on block boundaries). A view of the file mapping: only it is read."""
    dim, a, b = cut
    if dim == 0:
        return data[a:b]
    cols = int(tensor.shape[0])
    block, size = GGML_QUANT_SIZES[tensor.tensor_type]
    if data.shape[1] == cols:  # one element per column
        return data[:, a:b]
    if a % block or b % block:
        raise ValueError(f"{path}: {hf_name} ({tensor.tensor_type.name}, blocks of {block}) "
                         f"cannot be split at input columns [{a}, {b}) for tensor parallelism: "
                         f"not on block boundaries")
    return data[:, a // block * size:b // block * size]


def _llama3_rope_factors(scaling: dict, inv_freq: np.ndarray) -> np.ndarray:
    """llama.cpp's rope_freqs for llama3 scaling: the divisor of each inverse frequency."""
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - lo) / (hi - lo)
    blended = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / hi, 1.0,
                    np.where(wavelen > original / lo, factor, blended))


def _llama3_scaling_from_rope_freqs(rope_freqs: np.ndarray, theta: float, head_dim: int,
                                    path: Path) -> dict | None:
    """Recover the llama3 ``rope_scaling`` dict from the ``rope_freqs`` tensor.

    llama.cpp stores only the per-frequency divisors [head_dim/2]. The low/high frequency factors
    are taken as 1 and 4 (every Llama 3.x release); factor and the original context length are
    solved from the divisors, and the result is checked to reproduce every divisor.
    """
    factors = rope_freqs.astype(np.float64).reshape(-1)
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if factors.shape != inv_freq.shape:
        raise ValueError(f"{path}: rope_freqs has {factors.size} values, expected {inv_freq.size}")
    if np.allclose(factors, 1.0):
        return None
    factor = float(factors.max())
    lo, hi = 1.0, 4.0
    medium = np.flatnonzero((factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4)))
    scaling = None
    if medium.size and factor > 1:
        i = medium[0]
        # divisor = 1 / ((1 - s) / factor + s)  and  s = (original / wavelen - lo) / (hi - lo)
        smooth = (1 / factors[i] - 1 / factor) / (1 - 1 / factor)
        original = round((smooth * (hi - lo) + lo) * 2 * math.pi / inv_freq[i])
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": lo,
                   "high_freq_factor": hi, "original_max_position_embeddings": int(original)}
    if scaling is None or not np.allclose(_llama3_rope_factors(scaling, inv_freq), factors,
                                          rtol=1e-4):
        raise ValueError(f"{path}: rope_freqs does not match llama3 RoPE scaling with "
                         f"low/high frequency factors 1/4; this RoPE scaling is not supported")
    return scaling


def _f32(value) -> float:
    # GGUF stores these as float32; the shortest decimal that round-trips to the same float32 is
    # the published value (1e-05, not 9.999999747378752e-06).
    return float(str(np.float32(value)))


def _config_from_fields(fields: dict, tensor_names: set[str], rope_freqs: np.ndarray | None,
                        vocab_size: int, tokenizer: Tokenizer, path: Path) -> LlamaConfig:
    def get(key, default=None):
        value = fields.get(f"llama.{key}", default)
        if value is None:
            raise ValueError(f"{path}: GGUF metadata lacks 'llama.{key}'")
        return value

    if fields.get("llama.expert_count", 0):
        raise ValueError(f"{path}: mixture-of-experts Llama GGUFs are not supported")
    scaling_type = fields.get("llama.rope.scaling.type", "none")
    if scaling_type != "none":
        raise ValueError(f"{path}: RoPE scaling type {scaling_type!r} is not supported")
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(fields.get("llama.attention.key_length")
                   or fields.get("llama.rope.dimension_count") or hidden // heads)
    for key in ("attention.value_length", "rope.dimension_count"):
        if fields.get(f"llama.{key}", head_dim) != head_dim:
            raise ValueError(f"{path}: llama.{key}={fields[f'llama.{key}']} differs from head_dim "
                             f"{head_dim} (partial rotary / unequal k,v dims are not supported)")
    theta = _f32(get("rope.freq_base", 10000.0))
    rope_scaling = (None if rope_freqs is None
                    else _llama3_scaling_from_rope_freqs(rope_freqs, theta, head_dim, path))
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=theta,
        rope_scaling=rope_scaling,
        rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in tensor_names,
        max_position_embeddings=int(get("context_length", 4096)),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=tokenizer.stop_token_ids,
    )


def load_gguf(path: str | Path, keep_quantized: bool = False, tp: int = 1
              ) -> tuple[LlamaConfig, dict[str, torch.Tensor | QuantizedWeight], Tokenizer]:
    """Load a llama.cpp GGUF of a Llama-architecture model.

    Returns ``(config, weights, tokenizer)``; ``weights`` maps Hugging Face Llama names to
    contiguous float32 CPU tensors shaped [out_features, in_features] (norms [hidden]), with q/k
    rows in HF's rotate-half RoPE order. ``lm_head.weight`` is present only when the file has
    an untied output matrix. keep_quantized: Q4_0/Q4_1/Q8_0 matrices come back as
    :class:`~d3kernels.quant.QuantizedWeight` holding the file's own values and scales (rows
    reordered as above); other quantized types, and everything when False, are dequantized.
    tp > 1: each weight is this rank's shard (d3kernels.parallel), read from the file mapping
    alone, before any dequantizing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    reader = _open_reader(path)
    try:
        fields = {name: field.contents() for name, field in reader.fields.items()}
    except _CORRUPT_ERRORS as e:
        raise ValueError(f"{path} is truncated or not a GGUF file ({e})") from e

    arch = fields.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported "
                         f"(d3kernels loads 'llama' only)")
    tokenizer = Tokenizer.from_gguf_fields(fields)
    vocab_size = len(fields["tokenizer.ggml.tokens"])
    tensors = {t.name: t for t in reader.tensors}
    rope_freqs = tensors.get("rope_freqs.weight")
    config = _config_from_fields(fields, set(tensors),
                                 None if rope_freqs is None else np.asarray(rope_freqs.data),
                                 vocab_size, tokenizer, path)
    tp_state = tensor_parallel(tp, config)

    weights: dict[str, torch.Tensor | QuantizedWeight] = {}
    dequantized: dict[str, int] = {}  # quantized types this loader dequantizes -> tensor count
    for name, tensor in tensors.items():
        hf_name = _hf_name(name)
        if hf_name is None:
            continue
        kind = tensor.tensor_type.name
        native = keep_quantized and kind in GGUF_NATIVE and len(tensor.shape) == 2
        data = tensor.data
        cut = None if tp_state is None else tp_state.shard(hf_name)
        if cut is not None:
            data = _gguf_shard(data, cut, tensor, hf_name, path)
        # raw block rows for a kept tensor (a row permutation moves whole rows of blocks)
        w = data if native else dequantize(data, tensor.tensor_type)
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):  # whole heads, even in a shard
            w = _unpermute_rope_rows(w, w.shape[0] // config.head_dim)
        if native:
            rows, cols = int(tensor.shape[1]), int(tensor.shape[0])
            if cut is not None:
                rows, cols = (cut[2] - cut[1], cols) if cut[0] == 0 else (rows, cut[2] - cut[1])
            weights[hf_name] = from_gguf(w, kind, (rows, cols))
            continue
        if kind not in ("F32", "F16", "BF16", "F64"):
            dequantized[kind] = dequantized.get(kind, 0) + 1
        # Unquantized tensors come back as read-only views of the file mapping: copy those.
        w = np.ascontiguousarray(w, dtype=np.float32)
        if not w.flags.writeable:
            w = w.copy()
        weights[hf_name] = torch.from_numpy(w)
    if keep_quantized and dequantized:
        kinds = ", ".join(f"{k} ({n} tensors)" for k, n in sorted(dequantized.items()))
        warnings.warn(f"{path.name}: {kinds} dequantized to float at load: d3kernels keeps "
                      f"{', '.join(sorted(GGUF_NATIVE))} quantized, not these", stacklevel=2)

    expected = hf_weight_shapes(config)
    if tp_state is not None:
        expected = {n: tp_state.shard_shape(n, s) for n, s in expected.items()}
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"{path}: missing tensors for {arch} (e.g. {missing[:3]}, "
                         f"{len(missing)} in all)")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise ValueError(f"{path}: tensors beyond the configured model: {extra[:3]}")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"{path}: tensor {name} has shape {tuple(weights[name].shape)}, "
                             f"expected {shape}")
    return config, weights, tokenizer
