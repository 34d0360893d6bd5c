"""What XLA compiles for an optimizer step.

XLA:CPU compiles every distinct fused kernel once and reuses it for leaves of
the same shape, so compile time grows with the number of distinct shapes, not
leaves. Hyperparameters live in the optimizer state as traced scalars; when one
scalar's broadcast is shared by several same-shaped leaves, the fusion pass
orders the operands of one leaf's kernel differently and that kernel is
compiled again (and its arithmetic can differ: a division by a scalar the leaf
does not share becomes a multiplication by its reciprocal). `leaf_scalars`
gives each leaf its own copy. These tests pin down the two consequences:

* a tree with repeated shapes compiles no more distinct kernels than a tree
  with one leaf per shape;
* a leaf's update is bit for bit the same whatever other leaves share the tree.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optlab

OPTIMIZERS = {
    "sgd": lambda: optlab.sgd(0.1),
    "sgd-momentum-dampening-wd": lambda: optlab.sgd(0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2),
    "nesterov": lambda: optlab.sgd(0.1, momentum=0.9, nesterov=True),
    "classical-momentum": lambda: optlab.classical_momentum(0.1),
    "nesterov-momentum": lambda: optlab.nesterov_momentum(0.1),
    "adagrad": lambda: optlab.adagrad(0.1, lr_decay=0.01, initial_accumulator_value=0.1),
    "rmsprop-centered": lambda: optlab.rmsprop(0.01, momentum=0.9, centered=True),
    "adam": lambda: optlab.adam(1e-2),
    "adam-amsgrad-l2": lambda: optlab.adam(1e-2, amsgrad=True, weight_decay=0.1),
    "adamw": lambda: optlab.adamw(1e-2),
    "adadelta": lambda: optlab.adadelta(weight_decay=0.1),
    "rprop": lambda: optlab.rprop(),
    "adaptive-gains": lambda: optlab.adaptive_gains(0.1),
    "adam-cosine": lambda: optlab.adam(optlab.schedules.cosine(1e-2, 100)),
}

# Several leaves per shape, in an order that interleaves the shapes.
SHAPES = [(64,), (64,), (3, 3, 8, 16), (128,), (128,), (128,), (3, 3, 8, 16), (10, 5)]


def tree(shapes, seed):
    r = np.random.default_rng(seed)
    return {f"w{i}": jnp.asarray(r.standard_normal(s), jnp.float32) for i, s in enumerate(shapes)}


def step_fn(tx):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optlab.apply_updates(params, updates), state

    return jax.jit(step)


def distinct_kernels(hlo: str) -> int:
    """Fused computations of a compiled module, counted up to renaming."""
    bodies = set()
    for m in re.finditer(r"^%(fused_computation\S*) \((.*?)\) -> (.*?) \{\n(.*?)\n\}", hlo, re.M | re.S):
        _, args, result, body = m.groups()
        signature = re.sub(r"[\w.\-]+:", "_:", args) + "->" + result
        body = re.sub(r", metadata=\{[^}]*\}", "", body)
        bodies.add(signature + re.sub(r"%[\w.\-]+", "%_", body))
    return len(bodies)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_same_shaped_leaves_reuse_one_compiled_kernel(name):
    def kernels(shapes):
        tx = OPTIMIZERS[name]()
        params, grads = tree(shapes, 0), tree(shapes, 1)
        return distinct_kernels(step_fn(tx).lower(params, tx.init(params), grads).compile().as_text())

    repeated, unique = kernels(SHAPES), kernels(list(dict.fromkeys(SHAPES)))
    assert unique > 0, "no fused kernels found: has XLA's HLO text format changed?"
    assert repeated == unique


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_leaf_update_does_not_depend_on_the_other_leaves(name):
    def trajectory(shapes):
        tx = OPTIMIZERS[name]()
        params = tree(shapes, 0)
        state, step = tx.init(params), step_fn(tx)
        for k in range(4):
            params, state = step(params, state, tree(shapes, k + 1))
        return params

    alone = trajectory(SHAPES[:1])["w0"]
    together = trajectory(SHAPES)["w0"]
    np.testing.assert_array_equal(np.asarray(alone), np.asarray(together))


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_update_has_no_per_element_select(nesterov):
    # b_1 = g_1 falls out of mu * 0 + g_1 (the buffer starts at zero), so the compiled
    # step needs no where(first, ...) over the parameters: it would only cost compile time.
    tx = optlab.sgd(0.1, momentum=0.9, nesterov=nesterov)
    params = {"w": jnp.ones(5)}
    text = jax.jit(tx.update).lower(params, tx.init(params), params).as_text()
    selects = [line for line in text.splitlines() if "select" in line and "tensor<5xf32>" in line]
    assert not selects, selects


# Each differentiates a hyperparameter that reaches the update through leaf_scalars.
HYPERGRADIENT_CASES = {
    "sgd-momentum": (lambda m: optlab.sgd(0.01, momentum=m, dampening=0.1, weight_decay=1e-2), 0.9),
    "sgd-weight-decay": (lambda wd: optlab.sgd(0.01, momentum=0.9, weight_decay=wd), 0.1),
    "adam-b1": (lambda b1: optlab.adam(0.01, b1=b1), 0.9),
    "rmsprop-alpha": (lambda a: optlab.rmsprop(0.01, alpha=a, momentum=0.9, centered=True), 0.9),
    "classical-momentum-lr": (lambda lr: optlab.classical_momentum(lr), 0.01),
}


@pytest.mark.parametrize("name", HYPERGRADIENT_CASES)
def test_hyperparameter_gradients_pass_through_the_leaf_copies(name):
    # The per-leaf copies are optimization barriers: identity valued and differentiable.
    # d(sum of parameters after three steps)/d(hyperparameter), against a central difference.
    make, x0 = HYPERGRADIENT_CASES[name]
    params, grads = tree(SHAPES[:3], 0), [tree(SHAPES[:3], k + 1) for k in range(3)]

    def final_sum(x):
        tx = make(x)
        p, state = params, tx.init(params)
        for g in grads:
            updates, state = tx.update(g, state, p)
            p = optlab.apply_updates(p, updates)
        return sum(jnp.sum(leaf) for leaf in jax.tree_util.tree_leaves(p))

    h = 1e-2 * x0  # float32: a smaller step drowns in the rounding of the sum
    slope = float(jax.jit(jax.grad(final_sum))(x0))
    central = (float(final_sum(x0 + h)) - float(final_sum(x0 - h))) / (2 * h)
    assert abs(central) > 1e-3
    np.testing.assert_allclose(slope, central, rtol=2e-2)


# optlab against optax, same hyperparameters (optax's defaults where optlab's differ are spelled out).
AGAINST_OPTAX = {
    "sgd": (lambda: optlab.sgd(0.1), lambda: optax.sgd(0.1)),
    "sgd-momentum": (lambda: optlab.sgd(0.1, momentum=0.9), lambda: optax.sgd(0.1, momentum=0.9)),
    "nesterov": (lambda: optlab.sgd(0.1, momentum=0.9, nesterov=True), lambda: optax.sgd(0.1, 0.9, nesterov=True)),
    "adagrad": (lambda: optlab.adagrad(0.1), lambda: optax.adagrad(0.1, initial_accumulator_value=0.0, eps=1e-10)),
    "rmsprop": (lambda: optlab.rmsprop(0.01), lambda: optax.rmsprop(0.01, decay=0.99, eps=1e-8)),
    "adam": (lambda: optlab.adam(1e-2), lambda: optax.adam(1e-2)),
    "adamw": (lambda: optlab.adamw(1e-2, weight_decay=1e-2), lambda: optax.adamw(1e-2, weight_decay=1e-2)),
}


@pytest.mark.parametrize("name", AGAINST_OPTAX)
def test_optlab_compiles_no_more_distinct_kernels_than_optax(name):
    # Compile time on XLA:CPU counts distinct kernels, scalar ones included: an unread step
    # counter or a bias correction split over several scalar kernels shows up here.
    def kernels(tx):
        params, grads = tree(SHAPES, 0), tree(SHAPES, 1)
        return distinct_kernels(step_fn(tx).lower(params, tx.init(params), grads).compile().as_text())

    ours, theirs = (kernels(make()) for make in AGAINST_OPTAX[name])
    assert theirs > 0, "no fused kernels found: has XLA's HLO text format changed?"
    assert ours <= theirs
