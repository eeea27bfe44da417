// Per-ISA CPU primitives for batched sampling (compiled once per ISA; see common/cpu_simd.h).
// The row-level algorithms that use them are described in sampling.h; this file only holds the
// passes over a row: each is one streaming read of V elements, W lanes at a time, with a scalar
// tail. No torch, no std algorithms (their out-of-line copies would be shared across ISAs).
#include "ops/sampling/sampling.h"
#include "common/cpu_simd.h"
#include "common/dispatch.h"

#include <cstdint>
#include <limits>

namespace ttscale {
namespace cpu {
namespace TTSCALE_CPU_ISA {
namespace {

using sampling::CpuKernels;
using sampling::kBlock;
using sampling::kHistBins;
using sampling::RowView;
using sampling::ScoreMap;

template <typename T>
inline VF vscore(const ScoreMap& map, VF v) {
  return map.probs_mode ? v : mul(sub(v, set1(map.m)), set1(map.inv_t));
}
inline VF vmass(const ScoreMap& map, VF s) { return map.probs_mode ? s : exp(s); }
inline float smass(const ScoreMap& map, float s) { return map.probs_mode ? s : exp_scalar(s); }

// Histogram bins of W scores (ScoreMap::bin, W lanes at a time): vbin_store writes them to
// out[0..W); vbin_eq returns the lane mask of scores that fall in `bin`.
#if defined(TTSCALE_CPU_ISA_AVX2)
inline __m256i vbin(const ScoreMap& map, VF s) {
  if (map.probs_mode) {
    const __m256i d = _mm256_srli_epi32(_mm256_sub_epi32(_mm256_set1_epi32((int)map.max_bits), _mm256_castps_si256(s.v)),
                                        sampling::kProbBinShift);
    return _mm256_min_epu32(d, _mm256_set1_epi32(kHistBins - 1));
  }
  __m256 x = _mm256_mul_ps(s.v, _mm256_set1_ps(-(kHistBins / sampling::kHistRange)));
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_setzero_ps()), _mm256_set1_ps((float)(kHistBins - 1)));
  return _mm256_cvttps_epi32(x);
}
inline void vbin_store(const ScoreMap& map, VF s, int32_t* out) { _mm256_storeu_si256((__m256i*)out, vbin(map, s)); }
inline uint32_t vbin_eq(const ScoreMap& map, VF s, int bin) {
  return (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(vbin(map, s), _mm256_set1_epi32(bin))));
}
#elif defined(TTSCALE_CPU_ISA_AVX512)
inline __m512i vbin(const ScoreMap& map, VF s) {
  if (map.probs_mode) {
    const __m512i d = _mm512_srli_epi32(_mm512_sub_epi32(_mm512_set1_epi32((int)map.max_bits), _mm512_castps_si512(s.v)),
                                        sampling::kProbBinShift);
    return _mm512_min_epu32(d, _mm512_set1_epi32(kHistBins - 1));
  }
  __m512 x = _mm512_mul_ps(s.v, _mm512_set1_ps(-(kHistBins / sampling::kHistRange)));
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_setzero_ps()), _mm512_set1_ps((float)(kHistBins - 1)));
  return _mm512_cvttps_epi32(x);
}
inline void vbin_store(const ScoreMap& map, VF s, int32_t* out) { _mm512_storeu_si512(out, vbin(map, s)); }
inline uint32_t vbin_eq(const ScoreMap& map, VF s, int bin) {
  return (uint32_t)_mm512_cmpeq_epi32_mask(vbin(map, s), _mm512_set1_epi32(bin));
}
#else
inline void vbin_store(const ScoreMap& map, VF s, int32_t* out) {
  for (int l = 0; l < W; ++l) out[l] = map.bin(s.v[l]);
}
inline uint32_t vbin_eq(const ScoreMap& map, VF s, int bin) {
  uint32_t m = 0;
  for (int l = 0; l < W; ++l) m |= (uint32_t)(map.bin(s.v[l]) == bin) << l;
  return m;
}
#endif

inline bool is_bad(float v) { return v != v || v == INFINITY; }

template <typename T>
void row_max_t(const T* x, int64_t n, float* out_max, int64_t* out_arg, int64_t* out_bad) {
  // 4 independent max chains hide the max latency; the NaN/+inf test is one movemask per 4 vectors
  VF m0 = set1(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    const VF v0 = load(x + i), v1 = load(x + i + W), v2 = load(x + i + 2 * W), v3 = load(x + i + 3 * W);
    if (bits(mask_or(mask_or(bad(v0), bad(v1)), mask_or(bad(v2), bad(v3))))) break;
    m0 = max(m0, v0); m1 = max(m1, v1); m2 = max(m2, v2); m3 = max(m3, v3);
  }
  float m = hmax(max(max(m0, m1), max(m2, m3)));
  *out_bad = -1;
  for (; i < n; ++i) {
    const float v = to_float(x[i]);
    if (is_bad(v)) {
      *out_bad = i;
      *out_max = m;
      if (out_arg) *out_arg = -1;
      return;
    }
    m = v > m ? v : m;
  }
  *out_max = m;
  if (!out_arg) return;
  // first index of the max: an early-exit pass (on random data it stops half way on average)
  const VF target = set1(m);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const uint32_t b = bits(cmp_eq(load(x + j), target));
    if (b) { *out_arg = j + __builtin_ctz(b); return; }
  }
  for (; j < n; ++j)
    if (to_float(x[j]) == m) { *out_arg = j; return; }
  *out_arg = 0;  // unreachable: m is one of the values
}

