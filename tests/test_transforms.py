"""Building blocks and wrappers against closed forms and independent references.

chain (extra arguments, optax interoperability), clipping (PyTorch's rules),
coupled vs decoupled weight decay, skip_nonfinite, accumulate_gradients,
ema_params, partition (plain dicts and flax.nnx.State), masked,
reduce_on_plateau (PyTorch's ReduceLROnPlateau), and tree-mismatch errors.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optlab

PARAMS = {"a": jnp.array([1.0, -2.0, 3.0]), "b": {"c": jnp.array([[0.5, -0.5], [2.0, 1.0]])}}
GRADS = {"a": jnp.array([0.3, -4.0, 1.0]), "b": {"c": jnp.array([[-2.0, 0.1], [0.0, 5.0]])}}


def _np(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


# --- chain ---------------------------------------------------------------------------------


def _recorder(log):
    """A transform that records the extra keyword arguments it receives."""

    def init_fn(params):
        return optlab.EmptyState()

    def update_fn(updates, state, params=None, **extra):
        log.append(sorted(extra))
        return updates, state

    return optlab.GradientTransformationExtraArgs(init_fn, update_fn)


def test_chain_passes_extra_args_to_transforms_that_take_them():
    log = []
    tx = optlab.chain(
        optax.scale(2.0),  # a plain optax transform, no extra args
        _recorder(log),
        optlab.scale_by_learning_rate(0.5),
        optlab.reduce_on_plateau(factor=0.5, patience=0),
    )
    state = tx.init(PARAMS)
    for loss in [1.0, 2.0]:  # the second loss is worse: the plateau rule halves the scale
        u, state = tx.update(GRADS, state, PARAMS, value=loss)
    assert log == [["value"], ["value"]]
    np.testing.assert_allclose(u["a"], -1.0 * np.asarray(GRADS["a"]))  # 2 * 0.5 * scale 1
    u, state = tx.update(GRADS, state, PARAMS, value=3.0)
    np.testing.assert_allclose(u["a"], -0.5 * np.asarray(GRADS["a"]))


def test_chain_accepts_optax_transforms_and_optax_accepts_optlab_ones():
    ours = optlab.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(), optlab.scale_by_learning_rate(0.1))
    theirs = optax.chain(optlab.clip_by_global_norm(1.0), optlab.scale_by_adam(), optax.scale(-0.1))
    reference = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(), optax.scale(-0.1))

    def run(tx):
        state, params = tx.init(PARAMS), PARAMS
        for _ in range(3):
            u, state = tx.update(GRADS, state, params)
            params = optax.apply_updates(params, u)
        return params

    results = jax.jit(lambda: [run(tx) for tx in (ours, theirs, reference)])()
    for got in results[:2]:
        jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), got, results[2])


def test_chain_rejects_non_transforms():
    with pytest.raises(TypeError, match="gradient transformations"):
        optlab.chain(optlab.scale(1.0), "sgd")


# --- clipping ------------------------------------------------------------------------------


@pytest.mark.parametrize("max_delta", [0.0, 0.5, 10.0])
def test_clip_is_elementwise(max_delta):
    u, _ = optlab.clip(max_delta).update(GRADS, optlab.EmptyState())
    jax.tree_util.tree_map(
        lambda got, g: np.testing.assert_array_equal(got, np.clip(g, -max_delta, max_delta)), _np(u), _np(GRADS)
    )


@pytest.mark.parametrize("max_norm", [0.1, 1.0, 6.0, 100.0])
def test_clip_by_global_norm_follows_torch_clip_grad_norm(max_norm):
    """torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6))."""
    leaves = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(GRADS)]
    norm = np.sqrt(sum(np.sum(x * x) for x in leaves))  # ~ 7.09
    coef = min(1.0, max_norm / (norm + 1e-6))
    u, _ = optlab.clip_by_global_norm(max_norm).update(GRADS, optlab.EmptyState())
    for got, g in zip(jax.tree_util.tree_leaves(u), leaves):
        np.testing.assert_allclose(got, coef * g, rtol=1e-6)
    if max_norm > norm:
        jax.tree_util.tree_map(np.testing.assert_array_equal, u, GRADS)  # untouched below the threshold
    else:
        np.testing.assert_allclose(float(optlab.global_norm(u)), max_norm * norm / (norm + 1e-6), rtol=1e-6)


# --- weight decay: coupled vs decoupled ----------------------------------------------------


def _np_adam(g, m, v, t, b1=0.9, b2=0.999, eps=1e-8):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    return (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps), m, v


@pytest.mark.parametrize("position", ["coupled", "decoupled"])
def test_add_decayed_weights_position_decides_coupled_or_decoupled(position):
    lr, wd, steps = 0.1, 0.2, 4
    decay = optlab.add_decayed_weights(wd)
    blocks = [optlab.scale_by_adam(), optlab.scale_by_learning_rate(lr)]
    tx = optlab.chain(decay, *blocks) if position == "coupled" else optlab.chain(blocks[0], decay, blocks[1])
    named = optlab.adam(lr, weight_decay=wd) if position == "coupled" else optlab.adamw(lr, weight_decay=wd)

    w = np.array([1.0, -2.0, 3.0])
    m, v = np.zeros(3), np.zeros(3)
    p_tx = p_named = {"w": jnp.asarray(w, jnp.float32)}
    s_tx, s_named = tx.init(p_tx), named.init(p_named)
    for t in range(1, steps + 1):
        g = np.sin(w * t) + 1.0  # any gradient, evaluated at the reference point
        if position == "coupled":  # L2 in the gradient, then Adam
            step, m, v = _np_adam(g + wd * w, m, v, t)
            w = w - lr * step
        else:  # Adam on the gradient, decay added after (Loshchilov & Hutter)
            step, m, v = _np_adam(g, m, v, t)
            w = w - lr * (step + wd * w)
        u, s_tx = tx.update({"w": jnp.asarray(g, jnp.float32)}, s_tx, p_tx)
        p_tx = optlab.apply_updates(p_tx, u)
        u, s_named = named.update({"w": jnp.asarray(g, jnp.float32)}, s_named, p_named)
        p_named = optlab.apply_updates(p_named, u)
        np.testing.assert_allclose(p_tx["w"], w, rtol=1e-5)
        np.testing.assert_allclose(p_named["w"], w, rtol=1e-5)


def test_decoupled_weight_decay_at_the_end_equals_adamw():
    lr, wd = 0.1, 0.2
    tx = optlab.chain(optlab.scale_by_adam(), optlab.scale_by_learning_rate(lr), optlab.decoupled_weight_decay(wd, lr))
    ref = optlab.adamw(lr, weight_decay=wd)
    p1 = p2 = PARAMS
    s1, s2 = tx.init(p1), ref.init(p2)
    for _ in range(3):
        u1, s1 = tx.update(GRADS, s1, p1)
        u2, s2 = ref.update(GRADS, s2, p2)
        p1, p2 = optlab.apply_updates(p1, u1), optlab.apply_updates(p2, u2)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5), p1, p2)


def test_add_decayed_weights_mask():
    mask = {"a": True, "b": {"c": False}}
    for m in (mask, lambda params: mask):
        u, _ = optlab.add_decayed_weights(0.5, mask=m).update(GRADS, optlab.EmptyState(), PARAMS)
        np.testing.assert_allclose(u["a"], np.asarray(GRADS["a"]) + 0.5 * np.asarray(PARAMS["a"]))
        np.testing.assert_array_equal(u["b"]["c"], GRADS["b"]["c"])


# --- skip_nonfinite ------------------------------------------------------------------------


def test_skip_nonfinite_leaves_params_and_state_unchanged_and_counts():
    tx = optlab.skip_nonfinite(optlab.adam(0.1, weight_decay=0.01))
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    params, state = PARAMS, tx.init(PARAMS)
    u, state = step(GRADS, state, params)
    params = optlab.apply_updates(params, u)
    bad = {"a": jnp.array([0.3, jnp.nan, 1.0]), "b": {"c": jnp.array([[-2.0, 0.1], [jnp.inf, 5.0]])}}
    for k in range(1, 4):
        u, new_state = step(bad if k != 2 else jax.tree_util.tree_map(lambda x: x * jnp.inf, GRADS), state, params)
        new_params = optlab.apply_updates(params, u)
        jax.tree_util.tree_map(np.testing.assert_array_equal, new_params, params)
        jax.tree_util.tree_map(np.testing.assert_array_equal, new_state.inner_state, state.inner_state)
        assert int(new_state.total_skips) == k and int(new_state.consecutive_skips) == k
        assert int(new_state.count) == k + 1
        state = new_state
    # A finite gradient goes through and resets the run of skips, not the total.
    u, state = step(GRADS, state, params)
    assert int(state.consecutive_skips) == 0 and int(state.total_skips) == 3
    # Only the two finite steps reached Adam: its step counter (bias correction) says 2.
    (adam_state,) = [
        x for x in jax.tree_util.tree_leaves(state.inner_state, is_leaf=lambda x: isinstance(x, optlab.transforms.AdamState))
        if isinstance(x, optlab.transforms.AdamState)
    ]
    assert int(adam_state.count) == 2
    assert not np.array_equal(u["a"], np.zeros(3))


def test_skip_nonfinite_lets_a_persistent_failure_through():
    tx = optlab.skip_nonfinite(optlab.sgd(0.1), max_consecutive_skips=2)
    state = tx.init(PARAMS)
    bad = jax.tree_util.tree_map(lambda g: g * jnp.nan, GRADS)
    outs = []
    for _ in range(3):
        u, state = tx.update(bad, state, PARAMS)
        outs.append(bool(np.all(np.isfinite(u["a"]))))
    assert outs == [True, True, False]  # two skips, then the NaN shows
    assert int(state.total_skips) == 2 and int(state.consecutive_skips) == 0


# --- accumulate_gradients ------------------------------------------------------------------

_XB = jax.random.normal(jax.random.key(0), (12, 3))
_YB = _XB @ jnp.array([1.0, -2.0, 0.5]) + 0.3


def _batch_loss(p, x, y):
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)


@pytest.mark.parametrize(
    "make", [lambda: optlab.sgd(0.05, momentum=0.9), lambda: optlab.adam(0.05)], ids=["sgd_momentum", "adam"]
)
@pytest.mark.parametrize("k", [1, 3, 4])
def test_accumulating_k_micro_batches_equals_one_full_batch_step(make, k):
    params0 = {"w": jnp.zeros(3), "b": jnp.zeros(())}
    full, acc = make(), optlab.accumulate_gradients(make(), every_k=k)

    def run(params0):
        p_full, s_full = params0, full.init(params0)
        p_acc, s_acc = params0, acc.init(params0)
        held = []
        for _ in range(2):  # two outer steps: the inner state must carry over
            u, s_full = full.update(jax.grad(_batch_loss)(p_full, _XB, _YB), s_full, p_full)
            p_full = optlab.apply_updates(p_full, u)
            for x, y in zip(jnp.split(_XB, k), jnp.split(_YB, k)):
                u, s_acc = acc.update(jax.grad(_batch_loss)(p_acc, x, y), s_acc, p_acc)
                p_acc = optlab.apply_updates(p_acc, u)
                held.append(u)
        return p_full, p_acc, held

    p_full, p_acc, held = jax.jit(run)(params0)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p_acc, p_full)
    assert not np.allclose(p_full["w"], 0.0)
    for i, u in enumerate(held):  # calls 1..k-1 of each group emit zero updates
        if i % k != k - 1:
            assert all(np.all(np.asarray(x) == 0) for x in jax.tree_util.tree_leaves(u))


@pytest.mark.parametrize(
    "make",
    [
        lambda: optlab.sgd(0.1, momentum=0.9),
        lambda: optlab.adam(0.1),
        lambda: optlab.rmsprop(0.1),
        lambda: optlab.adadelta(1.0),
    ],
    ids=["sgd_momentum", "adam", "rmsprop", "adadelta"],
)
def test_accumulate_gradients_with_bfloat16_params(make):
    """lax.cond needs both branches (hold, apply) to return the same state dtypes."""
    tx = optlab.accumulate_gradients(make(), every_k=2)
    params = {"w": jnp.ones(3, jnp.bfloat16)}
    state = tx.init(params)
    for _ in range(4):
        u, state = tx.update({"w": jnp.full(3, 0.5, jnp.bfloat16)}, state, params)
        params = optlab.apply_updates(params, u)
    assert params["w"].dtype == jnp.bfloat16 and np.all(np.asarray(params["w"], np.float32) < 1.0)


def test_accumulate_gradients_float32_sum_for_bfloat16_params():
    """k bfloat16 gradients whose exact sum needs more bits than bfloat16 has: a float32 sum
    gives the exact mean rounded once (checked against NumPy in float64); a bfloat16 sum
    rounds every partial sum and lands elsewhere (the control, so the test can fail)."""
    k = 8
    # 1 + i/128 are bfloat16 numbers (7 stored mantissa bits); their running sums (8 to 16)
    # are not, so a bfloat16 sum rounds at every step.
    grads = [jnp.full(3, 1 + i / 128, jnp.bfloat16) for i in range(k)]
    exact_mean = np.mean([1 + i / 128 for i in range(k)])

    def mean_fed_to_inner(accumulator_dtype):
        tx = optlab.accumulate_gradients(optlab.identity(), k, accumulator_dtype=accumulator_dtype)
        params = {"w": jnp.zeros(3, jnp.bfloat16)}
        state = tx.init(params)
        for g in grads:
            u, state = tx.update({"w": g}, state, params)
        assert state.grad_sum["w"].dtype == jnp.dtype(accumulator_dtype or jnp.bfloat16)
        assert u["w"].dtype == jnp.bfloat16
        return float(u["w"][0])

    assert mean_fed_to_inner("float32") == float(jnp.asarray(exact_mean, jnp.bfloat16))
    assert mean_fed_to_inner(None) != float(jnp.asarray(exact_mean, jnp.bfloat16))


# --- ema_params ----------------------------------------------------------------------------


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9])
def test_ema_params_closed_form(decay):
    """Constant steps u: w_t = w_0 + t u, and with ema_0 = w_0,
    ema_t = w_0 + u (t - decay (1 - decay^t) / (1 - decay))."""
    u = {"a": jnp.array([0.5, -1.0, 0.25]), "b": {"c": jnp.array([[1.0, 0.0], [-0.5, 2.0]])}}
    tx = optlab.chain(optlab.scale(-1.0), optlab.ema_params(decay))
    grads = jax.tree_util.tree_map(lambda x: -x, u)
    params, state = PARAMS, tx.init(PARAMS)
    for t in range(1, 8):
        upd, state = tx.update(grads, state, params)
        params = optlab.apply_updates(params, upd)
        jax.tree_util.tree_map(np.testing.assert_array_equal, upd, u)  # passes updates through
        factor = t - decay * (1 - decay**t) / (1 - decay)
        expected = jax.tree_util.tree_map(lambda w0, du: np.asarray(w0) + factor * np.asarray(du), PARAMS, u)
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), optlab.ema_of(state), expected
        )


def test_ema_params_keeps_a_float32_average_for_bfloat16_params():
    """The average of the actual bfloat16 trajectory, computed in float64, to
    float32 accuracy (a bfloat16 average is off by ~1e-2 here)."""
    decay = 0.99
    tx = optlab.chain(optlab.sgd(0.01), optlab.ema_params(decay))
    params = {"w": jnp.ones(3, jnp.bfloat16)}
    grads = {"w": jnp.array([1.0, -0.5, 0.25], jnp.bfloat16)}
    state = tx.init(params)
    avg = np.ones(3)
    for _ in range(100):
        u, state = tx.update(grads, state, params)
        params = optlab.apply_updates(params, u)
        avg = decay * avg + (1 - decay) * np.asarray(params["w"], np.float64)
    assert params["w"].dtype == jnp.bfloat16
    assert optlab.ema_of(state)["w"].dtype == jnp.float32
    np.testing.assert_allclose(optlab.ema_of(state)["w"], avg, rtol=1e-5)


# --- partition and masked ------------------------------------------------------------------


def _run(tx, params, grads_fn, steps=3):
    state = tx.init(params)
    for t in range(steps):
        u, state = tx.update(grads_fn(params, t), state, params)
        params = optlab.apply_updates(params, u)
    return params, state


def _grads_fn(params, t):
    return jax.tree_util.tree_map(lambda p: jnp.cos(p * (t + 1)) + 0.1 * p, params)


def test_partition_equals_separate_optimizers_on_subtrees():
    params = {"enc": {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}, "head": {"w": jnp.full((3,), 0.5)}}
    labels = {"enc": {"w": "enc", "b": "enc"}, "head": {"w": "head"}}
    tx = optlab.partition({"enc": optlab.adam(0.1), "head": optlab.sgd(0.2, momentum=0.9)}, labels)
    got, state = _run(tx, params, _grads_fn)
    enc, _ = _run(optlab.adam(0.1), params["enc"], _grads_fn)
    head, _ = _run(optlab.sgd(0.2, momentum=0.9), params["head"], _grads_fn)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, {"enc": enc, "head": head})
    # Each group's state holds nothing for the other group's leaves.
    n_enc = len(jax.tree_util.tree_leaves(optlab.adam(0.1).init(params["enc"]).inner_state))
    assert len(jax.tree_util.tree_leaves(state.inner_states["enc"].inner_state)) == n_enc


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Linear(4, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.out = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.bn(self.conv(x))))


def test_weight_decay_labels_on_an_nnx_model():
    _, params, _ = nnx.split(_Net(nnx.Rngs(0)), nnx.Param, ...)
    assert isinstance(params, nnx.State)
    labels = optlab.weight_decay_labels(params)
    flat = {"/".join(map(str, path)): label for path, label in jax.tree_util.tree_leaves_with_path(labels)}
    decayed = sorted(k for k, v in flat.items() if v == "decay")
    assert len(decayed) == 2 and all("kernel" in k for k in decayed)
    assert sorted(k for k, v in flat.items() if v == "no_decay") == sorted(set(flat) - set(decayed))
    assert any("bn" in k and "scale" in k for k in flat if flat[k] == "no_decay")


def test_partition_with_nnx_state_decays_only_kernels():
    _, params, _ = nnx.split(_Net(nnx.Rngs(0)), nnx.Param, ...)
    labels = optlab.weight_decay_labels(params)
    lr, wd = 0.1, 0.5
    tx = optlab.partition(
        {"decay": optlab.sgd(lr, weight_decay=wd), "no_decay": optlab.sgd(lr)}, optlab.weight_decay_labels
    )
    state = tx.init(params)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    u, state = tx.update(zeros, state, params)
    new = optlab.apply_updates(params, u)
    assert isinstance(new, nnx.State)
    for p, q, label in zip(*(jax.tree_util.tree_leaves(t) for t in (params, new, labels))):
        expected = np.asarray(p) * (1 - lr * wd) if label == "decay" else np.asarray(p)
        np.testing.assert_allclose(q, expected, rtol=1e-6)

    # Equal to each optimizer run on the whole state, taken leaf by leaf (both are
    # elementwise, so a leaf's trajectory does not depend on the other leaves).
    opts = {"decay": lambda: optlab.adamw(0.05, weight_decay=0.1), "no_decay": lambda: optlab.adam(0.05)}

    @jax.jit
    def runs(params):
        got = _run(optlab.partition({k: f() for k, f in opts.items()}, labels), params, _grads_fn)[0]
        return got, {k: _run(f(), params, _grads_fn)[0] for k, f in opts.items()}

    got, alone = runs(params)
    leaves = (jax.tree_util.tree_leaves(t) for t in (got, alone["decay"], alone["no_decay"], labels))
    for g, d, n, label in zip(*leaves):
        np.testing.assert_allclose(g, d if label == "decay" else n, rtol=1e-6, atol=1e-7)


def test_partition_hyperparams_per_group_with_nnx():
    _, params, _ = nnx.split(_Net(nnx.Rngs(0)), nnx.Param, ...)
    tx = optlab.partition(
        {"decay": optlab.adamw(1e-3, weight_decay=0.1), "no_decay": optlab.adam(2e-3)}, optlab.weight_decay_labels
    )
    hp = optlab.hyperparams(tx.init(params))
    assert set(hp) == {"decay", "no_decay"}
    np.testing.assert_allclose(hp["no_decay"]["learning_rate"], 2e-3)


def test_partition_unknown_label():
    tx = optlab.partition({"a": optlab.sgd(0.1)}, {"a": "a", "b": {"c": "typo"}})
    with pytest.raises(ValueError, match=r"\['typo'\].*\['a'\]"):
        tx.init(PARAMS)


@pytest.mark.parametrize("callable_mask", [False, True])
def test_masked_applies_inner_only_where_true(callable_mask):
    mask = {"a": True, "b": {"c": False}}
    inner = optlab.chain(optlab.add_decayed_weights(0.5), optlab.scale(-0.1))
    tx = optlab.masked(inner, (lambda p: mask) if callable_mask else mask)
    u, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)
    np.testing.assert_allclose(u["a"], -0.1 * (np.asarray(GRADS["a"]) + 0.5 * np.asarray(PARAMS["a"])), rtol=1e-6)
    np.testing.assert_array_equal(u["b"]["c"], GRADS["b"]["c"])  # passed through unchanged


# --- reduce_on_plateau ---------------------------------------------------------------------

_LOSSES = [1.0, 0.9, 0.95, 0.91, 0.905, 0.89, 0.89, 0.89, 0.7, 0.71, 0.72, 0.73, 0.74, 0.75] + [0.69] * 6

# Expected learning rates after each ReduceLROnPlateau.step(loss), lr=1 at the
# start, recorded once with torch 2.13:
#   opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
#   sch = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kwargs)
#   for l in _LOSSES: sch.step(l); lrs.append(opt.param_groups[0]["lr"])
_PLATEAU_CASES = {
    "rel": (
        dict(mode="min", factor=0.5, patience=2, threshold=0.01, threshold_mode="rel", cooldown=0, min_lr=0.0),
        [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.125, 0.125,
         0.125],
    ),
    "abs_cooldown": (
        dict(mode="min", factor=0.5, patience=1, threshold=0.02, threshold_mode="abs", cooldown=2, min_lr=0.0),
        [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25, 0.125, 0.125, 0.125, 0.125, 0.0625, 0.0625,
         0.0625, 0.0625, 0.03125],
    ),
    "max_min_lr": (
        dict(mode="max", factor=0.1, patience=0, threshold=1e-4, threshold_mode="rel", cooldown=0, min_lr=0.02),
        [1.0, 0.1] + [0.02] * 18,
    ),
}


@pytest.mark.parametrize("case", list(_PLATEAU_CASES))
def test_reduce_on_plateau_reproduces_torch(case):
    kwargs, torch_lrs = _PLATEAU_CASES[case]
    kwargs = dict(kwargs)
    kwargs["min_scale"] = kwargs.pop("min_lr")  # lr = 1
    tx = optlab.reduce_on_plateau(**kwargs)
    ones = {"w": jnp.ones(2)}

    @jax.jit
    def step(state, loss):
        return tx.update(ones, state, None, value=loss)

    state, scales = tx.init(ones), []
    for loss in _LOSSES + [0.0]:
        u, state = step(state, loss)
        scales.append(float(u["w"][0]))
    # Update i uses the scale decided by the losses before it.
    np.testing.assert_allclose(scales[1:], torch_lrs, rtol=1e-6)
    assert scales[0] == 1.0


def test_reduce_on_plateau_accumulates_losses_into_one_evaluation():
    """accumulation_size=k: the mean of each k losses is one PyTorch step."""
    kwargs, torch_lrs = _PLATEAU_CASES["rel"]
    tx = optlab.reduce_on_plateau(
        factor=0.5, patience=2, threshold=0.01, threshold_mode="rel", cooldown=0, accumulation_size=2
    )
    ones = {"w": jnp.ones(1)}
    state, scales = tx.init(ones), []
    for loss in _LOSSES:
        for spread in (-0.05, 0.05):  # two losses whose mean is the epoch's loss
            u, state = tx.update(ones, state, None, value=loss + spread)
            scales.append(float(u["w"][0]))
    np.testing.assert_allclose(scales[2::2], torch_lrs[:-1], rtol=1e-6)
    np.testing.assert_allclose(scales[3::2], torch_lrs[:-1], rtol=1e-6)


def test_reduce_on_plateau_needs_the_loss():
    tx = optlab.reduce_on_plateau()
    with pytest.raises(TypeError, match="loss"):
        tx.update(GRADS, tx.init(PARAMS), PARAMS)


# --- tree mismatch -------------------------------------------------------------------------

_WRONG = {"a": jnp.ones(3), "z": {"c": jnp.ones((2, 2))}}
_adam_wd = optlab.adam(0.1, weight_decay=0.1)


@pytest.mark.parametrize(
    "call",
    [
        lambda: optlab.apply_updates(PARAMS, _WRONG),
        lambda: optlab.add_decayed_weights(0.1).update(_WRONG, optlab.EmptyState(), PARAMS),
        lambda: _adam_wd.update(_WRONG, _adam_wd.init(PARAMS), PARAMS),
    ],
    ids=["apply_updates", "add_decayed_weights", "adam_weight_decay"],
)
def test_mismatched_gradient_tree_shows_both_structures(call):
    with pytest.raises(ValueError, match="does not match the parameter tree") as info:
        call()
    message = str(info.value)
    assert "'z'" in message and "'b'" in message  # both structures are printed


@pytest.mark.parametrize("make", [optlab.sgd, optlab.adam, optlab.rmsprop, optlab.adagrad], ids=lambda f: f.__name__)
def test_named_optimizer_rejects_mismatched_gradient_tree_showing_both(make):
    params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    opt = make(0.1)
    state = opt.init(params)
    with pytest.raises(ValueError, match=r"(?s)does not match the parameter tree.*gradient: PyTreeDef\(\{'a': \*\}\).*params: PyTreeDef\(\{'a': \*, 'b': \*\}\)"):
        opt.update({"a": jnp.ones(2)}, state, params)


@pytest.mark.parametrize("make", [optlab.sgd, optlab.adam, optlab.rmsprop, optlab.adagrad], ids=lambda f: f.__name__)
@pytest.mark.parametrize("shape", [(4,), (1, 3)], ids=["longer", "broadcastable"])
def test_a_gradient_of_another_shape_is_rejected_naming_the_leaf(make, shape):
    # (1, 3) would broadcast against the (3,) weight and silently turn it into a matrix.
    params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    opt = make(0.1)
    expected = rf"gradient for the parameter \['b'\] has shape {re.escape(str(shape))}; the parameter has shape \(3,\)"
    with pytest.raises(ValueError, match=expected):
        opt.update({"a": jnp.ones(2), "b": jnp.ones(shape)}, opt.init(params), params)


# --- momentum's first step -------------------------------------------------------------------


@pytest.mark.parametrize("dampening", [0.0, 0.5])
def test_trace_first_buffer_is_the_first_gradient(dampening):
    # PyTorch: b_1 = g_1 undamped, then b_t = mu b_{t-1} + (1 - dampening) g_t.
    tx = optlab.trace(0.9, dampening=dampening)
    g1, g2 = jnp.array([0.3, -4.0, 1e-30]), jnp.array([1.0, 2.0, -3.0])
    state = tx.init(g1)
    u1, state = jax.jit(tx.update)(g1, state)
    u2, _ = jax.jit(tx.update)(g2, state)
    np.testing.assert_array_equal(u1, g1)
    np.testing.assert_allclose(u2, 0.9 * np.asarray(g1) + (1 - dampening) * np.asarray(g2), rtol=1e-6)



# --- mask / labels trees that are a prefix of the parameter tree -----------------------------

_PREFIX_PARAMS = {
    "enc": {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.1, -0.2])},
    "dec": {"w": jnp.array([[2.0], [-1.0]]), "b": jnp.array([0.3])},
    "head": jnp.array([1.5, -0.5]),
}


def _nnx_params():
    return nnx.split(_Net(nnx.Rngs(0)), nnx.Param, ...)[1]


def _per_module(table):
    """Labels for `_Net`'s state, written out to every leaf: each leaf gets its module's entry."""
    return lambda p: jax.tree_util.tree_map_with_path(lambda path, _: table[path[0].key], p)


def _is_var(x):
    return isinstance(x, nnx.Variable)


def _masked_tx(mask):
    return optlab.masked(optlab.adamw(0.1, weight_decay=0.1), mask)


def _partition_tx(labels):
    return optlab.partition({"adam": optlab.adam(0.1), "sgd": optlab.sgd(0.2, momentum=0.9)}, labels)


# name: (params, transform, prefix (params -> tree), the same tree written out leaf by leaf (params -> tree))
_PREFIX_CASES = {
    "masked-dict": (
        lambda: _PREFIX_PARAMS,
        _masked_tx,
        lambda p: {"enc": True, "dec": False, "head": True},
        lambda p: {"enc": {"w": True, "b": True}, "dec": {"w": False, "b": False}, "head": True},
    ),
    "partition-dict-mixed-depth": (
        lambda: _PREFIX_PARAMS,
        _partition_tx,
        lambda p: {"enc": "adam", "dec": {"w": "sgd", "b": "adam"}, "head": "sgd"},
        lambda p: {"enc": {"w": "adam", "b": "adam"}, "dec": {"w": "sgd", "b": "adam"}, "head": "sgd"},
    ),
    "partition-dict-root-leaf": (
        lambda: _PREFIX_PARAMS,
        _partition_tx,
        lambda p: "sgd",
        lambda p: {"enc": {"w": "sgd", "b": "sgd"}, "dec": {"w": "sgd", "b": "sgd"}, "head": "sgd"},
    ),
    "masked-nnx-per-module": (
        _nnx_params,
        _masked_tx,
        lambda p: nnx.State({"conv": True, "bn": False, "out": True}),
        _per_module({"conv": True, "bn": False, "out": True}),
    ),
    "partition-nnx-per-module": (
        _nnx_params,
        _partition_tx,
        lambda p: nnx.State({"conv": "adam", "bn": "sgd", "out": "adam"}),
        _per_module({"conv": "adam", "bn": "sgd", "out": "adam"}),
    ),
    "partition-nnx-per-variable": (  # a label in place of each nnx.Variable (not of its array)
        _nnx_params,
        _partition_tx,
        lambda p: jax.tree_util.tree_map_with_path(
            lambda path, _: "adam" if path[-1].key == "kernel" else "sgd", p, is_leaf=_is_var
        ),
        lambda p: jax.tree_util.tree_map_with_path(lambda path, _: "adam" if path[1].key == "kernel" else "sgd", p),
    ),
}


def _steps(tx, params, steps=3):
    """Updates and states of ``steps`` calls with a fixed sequence of gradients."""
    out, state = [], tx.init(params)
    out.append(state)
    for t in range(steps):
        u, state = tx.update(_grads_fn(params, t), state, params)
        out += [u, state]
        params = optlab.apply_updates(params, u)
    return out


@pytest.mark.parametrize("as_function", [False, True], ids=["tree", "function"])
@pytest.mark.parametrize("case", sorted(_PREFIX_CASES))
def test_prefix_mask_or_labels_equal_the_written_out_tree_bitwise(case, as_function):
    make_params, make_tx, prefix, full = _PREFIX_CASES[case]
    params = make_params()
    # The case is a real prefix, and its written-out form has the structure of the params.
    assert jax.tree_util.tree_structure(full(params)) == jax.tree_util.tree_structure(params)
    assert jax.tree_util.tree_structure(prefix(params)) != jax.tree_util.tree_structure(params)

    got = _steps(make_tx(prefix if as_function else prefix(params)), params)
    want = _steps(make_tx(full(params)), params)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(g, w, strict=True)
    # Not vacuous: some leaves are transformed (a wrongly broadcast mask could pass everything through).
    first_updates, first_grads = (jax.tree_util.tree_leaves(t) for t in (got[1], _grads_fn(params, 0)))
    assert not all(np.array_equal(u, g) for u, g in zip(first_updates, first_grads))


_OPTAX_PREFIX = {"enc": "a", "dec": {"w": "b", "b": "a"}, "head": "b"}


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (
            lambda: optlab.masked(optlab.chain(optlab.add_decayed_weights(0.5), optlab.sgd(0.1, momentum=0.9)),
                                  {"enc": True, "dec": False, "head": True}),
            lambda: optax.masked(optax.chain(optax.add_decayed_weights(0.5), optax.sgd(0.1, momentum=0.9)),
                                 {"enc": True, "dec": False, "head": True}),
        ),
        (
            lambda: optlab.partition({"a": optlab.sgd(0.1, momentum=0.9), "b": optlab.clip(0.5)}, _OPTAX_PREFIX),
            lambda: optax.partition({"a": optax.sgd(0.1, momentum=0.9), "b": optax.clip(0.5)}, _OPTAX_PREFIX),
        ),
    ],
    ids=["masked", "partition"],
)
def test_prefix_mask_or_labels_match_optax(ours, theirs):
    got, want = _steps(ours(), _PREFIX_PARAMS)[1::2], _steps(theirs(), _PREFIX_PARAMS)[1::2]
    for g, w in zip(got, want):  # the updates of each step
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-7), g, w)


@pytest.mark.parametrize(
    "make_tx, params, what, shown",
    [
        (  # a key that is not in the params
            lambda: optlab.masked(optlab.sgd(0.1), {"enc": True, "dex": False, "head": True}),
            lambda: _PREFIX_PARAMS, "mask", ["'dex'", "'dec'"],
        ),
        (  # a function returning such a tree
            lambda: optlab.masked(optlab.sgd(0.1), lambda p: {"enc": True, "dex": False, "head": True}),
            lambda: _PREFIX_PARAMS, "mask", ["'dex'", "'dec'"],
        ),
        (  # a wrong key below the top
            lambda: _partition_tx({"enc": {"w": "adam", "z": "adam"}, "dec": "sgd", "head": "sgd"}),
            lambda: _PREFIX_PARAMS, "labels", ["'z'", "'b'"],
        ),
        (  # deeper than the params: a subtree where the params have an array
            lambda: _partition_tx({"enc": "adam", "dec": "sgd", "head": {"x": "sgd"}}),
            lambda: _PREFIX_PARAMS, "labels", ["'x'", "'head': *"],
        ),
        (  # a plain dict for an nnx.State: a different node type, not a prefix
            lambda: _partition_tx({"conv": "adam", "bn": "sgd", "out": "adam"}),
            _nnx_params, "labels", ["PyTreeDef({'bn': *, 'conv': *, 'out': *})", "State["],
        ),
    ],
    ids=["masked-key", "masked-function", "labels-key", "labels-too-deep", "labels-dict-for-nnx-state"],
)
def test_mask_or_labels_neither_same_nor_prefix_shows_both_structures(make_tx, params, what, shown):
    with pytest.raises(ValueError, match=rf"(?s)the {what} tree is neither the parameter tree nor a prefix of it:"
                                         rf"\n  {what}: PyTreeDef.*\n  params: PyTreeDef") as info:
        make_tx().init(params())
    for text in shown:
        assert text in str(info.value)
