// Page key summaries, query-aware sparse paged decode and per-page attention mass: schemas,
// validation (paged_attention's helpers, paged_checks.h), the CPU implementation (phases of
// at::parallel_for over the per-ISA kernels) and, under TTSCALE_WITH_CUDA, the CUDA registration.
// Formats, selection rule and schedule: sparse_paged_attention.h.
#include "ops/sparse_paged_attention/sparse_paged_attention.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/checks.h"
#include "common/cpu_dispatch.h"
#include "common/dispatch.h"
#include "ops/paged_attention/paged_checks.h"

#if defined(TTSCALE_WITH_CUDA)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include "ops/sparse_paged_attention/sparse_paged_attention_cuda.h"
#endif

namespace ttscale {
namespace sparse {

using at::Tensor;

namespace {

void check_summaries(const Tensor& summaries, const Tensor& k_cache) {
  check_device(summaries, "summaries", k_cache, "k_cache");
  TT_CHECK(summaries.dim() == 4 && summaries.size(0) == k_cache.size(0) && summaries.size(1) == 3 &&
               summaries.size(2) == k_cache.size(2) && summaries.size(3) == k_cache.size(3),
           "summaries must have shape [num_pages, 3, num_kv_heads, head_dim] = [", k_cache.size(0), ", 3, ",
           k_cache.size(2), ", ", k_cache.size(3), "] (min, max, mean of each page's keys; see new_page_summaries), "
           "got ", summaries.sizes());
  TT_CHECK(summaries.scalar_type() == k_cache.scalar_type(), "summaries dtype (", summaries.scalar_type(),
           ") must match k_cache dtype (", k_cache.scalar_type(), ")");
  check_last_dim_contiguous(summaries, "summaries");
}

// Host lists of (page id, valid tokens) from `pages` [n] and optional `page_lens` [n].
std::pair<std::vector<int64_t>, std::vector<int64_t>> page_list(const Tensor& k_cache, const Tensor& pages,
                                                                const c10::optional<Tensor>& page_lens) {
  check_device(pages, "pages", k_cache, "k_cache");
  check_index_dtype(pages, "pages");
  TT_CHECK(pages.dim() == 1, "pages must be 1-D [n] page ids, got shape ", pages.sizes());
  const int64_t n = pages.size(0), P = k_cache.size(0), ps = k_cache.size(1);
  const Tensor ph = pages.to(at::kCPU, at::kLong).contiguous();
  std::vector<int64_t> pg(ph.data_ptr<int64_t>(), ph.data_ptr<int64_t>() + n), ln(n, ps);
  for (int64_t i = 0; i < n; ++i)
    TT_CHECK_VALUE(pg[i] >= 0 && pg[i] < P, "pages[", i, "] = ", pg[i], " is out of range [0, num_pages = ", P, ")");
  if (page_lens) {
    check_device(*page_lens, "page_lens", k_cache, "k_cache");
    check_index_dtype(*page_lens, "page_lens");
    TT_CHECK(page_lens->dim() == 1 && page_lens->size(0) == n, "page_lens must be 1-D with one entry per page (", n,
             "), got shape ", page_lens->sizes());
    const Tensor lh = page_lens->to(at::kCPU, at::kLong).contiguous();
    const int64_t* l = lh.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
      TT_CHECK_VALUE(l[i] >= 1 && l[i] <= ps, "page_lens[", i, "] = ", l[i], " must be in 1..page_size (", ps, ")");
      ln[i] = l[i];
    }
  }
  return {pg, ln};
}

SummaryParams summary_params(const Tensor& k_cache, const Tensor& summaries) {
  SummaryParams sp;
  sp.k_cache = k_cache.data_ptr();
  sp.k_stride_page = k_cache.stride(0);
  sp.k_stride_tok = k_cache.stride(1);
  sp.k_stride_head = k_cache.stride(2);
  sp.summaries = summaries.data_ptr();
  sp.s_stride_page = summaries.stride(0);
  sp.s_stride_kind = summaries.stride(1);
  sp.s_stride_head = summaries.stride(2);
  sp.dtype = dtype_of(k_cache.scalar_type());
  sp.Hkv = k_cache.size(2);
  sp.D = k_cache.size(3);
  sp.page_size = k_cache.size(1);
  return sp;
}

void summarize_pages(const Tensor& k_cache, Tensor& summaries, const std::vector<int64_t>& pages,
                     const std::vector<int64_t>& lens) {
  const int64_t n = (int64_t)pages.size();
  if (n == 0) return;
  SummaryParams sp = summary_params(k_cache, summaries);
  sp.n = n;
  if (k_cache.is_cuda()) {
#if defined(TTSCALE_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(k_cache.device());
    const Tensor pg = at::tensor(pages, at::TensorOptions().dtype(at::kLong)).to(k_cache.device());
    const Tensor ln = at::tensor(lens, at::TensorOptions().dtype(at::kLong)).to(k_cache.device());
    sp.pages = pg.data_ptr<int64_t>();
    sp.lens = ln.data_ptr<int64_t>();
    check_launch(summarize_pages_cuda(sp, at::cuda::getCurrentCUDAStream().stream()), "page summaries");
    return;
#else
    TT_CHECK(false, "page summaries: this build of ttscale has no CUDA kernels");
#endif
  }
  sp.pages = pages.data();
  sp.lens = lens.data();
  const CpuKernels* K = TT_CPU_SELECT(sparse_kernels);
  at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) { K->summarize(sp, i0, i1); });
}

