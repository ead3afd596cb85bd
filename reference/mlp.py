import torch


def swiglu_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
               w_down: torch.Tensor) -> torch.Tensor:
    """down(silu(x @ gate.T) * (x @ up.T)). x [..., H]; w_gate, w_up [I, H]; w_down [H, I]."""
    gate = x @ w_gate.T
    silu = gate / (1 + torch.exp(-gate))
    return (silu * (x @ w_up.T)) @ w_down.T
