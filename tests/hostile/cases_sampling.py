"""Hostile inputs for the sampling ops: sample, sample_from_probs, token_logprobs, speculative_verify.

Valid-but-odd inputs are checked against ``ttscale.reference.sampling``: every drawn token must lie in
the support of the exact filtered law (``filtered_probs``), log-probabilities must match
``token_logprobs_ref``, and the same ``(seed, offset)`` must draw the same tokens whatever the
layout of the logits (a strided or stride-0 view holds the same values). speculative_verify is
checked against the algorithm's invariants in cases whose acceptances are forced (a target
probability of 0 always rejects, a draft probability of 0 always accepts).

Non-finite logits are refused by contract (NaN / +inf: ValueError naming the row and the token; an
all -inf row: ValueError), and the scan that finds them is SIMD code with head and tail loops, so
those cases run on every CPU path with the bad value at each position class of a row.
"""
import functools

import torch

import ttscale.ops as ops
from hostile_harness import EITHER, case, raises
from hostile_inputs import INF, NAN, i32, i64, last_dim_strided, meta, rows_strided
from ttscale.reference.sampling import filtered_probs, token_logprobs_ref

V2_31 = 2**31  # one past the largest int32 vocabulary


def _logits(b=4, v=37, dtype=torch.float32, seed=0):
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _inputs(probs_mode, b=4, v=37, dtype=torch.float32):
    """Logits, or for sample_from_probs their softmax."""
    x = _logits(b, v, dtype)
    return torch.softmax(x.float(), -1).to(dtype) if probs_mode else x


def _in_support(tokens, x, rows=None, what="", **filters):
    """Every token has positive probability under the exact filtered law of its row."""
    law = filtered_probs(x, **filters)
    rows = torch.arange(x.shape[0]) if rows is None else rows.long()
    assert tokens.dtype == torch.int64 and tokens.shape == rows.shape, f"{what}: tokens {tokens.dtype} {tuple(tokens.shape)}"
    assert ((tokens >= 0) & (tokens < x.shape[1])).all(), f"{what}: token out of range: {tokens.tolist()}"
    p = law[rows, tokens]
    assert (p > 0).all(), f"{what}: drew tokens of probability 0: {tokens[p == 0].tolist()} (rows {rows[p == 0].tolist()})"


