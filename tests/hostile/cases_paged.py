"""Hostile inputs for paged_attention, append_paged_kv and copy_pages (the paged KV cache and its
CSR page table). Valid-but-odd inputs are compared with ``ttscale.reference.paged_attention``
(float64, the non-finite contract of csrc/common/attention_math.h) or, for the cache writes, with
the cache a plain-torch copy loop would produce."""
import torch

import ttscale.ops as ops
from hostile_harness import case, raises
from hostile_inputs import (INF, NAN, TOL, close, i32, i64, last_dim_strided, like_ref, meta, paged, paged_long,
                            rows_strided, slot)
from ttscale.reference.paged_attention import kv_lens, paged_attention_ref

# the in-place ops' refusal of an output whose elements share memory (csrc/common/checks.h)
SELF_OVERLAP = "is written in place, so each of its elements needs its own memory"


def _vs_ref(q, kc, vc, ip, ix, last, what, tol=None, nan_exact=True, **kw):
    """ops.paged_attention against the float64 reference, output and LSE."""
    out, lse = ops.paged_attention(q, kc, vc, ip, ix, last, return_lse=True, **kw)
    ro, rl = paged_attention_ref(q, kc, vc, ip, ix, last, **kw)
    like_ref(out, ro, what + " (output)", tol or TOL[q.dtype], nan_exact=nan_exact)
    like_ref(lse, rl, what + " (LSE)", 1e-3)
    return out, lse


def _pa(p, **kw):
    return ops.paged_attention(p.q, p.kc, p.vc, p.ip, p.ix, p.last, **kw)


# ================================================================ paged_attention
OP = "paged_attention"


@case(OP, "dtype/q_float64")
def _():
    p = paged(dtype=torch.float64)
    raises(lambda: _pa(p), "q must be one of")


@case(OP, "dtype/cache_int")
def _():
    p = paged()
    raises(lambda: ops.paged_attention(p.q, p.kc.int(), p.vc.int(), p.ip, p.ix, p.last), "k_cache must be one of")


@case(OP, "dtype/v_cache_differs")
def _():
    p = paged()
    raises(lambda: ops.paged_attention(p.q, p.kc, p.vc.half(), p.ip, p.ix, p.last), "v_cache dtype")


@case(OP, "dtype/q_differs_from_cache")
def _():
    p = paged()
    raises(lambda: ops.paged_attention(p.q.bfloat16(), p.kc, p.vc, p.ip, p.ix, p.last), "k_cache dtype")


@case(OP, "dtype/kv_indptr_int64")
def _():
    p = paged()
    raises(lambda: ops.paged_attention(p.q, p.kc, p.vc, p.ip.long(), p.ix, p.last), "kv_indptr must be int32")


@case(OP, "dtype/kv_indices_int64")
def _():
    p = paged()
    raises(lambda: ops.paged_attention(p.q, p.kc, p.vc, p.ip, p.ix.long(), p.last), "kv_indices must be int32")


@case(OP, "dtype/kv_last_page_len_int64")
def _():
    p = paged()
    raises(lambda: ops.paged_attention(p.q, p.kc, p.vc, p.ip, p.ix, p.last.long()), "kv_last_page_len must be int32")


@case(OP, "dtype/kv_indices_float")
def _():
    p = paged()
    raises(lambda: ops.paged_attention(p.q, p.kc, p.vc, p.ip, p.ix.float(), p.last), "kv_indices must be int32")


@case(OP, "dtype/qo_indptr_int64")
def _():
    p = paged()
    raises(lambda: _pa(p, qo_indptr=i64(0, 1, 2)), "qo_indptr must be int32")


@case(OP, "shape/q_2d")
def _():
    p = paged()
    raises(lambda: ops.paged_attention(p.q[0], p.kc, p.vc, p.ip, p.ix, p.last), "q must be 3-D")


@case(OP, "shape/cache_3d")
def _():
    p = paged()
    raises(lambda: ops.paged_attention(p.q, p.kc[0], p.vc[0], p.ip, p.ix, p.last), "k_cache must be 4-D")


@case(OP, "shape/v_cache_shape_differs")
def _():
    p = paged()
    raises(lambda: ops.paged_attention(p.q, p.kc, p.vc[:5], p.ip, p.ix, p.last), "v_cache shape")


