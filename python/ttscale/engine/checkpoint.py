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

Validation. A checkpoint folder is input like any other: every fault is a ``ValueError`` naming the
file and the key or tensor, and everything that can be checked without the weights' bytes is checked
before the model is allocated, so an absurd config fails at once instead of exhausting memory:

* JSON files (config.json, the index, tokenizer_config.json, ttscale_tokenizer.json) must parse and
  hold an object; deep nesting, non-UTF-8 bytes and wrong top-level types are errors, not tracebacks.
* config.json: sizes are positive ints (bools and floats refused), flags true/false, ``rms_norm_eps``
  a finite number > 0, ``rope_theta`` > 1 and every numeric field of the RoPE scaling in range
  (``ttscale.engine.model.check_rope``).
* ``weight_map`` in the index names shards by plain file names inside the folder: absolute paths,
  ``..`` and sub-folders are refused. A named file may itself be a symlink to anywhere (the HF hub
  cache is ``snapshots/<rev>/<file> -> ../../blobs/<hash>``): the rule guards what the index may
  point at, and the folder's own entries are trusted as the folder is. The target must be a regular
  file (no directories, devices, FIFOs).
* safetensors headers (read through ``safe_open``, which maps the file and parses only the header):
  every tensor the config implies exists with the implied shape and a float dtype, no layer beyond
  ``num_hidden_layers`` is stored, and the memory the load needs (weights in the target dtype, the
  largest tensor in transit, RoPE tables, quantisation) fits the device (physical memory or cgroup
  limit on CPU, total memory on CUDA).
* While loading, each tensor is checked for NaN / inf right after it is copied into the model (one
  ``aminmax`` pass over memory just written, not a second read of the checkpoint), which also catches
  float32 weights that overflow float16.

Nothing is unpickled: weights come only from safetensors files.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from ._jsonfile import json_kind, read_json_object
from .model import ModelConfig, Transformer, check_positive_int, check_rope, rope_inv_freq
from .tokenizer import TOKENIZER_FILE, CharTokenizer

__all__ = ["load_checkpoint", "load_builtin", "parse_config", "HFTokenizer", "load_tokenizer", "BUILTIN_DIR"]

BUILTIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "builtin")
ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "LlamaForSequenceClassification",
                 "Qwen2ForSequenceClassification")


def _err(path: str, msg: str) -> ValueError:
    return ValueError(f"ttscale.engine: {path}: {msg}")


def _json_object(path: str) -> dict:
    try:
        return read_json_object(path)
    except ValueError as e:
        raise ValueError(f"ttscale.engine: {e}") from None


def parse_config(cfg: dict, path: str = "config.json") -> ModelConfig:
    """:class:`ModelConfig` from a HF ``config.json`` dict (``path`` only names the file in errors).

    Every value the engine uses is type- and range-checked here, before anything is allocated: sizes
    must be positive ints (not bools, not floats), flags true/false, ``rms_norm_eps`` a finite number
    > 0, ``rope_theta`` and the RoPE scaling fields in range (:func:`~ttscale.engine.model.check_rope`).
    """
    if not isinstance(cfg, dict):
        raise _err(path, f"expected a JSON object at the top level, got {json_kind(cfg)}")
    try:
        return _parse_config(cfg, path)
    except ValueError as e:
        msg = str(e)
        if msg.startswith("ttscale.engine: " + path):
            raise
        # model.py's checks do not know the file; name it, without repeating the prefix.
        raise _err(path, msg.removeprefix("ttscale.engine: ")) from None


