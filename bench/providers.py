"""Optimizer implementations under test ("providers"), discovered at run time.

Each provider is one small class: ``available(device, dtype, optim)`` returns None or a
one-line reason it cannot run; ``prepare(...)`` does one-off work that must stay outside
the timing (DeepSpeed's JIT build of its C++/CUDA op); ``make(params, hyper)`` returns a
ready optimizer. Every baseline is called through its own public API, never re-implemented.

  torch-forloop, torch-foreach, torch-fused   torch.optim with foreach=False / True, fused=True
  fused_optim[<backend>]                      one per fused_optim backend (cpu, cuda, triton,
                                              reference), pinned with backend=<name>
  deepspeed                                   DeepSpeedCPUAdam on CPU, FusedAdam on CUDA
  bnb-32bit, bnb-8bit                         bitsandbytes optimizers, when installed
  torchao-8bit, torchao-4bit, torchao-fp8     torchao.optim low-bit AdamW, when installed

"torch-forloop" is also the reference of the correctness column: every provider's params
after the timed steps are compared with its.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Hyper", "Provider", "all_providers", "select", "REFERENCE", "BASELINE", "OPTIMS"]

REFERENCE = "torch-forloop"   # the correctness reference
BASELINE = "torch-fused"      # the speed baseline of the ratio column

OPTIMS = ("adamw", "adam", "sgd")


@dataclass(frozen=True)
class Hyper:
    """Hyperparameters of the benchmarked step. They do not change the bytes moved; they
    are chosen so that a step visibly moves bf16 params (see runner's init)."""

    optim: str
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    momentum: float = 0.9

    @classmethod
    def for_optim(cls, optim: str) -> Hyper:
        if optim == "adamw":
            return cls("adamw")
        if optim == "adam":
            return cls("adam", weight_decay=0.0)
        if optim == "sgd":
            return cls("sgd", lr=1e-2, weight_decay=0.0)
        raise ValueError(f"unknown optimizer {optim!r}; expected one of {', '.join(OPTIMS)}")

    def torch_kwargs(self) -> dict[str, Any]:
        if self.optim == "sgd":
            return dict(lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return dict(lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)

    def to_dict(self) -> dict:
        return dict(optim=self.optim, **self.torch_kwargs())


def _torch_class(optim: str):
    return {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[optim]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip().rstrip(":")


def _dist_version(*names: str) -> str | None:
    for n in names:
        try:
            return importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@dataclass
class Provider:
    """Base class. ``family`` groups providers for --providers (e.g. "torch")."""

    name: str
    family: str
    capturable: bool = False      # can run inside a CUDA graph (--cuda-graph)
    note: str = ""
    setup_s: float = 0.0          # one-off prepare time, reported, never timed
    _prepared: set = field(default_factory=set, repr=False)

    def available(self, device: torch.device, dtype: torch.dtype, optim: str) -> str | None:
        raise NotImplementedError

    def prepare(self, device: torch.device, dtype: torch.dtype, optim: str) -> None:
        """One-off work (JIT builds); runs outside the timing."""

    def make(self, params: list[torch.Tensor], hyper: Hyper, *, capturable: bool = False):
        raise NotImplementedError

    def version(self) -> str | None:
        return None

    def not_in_all(self, device: torch.device) -> str | None:
        """Why ``--providers all`` leaves this provider out on ``device`` (None: it is in).
        Naming the provider or its family runs it anyway."""
        return None


# --------------------------------------------------------------------------------------
# torch.optim
# --------------------------------------------------------------------------------------

class TorchOptim(Provider):
    def __init__(self, impl: str):
        super().__init__(name=f"torch-{impl}", family="torch",
                         capturable=impl in ("foreach", "fused"))
        self.impl = impl

    def available(self, device, dtype, optim):
        if optim not in OPTIMS:
            return f"torch.optim has no {optim!r} here"
        if self.impl == "fused":
            # torch checks this at construction; ask it the same way, on a 1-element tensor.
            try:
                p = torch.zeros(1, device=device, dtype=dtype, requires_grad=True)
                _torch_class(optim)([p], fused=True, **Hyper.for_optim(optim).torch_kwargs())
            except Exception as e:  # noqa: BLE001
                return _first_line(e)
        return None

    def make(self, params, hyper, *, capturable=False):
        kw = hyper.torch_kwargs()
        if self.impl == "forloop":
            kw.update(foreach=False)
        elif self.impl == "foreach":
            kw.update(foreach=True)
        else:
            kw.update(fused=True)
        if capturable and hyper.optim != "sgd":
            kw.update(capturable=True)
        return _torch_class(hyper.optim)(params, **kw)

    def version(self):
        return torch.__version__


# --------------------------------------------------------------------------------------
# fused_optim, one provider per backend
# --------------------------------------------------------------------------------------

FUSED_OPTIM_BACKENDS = ("cpu", "cuda", "triton", "reference")


class FusedOptim(Provider):
    def __init__(self, backend: str):
        super().__init__(name=f"fused_optim[{backend}]", family="fused_optim", capturable=True)
        self.backend = backend

    def _module(self):
        return importlib.import_module("fused_optim")

    def available(self, device, dtype, optim):
        try:
            fo = self._module()
            from fused_optim.backends import available_backends
        except Exception as e:  # noqa: BLE001  (a broken build must not stop the bench)
            return f"fused_optim does not import ({_first_line(e)})"
        cls = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}.get(optim)
        if cls is None or not hasattr(fo, cls):
            return f"fused_optim has no {optim!r}"
        try:
            reasons = available_backends(device, dtype)
        except Exception as e:  # noqa: BLE001
            return _first_line(e)
        if self.backend not in reasons:
            return f"backend {self.backend!r} is not registered"
        return reasons[self.backend]

    def make(self, params, hyper, *, capturable=False):
        fo = self._module()
        cls = {"adamw": fo.AdamW, "adam": fo.Adam, "sgd": fo.SGD}[hyper.optim]
        kw = hyper.torch_kwargs()
        if capturable and hyper.optim != "sgd":
            kw.update(capturable=True)
        return cls(params, backend=self.backend, **kw)

    def version(self):
        try:
            fo = self._module()
        except Exception:  # noqa: BLE001
            return None
        return getattr(fo, "__version__", None)


# --------------------------------------------------------------------------------------
# DeepSpeed
# --------------------------------------------------------------------------------------

class DeepSpeed(Provider):
    """DeepSpeedCPUAdam on CPU, FusedAdam on CUDA. Both are built by DeepSpeed's op
    builder (ninja) on first use; ``prepare`` does that build, outside the timing, and the
    build time is reported as setup_s."""

    def __init__(self):
        super().__init__(name="deepspeed", family="deepspeed")

    def available(self, device, dtype, optim):
        if optim not in ("adamw", "adam"):
            return f"DeepSpeed has no {optim!r} optimizer for this benchmark (Adam/AdamW only)"
        if importlib.util.find_spec("deepspeed") is None:
            return "not installed (pip install deepspeed)"
        if device.type == "cpu":
            if dtype not in (torch.float32, torch.bfloat16, torch.float16):
                return f"DeepSpeedCPUAdam does not take {dtype}"
            return None
        if device.type == "cuda":
            if dtype not in (torch.float32, torch.bfloat16, torch.float16):
                return f"FusedAdam does not take {dtype}"
            return None
        return f"no DeepSpeed optimizer for device {device.type}"

    def _builder(self, device):
        _quiet_deepspeed()
        if device.type == "cpu":
            from deepspeed.ops.op_builder import CPUAdamBuilder
            return CPUAdamBuilder()
        from deepspeed.ops.op_builder import FusedAdamBuilder
        return FusedAdamBuilder()

    def prepare(self, device, dtype, optim):
        if device.type in self._prepared:
            return
        import time
        t0 = time.perf_counter()
        self._builder(device).load()
        self.setup_s += time.perf_counter() - t0
        self._prepared.add(device.type)

    def make(self, params, hyper, *, capturable=False):
        _quiet_deepspeed()
        adamw = hyper.optim == "adamw"
        if params[0].device.type == "cpu":
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            return DeepSpeedCPUAdam(params, lr=hyper.lr, betas=hyper.betas, eps=hyper.eps,
                                    weight_decay=hyper.weight_decay, adamw_mode=adamw)
        from deepspeed.ops.adam import FusedAdam
        return FusedAdam(params, lr=hyper.lr, betas=hyper.betas, eps=hyper.eps,
                         weight_decay=hyper.weight_decay, adam_w_mode=adamw)

    def version(self):
        return _dist_version("deepspeed")


def _quiet_deepspeed():
    import logging
    import os
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.ERROR)


# --------------------------------------------------------------------------------------
# bitsandbytes
# --------------------------------------------------------------------------------------

class Bitsandbytes(Provider):
    def __init__(self, bits: int):
        super().__init__(name=f"bnb-{bits}bit", family="bnb")
        self.bits = bits

    def available(self, device, dtype, optim):
        if importlib.util.find_spec("bitsandbytes") is None:
            return "not installed (pip install bitsandbytes)"
        try:
            bnb = importlib.import_module("bitsandbytes")
        except Exception as e:  # noqa: BLE001
            return f"bitsandbytes does not import ({_first_line(e)})"
        if optim not in ("adamw", "adam", "sgd"):
            return f"no bitsandbytes {optim!r}"
        # Ask the library itself: one step on a tensor larger than its 8-bit threshold
        # (4096 elements; smaller tensors silently stay 32-bit).
        try:
            p = torch.zeros(8192, device=device, dtype=dtype, requires_grad=True)
            p.grad = torch.ones_like(p)
            self.make([p], Hyper.for_optim(optim)).step()
        except Exception as e:  # noqa: BLE001
            return f"bitsandbytes {bnb.__version__} cannot step {dtype} on {device.type} ({_first_line(e)})"
        return None

    def not_in_all(self, device):
        if device.type == "cpu":
            return "slow CPU fallback: on CPU only when named (--providers all,bnb)"
        return None

    def make(self, params, hyper, *, capturable=False):
        import bitsandbytes as bnb
        kw = hyper.torch_kwargs()
        if hyper.optim == "sgd":
            return bnb.optim.SGD(params, optim_bits=self.bits, **kw)
        cls = bnb.optim.AdamW if hyper.optim == "adamw" else bnb.optim.Adam
        return cls(params, optim_bits=self.bits, **kw)

    def version(self):
        return _dist_version("bitsandbytes")


# --------------------------------------------------------------------------------------
# torchao
# --------------------------------------------------------------------------------------

class TorchAO(Provider):
    """torchao.optim's low-bit AdamW. Their step is torch.compile'd: the first step
    (outside the timing) compiles it."""

    CLASSES = {"8bit": "AdamW8bit", "4bit": "AdamW4bit", "fp8": "AdamWFp8"}

    def __init__(self, kind: str):
        super().__init__(name=f"torchao-{kind}", family="torchao")
        self.kind = kind

    def _optim_module(self):
        try:
            return importlib.import_module("torchao.optim")
        except ImportError:
            return importlib.import_module("torchao.prototype.low_bit_optim")

    def available(self, device, dtype, optim):
        if importlib.util.find_spec("torchao") is None:
            return "not installed (pip install torchao)"
        if optim not in ("adamw", "adam"):
            return f"torchao.optim has no low-bit {optim!r}"
        try:
            mod = self._optim_module()
        except Exception as e:  # noqa: BLE001
            return f"torchao does not import ({_first_line(e)})"
        if not hasattr(mod, self.CLASSES[self.kind]):
            return f"torchao has no {self.CLASSES[self.kind]}"
        if self.kind == "fp8" and (device.type != "cuda"
                                   or torch.cuda.get_device_capability(device) < (8, 9)):
            return "AdamWFp8 needs a CUDA GPU with fp8 (sm89+)"
        return None

    def not_in_all(self, device):
        if device.type == "cpu":
            return "targets GPUs: on CPU only when named (--providers all,torchao)"
        return None

    def make(self, params, hyper, *, capturable=False):
        mod = self._optim_module()
        cls = getattr(mod, self.CLASSES[self.kind])
        wd = hyper.weight_decay if hyper.optim == "adamw" else 0.0
        return cls(params, lr=hyper.lr, betas=hyper.betas, eps=hyper.eps, weight_decay=wd)

    def version(self):
        return _dist_version("torchao")


# --------------------------------------------------------------------------------------
# Discovery and selection
# --------------------------------------------------------------------------------------

def all_providers() -> list[Provider]:
    """Every provider this harness knows, installed or not (in table order)."""
    backends = list(FUSED_OPTIM_BACKENDS)
    try:  # a backend registered beyond the built-in four is benchmarked too
        from fused_optim.backends import backend_names, available_backends
        available_backends("cpu")  # loads the built-in backends
        backends += [b for b in backend_names() if b not in backends]
    except Exception:  # noqa: BLE001  (reported per provider by available())
        pass
    return [
        TorchOptim("forloop"), TorchOptim("foreach"), TorchOptim("fused"),
        *[FusedOptim(b) for b in backends],
        DeepSpeed(),
        Bitsandbytes(32), Bitsandbytes(8),
        TorchAO("8bit"), TorchAO("4bit"), TorchAO("fp8"),
    ]


def select(providers: list[Provider], spec: str,
           device: torch.device | str = "cpu") -> tuple[list[Provider], dict[str, str]]:
    """Providers named by --providers: "all", or a comma list of names, families or
    globs ("torch-fused,fused_optim,deepspeed", "torch-*"), "all" among them.

    Returns (chosen, left_out): "all" leaves out the providers whose ``not_in_all`` gives
    a reason on ``device``; left_out maps their names to it."""
    device = torch.device(device)
    tokens = [t.strip() for t in spec.split(",") if t.strip()] or ["all"]
    chosen: list[Provider] = []
    left_out: dict[str, str] = {}
    for token in tokens:
        if token == "all":
            for p in providers:
                why = p.not_in_all(device)
                if why is not None:
                    left_out.setdefault(p.name, why)
                elif p not in chosen:
                    chosen.append(p)
            continue
        hits = [p for p in providers
                if p.family == token or fnmatch.fnmatchcase(p.name, token)
                or p.name == token]
        if not hits:
            names = ", ".join(sorted({p.name for p in providers} | {p.family for p in providers}))
            raise ValueError(f"--providers: {token!r} matches none of: {names}")
        chosen += [p for p in hits if p not in chosen]
    for p in chosen:
        left_out.pop(p.name, None)
    return [p for p in providers if p in chosen], left_out  # keep table order
