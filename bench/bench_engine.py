"""Same as `ttscale bench engine` (see python/ttscale/bench/engine.py)."""
import sys

from ttscale.bench.engine import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
