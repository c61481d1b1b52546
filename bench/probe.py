"""Bandwidth probe: the machine's streaming limit, measured in the same run as the bench.

The "% of limit" column divides a provider's achieved GB/s by the best rate that plain
streaming code reaches on this machine, right now (same threads, same load). Two streams:

  copy           dst.copy_(src), torch's own parallel copy: 1 read + 1 write per element.
  adamw-stream   one pass over 4 fp32 inputs / 3 outputs (p, g, m, v in; p, m, v out: 28 B
                 per element), the access pattern of an ideal fused AdamW, with moment
                 updates but no sqrt or division (those would time the FP divider). CPU: a ~30-line C loop split over torch.get_num_threads() pthreads,
                 compiled with the system C compiler on first use and cached; CUDA: a Triton
                 kernel.

Two places measure them. ``measure`` runs both streams at the start and at the end of a run
(machine facts, and the fallback limit). And every case runs the AdamW-shaped stream over
tensors of the case's sizes, as one more member of each interleaved round (runner.py): the host's memory
bandwidth drifts during a run (on this VM the stream read 35 GB/s at a run's start and
43 GB/s at its end), so a case's "% of limit" is the per-round ratio of the provider's
rate to the stream's rate in the same round, and drift cancels as it does for speedups.

The global limit is the maximum of the streams, not one of them: a copy alone under-states what a
kernel with more reads than writes can reach on CPUs (reads are cheaper than the
read-for-ownership of a written line), while the AdamW-shaped stream is what an AdamW
kernel is really up against. Taking the max keeps the limit a measured upper reference, so
a provider near or above 100% is at the machine's streaming rate, not beyond a model of it.
Measured on this project's 2-core AMD EPYC VM (quiet): the C AdamW stream 33-44 GB/s with
2 threads, depending on the moment; torch's copy_ 20-27 GB/s.

When no C compiler is found (CPU) or Triton is missing (CUDA), that stream is left out and
the reason is recorded; the copy alone then gives the limit.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import time

import torch

from .stats import summarize

__all__ = ["measure", "adamw_stream", "combine", "C_SOURCE"]

C_SOURCE = r"""
/* AdamW-shaped stream for the bandwidth probe of fused_optim.bench.
   Reads p, g, m, v and writes p, m, v (fp32): 16 B read + 12 B written per element,
   AdamW's access pattern; the constants do not change the bytes moved.
   Tensors are a list (as a model's are): the threads split the flattened element range,
   thread t pinned to CPU t for the call (unpinned threads were seen to share a core). */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>

typedef struct {
  float **p, **g, **m, **v;
  const int64_t *n;
  int64_t ntensors, begin, end;
  int cpu;
} span_t;

static void stream(float *restrict p, const float *restrict g, float *restrict m,
                   float *restrict v, int64_t begin, int64_t end) {
  /* Multiplies and adds only: AdamW's sqrt and divisions would make this probe time the
     FP divider rather than memory. */
  const float b1 = 0.9f, b2 = 0.999f, lr = 1e-3f, decay = 1.0f - 1e-3f * 1e-2f;
  for (int64_t i = begin; i < end; ++i) {
    const float gi = g[i];
    const float mi = b1 * m[i] + (1.0f - b1) * gi;
    const float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * decay - lr * mi * vi;
  }
}

static void pin(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

static void *run_span(void *arg) {
  const span_t *s = (const span_t *)arg;
  if (s->cpu >= 0) pin(s->cpu);
  int64_t off = 0;
  for (int64_t t = 0; t < s->ntensors && off < s->end; off += s->n[t], ++t) {
    const int64_t lo = s->begin > off ? s->begin - off : 0;
    const int64_t hi = s->end < off + s->n[t] ? s->end - off : s->n[t];
    if (lo < hi) stream(s->p[t], s->g[t], s->m[t], s->v[t], lo, hi);
  }
  return 0;
}

int fo_probe_adamw_multi(float **p, float **g, float **m, float **v, const int64_t *n,
                         int64_t ntensors, int threads, int ncpu) {
  if (threads < 1) threads = 1;
  if (threads > 256) threads = 256;
  int64_t total = 0;
  for (int64_t t = 0; t < ntensors; ++t) total += n[t];
  pthread_t tid[256];
  span_t span[256];
  const int64_t per = ((total + threads - 1) / threads + 15) / 16 * 16; /* 64 B splits */
  for (int t = 0; t < threads; ++t) {
    int64_t b = per * t, e = b + per;
    if (b > total) b = total;
    if (e > total) e = total;
    span[t] = (span_t){p, g, m, v, n, ntensors, b, e, ncpu > 1 ? t % ncpu : -1};
  }
  cpu_set_t saved;
  const int restore = pthread_getaffinity_np(pthread_self(), sizeof(saved), &saved) == 0;
  for (int t = 1; t < threads; ++t)
    if (pthread_create(&tid[t], 0, run_span, &span[t]) != 0) return -1;
  run_span(&span[0]);
  for (int t = 1; t < threads; ++t) pthread_join(tid[t], 0);
  if (restore) pthread_setaffinity_np(pthread_self(), sizeof(saved), &saved);
  return 0;
}

int fo_probe_adamw(float *p, float *g, float *m, float *v, int64_t n, int threads, int ncpu) {
  return fo_probe_adamw_multi(&p, &g, &m, &v, &n, 1, threads, ncpu);
}
"""


def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fused_optim", "bench")


def _load_c_stream():
    """The compiled C stream (cached by source hash), or raises with the reason."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc) found for the AdamW-shaped stream")
    flags = ["-O3", "-march=native", "-fno-math-errno", "-shared", "-fPIC", "-pthread"]
    key = hashlib.sha256((C_SOURCE + " ".join(flags) + cc).encode()).hexdigest()[:16]
    out_dir = _cache_dir()
    os.makedirs(out_dir, exist_ok=True)
    lib = os.path.join(out_dir, f"probe-{key}.so")
    if not os.path.exists(lib):
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.c")
            with open(src, "w") as f:
                f.write(C_SOURCE)
            tmp_lib = os.path.join(tmp, "probe.so")
            res = subprocess.run([cc, *flags, src, "-o", tmp_lib, "-lm"],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"{cc} failed: {res.stderr.strip().splitlines()[-1:]}")
            shutil.move(tmp_lib, lib)
    so = ctypes.CDLL(lib)
    fn = so.fo_probe_adamw_multi
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _time_cpu(fn, reps: int) -> list[float]:
    fn()  # warm: page faults, thread start
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _time_cuda(fn, reps: int) -> list[float]:
    fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 for s, e in events]


