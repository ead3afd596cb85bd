"""Weight-only quantized matrices: the formats, quantizing at load, GGUF blocks, torch matmuls.

One container, :class:`QuantizedWeight`, holds a matrix (or a stack of them, [..., N, K]) in one
of two formats; every backend reads the same bytes:

- ``int4``: unsigned 4-bit values u in [0, 15], two per byte: data uint8 [..., N, K/2], element
  k of a row in byte k // 2, the low nibble for even k. Per group of ``group_size`` consecutive
  k: w = u · scale + offset, scale and offset float16 [..., N, K/G]. GGUF Q4_1 (w = d·u + m) is
  this with scale = d, offset = m; Q4_0 (w = d·(u − 8)) with offset = −8d (2 bytes per block
  more than the file); both exactly.
- ``int8``: signed values q (``quantize`` makes [−127, 127]): data int8 [..., N, K];
  w = q · scale per group, scale float16 [..., N, K/G], no offset. GGUF Q8_0 is this with
  G = 32; ``quantize="int8"`` makes one group per row (G = K), the layout torch's int8 kernel
  takes.

Embeddings and norms stay in float. The torch backend calls torch's weight-only kernels where
they exist for the device and activation dtype (:meth:`QuantizedWeight.prepare_torch`) and
dequantizes per call elsewhere; the triton kernels dequantize tiles in registers
(d3kernels/ops/_quant.py); docs/design.md §9.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

FORMATS = ("int4", "int8")
QUANTIZE = (None, "auto", "int8", "int4")
GROUP_SIZES = (32, 64, 128)
# GGUF tensor types kept quantized -> bytes per block of 32 weights (f16 scale [and min], values)
GGUF_NATIVE = {"Q4_0": 2 + 16, "Q4_1": 2 + 2 + 16, "Q8_0": 2 + 32}


class QuantizedWeight:
    """A weight-only quantized [..., N, K] matrix or stack of matrices (see the module doc).

    data: uint8 [..., N, K/2] (int4) or int8 [..., N, K] (int8); scale (and offset, int4 only):
    float16 [..., N, K/G]. source names where it came from ("Q4_1", "int4", ...). Indexing
    (``w[j]``, ``w[a:b, rows]``, a long tensor of layers) applies to the leading dims and N,
    never K: ints and slices give views (``w[j]`` is made once and reused), a tensor index
    copies, as for tensors.
    """

    def __init__(self, fmt: str, data: torch.Tensor, scale: torch.Tensor,
                 offset: torch.Tensor | None, group_size: int, source: str | None = None):
        if fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
        per_byte = 2 if fmt == "int4" else 1
        want = torch.uint8 if fmt == "int4" else torch.int8
        if data.dtype != want or data.dim() < 2:
            raise ValueError(f"{fmt} data must be {want} [..., N, K/{per_byte}], got "
                             f"{data.dtype} {list(data.shape)}")
        K = data.shape[-1] * per_byte
        if group_size < 1 or K % group_size:
            raise ValueError(f"group_size {group_size} must divide K = {K}")
        groups = (*data.shape[:-1], K // group_size)
        if scale.dtype != torch.float16 or tuple(scale.shape) != groups:
            raise ValueError(f"scale must be float16 {list(groups)}, got {scale.dtype} "
                             f"{list(scale.shape)}")
        if (offset is None) != (fmt == "int8"):
            raise ValueError("offset is required for int4 and absent for int8")
        if offset is not None and (offset.dtype != torch.float16
                                   or tuple(offset.shape) != groups):
            raise ValueError(f"offset must be float16 {list(groups)}, got {offset.dtype} "
                             f"{list(offset.shape)}")
        self.fmt, self.data, self.scale, self.offset = fmt, data, scale, offset
        self.group_size = group_size
        self.source = source or fmt
        self.shape = torch.Size((*data.shape[:-1], K))
        # torch-kernel forms (prepare_torch): kind, tensors, activation dtype
        self._torch: tuple | None = None
        self._layers: dict[int, QuantizedWeight] = {}  # w[j] views, made once (per-step calls)

    # ---- tensor-like --------------------------------------------------------------------------

    def __repr__(self) -> str:
        return (f"QuantizedWeight({self.source}: {self.fmt}, group {self.group_size}, shape "
                f"{list(self.shape)}, {self.device})")

    def dim(self) -> int:
        return len(self.shape)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes of the format itself: values, scales and offsets."""
        return sum(t.numel() * t.element_size() for t in self._parts())

    @property
    def resident_bytes(self) -> int:
        """Bytes held in memory: the format plus any torch-kernel form made by prepare_torch."""
        extra = 0 if self._torch is None else sum(
            t.numel() * t.element_size() for t in self._torch[1] if t is not self.data)
        return self.nbytes + extra

    def _parts(self) -> list[torch.Tensor]:
        return [t for t in (self.data, self.scale, self.offset) if t is not None]

    def __getitem__(self, idx) -> "QuantizedWeight":
        if isinstance(idx, int) and idx in self._layers:
            return self._layers[idx]
        view = self._index(idx)
        if isinstance(idx, int):
            self._layers[idx] = view
        return view

    def _index(self, idx) -> "QuantizedWeight":
        idx = idx if isinstance(idx, tuple) else (idx,)
        if len(idx) > self.dim() - 1 or any(i is None or i is Ellipsis for i in idx):
            raise IndexError(f"a QuantizedWeight {list(self.shape)} is indexed on its leading "
                             f"dims and N only, got {idx}")
        data = self.data[idx]
        if data.dim() < 2:
            raise IndexError(f"indexing a QuantizedWeight {list(self.shape)} with {idx} leaves "
                             f"no [N, K] matrix")
        out = QuantizedWeight(self.fmt, data, self.scale[idx],
                              None if self.offset is None else self.offset[idx],
                              self.group_size, self.source)
        # The torch forms follow indexing of the stack dims; N slices fall back to dequantizing.
        if self._torch is not None and len(idx) < self.dim() - 1:
            kind, tensors, dtype = self._torch
            out._torch = (kind, tuple(t[idx] for t in tensors), dtype)
        return out

    def to(self, device) -> "QuantizedWeight":
        device = torch.device(device)
        if device == self.device:
            return self
        return QuantizedWeight(self.fmt, self.data.to(device), self.scale.to(device),
                               None if self.offset is None else self.offset.to(device),
                               self.group_size, self.source)

    def contiguous(self) -> "QuantizedWeight":
        return QuantizedWeight(self.fmt, self.data.contiguous(), self.scale.contiguous(),
                               None if self.offset is None else self.offset.contiguous(),
                               self.group_size, self.source)

    def values(self) -> torch.Tensor:
        """The integer values [..., N, K]: u in [0, 15] (uint8) for int4, q (int8) for int8."""
        if self.fmt == "int8":
            return self.data
        return torch.stack([self.data & 15, self.data >> 4], dim=-1).flatten(-2)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float matrix [..., N, K] in ``dtype`` (computed in float32, float64 for float64)."""
        work = torch.float64 if dtype == torch.float64 else torch.float32
        G = self.group_size
        v = self.values().to(work).unflatten(-1, (-1, G))
        w = v * self.scale.to(work)[..., None]
        if self.offset is not None:
            w = w + self.offset.to(work)[..., None]
        return w.flatten(-2).to(dtype)

    # ---- torch matmul -------------------------------------------------------------------------

    def prepare_torch(self, dtype: torch.dtype) -> str:
        """Make the form torch's own weight-only kernel takes for activations of ``dtype`` on
        this device, once (kept beside the format; see resident_bytes). Returns which path
        :meth:`linear` will take: "int4pack" (CPU, N % 16 == 0), "int4pack-cuda" (bf16,
        N % 8 == 0, K % 128 == 0), "int8pack" (G == K; on CUDA bf16 only), "int8pack-grouped"
        (CPU, one int8 kernel call per group, each product in the activation dtype, summed in
        float32), or "dequantize" (float64
        activations, and shapes or dtypes the kernels refuse: the weight is dequantized to
        ``dtype`` at each call). The CUDA paths are not yet run on a GPU (no GPU session
        since they were written): tests/test_quant.py::test_gpu_torch_linear_paths checks
        them where CUDA exists."""
        N, K = self.shape[-2:]
        cpu, dense = self.device.type == "cpu", dtype != torch.float64
        int4_group = self.group_size in (32, 64, 128, 256)
        cuda_int4 = (self.device.type == "cuda" and dtype == torch.bfloat16 and N % 8 == 0
                     and K % 128 == 0)
        if self.fmt == "int4" and int4_group and (cpu and dense and N % 16 == 0 or cuda_int4):
            u = self.values().reshape(-1, N, K)
            if cpu:
                packed = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(m, 1)
                          for m in u.to(torch.int32)]
            else:  # the CUDA kernel's input: uint8 [N, K/2], even k in the high nibble
                packed = [torch.ops.aten._convert_weight_to_int4pack(m, 8)
                          for m in (u[..., 0::2] << 4) | u[..., 1::2]]
            packed = torch.stack(packed)
            packed = packed.reshape(*self.shape[:-2], *packed.shape[1:])
            # torch's int4 kernels take w = (u − 8)·scale + zero: zero = offset + 8·scale
            zero = self.offset.float() + 8 * self.scale.float()
            sz = torch.stack([self.scale.float(), zero], dim=-1).transpose(-3, -2)
            self._torch = ("int4pack" if cpu else "int4pack-cuda",
                           (packed, sz.to(dtype).contiguous()), dtype)
        elif self.fmt == "int8" and self.group_size == K and (cpu and dense
                                                              or dtype == torch.bfloat16):
            self._torch = ("int8pack", (self.data, self.scale[..., 0].to(dtype)), dtype)
        elif self.fmt == "int8" and cpu and dense:
            # [..., K/G, N, G]: each group's [N, G] block contiguous for the kernel
            grouped = self.data.unflatten(-1, (-1, self.group_size)).transpose(-3, -2)
            self._torch = ("int8pack-grouped",
                           (grouped.contiguous(), self.scale.transpose(-2, -1).to(dtype)
                            .contiguous()), dtype)
        else:
            self._torch = None
        self._layers = {}  # views made before carry the old forms
        return "dequantize" if self._torch is None else self._torch[0]

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ w.T`` for one matrix: x [..., K] -> [..., N] in x's dtype."""
        if self.dim() != 2:
            raise ValueError(f"linear needs one [N, K] matrix, got {list(self.shape)}")
        N, K = self.shape
        if self._torch is None or self._torch[2] != x.dtype:
            return F.linear(x, self.dequantize(x.dtype))
        kind, (a, b), _ = self._torch
        x2 = x.reshape(-1, K)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        if kind == "int4pack":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, a, self.group_size, b)
        elif kind == "int4pack-cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2, a, self.group_size, b)
        elif kind == "int8pack":
            y = torch.ops.aten._weight_int8pack_mm(x2, a, b)
        else:
            G = self.group_size
            xg = x2.unflatten(-1, (-1, G))
            y = torch.zeros(x2.shape[0], N, dtype=torch.float32, device=x.device)
            for g in range(K // G):
                y += torch.ops.aten._weight_int8pack_mm(xg[:, g].contiguous(), a[g], b[g])
            y = y.to(x.dtype)
        return y.reshape(*x.shape[:-1], N)


def linear(x: torch.Tensor, w: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    """``x @ w.T`` for a float weight or a QuantizedWeight (one matrix)."""
    if isinstance(w, QuantizedWeight):
        return w.linear(x)
    return F.linear(x, w)


def as_float(w: torch.Tensor | QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """w itself when it is a float tensor, else its dequantization to ``dtype``."""
    return w.dequantize(dtype) if isinstance(w, QuantizedWeight) else w


def cat(parts: list[QuantizedWeight], dim: int) -> QuantizedWeight:
    """Concatenate along N (dim -2) or stack dims of matrices in one format and group size."""
    fmt, G = parts[0].fmt, parts[0].group_size
    if any(p.fmt != fmt or p.group_size != G for p in parts):
        raise ValueError("cat needs one format and group size")
    sources = sorted({p.source for p in parts})
    return QuantizedWeight(fmt, torch.cat([p.data for p in parts], dim),
                           torch.cat([p.scale for p in parts], dim),
                           None if fmt == "int8" else torch.cat([p.offset for p in parts], dim),
                           G, "+".join(sources))


def stack(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack same-shaped matrices into [len(parts), N, K]."""
    return cat([QuantizedWeight(p.fmt, p.data[None], p.scale[None],
                                None if p.offset is None else p.offset[None], p.group_size,
                                p.source) for p in parts], 0)


def can_join(parts: list) -> bool:
    """Whether these weights can be concatenated/stacked as one QuantizedWeight."""
    first = parts[0]
    return all(isinstance(p, QuantizedWeight) and p.fmt == first.fmt
               and p.group_size == first.group_size for p in parts)


# ---- quantizing floats ------------------------------------------------------------------------

def quantize(w: torch.Tensor, fmt: str, group_size: int | None = None) -> QuantizedWeight:
    """Quantize a float [..., N, K] weight, round to nearest.

    int4: asymmetric per group of ``group_size`` (default: 128, or the largest of 64 and 32
    that divides K): scale = (max − min)/15, offset = min, both rounded to float16 first so
    the values fit the stored scale. int8: symmetric, scale = max|w|/127, per group of
    ``group_size`` (default: the whole row, K).
    """
    if fmt not in FORMATS:
        raise ValueError(f"quantize must be one of {FORMATS}, got {fmt!r}")
    if not w.is_floating_point() or w.dim() < 2:
        raise ValueError(f"quantize needs a float [..., N, K] weight, got {w.dtype} "
                         f"{list(w.shape)}")
    K = w.shape[-1]
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if fmt == "int4" and K % 2:
        raise ValueError(f"int4 packs two values per byte: K must be even, got {K}")
    if group_size is None and fmt == "int4":
        group_size = next((g for g in sorted(GROUP_SIZES, reverse=True) if K % g == 0), None)
        if group_size is None:
            raise ValueError(f"int4 needs a group size that divides K = {K} (shape "
                             f"{list(w.shape)}); none of {GROUP_SIZES} does")
    G = group_size or K
    if K % G:
        raise ValueError(f"group_size {G} does not divide the weight's K = {K} "
                         f"(shape {list(w.shape)}); pick one of {GROUP_SIZES} that does")
    wg = w.detach().to(torch.float32).unflatten(-1, (-1, G))
    if fmt == "int4":
        lo, hi = wg.amin(-1), wg.amax(-1)
        offset = lo.to(torch.float16)
        scale = ((hi - offset.float()) / 15).to(torch.float16)
        safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
        u = ((wg - offset.float()[..., None]) / safe[..., None]).round().clamp(0, 15)
        u = u.to(torch.uint8).flatten(-2)
        data = u[..., 0::2] | (u[..., 1::2] << 4)
        return QuantizedWeight("int4", data.contiguous(), scale, offset, G, "int4")
    scale = (wg.abs().amax(-1) / 127).to(torch.float16)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    q = (wg / safe[..., None]).round().clamp(-127, 127).to(torch.int8).flatten(-2)
    return QuantizedWeight("int8", q.contiguous(), scale, None, G, "int8")


# ---- GGUF blocks ------------------------------------------------------------------------------

def from_gguf(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> QuantizedWeight:
    """A GGUF Q4_0 / Q4_1 / Q8_0 tensor [N, K] from its raw blocks (uint8 [N, bytes per row]).

    Block of 32 weights: Q4_0 = d (f16), 16 bytes where byte i holds element i (low nibble) and
    element i + 16 (high); Q4_1 = d, m (f16) then the same 16 bytes; Q8_0 = d (f16), 32 int8.
    """
    if type_name not in GGUF_NATIVE:
        raise ValueError(f"GGUF type {type_name} is not kept quantized (supported: "
                         f"{sorted(GGUF_NATIVE)})")
    N, K = shape
    row_bytes = K // 32 * GGUF_NATIVE[type_name]
    if K % 32 or raw.dtype != np.uint8 or tuple(raw.shape) != (N, row_bytes):
        raise ValueError(f"{type_name} tensor [{N}, {K}] needs K a multiple of 32 and raw uint8 "
                         f"blocks [{N}, {row_bytes}], got {raw.dtype} {list(raw.shape)}")
    blocks = np.ascontiguousarray(raw).reshape(N, K // 32, -1)
    d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0])  # [N, K/32]
    if type_name == "Q8_0":
        q = torch.from_numpy(blocks[..., 2:34].copy().view(np.int8)).reshape(N, K)
        return QuantizedWeight("int8", q, d, None, 32, type_name)
    if type_name == "Q4_1":
        offset = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0])
        qs = blocks[..., 4:20]
    else:
        offset = -8 * d  # exact in float16: a power-of-two multiple
        qs = blocks[..., 2:18]
    qs = torch.from_numpy(qs.copy())  # [N, K/32, 16]
    u = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(N, K)  # GGUF order: i, then i + 16
    data = u[:, 0::2] | (u[:, 1::2] << 4)
    return QuantizedWeight("int4", data.contiguous(), d, offset, 32, type_name)
