"""Edge cases of sparse_paged_attention's page selection that test_sparse_paged_attention.py does not pin
down: exact ties between pages (documented: ties go to the lower page index), infinite key components
(the documented Quest bound max(q * min, q * max) stays finite where q and the infinity have opposite
signs), and a budget whose int64 sum overflows (must get the op's own ValueError).
"""
import sys

import numpy as np
import pytest
import torch

from ttscale.ops import new_page_summaries, sparse_paged_attention
from ttscale.reference.sparse_paged_attention import quest_scores_ref, select_ref


def _table(np_, ps):
    return (torch.tensor([0, np_], dtype=torch.int32), torch.arange(np_, dtype=torch.int32),
            torch.tensor([ps], dtype=torch.int32))


def test_identical_pages_tie_to_lower_index(cpu_isa):
    # every page holds the same keys -> identical summaries -> identical scores: with sink=1, local=1,
    # top_k=3 each KV head keeps pages 1, 2, 3 (lowest indices) whatever the SIMD path or the page's
    # position (4-page SIMD blocks vs the scalar tail; NP = 11 leaves pages 8..10 in the tail)
    NP, PS, HKV = 11, 4, 32
    ip, ix, last = _table(NP, PS)
    want = [[0, 1, 2, 3, NP - 1]] * HKV
    for D in (64, 128, 256):
        g = torch.Generator().manual_seed(D)
        k = torch.randn(1, PS, HKV, D, generator=g).repeat(NP, 1, 1, 1).contiguous()
        v = torch.randn(NP, PS, HKV, D, generator=g)
        q = torch.randn(1, HKV, D, generator=g)
        s = new_page_summaries(k)
        _, sel = sparse_paged_attention(q, k, v, s, ip, ix, last, top_k_pages=3, sink_pages=1, local_pages=1,
                                        return_selected=True)
        assert sel[0].tolist() == want, (D, [h for h in range(HKV) if sel[0, h].tolist() != want[h]])


@pytest.mark.parametrize("q0", [-1.0, 0.0])
def test_infinite_key_component_keeps_documented_score(cpu_isa, q0):
    # page 5 is by far the best page; one of its keys has +inf in dimension 0. The documented bound
    # term there is max(q * min, q * inf): q * min (finite) for q0 < 0, and 0 for q0 = 0, so page 5
    # must be selected (the CPU computed 0 * inf = NaN, which ranks last)
    NP, PS, D = 12, 4, 64
    g = torch.Generator().manual_seed(0)
    k = torch.randn(NP, PS, 1, D, generator=g)
    v = torch.randn(NP, PS, 1, D, generator=g)
    q = torch.randn(1, 1, D, generator=g)
    q[0, 0, 0] = q0
    k[5, :, 0, 1:] = 3 * q[0, 0, 1:]
    k[5, 2, 0, 0] = float("inf")
    for dtype in (torch.float32, torch.float16):
        kk, vv, qq = k.to(dtype), v.to(dtype), q.to(dtype)
        ip, ix, last = _table(NP, PS)
        s = new_page_summaries(kk)
        want = select_ref(quest_scores_ref(qq, s, ip, ix, 0), 2, 1, 1)
        assert 5 in want[0].tolist()
        out, sel = sparse_paged_attention(qq, kk, vv, s, ip, ix, last, top_k_pages=2, sink_pages=1, local_pages=1,
                                          return_selected=True)
        assert sel.tolist() == [want.tolist()], (dtype, sel.tolist(), want.tolist())
        if q0 < 0:
            assert torch.isfinite(out).all()


def test_budget_sum_overflow_is_rejected_clearly():
    k, v, q = torch.randn(8, 4, 1, 64), torch.randn(8, 4, 1, 64), torch.randn(1, 1, 64)
    ip, ix, last = _table(8, 4)
    s = new_page_summaries(k)
    for tk, sk, lc in [(sys.maxsize, 1, 1), (sys.maxsize, sys.maxsize, 3)]:
        try:
            sparse_paged_attention(q, k, v, s, ip, ix, last, top_k_pages=tk, sink_pages=sk, local_pages=lc)
        except ValueError as e:
            assert "top_k_pages + sink_pages + local_pages" in str(e), (tk, sk, lc, str(e))
        else:
            raise AssertionError(f"budget {(tk, sk, lc)} accepted")


def test_nan_key_makes_the_page_bounds_nan_wherever_it_is():
    # as torch.amin / amax: a NaN in any slot, not only slot 0, makes min and max NaN (mean too)
    k = torch.randn(3, 4, 2, 64)
    k[0, 0, 1, 5] = float("nan")
    k[1, 2, 1, 5] = float("nan")
    s = new_page_summaries(k)
    for p in (0, 1):
        assert torch.isnan(s[p, :, 1, 5]).all(), s[p, :, 1, 5]
        assert not torch.isnan(s[p, :, 0]).any() and not torch.isnan(s[p, :, 1, 6:]).any()
    torch.testing.assert_close(s[2, 0], k[2].amin(0))
    torch.testing.assert_close(s[2, 1], k[2].amax(0))


