// Run-time choice of the CPU kernel variant, as ATen's DispatchStub chooses: the best
// instruction set the CPU (and OS) supports, capped by the environment variable
// FUSED_OPTIM_CPU_CAPABILITY=default|avx2|avx512, or set explicitly (tests use this to
// run every variant the machine can run). Torch-free, so the C++ unit tests use it too.
#pragma once

#include <string>
#include <vector>

#include "cpu/kernel_api.h"

namespace fused_optim {
namespace cpu {

// The kernels in use now.
const KernelSet& active_kernels();

// The variants this CPU can run, from the portable baseline up.
std::vector<std::string> supported_capabilities();

// Name of the variant in use now.
std::string current_capability();

// Selects a variant by name; throws std::invalid_argument naming the supported ones if
// the CPU cannot run it or the name is unknown.
void set_capability(const std::string& name);

// The kernels of a named variant (throws as set_capability does).
const KernelSet& kernels_for(const std::string& name);

}  // namespace cpu
}  // namespace fused_optim
