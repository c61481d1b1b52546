// The eager entry (csrc/eager.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace fused_optim {

// Adds fused_optim._C.step_group_.
void bind_eager(pybind11::module_& m);

}  // namespace fused_optim
