"""Search strategies on the model-free simulator, against closed forms.

Statistical checks use z-scores against the exact mean and variance (|z| < 4.5, so a correct
implementation fails with probability ~1e-5 per check), never hard-coded outputs.
"""
import itertools
import math

import numpy as np
import pytest

from ttscale.search import (DVTS, MCTS, BeamSearch, BestOfN, Budget, ParticleFilter, Rebase, SelfConsistency,
                            allocate, ess, majority_probability, pass_at_k)
from ttscale.search.simulator import SimExact, SimGenerator, SimORM, SimPRM, SimProblem, sim_problems

Z = 4.5


def _z_ok(hits: int, trials: int, p: float) -> bool:
    sd = math.sqrt(max(p * (1 - p), 1e-12) / trials)
    return abs(hits / trials - p) <= Z * sd + 1e-12


ALL = [
    ("best-of-n", BestOfN("verifier")),
    ("majority", BestOfN("majority")),
    ("weighted-bon", BestOfN("weighted")),
    ("self-consistency", SelfConsistency(wave=3)),
    ("beam", BeamSearch(beam_width=2)),
    ("beam-lookahead", BeamSearch(beam_width=2, lookahead=1)),
    ("dvts", DVTS(beam_width=2)),
    ("rebase", Rebase()),
    ("pf-systematic", ParticleFilter("systematic")),
    ("pf-multinomial-ess", ParticleFilter("multinomial", ess_threshold=0.5)),
    ("mcts", MCTS(expand_width=2)),
]


