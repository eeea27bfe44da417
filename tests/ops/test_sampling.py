"""Tests for the sampling ops: ttscale.ops.sample, sample_from_probs, token_logprobs, speculative_verify.

Sampling is tested by distribution: many draws from one row (through ``indices``) are compared with
the exact renormalised distribution from the float64 reference (``ttscale.reference.filtered_probs``)
by a grouped Pearson chi-square test plus a per-token binomial z-test, both at a ~6-sigma threshold
(seeds are fixed, and the thresholds are loose enough that any seed passes for a correct kernel), and
tokens outside the reference support are never drawn (tokens that sit within a float32 rounding of a
top-p / min-p cut are "ambiguous" and may go either way). On top of that: greedy, seeds, logprobs,
filter clamping, speculative verification by distribution, every bad input, opcheck and
torch.compile.

The unmarked tests are a representative subset sized for the CI budget (2 CPU cores); the full
grid of V x dtype x logit scale x filter is marked ``slow``.
"""
import math
import zlib

import numpy as np
import pytest
import torch

import ttscale
from ttscale.ops import sample, sample_from_probs, speculative_verify, token_logprobs
from ttscale.reference import (
    filtered_probs,
    filtered_probs_with_ambiguity,
    sample_ref,
    speculative_position_laws,
    speculative_verify_ref,
    token_logprobs_ref,
)

from conftest import CUDA, DEVICES, DTYPES, TOL

NEG_INF = float("-inf")
VOCABS = [1, 7, 111, 32000, 128256]


# --------------------------------------------------------------------------------------------- helpers
def _stable_seed(*parts):
    """A seed from the test parameters that is the same in every process (unlike hash())."""
    return zlib.crc32(repr(parts).encode()) % (2**31)


def make_logits(B, V, dtype=torch.float32, std=1.0, masked=False, seed=0, device="cpu"):
    """Random logits ``N(0, std)``; with ``masked`` about 10% of each row is ``-inf`` (never all)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, generator=g, dtype=torch.float64) * std
    if masked and V > 1:
        m = torch.rand(B, V, generator=g) < 0.1
        m[torch.arange(B), torch.randint(0, V, (B,), generator=g)] = False
        x[m] = NEG_INF
    return x.to(dtype).to(device)


def make_probs(B, V, dtype=torch.float32, std=1.0, zeros=True, seed=0):
    """Unnormalised non-negative probabilities (softmax * 3.7) with some exact zeros."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(B, V, generator=g, dtype=torch.float64) * std, dim=-1) * 3.7
    if zeros and V > 1:
        z = torch.rand(B, V, generator=g) < 0.1
        z[torch.arange(B), p.argmax(dim=1)] = False
        p[z] = 0.0
    return p.to(dtype)


def draw_counts(fn, x, n_per_row, seed, **kw):
    """``n_per_row`` draws from every row of ``x`` in one call; returns counts ``[B, V]`` (float64)."""
    B, V = x.shape
    idx = torch.arange(B).repeat_interleave(n_per_row)
    tok = fn(x, indices=idx, seed=seed, **kw)
    assert tok.dtype == torch.int64 and tok.shape == (B * n_per_row,)
    assert int(tok.min()) >= 0 and int(tok.max()) < V, "token outside [0, V)"
    return torch.bincount(idx * V + tok.cpu(), minlength=B * V).view(B, V).double()


def _chi2_threshold(df, z=6.0):
    """Wilson-Hilferty upper quantile of chi-square(df) at the normal quantile z (~1e-9 for z=6)."""
    df = max(int(df), 1)
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def _groups_by_probability(e, min_expected):
    """Group ids for tokens (sorted by ascending expectation ``e``) so that every group expects at
    least ``min_expected`` draws."""
    cur, acc = 0, 0.0
    # vectorised first cut, then a short Python pass over the group totals to merge small ones
    cum = torch.cumsum(e, 0) - e
    raw = torch.div(cum, min_expected, rounding_mode="floor").long()
    _, raw = torch.unique_consecutive(raw, return_inverse=True)
    tot = torch.zeros(int(raw.max()) + 1, dtype=torch.float64).index_add_(0, raw, e).tolist()
    relabel = []
    for t in tot:
        relabel.append(cur)
        acc += t
        if acc >= min_expected:
            cur, acc = cur + 1, 0.0
    relabel = torch.tensor(relabel)
    if acc > 0 and cur > 0:  # the last group came up short: merge it into the previous one
        relabel[relabel == cur] = cur - 1
    return relabel[raw]


def check_law(counts, probs, amb, label="", min_expected=20.0, z=6.0):
    """Draw counts ``[V]`` against the exact law ``probs [V]`` (float64, sums to 1).

    * no draw outside the support of ``probs`` except on ambiguous tokens;
    * conditional on the non-ambiguous tokens (a law that does not depend on how the kernel decided
      the ambiguous ones), a per-token binomial z-test on tokens expecting >= 50 draws and a Pearson
      chi-square over groups of tokens (sorted by probability) expecting >= ``min_expected`` each.
    """
    counts, probs, amb = counts.double().cpu(), probs.double().cpu(), amb.cpu()
    outside = (probs <= 0) & ~amb & (counts > 0)
    if bool(outside.any()):
        bad = torch.nonzero(outside).flatten()[:10].tolist()
        raise AssertionError(f"{label}: drew filtered-out tokens {bad} (counts {counts[bad].tolist()})")
    ok = (probs > 0) & ~amb
    c, p = counts[ok], probs[ok]
    n = float(c.sum())
    if p.numel() <= 1 or n == 0:
        return
    p = p / p.sum()
    e = n * p
    big = e >= 50
    if bool(big.any()):
        zs = (c[big] - e[big]) / torch.sqrt(e[big] * (1 - p[big])).clamp(min=1e-12)
        worst = float(zs.abs().max())
        assert worst < z, f"{label}: token frequency {worst:.1f} sigma off its probability"
    order = torch.argsort(e)
    gid = _groups_by_probability(e[order], min_expected)
    ng = int(gid.max()) + 1
    if ng < 2:
        return
    E = torch.zeros(ng, dtype=torch.float64).index_add_(0, gid, e[order])
    O = torch.zeros(ng, dtype=torch.float64).index_add_(0, gid, c[order])
    chi2 = float(((O - E) ** 2 / E).sum())
    thr = _chi2_threshold(ng - 1, z)
    assert chi2 < thr, f"{label}: chi-square {chi2:.1f} over {ng} groups exceeds {thr:.1f} ({n:.0f} draws)"


def check_rows(counts, x, probs_mode=False, label="", **kw):
    probs, amb = filtered_probs_with_ambiguity(x, probs_mode=probs_mode, **kw)
    for r in range(x.shape[0]):
        check_law(counts[r], probs[r], amb[r], f"{label} row {r}")
    return probs, amb


FILTERS = {
    "plain": {},
    "temp0.6": dict(temperature=0.6),
    "temp1.7": dict(temperature=1.7),
    "topk1": dict(top_k=1),
    "topk5": dict(top_k=5),
    "topk50": dict(top_k=50),
    "topp0": dict(top_p=0.0),
    "topp0.5": dict(top_p=0.5),
    "topp0.9": dict(top_p=0.9),
    "minp0.05": dict(min_p=0.05),
    "minp0.3": dict(min_p=0.3),
    "k+p": dict(top_k=40, top_p=0.8),
    "p+minp": dict(top_p=0.9, min_p=0.1),
    "k+minp": dict(top_k=100, min_p=0.02),
    "t+p": dict(temperature=0.7, top_p=0.95),
    "minp1": dict(min_p=1.0),
    "topp0.999": dict(top_p=0.999),
    "all": dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05),
    "all_hot": dict(temperature=1.5, top_k=1000, top_p=0.95, min_p=0.01),
}
PROB_FILTERS = {k: v for k, v in FILTERS.items() if "temperature" not in v}


