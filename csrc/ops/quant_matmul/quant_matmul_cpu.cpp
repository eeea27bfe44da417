// Per-ISA CPU kernels for low-bit weight-only matmul (compiled once per ISA; see common/cpu_simd.h).
// Layout and algorithm: quant_matmul.h. One call computes one block of 16 output rows for all rows
// of x; the host code (quant_matmul.cpp) parallelises over blocks. No torch, no std templates.
#include "ops/quant_matmul/quant_matmul.h"
#include "common/cpu_simd.h"

#include <cstdint>
#include <cstring>

namespace ttscale {
namespace cpu {
namespace TTSCALE_CPU_ISA {
namespace {

using quant_matmul::BlockArgs;
using quant_matmul::CpuKernels;
using quant_matmul::kKTile;
using quant_matmul::kNB;

constexpr int NV = kNB / W;  // vectors per block of 16 rows

// The B bytes at p as a little-endian integer, assembled from whole loads (a partial memcpy into a
// zeroed word would stall on store forwarding).
template <int B>
inline uint32_t load_bytes(const uint8_t* p) {
  if constexpr (B == 4) { uint32_t w; std::memcpy(&w, p, 4); return w; }
  if constexpr (B == 2) { uint16_t w; std::memcpy(&w, p, 2); return w; }
  if constexpr (B == 3) { uint16_t w; std::memcpy(&w, p, 2); return (uint32_t)w | ((uint32_t)p[2] << 16); }
  return 0;
}

// Codes of vector h of one record (rows h*W .. h*W+W-1), converted exactly to fp32.
template <int B>
inline VF unpack(const uint8_t* rec, int h) {
#if defined(TTSCALE_CPU_ISA_AVX512)
  (void)h;
  if constexpr (B == 8) {
    return {_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)rec)))};
  } else {
    const uint32_t lo = load_bytes<B>(rec), hi = load_bytes<B>(rec + B);
    const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32((int)lo)), _mm256_set1_epi32((int)hi), 1);
    const __m512i sh = _mm512_setr_epi32(0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B,
                                         0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B);
    const __m512i q = _mm512_and_si512(_mm512_srlv_epi32(v, sh), _mm512_set1_epi32((1 << B) - 1));
    return {_mm512_cvtepi32_ps(q)};
  }
#elif defined(TTSCALE_CPU_ISA_AVX2)
  const uint8_t* p = rec + h * B;
  if constexpr (B == 8) {
    return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)))};
  } else {
    const uint32_t w = load_bytes<B>(p);
    const __m256i sh = _mm256_setr_epi32(0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B);
    const __m256i q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)w), sh), _mm256_set1_epi32((1 << B) - 1));
    return {_mm256_cvtepi32_ps(q)};
  }
#else
  const uint8_t* p = rec + h * B;
  uint64_t w;
  if constexpr (B == 8) std::memcpy(&w, p, 8); else w = load_bytes<B>(p);
  VF r;
  for (int i = 0; i < W; ++i) r.v[i] = (float)((w >> (B * i)) & ((1u << B) - 1u));
  return r;
#endif
}

// All NV vectors of one record. AVX2, 4 bits: the 8 record bytes are widened bytewise
// (vpmovzxbd); byte j holds rows (2j, 2j+1) of half j/4 in its two nibbles, so the low nibbles are
// the even rows and a plain shift by 4 gives the odd rows (no per-lane variable shift, no mask for
// the high nibble): 3 integer ops for 16 codes instead of 8. The lanes are then in the order
// lane_rows() reports (vector 0 = rows 0,2,..,14; vector 1 = rows 1,3,..,15); the host code
// stores scales/zeros in that order and reads y back through it.
template <int B>
inline void unpack_all(const uint8_t* rec, VF* c) {
#if defined(TTSCALE_CPU_ISA_AVX2)
  if constexpr (B == 4) {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)rec));
    c[0] = {_mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)))};
    c[1] = {_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4))};
    return;
  }
