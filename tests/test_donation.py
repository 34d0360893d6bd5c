"""Optimizer states can be donated.

The usual training step is ``jax.jit(step, donate_argnums=...)`` over the
parameters and the optimizer state, so XLA updates them in place. That frees
every buffer of the state passed in, and XLA refuses a call that donates one
buffer twice. So every ``init`` must return a state whose array leaves are
buffers of its own: not shared between two fields, not the parameters', and
not arrays the transform keeps in its closure for the next ``init`` (the
hyperparameter values and schedule parameters of `with_hyperparams`). And
`set_hyperparams` must not put the caller's own array into the state.

The table covers every public transform factory (a test checks that), with
the options that add state fields.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optlab
from optlab._base import with_extra_args_support

PARAMS = {"w": jnp.array([1.0, -2.0, 3.0]), "b": {"c": jnp.array([[0.5, -0.5], [2.0, 1.0]])}}
MASK = {"w": True, "b": {"c": False}}
LABELS = {"w": "adam", "b": {"c": "sgd"}}

# "factory[:variant]": builder
TRANSFORMS = {
    "sgd": lambda: optlab.sgd(0.1),
    "sgd:momentum-wd": lambda: optlab.sgd(0.1, momentum=0.9, weight_decay=1e-2),
    "sgd:schedule": lambda: optlab.sgd(optlab.schedules.cosine(0.1, 10)),
    "sgd:array-lr": lambda: optlab.sgd(jnp.float32(0.1)),
    "classical_momentum": lambda: optlab.classical_momentum(0.1),
    "nesterov_momentum": lambda: optlab.nesterov_momentum(0.1),
    "adagrad": lambda: optlab.adagrad(0.1, lr_decay=0.01, initial_accumulator_value=0.1),
    "rmsprop": lambda: optlab.rmsprop(0.01, momentum=0.9, centered=True),
    "adam": lambda: optlab.adam(1e-2),
    "adam:amsgrad": lambda: optlab.adam(1e-2, amsgrad=True, weight_decay=0.1),
    "adamw": lambda: optlab.adamw(1e-2),
    "adadelta": lambda: optlab.adadelta(),
    "rprop": lambda: optlab.rprop(),
    "adaptive_gains": lambda: optlab.adaptive_gains(0.1),
    "swats": lambda: optlab.swats(1e-2),
    "lbfgs": lambda: optlab.lbfgs(0.1, line_search=None),
    "trace": lambda: optlab.trace(0.9),
    "scale": lambda: optlab.scale(-0.1),
    "scale_by_learning_rate": lambda: optlab.scale_by_learning_rate(optlab.schedules.cosine(0.1, 10)),
    "scale_by_classical_momentum": lambda: optlab.scale_by_classical_momentum(0.1),
    "scale_by_nesterov_momentum": lambda: optlab.scale_by_nesterov_momentum(0.1),
    "scale_by_adagrad": lambda: optlab.scale_by_adagrad(),
    "scale_by_rms": lambda: optlab.scale_by_rms(),
    "scale_by_adam": lambda: optlab.scale_by_adam(),
    "scale_by_adadelta": lambda: optlab.scale_by_adadelta(),
    "scale_by_rprop": lambda: optlab.scale_by_rprop(),
    "scale_by_adaptive_gains": lambda: optlab.scale_by_adaptive_gains(),
    "identity": lambda: optlab.identity(),
    "clip": lambda: optlab.chain(optlab.clip(0.5), optlab.sgd(0.1)),
    "clip_by_global_norm": lambda: optlab.chain(optlab.clip_by_global_norm(1.0), optlab.sgd(0.1)),
    "add_decayed_weights": lambda: optlab.chain(optlab.add_decayed_weights(1e-2), optlab.sgd(0.1)),
    "decoupled_weight_decay": lambda: optlab.chain(optlab.sgd(0.1), optlab.decoupled_weight_decay(1e-2, 0.1)),
    "chain": lambda: optlab.chain(optlab.scale_by_adam(), optlab.scale_by_learning_rate(1e-2)),
    "with_hyperparams": lambda: optlab.with_hyperparams(
        lambda lr, sched: optlab.scale(-lr), lr=jnp.float32(0.1), sched=optlab.schedules.cosine(0.1, 10)
    ),
    "reduce_on_plateau": lambda: optlab.chain(optlab.sgd(0.1), optlab.reduce_on_plateau()),
    "skip_nonfinite": lambda: optlab.skip_nonfinite(optlab.adam(1e-2)),
    "accumulate_gradients": lambda: optlab.accumulate_gradients(optlab.adam(1e-2), 2),
    "ema_params": lambda: optlab.chain(optlab.sgd(0.1), optlab.ema_params(0.9)),
    "masked": lambda: optlab.masked(optlab.adam(1e-2), MASK),
    "partition": lambda: optlab.partition({"adam": optlab.adam(1e-2), "sgd": optlab.sgd(0.1)}, LABELS),
    "flatten": lambda: optlab.flatten(optlab.adam(1e-2)),
}

# Transforms without state: the buffer test checks that they have none.
STATELESS = {"scale", "identity"}

# Public names that are not transform factories.
NOT_FACTORIES = {
    "apply_updates",
    "ema_of",
    "global_norm",
    "hyperparams",
    "set_hyperparams",
    "swats_status",
    "weight_decay_labels",
    "schedules",
}


def grads_at(params):
    return jax.tree_util.tree_map(lambda p: 0.1 * jnp.sin(p) + 0.05, params)


def make_step(tx):
    tx = with_extra_args_support(tx)

    def step(params, state):
        updates, state = tx.update(grads_at(params), state, params, value=jnp.float32(1.0))
        return optlab.apply_updates(params, updates), state

    return step


def buffers(tree):
    return [x.unsafe_buffer_pointer() for x in jax.tree_util.tree_leaves(tree) if isinstance(x, jax.Array)]


def fresh_params():
    return jax.tree_util.tree_map(jnp.copy, PARAMS)


def test_table_covers_every_public_transform_factory():
    public = {
        n
        for n in optlab.__all__
        if n not in NOT_FACTORIES and not inspect.isclass(getattr(optlab, n)) and callable(getattr(optlab, n))
    }
    covered = {name.split(":")[0] for name in TRANSFORMS}
    assert public == covered, f"missing from TRANSFORMS: {sorted(public - covered)}; unknown: {sorted(covered - public)}"


@pytest.mark.parametrize("name", TRANSFORMS)
def test_init_returns_buffers_of_its_own(name):
    tx = TRANSFORMS[name]()
    params = fresh_params()
    states = tx.init(params), tx.init(params)  # both alive, or the allocator could reuse a freed buffer
    first, second = buffers(states[0]), buffers(states[1])
    if name in STATELESS:
        assert not first
        return
    assert first, "a state without arrays cannot show anything"
    assert len(set(first)) == len(first), "one buffer appears twice in the state"
    assert not set(first) & set(second), "two inits share buffers (kept in the transform's closure)"
    assert not set(first) & set(buffers(params)), "the state holds the parameters' own buffers"


@pytest.mark.parametrize("name", TRANSFORMS)
def test_donated_steps_match_undonated_ones_and_the_transform_stays_usable(name):
    tx = TRANSFORMS[name]()
    step = make_step(tx)
    plain, donated = jax.jit(step), jax.jit(step, donate_argnums=(0, 1))

    def run(fn):
        params = fresh_params()
        state = tx.init(params)
        for _ in range(3):
            params, state = fn(params, state)
        return jax.tree_util.tree_map(np.asarray, (params, state))

    expected = run(plain)
    # Twice: the first donated run must not have freed anything the second init needs.
    for _ in range(2):
        got = run(donated)
        jax.tree_util.tree_map(np.testing.assert_array_equal, got, expected)


@pytest.mark.parametrize(
    ("make", "values"),
    [
        (lambda: optlab.sgd(0.1), {"learning_rate": jnp.float32(0.05)}),
        (
            lambda: optlab.sgd(optlab.schedules.cosine(0.1, 10)),
            {"learning_rate": optlab.schedules.cosine(jnp.float32(0.05), jnp.int32(10))},
        ),
    ],
    ids=["number", "schedule"],
)
def test_set_hyperparams_keeps_the_callers_arrays_alive_through_a_donated_step(make, values):
    tx = make()
    params = fresh_params()
    state = optlab.set_hyperparams(tx.init(params), **values)
    jax.jit(make_step(tx), donate_argnums=(0, 1))(params, state)
    leaves = jax.tree_util.tree_leaves(values)
    assert leaves
    for leaf in leaves:
        assert not leaf.is_deleted(), "set_hyperparams put the caller's array into the state"
