"""Hostile inputs for the low-bit weight ops: quantize, dequantize, unpack, repack, QuantizedWeight,
quant_matmul, from_gptq, from_awq.

Valid-but-odd inputs are compared with ``ttscale.reference.quant_matmul``: ``quantize_ref`` gives the
codes, scales and zeros independently of the packed layout, ``dequantize_ref`` / ``linear_ref`` the
float64 weight and product. Checkpoint imports are checked against codes packed here bit by bit
from the documented GPTQ / AWQ formats.
"""
import dataclasses

import torch

import ttscale.ops as ops
from hostile_harness import EITHER, case, raises
from hostile_inputs import INF, NAN, last_dim_strided, meta, rows_strided
from ttscale.ops.quant_matmul import AWQ_ORDER, QuantizedWeight
from ttscale.reference.quant_matmul import dequantize_ref, linear_ref, quantize_ref

# output rounding of quant_matmul (fp32 accumulation, one rounding to x's dtype)
U_OUT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}

DEQ_SHAPES = ("dequantize does not check qw.scales / qw.zeros against [N, K/G] as quant_matmul does: a scales or "
              "zeros tensor of shape [N, 1] or [1, K/G] broadcasts over the groups / rows and a wrong weight comes "
              "back silently (scales [N, 1]: every group scaled by group 0's scale)")
UNPACK_ROWS = ("unpack (and dequantize, repack through it) does not check qw.packed against qw.shape: with fewer row "
               "blocks than ceil(N/16) it silently returns fewer than N rows of codes ([16, K] or [32, K] instead of "
               "[N, K])")
UNPACK_BITS = ("unpack (and dequantize, repack through it) does not check qw.bits against qw.packed's record size "
               "(2 * bits bytes per input feature) nor that it is an int: a mismatched or float bits fails inside "
               "torch's reshape with a message that names neither bits nor packed")
FLOAT_BITS = ("from_gptq / from_awq accept a float bits equal to a supported width (4.0 == 4 passes their membership "
              "test) and then fail inside torch (from_gptq: IndexError from float bit positions; from_awq: TypeError "
              "from a shift) instead of a ValueError naming bits, as quantize's integer check gives")


def _w(n=20, k=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, ::7] *= 3.0  # outliers, so that groups differ in range
    return w


def _qw(bits=4, group_size=32, symmetric=False, n=20, k=96):
    w = _w(n, k)
    return w, ops.quantize(w, bits=bits, group_size=group_size, symmetric=symmetric)


def _deq_ref(w, bits, group_size, symmetric, scale_dtype=torch.float32):
    q, s, z = quantize_ref(w, bits, group_size, symmetric, scale_dtype)
    return q, s, z, dequantize_ref(q, s, z, group_size)


def _qm_vs_ref(x, qw, w_deq, what, bias=None, nan_exact=True):
    """quant_matmul against linear_ref over the reference weight: the same NaN entries (with
    ``nan_exact``; always the same non-finite ones), and finite ones within fp32 accumulation error
    of |x| @ |W'|^T plus one output rounding."""
    y = ops.quant_matmul(x, qw, bias=bias)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w_deq.shape[0]), f"{what}: {y.dtype} {tuple(y.shape)}"
    x2 = x.reshape(-1, x.shape[-1])
    ref = linear_ref(x2, w_deq, bias)
    got = y.reshape(ref.shape).double()
    if nan_exact:
        assert torch.equal(torch.isnan(got), torch.isnan(ref)), f"{what}: NaN entries differ from the reference"
    assert torch.equal(torch.isfinite(got), torch.isfinite(ref)), f"{what}: non-finite entries differ from the reference"
    fin = torch.isfinite(ref)
    mag = x2.double().abs().nan_to_num(posinf=0.0) @ w_deq.abs().nan_to_num(posinf=0.0).T
    if bias is not None:
        mag = mag + bias.double().abs()
    bound = 64 * 2.0**-24 * mag + U_OUT[x.dtype] * ref.abs() + 1e-30
    err = (got - ref).abs()
    assert (err[fin] <= bound[fin]).all(), f"{what}: max error {err[fin].max():.3e}, bound {bound[fin].min():.3e}"
    return y


# ================================================================ quant_matmul
OP = "quant_matmul"


@case(OP, "dtype/x_float64")
def _():
    w, qw = _qw()
    raises(lambda: ops.quant_matmul(torch.randn(2, 96).double(), qw), "x must be one of")


@case(OP, "dtype/x_int")
def _():
    w, qw = _qw()
    raises(lambda: ops.quant_matmul(torch.ones(2, 96, dtype=torch.int32), qw), "x must be one of")


