"""The Triton multi-tensor engine: one launch per (device, dtype) bucket.

What it computes: one optimizer step (math.py) over every tensor of a bucket, in ONE
kernel launch, with each program handling one chunk of one tensor.

Preconditions (checked when a table is built, see `_build_table`): every list as long
as params; every tensor on params' device, of params' dtype, shape and strides, and
non-overlapping and dense (element i of each list sits at offset i); step counters are
one-element float32 or float64 tensors on params' device; grad_scale and found_inf are
one-element float32 tensors on params' device.

Bytes per element (read + write), fp32 storage; half for fp16/bf16, double for fp64;
+4 B written when grad_scale is given (the grad is written back unscaled):
    Adam / AdamW   16 + 12 B   (+4 + 4 B with amsgrad)
    SGD            12 +  8 B with momentum (8 + 8 B on the buffer's first step),
                    8 +  4 B without
Per program on top: a few 8-byte table loads, the step counter, lr, grad_scale,
found_inf and one atomic; small against CHUNK elements per program (unmeasured).

[note: the resident table]
A bucket's tensors are described by ONE int64 device tensor, built when a parameter set
is first seen and cached under a key of every data_ptr, numel, dtype and device (and the
chunking). Later steps with the same tensors reuse it: nothing is copied host-to-device
per step, so a step can be captured in a CUDA graph (lr, grad_scale, found_inf and the
steps are read from device memory too). Layout, each a view of the one tensor:
    list_offsets [N_LISTS * n]  list k, tensor t at k * n + t: its address minus
                                params[0]'s, in elements
    step_ptrs    [n]            data_ptr of tensor t's step counter
    numels       [n]
    n_chunks     [n]            programs of tensor t (at least 1, so that an empty tensor
                                still counts its step)
    work         [2 * P]        program -> (tensor, first element of its chunk)
The work list maps every program to a real chunk, so no program idles; the grid is P.
The kernels address tensor t as params[0]'s pointer (an argument, whose 16-byte
alignment Triton specializes on) plus an element offset, and, when every address is
16-byte aligned, hint the offset's alignment (ELEM_ALIGN). Compiled for sm_90 with
triton 3.6 and 3.9, this gives 128-bit loads and stores in the full blocks (the masked
tail of a tensor stays 32-bit); a pointer made from an integer
(`tl.load(t).to(tl.pointer_type(...))`) also works, but no alignment hint reaches it
and every access stays 32-bit. Step counters, read once per program, are addressed that
way.

[note: counting steps inside one launch]
Every program of tensor t needs t's new step for its bias corrections, and the counter
must be written exactly once and only after every program has read it. Each program
reads the old value and uses old + 1; at its end, after a barrier (all its threads have
read), it increments arrivals[t] (an atomic, acq_rel, GPU scope); the program that
arrives last writes the new step and resets arrivals[t] to 0 for the next launch. This
is the "last block" pattern of CUDA's threadFenceReduction sample; it is exercised by
the interpreter (which runs programs one after another) but its memory ordering on a GPU
is UNVERIFIED here. A skipped step (found_inf != 0) touches nothing, arrivals included.

[note: torch.compile]
The table holds raw addresses, which a compiler tracing with FakeTensors cannot build
and cannot see the mutations through. Traced calls (FakeTensor / FunctionalTensor
arguments, see ops.py) therefore use `*_per_tensor`: the same math through kernels
whose tensors are ordinary arguments, one launch per tensor, wrapped by
torch.library.wrap_triton; the step counters are then incremented with torch ops.
"""

from __future__ import annotations

import collections
import functools
import math as _pymath
import struct
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .math import (
    WD_DECOUPLED,
    WD_L2,
    WD_NONE,
    adam_tensor_scalars,
    adam_update,
    sgd_scalars,
    sgd_update,
    to_storage,
    unscale,
)

__all__ = [
    "LaunchConfig",
    "CONFIG",
    "SUPPORTED_DTYPES",
    "adam_table",
    "sgd_table",
    "adam_per_tensor",
    "sgd_per_tensor",
    "split_f64",
    "table_cache_info",
    "clear_table_cache",
]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class LaunchConfig:
    """Chunking of the engine. Defaults are a first guess, not tuned: no GPU timing of
    this backend exists yet (see README.md)."""

    block: int = 1024      # elements per loop iteration of a program (power of two)
    chunk: int = 16384     # elements per program (a multiple of block)
    num_warps: int = 4

    def __post_init__(self) -> None:
        if self.block & (self.block - 1) or self.chunk % self.block:
            raise ValueError(f"block must be a power of two dividing chunk, got {self}")


CONFIG = LaunchConfig()

_TABLE_CACHE_SIZE = 32


