"""Tests for ttscale.ops.attention (dense flash attention forward).

Ground truth is the float64 plain-torch reference (``ttscale.reference.attention.attention_ref``) given
the same stored input values (upcast exactly). Error bound, per dtype, in one table (``BOUND``): the
kernel's max abs error against float64 must be at most ``factor x`` the error plain torch makes
computing the same attention in that dtype, plus a small floor (FlashAttention's criterion). LSE is
compared directly (it is float32 for every input dtype), and ``-inf`` rows must match exactly.

Inputs are random (never zeros); sizes are awkward (1, 2, 17, 127, 1000; Sq != Sk; batch 1 and 37
ragged with empty sequences; GQA groups 1, 4, 8; head dims 64, 128, 256). Every CPU SIMD path runs
(``cpu_isa``). The op allocates its outputs itself (there is no ``out=``), so nothing can be poisoned
before the call; instead outputs are checked to be fully written (finite where a key is visible, 0
where none is). CUDA cases (reference and CPU-vs-CUDA agreement) skip without a GPU.
"""
import math

import pytest
import torch

import ttscale
from ttscale.ops import attention
from ttscale.reference.attention import attention_ref

from conftest import CUDA, DEVICES

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# dtype -> (factor x plain-torch error in that dtype, absolute floor)
BOUND = {
    torch.float32: (2.0, 2e-5),
    torch.float16: (2.0, 2e-3),
    torch.bfloat16: (2.0, 1.5e-2),
}
LSE_ATOL = 1e-4  # LSE is float32 from the exact input values for every dtype
# fp16 / bf16 also against a tighter baseline: float32 math rounded once to the dtype. Plain torch in
# bf16 (softmax and P.V in bf16) errs 15-46x more than the kernels, so the 2x bound above alone let a
# kernel that drops one key of 1000 pass in bf16. Measured: every ISA's max error equals this
# baseline's (output rounding); 2x + a tiny floor.
TIGHT_FACTOR, TIGHT_FLOOR = 2.0, 1e-6


def _rand(*shape, dtype, device="cpu", scale=1.0):
    x = torch.randn(*shape, dtype=torch.float32) * scale
    x = torch.where(x == 0, torch.full_like(x, 0.5), x)  # never exact zeros
    return x.to(dtype=dtype, device=device)


def _check(out, lse, q, k, v, *, ref_kwargs, check_plain=True):
    dtype = q.dtype
    ro, rl = attention_ref(q.cpu(), k.cpu(), v.cpu(), **ref_kwargs)
    assert out.dtype == dtype and out.shape == q.shape
    err = (out.cpu().double() - ro).abs().max().item() if out.numel() else 0.0
    factor, floor = BOUND[dtype]
    bound = floor
    if check_plain and dtype != torch.float32 and out.numel():
        po, _ = attention_ref(q.cpu(), k.cpu(), v.cpu(), compute_dtype=dtype, **ref_kwargs)
        bound = factor * (po.double() - ro).abs().max().item() + floor
    elif out.numel():
        bound = floor
    assert err <= bound, f"max abs error {err:.3g} > bound {bound:.3g} ({dtype})"
    if check_plain and dtype != torch.float32 and out.numel():
        p32, _ = attention_ref(q.cpu(), k.cpu(), v.cpu(), compute_dtype=torch.float32, **ref_kwargs)
        tight = TIGHT_FACTOR * (p32.to(dtype).double() - ro).abs().max().item() + TIGHT_FLOOR
        assert err <= tight, f"max abs error {err:.3g} > {tight:.3g} (2x float32 math rounded to {dtype})"
    # rows with no visible key: output exactly 0, LSE -inf
    empty = torch.isinf(rl)
    if empty.any():
        assert (out.cpu()[empty] == 0).all()
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == q.shape[:-1]
        l = lse.cpu()
        assert torch.equal(torch.isinf(l), empty) and (l[empty] < 0).all()
        fin = ~empty
        if fin.any():
            lerr = (l[fin].double() - rl[fin]).abs().max().item()
            assert lerr <= LSE_ATOL * (1 + rl[fin].abs().max().item()), f"LSE error {lerr:.3g}"
    assert torch.isfinite(out.cpu().float()).all()


