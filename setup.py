"""Builds fused_optim._C from csrc/ and maps triton_kernels/ and bench/ into the package.

Install with torch already present and without build isolation (an isolated build would
fetch a different torch): ``pip install --no-build-isolation -e .`` (``make build``).

Environment:
  FUSED_OPTIM_NO_EXTENSION 1: declare no extension (the Makefile's editable install, which
                           only maps the packages; it builds _C in place separately,
                           with `setup.py build_ext --inplace`, so rebuilds are
                           incremental in ./build).
  FUSED_OPTIM_BUILD_CUDA   auto (default): build csrc/cuda when torch is a CUDA build and
                           nvcc is found; 1: require it; 0: skip it.
  MAX_JOBS                 parallel compile jobs (torch.utils.cpp_extension).
"""

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(*patterns):
    # The same globs as CMakeLists.txt: there is no hand-kept list of sources.
    out = []
    for pattern in patterns:
        out += sorted(glob.glob(os.path.join("csrc", pattern)))
    return out


def _want_cuda(torch_version_cuda):
    mode = os.environ.get("FUSED_OPTIM_BUILD_CUDA", "auto").lower()
    if mode in ("0", "off", "no", "false"):
        return False
    have_nvcc = shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))
    able = torch_version_cuda is not None and have_nvcc
    if mode in ("1", "on", "yes", "true") and not able:
        raise RuntimeError(
            "FUSED_OPTIM_BUILD_CUDA=1 but the CUDA backend cannot be built: "
            f"torch.version.cuda={torch_version_cuda!r}, nvcc found={have_nvcc}"
        )
    return able


def _generate_cuda_units():
    import importlib.util

    path = os.path.join(ROOT, "csrc", "cuda", "instantiate.py")
    spec = importlib.util.spec_from_file_location("fused_optim_instantiate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write(os.path.join(ROOT, "csrc", "cuda", "generated"))


def _torch_libstdcxx():
    """The shared C++ runtime (libstdc++.so.6) this process loaded with torch, or None.

    _C must use torch's: exceptions, strings and streams cross between the two. A
    toolchain whose libstdc++ is static only (GCC 13.3 in /opt/gcc on the H200 machine:
    bench/results/nvidia-h200/NOTES.md) otherwise links a private copy into _C, whose
    locale is never initialized, and the first error message that formats an integer
    crashes. Named on the link line before the driver's implicit -lstdc++, the shared
    runtime defines every symbol it has; the static archive then adds nothing of it.
    """
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libstdc++.so") and os.path.isfile(path):
                    return path
    except OSError:
        pass
    return None


def _extensions():
    if os.environ.get("FUSED_OPTIM_NO_EXTENSION") == "1":
        return []
    import torch
    from torch.utils import cpp_extension

    # -fno-math-errno lets sqrt vectorize; nothing later may re-enable errno (a
    # -fno-fast-math after it does). -fno-trapping-math lets GCC if-convert selects
    # whose arms hold FP arithmetic (with trapping math it keeps them as branches, and
    # the bf16 Adam loop stayed scalar: 5.8 vs 0.6 ns/element); results are unchanged,
    # we never read FP exception flags. -ffp-contract=off keeps a * b + c as two
    # roundings, as torch's kernels compute it: with GCC's default (fast) the AVX2 variant
    # fused 1557 multiply-adds and disagreed in the last bit with the portable variant on
    # ~10% of values, and with torch on 6x more elements. -g0 undoes the -g in Python's own CFLAGS: a
    # smaller .so and a faster build. -fopenmp at compile time only: at::parallel_for
    # is inline and runs its `#pragma omp parallel` only when compiled with OpenMP
    # (with -fopenmp-simd it silently ran serially: 1 thread). Not linking libgomp
    # ourselves, the GOMP_* calls bind at load time to the OpenMP runtime libtorch_cpu
    # already loaded, so there is one thread pool and torch.set_num_threads applies.
    # The C++ standard is left to torch.utils.cpp_extension (C++20 for torch 2.13, whose
    # headers need it).
    cxx_flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off",
                 "-fopenmp", "-g0"]
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    # csrc/*.cpp: the torch-facing ops and module; csrc/cpu/*.cpp: the torch-free
    # engine, kernels and ISA dispatch (also linked alone by the C++ unit tests).
    sources = _sources("*.cpp", "cpu/*.cpp")
    libstdcxx = _torch_libstdcxx()
    link_args = [libstdcxx] if libstdcxx else []

    if _want_cuda(torch.version.cuda):
        # The kernels: one generated unit per optimizer and dtype (csrc/cuda/instantiate.py).
        _generate_cuda_units()
        sources += _sources("cuda/*.cu", "cuda/*.cpp", "cuda/generated/*.cu")
        # No --use_fast_math: sqrt and division must round as torch's do. The target
        # architectures come from TORCH_CUDA_ARCH_LIST (default: the visible GPUs).
        nvcc_flags = ["-O3"]
        return [
            cpp_extension.CUDAExtension(
                "fused_optim._C",
                sources,
                include_dirs=include_dirs,
                define_macros=[("FUSED_OPTIM_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                extra_link_args=link_args,
            )
        ]
    return [
        cpp_extension.CppExtension(
            "fused_optim._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_args,
        )
    ]


def main():
    from torch.utils.cpp_extension import BuildExtension

    setup(
        packages=["fused_optim", "fused_optim.triton_kernels", "fused_optim.bench"],
        package_dir={
            "fused_optim": "fused_optim",
            # Shipped inside our package: a top-level `triton_kernels` module name is
            # taken by another project.
            "fused_optim.triton_kernels": "triton_kernels",
            "fused_optim.bench": "bench",
        },
        package_data={"fused_optim.bench": ["shapes/*.json"]},
        ext_modules=_extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
