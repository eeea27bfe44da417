// Validation of paged attention inputs, shared by every op that reads a paged KV cache
// (paged_attention, append_paged_kv, copy_pages, sparse_paged_attention, attention_mass).
// Torch-facing (include only from <op>.cpp). Formats: paged_attention.h.
#pragma once
#include <ATen/ATen.h>

#include <cmath>

#include "common/checks.h"
#include "common/dispatch.h"
#include "ops/paged_attention/paged_attention.h"

#if defined(TTSCALE_WITH_CUDA)
#include <c10/cuda/CUDAGraphsC10Utils.h>
#endif

namespace ttscale {
namespace paged {

using at::Tensor;

inline bool capturing(const Tensor& t) {
#if defined(TTSCALE_WITH_CUDA)
  if (t.is_cuda()) return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
#endif
  (void)t;
  return false;
}

inline void check_int32_1d(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  check_device(t, name, ref, ref_name);
  TT_CHECK(t.scalar_type() == at::kInt, name, " must be int32 (DESIGN.md page-table format), got ", t.scalar_type());
  TT_CHECK(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
}

// Validated shapes of a paged KV cache pair and its CSR page table. Values of the page table are
// checked on a host copy (a device sync on CUDA; skipped while a CUDA graph is being captured).
struct CacheInfo {
  int64_t num_pages = 0, page_size = 0, Hkv = 0, D = 0, B = 0;
  Tensor indptr, indices, last;  // host int32 copies (CPU: the tensors themselves, contiguous)
};

inline void check_cache_pair(const Tensor& k_cache, const Tensor& v_cache) {
  check_dim(k_cache, "k_cache", 4, "[num_pages, page_size, num_kv_heads, head_dim]");
  check_dim(v_cache, "v_cache", 4, "[num_pages, page_size, num_kv_heads, head_dim]");
  check_float_dtype(k_cache, "k_cache");
  TT_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), "v_cache dtype (", v_cache.scalar_type(),
           ") must match k_cache dtype (", k_cache.scalar_type(), ")");
  check_device(v_cache, "v_cache", k_cache, "k_cache");
  TT_CHECK(v_cache.size(3) == k_cache.size(3), "v_cache head_dim (", v_cache.size(3),
           ") must match k_cache head_dim (", k_cache.size(3), ")");
  TT_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache shape ", v_cache.sizes(), " must equal k_cache shape ",
           k_cache.sizes());
  check_last_dim_contiguous(k_cache, "k_cache");
  check_last_dim_contiguous(v_cache, "v_cache");
  TT_CHECK(k_cache.size(1) >= 1, "k_cache page_size (dim 1) must be >= 1, got ", k_cache.size(1));
  TT_CHECK(k_cache.size(2) >= 1, "k_cache num_kv_heads (dim 2) must be >= 1, got ", k_cache.size(2));
}

// A cache pair that an op writes in place (append_paged_kv, copy_pages): each needs its own memory
// per element, and neither may share memory with the other (the schema declares them as separate
// outputs, and an append's v write would land on keys).
inline void check_writable_cache_pair(const Tensor& k_cache, const Tensor& v_cache) {
  check_no_internal_overlap(k_cache, "k_cache");
  check_no_internal_overlap(v_cache, "v_cache");
  check_no_overlap(k_cache, "k_cache", v_cache, "v_cache", /*other_is_output=*/true);
}

inline CacheInfo validate_page_table(const Tensor& k_cache, const Tensor& kv_indptr, const Tensor& kv_indices,
                              const Tensor& kv_last_page_len) {
  CacheInfo ci;
  ci.num_pages = k_cache.size(0);
  ci.page_size = k_cache.size(1);
  ci.Hkv = k_cache.size(2);
  ci.D = k_cache.size(3);
  check_int32_1d(kv_indptr, "kv_indptr", k_cache, "k_cache");
  check_int32_1d(kv_indices, "kv_indices", k_cache, "k_cache");
  check_int32_1d(kv_last_page_len, "kv_last_page_len", k_cache, "k_cache");
  TT_CHECK(kv_indptr.size(0) >= 1, "kv_indptr must have B+1 >= 1 entries, got shape ", kv_indptr.sizes());
  ci.B = kv_indptr.size(0) - 1;
  TT_CHECK(kv_last_page_len.size(0) == ci.B, "kv_last_page_len must have one entry per sequence (B = ", ci.B,
           ", from kv_indptr of length ", ci.B + 1, "), got shape ", kv_last_page_len.sizes());
  ci.indptr = kv_indptr.to(at::kCPU).contiguous();
  ci.indices = kv_indices.to(at::kCPU).contiguous();
  ci.last = kv_last_page_len.to(at::kCPU).contiguous();
  if (capturing(k_cache)) return ci;
  const int32_t* ip = ci.indptr.data_ptr<int32_t>();
  const int32_t* ix = ci.indices.data_ptr<int32_t>();
  const int32_t* ll = ci.last.data_ptr<int32_t>();
  const int64_t nnz = kv_indices.size(0);
  TT_CHECK_VALUE(ip[0] == 0, "kv_indptr[0] must be 0, got ", ip[0]);
  for (int64_t b = 0; b < ci.B; ++b)
    TT_CHECK_VALUE(ip[b + 1] >= ip[b], "kv_indptr must be non-decreasing, but kv_indptr[", b + 1, "] = ", ip[b + 1],
                   " < kv_indptr[", b, "] = ", ip[b]);
  TT_CHECK_VALUE(ip[ci.B] == nnz, "kv_indptr must end at the number of page indices (kv_indices has ", nnz,
                 " entries), got kv_indptr[", ci.B, "] = ", ip[ci.B]);
  for (int64_t i = 0; i < nnz; ++i)
    TT_CHECK_VALUE(ix[i] >= 0 && ix[i] < ci.num_pages, "kv_indices[", i, "] = ", ix[i],
                   " is out of range: page indices must be in [0, num_pages = ", ci.num_pages, ")");
  for (int64_t b = 0; b < ci.B; ++b) {
    const bool empty = ip[b + 1] == ip[b];
    TT_CHECK_VALUE(empty ? (ll[b] >= 0 && ll[b] <= ci.page_size) : (ll[b] >= 1 && ll[b] <= ci.page_size),
                   "kv_last_page_len[", b, "] = ", ll[b], " must be in 1..page_size (", ci.page_size, ")",
                   empty ? " (or 0 for a sequence with no pages)" : "");
  }
  return ci;
}

