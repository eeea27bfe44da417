"""Query-aware sparse paged decode (Quest-style block top-k), page key summaries and attention mass.

Long chains of thought make decode attention the dominant cost; most of a long context gets little
attention mass from any one query. ``sparse_paged_attention`` scores every page of the paged KV cache
(format: :mod:`ttscale.ops.paged_attention`) by an upper bound of the query's logits over the page,
keeps the best pages and attends exactly over them -- score, select and attend in one op.

**Page summaries** ``summaries [num_pages, 3, Hkv, D]``, in the cache dtype: ``summaries[p, 0]`` is
the element-wise min, ``summaries[p, 1]`` the element-wise max and ``summaries[p, 2]`` the mean of
the keys in page ``p``'s first ``n`` slots (``n`` = the page's valid tokens). Min and max are exact
(they are stored key values); the mean is summed in float32 in slot order and rounded once to the
cache dtype. Scoring reads only min and max: ``2 / page_size`` of the key bytes.

Valid lengths: :func:`new_page_summaries` and :func:`update_page_summaries` summarise all
``page_size`` slots unless ``page_lens`` says how many are written. ``append_paged_kv(...,
summaries=s)`` keeps them current: every page it writes is re-summarised over the tokens the page
table (after the append) says it holds, so a partly filled last page summarises only its written
tokens and the result equals ``update_page_summaries`` on those pages bit for bit.
``copy_pages(..., summaries=s)`` copies the summaries with the pages (copy-on-write forks); pages
shared by several branches share their summaries.

**Selection** (per sequence ``b`` with ``np`` pages and KV head ``h``): page ``j`` scores
``max_g sum_d max(q_gd * min_jd, q_gd * max_jd)`` over the query heads ``g`` of the GQA group -- the
Quest upper bound of ``q_g . k`` over the page's keys; the max over the group keeps a page that any
head of the group may need. If ``np <= sink_pages + local_pages + top_k_pages`` every page is kept
and the result is dense :func:`~ttscale.ops.paged_attention`. Otherwise the first ``sink_pages``, the
last ``local_pages`` and the ``top_k_pages`` best of the others (score descending, ties to the lower
page index) are kept, and attention over their keys is exact.

Selected pages are **logical** page indices (positions in the sequence's page list, i.e. physical page
``kv_indices[kv_indptr[b] + j]``), as ``selected [B, Hkv, W]`` int32, ascending, padded with -1, where
``W = min(budget, len(kv_indices))`` and ``budget = sink_pages + local_pages + top_k_pages``: the
budget whenever the page table holds at least that many pages (every real sparse call), otherwise
the page table's size, which no sequence can exceed. So a budget far above the cache
(``top_k_pages=2**30`` to keep everything) allocates nothing by the budget, and ``W`` depends on
shapes only (``torch.compile`` knows it without reading the page table). :func:`attention_mass`
takes the same format.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from ._checks import as_index, no_internal_overlap, same_device

__all__ = ["new_page_summaries", "update_page_summaries", "sparse_paged_attention", "attention_mass"]


def new_page_summaries(k_cache: torch.Tensor, page_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Summaries ``[num_pages, 3, Hkv, D]`` (min, max, mean; cache dtype) of every page of ``k_cache``.

    Args:
        k_cache: ``[num_pages, page_size, Hkv, D]``.
        page_lens: optional ``[num_pages]`` int32/int64, written tokens of each page (``1..page_size``);
            default: every slot. Pages that are not full should get their length here (or be refreshed
            by ``append_paged_kv(..., summaries=...)`` as tokens arrive).
    """
    return torch.ops.ttscale.new_page_summaries(k_cache, page_lens)


def update_page_summaries(k_cache: torch.Tensor, summaries: torch.Tensor, pages: torch.Tensor,
                          page_lens: Optional[torch.Tensor] = None) -> None:
    """Recompute, in place, the summaries of ``pages [n]`` (distinct page ids) over their first
    ``page_lens [n]`` tokens (default: every slot). ``summaries`` is written in place: it must give
    every element its own memory (not an ``expand()``ed view) and share none with ``k_cache``
    (RuntimeError otherwise)."""
    torch.ops.ttscale.update_page_summaries(k_cache, summaries, pages, page_lens)


