"""Hostile inputs for ops.attention (dense flash attention, padded and ragged).

Valid-but-odd inputs (strided and stride-0 layouts, aliased q/k/v, windows near INT64_MAX, NaN / inf
in Q, K or V) are compared with the float64 reference ``ttscale.reference.attention.attention_ref``,
which implements the non-finite contract of csrc/common/attention_math.h.
"""
import torch

import ttscale.ops as ops
from hostile_harness import case, raises
from hostile_inputs import INF, NAN, TOL, dense, i32, last_dim_strided, like_ref, meta
from ttscale.reference.attention import attention_ref

OP = "attention"


def _vs_ref(q, k, v, what, tol=None, nan_exact=True, **kw):
    """ops.attention(q, k, v, **kw) against the float64 reference, output and LSE."""
    out, lse = ops.attention(q, k, v, return_lse=True, **kw)
    ro, rl = attention_ref(q, k, v, **kw)
    like_ref(out, ro, what + " (output)", tol or TOL[q.dtype], nan_exact=nan_exact)
    like_ref(lse, rl, what + " (LSE)", 1e-3)
    return out, lse


def _ragged(tq=5, tk=7):
    g = torch.Generator().manual_seed(2)
    return (torch.randn(tq, 4, 64, generator=g), torch.randn(tk, 2, 64, generator=g), torch.randn(tk, 2, 64, generator=g),
            i32(0, 2, tq), i32(0, 3, tk))


# ---------------------------------------------------------------- dtype
@case(OP, "dtype/q_float64")
def _():
    q, k, v = dense()
    raises(lambda: ops.attention(q.double(), k.double(), v.double()), "q must be one of")


@case(OP, "dtype/q_int32")
def _():
    q, k, v = dense()
    raises(lambda: ops.attention(q.int(), k.int(), v.int()), "q must be one of")


@case(OP, "dtype/k_half_q_float")
def _():
    q, k, v = dense()
    raises(lambda: ops.attention(q, k.half(), v), "k must have the dtype of q")


@case(OP, "dtype/v_bf16_q_float")
def _():
    q, k, v = dense()
    raises(lambda: ops.attention(q, k, v.bfloat16()), "v must have the dtype of q")


@case(OP, "dtype/cu_seqlens_int64")
def _():
    q, k, v, cq, ck = _ragged()
    raises(lambda: ops.attention(q, k, v, cu_seqlens_q=cq.long(), cu_seqlens_k=ck), "cu_seqlens_q", "int32")


@case(OP, "dtype/cu_seqlens_k_float")
def _():
    q, k, v, cq, ck = _ragged()
    raises(lambda: ops.attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck.float()), "cu_seqlens_k", "int32")


# ---------------------------------------------------------------- shape / rank
@case(OP, "shape/q_2d")
def _():
    q, k, v = dense()
    raises(lambda: ops.attention(q[0, 0], k[0, 0], v[0, 0]), "q must be 4-D")


@case(OP, "shape/q_5d")
def _():
    q, k, v = dense()
    raises(lambda: ops.attention(q[None], k[None], v[None]), "q must be 4-D")


@case(OP, "shape/k_rank_differs_from_q")
def _():
    q, k, v = dense()
    raises(lambda: ops.attention(q, k[0], v), "k must be 4-D")


@case(OP, "shape/head_dim_65")
def _():
    q, k, v = (torch.randn(1, 3, 2, 65) for _ in range(3))
    raises(lambda: ops.attention(q, k, v), "head_dim")


@case(OP, "shape/head_dim_0")
def _():
    q, k, v = (torch.randn(1, 3, 2, 0) for _ in range(3))
    raises(lambda: ops.attention(q, k, v), "head_dim")


@case(OP, "shape/k_head_dim_differs")
def _():
    q, _, v = dense()
    raises(lambda: ops.attention(q, torch.randn(1, 6, 2, 128), v), "k head_dim")


@case(OP, "shape/hq_not_multiple_of_hkv")
def _():
    q, k, v = dense(hq=3, hkv=2)
    raises(lambda: ops.attention(q, k, v), "multiple")


@case(OP, "shape/zero_kv_heads")
def _():
    q, _, _ = dense()
    k = torch.randn(1, 6, 0, 64)
    raises(lambda: ops.attention(q, k, k), "head")


@case(OP, "shape/k_v_seq_len_differ")
def _():
    q, k, v = dense()
    raises(lambda: ops.attention(q, k, v[:, :5]), "same sequence length")


