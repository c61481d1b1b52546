"""fused_optim.bench: the benchmark harness and its CLI (``fused-optim-bench``,
``python -m fused_optim.bench``). See bench/__main__.py for usage and bench/runner.py for
how a step is timed."""
