"""How each tree strategy ranks and keeps branches, checked against its docstring on the simulator.

``test_search_sim.py`` checks the strategies structurally (no leaks, counts sum to the width,
determinism); here every per-depth decision is replayed from what the strategy actually did: a
recording generator logs each ``fork`` / ``extend`` (a node is named by the tuple of its step uids,
which forks share and every generated step extends) and a recording PRM logs what it scored. Each
``StepEvent`` is then checked against the rule the docstring states (beam: top
``ceil(width / beam_width)``; DVTS: the best child per subtree; REBASE: sequential-ceil of
``width * softmax(score / T)``; particle filtering: log-weights ``sum logit(r) / tau`` since the last
resampling, ESS, systematic counts within floor/ceil of ``N * w``; MCTS: UCT selection with backups to
the root), and the next depth's extend is checked to grow exactly the children the event allocated.

The one statistical check (multinomial resampling) is a z-test at |z| < 4.5 (false failure ~1e-5)
with fixed seeds; everything else is exact.
"""
import dataclasses
import math

import numpy as np
import pytest

from ttscale.search import (DVTS, MCTS, BeamSearch, Budget, ParticleFilter, Rebase, Verifier, aggregate,
                            allocate, ess, softmax)
from ttscale.search.simulator import SimExact, SimGenerator, SimPRM, SimProblem, sim_problems

Z = 4.5


def _key(node):
    """A node's identity: the uids of its generated steps (a fork has its parent's key until extended)."""
    return tuple(node.step_uids)


class _RecGen(SimGenerator):
    """A SimGenerator that logs every fork and extend.

    ``short_steps``: a solution whose step number ``short_steps`` got an odd uid ends after that step
    (the others are ``problem.num_steps`` steps long), so that branches finish at different depths."""

    def __init__(self, problem, short_steps=None, **kw):
        super().__init__(problem, **kw)
        self.short = None if short_steps is None else dataclasses.replace(problem, num_steps=short_steps)
        self.forks, self.extends = [], []   # (key, n); (keys before, keys after, finished after)

    def fork(self, node, n):
        self.forks.append((_key(self._node(node)), n))
        return super().fork(node, n)

    def extend(self, nodes, *, seed, greedy=False):
        pre = [_key(self._node(x)) for x in nodes]
        if self.short is None:
            out = super().extend(nodes, seed=seed, greedy=greedy)
        else:
            out, long_problem = [None] * len(nodes), self.problem
            s0 = self.short.num_steps
            short = [len(x.step_uids) >= s0 and x.step_uids[s0 - 1] % 2 == 1 for x in nodes]
            for flag, s in ((False, seed), (True, seed + 1)):
                idx = [i for i, f in enumerate(short) if f == flag]
                if not idx:
                    continue
                self.problem = self.short if flag else long_problem
                try:
                    steps = super().extend([nodes[i] for i in idx], seed=s, greedy=greedy)
                finally:
                    self.problem = long_problem
                for i, st in zip(idx, steps):
                    out[i] = st
        self.extends.append((pre, [_key(x) for x in nodes], [bool(x.finished) for x in nodes]))
        return out