# ================================================================ sample / sample_from_probs
for OP, fn, X in (("sample", ops.sample, "logits"), ("sample_from_probs", ops.sample_from_probs, "probs")):
    probs_mode = OP == "sample_from_probs"

    _mk = functools.partial(_inputs, probs_mode)  # bound into every case below (late binding)

    # ---------------------------------------------------------------- dtype
    case(OP, "dtype/float64")(lambda f=fn, mk=_mk, n=X: raises(lambda: f(mk().double(), seed=0), f"{n} must be one of"))
    case(OP, "dtype/int32")(lambda f=fn, mk=_mk, n=X: raises(lambda: f(mk().int(), seed=0), f"{n} must be one of"))
    case(OP, "dtype/top_k_float_tensor")(lambda f=fn, mk=_mk: raises(
        lambda: f(mk(), top_k=torch.full((4,), 2.0), seed=0), "top_k must be an integer tensor"))
    case(OP, "dtype/top_p_int_tensor")(lambda f=fn, mk=_mk: raises(
        lambda: f(mk(), top_p=torch.ones(4, dtype=torch.int32), seed=0), "top_p must be a floating-point tensor"))
    case(OP, "dtype/indices_float")(lambda f=fn, mk=_mk: raises(
        lambda: f(mk(), indices=torch.zeros(3), seed=0), "indices must be int32 or int64"))
    case(OP, "dtype/seed_int32_tensor")(lambda f=fn, mk=_mk: raises(
        lambda: f(mk(), seed=i32(1)), "seed must be an int64 tensor"))
    case(OP, "dtype/top_k_python_float")(lambda f=fn, mk=_mk: raises(
        lambda: f(mk(), top_k=2.5, seed=0), "top_k must be None, an int or an integer tensor", types=(TypeError,)))
    case(OP, "dtype/top_k_bool")(lambda f=fn, mk=_mk: raises(
        lambda: f(mk(), top_k=True, seed=0), "top_k must be None, an int", types=(TypeError,)))
    case(OP, "dtype/x_not_a_tensor")(lambda f=fn, mk=_mk, n=X: raises(
        lambda: f([[0.0, 1.0]], seed=0), f"{n} must be a tensor",
                                                              types=(TypeError,)))

    # ---------------------------------------------------------------- shape
    case(OP, "shape/1d")(lambda f=fn, mk=_mk, n=X: raises(
        lambda: f(mk()[0], seed=0), f"{n} must be 2-D [batch, vocab]"))
    case(OP, "shape/3d")(lambda f=fn, mk=_mk, n=X: raises(
        lambda: f(mk()[None], seed=0), f"{n} must be 2-D [batch, vocab]"))
    case(OP, "shape/empty_vocabulary")(lambda f=fn, mk=_mk, n=X: raises(lambda: f(torch.ones(2, 0), seed=0),
                                                                f"{n} must have a non-empty vocabulary", types=(ValueError,)))
    case(OP, "shape/top_p_wrong_length")(lambda f=fn, mk=_mk: raises(
        lambda: f(mk(), top_p=torch.full((3,), 0.5), seed=0),
        "top_p must be a scalar or a 1-D tensor with one entry per row (4)"))
    case(OP, "shape/indices_2d")(lambda f=fn, mk=_mk: raises(
        lambda: f(mk(), indices=i64(0, 1)[None], seed=0), "indices must be 1-D"))
    case(OP, "shape/seed_wrong_length")(lambda f=fn, mk=_mk: raises(
        lambda: f(mk(), seed=i64(1, 2, 3), offset=0), "seed must be 1-D with 1 or num_samples (4) entries"))

    # ---------------------------------------------------------------- stride
    case(OP, "stride/vocab_strided")(lambda f=fn, mk=_mk, n=X: raises(lambda: f(last_dim_strided(mk()), seed=0),
                                                              f"{n} must be contiguous in its last dimension"))

    @case(OP, "stride/strided_and_stride0_rows_are_valid", isa=True)
    def _(f=fn, mk=_mk, pm=probs_mode):
        # a row stride of 2 rows, and 64 rows that are one row of memory: same values, same draws
        x = mk(v=300)
        kw = dict(top_k=torch.tensor([0, 5, 300, 2**40]), top_p=0.9, seed=11, offset=3)
        want = f(x, **kw)
        assert torch.equal(f(rows_strided(x), **kw), want), "a strided view of the same rows drew other tokens"
        _in_support(want, x, what="strided rows", probs_mode=pm, top_k=kw["top_k"], top_p=0.9)
        x0 = x[2:3].expand(64, 300)
        got = f(x0, seed=5, min_p=0.2)
        assert torch.equal(got, f(x0.contiguous(), seed=5, min_p=0.2)), "a stride-0 batch drew other tokens"
        _in_support(got, x0.contiguous(), what="stride-0 rows", probs_mode=pm, min_p=0.2)

    # ---------------------------------------------------------------- device
    case(OP, "device/indices_meta")(lambda f=fn, mk=_mk: raises(
        lambda: f(mk(), indices=meta(i64(0)), seed=0), "same device"))
    case(OP, "device/top_k_meta")(lambda f=fn, mk=_mk: raises(
        lambda: f(mk(), top_k=meta(i64(1, 1, 1, 1)), seed=0), "top_k must be on the same device"))
    case(OP, "device/seed_meta")(lambda f=fn, mk=_mk: raises(
        lambda: f(mk(), seed=meta(i64(1))), "seed must be on the same device"))

    # ---------------------------------------------------------------- values
    case(OP, "values/top_p_above_1")(lambda f=fn, mk=_mk: raises(
        lambda: f(mk(), top_p=1.5, seed=0), "top_p must be in [0, 1]"))
    case(OP, "values/top_p_nan")(lambda f=fn, mk=_mk: raises(
        lambda: f(mk(), top_p=NAN, seed=0), "top_p must be finite"))
    case(OP, "values/top_p_tensor_nan")(lambda f=fn, mk=_mk: raises(
        lambda: f(mk(), top_p=torch.tensor([0.5, NAN, 0.5, 0.5]), seed=0), "top_p contains NaN"))
    case(OP, "values/min_p_negative")(lambda f=fn, mk=_mk: raises(
        lambda: f(mk(), min_p=-0.1, seed=0), "min_p must be in [0, 1]"))
    case(OP, "values/min_p_tensor_above_1")(lambda f=fn, mk=_mk: raises(
        lambda: f(mk(), min_p=torch.tensor([0.5, 0.5, 1.5, 0.5]), seed=0), "min_p must be in [0, 1]"))
    case(OP, "values/indices_negative")(lambda f=fn, mk=_mk: raises(lambda: f(mk(), indices=i64(0, -1), seed=0),
                                                            "indices must be in [0, 4)"))
    case(OP, "values/indices_past_rows")(lambda f=fn, mk=_mk: raises(lambda: f(mk(), indices=i32(4), seed=0),
                                                             "indices must be in [0, 4)"))
    case(OP, "values/offset_without_seed")(lambda f=fn, mk=_mk: raises(
        lambda: f(mk(), offset=3), "offset was given without seed"))
    case(OP, "values/seed_and_generator")(lambda f=fn, mk=_mk: raises(
        lambda: f(mk(), seed=1, generator=torch.Generator()), "pass either generator or seed/offset, not both"))

    # ---------------------------------------------------------------- huge
    case(OP, "huge/vocab_2^31_expanded")(lambda f=fn, mk=_mk, n=X: raises(
        lambda: f(torch.ones(1, 1).expand(2, V2_31), seed=0), f"{n} vocabulary size must fit in int32", types=(ValueError,)))
    case(OP, "huge/seed_2^64")(lambda f=fn, mk=_mk: raises(lambda: f(mk(), seed=2**64), "seed must fit in 64 bits"))
    case(OP, "huge/offset_below_int64_min")(lambda f=fn, mk=_mk: raises(lambda: f(mk(), seed=0, offset=-2**63 - 1),
                                                                "offset must fit in 64 bits"))
    case(OP, "huge/top_k_2^63")(lambda f=fn, mk=_mk: raises(
        lambda: f(mk(), top_k=2**63, seed=0), "top_k must fit in int64"))
    case(OP, "huge/indices_int64_2^40")(lambda f=fn, mk=_mk: raises(lambda: f(mk(), indices=i64(0, 2**40), seed=0),
                                                            "got values from 0 to 1099511627776"))

    @case(OP, "huge/top_k_int64_max_is_top_k_V", isa=True)
    def _(f=fn, mk=_mk, pm=probs_mode):
        # top_k >= V keeps every token (clamped to V): the same draws as top_k = V, for ints and tensors
        x = mk(v=300)
        for big in (2**63 - 1, torch.full((4,), 2**62)):
            got = f(x, top_k=big, seed=3)
            assert torch.equal(got, f(x, top_k=300, seed=3)), f"top_k={big!r} drew other tokens than top_k=V"
        _in_support(got, x, what="top_k 2^62", probs_mode=pm, top_k=300)

    @case(OP, "huge/seed_2^64-1_and_many_indices", isa=True)
    def _(f=fn, mk=_mk, pm=probs_mode):
        # the largest 64-bit seed and offset, 4096 draws from 2 rows through a stride-0 indices view
        x = mk(v=37)
        idx = i64(1, 3).repeat_interleave(2048)
        got = f(x, indices=idx, seed=2**64 - 1, offset=2**63 - 1, top_k=3)
        assert torch.equal(got, f(x, indices=idx, seed=-1, offset=2**63 - 1, top_k=3)), \
            "seed 2^64 - 1 and -1 (the same 64 bits) drew differently"
        _in_support(got, x, rows=idx, what="4096 indexed draws", probs_mode=pm, top_k=3)
        assert len(set(got[:2048].tolist())) == 3, "case setup: 2048 draws from a top-3 row should hit all 3"

    # ---------------------------------------------------------------- non-finite (every CPU path)
    for _v in (37, 300):
        for _pos in ("first", "head_end", "tail", "last"):
            @case(OP, f"nonfinite/nan_at_{_pos}_of_{_v}", isa=True)
            def _(f=fn, mk=_mk, n=X, v=_v, pos=_pos):
                t = {"first": 0, "head_end": 15, "tail": v - 5, "last": v - 1}[pos]
                x = mk(v=v)
                x[2, t] = NAN
                raises(lambda: f(x, seed=0), f"{n} row 2 contains NaN or +inf (at token {t})", types=(ValueError,))

            @case(OP, f"nonfinite/plus_inf_at_{_pos}_of_{_v}", isa=True)
            def _(f=fn, mk=_mk, n=X, v=_v, pos=_pos):
                t = {"first": 0, "head_end": 16, "tail": v - 3, "last": v - 1}[pos]
                x = mk(v=v)
                x[3, t] = INF
                raises(lambda: f(x, top_k=2, seed=0), f"{n} row 3 contains NaN or +inf (at token {t})",
                       types=(ValueError,))

    @case(OP, "nonfinite/nan_in_a_row_no_index_draws_from")
    def _(f=fn, mk=_mk, n=X, pm=probs_mode):
        # rows that no index draws from are not sampled; a NaN there is either refused (naming the
        # row) or ignored, but never lets a bad draw through for the other rows
        x = mk()
        x[0, 3] = NAN
        try:
            got = f(x, indices=i64(1, 2, 2), seed=0)
        except ValueError as e:
            assert f"{n} row 0 contains NaN" in str(e), f"refused with an unexpected message: {e}"
            return
        _in_support(got, x[[1, 2, 2]], what="rows without NaN", probs_mode=pm)


