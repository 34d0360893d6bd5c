"""Behaviour of every named optimizer.

* One table of optimizers crossed with three problems (a convex quadratic,
  Rosenbrock's function, a small MLP on a fixed synthetic classification set)
  and two parameter dtypes: the loss must fall below a fraction of its initial
  value after a fixed number of steps, with a learning rate chosen per
  optimizer and problem (found once by a small grid search; every run ends
  at least 2.5x below its threshold, in both dtypes, except the one
  documented override).
* dtypes: bfloat16 parameters stay bfloat16, the optimizer state keeps the
  dtypes it was initialised with, and ``mu_dtype=float32`` keeps float32 moments.
* Identities checked against independent NumPy simulations: Nesterov's
  reparametrisation against the look-ahead form, classical momentum against
  PyTorch's buffer form, and SWATS (Keskar & Socher 2017, Algorithm 1).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optlab

# --- problems ------------------------------------------------------------------------------

_H = jnp.array([1.0, 2.0, 4.0, 8.0])
_C = jnp.array([1.0, -1.0, 2.0, 0.5])


def quadratic(p):
    """0.5 * sum h_i (w_i - c_i)^2, condition number 8, minimum 0 at c."""
    return 0.5 * jnp.sum(_H * (p["w"].astype(jnp.float32) - _C) ** 2)


def rosenbrock(p):
    x, y = p["xy"].astype(jnp.float32)
    return (1 - x) ** 2 + 100 * (y - x * x) ** 2


def _classification_set():
    k1, k2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k1, (128, 4))
    teacher = jax.random.normal(k2, (4, 3))
    y = jnp.argmax(x @ teacher, -1)
    # A constant feature stands in for the first layer's bias (fewer leaves, faster compiles).
    return jnp.concatenate([x, jnp.ones((128, 1))], 1), jax.nn.one_hot(y, 3)


_X, _Y = _classification_set()


def mlp(p):
    """Cross-entropy of a 5-16-3 tanh MLP (the hidden bias lives in w1's last row)."""
    w1, w2 = p["w1"].astype(jnp.float32), p["w2"].astype(jnp.float32)
    logits = jnp.tanh(_X @ w1) @ w2
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * _Y, -1))


def _mlp_init(dtype):
    a, b = jax.random.split(jax.random.key(1))
    return {
        "w1": (0.5 * jax.random.normal(a, (5, 16))).astype(dtype),
        "w2": (0.25 * jax.random.normal(b, (16, 3))).astype(dtype),
    }


# name: (loss, params(dtype), steps, loss ratio final/initial to reach)
PROBLEMS = {
    "quadratic": (quadratic, lambda d: {"w": jnp.zeros(4, d)}, 100, 1e-3),
    # From the classic start (-1.2, 1), f = 24.2: the threshold needs the run to
    # have entered the curved valley and travelled well along it.
    "rosenbrock": (rosenbrock, lambda d: {"xy": jnp.array([-1.2, 1.0], d)}, 500, 0.1),
    "mlp": (mlp, _mlp_init, 200, 0.1),
}

# name: (factory(lr), {problem: lr})
OPTIMIZERS = {
    "sgd": (lambda lr: optlab.sgd(lr), dict(quadratic=0.1, rosenbrock=2e-3, mlp=2.0)),
    "sgd_momentum": (lambda lr: optlab.sgd(lr, momentum=0.9), dict(quadratic=0.03, rosenbrock=1e-3, mlp=0.3)),
    "sgd_nesterov": (
        lambda lr: optlab.sgd(lr, momentum=0.9, nesterov=True),
        dict(quadratic=0.1, rosenbrock=1e-3, mlp=0.3),
    ),
    "classical_momentum": (
        lambda lr: optlab.classical_momentum(lr, 0.9),
        dict(quadratic=0.03, rosenbrock=1e-3, mlp=0.3),
    ),
    "nesterov_momentum": (
        lambda lr: optlab.nesterov_momentum(lr, 0.9),
        dict(quadratic=0.1, rosenbrock=1e-3, mlp=0.3),
    ),
    "adagrad": (lambda lr: optlab.adagrad(lr), dict(quadratic=1.0, rosenbrock=1.0, mlp=0.3)),
    "rmsprop": (lambda lr: optlab.rmsprop(lr), dict(quadratic=0.05, rosenbrock=0.2, mlp=0.01)),
    "rmsprop_centered": (lambda lr: optlab.rmsprop(lr, centered=True), dict(quadratic=0.03, rosenbrock=0.03, mlp=0.01)),
    "rmsprop_momentum": (lambda lr: optlab.rmsprop(lr, momentum=0.9), dict(quadratic=0.01, rosenbrock=0.01, mlp=0.01)),
    "rmsprop_eps_in_sqrt": (
        lambda lr: optlab.rmsprop(lr, eps_in_sqrt=True),
        dict(quadratic=0.05, rosenbrock=0.2, mlp=0.01),
    ),
    "adam": (lambda lr: optlab.adam(lr), dict(quadratic=0.1, rosenbrock=0.3, mlp=0.03)),
    "adam_amsgrad": (lambda lr: optlab.adam(lr, amsgrad=True), dict(quadratic=0.1, rosenbrock=0.3, mlp=0.03)),
    "adam_no_bias_correction": (
        lambda lr: optlab.adam(lr, bias_correction=False),
        dict(quadratic=0.01, rosenbrock=0.1, mlp=0.01),
    ),
    "adamw": (lambda lr: optlab.adamw(lr), dict(quadratic=0.1, rosenbrock=0.1, mlp=0.03)),
    # AdaDelta's first steps are ~sqrt(eps) = 1e-3 whatever the gradient, so
    # with a fixed step budget it needs a large multiplier.
    "adadelta": (lambda lr: optlab.adadelta(lr), dict(quadratic=30.0, rosenbrock=3.0, mlp=10.0)),
    "rprop": (lambda lr: optlab.rprop(lr), dict(quadratic=0.01, rosenbrock=0.01, mlp=0.01)),
    "adaptive_gains": (lambda lr: optlab.adaptive_gains(lr), dict(quadratic=0.03, rosenbrock=1e-3, mlp=0.3)),
    "swats": (lambda lr: optlab.swats(lr), dict(quadratic=0.1, rosenbrock=0.3, mlp=0.03)),
}

