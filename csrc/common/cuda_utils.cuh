// Reusable CUDA device helpers (torch-free; include only from .cu files).
//
//   warp_reduce / block_reduce            any associative op (SumOp, MaxOp, MinOp), all lanes get it
//   warp_inclusive_scan / block_exclusive_scan
//   load_elem / load_octet                fp32, fp16, bf16 widened to fp32; an octet is 8 consecutive
//                                         tokens read with 16-byte loads when the row is 16-byte aligned
//   is_nan_or_posinf / value_key / key_value   bit-level float predicates and the canonical order key
//   hist_add                              contention-aware shared-memory histogram update
//   bitonic_sort_desc                     in-place sort of up to a few thousand 64-bit keys in smem
//
// Block-level helpers must be called by every thread of the block (they synchronise). They take a
// caller-provided shared scratch area (`red`, at least 33 * 8 bytes, 8-byte aligned) so that one
// buffer serves every element type; each helper synchronises before it writes the scratch and
// callers re-read broadcast values before the next helper call.
#pragma once
#if !defined(__CUDACC__)
#error "cuda_utils.cuh is for CUDA sources (.cu) only"
#endif

#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"
#include "common/host_device.h"

namespace ttscale {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

TT_DEVICE int lane_id() { return (int)(threadIdx.x & 31u); }
TT_DEVICE int warp_id() { return (int)(threadIdx.x >> 5); }

struct SumOp {
  template <typename T>
  TT_DEVICE T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  template <typename T>
  TT_DEVICE T operator()(T a, T b) const { return a > b ? a : b; }
};
struct MinOp {
  template <typename T>
  TT_DEVICE T operator()(T a, T b) const { return a < b ? a : b; }
};

// ---------------------------------------------------------------- reductions and scans
template <typename T, typename Op>
TT_DEVICE T warp_reduce(T v, Op op) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

template <typename T>
TT_DEVICE T warp_inclusive_scan(T v) {
  const int lane = lane_id();
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const T t = __shfl_up_sync(kFullMask, v, off);
    if (lane >= off) v += t;
  }
  return v;
}

// Exclusive prefix from an inclusive one (exact: no subtraction).
template <typename T>
TT_DEVICE T warp_exclusive_from_inclusive(T incl) {
  const T e = __shfl_up_sync(kFullMask, incl, 1);
  return lane_id() == 0 ? T(0) : e;
}

// Block-wide reduction; every thread gets the result. `red`: shared scratch (>= 32 T).
template <int NT, typename T, typename Op>
TT_DEVICE T block_reduce(T v, Op op, void* red) {
  static_assert(NT % 32 == 0 && NT <= 1024, "block size must be a multiple of 32");
  T* s = static_cast<T*>(red);
  v = warp_reduce(v, op);
  __syncthreads();
  if (lane_id() == 0) s[warp_id()] = v;
  __syncthreads();
  T r = s[0];
#pragma unroll
  for (int w = 1; w < NT / 32; ++w) r = op(r, s[w]);
  return r;
}

// Block-wide exclusive prefix sum in thread order; *total gets the block total (all threads).
template <int NT, typename T>
TT_DEVICE T block_exclusive_scan(T v, void* red, T* total) {
  static_assert(NT % 32 == 0 && NT <= 1024, "block size must be a multiple of 32");
  T* s = static_cast<T*>(red);
  const T incl = warp_inclusive_scan(v);
  const T excl = warp_exclusive_from_inclusive(incl);
  __syncthreads();
  if (lane_id() == 31) s[warp_id()] = incl;
  __syncthreads();
  T base = T(0), tot = T(0);
  const int w_me = warp_id();
#pragma unroll
  for (int w = 0; w < NT / 32; ++w) {
    const T x = s[w];
    if (w < w_me) base += x;
    tot += x;
  }
  *total = tot;
  return base + excl;
}

// ---------------------------------------------------------------- element loads
TT_DEVICE float half_bits_to_float_dev(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));  // exact for every half (no .ftz)
  return f;
}
TT_DEVICE float bf16_bits_to_float_dev(unsigned short b) { return __uint_as_float((uint32_t)b << 16); }

TT_DEVICE float load_elem(const float* p) { return __ldg(p); }
TT_DEVICE float load_elem(const half_t* p) {
  return half_bits_to_float_dev(__ldg(reinterpret_cast<const unsigned short*>(p)));
}
TT_DEVICE float load_elem(const bf16_t* p) {
  return bf16_bits_to_float_dev(__ldg(reinterpret_cast<const unsigned short*>(p)));
}