# sample only: -inf logits and temperatures
OP = "sample"


@case(OP, "nonfinite/all_minus_inf_row", isa=True)
def _():
    x = _logits()
    x[1] = -INF
    raises(lambda: ops.sample(x, seed=0), "logits row 1 has no finite value", types=(ValueError,))


@case(OP, "nonfinite/minus_inf_tokens_never_drawn", isa=True)
def _():
    # one finite token per row, at the first, a SIMD-tail and the last position: every draw is it
    x = torch.full((3, 300), -INF)
    x[0, 0], x[1, 297], x[2, 299] = 1.0, -3e38, 5.0
    idx = i64(0, 1, 2).repeat(200)
    for kw in (dict(), dict(top_p=0.5), dict(top_k=7), dict(min_p=0.9), dict(temperature=0.0), dict(temperature=1e-30)):
        tok, lp = ops.sample(x, indices=idx, seed=9, return_logprobs=True, **kw)
        assert torch.equal(tok, i64(0, 297, 299).repeat(200)), f"{kw}: drew a -inf token"
        assert torch.equal(lp, torch.zeros_like(lp)), f"{kw}: log-probability of the only finite token is {lp[:3]}"


@case(OP, "nonfinite/mostly_minus_inf_rows_law", isa=True)
def _():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 300, generator=g)
    x[x < 0.8] = -INF  # about a fifth of the tokens survive
    idx = i64(0, 1).repeat_interleave(500)
    tok, lp = ops.sample(x, indices=idx, seed=1, top_p=0.95, return_logprobs=True)
    _in_support(tok, x, rows=idx, what="rows mostly -inf", top_p=0.95)
    want = token_logprobs_ref(x[idx], tok)
    assert torch.allclose(lp.double(), want, atol=1e-5), "logprobs of the drawn tokens differ from the reference"


