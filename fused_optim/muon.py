"""Muon: a drop-in for torch.optim.Muon, with same-shape params orthogonalized together.

A step of a param group runs, per batch of params of one (device, dtype, shape):

  1. momentum: ONE engine call (the spec-driven op torch.ops.fused_optim.muon_, its
     momentum stage): B <- lerp(B, g, 1 - momentum), and the update (B, or lerp(g, B,
     momentum) with nesterov) written as bf16 into one [batch, m, n] tensor;
  2. ONE batched Newton-Schulz run over that tensor (fused_optim/_newton_schulz.py: a
     bmm / baddbmm per product instead of one mm / addmm per param);
  3. apply: ONE engine call (the same op, its apply stage): p <- p * (1 - lr *
     weight_decay), then p <- p - lr' O, with lr' torch's shape-adjusted lr (equal
     across a batch: the op's per-call lr_ratio).

A batch is cut into chunks of at most _newton_schulz.MAX_BATCH_ELEMENTS elements (fewer
on the CPU, where a batch larger than the cache is slower: _newton_schulz.chunks), each
stepped (1-3) before the next, so the extra memory is one chunk's.

Why the element-wise stages are an op of the shared engine with a bf16 work list: the
momentum stage writes the Newton-Schulz input, and the apply stage reads its output, in
bf16 beside params of any dtype (the spec's ``StateList(dtype="bfloat16")``, [note: bf16
work lists] in csrc/include/fused_optim/math/optimizer.h), and the math (csrc/include/
fused_optim/math/muon.h) rounds as torch's separate ops round: lerp with one fused
multiply-add, the decayed param stored in its dtype before the update is added, the add
one fused multiply-add with alpha in the add's dtype. So the numbers are torch's bit for
bit on the CPU in fp64 / fp32 / bf16 / fp16 (tests/test_muon.py), with 2 passes over
memory per batch where torch's per-param code makes 5 (lerp_, lerp, bfloat16, mul_,
add_). The stages run on every built-in backend: the CPU and CUDA engines, the Triton
kernels (their generic work lists: [note: work lists] in triton_kernels/launcher.py)
and the reference. bf16 params' apply stage runs on the reference everywhere (_stage):
torch's own add_ rounds by position on the CPU, which the kernels cannot, and on a GPU
it keeps alpha in fp32 where the CPU's casts it to bf16.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from fused_optim import _newton_schulz
from fused_optim._newton_schulz import chunks, newton_schulz_
from fused_optim._reference import lr_mul, lr_sub_from, opmath_of
from fused_optim.backends import AUTO_ORDER, DEFAULT_AUTO_ORDER, get_backend, select_backend
from fused_optim.optimizer import _lr_tensor, _same_dense_layout
from fused_optim.spec import Hyper, Spec, StateList, register

__all__ = ["Muon"]

# torch.optim.Muon's defaults (those of Keller Jordan's Muon).
EPS = 1e-7
DEFAULT_A = 3.4445
DEFAULT_B = -4.7750
DEFAULT_C = 2.0315
DEFAULT_NS_STEPS = 5


def adjusted_lr(lr: float | Tensor, adjust_lr_fn: str | None, shape: torch.Size) -> float | Tensor:
    """lr scaled for a param of this shape, as torch.optim.Muon scales it: by
    sqrt(max(1, rows / cols)) ("original", the default), 0.2 sqrt(max(rows, cols))
    ("match_rms_adamw"), or 1."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        ratio = math.sqrt(max(1, rows / cols))
    elif adjust_lr_fn == "match_rms_adamw":
        ratio = 0.2 * math.sqrt(max(rows, cols))
    else:
        ratio = 1.0
    return lr * ratio


def lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """adjusted_lr's factor for a param of this shape (the op's per-call lr_ratio)."""
    return adjusted_lr(1.0, adjust_lr_fn, shape)


