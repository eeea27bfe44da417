// Paged attention, attention-state merge, paged KV append and page copy: schemas, validation
// (shared by CPU and CUDA), the CPU implementation (work items run with at::parallel_for over the
// per-ISA kernels, split-KV partials merged afterwards), and, under TTSCALE_WITH_CUDA, the CUDA
// registration. Formats and schedule: paged_attention.h.
#include "ops/paged_attention/paged_attention.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/parallel.h"
#include "common/cpu_dispatch.h"
#include "common/dispatch.h"
#include "ops/paged_attention/paged_checks.h"

#if defined(TTSCALE_WITH_CUDA)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include "ops/paged_attention/paged_attention_cuda.h"
#endif

namespace ttscale {
namespace sparse {
// sparse_paged_attention.cpp: page summaries kept current by append_paged_kv and copy_pages
void refresh_page_summaries(const at::Tensor& k_cache, at::Tensor& summaries, const std::vector<int64_t>& pages,
                            const std::vector<int64_t>& lens);
void check_page_summaries(const at::Tensor& summaries, const at::Tensor& k_cache);
}  // namespace sparse

namespace paged {
namespace {

using at::Tensor;


template <typename T>
void finalize_rows(const float* part, const float* part_lse, int64_t n_split, int64_t split_stride_rows, int64_t rows,
                   int64_t D, T* out, float* lse) {
  // rows are contiguous [rows][D] in both the partial buffers and the output
  for (int64_t r = 0; r < rows; ++r) {
    float l = part_lse[r];
    float acc[256];
    for (int64_t d = 0; d < D; ++d) acc[d] = part[r * D + d];
    for (int64_t s = 1; s < n_split; ++s) {
      const float* o2 = part + (s * split_stride_rows + r) * D;
      const attn::MergeWeights w = attn::merge_weights(l, part_lse[s * split_stride_rows + r]);
      for (int64_t d = 0; d < D; ++d) acc[d] = w.wa * acc[d] + w.wb * o2[d];
      l = w.lse;
    }
    for (int64_t d = 0; d < D; ++d) store_float(out + r * D + d, acc[d]);
    lse[r] = l;
  }
}

std::tuple<Tensor, Tensor> paged_attention_cpu(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                               const Tensor& kv_indptr, const Tensor& kv_indices,
                                               const Tensor& kv_last_page_len, const c10::optional<Tensor>& qo_indptr,
                                               bool causal, double scale, int64_t window_left, double softcap,
                                               bool return_lse) {
  (void)return_lse;
  const AttnInputs in = validate_paged_attention(q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len,
                                                 qo_indptr, scale, window_left, softcap);
  const int64_t T = in.T, Hq = in.Hq, Hkv = in.ci.Hkv, D = in.ci.D, B = in.ci.B;
  Tensor out = at::empty({T, Hq, D}, q.options());
  Tensor lse = at::empty({T, Hq}, q.options().dtype(at::kFloat));
  if (T == 0) return {out, lse};
  PagedParams p = make_params(q, k_cache, v_cache, in, causal, scale, window_left, softcap);
  const int32_t* ip = in.ci.indptr.data_ptr<int32_t>();
  const int32_t* ll = in.ci.last.data_ptr<int32_t>();
  const int32_t* qp = in.qo.data_ptr<int32_t>();
  p.kv_indptr = ip;
  p.kv_indices = in.ci.indices.data_ptr<int32_t>();
  p.kv_last_page_len = ll;
  p.qo_indptr = qp;
  const int64_t group = Hq / Hkv;
  const int64_t q_tile = std::max<int64_t>(1, kMaxRowsPerItem / group);

  // items without splits: (b, q tile, h), with their key ranges (union of visible ranges)
  struct Base { int64_t b, q0, q1, k0, k1; };
  std::vector<Base> base;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t kv_len = kv_len_of(ip, ll, b, p.page_size);
    const int64_t n_q = qp[b + 1] - qp[b];
    for (int64_t t0 = qp[b]; t0 < qp[b + 1]; t0 += q_tile) {
      const int64_t t1 = std::min<int64_t>(t0 + q_tile, qp[b + 1]);
      int64_t kb0 = kv_len, ke1 = 0;
      for (int64_t t = t0; t < t1; ++t) {
        int64_t kb, ke;
        attn::visible_range(t - qp[b] + kv_len - n_q, kv_len, causal, window_left, &kb, &ke);
        if (kb < ke) { kb0 = std::min(kb0, kb); ke1 = std::max(ke1, ke); }
      }
      if (ke1 < kb0) ke1 = kb0;
      base.push_back({b, t0, t1, kb0, ke1});
    }
  }
  // KV heads per item: all of them when the rows fit (decode), else one
  int64_t max_tile_q = 1;
  for (const Base& x : base) max_tile_q = std::max(max_tile_q, x.q1 - x.q0);
  const int64_t hpi = std::max<int64_t>(1, std::min<int64_t>(Hkv, kMaxRowsPerItem / (max_tile_q * group)));
  const int64_t n_hgroups = (Hkv + hpi - 1) / hpi;
  const int64_t threads = at::get_num_threads();
  const int64_t n_base = (int64_t)base.size() * n_hgroups;
  int64_t n_split = 1;
  if (n_base < 4 * threads) {
    int64_t longest = 0;
    for (const Base& x : base) longest = std::max(longest, x.k1 - x.k0);
    n_split = std::min<int64_t>((4 * threads + n_base - 1) / n_base, (longest + kMinSplitKeys - 1) / kMinSplitKeys);
    n_split = std::max<int64_t>(n_split, 1);
  }
  // partial buffers [n_split][T * Hq][D] (row = t * Hq + hq), only when keys are split: without a
  // split each item's normalised rows go straight to out (a per-call buffer of the whole output
  // cost a fresh mmap + page faults on every decode step, and two extra copies)
  Tensor part, part_lse;
  float* part_p = nullptr;
  float* part_l = nullptr;
  if (n_split > 1) {
    part = at::empty({n_split, T * Hq, D}, q.options().dtype(at::kFloat));
    part_lse = at::empty({n_split, T * Hq}, q.options().dtype(at::kFloat));
    part_p = part.data_ptr<float>();
    part_l = part_lse.data_ptr<float>();
  }
  float* lse_p = lse.data_ptr<float>();
  const CpuKernels* K = TT_CPU_SELECT(paged_kernels);
  const int64_t n_items = n_base * n_split;
  double macs = 0.0;  // q.k and p.v multiply-adds of the whole call (work of small decodes stays inline)
  for (const Base& x : base) macs += 2.0 * (double)((x.q1 - x.q0) * Hq) * (double)(x.k1 - x.k0) * (double)D;
  TT_DISPATCH_FLOAT(p.dtype, OT, {
    OT* out_p = static_cast<OT*>(out.data_ptr());
    at::parallel_for(0, n_items, grain_for_total(n_items, macs, kMinParallelMacs), [&](int64_t begin, int64_t end) {
      std::vector<char> scratch;
      std::vector<float> tmp_o, tmp_l;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t s = i % n_split;
        const int64_t hg = (i / n_split) % n_hgroups;
        const Base& x = base[i / (n_split * n_hgroups)];
        const int64_t h0 = hg * hpi, h1 = std::min(Hkv, h0 + hpi);
        const int64_t len = x.k1 - x.k0;
        // split boundaries rounded to whole chunks of keys
        int64_t per = (len + n_split - 1) / n_split;
        per = (per + kKeyChunk - 1) / kKeyChunk * kKeyChunk;
        PagedItem it{x.b, h0, h1, x.q0, x.q1, std::min(x.k1, x.k0 + s * per), std::min(x.k1, x.k0 + (s + 1) * per)};
        const int64_t nq = x.q1 - x.q0;
        const int64_t rows = (h1 - h0) * nq * group;
        const size_t need = (size_t)K->attend_scratch_bytes(rows, D);
        if (scratch.size() < need) scratch.resize(need);
        tmp_o.resize(rows * D);
        tmp_l.resize(rows);
        K->attend(p, it, tmp_o.data(), tmp_l.data(), scratch.data());
        // scatter rows (h, t, g) -> output row t * Hq + h * group + g (of the split's partial)
        for (int64_t h = h0; h < h1; ++h) {
          for (int64_t t = x.q0; t < x.q1; ++t) {
            const int64_t r0 = (h - h0) * nq * group + (t - x.q0) * group;
            const int64_t dst = t * Hq + h * group;
            if (n_split > 1) {
              std::memcpy(part_p + (s * T * Hq + dst) * D, tmp_o.data() + r0 * D, sizeof(float) * group * D);
              std::memcpy(part_l + s * T * Hq + dst, tmp_l.data() + r0, sizeof(float) * group);
            } else {
              const float* src = tmp_o.data() + r0 * D;
              OT* o = out_p + dst * D;
              for (int64_t e = 0; e < group * D; ++e) store_float(o + e, src[e]);
              std::memcpy(lse_p + dst, tmp_l.data() + r0, sizeof(float) * group);
            }
          }
        }
      }
    });
    if (n_split > 1) {
      at::parallel_for(0, T, grain_for(T, (double)(n_split * Hq * D), kMinParallelElems), [&](int64_t b0, int64_t b1) {
        finalize_rows<OT>(part_p + b0 * Hq * D, part_l + b0 * Hq, n_split, T * Hq, (b1 - b0) * Hq, D,
                          out_p + b0 * Hq * D, lse_p + b0 * Hq);
      });
    }
  });
  return {out, lse};
}

// ---------------------------------------------------------------- merge_attention_states
void validate_merge(const Tensor& a, const Tensor& la, const Tensor& b, const Tensor& lb, const char* an,
                    const char* lan, const char* bn, const char* lbn) {
  check_dim(a, an, 3, "[num_tokens, num_heads, head_dim]");
  check_float_dtype(a, an);
  check_device(b, bn, a, an);
  check_device(la, lan, a, an);
  check_device(lb, lbn, a, an);
  TT_CHECK(b.sizes() == a.sizes(), bn, " shape ", b.sizes(), " must equal ", an, " shape ", a.sizes());
  TT_CHECK(b.scalar_type() == a.scalar_type(), bn, " dtype (", b.scalar_type(), ") must match ", an, " dtype (",
           a.scalar_type(), ")");
  for (const auto& pr : {std::make_pair(&la, lan), std::make_pair(&lb, lbn)}) {
    TT_CHECK(pr.first->scalar_type() == at::kFloat, pr.second, " must be float32, got ", pr.first->scalar_type());
    TT_CHECK(pr.first->dim() == 2 && pr.first->size(0) == a.size(0) && pr.first->size(1) == a.size(1), pr.second,
             " must have shape [num_tokens, num_heads] = [", a.size(0), ", ", a.size(1), "], got ", pr.first->sizes());
  }
  check_last_dim_contiguous(a, an);
  check_last_dim_contiguous(b, bn);
}

void merge_cpu_into(const Tensor& a, const Tensor& la, const Tensor& b, const Tensor& lb, Tensor& out, Tensor& lse) {
  const int64_t n = a.size(0) * a.size(1), D = a.size(2);
  if (n == 0) return;
  const Tensor ac = a.contiguous(), bc = b.contiguous(), lac = la.contiguous(), lbc = lb.contiguous();
  const CpuKernels* K = TT_CPU_SELECT(paged_kernels);
  const DType dt = dtype_of(a.scalar_type());
  const int64_t es = a.element_size();
  const char* ap = static_cast<const char*>(ac.data_ptr());
  const char* bp = static_cast<const char*>(bc.data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  const float* lap = lac.data_ptr<float>();
  const float* lbp = lbc.data_ptr<float>();
  float* lop = lse.data_ptr<float>();
  at::parallel_for(0, n, grain_for(n, (double)D, kMinParallelElems), [&](int64_t r0, int64_t r1) {
    K->merge_rows(dt, r1 - r0, D, ap + r0 * D * es, D, lap + r0, bp + r0 * D * es, D, lbp + r0, op + r0 * D * es, D,
                  lop + r0);
  });
}

std::tuple<Tensor, Tensor> merge_attention_states_cpu(const Tensor& out_a, const Tensor& lse_a, const Tensor& out_b,
                                                      const Tensor& lse_b) {
  validate_merge(out_a, lse_a, out_b, lse_b, "out_a", "lse_a", "out_b", "lse_b");
  Tensor out = at::empty(out_a.sizes(), out_a.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor lse = at::empty(lse_a.sizes(), lse_a.options().memory_format(at::MemoryFormat::Contiguous));
  merge_cpu_into(out_a, lse_a, out_b, lse_b, out, lse);
  return {out, lse};
}

void validate_merge_inplace(const Tensor& out, const Tensor& lse, const Tensor& out_other, const Tensor& lse_other) {
  validate_merge(out, lse, out_other, lse_other, "out", "lse", "out_other", "lse_other");
  TT_CHECK(out.is_contiguous(), "out must be contiguous (it is updated in place), got strides ", out.strides());
  TT_CHECK(lse.is_contiguous(), "lse must be contiguous (it is updated in place), got strides ", lse.strides());
  // contiguous, so neither overlaps itself; rows are merged in parallel, so no written tensor may
  // share memory with the other output or with an input another row still reads
  check_no_overlap(out, "out", lse, "lse", /*other_is_output=*/true);
  for (const auto& pr : {std::make_pair(&out_other, "out_other"), std::make_pair(&lse_other, "lse_other")}) {
    check_no_overlap(out, "out", *pr.first, pr.second, /*other_is_output=*/false);
    check_no_overlap(lse, "lse", *pr.first, pr.second, /*other_is_output=*/false);
  }
}

void merge_attention_states_inplace_cpu(Tensor out, Tensor lse, const Tensor& out_other, const Tensor& lse_other) {
  validate_merge_inplace(out, lse, out_other, lse_other);
  merge_cpu_into(out, lse, out_other, lse_other, out, lse);
}

// ---------------------------------------------------------------- append_paged_kv / copy_pages
// Destination slot (page, offset) of each appended token, validated. Token i goes to position
// positions[i] of sequence batch_indices[i]; with append_indptr the tokens of sequence b are
// rows append_indptr[b]..append_indptr[b+1] and fill its last positions; with neither, one token
// per sequence (N == B) goes to its last position.
// valid[i]: tokens of page[i] that the page table says are written after the append (what its
// summary must cover).
struct AppendPlan {
  std::vector<int64_t> page, off, valid;
};

AppendPlan plan_append(const Tensor& k, const Tensor& v, const Tensor& k_cache, const Tensor& v_cache,
                       const Tensor& kv_indptr, const Tensor& kv_indices, const Tensor& kv_last_page_len,
                       const c10::optional<Tensor>& batch_indices, const c10::optional<Tensor>& positions,
                       const c10::optional<Tensor>& append_indptr) {
  check_cache_pair(k_cache, v_cache);
  for (const auto& pr : {std::make_pair(&k, "k"), std::make_pair(&v, "v")}) {
    check_dim(*pr.first, pr.second, 3, "[num_new_tokens, num_kv_heads, head_dim]");
    check_device(*pr.first, pr.second, k_cache, "k_cache");
    TT_CHECK(pr.first->scalar_type() == k_cache.scalar_type(), pr.second, " dtype (", pr.first->scalar_type(),
             ") must match k_cache dtype (", k_cache.scalar_type(), ")");
    TT_CHECK(pr.first->size(1) == k_cache.size(2), pr.second, " num_kv_heads (", pr.first->size(1),
             ") must match the cache's num_kv_heads (", k_cache.size(2), ")");
    TT_CHECK(pr.first->size(2) == k_cache.size(3), pr.second, " head_dim (", pr.first->size(2),
             ") must match the cache's head_dim (", k_cache.size(3), ")");
    check_last_dim_contiguous(*pr.first, pr.second);
  }
  TT_CHECK(v.size(0) == k.size(0), "v must have as many tokens as k (", k.size(0), "), got ", v.size(0));
  check_writable_cache_pair(k_cache, v_cache);
  // the new tokens are read while the caches are written (CPU: token by token, CUDA: in parallel),
  // so a k or v that is a view into a cache could be read after part of it was overwritten
  for (const auto& pr : {std::make_pair(&k, "k"), std::make_pair(&v, "v")}) {
    check_no_overlap(k_cache, "k_cache", *pr.first, pr.second, /*other_is_output=*/false);
    check_no_overlap(v_cache, "v_cache", *pr.first, pr.second, /*other_is_output=*/false);
  }
  const int64_t N = k.size(0);
  CacheInfo ci = validate_page_table(k_cache, kv_indptr, kv_indices, kv_last_page_len);
  AppendPlan plan;
  plan.page.resize(N);
  plan.off.resize(N);
  plan.valid.resize(N);
  const int32_t* ip = ci.indptr.data_ptr<int32_t>();
  const int32_t* ix = ci.indices.data_ptr<int32_t>();
  const int32_t* ll = ci.last.data_ptr<int32_t>();
  std::vector<int64_t> bi(N), pos(N);
  TT_CHECK_VALUE(!append_indptr || (!batch_indices && !positions),
                 "pass either append_indptr or (batch_indices, positions), not both");
  TT_CHECK_VALUE(batch_indices.has_value() == positions.has_value(),
                 "batch_indices and positions must be given together");
  if (batch_indices) {
    for (const auto& pr : {std::make_pair(&*batch_indices, "batch_indices"), std::make_pair(&*positions, "positions")}) {
      check_device(*pr.first, pr.second, k_cache, "k_cache");
      check_index_dtype(*pr.first, pr.second);
      TT_CHECK(pr.first->dim() == 1 && pr.first->size(0) == N, pr.second, " must be 1-D with one entry per new token (",
               N, "), got shape ", pr.first->sizes());
    }
    const Tensor bh = batch_indices->to(at::kCPU, at::kLong).contiguous();
    const Tensor ph = positions->to(at::kCPU, at::kLong).contiguous();
    std::memcpy(bi.data(), bh.data_ptr<int64_t>(), sizeof(int64_t) * N);
    std::memcpy(pos.data(), ph.data_ptr<int64_t>(), sizeof(int64_t) * N);
  } else if (append_indptr) {
    check_int32_1d(*append_indptr, "append_indptr", k_cache, "k_cache");
    TT_CHECK(append_indptr->size(0) == ci.B + 1, "append_indptr must have B+1 = ", ci.B + 1, " entries, got shape ",
             append_indptr->sizes());
    const Tensor ah = append_indptr->to(at::kCPU).contiguous();
    const int32_t* ap = ah.data_ptr<int32_t>();
    TT_CHECK_VALUE(ap[0] == 0, "append_indptr[0] must be 0, got ", ap[0]);
    for (int64_t b = 0; b < ci.B; ++b)
      TT_CHECK_VALUE(ap[b + 1] >= ap[b], "append_indptr must be non-decreasing, but append_indptr[", b + 1, "] = ",
                     ap[b + 1], " < append_indptr[", b, "] = ", ap[b]);
    TT_CHECK_VALUE(ap[ci.B] == N, "append_indptr must end at the number of new tokens N = ", N, ", got ", ap[ci.B]);
    for (int64_t b = 0; b < ci.B; ++b) {
      const int64_t len = kv_len_of(ip, ll, b, ci.page_size), n_new = ap[b + 1] - ap[b];
      TT_CHECK_VALUE(n_new <= len, "sequence ", b, " appends ", n_new, " tokens but the page table gives it only ", len,
                     " (the page table must describe the sequences after the append)");
      for (int64_t i = ap[b]; i < ap[b + 1]; ++i) { bi[i] = b; pos[i] = len - n_new + (i - ap[b]); }
    }
  } else {
    TT_CHECK(N == ci.B, "without batch_indices/positions or append_indptr, k must have one token per sequence (B = ",
             ci.B, "), got ", N);
    for (int64_t b = 0; b < N; ++b) { bi[b] = b; pos[b] = kv_len_of(ip, ll, b, ci.page_size) - 1; }
  }
  for (int64_t i = 0; i < N; ++i) {
    TT_CHECK_VALUE(bi[i] >= 0 && bi[i] < ci.B, "batch_indices[", i, "] = ", bi[i], " is out of range [0, ", ci.B, ")");
    const int64_t len = kv_len_of(ip, ll, bi[i], ci.page_size);
    TT_CHECK_VALUE(pos[i] >= 0 && pos[i] < len, "positions[", i, "] = ", pos[i], " is out of range: sequence ", bi[i],
                   " has ", len, " tokens in the page table (which must describe the sequences after the append)");
    plan.page[i] = ix[ip[bi[i]] + pos[i] / ci.page_size];
    plan.off[i] = pos[i] % ci.page_size;
    plan.valid[i] = std::min<int64_t>(ci.page_size, len - (pos[i] / ci.page_size) * ci.page_size);
  }
  return plan;
}

// Page summaries (sparse_paged_attention.h) of the pages an append wrote: each touched page is
// re-summarised over its valid tokens (the page table after the append), so the summaries equal
// update_page_summaries on those pages bit for bit (a partly filled last page included; the cost is
// one read of each touched page). A page touched with different valid lengths keeps the largest.
void refresh_appended_summaries(const Tensor& k_cache, const c10::optional<Tensor>& summaries,
                                const AppendPlan& plan) {
  if (!summaries) return;
  std::vector<std::pair<int64_t, int64_t>> touched;
  for (size_t i = 0; i < plan.page.size(); ++i) touched.emplace_back(plan.page[i], plan.valid[i]);
  std::sort(touched.begin(), touched.end());
  std::vector<int64_t> pages, lens;
  for (const auto& t : touched) {
    if (!pages.empty() && pages.back() == t.first) lens.back() = t.second;  // sorted: the largest comes last
    else { pages.push_back(t.first); lens.push_back(t.second); }
  }
  Tensor s = *summaries;
  sparse::refresh_page_summaries(k_cache, s, pages, lens);
}

// summaries written in place next to the caches (append_paged_kv, copy_pages): checked as the
// caches are (its own memory per element, none shared with k_cache or v_cache, which are written too)
void check_optional_summaries(const c10::optional<Tensor>& summaries, const Tensor& k_cache, const Tensor& v_cache) {
  if (!summaries) return;
  sparse::check_page_summaries(*summaries, k_cache);
  check_no_internal_overlap(*summaries, "summaries");
  check_no_overlap(*summaries, "summaries", k_cache, "k_cache", /*other_is_output=*/true);
  check_no_overlap(*summaries, "summaries", v_cache, "v_cache", /*other_is_output=*/true);
}

void append_paged_kv_cpu(const Tensor& k, const Tensor& v, Tensor k_cache, Tensor v_cache, const Tensor& kv_indptr,
                         const Tensor& kv_indices, const Tensor& kv_last_page_len,
                         const c10::optional<Tensor>& batch_indices, const c10::optional<Tensor>& positions,
                         const c10::optional<Tensor>& append_indptr, const c10::optional<Tensor>& summaries) {
  const AppendPlan plan = plan_append(k, v, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, batch_indices,
                                      positions, append_indptr);
  check_optional_summaries(summaries, k_cache, v_cache);
  const int64_t N = k.size(0), H = k.size(1), D = k.size(2), es = k.element_size();
  for (int pass = 0; pass < 2; ++pass) {
    const Tensor& src = pass == 0 ? k : v;
    Tensor& dst = pass == 0 ? k_cache : v_cache;
    const char* sp = static_cast<const char*>(src.data_ptr());
    char* dp = static_cast<char*>(dst.data_ptr());
    for (int64_t i = 0; i < N; ++i)
      for (int64_t h = 0; h < H; ++h)
        std::memcpy(dp + (plan.page[i] * dst.stride(0) + plan.off[i] * dst.stride(1) + h * dst.stride(2)) * es,
                    sp + (i * src.stride(0) + h * src.stride(1)) * es, D * es);
  }
  refresh_appended_summaries(k_cache, summaries, plan);
}

std::pair<Tensor, Tensor> validate_copy_pages(const Tensor& k_cache, const Tensor& v_cache, const Tensor& src,
                                              const Tensor& dst) {
  check_cache_pair(k_cache, v_cache);
  check_writable_cache_pair(k_cache, v_cache);
  for (const auto& pr : {std::make_pair(&src, "src"), std::make_pair(&dst, "dst")}) {
    check_device(*pr.first, pr.second, k_cache, "k_cache");
    check_index_dtype(*pr.first, pr.second);
    TT_CHECK(pr.first->dim() == 1, pr.second, " must be 1-D [num_copies], got shape ", pr.first->sizes());
  }
  TT_CHECK(src.size(0) == dst.size(0), "src and dst must have the same length, got ", src.size(0), " and ",
           dst.size(0));
  const Tensor sh = src.to(at::kCPU, at::kLong).contiguous(), dh = dst.to(at::kCPU, at::kLong).contiguous();
  if (capturing(k_cache)) return {sh, dh};
  const int64_t P = k_cache.size(0), n = src.size(0);
  const int64_t* s = sh.data_ptr<int64_t>();
  const int64_t* d = dh.data_ptr<int64_t>();
  std::vector<char> is_dst(P, 0), is_src(P, 0);
  for (int64_t i = 0; i < n; ++i) {
    TT_CHECK_VALUE(s[i] >= 0 && s[i] < P, "src[", i, "] = ", s[i], " is out of range [0, num_pages = ", P, ")");
    TT_CHECK_VALUE(d[i] >= 0 && d[i] < P, "dst[", i, "] = ", d[i], " is out of range [0, num_pages = ", P, ")");
    TT_CHECK_VALUE(!is_dst[d[i]], "dst[", i, "] = ", d[i], " appears twice in dst (destinations must be distinct)");
    is_dst[d[i]] = 1;
    is_src[s[i]] = 1;
  }
  for (int64_t i = 0; i < n; ++i)
    TT_CHECK_VALUE(!is_src[d[i]], "dst[", i, "] = ", d[i], " is also a source page (dst must not overlap src)");
  return {sh, dh};
}

// With summaries, a copied page's summary is copied too (the copy holds the same keys).
void copy_pages_cpu(Tensor k_cache, Tensor v_cache, const Tensor& src, const Tensor& dst,
                    const c10::optional<Tensor>& summaries) {
  const auto sd = validate_copy_pages(k_cache, v_cache, src, dst);
  check_optional_summaries(summaries, k_cache, v_cache);
  const int64_t n = src.size(0);
  const int64_t* s = sd.first.data_ptr<int64_t>();
  const int64_t* d = sd.second.data_ptr<int64_t>();
  Tensor sm = summaries ? *summaries : Tensor();
  for (Tensor* c : {&k_cache, &v_cache, &sm}) {
    if (!c->defined()) continue;
    for (int64_t i = 0; i < n; ++i) c->select(0, d[i]).copy_(c->select(0, s[i]));
  }
}

}  // namespace
}  // namespace paged
}  // namespace ttscale

