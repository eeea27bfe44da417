// Device helpers that make the CUDA attention kernels follow the non-finite contract of
// common/attention_math.h (masked keys never touch a row; a NaN / +inf visible score makes the row
// NaN through a sticky NaN running sum l). CUDA sources (.cu) only; the arithmetic that the CPU path
// shares (OnlineSoftmax, out_scale, poisons, merge_weights) stays in attention_math.h.
//
//   fmax_nan                   max that propagates NaN (PTX max.NaN.f32): a row max reduced with it
//                              is NaN or +inf exactly when a visible score poisons the row, so the
//                              poison flag costs no extra shuffle (the caller tests attn::poisons(max))
//   tile_local_range           a key range [b, e) clipped to a tile [n0, n0 + n) in tile coordinates
//   range_bits32               the same range as a bit mask (tiles of <= 32 keys)
//   smem_tile_has_nonfinite    whether a 16-bit K/V tile in shared memory holds an inf / NaN element
//   mma_pv_exact               O += P V for one key tile in the mma.m16n8k16 accumulator layout with
//                              every key a row cannot see skipped (no 0 * v), the slow path of the
//                              tensor-core kernels for partially masked tiles whose V is not finite
#pragma once
#if !defined(__CUDACC__)
#error "attention_nonfinite.cuh is for CUDA sources (.cu) only"
#endif

#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_mma.cuh"
#include "common/cuda_utils.cuh"
#include "common/dtype.h"
#include "common/host_device.h"

namespace ttscale {
namespace cuda {

// max(a, b), NaN if either is NaN (fmaxf and `a > b ? a : b` both drop a NaN operand).
TT_DEVICE float fmax_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;\n" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return (a != a || b != b) ? __int_as_float(0x7fffffff) : fmaxf(a, b);
#endif
}

// [b, e) intersected with the tile [n0, n0 + n), as tile offsets: 0 <= *jb, *je <= n (empty when
// *jb >= *je). b, e are absolute key positions (e <= b means empty).
TT_DEVICE void tile_local_range(int64_t b, int64_t e, int64_t n0, int n, int* jb, int* je) {
  int64_t lb = b - n0, le = e - n0;
  lb = lb < 0 ? 0 : (lb > n ? n : lb);
  le = le < 0 ? 0 : (le > n ? n : le);
  *jb = (int)lb;
  *je = (int)le;
}

// Bit j (0 <= j < 32) set iff jb <= j < je, for 0 <= jb, je <= 32: a tile's visibility mask of one row.
TT_DEVICE uint32_t range_bits32(int jb, int je) {
  const uint32_t below_e = je >= 32 ? 0xffffffffu : ((1u << je) - 1u);
  const uint32_t below_b = jb >= 32 ? 0xffffffffu : ((1u << jb) - 1u);
  return below_e & ~below_b;
}

// Exponent field of a 16-bit float: all ones <=> inf or NaN.
template <typename T>
struct ExpBits16;
template <>
struct ExpBits16<half_t> {
  static constexpr uint32_t kMask = 0x7C00u;
};
template <>
struct ExpBits16<bf16_t> {
  static constexpr uint32_t kMask = 0x7F80u;
};
template <typename T>
TT_DEVICE bool word_has_nonfinite16(uint32_t w) {
  constexpr uint32_t M = ExpBits16<T>::kMask;
  return ((w & M) == M) | (((w >> 16) & M) == M);
}

// Whether rows [0, ROWS) x columns [0, D) of a shared tile of 16-bit T (row stride LD elements,
// rows 16-byte aligned) hold an inf or NaN. The columns [D, LD) (padding, never written) are not
// read. Every thread of the NT-thread block scans a strided share and returns its own answer: the
// caller combines them with __syncthreads_or (after the barrier that made the tile visible).
template <typename T, int D, int LD, int ROWS, int NT>
TT_DEVICE bool smem_tile_has_nonfinite(const void* tile) {
  static_assert(D % 8 == 0 && LD % 8 == 0, "16-byte chunks");
  constexpr int kChunks = D / 8;
  const uint16_t* base = static_cast<const uint16_t*>(tile);
  bool bad = false;
#pragma unroll
  for (int c = (int)threadIdx.x; c < ROWS * kChunks; c += NT) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const uint4 x = *reinterpret_cast<const uint4*>(base + r * LD + col);
    bad |= word_has_nonfinite16<T>(x.x) | word_has_nonfinite16<T>(x.y) | word_has_nonfinite16<T>(x.z) |
           word_has_nonfinite16<T>(x.w);
  }
  return bad;
}

