"""Same as `ttscale bench attention` (see python/ttscale/bench/attention.py)."""
import sys

from ttscale.bench.attention import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
