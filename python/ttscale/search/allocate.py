"""The per-depth decision every tree strategy makes, and the estimators used to evaluate them.

``allocate(scores, width, rule)`` returns how many children each of ``len(scores)`` nodes gets; the
counts are non-negative integers summing to ``width`` exactly (0 children = the node is pruned):

* ``"topk"``: the ``k`` best nodes share the width evenly (``width // k`` each, the remainder one
  each to the best ones); beam search keeps ``k = width / beam_width``, DVTS uses ``k = 1``.
* ``"rebase"``: REBASE's sequential-ceil rounding of ``width * softmax(scores / temperature)``:
  visit nodes best first; node i gets ``ceil(W * e_i / sum_{j >= i} e_j)`` of the remaining W.
  The last node visited takes what is left, so the counts sum to the width; a node with a
  negligible share gets 0.
* ``"multinomial"``: ``width`` i.i.d. draws from ``softmax(scores / temperature)`` (scores are
  log-weights); expected count ``width * w_i``.
* ``"systematic"``: one uniform offset u, points ``(u + j) / width``; node i gets the points
  falling in its cumulative-weight interval. Expected count exactly ``width * w_i``, and every count
  is ``floor`` or ``ceil`` of it (lower variance than multinomial).

Ties sort by index (stable), so allocation is deterministic given the scores (and the rng).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

__all__ = ["allocate", "RULES", "softmax", "ess", "pass_at_k", "majority_probability"]

RULES = ("topk", "rebase", "multinomial", "systematic")


def softmax(x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64) / temperature
    if x.size == 0:
        return x
    if np.isnan(x).any():
        raise ValueError("softmax: scores contain nan")
    top = np.isposinf(x)
    if top.any():  # the limit of the softmax as those scores grow: equal shares among them
        return top / top.sum()
    finite = np.isfinite(x)
    if not finite.any():
        raise ValueError("softmax: every score is -inf")
    z = np.where(finite, x - x[finite].max(), -np.inf)
    e = np.exp(z)
    return e / e.sum()


def ess(weights: np.ndarray) -> float:
    """Effective sample size ``(sum w)^2 / sum w^2`` of non-negative weights."""
    w = np.asarray(weights, dtype=np.float64)
    s2 = float((w * w).sum())
    return float(w.sum()) ** 2 / s2 if s2 > 0 else 0.0


def allocate(scores: Sequence[float], width: int, rule: str, *, k: Optional[int] = None,
             temperature: float = 1.0, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"allocate: scores must be 1-D, got shape {scores.shape}")
    if not isinstance(width, (int, np.integer)) or width < 0:
        raise ValueError(f"allocate: width must be an integer >= 0, got {width!r}")
    if rule not in RULES:
        raise ValueError(f"allocate: rule must be one of {RULES}, got {rule!r}")
    if np.isnan(scores).any():
        raise ValueError("allocate: scores contain nan")
    n = scores.size
    out = np.zeros(n, dtype=np.int64)
    if width == 0:
        return out
    if n == 0:
        raise ValueError(f"allocate: no nodes to give width {width} to")
    if rule in ("rebase", "multinomial", "systematic") and not temperature > 0:
        raise ValueError(f"allocate: temperature must be > 0, got {temperature!r}")
    order = np.argsort(-scores, kind="stable")  # best first, ties by index

    if rule == "topk":
        k = width if k is None else k
        if k < 1:
            raise ValueError(f"allocate: k must be >= 1, got {k!r}")
        k = min(k, n, width)
        base, rem = divmod(width, k)
        out[order[:k]] = base
        out[order[:rem]] += 1
        return out

    if rule == "rebase":
        e = softmax(scores[order], temperature)
        tail = np.cumsum(e[::-1])[::-1]  # sum_{j >= i} e_j over the sorted order
        left = width
        for pos, i in enumerate(order):
            if left == 0:
                break
            share = left if pos == n - 1 else min(left, math.ceil(left * e[pos] / tail[pos] - 1e-12))
            out[i] = share
            left -= share
        return out

    if rng is None:
        raise ValueError(f"allocate: rule {rule!r} needs an rng (numpy Generator)")
    w = softmax(scores, temperature)
    if rule == "multinomial":
        return rng.multinomial(width, w).astype(np.int64)
    # systematic: count points (u + j)/width, j = 0..width-1, inside [c_{i-1}, c_i)
    c = np.cumsum(w)
    c[-1] = 1.0
    pts = (rng.random() + np.arange(width)) / width
    idx = np.searchsorted(c, pts, side="right")
    return np.bincount(np.minimum(idx, n - 1), minlength=n).astype(np.int64)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: ``1 - C(n-c, k) / C(n, k)``
    (Chen et al. 2021), computed as a product so it is stable for large n."""
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def majority_probability(probs: Sequence[float], n: int, target: int = 0) -> float:
    """Exact probability that answer ``target`` wins a plurality vote of ``n`` i.i.d. draws from
    ``probs`` (ties split evenly among the tied answers, as a uniform random tie-break would).
    Enumerates all compositions of n, so keep ``len(probs)`` and ``n`` small."""
    probs = np.asarray(probs, dtype=np.float64)
    K = probs.size
    total = 0.0

    def rec(i: int, left: int, counts: list) -> None:
        nonlocal total
        if i == K - 1:
            cnt = counts + [left]
            m = max(cnt)
            if cnt[target] != m:
                return
            ties = sum(1 for x in cnt if x == m)
            if any(x and p == 0 for x, p in zip(cnt, probs)):
                return
            logp = math.lgamma(n + 1) + sum(x * math.log(p) - math.lgamma(x + 1)
                                            for x, p in zip(cnt, probs) if x)
            total += math.exp(logp) / ties
            return
        for x in range(left + 1):
            rec(i + 1, left - x, counts + [x])

    rec(0, n, [])
    return total
