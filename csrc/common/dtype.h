// Torch-free element types. Kernels see fp16/bf16 as raw 16-bit words and widen to fp32 with the
// bit-exact conversions below (the same on CPU and GPU), so no kernel depends on c10 or cuda_fp16.
#pragma once
#include <cstdint>
#include <cstring>
#include "common/host_device.h"

namespace ttscale {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct half_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

TT_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f; std::memcpy(&f, &u, 4); return f;
#endif
}
TT_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u; std::memcpy(&u, &f, 4); return u;
#endif
}

// IEEE binary16 -> binary32, exact for every input (subnormals, inf, NaN included).
TT_HD float half_bits_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  if (exp == 0x1Fu) return bits_to_float(sign | 0x7F800000u | (mant << 13));
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return bits_to_float(sign);
  // subnormal: value = mant * 2^-24, exactly representable in fp32
  const float v = (float)mant * 5.9604644775390625e-08f;
  return sign ? -v : v;
}
TT_HD float bf16_bits_to_float(uint16_t b) { return bits_to_float((uint32_t)b << 16); }

TT_HD float to_float(float x) { return x; }
TT_HD float to_float(half_t x) { return half_bits_to_float(x.bits); }
TT_HD float to_float(bf16_t x) { return bf16_bits_to_float(x.bits); }

// Order-preserving map float -> uint32 (larger float <=> larger key); NaN is excluded by callers.
TT_HD uint32_t float_order_key(float f) {
  const uint32_t u = float_to_bits(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

}  // namespace ttscale
