import math

import torch
from einops import repeat


def causal_gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         q_pos: torch.Tensor, k_pos: torch.Tensor,
                         k_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Causal grouped-query attention with an explicit softmax.

    q [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D] with Hq a multiple of Hkv; q_pos [B, Tq] and
    k_pos [B, Tk] token positions; k_valid [B, Tk] bool marks keys that exist (None: all).
    A query attends to the valid keys at positions <= its own. Returns [B, Tq, Hq, D].
    """
    group = q.shape[2] // k.shape[2]  # query heads sharing one KV head
    k = repeat(k, "b t h d -> b t (h g) d", g=group)
    v = repeat(v, "b t h d -> b t (h g) d", g=group)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    allowed = k_pos[:, None, :] <= q_pos[:, :, None]  # [B, Tq, Tk]
    if k_valid is not None:
        allowed = allowed & k_valid[:, None, :]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    scores = scores - scores.amax(dim=-1, keepdim=True)
    weights = scores.exp()
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return torch.einsum("bhqk,bkhd->bqhd", weights, v)
