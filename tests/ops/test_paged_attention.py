"""paged_attention, merge_attention_states(_), append_paged_kv, copy_pages.

Every result is compared with the float64 plain-torch reference (python/ttscale/reference/
paged_attention.py) given the same stored values. Inputs are random (never zeros), outputs of
in-place ops are poisoned first, sizes are awkward (seq lens 1, 2, 17, 127, 1000; page sizes 1 and
16; batch 1 and 37; GQA groups 1, 4, 8; head dims 64, 128, 256). Every CPU SIMD path runs through
the ``cpu_isa`` fixture.

Error bound table (OUT_TOL): the kernel accumulates in float32, so against float64 a float32 output
is off by a few float32 ulps of the accumulation; float16 / bfloat16 outputs are additionally
rounded once to their dtype (half an ulp: 2^-11 and 2^-8 relative), which is also the error plain
torch makes when it returns attention in that dtype. LSE is always float32 (LSE_TOL).
"""
import math

import pytest
import torch

import ttscale
from ttscale.ops import append_paged_kv, copy_pages, merge_attention_states, merge_attention_states_, paged_attention
from ttscale.reference.paged_attention import (build_page_table, gather_kv, kv_lens, merge_attention_states_ref,
                                               paged_attention_ref)

from conftest import CUDA, DEVICES, DTYPES

OUT_TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=1e-3, rtol=2e-3),   # 2^-11 output rounding + fp32 accumulation
    torch.bfloat16: dict(atol=8e-3, rtol=1.6e-2),  # 2^-8 output rounding + fp32 accumulation
}
LSE_TOL = dict(atol=2e-5, rtol=2e-5)


def make_problem(lens, page_size, Hq, Hkv, D, dtype, qo=None, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ip, ix, last, P = build_page_table(lens, page_size, generator=g)
    k = torch.randn(P, page_size, Hkv, D, generator=g).to(dtype)
    v = torch.randn(P, page_size, Hkv, D, generator=g).to(dtype)
    T = len(lens) if qo is None else qo[-1]
    q = torch.randn(T, Hq, D, generator=g).to(dtype)
    qo_t = None if qo is None else torch.tensor(qo, dtype=torch.int32)
    d = lambda t: None if t is None else t.to(device)  # noqa: E731
    return d(q), d(k), d(v), d(ip), d(ix), d(last), d(qo_t)


def check(q, k, v, ip, ix, last, qo=None, **kw):
    out, lse = paged_attention(q, k, v, ip, ix, last, qo_indptr=qo, return_lse=True, **kw)
    ro, rl = paged_attention_ref(q.cpu(), k.cpu(), v.cpu(), ip.cpu(), ix.cpu(), last.cpu(),
                                 qo_indptr=None if qo is None else qo.cpu(), **kw)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.dtype == torch.float32
    torch.testing.assert_close(out.cpu().double(), ro, **OUT_TOL[q.dtype])
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(rl))
    fin = torch.isfinite(rl)
    torch.testing.assert_close(lse.cpu().double()[fin], rl[fin], **LSE_TOL)
    assert torch.all(out.cpu()[~fin] == 0)
    return out, lse


# --------------------------------------------------------------------------- decode
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("group,D", [(1, 64), (4, 128), (8, 256), (4, 64)])
def test_decode_awkward_lens(cpu_isa, dtype, page_size, group, D):
    Hkv = 2
    check(*make_problem([1, 2, 17, 127, 1000], page_size, Hkv * group, Hkv, D, dtype, seed=group + D))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_batch37(cpu_isa, dtype):
    lens = torch.randint(1, 300, (37,), generator=torch.Generator().manual_seed(5)).tolist()
    check(*make_problem(lens, 16, 8, 2, 64, dtype))


def test_decode_batch1_page1_gqa8():
    check(*make_problem([127], 1, 8, 1, 128, torch.float32))


def test_long_sequence_split_kv_matches_single_thread(cpu_isa):
    # one long sequence, Hkv = 1: the CPU path splits the keys across threads; the result must not
    # depend on the number of threads beyond rounding
    args = make_problem([5000], 16, 4, 1, 128, torch.float32, seed=3)
    out2, lse2 = check(*args)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out1, lse1 = paged_attention(*args[:6], return_lse=True)
    finally:
        torch.set_num_threads(prev)
    torch.testing.assert_close(out1, out2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse1, lse2, atol=1e-6, rtol=1e-6)


def test_empty_sequences_give_zero_and_neg_inf():
    q, k, v, ip, ix, last, _ = make_problem([0, 5, 0], 4, 4, 2, 64, torch.float32)
    out, lse = check(q, k, v, ip, ix, last)
    assert torch.all(out[0] == 0) and torch.all(out[2] == 0)
    assert torch.all(lse[0] == -math.inf) and torch.all(lse[2] == -math.inf)


def test_default_scale_and_return_lse_flag():
    args = make_problem([33, 7], 16, 4, 2, 64, torch.float32)
    o = paged_attention(*args[:6])
    assert isinstance(o, torch.Tensor)
    o2 = paged_attention(*args[:6], scale=1 / 8.0)
    torch.testing.assert_close(o, o2, atol=0, rtol=0)
    check(*args[:6], scale=0.3)


