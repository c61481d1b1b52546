// Row-parallel passes over a bucket's tensor metadata (checks, pointer table, version
// bumps). See [note: cold tensor metadata] in csrc/ops_common.h: those passes wait on
// cache misses, one after another, and the second core halves the wait. Measured at
// 2,048 params x 16K (fp32 AdamW, dev machine, interleaved A/B steps): the step 3-4%
// faster with the checks and the eager entry's bumps split over both threads.
#pragma once

#include <cstddef>
#include <functional>

namespace fused_optim {

// Runs fn(begin, end) over [0, n), in pieces on the intra-op thread pool when n is at
// least kParallelRows, else on the calling thread. An exception thrown by fn reaches
// the caller. A function pointer of this type is what ops_common.h's checks take, so
// a translation unit without OpenMP (the CUDA op's host code) can pass none.
using RowRunner = void (*)(size_t n, const std::function<void(size_t, size_t)>& fn);

constexpr size_t kParallelRows = 256;

// The intra-op thread pool's runner (csrc/ops_cpu.cpp, built with OpenMP).
void parallel_rows(size_t n, const std::function<void(size_t, size_t)>& fn);

}  // namespace fused_optim
