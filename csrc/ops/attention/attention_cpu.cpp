// Per-ISA CPU kernel of dense flash attention (compiled once per ISA; see common/cpu_simd.h and
// the algorithm notes in attention.h). Torch-free; everything is in an anonymous namespace.
//
// Micro-kernels (fp32 FMA, register-blocked):
//   st<MR>:  S^T[MR keys][kNC queries] = K[MR][D] . Q^T[D][kNC]; accumulators MR x NV vectors,
//            each step broadcasts one K element per key and loads NV vectors of Q^T.
//   pv<MR>:  O[MR][kNC dims] = alpha * O + P[MR][0..n) . V[0..n)[kNC dims], P read from S^T.
// AVX2: 6 x 2 vectors (12 of the 16 ymm registers); AVX-512: 12 x 2 vectors (24 of 32 zmm);
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
using attention::kPadD;

#if defined(TTSCALE_CPU_ISA_AVX512)
constexpr int kMR = 12, kNV = 2;  // 32 columns: a 96-query unit is 3 column tiles, no padding
#elif defined(TTSCALE_CPU_ISA_AVX2)
constexpr int kMR = 6, kNV = 2;
#else
constexpr int kMR = 4, kNV = 2;
#endif
constexpr int kNC = kNV * W;  // columns per micro-tile
static_assert(64 % kNC == 0, "head dims must be multiples of the micro-tile width");

// vector tanh(x). |x| >= 1/4: 1 - 2 / (exp(2x) + 1) (exp saturates: +-1 for large |x|). Below, that
// form cancels (its absolute error stays ~1e-7 while tanh(x) ~ x shrinks), and softcap multiplies
// the error by the cap: at cap 1e3 the output error was 100x plain torch's. There the Taylor series
// x - x^3/3 + 2x^5/15 - 17x^7/315 + 62x^9/2835 (next term < 2e-9 x at |x| < 1/4).
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
  const VF x2 = mul(x, x);
  VF p = fmadd(x2, set1(62.0f / 2835.0f), set1(-17.0f / 315.0f));
  p = fmadd(p, x2, set1(2.0f / 15.0f));
  p = fmadd(p, x2, set1(-1.0f / 3.0f));
  const VF t = fmadd(mul(p, x2), x, x);
  return select(cmp_gt(set1(0.0625f), x2), t, r);
}
inline VF vbroadcast(const float* p) { return set1(*p); }

// exp(x) for x <= 0 (or -inf), the softmax's only exp: 2^n * p(f) with n = round(x log2 e),
// f = x log2 e - n in [-1/2, 1/2], p a degree-5 minimax fit of 2^f (relative error 2.4e-7, as the
// general exp of cpu_simd.h), 2^n added into the exponent bits; x < -87.3 (and -inf) gives 0.
// About 12 vector operations instead of the general exp's ~18 (it dominates the non-FMA work).
constexpr float kE0 = 1.0000001192092896f, kE1 = 0.6931469440460205f, kE2 = 0.24022118747234344f,
                kE3 = 0.055507078766822815f, kE4 = 0.009675555862486362f, kE5 = 0.0013278163969516754f;
#if defined(TTSCALE_CPU_ISA_AVX512)
inline VF exp_neg(VF x) {
  const __m512 l2e = _mm512_set1_ps(kLog2e);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x.v, l2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_fmsub_ps(x.v, l2e, n);
  __m512 q = _mm512_set1_ps(kE5);
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(kE4)); q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(kE3));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(kE2)); q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(kE1));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(kE0));
  const __m512i e = _mm512_add_epi32(_mm512_castps_si512(q), _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23));
  return {_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x.v, _mm512_set1_ps(kExpLo), _CMP_GE_OQ), _mm512_castsi512_ps(e))};
}
#elif defined(TTSCALE_CPU_ISA_AVX2)
inline VF exp_neg(VF x) {
  const __m256 l2e = _mm256_set1_ps(kLog2e);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x.v, l2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_fmsub_ps(x.v, l2e, n);
  __m256 q = _mm256_set1_ps(kE5);
  q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(kE4)); q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(kE3));
  q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(kE2)); q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(kE1));
  q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(kE0));
  const __m256i e = _mm256_add_epi32(_mm256_castps_si256(q), _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23));
  return {_mm256_and_ps(_mm256_castsi256_ps(e), _mm256_cmp_ps(x.v, _mm256_set1_ps(kExpLo), _CMP_GE_OQ))};
}
#else
inline VF exp_neg(VF x) { return exp(x); }
#endif