#endif
  for (int h = 0; h < NV; ++h) c[h] = unpack<B>(rec, h);
}

// Row of the block held by SIMD lane L (vector L / W, element L % W) after unpack_all.
constexpr uint8_t kLanesIdentity[kNB] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
constexpr uint8_t kLanesEvenOdd[kNB] = {0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15};
const uint8_t* lane_rows(int bits) {
#if defined(TTSCALE_CPU_ISA_AVX2)
  if (bits == 4) return kLanesEvenOdd;
#endif
  (void)bits;
  return kLanesIdentity;
}

// GEMV for MR rows of x: codes streamed once per call; per group, acc = sum_k q x, then
// y += s * (acc - z * xsum). Every record feeds all NV vectors and all MR rows (one broadcast of x
// per row and feature); U independent chains (k interleaved) keep >= 8 FMAs in flight.
template <int B, int MR>
void gemv_t(const BlockArgs& a) {
  constexpr int U = MR * NV >= 8 ? 1 : (8 + MR * NV - 1) / (MR * NV);
  const int64_t ng = a.K / a.G;
  constexpr int RB = 2 * B;  // record bytes
  const int64_t G = a.G, Gu = G - G % U;
  for (int64_t g = 0; g < ng; ++g) {
    const uint8_t* c0 = a.codes + g * G * RB;
    const float* x0 = a.x + g * G;
    VF acc[U][MR][NV];
    for (int u = 0; u < U; ++u)
      for (int m = 0; m < MR; ++m)
        for (int h = 0; h < NV; ++h) acc[u][m][h] = set1(0.0f);
    int64_t k = 0;
    for (; k < Gu; k += U) {
      for (int u = 0; u < U; ++u) {
        VF c[NV];
        unpack_all<B>(c0 + (k + u) * RB, c);
        for (int m = 0; m < MR; ++m) {
          const VF xv = set1(x0[m * a.ldx + k + u]);
          for (int h = 0; h < NV; ++h) acc[u][m][h] = fmadd(xv, c[h], acc[u][m][h]);
        }
      }
    }
    for (; k < G; ++k) {
      VF c[NV];
      unpack_all<B>(c0 + k * RB, c);
      for (int m = 0; m < MR; ++m) {
        const VF xv = set1(x0[m * a.ldx + k]);
        for (int h = 0; h < NV; ++h) acc[0][m][h] = fmadd(xv, c[h], acc[0][m][h]);
      }
    }
    for (int u = 1; u < U; ++u)
      for (int m = 0; m < MR; ++m)
        for (int h = 0; h < NV; ++h) acc[0][m][h] = add(acc[0][m][h], acc[u][m][h]);
    for (int h = 0; h < NV; ++h) {
      const VF sv = load(a.s + g * kNB + h * W);
      const VF zv = load(a.z + g * kNB + h * W);
      for (int m = 0; m < MR; ++m) {
        float* yp = a.y + m * kNB + h * W;
        const VF prev = g == 0 ? set1(0.0f) : load(yp);
        store(yp, fmadd(sv, sub(acc[0][m][h], mul(zv, set1(a.xsum[m * ng + g]))), prev));
      }
    }
  }
}

// Rows of x in chunks of R (R * NV accumulators fit the register file with room for the codes).
template <int B>
void gemv_b(const BlockArgs& a) {
  constexpr int64_t R = NV == 1 ? 8 : 6;
  const int64_t ng = a.K / a.G;
  for (int64_t m0 = 0; m0 < a.M; m0 += R) {
    BlockArgs c = a;
    c.x = a.x + m0 * a.ldx; c.xsum = a.xsum + m0 * ng; c.y = a.y + m0 * kNB;
    c.M = a.M - m0 < R ? a.M - m0 : R;
    switch (c.M) {
      case 1: gemv_t<B, 1>(c); break;
      case 2: gemv_t<B, 2>(c); break;
      case 3: gemv_t<B, 3>(c); break;
      case 4: gemv_t<B, 4>(c); break;
      case 5: gemv_t<B, 5>(c); break;
      case 6: gemv_t<B, 6>(c); break;
      case 7: if constexpr (R > 6) gemv_t<B, 7>(c); break;
      default: if constexpr (R > 6) gemv_t<B, 8>(c); break;
    }
  }
}

