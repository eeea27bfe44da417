"""Checkpoint loading and the decoder's numerics against Hugging Face transformers (fp32).

Tiny random Llama / Qwen2 models are built with transformers, saved with save_pretrained
(safetensors, also sharded), loaded with ttscale.engine.load_checkpoint, and their logits (prefill and
several decode steps through the Engine) compared with transformers' forward of the same tokens.
"""
import json
import os

import pytest
import torch

from ttscale import ops
from ttscale.engine import Engine, load_builtin, load_checkpoint
from ttscale.nn import QuantLinear

transformers = pytest.importorskip("transformers")

ATOL, RTOL = 2e-4, 1e-4


def _randomize_hf(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    return model


def make_hf(path, kind="llama", *, rope=None, tie=False, classifier=False, shard=False, vocab=97, layers=2,
            heads=2, kv_heads=1, head_dim=64, hidden=128, inter=160, max_pos=256, attention_bias=False, seed=0):
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
                  tie_word_embeddings=tie, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    rope_params = {"rope_type": "default", "rope_theta": 10000.0} if rope is None else dict(rope)
    rope_params.setdefault("rope_theta", 10000.0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(head_dim=head_dim, attention_bias=attention_bias, rope_parameters=rope_params,
                                       **common)
        cls = transformers.LlamaForSequenceClassification if classifier else transformers.LlamaForCausalLM
    else:
        cfg = transformers.Qwen2Config(rope_parameters=rope_params, use_sliding_window=False, **common)
        cls = transformers.Qwen2ForSequenceClassification if classifier else transformers.Qwen2ForCausalLM
    if classifier:
        cfg.num_labels = 1
    torch.manual_seed(seed)
    model = cls(cfg)
    model.config._attn_implementation = "eager"
    _randomize_hf(model, seed).eval()
    kw = dict(max_shard_size="40KB") if shard else {}
    model.save_pretrained(str(path), **kw)
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def rand_ids(n, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


@pytest.mark.parametrize("kind,tie,kv_heads,shard", [("llama", False, 1, False), ("qwen2", True, 1, False),
                                                     ("llama", True, 2, True), ("qwen2", False, 2, True)])
def test_forward_tokens_matches_transformers(tmp_path, kind, tie, kv_heads, shard):
    hf = make_hf(tmp_path, kind, tie=tie, kv_heads=kv_heads, shard=shard)
    if shard:
        assert os.path.exists(tmp_path / "model.safetensors.index.json")
    m = load_checkpoint(tmp_path)
    assert m.config.tie_word_embeddings == tie and m.config.qkv_bias == (kind == "qwen2")
    seqs = [rand_ids(n, seed=n) for n in (13, 1, 37)]
    outs = m.forward_tokens(seqs)
    for s, o in zip(seqs, outs):
        assert o.dtype == torch.float32 and o.shape == (len(s), 97)
        torch.testing.assert_close(o, hf_logits(hf, s), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.5},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32, "rope_theta": 500000.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 64, "beta_fast": 16, "beta_slow": 2,
     "mscale": 1.2, "mscale_all_dim": 0.7},
])
def test_rope_scaling_matches_transformers(tmp_path, rope):
    hf = make_hf(tmp_path, "llama", rope=rope)
    m = load_checkpoint(tmp_path)
    assert m.config.rope_type == rope["rope_type"]
    s = rand_ids(150, seed=3)
    torch.testing.assert_close(m.forward_tokens([s])[0], hf_logits(hf, s), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_engine_decode_matches_transformers(tmp_path, kind):
    """Prefill + greedy decode steps + forked branches + a teacher-forced append, every step's
    next-token logits against transformers' full forward of the same tokens."""
    hf = make_hf(tmp_path, kind, tie=(kind == "qwen2"))
    m = load_checkpoint(tmp_path)
    eng = Engine(m, num_pages=64, page_size=4, eos_token_ids=())
    node = eng.prefill(rand_ids(11, seed=5))
    for _ in range(6):
        torch.testing.assert_close(eng.logits(node), hf_logits(hf, eng.tokens(node))[-1], atol=ATOL, rtol=RTOL)
        r = eng.extend([node], max_new_tokens=1, sampling=None, seed=1)[0]
        assert r.stop_reason == "length" and len(r.token_ids) == 1
    kids = eng.fork(node, 3)
    eng.append(kids[1], rand_ids(7, seed=9))
    for step in range(5):
        eng.extend(kids, max_new_tokens=1, seed=step)
        for k in kids:
            torch.testing.assert_close(eng.logits(k), hf_logits(hf, eng.tokens(k))[-1], atol=ATOL, rtol=RTOL)
    eng.release(kids + [node])
    assert eng.pool.num_used == 0


def test_greedy_matches_transformers_generate(tmp_path):
    hf = make_hf(tmp_path, "llama")
    m = load_checkpoint(tmp_path)
    eng = Engine(m, num_pages=32, page_size=16, eos_token_ids=())
    prompt = rand_ids(9, seed=2)
    node = eng.prefill(prompt)
    r = eng.extend([node], max_new_tokens=12, sampling=__import__("ttscale").engine.SamplingParams(temperature=0))[0]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    assert r.token_ids == out[0, len(prompt):].tolist()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_sequence_classification_scores(tmp_path, kind):
    hf = make_hf(tmp_path, kind, classifier=True)
    m = load_checkpoint(tmp_path)
    assert m.config.is_classifier and m.config.num_labels == 1
    seqs = [rand_ids(n, seed=n) for n in (5, 23)]
    outs = m.forward_tokens(seqs)
    for s, o in zip(seqs, outs):
        with torch.no_grad():
            h = hf.model(torch.tensor([s])).last_hidden_state[0]
            ref = hf.score(h).float()
        assert o.shape == (len(s), 1)
        torch.testing.assert_close(o, ref, atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match="language model"):
        Engine(m)


def test_quantize_on_load(tmp_path):
    make_hf(tmp_path, "llama", inter=192)
    dense = load_checkpoint(tmp_path)
    q = load_checkpoint(tmp_path, quantize=dict(bits=4, group_size=64))
    lin = [mod for mod in q.modules() if isinstance(mod, QuantLinear)]
    assert len(lin) == 4 * q.config.num_hidden_layers and q.lm_head is not None and not isinstance(q.lm_head, QuantLinear)
    # reference: the dense model with each quantized linear replaced by its dequantized weight
    ref = load_checkpoint(tmp_path)
    with torch.no_grad():
        for (name, mod) in q.named_modules():
            if isinstance(mod, QuantLinear):
                ref.get_submodule(name).weight.copy_(ops.dequantize(mod.qweight).float())
    s = rand_ids(29, seed=4)
    out_q, out_ref, out_dense = q.forward_tokens([s])[0], ref.forward_tokens([s])[0], dense.forward_tokens([s])[0]
    torch.testing.assert_close(out_q, out_ref, atol=2e-3, rtol=1e-3)
    # 4-bit weights move the logits, but not wildly
    assert (out_q - out_dense).norm() < 0.5 * out_dense.norm()
    eng = Engine(q, num_pages=16, eos_token_ids=())
    n = eng.prefill(s)
    torch.testing.assert_close(eng.logits(n), out_ref[-1], atol=2e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="unknown keys"):
        load_checkpoint(tmp_path, quantize=dict(bits=4, groupsize=64))


# ---------------------------------------------------------------------- bad input
def test_bad_checkpoints(tmp_path):
    from safetensors.torch import load_file, save_file

    good = tmp_path / "good"
    make_hf(good, "llama")
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")

    def variant(name, edit_cfg=None, edit_w=None, drop_weights=False):
        d = tmp_path / name
        d.mkdir()
        cfg = json.loads((good / "config.json").read_text())
        if edit_cfg:
            edit_cfg(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
        if not drop_weights:
            w = load_file(str(good / "model.safetensors"))
            if edit_w:
                edit_w(w)
            save_file(w, str(d / "model.safetensors"))
        return d

    d = variant("nocfg")
    os.remove(d / "config.json")
    with pytest.raises(ValueError, match="config.json"):
        load_checkpoint(d)
    d = variant("badjson")
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json.*malformed"):
        load_checkpoint(d)
    with pytest.raises(ValueError, match="unsupported architecture"):
        load_checkpoint(variant("arch", lambda c: c.update(architectures=["GPT2LMHeadModel"])))
    with pytest.raises(ValueError, match="head_dim 32"):
        load_checkpoint(variant("hd", lambda c: c.update(head_dim=32)))
    with pytest.raises(ValueError, match="missing required key 'hidden_size'"):
        load_checkpoint(variant("nohidden", lambda c: c.pop("hidden_size")))
    with pytest.raises(ValueError, match="no weights"):
        load_checkpoint(variant("now", drop_weights=True))
    with pytest.raises(ValueError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_checkpoint(variant("miss", edit_w=lambda w: w.pop("model.layers.1.mlp.up_proj.weight")))
    with pytest.raises(ValueError, match=r"model.norm.weight.*shape \(64,\), expected \(128,\)"):
        load_checkpoint(variant("shape", edit_w=lambda w: w.update({"model.norm.weight": torch.ones(64)})))
    d = variant("corrupt")
    (d / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read safetensors"):
        load_checkpoint(d)
    with pytest.raises(ValueError, match="load_builtin name"):
        load_builtin("nonsense")


def test_prompt_and_ids_errors(tmp_path):
    make_hf(tmp_path, "llama", max_pos=40)
    m = load_checkpoint(tmp_path)
    eng = Engine(m, num_pages=16, eos_token_ids=())
    with pytest.raises(ValueError, match="max_position_embeddings=40"):
        eng.prefill(rand_ids(41))
    with pytest.raises(ValueError, match=r"prompt_ids must be ints in \[0, vocab_size=97\)"):
        eng.prefill([1, 2, 97])
    with pytest.raises(ValueError, match="sequences\\[1\\]"):
        m.forward_tokens([[1, 2], [-1]])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m.forward_tokens([rand_ids(41)])
    node = eng.prefill(rand_ids(38))
    r = eng.extend([node], max_new_tokens=10)[0]
    assert r.stop_reason == "length" and len(r.token_ids) == 2 and node.num_tokens == 40
    with pytest.raises(ValueError, match="string needs a tokenizer"):
        eng.prefill("abc")


def test_pre_v5_config_keys(tmp_path):
    """Older configs keep ``rope_theta`` and ``rope_scaling`` at top level (and may omit
    ``architectures``): the same weights load to the same logits."""
    hf = make_hf(tmp_path, "llama", rope={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0})
    cfg = json.loads((tmp_path / "config.json").read_text())
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    cfg["rope_scaling"] = {"type": rp["rope_type"], "factor": rp["factor"]}
    cfg.pop("architectures")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = load_checkpoint(tmp_path)
    assert m.config.rope_theta == 5000.0 and m.config.rope_type == "linear"
    s = rand_ids(40, seed=8)
    torch.testing.assert_close(m.forward_tokens([s])[0], hf_logits(hf, s), atol=ATOL, rtol=RTOL)


def test_char_tokenizer_checkpoint(tmp_path):
    """A checkpoint with ttscale_tokenizer.json (the built-in models' form): string prompts get BOS."""
    from ttscale.engine import CharTokenizer

    tok = CharTokenizer.from_alphabet("0123456789+=\n")
    make_hf(tmp_path, "llama", vocab=tok.vocab_size)
    tok.save(str(tmp_path))
    m = load_checkpoint(tmp_path)
    assert isinstance(m.tokenizer, CharTokenizer)
    eng = Engine(m, num_pages=16)
    n = eng.prefill("12+7=")
    assert eng.tokens(n) == [tok.bos_token_id] + tok.encode("12+7=") and eng.text(n) == "12+7="
    assert eng.eos_token_ids == {tok.eos_token_id}


def test_hf_tokenizer_json(tmp_path):
    """tokenizer.json through `tokenizers` (+ tokenizer_config.json special tokens and add_bos_token)."""
    tokenizers = pytest.importorskip("tokenizers")
    chars = list("abcdefgh =+0123456789")
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>"] + chars)}
    tk = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tk.add_special_tokens(["<pad>", "<s>", "</s>"])
    tk.decoder = tokenizers.decoders.Fuse()
    make_hf(tmp_path, "qwen2", vocab=len(vocab))
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>", "add_bos_token": True}))
    m = load_checkpoint(tmp_path)
    t = m.tokenizer
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id, t.vocab_size) == (1, 2, 0, len(vocab))
    eng = Engine(m, num_pages=16)
    n = eng.prefill("ab 12=")
    assert eng.tokens(n) == [1] + [vocab[c] for c in "ab 12="]
    eng.append(n, "3+")
    assert eng.text(n) == "ab 12=3+"
    r = eng.extend([n], max_new_tokens=4, seed=0)[0]
    assert eng.text(n) == "ab 12=3+" + r.text
