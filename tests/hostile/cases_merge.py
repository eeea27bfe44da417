"""Hostile inputs for merge_attention_states and merge_attention_states_ (exact LSE merge of two
attention states). Every case is registered for both ops (the in-place one names its arguments
out / lse / out_other / lse_other); results are compared with the float64
``merge_attention_states_ref``, which follows the documented contract: both LSE -inf gives 0 and
-inf, a NaN or +inf LSE gives NaN."""
import math

import torch

import ttscale.ops as ops
from hostile_harness import case, raises
from hostile_inputs import INF, NAN, TOL, last_dim_strided, like_ref, meta, rows_strided
from ttscale.reference.paged_attention import merge_attention_states_ref


def _states(t=5, h=3, d=64, dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(t, h, d, generator=g).to(dtype), torch.randn(t, h, generator=g),
            torch.randn(t, h, d, generator=g).to(dtype), torch.randn(t, h, generator=g))


def _functional(a, la, b, lb):
    return ops.merge_attention_states(a, la, b, lb)


def _inplace(a, la, b, lb):
    ops.merge_attention_states_(a, la, b, lb)
    return a, la


def _vs_ref(call, a, la, b, lb, what, nan_exact=True):
    ro, rl = merge_attention_states_ref(a, la, b, lb)  # before an in-place call overwrites a / la
    out, lse = call(a, la, b, lb)
    like_ref(out, ro, what + " (output)", TOL[a.dtype], nan_exact=nan_exact)
    like_ref(lse, rl, what + " (LSE)", 1e-5)
    return out, lse


for OP, call, A, LA, B, LB in (("merge_attention_states", _functional, "out_a", "lse_a", "out_b", "lse_b"),
                               ("merge_attention_states_", _inplace, "out", "lse", "out_other", "lse_other")):

    def _bad(name, check, c=call):
        """A case that breaks the states with ``check(c, a, la, b, lb)`` (which calls raises)."""
        case(OP, name)(lambda: check(c, *_states()))

    _bad("dtype/out_float64", lambda c, a, la, b, lb, n=A: raises(lambda: c(a.double(), la, b.double(), lb),
                                                                  f"{n} must be one of"))
    _bad("dtype/out_dtypes_differ", lambda c, a, la, b, lb, n=B: raises(lambda: c(a, la, b.half(), lb), f"{n} dtype"))
    _bad("dtype/lse_float16", lambda c, a, la, b, lb, n=LA: raises(lambda: c(a, la.half(), b, lb),
                                                                   f"{n} must be float32"))
    _bad("dtype/lse_float64", lambda c, a, la, b, lb, n=LB: raises(lambda: c(a, la, b, lb.double()),
                                                                   f"{n} must be float32"))
    _bad("shape/out_2d", lambda c, a, la, b, lb, n=A: raises(lambda: c(a[0], la, b[0], lb), f"{n} must be 3-D"))
    _bad("shape/out_shapes_differ", lambda c, a, la, b, lb, n=B: raises(lambda: c(a, la, b[:2], lb), f"{n} shape"))
    _bad("shape/lse_wrong_shape", lambda c, a, la, b, lb, n=LA: raises(lambda: c(a, la[:, :1], b, lb),
                                                                       f"{n} must have shape"))
    _bad("shape/lse_3d", lambda c, a, la, b, lb, n=LB: raises(lambda: c(a, la, b, lb[..., None]),
                                                              f"{n} must have shape"))
    _bad("stride/out_last_dim_strided", lambda c, a, la, b, lb, n=A: raises(
        lambda: c(last_dim_strided(a), la, b, lb), f"{n} must be contiguous"))
    _bad("stride/other_last_dim_strided", lambda c, a, la, b, lb, n=B: raises(
        lambda: c(a, la, last_dim_strided(b), lb), f"{n} must be contiguous"))
    _bad("device/lse_meta", lambda c, a, la, b, lb: raises(lambda: c(a, la, b, meta(lb)), "same device"))
    _bad("device/out_other_meta", lambda c, a, la, b, lb: raises(lambda: c(a, la, meta(b), lb), "same device"))

    @case(OP, "stride/strided_other_state_is_valid", isa=True)
    def _(c=call):
        a, la, b, lb = _states()
        _vs_ref(c, a, la, rows_strided(b), rows_strided(lb), "strided second state")

    @case(OP, "nonfinite/lse_nan_inf_minus_inf_mix", isa=True)
    def _(c=call):
        # every pairing of {finite, -inf, +inf, NaN} on the two sides, one head each
        a, la, b, lb = _states(t=4, h=4)
        vals = [0.3, -INF, INF, NAN]
        for i, x in enumerate(vals):
            for j, y in enumerate(vals):
                la[i, j], lb[i, j] = x, y
        _vs_ref(c, a, la, b, lb, "LSE pairs of finite / -inf / +inf / NaN")

    @case(OP, "nonfinite/empty_states_give_zero_and_minus_inf", isa=True)
    def _(c=call):
        a, la, b, lb = _states()
        la[0], lb[0] = -INF, -INF
        out, lse = _vs_ref(c, a, la, b, lb, "both states empty")
        assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all(), "case setup"

    @case(OP, "nonfinite/one_empty_state_keeps_the_other", isa=True)
    def _(c=call):
        a, la, b, lb = _states(dtype=torch.bfloat16)
        lb[1] = -INF
        _vs_ref(c, a, la, b, lb, "merge with an empty state (bf16)")

    @case(OP, "nonfinite/inf_in_out_with_finite_lse", isa=True)
    def _(c=call):
        # a non-finite output value with a finite weight is summed as IEEE arithmetic says
        a, la, b, lb = _states()
        a[2, 1, 5], b[3, 0, 7] = INF, NAN
        _vs_ref(c, a, la, b, lb, "inf / NaN output values", nan_exact=False)

    @case(OP, "nonfinite/huge_lse_gap", isa=True)
    def _(c=call):
        # finite LSEs 1e30 apart: exp(la - lb) underflows to 0, never overflows to inf
        a, la, b, lb = _states()
        la[:, 0], lb[:, 0] = 1e30, -1e30
        la[:, 1], lb[:, 1] = -3e38, 3e38
        _vs_ref(c, a, la, b, lb, "LSEs far apart")


