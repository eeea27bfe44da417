#!/usr/bin/env bash
# Syntax check of the host side of the CUDA build without a GPU or a CUDA torch: every csrc/**/*.cpp
# that is not a per-ISA CPU kernel file is compiled with g++ -fsyntax-only and TTSCALE_WITH_CUDA=1
# against the installed (CPU) torch's headers and nvcc's CUDA runtime headers. The `#if
# defined(TTSCALE_WITH_CUDA)` blocks (launchers, CUDA op registrations) are otherwise compiled only
# on a machine with a CUDA torch, and tools/cuda_compile_check.sh covers the .cu files only.
#
#   bash tools/cuda_host_check.sh [PYTHON]          (default: python3; needs torch importable)
#
# A CPU torch wheel ships ATen/cuda and c10/cuda headers, but they include the headers of CUDA
# libraries (cuBLAS, cuSPARSE, cuSOLVER) and one generated file it does not ship: small stubs with
# the handle and status types those headers name stand in for them (nothing here calls them).
# Prints "skipping" and exits 0 when torch or the CUDA runtime headers cannot be found.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${1:-python3}"
TI="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))' 2>/dev/null)"
if [[ -z "$TI" || ! -d "$TI/c10/cuda" ]]; then
  echo "cuda_host_check: no torch with c10/cuda headers for $PY, skipping"
  exit 0
fi
PYI="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
CUDA_INC=""
for d in "${CUDA_HOME:-}/include" /usr/local/cuda/include; do
  if [[ -f "$d/cuda_runtime.h" ]]; then CUDA_INC="$d"; break; fi
done
if [[ -z "$CUDA_INC" ]]; then
  echo "cuda_host_check: no cuda_runtime.h (CUDA_HOME, /usr/local/cuda), skipping"
  exit 0
fi

STUBS="$(mktemp -d)"
trap 'rm -rf "$STUBS"' EXIT
mkdir -p "$STUBS/c10/cuda/impl"
stub() { [[ -f "$CUDA_INC/$1" ]] || printf '#pragma once\n%s\n' "$2" >"$STUBS/$1"; }
stub cusparse.h 'typedef struct cusparseContext* cusparseHandle_t; typedef int cusparseStatus_t;'
stub cublas_v2.h 'typedef struct cublasContext* cublasHandle_t; typedef int cublasStatus_t;'
stub cublasLt.h 'typedef struct cublasLtContext* cublasLtHandle_t;'
stub cusolverDn.h 'typedef struct cusolverDnContext* cusolverDnHandle_t;'
stub cusolver_common.h 'typedef int cusolverStatus_t;'
[[ -f "$TI/c10/cuda/impl/cuda_cmake_macros.h" ]] || echo '#pragma once' >"$STUBS/c10/cuda/impl/cuda_cmake_macros.h"

mapfile -t SOURCES < <(cd "$ROOT" && find csrc -name '*.cpp' ! -name '*_cpu.cpp' -type f | sort)
failed=0
for src in "${SOURCES[@]}"; do
  if (cd "$ROOT" && g++ -fsyntax-only -std=c++17 -I csrc -isystem "$STUBS" -isystem "$TI" \
        -isystem "$TI/torch/csrc/api/include" -isystem "$CUDA_INC" -isystem "$PYI" -DTTSCALE_WITH_CUDA=1 -DTTSCALE_CUDA_ARCHS_STR='"80,90a"' \
        -DTTSCALE_VERSION='"check"' -DTTSCALE_BUILT_CPU_ISAS='"check"' "$src"); then
    echo "ok      $src"
  else
    echo "FAILED  $src"
    failed=1
  fi
done
if [[ $failed -ne 0 ]]; then
  echo "cuda_host_check: compile errors in the CUDA host code" >&2
  exit 1
fi
echo "cuda_host_check: ${#SOURCES[@]} files ok"
