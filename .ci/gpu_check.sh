#!/usr/bin/env bash
# make gpu-check: the checks that need a GPU, in one command, on a machine with one NVIDIA
# GPU (an H200) and no network, in under 9 minutes:
#
#   1. build     fused_optim._C with its CUDA kernels, in place (FUSED_OPTIM_BUILD_CUDA=1,
#                TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=nproc, `setup.py build_ext --inplace`)
#                with the machine's python3 (no venv, no pip install); prints the time.
#   2. tests     tests/test_cuda.py (the CUDA backend) after the build, and
#                tests/test_triton.py's compiled-kernel tests in the background during the
#                build (sm_90 PTX, a torch.compile trace; its interpreter tests are CI's).
#                test_cuda.py runs every optimizer on the "cuda" and "triton" backends, and
#                every memory policy (fused_optim/_policy.py) on "cuda" against the CPU
#                engine (tests/test_policy.py is not run here: it steps CPU tensors only,
#                CI's job; its CUDA counterparts are test_cuda.py's test_policy_*). Then a
#                smoke parity check that runs what those files do not: every optimizer
#                fused_optim exports, through fused_optim's classes, on every GPU backend
#                ("cuda", and "triton" as COMPILED kernels, asserted not interpreted), fp32
#                and bf16, against torch.optim's for-loop on the GPU, and a CUDA-graph
#                replay against eager steps; then every optimizer that takes sparse grads
#                (nn.Embedding(sparse=True)) on every GPU backend with a row-sparse engine
#                ("cuda" and "triton"), against torch.optim's class. Then the test files
#                of the steps that are not element-wise (tests/test_adafactor.py,
#                test_muon.py, test_lbfgs.py: their CUDA cases run where a GPU is).
#   3. bench     the GPU benchmark (python3 -m bench from the repo root, i.e. what
#                `fused-optim-bench` runs): AdamW, SGD and Adagrad (an optimizer fused_optim
#                does not have is skipped with a message), fp32 and bf16, on 8x128M (1B
#                elements, bandwidth-bound) and 8192x8K (64M elements in 8,192 tensors,
#                launch-bound), against torch-forloop/foreach/fused, once eager and once
#                with --cuda-graph; between them a sparse run: SparseAdam, SGD and Adagrad
#                on the embedding shapes (sparse grads, fp32: torch.optim's one
#                implementation against fused_optim[cuda] and [triton]); then
#                `fused-optim-bench adafactor|muon|lbfgs|policy --device cuda` (output in this
#                script's log only); JSON, PNG and log under bench/results/<gpu name>/.
#   4. summary   of every step; exit status 1 if the build, a test or the smoke check
#                failed, or a benchmark run failed (each later step still runs).
#
# Run it (repo root):   make gpu-check      or      bash .ci/gpu_check.sh
# Through the device tool (one command of <= 2000 characters, files back from $OUT):
#   FUSED_OPTIM_COMMIT=<sha>[-dirty] bash .ci/gpu_check.sh
# The copy there has no .git: FUSED_OPTIM_COMMIT names the commit in the results' JSON
# and file names ("nocommit" without it). With $OUT set, the files to commit are copied to
# $OUT/<gpu name>/ (the JSON, PNG and log of each benchmark run, and this script's log) and
# the full build and test output to $OUT/build_and_tests.log: 8 files at most (the device
# tool's limit): the JSONs, PNGs and this script's log first; a benchmark run's own log,
# whose text this script's log holds too, is left out past the limit (with all three runs,
# all three are). Commit them with `cp <files>/<gpu name>/* bench/results/<gpu name>/`.
#
# Time on an H200 (16 cores), measured at 87cdd47 (bench/results/nvidia-h200/NOTES.md):
# build 38 s, test_triton.py 47 s (during the build), test_cuda.py over 181 s (it hit its
# limit then: 240 s now), smoke 17 s, benchmark 75 s eager and 65 s graph. Every step
# has a time limit drawn from a budget of GPU_CHECK_BUDGET_S (540 s); a step that would not
# fit is skipped with a message: the sparse run (at most 90 s; run only with 30 s for
# itself and 55 s more for the graph run left) and the --cuda-graph run first.
#
# Memory: a benchmark case holds every provider's params, grads and states at once (the
# rounds interleave them). 1B fp32 AdamW: 16 GB per provider, 5 providers + inputs ~100 GB
# of the H200's ~140 GiB; the runner's estimate (~116 GB) must stay under
# --memory-fraction (0.9 here) of the free memory. Each case frees everything it made.
#
# Environment:
#   GPU_CHECK_DRY_RUN=1    rehearse on the CPU: no build (the extension already built
#                          here is used), the same test files (CUDA tests skip; only a few
#                          Triton tests), the smoke check on the CPU backends, and the same
#                          benchmark command lines with --device cpu and tiny shapes,
#                          results under $TMPDIR (not bench/results).
#   PYTHON                 the interpreter (default python3; e.g. .venv/bin/python here)
#   GPU_CHECK_OPTIMS       optimizers to benchmark (default adamw,sgd,adagrad)
#   GPU_CHECK_PROVIDERS    --providers (default torch,fused_optim[cuda],fused_optim[triton])
#   GPU_CHECK_SHAPES       --shapes (default 8x128M,8192x8K)
#   GPU_CHECK_SPARSE_OPTIMS    optimizers of the sparse run (default sparseadam,sgd,adagrad;
#                              set it empty for no sparse run)
#   GPU_CHECK_SPARSE_SHAPES    its --shapes (default embeddings: the three embedding shapes)
#   GPU_CHECK_SPARSE_PROVIDERS its --providers (default torch,fused_optim[cuda],fused_optim[triton])
#   GPU_CHECK_RESULTS      --out folder (default bench/results)
#   GPU_CHECK_BUDGET_S     the whole script's time budget in seconds (default 540)
#   GPU_CHECK_PYTEST_ARGS  extra pytest arguments for both test runs, shell-quoted
#                          (e.g. "-k 'not test_in_subprocess'")
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
DRY="${GPU_CHECK_DRY_RUN:-0}"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-540}"
export PYTHONUNBUFFERED=1
# fused_optim and bench import from the repo root, for pytest's subprocesses too.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
T0=$SECONDS