def kernels_interpreted() -> bool:
    """Whether this module's kernels run in the Triton interpreter (decided when it was
    imported, by TRITON_INTERPRET)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(_adam_table_kernel, InterpretedFunction)


@functools.lru_cache(maxsize=1024)
def split_f64(x: float) -> tuple[float, float, float]:
    """Three float32-representable floats whose float64 sum is x (see [note: exact
    float64 hyperparameters] in math.py): exact unless a part falls below float32's
    normal range (|x| < ~1e-31), where the sum is the closest such parts can get."""
    x = float(x)
    if not _pymath.isfinite(x):
        return (x, 0.0, 0.0)
    try:
        hi = _f32(x)
    except OverflowError:
        raise ValueError(f"fused_optim_triton: hyperparameter {x!r} overflows float32") from None
    mid = _f32(x - hi)
    lo = _f32(x - hi - mid)
    return (hi, mid, lo)


def _f32(v: float) -> float:
    """v rounded to float32 (to nearest even), as a Python float."""
    return struct.unpack("f", struct.pack("f", v))[0]


# ---------------------------------------------------------------------------------
# Kernels: per chunk helpers (load, math, store), then the table and per-tensor kernels.


@triton.jit
def _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, mask, grad_scale,
                beta2, one_minus_beta1, one_minus_beta2, weight_decay, decay_factor,
                neg_step_size, inv_bias_correction2_sqrt, eps,
                DTYPE: tl.constexpr, OPMATH: tl.constexpr, AMSGRAD: tl.constexpr,
                MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, UNSCALE: tl.constexpr):
    """Adam on the elements `offs` (where `mask`, or all when mask is None)."""
    p = tl.load(p_ptr + offs, mask=mask).to(OPMATH)
    g = tl.load(g_ptr + offs, mask=mask).to(OPMATH)
    m = tl.load(m_ptr + offs, mask=mask).to(OPMATH)
    v = tl.load(v_ptr + offs, mask=mask).to(OPMATH)
    vmax = v
    if AMSGRAD:
        vmax = tl.load(vmax_ptr + offs, mask=mask).to(OPMATH)
    if UNSCALE:
        g = unscale(g, grad_scale)
        tl.store(g_ptr + offs, to_storage(g, DTYPE), mask=mask)
    p, m, v, vmax = adam_update(p, g, m, v, vmax, beta2, one_minus_beta1, one_minus_beta2,
                                weight_decay, decay_factor, neg_step_size,
                                inv_bias_correction2_sqrt, eps, AMSGRAD, MAXIMIZE, WEIGHT_DECAY)
    tl.store(p_ptr + offs, to_storage(p, DTYPE), mask=mask)
    tl.store(m_ptr + offs, to_storage(m, DTYPE), mask=mask)
    tl.store(v_ptr + offs, to_storage(v, DTYPE), mask=mask)
    if AMSGRAD:
        tl.store(vmax_ptr + offs, to_storage(vmax, DTYPE), mask=mask)


@triton.jit
def _adam_chunk(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, begin, end, grad_scale,
                beta2, one_minus_beta1, one_minus_beta2, weight_decay, decay_factor,
                neg_step_size, inv_bias_correction2_sqrt, eps,
                DTYPE: tl.constexpr, OPMATH: tl.constexpr, AMSGRAD: tl.constexpr,
                MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, UNSCALE: tl.constexpr,
                BLOCK: tl.constexpr):
    """Adam over elements [begin, end) of one tensor's lists; begin is a multiple of
    BLOCK. Full blocks go unmasked (a mask of unknown alignment keeps the compiler from
    vectorizing), then one masked tail. Alignment hints must be given where begin and the
    pointers are computed: a tl.multiple_of on an argument of this function is lost."""
    full_end = end - (end - begin) % BLOCK
    for block_start in range(begin, full_end, BLOCK):
        offs = block_start + tl.arange(0, BLOCK)
        _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, None, grad_scale,
                    beta2, one_minus_beta1, one_minus_beta2, weight_decay, decay_factor,
                    neg_step_size, inv_bias_correction2_sqrt, eps,
                    DTYPE, OPMATH, AMSGRAD, MAXIMIZE, WEIGHT_DECAY, UNSCALE)
    if full_end < end:
        offs = full_end + tl.arange(0, BLOCK)
        _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, offs < end, grad_scale,
                    beta2, one_minus_beta1, one_minus_beta2, weight_decay, decay_factor,
                    neg_step_size, inv_bias_correction2_sqrt, eps,
                    DTYPE, OPMATH, AMSGRAD, MAXIMIZE, WEIGHT_DECAY, UNSCALE)


@triton.jit
def _sgd_block(p_ptr, g_ptr, b_ptr, offs, mask, grad_scale,
               neg_lr, momentum, one_minus_dampening, weight_decay,
               DTYPE: tl.constexpr, OPMATH: tl.constexpr, MOMENTUM: tl.constexpr,
               NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr, MAXIMIZE: tl.constexpr,
               WEIGHT_DECAY: tl.constexpr, UNSCALE: tl.constexpr):
    """SGD on the elements `offs` (where `mask`, or all when mask is None)."""
    p = tl.load(p_ptr + offs, mask=mask).to(OPMATH)
    g = tl.load(g_ptr + offs, mask=mask).to(OPMATH)
    b = g
    if MOMENTUM and not FIRST_STEP:
        b = tl.load(b_ptr + offs, mask=mask).to(OPMATH)
    if UNSCALE:
        g = unscale(g, grad_scale)
        tl.store(g_ptr + offs, to_storage(g, DTYPE), mask=mask)
    p, b = sgd_update(p, g, b, neg_lr, momentum, one_minus_dampening, weight_decay,
                      MOMENTUM, NESTEROV, FIRST_STEP, MAXIMIZE, WEIGHT_DECAY)
    tl.store(p_ptr + offs, to_storage(p, DTYPE), mask=mask)
    if MOMENTUM:
        tl.store(b_ptr + offs, to_storage(b, DTYPE), mask=mask)


@triton.jit
def _sgd_chunk(p_ptr, g_ptr, b_ptr, begin, end, grad_scale,
               neg_lr, momentum, one_minus_dampening, weight_decay,
               DTYPE: tl.constexpr, OPMATH: tl.constexpr, MOMENTUM: tl.constexpr,
               NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr, MAXIMIZE: tl.constexpr,
               WEIGHT_DECAY: tl.constexpr, UNSCALE: tl.constexpr, BLOCK: tl.constexpr):
    """SGD over elements [begin, end) of one tensor's lists (see _adam_chunk)."""
    full_end = end - (end - begin) % BLOCK
    for block_start in range(begin, full_end, BLOCK):
        offs = block_start + tl.arange(0, BLOCK)
        _sgd_block(p_ptr, g_ptr, b_ptr, offs, None, grad_scale,
                   neg_lr, momentum, one_minus_dampening, weight_decay,
                   DTYPE, OPMATH, MOMENTUM, NESTEROV, FIRST_STEP, MAXIMIZE, WEIGHT_DECAY,
                   UNSCALE)
    if full_end < end:
        offs = full_end + tl.arange(0, BLOCK)
        _sgd_block(p_ptr, g_ptr, b_ptr, offs, offs < end, grad_scale,
                   neg_lr, momentum, one_minus_dampening, weight_decay,
                   DTYPE, OPMATH, MOMENTUM, NESTEROV, FIRST_STEP, MAXIMIZE, WEIGHT_DECAY,
                   UNSCALE)


