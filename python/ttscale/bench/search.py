"""``ttscale bench search``: tree search on the engine's forkable KV vs re-prefilling text prefixes.

Beam search and REBASE run the same algorithm, settings, seeds and PRM on the built-in task twice:

  * fork:       ``EngineGenerator``: the prompt is prefilled once, branches are copy-on-write forks
                of paged KV, each depth is one batched extend;
  * reprefill:  ``ReprefillGenerator``: the way search-and-learn / its-hub drive a serving engine
                without KV reuse: every step prefills each branch's full text again, decodes one
                step, drops the KV.

Reported per (strategy, mode): accuracy, generated / prefill / verifier tokens, KV bytes read, wall
seconds per problem (total, and the generator's share: total minus the time inside the verifier,
which is the same work in both modes) and the speed-up of fork over reprefill. Goal: >= 3x less wall
time. Needs the engine (``ttscale.engine.load_builtin``) and the task (``ttscale.tasks``).

Both modes share one ``PRMVerifier``, which keeps the PRM's own paged KV per scored sequence
(``ttscale.engine.PrefixScorer``), so the PRM runs only each candidate's new step. That is a
ttscale feature the reference implementations lack (they re-read every candidate in full); giving
it to both modes keeps the comparison about how the *policy's* prefixes reach the KV cache.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, List, Optional, Sequence

from .._argtypes import difficulty, float_at_least, int_at_least

__all__ = ["run_bench", "main"]


class _TimedVerifier:
    """Wraps a Verifier and accumulates the seconds spent inside it."""

    def __init__(self, inner) -> None:
        self.inner, self.seconds = inner, 0.0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step_scores(self, gen, nodes):
        t0 = time.perf_counter()
        try:
            return self.inner.step_scores(gen, nodes)
        finally:
            self.seconds += time.perf_counter() - t0

    def score(self, gen, nodes, how=None):
        t0 = time.perf_counter()
        try:
            return self.inner.score(gen, nodes, how)
        finally:
            self.seconds += time.perf_counter() - t0


def run_bench(engine: Any, verifier: Any, problems: Sequence[Any], *, prompt_of: Callable[[Any], str],
              is_correct: Callable[[Any, Optional[str]], bool], strategies: Sequence[str] = ("beam", "rebase"),
              width: int = 8, beam_width: int = 4, seed: int = 0, warmup: bool = True, **gen_kw) -> List[dict]:
    """Rows of results; ``gen_kw`` go to both generators (step delimiter, token caps, sampling, answer
    extraction), so the two modes differ only in how a branch's prefix reaches the KV cache."""
    from ttscale.search import BeamSearch, Budget, Rebase
    from ttscale.search.engine_adapter import EngineGenerator, ReprefillGenerator

    make = {"beam": lambda: BeamSearch(beam_width=beam_width), "rebase": lambda: Rebase()}
    for s in strategies:
        if s not in make:
            raise ValueError(f"bench search: strategy must be one of {sorted(make)}, got {s!r}")
    gens = {"fork": EngineGenerator(engine, **gen_kw), "reprefill": ReprefillGenerator(engine, **gen_kw)}
    tv = _TimedVerifier(verifier)
    rows = []
    for sname in strategies:
        strat = make[sname]()
        if warmup:
            for g in gens.values():
                strat.run(g, prompt_of(problems[0]), Budget(n=width), tv, seed=seed)
        acc = {m: [] for m in gens}
        for i, p in enumerate(problems):
            for mode, g in gens.items():  # interleaved, so load drift hits both modes alike
                v0 = tv.seconds
                t0 = time.perf_counter()
                res = strat.run(g, prompt_of(p), Budget(n=width), tv, seed=seed * 1000 + i)
                wall = time.perf_counter() - t0
                m = res.meter
                acc[mode].append({"correct": bool(is_correct(p, res.answer)), "wall": wall,
                                  "verifier_s": tv.seconds - v0, "gen": m.generated_tokens,
                                  "prefill": m.prefill_tokens, "ver": m.verifier_tokens, "kv": m.kv_bytes_read,
                                  "forks": m.forks})
        P = len(problems)
        base = {}
        for mode in gens:
            rs = acc[mode]
            row = {"strategy": sname, "mode": mode, "width": width, "problems": P,
                   "accuracy": sum(r["correct"] for r in rs) / P,
                   "gen_tokens": sum(r["gen"] for r in rs) / P, "prefill_tokens": sum(r["prefill"] for r in rs) / P,
                   "verifier_tokens": sum(r["ver"] for r in rs) / P, "kv_bytes": sum(r["kv"] for r in rs) / P,
                   "forks": sum(r["forks"] for r in rs) / P, "wall_s": sum(r["wall"] for r in rs) / P,
                   "generator_s": sum(r["wall"] - r["verifier_s"] for r in rs) / P}
            base[mode] = row
            rows.append(row)
        for key in ("wall_s", "generator_s"):
            f = base["fork"][key]
            base["fork"][f"speedup_{key}"] = base["reprefill"][key] / f if f > 0 else None
    return rows