void check_summary_cache(const Tensor& k_cache) {
  check_dim(k_cache, "k_cache", 4, "[num_pages, page_size, num_kv_heads, head_dim]");
  check_float_dtype(k_cache, "k_cache");
  check_last_dim_contiguous(k_cache, "k_cache");
  TT_CHECK(k_cache.size(1) >= 1, "k_cache page_size (dim 1) must be >= 1, got ", k_cache.size(1));
}

Tensor new_page_summaries_impl(const Tensor& k_cache, const c10::optional<Tensor>& page_lens) {
  check_summary_cache(k_cache);
  const int64_t P = k_cache.size(0);
  Tensor summaries = at::empty({P, 3, k_cache.size(2), k_cache.size(3)}, k_cache.options());
  const Tensor all = at::arange(P, at::TensorOptions().dtype(at::kLong));
  const auto pl = page_list(k_cache, all.to(k_cache.device()), page_lens);
  summarize_pages(k_cache, summaries, pl.first, pl.second);
  return summaries;
}

void update_page_summaries_impl(const Tensor& k_cache, Tensor summaries, const Tensor& pages,
                                const c10::optional<Tensor>& page_lens) {
  check_summary_cache(k_cache);
  check_summaries(summaries, k_cache);
  check_no_internal_overlap(summaries, "summaries");
  check_no_overlap(summaries, "summaries", k_cache, "k_cache", /*other_is_output=*/false);
  const auto pl = page_list(k_cache, pages, page_lens);
  // A page listed twice would be summarised by two threads (CPU chunks, CUDA blocks) at once, and
  // with different lengths the result would depend on which finished last.
  std::vector<int64_t> sorted = pl.first;
  std::sort(sorted.begin(), sorted.end());
  for (size_t i = 1; i < sorted.size(); ++i)
    TT_CHECK_VALUE(sorted[i] != sorted[i - 1], "pages lists page ", sorted[i], " more than once");
  summarize_pages(k_cache, summaries, pl.first, pl.second);
}

// ---------------------------------------------------------------- sparse decode
struct SparseInputs {
  paged::AttnInputs in;
  int64_t budget = 0;  // sink + local + top_k
  // Row width of selected and of every per-(b, h) buffer: min(budget, nnz = kv_indices.size(0)). No
  // sequence has more than nnz pages, so no row ever holds more kept pages than this, and a budget
  // far above the cache (top_k_pages = 2^30 as "keep everything") costs nothing. It is a function
  // of shapes only, so the fake kernel (which cannot read the page table) gives the same shape.
  int64_t width = 0;
};

