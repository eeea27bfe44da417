"""Tests for importing GPTQ and AWQ checkpoint tensors: ttscale.ops.from_gptq / from_awq.

The checkpoint tensors are built here by packers written from each project's documented format
(independently of the importer: GPTQ as an explicit bit array cut into 32-bit words, AWQ as the
documented nibble loop), from random codes, zeros and scales. Then:
* ``dequantize(imported)`` equals the float64 reference ``(q - z) * s`` (rounded once to float32)
  exactly: the products are exact in float64 and round once in float32;
* ``quant_matmul`` matches ``x @ W^T`` in float64 within the bound of test_quant_matmul;
* act-order ``g_idx`` imports with a ``perm`` and gives W in the original column order.
"""
import pytest
import torch

from ttscale.ops import dequantize, from_awq, from_gptq, quant_matmul, unpack

UOUT = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _to_int32(v: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values in int64 -> the int32 with the same bits (checkpoints store int32)."""
    return torch.where(v >= 2 ** 31, v - 2 ** 32, v).to(torch.int32)


def gptq_pack_rows(vals: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ packing along dim 0: ``vals [R, C]`` (values < 2^bits) -> int32 ``[R*bits/32, C]``;
    the bits of value r are stream bits r*bits .. r*bits+bits-1 (LSB first), stream bit i is bit
    i % 32 of word i // 32 (so 3-bit values straddle words)."""
    r, c = vals.shape
    assert r * bits % 32 == 0
    bitarr = ((vals.to(torch.int64).unsqueeze(1) >> torch.arange(bits).view(1, bits, 1)) & 1).reshape(r * bits, c)
    words = (bitarr.view(r * bits // 32, 32, c) << torch.arange(32).view(1, 32, 1)).sum(1)
    return _to_int32(words)


def gptq_pack_zeros(z_stored: torch.Tensor, bits: int) -> torch.Tensor:
    """``[G, N]`` stored zeros -> int32 ``[G, N*bits/32]``: the same stream along N."""
    return gptq_pack_rows(z_stored.t(), bits).t().contiguous()


def awq_pack(vals: torch.Tensor) -> torch.Tensor:
    """AWQ GEMM packing along dim 1: ``vals [R, N]`` (4-bit) -> int32 ``[R, N/8]``, word c holding
    column 8c + AWQ_ORDER[i] in bits 4i..4i+3."""
    r, n = vals.shape
    out = torch.zeros(r, n // 8, dtype=torch.int64)
    for c in range(n // 8):
        for i in range(8):
            out[:, c] |= vals[:, 8 * c + AWQ_ORDER[i]].to(torch.int64) << (4 * i)
    return _to_int32(out)


def _ref_weight(q_kn, z_gn, s_gn, g_idx):
    """float64 W [N, K] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]."""
    z = z_gn.to(torch.float64)[g_idx]  # [K, N]
    s = s_gn.to(torch.float64)[g_idx]
    return ((q_kn.to(torch.float64) - z) * s).t()


def _check(qw, q_kn, z_gn, s_gn, g_idx, ms=(1, 5, 19)):
    n, k = qw.shape
    w_ref = _ref_weight(q_kn, z_gn, s_gn, g_idx)
    wd = dequantize(qw)
    assert wd.dtype == torch.float32 and wd.shape == (n, k)
    assert torch.equal(wd, w_ref.to(torch.float32))
    mag_w = ((q_kn.to(torch.float64) + z_gn.to(torch.float64)[g_idx]) * s_gn.to(torch.float64)[g_idx]).abs().t()
    for m in ms:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(m, k).to(dtype)
            y = quant_matmul(x, qw)
            assert y.dtype == dtype and y.shape == (m, n)
            ref = x.to(torch.float64) @ w_ref.t()
            bound = 64 * 2.0 ** -24 * (x.to(torch.float64).abs() @ mag_w.t()) + UOUT[dtype] * ref.abs() + 1e-30
            err = (y.to(torch.float64) - ref).abs()
            assert (err <= bound).all(), f"max err {err.max().item():.3e}"


def _scales(ng, n, dtype):
    return (torch.rand(ng, n) * 0.05 + 0.001).to(dtype)


# --------------------------------------------------------------------------- GPTQ
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("version", [1, 2])
def test_gptq_roundtrip(bits, group_size, version):
    k, n = 256, 96
    g = k if group_size == -1 else group_size
    ng = k // g
    q = torch.randint(0, 2 ** bits, (k, n))
    if version == 1:  # v1 stores z - 1 (as b bits), so z is in [1, 2^b]; 8 bits: z <= 255 (uint8 zeros)
        z = torch.randint(1, 2 ** bits + (0 if bits == 8 else 1), (ng, n))
        z[0, :3] = 2 ** bits if bits < 8 else 255  # the extremes
        z[-1, -1] = 1
        stored = z - 1
    else:
        z = torch.randint(0, 2 ** bits, (ng, n))
        z[0, :2] = torch.tensor([0, 2 ** bits - 1])
        stored = z
    s = _scales(ng, n, torch.float16)
    qweight, qzeros = gptq_pack_rows(q, bits), gptq_pack_zeros(stored, bits)
    assert qweight.shape == (k * bits // 32, n) and qzeros.shape == (ng, n * bits // 32)
    qw = from_gptq(qweight, qzeros, s, bits=bits, group_size=group_size, version=version)
    assert qw.shape == (n, k) and qw.bits == bits and qw.perm is None and qw.scales.dtype == torch.float16
    assert torch.equal(unpack(qw).to(torch.int64), q.t())
    g_idx = torch.arange(k) // g
    _check(qw, q, z, s, g_idx)
    # the trivial g_idx (what non-act-order checkpoints store) imports the same, without perm
    qw2 = from_gptq(qweight, qzeros, s, g_idx.to(torch.int32), bits=bits, group_size=group_size, version=version)
    assert qw2.perm is None and torch.equal(qw2.packed, qw.packed)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gptq_act_order(bits, scale_dtype):
    k, n, g = 384, 64, 128
    ng = k // g
    order = torch.randperm(k)  # GPTQ desc_act: features quantised in this order, G at a time
    g_idx = torch.empty(k, dtype=torch.int64)
    g_idx[order] = torch.arange(k) // g
    q = torch.randint(0, 2 ** bits, (k, n))
    z = torch.randint(0, 2 ** bits, (ng, n))
    s = _scales(ng, n, scale_dtype)
    qw = from_gptq(gptq_pack_rows(q, bits), gptq_pack_zeros(z, bits), s, g_idx.to(torch.int32),
                   bits=bits, group_size=g, version=2)
    assert qw.perm is not None and qw.perm.shape == (k,)
    assert torch.equal(torch.sort(qw.perm).values, torch.arange(k))
    # after the permutation the groups are consecutive
    assert torch.equal(g_idx[qw.perm], torch.arange(k) // g)
    assert torch.equal(unpack(qw).to(torch.int64), q[qw.perm].t())
    _check(qw, q, z, s, g_idx)


def test_gptq_symmetric_and_no_zeros():
    k, n, bits = 128, 32, 4
    q = torch.randint(0, 16, (k, n))
    s = _scales(1, n, torch.float16)
    z = torch.full((1, n), 8)
    # a symmetric v1 checkpoint stores 7 everywhere; it imports as zeros=None (z = 8)
    qw = from_gptq(gptq_pack_rows(q, bits), gptq_pack_zeros(z - 1, bits), s, bits=bits, group_size=128)
    assert qw.zeros is None
    _check(qw, q, z, s, torch.zeros(k, dtype=torch.int64))
    qw2 = from_gptq(gptq_pack_rows(q, bits), None, s, bits=bits, group_size=-1)
    assert qw2.zeros is None and torch.equal(dequantize(qw2), dequantize(qw))


def test_gptq_quant_linear_state_dict():
    from ttscale.nn import QuantLinear

    k, n, g, bits = 256, 48, 64, 4
    order = torch.randperm(k)
    g_idx = torch.empty(k, dtype=torch.int64)
    g_idx[order] = torch.arange(k) // g
    q = torch.randint(0, 16, (k, n))
    z = torch.randint(0, 16, (k // g, n))
    s = _scales(k // g, n, torch.float16)
    qw = from_gptq(gptq_pack_rows(q, bits), gptq_pack_zeros(z, bits), s, g_idx, bits=bits, group_size=g, version=2)
    bias = torch.randn(n)
    lin = QuantLinear(qw, bias)
    x = torch.randn(3, 4, k)
    torch.testing.assert_close(lin(x), x @ _ref_weight(q, z, s, g_idx).t().to(torch.float32) + bias, atol=1e-4, rtol=1e-4)
    lin2 = QuantLinear(qw, bias)
    lin2.load_state_dict(lin.state_dict())
    assert torch.equal(lin2(x), lin(x))

    @torch.compile(fullgraph=True, backend="inductor")
    def f(x):
        return quant_matmul(x, qw) * 2.0

    torch.testing.assert_close(f(x), quant_matmul(x, qw) * 2.0)


# --------------------------------------------------------------------------- AWQ
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_awq_roundtrip(group_size, scale_dtype):
    k, n = 256, 80
    g = k if group_size == -1 else group_size
    ng = k // g
    q = torch.randint(0, 16, (k, n))
    z = torch.randint(0, 16, (ng, n))
    s = _scales(ng, n, scale_dtype)
    qweight, qzeros = awq_pack(q), awq_pack(z)
    assert qweight.shape == (k, n // 8) and qzeros.shape == (ng, n // 8)
    qw = from_awq(qweight, qzeros, s, group_size=group_size)
    assert qw.shape == (n, k) and qw.bits == 4 and qw.perm is None
    assert torch.equal(unpack(qw).to(torch.int64), q.t())
    _check(qw, q, z, s, torch.arange(k) // g)


# --------------------------------------------------------------------------- bad input
def test_bad_gptq_inputs():
    k, n, bits = 256, 64, 4
    qweight = gptq_pack_rows(torch.randint(0, 16, (k, n)), bits)
    qzeros = gptq_pack_zeros(torch.randint(0, 16, (2, n)), bits)
    s = _scales(2, n, torch.float16)
    ok = dict(bits=bits, group_size=128)
    from_gptq(qweight, qzeros, s, **ok)
    with pytest.raises(ValueError, match="bits must be one of"):
        from_gptq(qweight, qzeros, s, bits=5, group_size=128)
    with pytest.raises(ValueError, match="version must be 1"):
        from_gptq(qweight, qzeros, s, version=3, **ok)
    with pytest.raises(TypeError, match="qweight must be an int32 tensor"):
        from_gptq(qweight.to(torch.int64), qzeros, s, **ok)
    with pytest.raises(ValueError, match="qweight must be 2-D"):
        from_gptq(qweight[0], qzeros, s, **ok)
    with pytest.raises(ValueError, match=r"qweight must be \[K\*bits/32, N\] with K\*bits/32 a positive multiple of 3"):
        from_gptq(qweight[:31], qzeros, s, bits=3, group_size=-1)
    with pytest.raises(ValueError, match="group_size must be one of"):
        from_gptq(qweight, qzeros, s, bits=4, group_size=48)
    with pytest.raises(ValueError, match="qweight K = 96 must be a multiple of group_size = 64"):
        from_gptq(qweight[:12], qzeros, s, bits=4, group_size=64)
    with pytest.raises(ValueError, match=r"scales must have shape \[2, 64\]"):
        from_gptq(qweight, qzeros, s[:1], **ok)
    with pytest.raises(TypeError, match="scales must be a float32/float16/bfloat16 tensor"):
        from_gptq(qweight, qzeros, s.to(torch.int32), **ok)
    with pytest.raises(ValueError, match=r"qzeros must be int32 \[groups, ceil\(N\*bits/32\)\] = \[2, 8\]"):
        from_gptq(qweight, qzeros[:, :7], s, **ok)
    with pytest.raises(TypeError, match="qzeros must be an int32 tensor"):
        from_gptq(qweight, qzeros.float(), s, **ok)
    g_idx = torch.arange(k) // 128
    with pytest.raises(ValueError, match="g_idx must have K = 256 entries"):
        from_gptq(qweight, qzeros, s, g_idx[:-1], **ok)
    bad = g_idx.clone()
    bad[5] = 2
    with pytest.raises(ValueError, match=r"g_idx values must be group indices in \[0, 2\)"):
        from_gptq(qweight, qzeros, s, bad, **ok)
    bad[5] = -1
    with pytest.raises(ValueError, match=r"g_idx values must be group indices in \[0, 2\)"):
        from_gptq(qweight, qzeros, s, bad, **ok)
    bad[5] = 1
    with pytest.raises(ValueError, match="g_idx must assign exactly group_size = 128 input features"):
        from_gptq(qweight, qzeros, s, bad, **ok)
    with pytest.raises(ValueError, match="g_idx must be a 1-D int32/int64 tensor"):
        from_gptq(qweight, qzeros, s, g_idx.float(), **ok)
    z8 = gptq_pack_zeros(torch.full((1, n), 255), 8)
    with pytest.raises(ValueError, match="qzeros .GPTQ v1, 8 bits. holds a stored zero 255"):
        from_gptq(gptq_pack_rows(torch.randint(0, 256, (k, n)), 8), z8, _scales(1, n, torch.float16), bits=8,
                  group_size=-1, version=1)


def test_bad_awq_inputs():
    k, n = 128, 64
    qweight, qzeros = awq_pack(torch.randint(0, 16, (k, n))), awq_pack(torch.randint(0, 16, (1, n)))
    s = _scales(1, n, torch.float16)
    from_awq(qweight, qzeros, s, group_size=128)
    with pytest.raises(ValueError, match="bits must be 4 for AWQ"):
        from_awq(qweight, qzeros, s, bits=3, group_size=128)
    with pytest.raises(ValueError, match=r"qzeros must be int32 \[K/group_size, N/8\] = \[2, 8\]"):
        from_awq(qweight, qzeros, s, group_size=64)
    with pytest.raises(ValueError, match=r"scales must have shape \[1, 64\]"):
        from_awq(qweight, qzeros, s[:, :32], group_size=128)
    with pytest.raises(TypeError, match="qweight must be an int32 tensor"):
        from_awq(qweight.to(torch.uint8), qzeros, s, group_size=128)
    with pytest.raises(ValueError, match="qweight K = 128 must be a multiple of group_size = 32|group_size must be one of"):
        from_awq(qweight, qzeros, s, group_size=96)
