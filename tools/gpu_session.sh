#!/usr/bin/env bash
# Everything a lent GPU is needed for, in one command (the device tool runs it in a copy of the
# working tree; a session has ~15 minutes of device time in all, start-up included):
#
#   bash tools/gpu_session.sh            # results under $OUT (the device tool's folder) or /tmp/ttscale_gpu
#
# 1. machine facts (nvidia-smi, torch, nvcc) -> $OUT/machine.txt
# 2. build ttscale with CUDA against the machine's own torch, for sm_90a only (Hopper; set
#    TTSCALE_CUDA_ARCHS="8.0;9.0a" for both) -> $OUT/build.log
# 3. the tests whose id names cuda with the CUDA build (every test parametrised over DEVICES gains
#    its "cuda" case, plus the CPU-vs-CUDA agreement tests; slow grids stay off) -> $OUT/tests.log
# 4. the CUDA benchmarks (attention, quant, sampling) -> $OUT/bench-*.json and $OUT/bench.log
# 5. if time is left, tests/ops in full with the CUDA build -> $OUT/tests-all.log
#
# Each phase has its own time limit and the script goes on after a failed phase, so one broken
# kernel still leaves the other results. The last lines printed are a summary table (the device
# tool returns the tail of the output). Copy the JSON into bench/results/ with the device name.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/ttscale_gpu}"
mkdir -p "$OUT"
PY="${PY:-python3}"
export TTSCALE_CUDA_ARCHS="${TTSCALE_CUDA_ARCHS:-9.0a}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
# phase limits: their sum (with start-up) stays under the device tool's 600 s per call
BUILD_S="${BUILD_S:-220}" TEST_S="${TEST_S:-120}" BENCH_S="${BENCH_S:-60}" ALL_S="${ALL_S:-60}"
summary=()
phase() {  # name, limit (s), log, command...
  local name=$1 limit=$2 log=$3
  shift 3
  local t0=$SECONDS
  timeout "$limit" "$@" > "$log" 2>&1
  local rc=$?
  summary+=("$(printf '%-28s rc=%-4s %5ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$(tail -n 1 "$log" | cut -c1-90)")")
  return $rc
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv
  "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  command -v nvcc && nvcc --version | tail -n 2
  nproc
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if phase build "$BUILD_S" "$OUT/build.log" "$PY" -m pip install --no-build-isolation --no-deps -v -e .; then
  phase "cuda in build" 60 "$OUT/build_info.txt" "$PY" -c \
    "import sys, ttscale; i = ttscale.build_info(); print(i); sys.exit(0 if i['cuda_available'] else 3)"
  grep -E "ptxas|registers|spill" "$OUT/build.log" | tail -n 40 > "$OUT/ptxas.txt" || true
  phase "tests -k cuda" "$TEST_S" "$OUT/tests.log" "$PY" -m pytest tests -q -p no:cacheprovider --maxfail=30 \
    --junitxml="$OUT/junit.xml" -k cuda
  for suite in attention quant sampling; do
    phase "bench $suite" "$BENCH_S" "$OUT/bench-$suite.log" \
      "$PY" -m ttscale.bench "$suite" --device cuda --json "$OUT/bench-$suite.json"
  done
  cat "$OUT"/bench-*.log > "$OUT/bench.log" 2>/dev/null
  phase "tests/ops (cpu+cuda)" "$ALL_S" "$OUT/tests-all.log" "$PY" -m pytest tests/ops -q -p no:cacheprovider -x
else
  tail -n 60 "$OUT/build.log"
fi

echo
echo "== ttscale GPU session summary ($OUT)"
printf '%s\n' "${summary[@]}"