@case(OP, "dtype/bias_differs_from_x")
def _():
    w, qw = _qw()
    raises(lambda: ops.quant_matmul(torch.randn(2, 96), qw, bias=torch.randn(20).half()), "bias dtype must equal x dtype")


@case(OP, "dtype/scales_float64")
def _():
    w, qw = _qw()
    raises(lambda: ops.quant_matmul(torch.randn(2, 96), dataclasses.replace(qw, scales=qw.scales.double())),
           "scales must be one of")


@case(OP, "dtype/zeros_int32")
def _():
    w, qw = _qw()
    raises(lambda: ops.quant_matmul(torch.randn(2, 96), dataclasses.replace(qw, zeros=qw.zeros.int())),
           "zeros must be uint8")


@case(OP, "dtype/packed_int8")
def _():
    w, qw = _qw()
    raises(lambda: ops.quant_matmul(torch.randn(2, 96), dataclasses.replace(qw, packed=qw.packed.to(torch.int8))),
           "packed must be uint8")


@case(OP, "dtype/qw_is_a_tensor")
def _():
    raises(lambda: ops.quant_matmul(torch.randn(2, 96), _w()), "qw must be a QuantizedWeight", types=(TypeError,))


@case(OP, "shape/x_last_dim_not_K")
def _():
    w, qw = _qw()
    raises(lambda: ops.quant_matmul(torch.randn(2, 64), qw), "x last dimension must equal the weight's in_features K = 96")


@case(OP, "shape/x_0d")
def _():
    w, qw = _qw()
    raises(lambda: ops.quant_matmul(torch.tensor(1.0), qw), "x must have at least one dimension")


@case(OP, "shape/bias_wrong_length")
def _():
    w, qw = _qw()
    raises(lambda: ops.quant_matmul(torch.randn(2, 96), qw, bias=torch.randn(21)), "bias must be 1-D [N] = [20]")


@case(OP, "shape/scales_not_N_by_groups")
def _():
    w, qw = _qw()
    raises(lambda: ops.quant_matmul(torch.randn(2, 96), dataclasses.replace(qw, scales=qw.scales[:, :1])),
           "qw.scales has shape (20, 1)", types=(ValueError,))


@case(OP, "shape/zeros_not_like_scales")
def _():
    w, qw = _qw()
    raises(lambda: ops.quant_matmul(torch.randn(2, 96), dataclasses.replace(qw, zeros=qw.zeros[:5])),
           "zeros must have the shape of scales")


@case(OP, "shape/packed_row_blocks_not_N")
def _():
    w, qw = _qw()
    raises(lambda: ops.quant_matmul(torch.randn(2, 96), dataclasses.replace(qw, shape=(16, 96), scales=qw.scales[:16],
                                                                          zeros=qw.zeros[:16])),
           "packed must have ceil(N/16) = 1 row blocks")


@case(OP, "shape/odd_sizes_are_valid", isa=True)
def _():
    # N = 17 (one full and one 1-row block), K = 96 (3 groups), M = 1 / 3 / 97, leading dims, every width
    for bits in (2, 3, 4, 8):
        for sym in (False, True):
            w = _w(17, 96, seed=bits)
            qw = ops.quantize(w, bits=bits, group_size=32, symmetric=sym)
            deq = _deq_ref(w, bits, 32, sym)[3]
            for shape in ((1, 96), (3, 96), (97, 96), (2, 3, 96)):
                _qm_vs_ref(torch.randn(*shape), qw, deq, f"bits {bits} sym {sym} x {shape}",
                           bias=torch.randn(17))


@case(OP, "stride/x_strided_rows_and_stride0_are_valid", isa=True)
def _():
    w, qw = _qw(bits=3, group_size=-1)
    deq = _deq_ref(w, 3, -1, False)[3]
    _qm_vs_ref(rows_strided(torch.randn(5, 96)), qw, deq, "strided x rows")
    _qm_vs_ref(torch.randn(1, 96).expand(9, 96), qw, deq, "stride-0 x rows")
    _qm_vs_ref(last_dim_strided(torch.randn(4, 96)), qw, deq, "x with a strided last dimension")


@case(OP, "stride/packed_not_contiguous")
def _():
    w, qw = _qw()
    p = qw.packed.transpose(0, 1).contiguous().transpose(0, 1)
    raises(lambda: ops.quant_matmul(torch.randn(2, 96), dataclasses.replace(qw, packed=p)), "packed must be contiguous")


