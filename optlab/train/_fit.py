"""``fit(config)``: data, model, optimizer, compiled epochs, evaluation, logs, checkpoints.

The loop itself is thin: every epoch is one jitted ``lax.scan`` over the
device-resident training set (`make_train_epoch`), with the state buffers
donated so the update happens in place; or, with ``train.loop="step"`` (what
``"auto"`` picks for conv models on the CPU, see `choose_epoch_loop`), a
Python loop over one jitted, donated step (`make_train_epoch_stepwise`).
Around it, this module only does host-side bookkeeping: logs (JSON lines +
CSV), checkpoints, divergence checks and plots.
"""

from __future__ import annotations

import csv
import datetime
import itertools
import json
import math
import os
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import optlab
from optlab._host import retain_host_memory
from optlab import config as _config
from optlab import data as _data
from optlab.models import get_model
from optlab.train import _checkpoint
from optlab.train._step import (
    TrainState,
    choose_epoch_loop,
    init_state,
    make_evaluate,
    make_steps,
    make_train_epoch,
    make_train_epoch_stepwise,
)


class DivergenceError(RuntimeError):
    """Training went non-finite; the message says when and where the last good checkpoint is.

    Raised when the training loss becomes NaN or inf, or the test loss does at
    the end of an epoch (both unless ``train.skip_nonfinite``); when the
    parameters do; or when ``train.skip_nonfinite`` had to skip every step of an
    epoch. The epoch is not checkpointed, so the checkpoint the message names
    holds finite parameters.
    """


def build_optimizer(cfg: dict):
    """The optimizer of a resolved config, with the train section's wrappers around it."""
    t = cfg["train"]
    tx = _config.build_optimizer(cfg["optimizer"])
    if t["flatten"]:
        tx = optlab.flatten(tx)
    parts = []
    if t["clip_global_norm"] is not None:
        parts.append(optlab.clip_by_global_norm(t["clip_global_norm"]))
    parts.append(tx)
    if t["ema_decay"] is not None:
        parts.append(optlab.ema_params(t["ema_decay"]))
    tx = optlab.chain(*parts) if len(parts) > 1 else tx
    if t["accumulate_steps"] > 1:
        tx = optlab.accumulate_gradients(tx, t["accumulate_steps"])
    if t["skip_nonfinite"]:
        tx = optlab.skip_nonfinite(tx)
    return tx


def build_model(cfg: dict, dataset: _data.Dataset, seed: int):
    kwargs = {k: v for k, v in cfg["model"].items() if k != "name"}
    name = cfg["model"]["name"]
    kwargs.setdefault("num_classes", dataset.num_classes)
    if name == "mlp":
        kwargs.setdefault("in_features", int(np.prod(dataset.train_images.shape[1:])))
    if name in ("cnn", "resnet9"):
        kwargs.setdefault("in_channels", dataset.train_images.shape[-1])
    try:
        return get_model(name, rngs=seed, **kwargs)
    except (TypeError, ValueError) as e:
        raise _config.ConfigError(f"model section: {e}") from e


