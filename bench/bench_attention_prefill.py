"""Same as `python -m ttscale.bench.attention_prefill` (see python/ttscale/bench/attention_prefill.py)."""
import sys

from ttscale.bench.attention_prefill import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
