"""The engine: a decoder built from ttscale ops, a forkable paged KV pool, checkpoint loading."""
from .tokenizer import CharTokenizer  # noqa: F401
