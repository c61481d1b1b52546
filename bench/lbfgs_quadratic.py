"""LBFGS step time, closure excluded: torch.optim.LBFGS against fused_optim.LBFGS.

    python bench/lbfgs_quadratic.py [--n 4194304] [--history 100] [--max-iter 20]
                                    [--rounds 5] [--dtype fp32] [--line-search]
                                    [--warm-steps 0]

The problem (issue 13's): a diagonal quadratic f(x) = 1/2 sum a_i x_i^2 - b . x over one
param of n elements, a_i spread over [1, 1e4] so that the 20 iterations of one step do
not converge (tolerances 0: every step runs max_iter iterations). Its closure sets the
grad by hand (a * x - b, no autograd) and its time is measured and subtracted, so what
is compared is the optimizer's own work per step: gathering the flat grad, the two-loop
recursion, the direction and the param update. Each round makes a fresh optimizer and
param per provider and times ONE step (max_iter iterations from an empty history, or,
with --warm-steps K, the step after K untimed ones, from the history they stored), the
providers interleaved, starting with a different one each round; the ratio is the
median of the per-round ratios.

This is not part of the spec-driven CLI (`python -m bench`), which benchmarks element-wise
steps on fixed grads; LBFGS needs a closure and many evaluations per step.
On a GPU (``--device cuda``) each step and each closure is bracketed by a device sync, so
the closure's time is its kernels' time.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import time

import torch

import fused_optim

DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


def _problem(n: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.logspace(0, 4, n, dtype=torch.float64)[torch.randperm(n, generator=gen)]
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    x0 = torch.randn(n, generator=gen, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (a, b, x0)]


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _one_step(cls, a, b, x0, args, line_search):
    """(step seconds, closure seconds, final x, iterations, stored pairs before the step,
    minor page faults in the step outside the closure)."""
    x = torch.nn.Parameter(x0.clone())
    opt = cls([x], history_size=args.history, max_iter=args.max_iter,
              max_eval=args.max_iter * 5 // 4 if not line_search else None,
              tolerance_grad=0.0, tolerance_change=0.0,
              line_search_fn="strong_wolfe" if line_search else None)
    spent = [0.0]
    closure_faults = [0]

    def closure():
        _sync(x.device)
        faults = _minor_faults()
        start = time.perf_counter()
        with torch.no_grad():
            grad = a * x - b
            loss = (0.5 * (a * x) - b).mul(x).sum()
            x.grad = grad
        _sync(x.device)
        spent[0] += time.perf_counter() - start
        closure_faults[0] += _minor_faults() - faults
        return loss

    for _ in range(getattr(args, "warm_steps", 0)):
        opt.step(closure)
    stored = len(opt.state[x].get("old_dirs", ()))
    iters_before = opt.state[x].get("n_iter", 0)
    spent[0], closure_faults[0] = 0.0, 0
    _sync(x.device)
    faults = _minor_faults()
    start = time.perf_counter()
    opt.step(closure)
    _sync(x.device)
    total = time.perf_counter() - start
    faults = _minor_faults() - faults - closure_faults[0]
    iters = opt.state[x]["n_iter"] - iters_before
    return total, spent[0], x.detach(), iters, stored, faults


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fused-optim-bench lbfgs",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4 * 1024 * 1024)
    parser.add_argument("--history", type=int, default=100)
    parser.add_argument("--max-iter", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--line-search", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warm-steps", type=int, default=0,
                        help="untimed steps of the same optimizer before the timed one: "
                             "the timed step then starts from a stored history (a training "
                             "run's steady state) instead of an empty one")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]

    try:
        commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, check=False,
                                text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        commit = "?"
    where = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
             else platform.processor() or platform.machine())
    print(f"commit {commit}, torch {torch.__version__}, {where}, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()}")
    print(f"LBFGS one step: n={args.n} {args.dtype}, history_size={args.history}, "
          f"max_iter={args.max_iter}, line_search={'strong_wolfe' if args.line_search else None}, "
          f"timed step after {args.warm_steps} untimed steps")
    a, b, x0 = _problem(args.n, dtype, args.device)
    providers = [("torch", torch.optim.LBFGS), ("fused_optim", fused_optim.LBFGS)]
    # warm-up (allocator, MKL) once each
    for _, cls in providers:
        _one_step(cls, a, b, x0, argparse.Namespace(**{**vars(args), "max_iter": 2,
                                                        "warm_steps": 0}), args.line_search)
    times: dict[str, list[float]] = {name: [] for name, _ in providers}
    closures: dict[str, list[float]] = {name: [] for name, _ in providers}
    faults: dict[str, list[int]] = {name: [] for name, _ in providers}
    finals: dict[str, torch.Tensor] = {}
    for r in range(args.rounds):
        order = providers[r % 2:] + providers[: r % 2]
        for name, cls in order:
            total, in_closure, x, iters, stored, n_faults = _one_step(cls, a, b, x0, args,
                                                                      args.line_search)
            times[name].append(total - in_closure)
            faults[name].append(n_faults)
            closures[name].append(in_closure)
            finals[name] = x
            if r == 0:
                print(f"  {name}: {iters} iterations from {stored} stored pairs")
    ratios = [t / f for t, f in zip(times["torch"], times["fused_optim"])]
    totals = {k: [t + c for t, c in zip(times[k], closures[k])] for k in times}
    total_ratios = [t / f for t, f in zip(totals["torch"], totals["fused_optim"])]
    for name, _ in providers:
        med = statistics.median(times[name])
        print(f"  {name:12s} step minus closure: median {med * 1e3:8.1f} ms "
              f"({med * 1e3 / args.max_iter:6.2f} ms/iteration), samples "
              f"{[round(t * 1e3, 1) for t in times[name]]}; closure {statistics.median(closures[name]) * 1e3:.1f} ms; "
              f"minor page faults outside the closure {statistics.median(faults[name]):.0f}")
    print(f"  whole step, closure included: torch {statistics.median(totals['torch']) * 1e3:.1f} ms, "
          f"fused_optim {statistics.median(totals['fused_optim']) * 1e3:.1f} ms, "
          f"{statistics.median(total_ratios):.2f}x (per round {[round(x, 2) for x in total_ratios]}); "
          "the closure's own time moves with what the step left in the caches")
    ref = finals["torch"]
    err = ((finals["fused_optim"] - ref).abs().max() / ref.abs().max()).item()
    print(f"  speedup (median of per-round ratios): {statistics.median(ratios):.2f}x "
          f"(per round {[round(x, 2) for x in ratios]}); max rel diff of the params {err:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