@case(OP, "shape/batch_differs")
def _():
    q, k, v = dense(b=2)
    raises(lambda: ops.attention(q, k[:1], v[:1]), "batch size")


@case(OP, "shape/ragged_without_cu_seqlens")
def _():
    q, k, v, cq, ck = _ragged()
    raises(lambda: ops.attention(q, k, v), "cu_seqlens_q")


@case(OP, "shape/padded_with_cu_seqlens")
def _():
    q, k, v = dense()
    raises(lambda: ops.attention(q, k, v, cu_seqlens_q=i32(0, 4), cu_seqlens_k=i32(0, 6)), "ragged")


@case(OP, "shape/cu_seqlens_lengths_differ")
def _():
    q, k, v, cq, ck = _ragged()
    raises(lambda: ops.attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=i32(0, 7)), "same length")


@case(OP, "shape/cu_seqlens_2d")
def _():
    q, k, v, cq, ck = _ragged()
    raises(lambda: ops.attention(q, k, v, cu_seqlens_q=cq[None], cu_seqlens_k=ck), "cu_seqlens_q", "1-D")


# ---------------------------------------------------------------- stride
@case(OP, "stride/q_last_dim_strided")
def _():
    q, k, v = dense()
    raises(lambda: ops.attention(last_dim_strided(q), k, v), "q must be contiguous in its last dimension")


@case(OP, "stride/k_last_dim_strided")
def _():
    q, k, v = dense()
    raises(lambda: ops.attention(q, last_dim_strided(k), v), "k must be contiguous in its last dimension")


@case(OP, "stride/v_last_dim_strided")
def _():
    q, k, v = dense()
    raises(lambda: ops.attention(q, k, last_dim_strided(v)), "v must be contiguous in its last dimension")


@case(OP, "stride/bhsd_transposed_inputs_are_valid", isa=True)
def _():
    q, k, v = dense(sq=37, sk=41)
    qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))  # [B,H,S,D] memory
    _vs_ref(qt, kt, vt, "transposed-layout attention", causal=True)


@case(OP, "stride/expanded_batch_kv_is_valid", isa=True)
def _():
    q, k, v = dense(b=3, sq=5, sk=19)
    ke, ve = k[:1].expand(3, -1, -1, -1), v[:1].expand(3, -1, -1, -1)  # stride 0 over the batch
    _vs_ref(q, ke, ve, "stride-0 batch k/v")


@case(OP, "stride/ragged_rows_strided_is_valid", isa=True)
def _():
    q, k, v, cq, ck = _ragged(tq=21, tk=30)
    big = torch.randn(30, 5, 64)
    kh, vh = big[:, 1:3], big[:, 3:5]  # token stride 5 heads, head-sliced
    _vs_ref(q, kh, vh, "head-sliced ragged k/v", causal=True, cu_seqlens_q=i32(0, 9, 21), cu_seqlens_k=i32(0, 12, 30))


# ---------------------------------------------------------------- device
@case(OP, "device/q_meta")
def _():
    q, k, v = dense()
    raises(lambda: ops.attention(meta(q), k, v), "same device")


@case(OP, "device/v_meta")
def _():
    q, k, v = dense()
    raises(lambda: ops.attention(q, k, meta(v)), "same device")


@case(OP, "device/cu_seqlens_k_meta")
def _():
    q, k, v, cq, ck = _ragged()
    raises(lambda: ops.attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=meta(ck)), "same device")


# ---------------------------------------------------------------- cu_seqlens values (the ragged "page table")
@case(OP, "values/cu_seqlens_not_monotone")
def _():
    q, k, v, cq, ck = _ragged()
    raises(lambda: ops.attention(q, k, v, cu_seqlens_q=i32(0, 4, 2, 5), cu_seqlens_k=i32(0, 3, 5, 7)),
           "cu_seqlens_q must be non-decreasing")


@case(OP, "values/cu_seqlens_not_starting_at_0")
def _():
    q, k, v, cq, ck = _ragged()
    raises(lambda: ops.attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=i32(1, 3, 7)), "cu_seqlens_k must start at 0")


@case(OP, "values/cu_seqlens_end_not_token_count")
def _():
    q, k, v, cq, ck = _ragged()
    raises(lambda: ops.attention(q, k, v, cu_seqlens_q=i32(0, 2, 4), cu_seqlens_k=ck), "cu_seqlens_q last entry")


