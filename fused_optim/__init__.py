"""fused_optim: torch.optim drop-ins with one fused kernel call per (device, dtype) bucket.

    from fused_optim import AdamW   # also Adam, SGD, Adagrad, RMSprop, Adadelta, Adamax,
                                    # NAdam, RAdam, ASGD, Rprop, SparseAdam, Adafactor,
                                    # LBFGS, Muon
    opt = AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)

Backends: "cpu" (C++ SIMD), "cuda" (CUDA C++), "triton", "reference" (plain torch);
see fused_optim.backends.
"""

from fused_optim import _extension  # noqa: F401  (loads _C)
from fused_optim.adadelta import Adadelta
from fused_optim.adafactor import Adafactor
from fused_optim.adagrad import Adagrad
from fused_optim.adam import Adam, AdamW
from fused_optim.adamax import Adamax
from fused_optim.asgd import ASGD
from fused_optim.backends import available_backends
from fused_optim.lbfgs import LBFGS
from fused_optim.muon import Muon
from fused_optim.nadam import NAdam
from fused_optim.optimizer import FusedOptimizer
from fused_optim.radam import RAdam
from fused_optim.rmsprop import RMSprop
from fused_optim.rprop import Rprop
from fused_optim.sgd import SGD
from fused_optim.sparse_adam import SparseAdam

__version__ = "0.1.0"

__all__ = ["ASGD", "Adadelta", "Adafactor", "Adagrad", "Adam", "AdamW", "Adamax", "LBFGS",
           "Muon", "NAdam", "RAdam", "RMSprop",
           "Rprop", "SGD", "SparseAdam", "FusedOptimizer", "available_backends", "__version__"]