template <bool kMasked, typename T>
double row_mass_t(const T* x, int64_t n, const ScoreMap& map, float tau, double* block_cum) {
  // Two independent accumulators per block give the exp polynomial chains room to overlap.
  // Unmasked (tau = -inf) rows skip the compare/select: exp already maps -inf to 0.
  const VF vtau = set1(tau);
  const VF zero = set1(0.0f);
  double total = 0.0;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = b0 + kBlock < n ? b0 + kBlock : n;
    VF acc0 = zero, acc1 = zero;
    int64_t i = b0;
    for (; i + 2 * W <= b1; i += 2 * W) {
      const VF s0 = vscore<T>(map, load(x + i)), s1 = vscore<T>(map, load(x + i + W));
      if (kMasked) {
        acc0 = add(acc0, select(cmp_ge(s0, vtau), vmass(map, s0), zero));
        acc1 = add(acc1, select(cmp_ge(s1, vtau), vmass(map, s1), zero));
      } else {
        acc0 = add(acc0, vmass(map, s0));
        acc1 = add(acc1, vmass(map, s1));
      }
    }
    for (; i + W <= b1; i += W) {
      const VF s0 = vscore<T>(map, load(x + i));
      acc0 = add(acc0, kMasked ? select(cmp_ge(s0, vtau), vmass(map, s0), zero) : vmass(map, s0));
    }
    float tail = 0.0f;
    for (; i < b1; ++i) {
      const float s0 = map.score(to_float(x[i]));
      if (s0 >= tau) tail += smass(map, s0);
    }
    total += (double)hsum(add(acc0, acc1)) + (double)tail;
    if (block_cum) block_cum[b0 / kBlock] = total;
  }
  return total;
}

template <typename T>
void row_hist_t(const T* x, int64_t n, const ScoreMap& map, double* mass, int64_t* count) {
  for (int b = 0; b < kHistBins; ++b) { mass[b] = 0.0; count[b] = 0; }
  int64_t i = 0;
  alignas(64) float mv[W];
  alignas(64) int32_t bv[W];
  for (; i + W <= n; i += W) {
    const VF s = vscore<T>(map, load(x + i));
    // scores, masses and bins W-wide; the scatter-add itself is scalar (no SIMD form before
    // AVX-512CD, and conflicts are common in the top bins)
    store(mv, vmass(map, s));
    vbin_store(map, s, bv);
    for (int l = 0; l < W; ++l) {
      mass[bv[l]] += (double)mv[l];
      count[bv[l]] += 1;
    }
  }
  for (; i < n; ++i) {
    const float s = map.score(to_float(x[i]));
    const int b = map.bin(s);
    mass[b] += (double)smass(map, s);
    count[b] += 1;
  }
}

template <typename T>
int64_t row_collect_bin_t(const T* x, int64_t n, const ScoreMap& map, int bin, float* s_out, int32_t* idx_out,
                          int64_t cap) {
  int64_t c = 0;
  int64_t i = 0;
  alignas(64) float sv[W];
  for (; i + W <= n; i += W) {
    const VF s = vscore<T>(map, load(x + i));
    uint32_t hit = vbin_eq(map, s, bin);
    if (!hit) continue;
    store(sv, s);
    while (hit) {
      const int l = __builtin_ctz(hit);
      hit &= hit - 1;
      if (c == cap) return c;
      s_out[c] = sv[l];
      idx_out[c] = (int32_t)(i + l);
      ++c;
    }
  }
  for (; i < n; ++i) {
    const float s = map.score(to_float(x[i]));
    if (map.bin(s) == bin) {
      if (c == cap) return c;
      s_out[c] = s; idx_out[c] = (int32_t)i; ++c;
    }
  }
  return c;
}

// Min-heap on (value asc, id desc): the root is the worst kept element under the tie rule
// "larger value first, then lower id". A later element replaces the root only if strictly larger,
// which is exactly that rule because elements arrive in id order.
struct HeapEntry { float v; int32_t i; };
inline bool worse(const HeapEntry& a, const HeapEntry& b) { return a.v < b.v || (a.v == b.v && a.i > b.i); }
inline void sift_down(HeapEntry* h, int64_t k, int64_t p) {
  const HeapEntry e = h[p];
  for (;;) {
    int64_t c = 2 * p + 1;
    if (c >= k) break;
    if (c + 1 < k && worse(h[c + 1], h[c])) ++c;
    if (!worse(h[c], e)) break;
    h[p] = h[c];
    p = c;
  }
  h[p] = e;
}

