// Runner of the C++ unit tests; see harness.h.
#include <chrono>
#include <cstdio>
#include <cstring>
#include <iostream>

#include "harness.h"

namespace fo_test {
namespace {

constexpr int kMaxReports = 8;
int64_t g_checks = 0;
int64_t g_failures = 0;       // in the current test
int64_t g_total_failures = 0;

}  // namespace

std::vector<TestCase>& registry() {
  static std::vector<TestCase> tests;
  return tests;
}

void count_check() { ++g_checks; }

Failure::Failure(const char* file, int line, const std::string& what) {
  const char* base = std::strrchr(file, '/');
  msg_ << (base ? base + 1 : file) << ":" << line << ": " << what;
}

Failure::~Failure() {
  ++g_failures;
  ++g_total_failures;
  if (g_failures <= kMaxReports) {
    std::cout << "    FAIL " << msg_.str() << "\n";
  } else if (g_failures == kMaxReports + 1) {
    std::cout << "    (further failures of this test are counted, not printed)\n";
  }
}

}  // namespace fo_test

int main(int argc, char** argv) {
  using fo_test::registry;
  const char* filter = nullptr;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--list") == 0) {
      for (const auto& t : registry()) std::cout << t.name << "\n";
      return 0;
    }
    filter = argv[i];
  }
  int ran = 0, failed = 0;
  const auto start_all = std::chrono::steady_clock::now();
  for (const auto& t : registry()) {
    if (filter && std::strstr(t.name, filter) == nullptr) continue;
    fo_test::g_failures = 0;
    const auto start = std::chrono::steady_clock::now();
    std::cout << "[ RUN  ] " << t.name << std::endl;
    try {
      t.fn();
    } catch (const std::exception& e) {
      fo_test::Failure(__FILE__, __LINE__, "uncaught exception: ") << e.what();
    }
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
            .count();
    ++ran;
    if (fo_test::g_failures) {
      ++failed;
      std::cout << "[ FAIL ] " << t.name << " (" << fo_test::g_failures << " failed checks, "
                << ms << " ms)" << std::endl;
    } else {
      std::cout << "[  OK  ] " << t.name << " (" << ms << " ms)" << std::endl;
    }
  }
  const double s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_all).count();
  std::cout << ran << " tests, " << failed << " failed, " << fo_test::g_checks << " checks, "
            << fo_test::g_total_failures << " failed checks, " << s << " s" << std::endl;
  if (ran == 0) {
    std::cout << "no test matched the filter" << std::endl;
    return 1;
  }
  return failed ? 1 : 0;
}
