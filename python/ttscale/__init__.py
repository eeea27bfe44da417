"""ttscale: kernels for test-time compute (attention over shared prefixes, low-bit matmul,
batched sampling) as torch ops on CPU and CUDA, plus the engine and search strategies built on them.

Ops live in :mod:`ttscale.ops` and are registered with the torch dispatcher as ``torch.ops.ttscale.*``
(so they work under ``torch.compile``). ``ttscale.build_info()`` says what this build contains.
"""
import torch  # noqa: F401  (loads libtorch before the native module that links against it)

try:
    from . import _C
except ImportError as e:  # pragma: no cover - only when the package was not built
    raise ImportError(
        "ttscale: the native module ttscale._C failed to load. Build it with "
        "`pip install --no-build-isolation -e .` after installing torch (see README.md). "
        f"Original error: {e}"
    ) from e

from . import ops  # noqa: E402
from . import attention  # noqa: E402  (SharedPrefixDecode, built on ops)
from . import nn  # noqa: E402  (QuantLinear, quantize_model)
from ._info import build_info  # noqa: E402

__version__ = build_info()["version"]
__all__ = ["ops", "attention", "nn", "build_info", "__version__"]
