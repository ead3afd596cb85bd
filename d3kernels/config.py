"""Llama-family model configuration, parsed from HF config.json dicts and GGUF metadata."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class LlamaConfig:
    """Shapes and constants of a Llama-architecture decoder.

    ``rope_scaling`` is None (default RoPE) or a dict with ``rope_type == "llama3"`` and the keys
    ``factor``, ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"LlamaConfig.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") != "llama3":
            raise ValueError(f"LlamaConfig.rope_scaling: only 'llama3' scaling is supported, "
                             f"got {self.rope_scaling!r}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, d: dict) -> "LlamaConfig":
        """Parse a Hugging Face ``config.json`` dict (transformers 4.x or 5.x layout)."""
        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        if model_type != "llama" and "LlamaForCausalLM" not in archs:
            raise ValueError(f"config: not a Llama checkpoint (model_type={model_type!r}, "
                             f"architectures={archs!r}); d3kernels supports Llama-family models only")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config: hidden_act must be 'silu' for Llama, got {d['hidden_act']!r}")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise ValueError(f"config: {flag}=True is not supported")
        heads = d["num_attention_heads"]
        # transformers 5 keeps rope settings in rope_parameters; 4.x in rope_theta + rope_scaling.
        rope = dict(d.get("rope_parameters") or {})
        scaling = d.get("rope_scaling")
        if scaling:
            rope.update(scaling)
        theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_scaling = None
        if rope_type not in (None, "default"):
            rope_scaling = {"rope_type": rope_type}
            for key in ("factor", "low_freq_factor", "high_freq_factor",
                        "original_max_position_embeddings"):
                if key in rope:
                    rope_scaling[key] = rope[key]
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rope_theta=theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _llama3_scaling(factor: float, original: int) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": original}


# Shapes of public checkpoints, for random-weight models (benchmarks, tests).
PRESETS: dict[str, LlamaConfig] = {
    "llama-2-7b": LlamaConfig(32000, 4096, 11008, 32, 32, 32, 128, max_position_embeddings=4096),
    "llama-2-13b": LlamaConfig(32000, 5120, 13824, 40, 40, 40, 128, max_position_embeddings=4096),
    "llama-2-70b": LlamaConfig(32000, 8192, 28672, 80, 64, 8, 128, max_position_embeddings=4096),
    "llama-3-8b": LlamaConfig(128256, 4096, 14336, 32, 32, 8, 128, rope_theta=500000.0,
                              max_position_embeddings=8192),
    "llama-3-70b": LlamaConfig(128256, 8192, 28672, 80, 64, 8, 128, rope_theta=500000.0,
                               max_position_embeddings=8192),
    "llama-3.2-1b": LlamaConfig(128256, 2048, 8192, 16, 32, 8, 64, rope_theta=500000.0,
                                rope_scaling=_llama3_scaling(32.0, 8192), tie_word_embeddings=True,
                                max_position_embeddings=131072),
    "smollm2-135m": LlamaConfig(49152, 576, 1536, 30, 9, 3, 64, rope_theta=100000.0,
                                tie_word_embeddings=True, max_position_embeddings=8192),
    # Interpreter-sized: exercises GQA 3 and a non-power-of-two hidden size.
    "tiny": LlamaConfig(512, 96, 160, 8, 6, 2, 16, rope_theta=10000.0, max_position_embeddings=256),
}
