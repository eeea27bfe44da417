"""Loading local Hugging Face style checkpoints into :class:`ttscale.engine.Transformer`.

A checkpoint directory holds ``config.json`` and the weights as ``model.safetensors`` or sharded
(``model.safetensors.index.json`` + the shards it names). Architectures: ``LlamaForCausalLM``,
``Qwen2ForCausalLM`` and the ``LlamaForSequenceClassification`` / ``Qwen2ForSequenceClassification``
heads (``score.weight [num_labels, hidden]``, no bias: a process reward model with ``num_labels=1``).
Both the transformers 5 config form (``rope_parameters`` holding ``rope_theta`` and the scaling) and
the older one (``rope_theta`` + ``rope_scaling``) are read. Nothing is downloaded.

Tokenizer: ``tokenizer.json`` through the ``tokenizers`` library when present (:class:`HFTokenizer`),
else ``ttscale_tokenizer.json`` (:class:`~ttscale.engine.CharTokenizer`), else none.

``load_checkpoint`` returns the model; ``model.config`` is the parsed :class:`ModelConfig` and
``model.tokenizer`` the tokenizer (or ``None``).
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import torch

from .model import ModelConfig, Transformer
from .tokenizer import TOKENIZER_FILE, CharTokenizer

__all__ = ["load_checkpoint", "load_builtin", "parse_config", "HFTokenizer", "load_tokenizer", "BUILTIN_DIR"]

BUILTIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "builtin")
ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "LlamaForSequenceClassification",
                 "Qwen2ForSequenceClassification")


def _err(path: str, msg: str) -> ValueError:
    return ValueError(f"ttscale.engine: {path}: {msg}")


def parse_config(cfg: dict, path: str = "config.json") -> ModelConfig:
    """:class:`ModelConfig` from a HF ``config.json`` dict (``path`` only names the file in errors)."""
    if not isinstance(cfg, dict):
        raise _err(path, "expected a JSON object")
    archs = cfg.get("architectures") or []
    if not archs:
        mt = cfg.get("model_type")
        archs = {"llama": ["LlamaForCausalLM"], "qwen2": ["Qwen2ForCausalLM"]}.get(mt, [])
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise _err(path, f"unsupported architecture {archs or cfg.get('model_type')!r}; supported: "
                         f"{', '.join(ARCHITECTURES)}")
    arch = archs[0]
    qwen = arch.startswith("Qwen2")
    classifier = arch.endswith("ForSequenceClassification")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in cfg:
            raise _err(path, f"missing required key {key!r}")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise _err(path, f"hidden_act {act!r} is not supported (only silu / SwiGLU)")
    if cfg.get("use_sliding_window", False):
        raise _err(path, "use_sliding_window=true is not supported")
    if int(cfg.get("pretraining_tp", 1) or 1) != 1:
        raise _err(path, "pretraining_tp != 1 is not supported")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    # rope: transformers >= 5 keeps theta and the scaling in `rope_parameters`; older configs use
    # `rope_theta` and `rope_scaling`.
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and rp:
        theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
    else:
        theta = cfg.get("rope_theta", 10000.0)
        scaling = dict(cfg.get("rope_scaling") or {})
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    num_labels = None
    if classifier:
        num_labels = cfg.get("num_labels")
        if num_labels is None:
            id2label = cfg.get("id2label")
            num_labels = len(id2label) if isinstance(id2label, dict) else 2
    try:
        return ModelConfig(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads, head_dim=head_dim,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=float(theta), rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=True if qwen else bool(cfg.get("attention_bias", False)),
            o_bias=False if qwen else bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)), num_labels=num_labels,
            bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"), architecture=arch)
    except (ValueError, TypeError) as e:
        raise _err(path, str(e)) from None


# ---------------------------------------------------------------------- tokenizers
class HFTokenizer:
    """``tokenizer.json`` through the ``tokenizers`` library, with the engine's tokenizer interface.

    ``encode`` adds no special tokens; ``add_bos`` (from ``tokenizer_config.json`` ``add_bos_token``,
    default False) tells the engine whether to prepend ``bos_token_id`` to string prompts."""

    def __init__(self, directory: str, config: Optional[ModelConfig] = None):
        from tokenizers import Tokenizer

        path = os.path.join(directory, "tokenizer.json")
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises its own Exception type
            raise _err(path, f"cannot load tokenizer: {e}") from None
        tc = {}
        tc_path = os.path.join(directory, "tokenizer_config.json")
        if os.path.exists(tc_path):
            try:
                with open(tc_path) as f:
                    tc = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise _err(tc_path, f"malformed JSON: {e}") from None

        def tok_id(name):
            t = tc.get(name)
            if isinstance(t, dict):
                t = t.get("content")
            return self._tok.token_to_id(t) if isinstance(t, str) else None

        self.bos_token_id = tok_id("bos_token")
        self.eos_token_id = tok_id("eos_token")
        self.pad_token_id = tok_id("pad_token")
        if config is not None:
            if self.bos_token_id is None and isinstance(config.bos_token_id, int):
                self.bos_token_id = config.bos_token_id
            if self.eos_token_id is None and config.eos_token_ids:
                self.eos_token_id = config.eos_token_ids[0]
        self.add_bos = bool(tc.get("add_bos_token", False))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> List[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids, *, skip_special: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)


def load_tokenizer(directory: str, config: Optional[ModelConfig] = None):
    """The checkpoint's tokenizer (module docstring), or ``None`` when it has none."""
    if os.path.exists(os.path.join(directory, "tokenizer.json")):
        return HFTokenizer(directory, config)
    if os.path.exists(os.path.join(directory, TOKENIZER_FILE)):
        return CharTokenizer.load(directory)
    return None


