"""Plain-torch reference of ``ttscale.ops.attention`` (float64-capable; also a bench baseline).

Written from the documented semantics (``ttscale.ops.attention``): it materialises the full
logit matrix per sequence, so use it for tests and moderate sizes only.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["attention_ref", "masked_softmax_attend"]


def masked_softmax_attend(s: torch.Tensor, vis: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of scores ``s [H, Q, K]`` over values ``v [K, H, D]``, keys where ``vis``
    (broadcastable to ``s``) is False excluded exactly: ``(out [Q, H, D], lse [Q, H])``.

    The non-finite contract of the ops (csrc/common/attention_math.h): an invisible key never
    touches a row, whatever its K / V hold (a plain ``p @ v`` would give 0 * inf = NaN there); a
    NaN or +inf visible score makes the row's output and LSE NaN; a row with no visible key gets
    output 0 and LSE -inf; a non-finite visible value gives the IEEE ``sum p_j v_j``."""
    vis = vis.expand_as(s)
    s = s.masked_fill(~vis, float("-inf"))
    poisoned = (~(s < float("inf"))).any(-1)  # NaN or +inf among the visible scores: [H, Q]
    lse = torch.logsumexp(s, dim=-1)
    ok = ~(torch.isinf(lse) | poisoned)
    p = torch.exp(s - torch.where(ok, lse, torch.zeros_like(lse))[..., None])
    p = torch.where(vis, p, torch.zeros_like(p))
    finite = torch.isfinite(v)
    out = torch.einsum("hqk,khd->qhd", p, torch.where(finite, v, torch.zeros_like(v)))
    # non-finite values enter only through the visible keys' terms, added one value element at a time
    for k, h, d in (~finite).nonzero().tolist():
        term = p[h, :, k] * v[k, h, d]
        out[:, h, d] += torch.where(vis[h, :, k], term, torch.zeros_like(term))
    lse = torch.where(poisoned, torch.full_like(lse, float("nan")), lse)
    out = torch.where(poisoned.transpose(0, 1)[..., None], torch.full_like(out, float("nan")), out)
    return out, lse.transpose(0, 1)


def _one(q, k, v, causal, scale, window_left, softcap):
    # q [Sq, Hq, D], k/v [Sk, Hkv, D] in the compute dtype -> out [Sq, Hq, D], lse [Sq, Hq]
    sq, hq, d = q.shape
    sk, hkv = k.shape[0], k.shape[1]
    g = hq // hkv
    kk = k.repeat_interleave(g, dim=1)
    vv = v.repeat_interleave(g, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, kk) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    pos = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
    kj = torch.arange(sk, device=q.device)[None, :]
    vis = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        vis &= kj <= pos
    if window_left >= 0:
        vis &= (pos - kj) <= window_left  # not kj >= pos - window_left: int64 overflow near sys.maxsize
    return masked_softmax_attend(s, vis, vv)


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    window_left: int = -1,
    softcap: float = 0.0,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    compute_dtype: Optional[torch.dtype] = torch.float64,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out, lse)`` in ``compute_dtype`` (``None``: q's dtype, i.e. plain torch in that dtype)."""
    cd = compute_dtype or q.dtype
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    qc, kc, vc = q.to(cd), k.to(cd), v.to(cd)
    if q.dim() == 4:
        outs, lses = [], []
        for b in range(q.shape[0]):
            o, l = _one(qc[b], kc[b], vc[b], causal, scale, window_left, softcap)
            outs.append(o)
            lses.append(l)
        return torch.stack(outs), torch.stack(lses)
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    out = torch.zeros(q.shape, dtype=cd, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=cd, device=q.device)
    for b in range(len(cq) - 1):
        if cq[b + 1] == cq[b]:
            continue
        o, l = _one(qc[cq[b]:cq[b + 1]], kc[ck[b]:ck[b + 1]], vc[ck[b]:ck[b + 1]], causal, scale, window_left, softcap)
        out[cq[b]:cq[b + 1]] = o
        lse[cq[b]:cq[b + 1]] = l
    return out, lse
