"""Facts about the machine and software of a run, recorded in the JSON next to the numbers:
a result without its hardware, versions and commit cannot be compared with anything."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
import sys

import torch

__all__ = ["facts", "load_average", "memory_available_bytes", "cpu_model", "cpu_snapshot",
           "others_busy", "results_dir"]

# The CPU flags that decide which SIMD path a kernel can take.
_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
          "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "asimd", "sve")


def _cpuinfo() -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    k, v = line.split(":", 1)
                    out.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    return out


def cpu_model() -> str:
    info = _cpuinfo()
    return info.get("model name") or platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_snapshot() -> dict | None:
    """CPU time used so far by the whole machine (busy and stolen, from /proc/stat) and by
    this process and its children: two snapshots give ``others_busy``."""
    import resource
    import time

    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    own = sum(getattr(resource.getrusage(w), a) for w in (resource.RUSAGE_SELF,
                                                            resource.RUSAGE_CHILDREN)
              for a in ("ru_utime", "ru_stime"))
    return {"t": time.perf_counter(), "busy_s": (user + nice + system + irq + softirq) / hz,
            "steal_s": steal / hz, "own_s": own}


def others_busy(start: dict | None, end: dict | None) -> dict | None:
    """The share of the machine's CPUs that other processes (and the hypervisor's steal)
    took between two snapshots: 0 on a quiet machine; on a 2-core machine 0.5 means one
    core was taken from the benchmark."""
    if not start or not end:
        return None
    wall = end["t"] - start["t"]
    ncpu = os.cpu_count() or 1
    if wall <= 0:
        return None
    others = (end["busy_s"] - start["busy_s"]) - (end["own_s"] - start["own_s"])
    steal = end["steal_s"] - start["steal_s"]
    return {"others_cpu_fraction": round(max(0.0, others) / (wall * ncpu), 3),
            "steal_cpu_fraction": round(max(0.0, steal) / (wall * ncpu), 3)}


def memory_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _memory_total_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        res = subprocess.run(["git", "-C", here, *args], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def commit() -> dict:
    """The checkout's commit and whether the tree differs from it (read-only git).

    Where there is no git checkout (a copy of the working tree on a GPU machine), the
    environment variable FUSED_OPTIM_COMMIT gives it: a sha, "-dirty" appended when the
    copy had uncommitted changes (what ``git describe --always --dirty`` prints)."""
    sha = _git("rev-parse", "HEAD")
    dirty = None
    if _git("rev-parse", "--is-inside-work-tree") == "true":
        status = _git("status", "--porcelain", "--untracked-files=no")
        dirty = bool(status) if status is not None else None
    given = os.environ.get("FUSED_OPTIM_COMMIT", "").strip()
    if sha is None and given:
        dirty = given.endswith("-dirty")
        sha = given.removesuffix("-dirty")
    return {"sha": sha, "dirty": dirty}


def results_dir(machine: dict) -> str:
    """The folder of a run's results under --out: "cpu" for a CPU run, the GPU's name
    for a CUDA run ("NVIDIA H200" -> "nvidia-h200")."""
    gpu = machine.get("gpu") or {}
    if machine.get("device") == "cuda" and gpu.get("name"):
        return re.sub(r"[^a-z0-9]+", "-", gpu["name"].lower()).strip("-") or "cuda"
    return machine.get("device") or "unknown"


def _fused_optim_facts() -> dict:
    try:
        import fused_optim
    except Exception as e:  # noqa: BLE001
        return {"import_error": f"{type(e).__name__}: {e}"[:200]}
    out = {"version": getattr(fused_optim, "__version__", None),
           "path": os.path.dirname(getattr(fused_optim, "__file__", "") or "")}
    ext = getattr(fused_optim, "_extension", None)
    for name in ("build_info", "cpu_features"):
        fn = getattr(ext, name, None)
        if callable(fn):
            try:
                out[name] = fn()
            except Exception as e:  # noqa: BLE001
                out[name] = f"error: {e}"[:200]
    return out


def facts(device: torch.device) -> dict:
    device = torch.device(device)
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    out = {
        "device": device.type,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": {
            "model": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "flags": [f for f in _FLAGS if f in flags],
            "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },
        "memory_total_bytes": _memory_total_bytes(),
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": _version("triton"),
            "numpy": _version("numpy"),
            "deepspeed": _version("deepspeed"),
            "bitsandbytes": _version("bitsandbytes"),
            "torchao": _version("torchao"),
        },
        "fused_optim": _fused_optim_facts(),
        "commit": commit(),
        "load_average_start": load_average(),
    }
    if device.type == "cuda" and torch.cuda.is_available():
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        out["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_bytes": props.total_memory,
            "multiprocessors": props.multi_processor_count,
            "driver_cuda": _driver_version(),
        }
    return out


def _driver_version() -> str | None:
    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return res.stdout.strip().splitlines()[0] if res.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None
