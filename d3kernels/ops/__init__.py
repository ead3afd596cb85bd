"""Fused Triton kernels, one op per module; ``d3kernels.functional`` re-exports them."""
