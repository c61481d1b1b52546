#include "registry.h"

#include "fused_optim/dispatch.h"
#include "fused_optim/optimizers.h"

namespace fused_optim {
namespace {

template <typename Names>
std::vector<std::string> strings(const Names& names) {
  return std::vector<std::string>(names.begin(), names.end());
}

template <typename Optim>
OptimInfo describe(int id) {
  return OptimInfo{id,
                   Optim::kOp,
                   strings(Optim::kListNames),
                   Optim::kOptionalLists,
                   Optim::kBFloat16Lists,
                   strings(Optim::kStateNames),
                   strings(Optim::kFloatNames),
                   strings(Optim::kFlagNames),
                   [](const math::Args& args, const void* const* ptrs, const bool* is_double,
                      double* state) { advance_state<Optim>(args, ptrs, is_double, state); },
                   &valid_call<Optim>};
}

std::vector<OptimInfo> build() {
  std::vector<OptimInfo> out;
#define FO_DESCRIBE(Name) out.push_back(describe<math::Name>(static_cast<int>(out.size())));
  FO_FOR_EACH_OPTIMIZER(FO_DESCRIBE)
#undef FO_DESCRIBE
  return out;
}

}  // namespace

const std::vector<OptimInfo>& optimizers() {
  static const std::vector<OptimInfo> all = build();
  return all;
}

const OptimInfo* find_optimizer(const std::string& op) {
  for (const OptimInfo& info : optimizers()) {
    if (info.op == op) return &info;
  }
  return nullptr;
}

}  // namespace fused_optim
