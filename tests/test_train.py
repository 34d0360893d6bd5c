"""Tests of the training stack: ``fit``, resume, checkpoints, divergence, logged metrics,
vmapped steps and BatchNorm evaluation.

References are independent of the code under test: an uninterrupted run for every
resumed one (compared bitwise), closed forms for the logged learning rate and update
norm (step decay; plain SGD's update is ``lr * grad``), the same steps run one member
at a time for the vmapped step, and batch-size independence for BatchNorm's eval mode.

Everything trains on scikit-learn's 8x8 digits (in memory, no download) with tiny
models; compiling is what costs time on two CPU cores, so runs are shared through
module-scoped fixtures where a test only reads them.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import optlab
import optlab.data
from optlab.config import ConfigError, default_config, resolve
from optlab.train import (
    DivergenceError,
    Experiment,
    committed_checkpoints,
    fit,
    make_evaluate,
    restore_latest,
)
import optlab.train._fit as fit_module

# A CNN with BatchNorm and dropout: its state has parameters, running statistics, a
# dropout RNG counter and momentum buffers, all of which a resume must restore.
BN_EPOCHS = 8
BN_CONFIG = {
    "data": {"name": "digits", "normalization": "standardize", "batch_size": 64},
    "model": {"name": "cnn", "channels": [8, 16], "batchnorm": "before", "dropout": 0.1},
    "optimizer": {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9},
    # Evaluating only at the end spares the interrupted runs a compile.
    "train": {"epochs": BN_EPOCHS, "seed": 0, "checkpoint_every": 1, "keep_checkpoints": 3, "eval_every": BN_EPOCHS},
    "output": {"plots": False},
}
BN_STEPS_PER_EPOCH = len(optlab.data.load("digits").train_images) // 64  # the remainder is dropped

# Records of an epoch that depend only on the computation (not on wall-clock time).
NUMERIC_KEYS = ("epoch", "step", "train_loss", "train_accuracy", "learning_rate", "grad_norm",
                "update_norm", "param_norm", "test_loss", "test_accuracy")


def tiny_config(**sections) -> dict:
    """A small MLP on 256 digits: 8 steps per epoch with batches of 32."""
    cfg = {
        "data": {"name": "digits", "normalization": "standardize", "batch_size": 32, "limit_train": 256},
        "model": {"name": "mlp", "hidden": [16]},
        "optimizer": {"name": "sgd", "learning_rate": 0.1},
        "train": {"epochs": 3, "seed": 0},
        "output": {"plots": False},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg[name], **values}
    return cfg


def _leaves(tree) -> list[tuple[str, np.ndarray]]:
    out = []
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out.append((jax.tree_util.keystr(path), np.asarray(x)))
    return out


def assert_states_equal(actual, expected):
    """Bitwise equality of every leaf: step, params, BatchNorm stats, RNG counters, optimizer state."""
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for (path, a), (_, e) in zip(_leaves(actual), _leaves(expected), strict=True):
        assert a.dtype == e.dtype, path
        np.testing.assert_array_equal(a, e, err_msg=f"leaf {path}")


def assert_histories_equal(actual: list[dict], expected: list[dict]):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        for k in NUMERIC_KEYS:
            assert a[k] == e[k] or (math.isnan(a[k]) and math.isnan(e[k])), (a["epoch"], k, a[k], e[k])


@pytest.fixture(scope="module")
def bn_run(tmp_path_factory):
    """The uninterrupted reference run of BN_CONFIG."""
    run_dir = tmp_path_factory.mktemp("bn") / "reference"
    return fit(BN_CONFIG, run_dir=run_dir, quiet=True)


# ---------------------------------------------------------------------------------------
# The embedded default


def test_default_config_reaches_95_percent_on_digits(tmp_path):
    cfg = default_config()
    cfg["output"] = {"dir": str(tmp_path), "plots": False}
    result = fit(cfg, run_dir=tmp_path / "run", quiet=True)
    assert len(result["history"]) == cfg["train"]["epochs"]
    assert result["final"]["test_accuracy"] >= 0.95, result["final"]


@pytest.mark.parametrize("optimizer", [{"name": "sgd", "learning_rate": 0.1, "momentum": 0.9},
                                       {"name": "adam", "learning_rate": 1e-3}])
def test_train_flatten_gives_the_same_run(tmp_path, optimizer):
    # train.flatten wraps the optimizer in optlab.flatten: other kernels, the same bits.
    runs = []
    for flat in (False, True):
        cfg = default_config()
        cfg["optimizer"] = optimizer
        cfg["data"]["limit_train"] = 320
        cfg["train"].update(epochs=2, flatten=flat)
        cfg["output"] = {"dir": str(tmp_path), "plots": False}
        runs.append(fit(cfg, run_dir=tmp_path / f"flat{flat}", quiet=True))
    assert type(runs[1]["state"].opt_state).__name__ != type(runs[0]["state"].opt_state).__name__
    for a, b in zip(_leaves(runs[0]["state"].params), _leaves(runs[1]["state"].params), strict=True):
        np.testing.assert_array_equal(a[1], b[1])
    assert [h["train_loss"] for h in runs[0]["history"]] == [h["train_loss"] for h in runs[1]["history"]]


# ---------------------------------------------------------------------------------------
# Resume: bitwise equal to an uninterrupted run


def test_reference_run_is_trained(bn_run):
    # Guards the resume tests below against comparing two untrained states.
    state = bn_run["state"]
    assert int(state.step) == BN_EPOCHS * BN_STEPS_PER_EPOCH
    assert bn_run["final"]["test_accuracy"] > 0.5
    means = [x for p, x in _leaves(state.model_state) if "mean" in p]
    assert means and all(np.any(m != 0) for m in means)  # running averages moved from their init


def test_stop_and_resume_in_process_equals_uninterrupted_run(bn_run, tmp_path):
    run_dir = tmp_path / "run"
    first = fit(BN_CONFIG, run_dir=run_dir, quiet=True, stop_after_epochs=2)
    assert len(first["history"]) == 2
    assert committed_checkpoints(run_dir / "checkpoints") == [1, 2]
    second = fit(BN_CONFIG, run_dir=run_dir, resume=True, quiet=True)
    assert_states_equal(second["state"], bn_run["state"])
    assert_histories_equal(second["history"], bn_run["history"])
    # What is on disk is the same state too.
    restored, meta = restore_latest(run_dir / "checkpoints", bn_run["state"])
    assert meta["epoch"] == BN_EPOCHS
    assert_states_equal(restored, bn_run["state"])


def test_resume_of_a_run_saved_before_a_config_key_existed(bn_run, tmp_path):
    # A run folder written by an older optlab lacks keys added since (here `train.loop`):
    # they take their defaults, so the run still resumes to the same bits.
    run_dir = tmp_path / "run"
    fit(BN_CONFIG, run_dir=run_dir, quiet=True, stop_after_epochs=2)
    saved = json.loads((run_dir / "config.json").read_text())
    del saved["train"]["loop"]
    (run_dir / "config.json").write_text(json.dumps(saved))
    second = fit(BN_CONFIG, run_dir=run_dir, resume=True, quiet=True)
    assert_states_equal(second["state"], bn_run["state"])
    # A key whose saved value differs from the default is still a different experiment.
    saved["train"]["seed"] = BN_CONFIG["train"].get("seed", 0) + 1
    (run_dir / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match="train.seed"):
        fit(BN_CONFIG, run_dir=run_dir, resume=True, quiet=True)


def _write_config_file(path: pathlib.Path, cfg: dict) -> pathlib.Path:
    path.write_text(f"def get_config():\n    return {cfg!r}\n")
    return path


def test_killed_process_resumes_to_the_same_bits(bn_run, tmp_path):
    """SIGKILL a `optlab train` process after its third checkpoint, resume it, compare bitwise."""
    config_file = _write_config_file(tmp_path / "bn_config.py", BN_CONFIG)
    run_dir = tmp_path / "runs" / "killed"
    marker = run_dir / "checkpoints" / "epoch_0003.json"
    # The resumed process reuses the first one's compiled programs (same bits, less time).
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    train = [sys.executable, "-m", "optlab.cli", "train"]
    first_log = tmp_path / "first.log"
    with open(first_log, "w") as log:
        proc = subprocess.Popen(
            train + [str(config_file), "--set", f"output.dir={tmp_path / 'runs'}", "--set", "output.name=killed"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
        )
        try:
            deadline = time.monotonic() + 300
            while not marker.exists():
                assert proc.poll() is None, f"training ended before its third checkpoint:\n{first_log.read_text()}"
                assert time.monotonic() < deadline, "no third checkpoint after 300 s"
                time.sleep(0.01)
            # Five more epochs (each with a checkpoint) remain: the process is still training.
            assert proc.poll() is None, "the run finished before it could be killed; make it longer"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert committed_checkpoints(run_dir / "checkpoints")[-1] < BN_EPOCHS

    resumed = subprocess.run(train + ["--resume", str(run_dir)], capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"run folder: {run_dir}" in resumed.stdout

    restored, meta = restore_latest(run_dir / "checkpoints", bn_run["state"])
    assert meta["epoch"] == BN_EPOCHS
    assert_states_equal(restored, bn_run["state"])
    assert_histories_equal(meta["history"], bn_run["history"])
    logged = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    starts = [r["resume_epoch"] for r in logged if r["kind"] == "start"]
    assert len(starts) == 2 and starts[0] == 0 and 3 <= starts[1] < BN_EPOCHS


# ---------------------------------------------------------------------------------------
# Incomplete and corrupt checkpoints


def _copy_run(bn_run, tmp_path) -> pathlib.Path:
    run_dir = tmp_path / "copy"
    shutil.copytree(bn_run["run_dir"], run_dir)
    assert committed_checkpoints(run_dir / "checkpoints") == [BN_EPOCHS - 2, BN_EPOCHS - 1, BN_EPOCHS]
    return run_dir


def _resume_without_training(run_dir: pathlib.Path) -> dict:
    """``fit(resume=True)`` that stops at the restored epoch: what a resume starts from, without compiling an epoch."""
    return fit(BN_CONFIG, run_dir=run_dir, resume=True, quiet=True, stop_after_epochs=BN_EPOCHS - 1)


def _assert_resumed_from_previous(result: dict, bn_run, run_dir: pathlib.Path):
    assert int(result["state"].step) == (BN_EPOCHS - 1) * BN_STEPS_PER_EPOCH
    # The state is the one the reference run saved after epoch N-1, read here with orbax directly.
    saved = bn_run["run_dir"] / "checkpoints" / f"epoch_{BN_EPOCHS - 1:04d}"
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, bn_run["state"])
    assert_states_equal(result["state"], ocp.StandardCheckpointer().restore(saved.absolute(), abstract))
    assert_histories_equal(result["history"], bn_run["history"][:-1])
    starts = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["resume_epoch"] for r in starts if r["kind"] == "start"] == [0, BN_EPOCHS - 1]


def test_checkpoint_without_marker_is_skipped_on_resume(bn_run, tmp_path):
    # A process killed while saving leaves the arrays of epoch N but not epoch_000N.json.
    run_dir = _copy_run(bn_run, tmp_path)
    ckpt = run_dir / "checkpoints"
    (ckpt / f"epoch_{BN_EPOCHS:04d}.json").unlink()
    assert (ckpt / f"epoch_{BN_EPOCHS:04d}").is_dir()
    assert committed_checkpoints(ckpt) == [BN_EPOCHS - 2, BN_EPOCHS - 1]
    result = _resume_without_training(run_dir)  # no warning: an uncommitted folder is expected
    _assert_resumed_from_previous(result, bn_run, run_dir)


def test_corrupt_checkpoint_is_skipped_on_resume_with_a_warning(bn_run, tmp_path):
    run_dir = _copy_run(bn_run, tmp_path)
    newest = run_dir / "checkpoints" / f"epoch_{BN_EPOCHS:04d}"
    data_files = [f for f in newest.rglob("*") if f.is_file() and f.parent.name == "d"]
    assert data_files
    for f in data_files:  # truncate the array data; the marker still says "complete"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.warns(RuntimeWarning, match=f"epoch_{BN_EPOCHS:04d} is damaged .*SHA-256"):
        result = _resume_without_training(run_dir)
    _assert_resumed_from_previous(result, bn_run, run_dir)


def test_an_intact_checkpoint_of_another_state_layout_is_an_error_not_a_fresh_start(tmp_path):
    # Falling back would train from scratch and prune the run's checkpoints; the run's
    # state layout changed instead (another optimizer configuration or optlab version).
    from optlab.train._checkpoint import save

    written = optlab.sgd(0.1, momentum=0.9, dampening=0.5).init({"w": jnp.ones(3)})  # keeps a step counter
    save(tmp_path, 1, written, {"history": []})
    files_before = sorted(p.name for p in tmp_path.rglob("*"))
    other = optlab.sgd(0.1, momentum=0.9).init({"w": jnp.ones(3)})  # no step counter
    with pytest.raises(ValueError, match=r"epoch_0001 is intact but does not fit this run's state"):
        restore_latest(tmp_path, other)
    assert sorted(p.name for p in tmp_path.rglob("*")) == files_before
    restored, meta = restore_latest(tmp_path, written)
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(written)


def test_no_checkpoint_at_all(tmp_path):
    assert committed_checkpoints(tmp_path / "missing") == []
    assert restore_latest(tmp_path / "missing", {"w": jnp.zeros(2)}) is None


# ---------------------------------------------------------------------------------------
# Divergence

# A deep *linear* network: the loss of a ReLU or tanh MLP saturates at a huge but finite
# value, while here every step multiplies the weights' scale, so the loss overflows to inf.
# The learning rate jumps to 1e6 after two epochs (8 steps each), so two checkpoints exist.
DIVERGING = {
    "model": {"name": "mlp", "hidden": [32], "activation": "identity"},
    "optimizer": {"name": "sgd", "learning_rate": {"schedule": "piecewise_constant", "boundaries": [16],
                                                   "values": [0.05, 1e6]}},
    "train": {"epochs": 4, "log_every": 1, "eval_every": 4},
}


def test_divergence_raises_naming_epoch_step_and_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(DivergenceError) as info:
        fit(tiny_config(**DIVERGING), run_dir=run_dir, quiet=True)
    msg = str(info.value)
    good = run_dir / "checkpoints" / "epoch_0002"
    assert re.search(r"at epoch 3, step \d+ of 8", msg), msg
    assert str(good) in msg
    assert "skip_nonfinite" in msg  # says how to ride over it
    # The last good checkpoint is kept, complete and finite; the bad epoch was not saved.
    assert committed_checkpoints(run_dir / "checkpoints") == [1, 2]
    state, meta = restore_latest(run_dir / "checkpoints", Experiment(tiny_config(**DIVERGING)).init())
    assert meta["epoch"] == 2 and int(state.step) == 16
    assert all(np.all(np.isfinite(x)) for _, x in _leaves(state.params))
    events = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert events[-1]["kind"] == "diverged" and events[-1]["epoch"] == 2  # 0-based in the log


def test_skip_nonfinite_rides_over_divergence(tmp_path):
    run_dir = tmp_path / "run"
    result = fit(tiny_config(**{**DIVERGING, "train": {**DIVERGING["train"], "skip_nonfinite": True}}),
                 run_dir=run_dir, quiet=True)
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3, 4]
    assert committed_checkpoints(run_dir / "checkpoints")[-1] == 4
    skip_state = result["state"].opt_state
    assert int(skip_state.total_skips) > 0
    assert int(skip_state.count) == 32
    # Skipped steps leave the weights alone, so they stay finite.
    assert all(np.all(np.isfinite(x)) for _, x in _leaves(result["state"].params))
    # Each epoch record counts its skipped steps; they add up to the optimizer state's count.
    skipped = [h["skipped_steps"] for h in result["history"]]
    assert skipped[:2] == [0, 0] and sum(skipped) == int(skip_state.total_skips)
    assert all(s < 8 for s in skipped)  # a whole epoch skipped would have been a divergence
    header, *rows = (run_dir / "metrics.csv").read_text().splitlines()
    column = header.split(",").index("skipped_steps")
    assert [int(r.split(",")[column]) for r in rows] == skipped


# ---------------------------------------------------------------------------------------
# Metrics, logs and the run folder; no retracing across epochs


@pytest.fixture(scope="module")
def metrics_run(tmp_path_factory):
    """Three epochs of 8 steps with the rate halved every epoch, counting traces of the compiled functions."""
    traces = {"train_epoch": 0, "evaluate": 0}

    def counting(factory, name):
        def make(*args, **kwargs):
            fn = factory(*args, **kwargs)

            def counted(*a, **k):
                traces[name] += 1  # runs only while jax traces
                return fn(*a, **k)

            return counted

        return make

    cfg = tiny_config(
        optimizer={"learning_rate": {"schedule": "step_decay", "init_value": 0.2, "step_size": 8, "gamma": 0.5}},
        train={"log_every": 4},
        output={"plots": True},
    )
    run_dir = tmp_path_factory.mktemp("metrics") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fit_module, "make_train_epoch", counting(fit_module.make_train_epoch, "train_epoch"))
        mp.setattr(fit_module, "make_evaluate", counting(fit_module.make_evaluate, "evaluate"))
        result = fit(cfg, run_dir=run_dir, quiet=True)
    return cfg, result, traces


def test_epoch_and_evaluation_compile_once(metrics_run):
    _, result, traces = metrics_run
    assert len(result["history"]) == 3
    assert traces == {"train_epoch": 1, "evaluate": 1}


def test_history_records_metrics_and_the_scheduled_learning_rate(metrics_run):
    _, result, _ = metrics_run
    history = result["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [h["step"] for h in history] == [8, 16, 24]
    for e, h in enumerate(history):
        # step_decay(0.2, step_size=8, gamma=0.5): epoch e (0-based) runs at 0.2 * 0.5**e.
        assert h["learning_rate"] == pytest.approx(0.2 * 0.5**e, rel=1e-6)
        # Plain SGD's update is lr * grad, and the rate is constant within an epoch.
        assert h["update_norm"] == pytest.approx(h["learning_rate"] * h["grad_norm"], rel=1e-5)
        assert h["grad_norm"] > 0
        for k in ("train_loss", "test_loss"):
            assert math.isfinite(h[k]) and h[k] > 0
        for k in ("train_accuracy", "test_accuracy"):
            assert 0 <= h[k] <= 1
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_accuracy"] > 0.5


def test_run_folder_holds_config_logs_metrics_and_plot(metrics_run):
    cfg, result, _ = metrics_run
    run_dir = pathlib.Path(result["run_dir"])
    assert json.loads((run_dir / "config.json").read_text()) == json.loads(json.dumps(resolve(cfg)))

    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert records[0]["kind"] == "start"
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 5, 9, 13, 17, 21]  # log_every=4 with 8 steps per epoch
    for r in steps:
        assert r["learning_rate"] == pytest.approx(0.2 * 0.5 ** ((r["step"] - 1) // 8), rel=1e-6)
        assert {"loss", "accuracy", "grad_norm", "update_norm"} <= set(r)
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2, 3]

    with open(run_dir / "metrics.csv") as f:
        header, *rows = f.read().splitlines()
    columns = header.split(",")
    assert len(rows) == 3
    for row, h in zip(rows, result["history"]):
        values = dict(zip(columns, row.split(",")))
        for k in NUMERIC_KEYS:
            assert float(values[k]) == h[k]

    png = run_dir / "plots" / "training.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Checkpoints every epoch, the two newest kept.
    assert committed_checkpoints(run_dir / "checkpoints") == [2, 3]
    assert not (run_dir / "checkpoints" / "epoch_0001").exists()


# ---------------------------------------------------------------------------------------
# The pure step under vmap


def test_vmapped_train_step_over_seeds_and_learning_rates_equals_separate_runs():
    exp = Experiment(tiny_config(optimizer={"momentum": 0.9}))
    seeds, lrs = (0, 1), (0.05, 0.2)
    images, labels = exp.train_images, exp.train_labels
    batches = [(images[i * 32:(i + 1) * 32], labels[i * 32:(i + 1) * 32]) for i in range(4)]

    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[exp.init(s) for s in seeds])
    stacked = stacked._replace(opt_state=optlab.set_hyperparams(stacked.opt_state, learning_rate=jnp.array(lrs)))
    step = jax.jit(jax.vmap(exp.train_step, in_axes=(0, None, None)))
    for x, y in batches:
        stacked, stacked_metrics = step(stacked, x, y)
    np.testing.assert_allclose(stacked_metrics["learning_rate"], lrs, rtol=1e-7)

    single = jax.jit(exp.train_step)
    for i, (seed, lr) in enumerate(zip(seeds, lrs)):
        state = exp.init(seed)
        state = state._replace(opt_state=optlab.set_hyperparams(state.opt_state, learning_rate=lr))
        for x, y in batches:
            state, metrics = single(state, x, y)
        member = jax.tree_util.tree_map(lambda leaf: leaf[i], stacked)
        assert int(member.step) == len(batches)
        for (path, a), (_, e) in zip(_leaves(member.params), _leaves(state.params), strict=True):
            np.testing.assert_allclose(a, e, rtol=2e-5, atol=1e-6, err_msg=path)
        for (path, a), (_, e) in zip(_leaves(member.opt_state), _leaves(state.opt_state), strict=True):
            np.testing.assert_allclose(a, e, rtol=2e-5, atol=1e-6, err_msg=path)
        for k in ("loss", "accuracy", "grad_norm", "update_norm"):
            np.testing.assert_allclose(stacked_metrics[k][i], metrics[k], rtol=2e-5, err_msg=k)
    # The members really differ (different initial weights and rates).
    first = _leaves(jax.tree_util.tree_map(lambda leaf: leaf[0], stacked.params))
    second = _leaves(jax.tree_util.tree_map(lambda leaf: leaf[1], stacked.params))
    assert not np.allclose(first[0][1], second[0][1])


# ---------------------------------------------------------------------------------------
# BatchNorm in evaluation


def test_evaluation_uses_batchnorm_running_averages(bn_run):
    exp = Experiment(BN_CONFIG)
    state = bn_run["state"]
    x, y = exp.test_images[:40], exp.test_labels[:40]
    eval_step = jax.jit(exp.eval_step)
    _, together = eval_step(state, x, y)
    for i in (0, 17):
        _, alone = eval_step(state, x[i:i + 1], y[i:i + 1])
        np.testing.assert_allclose(alone[0], together[i], rtol=1e-5, atol=1e-5)
    # The whole-split evaluation does not depend on its batch size (nor on the zero padding
    # of its last batch), which it would if BatchNorm used batch statistics.
    by_7 = jax.jit(make_evaluate(exp.eval_step, 7))(state, exp.test_images, exp.test_labels)
    by_1000 = jax.jit(make_evaluate(exp.eval_step, 1000))(state, exp.test_images, exp.test_labels)
    assert float(by_7["accuracy"]) == float(by_1000["accuracy"]) == pytest.approx(bn_run["final"]["test_accuracy"])
    assert float(by_7["loss"]) == pytest.approx(float(by_1000["loss"]), rel=1e-5)


# ---------------------------------------------------------------------------------------
# Audit fixes: run-folder claims, divergence that only shows in the parameters or the test
# loss, resumes with damaged checkpoints or a log ahead of its checkpoint


class _FrozenClock:
    """Stands in for the `datetime` module in optlab.train._fit: every run starts in the same second."""

    class datetime:  # noqa: N801 - mirrors datetime.datetime
        @staticmethod
        def now():
            import datetime as real

            return real.datetime(2024, 1, 2, 3, 4, 5)


def test_a_taken_default_run_name_moves_to_the_next_free_one(tmp_path, monkeypatch):
    # Two runs started in the same second get the same default name. The other run has just
    # claimed the first (still empty) and a third has written into the second: this run must
    # use neither, and the names are tried in order.
    monkeypatch.setattr(fit_module, "datetime", _FrozenClock)
    base = tmp_path / "digits-20240102-030405"
    base.mkdir()
    taken = tmp_path / "digits-20240102-030405-2"
    taken.mkdir()
    (taken / "config.json").write_text("{}")
    cfg = tiny_config(train={"epochs": 1}, output={"dir": str(tmp_path)})
    result = fit(cfg, quiet=True)
    assert pathlib.Path(result["run_dir"]) == tmp_path / "digits-20240102-030405-3"
    assert list(base.iterdir()) == []  # the other run's folder is left alone
    assert (taken / "config.json").read_text() == "{}"
    assert json.loads((tmp_path / "digits-20240102-030405-3" / "config.json").read_text())["train"]["epochs"] == 1


def test_a_run_that_fails_before_training_gives_its_default_name_back(tmp_path, monkeypatch):
    monkeypatch.setattr(fit_module, "datetime", _FrozenClock)
    cfg = tiny_config(data={"batch_size": 512}, output={"dir": str(tmp_path)})  # more than the 256 examples
    with pytest.raises(ConfigError, match="data.batch_size"):
        fit(cfg, quiet=True)
    assert list(tmp_path.iterdir()) == []


# One step per epoch (32 examples); the rate jumps from 0.05 to 3e38 after the first, so the
# first epoch is good and checkpointed and the second one's update overflows.
_JUMP = {"learning_rate": {"schedule": "piecewise_constant", "boundaries": [1], "values": [0.05, 3e38]}}
NONFINITE_EPOCH = [
    # (id, config sections, message, committed checkpoints afterwards)
    ("parameters",  # large initial weights: the update overflows them to inf while the loss was finite
     dict(data={"limit_train": 32}, model={"init_scale": 100.0}, optimizer=_JUMP, train={"eval_every": 10}),
     r"the parameter norm became inf at epoch 2, step 1 of 1", [1]),
    ("test loss",  # finite but huge weights: the evaluation's logits overflow
     dict(data={"limit_train": 32}, optimizer=_JUMP), r"the test loss became nan at epoch 2, step 1 of 1", [1]),
    ("every step skipped",  # 8 steps per epoch; from step 9 on at 1e30 only the first update stays finite
     dict(optimizer={"learning_rate": {"schedule": "piecewise_constant", "boundaries": [8], "values": [0.05, 1e30]}},
          train={"eval_every": 10, "skip_nonfinite": True}),
     r"no step was finite \(train.skip_nonfinite skipped all 8\) at epoch 3, step 8 of 8", [1, 2]),
]


@pytest.mark.parametrize("sections, message, kept", [c[1:] for c in NONFINITE_EPOCH],
                         ids=[c[0] for c in NONFINITE_EPOCH])
def test_a_non_finite_epoch_is_divergence_and_never_checkpointed(tmp_path, sections, message, kept):
    cfg = tiny_config(**{**sections, "train": {"epochs": 3, **sections.get("train", {})}})
    run_dir = tmp_path / "run"
    with pytest.raises(DivergenceError, match=message) as info:
        fit(cfg, run_dir=run_dir, quiet=True)
    msg = str(info.value)
    assert msg.startswith("training diverged: ")
    assert f"last good checkpoint: {run_dir / 'checkpoints'}/epoch_{kept[-1]:04d}." in msg
    assert committed_checkpoints(run_dir / "checkpoints") == kept
    # The checkpoint the message calls good really is: finite weights, a finite test loss.
    state, meta = restore_latest(run_dir / "checkpoints", Experiment(cfg).init())
    assert meta["epoch"] == kept[-1]
    assert all(np.all(np.isfinite(x)) for _, x in _leaves(state.params))
    events = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert events[-1]["kind"] == "diverged" and events[-1]["message"] == msg


def test_resume_with_every_checkpoint_damaged_refuses_and_changes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny_config(train={"epochs": 2})
    fit(cfg, run_dir=run_dir, quiet=True)
    ckpt = run_dir / "checkpoints"
    assert committed_checkpoints(ckpt) == [1, 2]
    for f in ckpt.rglob("*"):  # truncate every array file; the markers still say "complete"
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:10])
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.warns(RuntimeWarning, match="is damaged"):
        with pytest.raises(FileNotFoundError, match=rf"no intact checkpoint found in {re.escape(str(ckpt))}"):
            fit(tiny_config(train={"epochs": 3}), run_dir=run_dir, resume=True, quiet=True)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_resume_drops_log_records_written_after_the_restored_checkpoint(tmp_path):
    # Killed after logging epoch 3 but before committing its checkpoint (and halfway through a
    # line): the resumed run writes epoch 3 again, and the log must read as if it ran once.
    run_dir = tmp_path / "run"
    cfg = tiny_config(train={"epochs": 3, "log_every": 1})
    fit(cfg, run_dir=run_dir, quiet=True)
    log_path = run_dir / "log.jsonl"
    uninterrupted = [json.loads(line) for line in log_path.read_text().splitlines()]
    metrics_before = (run_dir / "metrics.csv").read_text().splitlines()
    shutil.rmtree(run_dir / "checkpoints" / "epoch_0003")
    (run_dir / "checkpoints" / "epoch_0003.json").unlink()
    with open(log_path, "a") as f:
        f.write('{"kind": "step", "epoch": 3, "lo')
    fit(cfg, run_dir=run_dir, resume=True, quiet=True)
    resumed = [json.loads(line) for line in log_path.read_text().splitlines()]

    def steps(records):
        return [r for r in records if r["kind"] == "step"]

    def epochs(records):
        return [{k: r[k] for k in NUMERIC_KEYS} for r in records if r["kind"] == "epoch"]

    assert [r["step"] for r in steps(resumed)] == list(range(1, 25))
    assert steps(resumed) == steps(uninterrupted)
    assert [r["epoch"] for r in epochs(resumed)] == [1, 2, 3]
    assert_histories_equal(epochs(resumed), epochs(uninterrupted))
    assert [r["resume_epoch"] for r in resumed if r["kind"] == "start"] == [0, 2]
    # metrics.csv: the same rows (wall-clock columns aside).
    metrics_after = (run_dir / "metrics.csv").read_text().splitlines()
    assert len(metrics_after) == len(metrics_before) == 4
    cols = metrics_before[0].split(",")
    for a, b in zip(metrics_after[1:], metrics_before[1:]):
        a, b = dict(zip(cols, a.split(","))), dict(zip(cols, b.split(",")))
        assert [a[k] for k in NUMERIC_KEYS] == [b[k] for k in NUMERIC_KEYS]