@case(OP, "shape/head_dim_96")
def _():
    p = paged(d=96)
    raises(lambda: _pa(p), "head_dim")


@case(OP, "shape/hq_not_multiple_of_hkv")
def _():
    p = paged(hq=3)
    raises(lambda: _pa(p), "num_kv_heads")


@case(OP, "shape/page_size_0")
def _():
    p = paged()
    kc = torch.empty(6, 0, 2, 64)
    raises(lambda: ops.paged_attention(p.q, kc, kc, p.ip, p.ix, p.last), "page_size")


@case(OP, "shape/kv_indptr_empty")
def _():
    p = paged()
    raises(lambda: ops.paged_attention(p.q, p.kc, p.vc, i32(), p.ix, i32()), "kv_indptr")


@case(OP, "shape/kv_indptr_2d")
def _():
    p = paged()
    raises(lambda: ops.paged_attention(p.q, p.kc, p.vc, p.ip[None], p.ix, p.last), "kv_indptr must be 1-D")


@case(OP, "shape/kv_last_page_len_wrong_length")
def _():
    p = paged()
    raises(lambda: ops.paged_attention(p.q, p.kc, p.vc, p.ip, p.ix, i32(3)), "kv_last_page_len must have one entry")


@case(OP, "shape/q_rows_not_batch_without_qo_indptr")
def _():
    p = paged()
    raises(lambda: ops.paged_attention(p.q[:1], p.kc, p.vc, p.ip, p.ix, p.last), "qo_indptr")


@case(OP, "shape/qo_indptr_wrong_length")
def _():
    p = paged()
    raises(lambda: _pa(p, qo_indptr=i32(0, 2)), "qo_indptr must have B+1")


@case(OP, "stride/q_last_dim_strided")
def _():
    p = paged()
    raises(lambda: ops.paged_attention(last_dim_strided(p.q), p.kc, p.vc, p.ip, p.ix, p.last),
           "q must be contiguous in its last dimension")


@case(OP, "stride/k_cache_last_dim_strided")
def _():
    p = paged()
    raises(lambda: ops.paged_attention(p.q, last_dim_strided(p.kc), p.vc, p.ip, p.ix, p.last),
           "k_cache must be contiguous in its last dimension")


@case(OP, "stride/head_sliced_cache_is_valid", isa=True)
def _():
    kc0, vc0, ip, ix, last = paged_long(hkv=5)
    kc, vc = kc0[:, :, 1:3], vc0[:, :, 3:5]  # strided pages and tokens, last dim dense
    q = torch.randn(2 * 9, 4, 64)
    _vs_ref(q, kc, vc, ip, ix, last, "head-sliced cache, prefill", qo_indptr=i32(0, 9, 18))
    _vs_ref(q[:2], kc, vc, ip, ix, last, "head-sliced cache, decode")


@case(OP, "stride/q_rows_strided_is_valid", isa=True)
def _():
    p = paged()
    _vs_ref(rows_strided(p.q), p.kc, p.vc, p.ip, p.ix, p.last, "strided q rows")


@case(OP, "stride/kv_interleaved_in_one_buffer_is_valid", isa=True)
def _():
    # k_cache = kv[:, 0], v_cache = kv[:, 1] of one [P, 2, page, H, D] buffer (vLLM's layout)
    kc0, vc0, ip, ix, last = paged_long()
    kv = torch.stack([kc0, vc0], 1)
    q = torch.randn(2, 4, 64)
    _vs_ref(q, kv[:, 0], kv[:, 1], ip, ix, last, "interleaved k/v views")


@case(OP, "device/kv_indices_meta")
def _():
    p = paged()
    raises(lambda: ops.paged_attention(p.q, p.kc, p.vc, p.ip, meta(p.ix), p.last), "same device")


@case(OP, "device/v_cache_meta")
def _():
    p = paged()
    raises(lambda: ops.paged_attention(p.q, p.kc, meta(p.vc), p.ip, p.ix, p.last), "same device")


@case(OP, "device/qo_indptr_meta")
def _():
    p = paged()
    raises(lambda: _pa(p, qo_indptr=meta(i32(0, 1, 2))), "same device")


# ---------------------------------------------------------------- page table
def _pt(ip, ix, last, **kw):
    p = paged()
    return lambda: ops.paged_attention(p.q, p.kc, p.vc, ip, ix, last, **kw)