struct AttnInputs {
  CacheInfo ci;
  int64_t T = 0, Hq = 0;
  Tensor qo;  // host int32 [B+1] (always materialised)
};

inline AttnInputs validate_paged_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                    const Tensor& kv_indptr, const Tensor& kv_indices, const Tensor& kv_last_page_len,
                                    const c10::optional<Tensor>& qo_indptr, double scale, int64_t window_left,
                                    double softcap) {
  AttnInputs in;
  check_dim(q, "q", 3, "[num_tokens, num_qo_heads, head_dim]");
  check_float_dtype(q, "q");
  check_cache_pair(k_cache, v_cache);
  check_device(k_cache, "k_cache", q, "q");
  TT_CHECK(k_cache.scalar_type() == q.scalar_type(), "k_cache dtype (", k_cache.scalar_type(),
           ") must match q dtype (", q.scalar_type(), ")");
  TT_CHECK(q.size(2) == k_cache.size(3), "q head_dim (", q.size(2), ") must match k_cache/v_cache head_dim (",
           k_cache.size(3), ")");
  TT_CHECK(head_dim_supported(q.size(2)), "head_dim ", q.size(2), " is not supported; supported head dims: ",
           TT_HEAD_DIMS_STR);
  check_last_dim_contiguous(q, "q");
  in.T = q.size(0);
  in.Hq = q.size(1);
  TT_CHECK(in.Hq >= 1 && in.Hq % k_cache.size(2) == 0, "q num_qo_heads (", in.Hq,
           ") must be a positive multiple of the cache's num_kv_heads (", k_cache.size(2), ")");
  TT_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", scale);
  TT_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0.0, "softcap must be >= 0 (0 disables), got ", softcap);
  TT_CHECK_VALUE(window_left >= -1, "window_left must be >= -1 (-1 disables), got ", window_left);
  in.ci = validate_page_table(k_cache, kv_indptr, kv_indices, kv_last_page_len);
  const int64_t B = in.ci.B;
  if (qo_indptr) {
    check_int32_1d(*qo_indptr, "qo_indptr", q, "q");
    TT_CHECK(qo_indptr->size(0) == B + 1, "qo_indptr must have B+1 = ", B + 1,
             " entries (one more than the sequences in kv_indptr), got shape ", qo_indptr->sizes());
    in.qo = qo_indptr->to(at::kCPU).contiguous();
    if (!capturing(q)) {
      const int32_t* qp = in.qo.data_ptr<int32_t>();
      TT_CHECK_VALUE(qp[0] == 0, "qo_indptr[0] must be 0, got ", qp[0]);
      for (int64_t b = 0; b < B; ++b)
        TT_CHECK_VALUE(qp[b + 1] >= qp[b], "qo_indptr must be non-decreasing, but qo_indptr[", b + 1, "] = ",
                       qp[b + 1], " < qo_indptr[", b, "] = ", qp[b]);
      TT_CHECK_VALUE(qp[B] == in.T, "qo_indptr must end at the number of query rows T = ", in.T,
                     " (q.size(0)), got qo_indptr[", B, "] = ", qp[B]);
    }
  } else {
    TT_CHECK(in.T == B, "without qo_indptr, q must have one row per sequence (decode): q has ", in.T,
             " rows but kv_indptr describes ", B, " sequences; pass qo_indptr for several queries per sequence");
    in.qo = at::arange(B + 1, at::TensorOptions().dtype(at::kInt));
  }
  return in;
}

inline PagedParams make_params(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const AttnInputs& in,
                        bool causal, double scale, int64_t window_left, double softcap) {
  PagedParams p;
  p.q = q.data_ptr();
  p.q_stride_t = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.k_stride_page = k_cache.stride(0);
  p.k_stride_tok = k_cache.stride(1);
  p.k_stride_head = k_cache.stride(2);
  p.v_stride_page = v_cache.stride(0);
  p.v_stride_tok = v_cache.stride(1);
  p.v_stride_head = v_cache.stride(2);
  p.dtype = dtype_of(q.scalar_type());
  p.B = in.ci.B;
  p.T = in.T;
  p.Hq = in.Hq;
  p.Hkv = in.ci.Hkv;
  p.D = in.ci.D;
  p.page_size = in.ci.page_size;
  p.num_pages = in.ci.num_pages;
  p.causal = causal;
  p.window_left = window_left;
  p.scale = (float)scale;
  p.softcap = (float)softcap;
  return p;
}

}  // namespace paged
}  // namespace ttscale
