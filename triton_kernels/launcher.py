"""The Triton multi-tensor engine: one launch per (device, dtype) bucket, every optimizer.

What it computes: one optimizer step (its math in math.py) over every tensor of a
bucket, in ONE kernel launch, with each program handling one chunk of one tensor. The
optimizer is its spec (fused_optim/spec.py): its lists, per-tensor state and arguments;
its math is found in math.py under its name (``<name>_variant``, ``<name>_advance``,
``<name>_scalars``, ``<name>_update``) and passed to the kernels as constexpr
functions. Nothing here names an optimizer.

Preconditions (checked when a table is built, see `_check_bucket`): every list as long
as params; every tensor on params' device, of params' dtype (the state lists: of a
memory policy's state dtype, see [note: memory policy]; the work lists: of their own,
see [note: work lists]), shape and strides, and
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
                                leaves out has 0), tensor t at k * n + t: its address
                                minus its base's, in elements of its dtype (the base:
                                params[0] for params and grads, the first state tensor
                                for the state lists, the first work list's first tensor
                                for the work lists)
    state_ptrs   [N_STATES * n] data_ptr of tensor t's state j at j * n + t
    master_offsets [n]          master_params[t]'s address minus master_params[0]'s, in
                                elements (only with master copies)
    rng_ptrs     [n]            data_ptr of rng_states[t] (only with stochastic rounding)
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

[note: memory policy]
A call may carry a memory policy (fused_optim/_policy.py; the CPU engine's
[note: memory policy] in csrc/cpu/kernel_api.h), which changes the loads and stores
only, in the same kernels (constexprs STATE_DTYPE, MASTER, STOCHASTIC, POLICY):
  * the state lists are of STATE_DTYPE (bf16 states of fp32 params, fp32 states of bf16
    params), addressed from their own base; math in fp32 either way;
  * master_params (MASTER): the update reads the param from its fp32 copy, writes the
    copy, and writes the param rounded to nearest from it in the same pass;
  * rng_states (STOCHASTIC): element i of tensor t rounds its bf16 stores with the words
    of tl.randint4x(seed_t, offset_t + i) (Philox4x32-10, key seed_t, counter (lo, hi,
    0, 0) of offset_t + i): word 0 for the param, 1 + j for the j-th state list the call
    keeps (WORDS). seed_t and offset_t are read from rng_states[t] by the kernel; the
    last program of t (the arrivals of [note: advancing the state inside one launch])
    writes offset_t + numel_t; a skipped step writes nothing;
  * every store of a policy call rounds as round_store in kernels_impl.h: bf16 NaNs keep
    their sign and high payload ((u >> 16) | 0x40), where the uniform stores give
    c10's 0x7fc0 (math.to_policy_storage vs to_storage).
Bytes per element move with the storage: fp32 AdamW with bf16 states reads 12 B and
writes 8 B; bf16 AdamW with an fp32 master copy and fp32 states reads 14 B (master,
bf16 grad, states; not the param) and writes 14 B (master, bf16 param, states).
Philox4x32-10 adds 10 rounds of two 32-bit multiply-high/low pairs per element, computed
only when STOCHASTIC (its cost on a GPU is unmeasured).

[note: work lists]
A spec's StateList(dtype=...) is a work list stored in that dtype whatever the params'
(Muon's bf16 `updates`: [note: bf16 work lists] in
csrc/include/fused_optim/math/optimizer.h). The kernels take it from the spec, for any
optimizer (constexprs FIXED, a bit per list, and WORK_DTYPE, their dtype: bf16, the
one the C++ engines take too): it is addressed from its own base (work_base, WORK_ALIGN), loaded exactly into
opmath, and stored rounded to the params' dtype first, then through float32 to
WORK_DTYPE (math.to_work_storage: the bits of torch's `.bfloat16()` of a tensor of the
params' dtype, as the C++ engines store it). Such a call takes no memory policy and
its other state lists are of the params' dtype.
The stages that use work lists also read or write only some of the lists (Muon's
momentum stage leaves the params alone, its apply stage the buffer and the update):
READS and WRITES come from the math's <name>_skip_reads / <name>_skip_writes (the C++
math's reads / writes), so a stage moves only the bytes it needs (Muon fp32: momentum
reads 8 B and writes 6 B per element, apply reads 6 B and writes 4 B), and a stage that
never reads the grad leaves it as it is, grad_scale or not.

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

from fused_optim._fake import (check_count, check_device_scalar, check_list_dtype,
                               check_policy, present_lists, state_dtype_of)

from . import math as _math
from .math import to_policy_storage, to_storage, to_work_storage, unscale

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
def _block(ptrs, master, offs, mask, grad_scale, s, seed, counter, UPDATE: tl.constexpr,
           N_LISTS: tl.constexpr, LISTS: tl.constexpr, READS: tl.constexpr,
           WRITES: tl.constexpr, VARIANT: tl.constexpr, DTYPE: tl.constexpr,
           STATE_DTYPE: tl.constexpr, OPMATH: tl.constexpr, UNSCALE: tl.constexpr,
           MAXIMIZE: tl.constexpr, MASTER: tl.constexpr, STOCHASTIC: tl.constexpr,
           WORDS: tl.constexpr, POLICY: tl.constexpr, FIXED: tl.constexpr,
           WORK_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """The optimizer's update on the elements `offs` (where `mask`, or all when mask is
    None): x holds every list of the optimizer (list 0 params, 1 grads); lists the call
    leaves out, or whose old values the update never reads (READS), are zeros, never
    loaded, and only the lists of WRITES are stored (the grad: when READS has it and the
    call unscales it). The work lists of FIXED are of WORK_DTYPE ([note: work lists]).
    Under a memory policy ([note: memory policy]) the state lists are of STATE_DTYPE,
    the params are read from and written to their fp32 copies `master` (MASTER) and
    written rounded to nearest from them, and bf16 stores round stochastically
    (STOCHASTIC) with the Philox words of counter `counter` + offs under key `seed`."""
    x = ()
    for k in tl.static_range(N_LISTS):
        if (READS >> k) & 1:
            if MASTER and k == 0:
                x = x + (tl.load(master + offs, mask=mask),)
            else:
                x = x + (tl.load(ptrs[k] + offs, mask=mask).to(OPMATH),)
        else:
            x = x + (tl.zeros([BLOCK], OPMATH),)
    g = x[1]
    if UNSCALE:
        if (READS >> 1) & 1:  # a stage that never reads the grad leaves it as it is
            g = unscale(g, grad_scale)
            if POLICY:
                tl.store(ptrs[1] + offs, to_policy_storage(g, DTYPE, 0, False), mask=mask)
            else:
                tl.store(ptrs[1] + offs, to_storage(g, DTYPE), mask=mask)
    if MAXIMIZE:
        g = -g
    x = UPDATE(x, g, s, LISTS, VARIANT)
    words = (0, 0, 0, 0)
    if STOCHASTIC:
        words = tl.randint4x(seed, counter + offs)
    for k in tl.static_range(N_LISTS):
        if (WRITES >> k) & 1:
            if (FIXED >> k) & 1:
                tl.store(ptrs[k] + offs, to_work_storage(x[k], DTYPE, WORK_DTYPE), mask=mask)
            elif not POLICY:
                tl.store(ptrs[k] + offs, to_storage(x[k], DTYPE), mask=mask)
            elif MASTER and k == 0:
                tl.store(master + offs, x[0], mask=mask)
                # The param from its copy: to nearest, never stochastically.
                tl.store(ptrs[0] + offs, to_policy_storage(x[0], DTYPE, 0, False), mask=mask)
            elif k == 0:
                tl.store(ptrs[0] + offs, to_policy_storage(x[0], DTYPE, words[0], STOCHASTIC),
                         mask=mask)
            else:
                # Word 1 + j for the j-th state list the call keeps (WORDS, 2 bits a list).
                tl.store(ptrs[k] + offs,
                         to_policy_storage(x[k], STATE_DTYPE, words[(WORDS >> (2 * k)) & 3],
                                           STOCHASTIC), mask=mask)


@triton.jit
def _chunk(ptrs, master, begin, end, grad_scale, s, seed, counter, UPDATE: tl.constexpr,
           N_LISTS: tl.constexpr, LISTS: tl.constexpr, READS: tl.constexpr,
           WRITES: tl.constexpr, VARIANT: tl.constexpr, DTYPE: tl.constexpr,
           STATE_DTYPE: tl.constexpr, OPMATH: tl.constexpr, UNSCALE: tl.constexpr,
           MAXIMIZE: tl.constexpr, MASTER: tl.constexpr, STOCHASTIC: tl.constexpr,
           WORDS: tl.constexpr, POLICY: tl.constexpr, FIXED: tl.constexpr,
           WORK_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """Elements [begin, end) of one tensor's lists; begin is a multiple of BLOCK. Full
    blocks go unmasked (a mask of unknown alignment keeps the compiler from vectorizing),
    then one masked tail. Alignment hints must be given where begin and the pointers are
    computed: a tl.multiple_of on an argument of this function is lost."""
    full_end = end - (end - begin) % BLOCK
    for block_start in range(begin, full_end, BLOCK):
        offs = block_start + tl.arange(0, BLOCK)
        _block(ptrs, master, offs, None, grad_scale, s, seed, counter, UPDATE, N_LISTS, LISTS,
               READS, WRITES, VARIANT, DTYPE, STATE_DTYPE, OPMATH, UNSCALE, MAXIMIZE, MASTER,
               STOCHASTIC, WORDS, POLICY, FIXED, WORK_DTYPE, BLOCK)
    if full_end < end:
        offs = full_end + tl.arange(0, BLOCK)
        _block(ptrs, master, offs, offs < end, grad_scale, s, seed, counter, UPDATE, N_LISTS,
               LISTS, READS, WRITES, VARIANT, DTYPE, STATE_DTYPE, OPMATH, UNSCALE, MAXIMIZE,
               MASTER, STOCHASTIC, WORDS, POLICY, FIXED, WORK_DTYPE, BLOCK)


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
    # the resident table ([note: the resident table]); base is params[0], state_base the
    # first state tensor (or params[0]), work_base the first work list's first tensor
    # ([note: work lists]; None without), master_base master_params[0] (None without)
    base, state_base, work_base, master_base, list_offsets, state_ptrs, master_offsets, rng_ptrs,
    numels, n_chunks, work, arrivals, n_tensors,
    # device scalars (None when absent)
    lr_ptr, grad_scale_ptr, found_inf_ptr,
    # float64 lr (when not LR_ON_DEVICE) and float arguments, as float32 (hi, mid, lo)
    lr_parts, hyper,
    # the optimizer's math (math.py) and its shape
    ADVANCE: tl.constexpr, SCALARS: tl.constexpr, UPDATE: tl.constexpr,
    N_LISTS: tl.constexpr, LISTS: tl.constexpr, READS: tl.constexpr, WRITES: tl.constexpr,
    VARIANT: tl.constexpr, N_FLOATS: tl.constexpr, N_STATES: tl.constexpr,
    # the memory policy ([note: memory policy])
    STATE_DTYPE: tl.constexpr, MASTER: tl.constexpr, STOCHASTIC: tl.constexpr,
    WORDS: tl.constexpr, POLICY: tl.constexpr,
    # the work lists ([note: work lists]): a bit per list, their dtype
    FIXED: tl.constexpr, WORK_DTYPE: tl.constexpr,
    # meta-parameters
    DTYPE: tl.constexpr, OPMATH: tl.constexpr, STATE_F64: tl.constexpr,
    LR_DTYPE: tl.constexpr, LR_ON_DEVICE: tl.constexpr, UNSCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, MAXIMIZE: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, ELEM_ALIGN: tl.constexpr,
    STATE_ALIGN: tl.constexpr, WORK_ALIGN: tl.constexpr, MASTER_ALIGN: tl.constexpr,
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
    # Tensor t's lists: params[0]'s pointer plus element offsets (the state lists:
    # state_base's, in their own dtype; the work lists: work_base's), its master copy,
    # its Philox key and counter.
    ptrs = ()
    for k in tl.static_range(N_LISTS):
        if k < 2:
            ptrs = ptrs + (base + tl.multiple_of(tl.load(list_offsets + k * n_tensors + t),
                                                 ELEM_ALIGN),)
        elif (FIXED >> k) & 1:
            ptrs = ptrs + (work_base + tl.multiple_of(
                tl.load(list_offsets + k * n_tensors + t), WORK_ALIGN),)
        else:
            ptrs = ptrs + (state_base + tl.multiple_of(
                tl.load(list_offsets + k * n_tensors + t), STATE_ALIGN),)
    master = None
    if MASTER:
        master = master_base + tl.multiple_of(tl.load(master_offsets + t), MASTER_ALIGN)
    seed = 0
    counter = 0
    if STOCHASTIC:
        rng_at = tl.load(rng_ptrs + t).to(tl.pointer_type(tl.int64))
        seed = tl.load(rng_at)
        counter = tl.load(rng_at + 1)
    _chunk(ptrs, master, begin, end, grad_scale, s, seed, counter, UPDATE, N_LISTS, LISTS,
           READS, WRITES, VARIANT, DTYPE, STATE_DTYPE, OPMATH, UNSCALE, MAXIMIZE, MASTER,
           STOCHASTIC, WORDS, POLICY, FIXED, WORK_DTYPE, BLOCK)
    if N_STATES > 0 or STOCHASTIC:
        # Store the state and the advanced counter (offset + numel) once, from the last
        # of t's programs ([note: advancing ...]).
        tl.debug_barrier()
        arrived = tl.atomic_add(arrivals + t, 1, mask=go, sem="acq_rel", scope="gpu")
        last = go & (arrived == tl.load(n_chunks + t) - 1)
        for j in tl.static_range(N_STATES):
            _store_state(state_at[j], new_state[j], last, (STATE_F64 >> j) & 1)
        if STOCHASTIC:
            tl.store(rng_at + 1, counter + tl.load(numels + t), mask=last)
        tl.store(arrivals + t, 0, mask=last)


@triton.jit
def _tensor_kernel(
    # one tensor's lists (list k of the optimizer at x<k>; None where absent), its state
    # (s<j>: read, not written: see [note: torch.compile]), its master copy and
    # [seed, offset] (None without; read, not written) and its size
    x0, x1, x2, x3, x4, x5, x6, x7, s0, s1, s2, s3, m, rng, numel,
    # device scalars (None when absent), the float arguments as float32 parts
    lr_ptr, grad_scale_ptr, found_inf_ptr, hyper,
    ADVANCE: tl.constexpr, SCALARS: tl.constexpr, UPDATE: tl.constexpr,
    N_LISTS: tl.constexpr, LISTS: tl.constexpr, READS: tl.constexpr, WRITES: tl.constexpr,
    VARIANT: tl.constexpr, N_FLOATS: tl.constexpr, N_STATES: tl.constexpr,
    STATE_DTYPE: tl.constexpr, MASTER: tl.constexpr, STOCHASTIC: tl.constexpr,
    WORDS: tl.constexpr, POLICY: tl.constexpr, FIXED: tl.constexpr, WORK_DTYPE: tl.constexpr,
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
    seed = 0
    counter = 0
    if STOCHASTIC:
        seed = tl.load(rng)
        counter = tl.load(rng + 1)
    _chunk(ptrs, m, begin, end, grad_scale, s, seed, counter, UPDATE, N_LISTS, LISTS, READS,
           WRITES, VARIANT, DTYPE, STATE_DTYPE, OPMATH, UNSCALE, MAXIMIZE, MASTER, STOCHASTIC,
           WORDS, POLICY, FIXED, WORK_DTYPE, BLOCK)


@triton.jit
def _state_kernel(s0, s1, s2, s3, rng, n_elements, lr_ptr, found_inf_ptr, hyper,
                  ADVANCE: tl.constexpr, SCALARS: tl.constexpr, N_FLOATS: tl.constexpr,
                  N_STATES: tl.constexpr, LISTS: tl.constexpr, VARIANT: tl.constexpr,
                  STATE_F64: tl.constexpr, LR_DTYPE: tl.constexpr, OPMATH: tl.constexpr,
                  HAS_FOUND_INF: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Stores one tensor's advanced state, and its advanced counter (offset + its
    n_elements) when STOCHASTIC (after its _tensor_kernel, same stream)."""
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
    if STOCHASTIC:
        tl.store(rng + 1, tl.load(rng + 1) + n_elements, mask=go)


