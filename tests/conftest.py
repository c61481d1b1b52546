"""Shared set-up of the tests.

* Every test: a fixed seed, and the global choices a test may change restored after it
  (CPU kernel variant, intra-op thread count, the backend selection cache).
* `oracle_threads` (used by the parity / contract / bad-input / op tests): one intra-op
  thread while the test runs. On a small shared machine ATen's and MKL's element-wise
  ops on a few thousand elements take milliseconds with two threads under load; that is
  the torch.optim oracle's cost, not ours. Fused steps of the "cpu" backend still run with
  the default thread count (tests/_oracle.py: fused_threads), so the CPU engine's
  parallel region really runs.
* FUSED_OPTIM_FAILURES_LOG=<file>: each failing test's id and short traceback appended
  there as it fails (under xdist too), so a run killed at its time limit, which prints
  no summary, still tells what failed (.ci/gpu_check.sh).
"""

from __future__ import annotations

import os

import pytest
import torch

from fused_optim import _extension
from fused_optim import backends as _backends


@pytest.fixture(autouse=True)
def _fixed_seed_and_restored_globals():
    torch.manual_seed(0)
    cap = _extension.C.cpu_capability() if _extension.C is not None else None
    threads = torch.get_num_threads()
    yield
    if cap is not None and _extension.C.cpu_capability() != cap:
        _extension.C.set_cpu_capability(cap)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    _backends._SELECTED.clear()


@pytest.fixture
def oracle_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_runtest_logreport(report):
    path = os.environ.get("FUSED_OPTIM_FAILURES_LOG")
    if not path or not report.failed or hasattr(report, "node"):  # xdist's copy of it
        return
    with open(path, "a") as out:
        out.write(f"FAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
