"""CUDA path of the sampling ops, checked against the CPU path.

The CPU and CUDA kernels share the Philox stream layout, the filter semantics and the
inverse-CDF rule, so the same ``(seed, offset)`` must draw the same tokens on both devices, up to
float32 rounding at a CDF boundary (the CPU uses a polynomial expf, the GPU ``__expf``, and the two
sum the masses in different orders). Every comparison therefore asserts an agreement rate of at
least 99.9% over many draws, plus hard invariants that hold for every single draw (token in
``[0, V)``, never a masked token, inside the reference support unless the token sits within a
float32 rounding of a top-p / min-p cut).

Covered: every dtype, logits and probabilities, each filter alone and combined, per-row parameter
tensors (including greedy rows and top-k values on both sides of the 2048-candidate capacity),
``indices`` (int32 and int64), per-sample seeds and offsets, ties, ``-inf`` masks, strided and
unaligned rows, greedy == argmax, logprobs, ``token_logprobs``, ``speculative_verify``, the error
cases, ``torch.compile(fullgraph=True)`` and CUDA-graph capture.

The whole module is skipped without a GPU and a CUDA build of ttscale.
"""
import pytest
import torch

import ttscale
from ttscale.ops import sample, sample_from_probs, speculative_verify, token_logprobs
from ttscale.reference import filtered_probs_with_ambiguity, token_logprobs_ref

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and ttscale.build_info()["cuda"]),
    reason="needs a CUDA GPU and a CUDA build of ttscale",
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MIN_AGREEMENT = 0.999
NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------- data
def make_logits(B, V, dtype, kind="normal", std=2.0, seed=0):
    """``[B, V]`` logits on the CPU: ``normal`` N(0, std); ``masked`` with ~10% ``-inf`` (never a
    whole row); ``ties`` rounded to multiples of 0.5 (many exact ties, also at top-k / top-p cuts);
    ``flat`` rows of one repeated value with a few larger ones."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, generator=g, dtype=torch.float64) * std
    if kind == "masked" and V > 1:
        m = torch.rand(B, V, generator=g) < 0.1
        m[torch.arange(B), torch.randint(0, V, (B,), generator=g)] = False
        x[m] = NEG_INF
    elif kind == "ties":
        x = torch.round(x * 2.0) / 2.0
    elif kind == "flat":
        x = torch.zeros(B, V, dtype=torch.float64)
        x[:, torch.randint(0, V, (min(V, 5),), generator=g)] = 1.0
    return x.to(dtype)


def make_probs(B, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(B, V, generator=g, dtype=torch.float64) * 2.0, dim=-1) * 3.7
    if V > 1:
        z = torch.rand(B, V, generator=g) < 0.1
        z[torch.arange(B), p.argmax(dim=1)] = False
        p[z] = 0.0
    return p.to(dtype)


def _to_cuda(kw):
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def _agreement(a, b):
    a, b = a.cpu(), b.cpu()
    assert a.shape == b.shape
    return (a == b).double().mean().item() if a.numel() else 1.0


def _check_support(x, tok, rows, probs_mode=False, **filters):
    """Every drawn token is in [0, V), never masked, and inside the reference support (ambiguous
    tokens at a top-p / min-p cut excepted)."""
    V = x.shape[1]
    tok = tok.cpu()
    assert int(tok.min()) >= 0 and int(tok.max()) < V, "token outside [0, V)"
    ref, amb = filtered_probs_with_ambiguity(x, probs_mode=probs_mode, **filters)
    ok = (ref[rows, tok] > 0) | amb[rows, tok]
    bad = (~ok).nonzero().flatten()
    assert bad.numel() == 0, f"{bad.numel()} draws outside the filtered support, e.g. row {int(rows[bad[0]])} token {int(tok[bad[0]])}"


def _row_filters(B, V, seed=1):
    """Per-row parameter tensors mixing every regime: greedy rows, top-k off / 1 / small / above
    the candidate capacity / >= V, top-p off / 0 / partial, min-p off / on."""
    g = torch.Generator().manual_seed(seed)
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.3])[torch.randint(0, 4, (B,), generator=g)]
    top_k = torch.tensor([0, 1, 7, 50, 2500, V + 5])[torch.randint(0, 6, (B,), generator=g)]
    top_p = torch.tensor([1.0, 0.0, 0.5, 0.9])[torch.randint(0, 4, (B,), generator=g)]
    min_p = torch.tensor([0.0, 0.05, 0.3])[torch.randint(0, 3, (B,), generator=g)]
    return dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)


FILTERS = {
    "none": {},
    "temperature": dict(temperature=0.7),
    "top_k_1": dict(top_k=1),
    "top_k_50": dict(top_k=50),
    "top_k_large": dict(top_k=3000),  # above the 2048-candidate capacity: threshold search per draw
    "top_p": dict(top_p=0.9),
    "top_p_0": dict(top_p=0.0),
    "min_p": dict(min_p=0.1),
    "top_p_min_p": dict(temperature=1.3, top_p=0.8, min_p=0.02),
    "all": dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05),
    "all_large_k": dict(temperature=0.9, top_k=2600, top_p=0.95, min_p=0.01),
    "rows": "rows",
}


def _filters(name, B, V):
    f = FILTERS[name]
    return _row_filters(B, V) if f == "rows" else dict(f)


# --------------------------------------------------------------------------------------------- tokens
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [1, 7, 97, 4097, 32000])
@pytest.mark.parametrize("filt", list(FILTERS))
def test_tokens_match_cpu(dtype, V, filt):
    B, per_row = 16, 128
    kind = ["normal", "masked", "ties"][(V + len(filt)) % 3]
    x = make_logits(B, V, dtype, kind=kind, seed=V)
    kw = _filters(filt, B, V)
    idx = torch.arange(B).repeat_interleave(per_row)
    cpu = sample(x, indices=idx, seed=1234, **kw)
    gpu = sample(x.cuda(), indices=idx.cuda(), seed=1234, **_to_cuda(kw))
    assert gpu.device.type == "cuda" and gpu.dtype == torch.int64 and gpu.shape == (B * per_row,)
    assert _agreement(cpu, gpu) >= MIN_AGREEMENT
    _check_support(x, gpu, idx, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("filt", ["none", "top_k_50", "top_p", "all", "rows"])
def test_tokens_match_cpu_no_indices(dtype, filt):
    """One draw per row over many rows, a single seed (subsequence = row) and an offset."""
    B, V = 512, 1031
    x = make_logits(B, V, dtype, kind="masked", seed=7)
    kw = _filters(filt, B, V)
    cpu = sample(x, seed=99, offset=5, **kw)
    gpu = sample(x.cuda(), seed=99, offset=5, **_to_cuda(kw))
    assert _agreement(cpu, gpu) >= MIN_AGREEMENT
    _check_support(x, gpu, torch.arange(B), **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tokens_match_cpu_per_sample_seeds(dtype):
    B, V, N = 8, 5003, 2048
    x = make_logits(B, V, dtype, seed=3)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, B, (N,), generator=g, dtype=torch.int32)  # int32 indices
    seeds = torch.randint(-(2**62), 2**62, (N,), generator=g)
    offsets = torch.randint(0, 2**40, (N,), generator=g)
    for kw in [{}, dict(top_k=20), dict(top_p=0.7, min_p=0.02)]:
        cpu = sample(x, indices=idx, seed=seeds, offset=offsets, **kw)
        gpu = sample(x.cuda(), indices=idx.cuda(), seed=seeds.cuda(), offset=offsets.cuda(), **kw)
        assert _agreement(cpu, gpu) >= MIN_AGREEMENT


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("filt", ["none", "top_k_50", "top_k_large", "top_p", "min_p", "all", "rows"])
def test_probs_match_cpu(dtype, filt):
    B, V, per_row = 12, 4099, 128
    p = make_probs(B, V, dtype, seed=11)
    kw = _filters(filt, B, V)
    kw.pop("temperature", None)
    idx = torch.arange(B).repeat_interleave(per_row)
    cpu = sample_from_probs(p, indices=idx, seed=5, **kw)
    gpu = sample_from_probs(p.cuda(), indices=idx.cuda(), seed=5, **_to_cuda(kw))
    assert _agreement(cpu, gpu) >= MIN_AGREEMENT
    _check_support(p, gpu, idx, probs_mode=True, **kw)


@pytest.mark.parametrize("kind", ["flat", "ties"])
@pytest.mark.parametrize("filt", ["top_k_50", "top_k_large", "top_p", "top_p_0", "all"])
def test_ties_match_cpu(kind, filt):
    """Many equal values: top-k keeps lower ids first at the k-th value, top-p keeps every tie at
    its cut; both devices must make the same choices."""
    B, V, per_row = 8, 8192, 64
    x = make_logits(B, V, torch.float32, kind=kind, seed=21)
    kw = _filters(filt, B, V)
    idx = torch.arange(B).repeat_interleave(per_row)
    cpu = sample(x, indices=idx, seed=3, **kw)
    gpu = sample(x.cuda(), indices=idx.cuda(), seed=3, **_to_cuda(kw))
    assert _agreement(cpu, gpu) >= MIN_AGREEMENT
    _check_support(x, gpu, idx, **kw)


def test_strided_and_unaligned_rows():
    """Rows `row_stride` elements apart, not 16-byte aligned (scalar loads), and a row offset."""
    B, V = 9, 4001
    big = make_logits(B, V + 3, torch.float32, seed=4)
    for x in [big[:, :V], big[:, 1 : V + 1], big[:, 3:]]:
        for kw in [{}, dict(top_k=30), dict(top_p=0.8)]:
            idx = torch.arange(B).repeat_interleave(64)
            cpu = sample(x, indices=idx, seed=8, **kw)
            gpu = sample(x.cuda(), indices=idx.cuda(), seed=8, **kw)
            assert _agreement(cpu, gpu) >= MIN_AGREEMENT


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("filt", ["none", "temperature", "top_k_50", "top_p", "all", "rows"])
def test_tokens_match_cpu_large_vocab(dtype, filt):
    B, V = 64, 128256
    x = make_logits(B, V, dtype, kind="masked", std=3.0, seed=17)
    kw = _filters(filt, B, V)
    idx = torch.arange(B).repeat_interleave(32)
    cpu = sample(x, indices=idx, seed=2024, **kw)
    gpu = sample(x.cuda(), indices=idx.cuda(), seed=2024, **_to_cuda(kw))
    assert _agreement(cpu, gpu) >= MIN_AGREEMENT
    _check_support(x, gpu, idx, **kw)


# --------------------------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["normal", "masked", "ties", "flat"])
def test_greedy_is_first_argmax(dtype, kind):
    B, V = 33, 3001
    x = make_logits(B, V, dtype, kind=kind, seed=2).cuda()
    tok = sample(x, temperature=0.0, top_k=5, top_p=0.5, seed=0)
    xf = x.float().cpu()
    first = (xf == xf.max(dim=1, keepdim=True).values).int().argmax(dim=1)  # first maximal index
    assert torch.equal(tok.cpu(), first)


# --------------------------------------------------------------------------------------------- logprobs
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("filt", ["none", "temperature", "top_k_50", "top_p", "rows"])
def test_logprobs_close_to_cpu(dtype, filt):
    B, V = 24, 4097
    x = make_logits(B, V, dtype, kind="masked", seed=9)
    kw = _filters(filt, B, V)
    idx = torch.arange(B).repeat_interleave(8)
    tc, lc = sample(x, indices=idx, seed=4, return_logprobs=True, **kw)
    tg, lg = sample(x.cuda(), indices=idx.cuda(), seed=4, return_logprobs=True, **_to_cuda(kw))
    assert lg.dtype == torch.float32 and lg.shape == (B * 8,)
    same = tc == tg.cpu()
    assert same.double().mean().item() >= MIN_AGREEMENT
    torch.testing.assert_close(lg.cpu()[same], lc[same], atol=2e-4, rtol=1e-4)
    # against the float64 reference: temperature-scaled, unfiltered (greedy rows at temperature 1)
    T = kw.get("temperature")
    ref = token_logprobs_ref(x[idx], tg.cpu(), temperature=T[idx] if isinstance(T, torch.Tensor) else T)
    torch.testing.assert_close(lg.cpu().double(), ref, atol=2e-4, rtol=1e-4)


def test_logprobs_probs_mode():
    B, V = 10, 2053
    p = make_probs(B, V, torch.float32, seed=5)
    idx = torch.arange(B).repeat_interleave(100)
    tc, lc = sample_from_probs(p, indices=idx, seed=1, return_logprobs=True, top_p=0.9)
    tg, lg = sample_from_probs(p.cuda(), indices=idx.cuda(), seed=1, return_logprobs=True, top_p=0.9)
    same = tc == tg.cpu()
    assert same.double().mean().item() >= MIN_AGREEMENT
    torch.testing.assert_close(lg.cpu()[same], lc[same], atol=1e-5, rtol=1e-5)
    pd = p.double()
    ref = torch.log(pd / pd.sum(dim=1, keepdim=True))[idx, tg.cpu()]
    torch.testing.assert_close(lg.cpu().double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [1, 7, 4097, 50257])
def test_token_logprobs_close_to_cpu(dtype, V):
    B = 37
    x = make_logits(B, V, dtype, kind="masked", seed=V)
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(0, V, (B,), generator=g)
    finite = torch.isfinite(x.double()).gather(1, tok[:, None]).squeeze(1)
    tok = torch.where(finite, tok, x.double().argmax(dim=1))
    temperature = torch.tensor([0.0, 0.5, 1.0, 2.0])[torch.arange(B) % 4]
    for t in [None, 0.7, temperature]:
        cpu = token_logprobs(x, tok, temperature=t)
        gpu = token_logprobs(x.cuda(), tok.cuda(), temperature=t.cuda() if isinstance(t, torch.Tensor) else t)
        assert gpu.dtype == torch.float32 and gpu.shape == (B,)
        torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(gpu.cpu().double(), token_logprobs_ref(x, tok, temperature=t), atol=2e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------- speculative
def _spec_inputs(B, n, V, dtype, seed=0, half_rows=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.softmax(torch.randn(B, n, V, generator=g, dtype=torch.float64) * 2, dim=-1)
    p = torch.softmax(torch.randn(B, n + 1, V, generator=g, dtype=torch.float64) * 2, dim=-1)
    if half_rows and n > 0:
        p[:, :n] = q * 0.5  # p <= q everywhere: a rejection leaves an empty residual -> draw from p
    dt = torch.multinomial(q.reshape(-1, V).float(), 1, generator=g).view(B, n) if n > 0 else torch.zeros(B, 0, dtype=torch.int64)
    return dt, q.to(dtype), p.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,n,V", [(1, 1, 7), (64, 4, 1031), (33, 0, 97), (16, 8, 32000)])
def test_speculative_matches_cpu(dtype, B, n, V):
    dt, q, p = _spec_inputs(B, n, V, dtype, seed=B + n)
    for kw in [dict(seed=3), dict(seed=torch.arange(B) * 7 + 1, offset=torch.full((B,), 11))]:
        tc, ac = speculative_verify(dt, q, p, **kw)
        tg, ag = speculative_verify(dt.cuda(), q.cuda(), p.cuda(), **_to_cuda(kw))
        assert tg.shape == (B, n + 1) and ag.shape == (B,)
        assert torch.equal(ag.cpu(), ac)  # acceptance compares the same stored values: exact
        rows_equal = (tg.cpu() == tc).all(dim=1)
        assert rows_equal.double().mean().item() >= MIN_AGREEMENT
        assert (tg.cpu() >= -1).all() and (tg.cpu() < V).all()


def test_speculative_empty_residual_and_int32_tokens():
    """p = q / 2 at the draft positions: about half the drafts are rejected, the residual
    max(0, p - q) is empty there and the token is drawn from p instead."""
    B, n, V = 64, 3, 517
    dt, q, p = _spec_inputs(B, n, V, torch.float32, seed=5, half_rows=True)
    tc, ac = speculative_verify(dt.int(), q, p, seed=9)
    tg, ag = speculative_verify(dt.int().cuda(), q.cuda(), p.cuda(), seed=9)
    assert (ac < n).any(), "the test needs rejections"
    assert torch.equal(ag.cpu(), ac)
    assert (tg.cpu() == tc).all(dim=1).double().mean().item() >= MIN_AGREEMENT


# --------------------------------------------------------------------------------------------- errors
def test_nan_row_raises():
    x = make_logits(6, 300, torch.float32).cuda()
    x[4, 17] = float("nan")
    x[2, 250] = float("inf")
    with pytest.raises(ValueError, match=r"logits row 2 contains NaN or \+inf \(at token 250\)"):
        sample(x, seed=0)
    with pytest.raises(ValueError, match=r"logits row 2 contains NaN or \+inf \(at token 250\)"):
        sample(x, seed=0, top_k=5)
    with pytest.raises(ValueError, match=r"logits row 2 contains NaN or \+inf"):
        token_logprobs(x, torch.zeros(6, dtype=torch.long, device="cuda"))
    # rows that are not sampled are not checked (as on the CPU)
    tok = sample(x, indices=torch.tensor([0, 1, 3, 5], device="cuda"), seed=0)
    assert tok.shape == (4,)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_errors_match_cpu(dtype):
    x = make_logits(5, 64, dtype)
    x[3] = NEG_INF
    for dev in ["cpu", "cuda"]:
        with pytest.raises(ValueError, match=r"logits row 3 has no finite value"):
            sample(x.to(dev), seed=0)
        with pytest.raises(ValueError, match=r"logits row 3 has no finite value"):
            token_logprobs(x.to(dev), torch.zeros(5, dtype=torch.long, device=dev))
    p = make_probs(4, 64, dtype)
    p[1] = 0.0
    for dev in ["cpu", "cuda"]:
        with pytest.raises(ValueError, match=r"probs row 1 sums to zero"):
            sample_from_probs(p.to(dev), seed=0)
    y = make_logits(4, 64, dtype).cuda()
    with pytest.raises(ValueError, match="top_p"):
        sample(y, top_p=1.5, seed=0)
    with pytest.raises(ValueError, match="indices"):
        sample(y, indices=torch.tensor([0, 4], device="cuda"), seed=0)


# --------------------------------------------------------------------------------------------- compile / graphs
def test_torch_compile_fullgraph():
    B, V = 16, 2003
    x = make_logits(B, V, torch.float16, seed=6).cuda()
    seed = torch.tensor([42], device="cuda")
    offset = torch.tensor([3], device="cuda")
    top_p = torch.full((B,), 0.9, device="cuda")

    def f(x, seed, offset, top_p):
        tok, lp = sample(x, temperature=0.8, top_k=40, top_p=top_p, seed=seed, offset=offset, return_logprobs=True)
        return tok, lp, token_logprobs(x, tok, temperature=0.8)

    compiled = torch.compile(f, fullgraph=True)
    tok_c, lp_c, tlp_c = compiled(x, seed, offset, top_p)
    tok_e, lp_e, tlp_e = f(x, seed, offset, top_p)
    assert torch.equal(tok_c, tok_e)
    torch.testing.assert_close(lp_c, lp_e)
    torch.testing.assert_close(tlp_c, tlp_e)


def test_cuda_graph_capture_replays_like_eager():
    """Seeds and offsets as device tensors keep the op capturable (no host sync while capturing)."""
    B, V = 8, 4097
    x = make_logits(B, V, torch.float32, seed=12).cuda()
    seed = torch.tensor([5], device="cuda")
    offset = torch.tensor([0], device="cuda")
    idx = torch.arange(B, device="cuda").repeat_interleave(4)
    kwargs = dict(indices=idx, temperature=0.9, top_k=50, top_p=0.9, seed=seed, offset=offset)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        sample(x, **kwargs)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sample(x, **kwargs)
    for off in [0, 1, 7]:
        offset.fill_(off)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, sample(x, **kwargs))
