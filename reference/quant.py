"""Weight-only quantization formats dequantized in float64, each written from its definition.

``dequantize_int4`` / ``dequantize_int8``: d3kernels' own layouts (packed values, per-group
float16 scale and offset). ``dequantize_gguf``: llama.cpp's Q4_0, Q4_1 and Q8_0 blocks read
byte by byte from the file's raw rows, independent of the ``gguf`` package and of d3kernels'
converter, so a test can hold all three against each other.
"""
import numpy as np
import torch


def dequantize_int4(data: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """data uint8 [..., N, K/2] (element 2i: low nibble of byte i, 2i+1: high nibble);
    scale, offset [..., N, K/G]. Returns w [..., N, K] = u·scale + offset per group, float64."""
    b = data.to(torch.int64)
    low, high = b % 16, b // 16
    u = torch.empty(*data.shape[:-1], 2 * data.shape[-1], dtype=torch.float64,
                    device=data.device)
    u[..., 0::2], u[..., 1::2] = low.double(), high.double()
    s = scale.double().repeat_interleave(group_size, dim=-1)
    o = offset.double().repeat_interleave(group_size, dim=-1)
    return u * s + o


def dequantize_int8(data: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """data int8 [..., N, K]; scale [..., N, K/G]. Returns w = q·scale per group, float64."""
    return data.double() * scale.double().repeat_interleave(group_size, dim=-1)


def dequantize(w) -> torch.Tensor:
    """Any quantized weight with d3kernels' attributes (fmt, data, scale, offset, group_size;
    duck-typed) in float64, by the format's own function above."""
    if w.fmt == "int4":
        return dequantize_int4(w.data, w.scale, w.offset, w.group_size)
    return dequantize_int8(w.data, w.scale, w.group_size)


_BLOCK = 32
_LAYOUTS = {  # bytes per block of 32 weights
    "Q4_0": 2 + 16,      # d (f16), 16 bytes of nibbles
    "Q4_1": 2 + 2 + 16,  # d, m (f16), 16 bytes of nibbles
    "Q8_0": 2 + 32,      # d (f16), 32 int8
}


def dequantize_gguf(raw: np.ndarray, type_name: str, K: int) -> torch.Tensor:
    """Rows of GGUF blocks (uint8 [N, K/32 · block bytes]) -> float64 [N, K].

    Within a block j of 32: Q4_0 w[j·32 + i] = d·(lo(qs[i]) − 8) and w[j·32 + 16 + i] =
    d·(hi(qs[i]) − 8), i < 16; Q4_1 the same with d·nibble + m; Q8_0 w[j·32 + i] = d·qs[i].
    """
    size = _LAYOUTS[type_name]
    rows = np.asarray(raw, dtype=np.uint8).reshape(raw.shape[0], K // _BLOCK, size)
    f16 = lambda lo, hi: rows[..., lo:hi].copy().view("<f2")[..., 0].astype(np.float64)  # noqa
    d = f16(0, 2)[..., None]
    if type_name == "Q8_0":
        q = rows[..., 2:].copy().view(np.int8).astype(np.float64)
        w = d * q
    else:
        qs = rows[..., size - 16:].astype(np.int64)
        nibbles = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float64)
        w = d * (nibbles - 8) if type_name == "Q4_0" else d * nibbles + f16(2, 4)[..., None]
    return torch.from_numpy(w.reshape(raw.shape[0], K))
