"""A Llama / Qwen2-style decoder (inference only) whose attention, KV writes and sampling are ttscale ops.

Architecture (Hugging Face ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` semantics, and the
``*ForSequenceClassification`` variants used as process reward models):

    x = embed(ids)
    per layer:  h = rmsnorm(x); q, k, v = qkv(h) (+bias: Qwen2 / attention_bias); rope(q, k)
                x = x + o_proj(attention(q, k, v)); x = x + down(silu(gate(h2)) * up(h2)), h2 = rmsnorm(x)
    out = rmsnorm(x) @ lm_head^T   (or embed^T when tied; or score^T [num_labels, hidden] for a classifier)

The q/k/v projections are stored fused as one ``qkv_proj`` linear ``[(Hq + 2 Hkv) D, hidden]`` and
gate/up as one ``gate_up_proj`` ``[2 I, hidden]`` (rows of the HF matrices concatenated): fewer,
larger matmuls per layer, which matters for small models where per-op overhead dominates, and
quantization is per output row, so a fused ``QuantLinear`` equals the separate ones.

Tokens are processed ragged: a forward takes ``ids [T]`` and ``positions [T]`` of any number of
sequences and an ``attn(layer, q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) -> [T, Hq, D]`` callback
that owns the KV cache (the engine plans it once per step; :meth:`Transformer.forward_tokens` uses
dense ragged :func:`ttscale.ops.attention`).

RoPE follows HF: ``inv_freq[i] = 1 / theta^(2i/D)``, ``rotate_half`` convention (first half of the
head paired with the second half), cos/sin multiplied by the scaling type's attention factor.
Scaling types: ``default``, ``linear`` (inv_freq / factor), ``dynamic`` (NTK; identical to default
for every position below ``max_position_embeddings``, and the engine refuses positions beyond it),
``llama3`` and ``yarn``. Head dims 64, 128, 256 (what ttscale's attention kernels support).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops

__all__ = ["ModelConfig", "Transformer", "SUPPORTED_HEAD_DIMS", "rope_inv_freq", "check_rope",
           "check_positive_int"]

SUPPORTED_HEAD_DIMS = (64, 128, 256)
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")

AttnFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # HF rope_parameters / rope_scaling minus rope_theta; None = default
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    num_labels: Optional[int] = None  # set: sequence-classification head ``score`` [num_labels, hidden]
    bos_token_id: Optional[int] = None
    eos_token_id: Any = None  # int, list of ints or None
    architecture: str = "LlamaForCausalLM"

    def __post_init__(self) -> None:
        # Sizes first: the checks below divide by them.
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            check_positive_int(name, getattr(self, name))
        if self.num_labels is not None:
            check_positive_int("num_labels", self.num_labels)
        if self.head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"ttscale.engine: head_dim {self.head_dim} is not supported; ttscale attention "
                             f"supports head_dim in {SUPPORTED_HEAD_DIMS}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(f"ttscale.engine: num_attention_heads ({self.num_attention_heads}) must be a multiple "
                             f"of num_key_value_heads ({self.num_key_value_heads})")
        for name in ("tie_word_embeddings", "qkv_bias", "o_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ttscale.engine: config {name} must be true or false, got {getattr(self, name)!r}")
        eps = _finite(self.rms_norm_eps)
        if eps is None or eps <= 0:
            raise ValueError(f"ttscale.engine: config rms_norm_eps must be a finite number > 0, got "
                             f"{self.rms_norm_eps!r}")
        check_rope(self.rope_theta, self.rope_scaling)
        self.rms_norm_eps, self.rope_theta = eps, float(self.rope_theta)
        # Token ids end up as stop conditions and BOS prefixes: a string or float here would only
        # fail (or silently never match) at generation time.
        if self.bos_token_id is not None and not _is_token_id(self.bos_token_id):
            raise ValueError(f"ttscale.engine: config bos_token_id must be a non-negative int or null, got "
                             f"{self.bos_token_id!r}")
        e = self.eos_token_id
        if e is not None and not (_is_token_id(e) or (isinstance(e, (list, tuple)) and all(map(_is_token_id, e)))):
            raise ValueError(f"ttscale.engine: config eos_token_id must be a non-negative int, a list of them or "
                             f"null, got {e!r}")

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def eos_token_ids(self) -> List[int]:
        e = self.eos_token_id
        if e is None:
            return []
        return [int(x) for x in e] if isinstance(e, (list, tuple)) else [int(e)]

    @property
    def is_classifier(self) -> bool:
        return self.num_labels is not None

    @property
    def out_dim(self) -> int:
        return self.num_labels if self.is_classifier else self.vocab_size


def check_positive_int(name: str, v) -> None:
    """A config size must be a positive int: a bool is an int to Python and ``128.0 == 128``, but either
    in a config is a typo or a converter bug, and ``int()`` of a float would hide ``1e5`` vs ``10**5``."""
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"ttscale.engine: config {name} must be a positive int, got {v!r}")


def _is_token_id(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _finite(v) -> Optional[float]:
    """``v`` as a float when it is a finite real number (not a bool, not a string), else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


