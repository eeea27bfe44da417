"""Plain-torch references for the sampling ops (``ttscale.ops.sampling``).

Written from the documented semantics (the module docstring of ``ttscale/ops/sampling.py``), not
from the kernels:

* filters apply in the order temperature, top-k, top-p, min-p, each on the distribution
  renormalised by the ones before it;
* ``temperature == 0`` is greedy (the first argmax);
* top-k keeps the ``k`` largest values, lower token ids first among ties at the k-th value;
  ``k <= 0`` disables it and ``k >= V`` keeps everything;
* top-p keeps the shortest most-likely prefix whose mass reaches ``top_p`` (at least one token),
  plus every token tied with the last one kept; ``top_p >= 1`` disables it;
* min-p keeps tokens with ``p >= min_p * p_max``; ``min_p <= 0`` disables it.

:func:`filtered_probs` gives the exact renormalised distribution (float64).
:func:`filtered_probs_with_ambiguity` also says which tokens sit so close to a top-p or min-p cut
that a float32 kernel may legitimately decide either way (tests must accept both decisions for
them). :func:`sample_ref` is the classic plain-torch sampler (softmax, sort, cumsum, mask,
multinomial) used as the benchmark baseline. :func:`token_logprobs_ref` and
:func:`speculative_verify_ref` mirror the other two ops; :func:`speculative_position_laws` gives the
exact law of each emitted token of chain speculative sampling.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

Param = Union[None, float, int, torch.Tensor]

__all__ = [
    "filtered_probs",
    "filtered_probs_with_ambiguity",
    "sample_ref",
    "token_logprobs_ref",
    "speculative_verify_ref",
    "speculative_position_laws",
]


def _row_values(x: Param, B: int, default: float, name: str, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """A filter parameter as a ``[B]`` tensor (a scalar is broadcast, ``None`` gives ``default``)."""
    if x is None:
        return torch.full((B,), default, dtype=dtype, device=device)
    if isinstance(x, torch.Tensor):
        if x.dim() == 0:
            x = x.reshape(1).expand(B)
        if x.shape != (B,):
            raise ValueError(f"reference: {name} must be a scalar or have shape [{B}], got {tuple(x.shape)}")
        return x.detach().to(device=device, dtype=dtype)
    return torch.full((B,), float(x), dtype=dtype, device=device)


def filtered_probs_with_ambiguity(
    logits: torch.Tensor,
    temperature: Param = None,
    top_k: Param = None,
    top_p: Param = None,
    min_p: Param = None,
    probs_mode: bool = False,
    tol: float = 1e-5,
    tie_rtol: float = 1e-6,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The exact filtered distribution and the tokens whose keep/drop decision is ambiguous.

    Args:
        logits: ``[B, V]`` logits (or non-negative probabilities with ``probs_mode``), any float
            dtype; the values are taken exactly as stored and computed with in float64.
        temperature, top_k, top_p, min_p: None, a scalar or a ``[B]`` tensor (as in the op).
        probs_mode: ``logits`` are probabilities (``sample_from_probs``); no temperature.
        tol: a token is ambiguous when the top-p cumulative mass before it is within
            ``tol * kept_mass`` of the cut ``top_p * kept_mass``, or when its mass is within
            ``tol`` (relative) of the min-p threshold ``min_p * p_max``.
        tie_rtol: in logits mode, tokens whose temperature-scaled score is within this relative
            distance of the score of the last token top-p keeps are also ambiguous (a float32
            kernel may see them as tied with it, and ties at the cut are kept).

    Returns:
        ``(probs, ambiguous)``: float64 ``[B, V]`` on the CPU (rows sum to 1; greedy rows are a one-hot
        at the first argmax) and a bool ``[B, V]`` mask of ambiguous tokens (never set on greedy rows
        or on tokens of zero mass).
    """
    if logits.dim() != 2:
        raise ValueError(f"reference: logits must be [B, V], got shape {tuple(logits.shape)}")
    x = logits.detach().to(device="cpu", dtype=torch.float64)
    B, V = x.shape
    pos = torch.arange(V)
    P = _row_values(top_p, B, 1.0, "top_p")
    M = _row_values(min_p, B, 0.0, "min_p")
    K = _row_values(top_k, B, 0, "top_k", dtype=torch.int64)

    if probs_mode:
        if temperature is not None:
            raise ValueError("reference: probs_mode takes no temperature")
        greedy = torch.zeros(B, dtype=torch.bool)
        mass = x.clone()
        score = x.clone()
    else:
        T = _row_values(temperature, B, 1.0, "temperature")
        greedy = T == 0
        mx = x.max(dim=1, keepdim=True).values
        Ts = torch.where(greedy, torch.ones_like(T), T)[:, None]
        score = (x - mx) / Ts
        score = torch.where(x == float("-inf"), torch.full_like(score, float("-inf")), score)  # -inf/inf is NaN
        mass = torch.exp(score)

    # order: value descending, lower token id first among equal values (stable sort)
    order = torch.sort(x, dim=1, descending=True, stable=True).indices
    sv = x.gather(1, order)  # raw values (the ordering key; scores are monotone in them)
    ss = score.gather(1, order)
    sm = mass.gather(1, order)

    # ---- top-k (exact: compares stored values and ids)
    k_eff = torch.where(K <= 0, torch.full_like(K, V), K.clamp(max=V))
    keep = pos[None, :] < k_eff[:, None]
    amb = torch.zeros(B, V, dtype=torch.bool)

    # ---- top-p on the top-k-renormalised distribution
    use_p = P < 1.0
    if bool(use_p.any()):
        m_kept = sm * keep
        total = m_kept.sum(dim=1, keepdim=True)
        cum_excl = torch.cumsum(m_kept, dim=1) - m_kept
        target = P[:, None] * total
        prefix = keep & ((cum_excl < target) | (pos[None, :] == 0))
        n_keep = prefix.sum(dim=1).clamp(min=1)
        v_cut = sv.gather(1, (n_keep - 1)[:, None])
        s_cut = ss.gather(1, (n_keep - 1)[:, None])
        new_keep = keep & (prefix | (sv == v_cut))
        a = keep & (pos[None, :] > 0) & ((cum_excl - target).abs() <= tol * total)
        if not probs_mode:
            a |= keep & ((ss - s_cut).abs() <= tie_rtol * s_cut.abs().clamp(min=1.0))
        keep = torch.where(use_p[:, None], new_keep, keep)
        amb |= a & use_p[:, None]

    # ---- min-p, relative to the most likely token (always kept by the filters before)
    use_m = M > 0.0
    if bool(use_m.any()):
        thr = M[:, None] * sm[:, :1]
        new_keep = keep & (sm >= thr)
        a = keep & ((sm - thr).abs() <= tol * thr)
        keep = torch.where(use_m[:, None], new_keep, keep)
        amb |= a & use_m[:, None]

    kept_mass = sm * keep
    probs_sorted = kept_mass / kept_mass.sum(dim=1, keepdim=True)
    probs = torch.zeros(B, V, dtype=torch.float64).scatter_(1, order, probs_sorted)
    ambiguous = torch.zeros(B, V, dtype=torch.bool).scatter_(1, order, amb & (sm > 0))

    if bool(greedy.any()):
        g = torch.nonzero(greedy).flatten()
        onehot = torch.zeros(len(g), V, dtype=torch.float64)
        onehot[torch.arange(len(g)), x[g].argmax(dim=1)] = 1.0
        probs[g] = onehot
        ambiguous[g] = False
    return probs, ambiguous


