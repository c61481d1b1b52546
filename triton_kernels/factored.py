"""The factored-moment engine in Triton: the Adafactor step of every param of a bucket,
without a host sync.

What it computes: `adafactor`, with the contract of fused_optim/_factored.py (its module
docstring defines every argument) and the math of csrc/include/fused_optim/math/
adafactor.h, operation for operation (the same roundings to the storage dtype); the
norms are sums of squares in float64. Two differences from the C++ engine, both below
the sums' own rounding: 1 - beta2_t is exp(beta2_decay * log(step)) in float64 (libdevice's
pow does not run in the interpreter), and the sums add in Triton's tree order.

Preconditions (the caller's): every tensor contiguous, of one dtype, on one device;
the state_steps of one dtype (float32 or float64) on that device (fused_optim keeps
them there); lr a one-element float32 or float64 tensor (moved to the device here).
Pointers travel as element offsets from one base tensor (as in sparse.py), in int64
tables copied host-to-device once per call: nothing is read back.

Launches per bucket (grid):
  _begin   (tensors)  step + 1, 1 - beta2_t
  _pass1   (items)    reads param, grad: sum(param^2) per item, row sums of g^2, column
                      sums per item; a vector's variance updated (8 B/elem fp32, +8)
  _factors (tensors)  alpha; the factors' update from the sums; their clamped means
  _pass2   (items)    reads grad: sum(update^2) per item (4 B/elem, a vector +4)
  _alpha   (tensors)  the clipping denominator, the step's alpha
  _pass3   (items)    reads param, grad, writes param (12 B/elem)
An item is whole rows of one matrix (about ITEM elements) or ITEM elements of a vector;
a program owns its rows, so it writes their sums and its column partials alone. No
speed is measured (no GPU was available); ITEM, BLOCK and num_warps are untuned.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import math as _math
from .launcher import _TL_DTYPE, _opmath

__all__ = ["adafactor"]

BLOCK = 256          # elements of a row (or a vector) per inner iteration
ITEM = 16384         # elements per work item

# Per-tensor table (int64): columns.
_KIND = tl.constexpr(0)      # 1 factored, 0 vector
_P = tl.constexpr(1)         # offsets from the base, in elements
_G = tl.constexpr(2)
_A = tl.constexpr(3)         # row_var, or the variance
_B = tl.constexpr(4)         # col_var
_ROWS = tl.constexpr(5)
_COLS = tl.constexpr(6)
_BATCHES = tl.constexpr(7)
_NUMEL = tl.constexpr(8)
_ROW_SUMS = tl.constexpr(9)  # offsets in the float64 workspace
_MEANS = tl.constexpr(10)
_ITEM_BEGIN = tl.constexpr(11)
_ITEM_END = tl.constexpr(12)
_ITEMS_PER_BATCH = tl.constexpr(13)
_STEP = tl.constexpr(14)     # offset from the first step tensor
_T_COLS = tl.constexpr(15)
# Item table (int64): tensor, batch, begin, end, column partials' offset.
_I_COLS = tl.constexpr(5)
# Per-tensor float64 scalars in the workspace: step, 1 - beta2_t, alpha, rho is lr,
# step alpha.
_S_STEP = tl.constexpr(0)
_S_WEIGHT = tl.constexpr(1)
_S_ALPHA = tl.constexpr(2)
_S_RHO_IS_LR = tl.constexpr(3)
_S_STEP_ALPHA = tl.constexpr(4)
_S_COLS = tl.constexpr(5)
# Hyperparameters (float64 on the device: a Python float argument would be float32).
_H_BETA2_DECAY = tl.constexpr(0)
_H_EPS1 = tl.constexpr(1)
_H_EPS2 = tl.constexpr(2)
_H_D = tl.constexpr(3)
_H_WEIGHT_DECAY = tl.constexpr(4)


# ---------------------------------------------------------------------------------
# The math (fused_optim/math/adafactor.h)


@triton.jit
def _r(x, DTYPE: tl.constexpr, OPMATH: tl.constexpr):
    """x rounded to the storage dtype, back in opmath."""
    return _math.to_storage(x, DTYPE).to(OPMATH)


@triton.jit
def _mean_square(total, count, DTYPE: tl.constexpr, OPMATH: tl.constexpr):
    """r(r(r(sqrt(sum))^2) / count): torch.norm(dim).square_().div_(count)."""
    norm = _r(tl.sqrt(total).to(OPMATH), DTYPE, OPMATH)
    return _r(_math.div(_r(norm * norm, DTYPE, OPMATH), count.to(OPMATH)), DTYPE, OPMATH)


@triton.jit
def _estimate(row, col, mean, DTYPE: tl.constexpr, OPMATH: tl.constexpr):
    """(row_var @ col_var).div_(mean) at one element."""
    return _r(_math.div(_r(row * col, DTYPE, OPMATH), mean), DTYPE, OPMATH)


@triton.jit
def _update(g, v, eps1_sq, DTYPE: tl.constexpr, OPMATH: tl.constexpr):
    """v.clamp_(eps1^2).rsqrt_().mul_(g)."""
    floored = tl.where(v < eps1_sq, eps1_sq, v)
    inv = _r(_math.div(tl.full(v.shape, 1.0, OPMATH), _math.sqrt(floored)), DTYPE, OPMATH)
    return _r(inv * g, DTYPE, OPMATH)


@triton.jit
def _python_max(a, x):
    """Python's max(a, x): x where x > a, else a."""
    return tl.where(x > a, x, a)


