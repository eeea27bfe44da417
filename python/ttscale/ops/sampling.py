"""Batched sampling from logits or probabilities, without sorting the vocabulary.

Filters (each ``None``, a Python scalar, or a per-row tensor ``[B]``) are applied in this order,
each on the distribution renormalised by the ones before it, as vLLM and SGLang do:

1. ``temperature``: logits are divided by it; ``0`` means greedy (first argmax) for that row.
2. ``top_k``: keep the ``k`` most likely tokens; ``k <= 0`` disables, ``k >= V`` keeps all
   (it is clamped to V). Among tokens tied at the k-th value, lower token ids are kept first.
3. ``top_p``: keep the shortest most-likely prefix whose mass reaches ``top_p`` (at least one
   token; tokens tied at the cut are all kept); ``top_p >= 1`` disables.
4. ``min_p``: keep tokens with probability ``>= min_p * p_max``; ``min_p <= 0`` disables.

A draw is inverse-CDF sampling of the filtered law at one Philox uniform ``u``: the first token
whose running kept mass exceeds ``u * total``, in token order, or, when top-k is active, over the
kept candidates best first (value descending, ties by lower id). A tiny positive temperature
behaves like greedy (``1/T`` is clamped to the float32 range).

Randomness is Philox4x32-10 (``csrc/common/philox.h``), identical on CPU and CUDA: the same
``(seed, offset)`` draws the same tokens on either device. Without an explicit ``seed`` a fresh
64-bit seed is drawn from ``generator`` (or torch's default generator for the device), so its state
advances and consecutive calls differ, and ``torch.manual_seed`` makes runs reproducible. ``seed``
and ``offset`` may be ints or int64 tensors of 1 or N entries (tensors keep the call CUDA-graph
safe). With one seed, sample ``i`` uses Philox subsequence ``i``; with one seed per sample, each
uses subsequence 0, so a request's draw does not depend on its position in the batch.

Rows containing NaN or ``+inf`` raise ValueError, and so does a row whose every logit is ``-inf``
(there is nothing to sample). ``-inf`` logits (and zero probabilities) are never drawn.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple, Union

import torch

from ._checks import as_index, same_device

Param = Union[None, float, int, torch.Tensor]

__all__ = ["sample", "sample_from_probs", "token_logprobs", "speculative_verify"]


def _row_tensor(x: torch.Tensor, rows: int) -> torch.Tensor:
    # a 0-d tensor is one value for every row (as for seed); expanded, not read, so the call stays
    # free of host syncs (CUDA-graph safe)
    return x.reshape(1).expand(rows) if x.dim() == 0 else x


def _float_param(x: Param, name: str, default: float, rows: int) -> Tuple[Optional[torch.Tensor], float]:
    if x is None:
        return None, default
    if isinstance(x, torch.Tensor):
        return _row_tensor(x, rows), default
    if isinstance(x, bool) or not isinstance(x, numbers.Real):  # Python and numpy reals, not bools
        raise TypeError(f"ttscale: {name} must be None, a number or a tensor, got {type(x).__name__}")
    return None, float(x)


def _int_param(x: Param, name: str, rows: int) -> Tuple[Optional[torch.Tensor], int]:
    if x is None:
        return None, 0
    if isinstance(x, torch.Tensor):
        return _row_tensor(x, rows), 0
    v = as_index(x)  # Python and numpy integers
    if v is None:
        raise TypeError(f"ttscale: {name} must be None, an int or an integer tensor, got {type(x).__name__}")
    if not -(2**63) <= v < 2**63:
        raise ValueError(f"ttscale: {name} must fit in int64, got {v}")
    return None, v


def _as_seed_tensor(x: Union[int, torch.Tensor], name: str, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.reshape(-1) if x.dim() == 0 else x
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"ttscale: {name} must be an int or an int64 tensor, got {type(x).__name__}")
    if not -(2**63) <= x < 2**64:
        raise ValueError(f"ttscale: {name} must fit in 64 bits, got {x}")
    if x >= 2**63:
        x -= 2**64  # same 64 bits, as int64
    return torch.tensor([x], dtype=torch.int64, device=device)


def _seed_offset(
    generator: Optional[torch.Generator],
    seed: Union[None, int, torch.Tensor],
    offset: Union[None, int, torch.Tensor],
    device: torch.device,
) -> Tuple[torch.Tensor, torch.Tensor]:
    if seed is None:
        if offset is not None:
            raise ValueError("ttscale: offset was given without seed")
        if generator is not None:
            s = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=generator.device, generator=generator)
            s = s.to(device)
        else:
            s = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
        return s, torch.zeros(1, dtype=torch.int64, device=device)
    if generator is not None:
        raise ValueError("ttscale: pass either generator or seed/offset, not both")
    s = _as_seed_tensor(seed, "seed", device)
    o = _as_seed_tensor(0 if offset is None else offset, "offset", device)
    return s, o


def _sample_impl(x, probs_mode, temperature, top_k, top_p, min_p, indices, generator, seed, offset, return_logprobs):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"ttscale: {'probs' if probs_mode else 'logits'} must be a tensor")
    rows = x.shape[0] if x.dim() > 0 else 1
    t_arr, t_val = _float_param(temperature, "temperature", 1.0, rows)
    k_arr, k_val = _int_param(top_k, "top_k", rows)
    p_arr, p_val = _float_param(top_p, "top_p", 1.0, rows)
    m_arr, m_val = _float_param(min_p, "min_p", 0.0, rows)
    s, o = _seed_offset(generator, seed, offset, x.device)
    tokens, logprobs = torch.ops.ttscale.sample(
        x, t_arr, t_val, k_arr, k_val, p_arr, p_val, m_arr, m_val, indices, s, o, probs_mode, return_logprobs
    )
    return (tokens, logprobs) if return_logprobs else tokens


def sample(
    logits: torch.Tensor,
    *,
    temperature: Param = None,
    top_k: Param = None,
    top_p: Param = None,
    min_p: Param = None,
    indices: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    seed: Union[None, int, torch.Tensor] = None,
    offset: Union[None, int, torch.Tensor] = None,
    return_logprobs: bool = False,
):
    """Draw one token per row (or per entry of ``indices``) from ``softmax(logits / temperature)``
    after the top-k, top-p and min-p filters (module docstring: order and tie rules).

    Args:
        logits: ``[B, V]`` float32, float16 or bfloat16; last dimension contiguous (rows may be strided).
        temperature, top_k, top_p, min_p: None, a scalar, or a tensor ``[B]`` (one value per row).
        indices: optional ``[N]`` int32/int64; sample ``i`` is drawn from row ``indices[i]`` (N draws
            from one prompt's logits without copying rows).
        generator / seed / offset: randomness (module docstring).
        return_logprobs: also return the float32 log-probability of each drawn token under the
            temperature-scaled, *unfiltered* distribution (for greedy rows: at temperature 1).

    Returns:
        int64 tokens ``[N or B]``, or ``(tokens, logprobs)`` with ``return_logprobs``.
    """
    return _sample_impl(logits, False, temperature, top_k, top_p, min_p, indices, generator, seed, offset,
                        return_logprobs)


def sample_from_probs(
    probs: torch.Tensor,
    *,
    top_k: Param = None,
    top_p: Param = None,
    min_p: Param = None,
    indices: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    seed: Union[None, int, torch.Tensor] = None,
    offset: Union[None, int, torch.Tensor] = None,
    return_logprobs: bool = False,
):
    """Like :func:`sample`, from non-negative probabilities ``[B, V]`` (rows need not sum to 1;
    they are renormalised, but values above 2^100 are rejected: the row sums run in float32 lanes).
    No temperature. Logprobs are ``log(p / sum(p))``."""
    return _sample_impl(probs, True, None, top_k, top_p, min_p, indices, generator, seed, offset, return_logprobs)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, *, temperature: Param = None) -> torch.Tensor:
    """``log_softmax(logits / temperature)[b, tokens[b]]`` as float32 ``[B]``, without
    materialising the log-softmax (two streaming passes per row). ``temperature`` 0 counts as 1."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError("ttscale: logits must be a tensor")
    t_arr, t_val = _float_param(temperature, "temperature", 1.0, logits.shape[0] if logits.dim() > 0 else 1)
    return torch.ops.ttscale.token_logprobs(logits, tokens, t_arr, t_val)


def speculative_verify(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    *,
    generator: Optional[torch.Generator] = None,
    seed: Union[None, int, torch.Tensor] = None,
    offset: Union[None, int, torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chain speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

    Draft token ``j`` of row ``b`` is accepted with probability ``min(1, p/q)`` (``p`` target,
    ``q`` draft probability of that token). At the first rejection a token is drawn from
    ``max(0, p - q)`` renormalised (from ``p`` if that is empty); if all ``n`` are accepted a bonus
    token is drawn from ``target_probs[b, n]``. The emitted tokens then follow the target law exactly.

    Args:
        draft_tokens: ``[B, n]`` int32/int64. draft_probs: ``[B, n, V]``. target_probs: ``[B, n+1, V]``
            (float32/16/bf16, same dtype; non-negative, rows need not be normalised except that the
            draft/target probabilities are compared as given).
        seed/offset: ints or int64 tensors of 1 or B entries.

    Returns:
        ``(tokens [B, n+1] int64`` padded with -1 after the first rejection-resampled token,
        ``num_accepted [B] int64)``.
    """
    s, o = _seed_offset(generator, seed, offset, draft_tokens.device)
    return torch.ops.ttscale.speculative_verify(draft_tokens, draft_probs, target_probs, s, o)


# ---------------------------------------------------------------- fake (meta) kernels
@torch.library.register_fake("ttscale::sample")
def _sample_fake(logits, temperature, temperature_val, top_k, top_k_val, top_p, top_p_val, min_p, min_p_val, indices,
                 seed, offset, is_probs, return_logprobs):
    name = "probs" if is_probs else "logits"
    same_device(name, logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, indices=indices,
                seed=seed, offset=offset)  # see _checks.py
    n = logits.shape[0] if indices is None else indices.shape[0]
    tokens = logits.new_empty((n,), dtype=torch.int64)
    logprobs = logits.new_empty((n if return_logprobs else 0,), dtype=torch.float32)
    return tokens, logprobs


@torch.library.register_fake("ttscale::token_logprobs")
def _token_logprobs_fake(logits, tokens, temperature, temperature_val):
    same_device("logits", logits, tokens=tokens, temperature=temperature)
    return logits.new_empty((logits.shape[0],), dtype=torch.float32)


@torch.library.register_fake("ttscale::speculative_verify")
def _speculative_verify_fake(draft_tokens, draft_probs, target_probs, seed, offset):
    same_device("draft_tokens", draft_tokens, draft_probs=draft_probs, target_probs=target_probs, seed=seed,
                offset=offset)
    b, n = draft_tokens.shape
    return (draft_tokens.new_empty((b, n + 1), dtype=torch.int64), draft_tokens.new_empty((b,), dtype=torch.int64))
