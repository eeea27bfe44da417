"""Low-bit weight-only matmul: ``QuantizedWeight``, ``quantize``/``dequantize``/``unpack`` and
``quant_matmul``.

Format (the reference semantics; ``ttscale.reference.quant_matmul`` is the float64 reference).
``W [N, K]`` (nn.Linear orientation) in groups of ``G`` consecutive input features
(``group_size`` in {32, 64, 128, -1}; -1 is one group per output row), ``bits`` b in {2, 3, 4, 8}:

* asymmetric: ``s = max((max(w_g, 0) - min(w_g, 0)) / (2^b - 1), eps)``,
  ``z = clamp(round(-min(w_g, 0) / s), 0, 2^b - 1)`` (stored as uint8)
* symmetric:  ``s = max(2 * absmax(w_g) / (2^b - 1), eps)``, ``z = 2^(b-1)`` (no zeros stored)
* ``q = clamp(round(w / s) + z, 0, 2^b - 1)``; round is half-to-even; ``eps = 1e-12``. ``s`` is
  computed in float64 and rounded once to ``scale_dtype``; ``z`` and ``q`` use the stored ``s``.
* dequant ``w' = (q - z) * s``; ``quant_matmul``: ``y = x @ w'^T (+ bias)`` with fp32 accumulation,
  output in ``x.dtype``.

The codes are kept in a device-specific packed layout (``layout``). On CPU it is ``"cpu_n16"``
(documented in ``csrc/ops/quant_matmul/quant_matmul.h``): uint8 ``[ceil(N/16), K, 2*bits]``, the 16
codes of a block of output rows for one input feature in one ``2*bits``-byte record. ``unpack``
returns the logical codes ``[N, K]`` uint8 whatever the layout.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch

__all__ = ["QuantizedWeight", "quantize", "dequantize", "unpack", "pack", "quant_matmul"]

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)
EPS = 1e-12
CPU_LAYOUT = "cpu_n16"
_NB = 16


@dataclasses.dataclass
class QuantizedWeight:
    """A low-bit weight ``W [N, K]``: packed codes, scales ``[N, K/G]``, integer zeros ``[N, K/G]``
    uint8 (``None``: symmetric, ``z = 2^(bits-1)``), ``bits``, ``group_size`` (-1: per channel),
    ``shape = (N, K)`` and the packed ``layout`` name."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    bits: int
    group_size: int
    shape: Tuple[int, int]
    layout: str = CPU_LAYOUT

    @property
    def group(self) -> int:
        """The effective group size (``K`` when ``group_size == -1``)."""
        return self.shape[1] if self.group_size == -1 else self.group_size

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def to(self, device) -> "QuantizedWeight":
        device = torch.device(device)
        if device.type != "cpu":
            raise NotImplementedError(f"ttscale: QuantizedWeight has no {device.type} layout yet (only {CPU_LAYOUT!r})")
        return self

    def nbytes(self) -> int:
        n = self.packed.numel() * self.packed.element_size() + self.scales.numel() * self.scales.element_size()
        if self.zeros is not None:
            n += self.zeros.numel()
        return n


