"""Plain-torch references for paged attention, attention-state merge and paged KV writes.

Computed in float64 by default (``dtype=torch.float64``) from the same stored values the kernel reads:
pages are gathered into a dense ``[kv_len, Hkv, D]`` sequence, then dense masked attention per sequence.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from .attention import masked_softmax_attend


def kv_lens(kv_indptr: torch.Tensor, kv_last_page_len: torch.Tensor, page_size: int) -> List[int]:
    ip = kv_indptr.tolist()
    last = kv_last_page_len.tolist()
    return [(ip[b + 1] - ip[b] - 1) * page_size + last[b] if ip[b + 1] > ip[b] else 0 for b in range(len(last))]


def gather_kv(cache: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor, kv_last_page_len: torch.Tensor,
              b: int) -> torch.Tensor:
    """Dense ``[kv_len, Hkv, D]`` keys (or values) of sequence ``b``."""
    ps = cache.shape[1]
    ip = kv_indptr.tolist()
    pages = kv_indices[ip[b]:ip[b + 1]].long().to(cache.device)
    n = kv_lens(kv_indptr[b:b + 2] - kv_indptr[b], kv_last_page_len[b:b + 1], ps)[0]
    return cache[pages].reshape(-1, cache.shape[2], cache.shape[3])[:n]


def paged_attention_ref(q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, *, qo_indptr=None, causal=True,
                        scale=None, window_left=-1, softcap=0.0, dtype=torch.float64) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` in ``dtype`` (out ``[T, Hq, D]``, lse ``[T, Hq]``, natural log; -inf and 0 when no key)."""
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    g = Hq // Hkv
    B = kv_indptr.numel() - 1
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qo = list(range(B + 1)) if qo_indptr is None else qo_indptr.tolist()
    out = torch.zeros(T, Hq, D, dtype=dtype)
    lse = torch.full((T, Hq), -math.inf, dtype=dtype)
    for b in range(B):
        nq = qo[b + 1] - qo[b]
        if nq == 0:
            continue
        k = gather_kv(k_cache, kv_indptr, kv_indices, kv_last_page_len, b).to("cpu", dtype)
        v = gather_kv(v_cache, kv_indptr, kv_indices, kv_last_page_len, b).to("cpu", dtype)
        L = k.shape[0]
        if L == 0:
            continue
        qb = q[qo[b]:qo[b + 1]].to("cpu", dtype)  # [nq, Hq, D]
        kk = k.repeat_interleave(g, dim=1)  # [L, Hq, D]
        vv = v.repeat_interleave(g, dim=1)
        s = torch.einsum("qhd,khd->hqk", qb, kk) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        qpos = torch.arange(nq).unsqueeze(1) + (L - nq)
        kpos = torch.arange(L).unsqueeze(0)
        vis = torch.ones(nq, L, dtype=torch.bool)
        if causal:
            vis &= kpos <= qpos
        if window_left >= 0:
            vis &= (qpos - kpos) <= window_left  # not kpos >= qpos - window_left: int64 overflow
        o, l = masked_softmax_attend(s, vis, vv)
        out[qo[b]:qo[b + 1]] = o
        lse[qo[b]:qo[b + 1]] = l
    return out, lse


def merge_attention_states_ref(out_a, lse_a, out_b, lse_b, dtype=torch.float64):
    a, b = out_a.to(dtype), out_b.to(dtype)
    la, lb = lse_a.to(dtype), lse_b.to(dtype)
    lse = torch.logaddexp(la, lb)
    # both empty (-inf): weights 0 (exp(-inf - -inf) is NaN); a NaN or +inf state: weights and LSE NaN
    empty = torch.isneginf(lse)
    bad = ~(la < math.inf) | ~(lb < math.inf)
    nan = torch.full_like(lse, math.nan)
    wa = torch.where(empty, torch.zeros_like(lse), torch.exp(la - lse))
    wb = torch.where(empty, torch.zeros_like(lse), torch.exp(lb - lse))
    wa, wb, lse = (torch.where(bad, nan, x) for x in (wa, wb, lse))
    return wa.unsqueeze(-1) * a + wb.unsqueeze(-1) * b, lse


def build_page_table(seq_lens: List[int], page_size: int, num_pages: Optional[int] = None, generator=None,
                     device="cpu"):
    """A random (shuffled, non-overlapping) page assignment for sequences of the given lengths.

    Returns ``(kv_indptr, kv_indices, kv_last_page_len, num_pages)``."""
    npages = [(n + page_size - 1) // page_size for n in seq_lens]
    total = sum(npages)
    num_pages = max(total + 3, 1) if num_pages is None else num_pages
    perm = torch.randperm(num_pages, generator=generator)[:total].to(torch.int32)
    indptr = torch.tensor([0] + list(torch.tensor(npages).cumsum(0).tolist() if npages else []), dtype=torch.int32)
    last = torch.tensor([(n - (p - 1) * page_size) if p > 0 else 0 for n, p in zip(seq_lens, npages)],
                        dtype=torch.int32)
    return indptr.to(device), perm.to(device), last.to(device), num_pages
