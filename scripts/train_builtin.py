#!/usr/bin/env python
"""Train the built-in policy and process reward model (PRM) for the modular-arithmetic task.

Reproduce the shipped weights (one command, seed 0; measured wall time and accuracies in
``python/ttscale/data/builtin/README.md`` and ``meta.json``)::

    python scripts/train_builtin.py --out OUT --seed 0

Everything is plain torch (autograd, AdamW); no ttscale op and no transformers code is used, and the
outputs are valid Hugging Face Llama checkpoints (``<out>/policy``: ``LlamaForCausalLM``;
``<out>/prm``: ``LlamaForSequenceClassification`` with ``num_labels=1``), each with
``config.json``, ``model.safetensors`` (float32, HF tensor names) and ``ttscale_tokenizer.json``.
``<out>/meta.json`` records the seed, the configuration, the steps run, the wall time and the
accuracies measured at the end.

Pipeline (all randomness from ``--seed``):

1. Policy. A Llama decoder (:class:`Llama`, HF semantics: RMSNorm, rotate-half RoPE, GQA, SwiGLU) is
   trained with next-token loss on the solution tokens (and EOS) of freshly generated problems with
   a mix of lengths, learning rate warmed up then cosine-decayed to 0 over ``--policy-steps``. Every
   ``--eval-every`` steps one temperature-``--temperature`` sample per validation problem (default
   difficulty) is checked; training stops early if the accuracy reaches ``--stop-acc``. The schedule
   is deliberately short, so that the policy still makes mistakes and search has something to fix
   (450 steps: one sample right ~20-25% of the time; 600 steps: ~50%).
2. PRM data. The policy samples ``--prm-samples`` completions per problem for fresh problems, at
   ``--prm-data-temperature`` (1.2: hotter than use, so the PRM sees more of the policy's errors).
3. PRM, in two stages in the same run (stage 2, ``--prm2-*``: fresh samples, a lower learning rate
   and its own schedule, continuing stage 1's weights). The policy's layers plus
   ``--prm-extra-layers`` fresh layers on top (HF Llama, just deeper), trained with four losses per
   step:

   * contrastive pairs on the policy's own prefixes (:func:`contrastive_pair`): the lines the policy
     wrote up to line ``k``, then line ``k`` right or wrong (often the policy's own wrong line).
     BCE on line ``k`` only, plus a logistic ranking loss ``-log sigmoid(s_right - s_wrong)``. ``k``
     is uniform, so at every position half the labels are 1 and half 0: the step's position, which
     the policy's errors cluster by, predicts nothing, and the pair differs only in the line's
     arithmetic;
   * fresh problems whose every line is wrong independently with probability ``q``
     (:func:`noisy_solution`), BCE on every line: labels independent of position and of earlier
     errors;
   * auxiliary targets at each line's ``"\n"`` read from the second-to-last layer (``AUX_NAMES``:
     the written values, the prompt's operation for this label, the true result, and the three
     comparisons); the heads are thrown away;
   * the next-token loss on gold solutions (keeps the arithmetic and the prompt lookup; the LM head
     is not saved).

   Why the extra layers and the auxiliary targets: the policy never needs to look at a finished
   line again (after ``"\n"`` it only predicts the next label), so in its layers the ``"\n"``
   state is almost independent of the line (changing the line's result moves it by ~0.2%), and its
   saturated attention passes almost no gradient back. Initialised from the policy alone and
   trained on step labels (the previous recipe), the PRM stayed content-blind: its scores followed
   the step's position, and pairs differing in one line got identical scores. The fresh layers
   attend broadly at first, and the auxiliary targets give the ``"\n"`` state a dense reason to
   gather the line's facts; the step score then learns to compare them (training pair accuracy
   rises from 0.5 after ~250 steps). The PRM's RNGs are seeded from ``--seed`` independently of
   phase 1, so ``--policy-from DIR`` (reuse a trained policy, train only the PRM) gives the same PRM
   as a full run; ``--prm-init DIR`` continues training an earlier PRM (fresh auxiliary heads, the
   policy's LM head, its own schedule).

PRM semantics (what the shipped checkpoint computes): input ``<bos> + prompt + completion prefix``;
the score of step ``i`` is ``sigmoid(score . h)`` at the position of the step's final ``"\\n"`` token
(for ``LlamaForSequenceClassification`` that is the pooled output when the input ends there). With
the default ``--prm-label step`` (PRM800K-style) it is the probability that step ``i`` is correct
*given the lines before it* (``check_steps``: right label, right left value copied from the previous
line, right operation, right result); a solution's score is then the MIN (or product) over its
steps, which is the probability-like score that every step so far is correct. With
``--prm-label prefix`` the label is already "this step and all before it are correct"
(``prefix_correct``), and the last step's score is the solution's score. One forward pass over a
whole completion gives every step's score (the model is causal).

Sequences are ``<bos> prompt solution <eos>`` with the built-in ``CharTokenizer``
(``ttscale.tasks.make_tokenizer()``). Library code (the model, sampling, saving) is importable from
this file; ``tests/test_train_builtin.py`` runs a tiny configuration and loads the outputs in
transformers.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

try:
    from ttscale.tasks import modarith as task
except ImportError:  # running from a checkout without an installed package: use the source tree
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    from ttscale.tasks import modarith as task


# --------------------------------------------------------------------------------------------------
# Model: HF Llama semantics in plain torch
# --------------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    head_dim: int = 64
    # RoPE has no learned positions, so this only bounds the sequences a user may run (the task's
    # sequences are < 200 tokens); 512 leaves room for a few-hundred-token prompt + 64 new tokens
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dt)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache):
        # x [B, T, H]; cos/sin [B, T, D]; mask: None (plain causal, no cache) or bool [B, 1, T, S]
        B, T, _ = x.shape
        c = self.c
        q = self.q_proj(x).view(B, T, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if cache is not None:
            if cache[0] is not None:
                k = torch.cat([cache[0], k], dim=2)
                v = torch.cat([cache[1], v], dim=2)
            cache[0], cache[1] = k, v
        rep = c.num_attention_heads // c.num_key_value_heads
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """HF ``LlamaModel``: parameter names match ``model.*`` of the HF checkpoint."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList([Layer(c) for _ in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.int64).float() / c.head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, ids, pos=None, mask=None, caches=None):
        """ids [B, T]; pos [B, T] positions (default 0..T-1); mask bool [B, 1, T, S] (True = attend)
        or None for plain causal attention without a cache; caches: list of [k, v] per layer."""
        B, T = ids.shape
        if pos is None:
            pos = torch.arange(T, device=ids.device).expand(B, T)
        freqs = pos[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        x = self.embed_tokens(ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, None if caches is None else caches[i])
        return self.norm(x)


class Llama(nn.Module):
    """Backbone + LM head (policy) + scalar score head (PRM). Only the parts of a kind are saved."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.c = c
        self.model = Backbone(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.score = nn.Linear(c.hidden_size, 1, bias=False)
        std = 0.02
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
        # GPT-2 style: residual projections scaled down with depth keeps early training stable.
        for layer in self.model.layers:
            nn.init.normal_(layer.self_attn.o_proj.weight, std=std / math.sqrt(2 * c.num_hidden_layers))
            nn.init.normal_(layer.mlp.down_proj.weight, std=std / math.sqrt(2 * c.num_hidden_layers))

    def forward(self, ids, pos=None, mask=None, caches=None):
        h = self.model(ids, pos, mask, caches)
        return self.lm_head(h), self.score(h).squeeze(-1)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------

def encode_example(tok, prompt: str, completion: str, eos: bool) -> Tuple[List[int], int]:
    """``<bos> prompt completion [<eos>]`` ids and the index of the first completion token."""
    p = [tok.bos_token_id] + tok.encode(prompt)
    ids = p + tok.encode(completion) + ([tok.eos_token_id] if eos else [])
    return ids, len(p)


def pad_right(seqs: Sequence[Sequence[int]], pad: int, fill=None) -> torch.Tensor:
    L = max(len(s) for s in seqs)
    out = torch.full((len(seqs), L), pad if fill is None else fill, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
    return out


def lm_batch(tok, problems) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets (-100 outside solution+EOS) for gold solutions."""
    ids, tgt = [], []
    for pr in problems:
        x, start = encode_example(tok, pr.prompt, pr.solution, eos=True)
        ids.append(x[:-1])
        tgt.append([-100] * (start - 1) + x[start:])
    return pad_right(ids, tok.pad_token_id), pad_right(tgt, -100, fill=-100)


def step_label_example(tok, pr, completion: str, eos: bool, label: str = "step") -> Tuple[List[int], List[int]]:
    """Ids and per-position labels (-1 = no label; 0/1 at each step's final "\\n"). ``label``:
    "step" = the step itself is correct given the lines before it (``check_steps``), "prefix" = it
    and every step before it are correct (``prefix_correct(check_steps)``)."""
    ids, start = encode_example(tok, pr.prompt, completion, eos=eos)
    labels = [-1] * len(ids)
    ok = task.check_steps(pr, completion)
    if label == "prefix":
        ok = task.prefix_correct(ok)
    elif label != "step":
        raise ValueError(f"step_label_example: label must be 'step' or 'prefix', got {label!r}")
    pos = start - 1
    for line, good in zip(task.split_steps(completion), ok):
        pos += len(line)
        if line.endswith(task.STEP_DELIMITER):
            labels[pos] = int(good)
    return ids, labels


# Auxiliary targets read off each line's final "\n" (training only; the heads are not saved).
# Why: in the policy's layers the "\n" state ignores the line (see phase 3 in ``train``), and a
# single right/wrong bit per line is too weak a signal to teach attention where to look: training
# on it alone stays at chance for hundreds of steps. These targets make the "\n" state gather,
# through the layers below the last, exactly the facts a checker compares -- the line's written
# left value, operation, operand and result, the state the previous line left, the operation the
# prompt gives this label, and the true result of the written operation -- plus the three
# comparisons themselves; the last layer then only has to AND them into the score.
AUX_NAMES = ("a", "op", "b", "c", "prev", "true_op", "true_b", "true_c", "a_ok", "opb_ok", "c_ok")


def aux_targets(pr, completion: str, n_ids: int, start: int) -> List[List[int]]:
    """``[n_ids][len(AUX_NAMES)]`` class targets (-100 = none) at each line's final "\n". Values
    are residues (classes 0..p-1), operations are indices into ``task.OPS``, comparisons 0/1."""
    p = pr.modulus
    out = [[-100] * len(AUX_NAMES) for _ in range(n_ids)]
    pos, state = start - 1, pr.start
    for i, line in enumerate(task.split_steps(completion)):
        pos += len(line)
        if not line.endswith(task.STEP_DELIMITER) or i > len(pr.ops):
            break
        row = out[pos]
        if state is not None:
            row[4] = state
        if i == len(pr.ops):
            m = task._ANSWER_LINE.fullmatch(line[:-1])
            if m is not None and int(m.group(1)) < p:
                row[3] = int(m.group(1))
                if state is not None:
                    row[10] = int(row[3] == state)
            break
        op_i, b_i = pr.ops[i]
        row[5], row[6] = task.OPS.index(op_i), b_i
        m = task._OP_LINE.fullmatch(line[:-1])
        nxt = None
        if m is not None:
            a, op, b, c = int(m.group(2)), m.group(3), int(m.group(4)), int(m.group(5))
            if a < p and b < p and c < p:
                tc_ = task._apply(a, op, b, p)
                row[0], row[1], row[2], row[3], row[7] = a, task.OPS.index(op), b, c, tc_
                if state is not None:
                    row[8] = int(a == state)
                row[9] = int((op, b) == (op_i, b_i))
                row[10] = int(c == tc_)
                nxt = c
        state = nxt
    return out


def prm_example(tok, pr, completion: str, label: str):
    """``(ids, step labels, aux targets)`` of one PRM training sequence (no EOS)."""
    ids, lab = step_label_example(tok, pr, completion, eos=False, label=label)
    start = len(ids) - len(tok.encode(completion))
    return ids, lab, aux_targets(pr, completion, len(ids), start)


def _wrong_op_line(pr, i: int, a: int, rng: random.Random, kinds=(0.55, 0.15, 0.15, 0.15)) -> str:
    """A wrong line ``i`` (an operation line) written after state ``a``. The kinds, drawn with
    probabilities ``kinds``, mirror how a small policy errs on this task. Measured on the built-in
    policy, ~95% of its wrong steps copy the operation of ANOTHER label from the prompt (a retrieval
    error: ``f`` computed with ``e``'s ``*6``) and then compute correctly from it, so that kind
    dominates; the rest are a random other operation, a wrong result, and a wrong left value
    (copy error) computed correctly from. Every kind gives a line that ``check_steps`` rejects."""
    p = pr.modulus
    op, b = pr.ops[i]
    u = rng.random()
    others = [o for o in pr.ops if o != (op, b)]
    if u < kinds[0] and others:
        # retrieval error: prefer the neighbouring labels, where attention slips most often
        near = [pr.ops[j] for j in (i - 1, i + 1) if 0 <= j < len(pr.ops) and pr.ops[j] != (op, b)]
        op2, b2 = rng.choice(near) if near and rng.random() < 0.5 else rng.choice(others)
        return f"{task.LABELS[i]}: {a}{op2}{b2}={task._apply(a, op2, b2, p)}\n"
    u -= kinds[0]
    if u < kinds[1] or (u < kinds[0] + kinds[1] and not others):
        op2, b2 = op, b
        while (op2, b2) == (op, b):
            op2 = rng.choice(task.OPS)
            b2 = rng.randint(2 if op2 == "*" else 1, p - 1)
        return f"{task.LABELS[i]}: {a}{op2}{b2}={task._apply(a, op2, b2, p)}\n"
    u -= kinds[1]
    if u < kinds[2]:
        y = (task._apply(a, op, b, p) + rng.randrange(1, p)) % p
        return f"{task.LABELS[i]}: {a}{op}{b}={y}\n"
    a2 = (a + rng.randrange(1, p)) % p
    return f"{task.LABELS[i]}: {a2}{op}{b}={task._apply(a2, op, b, p)}\n"


def _line_result(pr, line: str) -> Optional[int]:
    """The state a line leaves behind (its written result), None when it is malformed."""
    m = task._OP_LINE.fullmatch(line.rstrip("\n"))
    return int(m.group(5)) if m is not None and int(m.group(5)) < pr.modulus else None


def _right_line(pr, i: int, a: int) -> str:
    if i == len(pr.ops):
        return f"{task.ANSWER_PREFIX}{a}\n"
    op, b = pr.ops[i]
    return f"{task.LABELS[i]}: {a}{op}{b}={task._apply(a, op, b, pr.modulus)}\n"


def _wrong_line(pr, i: int, a: int, rng: random.Random) -> str:
    if i == len(pr.ops):
        return f"{task.ANSWER_PREFIX}{(a + rng.randrange(1, pr.modulus)) % pr.modulus}\n"
    return _wrong_op_line(pr, i, a, rng)


def noisy_solution(pr, rng: random.Random, q: float) -> str:
    """A solution whose lines are EACH wrong independently with probability ``q`` (answer line
    included), every line written after the state the previous written line left. With per-step
    labels (``check_steps``) this makes the label of every line a coin flip independent of its
    position and of the lines before it, so the only way to predict it is to read the line's own
    arithmetic against the prompt and the previous line: position and "an earlier step was
    wrong" carry no information."""
    lines, x = [], pr.start
    for i in range(len(pr.ops) + 1):
        line = _wrong_line(pr, i, x, rng) if rng.random() < q else _right_line(pr, i, x)
        lines.append(line)
        if i < len(pr.ops):
            x = _line_result(pr, line)
    return "".join(lines)


def contrastive_pair(pr, completion: str, rng: random.Random, own_error_p: float = 0.5
                     ) -> Optional[Tuple[str, str]]:
    """Two completions that share a prefix (the first ``k`` lines of ``completion``, as written)
    and differ only in line ``k``: ``(right, wrong)`` with line ``k`` correct resp. incorrect given
    that prefix. ``k`` is uniform over the lines that have a well-formed prefix, so every position
    gets as many right as wrong last lines. When ``completion`` (a policy sample) itself errs, with
    probability ``own_error_p`` ``k`` is its first wrong line and the wrong line is the policy's
    own (the hardest, most realistic negative). None when no line qualifies."""
    lines = task.split_steps(completion)
    flags = task.check_steps(pr, completion)
    states, x = [pr.start], pr.start      # states[k] = the state before line k
    for i, line in enumerate(lines[:len(pr.ops)]):
        x = _line_result(pr, line) if line.endswith("\n") else None
        if x is None:
            break
        states.append(x)
    n_ok = len(states)                    # lines 0..n_ok-1 have a state to continue from
    own = [i for i in range(min(n_ok, len(lines))) if not flags[i] and lines[i].endswith("\n")
           and (i < len(pr.ops) or i == len(pr.ops))]
    if own and rng.random() < own_error_p:
        k = own[0]
        wrong = lines[k]
    else:
        k = rng.randrange(min(n_ok, len(pr.ops) + 1))
        wrong = _wrong_line(pr, k, states[k], rng)
    prefix = "".join(lines[:k])
    return prefix + _right_line(pr, k, states[k]), prefix + wrong


def corrupt_solution(pr, rng: random.Random) -> str:
    """The gold solution with one line made wrong, continued correctly from the wrong state."""
    k = rng.randrange(len(pr.ops) + 1)
    lines, x = [], pr.start
    for i in range(len(pr.ops) + 1):
        line = _wrong_line(pr, i, x, rng) if i == k else _right_line(pr, i, x)
        lines.append(line)
        if i < len(pr.ops):
            x = _line_result(pr, line)
    return "".join(lines)


# --------------------------------------------------------------------------------------------------
# Sampling (KV cache, left padding) and PRM scoring
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(model: Llama, tok, prompts: Sequence[str], *, temperature: float, max_new_tokens: int,
           generator: torch.Generator, batch_size: int = 512) -> List[str]:
    """One completion per prompt (text without special tokens, cut at EOS)."""
    out: List[str] = []
    for s in range(0, len(prompts), batch_size):
        out.extend(_sample_batch(model, tok, prompts[s:s + batch_size], temperature, max_new_tokens, generator))
    return out


def _sample_batch(model, tok, prompts, temperature, max_new_tokens, generator):
    enc = [[tok.bos_token_id] + tok.encode(p) for p in prompts]
    B, P = len(enc), max(len(e) for e in enc)
    ids = torch.full((B, P), tok.pad_token_id, dtype=torch.long)
    valid = torch.zeros(B, P + max_new_tokens, dtype=torch.bool)
    for i, e in enumerate(enc):   # left padding: every prompt ends at column P-1
        ids[i, P - len(e):] = torch.tensor(e)
        valid[i, P - len(e):P] = True
    pos = (valid[:, :P].long().cumsum(1) - 1).clamp(min=0)
    caches = [[None, None] for _ in range(model.c.num_hidden_layers)]
    causal = torch.ones(P, P, dtype=torch.bool).tril()
    mask = (causal[None] & valid[:, None, :P])[:, None]
    # a fully padded query row would give NaN in SDPA: let pad queries see themselves
    mask = mask | torch.eye(P, dtype=torch.bool)[None, None]
    logits, _ = model(ids, pos, mask, caches)
    last = logits[:, -1]
    next_pos = pos[:, -1] + 1
    gen = torch.zeros(B, 0, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool)
    for t in range(max_new_tokens):
        if temperature == 0:
            nxt = last.argmax(-1)
        else:
            probs = torch.softmax(last.float() / temperature, -1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        nxt = torch.where(done, torch.full_like(nxt, tok.pad_token_id), nxt)
        gen = torch.cat([gen, nxt[:, None]], 1)
        done = done | (nxt == tok.eos_token_id)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        valid[:, P + t] = True
        mask = valid[:, None, None, :P + t + 1]
        logits, _ = model(nxt[:, None], next_pos[:, None], mask, caches)
        last = logits[:, -1]
        next_pos = next_pos + 1
    texts = []
    for row in gen.tolist():
        if tok.eos_token_id in row:
            row = row[:row.index(tok.eos_token_id)]
        texts.append(tok.decode(row))
    return texts


@torch.no_grad()
def prm_step_scores(model: Llama, tok, problems, completions: Sequence[str], batch_size: int = 256
                    ) -> List[List[float]]:
    """Sigmoid PRM score at every "\\n"-terminated step of each completion."""
    res: List[List[float]] = []
    for s in range(0, len(completions), batch_size):
        exs = [step_label_example(tok, pr, c, eos=False) for pr, c in
               zip(problems[s:s + batch_size], completions[s:s + batch_size])]
        ids = pad_right([e[0] for e in exs], tok.pad_token_id)
        _, score = model(ids)
        prob = torch.sigmoid(score)
        for i, (_, lab) in enumerate(exs):
            res.append([float(prob[i, j]) for j, l in enumerate(lab) if l >= 0])
    return res


# --------------------------------------------------------------------------------------------------
# Saving as HF checkpoints
# --------------------------------------------------------------------------------------------------

def hf_config(c: ModelConfig, tok, kind: str) -> Dict:
    cfg = dict(
        model_type="llama",
        architectures=["LlamaForCausalLM" if kind == "policy" else "LlamaForSequenceClassification"],
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta, rope_scaling=None, hidden_act="silu", attention_bias=False,
        attention_dropout=0.0, mlp_bias=False, tie_word_embeddings=False, torch_dtype="float32",
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        initializer_range=0.02, use_cache=True,
    )
    if kind == "prm":
        cfg.update(num_labels=1, problem_type="regression", id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return cfg


def save_checkpoint(model: Llama, tok, directory: str, kind: str) -> None:
    """``kind`` "policy" saves ``model.*`` + ``lm_head.weight``; "prm" saves ``model.*`` + ``score.weight``."""
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    sd = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()
          if k.startswith("model.")}
    head = "lm_head.weight" if kind == "policy" else "score.weight"
    sd[head] = model.state_dict()[head].detach().float().contiguous().clone()
    save_file(sd, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config(model.c, tok, kind), f, indent=1)
    tok.save(directory)


def load_checkpoint(directory: str) -> Tuple[Llama, object]:
    """Load a checkpoint written by :func:`save_checkpoint` back into :class:`Llama`."""
    from safetensors.torch import load_file
    from ttscale.engine.tokenizer import CharTokenizer
    with open(os.path.join(directory, "config.json")) as f:
        cfg = json.load(f)
    c = ModelConfig(**{k: cfg[k] for k in ModelConfig.__dataclass_fields__})
    m = Llama(c)
    missing, unexpected = m.load_state_dict(load_file(os.path.join(directory, "model.safetensors")), strict=False)
    if unexpected or any(k.startswith("model.") for k in missing):
        raise ValueError(f"load_checkpoint: {directory}: missing {missing}, unexpected {unexpected}")
    return m.eval(), CharTokenizer.load(directory)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    seed: int = 0
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 3
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 100
    policy_steps: int = 450        # the cosine schedule's length (the accuracy stop may end it earlier)
    stop_acc: float = 0.40          # stop the policy once one sample is right this often
    policy_schedule: str = "cosine"  # policy LR after warmup: "cosine" (to 0) or "constant"
    eval_every: int = 50
    eval_problems: int = 128
    min_difficulty: int = 2
    max_difficulty: int = 8
    difficulty: int = task.DEFAULT_DIFFICULTY
    modulus: int = task.DEFAULT_MODULUS
    temperature: float = 1.0
    prm_problems: int = 512
    prm_data_temperature: float = 1.2  # PRM data samples (0: --temperature); hotter = more of the policy's errors
    prm_samples: int = 4
    prm_steps: int = 800
    prm_lr: float = 3e-3
    prm_lm_weight: float = 1.0
    prm_rank_weight: float = 1.0    # weight of the pairwise ranking loss on contrastive pairs
    prm_aux_weight: float = 1.0     # weight of the auxiliary per-line targets (AUX_NAMES)
    prm_extra_layers: int = 2       # fresh PRM layers on top of the policy's (random init)
    test_problems: int = 200
    test_samples: int = 8
    prm_label: str = "step"         # "step" (each step given the previous lines) or "prefix"
    prm2_steps: int = 500           # PRM stage 2 (0: none): continues stage 1 on fresh samples
    prm2_lr: float = 1.5e-3
    prm2_warmup: int = 50
    prm_init: str = ""             # a PRM checkpoint folder to start stage 1 from
    policy_from: str = ""          # a policy checkpoint folder: skip phase 1 and train only the PRM
    threads: int = 2               # 2 on an idle 2-core machine (1.6x faster than 1); 1 when it is busy


def _lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _policy_accuracy(model, tok, problems, temperature, gen) -> float:
    model.eval()
    outs = sample(model, tok, [p.prompt for p in problems], temperature=temperature,
                  max_new_tokens=_max_new(problems), generator=gen)
    model.train()
    return sum(task.check_answer(p, o) for p, o in zip(problems, outs)) / len(problems)


def _max_new(problems) -> int:
    return max(len(p.solution) for p in problems) + 16


def auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pairs = sorted(zip(scores, labels))
    n_pos = sum(labels)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum, i = 0.0, 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        avg_rank = (i + j + 1) / 2  # 1-based average rank of the tie group
        rank_sum += avg_rank * sum(l for _, l in pairs[i:j])
        i = j
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def evaluate(policy, prm, tok, tc: TrainConfig, seed: int, log=print) -> Dict:
    """Single-sample accuracy, majority-of-N, PRM best-of-N, oracle pass@N and PRM step AUC on
    ``tc.test_problems`` held-out problems with ``tc.test_samples`` samples each."""
    probs = task.generate_problems(tc.test_problems, difficulty=tc.difficulty, seed=seed, modulus=tc.modulus)
    n = tc.test_samples
    rep = [p for p in probs for _ in range(n)]
    gen = torch.Generator().manual_seed(seed)
    outs = sample(policy, tok, [p.prompt for p in rep], temperature=tc.temperature,
                  max_new_tokens=_max_new(probs), generator=gen)
    scores = prm_step_scores(prm, tok, rep, outs)
    correct = [task.check_answer(p, o) for p, o in zip(rep, outs)]
    step_s, step_l, step_acc = [], [], []
    for p, o, s in zip(rep, outs, scores):
        flags = task.check_steps(p, o)
        if tc.prm_label == "prefix":
            flags = task.prefix_correct(flags)
        lab = [int(x) for x, line in zip(flags, task.split_steps(o))
               if line.endswith("\n")]
        step_s += s
        step_l += lab
        step_acc += [int((v > 0.5) == bool(l)) for v, l in zip(s, lab)]
    maj = bon = bon_min = bon_prod = orc = 0
    for i, p in enumerate(probs):
        o = outs[i * n:(i + 1) * n]
        s = scores[i * n:(i + 1) * n]
        answers = [task.extract_answer(x) for x in o]
        counts: Dict = {}
        for a in answers:
            if a is not None:
                counts[a] = counts.get(a, 0) + 1
        if counts:
            maj += int(max(counts.items(), key=lambda kv: (kv[1], -answers.index(kv[0])))[0] == p.answer)
        last = [x[-1] if x else 0.0 for x in s]
        mins = [min(x) if x else 0.0 for x in s]
        bon += int(answers[max(range(n), key=lambda j: last[j])] == p.answer)
        bon_min += int(answers[max(range(n), key=lambda j: mins[j])] == p.answer)
        prods = [math.prod(x) if x else 0.0 for x in s]
        bon_prod += int(answers[max(range(n), key=lambda j: prods[j])] == p.answer)
        orc += int(any(a == p.answer for a in answers))
    m = len(probs)
    res = dict(problems=m, samples_per_problem=n, temperature=tc.temperature, difficulty=tc.difficulty,
               single_sample_acc=sum(correct) / len(correct), majority_of_n_acc=maj / m,
               prm_best_of_n_acc_last=bon / m, prm_best_of_n_acc_min=bon_min / m, prm_best_of_n_acc_prod=bon_prod / m, prm_label=tc.prm_label,
               oracle_pass_at_n=orc / m,
               prm_step_auc=auc(step_s, step_l), prm_step_acc=sum(step_acc) / max(1, len(step_acc)),
               steps_labelled=len(step_l), steps_positive_frac=sum(step_l) / max(1, len(step_l)))
    log("eval: " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}))
    return res


