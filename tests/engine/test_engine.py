"""Engine: fork / extend / append / release on random models, against the stateless forward.

The reference for every node is ``model.forward_tokens([tokens])[-1]`` (dense ragged attention, no
cache, no sharing): the engine's cached, paged, shared-prefix path must give the same next-token
logits for every branch of a tree.
"""
import pytest
import torch

from engine_helpers import make_model
from ttscale.engine import Engine, KVPoolExhausted, SamplingParams

ATOL, RTOL = 2e-4, 1e-4


def ref_logits(model, toks):
    return model.forward_tokens([toks])[0][-1]


def check_nodes(eng, nodes):
    for n in nodes:
        torch.testing.assert_close(eng.logits(n), ref_logits(eng.model, eng.tokens(n)), atol=ATOL, rtol=RTOL)


def test_tree_shared_prefix_matches_reference_and_unshared():
    """A 3-level tree (prompt -> 3 branches -> 2-4 sub-branches each), decoded in lock-step with
    shared-prefix attention: tokens equal an engine without sharing, logits equal the dense forward."""
    model = make_model(layers=2)
    runs = []
    for levels in (3, 2, 1):
        eng = Engine(model, num_pages=128, page_size=4, max_share_levels=levels, eos_token_ids=(),
                     share_min_saved_bytes=0)  # always share: this test is about the shared path
        root = eng.prefill(list(range(3, 24)))  # 21 tokens: 5 full pages + 1 partial
        kids = eng.fork(root, 3)
        eng.extend(kids, max_new_tokens=6, seed=1)
        leaves = []
        for i, k in enumerate(kids):
            leaves += eng.fork(k, 2 + i)
        eng.counters.reset()
        res = eng.extend(leaves, max_new_tokens=9, seed=2)
        assert all(r.stop_reason == "length" and len(r.token_ids) == 9 for r in res)
        runs.append(([eng.tokens(n) for n in leaves], eng.counters.kv_bytes_read, eng.counters.kv_bytes_read_unshared))
        check_nodes(eng, leaves + kids + [root])
        eng.release(leaves + kids + [root])
        eng.pool.check_invariants()
        assert eng.pool.num_used == 0
    (t3, b3, u3), (t2, b2, u2), (t1, b1, u1) = runs
    assert t3 == t2 == t1
    assert u3 == u2 == u1 == b1 and b3 < b2 < b1  # deeper sharing reads less


def test_mixed_batch_partial_sharing():
    """One batch mixing a shared subtree, singletons and an unrelated prompt: levels with empty groups."""
    model = make_model(layers=2, heads=4, kv_heads=2)
    eng = Engine(model, num_pages=128, page_size=3, eos_token_ids=(), share_min_saved_bytes=0)
    ref = Engine(model, num_pages=128, page_size=3, eos_token_ids=(), max_share_levels=1)
    batches = []
    for e in (eng, ref):
        root = e.prefill([1] + [3 + i % 20 for i in range(16)])
        other = e.prefill([1, 9, 8, 7, 6, 5, 4])
        k0, k1, k2 = e.fork(root, 3)
        e.extend([k0, k1, k2], max_new_tokens=7, seed=4)
        batch = e.fork(k0, 3) + e.fork(k1, 1) + [k2, other] + e.fork(other, 2)
        res = e.extend(batch, max_new_tokens=8, seed=5)
        batches.append((e, batch, [r.token_ids for r in res]))
    (e1, b1, t1), (e2, b2, t2) = batches
    assert t1 == t2
    check_nodes(e1, b1)
    assert e1.counters.kv_bytes_read < e2.counters.kv_bytes_read == e2.counters.kv_bytes_read_unshared


def test_best_of_n_counters():
    model = make_model(layers=2)
    eng = Engine(model, num_pages=256, page_size=16, eos_token_ids=())
    root = eng.prefill([3 + i % 25 for i in range(64)])  # 4 full pages
    kids = eng.fork(root, 16)
    c = eng.counters
    bpt = eng.pool.bytes_per_token
    assert bpt == 2 * 2 * 1 * 64 * 4  # K+V, layers, kv heads, head dim, fp32
    assert (c.prefill_tokens, c.forks, c.kv_bytes_read, c.peak_pages) == (64, 16, 64 * bpt, 4)
    eng.counters.reset()
    res = eng.extend(kids, max_new_tokens=8, seed=0)
    assert c.decoded_tokens == 16 * 8 and c.forks == 0 and c.forward_steps == 7  # step 0 uses the prefill logits
    # forward s (1..7) runs each branch's token s: it reads 64 + s keys unshared, or the 64 shared
    # prompt keys once plus its own s
    assert c.kv_bytes_read_unshared == sum(16 * (64 + s) for s in range(1, 8)) * bpt
    assert c.kv_bytes_read == sum(64 + 16 * s for s in range(1, 8)) * bpt
    assert c.peak_pages == 4 + 16  # prompt pages shared, one private page per branch
    assert len({tuple(r.token_ids) for r in res}) > 1
    check_nodes(eng, kids)