@case(OP, "page_table/indptr_not_monotone")
def _():
    raises(_pt(i32(0, 3, 2), i32(0, 1, 2), i32(3, 4)), "kv_indptr must be non-decreasing")


@case(OP, "page_table/indptr_not_starting_at_0")
def _():
    raises(_pt(i32(1, 2, 3), i32(0, 1, 2), i32(3, 4)), "kv_indptr[0] must be 0")


@case(OP, "page_table/indptr_end_not_nnz")
def _():
    raises(_pt(i32(0, 2, 2), i32(0, 1, 2), i32(3, 0)), "kv_indptr must end")


@case(OP, "page_table/page_index_eq_num_pages")
def _():
    raises(_pt(i32(0, 2, 3), i32(0, 6, 2), i32(3, 4)), "kv_indices[1] = 6")


@case(OP, "page_table/page_index_negative")
def _():
    raises(_pt(i32(0, 2, 3), i32(0, 1, -1), i32(3, 4)), "kv_indices[2] = -1")


@case(OP, "page_table/last_page_len_0_non_empty")
def _():
    raises(_pt(i32(0, 2, 3), i32(0, 1, 2), i32(0, 4)), "kv_last_page_len[0]")


@case(OP, "page_table/last_page_len_gt_page_size")
def _():
    raises(_pt(i32(0, 2, 3), i32(0, 1, 2), i32(3, 5)), "kv_last_page_len[1]")


@case(OP, "page_table/last_page_len_negative")
def _():
    raises(_pt(i32(0, 2, 3), i32(0, 1, 2), i32(-1, 4)), "kv_last_page_len[0]")


@case(OP, "page_table/last_page_len_0_empty_sequence_is_valid")
def _():
    p = paged()
    out, lse = ops.paged_attention(p.q, p.kc, p.vc, i32(0, 2, 2), i32(0, 1), i32(3, 0), return_lse=True)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all(), \
        "an empty sequence must give output 0 and LSE -inf"


@case(OP, "page_table/qo_indptr_not_monotone")
def _():
    p = paged()
    raises(lambda: ops.paged_attention(torch.randn(3, 4, 64), p.kc, p.vc, i32(0, 1, 2, 3), i32(0, 1, 2), i32(4, 4, 4),
                                       qo_indptr=i32(0, 2, 1, 3)), "qo_indptr must be non-decreasing")


@case(OP, "page_table/qo_indptr_end_not_rows")
def _():
    p = paged()
    raises(lambda: _pa(p, qo_indptr=i32(0, 1, 3)), "qo_indptr must end")


@case(OP, "huge/page_index_2^31-1")
def _():
    raises(_pt(i32(0, 2, 3), i32(0, 2**31 - 1, 2), i32(3, 4)), "kv_indices[1] = 2147483647")


@case(OP, "huge/page_index_int32_min")
def _():
    raises(_pt(i32(0, 2, 3), i32(-2**31, 1, 2), i32(3, 4)), "kv_indices[0]")


@case(OP, "huge/indptr_2^31-1")
def _():
    raises(_pt(i32(0, 2**31 - 1, 2**31 - 1), i32(0, 1, 2), i32(3, 4)), "kv_indptr")


@case(OP, "huge/last_page_len_2^31-1")
def _():
    raises(_pt(i32(0, 2, 3), i32(0, 1, 2), i32(2**31 - 1, 4)), "kv_last_page_len[0]")


@case(OP, "huge/page_2^31-1_of_expanded_cache_is_read")
def _():
    # 2^31 logical pages, one page of memory (stride 0): page 2^31 - 1 must be read like page 0
    g = torch.Generator().manual_seed(3)
    kc1, vc1 = torch.randn(1, 4, 2, 64, generator=g), torch.randn(1, 4, 2, 64, generator=g)
    kc, vc = kc1.expand(2**31, 4, 2, 64), vc1.expand(2**31, 4, 2, 64)
    q = torch.randn(1, 4, 64, generator=g)
    out = ops.paged_attention(q, kc, vc, i32(0, 1), i32(2**31 - 1), i32(4))
    close(out, paged_attention_ref(q, kc1, vc1, i32(0, 1), i32(0), i32(4))[0], "page 2^31-1 of 2^31 stride-0 pages")


