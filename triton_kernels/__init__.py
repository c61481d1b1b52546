"""Triton kernels of fused_optim, shipped as the subpackage ``fused_optim.triton_kernels``.

    math.py      the element-wise math, one @triton.jit function per algorithm
    launcher.py  the multi-tensor engine: a resident pointer table, one launch per bucket
    sparse.py    the row-sparse engine (sparse grads, nn.Embedding(sparse=True)): one
                 launch per bucket
    ops.py       torch.library.triton_op registrations (torch.ops.fused_optim_triton.*)

Importing this package imports nothing from Triton; importing its modules needs triton.
Use the backend through fused_optim (backend="triton"); see README.md here.
"""
