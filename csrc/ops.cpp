// The ops, one per optimizer, registered from its spec: torch.ops.fused_optim.<name>_.
//
// fused_optim/spec.py turns each optimizer's spec into a typed schema,
//
//   adam_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, ...,
//         Tensor(f!)[] state_steps, *, Tensor lr, float beta1, ..., bool amsgrad, ...,
//         Tensor? grad_scale=None, Tensor? found_inf=None) -> ()
//
// and hands it to register_op below, which finds the C++ math of the same name
// (fused_optim/optimizers.h), checks that the schema's lists, state lists and arguments
// are the ones the math names, and registers ONE boxed kernel per dispatch key for every
// op: each reads the call off the stack by the bound positions and runs the device's
// implementation (ops_cpu.cpp, cuda/ops_cuda.cu). Alias annotations name what an op
// mutates. `lr` travels as a tensor and the step counters live in the state lists, so
// changing either never changes a compiled graph; `grad_scale` (grads are divided by it,
// and left unscaled) and `found_inf` (when non-zero the op changes nothing at all, steps
// included) serve torch.amp.GradScaler.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/util/Exception.h>
#include <torch/csrc/jit/frontend/function_schema_parser.h>
#include <torch/library.h>

#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "ops.h"
#include "ops_common.h"
#include "parallel_rows.h"
#include "versions.h"

