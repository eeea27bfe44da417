"""ttscale ops: typed wrappers over ``torch.ops.ttscale.*`` with their fake (meta) kernels."""
from .sampling import sample, sample_from_probs, speculative_verify, token_logprobs

__all__ = ["sample", "sample_from_probs", "token_logprobs", "speculative_verify"]
from .attention import attention; __all__ += ["attention"]  # noqa: E402,E702
