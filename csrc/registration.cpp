// The `ttscale` torch library (ops are added by each csrc/ops/<op>/<op>.cpp with
// TORCH_LIBRARY_FRAGMENT) and the `ttscale._C` Python module, which carries only build information
// and the CPU ISA switch: every tensor op goes through the torch dispatcher (torch.ops.ttscale.*).
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <string>

#include "common/cpu_dispatch.h"

#ifndef TTSCALE_VERSION
#define TTSCALE_VERSION "0.0.0"
#endif
#ifndef TTSCALE_BUILT_CPU_ISAS
#define TTSCALE_BUILT_CPU_ISAS "generic"
#endif

TORCH_LIBRARY(ttscale, m) {}

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "ttscale native module (ops are registered as torch.ops.ttscale.*)";
  m.def("build_info", []() {
    py::dict d;
    d["version"] = TTSCALE_VERSION;
#if defined(TTSCALE_WITH_CUDA)
    d["cuda"] = true;
    d["cuda_archs"] = std::string(TTSCALE_CUDA_ARCHS_STR);
#else
    d["cuda"] = false;
    d["cuda_archs"] = std::string();
#endif
    d["cpu_isas_built"] = std::string(TTSCALE_BUILT_CPU_ISAS);
    d["cpu_isa"] = std::string(ttscale::cpu::isa_name(ttscale::cpu::active_isa()));
    py::list supported;
    for (auto isa : {ttscale::cpu::Isa::kGeneric, ttscale::cpu::Isa::kAvx2, ttscale::cpu::Isa::kAvx512,
                     ttscale::cpu::Isa::kAvx512Bf16})
      if (ttscale::cpu::isa_supported(isa)) supported.append(ttscale::cpu::isa_name(isa));
    d["cpu_isas_supported"] = supported;
    return d;
  });
  m.def("_set_cpu_isa", &ttscale::cpu::set_isa, py::arg("name"),
        "Force the CPU SIMD path ('generic', 'avx2', 'avx512', 'avx512bf16' or 'auto'); returns the previous one.");
}
