"""The Triton multi-tensor engine: one launch per (device, dtype) bucket, every optimizer.

What it computes: one optimizer step (its math in math.py) over every tensor of a
bucket, in ONE kernel launch, with each program handling one chunk of one tensor. The
optimizer is its spec (fused_optim/spec.py): its lists, per-tensor state and arguments;
its math is found in math.py under its name (``<name>_variant``, ``<name>_advance``,
``<name>_scalars``, ``<name>_update``) and passed to the kernels as constexpr
functions. Nothing here names an optimizer.

Preconditions (checked when a table is built, see `_build_table`): every list as long
as params; every tensor on params' device, of params' dtype, shape and strides, and
non-overlapping and dense (element i of each list sits at offset i); per-tensor state
is one-element float32 or float64 tensors on params' device (rows whose states differ in
dtype go in separate launches, see `_rows_by_state_dtypes`); grad_scale
and found_inf are one-element float32 tensors on params' device.

Bytes per element: each list the optimizer reads, once, and each it writes, once, in
the storage dtype (fp32 AdamW: reads param, grad, exp_avg, exp_avg_sq = 16 B, writes
12 B; + the grad with grad_scale, written back unscaled). Per program on top: a few
8-byte table loads, the per-tensor state, lr, grad_scale, found_inf and one atomic;
small against CHUNK elements per program (unmeasured).

[note: the resident table]
A bucket's tensors are described by ONE int64 device tensor, built when a parameter set
is first seen and cached under a key of every data_ptr, numel, dtype and device (and the
chunking). Later steps with the same tensors reuse it: nothing is copied host-to-device
per step, so a step can be captured in a CUDA graph (lr, grad_scale, found_inf and the
state are read from device memory too). Layout, each a view of the one tensor:
    list_offsets [N_LISTS * n]  list k (every list of the optimizer; a list the call
                                leaves out repeats the params), tensor t at k * n + t:
                                its address minus params[0]'s, in elements
    state_ptrs   [N_STATES * n] data_ptr of tensor t's state j at j * n + t
    numels       [n]
    n_chunks     [n]            programs of tensor t (at least 1, so that an empty tensor
                                still advances its state)
    work         [2 * P]        program -> (tensor, first element of its chunk)
The work list maps every program to a real chunk, so no program idles; the grid is P.
The kernels address tensor t as params[0]'s pointer (an argument, whose 16-byte
alignment Triton specializes on) plus an element offset, and, when every address is
16-byte aligned, hint the offset's alignment (ELEM_ALIGN). Compiled for sm_90 with
triton 3.6 and 3.9, this gives 128-bit loads and stores in the full blocks (the masked
tail of a tensor stays 32-bit); a pointer made from an integer
(`tl.load(t).to(tl.pointer_type(...))`) also works, but no alignment hint reaches it
and every access stays 32-bit. State, read once per program, is addressed that way.

[note: advancing the state inside one launch]
Every program of tensor t needs t's advanced state (its step + 1) for its scalars, and
the state must be written exactly once and only after every program has read it. Each
program reads the old values and advances them itself; at its end, after a barrier (all
its threads have read), it increments arrivals[t] (an atomic, acq_rel, GPU scope); the
program that arrives last writes the new state and resets arrivals[t] to 0 for the next
launch. This is the "last block" pattern of CUDA's threadFenceReduction sample; it is
exercised by the interpreter (which runs programs one after another) but its memory
ordering on a GPU is UNVERIFIED here. A skipped step (found_inf != 0) touches nothing,
arrivals included.

[note: torch.compile]
The table holds raw addresses, which a compiler tracing with FakeTensors cannot build
and cannot see the mutations through. Traced calls (FakeTensor / FunctionalTensor
arguments, see ops.py) therefore use `step_per_tensor`: the same math through kernels
whose tensors are ordinary arguments, one launch per tensor (and one more that stores
its advanced state), wrapped by torch.library.wrap_triton.
"""

from __future__ import annotations

import collections
import functools
import math as _pymath
import struct
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fused_optim._fake import check_count, check_device_scalar, present_lists

from . import math as _math
from .math import to_storage, unscale