if [[ $DRY == 1 ]]; then
  DEVICE=cpu
  RESULTS="${GPU_CHECK_RESULTS:-${TMPDIR:-/tmp}/fused_optim_gpu_check_dry/results}"
  SHAPES="${GPU_CHECK_SHAPES:-4x64K,64x1K}"
  PROVIDERS="${GPU_CHECK_PROVIDERS:-torch,fused_optim[cpu]}"
  SPARSE_SHAPES="${GPU_CHECK_SPARSE_SHAPES:-emb4096x16:1024,emb4096x16:1024:32}"
  SPARSE_PROVIDERS="${GPU_CHECK_SPARSE_PROVIDERS:-torch,fused_optim[cpu]}"
  # The same command lines, tiny: a few rounds, a small probe.
  SIZING=(--warmup 1 --repeat 3 --min-repeat 2 --budget 0.2 --probe-numel 1048576)
else
  DEVICE=cuda
  RESULTS="${GPU_CHECK_RESULTS:-bench/results}"
  SHAPES="${GPU_CHECK_SHAPES:-8x128M,8192x8K}"
  PROVIDERS="${GPU_CHECK_PROVIDERS:-torch,fused_optim[cuda],fused_optim[triton]}"
  # Embedding(1M, 64) and (100K, 128): under a GiB per provider; milliseconds a step.
  SPARSE_SHAPES="${GPU_CHECK_SPARSE_SHAPES:-embeddings}"
  SPARSE_PROVIDERS="${GPU_CHECK_SPARSE_PROVIDERS:-torch,fused_optim[cuda],fused_optim[triton]}"
  # 1B elements: ~65 ms a round for 5 providers, ~12 rounds; 8,192 tensors: the for-loop
  # takes ~0.5-1 s a step there, so 1 warm-up + 3 timed rounds.
  SIZING=(--warmup 1 --repeat 15 --min-repeat 3 --budget 0.75 --memory-fraction 0.9)
fi

# Extra pytest arguments, word-split with the shell's quoting rules.
eval "PYTEST_EXTRA=(${GPU_CHECK_PYTEST_ARGS:-})"
left() { echo $(( BUDGET - (SECONDS - T0) )); }
min() { if (( $1 < $2 )); then echo "$1"; else echo "$2"; fi; }
# A step's time limit: min(cap, seconds left - reserve for the later steps), at least floor.
limit() { local v; v=$(min "$1" $(( $(left) - $2 ))); (( v < $3 )) && v=$3; echo "$v"; }
hr() { printf '\n==== %s  [t=%ds]\n' "$*" "$(( SECONDS - T0 ))"; }
pytest_line() {  # the last "N passed, M skipped ..." line of a pytest log
  grep -E '[0-9]+ (passed|failed|error|skipped|deselected)' "$1" 2>/dev/null | tail -n 1 \
    | sed -e 's/=//g' -e 's/^ *//' -e 's/ *$//'
}