def sparse_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    summaries: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    *,
    top_k_pages: int,
    sink_pages: int = 1,
    local_pages: int = 1,
    scale: Optional[float] = None,
    return_lse: bool = False,
    return_selected: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """Decode attention over the query-aware top pages of each sequence and KV head (module docstring).

    Args:
        q: ``[B, Hq, D]``, one query per sequence (decode), same dtype as the caches.
        k_cache, v_cache: ``[num_pages, page_size, Hkv, D]``.
        summaries: ``[num_pages, 3, Hkv, D]`` from :func:`new_page_summaries` (cache dtype).
        kv_indptr, kv_indices, kv_last_page_len: the CSR page table (int32).
        top_k_pages, sink_pages, local_pages: the budget (each >= 0, their sum <= 2^30).
        scale: logit scale, default ``1/sqrt(D)``.
        return_lse: also return the float32 LSE ``[B, Hq]`` over the kept keys.
        return_selected: also return ``selected [B, Hkv, min(budget, len(kv_indices))]`` int32
            (logical page indices, ascending, -1 padded; module docstring).

    Returns:
        ``out [B, Hq, D]`` (q's dtype), then ``lse`` and/or ``selected`` when asked for.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    budget = {"top_k_pages": top_k_pages, "sink_pages": sink_pages, "local_pages": local_pages}
    for name, v in budget.items():
        i = as_index(v)  # int(1.5) would silently be 1
        if i is None:
            raise TypeError(f"ttscale: {name} must be an int, got {v!r}")
        # values outside int64 cannot reach the op (the schema's int); refuse them with the op's own
        # rules (>= 0, sum <= 2^30) rather than the binding's overflow error
        if i < 0:
            raise ValueError(f"ttscale: {name} must be >= 0, got {v}")
        if i >= 2**63:
            raise ValueError(f"ttscale: top_k_pages + sink_pages + local_pages must be <= 2^30 (each term and "
                             f"their sum), got {name} = {v}")
        budget[name] = i
    out, lse, sel = torch.ops.ttscale.sparse_paged_attention(q, k_cache, v_cache, summaries, kv_indptr, kv_indices,
                                                             kv_last_page_len, budget["top_k_pages"],
                                                             budget["sink_pages"], budget["local_pages"], float(scale))
    res = (out,) + ((lse,) if return_lse else ()) + ((sel,) if return_selected else ())
    return res[0] if len(res) == 1 else res


def attention_mass(q: torch.Tensor, k_cache: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                   kv_last_page_len: torch.Tensor, pages: torch.Tensor, *,
                   scale: Optional[float] = None) -> torch.Tensor:
    """Exact softmax mass each listed page receives from each query head (decode: ``q [B, Hq, D]``).

    ``pages [B, Hkv, n]`` int32: logical page indices of sequence ``b`` (as ``selected`` of
    :func:`sparse_paged_attention`), -1 for none. Returns float32 ``[B, Hq, n]``: for query head
    ``hq`` (KV head ``hq // (Hq // Hkv)``), the sum of its dense softmax probabilities over the keys of
    that page (0 for -1). ``mass.sum(-1)`` is the fraction of attention a selection keeps (recall).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return torch.ops.ttscale.attention_mass(q, k_cache, kv_indptr, kv_indices, kv_last_page_len, pages, float(scale))


# ---------------------------------------------------------------- fake (meta) kernels
@torch.library.register_fake("ttscale::new_page_summaries")
def _new_page_summaries_fake(k_cache, page_lens=None):
    same_device("k_cache", k_cache, page_lens=page_lens)
    return k_cache.new_empty((k_cache.shape[0], 3, k_cache.shape[2], k_cache.shape[3]))


@torch.library.register_fake("ttscale::update_page_summaries")
def _update_page_summaries_fake(k_cache, summaries, pages, page_lens=None):
    same_device("k_cache", k_cache, summaries=summaries, pages=pages, page_lens=page_lens)
    no_internal_overlap("summaries", summaries)
    return None


@torch.library.register_fake("ttscale::sparse_paged_attention")
def _sparse_paged_attention_fake(q, k_cache, v_cache, summaries, kv_indptr, kv_indices, kv_last_page_len, top_k_pages,
                                 sink_pages, local_pages, scale):
    same_device("q", q, k_cache=k_cache, v_cache=v_cache, summaries=summaries, kv_indptr=kv_indptr,
                kv_indices=kv_indices, kv_last_page_len=kv_last_page_len)  # see _checks.py
    if top_k_pages < 0 or sink_pages < 0 or local_pages < 0:
        raise ValueError("ttscale: top_k_pages, sink_pages and local_pages must be >= 0")
    if max(top_k_pages, sink_pages, local_pages) > 2**30 or top_k_pages + sink_pages + local_pages > 2**30:
        raise ValueError(f"ttscale: top_k_pages + sink_pages + local_pages must be <= 2^30 (each term and their sum), "
                         f"got {top_k_pages} + {sink_pages} + {local_pages}")
    # the op's row width: min(budget, nnz), from shapes only (module docstring)
    width = torch.sym_min(top_k_pages + sink_pages + local_pages, kv_indices.shape[0])
    B, Hq, D = q.shape
    return (torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, Hq), dtype=torch.float32),
            q.new_empty((B, k_cache.shape[2], width), dtype=torch.int32))


@torch.library.register_fake("ttscale::attention_mass")
def _attention_mass_fake(q, k_cache, kv_indptr, kv_indices, kv_last_page_len, pages, scale):
    same_device("q", q, k_cache=k_cache, kv_indptr=kv_indptr, kv_indices=kv_indices,
                kv_last_page_len=kv_last_page_len, pages=pages)
    return q.new_empty((q.shape[0], q.shape[1], pages.shape[2]), dtype=torch.float32)
