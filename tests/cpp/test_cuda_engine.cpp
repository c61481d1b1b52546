// The CUDA engine -- csrc/cuda/multi_tensor_apply.cuh (host packing, kernel) and
// csrc/cuda/engine.cuh (OptimFunctor, launch<>, advance_states<>) -- compiled as plain C++
// through tests/cpp/cuda_shim.h and run on the CPU, block after block, thread after thread
// ([note: host emulation] in multi_tensor_apply.cuh). For every optimizer of the table
// (optimizer_table.h) and every storage dtype it checks:
//  - every option case against the reference, within the CPU engine's tolerance, and bit
//    for bit against the CPU engine's portable variant on the same bucket;
//  - the launch tables: every tensor with elements once, in order, full tables but the
//    last, chunk prefix sums, pointers, numels and state pointers as the bucket has them;
//    the state launches cover every tensor, empty ones included;
//  - the block -> tensor binary search (a counting functor sees each element exactly once,
//    from the block of its own tensor);
//  - 64-bit chunk offsets, on a virtual tensor of 6.4e9 elements whose last chunk has
//    memory behind it, and the launch cuts at 2^31 - 1 chunks;
//  - the vector path (16-byte aligned rows), the scalar path (misaligned rows) and the
//    vector path's tails give the same bits;
//  - found_inf skips everything, state included; per-tensor state rounds to its dtype;
//    NaN lr / grad scale leave NaNs; launch errors are returned.
// Emulated CUDA conversions match the oracles (and CUDA's own host code: see cuda_shim.h).
#include "cuda_shim.h"  // first: the CUDA keywords and FO_LAUNCH_KERNEL

#include "cuda/engine.cuh"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "engine_fixture.h"
#include "harness.h"

namespace fo_test {
namespace {

namespace fcu = fused_optim::cuda;
using fo_cuda_shim::LaunchRecord;

constexpr int64_t kCudaChunk = fcu::kChunkSize;

// The launchers of every registered optimizer, as csrc/cuda/ops_cuda.cu builds them.
static_assert(static_cast<int>(DType::kFloat32) == 0 && static_cast<int>(DType::kFloat64) == 1 &&
              static_cast<int>(DType::kFloat16) == 2 && static_cast<int>(DType::kBFloat16) == 3);
#define FO_TEST_EMU_LAUNCHERS(Name) fcu::launchers_of<fm::Name>(),
const fcu::Launchers kLaunchers[] = {FO_FOR_EACH_OPTIMIZER(FO_TEST_EMU_LAUNCHERS)};
#undef FO_TEST_EMU_LAUNCHERS

// The bucket of the option tests: the vector tails of every dtype (V = 2, 4, 8), empty
// tensors, and enough small tensors (45, 42 with elements) that every optimizer's tables
// fill: 16 (5 lists and a state: AMSGrad, centered RMSprop with momentum) to 36 (SGD
// without momentum) tensors per launch with the emulation's 1 KB tables. ~6,600 elements,
// so the emulation runs every option case on every dtype; tensors of several chunks are
// the business of the packing, 64-bit and path tests.
std::vector<int64_t> cuda_sizes() {
  std::vector<int64_t> s = {0, 1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 511, 512, 513, 0};
  for (int t = 0; s.size() < 44; ++t) s.push_back(1 + (t * 37) % 200);
  s.push_back(0);
  return s;
}

// Per-tensor state as the CUDA ops see it: one one-element tensor per param and state
// list, all float32 (torch's default for `step`) or all float64. `owner`, when given:
// row t passes the state tensors of row owner[t] (owner[t] <= t; the same tensor for
// several params, [note: aliased state] in kernel_api.h), which hold values[owner[t]].
class DeviceStates {
 public:
  DeviceStates(int n_states, int64_t n, const std::vector<double>& values, bool is_double,
               const std::vector<int64_t>& owner = {})
      : ns_(n_states), n_(n), double_(is_double), owner_(owner) {
    if (owner_.empty()) {
      for (int64_t t = 0; t < n; ++t) owner_.push_back(t);
    }
    for (int j = 0; j < ns_; ++j) {
      d_[j].assign(n, 0.0);
      f_[j].assign(n, 0.0f);
      for (int64_t t = 0; t < n; ++t) {
        d_[j][t] = values[t * ns_ + j];
        f_[j][t] = static_cast<float>(values[t * ns_ + j]);
      }
      for (int64_t t = 0; t < n; ++t) {
        const int64_t o = owner_[t];
        ptrs_[j].push_back(double_ ? static_cast<void*>(&d_[j][o])
                                   : static_cast<void*>(&f_[j][o]));
      }
    }
  }
  DeviceStates(const DeviceStates&) = delete;
  DeviceStates& operator=(const DeviceStates&) = delete;

  int n_states() const { return ns_; }
  bool is_double() const { return double_; }
  void* const* ptrs(int j) const { return ptrs_[j].data(); }
  // Each row's state as its state tensors hold it now.
  std::vector<double> values() const {
    std::vector<double> v(static_cast<size_t>(n_ * ns_));
    for (int64_t t = 0; t < n_; ++t) {
      const int64_t o = owner_[t];
      for (int j = 0; j < ns_; ++j) v[t * ns_ + j] = double_ ? d_[j][o] : f_[j][o];
    }
    return v;
  }

