"""The engine: a decoder built from ttscale ops, a forkable paged KV pool, checkpoint loading.

* :class:`Transformer` (``model.py``): Llama / Qwen2-style decoder (and the sequence-classification
  head used as a PRM); ``forward_tokens`` is a stateless ragged forward.
* :func:`load_checkpoint` / :func:`load_builtin` (``checkpoint.py``): local HF-style checkpoints.
* :class:`KVPool` (``kvpool.py``): paged KV with reference-counted pages and copy-on-write fork.
* :class:`Engine` (``engine.py``): prefill / fork / extend / append / release on :class:`Node` handles,
  lock-step batched decoding with shared-prefix attention.
* :class:`PrefixScorer` (``scorer.py``): per-position outputs (a PRM's scores) over sequences that
  share prefixes, running only the tokens after the longest prefix already scored.
"""
from .checkpoint import HFTokenizer, load_builtin, load_checkpoint, parse_config  # noqa: F401
from .engine import Engine, EngineCounters, ExtendResult, Node, SamplingParams  # noqa: F401
from .kvpool import KVPool, KVPoolExhausted  # noqa: F401
from .model import ModelConfig, Transformer  # noqa: F401
from .scorer import PrefixScorer  # noqa: F401
from .tokenizer import CharTokenizer  # noqa: F401

__all__ = ["CharTokenizer", "HFTokenizer", "Transformer", "ModelConfig", "load_checkpoint", "load_builtin",
           "parse_config", "KVPool", "KVPoolExhausted", "Engine", "EngineCounters", "ExtendResult", "Node",
           "SamplingParams", "PrefixScorer"]
