"""Run a sweep: all members of a group trained by one compiled program.

Members differ only in *data* (optimizer hyperparameters and schedule
parameters, which live in the optimizer state; initial weights from their seed
and initialisation) share one compiled epoch function. Members that differ in
structure (optimizer kind, model width) form separate groups, each compiled
once. Within a group the members are stacked along a leading axis and run

* ``"vmap"``: batched, all at once (best on accelerators and for MLPs),
* ``"map"``: one after another inside the compiled program (``lax.map``;
  best where batched per-member convolutions are slow, e.g. on CPU),
* ``"chunked"``: ``lax.map`` over chunks that are each vmapped,

sharded across local devices along the member axis, in as many sequential
pieces as device memory requires.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optlab import config as _config
from optlab._checks import check_int
from optlab.sweep._spec import expand_key, set_path
from optlab.train._fit import Experiment, build_model, build_optimizer
from optlab.train._step import init_state

STRATEGIES = ("auto", "vmap", "map", "chunked")
_DATA_KEYS_MODEL = ("init", "init_scale")


class Member(NamedTuple):
    index: int
    values: dict  # the swept values, by dotted key
    config: dict  # the member's full resolved config


class SweepResult(NamedTuple):
    rows: list[dict]  # one per member: swept values, metrics, divergence
    best: dict  # the best row (highest final test accuracy among members that did not diverge)
    curves: dict  # key -> array (members, epochs) of per-epoch metrics
    info: dict  # strategy, groups, devices, timings
    out_dir: Any
    states: list  # final TrainState of each member (frozen at its last finite state if it diverged)
    experiments: list  # the Experiment of each member's group (its compiled functions and data)


def _as_data(value):
    # A numpy float keeps a zero hyperparameter *in* the compiled program (a Python 0 compiles it out),
    # so members with momentum 0 and 0.9 share one program.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    return np.float64(value)


def make_members(config: dict, members: list[dict]) -> list[Member]:
    """Validate and expand a member list against a config, before anything compiles.

    Example:
      >>> import optlab.sweep as sweep
      >>> config = {"optimizer": {"name": "sgd", "learning_rate": 0.1}}
      >>> members = sweep.make_members(config, sweep.grid(learning_rate=[0.01, 0.1], seeds=1))
      >>> len(members), members[1].values  # short keys expanded to dotted config keys
      (2, {'optimizer.learning_rate': 0.1, 'train.seed': 0})
    """
    if not isinstance(members, list) or not members:
        raise ValueError("a sweep needs a non-empty list of members (use optlab.sweep.grid/random/zip)")
    base = _config.resolve(config)
    opt_fn = _config.OPTIMIZERS.get(base["optimizer"]["name"])
    opt_args = set(_config._signature_defaults(opt_fn)) if opt_fn else set()
    out = []
    for i, m in enumerate(members):
        if not isinstance(m, dict):
            raise TypeError(f"member {i} must be a dict of hyperparameters, got {m!r}")
        cfg = copy.deepcopy(base)
        values = {}
        # Structural keys first (optimizer.name changes what the other keys mean).
        items = sorted(m.items(), key=lambda kv: 0 if kv[0] in ("optimizer.name", "model.name") else 1)
        for key, value in items:
            if key in ("optimizer.name",):
                new_fn = _config.OPTIMIZERS.get(value)
                if new_fn is None:
                    raise _config.ConfigError(f"member {i}: unknown optimizer {value!r}")
                opt_args_i = set(_config._signature_defaults(new_fn))
                # Drop arguments the new optimizer does not take (e.g. momentum for adam).
                cfg["optimizer"] = {k: v for k, v in cfg["optimizer"].items() if k == "name" or k in opt_args_i}
            else:
                opt_args_i = set(_config._signature_defaults(_config.OPTIMIZERS[cfg["optimizer"]["name"]]))
            dotted = expand_key(key, opt_args_i | opt_args)
            if dotted.startswith("optimizer.") and dotted.count(".") == 1 and dotted != "optimizer.name":
                if dotted.split(".")[1] not in opt_args_i:
                    raise _config.ConfigError(
                        f"member {i}: `{key}` is not a hyperparameter of optimizer {cfg['optimizer']['name']!r}; "
                        f"valid: {', '.join(sorted(opt_args_i))}"
                    )
            if isinstance(value, bool) or (not isinstance(value, (int, float, str)) and value is not None):
                if not isinstance(value, (list, tuple)):
                    raise TypeError(f"member {i}: `{key}` (={value!r}) must be a number or a string")
            if dotted.startswith("optimizer.") and dotted != "optimizer.name":
                value = _as_data(value)
            try:
                set_path(cfg, dotted, value)
            except ValueError as e:
                if dotted.startswith(("optimizer.", "model.", "train.", "data.")) and dotted.count(".") == 1:
                    cfg[dotted.split(".")[0]][dotted.split(".")[1]] = value
                else:
                    raise _config.ConfigError(f"member {i}: {e}") from e
            values[dotted] = value.item() if isinstance(value, np.generic) else value
        try:
            cfg = _config.resolve(cfg)
            _check_model(cfg["model"])
        except _config.ConfigError as e:
            raise _config.ConfigError(f"member {i} ({values}): {e}") from e
        out.append(Member(i, values, cfg))
    return out


def _check_model(model: dict) -> None:
    # Models are built only when their group starts, so a typo in a swept model key (or a bad
    # `init`) in a later group would otherwise surface after the earlier groups have trained.
    from optlab.models import MODELS, get_initializer

    name = model["name"]
    cls = MODELS.get(name.lower()) if isinstance(name, str) else None
    if cls is None:
        raise _config.ConfigError(f"`model.name` (={name!r}) must be one of {', '.join(map(repr, MODELS))}")
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "rngs"}
    unknown = sorted(set(model) - accepted - {"name"})
    if unknown:
        raise _config.ConfigError(
            f"unknown model argument(s) {', '.join(f'`model.{k}`' for k in unknown)} for model {name!r}; "
            f"valid: {', '.join(sorted(accepted))}"
        )
    if "init" in model or "init_scale" in model:
        try:
            get_initializer(model.get("init", "default"), model.get("init_scale", 1.0))
        except (TypeError, ValueError) as e:
            raise _config.ConfigError(f"model section: {e}") from e


def _structure_key(cfg: dict) -> str:
    """The config with data-carried values blanked: members with equal keys share a program."""
    c = copy.deepcopy(cfg)

    def blank_numbers(node):
        if isinstance(node, dict):
            return {k: (v if k in ("schedule", "name") else blank_numbers(v)) for k, v in node.items()}
        if isinstance(node, bool) or node is None or isinstance(node, str):
            return node
        if isinstance(node, (int, float)):
            return "<data>"
        if isinstance(node, (list, tuple)):
            return [blank_numbers(v) for v in node]
        return node

    c["optimizer"] = blank_numbers(c["optimizer"])
    for k in _DATA_KEYS_MODEL:
        c["model"].pop(k, None)
    c["train"].pop("seed", None)
    c.pop("output", None)
    return json.dumps(c, sort_keys=True, default=str)


def _stack(trees):
    # Stacked on the host: an eager jnp.stack compiles one program per leaf shape, which costs
    # more than the copy for the small states of a sweep; extended dtypes (typed keys) stay in jax.
    def stack(*xs):
        if jax.dtypes.issubdtype(xs[0].dtype, jax.dtypes.extended):
            return jnp.stack(xs)
        return np.stack([np.asarray(x) for x in xs])

    return jax.tree_util.tree_map(stack, *trees)


@jax.jit
def _freeze(alive, new, old):
    """Members that diverged keep their last finite state; the others take the new one (one program)."""
    return jax.tree_util.tree_map(
        lambda a, b: jnp.where(alive.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old
    )


def _index(tree, i):
    return jax.tree_util.tree_map(lambda x: x[i], tree)


def _has_conv(model_name: str) -> bool:
    return model_name in ("convnet", "cnn", "resnet9")


def choose_strategy(cfg: dict, n: int, requested: str, devices: int = 1) -> str:
    """The strategy for ``n`` members (an integer >= 1) on ``devices`` devices (>= 1).

    ``auto``: batched on accelerators; on the CPU ``map`` for convolutions and large groups.
    A ``cfg`` without a ``"model"`` section means the default model (an MLP).

    On the CPU, batching members multiplies every activation by their number:
    past a few members per device they leave the caches, and XLA turns
    vmapped per-member convolutions into slow grouped ones, so running
    members one after another inside the program is faster. Measured with
    ``benchmarks/sweep_throughput.py`` (docs/benchmarks.md): ConvNet ``vmap``
    0.3-0.8x of ``map``; MLP ``vmap`` 1.1x of ``map`` up to 8 members a
    device, 0.6-0.9x beyond.

    Example:
      >>> import optlab.sweep as sweep
      >>> mlp = {"model": {"name": "mlp"}}
      >>> [sweep.choose_strategy(mlp, n, "auto") for n in (1, 4)], sweep.choose_strategy(mlp, 4, "chunked")
      (['map', 'vmap'], 'chunked')
    """
    if not isinstance(cfg, dict):
        raise TypeError(f"`cfg` (={cfg!r}) must be a config dict")
    model = cfg.get("model", {})  # no model section: the default model, as `run` resolves the config
    if not isinstance(model, dict):
        raise TypeError(f'`cfg["model"]` (={model!r}) must be a dict')
    check_int("n", n, 1)
    check_int("devices", devices, 1)
    if requested not in STRATEGIES:
        raise ValueError(f"`strategy` (={requested!r}) must be one of {STRATEGIES}")
    if requested != "auto":
        return requested
    if n == 1:
        return "map"
    if jax.default_backend() != "cpu":
        return "vmap"
    name = model.get("name", _config.default_config()["model"]["name"])
    return "map" if _has_conv(name) or math.ceil(int(n) / int(devices)) > 8 else "vmap"


def devices_for(n: int, devices: list) -> list:
    """The fewest of ``devices`` that keep ``ceil(n / len(devices))`` members on each.

    A device holding only padding (copies of the last member) would compute for
    nothing, and on the CPU take a core from the others: 1 member on 2 CPU
    devices ran at 0.6x of 1 device.
    """
    per_device = math.ceil(n / len(devices))
    return devices[: math.ceil(n / per_device)]


class Plan(NamedTuple):
    """How a group of members is split into sequential pieces, each sharded over ``devices``."""

    devices: int  # devices used
    per_device: int  # trainings on each device in a piece (members, and copies padding the piece)
    pieces: int  # pieces run one after another
    members_per_piece: int  # real members in each piece (the last may hold fewer)

    @property
    def in_flight(self) -> int:
        return self.devices * self.per_device


def plan_pieces(n: int, num_devices: int, cap: int | None) -> Plan:
    """Split ``n`` members into pieces of at most ``cap`` trainings at once over ``num_devices`` devices.

    Every piece has the same shape (one compiled program), ``devices * per_device``
    trainings; a piece short of that is padded with copies of its last member.
    ``cap=None`` (all members fit): one piece on the fewest devices that keep
    ``ceil(n / devices)`` members on each (`devices_for`). Otherwise
    ``devices * per_device <= cap``, choosing, over the number of devices, the
    least sequential work per device (``pieces * per_device``), then the
    fewest padding copies, pieces and devices.

    Example:
      >>> from optlab.sweep._run import plan_pieces
      >>> plan_pieces(6, 8, None), plan_pieces(6, 8, 2).in_flight
      (Plan(devices=6, per_device=1, pieces=1, members_per_piece=6), 2)
    """
    if cap is None:
        per_device = math.ceil(n / num_devices)
        used = math.ceil(n / per_device)
        return Plan(used, math.ceil(n / used), 1, n)
    best, best_cost = None, None
    for d in range(1, min(num_devices, cap) + 1):
        k = min(math.ceil(n / d), cap // d)
        pieces = math.ceil(n / (d * k))
        per_piece = math.ceil(n / pieces)  # balanced pieces: 3 + 3, not 4 + 2 and two copies
        per_device = math.ceil(per_piece / d)
        used = math.ceil(per_piece / per_device)
        plan = Plan(used, per_device, pieces, per_piece)
        cost = (pieces * per_device, pieces * plan.in_flight - n, pieces, used)
        if best_cost is None or cost < best_cost:
            best, best_cost = plan, cost
    return best


def _shard_map(fn, mesh, in_specs, out_specs):
    sm = getattr(jax, "shard_map", None)
    if sm is None:  # jax < 0.7
        from jax.experimental.shard_map import shard_map as sm  # type: ignore[no-redef]
    try:
        return sm(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    except TypeError:
        return sm(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


class _GroupProgram:
    """The compiled functions of one group, over a stacked member axis."""

    def __init__(self, exp: Experiment, strategy: str, chunk: int, devices: list):
        self.exp = exp
        self.strategy = strategy
        self.devices = devices

        def local_epoch(states, images, labels, epoch):
            one = lambda s: exp.train_epoch(s, images, labels, epoch)  # noqa: E731
            if strategy == "vmap":
                return jax.vmap(one)(states)
            if strategy == "map":
                return jax.lax.map(one, states)
            # Chunks of c members each vmapped, one after another; members that do not fill a last
            # chunk run as one smaller vmapped chunk rather than padded with copies that train for nothing.
            m = jax.tree_util.tree_leaves(states)[0].shape[0]
            c = max(1, min(chunk, m))
            full, rest = divmod(m, c)
            head = jax.tree_util.tree_map(lambda x: x[: full * c].reshape((full, c) + x.shape[1:]), states)
            out = jax.lax.map(jax.vmap(one), head)
            out = jax.tree_util.tree_map(lambda x: x.reshape((full * c,) + x.shape[2:]), out)
            if rest:
                tail = jax.vmap(one)(jax.tree_util.tree_map(lambda x: x[full * c :], states))
                out = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), out, tail)
            return out

        def local_eval(states, images, labels):
            return jax.vmap(lambda s: exp.evaluate(s, images, labels))(states)

        if len(devices) > 1:
            from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

            self.mesh = Mesh(np.array(devices), ("members",))
            self.member_sharding = NamedSharding(self.mesh, P("members"))
            local_epoch = _shard_map(local_epoch, self.mesh, (P("members"), P(), P(), P()), (P("members"), P("members")))
            local_eval = _shard_map(local_eval, self.mesh, (P("members"), P(), P()), P("members"))
        else:
            self.mesh = None
            self.member_sharding = None
        self.epoch = jax.jit(local_epoch)
        self.evaluate = jax.jit(local_eval)

    def place(self, states):
        if self.member_sharding is None:
            return jax.device_put(states, self.devices[0])
        return jax.device_put(states, self.member_sharding)


def _member_state(member: Member, exp: Experiment):
    cfg = member.config
    seed = cfg["train"]["seed"]
    model = build_model(cfg, exp.dataset, seed)
    tx = build_optimizer(cfg)
    graphdef, state = init_state(model, tx, seed)
    return graphdef, state


def _in_flight(exp: Experiment, state, n: int, limit: int | None, strategy: str = "vmap") -> int:
    """How many members to run at once: the user's limit, else what fits in half the free memory."""
    if limit is not None:
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"`max_in_flight` (={limit!r}) must be a positive integer")
        return min(limit, n)
    per_member = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
    # Batched strategies hold every member's activations at once, so they need the epoch's
    # temporary memory per member (from compiling one member's epoch: seconds on a CPU). "map"
    # trains one member at a time inside the program: its temporaries are one member's, whatever
    # the number of members, and only the stacked states grow.
    if strategy != "map":
        try:
            compiled = jax.jit(exp.train_epoch).lower(state, exp.train_images, exp.train_labels, 0).compile()
            mem = compiled.memory_analysis()
            per_member += int(getattr(mem, "temp_size_in_bytes", 0) or 0)
        except Exception:  # noqa: BLE001 - memory analysis is best effort; fall back to the state size
            pass
    dev = jax.local_devices()[0]  # jax.devices()[0] belongs to process 0 in a multi-process run
    free = None
    stats = getattr(dev, "memory_stats", lambda: None)()
    if stats and "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    if free is None:
        try:
            import psutil

            free = psutil.virtual_memory().available
        except ImportError:
            free = 8 << 30
    return max(1, min(n, int(0.5 * free // max(per_member, 1))))


def run(
    config: dict,
    members: list[dict],
    *,
    strategy: str = "auto",
    chunk_size: int = 4,
    num_devices: int | None = None,
    max_in_flight: int | None = None,
    out_dir: str | os.PathLike | None = None,
    quiet: bool = False,
    plots: bool | None = None,
) -> SweepResult:
    """Train every member of a sweep; returns the results table, the best member and per-member curves.

    Args:
      config: a config dict (as ``get_config()`` returns).
      members: from `grid`, `random` or `zip`: dicts of hyperparameter name -> value.
      strategy: ``"auto"``, ``"vmap"``, ``"map"`` or ``"chunked"`` (see the module docstring).
      chunk_size: members per vmapped chunk for ``"chunked"`` (at most: a device holding fewer
        members vmaps them all; members short of a whole chunk run as one smaller last chunk).
      num_devices: local devices to shard members over (default: all).
      max_in_flight: most members trained at once, over all devices, copies padding a piece to
        whole devices included (default: what fits in memory); more members run in pieces.
        ``info["groups"]`` records each group's ``devices``, ``in_flight``, ``pieces`` and
        ``padding`` (copies trained to fill the pieces).
      out_dir: where to write ``results.csv``, ``results.md``, ``curves.npz``, plots.
      plots: draw the plots into ``out_dir`` (default: the config's ``output.plots``).
    """
    t_start = time.perf_counter()
    expanded = make_members(config, members)
    available = jax.local_devices()
    # Counts are integers (numpy ones too); a bool would silently mean 1, so it is refused.
    if num_devices is None:
        devices = available
    else:
        check_int("num_devices", num_devices, 1)
        num_devices = int(num_devices)
        if num_devices > len(available):
            raise ValueError(f"`num_devices` (={num_devices}) exceeds the {len(available)} local devices")
        devices = available[:num_devices]
    if strategy not in STRATEGIES:
        raise ValueError(f"`strategy` (={strategy!r}) must be one of {STRATEGIES}")
    check_int("chunk_size", chunk_size, 1)
    chunk_size = int(chunk_size)
    if max_in_flight is not None:
        check_int("max_in_flight", max_in_flight, 1)
        max_in_flight = int(max_in_flight)

    groups: dict[str, list[Member]] = {}
    for m in expanded:
        groups.setdefault(_structure_key(m.config), []).append(m)

    epochs = expanded[0].config["train"]["epochs"]
    rows: list[dict] = [None] * len(expanded)  # type: ignore[list-item]
    final_states: list = [None] * len(expanded)
    member_exps: list = [None] * len(expanded)
    curve_keys = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "learning_rate")
    curves = {k: np.full((len(expanded), epochs), np.nan) for k in curve_keys}
    info = {"groups": [], "devices": len(devices), "backend": jax.default_backend()}

    for gi, group in enumerate(groups.values()):
        g0 = time.perf_counter()
        exp = Experiment(group[0].config)
        if any(m.config["train"]["epochs"] != epochs for m in group):
            raise _config.ConfigError("all members of a sweep must train for the same number of epochs")
        strat = choose_strategy(exp.cfg, len(group), strategy, len(devices_for(len(group), devices)))
        states, ref_def = [], None
        for m in group:
            graphdef, st = _member_state(m, exp)
            treedef = jax.tree_util.tree_structure(st)
            if ref_def is None:
                ref_def = treedef
            elif treedef != ref_def:
                raise _config.ConfigError(
                    f"member {m.index} ({m.values}) changes the structure of the training state; "
                    "sweep structural choices (optimizer kind, a literal 0 that switches a feature off, model "
                    "width) as separate values of a dotted key such as `optimizer.name` or `model.width`"
                )
            states.append(st)
        in_flight = _in_flight(exp, states[0], len(group), max_in_flight, strat)
        # A user's `max_in_flight` is a hard cap on trainings at once, padding copies included. Members
        # that all fit in memory run as one piece, padded up to whole devices (7 members on 2: 4 + 3
        # and one copy); `chunked` splits each device's members itself, so it never pads to chunks.
        if max_in_flight is not None:
            cap = max_in_flight
        else:
            cap = None if in_flight >= len(group) else in_flight
        plan = plan_pieces(len(group), len(devices), cap)
        nd = plan.devices
        program = _GroupProgram(exp, strat, chunk_size, devices[:nd])
        for p in range(plan.pieces):
            start = p * plan.members_per_piece
            idx = list(range(start, min(len(group), start + plan.members_per_piece)))
            padded = idx + [idx[-1]] * (plan.in_flight - len(idx))
            stacked = program.place(_stack([states[i] for i in padded]))
            alive = np.ones(len(padded), bool)
            died = {}
            for epoch in range(epochs):
                new, metrics = program.epoch(stacked, exp.train_images, exp.train_labels, epoch)
                losses = np.asarray(jax.device_get(metrics["loss"]))  # (members, steps)
                finite = np.all(np.isfinite(losses), axis=1)
                newly = alive & ~finite
                for j in np.flatnonzero(newly):
                    bad = int(np.argmin(np.isfinite(losses[j])))
                    died[j] = {"epoch": epoch + 1, "step": epoch * exp.steps_per_epoch + bad + 1}
                alive &= finite
                # Diverged members are frozen at their last finite state; the others go on.
                stacked = _freeze(alive, new, stacked)
                ev = jax.device_get(program.evaluate(stacked, exp.test_images, exp.test_labels))
                for j, i in enumerate(idx):
                    gi_member = group[i].index
                    curves["train_loss"][gi_member, epoch] = np.mean(losses[j]) if alive[j] else np.nan
                    curves["train_accuracy"][gi_member, epoch] = np.mean(np.asarray(metrics["accuracy"])[j])
                    curves["learning_rate"][gi_member, epoch] = np.asarray(metrics["learning_rate"])[j, -1]
                    curves["test_loss"][gi_member, epoch] = ev["loss"][j] if alive[j] else np.nan
                    curves["test_accuracy"][gi_member, epoch] = ev["accuracy"][j] if alive[j] else np.nan
                if not quiet:
                    acc = [f"{float(ev['accuracy'][j]):.4f}" if alive[j] else "diverged" for j in range(len(idx))]
                    print(f"group {gi} piece {p} epoch {epoch + 1}/{epochs}: test acc {', '.join(acc)}", flush=True)
            host = jax.device_get(stacked)
            for j, i in enumerate(idx):
                m = group[i]
                final_states[m.index] = _index(host, j)
                member_exps[m.index] = exp
                acc_curve = curves["test_accuracy"][m.index]
                rows[m.index] = {
                    "member": m.index,
                    **m.values,
                    "group": gi,
                    "final_test_accuracy": float(acc_curve[-1]),
                    "best_test_accuracy": float(np.nanmax(acc_curve)) if np.any(np.isfinite(acc_curve)) else math.nan,
                    "final_test_loss": float(curves["test_loss"][m.index, -1]),
                    "final_train_loss": float(curves["train_loss"][m.index, -1]),
                    "diverged_at_step": died[j]["step"] if j in died else None,
                }
        info["groups"].append({
            "group": gi, "members": len(group), "strategy": strat, "devices": nd, "in_flight": plan.in_flight,
            "pieces": plan.pieces, "padding": plan.pieces * plan.in_flight - len(group),
            "seconds": time.perf_counter() - g0,
        })
    info["seconds"] = time.perf_counter() - t_start
    ok = [r for r in rows if r["diverged_at_step"] is None and math.isfinite(r["final_test_accuracy"])]
    best = max(ok, key=lambda r: r["final_test_accuracy"]) if ok else {}
    result = SweepResult(rows, best, curves, info, out_dir, final_states, member_exps)
    if out_dir is not None:
        from optlab.sweep._report import write_report

        write_report(result, out_dir, plots=expanded[0].config["output"]["plots"] if plots is None else plots)
    return result
