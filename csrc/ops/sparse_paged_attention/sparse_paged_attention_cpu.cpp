// Per-ISA CPU kernels of page summaries, Quest page scoring, attention over a kept page list and
// per-page log-sum-exp (compiled once per ISA; see common/cpu_simd.h). Formats and schedule:
// sparse_paged_attention.h. Torch-free.
#include "ops/sparse_paged_attention/sparse_paged_attention.h"
#include "common/attention_math.h"
#include "common/cpu_simd.h"
#include "common/attention_cpu_tiles.h"
#include "common/dispatch.h"

#include <cmath>
#include <cstdint>
#include <vector>

namespace ttscale {
namespace cpu {
namespace TTSCALE_CPU_ISA {
namespace {

using sparse::CpuKernels;
using sparse::kKeyChunk;
using sparse::SparseParams;
using sparse::SummaryParams;

constexpr int64_t kScoreAhead = 8;   // scoring: prefetch distance in pages

// ---------------------------------------------------------------- summaries
template <typename T>
void summarize_t(const SummaryParams& sp, int64_t i0, int64_t i1) {
  const T* kc = static_cast<const T*>(sp.k_cache);
  T* sc = static_cast<T*>(sp.summaries);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t page = sp.pages[i], n = sp.lens[i];
    for (int64_t h = 0; h < sp.Hkv; ++h) {
      const T* k0 = kc + page * sp.k_stride_page + h * sp.k_stride_head;
      T* base = sc + page * sp.s_stride_page + h * sp.s_stride_head;
      for (int64_t d = 0; d < sp.D; ++d)
        sparse::summarize_elem<T>(k0, sp.k_stride_tok, n, d, base + sparse::kMin * sp.s_stride_kind,
                                  base + sparse::kMax * sp.s_stride_kind, base + sparse::kMean * sp.s_stride_kind);
    }
  }
}

void summarize(const SummaryParams& sp, int64_t i0, int64_t i1) {
  TT_DISPATCH_FLOAT(sp.dtype, T, summarize_t<T>(sp, i0, i1))
}

// ---------------------------------------------------------------- scoring
// max(q*mn, q*mx) = max(q, 0) * mx + min(q, 0) * mn for mn <= mx, so the Quest bound of a query
// head is one dot product of [q+, q-] with [mx, mn]: 2 FMAs per element, no compare. Heads go by
// 4 (8 accumulators: 2 summary loads + 8 FMAs per step); rows past the group alias row 0.
template <typename T, int D>
void score_t(const SparseParams& s, int64_t b, int64_t h0, int64_t h1, int64_t j0, int64_t j1, float* scores) {
  const paged::PagedParams& p = s.p;
  const int64_t Hq = p.Hq, Hkv = p.Hkv, group = Hq / Hkv;
  // per query head: [q+ (D) | q- (D)], q+ = max(q, 0), q- = min(q, 0). A bound term is
  // q+ * max + q- * min = sparse::quest_term(q, min, max), except that the zero half must not touch an
  // infinite bound (0 * inf = NaN would drop the page): the kernels mask it out instead of multiplying.
  std::vector<float> qsplit((size_t)Hq * 2 * D);
  const T* qb = static_cast<const T*>(p.q) + b * p.q_stride_t;
  for (int64_t hq = h0 * group; hq < h1 * group; ++hq) {
    float* dst = qsplit.data() + hq * 2 * D;
    for (int d = 0; d < D; ++d) {
      const float x = to_float(qb[hq * p.q_stride_h + d]);
      dst[d] = x > 0.0f ? x : 0.0f;
      dst[D + d] = x < 0.0f ? x : 0.0f;
    }
  }
  const T* sc = static_cast<const T*>(s.summaries);
  const int32_t* pages = p.kv_indices + p.kv_indptr[b];
  // min and max rows of heads [ha, hb) of logical page jj, if it is in range
  auto prefetch_summary = [&](int64_t jj, int64_t ha, int64_t hb) {
    if (jj >= j1) return;
    const char* nb = reinterpret_cast<const char*>(sc + (int64_t)pages[jj] * s.s_stride_page);
    for (int k = sparse::kMin; k <= sparse::kMax; ++k)
      for (int64_t h = ha; h < hb; ++h) {
        const char* row = nb + (k * s.s_stride_kind + h * s.s_stride_head) * (int64_t)sizeof(T);
        for (int64_t o = 0; o < D * (int64_t)sizeof(T); o += 64) prefetch(row + o);
      }
  };
#if defined(TTSCALE_CPU_ISA_AVX512)
  // 4 pages x 4 rows per block: 16 accumulators, per step 8 summary + 8 query loads for 32 masked
  // FMAs, and one transpose-add reduction (reduce16) for the 16 bounds instead of 16 horizontal sums.
  // Reduced lanes: 128-bit lane r holds row r's bounds of the 4 pages; the GQA group's bound of a
  // page is the max over its rows. Every page, the last < 4 included (their block repeats the last
  // page and drops the copies), goes through this same arithmetic, so pages with equal summaries
  // get bit-equal scores and the tie goes to the lower index, as documented (a separate scalar tail
  // rounded differently and broke ties at random on 5-15% of heads).
  for (int64_t j = j0; j < j1; j += 4) {
    const int nv = (int)(j1 - j < 4 ? j1 - j : 4);
    for (int64_t h = h0; h < h1; ++h) {
      // this head's min/max rows of the pages kScoreAhead ahead: a few lines per head and block,
      // so the requests trickle out with the math instead of stalling as one burst
      for (int pg = 0; pg < 4; ++pg) prefetch_summary(j + pg + kScoreAhead, h, h + 1);
      const T* mn[4];
      const T* mx[4];
      for (int pg = 0; pg < 4; ++pg) {
        const T* base = sc + (int64_t)pages[j + (pg < nv ? pg : nv - 1)] * s.s_stride_page + h * s.s_stride_head;
        mn[pg] = base + sparse::kMin * s.s_stride_kind;
        mx[pg] = base + sparse::kMax * s.s_stride_kind;
      }
      __m128 best = _mm_set1_ps(-INFINITY);
      for (int64_t g0 = 0; g0 < group; g0 += 4) {
        const float* q[4];
        for (int r = 0; r < 4; ++r) q[r] = qsplit.data() + (h * group + (g0 + r < group ? g0 + r : g0)) * 2 * D;
        __m512 a[16];
        for (int i = 0; i < 16; ++i) a[i] = _mm512_setzero_ps();
        for (int d = 0; d < D; d += W) {
          __m512 xl[4], xh[4];
          for (int pg = 0; pg < 4; ++pg) { xl[pg] = load(mn[pg] + d).v; xh[pg] = load(mx[pg] + d).v; }
          for (int r = 0; r < 4; ++r) {
            const __m512 qp = _mm512_loadu_ps(q[r] + d), qm = _mm512_loadu_ps(q[r] + D + d);
            const __mmask16 pos = _mm512_cmp_ps_mask(qp, _mm512_setzero_ps(), _CMP_GT_OQ);
            const __mmask16 neg = _mm512_cmp_ps_mask(qm, _mm512_setzero_ps(), _CMP_LT_OQ);
            for (int pg = 0; pg < 4; ++pg)
              a[4 * pg + r] = _mm512_mask3_fmadd_ps(qm, xl[pg], _mm512_mask3_fmadd_ps(qp, xh[pg], a[4 * pg + r], pos), neg);
          }
        }
        const __m512 x = reduce16(a);
        const __m128 m01 = _mm_max_ps(_mm512_castps512_ps128(x), _mm512_extractf32x4_ps(x, 1));
        const __m128 m23 = _mm_max_ps(_mm512_extractf32x4_ps(x, 2), _mm512_extractf32x4_ps(x, 3));
        best = _mm_max_ps(best, _mm_max_ps(m01, m23));
      }
      alignas(16) float v[4];
      _mm_store_ps(v, best);
      for (int pg = 0; pg < nv; ++pg) scores[(j + pg - j0) * Hkv + h] = v[pg];
    }
  }
#else
  const VF zero = set1(0.0f);
  for (int64_t j = j0; j < j1; ++j) {
    const T* base = sc + (int64_t)pages[j] * s.s_stride_page;
    prefetch_summary(j + kScoreAhead, h0, h1);  // pages are scattered: kScoreAhead pages ahead
    for (int64_t h = h0; h < h1; ++h) {
      const T* mn = base + sparse::kMin * s.s_stride_kind + h * s.s_stride_head;
      const T* mx = base + sparse::kMax * s.s_stride_kind + h * s.s_stride_head;
      float best = -INFINITY;
      for (int64_t g0 = 0; g0 < group; g0 += 4) {
        const float* q[4];
        for (int r = 0; r < 4; ++r) q[r] = qsplit.data() + (h * group + (g0 + r < group ? g0 + r : g0)) * 2 * D;
        VF a[8];
        for (int i = 0; i < 8; ++i) a[i] = zero;
        for (int d = 0; d < D; d += W) {
          const VF xl = load(mn + d), xh = load(mx + d);
          for (int r = 0; r < 4; ++r) {
            const VF qp = load(q[r] + d), qm = load(q[r] + D + d);
            a[2 * r] = fmadd(qp, select(cmp_gt(qp, zero), xh, zero), a[2 * r]);
            a[2 * r + 1] = fmadd(qm, select(cmp_gt(zero, qm), xl, zero), a[2 * r + 1]);
          }
        }
        for (int r = 0; r < 4 && g0 + r < group; ++r) {
          const float v = hsum(add(a[2 * r], a[2 * r + 1]));
          best = v > best ? v : best;
        }
      }
      scores[(j - j0) * Hkv + h] = best;
    }
  }
#endif
}

void score(const SparseParams& s, int64_t b, int64_t h0, int64_t h1, int64_t j0, int64_t j1, float* scores) {
  TT_DISPATCH_FLOAT(s.p.dtype, T, TT_DISPATCH_HEAD_DIM(s.p.D, D, score_t<T, D>(s, b, h0, h1, j0, j1, scores)))
}

// ---------------------------------------------------------------- attention over kept pages
// One KV head's group of query rows (tiles of 4) against the kept pages' keys, in chunks of
// kKeyChunk keys with the shared tile kernels (common/attention_cpu_tiles.h). A head's K/V rows are
// D elements at a stride of Hkv * D behind scattered page-table jumps, which no hardware prefetcher
// follows, so the next chunk's rows stream in through a PrefetchStream paced by the tile kernels.
template <typename T, int D>
void attend_t(const SparseParams& s, int64_t b, int64_t h, const int32_t* kept, int64_t n, float* out, float* lse) {
  static_assert(kKeyChunk == kTileKeys, "sparse chunk = tile width");
  const paged::PagedParams& p = s.p;
  const int64_t group = p.Hq / p.Hkv;
  const int64_t tiles = (group + 3) / 4;
  const int64_t rows = tiles * 4;  // padded: dummy rows alias a live one; their results are never read
  std::vector<float> qf((size_t)rows * D, 0.0f), acc((size_t)rows * D, 0.0f), m(rows, -INFINITY), l(rows, 0.0f);
  const T* qb = static_cast<const T*>(p.q) + b * p.q_stride_t + h * group * p.q_stride_h;
  for (int64_t g = 0; g < group; ++g)
    for (int d = 0; d < D; ++d) qf[g * D + d] = to_float(qb[g * p.q_stride_h + d]) * p.scale;
  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  const int32_t* pages = p.kv_indices + p.kv_indptr[b];
  const int64_t np = (int64_t)p.kv_indptr[b + 1] - p.kv_indptr[b];
  const int64_t last = p.kv_last_page_len[b];
  // row pointers of every kept key, in the order attended
  std::vector<const T*> krow, vrow;
  krow.reserve((size_t)(n * p.page_size));
  vrow.reserve((size_t)(n * p.page_size));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t page = pages[kept[i]];
    const int64_t ntok = sparse::page_tokens(kept[i], np, last, p.page_size);
    for (int64_t t = 0; t < ntok; ++t) {
      krow.push_back(kc + page * p.k_stride_page + t * p.k_stride_tok + h * p.k_stride_head);
      vrow.push_back(vc + page * p.v_stride_page + t * p.v_stride_tok + h * p.v_stride_head);
    }
  }
  const int64_t nkeys = (int64_t)krow.size();
  const int64_t span = D * (int64_t)sizeof(T);
  auto stream_rows = [&](PrefetchStream& pf, int64_t c, int calls) {
    pf.n = (int)(nkeys - c < kKeyChunk ? (nkeys - c > 0 ? nkeys - c : 0) : kKeyChunk);
    pf.span = span;
    for (int j = 0; j < pf.n; ++j) {
      pf.k[j] = reinterpret_cast<const char*>(krow[c + j]);
      pf.v[j] = reinterpret_cast<const char*>(vrow[c + j]);
    }
    pf.pace(calls);
  };
  {
    PrefetchStream first;
    stream_rows(first, 0, 1);
    first.drain();
  }
  const float* qr[4];
  const T* qraw[4];
  float* orow[4];
  alignas(64) float S[4][kKeyChunk];
  for (int64_t c0 = 0; c0 < nkeys; c0 += kKeyChunk) {
    const int nk = (int)(nkeys - c0 < kKeyChunk ? nkeys - c0 : kKeyChunk);
    const int nkw = (nk + W - 1) / W * W;
    PrefetchStream pf;
    stream_rows(pf, c0 + kKeyChunk, (int)(tiles * tile_step_calls<T>(nk, D)));
    for (int64_t t = 0; t < tiles; ++t) {
      for (int r = 0; r < 4; ++r) {
        const int64_t g = t * 4 + r < group ? t * 4 + r : t * 4;
        qr[r] = qf.data() + g * D;
        qraw[r] = qb + g * p.q_stride_h;
        orow[r] = acc.data() + (t * 4 + r) * D;
      }
      qk4<T, D>(qr, qraw, krow.data() + c0, nk, p.scale, S, &pf);
      for (int r = 0; r < 4; ++r) {
        float* sr = S[r];
        if (t * 4 + r >= group) {  // dummy row: zero weights, its accumulator is scratch
          for (int j = 0; j < nkw; ++j) sr[j] = 0.0f;
          continue;
        }
        float bm = -INFINITY;
        bool poisoned = false;  // a NaN / +inf score (attention_math.h): the row becomes NaN
        for (int j = 0; j < nk; ++j) {
          bm = sr[j] > bm ? sr[j] : bm;
          poisoned |= attn::poisons(sr[j]);
        }
        if (poisoned) {
          l[t * 4 + r] = NAN;  // sticky: every later rescale and sum keeps it
          for (int j = 0; j < nkw; ++j) sr[j] = 0.0f;
          continue;
        }
        attn::OnlineSoftmax os{m[t * 4 + r], l[t * 4 + r]};
        const float alpha = os.rescale_to(bm);
        if (alpha != 1.0f) {
          const VF va = set1(alpha);
          for (int d = 0; d < D; d += W) store(orow[r] + d, mul(load(orow[r] + d), va));
        }
        for (int j = nk; j < nkw; ++j) sr[j] = -INFINITY;  // exp -> 0 (the bf16 PV kernel reads P to a multiple of 16 = W)
        const VF vm = set1(os.m);
        VF sum = set1(0.0f);
        for (int j = 0; j < nkw; j += W) {
          const VF e = exp(sub(load(sr + j), vm));
          store(sr + j, e);
          sum = add(sum, e);
        }
        os.l += hsum(sum);
        m[t * 4 + r] = os.m;
        l[t * 4 + r] = os.l;
      }
      pv4<T, D>(orow, S, vrow.data() + c0, nk, &pf);
    }
    pf.drain();
  }
  for (int64_t g = 0; g < group; ++g) {
    if (l[g] > 0.0f) {
      const float inv = 1.0f / l[g];
      for (int d = 0; d < D; ++d) out[g * D + d] = acc[g * D + d] * inv;
      lse[g] = m[g] + std::log(l[g]);
    } else {  // no key (0, -inf) or poisoned (NaN, NaN)
      for (int d = 0; d < D; ++d) out[g * D + d] = attn::out_scale(l[g]);
      lse[g] = attn::OnlineSoftmax{m[g], l[g]}.lse();
    }
  }
}

void attend(const SparseParams& s, int64_t b, int64_t h, const int32_t* kept, int64_t n, float* out, float* lse) {
  TT_DISPATCH_FLOAT(s.p.dtype, T, TT_DISPATCH_HEAD_DIM(s.p.D, D, attend_t<T, D>(s, b, h, kept, n, out, lse)))
}

// ---------------------------------------------------------------- per-page log-sum-exp
template <typename T, int D>
void page_lse_t(const paged::PagedParams& p, int64_t b, int64_t h, float* plse) {
  const int64_t group = p.Hq / p.Hkv;
  std::vector<float> qf((size_t)group * D), sv(p.page_size);
  const T* qb = static_cast<const T*>(p.q) + b * p.q_stride_t + h * group * p.q_stride_h;
  for (int64_t g = 0; g < group; ++g)
    for (int d = 0; d < D; ++d) qf[g * D + d] = to_float(qb[g * p.q_stride_h + d]) * p.scale;
  const T* kc = static_cast<const T*>(p.k_cache);
  const int32_t* pages = p.kv_indices + p.kv_indptr[b];
  const int64_t np = (int64_t)p.kv_indptr[b + 1] - p.kv_indptr[b];
  for (int64_t j = 0; j < np; ++j) {
    const int64_t ntok = sparse::page_tokens(j, np, p.kv_last_page_len[b], p.page_size);
    for (int64_t g = 0; g < group; ++g) {
      float mx = -INFINITY;
      for (int64_t t = 0; t < ntok; ++t) {
        const T* k = kc + (int64_t)pages[j] * p.k_stride_page + t * p.k_stride_tok + h * p.k_stride_head;
        VF a = set1(0.0f);
        for (int d = 0; d < D; d += W) a = fmadd(load(qf.data() + g * D + d), load(k + d), a);
        sv[t] = hsum(a);
        mx = sv[t] > mx ? sv[t] : mx;
      }
      float sum = 0.0f;
      for (int64_t t = 0; t < ntok; ++t) sum += std::exp(sv[t] - mx);
      plse[j * group + g] = ntok > 0 ? mx + std::log(sum) : -INFINITY;
    }
  }
}

void page_lse(const paged::PagedParams& p, int64_t b, int64_t h, float* plse) {
  TT_DISPATCH_FLOAT(p.dtype, T, TT_DISPATCH_HEAD_DIM(p.D, D, page_lse_t<T, D>(p, b, h, plse)))
}

const CpuKernels kKernels = {summarize, score, attend, page_lse};

}  // namespace

const CpuKernels* sparse_kernels() { return &kKernels; }

}  // namespace TTSCALE_CPU_ISA
}  // namespace cpu
}  // namespace ttscale
