"""Built-in reasoning tasks with exact step-level checking.

The default task is :mod:`ttscale.tasks.modarith` (multi-step modular arithmetic, one step per line);
its names are re-exported here so ``from ttscale.tasks import generate_problems, check_steps`` works.
"""
from .modarith import (  # noqa: F401
    ALPHABET, ANSWER_PREFIX, DEFAULT_DIFFICULTY, DEFAULT_MODULUS, MAX_DIFFICULTY, STEP_DELIMITER, Problem,
    check_answer, check_steps, extract_answer, generate_problems, make_problem, make_tokenizer,
    prefix_correct, solution_text, split_steps,
)
from . import modarith  # noqa: F401

__all__ = ["modarith", "ALPHABET", "ANSWER_PREFIX", "DEFAULT_DIFFICULTY", "DEFAULT_MODULUS", "MAX_DIFFICULTY",
           "STEP_DELIMITER", "Problem", "check_answer", "check_steps", "extract_answer", "generate_problems",
           "make_problem", "make_tokenizer", "prefix_correct", "solution_text", "split_steps"]
