"""Algebraic properties, checked on random inputs with hypothesis.

* A zero learning rate leaves the parameters exactly where they are.
* `chain` is associative.
* `partition` into groups equals running each group's optimizer on its own leaves.
* `apply_updates` keeps every parameter's dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import optlab

SETTINGS = settings(max_examples=20, deadline=None)

# No subnormals: XLA on CPU flushes them to zero, which is the platform's
# arithmetic, not the optimizers' behaviour.
_FLOATS = st.floats(-10.0, 10.0, allow_nan=False, allow_subnormal=False, width=32)
SHAPES = {"w": (2, 3), "b": (3,), "s": ()}


def _tree_strategy(shapes=SHAPES, elements=_FLOATS):
    return st.fixed_dictionaries({k: hnp.arrays(np.float32, s, elements=elements) for k, s in shapes.items()})


# --- zero learning rate --------------------------------------------------------------------

# Every optimizer whose update is scaled by the learning rate. Excluded:
#   rprop: `learning_rate` is only the initial per-weight step size (it must be
#     > 0); the steps then grow and shrink on their own, so lr=0 is no fixed point.
#   swats: `learning_rate` must be > 0, and after the switch the SGD phase uses
#     the rate it estimated, not `learning_rate`.
ZERO_LR = {
    "sgd": lambda lr: optlab.sgd(lr),
    "sgd_momentum_wd": lambda lr: optlab.sgd(lr, momentum=0.9, dampening=0.1, weight_decay=0.1),
    "sgd_nesterov": lambda lr: optlab.sgd(lr, momentum=0.9, nesterov=True),
    "classical_momentum": lambda lr: optlab.classical_momentum(lr),
    "nesterov_momentum": lambda lr: optlab.nesterov_momentum(lr),
    "adagrad": lambda lr: optlab.adagrad(lr, lr_decay=0.1, weight_decay=0.1),
    "rmsprop": lambda lr: optlab.rmsprop(lr, weight_decay=0.1),
    "rmsprop_centered": lambda lr: optlab.rmsprop(lr, centered=True),
    "rmsprop_momentum": lambda lr: optlab.rmsprop(lr, momentum=0.9),
    "rmsprop_eps_in_sqrt": lambda lr: optlab.rmsprop(lr, eps_in_sqrt=True),
    "adam": lambda lr: optlab.adam(lr, weight_decay=0.1),
    "adam_amsgrad": lambda lr: optlab.adam(lr, amsgrad=True),
    "adam_no_bias_correction": lambda lr: optlab.adam(lr, bias_correction=False),
    "adamw": lambda lr: optlab.adamw(lr, weight_decay=0.1),
    "adadelta": lambda lr: optlab.adadelta(lr, weight_decay=0.1),
    "adaptive_gains": lambda lr: optlab.adaptive_gains(lr),
}


@functools.lru_cache(maxsize=None)
def _zero_lr_run(name):
    opt = ZERO_LR[name](0.0)

    @jax.jit
    def run(params, grads_seq):
        state = opt.init(params)
        p = params
        for grads in grads_seq:  # three steps, each with its own gradient
            u, state = opt.update(grads, state, p)
            p = optlab.apply_updates(p, u)
        return p

    return run


@pytest.mark.parametrize("name", list(ZERO_LR))
@SETTINGS
@given(params=_tree_strategy(), grads=st.lists(_tree_strategy(), min_size=3, max_size=3))
def test_zero_learning_rate_changes_nothing(name, params, grads):
    got = _zero_lr_run(name)(params, grads)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, params)


# --- chain is associative ------------------------------------------------------------------

_BLOCKS = {
    "clip": lambda: optlab.clip(1.0),
    "clip_norm": lambda: optlab.clip_by_global_norm(2.0),
    "scale": lambda: optlab.scale(-0.5),
    "trace": lambda: optlab.trace(0.9),
    "adam": lambda: optlab.scale_by_adam(),
    "rms": lambda: optlab.scale_by_rms(),
    "decay": lambda: optlab.add_decayed_weights(0.1),
    "sgd": lambda: optlab.sgd(0.1, momentum=0.5),
}


def _updates(tx, params, grads_seq):
    state, out = tx.init(params), []
    for grads in grads_seq:
        u, state = tx.update(grads, state, params)
        out.append(u)
    return out


@SETTINGS
@given(
    names=st.tuples(*[st.sampled_from(sorted(_BLOCKS))] * 3),
    params=_tree_strategy(),
    grads=st.lists(_tree_strategy(), min_size=2, max_size=2),
)
def test_chain_is_associative(names, params, grads):
    a, b, c = names
    left = optlab.chain(optlab.chain(_BLOCKS[a](), _BLOCKS[b]()), _BLOCKS[c]())
    right = optlab.chain(_BLOCKS[a](), optlab.chain(_BLOCKS[b](), _BLOCKS[c]()))
    # Op by op (no jit), so nothing can merge the two computations.
    jax.tree_util.tree_map(np.testing.assert_array_equal, _updates(left, params, grads), _updates(right, params, grads))


# --- partition equals separate optimizers --------------------------------------------------

_GROUP_OPTS = {"x": lambda: optlab.adam(0.1, weight_decay=0.1), "y": lambda: optlab.sgd(0.05, momentum=0.9)}


@SETTINGS
@given(
    labels=st.fixed_dictionaries({k: st.sampled_from(sorted(_GROUP_OPTS)) for k in SHAPES}),
    params=_tree_strategy(),
    grads=st.lists(_tree_strategy(), min_size=2, max_size=2),
)
def test_partition_equals_separate_optimizers(labels, params, grads):
    """Each optimizer here is elementwise, so running it on the whole tree and
    keeping a group's leaves is running it on that group alone."""

    def run(tx, params):
        state = tx.init(params)
        for g in grads:
            u, state = tx.update(g, state, params)
            params = optlab.apply_updates(params, u)
        return params

    got = run(optlab.partition({k: f() for k, f in _GROUP_OPTS.items()}, labels), params)
    alone = {k: run(f(), params) for k, f in _GROUP_OPTS.items()}
    for leaf, label in labels.items():
        np.testing.assert_array_equal(got[leaf], alone[label][leaf])


# --- apply_updates keeps dtypes ------------------------------------------------------------

_DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


@SETTINGS
@given(
    p_dtype=st.sampled_from(_DTYPES),
    u_dtype=st.sampled_from(_DTYPES),
    p=hnp.arrays(np.float32, (4,), elements=_FLOATS),
    u=hnp.arrays(np.float32, (4,), elements=_FLOATS),
)
def test_apply_updates_keeps_parameter_dtypes(p_dtype, u_dtype, p, u):
    params = {"w": jnp.asarray(p, p_dtype), "n": None}
    updates = {"w": jnp.asarray(u, u_dtype), "n": None}
    new = optlab.apply_updates(params, updates)
    assert new["w"].dtype == p_dtype and new["n"] is None
    # The sum is formed in the wider dtype, then rounded once to the parameter dtype.
    wide = jnp.promote_types(p_dtype, u_dtype)
    expected = (params["w"].astype(wide) + updates["w"].astype(wide)).astype(p_dtype)
    np.testing.assert_array_equal(np.asarray(new["w"], np.float32), np.asarray(expected, np.float32))
