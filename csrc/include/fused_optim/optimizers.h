// Every optimizer the C++ backends run: its math header, and its name in the list the
// generic engines instantiate (the CPU kernel table of each instruction set, the CUDA
// kernels the build generates per optimizer and dtype, the op registry). Adding an
// optimizer adds one line to each (see README.md, "Adding an optimizer").
#pragma once

#include "fused_optim/math/adadelta.h"
#include "fused_optim/math/adagrad.h"
#include "fused_optim/math/adam.h"
#include "fused_optim/math/adamax.h"
#include "fused_optim/math/asgd.h"
#include "fused_optim/math/muon.h"
#include "fused_optim/math/nadam.h"
#include "fused_optim/math/radam.h"
#include "fused_optim/math/rmsprop.h"
#include "fused_optim/math/rprop.h"
#include "fused_optim/math/sgd.h"
#include "fused_optim/math/sparse_adam.h"

// X(Struct): the structs of fused_optim::math, in a fixed order (their ids).
#define FO_FOR_EACH_OPTIMIZER(X) \
  X(Adam)                        \
  X(Sgd)                         \
  X(Adagrad)                     \
  X(RMSprop)                     \
  X(Adadelta)                    \
  X(Adamax)                      \
  X(NAdam)                       \
  X(RAdam)                       \
  X(Asgd)                        \
  X(Rprop)                       \
  X(Muon)

// X(Struct): the row maths of the optimizers that take sparse grads ([note: row math] in
// fused_optim/math/optimizer.h), for the row-sparse engine.
#define FO_FOR_EACH_ROW_MATH(X) \
  X(SparseAdamRows)             \
  X(AdagradRows)                \
  X(SgdRows)

namespace fused_optim {

#define FO_COUNT_OPTIMIZER(Name) +1
constexpr int kNumOptimizers = 0 FO_FOR_EACH_OPTIMIZER(FO_COUNT_OPTIMIZER);
#undef FO_COUNT_OPTIMIZER

}  // namespace fused_optim
