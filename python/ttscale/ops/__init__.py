"""ttscale ops: typed wrappers over ``torch.ops.ttscale.*`` with their fake (meta) kernels."""
from .attention import attention
from .paged_attention import (
    append_paged_kv,
    copy_pages,
    merge_attention_states,
    merge_attention_states_,
    paged_attention,
)
from .quant_matmul import QuantizedWeight, dequantize, from_awq, from_gptq, quant_matmul, quantize, repack, unpack
from .sampling import sample, sample_from_probs, speculative_verify, token_logprobs
from .sparse_paged_attention import attention_mass, new_page_summaries, sparse_paged_attention, update_page_summaries

__all__ = [
    "sample",
    "sample_from_probs",
    "token_logprobs",
    "speculative_verify",
    "attention",
    "paged_attention",
    "merge_attention_states",
    "merge_attention_states_",
    "append_paged_kv",
    "copy_pages",
    "new_page_summaries",
    "update_page_summaries",
    "sparse_paged_attention",
    "attention_mass",
    "QuantizedWeight",
    "quantize",
    "dequantize",
    "unpack",
    "quant_matmul",
    "from_gptq",
    "from_awq",
    "repack",
]
