// Paged attention, attention-state merge and paged KV-cache writes: definitions shared by the CPU
// and CUDA paths (torch-free).
//
// Paged KV format (DESIGN.md): k_cache, v_cache [num_pages, page_size, Hkv, D] (strides given per
// dimension, last dim contiguous); sequence b owns pages kv_indices[kv_indptr[b] .. kv_indptr[b+1])
// in order, the last one holding kv_last_page_len[b] tokens, so
//   kv_len(b) = npages > 0 ? (npages - 1) * page_size + kv_last_page_len[b] : 0.
// Queries are ragged: rows qo_indptr[b] .. qo_indptr[b+1] of q [T, Hq, D] belong to sequence b
// (decode: one row per sequence). Query i of n_q has position q_pos = i + kv_len - n_q (causal mask
// aligned bottom-right); attn::visible_range gives its keys. GQA: query head hq reads KV head
// hq / (Hq / Hkv). Output: out [T, Hq, D] (q's dtype), lse [T, Hq] float32, natural log; a query
// with no visible key gets out = 0, lse = -inf.
//
// CPU schedule (paged_attention.cpp): the work is cut into items (sequence b, a range of KV heads,
// tile of that sequence's queries, key split). An item's rows are (KV head, query, group head)
// triples: all Hq/Hkv query heads of each KV head, for up to kMaxRowsPerItem rows, so each K/V row
// is loaded once per item and used by every row of its head (decode: all heads of a sequence in
// one item, so its pages are read front to back). Its keys (the union of the rows' visible ranges) may be split into several
// items when there are too few items to fill the threads (split-KV); each item writes a normalised
// fp32 partial (out, lse) and the partials are merged with attn::merge_weights.
// Inside an item (paged_attention_cpu.cpp) keys go by chunks of kKeyChunk: per chunk, for each
// micro-tile of 4 rows, S = Q K^T by a 4-row x 2-key register-blocked dot-product kernel, online
// softmax per row, then O += P V by a 4-row x 2-vector broadcast-FMA kernel. When an item has more
// than two row tiles (multi-query blocks: many branches' queries against one shared prefix), the
// chunk's K and V are first widened to a contiguous fp32 buffer, so KV is read from memory once
// per item and every row tile reuses it from cache.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/attention_math.h"
#include "common/dtype.h"
#include "common/host_device.h"

namespace ttscale {
namespace paged {

constexpr int kKeyChunk = 64;          // keys per online-softmax block (CPU)
constexpr int kRowTile = 4;            // query rows per register micro-tile (CPU)
constexpr int kMaxRowsPerItem = 256;   // rows (queries x group heads) per CPU work item
constexpr int64_t kMinSplitKeys = 512; // CPU split-KV: never split into fewer keys than this

TT_HD int64_t kv_len_of(const int32_t* indptr, const int32_t* last_len, int64_t b, int64_t page_size) {
  const int64_t np = (int64_t)indptr[b + 1] - indptr[b];
  return np > 0 ? (np - 1) * page_size + last_len[b] : 0;
}

// Everything a kernel needs to read one paged attention problem (pointers into the caller's tensors).
struct PagedParams {
  const void* q = nullptr;  // [T, Hq, D]
  int64_t q_stride_t = 0, q_stride_h = 0;
  const void* k_cache = nullptr;  // [num_pages, page_size, Hkv, D]
  const void* v_cache = nullptr;
  int64_t k_stride_page = 0, k_stride_tok = 0, k_stride_head = 0;
  int64_t v_stride_page = 0, v_stride_tok = 0, v_stride_head = 0;
  DType dtype = DType::kFloat32;
  const int32_t* kv_indptr = nullptr;         // [B+1]
  const int32_t* kv_indices = nullptr;        // [nnz]
  const int32_t* kv_last_page_len = nullptr;  // [B]
  const int32_t* qo_indptr = nullptr;         // [B+1], nullptr: one query per sequence
  int64_t B = 0, T = 0, Hq = 0, Hkv = 0, D = 0, page_size = 1, num_pages = 0;
  bool causal = true;
  int64_t window_left = -1;
  float scale = 1.0f;
  float softcap = 0.0f;
};

// One CPU work item: sequence b, KV heads [h_begin, h_end), queries [q_begin, q_end) (global rows
// of q), keys [k_begin, k_end) of the sequence. Rows are
// r = (h - h_begin) * (nq * group) + (t - q_begin) * group + g   (query head h * group + g).
// Keys go by chunks in the outer loop and heads in the inner one, so the chunk's pages (all heads
// of a token are contiguous in the NHD layout) are streamed once, in address order.
struct PagedItem {
  int64_t b, h_begin, h_end, q_begin, q_end, k_begin, k_end;
};

// Per-ISA CPU kernels (paged_attention_cpu.cpp).
struct CpuKernels {
  // Scratch bytes attend() needs for an item of `rows` rows.
  int64_t (*attend_scratch_bytes)(int64_t rows, int64_t D);
  // Attention of the item's rows over its keys: writes the normalised fp32 output of row r to
  // out + r * D and its LSE to lse[r] (-inf and zeros when no key is visible).
  void (*attend)(const PagedParams& p, const PagedItem& it, float* out, float* lse, void* scratch);
  // merge of two attention states, rows of D: out = w_a a + w_b b (attn::merge_weights).
  // a, b, out may alias (in place). dtype of a, b and out.
  void (*merge_rows)(DType dtype, int64_t n_rows, int64_t D, const void* a, int64_t a_stride, const float* lse_a,
                     const void* b, int64_t b_stride, const float* lse_b, void* out, int64_t out_stride,
                     float* lse_out);
};

}  // namespace paged
}  // namespace ttscale

#include "common/cpu_dispatch.h"
TT_DECLARE_CPU_KERNELS(ttscale::paged::CpuKernels, paged_kernels)
