"""Tests for low-bit weight-only matmul: ttscale.ops.quantize / dequantize / unpack / quant_matmul.

* quantize vs the float64 reference formulas (``ttscale.reference.quant_matmul``): codes, scales
  and zeros exactly equal; dequantize exactly equal to the reference rounded once to float32.
* quant_matmul vs ``x @ dequant(W)^T`` in float64 (x upcast exactly), for every bit width, group
  size and symmetric/asymmetric, odd M (1, 3: GEMV path; 17, 64: GEMM path), on every CPU SIMD path.
  Bound (elementwise): ``64 * 2^-24 * (|x| @ ((q + z) * s)^T) + u(dtype) * |y|``: fp32 accumulation
  over K of code*activation products (the GEMV path subtracts ``z * sum(x)`` per group, hence
  ``q + z``), plus one rounding of the output to x.dtype (u = 2^-24, 2^-11, 2^-8).
* opcheck, torch.compile(fullgraph=True), and every bad input.
"""

import numpy as np
import pytest
import torch

import ttscale
from ttscale.ops import QuantizedWeight, dequantize, quant_matmul, quantize, unpack
from ttscale.ops.quant_matmul import pack
from ttscale.reference.quant_matmul import dequantize_ref, linear_ref, quantize_ref

BITS = [2, 3, 4, 8]
GROUPS = [32, 64, 128, -1]
UOUT = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def _weight(n, k, scale=0.05):
    w = torch.randn(n, k) * scale
    w[:, ::7] *= 3.0  # some outliers so groups differ in range
    return w


def _check_matmul(x, qw, bias=None):
    y = quant_matmul(x, qw, bias=bias)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], qw.shape[0])
    q, s = unpack(qw).to(torch.float64), qw.scales.to(torch.float64)
    g = qw.group
    z = qw.zeros.to(torch.float64) if qw.zeros is not None else torch.full_like(s, 2.0 ** (qw.bits - 1))
    w_deq = dequantize_ref(q, s, z, g)
    ref = linear_ref(x.reshape(-1, x.shape[-1]), w_deq, bias)
    mag = x.reshape(-1, x.shape[-1]).to(torch.float64).abs() @ ((q + z.repeat_interleave(g, 1)) * s.repeat_interleave(g, 1)).T
    if bias is not None:
        mag = mag + bias.to(torch.float64).abs()
    bound = 64 * 2.0 ** -24 * mag + UOUT[x.dtype] * ref.abs() + 1e-30
    err = (y.reshape(ref.shape).to(torch.float64) - ref).abs()
    assert torch.isfinite(y).all()
    assert (err <= bound).all(), f"max err {err.max().item():.3e}, worst ratio {(err / bound).max().item():.2f}"


# --------------------------------------------------------------------------- quantize / dequantize
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_matches_reference(bits, group_size, symmetric):
    w = _weight(37, 256)
    w[3, :] = 0.0  # an all-zero row: every group zero
    w[5, :64] = 0.25  # a constant group
    qw = quantize(w, bits=bits, group_size=group_size, symmetric=symmetric)
    q, s, z = quantize_ref(w, bits, group_size, symmetric)
    assert isinstance(qw, QuantizedWeight) and qw.shape == (37, 256) and qw.bits == bits
    assert qw.group_size == group_size and qw.layout == "cpu_n16"
    assert torch.equal(unpack(qw).to(torch.int64), q)
    assert qw.scales.dtype == torch.float32 and torch.equal(qw.scales, s)
    if symmetric:
        assert qw.zeros is None
    else:
        assert qw.zeros.dtype == torch.uint8 and torch.equal(qw.zeros.to(torch.int64), z)
    wd = dequantize(qw)
    assert wd.dtype == torch.float32 and torch.equal(wd, dequantize_ref(q, s, z, group_size).to(torch.float32))
    # the error of round-to-nearest inside the representable range is at most s/2
    if bits >= 3 and not symmetric:
        g = 256 if group_size == -1 else group_size
        assert ((wd.double() - w.double()).abs() <= s.double().repeat_interleave(g, 1) * 0.5 + 1e-7).all()


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_quantize_scale_dtypes(scale_dtype):
    w = _weight(48, 128).to(torch.bfloat16)
    qw = quantize(w, bits=4, group_size=32, scale_dtype=scale_dtype)
    q, s, z = quantize_ref(w, 4, 32, False, scale_dtype)
    assert qw.scales.dtype == scale_dtype and torch.equal(qw.scales, s)
    assert torch.equal(unpack(qw).to(torch.int64), q)
    x = torch.randn(3, 128)
    _check_matmul(x, qw)