# ---------------------------------------------------------------------------------
# The kernels


@triton.jit
def _begin(steps, tmeta, work, hyp, scal_at, STEP_DTYPE: tl.constexpr):
    t = tl.program_id(0)
    meta = tmeta + t * _T_COLS
    at = tl.load(meta + _STEP)
    step = (tl.load(steps + at) + 1.0).to(STEP_DTYPE)
    tl.store(steps + at, step)
    s = step.to(tl.float64)
    scal = work + scal_at + t * _S_COLS
    tl.store(scal + _S_STEP, s)
    tl.store(scal + _S_WEIGHT, tl.exp(tl.load(hyp + _H_BETA2_DECAY) * tl.log(s)))


@triton.jit
def _work_item(base, tmeta, items):
    """This program's work item: (tensor t, matrix b of it, rows [i0, i1)), the tensor's
    meta row, its param, grad and factor (or variance) pointers and its column count."""
    item = items + tl.program_id(0) * _I_COLS
    t = tl.load(item)
    meta = tmeta + t * _T_COLS
    return (t, tl.load(item + 1), tl.load(item + 2), tl.load(item + 3), meta,
            base + tl.load(meta + _P), base + tl.load(meta + _G), base + tl.load(meta + _A),
            tl.load(meta + _COLS))


@triton.jit
def _pass1(base, tmeta, items, work, sums_at, cols_at, scal_at,
           DTYPE: tl.constexpr, OPMATH: tl.constexpr, BLOCK: tl.constexpr):
    k = tl.program_id(0)
    item = items + k * _I_COLS  # its column partials: item + 4
    t, b, i0, i1, meta, p, g, a, cols = _work_item(base, tmeta, items)
    psq = tl.zeros([BLOCK], tl.float64)
    if tl.load(meta + _KIND) == 1:
        rows = tl.load(meta + _ROWS)
        row_sums = work + tl.load(meta + _ROW_SUMS) + b * rows
        partial = work + cols_at + tl.load(item + 4)
        for j0 in range(0, cols, BLOCK):
            offs = j0 + tl.arange(0, BLOCK)
            mask = offs < cols
            col_acc = tl.zeros([BLOCK], tl.float64)
            for i in range(i0, i1):
                at = (b * rows + i) * cols
                gv = tl.load(g + at + offs, mask=mask, other=0.0).to(OPMATH).to(tl.float64)
                pv = tl.load(p + at + offs, mask=mask, other=0.0).to(OPMATH).to(tl.float64)
                sq = gv * gv
                col_acc += sq
                psq += pv * pv
                rs = tl.sum(sq, axis=0)
                if j0 > 0:
                    rs += tl.load(row_sums + i)
                tl.store(row_sums + i, rs)
            tl.store(partial + offs, col_acc, mask=mask)
    else:
        w = tl.load(work + scal_at + t * _S_COLS + _S_WEIGHT).to(OPMATH)
        for e0 in range(i0, i1, BLOCK):
            offs = e0 + tl.arange(0, BLOCK)
            mask = offs < i1
            pv = tl.load(p + offs, mask=mask, other=0.0).to(OPMATH)
            gv = tl.load(g + offs, mask=mask, other=0.0).to(OPMATH)
            var = tl.load(a + offs, mask=mask, other=0.0).to(OPMATH)
            var = _math.lerp(var, _r(gv * gv, DTYPE, OPMATH), w)
            tl.store(a + offs, _math.to_storage(var, DTYPE), mask=mask)
            psq += pv.to(tl.float64) * pv.to(tl.float64)
    tl.store(work + sums_at + k, tl.sum(psq, axis=0))


