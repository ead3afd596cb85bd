import torch

from reference.attention import causal_gqa_attention
from reference.lm_head import lm_head
from reference.mlp import swiglu_mlp
from reference.rmsnorm import rms_norm
from reference.rope import apply_rope, rope_inv_freq


def _layer(weights: dict, cfg, i: int, x: torch.Tensor, positions: torch.Tensor,
           inv_freq: torch.Tensor, k_valid: torch.Tensor | None = None) -> torch.Tensor:
    """One decoder layer on the whole sequence. x [B, T, H] -> [B, T, H].
    k_valid [B, T] bool: which positions' keys/values exist at this layer (None: all)."""
    p = f"model.layers.{i}."
    B, T, _ = x.shape
    h = rms_norm(x, weights[p + "input_layernorm.weight"], cfg.rms_norm_eps)
    q = (h @ weights[p + "self_attn.q_proj.weight"].T).view(B, T, cfg.num_heads, cfg.head_dim)
    k = (h @ weights[p + "self_attn.k_proj.weight"].T).view(B, T, cfg.num_kv_heads, cfg.head_dim)
    v = (h @ weights[p + "self_attn.v_proj.weight"].T).view(B, T, cfg.num_kv_heads, cfg.head_dim)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    attn = causal_gqa_attention(q, k, v, positions, positions, k_valid).reshape(B, T, -1)
    x = x + attn @ weights[p + "self_attn.o_proj.weight"].T
    h = rms_norm(x, weights[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
    return x + swiglu_mlp(h, weights[p + "mlp.gate_proj.weight"], weights[p + "mlp.up_proj.weight"],
                          weights[p + "mlp.down_proj.weight"])


def llama_forward(weights: dict, cfg, input_ids: torch.Tensor,
                  keep: torch.Tensor | None = None, backfill: str = "propagate") -> torch.Tensor:
    """Logits [B, T, V] of a Llama model over input_ids [B, T], in the weights' dtype.

    keep [B, T, L] bool: where False, layer j passes position t's residual through unchanged
    (the layer is skipped for that token). Every position still attends to the keys and values
    that layer j computes from every earlier position's residual stream as it reaches layer j,
    which is D³'s ``propagate`` backfill by construction. None runs every layer everywhere.

    backfill="mask": at layer j, a position where keep is False has no key/value: every other
    position's attention at layer j excludes it (the skipped position itself runs nothing
    there; its output is the pass-through).
    """
    if backfill not in ("propagate", "mask"):
        raise ValueError(f"backfill must be 'propagate' or 'mask', got {backfill!r}")
    B, T = input_ids.shape
    positions = torch.arange(T, device=input_ids.device).expand(B, T)
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    x = weights["model.embed_tokens.weight"][input_ids]
    for i in range(cfg.num_layers):
        k_valid = keep[:, :, i] if backfill == "mask" and keep is not None else None
        out = _layer(weights, cfg, i, x, positions, inv_freq, k_valid)
        x = out if keep is None else torch.where(keep[:, :, i, None], out, x)
    head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    return lm_head(x, weights["model.norm.weight"], head, cfg.rms_norm_eps)
