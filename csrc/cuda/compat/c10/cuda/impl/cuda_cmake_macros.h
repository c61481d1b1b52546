// Stand-in for the header that a CUDA build of torch generates at configure time
// (c10/cuda/impl/cuda_cmake_macros.h.in) and a CPU-only torch wheel lacks. Put on the
// include path ONLY when the real one is missing (.ci/compile_cuda.sh, setup.py), so a
// CUDA build of torch always uses its own. It exists so the CUDA sources can be
// compile-checked against a CPU wheel; nothing built with it is meant to be loaded.
// Of the generated lines, torch 2.13's headers use only this one (newer templates add
// TORCH_CUDA_VERSION_MAJOR/MINOR/PATCH/BUILD, which no header we include reads).
#pragma once

#define C10_CUDA_BUILD_SHARED_LIBS
