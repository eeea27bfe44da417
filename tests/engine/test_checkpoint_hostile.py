"""Hostile and malformed checkpoints: every one must be refused with a ValueError that names the file
and the key / tensor at fault, before the model is allocated where the fault is visible from the
config and the safetensors headers alone. Valid layouts (sharded with an index, a Hugging Face hub
cache snapshot whose files are symlinks into ``../../blobs``) must keep loading to the same logits.

The tiny checkpoints come from transformers' own classes saved with ``save_pretrained`` (see
``test_engine_checkpoint.make_hf``); nothing is downloaded.
"""
import json
import math
import os
import shutil
import sys

import pytest
import torch

from test_engine_checkpoint import ATOL, RTOL, hf_logits, make_hf, rand_ids
from ttscale.engine import CharTokenizer, ModelConfig, load_checkpoint, parse_config
from ttscale.engine import checkpoint as ckpt

pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402  (transformers brings safetensors)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """One valid single-file Llama checkpoint (and its transformers model) shared by the module."""
    d = tmp_path_factory.mktemp("good")
    hf = make_hf(d, "llama")
    return d, hf


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    d = tmp_path_factory.mktemp("sharded")
    hf = make_hf(d, "qwen2", shard=True)
    assert os.path.exists(d / "model.safetensors.index.json")
    return d, hf