def test_quantize_zero_point_rounds_half_to_even():
    """z = round(-min / s) with round-half-to-even (torch.round, the reference): w in [-1, 5] at 2 bits
    gives s = 2 exactly and -min / s = 0.5, so z = 0 (round-half-up would give 1)."""
    w = torch.linspace(-1, 5, 32).repeat(4, 1)
    qw = quantize(w, bits=2, group_size=32)
    q, s, z = quantize_ref(w, 2, 32, False)
    assert qw.scales[0, 0].item() == 2.0 and qw.zeros[:, 0].tolist() == [0] * 4
    assert torch.equal(qw.zeros.to(torch.int64), z) and torch.equal(unpack(qw).to(torch.int64), q)


def test_quantize_float16_scale_range():
    """float16 scales: an all-zero group's scale floors at float16's smallest normal (EPS would round
    to a zero scale and NaN codes), and a scale above float16's range is an error, not an inf scale
    whose products are NaN."""
    w = _weight(16, 64)
    w[3, 32:] = 0.0
    w[5, :32] = 1e-9
    qw = quantize(w, bits=4, group_size=32, scale_dtype=torch.float16)
    q, s, z = quantize_ref(w, 4, 32, False, torch.float16)
    assert torch.equal(qw.scales, s) and torch.equal(unpack(qw).to(torch.int64), q)
    assert torch.isfinite(qw.scales.float()).all() and bool((qw.scales.float() > 0).all())
    assert torch.isfinite(dequantize(qw)).all()
    _check_matmul(torch.randn(2, 64), qw)
    w[7, 40] = 3e5  # 2-bit scale 1e5 > 65504
    with pytest.raises(ValueError, match=r"scale of row 7, group 1 .* does not fit scale_dtype torch.float16"):
        quantize(w, bits=2, group_size=32, scale_dtype=torch.float16)
    quantize(w, bits=2, group_size=32, scale_dtype=torch.bfloat16)  # fits there