namespace fused_optim {
namespace {

std::mutex& registry_mutex() {
  static std::mutex m;
  return m;
}

// Registered ops by name ("adam_"); never freed (the dispatcher keeps their kernels).
std::map<std::string, std::unique_ptr<OpBinding>>& bound_ops() {
  static auto* ops = new std::map<std::string, std::unique_ptr<OpBinding>>();
  return *ops;
}

// The torch::Library objects that hold the registrations; alive for the process.
std::vector<std::unique_ptr<torch::Library>>& libraries() {
  static auto* libs = new std::vector<std::unique_ptr<torch::Library>>();
  return *libs;
}

DeviceStep& step_slot(c10::DeviceType type) {
  static DeviceStep cpu = nullptr;
  static DeviceStep cuda = nullptr;
  static DeviceStep other = nullptr;
  if (type == c10::DeviceType::CPU) return cpu;
  if (type == c10::DeviceType::CUDA) return cuda;
  return other;
}

std::string join(const std::vector<std::string>& names) {
  std::string out = "[";
  for (size_t i = 0; i < names.size(); ++i) out += (i ? ", " : "") + names[i];
  return out + "]";
}

[[noreturn]] void schema_error(const std::string& op, const std::string& what) {
  throw std::invalid_argument("fused_optim: the schema of " + op + " " + what +
                              " (the spec in fused_optim/ and the C++ math in "
                              "csrc/include/fused_optim/math/ must agree)");
}

// Binds the schema's arguments to the optimizer's names, in order:
// lists, state lists, then keyword-only lr, floats, flags, grad_scale, found_inf.
std::unique_ptr<OpBinding> bind(const c10::FunctionSchema& schema, const OptimInfo& info,
                                const std::map<std::string, std::string>& when) {
  auto b = std::make_unique<OpBinding>();
  b->info = &info;
  b->name = schema.name();
  const std::vector<c10::Argument>& args = schema.arguments();
  b->n_args = args.size();
  if (info.lists.size() < 2 || info.lists[0] != "params" || info.lists[1] != "grads") {
    schema_error(b->name, "math must start its lists with params and grads");
  }
  size_t pos = 0;
  const auto expect_names = [&](const std::vector<std::string>& names, const char* what,
                                auto type_ok, std::vector<int>* out) {
    std::vector<std::string> got;
    for (size_t k = 0; k < names.size() && pos + k < args.size(); ++k) {
      got.push_back(args[pos + k].name());
    }
    if (got != names) {
      schema_error(b->name, std::string("has ") + what + " " + join(got) + " where the C++ math has " +
                                join(names));
    }
    for (size_t k = 0; k < names.size(); ++k, ++pos) {
      if (!type_ok(args[pos])) schema_error(b->name, "argument " + names[k] + " has the wrong type");
      out->push_back(static_cast<int>(pos));
    }
  };
  const auto written_list = [](const c10::Argument& a) {
    return a.type()->str() == "Tensor[]" && a.alias_info() != nullptr && a.alias_info()->isWrite();
  };
  expect_names(info.lists, "lists", written_list, &b->list_args);
  expect_names(info.states, "state lists", written_list, &b->state_args);
  if (pos >= args.size() || args[pos].name() != "lr" || args[pos].type()->str() != "Tensor" ||
      !args[pos].kwarg_only()) {
    schema_error(b->name, "needs a keyword-only `Tensor lr` after its lists");
  }
  b->lr_arg = static_cast<int>(pos++);
  expect_names(info.floats, "float arguments",
               [](const c10::Argument& a) { return a.type()->str() == "float"; }, &b->float_args);
  expect_names(info.flags, "bool arguments",
               [](const c10::Argument& a) { return a.type()->str() == "bool"; }, &b->flag_args);
  for (const char* name : {"grad_scale", "found_inf"}) {
    if (pos >= args.size() || args[pos].name() != name || args[pos].type()->str() != "Tensor?") {
      schema_error(b->name, std::string("needs `Tensor? ") + name + "=None` after its arguments");
    }
    (std::string(name) == "grad_scale" ? b->grad_scale_arg : b->found_inf_arg) =
        static_cast<int>(pos++);
  }
  // The memory policy's lists (fused_optim/_policy.py), written when given.
  for (const char* name : {"master_params", "rng_states"}) {
    if (pos >= args.size() || args[pos].name() != name || args[pos].type()->str() != "Tensor[]?" ||
        args[pos].alias_info() == nullptr || !args[pos].alias_info()->isWrite()) {
      schema_error(b->name, std::string("needs `Tensor(x!)[]? ") + name + "=None` after found_inf");
    }
    (std::string(name) == "master_params" ? b->master_arg : b->rng_arg) = static_cast<int>(pos++);
  }
  if (pos != args.size()) schema_error(b->name, "has arguments the C++ math does not know");
  if (info.floats.size() > math::kMaxFloats || info.flags.size() > math::kMaxFlags ||
      info.states.size() > math::kMaxStates) {
    schema_error(b->name, "has more arguments than math::Args holds");
  }
  for (size_t k = 0; k < info.flags.size(); ++k) {
    if (info.flags[k] == "maximize") b->maximize_flag = static_cast<int>(k);
  }
  // Which option keeps each optional list (the spec's `when`).
  for (size_t k = 0; k < info.lists.size(); ++k) {
    const bool optional = (info.optional_lists >> k) & 1u;
    const auto it = when.find(info.lists[k]);
    if (optional != (it != when.end())) {
      schema_error(b->name, "list " + info.lists[k] + (optional ? " is optional in the C++ math "
                                                               "but not in the spec"
                                                             : " is optional in the spec but "
                                                               "not in the C++ math"));
    }
    int index = -1;
    bool is_flag = false;
    if (optional) {
      for (size_t j = 0; j < info.floats.size(); ++j) {
        if (info.floats[j] == it->second) index = static_cast<int>(j);
      }
      for (size_t j = 0; j < info.flags.size(); ++j) {
        if (info.flags[j] == it->second) index = static_cast<int>(j), is_flag = true;
      }
      if (index < 0) {
        schema_error(b->name, "list " + info.lists[k] + " depends on " + it->second +
                                  ", which is not a float or bool argument");
      }
    }
    b->list_when.push_back(index);
    b->list_when_is_flag.push_back(is_flag);
  }
  return b;
}

// The views of one stack's call (borrowed: the stack outlives the call).
struct StackCall {
  std::vector<BorrowedTensors> lists;
  std::vector<BorrowedTensors> states;
  BorrowedTensors master;
  BorrowedTensors rng;
  OpCall call;
};

void borrow_list(const c10::IValue& value, BorrowedTensors* out) {
  const c10::ArrayRef<c10::IValue> items = value.toListRef();
  out->reserve(items.size());
  for (const c10::IValue& item : items) out->push(item.toTensor());
}

void read_stack(const OpBinding& b, const torch::jit::Stack& stack, StackCall* s) {
  const size_t base = stack.size() - b.n_args;
  const auto arg = [&](int i) -> const c10::IValue& { return stack[base + i]; };
  const c10::IValue& gs = arg(b.grad_scale_arg);
  const c10::IValue& fi = arg(b.found_inf_arg);
  OpCall& c = s->call;
  c.init(
      b, arg(b.lr_arg).toTensor(), [&](size_t k) { return arg(b.float_args[k]).toDouble(); },
      [&](size_t k) { return arg(b.flag_args[k]).toBool(); },
      gs.isNone() ? nullptr : &gs.toTensor(), fi.isNone() ? nullptr : &fi.toTensor());
  s->lists.resize(b.list_args.size());
  s->states.resize(b.state_args.size());
  for (size_t k = 0; k < b.list_args.size(); ++k) {
    borrow_list(arg(b.list_args[k]), &s->lists[k]);
    c.lists[k] = s->lists[k].list();
  }
  for (size_t j = 0; j < b.state_args.size(); ++j) {
    borrow_list(arg(b.state_args[j]), &s->states[j]);
    c.states[j] = s->states[j].list();
  }
  if (!arg(b.master_arg).isNone()) {
    borrow_list(arg(b.master_arg), &s->master);
    c.master = s->master.list();
  }
  if (!arg(b.rng_arg).isNone()) {
    borrow_list(arg(b.rng_arg), &s->rng);
    c.rng = s->rng.list();
  }
}

// The kernel of every op for one device type: `step`, the device's implementation
// (registered before any op is: register_op binds only the devices that have one).
class StepKernel final : public c10::OperatorKernel {
 public:
  StepKernel(const OpBinding* binding, DeviceStep step) : binding_(binding), step_(step) {}

  void operator()(const c10::OperatorHandle&, c10::DispatchKeySet, torch::jit::Stack* stack) {
    {
      StackCall s;
      read_stack(*binding_, *stack, &s);
      step_(s.call);
    }
    torch::jit::drop(*stack, binding_->n_args);
  }