# (B, Sq, Sk, Hq, Hkv, D, causal, window_left, softcap, scale)
PADDED = [
    (1, 1, 1, 4, 4, 64, False, -1, 0.0, None),
    (2, 2, 17, 8, 2, 64, True, -1, 0.0, None),
    (1, 17, 2, 8, 1, 128, True, -1, 0.0, None),      # Sq > Sk: early rows see nothing (-inf)
    (2, 17, 127, 4, 1, 128, False, 8, 0.0, 0.3),     # window, explicit scale, MQA
    (1, 127, 127, 8, 8, 256, True, 16, 30.0, None),  # causal + window + softcap
    (1, 127, 1000, 8, 1, 64, True, -1, 5.0, None),   # group 8
    (1, 1000, 1000, 4, 1, 128, True, -1, 0.0, None),
    (3, 33, 65, 4, 4, 256, False, -1, 2.0, 0.05),
    (1, 65, 17, 4, 2, 128, False, 0, 0.0, None),     # window 0: only the diagonal key
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("cfg", PADDED, ids=lambda c: "B{}_q{}_k{}_h{}x{}_d{}_c{}_w{}_s{}".format(*c[:9]))
def test_padded_cpu(cpu_isa, dtype, cfg, request):
    B, Sq, Sk, Hq, Hkv, D, causal, wl, sc, scale = cfg
    if (cpu_isa == "generic" and Sq * Sk > 20000 and dtype != torch.float32
            and not request.config.getoption("--runslow")):
        pytest.skip("slow: big fp16/bf16 cases on the generic path run with --runslow")
    q = _rand(B, Sq, Hq, D, dtype=dtype)
    k = _rand(B, Sk, Hkv, D, dtype=dtype, scale=1.5)
    v = _rand(B, Sk, Hkv, D, dtype=dtype)
    out, lse = attention(q, k, v, causal=causal, window_left=wl, softcap=sc, scale=scale, return_lse=True)
    _check(out, lse, q, k, v, ref_kwargs=dict(causal=causal, window_left=wl, softcap=sc, scale=scale))
    out2 = attention(q, k, v, causal=causal, window_left=wl, softcap=sc, scale=scale)
    assert torch.equal(out, out2)


def _ragged(B, Hq, Hkv, D, dtype, lens_q, lens_k, device="cpu"):
    cq = torch.tensor([0] + lens_q, dtype=torch.int64).cumsum(0).to(torch.int32)
    ck = torch.tensor([0] + lens_k, dtype=torch.int64).cumsum(0).to(torch.int32)
    q = _rand(int(cq[-1]), Hq, D, dtype=dtype, device=device)
    k = _rand(int(ck[-1]), Hkv, D, dtype=dtype, device=device, scale=1.5)
    v = _rand(int(ck[-1]), Hkv, D, dtype=dtype, device=device)
    return q, k, v, cq.to(device), ck.to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("causal,wl,sc", [(True, -1, 0.0), (False, 7, 0.0), (True, 3, 20.0)])
def test_ragged_batch37_cpu(cpu_isa, dtype, causal, wl, sc):
    g = torch.Generator().manual_seed(1)
    B = 37
    lens_q = torch.randint(0, 40, (B,), generator=g).tolist()
    lens_k = [lq + int(torch.randint(0, 30, (1,), generator=g)) for lq in lens_q]
    lens_q[3] = 0          # empty query sequence
    lens_q[5], lens_k[5] = 0, 0  # empty everything
    lens_q[7], lens_k[7] = 5, 0  # queries without keys: output 0, LSE -inf
    lens_q[8], lens_k[8] = 17, 2  # Sq > Sk
    q, k, v, cq, ck = _ragged(B, 8, 2, 64, dtype, lens_q, lens_k)
    out, lse = attention(q, k, v, causal=causal, window_left=wl, softcap=sc, cu_seqlens_q=cq, cu_seqlens_k=ck,
                         return_lse=True)
    _check(out, lse, q, k, v, ref_kwargs=dict(causal=causal, window_left=wl, softcap=sc, cu_seqlens_q=cq,
                                              cu_seqlens_k=ck))
    assert (lse[cq[7]:cq[8]] == float("-inf")).all()


@pytest.mark.parametrize("D,group", [(64, 1), (128, 4), (256, 8)])
def test_ragged_batch1_cpu(cpu_isa, D, group):
    q, k, v, cq, ck = _ragged(1, 8, 8 // group, D, torch.bfloat16, [127], [1000])
    out, lse = attention(q, k, v, causal=True, cu_seqlens_q=cq, cu_seqlens_k=ck, return_lse=True)
    _check(out, lse, q, k, v, ref_kwargs=dict(causal=True, cu_seqlens_q=cq, cu_seqlens_k=ck))


def test_ragged_equals_padded_cpu():
    q = _rand(3, 17, 4, 128, dtype=torch.float32)
    k = _rand(3, 23, 2, 128, dtype=torch.float32)
    v = _rand(3, 23, 2, 128, dtype=torch.float32)
    cq = torch.tensor([0, 17, 34, 51], dtype=torch.int32)
    ck = torch.tensor([0, 23, 46, 69], dtype=torch.int32)
    o1, l1 = attention(q, k, v, causal=True, return_lse=True)
    o2, l2 = attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), causal=True, cu_seqlens_q=cq,
                       cu_seqlens_k=ck, return_lse=True)
    assert torch.equal(o1.flatten(0, 1), o2) and torch.equal(l1.flatten(0, 1), l2)