main() {
  local rc_build=0 rc_cuda=0 rc_triton=0 rc_smoke=0 rc_eager=-1 rc_graph=-1 rc_sparse=-1
  local s_build=0 s_cuda=0 s_triton=0 s_smoke=0 s_eager=0 s_graph=0 s_sparse=0
  local rc_steps=-1 s_steps=0 rc_runners=-1 s_runners=0
  local t

  hr "gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ)$([[ $DRY == 1 ]] && echo ' (DRY RUN: CPU, tiny sizes, no build)')"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.mem \
      --format=csv,noheader
  fi
  "$PY" - <<'EOF'
import os, platform, sys
import torch
print(f"python {platform.python_version()} ({sys.executable}); torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}, GPU {torch.cuda.is_available()}); cpus {os.cpu_count()}")
try:
    import triton
    print(f"triton {triton.__version__}")
except Exception as e:  # noqa: BLE001
    print(f"triton: does not import ({type(e).__name__}: {e})")
EOF
  command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -n 1
  if [[ $DEVICE == cuda ]] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu-check: torch sees no GPU (set GPU_CHECK_DRY_RUN=1 to rehearse on the CPU)"
    return 2
  fi
  DEVDIR="$("$PY" - "$DEVICE" <<'EOF'
import sys
import torch
from bench.machine import results_dir
cuda = sys.argv[1] == "cuda"
print(results_dir({"device": sys.argv[1],
                   "gpu": {"name": torch.cuda.get_device_name()} if cuda else {}}))
EOF
)"
  echo "results: $RESULTS/$DEVDIR/   commit: $(git rev-parse --short=10 HEAD 2>/dev/null \
    || echo "${FUSED_OPTIM_COMMIT:-none (set FUSED_OPTIM_COMMIT)}")   work: $WORK"
  echo "DEVDIR=$DEVDIR" > "$WORK/vars"

  # ---- 2a. test_triton.py in the background while the build runs (no _C needed) ----
  local t_triton_limit; t_triton_limit=$(limit 300 160 60)
  # On the GPU: the tests of test_triton.py that compile real kernels (sm_90 PTX, the
  # torch.compile trace, the import without triton). Its interpreter tests are CI's (and
  # triton 3.6's interpreter, the GPU machine's, fails with its numpy 2.5: README of
  # triton_kernels); the compiled Triton backend on CUDA tensors is test_cuda.py's
  # (every optimizer, backend "triton") and the smoke check's.
  local triton_k=(-k "sm90 or torch_compile or without_triton")
  [[ $DRY == 1 ]] && triton_k=(-k "split_f64 or availability or step_dependent_scalars")
  (
    t=$SECONDS
    timeout -k 10 "$t_triton_limit" "$PY" -m pytest -q -p no:cacheprovider -rs \
      tests/test_triton.py "${triton_k[@]}" "${PYTEST_EXTRA[@]}" > "$WORK/test_triton.log" 2>&1
    echo "$? $(( SECONDS - t ))" > "$WORK/test_triton.rc"
  ) &
  local triton_pid=$!

  # ---- 1. build ----
  hr "1. build"
  if [[ $DRY == 1 ]]; then
    echo "dry run: build skipped; using the extension already built here"
    echo "(dry run: no build)" > "$WORK/build.log"
  else
    # A stale _C from an earlier call must not be tested if this build fails; ./build
    # stays, so a rebuild on a warm machine is incremental.
    rm -f fused_optim/_C*.so
    t=$SECONDS
    timeout -k 10 "$(limit 300 170 120)" env FUSED_OPTIM_BUILD_CUDA=1 \
      TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" "$PY" setup.py build_ext --inplace \
      > "$WORK/build.log" 2>&1
    rc_build=$?
    s_build=$(( SECONDS - t ))
    echo "build: exit $rc_build in ${s_build} s (log: build_and_tests.log)"
    if (( rc_build != 0 )); then
      grep -E -i -B2 -A3 'error|timed out' "$WORK/build.log" | tail -n 40
      (( rc_build == 124 )) && echo "build: TIMED OUT"
    fi
  fi
  "$PY" - "$DEVICE" <<'EOF' || { (( rc_build == 0 )) && rc_build=3; }
import sys
from fused_optim import _extension as e
if e.C is None:
    sys.exit(f"fused_optim._C does not load: {e.LOAD_ERROR}")
info = e.C.build_info()
print(f"fused_optim._C: {info}")
if sys.argv[1] == "cuda" and not e.has_kernels("CUDA"):
    sys.exit("fused_optim._C has no CUDA kernels")