void gemv_block(const BlockArgs& a) {
  switch (a.bits) {
    case 2: gemv_b<2>(a); break;
    case 3: gemv_b<3>(a); break;
    case 8: gemv_b<8>(a); break;
    default: gemv_b<4>(a); break;
  }
}

// GEMM: rows m0..m0+R of y (in a.y, [M][16]) += x[rows, kt:kt+kn] @ tile; all NV vectors of the
// block at once, so each broadcast of x feeds NV FMAs.
template <int R>
void gemm_rows(const BlockArgs& a, int64_t m0, int64_t kt, int64_t kn) {
  VF acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int h = 0; h < NV; ++h) acc[i][h] = load(a.y + (m0 + i) * kNB + h * W);
  const float* xr = a.x + m0 * a.ldx + kt;
  for (int64_t k = 0; k < kn; ++k) {
    VF wv[NV];
    for (int h = 0; h < NV; ++h) wv[h] = load(a.tile + k * kNB + h * W);
    for (int i = 0; i < R; ++i) {
      const VF xv = set1(xr[i * a.ldx + k]);
      for (int h = 0; h < NV; ++h) acc[i][h] = fmadd(xv, wv[h], acc[i][h]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int h = 0; h < NV; ++h) store(a.y + (m0 + i) * kNB + h * W, acc[i][h]);
}

template <int B>
void gemm_b(const BlockArgs& a) {
  constexpr int RB = 2 * B;
  constexpr int MR = NV == 1 ? 8 : 6;  // AVX2: 6 rows x 2 vectors = 12 accumulators
  for (int64_t i = 0; i < a.M * kNB; ++i) a.y[i] = 0.0f;
  for (int64_t kt = 0; kt < a.K; kt += kKTile) {
    const int64_t kn = a.K - kt < kKTile ? a.K - kt : kKTile;
    for (int64_t k = 0; k < kn; ++k) {
      const int64_t g = (kt + k) / a.G;
      VF c[NV];
      unpack_all<B>(a.codes + (kt + k) * RB, c);
      for (int h = 0; h < NV; ++h)
        store(a.tile + k * kNB + h * W, mul(sub(c[h], load(a.z + g * kNB + h * W)), load(a.s + g * kNB + h * W)));
    }
    int64_t m0 = 0;
    for (; m0 + MR <= a.M; m0 += MR) gemm_rows<MR>(a, m0, kt, kn);
    switch (a.M - m0) {
      case 1: gemm_rows<1>(a, m0, kt, kn); break;
      case 2: gemm_rows<2>(a, m0, kt, kn); break;
      case 3: gemm_rows<3>(a, m0, kt, kn); break;
      case 4: gemm_rows<4>(a, m0, kt, kn); break;
      case 5: gemm_rows<5>(a, m0, kt, kn); break;
      case 6: gemm_rows<6>(a, m0, kt, kn); break;
      case 7: gemm_rows<7>(a, m0, kt, kn); break;
      default: break;
    }
  }
}

void gemm_block(const BlockArgs& a) {
  switch (a.bits) {
    case 2: gemm_b<2>(a); break;
    case 3: gemm_b<3>(a); break;
    case 8: gemm_b<8>(a); break;
    default: gemm_b<4>(a); break;
  }
}

const CpuKernels kKernels = {gemv_block, gemm_block, lane_rows};

}  // namespace

const CpuKernels* quant_matmul_kernels() { return &kKernels; }

}  // namespace TTSCALE_CPU_ISA
}  // namespace cpu
}  // namespace ttscale
