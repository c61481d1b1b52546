// What the CPU and CUDA implementations of every fused_optim op share: the call as both
// receive it (OpCall, from the dispatcher in csrc/ops.cpp or from the eager entry in
// csrc/eager.cpp), and its checks. Every check is a TORCH_CHECK that names the op, the
// list and the index, so bad input raises a Python RuntimeError instead of corrupting
// memory.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/MaybeOwned.h>

#include <string>
#include <vector>

#include "cpu/kernel_api.h"
#include "fused_optim/math/args.h"
#include "parallel_rows.h"
#include "registry.h"

namespace fused_optim {

inline cpu::DType to_kernel_dtype(const char* op, c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return cpu::DType::kFloat32;
    case c10::ScalarType::Double: return cpu::DType::kFloat64;
    case c10::ScalarType::Half: return cpu::DType::kFloat16;
    case c10::ScalarType::BFloat16: return cpu::DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": parameters must be float32, float64, float16 or bfloat16, got ",
                  t);
  }
}

// How one op's schema maps onto its optimizer (csrc/ops.cpp binds it when the op is
// registered): the argument positions of the schema and, per list, the argument whose
// value makes it present (an option: "amsgrad", "momentum").
struct OpBinding {
  const OptimInfo* info = nullptr;
  std::string name;                 // "fused_optim::adam_", for messages
  std::string schema;
  size_t n_args = 0;
  std::vector<int> list_args;       // per optimizer list
  std::vector<int> state_args;      // per state list
  int lr_arg = -1;
  std::vector<int> float_args;
  std::vector<int> flag_args;
  int grad_scale_arg = -1;
  int found_inf_arg = -1;
  int master_arg = -1;              // the memory policy's lists (fused_optim/_policy.py)
  int rng_arg = -1;
  // Per optimizer list: -1 (always present), else the float (when_is_flag false) or
  // bool argument, by its index among the floats / flags, that must be non-zero.
  std::vector<int> list_when;
  std::vector<bool> list_when_is_flag;
  int maximize_flag = -1;           // index among the flags, or -1

  // Whether a call with these arguments has list k.
  bool has_list(const math::Args& args, size_t k) const {
    const int w = list_when[k];
    if (w < 0) return true;
    return list_when_is_flag[k] ? args.flags[w] : args.floats[w] != 0.0;
  }

  // Whether a call writes list k: every list but the grads (lists[1], see bind() in
  // csrc/ops.cpp), which a step writes only to unscale them, with grad_scale ([note:
  // version counters of mutated tensors] in csrc/ops.cpp).
  static bool writes_list(size_t k, bool has_grad_scale) { return k != 1 || has_grad_scale; }
};

// The bound op of each registered name (csrc/ops.cpp); nullptr if none.
const OpBinding* find_op(const std::string& op);

// Tensors borrowed, without touching their reference counts, from tensors that outlive
// this object (a dispatcher stack's IValues, Python objects held by the caller). A copy
// of an at::Tensor bumps an atomic count and, for a tensor with a Python object, takes
// the GIL to bump the object's too; ~10,000 of those cost ~0.7 ms a step.
class BorrowedTensors {
 public:
  BorrowedTensors() = default;
  BorrowedTensors(const BorrowedTensors&) = delete;
  BorrowedTensors& operator=(const BorrowedTensors&) = delete;
  BorrowedTensors(BorrowedTensors&& other) noexcept : tensors_(std::move(other.tensors_)) {}
  ~BorrowedTensors() {
    for (at::Tensor& t : tensors_) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
  }
  void reserve(size_t n) { tensors_.reserve(n); }
  void push(const at::Tensor& t) {
    tensors_.push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(t));
  }
  at::TensorList list() const { return tensors_; }

 private:
  std::vector<at::Tensor> tensors_;
};