@triton.jit(do_not_specialize=["n_tensors"])
def _adam_table_kernel(
    # the resident table ([note: the resident table]); base is params[0]
    base, list_offsets, step_ptrs, numels, n_chunks, work, arrivals, n_tensors,
    # device scalars (None when absent)
    lr_ptr, grad_scale_ptr, found_inf_ptr,
    # float64 hyperparameters as float32 (hi, mid, lo); lr_* only when not LR_ON_DEVICE
    lr_hi, lr_mid, lr_lo, beta1_hi, beta1_mid, beta1_lo, beta2_hi, beta2_mid, beta2_lo,
    wd_hi, wd_mid, wd_lo, eps_hi, eps_mid, eps_lo,
    # meta-parameters
    DTYPE: tl.constexpr, OPMATH: tl.constexpr, STEP_DTYPE: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr, UNSCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, ELEM_ALIGN: tl.constexpr,
):
    # This program's chunk: tensor t, elements [begin, end); none if the step is skipped
    # (alignment hints go here, where the values are loaded: see _adam_chunk).
    pid = tl.program_id(0)
    t = tl.load(work + 2 * pid)
    begin = tl.multiple_of(tl.load(work + 2 * pid + 1), CHUNK)
    end = tl.minimum(begin + CHUNK, tl.load(numels + t))
    go = begin >= 0
    if HAS_FOUND_INF:
        go = tl.load(found_inf_ptr) == 0
    end = tl.where(go, end, begin)  # a skipped step runs no iteration: no memory traffic
    # Tensor t's step after this one, rounded to the counter's dtype as `+= 1` rounds it.
    step_ptr = tl.load(step_ptrs + t).to(tl.pointer_type(STEP_DTYPE))
    step = (tl.load(step_ptr).to(tl.float64) + 1.0).to(STEP_DTYPE).to(tl.float64)
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr).to(tl.float64)
    else:
        lr = tl.cast(lr_hi, tl.float64) + tl.cast(lr_mid, tl.float64) + tl.cast(lr_lo, tl.float64)
    b2, omb1, omb2, wd, decay, neg_step, inv_bc2_sqrt, eps = adam_tensor_scalars(
        step, lr, beta1_hi, beta1_mid, beta1_lo, beta2_hi, beta2_mid, beta2_lo,
        wd_hi, wd_mid, wd_lo, eps_hi, eps_mid, eps_lo, OPMATH)
    grad_scale = 1.0
    if UNSCALE:
        grad_scale = tl.load(grad_scale_ptr).to(OPMATH)
    # Tensor t's lists: params[0]'s pointer plus element offsets.
    row = list_offsets + t
    p_ptr = base + tl.multiple_of(tl.load(row), ELEM_ALIGN)
    g_ptr = base + tl.multiple_of(tl.load(row + n_tensors), ELEM_ALIGN)
    m_ptr = base + tl.multiple_of(tl.load(row + 2 * n_tensors), ELEM_ALIGN)
    v_ptr = base + tl.multiple_of(tl.load(row + 3 * n_tensors), ELEM_ALIGN)
    vmax_ptr = v_ptr
    if AMSGRAD:
        vmax_ptr = base + tl.multiple_of(tl.load(row + 4 * n_tensors), ELEM_ALIGN)
    _adam_chunk(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, begin, end, grad_scale,
                b2, omb1, omb2, wd, decay, neg_step, inv_bc2_sqrt, eps,
                DTYPE, OPMATH, AMSGRAD, MAXIMIZE, WEIGHT_DECAY, UNSCALE, BLOCK)
    # Count the step once, from the last of t's programs ([note: counting steps ...]).
    tl.debug_barrier()
    arrived = tl.atomic_add(arrivals + t, 1, mask=go, sem="acq_rel", scope="gpu")
    last = go & (arrived == tl.load(n_chunks + t) - 1)
    tl.store(step_ptr, step.to(STEP_DTYPE), mask=last)
    tl.store(arrivals + t, 0, mask=last)


