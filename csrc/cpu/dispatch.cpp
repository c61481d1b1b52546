#include "cpu/dispatch.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace fused_optim {
namespace cpu {
namespace {

bool cpu_runs(const std::string& name) {
  if (name == "default") return true;
#if defined(__x86_64__)
  // __builtin_cpu_supports also checks that the OS saves the wider registers (XCR0).
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (name == "avx2") return avx2 && kernels_avx2().chunks[0] != nullptr;
  if (name == "avx512") {
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           kernels_avx512().chunks[0] != nullptr;
  }
#endif
  return false;
}

const KernelSet& by_name(const std::string& name) {
  if (name == "avx512") return kernels_avx512();
  if (name == "avx2") return kernels_avx2();
  return kernels_default();
}

const KernelSet* choose_at_startup() {
  std::vector<std::string> supported = supported_capabilities();
  std::string best = supported.back();
  if (const char* cap = std::getenv("FUSED_OPTIM_CPU_CAPABILITY")) {
    // A cap, like ATEN_CPU_CAPABILITY: never above what the CPU runs.
    for (const std::string& s : supported) {
      if (s == cap) best = s;
    }
  }
  return &by_name(best);
}

std::atomic<const KernelSet*>& active() {
  static std::atomic<const KernelSet*> kernels{choose_at_startup()};
  return kernels;
}

}  // namespace

std::vector<std::string> supported_capabilities() {
  std::vector<std::string> out;
  for (const char* name : {"default", "avx2", "avx512"}) {
    if (cpu_runs(name)) out.emplace_back(name);
  }
  return out;
}

const KernelSet& kernels_for(const std::string& name) {
  if (!cpu_runs(name)) {
    std::string msg = "fused_optim: CPU capability '" + name +
                      "' is unknown or not supported by this CPU; supported:";
    for (const std::string& s : supported_capabilities()) msg += " " + s;
    throw std::invalid_argument(msg);
  }
  return by_name(name);
}

const KernelSet& active_kernels() { return *active().load(std::memory_order_acquire); }

std::string current_capability() { return active_kernels().name; }

void set_capability(const std::string& name) {
  active().store(&kernels_for(name), std::memory_order_release);
}

}  // namespace cpu
}  // namespace fused_optim
