"""new_page_summaries, update_page_summaries, sparse_paged_attention, attention_mass, and the summaries
kept by append_paged_kv / copy_pages.

References (python/ttscale/reference/sparse_paged_attention.py) are float64 and given the same stored
values. The sparse output is checked against dense attention restricted to the page set the kernel
selected (float64), and the selection itself against float64 Quest scores: every kept page must
score at least as high as every dropped one, up to the float32 rounding of the scores (exact
agreement with the reference order is not required on near ties). Sizes are awkward (odd page
sizes, partial last pages, GQA groups 1/4/8, head dims 64/128/256, batches with empty and short
sequences), and every CPU SIMD path runs through the ``cpu_isa`` fixture.
"""
import math

import pytest
import torch

from ttscale.ops import (append_paged_kv, attention_mass, copy_pages, new_page_summaries, paged_attention,
                         sparse_paged_attention, update_page_summaries)
from ttscale.reference.paged_attention import build_page_table, kv_lens
from ttscale.reference.sparse_paged_attention import (attention_mass_ref, page_lens_of, page_summaries_ref,
                                                      quest_scores_ref, select_ref, sparse_attention_ref)

from conftest import CUDA, DEVICES, DTYPES

OUT_TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=1e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=8e-3, rtol=1.6e-2),
}
LSE_TOL = dict(atol=2e-5, rtol=2e-5)


def make_problem(lens, page_size, Hq, Hkv, D, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ip, ix, last, P = build_page_table(lens, page_size, generator=g)
    k = torch.randn(P, page_size, Hkv, D, generator=g).to(dtype)
    v = torch.randn(P, page_size, Hkv, D, generator=g).to(dtype)
    q = torch.randn(len(lens), Hq, D, generator=g).to(dtype)
    return tuple(t.to(device) for t in (q, k, v, ip, ix, last))


def summaries_for(k, ip, ix, last):
    return new_page_summaries(k, page_lens_of(k.shape[0], k.shape[1], ip.cpu(), ix.cpu(), last.cpu()).to(k.device))


def check_summaries(s, k, page_lens=None):
    ref = page_summaries_ref(k.cpu(), page_lens)
    assert s.dtype == k.dtype and s.shape == (k.shape[0], 3, k.shape[2], k.shape[3])
    # min and max are stored key values: exact
    assert torch.equal(s[:, :2].cpu().double(), ref[:, :2])
    # mean: float32 sum rounded once to the cache dtype
    eps = {torch.float32: 1e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[k.dtype]
    torch.testing.assert_close(s[:, 2].cpu().double(), ref[:, 2], atol=1e-5, rtol=eps)


def check_selection(sel, q, s, ip, ix, top_k, sink, local):
    """Kept pages follow the rule: sink + local + top-k of the rest by float64 Quest score (near ties
    may differ by the float32 rounding of the kernel's scores)."""
    B, Hkv, budget = sel.shape
    assert budget == top_k + sink + local
    ipl = ip.tolist()
    for b in range(B):
        np_ = ipl[b + 1] - ipl[b]
        if np_ == 0:
            assert torch.all(sel[b] == -1)
            continue
        sc = quest_scores_ref(q.cpu(), s.cpu(), ip.cpu(), ix.cpu(), b)
        ref = select_ref(sc, top_k, sink, local)
        for h in range(Hkv):
            got = [j for j in sel[b, h].tolist() if j >= 0]
            assert got == sorted(got) and len(set(got)) == len(got)
            assert all(j == -1 for j in sel[b, h].tolist()[len(got):])
            want = [j for j in ref[h].tolist() if j >= 0]
            assert len(got) == len(want)
            if np_ <= budget:
                assert got == list(range(np_))
                continue
            assert set(range(sink)) <= set(got) and set(range(np_ - local, np_)) <= set(got)
            mid_kept = [j for j in got if sink <= j < np_ - local]
            mid_drop = [j for j in range(sink, np_ - local) if j not in got]
            if mid_kept and mid_drop:
                lo = min(float(sc[j, h]) for j in mid_kept)
                hi = max(float(sc[j, h]) for j in mid_drop)
                assert lo >= hi - 1e-4 * (1 + abs(hi)), (b, h, lo, hi)


def run_and_check(q, k, v, ip, ix, last, *, top_k, sink=1, local=1, s=None, scale=None):
    s = summaries_for(k, ip, ix, last) if s is None else s
    out, lse, sel = sparse_paged_attention(q, k, v, s, ip, ix, last, top_k_pages=top_k, sink_pages=sink,
                                           local_pages=local, scale=scale, return_lse=True, return_selected=True)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.dtype == torch.float32 and sel.dtype == torch.int32
    check_selection(sel.cpu(), q, s, ip.cpu(), ix.cpu(), top_k, sink, local)
    ro, rl = sparse_attention_ref(q.cpu(), k.cpu(), v.cpu(), ip.cpu(), ix.cpu(), last.cpu(), sel.cpu(), scale=scale)
    torch.testing.assert_close(out.cpu().double(), ro, **OUT_TOL[q.dtype])
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(rl))
    fin = torch.isfinite(rl)
    torch.testing.assert_close(lse.cpu().double()[fin], rl[fin], **LSE_TOL)
    return out, lse, sel


# --------------------------------------------------------------------------- summaries
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 7, 16])
def test_new_page_summaries(cpu_isa, dtype, page_size):
    k = torch.randn(13, page_size, 3, 64).to(dtype)
    check_summaries(new_page_summaries(k), k)
    lens = torch.randint(1, page_size + 1, (13,))
    check_summaries(new_page_summaries(k, lens), k, lens)


