// Per-ISA CPU kernel of dense flash attention (compiled once per ISA; see common/cpu_simd.h and
// the algorithm notes in attention.h). Torch-free; everything is in an anonymous namespace.
//
// Micro-kernels (fp32 FMA, register-blocked):
//   qk<MR>:  S[MR][kBlockK] = Q[MR][D] . K^T[D][kBlockK]; accumulators MR rows x NV vectors of keys,
//            each step broadcasts one Q element per row and loads NV vectors of K^T.
//   pv<MR>:  O[MR][D] = alpha * O + P[MR][n] . V[n][D]; accumulators MR rows x NV vectors of D.
// AVX2: 6 x 2 vectors (12 of the 16 ymm registers); AVX-512: 6 x 4 vectors (24 of 32 zmm);
// generic: 4 x 2 vectors of plain C++ lanes.
#include "ops/attention/attention.h"
#include "common/cpu_simd.h"
#include "common/dispatch.h"

#include <cstdint>
#include <cstring>

namespace ttscale {
namespace cpu {
namespace TTSCALE_CPU_ISA {
namespace {

using attention::AttnParams;
using attention::CpuKernels;
using attention::kBlockK;
using attention::kLdKT;
using attention::kPadV;

#if defined(TTSCALE_CPU_ISA_AVX512)
constexpr int kMR = 6, kNV = 4;
#elif defined(TTSCALE_CPU_ISA_AVX2)
constexpr int kMR = 6, kNV = 2;
#else
constexpr int kMR = 4, kNV = 2;
#endif
constexpr int kNC = kNV * W;  // columns per micro-tile
static_assert(kBlockK % kNC == 0, "kBlockK must be a multiple of the micro-tile width");
static_assert(64 % kNC == 0, "head dims must be multiples of the micro-tile width");

// vector tanh(x) = 1 - 2 / (exp(2x) + 1) (exp saturates: +-1 for large |x|)
inline VF vtanh(VF x) {
  const VF e = exp(add(x, x));
  const VF one = set1(1.0f);
  VF r;
#if defined(TTSCALE_CPU_ISA_AVX512)
  r.v = _mm512_sub_ps(one.v, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e.v, one.v)));
#elif defined(TTSCALE_CPU_ISA_AVX2)
  r.v = _mm256_sub_ps(one.v, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e.v, one.v)));
#else
  for (int i = 0; i < W; ++i) r.v[i] = 1.0f - 2.0f / (e.v[i] + 1.0f);
#endif
  // exp(2x) overflows to its clamp for x > ~44: 1 - 2/(big) rounds to 1, as wanted.
  return r;
}
inline VF vbroadcast(const float* p) { return set1(*p); }

