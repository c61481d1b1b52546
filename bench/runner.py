"""Runs the benchmark: every case (optimizer x dtype x shape), every provider, interleaved.

One case, step by step:
  1. Initial params (N(0, 0.02), a typical init) and grads (N(0, 0.1)) are drawn once
     from the run's seed; each provider gets its own copies, as separate tensors.
  2. Per provider: its optimizer is made and stepped once, alone, with the memory meter
     reset around it (CUDA: max allocated; CPU: peak RSS via /proc/self/clear_refs);
     that step also creates the state and any lazy compile, outside the timing. The
     bytes model reads the provider's real state dtypes off that first step.
  3. Warm-up rounds, then timed rounds. A round steps every provider once, starting at a
     different provider each round, so drift and position hit all providers alike. Grads
     stay fixed: a step's cost does not depend on their values.
     CPU: time.perf_counter around each (synchronous) step. CUDA: a pair of events around
     each step, synchronized once per round; with --cuda-graph, capturable providers are
     captured once after their first step and replayed.
  4. The number of timed rounds is --repeat, cut down (not below --min-repeat) so that a
     case's timed rounds take about --budget seconds.
  5. Correctness: after the timed steps, every provider's params are compared with
     torch.optim's for-loop implementation of the same optimizer, stepped the same number
     of times from the same inputs (the torch-forloop provider itself when it ran):
     max |p - p_ref| over max |p_ref|, over all elements of all tensors. ``noop_err`` is
     that figure for params that never moved, the size of a wrong result to compare with;
     a provider at WRONG_FRACTION of it or more is marked ``wrong`` (its timing is kept,
     but it is never a yardstick nor the best fused_optim provider: a fast step that
     does not do the work is not a target).
  6. Ratios (``_derive``): per round against torch-fused (the speed baseline) and against
     the fastest correct torch implementation of the case (lowest median of
     torch-forloop, -foreach, -fused), the yardstick of targets like ">= 2.5x torch's
     fastest".

The optimizers, their hyperparameters and the bytes a step moves come from fused_optim's
specs (providers.Hyper, bytes_model.algorithm_of_spec): nothing here names one.

Embedding shapes (sparse grads) differ in three places. Inputs: the param is one
[rows, dim] table, and GRADS_PER_CASE grads are drawn once per case, each from the
table's own embedding backward (``F.embedding(..., sparse=True)``: uncoalesced COO,
indices [1, lookups], values [lookups, dim]), from the run's seed; every provider gets
its own copies and steps them in turn, the grad set before each step, outside the
timing (backward is never timed); the reference steps the same sequence. Providers:
``Provider.sparse_grads`` instead of ``available`` (torch.optim has one implementation
for them); no CUDA graph (a sparse step syncs with the host). Bytes: the touched rows'
traffic (``bytes_model.sparse_bytes_per_step``), with the distinct rows counted on the
drawn grads (their mean over the cycle), and B/elem per element of the touched rows.
An optimizer runs on the grads its spec takes (``providers.grads_reason``); the other
(optimizer, shape) pairs are listed in ``skipped_cases``.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import machine, probe as probe_mod
from .bytes_model import (Algorithm, StoragePolicy, algorithm_of_spec, bytes_per_element,
                          policy_of, sparse_bytes_per_step)
from .providers import (BASELINE, GRAD_STD, PARAM_STD, REFERENCE, TORCH_FAMILY, Hyper, Provider,
                        TorchOptim, all_providers, grads_reason, resolve_optims, select)
from .shapes import Shape, resolve
from .stats import paired_ratio, summarize

__all__ = ["Config", "run", "DTYPES", "SCHEMA"]

SCHEMA = "fused_optim.bench/1"
# A result this far from torch's for-loop, as a fraction of where params that never moved
# would be, did not do the step. Correct results sit far below: at most 8% of it in the
# committed runs (2.3e-2 in bf16 against a no-op's 3.1e-1; torch's foreach and fused
# differ from its for-loop by as much in bf16), where a no-op shows 7e-2 to 1.
WRONG_FRACTION = 0.25

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}

# Sparse grads drawn per embedding case and stepped in turn: different lookups each step
# (a step's cost depends on its rows), few enough to draw quickly and to hold one copy
# per provider (4 x 32 MiB for 65,536 lookups of 128 fp32).
GRADS_PER_CASE = 4


@dataclass
class Config:
    device: str = "cpu"
    optims: list[str] = field(default_factory=lambda: ["adamw"])
    dtypes: list[str] = field(default_factory=lambda: ["fp32", "bf16"])
    shapes: list[str] = field(default_factory=lambda: ["8x4M", "2048x16K", "gpt2-124m", "resnet50"])
    scale: float | None = None       # None: 1.0 on CUDA, 0.25 on CPU
    providers: str = "all"
    warmup: int = 2
    repeat: int = 10
    min_repeat: int = 3
    budget_s: float = 5.0            # target seconds of timed rounds per case
    cuda_graph: bool = False
    seed: int = 0
    threads: int | None = None
    probe: bool = True
    probe_numel: int | None = None
    memory_fraction: float = 0.75    # skip a case that needs more of the free memory
    max_step_s: float = 5.0          # drop a provider whose warm-up steps take longer
    case_probe_max_numel: int = 64 * 1024 * 1024   # the in-round stream's size cap
    gap_ms: float | None = None      # idle before each step; None: 20 on CPU, 0 on CUDA

    def resolved_scale(self) -> float:
        if self.scale is not None:
            return self.scale
        return 1.0 if torch.device(self.device).type == "cuda" else 0.25

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["scale"] = self.resolved_scale()
        return d


class Progress:
    """What the runner tells the CLI while it runs. The base class says nothing."""

    def note(self, message: str) -> None:
        pass

    def start_case(self, label: str, total: int) -> None:
        pass

    def set_total(self, total: int) -> None:
        pass

    def advance(self) -> None:
        pass

    def end_case(self) -> None:
        pass


# --------------------------------------------------------------------------------------
# Memory meters
# --------------------------------------------------------------------------------------

class _CpuMemory:
    """Peak RSS growth over a region: VmHWM is reset through /proc/self/clear_refs
    (Linux >= 4.0), so transient buffers of a step count. Without it, the RSS delta after
    the region (transients missed). Before the region glibc's malloc_trim(0) hands freed
    heap pages back to the kernel: memory freed by an earlier case and reused by this one
    faults in again and is counted (without it, small tensors reused from the heap showed
    0 B). Still approximate: page granularity, and other allocators are not trimmed."""

    def __init__(self):
        self.exact = True
        self._trim = None
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            self._trim = libc.malloc_trim
            self._trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            pass

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def start(self) -> None:
        gc.collect()
        if self._trim is not None:
            self._trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.exact = False
        try:
            self.base = self._status("VmRSS")
        except (OSError, KeyError):
            self.base = None

    def stop(self) -> int | None:
        if self.base is None:
            return None
        key = "VmHWM" if self.exact else "VmRSS"
        try:
            return max(0, self._status(key) - self.base)
        except (OSError, KeyError):
            return None


class _CudaMemory:
    def __init__(self, device):
        self.device = device

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def stop(self) -> int:
        torch.cuda.synchronize(self.device)
        return max(0, torch.cuda.max_memory_allocated(self.device) - self.base)


# --------------------------------------------------------------------------------------
# One provider in one case
# --------------------------------------------------------------------------------------

class _Entry:
    """A provider's live state within a case: its tensors, optimizer and samples."""

    def __init__(self, provider: Provider):
        self.provider = provider
        self.params: list[torch.Tensor] = []
        self.opt = None
        self.graph = None
        self.samples: list[float] = []     # seconds per timed step
        self.steps = 0
        self.status = "ok"
        self.reason: str | None = None
        self.peak_mem: int | None = None
        self.policy: StoragePolicy | None = None
        self.bytes_rw: tuple[float, float] | None = None
        self.max_rel_err: float | None = None
        self.wrong = False
        self.events: list = []
        self.mode = "eager"
        self.slow_steps = 0
        self.grads: list[torch.Tensor] | None = None   # sparse cases: the grads, in turn
        self.elements: float | None = None   # what bytes_rw is per (touched elements)

    def feed(self) -> None:
        """Sparse cases: sets the grad of the next step (outside the timing)."""
        if self.grads:
            self.params[0].grad = self.grads[self.steps % len(self.grads)]

    def fail(self, where: str, exc: BaseException) -> None:
        text = str(exc).strip().splitlines()
        self.status = "failed"
        self.reason = f"{where}: {type(exc).__name__}: {text[0] if text else ''}"[:300]
        self.release()

    def release(self) -> None:
        self.opt = None
        self.graph = None
        self.params = []
        self.grads = None