class Experiment:
    """A resolved config made concrete: data on the device, model, optimizer, compiled functions.

    `fit` uses it for one run; sweeps build one and vmap its functions.
    """

    def __init__(self, cfg: dict):
        self.cfg = cfg = _config.resolve(cfg)
        retain_host_memory()  # per-step loops (lr-find, the step-wise epoch) would page-fault otherwise
        d, t = cfg["data"], cfg["train"]
        self.dataset = ds = _data.load(d["name"], data_dir=d["data_dir"])
        train_x, train_y = ds.train_images, ds.train_labels
        if d["limit_train"] is not None:
            train_x, train_y = train_x[: d["limit_train"]], train_y[: d["limit_train"]]
        if d["batch_size"] > train_x.shape[0]:
            raise _config.ConfigError(
                f"config key `data.batch_size` (={d['batch_size']}) exceeds the {train_x.shape[0]} training examples"
            )
        mode = d["normalization"]
        if mode not in _data.MODES:
            raise _config.ConfigError(f"config key `data.normalization` (={mode!r}) must be one of {_data.MODES}")
        stats = _data.channel_stats(train_x) if mode == "standardize" else None
        self.preprocess = lambda x: _data.normalize(x, mode, stats)
        augment = (lambda key, x: _data.augment_cifar(key, x)) if d["augment"] else None
        self.train_images, self.train_labels = jnp.asarray(train_x), jnp.asarray(train_y)
        self.test_images, self.test_labels = jnp.asarray(ds.test_images), jnp.asarray(ds.test_labels)
        self.model = build_model(cfg, ds, t["seed"])
        self.tx = build_optimizer(cfg)
        self.graphdef, state = init_state(self.model, self.tx, t["seed"])
        self._state_shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        self._epoch_loop: str | None = None
        self.train_step, self.eval_step = make_steps(
            self.graphdef, self.tx, preprocess=self.preprocess, augment=augment, label_smoothing=t["label_smoothing"]
        )
        self.train_epoch = make_train_epoch(self.train_step, d["batch_size"])
        self.evaluate = make_evaluate(self.eval_step, d["eval_batch_size"])
        self.steps_per_epoch = self.train_images.shape[0] // d["batch_size"]

    def init(self, seed: int | None = None) -> TrainState:
        seed = self.cfg["train"]["seed"] if seed is None else seed
        model = build_model(self.cfg, self.dataset, seed)
        return init_state(model, self.tx, seed)[1]

    @property
    def epoch_loop(self) -> str:
        """``"scan"`` or ``"step"``: ``train.loop`` with ``"auto"`` resolved by `choose_epoch_loop`."""
        if self._epoch_loop is None:  # "auto" traces the train step once: only when asked
            self._epoch_loop = choose_epoch_loop(
                self.cfg["train"]["loop"], self.train_step, self._state_shapes,
                self.train_images, self.train_labels, self.cfg["data"]["batch_size"],
            )
        return self._epoch_loop

    def make_jitted_epoch(self):
        """``epoch_fn(state, images, labels, epoch) -> (state, per-step metrics)``, state donated.

        The jitted scan (`train_epoch`) or the step-wise loop, as `epoch_loop` says.
        """
        if self.epoch_loop == "step":
            return make_train_epoch_stepwise(self.train_step, self.cfg["data"]["batch_size"])
        return jax.jit(self.train_epoch, donate_argnums=(0,))


def _claim_run_dir(cfg: dict, run_dir, name_hint: str | None, resume: bool) -> tuple[pathlib.Path, bool]:
    """The run folder, created here and now; returns ``(folder, created)``.

    Checking for a folder and creating it later lets two runs started in the same
    second share one (the default name has a one-second clock). ``os.mkdir`` both
    checks and claims, atomically: a default name that another run took moves on to
    ``<name>-2``, ``<name>-3``, ... in that order; a name the user chose (``run_dir``
    or ``output.name``) that holds files is an error instead, unless resuming it.
    """
    out = cfg["output"]
    if run_dir is not None or out["name"]:
        path = pathlib.Path(run_dir) if run_dir is not None else pathlib.Path(out["dir"]) / out["name"]
        if resume:
            path.mkdir(parents=True, exist_ok=True)
            return path, False
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
            return path, True
        except FileExistsError:
            if path.is_dir() and not any(path.iterdir()):
                return path, False  # an empty folder made for the run (a test's tmp dir, say)
            raise FileExistsError(
                f"run folder {path} already exists; pass --resume to continue it or choose another name") from None
    base = pathlib.Path(out["dir"]) / f"{name_hint or cfg['data']['name']}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            path.mkdir()
            return path, True
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def _truncate_log(path: pathlib.Path, epochs_done: int) -> None:
    """Drop the records of epochs after ``epochs_done`` from a JSON-lines log, atomically.

    A process killed after logging an epoch but before its checkpoint was committed
    leaves records that the resumed run writes again. Records that belong to an epoch
    (``step``, ``diverged``: 0-based ``epoch``; ``epoch``: 1-based) are kept up to the
    restored epoch; session records (``start``, ``input_pipeline``) are kept, and a
    line the kill cut short is dropped.
    """
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the kill
        epoch = rec.get("epoch") if isinstance(rec, dict) else None
        if isinstance(epoch, int):
            done = epoch if rec.get("kind") == "epoch" else epoch + 1
            if done > epochs_done:
                continue
        kept.append(line + "\n")
    _checkpoint.atomic_write_text(path, "".join(kept))


