"""Per-position outputs of a model over token sequences that share prefixes, with a KV cache.

A process reward model scores every candidate of a search depth; the candidates are their parent's
tokens plus one new step. Reading each candidate in full (``Transformer.forward_tokens``) re-runs
the shared prompt and the earlier steps again at every depth. :class:`PrefixScorer` keeps the paged
KV of every sequence it scored (a :class:`KVPool`, copy-on-write forks, the same layout the engine
uses) and runs only the tokens after the longest prefix it has already seen:

* a scored sequence is an *entry*: its token tuple, its pool sequence (the KV of all its tokens) and
  its outputs ``[len, out_dim]`` (float32, e.g. the PRM's per-position scalar);
* ``score(seqs)`` finds for each sequence the longest cached prefix (an exact hit costs nothing),
  forks that prefix's pages (full pages shared, a partial last page copied on write), and runs every
  sequence's new tokens in ONE batched forward: dense ragged attention when nothing is cached,
  otherwise ragged causal :func:`ttscale.ops.paged_attention` of the new tokens against their pages.
  The result is the prefix's stored outputs followed by the new rows;
* the cache is bounded by the pool: when a forward needs more pages than are free, the least recently
  used entries are released (their pages stay alive while a forked child still uses them) and it
  retries; if everything evictable is gone it raises :class:`KVPoolExhausted` with the numbers.

Results equal ``forward_tokens`` up to float rounding (keys of a prefix are the same K/V, attention is
split differently). Lookup tries the candidate prefix lengths the caller names (e.g. the step
boundaries of a PRM) or else every length that has an entry, longest first.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import ops
from .kvpool import KVPool, KVPoolExhausted, indptr, page_table
from .model import Transformer

__all__ = ["PrefixScorer"]


class _Entry:
    __slots__ = ("seq", "out")

    def __init__(self, seq: int, out: torch.Tensor) -> None:
        self.seq, self.out = seq, out


class PrefixScorer:
    """Prefix-cached per-position outputs of ``model`` (module docstring).

    Args:
        model: a :class:`Transformer` (LM or sequence-classification head).
        page_size: tokens per KV page.
        kv_budget_bytes: pool size (K and V of all layers); default 64 MiB, at least 16 pages.
        num_pages: explicit pool size in pages (overrides ``kv_budget_bytes``).

    Counters: ``tokens_run`` (tokens through the model), ``tokens_reused`` (prefix tokens served
    from the cache), ``evictions``.
    """

    def __init__(self, model: Transformer, *, page_size: int = 16, kv_budget_bytes: int = 64 * 2**20,
                 num_pages: Optional[int] = None) -> None:
        if not isinstance(model, Transformer):
            raise TypeError(f"ttscale.engine: PrefixScorer needs a ttscale.engine.Transformer, got {type(model).__name__}")
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"ttscale.engine: PrefixScorer page_size must be a positive int, got {page_size!r}")
        c = model.config
        if num_pages is None:
            per_page = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * page_size * \
                torch.empty(0, dtype=model.dtype).element_size()
            num_pages = max(16, int(kv_budget_bytes) // per_page)
        self.model = model
        self.pool = KVPool(c.num_hidden_layers, num_pages, page_size, c.num_key_value_heads, c.head_dim,
                           dtype=model.dtype, device=model.device)
        self._entries: "OrderedDict[Tuple[int, ...], _Entry]" = OrderedDict()  # LRU order: oldest first
        self._lengths: Dict[int, int] = {}  # entry length -> number of entries of that length
        self.tokens_run = 0
        self.tokens_reused = 0
        self.evictions = 0

    # ------------------------------------------------------------------ cache
    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Release every entry (the pool is empty afterwards)."""
        for e in self._entries.values():
            self.pool.release(e.seq)
        self._entries.clear()
        self._lengths.clear()

    def _drop(self, key: Tuple[int, ...]) -> None:
        e = self._entries.pop(key)
        self.pool.release(e.seq)
        n = self._lengths[len(key)] - 1
        if n:
            self._lengths[len(key)] = n
        else:
            del self._lengths[len(key)]

    def _insert(self, key: Tuple[int, ...], e: _Entry) -> None:
        old = self._entries.get(key)
        if old is not None:  # already cached (the lookup was limited to other prefix lengths): keep it
            self.pool.release(e.seq)
            return
        self._entries[key] = e
        self._lengths[len(key)] = self._lengths.get(len(key), 0) + 1

    def _lookup(self, s: Tuple[int, ...], cands: Optional[Sequence[int]]) -> Tuple[int, Optional[_Entry]]:
        lens = sorted({n for n in (cands if cands is not None else self._lengths) if 0 < n <= len(s)}, reverse=True)
        for n in lens:
            if n in self._lengths:
                key = s if n == len(s) else s[:n]
                e = self._entries.get(key)
                if e is not None:
                    self._entries.move_to_end(key)
                    return n, e
        return 0, None

    # ------------------------------------------------------------------ scoring
    def score(self, sequences: Sequence[Sequence[int]],
              prefix_lengths: Optional[Sequence[Optional[Sequence[int]]]] = None) -> List[torch.Tensor]:
        """float32 ``[len_i, out_dim]`` per sequence, as ``model.forward_tokens(sequences)``.

        ``prefix_lengths[i]``: lengths at which a cached prefix of sequence ``i`` may end (others are
        not looked up); ``None`` (for all or one sequence) tries every cached length."""
        m = self.model
        seqs: List[Tuple[int, ...]] = []
        for i, s in enumerate(sequences):
            s = tuple(int(x) for x in (s.tolist() if isinstance(s, torch.Tensor) else s))
            if not s:
                raise ValueError(f"ttscale.engine: PrefixScorer.score: sequences[{i}] is empty")
            if len(s) > m.config.max_position_embeddings:
                raise ValueError(f"ttscale.engine: PrefixScorer.score: sequences[{i}] has {len(s)} tokens, more than "
                                 f"max_position_embeddings={m.config.max_position_embeddings}")
            m.check_ids(s, f"sequences[{i}]")
            seqs.append(s)
        if prefix_lengths is not None and len(prefix_lengths) != len(seqs):
            raise ValueError(f"ttscale.engine: PrefixScorer.score: {len(seqs)} sequences but "
                             f"{len(prefix_lengths)} prefix_lengths")
        out: List[Optional[torch.Tensor]] = [None] * len(seqs)
        run: List[Tuple[int, Tuple[int, ...], int, Optional[_Entry]]] = []  # (index, seq, cached, prefix entry)
        first: Dict[Tuple[int, ...], int] = {}
        for i, s in enumerate(seqs):
            n, e = self._lookup(s, None if prefix_lengths is None else prefix_lengths[i])
            if e is not None and n == len(s):
                out[i] = e.out
                self.tokens_reused += n
            elif s in first:  # duplicate within this call: filled from the first copy below
                continue
            else:
                first[s] = i
                run.append((i, s, n, e))
        if run:
            self._run(run, out)
        for i, s in enumerate(seqs):
            if out[i] is None:
                out[i] = out[first[s]]
        return [o.clone() for o in out]  # type: ignore[union-attr]

    def _run(self, run, out: List[Optional[torch.Tensor]]) -> None:
        pool, ps, dev = self.pool, self.pool.page_size, self.model.device
        # fork every prefix first: a child holds its own references, so LRU eviction below can release
        # any entry, including a prefix of this batch, without losing pages the batch needs
        ids_seq = [pool.fork(e.seq, 1)[0] if e is not None else pool.new_sequence() for _, _, _, e in run]
        try:
            counts = [len(s) - n for _, s, n, _ in run]
            while True:
                try:
                    pool.reserve(ids_seq, counts)
                    break
                except KVPoolExhausted:
                    if not self._entries:
                        raise
                    # release the oldest half of what is left (at least one): one retry per halving
                    for key in list(itertools.islice(self._entries, max(1, len(self._entries) // 2))):
                        self._drop(key)
                        self.evictions += 1
            kv_indptr, kv_indices = page_table([pool.pages(q) for q in ids_seq], dev)
            kv_last = torch.tensor([(pool.length(q) - 1) % ps + 1 for q in ids_seq], dtype=torch.int32, device=dev)
            qo_indptr = torch.tensor(indptr(counts), dtype=torch.int32, device=dev)
            ids: List[int] = []
            pos: List[int] = []
            for (_, s, n, _), c in zip(run, counts):
                ids.extend(s[n:])
                pos.extend(range(n, n + c))
            fresh = all(n == 0 for _, _, n, _ in run)

            def attn(li, q, k, v):
                kc, vc = pool.k_cache(li), pool.v_cache(li)
                ops.append_paged_kv(k, v, kc, vc, kv_indptr, kv_indices, kv_last, append_indptr=qo_indptr)
                if fresh:
                    return ops.attention(q, k, v, causal=True, cu_seqlens_q=qo_indptr, cu_seqlens_k=qo_indptr)
                return ops.paged_attention(q, kc, vc, kv_indptr, kv_indices, kv_last, qo_indptr=qo_indptr,
                                           causal=True)

            m = self.model
            rows = m.head(m.hidden_states(torch.tensor(ids, dtype=torch.long, device=dev),
                                          torch.tensor(pos, dtype=torch.long, device=dev), attn))
        except BaseException:
            for q in ids_seq:
                pool.release(q)
            raise
        for (i, s, n, e), q, new in zip(run, ids_seq, rows.split(counts)):
            o = new if e is None else torch.cat([e.out[:n], new])
            out[i] = o
            self._insert(s, _Entry(q, o))
            self.tokens_run += len(s) - n
            self.tokens_reused += n
