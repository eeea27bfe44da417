"""KVPool: refcounts, free list, copy-on-write, exhaustion; property-based with hypothesis.

Every token written gets a unique marker value in its K and V slots (different per layer), so after
any sequence of fork / extend / release the test can read each live sequence back through its page
table and compare it with the tokens it should hold: a page shared wrongly, copied wrongly or freed
too early shows up as a wrong marker.
"""
import pytest
import torch

from ttscale import ops
from ttscale.engine import KVPool, KVPoolExhausted

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

L, HKV, D = 2, 1, 64


class Model:
    """The pool plus, per sequence, the markers it must hold."""

    def __init__(self, num_pages, page_size):
        self.pool = KVPool(L, num_pages, page_size, HKV, D)
        self.content = {}
        self.next_marker = 1.0

    def new(self):
        s = self.pool.new_sequence()
        self.content[s] = []
        return s

    def extend(self, s, n):
        self.pool.reserve([s], [n])
        marks = [self.next_marker + i for i in range(n)]
        self.next_marker += n
        pages = torch.tensor(self.pool.pages(s), dtype=torch.int32)
        indptr = torch.tensor([0, len(pages)], dtype=torch.int32)
        last = torch.tensor([self.pool.last_page_len(s)], dtype=torch.int32)
        for layer in range(L):
            k = torch.tensor(marks).view(n, 1, 1).expand(n, HKV, D) + 1000 * layer
            ops.append_paged_kv(k, -k, self.pool.k_cache(layer), self.pool.v_cache(layer), indptr, pages, last,
                                append_indptr=torch.tensor([0, n], dtype=torch.int32))
        self.content[s].extend(marks)

    def check(self):
        self.pool.check_invariants()
        ps = self.pool.page_size
        for s, marks in self.content.items():
            assert self.pool.length(s) == len(marks)
            pages = self.pool.pages(s)
            for layer in range(L):
                kc, vc = self.pool.k_cache(layer), self.pool.v_cache(layer)
                got_k = [kc[pages[i // ps], i % ps, 0, 0].item() for i in range(len(marks))]
                got_v = [vc[pages[i // ps], i % ps, 0, 3].item() for i in range(len(marks))]
                exp = [m + 1000 * layer for m in marks]
                assert got_k == exp, f"seq {s} layer {layer}"
                assert got_v == [-x for x in exp]


ops_strategy = st.lists(st.tuples(st.sampled_from(["new", "extend", "fork", "release"]), st.integers(0, 10 ** 6),
                                  st.integers(1, 7)), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(page_size=st.sampled_from([1, 3, 4, 16]), num_pages=st.integers(4, 40), actions=ops_strategy)
def test_random_fork_extend_release(page_size, num_pages, actions):
    m = Model(num_pages, page_size)
    for kind, pick, n in actions:
        live = list(m.content)
        if kind == "new" or not live:
            m.new()
        elif kind == "extend":
            s = live[pick % len(live)]
            before = (m.pool.num_free, m.pool.length(s), list(m.pool.pages(s)))
            try:
                m.extend(s, n)
            except KVPoolExhausted as e:
                assert "pages needed" in str(e) and f"of {num_pages} total" in str(e)
                assert (m.pool.num_free, m.pool.length(s), list(m.pool.pages(s))) == before  # all or nothing
        elif kind == "fork":
            s = live[pick % len(live)]
            for c in m.pool.fork(s, n % 4):
                m.content[c] = list(m.content[s])
        else:
            s = live[pick % len(live)]
            m.pool.release(s)
            del m.content[s]
        m.check()
    for s in list(m.content):
        m.pool.release(s)
    m.pool.check_invariants()
    assert m.pool.num_free == num_pages and all(r == 0 for r in m.pool.refcount)


def test_cow_only_partial_last_page():
    m = Model(16, 4)
    s = m.new()
    m.extend(s, 6)  # pages: one full, one with 2 tokens
    kids = m.pool.fork(s, 3)
    for c in kids:
        m.content[c] = list(m.content[s])
    shared_full, shared_partial = m.pool.pages(s)
    assert m.pool.refcount[shared_full] == 4 and m.pool.refcount[shared_partial] == 4
    for i, c in enumerate(kids):
        m.extend(c, 1)
        assert m.pool.pages(c)[0] == shared_full  # the full page is never copied
        assert m.pool.pages(c)[1] != shared_partial
        assert m.pool.cow_copies == i + 1
    m.extend(s, 1)  # last holder writes in place
    assert m.pool.pages(s)[1] == shared_partial and m.pool.cow_copies == 3
    m.check()


def test_batched_reserve_shared_partial_page():
    """Two sequences sharing a partial page in one reserve call: one copy, the other writes in place."""
    m = Model(8, 4)
    s = m.new()
    m.extend(s, 2)
    (c,) = m.pool.fork(s, 1)
    m.content[c] = list(m.content[s])
    free = m.pool.num_free
    m.pool.reserve([s, c], [1, 1])
    assert m.pool.cow_copies == 1 and m.pool.num_free == free - 1
    m.pool.check_invariants()


def test_exhaustion_message_and_bad_args():
    pool = KVPool(1, 4, 2, 1, 64)
    s = pool.new_sequence()
    pool.reserve([s], [8])
    t = pool.new_sequence()
    with pytest.raises(KVPoolExhausted, match=r"1 pages needed, 0 free of 4 total"):
        pool.reserve([t], [1])
    with pytest.raises(ValueError, match="no live sequence 99"):
        pool.fork(99, 1)
    with pytest.raises(ValueError, match="same sequence twice"):
        pool.reserve([s, s], [1, 1])
    with pytest.raises(ValueError, match="num_pages"):
        KVPool(1, 0, 2, 1, 64)
    pool.release(s)
    with pytest.raises(ValueError, match="no live sequence"):
        pool.release(s)
    assert pool.k_cache(0).is_contiguous() and pool.k_cache(0).shape == (4, 2, 1, 64)
