"""Shared benchmark harness.

How a suite is measured:

* ``ceilings(device)`` measures, in the same process, the read bandwidth (a full reduction over a
  buffer far larger than the last-level cache, so every byte comes from DRAM / HBM) and the dense
  matmul rate (fp32 on CPU, bf16 on GPU). Ratios against them say how close a kernel is to the
  machine, not to a datasheet.
* ``Case``: one configuration with several implementations (ours first, then baselines), the bytes
  each call must at least read and the flops it must at least do.
* ``run_case``: each implementation is warmed up, then the implementations are run interleaved
  for ``reps`` rounds so drift in clocks or load hits all of them alike, the order rotating by one
  per round (``ours, b1, b2``, then ``b1, b2, ours``, ...): what a call leaves in the caches and
  TLBs changes the next call's time (measured: ours after a dense bf16 ``F.linear`` that streamed
  32 MB was 40-60 us slower than after its own call), so no implementation always follows the
  same neighbour. On CUDA each call is timed with events after a synchronize; on CPU with
  ``perf_counter``. Reported: median and min in microseconds, GB/s and TFLOP/s at the median, the
  fraction of the measured ceilings, and each baseline's median over ours (speed-up).
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch


@dataclasses.dataclass
class Case:
    name: str
    impls: Dict[str, Callable[[], object]]  # ours first
    bytes_read: float = 0.0
    flops: float = 0.0
    params: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Result:
    case: str
    impl: str
    median_us: float
    min_us: float
    gbps: Optional[float]
    tflops: Optional[float]
    frac_bw: Optional[float]
    frac_mm: Optional[float]
    speedup_vs: Dict[str, float]
    params: dict


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_once(fn: Callable[[], object], device: str) -> float:
    """Seconds for one call."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def llc_bytes(device: str = "cpu") -> int:
    """Size of the last-level cache (CPU: from sysfs, 32 MiB if unknown; CUDA: the L2)."""
    if device.startswith("cuda"):
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20))
    best = 0
    try:
        import glob
        for f in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
            txt = open(f).read().strip()
            mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(txt[-1], 1)
            best = max(best, int(txt.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best or 32 * 2**20


def copies_to_defeat_cache(nbytes: int, device: str = "cpu", factor: int = 3, minimum: int = 1) -> int:
    """How many copies of an `nbytes` working set to rotate over so that each call reads from memory,
    not from a cache the previous calls warmed (working set x copies >= factor x the last-level
    cache), and at least `minimum`."""
    return max(minimum, -(-factor * llc_bytes(device) // max(int(nbytes), 1)))


def ceilings(device: str, quick: bool = False) -> dict:
    """Read bandwidth (GB/s) and matmul rate (TFLOP/s), measured now on `device`."""
    gb = 0.25 if quick else 1.0
    n = int(gb * 2**30 / 4)
    buf = torch.rand(n, device=device)
    reps = 5
    for _ in range(2):
        buf.sum()
    t = sorted(time_once(lambda: buf.sum(), device) for _ in range(reps))[reps // 2]
    bw = buf.numel() * 4 / t / 1e9
    del buf
    m = 1024 if (device == "cpu" and quick) else (2048 if device == "cpu" else 8192)
    dt = torch.float32 if device == "cpu" else torch.bfloat16
    a = torch.randn(m, m, device=device, dtype=dt)
    b = torch.randn(m, m, device=device, dtype=dt)
    for _ in range(2):
        a @ b
    t = sorted(time_once(lambda: a @ b, device) for _ in range(reps))[reps // 2]
    return {"read_gbps": bw, "matmul_tflops": 2 * m**3 / t / 1e12, "matmul_dtype": str(dt).replace("torch.", "")}


def run_case(case: Case, device: str, ceil: dict, warmup: int = 3, reps: int = 20) -> List[Result]:
    for fn in case.impls.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: Dict[str, List[float]] = {k: [] for k in case.impls}
    items = list(case.impls.items())
    for r in range(reps):
        for name, fn in items[r % len(items):] + items[:r % len(items)]:
            times[name].append(time_once(fn, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    ours = next(iter(case.impls))
    out = []
    for name, ts in times.items():
        m = med[name]
        gbps = case.bytes_read / m / 1e9 if case.bytes_read else None
        tfl = case.flops / m / 1e12 if case.flops else None
        speed = {b: med[b] / m for b in med if b != name} if name == ours else {}
        out.append(Result(case.name, name, m * 1e6, min(ts) * 1e6, gbps, tfl,
                          gbps / ceil["read_gbps"] if gbps else None,
                          tfl / ceil["matmul_tflops"] if tfl else None, speed, case.params))
    return out


def machine(device: str) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    import ttscale

    info["ttscale"] = ttscale.build_info()
    return info


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(title: str, results: List[Result], ceil: dict) -> None:
    print(f"\n{title}   [ceilings measured now: read {ceil['read_gbps']:.1f} GB/s, "
          f"matmul {ceil['matmul_tflops']:.2f} TFLOP/s {ceil['matmul_dtype']}]")
    head = f"{'case':<34} {'impl':<24} {'median us':>11} {'min us':>11} {'GB/s':>8} {'%bw':>6} {'speed-up of ours':>30}"
    print(head)
    print("-" * len(head))
    for r in results:
        sp = ", ".join(f"{v:.1f}x vs {k}" for k, v in r.speedup_vs.items())
        pct = None if r.frac_bw is None else 100 * r.frac_bw
        print(f"{r.case:<34} {r.impl:<24} {r.median_us:>11.1f} {r.min_us:>11.1f} {_fmt(r.gbps, '.1f'):>8} "
              f"{_fmt(pct, '.0f'):>6} {sp:>30}")


def write_json(path: str, suite: str, device: str, ceil: dict, results: List[Result]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"suite": suite, "device": device, "machine": machine(device), "ceilings": ceil,
                   "results": [dataclasses.asdict(r) for r in results]}, f, indent=1)
    print(f"\nwrote {path}")


def default_json_path(suite: str, device: str) -> str:
    """bench/results/<suite>-<device tag>.json when run from the repository, else ./<...>.json."""
    if device.startswith("cuda"):
        tag = torch.cuda.get_device_name().replace(" ", "-")
    else:
        tag = f"cpu{os.cpu_count()}-{platform.machine()}"
    name = f"{suite}-{tag}.json"
    return os.path.join("bench", "results", name) if os.path.isdir(os.path.join("bench", "results")) else name