# ------------------------------------------------------------------------------------------ allocate
@pytest.mark.parametrize("rule", ["topk", "rebase", "multinomial", "systematic"])
def test_allocate_sums_to_width(rule):
    rng = np.random.default_rng(1)
    for n in (1, 3, 17, 97):
        for width in (0, 1, 5, 64, 127):
            scores = rng.random(n) if rule in ("topk", "rebase") else rng.normal(size=n) * 3
            c = allocate(scores, width, rule, k=max(1, (width + 3) // 4), temperature=0.2 if rule == "rebase" else 1.0,
                         rng=rng)
            assert c.dtype == np.int64 and c.shape == (n,)
            assert (c >= 0).all() and int(c.sum()) == width


def test_allocate_topk_keeps_the_best():
    rng = np.random.default_rng(2)
    s = rng.random(13)
    c = allocate(s, 10, "topk", k=3)
    top = set(np.argsort(-s)[:3].tolist())
    assert set(np.nonzero(c)[0].tolist()) == top
    assert sorted(c[list(top)].tolist()) == [3, 3, 4] and c[np.argmax(s)] == 4


def test_allocate_rebase_matches_sequential_ceil_reference():
    # independent float64 re-derivation: W_i = ceil(W * e_i / sum_{j>=i} e_j) in score order
    rng = np.random.default_rng(3)
    for _ in range(50):
        n, W, T = int(rng.integers(1, 20)), int(rng.integers(1, 70)), float(rng.uniform(0.05, 2))
        s = rng.random(n)
        order = sorted(range(n), key=lambda i: (-s[i], i))
        e = [math.exp(s[i] / T) for i in order]
        ref, left = [0] * n, W
        for pos, i in enumerate(order):
            share = min(left, math.ceil(left * e[pos] / sum(e[pos:]) - 1e-12)) if pos < n - 1 else left
            ref[i], left = share, left - share
        assert allocate(s, W, "rebase", temperature=T).tolist() == ref
        # a higher score never gets fewer children
        c = allocate(s, W, "rebase", temperature=T)
        assert all(c[a] >= c[b] for a in range(n) for b in range(n) if s[a] > s[b])


@pytest.mark.parametrize("rule", ["multinomial", "systematic"])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_resampling_is_unbiased(rule, temperature):
    rng = np.random.default_rng(4)
    n, N, R = 7, 23, 4000
    logw = rng.normal(size=n) * 1.5
    w = np.exp((logw - logw.max()) / temperature)  # the law is softmax(scores / temperature)
    w /= w.sum()
    counts = np.stack([allocate(logw, N, rule, rng=rng, temperature=temperature) for _ in range(R)])
    mean = counts.mean(0)
    if rule == "systematic":
        # every count is floor or ceil of N*w, and the variance is at most that of a Bernoulli rounding
        assert ((counts == np.floor(N * w)[None]) | (counts == np.ceil(N * w)[None])).all()
        sd = np.sqrt(np.maximum((N * w % 1) * (1 - N * w % 1), 1e-12) / R)
    else:
        sd = np.sqrt(N * w * (1 - w) / R)
    assert (np.abs(mean - N * w) <= Z * sd + 1e-9).all(), (mean, N * w)


def test_ess():
    assert ess(np.ones(9)) == pytest.approx(9)
    assert ess(np.array([1.0, 0, 0])) == pytest.approx(1)
    w = np.random.default_rng(5).random(11)
    assert ess(w) == pytest.approx(w.sum() ** 2 / (w ** 2).sum())


def test_aggregate_rules():
    from ttscale.search.base import aggregate

    steps = [0.9, 0.5, 0.8]
    assert aggregate(steps, "last") == 0.8
    assert aggregate(steps, "min") == 0.5
    assert aggregate(steps, "prod") == pytest.approx(0.9 * 0.5 * 0.8)
    assert aggregate(steps, "mean") == pytest.approx((0.9 + 0.5 + 0.8) / 3)
    assert all(aggregate([], h) == 0.0 for h in ("last", "min", "prod", "mean"))
    with pytest.raises(ValueError, match="how must be one of"):
        aggregate(steps, "max")


def test_select_answer_rules():
    """Each rule on hand-built candidates, expected answers worked out from the docstring: A once at
    0.9 against B twice at 0.4 (and an unfinished / answerless candidate that never counts)."""
    from ttscale.search.base import Candidate, select_answer

    def c(ans, score, finished=True, weight=1.0):
        return Candidate(text="", answer=ans, step_scores=[score], score=score, finished=finished, weight=weight)

    cands = [c("B", 0.4), c("A", 0.9), c("B", 0.45), c("C", 0.99, finished=False), c(None, 0.95)]
    assert select_answer(cands, "verifier") == 1                # highest score among finished with answer
    assert select_answer(cands, "majority") == 2                # B (2 votes), its best-scored candidate
    assert select_answer(cands, "weighted") == 1                # A: 0.9 > B: 0.4 + 0.45
    # multiplicity counts in both votes
    cands[1] = c("A", 0.9, weight=3.0)
    assert select_answer(cands, "majority") == 1                # A: 3 > B: 2
    assert select_answer(cands, "weighted") == 1
    cands[1] = c("A", 0.5, weight=1.0)
    assert select_answer(cands, "weighted") == 2                # B: 0.85 > A: 0.5
    # ties: the earliest candidate / answer wins
    tie = [c("X", 0.5), c("Y", 0.5)]
    assert select_answer(tie, "verifier") == 0 and select_answer(tie, "majority") == 0
    assert select_answer([c(None, 1.0), c("Z", 0.1, finished=False)], "majority") is None


def test_allocate_rejects_bad_input():
    with pytest.raises(ValueError, match="width"):
        allocate([0.1, 0.2], -1, "topk")
    with pytest.raises(ValueError, match="rule"):
        allocate([0.1], 1, "nope")
    with pytest.raises(ValueError, match="rng"):
        allocate([0.1], 1, "multinomial")
    with pytest.raises(ValueError, match="no nodes"):
        allocate([], 3, "topk")
    with pytest.raises(ValueError, match="nan"):
        allocate([float("nan")], 1, "topk")


# ------------------------------------------------------------------------------------------ pass@k
def test_pass_at_k_matches_subset_enumeration():
    rng = np.random.default_rng(6)
    for _ in range(30):
        n = int(rng.integers(1, 10))
        c, k = int(rng.integers(0, n + 1)), int(rng.integers(1, n + 1))
        labels = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(range(n), k))
        ref = sum(any(labels[i] for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(ref, abs=1e-12)


def test_pass_at_k_unbiased_on_simulator():
    # E[pass@k from n samples] = 1 - (1 - q)^k when each sample is correct with probability q
    prob = SimProblem(num_steps=3, p_step=0.7)
    q, n, k, R = prob.q, 6, 3, 600
    gen = SimGenerator(prob)
    est, trials = [], []
    for seed in range(R):
        res = BestOfN("majority").run(gen, prob.prompt, Budget(n=n), seed=seed)
        c = sum(cd.answer == prob.answer for cd in res.candidates)
        est.append(pass_at_k(n, c, k))
    target = 1 - (1 - q) ** k
    sd = np.std(est) / math.sqrt(R)
    assert abs(np.mean(est) - target) <= Z * sd + 1e-9
    assert gen.live_nodes() == 0 and gen.live_pages() == 0


# ------------------------------------------------------------------------------------------ closed forms
@pytest.mark.parametrize("n", [1, 3, 8])
def test_coverage_best_of_n_with_exact_verifier(n):
    prob = SimProblem(num_steps=4, p_step=0.75)
    gen, ver = SimGenerator(prob), SimExact()
    R = 400
    hits = sum(BestOfN("verifier").run(gen, prob.prompt, Budget(n=n), ver, seed=s).answer == prob.answer
               for s in range(R))
    assert _z_ok(hits, R, 1 - (1 - prob.q) ** n)


def test_majority_vote_matches_exact_plurality_probability():
    prob = SimProblem(num_steps=2, p_step=0.7, distractors=("1", "2"), distractor_probs=(0.6, 0.4))
    dist = prob.answer_distribution()
    probs = [dist[prob.answer], dist["1"], dist["2"]]
    gen, R, n = SimGenerator(prob), 700, 5
    hits = sum(BestOfN("majority").run(gen, prob.prompt, Budget(n=n), seed=s).answer == prob.answer
               for s in range(R))
    assert _z_ok(hits, R, majority_probability(probs, n))


def test_majority_probability_enumeration_matches_monte_carlo_free_cases():
    # n = 1: plurality winner is just the draw
    assert majority_probability([0.2, 0.5, 0.3], 1, target=1) == pytest.approx(0.5)
    # two answers, odd n: binomial tail
    p, n = 0.6, 7
    tail = sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(4, n + 1))
    assert majority_probability([p, 1 - p], n) == pytest.approx(tail)


@pytest.mark.parametrize("q_plurality", [True, False])
def test_majority_vote_limit(q_plurality):
    # as n grows, majority vote is right iff the correct answer is the most likely one
    p_step = 0.8 if q_plurality else 0.45   # q = 0.64 vs 0.2025 (< 0.797 * 0.7 for the top distractor)
    prob = SimProblem(num_steps=2, p_step=p_step, distractors=("1", "2"), distractor_probs=(0.7, 0.3),
                      step_tokens=(2, 3))
    gen = SimGenerator(prob)
    hits = sum(BestOfN("majority").run(gen, prob.prompt, Budget(n=101), seed=s).answer == prob.answer
               for s in range(20))
    assert hits == (20 if q_plurality else 0)


def test_self_consistency_settled_stop_never_changes_the_vote():
    prob = SimProblem(num_steps=2, p_step=0.9)
    gen = SimGenerator(prob)
    early = 0
    for s in range(30):
        res = SelfConsistency(wave=2).run(gen, prob.prompt, Budget(n=15), seed=s)
        votes = {}
        for c in res.candidates:
            votes[c.answer] = votes.get(c.answer, 0) + 1
        left = 15 - len(res.candidates)
        if res.stop_reason == "settled":
            early += 1
            top = sorted(votes.values(), reverse=True) + [0]
            assert top[0] - top[1] > left  # no remaining draws could overturn the leader
        else:
            assert left == 0
    assert early > 0


def test_self_consistency_threshold_stop():
    """With ``threshold``, the run stops at the first wave boundary (after min_samples) where the
    leader's votes reach threshold x samples drawn (or where the margin rule settles it), not before;
    without a threshold the same seeds draw at least as many samples."""
    prob = SimProblem(num_steps=2, p_step=0.9)

    def top2(cands):
        votes = {}
        for c in cands:
            if c.finished and c.answer is not None:
                votes[c.answer] = votes.get(c.answer, 0) + 1
        return (sorted(votes.values(), reverse=True) + [0, 0])[:2]

    by_threshold = 0
    for s in range(20):
        res = SelfConsistency(wave=2, threshold=0.75, min_samples=4).run(SimGenerator(prob), prob.prompt,
                                                                          Budget(n=40), seed=s)
        c = res.candidates
        drawn = len(c)
        for k in range(2, drawn, 2):  # earlier wave boundaries: neither rule held there
            a, b = top2(c[:k])
            assert not (k >= 4 and a >= 0.75 * k) and not (a - b > 40 - k)
        if res.stop_reason == "settled" and drawn < 40:
            a, b = top2(c)
            assert (drawn >= 4 and a >= 0.75 * drawn) or a - b > 40 - drawn
            by_threshold += a - b <= 40 - drawn  # settled by the threshold alone
        plain = SelfConsistency(wave=2).run(SimGenerator(prob), prob.prompt, Budget(n=40), seed=s)
        assert len(plain.candidates) >= drawn
    assert by_threshold > 0


# ------------------------------------------------------------------------------------------ all strategies
@pytest.mark.parametrize("name,strategy", ALL, ids=[a for a, _ in ALL])
@pytest.mark.parametrize("n", [1, 4, 7])
def test_strategy_well_formed_and_no_leaks(name, strategy, n):
    prob = SimProblem(num_steps=5, p_step=0.8)
    gen, ver = SimGenerator(prob, page_size=5), SimPRM(noise=0.8)
    res = strategy.run(gen, prob.prompt, Budget(n=n), ver, seed=n)
    assert gen.live_nodes() == 0 and gen.live_pages() == 0, f"{name} leaked nodes/pages"
    assert res.stop_reason in ("finished", "settled", "max_depth"), res.stop_reason
    assert res.candidates, name
    fin = [c for c in res.candidates if c.finished]
    assert fin and all(c.answer is not None for c in fin)
    assert res.answer is not None and res.answer == res.candidates[res.selected].answer
    assert res.answer in prob.answer_distribution()
    for c in res.candidates:
        assert all(0.0 <= s <= 1.0 for s in c.step_scores)
    m = res.meter
    assert m.prefill_tokens == prob.prompt_tokens  # the prompt is prefilled once, whatever the strategy
    assert m.generated_tokens > 0 and m.forks >= 0 and m.wall_s >= 0
    assert 0 < m.kv_bytes_read <= m.kv_bytes_read_unshared
    assert m.peak_kv_pages >= 1
    # trace: depths increase, allocations sum to the width of that depth
    for a, b in zip(res.trace, res.trace[1:]):
        assert b.depth >= a.depth and b.generated_tokens >= a.generated_tokens
    # the per-depth allocation uses exactly the width: REBASE / beam give n - finished leaves
    # children; particle filtering keeps n particles; DVTS keeps one child per subtree
    for ev in res.trace:
        if name in ("rebase", "beam", "beam-lookahead"):
            assert sum(ev.children) == n - ev.finished and len(ev.children) == len(ev.scores)
        elif name.startswith("pf"):
            assert sum(ev.children) == n
        elif name == "dvts":
            m_ = min(2, n)
            assert sum(ev.children) == len(ev.children) // m_ and len(ev.children) % m_ == 0


@pytest.mark.parametrize("name,strategy", ALL, ids=[a for a, _ in ALL])
def test_seed_determinism(name, strategy):
    prob = SimProblem(num_steps=4, p_step=0.7)

    def run(seed):
        gen = SimGenerator(prob)
        r = strategy.run(gen, prob.prompt, Budget(n=6), SimPRM(noise=1.0, seed=3), seed=seed)
        return ([(c.text, c.answer, c.step_scores) for c in r.candidates], r.answer, r.meter.generated_tokens,
                r.meter.kv_bytes_read, [(e.depth, e.children) for e in r.trace])

    a, b = run(11), run(11)
    assert a == b
    assert any(run(s) != a for s in (12, 13, 14))


@pytest.mark.parametrize("name,strategy", ALL, ids=[a for a, _ in ALL])
@pytest.mark.parametrize("cap", ["max_generated_tokens", "max_flops", "max_kv_bytes"])
def test_budget_caps_are_enforced(name, strategy, cap):
    prob = SimProblem(num_steps=6, p_step=0.9)
    gen = SimGenerator(prob)
    free = strategy.run(gen, prob.prompt, Budget(n=8), SimPRM(), seed=0).meter
    used = {"max_generated_tokens": free.generated_tokens, "max_flops": free.flops,
            "max_kv_bytes": free.kv_bytes_read}[cap]
    for frac in (0.1, 0.4, 0.85):
        limit = used * frac
        gen = SimGenerator(prob)
        res = strategy.run(gen, prob.prompt, Budget(n=8, **{cap: limit}), SimPRM(), seed=0)
        got = {"max_generated_tokens": res.meter.generated_tokens, "max_flops": res.meter.flops,
               "max_kv_bytes": res.meter.kv_bytes_read}[cap]
        assert got <= limit
        assert res.stop_reason.startswith("budget:"), res.stop_reason
        assert gen.live_nodes() == 0 and gen.live_pages() == 0


@pytest.mark.parametrize("name,strategy", ALL, ids=[a for a, _ in ALL])
def test_a_stop_before_any_step_still_leaves_a_candidate(name, strategy):
    """A cap too small for even the first step: every strategy keeps what it had (the prompt, an
    unfinished and unscored candidate) instead of returning none (MCTS returned none)."""
    prob = SimProblem(num_steps=6, p_step=0.9)
    gen = SimGenerator(prob)
    res = strategy.run(gen, prob.prompt, Budget(n=8, max_generated_tokens=1), SimPRM(), seed=0)
    assert res.stop_reason.startswith("budget:"), res.stop_reason
    assert res.candidates and not any(c.finished for c in res.candidates)
    assert gen.live_nodes() == 0 and gen.live_pages() == 0


class _FailingGenerator(SimGenerator):
    """Raises on the k-th extend, as a crashed engine would."""

    def __init__(self, prob, k):
        super().__init__(prob)
        self.k = k

    def extend(self, nodes, **kw):
        self.k -= 1
        if self.k == 0:
            raise RuntimeError("engine failure")
        return super().extend(nodes, **kw)


@pytest.mark.parametrize("name,strategy", ALL, ids=[a for a, _ in ALL])
def test_nodes_released_when_the_generator_fails(name, strategy):
    prob = SimProblem(num_steps=5, p_step=0.8)
    for k in (1, 2, 4):
        gen = _FailingGenerator(prob, k)
        with pytest.raises(RuntimeError, match="engine failure"):
            strategy.run(gen, prob.prompt, Budget(n=6), SimPRM(), seed=0)
        assert gen.live_nodes() == 0 and gen.live_pages() == 0


def test_forks_share_pages():
    # branching after a long prompt: the shared-prefix KV read is far below the unshared one
    prob = SimProblem(num_steps=3, p_step=0.9, prompt_tokens=400)
    gen = SimGenerator(prob, page_size=16)
    m = Rebase().run(gen, prob.prompt, Budget(n=16), SimPRM(), seed=0).meter
    assert m.kv_bytes_read < 0.3 * m.kv_bytes_read_unshared
    assert m.peak_kv_pages < 16 * (400 // 16)  # the prompt's pages are not copied per branch


def test_guided_search_beats_sampling_with_a_good_prm():
    # with an informative PRM, PRM-guided search is more accurate than a single sample
    probs = sim_problems(40, seed=1, steps=(5, 8), p=(0.6, 0.8))
    acc = {}
    for name, strat in [("single", BestOfN("majority")), ("rebase", Rebase()), ("beam", BeamSearch(2))]:
        hits = 0
        for i, p in enumerate(probs):
            gen = SimGenerator(p)
            n = 1 if name == "single" else 8
            hits += strat.run(gen, p.prompt, Budget(n=n), SimPRM(noise=0.5, seed=i), seed=i).answer == p.answer
        acc[name] = hits / len(probs)
    exp_single = np.mean([p.q for p in probs])
    assert acc["rebase"] > exp_single + 0.15 and acc["beam"] > exp_single + 0.15, (acc, exp_single)


def test_orm_and_exact_verifiers():
    prob = SimProblem(num_steps=3, p_step=0.6)
    for ver in (SimORM(noise=0.3), SimExact()):
        gen = SimGenerator(prob)
        res = BestOfN("verifier").run(gen, prob.prompt, Budget(n=8), ver, seed=0)
        for c in res.candidates:
            assert len(c.step_scores) >= 1
            if ver.kind == "exact":
                assert c.score == float(c.answer == prob.answer)
        assert gen.live_nodes() == 0


def test_bad_arguments():
    prob = SimProblem()
    gen = SimGenerator(prob)
    with pytest.raises(ValueError, match="n must be"):
        Budget(n=0)
    with pytest.raises(ValueError, match="needs a verifier"):
        Rebase().run(gen, prob.prompt, Budget(n=2))
    with pytest.raises(ValueError, match="resample"):
        ParticleFilter("stratified").run(gen, prob.prompt, Budget(n=2), SimPRM())
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearch(beam_width=0).run(gen, prob.prompt, Budget(n=2), SimPRM())
    with pytest.raises(ValueError, match="select"):
        BestOfN("best")
    with pytest.raises(ValueError, match="max_steps"):
        Rebase(max_steps=0)
    node = gen.root("x")
    gen.release([node])
    with pytest.raises(ValueError, match="not a live node"):
        gen.release([node])
    with pytest.raises(ValueError, match="p_step"):
        SimProblem(p_step=1.5)


def test_meter_peak_pages_is_the_pool_peak_of_the_search():
    # a fresh simulator per search: the meter's peak must be the pool's true peak (tracked per page
    # allocation), for a strategy that branches and prunes
    prob = SimProblem(num_steps=5, p_step=0.8, prompt_tokens=40)
    gen = SimGenerator(prob, page_size=4)
    res = Rebase().run(gen, prob.prompt, Budget(n=9), SimPRM(), seed=1)
    assert res.meter.peak_kv_pages == gen.stats().peak_pages
    assert max(e.live_pages for e in res.trace) <= res.meter.peak_kv_pages


class _BatchForkGenerator(SimGenerator):
    def fork_many(self, nodes, ns):
        self.batched = getattr(self, "batched", 0) + 1
        return [self.fork(x, n) for x, n in zip(nodes, ns)]


@pytest.mark.parametrize("name,strategy", ALL, ids=[a for a, _ in ALL])
def test_batched_fork_path_gives_the_same_search(name, strategy):
    prob = SimProblem(num_steps=5, p_step=0.75)
    out = []
    for cls in (SimGenerator, _BatchForkGenerator):
        gen = cls(prob)
        r = strategy.run(gen, prob.prompt, Budget(n=8), SimPRM(seed=2), seed=5)
        assert gen.live_nodes() == 0 and gen.live_pages() == 0
        out.append(([(c.text, c.answer, c.weight) for c in r.candidates], r.answer, r.meter.forks,
                    r.meter.kv_bytes_read))
    assert out[0] == out[1]
