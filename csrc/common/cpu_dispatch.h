// Run-time choice of the CPU SIMD path.
//
// Every csrc/ops/<op>/<op>_cpu.cpp is compiled once per ISA (CMakeLists.txt: generic, and on x86-64
// also avx2, avx512 and avx512bf16) into namespace ttscale::cpu::<isa>, and exports a table of
// function pointers. active_isa() picks the best one the CPU supports;
// TTSCALE_CPU_ISA=generic|avx2|avx512|avx512bf16 in the environment, or ttscale._C._set_cpu_isa(), forces one (tests run every built path).
#pragma once
#include <string>

namespace ttscale {
namespace cpu {

// Ordered: each level is a superset of the one before. avx512bf16 = avx512 + AVX512_BF16 (vdpbf16ps)
// + AVX512_VNNI + AVX512_VBMI (Zen 4/5, Sapphire Rapids and later); its kernels are compiled with
// both TTSCALE_CPU_ISA_AVX512 and TTSCALE_CPU_ISA_AVX512BF16 defined.
enum class Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

const char* isa_name(Isa isa);
bool isa_built(Isa isa);      // compiled into this module
bool isa_supported(Isa isa);  // built and the running CPU has the instructions
Isa active_isa();
// Forces an ISA by name ("generic", "avx2", "avx512", "avx512bf16" or "auto"); throws if unsupported.
// Returns the previous name.
std::string set_isa(const std::string& name);

}  // namespace cpu
}  // namespace ttscale

// Declares `const T* fn()` in every per-ISA namespace; pair with TT_CPU_SELECT.
#define TT_DECLARE_CPU_KERNELS(T, fn)                   \
  namespace ttscale { namespace cpu {                   \
  namespace generic { const T* fn(); }                  \
  namespace avx2 { const T* fn(); }                     \
  namespace avx512 { const T* fn(); }                   \
  namespace avx512bf16 { const T* fn(); }               \
  } }

#if defined(TTSCALE_HAVE_ISA_AVX2)
#define TT_IF_AVX2(x) x
#else
#define TT_IF_AVX2(x) nullptr
#endif
#if defined(TTSCALE_HAVE_ISA_AVX512)
#define TT_IF_AVX512(x) x
#else
#define TT_IF_AVX512(x) nullptr
#endif
#if defined(TTSCALE_HAVE_ISA_AVX512BF16)
#define TT_IF_AVX512BF16(x) x
#else
#define TT_IF_AVX512BF16(x) nullptr
#endif

// The kernel table of the active ISA.
#define TT_CPU_SELECT(fn)                                                                  \
  ([]() -> decltype(::ttscale::cpu::generic::fn()) {                                       \
    switch (::ttscale::cpu::active_isa()) {                                                \
      case ::ttscale::cpu::Isa::kAvx512Bf16:                                               \
        return TT_IF_AVX512BF16(::ttscale::cpu::avx512bf16::fn());                         \
      case ::ttscale::cpu::Isa::kAvx512: return TT_IF_AVX512(::ttscale::cpu::avx512::fn()); \
      case ::ttscale::cpu::Isa::kAvx2: return TT_IF_AVX2(::ttscale::cpu::avx2::fn());       \
      default: return ::ttscale::cpu::generic::fn();                                       \
    }                                                                                      \
  }())
