"""Same as `ttscale bench sparse` (see python/ttscale/bench/sparse.py)."""
import sys

from ttscale.bench.sparse import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