def print_table(rows: List[dict]) -> None:
    head = (f"{'strategy':<8} {'mode':<10} {'acc':>6} {'gen tok':>9} {'prefill tok':>11} {'PRM tok':>9} "
            f"{'KV MB':>9} {'s/problem':>10} {'gen s/prob':>10} {'speed-up (total, gen)':>22}")
    print(head)
    print("-" * len(head))
    for r in rows:
        sp = ""
        if r.get("speedup_wall_s"):
            sp = f"{r['speedup_wall_s']:.2f}x, {r['speedup_generator_s']:.2f}x"
        print(f"{r['strategy']:<8} {r['mode']:<10} {r['accuracy']:>6.3f} {r['gen_tokens']:>9.0f} "
              f"{r['prefill_tokens']:>11.0f} {r['verifier_tokens']:>9.0f} {r['kv_bytes'] / 1e6:>9.2f} "
              f"{r['wall_s']:>10.3f} {r['generator_s']:>10.3f} {sp:>22}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ttscale bench search", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="local policy checkpoint (default: the built-in one)")
    ap.add_argument("--prm", default=None, help="local PRM checkpoint (default: the built-in one)")
    ap.add_argument("--problems", type=int_at_least(1), default=8)
    ap.add_argument("--width", type=int_at_least(1), default=32, help="beams / REBASE width (budget n)")
    ap.add_argument("--beam-width", type=int_at_least(1), default=4)
    ap.add_argument("--strategies", default="beam,rebase")
    ap.add_argument("--difficulty", type=difficulty, default=None)
    ap.add_argument("--temperature", type=float_at_least(0.0), default=0.8)
    ap.add_argument("--max-step-tokens", type=int_at_least(1), default=32)
    ap.add_argument("--max-new-tokens", type=int_at_least(1), default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="results path (default: bench/results/search-<device>.json)")
    args = ap.parse_args(argv)

    try:
        import ttscale.engine as engine_mod
        from ttscale import tasks
        from ttscale.search.engine_adapter import load_engine_and_prm

        engine, prm = load_engine_and_prm(args.model, args.prm)
    except (ImportError, FileNotFoundError) as e:
        print(f"ttscale bench search: needs the engine, the built-in task and checkpoints ({e}).", file=sys.stderr)
        return 2
    from ttscale.demo import HELDOUT_SEED
    from ttscale.search.engine_adapter import PRMVerifier

    from . import harness

    delim = getattr(tasks, "STEP_DELIMITER", "\n")
    problems = tasks.generate_problems(args.problems, seed=HELDOUT_SEED + args.seed,
                                       **({"difficulty": args.difficulty} if args.difficulty else {}))
    sampling = engine_mod.SamplingParams(temperature=args.temperature)
    rows = run_bench(engine, PRMVerifier(prm, engine.tokenizer, step_delimiter=delim), problems,
                     prompt_of=lambda p: p.prompt, is_correct=lambda p, a: a is not None and str(a) == str(p.answer),
                     strategies=[s for s in args.strategies.split(",") if s], width=args.width,
                     beam_width=args.beam_width, seed=args.seed, step_delimiter=delim,
                     max_step_tokens=args.max_step_tokens, max_new_tokens=args.max_new_tokens, sampling=sampling,
                     extract_answer=tasks.extract_answer)
    print(f"ttscale bench search: {args.problems} problems, width {args.width}, beam width {args.beam_width}")
    print_table(rows)
    device = str(getattr(engine, "device", "cpu"))
    path = args.json or harness.default_json_path("search", device)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"suite": "search", "device": device, "machine": harness.machine(device), "args": vars(args),
                   "results": rows}, f, indent=1)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
