"""A model-free simulator of step-wise reasoning, with closed forms, for testing the strategies.

Problem model (``SimProblem``): a solution is ``num_steps`` reasoning steps then one answer line.
While every step so far is correct, the next one is correct with probability ``p_step``; errors are
absorbing. The answer line holds the correct answer iff every step was correct, else a distractor
drawn from ``distractor_probs``. So one complete sample is correct with probability
``q = p_step ** num_steps`` and the answer distribution is ``{answer: q, d_j: (1 - q) * pd_j}``.

``SimGenerator`` implements the ``Generator`` protocol and counts like a paged-KV engine: a node
owns a list of pages of ``page_size`` tokens with reference counts; ``fork`` shares them; writing
into a shared, partially filled last page copies it first (copy-on-write). ``extend`` is one
lock-step batch: at decode iteration t every node still inside its step appends one token and
reads its whole context; the KV bytes read *with* sharing count each distinct page once per
iteration (a shared-prefix kernel reads a prefix once for all its branches), *without* sharing
count every branch's context. Released nodes are checked (double release and use-after-release
raise), and ``live_nodes()`` / ``live_pages()`` expose leaks.

Verifiers: ``SimPRM`` (per-step score sigmoid(+-signal + noise * z), + while the prefix is correct,
z a fixed standard normal per generated step), ``SimORM`` (one such score for the final answer),
``SimExact`` (oracle step checker: 1 while the prefix is correct; the answer line scores 1 iff the
answer is right).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .base import GenStats, Step, Verifier, VerifierStats

__all__ = ["SimProblem", "SimGenerator", "SimPRM", "SimORM", "SimExact", "sim_problems"]


@dataclass
class SimProblem:
    num_steps: int = 6
    p_step: float = 0.85
    answer: str = "42"
    distractors: Tuple[str, ...] = ("7", "13", "99")
    distractor_probs: Tuple[float, ...] = (0.5, 0.3, 0.2)
    step_tokens: Tuple[int, int] = (4, 12)   # tokens per step, inclusive range (delimiter included)
    prompt_tokens: int = 24

    def __post_init__(self) -> None:
        if self.num_steps < 0:
            raise ValueError(f"SimProblem: num_steps must be >= 0, got {self.num_steps}")
        if not 0.0 <= self.p_step <= 1.0:
            raise ValueError(f"SimProblem: p_step must be in [0, 1], got {self.p_step}")
        if len(self.distractors) != len(self.distractor_probs) or not self.distractors:
            raise ValueError("SimProblem: distractors and distractor_probs must be non-empty and of equal length")
        if abs(sum(self.distractor_probs) - 1.0) > 1e-9 or min(self.distractor_probs) < 0:
            raise ValueError(f"SimProblem: distractor_probs must be a distribution, got {self.distractor_probs}")
        if self.answer in self.distractors:
            raise ValueError("SimProblem: the answer must not be a distractor")
        lo, hi = self.step_tokens
        if not 2 <= lo <= hi:
            raise ValueError(f"SimProblem: step_tokens must be (lo, hi) with 2 <= lo <= hi, got {self.step_tokens}")
        if self.prompt_tokens < 1:
            raise ValueError(f"SimProblem: prompt_tokens must be >= 1, got {self.prompt_tokens}")

    @property
    def q(self) -> float:
        """Probability that one complete sample is correct."""
        return self.p_step ** self.num_steps

    def answer_distribution(self) -> Dict[str, float]:
        d = {self.answer: self.q}
        for a, p in zip(self.distractors, self.distractor_probs):
            d[a] = (1 - self.q) * p
        return d

    @property
    def prompt(self) -> str:
        return f"sim problem: {self.num_steps} steps, p={self.p_step}\n"


def sim_problems(n: int, seed: int = 0, *, steps: Tuple[int, int] = (3, 8), p: Tuple[float, float] = (0.6, 0.95),
                 step_tokens: Tuple[int, int] = (4, 12), prompt_tokens: Tuple[int, int] = (24, 24)) -> List[SimProblem]:
    """A held-out set of problems of mixed difficulty (steps, per-step accuracy and prompt length drawn
    uniformly from the given inclusive ranges; 2-4 distractors with Dirichlet-drawn frequencies)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(2, 5))
        probs = rng.dirichlet(np.ones(k) * 0.7)
        out.append(SimProblem(num_steps=int(rng.integers(steps[0], steps[1] + 1)), p_step=float(rng.uniform(*p)),
                              answer=str(i * 10 + 9), distractors=tuple(str(i * 10 + j) for j in range(k)),
                              distractor_probs=tuple(float(x) for x in probs / probs.sum()),
                              step_tokens=step_tokens,
                              prompt_tokens=int(rng.integers(prompt_tokens[0], prompt_tokens[1] + 1))))
    return out


