"""Shared check of the fake (meta) kernels.

A call whose tensors are on different devices, one of them ``meta``, dispatches to the op's fake
kernel (the Meta / fake key wins over CPU and CUDA), so the real kernel's device check never runs:
without this, an in-place op silently did nothing and a functional one returned uninitialised memory
on the other tensors' device. Every fake kernel therefore checks devices the way its op does.
"""
from __future__ import annotations

import torch


def same_device(ref_name: str, ref: torch.Tensor, **tensors) -> None:
    """RuntimeError (the op's wording) when a non-None tensor is not on ``ref``'s device."""
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise RuntimeError(f"ttscale: {name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")
