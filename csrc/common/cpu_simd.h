// Fixed-width fp32 vectors for the per-ISA CPU kernels (include only from *_cpu.cpp).
//
// The same kernel source is compiled three times (CMakeLists.txt): with -mavx512* (16 lanes),
// with -mavx2 -mfma -mf16c (8 lanes), and with no flags (8 lanes of plain C++ that the compiler
// vectorises to SSE2 / NEON). Everything here lives in ttscale::cpu::<isa>::(anonymous), so the
// copies never share a symbol and the linker cannot swap an AVX-512 body into the AVX2 path.
//
// Interface (VF = W fp32 lanes, VM = lane mask):
//   load(const float*/half_t*/bf16_t*)  widen W elements to fp32      set1(x)   store(float*, v)
//   add sub mul fmadd(a,b,c)=a*b+c max   hmax hsum                     exp(x) (0 for x < -87.3)
//   cmp_ge cmp_gt cmp_eq cmp_gt_or_nan -> VM           bits(VM) -> uint32 lane bits  select(m, a, b)
//   bad(x): lanes that are NaN or +inf      mask_or(m1, m2)
#pragma once
#if !defined(TTSCALE_CPU_ISA)
#error "cpu_simd.h is only for the per-ISA kernel files (*_cpu.cpp)"
#endif

#include <cmath>
#include <cstdint>
#include "common/dtype.h"
#if defined(TTSCALE_CPU_ISA_AVX2) || defined(TTSCALE_CPU_ISA_AVX512)
#include <immintrin.h>
#endif

namespace ttscale {
namespace cpu {
namespace TTSCALE_CPU_ISA {
namespace {

// Cephes expf: exp(x) = 2^n * p(r), n = round(x / ln2), r = x - n ln2 (two-part ln2), p of degree 7.
// Relative error ~1e-7 over the whole range; returns exactly 0 below ln(FLT_MIN) so that
// masked (-inf) logits get zero mass, and +inf is clamped (callers reject +inf inputs).
constexpr float kExpHi = 88.3762626647949f;
constexpr float kExpLo = -87.3365447505531f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500E-4f, kP1 = 1.3981999507E-3f, kP2 = 8.3334519073E-3f,
                kP3 = 4.1665795894E-2f, kP4 = 1.6666665459E-1f, kP5 = 5.0000001201E-1f;

#if defined(__FMA__) || defined(__aarch64__)
inline float fma_(float a, float b, float c) { return std::fma(a, b, c); }
#else
inline float fma_(float a, float b, float c) { return a * b + c; }  // no FMA unit: avoid libm's soft fma
#endif

inline float exp_scalar(float x) {
  if (!(x >= kExpLo)) return 0.0f;  // also NaN -> 0; callers exclude NaN beforehand
  x = x < kExpHi ? x : kExpHi;
  const float n = std::nearbyint(x * kLog2e);
  float r = fma_(n, -kLn2Hi, x);
  r = fma_(n, -kLn2Lo, r);
  float p = kP0;
  p = fma_(p, r, kP1); p = fma_(p, r, kP2); p = fma_(p, r, kP3);
  p = fma_(p, r, kP4); p = fma_(p, r, kP5);
  const float y = fma_(p * r, r, r) + 1.0f;
  return y * bits_to_float((uint32_t)((int32_t)n + 127) << 23);
}

#if defined(TTSCALE_CPU_ISA_AVX512)
constexpr int W = 16;
struct VF { __m512 v; };
using VM = __mmask16;
inline VF load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline VF load(const half_t* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p))}; }
inline VF load(const bf16_t* p) {
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16))};
}
inline VF set1(float x) { return {_mm512_set1_ps(x)}; }
inline void store(float* p, VF a) { _mm512_storeu_ps(p, a.v); }
inline VF add(VF a, VF b) { return {_mm512_add_ps(a.v, b.v)}; }
inline VF sub(VF a, VF b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline VF mul(VF a, VF b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline VF fmadd(VF a, VF b, VF c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline VF max(VF a, VF b) { return {_mm512_max_ps(a.v, b.v)}; }
inline VM cmp_ge(VF a, VF b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_GE_OQ); }
inline VM cmp_gt(VF a, VF b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ); }
inline VM cmp_gt_or_nan(VF a, VF b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_NLE_UQ); }
inline VM cmp_eq(VF a, VF b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_EQ_OQ); }
inline VM bad(VF a) { return _mm512_cmp_ps_mask(a.v, _mm512_set1_ps(INFINITY), _CMP_NLT_UQ); }  // NaN or +inf
inline VM mask_or(VM a, VM b) { return a | b; }
inline uint32_t bits(VM m) { return (uint32_t)m; }
inline VF select(VM m, VF a, VF b) { return {_mm512_mask_blend_ps(m, b.v, a.v)}; }
inline float hmax(VF a) { return _mm512_reduce_max_ps(a.v); }
inline float hsum(VF a) { return _mm512_reduce_add_ps(a.v); }
inline VF exp(VF x) {
  const __m512 xin = x.v;
  __m512 xc = _mm512_min_ps(xin, _mm512_set1_ps(kExpHi));
  xc = _mm512_max_ps(xc, _mm512_set1_ps(kExpLo));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kP0);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP1)); p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP3)); p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP5));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  const __m512 out = _mm512_mul_ps(y, _mm512_castsi512_ps(e));
  return {_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(xin, _mm512_set1_ps(kExpLo), _CMP_GE_OQ), out)};
}

