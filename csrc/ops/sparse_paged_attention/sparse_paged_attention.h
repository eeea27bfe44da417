// Query-aware sparse paged decode (Quest-style block top-k) and page key summaries: definitions
// shared by the CPU and CUDA paths (torch-free).
//
// Page summaries: summaries [num_pages, 3, Hkv, D] in the cache dtype; summaries[p, 0, h] is the
// element-wise min, [p, 1, h] the element-wise max and [p, 2, h] the mean of the keys of KV head h
// in the first n valid slots of page p (n = page_lens[p], default page_size). Min and max are exact
// (they are stored values); the mean is summed in fp32 over the slots in order and rounded once to
// the cache dtype (summarize_page below, the same on CPU and GPU). The cache dtype keeps the bytes
// that scoring must read small: scoring reads the min and max rows only, 2 * Hkv * D elements per
// page, i.e. 2 / page_size of the keys.
//
// Sparse decode (one query per sequence, q [B, Hq, D]): for sequence b with np pages and KV head h,
// page j (logical index into the sequence's page list) scores
//   s(j) = max over the group's query heads g of  sum_d max(q_gd * min_jd, q_gd * max_jd),
// the Quest upper bound of q_g . k over the page's keys; the max over the group keeps a page that
// any head of the group may need. If np <= budget = sink + local + top_k, every page is kept (the
// result is dense paged attention). Otherwise the kept set is pages [0, sink), [np - local, np) and
// the top_k of the pages in between by (score descending, then page index ascending) — a total
// order, so the set is unique given the scores. The output is exact attention of the group's
// query heads over the keys of the kept pages (the last page holding kv_last_page_len tokens).
// selected [B, Hkv, min(budget, nnz)] int32 (nnz = kv_indices.size(0), more than any sequence's
// page count) lists the kept logical page indices in ascending order, padded with -1.
//
// CPU schedule (sparse_paged_attention.cpp). When the (b, h) pairs fill the threads, one parallel
// region of items (b, h), each fully fused: score the sequence's pages for head h, select, attend,
// write the output rows (one barrier in all: on a loaded machine every barrier costs a scheduler
// wake-up). Otherwise (few sequences and KV heads, long sequences) three phases: scores in items of
// (b, page range) for all heads, selection per (b, h), attention per (b, h, split of the kept pages)
// into fp32 partials (out, lse) merged with attn::merge_weights, so one long sequence is spread
// over every thread.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/attention_math.h"
#include "common/dtype.h"
#include "common/host_device.h"
#include "ops/paged_attention/paged_attention.h"