@case(OP, "huge/window_left_int64_max")
def _():
    p = paged()
    q = torch.randn(9, 4, 64)  # more queries (9) than keys (7) in sequence 0: negative positions
    for causal in (False, True):
        _vs_ref(q, p.kc, p.vc, p.ip, p.ix, p.last, f"window_left=INT64_MAX, causal={causal}", causal=causal,
                qo_indptr=i32(0, 9, 9), window_left=2**63 - 1)


@case(OP, "values/scale_nan")
def _():
    p = paged()
    raises(lambda: _pa(p, scale=NAN), "scale")


@case(OP, "values/softcap_negative")
def _():
    p = paged()
    raises(lambda: _pa(p, softcap=-0.5), "softcap")


@case(OP, "values/window_left_minus_2")
def _():
    p = paged()
    raises(lambda: _pa(p, window_left=-2), "window_left")


# ---------------------------------------------------------------- non-finite (on every CPU path)
# (nq, hq, hkv, page_size): decode-like tiles, a prefill wider than a tile, GQA 8 with odd pages;
# the poisoned key sits inside the last query tile, seen by its last rows only.
_SHAPES = {"tiles": (5, 4, 2, 16), "prefill": (33, 2, 2, 5), "gqa8": (12, 8, 1, 7)}
for _name, (_nq, _hq, _hkv, _ps) in _SHAPES.items():
    for _dt in (torch.float32, torch.bfloat16):
        _n = str(_dt).split(".")[1]

        @case(OP, f"nonfinite/inf_v_and_nan_k_hidden_by_causal_mask_{_name}_{_n}", isa=True)
        def _(nq=_nq, hq=_hq, hkv=_hkv, ps=_ps, dt=_dt):
            kc, vc, ip, ix, last = paged_long(dt, (70, 45), ps, hkv, hq)
            q = torch.randn(2 * nq, hq, 64).to(dt)
            page, off = slot(ix, ip, ps, 1, 45 - 2)  # seen by the last 2 queries of sequence 1 only
            vc[page, off, 0, 3] = INF
            kc[page, off, 0, 4] = NAN
            for kw in (dict(causal=True), dict(causal=True, window_left=6)):
                out, _ = _vs_ref(q, kc, vc, ip, ix, last, f"masked non-finite key {kw}", nan_exact=False,
                                 qo_indptr=i32(0, nq, 2 * nq), **kw)
                assert torch.isfinite(out[:2 * nq - 2]).all(), "case setup"

        @case(OP, f"nonfinite/nan_query_and_visible_nan_key_{_name}_{_n}", isa=True)
        def _(nq=_nq, hq=_hq, hkv=_hkv, ps=_ps, dt=_dt):
            kc, vc, ip, ix, last = paged_long(dt, (70, 45), ps, hkv, hq)
            q = torch.randn(2 * nq, hq, 64).to(dt)
            q[1, hq - 1, 9] = NAN
            page, off = slot(ix, ip, ps, 1, 3)  # every query of sequence 1 sees key 3 (KV head 0)
            kc[page, off, 0, 2] = NAN
            out, lse = _vs_ref(q, kc, vc, ip, ix, last, "NaN query / visible NaN key", qo_indptr=i32(0, nq, 2 * nq))
            assert lse[1, hq - 1].isnan() and lse[nq:, 0].isnan().all(), "case setup"


@case(OP, "nonfinite/values_past_kv_last_page_len_never_read", isa=True)
def _():
    kc, vc, ip, ix, last = paged_long(kv_len=(70, 45), page_size=16)
    lens = kv_lens(ip, last, 16)
    for b in range(2):  # every slot past each sequence's end, and every page of no sequence
        page, off = slot(ix, ip, 16, b, lens[b] - 1)
        kc[page, off + 1:], vc[page, off + 1:] = NAN, INF
    for pg in set(range(kc.shape[0])) - set(ix.tolist()):
        kc[pg], vc[pg] = INF, NAN
    q = torch.randn(2 * 7, 4, 64)
    out, _ = _vs_ref(q, kc, vc, ip, ix, last, "poisoned slots past the sequences", qo_indptr=i32(0, 7, 14))
    assert torch.isfinite(out).all(), "case setup"
    _vs_ref(q[:2], kc, vc, ip, ix, last, "poisoned slots past the sequences, decode")


