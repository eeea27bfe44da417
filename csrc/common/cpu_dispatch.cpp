#include "common/cpu_dispatch.h"
#include "common/dispatch.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace ttscale {
namespace cpu {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Bf16: return "avx512bf16";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

bool isa_built(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Bf16:
#if defined(TTSCALE_HAVE_ISA_AVX512BF16)
      return true;
#else
      return false;
#endif
    case Isa::kAvx512:
#if defined(TTSCALE_HAVE_ISA_AVX512)
      return true;
#else
      return false;
#endif
    case Isa::kAvx2:
#if defined(TTSCALE_HAVE_ISA_AVX2)
      return true;
#else
      return false;
#endif
    default: return true;
  }
}

bool isa_supported(Isa isa) {
  if (!isa_built(isa)) return false;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::kAvx512Bf16:
      return isa_supported(Isa::kAvx512) && __builtin_cpu_supports("avx512bf16") &&
             __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi");
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
    default: return true;
  }
#else
  return isa == Isa::kGeneric;
#endif
}

namespace {
Isa best_isa() {
  if (isa_supported(Isa::kAvx512Bf16)) return Isa::kAvx512Bf16;
  if (isa_supported(Isa::kAvx512)) return Isa::kAvx512;
  if (isa_supported(Isa::kAvx2)) return Isa::kAvx2;
  return Isa::kGeneric;
}

Isa parse(const std::string& name) {
  if (name == "auto" || name.empty()) return best_isa();
  for (Isa isa : {Isa::kGeneric, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Bf16})
    if (name == isa_name(isa)) {
      if (!isa_supported(isa))
        throw std::invalid_argument("ttscale: CPU ISA '" + name +
                                    "' is not supported by this CPU or was not built");
      return isa;
    }
  throw std::invalid_argument("ttscale: unknown CPU ISA '" + name +
                              "' (expected auto, generic, avx2, avx512 or avx512bf16)");
}

std::atomic<int>& current() {
  static std::atomic<int> isa{[] {
    const char* env = std::getenv("TTSCALE_CPU_ISA");
    return static_cast<int>(env ? parse(env) : best_isa());
  }()};
  return isa;
}
}  // namespace

Isa active_isa() { return static_cast<Isa>(current().load(std::memory_order_relaxed)); }

std::string set_isa(const std::string& name) {
  const Isa next = parse(name);
  const Isa prev = static_cast<Isa>(current().exchange(static_cast<int>(next)));
  return isa_name(prev);
}

}  // namespace cpu
}  // namespace ttscale

namespace ttscale {
void unsupported_head_dim(int64_t d) {
  throw std::invalid_argument("ttscale: head dim " + std::to_string(d) + " has no kernel (supported: " TT_HEAD_DIMS_STR
                              ")");
}
}  // namespace ttscale