__all__ = [
    "LaunchConfig",
    "CONFIG",
    "SUPPORTED_DTYPES",
    "step_table",
    "step_per_tensor",
    "split_f64",
    "table_cache_info",
    "clear_table_cache",
]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_LISTS = 8    # element-wise lists of one optimizer, params and grads included
MAX_STATES = 4   # per-tensor state lists


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
    return isinstance(_table_kernel, InterpretedFunction)


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
# Kernels: one block of one chunk (load, math, store), a chunk, the table kernel, the
# per-tensor kernels torch.compile traces.


@triton.jit
def _block(ptrs, offs, mask, grad_scale, s, UPDATE: tl.constexpr, N_LISTS: tl.constexpr,
           LISTS: tl.constexpr, READS: tl.constexpr, WRITES: tl.constexpr,
           VARIANT: tl.constexpr, DTYPE: tl.constexpr, OPMATH: tl.constexpr,
           UNSCALE: tl.constexpr, MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr):
    """The optimizer's update on the elements `offs` (where `mask`, or all when mask is
    None): x holds every list of the optimizer (list 0 params, 1 grads); lists the call
    leaves out, or whose old values the update never reads, are zeros, never loaded."""
    x = ()
    for k in tl.static_range(N_LISTS):
        if (READS >> k) & 1:
            x = x + (tl.load(ptrs[k] + offs, mask=mask).to(OPMATH),)
        else:
            x = x + (tl.zeros([BLOCK], OPMATH),)
    g = x[1]
    if UNSCALE:
        g = unscale(g, grad_scale)
        tl.store(ptrs[1] + offs, to_storage(g, DTYPE), mask=mask)
    if MAXIMIZE:
        g = -g
    x = UPDATE(x, g, s, LISTS, VARIANT)
    for k in tl.static_range(N_LISTS):
        if (WRITES >> k) & 1:
            tl.store(ptrs[k] + offs, to_storage(x[k], DTYPE), mask=mask)


@triton.jit
def _chunk(ptrs, begin, end, grad_scale, s, UPDATE: tl.constexpr, N_LISTS: tl.constexpr,
           LISTS: tl.constexpr, READS: tl.constexpr, WRITES: tl.constexpr,
           VARIANT: tl.constexpr, DTYPE: tl.constexpr, OPMATH: tl.constexpr,
           UNSCALE: tl.constexpr, MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr):
    """Elements [begin, end) of one tensor's lists; begin is a multiple of BLOCK. Full
    blocks go unmasked (a mask of unknown alignment keeps the compiler from vectorizing),
    then one masked tail. Alignment hints must be given where begin and the pointers are
    computed: a tl.multiple_of on an argument of this function is lost."""
    full_end = end - (end - begin) % BLOCK
    for block_start in range(begin, full_end, BLOCK):
        offs = block_start + tl.arange(0, BLOCK)
        _block(ptrs, offs, None, grad_scale, s, UPDATE, N_LISTS, LISTS, READS, WRITES,
               VARIANT, DTYPE, OPMATH, UNSCALE, MAXIMIZE, BLOCK)
    if full_end < end:
        offs = full_end + tl.arange(0, BLOCK)
        _block(ptrs, offs, offs < end, grad_scale, s, UPDATE, N_LISTS, LISTS, READS, WRITES,
               VARIANT, DTYPE, OPMATH, UNSCALE, MAXIMIZE, BLOCK)


@triton.jit
def _store_state(ptr, value, mask, IS_F64: tl.constexpr):
    """Stores a float64 state value in its tensor's dtype (float64, or float32)."""
    if IS_F64:
        tl.store(ptr, value, mask=mask)
    else:
        tl.store(ptr, value.to(tl.float32), mask=mask)


