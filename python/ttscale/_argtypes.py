"""argparse types of the command-line tools: a bad value is an argparse error (usage + message,
exit code 2) instead of a traceback later or a value silently replaced by a default."""
from __future__ import annotations

import argparse
from typing import List


def _at_least(cast, kind: str, lo):
    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        if not v >= lo:  # also rejects NaN
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {text}")
        return v
    return parse


def int_at_least(lo: int):
    """An int >= lo."""
    return _at_least(int, "an integer", lo)


def float_at_least(lo: float):
    """A float >= lo (NaN rejected)."""
    return _at_least(float, "a number", lo)


def budget_list(text: str) -> List[int]:
    """Comma-separated ints >= 1."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected comma-separated integers >= 1")
    return [int_at_least(1)(x) for x in items]


def difficulty(text: str) -> int:
    """A task difficulty of the built-in task: 1..MAX_DIFFICULTY operations."""
    from ttscale.tasks import modarith

    v = int_at_least(1)(text)
    if v > modarith.MAX_DIFFICULTY:
        raise argparse.ArgumentTypeError(f"must be in 1..{modarith.MAX_DIFFICULTY}, got {v}")
    return v
