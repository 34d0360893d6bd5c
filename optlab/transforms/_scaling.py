"""Stateless (or nearly stateless) building blocks: scaling, weight decay, clipping."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optlab import _checks
from optlab._base import (
    CountState,
    EmptyState,
    GradientTransformationExtraArgs,
    check_same_structure,
    global_norm,
    leaf_scalars,
    safe_increment,
    step_counter,
)

ScalarOrSchedule = Any  # float | jax.Array | Callable[[step], value]


def _map(fn, *trees):
    return jax.tree_util.tree_map(fn, *trees)


def scale(factor) -> GradientTransformationExtraArgs:
    """Multiply updates by a constant: ``u <- factor * u``.

    ``factor`` may be a float or an array (a tracer included). The result keeps
    each update's dtype.

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> tx = optlab.scale(-0.5)
      >>> u, _ = tx.update({"w": jnp.ones(2)}, tx.init(None))
      >>> u["w"].tolist()
      [-0.5, -0.5]
    """
    _checks.check_number("factor", factor)

    def init_fn(params):
        del params
        return EmptyState()

    def update_fn(updates, state, params=None, **extra):
        del params, extra
        return _map(lambda u: (factor * u).astype(u.dtype), updates), state

    return GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_learning_rate(learning_rate: ScalarOrSchedule, *, flip_sign: bool = True) -> GradientTransformationExtraArgs:
    """Multiply updates by ``-learning_rate`` (gradient *descent*), or ``+lr`` with ``flip_sign=False``.

    ``learning_rate`` is a float, an array, or a schedule ``step -> value``;
    with a schedule the transform counts its updates (the first uses step 0).

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> tx = optlab.scale_by_learning_rate(optlab.schedules.exponential(0.1, gamma=0.5))
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> steps = []
      >>> for _ in range(2):
      ...     updates, state = tx.update({"w": jnp.array([1.0, -2.0])}, state)
      ...     steps.append([round(u, 4) for u in updates["w"].tolist()])
      >>> steps
      [[-0.1, 0.2], [-0.05, 0.1]]
    """
    sign = -1.0 if flip_sign else 1.0
    if callable(learning_rate):

        def init_fn(params):
            del params
            return CountState(step_counter())

        def update_fn(updates, state, params=None, **extra):
            del params, extra
            lr = learning_rate(state.count)
            return _map(lambda u: (sign * lr * u).astype(u.dtype), updates), CountState(safe_increment(state.count))

        return GradientTransformationExtraArgs(init_fn, update_fn)

    _checks.check_learning_rate(learning_rate)
    return scale(sign * learning_rate)


def add_decayed_weights(weight_decay, mask: Any = None) -> GradientTransformationExtraArgs:
    """Add ``weight_decay * w`` to the updates.

    Where it sits in a chain decides what it means:

    * before a preconditioner (``chain(add_decayed_weights(wd), scale_by_adam(), ...)``)
      it is *coupled* L2 regularisation, ``g <- g + wd * w``, as in
      ``torch.optim.SGD/Adam(weight_decay=wd)``;
    * after the preconditioner and before the learning rate it is *decoupled*
      weight decay (Loshchilov & Hutter, 2019, "Decoupled Weight Decay
      Regularization"), ``w <- w - lr * (adam_step + wd * w)``, as in
      ``torch.optim.AdamW``.

    ``mask``: optional pytree of bools (or a function params -> bools) choosing
    which leaves decay; use `optlab.partition` for richer parameter groups.

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> tx = optlab.add_decayed_weights(0.1)
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> updates, _ = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
      >>> [round(u, 4) for u in updates["w"].tolist()]  # g + wd * w
      [1.1, 0.8]
    """
    _checks.check_nonnegative("weight_decay", weight_decay)

    def init_fn(params):
        del params
        return EmptyState()

    def update_fn(updates, state, params=None, **extra):
        del extra
        if params is None:
            raise ValueError("add_decayed_weights needs `params` in update(updates, state, params)")
        check_same_structure(updates, params, "gradient")
        m = mask(params) if callable(mask) else mask
        hp = leaf_scalars(params, wd=weight_decay)
        if m is None:
            new = _map(lambda u, p, h: (u + h["wd"] * p).astype(u.dtype), updates, params, hp)
        else:
            new = _map(lambda u, p, k, h: (u + h["wd"] * p).astype(u.dtype) if k else u, updates, params, m, hp)
        return new, state

    return GradientTransformationExtraArgs(init_fn, update_fn)


def decoupled_weight_decay(weight_decay, learning_rate: ScalarOrSchedule = 1.0) -> GradientTransformationExtraArgs:
    """Add ``-learning_rate * weight_decay * w`` to the (already lr-scaled) updates.

    The self-contained form of decoupled weight decay, for the end of any
    chain: ``w <- w + u - lr * wd * w`` (``torch.optim.AdamW`` decays by
    ``lr * wd``; pass ``learning_rate=1`` for a decay independent of the step size).

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> tx = optlab.decoupled_weight_decay(0.1, learning_rate=0.5)
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> updates, _ = tx.update({"w": jnp.zeros(2)}, tx.init(params), params)
      >>> [round(u, 4) for u in updates["w"].tolist()]  # u - lr * wd * w
      [-0.05, 0.1]
    """
    _checks.check_nonnegative("weight_decay", weight_decay)
    lr_is_schedule = callable(learning_rate)
    _checks.check_learning_rate(learning_rate)

    def init_fn(params):
        del params
        return CountState(step_counter(lr_is_schedule))

    def update_fn(updates, state, params=None, **extra):
        del extra
        if params is None:
            raise ValueError("decoupled_weight_decay needs `params` in update(updates, state, params)")
        check_same_structure(updates, params, "gradient")
        lr = learning_rate(state.count) if lr_is_schedule else learning_rate
        hp = leaf_scalars(params, lr=lr, wd=weight_decay)
        new = _map(lambda u, p, h: (u - h["lr"] * h["wd"] * p).astype(u.dtype), updates, params, hp)
        return new, CountState(safe_increment(state.count))

    return GradientTransformationExtraArgs(init_fn, update_fn)


def clip(max_delta) -> GradientTransformationExtraArgs:
    """Clip every update element to ``[-max_delta, max_delta]`` (``torch.nn.utils.clip_grad_value_``).

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> tx = optlab.clip(0.5)
      >>> updates, _ = tx.update({"w": jnp.array([2.0, -0.25, -4.0])}, tx.init(None))
      >>> updates["w"].tolist()
      [0.5, -0.25, -0.5]
    """
    _checks.check_nonnegative("max_delta", max_delta)

    def init_fn(params):
        del params
        return EmptyState()

    def update_fn(updates, state, params=None, **extra):
        del params, extra
        return _map(lambda u: jnp.clip(u, -max_delta, max_delta).astype(u.dtype), updates), state

    return GradientTransformationExtraArgs(init_fn, update_fn)


def clip_by_global_norm(max_norm, eps: float = 1e-6) -> GradientTransformationExtraArgs:
    """Rescale updates so that their global L2 norm is at most ``max_norm``.

    ``u <- u * min(1, max_norm / (||u|| + eps))``, the rule of
    ``torch.nn.utils.clip_grad_norm_`` (Pascanu et al., 2013, "On the
    difficulty of training recurrent neural networks").

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> tx = optlab.clip_by_global_norm(1.0)
      >>> updates, _ = tx.update({"a": jnp.array([3.0]), "b": jnp.array([4.0])}, tx.init(None))
      >>> round(float(updates["a"][0]), 4), round(float(updates["b"][0]), 4)  # norm 5 -> 1
      (0.6, 0.8)
    """
    _checks.check_positive("max_norm", max_norm)

    def init_fn(params):
        del params
        return EmptyState()

    def update_fn(updates, state, params=None, **extra):
        del params, extra
        norm = global_norm(updates)
        coef = jnp.minimum(max_norm / (norm + eps), 1.0)
        return _map(lambda u: (u * coef).astype(u.dtype), updates), state

    return GradientTransformationExtraArgs(init_fn, update_fn)
