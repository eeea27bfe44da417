"""``ttscale.nn``: modules built on ttscale ops.

* ``QuantLinear``: an ``nn.Linear`` with a low-bit ``QuantizedWeight`` (``ttscale.ops.quantize``)
  computed by ``ttscale.ops.quant_matmul``. ``QuantLinear.from_linear(linear, bits, group_size,
  symmetric)`` quantizes an existing layer; the packed codes, scales and zeros are buffers, so
  ``state_dict`` round-trips. ``QuantLinear(qw, bias)`` wraps any ``QuantizedWeight``, e.g. one
  imported with ``ttscale.ops.from_gptq`` / ``from_awq``; moving the module to another device
  repacks the codes into that device's layout.
* ``quantize_model(model, bits=4, group_size=128, symmetric=False, filter=None)`` replaces every
  ``nn.Linear`` in place (those for which ``filter(name, module)`` is true, when given) and returns
  the model; layers whose ``in_features`` is not a multiple of ``group_size`` are left unchanged.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .ops.quant_matmul import QuantizedWeight, quant_matmul, quantize

__all__ = ["QuantLinear", "quantize_model"]


class QuantLinear(nn.Module):
    def __init__(self, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.out_features, self.in_features = qw.shape
        self.bits, self.group_size, self.layout = qw.bits, qw.group_size, qw.layout
        self.register_buffer("packed", qw.packed)
        self.register_buffer("scales", qw.scales)
        self.register_buffer("zeros", qw.zeros)
        self.register_buffer("perm", qw.perm)  # input permutation of act-order imports (None otherwise)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128,
                    symmetric: bool = False) -> "QuantLinear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"ttscale: from_linear expects an nn.Linear, got {type(linear).__name__}")
        qw = quantize(linear.weight.detach(), bits=bits, group_size=group_size, symmetric=symmetric)
        return cls(qw, linear.bias)

    @property
    def qweight(self) -> QuantizedWeight:
        return QuantizedWeight(self.packed, self.scales, self.zeros, self.bits, self.group_size,
                               (self.out_features, self.in_features), self.layout, self.perm)

    def _apply(self, fn, *args, **kwargs):
        # .to(device) / .cuda() / .cpu() move the buffers; the codes are then repacked into the new
        # device's layout (ttscale.ops.QuantizedWeight.to), so quant_matmul gets what it reads.
        super()._apply(fn, *args, **kwargs)
        want = "cpu_n16" if self.packed.device.type == "cpu" else "cuda_k32"
        if self.layout != want and self.packed.device.type in ("cpu", "cuda"):
            qw = self.qweight.to(self.packed.device)
            self.packed, self.layout = qw.packed, qw.layout
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return quant_matmul(x, self.qweight, bias=b)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.zeros is None}, bias={self.bias is not None}")


def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 128, symmetric: bool = False,
                   filter: Optional[Callable[[str, nn.Module], bool]] = None) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` of ``model`` (those ``filter(name, module)`` accepts, and
    whose in_features are a multiple of ``group_size``) by a :class:`QuantLinear`, and return ``model``.
    A bare ``nn.Linear`` has no parent to replace it in: a new QuantLinear is returned instead."""
    targets = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and (filter is None or filter(name, mod)):
            if group_size == -1 or mod.in_features % group_size == 0:
                targets.append(name)
    if "" in targets:  # the model itself
        return QuantLinear.from_linear(model, bits, group_size, symmetric)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_linear(getattr(parent, child), bits, group_size, symmetric))
    return model