# The numeric fields each RoPE scaling type reads (rope_inv_freq), whether it needs them, and the lower
# bound they must exceed (">0") or reach (">=0"). Out-of-range values do not fail later: they give a
# finite but meaningless rotation (factor 0 -> inf / NaN frequencies, a negative factor -> reversed
# rotation, beta 0 -> a division by zero in yarn), so they are refused here.
_ROPE_FIELDS = {
    "default": {},
    "linear": {"factor": (True, ">0")},
    "dynamic": {"factor": (True, ">0")},
    "llama3": {"factor": (True, ">0"), "low_freq_factor": (True, ">0"), "high_freq_factor": (True, ">0"),
               "original_max_position_embeddings": (True, "int")},
    # mscale / mscale_all_dim 0 is HF's "not given" (``if mscale and mscale_all_dim``), hence >= 0.
    "yarn": {"factor": (False, ">0"), "original_max_position_embeddings": (False, "int"),
             "attention_factor": (False, ">0"), "beta_fast": (False, ">0"), "beta_slow": (False, ">0"),
             "mscale": (False, ">=0"), "mscale_all_dim": (False, ">=0")},
}


def check_rope(theta, scaling: Optional[dict], key: str = "rope_scaling", theta_key: str = "rope_theta") -> None:
    """ValueError naming the config key when ``rope_theta`` or a field of the scaling dict is out of range.

    ``key`` / ``theta_key`` are the names the config used (``rope_parameters`` in transformers >= 5,
    ``rope_scaling`` / ``rope_theta`` before), so the message points at what the user wrote.
    ``rope_theta`` must exceed 1: at 1 every dimension rotates at the same rate and yarn divides by
    log(theta); below 1 the frequencies grow with the dimension, which no trained model uses."""
    t = _finite(theta)
    if t is None or t <= 1:
        raise ValueError(f"ttscale.engine: config {theta_key} must be a finite number > 1, got {theta!r}")
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ValueError(f"ttscale.engine: config {key} must be an object or null, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if not isinstance(rope_type, str) or rope_type not in ROPE_TYPES:
        raise ValueError(f"ttscale.engine: config {key}['rope_type'] {rope_type!r} is not supported (supported: "
                         f"{', '.join(ROPE_TYPES)})")
    prf = scaling.get("partial_rotary_factor", 1.0)
    if prf is not None and _finite(prf) != 1.0:
        raise ValueError(f"ttscale.engine: config {key}['partial_rotary_factor'] = {prf!r}: only 1 (rotate the "
                         f"whole head) is supported")
    for field, (required, rule) in _ROPE_FIELDS[rope_type].items():
        v = scaling.get(field)
        if v is None:
            if required:
                raise ValueError(f"ttscale.engine: config {key}[{field!r}] is missing; rope_type {rope_type!r} "
                                 f"needs {', '.join(f for f, (r, _) in _ROPE_FIELDS[rope_type].items() if r)}")
            continue
        if rule == "int":
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"ttscale.engine: config {key}[{field!r}] must be a positive int, got {v!r}")
            continue
        f = _finite(v)
        if f is None or (f <= 0 if rule == ">0" else f < 0):
            bound = "> 0" if rule == ">0" else ">= 0"
            raise ValueError(f"ttscale.engine: config {key}[{field!r}] must be a finite number {bound}, got {v!r}")
    if rope_type == "llama3" and float(scaling["high_freq_factor"]) <= float(scaling["low_freq_factor"]):
        # rope_inv_freq blends over (high - low): equal factors divide by zero, reversed ones invert the band.
        raise ValueError(f"ttscale.engine: config {key}['high_freq_factor'] ({scaling['high_freq_factor']!r}) must "
                         f"be greater than low_freq_factor ({scaling['low_freq_factor']!r})")
    if rope_type == "yarn" and not isinstance(scaling.get("truncate", True), bool):
        raise ValueError(f"ttscale.engine: config {key}['truncate'] must be true or false, got "
                         f"{scaling['truncate']!r}")


