"""Low-bit weight-only matmul: ``QuantizedWeight``, ``quantize``/``dequantize``/``unpack`` and
``quant_matmul``.

Format (the reference semantics; ``ttscale.reference.quant_matmul`` is the float64 reference).
``W [N, K]`` (nn.Linear orientation) in groups of ``G`` consecutive input features
(``group_size`` in {32, 64, 128, -1}; -1 is one group per output row), ``bits`` b in {2, 3, 4, 8}:

* asymmetric: ``s = max((max(w_g, 0) - min(w_g, 0)) / (2^b - 1), eps)``,
  ``z = clamp(round(-min(w_g, 0) / s), 0, 2^b - 1)`` (stored as uint8)
* symmetric:  ``s = max(2 * absmax(w_g) / (2^b - 1), eps)``, ``z = 2^(b-1)`` (no zeros stored)
* ``q = clamp(round(w / s) + z, 0, 2^b - 1)``; round is half-to-even; ``eps = 1e-12``. ``s`` is
  computed in float64 and rounded once to ``scale_dtype``; ``z`` and ``q`` use the stored ``s``.
* dequant ``w' = (q - z) * s``; ``quant_matmul``: ``y = x @ w'^T (+ bias)`` with fp32 accumulation,
  output in ``x.dtype``.

The codes are kept in a device-specific packed layout (``layout``; both documented in
``csrc/ops/quant_matmul/quant_matmul.h``). On CPU it is ``"cpu_n16"``: uint8 ``[ceil(N/16), K,
2*bits]``, the 16 codes of a block of output rows for one input feature in one ``2*bits``-byte
record. On CUDA it is ``"cuda_k32"``: int32 ``[N, K*bits/32]``, each row's codes as one
little-endian bit stream (GPTQ's ``qweight`` transposed; needs ``K % 32 == 0``). ``qw.to(device)``
and ``repack(qw, layout)`` convert between them (on the host); ``unpack`` returns the logical codes
``[N, K]`` uint8 whatever the layout. The CUDA kernels are compile-checked only so far (no GPU has
run them): a GEMV for ``M <= 8`` and fp32 activations, an mma.sync (m16n8k16) GEMM for fp16/bf16
activations with ``M > 8`` that multiplies exact ``q - z`` in the activation dtype and applies
the scale per group in fp32.

Input permutation (act-order checkpoints). A ``QuantizedWeight`` may carry ``perm`` (int64 ``[K]``, a
permutation of ``0..K-1``: anything else is refused with a ValueError when the weight is built, and
again by ``quant_matmul`` / ``dequantize`` if ``perm`` was replaced or changed in place since):
its codes, scales and zeros then describe the column-permuted weight ``Wp[:, j] = W[:, perm[j]]``
(groups of ``G`` consecutive columns of ``Wp``), ``unpack`` returns the codes of ``Wp``,
``quant_matmul`` computes ``x[..., perm] @ Wp^T`` (= ``x @ W^T``) and ``dequantize`` returns ``W`` in
the original column order. ``from_gptq`` sets it when ``g_idx`` is not the trivial ``k // G``.

Checkpoint import (exact: ``dequantize`` equals the checkpoint's own ``(q - z) * s``):

* ``from_gptq(qweight, qzeros, scales, g_idx=None, *, bits, group_size, version=1)``: AutoGPTQ /
  GPTQModel tensors. ``qweight`` int32 ``[K*bits/32, N]``: each column is a little-endian bit
  stream of the ``K`` codes of one output row, ``bits`` bits each, LSB first, 32-bit words (3-bit
  codes straddle word boundaries: 32 codes per 3 words). ``qzeros`` int32 ``[ceil(K/G),
  ceil(N*bits/32)]``: the same stream along N per group. ``scales`` ``[ceil(K/G), N]``. ``version=1``
  (``checkpoint_format="gptq"``) stores ``z - 1`` and the zero is ``stored + 1`` (1..2^bits, as the
  v1 kernels compute it, no wrap-around); ``version=2`` (``"gptq_v2"``) stores ``z``. ``g_idx`` int
  ``[K]`` is the group of each input feature (act-order / desc_act); every group must hold exactly
  ``G`` features. Zeros all equal to ``2^(bits-1)`` import as symmetric (``zeros=None``).
* ``from_awq(qweight, qzeros, scales, *, bits=4, group_size)``: AutoAWQ GEMM tensors. ``qweight``
  int32 ``[K, N/8]``: word ``c`` of row ``k`` holds the codes of output rows ``8c + ORDER[i]`` in
  nibble ``i`` (bits ``4i..4i+3``), ``ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``; ``qzeros`` int32
  ``[K/G, N/8]`` the same per group; ``scales`` ``[K/G, N]``; ``w = (q - z) * s``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ._checks import as_index, same_device

__all__ = ["QuantizedWeight", "quantize", "dequantize", "unpack", "pack", "repack", "quant_matmul", "from_gptq", "from_awq"]

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)
EPS = 1e-12


def scale_eps(scale_dtype: torch.dtype) -> float:
    """The floor of a group's scale: EPS, or the scale dtype's smallest normal number when that is
    larger (float16: 6.1e-5; EPS would round to a zero scale there, and the codes to NaN)."""
    return max(EPS, float(torch.finfo(scale_dtype).tiny))
CPU_LAYOUT = "cpu_n16"
CUDA_LAYOUT = "cuda_k32"
LAYOUTS = (CPU_LAYOUT, CUDA_LAYOUT)
_NB = 16


@dataclasses.dataclass
class QuantizedWeight:
    """A low-bit weight ``W [N, K]``: packed codes, scales ``[N, K/G]``, integer zeros ``[N, K/G]``
    uint8 (``None``: symmetric, ``z = 2^(bits-1)``), ``bits``, ``group_size`` (-1: per channel),
    ``shape = (N, K)``, the packed ``layout`` name and an optional input permutation ``perm``
    (int64 ``[K]``, see the module docstring: codes/scales/zeros are those of ``W[:, perm]``)."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    bits: int
    group_size: int
    shape: Tuple[int, int]
    layout: str = CPU_LAYOUT
    perm: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        # every way of building one (the constructor, from_gptq, dataclasses.replace, repack, .to,
        # QuantLinear.qweight) comes through here, so a bad perm is refused where it is made
        if self.perm is not None:
            _check_perm(self.perm, self.shape[1])

    @property
    def group(self) -> int:
        """The effective group size (``K`` when ``group_size == -1``)."""
        return self.shape[1] if self.group_size == -1 else self.group_size

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def to(self, device) -> "QuantizedWeight":
        """This weight on ``device``, repacked to that device's layout (``cpu_n16`` / ``cuda_k32``)."""
        device = torch.device(device)
        if device.type not in ("cpu", "cuda"):
            raise NotImplementedError(f"ttscale: QuantizedWeight has no {device.type} layout (only cpu and cuda)")
        target = CPU_LAYOUT if device.type == "cpu" else CUDA_LAYOUT
        qw = self if self.device.type == "cpu" else _move(self, "cpu")
        qw = repack(qw, target)
        return qw if device.type == "cpu" else _move(qw, device)

    def nbytes(self) -> int:
        n = self.packed.numel() * self.packed.element_size() + self.scales.numel() * self.scales.element_size()
        if self.zeros is not None:
            n += self.zeros.numel()
        if self.perm is not None:
            n += self.perm.numel() * self.perm.element_size()
        return n


