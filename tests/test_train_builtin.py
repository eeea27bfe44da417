"""scripts/train_builtin.py: a few steps of a tiny configuration, then the outputs must be valid
Hugging Face Llama checkpoints whose transformers forward matches the script's own torch model."""
import importlib.util
import json
import os
import sys

import pytest
import torch

from ttscale import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "train_builtin.py")

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")


def _load_script():
    spec = importlib.util.spec_from_file_location("ttscale_train_builtin", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


tb = _load_script()

TINY = ["--hidden-size", "128", "--intermediate-size", "96", "--num-hidden-layers", "2",
        "--num-attention-heads", "2", "--num-key-value-heads", "1", "--batch-size", "8",
        "--policy-steps", "3", "--eval-every", "2", "--eval-problems", "3", "--stop-acc", "2.0",
        "--prm-problems", "3", "--prm-samples", "2", "--prm-steps", "2", "--warmup", "2",
        "--prm2-steps", "1", "--prm2-warmup", "1",
        "--test-problems", "3", "--test-samples", "2", "--max-difficulty", "4", "--difficulty", "3",
        "--seed", "3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("builtin"))
    meta = tb.main(["--out", out] + TINY)
    return out, meta


def _randomize(model, seed):
    # a few training steps barely move the weights from their init; random weights of a realistic
    # scale make the comparison with transformers sensitive to every term (norm weights included)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.3 +
                    (1.0 if p.ndim == 1 else 0.0))


def test_outputs_and_meta(trained):
    out, meta = trained
    for kind in ("policy", "prm"):
        files = sorted(os.listdir(os.path.join(out, kind)))
        assert files == ["config.json", "model.safetensors", "ttscale_tokenizer.json"], files
    with open(os.path.join(out, "meta.json")) as f:
        disk = json.load(f)
    assert disk["seed"] == 3 and disk["policy_steps_run"] == 3 and disk["prm_steps_run"] == 3
    assert 0.0 <= disk["eval"]["single_sample_acc"] <= 1.0
    cfg = json.load(open(os.path.join(out, "prm", "config.json")))
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["num_labels"] == 1
    assert cfg["head_dim"] == 64 and cfg["pad_token_id"] == tasks.make_tokenizer().pad_token_id
    from safetensors.torch import load_file
    names = set(load_file(os.path.join(out, "prm", "model.safetensors")))
    assert "score.weight" in names and "lm_head.weight" not in names
    names = set(load_file(os.path.join(out, "policy", "model.safetensors")))
    assert "lm_head.weight" in names and "score.weight" not in names
    assert "model.layers.1.self_attn.k_proj.weight" in names


def test_prm_only_run_keeps_the_policy(trained, tmp_path):
    out, _ = trained
    meta = tb.main(["--out", str(tmp_path), "--policy-from", os.path.join(out, "policy"), "--prm-label", "prefix"]
                   + TINY)
    a, _ = tb.load_checkpoint(os.path.join(out, "policy"))
    b, _ = tb.load_checkpoint(os.path.join(str(tmp_path), "policy"))
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        if k != "score.weight":
            assert torch.equal(x, y), k
    assert meta["policy_steps_run"] == 3 and meta["eval"]["prm_label"] == "prefix"


def test_prm_init_continues_a_saved_prm(trained, tmp_path):
    """--prm-init starts stage 1 from a saved PRM (the path stage 2 shares); a PRM of another shape
    is refused by name."""
    out, _ = trained
    pol, prm = os.path.join(out, "policy"), os.path.join(out, "prm")
    meta = tb.main(["--out", str(tmp_path / "a"), "--policy-from", pol, "--prm-init", prm] + TINY)
    assert meta["prm_steps_run"] == 3
    with pytest.raises(ValueError, match="--prm-init"):
        tb.main(["--out", str(tmp_path / "b"), "--policy-from", pol, "--prm-init", prm,
                 "--prm-extra-layers", "1"] + TINY)


def test_policy_matches_transformers(trained, tmp_path):
    out, _ = trained
    ours, tok = tb.load_checkpoint(os.path.join(out, "policy"))
    _randomize(ours, 0)
    tb.save_checkpoint(ours, tok, str(tmp_path), "policy")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), torch_dtype=torch.float32).eval()
    ours, _ = tb.load_checkpoint(str(tmp_path))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, tok.vocab_size, (3, 37), generator=g)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got, _ = ours(ids)
    assert ref.abs().max() > 1.0  # the comparison is not between near-zero tensors
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_prm_matches_transformers(trained, tmp_path):
    out, _ = trained
    ours, tok = tb.load_checkpoint(os.path.join(out, "prm"))
    _randomize(ours, 2)
    tb.save_checkpoint(ours, tok, str(tmp_path), "prm")
    hf = transformers.LlamaForSequenceClassification.from_pretrained(str(tmp_path), torch_dtype=torch.float32).eval()
    ours, _ = tb.load_checkpoint(str(tmp_path))
    pr = tasks.generate_problems(1, difficulty=4, seed=9)[0]
    ids, labels = tb.step_label_example(tok, pr, pr.solution, eos=False)
    step_pos = [i for i, l in enumerate(labels) if l >= 0]
    assert len(step_pos) == 5 and all(ids[i] == tok.encode("\n")[0] for i in step_pos)
    with torch.no_grad():
        _, score = ours(torch.tensor([ids]))
        # HF pools the last non-pad token: feed each step's prefix, right-padded in one batch
        batch = tb.pad_right([ids[:i + 1] for i in step_pos], tok.pad_token_id)
        ref = hf(input_ids=batch).logits[:, 0]
    torch.testing.assert_close(score[0, step_pos], ref, atol=1e-4, rtol=1e-4)