def rope_inv_freq(cfg: ModelConfig):
    """``(inv_freq [D/2] float32, attention_factor)`` for the config's RoPE scaling (HF semantics)."""
    d = cfg.head_dim
    base = float(cfg.rope_theta)
    exponents = torch.arange(0, d, 2, dtype=torch.int64).to(torch.float32) / d
    inv_freq = 1.0 / (base ** exponents)
    rs = cfg.rope_scaling or {}
    t = cfg.rope_type
    att = 1.0
    if t in ("default", "dynamic"):
        # dynamic NTK only changes the base for sequences longer than max_position_embeddings, which
        # the engine never runs.
        pass
    elif t == "linear":
        inv_freq = inv_freq / float(rs["factor"])
    elif t == "llama3":
        factor = float(rs["factor"])
        lo, hi = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old_ctx = float(rs["original_max_position_embeddings"])
        lo_wavelen, hi_wavelen = old_ctx / lo, old_ctx / hi
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths (low frequencies) are interpolated by `factor`, short ones kept, and the band
        # between blends the two linearly in old_ctx / wavelen.
        scaled = torch.where(wavelen > lo_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= hi_wavelen) & (wavelen <= lo_wavelen)
        inv_freq = torch.where(medium, blended, scaled)
    elif t == "yarn":
        orig = rs.get("original_max_position_embeddings") or cfg.max_position_embeddings
        factor = rs.get("factor")
        factor = float(cfg.max_position_embeddings / orig) if factor is None else float(factor)
        att = rs.get("attention_factor")
        mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")

        def get_mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if att is None:
            att = get_mscale(factor, mscale) / get_mscale(factor, mscale_all) if (mscale and mscale_all) \
                else get_mscale(factor)
        beta_fast = rs.get("beta_fast") or 32
        beta_slow = rs.get("beta_slow") or 1

        def corr_dim(rot):  # the dimension index whose wavelength makes `rot` rotations over `orig` tokens
            return d * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

        lo, hi = corr_dim(beta_fast), corr_dim(beta_slow)
        if rs.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, d - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(d // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        extrap = 1 - ramp  # 1: keep the original frequency (high frequencies), 0: interpolate by factor
        pos_freqs = base ** exponents
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrap) + (1.0 / pos_freqs) * extrap
        att = float(att)
    return inv_freq.to(torch.float32), float(att)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.input_layernorm = nn.Parameter(torch.ones(h))
        self.qkv_proj = nn.Linear(h, (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, h, bias=cfg.o_bias)
        self.post_attention_layernorm = nn.Parameter(torch.ones(h))
        self.gate_up_proj = nn.Linear(h, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, h, bias=cfg.mlp_bias)


class Transformer(nn.Module):
    """Decoder-only transformer (module docstring). Parameters are created uninitialised-ish (zeros /
    ones); :func:`ttscale.engine.load_checkpoint` fills them. Inference only (no autograd)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tokenizer = None
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(c.hidden_size))
        self.lm_head = None
        self.score = None
        if c.is_classifier:
            self.score = nn.Linear(c.hidden_size, c.num_labels, bias=False)
        elif not c.tie_word_embeddings:
            self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        inv_freq, att = rope_inv_freq(c)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_factor = att
        self.requires_grad_(False)

    # ------------------------------------------------------------------ pieces
    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def rope(self, positions: torch.Tensor):
        """cos, sin ``[T, 1, D]`` in the model dtype for int positions ``[T]`` (HF: float32 angles)."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(self.dtype)[:, None, :], sin.to(self.dtype)[:, None, :]

    def _rope_tables(self):
        """``(cos, signed_sin)`` tables ``[max_position_embeddings, D]`` in the model dtype, built once.

        A decode step of a small model runs ~10 tensor ops to compute its 64 rows of cos/sin; a
        table lookup is one ``index_select`` each. ``signed_sin`` has the first half negated so that
        ``rotate_half(x) * sin == roll(x, D/2) * signed_sin`` (rotate_half = ``cat(-x2, x1)``, roll by
        D/2 = ``cat(x2, x1)``): the rotation becomes one roll + two multiply-adds. Rebuilt when the
        model's device or dtype changes (``.to()``)."""
        key = (self.inv_freq.device, self.dtype)
        tab = getattr(self, "_rope_cache", None)
        if tab is None or tab[0] != key:
            pos = torch.arange(self.config.max_position_embeddings, device=self.inv_freq.device)
            cos, sin = self.rope(pos)
            cos, sin = cos[:, 0, :].contiguous(), sin[:, 0, :].contiguous()
            half = self.config.head_dim // 2
            sin[:, :half].neg_()
            tab = (key, cos, sin)
            self._rope_cache = tab
        return tab[1], tab[2]

    def check_ids(self, ids: Sequence[int], name: str = "token ids") -> None:
        v = self.config.vocab_size
        bad = [i for i in ids if not (isinstance(i, int) and 0 <= i < v)]
        if bad:
            raise ValueError(f"ttscale.engine: {name} must be ints in [0, vocab_size={v}); got {bad[:5]!r}"
                             f"{' ...' if len(bad) > 5 else ''}")

    @torch.inference_mode()
    def hidden_states(self, ids: torch.Tensor, positions: torch.Tensor, attn: AttnFn) -> torch.Tensor:
        """Final hidden states (before the last norm) ``[T, hidden]`` for ragged ``ids [T]``.

        ``positions`` must lie in ``[0, max_position_embeddings)`` (RoPE comes from a table of that
        size; the engine and ``forward_tokens`` refuse longer sequences).

        Written for small-batch decode, where a step of a small model is dominated by per-op cost,
        not math: RoPE from cached tables, rotation as roll + multiply-add, plain ``nn.Linear`` called
        through ``F.linear`` (no module-call machinery), and the two residual adds fused into the
        output GEMMs (``addmm(x, a, W^T)``) when those linears have no bias. Other linears (e.g.
        ``QuantLinear``) are called as modules."""
        c = self.config
        hq, hkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        hsz, eps = c.hidden_size, c.rms_norm_eps
        t = ids.shape[0]
        x = F.embedding(ids, self.embed_tokens.weight)
        cos_t, sin_t = self._rope_tables()
        cos = cos_t.index_select(0, positions)[:, None, :]
        sin = sin_t.index_select(0, positions)[:, None, :]
        half = d // 2
        inter = c.intermediate_size
        for li, layer in enumerate(self.layers):
            h = F.rms_norm(x, (hsz,), layer.input_layernorm, eps)
            qkv = _linear(layer.qkv_proj, h).view(t, hq + 2 * hkv, d)
            qk = qkv[:, :hq + hkv]
            qk = torch.addcmul(qk * cos, torch.roll(qk, half, -1), sin)
            q, k = qk[:, :hq], qk[:, hq:]
            v = qkv[:, hq + hkv:]
            o = attn(li, q, k, v)
            x = _linear_residual(layer.o_proj, o.reshape(t, hq * d), x)
            h = F.rms_norm(x, (hsz,), layer.post_attention_layernorm, eps)
            gu = _linear(layer.gate_up_proj, h)
            g, u = gu.split(inter, dim=-1)
            x = _linear_residual(layer.down_proj, F.silu(g).mul_(u), x)
        return x

    @torch.inference_mode()
    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm + output layer: float32 ``[T, out_dim]`` (LM logits or classifier scores)."""
        x = F.rms_norm(x, (self.config.hidden_size,), self.norm, self.config.rms_norm_eps)
        if self.score is not None:
            out = self.score(x)
        elif self.lm_head is not None:
            out = self.lm_head(x)
        else:
            out = F.linear(x, self.embed_tokens.weight)
        return out.float()

    # ------------------------------------------------------------------ stateless forward
    @torch.inference_mode()
    def forward_tokens(self, sequences: Sequence[Sequence[int]]) -> List[torch.Tensor]:
        """Full causal forward of several sequences at once (ragged, no KV cache).

        Returns one float32 tensor per sequence, ``[len_i, out_dim]``: LM logits (``out_dim = vocab``),
        or for a sequence-classification model (PRM) the per-position scores ``[len_i, num_labels]``
        (``final_norm(h) @ score^T``, HF's per-position ``*ForSequenceClassification`` logits).
        """
        if isinstance(sequences, (str, bytes)) or not isinstance(sequences, Sequence):
            raise TypeError("ttscale.engine: forward_tokens expects a list of token-id lists")
        lens = []
        flat: List[int] = []
        for i, s in enumerate(sequences):
            s = [int(x) for x in s] if isinstance(s, torch.Tensor) else list(s)
            if len(s) == 0:
                raise ValueError(f"ttscale.engine: forward_tokens: sequences[{i}] is empty")
            if len(s) > self.config.max_position_embeddings:
                raise ValueError(f"ttscale.engine: forward_tokens: sequences[{i}] has {len(s)} tokens, more than "
                                 f"max_position_embeddings={self.config.max_position_embeddings}")
            self.check_ids(s, f"sequences[{i}]")
            lens.append(len(s))
            flat.extend(s)
        if not lens:
            return []
        dev = self.device
        ids = torch.tensor(flat, dtype=torch.long, device=dev)
        positions = torch.cat([torch.arange(n) for n in lens]).to(dev)
        cu = torch.tensor([0] + list(_cumsum(lens)), dtype=torch.int32, device=dev)

        def attn(li, q, k, v):
            return ops.attention(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)

        out = self.head(self.hidden_states(ids, positions, attn))
        return list(out.split(lens))

    def forward(self, sequences: Sequence[Sequence[int]]) -> List[torch.Tensor]:
        """Same as :meth:`forward_tokens`."""
        return self.forward_tokens(sequences)

    def extra_repr(self) -> str:
        c = self.config
        return (f"arch={c.architecture}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
                f"heads={c.num_attention_heads}/{c.num_key_value_heads}x{c.head_dim}, vocab={c.vocab_size}, "
                f"rope={c.rope_type}")


def _linear(lin, x: torch.Tensor) -> torch.Tensor:
    if type(lin) is nn.Linear:
        return F.linear(x, lin.weight, lin.bias)
    return lin(x)


def _linear_residual(lin, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x + lin(a)``; one ``addmm`` (the residual as the GEMM's C operand) for a bias-free nn.Linear."""
    if type(lin) is nn.Linear and lin.bias is None and x.dim() == 2:
        return torch.addmm(x, a, lin.weight.t())
    return x + lin(a)


def _cumsum(xs):
    s = 0
    for x in xs:
        s += x
        yield s