@case(OP, "device/x_meta")
def _():
    w, qw = _qw()
    raises(lambda: ops.quant_matmul(meta(torch.randn(2, 96)), qw), "must be on the same device")


@case(OP, "device/bias_meta")
def _():
    w, qw = _qw()
    raises(lambda: ops.quant_matmul(torch.randn(2, 96), qw, bias=meta(torch.randn(20))), "bias must be on the same device")


@case(OP, "values/bits_5")
def _():
    w, qw = _qw()
    raises(lambda: ops.quant_matmul(torch.randn(2, 96), dataclasses.replace(qw, bits=5)), "bits must be 2, 3, 4 or 8")


@case(OP, "values/unknown_layout")
def _():
    w, qw = _qw()
    raises(lambda: ops.quant_matmul(torch.randn(2, 96), dataclasses.replace(qw, layout="foo")),
           "unknown QuantizedWeight layout 'foo'")


@case(OP, "values/cuda_layout_on_cpu")
def _():
    w, qw = _qw()
    raises(lambda: ops.quant_matmul(torch.randn(2, 96), ops.repack(qw, "cuda_k32")),
           "qw has layout 'cuda_k32' but is on cpu")


@case(OP, "values/zeros_up_to_2^bits_are_valid", isa=True)
def _():
    # GPTQ v1 imports zeros up to 2^bits (stored z - 1 = 2^bits - 1); any uint8 zero is (q - z) * s
    w, qw = _qw(bits=4)
    z = torch.randint(0, 256, qw.zeros.shape, dtype=torch.uint8)
    z[:, 0] = 16
    qz = dataclasses.replace(qw, zeros=z)
    q, s, _, _ = _deq_ref(w, 4, 32, False)
    _qm_vs_ref(torch.randn(3, 96), qz, dequantize_ref(q, s, z.long(), 32), "zeros 0..255")


@case(OP, "nonfinite/nan_and_inf_activations", isa=True)
def _():
    # NaN in x: exactly its rows are NaN. +-inf in x: its rows are non-finite; which entries are
    # NaN rather than +-inf is not pinned, because the kernels form sum(q * x) - z * sum(x) per
    # group (documented), where inf - inf = NaN, and the reference (q - z) * x does not
    for dt in (torch.float32, torch.bfloat16):
        w, qw = _qw(bits=4, n=37)
        deq = _deq_ref(w, 4, 32, False)[3]
        x = torch.randn(6, 96).to(dt)
        x[1, 0], x[4, 95] = NAN, NAN
        _qm_vs_ref(x, qw, deq, f"NaN in x ({dt})")
        x[1, 0], x[4, 95], x[2, 50], x[3, 31] = NAN, 1.0, INF, -INF
        _qm_vs_ref(x, qw, deq, f"NaN / inf in x ({dt})", nan_exact=False)


@case(OP, "nonfinite/nan_scale_poisons_its_output_column", isa=True)
def _():
    w, qw = _qw(bits=8, group_size=32)
    s = qw.scales.clone()
    s[7, 2] = NAN
    q, _, z, _ = _deq_ref(w, 8, 32, False)
    _qm_vs_ref(torch.randn(4, 96), dataclasses.replace(qw, scales=s), dequantize_ref(q, s, z, 32), "NaN scale")


@case(OP, "huge/bits_2^40")
def _():
    w, qw = _qw()
    raises(lambda: ops.quant_matmul(torch.randn(2, 96), dataclasses.replace(qw, bits=2**40)),
           "bits must be 2, 3, 4 or 8, got 1099511627776")


@case(OP, "huge/group_size_2^33")
def _():
    w, qw = _qw()
    raises(lambda: ops.quant_matmul(torch.randn(2, 96), dataclasses.replace(qw, group_size=2**33)),
           "with group_size 8589934592", types=(ValueError,))


@case(OP, "huge/shape_N_2^31")
def _():
    w, qw = _qw()
    raises(lambda: ops.quant_matmul(torch.randn(2, 96), dataclasses.replace(qw, shape=(2**31, 96))),
           "qw.shape = (2147483648, 96)", types=(ValueError,))


# ================================================================ quantize
OP = "quantize"


def _quantize_vs_ref(w, bits, group_size, symmetric, what, scale_dtype=torch.float32):
    qw = ops.quantize(w, bits=bits, group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype)
    q, s, z = quantize_ref(w, bits, group_size, symmetric, scale_dtype)
    assert torch.equal(ops.unpack(qw).long(), q), f"{what}: codes differ from quantize_ref"
    assert torch.equal(qw.scales, s), f"{what}: scales differ from quantize_ref"
    assert (qw.zeros is None) == symmetric and (symmetric or torch.equal(qw.zeros.long(), z)), f"{what}: zeros"


