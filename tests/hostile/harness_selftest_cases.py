"""Cases that misbehave on purpose, for test_harness.py: they check that the harness turns a
segfault, an abort, a hang and a runaway allocation into failures of that one case and carries on
with the rest. Not part of the suite (not in hostile_harness.CASE_MODULES)."""
import ctypes
import os
import time

from hostile_harness import case

OP = "selftest"


@case(OP, "ok/before")
def _():
    pass


@case(OP, "crash/segfault")
def _():
    ctypes.string_at(0)  # reads address 0


@case(OP, "ok/after_segfault")
def _():
    pass


@case(OP, "crash/hang", timeout_s=0.5)
def _():
    time.sleep(600)


@case(OP, "crash/abort")
def _():
    os.abort()


@case(OP, "fail/allocation")
def _():
    bytearray(2**33)  # 8 GiB: past the address-space limit, so a MemoryError at once, not 8 GiB of pages


@case(OP, "fail/assertion")
def _():
    assert 1 + 1 == 3, "arithmetic is broken"


@case(OP, "ok/last")
def _():
    pass