@triton.jit
def _factors(base, tmeta, items, work, hyp, lr_ptr, sums_at, cols_at, scal_at,
             DTYPE: tl.constexpr, OPMATH: tl.constexpr, LR_DTYPE: tl.constexpr,
             BLOCK: tl.constexpr):
    t = tl.program_id(0)
    meta = tmeta + t * _T_COLS
    scal = work + scal_at + t * _S_COLS
    k0 = tl.load(meta + _ITEM_BEGIN)
    k1 = tl.load(meta + _ITEM_END)
    psq = tl.load(work + sums_at + k0) * 0.0
    for k in range(k0, k1):
        psq += tl.load(work + sums_at + k)
    norm = _math.to_storage(tl.sqrt(psq).to(OPMATH), DTYPE).to(tl.float64)
    numel = tl.load(meta + _NUMEL).to(tl.float64)
    step = tl.load(scal + _S_STEP)
    lr = tl.load(lr_ptr).to(tl.float64)
    inv_sqrt = 1.0 / tl.sqrt(step)
    if LR_DTYPE == tl.float64:
        rho_is_lr = (inv_sqrt < lr) == 0
    else:
        rho_is_lr = (inv_sqrt.to(tl.float32).to(tl.float64) < lr) == 0
    rms = _python_max(tl.load(hyp + _H_EPS2), norm / tl.sqrt(numel))
    if rho_is_lr:
        alpha = _math.lr_mul(lr, rms, LR_DTYPE)
    else:
        alpha = rms * inv_sqrt
    tl.store(scal + _S_ALPHA, alpha)
    tl.store(scal + _S_RHO_IS_LR, tl.where(rho_is_lr, 1.0, 0.0))
    if tl.load(meta + _KIND) == 1:
        w = tl.load(scal + _S_WEIGHT).to(OPMATH)
        rows = tl.load(meta + _ROWS)
        cols = tl.load(meta + _COLS)
        row_var = base + tl.load(meta + _A)
        col_var = base + tl.load(meta + _B)
        row_sums = work + tl.load(meta + _ROW_SUMS)
        means = work + tl.load(meta + _MEANS)
        per_batch = tl.load(meta + _ITEMS_PER_BATCH)
        eps1 = _r(tl.load(hyp + _H_EPS1).to(OPMATH), DTYPE, OPMATH)
        for b in range(tl.load(meta + _BATCHES)):
            kb = k0 + b * per_batch
            for j0 in range(0, cols, BLOCK):
                offs = j0 + tl.arange(0, BLOCK)
                mask = offs < cols
                total = tl.zeros([BLOCK], tl.float64)
                for kk in range(kb, kb + per_batch):
                    at = tl.load(items + kk * _I_COLS + 4)
                    total += tl.load(work + cols_at + at + offs, mask=mask, other=0.0)
                target = _mean_square(total, rows, DTYPE, OPMATH)
                old = tl.load(col_var + b * cols + offs, mask=mask, other=0.0).to(OPMATH)
                tl.store(col_var + b * cols + offs,
                         _math.to_storage(_math.lerp(old, target, w), DTYPE), mask=mask)
            row_total = tl.zeros([BLOCK], tl.float64)
            for i0 in range(0, rows, BLOCK):
                offs = i0 + tl.arange(0, BLOCK)
                mask = offs < rows
                sums = tl.load(row_sums + b * rows + offs, mask=mask, other=0.0)
                target = _mean_square(sums, cols, DTYPE, OPMATH)
                old = tl.load(row_var + b * rows + offs, mask=mask, other=0.0).to(OPMATH)
                now = _r(_math.lerp(old, target, w), DTYPE, OPMATH)
                tl.store(row_var + b * rows + offs, _math.to_storage(now, DTYPE), mask=mask)
                row_total += tl.where(mask, now.to(tl.float64), 0.0)
            mean = _r(_math.div(tl.sum(row_total, axis=0).to(OPMATH), rows.to(OPMATH)),
                      DTYPE, OPMATH)
            mean = tl.where(mean < eps1, eps1, mean)
            tl.store(means + b, mean.to(tl.float64))


