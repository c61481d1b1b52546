"""The batched Newton-Schulz engine: orthogonalizes many same-shape matrices at once.

Muon (fused_optim/muon.py) replaces each 2-D update by an approximation of U V^T (U S V^T
its SVD), computed as torch.optim.Muon computes it (torch/optim/_muon.py,
``_zeropower_via_newtonschulz``) but for a whole batch of same-shape matrices:

  X <- bf16(G), viewed transposed when G has more rows than columns (so X is wide)
  X <- X / max(||X||_F, eps)                       (per matrix)
  k times:  A <- X X^T ;  B <- b A + c A A ;  X <- a X + B X

one ``torch.bmm`` / ``torch.baddbmm`` per product on a [batch, rows, cols] bf16 tensor,
instead of one ``mm`` / ``addmm`` per param. On the CPU each matrix of a batch gets
exactly the bits torch's per-matrix code gives it, so Muon's parity with torch is exact
in every dtype: from a side of 17, where ATen's bf16 bmm and mm take the same kernel
(``batch_is_exact``); smaller matrices run one by one through torch's 2-D ops.

Work per matrix of m x n (m <= n after the transpose), per iteration: 2m^2n (X X^T) +
2m^3 (A A) + 2m^2n (B X) flops in bf16; the element-wise prologue (cast, norm,
divide) is memory-bound and small beside it. Peak extra memory per batch: about four
bf16 copies of the batch (X, A, B and the next X), so a batch is cut into chunks of at
most ``MAX_BATCH_ELEMENTS`` matrix elements (``MAX_CPU_BATCH_ELEMENTS`` on the CPU).

Every backend runs this engine: it is torch ops on the params' device (CPU BLAS,
cuBLAS), with no host sync.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["MAX_BATCH_ELEMENTS", "MAX_CPU_BATCH_ELEMENTS", "MIN_BATCHED_SIDE", "batch_is_exact",
           "check_arguments", "chunks", "newton_schulz_"]

# The most matrix elements one batched run holds (2^25 bf16 elements: 64 MiB, ~256 MiB
# with the iteration's temporaries). 24 params of 1024 x 1024 (24M elements) run as one
# batch; a larger set of equal shapes runs in several, each with the same bits.
MAX_BATCH_ELEMENTS = 1 << 25

# On the CPU a batch saves the per-call cost of many small products, but one whose bf16
# working set (about four copies) leaves the caches makes every product stream it from
# DRAM: 24 params of 1024 x 1024 in one batch took 2.43 s a step, in runs of 4M elements
# 2.12 s, one by one 2.09 s (dev CPU, 32 MiB L3, 2 threads, medians of 4 interleaved
# steps; the bits are the same in every cut). In `fused-optim-bench muon` against
# torch.optim.Muon: one batch 0.84x, runs of 4M 0.97x, runs of 1M (one 1024 x 1024 at a
# time) 1.01x; 128 params of 128 x 128 stay batched in two runs of 64 (2.9x).
MAX_CPU_BATCH_ELEMENTS = 1 << 20


def check_arguments(coefficients: Sequence[float], steps: int) -> None:
    """torch.optim.Muon's checks of the iteration's arguments, at the step, with its
    messages and in its order (the 2-D check of each grad comes from the caller)."""
    if steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if len(coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")


def chunks(n_matrices: int, numel: int,
           device: torch.device | None = None) -> list[tuple[int, int]]:
    """[start, stop) ranges cutting a batch of `n_matrices` matrices of `numel` elements
    on `device` into runs of at most MAX_BATCH_ELEMENTS elements, MAX_CPU_BATCH_ELEMENTS
    on the CPU (at least one matrix each)."""
    cap = MAX_BATCH_ELEMENTS
    if device is not None and device.type == "cpu":
        cap = min(cap, MAX_CPU_BATCH_ELEMENTS)
    per_run = max(1, cap // max(1, numel))
    return [(i, min(i + per_run, n_matrices)) for i in range(0, n_matrices, per_run)]


def batch_is_exact(device: torch.device, rows: int, cols: int) -> bool:
    """Whether a batched run gives each matrix of this shape the bits torch's per-matrix
    run gives it (else the caller runs the matrices one by one, as 2-D tensors).

    On the CPU ATen picks the bf16 kernel of a product by its size, and a batch's by
    the size of the whole batch: its own loop for a bmm under 400 multiply-adds per
    matrix (mm takes the gemm), oneDNN above 4,096 multiply-adds in the batch and in an
    mm only above 4,096 in the matrix. The kernels sum in different orders, so near
    those sizes some bf16 results round the other way (measured with torch 2.13 on the
    dev CPU: 8 of 450 16 x 16 matrices differ after 7 iterations; none of 2,400 with
    both sides >= 17, nor at 1024 x 1024). The smallest product of an iteration has
    min(rows, cols)^3 multiply-adds, so from a side of 17 (4,913) both runs take the
    same kernel. On a GPU (cuBLAS) every batch is run batched."""
    return device.type != "cpu" or min(rows, cols) >= MIN_BATCHED_SIDE


# The least side of a matrix that runs batched on the CPU (see batch_is_exact).
MIN_BATCHED_SIDE = 17


def newton_schulz_(x: Tensor, coefficients: Sequence[float], steps: int, eps: float) -> Tensor:
    """Orthogonalizes each matrix of `x` ([batch, m, n], or one [m, n] matrix; bf16: the
    caller's copy of the updates, normalized in place) and returns the result, shaped as
    `x` (a transposed view when m > n, as torch's result is). A 2-D `x` runs torch's own
    2-D ops (norm, mm, addmm)."""
    a, b, c = coefficients
    tall = x.size(-2) > x.size(-1)
    y = x.mT if tall else x
    # torch: ortho_grad.div_(ortho_grad.norm().clamp(min=eps)), the norm in bf16.
    if y.dim() == 2:
        y.div_(y.norm().clamp(min=eps))
        for _ in range(steps):
            gram = y @ y.mT
            gram_update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            y = torch.addmm(y, gram_update, y, beta=a)
    else:
        y.div_(torch.linalg.vector_norm(y, dim=(-2, -1), keepdim=True).clamp(min=eps))
        for _ in range(steps):
            gram = torch.bmm(y, y.mT)
            gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            y = torch.baddbmm(y, gram_update, y, beta=a)
    return y.mT if tall else y