def filtered_probs(
    logits: torch.Tensor,
    temperature: Param = None,
    top_k: Param = None,
    top_p: Param = None,
    min_p: Param = None,
    probs_mode: bool = False,
) -> torch.Tensor:
    """The exact renormalised distribution ``[B, V]`` (float64, CPU) after temperature, top-k, top-p
    and min-p, in that order (see :func:`filtered_probs_with_ambiguity`)."""
    return filtered_probs_with_ambiguity(logits, temperature, top_k, top_p, min_p, probs_mode)[0]


def sample_ref(
    logits: torch.Tensor,
    temperature: Param = None,
    top_k: Param = None,
    top_p: Param = None,
    min_p: Param = None,
    generator: Optional[torch.Generator] = None,
    indices: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The classic plain-torch sampler: softmax, sort, cumsum, mask, multinomial (float32, on the
    logits' device). One int64 token per row (or per entry of ``indices``; the rows are gathered).

    Same filter order and parameters as ``ttscale.ops.sample``; ties are resolved on the float32
    softmax probabilities. With no filter it is ``multinomial(softmax(logits / T))`` (no sort).
    """
    B0 = logits.shape[0]
    dev = logits.device
    T = _row_values(temperature, B0, 1.0, "temperature", torch.float32, dev)
    K = _row_values(top_k, B0, 0, "top_k", torch.int64, dev)
    P = _row_values(top_p, B0, 1.0, "top_p", torch.float32, dev)
    M = _row_values(min_p, B0, 0.0, "min_p", torch.float32, dev)
    x = logits.float()
    if indices is not None:
        x, T, K, P, M = x[indices], T[indices], K[indices], P[indices], M[indices]
    B, V = x.shape
    greedy = T == 0
    x = x / torch.where(greedy, torch.ones_like(T), T)[:, None]
    probs = torch.softmax(x, dim=-1)
    if top_k is None and top_p is None and min_p is None:
        tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    else:
        sp, si = torch.sort(probs, dim=-1, descending=True, stable=True)
        pos = torch.arange(V, device=dev)[None, :]
        if top_k is not None:
            k_eff = torch.where(K <= 0, torch.full_like(K, V), K.clamp(max=V))
            sp = sp.masked_fill(pos >= k_eff[:, None], 0.0)
        if top_p is not None:
            cum = sp.cumsum(dim=-1)
            remove = ((cum - sp) >= P[:, None] * cum[:, -1:]) & (pos > 0)
            n_keep = (~remove).sum(dim=-1, keepdim=True)
            cut = sp.gather(1, n_keep - 1)
            sp = sp.masked_fill(remove & (sp != cut), 0.0)
        if min_p is not None:
            sp = sp.masked_fill(sp < M[:, None] * sp[:, :1], 0.0)
        choice = torch.multinomial(sp, 1, generator=generator)
        tok = si.gather(1, choice).squeeze(1)
    return torch.where(greedy, x.argmax(dim=-1), tok)


def token_logprobs_ref(logits: torch.Tensor, tokens: torch.Tensor, temperature: Param = None) -> torch.Tensor:
    """float64 ``log_softmax(logits / T)[b, tokens[b]]`` (``T == 0`` counts as 1), on the CPU."""
    x = logits.detach().to(device="cpu", dtype=torch.float64)
    B = x.shape[0]
    T = _row_values(temperature, B, 1.0, "temperature")
    T = torch.where(T == 0, torch.ones_like(T), T)
    lp = torch.log_softmax(x / T[:, None], dim=-1)
    return lp.gather(1, tokens.detach().cpu().long()[:, None]).squeeze(1)


def _inverse_cdf(mass: torch.Tensor, u: float) -> int:
    """First token (in token order) whose running mass exceeds ``u * total`` (mass > 0 only)."""
    cum = torch.cumsum(mass, 0)
    target = u * float(cum[-1])
    idx = int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype), right=True)[0])
    idx = min(idx, mass.numel() - 1)
    while mass[idx] <= 0:  # zero-mass tokens share the running value of a positive one before them
        idx -= 1
    return idx


def speculative_verify_ref(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    accept_u: Optional[torch.Tensor] = None,
    resample_u: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sequential float64 chain speculative sampling with explicit uniforms.

    Draft token ``j`` of row ``b`` is accepted iff ``accept_u[b, j] * q < p`` (probability
    ``min(1, p/q)``); at the first rejection (or after ``n`` acceptances, the bonus position) one
    token is drawn by inverse CDF with ``resample_u[b]`` from ``max(0, p - q)`` (from ``p`` if that
    is empty, and for the bonus token). Uniforms default to ``torch.rand`` with ``generator``.

    Returns ``(tokens [B, n+1] int64`` padded with -1, ``num_accepted [B] int64)``, on the CPU.
    """
    dt = draft_tokens.detach().cpu().long()
    q = draft_probs.detach().to(device="cpu", dtype=torch.float64)
    p = target_probs.detach().to(device="cpu", dtype=torch.float64)
    B, n = dt.shape
    if accept_u is None:
        accept_u = torch.rand(B, n, dtype=torch.float64, generator=generator)
    if resample_u is None:
        resample_u = torch.rand(B, dtype=torch.float64, generator=generator)
    tokens = torch.full((B, n + 1), -1, dtype=torch.int64)
    num_acc = torch.zeros(B, dtype=torch.int64)
    for b in range(B):
        j = 0
        while j < n:
            t = int(dt[b, j])
            if not float(accept_u[b, j]) * float(q[b, j, t]) < float(p[b, j, t]):
                break
            tokens[b, j] = t
            j += 1
        if j < n:
            resid = (p[b, j] - q[b, j]).clamp(min=0.0)
            if not float(resid.sum()) > 0.0:
                resid = p[b, j]
        else:
            resid = p[b, n]
        tokens[b, j] = _inverse_cdf(resid, float(resample_u[b]))
        num_acc[b] = j
    return tokens, num_acc


def speculative_position_laws(draft_probs: torch.Tensor, target_probs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact laws of chain speculative sampling for one row whose draft tokens are drawn from the
    normalised draft distributions.

    Args:
        draft_probs ``[n, V]``, target_probs ``[n+1, V]`` (non-negative; compared as given).

    Returns:
        ``(laws [n+1, V], reach [n+1])`` float64: ``laws[j]`` is the law of the token emitted at
        position ``j`` given that position ``j`` is reached (all drafts before it accepted);
        ``reach[j]`` the probability of reaching it (``P(num_accepted >= j)``). When both inputs
        are normalised, ``laws[j]`` is ``target_probs[j]`` (the point of speculative sampling).
    """
    q = draft_probs.detach().to(device="cpu", dtype=torch.float64)
    p = target_probs.detach().to(device="cpu", dtype=torch.float64)
    n, V = q.shape
    laws = torch.zeros(n + 1, V, dtype=torch.float64)
    reach = torch.ones(n + 1, dtype=torch.float64)
    for j in range(n):
        qn = q[j] / q[j].sum()
        ratio = torch.where(q[j] > 0, (p[j] / q[j]).clamp(max=1.0), (p[j] > 0).double())
        acc = qn * ratio  # P(draft t and accepted)
        alpha = float(acc.sum())
        resid = (p[j] - q[j]).clamp(min=0.0)
        if not float(resid.sum()) > 0.0:
            resid = p[j]
        laws[j] = acc + (1.0 - alpha) * resid / resid.sum()
        reach[j + 1] = reach[j] * alpha
    laws[n] = p[n] / p[n].sum()
    return laws, reach
