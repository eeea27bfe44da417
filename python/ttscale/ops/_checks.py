"""Argument checks shared by the Python wrappers and the fake (meta) kernels of the ops.

``same_device``: a call whose tensors are on different devices, one of them ``meta``, dispatches to
the op's fake kernel (the Meta / fake key wins over CPU and CUDA), so the real kernel's device check
never runs: without this, an in-place op silently did nothing and a functional one returned
uninitialised memory on the other tensors' device. Every fake kernel therefore checks devices the way
its op does.

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