def _fast_cases():
    """A representative subset: every filter, every V, every dtype and logit scale, with masks."""
    cases = []
    small = [7, 111, 32000]
    for i, name in enumerate(FILTERS):
        V = small[i % 3]
        dtype = DTYPES[(i // 3) % 3]
        std = (1.0, 5.0)[i % 2]
        cases.append((name, V, dtype, std, i % 4 == 3))
    for i, name in enumerate(["plain", "topp0.9", "all", "minp0.05", "k+p", "t+p"]):
        cases.append((name, 128256, DTYPES[i % 3], (1.0, 5.0)[i % 2], i % 2 == 0))
    for name in ["plain", "all", "topp0.5"]:
        cases.append((name, 1, torch.float32, 1.0, False))
    return cases


def _slow_cases():
    fast = set((n, V, d, s, m) for n, V, d, s, m in _fast_cases())
    return [
        (name, V, dtype, std, masked)
        for name in FILTERS
        for V in VOCABS
        for dtype in DTYPES
        for std in (1.0, 5.0)
        for masked in ((False, True) if V > 1 else (False,))
        if (name, V, dtype, std, masked) not in fast
    ]


def _case_id(c):
    name, V, dtype, std, masked = c
    return f"{name}-V{V}-{str(dtype).replace('torch.', '')}-std{std:g}{'-masked' if masked else ''}"


def _run_filter_case(name, V, dtype, std, masked, n=200_000):
    kw = FILTERS[name]
    seed = _stable_seed(name, V, str(dtype), std, masked)
    x = make_logits(1, V, dtype, std, masked, seed=seed)
    counts = draw_counts(sample, x, n, seed=seed + 1, **kw)
    check_rows(counts, x, label=_case_id((name, V, dtype, std, masked)), **kw)


# ------------------------------------------------------------------------------- distribution tests
@pytest.mark.parametrize("case", _fast_cases(), ids=_case_id)
def test_filter_distribution(case, cpu_isa):
    _run_filter_case(*case)


@pytest.mark.slow
@pytest.mark.parametrize("case", _slow_cases(), ids=_case_id)
def test_filter_distribution_full(case, cpu_isa):
    _run_filter_case(*case)


def _row_params(B, seed, with_disabled=True):
    """Per-row filter tensors with a mix of values, including each filter's 'off' value."""
    g = torch.Generator().manual_seed(seed)
    T = torch.rand(B, generator=g, dtype=torch.float64) * 1.5 + 0.3
    k = torch.randint(1, 200, (B,), generator=g)
    p = torch.rand(B, generator=g, dtype=torch.float64) * 0.9 + 0.05
    m = torch.rand(B, generator=g, dtype=torch.float64) * 0.2
    if with_disabled and B >= 3:
        k[0], p[1], m[2] = 0, 1.0, 0.0
        k[1 % B] = -5 if B > 3 else k[1 % B]
        if B > 5:
            k[5] = 10**9  # clamps to V
            T[4] = 0.0  # a greedy row among sampled ones
    return dict(temperature=T.float(), top_k=k, top_p=p.float(), min_p=m.float())


@pytest.mark.parametrize(
    "B,V,dtype",
    [(3, 111, torch.float32), (3, 32000, torch.bfloat16), (97, 7, torch.float16), (97, 32000, torch.float32)]
    + [pytest.param(B, V, d, marks=pytest.mark.slow) for B in (3, 97) for V in (111, 128256) for d in DTYPES],
    ids=lambda v: str(v).replace("torch.", "") if isinstance(v, torch.dtype) else None,
)
@pytest.mark.parametrize("which", ["all", "temperature", "top_k", "top_p", "min_p"])
def test_per_row_tensors_distribution(B, V, dtype, which, cpu_isa):
    seed = _stable_seed(B, V, str(dtype), which)
    x = make_logits(B, V, dtype, std=2.0, masked=True, seed=seed)
    params = _row_params(B, seed)
    kw = params if which == "all" else {which: params[which]}
    n = max(200_000 // B, 4000)
    counts = draw_counts(sample, x, n, seed=seed, **kw)
    probs, _ = check_rows(counts, x, label=f"per-row {which}", **kw)
    if which in ("all", "temperature") and B > 5:
        assert counts[4, probs[4].argmax()] == n  # the greedy row


@pytest.mark.parametrize("name", ["plain", "topk5", "topp0.9", "all"])
def test_scalar_equals_full_tensor(name):
    """A scalar filter and a [B] tensor holding the same value draw the same tokens."""
    kw = FILTERS[name]
    B, V = 5, 1000
    x = make_logits(B, V, std=2.0, masked=True, seed=3)
    tkw = {}
    for k, v in kw.items():
        tkw[k] = torch.full((B,), v, dtype=torch.int64 if k == "top_k" else torch.float32)
    idx = torch.arange(B).repeat(2000)
    a = sample(x, indices=idx, seed=11, **kw)
    b = sample(x, indices=idx, seed=11, **tkw)
    assert torch.equal(a, b)
    if "top_k" in tkw:  # any integer dtype for top_k, any float dtype for the others
        tkw = {k: v.int() if k == "top_k" else v.double() for k, v in tkw.items()}
        assert torch.equal(sample(x, indices=idx, seed=11, **tkw), a)


@pytest.mark.parametrize("V", [2, 111, 32000])
def test_top_k_near_vocab_size(V, cpu_isa):
    """top_k = V - 1 (the largest k that still filters) and V - 2 on the top-k path."""
    x = make_logits(1, V, torch.float32, std=1.0, seed=V)
    for k in {max(V - 1, 1), max(V - 2, 1)}:
        counts = draw_counts(sample, x, 100_000, seed=k, top_k=k)
        check_rows(counts, x, label=f"top_k={k}", top_k=k)
        assert counts[0, x[0].argmin()] == 0 or k >= V


def _probs_cases():
    cases = []
    for i, name in enumerate(PROB_FILTERS):
        cases.append((name, (7, 111, 32000)[i % 3], DTYPES[i % 3], (1.0, 5.0)[(i // 3) % 2], False))
    cases.append(("plain", 128256, torch.float32, 1.0, False))
    cases.append(("all", 128256, torch.bfloat16, 5.0, False))
    cases.append(("topp0.9", 128256, torch.float16, 1.0, False))
    return cases


@pytest.mark.parametrize("case", _probs_cases(), ids=_case_id)
def test_probs_distribution(case, cpu_isa):
    name, V, dtype, std, _ = case
    kw = {k: v for k, v in FILTERS[name].items() if k != "temperature"}
    seed = _stable_seed("probs", name, V, str(dtype), std)
    x = make_probs(1, V, dtype, std, seed=seed)
    counts = draw_counts(sample_from_probs, x, 200_000, seed=seed, **kw)
    check_rows(counts, x, probs_mode=True, label=f"probs {name}", **kw)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PROB_FILTERS))
@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_probs_distribution_full(name, V, dtype, cpu_isa):
    kw = PROB_FILTERS[name]
    seed = _stable_seed("probs-full", name, V, str(dtype))
    x = make_probs(3, V, dtype, std=3.0, seed=seed)
    counts = draw_counts(sample_from_probs, x, 100_000, seed=seed, **kw)
    check_rows(counts, x, probs_mode=True, label=f"probs {name}", **kw)


def test_probs_per_row_tensors(cpu_isa):
    B, V = 6, 500
    x = make_probs(B, V, torch.float32, std=2.0, seed=5)
    params = _row_params(B, 5)
    params.pop("temperature")
    counts = draw_counts(sample_from_probs, x, 40_000, seed=9, **params)
    check_rows(counts, x, probs_mode=True, label="probs per-row", **params)


def test_probs_equal_softmax_of_logits():
    """sample_from_probs(softmax(l)) and sample(l) have the same law (checked against one reference)."""
    x = make_logits(1, 300, std=2.0, seed=8)
    p = torch.softmax(x.double(), -1).float()
    kw = dict(top_k=60, top_p=0.85, min_p=0.02)
    counts = draw_counts(sample_from_probs, p, 200_000, seed=3, **kw)
    probs, amb = filtered_probs_with_ambiguity(x, **kw)
    check_law(counts[0], probs[0], amb[0], "probs vs logits")


def test_masked_tokens_never_drawn(cpu_isa):
    """-inf logits and zero probabilities are never drawn, even when nearly the whole row is masked."""
    V = 5000
    x = make_logits(2, V, std=3.0, seed=21)
    x[:, 7:] = NEG_INF
    x[1, :] = NEG_INF
    x[1, V - 1] = 0.0
    idx = torch.tensor([0, 1]).repeat(20_000)
    for kw in [{}, dict(top_k=100), dict(top_p=0.99), dict(min_p=1e-9), dict(temperature=50.0)]:
        tok = sample(x, indices=idx, seed=4, **kw)
        assert int(tok[0::2].max()) < 7, kw
        assert bool((tok[1::2] == V - 1).all()), kw
    p = torch.zeros(2, V)
    p[0, 100:103] = torch.tensor([1e-30, 2.0, 1e-3])
    p[1, V - 1] = 1e-38
    for kw in [{}, dict(top_k=4000), dict(top_p=0.999999), dict(min_p=1e-12)]:
        tok = sample_from_probs(p, indices=idx, seed=5, **kw)
        assert bool(((tok[0::2] >= 100) & (tok[0::2] < 103)).all()), kw
        assert bool((tok[1::2] == V - 1).all()), kw


def test_top_k_ties_lower_ids_first(cpu_isa):
    """Among tokens tied at the k-th value, lower ids are kept first (exact top-k support)."""
    V = 300
    x = torch.zeros(1, V)
    x[0, 50:] = -1.0
    x[0, [10, 200, 250]] = 1.0  # 3 tokens above, then 47 tied at 0 (ids 0..49 minus 10), then ties at -1
    for k in [3, 4, 20, 60, 299]:
        tok = sample(x, indices=torch.zeros(50_000, dtype=torch.long), top_k=k, seed=k)
        ids = sorted(set(tok.tolist()))
        expected = filtered_probs(x, top_k=k)[0].nonzero().flatten().tolist()
        assert set(ids) <= set(expected), (k, set(ids) - set(expected))
        assert len(ids) == len(expected) or k > 100  # every kept token shows up (50k draws, <= 60 tokens)
    # bf16: real ties appear in random logits
    x = make_logits(1, 32000, torch.bfloat16, std=2.0, seed=2)
    for k in [10, 77, 500]:
        counts = draw_counts(sample, x, 100_000, seed=k, top_k=k)
        check_rows(counts, x, label=f"bf16 ties top_k={k}", top_k=k)


def test_top_p_keeps_ties_at_cut(cpu_isa):
    x = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0, 1.0, -3.0]])
    # probabilities: e^2 dominates (~0.55); the cut at 0.6 lands inside the tie at 1.0: all four kept
    tok = sample(x, indices=torch.zeros(50_000, dtype=torch.long), top_p=0.6, seed=1)
    assert set(tok.tolist()) == {0, 1, 2, 3, 5}
    for k in (None, 6):
        tok = sample(x, indices=torch.zeros(50_000, dtype=torch.long), top_p=0.6, top_k=k, seed=2)
        assert set(tok.tolist()) == {0, 1, 2, 3, 5}


# ------------------------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [1, 7, 111, 32000, 128256])
def test_greedy_equals_argmax(V, dtype, cpu_isa):
    B = 17
    x = make_logits(B, V, dtype, std=3.0, masked=True, seed=V)
    if V > 5:  # ties on the max: the first occurrence wins
        x[3, 2] = x[3, V - 1] = 100.0
        x[4, :] = 1.0
        x[5, V // 2] = x[5, V // 2 + 1] = 50.0
    expected = x.float().argmax(dim=1)
    for kw in [dict(), dict(top_k=5), dict(top_p=0.5), dict(min_p=0.5), dict(top_k=3, top_p=0.1, min_p=0.9)]:
        for seed in (0, 1):
            tok = sample(x, temperature=0.0, seed=seed, **kw)
            assert torch.equal(tok, expected), kw
    tok = sample(x, temperature=torch.zeros(B), seed=3)
    assert torch.equal(tok, expected)


def test_top_k1_and_top_p0_are_greedy():
    x = make_logits(9, 4097, std=2.0, masked=True, seed=4)
    x[0, 1] = x[0, 3] = 30.0  # tie: top_k=1 keeps the lower id
    expected = x.argmax(dim=1)
    idx = torch.arange(9).repeat(300)
    assert torch.equal(sample(x, indices=idx, top_k=1, seed=1), expected[idx])
    # top_p = 0 keeps the top token (plus tokens tied with it: row 0 keeps 1 and 3)
    tok = sample(x, indices=idx, top_p=0.0, seed=2)
    assert torch.equal(tok[idx != 0], expected[idx[idx != 0]])
    assert set(tok[idx == 0].tolist()) == {1, 3}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_greedy_rows(dtype, cpu_isa):
    B, V = 12, 5000
    x = make_logits(B, V, dtype, std=2.0, seed=6)
    T = torch.tensor([0.0, 1.0, 0.0, 0.5, 0.0, 2.0, 1.0, 0.0, 0.0, 0.7, 1.3, 0.0])
    greedy = T == 0
    expected = x.float().argmax(dim=1)
    n = 20_000
    counts = draw_counts(sample, x, n, seed=8, temperature=T, top_k=200, top_p=0.95)
    for r in range(B):
        if greedy[r]:
            assert counts[r, expected[r]] == n
    check_rows(counts, x, label="mixed greedy", temperature=T, top_k=200, top_p=0.95)
    # plain batched call (no indices): greedy rows are exactly the argmax for any seed
    for seed in range(5):
        tok = sample(x, temperature=T, seed=seed)
        assert torch.equal(tok[greedy], expected[greedy])


_TINY_T_FILTERS = [{}, dict(top_k=5), dict(top_p=0.5), dict(min_p=0.5), dict(top_k=5, top_p=0.9, min_p=0.1)]


@pytest.mark.parametrize("T", [1e-6, 1e-30, 1e-40])
@pytest.mark.parametrize("kw", _TINY_T_FILTERS, ids=lambda kw: "-".join(kw) or "plain")
def test_tiny_temperature_tends_to_greedy(T, kw):
    """A tiny positive temperature puts all the mass on the argmax (its limit), on every filter path.

    1/T overflows float32 for T < ~2.9e-39; the kernel must not turn the max's score into NaN."""
    x = make_logits(1, 50, std=3.0, seed=0)
    am = int(x.argmax())
    tok = sample(x, indices=torch.zeros(5000, dtype=torch.long), temperature=T, seed=1, **kw)
    assert bool((tok == am).all()), (tok.unique().tolist(), am)


@pytest.mark.parametrize("T", [1e-6, 1e-30, 1e-40])
def test_tiny_temperature_logprobs(T):
    """log_softmax(x / T) at the argmax tends to 0 as T -> 0 (the float64 reference gives 0)."""
    x = make_logits(2, 50, std=3.0, seed=0)
    tok, lp = sample(x, temperature=T, seed=1, return_logprobs=True)
    torch.testing.assert_close(lp.double(), token_logprobs_ref(x, tok, T), atol=1e-4, rtol=0)
    torch.testing.assert_close(token_logprobs(x, tok, temperature=T).double(), token_logprobs_ref(x, tok, T),
                               atol=1e-4, rtol=0)


# -------------------------------------------------------------------------------------------- seeds
def test_same_seed_same_tokens_and_offsets_differ():
    x = make_logits(64, 32000, std=1.0, seed=7)
    kw = dict(temperature=0.9, top_p=0.95)
    a = sample(x, seed=123, offset=5, **kw)
    b = sample(x, seed=123, offset=5, **kw)
    c = sample(x, seed=123, offset=6, **kw)
    d = sample(x, seed=124, offset=5, **kw)
    assert torch.equal(a, b)
    assert (a != c).sum() > 32 and (a != d).sum() > 32
    # ints and int64 tensors (1 entry, or 0-dim) are the same seed
    e = sample(x, seed=torch.tensor([123]), offset=torch.tensor(5), **kw)
    assert torch.equal(a, e)
    # the 64 bits of the seed: 2**64 - 1 and -1 are the same seed
    assert torch.equal(sample(x, seed=2**64 - 1, **kw), sample(x, seed=-1, **kw))


def test_per_sample_seeds_do_not_depend_on_batch_position():
    B, V = 10, 3000
    x = make_logits(B, V, std=1.5, seed=1)
    seeds = torch.randint(-(2**62), 2**62, (B,))
    offs = torch.randint(0, 1000, (B,))
    kw = dict(temperature=1.1, top_k=500, min_p=0.01)
    tok = sample(x, seed=seeds, offset=offs, **kw)
    # the same request alone in a batch of one
    for i in range(B):
        alone = sample(x[i : i + 1], seed=int(seeds[i]), offset=int(offs[i]), **kw)
        assert int(alone) == int(tok[i]), i
    # a permuted batch gives the permuted tokens
    perm = torch.randperm(B)
    tok_p = sample(x[perm], seed=seeds[perm], offset=offs[perm], **kw)
    assert torch.equal(tok_p, tok[perm])
    # through indices: sample i keeps its token wherever it sits
    idx = torch.tensor([3, 3, 7, 0])
    s = torch.tensor([11, 12, 13, 14])
    t1 = sample(x, indices=idx, seed=s, **kw)
    t2 = sample(x, indices=idx.flip(0), seed=s.flip(0), **kw)
    assert torch.equal(t1, t2.flip(0))
    # per-sample seeds, one shared offset, and a shared seed with per-sample offsets, are accepted
    assert sample(x, seed=seeds, offset=3, **kw).shape == (B,)
    assert sample(x, seed=3, offset=offs, **kw).shape == (B,)


def test_manual_seed_and_generator():
    x = make_logits(32, 32000, std=1.0, seed=2)
    torch.manual_seed(42)
    a = sample(x, top_p=0.9)
    a2 = sample(x, top_p=0.9)
    torch.manual_seed(42)
    b = sample(x, top_p=0.9)
    assert torch.equal(a, b)
    assert (a != a2).sum() > 16  # the default generator advanced
    g = torch.Generator().manual_seed(5)
    c1 = sample(x, generator=g)
    c2 = sample(x, generator=g)
    assert (c1 != c2).sum() > 16
    g.manual_seed(5)
    assert torch.equal(sample(x, generator=g), c1)
    # a generator leaves the default one alone
    torch.manual_seed(1)
    state = torch.get_rng_state()
    sample(x, generator=g)
    assert torch.equal(torch.get_rng_state(), state)


def test_deterministic_across_threads():
    x = make_logits(40, 20000, std=2.0, masked=True, seed=3)
    kw = dict(temperature=0.8, top_p=0.9, min_p=0.02)
    idx = torch.arange(40).repeat(50)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = sample(x, indices=idx, seed=9, return_logprobs=True, **kw)
        torch.set_num_threads(max(prev, 2))
        b = sample(x, indices=idx, seed=9, return_logprobs=True, **kw)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------------------- logprobs
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [1, 111, 32000, 128256])
def test_return_logprobs(V, dtype, cpu_isa):
    B = 7
    x = make_logits(B, V, dtype, std=4.0, masked=True, seed=V + 1)
    T = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0, 0.9, 1.0])
    for kw in [dict(), dict(temperature=T, top_k=50, top_p=0.9, min_p=0.05), dict(temperature=0.7)]:
        tok, lp = sample(x, seed=3, return_logprobs=True, **kw)
        assert lp.dtype == torch.float32 and lp.shape == (B,)
        # logprobs are under the temperature-scaled *unfiltered* distribution (greedy rows: T = 1)
        ref = token_logprobs_ref(x, tok, kw.get("temperature"))
        torch.testing.assert_close(lp.double(), ref, **TOL[dtype])
    # with indices
    idx = torch.tensor([2, 0, 0, 6, 2])
    tok, lp = sample(x, indices=idx, temperature=T, seed=4, return_logprobs=True)
    ref = token_logprobs_ref(x[idx], tok, T[idx])
    torch.testing.assert_close(lp.double(), ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_return_logprobs_probs_mode(dtype):
    x = make_probs(5, 2000, dtype, std=3.0, seed=2)
    tok, lp = sample_from_probs(x, top_k=30, seed=1, return_logprobs=True)
    xd = x.double()
    ref = torch.log(xd / xd.sum(-1, keepdim=True)).gather(1, tok[:, None]).squeeze(1)
    torch.testing.assert_close(lp.double(), ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [1, 7, 4097, 128256])
def test_token_logprobs(V, dtype, cpu_isa):
    B = 9
    x = make_logits(B, V, dtype, std=3.0, masked=True, seed=V)
    finite = torch.isfinite(x.float())
    tok = torch.stack([torch.nonzero(finite[r]).flatten()[r % int(finite[r].sum())] for r in range(B)])
    T = torch.tensor([1.0, 0.3, 2.0, 0.0, 1.0, 5.0, 0.9, 1.0, 0.01])
    for temperature in (None, 0.7, 0.0, T, T.double()):
        out = token_logprobs(x, tok, temperature=temperature)
        assert out.dtype == torch.float32 and out.shape == (B,)
        ref = token_logprobs_ref(x, tok, temperature)
        torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    out = token_logprobs(x, tok.int())
    torch.testing.assert_close(out.double(), token_logprobs_ref(x, tok), **TOL[dtype])
    if V > 1 and not bool(finite.all()):  # a masked token has log-probability -inf
        r, j = map(int, torch.nonzero(~finite)[0])
        t2 = tok.clone()
        t2[r] = j
        assert token_logprobs(x, t2)[r] == NEG_INF


# ------------------------------------------------------------------------------ clamps and disables
def test_filter_disable_and_clamp_values():
    x = make_logits(6, 5000, std=2.0, masked=True, seed=12)
    idx = torch.arange(6).repeat(500)
    base = sample(x, indices=idx, seed=7)
    for kw in [dict(top_k=0), dict(top_k=-3), dict(top_k=5000), dict(top_k=5001), dict(top_k=10**12),
               dict(top_p=1.0), dict(min_p=0.0), dict(top_k=torch.tensor([0, -1, 5000, 9999, 0, 2**40])),
               dict(top_p=torch.ones(6)), dict(min_p=torch.zeros(6)), dict(temperature=1.0)]:
        assert torch.equal(sample(x, indices=idx, seed=7, **kw), base), kw
    # top_k clamps to V with other filters too
    a = sample(x, indices=idx, seed=7, top_k=10**6, top_p=0.8, min_p=0.01)
    b = sample(x, indices=idx, seed=7, top_p=0.8, min_p=0.01)
    assert torch.equal(a, b)


def test_vocab_of_one_and_empty_batches():
    x = torch.randn(4, 1)
    for kw in [dict(), dict(temperature=0.0), dict(top_k=3, top_p=0.2, min_p=0.9)]:
        assert torch.equal(sample(x, seed=1, **kw), torch.zeros(4, dtype=torch.int64))
    assert sample(torch.randn(0, 10), seed=1).shape == (0,)
    t, lp = sample(torch.randn(3, 10), indices=torch.zeros(0, dtype=torch.long), seed=1, return_logprobs=True)
    assert t.shape == (0,) and lp.shape == (0,)


def test_int32_indices():
    x = make_logits(4, 700, seed=1)
    a = sample(x, indices=torch.tensor([3, 1, 1, 0], dtype=torch.int32), seed=2, top_k=20)
    b = sample(x, indices=torch.tensor([3, 1, 1, 0]), seed=2, top_k=20)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_rows(dtype, cpu_isa):
    B, V = 6, 3001
    big = make_logits(2 * B, V + 17, dtype, std=2.0, masked=True, seed=4)
    x = big[::2, 5 : 5 + V]  # strided rows, last dim contiguous
    assert not x.is_contiguous() and x.stride(1) == 1
    xc = x.contiguous()
    idx = torch.arange(B).repeat(100)
    for kw in [dict(), dict(temperature=0.7, top_k=40), dict(top_p=0.9, min_p=0.05), dict(temperature=0.0)]:
        a = sample(x, indices=idx, seed=5, return_logprobs=True, **kw)
        b = sample(xc, indices=idx, seed=5, return_logprobs=True, **kw)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), kw
    tok = torch.randint(0, V, (B,))
    torch.testing.assert_close(token_logprobs(x, tok), token_logprobs(xc, tok), atol=0, rtol=0)
    p = torch.softmax(big.float(), -1).to(dtype)[::2, 5 : 5 + V]
    assert torch.equal(sample_from_probs(p, seed=3, top_p=0.8), sample_from_probs(p.contiguous(), seed=3, top_p=0.8))