@triton.jit
def _factored_update(g, col_var, at, offs, mask, rv, mean, eps1_sq, NEGATE: tl.constexpr,
                     DTYPE: tl.constexpr, OPMATH: tl.constexpr):
    """The update of one block of a factored row (the grad negated with NEGATE),
    recomputed from the row factor rv, the column factors and their mean: passes 2 and 3
    share it."""
    cv = tl.load(col_var + offs, mask=mask, other=1.0).to(OPMATH)
    gv = tl.load(g + at + offs, mask=mask, other=0.0).to(OPMATH)
    if NEGATE:
        gv = -gv
    return _update(gv, _estimate(rv, cv, mean, DTYPE, OPMATH), eps1_sq, DTYPE, OPMATH)


@triton.jit
def _pass2(base, tmeta, items, work, hyp, sums_at,
           DTYPE: tl.constexpr, OPMATH: tl.constexpr, BLOCK: tl.constexpr):
    k = tl.program_id(0)
    t, b, i0, i1, meta, _, g, a, cols = _work_item(base, tmeta, items)
    eps1 = tl.load(hyp + _H_EPS1)
    eps1_sq = _r((eps1 * eps1).to(OPMATH), DTYPE, OPMATH)
    usq = tl.zeros([BLOCK], tl.float64)
    if tl.load(meta + _KIND) == 1:
        rows = tl.load(meta + _ROWS)
        col_var = base + tl.load(meta + _B) + b * cols
        mean = tl.load(work + tl.load(meta + _MEANS) + b).to(OPMATH)
        for i in range(i0, i1):
            rv = tl.load(a + b * rows + i).to(OPMATH)
            at = (b * rows + i) * cols
            for j0 in range(0, cols, BLOCK):
                offs = j0 + tl.arange(0, BLOCK)
                mask = offs < cols
                u = _factored_update(g, col_var, at, offs, mask, rv, mean, eps1_sq, False,
                                        DTYPE, OPMATH)
                u = tl.where(mask, u, 0.0).to(tl.float64)
                usq += u * u
    else:
        for e0 in range(i0, i1, BLOCK):
            offs = e0 + tl.arange(0, BLOCK)
            mask = offs < i1
            gv = tl.load(g + offs, mask=mask, other=0.0).to(OPMATH)
            var = tl.load(a + offs, mask=mask, other=1.0).to(OPMATH)
            u = tl.where(mask, _update(gv, var, eps1_sq, DTYPE, OPMATH), 0.0).to(tl.float64)
            usq += u * u
    tl.store(work + sums_at + k, tl.sum(usq, axis=0))


@triton.jit
def _alpha(tmeta, work, hyp, sums_at, scal_at, DTYPE: tl.constexpr, OPMATH: tl.constexpr,
           LR_DTYPE: tl.constexpr):
    t = tl.program_id(0)
    meta = tmeta + t * _T_COLS
    scal = work + scal_at + t * _S_COLS
    k0 = tl.load(meta + _ITEM_BEGIN)
    k1 = tl.load(meta + _ITEM_END)
    usq = tl.load(work + sums_at + k0) * 0.0
    for k in range(k0, k1):
        usq += tl.load(work + sums_at + k)
    norm = _math.to_storage(tl.sqrt(usq).to(OPMATH), DTYPE).to(tl.float64)
    numel = tl.load(meta + _NUMEL).to(tl.float64)
    denom = _python_max(1.0, norm / (tl.sqrt(numel) * tl.load(hyp + _H_D)))
    alpha = tl.load(scal + _S_ALPHA)
    if tl.load(scal + _S_RHO_IS_LR) != 0.0:
        step_alpha = _math.lr_div(-alpha, denom, LR_DTYPE)
    else:
        step_alpha = -alpha / denom
    tl.store(scal + _S_STEP_ALPHA, step_alpha)


