// The optimizers compiled into the C++ backends, described as plain data for the ops
// layer: the names of each one's lists, state lists and arguments (to bind an op's
// schema to them), its per-tensor state update and which calls its kernels take. Built
// from fused_optim/optimizers.h.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "fused_optim/math/args.h"

namespace fused_optim {

struct OptimInfo {
  int id;                   // position in FO_FOR_EACH_OPTIMIZER: the kernel tables' index
  std::string op;           // the op's name in the fused_optim namespace ("adam_")
  std::vector<std::string> lists;   // element-wise lists, op order; params and grads first
  uint32_t optional_lists;  // lists an option may leave out, a bit per list
  uint32_t bf16_lists;      // work lists stored in bf16 ([note: bf16 work lists])
  std::vector<std::string> states;  // per-tensor scalar state lists
  std::vector<std::string> floats;  // float arguments, schema order
  std::vector<std::string> flags;   // bool arguments, schema order
  // A tensor's step's state, from its state tensors ptrs[j] (doubles where is_double[j],
  // else floats): the values after this step's advance, rounded to each tensor's dtype,
  // then the values before it (advance_state in fused_optim/dispatch.h); state has
  // 2 * states.size() values.
  void (*advance)(const math::Args& args, const void* const* ptrs, const bool* is_double,
                  double* state);
  // Whether a call with these lists present (a bit per list) and arguments selects a
  // compiled kernel variant ([note: compiled variants] in fused_optim/dispatch.h).
  bool (*valid)(uint32_t lists, const math::Args& args);
};

// Every C++ optimizer, in FO_FOR_EACH_OPTIMIZER order.
const std::vector<OptimInfo>& optimizers();

// The optimizer whose op is `op` ("adam_"), or nullptr.
const OptimInfo* find_optimizer(const std::string& op);

}  // namespace fused_optim