@case(OP, "values/cu_seqlens_negative")
def _():
    q, k, v, cq, ck = _ragged()
    raises(lambda: ops.attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=i32(0, -3, 7)), "cu_seqlens_k")


@case(OP, "huge/cu_seqlens_near_2^31")
def _():
    q, k, v, cq, ck = _ragged()
    raises(lambda: ops.attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=i32(0, 2**31 - 1, 2**31 - 1)),
           "cu_seqlens_k last entry")


@case(OP, "huge/cu_seqlens_int32_min")
def _():
    q, k, v, cq, ck = _ragged()
    raises(lambda: ops.attention(q, k, v, cu_seqlens_q=i32(0, -2**31, 5), cu_seqlens_k=ck), "cu_seqlens_q")


@case(OP, "values/window_left_minus_2")
def _():
    q, k, v = dense()
    raises(lambda: ops.attention(q, k, v, window_left=-2), "window_left")


@case(OP, "values/softcap_negative")
def _():
    q, k, v = dense()
    raises(lambda: ops.attention(q, k, v, softcap=-1.0), "softcap")


@case(OP, "values/softcap_nan")
def _():
    q, k, v = dense()
    raises(lambda: ops.attention(q, k, v, softcap=NAN), "softcap")


@case(OP, "values/softcap_inf")
def _():
    q, k, v = dense()
    raises(lambda: ops.attention(q, k, v, softcap=INF), "softcap")


@case(OP, "values/scale_nan")
def _():
    q, k, v = dense()
    raises(lambda: ops.attention(q, k, v, scale=NAN), "scale")


@case(OP, "values/scale_inf")
def _():
    q, k, v = dense()
    raises(lambda: ops.attention(q, k, v, scale=-INF), "scale")


@case(OP, "huge/window_left_int64_max_more_queries_than_keys")
def _():
    # query positions i + Sk - Sq are negative; pos - window_left must not wrap around int64
    q, k, v = dense(sq=6, sk=2)
    _vs_ref(q, k, v, "window_left=INT64_MAX", window_left=2**63 - 1)


@case(OP, "huge/window_left_int64_max_causal")
def _():
    # causal with more queries than keys: the first 4 queries see nothing (0 and LSE -inf)
    q, k, v = dense(sq=6, sk=2)
    _vs_ref(q, k, v, "causal window_left=INT64_MAX", causal=True, window_left=2**63 - 1)


@case(OP, "huge/window_left_2^63_python_int")
def _():
    q, k, v = dense()
    raises(lambda: ops.attention(q, k, v, window_left=2**63), "window_left", types=(RuntimeError, ValueError,
                                                                                      TypeError, OverflowError))


# ---------------------------------------------------------------- non-finite values (on every CPU path)
# Sizes span several query x key tiles (37 queries x 53 keys) and heads, so the poisoned key sits in
# a tile that also holds rows which must not see it: the row-by-row masking inside a tile is what
# is tested, not just whole masked tiles.
for _dt in (torch.float32, torch.float16, torch.bfloat16):
    _n = str(_dt).split(".")[1]

    @case(OP, f"nonfinite/inf_v_hidden_by_causal_mask_{_n}", isa=True)
    def _(dt=_dt):
        q, k, v = dense(b=2, sq=37, sk=53, dtype=dt)
        v[1, 40, 1, 7] = INF  # query i sits at position i + 16: queries 24.. of batch 1 see key 40
        out, _ = _vs_ref(q, k, v, "inf in V at a key the causal mask hides", nan_exact=False, causal=True)
        # the case itself: the key is seen by exactly the rows it should be
        assert torch.isfinite(out[1, :24]).all() and not torch.isfinite(out[1, 24:, 2:, 7]).any(), "case setup"

    @case(OP, f"nonfinite/nan_v_hidden_by_window_{_n}", isa=True)
    def _(dt=_dt):
        q, k, v = dense(sq=37, sk=53, dtype=dt)
        v[0, 20, 0] = NAN  # window_left=5: query i (position i + 16) sees keys i + 11 .. i + 16
        _vs_ref(q, k, v, "NaN in V at a key the window hides", nan_exact=False, window_left=5)

    @case(OP, f"nonfinite/nan_query_row_gives_nan_{_n}", isa=True)
    def _(dt=_dt):
        q, k, v = dense(sq=37, sk=53, dtype=dt)
        q[0, 9, 1, 0] = NAN
        out, lse = _vs_ref(q, k, v, "NaN query row", causal=True)
        assert out[0, 9, 1].isnan().all() and lse[0, 9, 1].isnan(), "case setup"

    @case(OP, f"nonfinite/nan_visible_key_gives_nan_{_n}", isa=True)
    def _(dt=_dt):
        q, k, v = dense(sq=37, sk=53, dtype=dt)
        k[0, 30, 1, 3] = NAN  # KV head 1: query heads 2, 3 of the queries at positions >= 30
        out, _ = _vs_ref(q, k, v, "NaN key, causal", causal=True)
        assert out[0, 14:, 2:].isnan().all() and torch.isfinite(out[0, :14]).all(), "case setup"


