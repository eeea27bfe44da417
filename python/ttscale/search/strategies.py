"""Search strategies over a ``Generator`` and a ``Verifier``.

Every strategy is a small dataclass with ``run(gen, prompt, budget, verifier=None, seed=0)`` that
returns a ``SearchResult``. Shared rules:

* the prompt is prefilled once (``gen.root``); branches are forks, never re-prefilled prefixes;
  a node that gets ``c`` children is forked ``c - 1`` times and itself continues as the last child;
* all branches of a depth are extended in ONE ``gen.extend`` call (one lock-step batch);
* before each extend the meter checks the budget caps; on ``BudgetStop`` the strategy stops,
  keeps what finished and reports the reason;
* every node is released before ``run`` returns (finished ones as soon as they are recorded).

``budget.n`` is what the papers call N: samples (best-of-N, self-consistency, MCTS rollouts),
total beams (beam search: ``ceil(n / beam_width)`` kept, ``n`` children shared among them), total
leaves (DVTS: ``n // beam_width`` subtrees, one when ``n < beam_width``), the width (REBASE) or
particles (particle filtering).
"""
from __future__ import annotations

import contextvars
import functools
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from .allocate import allocate, ess, softmax
from .base import (Budget, BudgetStop, Candidate, Generator, Meter, Node, SearchResult, StepEvent, Verifier,
                   aggregate, logit, select_answer)

__all__ = ["BestOfN", "SelfConsistency", "BeamSearch", "DVTS", "Rebase", "ParticleFilter", "MCTS", "STRATEGIES"]


_ACTIVE_RUNS: contextvars.ContextVar = contextvars.ContextVar("ttscale_search_runs", default=None)


def _releases_on_error(run):
    """Wraps a strategy's ``run``: if it raises (a generator or verifier error, KeyboardInterrupt),
    the nodes it still holds are released before the exception propagates, so no KV pages leak."""
    @functools.wraps(run)
    def wrapper(self, *args, **kwargs):
        runs: List["_Run"] = []
        token = _ACTIVE_RUNS.set(runs)
        try:
            return run(self, *args, **kwargs)
        except BaseException:
            for r in runs:
                try:
                    r.release(list(r.live.values()))
                except Exception:  # the original error matters more than a failed clean-up
                    pass
            raise
        finally:
            _ACTIVE_RUNS.reset(token)
    return wrapper