# ---------------------------------------------------------------- aliasing
@case("merge_attention_states", "aliasing/merge_with_itself", isa=True)
def _():
    a, la, _, _ = _states()
    out, lse = ops.merge_attention_states(a, la, a, la)  # functional: reading one state twice is fine
    like_ref(out, a, "state merged with itself", 1e-6)
    like_ref(lse, la + math.log(2.0), "LSE merged with itself", 1e-6)


@case("merge_attention_states_", "aliasing/merge_with_itself")
def _():
    a, la, _, _ = _states()
    raises(lambda: ops.merge_attention_states_(a, la, a, la), "out_other shares memory with out")


@case("merge_attention_states_", "aliasing/out_overlaps_lse")
def _():
    buf = torch.randn(5 * 3 * 65)
    a = buf[: 5 * 3 * 64].view(5, 3, 64)
    la = buf[5 * 3 * 64 - 15:5 * 3 * 64].view(5, 3)  # the last 15 floats of out are also lse
    _, _, b, lb = _states()
    raises(lambda: ops.merge_attention_states_(a, la, b, lb), "share memory")


@case("merge_attention_states_", "aliasing/expanded_out")
def _():
    a, la, b, lb = _states()
    raises(lambda: ops.merge_attention_states_(a[:1].expand(5, 3, 64), la, b, lb), "out must be contiguous")


@case("merge_attention_states_", "aliasing/expanded_lse")
def _():
    a, la, b, lb = _states()
    raises(lambda: ops.merge_attention_states_(a, la[:1].expand(5, 3), b, lb), "lse must be contiguous")


@case("merge_attention_states_", "aliasing/expanded_other_state_is_valid", isa=True)
def _():
    a, la, b, lb = _states()
    _vs_ref(_inplace, a, la, b[:1].expand(5, 3, 64), lb[:1].expand(5, 3), "merged with a stride-0 state")
