"""Float64 reference for low-bit weight-only matmul, written from the formulas in issue 5 /
``ttscale.ops.quant_matmul``'s docstring (group by group, independent of the packed layout).

* ``quantize_ref(w, bits, group_size, symmetric, scale_dtype)`` -> ``(q [N, K] int64, s [N, K/G]
  in scale_dtype, z [N, K/G] int64)``; ``s`` is computed in float64 and rounded once to
  ``scale_dtype``, ``z`` and ``q`` use the rounded ``s``; round is half-to-even.
* ``dequantize_ref(q, s, z, group_size)`` -> ``(q - z) * s`` in float64.
* ``linear_ref(x, w_deq, bias)`` -> ``x @ w_deq^T + bias`` in float64.
"""
from __future__ import annotations

from typing import Optional

import torch

EPS = 1e-12

__all__ = ["quantize_ref", "dequantize_ref", "linear_ref"]


def quantize_ref(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                 scale_dtype: torch.dtype = torch.float32):
    n, k = w.shape
    g = k if group_size == -1 else group_size
    qmax = 2 ** bits - 1
    w = w.to(torch.float64)
    eps = max(EPS, float(torch.finfo(scale_dtype).tiny))  # float16: its smallest normal, not a zero scale
    qs, ss, zs = [], [], []
    for j in range(k // g):
        wg = w[:, j * g:(j + 1) * g]
        if symmetric:
            s = torch.maximum(2 * wg.abs().max(dim=1).values / qmax, torch.tensor(eps, dtype=torch.float64))
        else:
            mx = torch.maximum(wg.max(dim=1).values, torch.zeros(n, dtype=torch.float64))
            mn = torch.minimum(wg.min(dim=1).values, torch.zeros(n, dtype=torch.float64))
            s = torch.maximum((mx - mn) / qmax, torch.tensor(eps, dtype=torch.float64))
        s = s.to(scale_dtype).to(torch.float64)
        if symmetric:
            z = torch.full((n,), 2.0 ** (bits - 1), dtype=torch.float64)
        else:
            z = torch.clamp(torch.round(-mn / s), 0, qmax)
        q = torch.clamp(torch.round(wg / s[:, None]) + z[:, None], 0, qmax)
        qs.append(q)
        ss.append(s)
        zs.append(z)
    return (torch.cat(qs, dim=1).to(torch.int64), torch.stack(ss, dim=1).to(scale_dtype),
            torch.stack(zs, dim=1).to(torch.int64))


def dequantize_ref(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = q.shape
    g = k if group_size == -1 else group_size
    s64 = s.to(torch.float64).repeat_interleave(g, dim=1)
    z64 = z.to(torch.float64).repeat_interleave(g, dim=1)
    return (q.to(torch.float64) - z64) * s64


def linear_ref(x: torch.Tensor, w_deq: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    y = x.to(torch.float64) @ w_deq.to(torch.float64).T
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y