@triton.jit
def _scalars_of(state, lr_ptr, lr_parts, hyper, ADVANCE: tl.constexpr,
                SCALARS: tl.constexpr, N_FLOATS: tl.constexpr, N_STATES: tl.constexpr,
                LISTS: tl.constexpr, VARIANT: tl.constexpr, STATE_F64: tl.constexpr,
                LR_DTYPE: tl.constexpr, LR_ON_DEVICE: tl.constexpr, OPMATH: tl.constexpr):
    """(the tensor's advanced state, rounded as stored; the optimizer's per-tensor
    scalars, from the step's state: the advanced state, then the old one), from its old
    state, lr (a device tensor of LR_DTYPE, or float32 parts of
    its float64 value) and the float arguments (float32 parts, see split_f64)."""
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr).to(tl.float64)
    else:
        lr = (tl.cast(lr_parts[0], tl.float64) + tl.cast(lr_parts[1], tl.float64)
              + tl.cast(lr_parts[2], tl.float64))
    h = ()
    for k in tl.static_range(N_FLOATS):
        # tl.cast, not .to: the interpreter passes float arguments as Python floats.
        h = h + (tl.cast(hyper[3 * k], tl.float64) + tl.cast(hyper[3 * k + 1], tl.float64)
                 + tl.cast(hyper[3 * k + 2], tl.float64),)
    new_state = ()
    if N_STATES > 0:
        advanced = ADVANCE(state, lr, h, STATE_F64, LR_DTYPE)
        for j in tl.static_range(N_STATES):
            if (STATE_F64 >> j) & 1:
                new_state = new_state + (advanced[j],)
            else:
                new_state = new_state + (advanced[j].to(tl.float32).to(tl.float64),)
    step_state = new_state
    for j in tl.static_range(N_STATES):
        step_state = step_state + (state[j],)
    return new_state, SCALARS(step_state, lr, h, LISTS, VARIANT, LR_DTYPE, OPMATH)


@triton.jit(do_not_specialize=["n_tensors"])
def _table_kernel(
    # the resident table ([note: the resident table]); base is params[0]
    base, list_offsets, state_ptrs, numels, n_chunks, work, arrivals, n_tensors,
    # device scalars (None when absent)
    lr_ptr, grad_scale_ptr, found_inf_ptr,
    # float64 lr (when not LR_ON_DEVICE) and float arguments, as float32 (hi, mid, lo)
    lr_parts, hyper,
    # the optimizer's math (math.py) and its shape
    ADVANCE: tl.constexpr, SCALARS: tl.constexpr, UPDATE: tl.constexpr,
    N_LISTS: tl.constexpr, LISTS: tl.constexpr, READS: tl.constexpr, WRITES: tl.constexpr,
    VARIANT: tl.constexpr, N_FLOATS: tl.constexpr, N_STATES: tl.constexpr,
    # meta-parameters
    DTYPE: tl.constexpr, OPMATH: tl.constexpr, STATE_F64: tl.constexpr,
    LR_DTYPE: tl.constexpr, LR_ON_DEVICE: tl.constexpr, UNSCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, MAXIMIZE: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, ELEM_ALIGN: tl.constexpr,
):
    # This program's chunk: tensor t, elements [begin, end); none if the step is skipped
    # (alignment hints go here, where the values are loaded: see _chunk).
    pid = tl.program_id(0)
    t = tl.load(work + 2 * pid)
    begin = tl.multiple_of(tl.load(work + 2 * pid + 1), CHUNK)
    end = tl.minimum(begin + CHUNK, tl.load(numels + t))
    go = begin >= 0
    if HAS_FOUND_INF:
        go = tl.load(found_inf_ptr) == 0
    end = tl.where(go, end, begin)  # a skipped step runs no iteration: no memory traffic
    # Tensor t's state before this step, and where it lives.
    state = ()
    state_at = ()
    for j in tl.static_range(N_STATES):
        address = tl.load(state_ptrs + j * n_tensors + t)
        if (STATE_F64 >> j) & 1:
            ptr = address.to(tl.pointer_type(tl.float64))
        else:
            ptr = address.to(tl.pointer_type(tl.float32))
        state_at = state_at + (ptr,)
        state = state + (tl.load(ptr).to(tl.float64),)
    new_state, s = _scalars_of(state, lr_ptr, lr_parts, hyper, ADVANCE, SCALARS, N_FLOATS,
                               N_STATES, LISTS, VARIANT, STATE_F64, LR_DTYPE, LR_ON_DEVICE,
                               OPMATH)
    grad_scale = 1.0
    if UNSCALE:
        grad_scale = tl.load(grad_scale_ptr).to(OPMATH)
    # Tensor t's lists: params[0]'s pointer plus element offsets.
    ptrs = ()
    for k in tl.static_range(N_LISTS):
        ptrs = ptrs + (base + tl.multiple_of(tl.load(list_offsets + k * n_tensors + t),
                                             ELEM_ALIGN),)
    _chunk(ptrs, begin, end, grad_scale, s, UPDATE, N_LISTS, LISTS, READS, WRITES, VARIANT,
           DTYPE, OPMATH, UNSCALE, MAXIMIZE, BLOCK)
    if N_STATES > 0:
        # Store the state once, from the last of t's programs ([note: advancing ...]).
        tl.debug_barrier()
        arrived = tl.atomic_add(arrivals + t, 1, mask=go, sem="acq_rel", scope="gpu")
        last = go & (arrived == tl.load(n_chunks + t) - 1)
        for j in tl.static_range(N_STATES):
            _store_state(state_at[j], new_state[j], last, (STATE_F64 >> j) & 1)
        tl.store(arrivals + t, 0, mask=last)


