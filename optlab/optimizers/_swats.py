"""SWATS: start with Adam, switch to SGD (Keskar & Socher, 2017)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optlab import _checks
from optlab.schedules._core import real_dtype
from optlab._base import (
    GradientTransformationExtraArgs,
    count_dtype,
    safe_increment,
    step_counter,
    tree_vdot,
    tree_zeros_like,
)
from optlab._hparams import Limits, with_limited_hyperparams


def _map(fn, *trees):
    return jax.tree_util.tree_map(fn, *trees)


class SwatsState(NamedTuple):
    """``switched`` says whether the SGD phase has begun, ``switch_step`` the
    (1-based) step at which it did (0 while still in Adam), ``sgd_learning_rate``
    the rate Λ estimated for it."""

    count: jax.Array
    mu: Any
    nu: Any
    sgd_momentum: Any
    lam: jax.Array
    switched: jax.Array
    switch_step: jax.Array
    sgd_learning_rate: jax.Array


def scale_by_swats(learning_rate, b1=0.9, b2=0.999, eps=1e-9) -> GradientTransformationExtraArgs:
    """SWATS, Algorithm 1 of Keskar & Socher (2017), "Improving Generalization
    Performance by Switching from Adam to SGD".

    Adam phase, step :math:`k`:

    .. math::
        p_k = -\\alpha \\frac{\\sqrt{1-\\beta_2^k}}{1-\\beta_1^k} \\frac{m_k}{\\sqrt{a_k} + \\epsilon}, \\quad
        \\gamma_k = \\frac{p_k^\\top p_k}{-p_k^\\top g_k}, \\quad
        \\lambda_k = \\beta_2 \\lambda_{k-1} + (1-\\beta_2) \\gamma_k

    (:math:`\\gamma_k` is the SGD rate whose step would project onto the Adam
    step), taken over the whole parameter vector. When :math:`k > 1` and
    :math:`|\\lambda_k / (1-\\beta_2^k) - \\gamma_k| < \\epsilon`, training
    switches to SGD with momentum :math:`\\beta_1` and rate
    :math:`\\Lambda = \\lambda_k / (1-\\beta_2^k)`:
    :math:`v_k = \\beta_1 v_{k-1} + g_k,\\; w_k = w_{k-1} - (1-\\beta_1)\\Lambda v_k`.
    The emitted update is final (learning rate included).
    """
    _checks.check_learning_rate(learning_rate, positive=True)
    _checks.check_probability("b1", b1)
    _checks.check_probability("b2", b2)
    _checks.check_nonnegative("eps", eps)

    def init_fn(params):
        _checks.check_params_dtypes("swats", params)
        # Fresh buffers for every field: a step that donates the state must not see one twice.
        z = lambda: tree_zeros_like(params)  # noqa: E731
        f0 = lambda: jnp.zeros([], real_dtype())  # noqa: E731
        return SwatsState(step_counter(), z(), z(), z(), f0(), jnp.asarray(False), step_counter(), f0())

    def update_fn(updates, state, params=None, **extra):
        del params, extra
        k = safe_increment(state.count)
        kf = k.astype(real_dtype())
        # SGD phase (computed always, selected below; both are cheap elementwise maps).
        # Moments keep their own dtype (that of the parameters): the float32
        # hyperparameters would otherwise promote bfloat16 state to float32.
        v = _map(lambda v, g: (b1 * v + g).astype(v.dtype), state.sgd_momentum, updates)
        sgd_step = _map(lambda v, g: (-(1 - b1) * state.sgd_learning_rate * v).astype(g.dtype), v, updates)
        # Adam phase.
        mu = _map(lambda m, g: (b1 * m + (1 - b1) * g).astype(m.dtype), state.mu, updates)
        nu = _map(lambda a, g: (b2 * a + (1 - b2) * g * g).astype(a.dtype), state.nu, updates)
        step_size = learning_rate * jnp.sqrt(1 - b2**kf) / (1 - b1**kf)
        p = _map(lambda m, a, g: (-step_size * m / (jnp.sqrt(a) + eps)).astype(g.dtype), mu, nu, updates)
        pg = tree_vdot(p, updates)
        pp = tree_vdot(p, p)
        gamma = jnp.where(pg != 0, pp / jnp.where(pg != 0, -pg, 1.0), 0.0)
        lam = jnp.where(pg != 0, b2 * state.lam + (1 - b2) * gamma, state.lam)
        corrected = lam / (1 - b2**kf)
        switch_now = (pg != 0) & (k > 1) & (jnp.abs(corrected - gamma) < eps)

        in_sgd = state.switched
        out = _map(lambda a, b: jnp.where(in_sgd, a, b), sgd_step, p)
        new_switched = in_sgd | switch_now
        just = switch_now & ~in_sgd
        return out, SwatsState(
            k,
            _map(lambda a, b: jnp.where(in_sgd, a, b), state.mu, mu),
            _map(lambda a, b: jnp.where(in_sgd, a, b), state.nu, nu),
            # The SGD momentum starts at zero at the switch.
            _map(lambda a: jnp.where(in_sgd, a, jnp.zeros_like(a)), v),
            jnp.where(in_sgd, state.lam, lam),
            new_switched,
            jnp.where(just, k, state.switch_step).astype(count_dtype()),
            jnp.where(just, corrected, state.sgd_learning_rate).astype(real_dtype()),
        )

    return GradientTransformationExtraArgs(init_fn, update_fn)


# Checked when swats is built and by set_hyperparams (scale_by_swats checks the same when it is built).
SWATS_LIMITS = Limits(
    {"learning_rate": "positive_learning_rate", "b1": "probability", "b2": "probability", "eps": "nonnegative"}
)


def swats(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-9) -> GradientTransformationExtraArgs:
    """SWATS optimizer (Keskar & Socher, 2017): Adam that switches to SGD with the rate it estimated.

    Read the switch from the state with `optlab.swats_status(state)`:
    ``{"switched", "switch_step", "sgd_learning_rate"}``.

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> opt = optlab.swats(0.1)
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> updates, state = opt.update({"w": jnp.array([0.5, -3.0])}, opt.init(params), params)
      >>> [round(u, 4) for u in updates["w"].tolist()]  # it starts as Adam: -lr * g / |g|
      [-0.1, 0.1]
    """
    SWATS_LIMITS.check(locals())
    return with_limited_hyperparams(scale_by_swats, SWATS_LIMITS, learning_rate=learning_rate, b1=b1, b2=b2, eps=eps)


def swats_status(state) -> dict:
    """``{"switched", "switch_step", "sgd_learning_rate"}`` of the SWATS state inside ``state``.

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> opt = optlab.chain(optlab.clip_by_global_norm(1.0), optlab.swats(1e-3))
      >>> state = opt.init({"w": jnp.ones(2)})
      >>> {k: v.tolist() for k, v in optlab.swats_status(state).items()}
      {'switched': False, 'switch_step': 0, 'sgd_learning_rate': 0.0}
    """
    found = []

    def walk(node):
        if isinstance(node, SwatsState):
            found.append(node)
        elif isinstance(node, dict):
            for x in node.values():
                walk(x)
        elif isinstance(node, (tuple, list)):
            for x in node:
                walk(x)

    walk(state)
    if len(found) != 1:
        raise ValueError(f"expected one SWATS state in this optimizer state, found {len(found)}")
    s = found[0]
    return {"switched": s.switched, "switch_step": s.switch_step, "sgd_learning_rate": s.sgd_learning_rate}
