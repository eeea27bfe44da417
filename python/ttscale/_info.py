import torch

from . import _C


def build_info() -> dict:
    """What this build of ttscale contains.

    Keys: ``version``, ``torch`` (the torch it runs with), ``cuda`` (CUDA kernels compiled),
    ``cuda_archs`` (e.g. ``"8.0,9.0a"``), ``cuda_available`` (a GPU usable right now),
    ``cpu_isa`` (the SIMD path in use: ``avx512bf16``, ``avx512``, ``avx2`` or ``generic``), ``cpu_isas_built``,
    ``cpu_isas_supported`` and ``num_threads`` (torch's intra-op threads, which ttscale's CPU
    kernels use).
    """
    info = dict(_C.build_info())
    info["torch"] = torch.__version__
    info["cuda_available"] = bool(info["cuda"] and torch.cuda.is_available())
    info["num_threads"] = torch.get_num_threads()
    return info


def set_cpu_isa(name: str) -> str:
    """Force the CPU SIMD path (``"generic"``, ``"avx2"``, ``"avx512"``, ``"avx512bf16"`` or ``"auto"``).

    Returns the previous one. Raises ValueError if the CPU or the build does not support it.
    The environment variable ``TTSCALE_CPU_ISA`` does the same at start-up.
    """
    return _C._set_cpu_isa(name)
