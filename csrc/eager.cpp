// The eager entry: one optimizer step of one param group, gathered in C++.
//
// A torch.optim-style step gathers, per param, the grad and the state tensors into
// Python lists, then the op converts those lists back to C++ tensors. At 2,048 params
// that bookkeeping cost ~4 ms per step on the dev machine (Python lists ~2 ms, op entry
// ~2 ms), about 15% of the whole streaming step, and it grows with the param count
// while the bytes do not. Here the same rows are read straight from the Python objects
// (group["params"], self.state) and handed to the op's own kernel for the params'
// device through the dispatcher's redispatch: same kernel, same checks, same numbers.
//
// The entry takes only the common case and otherwise says "not mine" (returns False,
// having changed nothing); the optimizer then runs its general Python path, which owns
// every other case and its error messages:
//   * every param a plain torch.Tensor or nn.Parameter (no subclass, so no DTensor or
//     __torch_dispatch__ tensor), all on one device with one real floating dtype, the
//     device and dtype the optimizer chose a C++ backend for;
//   * every param with a grad has dense, contiguous param and grad and all of its state
//     (a missing key means state to create: the Python path creates it);
//   * the caller checked that nothing traces or intercepts torch calls (torch.compile,
//     dispatch or torch-function modes): those must see the op itself.
// What the dispatcher would add between Python and the kernel, the entry does itself:
// the ADInplaceOrView version bumps of everything the schema marks written (every
// tensor list of adam_ and sgd_, see csrc/ops.cpp), and the GIL is released around the
// kernel as it is around any torch op.
#include <torch/csrc/autograd/python_variable.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <c10/util/Optional.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "eager.h"
#include "parallel_rows.h"
#include "versions.h"

namespace py = pybind11;

namespace fused_optim {
namespace {

using TensorVec = std::vector<at::Tensor>;

// Tensors borrowed from Python objects this list keeps alive (one Py_INCREF each: a
// reference to the object holds its tensor). A copied at::Tensor would bump the
// TensorImpl's atomic count and, with a Python object attached, the object's too; at
// ~10,000 tensors a step that was a fifth of the entry's time. Built and destroyed
// with the GIL held; the tensors stay valid while the kernel runs without it, whatever
// another thread does to the objects meanwhile.
class BorrowedList {
 public:
  BorrowedList() = default;
  BorrowedList(const BorrowedList&) = delete;
  BorrowedList& operator=(const BorrowedList&) = delete;
  ~BorrowedList() {
    for (at::Tensor& t : tensors_) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
    for (PyObject* o : owners_) Py_DECREF(o);
  }
  void reserve(size_t n) {
    tensors_.reserve(n);
    owners_.reserve(n);
  }
  void push(PyObject* owner) {
    Py_INCREF(owner);
    owners_.push_back(owner);
    tensors_.push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(THPVariable_Unpack(owner)));
  }
  const TensorVec& tensors() const { return tensors_; }

 private:
  TensorVec tensors_;
  std::vector<PyObject*> owners_;
};

// The rows of one group: params, grads (owned: a grad belongs to no Python object we
// can hold, p.grad may be replaced), one list per element-wise state key, and the step
// counters (when the algorithm has them).
struct Rows {
  BorrowedList params;
  TensorVec grads;
  std::vector<std::unique_ptr<BorrowedList>> states;
  BorrowedList steps;

