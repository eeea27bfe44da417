"""Hostile inputs for the sparse decode ops: new_page_summaries, update_page_summaries,
sparse_paged_attention and attention_mass. Valid-but-odd inputs are compared with
``ttscale.reference.sparse_paged_attention`` (float64 summaries, Quest scores and selection,
attention over the kept pages, attention mass)."""
import torch

import ttscale.ops as ops
from hostile_harness import case, raises
from hostile_inputs import INF, NAN, TOL, close, i32, i64, last_dim_strided, like_ref, meta, paged, paged_long, slot
from ttscale.reference.paged_attention import paged_attention_ref
from ttscale.reference.sparse_paged_attention import (attention_mass_ref, page_lens_of, page_summaries_ref,
                                                      quest_scores_ref, select_ref, sparse_attention_ref)

SELF_OVERLAP = "is written in place, so each of its elements needs its own memory"


def _summ_vs_ref(s, kc, page_lens, what):
    """Summaries against the reference: min / max exact (NaN where a key is NaN), mean within float32
    summation error."""
    ref = page_summaries_ref(kc, page_lens)
    like_ref(s[:, :2], ref[:, :2].to(kc.dtype), what + " (min / max)", 0.0)
    like_ref(s[:, 2], ref[:, 2], what + " (mean)", TOL[kc.dtype])


# ================================================================ new_page_summaries
OP = "new_page_summaries"


@case(OP, "dtype/k_cache_float64")
def _():
    raises(lambda: ops.new_page_summaries(paged().kc.double()), "k_cache must be one of")


@case(OP, "dtype/page_lens_float")
def _():
    raises(lambda: ops.new_page_summaries(paged().kc, torch.ones(6)), "page_lens must be int32 or int64")


@case(OP, "shape/k_cache_3d")
def _():
    raises(lambda: ops.new_page_summaries(paged().kc[0]), "k_cache must be 4-D")


@case(OP, "shape/page_size_0")
def _():
    raises(lambda: ops.new_page_summaries(torch.empty(3, 0, 2, 64)), "page_size")


@case(OP, "shape/page_lens_wrong_length")
def _():
    raises(lambda: ops.new_page_summaries(paged().kc, i32(1, 1)), "page_lens must be 1-D with one entry per page")


@case(OP, "stride/k_cache_last_dim_strided")
def _():
    raises(lambda: ops.new_page_summaries(last_dim_strided(paged().kc)), "k_cache must be contiguous in its last")


@case(OP, "stride/head_sliced_cache_is_valid", isa=True)
def _():
    big = torch.randn(7, 5, 6, 64)
    kc = big[:, :, 1:4]
    lens = i64(5, 1, 3, 5, 2, 4, 5)
    _summ_vs_ref(ops.new_page_summaries(kc, lens), kc, lens, "head-sliced cache")


@case(OP, "device/page_lens_meta")
def _():
    raises(lambda: ops.new_page_summaries(paged().kc, meta(i32(1, 1, 1, 1, 1, 1))), "same device")


@case(OP, "page_table/page_lens_0")
def _():
    raises(lambda: ops.new_page_summaries(paged().kc, i32(4, 0, 1, 1, 1, 1)), "page_lens[1] = 0")


@case(OP, "page_table/page_lens_past_page_size")
def _():
    raises(lambda: ops.new_page_summaries(paged().kc, i32(4, 1, 1, 5, 1, 1)), "page_lens[3] = 5")


@case(OP, "huge/page_lens_int64_2^40")
def _():
    raises(lambda: ops.new_page_summaries(paged().kc, i64(2**40, 1, 1, 1, 1, 1)), "page_lens[0] = 1099511627776")


@case(OP, "huge/page_lens_int32_min")
def _():
    raises(lambda: ops.new_page_summaries(paged().kc, i32(1, 1, 1, 1, 1, -2**31)), "page_lens[5] = -2147483648")


