"""SharedPrefixDecode == plain per-branch paged decode (two levels, multi-level trees, empty suffixes)."""
import math

import pytest
import torch

from ttscale.attention import Level, SharedPrefixDecode, shared_prefix_decode
from ttscale.ops import paged_attention
from ttscale.reference.paged_attention import paged_attention_ref

from conftest import DEVICES

OUT_TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=4e-3),   # output rounded once per level merge (2^-11 each)
    torch.bfloat16: dict(atol=1.6e-2, rtol=3.2e-2),  # 2^-8 per level merge
}


class Tree:
    """Pages for a search tree: levels of groups, each group owning a run of pages; a branch's full
    sequence is the concatenation of its groups' pages from the root down (all levels page-aligned
    except the last one of each branch, which is its own)."""

    def __init__(self, page_size, Hkv, D, dtype, num_pages=512, seed=0):
        self.g = torch.Generator().manual_seed(seed)
        self.ps = page_size
        self.k = torch.randn(num_pages, page_size, Hkv, D, generator=self.g).to(dtype)
        self.v = torch.randn(num_pages, page_size, Hkv, D, generator=self.g).to(dtype)
        self.free = torch.randperm(num_pages, generator=self.g).tolist()

    def pages(self, ntok):
        n = (ntok + self.ps - 1) // self.ps
        out, self.free = self.free[:n], self.free[n:]
        return out

    def level(self, qo, lens, last_level=False):
        """groups with token counts `lens`; shared levels must be whole pages (except the last level)."""
        pages = []
        for n in lens:
            assert last_level or n % self.ps == 0
            pages.append(self.pages(n))
        ip = torch.tensor([0] + torch.tensor([len(p) for p in pages]).cumsum(0).tolist(), dtype=torch.int32)
        ix = torch.tensor(sum(pages, []), dtype=torch.int32)
        last = torch.tensor([(n - (len(p) - 1) * self.ps) if p else 0 for n, p in zip(lens, pages)], dtype=torch.int32)
        return Level(torch.tensor(qo, dtype=torch.int32), ip, ix, last), pages, lens


def flatten(levels, n_branches, page_size):
    """Per-branch CSR page table of the full sequences (for the plain decode baseline)."""
    per = [[] for _ in range(n_branches)]
    tok = [0] * n_branches
    for (lv, pages, lens) in levels:
        qo = lv.qo_indptr.tolist()
        for g in range(len(qo) - 1):
            for b in range(qo[g], qo[g + 1]):
                per[b] += pages[g]
                tok[b] += lens[g]
    ip = torch.tensor([0] + torch.tensor([len(p) for p in per]).cumsum(0).tolist(), dtype=torch.int32)
    ix = torch.tensor(sum(per, []), dtype=torch.int32)
    last = torch.tensor([t - (len(p) - 1) * page_size if p else 0 for t, p in zip(tok, per)], dtype=torch.int32)
    return ip, ix, last


def compare(tree, levels, N, Hq, D, dtype, device, softcap=0.0):
    q = torch.randn(N, Hq, D, generator=tree.g).to(dtype)
    ip, ix, last = flatten(levels, N, tree.ps)
    spd = SharedPrefixDecode().plan([lv for lv, _, _ in levels], device=device)
    out, lse = spd.run(q.to(device), tree.k.to(device), tree.v.to(device), softcap=softcap, return_lse=True)
    plain, plain_lse = paged_attention(q.to(device), tree.k.to(device), tree.v.to(device), ip.to(device),
                                       ix.to(device), last.to(device), softcap=softcap, return_lse=True)
    ref, ref_lse = paged_attention_ref(q, tree.k, tree.v, ip, ix, last, softcap=softcap)
    torch.testing.assert_close(out.cpu().double(), ref, **OUT_TOL[dtype])
    torch.testing.assert_close(plain.cpu().double(), ref, **OUT_TOL[dtype])
    torch.testing.assert_close(lse.cpu(), plain_lse.cpu(), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=2e-5, rtol=2e-5)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page_size", [1, 16])
