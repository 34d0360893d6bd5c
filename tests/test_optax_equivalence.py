"""optlab agrees with optax wherever the two libraries mean the same thing, and interoperates with it.

optlab follows ``torch.optim`` (``tests/test_torch_exact.py``); optax has its
own conventions. Where they coincide the trajectories must agree to float32
round-off; where they do not, the difference is pinned down below.

======================  ================================================  ==========================
optlab                  optax                                             agreement
======================  ================================================  ==========================
sgd(lr)                 sgd(lr)                                           bit-identical
sgd(lr, momentum)       sgd(lr, momentum)                                 bit-identical (see below)
sgd(..., nesterov)      sgd(..., nesterov=True)                           bit-identical
sgd(..., weight_decay)  chain(add_decayed_weights(wd), sgd(...))          bit-identical
adam(lr, b1, b2, eps)   adam(lr, b1, b2, eps, eps_root=0)                 round-off
adam(..., weight_decay) chain(add_decayed_weights(wd), adam(...))         round-off
adamw(lr, wd=wd)        adamw(lr, weight_decay=wd)                        round-off (optax's default
                                                                          wd is 1e-4, torch's 1e-2)
rmsprop(lr, alpha, eps) rmsprop(lr, decay=alpha, eps, eps_in_sqrt=False)  round-off (optax's defaults
                                                                          are decay 0.9, eps inside)
rmsprop(eps_in_sqrt)    rmsprop(eps_in_sqrt=True)                         round-off
rmsprop(centered, mom.) rmsprop(centered=True, momentum, ...)             round-off (optax applies the
                                                                          lr before the momentum)
adagrad(eps=0, s0)      adagrad(initial_accumulator_value=s0, eps=0)      round-off; eps differs:
                                                                          g/(sqrt(s)+eps) vs
                                                                          g/sqrt(s+eps)
adadelta(lr, rho, eps)  adadelta(lr, rho, eps, weight_decay)              round-off
adam(amsgrad=True)      amsgrad(...)                                      differ: torch keeps the max
                                                                          of the raw second moment,
                                                                          optax of the bias-corrected
rprop(lr, etas, sizes)  rprop(lr, eta_minus, eta_plus, ...)               differ: optax 0.2.8 emits
                                                                          each step one step late
                                                                          (optax PR #1725)
======================  ================================================  ==========================

Momentum: optax's ``trace`` starts its buffer at zero and computes
``b_t = g_t + mu b_{t-1}``, so ``b_1 = g_1``; torch (and optlab) *copy* the
first gradient into the buffer and then compute ``mu b + (1 - dampening) g``.
With zero dampening both are ``g_1`` first and ``mu b + g`` after, the same
floating-point operations, hence bit-identical. With dampening they differ
(optax has none): torch's first step is undamped, so no zero-initialised
trace reproduces it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optlab
from optlab import schedules

STEPS = 100
F32 = np.float32
SHAPES = {"w": (4, 3), "b": (3,)}


def random_stream(seed: int = 0, steps: int = STEPS) -> tuple[dict, dict]:
    """Initial parameters and a stream of random gradients (with some exact zeros)."""
    keys = jax.random.split(jax.random.key(seed), 2 * len(SHAPES))
    params, grads = {}, {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        params[name] = 0.5 * jax.random.normal(keys[2 * i], shape)
        g = jax.random.normal(keys[2 * i + 1], (steps, *shape)) + 0.2
        grads[name] = jnp.where(jnp.abs(g) < 0.05, 0.0, g)
    return params, grads


def trajectory(tx, params, grads) -> dict:
    """Parameters after every step of ``tx`` fed the gradient stream (jitted scan)."""

    def body(carry, g):
        p, s = carry
        u, s = tx.update(g, s, p)
        p = optax.apply_updates(p, u)
        return (p, s), p

    run = jax.jit(lambda p, g: jax.lax.scan(body, (p, tx.init(p)), g)[1])
    return jax.tree_util.tree_map(np.asarray, run(params, grads))


def assert_trees_close(got, want, rtol, atol):
    """Leaf by leaf allclose; ``rtol = atol = 0`` asks for bit-identical arrays."""
    for path, a in jax.tree_util.tree_leaves_with_path(got):
        b = np.asarray(_get(want, path))
        if rtol == 0 and atol == 0:
            np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
        else:
            np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def _get(tree, path):
    for k in path:
        tree = tree[k.key] if hasattr(k, "key") else tree[k.idx]
    return tree


EPS32 = float(np.finfo(np.float32).eps)


def assert_trajectories_close(got, want, start, ulps: float):
    """Every step within ``ulps`` float32 ulps of the reference's accumulated scale.

    A parameter is a running sum of steps, so round-off is measured against
    ``|w_t| + sum_{s<=t} |w_s - w_{s-1}|`` (as in ``tests/test_torch_exact.py``).
    ``ulps = 0`` asks for bit-identical trajectories.
    """
    for path, a in jax.tree_util.tree_leaves_with_path(got):
        b = np.asarray(_get(want, path), np.float64)
        if ulps == 0:
            np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
            continue
        w0 = np.asarray(_get(start, path), np.float64)[None]
        scale = np.abs(b) + np.cumsum(np.abs(np.diff(np.concatenate([w0, b]), axis=0)), axis=0)
        err = np.abs(a - b) / (EPS32 * scale)
        worst = np.unravel_index(np.argmax(err), err.shape)
        assert err[worst] <= ulps, (
            f"{jax.tree_util.keystr(path)}: {err[worst]:.3g} ulps > {ulps} at step {worst[0] + 1}: "
            f"{a[worst]!r} vs {b[worst]!r}"
        )


# (id, optlab factory, optax factory, allowed ulps; see assert_trajectories_close).
# EXACT: the same floating-point operations, bit-identical trajectories.
# ROUNDOFF: float32 round-off, observed <= 3.8 ulps over 100 steps: optax
# writes the first moment as b1 m + (1 - b1) g where optlab uses torch's lerp
# m + (1 - b1)(g - m), divides the second moment by its bias correction before
# the square root rather than after, multiplies by rsqrt (or 1 / (sqrt + eps))
# where optlab divides, and applies RMSprop's lr before its momentum.
#
# optax is given its betas as float32 (F32): optlab stores hyperparameters as
# float32, and optax with a Python-float beta2 = 0.999 weighs the new square
# by fl32(1 - 0.999) = 0.0010000000475 but bias-corrects with
# 1 - fl32(0.999)^t = 0.00099998713 at t = 1, so its first Adam step is
# lr * (1 - 6.6e-6) instead of lr (test_optax_python_float_beta2_first_step).
EXACT = 0
ROUNDOFF = 8
PAIRS = [
    ("sgd", lambda: optlab.sgd(0.05), lambda: optax.sgd(0.05), EXACT),
    ("sgd-momentum", lambda: optlab.sgd(0.05, momentum=0.9), lambda: optax.sgd(0.05, momentum=0.9), EXACT),
    ("sgd-nesterov", lambda: optlab.sgd(0.05, momentum=0.9, nesterov=True),
     lambda: optax.sgd(0.05, momentum=0.9, nesterov=True), EXACT),
    ("sgd-momentum-weight_decay", lambda: optlab.sgd(0.05, momentum=0.8, weight_decay=0.1),
     lambda: optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.05, momentum=0.8)), EXACT),
    ("adam", lambda: optlab.adam(1e-2), lambda: optax.adam(1e-2, b1=F32(0.9), b2=F32(0.999), eps_root=0.0), ROUNDOFF),
    ("adam-betas-eps", lambda: optlab.adam(3e-3, b1=0.8, b2=0.99, eps=1e-6),
     lambda: optax.adam(3e-3, b1=F32(0.8), b2=F32(0.99), eps=1e-6), ROUNDOFF),
    ("adam-l2", lambda: optlab.adam(1e-2, weight_decay=0.1),
     lambda: optax.chain(optax.add_decayed_weights(0.1), optax.adam(1e-2, b1=F32(0.9), b2=F32(0.999))), ROUNDOFF),
    ("adamw", lambda: optlab.adamw(1e-2, weight_decay=0.1),
     lambda: optax.adamw(1e-2, b1=F32(0.9), b2=F32(0.999), weight_decay=0.1), ROUNDOFF),
    ("rmsprop", lambda: optlab.rmsprop(1e-2), lambda: optax.rmsprop(1e-2, decay=0.99, eps=1e-8, eps_in_sqrt=False),
     ROUNDOFF),
    ("rmsprop-eps_in_sqrt", lambda: optlab.rmsprop(1e-2, alpha=0.9, eps=1e-6, eps_in_sqrt=True),
     lambda: optax.rmsprop(1e-2, decay=0.9, eps=1e-6, eps_in_sqrt=True), ROUNDOFF),
    ("rmsprop-centered", lambda: optlab.rmsprop(1e-2, centered=True),
     lambda: optax.rmsprop(1e-2, decay=0.99, eps_in_sqrt=False, centered=True), ROUNDOFF),
    ("rmsprop-momentum", lambda: optlab.rmsprop(1e-2, momentum=0.9),
     lambda: optax.rmsprop(1e-2, decay=0.99, eps_in_sqrt=False, momentum=0.9), ROUNDOFF),
    ("rmsprop-centered-momentum", lambda: optlab.rmsprop(5e-3, alpha=0.9, eps=1e-6, centered=True, momentum=0.8),
     lambda: optax.rmsprop(5e-3, decay=0.9, eps=1e-6, eps_in_sqrt=False, centered=True, momentum=0.8), ROUNDOFF),
    ("adagrad-eps0", lambda: optlab.adagrad(0.1, initial_accumulator_value=0.1, eps=0.0),
     lambda: optax.adagrad(0.1, initial_accumulator_value=0.1, eps=0.0), ROUNDOFF),
    ("adadelta", lambda: optlab.adadelta(1.0), lambda: optax.adadelta(1.0, rho=0.9, eps=1e-6), ROUNDOFF),
    ("adadelta-weight_decay", lambda: optlab.adadelta(0.5, rho=0.95, weight_decay=0.1),
     lambda: optax.adadelta(0.5, rho=0.95, eps=1e-6, weight_decay=0.1), ROUNDOFF),
    # optlab's Schedule is a plain callable step -> value to optax, with the
    # same convention (the first update uses step 0).
    ("adam-optlab-cosine-in-optax", lambda: optlab.adam(schedules.cosine(1e-2, T_max=STEPS, eta_min=1e-4)),
     lambda: optax.adam(schedules.cosine(1e-2, T_max=STEPS, eta_min=1e-4), b1=F32(0.9), b2=F32(0.999)), ROUNDOFF),
    # ... and optax's own cosine decay is the same curve up to its horizon.
    ("sgd-momentum-cosine", lambda: optlab.sgd(schedules.cosine(0.05, T_max=STEPS, eta_min=5e-4), momentum=0.9),
     lambda: optax.sgd(optax.cosine_decay_schedule(0.05, decay_steps=STEPS, alpha=0.01), momentum=0.9), ROUNDOFF),
]


@pytest.mark.parametrize("name,make_ours,make_theirs,tol", PAIRS, ids=[p[0] for p in PAIRS])
def test_random_gradient_stream(name, make_ours, make_theirs, tol):
    params, grads = random_stream()
    got = trajectory(make_ours(), params, grads)
    want = trajectory(make_theirs(), params, grads)
    assert_trajectories_close(got, want, params, tol)
    # The stream moves the parameters well beyond the tolerance, so agreement means something.
    assert np.max(np.abs(got["w"][-1] - np.asarray(params["w"]))) > 0.05


# --- a small MLP, gradients fed back --------------------------------------------------------


def mlp_problem(seed: int = 1):
    """Full-batch regression with a 8-16-1 tanh MLP: (initial params, loss function)."""
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k[0], (64, 8))
    y = jnp.sin(x @ jax.random.normal(k[1], (8, 1)))
    params = {
        "hidden": {"w": jax.random.normal(k[2], (8, 16)) / jnp.sqrt(8.0), "b": jnp.zeros(16)},
        "out": {"w": jax.random.normal(k[3], (16, 1)) / 4.0, "b": jnp.zeros(1)},
    }

    def loss(p):
        h = jnp.tanh(x @ p["hidden"]["w"] + p["hidden"]["b"])
        return jnp.mean((h @ p["out"]["w"] + p["out"]["b"] - y) ** 2)

    return params, loss


def train(tx, params, loss, steps):
    """Parameters after each of ``steps`` full-batch steps, and the loss before each (jitted scan)."""

    def body(carry, _):
        p, s = carry
        value, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p)
        p = optax.apply_updates(p, u)
        return (p, s), (p, value)

    run = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), None, length=steps)[1])
    return jax.tree_util.tree_map(np.asarray, run(params))


FEEDBACK = 32
MLP_PAIRS = [
    ("sgd-momentum", lambda: optlab.sgd(0.1, momentum=0.9), lambda: optax.sgd(0.1, momentum=0.9), EXACT),
    ("sgd-nesterov", lambda: optlab.sgd(0.1, momentum=0.9, nesterov=True),
     lambda: optax.sgd(0.1, momentum=0.9, nesterov=True), EXACT),
    # Feedback through the network lets round-off grow over 60 steps (observed <= 15 ulps).
    ("adam", lambda: optlab.adam(1e-2), lambda: optax.adam(1e-2, b1=F32(0.9), b2=F32(0.999)), FEEDBACK),
    ("adamw", lambda: optlab.adamw(1e-2, weight_decay=0.05),
     lambda: optax.adamw(1e-2, b1=F32(0.9), b2=F32(0.999), weight_decay=0.05),
     FEEDBACK),
    ("rmsprop-momentum", lambda: optlab.rmsprop(1e-3, momentum=0.9),
     lambda: optax.rmsprop(1e-3, decay=0.99, eps_in_sqrt=False, momentum=0.9), FEEDBACK),
    ("adagrad", lambda: optlab.adagrad(0.05, initial_accumulator_value=0.1, eps=0.0),
     lambda: optax.adagrad(0.05, initial_accumulator_value=0.1, eps=0.0), FEEDBACK),
]


@pytest.mark.parametrize("name,make_ours,make_theirs,tol", MLP_PAIRS, ids=[p[0] for p in MLP_PAIRS])
def test_mlp_training(name, make_ours, make_theirs, tol):
    params, loss = mlp_problem()
    path, losses = train(make_ours(), params, loss, steps=60)
    path_ref, _ = train(make_theirs(), params, loss, steps=60)
    assert_trajectories_close(path, path_ref, params, tol)
    assert losses[-1] < 0.7 * losses[0], "the problem should actually train"


# --- where the two libraries differ, pinned down ------------------------------------------


def first_updates(tx, grads: list) -> list:
    """The updates ``tx`` emits for the gradients ``grads`` in turn (parameters held at zero)."""
    params = jnp.zeros_like(grads[0])
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for g in grads:
        u, state = update(g, state, params)
        out.append(np.asarray(u))
    return out


@pytest.mark.parametrize("eps", [1e-2, 0.5])
def test_adagrad_eps_placement_differs(eps):
    """optlab (torch) divides by sqrt(s) + eps, optax by sqrt(s + eps); first step from s0 = 0.1."""
    g = jnp.array([0.3, -2.0, 1.0])
    s = 0.1 + g * g
    ours = first_updates(optlab.adagrad(1.0, initial_accumulator_value=0.1, eps=eps), [g])[0]
    theirs = first_updates(optax.adagrad(1.0, initial_accumulator_value=0.1, eps=eps), [g])[0]
    np.testing.assert_allclose(ours, -g / (jnp.sqrt(s) + eps), rtol=1e-6)
    np.testing.assert_allclose(theirs, -g / jnp.sqrt(s + eps), rtol=1e-6)
    assert np.all(np.abs(ours - theirs) > 1e-3)


def test_amsgrad_differs_by_what_it_maximises():
    """torch keeps max(v_t) of the raw second moment, optax max(v_t / (1 - b2^t)).

    With g = (1, 0): v_1 = 1 - b2, v_2 = b2 (1 - b2). torch's denominator at
    step 2 is sqrt(v_1 / (1 - b2^2)) = 1 / sqrt(1 + b2); optax's is
    max(v_1 / (1 - b2), v_2 / (1 - b2^2)) = 1. The second updates differ by
    the factor sqrt(1 + b2) (up to eps).
    """
    b2 = F32(0.999)
    grads = [jnp.array([1.0]), jnp.array([0.0])]
    ours = first_updates(optlab.adam(1.0, b2=b2, eps=0.0, amsgrad=True), grads)
    theirs = first_updates(optax.amsgrad(1.0, b1=F32(0.9), b2=b2, eps=0.0), grads)
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-6)
    np.testing.assert_allclose(ours[1] / theirs[1], np.sqrt(1.0 + b2), rtol=1e-5)


def test_optax_python_float_beta2_first_step():
    """Adam's first step is -lr * sign(g) (|g| >> eps): optlab exactly, optax with Python floats not quite.

    optax forms 1 - b2 from the Python float (rounded once to float32,
    0.0010000000475) but bias-corrects with the float32 b2 raised to the
    power t (1 - 0.99900001287 = 0.00099998713): the corrected second moment
    is 1.3e-5 too large at t = 1, the step 6.6e-6 too small. With float32 betas
    optax is consistent and agrees with optlab, which is why PAIRS pass them.
    """
    g = jnp.array([1.0, -0.3, 2.0])
    ours = first_updates(optlab.adam(1.0), [g])[0]
    f32_betas = first_updates(optax.adam(1.0, b1=F32(0.9), b2=F32(0.999)), [g])[0]
    np.testing.assert_allclose(ours, -np.sign(g), rtol=2 * EPS32)
    np.testing.assert_allclose(f32_betas, -np.sign(g), rtol=2 * EPS32)
    py_floats = first_updates(optax.adam(1.0), [g])[0]
    predicted = np.sqrt((1 - np.float64(F32(0.999))) / np.float64(F32(1 - 0.999)))
    if not np.allclose(py_floats, -np.sign(g), rtol=2 * EPS32):  # unless fixed upstream
        np.testing.assert_allclose(py_floats, -np.sign(g) * predicted, rtol=2 * EPS32)


def test_optax_rprop_is_one_step_late():
    """optax 0.2.8's scale_by_rprop returns the previous step's update (optax PR #1725).

    Its first update is zero, and update t+1 is optlab's update t, except
    where the gradient flips sign at t+1 (both zero it then). optlab matches
    torch.optim.Rprop (tests/test_torch_exact.py). If optax fixes this, the two
    must agree exactly.
    """
    _, grads = random_stream(seed=3, steps=30)
    g = [grads["w"][t] for t in range(30)]
    ours = first_updates(optlab.rprop(0.01), g)
    theirs = first_updates(optax.rprop(0.01), g)
    if np.any(theirs[0] != 0):  # fixed upstream
        np.testing.assert_array_equal(np.stack(ours), np.stack(theirs))
        return
    np.testing.assert_array_equal(theirs[0], 0.0)
    assert np.any(ours[0] != 0)
    for t in range(29):
        flipped = np.asarray(g[t + 1]) * np.asarray(g[t]) < 0
        expected = np.where(flipped, 0.0, ours[t])
        # A weight whose step t was itself skipped (sign flip at t) has ours[t] == 0.
        np.testing.assert_array_equal(np.abs(theirs[t + 1]), np.abs(expected), err_msg=f"step {t + 1}")


# --- interoperability: each library's transforms inside the other's chains -----------------


INTEROP = [
    # optlab building blocks inside optax.chain
    ("optlab-blocks-in-optax.chain",
     lambda: optax.chain(optlab.add_decayed_weights(0.01), optlab.trace(0.9), optax.scale_by_learning_rate(0.05)),
     lambda: optax.chain(optax.add_decayed_weights(0.01), optax.trace(0.9), optax.scale_by_learning_rate(0.05)),
     EXACT),
    ("optlab-adam-in-optax.chain",
     lambda: optax.chain(optax.clip_by_global_norm(1.0), optlab.scale_by_adam(), optax.scale_by_learning_rate(1e-2)),
     lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(), optax.scale_by_learning_rate(1e-2)),
     ROUNDOFF),
    # a whole optlab optimizer (hyperparameters in its state) as an optax chain member
    ("optlab.adam-in-optax.chain",
     lambda: optax.chain(optax.clip_by_global_norm(1.0), optlab.adam(1e-2)),
     lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2, b1=F32(0.9), b2=F32(0.999))), ROUNDOFF),
    # optax transforms inside optlab.chain: the same operations, so bit-identical
    ("optax-blocks-in-optlab.chain",
     lambda: optlab.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(), optlab.scale_by_learning_rate(1e-2)),
     lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(), optax.scale_by_learning_rate(1e-2)),
     EXACT),
    ("optax.sgd-in-optlab.chain",
     lambda: optlab.chain(optlab.add_decayed_weights(0.1), optax.sgd(0.05, momentum=0.8)),
     lambda: optlab.sgd(0.05, momentum=0.8, weight_decay=0.1), EXACT),
]


@pytest.mark.parametrize("name,make_a,make_b,tol", INTEROP, ids=[p[0] for p in INTEROP])
def test_chains_mix_libraries(name, make_a, make_b, tol):
    params, grads = random_stream(seed=2)
    assert_trajectories_close(trajectory(make_a(), params, grads), trajectory(make_b(), params, grads), params, tol)


def test_hyperparams_found_inside_an_optax_chain():
    tx = optax.chain(optax.clip_by_global_norm(1.0), optlab.adam(3e-3, b1=0.8))
    params, grads = random_stream()
    state = tx.init(params)
    assert float(optlab.hyperparams(state)["b1"]) == pytest.approx(0.8)
    # Changing the lr in the optax-chain state equals building the chain with that lr.
    state = optlab.set_hyperparams(state, learning_rate=1e-2)
    g0 = jax.tree_util.tree_map(lambda g: g[0], grads)
    u, _ = tx.update(g0, state, params)
    ref = optax.chain(optax.clip_by_global_norm(1.0), optlab.adam(1e-2, b1=0.8))
    u_ref, _ = ref.update(g0, ref.init(params), params)
    assert_trees_close(u, u_ref, 0, 0)


def test_extra_args_reach_optax_members_of_an_optlab_chain():
    """optax's reduce_on_plateau needs ``value=``; optlab.chain forwards it like optax.chain."""

    def make(chain):
        return chain(optax.sgd(0.1), optax.contrib.reduce_on_plateau(factor=0.5, patience=3, accumulation_size=1))

    params, grads = random_stream(seed=4, steps=20)
    ours, theirs = make(optlab.chain), make(optax.chain)
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    update_ours, update_theirs = jax.jit(ours.update), jax.jit(theirs.update)
    for t in range(20):
        g = jax.tree_util.tree_map(lambda x: x[t], grads)
        loss = jnp.asarray(1.0 + 0.01 * (t % 2))  # never improves: the lr must be cut
        u_ours, s_ours = update_ours(g, s_ours, params, value=loss)
        u_theirs, s_theirs = update_theirs(g, s_theirs, params, value=loss)
        assert_trees_close(u_ours, u_theirs, 0, 0)
    assert float(s_ours[1].scale) < 1.0


# --- flax.nnx.Optimizer -------------------------------------------------------------------


class TinyMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(4, 8, rngs=rngs)
        self.out = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


def _data():
    k1, k2 = jax.random.split(jax.random.key(5))
    x = jax.random.normal(k1, (32, 4))
    return x, jnp.sum(jnp.sin(x), axis=1, keepdims=True) + 0.1 * jax.random.normal(k2, (32, 1))


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: optlab.adam(1e-2),
        lambda: optlab.sgd(schedules.step_decay(0.1, step_size=2, gamma=0.5), momentum=0.9, nesterov=True),
        lambda: optlab.chain(optlab.clip_by_global_norm(1.0), optlab.rmsprop(1e-2, centered=True)),
    ],
    ids=["adam", "sgd-nesterov-scheduled", "clip+rmsprop-centered"],
)
def test_nnx_optimizer_equals_manual_loop(make_tx):
    """``nnx.Optimizer(model, optlab_tx, wrt=nnx.Param)`` trains exactly like the pure-function loop."""
    x, y = _data()

    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    model = TinyMLP(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    # The same training as pure functions on the parameter state.
    tx = make_tx()
    params = nnx.as_pure(params)

    @jax.jit
    def manual_step(params, opt_state):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p)))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optlab.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    losses, manual_losses = [], []
    for _ in range(6):
        losses.append(float(nnx_step(model, optimizer)))
        params, opt_state, loss = manual_step(params, opt_state)
        manual_losses.append(float(loss))

    np.testing.assert_allclose(losses, manual_losses, rtol=1e-6)
    assert_trees_close(nnx.as_pure(nnx.state(model, nnx.Param)), params, 1e-6, 1e-7)
    assert losses[-1] < losses[0]
    # The state nnx keeps is optlab's own: its hyperparameters (the scheduled lr
    # as of the last step included) read the same as the manual loop's.
    kept = optlab.hyperparams(nnx.as_pure(optimizer.opt_state))
    manual = optlab.hyperparams(opt_state)
    assert kept.keys() == manual.keys() and "learning_rate" in kept
    for k in kept:
        np.testing.assert_array_equal(kept[k], manual[k], err_msg=k)
