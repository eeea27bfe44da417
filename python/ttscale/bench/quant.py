"""``python -m ttscale.bench.quant``: low-bit weight-only matmul vs torch (issue 5 goals).

Cases: K in {4096, 14336}, N = 4096, bf16 activations, M in {1, 4, 16, 64}; 4-bit G=128 against
torch ``_weight_int4pack_mm_for_cpu`` (same codes, tinygemm float zeros ``(8 - z) * s`` in bf16) and
dense bf16 ``F.linear``; also ours at 2, 3 and 8 bits (``--bits``).

DRAM, not cache: the 4-bit weight of K=14336 N=4096 is 29 MB and fits a 32 MiB L3, so calling one
weight back to back would time cache reads. Every implementation (ours and each baseline alike)
cycles through its own ``copies`` weights with at least ``4 x`` the last-level cache in total
(``_copies_for``), so each call reads its weight bytes from DRAM. ``--copies 1`` times the
cache-resident case instead (reported as such in the case name). GB/s counts the weight bytes each
call must read (codes + scales + zeros).

Read-bandwidth ceiling: the harness probe is one median of a ``sum`` over 1 GiB; on a shared 2-core
VM that varies by 2x between runs (another process on the other core, the reduction's own cost).
``_read_ceiling`` takes the best of the harness value and the medians of several reductions
(``amax``, ``sum``) over a buffer far larger than the LLC, so %bw is measured against the highest read
rate this process can show now, not a depressed one.
Goals (2-core CPU): M=1 >= 1.5x torch int4 and >= 70% of measured read bandwidth; M=16 >= 2x torch
int4 and faster than dense bf16. ``--device cuda`` times the CUDA kernels (layout cuda_k32) against
dense ``F.linear`` (goals: M=1 >= 3x, M=16 >= 2.5x); not yet run on a GPU.
"""
from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from . import harness


def _copies_for(nbytes: int, copies) -> int:
    """Weight copies to cycle through: enough that their total is >= 4x the LLC (so a cyclic walk
    always misses it, LRU or not), unless ``copies`` forces a number (1 = cache-resident)."""
    if copies:
        return int(copies)
    return harness.copies_to_defeat_cache(nbytes, "cpu", factor=4, minimum=2)


def _read_ceiling(device: str, ceil: dict, quick: bool) -> dict:
    """Best of the harness probe and the medians of a few more full reductions (see module doc)."""
    if device != "cpu":
        return ceil
    import statistics
    import time

    buf = torch.rand(int((0.25 if quick else 0.5) * 2**30 / 4))
    best = ceil["read_gbps"]
    for fn in (buf.amax, buf.sum, buf.amax, buf.sum):
        fn()
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        best = max(best, buf.numel() * 4 / statistics.median(ts) / 1e9)
    return dict(ceil, read_gbps=best, read_gbps_harness=ceil["read_gbps"])


def _cycle(items):
    it = itertools.cycle(items)
    return lambda: next(it)


def _torch_int4(qw, dtype):
    """Our logical codes/scales/zeros in torch's CPU tinygemm form (W = (q - 8) * s + zf)."""
    from ttscale.ops import unpack

    n, k = qw.shape
    g = qw.group
    codes = unpack(qw).to(torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    s = qw.scales.to(torch.float32)
    z = qw.zeros.to(torch.float32) if qw.zeros is not None else torch.full_like(s, 8.0)
    sz = torch.stack([s, (8.0 - z) * s], dim=-1).transpose(0, 1).contiguous().to(dtype)  # [K/G, N, 2]
    return packed, g, sz


def cases(device: str = "cpu", dtype: torch.dtype = torch.bfloat16, ks=(4096, 14336), n: int = 4096,
          ms=(1, 4, 16, 64), bits_list=(4, 2, 3, 8), group_size: int = 128, copies=None):
    import ttscale
    from ttscale.ops import quantize

    if device not in ("cpu", "cuda"):
        raise NotImplementedError(f"ttscale bench quant: no {device} path (cpu or cuda)")
    gpu = device == "cuda"
    for k in ks:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(n, k, generator=g) * 0.02
        wd = w.to(dtype).to(device)
        dense = [wd] + [wd.clone() for _ in range(_copies_for(wd.numel() * wd.element_size(), copies) - 1)]
        for bits in bits_list:
            qw = quantize(w, bits=bits, group_size=group_size)
            nbytes = qw.nbytes()
            nc = _copies_for(nbytes, copies)
            qws = [qw] + [type(qw)(qw.packed.clone(), qw.scales.clone(),
                                   None if qw.zeros is None else qw.zeros.clone(),
                                   qw.bits, qw.group_size, qw.shape, qw.layout) for _ in range(nc - 1)]
            t4 = None
            if bits == 4 and not gpu:  # torch's packed weight is as large as ours: same number of copies
                t0 = _torch_int4(qw, dtype)
                t4 = [t0] + [(t0[0].clone(), t0[1], t0[2].clone()) for _ in range(nc - 1)]
            where = "L3" if nc == 1 else "DRAM"
            if gpu:  # CUDA layout (cuda_k32); baseline: dense F.linear in the activation dtype
                qws = [q.to(device) for q in qws]
            for m in ms:
                x = torch.randn(m, k, generator=g).to(dtype).to(device)
                nq = _cycle(qws)
                impls = {f"ttscale int{bits}": lambda x=x, nq=nq: ttscale.ops.quant_matmul(x, nq())}
                if t4 is not None:
                    nt = _cycle(t4)

                    def torch_int4(x=x, nt=nt):
                        p, gs, sz = nt()
                        return torch._weight_int4pack_mm_for_cpu(x, p, gs, sz)

                    impls["torch int4pack_mm"] = torch_int4
                if t4 is not None or (gpu and bits == 4):
                    nd = _cycle(dense)
                    impls["torch F.linear bf16"] = lambda x=x, nd=nd: F.linear(x, nd())
                yield harness.Case(f"K={k} N={n} M={m} b{bits} G{group_size}" + (" L3" if nc == 1 else ""),
                                   impls, bytes_read=nbytes, flops=2.0 * m * n * k,
                                   params={"K": k, "N": n, "M": m, "bits": bits, "group_size": group_size,
                                           "dtype": str(dtype), "copies": nc, "weights_from": where})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ttscale bench quant", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--k", type=int, nargs="+", default=[4096, 14336])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 2, 3, 8])
    ap.add_argument("--copies", type=int, default=None,
                    help="weight copies to cycle through (default: >= 4x the LLC in total; 1 = cache-resident)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and a smaller ceiling probe")
    ap.add_argument("--json", default=None, help="where to write results (default: bench/results/quant-<device>.json)")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    ceil = _read_ceiling(args.device, harness.ceilings(args.device, quick=args.quick), args.quick)
    results = []
    for case in cases(args.device, dtype, ks=args.k, n=args.n, ms=args.m, bits_list=args.bits, copies=args.copies):
        results += harness.run_case(case, args.device, ceil, warmup=2 if args.quick else 3,
                                    reps=5 if args.quick else args.reps)
    harness.print_table(f"ttscale bench quant ({args.device}, {torch.get_num_threads()} threads)", results, ceil)
    path = args.json or harness.default_json_path("quant", args.device)
    harness.write_json(path, "quant", args.device, ceil, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
