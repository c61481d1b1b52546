// Adam / AdamW and SGD kernels of every CPU variant this machine runs, for fp32, fp64,
// fp16 and bf16 storage, against the scalar reference (reference.h):
//  - every option: amsgrad, maximize, L2 / decoupled / no weight decay, grad_scale;
//    SGD momentum 0 / non-zero, dampening, nesterov, first step, weight decay;
//  - one bucket holding every awkward size (0 .. 2*kChunkSize+3), per-tensor steps,
//    buffers misaligned by 0..7 elements and fenced by guard bytes;
//  - the chunk list of csrc/ops_cpu.cpp handed over in one call or in slices;
//  - every variant agrees with the portable one within the same tolerance.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "engine_fixture.h"
#include "harness.h"

namespace fo_test {
namespace {

const AdamHyper kAdamBase{/*lr=*/0.1, /*beta1=*/0.9, /*beta2=*/0.999, /*weight_decay=*/0.0,
                          /*eps=*/1e-8, /*amsgrad=*/false, /*maximize=*/false,
                          WeightDecay::kNone};

AdamHyper adam_with(double wd, WeightDecay mode, bool amsgrad, bool maximize) {
  AdamHyper h = kAdamBase;
  h.weight_decay = wd;
  h.weight_decay_mode = mode;
  h.amsgrad = amsgrad;
  h.maximize = maximize;
  return h;
}

// lr 0.1 and weight decay 0.3 make every option move fp16/bf16 params by many ulps
// (lr 1e-3 would hide a wrong formula inside one bf16 ulp).
std::vector<AdamCase> adam_cases() {
  std::vector<AdamCase> cases = {
      {"adam", adam_with(0.0, WeightDecay::kNone, false, false), false, 1.0f},
      {"adam_l2", adam_with(0.3, WeightDecay::kL2, false, false), false, 1.0f},
      {"adamw", adam_with(0.3, WeightDecay::kDecoupled, false, false), false, 1.0f},
      {"adamw_wd0", adam_with(0.0, WeightDecay::kDecoupled, false, false), false, 1.0f},
      {"adam_none_mode_ignores_wd", adam_with(0.3, WeightDecay::kNone, false, false), false,
       1.0f},
      {"adam_amsgrad", adam_with(0.0, WeightDecay::kNone, true, false), false, 1.0f},
      {"adam_amsgrad_l2", adam_with(0.3, WeightDecay::kL2, true, false), false, 1.0f},
      {"adamw_amsgrad", adam_with(0.3, WeightDecay::kDecoupled, true, false), false, 1.0f},
      {"adam_maximize", adam_with(0.0, WeightDecay::kNone, false, true), false, 1.0f},
      {"adam_maximize_l2", adam_with(0.3, WeightDecay::kL2, false, true), false, 1.0f},
      {"adamw_maximize_amsgrad", adam_with(0.3, WeightDecay::kDecoupled, true, true), false,
       1.0f},
      {"adam_grad_scale_pow2", adam_with(0.3, WeightDecay::kL2, false, false), true, 1024.0f},
      {"adamw_grad_scale_3_amsgrad_maximize", adam_with(0.3, WeightDecay::kDecoupled, true, true),
       true, 3.0f},
  };
  // Other betas and a large eps, so no constant is silently hard-wired.
  AdamHyper odd = adam_with(0.3, WeightDecay::kL2, true, false);
  odd.beta1 = 0.5;
  odd.beta2 = 0.99;
  odd.eps = 1e-2;
  odd.lr = 0.05;
  cases.push_back({"adam_odd_betas_eps", odd, true, 0.5f});
  return cases;
}

SgdHyper sgd_with(double momentum, double dampening, double wd, bool nesterov, bool maximize,
                  bool first) {
  return SgdHyper{/*lr=*/0.1, momentum, dampening, wd, nesterov, maximize, first};
}

std::vector<SgdCase> sgd_cases() {
  return {
      {"sgd", sgd_with(0, 0, 0, false, false, false), false, 1.0f},
      {"sgd_wd", sgd_with(0, 0, 0.2, false, false, false), false, 1.0f},
      {"sgd_maximize_wd", sgd_with(0, 0, 0.2, false, true, false), false, 1.0f},
      // momentum 0 with nesterov / first-step flags set: they must not matter.
      {"sgd_flags_without_momentum", sgd_with(0, 0.5, 0, true, false, true), false, 1.0f},
      {"sgd_momentum_first_step", sgd_with(0.9, 0, 0, false, false, true), false, 1.0f},
      {"sgd_momentum_first_step_dampening_ignored", sgd_with(0.9, 0.25, 0.2, false, false, true),
       false, 1.0f},
      {"sgd_momentum", sgd_with(0.9, 0, 0, false, false, false), false, 1.0f},
      {"sgd_momentum_dampening_wd", sgd_with(0.9, 0.25, 0.2, false, false, false), false, 1.0f},
      {"sgd_nesterov_first_step", sgd_with(0.9, 0, 0.2, true, false, true), false, 1.0f},
      {"sgd_nesterov", sgd_with(0.9, 0, 0.2, true, false, false), false, 1.0f},
      {"sgd_nesterov_maximize", sgd_with(0.8, 0, 0, true, true, false), false, 1.0f},
      {"sgd_grad_scale_no_momentum", sgd_with(0, 0, 0.2, false, false, false), true, 1024.0f},
      {"sgd_grad_scale_momentum_3", sgd_with(0.9, 0.25, 0.2, false, true, false), true, 3.0f},
      {"sgd_grad_scale_nesterov_first", sgd_with(0.9, 0, 0, true, false, true), true, 0.25f},
  };
}

std::string context(const char* alg, const char* name, DType d, const std::string& variant,
                    Slicing s) {
  return std::string(alg) + " " + name + " " + dtype_name(d) + " [" + variant + ", " +
         slicing_name(s) + "]";
}

// One case on one dtype: every variant, checked against the reference, then against the
// portable variant. The slicing rotates with the case so each mode meets every option.
template <typename Case, typename Fill, typename Expect, typename Run, typename MakeCall>
void run_case_all_variants(const char* alg, const Case& c, int case_index, DType d, int lists,
                           Fill fill, Expect expect, Run run, MakeCall make_call) {
  const std::vector<std::string> variants = fc::supported_capabilities();
  Bucket input(d, lists, awkward_sizes(), mixed_offset);
  fill(input, c, 1000u * case_index + static_cast<unsigned>(d));
  const Expected e = expect(input, c);
  std::vector<Bucket> results;
  for (size_t v = 0; v < variants.size(); ++v) {
    const Slicing s = static_cast<Slicing>((case_index + v) % 3);
    Bucket b = clone_bucket(input, mixed_offset);
    run(fc::kernels_for(variants[v]), b, make_call(c, b), s);
    check_bucket(b, input, e, context(alg, c.name, d, variants[v], s));
    results.push_back(std::move(b));
  }
  // All variants agree with the portable one (the reference check bounds each against
  // the exact result; this states the cross-variant contract directly).
  for (size_t v = 1; v < results.size(); ++v) {
    if (std::getenv("FO_TEST_VERBOSE")) {
      std::printf("  %s %s %s: %s vs %s: %lld of %lld stored values differ in bits\n", alg,
                  c.name, dtype_name(d), variants[v].c_str(), variants[0].c_str(),
                  static_cast<long long>(count_bit_differences(results[0], results[v])),
                  static_cast<long long>(input.bufs.size() ? [&] {
                    int64_t n = 0;
                    for (int64_t x : input.numels) n += x;
                    return n * lists;
                  }() : 0));
    }
    for (int l = 0; l < lists; ++l) {
      if (e.unchanged[l]) continue;
      int64_t k = 0;
      for (int64_t t = 0; t < input.n_tensors(); ++t) {
        for (int64_t i = 0; i < input.numels[t]; ++i, ++k) {
          const double a = results[0].at(l, t).get(i), b = results[v].at(l, t).get(i);
          const double tol = allowed_error(d, e.value[l][k], e.mag[l][k]);
          FO_CHECK(std::fabs(a - b) <= tol)
              << alg << " " << c.name << " " << dtype_name(d) << ": " << variants[v] << " vs "
              << variants[0] << " differ at " << e.list_names[l] << " of tensor " << t
              << " element " << i << ": " << b << " vs " << a;
        }
      }
    }
  }
}

void adam_all_cases(DType d) {
  const std::vector<AdamCase> cases = adam_cases();
  const std::vector<double> steps = adam_steps(static_cast<int64_t>(awkward_sizes().size()));
  for (size_t i = 0; i < cases.size(); ++i) {
    run_case_all_variants(
        "adam", cases[i], static_cast<int>(i), d, adam_lists(cases[i].hyper), fill_adam,
        [&](const Bucket& in, const AdamCase& c) { return adam_expected(in, c, steps); },
        run_adam, [&](const AdamCase& c, const Bucket&) { return adam_call(c, steps); });
  }
}

void sgd_all_cases(DType d) {
  const std::vector<SgdCase> cases = sgd_cases();
  for (size_t i = 0; i < cases.size(); ++i) {
    run_case_all_variants("sgd", cases[i], static_cast<int>(i), d, sgd_lists(cases[i].hyper),
                          fill_sgd, sgd_expected, run_sgd,
                          [](const SgdCase& c, const Bucket&) { return sgd_call(c); });
  }
}

}  // namespace

FO_TEST(adam_fp32_all_options_all_variants) { adam_all_cases(DType::kFloat32); }
FO_TEST(adam_fp64_all_options_all_variants) { adam_all_cases(DType::kFloat64); }
FO_TEST(adam_fp16_all_options_all_variants) { adam_all_cases(DType::kFloat16); }
FO_TEST(adam_bf16_all_options_all_variants) { adam_all_cases(DType::kBFloat16); }
FO_TEST(sgd_fp32_all_options_all_variants) { sgd_all_cases(DType::kFloat32); }
FO_TEST(sgd_fp64_all_options_all_variants) { sgd_all_cases(DType::kFloat64); }
FO_TEST(sgd_fp16_all_options_all_variants) { sgd_all_cases(DType::kFloat16); }
FO_TEST(sgd_bf16_all_options_all_variants) { sgd_all_cases(DType::kBFloat16); }

// Several consecutive steps on one bucket: the state written by step k is what step k+1
// reads. Each step is checked against the reference applied to the stored state before
// it, so storage rounding does not accumulate into the tolerance.
FO_TEST(adam_and_sgd_several_steps_carry_state) {
  for (const std::string& variant : fc::supported_capabilities()) {
    const fc::KernelSet& k = fc::kernels_for(variant);
    for (DType d : kAllDTypes) {
      AdamCase ac{"adamw_amsgrad_3_steps", adam_with(0.3, WeightDecay::kDecoupled, true, false),
                  false, 1.0f};
      Bucket b(d, 5, {1, 17, kChunkSize + 5}, mixed_offset);
      fill_adam(b, ac, 77 + static_cast<unsigned>(d));
      for (int step = 0; step < 3; ++step) {
        const Bucket before = clone_bucket(b, mixed_offset);
        const std::vector<double> steps = adam_steps(b.n_tensors(), step);
        const Expected e = adam_expected(before, ac, steps);
        run_adam(k, b, adam_call(ac, steps), Slicing::kUnevenSlices);
        check_bucket(b, before, e,
                     "adamw amsgrad step " + std::to_string(step + 1) + " " + dtype_name(d) +
                         " [" + variant + "]");
      }

      SgdCase sc{"sgd_nesterov_3_steps", sgd_with(0.9, 0.1, 0.2, true, false, true), false, 1.0f};
      Bucket sb(d, 3, {1, 17, kChunkSize + 5}, mixed_offset);
      fill_sgd(sb, sc, 99 + static_cast<unsigned>(d));
      for (int step = 0; step < 3; ++step) {
        sc.hyper.is_first_step = step == 0;
        const Bucket before = clone_bucket(sb, mixed_offset);
        const Expected e = sgd_expected(before, sc);
        run_sgd(k, sb, sgd_call(sc), Slicing::kEachChunkReversed);
        check_bucket(sb, before, e,
                     "sgd nesterov step " + std::to_string(step + 1) + " " + dtype_name(d) +
                         " [" + variant + "]");
      }
    }
  }
}

}  // namespace fo_test