# perm tensors whose values were found to be a permutation -> (K, the tensor's version counter then).
# Why a once-per-tensor record rather than a check in every call or a flag on the QuantizedWeight:
# checking the values costs a pass over K entries and, on CUDA, a device sync, which quant_matmul
# must not pay per call (QuantLinear.forward builds a fresh QuantizedWeight around the same perm
# buffer every call, so a per-object flag would re-check every call too). Keyed by the tensor
# itself, the record survives those rebuilds; the version counter catches in-place changes
# (perm.zero_(), load_state_dict copying into the buffer) and a reassigned perm is a new key, so
# quant_matmul never uses values that were not checked. Weak keys: freed tensors drop out.
_CHECKED_PERMS = WeakIdKeyDictionary()


def _check_perm(perm, k: int) -> None:
    """ValueError unless ``perm`` is an int64 ``[K]`` permutation of ``0..K-1``. Values are checked once
    per tensor and version (``_CHECKED_PERMS``). While tracing (``torch.compile``, fake or meta
    tensors) only dtype and shape are checked: values are data, and the weight the compiled code
    uses was checked when it was built in eager code."""
    if not isinstance(perm, torch.Tensor) or perm.dtype != torch.int64 or perm.dim() != 1 or perm.shape[0] != k:
        got = f"{perm.dtype} {tuple(perm.shape)}" if isinstance(perm, torch.Tensor) else type(perm).__name__
        raise ValueError(f"ttscale: qw.perm must be int64 [K] = [{k}] (a permutation of 0..K-1), got {got}")
    if torch.compiler.is_compiling() or perm.device.type == "meta" or _is_fake(perm):
        return
    try:
        version = perm._version
    except RuntimeError:  # an inference-mode tensor has no version counter: checked once by identity
        version = None
    if _CHECKED_PERMS.get(perm) == (k, version):
        return
    out = (perm < 0) | (perm >= k)
    if bool(out.any()):
        i = int(out.nonzero()[0, 0])
        raise ValueError(f"ttscale: qw.perm must be a permutation of 0..K-1 (K = {k}), but qw.perm[{i}] = "
                         f"{int(perm[i])} is out of range")
    counts = torch.bincount(perm, minlength=k)
    if bool((counts != 1).any()):
        dup = int((counts > 1).nonzero()[0, 0])
        missing = int((counts == 0).nonzero()[0, 0])
        raise ValueError(f"ttscale: qw.perm must be a permutation of 0..K-1 (K = {k}, each index exactly once), but "
                         f"{dup} appears {int(counts[dup])} times and {missing} is missing")
    _CHECKED_PERMS[perm] = (k, version)