@case(OP, "nonfinite/nan_and_inf_keys", isa=True)
def _():
    # a NaN key makes its page's min and max NaN wherever it sits (first slot, SIMD tail, last slot);
    # +-inf keys are just the extremes; slots past page_lens are never read
    kc = torch.randn(5, 7, 2, 64)
    kc[0, 0, 0, 0] = NAN
    kc[1, 6, 1, 63] = NAN
    kc[2, 3, 0, 17] = INF
    kc[3, 2, 1, 40] = -INF
    kc[4, 5:] = NAN
    lens = i32(7, 7, 7, 7, 5)
    s = ops.new_page_summaries(kc, lens)
    _summ_vs_ref(s, kc, lens, "non-finite keys")
    assert s[0, :2, 0, 0].isnan().all() and torch.isfinite(s[4]).all(), "case setup"


# ================================================================ update_page_summaries
OP = "update_page_summaries"


def _ups(kc=None, s=None, pages=None, lens=None):
    p = paged()
    kc = p.kc if kc is None else kc
    s = ops.new_page_summaries(p.kc) if s is None else s
    return lambda: ops.update_page_summaries(kc, s, i32(0, 2) if pages is None else pages, lens)


@case(OP, "dtype/summaries_float16")
def _():
    raises(_ups(s=torch.zeros(6, 3, 2, 64, dtype=torch.float16)), "summaries dtype")


@case(OP, "dtype/pages_float")
def _():
    raises(_ups(pages=torch.tensor([0.0])), "pages must be int32 or int64")


@case(OP, "shape/summaries_wrong_kinds")
def _():
    raises(_ups(s=torch.zeros(6, 2, 2, 64)), "summaries must have shape [num_pages, 3, num_kv_heads, head_dim]")


@case(OP, "shape/pages_2d")
def _():
    raises(_ups(pages=i32(0)[None]), "pages must be 1-D")


@case(OP, "shape/page_lens_wrong_length")
def _():
    raises(_ups(lens=i32(1)), "page_lens must be 1-D with one entry per page (2)")


@case(OP, "stride/summaries_last_dim_strided")
def _():
    raises(_ups(s=last_dim_strided(torch.zeros(6, 3, 2, 64))), "summaries must be contiguous in its last")


@case(OP, "stride/strided_summaries_are_valid", isa=True)
def _():
    p = paged()
    big = torch.full((6, 3, 5, 64), 7.0)
    s = big[:, :, 2:4]  # head slice of a bigger buffer: written in place, other heads untouched
    ops.update_page_summaries(p.kc, s, i64(4, 1), i64(2, 3))
    lens = torch.full((6,), 4)
    lens[4], lens[1] = 2, 3
    ref = page_summaries_ref(p.kc, lens)
    close(s[[4, 1]], ref[[4, 1]], "updated pages", atol=1e-6, rtol=1e-6)
    assert (s[[0, 2, 3, 5]] == 7.0).all() and (big[:, :, [0, 1, 4]] == 7.0).all(), "pages or heads not listed were written"


@case(OP, "device/pages_meta")
def _():
    raises(_ups(pages=meta(i32(0))), "same device")


@case(OP, "device/summaries_meta")
def _():
    raises(_ups(s=torch.zeros(6, 3, 2, 64, device="meta")), "same device")


@case(OP, "page_table/page_out_of_range")
def _():
    raises(_ups(pages=i32(0, 6)), "pages[1] = 6")


@case(OP, "page_table/page_negative")
def _():
    raises(_ups(pages=i32(-1)), "pages[0] = -1")


@case(OP, "page_table/page_listed_twice")
def _():
    raises(_ups(pages=i32(3, 1, 3)), "pages lists page 3 more than once")


@case(OP, "page_table/page_lens_past_page_size")
def _():
    raises(_ups(lens=i32(1, 5)), "page_lens[1] = 5")


@case(OP, "huge/page_int64_2^40")
def _():
    raises(_ups(pages=i64(0, 2**40)), "pages[1] = 1099511627776")


@case(OP, "huge/page_lens_int64_2^33")
def _():
    raises(_ups(lens=i64(2**33, 1)), "page_lens[0] = 8589934592")


@case(OP, "aliasing/expanded_summaries")
def _():
    raises(_ups(s=torch.zeros(1, 3, 2, 64).expand(6, 3, 2, 64)), "summaries", SELF_OVERLAP)


@case(OP, "aliasing/summaries_view_of_k_cache")
def _():
    p = paged()
    raises(_ups(kc=p.kc, s=p.kc[:, :3]), "k_cache shares memory with summaries")


# ================================================================ sparse_paged_attention
OP = "sparse_paged_attention"