// O += P V over one tile of BN = NKT * 8 keys, exactly: key j (tile offset) is added to the lane's
// row g = lane / 4 only when jb[0] <= j < je[0], to row g + 8 only when jb[1] <= j < je[1]; any
// other key is skipped, whatever V holds there (the tensor-core product adds 0 * v, NaN for v = inf).
// Layouts (mma.m16n8k16, fp32 accumulators, t = lane % 4):
//   p[nt][e]: P of row g + 8 * (e / 2), key nt * 8 + 2 t + (e % 2)  (the S accumulator after exp)
//   o[dt][e]: O of row g + 8 * (e / 2), dim  dt * 8 + 2 t + (e % 2)
//   v_s:      the V tile in shared memory, key j at v_s + j * LD, 16-bit T, dims contiguous.
// P is first written, rounded to T exactly as the tensor-core path rounds it (cuda::pack2), to p_s:
// shared scratch of 16 rows x BN keys (row stride BN) that belongs to this warp alone for the duration of the call
// (the caller guarantees no other warp reads or writes it). Going through shared memory lets the P
// registers die before the loop, so this slow path does not raise the kernel's register count.
// Every lane of the warp must call it (__syncwarp); the key loop is not unrolled (it is the rare path).
template <typename T, int NKT, int DT, int LD>
TT_DEVICE void mma_pv_exact(float (&o)[DT][4], const float (&p)[NKT][4], uint16_t* p_s, const void* v_s, int lane,
                            const int (&jb)[2], const int (&je)[2]) {
  constexpr int BN = NKT * 8;
  const int g = lane >> 2, t = lane & 3;
  uint16_t* prow0 = p_s + g * BN;        // row g
  uint16_t* prow1 = p_s + (g + 8) * BN;  // row g + 8
  __syncwarp();  // earlier reads of the scratch by other lanes are done
#pragma unroll
  for (int nt = 0; nt < NKT; ++nt) {
    *reinterpret_cast<uint32_t*>(prow0 + nt * 8 + 2 * t) = pack2<T>(p[nt][0], p[nt][1]);
    *reinterpret_cast<uint32_t*>(prow1 + nt * 8 + 2 * t) = pack2<T>(p[nt][2], p[nt][3]);
  }
  __syncwarp();
  const uint16_t* vcol = static_cast<const uint16_t*>(v_s) + 2 * t;
#pragma unroll 1
  for (int j2 = 0; j2 < BN; j2 += 2) {  // keys j2, j2 + 1
    float pa[2], pb[2];
    unpack16(*reinterpret_cast<const uint32_t*>(prow0 + j2), pa[0], pa[1], static_cast<const T*>(nullptr));
    unpack16(*reinterpret_cast<const uint32_t*>(prow1 + j2), pb[0], pb[1], static_cast<const T*>(nullptr));
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int j = j2 + k;
      const bool v0 = j >= jb[0] && j < je[0], v1 = j >= jb[1] && j < je[1];
      const uint16_t* vrow = vcol + j * LD;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        float x0, x1;  // V[j][dt * 8 + 2 t], V[j][dt * 8 + 2 t + 1] (low half = lower address)
        unpack16(*reinterpret_cast<const uint32_t*>(vrow + dt * 8), x0, x1, static_cast<const T*>(nullptr));
        if (v0) {
          o[dt][0] = fmaf(pa[k], x0, o[dt][0]);
          o[dt][1] = fmaf(pa[k], x1, o[dt][1]);
        }
        if (v1) {
          o[dt][2] = fmaf(pb[k], x0, o[dt][2]);
          o[dt][3] = fmaf(pb[k], x1, o[dt][3]);
        }
      }
    }
  }
  __syncwarp();
}

}  // namespace cuda
}  // namespace ttscale
