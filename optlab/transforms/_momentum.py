"""Momentum: PyTorch's buffer form, the classical velocity form, and Nesterov's."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optlab import _checks
from optlab._base import (
    GradientTransformationExtraArgs,
    leaf_scalars,
    safe_increment,
    step_counter,
    tree_zeros_like,
)

ScalarOrSchedule = Any


def _map(fn, *trees):
    return jax.tree_util.tree_map(fn, *trees)



class TraceState(NamedTuple):
    count: jax.Array | None  # None unless dampening is on (only the first damped step reads it)
    momentum_buffer: Any


def trace(momentum, dampening=0.0, nesterov: bool = False, accumulator_dtype=None) -> GradientTransformationExtraArgs:
    """Momentum as ``torch.optim.SGD`` keeps it (lr applied afterwards).

    .. math::
        b_1 = g_1, \\qquad b_t = \\mu b_{t-1} + (1 - \\tau) g_t, \\qquad
        u_t = \\begin{cases} g_t + \\mu b_t & \\text{nesterov} \\\\ b_t & \\text{otherwise}\\end{cases}

    with momentum :math:`\\mu` and dampening :math:`\\tau`; the buffer starts as
    the first gradient, undamped, as in PyTorch. With :math:`\\mu = 0`
    dampening is ignored (PyTorch keeps no buffer then). Nesterov's form here
    is Sutskever et al. (2013) as PyTorch rewrites it. ``accumulator_dtype`` sets
    the buffer's dtype (float32 for bfloat16 parameters); by default it is the
    parameters' own.

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> tx = optlab.chain(optlab.trace(0.9), optlab.scale_by_learning_rate(0.1))
      >>> state = tx.init({"w": jnp.ones(2)})
      >>> for _ in range(2):
      ...     updates, state = tx.update({"w": jnp.ones(2)}, state)
      >>> round(float(updates["w"][0]), 4)  # -0.1 * (0.9 * 1 + 1)
      -0.19
    """
    _checks.check_range("momentum", momentum, 0.0, 1.0)
    _checks.check_range("dampening", dampening, 0.0, 1.0)
    if nesterov and not _checks.is_traced(dampening):
        arr = _checks.concrete(dampening)
        if arr is not None and (arr != 0).any():
            raise ValueError(f"nesterov momentum requires zero dampening, got `dampening` (={dampening!r})")

    damped = not _checks.is_zero(dampening)
    accumulator_dtype = _checks.check_float_dtype("accumulator_dtype", accumulator_dtype)

    def init_fn(params):
        _checks.check_params_dtypes("trace", params, complex_ok=True)
        return TraceState(step_counter(damped), tree_zeros_like(params, accumulator_dtype))

    def update_fn(updates, state, params=None, **extra):
        del params, extra
        # The buffer starts at zero, so mu * 0 + 1 * g_1 = g_1 exactly: a scalar
        # coefficient on g gives PyTorch's b_1 = g_1 without a per-element select, and
        # with a literal zero dampening there is no coefficient at all. Both are the
        # same arithmetic as a select; the kernels are smaller and compile faster.
        # The coefficient is computed per leaf from leaf-private scalars (leaf_scalars).
        hp = leaf_scalars(state.momentum_buffer, momentum=momentum, dampening=dampening, count=state.count)

        def new_buf(g, b, h):
            step = g
            if damped:
                damp = jnp.where(h["momentum"] == 0, 0.0, h["dampening"])
                step = jnp.where(h["count"] == 0, 1.0, 1 - damp) * g
            return (h["momentum"] * b + step).astype(b.dtype)

        buf = _map(new_buf, updates, state.momentum_buffer, hp)
        if nesterov:
            out = _map(lambda g, b, h: (g + h["momentum"] * b).astype(g.dtype), updates, buf, hp)
        else:
            out = _map(lambda g, b: b.astype(g.dtype), updates, buf)
        return out, TraceState(safe_increment(state.count), buf)

    return GradientTransformationExtraArgs(init_fn, update_fn)


class VelocityState(NamedTuple):
    count: jax.Array | None  # None unless the learning rate is a schedule
    velocity: Any


def _lr_at(learning_rate, count):
    return learning_rate(count) if callable(learning_rate) else learning_rate


def scale_by_classical_momentum(
    learning_rate: ScalarOrSchedule, momentum=0.9, *, accumulator_dtype=None
) -> GradientTransformationExtraArgs:
    """Classical momentum with the learning rate inside the velocity.

    .. math:: v_t = \\mu v_{t-1} - \\epsilon g_t, \\qquad w_t = w_{t-1} + v_t

    Goodfellow, Bengio & Courville (2016), *Deep Learning*, Algorithm 8.2
    (Polyak, 1964). The emitted update is :math:`v_t` itself. Unlike PyTorch's
    form, changing :math:`\\epsilon` mid-run leaves the velocity already built
    untouched. ``accumulator_dtype`` sets the velocity's dtype (float32 for
    bfloat16 parameters); by default it is the parameters' own.

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> tx = optlab.scale_by_classical_momentum(0.1, momentum=0.9)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> for _ in range(2):
      ...     updates, state = tx.update({"w": jnp.array([1.0, -2.0])}, state)
      >>> [round(u, 4) for u in updates["w"].tolist()]  # v_2 = -(0.9 * 0.1 + 0.1) g
      [-0.19, 0.38]
    """
    _checks.check_learning_rate(learning_rate)
    _checks.check_probability("momentum", momentum)
    accumulator_dtype = _checks.check_float_dtype("accumulator_dtype", accumulator_dtype)

    def init_fn(params):
        _checks.check_params_dtypes("scale_by_classical_momentum", params, complex_ok=True)
        return VelocityState(step_counter(callable(learning_rate)), tree_zeros_like(params, accumulator_dtype))

    def update_fn(updates, state, params=None, **extra):
        del params, extra
        hp = leaf_scalars(state.velocity, lr=_lr_at(learning_rate, state.count), momentum=momentum)
        v = _map(lambda g, v, h: (h["momentum"] * v - h["lr"] * g).astype(v.dtype), updates, state.velocity, hp)
        return _map(lambda v, g: v.astype(g.dtype), v, updates), VelocityState(safe_increment(state.count), v)

    return GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_nesterov_momentum(
    learning_rate: ScalarOrSchedule, momentum=0.9, *, accumulator_dtype=None
) -> GradientTransformationExtraArgs:
    """Nesterov's accelerated gradient, reparametrised so it needs one gradient per step.

    The look-ahead form (Goodfellow et al. 2016, Algorithm 8.3; Sutskever et
    al. 2013, "On the importance of initialization and momentum in deep
    learning") evaluates the gradient at :math:`w + \\mu v`:

    .. math:: v_t = \\mu v_{t-1} - \\epsilon \\nabla f(w_{t-1} + \\mu v_{t-1}), \\qquad w_t = w_{t-1} + v_t.

    Storing the look-ahead point :math:`\\tilde w = w + \\mu v` as the
    parameters instead, the gradient is taken at the stored point and

    .. math:: v_t = \\mu v_{t-1} - \\epsilon \\nabla f(\\tilde w_{t-1}), \\qquad
              \\tilde w_t = \\tilde w_{t-1} - \\mu v_{t-1} + (1 + \\mu) v_t.

    Both produce the same sequence of points, :math:`\\tilde w_t = w_t + \\mu v_t`
    (tested in ``tests/test_optimizers.py``). The parameters a user holds are
    therefore the look-ahead points, which is what the next gradient is
    evaluated at. ``accumulator_dtype`` sets the velocity's dtype (float32 for
    bfloat16 parameters); by default it is the parameters' own.

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> tx = optlab.scale_by_nesterov_momentum(0.1, momentum=0.9)
      >>> state = tx.init({"w": jnp.zeros(1)})
      >>> steps = []
      >>> for _ in range(2):
      ...     updates, state = tx.update({"w": jnp.ones(1)}, state)
      ...     steps.append(round(float(updates["w"][0]), 4))
      >>> steps  # -mu v_0 + (1 + mu) v_1 = 1.9 * -0.1, then 0.9 * 0.1 + 1.9 * -0.19
      [-0.19, -0.271]
    """
    _checks.check_learning_rate(learning_rate)
    _checks.check_probability("momentum", momentum)
    accumulator_dtype = _checks.check_float_dtype("accumulator_dtype", accumulator_dtype)

    def init_fn(params):
        _checks.check_params_dtypes("scale_by_nesterov_momentum", params, complex_ok=True)
        return VelocityState(step_counter(callable(learning_rate)), tree_zeros_like(params, accumulator_dtype))

    def update_fn(updates, state, params=None, **extra):
        del params, extra
        hp = leaf_scalars(state.velocity, lr=_lr_at(learning_rate, state.count), momentum=momentum)
        v_new = _map(lambda g, v, h: (h["momentum"] * v - h["lr"] * g).astype(v.dtype), updates, state.velocity, hp)

        def out_fn(v0, v1, g, h):
            mu = h["momentum"]
            return (-mu * v0 + (1 + mu) * v1).astype(g.dtype)

        out = _map(out_fn, state.velocity, v_new, updates, hp)
        return out, VelocityState(safe_increment(state.count), v_new)

    return GradientTransformationExtraArgs(init_fn, update_fn)
