"""Shared-prefix (cascade) decode for many branches of a search, built only on ttscale ops.

N branches of a search share KV pages: a root prompt, then partial steps shared by groups of
branches, then each branch's own suffix. Plain per-branch paged decode reads the shared pages once
per branch. :class:`SharedPrefixDecode` reads each shared level once for all the branches that share
it: the branches' decode queries form one non-causal multi-query block per group
(``paged_attention(q, ..., qo_indptr=[0, n_1, n_1+n_2, ...], causal=False, return_lse=True)``; on
CPU a register-blocked kernel over tiles of queries x keys, on CUDA tensor cores), and the partial
results of the levels are combined exactly with :func:`ttscale.ops.merge_attention_states_`
(FlashInfer's cascade / multi-level cascade inference; Hydragen).

A level is a CSR over groups of branches: ``qo_indptr [G+1]`` (branches ``qo_indptr[g]..qo_indptr[g+1]``
form group ``g``; branches are numbered so that every group is a contiguous range, as in a DFS order
of the search tree) plus the page table of each group's shared KV (``kv_indptr [G+1]``,
``kv_indices``, ``kv_last_page_len [G]``). The last level is usually each branch's private suffix
(``qo_indptr = arange(N+1)``); a group (or a branch) with no pages at a level is fine: it
contributes LSE ``-inf`` and the merge leaves its state unchanged.

``plan()`` validates the levels and moves the index tensors to the device; ``run()`` is then called
per layer (it only launches ops). A plan stays valid while the page table it was built from is
unchanged: re-plan after appending tokens that start a new page, after fork / copy-on-write, or when
branches are added or released. Between those events a decode step only adds one token to each
branch's last page, i.e. only the private level's ``kv_last_page_len`` changes: ``run()`` reads the
planned tensors (:attr:`SharedPrefixDecode.levels`), so updating that tensor in place (``add_(1)``)
keeps the plan current without re-planning (what the engine does for the steps between page
boundaries).

Sliding windows are not supported (a window is not a function of a level alone); softcap and
scale are.
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence, Tuple

import torch

from .ops.paged_attention import merge_attention_states_, paged_attention

__all__ = ["Level", "SharedPrefixDecode", "shared_prefix_decode"]


@dataclasses.dataclass
class Level:
    """One sharing level: group ``g`` = branches ``qo_indptr[g]..qo_indptr[g+1]``, whose shared KV is
    sequence ``g`` of the CSR page table (``kv_indptr``, ``kv_indices``, ``kv_last_page_len``)."""

    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    kv_last_page_len: torch.Tensor

    @staticmethod
    def shared(num_branches: int, kv_indices: torch.Tensor, kv_last_page_len: int) -> "Level":
        """One prefix shared by all ``num_branches`` branches (pages ``kv_indices``)."""
        dev = kv_indices.device
        return Level(torch.tensor([0, num_branches], dtype=torch.int32, device=dev),
                     torch.tensor([0, kv_indices.numel()], dtype=torch.int32, device=dev),
                     kv_indices.to(torch.int32),
                     torch.tensor([kv_last_page_len], dtype=torch.int32, device=dev))

    @staticmethod
    def per_branch(kv_indptr: torch.Tensor, kv_indices: torch.Tensor, kv_last_page_len: torch.Tensor) -> "Level":
        """Each branch's own pages (CSR over branches)."""
        n = kv_indptr.numel() - 1
        return Level(torch.arange(n + 1, dtype=torch.int32, device=kv_indptr.device), kv_indptr, kv_indices,
                     kv_last_page_len)


class SharedPrefixDecode:
    """Decode attention of N branches over multi-level shared KV (module docstring).

    Example (one shared prompt + private suffixes)::

        spd = SharedPrefixDecode()
        spd.plan([Level.shared(N, prefix_pages, prefix_last_len),
                  Level.per_branch(suffix_indptr, suffix_indices, suffix_last_len)])
        out = spd.run(q, k_cache, v_cache)          # q [N, Hq, D] -> out [N, Hq, D]
    """

    def __init__(self) -> None:
        self._levels: Optional[List[Level]] = None
        self._num_branches = 0

    @property
    def num_branches(self) -> int:
        return self._num_branches

    @property
    def levels(self) -> List[Level]:
        """The planned levels (int32, contiguous, on the plan's device); ``run()`` reads these tensors,
        so in-place updates of them (e.g. the private level's ``kv_last_page_len``) take effect."""
        if self._levels is None:
            raise RuntimeError("ttscale: SharedPrefixDecode.levels read before plan()")
        return self._levels

    def plan(self, levels: Sequence[Level], device: Optional[torch.device] = None) -> "SharedPrefixDecode":
        if len(levels) == 0:
            raise ValueError("ttscale: SharedPrefixDecode.plan needs at least one level")
        planned = []
        n = None
        for i, lv in enumerate(levels):
            if not isinstance(lv, Level):
                lv = Level(*lv)
            qo = lv.qo_indptr
            if qo.dim() != 1 or qo.numel() < 1:
                raise ValueError(f"ttscale: levels[{i}].qo_indptr must be 1-D [G+1], got shape {tuple(qo.shape)}")
            if lv.kv_indptr.numel() != qo.numel():
                raise ValueError(f"ttscale: levels[{i}].kv_indptr must have one entry per group plus one "
                                 f"({qo.numel()}, like qo_indptr), got {lv.kv_indptr.numel()}")
            qo_h = qo.to("cpu", torch.int64)
            if qo_h[0].item() != 0 or bool((qo_h[1:] < qo_h[:-1]).any()):
                raise ValueError(f"ttscale: levels[{i}].qo_indptr must start at 0 and be non-decreasing")
            last = int(qo_h[-1].item())
            if n is None:
                n = last
            elif last != n:
                raise ValueError(f"ttscale: levels[{i}].qo_indptr ends at {last} branches but levels[0] has {n}; "
                                 "every level must cover all branches")
            dev = device if device is not None else lv.kv_indices.device
            planned.append(Level(*(t.to(device=dev, dtype=torch.int32).contiguous()
                                   for t in (qo, lv.kv_indptr, lv.kv_indices, lv.kv_last_page_len))))
        self._levels = planned
        self._num_branches = int(n)
        return self

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, scale: Optional[float] = None,
            softcap: float = 0.0, return_lse: bool = False):
        """``q [N, Hq, D]`` (one decode query per branch) -> ``out [N, Hq, D]`` (and ``lse [N, Hq]``)."""
        if self._levels is None:
            raise RuntimeError("ttscale: SharedPrefixDecode.run called before plan()")
        if q.dim() != 3 or q.shape[0] != self._num_branches:
            raise ValueError(f"ttscale: q must be [num_branches={self._num_branches}, Hq, D], got {tuple(q.shape)}")
        if scale is None:
            scale = 1.0 / math.sqrt(q.shape[-1])
        out = lse = None
        for lv in self._levels:
            o, l = paged_attention(q, k_cache, v_cache, lv.kv_indptr, lv.kv_indices, lv.kv_last_page_len,
                                   qo_indptr=lv.qo_indptr, causal=False, scale=scale, softcap=softcap,
                                   return_lse=True)
            if out is None:
                out, lse = o, l
            else:
                merge_attention_states_(out, lse, o, l)
        return (out, lse) if return_lse else out


def shared_prefix_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, levels: Sequence[Level],
                         **kw):
    """One-shot ``SharedPrefixDecode().plan(levels).run(q, k_cache, v_cache, **kw)``."""
    return SharedPrefixDecode().plan(levels, device=q.device).run(q, k_cache, v_cache, **kw)
