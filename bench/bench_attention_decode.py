"""Same as `python -m ttscale.bench.attention_decode` (see python/ttscale/bench/attention_decode.py).

Not yet registered as `ttscale bench attention_decode`: python/ttscale/bench/__init__.py (SUITES) is
owned by the lead; the entry to add is "attention_decode": "ttscale.bench.attention_decode".
"""
import sys

from ttscale.bench.attention_decode import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
