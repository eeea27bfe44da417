"""The engine: prompts, forkable branches and lock-step batched decoding over a paged KV pool.

A :class:`Node` is a mutable handle on one sequence (prompt + generated tokens). Its state:

* ``tokens``: all its token ids; the KV of the first ``n_cached`` of them is in the pool;
* pending tokens ``tokens[n_cached:]`` (a sampled token, or a teacher-forced ``append``) are run
  lazily by the next forward that involves the node (``extend``, ``logits``), batched with every
  other node that needs one (forked children inherit them);
* when nothing is pending, the next-token logits (a row of the last forward's output, shared by
  forked children without a copy).

``extend(nodes)`` loops: run the pending tokens of all still-active nodes in ONE batched forward,
sample one token per active node with :func:`ttscale.ops.sample`, check the stops. Forward modes:

* every node new (no cached tokens): dense ragged :func:`ttscale.ops.attention` over the new
  tokens, KV written with :func:`ttscale.ops.append_paged_kv`;
* one new token per node and some nodes sharing leading pages (after ``fork``): shared-prefix decode
  (:class:`ttscale.attention.SharedPrefixDecode`): nodes are ordered by their page lists (a DFS order
  of the sharing tree), each maximal run of nodes sharing pages becomes a group whose shared pages
  are read once for all of them, up to ``max_share_levels - 1`` nested shared levels plus each
  node's private suffix; the plan is built once per step and reused by every layer;
* otherwise: :func:`ttscale.ops.paged_attention` with ``qo_indptr`` (ragged causal queries, e.g.
  a multi-token ``append`` to a node that already has cached tokens, mixed with decodes).

BOS rule: a ``str`` prompt is encoded with the tokenizer and ``tokenizer.bos_token_id`` is
prepended when it is not None and the tokenizer does not set ``add_bos = False``
(:class:`~ttscale.engine.CharTokenizer` has BOS, so built-in prompts start with it; HF tokenizers
follow ``add_bos_token`` of ``tokenizer_config.json``). A list of ids is used exactly as given.

EOS: ``eos_token_ids`` (default: the tokenizer's EOS and the config's ``eos_token_id``). A sampled
EOS is kept in the node's tokens (``text`` drops special tokens) and marks the node finished.
Stop tokens and stop strings end one ``extend`` without finishing the node; the token that
completes a stop string is kept, so the returned text contains the stop string (the step boundary).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .. import ops
from ..ops._checks import as_index
from ..attention import Level, SharedPrefixDecode
from .kvpool import KVPool, indptr, page_table
from .model import Transformer

__all__ = ["Engine", "Node", "SamplingParams", "ExtendResult", "EngineCounters"]

STOP_REASONS = ("eos", "stop_token", "stop_string", "length", "finished")


@dataclasses.dataclass
class SamplingParams:
    """Filters of :func:`ttscale.ops.sample`; ``temperature=0`` is greedy."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0


@dataclasses.dataclass
class ExtendResult:
    token_ids: List[int]
    text: str
    stop_reason: str


@dataclasses.dataclass
class EngineCounters:
    """Work done by the engine since creation or the last ``reset()``.

    ``prefill_tokens``: teacher-forced tokens run (prompts and ``append``); ``decoded_tokens``:
    tokens sampled by ``extend``; ``forks``: children created by ``fork``; ``peak_pages``: most pool
    pages in use at once; ``kv_bytes_read``: K and V bytes the attention of every forward read
    (a page shared by a group of branches counted once per step and layer); ``kv_bytes_read_unshared``:
    what the same forwards read with plain per-branch decode (every branch reads its whole KV);
    ``forward_steps``: batched forwards run."""

    prefill_tokens: int = 0
    decoded_tokens: int = 0
    forks: int = 0
    peak_pages: int = 0
    kv_bytes_read: int = 0
    kv_bytes_read_unshared: int = 0
    forward_steps: int = 0

    def reset(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, 0)


def _token_ids(items, name: str) -> List[int]:
    """Token ids as ints: integers only (int(3.7) would silently truncate, and a bool is not an id)."""
    items = list(items)
    ids = [as_index(i) for i in items]
    if None in ids:
        raise ValueError(f"ttscale.engine: {name} must be integer token ids, got {items[ids.index(None)]!r}")
    return ids


