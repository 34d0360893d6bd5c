"""Per-coordinate adaptive preconditioners: AdaGrad, RMSProp, Adam, AdaDelta, Rprop, adaptive gains.

Each block turns gradients into a step *direction* (learning rate applied
later by `scale_by_learning_rate`), except Rprop whose step sizes are its
own state. Formulas follow PyTorch's single-tensor code paths operation by
operation so that trajectories agree to float32 round-off.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optlab import _checks
from optlab.schedules._core import real_dtype
from optlab._base import (
    GradientTransformationExtraArgs,
    leaf_scalars,
    safe_increment,
    step_counter,
    tree_zeros_like,
)


def _map(fn, *trees):
    return jax.tree_util.tree_map(fn, *trees)


def _square(g, slot):
    # g^2 in the wider of the gradient's and the state's dtypes: with float32 state
    # for bfloat16 parameters the square is taken in float32, not rounded to bfloat16.
    g = g.astype(jnp.promote_types(g.dtype, slot.dtype))
    return g * g


# --- AdaGrad ---------------------------------------------------------------------------------


class AdagradState(NamedTuple):
    count: jax.Array | None  # None unless an initial value or lr_decay needs the step
    sum_of_squares: Any


def scale_by_adagrad(
    initial_accumulator_value=0.0, eps=1e-10, lr_decay=0.0, *, accumulator_dtype=None
) -> GradientTransformationExtraArgs:
    """AdaGrad's direction (Duchi, Hazan & Singer, 2011, JMLR 12).

    .. math:: s_t = s_{t-1} + g_t^2, \\qquad u_t = \\frac{g_t}{(\\sqrt{s_t} + \\epsilon)(1 + (t-1)\\,\\eta_{decay})}

    with :math:`s_0` = ``initial_accumulator_value``, as ``torch.optim.Adagrad``
    (whose ``lr_decay`` divides the learning rate; folded in here). A literal
    ``0`` for ``initial_accumulator_value`` or ``lr_decay`` compiles that
    feature out; without either, no step counter is kept. ``accumulator_dtype``
    sets the dtype of :math:`s` (float32 for bfloat16 parameters); by default
    it is the parameters' own.

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> tx = optlab.scale_by_adagrad()
      >>> state = tx.init({"w": jnp.zeros(1)})
      >>> _, state = tx.update({"w": jnp.array([3.0])}, state)
      >>> updates, state = tx.update({"w": jnp.array([4.0])}, state)
      >>> round(float(updates["w"][0]), 4)  # 4 / sqrt(3^2 + 4^2)
      0.8
    """
    _checks.check_nonnegative("initial_accumulator_value", initial_accumulator_value)
    _checks.check_nonnegative("eps", eps)
    _checks.check_nonnegative("lr_decay", lr_decay)
    from_init = not _checks.is_zero(initial_accumulator_value)
    decayed = not _checks.is_zero(lr_decay)
    accumulator_dtype = _checks.check_float_dtype("accumulator_dtype", accumulator_dtype)

    def init_fn(params):
        _checks.check_params_dtypes("scale_by_adagrad", params)
        return AdagradState(step_counter(from_init or decayed), tree_zeros_like(params, accumulator_dtype))

    def update_fn(updates, state, params=None, **extra):
        del params, extra
        decay = 1.0 + state.count.astype(real_dtype()) * lr_decay if decayed else None
        hp = leaf_scalars(state.sum_of_squares, init=initial_accumulator_value, eps=eps, decay=decay, count=state.count)

        def accumulate(s, g, h):
            # The accumulator takes its initial value on the first update, so a changed
            # `initial_accumulator_value` (set_hyperparams before training) is honoured.
            # From zero, the select would change nothing: it is left out. The float32
            # initial value must not widen a bfloat16 accumulator: the state keeps its dtype.
            dtype = s.dtype
            if from_init:
                s = jnp.where(h["count"] == 0, h["init"], s)
            return (s + _square(g, s)).astype(dtype)

        s = _map(accumulate, state.sum_of_squares, updates, hp)

        def direction(g, s, h):
            u = g / (jnp.sqrt(s) + h["eps"])
            return (u / h["decay"] if decayed else u).astype(g.dtype)

        out = _map(direction, updates, s, hp)
        return out, AdagradState(safe_increment(state.count), s)

    return GradientTransformationExtraArgs(init_fn, update_fn)


# --- RMSProp ---------------------------------------------------------------------------------


class RmsState(NamedTuple):
    # No step counter: RMSProp never reads one (see optlab._base.step_counter).
    square_avg: Any
    grad_avg: Any  # () unless centered


def scale_by_rms(
    alpha=0.99, eps=1e-8, centered: bool = False, eps_in_sqrt: bool = False, *, accumulator_dtype=None
) -> GradientTransformationExtraArgs:
    """RMSProp's direction (Tieleman & Hinton, 2012, Lecture 6.5).

    .. math:: r_t = \\alpha r_{t-1} + (1-\\alpha) g_t^2, \\qquad u_t = \\frac{g_t}{\\sqrt{r_t} + \\epsilon}

    ``centered=True`` (Graves, 2013) also tracks :math:`m_t = \\alpha m_{t-1} +
    (1-\\alpha) g_t` and divides by :math:`\\sqrt{r_t - m_t^2} + \\epsilon`.
    ``eps_in_sqrt=True`` divides by :math:`\\sqrt{\\epsilon + r_t}` instead,
    Goodfellow et al. (2016) Algorithm 8.5. The default matches ``torch.optim.RMSprop``.
    ``accumulator_dtype`` sets the dtype of :math:`r` and :math:`m` (float32 for
    bfloat16 parameters); by default it is the parameters' own.

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> tx = optlab.scale_by_rms(alpha=0.99)
      >>> updates, state = tx.update({"w": jnp.array([0.5, -3.0])}, tx.init({"w": jnp.zeros(2)}))
      >>> [round(u, 4) for u in updates["w"].tolist()]  # g / sqrt((1 - alpha) g^2) = 10 sign(g)
      [10.0, -10.0]
    """
    _checks.check_probability("alpha", alpha)
    _checks.check_nonnegative("eps", eps)
    accumulator_dtype = _checks.check_float_dtype("accumulator_dtype", accumulator_dtype)

    def init_fn(params):
        _checks.check_params_dtypes("scale_by_rms", params)
        zeros = lambda: tree_zeros_like(params, accumulator_dtype)  # noqa: E731
        return RmsState(zeros(), zeros() if centered else ())

    def update_fn(updates, state, params=None, **extra):
        del params, extra
        hp = leaf_scalars(state.square_avg, alpha=alpha, eps=eps)
        sq = _map(
            lambda r, g, h: (h["alpha"] * r + (1 - h["alpha"]) * _square(g, r)).astype(r.dtype),
            state.square_avg,
            updates,
            hp,
        )
        if centered:
            ga = _map(lambda m, g, h: (m + (1 - h["alpha"]) * (g - m)).astype(m.dtype), state.grad_avg, updates, hp)
            var = _map(lambda r, m: r - m * m, sq, ga)
        else:
            ga, var = (), sq
        if eps_in_sqrt:
            out = _map(lambda g, v, h: (g / jnp.sqrt(v + h["eps"])).astype(g.dtype), updates, var, hp)
        else:
            out = _map(lambda g, v, h: (g / (jnp.sqrt(v) + h["eps"])).astype(g.dtype), updates, var, hp)
        return out, RmsState(sq, ga)

    return GradientTransformationExtraArgs(init_fn, update_fn)


# --- Adam ------------------------------------------------------------------------------------


class AdamState(NamedTuple):
    count: jax.Array | None  # None without bias correction
    mu: Any
    nu: Any
    nu_max: Any  # () unless amsgrad


def scale_by_adam(
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    *,
    bias_correction: bool = True,
    amsgrad: bool = False,
    mu_dtype=None,
) -> GradientTransformationExtraArgs:
    """Adam's direction (Kingma & Ba, 2015, "Adam: A Method for Stochastic Optimization").

    .. math::
        m_t = \\beta_1 m_{t-1} + (1-\\beta_1) g_t, \\quad
        v_t = \\beta_2 v_{t-1} + (1-\\beta_2) g_t^2, \\quad
        u_t = \\frac{m_t / (1-\\beta_1^t)}{\\sqrt{v_t} / \\sqrt{1-\\beta_2^t} + \\epsilon}

    ``bias_correction=False`` drops both :math:`1-\\beta^t` factors (the
    lectures' "Adam without bias correction"). ``amsgrad=True`` (Reddi, Kale &
    Kumar, 2018) uses :math:`\\hat v_t = \\max(\\hat v_{t-1}, v_t)` in the
    denominator, keeping the maximum of the *uncorrected* second moment as
    ``torch.optim.Adam`` does. ``mu_dtype`` sets the dtype of both moments
    (e.g. float32 moments for bfloat16 parameters).

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> tx = optlab.scale_by_adam()
      >>> updates, state = tx.update({"w": jnp.array([0.5, -3.0])}, tx.init({"w": jnp.zeros(2)}))
      >>> [round(u, 4) for u in updates["w"].tolist()]  # bias-corrected first step: g / |g|
      [1.0, -1.0]
    """
    _checks.check_probability("b1", b1)
    _checks.check_probability("b2", b2)
    _checks.check_nonnegative("eps", eps)
    mu_dtype = _checks.check_float_dtype("mu_dtype", mu_dtype)

    def init_fn(params):
        _checks.check_params_dtypes("scale_by_adam", params)
        return AdamState(
            step_counter(bias_correction),
            tree_zeros_like(params, mu_dtype),
            tree_zeros_like(params, mu_dtype),
            tree_zeros_like(params, mu_dtype) if amsgrad else (),
        )

    def update_fn(updates, state, params=None, **extra):
        del params, extra
        # m + (1 - b1) (g - m) is how PyTorch updates the first moment (lerp).
        if bias_correction:
            # The corrections as reciprocals, computed once: XLA turns a division by a
            # scalar into a multiplication by its reciprocal anyway, and written out the
            # reciprocals fuse into two scalar kernels (optax's number) instead of four.
            # The barrier keeps 1 / sqrt(.) from being rewritten into rsqrt, which rounds
            # differently from PyTorch's sqrt-then-divide.
            t = safe_increment(state.count).astype(real_dtype())
            inv_bc1, inv_bc2_sqrt = 1 / (1 - b1**t), 1 / jax.lax.optimization_barrier(jnp.sqrt(1 - b2**t))
        else:
            inv_bc1 = inv_bc2_sqrt = None
        hp = leaf_scalars(state.mu, b1=b1, b2=b2, eps=eps, inv_bc1=inv_bc1, inv_bc2_sqrt=inv_bc2_sqrt)
        mu = _map(lambda m, g, h: (m + (1 - h["b1"]) * (g - m)).astype(m.dtype), state.mu, updates, hp)
        nu = _map(
            lambda v, g, h: (h["b2"] * v + (1 - h["b2"]) * _square(g, v)).astype(v.dtype), state.nu, updates, hp
        )
        nu_max = _map(jnp.maximum, state.nu_max, nu) if amsgrad else ()
        denom_v = nu_max if amsgrad else nu

        def direction(g, m, v, h):
            if bias_correction:
                return ((m * h["inv_bc1"]) / (jnp.sqrt(v) * h["inv_bc2_sqrt"] + h["eps"])).astype(g.dtype)
            return (m / (jnp.sqrt(v) + h["eps"])).astype(g.dtype)

        out = _map(direction, updates, mu, denom_v, hp)
        return out, AdamState(safe_increment(state.count), mu, nu, nu_max)

    return GradientTransformationExtraArgs(init_fn, update_fn)


# --- AdaDelta --------------------------------------------------------------------------------


class AdadeltaState(NamedTuple):
    # No step counter: AdaDelta never reads one.
    square_avg: Any
    acc_delta: Any


def scale_by_adadelta(rho=0.9, eps=1e-6, *, accumulator_dtype=None) -> GradientTransformationExtraArgs:
    """AdaDelta's direction (Zeiler, 2012, "ADADELTA: An Adaptive Learning Rate Method").

    .. math::
        r_t = \\rho r_{t-1} + (1-\\rho) g_t^2, \\quad
        \\Delta_t = \\frac{\\sqrt{a_{t-1} + \\epsilon}}{\\sqrt{r_t + \\epsilon}} g_t, \\quad
        a_t = \\rho a_{t-1} + (1-\\rho) \\Delta_t^2

    The learning rate (``torch.optim.Adadelta``'s, default 1.0) multiplies
    :math:`\\Delta_t` afterwards. ``accumulator_dtype`` sets the dtype of
    :math:`r` and :math:`a` (float32 for bfloat16 parameters); by default it is
    the parameters' own.

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> tx = optlab.scale_by_adadelta(rho=0.9, eps=1e-6)
      >>> updates, state = tx.update({"w": jnp.array([0.5, -3.0])}, tx.init({"w": jnp.zeros(2)}))
      >>> [round(u, 5) for u in updates["w"].tolist()]  # first step: about sqrt(eps / (1 - rho)) sign(g)
      [0.00316, -0.00316]
    """
    _checks.check_probability("rho", rho)
    _checks.check_nonnegative("eps", eps)
    accumulator_dtype = _checks.check_float_dtype("accumulator_dtype", accumulator_dtype)

    def init_fn(params):
        _checks.check_params_dtypes("scale_by_adadelta", params)
        return AdadeltaState(tree_zeros_like(params, accumulator_dtype), tree_zeros_like(params, accumulator_dtype))

    def update_fn(updates, state, params=None, **extra):
        del params, extra
        hp = leaf_scalars(state.square_avg, rho=rho, eps=eps)
        sq = _map(
            lambda r, g, h: (h["rho"] * r + (1 - h["rho"]) * _square(g, r)).astype(r.dtype),
            state.square_avg,
            updates,
            hp,
        )
        delta = _map(
            lambda a, r, g, h: jnp.sqrt(a + h["eps"]) / jnp.sqrt(r + h["eps"]) * g, state.acc_delta, sq, updates, hp
        )
        acc = _map(lambda a, d, h: (h["rho"] * a + (1 - h["rho"]) * (d * d)).astype(a.dtype), state.acc_delta, delta, hp)
        out = _map(lambda d, g: d.astype(g.dtype), delta, updates)
        return out, AdadeltaState(sq, acc)

    return GradientTransformationExtraArgs(init_fn, update_fn)


# --- Rprop -----------------------------------------------------------------------------------


class RpropState(NamedTuple):
    count: jax.Array
    prev_grad: Any
    step_size: Any


def scale_by_rprop(learning_rate=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50.0)) -> GradientTransformationExtraArgs:
    """Resilient backpropagation (Riedmiller & Braun, 1993), as ``torch.optim.Rprop``.

    Each weight keeps its own step size :math:`\\Delta`, started at ``learning_rate``:

    .. math::
        \\Delta_t = \\operatorname{clip}(\\Delta_{t-1} \\cdot \\begin{cases}
        \\eta^+ & g_t g_{t-1} > 0 \\\\ \\eta^- & g_t g_{t-1} < 0 \\\\ 1 & \\text{else}\\end{cases},
        \\Delta_{min}, \\Delta_{max}), \\qquad u_t = -\\operatorname{sign}(g_t) \\Delta_t

    and after a sign change the gradient is forgotten (no step, and the next
    comparison sees zero). The emitted update is final (already negative):
    do not follow this block by a learning rate.

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> tx = optlab.scale_by_rprop(0.1)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> _, state = tx.update({"w": jnp.array([1.0, 1.0])}, state)
      >>> updates, state = tx.update({"w": jnp.array([2.0, -2.0])}, state)
      >>> [round(s, 4) for s in state.step_size["w"].tolist()]  # sign kept: 0.1 * 1.2; flipped: 0.1 * 0.5
      [0.12, 0.05]
      >>> round(float(updates["w"][0]), 4)  # -sign(g) * step (the flipped weight takes no step)
      -0.12
    """
    _checks.check_learning_rate(learning_rate, positive=True)
    eta_minus, eta_plus = _checks.check_pair("etas", etas)
    step_min, step_max = _checks.check_pair("step_sizes", step_sizes)
    _checks.check_range("etas[0]", eta_minus, 0.0, 1.0, lo_open=True, hi_open=True)
    _checks.check_range("etas[1]", eta_plus, 1.0, float("inf"), lo_open=True)
    _checks.check_nonnegative("step_sizes[0]", step_min)
    _checks.check_positive("step_sizes[1]", step_max)
    lo, hi = _checks.concrete(step_min), _checks.concrete(step_max)
    if lo is not None and hi is not None and (lo > hi).any():
        raise ValueError(f"`step_sizes` (={step_sizes!r}) must be (minimum, maximum) with minimum <= maximum")

    def init_fn(params):
        _checks.check_params_dtypes("scale_by_rprop", params)
        return RpropState(step_counter(), tree_zeros_like(params), tree_zeros_like(params))

    def update_fn(updates, state, params=None, **extra):
        del params, extra
        # etas and step_sizes may be traced pairs: unpack them per leaf (see leaf_scalars).
        hp = leaf_scalars(state.step_size, lr=learning_rate, etas=etas, step_sizes=step_sizes, count=state.count)

        def new_step(g, prev, step, h):
            (eta_minus, eta_plus), (step_min, step_max) = h["etas"], h["step_sizes"]
            step = jnp.where(h["count"] == 0, jnp.asarray(h["lr"], step.dtype), step)
            prod = g * prev
            factor = jnp.where(prod > 0, eta_plus, jnp.where(prod < 0, eta_minus, 1.0))
            return jnp.clip(step * factor, step_min, step_max).astype(step.dtype)

        step = _map(new_step, updates, state.prev_grad, state.step_size, hp)
        # After a sign change the gradient is zeroed: no step now, no comparison next time.
        prev = _map(lambda g, p: jnp.where(g * p < 0, 0.0, g).astype(p.dtype), updates, state.prev_grad)
        u = _map(lambda g, st, orig: (-jnp.sign(g) * st).astype(orig.dtype), prev, step, updates)
        return u, RpropState(safe_increment(state.count), prev, step)

    return GradientTransformationExtraArgs(init_fn, update_fn)


# --- adaptive per-weight gains ---------------------------------------------------------------


class GainsState(NamedTuple):
    # No step counter: the gains never read one.
    gains: Any
    prev_grad: Any


def scale_by_adaptive_gains(increase=0.05, decrease=0.05, min_gain=0.01, max_gain=100.0) -> GradientTransformationExtraArgs:
    """Per-weight adaptive gains (Hinton, Neural Networks for Machine Learning, Lecture 6.4; Jacobs, 1988).

    .. math::
        \\gamma_t = \\operatorname{clip}\\Big(\\begin{cases} \\gamma_{t-1} + \\kappa & g_t g_{t-1} > 0 \\\\
        \\gamma_{t-1} (1 - \\phi) & g_t g_{t-1} < 0 \\\\ \\gamma_{t-1} & \\text{else}\\end{cases},
        \\gamma_{min}, \\gamma_{max}\\Big), \\qquad u_t = \\gamma_t g_t

    Gains start at 1; at the first step (no previous gradient) they are kept.
    Additive increase and multiplicative decrease make big gains collapse fast
    when oscillation starts.

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> tx = optlab.scale_by_adaptive_gains(increase=0.05, decrease=0.05)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> _, state = tx.update({"w": jnp.array([1.0, -2.0])}, state)
      >>> updates, state = tx.update({"w": jnp.array([1.0, 2.0])}, state)
      >>> [round(u, 4) for u in updates["w"].tolist()]  # gains 1 + 0.05 (same sign), 1 * 0.95 (flipped)
      [1.05, 1.9]
    """
    _checks.check_nonnegative("increase", increase)
    _checks.check_range("decrease", decrease, 0.0, 1.0, hi_open=True)
    _checks.check_positive("min_gain", min_gain)
    _checks.check_positive("max_gain", max_gain)
    a, b = _checks.concrete(min_gain), _checks.concrete(max_gain)
    if a is not None and b is not None and (a > b).any():
        raise ValueError(f"`min_gain` (={min_gain!r}) must not exceed `max_gain` (={max_gain!r})")

    def init_fn(params):
        _checks.check_params_dtypes("scale_by_adaptive_gains", params)
        return GainsState(_map(jnp.ones_like, params), tree_zeros_like(params))

    def update_fn(updates, state, params=None, **extra):
        del params, extra

        hp = leaf_scalars(state.gains, increase=increase, decrease=decrease, min_gain=min_gain, max_gain=max_gain)

        def gain(g, prev, k, h):
            prod = g * prev
            k = jnp.where(prod > 0, k + h["increase"], jnp.where(prod < 0, k * (1 - h["decrease"]), k))
            return jnp.clip(k, h["min_gain"], h["max_gain"]).astype(prev.dtype)

        gains = _map(gain, updates, state.prev_grad, state.gains, hp)
        out = _map(lambda g, k: (k * g).astype(g.dtype), updates, gains)
        prev = _map(lambda g, p: g.astype(p.dtype), updates, state.prev_grad)
        return out, GainsState(gains, prev)

    return GradientTransformationExtraArgs(init_fn, update_fn)