# ---------------------------------------------------------------------------------
# The resident tables


@dataclass
class _Table:
    meta: torch.Tensor          # the one int64 device tensor; the fields below view it
    list_offsets: torch.Tensor
    state_ptrs: torch.Tensor
    master_offsets: torch.Tensor | None
    rng_ptrs: torch.Tensor | None
    numels: torch.Tensor
    n_chunks: torch.Tensor
    work: torch.Tensor
    arrivals: torch.Tensor      # int32 [n], zero between launches
    n_tensors: int
    n_programs: int
    elem_align: int             # every address is a multiple of this many elements:
    state_align: int            # params and grads, state lists, work lists, master
    work_align: int             # copies
    master_align: int
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
                  states: list[tuple[str, list[torch.Tensor]]],
                  master: list[torch.Tensor] | None = None,
                  rng: list[torch.Tensor] | None = None, state_dtype: torch.dtype | None = None,
                  fixed: dict[str, str] | None = None) -> None:
    """The checks of csrc/ops_common.h check_bucket / check_scalars / check_policy_lists
    (the dtype rules and the memory policy's in fused_optim/_fake.py, shared with the
    fake kernels), run once per table (not per step). `state_dtype`: the call's (see
    _prepare); `fixed`: the spec's work lists and their dtypes."""
    params = lists[0]
    device, dtype = params[0].device, params[0].dtype
    if dtype not in SUPPORTED_DTYPES:
        raise _op_error(op, f"parameters must be float32, float64, float16 or bfloat16, "
                            f"got {dtype}")
    present = list(zip(names, lists))
    if state_dtype is None:
        state_dtype = state_dtype_of(present, bool(master), bool(rng))
    for i, p in enumerate(params):
        for k, (name, lst) in enumerate(present):
            t = lst[i]
            where = f"{name}[{i}]"
            if t.layout != torch.strided:
                raise _op_error(op, f"{where} is sparse; the kernels take dense tensors only")
            if t.device != device:
                raise _op_error(op, f"all tensors of one call must be on one device; {where} "
                                    f"is on {t.device}, params[0] on {device}")
            check_list_dtype(_qualified(op), present, k, i, dtype, state_dtype, fixed)
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
    check_policy(_qualified(op), present, master, rng)


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