def _parse_config(cfg: dict, path: str) -> ModelConfig:
    archs = cfg.get("architectures")
    if archs is None or archs == []:
        mt = cfg.get("model_type")
        if mt is not None and not isinstance(mt, str):
            raise _err(path, f"model_type must be a string, got {mt!r}")
        archs = {"llama": ["LlamaForCausalLM"], "qwen2": ["Qwen2ForCausalLM"]}.get(mt, [])
    elif not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise _err(path, f"architectures must be a list of strings, got {archs!r}")
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise _err(path, f"unsupported architecture {archs or cfg.get('model_type')!r}; supported: "
                         f"{', '.join(ARCHITECTURES)}")
    arch = archs[0]
    qwen = arch.startswith("Qwen2")
    classifier = arch.endswith("ForSequenceClassification")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in cfg:
            raise _err(path, f"missing required key {key!r}")
        check_positive_int(key, cfg[key])
    # JSON null for these means "not given" in HF configs (derived from other keys).
    for key in ("num_key_value_heads", "head_dim", "max_position_embeddings", "num_labels"):
        if cfg.get(key) is not None:
            check_positive_int(key, cfg[key])

    def flag(key: str, default: bool) -> bool:
        # bool("false") is True: a string flag would silently flip the architecture.
        v = cfg.get(key, default)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise _err(path, f"{key} must be true or false, got {v!r}")
        return v

    act = cfg.get("hidden_act", "silu")
    if not isinstance(act, str) or act not in ("silu", "swish"):
        raise _err(path, f"hidden_act {act!r} is not supported (only silu / SwiGLU)")
    if flag("use_sliding_window", False):
        raise _err(path, "use_sliding_window=true is not supported")
    tp = cfg.get("pretraining_tp")
    if tp is not None:
        check_positive_int("pretraining_tp", tp)
        if tp != 1:
            raise _err(path, "pretraining_tp != 1 is not supported")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        head_dim = cfg["hidden_size"] // heads
    # rope: transformers >= 5 keeps theta and the scaling in `rope_parameters`; older configs use
    # `rope_theta` and `rope_scaling`. Errors name the key the file actually used.
    rp = cfg.get("rope_parameters")
    if rp is not None and not isinstance(rp, dict):
        raise _err(path, f"rope_parameters must be an object or null, got {rp!r}")
    if rp:
        theta_key = "rope_parameters['rope_theta']" if "rope_theta" in rp else "rope_theta"
        theta = rp["rope_theta"] if "rope_theta" in rp else cfg.get("rope_theta", 10000.0)
        scaling, key = {k: v for k, v in rp.items() if k != "rope_theta"}, "rope_parameters"
    else:
        theta_key, theta = "rope_theta", cfg.get("rope_theta", 10000.0)
        rs = cfg.get("rope_scaling")
        if rs is not None and not isinstance(rs, dict):
            raise _err(path, f"rope_scaling must be an object or null, got {rs!r}")
        scaling, key = dict(rs or {}), "rope_scaling"
    check_rope(theta, scaling or None, key=key, theta_key=theta_key)
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    num_labels = None
    if classifier:
        num_labels = cfg.get("num_labels")
        if num_labels is None:
            id2label = cfg.get("id2label")
            num_labels = len(id2label) if isinstance(id2label, dict) else 2
    attention_bias = flag("attention_bias", False)
    try:
        return ModelConfig(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads, head_dim=head_dim,
            max_position_embeddings=cfg.get("max_position_embeddings") or 2048,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
            tie_word_embeddings=flag("tie_word_embeddings", False),
            qkv_bias=True if qwen else attention_bias, o_bias=False if qwen else attention_bias,
            mlp_bias=flag("mlp_bias", False), num_labels=num_labels,
            bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"), architecture=arch)
    except TypeError as e:
        raise _err(path, str(e)) from None


# ---------------------------------------------------------------------- tokenizers
class HFTokenizer:
    """``tokenizer.json`` through the ``tokenizers`` library, with the engine's tokenizer interface.

    ``encode`` adds no special tokens; ``add_bos`` (from ``tokenizer_config.json`` ``add_bos_token``,
    default False) tells the engine whether to prepend ``bos_token_id`` to string prompts."""

    def __init__(self, directory: str, config: Optional[ModelConfig] = None):
        path = os.path.join(directory, "tokenizer.json")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise _err(path, "reading tokenizer.json needs the 'tokenizers' package, which is not installed "
                             "(pip install tokenizers)") from None
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises its own Exception type
            raise _err(path, f"cannot load tokenizer: {e}") from None
        tc = {}
        tc_path = os.path.join(directory, "tokenizer_config.json")
        if os.path.lexists(tc_path):
            tc = _json_object(tc_path)

        def tok_id(name):
            t = tc.get(name)
            if isinstance(t, dict):  # AddedToken form: {"content": "<s>", "lstrip": false, ...}
                t = t.get("content")
            if t is not None and not isinstance(t, str):
                raise _err(tc_path, f"{name} must be a string, an object with a string 'content', or null; "
                                    f"got {tc.get(name)!r}")
            return self._tok.token_to_id(t) if isinstance(t, str) else None

        self.bos_token_id = tok_id("bos_token")
        self.eos_token_id = tok_id("eos_token")
        self.pad_token_id = tok_id("pad_token")
        if config is not None:
            if self.bos_token_id is None and isinstance(config.bos_token_id, int):
                self.bos_token_id = config.bos_token_id
            if self.eos_token_id is None and config.eos_token_ids:
                self.eos_token_id = config.eos_token_ids[0]
        add_bos = tc.get("add_bos_token", False)
        if add_bos is not None and not isinstance(add_bos, bool):  # bool("false") would be True
            raise _err(tc_path, f"add_bos_token must be true or false, got {add_bos!r}")
        self.add_bos = bool(add_bos)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> List[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids, *, skip_special: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)


def load_tokenizer(directory: str, config: Optional[ModelConfig] = None):
    """The checkpoint's tokenizer (module docstring), or ``None`` when it has none."""
    if os.path.lexists(os.path.join(directory, "tokenizer.json")):
        return HFTokenizer(directory, config)
    if os.path.lexists(os.path.join(directory, TOKENIZER_FILE)):
        try:
            return CharTokenizer.load(directory)
        except ValueError as e:
            raise ValueError(f"ttscale.engine: {e}") from None
    return None


# ---------------------------------------------------------------------- weights
# Weight dtypes the loader converts from (safetensors header names -> bytes per element). Integer and
# fp8 tensors are refused: casting them to float gives numbers, but not the weights (fp8 checkpoints
# need their scale tensors, integer ones their quantisation format).
_FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
INDEX_FILE = "model.safetensors.index.json"


def _check_shard_name(index: str, name) -> None:
    """weight_map values must be plain file names in the checkpoint folder.

    The rule is about the *names* the index (one JSON file, often downloaded on its own) may use:
    an absolute path or ``..`` would make it read weights from anywhere on the machine. It is not
    about where the named file's bytes live: the file may be a symlink to anywhere, because that is
    how the Hugging Face hub cache is laid out (``snapshots/<rev>/<name> -> ../../blobs/<hash>``)
    and the folder's own entries are as trusted as the folder. Sub-folders are refused too: HF
    writes shards next to the index, and a plain name is the one form that cannot escape."""
    bad = (not isinstance(name, str) or name in ("", ".", "..") or "\0" in name or os.path.isabs(name)
           or "/" in name or "\\" in name or (os.sep in name) or (os.altsep is not None and os.altsep in name))
    if bad:
        raise _err(index, f"weight_map names the shard {name!r}: expected a plain file name inside the checkpoint "
                          f"folder (no directories, no '..', no absolute paths)")


def _weight_files(directory: str):
    """``(shard paths, index map {tensor name: shard path} or None)`` for the checkpoint's weights."""
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, INDEX_FILE)
    if os.path.lexists(single):
        if not os.path.isfile(single):
            raise _err(single, "is not a regular file (a directory, device, FIFO or dangling symlink)")
        return [single], None
    if not os.path.lexists(index):
        raise _err(directory, "no weights: expected model.safetensors or model.safetensors.index.json")
    idx = _json_object(index)
    wm = idx.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise _err(index, f"malformed index: expected {{'weight_map': {{tensor name: shard file}}}} with at least "
                          f"one entry, got weight_map = {wm!r}"[:300])
    names = set()
    for k, v in wm.items():
        if not isinstance(v, str):
            raise _err(index, f"weight_map[{k!r}] must be a shard file name (a string), got {v!r}")
        names.add(v)
    for name in sorted(names):
        _check_shard_name(index, name)
    index_map, files = {}, {}
    for name in sorted(names):
        fn = os.path.join(directory, name)
        if not os.path.lexists(fn):
            raise _err(fn, f"weight shard named in {INDEX_FILE} does not exist")
        if not os.path.isfile(fn):
            raise _err(fn, f"weight shard named in {INDEX_FILE}'s weight_map is not a regular file (a directory, "
                           f"device, FIFO or dangling symlink; symlinks to files are followed)")
        files[name] = fn
    for k, v in wm.items():
        index_map[k] = files[v]
    return list(files.values()), index_map


