"""A paged KV pool with reference-counted pages and copy-on-write fork.

Storage: ``k, v: [num_layers, num_pages, page_size, Hkv, D]`` allocated once. ``k_cache(layer)`` is
the contiguous slice ``[num_pages, page_size, Hkv, D]`` (DESIGN.md layout) that the attention ops
take; a page id means the same slot in every layer, so one page table serves all layers.

A sequence is a list of page ids plus a length (tokens whose KV slot is reserved). Invariants
(checked by :meth:`KVPool.check_invariants`):

* ``refcount[p]`` == number of live sequences whose page list contains ``p``;
* free pages have refcount 0, every page is either free or referenced (nothing leaks);
* a sequence has ``ceil(length / page_size)`` pages.

``fork(seq, n)`` gives ``n`` children the parent's page list (refcounts += n), so a shared prompt is
stored once. Only the last page of a sequence is ever written (tokens are appended), so only a
partially filled last page can be written while shared: :meth:`reserve` copies it to a fresh page
first (copy-on-write, one batched :func:`ttscale.ops.copy_pages` for all layers) and the writer
drops its reference. Full shared pages are never copied.

When the pool cannot satisfy a request it raises :class:`KVPoolExhausted` (a RuntimeError) with the
pages needed, free and total, and leaves every sequence unchanged: nothing is evicted silently.
"""
from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import ops

__all__ = ["KVPool", "KVPoolExhausted", "indptr", "page_table"]


def indptr(counts: Sequence[int]) -> List[int]:
    """``[0, c0, c0 + c1, ...]``: the CSR offsets of consecutive runs of these lengths."""
    out = [0]
    for c in counts:
        out.append(out[-1] + c)
    return out