def test_two_level_with_empty_suffixes(cpu_isa, device, dtype, page_size):
    N, Hq, Hkv, D = 13, 8, 2, 64
    tree = Tree(page_size, Hkv, D, dtype, num_pages=2048 if page_size == 1 else 256)
    suffix = [5, 0, 17, 1, 0, 33, 2, 16, 0, 7, 1, 64, 3]
    levels = [tree.level([0, N], [256]), tree.level(list(range(N + 1)), suffix, last_level=True)]
    compare(tree, levels, N, Hq, D, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
def test_multi_level_tree(device):
    # root prompt -> 3 partial steps shared by groups of 4, 1, 3 branches -> private suffixes
    N, Hq, Hkv, D, ps = 8, 8, 2, 128, 16
    tree = Tree(ps, Hkv, D, torch.float32, seed=1)
    levels = [
        tree.level([0, N], [160]),
        tree.level([0, 4, 5, 8], [48, 0, 32]),            # the middle group has no shared step (empty)
        tree.level([0, 2, 4, 5, 8], [16, 32, 16, 64]),    # a deeper level
        tree.level(list(range(N + 1)), [3, 0, 9, 16, 1, 0, 30, 2], last_level=True),
    ]
    compare(tree, levels, N, Hq, D, torch.float32, device, softcap=4.0)


def test_single_level_equals_plain_decode():
    tree = Tree(16, 2, 64, torch.float32, seed=2)
    lv = tree.level(list(range(4)), [17, 0, 40], last_level=True)
    compare(tree, [lv], 3, 4, 64, torch.float32, "cpu")


def test_shared_prefix_64_branches_gqa4():
    # the benchmark's shape, scaled down: 64 branches, shared prefix + 8-token suffixes
    N, Hq, Hkv, D, ps = 64, 8, 2, 128, 16
    tree = Tree(ps, Hkv, D, torch.bfloat16, num_pages=128, seed=3)
    levels = [tree.level([0, N], [512]), tree.level(list(range(N + 1)), [8] * N, last_level=True)]
    compare(tree, levels, N, Hq, D, torch.bfloat16, "cpu")


def test_plan_is_reusable_and_helper():
    tree = Tree(16, 2, 64, torch.float32, seed=4)
    levels = [tree.level([0, 3], [32]), tree.level([0, 1, 2, 3], [5, 0, 9], last_level=True)]
    spd = SharedPrefixDecode().plan([lv for lv, _, _ in levels])
    q1, q2 = torch.randn(3, 4, 64), torch.randn(3, 4, 64)
    a = spd.run(q1, tree.k, tree.v)
    b = spd.run(q2, tree.k, tree.v)
    assert not torch.equal(a, b)
    torch.testing.assert_close(shared_prefix_decode(q2, tree.k, tree.v, [lv for lv, _, _ in levels]), b, atol=0, rtol=0)


def test_bad_plan():
    tree = Tree(16, 2, 64, torch.float32, seed=5)
    lv0, _, _ = tree.level([0, 3], [32])
    lv1, _, _ = tree.level([0, 1, 2], [5, 9], last_level=True)
    with pytest.raises(ValueError, match="every level must cover all branches"):
        SharedPrefixDecode().plan([lv0, lv1])
    with pytest.raises(ValueError, match="at least one level"):
        SharedPrefixDecode().plan([])
    with pytest.raises(RuntimeError, match="before plan"):
        SharedPrefixDecode().run(torch.randn(3, 4, 64), tree.k, tree.v)
    spd = SharedPrefixDecode().plan([lv0])
    with pytest.raises(ValueError, match="num_branches=3"):
        spd.run(torch.randn(2, 4, 64), tree.k, tree.v)
    assert math.isfinite(spd.run(torch.randn(3, 4, 64), tree.k, tree.v).sum().item())
