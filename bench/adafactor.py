"""python -m fused_optim.bench.adafactor: fused_optim.Adafactor against torch.optim.Adafactor.

    python -m fused_optim.bench.adafactor                    # 24 x 1024x1024 + 24 x 1024, fp32
    python -m fused_optim.bench.adafactor --shapes 24x1024x1024,24x1024 --rounds 15 \\
        --backend cpu --json out.json

The element-wise benchmark (python -m fused_optim.bench) is driven by the optimizers'
element-wise specs and byte model; Adafactor's state is not shaped like its params, so
it has this small runner instead, with the same method: interleaved rounds (each round
steps every provider once, in turn, after warm-up steps), the median of per-round
ratios against each torch implementation (for-loop, foreach), and achieved GB/s from a
byte model, against the copy stream measured in the same run (bench/probe.py).

Byte model (the traffic floor of a step with three passes over the grad, which is what
a step that never stores the update needs: the update's norm must be known before the
first param changes), per element, b = the dtype's bytes:
  a factored param (2+ dims):  pass 1 reads p, g (2b); pass 2 reads g (b); pass 3 reads
                               p, g and writes p (3b): 6b (fp32: 24 B), plus the factors
                               (O(rows + cols), left out)
  a vector:                    pass 1 reads p, g, variance and writes variance (4b); pass 2
                               reads g, variance (2b); pass 3 (3b): 9b (fp32: 36 B)
Both torch implementations are charged the same bytes (they move more: norms, the
update tensor, its scaling, each in its own pass).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

__all__ = ["bytes_per_step", "run", "main"]


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """'24x1024x1024,24x1024' -> 24 shapes (1024, 1024) and 24 shapes (1024,): the
    first factor of each item is a count."""
    shapes: list[tuple[int, ...]] = []
    for item in text.split(","):
        count, *dims = (int(x) for x in item.strip().lower().split("x"))
        shapes += [tuple(dims)] * count
    return shapes


def bytes_per_step(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> int:
    b = torch.empty((), dtype=dtype).element_size()
    total = 0
    for s in shapes:
        numel = math.prod(s)
        total += numel * (6 * b if len(s) >= 2 else 9 * b)
    return total


def _providers(backend: str):
    import fused_optim

    return {
        f"fused_optim[{backend}]": lambda ps: fused_optim.Adafactor(ps, backend=backend),
        "torch-forloop": lambda ps: torch.optim.Adafactor(ps, foreach=False),
        "torch-foreach": lambda ps: torch.optim.Adafactor(ps, foreach=True),
    }


def run(shapes, dtype=torch.float32, rounds: int = 10, warmup: int = 2,
        backend: str = "cpu", device: str | torch.device = "cpu") -> dict:
    from .probe import measure
    from .stats import paired_ratio, summarize

    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    init = [torch.randn(s, dtype=dtype).to(device) for s in shapes]
    grads = [torch.randn(s, dtype=dtype).to(device) for s in shapes]
    runs = {}
    for name, make in _providers(backend).items():
        params = [p.clone().requires_grad_() for p in init]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        runs[name] = (params, make(params))
    for _ in range(warmup):
        for params, opt in runs.values():
            opt.step()
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (_, opt) in runs.items():
            sync()  # on a GPU: the step's kernels, timed from the host
            t0 = time.perf_counter()
            opt.step()
            sync()
            times[name].append(time.perf_counter() - t0)
    probe = measure(device, reps=3)
    nbytes = bytes_per_step(shapes, dtype)
    ours = f"fused_optim[{backend}]"
    # How far apart the params ended (same inputs, same number of steps).
    ref = runs["torch-forloop"][0]
    err = max(((a - b).abs().max() / a.abs().max()).item()
              for a, b in zip(ref, runs[ours][0]))
    out = {"shapes": f"{len(shapes)} tensors, {sum(math.prod(s) for s in shapes)} elements",
           "dtype": str(dtype), "threads": torch.get_num_threads(), "rounds": rounds,
           "bytes_per_step": nbytes, "copy_gbps": probe["streams"]["copy"]["gbps"],
           "max_rel_err_vs_forloop": err, "providers": {}}
    for name, ts in times.items():
        s = summarize(ts)
        entry = {"median_ms": s.median * 1e3, "gbps": nbytes / s.median / 1e9,
                 "pct_of_copy": 100 * nbytes / s.median / 1e9 / probe["streams"]["copy"]["gbps"]}
        if name != ours:
            entry["speedup_of_fused_optim"] = paired_ratio(ts, times[ours])
        out["providers"][name] = entry
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fused-optim-bench adafactor")
    ap.add_argument("--shapes", default="24x1024x1024,24x1024")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp64"])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--backend", default=None,
                    help="fused_optim's backend (default: cpu on the CPU, cuda on a GPU)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[args.dtype]
    backend = args.backend or ("cuda" if args.device.startswith("cuda") else "cpu")
    result = run(parse_shapes(args.shapes), dtype, args.rounds, backend=backend,
                 device=args.device)
    print(f"Adafactor {result['shapes']}, {result['dtype']}, {result['threads']} threads, "
          f"{result['bytes_per_step'] / 1e6:.0f} MB/step model, copy stream "
          f"{result['copy_gbps']:.1f} GB/s; max rel err vs torch for-loop "
          f"{result['max_rel_err_vs_forloop']:.1e}")
    for name, e in result["providers"].items():
        extra = (f"  fused_optim {e['speedup_of_fused_optim']:.2f}x faster"
                 if "speedup_of_fused_optim" in e else "")
        print(f"  {name:22s} {e['median_ms']:8.2f} ms  {e['gbps']:6.1f} GB/s "
              f"({e['pct_of_copy']:4.0f}% of copy){extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
