// Torch-free launcher interface of the CUDA dense attention kernels (attention_cuda.cu).
// attention.cpp (under TTSCALE_WITH_CUDA) validates the inputs, allocates o (q's dtype, [Tq, Hq, D]
// contiguous) and lse, copies cu_seqlens to the device, and calls attention_cuda on the current
// stream. Params are those of attention.h with device pointers; cu_q / cu_k point to device memory.
#pragma once
#include <cstdint>

#include "ops/attention/attention.h"

namespace ttscale {
namespace attention {

// max_q_len: the longest query sequence (sizes the grid). Returns a cudaError_t.
int attention_cuda(const AttnParams& p, int64_t max_q_len, void* stream);

}  // namespace attention
}  // namespace ttscale
