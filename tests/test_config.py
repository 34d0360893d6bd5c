"""Tests of optlab.config: strict validation, optimizers and schedules by name, overrides, config files.

The references are the optlab functions called directly with the same arguments (the
config layer only routes names and arguments to them) and messages that must name
the offending key.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optlab
import optlab.train._fit as fit_module
from optlab import schedules
from optlab.config import (
    DEFAULTS,
    OPTIMIZERS,
    ConfigError,
    apply_overrides,
    build_optimizer,
    build_schedule,
    default_config,
    load_config_file,
    resolve,
)
from optlab.train import fit

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


def with_key(path: str, value) -> dict:
    """default_config() with ``path`` ("section.key" or "section") set to ``value``."""
    cfg = default_config()
    section, _, key = path.partition(".")
    if key:
        cfg.setdefault(section, {})[key] = value
    else:
        cfg[section] = value
    return cfg


# ---------------------------------------------------------------------------------------
# Errors name the key


BAD = [
    # (key, value, text the message must contain)
    ("bogus", {}, "bogus"),
    ("data.bogus", 1, "`data.bogus`"),
    ("train.epoch", 10, "`train.epoch`"),
    ("output.bogus", 1, "`output.bogus`"),
    ("optimizer.bogus", 1, "`optimizer.bogus`"),
    ("train", [1, 2], "`train`"),
    ("train.epochs", "ten", "`train.epochs` (='ten')"),
    ("train.epochs", 0, "`train.epochs` (=0)"),
    ("train.epochs", 2.5, "`train.epochs` (=2.5)"),
    ("train.checkpoint_every", -1, "`train.checkpoint_every`"),
    ("train.skip_nonfinite", "yes", "`train.skip_nonfinite` (='yes')"),
    ("train.seed", -1, "`train.seed`"),
    # jax keeps 32 bits of a seed: 2**32 would silently be seed 0, larger ones overflow.
    ("train.seed", 2**32, "`train.seed` (=4294967296) must be an integer in [0, 2**32)"),
    ("train.seed", 2**70, "`train.seed` (=1180591620717411303424)"),
    ("train.seed", 1.0, "`train.seed` (=1.0)"),
    ("train.loss", "mse", "`train.loss`"),
    ("train.label_smoothing", 1.0, "`train.label_smoothing`"),
    ("train.clip_global_norm", "big", "`train.clip_global_norm`"),
    ("train.clip_global_norm", 0.0, "`train.clip_global_norm`"),
    ("train.ema_decay", 1.5, "`train.ema_decay`"),
    ("data.name", "imagenet", "`data.name` (='imagenet')"),
    ("data.normalization", "zscore", "`data.normalization`"),
    ("data.batch_size", 0, "`data.batch_size`"),
    ("data.eval_batch_size", 0, "`data.eval_batch_size`"),
    ("data.limit_train", "ten", "`data.limit_train`"),
    ("data.limit_train", 0, "`data.limit_train`"),
    ("data.data_dir", 5, "`data.data_dir`"),
    ("output.plots", "no", "`output.plots`"),
    ("optimizer.name", "sgdd", "`optimizer.name` (='sgdd')"),
    # Values the optimizer function itself rejects: the message names the optimizer and the argument.
    ("optimizer.learning_rate", -0.1, "optimizer 'sgd': `learning_rate` (=-0.1)"),
    ("optimizer.learning_rate", "fast", "optimizer 'sgd': `learning_rate` (='fast')"),
    ("optimizer.momentum", 1.5, "optimizer 'sgd': `momentum` (=1.5)"),
    # sgd's learning rate has no default to check the type against: a list must still be refused here.
    ("optimizer.learning_rate", [0.1, 0.2], "`optimizer.learning_rate` (=[0.1, 0.2])"),
    ("optimizer.momentum", "high", "`optimizer.momentum`"),
    ("optimizer.accumulator_dtype", "flot32", "optimizer 'sgd': `accumulator_dtype` (='flot32')"),
    ("optimizer.learning_rate", {"schedule": "cosyne", "init_value": 0.1}, "`optimizer.learning_rate.schedule`"),
    ("optimizer.learning_rate", {"schedule": "cosine", "init_value": 0.1, "T_max": 10, "bogus": 1},
     "`optimizer.learning_rate.bogus`"),
    ("optimizer.learning_rate", {"schedule": "cosine", "init_value": 0.1, "T_max": -5}, "T_max"),
    ("optimizer.learning_rate", {"schedule": "cosine", "init_value": 0.1}, "`optimizer.learning_rate`"),
]


@pytest.mark.parametrize("key, value, expected", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_bad_config_raises_naming_the_key(key, value, expected):
    with pytest.raises(ConfigError) as info:
        resolve(with_key(key, value))
    assert expected in str(info.value)


def test_config_errors_come_before_data_or_compilation(tmp_path, monkeypatch):
    def not_reached(*args, **kwargs):
        raise AssertionError("a bad config must fail before the data loads and anything compiles")

    monkeypatch.setattr(fit_module._data, "load", not_reached)
    monkeypatch.setattr(jax, "jit", not_reached)
    with pytest.raises(ConfigError, match="learning_rate"):
        fit(with_key("optimizer.learning_rate", -1.0), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_unknown_model_argument_is_named():
    cfg = with_key("model.hiden", [64])
    resolve(cfg)  # the model section is checked against the model's signature when built
    with pytest.raises(ConfigError, match="hiden"):
        fit_module.Experiment(cfg)


def test_resolve_fills_defaults_and_keeps_given_values():
    out = resolve({"optimizer": {"name": "adam", "learning_rate": 0.01}, "train": {"epochs": 3}})
    assert set(out) == set(DEFAULTS)
    assert out["train"] == {**DEFAULTS["train"], "epochs": 3}
    assert out["data"] == DEFAULTS["data"]
    assert out["optimizer"] == {"name": "adam", "learning_rate": 0.01}
    assert resolve(out) == out  # idempotent: what a run folder's config.json holds resolves to itself


# ---------------------------------------------------------------------------------------
# Optimizers by name

# Non-default arguments, so that a name routed to the wrong function or an argument dropped shows.
OPTIMIZER_ARGS = {
    "sgd": {"learning_rate": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    "classical_momentum": {"learning_rate": 0.1, "momentum": 0.8},
    "nesterov_momentum": {"learning_rate": 0.1, "momentum": 0.8},
    "adagrad": {"learning_rate": 0.1, "lr_decay": 0.01},
    "rmsprop": {"learning_rate": 0.01, "alpha": 0.9, "centered": True},
    "adam": {"learning_rate": 0.01, "b1": 0.8, "amsgrad": True},
    "adamw": {"learning_rate": 0.01, "weight_decay": 0.1},
    "adadelta": {"learning_rate": 0.5, "rho": 0.8},
    "rprop": {"learning_rate": 0.01, "etas": [0.4, 1.3]},  # a list, as JSON gives it
    "adaptive_gains": {"learning_rate": 0.1, "increase": 0.1},
    "swats": {"learning_rate": 0.01, "b2": 0.99},
}


def test_optimizer_table_covers_every_registered_optimizer():
    assert set(OPTIMIZER_ARGS) == set(OPTIMIZERS)


def _run_steps(tx, steps=3):
    params = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array(0.3)}
    state = tx.init(params)
    for i in range(steps):
        grads = jax.tree_util.tree_map(lambda p: p * (i + 1) - 0.1, params)
        updates, state = tx.update(grads, state, params)
        params = optlab.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("name", sorted(OPTIMIZER_ARGS))
def test_every_optimizer_is_constructible_by_name(name):
    args = OPTIMIZER_ARGS[name]
    from_config, state = _run_steps(build_optimizer({"name": name, **args}))
    direct = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    expected, _ = _run_steps(OPTIMIZERS[name](**direct))
    for k in expected:
        np.testing.assert_array_equal(from_config[k], expected[k])
    assert float(optlab.hyperparams(state)["learning_rate"]) == pytest.approx(args["learning_rate"])


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "sgd", "momentum": 0.9, "accumulator_dtype": "float32"},
        {"name": "adagrad", "accumulator_dtype": "float32"},
        {"name": "adam", "mu_dtype": "float32"},
    ],
    ids=["sgd", "adagrad", "adam"],
)
def test_state_dtype_from_a_config(spec):
    # A config names the dtype as a string: float32 state for bfloat16 parameters.
    opt = build_optimizer({"learning_rate": 0.1, **spec})
    state = opt.init({"w": jnp.ones(3, jnp.bfloat16)})
    assert {x.dtype for x in jax.tree_util.tree_leaves(state) if x.ndim > 0} == {jnp.dtype(jnp.float32)}


# ---------------------------------------------------------------------------------------
# Schedules by name

SCHEDULE_ARGS = {
    "constant": {"value": 0.1},
    "step_decay": {"init_value": 0.1, "step_size": 3, "gamma": 0.5},
    "multistep": {"init_value": 0.1, "milestones": [2, 5], "gamma": 0.5},
    "exponential": {"init_value": 0.1, "gamma": 0.9},
    "exp_decay": {"init_value": 0.1, "k": 0.2},
    "staircase_exponential": {"init_value": 0.1, "decay_rate": 0.5, "decay_steps": 3, "staircase": True},
    "halving": {"init_value": 0.1, "every": 4},
    "inverse_time": {"init_value": 0.1, "k": 0.5},
    "cosine": {"init_value": 0.1, "T_max": 10, "eta_min": 0.001},
    "cosine_warm_restarts": {"init_value": 0.1, "T_0": 3, "T_mult": 2},
    "linear": {"init_value": 0.0, "end_value": 0.1, "transition_steps": 5},
    "linear_warmup": {"init_value": 0.0, "peak_value": 0.1, "warmup_steps": 5},
    "polynomial": {"init_value": 0.1, "total_steps": 10, "power": 2.0},
    "piecewise_constant": {"boundaries": [3, 6], "values": [0.1, 0.05, 0.01]},
    "cyclic": {"base_lr": 0.01, "max_lr": 0.1, "step_size_up": 4, "mode": "triangular2"},
    "cyclic_momentum": {"base_momentum": 0.8, "max_momentum": 0.9, "step_size_up": 4},
    "one_cycle": {"max_lr": 0.1, "total_steps": 20, "pct_start": 0.25, "anneal_strategy": "linear"},
}
# Schedules built from other schedules: given as nested dicts.
NESTED = {
    "join": ({"schedules": [{"schedule": "linear_warmup", "init_value": 0.0, "peak_value": 0.1, "warmup_steps": 4},
                            {"schedule": "cosine", "init_value": 0.1, "T_max": 10}],
              "boundaries": [4]},
             lambda: schedules.join([schedules.linear_warmup(0.0, 0.1, 4), schedules.cosine(0.1, 10)], [4])),
}
# lambda_lr takes a Python callable; per_epoch's argument is called `schedule`, the key
# that names the kind in a config dict, so it has no config form either.
NOT_PLAIN_DATA = {"lambda_lr", "per_epoch"}
STEPS = jnp.arange(25)


def test_schedule_tables_cover_every_schedule():
    names = {n for n in schedules.__all__ if n not in ("Schedule", "OneCycle", "as_param")}
    assert set(SCHEDULE_ARGS) | set(NESTED) | NOT_PLAIN_DATA == names


@pytest.mark.parametrize("name", sorted(SCHEDULE_ARGS))
def test_every_schedule_is_constructible_from_a_dict(name):
    args = SCHEDULE_ARGS[name]
    built = build_schedule({"schedule": name, **args}, "optimizer.learning_rate")
    direct = getattr(schedules, name)(**args)
    if name == "one_cycle":  # as a learning rate, a one-cycle policy means its rate curve
        direct = direct.learning_rate
    np.testing.assert_array_equal(jax.vmap(built)(STEPS), jax.vmap(direct)(STEPS))
    # And through an optimizer: the rate used by update k is schedule(k - 1).
    _, state = _run_steps(build_optimizer({"name": "sgd", "learning_rate": {"schedule": name, **args}}), steps=4)
    assert float(optlab.hyperparams(state)["learning_rate"]) == pytest.approx(float(direct(3)), rel=1e-6)


@pytest.mark.parametrize("name", sorted(NESTED))
def test_nested_schedules_are_constructible_from_dicts(name):
    spec, direct = NESTED[name]
    built = build_schedule({"schedule": name, **spec}, "optimizer.learning_rate")
    np.testing.assert_array_equal(jax.vmap(built)(STEPS), jax.vmap(direct())(STEPS))


def test_schedule_kind_must_be_a_name():
    spec = {"schedule": {"schedule": "step_decay", "init_value": 0.1, "step_size": 2}, "steps_per_epoch": 3}
    with pytest.raises(ConfigError, match="`optimizer.learning_rate.schedule`"):
        build_schedule(spec, "optimizer.learning_rate")


def test_step_decay_from_a_config_matches_its_closed_form():
    built = build_schedule({"schedule": "step_decay", "init_value": 0.1, "step_size": 3, "gamma": 0.5}, "lr")
    expected = [0.1 * 0.5 ** (t // 3) for t in range(25)]
    np.testing.assert_allclose(jax.vmap(built)(STEPS), expected, rtol=1e-6)


def test_schedule_for_a_non_learning_rate_hyperparameter():
    tx = build_optimizer({"name": "sgd", "learning_rate": 0.1,
                          "momentum": {"schedule": "cyclic_momentum", **SCHEDULE_ARGS["cyclic_momentum"]}})
    _, state = _run_steps(tx, steps=3)
    expected = schedules.cyclic_momentum(**SCHEDULE_ARGS["cyclic_momentum"])(2)
    assert float(optlab.hyperparams(state)["momentum"]) == pytest.approx(float(expected), rel=1e-6)


# ---------------------------------------------------------------------------------------
# Overrides

OVERRIDES = [
    ("optimizer.learning_rate=0.1", ("optimizer", "learning_rate"), 0.1),
    ("train.epochs=3", ("train", "epochs"), 3),
    ("train.epochs = 3", ("train", "epochs"), 3),
    ("optimizer.name=adam", ("optimizer", "name"), "adam"),
    ("optimizer.name='adam'", ("optimizer", "name"), "adam"),
    ("model.hidden=[64, 32]", ("model", "hidden"), [64, 32]),
    ("train.skip_nonfinite=True", ("train", "skip_nonfinite"), True),
    ("train.clip_global_norm=None", ("train", "clip_global_norm"), None),
    ("output.name=a=b", ("output", "name"), "a=b"),
    ("output.dir=/tmp/some dir", ("output", "dir"), "/tmp/some dir"),
    ("optimizer.learning_rate={'schedule': 'cosine', 'init_value': 0.1, 'T_max': 9}",
     ("optimizer", "learning_rate"), {"schedule": "cosine", "init_value": 0.1, "T_max": 9}),
]


@pytest.mark.parametrize("item, path, expected", OVERRIDES, ids=[o[0] for o in OVERRIDES])
def test_apply_overrides_parses_values(item, path, expected):
    base = default_config()
    out = apply_overrides(base, [item])
    section, key = path
    assert out[section][key] == expected
    assert type(out[section][key]) is type(expected)
    assert base == default_config()  # the input is not modified


def test_overrides_reach_into_nested_dicts_and_apply_in_order():
    base = with_key("optimizer.learning_rate", {"schedule": "cosine", "init_value": 0.1, "T_max": 9})
    out = apply_overrides(base, ["optimizer.learning_rate.T_max=20", "train.epochs=2", "train.epochs=4"])
    assert out["optimizer"]["learning_rate"] == {"schedule": "cosine", "init_value": 0.1, "T_max": 20}
    assert out["train"]["epochs"] == 4
    assert resolve(out)["train"]["epochs"] == 4


@pytest.mark.parametrize("item, expected", [
    ("train.epochs", "key.sub=value"),
    ("train.epochs.x=1", "'epochs' is not a section"),
])
def test_malformed_overrides_raise(item, expected):
    with pytest.raises(ConfigError, match=expected):
        apply_overrides(default_config(), [item])


def test_override_of_an_unknown_key_fails_in_resolve():
    with pytest.raises(ConfigError, match="`train.epoch`"):
        resolve(apply_overrides(default_config(), ["train.epoch=3"]))


# ---------------------------------------------------------------------------------------
# Config files


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_file_resolves(path):
    cfg = resolve(load_config_file(path))
    build_optimizer(cfg["optimizer"])
    assert cfg["data"]["name"] in ("digits", "mnist", "fashion_mnist", "cifar10")


def test_digits_config_file_is_the_embedded_default():
    path = next(p for p in CONFIGS if p.name == "digits_mlp.py")
    assert load_config_file(path) == default_config()


@pytest.mark.parametrize("text, expected", [
    (None, "does not exist"),
    ("X = 1\n", "defines no get_config()"),
    ("def get_config():\n    return [1]\n", "must return a dict"),
])
def test_bad_config_files(tmp_path, text, expected):
    path = tmp_path / "cfg.py"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config_file(path)


@pytest.mark.parametrize("seed", [0, 2**31, 2**32 - 1])
def test_seeds_up_to_32_bits_are_accepted(seed):
    assert resolve(with_key("train.seed", seed))["train"]["seed"] == seed
