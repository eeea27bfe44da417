"""``python -m ttscale.bench.attention_prefill``: dense flash attention forward (prefill) vs torch SDPA.

Cases (issue #3 goal: 2-core CPU, B=1, S=2048, H=32, Hkv=8, D=128, causal: at least as fast as
torch ``scaled_dot_product_attention``, fp32 and bf16), measured in one process with the shared
harness (interleaved repetitions, medians):
  * ours: ``ttscale.ops.attention`` on [B, S, H, D] inputs;
  * ``sdpa (enable_gqa)``: ``F.scaled_dot_product_attention(..., is_causal=True, enable_gqa=True)`` on
    head-major views ([B, H, S, D] transposes of the same tensors, as a model would pass them);
  * ``sdpa (repeated kv)``: the same with K/V repeated to Hq heads beforehand (repeat cost not timed).
TFLOP/s counts 4 * S_visible * D flops per query and head (two matmuls; causal halves the pairs).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from . import harness


def cases(device: str, dtype: torch.dtype, *, B: int = 1, S: int = 2048, Hq: int = 32, Hkv: int = 8, D: int = 128,
          causal: bool = True):
    import ttscale

    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(B, S, Hq, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, S, Hkv, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(B, S, Hkv, D, generator=g).to(device=device, dtype=dtype)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    kr, vr = kt.repeat_interleave(Hq // Hkv, dim=1), vt.repeat_interleave(Hq // Hkv, dim=1)
    pairs = S * (S + 1) / 2 if causal else S * S
    flops = 4.0 * B * Hq * D * pairs
    nbytes = (q.numel() + k.numel() + v.numel() + q.numel()) * q.element_size()
    tag = f"B={B} S={S} H={Hq}/{Hkv} D={D}{' causal' if causal else ''} {str(dtype).replace('torch.', '')}"
    yield harness.Case(
        tag,
        {
            "ttscale.attention": lambda: ttscale.ops.attention(q, k, v, causal=causal),
            "sdpa (enable_gqa)": lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=True),
            "sdpa (repeated kv)": lambda: F.scaled_dot_product_attention(qt, kr, vr, is_causal=causal),
        },
        bytes_read=nbytes, flops=flops,
        params={"B": B, "S": S, "Hq": Hq, "Hkv": Hkv, "D": D, "causal": causal, "dtype": str(dtype)},
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ttscale.bench.attention_prefill", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="both", choices=["float32", "float16", "bfloat16", "both"])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--no-causal", action="store_true")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and a smaller ceiling probe")
    ap.add_argument("--json", default=None, help="where to write results (default: bench/results/attention_prefill-<device>.json)")
    args = ap.parse_args(argv)
    dtypes = [torch.float32, torch.bfloat16] if args.dtype == "both" else [getattr(torch, args.dtype)]
    ceil = harness.ceilings(args.device, quick=args.quick)
    results = []
    for dt in dtypes:
        for case in cases(args.device, dt, B=args.batch, S=args.seq, Hq=args.heads, Hkv=args.kv_heads,
                          D=args.head_dim, causal=not args.no_causal):
            results += harness.run_case(case, args.device, ceil, warmup=1 if args.quick else 2,
                                        reps=3 if args.quick else args.reps)
    harness.print_table(f"ttscale bench attention_prefill ({args.device}, {torch.get_num_threads()} threads)",
                        results, ceil)
    for r in results:
        if r.tflops is not None:
            print(f"  {r.case:<48} {r.impl:<20} {1e3 * r.tflops:8.1f} GFLOP/s")
    path = args.json or harness.default_json_path("attention_prefill", args.device)
    harness.write_json(path, "attention_prefill", args.device, ceil, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