# The groups of an optimizer's lists, each addressed from its own base in its own dtype
# ([note: the resident table]): params and grads, the state lists, the work lists.
_PARAMS, _STATES, _WORK = 0, 1, 2


def _group_of(slot: int, fixed: int) -> int:
    """The group of optimizer list `slot`; `fixed`: the work lists, a bit each."""
    return _PARAMS if slot < 2 else _WORK if (fixed >> slot) & 1 else _STATES


def _bases(call: "_Call") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Each group's base tensor: params[0]; the first state list's first tensor (params[0]
    when the call keeps none); the first work list's first tensor (None without)."""
    fixed = call.constexprs["FIXED"]
    found: list[torch.Tensor | None] = [call.lists[0][0], None, None]
    for slot, lst in zip(call.slots, call.lists):
        group = _group_of(slot, fixed)
        if found[group] is None:
            found[group] = lst[0]
    return found[0], found[1] if found[1] is not None else found[0], found[2]


def _get_table(op: str, call: "_Call", config: LaunchConfig) -> _Table:
    """The table of a call's lists (optimizer list `call.slots[i]` each), state and
    policy lists."""
    lists, states, master, rng = call.lists, call.states, call.master, call.rng
    params = lists[0]
    ptrs = [t.data_ptr() for lst in lists for t in lst]
    state_ptrs = [s.data_ptr() for _, tensors in states for s in tensors]
    master_ptrs = [t.data_ptr() for t in master] if master else []
    rng_ptrs = [t.data_ptr() for t in rng] if rng else []
    numels = [p.numel() for p in params]
    # The states' dtypes are part of the key: the table fixes how the kernel reads each
    # state list (STATE_F64, STATE_DTYPE), and a float64 state may sit where a float32
    # one did. So are the work lists: they fix each list's group (its base).
    state_f64 = _state_f64(states, 0)
    n_slots = call.constexprs["N_LISTS"]
    fixed = call.constexprs["FIXED"]
    key = (params[0].device, params[0].dtype, call.state_dtype, state_f64, tuple(call.slots),
           n_slots, fixed, config.chunk, tuple(ptrs), tuple(state_ptrs), bool(master),
           tuple(master_ptrs), bool(rng), tuple(rng_ptrs), tuple(numels))
    table = _TABLES.get(key)
    if table is not None:
        _TABLES.move_to_end(key)
        _STATS["hits"] += 1
        return table
    _check_bucket(op, call.names, lists, states, master, rng, call.state_dtype, call.fixed)
    n = len(params)
    # Every optimizer list gets a row of offsets from its group's base, in bytes here (0
    # for a list the call leaves out).
    bases = _bases(call)
    groups = [_group_of(k, fixed) for k in range(n_slots)]
    rows = [[0] * n for _ in range(n_slots)]
    for i, slot in enumerate(call.slots):
        base = bases[groups[slot]].data_ptr()
        rows[slot] = [q - base for q in ptrs[i * n:(i + 1) * n]]
    table = _build_table(op, params[0].device, rows, groups,
                         [b.data_ptr() if b is not None else None for b in bases],
                         [b.element_size() if b is not None else 1 for b in bases],
                         state_ptrs, master_ptrs, rng_ptrs, numels, config, state_f64)
    _TABLES[key] = table
    if len(_TABLES) > _TABLE_CACHE_SIZE:
        _TABLES.popitem(last=False)
    _STATS["builds"] += 1
    return table