@case(OP, "nonfinite/inf_query_gives_nan_decode", isa=True)
def _():
    p = paged()
    p.q[0, 1, 5] = INF
    p.q[1, 3, 0] = -INF
    out, lse = _vs_ref(p.q, p.kc, p.vc, p.ip, p.ix, p.last, "+-inf query element")
    assert lse[0, 1].isnan() and lse[1, 3].isnan(), "case setup"


@case(OP, "nonfinite/inf_key_with_softcap", isa=True)
def _():
    # softcap * tanh(s / softcap) maps s = +-inf to +-softcap: the row stays finite
    p = paged()
    p.kc[2, 1, 0, 0] = INF
    out, _ = _vs_ref(p.q, p.kc, p.vc, p.ip, p.ix, p.last, "inf key under softcap", softcap=20.0)
    assert torch.isfinite(out).all(), "case setup"


@case(OP, "nonfinite/empty_sequence_with_poisoned_cache", isa=True)
def _():
    p = paged()
    p.kc[:], p.vc[:] = NAN, INF  # sequence 1 has no pages: its row never reads the cache
    out, lse = _vs_ref(p.q, p.kc, p.vc, i32(0, 2, 2), i32(0, 1), i32(3, 0), "empty sequence", nan_exact=False)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all(), "case setup"


# ---------------------------------------------------------------- aliasing
@case(OP, "aliasing/k_cache_is_v_cache", isa=True)
def _():
    p = paged()
    _vs_ref(p.q, p.kc, p.kc, p.ip, p.ix, p.last, "k_cache is v_cache")


@case(OP, "aliasing/expanded_cache_input_is_valid", isa=True)
def _():
    p = paged()
    kc = p.kc[:1].expand(6, 4, 2, 64)
    _vs_ref(p.q, kc, p.vc, p.ip, p.ix, p.last, "stride-0 k_cache (read only)")


@case(OP, "aliasing/same_page_listed_twice", isa=True)
def _():
    # a page table may list one page several times (shared prefix pages): each listing is its keys
    p = paged()
    _vs_ref(p.q, p.kc, p.vc, i32(0, 3, 5), i32(2, 2, 2, 0, 0), i32(4, 1), "page listed twice")


# ================================================================ append_paged_kv
OP = "append_paged_kv"


def _app(p, k=None, v=None, kc=None, vc=None, ip=None, ix=None, last=None, **kw):
    return lambda: ops.append_paged_kv(p.k_new if k is None else k, p.v_new if v is None else v,
                                       p.kc if kc is None else kc, p.vc if vc is None else vc,
                                       p.ip if ip is None else ip, p.ix if ix is None else ix,
                                       p.last if last is None else last, **kw)


@case(OP, "dtype/k_float64")
def _():
    p = paged()
    raises(_app(p, k=p.k_new.double()), "k dtype")


@case(OP, "dtype/cache_int")
def _():
    p = paged()
    raises(_app(p, k=p.k_new.int(), v=p.v_new.int(), kc=p.kc.int(), vc=p.vc.int()), "k_cache must be one of")


@case(OP, "dtype/batch_indices_float")
def _():
    p = paged()
    raises(_app(p, batch_indices=torch.tensor([0., 1.]), positions=i32(0, 0)), "batch_indices must be int32 or int64")


@case(OP, "dtype/kv_indptr_int64")
def _():
    p = paged()
    raises(_app(p, ip=p.ip.long()), "kv_indptr must be int32")


@case(OP, "dtype/append_indptr_int64")
def _():
    p = paged()
    raises(_app(p, append_indptr=i64(0, 1, 2)), "append_indptr must be int32")


@case(OP, "shape/k_2d")
def _():
    p = paged()
    raises(_app(p, k=p.k_new[0], v=p.v_new[0]), "k must be 3-D")


@case(OP, "shape/k_heads_differ")
def _():
    p = paged()
    raises(_app(p, k=torch.randn(2, 1, 64)), "k num_kv_heads")


@case(OP, "shape/v_tokens_differ")
def _():
    p = paged()
    raises(_app(p, v=p.v_new[:1]), "v must have as many tokens as k")