def test_fork_of_unflushed_node_and_append():
    model = make_model(layers=3, tie=True, qkv_bias=True, kv_heads=2, heads=4)
    eng = Engine(model, num_pages=64, page_size=5, eos_token_ids=())
    a = eng.prefill("12+3=")
    assert eng.tokens(a)[0] == model.tokenizer.bos_token_id
    eng.extend([a], max_new_tokens=3, seed=0)  # last sampled token pending
    b, c = eng.fork(a, 2)
    eng.append(b, "(7*8)")
    eng.append(c, [5])
    eng.extend([a, b, c], max_new_tokens=4, seed=3)
    check_nodes(eng, [a, b, c])
    assert eng.text(b).startswith("12+3=") and "(7*8)" in eng.text(b)
    eng.release([a, b, c])
    assert eng.pool.num_used == 0


def test_seed_reproducible_and_sampling_params():
    model = make_model()

    def run(seed, sp=None):
        eng = Engine(model, num_pages=64, page_size=8, eos_token_ids=())
        root = eng.prefill([1, 5, 6, 7])
        kids = eng.fork(root, 4)
        return [r.token_ids for r in eng.extend(kids, max_new_tokens=12, seed=seed, sampling=sp)]

    assert run(5) == run(5)
    assert run(5) != run(6)
    greedy = run(None, SamplingParams(temperature=0))
    assert all(g == greedy[0] for g in greedy)
    top1 = run(7, SamplingParams(temperature=1.0, top_k=1))
    assert top1 == greedy
    # a node's draws do not depend on which other nodes are in the batch
    eng = Engine(model, num_pages=64, page_size=8, eos_token_ids=())
    root = eng.prefill([1, 5, 6, 7])
    kids = eng.fork(root, 4)
    eng2 = Engine(model, num_pages=64, page_size=8, eos_token_ids=())
    root2 = eng2.prefill([1, 5, 6, 7])
    solo = eng2.fork(root2, 4)
    both = eng.extend(kids, max_new_tokens=5, seed=11)
    one = eng2.extend(solo[:2], max_new_tokens=5, seed=11)
    assert [r.token_ids for r in both[:2]] == [r.token_ids for r in one]


def test_stops_and_eos():
    model = make_model()
    tok = model.tokenizer
    eng = Engine(model, num_pages=64, page_size=4, eos_token_ids=())
    greedy = SamplingParams(temperature=0)
    base = eng.prefill("3+4=")
    free_run = eng.extend(eng.fork(base, 1), max_new_tokens=20, sampling=greedy)[0]
    toks = free_run.token_ids
    target = toks[5]
    first = toks.index(target)
    r = eng.extend(eng.fork(base, 1), max_new_tokens=20, sampling=greedy, stop_token_ids=[target])[0]
    assert r.stop_reason == "stop_token" and r.token_ids == toks[:first + 1]
    full = tok.decode(toks)
    s = full[3:5]
    k = next(k for k in range(1, len(toks) + 1) if s in tok.decode(toks[:k]))
    r = eng.extend(eng.fork(base, 1), max_new_tokens=20, sampling=greedy, stop_strings=["\u00e9", s])[0]
    assert r.stop_reason == "stop_string" and r.token_ids == toks[:k] and r.text.endswith(s)
    # EOS: declare the greedy token at position 2 an EOS
    eng2 = Engine(model, num_pages=64, page_size=4, eos_token_ids=[toks[2]])
    n = eng2.prefill("3+4=")
    r = eng2.extend([n], max_new_tokens=20, sampling=greedy, stop_token_ids=[toks[2]])[0]
    assert r.stop_reason == "eos" and n.finished and r.token_ids == toks[:toks.index(toks[2]) + 1]
    r2 = eng2.extend([n], max_new_tokens=5)[0]
    assert r2.stop_reason == "finished" and r2.token_ids == [] and r2.text == ""
    kid = eng2.fork(n, 1)[0]
    assert kid.finished
    r0 = eng2.extend([eng2.fork(base_node := eng2.prefill([1, 4]), 1)[0]], max_new_tokens=0)[0]
    assert r0.stop_reason == "length" and r0.token_ids == [] and base_node.num_tokens == 2