def test_sample_ref_baseline_matches_reference():
    """The plain-torch baseline (bench) draws from the same law as the reference."""
    x = make_logits(1, 200, std=2.0, seed=31)
    kw = dict(temperature=0.8, top_k=60, top_p=0.9, min_p=0.02)
    g = torch.Generator().manual_seed(0)
    tok = sample_ref(x.expand(100_000, 200), generator=g, **kw)
    counts = torch.bincount(tok, minlength=200).double()[None]
    check_rows(counts, x, label="sample_ref", **kw)
    assert torch.equal(sample_ref(x, temperature=0.0), x.argmax(1))


# ------------------------------------------------------------------------- Philox stream (exact draws)
_M0, _M1, _W0, _W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
_MASK = 0xFFFFFFFF


def philox_uniform(seed, offset, subseq, j):
    """Python Philox4x32-10 with ttscale's stream layout (csrc/common/philox.h): draw j of
    subsequence ``subseq`` under ``(seed, offset)`` as a 53-bit uniform double."""
    seed &= (1 << 64) - 1
    c = (offset + (j >> 1)) & ((1 << 64) - 1)
    v = [c & _MASK, c >> 32, subseq & _MASK, (subseq >> 32) & _MASK]
    k0, k1 = seed & _MASK, seed >> 32
    for _ in range(10):
        p0, p1 = _M0 * v[0], _M1 * v[2]
        v = [(p1 >> 32) ^ v[1] ^ k0, p1 & _MASK, (p0 >> 32) ^ v[3] ^ k1, p0 & _MASK]
        k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
    a, b = (v[2], v[3]) if j & 1 else (v[0], v[1])
    return ((a >> 5) * 67108864 + (b >> 6)) / 9007199254740992.0


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(temperature=0.6), dict(top_p=0.9), dict(min_p=0.05), dict(temperature=0.6, top_p=0.9, min_p=0.05),
     dict(top_k=20), dict(top_k=60), dict(temperature=0.6, top_k=20, top_p=0.9, min_p=0.05)],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()) or "plain",
)
def test_draws_follow_philox_inverse_cdf(kw):
    """Token i is the inverse CDF of the filtered law at the Philox uniform (seed, offset,
    subsequence i, draw 0), the rule stated in csrc/ops/sampling/sampling.h, with the stream layout
    of csrc/common/philox.h. The running mass is taken in token order, except with top-k active,
    where it is taken over the kept candidates best first (value descending, ties by lower id).
    This is what lets CPU and CUDA draw the same tokens for the same (seed, offset), so every filter
    path must follow it. Draws within 1e-6 of a CDF boundary are skipped."""
    B, V = 3, 61
    x = make_logits(B, V, std=2.0, masked=True, seed=17)
    idx = torch.arange(B).repeat(100)
    probs = filtered_probs(x, **kw)
    if kw.get("top_k"):
        order = torch.sort(-x.double(), dim=1, stable=True).indices  # best first, ties: lower id
    else:
        order = torch.arange(V).expand(B, V)
    cdf = torch.cumsum(probs.gather(1, order), 1)
    for seed, offset in [(5, 0), (2**40 + 3, 77)]:
        tok = sample(x, indices=idx, seed=seed, offset=offset, **kw)
        checked, wrong = 0, []
        for i in range(idx.numel()):
            u = philox_uniform(seed, offset, i, 0)
            c = cdf[idx[i]]
            if bool(((c - u).abs() < 1e-6).any()):
                continue
            pos = int(torch.searchsorted(c, torch.tensor([u], dtype=torch.float64), right=True)[0])
            expected = int(order[idx[i], pos])
            checked += 1
            if int(tok[i]) != expected:
                wrong.append((i, int(tok[i]), expected))
        assert checked > 250
        assert not wrong, f"{len(wrong)}/{checked} draws are not the inverse CDF (i, got, expected): {wrong[:5]}"


