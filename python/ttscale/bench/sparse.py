"""``python -m ttscale.bench.sparse``: query-aware sparse paged decode vs dense paged decode.

Case (issue #4 goals): one sequence of 32768 tokens, page size 16 (2048 pages, scattered), H=32,
Hkv=8, D=128, top_k_pages=64 plus 1 sink and 1 local page (66 of 2048 pages per KV head), bf16 (and
fp32 with ``--dtype both``), measured in one process:

  * ttscale.sparse_paged_attention (score + select + attend, one op)        goal: >= 5x dense
  * ttscale.paged_attention over the whole cache (dense)
  * the unfused torch pipeline: Quest scores of every page from the same summaries, topk, gather of
    the kept pages, SDPA (``reference.sparse_paged_attention.unfused_sparse_decode``)

GB/s counts the bytes the sparse op must read: the min/max summaries of every page plus the K/V rows
of the kept pages. Attention mass kept (``attention_mass`` of the selected pages, summed over pages,
mean over the 32 query heads) is reported on random data and on planted data (64 random pages get
keys aligned with the query, so a few pages hold most of the attention), next to the mass of the
best possible selection of the same size (the oracle: per KV head, the pages of largest exact mass).
"""
from __future__ import annotations

import argparse
import math

import torch

from . import harness

H, HKV, D, PS = 32, 8, 128, 16
L_TOKENS, TOP_K, SINK, LOCAL = 32768, 64, 1, 1


def make_cache(device: str, dtype: torch.dtype, planted: bool, L: int = L_TOKENS, seed: int = 0, n_hot: int = 64):
    g = torch.Generator().manual_seed(seed)
    n_pages = (L + PS - 1) // PS
    k = torch.randn(n_pages, PS, HKV, D, generator=g)
    v = torch.randn(n_pages, PS, HKV, D, generator=g)
    q = torch.randn(1, H, D, generator=g)
    ix = torch.randperm(n_pages, generator=g).to(torch.int32)  # scattered physical pages
    if planted:
        # n_hot logical pages (away from sink/local) hold keys aligned with the group's mean query
        hot = (torch.randperm(n_pages - 2 * SINK - 2 * LOCAL, generator=g)[:n_hot] + SINK + 1).tolist()
        dirs = q[0].view(HKV, H // HKV, D).mean(1)
        dirs = dirs / dirs.norm(dim=-1, keepdim=True)
        for j in hot:
            k[ix[j]] += 2.0 * math.sqrt(D) * dirs.unsqueeze(0) * torch.rand(PS, 1, 1, generator=g)
    ip = torch.tensor([0, n_pages], dtype=torch.int32)
    last = torch.tensor([L - (n_pages - 1) * PS], dtype=torch.int32)
    d = dict(device=device)
    return (q.to(dtype=dtype, **d), k.to(dtype=dtype, **d), v.to(dtype=dtype, **d), ip.to(**d), ix.to(**d),
            last.to(**d))


def mass_kept(q, k, ip, ix, last, sel) -> dict:
    """Mass of the selection and of the oracle selection of the same size (mean over query heads)."""
    import ttscale

    n_pages = int(ip[1] - ip[0])
    allp = torch.arange(n_pages, dtype=torch.int32, device=q.device).expand(1, HKV, n_pages).contiguous()
    full = ttscale.ops.attention_mass(q, k, ip, ix, last, allp)          # [1, H, n_pages]
    kept = ttscale.ops.attention_mass(q, k, ip, ix, last, sel).sum(-1)   # [1, H]
    n_sel = int((sel[0, 0] >= 0).sum())
    grp = full.view(1, HKV, H // HKV, n_pages).sum(2)                    # group mass per page
    best = grp.topk(n_sel, dim=-1).indices.to(torch.int32)               # [1, Hkv, n_sel]
    oracle = torch.gather(full.view(1, HKV, H // HKV, n_pages), 3,
                          best.long().unsqueeze(2).expand(1, HKV, H // HKV, n_sel)).sum(-1)
    return {"mass_kept_mean": float(kept.mean()), "mass_kept_min": float(kept.min()),
            "oracle_mass_mean": float(oracle.mean()), "pages_kept": n_sel, "pages_total": n_pages}


def sparse_case(device: str, dtype: torch.dtype, planted: bool):
    import ttscale
    from ttscale.reference.sparse_paged_attention import unfused_sparse_decode

    q, k, v, ip, ix, last = make_cache(device, dtype, planted)
    s = ttscale.ops.new_page_summaries(k)
    _, sel = ttscale.ops.sparse_paged_attention(q, k, v, s, ip, ix, last, top_k_pages=TOP_K, sink_pages=SINK,
                                                local_pages=LOCAL, return_selected=True)
    mass = mass_kept(q, k, ip, ix, last, sel)
    n_pages = int(ip[1])
    es = k.element_size()
    kept = TOP_K + SINK + LOCAL
    bytes_sparse = 2 * n_pages * HKV * D * es + 2 * kept * PS * HKV * D * es
    flops = 4.0 * H * kept * PS * D + 4.0 * H * n_pages * D
    last_len = int(last[0])
    tag = f"sparse L={L_TOKENS} top_k={TOP_K} {'planted' if planted else 'random'} {str(dtype).replace('torch.', '')}"
    return harness.Case(
        tag,
        {
            "ttscale.sparse_paged_attention": lambda: ttscale.ops.sparse_paged_attention(
                q, k, v, s, ip, ix, last, top_k_pages=TOP_K, sink_pages=SINK, local_pages=LOCAL),
            "ttscale.paged_attention (dense)": lambda: ttscale.ops.paged_attention(q, k, v, ip, ix, last),
            "torch unfused (score+topk+gather+SDPA)": lambda: unfused_sparse_decode(
                q, k, v, s, ix, last_len, top_k_pages=TOP_K, sink_pages=SINK, local_pages=LOCAL),
        },
        bytes_read=bytes_sparse, flops=flops,
        params={"L": L_TOKENS, "H": H, "Hkv": HKV, "D": D, "page_size": PS, "top_k_pages": TOP_K, "sink_pages": SINK,
                "local_pages": LOCAL, "dtype": str(dtype), "data": "planted" if planted else "random",
                "bytes_dense": 2 * L_TOKENS * HKV * D * es, **mass},
    )


def cases(device: str, dtype: torch.dtype):
    yield sparse_case(device, dtype, planted=False)
    yield sparse_case(device, dtype, planted=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ttscale.bench.sparse", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16", "both"])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and a smaller ceiling probe")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--json", default=None, help="where to write results (default: bench/results/sparse-<device>.json)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [torch.bfloat16, torch.float32] if args.dtype == "both" else [getattr(torch, args.dtype)]
    ceil = harness.ceilings(args.device, quick=args.quick)
    results = []
    for dt in dtypes:
        for case in cases(args.device, dt):
            p = case.params
            print(f"{case.name}: attention mass kept {p['mass_kept_mean']:.3f} (min over heads "
                  f"{p['mass_kept_min']:.3f}; oracle {p['pages_kept']} pages: {p['oracle_mass_mean']:.3f})")
            results += harness.run_case(case, args.device, ceil, warmup=1 if args.quick else 2,
                                        reps=3 if args.quick else args.reps)
    harness.print_table(f"ttscale bench sparse ({args.device}, {torch.get_num_threads()} threads)", results, ceil)
    path = args.json or harness.default_json_path("sparse", args.device)
    harness.write_json(path, "sparse", args.device, ceil, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
