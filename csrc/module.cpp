// The Python extension module fused_optim._C.
//
// The ops are registered from Python, one per optimizer spec (register_op, csrc/ops.cpp).
// Every tensor op is a dispatcher op, torch.ops.fused_optim.*, which torch.compile and
// torch.library.opcheck understand; pybind11 serves small helpers, the registration and
// the eager entry (csrc/eager.cpp), which gathers a param group in C++ and calls those
// ops' own implementations.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>

#include "cpu/dispatch.h"
#include "eager.h"
#include "ops.h"

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
  m.def("register_op", &fused_optim::register_op, py::arg("schema"), py::arg("when"),
        "Defines torch.ops.fused_optim.<name> from a schema generated from an optimizer's "
        "spec and registers its C++ kernels; ValueError if the schema and the C++ math "
        "disagree, False if the op exists already (see csrc/ops.cpp).");
  m.def("compiled_ops", &fused_optim::compiled_ops,
        "The ops the C++ backends have math for (fused_optim/optimizers.h).");
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
