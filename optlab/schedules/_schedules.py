"""Learning-rate (or any hyperparameter) schedules, matched to ``torch.optim.lr_scheduler``.

Step convention
---------------
A schedule maps optlab's step counter ``t`` to a value. ``t`` is 0-based: it
is the number of optimizer updates already applied, so the first update uses
``schedule(0)``. In PyTorch terms, ``schedule(t)`` equals
``optimizer.param_groups[0]['lr']`` after ``t`` calls of ``scheduler.step()``
(the scheduler is called once after every ``optimizer.step()``). PyTorch code
that calls ``scheduler.step()`` once per *epoch* is reproduced by
``per_epoch(schedule, steps_per_epoch)``, which evaluates
``schedule(t // steps_per_epoch)``.

Every factory returns a `Schedule`: a callable pytree whose numeric parameters
(initial value, rates, step counts, milestones, ...) are float32 leaves
(float64 with ``jax_enable_x64``, where they are evaluated in float64) and
whose formula and structural settings (a mode string, ``staircase``, the
number of milestones) are static. Schedules can therefore sit in an optimizer
state, be built inside ``jax.vmap`` (sweeping a peak learning rate), and be
swapped for another schedule of the same structure without recompiling.
Factories check concrete arguments and skip traced ones.

The formulas are closed forms in ``jnp`` (no Python control flow on values)
and accept a scalar step or an array of steps. They are arranged to keep
float32 relative precision where torch's float64 values become small (e.g.
cosine curves are written with ``sin`` of the *remaining* fraction, since
``1 + cos(x)`` near ``x = pi`` loses all its digits in float32), and they
agree with torch to about 1e-6 relative. Steps are whole numbers handled as
float32, which is exact up to ``2**24`` (16.7 million) steps; step counts
(periods, milestones, cycle lengths) should stay below that too.

PyTorch correspondence (``lr`` is the optimizer's initial lr)::

    StepLR(step_size, gamma)             step_decay(lr, step_size, gamma)
    MultiStepLR(milestones, gamma)       multistep(lr, milestones, gamma)
    ExponentialLR(gamma)                 exponential(lr, gamma)
    CosineAnnealingLR(T_max, eta_min)    cosine(lr, T_max, eta_min)
    CosineAnnealingWarmRestarts(...)     cosine_warm_restarts(lr, T_0, T_mult, eta_min)
    LinearLR(s, e, total_iters)          linear(lr * s, lr * e, total_iters)
    PolynomialLR(total_iters, power)     polynomial(lr, total_iters, power)
    CyclicLR(base_lr, max_lr, ...)       cyclic(...) and cyclic_momentum(...)
    OneCycleLR(max_lr, total_steps, ...) one_cycle(...).learning_rate / .momentum
    LambdaLR(fn)                         lambda_lr(lr, fn)
    SequentialLR(schedulers, milestones) join(schedules, milestones)

Warm-up into another schedule::

    warmup_then_cosine = join(
        [linear_warmup(0.0, 0.1, warmup_steps=500), cosine(0.1, T_max=9500)],
        boundaries=[500],
    )
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from optlab._checks import (
    check_choice,
    check_nonnegative,
    check_number,
    check_positive,
    check_range,
    concrete,
)
from optlab.schedules._core import Schedule, as_param, real_dtype

__all__ = [
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


# --------------------------------------------------------------------------
# Shared numerics


def _steps(step) -> jnp.ndarray:
    return jnp.asarray(step, dtype=real_dtype())


def _floor_div(t, d):
    """``floor(t / d)``, exact for whole-number ``t`` and ``d`` below 2**24.

    ``jnp.floor(t / d)`` can be off by one: XLA's vectorized float32 division
    is not correctly rounded (21 / 7 can come out as 2.9999998). The
    remainder is exact, so ``t - mod(t, d)`` is an exact multiple of ``d``
    and rounding its quotient is safe.
    """
    return jnp.round((t - jnp.mod(t, d)) / d)


def _cos_anneal(start, end, elapsed, remaining):
    """Half-cosine from ``start`` to ``end``; ``elapsed + remaining = 1`` (fractions of the way).

    Equals ``end + (start - end) * (1 + cos(pi * elapsed)) / 2``, written as
    ``start * cos(pi e / 2)**2 + end * sin(pi e / 2)**2`` with each squared
    trig term taken as a sine of a small, exactly computed fraction: two
    same-sign terms keep float32 relative precision near either end, where
    ``1 + cos(x)`` and ``end + (start - end) * w`` would cancel.
    """
    half_pi = 0.5 * jnp.pi
    return start * jnp.square(jnp.sin(half_pi * remaining)) + end * jnp.square(jnp.sin(half_pi * elapsed))


def _lerp(start, end, elapsed, remaining):
    """Linear from ``start`` to ``end``, as ``start * remaining + end * elapsed`` (no cancellation)."""
    return start * remaining + end * elapsed


# --------------------------------------------------------------------------
# Argument checks (concrete values only; tracers pass)


def _check_whole(name: str, value: Any, minimum: int) -> None:
    """A whole number (``3`` or ``3.0``) at least ``minimum``."""
    check_number(name, value)
    arr = concrete(value)
    if arr is None:
        return
    if arr.ndim != 0:
        raise TypeError(f"`{name}` (={value!r}) must be a scalar")
    if not float(arr).is_integer():
        raise ValueError(f"`{name}` (={arr.item()!r}) must be a whole number")
    if arr < minimum:
        raise ValueError(f"`{name}` (={arr.item()!r}) must be >= {minimum}")


def _check_increasing(name: str, value: Any) -> None:
    """A 1-D sequence of non-negative, strictly increasing step counts."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"`{name}` (={value!r}) must be a sequence of numbers")
    check_number(name, value)
    arr = concrete(value)
    if arr is None:
        return
    if arr.ndim != 1:
        raise ValueError(f"`{name}` (={value!r}) must be a 1-D sequence")
    check_nonnegative(name, value)
    if np.any(np.diff(arr) <= 0):
        raise ValueError(f"`{name}` (={arr.tolist()!r}) must be strictly increasing")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` (={value!r}) must be a bool")


def _check_schedule(name: str, value: Any) -> None:
    if not isinstance(value, Schedule):
        raise TypeError(f"`{name}` (={value!r}) must be a Schedule")


# --------------------------------------------------------------------------
# Constant and step-wise decays


def _constant_fn(step, value):
    return jnp.zeros_like(_steps(step)) + value


def constant(value) -> Schedule:
    """A constant schedule: ``value(t) = value``.

    Any number is accepted (it may schedule a hyperparameter other than a
    learning rate).

    Example:
      >>> round(float(constant(0.1)(1000)), 6)
      0.1
    """
    check_number("value", value)
    return Schedule(_constant_fn, "constant", {"value": as_param(value)})


def _step_decay_fn(step, init_value, step_size, gamma):
    return init_value * gamma ** _floor_div(_steps(step), step_size)


def step_decay(init_value, step_size, gamma=0.1) -> Schedule:
    """Multiply by ``gamma`` every ``step_size`` steps (PyTorch ``StepLR``).

    ``value(t) = init_value * gamma ** floor(t / step_size)``

    Example:
      >>> s = step_decay(0.1, step_size=30, gamma=0.1)
      >>> [round(float(s(t)), 6) for t in (0, 29, 30, 60)]
      [0.1, 0.1, 0.01, 0.001]
    """
    check_nonnegative("init_value", init_value)
    check_positive("step_size", step_size)
    check_nonnegative("gamma", gamma)
    params = {"init_value": init_value, "step_size": step_size, "gamma": gamma}
    return Schedule(_step_decay_fn, "step_decay", {k: as_param(v) for k, v in params.items()})


def _multistep_fn(step, init_value, milestones, gamma):
    t = _steps(step)
    passed = jnp.sum(t[..., None] >= milestones, axis=-1).astype(t.dtype)
    return init_value * gamma**passed


def multistep(init_value, milestones=(30, 60, 90), gamma=0.1) -> Schedule:
    """Multiply by ``gamma`` at each milestone (PyTorch ``MultiStepLR``).

    ``value(t) = init_value * gamma ** #{m in milestones : m <= t}``

    ``milestones`` must be strictly increasing; their number is part of the
    structure (a schedule with 4 milestones does not share a compiled
    function with one with 3).

    Example:
      >>> s = multistep(1.0, milestones=[10, 20], gamma=0.5)
      >>> [float(s(t)) for t in (9, 10, 19, 20)]
      [1.0, 0.5, 0.5, 0.25]
    """
    check_nonnegative("init_value", init_value)
    _check_increasing("milestones", milestones)
    check_nonnegative("gamma", gamma)
    params = {"init_value": init_value, "milestones": milestones, "gamma": gamma}
    return Schedule(_multistep_fn, "multistep", {k: as_param(v) for k, v in params.items()})


def _exponential_fn(step, init_value, gamma):
    return init_value * gamma ** _steps(step)


def exponential(init_value, gamma) -> Schedule:
    """Multiply by ``gamma`` every step (PyTorch ``ExponentialLR``).

    ``value(t) = init_value * gamma ** t``

    Example:
      >>> round(float(exponential(1.0, gamma=0.5)(3)), 6)
      0.125
    """
    check_nonnegative("init_value", init_value)
    check_nonnegative("gamma", gamma)
    return Schedule(
        _exponential_fn, "exponential", {"init_value": as_param(init_value), "gamma": as_param(gamma)}
    )


def _exp_decay_fn(step, init_value, k):
    return init_value * jnp.exp(-k * _steps(step))


def exp_decay(init_value, k) -> Schedule:
    """Continuous exponential decay: ``value(t) = init_value * exp(-k t)``.

    The same curve as ``exponential(init_value, exp(-k))``, parametrized by a
    rate.

    Example:
      >>> round(float(exp_decay(1.0, k=0.1)(10)), 6)
      0.367879
    """
    check_nonnegative("init_value", init_value)
    check_nonnegative("k", k)
    return Schedule(_exp_decay_fn, "exp_decay", {"init_value": as_param(init_value), "k": as_param(k)})


def _staircase_exponential_fn(step, init_value, decay_rate, decay_steps, staircase):
    t = _steps(step)
    exponent = _floor_div(t, decay_steps) if staircase else t / decay_steps
    return init_value * decay_rate**exponent


def staircase_exponential(init_value, decay_rate, decay_steps, staircase=False) -> Schedule:
    """Exponential decay by ``decay_rate`` per ``decay_steps`` steps (TensorFlow/optax style).

    ``value(t) = init_value * decay_rate ** (t / decay_steps)``, with the
    exponent floored when ``staircase`` is True (which is then ``StepLR``).

    Example:
      >>> s = staircase_exponential(1.0, decay_rate=0.5, decay_steps=10, staircase=True)
      >>> [float(s(t)) for t in (9, 10, 25)]
      [1.0, 0.5, 0.25]
    """
    check_nonnegative("init_value", init_value)
    check_nonnegative("decay_rate", decay_rate)
    check_positive("decay_steps", decay_steps)
    _check_bool("staircase", staircase)
    params = {"init_value": init_value, "decay_rate": decay_rate, "decay_steps": decay_steps}
    return Schedule(
        _staircase_exponential_fn,
        "staircase_exponential",
        {k: as_param(v) for k, v in params.items()},
        {"staircase": staircase},
    )


def _halving_fn(step, init_value, every):
    return init_value * 0.5 ** _floor_div(_steps(step), every)


def halving(init_value, every) -> Schedule:
    """Halve the value every ``every`` steps: ``init_value * 2 ** -floor(t / every)``.

    Example:
      >>> [float(halving(1.0, every=100)(t)) for t in (99, 100, 250)]
      [1.0, 0.5, 0.25]
    """
    check_nonnegative("init_value", init_value)
    check_positive("every", every)
    return Schedule(_halving_fn, "halving", {"init_value": as_param(init_value), "every": as_param(every)})


def _inverse_time_fn(step, init_value, k):
    return init_value / (1.0 + k * _steps(step))


def inverse_time(init_value, k) -> Schedule:
    """Inverse-time decay: ``value(t) = init_value / (1 + k t)``.

    With ``k = 1 / t0`` this is the classical Robbins-Monro ``1/t`` rate,
    shifted so that it starts at ``init_value``.

    Example:
      >>> float(inverse_time(1.0, k=0.5)(2))
      0.5
    """
    check_nonnegative("init_value", init_value)
    check_nonnegative("k", k)
    return Schedule(_inverse_time_fn, "inverse_time", {"init_value": as_param(init_value), "k": as_param(k)})


# --------------------------------------------------------------------------
# Cosine annealing


def _cosine_fn(step, init_value, T_max, eta_min):
    t = _steps(step)
    # Period 2 T_max, symmetric about T_max: fold t onto [0, T_max], where
    # both fractions are a whole number of steps over T_max.
    r = jnp.mod(t, 2.0 * T_max)
    r = jnp.minimum(r, 2.0 * T_max - r)
    return _cos_anneal(init_value, eta_min, r / T_max, (T_max - r) / T_max)


def cosine(init_value, T_max, eta_min=0.0) -> Schedule:
    """Cosine annealing (PyTorch ``CosineAnnealingLR``; Loshchilov & Hutter 2017, SGDR).

    ``value(t) = eta_min + (init_value - eta_min) * (1 + cos(pi t / T_max)) / 2``

    Torch updates the lr recursively, but its recursion tracks this closed
    form (to 1e-12 over thousands of steps), including past ``T_max``: the
    value climbs back to ``init_value`` at ``2 T_max`` and keeps oscillating
    with period ``2 T_max``. optlab does the same, to match torch (tested
    over up to 28 periods). To stay at ``eta_min`` after ``T_max``, use
    ``join([cosine(v, T), constant(eta_min)], [T])``; for restarts,
    `cosine_warm_restarts`.

    Example:
      >>> s = cosine(0.1, T_max=100)
      >>> [round(float(s(t)), 6) for t in (0, 50, 100, 200)]
      [0.1, 0.05, 0.0, 0.1]
    """
    check_nonnegative("init_value", init_value)
    check_positive("T_max", T_max)
    check_nonnegative("eta_min", eta_min)
    params = {"init_value": init_value, "T_max": T_max, "eta_min": eta_min}
    return Schedule(_cosine_fn, "cosine", {k: as_param(v) for k, v in params.items()})


def _cosine_warm_restarts_fn(step, init_value, T_0, T_mult, eta_min):
    t = jnp.maximum(_steps(step), 0.0)
    geometric = T_mult > 1.0
    # Cycle n starts at S(n) = T_0 (m**n - 1) / (m - 1) and lasts T_0 m**n.
    # n = floor(log_m(1 + t (m - 1) / T_0)) in closed form; the log can miss
    # by one exactly at a restart, so the two neighbours are checked.
    m = jnp.where(geometric, T_mult, 2.0)  # any base > 1 keeps the unused branch finite

    def start(n):
        # A whole number. XLA's vectorized float32 division is not correctly
        # rounded (21 / 7 can give 3.0000002), so round before comparing.
        return jnp.round(T_0 * (jnp.round(m**n) - 1.0) / (m - 1.0))

    n = jnp.floor(jnp.log1p(t * (m - 1.0) / T_0) / jnp.log(m))
    n = jnp.where(t < start(n), n - 1.0, n)
    n = jnp.where(t >= start(n + 1.0), n + 1.0, n)
    t_cur = jnp.where(geometric, t - start(n), jnp.mod(t, T_0))
    t_i = jnp.where(geometric, T_0 * jnp.round(m**n), T_0)
    return _cos_anneal(init_value, eta_min, t_cur / t_i, (t_i - t_cur) / t_i)


def cosine_warm_restarts(init_value, T_0, T_mult=1, eta_min=0.0) -> Schedule:
    """Cosine annealing with warm restarts (PyTorch ``CosineAnnealingWarmRestarts``).

    SGDR (Loshchilov & Hutter 2017): cycle ``i`` lasts ``T_i = T_0 * T_mult**i``
    steps; within it, with ``T_cur`` the steps since the last restart,

    ``value = eta_min + (init_value - eta_min) * (1 + cos(pi T_cur / T_i)) / 2``

    The cycle index is computed in closed form,
    ``i = floor(log(1 + t (T_mult - 1) / T_0) / log(T_mult))`` for
    ``T_mult > 1``, so the schedule is jit-safe for any step. ``T_0`` and
    ``T_mult`` are whole numbers (``T_0 >= 1``, ``T_mult >= 1``), as in torch.

    Example:
      >>> s = cosine_warm_restarts(1.0, T_0=10, T_mult=2)
      >>> [round(float(s(t)), 6) for t in (0, 5, 10, 20, 30)]
      [1.0, 0.5, 1.0, 0.5, 1.0]
    """
    check_nonnegative("init_value", init_value)
    _check_whole("T_0", T_0, 1)
    _check_whole("T_mult", T_mult, 1)
    check_nonnegative("eta_min", eta_min)
    params = {"init_value": init_value, "T_0": T_0, "T_mult": T_mult, "eta_min": eta_min}
    return Schedule(_cosine_warm_restarts_fn, "cosine_warm_restarts", {k: as_param(v) for k, v in params.items()})


# --------------------------------------------------------------------------
# Linear and polynomial


def _linear_fn(step, init_value, end_value, transition_steps):
    t = _steps(step)
    positive = transition_steps > 0
    span = jnp.where(positive, transition_steps, 1.0)
    done = jnp.clip(t, 0.0, span)
    elapsed = jnp.where(positive, done / span, 1.0)
    remaining = jnp.where(positive, (span - done) / span, 0.0)
    return _lerp(init_value, end_value, elapsed, remaining)


def linear(init_value, end_value, transition_steps) -> Schedule:
    """Linear interpolation from ``init_value`` to ``end_value``, then constant.

    ``value(t) = init_value + (end_value - init_value) * min(t, T) / T`` with
    ``T = transition_steps`` (``T = 0`` gives ``end_value`` from the start).

    PyTorch ``LinearLR(start_factor, end_factor, total_iters)`` on a base lr
    ``lr`` is ``linear(lr * start_factor, lr * end_factor, total_iters)``.

    Example:
      >>> s = linear(1.0, 0.0, transition_steps=4)
      >>> [float(s(t)) for t in (0, 1, 4, 10)]
      [1.0, 0.75, 0.0, 0.0]
    """
    check_nonnegative("init_value", init_value)
    check_nonnegative("end_value", end_value)
    check_nonnegative("transition_steps", transition_steps)
    params = {"init_value": init_value, "end_value": end_value, "transition_steps": transition_steps}
    return Schedule(_linear_fn, "linear", {k: as_param(v) for k, v in params.items()})


def _linear_warmup_fn(step, init_value, peak_value, warmup_steps):
    return _linear_fn(step, init_value, peak_value, warmup_steps)


def linear_warmup(init_value, peak_value, warmup_steps) -> Schedule:
    """Linear warm-up from ``init_value`` to ``peak_value`` over ``warmup_steps``, then constant.

    ``value(t) = init_value + (peak_value - init_value) * min(t, W) / W``.
    To warm up into another schedule, `join` them at ``warmup_steps``::

        join([linear_warmup(0.0, 0.1, 100), cosine(0.1, 900)], boundaries=[100])

    (the cosine's own counter starts at 0 at step 100, as in torch's
    ``SequentialLR(LinearLR, CosineAnnealingLR, milestones=[100])``).

    Example:
      >>> s = linear_warmup(0.0, 1.0, warmup_steps=10)
      >>> [float(s(t)) for t in (0, 5, 10, 50)]
      [0.0, 0.5, 1.0, 1.0]
    """
    check_nonnegative("init_value", init_value)
    check_nonnegative("peak_value", peak_value)
    check_nonnegative("warmup_steps", warmup_steps)
    params = {"init_value": init_value, "peak_value": peak_value, "warmup_steps": warmup_steps}
    return Schedule(_linear_warmup_fn, "linear_warmup", {k: as_param(v) for k, v in params.items()})


def _polynomial_fn(step, init_value, total_steps, power, end_value):
    t = _steps(step)
    remaining = (total_steps - jnp.clip(t, 0.0, total_steps)) / total_steps
    return end_value + (init_value - end_value) * remaining**power


def polynomial(init_value, total_steps, power=1.0, end_value=0.0) -> Schedule:
    """Polynomial decay to ``end_value`` over ``total_steps``, then constant (PyTorch ``PolynomialLR``).

    ``value(t) = end_value + (init_value - end_value) * (1 - min(t, T) / T) ** power``

    Torch's ``PolynomialLR(total_iters=T, power=p)`` decays to 0: it is
    ``polynomial(lr, T, p)`` with the default ``end_value=0``.

    Example:
      >>> s = polynomial(1.0, total_steps=10, power=2.0)
      >>> [round(float(s(t)), 6) for t in (0, 5, 10, 20)]
      [1.0, 0.25, 0.0, 0.0]
    """
    check_nonnegative("init_value", init_value)
    check_positive("total_steps", total_steps)
    check_nonnegative("power", power)
    check_nonnegative("end_value", end_value)
    params = {"init_value": init_value, "total_steps": total_steps, "power": power, "end_value": end_value}
    return Schedule(_polynomial_fn, "polynomial", {k: as_param(v) for k, v in params.items()})


def _piecewise_constant_fn(step, boundaries, values):
    t = _steps(step)
    index = jnp.sum(t[..., None] >= boundaries, axis=-1)
    return jnp.take(values, index, axis=-1)


def piecewise_constant(boundaries, values) -> Schedule:
    """``values[i]`` on ``[boundaries[i-1], boundaries[i])``.

    ``value(t) = values[#{b in boundaries : b <= t}]``: ``values[0]`` before
    the first boundary, ``values[-1]`` from the last one on. ``boundaries``
    are strictly increasing and ``len(values) == len(boundaries) + 1``.

    Example:
      >>> s = piecewise_constant([10, 20], [1.0, 0.5, 0.1])
      >>> [round(float(s(t)), 6) for t in (0, 10, 19, 20)]
      [1.0, 0.5, 0.5, 0.1]
    """
    _check_increasing("boundaries", boundaries)
    check_nonnegative("values", values)
    n_boundaries, n_values = np.shape(boundaries), np.shape(values)
    if len(n_values) != 1 or n_values[0] != (n_boundaries[0] if n_boundaries else 0) + 1:
        raise ValueError(
            f"`values` (={values!r}) must hold len(boundaries) + 1 = "
            f"{(n_boundaries[0] if n_boundaries else 0) + 1} entries, one per interval"
        )
    return Schedule(
        _piecewise_constant_fn,
        "piecewise_constant",
        {"boundaries": as_param(boundaries), "values": as_param(values)},
    )


# --------------------------------------------------------------------------
# Cyclic schedules

_CYCLIC_MODES = ("triangular", "triangular2", "exp_range")


def _cyclic_shape(t, step_size_up, step_size_down, gamma, mode):
    """Fraction of the cycle amplitude at step ``t``, in [0, 1] (CyclicLR's ``scale_factor * scale_fn``)."""
    period = step_size_up + step_size_down
    r = jnp.mod(t, period)
    cycle = jnp.round((t - r) / period) + 1.0
    # The triangle rises over step_size_up steps and falls over step_size_down.
    height = jnp.where(r <= step_size_up, r / step_size_up, (period - r) / step_size_down)
    if mode == "triangular":
        return height
    if mode == "triangular2":
        return height * 0.5 ** (cycle - 1.0)
    return height * gamma**t  # exp_range scales by iterations, not cycles


def _cyclic_lr_fn(step, base_lr, max_lr, step_size_up, step_size_down, gamma, mode):
    shape = _cyclic_shape(_steps(step), step_size_up, step_size_down, gamma, mode)
    return base_lr + (max_lr - base_lr) * shape


def _cyclic_momentum_fn(step, base_momentum, max_momentum, step_size_up, step_size_down, gamma, mode):
    shape = _cyclic_shape(_steps(step), step_size_up, step_size_down, gamma, mode)
    return max_momentum - (max_momentum - base_momentum) * shape


def _check_cyclic(step_size_up, step_size_down, mode, gamma):
    check_positive("step_size_up", step_size_up)
    if step_size_down is not None:
        check_positive("step_size_down", step_size_down)
    check_choice("mode", mode, _CYCLIC_MODES)
    check_positive("gamma", gamma)


def cyclic(base_lr, max_lr, step_size_up=2000, step_size_down=None, mode="triangular", gamma=1.0) -> Schedule:
    """Cyclical learning rate (PyTorch ``CyclicLR``; Smith 2017, arXiv:1506.01186).

    With period ``P = step_size_up + step_size_down``, ``r = t mod P`` and
    cycle number ``c = floor(t / P) + 1``::

        h(t) = r / step_size_up                  if r <= step_size_up
             = (P - r) / step_size_down          otherwise
        value(t) = base_lr + (max_lr - base_lr) * h(t) * scale

    where ``scale`` is 1 (``"triangular"``), ``2 ** -(c - 1)``
    (``"triangular2"``) or ``gamma ** t`` (``"exp_range"``).
    ``step_size_down`` defaults to ``step_size_up``.

    Torch also cycles momentum inversely by default; that curve is
    `cyclic_momentum` with the same cycle arguments.

    Example:
      >>> s = cyclic(0.0, 1.0, step_size_up=4)
      >>> [float(s(t)) for t in (0, 2, 4, 6, 8)]
      [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    check_nonnegative("base_lr", base_lr)
    check_nonnegative("max_lr", max_lr)
    _check_cyclic(step_size_up, step_size_down, mode, gamma)
    params = {
        "base_lr": base_lr,
        "max_lr": max_lr,
        "step_size_up": step_size_up,
        "step_size_down": step_size_up if step_size_down is None else step_size_down,
        "gamma": gamma,
    }
    return Schedule(_cyclic_lr_fn, "cyclic", {k: as_param(v) for k, v in params.items()}, {"mode": mode})


def cyclic_momentum(
    base_momentum=0.8, max_momentum=0.9, step_size_up=2000, step_size_down=None, mode="triangular", gamma=1.0
) -> Schedule:
    """The momentum that PyTorch ``CyclicLR(cycle_momentum=True)`` cycles opposite to the lr.

    ``value(t) = max_momentum - (max_momentum - base_momentum) * h(t) * scale``
    with ``h`` and ``scale`` as in `cyclic`: momentum is ``max_momentum``
    where the lr is ``base_lr`` and ``base_momentum`` at the lr peak. Give it
    the same ``step_size_up``, ``step_size_down``, ``mode`` and ``gamma`` as
    the `cyclic` learning rate. For Adam-type optimizers torch cycles
    ``beta1`` with the same curve.

    Example:
      >>> m = cyclic_momentum(0.8, 0.9, step_size_up=4)
      >>> [round(float(m(t)), 6) for t in (0, 4, 8)]
      [0.9, 0.8, 0.9]
    """
    check_range("base_momentum", base_momentum, 0.0, 1.0)
    check_range("max_momentum", max_momentum, 0.0, 1.0)
    _check_cyclic(step_size_up, step_size_down, mode, gamma)
    params = {
        "base_momentum": base_momentum,
        "max_momentum": max_momentum,
        "step_size_up": step_size_up,
        "step_size_down": step_size_up if step_size_down is None else step_size_down,
        "gamma": gamma,
    }
    return Schedule(_cyclic_momentum_fn, "cyclic_momentum", {k: as_param(v) for k, v in params.items()}, {"mode": mode})


# --------------------------------------------------------------------------
# One-cycle


class OneCycle(NamedTuple):
    """The two curves of the 1cycle policy: use ``momentum`` as SGD's momentum or Adam's ``b1``."""

    learning_rate: Schedule
    momentum: Schedule


def _one_cycle_curve(t, total_steps, pct_start, values, three_phase, anneal_strategy):
    """Piecewise anneal through ``values`` (one more than the number of phases).

    Phase ends follow torch: ``pct_start * T - 1``, then (three-phase)
    ``2 * pct_start * T - 2``, then ``T - 1``. A step belongs to the first
    phase whose end it does not exceed, and the last phase's end value is held
    afterwards (torch raises past ``total_steps``).
    """
    ends = [pct_start * total_steps - 1.0]
    if three_phase:
        ends.append(2.0 * pct_start * total_steps - 2.0)
    ends.append(total_steps - 1.0)
    starts = [jnp.zeros_like(ends[0])] + ends[:-1]
    anneal = _cos_anneal if anneal_strategy == "cos" else _lerp

    def phase(i):
        span = ends[i] - starts[i]
        empty = span <= 0  # a phase of zero length is already at its end
        span = jnp.where(empty, 1.0, span)
        elapsed = jnp.where(empty, 1.0, jnp.clip((t - starts[i]) / span, 0.0, 1.0))
        remaining = jnp.where(empty, 0.0, jnp.clip((ends[i] - t) / span, 0.0, 1.0))
        return anneal(values[i], values[i + 1], elapsed, remaining)

    value = phase(len(ends) - 1)
    for i in reversed(range(len(ends) - 1)):
        value = jnp.where(t <= ends[i], phase(i), value)
    return value


def _one_cycle_lr_fn(step, max_lr, total_steps, pct_start, div_factor, final_div_factor, anneal_strategy, three_phase):
    initial = max_lr / div_factor
    final = initial / final_div_factor
    values = (initial, max_lr, initial, final) if three_phase else (initial, max_lr, final)
    return _one_cycle_curve(_steps(step), total_steps, pct_start, values, three_phase, anneal_strategy)


def _one_cycle_momentum_fn(step, base_momentum, max_momentum, total_steps, pct_start, anneal_strategy, three_phase):
    if three_phase:
        values = (max_momentum, base_momentum, max_momentum, max_momentum)
    else:
        values = (max_momentum, base_momentum, max_momentum)
    return _one_cycle_curve(_steps(step), total_steps, pct_start, values, three_phase, anneal_strategy)


def one_cycle(
    max_lr,
    total_steps,
    pct_start=0.3,
    anneal_strategy="cos",
    div_factor=25.0,
    final_div_factor=1e4,
    three_phase=False,
    base_momentum=0.85,
    max_momentum=0.95,
) -> OneCycle:
    """The 1cycle policy (PyTorch ``OneCycleLR``; Smith & Topin 2017, arXiv:1708.07120).

    The lr starts at ``initial = max_lr / div_factor``, anneals up to
    ``max_lr`` by step ``pct_start * T - 1`` (``T = total_steps``), then down
    to ``initial / final_div_factor`` at step ``T - 1``. With
    ``three_phase=True`` it first comes back to ``initial`` at
    ``2 * pct_start * T - 2`` (symmetric about the peak) and only the third
    phase goes down to the minimum. Each phase anneals from ``a`` to ``b``
    with ``p`` its elapsed fraction:

    * ``"cos"``:    ``b + (a - b) * (1 + cos(pi p)) / 2``
    * ``"linear"``: ``a + (b - a) * p``

    The momentum moves the other way: ``max_momentum -> base_momentum`` while
    the lr rises, back to ``max_momentum`` while it falls (and stays there in
    the third phase). The last value is held after ``T - 1`` (torch raises).

    Returns:
      ``OneCycle(learning_rate, momentum)``, two `Schedule`s: give
      ``momentum`` to SGD's momentum or Adam's ``b1`` (torch cycles beta1 the
      same way).

    Example:
      >>> lr, momentum = one_cycle(0.1, total_steps=100)
      >>> round(float(lr(0)), 6), round(float(lr(29)), 6), round(float(momentum(29)), 6)
      (0.004, 0.1, 0.85)
    """
    check_nonnegative("max_lr", max_lr)
    _check_whole("total_steps", total_steps, 1)
    check_range("pct_start", pct_start, 0.0, 1.0)
    check_choice("anneal_strategy", anneal_strategy, ("cos", "linear"))
    check_positive("div_factor", div_factor)
    check_positive("final_div_factor", final_div_factor)
    _check_bool("three_phase", three_phase)
    check_range("base_momentum", base_momentum, 0.0, 1.0)
    check_range("max_momentum", max_momentum, 0.0, 1.0)
    static = {"anneal_strategy": anneal_strategy, "three_phase": three_phase}
    lr_params = {
        "max_lr": max_lr,
        "total_steps": total_steps,
        "pct_start": pct_start,
        "div_factor": div_factor,
        "final_div_factor": final_div_factor,
    }
    momentum_params = {
        "base_momentum": base_momentum,
        "max_momentum": max_momentum,
        "total_steps": total_steps,
        "pct_start": pct_start,
    }
    return OneCycle(
        Schedule(_one_cycle_lr_fn, "one_cycle", {k: as_param(v) for k, v in lr_params.items()}, static),
        Schedule(
            _one_cycle_momentum_fn, "one_cycle_momentum", {k: as_param(v) for k, v in momentum_params.items()}, static
        ),
    )


# --------------------------------------------------------------------------
# Composition


def _join_fn(step, schedules, boundaries):
    t = _steps(step)
    value = schedules[0](t)
    for i, schedule in enumerate(schedules[1:]):
        # Clamping keeps children away from negative steps they never see.
        child = schedule(jnp.maximum(t - boundaries[i], 0.0))
        value = jnp.where(t >= boundaries[i], child, value)
    return value


def join(schedules: Sequence[Schedule], boundaries) -> Schedule:
    """Run schedules one after another (PyTorch ``SequentialLR``).

    ``schedules[i]`` runs on ``[boundaries[i-1], boundaries[i])`` with its own
    step counter, restarted at 0 at its boundary::

        value(t) = schedules[i](t - boundaries[i-1])

    This is what torch does: at a milestone ``SequentialLR`` evaluates the
    next scheduler's closed form at epoch 0 (``_update_lr(0)``), i.e. its
    *initial* value, then steps it normally (checked against torch 2.13,
    including a three-scheduler sequence). The quirk to know: the value does
    not continue from where the previous scheduler left off. A warm-up cut
    short by an earlier milestone jumps to the next schedule's start, and a
    schedule after a warm-up must itself start from the peak
    (``cosine(peak, ...)``), as every torch child starts from the optimizer's
    initial lr. The children are sub-pytrees: their parameters are leaves of
    the joined schedule.

    Args:
      schedules: one or more `Schedule`s.
      boundaries: ``len(schedules) - 1`` strictly increasing steps.

    Example:
      >>> s = join([linear_warmup(0.0, 1.0, 10), cosine(1.0, T_max=90)], boundaries=[10])
      >>> [round(float(s(t)), 6) for t in (0, 5, 10, 55, 100)]
      [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    if isinstance(schedules, Schedule) or not isinstance(schedules, (list, tuple)):
        raise TypeError(f"`schedules` (={schedules!r}) must be a list of Schedules")
    if not schedules:
        raise ValueError("`schedules` (=[]) must hold at least one Schedule")
    for i, schedule in enumerate(schedules):
        _check_schedule(f"schedules[{i}]", schedule)
    _check_increasing("boundaries", boundaries)
    n_boundaries = np.shape(boundaries)
    if len(n_boundaries) != 1 or n_boundaries[0] != len(schedules) - 1:
        raise ValueError(
            f"`boundaries` (={boundaries!r}) must hold len(schedules) - 1 = {len(schedules) - 1} steps"
        )
    return Schedule(_join_fn, "join", {"schedules": tuple(schedules), "boundaries": as_param(boundaries)})


def _lambda_fn(step, init_value, fn):
    return init_value * fn(_steps(step))


def lambda_lr(init_value, fn: Callable) -> Schedule:
    """``value(t) = init_value * fn(t)`` (PyTorch ``LambdaLR``).

    ``fn`` receives the step as a float32 array and must be written with
    ``jnp`` (it is traced under jit). It is static: schedules with different
    ``fn`` objects compile separately, so define it once rather than as a
    fresh lambda per call.

    Example:
      >>> s = lambda_lr(0.1, lambda t: jnp.minimum(1.0, (t + 1) / 10))
      >>> [round(float(s(t)), 6) for t in (0, 4, 9, 100)]
      [0.01, 0.05, 0.1, 0.1]
    """
    check_nonnegative("init_value", init_value)
    if not callable(fn) or isinstance(fn, Schedule):
        raise TypeError(f"`fn` (={fn!r}) must be a function step -> factor")
    return Schedule(_lambda_fn, "lambda_lr", {"init_value": as_param(init_value)}, {"fn": fn})


def _per_epoch_fn(step, schedule, steps_per_epoch):
    return schedule(_floor_div(_steps(step), steps_per_epoch))


def per_epoch(schedule: Schedule, steps_per_epoch) -> Schedule:
    """Step ``schedule`` once per epoch: ``value(t) = schedule(floor(t / steps_per_epoch))``.

    Reproduces PyTorch code that calls ``scheduler.step()`` once per epoch of
    ``steps_per_epoch`` optimizer updates.

    Example:
      >>> s = per_epoch(step_decay(1.0, step_size=2, gamma=0.5), steps_per_epoch=100)
      >>> [float(s(t)) for t in (0, 199, 200, 399, 400)]
      [1.0, 1.0, 0.5, 0.5, 0.25]
    """
    _check_schedule("schedule", schedule)
    _check_whole("steps_per_epoch", steps_per_epoch, 1)
    return Schedule(
        _per_epoch_fn, "per_epoch", {"schedule": schedule, "steps_per_epoch": as_param(steps_per_epoch)}
    )