def _sp(p, s=None, **kw):
    kw.setdefault("top_k_pages", 1)
    args = dict(q=p.q, kc=p.kc, vc=p.vc, s=ops.new_page_summaries(p.kc) if s is None else s, ip=p.ip, ix=p.ix,
                last=p.last)
    for k in list(args):
        if k in kw:
            args[k] = kw.pop(k)
    return lambda: ops.sparse_paged_attention(args["q"], args["kc"], args["vc"], args["s"], args["ip"], args["ix"],
                                              args["last"], **kw)


def _sparse_vs_ref(q, kc, vc, s, ip, ix, last, what, top_k, sink=1, local=1, nan_exact=True, unpinned=()):
    """The kept pages equal the reference selection from the reference Quest scores (except for the
    (sequence, KV head) pairs in ``unpinned``), and the output / LSE equal the reference attention
    over exactly the pages the op kept."""
    out, lse, sel = ops.sparse_paged_attention(q, kc, vc, s, ip, ix, last, top_k_pages=top_k, sink_pages=sink,
                                               local_pages=local, return_lse=True, return_selected=True)
    budget = top_k + sink + local
    width = min(budget, ix.numel())
    assert tuple(sel.shape) == (q.shape[0], kc.shape[2], width), f"{what}: selected has shape {tuple(sel.shape)}"
    for b in range(q.shape[0]):
        n_pages = int(ip[b + 1] - ip[b])
        if n_pages <= budget:  # every page (select_ref would allocate the whole budget)
            want = torch.full((kc.shape[2], width), -1, dtype=torch.int32)
            want[:, :n_pages] = torch.arange(n_pages, dtype=torch.int32)
        else:
            want = select_ref(quest_scores_ref(q, s, ip, ix, b), top_k, sink, local)[:, :width]
        for h in range(kc.shape[2]):
            if (b, h) not in unpinned:
                assert torch.equal(sel[b, h], want[h]), \
                    f"{what}: sequence {b} head {h} kept pages {sel[b, h].tolist()}, reference {want[h].tolist()}"
    ro, rl = sparse_attention_ref(q, kc, vc, ip, ix, last, sel)
    like_ref(out, ro, what + " (output)", TOL[q.dtype], nan_exact=nan_exact)
    like_ref(lse, rl, what + " (LSE)", 1e-3)
    return out, lse, sel


def _sparse_setup(dtype=torch.float32, kv_len=(120, 64), ps=8, hkv=2, hq=4):
    kc, vc, ip, ix, last = paged_long(dtype, kv_len, ps, hkv, hq, seed=8)
    s = ops.new_page_summaries(kc, page_lens_of(kc.shape[0], ps, ip, ix, last))
    q = torch.randn(len(kv_len), hq, 64).to(dtype)
    return q, kc, vc, s, ip, ix, last


@case(OP, "dtype/q_float64")
def _():
    p = paged()
    raises(_sp(p, q=p.q.double()), "q must be one of")


@case(OP, "dtype/summaries_float16")
def _():
    p = paged()
    raises(_sp(p, s=torch.zeros(6, 3, 2, 64, dtype=torch.float16)), "summaries dtype (Half) must match k_cache")


@case(OP, "dtype/kv_indptr_int64")
def _():
    p = paged()
    raises(_sp(p, ip=p.ip.long()), "kv_indptr must be int32")


@case(OP, "shape/summaries_wrong_shape")
def _():
    p = paged()
    raises(_sp(p, s=torch.zeros(6, 2, 2, 64)), "summaries must have shape")


@case(OP, "shape/q_rows_not_batch")
def _():
    p = paged()
    raises(_sp(p, q=torch.randn(3, 4, 64)), "one row per sequence")


@case(OP, "stride/summaries_last_dim_strided")
def _():
    p = paged()
    raises(_sp(p, s=last_dim_strided(ops.new_page_summaries(p.kc))), "summaries must be contiguous in its last")


@case(OP, "stride/head_sliced_cache_and_summaries_are_valid", isa=True)
def _():
    q, kc, vc, s, ip, ix, last = _sparse_setup(hkv=4, hq=8)
    _sparse_vs_ref(q[:, 2:6], kc[:, :, 1:3], vc[:, :, 1:3], s[:, :, 1:3], ip, ix, last, "head-sliced", top_k=3)