@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_roundtrip(bits):
    for n in (1, 15, 16, 17, 48):
        codes = torch.randint(0, 2 ** bits, (n, 64), dtype=torch.uint8)
        qw = QuantizedWeight(pack(codes, bits), torch.ones(n, 2), None, bits, 32, (n, 64))
        assert qw.packed.shape == ((n + 15) // 16, 64, 2 * bits)
        assert torch.equal(unpack(qw), codes)


# --------------------------------------------------------------------------- CUDA layout (repacked on the host)
def _bitstream_rows(codes, bits):
    """Independent packer for the cuda_k32 layout: row n's codes as a bit array (code k at bits
    k*bits .. k*bits+bits-1, LSB first) cut into 32-bit words."""
    n, k = codes.shape
    bitarr = ((codes.to(torch.int64).unsqueeze(-1) >> torch.arange(bits)) & 1).reshape(n, k * bits // 32, 32)
    words = (bitarr << torch.arange(32)).sum(-1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


@pytest.mark.parametrize("bits", BITS)
def test_cuda_layout_repack_roundtrip(bits):
    for n, k in ((1, 32), (17, 96), (48, 256)):
        codes = torch.randint(0, 2 ** bits, (n, k), dtype=torch.uint8)
        packed = torch.ops.ttscale.quant_pack_k32(codes, bits)
        assert packed.dtype == torch.int32 and packed.shape == (n, k * bits // 32)
        assert torch.equal(packed, _bitstream_rows(codes, bits))
        assert torch.equal(torch.ops.ttscale.quant_unpack_k32(packed, bits), codes)
    qw = quantize(_weight(40, 256), bits=bits, group_size=64)
    qc = ttscale.ops.repack(qw, "cuda_k32")
    assert qc.layout == "cuda_k32" and torch.equal(qc.packed, _bitstream_rows(unpack(qw), bits))
    assert torch.equal(unpack(qc), unpack(qw)) and torch.equal(dequantize(qc), dequantize(qw))
    back = ttscale.ops.repack(qc, "cpu_n16")
    assert torch.equal(back.packed, qw.packed) and qw.to("cpu") is qw
    assert torch.equal(qc.to("cpu").packed, qw.packed)
    with pytest.raises(ValueError, match="qw has layout 'cuda_k32' but is on cpu"):
        quant_matmul(torch.randn(2, 256), qc)
    with pytest.raises(ValueError, match="cuda_k32 layout needs K % 32 == 0, got K = 48"):
        ttscale.ops.repack(quantize(_weight(8, 48), bits=bits, group_size=-1), "cuda_k32")
    with pytest.raises(ValueError, match="layout must be one of"):
        ttscale.ops.repack(qw, "marlin")
    with pytest.raises(ValueError, match="must be a multiple of 32 for the cuda_k32 layout"):
        torch.ops.ttscale.quant_pack_k32(torch.zeros(2, 48, dtype=torch.uint8), bits)
    if bits < 8:
        with pytest.raises(ValueError, match=r"codes must be < 2\^bits"):
            torch.ops.ttscale.quant_pack_k32(torch.full((2, 32), 2 ** bits, dtype=torch.uint8), bits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_reference(bits, dtype):  # the CUDA kernels have not run yet; this runs where a GPU is
    qw = quantize(_weight(80, 512), bits=bits, group_size=128).to("cuda")
    for m in (1, 3, 8, 9, 17, 64):
        x = torch.randn(m, 512).to(dtype)
        y = quant_matmul(x.cuda(), qw).cpu()
        qh = qw.to("cpu")
        ref = linear_ref(x, dequantize(qh).double())
        tol = 64 * 2.0 ** -24 if dtype == torch.float32 else 4 * UOUT[dtype]
        mag = x.double().abs() @ dequantize(qh).double().abs().T
        assert ((y.double() - ref).abs() <= tol * mag + UOUT[dtype] * ref.abs() + 1e-6).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_unaligned_and_tall_inputs(dtype):
    """A contiguous x that starts mid-word (the kernels load 4-byte words) and more row tiles than
    gridDim.y allows (65535): both must give the CPU's answer, not a launch or alignment fault."""
    qw = quantize(_weight(40, 64), bits=4, group_size=32)
    qc = qw.to("cuda")
    buf = torch.randn(17 * 64 + 1).to(dtype)
    x = buf[1:].view(17, 64)
    y = quant_matmul(buf.cuda()[1:].view(17, 64), qc).cpu()
    torch.testing.assert_close(y, quant_matmul(x, qw), rtol=1e-2, atol=1e-2)
    M = 8 * 65535 + 24 if dtype == torch.float32 else 32 * 65535 + 40  # rows per grid.y: 8 (SIMT), 32 (mma)
    x = torch.randn(M, 64).to(dtype)
    y = quant_matmul(x.cuda(), qc).cpu()
    for rows in (slice(0, 50), slice(M - 50, M), slice(65520, 65540)):
        torch.testing.assert_close(y[rows], quant_matmul(x[rows], qw), rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------- quant_matmul
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_quant_matmul_matches_reference(cpu_isa, bits, group_size, symmetric):
    qw = quantize(_weight(48, 256), bits=bits, group_size=group_size, symmetric=symmetric)
    for m in (1, 3, 17, 64):
        _check_matmul(torch.randn(m, 256), qw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 5, 8, 9, 16, 33])
def test_quant_matmul_dtypes_bias(cpu_isa, dtype, m):
    qw = quantize(_weight(40, 384), bits=4, group_size=128)  # N not a multiple of 16
    x = torch.randn(m, 384).to(dtype)
    bias = torch.randn(40).to(dtype)
    _check_matmul(x, qw)
    _check_matmul(x, qw, bias=bias)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quant_matmul_half_activations(cpu_isa, bits, group_size, dtype):
    """bf16 / fp16 x (on avx512bf16: the vdpbf16ps path, fp16 split into two exact bf16 terms) for
    every bit width and group size, asymmetric and symmetric, odd M, K = 1152 (several dequantised
    tiles of 256 features, a partial last one; the next tile dequantised while the current one is used) and N = 48 (a last super-block of one 16-row block)."""
    for sym in (False, True):
        qw = quantize(_weight(48, 1152), bits=bits, group_size=group_size, symmetric=sym)
        for m in (1, 3, 9, 17, 64):
            _check_matmul(torch.randn(m, 1152).to(dtype), qw)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quant_matmul_odd_k(cpu_isa, bits, dtype):
    """Per-channel groups with K odd or not a multiple of 8 (feature-pair and 8-feature tails, the
    last chunk of 256 features partial) and N = 1, 17, 33 (partial blocks / super-blocks)."""
    for n, k in ((1, 17), (17, 36), (33, 301), (20, 600), (16, 257)):
        qw = quantize(_weight(n, k), bits=bits, group_size=-1)
        for m in (1, 4, 11):
            _check_matmul(torch.randn(m, k).to(dtype), qw)


def test_quant_matmul_shapes(cpu_isa):
    qw = quantize(_weight(1, 64), bits=3, group_size=32)  # one output row
    _check_matmul(torch.randn(5, 64), qw)
    qw = quantize(_weight(97, 128), bits=4, group_size=64)
    _check_matmul(torch.randn(2, 3, 128), qw)  # leading dims (GEMV path)
    _check_matmul(torch.randn(3, 7, 128), qw)  # leading dims (GEMM path)
    x = torch.randn(4, 256)[:, ::2]  # non-contiguous x
    _check_matmul(x, qw)
    assert quant_matmul(torch.randn(0, 128), qw).shape == (0, 97)


def test_quant_matmul_long_k(cpu_isa):
    qw = quantize(_weight(64, 4096, 0.02), bits=4, group_size=128)
    _check_matmul(torch.randn(3, 4096).to(torch.bfloat16), qw)
    _check_matmul(torch.randn(17, 4096), qw)


@pytest.mark.parametrize("threads", [2, 3, 5])
def test_quant_matmul_threads(cpu_isa, threads):
    """Large enough to run in parallel: each thread owns a share of the row blocks (super-blocks on
    the vdpbf16ps path) and takes over the others' when done; with more threads than cores (3 and 5
    on a 2-core machine) shares are uneven and threads get descheduled, so units do change hands.
    Every unit must be computed exactly once, whoever runs it."""
    # 127 blocks of 16 rows (an odd last super-block); K * N > 2M multiply-adds, so even M = 1 is
    # split over threads (smaller products stay on the calling thread)
    qw = quantize(_weight(2032, 2048, 0.02), bits=4, group_size=128)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for _ in range(3):
            for m, dtype in ((1, torch.bfloat16), (16, torch.bfloat16), (5, torch.float32)):
                _check_matmul(torch.randn(m, 2048).to(dtype), qw)
    finally:
        torch.set_num_threads(old)


@pytest.mark.slow
@pytest.mark.parametrize("m", [1, 17])
def test_quant_matmul_llama_shape(m):  # ~9 s each on 2 cores (quantize + float64 reference)
    qw = quantize(_weight(11008, 4096, 0.02), bits=4, group_size=128)
    x = torch.randn(m, 4096).to(torch.bfloat16)
    _check_matmul(x, qw)


# --------------------------------------------------------------------------- opcheck / compile
def _op_args(m=3, bias=True, sym=False):
    qw = quantize(_weight(48, 128), bits=4, group_size=32, symmetric=sym)
    x = torch.randn(m, 128)
    return (x, qw.packed, qw.scales, qw.zeros, 4, 32, torch.randn(48) if bias else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_perm", [False, True])
def test_quant_matmul_backward(dtype, with_perm):
    """Frozen weights, gradients to x and bias: against autograd through x @ dequantize(W)^T in float64
    (it used to return x.grad = None with only a deprecation warning)."""
    import dataclasses

    qw = quantize(_weight(40, 64), bits=4, group_size=32)
    if with_perm:  # GPTQ act-order: x's columns are permuted inside quant_matmul
        qw = dataclasses.replace(qw, perm=torch.randperm(64, generator=torch.Generator().manual_seed(2)))
    x = torch.randn(3, 5, 64).to(dtype).requires_grad_()
    b = torch.randn(40).to(dtype).requires_grad_()
    y = quant_matmul(x, qw, bias=b)
    g = torch.randn(y.shape).to(dtype)
    y.backward(g)
    xr = x.detach().double().requires_grad_()
    br = b.detach().double().requires_grad_()
    (xr @ dequantize(qw).double().T + br).backward(g.double())
    assert x.grad.dtype == dtype and b.grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=tol * xr.grad.abs().max().item(), rtol=tol)
    torch.testing.assert_close(b.grad.double(), br.grad, atol=tol * br.grad.abs().max().item(), rtol=tol)


def test_opcheck():
    torch.library.opcheck(torch.ops.ttscale.quant_matmul.default, _op_args())
    torch.library.opcheck(torch.ops.ttscale.quant_matmul.default, _op_args(m=20, bias=False, sym=True))


def test_torch_compile_fullgraph():
    qw = quantize(_weight(48, 128), bits=4, group_size=32)

    @torch.compile(fullgraph=True, backend="inductor")
    def f(x):
        return quant_matmul(x * 2.0, qw) + 1.0

    x = torch.randn(5, 128)
    torch.testing.assert_close(f(x), quant_matmul(x * 2.0, qw) + 1.0)


# --------------------------------------------------------------------------- bad input
def test_bad_quantize_inputs():
    w = _weight(16, 128)
    with pytest.raises(ValueError, match="K = 100 must be a positive multiple of group_size = 32"):
        quantize(torch.randn(4, 100), group_size=32)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize(w, bits=5)
    with pytest.raises(ValueError, match="group_size must be one of"):
        quantize(w, group_size=16)
    # integers only: a float or bool that compares equal to a valid value used to slip through
    with pytest.raises(ValueError, match=r"bits must be one of .* \(an integer\), got 4.0"):
        quantize(w, bits=4.0)
    with pytest.raises(ValueError, match=r"group_size must be one of .* \(an integer\), got 32.0"):
        quantize(w, group_size=32.0)
    with pytest.raises(ValueError, match=r"bits must be one of .* \(an integer\), got True"):
        quantize(w, bits=True)
    assert quantize(w, bits=np.int64(4), group_size=np.int32(32)).bits == 4  # numpy integers are integers
    for bad in (float("nan"), float("inf"), -float("inf")):
        w2 = w.clone()
        w2[3, 7] = bad
        with pytest.raises(ValueError, match="w contains NaN or inf"):
            quantize(w2)
    with pytest.raises(ValueError, match="w must be 2-D"):
        quantize(torch.randn(128))
    with pytest.raises(TypeError, match="w must be a floating-point tensor"):
        quantize(torch.ones(4, 128, dtype=torch.int32))


def test_quantized_weight_inconsistent_fields():
    import dataclasses

    qw = quantize(_weight(40, 128), bits=4, group_size=32)
    with pytest.raises(ValueError, match=r"qw.scales has shape \(40, 4\), but qw.shape = \(48, 128\)"):
        quant_matmul(torch.randn(2, 128), dataclasses.replace(qw, shape=(48, 128)))
    with pytest.raises(ValueError, match=r"qw.perm must be int64 \[K\] = \[128\]"):
        quant_matmul(torch.randn(2, 128), dataclasses.replace(qw, perm=torch.arange(64)))


def test_perm_must_be_a_permutation(monkeypatch):
    """Issue 18.4: perm was only checked for dtype and shape, so perm = zeros made quant_matmul use
    x[..., 0] for every input feature and disagree with dequantize (which left columns unset), with
    no error. A perm is now checked to be a permutation of 0..K-1 where a QuantizedWeight is built,
    and quant_matmul / dequantize re-check it only if it was replaced or changed in place."""
    import dataclasses

    from ttscale.nn import QuantLinear
    from ttscale.ops import repack

    qw = quantize(_weight(40, 128), bits=4, group_size=32)
    x = torch.randn(3, 128)
    good = torch.randperm(128, generator=torch.Generator().manual_seed(5))
    dup = good.clone()
    dup[7] = dup[3]
    bad = {"zeros": (torch.zeros(128, dtype=torch.int64), r"0 appears 128 times and 1 is missing"),
           "duplicate": (dup, rf"{int(good[3])} appears 2 times and {int(good[7])} is missing"),
           "out of range": (torch.arange(1, 129), r"qw.perm\[127\] = 128 is out of range"),
           "negative": (torch.arange(128) - 1, r"qw.perm\[0\] = -1 is out of range")}
    for name, (perm, msg) in bad.items():
        for build in (lambda: dataclasses.replace(qw, perm=perm),
                      lambda: QuantizedWeight(qw.packed, qw.scales, qw.zeros, 4, 32, (40, 128), qw.layout, perm)):
            with pytest.raises(ValueError, match=rf"qw.perm must be a permutation of 0..K-1 .*{msg}"):
                build()
    with pytest.raises(ValueError, match=r"qw.perm must be int64 \[K\] = \[128\]"):
        dataclasses.replace(qw, perm=good.to(torch.int32))

    # a valid perm works as before: quant_matmul agrees with dequantize, after .to and repack too
    qp = dataclasses.replace(qw, perm=good)
    want = x @ dequantize(qp).t()
    torch.testing.assert_close(quant_matmul(x, qp), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dequantize(qp)[:, good], dequantize(qw))
    for other in (qp.to("cpu"), repack(repack(qp, "cuda_k32"), "cpu_n16")):
        torch.testing.assert_close(quant_matmul(x, other), want, atol=1e-5, rtol=1e-5)

    # checked once per perm tensor: more calls (and QuantLinear rebuilding its QuantizedWeight around
    # the same buffer on every forward) do not re-check the values
    calls = []
    real_bincount = torch.bincount
    monkeypatch.setattr(torch, "bincount", lambda *a, **kw: calls.append(1) or real_bincount(*a, **kw))
    lin = QuantLinear(qp)
    for _ in range(3):
        quant_matmul(x, qp)
        lin(x)
    assert calls == []

    # ... but never silently used after it was replaced or changed in place
    qp2 = dataclasses.replace(qw, perm=good.clone())
    qp2.perm = torch.zeros(128, dtype=torch.int64)
    with pytest.raises(ValueError, match="qw.perm must be a permutation"):
        quant_matmul(x, qp2)
    with pytest.raises(ValueError, match="qw.perm must be a permutation"):
        dequantize(qp2)
    qp3 = dataclasses.replace(qw, perm=good.clone())
    quant_matmul(x, qp3)
    qp3.perm[5] = qp3.perm[6]
    with pytest.raises(ValueError, match="qw.perm must be a permutation"):
        quant_matmul(x, qp3)
    qp3.perm.copy_(good)  # repaired in place: accepted again
    torch.testing.assert_close(quant_matmul(x, qp3), want, atol=1e-5, rtol=1e-5)
    # a QuantLinear whose perm buffer is loaded with a non-permutation refuses to run
    sd = lin.state_dict()
    sd["perm"] = torch.zeros(128, dtype=torch.int64)
    lin.load_state_dict(sd)
    with pytest.raises(ValueError, match="qw.perm must be a permutation"):
        lin(x)


def test_perm_under_torch_compile():
    # the value check is not traced (no data-dependent branch on fake tensors): fullgraph compiles,
    # with the weight checked when it was built
    import dataclasses

    qw = quantize(_weight(48, 128), bits=4, group_size=32)
    qp = dataclasses.replace(qw, perm=torch.randperm(128, generator=torch.Generator().manual_seed(1)))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x):
        return quant_matmul(x, qp) + 1.0

    x = torch.randn(4, 128)
    torch.testing.assert_close(f(x), quant_matmul(x, qp) + 1.0)
    # QuantLinear builds its QuantizedWeight inside the compiled forward (construction is traced)
    from ttscale.nn import QuantLinear

    lin = QuantLinear(qp)
    torch.testing.assert_close(torch.compile(lin, fullgraph=True, backend="aot_eager")(x), quant_matmul(x, qp))


def test_bad_quant_matmul_inputs():
    qw = quantize(_weight(48, 128), bits=4, group_size=32)
    x = torch.randn(2, 128)
    with pytest.raises(RuntimeError, match="x last dimension must equal the weight's in_features K = 128"):
        quant_matmul(torch.randn(2, 64), qw)
    with pytest.raises(RuntimeError, match="x must be one of"):
        quant_matmul(x.double(), qw)
    with pytest.raises(RuntimeError, match="x must be one of"):
        quant_matmul(x.to(torch.int32), qw)
    with pytest.raises(RuntimeError, match=r"bias must be 1-D \[N\] = \[48\]"):
        quant_matmul(x, qw, bias=torch.randn(47))
    with pytest.raises(RuntimeError, match="bias dtype must equal x dtype"):
        quant_matmul(x, qw, bias=torch.randn(48, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="qw must be a QuantizedWeight"):
        quant_matmul(x, qw.packed)
    op = torch.ops.ttscale.quant_matmul
    with pytest.raises(ValueError, match="bits must be 2, 3, 4 or 8"):
        op(x, qw.packed, qw.scales, qw.zeros, 5, 32, None)
    with pytest.raises(RuntimeError, match="packed must be 3-D"):
        op(x, qw.packed, qw.scales, qw.zeros, 3, 32, None)
    with pytest.raises(ValueError, match="group_size must divide K = 128"):
        op(x, qw.packed, qw.scales, qw.zeros, 4, 48, None)
    with pytest.raises(RuntimeError, match="scales must be"):
        op(x, qw.packed, qw.scales[:, :2], qw.zeros, 4, 32, None)
    with pytest.raises(RuntimeError, match="packed must have ceil"):
        op(x, qw.packed, qw.scales[:16], qw.zeros[:16], 4, 32, None)
    with pytest.raises(RuntimeError, match="zeros must be uint8"):
        op(x, qw.packed, qw.scales, qw.zeros.to(torch.int32), 4, 32, None)
    with pytest.raises(RuntimeError, match="zeros must have the shape of scales"):
        op(x, qw.packed, qw.scales, qw.zeros[:, :2], 4, 32, None)
    with pytest.raises(RuntimeError, match="packed must be uint8"):
        op(x, qw.packed.to(torch.int32), qw.scales, qw.zeros, 4, 32, None)
    with pytest.raises(ValueError, match="K > 0"):
        op(torch.randn(2, 0), qw.packed[:, :0], qw.scales[:, :0], qw.zeros[:, :0], 4, 32, None)
    with pytest.raises(NotImplementedError, match="no meta layout"):
        qw.to("meta")


# --------------------------------------------------------------------------- ttscale.nn
def test_quant_linear_and_quantize_model():
    from ttscale.nn import QuantLinear, quantize_model

    lin = torch.nn.Linear(128, 40)
    ql = QuantLinear.from_linear(lin, bits=4, group_size=32)
    x = torch.randn(3, 5, 128)
    _check_matmul(x, ql.qweight, bias=lin.bias.detach())
    torch.testing.assert_close(ql(x), quant_matmul(x, ql.qweight, bias=lin.bias.detach()))
    ql2 = QuantLinear.from_linear(torch.nn.Linear(128, 40), bits=4, group_size=32)
    ql2.load_state_dict(ql.state_dict())
    assert torch.equal(ql2(x), ql(x))
    assert ql(x.to(torch.bfloat16)).dtype == torch.bfloat16

    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 48, bias=False),
                                torch.nn.Linear(48, 8))  # 48 % 32 != 0: left as nn.Linear
    xin = torch.randn(4, 64)
    y_dense = model(xin)
    assert quantize_model(model, bits=8, group_size=32, symmetric=True) is model
    assert isinstance(model[0], QuantLinear) and isinstance(model[2], QuantLinear)
    assert type(model[3]) is torch.nn.Linear
    torch.testing.assert_close(model(xin), y_dense, atol=2e-2, rtol=2e-2)
    # a bare nn.Linear cannot be replaced in a parent: a new QuantLinear comes back
    ql3 = quantize_model(lin, bits=4, group_size=32)
    assert isinstance(ql3, QuantLinear) and torch.equal(ql3(x), ql(x))


def test_quant_linear_apply_keeps_layout():
    from ttscale.nn import QuantLinear

    ql = QuantLinear.from_linear(torch.nn.Linear(64, 24), bits=3, group_size=32)
    packed = ql.packed.clone()
    ql = ql.to(torch.float32).cpu()  # CPU -> CPU: codes untouched
    assert ql.layout == "cpu_n16" and torch.equal(ql.packed, packed)
    ql.layout = "cuda_k32"  # as if it came back from a GPU: the next move repacks for the CPU
    ql.packed = ttscale.ops.repack(QuantizedWeight(packed, ql.scales, ql.zeros, 3, 32, (24, 64)), "cuda_k32").packed
    ql = ql.cpu()
    assert ql.layout == "cpu_n16" and torch.equal(ql.packed, packed)