def _triton_stream():
    import triton
    import triton.language as tl

    @triton.jit
    def _adamw_stream_kernel(p_ptr, g_ptr, m_ptr, v_ptr,  # pointers (fp32)
                             n,                           # elements
                             BLOCK: tl.constexpr):
        # Reads p, g, m, v; writes p, m, v: 28 B per element, as the C stream.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        p = tl.load(p_ptr + offs, mask=mask)
        g = tl.load(g_ptr + offs, mask=mask)
        m = tl.load(m_ptr + offs, mask=mask)
        v = tl.load(v_ptr + offs, mask=mask)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        p = p * (1.0 - 1e-5) - 1e-3 * m * v   # no sqrt/division: see the C stream
        tl.store(p_ptr + offs, p, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)

    def run(p, g, m, v):
        n = p.numel()
        _adamw_stream_kernel[(triton.cdiv(n, 4096),)](p, g, m, v, n, BLOCK=4096)

    return run


def adamw_stream(device: torch.device, sizes: int | list[int]):
    """A zero-argument callable that runs the AdamW-shaped stream once over its own fp32
    tensors of ``sizes`` elements on ``device`` (28 B per element), or raises with the
    reason it cannot (no C compiler, no Triton).

    A list of sizes lays the arrays out as a case's tensors are: on the project's VM one
    thread streams 8 tensors of 4M elements at ~32 GB/s and one 32M tensor at ~22 GB/s
    (torch's fused AdamW alike), so the limit of a case is measured on its own layout.
    On CUDA the tensors are streamed one launch each (fine for the sizes where a GPU is
    bandwidth-bound; launch-bound shapes are the providers' business)."""
    device = torch.device(device)
    sizes = [sizes] if isinstance(sizes, int) else list(sizes)
    tensors = [[torch.rand(n, device=device) for _ in range(4)] for n in sizes]
    if device.type == "cuda":
        run = _triton_stream()

        def step_cuda():
            for p, g, m, v in tensors:
                run(p, g, m, v)

        return step_cuda
    fn = _load_c_stream()
    threads = torch.get_num_threads()
    ptrs = [(ctypes.c_void_p * len(sizes))(*[t[k].data_ptr() for t in tensors])
            for k in range(4)]
    ns = (ctypes.c_int64 * len(sizes))(*sizes)
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    args = (*ptrs, ns, len(sizes), threads, ncpu if ncpu >= threads else 0)

    def step():
        if fn(*args) != 0:
            raise RuntimeError("probe stream: pthread_create failed")
        return tensors  # the arrays live as long as the callable

    return step


def measure(device: torch.device, *, numel: int | None = None, reps: int = 5) -> dict:
    """Measures the streams on ``device``. Returns {"streams": {name: {...}}, "limit_gbps",
    "limit_stream", "skipped": {name: reason}}. ``numel`` per array (default: 32M elements
    on CPU, far above the last-level cache; 256M on CUDA)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if numel is None:
        numel = (256 if cuda else 32) * 1024 * 1024
    timer = _time_cuda if cuda else _time_cpu
    streams: dict[str, dict] = {}
    skipped: dict[str, str] = {}

    def record(name, seconds, bytes_per_elem):
        s = summarize(seconds)
        streams[name] = {"bytes_per_element": bytes_per_elem, "numel": numel,
                         "samples_s": seconds, "gbps": numel * bytes_per_elem / s.median / 1e9}

    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)
    record("copy", timer(lambda: dst.copy_(src), reps), 8)
    del src, dst

    try:
        step = adamw_stream(device, numel)
        record("adamw-stream", timer(step, reps), 28)
        del step
    except Exception as e:  # noqa: BLE001  (the copy still gives a limit)
        skipped["adamw-stream"] = f"{type(e).__name__}: {str(e).strip()[:200]}"

    best = max(streams, key=lambda k: streams[k]["gbps"])
    return {"streams": streams, "skipped": skipped, "limit_gbps": streams[best]["gbps"],
            "limit_stream": best, "threads": torch.get_num_threads() if not cuda else None}


def combine(*probes: dict) -> dict:
    """One limit from several probes of a run (start and end): the max of every stream."""
    probes = [p for p in probes if p]
    best = max(probes, key=lambda p: p["limit_gbps"])
    return {"limit_gbps": best["limit_gbps"], "limit_stream": best["limit_stream"],
            "runs": probes}