SparseInputs validate_sparse(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& summaries,
                             const Tensor& kv_indptr, const Tensor& kv_indices, const Tensor& kv_last_page_len,
                             int64_t top_k_pages, int64_t sink_pages, int64_t local_pages, double scale) {
  TT_CHECK_VALUE(top_k_pages >= 0, "top_k_pages must be >= 0, got ", top_k_pages);
  TT_CHECK_VALUE(sink_pages >= 0, "sink_pages must be >= 0, got ", sink_pages);
  TT_CHECK_VALUE(local_pages >= 0, "local_pages must be >= 0, got ", local_pages);
  SparseInputs si;
  si.in = paged::validate_paged_attention(q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, c10::nullopt,
                                          scale, -1, 0.0);
  check_summaries(summaries, k_cache);
  // each term is checked first: their int64 sum could wrap (sys.maxsize as "keep everything").
  // Nothing is sized by the budget itself (SparseInputs::width), so the limit only keeps the sum
  // well inside int64; 2^30 already exceeds the pages of any real sequence.
  constexpr int64_t kMaxBudget = (int64_t)1 << 30;
  TT_CHECK_VALUE(top_k_pages <= kMaxBudget && sink_pages <= kMaxBudget && local_pages <= kMaxBudget &&
                     top_k_pages + sink_pages + local_pages <= kMaxBudget,
                 "top_k_pages + sink_pages + local_pages must be <= 2^30 (each term and their sum), got ",
                 top_k_pages, " + ", sink_pages, " + ", local_pages);
  si.budget = top_k_pages + sink_pages + local_pages;
  si.width = std::min<int64_t>(si.budget, kv_indices.size(0));
  return si;
}

// Kept logical pages of (b, h), ascending, from the scores of the sequence's pages
// (scores[j * Hkv + h]); writes n_kept = min(np, sink + local + top_k) entries to `kept` (a row of
// selected: its width min(budget, nnz) is at least that, as np <= nnz).
int64_t select_pages(const float* scores, int64_t np, int64_t Hkv, int64_t h, int64_t sink, int64_t local,
                     int64_t top_k, int32_t* kept, std::vector<int32_t>& cand) {
  if (np <= sink + local + top_k) {
    for (int64_t j = 0; j < np; ++j) kept[j] = (int32_t)j;
    return np;
  }
  cand.clear();
  for (int64_t j = sink; j < np - local; ++j) cand.push_back((int32_t)j);
  auto before = [&](int32_t a, int32_t b) { return ranks_before(scores[a * Hkv + h], a, scores[b * Hkv + h], b); };
  if (top_k < (int64_t)cand.size()) std::nth_element(cand.begin(), cand.begin() + top_k, cand.end(), before);
  cand.resize(top_k);
  for (int64_t j = 0; j < sink; ++j) cand.push_back((int32_t)j);
  for (int64_t j = np - local; j < np; ++j) cand.push_back((int32_t)j);
  std::sort(cand.begin(), cand.end());
  for (size_t i = 0; i < cand.size(); ++i) kept[i] = cand[i];
  return (int64_t)cand.size();
}

// When no sequence has more pages than the budget, every page is kept and the op is dense paged
// attention: it runs paged_attention's kernels (the same numbers bit for bit, and its schedule, tuned
// for whole sequences), and selected lists every page.
bool dense_if_all_kept(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& kv_indptr,
                       const Tensor& kv_indices, const Tensor& kv_last_page_len, const SparseInputs& si, double scale,
                       Tensor& out, Tensor& lse, Tensor& selected) {
  const int64_t B = si.in.ci.B, Hkv = si.in.ci.Hkv, budget = si.budget, width = si.width;
  const int32_t* ip = si.in.ci.indptr.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    if (ip[b + 1] - ip[b] > budget) return false;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ttscale::paged_attention", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                         const Tensor&, const Tensor&, const c10::optional<Tensor>&,
                                                         bool, double, int64_t, double, bool)>();
  std::tie(out, lse) = op.call(q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, c10::nullopt, true, scale,
                               -1, 0.0, true);
  Tensor sel = at::full({B, Hkv, width}, -1, at::TensorOptions().dtype(at::kInt));
  int32_t* sp = sel.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t j = 0; j < ip[b + 1] - ip[b]; ++j) sp[(b * Hkv + h) * width + j] = (int32_t)j;
  selected = sel.to(q.device());
  return true;
}

