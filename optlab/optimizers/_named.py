"""The named optimizers: short chains of building blocks with their hyperparameters in the state.

Each function validates its (concrete) arguments against its table of
`Limits`, then hands a ``build`` function, the numeric hyperparameters and the
limits to `with_limited_hyperparams`, which keeps them in the optimizer state
(the values as data, the limits as static structure that `set_hyperparams`
checks new values against; see ``optlab/_hparams.py``). A literal
``0`` for an optional feature (weight decay, momentum) compiles it out; pass an
array to keep it in and make it settable. Defaults are PyTorch's.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optlab import _checks
from optlab._base import GradientTransformationExtraArgs, chain, identity
from optlab._hparams import Limits, with_limited_hyperparams
from optlab.transforms import _adaptive, _momentum, _scaling

ScalarOrSchedule = Any


def _off(value):
    """None (compiled out) for a literal zero, else the value itself."""
    return None if _checks.is_zero(value) else value


# The allowed range of each hyperparameter, per optimizer: checked when the optimizer is
# built (`LIMITS.check(locals())` checks every argument named in it) and by set_hyperparams.
_LR = {"learning_rate": "learning_rate"}
SGD_LIMITS = Limits({**_LR, "momentum": "unit", "dampening": "unit", "weight_decay": "nonnegative"})
MOMENTUM_LIMITS = Limits({**_LR, "momentum": "probability"})
ADAGRAD_LIMITS = Limits(
    {**_LR, "lr_decay": "nonnegative", "weight_decay": "nonnegative", "initial_accumulator_value": "nonnegative",
     "eps": "nonnegative"}
)
RMSPROP_LIMITS = Limits(
    {**_LR, "alpha": "probability", "eps": "nonnegative", "weight_decay": "nonnegative", "momentum": "probability"}
)
ADAM_LIMITS = Limits(
    {**_LR, "b1": "probability", "b2": "probability", "eps": "nonnegative", "weight_decay": "nonnegative"}
)
ADADELTA_LIMITS = Limits({**_LR, "rho": "probability", "eps": "nonnegative", "weight_decay": "nonnegative"})
RPROP_LIMITS = Limits({"learning_rate": "positive_learning_rate"})
GAINS_LIMITS = Limits(
    {**_LR, "increase": "nonnegative", "decrease": "probability", "min_gain": "positive", "max_gain": "positive"}
)


def _negate():
    return _scaling.scale(-1.0)


def _ascending(tx, maximize: bool):
    """``tx`` fed the negated gradient when ``maximize`` (torch's ``maximize=True``, which negates
    the gradient before anything else, weight decay included); the state is ``tx``'s own.

    (`sgd` had ``maximize`` first, as a ``scale(-1)`` slot of its chain; it keeps that slot so
    that the structure of its state, and of the runs checkpointed with it, stays the same.)"""
    if not maximize:
        return tx

    def update_fn(updates, state, params=None, **extra):
        return tx.update(jax.tree_util.tree_map(jnp.negative, updates), state, params, **extra)

    return GradientTransformationExtraArgs(tx.init, update_fn)


def sgd(
    learning_rate: ScalarOrSchedule,
    momentum=0.0,
    dampening=0.0,
    weight_decay=0.0,
    nesterov: bool = False,
    maximize: bool = False,
    *,
    accumulator_dtype=None,
) -> GradientTransformationExtraArgs:
    """Stochastic gradient descent with optional momentum, as ``torch.optim.SGD``.

    .. math::
        g_t \\leftarrow \\pm g_t + \\lambda w_{t-1}, \\quad
        b_t = \\mu b_{t-1} + (1-\\tau) g_t \\;(b_1 = g_1), \\quad
        w_t = w_{t-1} - \\eta \\,(g_t + \\mu b_t \\text{ if nesterov else } b_t)

    Robbins & Monro (1951); momentum Polyak (1964); Nesterov in the form of
    Sutskever et al. (2013). ``maximize`` ascends instead. ``accumulator_dtype``
    sets the momentum buffer's dtype (float32 for bfloat16 parameters); by
    default it is the parameters' own.

    Example:
      >>> import jax, jax.numpy as jnp, optlab
      >>> opt = optlab.sgd(0.1, momentum=0.9)
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> state = opt.init(params)
      >>> grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
      >>> updates, state = opt.update(grads, state, params)
      >>> params = optlab.apply_updates(params, updates)
      >>> [round(w, 4) for w in params["w"].tolist()]  # w - 0.1 * 2w (the buffer starts as g)
      [0.8, -1.6]
    """
    SGD_LIMITS.check(locals())
    _checks.check_float_dtype("accumulator_dtype", accumulator_dtype)
    if nesterov:
        m, d = _checks.concrete(momentum), _checks.concrete(dampening)
        if (m is not None and (m <= 0).any()) or (d is not None and (d != 0).any()):
            raise ValueError(
                f"nesterov momentum requires a momentum > 0 and zero dampening, got `momentum` (={momentum!r}),"
                f" `dampening` (={dampening!r})"
            )

    def build(learning_rate, momentum=None, dampening=None, weight_decay=None):
        return chain(
            _negate() if maximize else identity(),
            _scaling.add_decayed_weights(weight_decay) if weight_decay is not None else identity(),
            _momentum.trace(momentum, 0.0 if dampening is None else dampening, nesterov, accumulator_dtype)
            if momentum is not None
            else identity(),
            _scaling.scale_by_learning_rate(learning_rate),
        )

    mom = _off(momentum)
    return with_limited_hyperparams(
        build,
        SGD_LIMITS,
        learning_rate=learning_rate,
        momentum=mom,
        dampening=None if mom is None else _off(dampening),
        weight_decay=_off(weight_decay),
    )


def classical_momentum(
    learning_rate: ScalarOrSchedule, momentum=0.9, *, accumulator_dtype=None
) -> GradientTransformationExtraArgs:
    """Classical momentum, learning rate inside the velocity: ``v = mu*v - lr*g; w += v``.

    Goodfellow, Bengio & Courville (2016), Algorithm 8.2. Equals
    ``sgd(lr, momentum)`` for a constant learning rate (PyTorch's buffer is
    ``-v / lr``); they differ when the learning rate changes during training.
    ``accumulator_dtype`` sets the velocity's dtype (float32 for bfloat16
    parameters).

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> opt = optlab.classical_momentum(0.1, momentum=0.9)
      >>> params = {"w": jnp.zeros(1)}
      >>> state = opt.init(params)
      >>> for _ in range(2):
      ...     updates, state = opt.update({"w": jnp.ones(1)}, state, params)
      >>> round(float(updates["w"][0]), 4)  # v_2 = 0.9 * (-0.1) - 0.1
      -0.19
    """
    MOMENTUM_LIMITS.check(locals())
    _checks.check_float_dtype("accumulator_dtype", accumulator_dtype)
    return with_limited_hyperparams(
        lambda learning_rate, momentum: _momentum.scale_by_classical_momentum(
            learning_rate, momentum, accumulator_dtype=accumulator_dtype
        ),
        MOMENTUM_LIMITS,
        learning_rate=learning_rate,
        momentum=momentum,
    )


def nesterov_momentum(
    learning_rate: ScalarOrSchedule, momentum=0.9, *, accumulator_dtype=None
) -> GradientTransformationExtraArgs:
    """Nesterov momentum (Goodfellow et al. 2016, Alg. 8.3; Sutskever et al. 2013), reparametrised.

    ``v = mu*v - lr*g(w); w += -mu*v_prev + (1+mu)*v``: the stored parameters
    are the look-ahead points, so one gradient per step suffices. See
    `optlab.transforms.scale_by_nesterov_momentum` for the derivation.
    ``accumulator_dtype`` sets the velocity's dtype (float32 for bfloat16
    parameters).

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> opt = optlab.nesterov_momentum(0.1, momentum=0.9)
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> updates, state = opt.update({"w": jnp.array([1.0, -2.0])}, opt.init(params), params)
      >>> [round(u, 4) for u in updates["w"].tolist()]  # (1 + mu) * v_1, v_1 = -lr * g
      [-0.19, 0.38]
    """
    MOMENTUM_LIMITS.check(locals())
    _checks.check_float_dtype("accumulator_dtype", accumulator_dtype)
    return with_limited_hyperparams(
        lambda learning_rate, momentum: _momentum.scale_by_nesterov_momentum(
            learning_rate, momentum, accumulator_dtype=accumulator_dtype
        ),
        MOMENTUM_LIMITS,
        learning_rate=learning_rate,
        momentum=momentum,
    )


def adagrad(
    learning_rate: ScalarOrSchedule = 1e-2,
    lr_decay=0.0,
    weight_decay=0.0,
    initial_accumulator_value=0.0,
    eps=1e-10,
    *,
    maximize: bool = False,
    accumulator_dtype=None,
) -> GradientTransformationExtraArgs:
    """AdaGrad (Duchi, Hazan & Singer, 2011), as ``torch.optim.Adagrad``.

    .. math:: s_t = s_{t-1} + g_t^2, \\quad w_t = w_{t-1} - \\frac{\\eta}{1 + (t-1)\\,\\eta_{decay}} \\frac{g_t}{\\sqrt{s_t} + \\epsilon}

    ``accumulator_dtype`` sets the dtype of :math:`s` (float32 for bfloat16
    parameters: a sum of squares kept in bfloat16 stops growing once it is
    256 times the size of a new term).
    ``maximize=True`` ascends: the gradient is negated before anything else
    (weight decay included), as with torch's ``maximize``.

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> opt = optlab.adagrad(0.1)
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> updates, state = opt.update({"w": jnp.array([0.5, -3.0])}, opt.init(params), params)
      >>> [round(u, 4) for u in updates["w"].tolist()]  # first step: -lr * g / |g|
      [-0.1, 0.1]
    """
    ADAGRAD_LIMITS.check(locals())
    _checks.check_float_dtype("accumulator_dtype", accumulator_dtype)

    def build(learning_rate, eps, lr_decay=None, initial_accumulator_value=None, weight_decay=None):
        return _ascending(
            chain(
                _scaling.add_decayed_weights(weight_decay) if weight_decay is not None else identity(),
                _adaptive.scale_by_adagrad(
                    0.0 if initial_accumulator_value is None else initial_accumulator_value,
                    eps,
                    0.0 if lr_decay is None else lr_decay,
                    accumulator_dtype=accumulator_dtype,
                ),
                _scaling.scale_by_learning_rate(learning_rate),
            ),
            maximize,
        )

    return with_limited_hyperparams(
        build,
        ADAGRAD_LIMITS,
        learning_rate=learning_rate,
        lr_decay=_off(lr_decay),
        initial_accumulator_value=_off(initial_accumulator_value),
        eps=eps,
        weight_decay=_off(weight_decay),
    )


def rmsprop(
    learning_rate: ScalarOrSchedule = 1e-2,
    alpha=0.99,
    eps=1e-8,
    weight_decay=0.0,
    momentum=0.0,
    centered: bool = False,
    eps_in_sqrt: bool = False,
    *,
    maximize: bool = False,
    accumulator_dtype=None,
) -> GradientTransformationExtraArgs:
    """RMSProp (Tieleman & Hinton, 2012), as ``torch.optim.RMSprop``.

    .. math::
        r_t = \\alpha r_{t-1} + (1-\\alpha) g_t^2, \\quad
        b_t = \\mu b_{t-1} + \\frac{g_t}{\\sqrt{r_t} + \\epsilon}, \\quad w_t = w_{t-1} - \\eta b_t

    (without momentum, :math:`b_t` is the fraction itself). ``centered``
    subtracts the squared mean gradient (Graves, 2013); ``eps_in_sqrt=True``
    uses :math:`\\sqrt{\\epsilon + r_t}`, Goodfellow et al. (2016) Algorithm 8.5.
    RMSProp with momentum (Alg. 8.6 in spirit) is ``rmsprop(momentum=0.9)``.
    ``accumulator_dtype`` sets the dtype of the averages and the momentum
    buffer (float32 for bfloat16 parameters); the buffer then sums directions
    rounded to the parameters' dtype, as every block of a chain emits its
    update in the dtype of the gradient it was given.
    ``maximize=True`` ascends: the gradient is negated before anything else
    (weight decay included), as with torch's ``maximize``.

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> opt = optlab.rmsprop(0.01, alpha=0.99)
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> updates, state = opt.update({"w": jnp.array([0.5, -3.0])}, opt.init(params), params)
      >>> [round(u, 4) for u in updates["w"].tolist()]  # g / sqrt((1 - alpha) g^2) = 10 sign(g)
      [-0.1, 0.1]
    """
    RMSPROP_LIMITS.check(locals())
    _checks.check_float_dtype("accumulator_dtype", accumulator_dtype)

    def build(learning_rate, alpha, eps, weight_decay=None, momentum=None):
        return _ascending(
            chain(
                _scaling.add_decayed_weights(weight_decay) if weight_decay is not None else identity(),
                _adaptive.scale_by_rms(
                    alpha, eps, centered=centered, eps_in_sqrt=eps_in_sqrt, accumulator_dtype=accumulator_dtype
                ),
                _momentum.trace(momentum, accumulator_dtype=accumulator_dtype) if momentum is not None else identity(),
                _scaling.scale_by_learning_rate(learning_rate),
            ),
            maximize,
        )

    return with_limited_hyperparams(
        build,
        RMSPROP_LIMITS,
        learning_rate=learning_rate,
        alpha=alpha,
        eps=eps,
        weight_decay=_off(weight_decay),
        momentum=_off(momentum),
    )


def adam(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=0.0,
    amsgrad: bool = False,
    bias_correction: bool = True,
    *,
    maximize: bool = False,
    mu_dtype=None,
) -> GradientTransformationExtraArgs:
    """Adam (Kingma & Ba, 2015) with coupled L2 weight decay, as ``torch.optim.Adam``.

    .. math::
        g_t \\leftarrow g_t + \\lambda w_{t-1}, \\quad
        w_t = w_{t-1} - \\eta \\frac{m_t / (1-\\beta_1^t)}{\\sqrt{v_t / (1-\\beta_2^t)} + \\epsilon}

    ``bias_correction=False`` is the lectures' Adam without bias correction;
    ``amsgrad=True`` is AMSGrad (Reddi et al., 2018) as PyTorch implements it.
    ``mu_dtype`` sets the moments' dtype (float32 moments for bfloat16 weights).
    ``maximize=True`` ascends: the gradient is negated before anything else
    (weight decay included), as with torch's ``maximize``.

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> opt = optlab.adam(0.1)
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> updates, state = opt.update({"w": jnp.array([0.5, -3.0])}, opt.init(params), params)
      >>> [round(u, 4) for u in updates["w"].tolist()]  # bias-corrected first step: -lr * g / |g|
      [-0.1, 0.1]
    """
    ADAM_LIMITS.check(locals())
    _checks.check_float_dtype("mu_dtype", mu_dtype)

    def build(learning_rate, b1, b2, eps, weight_decay=None):
        return _ascending(
            chain(
                _scaling.add_decayed_weights(weight_decay) if weight_decay is not None else identity(),
                _adaptive.scale_by_adam(
                    b1, b2, eps, bias_correction=bias_correction, amsgrad=amsgrad, mu_dtype=mu_dtype
                ),
                _scaling.scale_by_learning_rate(learning_rate),
            ),
            maximize,
        )

    return with_limited_hyperparams(
        build, ADAM_LIMITS, learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=_off(weight_decay)
    )


def adamw(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=1e-2,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
    mu_dtype=None,
) -> GradientTransformationExtraArgs:
    """AdamW: Adam with decoupled weight decay (Loshchilov & Hutter, 2019), as ``torch.optim.AdamW``.

    .. math:: w_t = w_{t-1} - \\eta \\Big(\\frac{\\hat m_t}{\\sqrt{\\hat v_t} + \\epsilon} + \\lambda w_{t-1}\\Big)

    The decay is scaled by the learning rate (and its schedule), as in PyTorch.
    ``maximize=True`` ascends: the gradient is negated before anything else
    (weight decay included), as with torch's ``maximize``.

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> opt = optlab.adamw(0.1, weight_decay=0.5)
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> updates, state = opt.update({"w": jnp.array([0.5, -3.0])}, opt.init(params), params)
      >>> [round(u, 4) for u in updates["w"].tolist()]  # -lr * (g / |g| + wd * w)
      [-0.15, 0.2]
    """
    ADAM_LIMITS.check(locals())
    _checks.check_float_dtype("mu_dtype", mu_dtype)

    def build(learning_rate, b1, b2, eps, weight_decay=None):
        return _ascending(
            chain(
                _adaptive.scale_by_adam(b1, b2, eps, amsgrad=amsgrad, mu_dtype=mu_dtype),
                _scaling.add_decayed_weights(weight_decay) if weight_decay is not None else identity(),
                _scaling.scale_by_learning_rate(learning_rate),
            ),
            maximize,
        )

    return with_limited_hyperparams(
        build, ADAM_LIMITS, learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=_off(weight_decay)
    )


def adadelta(
    learning_rate: ScalarOrSchedule = 1.0,
    rho=0.9,
    eps=1e-6,
    weight_decay=0.0,
    *,
    maximize: bool = False,
    accumulator_dtype=None,
) -> GradientTransformationExtraArgs:
    """AdaDelta (Zeiler, 2012), as ``torch.optim.Adadelta``.

    .. math::
        r_t = \\rho r_{t-1} + (1-\\rho) g_t^2, \\quad
        \\Delta_t = \\frac{\\sqrt{a_{t-1}+\\epsilon}}{\\sqrt{r_t+\\epsilon}} g_t, \\quad
        a_t = \\rho a_{t-1} + (1-\\rho)\\Delta_t^2, \\quad w_t = w_{t-1} - \\eta \\Delta_t

    ``accumulator_dtype`` sets the dtype of :math:`r` and :math:`a` (float32
    for bfloat16 parameters).
    ``maximize=True`` ascends: the gradient is negated before anything else
    (weight decay included), as with torch's ``maximize``.

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> opt = optlab.adadelta(1.0, rho=0.9, eps=1e-6)
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> updates, state = opt.update({"w": jnp.array([0.5, -3.0])}, opt.init(params), params)
      >>> [round(u, 5) for u in updates["w"].tolist()]  # first step: about -sqrt(eps / (1 - rho)) sign(g)
      [-0.00316, 0.00316]
    """
    ADADELTA_LIMITS.check(locals())
    _checks.check_float_dtype("accumulator_dtype", accumulator_dtype)

    def build(learning_rate, rho, eps, weight_decay=None):
        return _ascending(
            chain(
                _scaling.add_decayed_weights(weight_decay) if weight_decay is not None else identity(),
                _adaptive.scale_by_adadelta(rho, eps, accumulator_dtype=accumulator_dtype),
                _scaling.scale_by_learning_rate(learning_rate),
            ),
            maximize,
        )

    return with_limited_hyperparams(
        build, ADADELTA_LIMITS, learning_rate=learning_rate, rho=rho, eps=eps, weight_decay=_off(weight_decay)
    )


def rprop(
    learning_rate=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50.0), *, maximize: bool = False
) -> GradientTransformationExtraArgs:
    """Rprop (Riedmiller & Braun, 1993), as ``torch.optim.Rprop``: steps on the first call.

    ``learning_rate`` is the initial per-weight step size; after that each
    weight's step grows by ``etas[1]`` while its gradient keeps its sign and
    shrinks by ``etas[0]`` when it flips, within ``step_sizes``. Meant for
    full-batch training. See `optlab.transforms.scale_by_rprop`.
    ``maximize=True`` ascends: the gradient is negated before anything else
    (weight decay included), as with torch's ``maximize``.

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> opt = optlab.rprop(0.1)
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> state = opt.init(params)
      >>> steps = []
      >>> for _ in range(3):  # the gradient keeps its sign: the step grows by etas[1] = 1.2
      ...     updates, state = opt.update({"w": jnp.array([0.5, -3.0])}, state, params)
      ...     steps.append(round(float(updates["w"][0]), 4))
      >>> steps
      [-0.1, -0.12, -0.144]
    """
    RPROP_LIMITS.check(locals())

    def build(learning_rate, etas, step_sizes):
        return _ascending(_adaptive.scale_by_rprop(learning_rate, etas, step_sizes), maximize)

    _adaptive.scale_by_rprop(learning_rate, etas, step_sizes)  # validates the pairs' values
    return with_limited_hyperparams(build, RPROP_LIMITS, learning_rate=learning_rate, etas=etas, step_sizes=step_sizes)


def adaptive_gains(
    learning_rate: ScalarOrSchedule, increase=0.05, decrease=0.05, min_gain=0.01, max_gain=100.0
) -> GradientTransformationExtraArgs:
    """SGD with per-weight adaptive gains (Hinton's lectures, 6.4; Jacobs, 1988).

    ``gain += increase`` when a weight's gradient keeps its sign,
    ``gain *= 1 - decrease`` when it flips, clipped to ``[min_gain, max_gain]``;
    ``w -= lr * gain * g``.

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> opt = optlab.adaptive_gains(0.1)
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> state = opt.init(params)
      >>> _, state = opt.update({"w": jnp.array([1.0, -2.0])}, state, params)
      >>> updates, state = opt.update({"w": jnp.array([1.0, 2.0])}, state, params)
      >>> [round(u, 4) for u in updates["w"].tolist()]  # gains 1 + 0.05 (same sign), 1 * 0.95 (flipped)
      [-0.105, -0.19]
    """
    GAINS_LIMITS.check(locals())

    def build(learning_rate, increase, decrease, min_gain, max_gain):
        return chain(
            _adaptive.scale_by_adaptive_gains(increase, decrease, min_gain, max_gain),
            _scaling.scale_by_learning_rate(learning_rate),
        )

    _adaptive.scale_by_adaptive_gains(increase, decrease, min_gain, max_gain)  # validates min_gain <= max_gain
    return with_limited_hyperparams(
        build,
        GAINS_LIMITS,
        learning_rate=learning_rate, increase=increase, decrease=decrease, min_gain=min_gain, max_gain=max_gain
    )