def test_budget_must_be_integers():
    k, v, q = torch.randn(8, 4, 1, 64), torch.randn(8, 4, 1, 64), torch.randn(1, 1, 64)
    ip, ix, last = _table(8, 4)
    s = new_page_summaries(k)
    for bad in (1.5, True):
        try:
            sparse_paged_attention(q, k, v, s, ip, ix, last, top_k_pages=bad)
        except TypeError as e:
            assert "top_k_pages must be an int" in str(e)
        else:
            raise AssertionError(f"top_k_pages={bad!r} accepted")
    # integers of any kind are: numpy and 0-d tensors give what the int gives
    want = sparse_paged_attention(q, k, v, s, ip, ix, last, top_k_pages=2)
    for ok in (np.int64(2), torch.tensor(2)):
        assert torch.equal(sparse_paged_attention(q, k, v, s, ip, ix, last, top_k_pages=ok), want)


def test_selected_width_is_the_budget_capped_by_the_page_table():
    """Issue 18.5: selected (and every per-(b, h) buffer) was sized by the budget alone, so
    top_k_pages=2**30 on a 10-page cache asked for B * Hkv * 4 GiB even with return_selected=False.
    The width is min(budget, len(kv_indices)): the budget whenever the page table holds that many
    pages, never more than the page table (no sequence can have more pages)."""
    from ttscale.ops import paged_attention

    g = torch.Generator().manual_seed(7)
    P, PS, HKV, D = 13, 4, 2, 64
    k = torch.randn(P, PS, HKV, D, generator=g)
    v = torch.randn(P, PS, HKV, D, generator=g)
    q = torch.randn(2, 2 * HKV, D, generator=g)
    s = new_page_summaries(k)
    ip = torch.tensor([0, 10, 13], dtype=torch.int32)  # sequences of 10 and 3 pages, nnz = 13
    ix = torch.randperm(P, generator=g).to(torch.int32)
    last = torch.tensor([3, 4], dtype=torch.int32)
    dense = paged_attention(q, k, v, ip, ix, last)
    # budgets above the page table: every page kept, rows of width nnz = 13, -1 padded
    for tk, sk, lc in [(1000, 1, 1), (11, 1, 1), (2**30, 0, 0)]:
        out, sel = sparse_paged_attention(q, k, v, s, ip, ix, last, top_k_pages=tk, sink_pages=sk, local_pages=lc,
                                          return_selected=True)
        assert sel.shape == (2, HKV, 13), (tk, sel.shape)
        assert sel[0].tolist() == [list(range(10)) + [-1] * 3] * HKV
        assert sel[1].tolist() == [list(range(3)) + [-1] * 10] * HKV
        assert torch.equal(out, dense)
    # a budget inside the page table keeps its documented width (the sparse path runs for sequence 0)
    out, sel = sparse_paged_attention(q, k, v, s, ip, ix, last, top_k_pages=3, return_selected=True)
    assert sel.shape == (2, HKV, 5)
    assert sel[1].tolist() == [[0, 1, 2, -1, -1]] * HKV
    # the fake kernel gives the same shapes without the page table (meta tensors, torch.compile)
    for tk in (1000, 3):
        meta = [t.to("meta") for t in (q, k, v, s, ip, ix, last)]
        _, _, msel = torch.ops.ttscale.sparse_paged_attention(*meta, tk, 1, 1, 0.125)
        assert msel.shape == (2, HKV, min(tk + 2, 13))
        torch.library.opcheck(torch.ops.ttscale.sparse_paged_attention.default,
                              (q, k, v, s, ip, ix, last, tk, 1, 1, 0.125))

    def f(q, k, v, s, ip, ix, last):
        return sparse_paged_attention(q, k, v, s, ip, ix, last, top_k_pages=2**30, sink_pages=0, local_pages=0,
                                      return_selected=True)

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, s, ip, ix, last)
    assert got[1].shape == (2, HKV, 13) and torch.equal(got[0], dense)


def test_budget_beyond_int64_gets_the_ops_message():
    # the wrapper refuses what cannot reach the op as an int64, with the op's own rule (its message
    # used to say "<= 2^30" while checking only the int64 range)
    k, v, q = torch.randn(8, 4, 1, 64), torch.randn(8, 4, 1, 64), torch.randn(1, 1, 64)
    ip, ix, last = _table(8, 4)
    s = new_page_summaries(k)
    for kw, msg in [(dict(top_k_pages=2**64), r"top_k_pages \+ sink_pages \+ local_pages must be <= 2\^30"),
                    (dict(top_k_pages=2, sink_pages=2**63), r"top_k_pages \+ sink_pages \+ local_pages must be <= 2\^30"),
                    (dict(top_k_pages=2**30 + 1, sink_pages=0, local_pages=0), r"must be <= 2\^30 \(each term"),
                    (dict(top_k_pages=2**30, sink_pages=0, local_pages=1), r"must be <= 2\^30 \(each term"),
                    (dict(top_k_pages=-(2**64)), "top_k_pages must be >= 0"),
                    (dict(top_k_pages=2, local_pages=-1), "local_pages must be >= 0")]:
        with pytest.raises(ValueError, match=msg):
            sparse_paged_attention(q, k, v, s, ip, ix, last, **kw)
    # the largest allowed budget runs (and allocates by the 8-page table, not by 2^30)
    out = sparse_paged_attention(q, k, v, s, ip, ix, last, top_k_pages=2**30 - 2)
    assert out.shape == q.shape