SparseParams sparse_params(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& summaries,
                           const SparseInputs& si, double scale, int64_t top_k, int64_t sink, int64_t local) {
  SparseParams s;
  s.p = paged::make_params(q, k_cache, v_cache, si.in, true, scale, -1, 0.0);
  s.summaries = summaries.data_ptr();
  s.s_stride_page = summaries.stride(0);
  s.s_stride_kind = summaries.stride(1);
  s.s_stride_head = summaries.stride(2);
  s.sink = sink;
  s.local = local;
  s.top_k = top_k;
  // the kernels use `budget` as the row stride of selected and in "np <= budget: keep every page";
  // the row width serves both, since np <= nnz makes np <= width and np <= sink + local + top_k agree
  s.budget = si.width;
  return s;
}

std::tuple<Tensor, Tensor, Tensor> sparse_paged_attention_cpu(const Tensor& q, const Tensor& k_cache,
                                                              const Tensor& v_cache, const Tensor& summaries,
                                                              const Tensor& kv_indptr, const Tensor& kv_indices,
                                                              const Tensor& kv_last_page_len, int64_t top_k_pages,
                                                              int64_t sink_pages, int64_t local_pages, double scale) {
  const SparseInputs si = validate_sparse(q, k_cache, v_cache, summaries, kv_indptr, kv_indices, kv_last_page_len,
                                          top_k_pages, sink_pages, local_pages, scale);
  const int64_t B = si.in.ci.B, Hq = si.in.Hq, Hkv = si.in.ci.Hkv, D = si.in.ci.D, group = Hq / Hkv;
  const int64_t width = si.width;  // row width of selected; "np <= width" means "np <= budget" (SparseInputs)
  Tensor out = at::empty({B, Hq, D}, q.options());
  Tensor lse = at::empty({B, Hq}, q.options().dtype(at::kFloat));
  Tensor selected = at::full({B, Hkv, width}, -1, q.options().dtype(at::kInt));
  if (B == 0) return {out, lse, selected};
  if (dense_if_all_kept(q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, si, scale, out, lse, selected))
    return {out, lse, selected};
  SparseParams s = sparse_params(q, k_cache, v_cache, summaries, si, scale, top_k_pages, sink_pages, local_pages);
  const int32_t* ip = si.in.ci.indptr.data_ptr<int32_t>();
  s.p.kv_indptr = ip;
  s.p.kv_indices = si.in.ci.indices.data_ptr<int32_t>();
  s.p.kv_last_page_len = si.in.ci.last.data_ptr<int32_t>();
  const CpuKernels* K = TT_CPU_SELECT(sparse_kernels);
  const int64_t nnz = ip[B];
  std::vector<float> scores((size_t)std::max<int64_t>(nnz, 1) * Hkv);  // [nnz][Hkv]
  int32_t* sel = selected.data_ptr<int32_t>();
  float* lse_p = lse.data_ptr<float>();
  int64_t max_kept = 0;
  for (int64_t b = 0; b < B; ++b) max_kept = std::max<int64_t>(max_kept, std::min<int64_t>(ip[b + 1] - ip[b], width));
  const int64_t threads = at::get_num_threads();
  int64_t n_split = 1;
  if (B * Hkv < 2 * threads)
    n_split = std::max<int64_t>(1, std::min<int64_t>((2 * threads + B * Hkv - 1) / (B * Hkv), (max_kept + 7) / 8));

  if (B >= 2 * threads) {
    // fused: one item per sequence, no barrier between score, select and attend. Scoring takes all
    // KV heads of a page at once, so each page's min and max blocks ([Hkv][D] each, contiguous) are
    // read once, in one pass over the scattered pages (per-head passes re-walked every page Hkv times).
    TT_DISPATCH_FLOAT(s.p.dtype, OT, {
      OT* out_p = static_cast<OT*>(out.data_ptr());
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        std::vector<int32_t> cand;
        std::vector<float> o(group * D), l(group);
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t np = ip[b + 1] - ip[b];
          float* sc = scores.data() + ip[b] * Hkv;
          if (np > width) K->score(s, b, 0, Hkv, 0, np, sc);
          for (int64_t h = 0; h < Hkv; ++h) {
            const int64_t i = b * Hkv + h;
            const int64_t n = select_pages(sc, np, Hkv, h, sink_pages, local_pages, top_k_pages, sel + i * width, cand);
            K->attend(s, b, h, sel + i * width, n, o.data(), l.data());
            const int64_t row = b * Hq + h * group;
            for (int64_t x = 0; x < group * D; ++x) store_float(out_p + row * D + x, o[x]);
            for (int64_t g = 0; g < group; ++g) lse_p[row + g] = l[g];
          }
        }
      });
    });
    return {out, lse, selected};
  }

  // phase 1: scores of the pages of sequences that do not keep everything, all heads per item
  struct ScoreItem { int64_t b, j0, j1; };
  std::vector<ScoreItem> sitems;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t np = ip[b + 1] - ip[b];
    if (np <= width) continue;
    for (int64_t j0 = 0; j0 < np; j0 += kScorePages) sitems.push_back({b, j0, std::min(np, j0 + kScorePages)});
  }
  at::parallel_for(0, (int64_t)sitems.size(), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const ScoreItem& it = sitems[i];
      K->score(s, it.b, 0, Hkv, it.j0, it.j1, scores.data() + (ip[it.b] + it.j0) * Hkv);
    }
  });

  // phase 2: selection per (b, h)
  std::vector<int64_t> n_kept(B * Hkv);
  at::parallel_for(0, B * Hkv, 1, [&](int64_t i0, int64_t i1) {
    std::vector<int32_t> cand;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hkv, h = i % Hkv, np = ip[b + 1] - ip[b];
      n_kept[i] = select_pages(scores.data() + ip[b] * Hkv, np, Hkv, h, sink_pages, local_pages, top_k_pages,
                               sel + i * width, cand);
    }
  });

  // phase 3: attention over the kept pages in n_split parts, then the merge
  Tensor part = at::empty({n_split, B * Hq, D}, q.options().dtype(at::kFloat));
  Tensor part_lse = at::empty({n_split, B * Hq}, q.options().dtype(at::kFloat));
  float* pp = part.data_ptr<float>();
  float* pl = part_lse.data_ptr<float>();
  at::parallel_for(0, B * Hkv * n_split, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t sp = i % n_split, bh = i / n_split, b = bh / Hkv, h = bh % Hkv;
      const int64_t n = n_kept[bh], per = (n + n_split - 1) / n_split;
      const int64_t k0 = std::min(n, sp * per), k1 = std::min(n, (sp + 1) * per);
      const int64_t row = b * Hq + h * group;
      K->attend(s, b, h, sel + bh * width + k0, k1 - k0, pp + (sp * B * Hq + row) * D, pl + sp * B * Hq + row);
    }
  });
  TT_DISPATCH_FLOAT(s.p.dtype, OT, {
    OT* out_p = static_cast<OT*>(out.data_ptr());
    for (int64_t r = 0; r < B * Hq; ++r) {  // few rows on this path (B * Hkv < 2 * threads)
      float l = pl[r];
      std::vector<float> acc(pp + r * D, pp + (r + 1) * D);
      for (int64_t x = 1; x < n_split; ++x) {
        const attn::MergeWeights w = attn::merge_weights(l, pl[x * B * Hq + r]);
        const float* o2 = pp + (x * B * Hq + r) * D;
        for (int64_t d = 0; d < D; ++d) acc[d] = w.wa * acc[d] + w.wb * o2[d];
        l = w.lse;
      }
      for (int64_t d = 0; d < D; ++d) store_float(out_p + r * D + d, acc[d]);
      lse_p[r] = l;
    }
  });
  return {out, lse, selected};
}

