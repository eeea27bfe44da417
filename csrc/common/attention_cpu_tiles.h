// Register-blocked CPU micro-kernels of attention shared by paged and sparse paged attention (per-ISA:
// include only from *_cpu.cpp, after common/cpu_simd.h). A "tile" is 4 query rows against up to
// kTileKeys keys given as row pointers (any page layout):
//   qk4: S[r][j] = q_r . k_j (q pre-scaled fp32 rows, or the stored bf16 rows and `scale` on the
//        vdpbf16ps path)                       pv4: O_r += sum_j P[r][j] v_j (fp32 accumulators)
// qk_tile_t / pv_tile on fp32 buffers serve callers that widen a chunk once for many row tiles.
// Kernels call PrefetchStream::step() from their key loops, so a caller can stream the next chunk's
// rows in at the rate the math consumes the current one.
#pragma once
#if !defined(TTSCALE_CPU_ISA)
#error "attention_cpu_tiles.h is only for the per-ISA kernel files (*_cpu.cpp)"
#endif
#include <cstdint>
#include <type_traits>

#include "common/cpu_simd.h"
#include "common/dtype.h"

namespace ttscale {
namespace cpu {
namespace TTSCALE_CPU_ISA {
namespace {

constexpr int kTileKeys = 64;  // columns of a score tile S[4][kTileKeys]

// Whether this ISA runs caches of dtype T on vdpbf16ps (bf16 on avx512bf16): qk4 then reads the
// stored queries (qraw) and applies the scale to the sums, pv4 rounds P to bf16, and multi-query
// callers pack chunks into the pair layouts of pack_chunk_bf16pairs.
template <typename T>
constexpr bool bf16_dot() {
#if defined(TTSCALE_CPU_ISA_AVX512BF16)
  return std::is_same<T, bf16_t>::value;
#else
  return false;
#endif
}

// ---- horizontal sums of 8 accumulators: out[i] = hsum(a_i) (AVX2 / generic 2-key tiles)
inline void hsum8(VF a0, VF a1, VF a2, VF a3, VF a4, VF a5, VF a6, VF a7, float* out) {
#if defined(TTSCALE_CPU_ISA_AVX2)
  const __m256 t0 = _mm256_hadd_ps(a0.v, a1.v), t1 = _mm256_hadd_ps(a2.v, a3.v);
  const __m256 t2 = _mm256_hadd_ps(a4.v, a5.v), t3 = _mm256_hadd_ps(a6.v, a7.v);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
#else
  out[0] = hsum(a0); out[1] = hsum(a1); out[2] = hsum(a2); out[3] = hsum(a3);
  out[4] = hsum(a4); out[5] = hsum(a5); out[6] = hsum(a6); out[7] = hsum(a7);
#endif
}

// prefetcht0. Measured on Zen 5 for paged decode (8192 tokens, H=32/8, D=128, KV from DRAM): t0 beat
// t2 (1 thread: 3.9 vs 4.2 ms fp32, 1.7 vs 2.1 ms bf16); with 2 threads the best schedule was 16-key
// chunks, the next chunk streamed over the current one with the lines spread evenly over the tile
// kernels' step() calls (fp32 2.1 ms, bf16 1.0 ms; 2 chunks ahead or 32-64-key chunks: 2.2-2.8 ms
// and 1.1-1.4 ms).
inline void prefetch(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p, 0, 3);
#else
  (void)p;
#endif
}

// Paced software prefetch of the next chunk's K and V rows, in address order (token rows of the
// item's heads, each `span` bytes). The hardware prefetchers do not follow the page table's jumps
// nor the kernels' head-by-head walk over 2-4 KiB token rows, so the next chunk is fetched by hand;
// issuing it as one burst stalls the core once the miss buffers fill (the burst then runs serially
// with the math: ~3x slower decode), so the kernels call step() from their inner loops and the lines
// trickle out at about the rate the math consumes them.
struct PrefetchStream {
  const char* k[kTileKeys];
  const char* v[kTileKeys];
  int n = 0, row = 0;
  int64_t span = 0, off = 0;
  int per_step = 1;  // lines of K (and of V) per step()
  inline void step() {
    int left = per_step;
    while (left > 0 && row < n) {
      // the rest of this row in one tight loop: per line pair two prefetches and a pointer bump
      const char* kr = k[row] + off;
      const char* vr = v[row] + off;
      const int64_t avail = (span - off + 63) >> 6;
      const int take = left < avail ? left : (int)avail;
      if (take <= 0) { off = 0; ++row; continue; }  // empty row: drain() must always make progress
      for (int i = 0; i < take; ++i) {
        prefetch(kr + 64 * i);
        prefetch(vr + 64 * i);
      }
      left -= take;
      off += 64 * (int64_t)take;
      if (off >= span) { off = 0; ++row; }
    }
  }
  inline void drain() { while (row < n) step(); }
  // Rewind to the first row and spread the n rows' lines evenly over `calls` step() calls.
  inline void pace(int64_t calls) {
    row = 0;
    off = 0;
    const int64_t lines = (int64_t)n * ((span + 63) / 64);
    const int64_t per = (lines + calls - 1) / (calls > 0 ? calls : 1);
    per_step = per > 1 ? (int)per : 1;
  }
};

// S[r][j] = q_r . k_j for 4 rows x nk keys (nk <= kTileKeys), 2 keys at a time: 8 accumulators,
// 2 key loads + 4 query loads per 8 FMAs. Rows past nr alias row 0 (results unused).
template <typename KT, int D>
inline void qk_tile(const float* const* q, const KT* const* kp, int nk, float (*S)[kTileKeys], PrefetchStream* pf) {
  const float *q0 = q[0], *q1 = q[1], *q2 = q[2], *q3 = q[3];
  int j = 0;
  for (; j < nk; j += 2) {
    if (pf) pf->step();
    const KT* k0 = kp[j];
    const KT* k1 = kp[j + 1 < nk ? j + 1 : j];
    VF a0 = set1(0.f), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int d = 0; d < D; d += W) {
      const VF x0 = load(k0 + d), x1 = load(k1 + d);
      VF y = load(q0 + d); a0 = fmadd(y, x0, a0); a1 = fmadd(y, x1, a1);
      y = load(q1 + d); a2 = fmadd(y, x0, a2); a3 = fmadd(y, x1, a3);
      y = load(q2 + d); a4 = fmadd(y, x0, a4); a5 = fmadd(y, x1, a5);
      y = load(q3 + d); a6 = fmadd(y, x0, a6); a7 = fmadd(y, x1, a7);
    }
    float s[8];
    hsum8(a0, a1, a2, a3, a4, a5, a6, a7, s);
    S[0][j] = s[0]; S[1][j] = s[2]; S[2][j] = s[4]; S[3][j] = s[6];
    if (j + 1 < nk) { S[0][j + 1] = s[1]; S[1][j + 1] = s[3]; S[2][j + 1] = s[5]; S[3][j + 1] = s[7]; }
  }
}

// The same scores from a transposed fp32 key block kT[d][j] (row stride kTileKeys), as a GEMM
// micro-kernel: 4 rows x 2W keys, 8 accumulators, per d 2 key loads + 4 broadcasts for 8 FMAs, no
// horizontal sums. Used when many row tiles share the chunk (multi-query blocks), where the
// transpose is paid once per chunk. Columns past nk hold garbage and are masked by the caller.
template <int D>
inline void qk_tile_t(const float* const* q, const float* kT, int nk, float (*S)[kTileKeys]) {
  const float *q0 = q[0], *q1 = q[1], *q2 = q[2], *q3 = q[3];
  for (int j0 = 0; j0 < nk; j0 += 2 * W) {
    VF a0 = set1(0.f), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    const float* kc = kT + j0;
    for (int d = 0; d < D; ++d) {
      const VF x0 = load(kc + d * kTileKeys), x1 = load(kc + d * kTileKeys + W);
      VF y = set1(q0[d]); a0 = fmadd(y, x0, a0); a1 = fmadd(y, x1, a1);
      y = set1(q1[d]); a2 = fmadd(y, x0, a2); a3 = fmadd(y, x1, a3);
      y = set1(q2[d]); a4 = fmadd(y, x0, a4); a5 = fmadd(y, x1, a5);
      y = set1(q3[d]); a6 = fmadd(y, x0, a6); a7 = fmadd(y, x1, a7);
    }
    store(S[0] + j0, a0); store(S[0] + j0 + W, a1); store(S[1] + j0, a2); store(S[1] + j0 + W, a3);
    store(S[2] + j0, a4); store(S[2] + j0 + W, a5); store(S[3] + j0, a6); store(S[3] + j0 + W, a7);
  }
}

// O_r += sum_j P[r][j] v_j for 4 rows, 2 vectors of D at a time: 8 accumulators held in registers
// across all nk keys, 2 value loads + 4 broadcasts per 8 FMAs.
template <typename VT, int D>
inline void pv_tile(float* const* o, const float (*P)[kTileKeys], const VT* const* vp, int nk, PrefetchStream* pf) {
  float *o0 = o[0], *o1 = o[1], *o2 = o[2], *o3 = o[3];
  for (int d = 0; d < D; d += 2 * W) {
    VF c0 = load(o0 + d), c1 = load(o0 + d + W), c2 = load(o1 + d), c3 = load(o1 + d + W);
    VF c4 = load(o2 + d), c5 = load(o2 + d + W), c6 = load(o3 + d), c7 = load(o3 + d + W);
    for (int j = 0; j < nk; ++j) {
      if (pf) pf->step();
      const VT* v = vp[j];
      const VF x0 = load(v + d), x1 = load(v + d + W);
      VF p = set1(P[0][j]); c0 = fmadd(p, x0, c0); c1 = fmadd(p, x1, c1);
      p = set1(P[1][j]); c2 = fmadd(p, x0, c2); c3 = fmadd(p, x1, c3);
      p = set1(P[2][j]); c4 = fmadd(p, x0, c4); c5 = fmadd(p, x1, c5);
      p = set1(P[3][j]); c6 = fmadd(p, x0, c6); c7 = fmadd(p, x1, c7);
    }
    store(o0 + d, c0); store(o0 + d + W, c1); store(o1 + d, c2); store(o1 + d + W, c3);
    store(o2 + d, c4); store(o2 + d + W, c5); store(o3 + d, c6); store(o3 + d + W, c7);
  }
}

#if defined(TTSCALE_CPU_ISA_AVX512)
// ---- AVX-512 decode micro-kernels (few rows per KV head: decode, GQA groups, short verify blocks).
//
// The generic qk_tile above ends every 2 keys x 4 rows with 8 full horizontal sums; with 16 lanes a
// horizontal sum costs about as much as the 8 FMAs of a D=128 dot product, so it halved the rate.
// Here a block is 4 rows x 4 keys = 16 accumulators (plus 4 key vectors and 1 query vector in
// registers), and the 16 sums are finished together by a transpose-and-add tree (45 shuffles/adds
// for 16 dot products) whose result lanes come out row-major: lane 4*r + j = S[r][j].

// reduce16: a[4*j + r] -> lane 4*r + j = hsum(a[4*j + r]).
//  level 1 (pairs A,B):  [A0 A1 B0 B1] + [A2 A3 B2 B3]        (128-bit lanes)
//  level 2 (pairs P,Q):  [P0 P2 Q0 Q2] + [P1 P3 Q1 Q3]  -> t_n: 128-bit lane k holds 4 partials of a[4n+k]
//  level 3: 4x4 transpose-add inside every 128-bit lane -> lane (k, n) = sum a[4n+k]
inline __m512 reduce16(const __m512* a) {
  __m512 s[8];
  for (int m = 0; m < 8; ++m)
    s[m] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * m], a[2 * m + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(a[2 * m], a[2 * m + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  __m512 t[4];
  for (int n = 0; n < 4; ++n)
    t[n] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * n], s[2 * n + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(s[2 * n], s[2 * n + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 v01 = _mm512_add_ps(_mm512_unpacklo_ps(t[0], t[1]), _mm512_unpackhi_ps(t[0], t[1]));
  const __m512 v23 = _mm512_add_ps(_mm512_unpacklo_ps(t[2], t[3]), _mm512_unpackhi_ps(t[2], t[3]));
  const __m512d a01 = _mm512_castps_pd(v01), a23 = _mm512_castps_pd(v23);
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a01, a23)), _mm512_castpd_ps(_mm512_unpackhi_pd(a01, a23)));
}

// S[r][j .. j+3] = 128-bit lane r of x, times `scale`. Columns past nk get garbage (masked by the
// caller); j + 4 <= kTileKeys always holds because j is a multiple of 4 below nk <= kTileKeys.
inline void store_s4x4(__m512 x, float scale, float (*S)[kTileKeys], int j) {
  x = _mm512_mul_ps(x, _mm512_set1_ps(scale));
  _mm_storeu_ps(S[0] + j, _mm512_castps512_ps128(x));
  _mm_storeu_ps(S[1] + j, _mm512_extractf32x4_ps(x, 1));
  _mm_storeu_ps(S[2] + j, _mm512_extractf32x4_ps(x, 2));
  _mm_storeu_ps(S[3] + j, _mm512_extractf32x4_ps(x, 3));
}

// S[r][j] = q_r . k_j (q already scaled), 4 rows x 4 keys per block; keys past nk alias the last one.
template <typename KT, int D>
inline void qk_tile4(const float* const* q, const KT* const* kp, int nk, float (*S)[kTileKeys], PrefetchStream* pf) {
  for (int j = 0; j < nk; j += 4) {
    if (pf) pf->step();
    const KT* k[4];
    for (int i = 0; i < 4; ++i) k[i] = kp[j + i < nk ? j + i : nk - 1];
    __m512 a[16];
    for (int i = 0; i < 16; ++i) a[i] = _mm512_setzero_ps();
    for (int d = 0; d < D; d += W) {
      const __m512 x0 = load(k[0] + d).v, x1 = load(k[1] + d).v, x2 = load(k[2] + d).v, x3 = load(k[3] + d).v;
      for (int r = 0; r < 4; ++r) {
        const __m512 y = _mm512_loadu_ps(q[r] + d);
        a[r] = _mm512_fmadd_ps(y, x0, a[r]);
        a[4 + r] = _mm512_fmadd_ps(y, x1, a[4 + r]);
        a[8 + r] = _mm512_fmadd_ps(y, x2, a[8 + r]);
        a[12 + r] = _mm512_fmadd_ps(y, x3, a[12 + r]);
      }
    }
    store_s4x4(reduce16(a), 1.0f, S, j);
  }
}

#if defined(TTSCALE_CPU_ISA_AVX512BF16)
// bf16 cache: the dot products run on vdpbf16ps straight from the stored bf16 queries and keys (each
// bf16 x bf16 product is exact in fp32, accumulation in fp32), so keys are never widened; the
// softmax scale is applied to the finished sums. 32 elements per instruction.
template <int D>
inline void qk_tile4_bf16dot(const bf16_t* const* q, const bf16_t* const* kp, int nk, float scale,
                             float (*S)[kTileKeys], PrefetchStream* pf) {
  for (int j = 0; j < nk; j += 4) {
    if (pf) pf->step();
    const bf16_t* k[4];
    for (int i = 0; i < 4; ++i) k[i] = kp[j + i < nk ? j + i : nk - 1];
    __m512 a[16];
    for (int i = 0; i < 16; ++i) a[i] = _mm512_setzero_ps();
    for (int d = 0; d < D; d += 32) {
      const __m512bh x0 = (__m512bh)_mm512_loadu_si512(k[0] + d), x1 = (__m512bh)_mm512_loadu_si512(k[1] + d);
      const __m512bh x2 = (__m512bh)_mm512_loadu_si512(k[2] + d), x3 = (__m512bh)_mm512_loadu_si512(k[3] + d);
      for (int r = 0; r < 4; ++r) {
        const __m512bh y = (__m512bh)_mm512_loadu_si512(q[r] + d);
        a[r] = _mm512_dpbf16_ps(a[r], y, x0);
        a[4 + r] = _mm512_dpbf16_ps(a[4 + r], y, x1);
        a[8 + r] = _mm512_dpbf16_ps(a[8 + r], y, x2);
        a[12 + r] = _mm512_dpbf16_ps(a[12 + r], y, x3);
      }
    }
    store_s4x4(reduce16(a), scale, S, j);
  }
}

// The 4 rows of P (fp32, columns past nk exact zeros up to the next multiple of 16) as bf16, so that
// (p_j, p_j+1) is one 32-bit word to broadcast.
inline void p_rows_to_bf16(const float (*P)[kTileKeys], int nk, uint16_t (*pb)[kTileKeys]) {
  const int nk16 = (nk + 15) / 16 * 16;
  for (int r = 0; r < 4; ++r)
    for (int j = 0; j < nk16; j += 16)
      _mm256_store_si256((__m256i*)(pb[r] + j), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(P[r] + j)));
}

// c[4r + u] += (p_r,j, p_r,j+1) . x_u for the 4 rows: four value-pair vectors x_u times each row's
// broadcast weight pair.
inline void dp_pairs_4rows(__m512* c, const uint16_t (*pb)[kTileKeys], int j, __m512bh x0, __m512bh x1, __m512bh x2,
                           __m512bh x3) {
  for (int r = 0; r < 4; ++r) {
    uint32_t pair;
    __builtin_memcpy(&pair, pb[r] + j, 4);
    const __m512bh w = (__m512bh)_mm512_set1_epi32((int)pair);
    c[4 * r] = _mm512_dpbf16_ps(c[4 * r], x0, w);
    c[4 * r + 1] = _mm512_dpbf16_ps(c[4 * r + 1], x1, w);
    c[4 * r + 2] = _mm512_dpbf16_ps(c[4 * r + 2], x2, w);
    c[4 * r + 3] = _mm512_dpbf16_ps(c[4 * r + 3], x3, w);
  }
}

// O_r += sum_j P[r][j] v_j on vdpbf16ps for bf16 caches. The dot product runs over pairs of keys:
// unpack{lo,hi}_epi16(v_j, v_j+1) makes 32-bit (v_j[d], v_j+1[d]) pairs and the weights are the
// broadcast pair (p_j, p_j+1), rounded to bf16 (as flash attention does on GPUs; relative 2^-9 per
// weight, while the normaliser l stays the fp32 sum). The unpacks work inside 128-bit lanes, so a
// block of 32 columns comes out as "lo" = columns 8L+0..3 and "hi" = 8L+4..7 of lane L; the fp32
// accumulators are loaded into and stored back from that order with one permute each way.
// Pass = 64 columns: 4 rows x 2 blocks x (lo, hi) = 16 accumulators.
template <int D>
inline void pv_tile4_bf16dot(float* const* o, const float (*P)[kTileKeys], const bf16_t* const* vp, int nk,
                             PrefetchStream* pf) {
  alignas(64) uint16_t pb[4][kTileKeys];
  p_rows_to_bf16(P, nk, pb);
  const __m512i to_lo = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
  const __m512i to_hi = _mm512_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  const __m512i from_0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i from_1 = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int d = 0; d < D; d += 64) {
    __m512 c[16];  // c[4 * r + 2 * blk + (0: lo, 1: hi)]
    for (int r = 0; r < 4; ++r)
      for (int blk = 0; blk < 2; ++blk) {
        const __m512 x0 = _mm512_loadu_ps(o[r] + d + 32 * blk), x1 = _mm512_loadu_ps(o[r] + d + 32 * blk + 16);
        c[4 * r + 2 * blk] = _mm512_permutex2var_ps(x0, to_lo, x1);
        c[4 * r + 2 * blk + 1] = _mm512_permutex2var_ps(x0, to_hi, x1);
      }
    for (int j = 0; j < nk; j += 2) {
      if (pf) pf->step();
      const bf16_t* v0 = vp[j] + d;
      const bf16_t* v1 = vp[j + 1 < nk ? j + 1 : j] + d;  // odd tail: weight p_nk is 0
      const __m512i a0 = _mm512_loadu_si512(v0), b0 = _mm512_loadu_si512(v1);
      const __m512i a1 = _mm512_loadu_si512(v0 + 32), b1 = _mm512_loadu_si512(v1 + 32);
      const __m512bh l0 = (__m512bh)_mm512_unpacklo_epi16(a0, b0), h0 = (__m512bh)_mm512_unpackhi_epi16(a0, b0);
      const __m512bh l1 = (__m512bh)_mm512_unpacklo_epi16(a1, b1), h1 = (__m512bh)_mm512_unpackhi_epi16(a1, b1);
      dp_pairs_4rows(c, pb, j, l0, h0, l1, h1);
    }
    for (int r = 0; r < 4; ++r)
      for (int blk = 0; blk < 2; ++blk) {
        const __m512 lo = c[4 * r + 2 * blk], hi = c[4 * r + 2 * blk + 1];
        _mm512_storeu_ps(o[r] + d + 32 * blk, _mm512_permutex2var_ps(lo, from_0, hi));
        _mm512_storeu_ps(o[r] + d + 32 * blk + 16, _mm512_permutex2var_ps(lo, from_1, hi));
      }
  }
}
#endif

// O_r += sum_j P[r][j] v_j, 4 rows x 64 columns per pass (16 accumulators), each value vector loaded
// (and widened) once per pass for all 4 rows.
template <typename VT, int D>
inline void pv_tile4(float* const* o, const float (*P)[kTileKeys], const VT* const* vp, int nk, PrefetchStream* pf) {
  for (int d = 0; d < D; d += 4 * W) {
    __m512 c[16];
    for (int r = 0; r < 4; ++r)
      for (int u = 0; u < 4; ++u) c[4 * r + u] = _mm512_loadu_ps(o[r] + d + u * W);
    for (int j = 0; j < nk; ++j) {
      if (pf) pf->step();
      const VT* v = vp[j];
      const __m512 x0 = load(v + d).v, x1 = load(v + d + W).v, x2 = load(v + d + 2 * W).v, x3 = load(v + d + 3 * W).v;
      for (int r = 0; r < 4; ++r) {
        const __m512 pr = _mm512_set1_ps(P[r][j]);
        c[4 * r] = _mm512_fmadd_ps(pr, x0, c[4 * r]);
        c[4 * r + 1] = _mm512_fmadd_ps(pr, x1, c[4 * r + 1]);
        c[4 * r + 2] = _mm512_fmadd_ps(pr, x2, c[4 * r + 2]);
        c[4 * r + 3] = _mm512_fmadd_ps(pr, x3, c[4 * r + 3]);
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int u = 0; u < 4; ++u) _mm512_storeu_ps(o[r] + d + u * W, c[4 * r + u]);
  }
}
#endif  // TTSCALE_CPU_ISA_AVX512


#if defined(TTSCALE_CPU_ISA_AVX512BF16)
// ---- bf16 multi-query blocks (many row tiles share a chunk: shared-prefix decode, chunked prefill)
// on vdpbf16ps. The chunk is repacked once into "pair" layouts whose 32-bit words are the two bf16
// values one vdpbf16ps lane multiplies:
//   kT2[dp][j] = (k_j[2dp], k_j[2dp+1])    a raw 32-bit word of key row j (a transpose of words)
//   vT2[jp][d] = (v_2jp[d], v_2jp+1[d])    two value rows interleaved element-wise
// and the other operand is broadcast as a pair: (q_r[2dp], q_r[2dp+1]) or (p_r[2jp], p_r[2jp+1]).
// Half the instructions of the fp32 GEMM tiles per flop, no widening of K/V to fp32.
inline void pack_chunk_bf16pairs(const bf16_t* const* kp, const bf16_t* const* vp, int nk, int D, uint32_t* kT2,
                                 uint32_t* vT2) {
  // kT2: 16 keys x 16 words per register transpose (a scalar word-by-word copy was ~5% of a
  // shared-prefix decode); keys past nk repeat the last key (their columns are masked later)
  for (int j0 = 0; j0 < nk; j0 += 16)
    for (int dp0 = 0; dp0 < D / 2; dp0 += 16) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i) {
        const uint32_t* kw = reinterpret_cast<const uint32_t*>(kp[j0 + i < nk ? j0 + i : nk - 1]);
        r[i] = _mm512_castsi512_ps(_mm512_loadu_si512(kw + dp0));
      }
      transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(kT2 + (dp0 + i) * kTileKeys + j0, _mm512_castps_si512(r[i]));
    }
  // interleave pairs of value rows, 32 columns at a time: word i of the result = (a[i], b[i])
  alignas(64) int16_t idx[32];
  for (int i = 0; i < 16; ++i) { idx[2 * i] = (int16_t)i; idx[2 * i + 1] = (int16_t)(32 + i); }
  const __m512i lo_idx = _mm512_load_si512(idx);
  const __m512i hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
  for (int j = 0; j < nk; j += 2) {
    const bf16_t* a = vp[j];
    const bool pair = j + 1 < nk;
    uint32_t* dst = vT2 + (j / 2) * D;
    for (int d = 0; d < D; d += 32) {
      const __m512i x = _mm512_loadu_si512(a + d);
      const __m512i y = pair ? _mm512_loadu_si512(vp[j + 1] + d) : _mm512_setzero_si512();  // odd tail: v = 0
      _mm512_storeu_si512(dst + d, _mm512_permutex2var_epi16(x, lo_idx, y));
      _mm512_storeu_si512(dst + d + 16, _mm512_permutex2var_epi16(x, hi_idx, y));
    }
  }
}