@triton.jit
def _tensor_kernel(
    # one tensor's lists (list k of the optimizer at x<k>; None where absent), its state
    # (s<j>: read, not written: see [note: torch.compile]) and its size
    x0, x1, x2, x3, x4, x5, x6, x7, s0, s1, s2, s3, numel,
    # device scalars (None when absent), the float arguments as float32 parts
    lr_ptr, grad_scale_ptr, found_inf_ptr, hyper,
    ADVANCE: tl.constexpr, SCALARS: tl.constexpr, UPDATE: tl.constexpr,
    N_LISTS: tl.constexpr, LISTS: tl.constexpr, READS: tl.constexpr, WRITES: tl.constexpr,
    VARIANT: tl.constexpr, N_FLOATS: tl.constexpr, N_STATES: tl.constexpr,
    DTYPE: tl.constexpr, OPMATH: tl.constexpr, STATE_F64: tl.constexpr,
    LR_DTYPE: tl.constexpr, UNSCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    MAXIMIZE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    begin = tl.program_id(0).to(tl.int64) * CHUNK
    end = tl.minimum(begin + CHUNK, numel)
    if HAS_FOUND_INF:
        end = tl.where(tl.load(found_inf_ptr) == 0, end, begin)
    all_states = (s0, s1, s2, s3)
    state = ()
    for j in tl.static_range(N_STATES):
        state = state + (tl.load(all_states[j]).to(tl.float64),)
    new_state, s = _scalars_of(state, lr_ptr, (0.0, 0.0, 0.0), hyper, ADVANCE, SCALARS,
                               N_FLOATS, N_STATES, LISTS, VARIANT, STATE_F64, LR_DTYPE,
                               True, OPMATH)
    grad_scale = 1.0
    if UNSCALE:
        grad_scale = tl.load(grad_scale_ptr).to(OPMATH)
    all_ptrs = (x0, x1, x2, x3, x4, x5, x6, x7)
    ptrs = ()
    for k in tl.static_range(N_LISTS):
        ptrs = ptrs + (all_ptrs[k],)
    _chunk(ptrs, begin, end, grad_scale, s, UPDATE, N_LISTS, LISTS, READS, WRITES, VARIANT,
           DTYPE, OPMATH, UNSCALE, MAXIMIZE, BLOCK)


@triton.jit
def _state_kernel(s0, s1, s2, s3, lr_ptr, found_inf_ptr, hyper,
                  ADVANCE: tl.constexpr, SCALARS: tl.constexpr, N_FLOATS: tl.constexpr,
                  N_STATES: tl.constexpr, LISTS: tl.constexpr, VARIANT: tl.constexpr,
                  STATE_F64: tl.constexpr, LR_DTYPE: tl.constexpr, OPMATH: tl.constexpr,
                  HAS_FOUND_INF: tl.constexpr):
    """Stores one tensor's advanced state (after its _tensor_kernel, same stream)."""
    all_states = (s0, s1, s2, s3)
    state = ()
    for j in tl.static_range(N_STATES):
        state = state + (tl.load(all_states[j]).to(tl.float64),)
    new_state, _ = _scalars_of(state, lr_ptr, (0.0, 0.0, 0.0), hyper, ADVANCE, SCALARS,
                               N_FLOATS, N_STATES, LISTS, VARIANT, STATE_F64, LR_DTYPE,
                               True, OPMATH)
    go = True
    if HAS_FOUND_INF:
        go = tl.load(found_inf_ptr) == 0
    for j in tl.static_range(N_STATES):
        _store_state(all_states[j], new_state[j], go, (STATE_F64 >> j) & 1)


# ---------------------------------------------------------------------------------
# The resident tables


@dataclass
class _Table:
    meta: torch.Tensor          # the one int64 device tensor; the fields below view it
    list_offsets: torch.Tensor
    state_ptrs: torch.Tensor
    numels: torch.Tensor
    n_chunks: torch.Tensor
    work: torch.Tensor
    arrivals: torch.Tensor      # int32 [n], zero between launches
    n_tensors: int
    n_programs: int
    elem_align: int             # every address is a multiple of this many elements
    state_f64: int              # bit j: state list j is float64 (else float32)


_TABLES: collections.OrderedDict[tuple, _Table] = collections.OrderedDict()
_STATS = {"builds": 0, "hits": 0}


def table_cache_info() -> dict[str, int]:
    """Builds and hits of the table cache since the last clear (for tests and tuning)."""
    return {**_STATS, "size": len(_TABLES)}


def clear_table_cache() -> None:
    _TABLES.clear()
    _STATS.update(builds=0, hits=0)


def _qualified(op: str) -> str:
    return f"fused_optim_triton::{op}"


def _op_error(op: str, msg: str) -> RuntimeError:
    return RuntimeError(f"{_qualified(op)}: {msg}")


def _check_bucket(op: str, names: list[str], lists: list[list[torch.Tensor]],
                  states: list[tuple[str, list[torch.Tensor]]]) -> None:
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
    if states:
        for name, tensors in states:
            for i, s in enumerate(tensors):
                if s.numel() != 1:
                    raise _op_error(op, f"{name}[{i}] must be a one-element tensor")
                if s.dtype not in (torch.float32, torch.float64):
                    raise _op_error(op, f"state must be float32 or float64, {name}[{i}] is "
                                        f"{s.dtype}")
                if s.device != device:
                    raise _op_error(op, f"{name}[{i}] is on {s.device} but the params are "
                                        f"on {device}; the Triton backend reads state on the "
                                        "params' device (as torch's fused Adam keeps it)")


def _state_f64(states: list[tuple[str, list[torch.Tensor]]], row: int) -> int:
    """Row `row`'s state dtypes as the kernels take them (STATE_F64): bit j set where
    state list j holds a float64 tensor (torch.optim may keep a param's step in float32
    and its other per-tensor states in float64, e.g. after loading a float64 model's
    state_dict)."""
    return sum(1 << j for j, (_, tensors) in enumerate(states)
               if tensors[row].dtype == torch.float64)


def _rows_by_state_dtypes(states: list[tuple[str, list[torch.Tensor]]]
                          ) -> list[list[int]] | None:
    """None when every row's states have the first row's dtypes (the common case, one
    launch); else the rows grouped by their states' dtypes, in order of first use."""
    if not states:
        return None
    first = [tensors[0].dtype for _, tensors in states]
    if all(t.dtype == d for (_, tensors), d in zip(states, first) for t in tensors):
        return None
    groups: dict[int, list[int]] = {}
    for i in range(len(states[0][1])):
        groups.setdefault(_state_f64(states, i), []).append(i)
    return list(groups.values())


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
               slots: list[int], n_slots: int, states: list[tuple[str, list[torch.Tensor]]],
               config: LaunchConfig) -> _Table:
    """The table of `lists` (the call's lists, optimizer list `slots[i]` each)."""
    params = lists[0]
    ptrs = [t.data_ptr() for lst in lists for t in lst]
    state_ptrs = [s.data_ptr() for _, tensors in states for s in tensors]
    numels = [p.numel() for p in params]
    # The states' dtypes are part of the key: the table fixes how the kernel reads each
    # state list (STATE_F64), and a float64 state may sit where a float32 one did.
    state_f64 = _state_f64(states, 0)
    key = (params[0].device, params[0].dtype, state_f64, tuple(slots), n_slots,
           config.chunk, tuple(ptrs), tuple(state_ptrs), tuple(numels))
    table = _TABLES.get(key)
    if table is not None:
        _TABLES.move_to_end(key)
        _STATS["hits"] += 1
        return table
    _check_bucket(op, names, lists, states)
    n = len(params)
    # Every optimizer list gets a row; a list the call leaves out repeats the params'.
    slot_ptrs = [ptrs[:n]] * n_slots
    for i, slot in enumerate(slots):
        slot_ptrs[slot] = ptrs[i * n:(i + 1) * n]
    table = _build_table(op, params[0].device, [p for row in slot_ptrs for p in row],
                         state_ptrs, numels, config, state_f64, params[0].element_size())
    _TABLES[key] = table
    if len(_TABLES) > _TABLE_CACHE_SIZE:
        _TABLES.popitem(last=False)
    _STATS["builds"] += 1
    return table


