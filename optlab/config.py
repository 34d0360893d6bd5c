"""Experiment configs: Python files with ``get_config()`` returning nested dicts, checked strictly.

A config is plain data (dicts, lists, numbers, strings) so that it can be
written to a run folder as JSON and read back. `resolve` fills defaults and
rejects anything unknown or mistyped, naming the key. Optimizers and schedules
are chosen by name with their arguments; the set of valid arguments is read
from the optlab function's own signature, so defaults live in one place.

    def get_config():
        return {
            "data": {"name": "mnist", "batch_size": 128},
            "model": {"name": "convnet"},
            "optimizer": {"name": "sgd", "learning_rate": 0.05},
            "train": {"epochs": 10},
        }

A schedule is a dict with a ``schedule`` key:
``"learning_rate": {"schedule": "cosine", "init_value": 0.1, "T_max": 1000}``.
``one_cycle`` takes ``"part": "momentum"`` for its momentum curve (default:
the learning rate), and ``per_epoch`` takes ``"inner": {...}`` and
``"steps_per_epoch"``.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import inspect
import json
import pathlib
from typing import Any

import optlab
from optlab import schedules as _schedules


class ConfigError(ValueError):
    """A config key that is unknown, mistyped or out of range; the message names the key."""


# The sections of a config and their defaults. One source of truth: train/fit read these.
DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {
        "name": "digits",
        "data_dir": None,
        "normalization": "unit",  # unit [0,1] | centered [-0.5,0.5] | standardize | raw [0,255]
        "batch_size": 128,
        "eval_batch_size": 1000,
        "augment": False,  # random crop + flip (CIFAR-10)
        "limit_train": None,  # use only the first N training examples (quick experiments, tests)
    },
    "model": {"name": "mlp"},  # other keys: the model's constructor arguments
    "optimizer": {"name": "sgd"},  # other keys: the optimizer's arguments (schedules allowed)
    "train": {
        "epochs": 10,
        "seed": 0,
        "loss": "cross_entropy",
        "label_smoothing": 0.0,
        "clip_global_norm": None,
        "skip_nonfinite": False,  # ride over NaN/inf steps instead of stopping
        # Run the optimizer on the parameters packed into a few buffers (optlab.flatten): same
        # results, fewer kernels; pays off for models with many small arrays.
        "flatten": False,
        "ema_decay": None,  # evaluate an exponential moving average of the weights
        "accumulate_steps": 1,
        "eval_every": 1,  # epochs
        "checkpoint_every": 1,  # epochs; 0 = only at the end
        "keep_checkpoints": 2,
        "log_every": 50,  # steps between per-step log lines in the JSONL log
        # How an epoch runs: "scan" (one compiled lax.scan), "step" (a Python loop over one jitted
        # step) or "auto" ("step" for conv models on the CPU, where a conv gradient in a loop is slow).
        "loop": "auto",
    },
    "output": {"dir": "runs", "name": None, "plots": True},
}

# The values of train.loop (optlab.train.choose_epoch_loop resolves "auto").
EPOCH_LOOPS = ("auto", "scan", "step")

OPTIMIZERS = {
    "sgd": optlab.sgd,
    "classical_momentum": optlab.classical_momentum,
    "nesterov_momentum": optlab.nesterov_momentum,
    "adagrad": optlab.adagrad,
    "rmsprop": optlab.rmsprop,
    "adam": optlab.adam,
    "adamw": optlab.adamw,
    "adadelta": optlab.adadelta,
    "rprop": optlab.rprop,
    "adaptive_gains": optlab.adaptive_gains,
    "swats": optlab.swats,
}


def _schedule_registry() -> dict:
    names = [n for n in getattr(_schedules, "__all__", []) if n not in ("Schedule", "OneCycle")]
    return {n: getattr(_schedules, n) for n in names if callable(getattr(_schedules, n))}


def load_config_file(path: str | pathlib.Path) -> dict:
    """Import a config file and call its ``get_config()``."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"optlab_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {str(path)!r} defines no get_config()")
    cfg = module.get_config()
    if not isinstance(cfg, dict):
        raise ConfigError(f"get_config() in {str(path)!r} must return a dict, got {type(cfg).__name__}")
    return cfg


