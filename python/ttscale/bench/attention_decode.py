"""``python -m ttscale.bench.attention_decode``: paged decode and shared-prefix decode vs plain torch.

Cases (issue #3 goals, H=32, Hkv=8, D=128, page size 16, measured in one process):
  (a) decode, one sequence of 8192 tokens: ttscale.paged_attention vs torch SDPA (dense KV, enable_gqa).
      GB/s counts the KV bytes read once.   goal: >= 60% of the measured read bandwidth, >= 3x SDPA
      The sequence's pages are scattered in the pool; a second row ("ordered") times ours with
      the pages in address order, to show what the scattering costs.
  (b) 64 branches sharing a 4096-token prefix, each with a 128-token private suffix:
      SharedPrefixDecode vs per-branch paged decode (no sharing, reads the prefix 64 times) vs the
      best plain-torch expression (grouped matmul of all 64*32 queries against the dense shared KV,
      computed once, plus per-branch suffix einsums, one joint softmax).
      goal: >= 10x vs per-branch decode and >= 3x vs plain torch.
      FLOPs count the attention math of the shared block + suffixes (4 N Hq L D);
      bytes count the KV read once (prefix once + every suffix).

Roofline for (b) (printed by main() from the ceilings measured in the same run):
  t_shared   >= max(flops / matmul rate, bytes_shared / read bandwidth)
  t_unshared >= N (Lp + Ls) Hkv D 2 elt / read bandwidth
  The reachable speed-up is t_unshared / t_shared: on a machine whose flop rate per byte of bandwidth
  is low (2 CPU cores), sharing turns a bandwidth-bound problem into a compute-bound one and the ratio
  is far below N.
"""
from __future__ import annotations

import argparse
import math

import torch

from . import harness

H, HKV, D, PS = 32, 8, 128, 16


def _pages(n_tok, start):
    n = (n_tok + PS - 1) // PS
    return torch.arange(start, start + n, dtype=torch.int32), n_tok - (n - 1) * PS


def decode_case(device: str, dtype: torch.dtype, L: int = 8192, scattered: bool = True):
    """scattered: the sequence's pages in random order (a fragmented pool, the stress case the goal
    is measured on); else in address order, as a fresh pool hands them out (ours only: SDPA reads the
    same dense KV either way). On the 2-core Zen 5 the scattered order costs ~10-15% of the GB/s."""
    import ttscale

    g = torch.Generator().manual_seed(0)
    n_pages = L // PS
    nbytes = 2 * L * HKV * D * torch.tensor([], dtype=dtype).element_size()
    # The KV of one sequence (34 MB bf16, 67 MB fp32) is near the size of a CPU's last-level cache, so
    # back-to-back calls on one cache would partly read from cache: every implementation rotates over
    # enough copies that each call streams its KV from memory, which is what the GB/s column claims.
    n_copies = harness.copies_to_defeat_cache(nbytes, device)
    ks, vs, kds, vds = [], [], [], []
    ip = torch.tensor([0, n_pages], dtype=torch.int32, device=device)
    ix = (torch.randperm(n_pages, generator=g) if scattered else torch.arange(n_pages)).to(device=device, dtype=torch.int32)
    last = torch.tensor([PS], dtype=torch.int32, device=device)
    for _ in range(n_copies):
        k = torch.randn(n_pages, PS, HKV, D, generator=g).to(device=device, dtype=dtype)
        v = torch.randn(n_pages, PS, HKV, D, generator=g).to(device=device, dtype=dtype)
        ks.append(k)
        vs.append(v)
        # SDPA gets the same KV as dense [1, Hkv, L, D] tensors (built once, outside the timing)
        kds.append(k[ix.long()].reshape(1, L, HKV, D).transpose(1, 2).contiguous())
        vds.append(v[ix.long()].reshape(1, L, HKV, D).transpose(1, 2).contiguous())
    q = torch.randn(1, H, D, generator=g).to(device=device, dtype=dtype)
    qd = q.reshape(1, H, 1, D)
    turn = {"ours": 0, "sdpa": 0}

    def ours():
        i = turn["ours"] = (turn["ours"] + 1) % n_copies
        return ttscale.ops.paged_attention(q, ks[i], vs[i], ip, ix, last)

    def sdpa():
        i = turn["sdpa"] = (turn["sdpa"] + 1) % n_copies
        return torch.nn.functional.scaled_dot_product_attention(qd, kds[i], vds[i], enable_gqa=True)

    tag = f"decode L={L} {str(dtype).replace('torch.', '')}" + ("" if scattered else " ordered")
    impls = {"ttscale.paged_attention": ours}
    if scattered:
        impls["torch SDPA (dense, gqa)"] = sdpa
    return harness.Case(
        tag,
        impls,
        bytes_read=nbytes, flops=4.0 * H * L * D,
        params={"L": L, "H": H, "Hkv": HKV, "D": D, "page_size": PS, "dtype": str(dtype), "kv_copies": n_copies,
            "pages": "scattered" if scattered else "in order"},
    )


