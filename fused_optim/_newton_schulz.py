"""The batched Newton-Schulz engine: orthogonalizes many same-shape matrices at once.

Muon (fused_optim/muon.py) replaces each 2-D update by an approximation of U V^T (U S V^T
its SVD), computed as torch.optim.Muon computes it (torch/optim/_muon.py,
``_zeropower_via_newtonschulz``) but for a whole batch of same-shape matrices:

  X <- bf16(G), viewed transposed when G has more rows than columns (so X is wide)
  X <- X / max(||X||_F, eps)                       (per matrix)
  k times:  A <- X X^T ;  B <- b A + c A A ;  X <- a X + B X

one ``torch.bmm`` / ``torch.baddbmm`` per product on a [batch, rows, cols] bf16 tensor,
instead of one ``mm`` / ``addmm`` per param. Each matrix of the batch gets exactly the
bits torch's per-matrix code gives it on the CPU (ATen's bf16 bmm runs each matrix
through the same gemm as mm, with the same transposition flags; tests/test_muon.py
checks it on every shape it steps), so Muon's fp64 parity with torch is exact.

Work per matrix of m x n (m <= n after the transpose), per iteration: 2m^2n (X X^T) +
2m^3 (A A) + 2m^2n (B X) flops in bf16; the element-wise prologue (cast, norm,
divide) is memory-bound and small beside it. Peak extra memory per batch: about four
bf16 copies of the batch (X, A, B and the next X), so a batch is cut into chunks of at
most ``MAX_BATCH_ELEMENTS`` matrix elements.

Every backend runs this engine: it is torch ops on the params' device (CPU BLAS,
cuBLAS), with no host sync.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["MAX_BATCH_ELEMENTS", "check_arguments", "newton_schulz_", "chunks"]

# The most matrix elements one batched run holds (2^25 bf16 elements: 64 MiB, ~256 MiB
# with the iteration's temporaries). 24 params of 1024 x 1024 (24M elements) run as one
# batch; a larger set of equal shapes runs in several, each with the same bits.
MAX_BATCH_ELEMENTS = 1 << 25


def check_arguments(coefficients: Sequence[float], steps: int) -> None:
    """torch.optim.Muon's checks of the iteration's arguments, at the step, with its
    messages and in its order (the 2-D check of each grad comes from the caller)."""
    if steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if len(coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")


def chunks(n_matrices: int, numel: int) -> list[tuple[int, int]]:
    """[start, stop) ranges cutting a batch of `n_matrices` matrices of `numel` elements
    into runs of at most MAX_BATCH_ELEMENTS elements (at least one matrix each)."""
    per_run = max(1, MAX_BATCH_ELEMENTS // max(1, numel))
    return [(i, min(i + per_run, n_matrices)) for i in range(0, n_matrices, per_run)]


def newton_schulz_(x: Tensor, coefficients: Sequence[float], steps: int, eps: float) -> Tensor:
    """Orthogonalizes each matrix of `x` ([batch, m, n], bf16; the caller's copy of the
    updates, normalized in place) and returns the result, [batch, m, n] bf16 (a
    transposed view when m > n, as torch's result is)."""
    a, b, c = coefficients
    tall = x.size(-2) > x.size(-1)
    y = x.mT if tall else x
    # torch: ortho_grad.div_(ortho_grad.norm().clamp(min=eps)), norm in bf16.
    y.div_(torch.linalg.vector_norm(y, dim=(-2, -1), keepdim=True).clamp(min=eps))
    for _ in range(steps):
        gram = torch.bmm(y, y.mT)
        gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        y = torch.baddbmm(y, gram_update, y, beta=a)
    return y.mT if tall else y