def test_update_page_summaries_only_touches_given_pages():
    k = torch.randn(9, 5, 2, 128)
    s = new_page_summaries(k)
    k2 = k.clone()
    k2[[2, 6]] = torch.randn(2, 5, 2, 128)
    before = s.clone()
    update_page_summaries(k2, s, torch.tensor([6, 2]), torch.tensor([3, 5]))
    lens = torch.full((9,), 5)
    lens[6] = 3
    ref_s = new_page_summaries(k2, lens)
    assert torch.equal(s[[2, 6]], ref_s[[2, 6]])
    untouched = [0, 1, 3, 4, 5, 7, 8]
    assert torch.equal(s[untouched], before[untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["one_per_seq", "append_indptr", "positions"])
def test_summaries_exact_after_appends(dtype, mode):
    # grow three sequences token by token / chunk by chunk from empty pages; summaries maintained by
    # append_paged_kv must equal fresh summaries over the valid tokens (partial last pages included)
    ps, Hkv, D, P = 6, 2, 64, 40
    k = torch.randn(P, ps, Hkv, D).to(dtype)  # stale garbage in unwritten slots
    v = torch.randn(P, ps, Hkv, D).to(dtype)
    s = new_page_summaries(k)
    free = torch.randperm(P).tolist()
    seqs = [[], [], []]  # pages
    lens = [0, 0, 0]
    g = torch.Generator().manual_seed(1)
    for step in range(9):
        n_new = [1, 1, 1] if mode == "one_per_seq" else [int(x) for x in torch.randint(0, 8, (3,), generator=g)]
        for b in range(3):
            lens[b] += n_new[b]
            while len(seqs[b]) * ps < lens[b]:
                seqs[b].append(free.pop())
        ip = torch.tensor([0] + list(torch.tensor([len(p) for p in seqs]).cumsum(0)), dtype=torch.int32)
        ix = torch.tensor(sum(seqs, []), dtype=torch.int32)
        last = torch.tensor([l - (len(p) - 1) * ps if p else 0 for l, p in zip(lens, seqs)], dtype=torch.int32)
        N = sum(n_new)
        kn, vn = torch.randn(N, Hkv, D).to(dtype), torch.randn(N, Hkv, D).to(dtype)
        if mode == "one_per_seq":
            append_paged_kv(kn, vn, k, v, ip, ix, last, summaries=s)
        elif mode == "append_indptr":
            ap = torch.tensor([0] + list(torch.tensor(n_new).cumsum(0)), dtype=torch.int32)
            append_paged_kv(kn, vn, k, v, ip, ix, last, append_indptr=ap, summaries=s)
        else:
            bi = torch.tensor(sum([[b] * n for b, n in enumerate(n_new)], []), dtype=torch.int64)
            pos = torch.tensor(sum([list(range(lens[b] - n, lens[b])) for b, n in enumerate(n_new)], []),
                               dtype=torch.int64)
            perm = torch.randperm(N)
            append_paged_kv(kn[perm], vn[perm], k, v, ip, ix, last, batch_indices=bi[perm], positions=pos[perm],
                            summaries=s)
        used = ix.long()
        pl = page_lens_of(P, ps, ip, ix, last)
        ref = page_summaries_ref(k, pl)
        assert torch.equal(s[used, :2].double(), ref[used, :2])
        fresh = new_page_summaries(k, pl)
        assert torch.equal(s[used], fresh[used])  # bit for bit, mean included


def test_summaries_after_fork_mid_page():
    # branch B forks from A in the middle of A's last page: copy-on-write copies the page and its
    # summary; then both append different tokens; every page's summary stays exact
    ps, Hkv, D = 8, 2, 64
    k, v = torch.randn(10, ps, Hkv, D), torch.randn(10, ps, Hkv, D)
    ip = torch.tensor([0, 2], dtype=torch.int32)
    ix = torch.tensor([3, 5], dtype=torch.int32)
    last = torch.tensor([5], dtype=torch.int32)
    s = new_page_summaries(k, page_lens_of(10, ps, ip, ix, last))
    copy_pages(k, v, torch.tensor([5]), torch.tensor([7]), summaries=s)
    assert torch.equal(s[7], s[5])
    ip2 = torch.tensor([0, 2, 4], dtype=torch.int32)
    ix2 = torch.tensor([3, 5, 3, 7], dtype=torch.int32)  # B shares page 3, owns the copy 7
    for step in range(6):
        last2 = torch.tensor([6 + step, 6 + step], dtype=torch.int32).clamp(max=ps)
        if step >= 3:  # both spill into a new page
            ip2 = torch.tensor([0, 3, 6], dtype=torch.int32)
            ix2 = torch.tensor([3, 5, 1, 3, 7, 2], dtype=torch.int32)
            last2 = torch.tensor([step - 2, step - 2], dtype=torch.int32)
        append_paged_kv(torch.randn(2, Hkv, D), torch.randn(2, Hkv, D), k, v, ip2, ix2, last2, summaries=s)
        pl = page_lens_of(10, ps, ip2, ix2, last2)
        used = ix2.long().unique()
        assert torch.equal(s[used], new_page_summaries(k, pl)[used])
    assert not torch.equal(s[5], s[7])


# --------------------------------------------------------------------------- sparse decode
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size,group,D", [(1, 1, 64), (16, 4, 128), (5, 8, 256), (3, 4, 64)])
def test_sparse_matches_reference_on_selected(cpu_isa, dtype, page_size, group, D):
    Hkv = 2
    lens = [1, 2, 17, 127, 1000, 0]
    run_and_check(*make_problem(lens, page_size, Hkv * group, Hkv, D, dtype, seed=group + D), top_k=5, sink=2,
                  local=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_budget_covers_all_pages_equals_dense(cpu_isa, dtype):
    q, k, v, ip, ix, last = make_problem([1, 33, 97, 200, 0], 16, 8, 2, 128, dtype, seed=4)
    s = summaries_for(k, ip, ix, last)
    out, lse, sel = sparse_paged_attention(q, k, v, s, ip, ix, last, top_k_pages=11, sink_pages=1, local_pages=1,
                                           return_lse=True, return_selected=True)
    dense, dlse = paged_attention(q, k, v, ip, ix, last, return_lse=True)
    torch.testing.assert_close(out.float(), dense.float(), **OUT_TOL[dtype])
    fin = torch.isfinite(dlse)
    torch.testing.assert_close(lse[fin], dlse[fin], atol=2e-5, rtol=2e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(dlse))
    npg = (ip[1:] - ip[:-1]).tolist()
    for b, n in enumerate(npg):
        assert sel[b, :, :n].tolist() == [list(range(n))] * 2 and torch.all(sel[b, :, n:] == -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_short_sequences_in_a_sparse_batch_equal_dense(cpu_isa, dtype):
    # the batch has one long sequence, so the sparse kernels run; the short ones must still equal dense
    q, k, v, ip, ix, last = make_problem([1, 33, 97, 200, 0, 3000], 16, 8, 2, 128, dtype, seed=5)
    out, lse, sel = run_and_check(q, k, v, ip, ix, last, top_k=11)
    dense, dlse = paged_attention(q, k, v, ip, ix, last, return_lse=True)
    torch.testing.assert_close(out[:5].float(), dense[:5].float(), **OUT_TOL[dtype])
    fin = torch.isfinite(dlse[:5])
    torch.testing.assert_close(lse[:5][fin], dlse[:5][fin], atol=2e-5, rtol=2e-5)
    assert not torch.allclose(out[5].float(), dense[5].float(), atol=1e-2)  # the long one is sparse


@pytest.mark.parametrize("top_k,sink,local", [(0, 0, 1), (3, 0, 0), (0, 0, 0), (7, 3, 4), (1, 1, 1)])
def test_budget_variants(top_k, sink, local):
    run_and_check(*make_problem([300, 45, 7], 4, 8, 2, 64, torch.float32, seed=top_k), top_k=top_k, sink=sink,
                  local=local)


def test_long_sequence_split_matches_single_thread(cpu_isa):
    args = make_problem([6000], 16, 4, 1, 128, torch.float32, seed=3)
    out2, lse2, sel2 = run_and_check(*args, top_k=100)
    s = summaries_for(*args[1:2], *args[3:])
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out1, lse1, sel1 = sparse_paged_attention(*args[:3], s, *args[3:], top_k_pages=100, return_lse=True,
                                                  return_selected=True)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(sel1, sel2)
    torch.testing.assert_close(out1, out2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse1, lse2, atol=1e-6, rtol=1e-6)


def test_branches_sharing_prefix_pages_share_summaries(cpu_isa):
    # 5 branches point at the same 40 prefix pages, each with its own suffix pages; one summaries
    # tensor serves all of them
    ps, Hkv, D, n_pre = 8, 2, 64, 40
    g = torch.Generator().manual_seed(11)
    P = n_pre + 5 * 6
    k, v = torch.randn(P, ps, Hkv, D, generator=g), torch.randn(P, ps, Hkv, D, generator=g)
    pre = list(range(n_pre))
    ix, ip, last = [], [0], []
    for b in range(5):
        ix += pre + list(range(n_pre + 6 * b, n_pre + 6 * b + b + 1))
        ip.append(len(ix))
        last.append(1 + (3 * b) % ps)
    ip, ix, last = (torch.tensor(x, dtype=torch.int32) for x in (ip, ix, last))
    q = torch.randn(5, 8, D, generator=g)
    run_and_check(q, k, v, ip, ix, last, top_k=6, sink=2, local=2)


def planted(L, page_size, Hq, Hkv, D, dtype, hot, seed=0, strength=4.0):
    """One sequence whose pages `hot` hold keys aligned with the query (per KV head, the mean of its
    group's query directions), so they get most of the attention."""
    g = torch.Generator().manual_seed(seed)
    n_pages = (L + page_size - 1) // page_size
    ip = torch.tensor([0, n_pages], dtype=torch.int32)
    ix = torch.randperm(n_pages + 5, generator=g)[:n_pages].to(torch.int32)
    last = torch.tensor([L - (n_pages - 1) * page_size], dtype=torch.int32)
    k = torch.randn(n_pages + 5, page_size, Hkv, D, generator=g)
    v = torch.randn(n_pages + 5, page_size, Hkv, D, generator=g)
    q = torch.randn(1, Hq, D, generator=g)
    grp = Hq // Hkv
    dirs = q[0].view(Hkv, grp, D).mean(1)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    for j in hot:
        k[ix[j]] += strength * math.sqrt(D) * dirs.unsqueeze(0) * torch.rand(page_size, 1, 1, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype), ip, ix, last


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selection_finds_planted_pages(cpu_isa, dtype):
    hot = [5, 17, 40, 41, 77, 90, 123]
    q, k, v, ip, ix, last = planted(130 * 16 - 5, 16, 8, 2, 128, dtype, hot)
    _, _, sel = run_and_check(q, k, v, ip, ix, last, top_k=len(hot))
    for h in range(2):
        assert set(hot) <= set(sel[0, h].tolist())
    # and they carry most of the attention, which attention_mass measures
    mass = attention_mass(q, k, ip, ix, last, sel).sum(-1)
    assert torch.all(mass > 0.9), mass


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_mass_matches_reference(cpu_isa, dtype):
    q, k, v, ip, ix, last = make_problem([1, 50, 333, 0], 7, 8, 2, 64, dtype, seed=9)
    npg = (ip[1:] - ip[:-1]).tolist()
    g = torch.Generator().manual_seed(2)
    pages = torch.full((4, 2, 6), -1, dtype=torch.int32)
    for b, n in enumerate(npg):
        for h in range(2):
            m = min(n, 6)
            if m:
                pages[b, h, :m] = torch.randperm(n, generator=g)[:m].to(torch.int32)
    mass = attention_mass(q, k, ip, ix, last, pages)
    ref = attention_mass_ref(q, k, ip, ix, last, pages)
    assert mass.dtype == torch.float32 and mass.shape == (4, 8, 6)
    torch.testing.assert_close(mass.double(), ref, atol=2e-6, rtol=1e-4)
    # all pages of a sequence: mass sums to 1
    allp = torch.full((4, 2, 48), -1, dtype=torch.int32)
    for b, n in enumerate(npg):
        allp[b, :, :n] = torch.arange(n, dtype=torch.int32)
    tot = attention_mass(q, k, ip, ix, last, allp).sum(-1)
    for b, n in enumerate(npg):
        torch.testing.assert_close(tot[b], torch.full_like(tot[b], 1.0 if n else 0.0), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- CUDA vs CPU
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and a CUDA build of ttscale")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype):
    lens = [1, 2, 17, 127, 1000, 0, 5000]
    q, k, v, ip, ix, last = make_problem(lens, 16, 8, 2, 128, dtype, seed=13)
    pl = page_lens_of(k.shape[0], 16, ip, ix, last)
    s_cpu = new_page_summaries(k, pl)
    dev = [t.cuda() for t in (q, k, v, ip, ix, last)]
    s_gpu = new_page_summaries(dev[1], pl.cuda())
    assert torch.equal(s_gpu.cpu(), s_cpu)  # the same TT_HD arithmetic on both devices
    _, _, sel = run_and_check(*dev, top_k=7, sink=1, local=2, s=s_gpu)
    _, _, sel_cpu = sparse_paged_attention(q, k, v, s_cpu, ip, ix, last, top_k_pages=7, sink_pages=1, local_pages=2,
                                           return_lse=True, return_selected=True)
    # scores are summed in a different order on the GPU: only near ties may pick different pages
    assert (sel.cpu() == sel_cpu).float().mean() > 0.95
    mass = attention_mass(dev[0], dev[1], dev[3], dev[4], dev[5], sel)
    torch.testing.assert_close(mass.cpu().double(), attention_mass_ref(q, k, ip, ix, last, sel.cpu()), atol=2e-6,
                               rtol=1e-4)
    bi = [b for b, n in enumerate(lens) if n > 0]  # overwrite each non-empty sequence's last token
    kn, vn = torch.randn(len(bi), 2, 128).to(dtype).cuda(), torch.randn(len(bi), 2, 128).to(dtype).cuda()
    append_paged_kv(kn, vn, dev[1], dev[2], dev[3], dev[4], dev[5], batch_indices=torch.tensor(bi).cuda(),
                    positions=torch.tensor([lens[b] - 1 for b in bi]).cuda(), summaries=s_gpu)
    used = ix[(ip[1:] - 1).clamp(min=0)[torch.tensor(lens) > 0]].long()
    assert torch.equal(s_gpu.cpu()[used], new_page_summaries(dev[1].cpu(), pl)[used])


# --------------------------------------------------------------------------- opcheck / compile / bad input
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    q, k, v, ip, ix, last = make_problem([40, 9], 4, 4, 2, 64, torch.float32, device=device)
    s = new_page_summaries(k)
    torch.library.opcheck(torch.ops.ttscale.new_page_summaries.default, (k, None))
    torch.library.opcheck(torch.ops.ttscale.update_page_summaries.default,
                          (k, s.clone(), torch.tensor([1, 3], device=device), None))
    torch.library.opcheck(torch.ops.ttscale.sparse_paged_attention.default, (q, k, v, s, ip, ix, last, 2, 1, 1, 0.125))
    pages = torch.tensor([[[0, 2], [1, -1]], [[0, 1], [2, 1]]], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.ttscale.attention_mass.default, (q, k, ip, ix, last, pages, 0.125))
    kn, vn = torch.randn(2, 2, 64, device=device), torch.randn(2, 2, 64, device=device)
    torch.library.opcheck(torch.ops.ttscale.append_paged_kv.default,
                          (kn, vn, k, v, ip, ix, last, None, None, None, s.clone()))
    free = sorted(set(range(k.shape[0])) - set(ix.tolist()))
    torch.library.opcheck(torch.ops.ttscale.copy_pages.default,
                          (k, v, ix[:1].clone(), torch.tensor([free[0]], dtype=torch.int32, device=device), s.clone()))


def test_torch_compile_fullgraph():
    q, k, v, ip, ix, last = make_problem([70, 33], 4, 8, 2, 64, torch.float32)
    kn, vn = torch.randn(2, 2, 64), torch.randn(2, 2, 64)

    def f(q, k, v, ip, ix, last, kn, vn):
        s = new_page_summaries(k)
        append_paged_kv(kn, vn, k, v, ip, ix, last, summaries=s)
        out, lse, sel = sparse_paged_attention(q, k, v, s, ip, ix, last, top_k_pages=3, return_lse=True,
                                               return_selected=True)
        return out * 2, lse, sel, attention_mass(q, k, ip, ix, last, sel)

    k1, v1, k2, v2 = k.clone(), v.clone(), k.clone(), v.clone()
    want = f(q, k1, v1, ip, ix, last, kn, vn)
    got = torch.compile(f, fullgraph=True, backend="inductor")(q, k2, v2, ip, ix, last, kn, vn)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert torch.equal(k1, k2)


def _good():
    q, k, v, ip, ix, last = make_problem([40, 9], 4, 4, 2, 64, torch.float32)
    return dict(q=q, k=k, v=v, s=new_page_summaries(k), ip=ip, ix=ix, last=last, top_k=2, sink=1, local=1)


BAD = [
    ("negative top_k", lambda a: a.update(top_k=-1), ValueError, "top_k_pages must be >= 0"),
    ("negative sink", lambda a: a.update(sink=-2), ValueError, "sink_pages must be >= 0"),
    ("negative local", lambda a: a.update(local=-1), ValueError, "local_pages must be >= 0"),
    ("summaries shape", lambda a: a.update(s=a["s"][:, :2]), RuntimeError, r"summaries must have shape"),
    ("summaries pages", lambda a: a.update(s=a["s"][:-1]), RuntimeError, r"summaries must have shape"),
    ("summaries dtype", lambda a: a.update(s=a["s"].double()), RuntimeError, "summaries dtype"),
    ("q 2-D", lambda a: a.update(q=a["q"][0]), RuntimeError, "q must be 3-D"),
    ("q dtype", lambda a: a.update(q=a["q"].half()), RuntimeError, "must match q dtype"),
    ("decode rows", lambda a: a.update(q=a["q"][:1]), RuntimeError, "one row per sequence"),
    ("indices range", lambda a: a.update(ix=a["ix"] + 1000), ValueError, "out of range"),
    ("indptr dtype", lambda a: a.update(ip=a["ip"].long()), RuntimeError, "kv_indptr must be int32"),
    ("last len", lambda a: a.update(last=a["last"] * 0 + 9), ValueError, "kv_last_page_len"),
]


@pytest.mark.parametrize("name,mutate,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, mutate, exc, match):
    a = _good()
    mutate(a)
    with pytest.raises(exc, match=match):
        sparse_paged_attention(a["q"], a["k"], a["v"], a["s"], a["ip"], a["ix"], a["last"], top_k_pages=a["top_k"],
                               sink_pages=a["sink"], local_pages=a["local"])


def test_bad_summaries_and_mass_inputs():
    a = _good()
    with pytest.raises(ValueError, match="page_lens"):
        new_page_summaries(a["k"], torch.zeros(a["k"].shape[0], dtype=torch.int32))
    with pytest.raises(ValueError, match="pages"):
        update_page_summaries(a["k"], a["s"], torch.tensor([a["k"].shape[0]]))
    with pytest.raises(ValueError, match="page 1 more than once"):
        update_page_summaries(a["k"], a["s"], torch.tensor([1, 0, 1]), torch.tensor([3, 4, 2]))
    with pytest.raises(RuntimeError, match="summaries must have shape"):
        update_page_summaries(a["k"], a["s"][:, :1], torch.tensor([0]))
    with pytest.raises(RuntimeError, match="summaries dtype"):
        append_paged_kv(torch.randn(2, 2, 64), torch.randn(2, 2, 64), a["k"], a["v"], a["ip"], a["ix"], a["last"],
                        summaries=a["s"].half())
    with pytest.raises(RuntimeError, match=r"pages must have shape"):
        attention_mass(a["q"], a["k"], a["ip"], a["ix"], a["last"], torch.zeros(2, 3, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="must be -1 or a page index"):
        attention_mass(a["q"], a["k"], a["ip"], a["ix"], a["last"], torch.full((2, 2, 1), 50, dtype=torch.int32))