EOF

  # ---- 2b. GPU tests ----
  hr "2. tests"
  local xdist=()
  if [[ $DRY != 1 ]] && "$PY" -c "import xdist" 2>/dev/null; then xdist=(-n 4); fi
  t=$SECONDS
  # Failures are logged as they happen (tests/conftest.py), so a run stopped at its
  # limit still names them; the slowest tests are listed to size the next run.
  FUSED_OPTIM_FAILURES_LOG="$WORK/test_cuda_failures.log" TORCHINDUCTOR_COMPILE_THREADS=1 \
    timeout -k 10 "$(limit 240 150 60)" "$PY" -m pytest -q -p no:cacheprovider -rs \
    --durations=25 "${xdist[@]}" tests/test_cuda.py "${PYTEST_EXTRA[@]}" \
    > "$WORK/test_cuda.log" 2>&1
  rc_cuda=$?
  s_cuda=$(( SECONDS - t ))
  echo "test_cuda.py: exit $rc_cuda in ${s_cuda} s: $(pytest_line "$WORK/test_cuda.log")"
  if (( rc_cuda != 0 && rc_cuda != 5 )); then
    grep -E '^(FAILED|ERROR)' "$WORK/test_cuda.log" | head -n 30
    grep -E '^FAILED' "$WORK/test_cuda_failures.log" 2>/dev/null | sort -u | head -n 40 \
      | sed 's/^/as it ran: /'
  fi
  (( rc_cuda == 5 )) && rc_cuda=0   # nothing collected

  t=$SECONDS
  timeout -k 10 "$(limit 90 130 30)" "$PY" - "$DEVICE" > "$WORK/smoke.log" 2>&1 <<'EOF'
"""Smoke parity on the device: every optimizer fused_optim exports, through its class,
on every backend available there (besides "reference"), against torch.optim's for-loop
on the same device; the Triton kernels compiled, not interpreted; a CUDA-graph replay
bit-equal to eager steps.

A result passes within TOL of the for-loop (max |p - p_ref| over max |p_ref|, the
benchmark's figure, after STEPS free-running steps from the benchmark's init) and below
the benchmark's wrong-result threshold, WRONG_FRACTION of a no-op step's figure
(bench/runner.py). TOL follows tests/_tables.py TOLERANCES:
  fp32  4 ulps per step (RMSprop 8), free-running x 3 steps: 12 (24) ulps = 1.4e-6
        (2.9e-6) at each element's row magnitude. The figure here is relative to the
        largest |param| instead, and rows (states, normalized updates) can be a few times
        that: 1e-5 = 84 ulps. Measured on the CPU backends (dry run): <= 1.6e-7.
  bf16  1 ulp per step against an fp64 oracle; here the oracle is torch's bf16 for-loop,
        which rounds to bf16 at every step as well, so the two may part by a rounding
        per step and carry it on: ~3 bf16 ulps (eps 2^-7 = 7.8e-3) over 3 steps;
        2e-2 = 2.6 eps of the largest |param|. Measured on the CPU backends (dry run):
        <= 1.1e-2 (RMSprop), <= 6.4e-3 for the others; err / no-op <= 0.15 (Adam).
Sparse grads (one Embedding(5003, 33) table, 4099 lookups a step over a quarter of its
rows, so rows repeat): the same tolerances, against torch.optim's class (its one
implementation for sparse grads), on the backends with a row-sparse engine.
"""
import sys
import warnings

import torch

import fused_optim
from bench.providers import GRAD_STD, PARAM_STD, Hyper, grads_reason, optimizers
from bench.runner import WRONG_FRACTION
from fused_optim.backends import get_backend

device = torch.device(sys.argv[1])
STEPS, SIZES = 3, [1, 3, 4099, 65537, 1 << 20]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # see the docstring
failures = 0
backends = [b for b, why in fused_optim.available_backends(device, torch.float32).items()
            if why is None and b != "reference"]
print(f"backends on {device}: {backends}")
if device.type == "cuda":
    if "triton" not in backends:
        print("FAIL triton backend unavailable on CUDA:",
              fused_optim.available_backends(device, torch.float32)["triton"])
        failures += 1
    else:
        from fused_optim import _triton_backend
        _triton_backend.load_kernels()
        if _triton_backend._kernels_interpreted():
            print("FAIL the Triton kernels are interpreted, not compiled")
            failures += 1
        else:
            print(f"triton kernels: compiled for {torch.cuda.get_device_name(device)}")