def muon_reference(x: dict[str, Tensor], grad: Tensor, state: dict[str, Tensor], lr: Tensor,
                   h: dict[str, Any]) -> None:
    """Muon's element-wise stages on one param in torch's own ops, in the param's dtype
    (see fused_optim/_reference.py): the momentum stage (apply=False) updates the buffer
    and writes the update, the apply stage decays the param and adds the orthogonalized
    update (x["update"]) times -lr * lr_ratio; with transposed_update, added from the
    layout transposed to the param's, as torch adds a tall param's update (its
    strided loop, which rounds differently for bf16)."""
    dtype = h["param_dtype"]
    opmath = opmath_of(dtype)
    if h["apply"]:
        p = x["param"].to(dtype, copy=True)
        p.mul_(lr_sub_from(1, lr_mul(lr, h["weight_decay"])))
        # torch passes -adjusted_lr as a Python number (a tensor lr's is read on the host).
        alpha = -lr_mul(lr, h["lr_ratio"]).item()
        update = x["update"].to(torch.bfloat16)
        if h["transposed_update"]:
            update = update.mT.contiguous().mT if p.is_contiguous() else update.contiguous()
        p.add_(update, alpha=alpha)
        x["param"] = p.to(opmath)
        return
    buf = x["momentum_buffer"].to(dtype, copy=True)
    g = grad.to(dtype)
    buf.lerp_(g, 1 - h["momentum"])
    x["momentum_buffer"] = buf.to(opmath)
    x["update"] = (g.lerp(buf, h["momentum"]) if h["nesterov"] else buf).to(opmath)


# The element-wise stages' op, torch.ops.fused_optim.muon_ (its C++ math:
# csrc/include/fused_optim/math/muon.h). `updates` is the bf16 work list: the
# Newton-Schulz input (written by the momentum stage) and output (read by apply).
STAGES = register(Spec(
    name="muon",
    lists=(StateList("momentum_buffers", "momentum_buffer"),
           StateList("updates", "update", dtype="bfloat16")),
    scalars=(),
    hypers=(Hyper("momentum"), Hyper("weight_decay"), Hyper("lr_ratio", group_key=""),
            Hyper("nesterov", bool), Hyper("apply", bool, group_key=""),
            Hyper("transposed_update", bool, group_key="")),
    reference=muon_reference,
    stages_of="Muon",
))


