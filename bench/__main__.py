"""fused-optim-bench / python -m fused_optim.bench: the benchmark's command line.

    fused-optim-bench                      # CPU, AdamW fp32+bf16, 8x4M 2048x16K gpt2 resnet50
    fused-optim-bench --optim all --dtype fp32,bf16 \\
        --shapes gpt2-124m,llama-1b-layer,resnet50 --providers all --device cuda \\
        --json out.json --plot out.png
    fused-optim-bench --list               # the optimizers, which providers run here and why not
    fused-optim-bench --optim sparseadam,adagrad,sgd --shapes embeddings --dtype fp32 \\
        --providers torch,'fused_optim[cpu]'   # sparse grads: nn.Embedding(sparse=True)
    fused-optim-bench adafactor|muon|lbfgs [--help]   # the steps that are not element-wise
    fused-optim-bench policy [--help]      # AdamW step time and memory per memory policy
    fused-optim-bench quality [--help]     # loss curves of the memory policies (bf16, ...)

The optimizers whose step is not element-wise have a runner of their own each, with its
own model of the work (SUBCOMMANDS): Adafactor's bytes (bench/adafactor.py), Muon's
Newton-Schulz flops and the batching effect (bench/muon_bench.py), LBFGS's step time on
a quadratic, closure excluded (bench/lbfgs_quadratic.py); AdamW's step time and memory
under each memory policy (bench/policy.py). ``quality`` measures training quality, not
speed: the loss curves of a small GPT trained under each memory policy
(bench/quality.py).

The optimizers are fused_optim's (every exported class with a spec, by its class name
lowercased; see providers.optimizers). The table goes to stdout, progress to stderr.
--out DIR writes DIR/<device>/<stamp>.json and .png, <device> being "cpu" or the GPU's
name ("nvidia-h200"); committed results under bench/results/<device>/ are made this way
only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

__all__ = ["main", "build_parser"]


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    from .providers import optim_names
    from .runner import Config
    from .shapes import EMBEDDING_GROUP, EMBEDDINGS, MODELS, SWEEPS

    d = Config()
    ap = argparse.ArgumentParser(
        prog="fused-optim-bench",
        description="Benchmarks fused_optim's optimizers against torch.optim and other "
                    "optimizer libraries: ms/step, GB/s, % of measured bandwidth, ratios vs "
                    "torch-fused and vs torch's fastest implementation, peak memory and "
                    "max error vs torch's for-loop.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=d.device, help="cpu or cuda[:N] (default: cpu)")
    ap.add_argument("--optim", default=",".join(d.optims),
                    help="'all' or a comma list of "
                         f"{', '.join(optim_names()) or '(none: fused_optim does not import)'}"
                         f" (default: {','.join(d.optims)})")
    ap.add_argument("--dtype", default=",".join(d.dtypes),
                    help="comma list of fp32, bf16, fp16, fp64: the params' (and grads') "
                         "dtype (default: fp32,bf16)")
    ap.add_argument("--shapes", default=",".join(d.shapes),
                    help=f"comma list of models ({', '.join(MODELS)}), sweeps "
                         f"({', '.join(SWEEPS)}), NxM literals like 8x4M, 2048x16K, or "
                         f"embedding tables with sparse grads ({', '.join(EMBEDDINGS)}, "
                         f"'{EMBEDDING_GROUP}' for the three, embRxD:L[:H] literals like "
                         "emb1000x16:256: R rows of D, L lookups a step [from H hot rows]; "
                         "the optimizers that take sparse grads run on them: sparseadam, "
                         f"sgd, adagrad) (default: {','.join(d.shapes)})")
    ap.add_argument("--scale", type=float, default=None,
                    help="multiply the element count of every tensor of the models and "
                         "sweeps (not NxM literals); default 0.25 on CPU, 1 on CUDA")
    ap.add_argument("--providers", default=d.providers,
                    help="'all' or a comma list of provider names, families or globs: "
                         "torch, torch-fused, fused_optim, 'fused_optim[cpu]', deepspeed, "
                         "bnb, torchao (default: all; on CPU 'all' leaves out bnb and "
                         "torchao, whose CPU paths are slow fallbacks: add them by name)")
    ap.add_argument("--warmup", type=int, default=d.warmup, help="warm-up rounds (default: 2)")
    ap.add_argument("--repeat", type=int, default=d.repeat,
                    help="timed rounds at most (default: 10)")
    ap.add_argument("--min-repeat", type=int, default=d.min_repeat,
                    help="timed rounds at least, whatever the budget (default: 3)")
    ap.add_argument("--budget", type=float, default=d.budget_s,
                    help="seconds of timed rounds per case; cuts --repeat (default: 5)")
    ap.add_argument("--max-step", type=float, default=d.max_step_s,
                    help="drop a provider (not torch-fused or torch-forloop) from a case "
                         "when its warm-up steps take longer (seconds; default: 5)")
    ap.add_argument("--gap-ms", type=float, default=None,
                    help="idle time, outside the timing, before a step on another thread "
                         "pool than the step before, so the previous provider's OpenMP "
                         "threads stop spinning (default: 20 CPU, 0 CUDA)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="CUDA: capture capturable providers once and time graph replays")
    ap.add_argument("--memory-fraction", type=float, default=d.memory_fraction,
                    help="skip a case whose estimated memory (every provider's params, "
                         "grads and states at once) exceeds this fraction of the free "
                         f"memory (default: {d.memory_fraction:g})")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--no-probe", action="store_true",
                    help="skip the bandwidth probe (no %% of limit column)")
    ap.add_argument("--probe-numel", type=int, default=None,
                    help="elements per array of the bandwidth probe (default: 32M CPU, 256M CUDA)")
    ap.add_argument("--json", metavar="PATH", help="write the JSON document here")
    ap.add_argument("--plot", metavar="PATH", help="write the PNG plot here")
    ap.add_argument("--out", metavar="DIR",
                    help="write DIR/<device>/<stamp>.json and .png (e.g. results, bench/results)")
    ap.add_argument("--load", metavar="PATH",
                    help="print the table of a saved JSON (and --plot it) instead of running")
    ap.add_argument("--list", action="store_true",
                    help="list the providers and whether they can run, then exit")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    return ap


class _RichProgress:
    """Progress on stderr: one bar for the case being run, one for the whole run."""

    def __init__(self, n_cases: int):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn)

        self.console = Console(stderr=True)
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=self.console, transient=True)
        self.total = self.bar.add_task("all cases", total=n_cases)
        self.case = None

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def note(self, message):
        self.bar.console.print(message, style="dim", highlight=False, markup=False)

    def start_case(self, label, total):
        self.case = self.bar.add_task(label, total=total)

    def set_total(self, total):
        if self.case is not None:
            self.bar.update(self.case, total=total)

    def advance(self):
        if self.case is not None:
            self.bar.advance(self.case)

    def end_case(self):
        if self.case is not None:
            self.bar.remove_task(self.case)
            self.case = None
        self.bar.advance(self.total)


class _PlainProgress:
    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def _say(self, msg):
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def note(self, message):
        self._say(message)

    def start_case(self, label, total):
        self._t = time.perf_counter()
        self._label = label

    def set_total(self, total):
        pass

    def advance(self):
        pass

    def end_case(self):
        self._say(f"  {self._label}: {time.perf_counter() - self._t:.1f} s")


def _list(cfg) -> int:
    import torch

    from .bytes_model import algorithm_for
    from .providers import Hyper, all_providers, grads_reason, optim_names, resolve_optims, select
    from .runner import DTYPES

    device = torch.device(cfg.device)
    print("optimizers (fused_optim's, --optim all):")
    for name in optim_names():
        lines = []
        for sparse in (False, True):
            if grads_reason(name, sparse) is not None:
                continue
            h = Hyper.for_optim(name, sparse=sparse)
            alg = algorithm_for(name, sparse=sparse)
            lines.append(f"{'sparse' if sparse else 'dense'} grads: bench kwargs {h.kwargs}, "
                         f"reads {'+'.join(alg.reads)}, writes {'+'.join(alg.writes)}")
        print(f"  {name:12s} spec {Hyper.for_optim(name).spec.name!r}, "
              + f"\n  {'':12s} ".join(lines))
    optims = resolve_optims(cfg.optims)
    chosen, left_out = select(all_providers(), cfg.providers, device)
    for name, why in left_out.items():
        print(f"{name:24s} {'(all)':11s} left out: {why}")
    for p in chosen:
        for optim in optims:
            for dt in cfg.dtypes:
                for sparse in (False, True):
                    why = grads_reason(optim, sparse)
                    if why is not None:
                        continue
                    check = p.sparse_grads if sparse else p.available
                    reason = check(device, DTYPES[dt], optim)
                    state = "ok" if reason is None else f"skipped: {reason}"
                    kind = f"{optim}/{dt}" + ("/sparse" if sparse else "")
                    print(f"{p.name:24s} {kind:22s} {state}")
    return 0


# fused-optim-bench <name> ...: the runners of the optimizers that are not element-wise.
SUBCOMMANDS = {"adafactor": "adafactor", "muon": "muon_bench", "lbfgs": "lbfgs_quadratic",
               "policy": "policy", "quality": "quality"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        import importlib

        runner = importlib.import_module(f"{__package__}.{SUBCOMMANDS[argv[0]]}")
        return int(runner.main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    from . import report
    from .runner import Config, run
    from .shapes import resolve

    cfg = Config(device=args.device, optims=_csv(args.optim), dtypes=_csv(args.dtype),
                 shapes=_csv(args.shapes), scale=args.scale, providers=args.providers,
                 warmup=args.warmup, repeat=args.repeat, min_repeat=args.min_repeat,
                 budget_s=args.budget, cuda_graph=args.cuda_graph, seed=args.seed,
                 threads=args.threads, probe=not args.no_probe, probe_numel=args.probe_numel,
                 max_step_s=args.max_step, gap_ms=args.gap_ms,
                 memory_fraction=args.memory_fraction)
    if args.repeat < 1 or args.min_repeat < 1 or args.warmup < 0:
        print("fused-optim-bench: --repeat and --min-repeat must be >= 1, --warmup >= 0",
              file=sys.stderr)
        return 2
    if args.plot or args.out:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("fused-optim-bench: --plot/--out need matplotlib (pip install matplotlib)",
                  file=sys.stderr)
            return 2
    if args.list:
        try:
            return _list(cfg)
        except ValueError as e:
            print(f"fused-optim-bench: {e}", file=sys.stderr)
            return 2
    if args.load:
        import json

        with open(args.load) as f:
            doc = json.load(f)
        report.validate(doc)
        report.print_table(doc)
        if args.plot:
            report.plot(doc, args.plot)
            print(f"wrote {args.plot}")
        return 0
    try:
        from .providers import grads_reason, resolve_optims

        cfg.optims = resolve_optims(cfg.optims)
        shapes = resolve(cfg.shapes, cfg.resolved_scale())
        n_cases = len(cfg.dtypes) * sum(grads_reason(o, s.sparse) is None
                                        for o in cfg.optims for s in shapes)
    except ValueError as e:
        print(f"fused-optim-bench: {e}", file=sys.stderr)
        return 2

    progress = None
    if not args.quiet and sys.stderr.isatty():
        try:
            progress = _RichProgress(n_cases)
        except ImportError:
            progress = None
    progress = progress or _PlainProgress(args.quiet)
    try:
        with progress:
            doc = run(cfg, progress)
    except (ValueError, RuntimeError) as e:
        print(f"fused-optim-bench: {e}", file=sys.stderr)
        return 2

    report.print_table(doc)
    paths = []
    json_path, plot_path = args.json, args.plot
    if args.out:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(doc["created_unix"]))
        sha = (doc["machine"]["commit"].get("sha") or "nocommit")[:10]
        from .machine import results_dir

        base = os.path.join(args.out, results_dir(doc["machine"]), f"{stamp}-{sha}")
        json_path = json_path or base + ".json"
        plot_path = plot_path or base + ".png"
    if json_path:
        report.write_json(doc, json_path)
        paths.append(json_path)
    if plot_path:
        report.plot(doc, plot_path)
        paths.append(plot_path)
    for p in paths:
        print(f"wrote {p}")
    failed = [r for r in doc["results"] if r["status"] == "failed"]
    return 1 if failed and all(r["status"] != "ok" for r in doc["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
