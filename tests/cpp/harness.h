// A minimal self-contained test harness for the C++ unit tests (no GoogleTest: the
// build machines have no network access beyond PyPI and no system gtest).
//
//   FO_TEST(name) { FO_CHECK(cond) << "context"; FO_CHECK_EQ(a, b); }
//
// A failed check records file:line and the message and the test goes on, so one run
// lists every failure; each test prints at most kMaxReports failures in full and a
// count of the rest. The executable's exit status is non-zero when any check failed.
// `fused_optim_cpp_tests [substring]` runs only the tests whose name contains it;
// `--list` prints the names; FO_TEST_VERBOSE=1 makes some tests print what they measured
// (bit differences between variants, how far each option moves results).
#pragma once

#include <cstdint>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

namespace fo_test {

struct TestCase {
  const char* name;
  void (*fn)();
};

std::vector<TestCase>& registry();

struct Registrar {
  Registrar(const char* name, void (*fn)()) { registry().push_back({name, fn}); }
};

// Records one failed check; the message is streamed into it and flushed on destruction.
class Failure {
 public:
  Failure(const char* file, int line, const std::string& what);
  ~Failure();
  template <typename T>
  Failure& operator<<(const T& x) {
    msg_ << x;
    return *this;
  }

 private:
  std::ostringstream msg_;
};

// Swallows the streamed context of a check that passed.
struct Passed {
  template <typename T>
  Passed& operator<<(const T&) {
    return *this;
  }
};

// Counts checks (passed + failed) for the summary line.
void count_check();

}  // namespace fo_test

#define FO_TEST(name)                                                  \
  static void fo_test_##name();                                        \
  static const ::fo_test::Registrar fo_registrar_##name(#name, &fo_test_##name); \
  static void fo_test_##name()

// `if/else` so the streamed context is only evaluated on failure.
#define FO_CHECK(cond)                                                          \
  if (::fo_test::count_check(), (cond)) {                                       \
  } else                                                                        \
    ::fo_test::Failure(__FILE__, __LINE__, "FO_CHECK(" #cond ") failed: ")

#define FO_CHECK_EQ(a, b)                                                           \
  if (::fo_test::count_check(), (a) == (b)) {                                       \
  } else                                                                            \
    ::fo_test::Failure(__FILE__, __LINE__, "FO_CHECK_EQ(" #a ", " #b ") failed: ")   \
        << (a) << " vs " << (b) << " "

// Checks that `stmt` throws an exception of type `ex`.
#define FO_CHECK_THROWS(stmt, ex)                                                       \
  do {                                                                                 \
    bool fo_thrown_ = false;                                                           \
    try {                                                                              \
      stmt;                                                                            \
    } catch (const ex&) {                                                              \
      fo_thrown_ = true;                                                               \
    } catch (...) {                                                                    \
    }                                                                                  \
    FO_CHECK(fo_thrown_) << #stmt " did not throw " #ex;                               \
  } while (0)