class _Logger:
    """JSON lines for everything, a CSV row per epoch, and a console line per epoch."""

    def __init__(self, run_dir: pathlib.Path, resume: bool, quiet: bool, total_epochs: int = 0):
        self.run_dir = run_dir
        self.quiet = quiet
        self.total = total_epochs
        self.interactive = sys.stdout.isatty() and not os.environ.get("CI")
        mode = "a" if resume else "w"
        self.jsonl = open(run_dir / "log.jsonl", mode)
        self.csv_path = run_dir / "metrics.csv"

    def event(self, **record):
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()

    def write_csv(self, history: list[dict]):
        # Every key of every record: a run resumed from an older optlab's history may have gained one.
        keys = list(dict.fromkeys(k for h in history for k in h))
        with open(self.csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, restval="nan")
            w.writeheader()
            w.writerows(history)

    def epoch(self, history: list[dict]):
        self.write_csv(history)
        if not self.quiet:
            h = history[-1]
            line = (
                f"epoch {h['epoch']:>3}  loss {h['train_loss']:.4f}  acc {h['train_accuracy']:.4f}"
                f"  test_loss {h['test_loss']:.4f}  test_acc {h['test_accuracy']:.4f}"
                f"  lr {h['learning_rate']:.3g}  {h['examples_per_second']:.0f} ex/s"
            )
            if self.interactive:
                # Overwrite the progress bar with the finished epoch's line.
                print("\r" + line + " " * 8, flush=True)
            else:
                print(line, flush=True)

    def progress(self, epoch: int, examples_per_second: float | None):
        """On a terminal, a bar for the epoch now running (an epoch is one compiled call)."""
        if self.quiet or not self.interactive or not self.total:
            return
        width = 30
        done = int(width * epoch / self.total)
        speed = f"  last epoch {examples_per_second:.0f} ex/s" if examples_per_second else ""
        print(f"\r[{'#' * done}{'.' * (width - done)}] epoch {epoch + 1}/{self.total} running{speed}", end="", flush=True)

    def close(self):
        self.jsonl.close()


