"""Attention against a paged KV cache, exact merging of attention states, and paged KV-cache writes.

Paged KV format (DESIGN.md): ``k_cache, v_cache: [num_pages, page_size, num_kv_heads, head_dim]``
(last dimension contiguous). A batch of ``B`` sequences is a CSR page table of int32 tensors:
``kv_indptr [B+1]`` (``kv_indptr[0] == 0``, non-decreasing, ``kv_indptr[B] == len(kv_indices)``),
``kv_indices [nnz]`` (page ids in ``[0, num_pages)``, in sequence order) and ``kv_last_page_len [B]``
(tokens in each sequence's last page, ``1..page_size``; ``0`` is also accepted for a sequence with
no pages). ``kv_len(b) = (pages(b) - 1) * page_size + kv_last_page_len[b]``. Any page size >= 1.

Queries are ragged: ``q [T, Hq, D]``; rows ``qo_indptr[b]..qo_indptr[b+1]`` belong to sequence ``b``
(default: one row per sequence, i.e. decode). GQA: ``Hq`` a multiple of ``Hkv``; query head ``h``
reads KV head ``h // (Hq // Hkv)``. Query ``i`` of the ``n`` queries of a sequence sits at key position
``i + kv_len - n`` (causal masks aligned bottom-right, like FlashAttention >= 2.1 and FlashInfer).

LSE is the natural-log softmax normaliser, float32 ``[T, Hq]``. A query that sees no key (empty
sequence, or fully masked) gets output 0 and LSE ``-inf``; merging with such a state is exact. Non-finite values:
a key a query cannot see never touches its output or LSE, whatever K/V hold there; a NaN or +inf
visible logit makes the row's output and LSE NaN (as torch's SDPA); see README "Attention and
non-finite values".
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from ._checks import no_internal_overlap, same_device

__all__ = ["paged_attention", "merge_attention_states", "merge_attention_states_", "append_paged_kv", "copy_pages"]


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    *,
    qo_indptr: Optional[torch.Tensor] = None,
    causal: bool = True,
    scale: Optional[float] = None,
    window_left: int = -1,
    softcap: float = 0.0,
    return_lse: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Attention of ragged queries against a paged KV cache (module docstring: formats).

    Args:
        q: ``[T, Hq, D]`` float32/float16/bfloat16, same dtype as the caches; D in {64, 128, 256}.
        k_cache, v_cache: ``[num_pages, page_size, Hkv, D]``.
        kv_indptr, kv_indices, kv_last_page_len: the CSR page table (int32).
        qo_indptr: ``[B+1]`` int32 row offsets of each sequence's queries in ``q``; ``None`` means one
            query per sequence (decode, ``T == B``).
        causal: mask keys after the query's position (bottom-right aligned). ``causal=False`` with
            ``qo_indptr=[0, N]`` is the shared-prefix block: N queries all see every key.
        scale: logit scale, default ``1/sqrt(D)``.
        window_left: sliding window, keys at positions ``>= q_pos - window_left`` are kept; -1 disables.
        softcap: tanh soft-capping of the scaled logits, ``cap * tanh(s / cap)``; 0 disables.
        return_lse: also return the float32 LSE ``[T, Hq]``.

    Returns:
        ``out [T, Hq, D]`` in q's dtype, or ``(out, lse)``.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = torch.ops.ttscale.paged_attention(q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len,
                                                 qo_indptr, bool(causal), float(scale), int(window_left),
                                                 float(softcap), bool(return_lse))
    return (out, lse) if return_lse else out


def merge_attention_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                           lse_b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two attention results over disjoint key sets (FlashInfer ``merge_state``, natural log).

    ``lse = log(e^lse_a + e^lse_b)``, ``out = e^(lse_a - lse) out_a + e^(lse_b - lse) out_b``. Shapes
    ``[T, H, D]`` (float32/16/bf16, same dtype) and float32 ``[T, H]``. A state with LSE ``-inf``
    (no keys) gets weight 0 and contributes nothing as long as its ``out`` is finite (the attention
    ops write zeros there; NaN or inf times 0 is still NaN); both ``-inf`` gives output 0 and LSE
    ``-inf``. An LSE of ``+inf`` or NaN gives NaN. The operation is commutative and associative (up
    to rounding).
    """
    return torch.ops.ttscale.merge_attention_states(out_a, lse_a, out_b, lse_b)


def merge_attention_states_(out: torch.Tensor, lse: torch.Tensor, out_other: torch.Tensor,
                            lse_other: torch.Tensor) -> None:
    """In-place :func:`merge_attention_states`: ``(out, lse) <- merge((out, lse), (out_other, lse_other))``.
    ``out`` and ``lse`` must be contiguous and share no memory with each other or with ``out_other`` /
    ``lse_other`` (RuntimeError otherwise)."""
    torch.ops.ttscale.merge_attention_states_(out, lse, out_other, lse_other)