// ---------------------------------------------------------------- attention mass
struct MassInputs {
  paged::AttnInputs in;
  Tensor pages;  // host int32 [B, Hkv, n]
};

MassInputs validate_mass(const Tensor& q, const Tensor& k_cache, const Tensor& kv_indptr, const Tensor& kv_indices,
                         const Tensor& kv_last_page_len, const Tensor& pages, double scale) {
  MassInputs mi;
  mi.in = paged::validate_paged_attention(q, k_cache, k_cache, kv_indptr, kv_indices, kv_last_page_len, c10::nullopt,
                                          scale, -1, 0.0);
  const int64_t B = mi.in.ci.B, Hkv = mi.in.ci.Hkv;
  check_device(pages, "pages", q, "q");
  TT_CHECK(pages.scalar_type() == at::kInt, "pages must be int32 (logical page indices, -1 = none), got ",
           pages.scalar_type());
  TT_CHECK(pages.dim() == 3 && pages.size(0) == B && pages.size(1) == Hkv,
           "pages must have shape [B, num_kv_heads, n] = [", B, ", ", Hkv, ", n] (as returned by "
           "sparse_paged_attention(return_selected=True)), got ", pages.sizes());
  mi.pages = pages.to(at::kCPU).contiguous();
  const int32_t* ip = mi.in.ci.indptr.data_ptr<int32_t>();
  const int32_t* pg = mi.pages.data_ptr<int32_t>();
  const int64_t n = pages.size(2);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t np = ip[b + 1] - ip[b];
    for (int64_t i = 0; i < Hkv * n; ++i) {
      const int32_t j = pg[b * Hkv * n + i];
      TT_CHECK_VALUE(j == -1 || (j >= 0 && j < np), "pages[", b, ", ", i / n, ", ", i % n, "] = ", j,
                     " must be -1 or a page index of sequence ", b, " in [0, ", np, ")");
    }
  }
  return mi;
}