# ---------------------------------------------------------------------- weights
def _read_weights(directory: str) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(single):
        files = [single]
    elif os.path.exists(index):
        try:
            with open(index) as f:
                wm = json.load(f)["weight_map"]
            files = sorted({os.path.join(directory, v) for v in wm.values()})
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise _err(index, f"malformed index (expected {{'weight_map': {{name: file}}}}): {e}") from None
    else:
        raise _err(directory, "no weights: expected model.safetensors or model.safetensors.index.json")
    out: Dict[str, torch.Tensor] = {}
    for fn in files:
        if not os.path.exists(fn):
            raise _err(fn, "weight shard named in model.safetensors.index.json does not exist")
        try:
            out.update(load_file(fn))
        except (SafetensorError, OSError, ValueError) as e:
            raise _err(fn, f"cannot read safetensors file: {e}") from None
    return out


def _assign(model: Transformer, w: Dict[str, torch.Tensor], directory: str, dtype: torch.dtype) -> None:
    c = model.config
    pre = "model."
    if not any(k.startswith(pre) for k in w):
        pre = ""  # bare backbone checkpoints (LlamaModel) name tensors without the "model." prefix

    def get(name: str, shape) -> torch.Tensor:
        key = name if name in ("lm_head.weight", "score.weight") else pre + name
        if key not in w:
            raise _err(directory, f"missing tensor {key!r} in the checkpoint weights")
        t = w[key]
        if tuple(t.shape) != tuple(shape):
            raise _err(directory, f"tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)} from config.json")
        return t.to(dtype)

    h, d, hq, hkv, inter = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
    with torch.no_grad():
        model.embed_tokens.weight.copy_(get("embed_tokens.weight", (c.vocab_size, h)))
        model.norm.copy_(get("norm.weight", (h,)))
        for i, layer in enumerate(model.layers):
            p = f"layers.{i}."
            layer.input_layernorm.copy_(get(p + "input_layernorm.weight", (h,)))
            layer.post_attention_layernorm.copy_(get(p + "post_attention_layernorm.weight", (h,)))
            layer.qkv_proj.weight.copy_(torch.cat([get(p + "self_attn.q_proj.weight", (hq * d, h)),
                                                   get(p + "self_attn.k_proj.weight", (hkv * d, h)),
                                                   get(p + "self_attn.v_proj.weight", (hkv * d, h))]))
            if c.qkv_bias:
                layer.qkv_proj.bias.copy_(torch.cat([get(p + "self_attn.q_proj.bias", (hq * d,)),
                                                     get(p + "self_attn.k_proj.bias", (hkv * d,)),
                                                     get(p + "self_attn.v_proj.bias", (hkv * d,))]))
            layer.o_proj.weight.copy_(get(p + "self_attn.o_proj.weight", (h, hq * d)))
            if c.o_bias:
                layer.o_proj.bias.copy_(get(p + "self_attn.o_proj.bias", (h,)))
            layer.gate_up_proj.weight.copy_(torch.cat([get(p + "mlp.gate_proj.weight", (inter, h)),
                                                       get(p + "mlp.up_proj.weight", (inter, h))]))
            layer.down_proj.weight.copy_(get(p + "mlp.down_proj.weight", (h, inter)))
            if c.mlp_bias:
                layer.gate_up_proj.bias.copy_(torch.cat([get(p + "mlp.gate_proj.bias", (inter,)),
                                                         get(p + "mlp.up_proj.bias", (inter,))]))
                layer.down_proj.bias.copy_(get(p + "mlp.down_proj.bias", (h,)))
        if model.score is not None:
            model.score.weight.copy_(get("score.weight", (c.num_labels, h)))
        elif model.lm_head is not None:
            model.lm_head.weight.copy_(get("lm_head.weight", (c.vocab_size, h)))


