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

#if defined(TTSCALE_CPU_ISA_AVX512BF16)
// ------------------------------------------------------------ vdpbf16ps path (quant_matmul.h)
using quant_matmul::DpArgs;
using quant_matmul::kDpKTile;
using quant_matmul::kDpDirectMaxM;

// Generic pair (any bit width, tails): records k0 and k1 unpacked to fp32 (exact), + off, rounded
// to bf16 (exact: < 256) and interleaved so that element 2i + e is row i of record k_e.
inline __m512i dp_pair_generic(VF a, VF b) {
  alignas(64) static const uint16_t kIl[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                               8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i t = (__m512i)_mm512_cvtne2ps_pbh(b.v, a.v);  // elements 0..15 = a, 16..31 = b
  return _mm512_permutexvar_epi16(_mm512_load_si512(kIl), t);
}

// 4 bits, 8 records (64 bytes, features k..k+7) -> 4 pair vectors. Record byte j holds rows 2j (low
// nibble) and 2j+1 (high nibble). Two shifts + two ternary-logic ops give every nibble as a byte
// (q << 3) | 0x80, i.e. the low byte of bf16(16 + q) = 0x4180 | q << 3 (the mantissa step of
// 16.0 is 1/8): `lo` holds the even rows, `hi` the odd rows at the same byte offsets. One vpermi2b
// per pair vector then gathers low bytes from the 128-byte table (lo, hi) into the even bytes and,
// through the merge mask, keeps the index register's odd bytes, which hold the high byte 0x41.
struct Dp4Idx {
  __m512i v[4];
  Dp4Idx() {
    alignas(64) uint8_t b[4][64];
    for (int j = 0; j < 4; ++j)
      for (int i = 0; i < 16; ++i)
        for (int e = 0; e < 2; ++e) {
          b[j][4 * i + 2 * e] = (uint8_t)((i & 1) * 64 + (2 * j + e) * 8 + (i >> 1));
          b[j][4 * i + 2 * e + 1] = 0x41;
        }
    for (int j = 0; j < 4; ++j) v[j] = _mm512_load_si512(b[j]);
  }
};

inline void dp_unpack4x8(const uint8_t* rec, __m512i* out, int64_t stride, const Dp4Idx& ix) {
  const __m512i v = _mm512_loadu_si512(rec);
  const __m512i m78 = _mm512_set1_epi8(0x78), m80 = _mm512_set1_epi8((char)0x80);
  const __m512i lo = _mm512_ternarylogic_epi32(_mm512_slli_epi16(v, 3), m78, m80, 0xEA);  // (a & b) | c
  const __m512i hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 1), m78, m80, 0xEA);
  constexpr __mmask64 kEven = 0x5555555555555555ull;
  for (int j = 0; j < 4; ++j) out[j * stride] = _mm512_mask2_permutex2var_epi8(lo, ix.v[j], kEven, hi);
}

// Bytes ahead in each block's code stream for software prefetch: a 4 KiB page (the hardware
// prefetcher stops at page boundaries and the blocks of a super-block alternate); measured on a
// 2-core Zen 5 (direct path): no prefetch 15-18 GB/s on one core, 1 KiB no better, 4-16 KiB 19-21 GB/s.
constexpr int64_t kDpPrefetch = 4096;

// Dequantisation of features [kt, kt + kn) of the super-block's nr blocks into a tile
// ([pair][nr] 64-byte vectors), one "unit" at a time: 8 features of one block at 4 bits
// (dp_unpack4x8: 4 pair vectors), else one feature pair. The tile path runs it for the NEXT tile
// from inside the current tile's vdpbf16ps loop (step() every ~64 vdpbf16ps), so the shifts and
// permutes issue in the slots the dp chains leave free: measured on Zen 5, one vpermi2b per 16
// vdpbf16ps costs no time, while a separate dequant pass was 13% of an M = 16 call. Units go
// block-interleaved so both code streams advance together; each unit prefetches its block's
// stream kDpPrefetch bytes ahead (two tiles ahead at kDpKTile = 256, 4 bits).
template <int B, int NR>
struct DqStream {
  const uint8_t* codes[NR];
  __m512i* tile;
  int64_t kt = 0, kn = 0, n8 = 0, np = 0, g = 0, per_step = 0;  // g: next unit's 8-feature group or pair
  int r = 0;                                                       // next unit's block
  bool pairs = false;                                              // past the 8-feature groups
  const Dp4Idx* ix;

