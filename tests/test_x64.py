"""With JAX's 64-bit mode on, float64 parameters get float64-accurate updates.

Hyperparameters, schedule values and the scalars derived from the step count
(bias corrections, AdaGrad's decay) take `real_dtype`: float32 normally,
float64 under ``jax_enable_x64``. Were they float32, a float64 trajectory
would drift from the float64 rule by ~1e-7 relative within a few steps; the
tolerance here (1e-12) is far below that. The references are the update
rules of ``torch.optim``'s documentation written out in NumPy float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optlab

STEPS = 30
_RNG = np.random.default_rng(7)
W0 = _RNG.normal(size=6)
GRADS = _RNG.normal(size=(STEPS, 6))


def np_sgd(lr, momentum, weight_decay, nesterov):
    w, buf = W0.copy(), None
    for t, g in enumerate(GRADS):
        g = g + weight_decay * w
        buf = g.copy() if t == 0 else momentum * buf + g
        w = w - lr * (g + momentum * buf if nesterov else buf)
    return w


def np_adam(lr, b1, b2, eps, weight_decay, decoupled):
    w, m, v = W0.copy(), np.zeros(6), np.zeros(6)
    for t, g in enumerate(GRADS, start=1):
        if decoupled:
            w = w * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * w
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w = w - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return w


def np_rmsprop_centered(lr, alpha, eps, momentum):
    w, v, gavg, buf = W0.copy(), np.zeros(6), np.zeros(6), np.zeros(6)
    for g in GRADS:
        v = alpha * v + (1 - alpha) * g * g
        gavg = alpha * gavg + (1 - alpha) * g
        buf = momentum * buf + g / (np.sqrt(v - gavg * gavg) + eps)
        w = w - lr * buf
    return w


def np_adagrad(lr, lr_decay, eps):
    w, s = W0.copy(), np.zeros(6)
    for t, g in enumerate(GRADS, start=1):
        s = s + g * g
        w = w - lr / (1 + (t - 1) * lr_decay) * g / (np.sqrt(s) + eps)
    return w


def np_sgd_cosine(lr, total):
    w = W0.copy()
    for t, g in enumerate(GRADS):
        w = w - 0.5 * lr * (1 + np.cos(np.pi * t / total)) * g
    return w


CASES = {
    "sgd-momentum-wd": (lambda: optlab.sgd(0.1, momentum=0.9, weight_decay=0.01), lambda: np_sgd(0.1, 0.9, 0.01, False)),
    "sgd-nesterov": (lambda: optlab.sgd(0.1, momentum=0.9, nesterov=True), lambda: np_sgd(0.1, 0.9, 0.0, True)),
    "adam": (lambda: optlab.adam(0.1), lambda: np_adam(0.1, 0.9, 0.999, 1e-8, 0.0, False)),
    "adam-l2": (lambda: optlab.adam(0.1, weight_decay=0.1), lambda: np_adam(0.1, 0.9, 0.999, 1e-8, 0.1, False)),
    "adamw": (lambda: optlab.adamw(0.1, weight_decay=0.1), lambda: np_adam(0.1, 0.9, 0.999, 1e-8, 0.1, True)),
    "rmsprop-centered-momentum": (
        lambda: optlab.rmsprop(0.01, alpha=0.9, centered=True, momentum=0.5),
        lambda: np_rmsprop_centered(0.01, 0.9, 1e-8, 0.5),
    ),
    "adagrad-lr_decay": (lambda: optlab.adagrad(0.1, lr_decay=0.05), lambda: np_adagrad(0.1, 0.05, 1e-10)),
    "sgd-cosine": (lambda: optlab.sgd(optlab.schedules.cosine(0.1, STEPS)), lambda: np_sgd_cosine(0.1, STEPS)),
}


@pytest.mark.parametrize("name", CASES)
def test_float64_parameters_follow_the_float64_rule(name):
    make, reference = CASES[name]
    with jax.enable_x64(True):
        opt = make()
        params = {"w": jnp.asarray(W0)}
        state = opt.init(params)
        assert {x.dtype for x in jax.tree_util.tree_leaves(optlab.hyperparams(state))} == {jnp.dtype(jnp.float64)}
        for g in GRADS:
            updates, state = opt.update({"w": jnp.asarray(g)}, state, params)
            params = optlab.apply_updates(params, updates)
        got = np.asarray(params["w"])
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, reference(), rtol=1e-12, atol=1e-14)


def test_hyperparameters_are_float32_without_64_bit_mode():
    state = optlab.adam(optlab.schedules.cosine(0.1, 10)).init({"w": jnp.zeros(2)})
    assert {x.dtype for x in jax.tree_util.tree_leaves(state.hyperparams)} == {jnp.dtype(jnp.float32)}