def load_checkpoint(path: str, *, dtype: torch.dtype = torch.float32, device="cpu",
                    quantize: Optional[dict] = None) -> Transformer:
    """Load a local HF-style checkpoint directory (module docstring) as a :class:`Transformer`.

    Args:
        path: the checkpoint directory.
        dtype: parameter / activation dtype (float32, float16 or bfloat16).
        device: where the model lives.
        quantize: optional dict for :func:`ttscale.nn.quantize_model`, e.g. ``dict(bits=4,
            group_size=128, symmetric=False)``; the decoder layers' linears become ``QuantLinear``
            (``include_head=True`` also quantizes ``lm_head`` / ``score``). Layers whose input size is
            not a multiple of ``group_size`` stay dense.

    Returns:
        the model in eval mode with ``.config`` (:class:`ModelConfig`) and ``.tokenizer`` (or None).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"ttscale.engine: checkpoint directory {path!r} does not exist")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"ttscale.engine: dtype must be float32, float16 or bfloat16, got {dtype}")
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise _err(cfg_path, "missing config.json") from None
    except (OSError, json.JSONDecodeError) as e:
        raise _err(cfg_path, f"malformed JSON: {e}") from None
    config = parse_config(raw, cfg_path)
    weights = _read_weights(path)
    model = Transformer(config)
    _assign(model, weights, path, torch.float32)
    del weights
    model = model.to(device=device, dtype=dtype)
    model.inv_freq = model.inv_freq.float()
    if quantize:
        from ..nn import quantize_model

        q = dict(quantize)
        include_head = q.pop("include_head", False)
        allowed = {"bits", "group_size", "symmetric"}
        extra = set(q) - allowed
        if extra:
            raise ValueError(f"ttscale.engine: quantize has unknown keys {sorted(extra)}; allowed: "
                             f"{sorted(allowed | {'include_head'})}")
        quantize_model(model, filter=None if include_head else (lambda name, m: name.startswith("layers.")), **q)
    model.tokenizer = load_tokenizer(path, config)
    return model.eval()


def load_builtin(name: str, **kw) -> Transformer:
    """The built-in ``"policy"`` or ``"prm"`` model from ``ttscale/data/builtin/<name>/`` (keyword
    arguments as :func:`load_checkpoint`)."""
    if name not in ("policy", "prm"):
        raise ValueError(f"ttscale.engine: load_builtin name must be 'policy' or 'prm', got {name!r}")
    d = os.path.join(BUILTIN_DIR, name)
    if not os.path.isdir(d):
        raise FileNotFoundError(f"ttscale.engine: the built-in {name!r} model is not in this installation "
                                f"(expected a checkpoint directory at {d}; it is produced by the built-in "
                                f"training script)")
    return load_checkpoint(d, **kw)