def append_paged_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    *,
    batch_indices: Optional[torch.Tensor] = None,
    positions: Optional[torch.Tensor] = None,
    append_indptr: Optional[torch.Tensor] = None,
    summaries: Optional[torch.Tensor] = None,
) -> None:
    """Write new tokens' keys and values ``k, v [N, Hkv, D]`` into their pages, in place.

    The page table describes the sequences **after** the append (FlashInfer ``append_paged_kv_cache``):
    the caller first allocates pages / bumps ``kv_last_page_len``, then writes. Where token ``i`` goes:

    * ``batch_indices [N]`` and ``positions [N]`` (int32/int64), as FlashInfer: token ``i`` is written
      at position ``positions[i]`` (``0 <= positions[i] < kv_len``) of sequence ``batch_indices[i]``;
    * or ``append_indptr [B+1]`` (int32): rows ``append_indptr[b]..append_indptr[b+1]`` of ``k``/``v``
      are the *last* tokens of sequence ``b``, in order;
    * or neither: one new token per sequence (``N == B``), written at each sequence's last position.

    Positions are validated against the page table (ValueError naming the bad entry); duplicate
    destinations are allowed and the later token wins on CPU (unspecified order on CUDA).

    Memory: ``k_cache``, ``v_cache`` and ``summaries`` are written in place, so each must give every
    element its own memory (no ``expand()``ed / stride-0 / self-overlapping view; a strided view
    such as ``kv[:, 0]`` and ``kv[:, 1]`` of one ``[P, 2, page, H, D]`` buffer is fine), none may
    share memory with another, and ``k``/``v`` must not share memory with the caches (``clone()``
    them); RuntimeError otherwise.

    ``summaries`` (optional, ``[num_pages, 3, Hkv, D]`` from :func:`ttscale.ops.new_page_summaries`):
    every page written to is re-summarised, in place, over the tokens the page table gives it (a
    partly filled last page only over its written tokens), so sparse decode sees current summaries.
    """
    torch.ops.ttscale.append_paged_kv(k, v, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, batch_indices,
                                      positions, append_indptr, summaries)


def copy_pages(k_cache: torch.Tensor, v_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, *,
               summaries: Optional[torch.Tensor] = None) -> None:
    """Copy whole pages ``src[i] -> dst[i]`` in both caches, in place (copy-on-write when a branch
    forks mid-page). ``src, dst [P]`` int32/int64; destinations must be distinct and must not be sources.
    With ``summaries`` (page key summaries, :func:`ttscale.ops.new_page_summaries`) the copied pages'
    summaries are copied too; later appends to the copy re-summarise it (``append_paged_kv``). The
    caches and ``summaries`` follow :func:`append_paged_kv`'s memory rules (RuntimeError otherwise)."""
    torch.ops.ttscale.copy_pages(k_cache, v_cache, src, dst, summaries)


# ---------------------------------------------------------------- fake (meta) kernels (device checks: _checks.py)
@torch.library.register_fake("ttscale::paged_attention")
def _paged_attention_fake(q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, qo_indptr, causal, scale,
                          window_left, softcap, return_lse):
    same_device("q", q, k_cache=k_cache, v_cache=v_cache, kv_indptr=kv_indptr, kv_indices=kv_indices,
                 kv_last_page_len=kv_last_page_len, qo_indptr=qo_indptr)
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.register_fake("ttscale::merge_attention_states")
def _merge_fake(out_a, lse_a, out_b, lse_b):
    same_device("out_a", out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)
    return torch.empty_like(out_a, memory_format=torch.contiguous_format), \
        torch.empty_like(lse_a, memory_format=torch.contiguous_format)


@torch.library.register_fake("ttscale::merge_attention_states_")
def _merge_inplace_fake(out, lse, out_other, lse_other):
    same_device("out", out, lse=lse, out_other=out_other, lse_other=lse_other)
    for name, t in (("out", out), ("lse", lse)):
        no_internal_overlap(name, t)
    return None


@torch.library.register_fake("ttscale::append_paged_kv")
def _append_fake(k, v, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, batch_indices, positions,
                 append_indptr, summaries=None):
    same_device("k_cache", k_cache, k=k, v=v, v_cache=v_cache, kv_indptr=kv_indptr, kv_indices=kv_indices,
                 kv_last_page_len=kv_last_page_len, batch_indices=batch_indices, positions=positions,
                 append_indptr=append_indptr, summaries=summaries)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("summaries", summaries)):
        no_internal_overlap(name, t)
    return None


@torch.library.register_fake("ttscale::copy_pages")
def _copy_pages_fake(k_cache, v_cache, src, dst, summaries=None):
    same_device("k_cache", k_cache, v_cache=v_cache, src=src, dst=dst, summaries=summaries)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("summaries", summaries)):
        no_internal_overlap(name, t)
    return None
