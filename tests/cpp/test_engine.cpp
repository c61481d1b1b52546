// The CPU multi-tensor engine itself, through every variant's kernels and every optimizer
// of the table (optimizer_table.h): chunks are independent (any slicing gives the same
// bits), results do not depend on the alignment of the buffers, empty inputs do nothing,
// NaN scalars stay NaN through bf16 / fp16 rounding, and the fp16 / bf16 storage paths
// (F16C and the bf16 integer rounding in the vector variants, scalar tails) convert
// exactly as the oracles do. Also checks that the tolerances of the option tests are
// tight enough to see every option.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "engine_fixture.h"
#include "harness.h"

namespace fo_test {

// The same chunks handed over in one call, one chunk per call in reverse order, or in
// uneven slices (with empty calls in between) give bitwise identical results: a chunk
// carries everything it needs, as one thread of a parallel region would see it.
FO_TEST(engine_chunk_slicing_gives_identical_bits) {
  for (const std::string& variant : fc::supported_capabilities()) {
    const fc::KernelSet& k = fc::kernels_for(variant);
    for (const OptimizerEntry& e : optimizer_table()) {
      const OptCase& c = e.engine_case;
      for (DType d : kAllDTypes) {
        const Bucket in = make_bucket(e, c, d, awkward_sizes(), mixed_offset,
                                      5 + static_cast<unsigned>(d));
        const Bucket one = cpu_run(k, e, c, in, mixed_offset, 0, Slicing::kOneCall);
        for (Slicing s : {Slicing::kEachChunkReversed, Slicing::kUnevenSlices}) {
          const Bucket r = cpu_run(k, e, c, in, mixed_offset, 0, s);
          FO_CHECK_EQ(count_bit_differences(one, r), 0)
              << ctx_of(e, c, d, variant + ", " + slicing_name(s));
        }
      }
    }
  }
}

// Every base pointer misaligned by 0..7 elements (all lists alike, and mixed per list):
// each run is checked against the reference with its guards, and must give the same
// bits as the aligned run -- an element's result may not depend on whether it lands in
// a vector body, a peeled prologue or a scalar tail, or results would change with the
// allocator.
FO_TEST(engine_alignment_offsets_match_reference_and_aligned_bits) {
  const std::vector<int64_t> sizes = {1, 7, 9, 17, 33, 513, kChunkSize + 1};
  static int (*const offsets[])(int, int) = {
      offset_zero,
      [](int, int) { return 1; }, [](int, int) { return 2; }, [](int, int) { return 3; },
      [](int, int) { return 4; }, [](int, int) { return 5; }, [](int, int) { return 6; },
      [](int, int) { return 7; }, mixed_offset,
      [](int l, int t) { return (7 * l + t) % 8; }};
  for (const std::string& variant : fc::supported_capabilities()) {
    const fc::KernelSet& k = fc::kernels_for(variant);
    for (const OptimizerEntry& e : optimizer_table()) {
      const OptCase& c = e.engine_case;
      for (DType d : kAllDTypes) {
        const Bucket in = make_bucket(e, c, d, sizes, offset_zero, 11 + static_cast<unsigned>(d));
        const Expected x = reference_step(e, c, in, 0);
        const Bucket aligned = cpu_run(k, e, c, in, offset_zero, 0, Slicing::kOneCall);
        for (size_t o = 0; o < sizeof(offsets) / sizeof(offsets[0]); ++o) {
          const std::string ctx = ctx_of(e, c, d, variant + ", offsets #" + std::to_string(o));
          const Bucket r = cpu_run(k, e, c, in, offsets[o], 0, Slicing::kOneCall);
          check_bucket(r, in, x, ctx);
          FO_CHECK_EQ(count_bit_differences(r, aligned), 0) << ctx;
        }
      }
    }
  }
}

// No tensors, only empty tensors, or an empty chunk range: nothing is read or written.
FO_TEST(engine_empty_inputs_do_nothing) {
  for (const std::string& variant : fc::supported_capabilities()) {
    const fc::KernelSet& k = fc::kernels_for(variant);
    for (const OptimizerEntry& e : optimizer_table()) {
      const OptCase& c = e.engine_case;
      const Layout lay = layout_for(e, c);
      for (DType d : kAllDTypes) {
        const std::string ctx = ctx_of(e, c, d, variant);
        // Zero tensors: a table with no pointers at all, no state.
        const fc::TensorTable none{0, lay.n_rows, nullptr, nullptr, d};
        const std::vector<double> no_states;
        k.chunks[e.id](none, step_call(e, c, no_states), nullptr, 0, 0);
        // Empty tensors between guards.
        Bucket b = make_bucket(e, c, d, {0, 0, 0}, mixed_offset, 1);
        const std::vector<double> states = step_states(e, c, 3, 0, true);
        run_cpu(k, e, b, step_call(e, c, states), Slicing::kOneCall);
        FO_CHECK_EQ(b.damaged_guard_bytes(), 0) << ctx;
        // A non-empty bucket, but an empty range of its chunks.
        const Bucket in = make_bucket(e, c, d, {5, kChunkSize + 2}, mixed_offset, 3);
        Bucket s = clone_bucket(in, mixed_offset);
        const std::vector<double> st = step_states(e, c, 2, 0, true);
        const std::vector<Chunk> chunks = make_chunks(s.numels);
        const fc::TensorTable table = s.table();
        for (int64_t ch = 0; ch <= static_cast<int64_t>(chunks.size()); ++ch) {
          k.chunks[e.id](table, step_call(e, c, st), chunks.data(), ch, ch);
        }
        FO_CHECK_EQ(count_bit_differences(in, s), 0) << ctx;
        FO_CHECK_EQ(s.damaged_guard_bytes(), 0) << ctx;
      }
    }
  }
}

// The chunk list covers every element exactly once, in order, in pieces of at most
// kChunkSize (a property of the test's copy of make_chunks, which mirrors
// csrc/ops_cpu.cpp; the kernels rely on it).
FO_TEST(engine_chunk_list_covers_each_element_once) {
  const std::vector<int64_t> sizes = awkward_sizes();
  const std::vector<Chunk> chunks = make_chunks(sizes);
  std::vector<int64_t> covered(sizes.size(), 0);
  for (const Chunk& c : chunks) {
    FO_CHECK(c.begin < c.end && c.end - c.begin <= kChunkSize);
    FO_CHECK_EQ(c.begin, covered[c.tensor]);
    covered[c.tensor] = c.end;
  }
  for (size_t t = 0; t < sizes.size(); ++t) FO_CHECK_EQ(covered[t], sizes[t]);
  // sizes 1..33 (10), 511..513 (3), kChunkSize +- 1 (1 + 1 + 2), 2 * kChunkSize + 3 (3)
  FO_CHECK_EQ(static_cast<int64_t>(chunks.size()), 10 + 3 + 1 + 1 + 2 + 3);
}

// A NaN lr leaves NaN params, a NaN grad scale NaNs in every list the kernel writes, in
// every variant, for bf16 and fp16 storage (see nan_scalar_cases in engine_fixture.h).
FO_TEST(engine_nan_scalars_stay_nan) {
  for (const std::string& variant : fc::supported_capabilities()) {
    const fc::KernelSet& k = fc::kernels_for(variant);
    for (const OptimizerEntry& e : optimizer_table()) {
      for (const NanScalarCase& n : nan_scalar_cases(e)) {
        for (DType d : kNanScalarDTypes) {
          const Bucket in = make_bucket(e, n.c, d, nan_scalar_sizes(), offset_zero, 5);
          const Bucket r = cpu_run(k, e, n.c, in, offset_zero, 0, Slicing::kOneCall);
          check_nan_scalar_step(e, n, d, r, variant);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Storage conversions through the kernels, with SGD (a conversion test needs an update
// whose float result is known exactly). SGD without momentum computes
// param + (-lr) * grad in fp32 and stores it: with lr = 0 and grad = 1 that is
// param + (-0), the identity on every value (+0 + -0 = +0), so the stored param is the
// round trip storage -> float -> storage; with lr = -1 it is the float sum param + grad
// (a single rounding, with or without FMA contraction), so the stored param is the
// conversion of a float we can compute here, e.g. an exact midpoint between two
// storage values.

namespace {

std::vector<uint16_t> all_patterns() {
  std::vector<uint16_t> v(0x10000);
  for (uint32_t i = 0; i < 0x10000; ++i) v[i] = static_cast<uint16_t>(i);
  return v;
}

bool is_nan_bits(DType d, uint16_t x) {
  return d == DType::kFloat16 ? ((x & 0x7c00) == 0x7c00 && (x & 0x3ff) != 0)
                              : ((x & 0x7f80) == 0x7f80 && (x & 0x7f) != 0);
}

// One SGD step (no momentum, no weight decay) over `params` with grads `grads`.
std::vector<uint16_t> sgd_storage_step(const fc::KernelSet& k, DType d, double lr,
                                       const std::vector<uint16_t>& params,
                                       const std::vector<uint16_t>& grads, int offset,
                                       int64_t* damaged) {
  using fm::Sgd;
  const OptimizerEntry& e = entry_for_id(optimizer_id<Sgd>());
  const int64_t n = static_cast<int64_t>(params.size());
  Bucket b(d, 2, {n}, [offset](int, int) { return offset; });
  for (int64_t i = 0; i < n; ++i) {
    b.at(Sgd::kParam, 0).set_bits(i, params[i]);
    b.at(Sgd::kGrad, 0).set_bits(i, grads[i]);
  }
  OptCase c{"sgd", {}, false, 1.0f};
  c.args.lr = lr;
  c.args.lr_dtype = fm::LrDType::kFloat64;
  const std::vector<double> no_states;
  run_cpu(k, e, b, step_call(e, c, no_states), Slicing::kOneCall);
  std::vector<uint16_t> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint16_t>(b.at(Sgd::kParam, 0).bits(i));
  *damaged = b.damaged_guard_bytes();
  for (int64_t i = 0; i < n; ++i) {
    if (b.at(Sgd::kGrad, 0).bits(i) != grads[i]) ++*damaged;  // grads are read-only here
  }
  return out;
}

uint16_t one_bits(DType d) { return d == DType::kFloat16 ? 0x3c00 : 0x3f80; }

float storage_to_float(DType d, uint16_t x) {
  return d == DType::kFloat16 ? oracle_half_to_float(x) : oracle_bf16_to_float(x);
}

uint16_t float_to_storage(DType d, float f) {
  return d == DType::kFloat16 ? oracle_float_to_half(f) : oracle_float_to_bf16(f);
}

}  // namespace

// Every 16-bit pattern survives load -> fp32 -> store bit for bit (F16C / vector body and
// scalar tails alike, aligned and not); a NaN stays a NaN of the same sign (bf16 keeps
// its payload too, quieted by the addition: x86 sets the quiet bit, bf16's bit 6).
FO_TEST(engine_half_and_bf16_round_trip_every_pattern) {
  const std::vector<uint16_t> params = all_patterns();
  for (const std::string& variant : fc::supported_capabilities()) {
    const fc::KernelSet& k = fc::kernels_for(variant);
    for (DType d : {DType::kFloat16, DType::kBFloat16}) {
      const std::vector<uint16_t> grads(params.size(), one_bits(d));
      for (int offset : {0, 3}) {
        int64_t damaged = 0;
        const std::vector<uint16_t> out = sgd_storage_step(k, d, 0.0, params, grads, offset,
                                                           &damaged);
        FO_CHECK_EQ(damaged, 0);
        for (size_t i = 0; i < params.size(); ++i) {
          const uint16_t p = params[i];
          if (is_nan_bits(d, p)) {
            FO_CHECK(is_nan_bits(d, out[i]) && (out[i] ^ p) < 0x8000 &&
                     (d == DType::kFloat16 || out[i] == (p | 0x0040)))
                << dtype_name(d) << " [" << variant << "] NaN " << p << " -> " << out[i];
          } else {
            FO_CHECK(out[i] == p) << dtype_name(d) << " [" << variant << "] offset " << offset
                                  << ": pattern " << p << " came back as " << out[i];
          }
        }
      }
    }
  }
}

// param + grad for every finite storage value and grads of a half, a quarter and three
// quarters of its ulp (both signs): exact midpoints must round to even, the rest to
// nearest, 65504 + 16 to inf for fp16; expected values from the oracles.
FO_TEST(engine_half_and_bf16_store_rounds_to_nearest_even) {
  for (const std::string& variant : fc::supported_capabilities()) {
    const fc::KernelSet& k = fc::kernels_for(variant);
    for (DType d : {DType::kFloat16, DType::kBFloat16}) {
      std::vector<uint16_t> params, grads;
      for (uint32_t x = 0; x < 0x10000; ++x) {
        const uint16_t p = static_cast<uint16_t>(x);
        const float pv = storage_to_float(d, p);
        if (!std::isfinite(pv)) continue;
        const double ulp = storage_ulp(d, pv);
        for (double frac : {0.5, -0.5, 0.25, -0.75}) {
          params.push_back(p);
          grads.push_back(float_to_storage(d, static_cast<float>(frac * ulp)));
        }
      }
      int64_t inexact = 0;
      for (int offset : {0, 5}) {
        int64_t damaged = 0;
        const std::vector<uint16_t> out =
            sgd_storage_step(k, d, -1.0, params, grads, offset, &damaged);
        FO_CHECK_EQ(damaged, 0);
        for (size_t i = 0; i < params.size(); ++i) {
          const float sum = storage_to_float(d, params[i]) + storage_to_float(d, grads[i]);
          const uint16_t want = float_to_storage(d, sum);
          inexact += offset == 0 && storage_to_float(d, float_to_storage(d, sum)) != sum;
          FO_CHECK(out[i] == want) << dtype_name(d) << " [" << variant << "] offset " << offset
                                   << ": " << storage_to_float(d, params[i]) << " + "
                                   << storage_to_float(d, grads[i]) << " = " << sum
                                   << " stored as " << out[i] << ", oracle " << want;
        }
      }
      // Most cases must be inexact (ties or not), or the test would not test rounding.
      FO_CHECK(inexact > static_cast<int64_t>(params.size()) / 2) << inexact << " inexact sums";
    }
  }
}

// ---------------------------------------------------------------------------------------
// Teeth: with the tests' arguments, changing any one option (each entry's `teeth` list)
// moves most elements of some output by more than the allowed error, even for bf16, the
// loosest dtype. Otherwise a kernel that ignores the option would pass the option tests.
FO_TEST(tolerance_has_teeth) {
  constexpr int kElements = 4096;
  for (const OptimizerEntry& e : optimizer_table()) {
    FO_CHECK(!e.teeth.empty()) << e.name << " has no teeth";
    for (const Teeth& th : e.teeth) {
      for (DType d : kAllDTypes) {
        if (th.fp64_only && d != DType::kFloat64) continue;
        // Inputs as stored in d (what the kernels would read), from the first case's fill.
        Rng rng(21);
        Bucket one(d, 1, {1}, offset_zero);
        const std::vector<double> sa =
            step_state(e, th.a.args, states_before(e, th.a.args, 1, th.steps_done), false);
        const std::vector<double> sb = step_state(
            e, th.b.args, states_before(e, th.b.args, 1, th.steps_done + th.state_shift), false);
        const float* scale_a = th.a.scaled ? &th.a.grad_scale : nullptr;
        const float* scale_b = th.b.scaled ? &th.b.grad_scale : nullptr;
        int64_t moved = 0;
        double x[kMaxLists];
        for (int i = 0; i < kElements; ++i) {
          e.fill(rng, th.a, x);
          for (int k = 0; k < e.n_lists; ++k) {
            one.at(0, 0).set(0, x[k]);
            x[k] = one.at(0, 0).get(0);
          }
          const bool ext = d == DType::kFloat64;
          const ElemRef ra = e.reference(th.a.args, sa.data(), scale_a, x, ext);
          const ElemRef rb = e.reference(th.b.args, sb.data(), scale_b, x, ext);
          moved += std::fabs(ra.value[th.list] - rb.value[th.list]) >
                   allowed_error(d, ra.value[th.list], ra.mag[th.list]);
        }
        const double frac = static_cast<double>(moved) / kElements;
        if (std::getenv("FO_TEST_VERBOSE")) {
          std::printf("  teeth %-5s %-38s %s %.3f\n", e.name.c_str(), th.what.c_str(),
                      dtype_name(d), frac);
        }
        FO_CHECK(frac >= th.min_fraction)
            << e.name << " " << th.what << " " << dtype_name(d) << ": only " << frac
            << " of elements of " << e.list_names[th.list] << " move beyond the tolerance";
      }
    }
  }
}

}  // namespace fo_test
