// Torch-free launcher interface of the CUDA sampling kernels (sampling_cuda.cu). The torch side
// (sampling.cpp, under TTSCALE_WITH_CUDA) validates inputs, converts per-row parameters to the
// dtypes below on the device, allocates outputs/workspace, and calls these on the current stream.
// All pointers are device pointers. Float parameters are double, as on the CPU path, so 1/T,
// log(min_p) and top_p * mass round the same way on both devices. Semantics are those of sampling.h, and the same (seed, offset)
// draws the same tokens as the CPU path (up to fp32 rounding at a CDF boundary).
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/dtype.h"

namespace ttscale {
namespace sampling {

// status[0]: 0 = ok, 1 = NaN or +inf in a row, 2 = a row with no mass (all -inf logits / zero probs),
// 3 = a probs row with a value above kMaxProb
// status[1]: the smallest offending row (kernels write it with atomicMin; host initialises to INT32_MAX)
constexpr int kStatusOk = 0, kStatusBadValue = 1, kStatusNoMass = 2, kStatusTooLarge = 3;

struct SampleCudaParams {
  const void* x = nullptr;     // [B, V] rows `row_stride` elements apart, last dim contiguous
  DType dtype = DType::kFloat32;
  int64_t B = 0, V = 0, row_stride = 0;
  bool probs = false;          // probabilities instead of logits (no temperature)
  const double* temperature = nullptr; double temperature_val = 1.0;  // [B] or scalar; 0 = greedy
  const int64_t* top_k = nullptr;      int64_t top_k_val = 0;         // <= 0 or >= V: off
  const double* top_p = nullptr;       double top_p_val = 1.0;        // >= 1: off
  const double* min_p = nullptr;       double min_p_val = 0.0;        // <= 0: off
  const int64_t* indices = nullptr;    // [N] rows to draw from (nullptr: N == B, sample i from row i)
  int64_t N = 0;
  const int64_t* seed = nullptr;   int64_t seed_len = 1;    // 1 or N
  const int64_t* offset = nullptr; int64_t offset_len = 1;  // 1 or N
  int64_t* out_tokens = nullptr;   // [N]
  float* out_logprobs = nullptr;   // [N] or nullptr
  int32_t* status = nullptr;       // [2]
  void* workspace = nullptr;       // sample_cuda_workspace_bytes(params) bytes
};
size_t sample_cuda_workspace_bytes(const SampleCudaParams& p);
int sample_cuda(const SampleCudaParams& p, void* stream);  // returns a cudaError_t

struct TokenLogprobsCudaParams {
  const void* x = nullptr; DType dtype = DType::kFloat32;
  int64_t B = 0, V = 0, row_stride = 0;
  const int64_t* tokens = nullptr;     // [B]
  const double* temperature = nullptr; double temperature_val = 1.0;  // 0 means 1 here
  float* out = nullptr;                // [B]
  int32_t* status = nullptr;           // [2]
};
int token_logprobs_cuda(const TokenLogprobsCudaParams& p, void* stream);

struct SpeculativeCudaParams {
  const int64_t* draft_tokens = nullptr;  // [B, n]
  const void* draft_probs = nullptr;      // [B, n, V] contiguous
  const void* target_probs = nullptr;     // [B, n+1, V] contiguous
  DType dtype = DType::kFloat32;
  int64_t B = 0, n = 0, V = 0;
  const int64_t* seed = nullptr;   int64_t seed_len = 1;    // 1 or B
  const int64_t* offset = nullptr; int64_t offset_len = 1;  // 1 or B
  int64_t* out_tokens = nullptr;     // [B, n+1], -1 padded
  int64_t* num_accepted = nullptr;   // [B]
};
int speculative_verify_cuda(const SpeculativeCudaParams& p, void* stream);

}  // namespace sampling
}  // namespace ttscale
