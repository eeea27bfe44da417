"""Reading the small JSON files that sit next to a checkpoint (config.json, the safetensors index,
tokenizer_config.json, ttscale_tokenizer.json) so that every way a file can be wrong is one
``ValueError`` naming it, never the parser's own exception type.

``json.load`` has more failure modes than ``JSONDecodeError``: deep nesting ends in RecursionError
(the C scanner recurses once per level), bytes that are not UTF-8 raise UnicodeDecodeError, and an
integer literal longer than ``sys.get_int_max_str_digits()`` a plain ValueError. A directory or FIFO
where the file should be would raise IsADirectoryError or block in ``open``, so only regular files
(symlinks followed) are opened.
"""
from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["read_json", "read_json_object", "json_kind"]


def json_kind(v: Any) -> str:
    """The JSON name of a parsed value's type, for messages ("an array", not "a list")."""
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, bool):
        return "a boolean"
    if v is None:
        return "null"
    return "a number"


def read_json(path: str) -> Any:
    """Parsed contents of ``path``; ValueError ``"<path>: <what is wrong>"`` on any failure."""
    if not os.path.isfile(path):
        what = "does not exist" if not os.path.lexists(path) else "is not a regular file"
        raise ValueError(f"{path}: {what}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply to parse") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    except ValueError as e:  # JSONDecodeError, or an over-long integer literal
        raise ValueError(f"{path}: malformed JSON: {e}") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e}") from None


def read_json_object(path: str) -> dict:
    """:func:`read_json` for files whose top level must be a JSON object."""
    d = read_json(path)
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level, got {json_kind(d)}")
    return d
