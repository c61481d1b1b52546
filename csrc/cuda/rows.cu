// The row-sparse kernels on CUDA ([note: row math] in fused_optim/math/optimizer.h): the
// CPU's rows_typed (csrc/cpu/kernels_impl.h) with one thread per element of a touched
// row. Block (segment, y) takes elements [y * kThreads, (y + 1) * kThreads) of the
// segment's row: it sums the row's entries in perm order, each sum rounded to the
// storage dtype (coalescing maths), or applies them one by one (the others), then runs
// the math on the element's param and states. Segments name distinct rows of a tensor,
// so no two threads write one element; a warp reads and writes consecutive elements.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "cuda/multi_tensor_apply.cuh"
#include "cuda/rows.h"
#include "fused_optim/optimizers.h"

namespace fused_optim {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// The storage's roundings for a row math (update<R> in [note: row math]): the CPU's
// RowRounding, on the device.
template <typename T>
struct DeviceRowRounding {
  using S = Storage<T>;
  using opmath = typename S::opmath;
  static __device__ FO_INLINE opmath r(opmath x) { return S::to_opmath(S::from_opmath(x)); }
  static __device__ FO_INLINE opmath add_scaled(opmath p, opmath alpha, opmath x) {
    return math::add_scaled_as_torch<DeviceRowRounding,
                                     std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>>(
        p, alpha, x);
  }
};

template <typename Math, typename T>
__global__ void __launch_bounds__(kThreads) rows_kernel(RowLaunch l) {
  using R = DeviceRowRounding<T>;
  using S = Storage<T>;
  using O = typename S::opmath;
  constexpr int kS = Math::kStates;
  constexpr int kC = Math::kConstants;
  const int64_t n = l.n_tensors;
  const int64_t* seg = l.segments + 4 * static_cast<int64_t>(blockIdx.x);
  const int64_t t = seg[0], row = seg[1], begin = seg[2], end = seg[3];
  const int64_t* table = l.table;
  const int64_t len = table[(3 + kS) * n + t];
  const int64_t e = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (e >= len) return;
  T* p = reinterpret_cast<T*>(table[t]) + row * len + e;
  T* st[kS > 0 ? kS : 1];
  for (int j = 0; j < kS; ++j) st[j] = reinterpret_cast<T*>(table[(1 + j) * n + t]) + row * len + e;
  const T* values = reinterpret_cast<const T*>(table[(1 + kS) * n + t]);
  const int64_t* perm = reinterpret_cast<const int64_t*>(table[(2 + kS) * n + t]);
  O c[kC];
  for (int j = 0; j < kC; ++j) {
    c[j] = static_cast<O>(__longlong_as_double(table[(4 + kS) * n + t * kC + j]));
  }
  const O sign = l.maximize ? O(-1) : O(1);
  O pe = S::to_opmath(*p);
  O se[kS > 0 ? kS : 1];
  for (int j = 0; j < kS; ++j) se[j] = S::to_opmath(*st[j]);
  if constexpr (Math::kCoalesce) {
    O g = S::to_opmath(values[perm[begin] * len + e]);
    for (int64_t k = begin + 1; k < end; ++k) g = R::r(g + S::to_opmath(values[perm[k] * len + e]));
    Math::template update<R>(pe, sign * g, se, c);
  } else {
    for (int64_t k = begin; k < end; ++k) {
      Math::template update<R>(pe, sign * S::to_opmath(values[perm[k] * len + e]), se, c);
    }
  }
  *p = S::from_opmath(pe);
  for (int j = 0; j < kS; ++j) *st[j] = S::from_opmath(se[j]);
}

template <typename Math, typename T>
cudaError_t launch_typed(const RowLaunch& l, cudaStream_t stream) {
  if (l.n_segments == 0 || l.max_row_len == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(l.n_segments),
                  static_cast<unsigned>((l.max_row_len + kThreads - 1) / kThreads));
  rows_kernel<Math, T><<<grid, kThreads, 0, stream>>>(l);
  return cudaGetLastError();
}

template <typename Math>
cudaError_t launch_math(cpu::DType dtype, const RowLaunch& l, cudaStream_t stream) {
  switch (dtype) {
    case cpu::DType::kFloat32: return launch_typed<Math, float>(l, stream);
    case cpu::DType::kFloat64: return launch_typed<Math, double>(l, stream);
    case cpu::DType::kFloat16: return launch_typed<Math, __half>(l, stream);
    case cpu::DType::kBFloat16: return launch_typed<Math, __nv_bfloat16>(l, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_rows(int math_id, cpu::DType dtype, const RowLaunch& l, cudaStream_t stream) {
  int id = 0;
#define FO_LAUNCH_ROW_MATH(Name) \
  if (math_id == id++) return launch_math<math::Name>(dtype, l, stream);
  FO_FOR_EACH_ROW_MATH(FO_LAUNCH_ROW_MATH)
#undef FO_LAUNCH_ROW_MATH
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fused_optim