@case(OP, "device/summaries_meta")
def _():
    p = paged()
    raises(_sp(p, s=torch.zeros(6, 3, 2, 64, device="meta")), "same device")


@case(OP, "device/kv_indices_meta")
def _():
    p = paged()
    raises(_sp(p, ix=meta(p.ix)), "same device")


@case(OP, "values/top_k_negative")
def _():
    raises(_sp(paged(), top_k_pages=-1), "top_k_pages must be >= 0")


@case(OP, "values/local_pages_negative")
def _():
    raises(_sp(paged(), local_pages=-3), "local_pages must be >= 0")


@case(OP, "values/top_k_float")
def _():
    raises(_sp(paged(), top_k_pages=1.5), "top_k_pages must be an int", types=(TypeError,))


@case(OP, "values/sink_pages_bool")
def _():
    raises(_sp(paged(), sink_pages=True), "sink_pages must be an int", types=(TypeError,))


@case(OP, "values/scale_nan")
def _():
    raises(_sp(paged(), scale=NAN), "scale must be finite")


@case(OP, "values/zero_budget_keeps_nothing", isa=True)
def _():
    q, kc, vc, s, ip, ix, last = _sparse_setup()
    out, lse, _ = _sparse_vs_ref(q, kc, vc, s, ip, ix, last, "budget 0", top_k=0, sink=0, local=0)
    assert torch.isneginf(lse).all(), "case setup"


@case(OP, "page_table/kv_indices_out_of_range")
def _():
    p = paged()
    raises(_sp(p, ix=i32(0, 6, 2)), "kv_indices[1] = 6")


@case(OP, "page_table/last_page_len_0")
def _():
    p = paged()
    raises(_sp(p, last=i32(0, 4)), "kv_last_page_len[0]")


@case(OP, "page_table/indptr_not_monotone")
def _():
    p = paged()
    raises(_sp(p, ip=i32(0, 3, 2)), "kv_indptr must be non-decreasing")


@case(OP, "huge/budget_2^30_keeps_everything", isa=True)
def _():
    # the largest budget allowed: every page is kept (dense attention) and nothing is sized by it
    q, kc, vc, s, ip, ix, last = _sparse_setup()
    out, lse, sel = _sparse_vs_ref(q, kc, vc, s, ip, ix, last, "budget 2^30", top_k=2**30 - 2)
    ro, rl = paged_attention_ref(q, kc, vc, ip, ix, last)
    like_ref(out, ro, "budget 2^30 vs dense attention", TOL[q.dtype])


@case(OP, "huge/top_k_2^30+1")
def _():
    raises(_sp(paged(), top_k_pages=2**30 + 1), "must be <= 2^30")


@case(OP, "huge/top_k_int64_max")
def _():
    raises(_sp(paged(), top_k_pages=2**63 - 1), "must be <= 2^30")


@case(OP, "huge/top_k_2^64")
def _():
    raises(_sp(paged(), top_k_pages=2**64), "must be <= 2^30")


@case(OP, "huge/sink_plus_local_wraps_int64")
def _():
    # each term fits int64, their sum does not: checked before it is formed
    raises(_sp(paged(), top_k_pages=0, sink_pages=2**62, local_pages=2**62), "must be <= 2^30")


@case(OP, "huge/kv_indices_2^31-1")
def _():
    p = paged()
    raises(_sp(p, ix=i32(0, 2**31 - 1, 2)), "kv_indices[1] = 2147483647")