  void start(const DpArgs& a, __m512i* dst, int64_t kt_, int64_t kn_, int64_t steps, const Dp4Idx& ix_) {
    for (int i = 0; i < NR; ++i) codes[i] = a.codes[i];
    tile = dst, kt = kt_, kn = kn_, ix = &ix_, g = 0, r = 0;
    n8 = B == 4 ? kn / 8 : 0;
    np = (kn + 1) / 2;  // pairs in all
    pairs = n8 == 0;
    const int64_t total = NR * (n8 + np - 4 * n8);
    steps = steps > 0 ? steps : 1;
    per_step = (total + steps - 1) / steps;
  }
  bool done() const { return pairs && g >= np; }
  void unit() {
    constexpr int RB = 2 * B;
    if (!pairs) {
      const uint8_t* rec = codes[r] + (kt + 8 * g) * RB;
      _mm_prefetch((const char*)rec + kDpPrefetch, _MM_HINT_T0);
      dp_unpack4x8(rec, tile + 4 * g * NR + r, NR, *ix);
    } else {
      const float off = quant_matmul::dp_code_offset(B);
      const uint8_t* rec = codes[r] + (kt + 2 * g) * RB;
      _mm_prefetch((const char*)rec + kDpPrefetch, _MM_HINT_T0);
      const VF lo = add(unpack<B>(rec, 0), set1(off));
      const VF hi = 2 * g + 1 < kn ? add(unpack<B>(rec + RB, 0), set1(off)) : set1(off);
      tile[g * NR + r] = dp_pair_generic(lo, hi);
    }
    if (++r == NR) {
      r = 0, ++g;
      if (!pairs && g == n8) pairs = true, g = 4 * n8;  // the tail's first pair
    }
  }
  void step() {
    for (int64_t i = 0; i < per_step && !done(); ++i) unit();
  }
  void finish() {
    while (!done()) unit();
  }
};

// dp_chunk calls DqStream::step once per this many pair iterations (~64 vdpbf16ps between steps).
template <int MR, int NR>
constexpr int dq_every() {
  constexpr int U = MR * NR >= 8 ? 1 : (8 + MR * NR - 1) / (MR * NR);
  return (64 + MR * NR * U - 1) / (MR * NR * U);
}

// MR rows x NR vectors over the np pairs of one chunk; U interleaved pair streams keep >= 8
// independent vdpbf16ps chains for small MR * NR. Then the chunk's scale/zero flush into y.
template <int MR, int NR, class Dq>
void dp_chunk(const DpArgs& a, const __m512i* tile, int64_t np, const uint32_t* x, int64_t m0, int64_t c,
              const float* s, const float* zc, Dq& dq) {
  constexpr int U = MR * NR >= 8 ? 1 : (8 + MR * NR - 1) / (MR * NR);
  constexpr int E = dq_every<MR, NR>();
  int e = 0;
  // DpArgs fields in locals: the stores below (y, and the tile in dq.step) may alias `a` as far as
  // the compiler knows, which made it reload ldx every iteration and y/xsum/nc after every store
  const int64_t ldx = a.ldx, nc = a.nc;
  float* const y = a.y;
  const float* const xsum = a.xsum;
  __m512 acc[U][MR][NR];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < NR; ++r) acc[u][m][r] = _mm512_setzero_ps();
  int64_t p = 0;
  for (; p + U <= np; p += U)
    for (int u = 0; u < U; ++u) {
      __m512bh w[NR];
      for (int r = 0; r < NR; ++r) w[r] = (__m512bh)_mm512_load_si512(tile + (p + u) * NR + r);
      for (int m = 0; m < MR; ++m) {
        const __m512bh xb = (__m512bh)_mm512_set1_epi32((int)x[m * ldx + p + u]);
        for (int r = 0; r < NR; ++r) acc[u][m][r] = _mm512_dpbf16_ps(acc[u][m][r], xb, w[r]);
      }
      if (u == U - 1 && ++e == E) e = 0, dq.step();
    }
  for (; p < np; ++p) {
    __m512bh w[NR];
    for (int r = 0; r < NR; ++r) w[r] = (__m512bh)_mm512_load_si512(tile + p * NR + r);
    for (int m = 0; m < MR; ++m) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32((int)x[m * ldx + p]);
      for (int r = 0; r < NR; ++r) acc[0][m][r] = _mm512_dpbf16_ps(acc[0][m][r], xb, w[r]);
    }
  }
  for (int u = 1; u < U; ++u)
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < NR; ++r) acc[0][m][r] = _mm512_add_ps(acc[0][m][r], acc[u][m][r]);
  // rows outer, scales/zeros of all NR vectors held in registers: the accumulators are consumed
  // in place (the other order made the compiler spill all of them around the loop)
  __m512 sv[NR], zv[NR];
  for (int r = 0; r < NR; ++r) sv[r] = _mm512_loadu_ps(s + r * 16), zv[r] = _mm512_loadu_ps(zc + r * 16);
  for (int m = 0; m < MR; ++m) {
    const __m512 xs = _mm512_set1_ps(xsum[(m0 + m) * nc + c]);
    for (int r = 0; r < NR; ++r) {
      float* yp = y + (m0 + m) * 16 * NR + r * 16;
      const __m512 t = _mm512_fnmadd_ps(zv[r], xs, acc[0][m][r]);
      _mm512_storeu_ps(yp, _mm512_fmadd_ps(sv[r], t, _mm512_loadu_ps(yp)));
    }
  }
}

