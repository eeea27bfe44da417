"""The non-finite contract of the attention ops (csrc/common/attention_math.h), on every CPU path:

* a key a query cannot see (causal / window mask, keys outside the kept sparse pages) never touches
  that query's output or LSE, whatever its K / V hold: the masked weight is 0 and 0 * inf = NaN
  must not be accumulated (issue 18 item 1: one inf in a later token's V made the earlier rows of
  its whole query tile NaN);
* a NaN or +inf visible score (NaN in the query or a visible key) makes the row's output and LSE
  NaN, as torch's SDPA gives NaN (issue 18 item 2: such rows came back 0 / -inf, or the key was
  silently dropped);
* a non-finite value at a visible key of V makes the affected output elements non-finite.

Everything is compared with the float64 references, which implement the same contract
(``reference.attention.masked_softmax_attend``) and are checked here against torch's SDPA math.
"""
import math

import pytest
import torch

from conftest import CPU_ISAS, CUDA
from ttscale import _info, ops
from ttscale.attention import Level, SharedPrefixDecode
from ttscale.reference.attention import attention_ref
from ttscale.reference.paged_attention import merge_attention_states_ref, paged_attention_ref
from ttscale.reference.sparse_paged_attention import sparse_attention_ref

# every CPU SIMD path this machine has, and the CUDA kernels when a GPU and a CUDA build are present
PATHS = [f"cpu:{isa}" for isa in CPU_ISAS] + (["cuda"] if CUDA else [])


@pytest.fixture(params=PATHS)
def dev(request):
    """The device the op runs on (inputs are built on the CPU, moved there for the call, and the
    results compared on the CPU); a cpu:ISA path forces that SIMD path for the test."""
    if request.param == "cuda":
        yield "cuda"
        return
    prev = _info.set_cpu_isa(request.param.split(":", 1)[1])
    try:
        yield "cpu"
    finally:
        _info.set_cpu_isa(prev)


def on(dev, *ts):
    return [t.to(dev) for t in ts]


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 3e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}
BADS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def check_rows(out, ref, dtype):
    """Finite reference entries match within the dtype's bound; non-finite ones are non-finite in
    ``out`` too (inf vs NaN is not pinned: fused kernels may meet inf - inf where plain math does not)."""
    out = out.cpu().double()
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), fin), "non-finite pattern differs from the reference"
    torch.testing.assert_close(out[fin], ref[fin], atol=TOL[dtype], rtol=TOL[dtype])


def check_lse(lse, ref):
    lse = lse.cpu().double()
    assert torch.equal(torch.isnan(lse), torch.isnan(ref))
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(lse[fin], ref[fin], atol=1e-3, rtol=1e-3)


def test_reference_matches_torch_sdpa_where_torch_is_defined():
    # the references' contract, checked against torch's own math where torch has no 0 * inf trap
    # (its additive mask turns a masked NaN key into NaN for every row, so the NaN key here is key 0,
    # which every query sees): NaN queries / visible keys give NaN rows in both
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 9, 2, 16, generator=g, dtype=torch.float64) for _ in range(3))
    q[0, 2, 1, 3] = math.nan
    k[0, 0, 0, 0] = math.nan
    ref, _ = attention_ref(q, k, v, causal=True)
    mask = torch.ones(9, 9, dtype=torch.bool).tril()
    sd = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask).transpose(1, 2)
    assert torch.equal(torch.isnan(ref), torch.isnan(sd))
    fin = torch.isfinite(sd)
    torch.testing.assert_close(ref[fin], sd[fin])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bad", list(BADS), ids=list(BADS))
