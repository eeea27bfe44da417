"""``ttscale demo``: test-time scaling curves.

Runs a held-out set of problems with each search strategy at budgets n = 1, 2, 4, ... and reports
accuracy against the compute spent: generated tokens, KV bytes read (with prefix sharing, and the
ratio to what unshared branches would read) and wall time; writes a PNG of accuracy vs compute per
strategy. Budget n is what the papers report: samples (best-of-N, voting), beams, particles, width.

Backends:
  default     the built-in policy + process reward model on the built-in task (``ttscale.engine``
              and ``ttscale.tasks``); ``--model PATH`` loads a local checkpoint instead.
  --simulate  a model-free simulator (``ttscale.search.simulator``): steps correct with a known
              probability, a noisy PRM; runs anywhere in seconds. Used automatically, with a
              message, when the engine is not available in this build.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from ._argtypes import budget_list, difficulty, float_at_least, int_at_least

DEFAULT_STRATEGIES = ("majority", "best-of-n", "weighted-bon", "beam", "dvts", "rebase", "particle-filter")
# the engine path runs a real model on the CPU: five strategies, 20 problems, budgets 1..64 by default
# (about 3 minutes on 2 cores, measured 2026-11-22; --strategies / --problems / --max-budget change it)
ENGINE_DEFAULTS = {"strategies": ("majority", "best-of-n", "beam", "rebase", "particle-filter"), "problems": 20,
                   "max_budget": 64}
HELDOUT_SEED = 1_000_003  # problems drawn from a seed range training never uses


@dataclass
class Instance:
    """One problem as the search sees it."""
    prompt: str
    gen: Any                       # a Generator
    verifier: Any                  # a Verifier (None: voting only)
    is_correct: Callable[[Optional[str]], bool]


class SimBackend:
    name = "simulator"

    def __init__(self, args) -> None:
        from ttscale.search.simulator import sim_problems

        self.args = args
        self.problems = sim_problems(args.problems, seed=HELDOUT_SEED + args.seed, steps=(4, 10), p=(0.5, 0.92),
                                     prompt_tokens=(48, 160))

    def describe(self) -> str:
        return (f"model-free simulator: {len(self.problems)} problems, 4-10 steps, per-step accuracy 0.5-0.92, "
                f"PRM noise {self.args.prm_noise}")

    def instance(self, i: int) -> Instance:
        from ttscale.search.simulator import SimGenerator, SimPRM

        p = self.problems[i]
        return Instance(p.prompt, SimGenerator(p), SimPRM(noise=self.args.prm_noise, seed=i),
                        lambda a, p=p: a == p.answer)


class EngineBackend:
    """The built-in policy and PRM (or local checkpoints) on the built-in task. Raises ImportError /
    FileNotFoundError when this build has no engine, task or built-in checkpoints (the caller falls
    back to the simulator)."""
    name = "engine"

    def __init__(self, args) -> None:
        import ttscale.engine as engine_mod
        from ttscale import tasks
        from ttscale.search.engine_adapter import EngineGenerator, PRMVerifier, load_engine_and_prm

        self.engine, prm = load_engine_and_prm(args.model, args.prm)
        self.tasks = tasks
        self.problems = tasks.generate_problems(args.problems, seed=HELDOUT_SEED + args.seed,
                                                **({"difficulty": args.difficulty} if args.difficulty else {}))
        delim = getattr(tasks, "STEP_DELIMITER", "\n")
        self.gen = EngineGenerator(self.engine, step_delimiter=delim, max_step_tokens=args.max_step_tokens,
                                   max_new_tokens=args.max_new_tokens,
                                   sampling=engine_mod.SamplingParams(temperature=args.temperature),
                                   extract_answer=tasks.extract_answer)
        # The built-in PRM is trained on per-step labels ("this step is right given the lines
        # before it"), so a partial solution's score is the min over its steps, not the last one.
        self.prm = PRMVerifier(prm, self.engine.tokenizer, step_delimiter=delim, aggregate=args.prm_aggregate)
        self.args = args

    def describe(self) -> str:
        src = self.args.model or "built-in policy"
        ver = ("the task's exact step checker (an oracle PRM)" if self.args.verifier == "exact"
               else f"PRM ({self.args.prm or 'built-in'}, {self.args.prm_aggregate} over steps)")
        return f"engine ({src}) + {ver}, {len(self.problems)} held-out problems"

    def instance(self, i: int) -> Instance:
        p = self.problems[i]
        ver = self.prm
        if self.args.verifier == "exact":
            from ttscale.search import ExactVerifier

            ver = ExactVerifier(lambda t, p=p: self.tasks.check_answer(p, t),
                                lambda t, p=p: self.tasks.check_steps(p, t))
        return Instance(p.prompt, self.gen, ver,
                        lambda a, p=p: a is not None and str(a).strip() == str(p.answer))


def make_strategy(name: str, args):
    from ttscale import search

    if name == "beam":
        return search.BeamSearch(beam_width=args.beam_width)
    if name == "dvts":
        return search.DVTS(beam_width=args.beam_width)
    if name == "mcts":
        return search.MCTS(expand_width=2)
    if name not in search.STRATEGIES:
        raise ValueError(f"ttscale demo: unknown strategy {name!r}; choose from {', '.join(search.STRATEGIES)}")
    return search.STRATEGIES[name]()


def run_grid(backend, strategies: Sequence[str], budgets: Sequence[int], args, progress=True) -> List[dict]:
    from ttscale.search import Budget

    rows = []
    total = len(strategies) * len(budgets) * len(backend.problems)
    bar = _progress(total, progress)
    for sname in strategies:
        strat = make_strategy(sname, args)
        for n in budgets:
            acc = tok = kv = kvu = flops = wall = pages = 0.0
            stops: Dict[str, int] = {}
            for i in range(len(backend.problems)):
                inst = backend.instance(i)
                ver = None if sname in ("majority", "self-consistency") else inst.verifier
                if ver is None and sname not in ("majority", "self-consistency"):
                    raise RuntimeError(f"ttscale demo: strategy {sname} needs a PRM and this backend has none")
                res = strat.run(inst.gen, inst.prompt, Budget(n=n), ver, seed=args.seed * 100003 + i)
                m = res.meter
                acc += inst.is_correct(res.answer)
                tok += m.generated_tokens
                kv += m.kv_bytes_read
                kvu += m.kv_bytes_read_unshared
                flops += m.flops
                wall += m.wall_s
                pages = max(pages, m.peak_kv_pages)
                key = res.stop_reason.split(" ")[0]
                stops[key] = stops.get(key, 0) + 1
                bar.update(1)
            P = len(backend.problems)
            rows.append({"strategy": sname, "n": n, "accuracy": acc / P, "gen_tokens": tok / P, "kv_bytes": kv / P,
                         "kv_bytes_unshared": kvu / P, "flops": flops / P, "wall_s": wall / P,
                         "peak_kv_pages": pages, "stops": stops})
    bar.close()
    return rows


class _NoBar:
    def update(self, k):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc="searching", unit="run", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    except ImportError:
        return _NoBar()


def print_table(rows: List[dict]) -> None:
    head = (f"{'strategy':<16} {'n':>4} {'accuracy':>9} {'gen tokens':>11} {'KV read MB':>11} "
            f"{'unshared/shared':>15} {'GFLOP':>9} {'peak pages':>10} {'ms/problem':>11}")
    print(head)
    print("-" * len(head))
    last = None
    for r in rows:
        if last is not None and r["strategy"] != last:
            print()
        last = r["strategy"]
        ratio = r["kv_bytes_unshared"] / r["kv_bytes"] if r["kv_bytes"] else float("nan")
        print(f"{r['strategy']:<16} {r['n']:>4} {r['accuracy']:>9.3f} {r['gen_tokens']:>11.0f} "
              f"{r['kv_bytes'] / 1e6:>11.2f} {ratio:>15.2f} {r['flops'] / 1e9:>9.2f} {r['peak_kv_pages']:>10.0f} "
              f"{r['wall_s'] * 1e3:>11.1f}")


def plot(rows: List[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for key, ax, label in (("gen_tokens", axes[0], "generated tokens per problem"),
                           ("kv_bytes", axes[1], "KV bytes read per problem (shared prefixes)")):
        for s in dict.fromkeys(r["strategy"] for r in rows):
            rs = [r for r in rows if r["strategy"] == s]
            ax.plot([r[key] for r in rs], [r["accuracy"] for r in rs], marker="o", label=s)
            for r in rs:
                ax.annotate(str(r["n"]), (r[key], r["accuracy"]), fontsize=6, xytext=(2, 2),
                            textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _writable_dir_of(ap: argparse.ArgumentParser, opt: str, path: str) -> None:
    # checked before the run, which takes minutes: a bad path used to fail only at the end
    d = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        ap.error(f"{opt} {path}: cannot create its folder ({e.strerror})")
    if not os.access(d, os.W_OK):
        ap.error(f"{opt} {path}: its folder {d} is not writable")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ttscale demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--simulate", action="store_true", help="use the model-free simulator")
    ap.add_argument("--model", default=None, help="local policy checkpoint directory (default: the built-in one)")
    ap.add_argument("--prm", default=None, help="local PRM checkpoint directory, same tokenizer as the policy "
                    "(default: the built-in PRM)")
    ap.add_argument("--problems", type=int_at_least(1), default=None,
                    help="held-out problems (default 40 simulated, 20 engine)")
    ap.add_argument("--max-budget", type=int_at_least(1), default=None, help="budgets 1, 2, 4, ... up to this "
                    "(default 64)")
    ap.add_argument("--budgets", type=budget_list, default=None,
                    help="explicit comma-separated budgets (overrides --max-budget)")
    ap.add_argument("--strategies", default=None,
                    help="comma-separated, from: majority, best-of-n, weighted-bon, self-consistency, beam, dvts, "
                         "rebase, particle-filter, mcts (default: %s; on the engine: %s)"
                         % (",".join(DEFAULT_STRATEGIES), ",".join(ENGINE_DEFAULTS["strategies"])))
    ap.add_argument("--beam-width", type=int_at_least(1), default=4)
    ap.add_argument("--temperature", type=float_at_least(0.0), default=0.8)
    ap.add_argument("--difficulty", type=difficulty, default=None, help="task difficulty (engine backend)")
    ap.add_argument("--max-step-tokens", type=int_at_least(1), default=32)
    ap.add_argument("--max-new-tokens", type=int_at_least(1), default=256)
    ap.add_argument("--verifier", choices=("prm", "exact"), default="prm",
                    help="engine backend: the PRM (default) or the task's exact step checker (an oracle PRM: "
                         "what a perfect process reward model would give)")
    ap.add_argument("--prm-aggregate", choices=("min", "prod", "last", "mean"), default="min",
                    help="how the PRM's step scores make a solution score (default min: the built-in PRM "
                         "scores each step given the lines before it)")
    ap.add_argument("--prm-noise", type=float_at_least(0.0), default=2.5,
                    help="simulator PRM noise (std of the logit noise)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default="ttscale_demo.png", help="PNG path ('' to skip)")
    ap.add_argument("--json", default=None, help="also write the table as JSON here")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    strategies = [x.strip() for x in (args.strategies or "").split(",") if x.strip()]
    if args.strategies is not None and not strategies:
        ap.error("--strategies: no strategy named")
    for name in strategies:
        try:
            make_strategy(name, args)  # validate names before spending time
        except ValueError as e:
            ap.error(f"--strategies: {e}")
    if args.plot:
        _writable_dir_of(ap, "--plot", args.plot)
    if args.json:
        _writable_dir_of(ap, "--json", args.json)

    backend = None
    user = (args.problems, args.max_budget, args.strategies)
    if not args.simulate:
        args.problems = user[0] or ENGINE_DEFAULTS["problems"]
        args.max_budget = user[1] or ENGINE_DEFAULTS["max_budget"]
        args.strategies = user[2] or ",".join(ENGINE_DEFAULTS["strategies"])
        try:
            backend = EngineBackend(args)
        except (ImportError, FileNotFoundError) as e:
            print(f"ttscale demo: the built-in engine/task is not available ({e}); running the model-free "
                  "simulator instead (--simulate).", file=sys.stderr)
            args.problems, args.max_budget, args.strategies = user
    if backend is None:
        args.problems = args.problems or 40
        args.max_budget = args.max_budget or 64
        args.strategies = args.strategies or ",".join(DEFAULT_STRATEGIES)
        backend = SimBackend(args)

    budgets = args.budgets or [2 ** k for k in range(int(math.log2(args.max_budget)) + 1)]
    strategies = [x.strip() for x in args.strategies.split(",") if x.strip()]

    print(f"ttscale demo: {backend.describe()}")
    print(f"strategies: {', '.join(strategies)}; budgets n = {budgets}\n")
    t0 = time.perf_counter()
    rows = run_grid(backend, strategies, budgets, args, progress=not args.no_progress)
    print_table(rows)
    print(f"\naccuracy = fraction of problems answered correctly; tokens, KV bytes, FLOPs per problem "
          f"(FLOPs include the verifier); unshared/shared = KV bytes branches would read without prefix "
          f"sharing over what was read. Total {time.perf_counter() - t0:.1f} s.")
    if args.plot:
        try:
            plot(rows, args.plot, f"ttscale demo: {backend.describe()}")
            print(f"wrote {args.plot}")
        except ImportError:
            print("ttscale demo: matplotlib is not installed, no plot (pip install matplotlib)", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backend": backend.describe(), "budgets": budgets, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
