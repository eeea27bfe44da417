// Input validation helpers: every failure names the argument and what was expected.
// TT_CHECK_VALUE raises ValueError in Python (bad values); TT_CHECK raises RuntimeError (bad
// shapes, dtypes, devices, layouts), matching torch's own convention.
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>

#include "common/dispatch.h"

#if defined(TTSCALE_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

#define TT_CHECK(cond, ...) TORCH_CHECK(cond, "ttscale: ", __VA_ARGS__)
#define TT_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, "ttscale: ", __VA_ARGS__)

namespace ttscale {

inline void check_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TT_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name, " (", ref.device(),
           "), got ", t.device());
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim, const char* layout) {
  TT_CHECK(t.dim() == dim, name, " must be ", dim, "-D ", layout, ", got shape ", t.sizes());
}

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TT_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
           " must be one of " TT_FLOAT_DTYPES_STR ", got ", st);
}

// torch dtype -> kernel dtype (after check_float_dtype)
inline DType dtype_of(at::ScalarType st) {
  switch (st) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: return DType::kFloat32;
  }
}

inline void check_index_dtype(const at::Tensor& t, const char* name) {
  TT_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, name, " must be int32 or int64, got ",
           t.scalar_type());
}

inline void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  TT_CHECK(t.dim() == 0 || t.stride(-1) == 1 || t.size(-1) <= 1, name,
           " must be contiguous in its last dimension, got strides ", t.strides());
}

#if defined(TTSCALE_WITH_CUDA)
// The torch-free launchers return a cudaError_t as int; 0 is success.
inline void check_launch(int err, const char* op) {
  TT_CHECK(err == 0, op, ": CUDA kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}
#endif

}  // namespace ttscale