# Known limits, not bugs: Rprop's sign-based steps cannot follow Rosenbrock's
# narrow valley on the bfloat16 grid (spacing 2^-7 near 1): it oscillates
# between two grid points at f ~ 4.3. It must still make real progress.
THRESHOLD_OVERRIDES = {("rprop", "rosenbrock", "bfloat16"): 0.25}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _run(opt, loss, params, steps):
    """``steps`` steps of ``opt`` on ``loss``; returns (losses, final params, final state)."""

    def step(carry, _):
        p, s = carry
        value, grads = jax.value_and_grad(loss)(p)
        updates, s = opt.update(grads, s, p)
        return (optlab.apply_updates(p, updates), s), value

    (p, s), values = jax.lax.scan(step, (params, opt.init(params)), None, steps)
    return values, p, s


@functools.lru_cache(maxsize=None)
def _results(name, problem):
    """Both dtypes' runs of one (optimizer, problem) pair, compiled as one program
    (about a third cheaper to compile than two)."""
    factory, lrs = OPTIMIZERS[name]
    loss, init, steps, _ = PROBLEMS[problem]

    def both(params):
        return {dt: _run(factory(lrs[problem]), loss, params[dt], steps)[:2] for dt in params}

    out = jax.jit(both)({dt: init(d) for dt, d in DTYPES.items()})
    return {dt: (np.asarray(values), final, float(loss(final))) for dt, (values, final) in out.items()}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_loss_decreases(name, problem, dtype):
    threshold = THRESHOLD_OVERRIDES.get((name, problem, dtype), PROBLEMS[problem][3])
    values, final, final_loss = _results(name, problem)[dtype]
    assert np.all(np.isfinite(values)), f"non-finite loss at step {np.argmin(np.isfinite(values))}"
    assert final_loss <= threshold * values[0], f"loss {values[0]:.4g} -> {final_loss:.4g} (needs ratio {threshold})"
    for leaf in jax.tree_util.tree_leaves(final):
        assert leaf.dtype == DTYPES[dtype]


# --- state dtypes --------------------------------------------------------------------------


def _dtypes_of(tree):
    return jax.tree_util.tree_map(lambda x: (tuple(x.shape), str(x.dtype)), tree)


