// The factored-moment engine's CUDA kernels ([note: factored engine] in
// csrc/cpu/kernel_api.h): one Adafactor step of a bucket in six launches, with the math
// of fused_optim/math/adafactor.h, reading every per-tensor value from device memory
// (no host sync):
//   begin    (a thread per tensor)  step + 1, 1 - beta2_t
//   pass1    (a block per item)     sum(param^2), row sums of g^2 (a warp shuffle per
//                                   row, then the warps' partials in order), the item's
//                                   column sums (a thread per column); a vector's
//                                   variance. fp32: 8 B/element (a vector 16)
//   factors  (a block per tensor)   alpha; the factors from the sums in item order;
//                                   their clamped means
//   pass2    (a block per item)     sum(update^2): 4 B/element (a vector 8)
//   alpha    (a thread per tensor)  the clipping denominator, the step's alpha
//   pass3    (a block per item)     the decay and the update: 12 B/element
// Every sum is in float64 and in a fixed order (block reductions by a fixed tree), so a
// step is deterministic. Compiled in CI (.ci/compile_cuda.sh); never run on a GPU yet.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "cuda/factored.h"
#include "cuda/multi_tensor_apply.cuh"
#include "fused_optim/math/adafactor.h"

namespace fused_optim {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T>
struct Rounding {
  using S = Storage<T>;
  using opmath = typename S::opmath;
  static __device__ FO_INLINE opmath r(opmath x) { return S::to_opmath(S::from_opmath(x)); }
  static __device__ FO_INLINE opmath add_scaled(opmath p, opmath alpha, opmath x) {
    return math::add_scaled_as_torch<Rounding,
                                     std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>>(
        p, alpha, x);
  }
};

// The sum of every thread's x, in a fixed order; the result on thread 0.
__device__ double block_sum(double x) {
  __shared__ double buf[kThreads];
  buf[threadIdx.x] = x;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s /= 2) {
    if (static_cast<int>(threadIdx.x) < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  const double out = buf[0];
  __syncthreads();
  return out;
}

__device__ double lr_of(const FactoredLaunch& l) {
  if (l.lr_device == nullptr) return l.lr_value;
  return l.lr_device_is_double ? *static_cast<const double*>(l.lr_device)
                               : static_cast<double>(*static_cast<const float*>(l.lr_device));
}

__global__ void begin_kernel(FactoredLaunch l) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= l.n_tensors) return;
  FactoredTensorWork& w = l.tensors[t];
  double s;
  if (w.step_is_double) {
    s = *static_cast<double*>(w.step) + 1.0;
    *static_cast<double*>(w.step) = s;
  } else {
    const float f = *static_cast<float*>(w.step) + 1.0f;
    *static_cast<float*>(w.step) = f;
    s = f;
  }
  w.step_value = s;
  w.t.weight = ::pow(s, l.beta2_decay);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) pass1_kernel(FactoredLaunch l) {
  using S = Storage<T>;
  using O = typename S::opmath;
  using R = Rounding<T>;
  using A = math::Adafactor;
  __shared__ double rows_of_warp[kWarps][kFactoredItemRows];
  const cpu::FactoredItem item = l.items[blockIdx.x];
  const cpu::FactoredTensor& t = l.tensors[item.tensor].t;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  double psq = 0.0;
  if (t.row_var == nullptr) {
    const T* p = static_cast<const T*>(t.param);
    const T* g = static_cast<const T*>(t.grad);
    T* var = static_cast<T*>(t.variance);
    const O w = static_cast<O>(t.weight);
    for (int64_t e = item.begin + tid; e < item.end; e += kThreads) {
      const double pv = static_cast<double>(S::to_opmath(p[e]));
      psq += pv * pv;
      const O gv = S::to_opmath(g[e]);
      var[e] = S::from_opmath(A::moved<R>(S::to_opmath(var[e]), R::r(gv * gv), w));
    }
  } else {
    const int64_t n = t.cols, base = item.batch * t.rows;
    const int64_t nr = item.end - item.begin;
    double* colp = l.col_partials + item.col_offset;
    for (int64_t j0 = 0; j0 < n; j0 += kThreads) {
      const int64_t j = j0 + tid;
      double col = 0.0;
      for (int64_t r = 0; r < nr; ++r) {
        double s = 0.0;
        if (j < n) {
          const int64_t at = (base + item.begin + r) * n + j;
          const double gv = static_cast<double>(S::to_opmath(static_cast<const T*>(t.grad)[at]));
          const double pv = static_cast<double>(S::to_opmath(static_cast<const T*>(t.param)[at]));
          s = gv * gv;
          psq += pv * pv;
        }
        col += s;
        for (int off = 16; off > 0; off /= 2) s += __shfl_down_sync(0xffffffffu, s, off);
        if (lane == 0) rows_of_warp[warp][r] = (j0 == 0 ? 0.0 : rows_of_warp[warp][r]) + s;
      }
      if (j < n) colp[j] = col;
    }
    __syncthreads();
    for (int64_t r = tid; r < nr; r += kThreads) {
      double rs = 0.0;
      for (int k = 0; k < kWarps; ++k) rs += rows_of_warp[k][r];
      t.row_sums[base + item.begin + r] = rs;
    }
  }
  const double total = block_sum(psq);
  if (tid == 0) l.sums[blockIdx.x] = total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) factors_kernel(FactoredLaunch l) {
  using S = Storage<T>;
  using O = typename S::opmath;
  using R = Rounding<T>;
  using A = math::Adafactor;
  __shared__ double shared_weight;
  FactoredTensorWork& w = l.tensors[blockIdx.x];
  const cpu::FactoredTensor& t = w.t;
  const int tid = threadIdx.x;
  if (tid == 0) {
    double psq = 0.0;
    for (int64_t k = w.item_begin; k < w.item_end; ++k) psq += l.sums[k];
    const double norm = static_cast<double>(R::r(static_cast<O>(::sqrt(psq))));
    const A::TensorScalars s = A::tensor_scalars(w.step_value, lr_of(l), l.lr_dtype,
                                                 l.beta2_decay, l.eps2, l.weight_decay, norm,
                                                 static_cast<double>(w.numel));
    w.alpha = s.alpha;
    w.rho_is_lr = s.rho_is_lr;
    shared_weight = t.weight;
  }
  __syncthreads();
  if (t.row_var == nullptr) return;
  const O weight = static_cast<O>(shared_weight);
  const int64_t m = t.rows, n = t.cols;
  T* row_var = static_cast<T*>(t.row_var);
  T* col_var = static_cast<T*>(t.col_var);
  double* means = const_cast<double*>(t.means);
  const O floor = R::r(static_cast<O>(l.eps1));
  for (int64_t b = 0; b < t.batches; ++b) {
    const int64_t kb = w.item_begin + b * w.items_per_batch;
    for (int64_t j = tid; j < n; j += kThreads) {
      double col = 0.0;
      for (int64_t k = kb; k < kb + w.items_per_batch; ++k) {
        col += l.col_partials[l.items[k].col_offset + j];
      }
      const O target = A::mean_square<R>(col, static_cast<O>(m));
      col_var[b * n + j] =
          S::from_opmath(A::moved<R>(S::to_opmath(col_var[b * n + j]), target, weight));
    }
    double part = 0.0;
    for (int64_t i = tid; i < m; i += kThreads) {
      const O target = A::mean_square<R>(t.row_sums[b * m + i], static_cast<O>(n));
      const O now = R::r(A::moved<R>(S::to_opmath(row_var[b * m + i]), target, weight));
      row_var[b * m + i] = S::from_opmath(now);
      part += static_cast<double>(now);
    }
    const double total = block_sum(part);
    if (tid == 0) {
      O mean = R::r(static_cast<O>(total) / static_cast<O>(m));
      if (mean < floor) mean = floor;
      means[b] = static_cast<double>(mean);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) pass2_kernel(FactoredLaunch l) {
  using S = Storage<T>;
  using O = typename S::opmath;
  using R = Rounding<T>;
  using A = math::Adafactor;
  const cpu::FactoredItem item = l.items[blockIdx.x];
  const cpu::FactoredTensor& t = l.tensors[item.tensor].t;
  const O eps1_sq = R::r(static_cast<O>(l.eps1 * l.eps1));
  const T* g = static_cast<const T*>(t.grad);
  double usq = 0.0;
  if (t.row_var == nullptr) {
    const T* var = static_cast<const T*>(t.variance);
    for (int64_t e = item.begin + threadIdx.x; e < item.end; e += kThreads) {
      const double u = A::update<R>(S::to_opmath(g[e]), S::to_opmath(var[e]), eps1_sq);
      usq += u * u;
    }
  } else {
    const int64_t n = t.cols, base = item.batch * t.rows;
    const T* cv = static_cast<const T*>(t.col_var) + item.batch * n;
    const O mean = static_cast<O>(t.means[item.batch]);
    for (int64_t i = item.begin; i < item.end; ++i) {
      const O rv = S::to_opmath(static_cast<const T*>(t.row_var)[base + i]);
      for (int64_t j = threadIdx.x; j < n; j += kThreads) {
        const O v = A::factored_estimate<R>(rv, S::to_opmath(cv[j]), mean);
        const double u = A::update<R>(S::to_opmath(g[(base + i) * n + j]), v, eps1_sq);
        usq += u * u;
      }
    }
  }
  const double total = block_sum(usq);
  if (threadIdx.x == 0) l.sums[blockIdx.x] = total;
}

template <typename T>
__global__ void alpha_kernel(FactoredLaunch l) {
  using O = typename Storage<T>::opmath;
  using R = Rounding<T>;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= l.n_tensors) return;
  FactoredTensorWork& w = l.tensors[t];
  double usq = 0.0;
  for (int64_t k = w.item_begin; k < w.item_end; ++k) usq += l.sums[k];
  const double norm = static_cast<double>(R::r(static_cast<O>(::sqrt(usq))));
  math::Adafactor::TensorScalars s{};
  s.alpha = w.alpha;
  s.rho_is_lr = w.rho_is_lr != 0;
  w.t.step_alpha = math::Adafactor::step_alpha(s, l.lr_dtype, norm,
                                               static_cast<double>(w.numel), l.d);
}

template <typename T, bool DECAY>
__global__ void __launch_bounds__(kThreads) pass3_kernel(FactoredLaunch l) {
  using S = Storage<T>;
  using O = typename S::opmath;
  using R = Rounding<T>;
  using A = math::Adafactor;
  const cpu::FactoredItem item = l.items[blockIdx.x];
  const cpu::FactoredTensor& t = l.tensors[item.tensor].t;
  const O eps1_sq = R::r(static_cast<O>(l.eps1 * l.eps1));
  const O sign = l.maximize ? O(-1) : O(1);
  // 1 - lr * weight_decay in lr's dtype (lr may live on the device).
  const math::LrMath lr_math{l.lr_dtype};
  const O decay = static_cast<O>(lr_math.sub(1.0, lr_math.mul(lr_of(l), l.weight_decay)));
  const O alpha = static_cast<O>(t.step_alpha);
  const T* g = static_cast<const T*>(t.grad);
  T* p = static_cast<T*>(t.param);
  if (t.row_var == nullptr) {
    const T* var = static_cast<const T*>(t.variance);
    for (int64_t e = item.begin + threadIdx.x; e < item.end; e += kThreads) {
      const O u = A::update<R>(sign * S::to_opmath(g[e]), S::to_opmath(var[e]), eps1_sq);
      p[e] = S::from_opmath(A::apply<R, DECAY>(S::to_opmath(p[e]), u, decay, alpha));
    }
  } else {
    const int64_t n = t.cols, base = item.batch * t.rows;
    const T* cv = static_cast<const T*>(t.col_var) + item.batch * n;
    const O mean = static_cast<O>(t.means[item.batch]);
    for (int64_t i = item.begin; i < item.end; ++i) {
      const O rv = S::to_opmath(static_cast<const T*>(t.row_var)[base + i]);
      for (int64_t j = threadIdx.x; j < n; j += kThreads) {
        const int64_t at = (base + i) * n + j;
        const O v = A::factored_estimate<R>(rv, S::to_opmath(cv[j]), mean);
        const O u = A::update<R>(sign * S::to_opmath(g[at]), v, eps1_sq);
        p[at] = S::from_opmath(A::apply<R, DECAY>(S::to_opmath(p[at]), u, decay, alpha));
      }
    }
  }
}

template <typename T>
cudaError_t launch_typed(const FactoredLaunch& l, cudaStream_t stream) {
  const unsigned tensor_blocks = static_cast<unsigned>((l.n_tensors + 127) / 128);
  const unsigned items = static_cast<unsigned>(l.n_items);
  const unsigned tensors = static_cast<unsigned>(l.n_tensors);
  begin_kernel<<<tensor_blocks, 128, 0, stream>>>(l);
  if (items > 0) pass1_kernel<T><<<items, kThreads, 0, stream>>>(l);
  factors_kernel<T><<<tensors, kThreads, 0, stream>>>(l);
  if (items > 0) pass2_kernel<T><<<items, kThreads, 0, stream>>>(l);
  alpha_kernel<T><<<tensor_blocks, 128, 0, stream>>>(l);
  if (items > 0) {
    if (l.weight_decay != 0.0) {
      pass3_kernel<T, true><<<items, kThreads, 0, stream>>>(l);
    } else {
      pass3_kernel<T, false><<<items, kThreads, 0, stream>>>(l);
    }
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_adafactor(cpu::DType dtype, const FactoredLaunch& launch,
                             cudaStream_t stream) {
  switch (dtype) {
    case cpu::DType::kFloat32: return launch_typed<float>(launch, stream);
    case cpu::DType::kFloat64: return launch_typed<double>(launch, stream);
    case cpu::DType::kFloat16: return launch_typed<__half>(launch, stream);
    case cpu::DType::kBFloat16: return launch_typed<__nv_bfloat16>(launch, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fused_optim
