"""Plain-torch references for page summaries, Quest page scores and selection, attention restricted to
a page set, attention mass, and the unfused sparse pipeline (score + top-k + gather + SDPA) used as
the bench baseline. Written from the documented semantics (python/ttscale/ops/sparse_paged_attention.py).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .attention import masked_softmax_attend
from .paged_attention import kv_lens


def page_summaries_ref(k_cache: torch.Tensor, page_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[num_pages, 3, Hkv, D]``: min and max in the cache dtype (exact), mean in float64."""
    P, ps = k_cache.shape[:2]
    lens = [ps] * P if page_lens is None else page_lens.tolist()
    out = torch.empty(P, 3, *k_cache.shape[2:], dtype=torch.float64)
    for p in range(P):
        k = k_cache[p, :lens[p]].double()
        out[p, 0], out[p, 1], out[p, 2] = k.min(0).values, k.max(0).values, k.mean(0)
    return out


def page_lens_of(num_pages: int, page_size: int, kv_indptr, kv_indices, kv_last_page_len) -> torch.Tensor:
    """Valid tokens of every page under a page table (unlisted pages: page_size)."""
    lens = torch.full((num_pages,), page_size, dtype=torch.int64)
    ip = kv_indptr.tolist()
    for b in range(len(ip) - 1):
        if ip[b + 1] > ip[b]:
            lens[int(kv_indices[ip[b + 1] - 1])] = int(kv_last_page_len[b])
    return lens


def quest_scores_ref(q: torch.Tensor, summaries: torch.Tensor, kv_indptr, kv_indices, b: int) -> torch.Tensor:
    """float64 ``[np, Hkv]`` scores of sequence ``b``'s pages: max over the group of the Quest bound."""
    Hq, D = q.shape[1:]
    Hkv = summaries.shape[2]
    g = Hq // Hkv
    ip = kv_indptr.tolist()
    pages = kv_indices[ip[b]:ip[b + 1]].long()
    s = summaries[pages].double()                      # [np, 3, Hkv, D]
    qq = q[b].double().view(Hkv, g, D)                 # [Hkv, g, D]
    mn, mx = s[:, 0].unsqueeze(2), s[:, 1].unsqueeze(2)  # [np, Hkv, 1, D]
    # q = 0 contributes 0 even against an infinite bound (where 0 * inf would be NaN)
    bound = torch.where(qq == 0, 0.0, torch.maximum(qq * mn, qq * mx)).sum(-1)  # [np, Hkv, g]
    return bound.max(-1).values


def select_ref(scores: torch.Tensor, top_k: int, sink: int, local: int) -> torch.Tensor:
    """Kept logical pages ``[Hkv, budget]`` (ascending, -1 padded) from scores ``[np, Hkv]``."""
    np_, Hkv = scores.shape
    budget = top_k + sink + local
    out = torch.full((Hkv, budget), -1, dtype=torch.int32)
    for h in range(Hkv):
        if np_ <= budget:
            kept = list(range(np_))
        else:
            mid = list(range(sink, np_ - local))
            mid.sort(key=lambda j: (-float(scores[j, h]), j))
            kept = sorted(list(range(sink)) + mid[:top_k] + list(range(np_ - local, np_)))
        out[h, :len(kept)] = torch.tensor(kept, dtype=torch.int32)
    return out


def sparse_attention_ref(q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, selected, *, scale=None,
                         dtype=torch.float64):
    """Exact attention of decode queries ``[B, Hq, D]`` over the keys of the given pages only.

    ``selected [B, Hkv, n]`` logical page indices (-1 = none). Returns ``(out, lse)`` in ``dtype``."""
    B, Hq, D = q.shape
    Hkv, ps = k_cache.shape[2], k_cache.shape[1]
    g = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, Hq, D, dtype=dtype)
    lse = torch.full((B, Hq), -math.inf, dtype=dtype)
    ip = kv_indptr.tolist()
    lens = kv_lens(kv_indptr, kv_last_page_len, ps)
    for b in range(B):
        np_ = ip[b + 1] - ip[b]
        for h in range(Hkv):
            ks, vs = [], []
            for j in selected[b, h].tolist():
                if j < 0:
                    continue
                page = int(kv_indices[ip[b] + j])
                n = ps if j + 1 < np_ else lens[b] - (np_ - 1) * ps
                ks.append(k_cache[page, :n, h])
                vs.append(v_cache[page, :n, h])
            if not ks:
                continue
            k = torch.cat(ks).to(dtype)
            v = torch.cat(vs).to(dtype)
            qq = q[b, h * g:(h + 1) * g].to(dtype)
            s = (qq @ k.T * scale)[:, None, :]  # [g, 1 query, keys]
            o, l = masked_softmax_attend(s, torch.ones_like(s, dtype=torch.bool), v[:, None, :].expand(-1, g, -1))
            out[b, h * g:(h + 1) * g] = o[0]
            lse[b, h * g:(h + 1) * g] = l[0]
    return out, lse