@triton.jit(do_not_specialize=["n_tensors"])
def _sgd_table_kernel(
    # the resident table ([note: the resident table]); base is params[0]. SGD keeps no
    # step counters: the table's step_ptrs, n_chunks and arrivals are not passed.
    base, list_offsets, numels, work, n_tensors,
    # device scalars (None when absent)
    lr_ptr, grad_scale_ptr, found_inf_ptr,
    # float64 hyperparameters as float32 (hi, mid, lo); lr_* only when not LR_ON_DEVICE
    lr_hi, lr_mid, lr_lo, momentum_hi, momentum_mid, momentum_lo,
    dampening_hi, dampening_mid, dampening_lo, wd_hi, wd_mid, wd_lo,
    # meta-parameters
    DTYPE: tl.constexpr, OPMATH: tl.constexpr, MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr, MAXIMIZE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr, LR_ON_DEVICE: tl.constexpr, UNSCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    ELEM_ALIGN: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(work + 2 * pid)
    begin = tl.multiple_of(tl.load(work + 2 * pid + 1), CHUNK)
    end = tl.minimum(begin + CHUNK, tl.load(numels + t))
    if HAS_FOUND_INF:
        end = tl.where(tl.load(found_inf_ptr) == 0, end, begin)
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr).to(tl.float64)
    else:
        lr = tl.cast(lr_hi, tl.float64) + tl.cast(lr_mid, tl.float64) + tl.cast(lr_lo, tl.float64)
    neg_lr, mom, omd, wd = sgd_scalars(lr, momentum_hi, momentum_mid, momentum_lo,
                                       dampening_hi, dampening_mid, dampening_lo,
                                       wd_hi, wd_mid, wd_lo, OPMATH)
    grad_scale = 1.0
    if UNSCALE:
        grad_scale = tl.load(grad_scale_ptr).to(OPMATH)
    row = list_offsets + t
    p_ptr = base + tl.multiple_of(tl.load(row), ELEM_ALIGN)
    g_ptr = base + tl.multiple_of(tl.load(row + n_tensors), ELEM_ALIGN)
    b_ptr = p_ptr
    if MOMENTUM:
        b_ptr = base + tl.multiple_of(tl.load(row + 2 * n_tensors), ELEM_ALIGN)
    _sgd_chunk(p_ptr, g_ptr, b_ptr, begin, end, grad_scale, neg_lr, mom, omd, wd,
               DTYPE, OPMATH, MOMENTUM, NESTEROV, FIRST_STEP, MAXIMIZE, WEIGHT_DECAY,
               UNSCALE, BLOCK)


