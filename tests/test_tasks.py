"""The built-in modular-arithmetic task: generator, exact step checker, answer extraction."""
import random

import pytest

from ttscale import tasks
from ttscale.tasks import modarith


def _value(a, op, b, p):
    # independent of the module's helper: Python's big-int arithmetic then a non-negative residue
    return {"+": a + b, "-": a - b, "*": a * b}[op] % p


@pytest.mark.parametrize("difficulty", [1, 3, 6, 12])
def test_gold_solutions_are_correct_and_well_formed(difficulty):
    probs = tasks.generate_problems(97, difficulty=difficulty, seed=difficulty)
    tok = tasks.make_tokenizer()
    for pr in probs:
        assert pr.difficulty == difficulty
        assert pr.prompt.endswith("\n") and pr.prompt.count("\n") == 1
        assert "".join(pr.steps) == pr.solution
        assert len(pr.steps) == difficulty + 1
        assert all(s.endswith(tasks.STEP_DELIMITER) and s.count("\n") == 1 for s in pr.steps)
        assert tasks.check_steps(pr, pr.solution) == [True] * (difficulty + 1)
        assert tasks.check_answer(pr, pr.solution)
        x = pr.start
        for op, b in pr.ops:
            x = _value(x, op, b, pr.modulus)
        assert pr.answer == x == tasks.extract_answer(pr.solution)
        assert tok.decode(tok.encode(pr.prompt + pr.solution)) == pr.prompt + pr.solution
        # the prompt states the whole problem
        assert pr.prompt == (f"mod {pr.modulus}: {pr.start} " +
                             " ".join(f"{'abcdefghijkl'[i]}{o}{b}" for i, (o, b) in enumerate(pr.ops)) + "\n")


def test_generator_is_seeded_and_covers_the_ops():
    a = tasks.generate_problems(50, seed=7)
    assert a == tasks.generate_problems(50, seed=7)
    assert a != tasks.generate_problems(50, seed=8)
    mixed = tasks.generate_problems(300, difficulty=(2, 5), seed=1)
    assert {p.difficulty for p in mixed} == {2, 3, 4, 5}
    ops = [o for p in mixed for o in p.ops]
    assert {o for o, _ in ops} == set("+-*")
    assert all((2 if o == "*" else 1) <= b < tasks.DEFAULT_MODULUS for o, b in ops)


def test_wrong_result_marks_that_step_and_the_next():
    rng = random.Random(3)
    for pr in tasks.generate_problems(60, difficulty=5, seed=11, modulus=13):
        k = rng.randrange(5)
        lines = list(pr.steps)
        body, c = lines[k][:-1].split("=")
        wrong = (int(c) + rng.randrange(1, 13)) % 13
        lines[k] = f"{body}={wrong}\n"
        flags = tasks.check_steps(pr, "".join(lines))
        # line k is wrong; line k+1 starts from the true value, not the written one, so it is wrong
        # too; from k+2 on the lines continue correctly from line k+1's (correct) written result
        expect = [True] * 6
        expect[k] = False
        expect[k + 1] = False
        assert flags == expect
        assert tasks.prefix_correct(flags) == [i < k for i in range(6)]
        # the answer line was left as in the gold solution: the outcome check only sees the value
        assert tasks.check_answer(pr, "".join(lines))


def test_continuing_from_a_wrong_state_is_locally_correct_and_answer_wrong():
    rng = random.Random(5)
    for pr in tasks.generate_problems(60, difficulty=6, seed=12, modulus=11):
        k = rng.randrange(6)
        lines, x = [], pr.start
        for i, (op, b) in enumerate(pr.ops):
            y = _value(x, op, b, 11)
            if i == k:
                y = (y + rng.randrange(1, 11)) % 11
            lines.append(f"{'abcdef'[i]}: {x}{op}{b}={y}\n")
            x = y
        lines.append(f"Answer: {x}\n")
        text = "".join(lines)
        expect = [i != k for i in range(7)]
        assert tasks.check_steps(pr, text) == expect
        # every operation is a bijection mod a prime, so one wrong step always changes the answer
        assert not tasks.check_answer(pr, text)
        assert tasks.extract_answer(text) == x != pr.answer


def test_malformed_lines_extra_lines_and_partial_text():
    pr = tasks.make_problem(7, [("+", 5), ("*", 3)], modulus=13)
    assert pr.solution == "a: 7+5=12\nb: 12*3=10\nAnswer: 10\n"
    assert pr.prompt == "mod 13: 7 a+5 b*3\n"
    cases = {
        "a: 7+5=12\nb: 12*3=10\nAnswer: 10\n": [True, True, True],
        "a: 7+5=12\nb: 12*3=10\nAnswer: 10\nAnswer: 10\n": [True, True, True, False],
        "a: 7+5=12\nb: 12*3=10\nAnswer: 1": [True, True, False],       # unterminated: checked as written
        "a: 7+5=12\nb: 12*3=10\nAnswer: 9\n": [True, True, False],
        "a: 7+5=012\nb: 12*3=10\n": [False, False],                    # non-canonical number: no state
        "a: 7+5=25\nb: 25*3=10\n": [False, False],                     # out of range: no state either
        "a: 7 +5=12\nb: 12*3=10\n": [False, False],                    # malformed: carries no state
        "a: 7+5=12\nb: 12*4=9\n": [True, False],                       # wrong operand (48 = 9 mod 13)
        "a: 7+5=12\nb: 12+3=2\n": [True, False],                       # wrong operator
        "a: 7+5=12\nc: 12*3=10\n": [True, False],                      # wrong label
        "b: 7+5=12\nb: 12*3=10\n": [False, True],                      # wrong label, right value
        "": [],
    }
    for text, flags in cases.items():
        assert tasks.check_steps(pr, text) == flags, text
    assert tasks.split_steps("a\nb\nc") == ["a\n", "b\n", "c"]
    assert tasks.split_steps("a\n\nb\n") == ["a\n", "\n", "b\n"]
    for t in cases:
        assert "".join(tasks.split_steps(t)) == t
    assert tasks.extract_answer("x\nAnswer: 3\nAnswer: 11\n") == 11
    assert tasks.extract_answer("no answer") is None
    assert not tasks.check_answer(pr, "")


def test_bad_input():
    with pytest.raises(ValueError, match="modulus"):
        tasks.make_problem(1, [("+", 1)], modulus=12)
    with pytest.raises(ValueError, match="start"):
        tasks.make_problem(13, [("+", 1)])
    with pytest.raises(ValueError, match=r"\*1"):
        tasks.make_problem(1, [("*", 1)])
    with pytest.raises(ValueError, match="operations"):
        tasks.make_problem(1, [])
    with pytest.raises(ValueError, match="difficulty"):
        tasks.generate_problems(3, difficulty=0)
    with pytest.raises(ValueError, match="difficulty"):
        tasks.generate_problems(3, difficulty=(5, 2))
    with pytest.raises(ValueError, match="n must"):
        tasks.generate_problems(-1)
    assert modarith.DEFAULT_DIFFICULTY == tasks.DEFAULT_DIFFICULTY
