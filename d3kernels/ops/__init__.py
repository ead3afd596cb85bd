"""Fused Triton kernels, one op per module; the functional API is re-exported here."""