@pytest.mark.parametrize("what", ["v", "k", "kv"])
@pytest.mark.parametrize("sq,sk,hq,hkv,d", [(4, 4, 2, 2, 64), (37, 53, 4, 2, 64), (130, 130, 2, 1, 128)])
def test_dense_masked_key_does_not_touch_rows(dev, dtype, bad, what, sq, sk, hq, hkv, d):
    g = torch.Generator().manual_seed(sq * 7 + sk)
    q = torch.randn(2, sq, hq, d, generator=g).to(dtype)
    k = torch.randn(2, sk, hkv, d, generator=g).to(dtype)
    v = torch.randn(2, sk, hkv, d, generator=g).to(dtype)
    j = sk - 1 - sq // 3  # a key inside the last query tile: later rows see it, earlier ones do not
    if "k" in what:
        k[1, j, 0, 5] = BADS[bad]
    if "v" in what:
        v[1, j, hkv - 1, 7] = BADS[bad]
    for kw in (dict(causal=True), dict(causal=False, window_left=0)):
        out, lse = ops.attention(*on(dev, q, k, v), return_lse=True, **kw)
        out, lse = out.cpu(), lse.cpu()
        ro, rl = attention_ref(q, k, v, **kw)
        check_rows(out, ro, dtype)
        check_lse(lse, rl)
        assert torch.isfinite(out[0]).all()  # the other sequence is untouched
        # the rows that cannot see key j are finite
        pos = torch.arange(sq) + (sk - sq)
        blind = (pos < j) if kw["causal"] else pos > j
        assert blind.any() and torch.isfinite(out[1, blind]).all()
        if not (what == "k" and bad == "-inf"):  # a -inf key element may only mask the key (q_d > 0)
            assert not torch.isfinite(out[1, ~blind]).all()


def test_dense_issue_example(dev):
    q = torch.randn(1, 4, 4, 64)
    k = torch.randn(1, 4, 2, 64)
    v = torch.randn(1, 4, 2, 64)
    v[0, 3] = float("inf")
    out = ops.attention(*on(dev, q, k, v), causal=True).cpu()
    assert torch.isfinite(out[0, :3]).all()
    assert not torch.isfinite(out[0, 3]).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_nan_query_and_key_propagate(dev, dtype):
    g = torch.Generator().manual_seed(11)
    q = torch.randn(1, 19, 4, 64, generator=g).to(dtype)
    k = torch.randn(1, 23, 2, 64, generator=g).to(dtype)
    v = torch.randn(1, 23, 2, 64, generator=g).to(dtype)
    q[0, 3, 1, 0] = math.nan        # one query row
    q[0, 9, 2, 1] = math.inf        # +inf and -inf scores: the row is NaN as in torch
    k[0, 10, 0, 2] = math.nan       # visible to queries 6.. of heads 0-1 (causal, bottom-right)
    out, lse = (t.cpu() for t in ops.attention(*on(dev, q, k, v), causal=True, return_lse=True))
    ro, rl = attention_ref(q, k, v, causal=True)
    assert torch.isnan(out[0, 3, 1]).all() and torch.isnan(lse[0, 3, 1])
    assert torch.isnan(out[0, 9, 2]).all() and torch.isnan(lse[0, 9, 2])
    assert torch.isnan(out[0, 6:, :2]).all() and torch.isnan(lse[0, 6:, :2]).all()
    assert torch.isfinite(out[0, :6, 0]).all() and torch.isfinite(out[0, [0, 1, 2, 4, 5], 1]).all()
    check_rows(out, ro, dtype)
    check_lse(lse, rl)


def _paged(kv_len, page_size, hkv, d, dtype, g, num_pages=None):
    n = [(L + page_size - 1) // page_size for L in kv_len]
    num_pages = num_pages or sum(n) + 3
    perm = torch.randperm(num_pages, generator=g)[: sum(n)].to(torch.int32)
    kc = torch.randn(num_pages, page_size, hkv, d, generator=g).to(dtype)
    vc = torch.randn(num_pages, page_size, hkv, d, generator=g).to(dtype)
    ip = torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32)
    last = torch.tensor([L - (m - 1) * page_size for L, m in zip(kv_len, n)], dtype=torch.int32)
    return kc, vc, ip, perm, last