def load_sweep_file(path: str | pathlib.Path) -> list[dict] | None:
    """The member list of a config file's ``get_sweep()``, or None when it has none."""
    path = pathlib.Path(path)
    spec = importlib.util.spec_from_file_location(f"optlab_sweep_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, "get_sweep", None)
    return None if fn is None else fn()


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings (values parsed as Python literals, else kept as strings)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = ast.literal_eval(raw.strip())  # " 3" would be an IndentationError, i.e. a string
        except (ValueError, SyntaxError):
            value = raw
        parts = key.strip().split(".")
        node = cfg
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = value
    return cfg


def _type_ok(value, default) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list))
    return True


def _check_section(name: str, given: dict, defaults: dict, open_keys: bool = False) -> dict:
    if not isinstance(given, dict):
        raise ConfigError(f"config section `{name}` must be a dict, got {given!r}")
    out = dict(defaults)
    for k, v in given.items():
        if k not in defaults and not open_keys:
            raise ConfigError(f"unknown config key `{name}.{k}`; valid keys: {', '.join(sorted(defaults))}")
        if k in defaults and not _type_ok(v, defaults[k]):
            raise ConfigError(
                f"config key `{name}.{k}` (={v!r}) has type {type(v).__name__}, expected {type(defaults[k]).__name__}"
            )
        out[k] = v
    return out