TORCH_LIBRARY_FRAGMENT(ttscale, m) {
  m.def(
      "paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor kv_indptr, Tensor kv_indices, "
      "Tensor kv_last_page_len, Tensor? qo_indptr, bool causal, float scale, int window_left, float softcap, "
      "bool return_lse) -> (Tensor, Tensor)");
  m.def("merge_attention_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) -> (Tensor, Tensor)");
  m.def("merge_attention_states_(Tensor(a!) out, Tensor(b!) lse, Tensor out_other, Tensor lse_other) -> ()");
  m.def(
      "append_paged_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor kv_indptr, "
      "Tensor kv_indices, Tensor kv_last_page_len, Tensor? batch_indices, Tensor? positions, "
      "Tensor? append_indptr, Tensor(c!)? summaries=None) -> ()");
  m.def("copy_pages(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor src, Tensor dst, Tensor(c!)? summaries=None) -> ()");
}

TORCH_LIBRARY_IMPL(ttscale, CPU, m) {
  m.impl("paged_attention", &ttscale::paged::paged_attention_cpu);
  m.impl("merge_attention_states", &ttscale::paged::merge_attention_states_cpu);
  m.impl("merge_attention_states_", &ttscale::paged::merge_attention_states_inplace_cpu);
  m.impl("append_paged_kv", &ttscale::paged::append_paged_kv_cpu);
  m.impl("copy_pages", &ttscale::paged::copy_pages_cpu);
}