 private:
  int ns_;
  int64_t n_;
  bool double_;
  std::vector<int64_t> owner_;
  std::vector<double> d_[fm::kMaxStates];
  std::vector<float> f_[fm::kMaxStates];
  std::vector<void*> ptrs_[fm::kMaxStates];
};

// States as a state tensor of that dtype stores them.
std::vector<double> stored_as(std::vector<double> v, bool is_double) {
  if (!is_double) {
    for (double& x : v) x = static_cast<float>(x);
  }
  return v;
}

// How lr reaches the kernels: a host value, or a one-element device tensor (double, or
// float when lr is a float value).
enum class LrMode { kValue, kDoublePtr, kFloatPtr };

LrMode lr_mode_for(const fm::Args& a, int case_index) {
  if (a.lr == static_cast<double>(static_cast<float>(a.lr)) && case_index % 2 == 1) {
    return LrMode::kFloatPtr;
  }
  return case_index % 3 == 0 ? LrMode::kValue : LrMode::kDoublePtr;
}

struct CudaRun {
  cudaError_t launch_error = cudaSuccess;
  cudaError_t advance_error = cudaSuccess;
  std::vector<LaunchRecord> launches;
};

// One step through the emulated engine as csrc/cuda/ops_cuda.cu drives it: launch<> and,
// when it succeeded, advance_states<>; with `runs`, through run_step (its runs of rows,
// [note: aliased state]; launch_error then holds its result). `rows` defaults to the
// bucket's table. The shim's test hooks (block ranges, failing launches) are the caller's.
CudaRun run_emulated(const OptimizerEntry& e, const OptCase& c, Bucket& b, DeviceStates& st,
                     LrMode lr_mode, const float* found_inf,
                     const fc::TensorTable* rows = nullptr, bool runs = false) {
  fo_cuda_shim::State& shim = fo_cuda_shim::state();
  shim.launches.clear();
  shim.last_error = cudaSuccess;
  const double lr_double = c.args.lr;
  const float lr_float = static_cast<float>(c.args.lr);
  fcu::Launch l{};
  l.rows = rows ? *rows : b.table();
  l.lists = layout_for(e, c).lists;
  l.args = c.args;
  switch (lr_mode) {
    case LrMode::kValue: l.lr = fcu::DeviceScalar{nullptr, false, c.args.lr}; break;
    case LrMode::kDoublePtr: l.lr = fcu::DeviceScalar{&lr_double, true, 0.0}; break;
    case LrMode::kFloatPtr: l.lr = fcu::DeviceScalar{&lr_float, false, 0.0}; break;
  }
  l.maximize = maximize_of(e, c.args);
  for (int j = 0; j < st.n_states(); ++j) {
    l.states[j] = st.ptrs(j);
    l.states_are_double[j] = st.is_double();
  }
  l.grad_scale = c.scaled ? &c.grad_scale : nullptr;
  l.found_inf = found_inf;
  CudaRun r;
  const fcu::Launchers& fns = kLaunchers[e.id];
  if (runs) {
    r.launch_error =
        fcu::run_step(l, e.n_states, fns.by_dtype[static_cast<int>(b.dtype)], fns.advance, nullptr);
  } else {
    r.launch_error = fns.by_dtype[static_cast<int>(b.dtype)](l, nullptr);
    if (r.launch_error == cudaSuccess) r.advance_error = fns.advance(l, nullptr);
  }
  r.launches = shim.launches;
  return r;
}

// ---------------------------------------------------------------------------------------
// Decoding the recorded launch tables.

struct DecodedTable {
  int max_tensors = 0;
  int n = 0;
  std::vector<std::vector<const void*>> ptrs;     // [d][i]
  std::vector<int64_t> numels;                    // [i]
  std::vector<std::vector<const void*>> scalars;  // [j][i]
  std::vector<int32_t> chunk_start;               // [i], i <= n
};

template <int D, int NS>
void decode_chunk_table(const std::vector<unsigned char>& bytes, DecodedTable& out) {
  using T = fcu::ChunkTable<D, NS>;
  FO_CHECK_EQ(bytes.size(), sizeof(T));
  if (bytes.size() != sizeof(T)) return;
  const auto t = std::make_unique<T>();
  std::memcpy(static_cast<void*>(t.get()), bytes.data(), sizeof(T));
  out.max_tensors = T::kMaxTensors;
  out.n = t->n_tensors;
  FO_CHECK(out.n >= 0 && out.n <= T::kMaxTensors) << out.n;
  if (out.n < 0 || out.n > T::kMaxTensors) return;
  out.ptrs.assign(D, {});
  out.scalars.assign(NS, {});
  for (int i = 0; i < out.n; ++i) {
    for (int d = 0; d < D; ++d) out.ptrs[d].push_back(t->ptrs[d][i]);
    out.numels.push_back(t->numels[i]);
    if constexpr (NS > 0) {
      for (int j = 0; j < NS; ++j) out.scalars[j].push_back(t->scalars.ptrs[j][i]);
    }
  }
  for (int i = 0; i <= out.n; ++i) out.chunk_start.push_back(t->chunk_start[i]);
}

template <int D, int NS>
bool decode_any_chunk_table(int depth, int ns, const std::vector<unsigned char>& bytes,
                            DecodedTable& out) {
  if (depth == D && ns == NS) {
    decode_chunk_table<D, NS>(bytes, out);
    return true;
  }
  if constexpr (NS < fm::kMaxStates) {
    return decode_any_chunk_table<D, NS + 1>(depth, ns, bytes, out);
  } else if constexpr (D < kMaxLists) {
    return decode_any_chunk_table<D + 1, 0>(depth, ns, bytes, out);
  } else {
    return false;
  }
}

template <int NS>
bool decode_state_table(int ns, const std::vector<unsigned char>& bytes, DecodedTable& out) {
  if constexpr (NS > fm::kMaxStates) {
    return false;
  } else {
    if (ns != NS) return decode_state_table<NS + 1>(ns, bytes, out);
    using T = fcu::StateTable<NS>;
    FO_CHECK_EQ(bytes.size(), sizeof(T));
    if (bytes.size() != sizeof(T)) return true;
    const auto t = std::make_unique<T>();
    std::memcpy(static_cast<void*>(t.get()), bytes.data(), sizeof(T));
    out.max_tensors = T::kMaxTensors;
    out.n = t->n;
    FO_CHECK(out.n >= 1 && out.n <= T::kMaxTensors) << out.n;
    if (out.n < 1 || out.n > T::kMaxTensors) return true;
    out.scalars.assign(NS, {});
    for (int i = 0; i < out.n; ++i) {
      for (int j = 0; j < NS; ++j) out.scalars[j].push_back(t->state.ptrs[j][i]);
    }
    return true;
  }
}

bool starts_with(const std::string& s, const char* prefix) { return s.rfind(prefix, 0) == 0; }

// The launches of one call against the bucket it was given: optimizer launches first, each
// a table of the next tensors with elements, in bucket order, each tensor in exactly one
// table; tables full but the last (`expect_full`: no 2^31 chunk cut); per table the
// pointers, numels and state pointers of its tensors, chunk_start the prefix sum of their
// chunks and the grid its total; then state launches covering every tensor in order.
void check_packing(const OptimizerEntry& e, const fc::TensorTable& rows, const DeviceStates* st,
                   const std::vector<LaunchRecord>& launches, bool expect_full,
                   const std::string& ctx, bool with_state_launches = true) {
  std::vector<int64_t> nonempty;
  for (int64_t t = 0; t < rows.n_tensors; ++t) {
    if (rows.numels[t] > 0) nonempty.push_back(t);
  }
  const int ns = e.n_states;
  size_t next = 0, li = 0, table_launches = 0;
  int max_tensors = 0;
  for (; li < launches.size() && starts_with(launches[li].kernel, "multi_tensor_apply_kernel");
       ++li, ++table_launches) {
    const LaunchRecord& rec = launches[li];
    DecodedTable tab;
    const bool decoded = decode_any_chunk_table<1, 0>(rows.n_lists, ns, rec.first_arg, tab);
    FO_CHECK(decoded) << ctx;
    max_tensors = tab.max_tensors;
    FO_CHECK_EQ(rec.threads, static_cast<unsigned int>(fcu::kBlockSize)) << ctx;
    FO_CHECK(tab.n >= 1) << ctx << ": launch " << li << " has an empty table";
    if (tab.n < 1 || tab.chunk_start.empty()) continue;
    FO_CHECK_EQ(tab.chunk_start[0], 0) << ctx;
    for (int i = 0; i < tab.n && next < nonempty.size(); ++i, ++next) {
      const int64_t t = nonempty[next];
      for (int d = 0; d < rows.n_lists; ++d) {
        FO_CHECK(tab.ptrs[d][i] == rows.ptrs[d * rows.n_tensors + t])
            << ctx << ": launch " << li << " entry " << i << " list " << d
            << " is not tensor " << t;
      }
      FO_CHECK_EQ(tab.numels[i], rows.numels[t]) << ctx << ": launch " << li << " entry " << i;
      for (int j = 0; j < ns && st; ++j) {
        FO_CHECK(tab.scalars[j][i] == st->ptrs(j)[t])
            << ctx << ": state " << j << " of tensor " << t;
      }
      const int64_t chunks = (rows.numels[t] + kCudaChunk - 1) / kCudaChunk;
      FO_CHECK_EQ(static_cast<int64_t>(tab.chunk_start[i + 1]) - tab.chunk_start[i], chunks)
          << ctx << ": launch " << li << " entry " << i;
    }
    FO_CHECK_EQ(static_cast<int64_t>(rec.blocks), static_cast<int64_t>(tab.chunk_start[tab.n]))
        << ctx << ": launch " << li << " grid";
    const bool last = li + 1 == launches.size() ||
                      !starts_with(launches[li + 1].kernel, "multi_tensor_apply_kernel");
    if (expect_full && !last) {
      FO_CHECK_EQ(tab.n, tab.max_tensors) << ctx << ": launch " << li << " cut early";
    }
  }
  FO_CHECK_EQ(next, nonempty.size()) << ctx << ": tensors with elements missing from the tables";
  if (expect_full && max_tensors > 0) {
    FO_CHECK_EQ(table_launches, (nonempty.size() + max_tensors - 1) / max_tensors) << ctx;
  }
  // The state launches: every tensor, in order, ~kMaxTensors per launch, 256 threads each.
  int64_t covered = 0;
  size_t state_launches = 0;
  for (; li < launches.size(); ++li, ++state_launches) {
    const LaunchRecord& rec = launches[li];
    FO_CHECK(starts_with(rec.kernel, "advance_states_kernel")) << ctx << ": " << rec.kernel;
    DecodedTable tab;
    FO_CHECK(decode_state_table<1>(ns, rec.first_arg, tab)) << ctx;
    FO_CHECK_EQ(rec.threads, static_cast<unsigned int>(fcu::kStatesBlockSize)) << ctx;
    FO_CHECK_EQ(static_cast<int64_t>(rec.blocks),
                (tab.n + fcu::kStatesBlockSize - 1) / fcu::kStatesBlockSize) << ctx;
    for (int i = 0; i < tab.n && st; ++i, ++covered) {
      for (int j = 0; j < ns; ++j) {
        FO_CHECK(covered < rows.n_tensors && tab.scalars[j][i] == st->ptrs(j)[covered])
            << ctx << ": state launch " << state_launches << " entry " << i;
      }
    }
    max_tensors = tab.max_tensors;
  }
  if (st && ns > 0 && with_state_launches) {
    FO_CHECK_EQ(covered, rows.n_tensors) << ctx << ": states of some tensors never stored";
    FO_CHECK_EQ(static_cast<int64_t>(state_launches),
                (rows.n_tensors + max_tensors - 1) / std::max(max_tensors, 1)) << ctx;
  } else {
    FO_CHECK_EQ(state_launches, 0u) << ctx << ": state launches without state";
  }
}

void check_states(const DeviceStates& st, const std::vector<double>& want,
                  const std::string& ctx) {
  const std::vector<double> got = st.values();
  for (size_t i = 0; i < want.size(); ++i) {
    FO_CHECK_EQ(got[i], want[i]) << ctx << ": state " << i;
  }
}

// How a checked emulated step is set up (see emulated_step_checked).
struct EmulatedStep {
  std::vector<double> states;  // each tensor's per-tensor state before the step
  bool states_double = false;  // the state tensors' dtype: float64, else float32
  LrMode lr_mode = LrMode::kValue;
  bool check_tables = false;   // also check_packing (full tables expected)
  const fc::TensorTable* rows = nullptr;  // the table the engine sees, if not got's
};

// One step of case `c` through the emulated engine on `got` (a copy of `input`), checked
// as every emulation test checks it: both launchers succeed, every element matches the
// reference applied to `input`, and each per-tensor state is torch's update of
// `s.states`, as its state tensor's dtype stores it; with s.check_tables the launch
// tables too. Returns the run.
CudaRun emulated_step_checked(const OptimizerEntry& e, const OptCase& c, const Bucket& input,
                              Bucket& got, const EmulatedStep& s, const std::string& ctx) {
  const int64_t n = s.rows ? s.rows->n_tensors : got.n_tensors();
  DeviceStates st(e.n_states, n, s.states, s.states_double);
  const std::vector<double> after =
      stored_as(advanced(e, c.args, stored_as(s.states, s.states_double), false, s.states_double),
                s.states_double);
  const CudaRun r = run_emulated(e, c, got, st, s.lr_mode, nullptr, s.rows);
  FO_CHECK_EQ(r.launch_error, cudaSuccess) << ctx;
  FO_CHECK_EQ(r.advance_error, cudaSuccess) << ctx;
  const std::vector<double> stored_before = stored_as(s.states, s.states_double);
  check_bucket(got, input, expected_for(e, c, input, step_state_of(e, after, stored_before)), ctx);
  check_states(st, after, ctx);
  if (s.check_tables) check_packing(e, s.rows ? *s.rows : got.table(), &st, r.launches, true, ctx);
  return r;
}

// One option case on one dtype through the emulated engine: the reference, the states,
// the packing, and the CPU engine's portable variant on the same bucket.
void cuda_case(const OptimizerEntry& e, const OptCase& c, int case_index, DType d) {
  int (*offset)(int, int) = case_index % 2 == 0 ? offset_zero : mixed_offset;
  const bool states_double = case_index % 3 == 1;
  const LrMode lr_mode = lr_mode_for(c.args, case_index);
  const std::string ctx =
      ctx_of(e, c, d, std::string("emulated CUDA") +
                          (offset == offset_zero ? ", aligned" : ", mixed offsets") +
                          (states_double ? ", float64 state" : ""));
  const Bucket input = make_bucket(e, c, d, cuda_sizes(), offset,
                                   3000u + 100u * case_index + static_cast<unsigned>(d));
  Bucket got = clone_bucket(input, offset);
  EmulatedStep s;
  s.states = states_before(e, c.args, input.n_tensors(), 0);
  s.states_double = states_double;
  s.lr_mode = lr_mode;
  s.check_tables = true;
  emulated_step_checked(e, c, input, got, s, ctx);
  // The CPU op given the same state tensors (its advance rounds as they store).
  const std::vector<double> stored_before = stored_as(s.states, states_double);
  const std::vector<double> cpu_states = step_state_of(
      e, stored_as(advanced(e, c.args, stored_before, true, states_double), states_double),
      stored_before);
  Bucket cpu = clone_bucket(input, offset);
  run_cpu(fc::kernels_for("default"), e, cpu, step_call(e, c, cpu_states), Slicing::kOneCall);
  FO_CHECK_EQ(count_bit_differences(cpu, got), 0) << ctx << ": differs from the CPU engine";
}

void cuda_all_cases(DType d) {
  for (const OptimizerEntry& e : optimizer_table()) {
    for (size_t i = 0; i < e.cases.size(); ++i) cuda_case(e, e.cases[i], static_cast<int>(i), d);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------
// The shim's conversions are CUDA's (cuda_shim.h): the oracles of test_util.h for every
// number, the canonical NaN 0x7fff / 0x7fffffff for every NaN.
FO_TEST(cuda_shim_conversions_round_as_cuda) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const uint16_t x = static_cast<uint16_t>(h);
    const bool nan = (x & 0x7c00) == 0x7c00 && (x & 0x3ff) != 0;
    const uint32_t got = f32_bits(__half2float(__half{x}));
    FO_CHECK_EQ(got, nan ? 0x7fffffffu : f32_bits(oracle_half_to_float(x))) << "half " << h;
    FO_CHECK_EQ(f32_bits(__bfloat162float(__nv_bfloat16{x})), h << 16) << "bf16 " << h;
  }
  auto check_half = [](float f) {
    const uint16_t got = __float2half_rn(f).x;
    FO_CHECK_EQ(got, std::isnan(f) ? uint16_t{0x7fff} : oracle_float_to_half(f))
        << "float " << f << " (" << f32_bits(f) << ") -> half";
  };
  auto check_bf16 = [](float f) {
    const uint16_t got = __float2bfloat16_rn(f).x;
    FO_CHECK_EQ(got, std::isnan(f) ? uint16_t{0x7fff} : oracle_float_to_bf16(f))
        << "float " << f << " (" << f32_bits(f) << ") -> bf16";
  };
  // Every fp16 value, the tie to its upper neighbour, one float either side of it, and
  // a quarter / three quarters of the way (normal, subnormal, overflow at 65520).
  for (uint32_t h = 0; h < 0x7c00; ++h) {
    const double a = oracle_half_to_float(static_cast<uint16_t>(h));
    const double b = h == 0x7bff ? 65536.0 : oracle_half_to_float(static_cast<uint16_t>(h + 1));
    const float mid = static_cast<float>((a + b) / 2);
    for (float f : {static_cast<float>(a), mid, std::nextafter(mid, 0.0f),
                    std::nextafter(mid, INFINITY), static_cast<float>(a + (b - a) / 4),
                    static_cast<float>(a + 3 * (b - a) / 4)}) {
      check_half(f);
      check_half(-f);
    }
  }
  for (uint32_t hi = 0; hi < 0x10000; ++hi) {
    for (uint32_t lo : {0x0000u, 0x0001u, 0x7fffu, 0x8000u, 0x8001u, 0xffffu}) {
      check_bf16(bits_f32((hi << 16) | lo));
    }
  }
  Rng rng(99);
  for (int i = 0; i < 200000; ++i) {
    const uint32_t u = static_cast<uint32_t>(rng.next());
    check_half(bits_f32(u));
    check_bf16(bits_f32(u));
  }
}

// The capacities [note: launch metadata by value] states for CUDA's 32 KB parameter space
// (the emulation itself runs 1 KB tables, FO_CUDA_TEST_TABLE_BYTES).
FO_TEST(cuda_engine_table_capacities_match_the_note) {
  const int production_table = fcu::kMaxKernelParamBytes - 512;
  auto capacity = [&](int bytes_per_tensor) { return (production_table - 16) / bytes_per_tensor; };
  FO_CHECK_EQ(capacity(fcu::ChunkTable<4, 1>::kBytesPerTensor), 619);   // Adam
  FO_CHECK_EQ(capacity(fcu::ChunkTable<5, 1>::kBytesPerTensor), 537);   // AMSGrad
  FO_CHECK_EQ(capacity(fcu::ChunkTable<3, 0>::kBytesPerTensor), 895);   // SGD, momentum
  FO_CHECK_EQ(capacity(fcu::ChunkTable<2, 0>::kBytesPerTensor), 1151);  // SGD
  // csrc/cuda/README.md: AdamW with a master copy and stochastic rounding.
  FO_CHECK_EQ(capacity(fcu::ChunkTable<4, 1, true, true>::kBytesPerTensor), 474);
  FO_CHECK_EQ((8192 + 618) / 619, 14);  // "an 8,192-tensor Adam bucket takes 14 launches"
  FO_CHECK_EQ(capacity(8), 4029);       // advance_states: "~4,000 tensors per launch"
  FO_CHECK_EQ(fcu::kTableBytes, FO_CUDA_TEST_TABLE_BYTES);
  const int emulated_adam_tensors = fcu::ChunkTable<4, 1>::kMaxTensors;
  FO_CHECK_EQ(emulated_adam_tensors, (FO_CUDA_TEST_TABLE_BYTES - 16) / 52);
}

// Bit-identical to the CPU engine's portable variant for every dtype: the same math
// header, IEEE operations in the same order without contraction on both sides, and
// conversions that agree on every number (they differ on NaNs only, which these buckets
// have none of). On a GPU nvcc contracts into FMAs and its pow is not glibc's: the
// tolerance, not the bits, is the contract there.
FO_TEST(cuda_engine_fp32_all_options_match_reference_and_cpu_bits) {
  cuda_all_cases(DType::kFloat32);
}
FO_TEST(cuda_engine_fp64_all_options_match_reference_and_cpu_bits) {
  cuda_all_cases(DType::kFloat64);
}
FO_TEST(cuda_engine_fp16_all_options_match_reference_and_cpu_bits) {
  cuda_all_cases(DType::kFloat16);
}
FO_TEST(cuda_engine_bf16_all_options_match_reference_and_cpu_bits) {
  cuda_all_cases(DType::kBFloat16);
}

// 300 tensors, empty ones first, last, in runs and next to the two multi-chunk ones (one
// exact chunk; two chunks and 5): several optimizer launches and (for optimizers with
// state) three state launches of at most 126 tensors; every element and every state
// checked.
FO_TEST(cuda_engine_launch_tables_pack_every_tensor_in_order) {
  std::vector<int64_t> sizes;
  for (int t = 0; t < 300; ++t) {
    const bool empty = t == 0 || t == 299 || t % 7 == 3 || (t >= 40 && t < 44);
    const int64_t size = t == 25 ? kCudaChunk : t == 150 ? 2 * kCudaChunk + 5 : 1 + (t * 13) % 40;
    sizes.push_back(empty ? 0 : size);
  }
  for (const OptimizerEntry& e : optimizer_table()) {
    const OptCase& c = e.engine_case;
    for (DType d : {DType::kFloat32, DType::kBFloat16}) {
      const std::string ctx = ctx_of(e, c, d, "emulated CUDA, 300 tensors");
      const Bucket input = make_bucket(e, c, d, sizes, mixed_offset, 31);
      Bucket got = clone_bucket(input, mixed_offset);
      EmulatedStep s;
      s.states = states_before(e, c.args, input.n_tensors(), 0);
      s.lr_mode = LrMode::kDoublePtr;
      s.check_tables = true;
      // (empty tensors' states advance too: check_states there)
      const CudaRun r = emulated_step_checked(e, c, input, got, s, ctx);
      size_t table_launches = 0;
      for (const LaunchRecord& l : r.launches) {
        table_launches += starts_with(l.kernel, "multi_tensor_apply_kernel");
      }
      FO_CHECK(table_launches >= 6) << ctx << ": only " << table_launches << " launches";
      if (e.n_states > 0) {
        const size_t per_launch = (FO_CUDA_TEST_TABLE_BYTES - 16) / (8 * e.n_states);
        FO_CHECK_EQ(r.launches.size() - table_launches, (300 + per_launch - 1) / per_launch)
            << ctx;
      }
    }
  }
}

namespace {

// A functor for the engine alone: list 0 counts visits (+1 each), list 1 holds each
// element's tensor tag, which must equal the tag its block read through the tensor's
// scalar pointer; a wrong tensor adds 1000 instead.
struct CountingOp {
  using storage = fcu::UniformStorage<float>;
  static constexpr int kDepth = 2;
  static constexpr int kTensorScalars = 1;
  static constexpr bool reads(int) { return true; }
  static constexpr bool writes(int d) { return d == 0; }
  struct BlockScalars {
    float tag;
  };
  bool skip() const { return false; }
  BlockScalars block_scalars(const void* const* tensor_scalars) const {
    return {*static_cast<const float*>(tensor_scalars[0])};
  }
  void operator()(float (&x)[kDepth], const BlockScalars& s) const {
    x[0] += x[1] == s.tag ? 1.0f : 1000.0f;
  }
};

}  // namespace

// The binary search of [note: one block per chunk, found by binary search]: 90 tensors of
// 1 to 4 chunks and empty ones, misaligned and aligned, four launches of 28 tensors: each
// element is visited exactly once, by a block of its own tensor.
FO_TEST(cuda_engine_block_to_tensor_search_visits_each_element_once) {
  std::vector<int64_t> sizes;
  for (int t = 0; t < 90; ++t) {
    const int64_t pattern[] = {1, 700, 0, kCudaChunk, kCudaChunk + 1, 3 * kCudaChunk + 17,
                               5, 0, 64};
    sizes.push_back(t % 11 == 4 ? pattern[t % 9] : 1 + (t * 29) % 300);
  }
  for (int (*offset)(int, int) : {offset_zero, mixed_offset}) {
    Bucket b(DType::kFloat32, 2, sizes, offset);
    std::vector<float> tags(sizes.size());
    std::vector<void*> tag_ptrs;
    for (size_t t = 0; t < sizes.size(); ++t) {
      tags[t] = static_cast<float>(t);
      tag_ptrs.push_back(&tags[t]);
      for (int64_t i = 0; i < sizes[t]; ++i) {
        b.at(0, t).set(i, 0.0);
        b.at(1, t).set(i, static_cast<double>(t));
      }
    }
    fo_cuda_shim::state().reset();
    const std::array<void* const*, 1> scalars = {tag_ptrs.data()};
    FO_CHECK_EQ(fcu::multi_tensor_apply<CountingOp>(b.table(), scalars, nullptr, CountingOp{},
                                                      nullptr),
                cudaSuccess);
    FO_CHECK_EQ(fo_cuda_shim::state().launches.size(), 4u);
    FO_CHECK_EQ(b.damaged_guard_bytes(), 0);
    int64_t wrong = 0;
    for (size_t t = 0; t < sizes.size(); ++t) {
      for (int64_t i = 0; i < sizes[t]; ++i) {
        const double v = b.at(0, t).get(i);
        wrong += v != 1.0;
        FO_CHECK(v == 1.0) << "tensor " << t << " (numel " << sizes[t] << ") element " << i
                           << " visited as " << v
                           << " (1000 per visit from another tensor's block)";
      }
    }
    FO_CHECK_EQ(wrong, 0);
  }
}

// [note: 64-bit indexing]: a tensor of 2^32 + 2^31 + 777 elements (98,305 chunks; its
// last chunk starts at element 6,442,450,944 > 2^32) between two small ones. Only its last
// chunk (777 elements: vector body and tail) has memory: the table holds a base pointer
// 6.4e9 elements before it, and the emulation runs only the blocks of that chunk and of
// the small tensors. A 32-bit offset anywhere would write far outside the guarded buffers.
FO_TEST(cuda_engine_64bit_chunk_offsets_on_a_virtual_tensor) {
  const int64_t huge = (int64_t{1} << 32) + (int64_t{1} << 31) + 777;
  const int64_t huge_chunks = (huge + kCudaChunk - 1) / kCudaChunk;
  const int64_t backed_from = (huge_chunks - 1) * kCudaChunk;
  const std::vector<int64_t> backed = {10, huge - backed_from, 100};
  for (const OptimizerEntry& e : optimizer_table()) {
    const OptCase& c = e.engine_case;
    for (DType d : kAllDTypes) {
      for (int (*offset)(int, int) : {offset_zero, mixed_offset}) {
        const std::string ctx =
            ctx_of(e, c, d, offset == offset_zero ? "6.4e9 elements" : "6.4e9, misaligned");
        const Bucket input = make_bucket(e, c, d, backed, offset, 64);
        Bucket got = clone_bucket(input, offset);
        // The table the engine sees: the middle tensor's true numel, its base pointer moved
        // back by the elements that have no memory (never dereferenced).
        std::vector<void*> ptrs = got.ptrs;
        std::vector<int64_t> numels = {backed[0], huge, backed[2]};
        for (int r = 0; r < got.n_lists; ++r) {
          const uintptr_t p = reinterpret_cast<uintptr_t>(ptrs[r * 3 + 1]);
          const uintptr_t missing_bytes = static_cast<uintptr_t>(backed_from) * elem_size(d);
          ptrs[r * 3 + 1] = reinterpret_cast<void*>(p - missing_bytes);
        }
        const fc::TensorTable rows{3, got.n_lists, ptrs.data(), numels.data(), d, d};
        EmulatedStep s;
        s.states = states_before(e, c.args, 3, 0);
        s.states_double = true;
        s.check_tables = true;
        s.rows = &rows;
        fo_cuda_shim::state().reset();
        fo_cuda_shim::state().restrict_blocks = true;
        fo_cuda_shim::state().block_ranges = {{0, 1}, {huge_chunks, huge_chunks + 2}};
        const CudaRun r = emulated_step_checked(e, c, input, got, s, ctx);
        fo_cuda_shim::state().reset();
        FO_CHECK(!r.launches.empty() && r.launches[0].blocks == huge_chunks + 2) << ctx;
        const Bucket cpu =
            cpu_run(fc::kernels_for("default"), e, c, input, offset, 0, Slicing::kOneCall);
        FO_CHECK_EQ(count_bit_differences(cpu, got), 0) << ctx << ": differs from the CPU engine";
      }
    }
  }
}

// The launch cut at 2^31 - 1 chunks ([note: 64-bit indexing]): virtual tensors of 2^46
// elements (2^30 chunks each) take one launch each, a tensor of exactly 2^31 - 1 chunks
// fills a grid, and a tensor of more chunks than that is refused (cudaErrorInvalidValue).
// No block runs: the pointers have no memory behind them.
FO_TEST(cuda_engine_chunk_count_limits_cut_launches) {
  const int64_t big = int64_t{1} << 46;
  const int64_t max_grid_tensor = int64_t{0x7fffffff} * kCudaChunk;
  for (const OptimizerEntry& e : optimizer_table()) {
    const OptCase& c = e.engine_case;
    const Layout lay = layout_for(e, c);
    for (const bool too_big : {false, true}) {
      const std::vector<int64_t> numels =
          too_big ? std::vector<int64_t>{5, max_grid_tensor + 1}
                  : std::vector<int64_t>{big, big, 0, big, max_grid_tensor, 5};
      const int64_t n = static_cast<int64_t>(numels.size());
      std::vector<void*> ptrs;
      for (int r = 0; r < lay.n_rows; ++r) {
        for (int64_t t = 0; t < n; ++t) {
          ptrs.push_back(reinterpret_cast<void*>(uintptr_t{0x100000} * (1 + r * 64 + t)));
        }
      }
      const fc::TensorTable rows{n, lay.n_rows, ptrs.data(), numels.data(), DType::kFloat32,
                                  DType::kFloat32};
      DeviceStates st(e.n_states, n, states_before(e, c.args, n, 0), false);
      fo_cuda_shim::state().reset();
      fo_cuda_shim::state().restrict_blocks = true;  // and no ranges: no block runs
      fcu::Launch l{};
      l.rows = rows;
      l.lists = lay.lists;
      l.args = c.args;
      l.lr = fcu::DeviceScalar{nullptr, false, c.args.lr};
      for (int j = 0; j < st.n_states(); ++j) l.states[j] = st.ptrs(j);
      const cudaError_t err = kLaunchers[e.id].by_dtype[0](l, nullptr);
      const std::vector<LaunchRecord> launches = fo_cuda_shim::state().launches;
      fo_cuda_shim::state().reset();
      const std::string ctx = e.name + (too_big ? ": 2^31 chunks" : ": 2^30-chunk tensors");
      if (too_big) {
        FO_CHECK_EQ(err, cudaErrorInvalidValue) << ctx;
        continue;
      }
      FO_CHECK_EQ(err, cudaSuccess) << ctx;
      // big | big | big | max_grid_tensor | 5: each table holds one tensor.
      const std::vector<int64_t> grids = {big / kCudaChunk, big / kCudaChunk, big / kCudaChunk,
                                          0x7fffffff, 1};
      FO_CHECK_EQ(launches.size(), grids.size()) << ctx;
      for (size_t i = 0; i < launches.size() && i < grids.size(); ++i) {
        FO_CHECK_EQ(static_cast<int64_t>(launches[i].blocks), grids[i]) << ctx << " launch " << i;
      }
      check_packing(e, rows, &st, launches, /*expect_full=*/false, ctx,
                    /*with_state_launches=*/false);
    }
  }
}

// found_inf != 0: no list changes (grads included, though they are scaled), no state
// advances; found_inf == 0: the same bits as without found_inf.
FO_TEST(cuda_engine_found_inf_skips_everything) {
  const std::vector<int64_t> sizes = {0, 3, 17, 4097};
  for (const OptimizerEntry& e : optimizer_table()) {
    const OptCase& c = e.engine_case;
    for (DType d : kAllDTypes) {
      const std::string ctx = ctx_of(e, c, d, "emulated CUDA, found_inf");
      const Bucket input = make_bucket(e, c, d, sizes, mixed_offset, 8);
      const std::vector<double> before = states_before(e, c.args, input.n_tensors(), 0);
      const float inf_found = 1.0f, no_inf = 0.0f;
      DeviceStates st(e.n_states, input.n_tensors(), before, false);
      Bucket skipped = clone_bucket(input, mixed_offset);
      const CudaRun r = run_emulated(e, c, skipped, st, LrMode::kValue, &inf_found);
      FO_CHECK(r.launch_error == cudaSuccess && r.advance_error == cudaSuccess) << ctx;
      FO_CHECK_EQ(count_bit_differences(skipped, input), 0) << ctx << ": lists changed";
      FO_CHECK_EQ(skipped.damaged_guard_bytes(), 0) << ctx;
      check_states(st, stored_as(before, false), ctx);
      DeviceStates st0(e.n_states, input.n_tensors(), before, false);
      Bucket zero = clone_bucket(input, mixed_offset);
      run_emulated(e, c, zero, st0, LrMode::kValue, &no_inf);
      DeviceStates st1(e.n_states, input.n_tensors(), before, false);
      Bucket none = clone_bucket(input, mixed_offset);
      run_emulated(e, c, none, st1, LrMode::kValue, nullptr);
      FO_CHECK_EQ(count_bit_differences(zero, none), 0) << ctx << ": found_inf = 0";
      FO_CHECK(count_bit_differences(zero, input) > 0) << ctx << ": found_inf = 0 did nothing";
      FO_CHECK(st0.values() == st1.values()) << ctx;
      if (e.n_states > 0) {
        FO_CHECK(st0.values() != before) << ctx << ": found_inf = 0 left the state";
      }
    }
  }
}

// [note: vectorized and scalar paths]: base pointers misaligned by 3 elements, or
// differently per list (the kernel has two paths: every row pointer 16-byte aligned or
// not; the offset within 16 bytes changes nothing else), checked against the reference
// and bit for bit against the aligned run, on a tensor of two chunks whose second has a
// 9-element tail (for every V: 2, 4, 8). The runs must include rows on the vector path
// (all D pointers 16-byte aligned) and rows on the scalar path, for every dtype.
FO_TEST(cuda_engine_vector_and_scalar_paths_give_identical_bits) {
  const std::vector<int64_t> sizes = {1, 7, 9, 17, 33, 513, kCudaChunk + 9};
  static int (*const offsets[])(int, int) = {offset_zero, [](int, int) { return 3; },
                                             mixed_offset};
  for (const OptimizerEntry& e : optimizer_table()) {
    const OptCase& c = e.engine_case;
    for (DType d : kAllDTypes) {
      const Bucket input = make_bucket(e, c, d, sizes, offset_zero, 12 + static_cast<unsigned>(d));
      EmulatedStep s;
      s.states = states_before(e, c.args, input.n_tensors(), 0);
      std::vector<Bucket> results;
      int64_t vector_rows = 0, scalar_rows = 0;
      for (size_t o = 0; o < sizeof(offsets) / sizeof(offsets[0]); ++o) {
        const std::string ctx = ctx_of(e, c, d, "emulated CUDA, offsets #" + std::to_string(o));
        Bucket got = clone_bucket(input, offsets[o]);
        for (int64_t t = 0; t < got.n_tensors(); ++t) {
          uintptr_t bits = 0;
          for (int r = 0; r < got.n_lists; ++r) {
            bits |= reinterpret_cast<uintptr_t>(got.at(r, t).data());
          }
          (bits % 16 == 0 ? vector_rows : scalar_rows) += 1;
        }
        emulated_step_checked(e, c, input, got, s, ctx);
        if (!results.empty()) {
          FO_CHECK_EQ(count_bit_differences(got, results[0]), 0) << ctx;
        }
        results.push_back(std::move(got));
      }
      FO_CHECK(vector_rows >= static_cast<int64_t>(sizes.size()) && scalar_rows > 0)
          << ctx_of(e, c, d, "emulated CUDA") << ": " << vector_rows << " aligned rows, "
          << scalar_rows << " misaligned";
    }
  }
}

// A NaN lr leaves NaN params, a NaN grad scale NaNs in every list written, for every
// case, through fp16 and bf16 storage (see nan_scalar_cases in engine_fixture.h; CUDA's
// conversions give the canonical NaN; no NaN may round to a number). The NaN lr comes
// from a device double, as an lr tensor gives it.
FO_TEST(cuda_engine_nan_scalars_stay_nan) {
  for (const OptimizerEntry& e : optimizer_table()) {
    for (const NanScalarCase& n : nan_scalar_cases(e)) {
      for (DType d : kNanScalarDTypes) {
        Bucket b = make_bucket(e, n.c, d, nan_scalar_sizes(), offset_zero, 5);
        DeviceStates st(e.n_states, b.n_tensors(), states_before(e, n.c.args, b.n_tensors(), 0),
                        false);
        const LrMode lr_mode = n.nan_grad_scale ? LrMode::kValue : LrMode::kDoublePtr;
        const CudaRun r = run_emulated(e, n.c, b, st, lr_mode, nullptr);
        FO_CHECK(r.launch_error == cudaSuccess && r.advance_error == cudaSuccess)
            << ctx_of(e, n.c, d, "emulated CUDA");
        check_nan_scalar_step(e, n, d, b, "emulated CUDA");
      }
    }
  }
}

// [note: per-tensor state]: the kernels advance each state and round it to its tensor's
// dtype themselves, as advance_states stores it. A float32 counter at 2^24 stays there
// (torch's `step += 1` on a float32 tensor), a float64 one reaches 2^24 + 1; the update
// uses the rounded value.
FO_TEST(cuda_engine_state_rounds_to_its_dtype) {
  const std::vector<int64_t> sizes = {5, 4099};
  for (const OptimizerEntry& e : optimizer_table()) {
    if (e.n_states == 0) continue;
    const OptCase& c = e.engine_case;
    for (bool is_double : {false, true}) {
      const std::string ctx =
          ctx_of(e, c, DType::kFloat64, is_double ? "2^24, float64 state" : "2^24, float32 state");
      const Bucket input = make_bucket(e, c, DType::kFloat64, sizes, offset_zero, 24);
      EmulatedStep s;
      s.states.assign(sizes.size() * e.n_states, 16777216.0);
      s.states_double = is_double;
      const std::vector<double> after =
          stored_as(advanced(e, c.args, s.states, false, is_double), is_double);
      FO_CHECK_EQ(after[0], is_double ? 16777217.0 : 16777216.0) << ctx;
      Bucket got = clone_bucket(input, offset_zero);
      emulated_step_checked(e, c, input, got, s, ctx);
    }
  }
}

// Launchers return the first error and stop: a launch that fails to start leaves the
// tensors of its table and of every later table untouched (no later launch is tried), and
// a table whose list count is not the functor's depth is refused before any launch.
FO_TEST(cuda_engine_launch_errors_are_returned) {
  for (const OptimizerEntry& e : optimizer_table()) {
    const OptCase& c = e.engine_case;
    const std::string ctx = ctx_of(e, c, DType::kFloat32, "emulated CUDA, failing launch");
    const Bucket input = make_bucket(e, c, DType::kFloat32, cuda_sizes(), offset_zero, 9);
    const std::vector<double> before = states_before(e, c.args, input.n_tensors(), 0);
    DeviceStates st(e.n_states, input.n_tensors(), before, false);
    Bucket got = clone_bucket(input, offset_zero);
    fo_cuda_shim::state().reset();
    fo_cuda_shim::state().fail_launch = 1;
    const CudaRun r = run_emulated(e, c, got, st, LrMode::kValue, nullptr);
    fo_cuda_shim::state().reset();
    FO_CHECK_EQ(r.launch_error, cudaErrorLaunchFailure) << ctx;
    FO_CHECK_EQ(r.launches.size(), 2u) << ctx << ": launches after the failed one";
    check_states(st, stored_as(before, false), ctx);  // advance_states not reached
    if (r.launches.empty()) continue;
    DecodedTable first;
    const bool decoded =
        decode_any_chunk_table<1, 0>(got.n_lists, e.n_states, r.launches[0].first_arg, first);
    FO_CHECK(decoded) << ctx;
    FO_CHECK(first.n >= 1) << ctx << ": the first table is empty";
    // The first table's tensors were updated (some list of each of them changed: an
    // element may keep its param, as Rprop's do where grad and prev disagree in sign);
    // every later one is untouched, in every list.
    int64_t untouched_from = 0, seen = 0;
    for (int64_t t = 0; t < got.n_tensors(); ++t) {
      if (got.numels[t] > 0 && ++seen == first.n) untouched_from = t + 1;
    }
    for (int64_t t = 0; t < got.n_tensors(); ++t) {
      int64_t changed = 0;
      for (int l = 0; l < got.n_lists; ++l) {
        for (int64_t i = 0; i < got.numels[t]; ++i) {
          const bool same = got.at(l, t).bits(i) == input.at(l, t).bits(i);
          changed += !same;
          if (t >= untouched_from) {
            FO_CHECK(same) << ctx << ": list " << l << " of tensor " << t
                           << " of a later table changed";
          }
        }
      }
      if (t < untouched_from && got.numels[t] > 0) {
        FO_CHECK(changed > 0) << ctx << ": tensor " << t
                              << " of the first table (launched before the failure) unchanged";
      }
    }
    // A table of the wrong depth.
    fc::TensorTable wrong = got.table();
    wrong.n_lists += 1;
    const CudaRun w = run_emulated(e, c, got, st, LrMode::kValue, nullptr, &wrong);
    FO_CHECK_EQ(w.launch_error, cudaErrorInvalidValue) << ctx;
    FO_CHECK(w.launches.empty()) << ctx;
  }
}

// [note: aliased state]: one state tensor passed for rows 0, 2 and 5, another for rows 1
// and 4 (rows 3 and 6 have their own) advances once per row, in row order, and each row
// computes with the value after its own advance, as torch.optim's for-loop (`step += 1`
// per param) and the CPU op do: run_step launches rows [0, 2), [2, 5), [5, 7), each run
// after the previous one's advance_states. Checked against the reference, bit for bit
// against the CPU engine's portable variant given the states the CPU op computes, and
// the stored states; a call without aliased state is one run.
FO_TEST(cuda_engine_aliased_state_advances_once_per_row) {
  const std::vector<int64_t> sizes = {5, 17, 0, 33, 9, 513, 3};
  const std::vector<int64_t> owner = {0, 1, 0, 3, 1, 0, 6};
  const int64_t n = static_cast<int64_t>(sizes.size());
  for (const OptimizerEntry& e : optimizer_table()) {
    if (e.n_states == 0) continue;
    const OptCase& c = e.engine_case;
    for (DType d : kAllDTypes) {
      const std::string ctx = ctx_of(e, c, d, "emulated CUDA, aliased state");
      const Bucket input = make_bucket(e, c, d, sizes, mixed_offset, 41);
      const std::vector<double> before = states_before(e, c.args, n, 0);
      // Each row's state after its own advance, the tensors advanced in row order:
      // with the header's advance (what the CPU op hands its kernels) and the reference's.
      std::vector<double> header_rows(before.size()), reference_rows(before.size());
      std::vector<double> rows_before(before.size());  // each row's state before its advance
      for (const bool header : {true, false}) {
        std::vector<double> tensors = before;  // by owner row
        std::vector<double>& rows = header ? header_rows : reference_rows;
        for (int64_t t = 0; t < n; ++t) {
          const std::vector<double> one(tensors.begin() + owner[t] * e.n_states,
                                        tensors.begin() + (owner[t] + 1) * e.n_states);
          const std::vector<double> next = stored_as(advanced(e, c.args, one, header, false), false);
          // (The stored values, the same for both: stored_as rounds each advance.)
          if (!header) std::copy(one.begin(), one.end(), rows_before.begin() + t * e.n_states);
          std::copy(next.begin(), next.end(), tensors.begin() + owner[t] * e.n_states);
          std::copy(next.begin(), next.end(), rows.begin() + t * e.n_states);
        }
      }
      DeviceStates st(e.n_states, n, before, false, owner);
      fcu::Launch l{};
      l.rows = input.table();
      for (int j = 0; j < e.n_states; ++j) l.states[j] = st.ptrs(j);
      FO_CHECK(fcu::aliased_state_cuts(l, e.n_states) == std::vector<int64_t>({2, 5})) << ctx;
      Bucket got = clone_bucket(input, mixed_offset);
      const CudaRun r = run_emulated(e, c, got, st, LrMode::kValue, nullptr, nullptr, true);
      FO_CHECK_EQ(r.launch_error, cudaSuccess) << ctx;
      check_bucket(got, input,
                   expected_for(e, c, input, step_state_of(e, reference_rows, rows_before)), ctx);
      // Every row's tensors hold the value of the last row that shares them.
      std::vector<double> stored(before.size());
      for (int64_t t = 0; t < n; ++t) {
        int64_t last = t;
        for (int64_t u = t; u < n; ++u) last = owner[u] == owner[t] ? u : last;
        for (int j = 0; j < e.n_states; ++j) {
          stored[t * e.n_states + j] = header_rows[last * e.n_states + j];
        }
      }
      check_states(st, stored, ctx);
      Bucket cpu = clone_bucket(input, mixed_offset);
      const std::vector<double> header_step = step_state_of(e, header_rows, rows_before);
      run_cpu(fc::kernels_for("default"), e, cpu, step_call(e, c, header_step), Slicing::kOneCall);
      FO_CHECK_EQ(count_bit_differences(cpu, got), 0) << ctx << ": differs from the CPU engine";
    }
    DeviceStates own(e.n_states, n, states_before(e, c.args, n, 0), false);
    fcu::Launch l{};
    l.rows.n_tensors = n;
    for (int j = 0; j < e.n_states; ++j) l.states[j] = own.ptrs(j);
    FO_CHECK(fcu::aliased_state_cuts(l, e.n_states).empty()) << e.name;
  }
}

// [note: compiled variants] in fused_optim/dispatch.h: every case's own lists select a
// compiled variant (valid_call, which the ops check before any kernel); a lists mask that
// disagrees with the arguments (an optional list dropped) and selects none (SGD's Nesterov
// or first-step bit without a momentum buffer) is refused by both engines alike: no
// launch, no element written (the emulated CUDA launcher also says so).
FO_TEST(engines_refuse_a_call_that_selects_no_variant) {
  using ValidFn = bool (*)(uint32_t, const fm::Args&);
#define FO_TEST_VALID_CALL(Name) &fused_optim::valid_call<fm::Name>,
  const ValidFn valid[] = {FO_FOR_EACH_OPTIMIZER(FO_TEST_VALID_CALL)};
#undef FO_TEST_VALID_CALL
  const std::vector<int64_t> sizes = {5, 17};
  int refused = 0;
  for (const OptimizerEntry& e : optimizer_table()) {
    for (const OptCase& c : e.cases) {
      const uint32_t own = e.lists(c.args);
      FO_CHECK(valid[e.id](own, c.args)) << e.name << " " << c.name;
      for (int k = 0; k < e.n_lists; ++k) {
        const uint32_t lists = own & ~fm::bit(k);
        if (!((own & e.optional_lists) >> k & 1u) || valid[e.id](lists, c.args)) continue;
        ++refused;
        const std::string ctx = e.name + " " + c.name + " without " + e.list_names[k];
        const Bucket input(DType::kFloat32, __builtin_popcount(lists), sizes, offset_zero);
        const std::vector<double> states = step_states(e, c, 2, 0, true);
        Bucket cpu = clone_bucket(input, offset_zero);
        fc::StepCall call = step_call(e, c, states);
        call.lists = lists;
        run_cpu(fc::kernels_for("default"), e, cpu, call, Slicing::kOneCall);
        FO_CHECK_EQ(count_bit_differences(cpu, input), 0) << ctx << ": CPU engine";
        Bucket gpu = clone_bucket(input, offset_zero);
        DeviceStates st(e.n_states, 2, states_before(e, c.args, 2, 0), false);
        fo_cuda_shim::state().reset();
        fcu::Launch l{};
        l.rows = gpu.table();
        l.lists = lists;
        l.args = c.args;
        l.lr = fcu::DeviceScalar{nullptr, false, c.args.lr};
        for (int j = 0; j < st.n_states(); ++j) l.states[j] = st.ptrs(j);
        FO_CHECK_EQ(kLaunchers[e.id].by_dtype[0](l, nullptr), cudaErrorInvalidValue) << ctx;
        FO_CHECK(fo_cuda_shim::state().launches.empty()) << ctx;
        fo_cuda_shim::state().reset();
        FO_CHECK_EQ(count_bit_differences(gpu, input), 0) << ctx << ": CUDA engine";
      }
    }
  }
  FO_CHECK(refused > 0) << "no case selects a combination without a variant";
}


// ---------------------------------------------------------------------------------------
// Memory policies ([note: storage policy] in multi_tensor_apply.cuh): the emulated CUDA
// engine against the CPU engine's portable variant, bit for bit, on the same bucket.

namespace {

// A bucket under memory policy `key`: params and grads in key.param, the state lists in
// key.state, the fp32 master copies (key.master) and each row's rng_state [seed,
// offset] (key.stochastic), `rng_owner[t]`: the row whose rng_state row t is passed
// (the same tensor for several params when owner[t] != t).
struct PolicyBucket {
  fc::PolicyKey key;
  Bucket params, states, master;  // rows 0 and 1 of params, rows >= 2 of states, row 0 of master
  std::vector<int64_t> rng;       // [seed, offset] per owner row
  std::vector<int64_t> rng_owner;
  std::vector<void*> ptrs, master_ptrs;
  std::vector<int64_t*> rng_ptrs;

