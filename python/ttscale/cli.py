"""The ``ttscale`` command: ``info``, ``bench <suite>``, ``demo``."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import List, Optional


def _info(_args) -> int:
    import ttscale

    print(json.dumps(ttscale.build_info(), indent=1))
    return 0


def _bench(args) -> int:
    from ttscale.bench import SUITES

    if args.suite not in SUITES:
        print(f"ttscale bench: unknown suite '{args.suite}'; available: {', '.join(SUITES)}", file=sys.stderr)
        return 2
    return importlib.import_module(SUITES[args.suite]).main(args.rest)


def _demo(args) -> int:
    from ttscale import demo

    return demo.main(args.rest)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="ttscale", description="ttscale: kernels for test-time compute")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="build information (version, torch, CUDA archs, CPU SIMD path)").set_defaults(fn=_info)
    b = sub.add_parser("bench", help="time ttscale kernels against torch baselines (ttscale bench SUITE --help)")
    from ttscale.bench import SUITES  # a plain dict: importing it loads no kernels

    b.add_argument("suite", help=", ".join(SUITES))
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(fn=_bench)
    d = sub.add_parser("demo", help="test-time scaling curves: accuracy vs compute per search strategy (ttscale demo --help)")
    d.add_argument("rest", nargs=argparse.REMAINDER)
    d.set_defaults(fn=_demo)
    # argparse's REMAINDER does not take a leading "--flag" after a sub-command, so pass unknown
    # options through to the sub-command's own parser.
    args, unknown = ap.parse_known_args(argv)
    if unknown:
        if not hasattr(args, "rest"):
            ap.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.rest = unknown + list(args.rest)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