@case(OP, "shape/tokens_not_batch_without_positions")
def _():
    p = paged()
    raises(_app(p, k=torch.randn(3, 2, 64), v=torch.randn(3, 2, 64)), "one token per sequence")


@case(OP, "shape/positions_wrong_length")
def _():
    p = paged()
    raises(_app(p, batch_indices=i32(0, 1), positions=i32(0)), "positions must be 1-D")


@case(OP, "shape/append_indptr_wrong_length")
def _():
    p = paged()
    raises(_app(p, append_indptr=i32(0, 2)), "append_indptr must have B+1")


@case(OP, "stride/k_last_dim_strided")
def _():
    p = paged()
    raises(_app(p, k=last_dim_strided(p.k_new)), "k must be contiguous in its last dimension")


@case(OP, "stride/k_cache_last_dim_strided")
def _():
    p = paged()
    raises(_app(p, kc=last_dim_strided(p.kc)), "k_cache must be contiguous in its last dimension")


def _append_ref(p, k, v, batch_indices=None, positions=None):
    """The caches after writing token i of k / v at (sequence, position) by plain indexing: decode
    (each sequence's last position) unless batch_indices / positions say where."""
    kc, vc = p.kc.clone(), p.vc.clone()
    lens = kv_lens(p.ip, p.last, kc.shape[1])
    dest = list(zip(batch_indices.tolist(), positions.tolist())) if positions is not None else \
        [(b, lens[b] - 1) for b in range(len(lens))]
    for i, (b, t) in enumerate(dest):
        page, off = slot(p.ix, p.ip, kc.shape[1], b, t)
        kc[page, off], vc[page, off] = k[i], v[i]
    return kc, vc


def _append_vs_ref(p, k, v, kc, vc, what, **kw):
    """append_paged_kv into the caches kc / vc (holding p.kc / p.vc) against _append_ref."""
    want_k, want_v = _append_ref(p, k, v, kw.get("batch_indices"), kw.get("positions"))
    ops.append_paged_kv(k, v, kc, vc, p.ip, p.ix, p.last, **kw)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v), f"{what}: the caches differ from plain indexing"


@case(OP, "stride/strided_k_rows_are_valid")
def _():
    p = paged()
    _append_vs_ref(p, rows_strided(p.k_new), rows_strided(p.v_new), p.kc.clone(), p.vc.clone(), "strided k/v rows")


@case(OP, "stride/head_sliced_caches_are_valid")
def _():
    p = paged()
    big = torch.randn(6, 4, 5, 64)
    kc, vc = big[:, :, 0:2], big[:, :, 3:5]  # disjoint head slices of one buffer
    kc.copy_(p.kc)
    vc.copy_(p.vc)
    _append_vs_ref(p, p.k_new, p.v_new, kc, vc, "head-sliced caches", batch_indices=i32(1, 0),
                   positions=i32(2, 6))


@case(OP, "aliasing/kv_interleaved_in_one_buffer_is_valid")
def _():
    p = paged()
    kv = torch.stack([p.kc, p.vc], 1)  # k_cache = kv[:, 0], v_cache = kv[:, 1]: disjoint, interleaved
    _append_vs_ref(p, p.k_new, p.v_new, kv[:, 0], kv[:, 1], "interleaved k/v cache views")


@case(OP, "aliasing/k_cache_is_v_cache")
def _():
    p = paged()
    raises(_app(p, vc=p.kc), "share memory")


@case(OP, "aliasing/k_is_a_view_of_k_cache")
def _():
    p = paged()
    raises(_app(p, k=p.kc[3, :2]), "k", "k_cache", "memory")


@case(OP, "device/positions_meta")
def _():
    p = paged()
    raises(_app(p, batch_indices=i32(0, 1), positions=meta(i32(0, 0))), "same device")


@case(OP, "device/k_meta")
def _():
    p = paged()
    raises(_app(p, k=meta(p.k_new)), "same device")


@case(OP, "page_table/position_eq_kv_len")
def _():
    p = paged()
    raises(_app(p, batch_indices=i32(0, 1), positions=i32(7, 0)), "positions[0] = 7")


@case(OP, "page_table/position_negative")
def _():
    p = paged()
    raises(_app(p, batch_indices=i32(0, 1), positions=i32(0, -1)), "positions[1] = -1")


