"""Engine test helpers: random ttscale Transformers (no transformers needed) with a char tokenizer."""
import torch

from ttscale.engine import CharTokenizer, ModelConfig, Transformer

ALPHABET = "0123456789+-*=() \nabcdefghij"


def randomize_(model: Transformer, seed: int = 0, std: float = 0.08) -> Transformer:
    """Weights large enough that logits are far from uniform (HF's 0.02 init gives near-flat ones);
    norm weights around 1 so RMSNorm scaling is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or name == "norm":
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def make_model(*, layers=2, hidden=128, heads=2, kv_heads=1, head_dim=64, inter=160, vocab=None, tie=False,
               qkv_bias=False, max_pos=512, seed=0, rope_scaling=None, dtype=torch.float32) -> Transformer:
    tok = CharTokenizer.from_alphabet(ALPHABET)
    cfg = ModelConfig(vocab_size=vocab or tok.vocab_size, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=head_dim, max_position_embeddings=max_pos, tie_word_embeddings=tie,
                      qkv_bias=qkv_bias, rope_scaling=rope_scaling, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    m = randomize_(Transformer(cfg), seed).to(dtype)
    m.inv_freq = m.inv_freq.float()
    m.tokenizer = tok
    return m.eval()
