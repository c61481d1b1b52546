// The eager entry: one optimizer step of one param group, gathered in C++.
//
// A torch.optim-style step gathers, per param, the grad and the state tensors into
// Python lists, then the op converts those lists back to C++ tensors. At 2,048 params
// that bookkeeping cost ~4 ms per step on the dev machine (Python lists ~2 ms, op entry
// ~2 ms), about 15% of the whole streaming step, and it grows with the param count
// while the bytes do not. Here the same rows are read straight from the Python objects
// (group["params"], self.state) and handed to the op's own implementation for the
// params' device (the function its dispatcher kernel calls): same checks, same numbers.
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
// the ADInplaceOrView version bumps of everything the call wrote (see csrc/ops.cpp), and
// the GIL is released around the kernel as it is around any torch op. The entry names
// no optimizer: it reads the op's binding (csrc/ops_common.h) and the state keys the
// Python side passes from the optimizer's spec.
#include <torch/csrc/autograd/python_variable.h>

#include <ATen/ops/from_blob.h>
#include <ATen/record_function.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <map>
#include <string>
#include <vector>

#include "eager.h"
#include "ops_common.h"
#include "sparse_rows.h"
#include "versions.h"

namespace py = pybind11;

namespace fused_optim {
namespace {

// Tensors borrowed from Python objects this list keeps alive (one Py_INCREF each: a
// reference to the object holds its tensor; see BorrowedTensors). Built and destroyed
// with the GIL held; the tensors stay valid while the kernel runs without it, whatever
// another thread does to the objects meanwhile.
class BorrowedList {
 public:
  BorrowedList() = default;
  BorrowedList(const BorrowedList&) = delete;
  BorrowedList& operator=(const BorrowedList&) = delete;
  ~BorrowedList() {
    for (PyObject* o : owners_) Py_DECREF(o);
  }
  void reserve(size_t n) {
    tensors_.reserve(n);
    owners_.reserve(n);
  }
  void push(PyObject* owner) {
    Py_INCREF(owner);
    owners_.push_back(owner);
    tensors_.push(THPVariable_Unpack(owner));
  }
  at::TensorList list() const { return tensors_.list(); }