def _check_format(bits: int, group_size: int, k: int, name: str = "w") -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"ttscale: bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"ttscale: group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size}")
    g = k if group_size == -1 else group_size
    if k <= 0 or k % g != 0:
        raise ValueError(f"ttscale: {name} in_features K = {k} must be a positive multiple of group_size = {group_size}")
    return g


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical codes ``[N, K]`` (uint8, values < 2^bits) -> CPU layout ``cpu_n16`` ``[ceil(N/16), K, 2*bits]``."""
    n, k = codes.shape
    nb = (n + _NB - 1) // _NB
    c = torch.zeros((nb * _NB, k), dtype=torch.int64, device=codes.device)
    c[:n] = codes.to(torch.int64)
    c = c.view(nb, _NB, k).permute(0, 2, 1).reshape(nb, k, 2, 8)  # [nb, K, half, row-in-half]
    if bits == 8:
        return c.reshape(nb, k, 16).to(torch.uint8).contiguous()
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    v = (c << shifts).sum(-1)  # [nb, K, 2], < 2^(8*bits)
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    by = (v.unsqueeze(-1) >> byte_shifts) & 0xFF  # [nb, K, 2, bits]
    return by.reshape(nb, k, 2 * bits).to(torch.uint8).contiguous()


def unpack(qw: QuantizedWeight) -> torch.Tensor:
    """The logical codes ``q [N, K]`` uint8 of ``qw``."""
    if qw.layout != CPU_LAYOUT:
        raise ValueError(f"ttscale: unknown QuantizedWeight layout {qw.layout!r}")
    n, k = qw.shape
    b = qw.bits
    p = qw.packed.to(torch.int64)
    nb = p.shape[0]
    if b == 8:
        c = p.reshape(nb, k, 16)
    else:
        by = p.reshape(nb, k, 2, b)
        v = (by << (torch.arange(b, device=p.device, dtype=torch.int64) * 8)).sum(-1)  # [nb, K, 2]
        c = (v.unsqueeze(-1) >> (torch.arange(8, device=p.device, dtype=torch.int64) * b)) & ((1 << b) - 1)
        c = c.reshape(nb, k, 16)
    return c.permute(0, 2, 1).reshape(nb * _NB, k)[:n].to(torch.uint8).contiguous()


def quantize(w: torch.Tensor, *, bits: int = 4, group_size: int = 128, symmetric: bool = False,
             scale_dtype: torch.dtype = torch.float32) -> QuantizedWeight:
    """Quantize ``w [N, K]`` (a float tensor) to ``bits`` with groups of ``group_size`` along K."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"ttscale: w must be a floating-point tensor, got {getattr(w, 'dtype', type(w).__name__)}")
    if w.dim() != 2:
        raise ValueError(f"ttscale: w must be 2-D [N, K] (out_features, in_features), got shape {tuple(w.shape)}")
    if scale_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"ttscale: scale_dtype must be float32, float16 or bfloat16, got {scale_dtype}")
    n, k = w.shape
    g = _check_format(bits, group_size, k)
    if w.device.type != "cpu":
        raise NotImplementedError(f"ttscale: quantize has no {w.device.type} layout yet (only {CPU_LAYOUT!r})")
    if n > 0 and not bool(torch.isfinite(w).all()):
        raise ValueError("ttscale: w contains NaN or inf")
    qmax = (1 << bits) - 1
    wg = w.detach().to(torch.float64).reshape(n, k // g, g)
    if symmetric:
        s = (2.0 * wg.abs().amax(-1) / qmax).clamp(min=EPS)
    else:
        hi = wg.amax(-1).clamp(min=0)
        lo = wg.amin(-1).clamp(max=0)
        s = ((hi - lo) / qmax).clamp(min=EPS)
    s_st = s.to(scale_dtype)
    s64 = s_st.to(torch.float64)
    if symmetric:
        z64 = torch.full_like(s64, float(1 << (bits - 1)))
        zeros = None
    else:
        z64 = torch.round(-lo / s64).clamp(0, qmax)
        zeros = z64.to(torch.uint8)
    q = (torch.round(wg / s64.unsqueeze(-1)) + z64.unsqueeze(-1)).clamp(0, qmax).to(torch.uint8).reshape(n, k)
    return QuantizedWeight(pack(q, bits), s_st.contiguous(), zeros, bits, group_size, (n, k), CPU_LAYOUT)


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """``w' = (q - z) * s`` as float32 ``[N, K]``."""
    n, k = qw.shape
    g = qw.group
    q = unpack(qw).to(torch.float32).reshape(n, k // g, g)
    z = qw.zeros.to(torch.float32) if qw.zeros is not None else torch.full_like(qw.scales, 1 << (qw.bits - 1), dtype=torch.float32)
    return ((q - z.unsqueeze(-1)) * qw.scales.to(torch.float32).unsqueeze(-1)).reshape(n, k)


def quant_matmul(x: torch.Tensor, qw: QuantizedWeight, *, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y = x @ dequantize(qw)^T (+ bias)``: ``x [..., K]`` float32/float16/bfloat16 -> ``[..., N]``
    in ``x.dtype``, fp32 accumulation. ``bias [N]`` must have ``x``'s dtype."""
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"ttscale: qw must be a QuantizedWeight, got {type(qw).__name__}")
    if qw.layout != CPU_LAYOUT:
        raise ValueError(f"ttscale: unknown QuantizedWeight layout {qw.layout!r}")
    return torch.ops.ttscale.quant_matmul(x, qw.packed, qw.scales, qw.zeros, qw.bits, qw.group, bias)


@torch.library.register_fake("ttscale::quant_matmul")
def _quant_matmul_fake(x, packed, scales, zeros, bits, group_size, bias):
    return x.new_empty((*x.shape[:-1], scales.shape[0]))