def _counters(state) -> dict:
    """The step counters in a state: every leaf stored in a field named ``count``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    return {jax.tree_util.keystr(path): leaf for path, leaf in flat if getattr(path[-1], "name", None) == "count"}


# How many step counters each optimizer keeps: one where the update reads it (Adam's bias
# correction, AdaGrad's initial value and lr_decay, Rprop's first step, a damped momentum's
# first step, a schedule), none elsewhere; optax keeps the same ones.
COUNTERS = [
    ("sgd", lambda: optlab.sgd(0.1), 0),
    ("sgd-momentum", lambda: optlab.sgd(0.1, momentum=0.9), 0),
    ("nesterov", lambda: optlab.sgd(0.1, momentum=0.9, nesterov=True), 0),
    ("sgd-dampening", lambda: optlab.sgd(0.1, momentum=0.9, dampening=0.5), 1),
    ("sgd-schedule", lambda: optlab.sgd(optlab.schedules.cosine(0.1, 10), momentum=0.9), 1),
    ("classical-momentum", lambda: optlab.classical_momentum(0.1), 0),
    ("adagrad", lambda: optlab.adagrad(0.1), 0),
    ("adagrad-lr-decay", lambda: optlab.adagrad(0.1, lr_decay=0.01), 1),
    ("adagrad-initial-value", lambda: optlab.adagrad(0.1, initial_accumulator_value=0.1), 1),
    ("rmsprop-centered", lambda: optlab.rmsprop(0.01, momentum=0.9, centered=True), 0),
    ("adam", lambda: optlab.adam(1e-3), 1),
    ("adam-schedule", lambda: optlab.adam(optlab.schedules.cosine(1e-3, 10)), 2),
    ("adamw", lambda: optlab.adamw(1e-3), 1),
    ("adadelta", lambda: optlab.adadelta(), 0),
    ("rprop", lambda: optlab.rprop(), 1),
    ("adaptive-gains", lambda: optlab.adaptive_gains(0.1), 0),
    ("decoupled-weight-decay", lambda: optlab.decoupled_weight_decay(0.1, 0.01), 0),
    ("decoupled-weight-decay-schedule", lambda: optlab.decoupled_weight_decay(0.1, optlab.schedules.cosine(0.01, 10)), 1),
]


@pytest.mark.parametrize("name,make,expected", COUNTERS, ids=[c[0] for c in COUNTERS])
def test_step_counters_are_kept_only_where_the_update_reads_them(name, make, expected):
    # An unread counter would still cost a compiled kernel per step (optlab._base.step_counter).
    tx = make()
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    assert len(_counters(state)) == expected, _counters(state)
    for _ in range(3):
        _, state = jax.jit(tx.update)(params, state, params)
    assert all(int(c) == 3 for c in _counters(state).values())


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_update_keeps_state_dtypes(name, dtype):
    """Documented dtypes: step counters int32, hyperparameters float32, per-parameter
    slots in the parameters' dtype, and an update returns a state of the same dtypes."""
    factory, lrs = OPTIMIZERS[name]
    opt = factory(lrs["quadratic"])
    dt = DTYPES[dtype]
    params = {"w": jnp.ones((3,), dt), "b": jnp.full((2,), 0.5, dt)}
    grads = {"w": jnp.array([0.5, -1.0, 2.0], dt), "b": jnp.array([1.0, -0.25], dt)}
    state0 = jax.eval_shape(opt.init, params)
    updates, state1 = jax.eval_shape(lambda: opt.update(grads, opt.init(params), params))

    assert all(leaf.dtype == jnp.int32 for leaf in _counters(state0).values())
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(state0.hyperparams))
    for leaf in jax.tree_util.tree_leaves(state0.inner_state):
        if leaf.ndim > 0:  # per-parameter slots
            assert leaf.dtype == dt, _dtypes_of(state0.inner_state)
    assert _dtypes_of(updates) == _dtypes_of(params)
    assert _dtypes_of(state1) == _dtypes_of(state0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: optlab.adam(1e-2, mu_dtype=jnp.float32),
        lambda: optlab.adam(1e-2, amsgrad=True, mu_dtype=jnp.float32),
        lambda: optlab.adamw(1e-2, mu_dtype=jnp.float32),
    ],
    ids=["adam", "adam_amsgrad", "adamw"],
)
def test_mu_dtype_keeps_float32_moments_for_bfloat16_params(make):
    opt = make()
    b1, b2 = 0.9, 0.999
    grads = jax.random.normal(jax.random.key(3), (20, 5)).astype(jnp.bfloat16)
    params = {"w": jnp.ones(5, jnp.bfloat16)}

    def run(params):
        def step(carry, g):
            p, s = carry
            u, s = opt.update({"w": g}, s, p)
            return (optlab.apply_updates(p, u), s), u["w"]

        return jax.lax.scan(step, (params, opt.init(params)), grads)

    (final, state), updates = jax.jit(run)(params)
    assert final["w"].dtype == jnp.bfloat16 and updates.dtype == jnp.bfloat16
    (adam_state,) = [x for x in state.inner_state if isinstance(x, optlab.transforms.AdamState)]
    moments = [adam_state.mu["w"], adam_state.nu["w"]]
    if isinstance(adam_state.nu_max, dict):
        moments.append(adam_state.nu_max["w"])
    assert all(m.dtype == jnp.float32 for m in moments)
    # float32 accuracy: the EMAs of the (bfloat16-exact) gradients, computed in
    # float64, agree to ~1e-6; bfloat16 moments would be off by ~1e-3.
    g = np.asarray(grads, np.float64)
    mu = np.zeros(5)
    nu = np.zeros(5)
    for gt in g:
        mu = b1 * mu + (1 - b1) * gt
        nu = b2 * nu + (1 - b2) * gt * gt
    np.testing.assert_allclose(np.asarray(adam_state.mu["w"]), mu, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(adam_state.nu["w"]), nu, rtol=2e-5, atol=1e-9)