  std::vector<const TensorVec*> all() const {
    std::vector<const TensorVec*> out{&params.tensors(), &grads};
    for (const auto& s : states) out.push_back(&s->tensors());
    out.push_back(&steps.tensors());
    return out;
  }
};

bool plain_tensor(PyObject* obj) { return THPVariable_CheckExact(obj); }

bool kernel_dtype(c10::ScalarType t) {
  return t == c10::ScalarType::Float || t == c10::ScalarType::Double ||
         t == c10::ScalarType::Half || t == c10::ScalarType::BFloat16;
}

// torch.Tensor hashes by identity (Tensor.__hash__ returns id(self), a Python call per
// lookup). When `param`'s hash is its address, the lookups below pass that hash and skip
// the call: ~120 ns a param. Checked on each group's first param; every param is a
// plain Tensor or Parameter (same __hash__), and no torch-function mode is active.
bool hash_is_identity(PyObject* param) {
  const Py_hash_t h = PyObject_Hash(param);
  if (h == -1) throw py::error_already_set();
  return h == static_cast<Py_hash_t>(reinterpret_cast<uintptr_t>(param));
}

PyObject* lookup(PyObject* dict, PyObject* key, bool identity_hash) {
  PyObject* value;  // borrowed
#if PY_VERSION_HEX < 0x030D0000
  value = identity_hash ? _PyDict_GetItem_KnownHash(
                              dict, key, static_cast<Py_hash_t>(reinterpret_cast<uintptr_t>(key)))
                        : PyDict_GetItemWithError(dict, key);
#else
  (void)identity_hash;
  value = PyDict_GetItemWithError(dict, key);
#endif
  if (value == nullptr && PyErr_Occurred()) throw py::error_already_set();
  return value;
}

// A state value the kernels can take without the Python path's help, or nullptr.
PyObject* state_tensor(PyObject* param_state, PyObject* key) {
  PyObject* value = lookup(param_state, key, /*identity_hash=*/false);
  return value != nullptr && plain_tensor(value) ? value : nullptr;
}

// Reads the rows of `params` (a list) from the objects. False when any row needs the
// Python path (see the top of this file); nothing is changed either way.
bool gather(PyObject* params, PyObject* state, const std::vector<PyObject*>& keys,
            PyObject* step_key, Rows* rows) {
  if (!PyList_CheckExact(params) || !PyDict_Check(state)) return false;
  const Py_ssize_t n = PyList_GET_SIZE(params);
  if (n == 0 || !plain_tensor(PyList_GET_ITEM(params, 0))) return false;
  const bool with_state = !keys.empty() || step_key != nullptr;
  const bool identity_hash = with_state && hash_is_identity(PyList_GET_ITEM(params, 0));
  rows->params.reserve(n);
  rows->grads.reserve(n);
  for (size_t k = 0; k < keys.size(); ++k) {
    rows->states.push_back(std::make_unique<BorrowedList>());
    rows->states.back()->reserve(n);
  }
  if (step_key != nullptr) rows->steps.reserve(n);

  const at::Tensor& first = THPVariable_Unpack(PyList_GET_ITEM(params, 0));
  const c10::Device device = first.device();
  const c10::ScalarType dtype = first.scalar_type();
  if (!kernel_dtype(dtype)) return false;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* obj = PyList_GET_ITEM(params, i);
    if (!plain_tensor(obj)) return false;
    const at::Tensor& p = THPVariable_Unpack(obj);
    if (p.device() != device || p.scalar_type() != dtype) return false;
    const at::Tensor& grad = p.grad();
    if (!grad.defined()) continue;
    if (grad.layout() != c10::kStrided || !p.is_contiguous() || !grad.is_contiguous()) {
      return false;
    }
    if (with_state) {
      PyObject* param_state = lookup(state, obj, identity_hash);
      if (param_state == nullptr || !PyDict_Check(param_state)) return false;
      for (size_t k = 0; k < keys.size(); ++k) {
        PyObject* t = state_tensor(param_state, keys[k]);
        if (t == nullptr) return false;
        rows->states[k]->push(t);
      }
      if (step_key != nullptr) {
        PyObject* s = state_tensor(param_state, step_key);
        if (s == nullptr) return false;
        rows->steps.push(s);
      }
    }
    rows->params.push(obj);
    rows->grads.push_back(grad);
  }
  return true;
}

c10::optional<at::Tensor> optional_tensor(py::handle obj, const char* name) {
  if (obj.is_none()) return c10::nullopt;
  if (!THPVariable_Check(obj.ptr())) {
    throw py::type_error(std::string(name) + " must be a Tensor or None");
  }
  return THPVariable_Unpack(obj.ptr());
}

const at::Tensor& tensor_arg(py::handle obj, const char* name) {
  if (!THPVariable_Check(obj.ptr())) throw py::type_error(std::string(name) + " must be a Tensor");
  return THPVariable_Unpack(obj.ptr());
}

// [note: version counters of mutated tensors] in csrc/ops.cpp: the entry skips the
// dispatcher's ADInplaceOrView kernel, so it bumps what that kernel would (every list
// of adam_ and sgd_ is marked written).
void bump_all(const std::vector<const TensorVec*>& lists) {
  // Every list has one tensor per row (or none); rows split over threads as the checks.
  parallel_rows(lists[0]->size(), [&](size_t begin, size_t end) {
    for (const TensorVec* l : lists) {
      if (l->empty()) continue;
      bump_versions(end - begin,
                    [l, begin](size_t i) -> const at::Tensor& { return (*l)[begin + i]; });
    }
  });
}

// Runs `fn` (the redispatch to the device kernel) without the GIL, and turns a C++
// check failure into the RuntimeError (message without the C++ backtrace) that the op
// raises through torch.ops.
template <typename Fn>
void run_kernel(Fn fn) {
  try {
    py::gil_scoped_release no_gil;
    fn();
  } catch (const c10::Error& e) {
    throw std::runtime_error(e.what_without_backtrace());
  }
}

c10::DispatchKeySet kernel_keys(const at::Tensor& any_param) {
  return c10::DispatchKeySet(c10::computeDispatchKey(
      c10::nullopt, c10::kStrided, any_param.device()));
}

using OptionalTensor = c10::optional<at::Tensor>;

