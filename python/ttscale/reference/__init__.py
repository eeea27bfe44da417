"""Plain-torch references for ttscale's ops.

They are written from the documented semantics (``python/ttscale/ops/*.py`` docstrings), not from
the kernels, compute in float64 where that matters, and are used by the tests (as the ground truth)
and by ``bench/`` (as the plain-torch baselines).
"""
from .sampling import (
    filtered_probs,
    filtered_probs_with_ambiguity,
    sample_ref,
    speculative_verify_ref,
    speculative_position_laws,
    token_logprobs_ref,
)

__all__ = [
    "filtered_probs",
    "filtered_probs_with_ambiguity",
    "sample_ref",
    "token_logprobs_ref",
    "speculative_verify_ref",
    "speculative_position_laws",
]