template <typename T>
int64_t row_topk_t(const T* x, int64_t n, int64_t k, float* val_out, int32_t* idx_out, void* scratch) {
  HeapEntry* h = static_cast<HeapEntry*>(scratch);
  for (int64_t i = 0; i < k; ++i) {
    h[i] = {to_float(x[i]), (int32_t)i};
    if (is_bad(h[i].v)) return i;
  }
  for (int64_t p = k / 2 - 1; p >= 0; --p) sift_down(h, k, p);
  float thr = h[0].v;
  int64_t i = k;
  // scalar head until aligned to W for the vector scan
  // one compare per element: "greater than the worst kept value, or unordered (NaN)"
  for (; i + W <= n; i += W) {
    const VF v = load(x + i);
    uint32_t m = bits(cmp_gt_or_nan(v, set1(thr)));
    while (m) {
      const int l = __builtin_ctz(m);
      m &= m - 1;
      const float vl = to_float(x[i + l]);
      if (is_bad(vl)) return i + l;
      if (vl > thr) { h[0] = {vl, (int32_t)(i + l)}; sift_down(h, k, 0); thr = h[0].v; }
    }
  }
  for (; i < n; ++i) {
    const float v = to_float(x[i]);
    if (is_bad(v)) return i;
    if (v > thr) { h[0] = {v, (int32_t)i}; sift_down(h, k, 0); thr = h[0].v; }
  }
  // heap-sort: pop the worst to the back -> best-first order
  for (int64_t end = k - 1; end > 0; --end) {
    const HeapEntry t = h[0]; h[0] = h[end]; h[end] = t;
    sift_down(h, end, 0);
  }
  // h is now ordered best first
  for (int64_t j = 0; j < k; ++j) {
    const HeapEntry e = h[j];
    val_out[j] = e.v;
    idx_out[j] = e.i;
  }
  return -1;
}

template <typename T>
int64_t row_draw_block_t(const T* x, const ScoreMap& map, float tau, int64_t begin, int64_t end, double target) {
  // Masses W at a time with the same vector exp as row_mass (so the running sum tracks the block
  // prefix sums closely), then a sequential double running sum.
  double c = 0.0;
  int64_t last = -1;
  alignas(64) float mv[W];
  const VF vtau = set1(tau), zero = set1(0.0f);
  int64_t i = begin;
  for (; i + W <= end; i += W) {
    const VF sv = vscore<T>(map, load(x + i));
    store(mv, select(cmp_ge(sv, vtau), vmass(map, sv), zero));
    for (int l = 0; l < W; ++l) {
      if (!(mv[l] > 0.0f)) continue;
      c += (double)mv[l];
      last = i + l;
      if (c > target) return last;
    }
  }
  for (; i < end; ++i) {
    const float sc = map.score(to_float(x[i]));
    if (!(sc >= tau)) continue;
    const float ms = smass(map, sc);
    if (!(ms > 0.0f)) continue;
    c += (double)ms;
    last = i;
    if (c > target) return i;
  }
  return last;
}

void row_max(RowView row, float* m, int64_t* arg, int64_t* bad) {
  TT_DISPATCH_FLOAT(row.dtype, T, row_max_t(static_cast<const T*>(row.data), row.n, m, arg, bad))
}
double row_mass(RowView row, ScoreMap map, float tau, double* block_cum) {
  double z = 0.0;
  if (tau == -INFINITY) {
    TT_DISPATCH_FLOAT(row.dtype, T, z = row_mass_t<false>(static_cast<const T*>(row.data), row.n, map, tau, block_cum))
  } else {
    TT_DISPATCH_FLOAT(row.dtype, T, z = row_mass_t<true>(static_cast<const T*>(row.data), row.n, map, tau, block_cum))
  }
  return z;
}
void row_hist(RowView row, ScoreMap map, double* mass, int64_t* count) {
  TT_DISPATCH_FLOAT(row.dtype, T, row_hist_t(static_cast<const T*>(row.data), row.n, map, mass, count))
}
int64_t row_collect_bin(RowView row, ScoreMap map, int bin, float* s_out, int32_t* idx_out, int64_t cap) {
  int64_t c = 0;
  TT_DISPATCH_FLOAT(row.dtype, T, c = row_collect_bin_t(static_cast<const T*>(row.data), row.n, map, bin, s_out, idx_out, cap))
  return c;
}
int64_t row_topk(RowView row, int64_t k, float* val_out, int32_t* idx_out, void* scratch) {
  int64_t bad = -1;
  TT_DISPATCH_FLOAT(row.dtype, T, bad = row_topk_t(static_cast<const T*>(row.data), row.n, k, val_out, idx_out, scratch))
  return bad;
}
int64_t row_draw_block(RowView row, ScoreMap map, float tau, int64_t begin, int64_t end, double target) {
  int64_t tok = -1;
  TT_DISPATCH_FLOAT(row.dtype, T, tok = row_draw_block_t(static_cast<const T*>(row.data), map, tau, begin, end, target))
  return tok;
}

const CpuKernels kKernels = {row_max, row_mass, row_hist, row_collect_bin, row_topk, row_draw_block};

}  // namespace

const CpuKernels* sampling_kernels() { return &kKernels; }

}  // namespace TTSCALE_CPU_ISA
}  // namespace cpu
}  // namespace ttscale