// One call of an op, as every device's implementation receives it. Views of the
// caller's tensors, valid for the call.
struct OpCall {
  const OpBinding* op = nullptr;
  std::vector<at::TensorList> lists;   // per optimizer list, op order; absent ones empty
  std::vector<at::TensorList> states;  // per state list
  const at::Tensor* lr = nullptr;
  math::Args args{};                   // floats and flags; lr is read by the device code
  bool maximize = false;
  const at::Tensor* grad_scale = nullptr;  // nullptr: not given
  const at::Tensor* found_inf = nullptr;
  // The memory policy ([note: memory policy] in csrc/cpu/kernel_api.h): per param its
  // fp32 master copy, its int64 [seed, offset]; empty when the call has none.
  at::TensorList master;
  at::TensorList rng;

  const char* name() const { return op->name.c_str(); }
  at::TensorList params() const { return lists[0]; }

  // Makes this a call of `b` with these arguments, float_at(k) and flag_at(k) giving the
  // k-th float and bool argument in schema order; lists[k] and states[j] are left empty,
  // for the caller to set.
  template <typename FloatAt, typename FlagAt>
  void init(const OpBinding& b, const at::Tensor& lr_tensor, FloatAt float_at, FlagAt flag_at,
            const at::Tensor* grad_scale_tensor, const at::Tensor* found_inf_tensor) {
    op = &b;
    lists.assign(b.list_args.size(), at::TensorList());
    states.assign(b.state_args.size(), at::TensorList());
    lr = &lr_tensor;
    for (size_t k = 0; k < b.float_args.size(); ++k) args.floats[k] = float_at(k);
    for (size_t k = 0; k < b.flag_args.size(); ++k) args.flags[k] = flag_at(k);
    maximize = b.maximize_flag >= 0 && args.flags[b.maximize_flag];
    grad_scale = grad_scale_tensor;
    found_inf = found_inf_tensor;
    master = at::TensorList();
    rng = at::TensorList();
  }
};

// The implementation of every op for one device type (ops_cpu.cpp, cuda/ops_cuda.cu
// register theirs when the library loads).
using DeviceStep = void (*)(const OpCall& call);
void set_device_step(c10::DeviceType type, DeviceStep step);
DeviceStep device_step(c10::DeviceType type);  // nullptr: not built

struct NamedList {
  const char* name;
  at::TensorList tensors;
};

// List-major pointer table for the kernels: ptrs[list * n + t], numels[t]; master[t],
// the fp32 master copies of a call with a memory policy's master_params.
struct FlatTable {
  std::vector<void*> ptrs;
  std::vector<int64_t> numels;
  std::vector<void*> master;
  cpu::TensorTable table{};
};

// [note: cold tensor metadata]
// After a streaming step nothing of the previous step is left in any cache, so the
// per-tensor walk of the next call misses on every TensorImpl (and on its StorageImpl for
// data_ptr): at 2,048 params x 4-5 tensors that walk took ~1.5 ms on the dev machine,
// one miss after another. The passes over tensor lists therefore prefetch a few rows
// ahead: the TensorImpl kAhead rows ahead, and the StorageImpl (found through the
// TensorImpl fetched kAhead rows earlier) of the row half as far.
constexpr size_t kPrefetchAhead = 8;

inline void prefetch_lines(const void* p, int lines) {
  const char* c = static_cast<const char*>(p);
  for (int k = 0; k < lines; ++k) __builtin_prefetch(c + 64 * k);
}

inline void prefetch_metadata(at::TensorList l, size_t i) {
  if (i + kPrefetchAhead < l.size() && l[i + kPrefetchAhead].defined()) {
    prefetch_lines(l[i + kPrefetchAhead].unsafeGetTensorImpl(), 4);
  }
  const size_t near = i + kPrefetchAhead / 2;
  if (near < l.size() && l[near].defined()) {
    const c10::TensorImpl* impl = l[near].unsafeGetTensorImpl();
    if (impl->has_storage()) prefetch_lines(impl->unsafe_storage().unsafeGetStorageImpl(), 2);
  }
}

