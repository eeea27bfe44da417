"""PrefixScorer: prefix-cached per-position outputs equal a full forward, whatever was cached."""
import dataclasses
import random

import pytest
import torch

from ttscale.engine import KVPoolExhausted, PrefixScorer, Transformer

from engine_helpers import make_model, randomize_


def _classifier(layers=3, seed=1, max_pos=512):
    lm = make_model(layers=layers, seed=seed, max_pos=max_pos)
    cfg = dataclasses.replace(lm.config, num_labels=1, architecture="LlamaForSequenceClassification")
    m = randomize_(Transformer(cfg), seed).eval()
    m.inv_freq = m.inv_freq.float()
    return m


def _tree(rng, vocab, n_roots=2, depth=4, fan=3):
    """Token sequences of a search tree: roots of odd lengths, children = parent + a random step."""
    level = [[rng.randrange(3, vocab) for _ in range(rng.choice([1, 5, 17, 33]))] for _ in range(n_roots)]
    out = [list(s) for s in level]
    for _ in range(depth):
        nxt = []
        for p in level:
            for _ in range(fan):
                nxt.append(p + [rng.randrange(3, vocab) for _ in range(rng.choice([1, 2, 7, 16, 19]))])
        level = rng.sample(nxt, min(len(nxt), 8))
        out.extend(level)
    return out


def _check(outs, ref, tol=2e-5):
    assert len(outs) == len(ref)
    for o, r in zip(outs, ref):
        assert o.shape == r.shape and o.dtype == torch.float32
        torch.testing.assert_close(o, r, atol=tol, rtol=tol)


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("kind", ["classifier", "lm"])
def test_scores_equal_full_forward_level_by_level(page_size, kind):
    m = _classifier() if kind == "classifier" else make_model(layers=2, seed=3)
    rng = random.Random(page_size)
    seqs = _tree(rng, m.config.vocab_size)
    sc = PrefixScorer(m, page_size=page_size)
    # scored in the order a search scores them: roots, then each depth's children (prefixes cached)
    for b in range(0, len(seqs), 5):
        batch = seqs[b:b + 5]
        _check(sc.score(batch), m.forward_tokens(batch))
        sc.pool.check_invariants()
    assert sc.tokens_reused > 0 and sc.tokens_run < sum(map(len, seqs))
    # everything again: exact hits, nothing runs
    run0 = sc.tokens_run
    _check(sc.score(seqs), m.forward_tokens(seqs))
    assert sc.tokens_run == run0


def test_reuses_the_longest_cached_prefix_and_counts_tokens():
    m = _classifier(layers=2)
    sc = PrefixScorer(m, page_size=4)
    a = [5, 6, 7, 8, 9, 10, 11]           # 7 tokens: partial last page
    sc.score([a[:3]])
    sc.score([a[:6]])
    assert (sc.tokens_run, sc.tokens_reused) == (6, 3)
    out = sc.score([a + [12, 13], a[:6] + [20]])  # both extend the 6-token entry, one shared partial page
    assert (sc.tokens_run, sc.tokens_reused) == (6 + 3 + 1, 3 + 12)
    _check(out, m.forward_tokens([a + [12, 13], a[:6] + [20]]))
    # the lookup is limited to the lengths the caller names
    sc.score([a[:6] + [28, 29]], prefix_lengths=[[3]])
    assert sc.tokens_run == 10 + 5
    sc.pool.check_invariants()


def test_duplicates_in_one_call_run_once():
    m = _classifier(layers=1)
    sc = PrefixScorer(m)
    s = [4, 5, 6, 7]
    outs = sc.score([s, s, [4, 5]])
    assert sc.tokens_run == 6
    _check(outs, m.forward_tokens([s, s, [4, 5]]))
    outs[0].add_(1.0)  # results are copies: the cache is not modified through them
    _check(sc.score([s]), m.forward_tokens([s]))


def test_small_pool_evicts_least_recently_used_and_stays_exact():
    m = _classifier(layers=2)
    sc = PrefixScorer(m, page_size=2, num_pages=24)
    rng = random.Random(7)
    seqs = _tree(rng, m.config.vocab_size, n_roots=1, depth=5, fan=2)
    for s in seqs:
        if len(s) > 2 * 24:
            continue
        _check(sc.score([s]), m.forward_tokens([s]))
        sc.pool.check_invariants()
    assert sc.evictions > 0
    sc.clear()
    assert len(sc) == 0 and sc.pool.num_used == 0
    with pytest.raises(KVPoolExhausted, match="pages needed"):
        sc.score([[3] * 49])  # 25 pages: more than the whole pool
    assert sc.pool.num_used == 0  # nothing leaked by the failed call
    sc.pool.check_invariants()


def test_bad_input():
    m = _classifier(layers=1, max_pos=32)
    sc = PrefixScorer(m)
    with pytest.raises(ValueError, match="sequences\\[1\\] is empty"):
        sc.score([[3], []])
    with pytest.raises(ValueError, match="max_position_embeddings=32"):
        sc.score([[3] * 33])
    with pytest.raises(ValueError, match="vocab_size"):
        sc.score([[3, m.config.vocab_size]])
    with pytest.raises(ValueError, match="prefix_lengths"):
        sc.score([[3, 4]], prefix_lengths=[[1], [2]])
    with pytest.raises(TypeError, match="Transformer"):
        PrefixScorer(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="page_size"):
        PrefixScorer(m, page_size=0)
    assert sc.pool.num_used == 0