  PolicyBucket(const OptimizerEntry& e, const OptCase& c, fc::PolicyKey k,
               const std::vector<int64_t>& sizes, int (*offset)(int, int), uint64_t seed)
      : key(k),
        params(make_bucket(e, c, k.param, sizes, offset, seed)),
        states(make_bucket(e, c, k.state, sizes, offset, seed)),
        master(make_bucket(e, c, DType::kFloat32, sizes, offset, seed)) {
    const int64_t n = params.n_tensors();
    Rng r(seed + 7);
    for (int64_t t = 0; t < n; ++t) {
      rng.push_back(static_cast<int64_t>(r.next()));  // any 64 bits
      // Offsets near 2^32 (the counter's high word carries) and near 2^64 (it wraps).
      const uint64_t base = t % 3 == 0 ? 0xFFFFFFFFull - 40 : t % 3 == 1 ? ~0ull - 20 : 12345;
      rng.push_back(static_cast<int64_t>(base - static_cast<uint64_t>(t)));
      rng_owner.push_back(t);
    }
    link();
  }
  PolicyBucket(const PolicyBucket& o, int (*offset)(int, int))
      : key(o.key),
        params(clone_bucket(o.params, offset)),
        states(clone_bucket(o.states, offset)),
        master(clone_bucket(o.master, offset)),
        rng(o.rng),
        rng_owner(o.rng_owner) {
    link();
  }
  PolicyBucket(const PolicyBucket&) = delete;