// The storage dtypes of a call's lists: params and grads in `param`, the state lists
// in `state` (another dtype only under a memory policy the engine runs).
struct ListDTypes {
  c10::ScalarType param;
  c10::ScalarType state;
  uint32_t bf16 = 0;  // the lists (by position in the call) kept in bf16 whatever the params'
                      // dtype ([note: bf16 work lists] in fused_optim/math/optimizer.h)
};

// One row of check_bucket: row i of every list checked, its pointers written to `flat`.
inline void check_row(const char* op, const std::vector<NamedList>& lists, size_t i,
                      ListDTypes dtypes, FlatTable* flat) {
  const at::TensorList params = lists[0].tensors;
  const size_t n = params.size();
  const at::Device device = params[0].device();
  const at::Tensor& p = params[i];
  for (size_t k = 0; k < lists.size(); ++k) {
    const NamedList& l = lists[k];
    prefetch_metadata(l.tensors, i);
    const at::Tensor& t = l.tensors[i];
    const bool bf16_list = (dtypes.bf16 >> k) & 1u;
    const c10::ScalarType dtype =
        bf16_list ? c10::ScalarType::BFloat16 : k < 2 ? dtypes.param : dtypes.state;
    TORCH_CHECK(t.defined(), op, ": ", l.name, "[", i, "] is undefined");
    TORCH_CHECK(t.layout() == c10::kStrided, op, ": ", l.name, "[", i,
                "] is sparse; fused_optim kernels take dense tensors only");
    TORCH_CHECK(t.device() == device, op, ": all tensors of one call must be on one device; ",
                l.name, "[", i, "] is on ", t.device(), ", params[0] on ", device);
    if (bf16_list) {
      TORCH_CHECK(t.scalar_type() == dtype, op, ": ", l.name, "[", i,
                  "] must be bfloat16 (a bfloat16 work list), got ", t.scalar_type());
    } else if (dtype == dtypes.param) {
      TORCH_CHECK(t.scalar_type() == dtype, op, ": all tensors of one call must have one dtype; ",
                  l.name, "[", i, "] is ", t.scalar_type(), ", params[0] is ", dtype);
    } else {
      TORCH_CHECK(t.scalar_type() == dtype, op, ": the state lists of one call must have one "
                  "dtype; ", l.name, "[", i, "] is ", t.scalar_type(), ", ", lists[2].name,
                  "[0] is ", dtype);
    }
    TORCH_CHECK(t.sizes() == p.sizes(), op, ": ", l.name, "[", i, "] has shape ", t.sizes(),
                " but params[", i, "] has shape ", p.sizes());
    TORCH_CHECK(t.is_non_overlapping_and_dense(), op, ": ", l.name, "[", i,
                "] must be non-overlapping and dense (e.g. contiguous)");
    TORCH_CHECK(t.numel() <= 1 || t.strides() == p.strides(), op, ": ", l.name, "[", i,
                "] has strides ", t.strides(), " but params[", i, "] has strides ",
                p.strides(), "; every tensor of a row must share one memory layout");
    flat->ptrs[k * n + i] = t.data_ptr();
  }
  flat->numels[i] = p.numel();
}

// Checks one bucket and reads its pointer table in the same pass: every list as long as
// params; every tensor dense, on params' device, of params' dtype and with params' sizes
// and strides (so element i of every list sits at the same offset); no sparse or
// complex tensors. Rows are split over threads by `run_rows` when given.
inline void check_bucket(const char* op, const std::vector<NamedList>& lists, FlatTable* flat,
                         RowRunner run_rows, const c10::ScalarType* state_dtype = nullptr,
                         uint32_t bf16_lists = 0) {
  const at::TensorList params = lists[0].tensors;
  for (const NamedList& l : lists) {
    TORCH_CHECK(l.tensors.size() == params.size(), op, ": expected ", params.size(), " ",
                l.name, " (one per param), got ", l.tensors.size());
  }
  if (params.empty()) return;
  const cpu::DType kernel_dtype = to_kernel_dtype(op, params[0].scalar_type());
  const ListDTypes dtypes{params[0].scalar_type(),
                          state_dtype != nullptr ? *state_dtype : params[0].scalar_type(),
                          bf16_lists};
  const size_t n = params.size();
  flat->ptrs.resize(lists.size() * n);
  flat->numels.resize(n);
  const auto check_rows = [&](size_t begin, size_t end) {
    for (size_t i = begin; i < end; ++i) {
      check_row(op, lists, i, dtypes, flat);
    }
  };
  if (run_rows != nullptr) {
    run_rows(n, check_rows);
  } else {
    check_rows(0, n);
  }
  flat->table = cpu::TensorTable{static_cast<int64_t>(n), static_cast<int>(lists.size()),
                                 flat->ptrs.data(), flat->numels.data(), kernel_dtype,
                                 to_kernel_dtype(op, dtypes.state)};
}

