"""``ttscale demo``.

The test-time search demo (built-in model, task and PRM) arrives with the engine and search issues.
Until then the demo runs what exists: batched sampling on built-in distributions. For each
distribution and filter setting it draws many samples from one row with ``indices`` (best-of-N from
one prompt without copying the row), and compares the empirical frequencies with the exact
filtered distribution from the float64 reference.
"""
from __future__ import annotations

import argparse
import time

import torch


def builtin_distributions(V: int, generator: torch.Generator) -> dict:
    """Logits shaped like an LLM's next-token distribution, and a flat one."""
    ranks = torch.arange(1, V + 1, dtype=torch.float64)
    zipf = (-1.1 * torch.log(ranks))[torch.randperm(V, generator=generator)]  # p ~ rank^-1.1
    noisy = torch.randn(V, generator=generator, dtype=torch.float64) * 3.0
    flat = torch.randn(V, generator=generator, dtype=torch.float64) * 0.5
    return {"zipf (LLM-like)": zipf.float(), "gaussian std 3": noisy.float(), "near-flat std 0.5": flat.float()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ttscale demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--draws", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import ttscale
    from ttscale.reference.sampling import filtered_probs

    info = ttscale.build_info()
    print(f"ttscale {info['version']} demo: batched sampling (CPU path: {info['cpu_isa']}, "
          f"{info['num_threads']} threads; CUDA kernels built: {info['cuda']})")
    print("The search demo (built-in model + PRM, accuracy vs compute) comes with the engine; this demo runs the\n"
          f"sampling ops: {args.draws} draws from one row of V={args.vocab} per setting, via indices.\n")
    g = torch.Generator().manual_seed(args.seed)
    settings = [
        ("none", {}),
        ("temperature 0.7", {"temperature": 0.7}),
        ("top_k 50", {"top_k": 50}),
        ("top_p 0.9", {"top_p": 0.9}),
        ("min_p 0.05", {"min_p": 0.05}),
        ("k50 p.9 minp.05", {"top_k": 50, "top_p": 0.9, "min_p": 0.05}),
    ]
    idx = torch.zeros(args.draws, dtype=torch.int64)
    print(f"{'distribution':<20} {'filters':<18} {'kept tokens':>11} {'top token p':>11} {'TV(emp, exact)':>15} "
          f"{'draws outside':>13} {'Mdraws/s':>9}")
    for dname, row in builtin_distributions(args.vocab, g).items():
        logits = row[None, :]
        for sname, kw in settings:
            exact = filtered_probs(logits, **kw)[0]
            t0 = time.perf_counter()
            toks = ttscale.ops.sample(logits, indices=idx, seed=args.seed, **kw)
            dt = time.perf_counter() - t0
            freq = torch.bincount(toks, minlength=args.vocab).double() / args.draws
            tv = 0.5 * (freq - exact).abs().sum().item()
            outside = int((exact[toks] == 0).sum())
            print(f"{dname:<20} {sname:<18} {int((exact > 0).sum()):>11} {exact.max().item():>11.4f} {tv:>15.4f} "
                  f"{outside:>13} {args.draws / dt / 1e6:>9.2f}")
    greedy = ttscale.ops.sample(torch.stack(list(builtin_distributions(args.vocab, g).values())), temperature=0)
    print(f"\ngreedy (temperature 0) on the three rows: {greedy.tolist()}")
    print("TV is the total-variation distance between the empirical and exact filtered distributions; with "
          f"{args.draws} draws, sampling noise alone gives about sqrt(kept/draws)/2.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