namespace ttscale {
namespace sparse {

constexpr int kMin = 0, kMax = 1, kMean = 2;  // rows of a page's summary
constexpr int kKeyChunk = 64;                 // keys per online-softmax block (CPU)
constexpr int64_t kScorePages = 128;          // pages per CPU scoring item

// One element of the Quest bound: the largest q * k for k in [mn, mx]. q = 0 gives 0 even against an
// infinite bound (0 * inf would be NaN, and a NaN score drops the page).
TT_HD float quest_term(float q, float mn, float mx) { return q > 0.0f ? q * mx : (q < 0.0f ? q * mn : 0.0f); }

// Selection order: page (score sa, index pa) is ranked before (sb, pb). NaN scores rank last.
TT_HD bool ranks_before(float sa, int64_t pa, float sb, int64_t pb) {
  const bool na = sa != sa, nb = sb != sb;
  if (na || nb) return !na && nb ? true : (na && nb ? pa < pb : false);
  return sa > sb || (sa == sb && pa < pb);
}

// Tokens held by logical page j of a sequence of np pages.
TT_HD int64_t page_tokens(int64_t j, int64_t np, int64_t last_len, int64_t page_size) {
  return j + 1 < np ? page_size : last_len;
}

// Pages that are kept whatever their score: the sink and local windows. Only meaningful when
// np > sink + local + top_k (otherwise every page is kept).
TT_HD bool forced_page(int64_t j, int64_t np, int64_t sink, int64_t local) { return j < sink || j >= np - local; }

// Summary of one page and KV head: n >= 1 valid key rows `key(t)` (t < n) of D elements.
// Writes min, max and mean (fp32 sum in token order, divided by n, rounded once to T). A NaN in any
// slot makes min and max NaN (as torch.amin / amax), wherever it is: comparisons skip NaN, so
// seeding from slot 0 alone made a NaN there poison the bounds and one elsewhere vanish.
template <typename T>
TT_HD void summarize_elem(const T* k0, int64_t tok_stride, int64_t n, int64_t d, T* mn, T* mx, T* mean) {
  float lo = to_float(k0[d]), hi = lo, sum = lo;
  T lo_v = k0[d], hi_v = k0[d];
  bool nan = lo != lo;
  T nan_v = k0[d];
  for (int64_t t = 1; t < n; ++t) {
    const T x = k0[t * tok_stride + d];
    const float f = to_float(x);
    if (f < lo) { lo = f; lo_v = x; }
    if (f > hi) { hi = f; hi_v = x; }
    if (f != f && !nan) { nan = true; nan_v = x; }
    sum += f;
  }
  mn[d] = nan ? nan_v : lo_v;
  mx[d] = nan ? nan_v : hi_v;
  store_float(&mean[d], sum / (float)n);
}

// Pages to (re)summarise: page ids and their valid token counts.
struct SummaryParams {
  const void* k_cache = nullptr;  // [num_pages, page_size, Hkv, D]
  int64_t k_stride_page = 0, k_stride_tok = 0, k_stride_head = 0;
  void* summaries = nullptr;  // [num_pages, 3, Hkv, D]
  int64_t s_stride_page = 0, s_stride_kind = 0, s_stride_head = 0;
  DType dtype = DType::kFloat32;
  int64_t Hkv = 0, D = 0, page_size = 1;
  const int64_t* pages = nullptr;  // [n] page ids
  const int64_t* lens = nullptr;   // [n] valid tokens (1..page_size)
  int64_t n = 0;
};

// Everything the sparse decode kernels read (paged params plus summaries and the budget).
struct SparseParams {
  paged::PagedParams p;  // q [B, Hq, D], caches, page table (qo_indptr unused: decode)
  const void* summaries = nullptr;
  int64_t s_stride_page = 0, s_stride_kind = 0, s_stride_head = 0;
  // budget: the row width of selected, min(sink + local + top_k, nnz) (sparse_paged_attention.cpp)
  int64_t sink = 1, local = 1, top_k = 0, budget = 2;
};

// Per-ISA CPU kernels (sparse_paged_attention_cpu.cpp).
struct CpuKernels {
  // Summaries of pages sp.pages[i0..i1), every KV head.
  void (*summarize)(const SummaryParams& sp, int64_t i0, int64_t i1);
  // Scores of logical pages [j0, j1) of sequence b for KV heads [h0, h1): scores[(j - j0) * Hkv + h].
  void (*score)(const SparseParams& s, int64_t b, int64_t h0, int64_t h1, int64_t j0, int64_t j1, float* scores);
  // Attention of the group's query heads of (b, h) over the keys of logical pages kept[0..n):
  // normalised fp32 out [group][D] and lse [group] (zeros / -inf when n == 0).
  void (*attend)(const SparseParams& s, int64_t b, int64_t h, const int32_t* kept, int64_t n, float* out,
                 float* lse);
  // Per-page log-sum-exp of the scaled logits of the group's query heads of (b, h), for every page
  // of sequence b: plse[j * group + g].
  void (*page_lse)(const paged::PagedParams& p, int64_t b, int64_t h, float* plse);
};

}  // namespace sparse
}  // namespace ttscale

#include "common/cpu_dispatch.h"
TT_DECLARE_CPU_KERNELS(ttscale::sparse::CpuKernels, sparse_kernels)