def _read_headers(stack: contextlib.ExitStack, files: List[str], index_map: Optional[Dict[str, str]]):
    """Open every shard (memory-mapped: nothing is read but the JSON header) and return
    ``(handles {path: safe_open}, headers {tensor name: (path, shape, safetensors dtype)})``."""
    from safetensors import SafetensorError, safe_open

    handles, headers = {}, {}
    for fn in files:
        try:
            h = stack.enter_context(safe_open(fn, framework="pt"))
            names = list(h.keys())
            for k in names:
                sl = h.get_slice(k)
                shape, dt = tuple(sl.get_shape()), sl.get_dtype()
                if k in headers:
                    raise _err(fn, f"tensor {k!r} is also stored in {headers[k][0]}; each tensor must be stored once")
                headers[k] = (fn, shape, dt)
        except (SafetensorError, OSError) as e:
            raise _err(fn, f"cannot read safetensors file: {e}") from None
        handles[fn] = h
    for k, fn in (index_map or {}).items():
        got = headers.get(k)
        if got is None or got[0] != fn:
            where = f" (it is in {got[0]})" if got else ""
            raise _err(fn, f"{INDEX_FILE}'s weight_map puts tensor {k!r} in this file, but the file has no such "
                           f"tensor{where}")
    return handles, headers


