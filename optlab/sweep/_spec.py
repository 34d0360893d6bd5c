"""Sweep specifications: lists of members, each a dict of dotted config keys to values.

    grid(learning_rate=[0.01, 0.1], momentum=[0.0, 0.9], seeds=2)   # 2 x 2 x 2 = 8 members
    random(16, learning_rate=log_uniform(1e-3, 1.0), seed=0)
    zip(learning_rate=[0.01, 0.1], weight_decay=[0.0, 1e-4])

A short key is expanded: an optimizer argument (``learning_rate``) becomes
``optimizer.learning_rate``, ``init``/``init_scale`` become ``model.*``,
``seed`` becomes ``train.seed``. A full dotted key reaches anything, e.g.
``optimizer.learning_rate.init_value`` (a schedule parameter) or
``optimizer.name`` (a structural choice: such members form their own group,
compiled once per group).
"""

from __future__ import annotations

import builtins
import itertools
import math
from typing import Any, NamedTuple

import numpy as np

SHORT_MODEL_KEYS = ("init", "init_scale")


class LogUniform(NamedTuple):
    low: float
    high: float


class Uniform(NamedTuple):
    low: float
    high: float


def log_uniform(low: float, high: float) -> LogUniform:
    """A range sampled uniformly in log space (learning rates, weight decays).

    Example:
      >>> import optlab.sweep as sweep
      >>> members = sweep.random(16, learning_rate=sweep.log_uniform(1e-4, 1e-1), seed=0)
      >>> all(1e-4 <= m["learning_rate"] <= 1e-1 for m in members)
      True
    """
    if not 0 < low < high:
        raise ValueError(f"log_uniform needs 0 < low (={low!r}) < high (={high!r})")
    return LogUniform(float(low), float(high))


def uniform(low: float, high: float) -> Uniform:
    """A range sampled uniformly (momentum, dropout rates).

    Example:
      >>> import optlab.sweep as sweep
      >>> members = sweep.random(16, momentum=sweep.uniform(0.8, 0.99), seed=0)
      >>> all(0.8 <= m["momentum"] <= 0.99 for m in members)
      True
    """
    if not low < high:
        raise ValueError(f"uniform needs low (={low!r}) < high (={high!r})")
    return Uniform(float(low), float(high))


def _values(name: str, values: Any) -> list:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"sweep values for `{name}` must be a list, got {values!r}")
    values = list(values)
    if not values:
        raise ValueError(f"sweep values for `{name}` are empty")
    return [v.item() if isinstance(v, np.generic) else v for v in values]


def _with_seeds(members: list[dict], seeds: int | list[int] | None) -> list[dict]:
    if seeds is None:
        return members
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise ValueError("`seeds` is empty")
    return [{**m, "seed": s} for m in members for s in seed_list]


def grid(*, seeds: int | list[int] | None = None, **axes: list) -> list[dict]:
    """The Cartesian product of the given value lists (crossed with ``seeds`` if given).

    Example:
      >>> import optlab.sweep as sweep
      >>> members = sweep.grid(learning_rate=[0.01, 0.1], momentum=[0.0, 0.9], seeds=2)
      >>> len(members), members[0], members[-1]
      (8, {'learning_rate': 0.01, 'momentum': 0.0, 'seed': 0}, {'learning_rate': 0.1, 'momentum': 0.9, 'seed': 1})
    """
    if not axes and seeds is None:
        raise ValueError("grid() needs at least one hyperparameter list")
    names = list(axes)
    lists = [_values(n, axes[n]) for n in names]
    members = [dict(builtins.zip(names, combo)) for combo in itertools.product(*lists)] if names else [{}]
    return _with_seeds(members, seeds)


def zip(*, seeds: int | list[int] | None = None, **axes: list) -> list[dict]:  # noqa: A001 - mirrors builtins.zip
    """Members taken position by position from equally long lists.

    Example:
      >>> import optlab.sweep as sweep
      >>> sweep.zip(learning_rate=[0.01, 0.1], weight_decay=[0.0, 1e-4])
      [{'learning_rate': 0.01, 'weight_decay': 0.0}, {'learning_rate': 0.1, 'weight_decay': 0.0001}]
    """
    if not axes:
        raise ValueError("zip() needs at least one hyperparameter list")
    lists = {n: _values(n, v) for n, v in axes.items()}
    lengths = {n: len(v) for n, v in lists.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"zip() needs lists of equal length, got {lengths}")
    n = next(iter(lengths.values()))
    return _with_seeds([{k: v[i] for k, v in lists.items()} for i in range(n)], seeds)


def random(num: int, *, seed: int = 0, seeds: int | list[int] | None = None, **axes) -> list[dict]:  # noqa: A001
    """``num`` members drawn with a fixed seed: each axis a `log_uniform`, a `uniform`, or a list to choose from.

    Example:
      >>> import optlab.sweep as sweep
      >>> axes = dict(learning_rate=sweep.log_uniform(1e-3, 1.0), nesterov=[False, True])
      >>> members = sweep.random(4, seed=0, **axes)
      >>> len(members), sorted(members[0]), members == sweep.random(4, seed=0, **axes)
      (4, ['learning_rate', 'nesterov'], True)
    """
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"`num` (={num!r}) must be a positive integer")
    if not axes:
        raise ValueError("random() needs at least one hyperparameter range")
    rng = np.random.default_rng(seed)
    members = []
    for _ in range(num):
        m = {}
        for name, spec in axes.items():
            if isinstance(spec, LogUniform):
                m[name] = float(math.exp(rng.uniform(math.log(spec.low), math.log(spec.high))))
            elif isinstance(spec, Uniform):
                m[name] = float(rng.uniform(spec.low, spec.high))
            else:
                choices = _values(name, spec)
                m[name] = choices[int(rng.integers(len(choices)))]
        members.append(m)
    return _with_seeds(members, seeds)


def expand_key(key: str, optimizer_args: set[str]) -> str:
    """Short names to dotted config keys (see the module docstring)."""
    if "." in key:
        return key
    if key == "seed":
        return "train.seed"
    if key in SHORT_MODEL_KEYS:
        return f"model.{key}"
    if key in optimizer_args:
        return f"optimizer.{key}"
    raise ValueError(
        f"`{key}` is not a hyperparameter of the chosen optimizer ({', '.join(sorted(optimizer_args))}); "
        "use a dotted key (e.g. `model.width`, `optimizer.learning_rate.init_value`) for anything else"
    )


def set_path(cfg: dict, dotted: str, value: Any) -> None:
    """Set ``cfg[a][b][c] = value`` for ``"a.b.c"``; the parents must exist (no typo goes unnoticed)."""
    parts = dotted.split(".")
    node = cfg
    for i, p in enumerate(parts[:-1]):
        if not isinstance(node, dict) or p not in node:
            raise ValueError(f"sweep key `{dotted}`: `{'.'.join(parts[: i + 1])}` is not in the config")
        node = node[p]
    if not isinstance(node, dict):
        raise ValueError(f"sweep key `{dotted}`: `{'.'.join(parts[:-1])}` is not a section")
    node[parts[-1]] = value