def shared_prefix_case(device: str, dtype: torch.dtype, N: int = 64, Lp: int = 4096, Ls: int = 128):
    import ttscale
    from ttscale.attention import Level, SharedPrefixDecode

    g = torch.Generator().manual_seed(1)
    pre_pages, pre_last = _pages(Lp, 0)
    n_pre = pre_pages.numel()
    suf_n = (Ls + PS - 1) // PS
    n_pages = n_pre + N * suf_n
    k = torch.randn(n_pages, PS, HKV, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(n_pages, PS, HKV, D, generator=g).to(device=device, dtype=dtype)
    q = torch.randn(N, H, D, generator=g).to(device=device, dtype=dtype)
    suf_ix = torch.arange(n_pre, n_pages, dtype=torch.int32)
    suf_ip = torch.arange(0, N + 1, dtype=torch.int32) * suf_n
    suf_last = torch.full((N,), Ls - (suf_n - 1) * PS, dtype=torch.int32)
    spd = SharedPrefixDecode().plan([Level.shared(N, pre_pages, int(pre_last)),
                                     Level.per_branch(suf_ip, suf_ix, suf_last)], device=device)
    # per-branch page tables of the full sequences (prefix pages repeated)
    full_ix = torch.cat([torch.cat([pre_pages, suf_ix[b * suf_n:(b + 1) * suf_n]]) for b in range(N)]).to(device)
    full_ip = (torch.arange(0, N + 1, dtype=torch.int32) * (n_pre + suf_n)).to(device)
    full_last = suf_last.to(device)
    # plain torch: dense shared KV [Hkv, Lp, D] and dense suffixes [N, Hkv, Ls, D], built outside the timing
    kp = k[:n_pre].reshape(-1, HKV, D)[:Lp].permute(1, 0, 2).contiguous()
    vp = v[:n_pre].reshape(-1, HKV, D)[:Lp].permute(1, 0, 2).contiguous()
    ks = k[n_pre:].reshape(N, suf_n * PS, HKV, D)[:, :Ls].permute(0, 2, 1, 3).contiguous()
    vs = v[n_pre:].reshape(N, suf_n * PS, HKV, D)[:, :Ls].permute(0, 2, 1, 3).contiguous()
    grp = H // HKV
    scale = 1.0 / math.sqrt(D)

    def torch_grouped():
        qg = q.view(N, HKV, grp, D)
        s_pre = torch.matmul(qg.permute(1, 0, 2, 3).reshape(HKV, N * grp, D), kp.transpose(1, 2)) * scale
        s_pre = s_pre.view(HKV, N, grp, Lp).permute(1, 0, 2, 3)                     # [N, Hkv, g, Lp]
        s_suf = torch.matmul(qg, ks.transpose(2, 3)) * scale                          # [N, Hkv, g, Ls]
        p = torch.softmax(torch.cat([s_pre, s_suf], -1).float(), -1).to(dtype)
        o = torch.matmul(p[..., :Lp].permute(1, 0, 2, 3).reshape(HKV, N * grp, Lp), vp)
        o = o.view(HKV, N, grp, D).permute(1, 0, 2, 3) + torch.matmul(p[..., Lp:], vs)
        return o.reshape(N, H, D)

    es = k.element_size()
    flops = 4.0 * N * H * (Lp + Ls) * D
    bytes_shared = 2.0 * (Lp + N * Ls) * HKV * D * es
    bytes_unshared = 2.0 * N * (Lp + Ls) * HKV * D * es
    tag = f"shared-prefix N={N} Lp={Lp} Ls={Ls} {str(dtype).replace('torch.', '')}"
    case = harness.Case(
        tag,
        {
            "SharedPrefixDecode": lambda: spd.run(q, k, v),
            "per-branch paged decode": lambda: ttscale.ops.paged_attention(q, k, v, full_ip, full_ix, full_last),
            "torch grouped matmul": torch_grouped,
        },
        bytes_read=bytes_shared, flops=flops,
        params={"N": N, "Lp": Lp, "Ls": Ls, "H": H, "Hkv": HKV, "D": D, "page_size": PS, "dtype": str(dtype),
                "bytes_unshared": bytes_unshared},
    )
    return case


def cases(device: str, dtype: torch.dtype):
    """The suite's cases for one device and dtype (harness.Case objects)."""
    yield decode_case(device, dtype)
    yield decode_case(device, dtype, scattered=False)
    yield shared_prefix_case(device, dtype)


def roofline_text(case: harness.Case, rl: dict, ceil: dict) -> str:
    """One line for the printed report, naming the compute ceiling the bound rests on."""
    txt = (f"roofline {case.name}: shared >= {rl['t_shared_min_us']:.0f} us (compute {rl['t_shared_compute_us']:.0f} us, "
           f"bytes {rl['t_shared_bytes_us']:.0f} us); unshared >= {rl['t_unshared_min_us']:.0f} us; sharing can give at "
           f"most {rl['max_speedup_vs_unshared']:.1f}x here [compute ceiling: torch's float32 matmul measured now, "
           f"{ceil['matmul_tflops']:.2f} TFLOP/s; our tiles can run faster than that (bf16 dot products above all), "
           f"so the bound is loose]")
    return txt


def roofline(case: harness.Case, ceil: dict) -> dict:
    """Lower bounds on the time of (b) with and without sharing, from the measured ceilings."""
    bw = ceil["read_gbps"] * 1e9
    mm = ceil["matmul_tflops"] * 1e12
    t_shared = max(case.flops / mm, case.bytes_read / bw)
    t_unshared = max(case.params["bytes_unshared"] / bw, 4.0 * case.params["N"] * H * D / mm)  # decode: bandwidth
    return {"t_shared_min_us": t_shared * 1e6, "t_shared_compute_us": case.flops / mm * 1e6,
            "t_shared_bytes_us": case.bytes_read / bw * 1e6, "t_unshared_min_us": t_unshared * 1e6,
            "max_speedup_vs_unshared": t_unshared / t_shared}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ttscale.bench.attention_decode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="both", choices=["float32", "float16", "bfloat16", "both"])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and a smaller ceiling probe")
    ap.add_argument("--only", choices=["decode", "shared"], default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--json", default=None, help="where to write results (default: bench/results/attention_decode-<device>.json)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [torch.float32, torch.bfloat16] if args.dtype == "both" else [getattr(torch, args.dtype)]
    ceil = harness.ceilings(args.device, quick=args.quick)
    results = []
    for dt in dtypes:
        for case in cases(args.device, dt):
            if args.only == "decode" and not case.name.startswith("decode"):
                continue
            if args.only == "shared" and not case.name.startswith("shared"):
                continue
            if case.name.startswith("shared"):
                rl = roofline(case, ceil)
                case.params["roofline"] = rl
                print(roofline_text(case, rl, ceil))
            results += harness.run_case(case, args.device, ceil, warmup=1 if args.quick else 2,
                                        reps=3 if args.quick else args.reps)
    harness.print_table(f"ttscale bench attention_decode ({args.device}, {torch.get_num_threads()} threads)",
                        results, ceil)
    path = args.json or harness.default_json_path("attention_decode", args.device)
    harness.write_json(path, "attention_decode", args.device, ceil, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