def _build_table(op: str, device: torch.device, ptrs: list[int], state_ptrs: list[int],
                 numels: list[int], config: LaunchConfig, state_f64: int,
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
    host = torch.cat([torch.tensor(offsets, dtype=torch.int64),
                      torch.tensor(state_ptrs, dtype=torch.int64), numel_t, n_chunks, work])
    meta = host.to(device)  # the one host-to-device copy, per new parameter set
    sizes = [len(ptrs), len(state_ptrs), n, n, 2 * n_programs]
    list_offsets, state_ptrs_t, numels_t, n_chunks_t, work_t = torch.split(meta, sizes)
    return _Table(meta, list_offsets, state_ptrs_t, numels_t, n_chunks_t, work_t,
                  torch.zeros(n, dtype=torch.int32, device=device), n, n_programs,
                  elem_align, state_f64)


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
    if t is not None:
        check_device_scalar(_qualified(op), name, t, device)


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


@dataclass(frozen=True)
class _Call:
    """One call's lists and compile-time shape, from the spec and the arguments."""

    names: list[str]                 # the call's lists (present ones), op order
    lists: list[list[torch.Tensor]]
    slots: list[int]                 # optimizer list of each
    states: list[tuple[str, list[torch.Tensor]]]
    constexprs: dict[str, Any]       # ADVANCE ... N_STATES
    hyper: tuple[float, ...]         # float arguments as float32 parts


def _prepare(op: str, spec, lists: tuple, h: dict[str, Any], grad_scale) -> _Call:
    args = spec.list_args()
    n_lists = len(args)
    if len(lists) != n_lists + len(spec.scalars):
        raise _op_error(op, f"expected {n_lists + len(spec.scalars)} lists, got {len(lists)}")
    if n_lists > MAX_LISTS or len(spec.scalars) > MAX_STATES:
        raise _op_error(op, "more lists than the kernels take")
    by_arg = dict(zip(args, lists[:n_lists]))
    # The checks of the list counts the C++ ops make (shared with their fake kernel).
    qualified = _qualified(op)
    names, present, slots = [], [], []
    for name, lst in present_lists(spec, qualified, by_arg, h):
        names.append(name)
        present.append(list(lst))
        slots.append(args.index(name))
    mask = sum(1 << k for k in slots)
    n = len(present[0])
    states = [(s.arg, list(t)) for s, t in zip(spec.scalars, lists[n_lists:])]
    for name, lst in [*zip(names, present), *states]:
        check_count(qualified, name, lst, n)
    variant, advance, scalars, update, skip_reads = _math_of(spec)
    reads = 0
    for k in range(n_lists):
        if (mask >> k) & 1 and k != 1:
            reads |= 1 << k
    reads &= ~skip_reads(h)
    reads |= 0b10  # the grad
    constexprs = dict(
        ADVANCE=advance, SCALARS=scalars, UPDATE=update, N_LISTS=n_lists, LISTS=mask,
        READS=reads, WRITES=mask & ~0b10, VARIANT=variant(h), N_FLOATS=len(spec.floats),
        N_STATES=len(spec.scalars),
    )
    hyper = tuple(part for f in spec.floats for part in split_f64(h[f.name]))
    return _Call(names, present, slots, states, constexprs, hyper)


@functools.lru_cache(maxsize=None)
def _math_of(spec):
    """The optimizer's math in math.py: (variant, advance, scalars, update, skip_reads);
    skip_reads(h) is the mask of the lists whose old values a call's update never reads
    (math.<name>_skip_reads, e.g. a buffer that its first step sets from the grad; none
    by default)."""
    try:
        return (getattr(_math, f"{spec.name}_variant"),
                getattr(_math, f"{spec.name}_advance", _math.count_step),
                getattr(_math, f"{spec.name}_scalars"),
                getattr(_math, f"{spec.name}_update"),
                getattr(_math, f"{spec.name}_skip_reads", _reads_all))
    except AttributeError as exc:
        raise NotImplementedError(
            f"fused_optim_triton: no Triton math for {spec.name!r} in "
            f"fused_optim.triton_kernels.math ({exc})") from None


def _reads_all(h: dict[str, Any]) -> int:
    return 0


def step_table(spec, *lists, lr, grad_scale=None, found_inf=None,
               config: LaunchConfig | None = None, _host_lr: bool = False, **h) -> None:
    """One step of `spec`'s optimizer over a bucket: one launch of the table kernel.
    Arguments as the op's (fused_optim/spec.py)."""
    op = spec.op
    config = config or CONFIG
    call = _prepare(op, spec, lists, h, grad_scale)
    params = call.lists[0]
    if not params:
        return
    rows = _rows_by_state_dtypes(call.states)
    if rows is not None:
        # Rows whose per-tensor states differ in dtype: one launch per kind (a table
        # reads each state list in one dtype).
        n_lists = len(spec.list_args())
        for idx in rows:
            step_table(spec, *[[lst[i] for i in idx] if lst else lst for lst in lists[:n_lists]],
                       *[[lst[i] for i in idx] for lst in lists[n_lists:]], lr=lr,
                       grad_scale=grad_scale, found_inf=found_inf, config=config,
                       _host_lr=_host_lr, **h)
        return
    device, dtype = params[0].device, params[0].dtype
    lr_ptr, lr_parts, lr_on_device = _lr_args(op, lr, device, _host_lr)
    _check_scalar(op, "grad_scale", grad_scale, device)
    _check_scalar(op, "found_inf", found_inf, device)
    table = _get_table(op, call.names, call.lists, call.slots,
                       call.constexprs["N_LISTS"], call.states, config)
    _table_kernel[(table.n_programs,)](
        params[0], table.list_offsets, table.state_ptrs, table.numels, table.n_chunks,
        table.work, table.arrivals, table.n_tensors,
        lr_ptr, grad_scale, found_inf, lr_parts, call.hyper,
        **call.constexprs,
        DTYPE=_TL_DTYPE[dtype], OPMATH=_opmath(dtype),
        STATE_F64=table.state_f64,
        LR_DTYPE=_TL_DTYPE.get(lr.dtype, tl.float64), LR_ON_DEVICE=lr_on_device,
        UNSCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
        MAXIMIZE=bool(h.get("maximize", False)),
        CHUNK=config.chunk, BLOCK=config.block, ELEM_ALIGN=table.elem_align,
        num_warps=config.num_warps, enable_fp_fusion=False,
    )


def step_per_tensor(spec, *lists, lr, grad_scale=None, found_inf=None,
                    config: LaunchConfig | None = None, **h) -> None:
    """The same step with one launch per tensor and tensors as kernel arguments, then
    one launch per tensor that stores its state: the form torch.compile can trace (see
    [note: torch.compile])."""
    op = spec.op
    config = config or CONFIG
    call = _prepare(op, spec, lists, h, grad_scale)
    params = call.lists[0]
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    lr_t = lr if lr.device == device else lr.to(device)
    c = call.constexprs
    common = dict(N_FLOATS=c["N_FLOATS"], N_STATES=c["N_STATES"], LISTS=c["LISTS"],
                  VARIANT=c["VARIANT"], LR_DTYPE=_TL_DTYPE.get(lr_t.dtype, tl.float64),
                  OPMATH=_opmath(dtype), ADVANCE=c["ADVANCE"], SCALARS=c["SCALARS"])
    # wrap_triton: a traced call becomes a graph node; eager calls get the kernel back.
    kernel = wrap_triton(_tensor_kernel)
    state_kernel = wrap_triton(_state_kernel)
    for i, p in enumerate(params):
        xs = [None] * MAX_LISTS
        for slot, lst in zip(call.slots, call.lists):
            xs[slot] = lst[i]
        ss = [None] * MAX_STATES
        for j, (_, tensors) in enumerate(call.states):
            ss[j] = tensors[i]
        n = p.numel()
        if n > 0:
            kernel[(triton.cdiv(n, config.chunk),)](
                *xs, *ss, n, lr_t, grad_scale, found_inf, call.hyper,
                UPDATE=c["UPDATE"], N_LISTS=c["N_LISTS"], READS=c["READS"],
                WRITES=c["WRITES"], DTYPE=_TL_DTYPE[dtype], UNSCALE=grad_scale is not None,
                HAS_FOUND_INF=found_inf is not None, MAXIMIZE=bool(h.get("maximize", False)),
                CHUNK=config.chunk, BLOCK=config.block, num_warps=config.num_warps,
                STATE_F64=_state_f64(call.states, i), **common,
            )
        if call.states:
            state_kernel[(1,)](*ss, lr_t, found_inf, call.hyper,
                               HAS_FOUND_INF=found_inf is not None,
                               STATE_F64=_state_f64(call.states, i), **common)
