"""The Triton kernels under the interpreter in a test process, for test modules other than
test_triton.py ([note: TRITON_INTERPRET ordering] there: TRITON_INTERPRET=1 must be set
when the kernels are first imported, and one process holds one flavour).

`load()` imports them interpreted when this process may hold interpreted kernels (triton
installed, and no GPU, or TRITON_INTERPRET=1 set by the caller), then puts the variable
back as it was, and says whether they run interpreted here. Where they do not (a GPU
machine), a module runs its Triton tests in a fresh interpreter instead, as
test_triton.py does.
"""

from __future__ import annotations

import importlib.util
import os

import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def load() -> bool:
    previous = os.environ.get("TRITON_INTERPRET")
    if not HAVE_TRITON or not (previous == "1" or not torch.cuda.is_available()):
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        from fused_optim import _triton_backend

        _triton_backend.load_kernels()
        return bool(_triton_backend._kernels_interpreted())
    except ImportError:
        return False
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