class Node:
    """A sequence in the engine (module docstring). Use the :class:`Engine` methods on it."""

    __slots__ = ("id", "_seq", "_tokens", "_n_cached", "_logits", "finished", "_alive", "_prompt_len", "_owner")

    def __init__(self, nid: int, seq: int, tokens: List[int], n_cached: int, logits, finished: bool, prompt_len: int,
                 owner: object = None):
        self.id = nid
        self._owner = owner  # the Engine that made it: sequence ids are per pool, so another engine's
        # node would alias one of its own sequences
        self._seq = seq
        self._tokens = tokens
        self._n_cached = n_cached
        self._logits = logits  # (tensor [R, V], row) when nothing is pending
        self.finished = finished
        self._alive = True
        self._prompt_len = prompt_len

    @property
    def num_tokens(self) -> int:
        return len(self._tokens)

    @property
    def alive(self) -> bool:
        return self._alive

    def __repr__(self) -> str:
        return (f"Node(id={self.id}, num_tokens={len(self._tokens)}, finished={self.finished}"
                f"{'' if self._alive else ', released'})")


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def _lcp(a: List[int], b: List[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Engine:
    """Batched, forkable generation with a :class:`Transformer` on ttscale ops (module docstring).

    Args:
        model: a :class:`Transformer` (an LM; classifier models are scored with ``forward_tokens``).
        tokenizer: defaults to ``model.tokenizer``; needed for string prompts, stop strings and text.
        num_pages, page_size: KV pool size (pages of ``page_size`` tokens, shared by all layers). The
            default ``num_pages=None`` sizes the pool to ``kv_budget_bytes`` (K and V of all layers).
        device: defaults to the model's device.
        eos_token_ids: tokens that finish a node (default: tokenizer EOS + config ``eos_token_id``).
        max_share_levels: most attention levels of shared-prefix decode (shared levels + the
            private suffix level); 1 disables sharing (plain per-branch paged decode).
        kv_budget_bytes: pool size when ``num_pages`` is None (default 256 MiB, at least 16 pages).
        share_min_saved_bytes: cost model of shared-prefix decode. Each shared level costs one more
            attention call and one merge per layer; a decode step uses sharing only when the K/V bytes
            it saves per layer (shared pages not re-read once per branch) exceed this many bytes per
            extra level, else it runs plain per-branch paged decode. The default, 256 KiB, is about
            what a 2-core x86 CPU streams from cache in the ~15 us an extra call + merge costs on a
            small model; 0 shares whenever anything is shared. Counters record the path taken.
    """

    def __init__(self, model: Transformer, tokenizer=None, *, num_pages: Optional[int] = None, page_size: int = 16,
                 device=None, eos_token_ids: Optional[Sequence[int]] = None, max_share_levels: int = 3,
                 kv_budget_bytes: int = 256 * 2**20, share_min_saved_bytes: int = 256 * 1024):
        if not isinstance(model, Transformer):
            raise TypeError(f"ttscale.engine: Engine needs a ttscale.engine.Transformer, got {type(model).__name__}")
        if model.config.is_classifier:
            raise ValueError("ttscale.engine: Engine needs a language model; a sequence-classification model "
                             "(PRM) is scored with model.forward_tokens")
        if not isinstance(max_share_levels, int) or max_share_levels < 1:
            raise ValueError(f"ttscale.engine: max_share_levels must be an int >= 1, got {max_share_levels!r}")
        self.model = model
        self.config = model.config
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self.device = torch.device(device) if device is not None else model.device
        if self.device != model.device:
            model.to(self.device)
        c = self.config
        if num_pages is None:
            if not isinstance(page_size, int) or page_size < 1:
                raise ValueError(f"ttscale.engine: page_size must be a positive int, got {page_size!r}")
            per_page = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * page_size * \
                torch.empty(0, dtype=model.dtype).element_size()
            num_pages = max(16, int(kv_budget_bytes) // per_page)
        self.pool = KVPool(c.num_hidden_layers, num_pages, page_size, c.num_key_value_heads, c.head_dim,
                           dtype=model.dtype, device=self.device)
        if eos_token_ids is None:
            eos = set(c.eos_token_ids)
            te = getattr(self.tokenizer, "eos_token_id", None)
            if te is not None:
                eos.add(int(te))
            eos_token_ids = sorted(eos)
        self.eos_token_ids = frozenset(int(e) for e in eos_token_ids)
        self.max_share_levels = max_share_levels
        if not isinstance(share_min_saved_bytes, int) or share_min_saved_bytes < 0:
            raise ValueError(f"ttscale.engine: share_min_saved_bytes must be an int >= 0, got {share_min_saved_bytes!r}")
        self.share_min_saved_bytes = share_min_saved_bytes
        self.counters = EngineCounters()
        self._ids = itertools.count()
        self._spd = SharedPrefixDecode()
        self._plan_cache: Optional[_SharePlan] = None
        # lock-step decode inside extend() through _DecodeBatch (False: every step through _forward;
        # same results, kept for tests that compare the two)
        self.fast_decode = True

    # ------------------------------------------------------------------ helpers
    def _check_node(self, node, name: str = "node") -> Node:
        if not isinstance(node, Node):
            raise TypeError(f"ttscale.engine: {name} must be a Node, got {type(node).__name__}")
        if node._owner is not self:
            raise ValueError(f"ttscale.engine: {name} (id {node.id}) belongs to another Engine")
        if not node._alive:
            raise ValueError(f"ttscale.engine: {name} (id {node.id}) was released")
        return node

    def _check_nodes(self, nodes, name: str = "nodes") -> List[Node]:
        if isinstance(nodes, Node):
            nodes = [nodes]
        nodes = list(nodes)
        for i, n in enumerate(nodes):
            self._check_node(n, f"{name}[{i}]")
        if len({n.id for n in nodes}) != len(nodes):
            raise ValueError(f"ttscale.engine: {name} contains the same node twice")
        return nodes

    def _encode(self, text: str, bos: bool) -> List[int]:
        if self.tokenizer is None:
            raise ValueError("ttscale.engine: a string needs a tokenizer; pass tokenizer= to Engine or token ids")
        ids = list(self.tokenizer.encode(text))
        b = getattr(self.tokenizer, "bos_token_id", None)
        if bos and b is not None and getattr(self.tokenizer, "add_bos", True):
            ids = [int(b)] + ids
        return ids

    def _as_ids(self, x, name: str, bos: bool) -> List[int]:
        if isinstance(x, str):
            ids = self._encode(x, bos)
        elif isinstance(x, torch.Tensor):
            if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
                raise ValueError(f"ttscale.engine: {name} must hold integer token ids, got a {x.dtype} tensor")
            ids = [int(i) for i in x.reshape(-1).tolist()]
        else:
            try:
                items = list(x)
            except TypeError:
                raise TypeError(f"ttscale.engine: {name} must be a str or a list of token ids") from None
            ids = _token_ids(items, name)
        self.model.check_ids(ids, name)
        return ids

    def _decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            raise ValueError("ttscale.engine: text needs a tokenizer; pass tokenizer= to Engine")
        return self.tokenizer.decode(ids)

    # ------------------------------------------------------------------ public API
    def prefill(self, prompt_ids: Union[str, Sequence[int]]) -> Node:
        """A new node for the prompt, run at once (its next-token logits are ready)."""
        ids = self._as_ids(prompt_ids, "prompt_ids", bos=True)
        if not ids:
            raise ValueError("ttscale.engine: prompt_ids is empty")
        maxp = self.config.max_position_embeddings
        if len(ids) > maxp:
            raise ValueError(f"ttscale.engine: prompt has {len(ids)} tokens, more than max_position_embeddings={maxp}")
        node = Node(next(self._ids), self.pool.new_sequence(), ids, 0, None, False, len(ids), owner=self)
        self.counters.prefill_tokens += len(ids)
        try:
            self._forward([node])
        except Exception:
            self.pool.release(node._seq)
            node._alive = False
            raise
        return node

    def fork(self, node: Node, n: int) -> List[Node]:
        """``n`` children sharing the node's KV pages and logits (the node stays valid).

        Pending tokens (e.g. the last token sampled by ``extend``) are not run here: each child runs
        them in its next batched forward (one more row per child in a step that happens anyway),
        so forking many nodes never costs a forward per ``fork`` call."""
        self._check_node(node)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"ttscale.engine: fork count n must be an int >= 1, got {n!r}")
        seqs = self.pool.fork(node._seq, n)
        self.counters.forks += n
        return [Node(next(self._ids), s, list(node._tokens), node._n_cached, node._logits, node.finished,
                     node._prompt_len, owner=self) for s in seqs]

    def append(self, node: Node, token_ids: Union[str, Sequence[int]]) -> None:
        """Teacher-forced continuation: add tokens to the node (a str is encoded without BOS). They are
        run by the next forward involving the node (batched). Appending clears ``finished``."""
        self._check_node(node)
        ids = self._as_ids(token_ids, "token_ids", bos=False)
        if not ids:
            return
        maxp = self.config.max_position_embeddings
        if len(node._tokens) + len(ids) > maxp:
            raise ValueError(f"ttscale.engine: append would make {len(node._tokens) + len(ids)} tokens, more than "
                             f"max_position_embeddings={maxp}")
        node._tokens.extend(ids)
        node._logits = None
        node.finished = False
        self.counters.prefill_tokens += len(ids)

    def release(self, nodes) -> None:
        """Return the nodes' pages to the pool; the handles become invalid. Releasing twice is an error."""
        for n in self._check_nodes(nodes):
            self.pool.release(n._seq)
            n._alive = False
            n._logits = None

    def tokens(self, node: Node) -> List[int]:
        self._check_node(node)
        return list(node._tokens)

    def text(self, node: Node) -> str:
        """Full text of the node (prompt included), special tokens dropped."""
        self._check_node(node)
        return self._decode(node._tokens)

    def logits(self, node: Node) -> torch.Tensor:
        """float32 next-token logits ``[V]`` at the node (runs its pending tokens if needed)."""
        self._check_node(node)
        if node._n_cached < len(node._tokens) or node._logits is None:
            self._forward([node])
        t, r = node._logits
        return t[r].clone()

    def extend(self, nodes, *, max_new_tokens: Union[int, Sequence[int]], stop_token_ids: Sequence[int] = (),
               stop_strings: Sequence[str] = (), sampling: Optional[SamplingParams] = None,
               seed: Optional[int] = None) -> List[ExtendResult]:
        """Decode all ``nodes`` in lock-step until each stops (module docstring); one result per node.

        ``stop_reason``: "eos" (node now finished), "stop_token", "stop_string" (checked on the text
        generated by this call), "length" (``max_new_tokens``, or ``max_position_embeddings`` reached;
        ``max_new_tokens`` is one int for every node or one per node),
        "finished" (the node had already produced EOS: nothing is done). With ``seed`` the draws are
        reproducible: node ``i`` of the list draws from its own Philox stream
        ``(mix(seed, i, node.num_tokens), step)``, independent of the other nodes in the call; without
        it they come from torch's default generator.
        """
        nodes = self._check_nodes(nodes)
        caps = [max_new_tokens] * len(nodes) if isinstance(max_new_tokens, (int, bool)) else list(max_new_tokens)
        if len(caps) != len(nodes):
            raise ValueError(f"ttscale.engine: max_new_tokens has {len(caps)} entries for {len(nodes)} nodes")
        for c in caps:
            if not isinstance(c, int) or isinstance(c, bool) or c < 0:
                raise ValueError(f"ttscale.engine: max_new_tokens must be an int >= 0 (or one per node), got {c!r}")
        if stop_strings is None:
            stop_strings = ()
        if isinstance(stop_strings, str):
            stop_strings = (stop_strings,)
        stop_strings = tuple(stop_strings)
        for s in stop_strings:
            if not isinstance(s, str) or not s:
                raise ValueError(f"ttscale.engine: stop_strings must be non-empty strings, got {s!r}")
        if stop_strings and self.tokenizer is None:
            raise ValueError("ttscale.engine: stop_strings need a tokenizer")
        stop_tok = frozenset(_token_ids(stop_token_ids if stop_token_ids is not None else (), "stop_token_ids"))
        sp = sampling if sampling is not None else SamplingParams()
        if not isinstance(sp, SamplingParams):
            raise TypeError(f"ttscale.engine: sampling must be a SamplingParams, got {type(sp).__name__}")
        if sp.temperature < 0:
            raise ValueError(f"ttscale.engine: sampling.temperature must be >= 0, got {sp.temperature}")
        maxp = self.config.max_position_embeddings
        new: List[List[int]] = [[] for _ in nodes]
        reason: List[Optional[str]] = [None] * len(nodes)
        limit = [0] * len(nodes)
        active: List[int] = []
        for i, n in enumerate(nodes):
            limit[i] = min(caps[i], maxp - len(n._tokens))
            if n.finished:
                reason[i] = "finished"
            elif limit[i] <= 0:
                reason[i] = "length"
            else:
                active.append(i)
        seeds = None
        if seed is not None:
            if not isinstance(seed, int) or isinstance(seed, bool):
                raise TypeError(f"ttscale.engine: seed must be an int, got {type(seed).__name__}")
            # the node's length is mixed in so that repeated extend calls with one seed on growing
            # nodes (step-level search) do not reuse the same uniforms
            seeds = [(_splitmix64((seed & 0xFFFFFFFFFFFFFFFF) ^ _splitmix64(i ^ (len(n._tokens) << 32)))
                      & 0x7FFFFFFFFFFFFFFF) for i, n in enumerate(nodes)]
        step = 0
        eos = self.eos_token_ids
        batch: Optional[_DecodeBatch] = None
        stop_any = eos | stop_tok
        while active:
            if batch is not None:
                # same nodes as last step, each with exactly its sampled token pending: the fast path
                batch.advance()
                active = batch.order  # a rebuild at a page boundary re-sorts (logits rows follow it)
                logits = batch.forward()
                idx = None
            else:
                need = [nodes[i] for i in active
                        if nodes[i]._n_cached < len(nodes[i]._tokens) or nodes[i]._logits is None]
                if need and len(need) == len(active) and self.fast_decode and \
                        all(len(n._tokens) - n._n_cached == 1 and n._n_cached > 0 for n in need):
                    batch = _DecodeBatch(self, nodes, active, seeds)
                    active = batch.order
                    logits = batch.forward()
                    idx = None
                else:
                    if need:
                        self._forward(need)
                    logits, idx = self._gather_logits([nodes[i] for i in active])
            kw = {}
            if seeds is not None:
                sd = batch.seed_tensor if batch is not None else \
                    torch.tensor([seeds[i] for i in active], dtype=torch.int64, device=self.device)
                kw = dict(seed=sd, offset=step)
            toks_t = ops.sample(logits, temperature=float(sp.temperature), top_k=int(sp.top_k), top_p=float(sp.top_p),
                                min_p=float(sp.min_p), indices=idx, **kw)
            toks = toks_t.tolist()
            self.counters.decoded_tokens += len(toks)
            n_active = len(active)
            still = []
            if not stop_strings and stop_any.isdisjoint(toks):
                # common case (no EOS / stop token drawn): only bookkeeping and the length limit
                for i, t in zip(active, toks):
                    n = nodes[i]
                    n._n_cached = len(n._tokens)
                    n._tokens.append(t)
                    n._logits = None
                    ni = new[i]
                    ni.append(t)
                    if len(ni) >= limit[i]:
                        reason[i] = "length"
                    else:
                        still.append(i)
                toks = ()  # handled
            for i, t in zip(active, toks):
                n = nodes[i]
                n._n_cached = len(n._tokens)  # every active node's pending tokens ran before sampling
                n._tokens.append(t)
                n._logits = None
                new[i].append(t)
                if t in eos:
                    n.finished = True
                    reason[i] = "eos"
                elif t in stop_tok:
                    reason[i] = "stop_token"
                elif stop_strings and any(s in self._decode(new[i]) for s in stop_strings):
                    reason[i] = "stop_string"
                elif len(new[i]) >= limit[i]:
                    reason[i] = "length"
                else:
                    still.append(i)
            if batch is not None:
                if len(still) == n_active:
                    batch.next_ids = toks_t  # already in the batch's order: the next step's input ids
                else:
                    batch = None  # the node set changed: re-plan from the survivors next step
            active = still
            step += 1
        out = []
        for i in range(len(nodes)):
            txt = self._decode(new[i]) if (self.tokenizer is not None and new[i]) else ""
            out.append(ExtendResult(new[i], txt, reason[i]))
        return out

    # ------------------------------------------------------------------ internals
    def _share_pays(self, saved_tokens: int, num_levels: int) -> bool:
        """Cost model (``share_min_saved_bytes``): does reading the shared levels once, at the price of
        ``num_levels - 1`` extra attention calls + merges per layer, beat per-branch decode?"""
        saved = saved_tokens * (self.pool.bytes_per_token // self.pool.num_layers)
        return saved > 0 and saved >= (num_levels - 1) * self.share_min_saved_bytes

    def _gather_logits(self, nodes: List[Node]) -> Tuple[torch.Tensor, torch.Tensor]:
        """One logits matrix and the row of each node (forked children share a row)."""
        tensors: Dict[int, Tuple[torch.Tensor, int]] = {}
        rows = []
        base = 0
        for n in nodes:
            t, r = n._logits
            k = id(t)
            if k not in tensors:
                tensors[k] = (t, base)
                base += t.shape[0]
            rows.append(tensors[k][1] + r)
        mats = [t for t, _ in tensors.values()]
        logits = mats[0] if len(mats) == 1 else torch.cat(mats)
        return logits, torch.tensor(rows, dtype=torch.int64, device=logits.device)

    def _forward(self, nodes: List[Node]) -> None:
        """Run every node's pending tokens in one batched forward and store its next-token logits."""
        pool, ps, dev = self.pool, self.pool.page_size, self.device
        nodes_run = [n for n in nodes if len(n._tokens) > n._n_cached]
        for n in nodes:
            if n._logits is None and len(n._tokens) == n._n_cached:
                raise RuntimeError(f"ttscale.engine: node {n.id} has neither logits nor pending tokens")
        if not nodes_run:
            return
        counts = [len(n._tokens) - n._n_cached for n in nodes_run]
        decode = all(c == 1 for c in counts) and all(n._n_cached > 0 for n in nodes_run)
        seqs = [n._seq for n in nodes_run]
        # reserve up to the node's token count (a forward that failed after reserving is re-run in place)
        pool.reserve(seqs, [len(n._tokens) - pool.length(n._seq) for n in nodes_run])
        self.counters.peak_pages = max(self.counters.peak_pages, pool.num_used)
        bpt = pool.bytes_per_token
        spd = None
        if decode and self.max_share_levels > 1 and len(nodes_run) > 1:
            plan = self._share_plan(seqs)
            nodes_run = [nodes_run[i] for i in plan.perm]
            seqs = [seqs[i] for i in plan.perm]
            lens = [pool.length(s) for s in seqs]
            kv_indptr, kv_indices = plan.kv_indptr, plan.kv_indices
            unshared_tokens = sum(lens)
            shared_tokens = unshared_tokens
            if plan.levels is not None:
                # only the private level's last-page lengths change while the page lists do not
                sfx_last = []
                shared_tokens = plan.group_tokens
                for ln, st in zip(lens, plan.suffix_start):
                    r = ln - st * ps
                    sfx_last.append((r - 1) % ps + 1 if r > 0 else 0)
                    shared_tokens += r
                if self._share_pays(unshared_tokens - shared_tokens, len(plan.levels)):
                    lv = plan.levels[-1]
                    levels = plan.levels[:-1] + [Level(lv.qo_indptr, lv.kv_indptr, lv.kv_indices,
                                                       torch.tensor(sfx_last, dtype=torch.int32, device=dev))]
                    spd = self._spd.plan(levels, device=dev)
                else:
                    shared_tokens = unshared_tokens
        else:
            lens = [pool.length(s) for s in seqs]
            kv_indptr, kv_indices = page_table([pool.pages(s) for s in seqs], dev)
            unshared_tokens = shared_tokens = sum(lens)
        counts = [len(n._tokens) - n._n_cached for n in nodes_run]
        ids: List[int] = []
        pos: List[int] = []
        for n in nodes_run:
            ids.extend(n._tokens[n._n_cached:])
            pos.extend(range(n._n_cached, len(n._tokens)))
        kv_last = torch.tensor([(x - 1) % ps + 1 for x in lens], dtype=torch.int32, device=dev)
        qo = indptr(counts)
        qo_indptr = torch.tensor(qo, dtype=torch.int32, device=dev)

        fresh = all(n._n_cached == 0 for n in nodes_run)
        # multi-token forwards count each sequence's keys once: what a tiled (flash) kernel reads at least
        self.counters.kv_bytes_read += shared_tokens * bpt
        self.counters.kv_bytes_read_unshared += unshared_tokens * bpt
        self.counters.forward_steps += 1

        def attn(li, q, k, v):
            kc, vc = pool.k_cache(li), pool.v_cache(li)
            ops.append_paged_kv(k, v, kc, vc, kv_indptr, kv_indices, kv_last, append_indptr=qo_indptr)
            if fresh:
                return ops.attention(q, k, v, causal=True, cu_seqlens_q=qo_indptr, cu_seqlens_k=qo_indptr)
            if spd is not None:
                return spd.run(q, kc, vc)
            if decode:
                return ops.paged_attention(q, kc, vc, kv_indptr, kv_indices, kv_last)
            return ops.paged_attention(q, kc, vc, kv_indptr, kv_indices, kv_last, qo_indptr=qo_indptr, causal=True)

        m = self.model
        x = m.hidden_states(torch.tensor(ids, dtype=torch.long, device=dev),
                            torch.tensor(pos, dtype=torch.long, device=dev), attn)
        last_rows = torch.tensor(qo[1:], dtype=torch.long, device=dev) - 1
        logits = m.head(x.index_select(0, last_rows) if len(ids) != len(nodes_run) else x)
        for r, n in enumerate(nodes_run):
            n._n_cached = len(n._tokens)
            n._logits = (logits, r)

    def _share_plan(self, seqs: List[int]) -> "_SharePlan":
        """The decode batch's sharing plan, cached while its page lists are unchanged.

        A live sequence's pages only change at the end (appended pages, a copy-on-write of the last
        one), so ``(seq, number of pages, last page)`` per node identifies the page table: the plan
        (DFS order, full page table, shared levels) is rebuilt only when a node starts a new page or
        the batch changes, not at each step."""
        pool = self.pool
        key = tuple((s, len(pool.pages(s)), pool.pages(s)[-1]) for s in seqs)
        plan = self._plan_cache
        if plan is not None and plan.key == key:
            return plan
        # DFS order of the page-sharing tree: sort by page list
        perm = sorted(range(len(seqs)), key=lambda i: pool.pages(seqs[i]))
        page_lists = [pool.pages(seqs[i]) for i in perm]
        plan = _SharePlan(key, perm, *page_table(page_lists, self.device))
        plan.levels, plan.group_tokens, plan.suffix_start = self._plan_levels(page_lists)
        self._plan_cache = plan
        return plan

    def _plan_levels(self, page_lists: List[List[int]]):
        """Shared-prefix levels for nodes already sorted by page list (a DFS order of the sharing tree).

        A range of nodes whose page lists share ``l`` leading pages beyond the depth ``d`` already
        covered by its ancestors becomes a group with pages ``[d, l)`` at the next shared level; its
        sub-ranges (split where the adjacent common prefix is exactly ``l``) recurse. Ranges of one
        node, or the deepest allowed level, end in the node's private suffix (the last level). Shared
        pages are full: after ``reserve`` each node's last page is its own (a shared partial page was
        copied), so a page two nodes share is never the last page of either. Returns
        ``(levels or None when nothing is shared, tokens of the shared levels, each node's first
        private page)``; the private level's ``kv_last_page_len`` is filled in per step."""
        n = len(page_lists)
        ps = self.pool.page_size
        lcp = [_lcp(page_lists[i], page_lists[i + 1]) for i in range(n - 1)]
        if not any(lcp):
            return None, 0, [0] * n
        max_shared = self.max_share_levels - 1
        groups: List[List[Tuple[int, int, List[int]]]] = [[] for _ in range(max_shared)]
        suffix_start = [0] * n

        def rec(a: int, b: int, d: int, t: int) -> None:
            if b - a == 1 or t >= max_shared:
                for i in range(a, b):
                    suffix_start[i] = d
                return
            l = min(lcp[a:b - 1])
            if l > d:
                groups[t].append((a, b, page_lists[a][d:l]))
                t += 1
            start = a
            for i in range(a, b - 1):
                if lcp[i] == l:
                    rec(start, i + 1, l, t)
                    start = i + 1
            rec(start, b, l, t)

        rec(0, n, 0, 0)
        levels = []
        tokens = 0
        dev = self.device
        for lv in groups:
            if not lv:
                continue
            qo, kvp, idx = [0], [0], []
            last = []
            pos = 0
            for a, b, pages in lv:
                if a > pos:  # nodes not in any group of this level: one empty group
                    qo.append(a)
                    kvp.append(kvp[-1])
                    last.append(0)
                qo.append(b)
                idx.extend(pages)
                kvp.append(kvp[-1] + len(pages))
                last.append(ps)
                tokens += len(pages) * ps
                pos = b
            if pos < n:
                qo.append(n)
                kvp.append(kvp[-1])
                last.append(0)
            levels.append(Level(torch.tensor(qo, dtype=torch.int32, device=dev),
                                torch.tensor(kvp, dtype=torch.int32, device=dev),
                                torch.tensor(idx, dtype=torch.int32, device=dev),
                                torch.tensor(last, dtype=torch.int32, device=dev)))
        sfx_indptr, sfx_indices = page_table([page_lists[i][suffix_start[i]:] for i in range(n)], dev)
        levels.append(Level.per_branch(sfx_indptr, sfx_indices, torch.zeros(n, dtype=torch.int32, device=dev)))
        return levels, tokens, suffix_start


class _SharePlan:
    __slots__ = ("key", "perm", "kv_indptr", "kv_indices", "levels", "group_tokens", "suffix_start")

    def __init__(self, key, perm, kv_indptr, kv_indices):
        self.key, self.perm, self.kv_indptr, self.kv_indices = key, perm, kv_indptr, kv_indices
        self.levels = None
        self.group_tokens = 0
        self.suffix_start = None


class _DecodeBatch:
    """Lock-step decode of a fixed set of nodes inside one ``extend`` call (the fast path).

    A decode step of a small model costs far more in per-step bookkeeping (page tables rebuilt from
    Python lists, a shared-prefix plan validated per step, index tensors created from lists) than in
    math. Between two page boundaries a step changes the KV layout by exactly one token per node,
    appended to the node's own last page, so this class builds the tables once per *epoch*:

    * ``_build`` (at creation and whenever some node's last page is full): ``reserve`` (new pages,
      copy-on-write of a shared partial last page), the DFS order of the nodes by page list, the full
      CSR page table, the shared-prefix levels (``Engine._plan_levels``) planned once into a
      :class:`SharedPrefixDecode`, positions, and ``room``: how many more tokens every node's last
      page still takes;
    * ``advance`` (each later step): if ``room`` is 0, ``_build`` again; else ``KVPool.grow`` (lengths
      + 1, no allocation) and one in-place ``add_(1)`` on the rows holding the full table's and the
      private level's ``kv_last_page_len`` and the positions. Nothing else in the tables can change.

    The next step's input ids are the sampled token tensor itself (the batch's order is the
    sampling order), unless a rebuild re-sorted the nodes. A batch lives while its node set does;
    ``extend`` drops it when a node stops.

    Sharing is chosen once per epoch by ``Engine._share_pays`` (the engine's ``share_min_saved_bytes``
    cost model); the counters record what the chosen path reads.
    """

    def __init__(self, engine: "Engine", nodes: List["Node"], active: List[int], seeds: Optional[List[int]]):
        self.engine = engine
        self.all_nodes = nodes
        self.order = list(active)
        self.seeds = seeds
        self.next_ids: Optional[torch.Tensor] = None
        self._build()

    # ---------------------------------------------------------------- planning
    def _build(self) -> None:
        eng = self.engine
        pool, ps, dev = eng.pool, eng.pool.page_size, eng.device
        nodes = [self.all_nodes[i] for i in self.order]
        seqs = [n._seq for n in nodes]
        pool.reserve(seqs, [len(n._tokens) - pool.length(sq) for n, sq in zip(nodes, seqs)])
        eng.counters.peak_pages = max(eng.counters.peak_pages, pool.num_used)
        share = eng.max_share_levels > 1 and len(nodes) > 1
        if share:  # DFS order of the page-sharing tree
            perm = sorted(range(len(seqs)), key=lambda i: pool.pages(seqs[i]))
            self.order = [self.order[i] for i in perm]
            nodes = [nodes[i] for i in perm]
            seqs = [seqs[i] for i in perm]
        self.nodes, self.seqs = nodes, seqs
        page_lists = [pool.pages(sq) for sq in seqs]
        lens = [pool.length(sq) for sq in seqs]
        self.room = min(len(pl) * ps - ln for pl, ln in zip(page_lists, lens))
        i32 = dict(dtype=torch.int32, device=dev)
        self.kv_indptr, self.kv_indices = page_table(page_lists, dev)
        # the per-step counters live in one int32 buffer so that a step advances them with one add_:
        # row 0 the full table's kv_last_page_len, row 1 the private level's, row 2 the positions
        self._step_rows = torch.zeros(3, len(nodes), **i32)
        self._step_rows[0] = torch.tensor([(x - 1) % ps + 1 for x in lens], **i32)
        self._step_rows[2] = torch.tensor([len(n._tokens) - 1 for n in nodes], **i32)
        self.kv_last, self.positions = self._step_rows[0], self._step_rows[2]
        self.sum_lens = sum(lens)
        self.spd = None
        self.shared_fixed = 0  # shared tokens read per step = shared_fixed + sum_lens
        levels = None
        if share:
            levels, group_tokens, suffix_start = eng._plan_levels(page_lists)
        if levels is not None:
            sfx_last = []
            for ln, st in zip(lens, suffix_start):
                r = ln - st * ps  # >= 1: a node's last page is never shared after reserve
                sfx_last.append((r - 1) % ps + 1)
            self._step_rows[1] = torch.tensor(sfx_last, **i32)
            levels[-1].kv_last_page_len = self._step_rows[1]  # planned as is (int32, contiguous row)
            self.shared_fixed = group_tokens - ps * sum(suffix_start)
            if eng._share_pays(-self.shared_fixed, len(levels)):
                self.spd = SharedPrefixDecode().plan(levels, device=dev)
                assert self.spd.levels[-1].kv_last_page_len.data_ptr() == self._step_rows[1].data_ptr()
        self.seed_tensor = None
        if self.seeds is not None:
            self.seed_tensor = torch.tensor([self.seeds[i] for i in self.order], dtype=torch.int64, device=dev)
        self.next_ids = None  # the order may have changed: ids come from the nodes' token lists

    def advance(self) -> None:
        """Move to the next step: every node has one new pending token (module: class docstring)."""
        if self.room <= 0:
            self._build()
            return
        self.engine.pool.grow(self.seqs)
        self.room -= 1
        self.sum_lens += len(self.seqs)
        self._step_rows.add_(1)  # kv_last_page_len of both tables and the positions

    def tables(self):
        """The current tables, for tests: ``(order, kv_indptr, kv_indices, kv_last, positions, levels or
        None)``."""
        return (list(self.order), self.kv_indptr, self.kv_indices, self.kv_last, self.positions,
                None if self.spd is None else self.spd.levels)

    # ---------------------------------------------------------------- running
    def forward(self) -> torch.Tensor:
        """Run every node's pending token; next-token logits ``[B, V]`` in ``self.order``."""
        eng = self.engine
        pool = eng.pool
        ids = self.next_ids
        if ids is None:
            ids = torch.tensor([n._tokens[-1] for n in self.nodes], dtype=torch.long, device=eng.device)
        bpt = pool.bytes_per_token
        c = eng.counters
        c.kv_bytes_read += (self.sum_lens + self.shared_fixed if self.spd is not None else self.sum_lens) * bpt
        c.kv_bytes_read_unshared += self.sum_lens * bpt
        c.forward_steps += 1
        spd = self.spd
        if spd is not None:
            priv = spd.levels[-1]
            # the private level holds each node's last page, so it also says where the new token goes
            w_indptr, w_indices, w_last = priv.kv_indptr, priv.kv_indices, priv.kv_last_page_len
        else:
            w_indptr, w_indices, w_last = self.kv_indptr, self.kv_indices, self.kv_last
        kall, vall = pool._k_layers, pool._v_layers
        kv_indptr, kv_indices, kv_last = self.kv_indptr, self.kv_indices, self.kv_last

        def attn(li, q, k, v):
            kc, vc = kall[li], vall[li]
            ops.append_paged_kv(k, v, kc, vc, w_indptr, w_indices, w_last)
            if spd is not None:
                return spd.run(q, kc, vc)
            return ops.paged_attention(q, kc, vc, kv_indptr, kv_indices, kv_last)

        m = eng.model
        return m.head(m.hidden_states(ids, self.positions, attn))