TT_DEVICE void unpack16(uint32_t w, float& lo, float& hi, const half_t*) {
  lo = half_bits_to_float_dev((unsigned short)(w & 0xffffu));
  hi = half_bits_to_float_dev((unsigned short)(w >> 16));
}
TT_DEVICE void unpack16(uint32_t w, float& lo, float& hi, const bf16_t*) {
  lo = __uint_as_float(w << 16);
  hi = __uint_as_float(w & 0xffff0000u);
}

TT_DEVICE bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Loads tokens [j0, j0 + 8) of a row of n elements into v (fp32); returns how many are valid
// (0..8); invalid slots are 0. `aligned`: the row start is 16-byte aligned (then every full octet
// is read with 16-byte loads: two for fp32, one for fp16/bf16).
TT_DEVICE int load_octet(const float* row, int64_t n, int64_t j0, bool aligned, float (&v)[8]) {
  const int64_t rem = n - j0;
  if (rem >= 8 && aligned) {
    const float4* p = reinterpret_cast<const float4*>(row + j0);
    const float4 a = __ldg(p), b = __ldg(p + 1);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    return 8;
  }
  const int cnt = rem >= 8 ? 8 : (rem > 0 ? (int)rem : 0);
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] = e < cnt ? __ldg(row + j0 + e) : 0.0f;
  return cnt;
}

template <typename E>  // half_t or bf16_t
TT_DEVICE int load_octet(const E* row, int64_t n, int64_t j0, bool aligned, float (&v)[8]) {
  const int64_t rem = n - j0;
  if (rem >= 8 && aligned) {
    const uint4 q = __ldg(reinterpret_cast<const uint4*>(row + j0));
    unpack16(q.x, v[0], v[1], row);
    unpack16(q.y, v[2], v[3], row);
    unpack16(q.z, v[4], v[5], row);
    unpack16(q.w, v[6], v[7], row);
    return 8;
  }
  const int cnt = rem >= 8 ? 8 : (rem > 0 ? (int)rem : 0);
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] = e < cnt ? load_elem(row + j0 + e) : 0.0f;
  return cnt;
}

// ---------------------------------------------------------------- float bit predicates and keys
TT_DEVICE bool is_nan_or_posinf(float v) {
  const uint32_t b = __float_as_uint(v);
  return (b & 0x7fffffffu) > 0x7f800000u || b == 0x7f800000u;
}

// float_order_key (dtype.h) of v with -0 folded into +0, so that keys compare exactly like the
// floats do (the CPU path compares values, where -0 == +0). NaN must be excluded by the caller.
TT_DEVICE uint32_t value_key(float v) {
  uint32_t b = __float_as_uint(v);
  if ((b & 0x7fffffffu) == 0u) b = 0u;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
// Inverse of value_key.
TT_DEVICE float key_value(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// ---------------------------------------------------------------- shared-memory histogram
// Adds 1 to cnt[bin] (and w to wsum[bin] when kWeighted) for every lane with `pred`. All 32 lanes
// must call it. When every active lane hits the same bin (a constant row, masked tokens, the top
// radix digits of clustered values) one lane adds the warp's total instead of 32 serialised atomics.
template <bool kWeighted>
TT_DEVICE void hist_add(bool pred, uint32_t bin, double w, unsigned* cnt, double* wsum) {
  const unsigned act = __ballot_sync(kFullMask, pred);
  if (act == 0u) return;
  const int first = __ffs(act) - 1;
  const uint32_t b0 = __shfl_sync(kFullMask, bin, first);
  if (__all_sync(kFullMask, !pred || bin == b0)) {
    if (kWeighted) {
      const double s = warp_reduce(pred ? w : 0.0, SumOp());
      if (lane_id() == first) atomicAdd(&wsum[b0], s);
    }
    if (lane_id() == first) atomicAdd(&cnt[b0], (unsigned)__popc(act));
    return;
  }
  if (pred) {
    atomicAdd(&cnt[bin], 1u);
    if (kWeighted) atomicAdd(&wsum[bin], w);
  }
}

// ---------------------------------------------------------------- sorting
// Sorts a[0, n_pow2) descending in place (n_pow2 a power of two; pad unused slots with 0).
template <int NT>
TT_DEVICE void bitonic_sort_desc(unsigned long long* a, int n_pow2) {
  for (int k = 2; k <= n_pow2; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      __syncthreads();
      for (int i = (int)threadIdx.x; i < n_pow2; i += NT) {
        const int ixj = i ^ j;
        if (ixj > i) {
          const unsigned long long x = a[i], y = a[ixj];
          const bool desc = (i & k) == 0;
          if (desc ? (x < y) : (x > y)) {
            a[i] = y;
            a[ixj] = x;
          }
        }
      }
    }
  }
  __syncthreads();
}

TT_HD int next_pow2(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

}  // namespace cuda
}  // namespace ttscale
