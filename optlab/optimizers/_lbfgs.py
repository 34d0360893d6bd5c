"""Full-batch L-BFGS with an optional strong-Wolfe line search (``torch.optim.LBFGS``).

One call of ``update`` is one L-BFGS iteration. The objective is reached
through the extra keyword argument ``value_fn`` (a value-and-grad function),
which the line search calls at trial points. Everything runs on the flattened
parameter vector with fixed-size history buffers, so the update jits once and
never retraces, and vmaps (the line search's loops run until every member of
the batch is finished).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from optlab import _checks
from optlab._base import GradientTransformationExtraArgs, check_same_structure, count_dtype, safe_increment
from optlab._hparams import Limits, with_limited_hyperparams

LINE_SEARCHES = ("strong_wolfe", None)

# Constants of torch.optim.LBFGS (not exposed there either).
_MIN_CURVATURE = 1e-10  # a pair (s, y) is stored only when y.s exceeds this
_C1 = 1e-4  # sufficient decrease (Armijo)
_C2 = 0.9  # curvature condition


class LbfgsState(NamedTuple):
    """State of `lbfgs` (inside the hyperparameter wrapper's ``inner_state``).

    Attributes:
      count: iterations run (int32), torch's ``n_iter``. Updates that return
        zero because the optimizer had already stopped are not counted.
      done: a stopping test fired (gradient, directional derivative, step or
        loss change below tolerance); every later update is zero. Initialise a
        new state to restart.
      direction: the search direction ``d`` of the last iteration.
      step_size: the step length ``t`` taken along it.
      prev_grad: the flat gradient at the start of the last iteration.
      prev_value: the loss there (NaN when it was not known).
      s_history, y_history: ring buffers ``(memory_size, n)`` of the stored
        pairs ``s = x_{k+1} - x_k`` and ``y = g_{k+1} - g_k``.
      rho_history: ``1 / (y . s)`` of each stored pair.
      num_pairs: pairs stored so far (int32); the newest is in row
        ``(num_pairs - 1) % memory_size``.
      hessian_scale: ``gamma = y.s / y.y`` of the newest pair: the initial inverse
        Hessian ``gamma * I`` of the two-loop recursion.
      line_search_evals: calls of ``value_fn`` made by the line search so far (int32).
    """

    count: jax.Array
    done: jax.Array
    direction: jax.Array
    step_size: jax.Array
    prev_grad: jax.Array
    prev_value: jax.Array
    s_history: jax.Array
    y_history: jax.Array
    rho_history: jax.Array
    num_pairs: jax.Array
    hessian_scale: jax.Array
    line_search_evals: jax.Array


# --- Python's min/max on scalars, NaN-behaviour included -------------------------------------
# torch's line search mixes Python floats and 0-d tensors with the builtins min and max;
# these give the same answers, NaN included (the builtins keep the first argument unless
# the second compares strictly smaller/larger).


def _py_min(a, b):
    return jnp.where(b < a, b, a)


def _py_max(a, b):
    return jnp.where(b > a, b, a)


def _sorted(a, b):
    return _py_min(a, b), _py_max(a, b)


def _cubic_minimizer(x1, f1, g1, x2, f2, g2, lo, hi):
    """Minimiser of the cubic through (x1, f1, f'=g1) and (x2, f2, f'=g2), clipped to [lo, hi].

    With :math:`d_1 = g_1 + g_2 - 3 (f_1 - f_2)/(x_1 - x_2)` and
    :math:`d_2 = \\sqrt{d_1^2 - g_1 g_2}`, the minimiser is
    :math:`x_2 - (x_2 - x_1)(g_2 + d_2 - d_1)/(g_2 - g_1 + 2 d_2)` (written from
    the larger of the two points); when :math:`d_1^2 < g_1 g_2` the cubic has no
    minimum and the midpoint of [lo, hi] is used (Nocedal & Wright, eq. 3.59).
    """
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2_square = d1**2 - g1 * g2
    real = d2_square >= 0
    d2 = jnp.sqrt(jnp.where(real, d2_square, 0))
    from_x2 = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
    from_x1 = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
    min_pos = jnp.where(x1 <= x2, from_x2, from_x1)
    return jnp.where(real, _py_min(_py_max(min_pos, lo), hi), (lo + hi) / 2.0)


# --- the strong-Wolfe line search ------------------------------------------------------------

_SEARCHING, _BRACKETED, _WOLFE = 0, 1, 2


def _strong_wolfe(obj, t, d, f, g, gtd, *, tolerance_change, max_iters):
    """Step length along ``d`` satisfying the strong Wolfe conditions.

    .. math::
        \\phi(t) \\le \\phi(0) + c_1 t \\phi'(0), \\qquad |\\phi'(t)| \\le c_2 |\\phi'(0)|,
        \\qquad \\phi(t) = f(x + t d)

    with :math:`c_1 = 10^{-4}`, :math:`c_2 = 0.9`. Nocedal & Wright (2006)
    Algorithm 3.5 (bracketing: grow the step by cubic extrapolation, between
    1.01x and 10x, until the interval [previous, current] must hold an
    acceptable point) then Algorithm 3.6 (zoom: shrink the bracket by
    safeguarded cubic interpolation). The branch structure and safeguards are
    those of ``torch.optim.lbfgs._strong_wolfe``: after the first trial step at
    most ``max_iters`` further evaluations; the zoom stops when the bracket is
    shorter than ``tolerance_change / max|d|``; without an acceptable point, the
    lowest point of the final bracket is returned (possibly t = 0).

    Returns ``(t, f(x + t d), grad f(x + t d), evaluations)``.
    """
    d_norm = jnp.max(jnp.abs(d))

    def probe(t):
        f_t, g_t = obj(t)
        return f_t, g_t, jnp.vdot(g_t, d)

    def bracketing_status(ls_iter, t, f_t, gtd_t, f_prev):
        too_high = (f_t > f + _C1 * t * gtd) | ((ls_iter > 1) & (f_t >= f_prev))
        flat_enough = jnp.abs(gtd_t) <= -_C2 * gtd
        uphill = gtd_t >= 0
        return jnp.where(too_high, _BRACKETED, jnp.where(flat_enough, _WOLFE, jnp.where(uphill, _BRACKETED, _SEARCHING)))

    # Phase 1: bracketing. The carry holds the current and previous trial points.
    f_t, g_t, gtd_t = probe(t)
    zero = jnp.zeros((), count_dtype())
    t_zero = jnp.zeros_like(t)
    carry = (zero, bracketing_status(zero, t, f_t, gtd_t, f), t, f_t, g_t, gtd_t, t_zero, f, g, gtd)

    def bracket_cond(c):
        ls_iter, status = c[0], c[1]
        return (status == _SEARCHING) & (ls_iter < max_iters)

    def bracket_body(c):
        ls_iter, _, t, f_t, g_t, gtd_t, t_prev, f_prev, _, gtd_prev = c
        t_next = _cubic_minimizer(t_prev, f_prev, gtd_prev, t, f_t, gtd_t, t + 0.01 * (t - t_prev), t * 10)
        f_next, g_next, gtd_next = probe(t_next)
        ls_iter = ls_iter + 1
        status = bracketing_status(ls_iter, t_next, f_next, gtd_next, f_t)
        return (ls_iter, status, t_next, f_next, g_next, gtd_next, t, f_t, g_t, gtd_t)

    ls_iter, status, t, f_t, g_t, gtd_t, t_prev, f_prev, g_prev, gtd_prev = lax.while_loop(
        bracket_cond, bracket_body, carry
    )

    # The bracket: out of evaluations -> [0, t] (torch checks no condition at the last
    # point); an acceptable point -> the degenerate [t, t]; otherwise [previous, current].
    out_of_evals = ls_iter == max_iters
    wolfe = (status == _WOLFE) & ~out_of_evals
    first_t = jnp.where(out_of_evals, t_zero, jnp.where(wolfe, t, t_prev))
    first_f = jnp.where(out_of_evals, f, jnp.where(wolfe, f_t, f_prev))
    first_g = jnp.where(out_of_evals, g, jnp.where(wolfe, g_t, g_prev))
    first_gtd = jnp.where(out_of_evals, gtd, jnp.where(wolfe, gtd_t, gtd_prev))
    b_t = jnp.stack([first_t, t])
    b_f = jnp.stack([first_f, f_t])
    b_g = jnp.stack([first_g, g_t])
    b_gtd = jnp.stack([first_gtd, gtd_t])
    low = jnp.where(b_f[0] <= b_f[1], 0, 1)

    # Phase 2: zoom. b_t[low] is the lower end of the bracket, returned at the end.
    def zoom_cond(c):
        ls_iter, done, _, b_t, *_ = c
        too_short = jnp.abs(b_t[1] - b_t[0]) * d_norm < tolerance_change
        return ~done & (ls_iter < max_iters) & ~too_short

    def zoom_body(c):
        ls_iter, done, insufficient, b_t, b_f, b_g, b_gtd, low = c
        high = 1 - low
        t = _cubic_minimizer(b_t[0], b_f[0], b_gtd[0], b_t[1], b_f[1], b_gtd[1], *_sorted(b_t[0], b_t[1]))
        # Safeguard: a trial point within 10% of the bracket's length from an end is
        # accepted once; the next time in a row (or at once if it is at or outside an
        # end) it is moved to 10% inside the nearer end, so that the bracket shrinks.
        b_lo, b_hi = _sorted(b_t[0], b_t[1])
        margin = 0.1 * (b_hi - b_lo)
        near_end = _py_min(b_hi - t, t - b_lo) < margin
        must_move = insufficient | (t >= b_hi) | (t <= b_lo)
        moved = jnp.where(jnp.abs(t - b_hi) < jnp.abs(t - b_lo), b_hi - margin, b_lo + margin)
        t = jnp.where(near_end & must_move, moved, t)
        insufficient = near_end & ~must_move

        f_t, g_t, gtd_t = probe(t)
        ls_iter = ls_iter + 1
        too_high = (f_t > f + _C1 * t * gtd) | (f_t >= b_f[low])
        accept = ~too_high & (jnp.abs(gtd_t) <= -_C2 * gtd)
        # The derivative says the minimum lies between the new point and the old low
        # point: that low point becomes the high end.
        swap = ~too_high & ~accept & (gtd_t * (b_t[high] - b_t[low]) >= 0)
        replaced = jnp.where(too_high, high, low)

        def put(b, new):
            b = b.at[high].set(jnp.where(swap, b[low], b[high]))
            return b.at[replaced].set(new)

        b_t, b_f, b_g, b_gtd = put(b_t, t), put(b_f, f_t), put(b_g, g_t), put(b_gtd, gtd_t)
        low = jnp.where(too_high, jnp.where(b_f[0] <= b_f[1], 0, 1), low)
        return ls_iter, done | accept, insufficient, b_t, b_f, b_g, b_gtd, low

    ls_iter, _, _, b_t, b_f, b_g, _, low = lax.while_loop(
        zoom_cond, zoom_body, (ls_iter, wolfe, jnp.asarray(False), b_t, b_f, b_g, b_gtd, low)
    )
    return b_t[low], b_f[low], b_g[low], ls_iter + 1


# --- the two-loop recursion ------------------------------------------------------------------


def _two_loop_direction(grad, s_hist, y_hist, rho, num_pairs, gamma):
    """``d = -H g`` for the L-BFGS inverse Hessian ``H`` built from the stored pairs.

    Nocedal (1980); Nocedal & Wright (2006) Algorithm 7.4. From the newest pair
    to the oldest, :math:`\\alpha_i = \\rho_i s_i^\\top q,\\; q \\leftarrow q - \\alpha_i y_i`
    (starting from :math:`q = -g`); then :math:`r = \\gamma q` and, from the
    oldest pair to the newest, :math:`\\beta_i = \\rho_i y_i^\\top r,\\; r
    \\leftarrow r + (\\alpha_i - \\beta_i) s_i`. The loops always run over all
    ``memory_size`` rows, masking those not filled yet, so their length is fixed.
    """
    memory = s_hist.shape[0]
    stored = jnp.minimum(num_pairs, memory)

    def newest_first(j, carry):
        q, alpha = carry
        row = (num_pairs - 1 - j) % memory
        a = jnp.vdot(s_hist[row], q) * rho[row]
        used = j < stored
        q = jnp.where(used, q - a * y_hist[row], q)
        return q, alpha.at[row].set(jnp.where(used, a, 0))

    q, alpha = lax.fori_loop(0, memory, newest_first, (-grad, jnp.zeros_like(rho)))

    def oldest_first(j, r):
        row = (num_pairs - stored + j) % memory
        b = jnp.vdot(y_hist[row], r) * rho[row]
        return jnp.where(j < stored, r + (alpha[row] - b) * s_hist[row], r)

    return lax.fori_loop(0, memory, oldest_first, q * gamma)


# --- the optimizer ---------------------------------------------------------------------------


# The one hyperparameter kept in the state; set_hyperparams checks new values against it.
LBFGS_LIMITS = Limits({"learning_rate": "positive_learning_rate"})


def lbfgs(
    learning_rate=1.0,
    memory_size: int = 10,
    line_search: str | None = "strong_wolfe",
    *,
    tolerance_grad: float = 1e-7,
    tolerance_change: float = 1e-9,
    max_line_search_evals: int = 25,
) -> GradientTransformationExtraArgs:
    """L-BFGS (Liu & Nocedal, 1989), one iteration per update, as ``torch.optim.LBFGS``.

    Call it as ``update(grads, state, params, value_fn=value_fn, value=loss)``,
    where ``value_fn(params) -> (loss, grads)`` is a value-and-grad function of
    the parameters (e.g. ``jax.value_and_grad(loss_fn)``), ``grads`` is the
    gradient at ``params`` and ``value`` (optional) the loss there; without
    ``value`` it is computed with ``value_fn``. The line search needs
    ``value_fn``; ``line_search=None`` needs only ``grads`` (and uses the loss,
    when given, for the loss-change stopping test). The returned update is
    ``x_{k+1} - x_k = t_k d_k``: apply it with ``optlab.apply_updates``.

    Iteration :math:`k` with gradient :math:`g_k` at :math:`x_k`:

    1. Store the pair :math:`s = x_k - x_{k-1},\\; y = g_k - g_{k-1}` if
       :math:`y^\\top s > 10^{-10}` (keeping the last ``memory_size``), and then
       :math:`\\gamma = y^\\top s / y^\\top y`.
    2. :math:`d_k = -H_k g_k` by the two-loop recursion (Nocedal, 1980), with
       :math:`H^0_k = \\gamma I`; :math:`d_0 = -g_0`.
    3. Initial step :math:`t = \\eta \\min(1, 1/\\|g_0\\|_1)` on the first
       iteration, :math:`t = \\eta` afterwards (:math:`\\eta` = ``learning_rate``).
       With ``line_search="strong_wolfe"`` the step is then chosen by a line
       search for the strong Wolfe conditions (:math:`c_1 = 10^{-4}, c_2 = 0.9`;
       Nocedal & Wright, 2006, Algorithms 3.5 and 3.6, with cubic
       interpolation); with ``None`` it is used as is.
    4. :math:`x_{k+1} = x_k + t d_k`.

    Stopping tests (torch's) set ``state.done``, after which updates are zero:
    :math:`\\max|g_k| \\le` ``tolerance_grad`` (no step);
    :math:`g_k^\\top d_k > -` ``tolerance_change`` (no step);
    :math:`\\max|t d_k| \\le` ``tolerance_change`` or a loss change
    :math:`|f_{k+1} - f_k| <` ``tolerance_change`` (after the step; without a
    line search the loss change is seen at the next update, from ``value`` or
    ``value_fn``, and skipped when neither is given).

    One update is one ``torch.optim.LBFGS(lr, max_iter=1, history_size=
    memory_size, line_search_fn=line_search, max_eval=1 + max_line_search_evals)
    .step(closure)`` until a stopping test fires, and ``k`` updates are one step
    with ``max_iter=k`` (whose iterations apply the stopping tests), as long as
    no line search exhausts its evaluations (torch's iterations share one
    ``max_eval``). ``max_line_search_evals`` is torch's ``max_ls``: the number of
    evaluations after the first trial step, so a line search calls ``value_fn``
    at most ``max_line_search_evals + 1`` times.

    The parameters are flattened (``jax.flatten_util.ravel_pytree``); the
    history is two ``(memory_size, n)`` buffers in the dtype of the parameters
    (at least float32). ``learning_rate`` is stored in the state as a
    hyperparameter (``optlab.hyperparams`` / ``optlab.set_hyperparams``);
    ``memory_size``, ``line_search`` and the tolerances are fixed.

    References: Nocedal, "Updating quasi-Newton matrices with limited storage",
    Math. Comp. 35 (1980); Liu & Nocedal, "On the limited memory BFGS method for
    large scale optimization", Math. Prog. 45 (1989); Nocedal & Wright,
    *Numerical Optimization*, 2nd ed. (2006), ch. 3 and 7.

    Example (Rosenbrock's function, minimum at (1, 1)):
      >>> import jax, jax.numpy as jnp
      >>> from optlab.optimizers._lbfgs import lbfgs
      >>> def rosenbrock(p):
      ...     return (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2
      >>> value_fn = jax.value_and_grad(rosenbrock)
      >>> opt = lbfgs(line_search="strong_wolfe")
      >>> params = jnp.array([-1.5, 2.0])
      >>> state = opt.init(params)
      >>> @jax.jit
      ... def step(params, state):
      ...     loss, grads = value_fn(params)
      ...     updates, state = opt.update(grads, state, params, value_fn=value_fn, value=loss)
      ...     return params + updates, state
      >>> for _ in range(50):
      ...     params, state = step(params, state)
      >>> print(jnp.round(params, 3))
      [1. 1.]
    """
    LBFGS_LIMITS.check(locals())
    _checks.check_int("memory_size", memory_size, minimum=1)
    _checks.check_choice("line_search", line_search, LINE_SEARCHES)
    _checks.check_nonnegative("tolerance_grad", tolerance_grad)
    _checks.check_nonnegative("tolerance_change", tolerance_change)
    _checks.check_int("max_line_search_evals", max_line_search_evals, minimum=1)
    memory_size = int(memory_size)
    max_line_search_evals = int(max_line_search_evals)

    def build(learning_rate):
        return _lbfgs_core(
            learning_rate, memory_size, line_search, tolerance_grad, tolerance_change, max_line_search_evals
        )

    return with_limited_hyperparams(build, LBFGS_LIMITS, learning_rate=learning_rate)


def _flat_dtype(flat):
    return jnp.promote_types(flat.dtype, jnp.float32)


def _lbfgs_core(learning_rate, memory_size, line_search, tolerance_grad, tolerance_change, max_ls):
    def init_fn(params):
        _checks.check_params_dtypes("lbfgs", params)
        flat, _ = ravel_pytree(params)
        dtype = _flat_dtype(flat)
        n = flat.size
        if n == 0:
            # Its convergence tests take a max over the gradient: nothing to take it over.
            raise ValueError("lbfgs needs at least one parameter element; the parameter tree is empty")
        # No buffer twice in the state: a step that donates it would fail.
        return LbfgsState(
            count=jnp.zeros([], count_dtype()),
            done=jnp.asarray(False),
            direction=jnp.zeros((n,), dtype),
            step_size=jnp.zeros((), dtype),
            prev_grad=jnp.zeros((n,), dtype),
            prev_value=jnp.full((), jnp.nan, dtype),
            s_history=jnp.zeros((memory_size, n), dtype),
            y_history=jnp.zeros((memory_size, n), dtype),
            rho_history=jnp.zeros((memory_size,), dtype),
            num_pairs=jnp.zeros([], count_dtype()),
            hessian_scale=jnp.ones((), dtype),
            line_search_evals=jnp.zeros([], count_dtype()),
        )

    def update_fn(updates, state, params=None, *, value_fn: Callable | None = None, value: Any = None, **extra):
        if params is None:
            raise ValueError("lbfgs needs the parameters: call update(grads, state, params, value_fn=...)")
        if line_search is not None and value_fn is None:
            others = f" (got extra arguments {sorted(extra)})" if extra else ""
            raise TypeError(
                f"lbfgs(line_search={line_search!r}).update needs the keyword argument `value_fn`, "
                f"a function params -> (loss, grads) such as jax.value_and_grad(loss_fn){others}"
            )
        if value_fn is not None and not callable(value_fn):
            raise TypeError(f"`value_fn` (={value_fn!r}) must be a function params -> (loss, grads)")
        check_same_structure(updates, params, "gradient")

        x, unravel = ravel_pytree(params)
        dtype = state.direction.dtype
        x = x.astype(dtype)
        g = ravel_pytree(updates)[0].astype(dtype)
        if g.shape != state.direction.shape:
            raise ValueError(
                f"lbfgs state was initialised for {state.direction.size} parameters, got {g.size}; "
                "call init with the same parameter tree"
            )
        lr = jnp.asarray(learning_rate).astype(dtype)

        def evaluate(at):
            loss, grads = value_fn(unravel(at))
            return jnp.asarray(loss).astype(dtype), ravel_pytree(grads)[0].astype(dtype)

        # The loss at x, computed only where it is used (inside the branch that iterates,
        # unless the loss-change test needs it first).
        if value is not None:
            given_f = jnp.asarray(value).astype(dtype)
            current_f = lambda: given_f  # noqa: E731
        elif value_fn is not None:
            given_f = None
            current_f = lambda: evaluate(x)[0]  # noqa: E731
        else:
            given_f = None
            current_f = lambda: jnp.full((), jnp.nan, dtype)  # noqa: E731

        # Without a line search, the loss change of the last step is only known now.
        stalled = jnp.asarray(False)
        if line_search is None and (value is not None or value_fn is not None):
            if given_f is None:
                given_f = current_f()
                current_f = lambda: given_f  # noqa: E731
            stalled = (state.count > 0) & (jnp.abs(given_f - state.prev_value) < tolerance_change)

        gradient_small = jnp.max(jnp.abs(g)) <= tolerance_grad
        stop_now = state.done | gradient_small | stalled

        def stay(state):
            return jnp.zeros_like(x), state._replace(done=jnp.asarray(True))

        def iterate(state):
            first = state.count == 0
            f = current_f()

            # 1. curvature pair from the last step
            y = g - state.prev_grad
            s = state.direction * state.step_size
            ys = jnp.vdot(y, s)
            keep = ~first & (ys > _MIN_CURVATURE)
            row = state.num_pairs % memory_size
            s_hist = state.s_history.at[row].set(jnp.where(keep, s, state.s_history[row]))
            y_hist = state.y_history.at[row].set(jnp.where(keep, y, state.y_history[row]))
            rho = state.rho_history.at[row].set(jnp.where(keep, 1.0 / ys, state.rho_history[row]))
            num_pairs = jnp.where(keep, state.num_pairs + 1, state.num_pairs)
            gamma = jnp.where(keep, ys / jnp.vdot(y, y), jnp.where(first, 1, state.hessian_scale)).astype(dtype)

            # 2. direction (d = -g on the first iteration: no pairs, gamma = 1)
            d = _two_loop_direction(g, s_hist, y_hist, rho, num_pairs, gamma)

            # 3. step length
            inv_l1 = 1.0 / jnp.sum(jnp.abs(g))
            t_init = jnp.where(first, _py_min(jnp.ones((), dtype), inv_l1) * lr, lr)
            gtd = jnp.vdot(g, d)
            descent = gtd <= -tolerance_change
            if line_search == "strong_wolfe":

                def search(_):
                    t_ls, f_ls, _, n = _strong_wolfe(
                        lambda t_: evaluate(x + t_ * d),
                        t_init,
                        d,
                        f,
                        g,
                        gtd,
                        tolerance_change=tolerance_change,
                        max_iters=max_ls,
                    )
                    return t_ls, f_ls, n

                # A direction that is not downhill is not searched: torch stops first.
                t, f_new, evals = lax.cond(
                    descent, search, lambda _: (t_init, f, jnp.zeros((), count_dtype())), None
                )
                little_change = jnp.abs(f_new - f) < tolerance_change
            else:
                t = t_init
                evals = jnp.zeros((), count_dtype())
                little_change = jnp.asarray(False)

            # 4. the step, and the stopping tests that look at it
            step = jnp.where(descent, t * d, 0)
            tiny_step = jnp.max(jnp.abs(step)) <= tolerance_change
            done = ~descent | tiny_step | little_change
            new_state = LbfgsState(
                count=safe_increment(state.count),
                done=done,
                direction=d,
                step_size=t,
                prev_grad=g,
                prev_value=f,
                s_history=s_hist,
                y_history=y_hist,
                rho_history=rho,
                num_pairs=num_pairs,
                hessian_scale=gamma,
                line_search_evals=state.line_search_evals + evals,
            )
            return step, new_state

        step, new_state = lax.cond(stop_now, stay, iterate, state)
        return unravel(step), new_state

    return GradientTransformationExtraArgs(init_fn, update_fn)
