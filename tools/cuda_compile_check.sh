#!/usr/bin/env bash
# Compiles every csrc/**/*_cuda.cu with nvcc alone (no torch) for sm_80 and sm_90a and records the
# ptxas register / spill / shared-memory report.
#
#   bash tools/cuda_compile_check.sh [OUTDIR]        (default: build/cuda_report)
#
# Writes OUTDIR/<name>.o, OUTDIR/<name>.log (full nvcc output) and OUTDIR/ptxas_report.txt (the raw
# ptxas lines of every file, then one summary line per kernel and arch: registers, spill stores /
# loads, stack frame, static shared memory). Exits non-zero on any compile error. Prints
# "no nvcc found, skipping" and exits 0 when no nvcc can be found ($CUDACXX, PATH, /usr/local/cuda/bin).
# Extra nvcc flags can be passed in $TTSCALE_NVCC_FLAGS (e.g. "--use_fast_math").
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="${1:-build/cuda_report}"
case "$OUTDIR" in /*) ;; *) OUTDIR="$ROOT/$OUTDIR" ;; esac

NVCC=""
if [[ -n "${CUDACXX:-}" && -x "${CUDACXX}" ]]; then
  NVCC="$CUDACXX"
elif command -v nvcc >/dev/null 2>&1; then
  NVCC="$(command -v nvcc)"
elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
  NVCC=/usr/local/cuda/bin/nvcc
fi
if [[ -z "$NVCC" ]]; then
  echo "no nvcc found, skipping"
  exit 0
fi

mkdir -p "$OUTDIR"
REPORT="$OUTDIR/ptxas_report.txt"
mapfile -t SOURCES < <(cd "$ROOT" && find csrc -name '*_cuda.cu' -type f | sort)
{
  echo "# ttscale CUDA compile check"
  echo "# nvcc: $NVCC ($("$NVCC" --version | tail -n 1))"
  echo "# flags: -std=c++17 -O3 -I csrc -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a -Xptxas -v ${TTSCALE_NVCC_FLAGS:-}"
  echo "# sources: ${#SOURCES[@]}"
} >"$REPORT"

if [[ ${#SOURCES[@]} -eq 0 ]]; then
  echo "no *_cuda.cu sources found under csrc/"
  cat "$REPORT"
  exit 0
fi

failed=0
for src in "${SOURCES[@]}"; do
  name="$(basename "$src" .cu)"
  log="$OUTDIR/$name.log"
  echo "== $src" | tee -a "$REPORT"
  # shellcheck disable=SC2086
  if (cd "$ROOT" && "$NVCC" -std=c++17 -O3 -I csrc \
        -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a \
        -Xptxas -v ${TTSCALE_NVCC_FLAGS:-} -c "$src" -o "$OUTDIR/$name.o") >"$log" 2>&1; then
    # the "N bytes stack frame, N bytes spill stores, ..." lines carry no "ptxas" prefix
    grep -E "ptxas|error|warning|bytes stack frame" "$log" >>"$REPORT" || true
  else
    failed=1
    echo "FAILED: $src (full log: $log)" | tee -a "$REPORT"
    grep -E "error|warning" "$log" | head -n 40
    cat "$log" >>"$REPORT"
  fi
done

# Summary: one line per (kernel, arch). ptxas prints, per function:
#   ptxas info    : Compiling entry function '<mangled>' for 'sm_XX'
#   ptxas info    : Function properties for <mangled>
#       N bytes stack frame, N bytes spill stores, N bytes spill loads
#   ptxas info    : Used N registers, ... N bytes smem, ...
summary="$(awk '
  function demangle(s) { return s }
  /Compiling entry function/ {
    match($0, /function \x27[^\x27]+\x27/); fn = substr($0, RSTART + 10, RLENGTH - 11);
    match($0, /for \x27sm_[0-9a-z]+\x27/); arch = substr($0, RSTART + 5, RLENGTH - 6);
    stack = 0; sst = 0; sld = 0; next
  }
  /bytes stack frame/ {
    for (i = 1; i <= NF; i++) {
      if ($(i+1) == "bytes" && $(i+2) == "stack") stack = $i
      if ($(i+1) == "bytes" && $(i+2) == "spill" && $(i+3) == "stores,") sst = $i
      if ($(i+1) == "bytes" && $(i+2) == "spill" && $(i+3) == "loads") sld = $i
    }
    next
  }
  /Used [0-9]+ registers/ && fn != "" {
    regs = 0; smem = 0;
    for (i = 1; i <= NF; i++) {
      if ($i == "Used") regs = $(i+1)
      if ($(i+1) == "bytes" && $(i+2) ~ /^smem/) smem = $i
    }
    printf "%-7s regs=%-4s spill_st=%-5s spill_ld=%-5s stack=%-5s smem=%-6s %s\n", arch, regs, sst, sld, stack, smem, fn
    if (sst + 0 > 0 || sld + 0 > 0) spills++
    fn = ""
  }
  END { if (spills > 0) printf "# kernels with spills: %d\n", spills; else print "# no spills" }
' "$REPORT")"

# readable kernel names when c++filt is available
if command -v c++filt >/dev/null 2>&1; then
  summary="$(printf '%s\n' "$summary" | c++filt)"
fi
{
  echo
  echo "# ---- summary (per kernel and arch) ----"
  printf '%s\n' "$summary"
} >>"$REPORT"
printf '%s\n' "$summary"
echo "report: $REPORT"

if [[ $failed -ne 0 ]]; then
  echo "cuda_compile_check: compile errors" >&2
  exit 1
fi
exit 0