# Transforms whose per-parameter state depends on the gradients alone (no coupled weight
# decay), and the name of their state-dtype argument.
STATE_DTYPE = [
    ("sgd-momentum", "accumulator_dtype", lambda **dtype: optlab.sgd(0.1, momentum=0.9, **dtype)),
    ("sgd-nesterov", "accumulator_dtype", lambda **dtype: optlab.sgd(0.1, momentum=0.9, nesterov=True, **dtype)),
    ("sgd-dampening", "accumulator_dtype", lambda **dtype: optlab.sgd(0.1, momentum=0.9, dampening=0.5, **dtype)),
    ("classical_momentum", "accumulator_dtype", lambda **dtype: optlab.classical_momentum(0.1, **dtype)),
    ("nesterov_momentum", "accumulator_dtype", lambda **dtype: optlab.nesterov_momentum(0.1, **dtype)),
    ("adagrad", "accumulator_dtype", lambda **dtype: optlab.adagrad(0.1, **dtype)),
    ("adagrad-initial", "accumulator_dtype", lambda **dtype: optlab.adagrad(0.1, initial_accumulator_value=0.1, **dtype)),
    ("rmsprop", "accumulator_dtype", lambda **dtype: optlab.rmsprop(0.01, **dtype)),
    ("rmsprop-centered", "accumulator_dtype", lambda **dtype: optlab.rmsprop(0.01, centered=True, **dtype)),
    ("adadelta", "accumulator_dtype", lambda **dtype: optlab.adadelta(**dtype)),
    ("adam", "mu_dtype", lambda **dtype: optlab.adam(1e-2, **dtype)),
    ("adamw", "mu_dtype", lambda **dtype: optlab.adamw(1e-2, **dtype)),
    # 60 steps of 7: the state ends holding a sum of 4 gradients.
    ("accumulate_gradients", "accumulator_dtype", lambda **dtype: optlab.accumulate_gradients(optlab.identity(), 7, **dtype)),
]


def _slots(state):
    return [x for x in jax.tree_util.tree_leaves(state) if x.ndim > 0]


@pytest.mark.parametrize(("arg", "factory"), [(a, f) for _, a, f in STATE_DTYPE], ids=[n for n, _, _ in STATE_DTYPE])
def test_float32_state_for_bfloat16_params_is_float32_accurate(arg, factory):
    def make(dt):
        return factory(**{arg: dt})

    # bfloat16 parameters with float32 state must keep the state a float32 run keeps on the
    # same gradients; the control, the state left in bfloat16, must not.
    grads = jax.random.normal(jax.random.key(5), (60, 7)).astype(jnp.bfloat16)  # bfloat16-exact values

    def run(opt, dtype):
        params = {"w": jnp.linspace(-1.0, 1.0, 7).astype(dtype)}

        def step(carry, g):
            p, s = carry
            u, s = opt.update({"w": g.astype(dtype)}, s, p)
            return (optlab.apply_updates(p, u), s), u["w"]

        (final, state), updates = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), grads))(params)
        return final["w"], updates, state

    final, updates, state = run(make(jnp.float32), jnp.bfloat16)
    assert final.dtype == jnp.bfloat16 and updates.dtype == jnp.bfloat16
    assert {x.dtype for x in _slots(state)} == {jnp.dtype(jnp.float32)}
    _, _, reference = run(make(None), jnp.float32)
    _, _, control = run(make(None), jnp.bfloat16)
    assert {x.dtype for x in _slots(control)} == {jnp.dtype(jnp.bfloat16)}
    for got, want, low in zip(_slots(state), _slots(reference), _slots(control)):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6 * scale)
        assert float(jnp.max(jnp.abs(low.astype(jnp.float32) - want))) > 1e-4 * scale


@pytest.mark.parametrize(("arg", "factory"), [(a, f) for _, a, f in STATE_DTYPE], ids=[n for n, _, _ in STATE_DTYPE])
def test_state_dtype_must_be_a_floating_dtype(arg, factory):
    for bad in ("flot32", "int32"):
        with pytest.raises(ValueError, match=f"`{arg}` \\(='{bad}'\\) must be None or a floating-point dtype"):
            factory(**{arg: bad})


# --- momentum identities -------------------------------------------------------------------

_A = np.array([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]])
_B = np.array([1.0, -2.0, 0.5])


def _np_quadratic_grad(w):
    return _A @ w - _B


def _np_rosenbrock_grad(w):
    x, y = w
    return np.array([-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)])


def _jax_quadratic(p):
    w = p["w"]
    return 0.5 * w @ (jnp.asarray(_A, jnp.float32) @ w) - jnp.asarray(_B, jnp.float32) @ w


def _jax_rosenbrock(p):
    x, y = p["w"]
    return (1 - x) ** 2 + 100 * (y - x * x) ** 2


@functools.lru_cache(maxsize=None)
def _trajectory_fn(opt_name, problem, steps):
    """Jitted: (lr, w0) -> the stored parameters after each of ``steps`` steps."""
    make = {"nesterov_momentum": optlab.nesterov_momentum, "classical_momentum": optlab.classical_momentum}[opt_name]
    loss = {"quadratic": _jax_quadratic, "rosenbrock": _jax_rosenbrock}[problem]

    def run(lr, w0):
        opt = make(lr, 0.9)

        def step(carry, _):
            p, s = carry
            u, s = opt.update(jax.grad(loss)(p), s, p)
            p = optlab.apply_updates(p, u)
            return (p, s), p["w"]

        params = {"w": w0}
        return jax.lax.scan(step, (params, opt.init(params)), None, steps)[1]

    return jax.jit(run)