@case(OP, "values/temperature_negative")
def _():
    raises(lambda: ops.sample(_logits(), temperature=-0.5, seed=0), "temperature must be in [0, inf)")


@case(OP, "values/temperature_inf")
def _():
    raises(lambda: ops.sample(_logits(), temperature=INF, seed=0), "temperature must be in [0, inf)")


@case(OP, "values/temperature_tensor_nan")
def _():
    raises(lambda: ops.sample(_logits(), temperature=torch.tensor([1.0, NAN, 1.0, 1.0]), seed=0), "temperature contains NaN")


@case(OP, "values/tiny_and_huge_temperature", isa=True)
def _():
    # 1e-30 behaves like greedy (1/T clamped to the float32 range); 1e308 is (nearly) uniform
    x = _logits(v=300)
    tiny = ops.sample(x, temperature=1e-30, seed=2)
    assert torch.equal(tiny, x.argmax(-1)), "temperature 1e-30 is not greedy"
    huge = ops.sample(x, indices=i64(0).repeat(3000), temperature=1e308, seed=2)
    assert len(set(huge.tolist())) > 250, "temperature 1e308 should spread draws over nearly all 300 tokens"


@case("sample_from_probs", "values/negative_probability")
def _():
    p = torch.softmax(_logits(), -1)
    p[2, 5] = -1e-9
    raises(lambda: ops.sample_from_probs(p, seed=0), "probs must be non-negative", types=(ValueError,))