// ---------------------------------------------------------------- CUDA (not yet run on a GPU)
#if defined(TTSCALE_WITH_CUDA)
namespace ttscale {
namespace paged {
namespace {


std::tuple<Tensor, Tensor> paged_attention_cuda_impl(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                                     const Tensor& kv_indptr, const Tensor& kv_indices,
                                                     const Tensor& kv_last_page_len,
                                                     const c10::optional<Tensor>& qo_indptr, bool causal, double scale,
                                                     int64_t window_left, double softcap, bool return_lse) {
  (void)return_lse;
  // before validation: it copies the page table to the host, which fails inside a capture with a
  // raw CUDA error instead of this message
  TT_CHECK(!capturing(q), "paged_attention: CUDA graph capture is not supported yet (the tile list is built on "
           "the host from the page table)");
  const AttnInputs in = validate_paged_attention(q, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len,
                                                 qo_indptr, scale, window_left, softcap);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t T = in.T, Hq = in.Hq, Hkv = in.ci.Hkv, D = in.ci.D, B = in.ci.B;
  Tensor out = at::empty({T, Hq, D}, q.options());
  Tensor lse = at::empty({T, Hq}, q.options().dtype(at::kFloat));
  if (T == 0) return {out, lse};
  PagedParams p = make_params(q, k_cache, v_cache, in, causal, scale, window_left, softcap);
  const Tensor ip_d = kv_indptr.contiguous(), ix_d = kv_indices.contiguous(), ll_d = kv_last_page_len.contiguous();
  const Tensor qo_d = in.qo.to(q.device());
  p.kv_indptr = ip_d.data_ptr<int32_t>();
  p.kv_indices = ix_d.data_ptr<int32_t>();
  p.kv_last_page_len = ll_d.data_ptr<int32_t>();
  p.qo_indptr = qo_d.data_ptr<int32_t>();
  // tiles of <= kCudaRowsPerCta rows (queries x group heads), built on the host
  const int32_t* qp = in.qo.data_ptr<int32_t>();
  const int32_t* ip = in.ci.indptr.data_ptr<int32_t>();
  const int32_t* ll = in.ci.last.data_ptr<int32_t>();
  const int64_t group = Hq / Hkv;
  // many rows per sequence (multi-query / shared-prefix blocks, prefill chunks) in fp16 / bf16 go to
  // the tensor-core kernel (64-row tiles); decode and fp32 to the CUDA-core kernel (16-row tiles)
  int64_t max_nq = 0;
  for (int64_t b = 0; b < B; ++b) max_nq = std::max<int64_t>(max_nq, qp[b + 1] - qp[b]);
  const bool use_mma = cuda_mma_supported(p.dtype, D) && max_nq * group >= 2 * kCudaRowsPerCta;
  const int64_t tile_rows = use_mma ? kCudaMmaRows : kCudaRowsPerCta;
  const int64_t g_tile = std::min<int64_t>(group, tile_rows);
  const int64_t q_tile = std::max<int64_t>(1, tile_rows / g_tile);
  std::vector<int32_t> tiles;
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) {
    max_len = std::max(max_len, kv_len_of(ip, ll, b, p.page_size));
    for (int64_t t0 = qp[b]; t0 < qp[b + 1]; t0 += q_tile)
      for (int64_t g0 = 0; g0 < group; g0 += g_tile)
        tiles.insert(tiles.end(), {(int32_t)b, (int32_t)t0, (int32_t)std::min<int64_t>(t0 + q_tile, qp[b + 1]),
                                   (int32_t)g0, (int32_t)std::min(group, g0 + g_tile)});
  }
  const int64_t n_tiles = (int64_t)tiles.size() / 5;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t n_split = 1;
  if (n_tiles * Hkv < 2 * sms && max_len > 0)
    n_split = std::max<int64_t>(1, std::min<int64_t>((2 * sms + n_tiles * Hkv - 1) / (n_tiles * Hkv),
                                                     (max_len + 255) / 256));
  int64_t per = (std::max<int64_t>(max_len, 1) + n_split - 1) / n_split;
  per = (per + kCudaTileKeys - 1) / kCudaTileKeys * kCudaTileKeys;
  const Tensor tiles_d = at::from_blob(tiles.data(), {(int64_t)tiles.size()}, at::TensorOptions().dtype(at::kInt))
                             .to(q.device());
  Tensor part, part_lse;
  PagedCudaWork w;
  w.tiles = reinterpret_cast<const CudaTile*>(tiles_d.data_ptr<int32_t>());
  w.n_tiles = (int)n_tiles;
  w.n_split = (int)n_split;
  w.keys_per_split = per;
  w.use_mma = use_mma;
  if (n_split > 1) {
    part = at::empty({n_split, T * Hq, D}, q.options().dtype(at::kFloat));
    part_lse = at::empty({n_split, T * Hq}, q.options().dtype(at::kFloat));
    w.part_out = part.data_ptr<float>();
    w.part_lse = part_lse.data_ptr<float>();
  }
  w.out = out.data_ptr();
  w.lse = lse.data_ptr<float>();
  const int64_t es = q.element_size();
  auto al16 = [&](const Tensor& c) {
    return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 && (c.stride(0) * es) % 16 == 0 &&
           (c.stride(1) * es) % 16 == 0 && (c.stride(2) * es) % 16 == 0;
  };
  w.aligned16 = al16(k_cache) && al16(v_cache);
  check_launch(paged_attention_cuda(p, w, at::cuda::getCurrentCUDAStream().stream()), "paged_attention");
  return {out, lse};
}

std::tuple<Tensor, Tensor> merge_attention_states_cuda_impl(const Tensor& out_a, const Tensor& lse_a,
                                                            const Tensor& out_b, const Tensor& lse_b) {
  validate_merge(out_a, lse_a, out_b, lse_b, "out_a", "lse_a", "out_b", "lse_b");
  const c10::cuda::CUDAGuard guard(out_a.device());
  Tensor out = at::empty(out_a.sizes(), out_a.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor lse = at::empty(lse_a.sizes(), lse_a.options().memory_format(at::MemoryFormat::Contiguous));
  const Tensor a = out_a.contiguous(), b = out_b.contiguous(), la = lse_a.contiguous(), lb = lse_b.contiguous();
  check_launch(merge_states_cuda(dtype_of(a.scalar_type()), a.size(0) * a.size(1), a.size(2), a.data_ptr(),
                                 la.data_ptr<float>(), b.data_ptr(), lb.data_ptr<float>(), out.data_ptr(),
                                 lse.data_ptr<float>(), at::cuda::getCurrentCUDAStream().stream()),
               "merge_attention_states");
  return {out, lse};
}

void merge_attention_states_inplace_cuda_impl(Tensor out, Tensor lse, const Tensor& out_other,
                                              const Tensor& lse_other) {
  validate_merge_inplace(out, lse, out_other, lse_other);
  const c10::cuda::CUDAGuard guard(out.device());
  const Tensor b = out_other.contiguous(), lb = lse_other.contiguous();
  check_launch(merge_states_cuda(dtype_of(out.scalar_type()), out.size(0) * out.size(1), out.size(2), out.data_ptr(),
                                 lse.data_ptr<float>(), b.data_ptr(), lb.data_ptr<float>(), out.data_ptr(),
                                 lse.data_ptr<float>(), at::cuda::getCurrentCUDAStream().stream()),
               "merge_attention_states_");
}

void append_paged_kv_cuda_impl(const Tensor& k, const Tensor& v, Tensor k_cache, Tensor v_cache,
                               const Tensor& kv_indptr, const Tensor& kv_indices, const Tensor& kv_last_page_len,
                               const c10::optional<Tensor>& batch_indices, const c10::optional<Tensor>& positions,
                               const c10::optional<Tensor>& append_indptr, const c10::optional<Tensor>& summaries) {
  TT_CHECK(!capturing(k_cache), "append_paged_kv: CUDA graph capture is not supported yet (destinations are "
           "validated on the host)");
  const AppendPlan plan = plan_append(k, v, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, batch_indices,
                                      positions, append_indptr);
  check_optional_summaries(summaries, k_cache, v_cache);
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const int64_t N = k.size(0);
  if (N == 0) return;
  const Tensor page = at::tensor(plan.page, at::TensorOptions().dtype(at::kLong)).to(k_cache.device());
  const Tensor off = at::tensor(plan.off, at::TensorOptions().dtype(at::kLong)).to(k_cache.device());
  AppendCudaParams p;
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.k_stride_n = k.stride(0); p.k_stride_h = k.stride(1);
  p.v_stride_n = v.stride(0); p.v_stride_h = v.stride(1);
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  for (int i = 0; i < 3; ++i) { p.kc_stride[i] = k_cache.stride(i); p.vc_stride[i] = v_cache.stride(i); }
  p.page = page.data_ptr<int64_t>();
  p.off = off.data_ptr<int64_t>();
  p.N = N; p.H = k.size(1); p.D = k.size(2);
  p.elem_size = (int)k.element_size();
  check_launch(append_paged_kv_cuda(p, at::cuda::getCurrentCUDAStream().stream()), "append_paged_kv");
  refresh_appended_summaries(k_cache, summaries, plan);
}

void copy_pages_cuda_impl(Tensor k_cache, Tensor v_cache, const Tensor& src, const Tensor& dst,
                          const c10::optional<Tensor>& summaries) {
  const auto sd = validate_copy_pages(k_cache, v_cache, src, dst);
  check_optional_summaries(summaries, k_cache, v_cache);
  const c10::cuda::CUDAGuard guard(k_cache.device());
  if (src.size(0) == 0) return;
  if (summaries) {
    const Tensor s_d = sd.first.to(k_cache.device()), d_d = sd.second.to(k_cache.device());
    summaries->index_copy_(0, d_d, summaries->index_select(0, s_d));
  }
  const Tensor s = sd.first.to(k_cache.device()), d = sd.second.to(k_cache.device());
  for (Tensor* c : {&k_cache, &v_cache}) {
    CopyPagesCudaParams p;
    p.cache = c->data_ptr();
    for (int i = 0; i < 3; ++i) p.stride[i] = c->stride(i);
    p.page_size = c->size(1); p.H = c->size(2); p.D = c->size(3);
    p.src = s.data_ptr<int64_t>();
    p.dst = d.data_ptr<int64_t>();
    p.n = src.size(0);
    p.elem_size = (int)c->element_size();
    check_launch(copy_pages_cuda(p, at::cuda::getCurrentCUDAStream().stream()), "copy_pages");
  }
}

}  // namespace
}  // namespace paged
}  // namespace ttscale

TORCH_LIBRARY_IMPL(ttscale, CUDA, m) {
  m.impl("paged_attention", &ttscale::paged::paged_attention_cuda_impl);
  m.impl("merge_attention_states", &ttscale::paged::merge_attention_states_cuda_impl);
  m.impl("merge_attention_states_", &ttscale::paged::merge_attention_states_inplace_cuda_impl);
  m.impl("append_paged_kv", &ttscale::paged::append_paged_kv_cuda_impl);
  m.impl("copy_pages", &ttscale::paged::copy_pages_cuda_impl);
}
#endif  // TTSCALE_WITH_CUDA