for _dt in (torch.float32, torch.bfloat16):
    _n = str(_dt).split(".")[1]

    @case(OP, f"nonfinite/unselected_page_is_never_read_{_n}", isa=True)
    def _(dt=_dt):
        # poison K and V of a page the selection drops (its summaries stay as they were): the kept
        # pages and the output are those of the clean cache
        q, kc, vc, s, ip, ix, last = _sparse_setup(dt)
        sel = ops.sparse_paged_attention(q, kc, vc, s, ip, ix, last, top_k_pages=2, return_selected=True)[1]
        dropped = sorted(set(range(int(ip[1] - ip[0]))) - set(sel[0].flatten().tolist()))
        assert dropped, "case setup: the budget must leave a page of sequence 0 out"
        page = int(ix[int(ip[0]) + dropped[0]])
        kc[page], vc[page] = NAN, INF
        out, _, sel2 = _sparse_vs_ref(q, kc, vc, s, ip, ix, last, "poisoned unselected page", top_k=2)
        assert torch.equal(sel, sel2) and torch.isfinite(out).all(), "case setup"

    @case(OP, f"nonfinite/nan_query_gives_nan_row_{_n}", isa=True)
    def _(dt=_dt):
        # which pages a NaN score keeps is not specified, and with one query head per KV head it
        # does not matter: that head's row is NaN whatever it attends to
        q, kc, vc, s, ip, ix, last = _sparse_setup(dt, hkv=2, hq=2)
        q[1, 1, 0] = NAN
        out, lse, _ = _sparse_vs_ref(q, kc, vc, s, ip, ix, last, "NaN query", top_k=2, unpinned=[(1, 1)])
        assert lse[1, 1].isnan() and torch.isfinite(lse[0]).all() and torch.isfinite(lse[1, 0]), "case setup"


@case(OP, "nonfinite/inf_key_bound_with_zero_query", isa=True)
def _():
    # an infinite key in a page gives an infinite Quest bound; a query element of 0 against it
    # contributes 0 (not 0 * inf = NaN), so the page is scored, not dropped
    q, kc, vc, s, ip, ix, last = _sparse_setup()
    page, off = slot(ix, ip, 8, 0, 37)
    kc[page, off, 0, 5] = INF
    q[0, :2, 5] = 0.0
    s = ops.new_page_summaries(kc, page_lens_of(kc.shape[0], 8, ip, ix, last))
    _sparse_vs_ref(q, kc, vc, s, ip, ix, last, "inf key, zero query element", top_k=3)


# ================================================================ attention_mass
OP = "attention_mass"


def _am(p, pages, **kw):
    return lambda: ops.attention_mass(kw.get("q", p.q), kw.get("kc", p.kc), p.ip, kw.get("ix", p.ix), p.last, pages)


def _pages(*v, b=2, h=2):
    return torch.tensor(v, dtype=torch.int32).view(1, 1, -1).expand(b, h, -1).contiguous()


@case(OP, "dtype/pages_int64")
def _():
    raises(_am(paged(), _pages(0).long()), "pages must be int32")


@case(OP, "dtype/q_float64")
def _():
    p = paged()
    raises(_am(p, _pages(0), q=p.q.double()), "q must be one of")


@case(OP, "shape/pages_wrong_heads")
def _():
    raises(_am(paged(), _pages(0, h=1)), "pages must have shape [B, num_kv_heads, n] = [2, 2, n]")


@case(OP, "shape/pages_2d")
def _():
    raises(_am(paged(), _pages(0)[0]), "pages must have shape")


@case(OP, "device/pages_meta")
def _():
    raises(_am(paged(), meta(_pages(0))), "same device")


@case(OP, "page_table/page_past_sequence")
def _():
    # sequence 1 has one page: logical page 1 does not exist there
    raises(_am(paged(), _pages(0, 1)), "pages[1, 0, 1] = 1 must be -1 or a page index of sequence 1")


@case(OP, "page_table/page_minus_2")
def _():
    raises(_am(paged(), _pages(-2)), "pages[0, 0, 0] = -2")


@case(OP, "page_table/kv_indices_out_of_range")
def _():
    p = paged()
    raises(_am(p, _pages(0), ix=i32(0, 7, 2)), "kv_indices[1] = 7")


@case(OP, "page_table/repeated_and_missing_pages_are_valid", isa=True)
def _():
    q, kc, vc, s, ip, ix, last = _sparse_setup()
    pages = torch.tensor([[[0, 0, -1, 7, 3], [7, -1, -1, 1, 1]], [[2, 7, 0, -1, 5], [-1, -1, -1, -1, -1]]],
                         dtype=torch.int32)
    close(ops.attention_mass(q, kc, ip, ix, last, pages), attention_mass_ref(q, kc, ip, ix, last, pages),
          "attention mass", atol=1e-5, rtol=1e-4)


@case(OP, "huge/page_2^31-1")
def _():
    raises(_am(paged(), _pages(2**31 - 1)), "pages[0, 0, 0] = 2147483647")


@case(OP, "huge/page_int32_min")
def _():
    raises(_am(paged(), _pages(0, -2**31)), "pages[0, 0, 1] = -2147483648")
