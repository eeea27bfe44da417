"""Tokenizers the engine understands.

``CharTokenizer`` is the built-in models' tokenizer: one token per character of a fixed alphabet
plus special tokens. It is stored next to a checkpoint as ``ttscale_tokenizer.json``::

    {"type": "char", "vocab": ["<pad>", "<bos>", "<eos>", "0", "1", ...],
     "pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>"}

Token id = index in ``vocab``. Special tokens are whole entries of ``vocab`` (never produced by
``encode`` of plain text); ``decode`` drops them unless ``skip_special=False``.

Every tokenizer the engine uses has the same small interface: ``encode(text) -> list[int]``
(no BOS; callers add ``bos_token_id`` when the model wants it), ``decode(ids) -> str``,
``vocab_size``, ``bos_token_id``, ``eos_token_id``, ``pad_token_id`` (``None`` when absent).
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Optional, Sequence

from ._jsonfile import read_json_object

__all__ = ["CharTokenizer", "TOKENIZER_FILE"]

TOKENIZER_FILE = "ttscale_tokenizer.json"


class CharTokenizer:
    def __init__(self, vocab: Sequence[str], *, pad_token: str = "<pad>", bos_token: str = "<bos>",
                 eos_token: str = "<eos>") -> None:
        vocab = list(vocab)
        # Types first: set() of an unhashable entry, len() of an int and `in` with a list token would
        # otherwise fail as TypeErrors that do not say which entry is wrong.
        for i, t in enumerate(vocab):
            if not isinstance(t, str):
                raise ValueError(f"CharTokenizer: vocab[{i}] must be a string, got {t!r}")
        for name, t in (("pad_token", pad_token), ("bos_token", bos_token), ("eos_token", eos_token)):
            if t is not None and not isinstance(t, str):
                raise ValueError(f"CharTokenizer: {name} must be a string or null, got {t!r}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("CharTokenizer: vocab has duplicate entries")
        self.vocab: List[str] = vocab
        self._id: Dict[str, int] = {t: i for i, t in enumerate(vocab)}
        self.special = {t for t in (pad_token, bos_token, eos_token) if t is not None}
        for t in self.special:
            if t not in self._id:
                raise ValueError(f"CharTokenizer: special token {t!r} is not in vocab")
        for t in vocab:
            if t not in self.special and len(t) != 1:
                raise ValueError(f"CharTokenizer: non-special vocab entry {t!r} is not one character")
        self.pad_token, self.bos_token, self.eos_token = pad_token, bos_token, eos_token

    @classmethod
    def from_alphabet(cls, alphabet: Iterable[str]) -> "CharTokenizer":
        chars = sorted(set(alphabet))
        return cls(["<pad>", "<bos>", "<eos>"] + chars)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def pad_token_id(self) -> Optional[int]:
        return self._id.get(self.pad_token)

    @property
    def bos_token_id(self) -> Optional[int]:
        return self._id.get(self.bos_token)

    @property
    def eos_token_id(self) -> Optional[int]:
        return self._id.get(self.eos_token)

    def encode(self, text: str) -> List[int]:
        try:
            return [self._id[c] for c in text]
        except KeyError as e:
            raise ValueError(f"CharTokenizer.encode: character {e.args[0]!r} is not in the vocabulary "
                             f"({''.join(t for t in self.vocab if t not in self.special)!r})") from None

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        out = []
        n = len(self.vocab)
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                raise ValueError(f"CharTokenizer.decode: token id {i} out of range [0, {n})")
            t = self.vocab[i]
            if skip_special and t in self.special:
                continue
            out.append(t)
        return "".join(out)

    def to_dict(self) -> dict:
        return {"type": "char", "vocab": self.vocab, "pad_token": self.pad_token, "bos_token": self.bos_token,
                "eos_token": self.eos_token}

    def save(self, directory: str) -> str:
        path = os.path.join(directory, TOKENIZER_FILE)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        return path

    @classmethod
    def load(cls, path: str) -> "CharTokenizer":
        if os.path.isdir(path):
            path = os.path.join(path, TOKENIZER_FILE)
        try:
            d = read_json_object(path)
            if d.get("type") != "char" or not isinstance(d.get("vocab"), list):
                raise ValueError(f"{path}: not a ttscale char tokenizer (type/vocab missing)")
            try:
                return cls(d["vocab"], pad_token=d.get("pad_token"), bos_token=d.get("bos_token"),
                           eos_token=d.get("eos_token"))
            except ValueError as e:
                raise ValueError(f"{path}: {str(e).removeprefix('CharTokenizer: ')}") from None
        except ValueError as e:  # every message starts with the file's path
            raise ValueError(f"CharTokenizer.load: {e}") from None
