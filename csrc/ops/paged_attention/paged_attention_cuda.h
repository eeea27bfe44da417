// Torch-free launcher interface of the CUDA paged-attention kernels (paged_attention_cuda.cu).
// The torch side (paged_attention.cpp, under TTSCALE_WITH_CUDA) validates inputs (page-table values
// on a host copy), builds the tile list on the host, allocates outputs and workspace, and calls these
// on the current stream. All pointers are device pointers. NOT YET RUN ON A GPU: compiled for
// sm_80 / sm_90a by tools/cuda_compile_check.sh only.
#pragma once
#include <cstddef>
#include <cstdint>

#include "ops/paged_attention/paged_attention.h"

namespace ttscale {
namespace paged {

// A CTA's rows: queries [q0, q1) of sequence b, group heads [g0, g1) of every KV head (grid.y).
// rows = (q1 - q0) * (g1 - g0) <= kCudaRowsPerCta.
constexpr int kCudaWarps = 4;
constexpr int kCudaRowsPerWarp = 4;
constexpr int kCudaRowsPerCta = kCudaWarps * kCudaRowsPerWarp;
constexpr int kCudaTileKeys = 32;  // keys per cp.async stage (one per lane in the QK step)
// Tensor-core multi-query kernel (fp16 / bf16, head dim <= 128): up to 64 rows per CTA, 16 per warp.
constexpr int kCudaMmaRows = 64;
inline bool cuda_mma_supported(DType dt, int64_t D) { return dt != DType::kFloat32 && D <= 128; }
struct CudaTile {
  int32_t b, q0, q1, g0, g1;
};

struct PagedCudaWork {
  const CudaTile* tiles = nullptr;  // [n_tiles]
  int n_tiles = 0;
  int n_split = 1;                  // key splits (grid.z); > 1 writes partials and merges them
  int64_t keys_per_split = 0;       // multiple of kCudaTileKeys
  float* part_out = nullptr;        // [n_split][T * Hq][D] (n_split > 1)
  float* part_lse = nullptr;        // [n_split][T * Hq]
  void* out = nullptr;              // [T, Hq, D] contiguous, q's dtype
  float* lse = nullptr;             // [T, Hq]
  bool use_mma = false;             // tiles have <= kCudaMmaRows rows: tensor-core kernel (cuda_mma_supported)
  bool aligned16 = true;            // cache rows 16-byte aligned: cp.async 16-byte copies
};
// p's pointers are device pointers. Returns a cudaError_t.
int paged_attention_cuda(const PagedParams& p, const PagedCudaWork& w, void* stream);

// out = merge(a, b) row-wise (attn::merge_weights); rows of D contiguous; may alias a.
int merge_states_cuda(DType dtype, int64_t n_rows, int64_t D, const void* a, const float* lse_a, const void* b,
                      const float* lse_b, void* out, float* lse_out, void* stream);

// Writes rows k[i], v[i] ([N, H, D], strides in elements) to (page[i], off[i]) of the caches.
struct AppendCudaParams {
  const void* k = nullptr; const void* v = nullptr;
  int64_t k_stride_n = 0, k_stride_h = 0, v_stride_n = 0, v_stride_h = 0;
  void* k_cache = nullptr; void* v_cache = nullptr;
  int64_t kc_stride[3] = {0, 0, 0}, vc_stride[3] = {0, 0, 0};  // page, token, head
  const int64_t* page = nullptr; const int64_t* off = nullptr;  // [N]
  int64_t N = 0, H = 0, D = 0;
  int elem_size = 4;
};
int append_paged_kv_cuda(const AppendCudaParams& p, void* stream);

// Copies pages src[i] -> dst[i] of one cache ([P, page_size, H, D] with strides in elements).
struct CopyPagesCudaParams {
  void* cache = nullptr;
  int64_t stride[3] = {0, 0, 0};
  int64_t page_size = 0, H = 0, D = 0;
  const int64_t* src = nullptr; const int64_t* dst = nullptr;
  int64_t n = 0;
  int elem_size = 4;
};
int copy_pages_cuda(const CopyPagesCudaParams& p, void* stream);

}  // namespace paged
}  // namespace ttscale
