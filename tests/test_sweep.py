"""Tests for optlab.sweep: member specs, equality with solo runs, sharding, divergence, groups, reports, CLI.

The reference for every trained member is `optlab.train.fit` run alone on the
same config (the ordinary, unbatched training loop). Configs are the digits
MLP shrunk to 128 training examples (4 steps of 32 per epoch), a 16-unit
hidden layer and 2 epochs, so every sweep compiles in about a second.
Compiled sweeps and solo fits are cached per module, as several tests read
the same ones.
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import math
import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from optlab import sweep
from optlab.config import ConfigError, default_config, resolve
from optlab.sweep import _run
from optlab.train import DivergenceError, fit

STEPS_PER_EPOCH = 4  # limit_train 128 / batch_size 32
# Where each short sweep name lives in the config (written out here, not read from optlab).
SHORT = {
    "learning_rate": "optimizer.learning_rate",
    "momentum": "optimizer.momentum",
    "seed": "train.seed",
    "init": "model.init",
    "init_scale": "model.init_scale",
}
# Six members: both momenta (0 is data, not structure), three seeds, lr crossing them.
MEMBERS = sweep.zip(
    learning_rate=[0.05, 0.2, 0.1, 0.05, 0.2, 0.3],
    momentum=[0.0, 0.9, 0.5, 0.9, 0.0, 0.9],
    seed=[0, 1, 2, 0, 1, 2],
)
# Compared with a solo fit: momentum 0 with seed 1, momentum 0.9 with seed 2, neither the member the
# group was built from (the others are compared across strategies).
SOLO_CHECKED = (4, 5)


def tiny_config(epochs: int = 2) -> dict:
    cfg = default_config()  # digits, MLP, sgd lr 0.05 momentum 0.9, batch 32
    cfg["data"]["limit_train"] = 128
    cfg["model"]["hidden"] = [16]
    cfg["train"].update(epochs=epochs, checkpoint_every=0)
    cfg["output"] = {"plots": False}
    return cfg


def with_values(cfg: dict, values: dict) -> dict:
    """The config of one member, built by hand from its dotted (or short) keys."""
    cfg = copy.deepcopy(cfg)
    for key, value in values.items():
        *parents, leaf = SHORT.get(key, key).split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def params(state) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(state.params)]


@pytest.fixture(scope="module")
def solo(tmp_path_factory):
    """``solo(cfg)``: `fit` on that config alone (cached by config)."""
    cache = {}

    def run_alone(cfg: dict, **fit_kwargs) -> dict:
        key = json.dumps([cfg, fit_kwargs], sort_keys=True)
        if key not in cache:
            run_dir = tmp_path_factory.mktemp("solo") / "run"
            cache[key] = fit(cfg, run_dir=run_dir, quiet=True, **fit_kwargs)
        return cache[key]

    return run_alone


_SWEEPS: dict = {}


def cached_sweep(name: str, **kwargs):
    """The six-member sweep run once per setting."""
    if name not in _SWEEPS:
        kwargs.setdefault("max_in_flight", 6)
        _SWEEPS[name] = sweep.run(tiny_config(), MEMBERS, quiet=True, **kwargs)
    return _SWEEPS[name]


# ---------------------------------------------------------------- member specs


def as_set(members: list[dict]) -> set:
    return {tuple(sorted(m.items())) for m in members}


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        (
            sweep.grid(learning_rate=[0.01, 0.1, 1.0], momentum=[0.0, 0.9]),
            [{"learning_rate": lr, "momentum": m} for lr in (0.01, 0.1, 1.0) for m in (0.0, 0.9)],
        ),
        (
            sweep.grid(learning_rate=[0.01, 0.1], seeds=3),
            [{"learning_rate": lr, "seed": s} for lr in (0.01, 0.1) for s in (0, 1, 2)],
        ),
        (
            sweep.grid(learning_rate=[0.1], momentum=[0.0, 0.5], seeds=[5, 7]),
            [{"learning_rate": 0.1, "momentum": m, "seed": s} for m in (0.0, 0.5) for s in (5, 7)],
        ),
        (sweep.grid(seeds=2), [{"seed": 0}, {"seed": 1}]),
        (
            sweep.zip(learning_rate=[0.01, 0.1], weight_decay=[0.0, 1e-4]),
            [{"learning_rate": 0.01, "weight_decay": 0.0}, {"learning_rate": 0.1, "weight_decay": 1e-4}],
        ),
        (
            sweep.zip(learning_rate=[0.01, 0.1], seeds=2),
            [{"learning_rate": lr, "seed": s} for lr in (0.01, 0.1) for s in (0, 1)],
        ),
    ],
    ids=["grid-2-axes", "grid-seeds-int", "grid-seeds-list", "seeds-only", "zip", "zip-seeds"],
)
def test_spec_members(members, expected):
    assert len(members) == len(expected)
    assert as_set(members) == as_set(expected)


def test_random_reproducible_and_log_uniform():
    axes = dict(learning_rate=sweep.log_uniform(1e-4, 1.0), momentum=sweep.uniform(0.0, 0.99), act=["relu", "tanh"])
    a = sweep.random(400, seed=3, **axes)
    assert a == sweep.random(400, seed=3, **axes)
    assert a != sweep.random(400, seed=4, **axes)
    lr = np.array([m["learning_rate"] for m in a])
    mom = np.array([m["momentum"] for m in a])
    assert lr.min() >= 1e-4 and lr.max() <= 1.0
    assert 0.0 <= mom.min() and mom.max() <= 0.99
    # Log-uniform: half the draws lie below the geometric midpoint 1e-2 (uniform would put 1% there).
    assert 0.4 < np.mean(lr < 1e-2) < 0.6
    assert 0.4 < np.mean(mom < 0.495) < 0.6
    assert {m["act"] for m in a} == {"relu", "tanh"}
    seeded = sweep.random(3, seed=0, seeds=2, learning_rate=sweep.log_uniform(1e-3, 1e-1))
    assert len(seeded) == 6 and {m["seed"] for m in seeded} == {0, 1}
    assert len({m["learning_rate"] for m in seeded}) == 3


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: sweep.grid(learning_rate=[]), ValueError, "learning_rate.*empty"),
        (lambda: sweep.grid(learning_rate=0.1), TypeError, "learning_rate.*must be a list"),
        (lambda: sweep.grid(), ValueError, "at least one"),
        (lambda: sweep.zip(learning_rate=[0.1, 0.2], momentum=[0.0]), ValueError, "equal length"),
        (lambda: sweep.log_uniform(0.0, 1.0), ValueError, "0 < low"),
        (lambda: sweep.log_uniform(1.0, 0.1), ValueError, "low"),
        (lambda: sweep.uniform(1.0, 1.0), ValueError, "low"),
        (lambda: sweep.random(0, learning_rate=sweep.log_uniform(1e-3, 1.0)), ValueError, "`num` \\(=0\\)"),
        (lambda: sweep.grid(learning_rate=[0.1], seeds=[]), ValueError, "seeds"),
    ],
)
def test_spec_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


# ---------------------------------------------------------------- equality with solo runs


@pytest.mark.parametrize("strategy", ["vmap", "map", "chunked"])
def test_strategy_matches_solo_fit(strategy, solo):
    res = cached_sweep(strategy, strategy=strategy, num_devices=1, chunk_size=4)
    assert [r["member"] for r in res.rows] == list(range(len(MEMBERS)))
    assert res.info["groups"][0]["strategy"] == strategy
    if strategy == "chunked":  # 6 members on one device: one piece, a chunk of 4 then one of 2, no copies
        assert (res.info["groups"][0]["pieces"], res.info["groups"][0]["padding"]) == (1, 0)
    for i in SOLO_CHECKED:
        row = res.rows[i]
        assert row["optimizer.learning_rate"] == MEMBERS[i]["learning_rate"]
        assert row["train.seed"] == MEMBERS[i]["seed"]
        ref = solo(with_values(tiny_config(), MEMBERS[i]))
        for got, want in zip(params(res.states[i]), params(ref["state"]), strict=True):
            if strategy == "map":  # each member alone inside lax.map: the very same arithmetic
                np.testing.assert_array_equal(got, want)
            else:  # batched matmuls may sum in another order
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        hist = ref["history"]
        np.testing.assert_allclose(res.curves["train_loss"][i], [h["train_loss"] for h in hist], rtol=1e-5)
        np.testing.assert_allclose(res.curves["test_accuracy"][i], [h["test_accuracy"] for h in hist], atol=1.5 / 355)
        assert row["final_test_accuracy"] == pytest.approx(hist[-1]["test_accuracy"], abs=1.5 / 355)
        assert row["diverged_at_step"] is None


@pytest.mark.parametrize("strategy", ["vmap", "chunked"])
def test_strategies_agree_on_every_member(strategy):
    ref = cached_sweep("map", strategy="map", num_devices=1)
    res = cached_sweep(strategy, strategy=strategy, num_devices=1, chunk_size=4)
    for i in range(len(MEMBERS)):
        for got, want in zip(params(res.states[i]), params(ref.states[i]), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.curves["test_loss"], ref.curves["test_loss"], rtol=1e-5)


def test_zero_momentum_is_data_one_group():
    res = cached_sweep("vmap", strategy="vmap", num_devices=1, chunk_size=4)
    assert {r["optimizer.momentum"] for r in res.rows} == {0.0, 0.5, 0.9}
    assert len(res.info["groups"]) == 1 and res.info["groups"][0]["members"] == 6
    assert {r["group"] for r in res.rows} == {0}


# ---------------------------------------------------------------- sharding over devices


def _capture_program_io(monkeypatch) -> dict:
    """Record the stacked states going into and out of every compiled epoch."""
    seen: dict = {"in": [], "out": []}
    original = _run._GroupProgram.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        epoch = self.epoch

        def recording_epoch(states, *rest):
            out = epoch(states, *rest)
            seen["in"].append(states)  # from epoch 2 on: the state after divergence freezing
            seen["out"].append(out[0])
            return out

        self.epoch = recording_epoch

    monkeypatch.setattr(_run._GroupProgram, "__init__", init)
    return seen


@pytest.mark.parametrize(
    ("num_devices", "max_in_flight", "used", "piece", "pieces"),
    # 6 members on 8 devices: one a device on 6 of them (2 would hold only padding);
    # 2 a device on 3 of 4; 3 a device on 2.
    [(8, 6, 6, 6, 1), (4, 6, 3, 6, 1), (2, 6, 2, 6, 1)],
)
def test_sharded_equals_one_device(monkeypatch, num_devices, max_in_flight, used, piece, pieces):
    seen = _capture_program_io(monkeypatch)
    res = sweep.run(tiny_config(), MEMBERS, strategy="vmap", num_devices=num_devices,
                    max_in_flight=max_in_flight, quiet=True)
    assert res.info["devices"] == num_devices
    group = res.info["groups"][0]
    assert (group["devices"], group["in_flight"], group["pieces"]) == (used, piece, pieces)
    assert len(seen["in"]) == len(seen["out"]) == 2  # one piece, two epochs
    for state in seen["in"] + seen["out"]:
        for leaf in jax.tree_util.tree_leaves(state.params):
            assert leaf.shape[0] == piece
            assert leaf.sharding.spec == PartitionSpec("members")
            assert len(leaf.sharding.device_set) == used
            assert {s.data.shape[0] for s in leaf.addressable_shards} == {piece // used}
    ref = cached_sweep("vmap", strategy="vmap", num_devices=1, chunk_size=4)
    for i in range(len(MEMBERS)):
        for got, want in zip(params(res.states[i]), params(ref.states[i]), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.curves["test_accuracy"], ref.curves["test_accuracy"], atol=1.5 / 355)


def test_members_that_fit_run_as_one_piece_padded_up_to_whole_devices():
    # 5 members on 2 devices: 3 + 3 with one copy, not 4 members and then 1 alone for every epoch.
    res = sweep.run(tiny_config(epochs=1), MEMBERS[:5], strategy="map", num_devices=2, quiet=True)
    group = res.info["groups"][0]
    assert (group["devices"], group["in_flight"], group["pieces"]) == (2, 6, 1)
    assert len(res.rows) == 5


@pytest.mark.parametrize(("members", "devices", "used"), [(1, 2, 1), (7, 2, 2), (6, 8, 6), (9, 8, 5), (16, 8, 8)])
def test_devices_for_leaves_no_device_with_padding_only(members, devices, used):
    chosen = _run.devices_for(members, list(range(devices)))
    assert chosen == list(range(used))
    per_device = -(-members // used)
    assert (used - 1) * per_device < members <= used * per_device  # every chosen device holds a real member


@pytest.mark.parametrize(
    ("model", "members", "devices", "expected"),
    [("mlp", 1, 1, "map"), ("mlp", 8, 1, "vmap"), ("mlp", 9, 1, "map"), ("mlp", 16, 2, "vmap"),
     ("mlp", 64, 2, "map"), ("convnet", 2, 1, "map"), ("convnet", 64, 2, "map")],
)
def test_auto_strategy_on_the_cpu(model, members, devices, expected):
    cfg = resolve({**tiny_config(), "model": {"name": model}})
    assert _run.choose_strategy(cfg, members, "auto", devices) == expected
    assert _run.choose_strategy(cfg, members, "chunked", devices) == "chunked"  # forced strategies stay


@pytest.mark.parametrize(
    ("members", "num_devices", "chunk_size", "max_in_flight", "expected"),
    # expected: (devices used, trainings run at once, pieces, padding copies trained).
    [
        (6, 8, 4, None, (6, 6, 1, 0)),  # one member a device: chunks of 1, nothing padded (was 24 at once)
        (6, 8, 4, 2, (2, 2, 3, 0)),  # the cap of 2 members at once holds: 2 devices, 3 pieces
        (6, 4, 2, 4, (3, 3, 2, 0)),  # 3 + 3 on 3 devices rather than 4 + 2 padded up to chunks of 2
        (5, 2, 4, None, (2, 6, 1, 1)),  # 3 + 3 over 2 devices: one copy, not a chunk of 4 per device
        (5, 2, 4, 6, (2, 6, 1, 1)),  # the same within a cap of 6
        (6, 2, 2, None, (2, 6, 1, 0)),  # 3 a device: a chunk of 2 and a chunk of 1, no copy
    ],
)
def test_chunked_honours_max_in_flight_without_padding_chunks(
    monkeypatch, members, num_devices, chunk_size, max_in_flight, expected
):
    seen = _capture_program_io(monkeypatch)
    res = sweep.run(tiny_config(), MEMBERS[:members], strategy="chunked", num_devices=num_devices,
                    chunk_size=chunk_size, max_in_flight=max_in_flight, quiet=True)
    group = res.info["groups"][0]
    used, at_once, pieces, padding = expected
    assert (group["devices"], group["in_flight"], group["pieces"], group.get("padding")) == expected
    if max_in_flight is not None:
        assert group["in_flight"] <= max_in_flight
    # What the compiled epoch really received: `pieces` stacks of `at_once` members, twice (two epochs).
    assert len(seen["in"]) == 2 * pieces
    for state in seen["in"]:
        for leaf in jax.tree_util.tree_leaves(state.params):
            assert leaf.shape[0] == at_once
            assert len(leaf.sharding.device_set) == used
    assert pieces * at_once - members == padding
    ref = cached_sweep("map", strategy="map", num_devices=1)  # the same members, one after another
    for i in range(members):
        for got, want in zip(params(res.states[i]), params(ref.states[i]), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.curves["test_loss"], ref.curves["test_loss"][:members], rtol=1e-5)


@pytest.mark.parametrize(
    ("cfg", "n", "devices", "error", "match"),
    [
        ({"model": {"name": "mlp"}}, 0, 1, ValueError, r"`n` \(=0\) must be >= 1"),
        ({"model": {"name": "mlp"}}, -3, 1, ValueError, r"`n` \(=-3\) must be >= 1"),
        ({"model": {"name": "mlp"}}, 2.5, 1, TypeError, r"`n` \(=2\.5\) must be an integer"),
        ({"model": {"name": "mlp"}}, True, 1, TypeError, r"`n` \(=True\) must be an integer"),
        ({"model": {"name": "mlp"}}, 4, 0, ValueError, r"`devices` \(=0\) must be >= 1"),
        ({"model": {"name": "mlp"}}, 4, -1, ValueError, r"`devices` \(=-1\) must be >= 1"),
        ({"model": {"name": "mlp"}}, 4, 1.0, TypeError, r"`devices` \(=1\.0\) must be an integer"),
        (["mlp"], 4, 1, TypeError, r"`cfg` \(=\['mlp'\]\) must be a config dict"),
        ({"model": "mlp"}, 4, 1, TypeError, r"`cfg\[\"model\"\]` \(='mlp'\) must be a dict"),
    ],
)
@pytest.mark.parametrize("requested", ["auto", "vmap"])
def test_choose_strategy_rejects_bad_arguments(cfg, n, devices, error, match, requested):
    with pytest.raises(error, match=match):
        _run.choose_strategy(cfg, n, requested, devices)


def test_choose_strategy_takes_integral_numbers_and_the_default_model():
    conv = {"model": {"name": "convnet"}}
    assert _run.choose_strategy(conv, np.int64(4), "auto", np.int32(2)) == "map"  # numpy integers are integers
    # No model section: the default model (an MLP), as `run` resolves it, not a KeyError.
    assert _run.choose_strategy({}, 4, "auto") == _run.choose_strategy({"model": {"name": "mlp"}}, 4, "auto") == "vmap"


# ---------------------------------------------------------------- divergence


def test_diverging_member_is_frozen_and_flagged(solo):
    # The learning rate is 0.05 for the first epoch (4 steps), then 0.05 * gamma: gamma = 1e13
    # blows up during epoch 2, after a finite epoch 1, so the frozen state is not the initial one.
    cfg = tiny_config(epochs=3)
    cfg["optimizer"]["learning_rate"] = {"schedule": "step_decay", "init_value": 0.05, "step_size": 4, "gamma": 1.0}
    key = "optimizer.learning_rate.gamma"
    res = sweep.run(cfg, sweep.grid(**{key: [0.5, 1e13]}), strategy="vmap", num_devices=1,
                    max_in_flight=2, quiet=True)
    assert len(res.info["groups"]) == 1
    with pytest.raises(DivergenceError) as err:
        solo(with_values(cfg, {key: 1e13}))
    epoch, step = map(int, re.search(r"at epoch (\d+), step (\d+) of", str(err.value)).groups())
    assert epoch == 2
    assert res.rows[1]["diverged_at_step"] == (epoch - 1) * STEPS_PER_EPOCH + step
    assert math.isnan(res.rows[1]["final_test_accuracy"])
    assert np.all(np.isnan(res.curves["test_accuracy"][1, epoch - 1 :]))  # flagged from then on
    frozen = solo(with_values(cfg, {key: 1e13}), stop_after_epochs=epoch - 1)["state"]
    for got, want in zip(params(res.states[1]), params(frozen), strict=True):
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert res.rows[0]["diverged_at_step"] is None
    ref = solo(with_values(cfg, {key: 0.5}))["state"]
    for got, want in zip(params(res.states[0]), params(ref), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert res.best["member"] == 0


# ---------------------------------------------------------------- groups and data-carried values


def test_structural_groups_compile_once_each(monkeypatch, solo):
    traces: dict[str, int] = {}

    class CountingExperiment(_run.Experiment):
        def __init__(self, cfg):
            super().__init__(cfg)
            name, inner = self.cfg["optimizer"]["name"], self.train_epoch

            def train_epoch(*args):  # runs once per trace of the compiled epoch
                traces[name] = traces.get(name, 0) + 1
                return inner(*args)

            self.train_epoch = train_epoch

    monkeypatch.setattr(_run, "Experiment", CountingExperiment)
    members = sweep.grid(**{"optimizer.name": ["sgd", "adam"], "learning_rate": [0.003, 0.01]})
    res = sweep.run(tiny_config(), members, strategy="vmap", num_devices=1, max_in_flight=2, quiet=True)
    assert traces == {"sgd": 1, "adam": 1}  # two epochs each, one trace (one compile) each
    assert [g["members"] for g in res.info["groups"]] == [2, 2]
    assert [r["group"] for r in res.rows] == [0, 0, 1, 1]
    # The second adam member (not the one its group was built from) trains with its own lr;
    # adam has no momentum argument, so the base config's momentum is dropped for it.
    adam = tiny_config()
    adam["optimizer"] = {"name": "adam", "learning_rate": 0.01}
    ref = solo(adam)["state"]
    for got, want in zip(params(res.states[3]), params(ref), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_schedule_parameter_sweep(solo):
    cfg = tiny_config()
    cfg["optimizer"]["learning_rate"] = {"schedule": "cosine", "init_value": 0.1, "T_max": 100}
    inits = [0.05, 0.2]
    res = sweep.run(cfg, sweep.grid(**{"optimizer.learning_rate.init_value": inits}), strategy="vmap",
                    num_devices=1, max_in_flight=2, quiet=True)
    assert len(res.info["groups"]) == 1
    # The logged rate is the one of each epoch's last update, at step count 4 e + 3 (closed form).
    t = np.arange(1, 3) * STEPS_PER_EPOCH - 1
    for i, v in enumerate(inits):
        np.testing.assert_allclose(res.curves["learning_rate"][i], v * (1 + np.cos(np.pi * t / 100)) / 2, rtol=1e-6)
    ref = solo(with_values(cfg, {"optimizer.learning_rate.init_value": 0.2}))["state"]
    for got, want in zip(params(res.states[1]), params(ref), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_init_sweep_one_group(solo):
    members = sweep.grid(init=["he_normal", "xavier_uniform"], init_scale=[0.5, 1.0])
    res = sweep.run(tiny_config(), members, strategy="vmap", num_devices=1, max_in_flight=4, quiet=True)
    assert len(res.info["groups"]) == 1
    assert [(r["model.init"], r["model.init_scale"]) for r in res.rows] == [
        (m["init"], m["init_scale"]) for m in members
    ]
    i = members.index({"init": "xavier_uniform", "init_scale": 0.5})
    ref = solo(with_values(tiny_config(), members[i]))["state"]
    for got, want in zip(params(res.states[i]), params(ref), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    first = [params(s)[0] for s in res.states]
    assert all(not np.array_equal(first[0], f) for f in first[1:])


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("members", "kwargs", "error", "match"),
    [
        ([], {}, ValueError, "non-empty"),
        ([{"betas": [0.9, 0.99]}], {}, ValueError, r"`betas`.*learning_rate.*momentum"),
        ([{"optimizer.nesterov_typo": 1.0}], {}, ConfigError, r"optimizer.nesterov_typo.*valid:.*learning_rate"),
        ([{"learning_rate": "0.1"}], {}, (ValueError, TypeError), r"learning_rate.*'0\.1'"),
        ([{"learning_rate": -0.1}], {}, ValueError, r"learning_rate.*-0\.1"),
        ([{"learning_rate": 0.1}, {"momentum": 1.5}], {}, ValueError, r"member 1.*momentum.*1\.5"),
        ([{"optimizer.name": "sgdd"}], {}, ValueError, "sgdd"),
        ([{"init": "he_normal"}, {"init": "glorot"}], {}, ValueError, r"member 1.*init.*glorot"),
        ([{"init_scale": -1.0}], {}, ValueError, r"init_scale.*-1\.0"),
        ([{"model.widht": 3}], {}, (ValueError, TypeError), "widht"),
        ([{"learning_rate": 0.1}], {"num_devices": 9}, ValueError, r"`num_devices` \(=9\)"),
        ([{"learning_rate": 0.1}], {"num_devices": 0}, ValueError, r"`num_devices` \(=0\)"),
        ([{"learning_rate": 0.1}], {"strategy": "pmap"}, ValueError, r"`strategy` \(='pmap'\)"),
        ([{"learning_rate": 0.1}], {"chunk_size": 0}, ValueError, r"`chunk_size` \(=0\)"),
        ([{"learning_rate": 0.1}], {"max_in_flight": 0}, ValueError, r"`max_in_flight` \(=0\)"),
        # A bool is not a count (True would silently mean 1), nor is a float.
        ([{"learning_rate": 0.1}], {"chunk_size": True}, TypeError, r"`chunk_size` \(=True\) must be an integer"),
        ([{"learning_rate": 0.1}], {"num_devices": True}, TypeError, r"`num_devices` \(=True\) must be an integer"),
        ([{"learning_rate": 0.1}], {"num_devices": False}, TypeError, r"`num_devices` \(=False\) must be an integer"),
        ([{"learning_rate": 0.1}], {"max_in_flight": True}, TypeError, r"`max_in_flight` \(=True\) must be an integer"),
        ([{"learning_rate": 0.1}], {"chunk_size": 2.0}, TypeError, r"`chunk_size` \(=2\.0\) must be an integer"),
    ],
)
def test_bad_input_fails_before_anything_compiles(monkeypatch, members, kwargs, error, match):
    def no_experiment(*args, **kw):
        raise AssertionError("the sweep got as far as loading data and compiling")

    monkeypatch.setattr(_run, "Experiment", no_experiment)
    with pytest.raises(error, match=match):
        sweep.run(tiny_config(), members, quiet=True, **kwargs)


# ---------------------------------------------------------------- reports, ensembles, CLI


def test_report_files_and_ensemble(tmp_path):
    out = tmp_path / "ens"
    ens = sweep.ensemble(tiny_config(), 3, strategy="vmap", num_devices=1, max_in_flight=3, quiet=True,
                         out_dir=out, plots=True)
    res = ens["sweep"]
    assert len(ens["member_accuracies"]) == 3
    # The ensemble re-evaluates each member's state itself: it must see what the sweep saw.
    np.testing.assert_allclose(ens["member_accuracies"], [r["final_test_accuracy"] for r in res.rows], atol=1e-6)
    assert 0.0 <= ens["ensemble_accuracy"] <= 1.0
    assert all(0.0 <= a <= 1.0 for a in ens["member_accuracies"])

    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(r["member"]) for r in table] == [0, 1, 2]
    assert [int(r["train.seed"]) for r in table] == [0, 1, 2]
    acc = [float(r["final_test_accuracy"]) for r in table]
    assert acc == [r["final_test_accuracy"] for r in res.rows]
    md = (out / "results.md").read_text()
    table_lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert len(table_lines) == 2 + 3  # header, rule, one row per member
    assert "train.seed" in table_lines[0]
    best = json.loads((out / "best.json").read_text())
    assert best["final_test_accuracy"] == max(acc) and best["member"] == int(np.argmax(acc))
    with np.load(out / "curves.npz") as curves:
        assert curves["test_accuracy"].shape == (3, 2)
        np.testing.assert_array_equal(curves["test_accuracy"][:, -1], acc)
    assert (out / "plots" / "train_seed.png").stat().st_size > 1000


def test_ensemble_needs_two_members():
    with pytest.raises(ValueError, match=r"`n` \(=1\)"):
        sweep.ensemble(tiny_config(), 1)


@pytest.mark.parametrize(
    ("n", "error", "match"),
    [
        (1, ValueError, r"`n` \(=1\) must be >= 2"),
        (0, ValueError, r"`n` \(=0\) must be >= 2"),
        (np.int64(-2), ValueError, r"`n` \(=-2\) must be >= 2"),
        (True, TypeError, r"`n` \(=True\) must be an integer"),
        (2.0, TypeError, r"`n` \(=2\.0\) must be an integer"),
        (np.float64(3), TypeError, r"`n` \(=(np\.float64\()?3\.0\)?\) must be an integer"),
        ("3", TypeError, r"`n` \(='3'\) must be an integer"),
    ],
)
def test_ensemble_rejects_bad_n(monkeypatch, n, error, match):
    monkeypatch.setattr("optlab.sweep._ensemble.run", lambda *a, **k: pytest.fail("trained despite a bad `n`"))
    with pytest.raises(error, match=match):
        sweep.ensemble(tiny_config(), n)


@pytest.mark.parametrize("n", [2, np.int64(3), np.uint8(4)])
def test_ensemble_accepts_integral_n(monkeypatch, n):
    class Trained(Exception):
        pass

    def fake_run(config, members, **kwargs):  # stop before training: only the member list matters here
        raise Trained(members)

    monkeypatch.setattr("optlab.sweep._ensemble.run", fake_run)
    cfg = tiny_config()
    cfg["train"]["seed"] = 7
    with pytest.raises(Trained) as got:
        sweep.ensemble(cfg, n)
    assert got.value.args[0] == [{"seed": s} for s in range(7, 7 + int(n))]


def test_cli_sweep(tmp_path, capsys):
    from optlab.cli import main

    out = tmp_path / "cli"
    shrink = ["--set", "data.limit_train=128", "--set", "model.hidden=[16]", "--set", "output.plots=False"]
    code = main(["sweep", "configs/digits_sweep.py", "--set", "train.epochs=2", *shrink, "--out", str(out)])
    assert code == 0
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    # configs/digits_sweep.py: 5 learning rates x 2 momenta x 2 seeds.
    assert len(table) == 20
    assert {(float(r["optimizer.learning_rate"]), float(r["optimizer.momentum"]), int(r["train.seed"]))
            for r in table} == set(itertools.product([0.003, 0.01, 0.03, 0.1, 0.3], [0.0, 0.9], [0, 1]))
    assert not (out / "plots").exists()  # output.plots=False is honoured
    printed = capsys.readouterr().out
    assert "| member |" in printed and "best member:" in printed


@pytest.mark.parametrize(
    "flags", [["--coordinator", "127.0.0.1:1"], ["--num-processes", "2", "--process-id", "0"]]
)
def test_cli_partial_multiprocess_flags(flags, capsys):
    from optlab.cli import main

    assert main(["sweep", "configs/digits_sweep.py", *flags]) == 2
    assert "--coordinator, --num-processes and --process-id" in capsys.readouterr().err


def test_sweep_seeds_beyond_32_bits_are_refused_naming_the_member():
    # Seeds go through the same check as a single run's train.seed (2**32 would alias seed 0).
    with pytest.raises(ConfigError, match=r"member 1 .*`train.seed` \(=4294967296\)"):
        _run.make_members(tiny_config(), sweep.grid(learning_rate=[0.1], seeds=[0, 2**32]))


@pytest.mark.parametrize("use_out", [True, False], ids=["--out", "default folder"])
def test_cli_sweep_refuses_a_non_empty_output_folder(tmp_path, capsys, use_out):
    # A second sweep into the same folder would overwrite the table and leave the first one's plots.
    from optlab.cli import main

    out = tmp_path / "old" if use_out else tmp_path / "sweep-digits_sweep"  # the default: <output.dir>/sweep-<config>
    (out / "plots").mkdir(parents=True)
    (out / "results.csv").write_text("earlier results\n")
    (out / "plots" / "train_seed.png").write_bytes(b"old plot")
    where = ["--out", str(out)] if use_out else ["--set", f"output.dir={tmp_path}"]
    code = main(["sweep", "configs/digits_sweep.py", "--set", "train.epochs=1", *where])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and f"{out} already exists" in err and "--out" in err
    assert (out / "results.csv").read_text() == "earlier results\n"
    assert sorted(p.name for p in out.rglob("*")) == ["plots", "results.csv", "train_seed.png"]


def test_cli_sweep_into_an_empty_existing_folder_is_fine(tmp_path, capsys):
    from optlab.cli import main

    out = tmp_path / "empty"
    out.mkdir()
    shrink = ["--set", "data.limit_train=128", "--set", "model.hidden=[16]", "--set", "output.plots=False"]
    code = main(["sweep", "configs/digits_sweep.py", "--set", "train.epochs=1", *shrink, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert (out / "results.csv").is_file()