class _Run:
    """Plumbing shared by the strategies: rng and seeds, meter, live-node set, candidates, trace."""

    def __init__(self, name: str, gen: Generator, verifier: Optional[Verifier], budget: Budget, seed: int,
                 needs_verifier: bool = False) -> None:
        runs = _ACTIVE_RUNS.get()
        if runs is not None:
            runs.append(self)
        if not isinstance(budget, Budget):
            raise ValueError(f"{name}: budget must be a ttscale.search.Budget, got {type(budget).__name__}")
        if needs_verifier and verifier is None:
            raise ValueError(f"{name}: this strategy needs a verifier (a PRM, ORM or exact checker)")
        self.name, self.gen, self.verifier, self.budget = name, gen, verifier, budget
        self.rng = np.random.default_rng(seed)
        self.meter = Meter(gen, verifier, budget)
        self.live: Dict[int, Node] = {}
        self.cands: List[Candidate] = []
        self.trace: List[StepEvent] = []

    # -- nodes
    def root(self, prompt: str) -> Node:
        node = self.gen.root(prompt)
        self.live[id(node)] = node
        return node

    def fork(self, node: Node, n: int) -> List[Node]:
        if n <= 0:
            return []
        kids = self.gen.fork(node, n)
        for k in kids:
            self.live[id(k)] = k
        return kids

    def children(self, node: Node, c: int) -> List[Node]:
        """``c`` children of ``node`` with the node itself as the last one (c == 0 releases it)."""
        if c == 0:
            self.release([node])
            return []
        return self.fork(node, c - 1) + [node]

    def children_many(self, nodes: Sequence[Node], counts: Sequence[int]) -> List[List[Node]]:
        """``children(node, c)`` for a whole depth. A generator with ``fork_many(nodes, ns)`` forks
        every parent in one call (an engine can then run the parents' pending tokens in one batch)."""
        counts = [int(c) for c in counts]
        fork_many = getattr(self.gen, "fork_many", None)
        todo = [(x, c - 1) for x, c in zip(nodes, counts) if c >= 2]
        kids: Dict[int, List[Node]] = {}
        if callable(fork_many) and len(todo) > 1:
            for (x, _), ks in zip(todo, fork_many([x for x, _ in todo], [k for _, k in todo])):
                for k in ks:
                    self.live[id(k)] = k
                kids[id(x)] = list(ks)
        out = []
        for x, c in zip(nodes, counts):
            if id(x) in kids:
                out.append(kids[id(x)] + [x])
            else:
                out.append(self.children(x, c))
        return out

    def release(self, nodes: Sequence[Node]) -> None:
        nodes = [x for x in nodes if id(x) in self.live]
        for x in nodes:
            del self.live[id(x)]
        if nodes:
            self.gen.release(nodes)

    def extend(self, nodes: Sequence[Node], greedy: bool = False):
        """One step for all ``nodes`` (one batch); raises BudgetStop before spending past a cap."""
        if not nodes:
            return []
        self.meter.admit(nodes)
        return self.gen.extend(list(nodes), seed=int(self.rng.integers(2**31 - 1)), greedy=greedy)

    # -- scores / candidates
    def step_scores(self, nodes: Sequence[Node]) -> List[List[float]]:
        if self.verifier is None:
            return [[] for _ in nodes]
        return self.verifier.step_scores(self.gen, nodes)

    def agg(self, steps: Sequence[float]) -> float:
        return aggregate(steps, self.verifier.aggregate) if self.verifier is not None and steps else 0.0

    def record(self, node: Node, steps: Sequence[float], weight: float = 1.0) -> Candidate:
        c = Candidate(text=self.gen.text(node), answer=self.gen.answer(node), step_scores=list(steps),
                      score=self.agg(steps), finished=self.gen.finished(node), weight=weight)
        self.cands.append(c)
        return c

    def event(self, depth: int, scores, children, pruned: int, **kw) -> None:
        self.meter.sync()
        self.trace.append(StepEvent(depth=depth, scores=[float(s) for s in scores],
                                    kept=int(sum(1 for c in children if c > 0)), pruned=int(pruned),
                                    children=[int(c) for c in children], live_pages=self.meter.live_pages(),
                                    generated_tokens=self.meter.generated_tokens,
                                    finished=sum(1 for c in self.cands if c.finished), **kw))

    def done(self, stop: str, select: str) -> SearchResult:
        self.release(list(self.live.values()))
        self.meter.sync()
        sel = select_answer(self.cands, select)
        return SearchResult(self.name, None if sel is None else self.cands[sel].answer, sel, self.cands,
                            self.trace, self.meter, stop)


def _check_select(obj) -> None:
    if obj.select not in ("verifier", "majority", "weighted"):
        raise ValueError(f"{type(obj).__name__}: select must be 'verifier', 'majority' or 'weighted', got {obj.select!r}")
    if not isinstance(obj.max_steps, (int, np.integer)) or obj.max_steps < 1:
        raise ValueError(f"{type(obj).__name__}: max_steps must be an integer >= 1, got {obj.max_steps!r}")


def _check(name: str, **kw) -> None:
    for k, v in kw.items():
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}: {k} must be an integer >= 1, got {v!r}")


def _sample_to_end(r: _Run, nodes: List[Node], max_steps: int, depth0: int = 0, trace: bool = True):
    """Extend ``nodes`` step by step (one batch per depth) until all finish; records and releases
    each node as it finishes. Returns (stop reason, the candidate of each input node, in order)."""
    out: List[Optional[Candidate]] = [None] * len(nodes)
    active, depth = list(enumerate(nodes)), depth0
    stop = "finished"
    while active:
        try:
            if depth >= max_steps:
                raise BudgetStop("max_depth")
            r.extend([x for _, x in active])
        except BudgetStop as e:
            # unfinished: kept as candidates (no answer, not scored: scoring would spend past the cap)
            for i, x in active:
                out[i] = r.record(x, [])
            r.release([x for _, x in active])
            return str(e), out
        depth += 1
        done = [(i, x) for i, x in active if r.gen.finished(x)]
        active = [(i, x) for i, x in active if not r.gen.finished(x)]
        for (i, x), s in zip(done, r.step_scores([x for _, x in done])):
            out[i] = r.record(x, s)
        r.release([x for _, x in done])
        if trace:
            r.event(depth, [], [1] * len(active), 0)
    return stop, out