// One micro-tile of S: rows [MR] x columns [c0, c0 + kNC) of K^T (leading dimension kLdKT).
template <int MR>
inline void qk(const float* __restrict Q, int64_t D, const float* __restrict KT, float* __restrict S) {
  VF acc[MR][kNV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < kNV; ++v) acc[r][v] = set1(0.0f);
  for (int64_t d = 0; d < D; ++d) {
    VF kv[kNV];
#pragma GCC unroll 8
    for (int v = 0; v < kNV; ++v) kv[v] = load(KT + d * kLdKT + v * W);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const VF qv = vbroadcast(Q + r * D + d);
#pragma GCC unroll 8
      for (int v = 0; v < kNV; ++v) acc[r][v] = fmadd(qv, kv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < kNV; ++v) store(S + r * kBlockK + v * W, acc[r][v]);
}

// One micro-tile of O: rows [MR] x dims [d0, d0 + kNC): O = alpha[r] * O + P[MR][0..n) . V[0..n)[slab].
template <int MR>
inline void pv(const float* __restrict P, const float* __restrict V, int64_t ldv, int n, int64_t D,
               const float* __restrict alpha, float* __restrict O) {
  VF acc[MR][kNV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const VF a = set1(alpha[r]);
#pragma GCC unroll 8
    for (int v = 0; v < kNV; ++v) acc[r][v] = mul(a, load(O + r * D + v * W));
  }
  for (int j = 0; j < n; ++j) {
    VF vv[kNV];
#pragma GCC unroll 8
    for (int v = 0; v < kNV; ++v) vv[v] = load(V + j * ldv + v * W);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const VF pr = vbroadcast(P + r * kBlockK + j);
#pragma GCC unroll 8
      for (int v = 0; v < kNV; ++v) acc[r][v] = fmadd(pr, vv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < kNV; ++v) store(O + r * D + v * W, acc[r][v]);
}

// Column slab outer, row groups inner: the K^T slab (D x kNC) stays in L1 while Q streams.
template <int MR>
void qk_rows(const float* Q, int64_t D, const float* KT, int ncols, float* S, int64_t M) {
  for (int c0 = 0; c0 < ncols; c0 += kNC) {
    int64_t r = 0;
    for (; r + MR <= M; r += MR) qk<MR>(Q + r * D, D, KT + c0, S + r * kBlockK + c0);
    const float* q = Q + r * D;
    float* s = S + r * kBlockK + c0;
    switch (M - r) {  // row tail
      case 5: qk<5>(q, D, KT + c0, s); break;
      case 4: qk<4>(q, D, KT + c0, s); break;
      case 3: qk<3>(q, D, KT + c0, s); break;
      case 2: qk<2>(q, D, KT + c0, s); break;
      case 1: qk<1>(q, D, KT + c0, s); break;
      default: break;
    }
  }
}
// D slab outer, row groups inner: the V slab (n x kNC) stays in L1 while P streams.
template <int MR>
void pv_rows(const float* P, const float* V, int64_t ldv, int n, int64_t D, const float* alpha, float* O, int64_t M) {
  for (int64_t d0 = 0; d0 < D; d0 += kNC) {
    int64_t r = 0;
    for (; r + MR <= M; r += MR) pv<MR>(P + r * kBlockK, V + d0, ldv, n, D, alpha + r, O + r * D + d0);
    const float* pp = P + r * kBlockK;
    float* o = O + r * D + d0;
    switch (M - r) {
      case 5: pv<5>(pp, V + d0, ldv, n, D, alpha + r, o); break;
      case 4: pv<4>(pp, V + d0, ldv, n, D, alpha + r, o); break;
      case 3: pv<3>(pp, V + d0, ldv, n, D, alpha + r, o); break;
      case 2: pv<2>(pp, V + d0, ldv, n, D, alpha + r, o); break;
      case 1: pv<1>(pp, V + d0, ldv, n, D, alpha + r, o); break;
      default: break;
    }
  }
}

// Widen W elements (fp32 / fp16 / bf16) and store them as fp32.
template <typename T>
inline void widen_row(const T* src, float* dst, int64_t D, float mul_by) {
  const VF s = set1(mul_by);
  for (int64_t d = 0; d < D; d += W) store(dst + d, mul(load(src + d), s));
}

// K^T block: KT[d][j] = k[j][d] for j < n, 0 for n <= j < ncols (ncols multiple of 8).
#if defined(TTSCALE_CPU_ISA_AVX2) || defined(TTSCALE_CPU_ISA_AVX512)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const half_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
inline __m256 load8(const bf16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
// 8 x 8 in-register transpose: rows r[0..8) -> columns
inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20); r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20); r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31); r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31); r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}
template <typename T>
void widen_kt(const T* k, int64_t ldk, int n, int ncols, int64_t D, float* KT) {
  int j = 0;
  for (; j + 8 <= n; j += 8)
    for (int64_t d = 0; d < D; d += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = load8(k + (j + i) * ldk + d);
      transpose8(r);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(KT + (d + i) * kLdKT + j, r[i]);
    }
  for (; j < n; ++j)
    for (int64_t d = 0; d < D; ++d) KT[d * kLdKT + j] = to_float(k[j * ldk + d]);
  for (; j < ncols; ++j)
    for (int64_t d = 0; d < D; ++d) KT[d * kLdKT + j] = 0.0f;
}
#else
template <typename T>
void widen_kt(const T* k, int64_t ldk, int n, int ncols, int64_t D, float* KT) {
  for (int j = 0; j < n; ++j)
    for (int64_t d = 0; d < D; ++d) KT[d * kLdKT + j] = to_float(k[j * ldk + d]);
  for (int j = n; j < ncols; ++j)
    for (int64_t d = 0; d < D; ++d) KT[d * kLdKT + j] = 0.0f;
}
#endif