 private:
  BorrowedTensors tensors_;
  std::vector<PyObject*> owners_;
};

// The rows of one group: params, grads (owned: a grad belongs to no Python object we
// can hold, p.grad may be replaced), one list per element-wise state key the call has,
// and one per per-tensor state key.
struct Rows {
  BorrowedList params;
  std::vector<at::Tensor> grads;
  std::vector<std::unique_ptr<BorrowedList>> lists;   // per list key
  std::vector<std::unique_ptr<BorrowedList>> states;  // per state key
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

// A state value the kernels can take without the Python path's help, or nullptr (a
// sparse one, e.g. SGD's momentum buffer after a sparse grad, takes the Python path and
// its error).
PyObject* state_tensor(PyObject* param_state, PyObject* key) {
  PyObject* value = lookup(param_state, key, /*identity_hash=*/false);
  return value != nullptr && plain_tensor(value) &&
                 THPVariable_Unpack(value).layout() == c10::kStrided
             ? value
             : nullptr;
}

// Reads the rows of `params` (a list) from the objects. False when any row needs the
// Python path (see the top of this file); nothing is changed either way.
bool gather(PyObject* params, PyObject* state, const std::vector<PyObject*>& list_keys,
            const std::vector<PyObject*>& state_keys, Rows* rows) {
  if (!PyList_CheckExact(params) || !PyDict_Check(state)) return false;
  const Py_ssize_t n = PyList_GET_SIZE(params);
  if (n == 0 || !plain_tensor(PyList_GET_ITEM(params, 0))) return false;
  const bool with_state = !list_keys.empty() || !state_keys.empty();
  const bool identity_hash = with_state && hash_is_identity(PyList_GET_ITEM(params, 0));
  rows->params.reserve(n);
  rows->grads.reserve(n);
  for (size_t k = 0; k < list_keys.size(); ++k) {
    rows->lists.push_back(std::make_unique<BorrowedList>());
    rows->lists.back()->reserve(n);
  }
  for (size_t k = 0; k < state_keys.size(); ++k) {
    rows->states.push_back(std::make_unique<BorrowedList>());
    rows->states.back()->reserve(n);
  }

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
      for (size_t k = 0; k < list_keys.size(); ++k) {
        PyObject* t = state_tensor(param_state, list_keys[k]);
        if (t == nullptr) return false;
        rows->lists[k]->push(t);
      }
      for (size_t k = 0; k < state_keys.size(); ++k) {
        PyObject* t = state_tensor(param_state, state_keys[k]);
        if (t == nullptr) return false;
        rows->states[k]->push(t);
      }
    }
    rows->params.push(obj);
    rows->grads.push_back(grad);
  }
  return true;
}

const at::Tensor* optional_tensor(py::handle obj, const char* name) {
  if (obj.is_none()) return nullptr;
  if (!THPVariable_Check(obj.ptr())) {
    throw py::type_error(std::string(name) + " must be a Tensor or None");
  }
  return &THPVariable_Unpack(obj.ptr());
}

const at::Tensor& tensor_arg(py::handle obj, const char* name) {
  if (!THPVariable_Check(obj.ptr())) throw py::type_error(std::string(name) + " must be a Tensor");
  return THPVariable_Unpack(obj.ptr());
}

// Runs `fn` (the device's implementation) without the GIL, and turns a C++ check
// failure into the RuntimeError (message without the C++ backtrace) that the op raises
// through torch.ops.
template <typename Fn>
void run_kernel(Fn fn) {
  try {
    py::gil_scoped_release no_gil;
    fn();
  } catch (const c10::Error& e) {
    throw std::runtime_error(e.what_without_backtrace());
  }
}

// Interned Python strings for the state keys (a handful, looked up per param).
PyObject* interned(const std::string& key) {
  static std::map<std::string, PyObject*>* keys = new std::map<std::string, PyObject*>();
  PyObject*& k = (*keys)[key];
  if (k == nullptr) k = PyUnicode_InternFromString(key.c_str());
  return k;
}

// One eager step of a param group of the op `op` ("adam_"): `list_keys` are the state
// keys of the op's element-wise lists after params and grads (None where the group's
// options leave a list out), `state_keys` those of its per-tensor state lists, `floats`
// and `flags` its arguments in schema order. Unless no param has a grad (then, as in
// torch.optim, nothing happens), the device's implementation runs without the GIL, then
// the versions are bumped. The step is recorded for torch.profiler under the op's name,
// as a dispatcher call would be (free while no profiler runs).
bool step_group(const std::string& op, py::handle params, py::handle state,
                const py::sequence& list_keys, const py::sequence& state_keys, py::handle lr,
                const py::sequence& floats, const py::sequence& flags, py::handle grad_scale,
                py::handle found_inf) {
  const OpBinding* b = find_op(op);
  if (b == nullptr) throw py::value_error("fused_optim: no registered op " + op);
  const OptimInfo& info = *b->info;
  if (py::len(list_keys) + 2 != info.lists.size() || py::len(state_keys) != info.states.size() ||
      py::len(floats) != info.floats.size() || py::len(flags) != info.flags.size()) {
    throw py::type_error("fused_optim: step_group_ arguments do not match " + b->name);
  }
  std::vector<PyObject*> keys;                  // of the lists present
  std::vector<int> key_list;                    // their list index
  for (size_t k = 0; k < py::len(list_keys); ++k) {
    py::handle key = list_keys[k];
    if (key.is_none()) continue;
    keys.push_back(interned(key.cast<std::string>()));
    key_list.push_back(static_cast<int>(k) + 2);
  }
  std::vector<PyObject*> skeys;
  for (size_t k = 0; k < py::len(state_keys); ++k) {
    skeys.push_back(interned(state_keys[k].cast<std::string>()));
  }
  Rows rows;
  if (!gather(params.ptr(), state.ptr(), keys, skeys, &rows)) return false;
  if (rows.params.list().empty()) return true;
  RECORD_FUNCTION(b->name.c_str(), std::vector<c10::IValue>());

  OpCall call;
  call.init(
      *b, tensor_arg(lr, "lr"), [&](size_t k) { return floats[k].cast<double>(); },
      [&](size_t k) { return flags[k].cast<bool>(); }, optional_tensor(grad_scale, "grad_scale"),
      optional_tensor(found_inf, "found_inf"));
  call.lists[0] = rows.params.list();
  call.lists[1] = rows.grads;
  for (size_t k = 0; k < key_list.size(); ++k) call.lists[key_list[k]] = rows.lists[k]->list();
  for (size_t j = 0; j < rows.states.size(); ++j) call.states[j] = rows.states[j]->list();
  const DeviceStep device = device_step(rows.params.list()[0].device().type());
  if (device == nullptr) return false;
  run_kernel([&] { device(call); });
  // [note: version counters of mutated tensors] in csrc/ops.cpp: the entry skips the
  // dispatcher's ADInplaceOrView kernel, so it bumps what that kernel would.
  bump_written(*b, call.grad_scale != nullptr, call.lists, call.states);
  return true;
}

// The row-sparse engine's entry (fused_optim/_sparse.py): one bucket's call of
// sparse_rows_ on the CPU, made from the params themselves. The Python path builds, per
// param, a [rows, row length] view of it and of each state, its grad's rows and values
// (coo_rows) and a float64 tensor of the constants, then enters the op through the
// dispatcher: ~15 torch calls a param, which after a step over a large table find their
// code and objects out of cache (measured: ~0.15 ms of a cold 1M x 64 Adagrad step on
// the dev machine). Here the same views are made in C++ and the CPU op's own
// implementation runs; the checks and numbers are the op's. Only the common case: plain
// CPU tensors, each param contiguous with a grad that is a sparse COO tensor of one
// sparse dim, contiguous indices and values (nn.Embedding(sparse=True)'s), states
// contiguous; otherwise False, nothing changed, and the Python path runs.
// `states` is state-major (every param's first state, then the second ...), `constants`
// one list of floats per param.
bool sparse_step(const std::string& math, py::handle params, py::handle states,
                 py::handle constants, bool maximize) {
  if (!PyList_CheckExact(params.ptr()) || !PyList_CheckExact(states.ptr()) ||
      !PyList_CheckExact(constants.ptr())) {
    return false;
  }
  const Py_ssize_t n = PyList_GET_SIZE(params.ptr());
  const Py_ssize_t n_states = PyList_GET_SIZE(states.ptr());
  if (n == 0 || PyList_GET_SIZE(constants.ptr()) != n || n_states % n != 0) return false;
  BorrowedList owners;  // the params and states, alive while the kernel runs
  owners.reserve(n + n_states);
  std::vector<at::Tensor> views, rows, values, state_views;
  views.reserve(n);
  rows.reserve(n);
  values.reserve(n);
  state_views.reserve(n_states);
  // A [rows, row length] view of t, whose first `sparse_dim` dims are the rows.
  const auto as_rows = [](const at::Tensor& t, int64_t sparse_dim) {
    int64_t lead = 1;
    for (int64_t d = 0; d < sparse_dim; ++d) lead *= t.size(d);
    int64_t len = 1;
    for (int64_t d = sparse_dim; d < t.dim(); ++d) len *= t.size(d);
    return t.view({lead, len});
  };
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* obj = PyList_GET_ITEM(params.ptr(), i);
    if (!plain_tensor(obj)) return false;
    const at::Tensor& p = THPVariable_Unpack(obj);
    if (!p.device().is_cpu() || !p.is_contiguous() || p.dim() == 0 || !kernel_dtype(p.scalar_type())) {
      return false;
    }
    const at::Tensor& grad = p.grad();
    if (!grad.defined() || grad.layout() != c10::kSparse || grad.sparse_dim() != 1) return false;
    const at::Tensor indices = grad._indices();
    const at::Tensor v = grad._values();
    if (!indices.is_contiguous() || !v.is_contiguous()) return false;
    owners.push(obj);
    views.push_back(as_rows(p, 1));
    rows.push_back(indices.select(0, 0));
    values.push_back(v.view({v.size(0), views.back().size(1)}));
  }
  for (Py_ssize_t j = 0; j < n_states; ++j) {
    PyObject* obj = PyList_GET_ITEM(states.ptr(), j);
    if (!plain_tensor(obj)) return false;
    const at::Tensor& s = THPVariable_Unpack(obj);
    const at::Tensor& p = views[j % n];
    if (!s.is_contiguous() || s.numel() != p.numel()) return false;
    owners.push(obj);
    state_views.push_back(s.view(p.sizes()));
  }
  // The constants as the op takes them: float64 [params, constants].
  std::vector<double> flat;
  int64_t width = -1;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* row = PyList_GET_ITEM(constants.ptr(), i);
    if (!PyList_CheckExact(row)) return false;
    const Py_ssize_t k = PyList_GET_SIZE(row);
    if (width >= 0 && k != width) return false;
    width = k;
    for (Py_ssize_t c = 0; c < k; ++c) {
      const double x = PyFloat_AsDouble(PyList_GET_ITEM(row, c));
      if (x == -1.0 && PyErr_Occurred()) throw py::error_already_set();
      flat.push_back(x);
    }
  }
  const at::Tensor table =
      at::from_blob(flat.data(), {static_cast<int64_t>(n), width}, at::kDouble);
  RECORD_FUNCTION(kSparseRowsOp, std::vector<c10::IValue>());
  run_kernel([&] { sparse_rows_cpu(views, rows, values, state_views, table, math, maximize); });
  // [note: version counters of mutated tensors] in csrc/ops.cpp: what the op's
  // ADInplaceOrView kernel bumps (a view shares its base's counter).
  for (const at::Tensor& t : owners.list()) {
    if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
  }
  return true;
}

}  // namespace

void bind_eager(py::module_& m) {
  m.def("step_group_", &step_group, py::arg("op"), py::arg("params"), py::arg("state"),
        py::arg("list_keys"), py::arg("state_keys"), py::arg("lr"), py::arg("floats"),
        py::arg("flags"), py::arg("grad_scale"), py::arg("found_inf"),
        "One step of a param group (its params list and the optimizer's state dict) "
        "gathered in C++ and run by the op's kernel for the params' device; False, with "
        "nothing changed, when the group needs the Python path. See csrc/eager.cpp.");
  m.def("sparse_step_", &sparse_step, py::arg("math"), py::arg("params"), py::arg("states"),
        py::arg("constants"), py::arg("maximize"),
        "One CPU call of the row-sparse engine (torch.ops.fused_optim.sparse_rows_) made "
        "from the params, their sparse grads and states; False, with nothing changed, "
        "outside the common case. See csrc/eager.cpp.");
}

}  // namespace fused_optim