  void link() {
    const int64_t n = params.n_tensors();
    ptrs.clear();
    master_ptrs.clear();
    rng_ptrs.clear();
    for (int l = 0; l < params.n_lists; ++l) {
      for (int64_t t = 0; t < n; ++t) ptrs.push_back((l < 2 ? params : states).at(l, t).data());
    }
    for (int64_t t = 0; t < n; ++t) master_ptrs.push_back(master.at(0, t).data());
    for (int64_t t = 0; t < n; ++t) rng_ptrs.push_back(&rng[2 * rng_owner[t]]);
  }
  fc::TensorTable table() const {
    return fc::TensorTable{params.n_tensors(), params.n_lists, ptrs.data(), params.numels.data(),
                           key.param, key.state, key.master ? master_ptrs.data() : nullptr};
  }
  // Differing stored bits: the lists each policy stores, and the rng_states.
  int64_t bit_differences(const PolicyBucket& o) const {
    int64_t diff = 0;
    for (int l = 0; l < params.n_lists; ++l) {
      const Bucket& a = l < 2 ? params : states;
      const Bucket& b = l < 2 ? o.params : o.states;
      for (int64_t t = 0; t < params.n_tensors(); ++t) {
        for (int64_t i = 0; i < params.numels[t]; ++i) {
          diff += a.at(l, t).bits(i) != b.at(l, t).bits(i);
          if (key.master && l == 0) diff += master.at(0, t).bits(i) != o.master.at(0, t).bits(i);
        }
      }
    }
    if (key.stochastic) diff += rng != o.rng;
    return diff + params.damaged_guard_bytes() + states.damaged_guard_bytes() +
           master.damaged_guard_bytes();
  }
};

// NaNs whose low half is not zero (a bf16 rounding that adds to the bits would carry
// them into the exponent) in the fp32 lists the math reads: the master copies, fp32
// params, fp32 states. Not for fp16 params: CUDA's __float2half_rn makes every NaN the
// canonical one, the CPU's float_to_half keeps its sign (both NaN).
void put_nans(PolicyBucket& b) {
  if (b.key.param == DType::kFloat16) return;
  const uint32_t nans[] = {0x7FC01234u, 0xFF80ABCDu, 0x7F800001u};
  int k = 0;
  for (int64_t t = 0; t < b.params.n_tensors(); t += 5) {
    if (b.params.numels[t] == 0) continue;
    const int64_t i = (t * 7) % b.params.numels[t];
    const uint32_t nan = nans[k++ % 3];
    if (b.key.master) b.master.at(0, t).set_bits(i, nan);
    if (b.key.param == DType::kFloat32) b.params.at(0, t).set_bits(i, nan);
    if (b.key.state == DType::kFloat32 && b.params.n_lists > 2) b.states.at(2, t).set_bits(i, nan);
  }
}

// One step of case c on `got` (a copy of `input`) through the emulated engine as
// csrc/cuda/ops_cuda.cu drives it (launcher_for, run_step), and on `cpu` (another copy)
// through the CPU engine as csrc/ops_cpu.cpp does (advance_rng: each row's rng_state
// read and advanced in row order). Returns the emulated run's error.
cudaError_t policy_step(const OptimizerEntry& e, const OptCase& c, PolicyBucket& got,
                        PolicyBucket& cpu, const float* found_inf, const std::string& ctx) {
  const int64_t n = got.params.n_tensors();
  const std::vector<double> before = states_before(e, c.args, n, 0);
  const std::vector<double> stored_before = stored_as(before, false);
  const std::vector<double> after =
      stored_as(advanced(e, c.args, stored_before, true, false), false);
  // The CPU op.
  const bool skip = found_inf != nullptr && *found_inf != 0.0f;
  if (!skip) {
    std::vector<uint64_t> rng(2 * static_cast<size_t>(n));
    for (int64_t t = 0; t < n; ++t) {
      int64_t* state = &cpu.rng[2 * cpu.rng_owner[t]];
      rng[2 * t] = static_cast<uint64_t>(state[0]);
      rng[2 * t + 1] = static_cast<uint64_t>(state[1]);
      state[1] = static_cast<int64_t>(static_cast<uint64_t>(state[1]) +
                                      static_cast<uint64_t>(cpu.params.numels[t]));
    }
    const std::vector<double> cpu_states = step_state_of(e, after, stored_before);
    fc::StepCall call = step_call(e, c, cpu_states);
    call.rng = cpu.key.stochastic ? rng.data() : nullptr;
    const std::vector<Chunk> chunks = make_chunks(cpu.params.numels);
    const fc::TensorTable table = cpu.table();
    fc::kernels_for("default").chunks[e.id](table, call, chunks.data(), 0,
                                            static_cast<int64_t>(chunks.size()));
  }
  // The CUDA op.
  DeviceStates st(e.n_states, n, before, false);
  fo_cuda_shim::State& shim = fo_cuda_shim::state();
  shim.launches.clear();
  shim.last_error = cudaSuccess;
  fcu::Launch l{};
  l.rows = got.table();
  l.lists = layout_for(e, c).lists;
  l.args = c.args;
  l.lr = fcu::DeviceScalar{nullptr, false, c.args.lr};
  l.maximize = maximize_of(e, c.args);
  for (int j = 0; j < st.n_states(); ++j) l.states[j] = st.ptrs(j);
  l.grad_scale = c.scaled ? &c.grad_scale : nullptr;
  l.found_inf = found_inf;
  l.rng = got.key.stochastic ? got.rng_ptrs.data() : nullptr;
  const int p = fcu::policy_of(l);
  FO_CHECK(p >= 0 && fc::kPolicies[p].param == got.key.param &&
           fc::kPolicies[p].state == got.key.state && fc::kPolicies[p].master == got.key.master &&
           fc::kPolicies[p].stochastic == got.key.stochastic) << ctx << ": policy " << p;
  const fcu::Launchers& fns = kLaunchers[e.id];
  FO_CHECK(fns.launcher_for(l) == fns.by_policy[p]) << ctx;
  const cudaError_t err = fcu::run_step(l, e.n_states, fns.launcher_for(l), fns.advance, nullptr);
  check_states(st, skip ? stored_before : after, ctx);
  return err;
}

// What a policy's tables hold per tensor: its param pointer, master copy and rng_state
// (nullptr where the table has none), and (state tables) its element count.
struct PolicyTable {
  int max_tensors = 0;
  int n = 0;
  std::vector<const void*> ptrs0, master, rng;
  std::vector<int64_t> numels;
};

template <int D, int NS, bool M, bool R>
void decode_policy_table(const std::vector<unsigned char>& bytes, PolicyTable& out) {
  using T = fcu::ChunkTable<D, NS, M, R>;
  FO_CHECK_EQ(bytes.size(), sizeof(T));
  if (bytes.size() != sizeof(T)) return;
  const auto t = std::make_unique<T>();
  std::memcpy(static_cast<void*>(t.get()), bytes.data(), sizeof(T));
  out.max_tensors = T::kMaxTensors;
  out.n = t->n_tensors;
  for (int i = 0; i < out.n && i < T::kMaxTensors; ++i) {
    out.ptrs0.push_back(t->ptrs[0][i]);
    const void* m = nullptr;
    const void* r = nullptr;
    if constexpr (M) m = t->master.ptrs[i];
    if constexpr (R) r = t->rng.ptrs[i];
    out.master.push_back(m);
    out.rng.push_back(r);
  }
}

template <int D, int NS>
bool decode_any_policy_table(int depth, int ns, bool master, bool rng,
                             const std::vector<unsigned char>& bytes, PolicyTable& out) {
  if (depth == D && ns == NS) {
    if (master && rng) decode_policy_table<D, NS, true, true>(bytes, out);
    if (master && !rng) decode_policy_table<D, NS, true, false>(bytes, out);
    if (!master && rng) decode_policy_table<D, NS, false, true>(bytes, out);
    if (!master && !rng) decode_policy_table<D, NS, false, false>(bytes, out);
    return true;
  }
  if constexpr (NS < fm::kMaxStates) {
    return decode_any_policy_table<D, NS + 1>(depth, ns, master, rng, bytes, out);
  } else if constexpr (D < kMaxLists) {
    return decode_any_policy_table<D + 1, 0>(depth, ns, master, rng, bytes, out);
  } else {
    return false;
  }
}

template <int NS, bool R>
void decode_state_table_rng(const std::vector<unsigned char>& bytes, PolicyTable& out) {
  using T = fcu::StateTable<NS, R>;
  FO_CHECK_EQ(bytes.size(), sizeof(T));
  if (bytes.size() != sizeof(T)) return;
  const auto t = std::make_unique<T>();
  std::memcpy(static_cast<void*>(t.get()), bytes.data(), sizeof(T));
  out.max_tensors = T::kMaxTensors;
  out.n = t->n;
  FO_CHECK(out.n >= 1 && out.n <= T::kMaxTensors) << out.n;
  for (int i = 0; i < out.n && i < T::kMaxTensors; ++i) {
    const void* r = nullptr;
    int64_t numel = -1;
    if constexpr (R) {
      r = t->rng.ptrs[i];
      numel = t->numels.v[i];
    }
    out.rng.push_back(r);
    out.numels.push_back(numel);
  }
}

template <int NS>
bool decode_policy_state_table(int ns, bool rng, const std::vector<unsigned char>& bytes,
                               PolicyTable& out) {
  if constexpr (NS > fm::kMaxStates) {
    return false;
  } else {
    if (ns != NS) return decode_policy_state_table<NS + 1>(ns, rng, bytes, out);
    if (rng) {
      decode_state_table_rng<NS, true>(bytes, out);
    } else if constexpr (NS > 0) {
      decode_state_table_rng<NS, false>(bytes, out);
    } else {
      return false;
    }
    return true;
  }
}

}  // namespace

// Every option case of every optimizer under every memory policy, on the awkward sizes
// (vector tails, empty tensors, several launches), rows aligned and misaligned (the
// vector path with two 16-byte accesses per fp32 list, and the scalar path), NaNs with
// payloads in the fp32 lists, rng_state offsets whose counters carry into the high word
// and wrap at 2^64, and (odd cases) rng_states shared by several params (advanced once
// per row, in row order, as the CPU op does): the emulated CUDA engine stores the same
// bits as the CPU engine, params, grads, states, master copies and rng_states.
FO_TEST(cuda_engine_memory_policies_match_cpu_bits) {
  std::vector<int64_t> sizes = cuda_sizes();
  const int64_t n = static_cast<int64_t>(sizes.size());
  int runs = 0;
  for (const OptimizerEntry& e : optimizer_table()) {
    for (size_t ci = 0; ci < e.cases.size(); ++ci) {
      const OptCase& c = e.cases[ci];
      int (*offset)(int, int) = ci % 2 == 0 ? offset_zero : mixed_offset;
      for (int p = 0; p < fc::kNumPolicies; ++p) {
        const fc::PolicyKey key = fc::kPolicies[p];
        const std::string ctx =
            ctx_of(e, c, key.param, "emulated CUDA, policy " + std::to_string(p) +
                                        (offset == offset_zero ? ", aligned" : ", mixed offsets"));
        PolicyBucket input(e, c, key, sizes, offset, 5000u + 100u * ci + p);
        put_nans(input);
        if (ci % 2 == 1) {
          for (int64_t t = 3; t < n; t += 4) input.rng_owner[t] = t - 2;
          input.link();
        }
        PolicyBucket got(input, offset), cpu(input, offset);
        FO_CHECK_EQ(policy_step(e, c, got, cpu, nullptr, ctx), cudaSuccess) << ctx;
        FO_CHECK_EQ(got.bit_differences(cpu), 0) << ctx << ": differs from the CPU engine";
        FO_CHECK(got.bit_differences(input) > 0) << ctx << ": nothing changed";
        if (key.stochastic) {
          // Each rng_state advanced by the element count of every row it was passed for.
          std::vector<int64_t> want = input.rng;
          for (int64_t t = 0; t < n; ++t) {
            int64_t& offset_t = want[2 * input.rng_owner[t] + 1];
            offset_t = static_cast<int64_t>(static_cast<uint64_t>(offset_t) +
                                            static_cast<uint64_t>(sizes[t]));
          }
          FO_CHECK(got.rng == want) << ctx << ": rng_states";
        }
        ++runs;
      }
    }
  }
  FO_CHECK(runs > 0);
}

// found_inf under every policy: nothing written, rng_states included; the policy's
// launches and advance_states still enqueued (no host sync), each returning at once.
FO_TEST(cuda_engine_memory_policies_found_inf_skips_everything) {
  const std::vector<int64_t> sizes = {5, 0, 33, 513};
  const float inf_found = 1.0f;
  for (const OptimizerEntry& e : optimizer_table()) {
    const OptCase& c = e.engine_case;
    for (int p = 0; p < fc::kNumPolicies; ++p) {
      const std::string ctx = ctx_of(e, c, fc::kPolicies[p].param,
                                     "emulated CUDA, found_inf, policy " + std::to_string(p));
      PolicyBucket input(e, c, fc::kPolicies[p], sizes, mixed_offset, 77);
      PolicyBucket got(input, mixed_offset), cpu(input, mixed_offset);
      FO_CHECK_EQ(policy_step(e, c, got, cpu, &inf_found, ctx), cudaSuccess) << ctx;
      FO_CHECK_EQ(got.bit_differences(input), 0) << ctx << ": written despite found_inf";
      const auto& launches = fo_cuda_shim::state().launches;
      FO_CHECK(!launches.empty() &&
               starts_with(launches.back().kernel, fc::kPolicies[p].stochastic || e.n_states > 0
                                                       ? "advance_states_kernel"
                                                       : "multi_tensor_apply_kernel"))
          << ctx;
    }
  }
}

// The policy's launch tables: each tensor's master copy and rng_state pointer beside its
// lists (none in the uniform tables), full tables but the last; the launch that
// advances the rng_states covers every row, an optimizer without per-tensor state
// (SGD without momentum) included; a call whose lists do not match the launcher's policy
// is refused before any launch.
FO_TEST(cuda_engine_memory_policy_tables) {
  std::vector<int64_t> sizes;
  for (int t = 0; t < 90; ++t) sizes.push_back(t % 11 == 4 ? 0 : 1 + (t * 13) % 40);
  const int64_t n = static_cast<int64_t>(sizes.size());
  for (const OptimizerEntry& e : optimizer_table()) {
    const OptCase& c = e.engine_case;
    const int depth = layout_for(e, c).n_rows;
    for (int p = 0; p < fc::kNumPolicies; ++p) {
      const fc::PolicyKey key = fc::kPolicies[p];
      const std::string ctx =
          ctx_of(e, c, key.param, "emulated CUDA, policy tables " + std::to_string(p));
      PolicyBucket input(e, c, key, sizes, offset_zero, 9);
      PolicyBucket got(input, offset_zero), cpu(input, offset_zero);
      FO_CHECK_EQ(policy_step(e, c, got, cpu, nullptr, ctx), cudaSuccess) << ctx;
      FO_CHECK_EQ(got.bit_differences(cpu), 0) << ctx;
      const auto launches = fo_cuda_shim::state().launches;
      std::vector<int64_t> nonempty;
      for (int64_t t = 0; t < n; ++t) {
        if (sizes[t] > 0) nonempty.push_back(t);
      }
      size_t next = 0, li = 0;
      for (; li < launches.size() && starts_with(launches[li].kernel, "multi_tensor_apply_kernel");
           ++li) {
        PolicyTable tab;
        const bool decoded = decode_any_policy_table<1, 0>(depth, e.n_states, key.master,
                                                           key.stochastic, launches[li].first_arg,
                                                           tab);
        FO_CHECK(decoded) << ctx;
        FO_CHECK(tab.n >= 1 && tab.n <= tab.max_tensors) << ctx << ": launch " << li;
        for (int i = 0; i < tab.n && next < nonempty.size(); ++i, ++next) {
          const int64_t t = nonempty[next];
          FO_CHECK(tab.ptrs0[i] == got.ptrs[t]) << ctx << ": row " << t;
          FO_CHECK(tab.master[i] == (key.master ? got.master_ptrs[t] : nullptr))
              << ctx << ": row " << t;
          FO_CHECK(tab.rng[i] == (key.stochastic ? got.rng_ptrs[t] : nullptr))
              << ctx << ": row " << t;
        }
        const bool last = li + 1 == launches.size() ||
                          !starts_with(launches[li + 1].kernel, "multi_tensor_apply_kernel");
        if (!last) {
          FO_CHECK_EQ(tab.n, tab.max_tensors) << ctx << ": launch " << li << " cut early";
        }
      }
      FO_CHECK_EQ(next, nonempty.size()) << ctx;
      int64_t covered = 0;
      for (; li < launches.size(); ++li) {
        FO_CHECK(starts_with(launches[li].kernel, "advance_states_kernel")) << ctx;
        PolicyTable tab;
        FO_CHECK(decode_policy_state_table<0>(e.n_states, key.stochastic, launches[li].first_arg,
                                              tab)) << ctx;
        for (int i = 0; i < tab.n; ++i, ++covered) {
          FO_CHECK(covered < n) << ctx;
          if (covered >= n) break;
          FO_CHECK(tab.rng[i] == (key.stochastic ? got.rng_ptrs[covered] : nullptr)) << ctx;
          if (key.stochastic) {
            FO_CHECK_EQ(tab.numels[i], sizes[covered]) << ctx;
          }
        }
      }
      FO_CHECK_EQ(covered, (e.n_states > 0 || key.stochastic) ? n : 0) << ctx;
      // A call of another policy (or none) is refused by this policy's launcher.
      fcu::Launch l{};
      l.rows = got.table();
      l.lists = layout_for(e, c).lists;
      l.args = c.args;
      l.rng = key.stochastic ? nullptr : got.rng_ptrs.data();
      fo_cuda_shim::state().reset();
      FO_CHECK_EQ(kLaunchers[e.id].by_policy[p](l, nullptr), cudaErrorInvalidValue) << ctx;
      l.rng = nullptr;
      l.rows.state_dtype = l.rows.dtype;
      l.rows.master = nullptr;
      FO_CHECK_EQ(kLaunchers[e.id].by_policy[p](l, nullptr), cudaErrorInvalidValue) << ctx;
      l.rows = got.table();
      l.rng = key.stochastic ? got.rng_ptrs.data() : nullptr;  // the policy's call
      FO_CHECK_EQ(kLaunchers[e.id].by_dtype[static_cast<int>(key.param)](l, nullptr),
                  cudaErrorInvalidValue) << ctx;
      FO_CHECK(fo_cuda_shim::state().launches.empty()) << ctx;
    }
  }
}


// ---------------------------------------------------------------------------------------
// bf16 work lists ([note: bf16 work lists] in fused_optim/math/optimizer.h; [note: storage
// policy] in multi_tensor_apply.cuh): Muon's two stages (fused_optim/math/muon.h), params,
// grads and momentum buffers in each of the four dtypes beside the bf16 `updates` list.
// The emulated CUDA engine, bit for bit against the CPU engine on the same buckets (the
// reference and torch's bits are tests/test_muon.py's business): every variant (momentum
// with and without Nesterov, apply, apply with a transposed update), grads scaled or not,
// aligned rows (vector path, V = 2..8 with the work list's 4- to 16-byte accesses) and
// misaligned ones (scalar path), the vector tails, a tensor of two chunks (the work
// list's chunk offset is in its own element size); the lists a stage does not write keep
// their bits; no byte outside the tensors is written.
namespace {

constexpr int kMuonId = optimizer_id<fm::Muon>();

struct MuonBuckets {
  Bucket main;  // params, grads, momentum_buffers: the params' dtype
  Bucket work;  // updates: bf16
  std::vector<void*> ptrs;