def _plan(c: ModelConfig, pre: str) -> Iterator[Tuple[str, Tuple[int, ...], str, int]]:
    """``(checkpoint tensor name, shape, model parameter name, first row)`` for every tensor the model
    reads, in load order; several checkpoint tensors fill row ranges of one fused parameter
    (q/k/v -> qkv_proj, gate/up -> gate_up_proj). A generator, so that validating a config claiming
    10^5 layers stops at the first missing tensor instead of listing 10^6 names."""
    h, d, hq, hkv, inter = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
    yield pre + "embed_tokens.weight", (c.vocab_size, h), "embed_tokens.weight", 0
    for i in range(c.num_hidden_layers):
        p, m = f"{pre}layers.{i}.", f"layers.{i}."
        yield p + "input_layernorm.weight", (h,), m + "input_layernorm", 0
        yield p + "post_attention_layernorm.weight", (h,), m + "post_attention_layernorm", 0
        yield p + "self_attn.q_proj.weight", (hq * d, h), m + "qkv_proj.weight", 0
        yield p + "self_attn.k_proj.weight", (hkv * d, h), m + "qkv_proj.weight", hq * d
        yield p + "self_attn.v_proj.weight", (hkv * d, h), m + "qkv_proj.weight", (hq + hkv) * d
        if c.qkv_bias:
            yield p + "self_attn.q_proj.bias", (hq * d,), m + "qkv_proj.bias", 0
            yield p + "self_attn.k_proj.bias", (hkv * d,), m + "qkv_proj.bias", hq * d
            yield p + "self_attn.v_proj.bias", (hkv * d,), m + "qkv_proj.bias", (hq + hkv) * d
        yield p + "self_attn.o_proj.weight", (h, hq * d), m + "o_proj.weight", 0
        if c.o_bias:
            yield p + "self_attn.o_proj.bias", (h,), m + "o_proj.bias", 0
        yield p + "mlp.gate_proj.weight", (inter, h), m + "gate_up_proj.weight", 0
        yield p + "mlp.up_proj.weight", (inter, h), m + "gate_up_proj.weight", inter
        yield p + "mlp.down_proj.weight", (h, inter), m + "down_proj.weight", 0
        if c.mlp_bias:
            yield p + "mlp.gate_proj.bias", (inter,), m + "gate_up_proj.bias", 0
            yield p + "mlp.up_proj.bias", (inter,), m + "gate_up_proj.bias", inter
            yield p + "mlp.down_proj.bias", (h,), m + "down_proj.bias", 0
    yield pre + "norm.weight", (h,), "norm", 0
    if c.is_classifier:
        yield "score.weight", (c.num_labels, h), "score.weight", 0
    elif not c.tie_word_embeddings:
        yield "lm_head.weight", (c.vocab_size, h), "lm_head.weight", 0


