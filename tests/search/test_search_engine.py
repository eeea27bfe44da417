"""Every strategy end to end on ttscale's engine (skipped while the engine is not in the build):
a small random-weight policy + PRM always, the built-in checkpoints when installed. Well-formed
results, the prompt prefilled once, no nodes or KV pages left after a search, the meter equal to the
engine's counters, and the re-prefill baseline running the same searches."""
import pytest
import torch

from ttscale.search import DVTS, MCTS, BeamSearch, BestOfN, Budget, ParticleFilter, Rebase, SelfConsistency

E = pytest.importorskip("ttscale.engine")
tasks = pytest.importorskip("ttscale.tasks")
if not all(hasattr(E, n) for n in ("Engine", "Transformer", "ModelConfig", "SamplingParams")):
    pytest.skip("ttscale.engine has no Engine yet", allow_module_level=True)

from ttscale.search.engine_adapter import EngineGenerator, PRMVerifier, ReprefillGenerator, load_engine_and_prm  # noqa: E402

STRATS = [BestOfN("verifier"), BestOfN("majority"), SelfConsistency(), BeamSearch(2), BeamSearch(2, lookahead=1),
          DVTS(2), Rebase(), ParticleFilter(), ParticleFilter("multinomial", ess_threshold=0.5), MCTS()]
IDS = ["bon", "majority", "sc", "beam", "beam-la", "dvts", "rebase", "pf", "pf-ess", "mcts"]


def _random_model(tok, num_labels=None, seed=0):
    cfg = E.ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, num_labels=num_labels)
    m = E.Transformer(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            norm = "layernorm" in name or name == "norm"
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if norm else 0.08 * torch.randn(p.shape, generator=g))
    m.tokenizer = tok
    return m.eval()


@pytest.fixture(scope="module", params=["random", "builtin"])
def setup(request):
    if request.param == "random":
        tok = tasks.make_tokenizer()
        engine, prm = E.Engine(_random_model(tok)), _random_model(tok, num_labels=1, seed=1)
    else:
        try:
            engine, prm = load_engine_and_prm()
        except (ImportError, FileNotFoundError) as e:
            pytest.skip(f"built-in checkpoints not installed: {e}")
    kw = dict(step_delimiter=tasks.STEP_DELIMITER, max_step_tokens=12, max_new_tokens=48,
              sampling=E.SamplingParams(temperature=1.0), extract_answer=tasks.extract_answer)
    return engine, kw, PRMVerifier(prm, engine.tokenizer, step_delimiter=tasks.STEP_DELIMITER)


@pytest.mark.parametrize("cls", [EngineGenerator, ReprefillGenerator], ids=["fork", "reprefill"])
@pytest.mark.parametrize("strategy", STRATS, ids=IDS)
def test_strategy_on_engine(setup, cls, strategy):
    engine, kw, prm = setup
    gen = cls(engine, **kw)
    problem = tasks.generate_problems(1, seed=1_000_003)[0]
    used0 = engine.pool.num_used
    c0 = {k: getattr(engine.counters, k) for k in ("prefill_tokens", "decoded_tokens")}
    res = strategy.run(gen, problem.prompt, Budget(n=4), prm, seed=0)
    assert gen.live_nodes() == 0 and engine.pool.num_used == used0, "nodes or KV pages leaked"
    assert res.candidates and res.stop_reason in ("finished", "settled", "max_depth")
    m = res.meter
    assert m.generated_tokens == engine.counters.decoded_tokens - c0["decoded_tokens"] > 0
    assert m.prefill_tokens == engine.counters.prefill_tokens - c0["prefill_tokens"]
    n_prompt = len(engine.tokenizer.encode(problem.prompt))
    if cls is EngineGenerator:
        assert n_prompt <= m.prefill_tokens <= n_prompt + 1  # prefilled once (+ BOS)
        assert m.kv_bytes_read <= m.kv_bytes_read_unshared and m.peak_kv_pages >= 1
    else:
        assert m.forks == 0 and m.prefill_tokens > n_prompt + 1
    for c in res.candidates:
        assert all(0.0 <= s <= 1.0 for s in c.step_scores)
        if c.finished and c.answer is not None:
            assert str(tasks.extract_answer(c.text)) == c.answer


@pytest.mark.parametrize("strategy", [BeamSearch(2), Rebase(), ParticleFilter()], ids=["beam", "rebase", "pf"])
def test_prm_kv_cache_gives_the_same_search_for_fewer_prm_tokens(setup, strategy):
    """The prefix-cached PRM (default) scores like a full re-read of every sequence (same results,
    step scores within float rounding) and runs fewer tokens; its pool is empty after begin_search."""
    engine, kw, prm = setup
    full = PRMVerifier(prm.model, engine.tokenizer, step_delimiter=tasks.STEP_DELIMITER, kv_cache=False)
    assert prm.scorer is not None and full.scorer is None
    problem = tasks.generate_problems(1, seed=1_000_033)[0]
    a = strategy.run(EngineGenerator(engine, **kw), problem.prompt, Budget(n=6), prm, seed=3)
    b = strategy.run(EngineGenerator(engine, **kw), problem.prompt, Budget(n=6), full, seed=3)
    assert [c.text for c in a.candidates] == [c.text for c in b.candidates]
    for ca, cb in zip(a.candidates, b.candidates):
        assert ca.step_scores == pytest.approx(cb.step_scores, abs=1e-5)
    assert 0 < a.meter.verifier_tokens < b.meter.verifier_tokens
    prm.begin_search()
    assert prm.scorer.pool.num_used == 0


def test_prm_kv_cache_smaller_than_a_batch_falls_back_to_full_reads(setup):
    engine, kw, prm = setup
    tiny = PRMVerifier(prm.model, engine.tokenizer, step_delimiter=tasks.STEP_DELIMITER, kv_budget_bytes=1)
    full = PRMVerifier(prm.model, engine.tokenizer, step_delimiter=tasks.STEP_DELIMITER, kv_cache=False)
    assert tiny.scorer.pool.num_pages == 16  # the floor
    tiny.scorer = E.PrefixScorer(prm.model, num_pages=4)  # 64 tokens: a depth's batch cannot fit
    problem = tasks.generate_problems(1, seed=1_000_037)[0]
    a = BeamSearch(2).run(EngineGenerator(engine, **kw), problem.prompt, Budget(n=6), tiny, seed=5)
    b = BeamSearch(2).run(EngineGenerator(engine, **kw), problem.prompt, Budget(n=6), full, seed=5)
    assert [c.text for c in a.candidates] == [c.text for c in b.candidates]
    for ca, cb in zip(a.candidates, b.candidates):
        assert ca.step_scores == pytest.approx(cb.step_scores, abs=1e-5)
    assert tiny.scorer.evictions > 0
    tiny.scorer.pool.check_invariants()