def _offsets(op: str, rows: list[list[int]], base: int | None, size: int
             ) -> tuple[list[list[int]], int]:
    """Byte offsets `rows` from `base` in elements of `size` bytes, and the alignment
    hint of their group: 16 // size elements when the base and every offset are
    16-byte aligned, else 1."""
    flat = [d for row in rows for d in row]
    if any(d % size for d in flat):
        raise _op_error(op, f"tensor addresses are not multiples of the element size "
                            f"({size} B) apart")
    aligned = base is not None and base % 16 == 0 and all(d % 16 == 0 for d in flat)
    return [[d // size for d in row] for row in rows], 16 // size if aligned else 1


def _build_table(op: str, device: torch.device, rows: list[list[int]], groups: list[int],
                 bases: list[int | None], sizes: list[int], state_ptrs: list[int],
                 master_ptrs: list[int], rng_ptrs: list[int], numels: list[int],
                 config: LaunchConfig, state_f64: int) -> _Table:
    """`rows`: per optimizer list, each tensor's address minus its group's base in bytes;
    `groups`: each list's group (_PARAMS, _STATES, _WORK); `bases`, `sizes`: each
    group's base address (None: a group without lists) and element size."""
    n = len(numels)
    offsets: list[list[int]] = [[] for _ in rows]
    aligns = []
    for group, (base, size) in enumerate(zip(bases, sizes)):
        members = [k for k, g in enumerate(groups) if g == group]
        converted, align = _offsets(op, [rows[k] for k in members], base, size)
        for k, row in zip(members, converted):
            offsets[k] = row
        aligns.append(align)
    master_offsets, master_align = [], 1
    if master_ptrs:
        (master_offsets,), master_align = _offsets(
            op, [[q - master_ptrs[0] for q in master_ptrs]], master_ptrs[0], 4)
    numel_t = torch.tensor(numels, dtype=torch.int64)
    n_chunks = torch.clamp((numel_t + config.chunk - 1) // config.chunk, min=1)
    n_programs = int(n_chunks.sum())
    # program -> (tensor, first element): tensor t owns n_chunks[t] consecutive programs
    tensor_of = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), n_chunks)
    first_program = torch.cumsum(n_chunks, 0) - n_chunks
    chunk_of = torch.arange(n_programs, dtype=torch.int64) - first_program[tensor_of]
    work = torch.stack([tensor_of, chunk_of * config.chunk], dim=1).reshape(-1)
    list_offsets = [d for row in offsets for d in row]
    host = torch.cat([torch.tensor(list_offsets, dtype=torch.int64),
                      torch.tensor(state_ptrs, dtype=torch.int64),
                      torch.tensor(master_offsets, dtype=torch.int64),
                      torch.tensor(rng_ptrs, dtype=torch.int64), numel_t, n_chunks, work])
    meta = host.to(device)  # the one host-to-device copy, per new parameter set
    split = [len(list_offsets), len(state_ptrs), len(master_offsets), len(rng_ptrs), n, n,
             2 * n_programs]
    (list_offsets_t, state_ptrs_t, master_t, rng_t, numels_t, n_chunks_t,
     work_t) = torch.split(meta, split)
    return _Table(meta, list_offsets_t, state_ptrs_t, master_t if master_ptrs else None,
                  rng_t if rng_ptrs else None, numels_t, n_chunks_t, work_t,
                  torch.zeros(n, dtype=torch.int32, device=device), n, n_programs,
                  aligns[_PARAMS], aligns[_STATES], aligns[_WORK], master_align, state_f64)


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
    constexprs: dict[str, Any]       # ADVANCE ... N_STATES, STATE_DTYPE ... POLICY
    hyper: tuple[float, ...]         # float arguments as float32 parts
    master: list[torch.Tensor] | None   # the memory policy's lists (None: none)
    rng: list[torch.Tensor] | None
    state_dtype: torch.dtype         # the state lists' storage dtype
    fixed: dict[str, str]            # the spec's work lists -> their dtype names


def _prepare(op: str, spec, lists: tuple, h: dict[str, Any], grad_scale,
             master_params=None, rng_states=None) -> _Call:
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
    variant, advance, scalars, update, skip_reads, skip_writes = _math_of(spec)
    fixed, work_dtype = _work_lists(spec)
    dtype = present[0][0].dtype if n else torch.float32
    # The math's plain-Python functions see the params' dtype too (math.py).
    hd = {**h, "param_dtype": dtype}
    constexprs = dict(
        ADVANCE=advance, SCALARS=scalars, UPDATE=update, N_LISTS=n_lists, LISTS=mask,
        READS=mask & ~skip_reads(hd), WRITES=mask & ~0b10 & ~skip_writes(hd),
        VARIANT=variant(hd), N_FLOATS=len(spec.floats), N_STATES=len(spec.scalars),
        FIXED=fixed, WORK_DTYPE=_TL_DTYPE[work_dtype] if fixed else tl.bfloat16,
    )
    hyper = tuple(part for f in spec.floats for part in split_f64(h[f.name]))
    # The memory policy ([note: memory policy]): the state lists' dtype (the params' unless
    # the call's dtypes make a policy the engines run: checked with the lists when the
    # table is built), the master copies, the random words of each state list.
    master = list(master_params) if master_params else None
    rng = list(rng_states) if rng_states else None
    state_dtype = dtype
    if fixed and (master or rng):
        # [note: work lists]: as the C++ ops, no policy beside them.
        raise _op_error(op, "takes no memory policy (master_params, rng_states)")
    if n and not fixed:
        state_dtype = state_dtype_of(list(zip(names, present)), bool(master), bool(rng))
    kept = [k for k in slots if k >= 2]
    if rng and len(kept) > 3:
        raise _op_error(op, "stochastic rounding takes at most 3 state lists (4 random "
                            "words per element)")
    constexprs.update(
        STATE_DTYPE=_TL_DTYPE.get(state_dtype, tl.float32), MASTER=bool(master),
        STOCHASTIC=bool(rng), WORDS=sum((1 + j) << (2 * k) for j, k in enumerate(kept)),
        POLICY=bool(master) or bool(rng) or state_dtype != dtype,
    )
    return _Call(names, present, slots, states, constexprs, hyper, master, rng, state_dtype,
                 spec.fixed_dtypes)


@functools.lru_cache(maxsize=None)
def _math_of(spec):
    """The optimizer's math in math.py: (variant, advance, scalars, update, skip_reads,
    skip_writes); skip_reads(h) is the mask of the lists whose old values a call's update
    never reads (math.<name>_skip_reads, e.g. a buffer that its first step sets from the
    grad), skip_writes(h) of those it never changes (math.<name>_skip_writes, e.g. the
    params in a stage that does not step them); none by default."""
    try:
        return (getattr(_math, f"{spec.name}_variant"),
                getattr(_math, f"{spec.name}_advance", _math.count_step),
                getattr(_math, f"{spec.name}_scalars"),
                getattr(_math, f"{spec.name}_update"),
                getattr(_math, f"{spec.name}_skip_reads", _reads_all),
                getattr(_math, f"{spec.name}_skip_writes", _reads_all))
    except AttributeError as exc:
        raise NotImplementedError(
            f"fused_optim_triton: no Triton math for {spec.name!r} in "
            f"fused_optim.triton_kernels.math ({exc})") from None


def _reads_all(h: dict[str, Any]) -> int:
    return 0  # (and writes all)


@functools.lru_cache(maxsize=None)
def _work_lists(spec) -> tuple[int, torch.dtype | None]:
    """The spec's work lists ([note: work lists]): a bit per optimizer list, and their
    storage dtype (None without). bf16 only, as the C++ engines' (kBFloat16Lists):
    math.to_work_storage rounds through float32."""
    dtypes = {getattr(torch, name, None) for name in spec.fixed_dtypes.values()}
    if not dtypes <= {torch.bfloat16}:
        raise NotImplementedError(
            f"fused_optim_triton: {spec.op}'s work lists are {spec.fixed_dtypes}; the "
            "kernels take bfloat16 work lists only")
    args = spec.list_args()
    mask = sum(1 << args.index(arg) for arg in spec.fixed_dtypes)
    return mask, next(iter(dtypes), None)


def step_table(spec, *lists, lr, grad_scale=None, found_inf=None, master_params=None,
               rng_states=None, config: LaunchConfig | None = None, _host_lr: bool = False,
               **h) -> None:
    """One step of `spec`'s optimizer over a bucket: one launch of the table kernel.
    Arguments as the op's (fused_optim/spec.py), the memory policy's lists included."""
    op = spec.op
    config = config or CONFIG
    call = _prepare(op, spec, lists, h, grad_scale, master_params, rng_states)
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
                       grad_scale=grad_scale, found_inf=found_inf,
                       master_params=[call.master[i] for i in idx] if call.master else None,
                       rng_states=[call.rng[i] for i in idx] if call.rng else None,
                       config=config, _host_lr=_host_lr, **h)
        return
    device, dtype = params[0].device, params[0].dtype
    lr_ptr, lr_parts, lr_on_device = _lr_args(op, lr, device, _host_lr)
    _check_scalar(op, "grad_scale", grad_scale, device)
    _check_scalar(op, "found_inf", found_inf, device)
    table = _get_table(op, call, config)
    _, state_base, work_base = _bases(call)
    _table_kernel[(table.n_programs,)](
        params[0], state_base, work_base, call.master[0] if call.master else None,
        table.list_offsets,
        table.state_ptrs, table.master_offsets, table.rng_ptrs, table.numels, table.n_chunks,
        table.work, table.arrivals, table.n_tensors,
        lr_ptr, grad_scale, found_inf, lr_parts, call.hyper,
        **call.constexprs,
        DTYPE=_TL_DTYPE[dtype], OPMATH=_opmath(dtype),
        STATE_F64=table.state_f64,
        LR_DTYPE=_TL_DTYPE.get(lr.dtype, tl.float64), LR_ON_DEVICE=lr_on_device,
        UNSCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
        MAXIMIZE=bool(h.get("maximize", False)),
        CHUNK=config.chunk, BLOCK=config.block, ELEM_ALIGN=table.elem_align,
        STATE_ALIGN=table.state_align, WORK_ALIGN=table.work_align,
        MASTER_ALIGN=table.master_align,
        num_warps=config.num_warps, enable_fp_fusion=False,
    )