 private:
  const OpBinding* binding_;
  DeviceStep step_;
};

// [note: version counters of mutated tensors]
// An op that mutates its inputs must bump their version counters, or autograd cannot
// tell that a tensor saved for backward (a param, typically) changed since, and
// silently uses the new values where torch.optim's in-place ops raise. ATen's in-place
// ops do it in their ADInplaceOrView kernels; ours share one boxed kernel: run the op
// below ADInplaceOrView, then bump every tensor the call wrote: every list the schema
// marks written, except the grads, which a step writes only to unscale them (with
// grad_scale): torch.optim never changes a grad's version otherwise.
class BumpKernel final : public c10::OperatorKernel {
 public:
  explicit BumpKernel(const OpBinding* binding) : binding_(binding) {}

  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                  torch::jit::Stack* stack) {
    const OpBinding& b = *binding_;
    const size_t base = stack->size() - b.n_args;
    const bool has_grad_scale = !(*stack)[base + b.grad_scale_arg].isNone();
    // Copies of the list IValues, which the call pops: a list IValue shares its list (one
    // count), where copying the tensors out would bump every tensor's count.
    std::vector<c10::IValue> lists, states;
    for (int a : b.list_args) lists.push_back((*stack)[base + a]);
    for (int a : b.state_args) states.push_back((*stack)[base + a]);
    // The policy's lists, when given, are written as the state lists are.
    for (int a : {b.master_arg, b.rng_arg}) {
      if (!(*stack)[base + a].isNone()) states.push_back((*stack)[base + a]);
    }
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
    const auto items = [](const std::vector<c10::IValue>& values) {
      std::vector<c10::ArrayRef<c10::IValue>> out;
      for (const c10::IValue& v : values) out.push_back(v.toListRef());
      return out;
    };
    bump_written(b, has_grad_scale, items(lists), items(states));
  }

 private:
  const OpBinding* binding_;
};

}  // namespace

void set_device_step(c10::DeviceType type, DeviceStep step) { step_slot(type) = step; }

DeviceStep device_step(c10::DeviceType type) { return step_slot(type); }

const OpBinding* find_op(const std::string& op) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  const auto it = bound_ops().find(op);
  return it == bound_ops().end() ? nullptr : it->second.get();
}

bool register_op(const std::string& schema_text, const std::map<std::string, std::string>& when) {
  const c10::FunctionSchema schema = torch::jit::parseSchema(schema_text);
  const std::string qualified = schema.name();
  const std::string prefix = "fused_optim::";
  if (qualified.rfind(prefix, 0) != 0) {
    throw std::invalid_argument("fused_optim: " + qualified + " is not in the fused_optim namespace");
  }
  const std::string name = qualified.substr(prefix.size());
  const OptimInfo* info = find_optimizer(name);
  if (info == nullptr) {
    throw std::invalid_argument("fused_optim: no C++ math for " + qualified +
                                " (fused_optim/optimizers.h lists the compiled optimizers)");
  }
  std::unique_ptr<OpBinding> binding = bind(schema, *info, when);  // throws on a mismatch
  binding->schema = c10::toString(schema);
  std::lock_guard<std::mutex> lock(registry_mutex());
  const auto existing = bound_ops().find(name);
  if (existing != bound_ops().end()) {
    // Registered already (one op, several classes): the same schema, or an error.
    if (existing->second->schema != binding->schema) {
      throw std::invalid_argument("fused_optim: " + qualified + " is registered with schema " +
                                  existing->second->schema + ", not " + binding->schema);
    }
    return false;
  }
  const OpBinding* b = binding.get();
  bound_ops()[name] = std::move(binding);
  auto def = std::make_unique<torch::Library>(torch::Library::FRAGMENT, "fused_optim",
                                              std::nullopt, __FILE__, __LINE__);
  def->def(schema_text.c_str());
  libraries().push_back(std::move(def));
  const auto impl = [&](c10::DispatchKey key, torch::CppFunction&& fn) {
    auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, "fused_optim", key,
                                                __FILE__, __LINE__);
    lib->impl(name.c_str(), std::move(fn));
    libraries().push_back(std::move(lib));
  };
  for (const auto& [key, type] : {std::pair{c10::DispatchKey::CPU, c10::DeviceType::CPU},
                                  std::pair{c10::DispatchKey::CUDA, c10::DeviceType::CUDA}}) {
    if (const DeviceStep step = device_step(type); step != nullptr) {
      impl(key, torch::CppFunction::makeFromBoxedFunctor(std::make_unique<StepKernel>(b, step)));
    }
  }
  impl(c10::DispatchKey::ADInplaceOrView,
       torch::CppFunction::makeFromBoxedFunctor(std::make_unique<BumpKernel>(b)));
  return true;
}

std::vector<std::string> compiled_ops() {
  std::vector<std::string> out;
  for (const OptimInfo& info : optimizers()) out.push_back(info.op);
  return out;
}

}  // namespace fused_optim