def page_table(page_lists: Sequence[Sequence[int]], device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(kv_indptr, kv_indices)``, int32 on ``device``: the paged-KV page table (DESIGN.md format)
    of sequences with these page lists, in this order."""
    return (torch.tensor(indptr([len(pl) for pl in page_lists]), dtype=torch.int32, device=device),
            torch.tensor(list(itertools.chain.from_iterable(page_lists)), dtype=torch.int32, device=device))


class KVPoolExhausted(RuntimeError):
    pass


class _Seq:
    __slots__ = ("pages", "length")

    def __init__(self, pages: List[int], length: int):
        self.pages = pages
        self.length = length


class KVPool:
    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device=None):
        for name, v in (("num_layers", num_layers), ("num_pages", num_pages), ("page_size", page_size),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ttscale.engine: KVPool {name} must be a positive int, got {v!r}")
        self.num_layers, self.num_pages, self.page_size = num_layers, num_pages, page_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # per-layer views made once (indexing self.k[layer] is a tensor op per layer per step)
        self._k_layers = self.k.unbind(0)
        self._v_layers = self.v.unbind(0)
        self.refcount: List[int] = [0] * num_pages
        self._free: List[int] = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._seqs: Dict[int, _Seq] = {}
        self._next_id = 0
        self.peak_pages = 0
        self.cow_copies = 0

    # ------------------------------------------------------------------ views
    def k_cache(self, layer: int) -> torch.Tensor:
        return self._k_layers[layer]

    def v_cache(self, layer: int) -> torch.Tensor:
        return self._v_layers[layer]

    @property
    def bytes_per_token(self) -> int:
        """K and V bytes of one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.k.element_size()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def sequences(self) -> List[int]:
        return list(self._seqs)

    def _get(self, seq: int) -> _Seq:
        try:
            return self._seqs[seq]
        except KeyError:
            raise ValueError(f"ttscale.engine: KVPool has no live sequence {seq!r} (released or never created)") from None

    def length(self, seq: int) -> int:
        return self._get(seq).length

    def pages(self, seq: int) -> List[int]:
        """The sequence's page ids (the live list: do not modify)."""
        return self._get(seq).pages

    def last_page_len(self, seq: int) -> int:
        n = self._get(seq).length
        return 0 if n == 0 else (n - 1) % self.page_size + 1

    # ------------------------------------------------------------------ lifecycle
    def new_sequence(self) -> int:
        sid = self._next_id
        self._next_id += 1
        self._seqs[sid] = _Seq([], 0)
        return sid

    def fork(self, seq: int, n: int) -> List[int]:
        """``n`` new sequences sharing all of ``seq``'s pages (``seq`` stays live)."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"ttscale.engine: fork count n must be an int >= 0, got {n!r}")
        parent = self._get(seq)
        rc = self.refcount
        for p in parent.pages:
            rc[p] += n
        out = []
        for _ in range(n):
            sid = self._next_id
            self._next_id += 1
            self._seqs[sid] = _Seq(list(parent.pages), parent.length)
            out.append(sid)
        return out

    def release(self, seq: int) -> None:
        s = self._get(seq)
        rc = self.refcount
        for p in s.pages:
            rc[p] -= 1
            if rc[p] == 0:
                self._free.append(p)
        del self._seqs[seq]

    def reserve(self, seqs: Sequence[int], counts: Sequence[int]) -> None:
        """Make room for ``counts[i]`` more tokens at the end of ``seqs[i]`` (lengths grow by counts).

        Copies a shared, partially filled last page before it is written (copy-on-write), allocates
        new pages, all or nothing: on exhaustion nothing changes and :class:`KVPoolExhausted` says
        how many pages were needed."""
        if len(seqs) != len(counts):
            raise ValueError(f"ttscale.engine: reserve got {len(seqs)} sequences but {len(counts)} counts")
        if len(set(seqs)) != len(seqs):
            raise ValueError("ttscale.engine: reserve got the same sequence twice")
        ps = self.page_size
        rc = self.refcount
        # Dry run: pages needed, simulating the refcount drops of earlier copy-on-writes in this call
        # (two batch members sharing a partial page: the first copies, the last writes in place).
        dropped: Dict[int, int] = {}
        need = 0
        plan = []
        for sid, c in zip(seqs, counts):
            s = self._get(sid)
            if c < 0:
                raise ValueError(f"ttscale.engine: reserve count must be >= 0, got {c}")
            if c == 0:
                plan.append(None)
                continue
            cow = False
            if s.length % ps != 0:
                last = s.pages[-1]
                if rc[last] - dropped.get(last, 0) > 1:
                    cow = True
                    dropped[last] = dropped.get(last, 0) + 1
            new_pages = -(-(s.length + c) // ps) - len(s.pages)
            need += new_pages + cow
            plan.append((s, c, cow, new_pages))
        if need > len(self._free):
            raise KVPoolExhausted(
                f"ttscale.engine: KV pool exhausted: {need} pages needed, {len(self._free)} free of "
                f"{self.num_pages} total (page_size {ps}); release nodes or create the Engine with more num_pages")
        src, dst = [], []
        free = self._free
        for item in plan:
            if item is None:
                continue
            s, c, cow, new_pages = item
            if cow:
                old = s.pages[-1]
                p = free.pop()
                rc[old] -= 1
                rc[p] = 1
                s.pages[-1] = p
                src.append(old)
                dst.append(p)
            for _ in range(new_pages):
                p = free.pop()
                rc[p] = 1
                s.pages.append(p)
            s.length += c
        if src:
            self._copy(src, dst)
        used = self.num_pages - len(free)
        if used > self.peak_pages:
            self.peak_pages = used

    def grow(self, seqs: Sequence[int]) -> None:
        """One more token for each sequence, in room that is already reserved: the sequence's last page
        has a free slot and is its own (refcount 1). The decode fast path of the engine calls this for
        the steps between page boundaries instead of :meth:`reserve`; it raises ValueError (and
        changes nothing) when a sequence has no such room."""
        ps = self.page_size
        rc = self.refcount
        live = self._seqs
        try:
            ss = [live[sid] for sid in seqs]
        except KeyError as e:
            raise ValueError(f"ttscale.engine: KVPool has no live sequence {e.args[0]!r}") from None
        for s in ss:
            if s.length >= len(s.pages) * ps or rc[s.pages[-1]] != 1:
                raise ValueError(f"ttscale.engine: KVPool.grow: a sequence has no private free slot "
                                 f"(length {s.length}, {len(s.pages)} pages); use reserve")
        for s in ss:
            s.length += 1

    def _copy(self, src: List[int], dst: List[int]) -> None:
        # One copy_pages call for every layer: view [L * P, page, Hkv, D], page p of layer l at l*P + p.
        L, P = self.num_layers, self.num_pages
        s = torch.tensor(src, dtype=torch.int64)
        d = torch.tensor(dst, dtype=torch.int64)
        off = torch.arange(L, dtype=torch.int64)[:, None] * P
        s = (off + s[None, :]).reshape(-1).to(self.k.device)
        d = (off + d[None, :]).reshape(-1).to(self.k.device)
        kf = self.k.view(L * P, *self.k.shape[2:])
        vf = self.v.view(L * P, *self.v.shape[2:])
        ops.copy_pages(kf, vf, s, d)
        self.cow_copies += len(src)

    # ------------------------------------------------------------------ checks
    def check_invariants(self) -> None:
        """Raise AssertionError if a page leaked, a refcount is wrong, or a page count is inconsistent."""
        counts = [0] * self.num_pages
        for sid, s in self._seqs.items():
            exp = -(-s.length // self.page_size)
            assert len(s.pages) == exp, f"sequence {sid}: {len(s.pages)} pages for length {s.length} (expected {exp})"
            assert len(set(s.pages)) == len(s.pages), f"sequence {sid} lists a page twice: {s.pages}"
            for p in s.pages:
                assert 0 <= p < self.num_pages, f"sequence {sid}: page id {p} out of range"
                counts[p] += 1
        assert counts == self.refcount, "refcounts differ from the number of sequences referencing each page"
        free = set(self._free)
        assert len(free) == len(self._free), "free list has duplicates"
        for p in range(self.num_pages):
            if counts[p] == 0:
                assert p in free, f"page {p} is referenced by no sequence but is not free (leak)"
            else:
                assert p not in free, f"page {p} is free but referenced by {counts[p]} sequences"