Tensor attention_mass_cpu(const Tensor& q, const Tensor& k_cache, const Tensor& kv_indptr, const Tensor& kv_indices,
                          const Tensor& kv_last_page_len, const Tensor& pages, double scale) {
  const MassInputs mi = validate_mass(q, k_cache, kv_indptr, kv_indices, kv_last_page_len, pages, scale);
  const int64_t B = mi.in.ci.B, Hq = mi.in.Hq, Hkv = mi.in.ci.Hkv, group = Hq / Hkv, n = pages.size(2);
  Tensor mass = at::zeros({B, Hq, n}, q.options().dtype(at::kFloat));
  if (B == 0 || n == 0) return mass;
  paged::PagedParams p = paged::make_params(q, k_cache, k_cache, mi.in, true, scale, -1, 0.0);
  const int32_t* ip = mi.in.ci.indptr.data_ptr<int32_t>();
  p.kv_indptr = ip;
  p.kv_indices = mi.in.ci.indices.data_ptr<int32_t>();
  p.kv_last_page_len = mi.in.ci.last.data_ptr<int32_t>();
  const CpuKernels* K = TT_CPU_SELECT(sparse_kernels);
  const int32_t* pg = mi.pages.data_ptr<int32_t>();
  float* m = mass.data_ptr<float>();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> plse;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hkv, h = i % Hkv, np = ip[b + 1] - ip[b];
      if (np == 0) continue;
      plse.resize(np * group);
      K->page_lse(p, b, h, plse.data());
      for (int64_t g = 0; g < group; ++g) {
        float mx = -INFINITY;
        for (int64_t j = 0; j < np; ++j) mx = std::max(mx, plse[j * group + g]);
        double sum = 0.0;
        for (int64_t j = 0; j < np; ++j) sum += std::exp((double)plse[j * group + g] - mx);
        const double total = mx + std::log(sum);
        for (int64_t c = 0; c < n; ++c) {
          const int32_t j = pg[(b * Hkv + h) * n + c];
          if (j >= 0) m[(b * Hq + h * group + g) * n + c] = (float)std::exp((double)plse[j * group + g] - total);
        }
      }
    }
  });
  return mass;
}

}  // namespace

// Recomputes the summaries of the given pages over their first lens[i] tokens (any device); used
// by append_paged_kv (paged_attention.cpp) to keep summaries current.
void refresh_page_summaries(const Tensor& k_cache, Tensor& summaries, const std::vector<int64_t>& pages,
                            const std::vector<int64_t>& lens) {
  summarize_pages(k_cache, summaries, pages, lens);
}

