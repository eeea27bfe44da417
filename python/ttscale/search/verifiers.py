"""Model-free verifiers that work with any ``Generator``."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

from .base import Generator, Node, Verifier

__all__ = ["ExactVerifier"]


class ExactVerifier(Verifier):
    """An exact checker over the generated text: ``check(text) -> bool`` scores a finished node 1/0;
    ``check_steps(text) -> list[bool]`` (optional, e.g. a task's step checker) gives per-step scores,
    turned into "every step so far correct" so that "last" aggregation is the prefix's correctness.
    Without ``check_steps`` an unfinished node scores 0.5 (unknown) and a finished one check(text).
    Typical wiring: ``ExactVerifier(lambda t: task.check_answer(problem, t),
    lambda t: task.check_steps(problem, t))``."""
    kind = "exact"

    def __init__(self, check: Callable[[str], bool], check_steps: Optional[Callable[[str], Sequence[bool]]] = None,
                 aggregate: str = "last") -> None:
        super().__init__(aggregate)
        if not callable(check):
            raise ValueError("ExactVerifier: check must be callable(text) -> bool")
        self.check, self.check_steps = check, check_steps

    def _step_scores(self, gen: Generator, nodes: Sequence[Node]) -> List[List[float]]:
        out = []
        for x in nodes:
            text, fin = gen.text(x), gen.finished(x)
            if self.check_steps is not None:
                ok, s = True, []
                for f in self.check_steps(text):
                    ok = ok and bool(f)
                    s.append(1.0 if ok else 0.0)
                if fin:
                    s = (s[:-1] if s else []) + [1.0 if self.check(text) else 0.0]
                out.append(s)
            else:
                out.append([(1.0 if self.check(text) else 0.0) if fin else 0.5])
        return out
