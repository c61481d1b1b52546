"""fused-optim-bench policy: AdamW's step time and memory under each memory policy
(fused_optim/_policy.py), against torch.optim.AdamW(fused=True) on the same params.

    python -m fused_optim.bench policy                      # 8 x 4M elements, CPU
    python -m fused_optim.bench policy --shapes 8x4194304 --rounds 15 --device cuda \\
        --json out.json

Rows: (name, param dtype, optimizer factory). The method is the other runners'
(bench/adafactor.py): warm-up steps, interleaved rounds (each round steps every row
once, in turn), the median of per-round ratios against the fused_optim fp32 row, and
achieved GB/s from a byte model against the copy stream measured in the same run.

Byte model per element of a step (p, s: the bytes of the param and state dtypes):
  param read and written (2p), grad read (p), each of AdamW's two moments read and
  written (4s); with a master copy the param is written only (p) and the fp32 copy read
  and written (8): fp32 28 B, fp32 params with bf16 states 20 B, bf16 14 B, bf16 with a
  master copy 28 B (fp32 states) or 20 B (bf16 states).
Memory per element held: the param, the moments and the master copy (the grad, the
same for every row, and rng_state's 16 bytes per tensor are left out).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from .adafactor import parse_shapes

__all__ = ["rows", "bytes_per_element", "held_per_element", "run", "main"]

_F32, _BF16 = torch.float32, torch.bfloat16


def rows(backend: str) -> list[tuple[str, torch.dtype, dict | None]]:
    """(name, param dtype, fused_optim.AdamW policy options; None: torch's fused AdamW)."""
    return [
        ("torch fused fp32", _F32, None),
        ("fp32", _F32, {}),
        ("fp32, bf16 states", _F32, {"state_dtype": _BF16}),
        ("fp32, bf16 states, SR", _F32, {"state_dtype": _BF16, "stochastic_rounding": True}),
        ("torch fused bf16", _BF16, None),
        ("bf16", _BF16, {}),
        ("bf16, SR", _BF16, {"stochastic_rounding": True}),
        ("bf16, master", _BF16, {"master_weights": True}),
        ("bf16, master, bf16 states", _BF16, {"master_weights": True, "state_dtype": _BF16}),
    ]


def _sizes(dtype: torch.dtype, options: dict | None) -> tuple[int, int, bool]:
    from fused_optim import _policy

    p = torch.empty((), dtype=dtype).element_size()
    if options is None:
        return p, p, False
    state = _policy.state_dtype(_policy.policy_of(options), dtype)
    return p, torch.empty((), dtype=state).element_size(), bool(options.get("master_weights"))


def bytes_per_element(dtype: torch.dtype, options: dict | None) -> int:
    p, s, master = _sizes(dtype, options)
    return (p + 8 if master else 2 * p) + p + 4 * s


def held_per_element(dtype: torch.dtype, options: dict | None) -> int:
    p, s, master = _sizes(dtype, options)
    return p + 2 * s + (4 if master else 0)


def run(shapes, rounds: int = 10, warmup: int = 2, backend: str = "cpu",
        device: str | torch.device = "cpu") -> dict:
    import fused_optim

    from .probe import measure
    from .stats import paired_ratio, summarize

    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    init = [torch.randn(s).to(device) for s in shapes]
    grads = [torch.randn(s).to(device) for s in shapes]
    n = sum(math.prod(s) for s in shapes)
    runs = {}
    for name, dtype, options in rows(backend):
        params = [p.to(dtype, copy=True).requires_grad_() for p in init]
        for p, g in zip(params, grads):
            p.grad = g.to(dtype)
        if options is None:
            opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
        else:
            opt = fused_optim.AdamW(params, lr=1e-3, backend=backend, **options)
        runs[name] = (dtype, options, opt)
    for _ in range(warmup):
        for _, _, opt in runs.values():
            opt.step()
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (_, _, opt) in runs.items():
            sync()
            t0 = time.perf_counter()
            opt.step()
            sync()
            times[name].append(time.perf_counter() - t0)
    probe = measure(device, reps=3)
    copy = probe["streams"]["copy"]["gbps"]
    out = {"shapes": f"{len(shapes)} tensors, {n} elements", "threads": torch.get_num_threads(),
           "rounds": rounds, "backend": backend, "copy_gbps": copy, "rows": {}}
    for name, ts in times.items():
        dtype, options, _ = runs[name]
        s = summarize(ts)
        nbytes = bytes_per_element(dtype, options) * n
        out["rows"][name] = {
            "param_dtype": str(dtype).removeprefix("torch."),
            "options": {k: str(v) for k, v in (options or {}).items()},
            "bytes_per_element_moved": bytes_per_element(dtype, options),
            "bytes_per_element_held": held_per_element(dtype, options),
            "median_ms": s.median * 1e3, "gbps": nbytes / s.median / 1e9,
            "pct_of_copy": 100 * nbytes / s.median / 1e9 / copy,
            "speedup_vs_fp32": paired_ratio(times["fp32"], ts),
            "speedup_vs_torch_fused": paired_ratio(
                times[f"torch fused {'bf16' if dtype == _BF16 else 'fp32'}"], ts),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fused-optim-bench policy")
    ap.add_argument("--shapes", default="8x4194304")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--backend", default=None,
                    help="fused_optim's backend (default: cpu on the CPU, cuda on a GPU)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    backend = args.backend or ("cuda" if args.device.startswith("cuda") else "cpu")
    result = run(parse_shapes(args.shapes), args.rounds, backend=backend, device=args.device)
    print(f"AdamW by memory policy, {result['shapes']}, {result['threads']} threads, "
          f"backend {backend}, copy stream {result['copy_gbps']:.1f} GB/s")
    print(f"  {'row':28s} {'held B/el':>9s} {'moved B/el':>10s} {'ms':>8s} {'GB/s':>6s} "
          f"{'vs fp32':>8s} {'vs torch fused':>14s}")
    for name, e in result["rows"].items():
        print(f"  {name:28s} {e['bytes_per_element_held']:9d} {e['bytes_per_element_moved']:10d} "
              f"{e['median_ms']:8.2f} {e['gbps']:6.1f} {e['speedup_vs_fp32']:7.2f}x "
              f"{e['speedup_vs_torch_fused']:13.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