def _train_policy(model, tok, tc, rng, gen, val, diff, history, t0, log) -> int:
    opt = torch.optim.AdamW([p for n_, p in model.named_parameters() if n_ != "score.weight"], lr=tc.lr,
                            betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    step = 0
    for step in range(1, tc.policy_steps + 1):
        # warmup, then cosine to 0 at policy_steps ("cosine"), or constant ("constant", the recipe
        # of the first releases). With a constant 3e-3 the held-out accuracy swung by +-0.1 between
        # evaluations 50 steps apart, so where the run ended decided the policy's quality; the
        # decayed schedule ends on a settled model.
        for g in opt.param_groups:
            if tc.policy_schedule == "cosine":
                g["lr"] = _lr(step - 1, tc.policy_steps, tc.lr, tc.warmup)
            else:
                g["lr"] = tc.lr * min(1.0, step / tc.warmup)
        probs = task.generate_problems(tc.batch_size, difficulty=diff, seed=rng.getrandbits(62), modulus=tc.modulus)
        x, y = lm_batch(tok, probs)
        logits, _ = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % tc.eval_every == 0 or step == tc.policy_steps:
            acc = _policy_accuracy(model, tok, val, tc.temperature, gen)
            history.append(dict(step=step, loss=round(loss.item(), 4), val_acc=acc))
            log(f"policy step {step} loss {loss.item():.4f} val_acc {acc:.3f} ({time.time() - t0:.0f}s)")
            if acc >= tc.stop_acc:
                break
    return step


def _prm_stage_data(model, tok, tc: TrainConfig, diff, rng: random.Random, gen: torch.Generator):
    """A PRM stage's data: tc.prm_samples policy samples of each of tc.prm_problems fresh problems, with
    their exact step labels. Returns (data [(problem, completion)], positive labels, negative labels)."""
    prm_probs = task.generate_problems(tc.prm_problems, difficulty=diff, seed=rng.getrandbits(62), modulus=tc.modulus)
    rep = [p for p in prm_probs for _ in range(tc.prm_samples)]
    outs = sample(model, tok, [p.prompt for p in rep], temperature=tc.prm_data_temperature or tc.temperature,
                  max_new_tokens=_max_new(prm_probs), generator=gen)
    data = list(zip(rep, outs))
    labelled = [step_label_example(tok, p, o, eos=False, label=tc.prm_label)[1] for p, o in data]
    pos = sum(l == 1 for lab in labelled for l in lab)
    neg = sum(l == 0 for lab in labelled for l in lab)
    return data, pos, neg


def _init_prm(pmc: ModelConfig, policy_state: Dict, prev: Optional[Llama], tc: TrainConfig) -> Llama:
    """A stage's starting PRM: the policy's weights (plus tc.prm_extra_layers new layers on top), then,
    when there is one, an earlier PRM's (the previous stage's, or --prm-init's for the first stage).
    Draws from torch's global RNG in a fixed order (the new model's init, then --prm-init's load), which
    the shipped weights depend on."""
    first = prev is None
    prm = Llama(pmc)
    prm.load_state_dict(policy_state, strict=False)  # the new layers (if any) keep their init
    if prev is None and tc.prm_init:
        prev, _ = load_checkpoint(tc.prm_init)
        if asdict(prev.c) != asdict(pmc):
            raise ValueError(f"--prm-init {tc.prm_init}: config {asdict(prev.c)} != {asdict(pmc)}")
    if prev is not None:
        # continue from the earlier PRM with a fresh schedule, aux heads, optimizer and data; lm_head
        # stays the policy's (a saved PRM has none, so a stage continues exactly as a second run with
        # --prm-init would)
        sd = prev.state_dict()
        sd["lm_head.weight"] = prm.lm_head.weight.detach().clone()
        prm.load_state_dict(sd)
    # The new layers keep their fresh random init, on purpose: in the policy's own layers the
    # hidden state at a line's final "\n" is almost independent of the line's content (the policy
    # only needs it to predict the next label, so its attention there is saturated on positional
    # cues: changing the line's result moves that state by ~0.2%), and gradients through saturated
    # softmax attention are too small to undo that. Fresh layers attend broadly at first, so the
    # score's gradient reaches the line's tokens and the states where the policy predicted them.
    if first and not tc.prm_init:
        nn.init.zeros_(prm.score.weight)
    return prm


def _prm_batch(tok, tc: TrainConfig, data, diff, rng: random.Random, n_pairs: int, n_noisy: int):
    """One PRM training batch (the rng draws, in this order, decide it):
    (a) contrastive pairs on the policy's own prefixes: the same lines 0..k-1 as the policy wrote
        them, then line k right or wrong. Only line k is labelled, so at every position half the
        labels are 1 and half 0, and the pair differs in nothing but the arithmetic of line k;
    (b) fresh problems whose lines are each wrong with probability q: every line labelled, labels
        independent of position and of earlier lines;
    (c) gold solutions of fresh problems for the LM loss.
    Returns ids [R, T], step labels [R, T] (-1: none), aux targets [R, T, len(AUX_NAMES)] (-100:
    none), ranked pairs ((row, pos) right, (row, pos) wrong) or None, and the LM batch (x, y)."""
    ids_l, lab_l, aux_l, pairs = [], [], [], []
    while len(pairs) < n_pairs:
        p, o = data[rng.randrange(len(data))]
        pair = contrastive_pair(p, o, rng)
        if pair is None:
            continue
        idx = []
        for comp in pair:
            ids, lab, aux = prm_example(tok, p, comp, tc.prm_label)
            last = max(i for i, l in enumerate(lab) if l >= 0)
            ids_l.append(ids)
            aux_l.append(aux)
            lab_l.append([-1] * last + [lab[last]])
            idx.append((len(ids_l) - 1, last, lab[last]))
        if idx[0][2] == 1 and idx[1][2] == 0:   # ranked pair (always, for step labels)
            pairs.append((idx[0][:2], idx[1][:2]))
        else:
            pairs.append(None)
    for p in task.generate_problems(n_noisy, difficulty=diff, seed=rng.getrandbits(62), modulus=tc.modulus):
        ids, lab, aux = prm_example(tok, p, noisy_solution(p, rng, rng.uniform(0.2, 0.6)), tc.prm_label)
        ids_l.append(ids)
        aux_l.append(aux)
        lab_l.append(lab)
    ids = pad_right(ids_l, tok.pad_token_id)
    lab = pad_right(lab_l, -1, fill=-1)
    aux_t = pad_right([[0] * len(a) for a in aux_l], -100, fill=-100)[..., None].repeat(1, 1, len(AUX_NAMES))
    for r, a in enumerate(aux_l):
        aux_t[r, :len(a)] = torch.tensor(a)
    lm = lm_batch(tok, task.generate_problems(n_noisy, difficulty=diff, seed=rng.getrandbits(62), modulus=tc.modulus))
    return ids, lab, aux_t, pairs, lm


def _train_prm_stage(prm: Llama, tok, tc: TrainConfig, data, diff, rng: random.Random, schedule, name: str,
                     t0: float, log) -> None:
    """Trains `prm` in place for one stage, schedule = (steps, lr, warmup), on three losses per step
    (see the module docstring): BCE on step labels that position cannot predict, a pairwise ranking
    loss on prefixes that differ only in their last line, and the LM loss on gold solutions; plus
    the auxiliary heads' loss."""
    s_steps, s_lr, s_warm = schedule
    # auxiliary heads (see AUX_NAMES) on the output of the second-to-last layer, captured by a hook
    n_cls = max(tc.modulus, len(task.OPS))
    aux_head = nn.Sequential(RMSNorm(prm.c.hidden_size, prm.c.rms_norm_eps), nn.Linear(prm.c.hidden_size, len(AUX_NAMES) * n_cls))
    captured = {}
    hook = prm.model.layers[-2].register_forward_hook(lambda mod, inp, out: captured.__setitem__("h", out))
    params = list(prm.parameters()) + list(aux_head.parameters())
    opt = torch.optim.AdamW(params, lr=s_lr, betas=(0.9, 0.98), weight_decay=0.01)
    prm.train()
    n_pairs = max(1, tc.batch_size // 4)
    n_noisy = max(1, tc.batch_size // 2)
    pair_acc_run, bce_run, rank_run, aux_run = 0.5, 0.7, 0.7, 2.0
    for step in range(1, s_steps + 1):
        for g in opt.param_groups:
            g["lr"] = _lr(step - 1, s_steps, s_lr, s_warm)
        ids, lab, aux_t, pairs, (x, y) = _prm_batch(tok, tc, data, diff, rng, n_pairs, n_noisy)
        _, score = prm(ids)
        m = lab >= 0
        bce = F.binary_cross_entropy_with_logits(score[m], lab[m].float())
        aux_logits = aux_head(captured["h"]).view(*ids.shape, len(AUX_NAMES), n_cls)
        aux = F.cross_entropy(aux_logits.reshape(-1, n_cls), aux_t.reshape(-1), ignore_index=-100)
        ranked = [pr_ for pr_ in pairs if pr_ is not None]
        if ranked:
            s_right = torch.stack([score[i, j] for (i, j), _ in ranked])
            s_wrong = torch.stack([score[i, j] for _, (i, j) in ranked])
            # logistic ranking loss: -log sigmoid(s_right - s_wrong) (Bradley-Terry on the pair)
            rank = F.softplus(s_wrong - s_right).mean()
            pair_acc = float((s_right > s_wrong).float().mean())
        else:
            rank, pair_acc = score.sum() * 0.0, 0.5
        logits, _ = prm(x)
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
        loss = bce + tc.prm_rank_weight * rank + tc.prm_lm_weight * lm + tc.prm_aux_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        # running means for the log (one batch alone is noisy)
        pair_acc_run = 0.9 * pair_acc_run + 0.1 * pair_acc
        bce_run = 0.9 * bce_run + 0.1 * bce.item()
        rank_run = 0.9 * rank_run + 0.1 * rank.item()
        aux_run = 0.9 * aux_run + 0.1 * aux.item()
        if step % tc.eval_every == 0 or step == s_steps:
            with torch.no_grad():   # per-target auxiliary accuracy of this batch, to see what is learnt
                hit = (aux_logits.argmax(-1) == aux_t).float()
                cnt = (aux_t != -100).float()
                per = " ".join(f"{nm}={float(hit[..., j].sum() / cnt[..., j].sum().clamp(min=1)):.2f}"
                               for j, nm in enumerate(AUX_NAMES))
            log(f"{name} step {step} bce {bce_run:.4f} rank {rank_run:.4f} pair_acc {pair_acc_run:.3f} "
                f"aux {aux_run:.3f} lm {lm.item():.4f} ({time.time() - t0:.0f}s) [{per}]")
    hook.remove()
    prm.eval()


def train(tc: TrainConfig, out: str, log=print) -> Dict:
    if tc.policy_schedule not in ("cosine", "constant"):
        raise ValueError(f"--policy-schedule must be 'cosine' or 'constant', got {tc.policy_schedule!r}")
    t0 = time.time()
    torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    rng = random.Random(tc.seed)
    tok = task.make_tokenizer()
    mc = ModelConfig(vocab_size=tok.vocab_size, hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size,
                     num_hidden_layers=tc.num_hidden_layers, num_attention_heads=tc.num_attention_heads,
                     num_key_value_heads=tc.num_key_value_heads)
    if mc.num_attention_heads * mc.head_dim != mc.hidden_size:
        log(f"note: num_attention_heads*head_dim = {mc.num_attention_heads * mc.head_dim} != hidden_size")
    model = Llama(mc)
    log(f"params: {sum(p.numel() for n_, p in model.named_parameters() if n_ != 'score.weight'):,}")
    diff = (tc.min_difficulty, tc.max_difficulty)
    val = task.generate_problems(tc.eval_problems, difficulty=tc.difficulty, seed=tc.seed + 1_000_003, modulus=tc.modulus)
    gen = torch.Generator().manual_seed(tc.seed)

    # ---- 1. policy
    history: List[Dict] = []
    if tc.policy_from:
        # skip phase 1 (e.g. to tune the PRM): the PRM phase has its own seeded RNGs below, so this
        # gives the same PRM as a full run that produced this policy
        loaded, _ = load_checkpoint(tc.policy_from)
        model.load_state_dict(loaded.state_dict())
        meta_prev = os.path.join(os.path.dirname(os.path.abspath(tc.policy_from)), "meta.json")
        prev = json.load(open(meta_prev)) if os.path.exists(meta_prev) else {}
        policy_steps_run = prev.get("policy_steps_run")
        history = prev.get("policy_history", [])
        log(f"policy loaded from {tc.policy_from} ({policy_steps_run} steps)")
    else:
        policy_steps_run = _train_policy(model, tok, tc, rng, gen, val, diff, history, t0, log)
    model.eval()
    save_checkpoint(model, tok, os.path.join(out, "policy"), "policy")
    policy_state = {k: v.clone() for k, v in model.state_dict().items()}
    t_policy = time.time() - t0
    # PRM stages: (seed, steps, lr, warmup). Stage 2 (``--prm2-steps``) continues stage 1's PRM on
    # fresh policy samples with a lower learning rate and its own schedule, all in this one run.
    pmc = ModelConfig(**{**asdict(mc), "num_hidden_layers": mc.num_hidden_layers + tc.prm_extra_layers})
    stages = [(tc.seed, tc.prm_steps, tc.prm_lr, tc.warmup)]
    if tc.prm2_steps > 0:
        stages.append((tc.seed + 1, tc.prm2_steps, tc.prm2_lr, tc.prm2_warmup))
    prm, t_data, pos, neg, n_data = None, 0.0, 0, 0, 0
    for si, (s_seed, s_steps, s_lr, s_warm) in enumerate(stages):
        t_d0 = time.time()
        rng = random.Random(s_seed + 7)
        gen = torch.Generator().manual_seed(s_seed + 7)
        # ---- 2. PRM data (policy samples labelled exactly), then 3. the PRM itself
        data, pos_s, neg_s = _prm_stage_data(model, tok, tc, diff, rng, gen)
        pos, neg, n_data = pos + pos_s, neg + neg_s, n_data + len(data)
        log(f"prm stage {si + 1} data: {len(data)} policy samples, step labels +{pos_s} -{neg_s} ({time.time() - t0:.0f}s)")
        t_data += time.time() - t_d0
        prm = _init_prm(pmc, policy_state, prm, tc)
        _train_prm_stage(prm, tok, tc, data, diff, rng, (s_steps, s_lr, s_warm), f"prm stage {si + 1}", t0, log)
    save_checkpoint(prm, tok, os.path.join(out, "prm"), "prm")
    t_prm = time.time() - t0 - t_policy - t_data

    # ---- 4. held-out evaluation
    res = evaluate(model, prm, tok, tc, seed=tc.seed + 2_000_003, log=log) if tc.test_problems > 0 else {}
    meta = dict(
        task="ttscale.tasks.modarith", modulus=tc.modulus, seed=tc.seed, train_config=asdict(tc),
        model_config=asdict(mc), prm_model_config=asdict(pmc), policy_steps_run=policy_steps_run, prm_steps_run=sum(st[1] for st in stages),
        policy_history=history, prm_data=dict(policy_samples=n_data, positive_steps=pos, negative_steps=neg),
        weights_dtype="float32",
        wall_seconds=dict(policy=round(t_policy, 1), prm_data=round(t_data, 1), prm=round(t_prm, 1),
                          total=round(time.time() - t0, 1)),
        torch_version=torch.__version__, threads=tc.threads,
        eval=res,
        command="python scripts/train_builtin.py --out " + out + "".join(
            f" --{k.replace('_', '-')} {v}" for k, v in asdict(tc).items()
            if k == "seed" or v != TrainConfig.__dataclass_fields__[k].default),
    )
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    log(f"done in {time.time() - t0:.0f}s -> {out}")
    return meta


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (policy/, prm/, meta.json go there)")
    for name, field in TrainConfig.__dataclass_fields__.items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(field.default), default=field.default)
    a = vars(ap.parse_args(argv))
    out = a.pop("out")
    return train(TrainConfig(**a), out, log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    main()