@case(OP, "page_table/batch_index_out_of_range")
def _():
    p = paged()
    raises(_app(p, batch_indices=i32(0, 2), positions=i32(0, 0)), "batch_indices[1] = 2")


@case(OP, "page_table/batch_index_negative")
def _():
    p = paged()
    raises(_app(p, batch_indices=i32(-1, 0), positions=i32(0, 0)), "batch_indices[0] = -1")


@case(OP, "page_table/batch_indices_without_positions")
def _():
    p = paged()
    raises(_app(p, batch_indices=i32(0, 1)), "together")


@case(OP, "page_table/append_indptr_and_positions")
def _():
    p = paged()
    raises(_app(p, batch_indices=i32(0, 1), positions=i32(0, 0), append_indptr=i32(0, 1, 2)), "not both")


@case(OP, "page_table/append_indptr_not_monotone")
def _():
    p = paged()
    raises(_app(p, append_indptr=i32(0, 2, 1)), "append_indptr")


@case(OP, "page_table/append_more_than_kv_len")
def _():
    p = paged()
    k = torch.randn(6, 2, 64)
    raises(_app(p, k=k, v=k, append_indptr=i32(0, 1, 6)), "appends 5 tokens")


@case(OP, "page_table/kv_indices_out_of_range")
def _():
    p = paged()
    raises(_app(p, ix=i32(0, 1, 9)), "kv_indices[2] = 9")


@case(OP, "page_table/last_page_len_gt_page_size")
def _():
    p = paged()
    raises(_app(p, last=i32(3, 9)), "kv_last_page_len[1]")


@case(OP, "huge/positions_int64_2^32")
def _():
    p = paged()
    raises(_app(p, batch_indices=i64(0, 1), positions=i64(2**32, 0)), "positions[0] = 4294967296")


@case(OP, "huge/batch_indices_int64_2^32")
def _():
    p = paged()
    raises(_app(p, batch_indices=i64(0, 2**32), positions=i64(0, 0)), "batch_indices[1] = 4294967296")


@case(OP, "huge/positions_int64_max")
def _():
    p = paged()
    raises(_app(p, batch_indices=i64(0, 1), positions=i64(0, 2**63 - 1)), "positions[1]")


@case(OP, "huge/page_index_2^31-1")
def _():
    p = paged()
    raises(_app(p, ix=i32(0, 2**31 - 1, 2)), "kv_indices[1]")


@case(OP, "aliasing/expanded_k_cache")
def _():
    p = paged()
    raises(_app(p, kc=torch.zeros(1, 4, 2, 64).expand(6, 4, 2, 64)), "k_cache", SELF_OVERLAP)


@case(OP, "aliasing/expanded_v_cache")
def _():
    p = paged()
    raises(_app(p, vc=torch.zeros(1, 4, 2, 64).expand(6, 4, 2, 64)), "v_cache", SELF_OVERLAP)


@case(OP, "aliasing/expanded_heads_k_cache")
def _():
    p = paged()
    raises(_app(p, kc=torch.zeros(6, 4, 1, 64).expand(6, 4, 2, 64)), "k_cache", SELF_OVERLAP)


@case(OP, "aliasing/expanded_summaries")
def _():
    p = paged()
    s = ops.new_page_summaries(p.kc)[:1].expand(6, 3, 2, 64)
    raises(_app(p, summaries=s), "summaries", SELF_OVERLAP)


@case(OP, "aliasing/expanded_k_input_is_valid")
def _():
    p = paged()
    _append_vs_ref(p, p.k_new[:1].expand(2, 2, 64), p.v_new, p.kc.clone(), p.vc.clone(), "stride-0 k (read only)")


# ================================================================ copy_pages
OP = "copy_pages"


def _cp(p, src, dst, kc=None, vc=None, **kw):
    return lambda: ops.copy_pages(p.kc if kc is None else kc, p.vc if vc is None else vc, src, dst, **kw)


@case(OP, "dtype/src_float")
def _():
    p = paged()
    raises(_cp(p, torch.tensor([0.]), i32(3)), "src must be int32 or int64")


@case(OP, "dtype/dst_bool")
def _():
    p = paged()
    raises(_cp(p, i32(0), torch.tensor([True])), "dst must be int32 or int64")


