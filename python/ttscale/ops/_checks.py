"""Argument checks shared by the Python wrappers and the fake (meta) kernels of the ops.

``same_device``: a call whose tensors are on different devices, one of them ``meta``, dispatches to
the op's fake kernel (the Meta / fake key wins over CPU and CUDA), so the real kernel's device check
never runs: without this, an in-place op silently did nothing and a functional one returned
uninitialised memory on the other tensors' device. Every fake kernel therefore checks devices the way
its op does.

``no_internal_overlap``: the stride rule the ops apply to tensors they write in place
(``strides_nest`` in ``csrc/common/checks.h``), so a fake kernel refuses an ``expand()``ed cache as
the op does. It needs only shapes and strides; whether two tensors share memory needs addresses,
which fake tensors do not have, so that check stays in the op.

``as_index``: integer arguments (bit widths, budgets, top-k, token ids) must be integers, not floats
or bools that compare equal to one: ``4.0 in (2, 3, 4, 8)`` is True and ``int(1.5)`` is 1, so
either would otherwise slip through silently.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch


def same_device(ref_name: str, ref: torch.Tensor, **tensors) -> None:
    """RuntimeError (the op's wording) when a non-None tensor is not on ``ref``'s device."""
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise RuntimeError(f"ttscale: {name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")


def as_index(v) -> Optional[int]:
    """``v`` as a Python int when it is an integer (int, numpy integer, single-element integer tensor);
    None for a bool, a float or anything else, so that each caller raises its own error."""
    if isinstance(v, bool) or (isinstance(v, torch.Tensor) and v.dtype == torch.bool):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def no_internal_overlap(name: str, t: Optional[torch.Tensor]) -> None:
    """RuntimeError (the op's wording) when ``t`` is written in place but its layout lets several
    elements share memory: sorted by stride, each dimension of size > 1 must step over everything
    the smaller-stride dimensions span. Symbolic shapes are left to the op (no guards added)."""
    if t is None:
        return
    sizes, strides = tuple(t.shape), tuple(t.stride())
    if not all(type(x) is int for x in sizes + strides):
        return
    if 0 in sizes:
        return
    span = 0
    for st, sz in sorted((abs(st), sz) for sz, st in zip(sizes, strides) if sz > 1):
        if st <= span:
            raise RuntimeError(f"ttscale: {name} is written in place, so each of its elements needs its own memory, "
                               f"but its layout (shape {list(sizes)}, strides {list(strides)}) lets several elements "
                               "share memory (an expand()ed, stride-0 or otherwise self-overlapping view); pass a "
                               "tensor that owns its memory")
        span += st * (sz - 1)