# -------------------------------------------------------------------------------- speculative verify
def _spec_dists(n, V, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(n, V, generator=g, dtype=torch.float64) ** 3
    p = torch.rand(n + 1, V, generator=g, dtype=torch.float64) ** 3
    q[torch.rand(n, V, generator=g) < 0.2] = 0.0
    p[torch.rand(n + 1, V, generator=g) < 0.2] = 0.0
    q[:, 0] += 0.01
    p[:, 1] += 0.01
    q, p = q / q.sum(-1, keepdim=True), p / p.sum(-1, keepdim=True)
    return q.to(dtype), p.to(dtype)


def _spec_check(q, p, draft_tokens, out, acc, label):
    B, n = draft_tokens.shape
    V = q.shape[-1]
    # structure: accepted prefix equals the drafts, one emitted token, then -1 padding
    assert out.shape == (B, n + 1) and acc.shape == (B,)
    assert out.dtype == torch.int64 and acc.dtype == torch.int64
    assert bool(((acc >= 0) & (acc <= n)).all())
    pos = torch.arange(n + 1)[None, :]
    emitted = pos <= acc[:, None]
    assert bool((out[~emitted] == -1).all()), f"{label}: padding after the first rejection must be -1"
    assert bool(((out[emitted] >= 0) & (out[emitted] < V)).all())
    dpad = torch.cat([draft_tokens, torch.full((B, 1), -1)], 1)
    assert bool((out[pos < acc[:, None]] == dpad[pos < acc[:, None]]).all()), f"{label}: accepted != drafts"
    laws, reach = speculative_position_laws(q, p)
    for j in range(n + 1):
        rows = acc >= j
        k = int(rows.sum())
        # P(reach j) binomial check
        pr = float(reach[j])
        if 0 < pr < 1:
            zs = abs(k - B * pr) / math.sqrt(B * pr * (1 - pr))
            assert zs < 6, f"{label}: P(num_accepted >= {j}) {k / B:.4f} vs {pr:.4f}"
        if k == 0:
            continue
        counts = torch.bincount(out[rows, j], minlength=V).double()
        check_law(counts, laws[j], torch.zeros(V, dtype=torch.bool), f"{label} position {j}")
        # with normalised inputs the law is the target's (up to the rounding of the stored inputs)
        torch.testing.assert_close(laws[j], (p[j].double() / p[j].double().sum()), atol=2e-2 / V, rtol=0)
    # the first emitted token is always target-distributed
    first = torch.bincount(out[:, 0], minlength=V).double()
    check_law(first, p[0].double() / p[0].double().sum(), torch.zeros(V, dtype=torch.bool), f"{label} first")


@pytest.mark.parametrize("V,n", [(5, 1), (5, 3), (17, 2), (17, 4)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_speculative_verify_distribution(V, n, dtype):
    B = 50_000
    q, p = _spec_dists(n, V, seed=V * 10 + n, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    draft = torch.stack([torch.multinomial(q[j].double(), B, replacement=True, generator=g) for j in range(n)], 1)
    out, acc = speculative_verify(draft, q[None].expand(B, n, V), p[None].expand(B, n + 1, V), seed=123)
    _spec_check(q, p, draft, out, acc, f"spec V={V} n={n}")


def test_speculative_all_accepted_bonus():
    V, n, B = 17, 3, 40_000
    q, p = _spec_dists(n, V, seed=3)
    p[:n] = q  # draft == target: every draft is accepted, the bonus comes from target_probs[:, n]
    g = torch.Generator().manual_seed(2)
    draft = torch.stack([torch.multinomial(q[j].double(), B, replacement=True, generator=g) for j in range(n)], 1)
    out, acc = speculative_verify(draft, q[None].expand(B, n, V), p[None].expand(B, n + 1, V), seed=5)
    assert bool((acc == n).all())
    assert torch.equal(out[:, :n], draft)
    counts = torch.bincount(out[:, n], minlength=V).double()
    check_law(counts, p[n].double() / p[n].double().sum(), torch.zeros(V, dtype=torch.bool), "bonus")


def test_speculative_no_drafts_and_empty_batch():
    """n = 0: the call just samples the bonus token from target_probs[:, 0]."""
    V, B = 7, 30_000
    _, p = _spec_dists(0, V, seed=4)
    out, acc = speculative_verify(torch.zeros(B, 0, dtype=torch.long), torch.zeros(B, 0, V),
                                  p[None].expand(B, 1, V), seed=1)
    assert out.shape == (B, 1) and bool((acc == 0).all())
    check_law(torch.bincount(out[:, 0], minlength=V).double(), p[0].double() / p[0].double().sum(),
              torch.zeros(V, dtype=torch.bool), "n=0")
    out, acc = speculative_verify(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2, V), torch.zeros(0, 3, V), seed=1)
    assert out.shape == (0, 3) and acc.shape == (0,)


def test_speculative_edge_probabilities():
    V = 4
    # draft token has q = 0 but p > 0: accepted; p = 0: always rejected and resampled from max(0, p - q)
    q = torch.tensor([[[0.0, 0.5, 0.5, 0.0]]])
    p = torch.tensor([[[0.3, 0.0, 0.2, 0.5], [0.25, 0.25, 0.25, 0.25]]])
    B = 20_000
    out, acc = speculative_verify(torch.zeros(B, 1, dtype=torch.long), q.expand(B, 1, V), p.expand(B, 2, V), seed=1)
    assert bool((acc == 1).all()) and bool((out[:, 0] == 0).all())
    out, acc = speculative_verify(torch.ones(B, 1, dtype=torch.long), q.expand(B, 1, V), p.expand(B, 2, V), seed=2)
    assert bool((acc == 0).all()) and bool((out[:, 1] == -1).all())
    # residual max(0, p - q) = [0.3, 0, 0, 0.5] -> tokens 0 and 3 in ratio 3:5
    c = torch.bincount(out[:, 0], minlength=V).double()
    check_law(c, torch.tensor([0.375, 0.0, 0.0, 0.625], dtype=torch.float64), torch.zeros(V, dtype=torch.bool), "resid")
    # p == q exactly and the draft is rejected can't happen; an empty residual with a rejection
    # (p <= q everywhere, unnormalised) falls back to p
    q2 = torch.tensor([[[0.5, 0.5, 0.5, 0.5]]])
    p2 = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [1.0, 0.0, 0.0, 0.0]]])
    out, acc = speculative_verify(torch.full((B, 1), 3), q2.expand(B, 1, V), p2.expand(B, 2, V), seed=3)
    rej = acc == 0
    assert 0.1 < float(rej.double().mean()) < 0.3  # accepted with prob 0.4 / 0.5
    c = torch.bincount(out[rej, 0], minlength=V).double()
    check_law(c, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), torch.zeros(V, dtype=torch.bool), "fallback")
    assert bool((out[acc == 1, 1] == 0).all())


