"""Edge cases of the engine, its search adapter and the demo CLI (findings of a randomized fuzz of
the Python engine / search layer): KV pages leaked when a batched re-prefill fails half-way, token
ids that are not ints, nodes handed to the wrong engine, and demo arguments that must be argparse
errors instead of tracebacks or silently replaced values.
"""
import pytest

from engine_helpers import make_model
from ttscale.engine import Engine, KVPoolExhausted
from ttscale.search.engine_adapter import ReprefillGenerator

_MODEL = make_model(layers=1, hidden=128, heads=2, kv_heads=1, inter=128, max_pos=128, seed=2)


def test_reprefill_extend_releases_what_it_prefilled_when_a_prefill_fails():
    """ReprefillGenerator.extend prefills every node, then extends; when the k-th prefill runs out of
    pages, the k-1 engine nodes already prefilled must be released (they are unreachable otherwise)."""
    eng = Engine(_MODEL, num_pages=8, page_size=4, eos_token_ids=())
    gen = ReprefillGenerator(eng, step_delimiter="\n", max_step_tokens=4, max_new_tokens=16)
    root = gen.root("12+34=5")  # BOS + 7 chars = 8 tokens = 2 pages; root's KV is dropped at once
    assert eng.pool.num_used == 0
    nodes = gen.fork(root, 5) + [root]  # 6 prefills x 2 pages > 8 pages
    with pytest.raises(KVPoolExhausted):
        gen.extend(nodes, seed=0)
    eng.pool.check_invariants()
    assert eng.pool.num_used == 0, "KV pages of the nodes prefilled before the failure leaked"
    gen.release(nodes)


@pytest.mark.parametrize("bad", [[1, 3.7, 5], [True, 5], [1, False]])
def test_non_int_token_ids_are_rejected(bad):
    """Floats are not truncated and bools are not ids 1 / 0 (forward_tokens rejects floats too)."""
    eng = Engine(_MODEL, num_pages=16, page_size=4, eos_token_ids=())
    with pytest.raises(ValueError, match="prompt_ids"):
        eng.prefill(bad)
    node = eng.prefill([1, 4, 5])
    with pytest.raises(ValueError, match="token_ids"):
        eng.append(node, bad)
    assert eng.tokens(node) == [1, 4, 5]
    eng.release([node])
    eng.pool.check_invariants()
    assert eng.pool.num_used == 0


def test_node_of_another_engine_is_rejected():
    """A Node belongs to the engine that made it: another engine must refuse it instead of releasing
    or running its own sequence that happens to have the same id."""
    a_eng = Engine(_MODEL, num_pages=16, page_size=4, eos_token_ids=())
    b_eng = Engine(_MODEL, num_pages=16, page_size=4, eos_token_ids=())
    a = a_eng.prefill([1, 4, 5, 6, 7, 8])
    b = b_eng.prefill([1, 9, 9, 9, 9, 9, 9, 9, 9])
    with pytest.raises((ValueError, TypeError)):
        a_eng.extend([b], max_new_tokens=2, seed=0)
    with pytest.raises((ValueError, TypeError)):
        a_eng.release([b])
    assert b.alive and a.alive
    assert a_eng.pool.num_used == 2 and b_eng.pool.num_used == 3
    a_eng.extend([a], max_new_tokens=2, seed=0)
    a_eng.release([a])
    b_eng.release([b])
    assert a_eng.pool.num_used == 0 and b_eng.pool.num_used == 0


@pytest.mark.parametrize("args", [
    ["--budgets", "a"],
    ["--budgets", "1", "--strategies", "foo"],
    ["--budgets", "1", "--problems", "-3"],
    ["--budgets", "1", "--problems", "0"],   # was silently replaced by the default (40 problems)
    ["--max-budget", "0"],                   # was silently replaced by the default (budgets 1..64)
    ["--budgets", "2", "--strategies", "beam", "--beam-width", "0"],
])
def test_demo_bad_arguments_are_argparse_errors(args, capsys):
    from ttscale import demo

    base = ["--simulate", "--no-progress", "--plot", "", "--problems", "1", "--strategies", "majority"]
    with pytest.raises(SystemExit) as e:
        demo.main(base + args)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("reprefill", [False, True])
def test_generator_steps_stop_at_max_new_tokens(reprefill):
    """Each step asks the engine for at most the tokens left under max_new_tokens (it asked for
    max_step_tokens, so a solution could run max_step_tokens - 1 past the cap)."""
    from ttscale.engine import SamplingParams
    from ttscale.search import BestOfN, Budget
    from ttscale.search.engine_adapter import EngineGenerator

    eng = Engine(_MODEL, num_pages=64, page_size=4, eos_token_ids=())
    cls = ReprefillGenerator if reprefill else EngineGenerator
    gen = cls(eng, step_delimiter="\n", max_step_tokens=12, max_new_tokens=5, sampling=SamplingParams(temperature=1.0))
    res = BestOfN("majority").run(gen, "12+34=", Budget(n=3), None, seed=0)
    assert res.candidates and all(len(_MODEL.tokenizer.encode(c.text)) <= 5 for c in res.candidates)
    assert eng.pool.num_used == 0


def test_infinite_and_nan_scores():
    """+inf is the best score (it got zero weight in REBASE's softmax); NaN has no order, so a verifier
    that returns it is an error (BestOfN and MCTS picked arbitrarily among NaNs)."""
    import math

    import numpy as np

    from ttscale.search.allocate import allocate, softmax
    from ttscale.search.base import Verifier

    assert allocate([0.5, math.inf], 4, "rebase").tolist() == [0, 4]
    assert softmax(np.array([1.0, math.inf, math.inf])).tolist() == [0.0, 0.5, 0.5]
    with pytest.raises(ValueError, match="nan"):
        softmax(np.array([math.nan, 1.0]))

    class NaNVerifier(Verifier):
        def _step_scores(self, gen, nodes):
            return [[0.5, math.nan] for _ in nodes]

    with pytest.raises(ValueError, match="NaNVerifier: step scores of node 0 contain NaN"):
        NaNVerifier().step_scores(None, [object()])


def test_extend_stop_arguments():
    """None means no stops (it was a bare TypeError); stop ids must be integers like token ids."""
    eng = Engine(_MODEL, num_pages=16, page_size=4, eos_token_ids=())
    node = eng.prefill([1, 4, 5])
    (r,) = eng.extend([node], max_new_tokens=2, stop_token_ids=None, stop_strings=None, seed=0)
    assert r.stop_reason == "length" and len(r.token_ids) == 2
    with pytest.raises(ValueError, match="stop_token_ids must be integer token ids, got 2.5"):
        eng.extend([node], max_new_tokens=2, stop_token_ids=[2.5], seed=0)
    with pytest.raises(ValueError, match=r"max_new_tokens has 2 entries for 1 nodes"):
        eng.extend([node], max_new_tokens=[1, 2], seed=0)
    eng.release([node])
