"""Every strategy end to end on the built-in engine + PRM + task (skipped until they exist in the
build): well-formed results, the prompt prefilled once, no nodes or KV pages left after a search."""
import pytest

from ttscale.search import DVTS, MCTS, BeamSearch, BestOfN, Budget, ParticleFilter, Rebase, SelfConsistency

tasks = pytest.importorskip("ttscale.tasks")


@pytest.fixture(scope="module")
def setup():
    from ttscale.search.engine_adapter import EngineGenerator, PRMVerifier, load_engine_and_prm

    try:
        engine, prm = load_engine_and_prm()
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"built-in engine / checkpoints not available: {e}")
    gen = EngineGenerator(engine, step_delimiter=tasks.STEP_DELIMITER, max_step_tokens=24, max_new_tokens=160,
                          extract_answer=tasks.extract_answer)
    return engine, gen, PRMVerifier(prm, engine.tokenizer, step_delimiter=tasks.STEP_DELIMITER)


def _live_pages(engine):
    return getattr(getattr(engine, "pool", None), "num_used", None)


@pytest.mark.parametrize("strategy", [BestOfN("verifier"), BestOfN("majority"), SelfConsistency(), BeamSearch(2),
                                      DVTS(2), Rebase(), ParticleFilter(), MCTS()],
                         ids=["bon", "majority", "sc", "beam", "dvts", "rebase", "pf", "mcts"])
def test_strategy_on_builtin_engine(setup, strategy):
    engine, gen, prm = setup
    problem = tasks.generate_problems(1, seed=1_000_003)[0]
    pages0 = _live_pages(engine)
    res = strategy.run(gen, problem.prompt, Budget(n=4), prm, seed=0)
    assert gen.live_nodes() == 0
    if pages0 is not None:
        assert _live_pages(engine) == pages0, "KV pages leaked"
    assert res.candidates and res.stop_reason in ("finished", "settled", "max_depth")
    n_prompt = len(engine.tokenizer.encode(problem.prompt))
    assert n_prompt <= res.meter.prefill_tokens <= n_prompt + 1  # prefilled once (+ BOS)
    assert res.meter.generated_tokens > 0
    for c in res.candidates:
        assert all(0.0 <= s <= 1.0 for s in c.step_scores)
        if c.finished and c.answer is not None:
            assert str(tasks.extract_answer(c.text)) == c.answer