def test_strided_inputs_cpu(cpu_isa):
    # q, k, v as views of one packed [B, S, Hq + 2 Hkv, D] tensor (only the last dim contiguous)
    B, S, Hq, Hkv, D = 2, 33, 8, 2, 64
    qkv = _rand(B, S, Hq + 2 * Hkv, D, dtype=torch.bfloat16)
    q, k, v = qkv[:, :, :Hq], qkv[:, :, Hq:Hq + Hkv], qkv[:, :, Hq + Hkv:]
    out, lse = attention(q, k, v, causal=True, return_lse=True)
    _check(out, lse, q, k, v, ref_kwargs=dict(causal=True))
    # head-major (transposed) inputs
    qt = _rand(B, Hq, S, D, dtype=torch.float32).transpose(1, 2)
    kt = _rand(B, Hkv, S, D, dtype=torch.float32).transpose(1, 2)
    vt = _rand(B, Hkv, S, D, dtype=torch.float32).transpose(1, 2)
    out = attention(qt, kt, vt)
    _check(out, None, qt, kt, vt, ref_kwargs={})


def test_matches_sdpa_cpu():
    q = _rand(1, 64, 8, 128, dtype=torch.float32)
    k = _rand(1, 64, 2, 128, dtype=torch.float32)
    v = _rand(1, 64, 2, 128, dtype=torch.float32)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(attention(q, k, v, causal=True), ref, atol=1e-5, rtol=1e-5)


def test_large_logits_stable_cpu(cpu_isa):
    # logits of magnitude ~1e3: the online softmax must not overflow
    q = _rand(1, 70, 2, 64, dtype=torch.float32, scale=30.0)
    k = _rand(1, 130, 2, 64, dtype=torch.float32, scale=30.0)
    v = _rand(1, 130, 2, 64, dtype=torch.float32)
    out, lse = attention(q, k, v, return_lse=True)
    ro, rl = attention_ref(q, k, v)
    assert (out.double() - ro).abs().max().item() < 1e-3
    assert ((lse.double() - rl).abs() / rl.abs()).max().item() < 1e-5


