// Run-time choice of the CPU kernel variant (csrc/cpu/dispatch.h).
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/dispatch.h"
#include "fused_optim/optimizers.h"
#include "harness.h"

namespace fo_test {
namespace {

namespace fc = fused_optim::cpu;

bool contains(const std::vector<std::string>& v, const std::string& x) {
  for (const auto& s : v) {
    if (s == x) return true;
  }
  return false;
}

// What this CPU should run, from the CPU flags queried here (the same builtin the
// library uses, but an independent statement of which flags each variant needs).
std::vector<std::string> expected_capabilities() {
  std::vector<std::string> out{"default"};
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (avx2) out.push_back("avx2");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    out.push_back("avx512");
  }
#endif
  return out;
}

std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ",") + x;
  return s;
}

}  // namespace

// Must run before any test calls set_capability (tests run in registration order; this
// is the only test that changes the active variant, and it restores it).
FO_TEST(dispatch_default_is_best_supported) {
  const std::vector<std::string> supported = fc::supported_capabilities();
  FO_CHECK(!supported.empty() && supported.front() == "default") << joined(supported);
  FO_CHECK_EQ(joined(supported), joined(expected_capabilities()));
  const char* env = std::getenv("FUSED_OPTIM_CPU_CAPABILITY");
  if (env == nullptr || *env == '\0') {
    FO_CHECK_EQ(fc::current_capability(), supported.back());
  } else {
    // A cap (like ATEN_CPU_CAPABILITY): the named variant if supported, else the best.
    const std::string expect = contains(supported, env) ? env : supported.back();
    FO_CHECK_EQ(fc::current_capability(), expect);
  }
  FO_CHECK(&fc::active_kernels() == &fc::kernels_for(fc::current_capability()));
}

FO_TEST(dispatch_every_supported_variant_is_complete_and_selectable) {
  const std::string before = fc::current_capability();
  for (const std::string& name : fc::supported_capabilities()) {
    const fc::KernelSet& k = fc::kernels_for(name);
    FO_CHECK_EQ(std::string(k.name), name);
    // chunks[id] for every optimizer of FO_FOR_EACH_OPTIMIZER, nothing after them.
    for (int id = 0; id < fc::kMaxOptimizers; ++id) {
      FO_CHECK_EQ(k.chunks[id] != nullptr, id < fused_optim::kNumOptimizers)
          << name << " id " << id;
    }
    fc::set_capability(name);
    FO_CHECK_EQ(fc::current_capability(), name);
    FO_CHECK(&fc::active_kernels() == &k) << name;
  }
  // Variants are distinct code (one instruction set per translation unit).
  const std::vector<std::string> s = fc::supported_capabilities();
  for (size_t i = 1; i < s.size(); ++i) {
    for (int id = 0; id < fused_optim::kNumOptimizers; ++id) {
      FO_CHECK(fc::kernels_for(s[i]).chunks[id] != fc::kernels_for(s[0]).chunks[id])
          << s[i] << " id " << id;
    }
  }
  fc::set_capability(before);
  FO_CHECK_EQ(fc::current_capability(), before);
}

FO_TEST(dispatch_unsupported_or_unknown_variant_throws) {
  const std::string before = fc::current_capability();
  const std::vector<std::string> supported = fc::supported_capabilities();
  // On a CPU without AVX-512 (the CI machines), asking for it must throw and change
  // nothing; on one with it, it must work.
  if (!contains(supported, "avx512")) {
    FO_CHECK_THROWS(fc::set_capability("avx512"), std::invalid_argument);
    FO_CHECK_THROWS(fc::kernels_for("avx512"), std::invalid_argument);
    FO_CHECK_EQ(fc::current_capability(), before);
  }
  for (const char* bad : {"", "AVX2", "sse4", "avx512bw", "default "}) {
    FO_CHECK_THROWS(fc::set_capability(bad), std::invalid_argument);
  }
  FO_CHECK_EQ(fc::current_capability(), before);
  try {
    fc::set_capability("no-such-isa");
  } catch (const std::invalid_argument& e) {
    const std::string msg = e.what();
    FO_CHECK(msg.find("no-such-isa") != std::string::npos) << msg;
    for (const auto& s : supported) FO_CHECK(msg.find(s) != std::string::npos) << msg;
  }
}

}  // namespace fo_test