@triton.jit
def _apply(p, u, decay, alpha, DTYPE: tl.constexpr, OPMATH: tl.constexpr,
           DECAY: tl.constexpr):
    """param.mul_(decay) (DECAY), then param.add_(u, alpha=alpha)."""
    if DECAY:
        p = _r(p * decay, DTYPE, OPMATH)
    if DTYPE == OPMATH:
        return tl.fma(alpha, u, p)
    else:
        return _r(p + _r(_r(alpha, DTYPE, OPMATH) * u, DTYPE, OPMATH), DTYPE, OPMATH)


@triton.jit
def _pass3(base, tmeta, items, work, hyp, lr_ptr, scal_at,
           DTYPE: tl.constexpr, OPMATH: tl.constexpr, LR_DTYPE: tl.constexpr,
           DECAY: tl.constexpr, MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr):
    t, b, i0, i1, meta, p, g, a, cols = _work_item(base, tmeta, items)
    eps1 = tl.load(hyp + _H_EPS1)
    eps1_sq = _r((eps1 * eps1).to(OPMATH), DTYPE, OPMATH)
    lr = tl.load(lr_ptr).to(tl.float64)
    decay = _math.lr_sub_from(1.0, _math.lr_mul(lr, tl.load(hyp + _H_WEIGHT_DECAY), LR_DTYPE),
                              LR_DTYPE).to(OPMATH)
    alpha = tl.load(work + scal_at + t * _S_COLS + _S_STEP_ALPHA).to(OPMATH)
    if tl.load(meta + _KIND) == 1:
        rows = tl.load(meta + _ROWS)
        col_var = base + tl.load(meta + _B) + b * cols
        mean = tl.load(work + tl.load(meta + _MEANS) + b).to(OPMATH)
        for i in range(i0, i1):
            rv = tl.load(a + b * rows + i).to(OPMATH)
            at = (b * rows + i) * cols
            for j0 in range(0, cols, BLOCK):
                offs = j0 + tl.arange(0, BLOCK)
                mask = offs < cols
                u = _factored_update(g, col_var, at, offs, mask, rv, mean, eps1_sq, MAXIMIZE,
                                        DTYPE, OPMATH)
                pv = tl.load(p + at + offs, mask=mask, other=0.0).to(OPMATH)
                pv = _apply(pv, u, decay, alpha, DTYPE, OPMATH, DECAY)
                tl.store(p + at + offs, _math.to_storage(pv, DTYPE), mask=mask)
    else:
        for e0 in range(i0, i1, BLOCK):
            offs = e0 + tl.arange(0, BLOCK)
            mask = offs < i1
            gv = tl.load(g + offs, mask=mask, other=0.0).to(OPMATH)
            if MAXIMIZE:
                gv = -gv
            var = tl.load(a + offs, mask=mask, other=1.0).to(OPMATH)
            pv = tl.load(p + offs, mask=mask, other=0.0).to(OPMATH)
            pv = _apply(pv, _update(gv, var, eps1_sq, DTYPE, OPMATH), decay, alpha, DTYPE,
                        OPMATH, DECAY)
            tl.store(p + offs, _math.to_storage(pv, DTYPE), mask=mask)


# ---------------------------------------------------------------------------------
# The launcher


def _offset(t: torch.Tensor, base: torch.Tensor) -> int:
    delta = t.data_ptr() - base.data_ptr()
    size = base.element_size()
    if delta % size:
        raise ValueError("fused_optim triton adafactor: a tensor is not aligned to its dtype")
    return delta // size