def _make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int):
    """The initial params and (dense shapes) grads, flat; an embedding's grads are
    ``_embedding_grads``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    n = shape.numel
    p0 = (torch.randn(n, generator=gen, device=device) * PARAM_STD).to(dtype)
    if shape.sparse:
        return p0, None
    g0 = (torch.randn(n, generator=gen, device=device) * GRAD_STD).to(dtype)
    return p0, g0


def _embedding_grads(shape: Shape, p0: torch.Tensor, seed: int,
                     count: int = GRADS_PER_CASE) -> list[torch.Tensor]:
    """``count`` grads of the embedding table ``p0`` (flat), each the one its
    ``F.embedding(..., sparse=True)`` backward makes for a step's lookups (see
    shapes.Embedding), values N(0, 0.1) in the param's dtype."""
    emb = shape.embedding
    rows, dim = emb.num_embeddings, emb.embedding_dim
    device = p0.device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed + 1)
    hot = None
    if emb.hot_rows:
        hot = torch.randperm(rows, generator=gen, device=device)[:emb.hot_rows]
    weight = p0.view(rows, dim).detach().requires_grad_()
    grads = []
    for _ in range(count):
        if hot is None:
            idx = torch.randint(0, rows, (emb.lookups,), generator=gen, device=device)
        else:
            idx = hot[torch.randint(0, hot.numel(), (emb.lookups,), generator=gen,
                                    device=device)]
        upstream = (torch.randn(emb.lookups, dim, generator=gen, device=device)
                    * GRAD_STD).to(p0.dtype)
        F.embedding(idx, weight, sparse=True).backward(upstream)
        grads.append(weight.grad)
        weight.grad = None
    return grads


