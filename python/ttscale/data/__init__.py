"""Data shipped inside the package: the built-in policy and process reward model checkpoints.

``builtin_path("policy")`` / ``builtin_path("prm")`` are Hugging Face style Llama checkpoint folders
(config.json, model.safetensors, ttscale_tokenizer.json) trained by ``scripts/train_builtin.py`` on
:mod:`ttscale.tasks.modarith`; ``builtin_path("meta")`` is the training record (meta.json). See
``builtin/README.md`` for what the models compute and how to reproduce them.
"""
from __future__ import annotations

import os

__all__ = ["BUILTIN_DIR", "builtin_path"]

BUILTIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "builtin")
_KINDS = {"policy": "policy", "prm": "prm", "meta": "meta.json"}


def builtin_path(kind: str) -> str:
    """Path of a built-in artefact: ``"policy"``, ``"prm"`` (folders) or ``"meta"`` (meta.json)."""
    if kind not in _KINDS:
        raise ValueError(f"builtin_path: kind must be one of {sorted(_KINDS)}, got {kind!r}")
    path = os.path.join(BUILTIN_DIR, _KINDS[kind])
    if not os.path.exists(path):
        raise FileNotFoundError(f"builtin_path: {path} is missing; rebuild it with "
                                f"`python scripts/train_builtin.py --out {BUILTIN_DIR} --seed 0`")
    return path
