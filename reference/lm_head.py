import torch

from reference.rmsnorm import rms_norm


def lm_head(x: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor,
            eps: float) -> torch.Tensor:
    """Final RMSNorm then vocab projection. x [..., H]; weight [V, H] -> logits [..., V]."""
    return rms_norm(x, norm_weight, eps) @ weight.T
