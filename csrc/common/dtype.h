// Torch-free element types. Kernels see fp16/bf16 as raw 16-bit words, widen to fp32 and narrow back
// (round to nearest even) with the bit-exact conversions below, the same on CPU and GPU, so no
// kernel depends on c10 or cuda_fp16.
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

// float -> fp16 / bf16, round to nearest even (NaN stays NaN), the same on host and device.
TT_HD uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40u);
  return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
TT_HD uint16_t float_to_half_bits(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t au = u & 0x7FFFFFFFu;
  if (au > 0x7F800000u) return (uint16_t)(sign | 0x7E00u);   // NaN
  if (au >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  // rounds to >= 65520: inf
  if (au < 0x38800000u) {                                    // below the smallest normal: subnormal / 0
    const float a = bits_to_float(au);
    // a * 2^24 rounded to nearest even (the subnormal mantissa); exact through float arithmetic
    const float scaled = a * 16777216.0f;
    uint32_t m = (uint32_t)scaled;
    const float frac = scaled - (float)m;
    if (frac > 0.5f || (frac == 0.5f && (m & 1u))) ++m;
    return (uint16_t)(sign | m);
  }
  const uint32_t r = au + 0xFFFu + ((au >> 13) & 1u);  // round mantissa to 10 bits
  return (uint16_t)(sign | (((r >> 13) - (112u << 10)) & 0x7FFFu));
}
TT_HD void store_float(float* p, float x) { *p = x; }
TT_HD void store_float(half_t* p, float x) { p->bits = float_to_half_bits(x); }
TT_HD void store_float(bf16_t* p, float x) { p->bits = float_to_bf16_bits(x); }

// Order-preserving map float -> uint32 (larger float <=> larger key); NaN is excluded by callers.
TT_HD uint32_t float_order_key(float f) {
  const uint32_t u = float_to_bits(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

}  // namespace ttscale
