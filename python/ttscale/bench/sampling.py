"""``ttscale bench sampling``: batched sampling vs plain torch.

Cases (issue #2 goals, measured in one process):
  * filtered: B=64, V=128256, fp32 logits, per-row top-k=50, top-p=0.9, min-p=0.05
      baselines: the plain-torch reference (softmax, sort, cumsum, mask, multinomial) and
      torch.topk + softmax + multinomial.            goal: >= 30x and >= 2x respectively
  * plain: same logits, no filters; baseline torch.multinomial(softmax(logits)).   goal: >= 3x
  * top-p only (no top-k: the threshold path over the whole vocabulary) vs the reference.
GB/s counts the logits read once.
"""
from __future__ import annotations

import argparse

import torch

from . import harness


def _cases(device: str, B: int, V: int, dtype: torch.dtype):
    import ttscale
    from ttscale.reference.sampling import sample_ref

    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(B, V, generator=g) * 2.0).to(device=device, dtype=dtype)
    nbytes = logits.numel() * logits.element_size()
    k = torch.full((B,), 50, dtype=torch.int64, device=device)
    p = torch.full((B,), 0.9, device=device)
    mp = torch.full((B,), 0.05, device=device)
    t = torch.full((B,), 1.0, device=device)
    tag = f"B={B} V={V} {str(dtype).replace('torch.', '')}"
    params = {"B": B, "V": V, "dtype": str(dtype)}

    def topk_softmax_multinomial():
        v, i = torch.topk(logits, 50, dim=-1)
        return i.gather(1, torch.multinomial(torch.softmax(v.float(), -1), 1))

    yield harness.Case(
        f"filtered k50 p.9 minp.05 {tag}",
        {
            "ttscale.sample": lambda: ttscale.ops.sample(logits, temperature=t, top_k=k, top_p=p, min_p=mp),
            "torch reference (sort)": lambda: sample_ref(logits, temperature=t, top_k=k, top_p=p, min_p=mp),
            "torch topk+softmax+multinom": topk_softmax_multinomial,
        },
        bytes_read=nbytes, params={**params, "filters": "top_k=50,top_p=0.9,min_p=0.05"},
    )
    yield harness.Case(
        f"plain {tag}",
        {
            "ttscale.sample": lambda: ttscale.ops.sample(logits),
            "torch multinomial(softmax)": lambda: torch.multinomial(torch.softmax(logits.float(), -1), 1),
        },
        bytes_read=nbytes, params={**params, "filters": "none"},
    )
    yield harness.Case(
        f"top-p 0.9 only {tag}",
        {
            "ttscale.sample": lambda: ttscale.ops.sample(logits, top_p=p),
            "torch reference (sort)": lambda: sample_ref(logits, top_p=p),
        },
        bytes_read=nbytes, params={**params, "filters": "top_p=0.9"},
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ttscale bench sampling", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and a smaller ceiling probe")
    ap.add_argument("--json", default=None, help="where to write results (default: bench/results/sampling-<device>.json)")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    ceil = harness.ceilings(args.device, quick=args.quick)
    results = []
    for case in _cases(args.device, args.batch, args.vocab, dtype):
        results += harness.run_case(case, args.device, ceil, warmup=2 if args.quick else 3,
                                    reps=5 if args.quick else args.reps)
    harness.print_table(f"ttscale bench sampling ({args.device}, {torch.get_num_threads()} threads)", results, ceil)
    path = args.json or harness.default_json_path("sampling", args.device)
    harness.write_json(path, "sampling", args.device, ceil, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