// Checks a call's memory policy lists (master_params: per param an fp32 tensor of its
// sizes and strides; rng_states: per param a contiguous int64 [seed, offset]; both on
// the params' device) and writes the master copies' pointers to `flat`.
inline void check_policy_lists(const char* op, at::TensorList params, at::TensorList master,
                               at::TensorList rng, FlatTable* flat) {
  const size_t n = params.size();
  if (!master.empty()) {
    TORCH_CHECK(master.size() == n, op, ": expected ", n,
                " master_params (one per param), got ", master.size());
    flat->master.resize(n);
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& m = master[i];
      const at::Tensor& p = params[i];
      TORCH_CHECK(m.defined() && m.layout() == c10::kStrided &&
                      m.scalar_type() == c10::ScalarType::Float,
                  op, ": master_params[", i, "] must be a dense float32 tensor");
      TORCH_CHECK(m.device() == p.device(), op, ": master_params[", i, "] is on ", m.device(),
                  " but the params are on ", p.device());
      TORCH_CHECK(m.sizes() == p.sizes() && (m.numel() <= 1 || m.strides() == p.strides()) &&
                      m.is_non_overlapping_and_dense(),
                  op, ": master_params[", i, "] must have the sizes and strides of params[", i,
                  "]");
      flat->master[i] = m.data_ptr();
    }
  }
  if (!rng.empty()) {
    TORCH_CHECK(rng.size() == n, op, ": expected ", n, " rng_states (one per param), got ",
                rng.size());
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& r = rng[i];
      TORCH_CHECK(r.defined() && r.scalar_type() == c10::ScalarType::Long && r.numel() == 2 &&
                      r.is_contiguous(),
                  op, ": rng_states[", i, "] must be a contiguous int64 tensor [seed, offset]");
      TORCH_CHECK(r.device() == params[i].device(), op, ": rng_states[", i, "] is on ",
                  r.device(), " but the params are on ", params[i].device());
    }
  }
}

// The element-wise lists of one call, checked (check_bucket), with their pointer table:
// the lists the call's options keep, in op order. A list the options leave out must be
// empty ("max_exp_avg_sqs must be empty when amsgrad=False").
struct CheckedLists {
  std::vector<NamedList> present;
  uint32_t mask = 0;  // the optimizer's lists present, a bit each
  FlatTable flat;

