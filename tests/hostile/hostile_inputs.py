"""Valid small inputs the hostile cases start from (each case then breaks one thing), layout tricks,
and the comparisons with the float64 references."""
from __future__ import annotations

import types

import torch

I32 = torch.int32
I64 = torch.int64
NAN = float("nan")
INF = float("inf")

# Bounds for outputs in the input dtype against a float64 reference given the same stored values:
# float32 math, then (fp16 / bf16) one rounding of the output to the dtype.
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 3e-2}


def i32(*v) -> torch.Tensor:
    return torch.tensor(v, dtype=I32)


def i64(*v) -> torch.Tensor:
    return torch.tensor(v, dtype=I64)


def meta(t: torch.Tensor) -> torch.Tensor:
    return t.to("meta")


def last_dim_strided(t: torch.Tensor) -> torch.Tensor:
    """Same shape and values as ``t``, last dimension with stride 2."""
    big = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    big[..., ::2] = t
    out = big[..., ::2]
    assert out.stride(-1) == 2 and torch.equal(out, t)
    return out


def rows_strided(t: torch.Tensor) -> torch.Tensor:
    """Same shape and values as ``t``, leading dimension with a gap (not contiguous, last dim dense)."""
    big = torch.empty(2 * t.shape[0], *t.shape[1:], dtype=t.dtype)
    big[::2] = t
    out = big[::2]
    assert not out.is_contiguous() and out.stride(-1) == 1 and torch.equal(out, t)
    return out


def close(a: torch.Tensor, b: torch.Tensor, what: str, atol=1e-4, rtol=1e-4) -> None:
    """Values within tolerance of the reference ``b`` (NaN where ``b`` is NaN)."""
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(b.shape)}"
    if not torch.allclose(a.double(), b.double(), atol=atol, rtol=rtol, equal_nan=True):
        d = (a.double() - b.double()).abs()
        d = d[~torch.isnan(d)]
        raise AssertionError(f"{what}: wrong values (max abs diff {float(d.max()) if d.numel() else 'nan'}; "
                             f"NaN: got {int(a.isnan().sum())}, expected {int(b.isnan().sum())})")


def like_ref(out: torch.Tensor, ref: torch.Tensor, what: str, tol: float = 1e-4, nan_exact: bool = True) -> None:
    """``out`` follows the reference ``ref`` of the non-finite contract: the same entries are NaN
    (``nan_exact``; otherwise only the same entries are non-finite: where a non-finite value of V
    is summed, a fused kernel may meet inf - inf where the reference's order does not), the same
    entries are -inf (an LSE over no key), and the finite entries agree within ``tol``."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    o, r = out.double(), ref.double()
    pattern = (torch.isnan, "NaN") if nan_exact else ((lambda x: ~torch.isfinite(x)), "non-finite")
    for f, name in (pattern, (torch.isneginf, "-inf")):
        if not torch.equal(f(o), f(r)):
            bad = (f(o) != f(r)).nonzero()[:4].tolist()
            raise AssertionError(f"{what}: {name} entries differ from the reference (first at {bad}; "
                                 f"{int(f(o).sum())} in the output, {int(f(r).sum())} in the reference)")
    fin = torch.isfinite(r)
    close(o[fin], r[fin], what, atol=tol, rtol=tol)


def paged(dtype=torch.float32, num_pages=6, page_size=4, hkv=2, hq=4, d=64):
    """Two sequences: pages [0, 1] (7 tokens) and [2] (4 tokens); decode queries q [2, hq, d]."""
    g = torch.Generator().manual_seed(0)
    kc = torch.randn(num_pages, page_size, hkv, d, generator=g).to(dtype)
    vc = torch.randn(num_pages, page_size, hkv, d, generator=g).to(dtype)
    return types.SimpleNamespace(
        kc=kc, vc=vc, q=torch.randn(2, hq, d, generator=g).to(dtype),
        ip=i32(0, 2, 3), ix=i32(0, 1, 2), last=i32(3, 4),
        k_new=torch.randn(2, hkv, d, generator=g).to(dtype), v_new=torch.randn(2, hkv, d, generator=g).to(dtype))


def paged_long(dtype=torch.float32, kv_len=(70, 45), page_size=16, hkv=2, hq=4, d=64, seed=3):
    """Sequences of the given lengths on shuffled pages (plus spare pages), big enough that the
    kernels' query x key tiles and SIMD tails are all exercised. Returns (kc, vc, ip, ix, last)."""
    from ttscale.reference.paged_attention import build_page_table
    g = torch.Generator().manual_seed(seed)
    ip, ix, last, num_pages = build_page_table(list(kv_len), page_size, generator=g)
    kc = torch.randn(num_pages, page_size, hkv, d, generator=g).to(dtype)
    vc = torch.randn(num_pages, page_size, hkv, d, generator=g).to(dtype)
    return kc, vc, ip, ix, last


def slot(ix, ip, page_size, b, t):
    """(physical page, offset) of token ``t`` of sequence ``b``."""
    return int(ix[int(ip[b]) + t // page_size]), t % page_size


def dense(b=1, sq=4, sk=6, hq=4, hkv=2, d=64, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, sq, hq, d, generator=g).to(dtype), torch.randn(b, sk, hkv, d, generator=g).to(dtype),
            torch.randn(b, sk, hkv, d, generator=g).to(dtype))
