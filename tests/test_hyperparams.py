"""Hyperparameters as data (optlab/_hparams.py): reading, setting, sweeping.

* `hyperparams(state)` works inside jit and reports a scheduled value at the step taken.
* `set_hyperparams(state, name=x)` is bit-identical to building the optimizer
  with x, for every optimizer and every numeric hyperparameter, and never
  triggers a recompilation.
* An optimizer built inside `jax.vmap` over a hyperparameter equals the runs
  one by one, for every optimizer.
* Errors name the problem; parameter groups expose per-group hyperparameters.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optlab
from optlab.schedules._core import Schedule

# --- a fixed, sign-changing gradient sequence ----------------------------------------------

STEPS = 6
_G = jax.random.normal(jax.random.key(7), (STEPS, 5))
PARAMS = {"w": jnp.linspace(-1.0, 1.0, 5)}


def _grad(p, t):
    """Random gradients (sign flips for Rprop and the adaptive gains) plus a pull to 0."""
    return {"w": _G[t] + 0.5 * p["w"]}


def _scan_run(opt, state, params):
    """``STEPS`` updates from ``state``; returns the parameter trajectory and the final state."""

    def step(carry, t):
        p, s = carry
        u, s = opt.update(_grad(p, t), s, p)
        p = optlab.apply_updates(p, u)
        return (p, s), p["w"]

    (_, s), traj = jax.lax.scan(step, (params, state), jnp.arange(STEPS))
    return traj, s


# name: (factory, base kwargs, {hyperparameter: a different value})
HP_TABLE = {
    "sgd": (
        optlab.sgd,
        dict(learning_rate=0.1, momentum=0.5, dampening=0.1, weight_decay=0.01),
        dict(learning_rate=0.05, momentum=0.8, dampening=0.3, weight_decay=0.1),
    ),
    "sgd_nesterov": (
        optlab.sgd,
        dict(learning_rate=0.1, momentum=0.5, nesterov=True),
        dict(learning_rate=0.05, momentum=0.8),
    ),
    "classical_momentum": (
        optlab.classical_momentum,
        dict(learning_rate=0.1, momentum=0.5),
        dict(learning_rate=0.05, momentum=0.8),
    ),
    "nesterov_momentum": (
        optlab.nesterov_momentum,
        dict(learning_rate=0.1, momentum=0.5),
        dict(learning_rate=0.05, momentum=0.8),
    ),
    "adagrad": (
        optlab.adagrad,
        dict(learning_rate=0.1, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1, eps=1e-10),
        dict(learning_rate=0.05, lr_decay=0.2, weight_decay=0.1, initial_accumulator_value=1.0, eps=0.1),
    ),
    "rmsprop": (
        optlab.rmsprop,
        dict(learning_rate=0.01, alpha=0.99, eps=1e-8, weight_decay=0.01, momentum=0.5),
        dict(learning_rate=0.05, alpha=0.9, eps=0.1, weight_decay=0.1, momentum=0.8),
    ),
    "rmsprop_centered": (
        optlab.rmsprop,
        dict(learning_rate=0.01, alpha=0.99, eps=1e-8, centered=True),
        dict(learning_rate=0.05, alpha=0.9, eps=0.1),
    ),
    "rmsprop_eps_in_sqrt": (
        optlab.rmsprop,
        dict(learning_rate=0.01, alpha=0.99, eps=1e-8, eps_in_sqrt=True),
        dict(learning_rate=0.05, alpha=0.9, eps=0.1),
    ),
    "adam": (
        optlab.adam,
        dict(learning_rate=0.01, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01),
        dict(learning_rate=0.05, b1=0.5, b2=0.9, eps=0.1, weight_decay=0.1),
    ),
    "adam_amsgrad": (
        optlab.adam,
        dict(learning_rate=0.01, b1=0.9, b2=0.999, eps=1e-8, amsgrad=True),
        dict(learning_rate=0.05, b1=0.5, b2=0.9, eps=0.1),
    ),
    "adam_no_bias_correction": (
        optlab.adam,
        dict(learning_rate=0.01, b1=0.9, b2=0.999, eps=1e-8, bias_correction=False),
        dict(learning_rate=0.05, b1=0.5, b2=0.9, eps=0.1),
    ),
    "adamw": (
        optlab.adamw,
        dict(learning_rate=0.01, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05),
        dict(learning_rate=0.05, b1=0.5, b2=0.9, eps=0.1, weight_decay=0.5),
    ),
    "adadelta": (
        optlab.adadelta,
        dict(learning_rate=1.0, rho=0.9, eps=1e-6, weight_decay=0.01),
        dict(learning_rate=0.5, rho=0.5, eps=1e-3, weight_decay=0.1),
    ),
    "rprop": (
        optlab.rprop,
        dict(learning_rate=0.01, etas=(0.5, 1.2), step_sizes=(1e-6, 50.0)),
        # max step 0.012 is reached on the second same-sign step (0.01 * 1.2).
        dict(learning_rate=0.05, etas=(0.3, 1.5), step_sizes=(1e-6, 0.011)),
    ),
    "adaptive_gains": (
        optlab.adaptive_gains,
        dict(learning_rate=0.1, increase=0.05, decrease=0.05, min_gain=0.01, max_gain=100.0),
        dict(learning_rate=0.05, increase=0.3, decrease=0.5, min_gain=0.99, max_gain=1.02),
    ),
    "swats": (
        optlab.swats,
        dict(learning_rate=0.01, b1=0.9, b2=0.999, eps=1e-9),
        dict(learning_rate=0.05, b1=0.5, b2=0.9, eps=0.1),
    ),
}

HP_CASES = [(name, hp) for name, (_, _, new) in HP_TABLE.items() for hp in new]


def _build(name, **changes):
    factory, base, _ = HP_TABLE[name]
    return factory(**{**base, **changes})


class _Base:
    """One optimizer built with the base values, its jitted run and a trace counter."""

    def __init__(self, name):
        self.opt = _build(name)
        self.traces = 0

        def run(state, params):
            self.traces += 1
            return _scan_run(self.opt, state, params)

        self.run = jax.jit(run)
        self.base_traj, _ = self.run(self.opt.init(PARAMS), PARAMS)


@functools.lru_cache(maxsize=None)
def _base(name):
    return _Base(name)


@pytest.mark.parametrize("name", list(HP_TABLE))
def test_table_covers_every_numeric_hyperparameter(name):
    state = _build(name).init(PARAMS)
    assert set(optlab.hyperparams(state)) == set(HP_TABLE[name][2])


@pytest.mark.parametrize("name,hp", HP_CASES)
def test_set_hyperparams_is_bit_identical_to_building_with_the_value(name, hp):
    value = HP_TABLE[name][2][hp]
    base = _base(name)
    state = optlab.set_hyperparams(base.opt.init(PARAMS), **{hp: value})
    got_traj, got_state = base.run(state, PARAMS)

    built = _build(name, **{hp: value})
    want_traj, want_state = jax.jit(functools.partial(_scan_run, built))(built.init(PARAMS), PARAMS)

    np.testing.assert_array_equal(got_traj, want_traj)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got_state, want_state)
    np.testing.assert_array_equal(optlab.hyperparams(got_state)[hp], np.float32(value))
    # The new value matters (otherwise the comparison above proves nothing) ...
    assert not np.array_equal(got_traj, base.base_traj)
    # ... and it reached the compiled step as data: one trace for all values.
    assert base.traces == 1


# --- reading inside jit, schedules, recompilation ------------------------------------------


def _exp_decay(step, init, rate):
    return init * rate ** step.astype(jnp.float32)


def exp_decay(init, rate):
    return Schedule(_exp_decay, "exp_decay", {"init": init, "rate": rate})


def test_hyperparams_inside_jit_report_the_scheduled_value_at_the_step_taken():
    opt = optlab.sgd(exp_decay(0.1, 0.5), momentum=0.9)
    params = {"w": jnp.ones(2)}

    @jax.jit
    def step(params, state):
        grads = {"w": jnp.full(2, 2.0)}
        u, state = opt.update(grads, state, params)
        return optlab.apply_updates(params, u), state, optlab.hyperparams(state)

    state = opt.init(params)
    # Before any update: the value for step 0.
    np.testing.assert_allclose(optlab.hyperparams(state)["learning_rate"], 0.1)
    buf = None
    for t in range(4):
        new_params, state, hp = step(params, state)
        lr_t = 0.1 * 0.5**t
        np.testing.assert_allclose(hp["learning_rate"], lr_t, rtol=1e-6)
        np.testing.assert_allclose(hp["momentum"], 0.9, rtol=1e-7)
        # ... and that value was the one used: PyTorch's momentum rule by hand.
        buf = 2.0 if buf is None else 0.9 * buf + 2.0
        np.testing.assert_allclose(new_params["w"] - params["w"], -lr_t * buf, rtol=1e-5)
        params = new_params


@pytest.mark.parametrize(
    "make,changes",
    [
        (lambda: optlab.sgd(0.1, momentum=0.9), [dict(learning_rate=0.01), dict(momentum=0.5)]),
        (lambda: optlab.adam(1e-3), [dict(learning_rate=0.5), dict(b1=0.0, b2=0.5, eps=1.0)]),
        (
            lambda: optlab.sgd(exp_decay(0.1, 0.9)),
            [dict(learning_rate=exp_decay(1.0, 0.5)), dict(learning_rate=exp_decay(jnp.float32(2.0), 0.1))],
        ),
        (
            lambda: optlab.partition(
                {"a": optlab.adam(0.1), "b": optlab.sgd(0.1, momentum=0.9)}, {"x": "a", "y": "b"}
            ),
            [dict(learning_rate=0.2), dict(group="b", momentum=0.1)],
        ),
    ],
    ids=["sgd", "adam", "scheduled", "groups"],
)
def test_no_recompilation_across_steps_and_new_values(make, changes):
    opt = make()
    params = {"x": jnp.ones(3), "y": jnp.zeros(2)}
    traces = 0

    @jax.jit
    def step(params, state):
        nonlocal traces
        traces += 1
        grads = jax.tree_util.tree_map(lambda p: p - 2.0, params)
        u, state = opt.update(grads, state, params)
        return optlab.apply_updates(params, u), state

    state = opt.init(params)
    seen = []
    for change in [{}] + changes:
        state = optlab.set_hyperparams(state, **change)
        for _ in range(3):
            new_params, state = step(params, state)
            seen.append(jax.tree_util.tree_map(lambda a, b: float(jnp.sum(a - b)), new_params, params))
            params = new_params
    assert traces == 1
    assert len({str(s) for s in seen}) > 1  # the steps did change something


def test_plain_callable_is_code_not_data():
    opt = optlab.sgd(lambda step: 0.1 / (1.0 + step))
    params = {"w": jnp.ones(2)}
    state = opt.init(params)
    for t in range(3):
        u, state = jax.jit(opt.update)({"w": jnp.ones(2)}, state, params)
        np.testing.assert_allclose(optlab.hyperparams(state)["learning_rate"], 0.1 / (1 + t), rtol=1e-6)
        np.testing.assert_allclose(u["w"], -0.1 / (1 + t), rtol=1e-6)
    with pytest.raises(TypeError, match="learning_rate"):
        optlab.set_hyperparams(state, learning_rate=0.5)


# --- sweeps with jax.vmap ------------------------------------------------------------------

# (table entry, hyperparameter, values): every optimizer over its learning rate,
# the momentum-like ones over momentum or betas as well.
SWEEPS = [(name, "learning_rate", HP_TABLE[name][1]["learning_rate"] * np.array([0.5, 1.0, 2.0])) for name in HP_TABLE]
SWEEPS += [
    ("sgd", "momentum", np.array([0.0, 0.5, 0.9])),
    ("sgd_nesterov", "momentum", np.array([0.3, 0.6, 0.9])),
    ("classical_momentum", "momentum", np.array([0.0, 0.5, 0.9])),
    ("nesterov_momentum", "momentum", np.array([0.0, 0.5, 0.9])),
    ("rmsprop", "momentum", np.array([0.0, 0.5, 0.9])),
    ("adam", "b1", np.array([0.0, 0.5, 0.9])),
    ("adam", "b2", np.array([0.9, 0.99, 0.999])),
    ("adamw", "b1", np.array([0.0, 0.5, 0.9])),
    ("swats", "b2", np.array([0.9, 0.99, 0.999])),
]


@pytest.mark.parametrize(
    "name,hp,values", [pytest.param(n, h, v, id=f"{n}-{h}") for n, h, v in SWEEPS]
)
def test_optimizer_built_inside_vmap_equals_runs_one_by_one(name, hp, values):
    def run(value):
        opt = _build(name, **{hp: value})
        return _scan_run(opt, opt.init(PARAMS), PARAMS)[0]

    values = jnp.asarray(values, jnp.float32)
    swept = jax.jit(jax.vmap(run))(values)
    # One by one through the compiled base run with the value set: the test above
    # shows that this is bit-identical to building the optimizer with the value.
    base = _base(name)
    one_by_one = np.stack(
        [base.run(optlab.set_hyperparams(base.opt.init(PARAMS), **{hp: v}), PARAMS)[0] for v in values]
    )
    np.testing.assert_allclose(swept, one_by_one, rtol=2e-6, atol=1e-7)
    assert not np.allclose(one_by_one[0], one_by_one[-1])


def _warmup_cosine(peak):
    """optlab.schedules: 3 warm-up steps to ``peak``, then cosine annealing over 10."""
    sch = optlab.schedules
    return sch.join([sch.linear_warmup(0.0, peak, 3), sch.cosine(peak, 10)], [3])


@pytest.mark.parametrize(
    "make_schedule,lr_at_last_step",
    [
        (lambda peak: exp_decay(peak, 0.8), lambda peak: peak * 0.8 ** (STEPS - 1)),
        # Step 5 is step 2 of the cosine: peak * (1 + cos(2 pi / 10)) / 2.
        (_warmup_cosine, lambda peak: peak * (1 + np.cos(2 * np.pi / 10)) / 2),
    ],
    ids=["exp_decay", "warmup_cosine"],
)
def test_vmapped_schedule_peak_equals_runs_one_by_one(make_schedule, lr_at_last_step):
    def run(peak):
        opt = optlab.adam(make_schedule(peak))
        traj, state = _scan_run(opt, opt.init(PARAMS), PARAMS)
        return traj, optlab.hyperparams(state)["learning_rate"]

    peaks = jnp.array([0.01, 0.05, 0.2])
    swept, lrs = jax.jit(jax.vmap(run))(peaks)
    single = jax.jit(run)
    for i, peak in enumerate(peaks):
        traj, lr = single(peak)
        np.testing.assert_allclose(swept[i], traj, rtol=2e-6, atol=1e-7)
        np.testing.assert_allclose(lrs[i], lr_at_last_step(float(peak)), rtol=1e-5)
    assert not np.allclose(swept[0], swept[-1])


def test_set_hyperparams_on_a_vmapped_state():
    """A state created under vmap carries one value per lane; a scalar broadcasts to all."""
    lrs = jnp.array([0.1, 0.2, 0.3])
    states = jax.vmap(lambda lr: optlab.sgd(lr).init(PARAMS))(lrs)
    np.testing.assert_allclose(optlab.hyperparams(states)["learning_rate"], lrs)
    states = optlab.set_hyperparams(states, learning_rate=0.5)
    np.testing.assert_allclose(optlab.hyperparams(states)["learning_rate"], [0.5, 0.5, 0.5])
    states = optlab.set_hyperparams(states, learning_rate=jnp.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(optlab.hyperparams(states)["learning_rate"], [1.0, 2.0, 3.0])


# --- errors --------------------------------------------------------------------------------


def _sgd_state():
    return optlab.sgd(0.1, momentum=0.9).init(PARAMS)


def _scheduled_state():
    return optlab.sgd(exp_decay(0.1, 0.9)).init(PARAMS)


@pytest.mark.parametrize(
    "make_state,kwargs,exc,fragments",
    [
        # Unknown name: the message lists the known ones.
        (_sgd_state, dict(lr=0.1), KeyError, ["'lr'", "learning_rate", "momentum"]),
        # Compiled-out feature (literal 0) is not settable, and the message says why.
        (_sgd_state, dict(weight_decay=0.1), KeyError, ["weight_decay", "literal 0"]),
        (_scheduled_state, dict(learning_rate=0.1), TypeError, ["learning_rate", "schedule"]),
        (_sgd_state, dict(learning_rate=exp_decay(0.1, 0.9)), TypeError, ["learning_rate", "schedule"]),
        (_sgd_state, dict(learning_rate=jnp.ones(3)), ValueError, ["learning_rate", r"shape \(\)", r"\(3,\)"]),
        (_sgd_state, dict(learning_rate="fast"), TypeError, ["learning_rate", "fast"]),
        (_sgd_state, dict(group="decay", learning_rate=0.1), KeyError, ["decay"]),
        (
            _scheduled_state,
            dict(learning_rate=Schedule(_exp_decay, "exp_decay", {"init": 0.1})),
            ValueError,
            ["learning_rate", "structure"],
        ),
        # Ranges: the limits the optimizer function checks, kept in the state.
        (lambda: optlab.adam(0.1).init(PARAMS), dict(b1=1.0), ValueError, [r"`b1` \(=1.0\) must be in \[0.0, 1.0\)"]),
        (_sgd_state, dict(learning_rate=-0.1), ValueError, [r"`learning_rate` \(=-0.1\)"]),
        (_sgd_state, dict(learning_rate=float("inf")), ValueError, [r"`learning_rate` \(=inf\)"]),
        (lambda: optlab.sgd(0.1, momentum=0.9).init(PARAMS), dict(momentum=1.5), ValueError, [r"`momentum` \(=1.5\)"]),
        (lambda: optlab.rmsprop(0.1).init(PARAMS), dict(alpha=1.0), ValueError, [r"`alpha` \(=1.0\)"]),
        (lambda: optlab.rprop().init(PARAMS), dict(learning_rate=0.0), ValueError, [r"`learning_rate` \(=0.0\)"]),
        (lambda: optlab.swats().init(PARAMS), dict(b2=-0.5), ValueError, [r"`b2` \(=-0.5\)"]),
        (lambda: optlab.lbfgs(0.1).init(PARAMS), dict(learning_rate=0.0), ValueError, [r"`learning_rate` \(=0.0\)"]),
    ],
    ids=[
        "unknown", "compiled-out", "schedule-to-number", "number-to-schedule", "shape", "string", "group", "structure",
        "adam-b1", "sgd-negative-lr", "sgd-inf-lr", "sgd-momentum", "rmsprop-alpha", "rprop-lr", "swats-b2", "lbfgs-lr",
    ],
)
def test_set_hyperparams_errors(make_state, kwargs, exc, fragments):
    with pytest.raises(exc) as info:
        optlab.set_hyperparams(make_state(), **kwargs)
    for fragment in fragments:
        assert re.search(fragment, str(info.value)), str(info.value)


def test_limits_are_structure_not_data():
    # No extra leaves, and two optimizers of one kind share a tree structure (one jit
    # cache entry, interchangeable checkpoints) whatever their hyperparameter values.
    a, b = optlab.adam(0.1).init(PARAMS), optlab.adam(0.01, b1=0.5).init(PARAMS)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    assert len(jax.tree_util.tree_leaves(a)) == len(jax.tree_util.tree_leaves(a._replace(limits=None)))


def test_set_hyperparams_checks_only_concrete_values():
    # Inside jit the value is traced and cannot be checked; a hand-built with_hyperparams has no limits.
    state = optlab.adam(0.1).init(PARAMS)
    out = jax.jit(lambda s, b1: optlab.set_hyperparams(s, b1=b1))(state, jnp.float32(1.0))
    assert float(optlab.hyperparams(out)["b1"]) == 1.0
    own = optlab.with_hyperparams(lambda lr: optlab.scale(-lr), lr=0.1).init(PARAMS)
    assert float(optlab.hyperparams(optlab.set_hyperparams(own, lr=-5.0))["lr"]) == -5.0


def test_hyperparams_of_a_state_without_any():
    state = optlab.chain(optlab.clip(1.0), optlab.scale(-0.1)).init(PARAMS)
    with pytest.raises(ValueError, match="no hyperparameters"):
        optlab.hyperparams(state)
    with pytest.raises(ValueError, match="no hyperparameters"):
        optlab.set_hyperparams(state, learning_rate=0.1)


# --- parameter groups ----------------------------------------------------------------------


def test_parameter_groups_have_their_own_hyperparameters():
    params = {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}
    grads = {"kernel": jnp.full((2, 3), 0.5), "bias": jnp.full(3, -1.0)}
    tx = optlab.partition(
        {"decay": optlab.sgd(0.1, weight_decay=0.1), "no_decay": optlab.sgd(0.2, momentum=0.9)},
        optlab.weight_decay_labels,
    )
    state = tx.init(params)
    hp = optlab.hyperparams(state)
    assert set(hp) == {"decay", "no_decay"}
    assert set(hp["decay"]) == {"learning_rate", "weight_decay"}
    assert set(hp["no_decay"]) == {"learning_rate", "momentum"}
    np.testing.assert_allclose(hp["decay"]["learning_rate"], 0.1)
    np.testing.assert_allclose(hp["no_decay"]["learning_rate"], 0.2)

    one = optlab.set_hyperparams(state, group="no_decay", learning_rate=0.5)
    np.testing.assert_allclose(optlab.hyperparams(one)["decay"]["learning_rate"], 0.1)
    np.testing.assert_allclose(optlab.hyperparams(one)["no_decay"]["learning_rate"], 0.5)
    u, _ = tx.update(grads, one, params)
    np.testing.assert_allclose(u["kernel"], -0.1 * (0.5 + 0.1 * 1.0), rtol=1e-6)
    np.testing.assert_allclose(u["bias"], -0.5 * -1.0, rtol=1e-6)

    # Without `group`, every group that has the hyperparameter changes.
    both = optlab.set_hyperparams(state, learning_rate=0.3)
    assert {k: float(v["learning_rate"]) for k, v in optlab.hyperparams(both).items()} == pytest.approx(
        {"decay": 0.3, "no_decay": 0.3}
    )
    # `momentum` exists in one group only: set there, the other is left alone.
    mom = optlab.set_hyperparams(state, momentum=0.5)
    np.testing.assert_allclose(optlab.hyperparams(mom)["no_decay"]["momentum"], 0.5)
    assert "momentum" not in optlab.hyperparams(mom)["decay"]
    with pytest.raises(KeyError, match="momentum"):
        optlab.set_hyperparams(state, group="decay", momentum=0.5)
