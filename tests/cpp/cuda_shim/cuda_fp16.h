// Stand-in for CUDA's <cuda_fp16.h> in the host emulation of the CUDA engine: see
// tests/cpp/cuda_shim.h. Only tests/cpp/test_cuda_engine.cpp has this directory on its
// include path.
#pragma once

#include "../cuda_shim.h"