#elif defined(TTSCALE_CPU_ISA_AVX2)
constexpr int W = 8;
struct VF { __m256 v; };
struct VM { __m256 m; };
inline VF load(const float* p) { return {_mm256_loadu_ps(p)}; }
inline VF load(const half_t* p) { return {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p))}; }
inline VF load(const bf16_t* p) {
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16))};
}
inline VF set1(float x) { return {_mm256_set1_ps(x)}; }
inline void store(float* p, VF a) { _mm256_storeu_ps(p, a.v); }
inline VF add(VF a, VF b) { return {_mm256_add_ps(a.v, b.v)}; }
inline VF sub(VF a, VF b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline VF mul(VF a, VF b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline VF fmadd(VF a, VF b, VF c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline VF max(VF a, VF b) { return {_mm256_max_ps(a.v, b.v)}; }
inline VM cmp_ge(VF a, VF b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_GE_OQ)}; }
inline VM cmp_gt(VF a, VF b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ)}; }
inline VM cmp_gt_or_nan(VF a, VF b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_NLE_UQ)}; }
inline VM cmp_eq(VF a, VF b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_EQ_OQ)}; }
inline VM bad(VF a) { return {_mm256_cmp_ps(a.v, _mm256_set1_ps(INFINITY), _CMP_NLT_UQ)}; }  // NaN or +inf
inline VM mask_or(VM a, VM b) { return {_mm256_or_ps(a.m, b.m)}; }
inline uint32_t bits(VM m) { return (uint32_t)_mm256_movemask_ps(m.m); }
inline VF select(VM m, VF a, VF b) { return {_mm256_blendv_ps(b.v, a.v, m.m)}; }
inline float hmax(VF a) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}
inline float hsum(VF a) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}
inline VF exp(VF x) {
  const __m256 xin = x.v;
  __m256 xc = _mm256_min_ps(xin, _mm256_set1_ps(kExpHi));
  xc = _mm256_max_ps(xc, _mm256_set1_ps(kExpLo));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kP0);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP1)); p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP3)); p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP5));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 out = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  return {_mm256_and_ps(out, _mm256_cmp_ps(xin, _mm256_set1_ps(kExpLo), _CMP_GE_OQ))};
}

