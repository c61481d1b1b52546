#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu and the generated kernel units with `nvcc -c` for sm_80 and sm_90, the way
# torch.utils.cpp_extension would (torch's include paths, its common nvcc flags, its
# C++ ABI), without linking and without a GPU. Works with a CPU-only torch wheel: when
# torch lacks c10/cuda/impl/cuda_cmake_macros.h (CUDA builds of torch generate it), the
# stand-in under csrc/cuda/compat is put on the include path; otherwise it is not.
#
# Usage: .ci/compile_cuda.sh [python]     (default: $PYTHON, else python3)
# Env:   JOBS (parallel nvcc processes, default: number of CPUs)
#        NVCC (default: nvcc)
#        CUDA_ARCHS (default: "80 90")
#        CXX_STD (default: c++20, what torch 2.13's cpp_extension passes to nvcc)
#        KEEP_OBJECTS=DIR (write the objects there instead of a temporary directory)
#        ONLY=REGEX (compile only the files whose name matches, e.g. 'ops_cuda|adam_bf16')
# Prints one line per file (status, seconds, file); warnings and errors are shown in
# full after the summary. Exits 1 if any file fails to compile or warns.
set -euo pipefail

PY="${1:-${PYTHON:-python3}}"
NVCC="${NVCC:-nvcc}"
JOBS="${JOBS:-$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)}"
CUDA_ARCHS="${CUDA_ARCHS:-80 90}"
CXX_STD="${CXX_STD:-c++20}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

command -v "$NVCC" >/dev/null || { echo "compile_cuda: $NVCC not found" >&2; exit 1; }

# torch's include paths (one per line), its common nvcc flags and its C++ ABI.
TORCH_INFO="$("$PY" - <<'EOF'
import torch
from torch.utils import cpp_extension as ext
for p in ext.include_paths():
    print("INC", p)
for f in ext.COMMON_NVCC_FLAGS:
    print("FLAG", f)
print("ABI", int(torch._C._GLIBCXX_USE_CXX11_ABI))
print("VERSION", torch.__version__, torch.version.cuda)
EOF
)" || { echo "compile_cuda: cannot import torch with $PY" >&2; exit 1; }

INCLUDES=(-I"$ROOT/csrc" -I"$ROOT/csrc/include")
FLAGS=()
HAVE_MACROS=0
while read -r kind value; do
  case "$kind" in
    INC)
      INCLUDES+=(-isystem "$value")
      [[ -f "$value/c10/cuda/impl/cuda_cmake_macros.h" ]] && HAVE_MACROS=1
      ;;
    FLAG) FLAGS+=("$value") ;;
    ABI) FLAGS+=("-D_GLIBCXX_USE_CXX11_ABI=$value") ;;
    VERSION) TORCH_VERSION="$value" ;;
  esac
done <<<"$TORCH_INFO"
if [[ $HAVE_MACROS == 0 ]]; then
  INCLUDES+=(-isystem "$ROOT/csrc/cuda/compat")
  SHIM="with csrc/cuda/compat (torch lacks c10/cuda/impl/cuda_cmake_macros.h)"
else
  SHIM="without shim"
fi

GENCODE=()
for arch in $CUDA_ARCHS; do GENCODE+=(-gencode "arch=compute_${arch},code=sm_${arch}"); done

# setup.py's flags plus those torch's CUDAExtension adds; -Werror=all-warnings makes any
# nvcc/cudafe/ptxas warning fail the check (torch's headers are -isystem: not ours).
NVCC_FLAGS=(-c "-std=$CXX_STD" -O3 "${GENCODE[@]}" "${FLAGS[@]}"
  -DFUSED_OPTIM_WITH_CUDA=1 -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C
  -Xcompiler -fPIC -Xcompiler -Wall -Xcompiler -Wextra --Werror all-warnings)

OBJ_DIR="${KEEP_OBJECTS:-$(mktemp -d)}"
LOG_DIR="$(mktemp -d)"
GEN_DIR="$(mktemp -d)"
if [[ -z "${KEEP_OBJECTS:-}" ]]; then trap 'rm -rf "$OBJ_DIR" "$LOG_DIR" "$GEN_DIR"' EXIT; else
  mkdir -p "$OBJ_DIR"; trap 'rm -rf "$LOG_DIR" "$GEN_DIR"' EXIT; fi

# The hand-written units and the generated kernel units (one per optimizer and dtype,
# csrc/cuda/instantiate.py), written to a temporary directory.
"$PY" csrc/cuda/instantiate.py "$GEN_DIR" >/dev/null
mapfile -t SOURCES < <({ ls csrc/cuda/*.cu; ls "$GEN_DIR"/*.cu; } | sort |
                        grep -E "${ONLY:-.}" || true)
(( ${#SOURCES[@]} )) || { echo "compile_cuda: no file matches ONLY='${ONLY:-}'" >&2; exit 1; }
NVCC_RELEASE="$("$NVCC" --version | grep -o 'release [0-9.]*')"
echo "compile_cuda: ${#SOURCES[@]} files, sm_{${CUDA_ARCHS// /,}}, $CXX_STD, $JOBS jobs," \
  "torch ${TORCH_VERSION:-?}, nvcc $NVCC_RELEASE, $SHIM"

elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# One line per file: status, wall seconds, CPU seconds (user + sys of nvcc and its
# children; the wall time grows when the machine is shared, the CPU time does not).
compile_one() {
  local src="$1" name status wall user sys
  name="$(basename "$src" .cu)"
  local TIMEFORMAT='%R %U %S'
  if { time "$NVCC" "${NVCC_FLAGS[@]}" "${INCLUDES[@]}" "$src" -o "$OBJ_DIR/$name.o" \
      >"$LOG_DIR/$name.log" 2>&1; } 2>"$LOG_DIR/$name.time"; then
    status=ok
  else
    status=FAIL
  fi
  read -r wall user sys <"$LOG_DIR/$name.time"
  [[ $status == ok && -s "$LOG_DIR/$name.log" ]] && status=WARN
  printf '%-4s %6.1f s wall %6.1f s cpu  %s\n' "$status" "$wall" \
    "$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.1f", u + s }')" "$src"
  [[ $status == ok ]] || touch "$LOG_DIR/$name.failed"
}

T0=$(date +%s.%N)
running=0
for src in "${SOURCES[@]}"; do
  compile_one "$src" &
  running=$((running + 1))
  if ((running >= JOBS)); then wait -n; running=$((running - 1)); fi
done
wait

failed=0
for src in "${SOURCES[@]}"; do
  name="$(basename "$src" .cu)"
  if [[ -e "$LOG_DIR/$name.failed" || -s "$LOG_DIR/$name.log" ]]; then
    echo "---- $src"
    cat "$LOG_DIR/$name.log"
  fi
  [[ -e "$LOG_DIR/$name.failed" ]] && failed=1
done
printf 'compile_cuda: %s in %s s wall\n' "$([[ $failed == 0 ]] && echo ok || echo FAILED)" \
  "$(elapsed "$T0")"
exit "$failed"
