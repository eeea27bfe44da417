"""The engine adapter (EngineGenerator, ReprefillGenerator, PRMVerifier) against a fake engine that
implements the engine API: every strategy end to end, no leaked nodes or pages, costs read from the
engine's counters, PRM step scores at the delimiter positions, re-prefill costs more prefill."""
import math

import numpy as np
import pytest
import torch

from ttscale.search import (DVTS, MCTS, BeamSearch, BestOfN, Budget, ExactVerifier, ParticleFilter, Rebase,
                            SelfConsistency)
from ttscale.search.engine_adapter import (CostModel, EngineGenerator, PRMVerifier, ReprefillGenerator,
                                           default_extract_answer)

from .fake_engine import FakeEngine, FakePRM

PROMPT = "ss 7\n"
STRATS = [BestOfN("verifier"), BestOfN("majority"), SelfConsistency(wave=2), BeamSearch(2), BeamSearch(2, lookahead=1),
          DVTS(2), Rebase(), ParticleFilter(), ParticleFilter("multinomial", ess_threshold=0.5), MCTS()]
IDS = ["bon", "majority", "sc", "beam", "beam-la", "dvts", "rebase", "pf", "pf-ess", "mcts"]


def _setup(cls=EngineGenerator, **kw):
    eng = FakeEngine(difficulty=3.0)
    gen = cls(eng, max_step_tokens=16, max_new_tokens=64, **kw)
    return eng, gen, PRMVerifier(FakePRM(eng.tokenizer), eng.tokenizer)


def _line_ok_flags(text):
    ok, out = True, []
    for line in text.split("\n"):
        if not line:
            continue
        if line.startswith("s"):
            ok = ok and not line.endswith("9")
        out.append(ok)
    return out


@pytest.mark.parametrize("cls", [EngineGenerator, ReprefillGenerator])
@pytest.mark.parametrize("strategy", STRATS, ids=IDS)
def test_strategies_on_engine_api(cls, strategy):
    eng, gen, prm = _setup(cls)
    before = dict(vars(eng.counters))
    res = strategy.run(gen, PROMPT, Budget(n=4), prm, seed=3)
    assert not eng.live and eng.live_pages() == 0 and gen.live_nodes() == 0, "leaked nodes or pages"
    assert res.answer is not None and res.stop_reason in ("finished", "settled")
    for c in res.candidates:
        if c.finished:
            # the fake engine ends a solution with "Answer: <digit>\n": read it back independently of
            # the adapter's default_extract_answer (comparing with that would be circular)
            last = c.text.rstrip("\n").split("\n")[-1]
            assert c.text.endswith("\n") and last.startswith("Answer: ") and c.answer == last[len("Answer: "):]
            assert c.text.count("\n") == eng.n_lines + 1
    m = res.meter
    assert m.generated_tokens == eng.counters.decoded_tokens - before["decoded_tokens"]
    assert m.prefill_tokens == eng.counters.prefill_tokens - before["prefill_tokens"]
    if cls is EngineGenerator:
        assert m.prefill_tokens == len(PROMPT) + 1  # BOS + prompt, once
    else:
        assert m.forks == 0 and m.prefill_tokens > len(PROMPT) + 1


def test_reprefill_pays_for_prefixes_fork_does_not():
    out = {}
    for cls in (EngineGenerator, ReprefillGenerator):
        eng, gen, prm = _setup(cls)
        res = Rebase().run(gen, PROMPT, Budget(n=8), prm, seed=0)
        out[cls.__name__] = res.meter
    f, r = out["EngineGenerator"], out["ReprefillGenerator"]
    assert r.prefill_tokens > 5 * f.prefill_tokens
    assert f.kv_bytes_read < f.kv_bytes_read_unshared


def test_prm_scores_are_sigmoid_at_step_ends():
    eng, gen, prm = _setup()
    root = gen.root(PROMPT)
    kids = gen.fork(root, 6)
    while not all(gen.finished(k) for k in kids):
        gen.extend(kids, seed=1)
        for k, s in zip(kids, prm.step_scores(gen, kids)):
            flags = _line_ok_flags(gen.text(k))
            assert s == pytest.approx([1 / (1 + math.exp(-2.0 if f else 2.0)) for f in flags])
    toks = gen.tokens(kids[0])
    pos = prm.step_positions(toks, gen.prompt_len(kids[0]))
    nl = eng.tokenizer.encode("\n")[0]
    assert all(toks[p] == nl for p in pos) and len(pos) == eng.n_lines + 1
    calls = prm.model.calls
    prm.step_scores(gen, kids)  # cached: no new forward
    assert prm.model.calls == calls
    gen.release(kids + [root])
    assert not eng.live