@dataclass
class BestOfN:
    """N independent samples; the answer by verifier score, majority vote or weighted majority."""
    select: str = "verifier"   # "verifier" | "majority" | "weighted"
    max_steps: int = 64

    @property
    def name(self) -> str:
        return {"verifier": "best-of-n", "majority": "majority", "weighted": "weighted-bon"}[self.select]

    def __post_init__(self) -> None:
        _check_select(self)

    @_releases_on_error
    def run(self, gen: Generator, prompt: str, budget: Budget, verifier: Optional[Verifier] = None,
            seed: int = 0) -> SearchResult:
        r = _Run(self.name, gen, verifier, budget, seed, needs_verifier=self.select != "majority")
        root = r.root(prompt)
        stop, _ = _sample_to_end(r, r.children(root, budget.n), self.max_steps)
        return r.done(stop, self.select)


@dataclass
class SelfConsistency:
    """Majority vote over up to N samples drawn in waves of ``wave``; stops early once the vote is
    settled: the leader's margin exceeds the samples left (the outcome can no longer change), or,
    with ``threshold``, the leader's share reaches it after ``min_samples`` (its-hub's adaptive SC)."""
    wave: int = 4
    threshold: Optional[float] = None
    min_samples: int = 4
    max_steps: int = 64
    name: str = "self-consistency"

    @_releases_on_error
    def run(self, gen: Generator, prompt: str, budget: Budget, verifier: Optional[Verifier] = None,
            seed: int = 0) -> SearchResult:
        _check(self.name, wave=self.wave)
        r = _Run(self.name, gen, None, budget, seed)
        root = r.root(prompt)
        drawn, stop = 0, "finished"
        while drawn < budget.n:
            m = min(self.wave, budget.n - drawn)
            stop, _ = _sample_to_end(r, r.fork(root, m), self.max_steps, trace=False)
            drawn += m
            votes: Dict[str, int] = {}
            for c in r.cands:
                if c.finished and c.answer is not None:
                    votes[c.answer] = votes.get(c.answer, 0) + 1
            top = sorted(votes.values(), reverse=True) + [0, 0]
            r.event(drawn, [], [], 0)
            if stop != "finished":
                break
            left = budget.n - drawn
            if left > 0 and top[0] - top[1] > left:
                stop = "settled"
                break
            if (left > 0 and self.threshold is not None and drawn >= self.min_samples
                    and top[0] >= self.threshold * drawn):
                stop = "settled"
                break
        return r.done(stop, "majority")


@dataclass
class BeamSearch:
    """Step-level beam search (search-and-learn): N beams; each depth keeps the best
    ``ceil(width / beam_width)`` by verifier score and splits the ``width`` children among them evenly
    (``beam_width`` each when it divides; the remainder goes to the best, as ``allocate("topk")``),
    where ``width = N - finished`` (finished beams leave the pool and consume width). ``lookahead`` > 0
    scores a beam by a greedy roll of that many further steps (on a fork, released after)."""
    beam_width: int = 4
    lookahead: int = 0
    select: str = "verifier"
    max_steps: int = 64
    name: str = "beam"

    def __post_init__(self) -> None:
        _check_select(self)

    @_releases_on_error
    def run(self, gen: Generator, prompt: str, budget: Budget, verifier: Optional[Verifier] = None,
            seed: int = 0) -> SearchResult:
        _check(self.name, beam_width=self.beam_width)
        r = _Run(self.name, gen, verifier, budget, seed, needs_verifier=True)
        active = r.children(r.root(prompt), budget.n)
        depth, stop = 0, "finished"
        while active:
            try:
                if depth >= self.max_steps:
                    raise BudgetStop("max_depth")
                r.extend(active)
            except BudgetStop as e:
                stop = str(e)
                break
            depth += 1
            steps = r.step_scores(active)
            live, live_steps = [], []
            for x, s in zip(active, steps):
                if gen.finished(x):
                    r.record(x, s)
                    r.release([x])
                else:
                    live.append(x)
                    live_steps.append(s)
            width = budget.n - sum(1 for c in r.cands if c.finished)
            if not live or width <= 0:
                r.release(live)
                active = []
                break
            try:
                scores = self._lookahead(r, live) if self.lookahead else [r.agg(s) for s in live_steps]
            except BudgetStop as e:  # the lookahead rolls ran into a cap
                stop, active = str(e), live
                break
            counts = allocate(scores, width, "topk", k=math.ceil(width / self.beam_width))
            r.event(depth, scores, counts, int((counts == 0).sum()))
            active = [k for ks in r.children_many(live, counts) for k in ks]
        for x in active:  # stopped by budget or depth: the unfinished beams stay on record, unscored
            r.record(x, [])
        return r.done(stop, self.select)

    def _lookahead(self, r: _Run, live: List[Node]) -> List[float]:
        rolls = [r.fork(x, 1)[0] for x in live]
        try:
            for _ in range(self.lookahead):
                todo = [y for y in rolls if not r.gen.finished(y)]
                if not todo:
                    break
                r.extend(todo, greedy=True)
            return [r.agg(s) for s in r.step_scores(rolls)]
        finally:
            r.release(rolls)