# --------------------------------------------------------------------------- opcheck and torch.compile
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    q = _rand(2, 9, 4, 64, dtype=torch.float32, device=device)
    k = _rand(2, 11, 2, 64, dtype=torch.float32, device=device)
    v = _rand(2, 11, 2, 64, dtype=torch.float32, device=device)
    op = torch.ops.ttscale.attention.default
    torch.library.opcheck(op, (q, k, v, None, None, True, None, -1, 0.0, True))
    torch.library.opcheck(op, (q, k, v, None, None, False, 0.2, 3, 10.0, False))
    cq = torch.tensor([0, 3, 9], dtype=torch.int32, device=device)
    ck = torch.tensor([0, 5, 11], dtype=torch.int32, device=device)
    torch.library.opcheck(op, (q[0], k[0], v[0], cq, ck, True, None, -1, 0.0, True))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile(device):
    q = _rand(1, 17, 4, 64, dtype=torch.bfloat16, device=device)
    k = _rand(1, 19, 2, 64, dtype=torch.bfloat16, device=device)
    v = _rand(1, 19, 2, 64, dtype=torch.bfloat16, device=device)

    def f(q, k, v):
        o, l = attention(q, k, v, causal=True, return_lse=True)
        return o.float() * 2, l

    cf = torch.compile(f, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    o1, l1 = cf(q, k, v)
    o2, l2 = f(q, k, v)
    assert torch.equal(o1, o2) and torch.equal(l1, l2)


# --------------------------------------------------------------------------- bad input
def _good(dtype=torch.float32):
    return (_rand(1, 5, 4, 64, dtype=dtype), _rand(1, 7, 2, 64, dtype=dtype), _rand(1, 7, 2, 64, dtype=dtype))


def _good_ragged():
    q, k, v = (t[0] for t in _good())
    return q, k, v, torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([0, 3, 7], dtype=torch.int32)


def test_bad_shapes_and_types():
    q, k, v = _good()
    with pytest.raises(RuntimeError, match="q must be 4-D"):
        attention(q[0, 0], k, v)
    with pytest.raises(RuntimeError, match="k must be 4-D"):
        attention(q, k[0], v)
    with pytest.raises(RuntimeError, match="k head_dim"):
        attention(q, _rand(1, 7, 2, 128, dtype=torch.float32), v)
    with pytest.raises(RuntimeError, match="v head_dim"):
        attention(q, k, _rand(1, 7, 2, 128, dtype=torch.float32))
    with pytest.raises(RuntimeError, match="head_dim must be one of 64, 128, 256, got 32"):
        attention(*(_rand(1, 5, 2, 32, dtype=torch.float32) for _ in range(3)))
    with pytest.raises(RuntimeError, match=r"q heads \(4\) must be a multiple of k/v heads \(3\)"):
        attention(q, _rand(1, 7, 3, 64, dtype=torch.float32), _rand(1, 7, 3, 64, dtype=torch.float32))
    with pytest.raises(RuntimeError, match="v must have as many heads as k"):
        attention(q, k, _rand(1, 7, 1, 64, dtype=torch.float32))
    with pytest.raises(RuntimeError, match="k and v must have the same sequence length"):
        attention(q, k, _rand(1, 6, 2, 64, dtype=torch.float32))
    with pytest.raises(RuntimeError, match="k and v must have the batch size of q"):
        attention(q, torch.cat([k, k]), torch.cat([v, v]))
    with pytest.raises(RuntimeError, match="k must have the dtype of q"):
        attention(q, k.half(), v)
    with pytest.raises(RuntimeError, match="v must have the dtype of q"):
        attention(q, k, v.bfloat16())
    with pytest.raises(RuntimeError, match="q must be one of float32, float16, bfloat16"):
        attention(q.double(), k.double(), v.double())
    with pytest.raises(RuntimeError, match="q must be contiguous in its last dimension"):
        attention(_rand(1, 5, 64, 4, dtype=torch.float32).transpose(2, 3), k, v)
    with pytest.raises(RuntimeError, match="k must be contiguous in its last dimension"):
        attention(q, _rand(1, 7, 64, 2, dtype=torch.float32).transpose(2, 3), v)
    with pytest.raises(RuntimeError, match="v must be contiguous in its last dimension"):
        attention(q, k, _rand(1, 7, 64, 2, dtype=torch.float32).transpose(2, 3))
    with pytest.raises(RuntimeError, match="k must be on the same device as q"):
        attention(q, k.to("meta"), v)
    with pytest.raises(RuntimeError, match="v must be on the same device as q"):
        attention(q, k, v.to("meta"))
    if CUDA:
        with pytest.raises(RuntimeError, match="k must be on the same device as q"):
            attention(q.cuda(), k, v.cuda())


def test_bad_values():
    q, k, v = _good()
    with pytest.raises(ValueError, match="window_left must be -1"):
        attention(q, k, v, window_left=-2)
    with pytest.raises(ValueError, match="softcap must be finite and >= 0"):
        attention(q, k, v, softcap=-1.0)
    with pytest.raises(ValueError, match="softcap must be finite"):
        attention(q, k, v, softcap=float("inf"))
    with pytest.raises(ValueError, match="scale must be finite"):
        attention(q, k, v, scale=float("nan"))
    with pytest.raises(ValueError, match="scale must be finite"):
        attention(q, k, v, scale=float("inf"))


def test_bad_cu_seqlens():
    q, k, v, cq, ck = _good_ragged()
    qp, kp, vp = _good()
    with pytest.raises(RuntimeError, match="only for ragged"):
        attention(qp, kp, vp, cu_seqlens_q=cq, cu_seqlens_k=ck)
    with pytest.raises(RuntimeError, match="needs both cu_seqlens_q and cu_seqlens_k"):
        attention(q, k, v, cu_seqlens_q=cq)
    with pytest.raises(RuntimeError, match="needs both"):
        attention(q, k, v)
    with pytest.raises(RuntimeError, match="cu_seqlens_q must be int32"):
        attention(q, k, v, cu_seqlens_q=cq.long(), cu_seqlens_k=ck)
    with pytest.raises(RuntimeError, match="cu_seqlens_k must be int32"):
        attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck.float())
    with pytest.raises(RuntimeError, match="cu_seqlens_q must be 1-D"):
        attention(q, k, v, cu_seqlens_q=cq[None], cu_seqlens_k=ck)
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0"):
        attention(q, k, v, cu_seqlens_q=torch.tensor([1, 2, 5], dtype=torch.int32), cu_seqlens_k=ck)
    with pytest.raises(ValueError, match="cu_seqlens_k must be non-decreasing"):
        attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=torch.tensor([0, 5, 3, 7], dtype=torch.int32)[[0, 1, 3]] * 0
                  + torch.tensor([0, 8, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens_q last entry must equal the number of tokens in q \(5\)"):
        attention(q, k, v, cu_seqlens_q=torch.tensor([0, 2, 4], dtype=torch.int32), cu_seqlens_k=ck)
    with pytest.raises(ValueError, match=r"cu_seqlens_k last entry must equal the number of tokens in k \(7\)"):
        attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=torch.tensor([0, 3, 9], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="must have the same length"):
        attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=torch.tensor([0, 7], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="cu_seqlens_q must be on the same device as q"):
        attention(q, k, v, cu_seqlens_q=cq.to("meta"), cu_seqlens_k=ck)


# --------------------------------------------------------------------------- CUDA
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and a CUDA build of ttscale")


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("cfg", PADDED, ids=lambda c: "B{}_q{}_k{}_h{}x{}_d{}_c{}_w{}_s{}".format(*c[:9]))
def test_padded_cuda_vs_reference_and_cpu(dtype, cfg):
    B, Sq, Sk, Hq, Hkv, D, causal, wl, sc, scale = cfg
    q = _rand(B, Sq, Hq, D, dtype=dtype)
    k = _rand(B, Sk, Hkv, D, dtype=dtype, scale=1.5)
    v = _rand(B, Sk, Hkv, D, dtype=dtype)
    kw = dict(causal=causal, window_left=wl, softcap=sc, scale=scale)
    out, lse = attention(q.cuda(), k.cuda(), v.cuda(), return_lse=True, **kw)
    _check(out, lse, q, k, v, ref_kwargs=kw)
    co, cl = attention(q, k, v, return_lse=True, **kw)
    factor, floor = BOUND[dtype]
    assert (out.cpu().double() - co.double()).abs().max().item() <= 2 * floor + 2 * (co.double().abs().max().item()) * (
        2 ** -8 if dtype != torch.float32 else 1e-6)
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(cl))


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_ragged_cuda_vs_reference_and_cpu(dtype):
    g = torch.Generator().manual_seed(2)
    lens_q = torch.randint(0, 90, (37,), generator=g).tolist()
    lens_k = [lq + int(torch.randint(0, 200, (1,), generator=g)) for lq in lens_q]
    lens_q[0] = 0
    lens_q[1], lens_k[1] = 4, 0
    q, k, v, cq, ck = _ragged(37, 8, 2, 128, dtype, lens_q, lens_k)
    kw = dict(causal=True, window_left=50, softcap=10.0, cu_seqlens_q=cq, cu_seqlens_k=ck)
    out, lse = attention(q.cuda(), k.cuda(), v.cuda(), return_lse=True,
                         **{**kw, "cu_seqlens_q": cq.cuda(), "cu_seqlens_k": ck.cuda()})
    _check(out, lse, q, k, v, ref_kwargs=kw)
    co, cl = attention(q, k, v, return_lse=True, **kw)
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(cl))
    fin = torch.isfinite(cl)
    assert (lse.cpu()[fin] - cl[fin]).abs().max().item() < 1e-3


def test_thread_count_invariant_cpu():
    # units are independent: the result must not depend on how they are split across threads
    q, k, v, cq, ck = _ragged(5, 8, 2, 128, torch.bfloat16, [100, 0, 33, 250, 7], [100, 3, 40, 250, 90])
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        o1, l1 = attention(q, k, v, causal=True, cu_seqlens_q=cq, cu_seqlens_k=ck, return_lse=True)
        torch.set_num_threads(max(2, prev))
        o2, l2 = attention(q, k, v, causal=True, cu_seqlens_q=cq, cu_seqlens_k=ck, return_lse=True)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
