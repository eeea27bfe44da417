"""Attention edge cases that randomized differential testing against the float64 references found
(every CPU SIMD path). Small, deterministic, CPU only.

* ``window_left`` near INT64_MAX (``sys.maxsize`` as "no window"): queries at negative positions
  (non-causal, more queries than keys) must still see every key; ``q_pos - window_left`` must not
  overflow.
* Dense attention with a large ``softcap``: the error must stay within the float32 bound of
  ``test_attention.py`` (2x plain torch + 2e-5), as it does for ``paged_attention``.
(Mixed-device inputs: tests/ops/test_mixed_devices.py.)
"""
import sys

import pytest
import torch

from ttscale.ops import attention, paged_attention
from ttscale.reference.attention import attention_ref
from ttscale.reference.paged_attention import paged_attention_ref

BIG_WINDOWS = [2**62, sys.maxsize]


@pytest.mark.parametrize("wl", BIG_WINDOWS, ids=["2^62", "maxsize"])
def test_dense_huge_window_equals_no_window(cpu_isa, wl):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, s, 2, 64, generator=g) for s in (5, 2, 2))
    o, l = attention(q, k, v, window_left=wl, return_lse=True)
    ro, rl = attention_ref(q, k, v)  # a window wider than any distance is no window
    assert torch.isfinite(l).all()
    torch.testing.assert_close(o.double(), ro, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(l.double(), rl, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("wl", BIG_WINDOWS, ids=["2^62", "maxsize"])
def test_paged_huge_window_equals_no_window(cpu_isa, wl):
    g = torch.Generator().manual_seed(4)
    kc, vc = torch.randn(1, 4, 2, 64, generator=g), torch.randn(1, 4, 2, 64, generator=g)
    ip, ix, last = (torch.tensor(x, dtype=torch.int32) for x in ([0, 1], [0], [2]))
    q, qo = torch.randn(5, 2, 64, generator=g), torch.tensor([0, 5], dtype=torch.int32)
    o, l = paged_attention(q, kc, vc, ip, ix, last, qo_indptr=qo, causal=False, window_left=wl, return_lse=True)
    ro, rl = paged_attention_ref(q, kc, vc, ip, ix, last, qo_indptr=qo, causal=False)
    assert torch.isfinite(l).all()
    torch.testing.assert_close(o.double(), ro, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(l.double(), rl, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("cap", [1e3, 1e4])
def test_dense_softcap_large_cap_accuracy(cpu_isa, cap):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, s, 4, 64, generator=g) for s in (33, 130, 130))
    out, lse = attention(q, k, v, softcap=cap, return_lse=True)
    ro, rl = attention_ref(q, k, v, softcap=cap)
    po, _ = attention_ref(q, k, v, softcap=cap, compute_dtype=torch.float32)
    bound = 2 * (po.double() - ro).abs().max().item() + 2e-5  # test_attention.py BOUND[float32]
    err = (out.double() - ro).abs().max().item()
    assert err <= bound, f"max abs error {err:.3g} > bound {bound:.3g} (softcap={cap})"
    assert (lse.double() - rl).abs().max().item() <= 1e-4