@triton.jit
def _adam_tensor_kernel(
    # one tensor's lists (vmax_ptr is None unless AMSGRAD), its step counter (read, not
    # written: see [note: torch.compile]) and its size
    p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, step_ptr, numel,
    # device scalars (None when absent)
    lr_ptr, grad_scale_ptr, found_inf_ptr,
    # float64 hyperparameters as float32 (hi, mid, lo)
    beta1_hi, beta1_mid, beta1_lo, beta2_hi, beta2_mid, beta2_lo,
    wd_hi, wd_mid, wd_lo, eps_hi, eps_mid, eps_lo,
    # meta-parameters
    DTYPE: tl.constexpr, OPMATH: tl.constexpr, AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, UNSCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    begin = tl.program_id(0).to(tl.int64) * CHUNK
    end = tl.minimum(begin + CHUNK, numel)
    if HAS_FOUND_INF:
        end = tl.where(tl.load(found_inf_ptr) == 0, end, begin)
    old_step = tl.load(step_ptr)
    step = (old_step.to(tl.float64) + 1.0).to(old_step.dtype).to(tl.float64)
    lr = tl.load(lr_ptr).to(tl.float64)
    b2, omb1, omb2, wd, decay, neg_step, inv_bc2_sqrt, eps = adam_tensor_scalars(
        step, lr, beta1_hi, beta1_mid, beta1_lo, beta2_hi, beta2_mid, beta2_lo,
        wd_hi, wd_mid, wd_lo, eps_hi, eps_mid, eps_lo, OPMATH)
    grad_scale = 1.0
    if UNSCALE:
        grad_scale = tl.load(grad_scale_ptr).to(OPMATH)
    if AMSGRAD:
        _adam_chunk(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, begin, end, grad_scale,
                    b2, omb1, omb2, wd, decay, neg_step, inv_bc2_sqrt, eps,
                    DTYPE, OPMATH, AMSGRAD, MAXIMIZE, WEIGHT_DECAY, UNSCALE, BLOCK)
    else:
        _adam_chunk(p_ptr, g_ptr, m_ptr, v_ptr, v_ptr, begin, end, grad_scale,
                    b2, omb1, omb2, wd, decay, neg_step, inv_bc2_sqrt, eps,
                    DTYPE, OPMATH, AMSGRAD, MAXIMIZE, WEIGHT_DECAY, UNSCALE, BLOCK)


@triton.jit
def _sgd_tensor_kernel(
    # one tensor's lists (b_ptr is None unless MOMENTUM) and its size
    p_ptr, g_ptr, b_ptr, numel,
    # device scalars (None when absent)
    lr_ptr, grad_scale_ptr, found_inf_ptr,
    # float64 hyperparameters as float32 (hi, mid, lo)
    momentum_hi, momentum_mid, momentum_lo, dampening_hi, dampening_mid, dampening_lo,
    wd_hi, wd_mid, wd_lo,
    # meta-parameters
    DTYPE: tl.constexpr, OPMATH: tl.constexpr, MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr, MAXIMIZE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr, UNSCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    begin = tl.program_id(0).to(tl.int64) * CHUNK
    end = tl.minimum(begin + CHUNK, numel)
    if HAS_FOUND_INF:
        end = tl.where(tl.load(found_inf_ptr) == 0, end, begin)
    lr = tl.load(lr_ptr).to(tl.float64)
    neg_lr, mom, omd, wd = sgd_scalars(lr, momentum_hi, momentum_mid, momentum_lo,
                                       dampening_hi, dampening_mid, dampening_lo,
                                       wd_hi, wd_mid, wd_lo, OPMATH)
    grad_scale = 1.0
    if UNSCALE:
        grad_scale = tl.load(grad_scale_ptr).to(OPMATH)
    if MOMENTUM:
        _sgd_chunk(p_ptr, g_ptr, b_ptr, begin, end, grad_scale, neg_lr, mom, omd, wd,
                   DTYPE, OPMATH, MOMENTUM, NESTEROV, FIRST_STEP, MAXIMIZE, WEIGHT_DECAY,
                   UNSCALE, BLOCK)
    else:
        _sgd_chunk(p_ptr, g_ptr, p_ptr, begin, end, grad_scale, neg_lr, mom, omd, wd,
                   DTYPE, OPMATH, MOMENTUM, NESTEROV, FIRST_STEP, MAXIMIZE, WEIGHT_DECAY,
                   UNSCALE, BLOCK)


# ---------------------------------------------------------------------------------
# The resident tables


@dataclass
class _Table:
    meta: torch.Tensor          # the one int64 device tensor; the fields below view it
    list_offsets: torch.Tensor
    step_ptrs: torch.Tensor
    numels: torch.Tensor
    n_chunks: torch.Tensor
    work: torch.Tensor
    arrivals: torch.Tensor      # int32 [n], zero between launches
    n_tensors: int
    n_programs: int
    elem_align: int             # every address is a multiple of this many elements
    step_dtype: torch.dtype | None


_TABLES: collections.OrderedDict[tuple, _Table] = collections.OrderedDict()
_STATS = {"builds": 0, "hits": 0}


def table_cache_info() -> dict[str, int]:
    """Builds and hits of the table cache since the last clear (for tests and tuning)."""
    return {**_STATS, "size": len(_TABLES)}


def clear_table_cache() -> None:
    _TABLES.clear()
    _STATS.update(builds=0, hits=0)


def _op_error(op: str, msg: str) -> RuntimeError:
    return RuntimeError(f"fused_optim_triton::{op}: {msg}")


def _check_bucket(op: str, names: list[str], lists: list[list[torch.Tensor]],
                  steps: list[torch.Tensor] | None) -> None:
    """The checks of csrc/ops_common.h check_bucket / check_scalars, run once per
    table (not per step)."""
    params = lists[0]
    device, dtype = params[0].device, params[0].dtype
    if dtype not in SUPPORTED_DTYPES:
        raise _op_error(op, f"parameters must be float32, float64, float16 or bfloat16, "
                            f"got {dtype}")
    for i, p in enumerate(params):
        for name, lst in zip(names, lists):
            t = lst[i]
            where = f"{name}[{i}]"
            if t.layout != torch.strided:
                raise _op_error(op, f"{where} is sparse; the kernels take dense tensors only")
            if t.device != device:
                raise _op_error(op, f"all tensors of one call must be on one device; {where} "
                                    f"is on {t.device}, params[0] on {device}")
            if t.dtype != dtype:
                raise _op_error(op, f"all tensors of one call must have one dtype; {where} "
                                    f"is {t.dtype}, params[0] is {dtype}")
            if t.shape != p.shape:
                raise _op_error(op, f"{where} has shape {tuple(t.shape)} but params[{i}] has "
                                    f"shape {tuple(p.shape)}")
            if not _dense(t):
                raise _op_error(op, f"{where} must be non-overlapping and dense "
                                    "(e.g. contiguous)")
            if t.numel() > 1 and t.stride() != p.stride():
                raise _op_error(op, f"{where} has strides {t.stride()} but params[{i}] has "
                                    f"strides {p.stride()}; every tensor of a row must share "
                                    "one memory layout")
    if steps is not None:
        step_dtype = steps[0].dtype
        for i, s in enumerate(steps):
            if s.numel() != 1:
                raise _op_error(op, f"state_steps[{i}] must be a one-element tensor")
            if s.dtype not in (torch.float32, torch.float64) or s.dtype != step_dtype:
                raise _op_error(op, f"state_steps must all be float32 or all float64, "
                                    f"state_steps[{i}] is {s.dtype}")
            if s.device != device:
                raise _op_error(op, f"state_steps[{i}] is on {s.device} but the params are "
                                    f"on {device}; the Triton backend reads steps on the "
                                    "params' device (as torch's fused Adam keeps them)")


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: some permutation of the dims is contiguous."""
    if t.is_contiguous() or t.numel() == 0:
        return True
    # A permutation of a contiguous tensor (channels_last and the like).
    order = sorted(range(t.dim()), key=lambda d: t.stride(d))
    expected = 1
    for d in order:
        if t.size(d) != 1 and t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


def _get_table(op: str, names: list[str], lists: list[list[torch.Tensor]],
               steps: list[torch.Tensor] | None, config: LaunchConfig) -> _Table:
    params = lists[0]
    ptrs = [t.data_ptr() for lst in lists for t in lst]
    step_ptrs = [s.data_ptr() for s in steps] if steps is not None else []
    numels = [p.numel() for p in params]
    key = (params[0].device, params[0].dtype, len(lists), config.chunk,
           tuple(ptrs), tuple(step_ptrs), tuple(numels))
    table = _TABLES.get(key)
    if table is not None:
        _TABLES.move_to_end(key)
        _STATS["hits"] += 1
        return table
    _check_bucket(op, names, lists, steps)
    table = _build_table(op, params[0].device, ptrs, step_ptrs, numels, config,
                         steps[0].dtype if steps is not None else None,
                         params[0].element_size())
    _TABLES[key] = table
    if len(_TABLES) > _TABLE_CACHE_SIZE:
        _TABLES.popitem(last=False)
    _STATS["builds"] += 1
    return table


def _build_table(op: str, device: torch.device, ptrs: list[int], step_ptrs: list[int],
                 numels: list[int], config: LaunchConfig, step_dtype: torch.dtype | None,
                 elem_size: int) -> _Table:
    n = len(numels)
    base = ptrs[0]  # params[0], passed to the kernel as a typed pointer
    if any((p - base) % elem_size for p in ptrs):
        raise _op_error(op, f"tensor addresses are not multiples of the element size "
                            f"({elem_size} B) apart")
    offsets = [(p - base) // elem_size for p in ptrs]
    elem_align = 16 // elem_size if all(p % 16 == 0 for p in ptrs) else 1
    numel_t = torch.tensor(numels, dtype=torch.int64)
    n_chunks = torch.clamp((numel_t + config.chunk - 1) // config.chunk, min=1)
    n_programs = int(n_chunks.sum())
    # program -> (tensor, first element): tensor t owns n_chunks[t] consecutive programs
    tensor_of = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), n_chunks)
    first_program = torch.cumsum(n_chunks, 0) - n_chunks
    chunk_of = torch.arange(n_programs, dtype=torch.int64) - first_program[tensor_of]
    work = torch.stack([tensor_of, chunk_of * config.chunk], dim=1).reshape(-1)
    steps_t = torch.tensor(step_ptrs if step_ptrs else [0] * n, dtype=torch.int64)
    host = torch.cat([torch.tensor(offsets, dtype=torch.int64), steps_t, numel_t, n_chunks,
                      work])
    meta = host.to(device)  # the one host-to-device copy, per new parameter set
    sizes = [len(ptrs), n, n, n, 2 * n_programs]
    list_offsets, step_ptrs_t, numels_t, n_chunks_t, work_t = torch.split(meta, sizes)
    return _Table(meta, list_offsets, step_ptrs_t, numels_t, n_chunks_t, work_t,
                  torch.zeros(n, dtype=torch.int32, device=device), n, n_programs,
                  elem_align, step_dtype)


# ---------------------------------------------------------------------------------
# Launchers


_TL_DTYPE = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


def _opmath(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check_scalar(op: str, name: str, t: torch.Tensor | None, device: torch.device) -> None:
    if t is None:
        return
    if t.numel() != 1:
        raise _op_error(op, f"{name} must be a one-element tensor, got shape {tuple(t.shape)}")
    if t.dtype != torch.float32:
        raise _op_error(op, f"{name} must be float32, got {t.dtype}")
    if t.device != device:
        raise _op_error(op, f"{name} is on {t.device} but the params are on {device}")


def _lr_args(op: str, lr: torch.Tensor, device: torch.device, host_value: bool = False):
    """(lr pointer or None, lr float64 parts, LR_ON_DEVICE).

    An lr on the params' device is read by the kernel (capturable); a CPU lr for GPU
    params is read here (host memory: no device sync) and passed by value.
    """
    if not isinstance(lr, torch.Tensor) or lr.numel() != 1:
        raise _op_error(op, "lr must be a one-element tensor")
    if lr.device == device and not host_value:
        return lr, (0.0, 0.0, 0.0), True
    if lr.device.type == "cpu":
        return None, split_f64(lr.item()), False
    return lr.to(device), (0.0, 0.0, 0.0), True


def _check_lists(op: str, names: list[str], lists: list[list[torch.Tensor]]) -> None:
    n = len(lists[0])
    for name, lst in zip(names, lists):
        if len(lst) != n:
            raise _op_error(op, f"expected {n} {name} (one per param), got {len(lst)}")


def _adam_lists(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad):
    names = ["params", "grads", "exp_avgs", "exp_avg_sqs"]
    lists = [list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)]
    if amsgrad:
        names.append("max_exp_avg_sqs")
        lists.append(list(max_exp_avg_sqs))
    elif len(max_exp_avg_sqs) != 0:
        raise _op_error(op, f"max_exp_avg_sqs must be empty when amsgrad=False, got "
                            f"{len(max_exp_avg_sqs)}")
    _check_lists(op, names, lists)
    return names, lists


def _sgd_lists(op, params, grads, momentum_buffers, momentum):
    names = ["params", "grads"]
    lists = [list(params), list(grads)]
    if momentum != 0.0:
        names.append("momentum_buffers")
        lists.append(list(momentum_buffers))
    elif len(momentum_buffers) != 0:
        raise _op_error(op, f"momentum_buffers must be empty when momentum=0, got "
                            f"{len(momentum_buffers)}")
    _check_lists(op, names, lists)
    return names, lists


def _weight_decay_mode(weight_decay: float, decoupled: bool):
    if weight_decay == 0.0:
        return WD_NONE
    return WD_DECOUPLED if decoupled else WD_L2


def adam_table(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *,
               lr, beta1, beta2, weight_decay, eps, amsgrad, maximize,
               decoupled_weight_decay, grad_scale=None, found_inf=None,
               config: LaunchConfig | None = None, _host_lr: bool = False) -> None:
    """One Adam / AdamW step over a bucket: one launch of the table kernel."""
    op = "adam_"
    config = config or CONFIG
    names, lists = _adam_lists(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                               amsgrad)
    if len(state_steps) != len(params):
        raise _op_error(op, f"expected {len(params)} state_steps (one per param), got "
                            f"{len(state_steps)}")
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    lr_ptr, lr_parts, lr_on_device = _lr_args(op, lr, device, _host_lr)
    _check_scalar(op, "grad_scale", grad_scale, device)
    _check_scalar(op, "found_inf", found_inf, device)
    table = _get_table(op, names, lists, list(state_steps), config)
    _adam_table_kernel[(table.n_programs,)](
        params[0], table.list_offsets, table.step_ptrs, table.numels, table.n_chunks,
        table.work,
        table.arrivals, table.n_tensors,
        lr_ptr, grad_scale, found_inf,
        *lr_parts, *split_f64(beta1), *split_f64(beta2), *split_f64(weight_decay),
        *split_f64(eps),
        DTYPE=_TL_DTYPE[dtype], OPMATH=_opmath(dtype), STEP_DTYPE=_TL_DTYPE[table.step_dtype],
        AMSGRAD=bool(amsgrad), MAXIMIZE=bool(maximize),
        WEIGHT_DECAY=_weight_decay_mode(weight_decay, decoupled_weight_decay),
        LR_ON_DEVICE=lr_on_device, UNSCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None,
        CHUNK=config.chunk, BLOCK=config.block, ELEM_ALIGN=table.elem_align,
        num_warps=config.num_warps, enable_fp_fusion=False,
    )


def sgd_table(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay,
              nesterov, maximize, is_first_step, grad_scale=None, found_inf=None,
              config: LaunchConfig | None = None, _host_lr: bool = False) -> None:
    """One SGD step over a bucket: one launch of the table kernel."""
    op = "sgd_"
    config = config or CONFIG
    names, lists = _sgd_lists(op, params, grads, momentum_buffers, momentum)
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    lr_ptr, lr_parts, lr_on_device = _lr_args(op, lr, device, _host_lr)
    _check_scalar(op, "grad_scale", grad_scale, device)
    _check_scalar(op, "found_inf", found_inf, device)
    table = _get_table(op, names, lists, None, config)
    has_momentum = momentum != 0.0
    _sgd_table_kernel[(table.n_programs,)](
        params[0], table.list_offsets, table.numels, table.work, table.n_tensors,
        lr_ptr, grad_scale, found_inf,
        *lr_parts, *split_f64(momentum), *split_f64(dampening), *split_f64(weight_decay),
        DTYPE=_TL_DTYPE[dtype], OPMATH=_opmath(dtype), MOMENTUM=has_momentum,
        NESTEROV=bool(nesterov) and has_momentum,
        FIRST_STEP=bool(is_first_step) and has_momentum, MAXIMIZE=bool(maximize),
        WEIGHT_DECAY=weight_decay != 0.0, LR_ON_DEVICE=lr_on_device,
        UNSCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
        CHUNK=config.chunk, BLOCK=config.block, ELEM_ALIGN=table.elem_align,
        num_warps=config.num_warps, enable_fp_fusion=False,
    )


def _count_steps(state_steps, found_inf) -> None:
    """state_steps += 1 unless found_inf != 0, with torch ops (traceable, no sync)."""
    if not state_steps:
        return
    if found_inf is None:
        torch._foreach_add_(list(state_steps), 1)
    else:
        for s in state_steps:
            s.add_((found_inf.reshape(()) == 0).to(s.dtype))


def adam_per_tensor(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *,
                    lr, beta1, beta2, weight_decay, eps, amsgrad, maximize,
                    decoupled_weight_decay, grad_scale=None, found_inf=None,
                    config: LaunchConfig | None = None) -> None:
    """Adam with one launch per tensor and tensors as kernel arguments: the form that
    torch.compile can trace (see [note: torch.compile])."""
    op = "adam_"
    config = config or CONFIG
    _, lists = _adam_lists(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                           amsgrad)
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    lr_t = lr if lr.device == device else lr.to(device)
    # wrap_triton: a traced call becomes a graph node; eager calls get the kernel back.
    kernel = wrap_triton(_adam_tensor_kernel)
    hyper = (*split_f64(beta1), *split_f64(beta2), *split_f64(weight_decay),
             *split_f64(eps))
    for i, p in enumerate(params):
        n = p.numel()
        if n == 0:
            continue
        kernel[(triton.cdiv(n, config.chunk),)](
            p, grads[i], exp_avgs[i], exp_avg_sqs[i],
            max_exp_avg_sqs[i] if amsgrad else None, state_steps[i], n,
            lr_t, grad_scale, found_inf, *hyper,
            DTYPE=_TL_DTYPE[dtype], OPMATH=_opmath(dtype), AMSGRAD=bool(amsgrad),
            MAXIMIZE=bool(maximize),
            WEIGHT_DECAY=_weight_decay_mode(weight_decay, decoupled_weight_decay),
            UNSCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
            CHUNK=config.chunk, BLOCK=config.block, num_warps=config.num_warps,
        )
    _count_steps(state_steps, found_inf)


def sgd_per_tensor(params, grads, momentum_buffers, *, lr, momentum, dampening,
                   weight_decay, nesterov, maximize, is_first_step, grad_scale=None,
                   found_inf=None, config: LaunchConfig | None = None) -> None:
    """SGD with one launch per tensor (see adam_per_tensor)."""
    op = "sgd_"
    config = config or CONFIG
    _sgd_lists(op, params, grads, momentum_buffers, momentum)
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    lr_t = lr if lr.device == device else lr.to(device)
    # wrap_triton: a traced call becomes a graph node; eager calls get the kernel back.
    kernel = wrap_triton(_sgd_tensor_kernel)
    has_momentum = momentum != 0.0
    hyper = (*split_f64(momentum), *split_f64(dampening), *split_f64(weight_decay))
    for i, p in enumerate(params):
        n = p.numel()
        if n == 0:
            continue
        kernel[(triton.cdiv(n, config.chunk),)](
            p, grads[i], momentum_buffers[i] if has_momentum else None, n,
            lr_t, grad_scale, found_inf, *hyper,
            DTYPE=_TL_DTYPE[dtype], OPMATH=_opmath(dtype), MOMENTUM=has_momentum,
            NESTEROV=bool(nesterov) and has_momentum,
            FIRST_STEP=bool(is_first_step) and has_momentum, MAXIMIZE=bool(maximize),
            WEIGHT_DECAY=weight_decay != 0.0, UNSCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None,
            CHUNK=config.chunk, BLOCK=config.block, num_warps=config.num_warps,
        )