def data(dtype, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    p0 = [(torch.randn(n, generator=gen, device=device) * PARAM_STD).to(dtype) for n in SIZES]
    grads = [[(torch.randn(n, generator=gen, device=device) * GRAD_STD).to(dtype)
              for n in SIZES] for _ in range(STEPS)]
    return p0, grads


def run(make, p0, grads):
    ps = [torch.nn.Parameter(p.clone()) for p in p0]
    opt = make(ps)
    for step in grads:
        for p, g in zip(ps, step):
            p.grad = g.clone()
        opt.step()
    return ps


def rel_err(a, b):
    scale = max(x.detach().float().abs().max().item() for x in b)
    return max((x.detach().float() - y.detach().float()).abs().max().item()
               for x, y in zip(a, b)) / scale


for name, cls in optimizers().items():
    if grads_reason(name, False) is not None:
        print(f"skip {name} (dense grads): {grads_reason(name, False)}")
        continue
    hyper = Hyper.for_optim(name)
    kw = hyper.torch_kwargs()
    tcls = getattr(torch.optim, cls.__name__, None)
    if tcls is None:
        print(f"skip {name}: torch.optim has no {cls.__name__}")
        continue
    for dtype, tol in TOL.items():
        p0, grads = data(dtype)
        ref = run(lambda ps: tcls(ps, foreach=False, **kw), p0, grads)
        noop = rel_err(p0, ref)
        for b in backends:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    got = run(lambda ps: cls(ps, backend=b, **kw), p0, grads)
                err = rel_err(got, ref)
                ok = err <= tol and err < WRONG_FRACTION * noop
            except Exception as e:  # noqa: BLE001
                err, ok = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", False
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name:8s} {str(dtype)[6:]:8s} {b:7s} "
                  f"max err {err if isinstance(err, str) else f'{err:.1e}'} "
                  f"(tol {tol:g}; a no-op step shows {noop:.1e}, wrong from "
                  f"{WRONG_FRACTION:g}x that)")
        if device.type != "cuda" or dtype != torch.float32:
            continue
        for b in backends:  # one eager step, then 2 graph replays == 3 eager steps
            try:
                eager = run(lambda ps: cls(ps, backend=b, **kw), p0, [grads[0]] * 3)
                ps = [torch.nn.Parameter(p.clone()) for p in p0]
                for p, g in zip(ps, grads[0]):
                    p.grad = g.clone()
                opt = cls(ps, backend=b, **kw)
                opt.step()
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    opt.step()
                graph.replay()
                graph.replay()
                torch.cuda.synchronize()
                ok = all(torch.equal(a, c) for a, c in zip(ps, eager))
                what = "bit-equal" if ok else f"differs: max err {rel_err(ps, eager):.1e}"
            except Exception as e:  # noqa: BLE001
                ok, what = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name:8s} graph    {b:7s} replay vs eager: {what}")


def sparse_data(dtype, seed=0, rows=5003, dim=33, lookups=4099):
    """An embedding table and STEPS uncoalesced sparse grads of it, as
    nn.Embedding(sparse=True)'s backward makes them (indices [1, lookups])."""
    gen = torch.Generator(device=device).manual_seed(seed)
    p0 = (torch.randn(rows, dim, generator=gen, device=device) * PARAM_STD).to(dtype)
    grads = []
    for _ in range(STEPS):
        idx = torch.randint(0, rows // 4, (lookups,), generator=gen, device=device)
        values = (torch.randn(lookups, dim, generator=gen, device=device) * GRAD_STD).to(dtype)
        grads.append([torch.sparse_coo_tensor(idx[None], values, (rows, dim),
                                              check_invariants=True)])
    return [p0], grads


sparse_backends = [b for b in backends if get_backend(b).sparse_step is not None]
print(f"backends with a row-sparse engine on {device}: {sparse_backends or 'none yet'}")
for name, cls in optimizers().items():
    if grads_reason(name, True) is not None:
        continue
    kw = Hyper.for_optim(name, sparse=True).torch_kwargs()
    tcls = getattr(torch.optim, cls.__name__, None)
    if tcls is None:
        print(f"skip {name} (sparse grads): torch.optim has no {cls.__name__}")
        continue
    for dtype, tol in TOL.items():
        p0, grads = sparse_data(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = run(lambda ps: tcls(ps, **kw), p0, grads)
        noop = rel_err(p0, ref)
        for b in sparse_backends:
            try:
                got = run(lambda ps: cls(ps, backend=b, **kw), p0, grads)
                err = rel_err(got, ref)
                ok = err <= tol and err < WRONG_FRACTION * noop
            except Exception as e:  # noqa: BLE001
                err, ok = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", False
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name:10s} {str(dtype)[6:]:8s} {b:7s} sparse "
                  f"max err {err if isinstance(err, str) else f'{err:.1e}'} "
                  f"(tol {tol:g}; a no-op step shows {noop:.1e})")