def attention_mass_ref(q, k_cache, kv_indptr, kv_indices, kv_last_page_len, pages, *, scale=None):
    """float64 ``[B, Hq, n]``: dense softmax mass of each listed logical page (0 for -1)."""
    B, Hq, D = q.shape
    Hkv, ps = k_cache.shape[2], k_cache.shape[1]
    g = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    ip = kv_indptr.tolist()
    lens = kv_lens(kv_indptr, kv_last_page_len, ps)
    mass = torch.zeros(B, Hq, pages.shape[2], dtype=torch.float64)
    for b in range(B):
        if lens[b] == 0:
            continue
        pg = kv_indices[ip[b]:ip[b + 1]].long()
        k = k_cache[pg].reshape(-1, Hkv, D)[:lens[b]].double()  # [L, Hkv, D]
        kk = k.repeat_interleave(g, dim=1)                      # [L, Hq, D]
        p = torch.softmax(torch.einsum("hd,lhd->hl", q[b].double(), kk) * scale, -1)  # [Hq, L]
        L = lens[b]
        per_page = torch.zeros(Hq, ip[b + 1] - ip[b], dtype=torch.float64)
        per_page.index_add_(1, torch.arange(L) // ps, p)
        for hq in range(Hq):
            for c, j in enumerate(pages[b, hq // g].tolist()):
                if j >= 0:
                    mass[b, hq, c] = per_page[hq, j]
    return mass


def unfused_sparse_decode(q, k_cache, v_cache, summaries, kv_indices, last_len: int, *, top_k_pages, sink_pages=1,
                          local_pages=1, scale=None):
    """The separate-steps pipeline for ONE sequence, in torch ops: Quest scores of every page from the
    summaries, top-k, gather of the kept pages, SDPA. Bench baseline (``q [1, Hq, D]``)."""
    _, Hq, D = q.shape
    P, ps, Hkv, _ = k_cache.shape
    g = Hq // Hkv
    np_ = kv_indices.numel()
    pages = kv_indices.long()
    s = summaries.index_select(0, pages)                        # [np, 3, Hkv, D]
    qq = q[0].view(Hkv, g, D).unsqueeze(0)                      # [1, Hkv, g, D]
    bound = torch.maximum(qq * s[:, 0:1].transpose(1, 2), qq * s[:, 1:2].transpose(1, 2)).float().sum(-1)
    score = bound.amax(-1)                                      # [np, Hkv]
    mid = score[sink_pages:np_ - local_pages]
    top = torch.topk(mid, top_k_pages, dim=0).indices + sink_pages  # [top_k, Hkv]
    forced = torch.cat([torch.arange(sink_pages), torch.arange(np_ - local_pages, np_)]).to(q.device)
    kept = torch.cat([forced.unsqueeze(1).expand(-1, Hkv), top], 0)  # [n, Hkv]
    phys = pages[kept]                                          # [n, Hkv]
    hidx = torch.arange(Hkv, device=q.device).unsqueeze(0).expand_as(phys)
    kg = k_cache[phys, :, hidx]                                 # [n, Hkv, ps, D]
    vg = v_cache[phys, :, hidx]
    # the last page may be partly filled: mask its invalid slots
    valid = torch.ones(kept.shape[0], Hkv, ps, dtype=torch.bool, device=q.device)
    valid[kept == np_ - 1, last_len:] = False
    kg = kg.permute(1, 0, 2, 3).reshape(1, Hkv, -1, D)
    vg = vg.permute(1, 0, 2, 3).reshape(1, Hkv, -1, D)
    mask = valid.permute(1, 0, 2).reshape(1, Hkv, 1, -1).repeat_interleave(g, dim=1)
    o = torch.nn.functional.scaled_dot_product_attention(q.view(1, Hq, 1, D), kg.repeat_interleave(g, 1),
                                                         vg.repeat_interleave(g, 1), attn_mask=mask, scale=scale)
    return o.view(1, Hq, D)