template <typename T>
void run_unit_t(const AttnParams& p, int64_t b, int64_t hk, int64_t r0, int64_t r1, float* scratch) {
  const int64_t D = p.D, G = p.Hq / p.Hkv, tq = r1 - r0, M = G * tq;
  const int64_t q_len = p.q_len(b), k_len = p.k_len(b), qtok0 = p.q_begin(b), ktok0 = p.k_begin(b);
  const int64_t off = k_len - q_len;  // bottom-right alignment
  // scratch layout
  float* Qb = scratch;
  float* Ob = Qb + M * D;
  float* KT = Ob + M * D;
  float* Vb = KT + D * kLdKT;
  float* Pb = Vb + kBlockK * (D + kPadV);
  float* mrow = Pb + M * kBlockK;
  float* lrow = mrow + M;
  float* alpha = lrow + M;
  int64_t* kb = reinterpret_cast<int64_t*>(alpha + M + ((alpha + M - scratch) & 1));  // 8-byte aligned
  int64_t* ke = kb + M;

  const T* qbase = static_cast<const T*>(p.q) + b * p.q_sb + (p.cu_q ? qtok0 * p.q_st : 0);
  const T* kbase = static_cast<const T*>(p.k) + b * p.k_sb + ktok0 * p.k_st + hk * p.k_sh;
  const T* vbase = static_cast<const T*>(p.v) + b * p.v_sb + ktok0 * p.v_st + hk * p.v_sh;

  // rows: r = g * tq + i  (head hk * G + g, query r0 + i)
  int64_t kmin = k_len, kmax = 0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = hk * G + g;
    for (int64_t i = 0; i < tq; ++i) {
      const int64_t r = g * tq + i;
      widen_row(qbase + (r0 + i) * p.q_st + h * p.q_sh, Qb + r * D, D, p.scale);
      int64_t a, e;
      attn::visible_range(r0 + i + off, k_len, p.causal, p.window_left, &a, &e);
      kb[r] = a;
      ke[r] = e;
      if (a < e) {
        kmin = a < kmin ? a : kmin;
        kmax = e > kmax ? e : kmax;
      }
      mrow[r] = -INFINITY;
      lrow[r] = 0.0f;
    }
  }
  std::memset(Ob, 0, sizeof(float) * M * D);
  const float cap = p.softcap;
  const float inv_cap = cap > 0.0f ? 1.0f / cap : 0.0f;

  for (int64_t j0 = kmin; j0 < kmax; j0 += kBlockK) {
    const int n = (int)(kmax - j0 < kBlockK ? kmax - j0 : kBlockK);
    const int ncols = (n + kNC - 1) / kNC * kNC;
    // K^T block (zero-padded to ncols) and V block, widened once for all M rows
    widen_kt(kbase + j0 * p.k_st, p.k_st, n, ncols, D, KT);
    const int64_t ldv = D + kPadV;
    for (int j = 0; j < n; ++j) widen_row(vbase + (j0 + j) * p.v_st, Vb + j * ldv, D, 1.0f);
    const float* Vp = Vb;
    qk_rows<kMR>(Qb, D, KT, ncols, Pb, M);
    // softcap, mask, online softmax -> P (in place), alpha
    for (int64_t r = 0; r < M; ++r) {
      float* s = Pb + r * kBlockK;
      // visible columns of this row within the block
      int64_t a = kb[r] - j0, e = ke[r] - j0;
      a = a < 0 ? 0 : a;
      e = e > n ? n : e;
      if (a >= e) {  // nothing visible in this block: P = 0, O unchanged
        for (int j = 0; j < ncols; ++j) s[j] = 0.0f;
        alpha[r] = 1.0f;
        continue;
      }
      if (cap > 0.0f) {
        const VF vc = set1(cap), vic = set1(inv_cap);
        for (int j = 0; j < ncols; j += W) store(s + j, mul(vc, vtanh(mul(load(s + j), vic))));
      }
      for (int64_t j = 0; j < a; ++j) s[j] = -INFINITY;
      for (int64_t j = e; j < ncols; ++j) s[j] = -INFINITY;
      VF mx = set1(-INFINITY);
      for (int j = 0; j < ncols; j += W) mx = max(mx, load(s + j));
      attn::OnlineSoftmax st{mrow[r], lrow[r]};
      alpha[r] = st.rescale_to(hmax(mx));
      const VF mv = set1(st.m);
      VF sum = set1(0.0f);
      for (int j = 0; j < ncols; j += W) {
        const VF e_ = exp(sub(load(s + j), mv));  // -inf -> 0
        store(s + j, e_);
        sum = add(sum, e_);
      }
      st.l += hsum(sum);
      mrow[r] = st.m;
      lrow[r] = st.l;
    }
    pv_rows<kMR>(Pb, Vp, ldv, n, D, alpha, Ob, M);
  }

  // normalise and write
  float* out = static_cast<float*>(p.o);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = hk * G + g;
    for (int64_t i = 0; i < tq; ++i) {
      const int64_t r = g * tq + i;
      const int64_t t = qtok0 + r0 + i;
      float* o = out + (t * p.Hq + h) * D;
      attn::OnlineSoftmax st{mrow[r], lrow[r]};
      const float inv = lrow[r] > 0.0f ? 1.0f / lrow[r] : 0.0f;
      const VF vi = set1(inv);
      for (int64_t d = 0; d < D; d += W) store(o + d, mul(load(Ob + r * D + d), vi));
      if (p.lse) p.lse[t * p.Hq + h] = st.lse();
    }
  }
}

void run_unit(const AttnParams& p, int64_t b, int64_t hk, int64_t r0, int64_t r1, float* scratch) {
  TT_DISPATCH_FLOAT(p.dtype, T, run_unit_t<T>(p, b, hk, r0, r1, scratch))
}

const CpuKernels kKernels = {run_unit};

}  // namespace

const CpuKernels* attention_kernels() { return &kKernels; }

}  // namespace TTSCALE_CPU_ISA
}  // namespace cpu
}  // namespace ttscale