print(f"smoke: {failures} failure(s)")
sys.exit(1 if failures else 0)
EOF
  rc_smoke=$?
  s_smoke=$(( SECONDS - t ))
  cat "$WORK/smoke.log"
  echo "smoke: exit $rc_smoke in ${s_smoke} s"

  # The optimizers whose step is not element-wise (Adafactor's factored-moment engine on
  # "cuda" and compiled "triton", Muon's batched Newton-Schulz, LBFGS's device-side
  # recursion): their test files step CUDA copies against torch.optim on the GPU where
  # one is present (and their CPU cases too).
  t=$SECONDS
  FUSED_OPTIM_FAILURES_LOG="$WORK/test_steps_failures.log" \
    timeout -k 10 "$(limit 120 130 40)" "$PY" -m pytest -q -p no:cacheprovider -rs \
    "${xdist[@]}" tests/test_adafactor.py tests/test_muon.py tests/test_lbfgs.py \
    "${PYTEST_EXTRA[@]}" > "$WORK/test_steps.log" 2>&1
  rc_steps=$?
  s_steps=$(( SECONDS - t ))
  echo "test_adafactor/muon/lbfgs.py: exit $rc_steps in ${s_steps} s: $(pytest_line "$WORK/test_steps.log")"
  if (( rc_steps != 0 && rc_steps != 5 )); then
    grep -E '^(FAILED|ERROR)' "$WORK/test_steps.log" | head -n 30
    grep -E '^FAILED' "$WORK/test_steps_failures.log" 2>/dev/null | sort -u | head -n 40 \
      | sed 's/^/as it ran: /'
  fi
  (( rc_steps == 5 )) && rc_steps=0

  if [[ ! -f $WORK/test_triton.rc ]]; then echo "waiting for test_triton.py ..."; fi
  wait "$triton_pid"
  read -r rc_triton s_triton < "$WORK/test_triton.rc" || rc_triton=99
  echo "test_triton.py: exit $rc_triton in ${s_triton} s (ran during the build):" \
    "$(pytest_line "$WORK/test_triton.log")"
  (( rc_triton != 0 )) && grep -E '^(FAILED|ERROR)' "$WORK/test_triton.log" | head -n 30
  (( rc_triton == 5 )) && rc_triton=0

  # ---- 3. benchmark ----
  hr "3. benchmark"
  local optims sparse_optims
  optims="$(pick_optims "${GPU_CHECK_OPTIMS:-adamw,sgd,adagrad}" dense)"
  sparse_optims="$(pick_optims "${GPU_CHECK_SPARSE_OPTIMS-sparseadam,sgd,adagrad}" sparse)"
  RESULT_FILES=()
  if [[ -z $optims ]]; then
    echo "gpu-check: no optimizer to benchmark"
    rc_eager=1
  else
    local common=(--device "$DEVICE" --optim "$optims" --dtype fp32,bf16 --shapes "$SHAPES"
                  --providers "$PROVIDERS" "${SIZING[@]}" --out "$RESULTS")
    local tl
    tl=$(min 150 $(( $(left) - 70 )))
    if (( tl < 50 )); then
      echo "gpu-check: ${tl} s left per benchmark run: benchmark skipped"
    else
      t=$SECONDS
      bench_run eager "$tl" "${common[@]}"
      rc_eager=$?
      s_eager=$(( SECONDS - t ))
      # Sparse grads (the embedding shapes), fp32, eager (a sparse step syncs with the
      # host): 9 short cases; the graph run keeps 55 s.
      tl=$(min 90 $(( $(left) - 55 )))
      if [[ -z $sparse_optims ]]; then
        echo "gpu-check: no optimizer for the sparse run"
      elif (( tl < 30 )); then
        echo "gpu-check: ${tl} s left for the sparse run: skipped"
      else
        t=$SECONDS
        bench_run sparse "$tl" --device "$DEVICE" --optim "$sparse_optims" --dtype fp32 \
          --shapes "$SPARSE_SHAPES" --providers "$SPARSE_PROVIDERS" "${SIZING[@]}" \
          --out "$RESULTS"
        rc_sparse=$?
        s_sparse=$(( SECONDS - t ))
      fi
      # The runners of the steps that are not element-wise (fused-optim-bench adafactor /
      # muon / lbfgs) and of the memory policies (policy): their output goes to this
      # script's log only.
      tl=$(min 100 $(( $(left) - 55 )))
      if (( tl < 40 )); then
        echo "gpu-check: ${tl} s left for the adafactor/muon/lbfgs/policy runners: skipped"
      else
        t=$SECONDS
        runners_run "$tl"
        rc_runners=$?
        s_runners=$(( SECONDS - t ))
      fi
      tl=$(min 150 $(( $(left) - 10 )))
      if (( tl < 45 )); then
        echo "gpu-check: ${tl} s left: the --cuda-graph run is skipped"
      else
        t=$SECONDS
        bench_run graph "$tl" "${common[@]}" --cuda-graph
        rc_graph=$?
        s_graph=$(( SECONDS - t ))
      fi
    fi
  fi

  # ---- 4. summary ----
  hr "4. summary"
  local status=0
  word() { case "$1" in 0) echo ok ;; -1) echo "not run" ;; 124|137) echo "TIMED OUT" ;; *) echo "FAILED (exit $1)" ;; esac; }
  printf '%-14s %-16s %5s s  %s\n' \
    build "$(word "$rc_build")" "$s_build" "$([[ $DRY == 1 ]] && echo 'skipped (dry run)' || echo 'fused_optim._C with CUDA kernels, sm_90')" \
    test_cuda.py "$(word "$rc_cuda")" "$s_cuda" "$(pytest_line "$WORK/test_cuda.log")" \
    test_triton.py "$(word "$rc_triton")" "$s_triton" "$(pytest_line "$WORK/test_triton.log")" \
    smoke "$(word "$rc_smoke")" "$s_smoke" "$(tail -n 1 "$WORK/smoke.log")" \
    "tests 3 optims" "$(word "$rc_steps")" "$s_steps" "$(pytest_line "$WORK/test_steps.log")" \
    "bench eager" "$(word "$rc_eager")" "$s_eager" "$(grep -m1 '^wrote .*json' "$WORK/bench-eager.log" 2>/dev/null)" \
    "bench sparse" "$(word "$rc_sparse")" "$s_sparse" "$(grep -m1 '^wrote .*json' "$WORK/bench-sparse.log" 2>/dev/null)" \
    "runners" "$(word "$rc_runners")" "$s_runners" "adafactor, muon, lbfgs, policy (in the log above)" \
    "bench graph" "$(word "$rc_graph")" "$s_graph" "$(grep -m1 '^wrote .*json' "$WORK/bench-graph.log" 2>/dev/null)"
  for mode in eager sparse graph; do
    if [[ -f $WORK/bench-$mode.log ]]; then
      echo
      echo "[$mode] $(sed -n '/^summary: /,/^$/p' "$WORK/bench-$mode.log")"
    fi
  done
  for rc in "$rc_build" "$rc_cuda" "$rc_triton" "$rc_smoke"; do (( rc != 0 )) && status=1; done
  for rc in "$rc_steps" "$rc_eager" "$rc_sparse" "$rc_runners" "$rc_graph"; do
    (( rc > 0 )) && status=1
  done
  echo
  echo "gpu-check: $([[ $status == 0 ]] && echo PASSED || echo FAILED) in $(( SECONDS - T0 )) s"
  printf '%s\n' "${RESULT_FILES[@]}" > "$WORK/result_files"
  return "$status"
}

