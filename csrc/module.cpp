// The Python extension module fused_optim._C.
//
// Loading it registers the ops (TORCH_LIBRARY in csrc/ops.cpp and the per-device
// TORCH_LIBRARY_IMPL blocks). Every tensor op is a dispatcher op, torch.ops.fused_optim.*,
// which torch.compile and torch.library.opcheck understand; pybind11 serves small
// helpers and the eager entry (csrc/eager.cpp), which gathers a param group in C++ and
// calls those ops' own kernels.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>

#include "cpu/dispatch.h"
#include "eager.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fused_optim compiled kernels (ops are under torch.ops.fused_optim)";
  m.def("cpu_capability", &fused_optim::cpu::current_capability,
        "Name of the CPU kernel variant in use: 'default', 'avx2' or 'avx512'.");
  m.def("supported_cpu_capabilities", &fused_optim::cpu::supported_capabilities,
        "CPU kernel variants this machine can run, from the portable baseline up.");
  m.def("set_cpu_capability", &fused_optim::cpu::set_capability, py::arg("name"),
        "Use the named CPU kernel variant; ValueError if this CPU cannot run it.");
  fused_optim::bind_eager(m);
  m.def("build_info", []() {
    py::dict info;
#if defined(__VERSION__)
    info["compiler"] = __VERSION__;
#endif
#if defined(FUSED_OPTIM_WITH_CUDA)
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    info["cpu_capabilities_built"] = py::make_tuple("default", "avx2", "avx512");
    return info;
  });
}
