"""Same as `ttscale bench quant` (see python/ttscale/bench/quant.py)."""
import sys

from ttscale.bench.quant import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