def variant(src, dst, edit_cfg=None, edit_w=None, raw_cfg=None):
    """Copy checkpoint ``src`` to ``dst``, editing config.json (a dict edit, or raw text) and/or the
    weights (a dict edit of the single model.safetensors)."""
    shutil.copytree(src, dst)
    if raw_cfg is not None:
        (dst / "config.json").write_text(raw_cfg)
    elif edit_cfg is not None:
        cfg = json.loads((dst / "config.json").read_text())
        edit_cfg(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if edit_w is not None:
        w = load_file(str(dst / "model.safetensors"))
        edit_w(w)
        save_file(w, str(dst / "model.safetensors"))
    return dst


def _no_alloc(monkeypatch):
    """Make building the model fail the test: the error must come before anything is allocated."""
    def boom(*a, **k):
        raise AssertionError("the model was allocated before the checkpoint was validated")
    monkeypatch.setattr(ckpt, "Transformer", boom)


def _rewrite_index(d, fn):
    p = d / "model.safetensors.index.json"
    idx = json.loads(p.read_text())
    fn(idx)
    p.write_text(json.dumps(idx))


# ---------------------------------------------------------------------- weight_map paths
def test_index_absolute_and_parent_paths_refused(tmp_path, sharded):
    src, _ = sharded
    outside = tmp_path / "outside"
    outside.mkdir()
    first = "model-00001-of-00016.safetensors"
    shutil.copy(src / first, outside / first)
    for name, target in [("abs", str(outside / first)), ("dotdot", f"../outside/{first}"),
                         ("sub", f"sub/{first}"), ("dot", f"./{first}"), ("empty", "")]:
        d = variant(src, tmp_path / name)
        (d / "sub").mkdir()
        shutil.copy(src / first, d / "sub" / first)

        def edit(idx):
            for k, v in idx["weight_map"].items():
                if v == first:
                    idx["weight_map"][k] = target
        _rewrite_index(d, edit)
        with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json.*weight_map.*plain file name"):
            load_checkpoint(d)


def test_index_names_a_directory_or_device(tmp_path, sharded):
    src, _ = sharded
    d = variant(src, tmp_path / "dir")
    os.mkdir(d / "adir")
    _rewrite_index(d, lambda idx: idx["weight_map"].update({"model.norm.weight": "adir"}))
    with pytest.raises(ValueError, match="adir.*not a regular file"):
        load_checkpoint(d)
    if os.path.exists("/dev/zero"):
        d = variant(src, tmp_path / "dev")
        os.symlink("/dev/zero", d / "zero.safetensors")
        _rewrite_index(d, lambda idx: idx["weight_map"].update({"model.norm.weight": "zero.safetensors"}))
        with pytest.raises(ValueError, match="zero.safetensors.*not a regular file"):
            load_checkpoint(d)


@pytest.mark.parametrize("index", [
    [], {"weight_map": []}, {"weight_map": {"model.norm.weight": 3}}, {"weight_map": {}},
    {"weight_map": {"model.norm.weight": "nope.safetensors"}},
])
def test_malformed_index(tmp_path, sharded, index):
    src, _ = sharded
    d = variant(src, tmp_path / "bad")
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json|nope\.safetensors"):
        load_checkpoint(d)


def test_index_deeply_nested(tmp_path, sharded):
    src, _ = sharded
    d = variant(src, tmp_path / "deep")
    (d / "model.safetensors.index.json").write_text('{"weight_map": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json.*nested"):
        load_checkpoint(d)


def test_index_names_tensor_its_shard_lacks(tmp_path, sharded):
    src, _ = sharded
    d = variant(src, tmp_path / "lie")
    wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    other = next(v for k, v in wm.items() if v != wm["model.norm.weight"])
    _rewrite_index(d, lambda idx: idx["weight_map"].update({"model.norm.weight": other}))
    with pytest.raises(ValueError, match=f"{other}.*'model.norm.weight'"):
        load_checkpoint(d)


def test_sharded_checkpoint_still_loads(sharded):
    d, hf = sharded
    m = load_checkpoint(d)
    s = rand_ids(21, seed=1)
    torch.testing.assert_close(m.forward_tokens([s])[0], hf_logits(hf, s), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("which", ["single", "sharded"])
def test_hf_hub_cache_symlink_layout(tmp_path, good, sharded, which):
    """The hub cache: models--org--name/snapshots/<rev>/<file> -> ../../blobs/<hash>. The names in
    weight_map stay plain file names in the snapshot folder; that the files they name are symlinks
    resolving outside it is how the cache works, and must load."""
    src, hf = good if which == "single" else sharded
    repo = tmp_path / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(os.listdir(src))):
        blob = f"{i:040x}"
        shutil.copy(src / f, blobs / blob)
        os.symlink(os.path.join("..", "..", "blobs", blob), snap / f)
    assert os.path.islink(snap / "config.json")
    m = load_checkpoint(snap)
    s = rand_ids(17, seed=2)
    torch.testing.assert_close(m.forward_tokens([s])[0], hf_logits(hf, s), atol=ATOL, rtol=RTOL)
    # the same blobs named through the index by their real path are still refused
    if which == "sharded":
        shard = next(f for f in os.listdir(snap) if f.endswith(".safetensors"))
        blob = os.readlink(snap / shard)  # ../../blobs/<hash>
        idx_link = snap / "model.safetensors.index.json"
        idx = json.loads(idx_link.read_text())
        idx["weight_map"] = {k: (blob if v == shard else v) for k, v in idx["weight_map"].items()}
        os.remove(idx_link)
        idx_link.write_text(json.dumps(idx))
        with pytest.raises(ValueError, match="plain file name"):
            load_checkpoint(snap)


# ---------------------------------------------------------------------- non-finite weights
@pytest.mark.parametrize("key,bad", [("model.layers.1.self_attn.k_proj.weight", math.nan),
                                     ("model.norm.weight", math.inf),
                                     ("lm_head.weight", -math.inf),
                                     ("model.embed_tokens.weight", math.nan)])
def test_non_finite_weight_refused(tmp_path, good, key, bad):
    def edit(w):
        w[key] = w[key].clone()
        w[key].view(-1)[w[key].numel() // 2] = bad
    d = variant(good[0], tmp_path / "nf", edit_w=edit)
    with pytest.raises(ValueError, match=f"model.safetensors.*tensor '{key}'.*(NaN|inf)"):
        load_checkpoint(d)


def test_weight_overflowing_target_dtype_refused(tmp_path, good):
    key = "model.layers.0.mlp.up_proj.weight"

    def edit(w):
        w[key] = w[key].clone()
        w[key][3, 5] = 1e6  # finite in float32, inf in float16
    d = variant(good[0], tmp_path / "ovf", edit_w=edit)
    load_checkpoint(d, dtype=torch.bfloat16)  # bfloat16 has float32's range
    with pytest.raises(ValueError, match=f"tensor '{key}'.*float16"):
        load_checkpoint(d, dtype=torch.float16)


def test_integer_weight_refused(tmp_path, good):
    key = "model.norm.weight"
    d = variant(good[0], tmp_path / "int", edit_w=lambda w: w.update({key: torch.ones(128, dtype=torch.int32)}))
    with pytest.raises(ValueError, match=f"tensor '{key}'.*I32"):
        load_checkpoint(d)


# ---------------------------------------------------------------------- config values
def _set_rope(cfg, **kw):
    cfg["rope_parameters"].update(kw)


@pytest.mark.parametrize("key,value", [("rope_theta", 0.0), ("rope_theta", -10000.0), ("rope_theta", math.nan),
                                       ("rope_theta", math.inf), ("rope_theta", 1.0), ("rope_theta", "1e4"),
                                       ("rope_theta", True)])
def test_rope_theta_out_of_range(tmp_path, good, key, value):
    d = variant(good[0], tmp_path / "t", edit_cfg=lambda c: _set_rope(c, rope_theta=value))
    with pytest.raises(ValueError, match=f"config.json.*rope_parameters.*rope_theta.*{str(value)[:3]}"):
        load_checkpoint(d)


def test_rope_theta_old_key_named(tmp_path, good):
    def edit(c):
        c.pop("rope_parameters")
        c["rope_theta"] = -1.0
    d = variant(good[0], tmp_path / "t", edit_cfg=edit)
    with pytest.raises(ValueError, match=r"config.json: config rope_theta must.*-1\.0"):
        load_checkpoint(d)


ROPE_OK = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
             "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "attention_factor": 1.0},
}
ROPE_BAD = [(t, field, v) for t, fields in ROPE_OK.items() for field in fields if field != "rope_type"
            for v in (0, -2.0, math.nan, math.inf, "2")]


@pytest.mark.parametrize("rope_type,field,value", ROPE_BAD)
def test_rope_scaling_field_out_of_range(tmp_path, good, rope_type, field, value):
    rope = dict(ROPE_OK[rope_type], rope_theta=10000.0)
    rope[field] = value
    d = variant(good[0], tmp_path / "r", edit_cfg=lambda c: c.update(rope_parameters=rope))
    if field in ("mscale", "mscale_all_dim") and value == 0:
        load_checkpoint(d)  # 0 is HF's "not given" for these two (``if mscale and mscale_all_dim``)
        return
    with pytest.raises(ValueError, match=f"config.json.*rope_parameters.*{field}"):
        load_checkpoint(d)


@pytest.mark.parametrize("rope_type", list(ROPE_OK))
def test_rope_scaling_valid_fields_load(tmp_path, good, rope_type):
    rope = dict(ROPE_OK[rope_type], rope_theta=10000.0)
    d = variant(good[0], tmp_path / "r", edit_cfg=lambda c: c.update(rope_parameters=rope))
    assert load_checkpoint(d).config.rope_type == rope_type


def test_rope_scaling_more_checks(tmp_path, good):
    # llama3 needs all of its fields (a bare KeyError before); high_freq_factor must exceed low.
    rope = dict(ROPE_OK["llama3"], rope_theta=10000.0)
    rope.pop("low_freq_factor")
    d = variant(good[0], tmp_path / "l3", edit_cfg=lambda c: c.update(rope_parameters=rope))
    with pytest.raises(ValueError, match="config.json.*rope_parameters.*low_freq_factor.*missing"):
        load_checkpoint(d)
    rope = dict(ROPE_OK["llama3"], rope_theta=10000.0, high_freq_factor=1.0)
    d = variant(good[0], tmp_path / "l3b", edit_cfg=lambda c: c.update(rope_parameters=rope))
    with pytest.raises(ValueError, match="high_freq_factor.*greater than low_freq_factor"):
        load_checkpoint(d)
    # the old rope_scaling key: named as such, and it must be an object
    def old(c, rs):
        c.pop("rope_parameters")
        c["rope_theta"] = 10000.0
        c["rope_scaling"] = rs
    d = variant(good[0], tmp_path / "old", edit_cfg=lambda c: old(c, {"type": "linear", "factor": -1}))
    with pytest.raises(ValueError, match=r"config.json.*rope_scaling.*factor.*-1"):
        load_checkpoint(d)
    d = variant(good[0], tmp_path / "old5", edit_cfg=lambda c: old(c, 5))
    with pytest.raises(ValueError, match="config.json.*rope_scaling.*object"):
        load_checkpoint(d)
    d = variant(good[0], tmp_path / "rtype", edit_cfg=lambda c: c.update(rope_parameters={"rope_type": ["x"]}))
    with pytest.raises(ValueError, match="config.json.*rope"):
        load_checkpoint(d)


@pytest.mark.parametrize("value", [-1e-5, 0.0, math.nan, math.inf, "1e-5", None])
def test_rms_norm_eps_out_of_range(tmp_path, good, value):
    d = variant(good[0], tmp_path / "e", edit_cfg=lambda c: c.update(rms_norm_eps=value))
    with pytest.raises(ValueError, match="config.json.*rms_norm_eps"):
        load_checkpoint(d)


def test_model_config_direct_checks():
    base = dict(vocab_size=97, hidden_size=128, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=64)
    ModelConfig(**base)
    for k, v in [("num_key_value_heads", 0), ("num_attention_heads", 0), ("hidden_size", True),
                 ("num_hidden_layers", 2.0), ("rms_norm_eps", -1.0), ("rope_theta", math.nan)]:
        with pytest.raises(ValueError, match=k):
            ModelConfig(**dict(base, **{k: v}))
    with pytest.raises(ValueError, match="rope_scaling.*factor"):
        ModelConfig(**base, rope_scaling={"rope_type": "linear", "factor": 0.0})


# ---------------------------------------------------------------------- config sizes
@pytest.mark.parametrize("key,value,msg", [
    ("hidden_size", "128", "hidden_size.*positive int.*'128'"),
    ("hidden_size", 128.0, "hidden_size.*positive int.*128.0"),
    ("num_hidden_layers", 1e5, "num_hidden_layers.*positive int"),
    ("num_hidden_layers", True, "num_hidden_layers.*positive int.*True"),
    ("vocab_size", -97, "vocab_size.*positive int"),
    ("num_attention_heads", 0, "num_attention_heads.*positive int"),
    ("num_key_value_heads", 0, "num_key_value_heads.*positive int"),
    ("head_dim", 0, "head_dim.*positive int"),
    ("max_position_embeddings", "256", "max_position_embeddings.*positive int"),
    ("intermediate_size", [160], "intermediate_size.*positive int"),
])
def test_config_sizes_must_be_positive_ints(tmp_path, good, monkeypatch, key, value, msg):
    d = variant(good[0], tmp_path / "s", edit_cfg=lambda c: c.update({key: value}))
    _no_alloc(monkeypatch)
    with pytest.raises(ValueError, match="config.json.*" + msg):
        load_checkpoint(d)


def test_string_hidden_size_without_head_dim(tmp_path, sharded):
    """Qwen2 configs have no head_dim, so it is derived from hidden_size (a bare TypeError before)."""
    d = variant(sharded[0], tmp_path / "s", edit_cfg=lambda c: c.update(hidden_size="128"))
    with pytest.raises(ValueError, match="config.json.*hidden_size.*'128'"):
        load_checkpoint(d)


def test_more_layers_than_tensors(tmp_path, good, monkeypatch):
    d = variant(good[0], tmp_path / "l", edit_cfg=lambda c: c.update(num_hidden_layers=100000))
    _no_alloc(monkeypatch)
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.2\.input_layernorm\.weight'.*"
                                         r"num_hidden_layers=100000.*layers 0\.\.1"):
        load_checkpoint(d)


def test_fewer_layers_than_tensors(tmp_path, good, monkeypatch):
    d = variant(good[0], tmp_path / "l", edit_cfg=lambda c: c.update(num_hidden_layers=1))
    _no_alloc(monkeypatch)
    with pytest.raises(ValueError, match=r"model\.layers\.1\..*num_hidden_layers=1"):
        load_checkpoint(d)


@pytest.mark.parametrize("key,value,tensor", [("hidden_size", 10 ** 9, "model.embed_tokens.weight"),
                                              ("vocab_size", 10 ** 9, "model.embed_tokens.weight"),
                                              ("intermediate_size", 10 ** 8, "model.layers.0.mlp.gate_proj.weight"),
                                              ("num_attention_heads", 2 ** 20, "model.layers.0.self_attn.q_proj")])
def test_absurd_sizes_refused_before_allocation(tmp_path, good, monkeypatch, key, value, tensor):
    d = variant(good[0], tmp_path / "a", edit_cfg=lambda c: c.update({key: value}))
    _no_alloc(monkeypatch)
    with pytest.raises(ValueError, match=f"tensor '{tensor}.*has shape.*expected"):
        load_checkpoint(d)


def test_memory_estimate_larger_than_the_machine(tmp_path, good, monkeypatch):
    _no_alloc(monkeypatch)
    monkeypatch.setattr(ckpt, "_memory_limit", lambda device: (100_000, "physical memory"))
    with pytest.raises(ValueError, match=r"needs about .*(MiB|KiB|GiB).*float32.*physical memory"):
        load_checkpoint(good[0])


def test_absurd_max_position_embeddings(tmp_path, good, monkeypatch):
    """The RoPE tables are [max_position_embeddings, head_dim]: 2^40 positions cannot fit anywhere."""
    d = variant(good[0], tmp_path / "p", edit_cfg=lambda c: c.update(max_position_embeddings=2 ** 40))
    _no_alloc(monkeypatch)
    with pytest.raises(ValueError, match="rope tables"):
        load_checkpoint(d)


def test_quantize_keys_checked_before_loading(good, monkeypatch):
    _no_alloc(monkeypatch)
    with pytest.raises(ValueError, match="unknown keys"):
        load_checkpoint(good[0], quantize=dict(bits=4, groupsize=64))
    with pytest.raises(ValueError, match="bits"):
        load_checkpoint(good[0], quantize=dict(bits=5))


# ---------------------------------------------------------------------- config.json shape and types
@pytest.mark.parametrize("raw,msg", [
    ("[" * 100000 + "]" * 100000, "nested"),
    ('{"a": ' * 100000 + "1" + "}" * 100000, "nested"),
    ("[1, 2]", "JSON object"),
    ("\"llama\"", "JSON object"),
    ("{\"a\": 1", "malformed JSON"),
])
def test_config_json_shape(tmp_path, good, raw, msg):
    d = variant(good[0], tmp_path / "c", raw_cfg=raw)
    with pytest.raises(ValueError, match=f"config.json.*{msg}"):
        load_checkpoint(d)


def test_config_json_not_utf8(tmp_path, good):
    d = variant(good[0], tmp_path / "c")
    (d / "config.json").write_bytes(b'{"hidden_size": "\xff\xfe"}')
    with pytest.raises(ValueError, match="config.json"):
        load_checkpoint(d)


@pytest.mark.parametrize("edit,msg", [
    (lambda c: c.update(tie_word_embeddings="false"), "tie_word_embeddings.*true or false"),
    (lambda c: c.update(attention_bias=1), "attention_bias.*true or false"),
    (lambda c: c.update(mlp_bias="no"), "mlp_bias.*true or false"),
    (lambda c: c.update(hidden_act=["silu"]), "hidden_act"),
    (lambda c: c.update(pretraining_tp="x"), "pretraining_tp"),
    (lambda c: c.update(eos_token_id="2"), "eos_token_id"),
    (lambda c: c.update(eos_token_id=[2, -1]), "eos_token_id"),
    (lambda c: c.update(bos_token_id=1.0), "bos_token_id"),
    (lambda c: c.update(architectures="LlamaForCausalLM"), "architectures"),
    (lambda c: (c.pop("architectures"), c.update(model_type=["llama"])), "model_type"),
    (lambda c: c.update(rope_parameters=[1, 2]), "rope_parameters.*object"),
])
def test_config_wrong_types(tmp_path, good, edit, msg):
    d = variant(good[0], tmp_path / "w", edit_cfg=edit)
    with pytest.raises(ValueError, match="config.json.*" + msg):
        load_checkpoint(d)


def test_parse_config_names_given_path():
    with pytest.raises(ValueError, match="elsewhere.json.*hidden_size"):
        parse_config({"architectures": ["LlamaForCausalLM"], "vocab_size": 3, "hidden_size": "x",
                      "intermediate_size": 4, "num_hidden_layers": 1, "num_attention_heads": 1}, "elsewhere.json")


# ---------------------------------------------------------------------- tokenizer files
@pytest.mark.parametrize("content,msg", [
    ("[1, 2]", "JSON object"),
    ('{"type": "char", "vocab": ["<pad>", "<bos>", "<eos>", 7]}', r"vocab\[3\].*string"),
    ('{"type": "char", "vocab": ["<pad>", "<bos>", "<eos>", ["a"]]}', r"vocab\[3\].*string"),
    ('{"type": "char", "vocab": ["<pad>", "<bos>", "<eos>", "a"], "pad_token": ["<pad>"]}', "pad_token"),
    ("[" * 100000 + "]" * 100000, "nested"),
])
def test_char_tokenizer_file_malformed(tmp_path, good, content, msg):
    d = variant(good[0], tmp_path / "ct")
    (d / "ttscale_tokenizer.json").write_text(content)
    with pytest.raises(ValueError, match=f"ttscale_tokenizer.json.*{msg}"):
        load_checkpoint(d)
    with pytest.raises(ValueError, match=f"ttscale_tokenizer.json.*{msg}"):
        CharTokenizer.load(str(d))


def test_char_tokenizer_constructor_types():
    with pytest.raises(ValueError, match=r"vocab\[1\]"):
        CharTokenizer(["<pad>", 5, "<bos>", "<eos>"])
    with pytest.raises(ValueError, match="bos_token"):
        CharTokenizer(["<pad>", "<bos>", "<eos>"], bos_token=["<bos>"])


def _hf_tokenizer_files(d):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>"] + list("abcdefgh"))}
    tk = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tk.save(str(d / "tokenizer.json"))


@pytest.mark.parametrize("content,msg", [
    ("[1]", "JSON object"), ("[" * 100000 + "]" * 100000, "nested"), ("{", "malformed JSON"),
    ('{"add_bos_token": "yes"}', "add_bos_token.*true or false"),
])
def test_tokenizer_config_malformed(tmp_path, good, content, msg):
    d = variant(good[0], tmp_path / "tc")
    _hf_tokenizer_files(d)
    (d / "tokenizer_config.json").write_text(content)
    with pytest.raises(ValueError, match=f"tokenizer_config.json.*{msg}"):
        load_checkpoint(d)


@pytest.mark.parametrize("content", ["[1, 2]", "[" * 100000 + "]" * 100000,
                                     '{"version": "1.0", "model": {"type": "BPE", "vocab": {"a": "x"}, '
                                     '"merges": []}}'])
def test_tokenizer_json_malformed(tmp_path, good, content):
    pytest.importorskip("tokenizers")
    d = variant(good[0], tmp_path / "tj")
    (d / "tokenizer.json").write_text(content)
    with pytest.raises(ValueError, match="tokenizer.json.*cannot load tokenizer"):
        load_checkpoint(d)


def test_tokenizer_json_without_tokenizers_package(tmp_path, good, monkeypatch):
    d = variant(good[0], tmp_path / "nt")
    (d / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(ValueError, match="tokenizer.json.*pip install tokenizers"):
        load_checkpoint(d)