def _is_fake(t: torch.Tensor) -> bool:
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - internal module moved
        return False
    return is_fake(t)


def _format_int(v, name: str, allowed) -> int:
    i = as_index(v)  # 4.0 in (2, 3, 4, 8) is True, and shifts and reshapes would then fail far from here
    if i is None:
        raise ValueError(f"ttscale: {name} must be one of {allowed} (an integer), got {v!r}")
    v = i
    if v not in allowed:
        raise ValueError(f"ttscale: {name} must be one of {allowed}, got {v}")
    return v


def _check_format(bits: int, group_size: int, k: int, name: str = "w") -> Tuple[int, int, int]:
    """(bits, group_size, group width) as ints, after checking them against K."""
    bits = _format_int(bits, "bits", SUPPORTED_BITS)
    group_size = _format_int(group_size, "group_size", SUPPORTED_GROUP_SIZES)
    g = k if group_size == -1 else group_size
    if k <= 0 or k % g != 0:
        raise ValueError(f"ttscale: {name} in_features K = {k} must be a positive multiple of group_size = {group_size}")
    return bits, group_size, g


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical codes ``[N, K]`` (uint8, values < 2^bits) -> CPU layout ``cpu_n16`` ``[ceil(N/16), K, 2*bits]``."""
    n, k = codes.shape
    nb = (n + _NB - 1) // _NB
    c = torch.zeros((nb * _NB, k), dtype=torch.int64, device=codes.device)
    c[:n] = codes.to(torch.int64)
    c = c.view(nb, _NB, k).permute(0, 2, 1).reshape(nb, k, 2, 8)  # [nb, K, half, row-in-half]
    if bits == 8:
        return c.reshape(nb, k, 16).to(torch.uint8).contiguous()
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    v = (c << shifts).sum(-1)  # [nb, K, 2], < 2^(8*bits)
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    by = (v.unsqueeze(-1) >> byte_shifts) & 0xFF  # [nb, K, 2, bits]
    return by.reshape(nb, k, 2 * bits).to(torch.uint8).contiguous()


def _move(qw: QuantizedWeight, device) -> QuantizedWeight:
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return dataclasses.replace(qw, packed=mv(qw.packed), scales=mv(qw.scales), zeros=mv(qw.zeros), perm=mv(qw.perm))


def repack(qw: QuantizedWeight, layout: str) -> QuantizedWeight:
    """``qw`` with its codes in ``layout`` (``"cpu_n16"`` or ``"cuda_k32"``), on the host; scales,
    zeros and ``perm`` are shared. ``cuda_k32`` needs ``K % 32 == 0``."""
    if layout not in LAYOUTS:
        raise ValueError(f"ttscale: layout must be one of {LAYOUTS}, got {layout!r}")
    if qw.layout == layout:
        return qw
    if qw.device.type != "cpu":
        raise ValueError(f"ttscale: repack runs on the host; qw is on {qw.device} (use qw.to(device))")
    codes = unpack(qw)
    if layout == CUDA_LAYOUT:
        if qw.shape[1] % 32 != 0:
            raise ValueError(f"ttscale: the {CUDA_LAYOUT} layout needs K % 32 == 0, got K = {qw.shape[1]}")
        packed = torch.ops.ttscale.quant_pack_k32(codes, qw.bits)
    else:
        packed = pack(codes, qw.bits)
    return dataclasses.replace(qw, packed=packed, layout=layout)


def unpack(qw: QuantizedWeight) -> torch.Tensor:
    """The logical codes ``q [N, K]`` uint8 of ``qw`` (of ``W[:, qw.perm]`` when ``perm`` is set)."""
    if qw.layout == CUDA_LAYOUT:
        return torch.ops.ttscale.quant_unpack_k32(qw.packed.cpu(), qw.bits).to(qw.packed.device)
    if qw.layout != CPU_LAYOUT:
        raise ValueError(f"ttscale: unknown QuantizedWeight layout {qw.layout!r}")
    n, k = qw.shape
    b = qw.bits
    p = qw.packed.to(torch.int64)
    nb = p.shape[0]
    if b == 8:
        c = p.reshape(nb, k, 16)
    else:
        by = p.reshape(nb, k, 2, b)
        v = (by << (torch.arange(b, device=p.device, dtype=torch.int64) * 8)).sum(-1)  # [nb, K, 2]
        c = (v.unsqueeze(-1) >> (torch.arange(8, device=p.device, dtype=torch.int64) * b)) & ((1 << b) - 1)
        c = c.reshape(nb, k, 16)
    return c.permute(0, 2, 1).reshape(nb * _NB, k)[:n].to(torch.uint8).contiguous()


def quantize(w: torch.Tensor, *, bits: int = 4, group_size: int = 128, symmetric: bool = False,
             scale_dtype: torch.dtype = torch.float32) -> QuantizedWeight:
    """Quantize ``w [N, K]`` (a float tensor) to ``bits`` with groups of ``group_size`` along K."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"ttscale: w must be a floating-point tensor, got {getattr(w, 'dtype', type(w).__name__)}")
    if w.dim() != 2:
        raise ValueError(f"ttscale: w must be 2-D [N, K] (out_features, in_features), got shape {tuple(w.shape)}")
    if scale_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"ttscale: scale_dtype must be float32, float16 or bfloat16, got {scale_dtype}")
    n, k = w.shape
    bits, group_size, g = _check_format(bits, group_size, k)
    if w.device.type != "cpu":
        raise NotImplementedError(f"ttscale: quantize has no {w.device.type} layout yet (only {CPU_LAYOUT!r})")
    if n > 0 and not bool(torch.isfinite(w).all()):
        raise ValueError("ttscale: w contains NaN or inf")
    qmax = (1 << bits) - 1
    wg = w.detach().to(torch.float64).reshape(n, k // g, g)
    eps = scale_eps(scale_dtype)
    if symmetric:
        s = (2.0 * wg.abs().amax(-1) / qmax).clamp(min=eps)
    else:
        hi = wg.amax(-1).clamp(min=0)
        lo = wg.amin(-1).clamp(max=0)
        s = ((hi - lo) / qmax).clamp(min=eps)
    fmax = torch.finfo(scale_dtype).max
    if n > 0 and k > 0 and float(s.max()) > fmax:
        r, c = divmod(int(s.argmax()), k // g)
        raise ValueError(f"ttscale: the scale of row {r}, group {c} ({float(s.max()):.4g}) does not fit "
                         f"scale_dtype {scale_dtype} (max {fmax:.4g}); use float32 or bfloat16 scales")
    s_st = s.to(scale_dtype)
    s64 = s_st.to(torch.float64)
    if symmetric:
        z64 = torch.full_like(s64, float(1 << (bits - 1)))
        zeros = None
    else:
        z64 = torch.round(-lo / s64).clamp(0, qmax)
        zeros = z64.to(torch.uint8)
    q = (torch.round(wg / s64.unsqueeze(-1)) + z64.unsqueeze(-1)).clamp(0, qmax).to(torch.uint8).reshape(n, k)
    return QuantizedWeight(pack(q, bits), s_st.contiguous(), zeros, bits, group_size, (n, k), CPU_LAYOUT)


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """``w' = (q - z) * s`` as float32 ``[N, K]``, in the original column order when ``perm`` is set."""
    n, k = qw.shape
    g = qw.group
    q = unpack(qw).to(torch.float32).reshape(n, k // g, g)
    z = qw.zeros.to(torch.float32) if qw.zeros is not None else torch.full_like(qw.scales, 1 << (qw.bits - 1), dtype=torch.float32)
    w = ((q - z.unsqueeze(-1)) * qw.scales.to(torch.float32).unsqueeze(-1)).reshape(n, k)
    if qw.perm is not None:
        _check_perm(qw.perm, k)  # a no-op unless perm was replaced or changed since it was checked
        w = torch.empty_like(w).index_copy_(1, qw.perm, w)  # column perm[j] of W is column j of Wp
    return w


def quant_matmul(x: torch.Tensor, qw: QuantizedWeight, *, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y = x @ dequantize(qw)^T (+ bias)``: ``x [..., K]`` float32/float16/bfloat16 -> ``[..., N]``
    in ``x.dtype``, fp32 accumulation. ``bias [N]`` must have ``x``'s dtype.

    The kernels sum ``q * x`` per group (and ``z * sum(x)``) before applying the scale, so those
    sums, up to about ``2^bits * G * max|x|``, must stay inside float32: activations beyond ~1e33
    overflow where ``x @ W'^T`` itself would not. Differentiable in ``x`` and ``bias`` (the weight is
    frozen)."""
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"ttscale: qw must be a QuantizedWeight, got {type(qw).__name__}")
    if qw.layout not in LAYOUTS:
        raise ValueError(f"ttscale: unknown QuantizedWeight layout {qw.layout!r}")
    want = CPU_LAYOUT if qw.device.type == "cpu" else CUDA_LAYOUT
    if qw.layout != want:
        raise ValueError(f"ttscale: qw has layout {qw.layout!r} but is on {qw.device}, whose kernels read {want!r} "
                         f"(use qw.to({str(qw.device)!r}))")
    n, k = qw.shape
    if tuple(qw.scales.shape) != (n, k // qw.group):
        raise ValueError(f"ttscale: qw.scales has shape {tuple(qw.scales.shape)}, but qw.shape = {tuple(qw.shape)} "
                         f"with group_size {qw.group_size} needs [N, K/G] = [{n}, {k // qw.group}]")
    if qw.perm is not None:
        _check_perm(qw.perm, k)  # a no-op unless perm was replaced or changed since it was checked
        if x.shape[-1] != qw.shape[1]:
            raise RuntimeError(f"ttscale: x last dimension must equal the weight's in_features K = {qw.shape[1]}, "
                               f"got shape {tuple(x.shape)}")
        x = x.index_select(-1, qw.perm)  # x @ W^T = x[..., perm] @ W[:, perm]^T
    return torch.ops.ttscale.quant_matmul(x, qw.packed, qw.scales, qw.zeros, qw.bits, qw.group, bias)


@torch.library.register_fake("ttscale::quant_matmul")
def _quant_matmul_fake(x, packed, scales, zeros, bits, group_size, bias):
    same_device("x", x, packed=packed, scales=scales, zeros=zeros, bias=bias)  # see _checks.py
    return x.new_empty((*x.shape[:-1], scales.shape[0]))


def _quant_matmul_setup_context(ctx, inputs, output):
    x, packed, scales, zeros, bits, group_size, bias = inputs
    ctx.save_for_backward(packed, scales, zeros)
    ctx.meta = (bits, group_size, x.shape[-1], x.dtype, bias is not None)


def _quant_matmul_backward(ctx, grad):
    """The weights are frozen (codes and scales get no gradient): grad_x = grad_y @ W' with W' the
    dequantised weight (fp32 math, x's dtype), grad_bias = grad_y summed over the leading dims. So a
    QuantLinear passes gradients through to what comes before it (adapters, earlier layers)."""
    packed, scales, zeros = ctx.saved_tensors
    bits, group_size, k, dtype, has_bias = ctx.meta
    gx = gb = None
    if ctx.needs_input_grad[0]:
        layout = CPU_LAYOUT if packed.device.type == "cpu" else CUDA_LAYOUT
        w = dequantize(QuantizedWeight(packed, scales, zeros, bits, group_size, (scales.shape[0], k), layout))
        gx = (grad.to(torch.float32) @ w).to(dtype)
    if has_bias and ctx.needs_input_grad[6]:
        gb = grad.reshape(-1, grad.shape[-1]).sum(0)
    return gx, None, None, None, None, None, gb


torch.library.register_autograd("ttscale::quant_matmul", _quant_matmul_backward,
                                setup_context=_quant_matmul_setup_context)


@torch.library.register_fake("ttscale::quant_pack_k32")
def _quant_pack_k32_fake(codes, bits):
    return codes.new_empty((codes.shape[0], codes.shape[1] * bits // 32), dtype=torch.int32)


@torch.library.register_fake("ttscale::quant_unpack_k32")
def _quant_unpack_k32_fake(packed, bits):
    return packed.new_empty((packed.shape[0], packed.shape[1] * 32 // bits), dtype=torch.uint8)


# --------------------------------------------------------------------------- checkpoint import
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds output row 8c + AWQ_ORDER[i]


def _check_int32(t, name: str, dim: int = 2) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
        raise TypeError(f"ttscale: {name} must be an int32 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.dim() != dim:
        raise ValueError(f"ttscale: {name} must be {dim}-D, got shape {tuple(t.shape)}")
    return t


def _check_scales(scales, shape, name: str = "scales") -> torch.Tensor:
    if not isinstance(scales, torch.Tensor) or scales.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"ttscale: {name} must be a float32/float16/bfloat16 tensor, "
                        f"got {getattr(scales, 'dtype', type(scales).__name__)}")
    if tuple(scales.shape) != tuple(shape):
        raise ValueError(f"ttscale: {name} must have shape {list(shape)} [groups, N], got {tuple(scales.shape)}")
    return scales


def _bitstream_unpack(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """``words [..., W]`` int32, read as one little-endian bit stream per row (word w holds stream
    bits 32w..32w+31) -> the first ``count`` ``bits``-bit values ``[..., count]`` int64. A value may
    straddle two words (3 bits); its low part comes from the first word."""
    u = words.to(torch.int64) & 0xFFFFFFFF
    nw = u.shape[-1]
    u = torch.cat([u, torch.zeros_like(u[..., :1])], dim=-1)  # a zero word past the end
    start = torch.arange(count, device=words.device, dtype=torch.int64) * bits
    w, o = start // 32, start % 32
    if count and int(w[-1]) >= nw:
        raise ValueError("internal: bit stream too short")
    lo = u[..., w] >> o
    hi = u[..., w + 1] << (32 - o)  # bits continuing into the next word (shift by 32 leaves them above the mask)
    return (lo | hi) & ((1 << bits) - 1)


def _group_format(group_size: int, k: int, name_k: str) -> int:
    """A checkpoint's group size -> ours (-1 for one group per row)."""
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise TypeError(f"ttscale: group_size must be an int, got {type(group_size).__name__}")
    if group_size == k:
        return -1 if group_size not in SUPPORTED_GROUP_SIZES else group_size
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"ttscale: group_size must be one of {SUPPORTED_GROUP_SIZES} (or K = {k}), got {group_size}")
    if group_size != -1 and k % group_size != 0:
        raise ValueError(f"ttscale: {name_k} K = {k} must be a multiple of group_size = {group_size}")
    return group_size


def _finish_import(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int, group_size: int,
                   perm: Optional[torch.Tensor]) -> QuantizedWeight:
    """Codes ``q [N, K]`` (already in group-consecutive order), scales ``s [N, K/G]``, integer zeros
    ``z [N, K/G]`` int64 -> a CPU QuantizedWeight (zeros all ``2^(bits-1)``: symmetric)."""
    n, k = q.shape
    zsym = 1 << (bits - 1)
    zeros = None if bool((z == zsym).all()) else z.to(torch.uint8).contiguous()
    return QuantizedWeight(pack(q.to(torch.uint8), bits), s.contiguous(), zeros, bits, group_size, (n, k),
                           CPU_LAYOUT, perm)


def from_gptq(qweight: torch.Tensor, qzeros: Optional[torch.Tensor], scales: torch.Tensor,
              g_idx: Optional[torch.Tensor] = None, *, bits: int, group_size: int,
              version: int = 1) -> QuantizedWeight:
    """Import AutoGPTQ/GPTQModel tensors (format: module docstring) into a CPU ``QuantizedWeight``,
    exactly: ``dequantize(result)[n, k] == (q[k, n] - z[g_idx[k], n]) * scales[g_idx[k], n]``.

    ``qweight`` int32 ``[K*bits/32, N]``; ``qzeros`` int32 ``[groups, ceil(N*bits/32)]`` or ``None``
    (symmetric, ``z = 2^(bits-1)``); ``scales`` ``[groups, N]`` (kept in its dtype); ``g_idx`` int
    ``[K]`` or ``None`` (``k // G``); ``version`` 1 (stored zero ``z - 1``) or 2 (stored ``z``).
    An act-order ``g_idx`` becomes ``perm = argsort(g_idx)`` (stable), so that groups are consecutive."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"ttscale: bits must be one of {SUPPORTED_BITS}, got {bits}")
    if version not in (1, 2):
        raise ValueError(f"ttscale: version must be 1 (GPTQ v1, stored zero = z - 1) or 2 (stored zero = z), got {version}")
    _check_int32(qweight, "qweight")
    rows, n = qweight.shape
    if rows * 32 % bits != 0 or rows == 0:
        raise ValueError(f"ttscale: qweight must be [K*bits/32, N] with K*bits/32 a positive multiple of {bits} "
                         f"(32 codes per {bits} words), got shape {tuple(qweight.shape)}")
    k = rows * 32 // bits
    gs = _group_format(group_size, k, "qweight")
    g = k if gs == -1 else gs
    ng = k // g
    _check_scales(scales, (ng, n))
    for t, name in ((qzeros, "qzeros"), (g_idx, "g_idx")):
        if isinstance(t, torch.Tensor) and t.device != qweight.device:
            raise ValueError(f"ttscale: {name} must be on qweight's device {qweight.device}, got {t.device}")
    if scales.device != qweight.device:
        raise ValueError(f"ttscale: scales must be on qweight's device {qweight.device}, got {scales.device}")
    if qweight.device.type != "cpu":
        raise NotImplementedError(f"ttscale: from_gptq has no {qweight.device.type} layout yet (import on CPU, then .to())")

    q = _bitstream_unpack(qweight.t(), bits, k)  # [N, K]: column n of qweight is row n of W
    if qzeros is None:
        z = torch.full((ng, n), 1 << (bits - 1), dtype=torch.int64)
    else:
        _check_int32(qzeros, "qzeros")
        nzw = (n * bits + 31) // 32
        if tuple(qzeros.shape) != (ng, nzw):
            raise ValueError(f"ttscale: qzeros must be int32 [groups, ceil(N*bits/32)] = [{ng}, {nzw}], "
                             f"got shape {tuple(qzeros.shape)}")
        z = _bitstream_unpack(qzeros, bits, n)  # [groups, N]
        if version == 1:
            z = z + 1  # v1 stores z - 1; its kernels add 1 after masking (so z = 2^bits is possible)
            if bits == 8 and bool((z > 255).any()):
                raise ValueError("ttscale: qzeros (GPTQ v1, 8 bits) holds a stored zero 255, i.e. z = 256, "
                                 "which does not fit the uint8 zeros")
    z = z.t()  # [N, groups]
    s = scales.t()

    perm = None
    if g_idx is not None:
        if not isinstance(g_idx, torch.Tensor) or g_idx.dtype not in (torch.int32, torch.int64) or g_idx.dim() != 1:
            raise ValueError(f"ttscale: g_idx must be a 1-D int32/int64 tensor [K], got "
                             f"{getattr(g_idx, 'dtype', type(g_idx).__name__)} {tuple(getattr(g_idx, 'shape', ()))}")
        if g_idx.shape[0] != k:
            raise ValueError(f"ttscale: g_idx must have K = {k} entries, got {g_idx.shape[0]}")
        gi = g_idx.to(torch.int64)
        if bool(((gi < 0) | (gi >= ng)).any()):
            raise ValueError(f"ttscale: g_idx values must be group indices in [0, {ng}), got range "
                             f"[{int(gi.min())}, {int(gi.max())}]")
        counts = torch.bincount(gi, minlength=ng)
        if bool((counts != g).any()):
            raise ValueError(f"ttscale: g_idx must assign exactly group_size = {g} input features to each of the "
                             f"{ng} groups, got counts between {int(counts.min())} and {int(counts.max())}")
        if not torch.equal(gi, torch.arange(k) // g):
            # Sort input features by group (stable: within a group, keep checkpoint order); after the
            # permutation group j is columns [j*G, (j+1)*G) and quant_matmul permutes x the same way.
            perm = torch.sort(gi, stable=True).indices
            q = q.index_select(1, perm)
    return _finish_import(q, s, z, bits, gs, perm)


def from_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, *, bits: int = 4,
             group_size: int) -> QuantizedWeight:
    """Import AutoAWQ GEMM tensors (format: module docstring) into a CPU ``QuantizedWeight``, exactly:
    ``dequantize(result)[n, k] == (q[k, n] - z[k // G, n]) * scales[k // G, n]``.

    ``qweight`` int32 ``[K, N/8]``, ``qzeros`` int32 ``[K/G, N/8]`` (both with the interleaved nibble
    order ``AWQ_ORDER``), ``scales`` ``[K/G, N]``. Only 4 bits (the AWQ GEMM format)."""
    if bits != 4:
        raise ValueError(f"ttscale: bits must be 4 for AWQ (the GEMM layout packs 8 nibbles per int32), got {bits}")
    _check_int32(qweight, "qweight")
    k, nw = qweight.shape
    if k == 0 or nw == 0:
        raise ValueError(f"ttscale: qweight must be int32 [K, N/8] with K, N > 0, got shape {tuple(qweight.shape)}")
    n = nw * 8
    gs = _group_format(group_size, k, "qweight")
    g = k if gs == -1 else gs
    ng = k // g
    _check_int32(qzeros, "qzeros")
    if tuple(qzeros.shape) != (ng, nw):
        raise ValueError(f"ttscale: qzeros must be int32 [K/group_size, N/8] = [{ng}, {nw}], got shape {tuple(qzeros.shape)}")
    _check_scales(scales, (ng, n))
    for t, name in ((qzeros, "qzeros"), (scales, "scales")):
        if t.device != qweight.device:
            raise ValueError(f"ttscale: {name} must be on qweight's device {qweight.device}, got {t.device}")
    if qweight.device.type != "cpu":
        raise NotImplementedError(f"ttscale: from_awq has no {qweight.device.type} layout yet (import on CPU, then .to())")

    # nibble i of word c -> output row 8c + AWQ_ORDER[i]; unpack in nibble order, then undo the order
    inv = torch.argsort(torch.tensor(AWQ_ORDER))  # row r of a word is nibble inv[r]

    def unpack_awq(words):  # [R, N/8] -> [R, N] in output-row order
        nib = _bitstream_unpack(words, 4, words.shape[-1] * 8).view(words.shape[0], -1, 8)
        return nib[..., inv].reshape(words.shape[0], -1)

    q = unpack_awq(qweight).t()  # [N, K]
    z = unpack_awq(qzeros).t()  # [N, K/G]
    return _finish_import(q, scales.t(), z, bits, gs, None)