// S[r][j] = scale * q_r . k_j for 4 rows x NV*16 keys from kT2 (4*NV accumulators; per pair of
// columns NV key loads + 4 broadcasts for 4*NV vdpbf16ps). Columns past nk are garbage, masked by
// the caller.
template <int D, int NV>
inline void qk_block_t_bf16dot(const uint32_t* const* q, const uint32_t* kc, __m512 sc, float (*S)[kTileKeys], int j0) {
  __m512 a[4 * NV];
  for (int i = 0; i < 4 * NV; ++i) a[i] = _mm512_setzero_ps();
  for (int dp = 0; dp < D / 2; ++dp) {
    __m512bh x[NV];
    for (int u = 0; u < NV; ++u) x[u] = (__m512bh)_mm512_loadu_si512(kc + dp * kTileKeys + 16 * u);
    for (int r = 0; r < 4; ++r) {
      const __m512bh w = (__m512bh)_mm512_set1_epi32((int)q[r][dp]);
      for (int u = 0; u < NV; ++u) a[NV * r + u] = _mm512_dpbf16_ps(a[NV * r + u], x[u], w);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int u = 0; u < NV; ++u) _mm512_storeu_ps(S[r] + j0 + 16 * u, _mm512_mul_ps(a[NV * r + u], sc));
}

// All nk keys of the chunk: blocks of 64 keys (16 accumulators: enough independent vdpbf16ps chains
// to cover its latency at 2 per cycle; 32-key blocks with 8 chains ran at ~2/3 of that), a last
// block of 32 when at most 32 keys remain.
template <int D>
inline void qk_tile_t_bf16dot(const bf16_t* const* qraw, const uint32_t* kT2, int nk, float scale,
                              float (*S)[kTileKeys]) {
  const uint32_t* q[4];
  for (int r = 0; r < 4; ++r) q[r] = reinterpret_cast<const uint32_t*>(qraw[r]);
  const __m512 sc = _mm512_set1_ps(scale);
  static_assert(kTileKeys % 64 == 0, "64-key blocks");
  for (int j0 = 0; j0 < nk; j0 += 64) {
    if (nk - j0 > 32) qk_block_t_bf16dot<D, 4>(q, kT2 + j0, sc, S, j0);
    else qk_block_t_bf16dot<D, 2>(q, kT2 + j0, sc, S, j0);
  }
}

// O_r += sum_j P[r][j] v_j from vT2, 4 rows x 64 columns per pass (16 accumulators; per pair of keys
// 4 value loads + 4 broadcasts for 16 vdpbf16ps). P is rounded to bf16 (see pv_tile4_bf16dot).
template <int D>
inline void pv_tile_t_bf16dot(float* const* o, const float (*P)[kTileKeys], const uint32_t* vT2, int nk) {
  alignas(64) uint16_t pb[4][kTileKeys];
  p_rows_to_bf16(P, nk, pb);
  for (int d = 0; d < D; d += 64) {
    __m512 c[16];
    for (int r = 0; r < 4; ++r)
      for (int u = 0; u < 4; ++u) c[4 * r + u] = _mm512_loadu_ps(o[r] + d + 16 * u);
    for (int j = 0; j < nk; j += 2) {
      const uint32_t* vr = vT2 + (j / 2) * D + d;
      const __m512bh x0 = (__m512bh)_mm512_loadu_si512(vr), x1 = (__m512bh)_mm512_loadu_si512(vr + 16);
      const __m512bh x2 = (__m512bh)_mm512_loadu_si512(vr + 32), x3 = (__m512bh)_mm512_loadu_si512(vr + 48);
      dp_pairs_4rows(c, pb, j, x0, x1, x2, x3);
    }
    for (int r = 0; r < 4; ++r)
      for (int u = 0; u < 4; ++u) _mm512_storeu_ps(o[r] + d + 16 * u, c[4 * r + u]);
  }
}
#endif  // TTSCALE_CPU_ISA_AVX512BF16

// PrefetchStream::step() calls that qk4 + pv4 of one 4-row tile make over nk keys, per path: a
// caller spreads the next chunk's lines over them (lines per step = ceil(lines / calls)).
template <typename T>
inline int tile_step_calls(int nk, int D) {
  if (bf16_dot<T>()) return (nk + 3) / 4 + (nk + 1) / 2 * (D / 64);
#if defined(TTSCALE_CPU_ISA_AVX512)
  return (nk + 3) / 4 + nk * (D / (4 * W));
#else
  return (nk + 1) / 2 + nk * (D / (2 * W));
#endif
}

// ---- dispatch: the best tile kernel of this ISA for the cache dtype T
// qf: 4 pre-scaled fp32 query rows; qraw: the same 4 rows as stored (used by the bf16 dot path,
// which applies `scale` to the finished sums). Rows past the tile's live rows alias a live one.
template <typename T, int D>
inline void qk4(const float* const* qf, const T* const* qraw, const T* const* kp, int nk, float scale,
                float (*S)[kTileKeys], PrefetchStream* pf) {
  (void)qraw;
  (void)scale;
#if defined(TTSCALE_CPU_ISA_AVX512BF16)
  if (bf16_dot<T>()) {
    qk_tile4_bf16dot<D>(reinterpret_cast<const bf16_t* const*>(qraw), reinterpret_cast<const bf16_t* const*>(kp),
                        nk, scale, S, pf);
    return;
  }
#endif
#if defined(TTSCALE_CPU_ISA_AVX512)
  qk_tile4<T, D>(qf, kp, nk, S, pf);
#else
  qk_tile<T, D>(qf, kp, nk, S, pf);
#endif
}

template <typename T, int D>
inline void pv4(float* const* o, const float (*P)[kTileKeys], const T* const* vp, int nk, PrefetchStream* pf) {
#if defined(TTSCALE_CPU_ISA_AVX512BF16)
  if (bf16_dot<T>()) {
    pv_tile4_bf16dot<D>(o, P, reinterpret_cast<const bf16_t* const*>(vp), nk, pf);
    return;
  }
#endif
#if defined(TTSCALE_CPU_ISA_AVX512)
  pv_tile4<T, D>(o, P, vp, nk, pf);
#else
  pv_tile<T, D>(o, P, vp, nk, pf);
#endif
}

}  // namespace
}  // namespace TTSCALE_CPU_ISA
}  // namespace cpu
}  // namespace ttscale
