"""Same as `ttscale bench attention_decode` (see python/ttscale/bench/attention_decode.py)."""
import sys

from ttscale.bench.attention_decode import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