@case("sample_from_probs", "values/zero_row")
def _():
    p = torch.softmax(_logits(), -1)
    p[3] = 0.0
    raises(lambda: ops.sample_from_probs(p, seed=0), "probs row 3 sums to zero", types=(ValueError,))


@case("sample_from_probs", "values/probability_above_2^100")
def _():
    p = torch.softmax(_logits(), -1)
    p[1, 7] = 2.0**101
    raises(lambda: ops.sample_from_probs(p, seed=0), "probs row 1", "above 2^100", types=(ValueError,))


@case("sample_from_probs", "values/unnormalised_rows_are_valid", isa=True)
def _():
    # rows far from summing to 1 (1e-30 and 2^99 scale) are renormalised; zeros are never drawn
    p = torch.softmax(_logits(v=300), -1)
    p[p < 0.004] = 0.0
    p[0] *= 1e-30
    p[1] *= 2.0**99
    idx = i64(0, 1, 2, 3).repeat_interleave(300)
    tok, lp = ops.sample_from_probs(p, indices=idx, seed=4, return_logprobs=True)
    _in_support(tok, p, rows=idx, what="unnormalised probs", probs_mode=True)
    want = (p[idx, tok].double() / p.double().sum(-1)[idx]).log()
    assert torch.allclose(lp.double(), want, atol=1e-5), "logprobs differ from log(p / sum p)"


# ================================================================ token_logprobs
OP = "token_logprobs"


def _tlp_vs_ref(x, tokens, what, **kw):
    got = ops.token_logprobs(x, tokens, **kw)
    want = token_logprobs_ref(x, tokens, kw.get("temperature"))
    assert got.dtype == torch.float32 and got.shape == want.shape, f"{what}: {got.dtype} {tuple(got.shape)}"
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), f"{what}: -inf entries {got} vs {want}"
    fin = torch.isfinite(want)
    assert torch.allclose(got.double()[fin], want[fin], atol=1e-5, rtol=1e-5), f"{what}: {got} vs {want}"


@case(OP, "dtype/logits_float64")
def _():
    raises(lambda: ops.token_logprobs(_logits().double(), i64(0, 1, 2, 3)), "logits must be one of")


@case(OP, "dtype/tokens_float")
def _():
    raises(lambda: ops.token_logprobs(_logits(), torch.zeros(4)), "tokens must be int32 or int64")


@case(OP, "dtype/temperature_int_tensor")
def _():
    raises(lambda: ops.token_logprobs(_logits(), i64(0, 1, 2, 3), temperature=i32(1, 1, 1, 1)),
           "temperature must be a floating-point tensor")


@case(OP, "shape/tokens_wrong_length")
def _():
    raises(lambda: ops.token_logprobs(_logits(), i64(0, 1)), "tokens must be 1-D with one entry per row (4)")


@case(OP, "shape/logits_1d")
def _():
    raises(lambda: ops.token_logprobs(_logits()[0], i64(0)), "logits must be 2-D")


