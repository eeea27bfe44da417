"""The engine as a search ``Generator``, and the process reward model as a ``Verifier``.

Engine API used (``ttscale.engine``)::

    engine.prefill(prompt_ids | str) -> Node          engine.fork(node, n) -> list[Node]
    engine.extend(nodes, *, max_new_tokens (one int per node), stop_token_ids=(), stop_strings=(),
                  sampling=None, seed=None) -> list[ExtendResult(token_ids, text, stop_reason)]  # lock-step
    engine.release(nodes)   engine.tokens(node)   engine.text(node)   engine.tokenizer (encode/decode/eos)
    node.num_tokens, node.finished, node.id       engine.counters (prefill_tokens, decoded_tokens, forks,
                                                  peak_pages, kv_bytes_read, kv_bytes_read_unshared)
    PRM: model.forward_tokens(list of id lists) -> list of [len_i, 1] per-position scalar logits
    optional: engine.fork_many(nodes, ns) (a depth's forks in one call), engine.pool.num_used
    (live pages), engine.pool.bytes_per_token and engine.model / engine.config (cost model)

``EngineGenerator`` forks KV-backed nodes (copy-on-write pages; a prefix is prefilled once).
``ReprefillGenerator`` drives the same engine the way reference implementations drive a serving
engine: a node is its token list on the host, and every step prefills each node's full prefix again,
extends one step and drops the KV. Same algorithm and seeds; it exists to
measure what forking saves (``ttscale bench search``).

A task plugs in through three parameters: ``step_delimiter`` (``"\\n"``), ``extract_answer(text)``
and ``is_final_step(step_text)`` (default: the line starts with ``"Answer:"``); the exact checker is
``ttscale.search.ExactVerifier(lambda t: task.check_answer(problem, t), ...)``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from .base import GenStats, Step, Verifier

__all__ = ["CostModel", "EngineGenerator", "ReprefillGenerator", "PRMVerifier", "default_extract_answer",
           "load_engine_and_prm"]

_ANSWER = re.compile(r"Answer:\s*(\S+)")


def default_extract_answer(text: str) -> Optional[str]:
    """The value of the last ``Answer: X`` line, as a string."""
    m = _ANSWER.findall(text)
    return m[-1] if m else None


@dataclass
class CostModel:
    """FLOPs and KV bytes per token of a decoder: ``2 * n_params`` FLOPs per token through the weights,
    ``attn_flops_per_ctx_token`` per context token attended (``4 * n_layers * n_heads * head_dim``:
    QK^T and PV), ``kv_bytes_per_token`` of K and V per cached token (all layers)."""
    n_params: float
    kv_bytes_per_token: float
    attn_flops_per_ctx_token: float

    @classmethod
    def from_config(cls, cfg: Any, n_params: float, kv_dtype_bytes: int = 4) -> "CostModel":
        g = lambda *names: next(getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None)  # noqa: E731
        layers, heads = g("n_layers", "num_layers", "num_hidden_layers"), g("n_heads", "num_heads", "num_attention_heads")
        kv_heads = g("n_kv_heads", "num_kv_heads", "num_key_value_heads") if any(
            hasattr(cfg, n) for n in ("n_kv_heads", "num_kv_heads", "num_key_value_heads")) else heads
        hd = g("head_dim") if hasattr(cfg, "head_dim") else g("d_model", "hidden_size", "dim") // heads
        return cls(n_params, 2 * layers * kv_heads * hd * kv_dtype_bytes, 4 * layers * heads * hd)


def _cost_model_of(engine: Any) -> Optional[CostModel]:
    """From ``engine.cost_model``, or the engine's model config and KV pool (``ttscale.engine.Engine``)."""
    cm = getattr(engine, "cost_model", None)
    if isinstance(cm, CostModel):
        return cm
    model = getattr(engine, "model", None)
    cfg = getattr(engine, "config", None) or getattr(model, "config", None)
    if model is None or cfg is None:
        return None
    try:
        n_params = float(sum(p.numel() for p in model.parameters()))
        cm = CostModel.from_config(cfg, n_params)
    except (StopIteration, AttributeError, TypeError, ZeroDivisionError):
        return None
    bpt = getattr(getattr(engine, "pool", None), "bytes_per_token", None)
    if isinstance(bpt, (int, float)) and bpt > 0:
        cm.kv_bytes_per_token = float(bpt)
    return cm


