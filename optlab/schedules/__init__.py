"""Learning-rate schedules as data: jit-safe, vmappable pytrees matched to PyTorch.

Step convention: a schedule maps optlab's step counter ``t`` (0-based, the
number of optimizer updates already applied) to a value; the first update
uses ``schedule(0)``. In PyTorch terms ``schedule(t)`` is
``optimizer.param_groups[0]['lr']`` after ``t`` calls of
``scheduler.step()``. For PyTorch code that steps its scheduler once per
epoch, wrap the schedule in ``per_epoch(schedule, steps_per_epoch)``, which
evaluates ``schedule(t // steps_per_epoch)``.

Every factory returns a `Schedule` (``one_cycle`` returns a `OneCycle` pair
of them): a callable pytree whose numeric parameters are float32 leaves
(float64 in JAX's 64-bit mode), so
schedules can sit in an optimizer state, be built inside ``jax.vmap`` and be
replaced without recompiling. See `optlab.schedules._schedules` for the
table of PyTorch equivalents and the numerical notes.
"""

from optlab.schedules._core import Schedule
from optlab.schedules._schedules import (
    OneCycle,
    constant,
    cosine,
    cosine_warm_restarts,
    cyclic,
    cyclic_momentum,
    exp_decay,
    exponential,
    halving,
    inverse_time,
    join,
    lambda_lr,
    linear,
    linear_warmup,
    multistep,
    one_cycle,
    per_epoch,
    piecewise_constant,
    polynomial,
    staircase_exponential,
    step_decay,
)

__all__ = [
    "Schedule",
    "OneCycle",
    "constant",
    "step_decay",
    "multistep",
    "exponential",
    "exp_decay",
    "staircase_exponential",
    "halving",
    "inverse_time",
    "cosine",
    "cosine_warm_restarts",
    "linear",
    "linear_warmup",
    "polynomial",
    "piecewise_constant",
    "cyclic",
    "cyclic_momentum",
    "one_cycle",
    "join",
    "lambda_lr",
    "per_epoch",
]