class _SimNode:
    __slots__ = ("uid", "pages", "ntok", "prompt_len", "tokens", "texts", "step_uids", "prefix_ok", "correct",
                 "finished", "answer", "alive")

    def __init__(self, uid: int) -> None:
        self.uid = uid
        self.pages: List[int] = []
        self.ntok = 0
        self.prompt_len = 0
        self.tokens: List[int] = []
        self.texts: List[str] = []
        self.step_uids: List[int] = []
        self.prefix_ok: List[bool] = []   # prefix correct through step j (the answer line: answer right)
        self.correct = True
        self.finished = False
        self.answer: Optional[str] = None
        self.alive = True

    def __repr__(self) -> str:
        return f"SimNode({self.uid}, steps={len(self.step_uids)}, finished={self.finished})"


class SimGenerator:
    EOS, NEWLINE = 2, 3

    def __init__(self, problem: SimProblem, *, page_size: int = 16, kv_bytes_per_token: int = 4096,
                 n_params: float = 2e6, attn_flops_per_ctx_token: float = 2048.0, step_delimiter: str = "\n") -> None:
        if page_size < 1:
            raise ValueError(f"SimGenerator: page_size must be >= 1, got {page_size}")
        self.problem = problem
        self.page_size = page_size
        self.kv_bytes_per_token = kv_bytes_per_token
        self.n_params = n_params
        self.attn_flops = attn_flops_per_ctx_token
        self.step_delimiter = step_delimiter
        self.max_step_tokens = problem.step_tokens[1]
        self._ref: Dict[int, int] = {}      # page id -> reference count
        self._next_page = 0
        self._next_uid = 0
        self._next_step = 0
        self._live: Dict[int, _SimNode] = {}
        self._s = GenStats(live_pages=0)

    # ---------------------------------------------------------------- pages
    def _new_page(self) -> int:
        pid = self._next_page
        self._next_page += 1
        self._ref[pid] = 1
        self._s.peak_pages = max(self._s.peak_pages, len(self._ref))
        return pid

    def _drop_page(self, pid: int) -> None:
        self._ref[pid] -= 1
        if self._ref[pid] == 0:
            del self._ref[pid]

    def _append_token(self, node: _SimNode, tok: int) -> None:
        slot = node.ntok % self.page_size
        if slot == 0:
            node.pages.append(self._new_page())
        elif self._ref[node.pages[-1]] > 1:  # copy-on-write of a shared partial page
            self._drop_page(node.pages[-1])
            node.pages[-1] = self._new_page()
        node.ntok += 1
        node.tokens.append(tok)

    def _node(self, node: _SimNode) -> _SimNode:
        if not isinstance(node, _SimNode) or not node.alive or self._live.get(node.uid) is not node:
            raise ValueError(f"SimGenerator: {node!r} is not a live node of this generator (released or foreign)")
        return node

    def _new_node(self) -> _SimNode:
        n = _SimNode(self._next_uid)
        self._next_uid += 1
        self._live[n.uid] = n
        return n

    # ---------------------------------------------------------------- protocol
    def root(self, prompt: str) -> _SimNode:
        n = self._new_node()
        rng = np.random.default_rng(len(prompt))
        for t in rng.integers(4, 1000, size=self.problem.prompt_tokens):
            self._append_token(n, int(t))
        n.prompt_len = n.ntok
        self._s.prefill_tokens += n.ntok
        self._s.flops += 2 * self.n_params * n.ntok + self.attn_flops * n.ntok * (n.ntok + 1) / 2
        return n

    def fork(self, node: _SimNode, n: int) -> List[_SimNode]:
        src = self._node(node)
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"SimGenerator.fork: n must be an integer >= 0, got {n!r}")
        out = []
        for _ in range(n):
            c = self._new_node()
            for attr in ("ntok", "prompt_len", "correct", "finished", "answer"):
                setattr(c, attr, getattr(src, attr))
            c.pages, c.tokens, c.texts = list(src.pages), list(src.tokens), list(src.texts)
            c.step_uids, c.prefix_ok = list(src.step_uids), list(src.prefix_ok)
            for pid in c.pages:
                self._ref[pid] += 1
            out.append(c)
        self._s.forks += n
        return out

    def release(self, nodes: Sequence[_SimNode]) -> None:
        for node in nodes:
            self._node(node)
        if len({id(x) for x in nodes}) != len(nodes):
            raise ValueError("SimGenerator.release: the same node is listed twice")
        for node in nodes:
            for pid in node.pages:
                self._drop_page(pid)
            node.alive = False
            del self._live[node.uid]

    def extend(self, nodes: Sequence[_SimNode], *, seed: int, greedy: bool = False) -> List[Step]:
        nodes = [self._node(x) for x in nodes]
        if len({id(x) for x in nodes}) != len(nodes):
            raise ValueError("SimGenerator.extend: the same node is listed twice")
        P, rng = self.problem, np.random.default_rng(seed)
        lo, hi = P.step_tokens
        plans = []  # (node, tokens of the step, Step)
        for x in nodes:
            if x.finished:
                plans.append((x, [], Step("", 0, True, "finished")))
                continue
            L = (lo + hi) // 2 if greedy else int(rng.integers(lo, hi + 1))
            d = len(x.step_uids)
            if d < P.num_steps:
                ok = x.correct and (P.p_step >= 0.5 if greedy else bool(rng.random() < P.p_step))
                x.correct = ok
                body = rng.integers(4, 1000, size=L - 1).tolist()
                text, toks, stop = f"step {d + 1}: {body[0]:03d}\n", body + [self.NEWLINE], "delimiter"
                x.prefix_ok.append(ok)
            else:
                if x.correct:
                    ans = P.answer
                else:
                    k = int(np.argmax(P.distractor_probs)) if greedy else int(rng.choice(len(P.distractors),
                                                                                      p=P.distractor_probs))
                    ans = P.distractors[k]
                text, toks, stop = f"Answer: {ans}\n", rng.integers(4, 1000, size=L - 1).tolist() + [self.EOS], "eos"
                x.answer, x.finished = ans, True
                x.prefix_ok.append(ans == P.answer)
            x.step_uids.append(self._next_step)
            self._next_step += 1
            x.texts.append(text)
            plans.append((x, toks, Step(text, L, x.finished, stop)))
        # lock-step decode: iteration t appends token t of every step still running
        T = max((len(t) for _, t, _ in plans), default=0)
        bpt = self.kv_bytes_per_token
        for t in range(T):
            pages: Dict[int, int] = {}
            unshared = 0
            for x, toks, _ in plans:
                if t >= len(toks):
                    continue
                self._append_token(x, toks[t])
                unshared += x.ntok
                ps = self.page_size
                for j, pid in enumerate(x.pages):
                    pages[pid] = min(ps, x.ntok - j * ps)
            self._s.kv_bytes_read += sum(pages.values()) * bpt
            self._s.kv_bytes_read_unshared += unshared * bpt
            self._s.flops += self.attn_flops * unshared
        gen = sum(len(t) for _, t, _ in plans)
        self._s.generated_tokens += gen
        self._s.flops += 2 * self.n_params * gen
        self._s.calls += 1
        return [s for _, _, s in plans]

    def step_cost_bound(self, nodes: Sequence[_SimNode]) -> GenStats:
        S = self.max_step_tokens
        act = [self._node(x) for x in nodes if not self._node(x).finished]
        ctx = sum(S * x.ntok + S * (S + 1) // 2 for x in act)
        return GenStats(generated_tokens=S * len(act), kv_bytes_read=ctx * self.kv_bytes_per_token,
                        kv_bytes_read_unshared=ctx * self.kv_bytes_per_token,
                        flops=2 * self.n_params * S * len(act) + self.attn_flops * ctx)

    def text(self, node: _SimNode) -> str:
        return "".join(self._node(node).texts)

    def tokens(self, node: _SimNode) -> List[int]:
        return list(self._node(node).tokens)

    def finished(self, node: _SimNode) -> bool:
        return self._node(node).finished

    def answer(self, node: _SimNode) -> Optional[str]:
        return self._node(node).answer

    def is_correct(self, node: _SimNode) -> bool:
        n = self._node(node)
        return n.finished and n.answer == self.problem.answer

    def reset_peak(self) -> bool:
        self._s.peak_pages = len(self._ref)
        return True

    def stats(self) -> GenStats:
        self._s.live_pages = len(self._ref)
        return GenStats(**vars(self._s))

    def live_nodes(self) -> int:
        return len(self._live)

    def live_pages(self) -> int:
        return len(self._ref)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


class _SimVerifierBase(Verifier):
    def __init__(self, aggregate: str = "last", signal: float = 2.0, noise: float = 1.0, seed: int = 0,
                 n_params: float = 2e6) -> None:
        super().__init__(aggregate)
        if noise < 0:
            raise ValueError(f"{type(self).__name__}: noise must be >= 0, got {noise}")
        self.signal, self.noise, self.seed, self.n_params = signal, noise, seed, n_params
        self.flops_per_token = 2 * n_params
        self._z: Dict[int, float] = {}

    def _zed(self, uid: int) -> float:
        if uid not in self._z:
            self._z[uid] = float(np.random.default_rng([self.seed, uid]).standard_normal())
        return self._z[uid]

    def _charge(self, gen: SimGenerator, nodes) -> None:
        toks = sum(gen._node(x).ntok for x in nodes)
        self._stats.tokens += toks
        self._stats.flops += 2 * self.n_params * toks

    def _noisy(self, ok: bool, uid: int) -> float:
        return _sigmoid((self.signal if ok else -self.signal) + self.noise * self._zed(uid))


class SimPRM(_SimVerifierBase):
    """Noisy process reward model: step j scores sigmoid(+-signal + noise * z_j)."""
    kind = "prm"

    def _step_scores(self, gen: SimGenerator, nodes) -> List[List[float]]:
        self._charge(gen, nodes)
        return [[self._noisy(ok, u) for ok, u in zip(gen._node(x).prefix_ok, gen._node(x).step_uids)] for x in nodes]


class SimORM(_SimVerifierBase):
    """Noisy outcome reward model: one score for the final answer (0.5 while unfinished)."""
    kind = "orm"

    def _step_scores(self, gen: SimGenerator, nodes) -> List[List[float]]:
        self._charge(gen, nodes)
        out = []
        for x in nodes:
            n = gen._node(x)
            out.append([self._noisy(n.prefix_ok[-1], n.step_uids[-1]) if n.finished else 0.5])
        return out


class SimExact(_SimVerifierBase):
    """Exact checker: per step 1.0 while every step so far is correct; the answer line 1.0 iff right."""
    kind = "exact"

    def __init__(self, aggregate: str = "last") -> None:
        super().__init__(aggregate, noise=0.0)
        self.flops_per_token = 0.0

    def _step_scores(self, gen: SimGenerator, nodes) -> List[List[float]]:
        return [[1.0 if ok else 0.0 for ok in gen._node(x).prefix_ok] for x in nodes]