def test_exact_verifier_with_step_checker():
    eng, gen, _ = _setup()
    answer = eng.answer
    ver = ExactVerifier(lambda t: default_extract_answer(t) == answer, _line_ok_flags)
    res = BestOfN("verifier").run(gen, PROMPT, Budget(n=6), ver, seed=2)
    for c in res.candidates:
        assert c.score == float(c.answer == answer)
    assert not eng.live


def test_cost_model_bounds_enforce_flop_and_kv_caps():
    cost = CostModel(n_params=1e4, kv_bytes_per_token=64, attn_flops_per_ctx_token=32)
    for cap in ("max_flops", "max_kv_bytes", "max_generated_tokens"):
        eng, gen, prm = _setup(cost=cost)
        free = Rebase().run(gen, PROMPT, Budget(n=6), prm, seed=0).meter
        used = {"max_flops": free.flops, "max_kv_bytes": free.kv_bytes_read,
                "max_generated_tokens": free.generated_tokens}[cap]
        eng, gen, prm = _setup(cost=cost)
        res = Rebase().run(gen, PROMPT, Budget(n=6, **{cap: used / 3}), prm, seed=0)
        got = {"max_flops": res.meter.flops, "max_kv_bytes": res.meter.kv_bytes_read,
               "max_generated_tokens": res.meter.generated_tokens}[cap]
        assert got <= used / 3 and res.stop_reason.startswith("budget:")
        assert not eng.live and eng.live_pages() == 0


def test_without_cost_model_flop_caps_stop_before_spending():
    eng, gen, prm = _setup()
    assert gen.cost is None
    res = Rebase().run(gen, PROMPT, Budget(n=4, max_flops=1e12), prm, seed=0)
    assert res.stop_reason.startswith("budget: FLOPs") and res.meter.generated_tokens == 0
    assert not eng.live


def test_adapter_rejects_bad_use():
    eng, gen, prm = _setup()
    with pytest.raises(ValueError, match="max_step_tokens"):
        EngineGenerator(eng, max_step_tokens=0)
    root = gen.root(PROMPT)
    gen.release([root])
    with pytest.raises(ValueError, match="not a live node"):
        gen.extend([root], seed=0)
    with pytest.raises(ValueError, match="one token"):
        PRMVerifier(FakePRM(eng.tokenizer), eng.tokenizer, step_delimiter="\n\n")


def test_bench_search_runs_on_the_engine_api():
    from ttscale.bench.search import run_bench

    class P:
        prompt, answer = PROMPT, "7"

    eng = FakeEngine(difficulty=3.0)
    rows = run_bench(eng, PRMVerifier(FakePRM(eng.tokenizer), eng.tokenizer), [P(), P()],
                     prompt_of=lambda p: p.prompt, is_correct=lambda p, a: a == p.answer, width=4, beam_width=2,
                     max_step_tokens=16, max_new_tokens=64)
    assert [(r["strategy"], r["mode"]) for r in rows] == [("beam", "fork"), ("beam", "reprefill"),
                                                         ("rebase", "fork"), ("rebase", "reprefill")]
    for fork, rep in zip(rows[::2], rows[1::2]):
        assert fork["prefill_tokens"] < rep["prefill_tokens"] and rep["forks"] == 0
        assert fork["speedup_wall_s"] is not None and 0 <= fork["accuracy"] <= 1
        # the fake engine samples from (seed, batch slot, position): both modes run the same search
        assert fork["gen_tokens"] == rep["gen_tokens"] and fork["accuracy"] == rep["accuracy"]
    assert not eng.live and eng.live_pages() == 0


def test_peak_pages_and_verifier_cost_are_per_search():
    eng, gen, prm = _setup()
    a = Rebase().run(gen, PROMPT, Budget(n=8), prm, seed=0).meter
    b = Rebase().run(gen, PROMPT, Budget(n=2), prm, seed=0).meter
    c = Rebase().run(gen, PROMPT, Budget(n=8), prm, seed=0).meter
    assert b.peak_kv_pages < a.peak_kv_pages  # not the engine's lifetime peak
    assert c.peak_kv_pages == a.peak_kv_pages and c.verifier_tokens == a.verifier_tokens > 0  # no cross-search cache


def test_fork_many_batches_the_forks_of_a_depth():
    eng, gen, prm = _setup()
    Rebase().run(gen, PROMPT, Budget(n=8), prm, seed=0)
    assert getattr(eng, "fork_many_calls", 0) >= 1 and not eng.live