// The scales/zeros of this thread's next super-block (DpArgs::pf_side), spread evenly over `steps`
// calls of step() so the lines trickle in beside the code stream.
struct SidePrefetch {
  const char* p[2];
  int64_t left[2], per_step;
  SidePrefetch(const DpArgs& a, int64_t steps) {
    steps = steps > 0 ? steps : 1;
    for (int r = 0; r < 2; ++r) p[r] = a.pf_side[r], left[r] = a.pf_side_lines[r];
    per_step = (left[0] + left[1] + steps - 1) / steps;
  }
  void step() {
    for (int64_t i = 0; i < per_step; ++i) {
      const int r = left[0] > 0 ? 0 : 1;
      if (left[r] <= 0) return;
      _mm_prefetch(p[r], _MM_HINT_T0);
      p[r] += 64, --left[r];
    }
  }
};

template <int NR, int MR, class Dq>
void dp_rows(const DpArgs& a, const __m512i* tile, int64_t kt, int64_t kn, int64_t m0, Dq& dq, SidePrefetch& side) {
  for (int64_t c0 = 0; c0 < kn; c0 += a.C) {  // chunks of this tile (kt is a multiple of C)
    side.step();
    const int64_t cn = kn - c0 < a.C ? kn - c0 : a.C;
    const int64_t c = (kt + c0) / a.C, g = (kt + c0) / a.G;
    dp_chunk<MR, NR>(a, tile + (c0 / 2) * NR, (cn + 1) / 2, a.x + m0 * a.ldx + (kt + c0) / 2, m0, c,
                     a.s + g * 16 * NR, a.zc + g * 16 * NR, dq);
  }
}

// Few rows (Mt <= kDpDirectMaxM): no tile. The codes of both blocks are unpacked in registers 8
// features at a time and used at once, so each code byte costs one load and ~2 vector ops
// (the tile would add a store and a reload per pair vector, more than the few rows of work).
// A = independent accumulators per (row, vector): the 4 pair vectors of 8 features go to
// A different chains, so MR * NR * A >= 8 chains hide the vdpbf16ps latency.