def test_cached_left_padded_decoding_matches_full_forward(trained):
    # the script's sampler (KV cache, left padding, per-row positions) must see exactly what a plain
    # forward of each sequence alone sees: greedy tokens equal the argmax of the full forward
    out, _ = trained
    model, tok = tb.load_checkpoint(os.path.join(out, "policy"))
    _randomize(model, 4)
    probs = tasks.generate_problems(5, difficulty=(1, 6), seed=4)
    texts = tb.sample(model, tok, [p.prompt for p in probs], temperature=0.0, max_new_tokens=9,
                      generator=torch.Generator().manual_seed(0), batch_size=5)
    for p, t in zip(probs, texts):
        ids = [tok.bos_token_id] + tok.encode(p.prompt)
        want = []
        with torch.no_grad():
            for _ in range(9):
                logits, _ = model(torch.tensor([ids]))
                nxt = int(logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                want.append(nxt)
                ids.append(nxt)
        assert t == tok.decode(want)


def test_auc_matches_pairwise_definition():
    g = torch.Generator().manual_seed(5)
    s = (torch.randint(0, 7, (53,), generator=g).float() / 7).tolist()  # ties on purpose
    y = torch.randint(0, 2, (53,), generator=g).tolist()
    pos = [a for a, l in zip(s, y) if l]
    neg = [a for a, l in zip(s, y) if not l]
    want = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))
    assert abs(tb.auc(s, y) - want) < 1e-12


def test_shipped_checkpoints_load_in_transformers():
    from ttscale.data import builtin_path
    with pytest.raises(ValueError, match="kind"):
        builtin_path("nope")
    meta = json.load(open(builtin_path("meta")))
    tok = tasks.make_tokenizer()
    pr = tasks.generate_problems(2, seed=1)
    ids = torch.tensor([[tok.bos_token_id] + tok.encode(p.prompt + p.solution) for p in pr])
    for kind, cls in (("policy", transformers.LlamaForCausalLM),
                      ("prm", transformers.LlamaForSequenceClassification)):
        path = builtin_path(kind)
        hf = cls.from_pretrained(path, torch_dtype=torch.float32).eval()
        ours, t = tb.load_checkpoint(path)
        assert t.vocab == tok.vocab and hf.config.head_dim == 64
        with torch.no_grad():
            lm, score = ours(ids)
            if kind == "policy":
                torch.testing.assert_close(lm, hf(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
            else:
                torch.testing.assert_close(score[:, -1], hf(input_ids=ids).logits[:, 0], atol=1e-4, rtol=1e-4)
    assert meta["eval"]["problems"] > 0 and meta["model_config"]["head_dim"] == 64