@case(OP, "dtype/cache_int")
def _():
    p = paged()
    raises(_cp(p, i32(0), i32(3), kc=p.kc.int(), vc=p.vc.int()), "k_cache must be one of")


@case(OP, "shape/src_2d")
def _():
    p = paged()
    raises(_cp(p, i32(0)[None], i32(3)), "src must be 1-D")


@case(OP, "shape/lengths_differ")
def _():
    p = paged()
    raises(_cp(p, i32(0, 1), i32(3)), "same length")


@case(OP, "shape/v_cache_shape_differs")
def _():
    p = paged()
    raises(_cp(p, i32(0), i32(3), vc=p.vc[:5]), "v_cache shape")


@case(OP, "stride/cache_last_dim_strided")
def _():
    p = paged()
    raises(_cp(p, i32(0), i32(3), vc=last_dim_strided(p.vc)), "v_cache must be contiguous in its last dimension")


@case(OP, "stride/head_sliced_cache_is_valid")
def _():
    big = torch.randn(6, 4, 5, 64)
    kc, vc = big[:, :, 1:3], big[:, :, 3:5]
    want_k, want_v = kc.clone(), vc.clone()
    want_k[[3, 5]], want_v[[3, 5]] = kc[[0, 1]], vc[[0, 1]]
    ops.copy_pages(kc, vc, i32(0, 1), i32(3, 5))
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v), "copy within head-sliced (strided) caches"


@case(OP, "aliasing/k_cache_is_v_cache")
def _():
    p = paged()
    raises(_cp(p, i32(0), i32(3), vc=p.kc), "share memory")


@case(OP, "aliasing/kv_interleaved_in_one_buffer_is_valid")
def _():
    p = paged()
    kv = torch.stack([p.kc, p.vc], 1)
    ops.copy_pages(kv[:, 0], kv[:, 1], i64(2, 0), i64(4, 5))
    want_k, want_v = p.kc.clone(), p.vc.clone()
    want_k[[4, 5]], want_v[[4, 5]] = p.kc[[2, 0]], p.vc[[2, 0]]
    assert torch.equal(kv[:, 0], want_k) and torch.equal(kv[:, 1], want_v), "copy within interleaved k/v views"


@case(OP, "device/dst_meta")
def _():
    p = paged()
    raises(_cp(p, i32(0), meta(i32(3))), "same device")


@case(OP, "page_table/src_out_of_range")
def _():
    p = paged()
    raises(_cp(p, i32(6), i32(3)), "src[0] = 6")


@case(OP, "page_table/src_negative")
def _():
    p = paged()
    raises(_cp(p, i32(-1), i32(3)), "src[0] = -1")


@case(OP, "page_table/dst_out_of_range")
def _():
    p = paged()
    raises(_cp(p, i32(0), i32(6)), "dst[0] = 6")


@case(OP, "page_table/dst_duplicate")
def _():
    p = paged()
    raises(_cp(p, i32(0, 1), i32(3, 3)), "appears twice")


@case(OP, "page_table/dst_is_a_source")
def _():
    p = paged()
    raises(_cp(p, i32(0, 3), i32(3, 4)), "also a source")


@case(OP, "huge/src_int64_2^40")
def _():
    p = paged()
    raises(_cp(p, i64(2**40), i64(3)), "src[0] = 1099511627776")


@case(OP, "huge/dst_int32_min")
def _():
    p = paged()
    raises(_cp(p, i32(0), i32(-2**31)), "dst[0]")


@case(OP, "aliasing/expanded_k_cache")
def _():
    p = paged()
    raises(_cp(p, i32(0), i32(3), kc=torch.zeros(1, 4, 2, 64).expand(6, 4, 2, 64)), "k_cache", SELF_OVERLAP)


@case(OP, "aliasing/expanded_v_cache")
def _():
    p = paged()
    raises(_cp(p, i32(0), i32(3), vc=torch.zeros(1, 4, 2, 64).expand(6, 4, 2, 64)), "v_cache", SELF_OVERLAP)


@case(OP, "aliasing/expanded_summaries")
def _():
    p = paged()
    s = ops.new_page_summaries(p.kc)[:1].expand(6, 3, 2, 64)
    raises(_cp(p, i32(0), i32(3), summaries=s), "summaries", SELF_OVERLAP)