def _check_tensors(c: ModelConfig, pre: str, headers: dict, directory: str):
    """Every tensor the config implies is present with the implied shape and a float dtype, and no
    layer beyond num_hidden_layers is stored, all from the headers alone. Returns ``(number of
    parameters, bytes of the largest tensor as stored)``."""
    # At most 12 digits: int() of a longer string is slow or refused, and no real model has 10^12 layers.
    layer_re = re.compile(re.escape(pre) + r"layers\.(\d{1,12})\.")
    stored_layers: Dict[int, str] = {}
    for k in headers:
        mt = layer_re.match(k)
        if mt:
            stored_layers.setdefault(int(mt.group(1)), k)
    n, biggest = 0, 0
    for key, shape, _, _ in _plan(c, pre):
        got = headers.get(key)
        if got is None:
            hint = ""
            mt = layer_re.match(key)
            if mt and int(mt.group(1)) not in stored_layers:
                have = (f"layers 0..{max(stored_layers)}" if sorted(stored_layers) == list(range(len(stored_layers)))
                        else f"layers {sorted(stored_layers)[:8]}") if stored_layers else "no layers"
                hint = f" (config.json says num_hidden_layers={c.num_hidden_layers}; the checkpoint has tensors for {have})"
            raise _err(directory, f"missing tensor {key!r} in the checkpoint weights{hint}")
        fn, sh, dt = got
        if sh != shape:
            raise _err(fn, f"tensor {key!r} has shape {sh}, expected {shape} from config.json")
        if dt not in _FLOAT_DTYPES:
            raise _err(fn, f"tensor {key!r} has dtype {dt}; expected a floating-point dtype "
                           f"({', '.join(_FLOAT_DTYPES)})")
        numel = math.prod(shape)
        n += numel
        biggest = max(biggest, numel * _FLOAT_DTYPES[dt])
    extra = sorted(i for i in stored_layers if i >= c.num_hidden_layers)
    if extra:
        raise _err(directory, f"the checkpoint has tensors for layer {extra[0]} ({stored_layers[extra[0]]!r}) but "
                              f"config.json says num_hidden_layers={c.num_hidden_layers}")
    return n, biggest