@case(OP, "stride/logits_vocab_strided")
def _():
    raises(lambda: ops.token_logprobs(last_dim_strided(_logits()), i64(0, 1, 2, 3)),
           "logits must be contiguous in its last dimension")


@case(OP, "stride/strided_and_stride0_rows_are_valid", isa=True)
def _():
    x = _logits(v=300, dtype=torch.bfloat16)
    _tlp_vs_ref(rows_strided(x), i64(0, 299, 17, 5), "strided bf16 rows", temperature=0.7)
    _tlp_vs_ref(x[1:2].expand(5, 300), i32(0, 1, 2, 3, 299), "stride-0 rows")


@case(OP, "device/tokens_meta")
def _():
    raises(lambda: ops.token_logprobs(_logits(), meta(i64(0, 1, 2, 3))), "same device")


@case(OP, "values/token_past_vocab")
def _():
    raises(lambda: ops.token_logprobs(_logits(), i64(0, 1, 37, 3)), "tokens must be in [0, 37)")


@case(OP, "values/token_negative")
def _():
    raises(lambda: ops.token_logprobs(_logits(), i32(0, -1, 2, 3)), "tokens must be in [0, 37)")


@case(OP, "values/temperature_negative")
def _():
    raises(lambda: ops.token_logprobs(_logits(), i64(0, 1, 2, 3), temperature=-1.0), "temperature must be in [0, inf)")


@case(OP, "values/temperature_zero_counts_as_one", isa=True)
def _():
    x = _logits(v=300)
    _tlp_vs_ref(x, i64(3, 1, 4, 1), "temperature 0 (documented: as 1)", temperature=torch.tensor([0.0, 0.5, 0.0, 2.0]))


@case(OP, "nonfinite/nan_row", isa=True)
def _():
    x = _logits(v=300)
    x[2, 290] = NAN
    raises(lambda: ops.token_logprobs(x, i64(0, 1, 2, 3)), "logits row 2 contains NaN or +inf", types=(ValueError,))


@case(OP, "nonfinite/plus_inf", isa=True)
def _():
    x = _logits(v=37)
    x[0, 36] = INF
    raises(lambda: ops.token_logprobs(x, i64(0, 1, 2, 3)), "logits row 0 contains NaN or +inf", types=(ValueError,))


@case(OP, "nonfinite/all_minus_inf_row", isa=True)
def _():
    x = _logits(v=37)
    x[1] = -INF
    raises(lambda: ops.token_logprobs(x, i64(0, 1, 2, 3)), "logits row 1 has no finite value", types=(ValueError,))


@case(OP, "nonfinite/minus_inf_token_has_minus_inf_logprob", isa=True)
def _():
    x = _logits(v=300)
    x[:, ::3] = -INF
    _tlp_vs_ref(x, i64(0, 1, 297, 299), "tokens at -inf logits and their neighbours")


@case(OP, "huge/tokens_int64_2^40")
def _():
    raises(lambda: ops.token_logprobs(_logits(), i64(0, 1, 2**40, 3)), "got values from 0 to 1099511627776")


@case(OP, "huge/vocab_2^31_expanded")
def _():
    # a stride-0 vocabulary of 2^31 tokens is refused by layout before anything is sized by V
    raises(lambda: ops.token_logprobs(torch.zeros(1, 1).expand(2, V2_31), i64(0, 1)),
           "logits must be contiguous in its last dimension", types=(RuntimeError,))


# ================================================================ speculative_verify
OP = "speculative_verify"
SPEC_HUGE_V = ("speculative_verify does not bound the vocabulary (sample / sample_from_probs refuse V > INT32_MAX up "
               "front): for a stride-0 expand()ed [B, n, 2^31] draft_probs / target_probs pair its value checks "
               "(t < 0, isfinite) and .contiguous() copies allocate full-size temporaries (2 GiB and more) instead "
               "of refusing the vocabulary size")


def _spec(b=3, n=4, v=37, seed=6):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(b, n, v, generator=g) + 0.01
    p = torch.rand(b, n + 1, v, generator=g) + 0.01
    return torch.randint(0, v, (b, n), generator=g), q / q.sum(-1, keepdim=True), p / p.sum(-1, keepdim=True)