// What both entries do around their op: gather the rows; unless no param has a grad
// (then, as in torch.optim, nothing happens), call `redispatch(keys, rows, lr,
// grad_scale, found_inf)` without the GIL; bump the versions.
// The step is recorded for torch.profiler under the op's name, as a dispatcher call
// would be (free while no profiler runs).
template <typename Redispatch>
bool step_group(const char* op_name, py::handle params, py::handle state,
                const std::vector<PyObject*>& keys, PyObject* step_key, py::handle lr,
                py::handle grad_scale, py::handle found_inf, Redispatch redispatch) {
  Rows rows;
  if (!gather(params.ptr(), state.ptr(), keys, step_key, &rows)) return false;
  if (rows.params.tensors().empty()) return true;
  RECORD_FUNCTION(op_name, std::vector<c10::IValue>());
  const at::Tensor& lr_t = tensor_arg(lr, "lr");
  const OptionalTensor gs = optional_tensor(grad_scale, "grad_scale");
  const OptionalTensor fi = optional_tensor(found_inf, "found_inf");
  const c10::DispatchKeySet device_keys = kernel_keys(rows.params.tensors()[0]);
  run_kernel([&] { redispatch(device_keys, rows, lr_t, gs, fi); });
  bump_all(rows.all());
  return true;
}

bool adam_group(py::handle params, py::handle state, bool amsgrad, py::handle lr, double beta1,
                double beta2, double weight_decay, double eps, bool maximize,
                bool decoupled_weight_decay, py::handle grad_scale, py::handle found_inf) {
  static PyObject* const state_keys[] = {PyUnicode_InternFromString("exp_avg"),
                                         PyUnicode_InternFromString("exp_avg_sq"),
                                         PyUnicode_InternFromString("max_exp_avg_sq")};
  static PyObject* const step_key = PyUnicode_InternFromString("step");
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_optim::adam_", "")
                             .typed<AdamOpSignature>();
  const std::vector<PyObject*> keys(state_keys, state_keys + (amsgrad ? 3 : 2));
  return step_group("fused_optim::adam_", params, state, keys, step_key, lr, grad_scale,
                    found_inf,
                    [&](c10::DispatchKeySet ks, const Rows& rows, const at::Tensor& lr_t,
                        const OptionalTensor& gs, const OptionalTensor& fi) {
                      const TensorVec none;
                      op.redispatch(ks, rows.params.tensors(), rows.grads,
                                    rows.states[0]->tensors(), rows.states[1]->tensors(),
                                    amsgrad ? rows.states[2]->tensors() : none,
                                    rows.steps.tensors(), lr_t, beta1, beta2, weight_decay, eps,
                                    amsgrad, maximize, decoupled_weight_decay, gs, fi);
                    });
}

bool sgd_group(py::handle params, py::handle state, py::handle lr, double momentum,
               double dampening, double weight_decay, bool nesterov, bool maximize,
               py::handle grad_scale, py::handle found_inf) {
  static PyObject* const buffer_key = PyUnicode_InternFromString("momentum_buffer");
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_optim::sgd_", "")
                             .typed<SgdOpSignature>();
  std::vector<PyObject*> keys;
  if (momentum != 0.0) keys.push_back(buffer_key);
  return step_group("fused_optim::sgd_", params, state, keys, nullptr, lr, grad_scale,
                    found_inf,
                    [&](c10::DispatchKeySet ks, const Rows& rows, const at::Tensor& lr_t,
                        const OptionalTensor& gs, const OptionalTensor& fi) {
                      const TensorVec none;
                      op.redispatch(ks, rows.params.tensors(), rows.grads,
                                    momentum != 0.0 ? rows.states[0]->tensors() : none, lr_t,
                                    momentum, dampening, weight_decay, nesterov, maximize,
                                    /*is_first_step=*/false, gs, fi);
                    });
}

}  // namespace

void bind_eager(py::module_& m) {
  m.def("adam_group_", &adam_group, py::arg("params"), py::arg("state"), py::arg("amsgrad"),
        py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("weight_decay"),
        py::arg("eps"), py::arg("maximize"), py::arg("decoupled_weight_decay"),
        py::arg("grad_scale"), py::arg("found_inf"),
        "One Adam step of a param group (its params list and the optimizer's state dict) "
        "gathered in C++; False, with nothing changed, when the group needs the Python "
        "path. See csrc/eager.cpp.");
  m.def("sgd_group_", &sgd_group, py::arg("params"), py::arg("state"), py::arg("lr"),
        py::arg("momentum"), py::arg("dampening"), py::arg("weight_decay"),
        py::arg("nesterov"), py::arg("maximize"), py::arg("grad_scale"),
        py::arg("found_inf"),
        "One SGD step of a param group whose momentum buffers all exist, gathered in "
        "C++; False, with nothing changed, when the group needs the Python path.");
}

}  // namespace fused_optim
