"""The named optimizers (public names and defaults are part of optlab's contract)."""

from optlab.optimizers._named import (
    adadelta,
    adagrad,
    adam,
    adamw,
    adaptive_gains,
    classical_momentum,
    nesterov_momentum,
    rmsprop,
    rprop,
    sgd,
)
from optlab.optimizers._lbfgs import LbfgsState, lbfgs
from optlab.optimizers._swats import SwatsState, scale_by_swats, swats, swats_status

__all__ = [
    "LbfgsState",
    "lbfgs",
    "SwatsState",
    "adadelta",
    "adagrad",
    "adam",
    "adamw",
    "adaptive_gains",
    "classical_momentum",
    "nesterov_momentum",
    "rmsprop",
    "rprop",
    "scale_by_swats",
    "sgd",
    "swats",
    "swats_status",
]
