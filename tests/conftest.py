"""Shared test configuration: devices, per-dtype tolerances, CPU SIMD paths, seeding.

* ``DEVICES``: "cpu", plus "cuda" when this build has CUDA kernels and a GPU is present.
* ``TOL[dtype]``: ``dict(atol=..., rtol=...)`` for float32 outputs computed from inputs of that dtype
  against a float64 reference that is given the *same stored values* (upcast exactly), so the
  tolerance covers the kernel's float32 arithmetic, not the input rounding.
* ``cpu_isa`` fixture: runs a test once per CPU SIMD path this machine supports
  (``ttscale.build_info()["cpu_isas_supported"]``) and restores the previous path afterwards.
* Every test starts from ``torch.manual_seed(0)``; tests that draw tokens pass explicit seeds.
* Tests marked ``slow`` (full statistical grids) run only with ``--runslow`` or ``-m slow``.
"""
import pytest
import torch

import ttscale
from ttscale import _info

_BUILD = ttscale.build_info()

DEVICES = ["cpu"] + (["cuda"] if _BUILD["cuda_available"] else [])
CUDA = "cuda" in DEVICES
CPU_ISAS = list(_BUILD["cpu_isas_supported"])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# One table for every op's float32 outputs (see module docstring).
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-5),
    torch.float16: dict(atol=1e-4, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-4, rtol=1e-5),
    torch.float64: dict(atol=1e-9, rtol=1e-9),
}


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (the full statistical grids; ~10 min on 2 cores)")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` are skipped unless ``--runslow`` is given or ``-m`` names them."""
    if config.getoption("--runslow") or "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (or -m slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running statistical tests (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU and a CUDA build of ttscale")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=CPU_ISAS)
def cpu_isa(request):
    """Force one CPU SIMD path for the duration of the test."""
    prev = _info.set_cpu_isa(request.param)
    try:
        assert ttscale.build_info()["cpu_isa"] == request.param
        yield request.param
    finally:
        _info.set_cpu_isa(prev)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
