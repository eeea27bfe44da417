"""``python -m ttscale.bench.engine``: best-of-N generation with the ttscale Engine vs transformers.

Case (issue 6 goals, 2-core CPU): one prompt, N = 64 samples of 64 new tokens each (EOS ignored, so
every implementation does the same work), temperature 1, no filters.

* ``ttscale engine``: prefill once, ``fork(root, 64)``, ``extend`` in lock-step batches with
  shared-prefix attention (the prompt's KV pages are read once per step and layer for all branches);
* ``ttscale engine (no sharing)``: the same with per-branch paged decode (``max_share_levels=1``);
* ``transformers generate``: ``generate(num_return_sequences=64, do_sample=True)`` on the same weights
  (the prompt is expanded to 64 rows, a dense KV cache per row).

Weights: the built-in policy (``ttscale/data/builtin/policy``) when it exists, else a random Llama of
similar size (4 layers, hidden 256, 4 heads x 64, 2 KV heads); the output says which. The prompt is
``--prompt-len`` random in-vocabulary tokens (default 512 or what fits with the new tokens in
``max_position_embeddings``). Reported: median seconds per best-of-N run, decoded tokens/s and the
speed-up of ours, and the engine's KV bytes read with sharing vs what per-branch decode reads.
Goals: >= 5x transformers' tokens/s, sharing reads <= 1/8 of the bytes. The bytes ratio depends on
the prompt length: each branch also reads its own suffix (up to 64 tokens), so it needs a prompt of
a few hundred tokens. For best-of-64 x 64 tokens the decode-phase ratio is
``64 (63 P + 2016) / (63 P + 64 * 2016)`` for a prompt of P tokens in full pages: 1/6.4 at P = 192,
1/8.0 at P = 256, 1/12.3 at P = 448 (the default with the built-in policy, whose
``max_position_embeddings = 512`` leaves room for 448 + 64 new tokens), 1/13.6 at P = 512.

On a busy shared machine use ``--threads 1``: a parallel region whose second thread is descheduled
waits for it, so multi-threaded timings there measure the scheduler more than the code.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from .._argtypes import int_at_least
from . import harness

RANDOM_CFG = dict(vocab_size=64, hidden_size=256, intermediate_size=640, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def _checkpoint(tmp: str, random_overrides=None):
    """(checkpoint dir, description): the built-in policy, or a random Llama saved to ``tmp``."""
    from ttscale.engine.checkpoint import BUILTIN_DIR

    d = os.path.join(BUILTIN_DIR, "policy")
    if os.path.isdir(d) and random_overrides is None:
        return d, "built-in policy"
    import transformers

    cfg = transformers.LlamaConfig(**dict(RANDOM_CFG, **(random_overrides or {})))
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.05)
    m.save_pretrained(tmp)
    n = sum(p.numel() for p in m.parameters())
    why = "--random-config" if random_overrides is not None else "built-in policy not found"
    return tmp, f"random Llama ({n / 1e6:.1f}M params; {why})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ttscale bench engine", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int_at_least(1), default=64, help="samples (branches)")
    ap.add_argument("--new-tokens", type=int_at_least(1), default=64)
    ap.add_argument("--prompt-len", type=int_at_least(1), default=512)
    ap.add_argument("--page-size", type=int_at_least(1), default=16)
    ap.add_argument("--reps", type=int_at_least(1), default=3)
    ap.add_argument("--threads", type=int_at_least(0), default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--random-config", default=None,
                    help='use a random Llama with these LlamaConfig overrides (JSON), e.g. \'{"hidden_size": 128}\'')
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--quick", action="store_true", help="one repetition, smaller ceiling probe")
    ap.add_argument("--json", default=None, help="where to write results (default: bench/results/engine-<device>.json)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from ttscale.engine import Engine, SamplingParams, load_checkpoint

    tmp = tempfile.mkdtemp(prefix="ttscale-bench-engine-")
    ckpt, what = _checkpoint(tmp, None if args.random_config is None else json.loads(args.random_config))
    model = load_checkpoint(ckpt, device=args.device)
    cfg = model.config
    plen = max(1, min(args.prompt_len, cfg.max_position_embeddings - args.new_tokens))
    g = torch.Generator().manual_seed(0)
    lo = 3 if cfg.vocab_size > 3 else 0
    prompt = torch.randint(lo, cfg.vocab_size, (plen,), generator=g).tolist()
    n, new = args.n, args.new_tokens
    pages = n * (-(-(plen + new) // args.page_size) + 1) + 8
    engines = {"ttscale engine": Engine(model, num_pages=pages, page_size=args.page_size, eos_token_ids=()),
               "ttscale engine (no sharing)": Engine(model, num_pages=pages, page_size=args.page_size,
                                                     eos_token_ids=(), max_share_levels=1)}
    sp = SamplingParams(temperature=1.0)
    kv = {}

    def run_engine(name):
        eng = engines[name]

        def fn():
            eng.counters.reset()
            root = eng.prefill(prompt)
            kids = eng.fork(root, n)
            c = eng.counters
            b0, u0 = c.kv_bytes_read, c.kv_bytes_read_unshared  # the prompt's prefill, the same either way
            res = eng.extend(kids, max_new_tokens=new, sampling=sp)
            assert all(len(r.token_ids) == new for r in res)
            kv[name] = (c.kv_bytes_read, c.kv_bytes_read_unshared, c.peak_pages, c.kv_bytes_read - b0,
                        c.kv_bytes_read_unshared - u0)
            eng.release(kids + [root])
        return fn

    impls = {name: run_engine(name) for name in engines}
    if not args.no_hf:
        try:
            import transformers
        except ImportError:
            transformers = None
            print("transformers not installed: no baseline")
        if transformers is not None:
            hf = transformers.LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).to(args.device).eval()
            ids = torch.tensor([prompt], device=args.device)

            def run_hf():
                with torch.no_grad():
                    out = hf.generate(ids, do_sample=True, num_return_sequences=n, max_new_tokens=new,
                                      min_new_tokens=new, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0,
                                      eos_token_id=None)
                assert out.shape == (n, plen + new)
            impls["transformers generate"] = run_hf
    ceil = harness.ceilings(args.device, quick=True)
    case = harness.Case(f"best-of-{n} x {new} tok, prompt {plen}", impls,
                        params={"n": n, "new_tokens": new, "prompt_len": plen, "page_size": args.page_size,
                                "model": what, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
                                "heads": f"{cfg.num_attention_heads}/{cfg.num_key_value_heads}x{cfg.head_dim}"})
    reps = 1 if args.quick else args.reps
    results = harness.run_case(case, args.device, ceil, warmup=1, reps=reps)
    toks = n * new
    for r in results:
        r.params = dict(r.params, decoded_tokens_per_s=toks / (r.median_us * 1e-6))
        if r.impl in kv:
            r.params.update(kv_bytes_read=kv[r.impl][0], kv_bytes_read_unshared=kv[r.impl][1],
                            peak_pages=kv[r.impl][2], decode_kv_bytes_read=kv[r.impl][3],
                            decode_kv_bytes_read_unshared=kv[r.impl][4])
    harness.print_table(f"ttscale bench engine ({args.device}, {torch.get_num_threads()} threads; {what})",
                        results, ceil)
    print()
    for r in results:
        line = f"{r.impl:<28} {r.params['decoded_tokens_per_s']:>10.0f} decoded tokens/s"
        if r.impl in kv:
            b, u, pk, bd, ud = kv[r.impl]
            line += (f"   KV read {b / 1e6:.1f} MB, per-branch decode would read {u / 1e6:.1f} MB (1/{u / max(b, 1):.1f});"
                     f" decode phase only 1/{ud / max(bd, 1):.1f}; peak pages {pk}")
        print(line)
    by = {r.impl: r for r in results}
    ours = by.get("ttscale engine")
    if ours is not None and "transformers generate" in by:
        x = by["transformers generate"].median_us / ours.median_us
        print(f"goal tokens/s >= 5x transformers: {x:.2f}x ({'met' if x >= 5 else 'not met'})")
    if "ttscale engine" in kv:
        b, u = kv["ttscale engine"][3], kv["ttscale engine"][4]
        print(f"goal KV bytes read with sharing <= 1/8 of per-branch decode (decode phase): 1/{u / max(b, 1):.1f} "
              f"({'met' if 8 * b <= u else 'not met'}; prompt {plen} tokens)")
    path = args.json or harness.default_json_path("engine", args.device)
    harness.write_json(path, "engine", args.device, ceil, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