@dataclass
class DVTS:
    """Diverse verifier tree search: ``n // beam_width`` independent subtrees (one with ``n`` children
    when ``n < beam_width``); at each depth every
    subtree samples ``beam_width`` children of its current node (all subtrees in one batch) and keeps
    the one the verifier scores best (allocate "topk" with k = 1, width = 1, per subtree)."""
    beam_width: int = 4
    select: str = "verifier"
    max_steps: int = 64
    name: str = "dvts"

    def __post_init__(self) -> None:
        _check_select(self)

    @_releases_on_error
    def run(self, gen: Generator, prompt: str, budget: Budget, verifier: Optional[Verifier] = None,
            seed: int = 0) -> SearchResult:
        _check(self.name, beam_width=self.beam_width)
        r = _Run(self.name, gen, verifier, budget, seed, needs_verifier=True)
        m = min(self.beam_width, budget.n)
        heads = r.children(r.root(prompt), max(1, budget.n // m))  # one current node per subtree
        depth, stop = 0, "finished"
        while heads:
            groups = r.children_many(heads, [m] * len(heads))
            flat = [k for g in groups for k in g]
            try:
                if depth >= self.max_steps:
                    raise BudgetStop("max_depth")
                r.extend(flat)
            except BudgetStop as e:
                stop = str(e)
                # keep one branch per subtree on record (the rest are identical-prefix forks)
                for g in groups:
                    r.record(g[-1], [])
                heads = []
                break
            depth += 1
            steps = r.step_scores(flat)
            i, new_heads, all_scores, all_counts = 0, [], [], []
            for g in groups:
                s = steps[i:i + len(g)]
                i += len(g)
                sc = [r.agg(x) for x in s]
                keep = allocate(sc, 1, "topk", k=1)
                all_scores += sc
                all_counts += keep.tolist()
                j = int(np.argmax(keep))
                r.release([g[t] for t in range(len(g)) if t != j])
                if gen.finished(g[j]):
                    r.record(g[j], s[j])
                    r.release([g[j]])
                else:
                    new_heads.append(g[j])
            r.event(depth, all_scores, all_counts, len(flat) - len(groups))
            heads = new_heads
        return r.done(stop, self.select)


@dataclass
class Rebase:
    """REBASE (Wu et al. 2024): each depth, ``width = N - finished leaves``; the unfinished leaves get
    children by sequential-ceil rounding of ``width * softmax(score / temperature)``."""
    temperature: float = 0.2
    select: str = "weighted"
    max_steps: int = 64
    name: str = "rebase"

    def __post_init__(self) -> None:
        _check_select(self)

    @_releases_on_error
    def run(self, gen: Generator, prompt: str, budget: Budget, verifier: Optional[Verifier] = None,
            seed: int = 0) -> SearchResult:
        if not self.temperature > 0:
            raise ValueError(f"Rebase: temperature must be > 0, got {self.temperature!r}")
        r = _Run(self.name, gen, verifier, budget, seed, needs_verifier=True)
        active = r.children(r.root(prompt), budget.n)
        depth, stop = 0, "finished"
        while active:
            try:
                if depth >= self.max_steps:
                    raise BudgetStop("max_depth")
                r.extend(active)
            except BudgetStop as e:
                stop = str(e)
                break
            depth += 1
            live, live_steps = [], []
            for x, s in zip(active, r.step_scores(active)):
                if gen.finished(x):
                    r.record(x, s)
                    r.release([x])
                else:
                    live.append(x)
                    live_steps.append(s)
            width = budget.n - sum(1 for c in r.cands if c.finished)
            if not live or width <= 0:
                r.release(live)
                active = []
                break
            scores = [r.agg(s) for s in live_steps]
            counts = allocate(scores, width, "rebase", temperature=self.temperature)
            r.event(depth, scores, counts, int((counts == 0).sum()))
            active = [k for ks in r.children_many(live, counts) for k in ks]
        for x in active:
            r.record(x, [])
        return r.done(stop, self.select)


@dataclass
class ParticleFilter:
    """Particle filtering (Puri et al. 2025; its-hub): N particles, potential ``G = exp(logit(r)/tau)``
    with r the verifier's (aggregated) score of the particle's prefix; log-weights accumulate
    ``logit(r)/tau`` each step and reset to 0 when the particles are resampled (multinomial or
    systematic), which happens every step, or only when ESS < ``ess_threshold * N`` if set.
    Finished particles stay in the pool with their last score (they may be copied by resampling;
    copies of a finished particle share one node, counted by multiplicity)."""
    resample: str = "systematic"       # "multinomial" | "systematic"
    ess_threshold: Optional[float] = None
    tau: float = 1.0
    select: str = "weighted"
    max_steps: int = 64
    name: str = "particle-filter"

    def __post_init__(self) -> None:
        _check_select(self)

    @_releases_on_error
    def run(self, gen: Generator, prompt: str, budget: Budget, verifier: Optional[Verifier] = None,
            seed: int = 0) -> SearchResult:
        if self.resample not in ("multinomial", "systematic"):
            raise ValueError(f"ParticleFilter: resample must be 'multinomial' or 'systematic', got {self.resample!r}")
        if not self.tau > 0:
            raise ValueError(f"ParticleFilter: tau must be > 0, got {self.tau!r}")
        r = _Run(self.name, gen, verifier, budget, seed, needs_verifier=True)
        N = budget.n
        # particles: [node, multiplicity, log-weight, step scores]; unfinished ones have mult 1
        parts = [[x, 1, 0.0, []] for x in r.children(r.root(prompt), N)]
        depth, stop = 0, "finished"
        while True:
            active = [p for p in parts if not gen.finished(p[0])]
            if not active:
                break
            try:
                if depth >= self.max_steps:
                    raise BudgetStop("max_depth")
                r.extend([p[0] for p in active])
            except BudgetStop as e:
                stop = str(e)
                break
            depth += 1
            for p, s in zip(active, r.step_scores([p[0] for p in active])):
                p[3] = s
            sc = np.array([r.agg(p[3]) for p in parts])
            for p, v in zip(parts, logit(sc) / self.tau):
                p[2] += float(v)
            mult = np.array([p[1] for p in parts], dtype=np.float64)
            logw = np.array([p[2] for p in parts]) + np.log(mult)  # a group of m particles = m x weight
            w = softmax(logw)
            e = ess(np.repeat(np.exp(logw - logw.max()) / mult, mult.astype(int)))
            if not any(not gen.finished(p[0]) for p in parts):
                r.event(depth, sc, [p[1] for p in parts], 0, ess=e)
                break
            if self.ess_threshold is None or e < self.ess_threshold * N:
                counts = allocate(logw, N, self.resample, rng=r.rng)
                new = []
                grow = [(p, int(c)) for p, c in zip(parts, counts) if c > 0 and not gen.finished(p[0])]
                for p, c in zip(parts, counts):
                    c = int(c)
                    if c == 0:
                        r.release([p[0]])
                    elif gen.finished(p[0]):
                        new.append([p[0], c, 0.0, p[3]])
                for (p, _), ks in zip(grow, r.children_many([p[0] for p, _ in grow], [c for _, c in grow])):
                    new += [[k, 1, 0.0, list(p[3])] for k in ks]
                r.event(depth, sc, counts, int((counts == 0).sum()), ess=e)
                parts = new
            else:
                r.event(depth, sc, [p[1] for p in parts], 0, ess=e)
        for p in parts:
            r.record(p[0], p[3], weight=p[1])
        r.release([p[0] for p in parts])
        return r.done(stop, self.select)


@dataclass
class MCTS:
    """Monte-Carlo tree search over steps (UCT). Each iteration selects a leaf by
    ``Q + c_uct * sqrt(ln N_parent / N_child)`` from the root, expands it with ``expand_width``
    one-step children (one batch), rolls each child out to the end of the solution on a fork
    (sampled, all rollouts in one batch per depth), scores the rollouts with the verifier and backs
    the values up. ``budget.n`` = number of rollouts (complete samples), as for best-of-N. Tree
    nodes keep their KV until the search ends; rollouts are released once recorded."""
    c_uct: float = 1.0
    expand_width: int = 2
    select: str = "weighted"
    max_steps: int = 64
    name: str = "mcts"

    def __post_init__(self) -> None:
        _check_select(self)

    @_releases_on_error
    def run(self, gen: Generator, prompt: str, budget: Budget, verifier: Optional[Verifier] = None,
            seed: int = 0) -> SearchResult:
        _check(self.name, expand_width=self.expand_width)
        r = _Run(self.name, gen, verifier, budget, seed, needs_verifier=True)
        root = {"node": r.root(prompt), "parent": None, "kids": [], "n": 0, "w": 0.0, "depth": 0, "value": None}
        rollouts, it, stop = 0, 0, "finished"
        while rollouts < budget.n:
            it += 1
            x = root
            while x["kids"]:
                ln = math.log(max(1, x["n"]))
                x = max(x["kids"], key=lambda k: math.inf if k["n"] == 0
                        else k["w"] / k["n"] + self.c_uct * math.sqrt(ln / k["n"]))
            if x["value"] is not None:  # a finished leaf: back its value up again (no new rollout)
                self._backup(x, x["value"])
                rollouts += 1
                continue
            k = min(self.expand_width, budget.n - rollouts)
            kids = r.fork(x["node"], k)
            try:
                if x["depth"] >= self.max_steps:
                    raise BudgetStop("max_depth")
                r.extend(kids)
            except BudgetStop as e:
                r.release(kids)
                # the leaf whose expansion was stopped stays on record, unfinished and unscored, as
                # the other strategies keep their unfinished nodes (else a stop at the first
                # expansion left no candidate at all)
                r.record(x["node"], [])
                stop = str(e)
                break
            knodes = [{"node": c, "parent": x, "kids": [], "n": 0, "w": 0.0, "depth": x["depth"] + 1, "value": None}
                      for c in kids]
            x["kids"] = knodes
            open_idx = [i for i, c in enumerate(kids) if not gen.finished(c)]
            rolls = [r.fork(kids[i], 1)[0] for i in open_idx]
            stop, roll_cands = _sample_to_end(r, rolls, self.max_steps, x["depth"] + 1, trace=False)
            vals = [0.0] * len(kids)
            for i, cd in zip(open_idx, roll_cands):
                vals[i] = cd.score if cd is not None else 0.0
            for i, c in enumerate(kids):
                if gen.finished(c):  # the child is itself a complete solution: a terminal tree leaf
                    knodes[i]["value"] = vals[i] = r.record(c, r.step_scores([c])[0]).score
            for c, v in zip(knodes, vals):
                self._backup(c, v)
            rollouts += len(kids)
            r.event(it, [c["w"] / max(1, c["n"]) for c in knodes], [1] * len(knodes), 0)
            if stop != "finished":
                break
        return r.done(stop, self.select)

    @staticmethod
    def _backup(x, v: float) -> None:
        while x is not None:
            x["n"] += 1
            x["w"] += v
            x = x["parent"]


STRATEGIES = {
    "best-of-n": lambda: BestOfN("verifier"),
    "majority": lambda: BestOfN("majority"),
    "weighted-bon": lambda: BestOfN("weighted"),
    "self-consistency": SelfConsistency,
    "beam": BeamSearch,
    "dvts": DVTS,
    "rebase": Rebase,
    "particle-filter": ParticleFilter,
    "mcts": MCTS,
}
