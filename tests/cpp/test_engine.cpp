// The multi-tensor engine itself, through every variant's kernels: chunks are
// independent (any slicing gives the same bits), results do not depend on the
// alignment of the buffers, empty inputs do nothing, and the fp16 / bf16 storage paths
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
namespace {

AdamCase engine_adam_case() {
  return {"adam_amsgrad_l2_scaled_maximize",
          AdamHyper{0.1, 0.9, 0.999, 0.3, 1e-8, true, true, WeightDecay::kL2}, true, 3.0f};
}

SgdCase engine_sgd_case() {
  return {"sgd_nesterov_wd_scaled", SgdHyper{0.1, 0.9, 0.0, 0.2, true, false, false}, true, 2.0f};
}

int offset_zero(int, int) { return 0; }

}  // namespace

// The same chunks handed over in one call, one chunk per call in reverse order, or in
// uneven slices (with empty calls in between) give bitwise identical results: a chunk
// carries everything it needs, as one thread of a parallel region would see it.
FO_TEST(engine_chunk_slicing_gives_identical_bits) {
  const AdamCase ac = engine_adam_case();
  const SgdCase sc = engine_sgd_case();
  const std::vector<double> steps = adam_steps(static_cast<int64_t>(awkward_sizes().size()));
  for (const std::string& variant : fc::supported_capabilities()) {
    const fc::KernelSet& k = fc::kernels_for(variant);
    for (DType d : kAllDTypes) {
      Bucket in(d, 5, awkward_sizes(), mixed_offset);
      fill_adam(in, ac, 5 + static_cast<unsigned>(d));
      Bucket one = clone_bucket(in, mixed_offset);
      run_adam(k, one, adam_call(ac, steps), Slicing::kOneCall);
      for (Slicing s : {Slicing::kEachChunkReversed, Slicing::kUnevenSlices}) {
        Bucket b = clone_bucket(in, mixed_offset);
        run_adam(k, b, adam_call(ac, steps), s);
        FO_CHECK_EQ(count_bit_differences(one, b), 0)
            << "adam " << dtype_name(d) << " [" << variant << "] " << slicing_name(s);
      }
      Bucket sin(d, 3, awkward_sizes(), mixed_offset);
      fill_sgd(sin, sc, 6 + static_cast<unsigned>(d));
      Bucket sone = clone_bucket(sin, mixed_offset);
      run_sgd(k, sone, sgd_call(sc), Slicing::kOneCall);
      for (Slicing s : {Slicing::kEachChunkReversed, Slicing::kUnevenSlices}) {
        Bucket b = clone_bucket(sin, mixed_offset);
        run_sgd(k, b, sgd_call(sc), s);
        FO_CHECK_EQ(count_bit_differences(sone, b), 0)
            << "sgd " << dtype_name(d) << " [" << variant << "] " << slicing_name(s);
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
  const AdamCase ac = engine_adam_case();
  const SgdCase sc = engine_sgd_case();
  const std::vector<int64_t> sizes = {1, 7, 9, 17, 33, 513, kChunkSize + 1};
  const std::vector<double> steps = adam_steps(static_cast<int64_t>(sizes.size()));
  static int (*const offsets[])(int, int) = {
      offset_zero,
      [](int, int) { return 1; }, [](int, int) { return 2; }, [](int, int) { return 3; },
      [](int, int) { return 4; }, [](int, int) { return 5; }, [](int, int) { return 6; },
      [](int, int) { return 7; }, mixed_offset,
      [](int l, int t) { return (7 * l + t) % 8; }};
  for (const std::string& variant : fc::supported_capabilities()) {
    const fc::KernelSet& k = fc::kernels_for(variant);
    for (DType d : kAllDTypes) {
      Bucket ain(d, 5, sizes, offset_zero);
      fill_adam(ain, ac, 11 + static_cast<unsigned>(d));
      const Expected ae = adam_expected(ain, ac, steps);
      Bucket sin(d, 3, sizes, offset_zero);
      fill_sgd(sin, sc, 12 + static_cast<unsigned>(d));
      const Expected se = sgd_expected(sin, sc);
      Bucket aligned_a = clone_bucket(ain, offset_zero);
      run_adam(k, aligned_a, adam_call(ac, steps), Slicing::kOneCall);
      Bucket aligned_s = clone_bucket(sin, offset_zero);
      run_sgd(k, aligned_s, sgd_call(sc), Slicing::kOneCall);
      for (size_t o = 0; o < sizeof(offsets) / sizeof(offsets[0]); ++o) {
        const std::string ctx = std::string(dtype_name(d)) + " [" + variant + ", offsets #" +
                                std::to_string(o) + "]";
        Bucket a = clone_bucket(ain, offsets[o]);
        run_adam(k, a, adam_call(ac, steps), Slicing::kOneCall);
        check_bucket(a, ain, ae, "adam " + ctx);
        FO_CHECK_EQ(count_bit_differences(a, aligned_a), 0) << "adam " << ctx;
        Bucket s = clone_bucket(sin, offsets[o]);
        run_sgd(k, s, sgd_call(sc), Slicing::kOneCall);
        check_bucket(s, sin, se, "sgd " + ctx);
        FO_CHECK_EQ(count_bit_differences(s, aligned_s), 0) << "sgd " << ctx;
      }
    }
  }
}

// No tensors, only empty tensors, or an empty chunk range: nothing is read or written.
FO_TEST(engine_empty_inputs_do_nothing) {
  const AdamCase ac = engine_adam_case();
  const SgdCase sc = engine_sgd_case();
  for (const std::string& variant : fc::supported_capabilities()) {
    const fc::KernelSet& k = fc::kernels_for(variant);
    for (DType d : kAllDTypes) {
      // Zero tensors: a table with no pointers at all.
      const fc::TensorTable none{0, 5, nullptr, nullptr, d};
      const std::vector<double> no_steps;
      k.adam(none, adam_call(ac, no_steps), nullptr, 0, 0);
      const fc::TensorTable none_sgd{0, 3, nullptr, nullptr, d};
      k.sgd(none_sgd, sgd_call(sc), nullptr, 0, 0);
      // Empty tensors between guards.
      Bucket b(d, 5, {0, 0, 0}, mixed_offset);
      const std::vector<double> steps = adam_steps(3);
      run_adam(k, b, adam_call(ac, steps), Slicing::kOneCall);
      FO_CHECK_EQ(b.damaged_guard_bytes(), 0) << dtype_name(d) << " [" << variant << "]";
      FO_CHECK(make_chunks(b.numels).empty());
      // A non-empty bucket, but an empty range of its chunks.
      Bucket in(d, 3, {5, kChunkSize + 2}, mixed_offset);
      fill_sgd(in, sc, 3);
      Bucket s = clone_bucket(in, mixed_offset);
      const std::vector<Chunk> chunks = make_chunks(s.numels);
      const fc::TensorTable table = s.table();
      for (int64_t c = 0; c <= static_cast<int64_t>(chunks.size()); ++c) {
        k.sgd(table, sgd_call(sc), chunks.data(), c, c);
      }
      FO_CHECK_EQ(count_bit_differences(in, s), 0) << dtype_name(d) << " [" << variant << "]";
      FO_CHECK_EQ(s.damaged_guard_bytes(), 0);
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
  FO_CHECK_EQ(static_cast<int64_t>(chunks.size()), 10 + 3 + 1 + 1 + 2 + 3);  // sizes 1..33, 511..513, then the big ones
}

// ---------------------------------------------------------------------------------------
// Storage conversions through the kernels. SGD without momentum computes
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
  const int64_t n = static_cast<int64_t>(params.size());
  Bucket b(d, 2, {n}, [offset](int, int) { return offset; });
  for (int64_t i = 0; i < n; ++i) {
    b.at(0, 0).set_bits(i, params[i]);
    b.at(1, 0).set_bits(i, grads[i]);
  }
  fc::SgdCall call;
  call.hyper = SgdHyper{lr, 0.0, 0.0, 0.0, false, false, false};
  call.grad_scale = nullptr;
  run_sgd(k, b, call, Slicing::kOneCall);
  std::vector<uint16_t> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint16_t>(b.at(0, 0).bits(i));
  *damaged = b.damaged_guard_bytes();
  for (int64_t i = 0; i < n; ++i) {
    if (b.at(1, 0).bits(i) != grads[i]) ++*damaged;  // grads are read-only here
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

// [note: NaN in bf16 rounding] in kernels_impl.h: bf16 rounding adds to the bits of a
// float, which would carry a NaN whose float has a set low half into -0 or +0
// (0x7fffffff -> 0x8000). The kernels' own arithmetic never makes one; the scalars and
// the grad scale could, and the kernels replace those. A NaN lr (bits all ones, so its
// float's are too) or grad scale must leave NaNs, in the vector body and the tails.
FO_TEST(engine_bf16_nan_scalars_stay_nan) {
  double nan_lr;
  const uint64_t all_ones = 0x7fffffffffffffffull;
  std::memcpy(&nan_lr, &all_ones, sizeof(nan_lr));
  const float nan_scale = bits_f32(0x7fffffffu);
  const std::vector<int64_t> sizes = {1, 17, 4097};
  for (const std::string& variant : fc::supported_capabilities()) {
    const fc::KernelSet& k = fc::kernels_for(variant);
    for (bool scaled : {false, true}) {
      const double lr = scaled ? 0.1 : nan_lr;
      const std::string what = std::string(" [") + variant + "] NaN " +
                               (scaled ? "grad scale" : "lr") + ": ";
      // SGD with momentum (first step): param, grad (stored when scaled), buffer.
      Bucket sgd(DType::kBFloat16, 3, sizes, offset_zero);
      const SgdCase sc{"nan", SgdHyper{lr, 0.9, 0.0, 0.0, false, false, true}, scaled, 2.0f};
      fill_sgd(sgd, sc, 5);
      fc::SgdCall scall = sgd_call(sc);
      scall.grad_scale = scaled ? &nan_scale : nullptr;
      run_sgd(k, sgd, scall, Slicing::kOneCall);
      // AdamW: param always; grad, exp_avg and exp_avg_sq too when the grad is NaN.
      Bucket adam(DType::kBFloat16, 4, sizes, offset_zero);
      for (int l = 0; l < 4; ++l) {
        for (int64_t t = 0; t < adam.n_tensors(); ++t) {
          for (int64_t i = 0; i < sizes[t]; ++i) adam.at(l, t).set(i, 0.25 + 0.001 * (i % 97));
        }
      }
      const std::vector<double> steps(sizes.size(), 3.0);
      fc::AdamCall acall;
      acall.hyper = AdamHyper{lr, 0.9, 0.999, 0.01, 1e-8, false, false, WeightDecay::kDecoupled};
      acall.steps = steps.data();
      acall.grad_scale = scaled ? &nan_scale : nullptr;
      run_adam(k, adam, acall, Slicing::kOneCall);
      // NaN grads (scaled) make every written list NaN; a NaN lr the params (and SGD's
      // buffer, which is the grad on its first step, stays finite).
      const std::vector<int> sgd_nan = scaled ? std::vector<int>{0, 1, 2} : std::vector<int>{0};
      const std::vector<int> adam_nan =
          scaled ? std::vector<int>{0, 1, 2, 3} : std::vector<int>{0};
      for (int64_t t = 0; t < static_cast<int64_t>(sizes.size()); ++t) {
        for (int64_t i = 0; i < sizes[t]; ++i) {
          for (int l : sgd_nan) {
            const uint16_t b = static_cast<uint16_t>(sgd.at(l, t).bits(i));
            FO_CHECK(is_nan_bits(DType::kBFloat16, b))
                << "sgd" << what << "list " << l << " element " << i << " of size " << sizes[t]
                << " is " << b;
          }
          for (int l : adam_nan) {
            const uint16_t b = static_cast<uint16_t>(adam.at(l, t).bits(i));
            FO_CHECK(is_nan_bits(DType::kBFloat16, b))
                << "adamw" << what << "list " << l << " element " << i << " of size "
                << sizes[t] << " is " << b;
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
      int64_t ties = 0;
      for (int offset : {0, 5}) {
        int64_t damaged = 0;
        const std::vector<uint16_t> out =
            sgd_storage_step(k, d, -1.0, params, grads, offset, &damaged);
        FO_CHECK_EQ(damaged, 0);
        for (size_t i = 0; i < params.size(); ++i) {
          const float sum = storage_to_float(d, params[i]) + storage_to_float(d, grads[i]);
          const uint16_t want = float_to_storage(d, sum);
          ties += offset == 0 && storage_to_float(d, float_to_storage(d, sum)) != sum;
          FO_CHECK(out[i] == want) << dtype_name(d) << " [" << variant << "] offset " << offset
                                   << ": " << storage_to_float(d, params[i]) << " + "
                                   << storage_to_float(d, grads[i]) << " = " << sum
                                   << " stored as " << out[i] << ", oracle " << want;
        }
      }
      // Most cases must be inexact (ties or not), or the test would not test rounding.
      FO_CHECK(ties > static_cast<int64_t>(params.size()) / 2) << ties << " inexact sums";
    }
  }
}

// ---------------------------------------------------------------------------------------
// Teeth: with the tests' hyperparameters, turning any one option off (or on) moves most
// elements of some output by more than the allowed error, even for bf16, the loosest
// dtype. Otherwise a kernel that ignores the option would pass the option tests.
namespace {

double fraction_detectable(DType d, const Expected& a, const Expected& b, int list) {
  int64_t moved = 0, n = 0;
  for (size_t k = 0; k < a.value[list].size(); ++k, ++n) {
    moved += std::fabs(a.value[list][k] - b.value[list][k]) >
             allowed_error(d, a.value[list][k], a.mag[list][k]);
  }
  return n ? static_cast<double>(moved) / n : 0;
}

// FO_TEST_VERBOSE=1 prints the fractions (to re-derive the thresholds below).
void report_teeth(const char* alg, const char* what, DType d, double frac) {
  if (std::getenv("FO_TEST_VERBOSE")) {
    std::printf("  teeth %-4s %-16s %s %.3f\n", alg, what, dtype_name(d), frac);
  }
}

}  // namespace

FO_TEST(tolerance_has_teeth) {
  const std::vector<int64_t> sizes = {4096};
  const std::vector<double> steps = adam_steps(1);
  for (DType d : kAllDTypes) {
    const AdamCase base{"base", AdamHyper{0.1, 0.9, 0.999, 0.3, 1e-8, false, false,
                                          WeightDecay::kL2}, false, 1.0f};
    Bucket in(d, 5, sizes, offset_zero);
    fill_adam(in, base, 21);
    const Expected e0 = adam_expected(in, base, steps);
    struct Flip { const char* what; AdamCase c; int list; double min_fraction; };
    std::vector<Flip> flips;
    AdamCase c = base; c.hyper.amsgrad = true;  // max(vhat, v) != v for about half
    flips.push_back({"amsgrad", c, 0, 0.2});
    c = base; c.hyper.maximize = true;
    flips.push_back({"maximize", c, 0, 0.5});
    c = base; c.hyper.weight_decay_mode = WeightDecay::kDecoupled;
    flips.push_back({"L2 -> decoupled", c, 0, 0.5});
    c = base; c.hyper.weight_decay_mode = WeightDecay::kNone;
    flips.push_back({"L2 -> none", c, 2, 0.5});
    c = base; c.scaled = true; c.grad_scale = 2.0f;  // grads interpreted as scaled by 2
    flips.push_back({"grad_scale", c, 2, 0.5});
    c = base; c.hyper.beta1 = 0.8;
    flips.push_back({"beta1", c, 2, 0.5});
    for (const Flip& f : flips) {
      const Expected e1 = adam_expected(in, f.c, steps);
      const double frac = fraction_detectable(d, e0, e1, f.list);
      report_teeth("adam", f.what, d, frac);
      FO_CHECK(frac >= f.min_fraction) << "adam " << f.what << " " << dtype_name(d) << ": only "
                                       << frac << " of elements move beyond the tolerance";
    }
    // The per-tensor step count (bias corrections): step 1 vs step 3.
    const Expected e2 = adam_expected(in, base, adam_steps(1, 2));
    const double frac_step = fraction_detectable(d, e0, e2, 0);
    report_teeth("adam", "step 1 vs 3", d, frac_step);
    FO_CHECK(frac_step >= 0.5) << "adam step count " << dtype_name(d) << ": only " << frac_step;

    const SgdCase sbase{"base", SgdHyper{0.1, 0.9, 0.25, 0.2, false, false, false}, false, 1.0f};
    Bucket sin(d, 3, sizes, offset_zero);
    fill_sgd(sin, sbase, 22);
    const Expected s0 = sgd_expected(sin, sbase);
    struct SFlip { const char* what; SgdCase c; int list; };
    std::vector<SFlip> sflips;
    SgdCase s = sbase; s.hyper.nesterov = true;
    sflips.push_back({"nesterov", s, 0});
    s = sbase; s.hyper.is_first_step = true;
    sflips.push_back({"first step", s, 2});
    s = sbase; s.hyper.dampening = 0;
    sflips.push_back({"dampening", s, 2});
    s = sbase; s.hyper.weight_decay = 0;
    sflips.push_back({"weight decay", s, 2});
    s = sbase; s.hyper.maximize = true;
    sflips.push_back({"maximize", s, 0});
    s = sbase; s.scaled = true; s.grad_scale = 2.0f;
    sflips.push_back({"grad_scale", s, 2});
    for (const SFlip& f : sflips) {
      const Expected s1 = sgd_expected(sin, f.c);
      const double frac = fraction_detectable(d, s0, s1, f.list);
      report_teeth("sgd", f.what, d, frac);
      FO_CHECK(frac >= 0.5) << "sgd " << f.what << " " << dtype_name(d) << ": only " << frac
                            << " of elements move beyond the tolerance";
    }
  }
}

}  // namespace fo_test
