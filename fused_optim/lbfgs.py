"""LBFGS: a drop-in for torch.optim.LBFGS whose two-loop recursion runs on inner products.

torch.optim.LBFGS walks its history one vector at a time: per stored pair and iteration a
dot product and an ``add_(alpha=al[i])`` in each of its two loops, whose tensor alpha is
read on the host (two host syncs per pair per iteration); each pair's two vectors are read
twice, and its working vector (q, then r) read twice and written once per pair in each
loop. The recursion is linear in the history, so its scalars follow from inner products
of the stored vectors (Byrd, Nocedal & Schnabel's compact form, here solving for
torch's own al and be):

  * the history lives in ONE row-major buffer ``[1 + 2 * slots, n]``: row 0 the flat
    grad g of the current direction, then one (y, s) row pair per slot (a ring with one
    spare slot, into which each iteration's candidate pair is written before
    ``ys > 1e-10`` decides whether it is kept);
  * ONE matrix-vector product of the rows with g gives y_k . g and s_k . g; the new
    pair's entries of the Gram matrices S^T Y and Y^T Y follow without another pass:
    s_k . y = s_k . g - s_k . g_prev, y_k . y likewise, s . y_k = t (y_k . d) from the
    combination that made d; y . s and y . y are torch's own dots;
  * torch's al and be are two unit-triangular solves on the m x m Gram matrices, on the
    params' device: no host sync;
  * the direction is ONE matrix-vector product of the rows with the coefficients:
    d = -H g - sum_i H al_i y_i + sum_i (al_i - be_i) s_i.

So an iteration streams the history twice, as torch's two loops do, but without
torch's 6 m n reads and writes of its working vector, and the only host reads left are
the decisions of torch's algorithm: each loss, the convergence tests, ``ys > 1e-10``, the first step size and the
line search's comparisons (tests/test_lbfgs.py counts them). The products are
matrix-vector products on purpose: MKL's sgemm of [rows, 4M] by [4M, 3] ran at 1/8 of
the speed of one sgemv over the same rows on the 2-core dev machine (a tall-K shape it
packs), so three columns in one GEMM cost more than three passes. On the CPU (float32,
float64) each of the two passes is one C++ op that also does the element-wise work
around it (the candidate pair, prev_flat_grad, g . d, max |d|): [note: LBFGS row passes
on the CPU].

What that buys depends on where torch's working vector lives. Where it stays in the
last-level cache (fp32 n = 4M is 16 MB; the dev machine's L3 is 32 MB) torch's DRAM
traffic is the history's two streams, as ours, and the step costs about the same;
where it does not (larger n, fp64, a cache shared with other work) torch streams it
6 m times an iteration more, and on a GPU torch also waits on 2 m host syncs an
iteration. bench/lbfgs_quadratic.py measures it; README.md gives the numbers.

[note: LBFGS numbers] The recursion is the same algebra in another order: torch forms
q = -g - sum_{j>i} al_j y_j element by element and then dots s_i with it; here
s_i . q = -(s_i . g) - sum_{j>i} al_j (s_i . y_j) comes from the Gram matrices. The two
round differently: fp64 agrees with torch to ~1e-12 where the trajectory does not
amplify rounding (tests/test_lbfgs.py holds it to 1e-10); in fp32 one direction is
within ~1-20x of torch's own fp32 rounding error (the Gram form cancels where a
direction is nearly conjugate to a stored step, as on a quadratic with an exact line
search), measured 1e-7..2e-4 relative to torch's fp32 params over 4 steps of 5
iterations. Everything else (the gather, the step, the line search and its cubic
interpolation, every comparison and its operand types, the state keys and what each
holds) is torch's, op for op, except that a tensor step size (torch's first step, a
tensor lr) scales the update on the device (``addcmul_``, two roundings) where torch
reads it on the host (``add_(alpha=)``, one fused rounding).

The state keeps torch's keys and types: ``old_dirs`` / ``old_stps`` are lists of the
stored vectors (views of the buffer's rows, oldest first), ``ro`` and ``al`` lists of
0-dim tensors, so a state_dict loads both ways; a state loaded from elsewhere (or lists
that are not the ones the last step left) is copied into a fresh buffer at the next
step. As with torch.optim (whose ``prev_flat_grad`` is updated in place), a state_dict
refers to the live state: copy it to keep a snapshot across steps, since the ring reuses
the rows of evicted pairs. Memory: on the CPU the buffer takes the address space of the
whole ring at the first step, backed only where rows are written ([note: LBFGS buffer
on the CPU]); elsewhere it is sized at the start of a step for the pairs that step can
add (min(history_size + 1, stored + max_iter + 1) slots), so a step that stops early
holds more than torch's lists would.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from fused_optim.optimizer import check_lr

# ---------------------------------------------------------------------------------------
# The history buffer and the recursion



# [note: row products in column blocks]
# The two passes of an iteration are a [rows, n] matrix times a vector and a vector times
# it. torch.mv runs them on one thread on the CPU (MKL's gemv: 20-22 GB/s here, with 1 or
# 2 threads); cut into column blocks, as a batch of products (torch.bmm runs the batch
# on every thread), the same bytes stream at 43-49 GB/s (2-core EPYC VM, 21 rows of 4M
# fp32). Each product then sums its blocks' partial products: another order of the same
# sums, within the tolerances tests/test_lbfgs.py states. Blocks of at least
# _MIN_BLOCK elements; other devices keep torch.mv.
_MIN_BLOCK = 1 << 16


def _blocks(rows: Tensor) -> int:
    if rows.device.type != "cpu":
        return 1
    return max(1, min(2 * torch.get_num_threads(), rows.shape[1] // _MIN_BLOCK))


def rows_times(rows: Tensor, v: Tensor) -> Tensor:
    """rows @ v ([r, n] @ [n] -> [r]); see [note: row products in column blocks]."""
    k = _blocks(rows)
    r, n = rows.shape
    if k == 1 or r == 0:
        return torch.mv(rows, v)
    b = n // k
    head = torch.bmm(v[: k * b].view(k, 1, b), rows[:, : k * b].view(r, k, b).permute(1, 2, 0))
    out = head.sum(0).view(r)
    if k * b < n:
        out += torch.mv(rows[:, k * b:], v[k * b:])
    return out


def times_rows(coef: Tensor, rows: Tensor) -> Tensor:
    """coef @ rows ([r] @ [r, n] -> [n]); see [note: row products in column blocks]."""
    k = _blocks(rows)
    r, n = rows.shape
    if k == 1 or r == 0:
        return torch.mv(rows.t(), coef)
    b = n // k
    out = torch.empty(n, dtype=torch.result_type(coef, rows), device=rows.device)
    torch.bmm(coef.view(1, 1, r).expand(k, 1, r), rows[:, : k * b].view(r, k, b).permute(1, 0, 2),
              out=out[: k * b].view(k, 1, b))
    if k * b < n:
        torch.mv(rows[:, k * b:].t(), coef, out=out[k * b:])
    return out

# [note: LBFGS row passes on the CPU]
# On the CPU, float32 and float64, the two passes are the C++ ops of csrc/lbfgs.cpp
# (kernels: csrc/cpu/lbfgs_impl.h), each ONE pass over the rows that also does the
# element-wise work around it: lbfgs_products_ writes the candidate pair (torch's
# y = g - g_prev and s = d * t), sets prev_flat_grad = g (torch's copy_, which comes later
# in the iteration and reads nothing changed since) and returns the rows' dots with g and
# the pair's y . s, y . y; lbfgs_direction returns d and g . d, max |d| (the step's gtd
# and its tolerance_change test), from the registers. An iteration then moves
# 4 (2 R + 13) bytes per element instead of 4 (2 R + 20) (R history rows, fp32; see
# csrc/cpu/lbfgs_impl.h), and no float64 product goes through MKL's tall-K paths.
# Elsewhere (other devices, half types, no compiled _C) the torch ops above do it.


def _row_ops_for(like: Tensor) -> bool:
    if like.device.type != "cpu" or like.dtype not in (torch.float32, torch.float64):
        return False
    from fused_optim import _extension

    return _extension.C is not None and hasattr(torch.ops.fused_optim, "lbfgs_direction")


def _register_fake() -> None:
    from fused_optim import _extension

    if _extension.C is None or not hasattr(torch.ops.fused_optim, "lbfgs_direction"):
        return

    @torch.library.register_fake("fused_optim::lbfgs_products_")
    def _products_fake(buf, prev, d, t, slot, rows):
        torch._check(buf.dim() == 2 and 0 <= rows < buf.shape[0] and 2 * slot + 2 <= rows,
                     lambda: "fused_optim::lbfgs_products_: rows / slot out of range")
        return buf.new_empty(rows + 2)

    @torch.library.register_fake("fused_optim::lbfgs_direction")
    def _direction_fake(rows, coef):
        torch._check(rows.dim() == 2 and coef.shape == (rows.shape[0],),
                     lambda: "fused_optim::lbfgs_direction: expected one coefficient per row")
        return rows.new_empty(rows.shape[1]), rows.new_empty(2)


_register_fake()


def _as_step_tensor(t) -> Tensor:
    """t for lbfgs_products_: a one-element float tensor, read by the op in C++."""
    if isinstance(t, Tensor) and t.dtype in (torch.float32, torch.float64) and t.device.type == "cpu":
        return t
    if isinstance(t, Tensor):
        return t.to(device="cpu", dtype=torch.float64)
    return torch.tensor(t, dtype=torch.float64)


class _History:
    """The L-BFGS memory of one optimizer: one row buffer and the small Gram matrices.

    Row 0 of ``buf`` holds the flat grad g of the current direction; slot k holds y in row
    1 + 2k and s in row 2 + 2k. ``order`` lists the stored slots oldest first (torch's
    list order), ``free`` the others (one spare once the history is full: the candidate
    pair of an iteration is written into a free slot before ``ys > 1e-10`` decides whether
    it is kept). Per slot, in the flat dtype: ``sy[k, l] = s_k . y_l``,
    ``yy[k, l] = y_k . y_l``, ``ro[k] = 1 / (y_k . s_k)``, and ``yg[k] = y_k . g``,
    ``sg[k] = s_k . g`` at the g of the last direction.
    """

    def __init__(self, like: Tensor, history_size: int) -> None:
        self.history_size = history_size
        self.n = like.numel()
        self.dtype, self.device = like.dtype, like.device
        self.order: list[int] = []
        self.free: list[int] = []
        self.used = 0  # slots [0, used) have been written
        self.capacity = 0
        self.buf: Tensor | None = None
        self._order_index: Tensor | None = None
        # The last direction as a combination of the rows: (coefficient of g, of each
        # slot's y, of each slot's s) and the tensor it made.
        self.d_coef: tuple[Tensor, Tensor, Tensor] | None = None
        self.d_ref: Tensor | None = None
        # (g . d, max |d|) of d_ref, where lbfgs_direction made it
        self.d_stats: Tensor | None = None
        self.row_ops = _row_ops_for(like)

    # -- storage ---------------------------------------------------------------------

    def reserve(self, slots: int) -> None:
        """Room for `slots` slots (at most history_size + 1, at least one free slot
        beyond those written): one allocation and copy, at the start of a step that
        may need it, so a step never grows its buffer twice. On the CPU the first
        allocation takes the whole ring: [note: LBFGS buffer on the CPU]."""
        # One slot beyond those written unless one is free: a full ring (history_size
        # pairs and its spare) needs no more, however many steps follow.
        slots = max(min(slots, self.history_size + 1), self.used + (0 if self.free else 1))
        if slots <= self.capacity:
            return
        full = self.history_size + 1
        if self.device.type == "cpu" and slots < full and 2 * full * full <= self.n:
            try:
                self._allocate(full)
                return
            except RuntimeError:  # more address space than the system grants: by steps
                pass
        self._allocate(slots)

    # [note: LBFGS buffer on the CPU]
    # torch.empty on the CPU takes address space, not memory: a page is backed when it is
    # first written. So on the CPU the buffer is allocated once for the full ring
    # (history_size + 1 slots) and holds, resident, only the rows written so far, as
    # torch's lists would; grown step by step, it copied every stored row at each of the
    # first history_size / max_iter steps (4M fp32, history 100: 0.6-2.6 GB a step, onto
    # fresh pages). Where the system will not grant that much address space (a strict
    # overcommit policy) it grows step by step, as it does where the ring's Gram matrices
    # (2 (history_size + 1)^2 elements, zero-filled, so backed) are not small beside one
    # row, and on other devices: a caching allocator (CUDA) backs what it allocates.
    def _allocate(self, slots: int) -> None:
        old = (self.buf, self.sy, self.yy, self.ro, self.yg, self.sg) if self.buf is not None else None
        u = self.used
        new = lambda *shape: torch.zeros(shape, dtype=self.dtype, device=self.device)
        # empty, not zeros (a fill pass over the whole buffer): the products and the
        # direction read only the rows of written slots, and reject() zeroes a slot
        # left free with a candidate in it
        self.buf = torch.empty((1 + 2 * slots, self.n), dtype=self.dtype, device=self.device)
        self.sy, self.yy = new(slots, slots), new(slots, slots)
        self.ro, self.yg, self.sg = new(slots), new(slots), new(slots)
        if old is not None:
            self.buf[: 1 + 2 * u].copy_(old[0][: 1 + 2 * u])
            self.sy[:u, :u].copy_(old[1][:u, :u])
            self.yy[:u, :u].copy_(old[2][:u, :u])
            for dst, src in zip((self.ro, self.yg, self.sg), old[3:]):
                dst[:u].copy_(src[:u])
            if self.d_coef is not None:
                v_g, cy, cs = self.d_coef
                self.d_coef = (v_g, torch.cat([cy, new(slots - cy.numel())]),
                               torch.cat([cs, new(slots - cs.numel())]))
        self.capacity = slots

    @property
    def grad_row(self) -> Tensor:
        return self.buf[0]

    def y(self, slot: int) -> Tensor:
        return self.buf[1 + 2 * slot]

    def s(self, slot: int) -> Tensor:
        return self.buf[2 + 2 * slot]

    def order_index(self) -> Tensor:
        if self._order_index is None:
            self._order_index = torch.tensor(self.order, dtype=torch.long, device=self.device)
        return self._order_index

    def _rows(self) -> Tensor:
        """The rows of every written slot (y0, s0, y1, s1, ...)."""
        return self.buf[1: 1 + 2 * self.used]

    # -- the iteration ---------------------------------------------------------------

    def _free_slot(self) -> int:
        """The slot this iteration's candidate pair goes to: the first free one, else a
        new one (growing the buffer if it is full)."""
        if not self.free:
            if self.used == self.capacity:
                self.reserve(self.used + 1)
            self.free.append(self.used)
            self.used += 1
        return self.free[0]

    def candidate(self, prev_flat_grad: Tensor, d: Tensor, t) -> tuple[int, Tensor, Tensor]:
        """Writes this iteration's pair y = g - g_prev, s = d * t (torch's ops) into a
        free slot; returns (slot, y . s, y . y) (torch's dots)."""
        slot = self._free_slot()
        y, s = self.y(slot), self.s(slot)
        torch.sub(self.grad_row, prev_flat_grad, out=y)
        torch.mul(d, t, out=s)
        return slot, y.dot(s), y.dot(y)

    def fused_candidate(self, prev_flat_grad: Tensor, d: Tensor, t):
        """candidate() and products() in ONE pass (lbfgs_products_), which also sets
        prev_flat_grad = g; returns (slot, y . s, y . y, py, ps), or None where the op
        does not apply (see [note: LBFGS row passes on the CPU])."""
        if not (self.row_ops and prev_flat_grad.dtype == self.dtype and d.dtype == self.dtype
                and prev_flat_grad.is_contiguous() and d.is_contiguous()
                and prev_flat_grad.numel() == self.n and d.numel() == self.n
                and prev_flat_grad.device == self.device and d.device == self.device):
            return None
        slot = self._free_slot()
        out = torch.ops.fused_optim.lbfgs_products_(self.buf, prev_flat_grad, d,
                                                    _as_step_tensor(t), slot, 2 * self.used)
        r = 2 * self.used
        return slot, out[r], out[r + 1], out[0:r:2], out[1:r:2]

    def products(self) -> tuple[Tensor, Tensor]:
        """(y_k . g, s_k . g) of every written slot, the candidate's included: ONE
        matrix-vector pass over the rows."""
        p = rows_times(self._rows(), self.grad_row)
        return p[0::2], p[1::2]

    def accept(self, slot: int, ys: Tensor, yy: Tensor, py: Tensor, ps: Tensor, d: Tensor,
               t) -> None:
        """Stores the candidate pair as the newest entry (the oldest one leaves when the
        history is full) and adds its inner products to the Gram matrices, without
        another pass over the history:

          s_i . y = s_i . g - s_i . g_prev,  y_i . y = y_i . g - y_i . g_prev
          s . y_i = t (y_i . d),  y_i . d from the combination that made d

        (g_prev: the g of the last direction, whose products are yg / sg)."""
        old = self.order
        if old:
            oi = self.order_index()
            self.sy[oi, slot] = ps[oi] - self.sg[oi]
            y_new = py[oi] - self.yg[oi]
            self.yy[oi, slot] = y_new
            self.yy[slot, oi] = y_new
            self.sy[slot, oi] = torch.mul(self._y_dot(d, oi), t)
        self.sy[slot, slot] = ys
        self.yy[slot, slot] = yy
        self.ro[slot] = 1.0 / ys
        self.free.remove(slot)
        self.order.append(slot)
        if len(self.order) > self.history_size:
            self.free.append(self.order.pop(0))
        self._order_index = None

    def reject(self, slot: int) -> None:
        # the slot stays free; its rows join the direction's product with coefficient
        # 0, so they must hold finite numbers
        self.buf[1 + 2 * slot: 3 + 2 * slot].zero_()

    def _y_dot(self, d: Tensor, oi: Tensor) -> Tensor:
        """y_i . d for the slots oi: from the Gram matrices when d is the last
        direction made here, else one pass over those rows."""
        if self.d_coef is not None and self.d_ref is d:
            v_g, cy, cs = self.d_coef
            full = torch.mv(self.yy, cy) + torch.mv(self.sy.t(), cs) + self.yg * v_g
            return full[oi]
        return torch.stack([self.y(k).dot(d) for k in self.order]) if len(self.order) < 3 else (
            rows_times(self.buf[1: 1 + 2 * self.used: 2], d)[oi])

    def set_products(self, py: Tensor, ps: Tensor) -> None:
        """yg / sg at the new g (after accept, which reads those at the previous g)."""
        self.yg[: self.used] = py
        self.sg[: self.used] = ps

    def first_direction(self, d: Tensor) -> None:
        """d = -g (torch's first iteration)."""
        self.d_ref, self.d_stats = d, None
        self.d_coef = None if self.capacity == 0 else (
            torch.full((), -1, dtype=self.dtype, device=self.device),
            torch.zeros(self.capacity, dtype=self.dtype, device=self.device),
            torch.zeros(self.capacity, dtype=self.dtype, device=self.device))

    def direction(self, h_diag: Tensor | int, al_list: list) -> Tensor:
        """torch's two-loop recursion at the g in row 0: returns d and puts torch's al
        values (0-dim tensors) into al_list[:m]."""
        m = len(self.order)
        dtype, device = self.dtype, self.device
        neg_h = torch.as_tensor(h_diag, dtype=dtype, device=device).neg()
        cy = torch.zeros(self.capacity, dtype=dtype, device=device)
        cs = torch.zeros(self.capacity, dtype=dtype, device=device)
        if m == 0:
            # no history: d = -g * H (H is 1, or torch's H_diag tensor)
            d = torch.mul(self.grad_row.neg(), h_diag)
            self.d_coef, self.d_ref, self.d_stats = (neg_h, cy, cs), d, None
            return d
        idx = self.order_index()
        # the m x m work in fp32 at least (the triangular solves take no half types);
        # al and the coefficients are rounded to the flat dtype, as torch's are
        small = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        yg, sg = self.yg[idx].to(small), self.sg[idx].to(small)
        sy = self.sy[idx][:, idx].to(small)  # sy[i, j] = s_i . y_j, oldest first
        yy = self.yy[idx][:, idx].to(small)
        ro = self.ro[idx].to(small)
        h_small = h_diag.to(small) if isinstance(h_diag, Tensor) else h_diag
        eye = torch.eye(m, dtype=small, device=device)
        # First loop: z_i = s_i . q_i with q_i = -g - sum_{j>i} al_j y_j, al = z * ro.
        z = torch.linalg.solve_triangular(eye + torch.triu(sy, 1) * ro, -sg[:, None],
                                          upper=True, unitriangular=True)[:, 0]
        al = (z * ro).to(dtype)
        # r_0 = H q with q = -g - sum_j al_j y_j; second loop: w_i = y_i . r_i,
        # r_i = r_0 + sum_{j<i} (al_j - be_j) s_j, be = w * ro.
        al_s = al.to(small)
        e = torch.mul(-yg - torch.mv(yy, al_s), h_small)
        lower = torch.tril(sy.t(), -1)
        w = torch.linalg.solve_triangular(eye + lower * ro, (e + torch.mv(lower, al_s))[:, None],
                                          upper=False, unitriangular=True)[:, 0]
        c = (al_s - w * ro).to(dtype)
        # d = -H g - sum H al_i y_i + sum c_i s_i: one pass over the rows.
        cy[idx] = al * neg_h
        cs[idx] = c
        coef = torch.empty(1 + 2 * self.used, dtype=dtype, device=device)
        coef[0] = neg_h
        coef[1::2] = cy[: self.used]
        coef[2::2] = cs[: self.used]
        rows = self.buf[: 1 + 2 * self.used]
        if self.row_ops:
            d, self.d_stats = torch.ops.fused_optim.lbfgs_direction(rows, coef)
        else:
            d, self.d_stats = times_rows(coef, rows), None
        self.d_coef, self.d_ref = (neg_h, cy, cs), d
        al_list[:m] = list(al.unbind())
        return d

    # -- torch's lists ---------------------------------------------------------------

    def lists(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """(old_dirs, old_stps, ro) as torch keeps them: oldest first."""
        if self.buf is None:
            return [], [], []
        return ([self.y(k) for k in self.order], [self.s(k) for k in self.order],
                [self.ro[k] for k in self.order])

    @classmethod
    def from_lists(cls, like: Tensor, history_size: int, dirs: list[Tensor],
                   stps: list[Tensor], ro: list[Tensor], prev_flat_grad: Tensor | None,
                   slots: int) -> _History:
        """A buffer holding torch's lists (a loaded state): the Gram matrices and the
        products with prev_flat_grad are computed from the vectors; ro is taken as
        stored."""
        m = len(dirs)
        hist = cls(like, max(history_size, m))
        hist.reserve(max(slots, m + 1))
        for k in range(m):
            hist.y(k).copy_(dirs[k].reshape(-1))
            hist.s(k).copy_(stps[k].reshape(-1))
            hist.ro[k] = ro[k]
        hist.used = m
        hist.order = list(range(m))
        if m:
            rows = hist._rows()
            gram = torch.mm(rows, rows.t())  # once per load; a wide product, GEMM-shaped
            hist.sy[:m, :m] = gram[1::2, 0::2]
            hist.yy[:m, :m] = gram[0::2, 0::2]
            if prev_flat_grad is not None:
                p = rows_times(rows, prev_flat_grad.reshape(-1).to(hist.dtype))
                hist.set_products(p[0::2], p[1::2])
        return hist


# ---------------------------------------------------------------------------------------
# The line search: torch.optim.lbfgs's strong Wolfe search, step for step (its comparisons
# and their operand types decide the numbers, so they are kept exactly).


def _cubic_min(x1, f1, g1, x2, f2, g2, bounds=None):
    """The minimizer of the cubic through (x1, f1, g1) and (x2, f2, g2), clipped to
    `bounds` (default: the interval between x1 and x2); its midpoint when the cubic has
    no real minimizer."""
    if bounds is None:
        lo, hi = (x1, x2) if x1 <= x2 else (x2, x1)
    else:
        lo, hi = bounds
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    disc = d1**2 - g1 * g2
    if not disc >= 0:
        return (lo + hi) / 2.0
    d2 = disc.sqrt()
    if x1 <= x2:
        x = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
    else:
        x = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
    return min(max(x, lo), hi)


class _Point:
    """A trial step of the line search: step t, loss f, flat grad g, derivative gtd."""

    __slots__ = ("f", "g", "gtd", "t")

    def __init__(self, t, f, g, gtd) -> None:
        self.t, self.f, self.g, self.gtd = t, f, g, gtd


def _strong_wolfe(evaluate, x, t, d, f, g, gtd, c1=1e-4, c2=0.9, tolerance_change=1e-9,
                  max_ls=25):
    """torch.optim.lbfgs._strong_wolfe: bracket a step satisfying the strong Wolfe
    conditions, then zoom in by cubic interpolation. Returns (f, g, t, evaluations)."""
    d_norm = torch.linalg.vector_norm(d, float("inf"))  # = d.abs().max()
    start = _Point(0, f, g.clone(memory_format=torch.contiguous_format), gtd)
    f_new, g_new = evaluate(x, t, d)
    evals = 1
    trial = _Point(t, f_new, g_new, g_new.dot(d))

    def armijo_fails(p: _Point) -> bool:
        return bool(p.f > (f + c1 * p.t * gtd))

    # Bracketing phase.
    prev = start
    bracket: list[_Point] | None = None
    done = False
    it = 0
    while it < max_ls:
        if armijo_fails(trial) or (it > 1 and trial.f >= prev.f):
            bracket = [prev, _Point(trial.t, trial.f, _own(trial.g), trial.gtd)]
            break
        if abs(trial.gtd) <= -c2 * gtd:
            bracket = [trial]
            done = True
            break
        if trial.gtd >= 0:
            bracket = [prev, _Point(trial.t, trial.f, _own(trial.g), trial.gtd)]
            break
        # extrapolate
        t_next = _cubic_min(prev.t, prev.f, prev.gtd, trial.t, trial.f, trial.gtd,
                            bounds=(trial.t + 0.01 * (trial.t - prev.t), trial.t * 10))
        prev = _Point(trial.t, trial.f, _own(trial.g), trial.gtd)
        f_new, g_new = evaluate(x, t_next, d)
        evals += 1
        trial = _Point(t_next, f_new, g_new, g_new.dot(d))
        it += 1
    if it == max_ls:
        bracket = [_Point(0, f, start.g, None), _Point(trial.t, trial.f, trial.g, None)]

    # Zoom phase.
    progress_lacking = False
    low, high = (0, 1) if bracket[0].f <= bracket[-1].f else (1, 0)
    while not done and it < max_ls:
        a, b = bracket[0].t, bracket[1].t
        if abs(b - a) * d_norm < tolerance_change:
            break
        t_new = _cubic_min(a, bracket[0].f, bracket[0].gtd, b, bracket[1].f, bracket[1].gtd)
        # keep the trial away from the bracket's ends when interpolation stalls there
        top, bottom = max(a, b), min(a, b)
        margin = 0.1 * (top - bottom)
        if min(top - t_new, t_new - bottom) < margin:
            if progress_lacking or t_new >= top or t_new <= bottom:
                t_new = top - margin if abs(t_new - top) < abs(t_new - bottom) else bottom + margin
                progress_lacking = False
            else:
                progress_lacking = True
        else:
            progress_lacking = False
        f_new, g_new = evaluate(x, t_new, d)
        evals += 1
        gtd_new = g_new.dot(d)
        it += 1
        point = _Point(t_new, f_new, _own(g_new), gtd_new)
        if f_new > (f + c1 * t_new * gtd) or f_new >= bracket[low].f:
            bracket[high] = point
            low, high = (0, 1) if bracket[0].f <= bracket[1].f else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True
            elif gtd_new * (bracket[high].t - bracket[low].t) >= 0:
                bracket[high] = bracket[low]
            bracket[low] = point
    best = bracket[low]
    return best.f, best.g, best.t, evals


def _own(g: Tensor) -> Tensor:
    return g.clone(memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------
# The optimizer


class LBFGS(Optimizer):
    r"""Implements L-BFGS, as :class:`torch.optim.LBFGS`, with the two-loop recursion as
    matrix products on the params' device.

    The arguments, defaults, validation errors, state (``func_evals``, ``n_iter``, ``d``,
    ``t``, ``old_dirs``, ``old_stps``, ``ro``, ``H_diag``, ``prev_flat_grad``,
    ``prev_loss``, ``al``, kept on the first param as torch keeps them) and the algorithm
    (``max_iter``, ``max_eval``, ``tolerance_grad``, ``tolerance_change``, ``history_size``,
    ``line_search_fn=None | "strong_wolfe"``) are torch.optim.LBFGS's, and
    ``state_dict()`` loads both ways with it. The direction of iteration k, with
    :math:`m` stored pairs :math:`(s_i, y_i)`, :math:`\rho_i = 1 / y_i^\top s_i`:

    .. math::
       \begin{aligned}
            & q_{m} = -g_k, \quad \alpha_i = \rho_i\, s_i^\top q_{i+1}, \quad
              q_i = q_{i+1} - \alpha_i y_i \qquad (i = m-1, \dots, 0)                 \\
            & r_0 = H_k q_0, \quad \beta_i = \rho_i\, y_i^\top r_i, \quad
              r_{i+1} = r_i + (\alpha_i - \beta_i) s_i, \quad d_k = r_m
       \end{aligned}

    computed from the inner products :math:`S^\top g, Y^\top g, S^\top Y, Y^\top Y` (two
    triangular solves for :math:`\alpha, \beta`) and one matrix-vector product for
    :math:`d_k`: two streams over the history per iteration and no host sync besides
    the algorithm's own decisions (see the module docstring and [note: LBFGS numbers]
    for how its numbers relate to torch's).

    .. warning::
        One param group only, all params on one device, and a closure is required, as
        with torch.optim.LBFGS. Its history buffer holds ``2 * slots + 1`` flat vectors,
        ``slots = min(history_size + 1, stored pairs + max_iter + 1)``, sized at the start
        of each step (torch's lists: 2 per stored pair), plus ``d`` and
        ``prev_flat_grad`` as torch.

    Args:
        params (iterable): parameters to optimize (real, or complex as real pairs).
        lr (float or Tensor, optional): learning rate (default: 1).
        max_iter (int, optional): iterations per ``step`` (default: 20).
        max_eval (int, optional): function evaluations per ``step`` (default:
            ``max_iter * 5 // 4``).
        tolerance_grad (float, optional): stop when ``max |g| <= tolerance_grad``
            (default: 1e-7).
        tolerance_change (float, optional): stop when the loss or the step changes by
            less (default: 1e-9).
        history_size (int, optional): stored pairs (default: 100).
        line_search_fn (str, optional): ``"strong_wolfe"`` or None (default: None).

    Example:
        >>> x = torch.nn.Parameter(torch.tensor([-1.5, 2.0]))
        >>> opt = LBFGS([x], line_search_fn="strong_wolfe")
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)

    References: Nocedal, "Updating quasi-Newton matrices with limited storage" (1980);
    Byrd, Nocedal & Schnabel, "Representations of quasi-Newton matrices and their use in
    limited memory methods" (1994), for the inner-product form.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1,
        max_iter: int = 20,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        history_size: int = 100,
        line_search_fn: str | None = None,
    ) -> None:
        check_lr(lr)
        if max_eval is None:
            max_eval = max_iter * 5 // 4
        defaults = {
            "lr": lr,
            "max_iter": max_iter,
            "max_eval": max_eval,
            "tolerance_grad": tolerance_grad,
            "tolerance_change": tolerance_change,
            "history_size": history_size,
            "line_search_fn": line_search_fn,
        }
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("LBFGS doesn't support per-parameter options (parameter groups)")
        self._params = self.param_groups[0]["params"]
        self._numel_cache = None
        self._history: _History | None = None
        self._published: tuple | None = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._params = self.param_groups[0]["params"]
        self._numel_cache = None
        self._history = None
        self._published = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._params = self.param_groups[0]["params"]
        self._history = None
        self._published = None

    # -- flat views ------------------------------------------------------------------

    def _numel(self) -> int:
        if self._numel_cache is None:
            self._numel_cache = sum(2 * p.numel() if p.is_complex() else p.numel()
                                    for p in self._params)
        return self._numel_cache

    def _gather_flat_grad(self, out: Tensor | None = None) -> Tensor:
        """The grads of all params as one flat vector (zeros for a param without grad,
        a sparse grad densified, a complex one as real pairs), as torch.optim.LBFGS
        gathers it; written into `out` when given."""
        views = []
        for p in self._params:
            g = p.grad
            if g is None:
                view = p.new_zeros(p.numel())
            elif g.is_sparse:
                view = g.to_dense().view(-1)
            else:
                view = g.view(-1)
            if view.is_complex():
                view = torch.view_as_real(view).view(-1)
            views.append(view)
        if out is not None and all(v.dtype == out.dtype for v in views):
            return torch.cat(views, 0, out=out)
        return torch.cat(views, 0)

    def _add_grad(self, step_size, update: Tensor) -> None:
        """params += step_size * update, param by param over the flat vector; a tensor
        step size is used on the device (no host read)."""
        offset = 0
        for p in self._params:
            if p.is_complex():
                p = torch.view_as_real(p)
            numel = p.numel()
            chunk = update[offset: offset + numel].view_as(p)
            if isinstance(step_size, Tensor):
                p.addcmul_(chunk, step_size.to(p.dtype))
            else:
                p.add_(chunk, alpha=step_size)
            offset += numel
        if offset != self._numel():
            raise AssertionError(f"Expected offset {offset} to equal {self._numel()}")

    def _clone_param(self) -> list[Tensor]:
        return [p.clone(memory_format=torch.contiguous_format) for p in self._params]

    def _set_param(self, params_data: list[Tensor]) -> None:
        for p, data in zip(self._params, params_data, strict=True):
            p.copy_(data)

    def _directional_evaluate(self, closure, x, t, d):
        self._add_grad(t, d)
        loss = float(closure())
        flat_grad = self._gather_flat_grad()
        self._set_param(x)
        return loss, flat_grad

    # -- the history -------------------------------------------------------------------

    def _history_for(self, state: dict[str, Any], flat: Tensor, history_size: int,
                     slots: int) -> _History:
        """The buffer holding state's lists: the one the last step left when the lists
        are still its own, else a fresh copy of them (a loaded or edited state); with
        room for `slots` slots."""
        hist = self._history
        lists = (state.get("old_dirs"), state.get("old_stps"), state.get("ro"))
        if hist is not None and self._published is not None and all(
                a is b and len(a) == len(hist.order) for a, b in zip(lists, self._published)):
            hist.history_size = max(history_size, len(hist.order))
            hist.reserve(slots)
            return hist
        dirs, stps, ro = (x if x is not None else [] for x in lists)
        hist = _History.from_lists(flat, history_size, dirs, stps, ro,
                                   state.get("prev_flat_grad"), slots)
        self._history = hist
        return hist

    def _publish(self, state: dict[str, Any], hist: _History) -> None:
        dirs, stps, ro = hist.lists()
        state["old_dirs"], state["old_stps"], state["ro"] = dirs, stps, ro
        self._published = (dirs, stps, ro)

    # -- the step ----------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure):  # type: ignore[override]
        """One call of torch.optim.LBFGS's step: up to max_iter iterations.

        Args:
            closure (Callable): reevaluates the model and returns the loss (called with
                grad enabled).
        """
        if len(self.param_groups) != 1:
            raise AssertionError(
                f"Expected exactly one param_group, but got {len(self.param_groups)}")
        closure = torch.enable_grad()(closure)

        group = self.param_groups[0]
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.dim() != 0:
            lr = lr.squeeze()
        max_iter = group["max_iter"]
        max_eval = group["max_eval"]
        tolerance_grad = group["tolerance_grad"]
        tolerance_change = group["tolerance_change"]
        line_search_fn = group["line_search_fn"]
        history_size = group["history_size"]

        # The state is global; torch keeps it on the first param.
        state = self.state[self._params[0]]
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)

        orig_loss = closure()
        loss = float(orig_loss)
        current_evals = 1
        state["func_evals"] += 1

        flat_grad = self._gather_flat_grad()
        opt_cond = _max_abs(flat_grad) <= tolerance_grad
        if opt_cond:
            return orig_loss

        d = state.get("d")
        t = state.get("t")
        h_diag = state.get("H_diag")
        prev_flat_grad = state.get("prev_flat_grad")
        prev_loss = state.get("prev_loss")
        hist: _History | None = None

        prev_set = False
        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            state["n_iter"] += 1

            # -- the direction
            if state["n_iter"] == 1:
                d = flat_grad.neg()
                hist = _History(flat_grad, history_size)
                hist.first_direction(d)
                self._history = hist
                self._published = None
                h_diag = 1
            else:
                if hist is None or hist.buf is None:
                    # a step adds at most one pair per iteration: room for them all now
                    slots = len(state.get("old_dirs") or ()) + max_iter - n_iter + 2
                    hist = self._history_for(state, flat_grad, history_size, slots)
                if flat_grad.data_ptr() != hist.grad_row.data_ptr():
                    hist.grad_row.copy_(flat_grad)
                    flat_grad = hist.grad_row
                fused = hist.fused_candidate(prev_flat_grad, d, t)
                if fused is not None:
                    slot, ys, yy, py, ps = fused
                    prev_set = True  # prev_flat_grad = g already
                else:
                    slot, ys, yy = hist.candidate(prev_flat_grad, d, t)
                    py, ps = hist.products()
                if ys > 1e-10:
                    hist.accept(slot, ys, yy, py, ps, d, t)
                    h_diag = ys / yy  # (y . s) / (y . y)
                else:
                    hist.reject(slot)
                hist.set_products(py, ps)
                if "al" not in state:
                    state["al"] = [None] * history_size
                d = hist.direction(h_diag, state["al"])

            if prev_flat_grad is None:
                prev_flat_grad = flat_grad.clone(memory_format=torch.contiguous_format)
            elif not prev_set:
                prev_flat_grad.copy_(flat_grad)
            prev_set = False
            prev_loss = loss

            # -- the step length
            if state["n_iter"] == 1:
                t = min(1.0, 1.0 / flat_grad.abs().sum()) * lr
            else:
                t = lr
            # g . d and max |d| from the pass that made d, where it did
            stats = hist.d_stats if hist is not None and hist.d_ref is d else None
            gtd = flat_grad.dot(d) if stats is None else stats[0]
            if gtd > -tolerance_change:
                break

            ls_func_evals = 0
            if line_search_fn is not None:
                if line_search_fn != "strong_wolfe":
                    raise RuntimeError("only 'strong_wolfe' is supported")
                x_init = self._clone_param()

                def evaluate(x, step, direction):
                    return self._directional_evaluate(closure, x, step, direction)

                loss, flat_grad, t, ls_func_evals = _strong_wolfe(
                    evaluate, x_init, t, d, loss, flat_grad, gtd, max_ls=max_eval - current_evals)
                self._add_grad(t, d)
                opt_cond = _max_abs(flat_grad) <= tolerance_grad
            else:
                self._add_grad(t, d)
                if n_iter != max_iter:
                    # no evaluation after the last iteration, as torch
                    loss = float(closure())
                    flat_grad = self._gather_flat_grad(
                        out=hist.grad_row if hist is not None and hist.buf is not None else None)
                    opt_cond = _max_abs(flat_grad) <= tolerance_grad
                    ls_func_evals = 1
            current_evals += ls_func_evals
            state["func_evals"] += ls_func_evals

            # -- the stopping tests
            if n_iter == max_iter or current_evals >= max_eval or opt_cond:
                break
            # max |d * t|, as |t| * max |d|: rounding is monotonic, so the same number
            d_max = _max_abs(d) if stats is None else stats[1]
            if d_max * _abs(t, d.dtype) <= tolerance_change:
                break
            if abs(loss - prev_loss) < tolerance_change:
                break

        state["d"] = d
        state["t"] = t
        if hist is not None:
            self._publish(state, hist)
        state["H_diag"] = h_diag
        state["prev_flat_grad"] = prev_flat_grad
        state["prev_loss"] = prev_loss
        return orig_loss


def _max_abs(x: Tensor) -> Tensor:
    """max |x| (NaN if any is NaN), in one read of x: torch's x.abs().max() (abs is
    exact, so max(-min x, max x) is the same number)."""
    lo, hi = torch.aminmax(x)
    return torch.maximum(hi, lo.neg())


def _abs(t, dtype: torch.dtype):
    """|t| as torch's d.mul(t) uses it: a Python number (rounded to d's dtype by the
    product, as there), or a tensor in d's dtype."""
    if isinstance(t, Tensor):
        return t.abs().to(dtype)
    return abs(t)