def _signature_defaults(fn) -> dict:
    return {
        p.name: (None if p.default is inspect.Parameter.empty else p.default)
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def build_schedule(spec: dict, where: str):
    """``{"schedule": "cosine", ...}`` -> a Schedule, checking argument names."""
    registry = _schedule_registry()
    spec = dict(spec)
    kind = spec.pop("schedule")
    if not isinstance(kind, str) or kind not in registry:
        raise ConfigError(f"unknown schedule `{where}.schedule` (={kind!r}); known: {', '.join(sorted(registry))}")
    fn = registry[kind]
    valid = _signature_defaults(fn)
    part = spec.pop("part", "learning_rate") if kind == "one_cycle" else None
    if part not in (None, "learning_rate", "momentum"):
        raise ConfigError(f"`{where}.part` (={part!r}) must be 'learning_rate' or 'momentum' (the two curves of one_cycle)")
    if kind == "per_epoch":
        # per_epoch's own argument is called `schedule`, the key that names the kind here: use `inner`.
        if "schedule" in spec or "inner" not in spec:
            raise ConfigError(f"`{where}`: per_epoch takes `inner` (the schedule to step per epoch) and `steps_per_epoch`")
        spec["schedule"] = spec.pop("inner")
    for k in spec:
        if k not in valid:
            raise ConfigError(f"unknown argument `{where}.{k}` for schedule {kind!r}; valid: {', '.join(valid)}")
    args = {k: (build_schedule(v, f"{where}.{k}") if isinstance(v, dict) and "schedule" in v else v) for k, v in spec.items()}
    if kind in ("join",) and "schedules" in args:
        args["schedules"] = [build_schedule(s, f"{where}.schedules[{i}]") for i, s in enumerate(args["schedules"])]
    try:
        sched = fn(**args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"`{where}`: {e}") from e
    if kind == "one_cycle":
        sched = getattr(sched, part)
    return sched


def build_optimizer(spec: dict):
    """``{"name": "sgd", "learning_rate": 0.05, ...}`` -> an optlab optimizer."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer `optimizer.name` (={name!r}); known: {', '.join(sorted(OPTIMIZERS))}")
    fn = OPTIMIZERS[name]
    valid = _signature_defaults(fn)
    args = {}
    for k, v in spec.items():
        if k not in valid:
            raise ConfigError(f"unknown config key `optimizer.{k}` for optimizer {name!r}; valid: {', '.join(valid)}")
        if isinstance(v, dict) and "schedule" in v:
            v = build_schedule(v, f"optimizer.{k}")
        elif k == "learning_rate" and isinstance(v, (list, tuple)):
            # No default to compare the type with (sgd's is required), and a list would pass
            # here and fail at the first step without naming the key.
            raise ConfigError(f"config key `optimizer.learning_rate` (={v!r}) must be a number or a schedule dict")
        elif not _type_ok(v, valid[k]):
            raise ConfigError(
                f"config key `optimizer.{k}` (={v!r}) has type {type(v).__name__}, expected {type(valid[k]).__name__}"
            )
        args[k] = tuple(v) if isinstance(v, list) else v
    try:
        return fn(**args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"optimizer {name!r}: {e}") from e


def _check_values(cfg: dict) -> None:
    """The keys whose default is None (any type passes `_check_section`) and the value ranges."""
    from optlab import data as _data  # noqa: PLC0415 - only the name tables are needed

    def fail(key, value, must):
        raise ConfigError(f"config key `{key}` (={value!r}) must be {must}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    d, t, o = cfg["data"], cfg["train"], cfg["output"]
    if d["name"] not in _data.NAMES:
        fail("data.name", d["name"], f"one of {', '.join(_data.NAMES)}")
    if d["normalization"] not in _data.MODES:
        fail("data.normalization", d["normalization"], f"one of {', '.join(_data.MODES)}")
    if not is_int(d["eval_batch_size"]) or d["eval_batch_size"] < 1:
        fail("data.eval_batch_size", d["eval_batch_size"], "a positive integer")
    if d["limit_train"] is not None and (not is_int(d["limit_train"]) or d["limit_train"] < 1):
        fail("data.limit_train", d["limit_train"], "a positive integer or None")
    for key, value in (("data.data_dir", d["data_dir"]), ("output.name", o["name"]), ("output.dir", o["dir"])):
        if value is not None and not isinstance(value, str):
            fail(key, value, "a string")
    # jax.random.key takes 32 bits of a Python int here (2**32 would alias seed 0) and
    # overflows on larger ones; say so instead.
    if not is_int(t["seed"]) or not 0 <= t["seed"] < 2**32:
        fail("train.seed", t["seed"], "an integer in [0, 2**32)")
    if t["loss"] != "cross_entropy":  # the only loss `fit` implements
        fail("train.loss", t["loss"], "'cross_entropy'")
    if not 0 <= t["label_smoothing"] < 1:
        fail("train.label_smoothing", t["label_smoothing"], "in [0, 1)")
    if t["clip_global_norm"] is not None and (not is_number(t["clip_global_norm"]) or t["clip_global_norm"] <= 0):
        fail("train.clip_global_norm", t["clip_global_norm"], "a positive number or None")
    if t["ema_decay"] is not None and (not is_number(t["ema_decay"]) or not 0 <= t["ema_decay"] < 1):
        fail("train.ema_decay", t["ema_decay"], "a number in [0, 1) or None")
    if t["loop"] not in EPOCH_LOOPS:
        fail("train.loop", t["loop"], f"one of {', '.join(map(repr, EPOCH_LOOPS))}")


def resolve(cfg: dict) -> dict:
    """Validate a raw config and fill in defaults; returns a new dict (JSON-serialisable)."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"a config must be a dict, got {type(cfg).__name__}")
    unknown = set(cfg) - set(DEFAULTS) - {"sweep"}
    if unknown:
        raise ConfigError(f"unknown config section(s) {sorted(unknown)}; valid: {', '.join(DEFAULTS)}")
    out = {}
    for section, defaults in DEFAULTS.items():
        open_keys = section in ("model", "optimizer")
        out[section] = _check_section(section, cfg.get(section, {}), defaults, open_keys=open_keys)
    if "sweep" in cfg:
        out["sweep"] = copy.deepcopy(cfg["sweep"])
    # Validate the optimizer now (names, types, ranges), before anything compiles.
    build_optimizer(out["optimizer"])
    t = out["train"]
    for k in ("epochs", "eval_every", "checkpoint_every", "keep_checkpoints", "log_every", "accumulate_steps"):
        if not isinstance(t[k], int) or isinstance(t[k], bool) or t[k] < (1 if k in ("epochs", "accumulate_steps", "keep_checkpoints", "log_every", "eval_every") else 0):
            raise ConfigError(f"config key `train.{k}` (={t[k]!r}) must be a positive integer")
    if not isinstance(out["data"]["batch_size"], int) or out["data"]["batch_size"] < 1:
        raise ConfigError(f"config key `data.batch_size` (={out['data']['batch_size']!r}) must be a positive integer")
    _check_values(out)
    try:
        json.dumps(out)
    except TypeError as e:
        raise ConfigError(f"config values must be plain data (numbers, strings, lists, dicts): {e}") from e
    return out


def default_config() -> dict:
    """The embedded default: scikit-learn's 8x8 digits with an MLP (no download needed)."""
    return {
        "data": {"name": "digits", "normalization": "standardize", "batch_size": 32},
        "model": {"name": "mlp", "hidden": [128], "activation": "relu", "init": "he_normal"},
        "optimizer": {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9},
        "train": {"epochs": 20, "seed": 0},
    }
