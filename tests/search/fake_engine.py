"""A tiny stand-in for ``ttscale.engine`` implementing the engine API the search adapter is written to
(prefill / fork / extend / append / release / tokens / text, counters, tokenizer), plus a fake PRM.

Toy policy: a solution is ``n_lines`` lines ``"s<k>:<d>\\n"`` with a random digit d (a line is wrong iff
d == 9, probability 0.1 x ``difficulty``), then ``"Answer: <a>\\n"`` and EOS, where a is the answer
iff no line was wrong, else a random wrong digit. Pages are reference counted with copy-on-write
of a shared partial last page, like the real pool, so leaks and sharing are observable.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import numpy as np
import torch

ALPHABET = "0123456789s:Anwer \n"


class FakeTokenizer:
    def __init__(self) -> None:
        self.vocab = ["<pad>", "<bos>", "<eos>"] + list(ALPHABET)
        self._id = {c: i for i, c in enumerate(self.vocab)}
        self.bos_token_id, self.eos_token_id, self.pad_token_id = 1, 2, 0
        self.vocab_size = len(self.vocab)

    def encode(self, text: str) -> List[int]:
        return [self._id[c] for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.vocab[i] for i in ids if i >= 3)


@dataclasses.dataclass
class Counters:
    prefill_tokens: int = 0
    decoded_tokens: int = 0
    forks: int = 0
    peak_pages: int = 0
    kv_bytes_read: float = 0.0
    kv_bytes_read_unshared: float = 0.0

    def reset(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, type(getattr(self, f.name))(0))


@dataclasses.dataclass
class ExtendResult:
    token_ids: List[int]
    text: str
    stop_reason: str


class FakeNode:
    def __init__(self, id_: int) -> None:
        self.id, self.ids, self.pages, self.finished, self.alive, self.plan = id_, [], [], False, True, []

    @property
    def num_tokens(self) -> int:
        return len(self.ids)


class FakeEngine:
    def __init__(self, *, answer: str = "7", n_lines: int = 3, difficulty: float = 1.0, page_size: int = 4,
                 kv_bytes_per_token: int = 64) -> None:
        self.tokenizer = FakeTokenizer()
        self.answer, self.n_lines, self.p_wrong = answer, n_lines, min(1.0, 0.1 * difficulty)
        self.page_size, self.bpt = page_size, kv_bytes_per_token
        self.counters = Counters()
        self._ref, self._next_page, self._next_id, self.live = {}, 0, 0, {}

    # pages
    def _page(self) -> int:
        self._next_page += 1
        self._ref[self._next_page] = 1
        self.counters.peak_pages = max(self.counters.peak_pages, len(self._ref))
        return self._next_page

    def _drop(self, pid: int) -> None:
        self._ref[pid] -= 1
        if not self._ref[pid]:
            del self._ref[pid]

    def _push(self, n: FakeNode, tok: int) -> None:
        if len(n.ids) % self.page_size == 0:
            n.pages.append(self._page())
        elif self._ref[n.pages[-1]] > 1:
            self._drop(n.pages[-1])
            n.pages[-1] = self._page()
        n.ids.append(tok)

    def live_pages(self) -> int:
        return len(self._ref)

    @property
    def pool(self):  # the real engine's KVPool exposes the pages in use as pool.num_used
        eng = self

        class _Pool:
            num_used = len(eng._ref)
        return _Pool()

    def _check(self, n: FakeNode) -> FakeNode:
        if not isinstance(n, FakeNode) or not n.alive:
            raise RuntimeError(f"FakeEngine: node {getattr(n, 'id', n)} is released or foreign")
        return n

    def _new(self) -> FakeNode:
        self._next_id += 1
        n = FakeNode(self._next_id)
        self.live[n.id] = n
        return n

    # engine API
    def prefill(self, prompt) -> FakeNode:
        ids = [self.tokenizer.bos_token_id] + self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        n = self._new()
        for t in ids:
            self._push(n, t)
        n.finished = bool(ids) and ids[-1] == self.tokenizer.eos_token_id
        self.counters.prefill_tokens += len(ids)
        return n

    def fork(self, node: FakeNode, n: int) -> List[FakeNode]:
        src = self._check(node)
        out = []
        for _ in range(n):
            c = self._new()
            c.ids, c.pages, c.finished, c.plan = list(src.ids), list(src.pages), src.finished, list(src.plan)
            for p in c.pages:
                self._ref[p] += 1
            out.append(c)
        self.counters.forks += n
        return out

    def fork_many(self, nodes: Sequence[FakeNode], ns: Sequence[int]) -> List[List[FakeNode]]:
        self.fork_many_calls = getattr(self, "fork_many_calls", 0) + 1
        return [self.fork(x, n) for x, n in zip(nodes, ns)]

    def release(self, nodes: Sequence[FakeNode]) -> None:
        for n in nodes:
            self._check(n)
            for p in n.pages:
                self._drop(p)
            n.alive = False
            del self.live[n.id]

    def append(self, node: FakeNode, ids) -> None:
        for t in (self.tokenizer.encode(ids) if isinstance(ids, str) else ids):
            self._push(self._check(node), t)

    def tokens(self, node: FakeNode) -> List[int]:
        return list(self._check(node).ids)

    def text(self, node: FakeNode) -> str:
        return self.tokenizer.decode(self._check(node).ids)

    def _plan_line(self, n: FakeNode, rng: np.random.Generator, greedy: bool) -> List[int]:
        text = self.tokenizer.decode(n.ids)
        k = text.count("\n") - 1  # the prompt has one line
        if k < self.n_lines:
            d = 1 if greedy else (9 if rng.random() < self.p_wrong else int(rng.integers(0, 9)))
            return self.tokenizer.encode(f"s{k}:{d}\n")
        ok = all(not line.endswith("9") for line in text.split("\n")[1:] if line.startswith("s"))
        a = self.answer if ok else str((int(self.answer) + 1 + int(rng.integers(0, 8))) % 10)
        return self.tokenizer.encode(f"Answer: {a}\n") + [self.tokenizer.eos_token_id]

    def extend(self, nodes, *, max_new_tokens, stop_token_ids=(), stop_strings=(), sampling=None, seed=None):
        nodes = [self._check(n) for n in nodes]
        greedy = sampling is not None and getattr(sampling, "temperature", 1.0) == 0
        out = [ExtendResult([], "", "finished") if n.finished else None for n in nodes]
        running = [i for i, n in enumerate(nodes) if not n.finished]
        new = {i: [] for i in running}
        caps = [max_new_tokens] * len(nodes) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        for t in range(max(caps, default=0)):
            if not running:
                break
            pages, unshared = {}, 0
            for i in list(running):
                n = nodes[i]
                if not n.plan:
                    n.plan = self._plan_line(n, np.random.default_rng([seed or 0, i, n.num_tokens]), greedy)
                tok = n.plan.pop(0)
                self._push(n, tok)
                new[i].append(tok)
                self.counters.decoded_tokens += 1
                unshared += n.num_tokens
                for j, p in enumerate(n.pages):
                    pages[p] = min(self.page_size, n.num_tokens - j * self.page_size)
                txt = self.tokenizer.decode(new[i])
                reason = None
                if tok == self.tokenizer.eos_token_id:
                    n.finished, reason = True, "eos"
                elif tok in stop_token_ids:
                    reason = "stop_token"
                elif any(txt.endswith(s) for s in stop_strings):
                    reason = "stop_string"
                elif len(new[i]) >= caps[i]:
                    reason = "length"
                if reason:
                    out[i] = ExtendResult(new[i], txt, reason)
                    running.remove(i)
            self.counters.kv_bytes_read += sum(pages.values()) * self.bpt
            self.counters.kv_bytes_read_unshared += unshared * self.bpt
        return out


class FakePRM:
    """forward_tokens: per position logit +2 while no line so far ends in 9, else -2 (one scalar per token)."""

    def __init__(self, tokenizer: FakeTokenizer) -> None:
        self.tok = tokenizer
        self.calls = 0

    def forward_tokens(self, seqs):
        self.calls += 1
        out = []
        for s in seqs:
            bad, line, lines, vals = False, "", 0, []
            for t in s:
                c = self.tok.decode([t])
                if c == "\n":
                    if lines > 0 and line.startswith("s") and line.endswith("9"):
                        bad = True
                    lines, line = lines + 1, ""
                else:
                    line += c
                vals.append(-2.0 if bad else 2.0)
            out.append(torch.tensor(vals, dtype=torch.float32)[:, None])
        return out

    def parameters(self):
        return iter([torch.zeros(1000)])