def _gib(b: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= size:
            return f"{b / size:.3g} {unit}"
    return f"{int(b)} B"


def _memory_limit(device: torch.device) -> Optional[Tuple[int, str]]:
    """``(bytes, what)``: the most memory the model could ever get on ``device``, or None when unknown.

    Physical memory (or a smaller cgroup limit: in a container that is what the OOM killer enforces),
    not "available" memory, which page cache and other processes move up and down: an estimate above
    it cannot succeed, while one just under free memory may still, so only the first is an error."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(idx).total_memory, f"memory of cuda:{idx}"
    if device.type != "cpu":
        return None
    limits = []
    try:
        limits.append((os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory of this machine"))
    except (AttributeError, ValueError, OSError):
        try:
            import psutil

            limits.append((int(psutil.virtual_memory().total), "physical memory of this machine"))
        except Exception:  # psutil absent or unable to tell: no limit from it
            pass
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(f) as fh:
                v = fh.read().strip()
            if v.isdigit():
                limits.append((int(v), f"memory limit of this process's cgroup ({f})"))
        except OSError:
            pass
    return min(limits) if limits else None


def _check_memory(c: ModelConfig, n_params: int, biggest: int, dtype: torch.dtype, device: torch.device,
                  quant: Optional[dict], files: List[str], path: str) -> None:
    """Refuse, before allocating, a load that cannot fit in the device's memory."""
    item = torch.empty((), dtype=dtype).element_size()
    parts = [(f"weights {_gib(n_params * item)} ({n_params:,} parameters as {str(dtype).replace('torch.', '')})",
              n_params * item),
             (f"largest tensor read {_gib(biggest)}", biggest)]
    # RoPE cos/sin tables [max_position_embeddings, head_dim] in the model dtype, built on the first
    # forward from float32 angle / cos / sin temporaries of the same shape.
    rope = c.max_position_embeddings * c.head_dim * (2 * item + 16)
    parts.append((f"rope tables {_gib(rope)}", rope))
    if quant is not None:
        bits, g = quant["bits"], quant["group_size"]
        h, d, hq, hkv, inter = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
        lin = [((hq + 2 * hkv) * d, h), (h, hq * d), (2 * inter, h), (h, inter)] * c.num_hidden_layers
        if quant["include_head"] and not (c.tie_word_embeddings and not c.is_classifier):
            lin.append((c.out_dim, h))
        packed, transient = 0, 0
        for out_f, in_f in lin:
            gw = in_f if g == -1 else g
            if in_f % gw:
                continue  # left dense by quantize_model
            numel = out_f * in_f
            # codes at `bits` per weight, a float32 scale and a uint8 zero per group; quantize() works
            # on one layer at a time through float64 / int64 copies (~40 bytes per weight).
            packed += numel * bits // 8 + (numel // gw) * 5
            transient = max(transient, 40 * numel)
        parts.append((f"quantisation {_gib(packed + transient)}", packed + transient))
    need = sum(b for _, b in parts)
    limit = _memory_limit(device)
    if limit is not None and need > limit[0]:
        files_bytes = sum(os.path.getsize(f) for f in files)
        raise _err(path, f"loading needs about {_gib(need)} ({'; '.join(p for p, _ in parts)}), more than the "
                         f"{_gib(limit[0])} {limit[1]} (the checkpoint's weight files hold {_gib(files_bytes)})")


def _check_finite(part: torch.Tensor, src: torch.Tensor, key: str, fn: str, dtype: torch.dtype) -> None:
    """Refuse non-finite values in a tensor just copied into the model (``part``, model dtype).

    One ``aminmax`` pass: NaN propagates into both results and an inf shows up as one of them, so
    this is exact, reads the tensor once while it is still in cache-friendly reach of the copy, and
    allocates nothing the size of the tensor (``isfinite(t).all()`` would, a bool per element).
    Checking the converted copy also catches finite float32 weights that overflow float16."""
    lo, hi = torch.aminmax(part)
    if bool(torch.isfinite(lo) & torch.isfinite(hi)):
        return
    s_lo, s_hi = torch.aminmax(src)
    if bool(torch.isfinite(s_lo) & torch.isfinite(s_hi)):
        big = max(abs(float(s_lo)), abs(float(s_hi)))
        raise _err(fn, f"tensor {key!r} has values up to {big:.4g} in magnitude, which overflow "
                       f"{str(dtype).replace('torch.', '')} (max {torch.finfo(dtype).max:.4g}); load it with "
                       f"dtype=torch.float32 or torch.bfloat16")
    what = "NaN" if math.isnan(float(s_lo)) or math.isnan(float(s_hi)) else "inf"
    raise _err(fn, f"tensor {key!r} contains {what} values; a checkpoint with non-finite weights gives "
                   f"meaningless outputs")


def _check_quantize(quantize) -> Optional[dict]:
    """The quantize argument checked (keys, bits, group size) before anything is loaded."""
    if not quantize:
        return None
    if not isinstance(quantize, dict):
        raise ValueError(f"ttscale.engine: quantize must be a dict such as dict(bits=4, group_size=128), "
                         f"got {quantize!r}")
    from ..ops.quant_matmul import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, _format_int

    allowed = {"bits", "group_size", "symmetric", "include_head"}
    extra = set(quantize) - allowed
    if extra:
        raise ValueError(f"ttscale.engine: quantize has unknown keys {sorted(extra)}; allowed: {sorted(allowed)}")
    q = {"bits": 4, "group_size": 128, "symmetric": False, "include_head": False, **quantize}
    try:
        q["bits"] = _format_int(q["bits"], "bits", SUPPORTED_BITS)
        q["group_size"] = _format_int(q["group_size"], "group_size", SUPPORTED_GROUP_SIZES)
    except ValueError as e:
        raise ValueError(f"ttscale.engine: quantize {str(e).removeprefix('ttscale: ')}") from None
    for k in ("symmetric", "include_head"):
        if not isinstance(q[k], bool):
            raise ValueError(f"ttscale.engine: quantize {k} must be True or False, got {q[k]!r}")
    return q


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

    Order (module docstring, "Validation"): config, index and safetensors headers are checked and the
    memory estimated before the model is allocated; tensors are then read one at a time, straight into
    the model's parameters in ``dtype`` on ``device``, each checked for NaN / inf as it lands.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"ttscale.engine: checkpoint directory {path!r} does not exist")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"ttscale.engine: dtype must be float32, float16 or bfloat16, got {dtype}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"ttscale.engine: device must be a torch device or a name such as 'cpu' / 'cuda:0', "
                         f"got {device!r}") from None
    quant = _check_quantize(quantize)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.lexists(cfg_path):
        raise _err(cfg_path, "missing config.json")
    config = parse_config(_json_object(cfg_path), cfg_path)
    files, index_map = _weight_files(path)
    with contextlib.ExitStack() as stack:
        handles, headers = _read_headers(stack, files, index_map)
        pre = "model." if any(k.startswith("model.") for k in headers) else ""  # bare LlamaModel checkpoints: no prefix
        n_params, biggest = _check_tensors(config, pre, headers, path)
        _check_memory(config, n_params, biggest, dtype, dev, quant, files, path)
        # Built on the meta device, then given uninitialised storage in the target dtype and device:
        # no float32 copy to convert afterwards and no random init of weights about to be overwritten.
        with torch.device("meta"):
            model = Transformer(config)
        model = model.to(dtype=dtype).to_empty(device=dev)
        params = dict(model.named_parameters())
        filled = 0
        with torch.no_grad():
            for key, shape, dest, row0 in _plan(config, pre):
                fn = headers[key][0]
                try:
                    t = handles[fn].get_tensor(key)
                except Exception as e:  # safetensors' error type, or an OSError from the mapped file
                    raise _err(fn, f"cannot read tensor {key!r}: {e}") from None
                if tuple(t.shape) != shape:  # the file changed since its header was read
                    raise _err(fn, f"tensor {key!r} has shape {tuple(t.shape)}, expected {shape} from config.json")
                part = params[dest].narrow(0, row0, shape[0])
                part.copy_(t)
                _check_finite(part, t, key, fn, dtype)
                filled += part.numel()
                del t
        if filled != sum(p.numel() for p in params.values()):
            # to_empty left garbage in whatever _plan did not cover: a bug here, never a user error.
            raise RuntimeError(f"ttscale.engine: internal error: the checkpoint plan filled {filled} of "
                               f"{sum(p.numel() for p in params.values())} parameters")
    # inv_freq was a meta tensor: recompute it. Rounded through `dtype` as before (the whole model used to
    # be cast to `dtype`, buffers included), so loads in float16 / bfloat16 keep their numerics.
    model.inv_freq = rope_inv_freq(config)[0].to(dtype).float().to(dev)
    if quant is not None:
        from ..nn import quantize_model

        include_head = quant["include_head"]
        quantize_model(model, bits=quant["bits"], group_size=quant["group_size"], symmetric=quant["symmetric"],
                       filter=None if include_head else (lambda name, m: name.startswith("layers.")))
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
