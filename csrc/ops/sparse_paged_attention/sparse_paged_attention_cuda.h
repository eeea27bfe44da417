// Torch-free launcher interface of the CUDA page-summary and sparse-decode kernels
// (sparse_paged_attention_cuda.cu). The torch side (sparse_paged_attention.cpp, under
// TTSCALE_WITH_CUDA) validates inputs (page-table values on a host copy), builds the scoring item
// list on the host, allocates outputs and workspace and calls these on the current stream. All
// pointers are device pointers. NOT YET RUN ON A GPU: compiled for sm_80 / sm_90a by
// tools/cuda_compile_check.sh only.
#pragma once
#include <cstdint>

#include "ops/sparse_paged_attention/sparse_paged_attention.h"

namespace ttscale {
namespace sparse {

constexpr int kCudaMaxGroupRows = 8;  // query heads of a GQA group per attention CTA (grid.z covers more)

// Summaries of sp.pages[0..n) over sp.lens[i] tokens (sparse_paged_attention.h).
int summarize_pages_cuda(const SummaryParams& sp, void* stream);

// A scoring item: logical pages [j0, j1) of sequence b (all KV heads).
struct ScoreItem {
  int32_t b, j0, j1;
};

struct SparseCudaWork {
  const ScoreItem* items = nullptr;  // [n_items]
  int n_items = 0;
  float* scores = nullptr;           // [nnz * Hkv]: scores[(kv_indptr[b] + j) * Hkv + h]
  int32_t* selected = nullptr;       // [B, Hkv, SparseParams::budget = min(sink + local + top_k, nnz)]
  int n_split = 1;                   // splits of each (b, h)'s kept pages (grid.y)
  float* part_out = nullptr;         // [n_split][B * Hq][D]
  float* part_lse = nullptr;         // [n_split][B * Hq]
  void* out = nullptr;               // [B, Hq, D] contiguous, q's dtype
  float* lse = nullptr;              // [B, Hq]
};
// Scores, selects, attends and merges: four kernels on `stream`. Returns a cudaError_t.
int sparse_paged_attention_cuda(const SparseParams& s, const SparseCudaWork& w, void* stream);

}  // namespace sparse
}  // namespace ttscale