def _unique_rows(grad: torch.Tensor) -> int:
    return int(torch.unique(grad._indices()[0]).numel())


def _views(shape: Shape, flat: torch.Tensor) -> list[torch.Tensor]:
    """The case's tensors as views of one flat tensor, in their shapes."""
    out, off = [], 0
    for size, dims in zip(shape.sizes, shape.dims()):
        out.append(flat[off:off + size].view(dims))
        off += size
    return out


def _copies(shape: Shape, p0: torch.Tensor, g0: torch.Tensor | None) -> list[torch.Tensor]:
    """Separate tensors (as a model's parameters are), each with its own grad (none for
    an embedding: its grads are fed per step, see _Entry.feed)."""
    params = []
    grads = _views(shape, g0) if g0 is not None else [None] * shape.count
    for p, g in zip(_views(shape, p0), grads):
        p = torch.nn.Parameter(p.clone())
        if g is not None:
            p.grad = g.clone()
        params.append(p)
    return params


def _rel_err(params: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """max |p - p_ref| / max |p_ref|, both over every element of every tensor. One scale
    for the whole model: a per-tensor scale would make a 1-element tensor's rounding
    look like a large error."""
    diff = scale = 0.0
    for p, r in zip(params, ref):
        r32 = r.detach().float()
        scale = max(scale, r32.abs().max().item())
        d = (p.detach().float() - r32).abs().max().item()
        if math.isnan(d):
            return float("nan")
        diff = max(diff, d)
    return diff / scale if scale > 0 else diff


def _estimate_bytes(shape: Shape, dtype: torch.dtype, n_providers: int, n_states: int,
                    own_reference: bool = True) -> int:
    # params + grads + the algorithm's states (fp32 at worst) per provider, plus the
    # inputs and, when torch-forloop is not among the providers, the reference's own
    # copy; transients of the torch for-loop/foreach are about one more state.
    size = torch.empty((), dtype=dtype).element_size()
    copies = n_providers + int(own_reference)
    if shape.embedding is not None:
        # The table and its states per provider, its GRADS_PER_CASE grads (values and
        # indices), and transients of a few grads' size (torch's coalesce, sparse_mask).
        emb = shape.embedding
        grad = emb.lookups * (emb.embedding_dim * size + 8)
        per = shape.numel * (size + n_states * max(size, 4)) + (GRADS_PER_CASE + 4) * grad
        return per * copies + shape.numel * size + GRADS_PER_CASE * grad
    per = shape.numel * (2 * size + (n_states + 1) * max(size, 4))
    return per * copies + 2 * shape.numel * size


def _free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return machine.memory_available_bytes()


class _Case:
    def __init__(self, cfg: Config, device, optim: str, dtype_name: str, shape: Shape,
                 providers: list[Provider], progress: Progress):
        self.cfg, self.device, self.optim = cfg, device, optim
        self.dtype_name, self.dtype, self.shape = dtype_name, DTYPES[dtype_name], shape
        self.providers, self.progress = providers, progress
        self.hyper = Hyper.for_optim(optim, sparse=shape.sparse)
        self.algorithm: Algorithm = algorithm_of_spec(self.hyper.spec, self.hyper.values, optim)
        self.cuda = device.type == "cuda"
        self.meter = _CudaMemory(device) if self.cuda else _CpuMemory()
        gap = cfg.gap_ms if cfg.gap_ms is not None else (0.0 if self.cuda else 20.0)
        self.gap_s = gap / 1e3
        self.last_pool: str | None = None  # the thread pool of the step before

    # ---- timing primitives --------------------------------------------------------

    def _step(self, e: _Entry) -> None:
        if e.graph is not None:
            e.graph.replay()
        else:
            e.opt.step()
        e.steps += 1

    def _timed_step(self, e: _Entry, keep: bool) -> None:
        e.feed()
        pool = e.provider.threads
        if self.gap_s and self.last_pool not in (None, pool, "pthreads"):
            # [note: idle gap] After a parallel region, the OpenMP workers of a pool
            # (torch's libgomp, DeepSpeed's own) spin on the other cores for a while
            # (GOMP_SPINCOUNT, milliseconds) before sleeping. A provider that brings other
            # threads (DeepSpeed's libgomp, the probe's pthreads) and runs right after a
            # torch provider finds those cores busy: an order effect of interleaving, not
            # a property of either. A short sleep, outside the timing, lets the spinners
            # park first. Measured here (2-core EPYC VM, fp32 8x4M): without it the
            # in-round probe stream read 31-35 GB/s and providers showed 108-119% of it;
            # with 20 ms, 36-38 GB/s and <= 100%, the providers' own times unchanged
            # within their spread.
            # Only where the pool changes: the sleep itself costs the step after it. On
            # this VM the first op after a 20 ms sleep waits for the idle cores to come
            # back: a 1000-element add took 147 us instead of 3, a 16 MB add 0.65-7.8 ms
            # instead of 0.11, a sparse SGD step on Embedding(1M, 64) 2.2 ms instead of
            # 1.3. Steps of one pool in a row (torch.optim and fused_optim[cpu] share
            # torch's) run back to back, as steps do in training, after a backward pass.
            time.sleep(self.gap_s)
        self.last_pool = pool
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            self._step(e)
            end.record()
            if keep:
                e.events.append((start, end))
        else:
            t0 = time.perf_counter()
            self._step(e)
            dt = time.perf_counter() - t0
            if keep:
                e.samples.append(dt)

    def _capture(self, e: _Entry) -> None:
        """Captures one step into a CUDA graph; on failure the provider is timed eagerly
        and the reason is kept. Capturing records the kernels without running them, so
        the step count is unchanged."""
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                e.opt.step()
        except Exception as exc:  # noqa: BLE001
            torch.cuda.synchronize(self.device)
            e.reason = f"CUDA graph capture failed, timed eagerly: {type(exc).__name__}: {exc}"[:300]
            return
        e.graph = g
        e.mode = "cuda-graph"

    # ---- the case ---------------------------------------------------------------------

    def run(self) -> tuple[list[_Entry], dict]:
        cfg, shape = self.cfg, self.shape
        entries = [_Entry(p) for p in self.providers]
        info: dict = {}
        need = _estimate_bytes(shape, self.dtype, len(entries), len(self.algorithm.states),
                               own_reference=all(e.provider.name != REFERENCE
                                                 for e in entries))
        free = _free_bytes(self.device)
        if free is not None and need > cfg.memory_fraction * free:
            for e in entries:
                e.status, e.reason = "skipped", (
                    f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free: use --scale")
            return entries, info

        p0, g0 = _make_inputs(shape, self.dtype, self.device, cfg.seed)
        grads = None
        if shape.sparse:
            grads = _embedding_grads(shape, p0, cfg.seed)
            emb = shape.embedding
            unique = [_unique_rows(g) for g in grads]
            info["sparse"] = {"lookups": emb.lookups, "row_len": emb.embedding_dim,
                              "unique_rows": unique, "grads_cycled": len(grads),
                              "mean_unique_rows": sum(unique) / len(unique)}
        graphs = cfg.cuda_graph and self.cuda and not shape.sparse

        # 2. make + first step, one provider at a time, memory metered.
        for e in entries:
            try:
                e.params = _copies(shape, p0, g0)
                if grads is not None:
                    e.grads = [g.clone() for g in grads]
                    e.feed()
                self.meter.start()
                e.opt = e.provider.make(e.params, self.hyper,
                                        capturable=graphs and e.provider.capturable)
                e.opt.step()
                e.steps = 1
                e.peak_mem = self.meter.stop()
                _, e.policy = policy_of(e.opt, e.params)
                self._bytes(e, info)
                if graphs and e.provider.capturable:
                    self._capture(e)
                elif cfg.cuda_graph and self.cuda and shape.sparse:
                    e.reason = "sparse grads: timed eagerly (the step syncs with the host)"
            except Exception as exc:  # noqa: BLE001  (one provider must not stop the run)
                e.fail("first step", exc)
        live = [e for e in entries if e.status == "ok"]
        # The bandwidth yardstick runs in the same rounds (see probe.py): an AdamW-shaped
        # stream over as many elements as the case, capped.
        limit = None
        if cfg.probe and live:
            limit = _Entry(Provider(name="limit:adamw-stream", family="probe",
                                    threads="pthreads"))
            # The case's own tensor sizes (the layout matters, see probe.adamw_stream),
            # shrunk proportionally past the cap.
            shrink = min(1.0, cfg.case_probe_max_numel / shape.numel)
            sizes = [max(1, int(n * shrink)) for n in shape.sizes]
            try:
                limit.opt = _Stepper(probe_mod.adamw_stream(self.device, sizes))
                limit.numel = sum(sizes)
                live.append(limit)
            except Exception as exc:  # noqa: BLE001  (the run's start/end probe remains)
                info["limit_error"] = f"{type(exc).__name__}: {exc}"[:300]
                limit = None
        self.progress.start_case(self.label, cfg.warmup + cfg.repeat)

        # 3. warm-up, then timed rounds, interleaved with a rotating start.
        rounds_timed = cfg.repeat
        r = 0
        while True:
            timed = r >= cfg.warmup
            if timed and r - cfg.warmup >= rounds_timed:
                break
            t_round = time.perf_counter()
            order = live[r % len(live):] + live[:r % len(live)] if live else []
            for e in order:
                if e.status != "ok":
                    continue
                try:
                    t_step = time.perf_counter()
                    self._timed_step(e, keep=timed)
                    t_step = time.perf_counter() - t_step
                except Exception as exc:  # noqa: BLE001
                    e.fail(f"step {e.steps + 1}", exc)
                    continue
                if not timed and t_step > cfg.max_step_s:
                    e.slow_steps += 1
                    if (e.provider.name not in (BASELINE, REFERENCE)
                            and e.slow_steps >= min(2, cfg.warmup)):
                        # Bounded run time: a provider that is slow twice (once if there is
                        # one warm-up round) must not hold up the case. The yardsticks stay:
                        # without them there is no ratio and no reference.
                        e.status = "skipped"
                        e.reason = (f"too slow for this run: warm-up steps took > "
                                    f"--max-step {cfg.max_step_s:g} s (last {t_step:.1f} s)")
                        e.release()
            if self.cuda:
                torch.cuda.synchronize(self.device)
            t_round = time.perf_counter() - t_round
            if r == cfg.warmup - 1 or (cfg.warmup == 0 and r == 0):
                # 4. budget the timed rounds from the last warm-up round.
                fit = int(cfg.budget_s / max(t_round, 1e-9))
                rounds_timed = max(cfg.min_repeat, min(cfg.repeat, fit))
                self.progress.set_total(cfg.warmup + rounds_timed)
            self.progress.advance()
            live = [e for e in live if e.status == "ok"]
            r += 1
        if self.cuda:
            for e in entries + ([limit] if limit else []):
                e.samples = [s.elapsed_time(t) / 1e3 for s, t in e.events]
                e.events = []
        info["rounds_timed"] = rounds_timed
        if limit is not None and limit.status == "ok" and limit.samples:
            ms = [x * 1e3 for x in limit.samples]
            info["limit"] = {"stream": "adamw-stream", "numel": limit.numel,
                             "bytes_per_element": 28, "samples_ms": ms,
                             "gbps": limit.numel * 28 / (summarize(ms).median / 1e3) / 1e9}
            limit.release()

        # 5. correctness against torch.optim's for-loop, same inputs, same step count.
        ref_entry = next((e for e in entries if e.provider.name == REFERENCE
                          and e.status == "ok"), None)
        try:
            if ref_entry is not None:
                ref = ref_entry.params
            else:
                steps = max((e.steps for e in entries if e.status == "ok"), default=0)
                ref_e = _Entry(TorchOptim("forloop"))
                ref = ref_e.params = _copies(shape, p0, g0)
                ref_e.grads = grads
                opt = TorchOptim("forloop").make(ref, self.hyper)
                for _ in range(steps):
                    ref_e.feed()
                    opt.step()
                    ref_e.steps += 1
            info["reference_steps"] = max((e.steps for e in entries), default=0)
            info["noop_err"] = _rel_err(_views(shape, p0), ref)
            for e in entries:
                if e.status == "ok":
                    e.max_rel_err = _rel_err(e.params, ref)
                    notes = [e.reason] if e.reason else []
                    if e.max_rel_err >= WRONG_FRACTION * info["noop_err"] > 0:
                        e.wrong = True
                        notes.append(f"wrong result: max err is "
                                     f"{e.max_rel_err / info['noop_err']:.0%} of a no-op's")
                    if ref_entry is not None and e.steps != ref_entry.steps:
                        notes.append(f"stepped {e.steps}x, reference {ref_entry.steps}x")
                    e.reason = "; ".join(notes) or None
        except Exception as exc:  # noqa: BLE001
            info["reference_error"] = f"{type(exc).__name__}: {exc}"[:300]
        self.progress.end_case()
        for e in entries:
            e.release()
        return entries, info

    def _bytes(self, e: _Entry, info: dict) -> None:
        """The bytes one step of ``e`` moves, per element: of the params (dense), of the
        touched rows (sparse: ``e.elements`` of them)."""
        policy = _with_defaults(e.policy, self.algorithm)
        if not self.shape.sparse:
            e.bytes_rw = bytes_per_element(self.algorithm, policy)
            return
        sp = info["sparse"]
        rd, wr = sparse_bytes_per_step(self.algorithm, policy,
                                       unique_rows=sp["mean_unique_rows"],
                                       lookups=sp["lookups"], row_len=sp["row_len"])
        e.elements = sp["mean_unique_rows"] * sp["row_len"]
        e.bytes_rw = (rd / e.elements, wr / e.elements)

    @property
    def label(self) -> str:
        return f"{self.optim} {self.dtype_name} {self.shape.name}"


class _Stepper:
    """Gives a plain callable the optimizer's step() (the in-round bandwidth stream)."""

    def __init__(self, fn):
        self.step = lambda: fn()


def _with_defaults(observed: StoragePolicy, alg: Algorithm) -> StoragePolicy:
    """The observed policy, on the algorithm's state names: observed states are matched
    by name; a provider with other names (bnb's state1/state2) maps its states in order."""
    names = alg.states
    obs = observed.states
    if all(n in obs for n in names) and set(obs) <= set(names):
        states = {n: obs[n] for n in names}
    else:
        vals = [obs[k] for k in sorted(obs)]
        # Extra tensors (block scales) are spread over the named states' bytes.
        total = sum(vals)
        states = {n: total / len(names) for n in names} if names else {}
    return StoragePolicy(observed.param, observed.grad, 0.0, states)


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------

def run(cfg: Config, progress: Progress | None = None) -> dict:
    """Runs every case of ``cfg``; returns the JSON document (see report.validate)."""
    progress = progress or Progress()
    device = torch.device(cfg.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: torch.cuda.is_available() is False "
                               f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    for d in cfg.dtypes:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}; expected one of {', '.join(DTYPES)}")
    optims = resolve_optims(cfg.optims)   # "all" expanded; ValueError for unknown names
    shapes = resolve(cfg.shapes, cfg.resolved_scale())
    known = all_providers()
    chosen, left_out = select(known, cfg.providers, device)

    t_start = time.perf_counter()
    cpu_start = machine.cpu_snapshot()
    doc: dict = {"schema": SCHEMA, "created_unix": time.time(),
                 "machine": machine.facts(device), "config": cfg.to_dict(),
                 "shapes": [s.to_dict() for s in shapes], "providers": {}, "results": [],
                 "cases": []}

    probe_start = None
    if cfg.probe:
        progress.note("bandwidth probe...")
        probe_start = probe_mod.measure(device, numel=cfg.probe_numel)

    doc["config"]["optims"] = optims
    doc["skipped_cases"] = []
    for optim in optims:
        for dtype_name in cfg.dtypes:
            # The providers that run this (optim, dtype), per kind of grads (dense,
            # sparse), asked once each; the others with their reasons.
            by_kind: dict[bool, tuple[list[Provider], dict[str, str]]] = {}
            for shape in shapes:
                why = grads_reason(optim, shape.sparse)
                if why is not None:
                    doc["skipped_cases"].append({"optim": optim, "dtype": dtype_name,
                                                 "shape": shape.name, "reason": why})
                    continue
                if shape.sparse not in by_kind:
                    by_kind[shape.sparse] = _providers_for(doc, chosen, device, optim,
                                                           dtype_name, shape.sparse, progress)
                active, skipped = by_kind[shape.sparse]
                for p in known:
                    why = left_out.get(p.name, skipped.get(p.name))
                    if why is not None:
                        doc["results"].append(_result(p, optim, dtype_name, shape, None,
                                                      status="skipped", reason=why))
                case = _Case(cfg, device, optim, dtype_name, shape, active, progress)
                entries, info = case.run()
                doc["cases"].append({"optim": optim, "dtype": dtype_name, "shape": shape.name,
                                     "grads": "sparse" if shape.sparse else "dense",
                                     "hyper": case.hyper.to_dict(),
                                     "bytes_model": {"reads": list(case.algorithm.reads),
                                                     "writes": list(case.algorithm.writes)},
                                     **info})
                for e in entries:
                    doc["results"].append(_result(e.provider, optim, dtype_name, shape, e))
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    probe_end = None
    if cfg.probe:
        progress.note("bandwidth probe (end of run)...")
        probe_end = probe_mod.measure(device, numel=cfg.probe_numel)
        doc["probe"] = probe_mod.combine(probe_start, probe_end)
    else:
        doc["probe"] = None
    for p in chosen:
        if p.name in doc["providers"]:
            doc["providers"][p.name]["setup_s"] = p.setup_s
    _derive(doc)
    doc["machine"]["load_average_end"] = machine.load_average()
    # What other processes took from the machine during the run: numbers taken while
    # another build or test ran are noise, and the table says so.
    doc["machine"]["others_busy"] = machine.others_busy(cpu_start, machine.cpu_snapshot())
    doc["wall_s"] = time.perf_counter() - t_start
    return doc


def _providers_for(doc: dict, chosen: list[Provider], device: torch.device, optim: str,
                   dtype_name: str, sparse: bool,
                   progress: Progress) -> tuple[list[Provider], dict[str, str]]:
    """The chosen providers that run (optim, dtype) on dense or sparse grads (prepared),
    and the others' reasons; recorded in doc["providers"][name]["available"] under
    "optim/dtype" (dense) or "optim/dtype/sparse"."""
    dtype = DTYPES[dtype_name]
    active: list[Provider] = []
    skipped: dict[str, str] = {}
    for p in chosen:
        reason = (p.sparse_grads if sparse else p.available)(device, dtype, optim)
        if reason is None:
            try:
                before = p.setup_s
                p.prepare(device, dtype, optim)
                if p.setup_s - before > 0.5:
                    progress.note(f"{p.name}: one-off setup {p.setup_s - before:.1f} s "
                                  "(not timed)")
            except Exception as exc:  # noqa: BLE001
                reason = f"setup failed: {type(exc).__name__}: {exc}"[:300]
        rec = doc["providers"].setdefault(p.name, {
            "family": p.family, "version": p.version(), "available": {}})
        rec["available"][f"{optim}/{dtype_name}" + ("/sparse" if sparse else "")] = reason
        if reason is None:
            active.append(p)
        else:
            skipped[p.name] = reason
    return active, skipped


def _result(p: Provider, optim: str, dtype_name: str, shape: Shape, e: _Entry | None, *,
            status: str | None = None, reason: str | None = None) -> dict:
    res = {
        "optim": optim, "dtype": dtype_name, "shape": shape.name, "provider": p.name,
        "family": p.family, "status": status or (e.status if e else "skipped"),
        "reason": reason if reason is not None else (e.reason if e else None),
        "mode": "eager", "samples_ms": [], "stats_ms": None, "steps": 0,
        "bytes_per_element": None, "bytes_per_step": None, "gbps": None, "pct_limit": None,
        "ratio_vs_baseline": None, "ratio_vs_fastest_torch": None, "peak_mem_bytes": None,
        "max_rel_err": None, "wrong": False,
        "numel": shape.numel, "n_tensors": shape.count,
    }
    if e is None:
        return res
    res["mode"] = e.mode
    res["steps"] = e.steps
    res["peak_mem_bytes"] = e.peak_mem
    res["max_rel_err"] = e.max_rel_err
    res["wrong"] = e.wrong
    if e.bytes_rw is not None:
        rd, wr = e.bytes_rw
        res["bytes_per_element"] = {"read": rd, "write": wr, "total": rd + wr,
                                    "policy": e.policy.describe() if e.policy else None}
        if e.elements is not None:   # sparse: per element of the touched rows
            res["bytes_per_element"]["per"] = "touched row element"
            res["bytes_per_element"]["elements"] = e.elements
        res["bytes_per_step"] = (rd + wr) * (shape.numel if e.elements is None else e.elements)
    if e.status == "ok" and e.samples:
        ms = [s * 1e3 for s in e.samples]
        res["samples_ms"] = ms
        res["stats_ms"] = summarize(ms).to_dict()
        if res["bytes_per_step"]:
            res["gbps"] = res["bytes_per_step"] / (res["stats_ms"]["median"] / 1e3) / 1e9
    elif e.status == "ok":
        res["status"] = "failed"
        res["reason"] = res["reason"] or "no timed samples"
    return res


def _fastest_torch(case: dict[str, dict]) -> dict | None:
    """The correct torch.optim implementation with the lowest median step time in a
    case (torch has shipped fused kernels that skip work: pytorch/pytorch#191763)."""
    timed = [r for r in case.values() if r["family"] == TORCH_FAMILY and r["status"] == "ok"
             and r["samples_ms"] and r["stats_ms"] and not r.get("wrong")]
    return min(timed, key=lambda r: r["stats_ms"]["median"]) if timed else None


def _derive(doc: dict) -> None:
    """Ratios within each case, and % of the bandwidth limit: per round against the
    stream run in the same rounds when the case has one, else against the run's probe.
    Two speed yardsticks: torch-fused (``ratio_vs_baseline``) and the fastest torch
    implementation of the case (``ratio_vs_fastest_torch``; the case records which one,
    and the best fused_optim provider's figures against both)."""
    limit = doc["probe"]["limit_gbps"] if doc.get("probe") else None
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in doc["results"]:
        by_case.setdefault((r["optim"], r["dtype"], r["shape"]), {})[r["provider"]] = r
    case_info = {(c["optim"], c["dtype"], c["shape"]): c for c in doc["cases"]}
    for key, case in by_case.items():
        base = case.get(BASELINE)
        fastest = _fastest_torch(case)
        stream = case_info.get(key, {}).get("limit")
        for r in case.values():
            if r["gbps"] is not None and stream and len(stream["samples_ms"]) == len(
                    r["samples_ms"]):
                # rate_p / rate_stream = (B_p / t_p) / (B_s / t_s), per round.
                scale = r["bytes_per_step"] / (stream["numel"] * stream["bytes_per_element"])
                r["pct_limit"] = 100.0 * scale * paired_ratio(stream["samples_ms"],
                                                              r["samples_ms"])
            elif r["gbps"] is not None and limit:
                r["pct_limit"] = 100.0 * r["gbps"] / limit
            for yardstick, column in ((base, "ratio_vs_baseline"),
                                      (fastest, "ratio_vs_fastest_torch")):
                if (yardstick and yardstick["samples_ms"] and r["samples_ms"]
                        and len(yardstick["samples_ms"]) == len(r["samples_ms"])):
                    r[column] = paired_ratio(yardstick["samples_ms"], r["samples_ms"])
        info = case_info.get(key)
        if info is None:
            continue
        info["fastest_torch"] = None if fastest is None else {
            "provider": fastest["provider"], "median_ms": fastest["stats_ms"]["median"]}
        ours = [r for r in case.values() if r["family"] == "fused_optim"
                and r["ratio_vs_fastest_torch"] is not None and not r.get("wrong")]
        best = max(ours, key=lambda r: r["ratio_vs_fastest_torch"]) if ours else None
        info["best_fused_optim"] = None if best is None else {
            "provider": best["provider"], "mode": best["mode"],
            "ratio_vs_fastest_torch": best["ratio_vs_fastest_torch"],
            "ratio_vs_baseline": best["ratio_vs_baseline"]}
    doc["baseline"] = BASELINE
    doc["reference"] = REFERENCE