def _slot(ix, ip, last, page_size, b, t):
    """(page, offset) of token t of sequence b."""
    return int(ix[int(ip[b]) + t // page_size]), t % page_size


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bad", list(BADS), ids=list(BADS))
@pytest.mark.parametrize("nq,hq,hkv,ps", [(5, 4, 2, 16), (33, 2, 2, 5), (12, 8, 1, 7)],
                         ids=["decode-tiles", "prefill-widened", "gqa8-widened"])
def test_paged_masked_value_does_not_touch_rows(dev, dtype, bad, nq, hq, hkv, ps):
    g = torch.Generator().manual_seed(nq * 31 + ps)
    kv_len = [70, 45]
    kc, vc, ip, ix, last = _paged(kv_len, ps, hkv, 64, dtype, g)
    qo = torch.tensor([0, nq, 2 * nq], dtype=torch.int32)
    q = torch.randn(2 * nq, hq, 64, generator=g).to(dtype)
    j = kv_len[1] - 2  # seen by the last 2 queries of sequence 1 only (causal)
    page, off = _slot(ix, ip, last, ps, 1, j)
    vc[page, off, 0, 3] = BADS[bad]
    kc[page, off, 0, 4] = BADS[bad]
    for kw in (dict(causal=True), dict(causal=True, window_left=6)):
        out, lse = (t.cpu() for t in ops.paged_attention(*on(dev, q, kc, vc, ip, ix, last), qo_indptr=qo.to(dev),
                                                        return_lse=True, **kw))
        ro, rl = paged_attention_ref(q, kc, vc, ip, ix, last, qo_indptr=qo, **kw)
        check_rows(out, ro, dtype)
        check_lse(lse, rl)
        assert torch.isfinite(out[: 2 * nq - 2]).all()
    # decode of the sequence (one query, sees everything): the row is not finite
    out = ops.paged_attention(*on(dev, q[[0, nq]], kc, vc, ip, ix, last)).cpu()
    assert torch.isfinite(out[0]).all() and not torch.isfinite(out[1, :hq // hkv]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paged_nan_query_and_key_propagate(dev, dtype):
    g = torch.Generator().manual_seed(5)
    kv_len = [40, 29, 1]
    kc, vc, ip, ix, last = _paged(kv_len, 16, 2, 128, dtype, g)
    q = torch.randn(3, 8, 128, generator=g).to(dtype)
    q[0, 5, 9] = math.nan
    page, off = _slot(ix, ip, last, 16, 1, 17)
    kc[page, off, 1, 0] = math.nan  # heads 4-7 of sequence 1 see it
    out, lse = (t.cpu() for t in ops.paged_attention(*on(dev, q, kc, vc, ip, ix, last), return_lse=True))
    ro, rl = paged_attention_ref(q, kc, vc, ip, ix, last)
    assert torch.isnan(out[0, 5]).all() and torch.isnan(lse[0, 5])
    assert torch.isnan(out[1, 4:]).all() and torch.isnan(lse[1, 4:]).all()
    assert torch.isfinite(out[1, :4]).all() and torch.isfinite(out[2]).all()
    check_rows(out, ro, dtype)
    check_lse(lse, rl)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_nan_and_unselected_pages(dev, dtype):
    g = torch.Generator().manual_seed(8)
    ps, kv_len = 8, [120, 64]
    kc, vc, ip, ix, last = _paged(kv_len, ps, 2, 64, dtype, g)
    q = torch.randn(2, 4, 64, generator=g).to(dtype)
    q[1, 2, 0] = math.nan
    # fill the summaries from the cache as the engine does (append), then poison an unselected page
    summ = ops.new_page_summaries(kc)
    from ttscale.reference.sparse_paged_attention import page_lens_of, page_summaries_ref
    summ.copy_(page_summaries_ref(kc, page_lens_of(kc.shape[0], ps, ip, ix, last)).to(dtype))
    out, lse, sel = (t.cpu() for t in torch.ops.ttscale.sparse_paged_attention(
        *on(dev, q, kc, vc, summ, ip, ix, last), 2, 1, 1, 64 ** -0.5))
    kept = set(int(p) for p in sel[0, 0].tolist() if p >= 0)
    dropped = [p for p in range(int(ip[1] - ip[0])) if p not in kept]
    assert dropped, "the budget must leave a page of sequence 0 out"
    page = int(ix[int(ip[0]) + dropped[0]])
    vc[page, :, 0] = math.inf
    kc[page, :, 0] = math.nan
    out, lse, sel2 = (t.cpu() for t in torch.ops.ttscale.sparse_paged_attention(
        *on(dev, q, kc, vc, summ, ip, ix, last), 2, 1, 1, 64 ** -0.5))
    assert torch.equal(sel, sel2)
    ro, rl = sparse_attention_ref(q, kc, vc, ip, ix, last, sel)
    assert torch.isfinite(out[0]).all()
    assert torch.isnan(out[1, 2]).all() and torch.isnan(lse[1, 2])
    check_rows(out, ro, dtype)
    check_lse(lse, rl)


def test_merge_nan_state_propagates(dev):
    g = torch.Generator().manual_seed(1)
    oa, ob = torch.randn(3, 2, 64, generator=g), torch.randn(3, 2, 64, generator=g)
    la = torch.tensor([[math.nan, 0.5], [-math.inf, math.inf], [1.0, -math.inf]])
    lb = torch.tensor([[-math.inf, math.nan], [math.nan, 0.0], [-math.inf, -math.inf]])
    ob[2, 1] = 0.0
    o, l = (t.cpu() for t in ops.merge_attention_states(*on(dev, oa, la, ob, lb)))
    ro, rl = merge_attention_states_ref(oa, la, ob, lb)
    assert torch.isnan(l[0]).all() and torch.isnan(l[1]).all() and torch.isnan(o[:2]).all()
    assert torch.equal(torch.isnan(o.double()), torch.isnan(ro))
    fin = torch.isfinite(ro)
    torch.testing.assert_close(o.double()[fin], ro[fin])
    assert torch.equal(torch.isnan(l.double()), torch.isnan(rl))


def test_shared_prefix_nan_prefix_key_poisons_every_branch(dev):
    g = torch.Generator().manual_seed(2)
    ps, n = 4, 3
    kc, vc = torch.randn(16, ps, 2, 64, generator=g), torch.randn(16, ps, 2, 64, generator=g)
    prefix = torch.tensor([0, 1, 2], dtype=torch.int32)            # 12 shared tokens
    sfx_ip = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    sfx_ix = torch.tensor([5, 6, 7], dtype=torch.int32)
    sfx_last = torch.tensor([2, 3, 1], dtype=torch.int32)
    q = torch.randn(n, 4, 64, generator=g)
    vc[6, 3, 1, 0] = math.inf   # the slot past branch 1's suffix (3 of 4 tokens used): never seen
    kc[7, 0, 0, 0] = math.nan   # branch 2's suffix: its heads 0-1 are NaN, the others are not
    prefix, sfx_ip, sfx_ix, sfx_last = on(dev, prefix, sfx_ip, sfx_ix, sfx_last)
    dec = SharedPrefixDecode().plan([Level.shared(n, prefix, ps), Level.per_branch(sfx_ip, sfx_ix, sfx_last)])
    out = dec.run(*on(dev, q, kc, vc)).cpu()
    assert torch.isfinite(out[:2]).all()
    assert torch.isnan(out[2, :2]).all() and torch.isfinite(out[2, 2:]).all()
    kc[1, 1, 1, 5] = math.nan   # a shared prefix key: heads 2-3 of every branch
    out = dec.run(*on(dev, q, kc, vc)).cpu()
    assert torch.isnan(out[:, 2:]).all() and torch.isfinite(out[:2, :2]).all()
