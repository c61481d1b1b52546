"""Muon's benchmark: fused_optim.Muon against torch.optim.Muon, and the batching effect.

    python -m bench.muon_bench                                  # 24 x 1024x1024 fp32, CPU
    python -m bench.muon_bench --shapes 24x1024x1024,256x128x128 --repeat 5 \
        --json bench/results/cpu/<stamp>-<commit>-muon.json

A separate script, not a case of ``python -m bench``: that CLI's cases are element-wise
optimizers with a spec and a bytes-per-element model, and a Muon step is bound by its
Newton-Schulz products, so it is measured in flops here. Providers, each with its own
copies of the same params and (fixed) grads, in interleaved rounds (each round steps
every provider once, starting at a different one; ratios are medians of per-round
ratios, so drift on a shared machine cancels):

  torch                  torch.optim.Muon (its only implementation: a for-loop)
  fused_optim            fused_optim.Muon: one batched Newton-Schulz run per shape
  fused_optim[unbatched] fused_optim.Muon with every matrix run alone (the batching
                         switched off: _newton_schulz.MIN_BATCHED_SIDE raised), to show
                         what batching itself buys

Flop model: the Newton-Schulz iteration on an m x n matrix (m <= n after the transpose)
does 2m^2n (X X^T) + 2m^3 (A A) + 2m^2n (B X) multiply-adds x 2 per iteration, in bf16;
the element-wise stages (momentum, cast, norm, decay, update) are memory-bound and left
out. GFLOP/s = model flops / median step time.

Max err: max |p - p_torch| / max |p_torch| over all params after the timed steps, each
provider having stepped as often as torch from the same inputs (0: the same bits).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import fused_optim
from fused_optim import _newton_schulz

from . import machine
from .stats import paired_ratio, summarize

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """"24x1024x1024,8x512x2048" -> [(count, rows, cols), ...]."""
    out = []
    for part in text.split(","):
        count, rows, cols = (int(x) for x in part.lower().split("x"))
        out.append((count, rows, cols))
    return out


def ns_flops(shapes: list[tuple[int, int, int]], steps: int) -> float:
    """The Newton-Schulz flops of one step over these params (see the module doc)."""
    total = 0.0
    for count, rows, cols in shapes:
        m, n = min(rows, cols), max(rows, cols)
        total += count * steps * 2.0 * (2 * m * m * n + m ** 3)
    return total


class _Unbatched:
    """fused_optim.Muon with the batching off while it steps."""

    def __init__(self, params, **kwargs):
        self.opt = fused_optim.Muon(params, **kwargs)

    def step(self):
        saved = _newton_schulz.MIN_BATCHED_SIDE
        _newton_schulz.MIN_BATCHED_SIDE = 1 << 62
        try:
            self.opt.step()
        finally:
            _newton_schulz.MIN_BATCHED_SIDE = saved


PROVIDERS = {
    "torch": torch.optim.Muon,
    "fused_optim": fused_optim.Muon,
    "fused_optim[unbatched]": _Unbatched,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(shapes, dtype, *, warmup: int, repeat: int, seed: int, lr: float,
             providers: list[str], device: str | torch.device = "cpu") -> dict:
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(r, c, generator=gen, dtype=torch.float32).mul_(0.02).to(device, dtype)
            for count, r, c in shapes for _ in range(count)]
    grads = [torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.1).to(device, dtype)
             for p in init]
    opts, params = {}, {}
    for name in providers:
        ps = [p.clone().requires_grad_() for p in init]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        params[name] = ps
        opts[name] = PROVIDERS[name](ps, lr=lr)
    for name in providers:  # the first step: state creation, untimed
        opts[name].step()
    times: dict[str, list[float]] = {name: [] for name in providers}
    for r in range(warmup + repeat):
        order = providers[r % len(providers):] + providers[:r % len(providers)]
        for name in order:
            _sync(device)  # on a GPU: the step's kernels, timed from the host
            t0 = time.perf_counter()
            opts[name].step()
            _sync(device)
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    flops = ns_flops(shapes, 5)
    ref = params[providers[0]]
    scale = max(p.detach().abs().max().item() for p in ref)
    results = {}
    for name in providers:
        s = summarize(times[name])
        err = max((p.detach().double() - q.detach().double()).abs().max().item()
                  for p, q in zip(params[name], ref)) / scale
        results[name] = {
            "times_s": times[name],
            "summary": s.to_dict(),
            "gflops": flops / s.median / 1e9,
            "speedup_vs_torch": paired_ratio(times[providers[0]], times[name]),
            "max_err": err,
        }
    return {"shapes": shapes, "dtype": str(dtype).removeprefix("torch."), "lr": lr,
            "ns_flops_per_step": flops, "results": results}


def format_case(case: dict) -> str:
    shapes = ",".join(f"{c}x{r}x{k}" for c, r, k in case["shapes"])
    gflop = case["ns_flops_per_step"] / 1e9
    lines = [f"{shapes} {case['dtype']}: Newton-Schulz {gflop:.1f} GFLOP a step"]
    lines.append(f"  {'provider':<24}{'median s':>10}{'IQR %':>8}{'GFLOP/s':>9}"
                 f"{'vs torch':>10}{'max err':>10}")
    for name, r in case["results"].items():
        s = r["summary"]
        lines.append(f"  {name:<24}{s['median']:>10.4f}{s['spread_pct']:>8.1f}"
                     f"{r['gflops']:>9.1f}{r['speedup_vs_torch']:>9.2f}x{r['max_err']:>10.2g}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fused-optim-bench muon", description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="24x1024x1024",
                    help="comma-separated COUNTxROWSxCOLS cases, each one run (default: 24x1024x1024)")
    ap.add_argument("--dtype", default="fp32", choices=sorted(_DTYPES))
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--json", help="write the results (with the machine's facts) here")
    args = ap.parse_args(argv)
    providers = args.providers.split(",")
    if providers[0] != "torch":
        ap.error("--providers must start with torch (the baseline)")
    facts = machine.facts(torch.device(args.device))
    snap = machine.cpu_snapshot()
    print(f"{facts['cpu']['model']}, {facts['cpu']['logical_cpus']} CPUs, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, load "
          f"{facts['load_average_start']}, commit {facts['commit']['sha']}")
    cases = []
    for shape in parse_shapes(args.shapes):
        case = run_case([shape], _DTYPES[args.dtype], warmup=args.warmup, repeat=args.repeat,
                        seed=args.seed, lr=args.lr, providers=providers,
                        device=args.device)
        cases.append(case)
        print(format_case(case), flush=True)
    facts["load_average_end"] = machine.load_average()
    facts["others_busy"] = machine.others_busy(snap, machine.cpu_snapshot())
    print(f"load {facts['load_average_end']}, others' share of the CPUs "
          f"{facts['others_busy']}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": facts, "argv": argv if argv is not None else None,
                       "args": vars(args), "cases": cases}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