void check_page_summaries(const Tensor& summaries, const Tensor& k_cache) { check_summaries(summaries, k_cache); }

}  // namespace sparse
}  // namespace ttscale

TORCH_LIBRARY_FRAGMENT(ttscale, m) {
  m.def("new_page_summaries(Tensor k_cache, Tensor? page_lens=None) -> Tensor");
  m.def("update_page_summaries(Tensor k_cache, Tensor(a!) summaries, Tensor pages, Tensor? page_lens=None) -> ()");
  m.def(
      "sparse_paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor summaries, Tensor kv_indptr, "
      "Tensor kv_indices, Tensor kv_last_page_len, int top_k_pages, int sink_pages, int local_pages, float scale) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "attention_mass(Tensor q, Tensor k_cache, Tensor kv_indptr, Tensor kv_indices, Tensor kv_last_page_len, "
      "Tensor pages, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(ttscale, CPU, m) {
  m.impl("new_page_summaries", &ttscale::sparse::new_page_summaries_impl);
  m.impl("update_page_summaries", &ttscale::sparse::update_page_summaries_impl);
  m.impl("sparse_paged_attention", &ttscale::sparse::sparse_paged_attention_cpu);
  m.impl("attention_mass", &ttscale::sparse::attention_mass_cpu);
}

// ---------------------------------------------------------------- CUDA (not yet run on a GPU)
#if defined(TTSCALE_WITH_CUDA)
namespace ttscale {
namespace sparse {
namespace {

std::tuple<Tensor, Tensor, Tensor> sparse_paged_attention_cuda_impl(
    const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& summaries, const Tensor& kv_indptr,
    const Tensor& kv_indices, const Tensor& kv_last_page_len, int64_t top_k_pages, int64_t sink_pages,
    int64_t local_pages, double scale) {
  TT_CHECK(!paged::capturing(q), "sparse_paged_attention: CUDA graph capture is not supported yet (the scoring "
           "items are built on the host from the page table)");
  const SparseInputs si = validate_sparse(q, k_cache, v_cache, summaries, kv_indptr, kv_indices, kv_last_page_len,
                                          top_k_pages, sink_pages, local_pages, scale);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = si.in.ci.B, Hq = si.in.Hq, Hkv = si.in.ci.Hkv, D = si.in.ci.D;
  const int64_t width = si.width;  // row width of selected; "np <= width" means "np <= budget" (SparseInputs)
  Tensor out = at::empty({B, Hq, D}, q.options());
  Tensor lse = at::empty({B, Hq}, q.options().dtype(at::kFloat));
  Tensor selected = at::full({B, Hkv, width}, -1, q.options().dtype(at::kInt));
  if (B == 0) return {out, lse, selected};
  if (dense_if_all_kept(q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, si, scale, out, lse, selected))
    return {out, lse, selected};
  SparseParams s = sparse_params(q, k_cache, v_cache, summaries, si, scale, top_k_pages, sink_pages, local_pages);
  const Tensor ip_d = kv_indptr.contiguous(), ix_d = kv_indices.contiguous(), ll_d = kv_last_page_len.contiguous();
  s.p.kv_indptr = ip_d.data_ptr<int32_t>();
  s.p.kv_indices = ix_d.data_ptr<int32_t>();
  s.p.kv_last_page_len = ll_d.data_ptr<int32_t>();
  const int32_t* ip = si.in.ci.indptr.data_ptr<int32_t>();
  std::vector<int32_t> items;
  int64_t max_kept = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t np = ip[b + 1] - ip[b];
    max_kept = std::max(max_kept, std::min(np, width));
    if (np <= width) continue;
    for (int64_t j0 = 0; j0 < np; j0 += kScorePages)
      items.insert(items.end(), {(int32_t)b, (int32_t)j0, (int32_t)std::min(np, j0 + kScorePages)});
  }
  const Tensor items_d = at::from_blob(items.data(), {(int64_t)items.size()}, at::TensorOptions().dtype(at::kInt))
                             .to(q.device());
  Tensor scores = at::empty({std::max<int64_t>(ip[B], 1) * Hkv}, q.options().dtype(at::kFloat));
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t n_split = 1;
  if (B * Hkv < 2 * sms) n_split = std::max<int64_t>(1, std::min<int64_t>((2 * sms + B * Hkv - 1) / (B * Hkv),
                                                                           (max_kept + 3) / 4));
  Tensor part = at::empty({n_split, B * Hq, D}, q.options().dtype(at::kFloat));
  Tensor part_lse = at::empty({n_split, B * Hq}, q.options().dtype(at::kFloat));
  SparseCudaWork w;
  w.items = reinterpret_cast<const ScoreItem*>(items_d.data_ptr<int32_t>());
  w.n_items = (int)(items.size() / 3);
  w.scores = scores.data_ptr<float>();
  w.selected = selected.data_ptr<int32_t>();
  w.n_split = (int)n_split;
  w.part_out = part.data_ptr<float>();
  w.part_lse = part_lse.data_ptr<float>();
  w.out = out.data_ptr();
  w.lse = lse.data_ptr<float>();
  check_launch(sparse_paged_attention_cuda(s, w, at::cuda::getCurrentCUDAStream().stream()), "sparse_paged_attention");
  return {out, lse, selected};
}

// attention_mass on CUDA: an analysis op, written with ATen ops per sequence (dense logits of the
// sequence, softmax, per-page sums) rather than a dedicated kernel.
Tensor attention_mass_cuda_impl(const Tensor& q, const Tensor& k_cache, const Tensor& kv_indptr,
                                const Tensor& kv_indices, const Tensor& kv_last_page_len, const Tensor& pages,
                                double scale) {
  const MassInputs mi = validate_mass(q, k_cache, kv_indptr, kv_indices, kv_last_page_len, pages, scale);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = mi.in.ci.B, Hq = mi.in.Hq, Hkv = mi.in.ci.Hkv, group = Hq / Hkv, D = mi.in.ci.D;
  const int64_t ps = k_cache.size(1), n = pages.size(2);
  Tensor mass = at::zeros({B, Hq, n}, q.options().dtype(at::kFloat));
  const int32_t* ip = mi.in.ci.indptr.data_ptr<int32_t>();
  const int32_t* ll = mi.in.ci.last.data_ptr<int32_t>();
  const Tensor ix = kv_indices.to(at::kLong);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t np = ip[b + 1] - ip[b];
    if (np == 0 || n == 0) continue;
    const int64_t L = (np - 1) * ps + ll[b];
    const Tensor k = k_cache.index_select(0, ix.slice(0, ip[b], ip[b + 1])).reshape({np * ps, Hkv, D}).to(at::kFloat);
    const Tensor qq = q.select(0, b).to(at::kFloat).reshape({Hkv, group, D});
    Tensor logit = at::einsum("hgd,lhd->hgl", {qq, k}) * scale;  // [Hkv, g, np * ps]
    logit.slice(2, L, np * ps).fill_(-INFINITY);
    const Tensor per_page = at::softmax(logit.to(at::kDouble), -1).reshape({Hkv, group, np, ps}).sum(-1);
    const Tensor pg = pages.select(0, b).to(at::kLong);      // [Hkv, n]
    const Tensor valid = pg.ge(0);
    const Tensor idx = pg.clamp_min(0).unsqueeze(1).expand({Hkv, group, n});
    const Tensor m = per_page.gather(2, idx).mul(valid.unsqueeze(1)).to(at::kFloat);
    mass.select(0, b).copy_(m.reshape({Hq, n}));
  }
  return mass;
}

}  // namespace
}  // namespace sparse
}  // namespace ttscale

TORCH_LIBRARY_IMPL(ttscale, CUDA, m) {
  m.impl("new_page_summaries", &ttscale::sparse::new_page_summaries_impl);
  m.impl("update_page_summaries", &ttscale::sparse::update_page_summaries_impl);
  m.impl("sparse_paged_attention", &ttscale::sparse::sparse_paged_attention_cuda_impl);
  m.impl("attention_mass", &ttscale::sparse::attention_mass_cuda_impl);
}
#endif  // TTSCALE_WITH_CUDA