@jax.jit
def _params_finite(params) -> jax.Array:
    """Whether every floating-point leaf of ``params`` is finite (one reduction on the device)."""
    leaves = [x for x in jax.tree_util.tree_leaves(params) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.array(True)


def _finite_mean(x) -> float:
    """Mean over the finite entries (steps skipped by train.skip_nonfinite have NaN/inf losses)."""
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return float(np.mean(x)) if x.size else math.nan


def fit(
    cfg: dict,
    *,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    quiet: bool = False,
    name_hint: str | None = None,
    stop_after_epochs: int | None = None,
) -> dict:
    """Train the config's model; returns ``{"history", "run_dir", "state", "final"}``.

    Each run writes to its own folder: ``config.json`` (the resolved config),
    ``log.jsonl`` (step and epoch records), ``metrics.csv`` (one row per
    epoch), ``checkpoints/`` and ``plots/``. With ``resume=True`` and an
    existing ``run_dir``, training continues from the newest complete
    checkpoint; data order and step keys depend only on (seed, epoch, step),
    so the result equals an uninterrupted run bitwise on the CPU, and
    ``log.jsonl`` loses the records of epochs after that checkpoint (written
    before a kill) so that it equals the uninterrupted run's log too. With
    ``train.skip_nonfinite`` every epoch record has ``skipped_steps``.
    ``stop_after_epochs`` ends early (tests and time-boxed runs) as if killed
    after that many epochs in total.

    Raises:
      ConfigError: a bad config, before anything compiles.
      DivergenceError: the training loss or (at the end of an epoch) the
        test loss became NaN/inf, unless ``train.skip_nonfinite`` rides over
        bad steps; the parameters did; or ``train.skip_nonfinite`` skipped
        every step of an epoch. The last good checkpoint is kept.
      FileExistsError: ``run_dir`` (or ``output.name``) holds files and
        ``resume`` is False. A default (timestamped) name that is taken
        becomes ``<name>-2``, ``<name>-3``, ... instead.
      FileNotFoundError: ``resume=True`` and every committed checkpoint is
        damaged; nothing is changed.
    """
    cfg = _config.resolve(cfg)
    # Claimed before the data loads: a taken folder should not cost a dataset load to report.
    run_dir, created = _claim_run_dir(cfg, run_dir, name_hint, resume)
    ckpt_dir = run_dir / "checkpoints"
    try:
        exp = Experiment(cfg)
    except BaseException:
        if created and not any(run_dir.iterdir()):
            run_dir.rmdir()  # give the name back: nothing was written
        raise
    t = cfg["train"]
    if resume and (run_dir / "config.json").is_file():
        saved = json.loads((run_dir / "config.json").read_text())
        try:  # keys added to optlab since the run started take their defaults
            saved = json.loads(json.dumps(_config.resolve(saved)))
        except _config.ConfigError:
            pass  # reported below as a difference
        now = json.loads(json.dumps(cfg))
        # Only the length of the run and where outputs go may change on resume; anything else
        # would make the continued run a different experiment.
        for c in (saved, now):
            c["train"].pop("epochs", None)
            c.pop("output", None)
        if saved != now:
            diff = sorted(f"{sec}.{k}" for sec in now for k in set(now[sec]) | set(saved.get(sec, {}))
                          if isinstance(now[sec], dict) and now[sec].get(k) != saved.get(sec, {}).get(k))
            raise _config.ConfigError(
                f"--resume: the config differs from the one saved in {run_dir / 'config.json'} at {diff}; "
                "only train.epochs and output.* may change when resuming")

    state = exp.init()
    history: list[dict] = []
    start_epoch = 0
    if resume:
        restored = _checkpoint.restore_latest(ckpt_dir, state)
        if restored is not None:
            state, meta = restored
            start_epoch, history = meta["epoch"], meta["history"]
        elif _checkpoint.committed(ckpt_dir):
            # Starting over would truncate the log and prune these checkpoints: refuse, change nothing.
            raise FileNotFoundError(
                f"--resume: no intact checkpoint found in {ckpt_dir} (every committed one is damaged or "
                f"unreadable, see the warnings above); nothing in {run_dir} was changed. Restore the "
                "checkpoints, or start a new run folder to train from scratch.")
    (run_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    if start_epoch > 0:
        # Records written after the restored checkpoint (killed before the next one was
        # committed) are written again by this run: drop them so none appears twice.
        _truncate_log(run_dir / "log.jsonl", start_epoch)
    log = _Logger(run_dir, start_epoch > 0, quiet, t["epochs"])
    if history:
        log.write_csv(history)
    log.event(kind="start", resume_epoch=start_epoch, jax=jax.__version__, backend=jax.default_backend(),
              steps_per_epoch=exp.steps_per_epoch, loop=exp.epoch_loop)

    train_epoch = exp.make_jitted_epoch()
    evaluate = jax.jit(exp.evaluate)
    # Input pipeline cost, measured alone once (gather + augment + normalise of one epoch).
    timing = _data.time_input_pipeline(
        jax.random.PRNGKey(0), exp.train_images, exp.train_labels, cfg["data"]["batch_size"],
        augment=(lambda k, x: _data.augment_cifar(k, x)) if cfg["data"]["augment"] else None, repeats=1,
    )
    log.event(kind="input_pipeline", seconds_per_epoch=timing.seconds_per_epoch,
              examples_per_second=timing.examples_per_second)

    ema_in_state = t["ema_decay"] is not None
    skipping = t["skip_nonfinite"]
    # skip_nonfinite is the outermost wrapper (build_optimizer): its state counts the skipped steps.
    skips_before = int(state.opt_state.total_skips) if skipping else 0
    last_epoch = t["epochs"] if stop_after_epochs is None else min(t["epochs"], stop_after_epochs)

    def diverged(event: str, epoch: int, step: int, n: int, lr: float, advice: str | None = None):
        good = _checkpoint.committed(ckpt_dir)
        where = f"{ckpt_dir}/epoch_{good[-1]:04d}" if good else "none (no epoch completed)"
        if advice is None:
            advice = ("Lower the learning rate or clip gradients (train.clip_global_norm)." if skipping else
                      "Lower the learning rate, clip gradients (train.clip_global_norm) or set "
                      "train.skip_nonfinite=True to ride over bad steps.")
        msg = (f"training diverged: {event} at epoch {epoch + 1}, step {step} of {n} "
               f"(learning rate {lr:.3g}); last good checkpoint: {where}. {advice}")
        log.event(kind="diverged", epoch=epoch, step=step, message=msg)
        return DivergenceError(msg)

    try:
        for epoch in range(start_epoch, last_epoch):
            log.progress(epoch, history[-1]["examples_per_second"] if history else None)
            t0 = time.perf_counter()
            state, metrics = train_epoch(state, exp.train_images, exp.train_labels, epoch)
            metrics = jax.device_get(metrics)  # waits for the epoch to finish
            seconds = time.perf_counter() - t0
            losses = np.asarray(metrics["loss"])
            rates = np.asarray(metrics["learning_rate"])
            n = len(losses)
            for i in range(0, n, t["log_every"]):
                log.event(kind="step", epoch=epoch, step=int(epoch * exp.steps_per_epoch + i + 1),
                          **{k: float(np.asarray(v)[i]) for k, v in metrics.items()})
            # Nothing non-finite may reach a checkpoint: the newest one is what the message calls
            # "last good". The loss is checked per step; the parameters once, at the end of the epoch
            # (a finite loss can come with an update that overflows them).
            if not np.all(np.isfinite(losses)) and not skipping:
                bad = int(np.argmin(np.isfinite(losses)))
                raise diverged(f"loss became {losses[bad]}", epoch, bad + 1, n, float(rates[bad]))
            if skipping:
                skips_now = int(state.opt_state.total_skips)
                skipped, skips_before = skips_now - skips_before, skips_now
                if skipped >= n:
                    raise diverged(
                        f"no step was finite (train.skip_nonfinite skipped all {n})", epoch, n, n, float(rates[-1]),
                        "Skipping cannot recover from this: lower the learning rate or clip gradients "
                        "(train.clip_global_norm).")
            if not bool(_params_finite(state.params)):
                norms = np.asarray(metrics["param_norm"])
                bad = int(np.argmin(np.isfinite(norms))) if not np.all(np.isfinite(norms)) else n - 1
                raise diverged(f"the parameter norm became {norms[bad]}", epoch, bad + 1, n, float(rates[bad]))
            record = {
                "epoch": epoch + 1,
                "step": int(state.step),
                "train_loss": _finite_mean(losses),
                "train_accuracy": _finite_mean(metrics["accuracy"]),
                "learning_rate": float(rates[-1]),
                "grad_norm": _finite_mean(metrics["grad_norm"]),
                "update_norm": _finite_mean(metrics["update_norm"]),
                "param_norm": float(np.asarray(metrics["param_norm"])[-1]),
                "seconds": seconds,
                "examples_per_second": exp.steps_per_epoch * cfg["data"]["batch_size"] / seconds,
                "input_seconds": timing.seconds_per_epoch,
                "test_loss": math.nan,
                "test_accuracy": math.nan,
            }
            if skipping:
                record["skipped_steps"] = skipped
            if (epoch + 1) % t["eval_every"] == 0 or epoch + 1 == t["epochs"]:
                ev = jax.device_get(evaluate(state, exp.test_images, exp.test_labels))
                record["test_loss"], record["test_accuracy"] = float(ev["loss"]), float(ev["accuracy"])
                # train.skip_nonfinite rides over non-finite values (its skipped steps keep the weights
                # finite, which is what a checkpoint needs): there, a NaN test loss is only recorded.
                if not math.isfinite(record["test_loss"]) and not skipping:
                    raise diverged(f"the test loss became {record['test_loss']}", epoch, n, n, float(rates[-1]))
                if ema_in_state:
                    ev = jax.device_get(evaluate(state, exp.test_images, exp.test_labels, optlab.ema_of(state.opt_state)))
                    record["ema_test_accuracy"] = float(ev["accuracy"])
            history.append(record)
            log.event(kind="epoch", **record)
            log.epoch(history)
            every = t["checkpoint_every"]
            if (every and (epoch + 1) % every == 0) or epoch + 1 == t["epochs"]:
                _checkpoint.save(ckpt_dir, epoch + 1, state, {"history": history}, keep=t["keep_checkpoints"])
    finally:
        log.close()
    if cfg["output"]["plots"] and history:
        from optlab.train._plots import plot_run

        plot_run(run_dir)
    final = history[-1] if history else {}
    return {"history": history, "run_dir": run_dir, "state": state, "final": final}


def evaluate_run(run_dir: str | os.PathLike) -> dict:
    """Evaluate the newest complete checkpoint of a run folder on the test set."""
    run_dir = pathlib.Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: no config.json")
    exp = Experiment(json.loads(cfg_path.read_text()))
    restored = _checkpoint.restore_latest(run_dir / "checkpoints", exp.init())
    if restored is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints holds no complete checkpoint")
    state, meta = restored
    ev = jax.device_get(jax.jit(exp.evaluate)(state, exp.test_images, exp.test_labels))
    return {"run_dir": str(run_dir), "epoch": meta["epoch"], "step": int(state.step),
            "test_loss": float(ev["loss"]), "test_accuracy": float(ev["accuracy"])}