@case(OP, "dtype/int_weight")
def _():
    raises(lambda: ops.quantize(torch.ones(4, 32, dtype=torch.int32), group_size=32),
           "w must be a floating-point tensor", types=(TypeError,))


@case(OP, "dtype/float64_and_bf16_weights_are_valid")
def _():
    w = _w().bfloat16()
    _quantize_vs_ref(w, 4, 32, False, "bf16 w")
    _quantize_vs_ref(w.double(), 3, 32, True, "float64 w")


@case(OP, "dtype/scale_dtype_float64")
def _():
    raises(lambda: ops.quantize(_w(), group_size=32, scale_dtype=torch.float64),
           "scale_dtype must be float32, float16 or bfloat16", types=(ValueError,))


@case(OP, "shape/3d")
def _():
    raises(lambda: ops.quantize(_w()[None], group_size=32), "w must be 2-D [N, K]", types=(ValueError,))


@case(OP, "shape/K_not_a_multiple_of_group")
def _():
    raises(lambda: ops.quantize(torch.randn(4, 40), group_size=32),
           "in_features K = 40 must be a positive multiple of group_size = 32", types=(ValueError,))


@case(OP, "shape/K_0")
def _():
    raises(lambda: ops.quantize(torch.randn(4, 0), group_size=-1), "K = 0 must be a positive multiple",
           types=(ValueError,))


@case(OP, "shape/no_rows_is_valid")
def _():
    qw = ops.quantize(torch.randn(0, 64), group_size=32)
    assert qw.shape == (0, 64) and ops.dequantize(qw).shape == (0, 64), f"an empty weight: {qw.shape}"


@case(OP, "stride/strided_and_transposed_w_are_valid")
def _():
    big = _w(20, 192)
    _quantize_vs_ref(big[:, ::2], 4, 32, False, "w with a strided last dimension")
    _quantize_vs_ref(_w(96, 20).t(), 2, -1, False, "transposed w")


@case(OP, "device/meta")
def _():
    raises(lambda: ops.quantize(meta(_w()), group_size=32), "quantize has no meta layout",
           types=(NotImplementedError,))


@case(OP, "values/bits_5")
def _():
    raises(lambda: ops.quantize(_w(), bits=5, group_size=32), "bits must be one of (2, 3, 4, 8)", types=(ValueError,))


@case(OP, "values/bits_float")
def _():
    raises(lambda: ops.quantize(_w(), bits=4.0, group_size=32), "bits must be one of (2, 3, 4, 8) (an integer)",
           types=(ValueError,))


@case(OP, "values/group_size_48")
def _():
    raises(lambda: ops.quantize(_w(), group_size=48), "group_size must be one of (32, 64, 128, -1)", types=(ValueError,))


@case(OP, "values/scale_overflows_float16")
def _():
    raises(lambda: ops.quantize(_w() * 1e8, group_size=32, scale_dtype=torch.float16), "does not fit scale_dtype",
           types=(ValueError,))


@case(OP, "values/tiny_and_zero_groups_are_valid")
def _():
    # all-zero and denormal groups: the scale floor (eps, or float16's smallest normal) keeps codes finite
    w = _w()
    w[0] = 0.0
    w[1, :32] = 1e-40
    w[2] = -1e-30
    for sd in (torch.float32, torch.float16, torch.bfloat16):
        _quantize_vs_ref(w, 4, 32, False, f"tiny groups, {sd} scales", scale_dtype=sd)
        _quantize_vs_ref(w, 8, -1, True, f"tiny groups symmetric, {sd} scales", scale_dtype=sd)


@case(OP, "nonfinite/nan")
def _():
    w = _w()
    w[3, 50] = NAN
    raises(lambda: ops.quantize(w, group_size=32), "w contains NaN or inf", types=(ValueError,))


@case(OP, "nonfinite/inf")
def _():
    w = _w()
    w[19, 95] = -INF
    raises(lambda: ops.quantize(w, group_size=32, symmetric=True), "w contains NaN or inf", types=(ValueError,))


# ================================================================ dequantize / unpack / repack
@case("dequantize", "shape/scales_one_group", xfail=DEQ_SHAPES)
def _():
    w, qw = _qw()
    raises(lambda: ops.dequantize(dataclasses.replace(qw, scales=qw.scales[:, :1])), "scales", types=EITHER)


