// Torch-free launcher interface of the CUDA low-bit matmul (quant_matmul_cuda.cu). The torch side
// (quant_matmul.cpp, under TTSCALE_WITH_CUDA) validates inputs, converts the scales to fp32 [N, K/G]
// (a tiny tensor), allocates y and calls this on the current stream. All pointers are device pointers.
// Layout "cuda_k32" and semantics: quant_matmul.h.
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace ttscale {
namespace quant_matmul {

constexpr int kCudaGemvMaxM = 8;  // M <= this (or fp32 activations): the SIMT GEMV kernel

struct QmmCudaParams {
  const void* x = nullptr;         // [M, K] contiguous, dtype
  DType dtype = DType::kFloat32;   // of x, bias and y
  int64_t M = 0, N = 0, K = 0, G = 0;
  int bits = 4;
  const uint32_t* codes = nullptr;  // [N, K*bits/32] (cuda_k32)
  const float* scales = nullptr;    // [N, K/G] fp32
  const uint8_t* zeros = nullptr;   // [N, K/G] or nullptr (symmetric: z = 2^(bits-1))
  const void* bias = nullptr;       // [N] dtype, or nullptr
  void* y = nullptr;                // [M, N] dtype
};
int quant_matmul_cuda(const QmmCudaParams& p, void* stream);  // returns a cudaError_t

}  // namespace quant_matmul
}  // namespace ttscale
