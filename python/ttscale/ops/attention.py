"""Dense flash attention forward (prefill), CPU and CUDA.

``attention(q, k, v, *, causal=False, scale=None, window_left=-1, softcap=0.0, cu_seqlens_q=None,
cu_seqlens_k=None, return_lse=False)``

Layouts:

* padded: ``q [B, Sq, Hq, D]``, ``k, v [B, Sk, Hkv, D]``;
* ragged: ``q [Tq, Hq, D]``, ``k, v [Tk, Hkv, D]`` with ``cu_seqlens_q``, ``cu_seqlens_k`` int32
  ``[B+1]`` token offsets (starting at 0, non-decreasing, last entry = number of tokens; empty
  sequences allowed). Both are required for ragged inputs and rejected for padded ones.

``Hq`` must be a multiple of ``Hkv`` (GQA / MQA: query head ``h`` reads KV head ``h // (Hq // Hkv)``).
Head dims 64, 128, 256; dtypes float32, float16, bfloat16 (q, k, v alike; accumulation in
float32). Only the last dimension must be contiguous.

Semantics: logits ``s = scale * q . k`` (``scale`` defaults to ``1/sqrt(D)``), then, if ``softcap > 0``,
``s = softcap * tanh(s / softcap)``. Query ``i`` of a sequence sits at key position
``i + Sk - Sq`` (causal masks aligned bottom-right, as FlashAttention >= 2.1): with ``causal`` it
sees keys ``j <= pos``; with ``window_left >= 0`` only keys ``j >= pos - window_left``. The output
is ``softmax(s) @ v`` over the visible keys, in q's dtype, shaped like q. With ``return_lse`` the
natural-log log-sum-exp of the visible logits is returned too, float32, shaped like q without D
(``[B, Sq, Hq]`` or ``[Tq, Hq]``). A query with no visible key gets output 0 and LSE ``-inf``. Non-finite values:
a key a query cannot see never touches its output or LSE, whatever K/V hold there; a NaN or +inf
visible logit makes the row's output and LSE NaN (as torch's SDPA); see README "Attention and
non-finite values".
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ._checks import same_device

__all__ = ["attention"]


def attention(
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
    return_lse: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Flash attention forward; see the module docstring. Returns ``out`` or ``(out, lse)``."""
    out, lse = torch.ops.ttscale.attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, bool(causal), None if scale is None else float(scale),
        int(window_left), float(softcap), bool(return_lse),
    )
    return (out, lse) if return_lse else out


@torch.library.register_fake("ttscale::attention")
def _attention_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, window_left, softcap, return_lse):
    same_device("q", q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)  # see _checks.py
    out = q.new_empty(q.shape)
    lse = q.new_empty(tuple(q.shape[:-1]) if return_lse else (0,), dtype=torch.float32)
    return out, lse