  // `policies`: whether the device's engine runs memory policies (the lists' storage
  // dtypes are then checked against cpu::policy_supported).
  CheckedLists(const OpCall& c, RowRunner run_rows, bool policies = false) {
    const OpBinding& b = *c.op;
    const std::vector<std::string>& names = b.info->lists;
    uint32_t bf16 = 0;  // by position among the present lists
    for (size_t k = 0; k < names.size(); ++k) {
      if (b.has_list(c.args, k)) {
        if ((b.info->bf16_lists >> k) & 1u) bf16 |= uint32_t{1} << present.size();
        present.push_back({names[k].c_str(), c.lists[k]});
        mask |= uint32_t{1} << k;
        continue;
      }
      if (c.lists[k].empty()) continue;
      const int w = b.list_when[k];
      if (b.list_when_is_flag[k]) {
        TORCH_CHECK(false, c.name(), ": ", names[k], " must be empty when ", b.info->flags[w],
                    "=False, got ", c.lists[k].size());
      }
      TORCH_CHECK(false, c.name(), ": ", names[k], " must be empty when ", b.info->floats[w],
                  "=", c.args.floats[w], ", got ", c.lists[k].size());
    }
    const at::TensorList params = c.params();
    if (bf16 != 0) {
      // [note: bf16 work lists]: the other lists in the params' dtype, no policy.
      TORCH_CHECK(c.master.empty() && c.rng.empty(), c.name(),
                  ": takes no memory policy (master_params, rng_states)");
      check_bucket(c.name(), present, &flat, run_rows, nullptr, bf16);
      return;
    }
    if (!policies) {
      TORCH_CHECK(c.master.empty() && c.rng.empty(), c.name(),
                  ": this device's engine has no memory policy (master_params, rng_states) yet");
      check_bucket(c.name(), present, &flat, run_rows);
      return;
    }
    // The state lists' dtype: the first state tensor's, when params, states and policy
    // lists make a policy the engine runs; else the params' (and the checks name the
    // first tensor that differs, as for any call).
    c10::ScalarType state_dtype = params.empty() ? c10::ScalarType::Float : params[0].scalar_type();
    if (!params.empty() && present.size() > 2 && !present[2].tensors.empty() &&
        present[2].tensors[0].defined()) {
      const c10::ScalarType first = present[2].tensors[0].scalar_type();
      const c10::ScalarType p = params[0].scalar_type();
      if (first != p && (first == c10::ScalarType::Float || first == c10::ScalarType::BFloat16) &&
          cpu::policy_supported(to_kernel_dtype(c.name(), p), to_kernel_dtype(c.name(), first),
                                !c.master.empty(), !c.rng.empty())) {
        state_dtype = first;
      }
    }
    check_bucket(c.name(), present, &flat, run_rows, &state_dtype);
    check_policy_lists(c.name(), params, c.master, c.rng, &flat);
    if (!params.empty() && (!c.master.empty() || !c.rng.empty())) {
      TORCH_CHECK(cpu::policy_supported(flat.table.dtype, flat.table.state_dtype,
                                        !c.master.empty(), !c.rng.empty()),
                  c.name(), ": no memory policy for ", params[0].scalar_type(), " params with ",
                  state_dtype, " states", c.master.empty() ? "" : ", master_params",
                  c.rng.empty() ? "" : ", rng_states",
                  " (fused_optim/_policy.py lists the policies the engines run)");
    }
    flat.table.master = flat.master.empty() ? nullptr : flat.master.data();
  }
  CheckedLists(const CheckedLists&) = delete;
  CheckedLists& operator=(const CheckedLists&) = delete;
};

// Checks a list of one-element scalar tensors (state steps) against the params.
inline void check_scalars(const char* op, const char* name, at::TensorList ts,
                          size_t expected, const at::Device& device) {
  TORCH_CHECK(ts.size() == expected, op, ": expected ", expected, " ", name,
              " (one per param), got ", ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    prefetch_metadata(ts, i);
    const at::Tensor& t = ts[i];
    TORCH_CHECK(t.defined() && t.numel() == 1, op, ": ", name, "[", i,
                "] must be a one-element tensor");
    TORCH_CHECK(t.scalar_type() == c10::ScalarType::Float ||
                    t.scalar_type() == c10::ScalarType::Double,
                op, ": ", name, "[", i, "] must be float32 or float64, got ", t.scalar_type());
    TORCH_CHECK(t.device() == device, op, ": ", name, "[", i, "] is on ", t.device(),
                " but the params are on ", device);
  }
}

// Checks every state list of a call (check_scalars): on the params' device.
inline void check_states(const OpCall& c, const at::Device& device) {
  for (size_t j = 0; j < c.states.size(); ++j) {
    check_scalars(c.name(), c.op->info->states[j].c_str(), c.states[j], c.params().size(),
                  device);
  }
}