def test_strided_q():
    q, k, v, ip, ix, last, _ = make_problem([20, 40], 16, 4, 2, 64, torch.float32)
    big = torch.randn(2, 4, 3, 64)
    big[:, :, 1] = q
    check(big[:, :, 1], k, v, ip, ix, last)


# --------------------------------------------------------------------------- multi-query, options
QO_CASES = [
    ([1000, 17, 2, 127], [0, 3, 20, 20, 21]),   # ragged, an empty query set, n_q > kv_len (17 queries, 17 keys)
    ([40, 1], [0, 40, 43]),                      # full causal prefill chunk; 3 queries against 1 key
]


@pytest.mark.parametrize("opts", [dict(causal=True), dict(causal=False), dict(window_left=7),
                                  dict(causal=False, window_left=0), dict(softcap=3.0), dict(softcap=1.5, window_left=20)],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("case", range(len(QO_CASES)))
def test_multi_query_options(cpu_isa, opts, case):
    lens, qo = QO_CASES[case]
    check(*make_problem(lens, 16, 8, 2, 64, torch.float32, qo=qo, seed=case), **opts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size,group,D", [(16, 4, 128), (1, 8, 64), (16, 1, 256)])
def test_shared_prefix_block(cpu_isa, dtype, page_size, group, D):
    # N branches' decode queries against one shared prefix: one non-causal multi-query block
    N = 37
    check(*make_problem([1001], page_size, 2 * group, 2, D, dtype, qo=[0, N], seed=7), causal=False)  # odd last chunk


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_chunk_low_precision(dtype):
    check(*make_problem([127, 64], 16, 4, 4, 128, dtype, qo=[0, 30, 94]), causal=True)


# --------------------------------------------------------------------------- merge
def _states(T, H, D, dtype, seed, empty_rows=()):
    g = torch.Generator().manual_seed(seed)
    o = torch.randn(T, H, D, generator=g).to(dtype)
    l = torch.randn(T, H, generator=g) * 3
    for r in empty_rows:
        l[r] = -math.inf
        o[r] = 0
    return o, l


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_matches_reference(cpu_isa, dtype):
    a, la = _states(17, 5, 128, dtype, 1, empty_rows=(0, 3))
    b, lb = _states(17, 5, 128, dtype, 2, empty_rows=(0, 4))
    out, lse = merge_attention_states(a, la, b, lb)
    ro, rl = merge_attention_states_ref(a, la, b, lb)
    torch.testing.assert_close(out.double(), ro, **OUT_TOL[dtype])
    assert torch.all(lse[0] == -math.inf) and torch.all(out[0] == 0)
    fin = torch.isfinite(rl)
    torch.testing.assert_close(lse.double()[fin], rl[fin], **LSE_TOL)
    # in place, out poisoned by being the input
    o2, l2 = a.clone(), la.clone()
    merge_attention_states_(o2, l2, b, lb)
    torch.testing.assert_close(o2, out, atol=0, rtol=0)
    torch.testing.assert_close(l2, lse, atol=0, rtol=0)


def test_merge_odd_head_dim_and_empty():
    a, la = _states(3, 2, 7, torch.float32, 3)
    b, lb = _states(3, 2, 7, torch.float32, 4)
    out, lse = merge_attention_states(a, la, b, lb)
    ro, rl = merge_attention_states_ref(a, la, b, lb)
    torch.testing.assert_close(out.double(), ro, **OUT_TOL[torch.float32])
    e, le = _states(0, 2, 7, torch.float32, 5)
    o, l = merge_attention_states(e, le, e, le)
    assert o.shape == (0, 2, 7) and l.shape == (0, 2)


def test_merge_commutative_associative():
    s = [_states(9, 4, 64, torch.float32, i, empty_rows=(i,)) for i in range(3)]
    ab = merge_attention_states(*s[0], *s[1])
    ba = merge_attention_states(*s[1], *s[0])
    torch.testing.assert_close(ab[0], ba[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ab[1], ba[1], atol=1e-6, rtol=1e-6)
    left = merge_attention_states(*ab, *s[2])
    bc = merge_attention_states(*s[1], *s[2])
    right = merge_attention_states(*s[0], *bc)
    torch.testing.assert_close(left[0], right[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left[1], right[1], atol=1e-5, rtol=1e-5)


def test_merge_of_split_keys_equals_whole(cpu_isa):
    # attention over pages [0, m) and [m, n) merged == attention over all n pages
    q, k, v, ip, ix, last, _ = make_problem([300], 16, 4, 2, 64, torch.float32)
    whole = paged_attention(q, k, v, ip, ix, last, return_lse=True, causal=False)
    m = 7
    a = paged_attention(q, k, v, torch.tensor([0, m], dtype=torch.int32), ix[:m], torch.tensor([16], dtype=torch.int32),
                        return_lse=True, causal=False)
    b = paged_attention(q, k, v, torch.tensor([0, ix.numel() - m], dtype=torch.int32), ix[m:], last, return_lse=True,
                        causal=False)
    out, lse = merge_attention_states(*a, *b)
    torch.testing.assert_close(out, whole[0], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, whole[1], atol=2e-6, rtol=1e-6)


# --------------------------------------------------------------------------- append / copy
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["positions", "append_indptr", "decode"])
def test_append_then_attend(dtype, mode):
    ps, Hkv, D = 16, 2, 64
    old = [15, 0, 33, 16]
    new = [3, 5, 1, 17] if mode != "decode" else [1, 1, 1, 1]
    lens = [a + b for a, b in zip(old, new)]
    q, k_cache, v_cache, ip, ix, last, _ = make_problem(lens, ps, 4, Hkv, D, dtype, seed=11)
    g = torch.Generator().manual_seed(12)
    N = sum(new)
    k_new = torch.randn(N, Hkv, D, generator=g).to(dtype)
    v_new = torch.randn(N, Hkv, D, generator=g).to(dtype)
    # dense sequences before the append (the new slots hold garbage)
    dense_k = [gather_kv(k_cache, ip, ix, last, b)[:old[b]].clone() for b in range(4)]
    dense_v = [gather_kv(v_cache, ip, ix, last, b)[:old[b]].clone() for b in range(4)]
    if mode == "positions":
        bi = torch.tensor(sum(([b] * n for b, n in enumerate(new)), []), dtype=torch.int64)
        pos = torch.tensor(sum((list(range(o, o + n)) for o, n in zip(old, new)), []), dtype=torch.int32)
        perm = torch.randperm(N, generator=g)  # any order
        append_paged_kv(k_new[perm], v_new[perm], k_cache, v_cache, ip, ix, last, batch_indices=bi[perm],
                        positions=pos[perm])
    elif mode == "append_indptr":
        ap = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32)
        append_paged_kv(k_new, v_new, k_cache, v_cache, ip, ix, last, append_indptr=ap)
    else:
        append_paged_kv(k_new, v_new, k_cache, v_cache, ip, ix, last)
    off = 0
    for b in range(4):
        ek = torch.cat([dense_k[b], k_new[off:off + new[b]]])
        ev = torch.cat([dense_v[b], v_new[off:off + new[b]]])
        off += new[b]
        assert torch.equal(gather_kv(k_cache, ip, ix, last, b), ek)
        assert torch.equal(gather_kv(v_cache, ip, ix, last, b), ev)
    # attend over the appended cache == reference over the concatenated dense KV
    check(q, k_cache, v_cache, ip, ix, last)


def test_copy_pages():
    k = torch.randn(6, 4, 2, 64)
    v = torch.randn(6, 4, 2, 64)
    k0, v0 = k.clone(), v.clone()
    copy_pages(k, v, torch.tensor([1, 4], dtype=torch.int32), torch.tensor([3, 0]))
    exp_k, exp_v = k0.clone(), v0.clone()
    exp_k[3], exp_k[0], exp_v[3], exp_v[0] = k0[1], k0[4], v0[1], v0[4]
    assert torch.equal(k, exp_k) and torch.equal(v, exp_v)


def test_fork_mid_page_copy_on_write():
    # a branch forks mid-page: copy the partial last page, then each branch appends its own token
    ps = 4
    k = torch.randn(8, ps, 1, 64)
    v = torch.randn(8, ps, 1, 64)
    parent_pages = torch.tensor([2, 5], dtype=torch.int32)  # 6 tokens: page 5 holds 2
    copy_pages(k, v, torch.tensor([5]), torch.tensor([7]))
    ip = torch.tensor([0, 2, 4], dtype=torch.int32)
    ix = torch.tensor([2, 5, 2, 7], dtype=torch.int32)
    last = torch.tensor([3, 3], dtype=torch.int32)
    kn, vn = torch.randn(2, 1, 64), torch.randn(2, 1, 64)
    append_paged_kv(kn, vn, k, v, ip, ix, last)
    assert torch.equal(k[5, 2, 0], kn[0, 0]) and torch.equal(k[7, 2, 0], kn[1, 0])
    assert torch.equal(k[5, :2], k[7, :2])
    q = torch.randn(2, 2, 64)
    check(q, k, v, ip, ix, last)
    del parent_pages


# --------------------------------------------------------------------------- opcheck / torch.compile
def _pa_args(device="cpu", qo=False):
    if qo:
        q, k, v, ip, ix, last, qo_t = make_problem([20, 33], 4, 4, 2, 64, torch.float32, qo=[0, 3, 5], device=device)
    else:
        q, k, v, ip, ix, last, qo_t = make_problem([20, 33], 4, 4, 2, 64, torch.float32, device=device)
    return (q, k, v, ip, ix, last, qo_t, True, 0.125, -1, 0.0, True)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    torch.library.opcheck(torch.ops.ttscale.paged_attention.default, _pa_args(device))
    torch.library.opcheck(torch.ops.ttscale.paged_attention.default, _pa_args(device, qo=True))
    a, la = _states(5, 3, 64, torch.float32, 1)
    b, lb = _states(5, 3, 64, torch.float32, 2)
    a, la, b, lb = (t.to(device) for t in (a, la, b, lb))
    torch.library.opcheck(torch.ops.ttscale.merge_attention_states.default, (a, la, b, lb))
    torch.library.opcheck(torch.ops.ttscale.merge_attention_states_.default, (a.clone(), la.clone(), b, lb))
    q, k, v, ip, ix, last, _ = make_problem([5, 9], 4, 2, 2, 64, torch.float32, device=device)
    kn, vn = torch.randn(2, 2, 64, device=device), torch.randn(2, 2, 64, device=device)
    torch.library.opcheck(torch.ops.ttscale.append_paged_kv.default, (kn, vn, k, v, ip, ix, last, None, None, None))
    src = torch.tensor([ix[0].item()], dtype=torch.int32, device=device)
    free = sorted(set(range(k.shape[0])) - set(ix.tolist()))
    dst = torch.tensor([free[0]], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.ttscale.copy_pages.default, (k, v, src, dst))


def test_torch_compile_fullgraph():
    q, k, v, ip, ix, last, qo = make_problem([20, 33], 4, 4, 2, 64, torch.float32, qo=[0, 3, 5])

    @torch.compile(fullgraph=True, backend="inductor")
    def f(q, k, v, ip, ix, last, qo, kn, vn, src, dst):
        copy_pages(k, v, src, dst)
        append_paged_kv(kn, vn, k, v, ip, ix, last)
        o1, l1 = paged_attention(q, k, v, ip, ix, last, qo_indptr=qo, return_lse=True, causal=False)
        o2, l2 = paged_attention(q, k, v, ip, ix, last, qo_indptr=qo, return_lse=True, window_left=3)
        o, l = merge_attention_states(o1, l1, o2, l2)
        merge_attention_states_(o, l, o2, l2)
        return o * 2, l

    kn, vn = torch.randn(2, 2, 64), torch.randn(2, 2, 64)
    free = sorted(set(range(k.shape[0])) - set(ix.tolist()))
    src = torch.tensor([ix[0].item()], dtype=torch.int32)
    dst = torch.tensor([free[0]], dtype=torch.int32)
    k1, v1 = k.clone(), v.clone()
    got = f(q, k1, v1, ip, ix, last, qo, kn, vn, src, dst)
    k2, v2 = k.clone(), v.clone()
    copy_pages(k2, v2, src, dst)
    append_paged_kv(kn, vn, k2, v2, ip, ix, last)
    o1, l1 = paged_attention(q, k2, v2, ip, ix, last, qo_indptr=qo, return_lse=True, causal=False)
    o2, l2 = paged_attention(q, k2, v2, ip, ix, last, qo_indptr=qo, return_lse=True, window_left=3)
    o, l = merge_attention_states(o1, l1, o2, l2)
    merge_attention_states_(o, l, o2, l2)
    assert torch.equal(k1, k2) and torch.equal(v1, v2)
    torch.testing.assert_close(got[0], o * 2)
    torch.testing.assert_close(got[1], l)


# --------------------------------------------------------------------------- bad input
def _base():
    q, k, v, ip, ix, last, _ = make_problem([20, 33], 4, 4, 2, 64, torch.float32)
    return dict(q=q, k_cache=k, v_cache=v, kv_indptr=ip, kv_indices=ix, kv_last_page_len=last)


def _i32(*x):
    return torch.tensor(x, dtype=torch.int32)


BAD = [
    ("mismatched head dims q/cache", lambda a: a.update(q=torch.randn(2, 4, 128)), RuntimeError, "q head_dim"),
    ("mismatched head dims k/v", lambda a: a.update(v_cache=torch.randn(*a["k_cache"].shape[:3], 128)), RuntimeError,
     "v_cache head_dim"),
    ("Hq not a multiple of Hkv", lambda a: a.update(q=torch.randn(2, 3, 64)), RuntimeError, "multiple of"),
    ("unsupported head dim", lambda a: a.update(q=torch.randn(2, 4, 96), k_cache=torch.randn(30, 4, 2, 96),
                                                v_cache=torch.randn(30, 4, 2, 96)), RuntimeError, "64, 128, 256"),
    ("indptr not monotone", lambda a: a.update(kv_indptr=_i32(0, 9, 5)), ValueError, "kv_indptr must be non-decreasing"),
    ("indptr not ending at nnz", lambda a: a.update(kv_indptr=_i32(0, 5, 13)), ValueError, "kv_indptr must end"),
    ("indptr wrong start", lambda a: a.update(kv_indptr=_i32(1, 5, 14)), ValueError, r"kv_indptr\[0\]"),
    ("indptr wrong length", lambda a: a.update(kv_indptr=_i32(0, 14)), RuntimeError, "kv_last_page_len must have"),
    ("indptr int64", lambda a: a.update(kv_indptr=a["kv_indptr"].long()), RuntimeError, "kv_indptr must be int32"),
    ("page index negative", lambda a: a["kv_indices"].__setitem__(3, -1), ValueError, r"kv_indices\[3\] = -1"),
    ("page index >= num_pages", lambda a: a["kv_indices"].__setitem__(0, 10**6), ValueError, "num_pages"),
    ("last_page_len 0", lambda a: a.update(kv_last_page_len=_i32(0, 1)), ValueError, r"kv_last_page_len\[0\]"),
    ("last_page_len > page_size", lambda a: a.update(kv_last_page_len=_i32(4, 5)), ValueError, "1..page_size"),
    ("dtype mismatch q/cache", lambda a: a.update(q=a["q"].half()), RuntimeError, "must match q dtype"),
    ("dtype mismatch k/v", lambda a: a.update(v_cache=a["v_cache"].half()), RuntimeError, "v_cache dtype"),
    ("non-contiguous q last dim", lambda a: a.update(q=torch.randn(2, 64, 4).transpose(1, 2)), RuntimeError,
     "q must be contiguous in its last"),
    ("non-contiguous cache last dim", lambda a: a.update(k_cache=a["k_cache"].transpose(2, 3).contiguous().transpose(2, 3),
                                                         v_cache=a["v_cache"]), RuntimeError, "k_cache must be contiguous"),
    ("decode T != B", lambda a: a.update(q=torch.randn(3, 4, 64)), RuntimeError, "pass qo_indptr"),
    ("qo_indptr inconsistent with T", lambda a: a.update(qo_indptr=_i32(0, 1, 3)), ValueError, "qo_indptr must end"),
    ("qo_indptr not monotone", lambda a: a.update(q=torch.randn(3, 4, 64), qo_indptr=_i32(0, 4, 3)), ValueError,
     "qo_indptr must be non-decreasing"),
    ("qo_indptr wrong length", lambda a: a.update(qo_indptr=_i32(0, 2)), RuntimeError, "qo_indptr must have B"),
    ("q 2-D", lambda a: a.update(q=torch.randn(2, 64)), RuntimeError, "q must be 3-D"),
    ("cache 3-D", lambda a: a.update(k_cache=torch.randn(30, 4, 64)), RuntimeError, "k_cache must be 4-D"),
    ("int q", lambda a: a.update(q=torch.ones(2, 4, 64, dtype=torch.int32)), RuntimeError, "q must be one of"),
    ("softcap negative", lambda a: a.update(softcap=-1.0), ValueError, "softcap"),
    ("window_left < -1", lambda a: a.update(window_left=-2), ValueError, "window_left"),
    ("device mismatch", lambda a: a.update(kv_indices=a["kv_indices"].to("meta")), RuntimeError, "same device"),
]


@pytest.mark.parametrize("name,mutate,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, mutate, exc, match):
    a = _base()
    mutate(a)
    kw = {k: a.pop(k) for k in ("qo_indptr", "softcap", "window_left") if k in a}
    with pytest.raises(exc, match=match):
        paged_attention(a["q"], a["k_cache"], a["v_cache"], a["kv_indptr"], a["kv_indices"], a["kv_last_page_len"], **kw)


def test_bad_merge():
    a, la = _states(5, 3, 64, torch.float32, 1)
    with pytest.raises(RuntimeError, match="out_b shape"):
        merge_attention_states(a, la, a[:4], la[:4])
    with pytest.raises(RuntimeError, match="lse_b must be float32"):
        merge_attention_states(a, la, a, la.double())
    with pytest.raises(RuntimeError, match="lse_a must have shape"):
        merge_attention_states(a, la[:, :2], a, la)
    with pytest.raises(RuntimeError, match="out_b dtype"):
        merge_attention_states(a, la, a.half(), la)
    with pytest.raises(RuntimeError, match="out must be contiguous"):
        merge_attention_states_(a.transpose(0, 1), la.t().contiguous(), a.transpose(0, 1), la.t().contiguous())


def test_bad_append_and_copy():
    q, k, v, ip, ix, last, _ = make_problem([5, 9], 4, 2, 2, 64, torch.float32)
    kn, vn = torch.randn(2, 2, 64), torch.randn(2, 2, 64)
    with pytest.raises(ValueError, match=r"positions\[1\] = 9 is out of range"):
        append_paged_kv(kn, vn, k, v, ip, ix, last, batch_indices=torch.tensor([0, 1]), positions=torch.tensor([0, 9]))
    with pytest.raises(ValueError, match=r"batch_indices\[0\] = 2 is out of range"):
        append_paged_kv(kn, vn, k, v, ip, ix, last, batch_indices=torch.tensor([2, 1]), positions=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="together"):
        append_paged_kv(kn, vn, k, v, ip, ix, last, positions=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="append_indptr must end"):
        append_paged_kv(kn, vn, k, v, ip, ix, last, append_indptr=_i32(0, 1, 3))
    with pytest.raises(ValueError, match="appends 6 tokens"):
        append_paged_kv(torch.randn(6, 2, 64), torch.randn(6, 2, 64), k, v, ip, ix, last, append_indptr=_i32(0, 6, 6))
    with pytest.raises(RuntimeError, match="k head_dim"):
        append_paged_kv(torch.randn(2, 2, 128), vn, k, v, ip, ix, last)
    with pytest.raises(RuntimeError, match="k dtype"):
        append_paged_kv(kn.half(), vn, k, v, ip, ix, last)
    with pytest.raises(RuntimeError, match="one token per sequence"):
        append_paged_kv(torch.randn(3, 2, 64), torch.randn(3, 2, 64), k, v, ip, ix, last)
    with pytest.raises(ValueError, match=r"kv_indices\[0\]"):
        append_paged_kv(kn, vn, k, v, ip, ix - 100, last)
    with pytest.raises(ValueError, match=r"src\[0\] = 99"):
        copy_pages(k, v, torch.tensor([99]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"dst\[1\] = 2 appears twice"):
        copy_pages(k, v, torch.tensor([0, 1]), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="overlap"):
        copy_pages(k, v, torch.tensor([0, 1]), torch.tensor([1, 3]))
    with pytest.raises(RuntimeError, match="same length"):
        copy_pages(k, v, torch.tensor([0, 1]), torch.tensor([3]))


# --------------------------------------------------------------------------- in-place outputs and memory overlap
# Issue 18.3: an expand()ed (stride-0) or otherwise self-overlapping cache was written through
# silently (one write landing on several pages), caches that shared memory clobbered each other,
# and torch's own in-place ops refuse all of these. Every refusal must leave the memory untouched.
P, PS, H, D = 6, 4, 2, 64
_SELF_OVERLAP = "is written in place, so each of its elements needs its own memory"


def _one_token_table():
    # one sequence on pages 1 and 3, 6 tokens: the appended token goes to page 3, slot 1
    return _i32(0, 2), _i32(1, 3), _i32(2)


def _self_overlapping_views():
    """(name, view, base) of [P, PS, H, D] layouts in which distinct elements share memory."""
    base = torch.randn(1, PS, H, D)
    yield "expand", base.expand(P, PS, H, D), base
    flat = torch.randn(P * PS * H * D)
    # pages half a page apart: page p + 1 starts in the middle of page p (no stride is 0)
    yield "as_strided", flat.as_strided((P, PS, H, D), (PS * H * D // 2, H * D, D, 1)), flat
    b2 = torch.randn(P, PS, 1, D)
    yield "expand_heads", b2.expand(P, PS, H, D), b2


@pytest.mark.parametrize("which", ["k_cache", "v_cache"])
def test_self_overlapping_cache_is_refused(which):
    kn, vn = torch.randn(1, H, D), torch.randn(1, H, D)
    ip, ix, last = _one_token_table()
    for kind, bad, base in _self_overlapping_views():
        good = torch.randn(P, PS, H, D)
        kc, vc = (bad, good) if which == "k_cache" else (good, bad)
        before, good0 = base.clone(), good.clone()
        for call in (lambda: append_paged_kv(kn, vn, kc, vc, ip, ix, last),
                     lambda: torch.ops.ttscale.append_paged_kv(kn, vn, kc, vc, ip, ix, last, None, None, None),
                     lambda: copy_pages(kc, vc, torch.tensor([1]), torch.tensor([4])),
                     lambda: torch.ops.ttscale.copy_pages(kc, vc, torch.tensor([1]), torch.tensor([4]), None)):
            with pytest.raises(RuntimeError, match=f"{which} {_SELF_OVERLAP}"):
                call()
            assert torch.equal(base, before) and torch.equal(good, good0), kind
        # the fake kernels (meta tensors, torch.compile) refuse it the same way: strides only
        meta = [t.to("meta") if t is not bad else torch.empty_strided(bad.shape, bad.stride(), device="meta")
                for t in (kn, vn, kc, vc, ip, ix, last)]
        with pytest.raises(RuntimeError, match=f"{which} {_SELF_OVERLAP}"):
            torch.ops.ttscale.append_paged_kv(*meta, None, None, None)


def test_self_overlapping_summaries_are_refused():
    from ttscale.ops import new_page_summaries, update_page_summaries

    k, v = torch.randn(P, PS, H, D), torch.randn(P, PS, H, D)
    kn, vn = torch.randn(1, H, D), torch.randn(1, H, D)
    ip, ix, last = _one_token_table()
    base = new_page_summaries(k)[:1].clone()
    bad = base.expand(P, 3, H, D)
    before, k0 = base.clone(), k.clone()
    for call in (lambda: append_paged_kv(kn, vn, k, v, ip, ix, last, summaries=bad),
                 lambda: copy_pages(k, v, torch.tensor([1]), torch.tensor([4]), summaries=bad),
                 lambda: update_page_summaries(k, bad, torch.tensor([0, 2])),
                 lambda: torch.ops.ttscale.update_page_summaries(k, bad, torch.tensor([0, 2]), None)):
        with pytest.raises(RuntimeError, match=f"summaries {_SELF_OVERLAP}"):
            call()
        assert torch.equal(base, before) and torch.equal(k, k0)


def test_caches_sharing_memory_are_refused():
    from ttscale.ops import update_page_summaries

    kn, vn = torch.randn(1, H, D), torch.randn(1, H, D)
    ip, ix, last = _one_token_table()
    n = P * PS * H * D
    buf = torch.randn(n + PS * H * D)
    k = buf[:n].view(P, PS, H, D)
    v_shifted = buf[PS * H * D:].view(P, PS, H, D)  # v's page p is k's page p + 1
    for kc, vc in ((k, k), (k, v_shifted), (v_shifted, k)):
        buf0 = buf.clone()
        with pytest.raises(RuntimeError, match="k_cache and v_cache share memory"):
            append_paged_kv(kn, vn, kc, vc, ip, ix, last)
        with pytest.raises(RuntimeError, match="k_cache and v_cache share memory"):
            copy_pages(kc, vc, torch.tensor([1]), torch.tensor([4]))
        assert torch.equal(buf, buf0)
    # summaries carved out of the key cache's memory
    k2, v2 = torch.randn(P, PS, H, D), torch.randn(P, PS, H, D)
    s_in_k = k2.view(-1)[:P * 3 * H * D].view(P, 3, H, D)
    with pytest.raises(RuntimeError, match="summaries and k_cache share memory"):
        append_paged_kv(kn, vn, k2, v2, ip, ix, last, summaries=s_in_k)
    with pytest.raises(RuntimeError, match="summaries and v_cache share memory"):
        copy_pages(k2, v2, torch.tensor([1]), torch.tensor([4]), summaries=v2.view(-1)[:P * 3 * H * D].view(P, 3, H, D))
    with pytest.raises(RuntimeError, match="k_cache shares memory with summaries"):
        update_page_summaries(k2, s_in_k, torch.tensor([0]))


def test_new_tokens_inside_a_cache_are_refused():
    # k / v that are views into the caches would be read while the caches are written
    k, v = torch.randn(P, PS, H, D), torch.randn(P, PS, H, D)
    ip, ix, last = _one_token_table()
    kn, vn = torch.randn(1, H, D), torch.randn(1, H, D)
    k0, v0 = k.clone(), v.clone()
    for kk, vv, msg in ((k[0, :1], vn, "k shares memory with k_cache"), (kn, v[2, :1], "v shares memory with v_cache"),
                        (v[2, :1], vn, "k shares memory with v_cache"), (kn, k[2, 1:2], "v shares memory with k_cache")):
        with pytest.raises(RuntimeError, match=msg):
            append_paged_kv(kk, vv, k, v, ip, ix, last)
        assert torch.equal(k, k0) and torch.equal(v, v0)
    # a clone of the same values is fine: page 3 slot 1 gets page 0 slot 0's key
    append_paged_kv(k[0, :1].clone(), vn, k, v, ip, ix, last)
    assert torch.equal(k[3, 1], k0[0, 0]) and torch.equal(v[3, 1], vn[0])


def test_strided_non_overlapping_caches_still_work():
    """Views that give every element its own memory stay accepted, and the ops write the right slots:
    k and v interleaved in one [P, 2, page, H, D] buffer, a head-major buffer seen as [P, page, H, D],
    two halves of one allocation, and a page-strided slice."""
    from ttscale.ops import new_page_summaries, update_page_summaries

    g = torch.Generator().manual_seed(3)
    kv = torch.randn(P, 2, PS, H, D, generator=g)
    head_major = torch.randn(2, P, H, PS, D, generator=g).permute(0, 1, 3, 2, 4)  # [2, P, PS, H, D], not contiguous
    halves = torch.randn(2, P, PS, H, D, generator=g)
    every_other = torch.randn(2 * P, PS, H, D, generator=g)
    layouts = {"interleaved": (kv[:, 0], kv[:, 1]), "head_major": (head_major[0], head_major[1]),
               "halves": (halves[0], halves[1]), "page_strided": (every_other[0::2], every_other[1::2])}
    ip, ix, last = _one_token_table()
    for name, (kc, vc) in layouts.items():
        assert not kc.is_contiguous() or name == "halves"
        kn, vn = torch.randn(1, H, D, generator=g), torch.randn(1, H, D, generator=g)
        exp_k, exp_v = kc.clone(), vc.clone()
        s = new_page_summaries(kc)
        append_paged_kv(kn, vn, kc, vc, ip, ix, last, summaries=s)
        exp_k[3, 1], exp_v[3, 1] = kn[0], vn[0]
        assert torch.equal(kc, exp_k) and torch.equal(vc, exp_v), name
        copy_pages(kc, vc, torch.tensor([3]), torch.tensor([5]), summaries=s)
        exp_k[5], exp_v[5] = exp_k[3], exp_v[3]
        assert torch.equal(kc, exp_k) and torch.equal(vc, exp_v), name
        # summaries in a strided view too (a slice of a bigger buffer)
        big = torch.full((P, 5, H, D), float("nan"))
        sv = big[:, 1:4]
        update_page_summaries(kc, sv, torch.arange(P))
        assert torch.equal(sv, new_page_summaries(kc)), name
        assert torch.isnan(big[:, 0]).all() and torch.isnan(big[:, 4]).all()
        check(torch.randn(1, 2 * H, D, generator=g), kc, vc, ip, ix, last)


def test_merge_inplace_refuses_shared_memory():
    a, la = _states(5, 3, 64, torch.float32, 1)
    b, lb = _states(5, 3, 64, torch.float32, 2)
    buf = torch.randn(6 * 3 * 64)
    out, shifted = buf[:5 * 3 * 64].view(5, 3, 64), buf[3 * 64:].view(5, 3, 64)  # rows one apart
    for args, msg in (((a, la, a, lb), "out_other shares memory with out"),
                      ((a, la, b, la), "lse_other shares memory with lse"),
                      ((out, la, shifted, lb), "out_other shares memory with out")):
        buf0, a0, la0 = buf.clone(), a.clone(), la.clone()
        with pytest.raises(RuntimeError, match=msg):
            merge_attention_states_(*args)
        assert torch.equal(buf, buf0) and torch.equal(a, a0) and torch.equal(la, la0)
    both = torch.randn(5 * 3 * 64)
    with pytest.raises(RuntimeError, match="out and lse share memory"):
        merge_attention_states_(both.view(5, 3, 64), both[:15].view(5, 3), b, lb)
    # the refusal does not touch the valid case: a fresh pair merges as before
    o, l = a.clone(), la.clone()
    merge_attention_states_(o, l, b, lb)
    ro, rl = merge_attention_states(a, la, b, lb)
    assert torch.equal(o, ro) and torch.equal(l, rl)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype):
    for lens, qo, causal in [([1, 2, 17, 127, 1000], None, True), ([1000], [0, 64], False), ([300, 40], [0, 5, 45], True)]:
        args = make_problem(lens, 16, 32, 8, 128, dtype, qo=qo)
        cpu = paged_attention(*args[:6], qo_indptr=args[6], causal=causal, return_lse=True)
        cu = [a.cuda() if a is not None else None for a in args]
        gpu = paged_attention(*cu[:6], qo_indptr=cu[6], causal=causal, return_lse=True)
        torch.testing.assert_close(gpu[0].cpu().float(), cpu[0].float(), **OUT_TOL[dtype])
        torch.testing.assert_close(gpu[1].cpu(), cpu[1], atol=1e-4, rtol=1e-4)
        check(*cu[:6], qo=cu[6], causal=causal)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_merge_append_copy_match_cpu(dtype):
    a, la = _states(17, 5, 128, dtype, 1, empty_rows=(0, 3))
    b, lb = _states(17, 5, 128, dtype, 2, empty_rows=(0, 4))
    cpu = merge_attention_states(a, la, b, lb)
    gpu = merge_attention_states(a.cuda(), la.cuda(), b.cuda(), lb.cuda())
    torch.testing.assert_close(gpu[0].cpu().float(), cpu[0].float(), **OUT_TOL[dtype])
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], atol=1e-5, rtol=1e-5)
    o, l = a.cuda(), la.cuda()
    merge_attention_states_(o, l, b.cuda(), lb.cuda())
    torch.testing.assert_close(o.cpu().float(), cpu[0].float(), **OUT_TOL[dtype])
    torch.testing.assert_close(l.cpu(), cpu[1], atol=1e-5, rtol=1e-5)
    q, k, v, ip, ix, last, _ = make_problem([5, 9, 16], 4, 2, 2, 64, dtype)
    kn, vn = torch.randn(3, 2, 64).to(dtype), torch.randn(3, 2, 64).to(dtype)
    kc, vc = k.cuda(), v.cuda()
    append_paged_kv(kn, vn, k, v, ip, ix, last)
    append_paged_kv(kn.cuda(), vn.cuda(), kc, vc, ip.cuda(), ix.cuda(), last.cuda())
    assert torch.equal(kc.cpu(), k) and torch.equal(vc.cpu(), v)
    free = sorted(set(range(k.shape[0])) - set(ix.tolist()))
    src, dst = ix[:2].long(), torch.tensor(free[:2])
    copy_pages(k, v, src, dst)
    copy_pages(kc, vc, src.cuda(), dst.cuda())
    assert torch.equal(kc.cpu(), k) and torch.equal(vc.cpu(), v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_error_at_most_twice_torch_in_same_dtype(cpu_isa, dtype):
    # the bound: no more than 2x the error plain torch (SDPA on the gathered KV, in `dtype`)
    # makes against the float64 reference
    lens = [17, 127, 1000]
    q, k, v, ip, ix, last, _ = make_problem(lens, 16, 8, 2, 128, dtype, seed=21)
    out = paged_attention(q, k, v, ip, ix, last)
    ref, _ = paged_attention_ref(q, k, v, ip, ix, last)
    ours = (out.double() - ref).abs().max().item()
    theirs = 0.0
    for b in range(len(lens)):
        kb = gather_kv(k, ip, ix, last, b).transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
        vb = gather_kv(v, ip, ix, last, b).transpose(0, 1).unsqueeze(0)
        o = torch.nn.functional.scaled_dot_product_attention(q[b:b + 1].unsqueeze(2), kb, vb, enable_gqa=True)
        theirs = max(theirs, (o[0, :, 0].double() - ref[b]).abs().max().item())
    assert ours <= 2 * theirs + 1e-6, (ours, theirs)
