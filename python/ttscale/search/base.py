"""Protocols and records shared by every strategy: Generator, Verifier, Budget, Meter, SearchResult.

A search is a tree of *nodes*. A node is an opaque handle owned by a ``Generator``: the engine's node
holds KV pages (forking shares them copy-on-write), the simulator's node holds a little state. The
strategies never look inside a node; they root a prompt once, fork nodes, extend a *batch* of nodes
by one reasoning step (up to the step delimiter, ``"\\n"``, or the end of the solution), score nodes
with a ``Verifier`` and release the nodes they drop. Costs are read from the generator's and the
verifier's cumulative counters by a ``Meter``, which also enforces the budget caps *before* each
generator call (from a worst-case bound of the call's cost), so a cap is never exceeded.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = [
    "Node", "Step", "GenStats", "VerifierStats", "Generator", "Verifier", "AGGREGATIONS", "aggregate",
    "Budget", "Meter", "Candidate", "StepEvent", "SearchResult", "BudgetStop",
]

Node = Any  # opaque handle owned by a Generator


@dataclass
class Step:
    """What one ``extend`` added to one node."""
    text: str          # the step's text (ends with the delimiter unless the solution ended)
    num_tokens: int    # tokens generated for this step
    finished: bool     # the node's solution is complete (EOS, answer line, or length cap)
    stop_reason: str   # "delimiter" | "eos" | "answer" | "length" | "finished" (was already done)


@dataclass
class GenStats:
    """Cumulative generator counters (monotone, except ``live_pages``)."""
    prefill_tokens: int = 0
    generated_tokens: int = 0
    forks: int = 0
    calls: int = 0                       # extend calls (lock-step batches)
    flops: float = 0.0
    kv_bytes_read: float = 0.0           # with prefix sharing (each shared page read once per batch step)
    kv_bytes_read_unshared: float = 0.0  # as if every branch read its whole context itself
    live_pages: Optional[int] = None     # KV pages held now (None: the generator cannot say)
    peak_pages: int = 0                  # most KV pages held at once (over the generator's life)


@dataclass
class VerifierStats:
    tokens: int = 0    # tokens the verifier read (a PRM forward over each scored sequence)
    calls: int = 0
    flops: float = 0.0


@runtime_checkable
class Generator(Protocol):
    """Fork / extend-one-step / release over opaque nodes (the engine and the simulator implement it)."""

    step_delimiter: str
    max_step_tokens: int  # most tokens one extend may add to one node (used for budget bounds)

    def root(self, prompt: str) -> Node: ...
    def fork(self, node: Node, n: int) -> List[Node]: ...
    def extend(self, nodes: Sequence[Node], *, seed: int, greedy: bool = False) -> List[Step]: ...
    def release(self, nodes: Sequence[Node]) -> None: ...
    def text(self, node: Node) -> str: ...          # generated text after the prompt
    def tokens(self, node: Node) -> List[int]: ...  # all tokens, prompt included
    def finished(self, node: Node) -> bool: ...
    def answer(self, node: Node) -> Optional[str]: ...
    def stats(self) -> GenStats: ...
    # optional: reset_peak() -> bool restarts the peak-pages counter at the pages live now (True if it could)
    def step_cost_bound(self, nodes: Sequence[Node]) -> GenStats: ...  # upper bound of one extend


AGGREGATIONS = ("last", "min", "prod", "mean")


def aggregate(step_scores: Sequence[float], how: str) -> float:
    """One score in [0, 1] from per-step scores (a PRM's aggregation, as in search-and-learn / REBASE)."""
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregate: how must be one of {AGGREGATIONS}, got {how!r}")
    if len(step_scores) == 0:
        return 0.0
    s = np.asarray(step_scores, dtype=np.float64)
    if how == "last":
        return float(s[-1])
    if how == "min":
        return float(s.min())
    if how == "prod":
        return float(np.prod(s))
    return float(s.mean())


class Verifier:
    """Scores nodes in [0, 1]. Subclasses implement ``_step_scores`` (one list of per-step scores per
    node; an exact checker or ORM returns one score). ``kind`` is "exact", "orm" or "prm"."""

    kind: str = "prm"
    flops_per_token: float = 0.0  # verifier FLOPs per token it reads (bounds its cost for FLOP caps)

    def __init__(self, aggregate: str = "last") -> None:
        if aggregate not in AGGREGATIONS:
            raise ValueError(f"Verifier: aggregate must be one of {AGGREGATIONS}, got {aggregate!r}")
        self.aggregate = aggregate
        self._stats = VerifierStats()

    def _step_scores(self, gen: Generator, nodes: Sequence[Node]) -> List[List[float]]:
        raise NotImplementedError

    def begin_search(self) -> None:
        """Called by the Meter when a search starts: drop per-search caches, so that one search's
        cost never depends on what an earlier search happened to score."""

    def step_scores(self, gen: Generator, nodes: Sequence[Node]) -> List[List[float]]:
        if len(nodes) == 0:
            return []
        out = self._step_scores(gen, list(nodes))
        self._stats.calls += 1
        # Scores are compared and softmaxed by every strategy: NaN has no order (the best-of-n pick
        # among NaNs was arbitrary), so a verifier that produces one is an error here, where its
        # name is known, rather than a silent choice later.
        for i, steps in enumerate(out):
            if any(math.isnan(float(v)) for v in steps):
                raise ValueError(f"{type(self).__name__}: step scores of node {i} contain NaN")
        return out

    def score(self, gen: Generator, nodes: Sequence[Node], how: Optional[str] = None) -> np.ndarray:
        how = how or self.aggregate
        return np.array([aggregate(s, how) for s in self.step_scores(gen, nodes)], dtype=np.float64)

    def stats(self) -> VerifierStats:
        return dataclasses.replace(self._stats)


# ---------------------------------------------------------------------------------------------- budget
@dataclass
class Budget:
    """``n``: samples / particles / beam width (what papers report). Optional hard caps."""
    n: int
    max_generated_tokens: Optional[int] = None
    max_flops: Optional[float] = None
    max_kv_bytes: Optional[float] = None   # KV bytes read, with prefix sharing

    def __post_init__(self) -> None:
        if not isinstance(self.n, (int, np.integer)) or self.n < 1:
            raise ValueError(f"Budget: n must be an integer >= 1, got {self.n!r}")
        for name in ("max_generated_tokens", "max_flops", "max_kv_bytes"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"Budget: {name} must be >= 0 or None, got {v!r}")


class BudgetStop(Exception):
    """Raised by ``Meter.admit`` inside a strategy; the strategy turns it into ``stop_reason``."""


class Meter:
    """Cost of one search: differences of the generator's and verifier's counters since ``begin``.

    ``admit(nodes)`` is called before every extend: it adds the generator's worst-case bound for that
    call (plus the verifier scoring those nodes once) to what was spent and raises ``BudgetStop`` (with the reason) if a cap could be exceeded,
    so the caps hold exactly: ``generated_tokens <= max_generated_tokens`` etc. after any search.
    FLOPs include the verifier's; KV bytes are the generator's (the verifier holds no KV cache).
    """

    FIELDS = ("generated_tokens", "prefill_tokens", "verifier_tokens", "forks", "gen_calls", "verifier_calls",
              "flops", "kv_bytes_read", "kv_bytes_read_unshared", "peak_kv_pages", "wall_s")

    def __init__(self, gen: Generator, verifier: Optional[Verifier], budget: Budget) -> None:
        self.gen, self.verifier, self.budget = gen, verifier, budget
        # a generator that can restart its peak-pages counter gives the exact peak of this search
        reset_peak = getattr(gen, "reset_peak", None)
        self._exact_peak = bool(reset_peak()) if callable(reset_peak) else False
        if verifier is not None:
            verifier.begin_search()
        self._g0 = gen.stats()
        self._v0 = verifier.stats() if verifier is not None else VerifierStats()
        self._t0 = time.perf_counter()
        self.generated_tokens = self.prefill_tokens = self.verifier_tokens = self.forks = 0
        self.gen_calls = self.verifier_calls = 0
        self.flops = self.kv_bytes_read = self.kv_bytes_read_unshared = 0.0
        self.peak_kv_pages = 0
        self.wall_s = 0.0
        self.sync()

    def sync(self) -> "Meter":
        g, g0 = self.gen.stats(), self._g0
        v = self.verifier.stats() if self.verifier is not None else VerifierStats()
        v0 = self._v0
        self.generated_tokens = g.generated_tokens - g0.generated_tokens
        self.prefill_tokens = g.prefill_tokens - g0.prefill_tokens
        self.forks = g.forks - g0.forks
        self.gen_calls = g.calls - g0.calls
        self.kv_bytes_read = g.kv_bytes_read - g0.kv_bytes_read
        self.kv_bytes_read_unshared = g.kv_bytes_read_unshared - g0.kv_bytes_read_unshared
        self.verifier_tokens = v.tokens - v0.tokens
        self.verifier_calls = v.calls - v0.calls
        self.flops = (g.flops - g0.flops) + (v.flops - v0.flops)
        # without reset_peak: the generator's lifetime peak is this search's peak once the search
        # exceeded it; otherwise the most pages seen live at a sync (each depth) is the best estimate
        if self._exact_peak:
            self.peak_kv_pages = g.peak_pages
        elif g.live_pages is not None:
            self.peak_kv_pages = max(self.peak_kv_pages, g.live_pages)
        if not self._exact_peak and (g.peak_pages > g0.peak_pages or g.live_pages is None):
            self.peak_kv_pages = max(self.peak_kv_pages, g.peak_pages)
        self.wall_s = time.perf_counter() - self._t0
        return self

    def live_pages(self) -> Optional[int]:
        return self.gen.stats().live_pages

    def admit(self, nodes: Sequence[Node]) -> None:
        """Raise ``BudgetStop`` if extending ``nodes`` could exceed a cap."""
        b = self.budget
        if b.max_generated_tokens is None and b.max_flops is None and b.max_kv_bytes is None:
            return
        self.sync()
        bound = self.gen.step_cost_bound(nodes)
        if self.verifier is not None and self.verifier.flops_per_token:
            # the strategy scores the extended nodes once after the step
            ctx = sum(len(self.gen.tokens(x)) + self.gen.max_step_tokens for x in nodes)
            bound.flops += self.verifier.flops_per_token * ctx
        checks = (("generated tokens", b.max_generated_tokens, self.generated_tokens, bound.generated_tokens),
                  ("FLOPs", b.max_flops, self.flops, bound.flops),
                  ("KV bytes read", b.max_kv_bytes, self.kv_bytes_read, bound.kv_bytes_read))
        for name, cap, used, nxt in checks:
            if cap is not None and used + nxt > cap:
                raise BudgetStop(f"budget: {name} cap {cap:g} (used {used:g}, next step up to {nxt:g})")

    def as_dict(self) -> Dict[str, float]:
        return {k: getattr(self, k) for k in self.FIELDS}

    def __repr__(self) -> str:
        return "Meter(" + ", ".join(f"{k}={getattr(self, k):.4g}" for k in self.FIELDS) + ")"


# ---------------------------------------------------------------------------------------------- result
@dataclass
class Candidate:
    text: str
    answer: Optional[str]
    step_scores: List[float]
    score: float           # aggregated verifier score (0 when no verifier)
    finished: bool
    weight: float = 1.0    # multiplicity / particle weight used by weighted voting


@dataclass
class StepEvent:
    depth: int
    scores: List[float]          # scores of the nodes the decision was made on
    kept: int                    # nodes that got >= 1 child (or survived)
    pruned: int                  # nodes released at this depth
    children: List[int]          # children allocated per scored node
    live_pages: Optional[int]
    generated_tokens: int        # cumulative, after this depth
    finished: int = 0            # finished leaves so far
    ess: Optional[float] = None  # particle filtering: effective sample size before resampling


@dataclass
class SearchResult:
    strategy: str
    answer: Optional[str]
    selected: Optional[int]          # index into candidates
    candidates: List[Candidate]
    trace: List[StepEvent]
    meter: Meter
    stop_reason: str                 # "finished" | "max_depth" | "settled" | "budget: ..."

    @property
    def best(self) -> Optional[Candidate]:
        return None if self.selected is None else self.candidates[self.selected]


def select_answer(cands: Sequence[Candidate], rule: str) -> Optional[int]:
    """Index of the chosen candidate among finished ones with an answer.

    rule: "verifier" (highest score), "majority" (most common answer, weighted by multiplicity),
    "weighted" (answer with the largest sum of scores x multiplicity, as search-and-learn's weighted
    best-of-N). Ties break toward the earliest candidate, so results are deterministic."""
    if rule not in ("verifier", "majority", "weighted"):
        raise ValueError(f"select: rule must be 'verifier', 'majority' or 'weighted', got {rule!r}")
    idx = [i for i, c in enumerate(cands) if c.finished and c.answer is not None]
    if not idx:
        return None
    if rule == "verifier":
        return max(idx, key=lambda i: (cands[i].score, -i))
    tally: Dict[str, float] = {}
    first: Dict[str, int] = {}
    for i in idx:
        a = cands[i].answer
        w = cands[i].weight * (cands[i].score if rule == "weighted" else 1.0)
        tally[a] = tally.get(a, 0.0) + w
        first.setdefault(a, i)
    best = max(tally, key=lambda a: (tally[a], -first[a]))
    # the representative is the best-scored candidate with that answer
    return max((i for i in idx if cands[i].answer == best), key=lambda i: (cands[i].score, -i))


def logit(p: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return np.log(p) - np.log1p(-p)