template <int B, int MR, int NR>
void dp_direct(const DpArgs& a, const Dp4Idx& ix) {
  const int64_t L = 16 * a.nr;
  constexpr int RB = 2 * B;
  constexpr int A = MR * NR >= 8 ? 1 : (MR * NR >= 4 ? 2 : 4);
  const float off = quant_matmul::dp_code_offset(B);
  SidePrefetch side(a, a.K / 8);  // one step per 8 features
  for (int64_t k0 = 0, c = 0; k0 < a.K; k0 += a.C, ++c) {
    const int64_t kn = a.K - k0 < a.C ? a.K - k0 : a.C, g = k0 / a.G;
    const uint32_t* x = a.x + k0 / 2;
    __m512 acc[A][MR][NR];
    for (int u = 0; u < A; ++u)
      for (int m = 0; m < MR; ++m)
        for (int r = 0; r < NR; ++r) acc[u][m][r] = _mm512_setzero_ps();
    int64_t k = 0;
    if constexpr (B == 4) {
      for (; k + 8 <= kn; k += 8) {
        __m512i w[NR][4];
        for (int r = 0; r < NR; ++r) {
          const uint8_t* rec = a.codes[r] + (k0 + k) * RB;
          _mm_prefetch((const char*)rec + kDpPrefetch, _MM_HINT_T0);
          dp_unpack4x8(rec, w[r], 1, ix);
        }
        side.step();
        for (int j = 0; j < 4; ++j)
          for (int m = 0; m < MR; ++m) {
            const __m512bh xb = (__m512bh)_mm512_set1_epi32((int)x[m * a.ldx + k / 2 + j]);
            for (int r = 0; r < NR; ++r) acc[j % A][m][r] = _mm512_dpbf16_ps(acc[j % A][m][r], xb, (__m512bh)w[r][j]);
          }
      }
    }
    for (; k < kn; k += 2) {  // pair by pair (other bit widths, tails)
      __m512bh w[NR];
      for (int r = 0; r < NR; ++r) {
        const uint8_t* rec = a.codes[r] + (k0 + k) * RB;
        if (k % 8 == 0) _mm_prefetch((const char*)rec + kDpPrefetch, _MM_HINT_T0);
        if (k % 8 == 0 && r == 0) side.step();
        const VF lo = add(unpack<B>(rec, 0), set1(off));
        const VF hi = k + 1 < kn ? add(unpack<B>(rec + RB, 0), set1(off)) : set1(off);
        w[r] = (__m512bh)dp_pair_generic(lo, hi);
      }
      for (int m = 0; m < MR; ++m) {
        const __m512bh xb = (__m512bh)_mm512_set1_epi32((int)x[m * a.ldx + k / 2]);
        for (int r = 0; r < NR; ++r) acc[0][m][r] = _mm512_dpbf16_ps(acc[0][m][r], xb, w[r]);
      }
    }
    for (int u = 1; u < A; ++u)
      for (int m = 0; m < MR; ++m)
        for (int r = 0; r < NR; ++r) acc[0][m][r] = _mm512_add_ps(acc[0][m][r], acc[u][m][r]);
    for (int r = 0; r < NR; ++r) {
      const __m512 sv = _mm512_loadu_ps(a.s + g * L + r * 16), zv = _mm512_loadu_ps(a.zc + g * L + r * 16);
      for (int m = 0; m < MR; ++m) {
        float* yp = a.y + m * L + r * 16;
        const __m512 t = _mm512_fnmadd_ps(zv, _mm512_set1_ps(a.xsum[m * a.nc + c]), acc[0][m][r]);
        _mm512_storeu_ps(yp, _mm512_fmadd_ps(sv, t, _mm512_loadu_ps(yp)));
      }
    }
  }
}

// Scales and zeros (+ off) of the super-block's rows, from the logical [row][g] layout to
// [g][16 * NR] lanes: 16 rows x 16 groups per register transpose (contiguous loads; a scalar
// loop or AVX-512 gathers cost ~2 us per super-block, a third of a decode step's work on it).
template <int NR>
void dp_gather_scales(const DpArgs& a) {
  const int64_t L = 16 * NR;
  const __m512 offv = _mm512_set1_ps(a.off);
  for (int r = 0; r < NR; ++r) {
    const float* srow[16];
    const uint8_t* zrow[16];
    for (int l = 0; l < 16; ++l) {
      const int64_t row = r * 16 + l < a.nv ? r * 16 + l : a.nv - 1;  // padded rows: never written
      srow[l] = a.s_rows + row * a.ng;
      zrow[l] = a.z_rows ? a.z_rows + row * a.ng : nullptr;
    }
    for (int64_t g0 = 0; g0 < a.ng; g0 += 16) {
      const int64_t gn = a.ng - g0 < 16 ? a.ng - g0 : 16;
      const __mmask16 km = (__mmask16)((1u << gn) - 1u);
      __m512 v[16];
      for (int l = 0; l < 16; ++l) v[l] = _mm512_maskz_loadu_ps(km, srow[l] + g0);
      transpose16(v);
      for (int64_t j = 0; j < gn; ++j) _mm512_storeu_ps(a.s + (g0 + j) * L + r * 16, v[j]);
      if (a.z_rows) {
        for (int l = 0; l < 16; ++l)
          v[l] = _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(km, zrow[l] + g0))), offv);
        transpose16(v);
        for (int64_t j = 0; j < gn; ++j) _mm512_storeu_ps(a.zc + (g0 + j) * L + r * 16, v[j]);
      } else {
        for (int64_t j = 0; j < gn; ++j) _mm512_storeu_ps(a.zc + (g0 + j) * L + r * 16, _mm512_set1_ps(a.zsym_off));
      }
    }
  }
}