def step_per_tensor(spec, *lists, lr, grad_scale=None, found_inf=None, master_params=None,
                    rng_states=None, config: LaunchConfig | None = None, **h) -> None:
    """The same step with one launch per tensor and tensors as kernel arguments, then
    one launch per tensor that stores its state and advances its random counter: the
    form torch.compile can trace (see [note: torch.compile])."""
    op = spec.op
    config = config or CONFIG
    call = _prepare(op, spec, lists, h, grad_scale, master_params, rng_states)
    params = call.lists[0]
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    lr_t = lr if lr.device == device else lr.to(device)
    c = call.constexprs
    common = dict(N_FLOATS=c["N_FLOATS"], N_STATES=c["N_STATES"], LISTS=c["LISTS"],
                  VARIANT=c["VARIANT"], LR_DTYPE=_TL_DTYPE.get(lr_t.dtype, tl.float64),
                  OPMATH=_opmath(dtype), ADVANCE=c["ADVANCE"], SCALARS=c["SCALARS"],
                  STOCHASTIC=c["STOCHASTIC"])
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
        m = call.master[i] if call.master else None
        rng = call.rng[i] if call.rng else None
        n = p.numel()
        if n > 0:
            kernel[(triton.cdiv(n, config.chunk),)](
                *xs, *ss, m, rng, n, lr_t, grad_scale, found_inf, call.hyper,
                UPDATE=c["UPDATE"], N_LISTS=c["N_LISTS"], READS=c["READS"],
                WRITES=c["WRITES"], DTYPE=_TL_DTYPE[dtype], UNSCALE=grad_scale is not None,
                HAS_FOUND_INF=found_inf is not None, MAXIMIZE=bool(h.get("maximize", False)),
                CHUNK=config.chunk, BLOCK=config.block, num_warps=config.num_warps,
                STATE_F64=_state_f64(call.states, i), STATE_DTYPE=c["STATE_DTYPE"],
                MASTER=c["MASTER"], WORDS=c["WORDS"], POLICY=c["POLICY"], FIXED=c["FIXED"],
                WORK_DTYPE=c["WORK_DTYPE"], **common,
            )
        if call.states or rng is not None:
            state_kernel[(1,)](*ss, rng, n, lr_t, found_inf, call.hyper,
                               HAS_FOUND_INF=found_inf is not None,
                               STATE_F64=_state_f64(call.states, i), **common)