def test_bad_usage_and_exhaustion():
    model = make_model()
    eng = Engine(model, num_pages=6, page_size=4, eos_token_ids=())
    root = eng.prefill(list(range(3, 12)))  # 9 tokens: 3 pages (last partial)
    kids = eng.fork(root, 4)
    with pytest.raises(KVPoolExhausted, match=r"4 pages needed, 3 free of 6 total"):
        eng.extend(kids, max_new_tokens=2, seed=0)  # step 2: 4 copy-on-writes needed
    # nothing leaked and the nodes still work after releasing some
    eng.pool.check_invariants()
    eng.release(kids[1:])
    eng.extend(kids[:1], max_new_tokens=3, seed=0)
    check_nodes(eng, kids[:1])
    eng.release(kids[:1])
    with pytest.raises(ValueError, match="was released"):
        eng.extend(kids[:1], max_new_tokens=1)
    with pytest.raises(ValueError, match="was released"):
        eng.release(kids[:1])
    with pytest.raises(ValueError, match="same node twice"):
        eng.extend([root, root], max_new_tokens=1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        eng.extend([root], max_new_tokens=-1)
    with pytest.raises(ValueError, match="fork count"):
        eng.fork(root, 0)
    with pytest.raises(ValueError, match="token_ids must be ints"):
        eng.append(root, [10 ** 6])
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        eng.prefill([])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        eng.prefill("XYZ")
    with pytest.raises(ValueError, match="head_dim 96"):
        make_model(head_dim=96)
    eng.release([root])
    eng.pool.check_invariants()
    assert eng.pool.num_used == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_low_precision_runs(dtype):
    model = make_model(dtype=dtype)
    eng = Engine(model, num_pages=32, page_size=8, eos_token_ids=())
    root = eng.prefill([1, 3, 4, 5, 6])
    kids = eng.fork(root, 3)
    eng.extend(kids, max_new_tokens=5, seed=0)
    for k in kids:
        ref = ref_logits(model, eng.tokens(k))
        torch.testing.assert_close(eng.logits(k), ref, atol=0.05 * ref.abs().max().item(), rtol=0.05)


def test_load_builtin_missing_dir(monkeypatch, tmp_path):
    import ttscale.engine.checkpoint as ck
    from ttscale.engine import load_builtin

    monkeypatch.setattr(ck, "BUILTIN_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="built-in 'policy' model is not in this installation"):
        load_builtin("policy")


@pytest.mark.parametrize("name", ["policy", "prm"])
def test_builtin_models(name):
    """The shipped built-in checkpoints (when this installation has them) load and run."""
    import os

    from ttscale.engine import CharTokenizer, load_builtin
    from ttscale.engine.checkpoint import BUILTIN_DIR

    if not os.path.isdir(os.path.join(BUILTIN_DIR, name)):
        pytest.skip(f"built-in {name} checkpoint not present")
    m = load_builtin(name)
    assert isinstance(m.tokenizer, CharTokenizer)
    ids = [m.tokenizer.bos_token_id] + m.tokenizer.encode("12")
    out = m.forward_tokens([ids])[0]
    if name == "prm":
        assert m.config.is_classifier and out.shape == (len(ids), 1)
        return
    eng = Engine(m)
    root = eng.prefill("12")
    assert eng.tokens(root) == ids
    torch.testing.assert_close(eng.logits(root), out[-1], atol=ATOL, rtol=RTOL)
    kids = eng.fork(root, 4)
    eng.extend(kids, max_new_tokens=8, seed=0)
    check_nodes(eng, kids)


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_PROP_MODEL = make_model(layers=1, hidden=128, heads=2, kv_heads=1, inter=128, max_pos=200, seed=3)


@settings(max_examples=15, deadline=None)
@given(page_size=st.sampled_from([1, 2, 5, 16]), levels=st.sampled_from([1, 2, 3]),
       actions=st.lists(st.tuples(st.sampled_from(["fork", "extend", "append", "release", "prefill"]),
                                  st.integers(0, 10 ** 6), st.integers(1, 4)), min_size=1, max_size=12))
def test_random_engine_usage(page_size, levels, actions):
    """Random prefill / fork / extend (random subsets, lock-step) / append / release: the pool stays
    consistent and every live node's logits equal the dense forward of its tokens."""
    eng = Engine(_PROP_MODEL, num_pages=400, page_size=page_size, eos_token_ids=(), max_share_levels=levels,
                 share_min_saved_bytes=0)
    live = [eng.prefill([1, 4, 5, 6, 7][: 2 + len(actions) % 4])]
    for kind, pick, n in actions:
        if not live or kind == "prefill":
            live.append(eng.prefill([1] + [3 + (pick + i) % 20 for i in range(n * 3)]))
        elif kind == "fork":
            live += eng.fork(live[pick % len(live)], n)
        elif kind == "extend":
            sub = [x for j, x in enumerate(live) if (pick >> j) & 1] or live[:1]
            eng.extend(sub, max_new_tokens=n, seed=pick)
        elif kind == "append":
            eng.append(live[pick % len(live)], [3 + pick % 20] * n)
        else:
            eng.release([live.pop(pick % len(live))])
        eng.pool.check_invariants()
    check_nodes(eng, live)
    eng.release(live)
    eng.pool.check_invariants()
    assert eng.pool.num_used == 0