@case("dequantize", "shape/scales_one_row_symmetric", xfail=DEQ_SHAPES)
def _():
    w, qw = _qw(symmetric=True)
    raises(lambda: ops.dequantize(dataclasses.replace(qw, scales=qw.scales[:1])), "scales", types=EITHER)


@case("dequantize", "shape/zeros_one_group", xfail=DEQ_SHAPES)
def _():
    w, qw = _qw()
    raises(lambda: ops.dequantize(dataclasses.replace(qw, zeros=qw.zeros[:, :1])), "zeros", types=EITHER)


@case("dequantize", "values/matches_reference_with_perm")
def _():
    # an act-order weight: dequantize returns W in the original column order
    for bits in (2, 3, 4, 8):
        w, qw = _qw(bits=bits, symmetric=bits == 3)
        perm = torch.randperm(96)
        qp = ops.quantize(w[:, perm], bits=bits, group_size=32, symmetric=bits == 3)
        qp = dataclasses.replace(qp, perm=perm)
        want = torch.empty(20, 96, dtype=torch.float64)
        want[:, perm] = _deq_ref(w[:, perm], bits, 32, bits == 3)[3]
        got = ops.dequantize(qp)
        assert got.dtype == torch.float32 and torch.allclose(got.double(), want, rtol=1e-6, atol=1e-9), \
            f"bits {bits}: dequantize with perm differs from the reference"


@case("dequantize", "values/bits_disagree_with_packed", xfail=UNPACK_BITS)
def _():
    w, qw = _qw(bits=4)
    raises(lambda: ops.dequantize(dataclasses.replace(qw, bits=2)), "bits", types=EITHER)


@case("unpack", "values/codes_match_reference_in_both_layouts")
def _():
    for bits in (2, 3, 4, 8):
        w, qw = _qw(bits=bits, n=33)
        q = quantize_ref(w, bits, 32, False)[0]
        assert torch.equal(ops.unpack(qw).long(), q), f"bits {bits}: cpu_n16 codes"
        assert torch.equal(ops.unpack(ops.repack(qw, "cuda_k32")).long(), q), f"bits {bits}: cuda_k32 codes"


@case("unpack", "values/unknown_layout")
def _():
    w, qw = _qw()
    raises(lambda: ops.unpack(dataclasses.replace(qw, layout="foo")), "unknown QuantizedWeight layout 'foo'")


@case("unpack", "values/packed_fewer_row_blocks_than_shape", xfail=UNPACK_ROWS)
def _():
    w, qw = _qw(n=20)  # 2 row blocks of 16
    raises(lambda: ops.unpack(dataclasses.replace(qw, packed=qw.packed[:1])), "packed", types=EITHER)


@case("unpack", "values/shape_more_rows_than_packed", xfail=UNPACK_ROWS)
def _():
    w, qw = _qw(n=20)
    raises(lambda: ops.unpack(dataclasses.replace(qw, shape=(40, 96))), "packed", types=EITHER)


@case("unpack", "values/bits_disagree_with_packed", xfail=UNPACK_BITS)
def _():
    w, qw = _qw(bits=4)
    raises(lambda: ops.unpack(dataclasses.replace(qw, bits=3)), "bits", types=EITHER)


@case("unpack", "values/bits_float", xfail=UNPACK_BITS)
def _():
    w, qw = _qw(bits=4)
    raises(lambda: ops.unpack(dataclasses.replace(qw, bits=4.0)), "bits", types=EITHER + (TypeError,))


@case("repack", "values/unknown_layout")
def _():
    w, qw = _qw()
    raises(lambda: ops.repack(qw, "cuda"), "layout must be one of ('cpu_n16', 'cuda_k32')", types=(ValueError,))


@case("repack", "values/cuda_layout_needs_K_multiple_of_32")
def _():
    qw = ops.quantize(_w(4, 48), group_size=-1)
    raises(lambda: ops.repack(qw, "cuda_k32"), "needs K % 32 == 0, got K = 48", types=(ValueError,))


@case("repack", "values/cuda_k32_with_bits_5")
def _():
    w, qw = _qw()
    raises(lambda: ops.repack(dataclasses.replace(ops.repack(qw, "cuda_k32"), bits=5), "cpu_n16"),
           "bits must be 2, 3, 4 or 8, got 5")


@case("repack", "values/roundtrip_is_exact")
def _():
    for bits in (2, 3, 4, 8):
        w, qw = _qw(bits=bits, n=49)
        back = ops.repack(ops.repack(qw, "cuda_k32"), "cpu_n16")
        assert torch.equal(back.packed, qw.packed), f"bits {bits}: cpu -> cuda_k32 -> cpu changed the packed codes"