def _spec_invariants(tokens, num_acc, draft, q, p, what):
    """Accepted draft tokens are kept, the token at the first rejection / bonus position has positive
    probability under its law (max(0, p - q) or p, as the reference defines them), -1 after it."""
    B, n = draft.shape
    assert tokens.shape == (B, n + 1) and num_acc.shape == (B,), f"{what}: shapes {tokens.shape}, {num_acc.shape}"
    for b in range(B):
        j = int(num_acc[b])
        assert 0 <= j <= n and torch.equal(tokens[b, :j], draft[b, :j].long()), f"{what}: row {b} accepted prefix"
        if j < n:
            law = (p[b, j].double() - q[b, j].double()).clamp(min=0)
            law = law if law.sum() > 0 else p[b, j].double()
        else:
            law = p[b, n].double()
        t = int(tokens[b, j])
        assert 0 <= t < q.shape[2] and law[t] > 0, f"{what}: row {b} drew token {t} of probability 0 at position {j}"
        assert (tokens[b, j + 1:] == -1).all(), f"{what}: row {b} not padded with -1 after position {j}"


@case(OP, "dtype/draft_tokens_float")
def _():
    d, q, p = _spec()
    raises(lambda: ops.speculative_verify(d.float(), q, p, seed=0), "draft_tokens must be int32 or int64")


@case(OP, "dtype/probs_float64")
def _():
    d, q, p = _spec()
    raises(lambda: ops.speculative_verify(d, q.double(), p.double(), seed=0), "draft_probs must be one of")


@case(OP, "dtype/probs_dtypes_differ")
def _():
    d, q, p = _spec()
    raises(lambda: ops.speculative_verify(d, q, p.half(), seed=0), "draft_probs and target_probs must have the same dtype")


@case(OP, "dtype/offset_int32_tensor")
def _():
    d, q, p = _spec()
    raises(lambda: ops.speculative_verify(d, q, p, seed=1, offset=i32(0)), "offset must be an int64 tensor")


@case(OP, "shape/draft_tokens_1d")
def _():
    d, q, p = _spec()
    raises(lambda: ops.speculative_verify(d[0], q, p, seed=0), "draft_tokens must be 2-D")


@case(OP, "shape/draft_probs_wrong_n")
def _():
    d, q, p = _spec()
    raises(lambda: ops.speculative_verify(d, q[:, :3], p, seed=0), "draft_probs must be [batch, n, vocab] = [3, 4, V]")


@case(OP, "shape/target_probs_not_n_plus_1")
def _():
    d, q, p = _spec()
    raises(lambda: ops.speculative_verify(d, q, p[:, :4], seed=0), "target_probs must be [batch, n + 1, vocab] = [3, 5, 37]")


@case(OP, "shape/vocab_differs")
def _():
    d, q, p = _spec()
    raises(lambda: ops.speculative_verify(d, q, p[..., :36], seed=0), "target_probs must be [batch, n + 1, vocab]")


@case(OP, "shape/seed_wrong_length")
def _():
    d, q, p = _spec()
    raises(lambda: ops.speculative_verify(d, q, p, seed=i64(1, 2)), "seed must be 1-D with 1 or batch (3) entries")


@case(OP, "stride/strided_and_expanded_probs_are_valid", isa=True)
def _():
    d, q, p = _spec(v=300)
    got = ops.speculative_verify(d, last_dim_strided(q), p.transpose(0, 1).contiguous().transpose(0, 1), seed=4)
    want = ops.speculative_verify(d, q, p, seed=4)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), "a strided view of the same probs differs"
    _spec_invariants(*got, d, q, p, "strided probs")
    qe, pe = q[:1].expand(3, 4, 300), p[:1].expand(3, 5, 300)  # stride-0 batch: the same row three times
    _spec_invariants(*ops.speculative_verify(d, qe, pe, seed=i64(7, 8, 9)), d, qe, pe, "stride-0 batch")