inline void check_optional_scalar(const char* op, const char* name, const at::Tensor* t,
                                  const at::Device& device) {
  if (t == nullptr) return;
  TORCH_CHECK(t->numel() == 1, op, ": ", name, " must be a one-element tensor, got shape ",
              t->sizes());
  TORCH_CHECK(t->scalar_type() == c10::ScalarType::Float, op, ": ", name,
              " must be float32, got ", t->scalar_type());
  TORCH_CHECK(t->device() == device, op, ": ", name, " is on ", t->device(),
              " but the params are on ", device);
}

inline void check_lr_shape(const OpCall& c) {
  TORCH_CHECK(c.lr->numel() == 1, c.name(), ": lr must be a one-element tensor, got shape ",
              c.lr->sizes());
}

// The dtype lr's arithmetic rounds to ([note: lr arithmetic] in math/stages.h).
inline math::LrDType lr_dtype(const char* op, const at::Tensor& lr) {
  switch (lr.scalar_type()) {
    case c10::ScalarType::Double: return math::LrDType::kFloat64;
    case c10::ScalarType::Float: return math::LrDType::kFloat32;
    case c10::ScalarType::Half: return math::LrDType::kFloat16;
    case c10::ScalarType::BFloat16: return math::LrDType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": lr must be a floating-point tensor, got ", lr.scalar_type());
  }
}

// A call checked as every device's implementation checks it, in this order: the lists
// (CheckedLists) and lr's shape; then, for a call with params, their device (of the
// implementation's `type`), lr's dtype and device (on the CPU, or on the params' device
// as float32 or float64, which the kernels read there), the state lists, grad_scale and
// found_inf, and that the kernels have a variant for the call ([note: compiled variants]
// in fused_optim/dispatch.h). A call without params has nothing to do (empty()).
struct CheckedCall {
  CheckedLists lists;
  math::Args args;  // the call's, with lr_dtype and, when lr is on the CPU, lr
  at::Device device{c10::kCPU};  // the params' device (when not empty())

  CheckedCall(const OpCall& c, c10::DeviceType type, RowRunner run_rows, bool policies = false)
      : lists(c, run_rows, policies), args(c.args) {
    check_lr_shape(c);
    const at::TensorList params = c.params();
    if (params.empty()) return;
    device = params[0].device();
    TORCH_CHECK(device.type() == type, c.name(), ": ", c10::DeviceTypeName(type),
                " kernel called with tensors on ", device);
    const at::Tensor& lr = *c.lr;
    args.lr_dtype = lr_dtype(c.name(), lr);
    args.param_dtype = lr_dtype(c.name(), params[0]);
    if (!lr.device().is_cpu()) {
      TORCH_CHECK(lr.device() == device, c.name(), ": lr is on ", lr.device(),
                  " but the params are on ", device,
                  "; pass a CPU tensor or one on the params' device");
      TORCH_CHECK(lr.scalar_type() == c10::ScalarType::Float ||
                      lr.scalar_type() == c10::ScalarType::Double,
                  c.name(), ": a ", c10::DeviceTypeName(type),
                  " lr must be float32 or float64, got ", lr.scalar_type());
    }
    check_states(c, device);
    check_optional_scalar(c.name(), "grad_scale", c.grad_scale, device);
    check_optional_scalar(c.name(), "found_inf", c.found_inf, device);
    if (!c.op->info->valid(lists.mask, c.args)) {
      std::string names;
      for (const NamedList& l : lists.present) {
        names += std::string(names.empty() ? "" : ", ") + l.name;
      }
      TORCH_CHECK(false, c.name(), ": the kernels have no variant for a call with lists [",
                  names, "] and these options (the spec and the C++ math disagree)");
    }
    if (lr.device().is_cpu()) args.lr = lr.item<double>();  // host memory: no sync
  }
  CheckedCall(const CheckedCall&) = delete;
  CheckedCall& operator=(const CheckedCall&) = delete;

  bool empty() const { return lists.flat.numels.empty(); }
};

}  // namespace fused_optim