template <int B, int NR>
void dp_b(const DpArgs& a) {
  static const Dp4Idx ix;
  __m512i* tile = (__m512i*)a.tile;
  dp_gather_scales<NR>(a);
  for (int64_t i = 0; i < a.Mt * 16 * NR; ++i) a.y[i] = 0.0f;
  if (a.Mt <= kDpDirectMaxM) {
    switch (a.Mt) {
      case 1: dp_direct<B, 1, NR>(a, ix); break;
      case 2: dp_direct<B, 2, NR>(a, ix); break;
      case 3: dp_direct<B, 3, NR>(a, ix); break;
      default: dp_direct<B, 4, NR>(a, ix); break;
    }
    return;
  }
  // Tiles of kt_step features (whole chunks), double-buffered: tile t is consumed from tile[t % 2]
  // while tile t + 1 is dequantised into the other half (DqStream, interleaved with the dp loop).
  const int64_t kt_step = a.C * (kDpKTile / a.C > 0 ? kDpKTile / a.C : 1);
  const int64_t half = kt_step / 2 * NR;  // 64-byte vectors per tile buffer
  constexpr int MR = 8;
  const int64_t chunks = (kt_step + a.C - 1) / a.C, rem = a.Mt % MR;
  // DqStream::step calls per tile (dq_every), to spread the next tile's units evenly
  const int64_t steps = (a.Mt / MR) * (kt_step / 2 / dq_every<MR, NR>()) +
                        (rem ? kt_step / 2 / (rem >= 4 ? dq_every<4, NR>() : dq_every<1, NR>()) : 0);
  SidePrefetch side(a, ((a.K + kt_step - 1) / kt_step) * ((a.Mt + MR - 1) / MR) * chunks);
  DqStream<B, NR> dq;
  dq.start(a, tile, 0, a.K < kt_step ? a.K : kt_step, 1, ix);
  dq.finish();
  for (int64_t kt = 0, t = 0; kt < a.K; kt += kt_step, ++t) {
    const int64_t kn = a.K - kt < kt_step ? a.K - kt : kt_step;
    const __m512i* cur = tile + (t % 2) * half;
    const int64_t nxt = kt + kt_step;
    if (nxt < a.K)
      dq.start(a, tile + ((t + 1) % 2) * half, nxt, a.K - nxt < kt_step ? a.K - nxt : kt_step, steps, ix);
    int64_t m0 = 0;
    for (; m0 + MR <= a.Mt; m0 += MR) dp_rows<NR, MR>(a, cur, kt, kn, m0, dq, side);
    switch (a.Mt - m0) {
      case 1: dp_rows<NR, 1>(a, cur, kt, kn, m0, dq, side); break;
      case 2: dp_rows<NR, 2>(a, cur, kt, kn, m0, dq, side); break;
      case 3: dp_rows<NR, 3>(a, cur, kt, kn, m0, dq, side); break;
      case 4: dp_rows<NR, 4>(a, cur, kt, kn, m0, dq, side); break;
      case 5: dp_rows<NR, 5>(a, cur, kt, kn, m0, dq, side); break;
      case 6: dp_rows<NR, 6>(a, cur, kt, kn, m0, dq, side); break;
      case 7: dp_rows<NR, 7>(a, cur, kt, kn, m0, dq, side); break;
      default: break;
    }
    dq.finish();  // whatever the steps did not cover (nothing after the last tile: the stream is done)
  }
}

template <int B>
void dp_nr(const DpArgs& a) {
  if (a.nr == 2) dp_b<B, 2>(a); else dp_b<B, 1>(a);
}

void dp_block(const DpArgs& a) {
  switch (a.bits) {
    case 2: dp_nr<2>(a); break;
    case 3: dp_nr<3>(a); break;
    case 8: dp_nr<8>(a); break;
    default: dp_nr<4>(a); break;
  }
}
const CpuKernels kKernels = {gemv_block, gemm_block, lane_rows, dp_block};
#else
const CpuKernels kKernels = {gemv_block, gemm_block, lane_rows, nullptr};
#endif

}  // namespace

const CpuKernels* quant_matmul_kernels() { return &kKernels; }

}  // namespace TTSCALE_CPU_ISA
}  // namespace cpu
}  // namespace ttscale