@pytest.mark.parametrize(
    "problem,grad,w0,lr",
    [
        ("quadratic", _np_quadratic_grad, [1.0, 1.0, -1.0], 0.1),
        ("rosenbrock", _np_rosenbrock_grad, [-1.2, 1.0], 1e-3),
    ],
)
def test_nesterov_momentum_is_the_look_ahead_form_reparametrised(problem, grad, w0, lr):
    """Goodfellow et al. (2016) Alg. 8.3: v <- mu v - lr grad(w + mu v); w <- w + v.
    The stored parameters are the look-ahead points w_t + mu v_t."""
    mu, steps = 0.9, 30
    w = np.array(w0, np.float64)
    v = np.zeros_like(w)
    look_ahead, iterates = [], []
    for _ in range(steps):
        v = mu * v - lr * grad(w + mu * v)
        w = w + v
        look_ahead.append(w + mu * v)
        iterates.append(w.copy())
    got = np.asarray(_trajectory_fn("nesterov_momentum", problem, steps)(lr, jnp.array(w0, jnp.float32)))
    np.testing.assert_allclose(got, np.array(look_ahead), rtol=1e-4, atol=1e-5)
    # The look-ahead points differ from the plain iterates w_t by far more than the tolerance.
    assert np.max(np.abs(got - np.array(iterates))) > 1e-2


def _np_momentum_runs(lr_at, steps, w0, mu=0.9):
    """Classical (w += v, v = mu v - lr g) and PyTorch (b = mu b + g, w -= lr b) momentum."""
    wc, v = np.array(w0, np.float64), np.zeros(len(w0))
    wt, b = np.array(w0, np.float64), None
    cls, tor = [], []
    for t in range(steps):
        lr = lr_at(t)
        v = mu * v - lr * _np_quadratic_grad(wc)
        wc = wc + v
        g = _np_quadratic_grad(wt)
        b = g if b is None else mu * b + g
        wt = wt - lr * b
        cls.append(wc.copy())
        tor.append(wt.copy())
    return np.array(cls), np.array(tor)


def _step_fn(opt):
    @jax.jit
    def step(p, s):
        u, s = opt.update(jax.grad(_jax_quadratic)(p), s, p)
        return optlab.apply_updates(p, u), s

    return step


def test_classical_momentum_equals_sgd_momentum_for_a_constant_lr():
    lr, steps, w0 = 0.1, 25, [1.0, 1.0, -1.0]
    cls = optlab.classical_momentum(lr, 0.9)
    tor = optlab.sgd(lr, momentum=0.9)
    p0 = {"w": jnp.array(w0)}
    pc, sc = p0, cls.init(p0)
    pt, st = p0, tor.init(p0)
    step_c, step_t = _step_fn(cls), _step_fn(tor)
    for _ in range(steps):
        pc, sc = step_c(pc, sc)
        pt, st = step_t(pt, st)
    np.testing.assert_allclose(pc["w"], pt["w"], rtol=1e-5, atol=1e-6)
    # PyTorch's buffer is -v / lr.
    velocity = sc.inner_state.velocity["w"]
    (trace,) = [x for x in st.inner_state if isinstance(x, optlab.transforms.TraceState)]
    buffer = trace.momentum_buffer["w"]
    np.testing.assert_allclose(-velocity / lr, buffer, rtol=1e-5, atol=1e-6)
    exp_c, _ = _np_momentum_runs(lambda t: lr, steps, w0)
    np.testing.assert_allclose(pc["w"], exp_c[-1], rtol=1e-4, atol=1e-5)


