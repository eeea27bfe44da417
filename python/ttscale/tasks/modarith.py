"""Multi-step modular arithmetic: the built-in reasoning task, with exact step-level checking.

A problem is a start value and a chain of labelled operations modulo a prime ``p`` (default 7)::

    prompt   = "mod 7: 3 a+5 b*3 c-4 d*2 e+6 f*6\\n"
    solution = "a: 3+5=1\\nb: 1*3=3\\nc: 3-4=6\\nd: 6*2=5\\ne: 5+6=4\\nf: 4*6=3\\nAnswer: 3\\n"

The worked solution has ONE STEP PER LINE (``STEP_DELIMITER = "\\n"``): one line per operation,
``"{label}: {a}{op}{b}={c}"`` with ``label = LABELS[i]`` (the operation's label in the prompt),
``c = (a op b) mod p`` and ``a`` the previous line's result (the start value for the first line),
then a final answer line ``"Answer: {c}"`` repeating the last result. The policy emits EOS after the
answer line. Lines are short (9-12 characters), so a step is cheap to branch on. The labels let a
small model find the operation of a line by content instead of by counting lines.

Every operand is a bijection of Z_p (``+b``/``-b`` with ``b`` in 1..p-1, ``*b`` with ``b`` in 2..p-1,
``p`` prime), so one wrong intermediate result followed by correct steps always gives a wrong final
answer: errors are step-local and never silently repaired by later steps (two errors can still
cancel by chance, as in real solutions).

Step correctness (``check_steps``), for the ``i``-th line of a completion (0-based), given the
*written* (possibly wrong) previous line:

* ``i < n`` (operation lines, ``n = len(problem.ops)``): correct iff the line is exactly
  ``"{LABELS[i]}: {a}{op}{b}={c}"`` in canonical decimal (no sign, no leading zeros), ``a`` equals the state
  before it (the start value for ``i = 0``, else the ``c`` written by line ``i-1``; if line ``i-1``
  is malformed there is no state and line ``i`` is incorrect), ``(op, b)`` is the problem's ``i``-th
  operation, and ``c == (a op b) mod p``. So a step that correctly continues from a wrong state is
  itself correct (the error belongs to the earlier step).
* ``i == n``: correct iff the line is exactly ``"Answer: {c}"`` with ``c`` the state it follows.
* ``i > n``: always incorrect (the solution should have stopped).

``prefix_correct(flags)`` turns those local flags into "every step so far is correct", the label the
built-in process reward model is trained on. A completion is right (``check_answer``) iff
``extract_answer`` (the value of the last ``"Answer: "`` line) equals ``problem.answer``.

The alphabet (``ALPHABET``) is fixed, so every prompt and solution encodes with the built-in
``CharTokenizer`` (``make_tokenizer()``).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

__all__ = [
    "ALPHABET", "LABELS", "STEP_DELIMITER", "ANSWER_PREFIX", "DEFAULT_MODULUS", "DEFAULT_DIFFICULTY",
    "MAX_DIFFICULTY", "Problem", "make_problem", "generate_problems", "split_steps", "extract_answer",
    "check_answer", "check_steps", "prefix_correct", "make_tokenizer", "solution_text",
]

STEP_DELIMITER = "\n"
ANSWER_PREFIX = "Answer: "
DEFAULT_MODULUS = 7
DEFAULT_DIFFICULTY = 6      # number of operations in a problem
MAX_DIFFICULTY = 12
OPS = "+-*"
# Every character a prompt or solution can contain; the tokenizer vocabulary is built from it.
ALPHABET = "0123456789+-*=: \nabcdefghijklAmnorsw"
LABELS = "abcdefghijkl"       # operation i is labelled LABELS[i] in the prompt and in its line

_OP_LINE = re.compile(r"([a-l]): (0|[1-9][0-9]*)([+\-*])(0|[1-9][0-9]*)=(0|[1-9][0-9]*)")
_ANSWER_LINE = re.compile(re.escape(ANSWER_PREFIX) + r"(0|[1-9][0-9]*)")
_ANY_ANSWER = re.compile(re.escape(ANSWER_PREFIX) + r"(-?[0-9]+)")


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, int(p ** 0.5) + 1))


def _apply(a: int, op: str, b: int, p: int) -> int:
    if op == "+":
        return (a + b) % p
    if op == "-":
        return (a - b) % p
    return (a * b) % p


@dataclass(frozen=True)
class Problem:
    """One problem. ``prompt`` ends with ``"\\n"``; ``solution`` is the worked solution (operation
    lines then the answer line, each ending in ``"\\n"``, no EOS); ``steps`` are its lines;
    ``start``/``ops``/``modulus`` define the problem; ``answer`` is the final value."""
    prompt: str
    solution: str
    answer: int
    steps: Tuple[str, ...]
    start: int
    ops: Tuple[Tuple[str, int], ...]
    modulus: int

    @property
    def difficulty(self) -> int:
        return len(self.ops)


def solution_text(start: int, ops: Sequence[Tuple[str, int]], modulus: int) -> Tuple[List[str], int]:
    """The canonical solution lines (each ending in ``"\\n"``) and the final value."""
    lines, x = [], start
    for i, (op, b) in enumerate(ops):
        y = _apply(x, op, b, modulus)
        lines.append(f"{LABELS[i]}: {x}{op}{b}={y}{STEP_DELIMITER}")
        x = y
    lines.append(f"{ANSWER_PREFIX}{x}{STEP_DELIMITER}")
    return lines, x


def make_problem(start: int, ops: Sequence[Tuple[str, int]], *, modulus: int = DEFAULT_MODULUS) -> Problem:
    """Build a problem from an explicit start value and operation list (validated)."""
    if not _is_prime(modulus):
        raise ValueError(f"make_problem: modulus must be a prime (every step a bijection), got {modulus}")
    if not 0 <= start < modulus:
        raise ValueError(f"make_problem: start must be in [0, {modulus}), got {start}")
    if not 1 <= len(ops) <= MAX_DIFFICULTY:
        raise ValueError(f"make_problem: need 1..{MAX_DIFFICULTY} operations, got {len(ops)}")
    ops = tuple((str(op), int(b)) for op, b in ops)
    for op, b in ops:
        lo = 2 if op == "*" else 1
        if op not in OPS or not lo <= b < modulus:
            raise ValueError(f"make_problem: operation {op}{b} invalid; expected + or - with operand in "
                             f"1..{modulus - 1}, or * with operand in 2..{modulus - 1}")
    prompt = f"mod {modulus}: {start} " + " ".join(f"{LABELS[i]}{op}{b}" for i, (op, b) in enumerate(ops)) + STEP_DELIMITER
    lines, answer = solution_text(start, ops, modulus)
    return Problem(prompt=prompt, solution="".join(lines), answer=answer, steps=tuple(lines),
                   start=start, ops=ops, modulus=modulus)


def generate_problems(n: int, *, difficulty: int = DEFAULT_DIFFICULTY, seed: int = 0,
                      modulus: int = DEFAULT_MODULUS) -> List[Problem]:
    """``n`` random problems with ``difficulty`` operations each, reproducible from ``seed``.

    ``difficulty`` may also be a ``(lo, hi)`` tuple: each problem draws its number of operations
    uniformly from ``lo..hi`` (used for training on a mix of lengths)."""
    if n < 0:
        raise ValueError(f"generate_problems: n must be >= 0, got {n}")
    lo, hi = (difficulty, difficulty) if isinstance(difficulty, int) else tuple(difficulty)
    if not 1 <= lo <= hi <= MAX_DIFFICULTY:
        raise ValueError(f"generate_problems: difficulty must be in 1..{MAX_DIFFICULTY} (or a lo<=hi "
                         f"pair), got {difficulty!r}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(lo, hi)
        ops = []
        for _ in range(k):
            op = rng.choice(OPS)
            ops.append((op, rng.randint(2 if op == "*" else 1, modulus - 1)))
        out.append(make_problem(rng.randrange(modulus), ops, modulus=modulus))
    return out


def split_steps(text: str) -> List[str]:
    """Lines of a completion, each keeping its ``"\\n"``; a trailing unterminated remainder (a step
    still being generated) is the last element. ``"".join(split_steps(t)) == t``."""
    parts = text.split(STEP_DELIMITER)
    out = [p + STEP_DELIMITER for p in parts[:-1]]
    if parts[-1]:
        out.append(parts[-1])
    return out


def extract_answer(text: str) -> Optional[int]:
    """The integer of the last ``"Answer: N"`` in ``text`` (None when there is none)."""
    found = _ANY_ANSWER.findall(text)
    return int(found[-1]) if found else None


def check_answer(problem: Problem, completion: str) -> bool:
    """True iff the completion's extracted answer equals the problem's answer."""
    return extract_answer(completion) == problem.answer


def check_steps(problem: Problem, completion: str) -> List[bool]:
    """Local correctness of every line of ``completion`` (see the module docstring), one flag per
    element of ``split_steps(completion)``; an unterminated last line is checked as written."""
    flags = []
    state: Optional[int] = problem.start
    n, p = len(problem.ops), problem.modulus
    for i, line in enumerate(split_steps(completion)):
        body = line[:-1] if line.endswith(STEP_DELIMITER) else line
        if i < n:
            m = _OP_LINE.fullmatch(body)
            ok = False
            nxt = None
            if m is not None:
                a, op, b, c = int(m.group(2)), m.group(3), int(m.group(4)), int(m.group(5))
                nxt = c if c < p else None
                ok = (m.group(1) == LABELS[i] and state is not None and a == state and (op, b) == problem.ops[i]
                      and c == _apply(a, op, b, p))
            flags.append(ok)
            state = nxt
        elif i == n:
            m = _ANSWER_LINE.fullmatch(body)
            flags.append(m is not None and state is not None and int(m.group(1)) == state)
        else:
            flags.append(False)
    return flags


def prefix_correct(flags: Sequence[bool]) -> List[bool]:
    """``out[i] = all(flags[:i+1])``: every step up to and including ``i`` is correct."""
    out, ok = [], True
    for f in flags:
        ok = ok and bool(f)
        out.append(ok)
    return out


def make_tokenizer():
    """The built-in models' ``CharTokenizer``: ``<pad> <bos> <eos>`` then ``ALPHABET`` sorted."""
    from ..engine.tokenizer import CharTokenizer
    return CharTokenizer.from_alphabet(ALPHABET)
