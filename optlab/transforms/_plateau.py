"""Reduce the step size when a monitored loss stops improving (``torch.optim.lr_scheduler.ReduceLROnPlateau``)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from optlab import _checks
from optlab.schedules._core import real_dtype
from optlab._base import GradientTransformationExtraArgs, count_dtype, safe_increment


class PlateauState(NamedTuple):
    count: jax.Array  # calls seen
    scale: jax.Array  # current multiplier of the updates
    best: jax.Array
    num_bad: jax.Array  # evaluations without improvement
    cooldown_left: jax.Array
    loss_sum: jax.Array  # accumulated since the last evaluation


def reduce_on_plateau(
    factor=0.1,
    patience: int = 10,
    threshold=1e-4,
    threshold_mode: str = "rel",
    cooldown: int = 0,
    min_scale=0.0,
    eps=1e-8,
    mode: str = "min",
    accumulation_size: int = 1,
) -> GradientTransformationExtraArgs:
    """Multiply updates by a scale that drops by ``factor`` when the loss plateaus.

    Feed the monitored value through the extra argument ``value``:
    ``tx.update(grads, state, params, value=loss)`` (the name optax uses for it). Every
    ``accumulation_size`` calls, the mean of the losses seen is one
    *evaluation*, which follows PyTorch's ``ReduceLROnPlateau.step(metric)``:
    an evaluation that beats the best by more than ``threshold`` (relative:
    ``best * (1 - threshold)`` for ``mode="min"``; absolute: ``best -
    threshold``) resets the bad count; otherwise it grows, and once it exceeds
    ``patience`` the scale becomes ``max(scale * factor, min_scale)`` (only if
    that changes it by more than ``eps``) and ``cooldown`` evaluations are
    ignored. The new scale applies from the next update on. With
    ``accumulation_size = steps_per_epoch`` and the training loss, this is the
    usual once-per-epoch scheduler. Place it at the end of a chain, after the
    learning rate (``min_scale`` is then ``min_lr / lr``).

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> tx = optlab.reduce_on_plateau(factor=0.5, patience=0)
      >>> state = tx.init({"w": jnp.ones(1)})
      >>> scales = []
      >>> for loss in (1.0, 1.0, 1.0):  # no improvement after the first: halve each time
      ...     updates, state = tx.update({"w": jnp.ones(1)}, state, value=loss)
      ...     scales.append(float(updates["w"][0]))
      >>> scales  # a new scale applies from the next update on
      [1.0, 1.0, 0.5]
    """
    _checks.check_range("factor", factor, 0.0, 1.0, hi_open=True)
    _checks.check_int("patience", patience, minimum=0)
    _checks.check_int("cooldown", cooldown, minimum=0)
    _checks.check_int("accumulation_size", accumulation_size, minimum=1)
    _checks.check_nonnegative("threshold", threshold)
    _checks.check_nonnegative("min_scale", min_scale)
    _checks.check_nonnegative("eps", eps)
    _checks.check_choice("threshold_mode", threshold_mode, ("rel", "abs"))
    _checks.check_choice("mode", mode, ("min", "max"))

    def is_better(a, best):
        if mode == "min":
            return a < (best * (1 - threshold) if threshold_mode == "rel" else best - threshold)
        return a > (best * (1 + threshold) if threshold_mode == "rel" else best + threshold)

    def init_fn(params):
        del params
        # Three distinct counters: a step that donates the state must not see one buffer twice.
        z = lambda: jnp.zeros([], count_dtype())  # noqa: E731
        best = jnp.asarray(jnp.inf if mode == "min" else -jnp.inf, real_dtype())
        return PlateauState(z(), jnp.ones([], real_dtype()), best, z(), z(), jnp.zeros([], real_dtype()))

    def evaluate(state: PlateauState, value):
        better = is_better(value, state.best)
        best = jnp.where(better, value, state.best)
        num_bad = jnp.where(better, 0, state.num_bad + 1)
        in_cooldown = state.cooldown_left > 0
        cooldown_left = jnp.where(in_cooldown, state.cooldown_left - 1, state.cooldown_left)
        num_bad = jnp.where(in_cooldown, 0, num_bad)
        reduce = num_bad > patience
        new_scale = jnp.maximum(state.scale * factor, min_scale)
        scale = jnp.where(reduce & (state.scale - new_scale > eps), new_scale, state.scale)
        cooldown_left = jnp.where(reduce, cooldown, cooldown_left)
        num_bad = jnp.where(reduce, 0, num_bad)
        return scale, best, num_bad.astype(count_dtype()), cooldown_left.astype(count_dtype())

    def update_fn(updates, state, params=None, *, value=None, **extra):
        del params, extra
        if value is None:
            raise TypeError("reduce_on_plateau needs the monitored value: update(grads, state, params, value=loss)")
        out = jax.tree_util.tree_map(lambda u: (state.scale * u).astype(u.dtype), updates)
        loss_sum = state.loss_sum + jnp.asarray(value, real_dtype())
        count = safe_increment(state.count)
        due = (count % accumulation_size) == 0
        scale, best, num_bad, cooldown_left = evaluate(state, loss_sum / accumulation_size)
        new = PlateauState(
            count,
            jnp.where(due, scale, state.scale),
            jnp.where(due, best, state.best),
            jnp.where(due, num_bad, state.num_bad),
            jnp.where(due, cooldown_left, state.cooldown_left),
            jnp.where(due, 0.0, loss_sum),
        )
        return out, new

    return GradientTransformationExtraArgs(init_fn, update_fn)
