"""The learning-rate range test (Smith, 2017, "Cyclical Learning Rates for Training Neural Networks", sec. 3.3).

Train from the initial weights while the learning rate grows exponentially
from ``min_lr`` to ``max_lr``; stop when the loss diverges. The learning rate
is changed with `optlab.set_hyperparams` on the optimizer state, so the
compiled step is reused for every value.
"""

from __future__ import annotations

import math
import pathlib

import jax
import numpy as np

import optlab
from optlab.train._fit import Experiment
from optlab.train._step import epoch_permutation


def lr_find(
    cfg: dict,
    *,
    min_lr: float = 1e-6,
    max_lr: float = 10.0,
    num_steps: int = 100,
    diverge_factor: float = 4.0,
    smoothing: float = 0.9,
) -> dict:
    """Run the range test; returns ``{"lrs", "losses", "smoothed", "suggestion", "stopped_early"}``.

    The suggestion is the learning rate where the smoothed loss falls fastest
    (steepest negative slope against log lr), the usual reading of the plot.
    """
    if not 0 < min_lr < max_lr:
        raise ValueError(f"need 0 < `min_lr` (={min_lr}) < `max_lr` (={max_lr})")
    if num_steps < 5:
        raise ValueError(f"`num_steps` (={num_steps}) must be at least 5")
    exp = Experiment(cfg)
    state = exp.init()
    try:
        optlab.hyperparams(state.opt_state)["learning_rate"]
    except (ValueError, KeyError) as e:
        raise ValueError("lr-find needs an optimizer with a `learning_rate` hyperparameter") from e
    step = jax.jit(exp.train_step, donate_argnums=(0,))
    bs = exp.cfg["data"]["batch_size"]
    n = exp.train_images.shape[0]
    lrs = min_lr * (max_lr / min_lr) ** (np.arange(num_steps) / (num_steps - 1))
    losses, smoothed = [], []
    avg, best, stopped = 0.0, math.inf, False
    perm = None
    for i, lr in enumerate(lrs):
        epoch, j = divmod(i, n // bs)
        if j == 0:
            perm = np.asarray(epoch_permutation(state.rng, epoch, n, bs))
        state = state._replace(opt_state=optlab.set_hyperparams(state.opt_state, learning_rate=float(lr)))
        idx = perm[j]
        state, metrics = step(state, exp.train_images[idx], exp.train_labels[idx])
        loss = float(metrics["loss"])
        losses.append(loss)
        avg = smoothing * avg + (1 - smoothing) * loss
        s = avg / (1 - smoothing ** (i + 1))
        smoothed.append(s)
        if not math.isfinite(loss) or s > diverge_factor * best:
            stopped = True
            break
        best = min(best, s)
    lrs = lrs[: len(losses)]
    sm = np.asarray(smoothed)
    finite = np.isfinite(sm)
    # Skip the first and last few points: the average is still warming up at the
    # start and the loss is exploding at the end (fastai's skip_start/skip_end).
    lo, hi = max(1, len(sm) // 10), max(2, len(sm) - max(1, len(sm) // 20))
    window = np.arange(len(sm))[lo:hi]
    window = window[finite[window]]
    if len(window) >= 3:
        slope = np.gradient(sm[window], np.log(lrs[window]))
        suggestion = float(lrs[window][int(np.argmin(slope))])
    else:
        suggestion = float(lrs[0])
    return {"lrs": lrs.tolist(), "losses": losses, "smoothed": smoothed, "suggestion": suggestion,
            "stopped_early": stopped}


def plot_lr_find(result: dict, path: str | pathlib.Path) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result["lrs"], result["losses"], alpha=0.3, label="loss")
    ax.plot(result["lrs"], result["smoothed"], label="smoothed")
    ax.axvline(result["suggestion"], color="k", ls="--", label=f"suggestion {result['suggestion']:.2g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="learning-rate range test")
    finite = [x for x in result["smoothed"] if math.isfinite(x)]
    if finite:
        ax.set_ylim(min(finite) * 0.9, min(max(finite), 4 * min(finite)) * 1.1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def lr_find_many(cfg: dict, optimizers: list[str | dict], **kwargs) -> dict[str, dict]:
    """The range test for several optimizers on the same config; returns ``{label: result}``.

    Each entry is an optimizer name (its other arguments from the config's
    optimizer section where the optimizer takes them) or a full optimizer
    section. Every optimizer is a different program, so each compiles once.
    """
    import copy

    from optlab import config as _config

    if not optimizers:
        raise ValueError("lr_find_many needs at least one optimizer")
    for entry in optimizers:  # all names checked before anything trains
        name = entry if isinstance(entry, str) else entry.get("name")
        if name not in _config.OPTIMIZERS:
            raise _config.ConfigError(f"unknown optimizer {name!r}; known: {', '.join(sorted(_config.OPTIMIZERS))}")
    results = {}
    for entry in optimizers:
        c = copy.deepcopy(cfg)
        if isinstance(entry, str):
            if entry not in _config.OPTIMIZERS:
                raise _config.ConfigError(f"unknown optimizer {entry!r}; known: {', '.join(sorted(_config.OPTIMIZERS))}")
            valid = _config._signature_defaults(_config.OPTIMIZERS[entry])
            spec = {k: v for k, v in c.get("optimizer", {}).items() if k in valid and k != "learning_rate"}
            spec["name"] = entry
            if "learning_rate" in valid:
                spec["learning_rate"] = 1e-3  # replaced at every step of the test
            label = entry
        else:
            spec, label = dict(entry), entry.get("name", "optimizer")
        c["optimizer"] = spec
        results[label] = lr_find(c, **kwargs)
    return results


def plot_lr_find_many(results: dict[str, dict], path: str | pathlib.Path) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lows, highs = [], []
    for label, r in results.items():
        (line,) = ax.plot(r["lrs"], r["smoothed"], label=f"{label} (suggest {r['suggestion']:.2g})")
        ax.axvline(r["suggestion"], color=line.get_color(), ls="--", alpha=0.6)
        finite = [x for x in r["smoothed"] if math.isfinite(x)]
        if finite:
            lows.append(min(finite))
            highs.append(min(max(finite), 4 * min(finite)))
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss (smoothed)",
           title="learning-rate range test")
    if lows:
        ax.set_ylim(min(lows) * 0.9, max(highs) * 1.1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
