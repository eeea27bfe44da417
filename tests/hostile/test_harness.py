"""The harness itself: a case that kills, aborts or hangs its worker is a failure of that case, with
the signal in its report, and the cases after it still run (hostile_harness.py, module docstring)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # see test_hostile.py
import hostile_harness as H  # noqa: E402


def test_crashes_hangs_and_allocations_fail_one_case_each(monkeypatch):
    # register the self-test cases for the parent, without leaving them in the suite's registry
    saved = dict(H.CASES)
    import harness_selftest_cases  # noqa: F401
    mine = {cid: c for cid, c in H.CASES.items() if cid not in saved}
    H.CASES.clear()
    H.CASES.update(saved)
    monkeypatch.setenv("TTSCALE_HOSTILE_MODULES", "harness_selftest_cases")  # what the workers import

    runner = H.Runner(mine, list(mine))
    res = {cid: runner.result(cid) for cid in mine}
    assert all(res[c].ok for c in mine if c.startswith("selftest/ok/")), {c: res[c] for c in mine if "/ok/" in c}
    assert not any(r.ok for c, r in res.items() if not c.startswith("selftest/ok/"))
    assert "SIGSEGV" in res["selftest/crash/segfault"].detail and "run alone" in res["selftest/crash/segfault"].detail
    assert "SIGABRT" in res["selftest/crash/abort"].detail
    assert "hung" in res["selftest/crash/hang"].detail
    assert "MemoryError" in res["selftest/fail/allocation"].detail
    assert "arithmetic is broken" in res["selftest/fail/assertion"].detail


def test_raises_reports_allocation_attempts_and_wrong_messages():
    def alloc():
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried "
                           "to allocate 8589934592 bytes")

    def bad(msg, exc=ValueError):
        def f():
            raise exc(msg)
        return f

    v = (ValueError,)
    for fn, needles, types, why in ((alloc, (), (RuntimeError,), "tried to allocate"),
                                    (bad("ttscale: x is wrong"), ("y",), v, "lacks ['y']"),
                                    (bad("ttscale: x is wrong"), ("x",), (RuntimeError,), "got ValueError"),
                                    (bad("no", IndexError), (), v, "got IndexError"),
                                    (lambda: 3, (), v, "returned 3")):
        try:
            H.raises(fn, *needles, types=types)
        except AssertionError as e:
            assert why in str(e), str(e)
        else:
            raise AssertionError(f"raises() accepted {why}")
    assert isinstance(H.raises(bad("ttscale: x must be int32, got float"), "x must", "int32", types=v), ValueError)
