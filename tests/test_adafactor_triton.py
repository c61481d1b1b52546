"""The Triton factored-moment engine (triton_kernels/factored.py) on the CPU, under the
Triton interpreter: against the reference engine on the same inputs, and through
fused_optim.Adafactor(backend="triton") against torch.optim.Adafactor.

@triton.jit decides at decoration time whether it interprets (see [note:
TRITON_INTERPRET ordering] in tests/test_triton.py), so unless this process already
runs with TRITON_INTERPRET=1 the module runs itself in a fresh interpreter that does
(test_in_subprocess). The interpreter costs ~3 ms per program instance: tensors are
small, and the item and block sizes are shrunk (item=64, block=16 elements) so that
several items per matrix and several blocks per row are exercised.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(INTERPRETING or not HAVE_TRITON, reason="runs the tests below instead")
def test_in_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(Path(__file__))], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


needs_interpreter = pytest.mark.skipif(not (INTERPRETING and HAVE_TRITON),
                                       reason="needs TRITON_INTERPRET=1 (test_in_subprocess)")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if a.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-300)).item()


def _inputs(dtype, lr):
    from test_adafactor import engine_inputs

    return engine_inputs(dtype, lr, [(5, 7), (2, 3, 33), (1, 1), (9, 20)], [(9,), (), (70,)])


@needs_interpreter
@pytest.mark.parametrize("lr", [torch.tensor(0.05, dtype=torch.float64), torch.tensor(0.02)],
                         ids=["float-lr", "tensor-lr"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_engine_matches_reference(dtype, lr):
    """Three steps on the same inputs: steps equal, every tensor within the sums' rounding
    (float64: 1e-14, float32: 1e-6 of each tensor's largest element; bfloat16: 1 ulp)."""
    from fused_optim._factored import reference_adafactor
    from fused_optim.triton_kernels import factored

    args, kwargs = _inputs(dtype, lr)
    mine = [[t.clone() for t in lst] for lst in args]
    tol = {torch.float64: 1e-14, torch.float32: 1e-6, torch.bfloat16: 2.0**-7}[dtype]
    for _ in range(3):
        reference_adafactor(*args, **kwargs)
        factored.adafactor(*mine, **kwargs, item=64, block=16)
        for lst_ref, lst_mine in zip(args, mine):
            for a, b in zip(lst_ref, lst_mine):
                assert _rel_err(a, b) <= tol, (tuple(a.shape), _rel_err(a, b))
        assert all(torch.equal(a, b) for a, b in zip(args[5], mine[5]))


@needs_interpreter
@pytest.mark.parametrize("case", [{}, {"lr": 0.5, "weight_decay": 0.1, "maximize": True,
                                       "eps": (1e-3, 1e-3), "beta2_decay": -0.5, "d": 1.5}],
                         ids=["default", "every-option"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_parity_with_torch(dtype, case):
    import fused_optim

    assert fused_optim.available_backends("cpu", dtype)["triton"] is None
    from test_adafactor import RTOL, run_parity

    run_parity(dtype, [(3, 5), (4,), (2, 3, 7), ()], case, "triton", steps=3,
               rtol=RTOL[dtype])


@needs_interpreter
def test_no_host_sync():
    from torch.utils._python_dispatch import TorchDispatchMode

    import fused_optim

    class CountSyncs(TorchDispatchMode):
        syncs = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                type(self).syncs += 1
            return func(*args, **(kwargs or {}))

    params = [torch.nn.Parameter(torch.randn(s)) for s in [(4, 5), (3,)]]
    opt = fused_optim.Adafactor(params, lr=torch.tensor(0.01), weight_decay=0.1,
                                backend="triton")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    with CountSyncs():
        opt.step()
    assert CountSyncs.syncs == 0
