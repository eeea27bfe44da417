"""Same as `ttscale bench sampling` (see python/ttscale/bench/sampling.py)."""
import sys

from ttscale.bench.sampling import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