def test_speculative_seeds_and_reference():
    V, n, B = 17, 3, 64
    q, p = _spec_dists(n, V, seed=9)
    g = torch.Generator().manual_seed(0)
    draft = torch.stack([torch.multinomial(q[j].double(), B, replacement=True, generator=g) for j in range(n)], 1)
    Q, P = q[None].expand(B, n, V).contiguous(), p[None].expand(B, n + 1, V).contiguous()
    a = speculative_verify(draft, Q, P, seed=4, offset=2)
    b = speculative_verify(draft, Q, P, seed=4, offset=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = speculative_verify(draft, Q, P, seed=4, offset=3)
    assert not torch.equal(a[0], c[0])
    # per-row seeds: a row's result does not depend on its position
    seeds = torch.arange(B) * 7919 + 1
    r = speculative_verify(draft, Q, P, seed=seeds)
    for i in [0, 5, 63]:
        alone = speculative_verify(draft[i : i + 1], Q[i : i + 1], P[i : i + 1], seed=int(seeds[i]))
        assert torch.equal(alone[0][0], r[0][i]) and int(alone[1]) == int(r[1][i])
    # generator advances; int32 drafts are accepted
    gen = torch.Generator().manual_seed(1)
    s1 = speculative_verify(draft.int(), Q, P, generator=gen)
    s2 = speculative_verify(draft.int(), Q, P, generator=gen)
    assert not torch.equal(s1[0], s2[0])
    # the sequential reference has the same structure
    rt, ra = speculative_verify_ref(draft, Q, P, generator=torch.Generator().manual_seed(0))
    assert bool((rt[torch.arange(n + 1)[None, :] > ra[:, None]] == -1).all())


def test_speculative_reference_distribution():
    """The float64 sequential reference itself reproduces the target law (guards the reference)."""
    V, n, B = 5, 2, 20_000
    q, p = _spec_dists(n, V, seed=1)
    g = torch.Generator().manual_seed(3)
    draft = torch.stack([torch.multinomial(q[j].double(), B, replacement=True, generator=g) for j in range(n)], 1)
    out, acc = speculative_verify_ref(draft, q[None].expand(B, n, V), p[None].expand(B, n + 1, V), generator=g)
    _spec_check(q, p, draft, out, acc, "reference")


# ---------------------------------------------------------------------------------------- bad input
def _raises(exc, match, fn, *a, **kw):
    with pytest.raises(exc, match=match):
        fn(*a, **kw)


ERR = (ValueError, RuntimeError)


def test_sample_bad_shapes_and_dtypes():
    x = torch.randn(3, 10)
    _raises(ERR, "logits", sample, torch.randn(10), seed=1)
    _raises(ERR, "logits", sample, torch.randn(2, 3, 10), seed=1)
    _raises(ERR, "logits", sample, torch.randn(3, 0), seed=1)
    _raises(ERR, "logits", sample, torch.randint(0, 5, (3, 10)), seed=1)
    _raises(ERR, "logits", sample, x.double(), seed=1)
    _raises(ERR, "logits", sample, torch.randn(10, 3).t(), seed=1)  # last dim not contiguous
    _raises(ERR, "probs", sample_from_probs, torch.rand(3, 0), seed=1)
    _raises(ERR, "probs", sample_from_probs, torch.rand(3), seed=1)
    _raises(TypeError, "logits", sample, [[1.0, 2.0]], seed=1)
    # per-row tensors of the wrong length / rank / dtype
    for name, good in [("temperature", torch.ones(3)), ("top_k", torch.ones(3, dtype=torch.long)),
                       ("top_p", torch.ones(3) * 0.5), ("min_p", torch.ones(3) * 0.1)]:
        _raises(ERR, name, sample, x, seed=1, **{name: good[:2]})
        _raises(ERR, name, sample, x, seed=1, **{name: torch.cat([good, good[:1]])})
        _raises(ERR, name, sample, x, seed=1, **{name: good[None]})
        if name != "top_k":
            _raises(ERR, name, sample, x, seed=1, **{name: good[:1].expand(3).long()})
        # with indices the per-row tensors still have one entry per row of logits
        _raises(ERR, name, sample, x, indices=torch.tensor([0, 1]), seed=1, **{name: good[:2]})
    _raises(ERR, "top_k", sample, x, seed=1, top_k=torch.ones(3))
    _raises(ERR, "top_k", sample, x, seed=1, top_k=torch.ones(3, dtype=torch.bool))
    _raises(TypeError, "top_k", sample, x, seed=1, top_k=2.5)
    _raises(TypeError, "temperature", sample, x, seed=1, temperature="hot")
    _raises(TypeError, "top_p", sample, x, seed=1, top_p=True)
    _raises(ValueError, "top_k must fit in int64", sample, x, seed=1, top_k=2**70)
    # indices
    _raises(ERR, "indices", sample, x, indices=torch.tensor([0.0, 1.0]), seed=1)
    _raises(ERR, "indices", sample, x, indices=torch.zeros(2, 2, dtype=torch.long), seed=1)
    _raises(ERR, "indices", sample, x, indices=torch.tensor([0, 3]), seed=1)
    _raises(ERR, "indices", sample, x, indices=torch.tensor([-1, 0]), seed=1)
    _raises(ERR, "indices", sample, x, indices=torch.tensor([0, 2**40]), seed=1)


def test_sample_bad_values():
    x = torch.randn(3, 10)
    _raises(ERR, "temperature", sample, x, temperature=-0.1, seed=1)
    _raises(ERR, "temperature", sample, x, temperature=torch.tensor([1.0, -1.0, 1.0]), seed=1)
    _raises(ERR, "temperature", sample, x, temperature=float("nan"), seed=1)
    _raises(ERR, "temperature", sample, x, temperature=torch.tensor([1.0, float("nan"), 1.0]), seed=1)
    for name in ("top_p", "min_p"):
        for bad in (-0.01, 1.01, float("nan"), float("inf")):
            _raises(ERR, name, sample, x, seed=1, **{name: bad})
        _raises(ERR, name, sample, x, seed=1, **{name: torch.tensor([0.5, 1.5, 0.5])})
        _raises(ERR, name, sample, x, seed=1, **{name: torch.tensor([0.5, -0.5, 0.5])})
        _raises(ERR, name, sample, x, seed=1, **{name: torch.tensor([0.5, float("nan"), 0.5])})
        _raises(ERR, name, sample_from_probs, x.abs(), seed=1, **{name: 2.0})
    # rows with NaN / +inf / nothing finite, in every dtype, also on the greedy and top-k paths
    for dtype in DTYPES:
        for fill, what in [(float("nan"), "logits"), (float("inf"), "logits")]:
            y = torch.randn(3, 100).to(dtype)
            y[1, 57] = fill
            for kw in [dict(), dict(temperature=0.0), dict(top_k=5), dict(top_p=0.5)]:
                _raises(ERR, what, sample, y, seed=1, **kw)
        y = torch.randn(3, 100).to(dtype)
        y[2] = NEG_INF
        for kw in [dict(), dict(temperature=0.0), dict(top_k=5), dict(top_p=0.5), dict(min_p=0.2)]:
            _raises(ERR, "logits", sample, y, seed=1, **kw)
    # probs: negative, NaN, +inf, all zero
    p = torch.rand(3, 10)
    for bad in (-1e-3, float("nan"), float("inf")):
        q = p.clone()
        q[1, 4] = bad
        _raises(ERR, "probs", sample_from_probs, q, seed=1)
    q = p.clone()
    q[0] = 0
    _raises(ERR, "probs", sample_from_probs, q, seed=1)
    # sample_from_probs takes no temperature (wrapper: TypeError; op: ValueError naming it)
    _raises(TypeError, "temperature", sample_from_probs, p, temperature=0.5, seed=1)
    s = torch.tensor([1])
    _raises(ValueError, "temperature", torch.ops.ttscale.sample, p, None, 0.5, None, 0, None, 1.0, None, 0.0, None,
            s, s * 0, True, False)
    _raises(ValueError, "temperature", torch.ops.ttscale.sample, p, torch.ones(3), 1.0, None, 0, None, 1.0, None, 0.0,
            None, s, s * 0, True, False)


def test_sample_bad_seeds():
    x = torch.randn(3, 10)
    _raises(ERR, "seed", sample, x, seed=torch.tensor([1, 2]))
    _raises(ERR, "seed", sample, x, seed=torch.tensor([[1, 2, 3]]))
    _raises(ERR, "seed", sample, x, seed=torch.tensor([1], dtype=torch.int32))
    _raises(ERR, "seed", sample, x, seed=torch.tensor([1.0]))
    _raises(ERR, "seed", sample, x, seed=torch.tensor([1, 2, 3]), indices=torch.tensor([0, 1]))
    _raises(ERR, "offset", sample, x, seed=1, offset=torch.tensor([1, 2]))
    _raises(ERR, "offset", sample, x, seed=1, offset=torch.tensor([1], dtype=torch.int32))
    _raises(ValueError, "offset", sample, x, offset=3)
    _raises(ValueError, "seed", sample, x, seed=1, generator=torch.Generator())
    _raises(ValueError, "seed", sample, x, seed=2**64)
    _raises(TypeError, "seed", sample, x, seed=1.5)


def test_token_logprobs_bad_input():
    x = torch.randn(3, 10)
    t = torch.tensor([0, 1, 2])
    _raises(ERR, "tokens", token_logprobs, x, torch.tensor([0, 10, 1]))
    _raises(ERR, "tokens", token_logprobs, x, torch.tensor([0, -1, 1]))
    _raises(ERR, "tokens", token_logprobs, x, t[:2])
    _raises(ERR, "tokens", token_logprobs, x, t[None])
    _raises(ERR, "tokens", token_logprobs, x, t.float())
    _raises(ERR, "logits", token_logprobs, x[0], t)
    _raises(ERR, "logits", token_logprobs, torch.randn(3, 0), t)
    _raises(ERR, "logits", token_logprobs, x.long(), t)
    _raises(ERR, "temperature", token_logprobs, x, t, temperature=-1.0)
    _raises(ERR, "temperature", token_logprobs, x, t, temperature=torch.ones(2))
    _raises(ERR, "temperature", token_logprobs, x, t, temperature=torch.tensor([1.0, -2.0, 1.0]))
    y = x.clone()
    y[1, 3] = float("nan")
    _raises(ERR, "logits", token_logprobs, y, t)
    y[1, 3] = float("inf")
    _raises(ERR, "logits", token_logprobs, y, t)
    y[1] = NEG_INF
    _raises(ERR, "logits", token_logprobs, y, t)


def test_speculative_bad_input():
    B, n, V = 2, 3, 5
    dt = torch.zeros(B, n, dtype=torch.long)
    q = torch.full((B, n, V), 0.2)
    p = torch.full((B, n + 1, V), 0.2)
    sv = speculative_verify
    _raises(ERR, "draft_tokens", sv, dt[0], q, p, seed=1)
    _raises(ERR, "draft_tokens", sv, dt.float(), q, p, seed=1)
    _raises(ERR, "draft_probs", sv, dt, q[:, :2], p, seed=1)
    _raises(ERR, "draft_probs", sv, dt, q[:1], p, seed=1)
    _raises(ERR, "draft_probs", sv, dt, q[..., :0], p[..., :0], seed=1)
    _raises(ERR, "target_probs", sv, dt, q, p[:, :n], seed=1)
    _raises(ERR, "target_probs", sv, dt, q, p[..., :4], seed=1)
    _raises(ERR, "target_probs", sv, dt, q, p[:1], seed=1)
    _raises(ERR, "target_probs", sv, dt, q, p.half(), seed=1)
    _raises(ERR, "draft_probs", sv, dt, q.double(), p.double(), seed=1)
    _raises(ERR, "draft_tokens", sv, dt + V, q, p, seed=1)
    _raises(ERR, "draft_tokens", sv, dt - 1, q, p, seed=1)
    q2 = q.clone()
    q2[0, 1, 2] = -0.1
    _raises(ERR, "draft_probs", sv, dt, q2, p, seed=1)
    p2 = p.clone()
    p2[1, 0, 0] = float("nan")
    _raises(ERR, "target_probs", sv, dt, q, p2, seed=1)
    p2 = p.clone()
    p2[1, 2] = 0.0
    _raises(ERR, "target_probs", sv, dt, q, p2, seed=1)
    _raises(ERR, "seed", sv, dt, q, p, seed=torch.tensor([1, 2, 3]))
    _raises(ERR, "offset", sv, dt, q, p, seed=1, offset=torch.tensor([1], dtype=torch.int32))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA build and a GPU")
def test_device_mismatch():
    x = torch.randn(3, 10, device="cuda")
    _raises(ERR, "temperature", sample, x, temperature=torch.ones(3), seed=1)
    _raises(ERR, "indices", sample, x, indices=torch.tensor([0]), seed=1)
    _raises(ERR, "seed", torch.ops.ttscale.sample, x, None, 1.0, None, 0, None, 1.0, None, 0.0, None,
            torch.tensor([1]), torch.tensor([0], device="cuda"), False, False)
    _raises(ERR, "tokens", token_logprobs, x, torch.tensor([0, 1, 2]))
    q = torch.full((2, 1, 4), 0.25, device="cuda")
    _raises(ERR, "draft_probs", speculative_verify, torch.zeros(2, 1, dtype=torch.long), q,
            torch.full((2, 2, 4), 0.25, device="cuda"), seed=1)


# -------------------------------------------------------------------------------------- CPU vs CUDA
@pytest.mark.skipif(not CUDA, reason="needs a CUDA build and a GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [7, 32000, 128256])
def test_cpu_cuda_same_tokens(V, dtype):
    x = make_logits(16, V, dtype, std=2.0, masked=True, seed=V)
    idx = torch.arange(16).repeat(64)
    for kw in [dict(), dict(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05), dict(top_p=0.8),
               dict(temperature=torch.rand(16) + 0.2, min_p=torch.rand(16) * 0.1)]:
        kc = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        a, la = sample(x, indices=idx, seed=5, return_logprobs=True, **kw)
        b, lb = sample(x.cuda(), indices=idx.cuda(), seed=5, return_logprobs=True, **kc)
        mismatch = (a != b.cpu()).double().mean()
        assert mismatch <= 2e-3, (kw, float(mismatch))  # only draws at a float rounding of a boundary
        torch.testing.assert_close(la[a == b.cpu()], lb.cpu()[a == b.cpu()], **TOL[dtype])


# --------------------------------------------------------------------------- opcheck and torch.compile
def _sample_args(x, return_logprobs=True, probs=False):
    s, o = torch.tensor([7]), torch.tensor([3])
    if probs:
        return (x, None, 1.0, torch.tensor([0, 5, 2]), 0, None, 0.9, torch.tensor([0.0, 0.1, 0.01]), 0.0, None,
                s, o, True, return_logprobs)
    return (x, torch.tensor([0.7, 1.0, 0.0]), 1.0, None, 20, torch.tensor([0.9, 1.0, 0.5]), 1.0, None, 0.05,
            torch.tensor([2, 0, 1, 1, 2]), s, o, False, return_logprobs)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_sample(device):
    x = make_logits(3, 257, std=2.0, seed=1)
    dev = lambda a: a.to(device) if isinstance(a, torch.Tensor) else a  # noqa: E731
    for rl in (True, False):
        torch.library.opcheck(torch.ops.ttscale.sample.default, tuple(map(dev, _sample_args(x, rl))))
    p = torch.softmax(x, -1)
    torch.library.opcheck(torch.ops.ttscale.sample.default, tuple(map(dev, _sample_args(p, True, probs=True))))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_token_logprobs_and_speculative(device):
    x = make_logits(3, 257, std=2.0, seed=1).to(device)
    tok = torch.tensor([0, 100, 256], device=device)
    torch.library.opcheck(torch.ops.ttscale.token_logprobs.default, (x, tok, None, 0.8))
    torch.library.opcheck(torch.ops.ttscale.token_logprobs.default, (x, tok, torch.tensor([0.5, 1.0, 0.0], device=device), 1.0))
    q, p = _spec_dists(3, 17, seed=2)
    B = 4
    draft = torch.randint(0, 17, (B, 3), device=device)
    args = (draft, q[None].expand(B, 3, 17).contiguous().to(device), p[None].expand(B, 4, 17).contiguous().to(device),
            torch.tensor([11], device=device), torch.tensor([0], device=device))
    torch.library.opcheck(torch.ops.ttscale.speculative_verify.default, args)
    args2 = args[:3] + (torch.arange(B, device=device) + 1, torch.tensor([5], device=device))
    torch.library.opcheck(torch.ops.ttscale.speculative_verify.default, args2)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    x = make_logits(4, 1000, std=2.0, seed=3)

    @torch.compile(fullgraph=True)
    def with_seed(x, seed, t):
        tok, lp = ttscale.ops.sample(x, temperature=t, top_k=50, top_p=0.9, seed=seed, return_logprobs=True)
        return tok, lp, ttscale.ops.token_logprobs(x, tok, temperature=t)

    seed = torch.tensor([17])
    T = torch.tensor([0.8, 1.0, 0.0, 1.2])
    tok, lp, lp2 = with_seed(x, seed, T)
    etok, elp = sample(x, temperature=T, top_k=50, top_p=0.9, seed=seed, return_logprobs=True)
    assert torch.equal(tok, etok) and torch.equal(lp, elp)
    torch.testing.assert_close(lp2, token_logprobs(x, etok, temperature=T))

    @torch.compile(fullgraph=True)
    def no_seed(x):
        return ttscale.ops.sample(x, min_p=0.05)

    a, b = no_seed(x), no_seed(x)
    assert a.shape == (4,) and bool(((a >= 0) & (a < 1000)).all())
    big = make_logits(64, 1000, std=0.5, seed=4)
    assert not torch.equal(no_seed(big), no_seed(big))  # the generator state advances

    @torch.compile(fullgraph=True)
    def spec(d, q, p, seed):
        return ttscale.ops.speculative_verify(d, q, p, seed=seed)

    q, p = _spec_dists(2, 5, seed=1)
    d = torch.randint(0, 5, (8, 2))
    Q, P = q[None].expand(8, 2, 5).contiguous(), p[None].expand(8, 3, 5).contiguous()
    out = spec(d, Q, P, seed)
    ref = speculative_verify(d, Q, P, seed=seed)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kw", [dict(top_k=3), dict(top_p=0.9), dict(top_k=5, top_p=0.95, min_p=0.01)], ids=str)
def test_probs_negative_zero_is_zero(device, kw, cpu_isa):
    """-0.0 passes the "no negative probabilities" check, so it must act exactly like +0.0: never
    drawn, and never counted beside the row maximum in the top-k / top-p histograms (its float bits
    are above the maximum's)."""
    V = 1000 + 13  # a tail that is not a whole SIMD vector
    g = torch.Generator().manual_seed(4)
    p = torch.zeros(4, V)
    for r in range(4):
        idx = torch.randperm(V, generator=g)[:6]
        p[r, idx] = torch.rand(6, generator=g) + 0.05
    p = p / p.sum(-1, keepdim=True)
    neg = torch.where(p == 0, torch.full_like(p, -0.0), p)
    assert torch.signbit(neg).sum() == 4 * (V - 6)
    idx = torch.arange(4).repeat_interleave(500)
    a = sample_from_probs(p.to(device), indices=idx.to(device), seed=11, **kw).cpu()
    b = sample_from_probs(neg.to(device), indices=idx.to(device), seed=11, **kw).cpu()
    assert torch.equal(a, b)
    assert bool((p[idx, a] > 0).all())


@pytest.mark.parametrize("V,val", [(5, 1e30), (300, 2.0 ** 100), (5, 1e38), (300, 1e37)])
def test_probs_sum_beyond_float32_range(V, val, cpu_isa):
    """Rows need not be normalised. Up to 2^100 per value they are sampled from their law (the fp32
    block sums stay finite); above, a clear error, where they used to overflow to inf and draw the
    last token every time."""
    g = torch.Generator().manual_seed(V)
    p = (0.2 + torch.rand(1, V, generator=g)) / 1.2 * val  # finite, largest ~val, not normalised
    for kw in (dict(), dict(top_p=0.9), dict(min_p=0.5), dict(top_k=3)):
        if val > 2.0 ** 100:
            with pytest.raises(ValueError, match=r"probs row 0 has a value of .* above 2\^100"):
                sample_from_probs(p, seed=1, **kw)
            continue
        counts = draw_counts(sample_from_probs, p, 20_000, seed=1, **kw)
        check_rows(counts, p, probs_mode=True, label=f"probs x {val:g} {kw}", **kw)
        tok, lp = sample_from_probs(p, seed=1, indices=torch.zeros(50, dtype=torch.long), return_logprobs=True)
        want = torch.log(p[0, tok].double() / p.double().sum())
        torch.testing.assert_close(lp.double(), want, atol=1e-4, rtol=1e-5)


def test_scalar_params_as_numpy_and_0d_tensors(cpu_isa):
    """A 0-d tensor is one value for every row (as for seed), numpy scalars are numbers: the same
    draws as the Python numbers."""
    x = make_logits(5, 300, seed=3)
    py = dict(temperature=0.7, top_k=40, top_p=0.9, min_p=0.02)
    ref = sample(x, seed=4, **py)
    assert torch.equal(sample(x, seed=4, **{k: torch.tensor(v) for k, v in py.items()}), ref)
    npy = dict(temperature=np.float64(0.7), top_k=np.int64(40), top_p=np.float64(0.9), min_p=np.float64(0.02))
    assert torch.equal(sample(x, seed=4, **npy), ref)
    t = torch.tensor([0, 5, 9, 1, 299])
    torch.testing.assert_close(token_logprobs(x, t, temperature=torch.tensor(0.7)), token_logprobs(x, t, temperature=0.7))
