// The closed sets of what kernels support, in one place, with run-time -> compile-time dispatch.
// Adding a dtype (or, later, a head dim or bit width) means editing this file only; an unsupported
// value is rejected by the op's validation with the list below in the message.
#pragma once
#include "common/dtype.h"

namespace ttscale {

// Element types of float inputs (logits, probabilities, activations).
#define TT_FLOAT_DTYPES_STR "float32, float16, bfloat16"

// TT_DISPATCH_FLOAT(dtype, T, body): runs `body` with T = float, half_t or bf16_t.
#define TT_DISPATCH_FLOAT(dtype, T, ...)                        \
  switch (dtype) {                                              \
    case ::ttscale::DType::kFloat16: {                          \
      using T = ::ttscale::half_t;                              \
      __VA_ARGS__;                                              \
    } break;                                                    \
    case ::ttscale::DType::kBFloat16: {                         \
      using T = ::ttscale::bf16_t;                              \
      __VA_ARGS__;                                              \
    } break;                                                    \
    default: {                                                  \
      using T = float;                                          \
      __VA_ARGS__;                                              \
    } break;                                                    \
  }

}  // namespace ttscale

namespace ttscale {

// Attention head dimensions with compiled kernels.
#define TT_HEAD_DIMS_STR "64, 128, 256"
inline bool head_dim_supported(int64_t d) { return d == 64 || d == 128 || d == 256; }

// Raises std::invalid_argument (defined in cpu_dispatch.cpp, out of line so that per-ISA kernel
// files need no std::string code). Ops validate head dims first, so reaching it is a bug.
[[noreturn]] void unsupported_head_dim(int64_t d);

// TT_DISPATCH_HEAD_DIM(d, D, body): runs `body` with constexpr int D in {64, 128, 256}.
#define TT_DISPATCH_HEAD_DIM(d, D, ...)          \
  switch (d) {                                   \
    case 64: {                                   \
      constexpr int D = 64;                      \
      __VA_ARGS__;                               \
    } break;                                     \
    case 128: {                                  \
      constexpr int D = 128;                     \
      __VA_ARGS__;                               \
    } break;                                     \
    case 256: {                                  \
      constexpr int D = 256;                     \
      __VA_ARGS__;                               \
    } break;                                     \
    default:                                     \
      ::ttscale::unsupported_head_dim(d);        \
  }

}  // namespace ttscale