@case(OP, "nonfinite/nan_k_hidden_by_causal_mask", isa=True)
def _():
    q, k, v = dense(sq=37, sk=53)
    k[0, 52] = NAN  # the last key: only the last query sees it
    _vs_ref(q, k, v, "NaN key the causal mask hides", causal=True)


@case(OP, "nonfinite/inf_query_gives_nan", isa=True)
def _():
    q, k, v = dense(sq=5, sk=9)
    q[0, 2, 0, 1] = INF  # scores +-inf: the row is NaN, as in SDPA
    q[0, 3, 1, 1] = -INF
    _vs_ref(q, k, v, "+-inf in a query")


@case(OP, "nonfinite/minus_inf_key_element", isa=True)
def _():
    # one -inf element of K: a score of -inf (the key drops out) or +inf (the row is NaN) depending
    # on the sign of the query element it meets; the reference makes the same call row by row
    q, k, v = dense(sq=7, sk=11)
    k[0, 4, 0, 6] = -INF
    _vs_ref(q, k, v, "-inf in a key")


@case(OP, "nonfinite/inf_key_with_softcap", isa=True)
def _():
    # softcap * tanh(s / softcap) is finite for s = +-inf, so with softcap the row stays finite
    q, k, v = dense(sq=7, sk=11)
    k[0, 4, 0, 6] = INF
    _vs_ref(q, k, v, "inf key under softcap", softcap=30.0)


@case(OP, "nonfinite/inf_v_hidden_by_causal_mask_ragged", isa=True)
def _():
    q, k, v, _, _ = _ragged(tq=40, tk=50)
    cq, ck = i32(0, 18, 40), i32(0, 25, 50)
    v[24] = INF   # last key of sequence 0: only its last query sees it
    k[30] = NAN   # key 5 of sequence 1 (query i at position i + 3): its queries 0, 1 cannot see it
    _vs_ref(q, k, v, "ragged, non-finite masked keys", nan_exact=False, causal=True, cu_seqlens_q=cq,
            cu_seqlens_k=ck)


@case(OP, "nonfinite/no_visible_key_gives_zero_and_minus_inf", isa=True)
def _():
    # documented: a query with no visible key gets output 0 and LSE -inf (an empty key sequence,
    # or causal with more queries than keys), whatever the other sequence's keys hold
    q, k, v, _, _ = _ragged(tq=7, tk=4)
    k[:] = NAN
    out, lse = _vs_ref(q, k, v, "empty key sequence", cu_seqlens_q=i32(0, 3, 7), cu_seqlens_k=i32(0, 0, 4))
    assert torch.equal(out[:3], torch.zeros_like(out[:3])) and torch.isneginf(lse[:3]).all(), "case setup"


# ---------------------------------------------------------------- aliasing
@case(OP, "aliasing/q_k_v_same_tensor", isa=True)
def _():
    x = torch.randn(1, 37, 2, 64)
    _vs_ref(x, x, x, "q is k is v", causal=True)


@case(OP, "aliasing/k_v_expanded_seq_stride0", isa=True)
def _():
    q = torch.randn(1, 3, 2, 64)
    k = torch.randn(1, 1, 2, 64).expand(1, 300, 2, 64)  # 300 identical keys, one row of memory
    v = torch.randn(1, 1, 2, 64).expand(1, 300, 2, 64)
    _vs_ref(q, k, v, "300 stride-0 keys")


@case(OP, "aliasing/k_is_a_view_of_q", isa=True)
def _():
    buf = torch.randn(1, 21, 4, 64)
    q, k, v = buf, buf[:, :, 1:3], buf[:, :, 2:4]  # overlapping head slices of one buffer
    _vs_ref(q, k, v, "k, v overlapping views of q", causal=True)