  // The call's list-major table, as csrc/ops_common.h's check_bucket builds it.
  fc::TensorTable table() {
    const int64_t n = main.n_tensors();
    ptrs.clear();
    for (int l = 0; l < fm::Muon::kLists; ++l) {
      for (int64_t t = 0; t < n; ++t) {
        ptrs.push_back(l < fm::Muon::kUpdate ? main.at(l, t).data() : work.at(0, t).data());
      }
    }
    return fc::TensorTable{n, fm::Muon::kLists, ptrs.data(), main.numels.data(), main.dtype,
                           main.dtype};
  }
};

MuonBuckets muon_buckets(DType d, int (*offset)(int, int), uint64_t seed,
                         const MuonBuckets* copy_of = nullptr) {
  std::vector<int64_t> sizes = cuda_sizes();
  sizes.push_back(kCudaChunk + 37);
  MuonBuckets b{Bucket(d, 3, sizes, offset),
                Bucket(DType::kBFloat16, 1, sizes, [&](int, int t) { return offset(3, t); }),
                {}};
  if (copy_of != nullptr) {
    for (int l = 0; l < 3; ++l) {
      for (int64_t t = 0; t < b.main.n_tensors(); ++t) {
        for (int64_t i = 0; i < sizes[t]; ++i) {
          b.main.at(l, t).set_bits(i, copy_of->main.at(l, t).bits(i));
        }
      }
    }
    for (int64_t t = 0; t < b.main.n_tensors(); ++t) {
      for (int64_t i = 0; i < sizes[t]; ++i) {
        b.work.at(0, t).set_bits(i, copy_of->work.at(0, t).bits(i));
      }
    }
    return b;
  }
  Rng rng(seed);
  for (int64_t t = 0; t < b.main.n_tensors(); ++t) {
    for (int64_t i = 0; i < sizes[t]; ++i) {
      // Magnitudes over many binades, both signs, some zeros; no NaN (the engines' NaNs
      // differ in payload only: cuda_engine_fp32_all_options_match_reference_and_cpu_bits).
      for (int l = 0; l < 3; ++l) {
        const double x = rng.chance(0.02) ? 0.0
                                          : (rng.chance(0.5) ? -1 : 1) *
                                                std::ldexp(rng.uniform(1.0, 2.0),
                                                           static_cast<int>(rng.uniform(-12, 8)));
        b.main.at(l, t).set(i, x);
      }
      b.work.at(0, t).set(i, rng.uniform(-3.0, 3.0));
    }
  }
  return b;
}

fm::LrDType lr_dtype_of(DType d) {
  switch (d) {
    case DType::kFloat64: return fm::LrDType::kFloat64;
    case DType::kFloat16: return fm::LrDType::kFloat16;
    case DType::kBFloat16: return fm::LrDType::kBFloat16;
    default: return fm::LrDType::kFloat32;
  }
}

void muon_case(DType d, bool apply, bool nesterov, bool transposed, bool scaled, bool aligned) {
  const std::string ctx = std::string("Muon ") + dtype_name(d) + (apply ? " apply" : " momentum") +
                          (nesterov ? " nesterov" : "") + (transposed ? " transposed" : "") +
                          (scaled ? " grad_scale" : "") + (aligned ? ", aligned" : ", misaligned");
  fm::Args args{};
  args.floats[fm::Muon::kMomentum] = 0.9;
  args.floats[fm::Muon::kWeightDecay] = 0.1;
  args.floats[fm::Muon::kLrRatio] = 1.5;
  args.flags[fm::Muon::kNesterov] = nesterov;
  args.flags[fm::Muon::kApply] = apply;
  args.flags[fm::Muon::kTransposedUpdate] = transposed;
  args.lr = 0.02;
  args.lr_dtype = fm::LrDType::kFloat64;
  args.param_dtype = lr_dtype_of(d);
  const float grad_scale = 4.0f;
  const uint32_t lists = (1u << fm::Muon::kLists) - 1;

  int (*offset)(int, int) = aligned ? offset_zero : mixed_offset;
  MuonBuckets input = muon_buckets(d, offset, 7000u + static_cast<unsigned>(d));
  MuonBuckets cpu = muon_buckets(d, offset, 0, &input);
  MuonBuckets got = muon_buckets(d, offset, 0, &input);

  fc::StepCall call{};
  call.args = args;
  call.lists = lists;
  call.maximize = false;
  call.grad_scale = scaled ? &grad_scale : nullptr;
  const fc::TensorTable cpu_table = cpu.table();
  const std::vector<Chunk> chunks = make_chunks(cpu.main.numels);
  fc::kernels_for("default").chunks[kMuonId](cpu_table, call, chunks.data(), 0,
                                             static_cast<int64_t>(chunks.size()));

  fcu::Launch l{};
  l.rows = got.table();
  l.lists = lists;
  l.args = args;
  l.lr = fcu::DeviceScalar{nullptr, false, args.lr};
  l.maximize = false;
  l.grad_scale = scaled ? &grad_scale : nullptr;
  const fcu::Launchers& fns = kLaunchers[kMuonId];
  FO_CHECK_EQ(fns.by_dtype[static_cast<int>(d)](l, nullptr), cudaSuccess) << ctx;
  FO_CHECK_EQ(fns.advance(l, nullptr), cudaSuccess) << ctx;

  FO_CHECK_EQ(got.main.damaged_guard_bytes() + got.work.damaged_guard_bytes(), 0) << ctx;
  FO_CHECK_EQ(count_bit_differences(cpu.main, got.main), 0) << ctx << ": differs from the CPU";
  FO_CHECK_EQ(count_bit_differences(cpu.work, got.work), 0) << ctx << ": updates differ";
  // What the stage writes changed; what it does not (grads: unless scaled) kept its bits.
  const Bucket* lists_of[] = {&got.main, &got.main, &got.main, &got.work};
  const Bucket* inputs_of[] = {&input.main, &input.main, &input.main, &input.work};
  for (int k = 0; k < fm::Muon::kLists; ++k) {
    const int row = k < fm::Muon::kUpdate ? k : 0;
    int64_t changed = 0;
    for (int64_t t = 0; t < got.main.n_tensors(); ++t) {
      for (int64_t i = 0; i < got.main.numels[t]; ++i) {
        changed += lists_of[k]->at(row, t).bits(i) != inputs_of[k]->at(row, t).bits(i);
      }
    }
    const bool written = apply ? k == fm::Muon::kParam
                               : k != fm::Muon::kParam && (k != fm::Muon::kGrad || scaled);
    if (written) {
      FO_CHECK(changed > 0) << ctx << ": " << fm::Muon::kListNames[k] << " never written";
    } else {
      FO_CHECK_EQ(changed, 0) << ctx << ": " << fm::Muon::kListNames[k] << " changed";
    }
  }
}

}  // namespace

FO_TEST(cuda_engine_bf16_work_lists_match_cpu_bits) {
  for (DType d : {DType::kFloat32, DType::kFloat64, DType::kFloat16, DType::kBFloat16}) {
    for (bool aligned : {true, false}) {
      for (bool nesterov : {false, true}) {
        for (bool scaled : {false, true}) muon_case(d, false, nesterov, false, scaled, aligned);
      }
      for (bool transposed : {false, true}) muon_case(d, true, false, transposed, false, aligned);
    }
  }
}

// Its memory-policy launchers run no kernel (the ops refuse a policy first): a policy call
// is refused, nothing launched.
FO_TEST(cuda_engine_bf16_work_lists_take_no_memory_policy) {
  fo_cuda_shim::state().launches.clear();
  fcu::Launch l{};
  l.rows.dtype = DType::kBFloat16;
  l.rows.state_dtype = DType::kFloat32;
  for (int p = 0; p < fc::kNumPolicies; ++p) {
    l.rows.dtype = fc::kPolicies[p].param;
    l.rows.state_dtype = fc::kPolicies[p].state;
    l.rows.master = fc::kPolicies[p].master ? reinterpret_cast<void* const*>(&l) : nullptr;
    l.rng = fc::kPolicies[p].stochastic ? reinterpret_cast<int64_t* const*>(&l) : nullptr;
    FO_CHECK_EQ(fcu::policy_of(l), p);
    FO_CHECK_EQ(kLaunchers[kMuonId].by_policy[p](l, nullptr), cudaErrorInvalidValue) << p;
  }
  FO_CHECK(fo_cuda_shim::state().launches.empty());
}

}  // namespace fo_test
