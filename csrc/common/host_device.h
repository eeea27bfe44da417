// Function qualifiers for math shared by the CPU and CUDA paths.
//
// TT_HD functions are compiled by g++ into the CPU kernels (including the per-ISA copies) and by
// nvcc into the CUDA kernels, so the CPU tests exercise exactly the arithmetic the GPU runs (which
// is why CMakeLists.txt does not pass --use_fast_math: it would make `/`, expf, logf approximate).
// On the host they are always_inline: a shared inline function that the linker keeps as one
// out-of-line COMDAT copy could be the one compiled with -mavx512f and then run on a machine
// without AVX-512. Forcing inlining means no such copy is ever emitted.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define TT_HD __host__ __device__ __forceinline__
#define TT_DEVICE __device__ __forceinline__
#else
#define TT_HD inline __attribute__((always_inline))
#endif
