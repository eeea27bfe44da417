"""``ttscale bench attention``: the attention suite of issue #3 in one run (one ceiling probe, one
table, one JSON), H=32, Hkv=8, D=128, fp32 and bf16:

  * prefill B=1, S=2048, causal: ttscale.attention vs torch SDPA       (attention_prefill.cases)
  * decode, one 8192-token sequence: ttscale.paged_attention vs SDPA  (attention_decode.decode_case),
    pages scattered in the pool, then ours again with the pages in address order
  * 64 branches sharing a 4096-token prefix, 128-token private suffixes: SharedPrefixDecode vs
    per-branch paged decode and vs a plain-torch grouped matmul       (attention_decode.shared_prefix_case)
    with the roofline bound on the speed-up that sharing can give on this machine.

The parts can be run alone: ``ttscale bench attention_prefill`` / ``ttscale bench attention_decode``.
"""
from __future__ import annotations

import argparse

import torch

from . import attention_decode, attention_prefill, harness


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ttscale bench attention", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="both", choices=["float32", "float16", "bfloat16", "both"])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and a smaller ceiling probe")
    ap.add_argument("--json", default=None, help="where to write results (default: bench/results/attention-<device>.json)")
    args = ap.parse_args(argv)
    dtypes = [torch.float32, torch.bfloat16] if args.dtype == "both" else [getattr(torch, args.dtype)]
    ceil = harness.ceilings(args.device, quick=args.quick)
    results = []
    for dt in dtypes:
        suite = [*attention_prefill.cases(args.device, dt), *attention_decode.cases(args.device, dt)]
        for case in suite:
            if case.name.startswith("shared"):
                rl = attention_decode.roofline(case, ceil)
                case.params["roofline"] = rl
                print(attention_decode.roofline_text(case, rl, ceil))
            results += harness.run_case(case, args.device, ceil, warmup=1 if args.quick else 2,
                                        reps=3 if args.quick else args.reps)
    harness.print_table(f"ttscale bench attention ({args.device}, {torch.get_num_threads()} threads)", results, ceil)
    path = args.json or harness.default_json_path("attention", args.device)
    harness.write_json(path, "attention", args.device, ceil, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