#else  // generic: 8 lanes of portable C++ (auto-vectorised where the target allows)
constexpr int W = 8;
struct VF { float v[W]; };
struct VM { uint32_t b; };
template <typename T>
inline VF load(const T* p) { VF r; for (int i = 0; i < W; ++i) r.v[i] = to_float(p[i]); return r; }
inline VF set1(float x) { VF r; for (int i = 0; i < W; ++i) r.v[i] = x; return r; }
inline void store(float* p, VF a) { for (int i = 0; i < W; ++i) p[i] = a.v[i]; }
inline VF add(VF a, VF b) { for (int i = 0; i < W; ++i) a.v[i] += b.v[i]; return a; }
inline VF sub(VF a, VF b) { for (int i = 0; i < W; ++i) a.v[i] -= b.v[i]; return a; }
inline VF mul(VF a, VF b) { for (int i = 0; i < W; ++i) a.v[i] *= b.v[i]; return a; }
inline VF fmadd(VF a, VF b, VF c) { for (int i = 0; i < W; ++i) a.v[i] = a.v[i] * b.v[i] + c.v[i]; return a; }
inline VF max(VF a, VF b) { for (int i = 0; i < W; ++i) a.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i]; return a; }
inline VM cmp_ge(VF a, VF b) { uint32_t m = 0; for (int i = 0; i < W; ++i) m |= (uint32_t)(a.v[i] >= b.v[i]) << i; return {m}; }
inline VM cmp_gt(VF a, VF b) { uint32_t m = 0; for (int i = 0; i < W; ++i) m |= (uint32_t)(a.v[i] > b.v[i]) << i; return {m}; }
inline VM cmp_gt_or_nan(VF a, VF b) { uint32_t m = 0; for (int i = 0; i < W; ++i) m |= (uint32_t)!(a.v[i] <= b.v[i]) << i; return {m}; }
inline VM cmp_eq(VF a, VF b) { uint32_t m = 0; for (int i = 0; i < W; ++i) m |= (uint32_t)(a.v[i] == b.v[i]) << i; return {m}; }
inline VM bad(VF a) {
  uint32_t m = 0;
  for (int i = 0; i < W; ++i) m |= (uint32_t)!(a.v[i] < INFINITY) << i;  // NaN or +inf
  return {m};
}
inline VM mask_or(VM a, VM b) { return {a.b | b.b}; }
inline uint32_t bits(VM m) { return m.b; }
inline VF select(VM m, VF a, VF b) { for (int i = 0; i < W; ++i) if (m.b >> i & 1u) b.v[i] = a.v[i]; return b; }
inline float hmax(VF a) { float r = a.v[0]; for (int i = 1; i < W; ++i) r = a.v[i] > r ? a.v[i] : r; return r; }
inline float hsum(VF a) { float r = 0; for (int i = 0; i < W; ++i) r += a.v[i]; return r; }
inline VF exp(VF x) { for (int i = 0; i < W; ++i) x.v[i] = exp_scalar(x.v[i]); return x; }
#endif

// Whether D elements (a multiple of W; fp32 / fp16 / bf16) hold a NaN or an infinity: bad() finds
// NaN and +inf, bad(-x) adds -inf. Used by the attention kernels to find value rows that a masked
// weight of 0 must not multiply.
template <typename T>
inline bool row_nonfinite(const T* p, int64_t D) {
  const VF zero = set1(0.0f);
  VM b = cmp_gt(zero, zero);  // all false
  for (int64_t d = 0; d < D; d += W) {
    const VF x = load(p + d);
    b = mask_or(b, mask_or(bad(x), bad(sub(zero, x))));
  }
  return bits(b) != 0;
}

#if defined(TTSCALE_CPU_ISA_AVX512)
// 16 x 16 fp32 transpose in registers: r[i][j] -> r[j][i]. unpacklo/hi pair rows, shuffle_ps
// makes 4 x 4 blocks inside each 128-bit lane (u[4a+b] = rows 4a..4a+3 of columns b, b+4, b+8,
// b+12 in its four lanes), and two rounds of shuffle_f32x4 gather the lanes of one column.
inline void transpose16(__m512* r) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int b = 0; b < 4; ++b) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[b], u[4 + b], 0x88), w0 = _mm512_shuffle_f32x4(u[8 + b], u[12 + b], 0x88);
    const __m512 v1 = _mm512_shuffle_f32x4(u[b], u[4 + b], 0xDD), w1 = _mm512_shuffle_f32x4(u[8 + b], u[12 + b], 0xDD);
    r[b] = _mm512_shuffle_f32x4(v0, w0, 0x88);
    r[b + 8] = _mm512_shuffle_f32x4(v0, w0, 0xDD);
    r[b + 4] = _mm512_shuffle_f32x4(v1, w1, 0x88);
    r[b + 12] = _mm512_shuffle_f32x4(v1, w1, 0xDD);
  }
}
#endif

}  // namespace
}  // namespace TTSCALE_CPU_ISA
}  // namespace cpu
}  // namespace ttscale
