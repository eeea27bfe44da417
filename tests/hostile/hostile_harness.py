"""Harness of the hostile-input suite: case registry, expectation helpers, the worker process that
runs cases, and the parent-side runner that survives crashes and hangs.

A *case* is a function registered with :func:`case` in one of the ``cases_*.py`` modules. It builds
one hostile input, calls an op and checks the outcome: with :func:`raises` (the op must raise the
given exception type, with a message containing every given fragment) or, where the contract says
the call is valid, by comparing the result with the float64 reference of ``ttscale.reference``. A
case passes when it returns and fails with the AssertionError's text (or whatever else it lets out).

Why a worker process: a hostile input that makes a kernel segfault, abort or spin would otherwise
kill or stall the whole pytest run, and the report would not say which input did it. Cases never run
in the pytest process. :class:`Runner` starts one worker (``python -X faulthandler
hostile_harness.py``, the case ids as JSON on stdin) that runs them one after the other and reports a
``start`` and a ``result`` line per case on stdout (prefix ``@@HOSTILE@@``, JSON). One worker for
many cases keeps the cost of importing torch to once per run, not once per case. The parent reads
those lines with a per-case deadline. When the worker dies (signal, abort, exit) or a case does not
report within its timeout (the worker is killed), the case that had started is the culprit: it is
run once more alone in a fresh worker, so the report says whether it fails on its own or only after
the cases before it, and it is recorded as a failure either way (with the signal, the faulthandler
traceback and the tail of stderr); the cases after it continue in a new worker.

Each case runs under an address-space limit (``RLIMIT_AS``: what the worker had mapped plus
``mem_limit_gb``, default 1 GiB). The "huge" cases hand ops sizes and indices past 2^31 through
stride-0 views that own almost no memory; an op that answers by allocating what those sizes would
need then fails inside the worker (and :func:`raises` reports the allocator's error as the finding)
instead of taking the machine down.

CPU SIMD paths: the kernels of every op are compiled per ISA and chosen at run time
(``csrc/common/cpu_dispatch.h``). A case registered with ``isa=True`` is registered once per path
this machine supports (id suffix ``@<isa>``) and runs with that path forced, so the non-finite and
layout cases reach the AVX-512, AVX2 and portable kernels alike (their tail loops and masks differ).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import queue
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Type

HERE = os.path.dirname(os.path.abspath(__file__))
PREFIX = "@@HOSTILE@@ "
CASE_MODULES = ("cases_attention", "cases_paged", "cases_merge", "cases_sparse", "cases_shared_prefix",
                "cases_sampling", "cases_quant")
DEFAULT_TIMEOUT_S = 20.0    # per case: the machine may be loaded, but a healthy case takes milliseconds
STARTUP_TIMEOUT_S = 90.0    # worker start-up: importing torch and ttscale on a busy machine
DEFAULT_MEM_LIMIT_GB = 1.0  # address space a case may add to what the worker had already mapped
# The exception a refusal must raise unless the case names another: the ops' convention
# (csrc/common/checks.h) is RuntimeError for a bad shape, dtype, device or layout (TT_CHECK, as torch's
# own checks) and ValueError for a bad value (TT_CHECK_VALUE). Set per case by the worker.
DEFAULT_ERROR = {"dtype": RuntimeError, "shape": RuntimeError, "stride": RuntimeError, "device": RuntimeError,
                 "aliasing": RuntimeError, "values": ValueError, "page_table": ValueError, "nonfinite": ValueError,
                 "huge": ValueError}
_current_category: Optional[str] = None
# What a known bug's case (xfail) expects instead: whichever of the two its fix raises turns the
# case into an XPASS, so the fix is noticed and the case can state the exact type then.
EITHER: Tuple[Type[BaseException], ...] = (RuntimeError, ValueError)
# An allocator failure is an attempt to allocate, not a refusal of the input (module docstring).
ALLOCATOR_FAILURES = ("can't allocate memory", "DefaultCPUAllocator", "out of memory")


@functools.lru_cache(maxsize=None)
def supported_isas() -> Tuple[str, ...]:
    import ttscale
    return tuple(ttscale.build_info()["cpu_isas_supported"])


# ---------------------------------------------------------------- registry
@dataclasses.dataclass
class Case:
    id: str
    op: str
    category: str
    fn: Callable[[], None]
    xfail: Optional[str] = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    mem_limit_gb: float = DEFAULT_MEM_LIMIT_GB
    isa: Optional[str] = None  # the CPU path forced while the case runs; None: the default one


CASES: Dict[str, Case] = {}


def case(op: str, name: str, *, xfail: Optional[str] = None, isa: bool = False,
         timeout_s: float = DEFAULT_TIMEOUT_S, mem_limit_gb: float = DEFAULT_MEM_LIMIT_GB):
    """Register ``fn`` as case ``<op>/<category>/<what>`` (``name`` is ``<category>/<what>``).

    ``op`` is a name exported by ``ttscale.ops`` (or ``SharedPrefixDecode``). ``xfail`` is the
    precise description of a known bug: the test is marked ``xfail(strict=True)``, so it turns into
    an error once the bug is fixed and the mark must go. ``isa=True``: once per supported CPU path."""

    def deco(fn):
        variants = [(f"{op}/{name}@{i}", i) for i in supported_isas()] if isa else [(f"{op}/{name}", None)]
        for cid, which in variants:
            if cid in CASES:
                raise RuntimeError(f"duplicate hostile case id {cid}")
            CASES[cid] = Case(cid, op, name.split("/")[0], fn, xfail, timeout_s, mem_limit_gb, which)
        return fn

    return deco


def load_all() -> Dict[str, Case]:
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    only = os.environ.get("TTSCALE_HOSTILE_MODULES")  # e.g. "cases_quant" while working on one module
    for m in (only.split(",") if only else CASE_MODULES):
        importlib.import_module(m.strip())
    return CASES


# ---------------------------------------------------------------- expectations (used inside cases)
def raises(fn: Callable[[], object], *needles: str, types: Optional[Tuple[Type[BaseException], ...]] = None):
    """``fn()`` must raise one of ``types`` (default: the one exception ``DEFAULT_ERROR`` gives the
    running case's category) whose message contains every fragment in ``needles`` (the argument's
    name and what is wrong with it). Returns the exception."""
    if types is None:
        types = (DEFAULT_ERROR.get(_current_category, RuntimeError),)
    want = "/".join(t.__name__ for t in types)
    try:
        r = fn()
    except types as e:
        msg = str(e)
        if any(a in msg for a in ALLOCATOR_FAILURES):
            raise AssertionError(f"the op tried to allocate memory for the hostile sizes instead of refusing "
                                 f"them: {_short(msg)}") from None
        missing = [n for n in needles if n not in msg]
        if missing:
            raise AssertionError(f"raised {type(e).__name__} but its message lacks {missing}: {_short(msg)}") from None
        return e
    except BaseException as e:  # noqa: BLE001  (a bare IndexError, a MemoryError, ... is the finding)
        raise AssertionError(f"expected {want} naming {list(needles)}, got {type(e).__name__}: {_short(str(e))}") \
            from None
    raise AssertionError(f"expected {want} naming {list(needles)}, but the call returned {_describe(r)}")


def _short(s: str, n: int = 400) -> str:
    s = s.strip().split("\nException raised from")[0]  # drop c10's C++ backtrace
    return s if len(s) <= n else s[:n] + "..."


def _describe(r) -> str:
    try:
        import torch
        if isinstance(r, torch.Tensor):
            return f"a tensor {tuple(r.shape)} {r.dtype}"
        if isinstance(r, tuple):
            return "(" + ", ".join(_describe(x) for x in r) + ")"
    except Exception:  # noqa: BLE001
        pass
    return repr(r)[:100]


# ---------------------------------------------------------------- worker side
def _emit(obj) -> None:
    sys.stdout.write(PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _vm_size_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _run_one(c: Case) -> dict:
    global _current_category
    _current_category = c.category
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _vm_size_bytes() + int(c.mem_limit_gb * 2**30)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    prev_isa = None
    if c.isa:
        from ttscale import _info
        prev_isa = _info.set_cpu_isa(c.isa)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    t0 = time.perf_counter()
    try:
        c.fn()
        ok, detail = True, ""
    except AssertionError as e:
        ok, detail = False, str(e) or "assertion failed"
    except BaseException as e:  # noqa: BLE001
        tb = traceback.format_exc().strip().splitlines()
        ok, detail = False, f"the case itself raised {type(e).__name__}: {_short(str(e))} ({' | '.join(tb[-3:])})"
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        if prev_isa is not None:
            from ttscale import _info
            _info.set_cpu_isa(prev_isa)
    return {"event": "result", "id": c.id, "ok": ok, "detail": detail, "seconds": time.perf_counter() - t0}


def worker_main() -> None:
    ids = json.loads(sys.stdin.read())
    cases = load_all()
    # torch as far as the case modules imported it (all of the suite's do; the harness self-test's
    # cases do not, so that its workers start in milliseconds)
    torch = sys.modules.get("torch")
    if torch is not None:
        # One intra-op thread: the cases are tiny (their kernels hardly split work anyway), and on a
        # loaded machine handing each of ~900 small calls to an OpenMP team cost ~10x the whole run.
        torch.set_num_threads(1)
    _emit({"event": "ready"})
    for cid in ids:
        _emit({"event": "start", "id": cid})
        if torch is not None:
            torch.manual_seed(0)
        _emit(_run_one(cases[cid]))
    _emit({"event": "done"})


# ---------------------------------------------------------------- parent side
@dataclasses.dataclass
class Result:
    ok: bool
    detail: str


class _Worker:
    """One worker process fed ``ids``; ``next_event(timeout)`` returns its next protocol event, or None
    when it ended (EOF) or the timeout passed (then ``timed_out`` is set and it has been killed)."""

    def __init__(self, ids: List[str]):
        self.err = tempfile.TemporaryFile(mode="w+b")
        env = dict(os.environ)
        env.setdefault("PYTHONFAULTHANDLER", "1")
        # its own session, so that a kill takes any process it started along with it
        self.proc = subprocess.Popen([sys.executable, "-X", "faulthandler", os.path.abspath(__file__)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, env=env,
                                     cwd=HERE, start_new_session=True, text=True)
        self.proc.stdin.write(json.dumps(ids))
        self.proc.stdin.close()
        self.q: "queue.Queue[Optional[dict]]" = queue.Queue()
        self.noise: List[str] = []
        self.timed_out = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                self.q.put(json.loads(line[len(PREFIX):]))
            else:
                self.noise.append(line.rstrip("\n"))
        self.q.put(None)

    def next_event(self, timeout: float) -> Optional[dict]:
        try:
            return self.q.get(timeout=timeout)
        except queue.Empty:
            self.timed_out = True
            self.kill()
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def death(self) -> str:
        self.kill()
        rc = self.proc.returncode
        how = f"was killed by {signal.Signals(-rc).name}" if rc is not None and rc < 0 else f"exited with status {rc}"
        self.err.seek(0)
        tail = self.err.read().decode(errors="replace").strip().splitlines()[-25:]
        out = self.noise[-5:]
        return how + ("; stderr tail:\n  " + "\n  ".join(tail) if tail else "") + \
            ("\n stdout tail:\n  " + "\n  ".join(out) if out else "")


class Runner:
    """Runs the selected cases in as few workers as crashes allow (module docstring). Results are
    computed on the first request and then served from memory, one per test."""

    def __init__(self, cases: Dict[str, Case], selected: Iterable[str]):
        self.cases = cases
        self.pending = [c for c in dict.fromkeys(selected) if c in cases]
        self.results: Dict[str, Result] = {}

    def result(self, cid: str) -> Result:
        if cid not in self.results:
            if cid not in self.pending:
                self.pending.append(cid)
            todo = [c for c in self.pending if c not in self.results]
            while todo:
                todo = self._batch(todo)
            self.pending = []
        return self.results[cid]

    def _batch(self, ids: List[str]) -> List[str]:
        """Run ``ids`` in one worker; returns the ids still to run after it died (culprit excluded)."""
        w = _Worker(ids)
        ev = w.next_event(STARTUP_TIMEOUT_S)
        if ev is None or ev.get("event") != "ready":
            msg = "the hostile worker did not start: " + ("timed out" if w.timed_out else w.death())
            for c in ids:
                self.results[c] = Result(False, msg)
            return []
        current = None
        while True:
            ev = w.next_event(self.cases[current].timeout_s if current else DEFAULT_TIMEOUT_S)
            if ev is None:
                break
            if ev["event"] == "start":
                current = ev["id"]
            elif ev["event"] == "result":
                self.results[ev["id"]] = Result(ev["ok"], ev["detail"])
                current = None
            elif ev["event"] == "done":
                w.kill()
                return []
        rest = [c for c in ids if c not in self.results and c != current]
        if current is None:
            # died between two cases: nobody to blame. Blame the next case when this worker got
            # nothing done at all, so that a worker that always dies there cannot loop forever.
            if rest and rest == ids:
                self.results[rest[0]] = Result(False, f"the worker {w.death()} before this case started")
                return rest[1:]
            return rest
        what = f"hung (no result after {self.cases[current].timeout_s:.0f} s; killed)" if w.timed_out else w.death()
        if len(ids) == 1:
            self.results[current] = Result(False, f"the worker process {what}")
            return rest
        solo = _Worker([current])
        solo_res = None
        ev = solo.next_event(STARTUP_TIMEOUT_S)
        if ev is not None and ev.get("event") == "ready":
            while True:
                ev = solo.next_event(self.cases[current].timeout_s)
                if ev is None or ev["event"] == "result":
                    solo_res = ev
                    break
        if solo_res is None:
            alone = "hung again" if solo.timed_out else solo.death()
            self.results[current] = Result(False, f"the worker process {what} (run alone: {alone})")
        else:
            solo.kill()
            alone = "passed" if solo_res["ok"] else "failed: " + solo_res["detail"]
            self.results[current] = Result(False, f"the worker process {what} while running this case after "
                                                  f"others; run alone it {alone}")
        return rest


if __name__ == "__main__":
    # through the importable module, so that the cases register in the same CASES the worker reads
    import hostile_harness

    hostile_harness.worker_main()
