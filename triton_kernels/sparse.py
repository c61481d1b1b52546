"""The row-sparse engine in Triton: the step of every param of a bucket whose grad is a
sparse COO tensor (nn.Embedding(sparse=True)), in ONE kernel launch.

What it computes: `sparse_step`, with the contract of fused_optim/_sparse.py (its module
docstring defines every argument) and the results of the CPU engine
(csrc/sparse_rows.cpp, csrc/cpu/kernels_impl.h rows_typed): each param's grad entries
ordered by row; for a row math that coalesces (SparseGrads.coalesce), a touched row's
entries summed in that order, each sum rounded to the storage dtype, then the row math
once per element; for one that does not (SGD), the row math once per entry, in that
order, on the row. The row maths are math.py's `<math>_rows` ([note: row math] in
csrc/include/fused_optim/math/optimizer.h), computed in float32 for fp32 / fp16 / bf16
storage and in float64 for fp64.

Preconditions (the caller's, fused_optim/_sparse.py): params and states are contiguous
2-D [rows, row length] tensors of one dtype on one device, rows[t] an int64 [nnz] tensor
on that device, values[t] a contiguous [nnz, row length] tensor of the params' dtype.
Shapes, dtypes and devices are checked on the host from metadata; that every index is in
[0, params[t].shape[0]) is checked on the device and read back (one bool: the step's
only host sync), before the kernel writes anything.

Entry order. Entries are sorted with torch's stable sort, so a row's duplicates keep
their index order. The CPU engine sorts coalescing maths with torch's (unstable) sort,
as coalesce() does; torch does not promise that order on CUDA either, and a stable sort
is deterministic. Where the two orders differ, a row's sum of duplicates rounds
differently, and cancellation in it amplifies that: with 40 duplicates of one row, up to
16 fp32 ulps apart from the CPU engine after one Adagrad step (tests/test_triton.py,
test_sparse_sums_duplicates_in_index_order; bit-equal when the orders agree).

Launch structure (one bucket, any number of params, one host sync: the range check):
  * the entries of every param concatenated (torch.cat of the rows), each index made
    unique across params by adding its param's first row in a virtual concatenation of
    all params (`row_base`), then sorted (stable); `perm` maps sorted positions to
    concatenated entries, `tensor_of` concatenated entries to params;
  * grid (total entries, blocks of the widest row): program (k, b) does nothing unless
    sorted entry k is the first of its row (its key differs from entry k - 1's) and
    block b lies within the row; the first entry's program walks the row's entries
    (while the key stays the same), sums or applies them, gathers the param and state
    row, applies the row math and scatters back. Rows are distinct, so programs never
    share an element. Counting the touched rows instead would size the grid exactly but
    needs their number on the host: a device-to-host sync per step, which this avoids at
    the cost of programs that only read two keys and exit.
  * Per-tensor metadata (element offsets of the param, its values and states relative
    to one param with entries, row length, row_base, first entry, entries, constants as
    float64 bits) is one int64 table, copied host-to-device once per call (the values
    are new tensors every step, so unlike launcher.py's table it is not cached).
Torch ops per call: a cat, a small host-to-device copy, repeat_interleave (with
output_size: no sync), an index-add and a sort; then the kernel.

Bytes per touched element (fp32): each entry's value read once (4 B per entry), then
SparseAdam reads param, exp_avg, exp_avg_sq (12 B) and writes them (12 B); Adagrad 8 +
8 B; SGD 4 + 4 B. Per program: two keys, perm, tensor_of and the table row (a few
8-byte loads). Half that for fp16 / bf16, double for fp64. No speed is measured (no GPU
was available, see README.md); BLOCK (the row block, at most 1024) and num_warps are
untuned guesses. A narrow embedding (row length 16-128) leaves most of a program's
lanes idle: several rows per program would be the first thing to try on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import math as _math
from .launcher import _TL_DTYPE, _opmath

__all__ = ["sparse_step"]

MAX_BLOCK = 1024     # elements of a row per program (a power of two)
_MAX_GRID_Y = 65535  # CUDA's limit on grid dimension 1: blocks of one row

# Columns of the per-tensor table (int64, one row per param with entries): element
# offsets of the param and its values relative to the base pointer (a param), row
# length, the param's first row among all params' rows, its first entry among all
# entries and its number of entries, then its states' offsets and its constants
# (float64 bits).
_P_OFF: tl.constexpr = tl.constexpr(0)
_V_OFF: tl.constexpr = tl.constexpr(1)
_LEN: tl.constexpr = tl.constexpr(2)
_ROW_BASE: tl.constexpr = tl.constexpr(3)
_ENTRY_BASE: tl.constexpr = tl.constexpr(4)
_NNZ: tl.constexpr = tl.constexpr(5)
_STATES: tl.constexpr = tl.constexpr(6)


# ---------------------------------------------------------------------------------
# The kernel


@triton.jit
def _row_block(base, meta, keys, perm, nnz, k, key, entry, row_len, block_start,
               ROWS: tl.constexpr, N_STATES: tl.constexpr, N_CONSTANTS: tl.constexpr,
               COALESCE: tl.constexpr, DTYPE: tl.constexpr, OPMATH: tl.constexpr,
               MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr, ELEM_ALIGN: tl.constexpr):
    """Elements [block_start, block_start + BLOCK) of one touched row: the row whose
    first sorted entry is k (the concatenated entry `entry`), of the param described by
    `meta` (its row of the table)."""
    offs = block_start + tl.arange(0, BLOCK)
    mask = offs < row_len
    row_at = tl.multiple_of((key - tl.load(meta + _ROW_BASE)) * row_len, ELEM_ALIGN)
    values = base + tl.multiple_of(tl.load(meta + _V_OFF), ELEM_ALIGN)
    entry_base = tl.load(meta + _ENTRY_BASE)
    p_ptr = base + tl.multiple_of(tl.load(meta + _P_OFF), ELEM_ALIGN) + row_at + offs
    s_ptrs = ()
    for j in tl.static_range(N_STATES):
        s_ptrs = s_ptrs + (base + tl.multiple_of(tl.load(meta + _STATES + j), ELEM_ALIGN)
                           + row_at + offs,)
    c = ()
    for j in tl.static_range(N_CONSTANTS):
        bits = tl.load(meta + _STATES + N_STATES + j)
        c = c + (bits.to(tl.float64, bitcast=True).to(OPMATH),)
    p = tl.load(p_ptr, mask=mask).to(OPMATH)
    s = ()
    for j in tl.static_range(N_STATES):
        s = s + (tl.load(s_ptrs[j], mask=mask).to(OPMATH),)
    # The row's entries: sorted positions k, k + 1, ... while the key stays `key`.
    # v_at: where entry `entry` (a concatenated index) keeps its values.
    v_at = tl.multiple_of((entry - entry_base) * row_len, ELEM_ALIGN)
    v = tl.load(values + v_at + offs, mask=mask).to(OPMATH)
    at = k + 1
    next_key = tl.load(keys + at, mask=at < nnz, other=-1)
    if COALESCE:
        # Summed in order, each sum rounded to the storage dtype (coalesce()).
        while next_key == key:
            entry = tl.load(perm + at)
            v_at = tl.multiple_of((entry - entry_base) * row_len, ELEM_ALIGN)
            v = _math.round_to(v + tl.load(values + v_at + offs, mask=mask).to(OPMATH),
                               DTYPE)
            at += 1
            next_key = tl.load(keys + at, mask=at < nnz, other=-1)
        if MAXIMIZE:
            v = -v
        p, s = ROWS(p, v, s, c, DTYPE)
    else:
        # One update per entry, in order, on the row kept in opmath meanwhile.
        if MAXIMIZE:
            v = -v
        p, s = ROWS(p, v, s, c, DTYPE)
        while next_key == key:
            entry = tl.load(perm + at)
            v_at = tl.multiple_of((entry - entry_base) * row_len, ELEM_ALIGN)
            v = tl.load(values + v_at + offs, mask=mask).to(OPMATH)
            if MAXIMIZE:
                v = -v
            p, s = ROWS(p, v, s, c, DTYPE)
            at += 1
            next_key = tl.load(keys + at, mask=at < nnz, other=-1)
    tl.store(p_ptr, _math.to_storage(p, DTYPE), mask=mask)
    for j in tl.static_range(N_STATES):
        tl.store(s_ptrs[j], _math.to_storage(s[j], DTYPE), mask=mask)


@triton.jit(do_not_specialize=["nnz"])  # not recompiled for nnz == 1 or a multiple of 16
def _rows_kernel(
    # a param (every element address is it plus an offset) and the per-tensor table
    base, table,
    # the sorted entries: key (row + row_base) of each, the concatenated entry it is
    # (perm), the param of each concatenated entry; how many
    keys, perm, tensor_of, nnz,
    # the row math (math.py) and its shape
    ROWS: tl.constexpr, N_STATES: tl.constexpr, N_CONSTANTS: tl.constexpr,
    COALESCE: tl.constexpr,
    # meta-parameters
    DTYPE: tl.constexpr, OPMATH: tl.constexpr, MAXIMIZE: tl.constexpr,
    BLOCK: tl.constexpr, ELEM_ALIGN: tl.constexpr,
):
    k = tl.program_id(0)
    block_start = tl.program_id(1) * BLOCK
    key = tl.load(keys + k)
    # Only the first of a row's sorted entries does the row (keys are >= 0: the -1 of
    # entry 0 never matches); the others have read two keys.
    if tl.load(keys + k - 1, mask=k > 0, other=-1) != key:
        entry = tl.load(perm + k)
        meta = table + tl.load(tensor_of + entry) * (_STATES + N_STATES + N_CONSTANTS)
        row_len = tl.multiple_of(tl.load(meta + _LEN), ELEM_ALIGN)
        if block_start < row_len:
            _row_block(base, meta, keys, perm, nnz, k, key, entry, row_len, block_start,
                       ROWS, N_STATES, N_CONSTANTS, COALESCE, DTYPE, OPMATH, MAXIMIZE,
                       BLOCK, ELEM_ALIGN)


# ---------------------------------------------------------------------------------
# The launcher


def _shape_of(math: str) -> tuple[_math.RowShape, object]:
    try:
        return getattr(_math, f"{math}_rows_shape"), getattr(_math, f"{math}_rows")
    except AttributeError:
        raise NotImplementedError(
            f"fused_optim_triton: no Triton row math {math!r} in "
            f"fused_optim.triton_kernels.math (<math>_rows, <math>_rows_shape)") from None


def _check(math: str, shape: _math.RowShape, params, rows, values, states,
           constants: torch.Tensor) -> None:
    """The call's shapes, dtypes and devices, as csrc/sparse_rows.cpp checks them (from
    metadata: no index is read)."""
    op = "fused_optim_triton sparse_step"
    n = len(params)
    if len(rows) != n or len(values) != n:
        raise RuntimeError(f"{op}: expected one rows and one values tensor per param ({n}), "
                           f"got {len(rows)} and {len(values)}")
    if len(states) != n * shape.states:
        raise RuntimeError(f"{op}: the row math {math!r} keeps {shape.states} states per "
                           f"param: expected {n * shape.states} state tensors, got "
                           f"{len(states)}")
    if (constants.device.type != "cpu" or constants.dtype != torch.float64
            or tuple(constants.shape) != (n, shape.constants)):
        raise RuntimeError(f"{op}: constants must be a float64 CPU tensor of shape "
                           f"[{n}, {shape.constants}], got {constants.dtype} "
                           f"{list(constants.shape)} on {constants.device}")
    if n == 0:
        return
    dtype, device = params[0].dtype, params[0].device
    if dtype not in _TL_DTYPE:
        raise RuntimeError(f"{op}: dtype {dtype} is not supported")
    for t, (p, r, v) in enumerate(zip(params, rows, values)):
        if p.dim() != 2 or not p.is_contiguous() or p.dtype != dtype or p.device != device:
            raise RuntimeError(f"{op}: params[{t}] must be a contiguous 2-D {dtype} tensor on "
                               f"{device}, got {p.dtype} {list(p.shape)} on {p.device}")
        if r.dim() != 1 or r.dtype != torch.int64 or r.device != device:
            raise RuntimeError(f"{op}: rows[{t}] must be a 1-D int64 tensor on {device}, "
                               f"got {r.dtype} {list(r.shape)} on {r.device}")
        if (v.dtype != dtype or v.device != device or not v.is_contiguous()
                or tuple(v.shape) != (r.shape[0], p.shape[1])):
            raise RuntimeError(f"{op}: values[{t}] must be a contiguous {dtype} tensor of "
                               f"shape [{r.shape[0]}, {p.shape[1]}] on {device}, got "
                               f"{v.dtype} {list(v.shape)} on {v.device}")
        for j in range(shape.states):
            s = states[j * n + t]
            if (s.dtype != dtype or s.device != device or s.shape != p.shape
                    or not s.is_contiguous()):
                raise RuntimeError(f"{op}: states[{j * n + t}] must be a contiguous {dtype} "
                                   f"tensor shaped like params[{t}] {list(p.shape)}, got "
                                   f"{s.dtype} {list(s.shape)} on {s.device}")


def _block_for(row_len: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of at most `row_len` elements: the row in one block
    up to MAX_BLOCK; about 8 elements per thread (untuned)."""
    block = min(MAX_BLOCK, triton.next_power_of_2(max(row_len, 1)))
    return block, max(1, min(4, block // 256))


def sparse_step(math: str, params: list[torch.Tensor], rows: list[torch.Tensor],
                values: list[torch.Tensor], states: list[torch.Tensor],
                constants: torch.Tensor, *, maximize: bool) -> None:
    """One step of the row math `math` over a bucket's params with sparse grads (the
    contract of fused_optim/_sparse.py; see this module's docstring). Mutates params and
    states; a param without entries (or with empty rows) is left as it is."""
    shape, rows_fn = _shape_of(math)
    _check(math, shape, params, rows, values, states, constants)
    n = len(params)
    active = [t for t in range(n) if rows[t].shape[0] > 0 and params[t].shape[1] > 0]
    if not active:
        return
    # The base pointer: a param with entries (never an empty tensor, whose data_ptr may
    # be null).
    base = params[active[0]]
    device, dtype = base.device, base.dtype
    elem = base.element_size()
    # The table, host side: element offsets relative to the base (see launcher.py's
    # [note: the resident table] for why addresses are offsets from a typed pointer).
    table = []
    row_base = entry_base = 0
    addresses = []
    const_bits = constants.contiguous().view(torch.int64).tolist()  # exact float64 bits
    for t in active:
        p, v = params[t], values[t]
        ptrs = [p.data_ptr(), v.data_ptr(), *(states[j * n + t].data_ptr()
                                              for j in range(shape.states))]
        addresses += ptrs
        offsets = [a - base.data_ptr() for a in ptrs]
        if any(o % elem for o in offsets):
            raise RuntimeError("fused_optim_triton sparse_step: tensor addresses are not "
                               f"multiples of the element size ({elem} B) apart")
        offsets = [o // elem for o in offsets]
        table.append([offsets[0], offsets[1], p.shape[1], row_base, entry_base,
                      rows[t].shape[0], *offsets[2:], *const_bits[t]])
        row_base += p.shape[0]
        entry_base += rows[t].shape[0]
    total = entry_base
    widest = max(params[t].shape[1] for t in active)
    block, num_warps = _block_for(widest)
    n_blocks = triton.cdiv(widest, block)
    if n_blocks > _MAX_GRID_Y:
        raise RuntimeError(f"fused_optim_triton sparse_step: rows of {widest} elements are "
                           f"wider than the kernel's grid allows ({_MAX_GRID_Y * block})")
    # Row starts are 16-byte aligned when every address is and every row length is a
    # multiple of 16 bytes: the kernel then hints it (vectorized accesses on a GPU).
    align = 16 // elem
    aligned = (all(a % 16 == 0 for a in addresses)
               and all(params[t].shape[1] % align == 0 for t in active))
    meta = torch.tensor(table, dtype=torch.int64).to(device, non_blocking=True)
    # Sort keys: each row index plus its param's row_base (unique across params).
    keys = torch.cat([rows[t] for t in active]) if len(active) > 1 else rows[active[0]]
    tensor_of = torch.repeat_interleave(torch.arange(len(active), device=device),
                                        meta[:, _NNZ.value], output_size=total)
    first_row = meta[:, _ROW_BASE.value][tensor_of] if len(active) > 1 else 0
    if len(active) > 1:
        keys = keys + first_row
    # Every index in range, or an error before anything is written: the step's one host
    # sync (a bool), the price of never writing out of bounds.
    n_rows = torch.tensor([params[t].shape[0] for t in active], dtype=torch.int64)
    n_rows = n_rows.to(device, non_blocking=True)[tensor_of]
    if bool(((keys < first_row) | (keys >= first_row + n_rows)).any()):
        raise RuntimeError("fused_optim_triton sparse_step: a grad has a row index out of "
                           "range for its param")
    keys, perm = keys.sort(stable=True)
    _rows_kernel[(total, n_blocks)](
        base, meta, keys, perm, tensor_of, total,
        ROWS=rows_fn, N_STATES=shape.states, N_CONSTANTS=shape.constants,
        COALESCE=shape.coalesce, DTYPE=_TL_DTYPE[dtype], OPMATH=_opmath(dtype),
        MAXIMIZE=bool(maximize), BLOCK=block, ELEM_ALIGN=align if aligned else 1,
        num_warps=num_warps, enable_fp_fusion=False,
    )
    # The kernel wrote through raw addresses: tell autograd, as torch's in-place ops and
    # the C++ engine do (a view's bump reaches its base).
    torch.autograd.graph.increment_version(
        [params[t] for t in active] + [states[j * n + t] for j in range(shape.states)
                                       for t in active])