// One micro-tile of S^T: keys [MR] (rows of K, ldk apart) x queries [kNC] (columns of Q^T).
template <int MR>
inline void st(const float* __restrict K, int64_t ldk, int64_t D, const float* __restrict QT, int64_t ldq,
               float* __restrict S) {
  VF acc[MR][kNV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < kNV; ++v) acc[r][v] = set1(0.0f);
  for (int64_t d = 0; d < D; ++d) {
    VF qv[kNV];
#pragma GCC unroll 8
    for (int v = 0; v < kNV; ++v) qv[v] = load(QT + d * ldq + v * W);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const VF kb = set1(K[r * ldk + d]);
#pragma GCC unroll 8
      for (int v = 0; v < kNV; ++v) acc[r][v] = fmadd(kb, qv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < kNV; ++v) store(S + r * ldq + v * W, acc[r][v]);
}

// One micro-tile of O: queries [MR] x dims [kNC]: O = alpha[r] * O + sum_j P[j][r] V[j][dims],
// P = S^T (ldp apart per key).
template <int MR>
inline void pv(const float* __restrict P, int64_t ldp, const float* __restrict V, int64_t ldv, int n, int64_t D,
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
      const VF pr = set1(P[j * ldp + r]);
#pragma GCC unroll 8
      for (int v = 0; v < kNV; ++v) acc[r][v] = fmadd(pr, vv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < kNV; ++v) store(O + r * D + v * W, acc[r][v]);
}

// Query-column slab outer, key rows inner: the Q^T slab (D x kNC) stays in L1 while K streams.
void st_rows(const float* K, int64_t ldk, int n, int64_t D, const float* QT, int64_t ldq, int ncols, float* S) {
  for (int c0 = 0; c0 < ncols; c0 += kNC) {
    int r = 0;
    for (; r + kMR <= n; r += kMR) st<kMR>(K + r * ldk, ldk, D, QT + c0, ldq, S + r * ldq + c0);
    for (; r + 4 <= n; r += 4) st<4>(K + r * ldk, ldk, D, QT + c0, ldq, S + r * ldq + c0);  // key tail
    const float* k = K + r * ldk;
    float* s = S + r * ldq + c0;
    switch (n - r) {
      case 3: st<3>(k, ldk, D, QT + c0, ldq, s); break;
      case 2: st<2>(k, ldk, D, QT + c0, ldq, s); break;
      case 1: st<1>(k, ldk, D, QT + c0, ldq, s); break;
      default: break;
    }
  }
}
// D slab outer, query rows inner: the V slab (n x kNC) stays in L1 while P streams.
void pv_rows(const float* P, int64_t ldp, const float* V, int64_t ldv, int n, int64_t D, const float* alpha, float* O,
             int64_t M) {
  for (int64_t d0 = 0; d0 < D; d0 += kNC) {
    int64_t r = 0;
    for (; r + kMR <= M; r += kMR) pv<kMR>(P + r, ldp, V + d0, ldv, n, D, alpha + r, O + r * D + d0);
    for (; r + 4 <= M; r += 4) pv<4>(P + r, ldp, V + d0, ldv, n, D, alpha + r, O + r * D + d0);  // row tail
    const float* pp = P + r;
    float* o = O + r * D + d0;
    switch (M - r) {
      case 3: pv<3>(pp, ldp, V + d0, ldv, n, D, alpha + r, o); break;
      case 2: pv<2>(pp, ldp, V + d0, ldv, n, D, alpha + r, o); break;
      case 1: pv<1>(pp, ldp, V + d0, ldv, n, D, alpha + r, o); break;
      default: break;
    }
  }
}

// Widen D elements (fp32 / fp16 / bf16) to fp32.
template <typename T>
inline void widen_row(const T* src, float* dst, int64_t D) {
  for (int64_t d = 0; d < D; d += W) store(dst + d, load(src + d));
}

template <typename T>
void run_unit_t(const AttnParams& p, int64_t b, int64_t hk, int64_t r0, int64_t r1, float* scratch) {
  const int64_t D = p.D, G = p.Hq / p.Hkv, tq = r1 - r0, M = G * tq;
  const int64_t ldq = attention::cpu_ldq(M), ldkv = D + kPadD;
  const int ncols = (int)((M + kNC - 1) / kNC * kNC);
  const int64_t q_len = p.q_len(b), k_len = p.k_len(b), qtok0 = p.q_begin(b), ktok0 = p.k_begin(b);
  const int64_t off = k_len - q_len;  // bottom-right alignment
  // scratch layout
  float* QT = scratch;
  float* Ob = QT + D * ldq;
  float* Kb = Ob + M * D;
  float* Vb = Kb + kBlockK * ldkv;
  float* St = Vb + kBlockK * ldkv;
  float* mrow = St + kBlockK * ldq;
  float* lrow = mrow + ldq;
  float* alpha = lrow + ldq;
  float* relb = alpha + ldq;  // visible key range of each query, relative to the block start
  float* rele = relb + ldq;
  int64_t* kb = reinterpret_cast<int64_t*>(rele + ldq + ((rele + ldq - scratch) & 1));  // 8-byte aligned
  int64_t* ke = kb + M;
  float* Vbad = reinterpret_cast<float*>(ke + M);  // [kBlockK][D] the non-finite value rows of a block
  int bad_keys[kBlockK];

  const T* qbase = static_cast<const T*>(p.q) + b * p.q_sb + (p.cu_q ? qtok0 * p.q_st : 0);
  const T* kbase = static_cast<const T*>(p.k) + b * p.k_sb + ktok0 * p.k_st + hk * p.k_sh;
  const T* vbase = static_cast<const T*>(p.v) + b * p.v_sb + ktok0 * p.v_st + hk * p.v_sh;

  // rows (= S^T columns): r = g * tq + i  (head hk * G + g, query r0 + i)
  int64_t kmin = k_len, kmax = 0, kb_max = 0, ke_min = k_len;
  const float scale = p.scale;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = hk * G + g;
    for (int64_t i = 0; i < tq; ++i) {
      const int64_t r = g * tq + i;
      const T* qr = qbase + (r0 + i) * p.q_st + h * p.q_sh;
      for (int64_t d = 0; d < D; ++d) QT[d * ldq + r] = to_float(qr[d]) * scale;
      int64_t a, e;
      attn::visible_range(r0 + i + off, k_len, p.causal, p.window_left, &a, &e);
      kb[r] = a;
      ke[r] = e;
      if (a < e) {
        kmin = a < kmin ? a : kmin;
        kmax = e > kmax ? e : kmax;
      }
      kb_max = a > kb_max ? a : kb_max;
      ke_min = e < ke_min ? e : ke_min;
    }
  }
  for (int64_t r = M; r < ncols; ++r)
    for (int64_t d = 0; d < D; ++d) QT[d * ldq + r] = 0.0f;
  for (int64_t r = 0; r < ldq; ++r) {
    mrow[r] = -INFINITY;
    lrow[r] = 0.0f;
    relb[r] = 0.0f;  // padded columns: nothing visible
    rele[r] = 0.0f;
  }
  std::memset(Ob, 0, sizeof(float) * M * D);
  const float cap = p.softcap;
  const VF vcap = set1(cap), vinv_cap = set1(cap > 0.0f ? 1.0f / cap : 0.0f);
  const VF ninf = set1(-INFINITY), zero = set1(0.0f);

  for (int64_t j0 = kmin; j0 < kmax; j0 += kBlockK) {
    const int n = (int)(kmax - j0 < kBlockK ? kmax - j0 : kBlockK);
    for (int j = 0; j < n; ++j) {
      widen_row(kbase + (j0 + j) * p.k_st, Kb + j * ldkv, D);
      widen_row(vbase + (j0 + j) * p.v_st, Vb + j * ldkv, D);
    }
    st_rows(Kb, ldkv, n, D, QT, ldq, ncols, St);
    // mask only where some query of the unit does not see the whole block
    const bool need_mask = j0 < kb_max || j0 + n > ke_min;
    // A masked key has P = 0, and 0 * inf = NaN: in a masked block, value rows holding a non-finite
    // element are zeroed before the P.V product and their non-finite elements are added back below,
    // to the rows that see the key only (attention_math.h's contract). Clean blocks skip it.
    int n_bad = 0;
    if (need_mask)
      for (int j = 0; j < n; ++j)
        if (row_nonfinite(Vb + j * ldkv, D)) bad_keys[n_bad++] = j;
    for (int i = 0; i < n_bad; ++i) {
      float* vr = Vb + bad_keys[i] * ldkv;
      float* keep = Vbad + i * D;
      for (int64_t d = 0; d < D; ++d) {
        keep[d] = vr[d];
        if (!(std::fabs(vr[d]) < INFINITY)) vr[d] = 0.0f;
      }
    }
    if (need_mask) {
      for (int64_t r = 0; r < M; ++r) {
        const int64_t a = kb[r] - j0, e = ke[r] - j0;  // clamp to [-1, n + 1]: exact in float
        relb[r] = (float)(a < -1 ? -1 : a > n + 1 ? n + 1 : a);
        rele[r] = (float)(e < -1 ? -1 : e > n + 1 ? n + 1 : e);
        if (a >= e) relb[r] = rele[r] = 0.0f;
      }
    }
    // softcap, mask, online softmax down the columns (W queries at a time); a NaN / +inf visible
    // score poisons its row (l = NaN, sticky through fmadd below)
    for (int c = 0; c < ncols; c += W) {
      VF mx = ninf;
      VM poisoned = cmp_gt(zero, zero);  // all false
      const VF rb = load(relb + c), re = load(rele + c);
      for (int j = 0; j < n; ++j) {
        float* sp = St + j * ldq + c;
        VF x = load(sp);
        if (cap > 0.0f) x = mul(vcap, vtanh(mul(x, vinv_cap)));
        if (need_mask) {
          const VF jf = set1((float)j);
          x = select(cmp_ge(jf, rb), x, ninf);
          x = select(cmp_gt(re, jf), x, ninf);
        }
        if (cap > 0.0f || need_mask) store(sp, x);
        mx = max(mx, x);
        poisoned = mask_or(poisoned, bad(x));
      }
      // attn::OnlineSoftmax::rescale_to, W queries at a time
      const VF m_old = load(mrow + c);
      const VF m_new = max(m_old, mx);
      const VF m_use = select(cmp_eq(m_new, ninf), zero, m_new);  // no visible key yet: exp(-inf - 0) = 0
      const VF al = exp_neg(sub(m_old, m_use));                        // m_old = -inf -> 0
      VF sum = zero;
      for (int j = 0; j < n; ++j) {
        float* sp = St + j * ldq + c;
        const VF e = exp_neg(sub(load(sp), m_use));
        store(sp, e);
        sum = add(sum, e);
      }
      store(mrow + c, m_new);
      store(lrow + c, select(poisoned, set1(NAN), fmadd(load(lrow + c), al, sum)));
      store(alpha + c, al);
    }
    pv_rows(St, ldq, Vb, ldkv, n, D, alpha, Ob, M);
    for (int i = 0; i < n_bad; ++i) {
      const int j = bad_keys[i];
      const float* keep = Vbad + i * D;
      for (int64_t r = 0; r < M; ++r) {
        if (j0 + j < kb[r] || j0 + j >= ke[r]) continue;
        const float pr = St[j * ldq + r];
        for (int64_t d = 0; d < D; ++d)
          if (!(std::fabs(keep[d]) < INFINITY)) Ob[r * D + d] += pr * keep[d];
      }
    }
  }

  // normalise and write
  float* out = static_cast<float*>(p.o);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = hk * G + g;
    for (int64_t i = 0; i < tq; ++i) {
      const int64_t r = g * tq + i;
      const int64_t t = qtok0 + r0 + i;
      float* o = out + (t * p.Hq + h) * D;
      const attn::OnlineSoftmax st_{mrow[r], lrow[r]};
      const VF vi = set1(attn::out_scale(lrow[r]));
      for (int64_t d = 0; d < D; d += W) store(o + d, mul(load(Ob + r * D + d), vi));
      if (p.lse) p.lse[t * p.Hq + h] = st_.lse();
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