@case("repack", "values/bits_disagree_with_packed", xfail=UNPACK_BITS)
def _():
    w, qw = _qw(bits=4)
    raises(lambda: ops.repack(dataclasses.replace(qw, bits=2), "cuda_k32"), "bits", types=EITHER)


# ================================================================ QuantizedWeight
OP = "QuantizedWeight"


def _with_perm(perm):
    w, qw = _qw()
    return lambda: QuantizedWeight(qw.packed, qw.scales, qw.zeros, 4, 32, (20, 96), perm=perm)


@case(OP, "values/perm_float")
def _():
    raises(_with_perm(torch.arange(96.0)), "qw.perm must be int64 [K] = [96]", types=(ValueError,))


@case(OP, "values/perm_wrong_length")
def _():
    raises(_with_perm(torch.arange(95)), "qw.perm must be int64 [K] = [96]", types=(ValueError,))


@case(OP, "values/perm_duplicate")
def _():
    p = torch.arange(96)
    p[5] = 6
    raises(_with_perm(p), "6 appears 2 times and 5 is missing", types=(ValueError,))


@case(OP, "values/perm_out_of_range")
def _():
    p = torch.arange(96)
    p[95] = 2**40
    raises(_with_perm(p), "qw.perm[95] = 1099511627776 is out of range", types=(ValueError,))


@case(OP, "values/perm_changed_in_place_after_the_check")
def _():
    w, qw = _qw()
    perm = torch.randperm(96)
    qp = dataclasses.replace(qw, perm=perm)
    perm[0] = perm[1]  # the version counter moved: the next use checks again
    raises(lambda: ops.quant_matmul(torch.randn(2, 96), qp), "qw.perm must be a permutation", types=(ValueError,))
    raises(lambda: ops.dequantize(qp), "qw.perm must be a permutation", types=(ValueError,))


@case(OP, "values/perm_replaced_after_construction")
def _():
    w, qw = _qw()
    qp = dataclasses.replace(qw, perm=torch.randperm(96))
    qp.perm = torch.zeros(96, dtype=torch.int64)
    raises(lambda: ops.quant_matmul(torch.randn(2, 96), qp), "qw.perm must be a permutation", types=(ValueError,))


@case(OP, "values/to_meta")
def _():
    w, qw = _qw()
    raises(lambda: qw.to("meta"), "QuantizedWeight has no meta layout", types=(NotImplementedError,))


@case(OP, "values/perm_matmul_matches_reference", isa=True)
def _():
    w = _w()
    perm = torch.randperm(96)
    qp = dataclasses.replace(ops.quantize(w[:, perm], bits=4, group_size=32), perm=perm)
    deq = torch.empty(20, 96, dtype=torch.float64)
    deq[:, perm] = _deq_ref(w[:, perm], 4, 32, False)[3]
    _qm_vs_ref(torch.randn(5, 96), qp, deq, "act-order weight")