class Muon(Optimizer):
    r"""Implements Muon (MomentUm Orthogonalized by Newton-Schulz) for 2-D params, with
    the Newton-Schulz iteration of all same-shape params run as one batched product.

    The numbers, arguments, defaults, validation errors and state (``momentum_buffer``)
    are those of :class:`torch.optim.Muon`, and ``state_dict()`` loads both ways with it.

    .. math::
       \begin{aligned}
            & g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})
              \qquad B_t \leftarrow \mu B_{t-1} + (1 - \mu) g_t                          \\
            & \widetilde{B}_t \leftarrow (1 - \mu) g_t + \mu B_t \text{ if nesterov, else } B_t
              \qquad O_t \leftarrow \mathrm{NS}^{(a,b,c)}_k(\widetilde{B}_t;\ \varepsilon) \\
            & \theta_t \leftarrow (1 - \gamma\lambda)\,\theta_{t-1}
              - \gamma\,r(\mathrm{shape}(\theta))\, O_t
       \end{aligned}

    with :math:`B` the ``momentum_buffer`` state, :math:`\mathrm{NS}` :math:`k` steps of
    the quintic Newton-Schulz iteration in bf16 on :math:`\widetilde{B}_t / \max(\lVert
    \widetilde{B}_t\rVert_F, \varepsilon)` (transposed when it has more rows than
    columns), and :math:`r` the lr adjustment of ``adjust_lr_fn``: :math:`\sqrt{\max(1,
    A/B)}` ("original", the default) or :math:`0.2\sqrt{\max(A, B)}` ("match_rms_adamw")
    for an :math:`A \times B` param. As in torch.optim.Muon, a bf16 param's momentum
    buffer without nesterov is the iteration's input and is left divided by its norm.

    Args:
        {params} Muon takes 2-D params only (hidden layers' weights): step biases,
            embeddings and other params with another optimizer, such as AdamW.
        lr (float or Tensor, optional): learning rate (default: 1e-3).
        weight_decay (float, optional): decoupled weight decay (default: 0.1).
        momentum (float, optional): momentum factor (default: 0.95).
        nesterov (bool, optional): Nesterov momentum (default: True).
        ns_coefficients (tuple of three floats, optional): the coefficients (a, b, c) of
            the Newton-Schulz polynomial (default: (3.4445, -4.7750, 2.0315)).
        eps (float, optional): the least norm an update is divided by (default: 1e-7).
        ns_steps (int, optional): Newton-Schulz iterations, under 100 (default: 5).
        adjust_lr_fn (str, optional): "original" or "match_rms_adamw"; None means
            "original" (default: None).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16, bias=False),
        ...                             torch.nn.Linear(16, 2, bias=False))
        >>> opt = Muon(model.parameters(), lr=0.02)
        >>> model(torch.randn(4, 8)).sum().backward()
        >>> opt.step(); opt.zero_grad()

    References: K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks"
    (2024), https://kellerjordan.github.io/posts/muon/ ; J. Liu et al., "Muon is Scalable
    for LLM Training" (2025), arXiv:2502.16982.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (DEFAULT_A, DEFAULT_B, DEFAULT_C),
        eps: float = EPS,
        ns_steps: int = DEFAULT_NS_STEPS,
        adjust_lr_fn: str | None = None,
    ) -> None:
        # torch.optim.Muon's checks, messages and order.
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not 0.0 <= momentum:
            raise ValueError(f"momentum should be >= 0 but is: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight decay should be >= 0 but is: {weight_decay}")
        if adjust_lr_fn is not None and adjust_lr_fn not in ("original", "match_rms_adamw"):
            raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": ns_coefficients,
            "eps": eps,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError("Muon only supports 2D parameters whereas we found a "
                                     f"parameter with size: {p.size()}")

    def _init_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                    bufs: list[Tensor]) -> bool:
        """torch.optim.Muon's: the group's params with grads, their grads and momentum
        buffers (created as zeros like the grad on a param's first step)."""
        for p in group["params"]:
            if p.grad is None:
                continue
            if torch.is_complex(p):
                raise RuntimeError("Muon does not support complex parameters")
            if p.grad.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients")
            params.append(p)
            grads.append(p.grad)
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(
                    p.grad, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        return False

    @torch.no_grad()
    def step(self, closure=None):
        """Performs a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and
                returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            bufs: list[Tensor] = []
            self._init_group(group, params, grads, bufs)
            if params:
                self._step_group(group, params, grads, bufs)
        return loss

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                    bufs: list[Tensor]) -> None:
        coefficients, steps = group["ns_coefficients"], group["ns_steps"]
        # torch checks each grad, then (inside the iteration) its arguments, param by
        # param; here all before anything changes, raising what torch raises first.
        for i, g in enumerate(grads):
            if g.ndim != 2:
                raise ValueError("Param gradient must be a 2D matrix")
            if i == 0:
                _newton_schulz.check_arguments(coefficients, steps)
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.dim() != 0:
            lr = lr.squeeze()  # torch's _to_scalar: a tensor lr stays a (0-dim) tensor
        hyper = {"momentum": group["momentum"], "weight_decay": group["weight_decay"],
                 "nesterov": group["nesterov"]}
        for rows in _batches(grads):
            p0 = params[rows[0]]
            shape = p0.shape
            backend = _stage_backend(p0.device, p0.dtype)
            lr_t = _lr_tensor(lr, p0.device)
            ratio = lr_ratio(group["adjust_lr_fn"], shape)
            # A chunk's params are stepped before the next chunk's update is computed:
            # extra memory stays one chunk's, whatever the model's size.
            for start, stop in chunks(len(rows), shape.numel(), p0.device):
                part = rows[start:stop]
                ps, gs, bs = ([lst[i] for i in part] for lst in (params, grads, bufs))
                x = torch.empty((len(part), *shape), dtype=torch.bfloat16, device=p0.device)
                slots = list(x.unbind(0))
                _stage(backend, [ps, gs, bs, slots], lr_t, hyper, ratio, apply=False)
                out = self._orthogonalized(x, slots, bs, group)
                _stage(backend, [ps, gs, bs, out], lr_t, hyper, ratio, apply=True)

    @staticmethod
    def _orthogonalized(x: Tensor, slots: list[Tensor], bufs: list[Tensor],
                        group: dict[str, Any]) -> list[Tensor]:
        """The Newton-Schulz outputs (bf16) of a batch of same-shape params from their
        updates `x` (stacked, `slots` its matrices): one batched iteration (or one per
        matrix where a batch would round otherwise: _newton_schulz.batch_is_exact)."""
        args = (group["ns_coefficients"], group["ns_steps"], group["eps"])
        if len(slots) > 1 and _newton_schulz.batch_is_exact(x.device, *x.shape[1:]):
            out = list(newton_schulz_(x, *args).unbind(0))
        else:
            out = [newton_schulz_(slot, *args) for slot in slots]
        if not group["nesterov"]:
            # torch's iteration casts the buffer with .bfloat16(), which returns the
            # buffer itself when it is bf16, and then divides it by its norm in place:
            # so does this, for the same numbers.
            aliased = [i for i, b in enumerate(bufs) if b.dtype == torch.bfloat16]
            if aliased:
                torch._foreach_copy_([bufs[i] for i in aliased], [slots[i] for i in aliased])
        return out


_STAGE_FALLBACK_WARNED: set[tuple[str, str]] = set()


def _stage_backend(device: torch.device, dtype: torch.dtype):
    """The backend that runs the stages' op for params on `device` of `dtype`: the
    automatic choice (FUSED_OPTIM_BACKEND, else the first of AUTO_ORDER that can run the
    bucket) if it has bf16 work lists (``Backend.work_lists``: every built-in backend
    has them; a registered one may not). A backend that has none raises a ValueError
    when FUSED_OPTIM_BACKEND names it, as a named backend that cannot run a bucket does;
    under "auto" the next one of AUTO_ORDER that has them runs the stages, and says so
    once."""
    backend = select_backend("auto", device, dtype)
    if backend.work_lists:
        return backend
    if (os.environ.get("FUSED_OPTIM_BACKEND") or "auto") != "auto":
        raise ValueError(
            f"fused_optim: backend {backend.name!r} was requested but cannot run Muon's "
            f"element-wise stages (op {STAGES.op}: its bf16 work list 'updates' has no "
            f"{backend.name} kernel yet); use 'auto', 'cpu', 'cuda' or 'reference'")
    chosen = get_backend("reference")
    for name in AUTO_ORDER.get(device.type, DEFAULT_AUTO_ORDER):
        candidate = get_backend(name)
        if candidate.work_lists and candidate.unavailable(device, dtype) is None:
            chosen = candidate
            break
    once = (backend.name, device.type)
    if once not in _STAGE_FALLBACK_WARNED:
        _STAGE_FALLBACK_WARNED.add(once)
        warnings.warn(f"fused_optim: backend {backend.name!r} has no bf16 work lists yet; "
                      f"backend {chosen.name!r} runs Muon's element-wise stages on "
                      f"{device.type}", stacklevel=4)
    return chosen


def _stage(backend, lists: list[list[Tensor]], lr: Tensor, hyper: dict[str, Any], ratio: float,
           *, apply: bool) -> None:
    """One stage over a chunk: ONE call of the op, or of the reference for rows whose
    tensors do not share one dense layout (a transposed param; the compiled kernels
    index flat memory). In the apply stage, updates whose layout is the transpose of
    their params' (a tall matrix's: the transpose of the iteration's result) are copied
    into their params' layout and flagged (transposed_update), since torch adds them in
    another loop (fused_optim/muon.py's muon_reference, math/muon.h)."""
    params = lists[0]
    h = {**hyper, "lr_ratio": ratio, "apply": apply, "transposed_update": False}
    if apply and params[0].dtype == torch.bfloat16:
        # torch's bf16 add_ rounds by position: its vectorized loop fuses alpha * O + p,
        # its scalar loop (the last numel % 32 elements of each thread's range, on the
        # dev CPU's AVX2) rounds alpha * O to bf16 first; the element-wise kernels do not
        # see positions. The reference runs torch's own add_ per param: the same bits.
        # (On a GPU, ATen's add ufunc takes alpha in its opmath, fp32, where math/muon.h
        # casts it to bf16 as the CPU's add_ does: the reference there too. Read from
        # ATen's source, not measured: no GPU on the dev machine.)
        backend = get_backend("reference")
    # Contiguous tensors of one shape (a batch's) without a dimension of size 0 or 1
    # (whose stride a contiguous tensor may have any value of) have one layout and move
    # no update: the usual case costs one C call per tensor here (the per-row checks
    # below took 2.5x the op's own time at 128 params of 4 x 4; the op checks every row
    # again in C++).
    if backend.name != "reference" and not (min(params[0].shape) > 1
                                            and _all_contiguous(lists)):
        if apply:
            moved = {u.stride() != p.stride() and u.numel() > 1
                     for p, u in zip(params, lists[3])}
            if moved == {True}:
                h["transposed_update"] = True
                lists = [*lists[:3], [torch.empty_like(p, dtype=torch.bfloat16).copy_(u)
                                      for p, u in zip(params, lists[3])]]
        if not all(_same_dense_layout(list(row)) for row in zip(*lists)):
            backend = get_backend("reference")
    backend.step(STAGES, *lists, lr=lr, **h)


def _all_contiguous(lists: list[list[Tensor]]) -> bool:
    return all(all(map(Tensor.is_contiguous, lst)) for lst in lists)


def _batches(grads: list[Tensor]) -> list[list[int]]:
    """Indices of the rows grouped by (device, dtype, shape): one Newton-Schulz batch
    each."""
    batches: dict[tuple[torch.device, torch.dtype, torch.Size], list[int]] = {}
    for i, g in enumerate(grads):
        batches.setdefault((g.device, g.dtype, g.shape), []).append(i)
    return list(batches.values())
