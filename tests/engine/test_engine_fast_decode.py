"""The lock-step decode fast path of ``Engine.extend`` (``_DecodeBatch``).

It plans the page tables and shared-prefix levels once per page epoch and updates them in place
between page boundaries. These tests check that the incrementally updated tables always equal a
fresh plan of the same state (after random fork / extend / append / release sequences), that the
fast path gives the same tokens, logits and counters as the per-step ``_forward`` path, and the
sharing cost model.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_helpers import make_model
from ttscale.engine import Engine, KVPool
from ttscale.engine.engine import _DecodeBatch

_MODEL = make_model(layers=1, hidden=128, heads=2, kv_heads=1, inter=128, max_pos=200, seed=5)


def _same_tables(a, b):
    oa, *ta, la = a.tables()
    ob, *tb, lb = b.tables()
    assert oa == ob
    for x, y in zip(ta, tb):
        assert torch.equal(x, y)
    assert (la is None) == (lb is None)
    if la is not None:
        assert len(la) == len(lb)
        for lx, ly in zip(la, lb):
            for f in ("qo_indptr", "kv_indptr", "kv_indices", "kv_last_page_len"):
                assert torch.equal(getattr(lx, f), getattr(ly, f)), f
    assert (a.room, a.sum_lens, a.shared_fixed) == (b.room, b.sum_lens, b.shared_fixed)


class _CheckEveryStep:
    """Wrap _DecodeBatch.advance while active: after every step, compare with a fresh plan."""

    def __enter__(self):
        self.incremental = 0
        self.orig = orig = _DecodeBatch.advance
        outer = self

        def advance(batch):
            rebuild = batch.room <= 0
            orig(batch)
            if not rebuild:
                outer.incremental += 1
            fresh = _DecodeBatch(batch.engine, batch.all_nodes, batch.order, batch.seeds)  # reserve: no-op
            _same_tables(batch, fresh)

        _DecodeBatch.advance = advance
        return self

    def __exit__(self, *exc):
        _DecodeBatch.advance = self.orig
        return False


@settings(max_examples=12, deadline=None)
@given(page_size=st.sampled_from([1, 3, 4, 16]), levels=st.sampled_from([1, 2, 3]),
       actions=st.lists(st.tuples(st.sampled_from(["fork", "extend", "append", "release"]),
                                  st.integers(0, 10 ** 6), st.integers(1, 5)), min_size=1, max_size=10))
def test_incremental_plan_equals_fresh_plan(page_size, levels, actions):
    with _CheckEveryStep() as check:
        _random_usage(check, page_size, levels, actions)


def _random_usage(check, page_size, levels, actions):
    eng = Engine(_MODEL, num_pages=600, page_size=page_size, eos_token_ids=(), max_share_levels=levels,
                 share_min_saved_bytes=0)
    live = [eng.prefill([1] + [3 + i % 17 for i in range(11)])]
    for kind, pick, n in actions:
        if not live:
            live.append(eng.prefill([1, 5, 6, 7]))
        if kind == "fork":
            live += eng.fork(live[pick % len(live)], n)
        elif kind == "extend":
            sub = [x for j, x in enumerate(live) if (pick >> j) & 1] or live[:1]
            eng.extend(sub, max_new_tokens=n + 2, seed=pick, stop_token_ids=[3 + pick % 17])
        elif kind == "append":
            eng.append(live[pick % len(live)], [4] * n)
        else:
            eng.release([live.pop(pick % len(live))])
        eng.pool.check_invariants()
    if not live:
        live.append(eng.prefill([1, 5, 6, 7, 8]))
    # one long lock-step extend of many forks crosses page boundaries: incremental steps are checked
    live += eng.fork(live[0], 5)
    eng.extend(live, max_new_tokens=2 * page_size + 1, seed=7)
    assert check.incremental > 0 or page_size == 1
    eng.release(live)
    eng.pool.check_invariants()
    assert eng.pool.num_used == 0


@pytest.mark.parametrize("levels", [1, 3])
@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_fast_path_matches_step_path(levels, page_size):
    """Same seeds: the fast path and the per-step _forward path give the same tokens, counters and
    next-token logits (a tree with a stop token, so batches shrink and get re-planned)."""
    results = []
    for fast in (True, False):
        eng = Engine(_MODEL, num_pages=400, page_size=page_size, eos_token_ids=(), max_share_levels=levels,
                     share_min_saved_bytes=0)
        eng.fast_decode = fast
        root = eng.prefill([1] + [3 + (7 * i) % 17 for i in range(21)])
        kids = eng.fork(root, 4)
        r1 = eng.extend(kids, max_new_tokens=5, seed=11)
        leaves = [x for k in kids for x in eng.fork(k, 3)]
        r2 = eng.extend(leaves, max_new_tokens=2 * page_size + 3, seed=12, stop_token_ids=[5])
        c = eng.counters
        logits = torch.stack([eng.logits(n) for n in leaves])
        results.append(([r.token_ids for r in r1 + r2], [r.stop_reason for r in r1 + r2],
                        (c.decoded_tokens, c.kv_bytes_read, c.kv_bytes_read_unshared, c.forward_steps), logits))
        eng.release(leaves + kids + [root])
        eng.pool.check_invariants()
    (t1, s1, c1, l1), (t2, s2, c2, l2) = results
    assert t1 == t2 and s1 == s2 and c1 == c2
    torch.testing.assert_close(l1, l2, atol=2e-5, rtol=1e-5)


def test_share_cost_model():
    """A small shared prefix over few branches is not worth an extra attention call per layer: the
    default cost model decodes per branch (and the counters say so); a long prefix over many branches
    is shared. Tokens are the same either way."""
    toks, reads = {}, {}
    for name, kw, n_kids, plen in (("tiny-default", {}, 2, 9), ("tiny-forced", dict(share_min_saved_bytes=0), 2, 9),
                                   ("long-default", {}, 32, 120)):
        eng = Engine(_MODEL, num_pages=400, page_size=4, eos_token_ids=(), **kw)
        root = eng.prefill([1] + [3 + i % 17 for i in range(plen - 1)])
        kids = eng.fork(root, n_kids)
        eng.counters.reset()
        toks[name] = [r.token_ids for r in eng.extend(kids, max_new_tokens=6, seed=3)]
        reads[name] = (eng.counters.kv_bytes_read, eng.counters.kv_bytes_read_unshared)
    assert toks["tiny-default"] == toks["tiny-forced"]
    assert reads["tiny-default"][0] == reads["tiny-default"][1]  # per-branch decode
    assert reads["tiny-forced"][0] < reads["tiny-forced"][1]
    assert reads["long-default"][0] < reads["long-default"][1] / 8
    with pytest.raises(ValueError, match="share_min_saved_bytes"):
        Engine(_MODEL, num_pages=16, share_min_saved_bytes=-1)


def test_pool_grow():
    pool = KVPool(1, 8, 4, 1, 64)
    a = pool.new_sequence()
    pool.reserve([a], [3])
    pool.grow([a])
    assert pool.length(a) == 4
    with pytest.raises(ValueError, match="no private free slot"):
        pool.grow([a])  # last page full
    b = pool.new_sequence()
    pool.reserve([b], [2])
    (c,) = pool.fork(b, 1)
    with pytest.raises(ValueError, match="no private free slot"):
        pool.grow([b])  # last page shared: needs copy-on-write through reserve
    assert pool.length(b) == pool.length(c) == 2
    pool.check_invariants()