@case(OP, "device/target_probs_meta")
def _():
    d, q, p = _spec()
    raises(lambda: ops.speculative_verify(d, q, meta(p), seed=0), "target_probs must be on the same device")


@case(OP, "device/offset_meta")
def _():
    d, q, p = _spec()
    raises(lambda: ops.speculative_verify(d, q, p, seed=i64(0), offset=meta(i64(0))), "offset must be on the same device")


@case(OP, "values/draft_token_past_vocab")
def _():
    d, q, p = _spec()
    d[1, 2] = 37
    raises(lambda: ops.speculative_verify(d, q, p, seed=0), "draft_tokens must be in [0, 37)")


@case(OP, "values/negative_probability")
def _():
    d, q, p = _spec()
    q[0, 1, 3] = -1e-6
    raises(lambda: ops.speculative_verify(d, q, p, seed=0), "draft_probs must be non-negative", types=(ValueError,))


@case(OP, "values/target_row_sums_to_zero")
def _():
    d, q, p = _spec()
    p[2, 4] = 0.0
    raises(lambda: ops.speculative_verify(d, q, p, seed=0), "target_probs has a row that sums to zero",
           types=(ValueError,))


@case(OP, "values/forced_rejections_and_acceptances", isa=True)
def _():
    # position j of row b: target 0 at the draft token always rejects, draft 0 always accepts
    d, q, p = _spec(v=300)
    for b, j_rej in ((0, 0), (1, 2), (2, 4)):
        for j in range(4):
            if j < j_rej:
                q[b, j, d[b, j]] = 0.0
            elif j == j_rej:
                p[b, j, d[b, j]] = 0.0
    tokens, acc = ops.speculative_verify(d, q, p, seed=12)
    assert acc.tolist() == [0, 2, 4], f"num_accepted {acc.tolist()}, forced to [0, 2, 4]"
    _spec_invariants(tokens, acc, d, q, p, "forced acceptances")


@case(OP, "values/p_equals_q_residual_falls_back_to_p", isa=True)
def _():
    # p == q at a rejection: max(0, p - q) is empty, so the token is drawn from p (documented)
    d, q, p = _spec(v=300)
    p[:, :4] = q
    p[:, 0].scatter_(1, d[:, :1], 0.0)  # reject position 0: p of the draft token 0, q of it > 0
    q[:, 0] = p[:, 0]
    q[:, 0].scatter_(1, d[:, :1], 0.5)
    tokens, acc = ops.speculative_verify(d, q, p, seed=1)
    assert (acc == 0).all(), f"num_accepted {acc.tolist()}, forced to 0"
    _spec_invariants(tokens, acc, d, q, p, "empty residual")


@case(OP, "nonfinite/nan_draft_probs")
def _():
    d, q, p = _spec()
    q[1, 3, 36] = NAN
    raises(lambda: ops.speculative_verify(d, q, p, seed=0), "draft_probs contains NaN or inf", types=(ValueError,))


@case(OP, "nonfinite/inf_target_probs")
def _():
    d, q, p = _spec()
    p[0, 4, 0] = INF
    raises(lambda: ops.speculative_verify(d, q, p, seed=0), "target_probs contains NaN or inf", types=(ValueError,))


@case(OP, "huge/draft_tokens_int64_2^40")
def _():
    d, q, p = _spec()
    d[0, 0] = 2**40
    raises(lambda: ops.speculative_verify(d, q, p, seed=0), "draft_tokens must be in [0, 37)")


@case(OP, "huge/seed_2^64")
def _():
    d, q, p = _spec()
    raises(lambda: ops.speculative_verify(d, q, p, seed=2**64), "seed must fit in 64 bits")


@case(OP, "huge/vocab_2^31_expanded", xfail=SPEC_HUGE_V)
def _():
    d = torch.zeros(1, 1, dtype=torch.long)
    raises(lambda: ops.speculative_verify(d, torch.ones(1, 1, 1).expand(1, 1, V2_31),
                                          torch.ones(1, 1, 1).expand(1, 2, V2_31), seed=0),
           "vocabulary", "int32", types=EITHER)