# The optimizers of a benchmark run (comma list $1) that fused_optim has and that take
# $2 ("dense" or "sparse") grads, as a comma list; the others are named on stderr.
pick_optims() {
  "$PY" - "$1" "$2" <<'EOF'
import sys
from bench.providers import grads_reason, optim_names, resolve_optims
have = optim_names()
keep = []
for name in [n.strip().lower() for n in sys.argv[1].split(",") if n.strip()]:
    try:
        (name,) = resolve_optims([name])
    except ValueError:
        print(f"gpu-check: skipping {name!r}: fused_optim has no such optimizer "
              f"(it has: {', '.join(have)})", file=sys.stderr)
        continue
    why = grads_reason(name, sys.argv[2] == "sparse")
    if why is None:
        keep.append(name)
    else:
        print(f"gpu-check: skipping {name!r} in the {sys.argv[2]} run: {why}", file=sys.stderr)
print(",".join(keep))
EOF
}

# fused-optim-bench adafactor / muon / lbfgs / policy on the device, within $1 seconds
# in all (a quarter each, at least 20); each prints fused_optim against torch.optim (and
# its error, or the bytes per element of each memory policy).
runners_run() {
  local each=$(( $1 / 4 )) rc=0 r
  (( each < 20 )) && each=20
  local -a sizes_a sizes_m sizes_l sizes_p
  if [[ $DRY == 1 ]]; then
    sizes_a=(--shapes 2x256x128,2x256 --rounds 2)
    sizes_m=(--shapes 2x64x64 --warmup 1 --repeat 2)
    sizes_l=(--n 65536 --history 10 --max-iter 5 --rounds 2)
    sizes_p=(--shapes 2x4096 --rounds 2)
  else
    sizes_a=(--rounds 5)                                         # 24 x 1024^2 + 24 x 1024
    sizes_m=(--shapes 24x1024x1024,512x128x128 --warmup 1 --repeat 3)  # batching on a GPU
    sizes_l=(--rounds 3)                                         # 4M, 20 iterations
    sizes_p=(--shapes 8x16777216 --rounds 10)                    # AdamW, 9 rows, ~17 GB
  fi
  for r in "adafactor ${sizes_a[*]}" "muon ${sizes_m[*]}" "lbfgs ${sizes_l[*]}" \
           "policy ${sizes_p[*]}"; do
    echo "\$ $PY -m bench $r --device $DEVICE   (limit ${each} s)"
    # shellcheck disable=SC2086  (the sizes are words)
    timeout -k 10 "$each" "$PY" -m bench $r --device "$DEVICE" 2>&1 | tail -n 30
    local one=${PIPESTATUS[0]}
    (( one != 0 )) && { echo "runner '${r%% *}': exit $one"; rc=1; }
  done
  return "$rc"
}

