// The op schemas, declared once for every backend (CPU here, CUDA in csrc/cuda/).
//
// Alias annotations name what each op mutates. `lr` travels as a tensor and the step
// counters live in `state_steps`, so changing either never changes a compiled graph;
// `grad_scale` (grads are divided by it, and left unscaled) and `found_inf` (when
// non-zero the op changes nothing at all, steps included) serve torch.amp.GradScaler.
#include <torch/library.h>

TORCH_LIBRARY(fused_optim, m) {
  m.def(
      "adam_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, *, "
      "Tensor lr, float beta1, float beta2, float weight_decay, float eps, bool amsgrad, "
      "bool maximize, bool decoupled_weight_decay, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, *, "
      "Tensor lr, float momentum, float dampening, float weight_decay, bool nesterov, "
      "bool maximize, bool is_first_step, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
}

// [note: version counters of mutated tensors]
// An op that mutates its inputs must bump their version counters, or autograd cannot
// tell that a tensor saved for backward (a param, typically) changed since, and
// silently uses the new values where torch.optim's in-place ops raise. ATen's in-place
// ops do it in their ADInplaceOrView kernels; ours share one boxed kernel: run the op
// below ADInplaceOrView, then bump every tensor the schema marks as written (alias
// annotation with `!`), for every op and every backend key (CPU, CUDA) at once.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <vector>

#include "parallel_rows.h"
#include "versions.h"

namespace {

void bump_written_versions(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                           torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const size_t n = arguments.size();
  // Copies of the written arguments: a list IValue shares its list (one count), where
  // copying the tensors out would bump every tensor's count (and, with the GIL released
  // around ops called from Python, take the GIL for each one that has a Python object).
  std::vector<c10::IValue> written;
  for (size_t i = 0; i < n; ++i) {
    const c10::AliasInfo* alias = arguments[i].alias_info();
    if (alias != nullptr && alias->isWrite()) written.push_back((*stack)[stack->size() - n + i]);
  }
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  for (const c10::IValue& value : written) {
    if (value.isTensor()) {
      fused_optim::bump_versions(1, [&](size_t) -> const at::Tensor& { return value.toTensor(); });
    } else if (value.isTensorList()) {
      const c10::ArrayRef<c10::IValue> items = value.toListRef();
      fused_optim::parallel_rows(items.size(), [&](size_t begin, size_t end) {
        fused_optim::bump_versions(end - begin, [&](size_t i) -> const at::Tensor& {
          return items[begin + i].toTensor();
        });
      });
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, ADInplaceOrView, m) {
  m.impl("adam_", torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
  m.impl("sgd_", torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
}
