"""One tensor on ``meta``, the rest on CPU: every op must raise its "same device" error.

Such a call dispatches to the op's fake kernel (the Meta key wins), so the real kernel's device check
never runs. Before the fakes checked devices (python/ttscale/ops/_checks.py), the in-place ops
(append_paged_kv, copy_pages, merge_attention_states_, update_page_summaries) silently did nothing
and the functional ones (merge_attention_states, quant_matmul, sample, ...) returned uninitialised
memory on the CPU. Each case moves one argument at a time to meta.
"""
import pytest
import torch

import ttscale.ops as ops


def _paged():
    g = torch.Generator().manual_seed(0)
    kc, vc = torch.randn(6, 4, 2, 64, generator=g), torch.randn(6, 4, 2, 64, generator=g)
    return dict(kc=kc, vc=vc, ip=torch.tensor([0, 2, 3], dtype=torch.int32), ix=torch.tensor([0, 1, 2], dtype=torch.int32),
                last=torch.tensor([3, 4], dtype=torch.int32), q=torch.randn(2, 4, 64, generator=g))


def _cases():
    p = _paged()
    qw = ops.quantize(torch.randn(32, 64), bits=4, group_size=32)
    a, b, la, lb = torch.randn(3, 2, 64), torch.randn(3, 2, 64), torch.zeros(3, 2), torch.zeros(3, 2)
    x = torch.randn(2, 50)
    s = ops.new_page_summaries(p["kc"])
    yield "attention", lambda m: ops.attention(m(torch.randn(1, 3, 2, 64)), torch.randn(1, 5, 2, 64),
                                               torch.randn(1, 5, 2, 64))
    yield "paged_attention", lambda m: ops.paged_attention(p["q"], p["kc"], p["vc"], m(p["ip"]), p["ix"], p["last"])
    yield "merge_attention_states", lambda m: ops.merge_attention_states(a, la, b, m(lb))
    yield "merge_attention_states_", lambda m: ops.merge_attention_states_(a.clone(), la.clone(), m(b), m(lb))
    yield "append_paged_kv", lambda m: ops.append_paged_kv(m(torch.randn(2, 2, 64)), torch.randn(2, 2, 64), p["kc"].clone(),
                                                           p["vc"].clone(), p["ip"], p["ix"], p["last"])
    yield "append_paged_kv (indptr)", lambda m: ops.append_paged_kv(torch.randn(2, 2, 64), torch.randn(2, 2, 64),
                                                                    p["kc"].clone(), p["vc"].clone(), m(p["ip"]), p["ix"],
                                                                    p["last"])
    yield "copy_pages", lambda m: ops.copy_pages(p["kc"].clone(), p["vc"].clone(), m(torch.tensor([0])), torch.tensor([3]))
    yield "quant_matmul", lambda m: torch.ops.ttscale.quant_matmul(torch.randn(2, 64), m(qw.packed), qw.scales, qw.zeros,
                                                                   4, 32, None)
    yield "sample", lambda m: ops.sample(x, seed=1, top_p=m(torch.full((2,), 0.9)))
    yield "sample (indices)", lambda m: ops.sample(x, seed=1, indices=m(torch.tensor([0, 1, 1])))
    yield "token_logprobs", lambda m: ops.token_logprobs(x, m(torch.tensor([1, 2])))
    yield "speculative_verify", lambda m: ops.speculative_verify(torch.tensor([[1]]), torch.softmax(x[:1, None], -1),
                                                                 m(torch.softmax(torch.randn(1, 2, 50), -1)), seed=1)
    yield "new_page_summaries", lambda m: ops.new_page_summaries(p["kc"], m(torch.full((6,), 4)))
    yield "update_page_summaries", lambda m: ops.update_page_summaries(p["kc"], s.clone(), m(torch.tensor([1])))
    yield "sparse_paged_attention", lambda m: ops.sparse_paged_attention(p["q"], p["kc"], p["vc"], m(s), p["ip"], p["ix"],
                                                                         p["last"], top_k_pages=1)
    yield "attention_mass", lambda m: ops.attention_mass(p["q"], p["kc"], p["ip"], p["ix"], p["last"],
                                                         m(torch.zeros(2, 2, 1, dtype=torch.int32)))


CASES = list(_cases())


@pytest.mark.parametrize("name,call", CASES, ids=[c[0] for c in CASES])
def test_one_tensor_on_meta_is_an_error(name, call):
    call(lambda t: t)  # all on CPU: the call itself is valid
    with pytest.raises(RuntimeError, match="same device"):
        call(lambda t: t.to("meta"))