# One benchmark run: its output to the console and to a log kept next to its JSON.
bench_run() {
  local mode=$1 limit=$2
  shift 2
  local log="$WORK/bench-$mode.log"
  echo "\$ $PY -m bench $*   (limit ${limit} s)"
  timeout -k 15 "$limit" "$PY" -m bench "$@" > "$log" 2>&1
  local rc=$?
  cat "$log"
  local json
  json="$(sed -n 's/^wrote \(.*\.json\)$/\1/p' "$log" | tail -n 1)"
  if [[ -n $json && -f $json ]]; then
    cp "$log" "${json%.json}.log"
    RESULT_FILES+=("$json" "${json%.json}.log")
    [[ -f ${json%.json}.png ]] && RESULT_FILES+=("${json%.json}.png")
  fi
  (( rc == 124 || rc == 137 )) && echo "bench $mode: TIMED OUT after ${limit} s (no JSON)"
  return "$rc"
}

main 2>&1 | tee "$WORK/gpu_check.log"
STATUS=${PIPESTATUS[0]}

# Files to commit under $RESULTS/<gpu>/ and, with $OUT set, copies for the device tool.
DEVDIR=""
[[ -f $WORK/vars ]] && source "$WORK/vars"
if [[ -n $DEVDIR ]]; then
  mapfile -t FILES < <(grep -v '^$' "$WORK/result_files" 2>/dev/null)
  STAMP="$(date -u +%Y%m%d-%H%M%S)"
  CHECK_LOG="$RESULTS/$DEVDIR/$STAMP-gpu-check.log"
  mkdir -p "$RESULTS/$DEVDIR" && cp "$WORK/gpu_check.log" "$CHECK_LOG" && FILES+=("$CHECK_LOG")
  {
    for f in build test_triton test_cuda test_cuda_failures smoke test_steps test_steps_failures; do
      echo "==================== $f ===================="
      cat "$WORK/$f.log" 2>/dev/null
    done
  } > "$WORK/build_and_tests.log"
  echo "files to commit (under $RESULTS/$DEVDIR/):"
  printf '  %s\n' "${FILES[@]}"
  if [[ -n ${OUT:-} ]]; then
    # 8 files at most come back, build_and_tests.log one of them: the JSONs, PNGs and
    # this script's log first; a run's own log (its text is in this script's) last.
    mkdir -p "$OUT/$DEVDIR"
    mapfile -t ORDERED < <(printf '%s\n' "${FILES[@]}" | grep -E '\.json$'
                           printf '%s\n' "${FILES[@]}" | grep -E '\.png$'
                           printf '%s\n' "${FILES[@]}" | grep -E 'gpu-check\.log$'
                           printf '%s\n' "${FILES[@]}" | grep -E '\.log$' \
                             | grep -v -E 'gpu-check\.log$')
    LEFT=()
    for i in "${!ORDERED[@]}"; do
      if (( i < 7 )); then cp "${ORDERED[$i]}" "$OUT/$DEVDIR/"; else LEFT+=("${ORDERED[$i]##*/}"); fi
    done
    cp "$WORK/build_and_tests.log" "$OUT/"
    echo "copied to \$OUT: $DEVDIR/ ($(ls "$OUT/$DEVDIR" | wc -l) files) and build_and_tests.log"
    if (( ${#LEFT[@]} )); then
      echo "not copied to \$OUT (8 files at most; their text is in the gpu-check log): ${LEFT[*]}"
    fi
  fi
fi
exit "$STATUS"