def adafactor(params, grads, row_vars, col_vars, variances, state_steps, *, lr, beta2_decay,
              eps1, eps2, d, weight_decay, maximize, item=ITEM, block=BLOCK) -> None:
    """One Adafactor step of a bucket (see the module docstring)."""
    if not params:
        return
    n_factored = len(row_vars)
    active = [i for i, p in enumerate(params) if p.numel() > 0]
    for i, s in enumerate(state_steps):
        if params[i].numel() == 0:
            s.add_(1)  # torch's step would divide by zero; only the count moves
    if not active:
        return
    base = params[active[0]]
    device, dtype = base.device, base.dtype
    steps = [state_steps[i] for i in active]
    if len({s.dtype for s in steps}) != 1 or any(s.device != device for s in steps):
        raise ValueError("fused_optim triton adafactor: state_steps must share one dtype and "
                         "the params' device")
    step_base = steps[0]
    tmeta, items = [], []
    row_at = cols_at = 0
    mean_at = 0
    row_sum_offsets = []
    for t, i in enumerate(active):
        p = params[i]
        if i < n_factored:
            rows, cols = p.shape[-2], p.shape[-1]
            batches = p.numel() // (rows * cols)
            per_item = max(1, item // cols)
            per_batch = -(-rows // per_item)
            first = len(items)
            for b in range(batches):
                for r0 in range(0, rows, per_item):
                    items.append([t, b, r0, min(rows, r0 + per_item), cols_at])
                    cols_at += cols
            tmeta.append([1, _offset(p, base), _offset(grads[i], base),
                          _offset(row_vars[i], base), _offset(col_vars[i], base), rows, cols,
                          batches, p.numel(), row_at, mean_at, first, len(items), per_batch,
                          _offset(state_steps[i], step_base)])
            row_sum_offsets.append(row_at)
            row_at += batches * rows
            mean_at += batches
        else:
            numel = p.numel()
            first = len(items)
            for e0 in range(0, numel, item):
                items.append([t, 0, e0, min(numel, e0 + item), 0])
            tmeta.append([0, _offset(p, base), _offset(grads[i], base),
                          _offset(variances[i - n_factored], base), 0, 1, numel, 1, numel, 0,
                          0, first, len(items), 1, _offset(state_steps[i], step_base)])
    n_items, n_tensors = len(items), len(active)
    # The float64 workspace: [row sums | means | item sums | column partials | scalars].
    means_at = row_at
    sums_at = means_at + mean_at
    cols_base = sums_at + n_items
    scal_at = cols_base + cols_at
    for row in tmeta:
        if row[_KIND.value] == 1:
            row[_MEANS.value] += means_at
    work = torch.empty(scal_at + n_tensors * _S_COLS.value, dtype=torch.float64, device=device)
    tmeta_t = torch.tensor(tmeta, dtype=torch.int64).to(device, non_blocking=True)
    items_t = torch.tensor(items, dtype=torch.int64).to(device, non_blocking=True)
    hyp = torch.tensor([beta2_decay, eps1, eps2, d, weight_decay],
                       dtype=torch.float64).to(device, non_blocking=True)
    lr_t = lr.reshape(1).to(device, non_blocking=True)
    lr_dtype = _TL_DTYPE.get(lr_t.dtype, tl.float64)
    if lr_t.dtype not in (torch.float32, torch.float64):
        lr_t, lr_dtype = lr_t.double(), tl.float64
    DT, OM = _TL_DTYPE[dtype], _opmath(dtype)
    common = dict(num_warps=4, enable_fp_fusion=False)
    _begin[(n_tensors,)](step_base, tmeta_t, work, hyp, scal_at,
                         STEP_DTYPE=_TL_DTYPE[step_base.dtype], **common)
    _pass1[(n_items,)](base, tmeta_t, items_t, work, sums_at, cols_base, scal_at,
                       DTYPE=DT, OPMATH=OM, BLOCK=block, **common)
    _factors[(n_tensors,)](base, tmeta_t, items_t, work, hyp, lr_t, sums_at, cols_base, scal_at,
                           DTYPE=DT, OPMATH=OM, LR_DTYPE=lr_dtype, BLOCK=block, **common)
    _pass2[(n_items,)](base, tmeta_t, items_t, work, hyp, sums_at,
                       DTYPE=DT, OPMATH=OM, BLOCK=block, **common)
    _alpha[(n_tensors,)](tmeta_t, work, hyp, sums_at, scal_at,
                         DTYPE=DT, OPMATH=OM, LR_DTYPE=lr_dtype, **common)
    _pass3[(n_items,)](base, tmeta_t, items_t, work, hyp, lr_t, scal_at,
                       DTYPE=DT, OPMATH=OM, LR_DTYPE=lr_dtype, DECAY=weight_decay != 0,
                       MAXIMIZE=bool(maximize), BLOCK=block, **common)