def test_classical_momentum_differs_from_sgd_momentum_when_lr_changes():
    """After the lr drops, PyTorch's form rescales the whole buffer at once,
    the classical form only the new gradient contributions."""
    steps, switch, w0 = 20, 8, [1.0, 1.0, -1.0]
    lr_at = lambda t: 0.1 if t < switch else 0.02  # noqa: E731
    exp_c, exp_t = _np_momentum_runs(lr_at, steps, w0)
    results = {}
    for name, opt in {"classical": optlab.classical_momentum(0.1, 0.9), "torch": optlab.sgd(0.1, momentum=0.9)}.items():
        p = {"w": jnp.array(w0)}
        s, step = opt.init(p), _step_fn(opt)
        traj = []
        for t in range(steps):
            if t == switch:
                s = optlab.set_hyperparams(s, learning_rate=0.02)
            p, s = step(p, s)
            traj.append(np.asarray(p["w"]))
        results[name] = np.array(traj)
    np.testing.assert_allclose(results["classical"], exp_c, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(results["torch"], exp_t, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(results["classical"][:switch], results["torch"][:switch], rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(results["classical"][switch:] - results["torch"][switch:])) > 1e-2


# --- SWATS ---------------------------------------------------------------------------------


def _np_swats(grad, w, steps, lr, b1=0.9, b2=0.999, eps=1e-9):
    """Keskar & Socher (2017), Algorithm 1, in float64."""
    m, a, v = np.zeros_like(w), np.zeros_like(w), np.zeros_like(w)
    lam, in_sgd, rate, switch_step = 0.0, False, None, 0
    traj = []
    for k in range(1, steps + 1):
        g = grad(w)
        if in_sgd:
            v = b1 * v + g
            w = w - (1 - b1) * rate * v
        else:
            m = b1 * m + (1 - b1) * g
            a = b2 * a + (1 - b2) * g * g
            p = -lr * np.sqrt(1 - b2**k) / (1 - b1**k) * m / (np.sqrt(a) + eps)
            w = w + p
            if p @ g != 0:
                gamma = (p @ p) / -(p @ g)
                lam = b2 * lam + (1 - b2) * gamma
                if k > 1 and abs(lam / (1 - b2**k) - gamma) < eps:
                    in_sgd, rate, switch_step, v = True, lam / (1 - b2**k), k, np.zeros_like(w)
        traj.append(w.copy())
    return np.array(traj), switch_step, rate


# Steep quadratic, small Adam steps: the projected SGD rate gamma_k is ~1e-6 and
# stable to far better than eps = 1e-9, so the switch happens at the first
# allowed step (k = 2) in float32 as in float64.
_SWATS_H = np.array([100.0, 300.0])


def _swats_loss(p):
    return 0.5 * jnp.sum(jnp.asarray(_SWATS_H, jnp.float32) * p["w"] ** 2)


def test_swats_switches_to_sgd_and_follows_the_sgd_rule():
    lr, steps, w0 = 1e-3, 12, np.array([3.0, -2.0])
    expected, switch_step, rate = _np_swats(lambda w: _SWATS_H * w, w0, steps, lr)
    assert switch_step == 2  # the reference does switch on this problem

    opt = optlab.swats(lr)
    p = {"w": jnp.asarray(w0, jnp.float32)}
    s = opt.init(p)

    @jax.jit
    def step(p, s):
        g = jax.grad(_swats_loss)(p)
        u, s = opt.update(g, s, p)
        return optlab.apply_updates(p, u), s, g, u

    traj, status = [], []
    for _ in range(steps):
        prev_state = s
        p, s, g, u = step(p, s)
        traj.append(np.asarray(p["w"]))
        status.append(optlab.swats_status(s))
    np.testing.assert_allclose(np.array(traj), expected, rtol=1e-5, atol=1e-7)

    assert not bool(status[0]["switched"]) and int(status[0]["switch_step"]) == 0
    final = status[-1]
    assert bool(final["switched"])
    assert int(final["switch_step"]) == switch_step
    np.testing.assert_allclose(float(final["sgd_learning_rate"]), rate, rtol=1e-4)

    # The last step by hand: v_k = b1 v_{k-1} + g_k, update = -(1 - b1) * Lambda * v_k.
    b1 = 0.9
    sw_prev = prev_state.inner_state
    v = b1 * np.asarray(sw_prev.sgd_momentum["w"]) + np.asarray(g["w"])
    np.testing.assert_allclose(np.asarray(u["w"]), -(1 - b1) * float(final["sgd_learning_rate"]) * v, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s.inner_state.sgd_momentum["w"]), v, rtol=1e-6)
    # Adam's moments are frozen once in the SGD phase.
    np.testing.assert_array_equal(np.asarray(s.inner_state.mu["w"]), np.asarray(sw_prev.mu["w"]))


def test_swats_status_finds_the_state_inside_a_chain():
    opt = optlab.chain(optlab.clip_by_global_norm(1e3), optlab.swats(1e-3))
    params = {"w": jnp.ones(2)}
    status = optlab.swats_status(opt.init(params))
    assert set(status) == {"switched", "switch_step", "sgd_learning_rate"}
    assert not bool(status["switched"])
    with pytest.raises(ValueError, match="found 0"):
        optlab.swats_status(optlab.adam(1e-3).init(params))


# --- bad input -----------------------------------------------------------------------------

_P = {"w": jnp.ones(2)}


@pytest.mark.parametrize(
    "factory,kwargs,exc,fragment",
    [
        (optlab.sgd, dict(learning_rate=-0.1), ValueError, r"`learning_rate` \(=-0.1\)"),
        (optlab.adam, dict(learning_rate=-1e-3), ValueError, r"`learning_rate` \(=-0.001\)"),
        (optlab.sgd, dict(learning_rate=jnp.array([0.1, -0.2])), ValueError, r"`learning_rate`.*-0.2"),
        (optlab.adam, dict(b1=1.0), ValueError, r"`b1` \(=1.0\) must be in \[0.0, 1.0\)"),
        (optlab.adam, dict(b2=-0.1), ValueError, r"`b2` \(=-0.1\)"),
        (optlab.adamw, dict(b2=1.5), ValueError, r"`b2` \(=1.5\)"),
        (optlab.swats, dict(b1=1.0), ValueError, r"`b1` \(=1.0\)"),
        (optlab.sgd, dict(learning_rate=0.1, momentum=1.5), ValueError, r"`momentum` \(=1.5\)"),
        (optlab.classical_momentum, dict(learning_rate=0.1, momentum=1.5), ValueError, r"`momentum` \(=1.5\)"),
        (optlab.nesterov_momentum, dict(learning_rate=0.1, momentum=-0.1), ValueError, r"`momentum` \(=-0.1\)"),
        (optlab.rmsprop, dict(momentum=1.5), ValueError, r"`momentum` \(=1.5\)"),
        (optlab.rmsprop, dict(alpha=1.0), ValueError, r"`alpha` \(=1.0\)"),
        (optlab.adadelta, dict(rho=1.0), ValueError, r"`rho` \(=1.0\)"),
        (optlab.adagrad, dict(eps=-1.0), ValueError, r"`eps` \(=-1.0\)"),
        (optlab.sgd, dict(learning_rate=0.1, weight_decay=-1e-4), ValueError, r"`weight_decay` \(=-0.0001\)"),
        (
            optlab.sgd,
            dict(learning_rate=0.1, momentum=0.9, dampening=0.1, nesterov=True),
            ValueError,
            r"nesterov.*zero dampening.*`dampening` \(=0.1\)",
        ),
        (
            optlab.sgd,
            dict(learning_rate=0.1, nesterov=True),
            ValueError,
            r"nesterov.*momentum > 0.*`momentum` \(=0.0\)",
        ),
        (optlab.sgd, dict(learning_rate="fast"), TypeError, r"`learning_rate` \(='fast'\)"),
        (optlab.sgd, dict(learning_rate=0.1, momentum=True), TypeError, r"`momentum` \(=True\).*bool"),
        (optlab.rprop, dict(etas=(1.5, 1.2)), ValueError, r"`etas\[0\]` \(=1.5\) must be in \(0.0, 1.0\)"),
        (optlab.rprop, dict(etas=(0.5, 0.9)), ValueError, r"`etas\[1\]` \(=0.9\)"),
        (optlab.rprop, dict(etas=(0.5,)), ValueError, r"`etas` \(=\(0.5,\)\) must be a pair"),
        (optlab.rprop, dict(etas=0.5), ValueError, r"`etas` \(=0.5\) must be a pair"),
        (
            optlab.rprop,
            dict(step_sizes=(1.0, 0.1)),
            ValueError,
            r"`step_sizes` \(=\(1.0, 0.1\)\) must be \(minimum, maximum\) with minimum <= maximum",
        ),
        (optlab.adam, dict(learning_rate=float("inf")), ValueError, r"`learning_rate` \(=inf\) must be in \[0.0, inf\)"),
        (optlab.sgd, dict(learning_rate=float("nan")), ValueError, r"`learning_rate` \(=nan\)"),
        (optlab.swats, dict(learning_rate=float("inf")), ValueError, r"`learning_rate` \(=inf\)"),
        (optlab.lbfgs, dict(learning_rate=float("inf")), ValueError, r"`learning_rate` \(=inf\)"),
        (optlab.rprop, dict(learning_rate=0.0), ValueError, r"`learning_rate` \(=0.0\)"),
        (optlab.rprop, dict(step_sizes=(-1.0, 50.0)), ValueError, r"`step_sizes\[0\]` \(=-1.0\)"),
        (optlab.swats, dict(learning_rate=0.0), ValueError, r"`learning_rate` \(=0.0\)"),
        (
            optlab.adaptive_gains,
            dict(learning_rate=0.1, min_gain=2.0, max_gain=1.0),
            ValueError,
            r"`min_gain` \(=2.0\) must not exceed `max_gain` \(=1.0\)",
        ),
        (optlab.adaptive_gains, dict(learning_rate=0.1, decrease=1.0), ValueError, r"`decrease` \(=1.0\)"),
        (
            lambda **kw: optlab.accumulate_gradients(optlab.sgd(0.1), **kw),
            dict(every_k=0),
            ValueError,
            r"`every_k` \(=0\) must be >= 1",
        ),
        (
            lambda **kw: optlab.accumulate_gradients(optlab.sgd(0.1), **kw),
            dict(every_k=2.5),
            TypeError,
            r"`every_k` \(=2.5\) must be an integer",
        ),
        (
            lambda **kw: optlab.skip_nonfinite(optlab.sgd(0.1), **kw),
            dict(max_consecutive_skips=0),
            ValueError,
            r"`max_consecutive_skips` \(=0\)",
        ),
        (
            lambda labels: optlab.partition({"a": optlab.sgd(0.1)}, labels).init(_P),
            dict(labels={"w": "typo"}),
            ValueError,
            r"labels \['typo'\] have no transform; groups are \['a'\]",
        ),
        (optlab.partition, dict(transforms={}, labels={}), ValueError, "at least one group"),
        (optlab.clip_by_global_norm, dict(max_norm=0.0), ValueError, r"`max_norm` \(=0.0\)"),
        (optlab.ema_params, dict(decay=1.0), ValueError, r"`decay` \(=1.0\)"),
        (optlab.reduce_on_plateau, dict(factor=1.0), ValueError, r"`factor` \(=1.0\)"),
        (optlab.reduce_on_plateau, dict(threshold_mode="relative"), ValueError, r"`threshold_mode` \(='relative'\)"),
        (optlab.reduce_on_plateau, dict(patience=-1), ValueError, r"`patience` \(=-1\)"),
        (optlab.with_hyperparams, dict(build=optlab.scale, factor="x"), TypeError, r"`factor` \(='x'\)"),
    ],
)
def test_bad_input_is_rejected_early(factory, kwargs, exc, fragment):
    with pytest.raises(exc, match=fragment):
        factory(**kwargs)


def test_update_with_another_optimizers_state_names_the_mismatch():
    params = {"w": jnp.ones(3)}
    with pytest.raises(TypeError, match=r"`adam`.update was given a state its init did not make.*'b1'.*got \['learning_rate'\]"):
        optlab.adam().update(params, optlab.sgd(0.1).init(params), params)


# --- parameter dtypes an optimizer cannot update --------------------------------------------

# Adaptive methods: per-coordinate second moments (or sign logic) defined for real numbers.
REAL_ONLY = {
    "adagrad": lambda: optlab.adagrad(0.1),
    "rmsprop": lambda: optlab.rmsprop(0.01),
    "adam": lambda: optlab.adam(1e-2),
    "adamw": lambda: optlab.adamw(1e-2),
    "adadelta": lambda: optlab.adadelta(),
    "rprop": lambda: optlab.rprop(),
    "adaptive_gains": lambda: optlab.adaptive_gains(0.1),
    "swats": lambda: optlab.swats(1e-2),
    "lbfgs": lambda: optlab.lbfgs(0.1, line_search=None),
}
# Linear in the gradient: a complex number is updated as its pair of reals.
COMPLEX_OK = {
    "sgd": lambda: optlab.sgd(0.1),
    "sgd-momentum-wd": lambda: optlab.sgd(0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2),
    "sgd-nesterov": lambda: optlab.sgd(0.1, momentum=0.9, nesterov=True),
    "classical_momentum": lambda: optlab.classical_momentum(0.1),
    "nesterov_momentum": lambda: optlab.nesterov_momentum(0.1),
}


@pytest.mark.parametrize("dtype", ["int32", "bool"])
@pytest.mark.parametrize("name", [*REAL_ONLY, *COMPLEX_OK])
def test_integer_parameters_are_rejected_naming_the_leaf(name, dtype):
    # The update would be cast to the leaf's dtype: truncated to 0 for most methods,
    # -lr/eps (-1e7) for RMSprop. PyTorch refuses such parameters too.
    params = {"w": jnp.ones(2), "n": {"count": jnp.zeros(2, dtype)}}
    with pytest.raises(TypeError, match=rf"updates floating-point parameters only; the parameter \['n'\]\['count'\] has dtype {dtype}"):
        {**REAL_ONLY, **COMPLEX_OK}[name]().init(params)


@pytest.mark.parametrize("name", REAL_ONLY)
def test_complex_parameters_are_rejected_by_adaptive_methods(name):
    # g * g of a complex gradient is complex: m / sqrt(v) would silently lose the direction.
    params = {"w": jnp.ones(2), "z": jnp.ones(2, jnp.complex64)}
    with pytest.raises(TypeError, match=r"cannot update the complex parameter \['z'\] \(dtype complex64\)"):
        REAL_ONLY[name]().init(params)


@pytest.mark.parametrize("name", COMPLEX_OK)
def test_complex_parameters_follow_the_pairs_of_reals(name):
    # Same trajectory as the real and imaginary parts optimized as one real array.
    make = COMPLEX_OK[name]
    z0 = jnp.array([1.0 + 2.0j, -0.5 + 0.25j], jnp.complex64)
    grads = [jnp.array([0.3 - 1.0j, 2.0 + 0.5j], jnp.complex64) * (k + 1) for k in range(4)]

    def run(to, params):
        opt = make()
        state = opt.init(params)
        for g in grads:
            updates, state = opt.update({"p": to(g)}, state, params)
            params = optlab.apply_updates(params, updates)
        return params["p"]

    as_complex = run(lambda g: g, {"p": z0})
    as_pairs = run(lambda g: jnp.stack([g.real, g.imag]), {"p": jnp.stack([z0.real, z0.imag])})
    np.testing.assert_allclose(np.asarray(as_complex.real), np.asarray(as_pairs[0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(as_complex.imag), np.asarray(as_pairs[1]), rtol=1e-6)


def test_global_norm_of_complex_leaves_counts_both_parts():
    tree = {"z": jnp.array([3j, 4.0 + 0j], jnp.complex64), "w": jnp.array([12.0])}
    assert float(optlab.global_norm(tree)) == pytest.approx(13.0)
    clip = optlab.clip_by_global_norm(1.0)
    updates, _ = clip.update(tree, clip.init(tree))
    assert float(optlab.global_norm(updates)) == pytest.approx(1.0, rel=1e-5)