# ================================================================ from_gptq / from_awq
def _bitstream(codes, bits):
    """codes [R, C] (< 2^bits) -> int32 [R, ceil(C * bits / 32)]: each row one little-endian bit
    stream, code c at bits c*bits.., 32-bit words (the GPTQ format), built bit by bit."""
    r, c = codes.shape
    nbits = torch.zeros(r, ((c * bits + 31) // 32) * 32, dtype=torch.int64)
    for i in range(bits):
        nbits[:, torch.arange(c) * bits + i] = (codes.long() >> i) & 1
    words = (nbits.view(r, -1, 32) << torch.arange(32)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _gptq(bits=4, k=64, n=16, g=32, seed=3):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (k, n), generator=gen)
    zs = torch.randint(0, 2**bits, (k // g, n), generator=gen)  # stored zeros (v1: z - 1)
    s = torch.rand(k // g, n, generator=gen) + 0.1
    return q, zs, s, _bitstream(q.t(), bits).t().contiguous(), _bitstream(zs, bits)


def _awq(k=64, n=16, g=32, seed=4):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen)
    z = torch.randint(0, 16, (k // g, n), generator=gen)
    s = torch.rand(k // g, n, generator=gen) + 0.1

    def pack(c):  # nibble i of word j holds output row 8j + AWQ_ORDER[i]
        c = c.view(c.shape[0], -1, 8)[..., list(AWQ_ORDER)]
        w = (c << (torch.arange(8) * 4)).sum(-1)
        return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)

    return q, z, s, pack(q), pack(z)


OP = "from_gptq"


@case(OP, "dtype/qweight_int64")
def _():
    q, zs, s, qweight, qzeros = _gptq()
    raises(lambda: ops.from_gptq(qweight.long(), qzeros, s, bits=4, group_size=32), "qweight must be an int32 tensor",
           types=(TypeError,))


@case(OP, "dtype/scales_float64")
def _():
    q, zs, s, qweight, qzeros = _gptq()
    raises(lambda: ops.from_gptq(qweight, qzeros, s.double(), bits=4, group_size=32), "scales must be a float32",
           types=(TypeError,))


@case(OP, "dtype/g_idx_float")
def _():
    q, zs, s, qweight, qzeros = _gptq()
    raises(lambda: ops.from_gptq(qweight, qzeros, s, torch.zeros(64), bits=4, group_size=32),
           "g_idx must be a 1-D int32/int64 tensor", types=(ValueError,))


@case(OP, "shape/qweight_1d")
def _():
    q, zs, s, qweight, qzeros = _gptq()
    raises(lambda: ops.from_gptq(qweight[0], qzeros, s, bits=4, group_size=32), "qweight must be 2-D",
           types=(ValueError,))


@case(OP, "shape/qweight_no_rows")
def _():
    q, zs, s, qweight, qzeros = _gptq()
    raises(lambda: ops.from_gptq(qweight[:0], qzeros, s, bits=4, group_size=32), "qweight must be [K*bits/32, N]",
           types=(ValueError,))


@case(OP, "shape/scales_wrong_groups")
def _():
    q, zs, s, qweight, qzeros = _gptq()
    raises(lambda: ops.from_gptq(qweight, qzeros, s[:1], bits=4, group_size=32), "scales must have shape [2, 16]",
           types=(ValueError,))


@case(OP, "shape/qzeros_wrong_shape")
def _():
    q, zs, s, qweight, qzeros = _gptq()
    raises(lambda: ops.from_gptq(qweight, qzeros[:, :1], s, bits=4, group_size=32),
           "qzeros must be int32 [groups, ceil(N*bits/32)] = [2, 2]", types=(ValueError,))


@case(OP, "shape/g_idx_wrong_length")
def _():
    q, zs, s, qweight, qzeros = _gptq()
    raises(lambda: ops.from_gptq(qweight, qzeros, s, torch.zeros(63, dtype=torch.long), bits=4, group_size=32),
           "g_idx must have K = 64 entries", types=(ValueError,))


@case(OP, "values/bits_5")
def _():
    q, zs, s, qweight, qzeros = _gptq()
    raises(lambda: ops.from_gptq(qweight, qzeros, s, bits=5, group_size=32), "bits must be one of (2, 3, 4, 8)",
           types=(ValueError,))


@case(OP, "values/bits_float", xfail=FLOAT_BITS)
def _():
    q, zs, s, qweight, qzeros = _gptq()
    raises(lambda: ops.from_gptq(qweight, qzeros, s, bits=4.0, group_size=32), "bits", types=EITHER + (TypeError,))


@case(OP, "values/group_size_48")
def _():
    q, zs, s, qweight, qzeros = _gptq()
    raises(lambda: ops.from_gptq(qweight, qzeros, s, bits=4, group_size=48), "group_size must be one of",
           types=(ValueError,))


@case(OP, "values/version_3")
def _():
    q, zs, s, qweight, qzeros = _gptq()
    raises(lambda: ops.from_gptq(qweight, qzeros, s, bits=4, group_size=32, version=3), "version must be 1",
           types=(ValueError,))


@case(OP, "values/g_idx_uneven_groups")
def _():
    q, zs, s, qweight, qzeros = _gptq()
    raises(lambda: ops.from_gptq(qweight, qzeros, s, torch.zeros(64, dtype=torch.long), bits=4, group_size=32),
           "g_idx must assign exactly group_size = 32 input features", types=(ValueError,))


@case(OP, "values/v1_8bit_stored_zero_255")
def _():
    q, zs, s, qweight, qzeros = _gptq(bits=8)
    qz = _bitstream(torch.full((2, 16), 255), 8)
    raises(lambda: ops.from_gptq(qweight, qz, s, bits=8, group_size=32), "z = 256", types=(ValueError,))


@case(OP, "values/every_width_and_version_is_exact")
def _():
    # dequantize(import) == (q - z) * s from codes packed here bit by bit; 3 bits straddle words
    for bits in (2, 3, 4, 8):
        for version in (1, 2):
            q, zs, s, qweight, qzeros = _gptq(bits=bits, k=96 if bits == 3 else 64)
            if bits == 8 and version == 1:
                zs = zs.clamp(max=254)
                qzeros = _bitstream(zs, 8)
            z = zs + 1 if version == 1 else zs
            want = dequantize_ref(q.t(), s.t(), z.t(), 32)
            got = ops.dequantize(ops.from_gptq(qweight, qzeros, s, bits=bits, group_size=32, version=version))
            assert torch.allclose(got.double(), want, rtol=1e-6, atol=0), f"bits {bits} v{version}: wrong weight"


@case(OP, "stride/transposed_qweight_view_is_valid")
def _():
    q, zs, s, qweight, qzeros = _gptq()
    qt = qweight.t().contiguous().t()  # same values, column-major
    want = dequantize_ref(q.t(), s.t(), (zs + 1).t(), 32)
    got = ops.dequantize(ops.from_gptq(qt, qzeros, s, bits=4, group_size=32))
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=0), "a column-major qweight imported differently"


@case(OP, "device/qzeros_meta")
def _():
    q, zs, s, qweight, qzeros = _gptq()
    raises(lambda: ops.from_gptq(qweight, meta(qzeros), s, bits=4, group_size=32), "qzeros must be on qweight's device",
           types=(ValueError,))


@case(OP, "huge/g_idx_2^40")
def _():
    q, zs, s, qweight, qzeros = _gptq()
    raises(lambda: ops.from_gptq(qweight, qzeros, s, (torch.arange(64) // 32) * 2**40, bits=4, group_size=32),
           "g_idx values must be group indices in [0, 2)", types=(ValueError,))


OP = "from_awq"


@case(OP, "dtype/qweight_int16")
def _():
    q, z, s, qw, qz = _awq()
    raises(lambda: ops.from_awq(qw.short(), qz, s, group_size=32), "qweight must be an int32 tensor", types=(TypeError,))


@case(OP, "dtype/scales_int")
def _():
    q, z, s, qw, qz = _awq()
    raises(lambda: ops.from_awq(qw, qz, s.int(), group_size=32), "scales must be a float32", types=(TypeError,))


@case(OP, "shape/qweight_3d")
def _():
    q, z, s, qw, qz = _awq()
    raises(lambda: ops.from_awq(qw[None], qz, s, group_size=32), "qweight must be 2-D", types=(ValueError,))


@case(OP, "shape/qweight_empty")
def _():
    q, z, s, qw, qz = _awq()
    raises(lambda: ops.from_awq(qw[:0], qz, s, group_size=32), "with K, N > 0", types=(ValueError,))


@case(OP, "shape/scales_wrong_N")
def _():
    q, z, s, qw, qz = _awq()
    raises(lambda: ops.from_awq(qw, qz, s[:, :8], group_size=32), "scales must have shape [2, 16]", types=(ValueError,))


@case(OP, "shape/qzeros_wrong_groups")
def _():
    q, z, s, qw, qz = _awq()
    raises(lambda: ops.from_awq(qw, qz[:1], s, group_size=32), "qzeros must be int32 [K/group_size, N/8] = [2, 2]",
           types=(ValueError,))


@case(OP, "values/bits_8")
def _():
    q, z, s, qw, qz = _awq()
    raises(lambda: ops.from_awq(qw, qz, s, bits=8, group_size=32), "bits must be 4 for AWQ", types=(ValueError,))


@case(OP, "values/bits_float", xfail=FLOAT_BITS)
def _():
    q, z, s, qw, qz = _awq()
    raises(lambda: ops.from_awq(qw, qz, s, bits=4.0, group_size=32), "bits", types=EITHER + (TypeError,))


@case(OP, "values/group_size_2^40")
def _():
    q, z, s, qw, qz = _awq()
    raises(lambda: ops.from_awq(qw, qz, s, group_size=2**40), "group_size must be one of", types=(ValueError,))


@case(OP, "values/import_is_exact")
def _():
    for g in (32, 64):
        q, z, s, qw, qz = _awq(g=g)
        want = dequantize_ref(q.t(), s.t(), z.t(), g)
        got = ops.dequantize(ops.from_awq(qw, qz, s, group_size=g))
        assert torch.allclose(got.double(), want, rtol=1e-6, atol=0), f"group {g}: wrong weight"


@case(OP, "device/scales_meta")
def _():
    q, z, s, qw, qz = _awq()
    raises(lambda: ops.from_awq(qw, qz, meta(s), group_size=32), "scales must be on qweight's device",
           types=(ValueError,))
