// Every optimizer of the table (optimizer_table.h) through the kernels of every CPU
// variant this machine runs, for fp32, fp64, fp16 and bf16 storage, against its scalar
// reference (reference.h):
//  - every option case of the entry (Adam: amsgrad, maximize, L2 / decoupled / no weight
//    decay, grad_scale incl. non-powers of two, odd betas / eps, float32 and bfloat16 lr
//    tensors; SGD: momentum 0 / non-zero, dampening, nesterov, first step, weight decay,
//    maximize, grad_scale);
//  - one bucket holding every awkward size (0 .. 2*kChunkSize+3), per-tensor state
//    differing within the call, buffers misaligned by 0..7 elements and fenced by guards;
//  - the chunk list of csrc/ops_cpu.cpp handed over in one call or in slices;
//  - every variant agrees bit for bit with the portable one.
// And the table itself: it covers every registered optimizer, its entries agree with
// their structs, its cases vary every option, and math::LrMath rounds as torch does.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <set>
#include <string>
#include <vector>

#include "engine_fixture.h"
#include "fused_optim/math/stages.h"
#include "harness.h"

namespace fo_test {

// [note: adding an optimizer to the C++ tests]: an optimizer of FO_FOR_EACH_OPTIMIZER
// without an entry fails here by name, unless no_cpp_reference_yet() lists it.
FO_TEST(optimizer_table_covers_every_registered_optimizer) {
  const std::vector<std::string>& registry = registered_optimizers();
  FO_CHECK_EQ(static_cast<int>(registry.size()), fused_optim::kNumOptimizers);
  for (int id = 0; id < static_cast<int>(registry.size()); ++id) {
    int entries = 0;
    for (const OptimizerEntry& e : optimizer_table()) entries += e.id == id;
    const std::vector<std::string>& pending = no_cpp_reference_yet();
    const bool listed = std::find(pending.begin(), pending.end(), registry[id]) != pending.end();
    FO_CHECK(entries == 1 || (entries == 0 && listed))
        << registry[id] << " (id " << id << ") has " << entries
        << " entries in tests/cpp/optimizer_table.cpp"
        << (listed ? " and is listed in no_cpp_reference_yet()" : "")
        << ": add one (see [note: adding an optimizer to the C++ tests])";
    if (listed && entries == 0) {
      std::printf("  NOTE: %s has no C++ reference yet: the C++ engine tests skip it\n",
                  registry[id].c_str());
    }
  }
  for (const std::string& name : no_cpp_reference_yet()) {
    FO_CHECK(std::find(registry.begin(), registry.end(), name) != registry.end())
        << name << " is listed in no_cpp_reference_yet() but is not registered";
  }
}

// The entries as their structs and the ops layer see them; the CPU kernels of every
// registered optimizer exist in every variant.
FO_TEST(optimizer_table_entries_match_their_structs) {
  for (const OptimizerEntry& e : optimizer_table()) {
    FO_CHECK(e.id >= 0 && e.id < fused_optim::kNumOptimizers) << e.name;
    FO_CHECK_EQ(e.param_list, 0) << e.name << ": params first, as the ops take them";
    FO_CHECK_EQ(e.list_names[e.param_list], std::string("params")) << e.name;
    FO_CHECK_EQ(e.list_names[e.grad_list], std::string("grads")) << e.name;
    FO_CHECK(e.maximize_flag >= 0) << e.name << ": every torch.optim optimizer has maximize";
    FO_CHECK((e.optional_lists & (fm::bit(e.param_list) | fm::bit(e.grad_list))) == 0) << e.name;
    FO_CHECK(e.n_states <= fm::kMaxStates) << e.name;
    FO_CHECK(static_cast<int>(e.float_names.size()) <= fm::kMaxFloats) << e.name;
    FO_CHECK(static_cast<int>(e.flag_names.size()) <= fm::kMaxFlags) << e.name;
  }
  for (const std::string& variant : fc::supported_capabilities()) {
    for (int id = 0; id < fused_optim::kNumOptimizers; ++id) {
      FO_CHECK(fc::kernels_for(variant).chunks[id] != nullptr) << variant << " id " << id;
    }
  }
}

// Each entry's cases vary every float and flag of its schema, scaled and unscaled grads,
// every optional list present and absent, and their names are distinct: the option
// tests below then meet every option. (That each change is visible through the
// tolerance is tolerance_has_teeth's job.)
FO_TEST(optimizer_cases_cover_every_option) {
  for (const OptimizerEntry& e : optimizer_table()) {
    std::set<std::string> names;
    for (const OptCase& c : e.cases) {
      FO_CHECK(names.insert(c.name).second) << e.name << ": duplicate case " << c.name;
      const uint32_t lists = e.lists(c.args);
      FO_CHECK((lists & fm::bit(e.param_list)) && (lists & fm::bit(e.grad_list))) << c.name;
      FO_CHECK((lists & ~(fm::bit(e.n_lists) - 1)) == 0) << c.name;
      FO_CHECK_EQ(lists | e.optional_lists, (fm::bit(e.n_lists) - 1) | e.optional_lists)
          << e.name << " " << c.name << ": a required list is absent";
    }
    for (size_t f = 0; f < e.float_names.size(); ++f) {
      std::set<double> values;
      for (const OptCase& c : e.cases) values.insert(c.args.floats[f]);
      FO_CHECK(values.size() >= 2) << e.name << ": no case varies " << e.float_names[f];
    }
    for (size_t f = 0; f < e.flag_names.size(); ++f) {
      std::set<bool> values;
      for (const OptCase& c : e.cases) values.insert(c.args.flags[f]);
      FO_CHECK(values.size() == 2) << e.name << ": no case varies " << e.flag_names[f];
    }
    std::set<bool> scaled;
    std::set<uint32_t> optional;
    for (const OptCase& c : e.cases) {
      scaled.insert(c.scaled);
      optional.insert(e.lists(c.args) & e.optional_lists);
    }
    FO_CHECK(scaled.size() == 2) << e.name << ": grad scale not varied";
    for (int k = 0; k < e.n_lists; ++k) {
      if (!(e.optional_lists & fm::bit(k))) continue;
      bool with = false, without = false;
      for (uint32_t o : optional) (o & fm::bit(k) ? with : without) = true;
      FO_CHECK(with && without) << e.name << ": " << e.list_names[k]
                                << " not both present and absent";
    }
    FO_CHECK_EQ(e.lists(e.engine_case.args) & e.optional_lists, e.optional_lists)
        << e.name << ": the engine case must have every optional list";
    FO_CHECK(e.engine_case.scaled) << e.name << ": the engine case must scale grads";
  }
}

// Optim::advance (what the engines apply) is torch's state update as the entry states
// it, over a range of states.
FO_TEST(optimizer_advance_matches_torch_state_update) {
  for (const OptimizerEntry& e : optimizer_table()) {
    for (const OptCase& c : e.cases) {
      for (int steps_done : {0, 1, 5}) {
        const std::vector<double> before = states_before(e, c.args, 12, steps_done);
        const std::vector<double> a = advanced(e, c.args, before, true);
        const std::vector<double> b = advanced(e, c.args, before, false);
        FO_CHECK(a == b) << e.name << " " << c.name;
        if (e.n_states > 0) {
          FO_CHECK(a != before) << e.name << ": the state never changes";
        }
      }
    }
  }
}

namespace {

// One case of one optimizer on one dtype: every variant, checked against the reference,
// then bit for bit against the portable variant. The slicing rotates with the case so
// each mode meets every option.
void run_case_all_variants(const OptimizerEntry& e, const OptCase& c, int case_index, DType d) {
  const std::vector<std::string> variants = fc::supported_capabilities();
  const Bucket input = make_bucket(e, c, d, awkward_sizes(), mixed_offset,
                                   1000u * case_index + static_cast<unsigned>(d));
  const Expected x = reference_step(e, c, input, 0);
  std::vector<Bucket> results;
  for (size_t v = 0; v < variants.size(); ++v) {
    const Slicing s = static_cast<Slicing>((case_index + v) % 3);
    const std::string ctx = ctx_of(e, c, d, variants[v] + ", " + slicing_name(s));
    results.push_back(cpu_run(fc::kernels_for(variants[v]), e, c, input, mixed_offset, 0, s));
    // Every ISA variant gives the portable variant's bits: the same IEEE operations in
    // the same order (no FMA contraction: setup.py's -ffp-contract=off), vectorized or
    // not. The first is checked against the reference; a variant with the same bits
    // passes it too, one that differs is checked again to say where.
    const int64_t diff = v == 0 ? 0 : count_bit_differences(results[0], results[v]);
    if (v > 0 && std::getenv("FO_TEST_VERBOSE")) {
      std::printf("  %s %s %s: %s vs %s: %lld stored values differ in bits\n", e.name.c_str(),
                  c.name.c_str(), dtype_name(d), variants[v].c_str(), variants[0].c_str(),
                  static_cast<long long>(diff));
    }
    FO_CHECK_EQ(diff, 0) << ctx << " vs " << variants[0];
    if (v == 0 || diff != 0) check_bucket(results[v], input, x, ctx);
    FO_CHECK_EQ(results[v].damaged_guard_bytes(), 0) << ctx;
  }
}

void all_optimizers_all_cases(DType d) {
  for (const OptimizerEntry& e : optimizer_table()) {
    for (size_t i = 0; i < e.cases.size(); ++i) {
      run_case_all_variants(e, e.cases[i], static_cast<int>(i), d);
    }
  }
}

}  // namespace

FO_TEST(optimizers_fp32_all_options_all_variants) { all_optimizers_all_cases(DType::kFloat32); }
FO_TEST(optimizers_fp64_all_options_all_variants) { all_optimizers_all_cases(DType::kFloat64); }
FO_TEST(optimizers_fp16_all_options_all_variants) { all_optimizers_all_cases(DType::kFloat16); }
FO_TEST(optimizers_bf16_all_options_all_variants) { all_optimizers_all_cases(DType::kBFloat16); }

// Several consecutive steps on one bucket: the lists written by step k are what step k+1
// reads, and each tensor's state moves on. Each step is checked against the reference
// applied to the stored state before it, so storage rounding does not accumulate into
// the tolerance.
// Every variant takes each step from the same bucket and must give the portable
// variant's bits, which are checked against the reference.
FO_TEST(optimizers_several_steps_carry_state) {
  const std::vector<std::string> variants = fc::supported_capabilities();
  for (const OptimizerEntry& e : optimizer_table()) {
    for (DType d : kAllDTypes) {
      Bucket b = make_bucket(e, e.step_case(0), d, {1, 17, kChunkSize + 5}, mixed_offset,
                             77 + static_cast<unsigned>(d));
      for (int step = 0; step < 3; ++step) {
        const OptCase c = e.step_case(step);
        const Slicing s = step == 1 ? Slicing::kEachChunkReversed : Slicing::kUnevenSlices;
        const std::string ctx = ctx_of(e, c, d, "step " + std::to_string(step + 1));
        Bucket first = cpu_run(fc::kernels_for(variants[0]), e, c, b, mixed_offset, step, s);
        check_bucket(first, b, reference_step(e, c, b, step), ctx + " " + variants[0]);
        for (size_t v = 1; v < variants.size(); ++v) {
          const Bucket r = cpu_run(fc::kernels_for(variants[v]), e, c, b, mixed_offset, step, s);
          FO_CHECK_EQ(count_bit_differences(r, first), 0) << ctx << " " << variants[v];
          FO_CHECK_EQ(r.damaged_guard_bytes(), 0) << ctx << " " << variants[v];
        }
        b = std::move(first);
      }
    }
  }
}

// math::LrMath ([note: lr arithmetic] in stages.h) against float arithmetic done here:
// a float32 lr's mul / div / sub are the float operations on float operands; float16 /
// bfloat16 round that float result once more (oracles of test_util.h); float64 passes
// everything through.
namespace {

bool same_double(double a, double b) {
  return (std::isnan(a) && std::isnan(b)) || (a == b && std::signbit(a) == std::signbit(b));
}
double via_half(float f) { return oracle_half_to_float(oracle_float_to_half(f)); }
double via_bf16(float f) { return oracle_bf16_to_float(oracle_float_to_bf16(f)); }

// Both signs, exponents -30 .. 19: fp16 overflow (> 65504) and subnormals (< 2^-14) included.
double wide_random(Rng& rng) {
  const double sign = rng.chance(0.5) ? -1 : 1;
  return sign * std::ldexp(rng.uniform(1, 2), static_cast<int>(rng.uniform(-30, 20)));
}

}  // namespace

FO_TEST(lr_math_rounds_as_lr_tensors_do) {
  using fm::LrDType;
  using fm::LrMath;
  const LrMath f64{LrDType::kFloat64}, f32{LrDType::kFloat32}, f16{LrDType::kFloat16},
      bf16{LrDType::kBFloat16};
  Rng rng(7);
  for (int i = 0; i < 200000; ++i) {
    const double a = wide_random(rng);
    const double b = rng.chance(0.3) ? 1.0 : wide_random(rng);
    const float fa = static_cast<float>(a), fb = static_cast<float>(b);
    const float mul = fa * fb, div = fa / fb, sub = fa - fb;
    FO_CHECK(same_double(f32.mul(a, b), mul)) << a << " * " << b;
    FO_CHECK(same_double(f32.div(a, b), div)) << a << " / " << b;
    FO_CHECK(same_double(f32.sub(a, b), sub)) << a << " - " << b;
    FO_CHECK(same_double(f16.mul(a, b), via_half(mul))) << a << " * " << b << " (fp16)";
    FO_CHECK(same_double(f16.div(a, b), via_half(div))) << a << " / " << b << " (fp16)";
    FO_CHECK(same_double(f16.sub(a, b), via_half(sub))) << a << " - " << b << " (fp16)";
    FO_CHECK(same_double(bf16.mul(a, b), via_bf16(mul))) << a << " * " << b << " (bf16)";
    FO_CHECK(same_double(bf16.div(a, b), via_bf16(div))) << a << " / " << b << " (bf16)";
    FO_CHECK(same_double(bf16.sub(a, b), via_bf16(sub))) << a << " - " << b << " (bf16)";
    FO_CHECK(same_double(f64.mul(a, b), a * b) && same_double(f64.div(a, b), a / b) &&
             same_double(f64.sub(a, b), a - b))
        << a << ", " << b << " (fp64)";
  }
  // Every fp16 tie (to its upper neighbour; 65520 to inf) and a float either side of it,
  // and bf16 ties over the whole exponent range: LrMath::result against the oracles.
  for (uint32_t h = 0; h < 0x7c00; ++h) {
    const float x = oracle_half_to_float(static_cast<uint16_t>(h));
    const float up = h == 0x7bff ? 65536.0f : oracle_half_to_float(static_cast<uint16_t>(h + 1));
    const float mid = static_cast<float>((static_cast<double>(x) + up) / 2);
    for (float f : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, INFINITY), -mid}) {
      FO_CHECK(same_double(f16.result(f), via_half(f))) << f << " (fp16)";
    }
  }
  for (uint32_t hi = 0; hi < 0x7f80; hi += 7) {
    for (uint32_t lo : {0x8000u, 0x7fffu, 0x8001u}) {
      const float f = bits_f32((hi << 16) | lo);
      FO_CHECK(same_double(bf16.result(f), via_bf16(f))) << f << " (bf16)";
      FO_CHECK(same_double(bf16.result(-f), via_bf16(-f))) << -f << " (bf16)";
    }
  }
  // Hand values: the float32 product of 0.1 and 0.3 is not the double one; NaN, inf and
  // signed zeros pass through every dtype.
  FO_CHECK(f32.mul(0.1, 0.3) == static_cast<double>(0.1f * 0.3f) && f32.mul(0.1, 0.3) != 0.1 * 0.3);
  FO_CHECK_EQ(f16.result(65520.0), INFINITY);  // the tie at fp16's max goes to inf
  FO_CHECK_EQ(f16.result(65519.0), 65504.0);
  FO_CHECK_EQ(f16.result(0x1.8p-24), 0x1.0p-23);              // 1.5 x min subnormal -> 2 (even)
  FO_CHECK_EQ(bf16.result(3.3961775292304957e38), INFINITY);  // bf16 max + half an ulp
  for (const LrMath& m : {f64, f32, f16, bf16}) {
    FO_CHECK(std::isnan(m.result(std::numeric_limits<double>::quiet_NaN())));
    FO_CHECK_EQ(m.result(-INFINITY), -INFINITY);
    FO_CHECK(same_double(m.result(-0.0), -0.0));
  }
  // float64: no rounding at all, operands included; float32 rounds a Python float operand.
  FO_CHECK_EQ(f64.operand(0.1), 0.1);
  FO_CHECK_EQ(f32.operand(0.1), static_cast<double>(0.1f));
  FO_CHECK_EQ(f64.result(1.0 / 3.0), 1.0 / 3.0);
}

}  // namespace fo_test