class _Recording:
    """Mixed into a verifier: logs each call, [(key, finished)] per call, and key -> step scores."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls, self.seen = [], {}

    def _step_scores(self, gen, nodes):
        out = super()._step_scores(gen, nodes)
        self.calls.append([(_key(x), bool(gen.finished(x))) for x in nodes])
        for x, s in zip(nodes, out):
            self.seen[_key(x)] = list(s)
        return out

    def agg(self, key):
        return aggregate(self.seen[key], self.aggregate)


class _RecPRM(_Recording, SimPRM):
    pass


class _RecExact(_Recording, SimExact):
    pass


def _expand(keys, counts):
    """The nodes a depth extends after ``keys`` got ``counts`` children (children share the parent's key)."""
    return [k for k, c in zip(keys, counts) for _ in range(int(c))]


def _logit(p):
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


# ------------------------------------------------------------------------------------------ beam / REBASE
def _check_width_tree(res, gen, ver, n, rule_counts):
    """Beam search and REBASE: at each depth the unfinished leaves of that depth are scored, width =
    n - finished so far, ``rule_counts(scores, width)`` gives the children, and the next extend grows
    exactly those children; finished leaves are recorded with their score."""
    assert gen.live_nodes() == 0
    events = {ev.depth: ev for ev in res.trace}
    finished, fin_scores = 0, []
    for d, (pre, post, fin) in enumerate(gen.extends, start=1):
        for k, f in zip(post, fin):
            if f:
                fin_scores.append(ver.agg(k))
        finished += sum(fin)
        live = [k for k, f in zip(post, fin) if not f]
        width = n - finished
        if not live or width <= 0:
            assert d not in events and d == len(gen.extends)
            break
        ev = events[d]
        assert ev.finished == finished
        assert ev.scores == pytest.approx([ver.agg(k) for k in live], abs=0)
        counts = rule_counts(ev.scores, width)
        assert ev.children == counts.tolist(), (d, ev.scores, width)
        assert ev.kept == int((counts > 0).sum()) and ev.pruned == int((counts == 0).sum())
        assert d < len(gen.extends), "a depth allocated children that were never extended"
        assert gen.extends[d][0] == _expand(live, counts), f"depth {d}: the extended nodes are not its children"
    assert len(events) == len(res.trace)
    assert [c.score for c in res.candidates if c.finished] == pytest.approx(fin_scores, abs=0)


@pytest.mark.parametrize("n,bw,short", [(8, 2, None), (9, 4, None), (12, 3, 2), (7, 2, 3), (6, 1, 2)])
def test_beam_keeps_the_top_scores(n, bw, short):
    """Each depth keeps exactly the best ceil(width / beam_width) leaves (ties by index), with the
    counts of allocate "topk" (beam_width each, the remainder to the best), width = n - finished."""
    prob = SimProblem(num_steps=5, p_step=0.75, step_tokens=(2, 4))
    pruned = 0
    for seed in range(3):
        gen, ver = _RecGen(prob, short), _RecPRM(noise=1.0, seed=seed)
        res = BeamSearch(beam_width=bw).run(gen, prob.prompt, Budget(n=n), ver, seed=seed)

        def topk(scores, width):
            k = math.ceil(width / bw)
            best = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
            counts = allocate(scores, width, "topk", k=k)
            assert {i for i, c in enumerate(counts) if c > 0} == set(best)
            return counts

        _check_width_tree(res, gen, ver, n, topk)
        pruned += sum(ev.pruned for ev in res.trace)
    assert pruned > 0 or bw == 1


@pytest.mark.parametrize("short", [None, 2])
def test_rebase_follows_its_temperature(short):
    """Children per depth are allocate(scores, width, "rebase", temperature=T) for the strategy's T,
    and a low temperature gives the best leaf more children than a high one."""
    prob = SimProblem(num_steps=4, p_step=0.75, step_tokens=(2, 4))
    n = 10
    for seed in range(3):
        first = {}
        for T in (0.05, 4.0):
            gen, ver = _RecGen(prob, short), _RecPRM(noise=1.0, seed=seed)
            res = Rebase(temperature=T).run(gen, prob.prompt, Budget(n=n), ver, seed=seed)
            _check_width_tree(res, gen, ver, n,
                              lambda s, w: allocate(s, w, "rebase", temperature=T))
            first[T] = res.trace[0]
        # the same seed gives the same first depth: same scores, different allocations
        assert first[0.05].scores == first[4.0].scores
        best = int(np.argmax(first[0.05].scores))
        assert first[0.05].children[best] > first[4.0].children[best], (first[0.05].children, first[4.0].children)


# ------------------------------------------------------------------------------------------ DVTS
@pytest.mark.parametrize("n,bw,short", [(8, 2, None), (12, 4, None), (9, 3, 2), (6, 2, 3), (3, 4, None)])
def test_dvts_keeps_the_best_child_of_each_subtree(n, bw, short):
    """n // beam_width subtrees; each depth samples beam_width children per subtree and keeps the
    best-scored one (first on ties), which is the only one extended next (or recorded if finished)."""
    prob = SimProblem(num_steps=5, p_step=0.7, step_tokens=(2, 4))
    m = min(bw, n)
    for seed in range(3):
        gen, ver = _RecGen(prob, short), _RecPRM(noise=1.0, seed=seed)
        res = DVTS(beam_width=bw).run(gen, prob.prompt, Budget(n=n), ver, seed=seed)
        assert gen.live_nodes() == 0
        assert len(res.trace) == len(gen.extends)
        assert len(gen.extends[0][0]) == m * max(1, n // m)
        fin_scores = []
        for d, (ev, (pre, post, fin)) in enumerate(zip(res.trace, gen.extends), start=1):
            assert ev.depth == d and len(ev.scores) == len(post) == len(ev.children) and len(post) % m == 0
            assert ev.scores == pytest.approx([ver.agg(k) for k in post], abs=0)
            heads = []
            for g in range(len(post) // m):
                sc = ev.scores[g * m:(g + 1) * m]
                assert len(set(pre[g * m:(g + 1) * m])) == 1  # one subtree: the children of one node
                j = max(range(m), key=lambda t: (sc[t], -t))
                assert ev.children[g * m:(g + 1) * m] == [int(t == j) for t in range(m)]
                if fin[g * m + j]:
                    fin_scores.append(sc[j])
                else:
                    heads.append(post[g * m + j])
            assert ev.pruned == len(post) - len(post) // m
            if heads:
                assert gen.extends[d][0] == _expand(heads, [m] * len(heads)), f"depth {d}: not the best children kept"
            else:
                assert d == len(gen.extends)
        assert [c.score for c in res.candidates] == pytest.approx(fin_scores, abs=0)
        assert all(c.finished for c in res.candidates)


# ------------------------------------------------------------------------------------------ particle filter
def _replay_pf(res, gen, ver, N, tau, thr, systematic):
    """Replays a particle filter from its logs, with the docstring's rules: each step every particle's
    log-weight gains logit(r) / tau (r its score; a finished particle keeps its last score), a group of
    m copies of a finished particle weighs m x; ESS over the copies; resample when thr is None or
    ESS < thr * N; after resampling every log-weight is 0. Returns [(event, log-weights, resampled)]."""
    parts = [dict(key=(), fin=False, mult=1, L=0.0, r=None) for _ in range(N)]
    out = []
    for d, ev in enumerate(res.trace, start=1):
        assert ev.depth == d
        active = [p for p in parts if not p["fin"]]
        pre, post, fin = gen.extends[d - 1]
        assert pre == [p["key"] for p in active], f"depth {d}: extended nodes are not the unfinished particles"
        assert ver.calls[d - 1] == list(zip(post, fin))
        for p, k, f in zip(active, post, fin):
            p.update(key=k, fin=f, r=ver.agg(k))
        assert len(ev.scores) == len(parts)
        assert ev.scores == pytest.approx([p["r"] for p in parts], abs=0)
        for p in parts:
            p["L"] += float(_logit(p["r"])) / tau
        L = np.array([p["L"] for p in parts])
        mult = np.array([p["mult"] for p in parts])
        logw = L + np.log(mult)
        e = ess(np.repeat(np.exp(L - L.max()), mult))
        assert ev.ess == pytest.approx(e, rel=1e-9), f"depth {d}: ESS of the documented weights"
        if all(p["fin"] for p in parts):
            assert ev.children == mult.tolist()
            out.append((ev, logw, False))
            assert d == len(res.trace)
            break
        resampled = thr is None or e < thr * N
        c = np.array(ev.children)
        if resampled:
            assert c.sum() == N and (c >= 0).all()
            if systematic:
                Nw = N * softmax(logw)
                assert ((c >= np.floor(Nw - 1e-9)) & (c <= np.ceil(Nw + 1e-9))).all(), (d, c.tolist(), Nw)
            grow = [(p, int(k)) for p, k in zip(parts, c) if k > 0 and not p["fin"]]
            parts = ([dict(p, mult=int(k), L=0.0) for p, k in zip(parts, c) if k > 0 and p["fin"]]
                     + [dict(p, mult=1, L=0.0) for p, k in grow for _ in range(k)])
            assert ev.pruned == int((c == 0).sum())
        else:
            assert ev.children == mult.tolist() and ev.pruned == 0
        out.append((ev, logw, resampled))
        if all(p["fin"] for p in parts):  # resampling kept only finished particles: nothing left to extend
            assert d == len(res.trace)
    assert all(p["fin"] for p in parts), "the particle filter ended before every particle finished"
    assert len(out) == len(res.trace) == len(gen.extends)
    # each finished particle is one candidate, weighted by its multiplicity
    assert [c.weight for c in res.candidates] == [p["mult"] for p in parts]
    assert sum(c.weight for c in res.candidates) == N
    assert [c.score for c in res.candidates] == pytest.approx([p["r"] for p in parts], abs=0)
    assert gen.live_nodes() == 0
    return out


@pytest.mark.parametrize("N,tau,short", [(8, 1.0, None), (10, 0.5, 2), (7, 2.0, 3), (16, 1.0, 2)])
def test_particle_filter_resamples_by_weight_every_step(N, tau, short):
    """Systematic resampling every step: counts within floor/ceil of N * softmax(log-weights), the
    log-weights restart from 0 after each resampling, finished particles resampled as weighted groups."""
    prob = SimProblem(num_steps=5, p_step=0.75, step_tokens=(2, 4))
    grouped = 0
    for seed in range(4):
        gen, ver = _RecGen(prob, short), _RecPRM(noise=1.0, seed=seed)
        res = ParticleFilter("systematic", tau=tau).run(gen, prob.prompt, Budget(n=N), ver, seed=seed)
        out = _replay_pf(res, gen, ver, N, tau, None, True)
        assert all(r for _, _, r in out[:-1])
        grouped += sum(c.weight > 1 for c in res.candidates)
    if short:
        assert grouped > 0  # finished particles were copied (multiplicity > 1) at least once


@pytest.mark.parametrize("resample", ["systematic", "multinomial"])
@pytest.mark.parametrize("short", [None, 2])
def test_particle_filter_resamples_only_below_the_ess_threshold(resample, short):
    """With ess_threshold: resampling exactly at the depths where ESS < threshold * N; in between the
    log-weights keep accumulating (children = multiplicities, nothing pruned)."""
    prob = SimProblem(num_steps=6, p_step=0.8, step_tokens=(2, 4))
    N, thr = 8, 0.5
    kinds = set()
    for seed in range(6):
        gen, ver = _RecGen(prob, short), _RecPRM(noise=0.6, signal=1.0, seed=seed)
        res = ParticleFilter(resample, ess_threshold=thr).run(gen, prob.prompt, Budget(n=N), ver, seed=seed)
        out = _replay_pf(res, gen, ver, N, 1.0, thr, resample == "systematic")
        kinds |= {r for _, _, r in out[:-1]}
    assert kinds == {True, False}  # both decisions were exercised


@pytest.mark.parametrize("resample", ["systematic", "multinomial"])
def test_particle_filter_equal_weights_are_not_below_the_threshold(resample):
    """Every particle scored alike: ESS = N exactly, which is not < 1.0 * N, so nothing is resampled
    (multinomial resampling of equal weights would almost surely duplicate and drop particles)."""
    prob = SimProblem(num_steps=4, p_step=1.0, step_tokens=(2, 3))
    N = 8
    for seed in range(3):
        gen, ver = _RecGen(prob), _RecExact()
        res = ParticleFilter(resample, ess_threshold=1.0).run(gen, prob.prompt, Budget(n=N), ver, seed=seed)
        out = _replay_pf(res, gen, ver, N, 1.0, 1.0, resample == "systematic")
        assert [e.ess for e, _, _ in out] == [N] * (prob.num_steps + 1)
        assert not any(r for _, _, r in out)
        assert all(e.children == [1] * N for e, _, _ in out)
        assert gen.forks == [((), N - 1)] and len({c.text for c in res.candidates}) == N


def test_multinomial_resampling_follows_the_weights():
    """Multinomial resampling every step: over many depths and seeds, sum_i children_i * x_i (x the
    log-weights) matches its expectation N * sum_i w_i x_i within 4.5 standard deviations."""
    prob = SimProblem(num_steps=4, p_step=0.75, step_tokens=(2, 3))
    N, tau = 8, 1.0
    dev = var = 0.0
    events = 0
    for seed in range(120):
        gen, ver = _RecGen(prob), _RecPRM(noise=1.0, seed=seed)
        res = ParticleFilter("multinomial", tau=tau).run(gen, prob.prompt, Budget(n=N), ver, seed=seed)
        for ev, logw, resampled in _replay_pf(res, gen, ver, N, tau, None, False):
            if not resampled:
                continue
            w = softmax(logw)
            x = logw - logw.mean()
            mu = float(w @ x)
            dev += float(np.dot(ev.children, x)) - N * mu
            var += N * float(w @ (x * x) - mu * mu)
            events += 1
    assert events == 120 * 4
    z = dev / math.sqrt(var)
    assert abs(z) < Z, z


# ------------------------------------------------------------------------------------------ MCTS
def _mcts_expansions(gen, k):
    """(expanded leaf, its children) per iteration: a fork of k copies followed by their extend."""
    out, ext = [], iter(gen.extends)
    for key, n in gen.forks:
        if n == 1:
            continue  # a rollout fork
        assert n == k
        pre, post, fin = next(e for e in ext if e[0] == [key] * k)
        assert not any(fin)
        out.append((key, post))
    return out


@pytest.mark.parametrize("c_uct,k,n", [(1.0, 2, 24), (0.3, 2, 20), (2.0, 3, 21)])
def test_mcts_selects_by_uct_with_backups_to_the_root(c_uct, k, n):
    """Replays the search: each iteration expands the leaf reached from the root by maximising
    Q + c_uct * sqrt(ln N_parent / N_child) (Q = mean backed-up value), where every rollout value is
    backed up along the whole path to the root; the root is visited once per rollout."""
    prob = SimProblem(num_steps=14, p_step=0.8, step_tokens=(2, 3))  # deeper than the tree gets: no terminal leaves
    for seed in range(3):
        gen, ver = _RecGen(prob), _RecPRM(noise=1.0, seed=seed)
        res = MCTS(c_uct=c_uct, expand_width=k).run(gen, prob.prompt, Budget(n=n), ver, seed=seed)
        exps = _mcts_expansions(gen, k)
        assert len(exps) == len(res.trace) == n // k
        tree = {(): dict(n=0, w=0.0, kids=[], parent=None)}
        for it, ((leaf, kids), ev) in enumerate(zip(exps, res.trace), start=1):
            x = ()
            while tree[x]["kids"]:
                ln = math.log(max(1, tree[x]["n"]))
                x = max(tree[x]["kids"], key=lambda c: math.inf if tree[c]["n"] == 0 else
                        tree[c]["w"] / tree[c]["n"] + c_uct * math.sqrt(ln / tree[c]["n"]))
            assert leaf == x, f"seed {seed}, iteration {it}: expanded {leaf}, UCT selects {x}"
            tree[x]["kids"] = list(kids)
            assert len(ev.scores) == k
            for c, v in zip(kids, ev.scores):
                tree[c] = dict(n=0, w=0.0, kids=[], parent=x)
                y = c
                while y is not None:
                    tree[y]["n"] += 1
                    tree[y]["w"] += v
                    y = tree[y]["parent"]
        assert tree[()]["n"] == n == len(res.candidates)
        # a child's value is its rollout's score: the trace's values are the rollouts' scores
        roll = sorted(c.score for c in res.candidates)
        assert sorted(v for ev in res.trace for v in ev.scores) == pytest.approx(roll, abs=0)
        assert gen.live_nodes() == 0


class _BranchVerifier(Verifier):
    """Scores 1 every node below the root's first child (first step uid 0 on a fresh SimGenerator), else 0."""
    kind = "exact"

    def _step_scores(self, gen, nodes):
        return [[1.0 if gen._node(x).step_uids[:1] == [0] else 0.0] for x in nodes]


@pytest.mark.parametrize("c_uct", [0.5, 1.0, 2.0])
def test_mcts_spends_most_rollouts_on_the_rewarded_branch(c_uct):
    prob = SimProblem(num_steps=40, p_step=0.8, step_tokens=(2, 2))
    n = 40
    gen = _RecGen(prob)
    res = MCTS(c_uct=c_uct, expand_width=2).run(gen, prob.prompt, Budget(n=n), _BranchVerifier(), seed=0)
    exps = _mcts_expansions(gen, 2)
    assert exps[0][0] == () and [k[:1] for k in exps[0][1]] == [(0,), (1,)]
    under = {0: 1, 1: 1}  # rollouts below each root child (its own first)
    for leaf, _ in exps[1:]:
        under[leaf[0]] += 2
    assert under[0] + under[1] == n
    assert under[0] >= 0.75 * n, under
    if c_uct >= 1:
        # UCT explores: the root's visit count grows with every rollout (ln 40 > 3.6), so the bonus of
        # the unrewarded branch, c_uct * sqrt(ln N_root / 1), overtakes 1 + the rewarded one's bonus
        assert under[1] > 1, under
    assert res.answer is not None and gen.live_nodes() == 0


# ------------------------------------------------------------------------------------------ end to end
def test_dvts_pf_mcts_beat_sampling_with_a_good_prm():
    """With an informative PRM, DVTS, particle filtering and MCTS are more accurate than one sample
    (test_search_sim checks REBASE and beam search the same way)."""
    probs = sim_problems(40, seed=1, steps=(5, 8), p=(0.6, 0.8), step_tokens=(2, 4))
    exp_single = np.mean([p.q for p in probs])
    acc = {}
    for name, strat in [("dvts", DVTS(2)), ("pf", ParticleFilter()), ("mcts", MCTS())]:
        hits = 0
        for i, p in enumerate(probs):
            gen = SimGenerator(p)
            hits += strat.run(gen, p.prompt, Budget(n=8), SimPRM(noise=0.5, seed=i), seed=i).answer == p.answer
        acc[name] = hits / len(probs)
    assert all(a > exp_single + 0.15 for a in acc.values()), (acc, exp_single)