def load_engine_and_prm(model: Optional[str] = None, prm: Optional[str] = None, **engine_kw):
    """``(Engine, PRM Transformer)``: local checkpoints when paths are given, else the built-in
    ``"policy"`` and ``"prm"`` models. Raises ImportError / FileNotFoundError when unavailable.
    The PRM must use the policy's tokenizer (the PRM reads the policy's token ids)."""
    import ttscale.engine as E

    for name in ("Engine", "load_builtin", "load_checkpoint"):
        if not hasattr(E, name):
            raise ImportError(f"ttscale.engine.{name} is not available in this build")
    policy = E.load_checkpoint(model) if model else E.load_builtin("policy")
    prm_model = E.load_checkpoint(prm) if prm else E.load_builtin("prm")
    return E.Engine(policy, **engine_kw), prm_model


class _Meta:
    __slots__ = ("prompt_len", "finished", "ids")

    def __init__(self, prompt_len: int, finished: bool = False, ids: Optional[List[int]] = None) -> None:
        self.prompt_len, self.finished, self.ids = prompt_len, finished, ids


class EngineGenerator:
    """``Generator`` over a ttscale engine: root = prefill once, fork = KV fork, one extend per depth."""

    def __init__(self, engine: Any, *, step_delimiter: str = "\n", max_step_tokens: int = 64,
                 max_new_tokens: int = 512, sampling: Any = None, greedy_sampling: Any = None,
                 extract_answer: Callable[[str], Optional[Any]] = default_extract_answer,
                 is_final_step: Optional[Callable[[str], bool]] = None, cost: Optional[CostModel] = None) -> None:
        if max_step_tokens < 1 or max_new_tokens < 1:
            raise ValueError(f"{type(self).__name__}: max_step_tokens and max_new_tokens must be >= 1, "
                             f"got {max_step_tokens}, {max_new_tokens}")
        if not step_delimiter:
            raise ValueError(f"{type(self).__name__}: step_delimiter must be a non-empty string")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.step_delimiter = step_delimiter
        self.max_step_tokens = max_step_tokens
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        if greedy_sampling is None:
            try:
                from ttscale.engine import SamplingParams
                greedy_sampling = SamplingParams(temperature=0.0)
            except ImportError:  # engine without SamplingParams yet: the engine's own default
                greedy_sampling = None
        self.greedy_sampling = greedy_sampling
        self.extract_answer = extract_answer
        self.is_final_step = is_final_step or (lambda s: s.lstrip().startswith("Answer:"))
        self.cost = cost if cost is not None else _cost_model_of(engine)
        ids = self.tokenizer.encode(step_delimiter)
        self.delimiter_id: Optional[int] = ids[0] if len(ids) == 1 else None
        self._meta: Dict[Any, _Meta] = {}
        self._calls = 0

    # ---------------------------------------------------------------- bookkeeping
    def _m(self, node: Any) -> _Meta:
        m = self._meta.get(self._key(node))
        if m is None:
            raise ValueError(f"{type(self).__name__}: {node!r} is not a live node of this generator")
        return m

    def _key(self, node: Any) -> Any:
        return node.id

    def prompt_len(self, node: Any) -> int:
        return self._m(node).prompt_len

    def live_nodes(self) -> int:
        return len(self._meta)

    def _step_caps(self, nodes: Sequence[Any], metas: Sequence[_Meta]) -> List[int]:
        """Tokens each node may generate in this step: max_step_tokens, but never past
        max_new_tokens (a step of max_step_tokens from near the cap used to overshoot it)."""
        return [max(1, min(self.max_step_tokens, self.max_new_tokens - (x.num_tokens - m.prompt_len)))
                for x, m in zip(nodes, metas)]

    def _stop_kwargs(self) -> dict:
        if self.delimiter_id is not None:
            return {"stop_token_ids": (self.delimiter_id,)}
        return {"stop_strings": (self.step_delimiter,)}

    def _after_step(self, m: _Meta, res: Any, node_finished: bool, num_tokens: int) -> Step:
        text = res.text
        fin = (res.stop_reason in ("eos", "finished") or node_finished or self.is_final_step(text)
               or num_tokens - m.prompt_len >= self.max_new_tokens)
        m.finished = bool(fin)
        reason = {"stop_token": "delimiter", "stop_string": "delimiter"}.get(res.stop_reason, res.stop_reason)
        if fin and reason == "delimiter":
            reason = "answer"
        return Step(text, len(res.token_ids), m.finished, reason)

    # ---------------------------------------------------------------- protocol
    def root(self, prompt: str) -> Any:
        node = self.engine.prefill(prompt)
        self._meta[self._key(node)] = _Meta(node.num_tokens)
        return node

    def fork(self, node: Any, n: int) -> List[Any]:
        m = self._m(node)
        if n <= 0:
            return []
        kids = self.engine.fork(node, int(n))
        for k in kids:
            self._meta[self._key(k)] = _Meta(m.prompt_len, m.finished)
        return kids

    def fork_many(self, nodes: Sequence[Any], ns: Sequence[int]) -> List[List[Any]]:
        """``fork`` for several parents. With an engine ``fork_many(nodes, ns)`` it is one call (the
        engine can run the parents' pending last tokens in one batched forward instead of one forward
        per forked parent); otherwise one ``fork`` per parent."""
        ef = getattr(self.engine, "fork_many", None)
        if not callable(ef):
            return [self.fork(x, n) for x, n in zip(nodes, ns)]
        metas = [self._m(x) for x in nodes]
        out = ef(list(nodes), [int(n) for n in ns])
        for m, kids in zip(metas, out):
            for k in kids:
                self._meta[self._key(k)] = _Meta(m.prompt_len, m.finished)
        return out

    def release(self, nodes: Sequence[Any]) -> None:
        for x in nodes:
            self._m(x)
        for x in nodes:
            del self._meta[self._key(x)]
        if nodes:
            self.engine.release(list(nodes))

    def extend(self, nodes: Sequence[Any], *, seed: int, greedy: bool = False) -> List[Step]:
        metas = [self._m(x) for x in nodes]
        out: List[Optional[Step]] = [None] * len(nodes)
        act = [i for i, m in enumerate(metas) if not m.finished]
        for i, m in enumerate(metas):
            if m.finished:
                out[i] = Step("", 0, True, "finished")
        if act:
            live = [nodes[i] for i in act]
            res = self.engine.extend(live, max_new_tokens=self._step_caps(live, [metas[i] for i in act]),
                                     sampling=self.greedy_sampling if greedy else self.sampling, seed=int(seed),
                                     **self._stop_kwargs())
            self._calls += 1
            for i, r in zip(act, res):
                out[i] = self._after_step(metas[i], r, bool(nodes[i].finished), nodes[i].num_tokens)
        return out  # type: ignore[return-value]

    def tokens(self, node: Any) -> List[int]:
        self._m(node)
        return list(self.engine.tokens(node))

    def text(self, node: Any) -> str:
        return self.tokenizer.decode(self.tokens(node)[self._m(node).prompt_len:])

    def finished(self, node: Any) -> bool:
        return self._m(node).finished

    def answer(self, node: Any) -> Optional[str]:
        if not self._m(node).finished:
            return None
        a = self.extract_answer(self.text(node))
        return None if a is None else str(a)

    def num_tokens(self, node: Any) -> int:
        return node.num_tokens

    def stats(self) -> GenStats:
        c = self.engine.counters
        s = GenStats(prefill_tokens=c.prefill_tokens, generated_tokens=c.decoded_tokens, forks=c.forks,
                     calls=self._calls, kv_bytes_read=float(c.kv_bytes_read),
                     kv_bytes_read_unshared=float(c.kv_bytes_read_unshared), peak_pages=c.peak_pages)
        live = getattr(getattr(self.engine, "pool", None), "num_used", None)  # ttscale.engine.KVPool
        if live is None:
            live = getattr(self.engine, "live_pages", None)
            live = live() if callable(live) else live
        s.live_pages = live
        if self.cost is not None:
            ctx = s.kv_bytes_read_unshared / self.cost.kv_bytes_per_token
            s.flops = (2 * self.cost.n_params * (s.prefill_tokens + s.generated_tokens)
                       + self.cost.attn_flops_per_ctx_token * ctx)
        return s

    def reset_peak(self) -> bool:
        """Restart the engine's ``peak_pages`` counter at the pages in use now (the Meter calls this
        when a search starts, so the search's own peak is measured). False if the engine has no pool."""
        pool = getattr(self.engine, "pool", None)
        if pool is None or not hasattr(pool, "num_used") or not hasattr(self.engine.counters, "peak_pages"):
            return False
        self.engine.counters.peak_pages = pool.num_used
        return True

    def step_cost_bound(self, nodes: Sequence[Any]) -> GenStats:
        S = self.max_step_tokens
        act = [x for x in nodes if not self._m(x).finished]
        b = GenStats(generated_tokens=S * len(act))
        if self.cost is None:  # FLOP / KV-byte caps cannot be bounded without a cost model
            b.flops = b.kv_bytes_read = math.inf if act else 0.0
            return b
        ctx = sum(S * self.num_tokens(x) + S * (S + 1) // 2 for x in act)
        pre = sum(self.num_tokens(x) for x in act) if isinstance(self, ReprefillGenerator) else 0
        b.kv_bytes_read = b.kv_bytes_read_unshared = ctx * self.cost.kv_bytes_per_token
        b.flops = 2 * self.cost.n_params * (S * len(act) + pre) + self.cost.attn_flops_per_ctx_token * ctx
        return b


class ReprefillGenerator(EngineGenerator):
    """The same ``Generator`` without KV reuse: a node is a host-side token list; each extend
    prefills every node's whole prefix, decodes one step in one batch and releases the KV."""

    def __init__(self, engine: Any, **kw) -> None:
        super().__init__(engine, **kw)
        self._next = 0

    class _Node:
        __slots__ = ("id", "ids")

        def __init__(self, id_: int, ids: List[int]) -> None:
            self.id, self.ids = id_, ids

        @property
        def num_tokens(self) -> int:
            return len(self.ids)

    def _new(self, ids: List[int], m: _Meta) -> "_Node":
        self._next += 1
        node = self._Node(self._next, ids)
        self._meta[node.id] = m
        return node

    def root(self, prompt: str) -> Any:
        en = self.engine.prefill(prompt)
        ids = list(self.engine.tokens(en))
        self.engine.release([en])
        return self._new(ids, _Meta(len(ids)))

    def fork(self, node: Any, n: int) -> List[Any]:
        m = self._m(node)
        return [self._new(list(node.ids), _Meta(m.prompt_len, m.finished)) for _ in range(max(0, n))]

    def fork_many(self, nodes: Sequence[Any], ns: Sequence[int]) -> List[List[Any]]:
        return [self.fork(x, n) for x, n in zip(nodes, ns)]

    def release(self, nodes: Sequence[Any]) -> None:
        for x in nodes:
            self._m(x)
        for x in nodes:
            del self._meta[x.id]

    def extend(self, nodes: Sequence[Any], *, seed: int, greedy: bool = False) -> List[Step]:
        metas = [self._m(x) for x in nodes]
        out: List[Optional[Step]] = [Step("", 0, True, "finished") if m.finished else None for m in metas]
        act = [i for i, m in enumerate(metas) if not m.finished]
        if act:
            ens = []
            try:
                # inside the try: when the k-th prefill runs out of pages, the k - 1 made before it
                # must be released too (nothing else holds them)
                for i in act:
                    ens.append(self.engine.prefill(list(nodes[i].ids)))
                res = self.engine.extend(ens, max_new_tokens=self._step_caps([nodes[i] for i in act],
                                                                             [metas[i] for i in act]),
                                         sampling=self.greedy_sampling if greedy else self.sampling, seed=int(seed),
                                         **self._stop_kwargs())
                self._calls += 1
                for i, en, r in zip(act, ens, res):
                    nodes[i].ids = list(self.engine.tokens(en))
                    out[i] = self._after_step(metas[i], r, bool(en.finished), len(nodes[i].ids))
            finally:
                self.engine.release(ens)
        return out  # type: ignore[return-value]

    def tokens(self, node: Any) -> List[int]:
        self._m(node)
        return list(node.ids)


class PRMVerifier(Verifier):
    """Process reward model over a generator's nodes: a step's score is ``sigmoid`` of the PRM's
    scalar at the step's last token (the delimiter; for a final step without one, its last non-EOS
    token).

    With ``kv_cache=True`` (default) the PRM keeps the paged KV of every sequence it scored in a
    :class:`ttscale.engine.PrefixScorer` and runs only the tokens after the longest scored prefix
    (the prompt, or the parent's steps): a search depth costs the PRM its new steps, not every
    candidate's whole text again. ``kv_cache=False`` reads each scored sequence in full
    (``forward_tokens``). Verifier tokens count the tokens the PRM actually ran. Within one search,
    scores are cached per token sequence; both caches are dropped when the next search starts."""
    kind = "prm"

    def __init__(self, model: Any, tokenizer: Any, *, step_delimiter: str = "\n", aggregate: str = "last",
                 batch_size: int = 32, n_params: Optional[float] = None, kv_cache: bool = True,
                 kv_budget_bytes: int = 64 * 2**20) -> None:
        super().__init__(aggregate)
        ids = tokenizer.encode(step_delimiter)
        if len(ids) != 1:
            raise ValueError(f"PRMVerifier: step_delimiter {step_delimiter!r} must be one token, got ids {ids}")
        if batch_size < 1:
            raise ValueError(f"PRMVerifier: batch_size must be >= 1, got {batch_size}")
        self.model, self.delim, self.eos = model, ids[0], getattr(tokenizer, "eos_token_id", None)
        self.batch_size = batch_size
        if n_params is None:
            try:
                n_params = float(sum(p.numel() for p in model.parameters()))
            except (AttributeError, TypeError):
                n_params = 0.0
        self.flops_per_token = 2.0 * n_params
        self._cache: Dict[tuple, List[float]] = {}
        self.scorer = None
        if kv_cache:
            from ttscale.engine import PrefixScorer, Transformer
            if isinstance(model, Transformer):
                self.scorer = PrefixScorer(model, kv_budget_bytes=kv_budget_bytes)

    def begin_search(self) -> None:
        self._cache.clear()
        if self.scorer is not None:
            self.scorer.clear()

    def step_positions(self, toks: Sequence[int], prompt_len: int) -> List[int]:
        end = len(toks)
        while end > prompt_len and self.eos is not None and toks[end - 1] == self.eos:
            end -= 1
        pos = [i for i in range(prompt_len, end) if toks[i] == self.delim]
        if end > prompt_len and (not pos or pos[-1] != end - 1):
            pos.append(end - 1)
        return pos

    def _count(self, tokens: int) -> None:
        self._stats.tokens += tokens
        self._stats.flops += self.flops_per_token * tokens

    def _scorer_run(self, ins, prefix_lengths=None):
        """``scorer.score`` counting the tokens it ran; None when the batch does not fit its pool."""
        from ttscale.engine import KVPoolExhausted

        run0 = self.scorer.tokens_run
        try:
            return self.scorer.score(ins, prefix_lengths)
        except KVPoolExhausted:
            return None
        finally:
            self._count(self.scorer.tokens_run - run0)

    def _step_scores(self, gen: Any, nodes: Sequence[Any]) -> List[List[float]]:
        import torch

        seqs = [tuple(gen.tokens(x)) for x in nodes]
        plen_of = dict(zip(seqs, (gen.prompt_len(x) for x in nodes)))
        todo = sorted({s for s in seqs if s not in self._cache}, key=len)
        if self.scorer is not None and todo:
            # the prompts first (usually one): every candidate then starts from a cached prefix (prompts
            # larger than the pool are not read here: the batches below read them in full)
            self._scorer_run(sorted({s[:plen_of[s]] for s in todo if plen_of[s] > 0}))
        for b in range(0, len(todo), self.batch_size):
            batch = todo[b:b + self.batch_size]
            # only the tokens up to the last scored position are needed
            poss = [self.step_positions(s, plen_of[s]) for s in batch]
            ins = [list(s[:(p[-1] + 1 if p else 1)]) for s, p in zip(batch, poss)]
            outs = None
            if self.scorer is not None:
                # a cached prefix ends at the prompt or right after a scored step
                outs = self._scorer_run(ins, [[plen_of[s]] + [q + 1 for q in p] for s, p in zip(batch, poss)])
            if outs is None:  # no scorer, or a batch larger than the whole PRM pool: read it in full
                with torch.no_grad():
                    outs = self.model.forward_tokens(ins)
                self._count(sum(len(i) for i in ins))
            for s, p, o, i in zip(batch, poss, outs, ins):
                o = o.reshape(len(i), -1)[:, 0].double()
                self._cache[s] = torch.sigmoid(o[p]).tolist() if p else []
        return [list(self._cache[s]) for s in seqs]
