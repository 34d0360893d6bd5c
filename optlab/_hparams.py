"""Hyperparameters as data.

Every named optimizer is built by `with_hyperparams`: its numeric
hyperparameters (learning rate, momentum, betas, eps, weight decay...) are
stored *in the optimizer state* as float32 arrays (float64 in JAX's 64-bit
mode: `optlab.schedules._core.real_dtype`), and the update rule is
rebuilt from those arrays on every call. Three things follow:

1. Hyperparameters may be JAX arrays or tracers, so an optimizer built inside
   ``jax.vmap`` over a vector of learning rates is a sweep.
2. `hyperparams(state)` reads the current values inside jit (for logging) and
   `set_hyperparams(state, learning_rate=...)` changes them without
   recompiling; the result is bit-identical to building the optimizer with
   that value, because both paths feed the same float32 array to the same code.
3. A hyperparameter given as a `Schedule` lives in the state too (its
   parameters are pytree leaves), evaluated at the step counter; its value at
   the last step taken is what `hyperparams` reports.

Structural choices (``nesterov``, ``amsgrad``, a literal ``0`` that switches a
feature off) are fixed when the optimizer is built; changing them changes the
compiled program, so they are not in the state.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from optlab import _checks
from optlab._base import (
    GradientTransformationExtraArgs,
    check_same_structure,
    safe_increment,
    tree_copy,
    step_counter,
    with_extra_args_support,
)
from optlab.schedules._core import Schedule, real_dtype


# kind -> check(name, value)
_KINDS = {
    "learning_rate": lambda name, value: _checks.check_learning_rate(value, name=name),
    "positive_learning_rate": lambda name, value: _checks.check_learning_rate(value, positive=True, name=name),
    "probability": _checks.check_probability,  # [0, 1): betas, decay rates
    "unit": lambda name, value: _checks.check_range(name, value, 0.0, 1.0),  # [0, 1]
    "nonnegative": _checks.check_nonnegative,
    "positive": _checks.check_positive,
}


@jax.tree_util.register_pytree_node_class
class Limits:
    """The allowed range of each hyperparameter of a named optimizer: ``{name: kind}``.

    A pytree node without leaves: it sits in the optimizer state as static
    structure, so `set_hyperparams` can check new values against the same
    ranges the optimizer function checked when it was built (one table per
    optimizer, used for both). Kinds: ``learning_rate`` (finite, >= 0),
    ``positive_learning_rate``, ``probability`` ([0, 1)), ``unit`` ([0, 1]),
    ``nonnegative``, ``positive``.
    """

    def __init__(self, kinds: dict | tuple):
        self.kinds = tuple(dict(kinds).items())
        unknown = sorted({k for _, k in self.kinds} - set(_KINDS))
        if unknown:
            raise ValueError(f"unknown limit kind(s) {unknown}; choose from {sorted(_KINDS)}")

    def check(self, values: dict) -> None:
        """Raise for a concrete value out of its range; traced values and None (a feature off) pass."""
        for name, kind in self.kinds:
            value = values.get(name)
            if value is not None:
                _KINDS[kind](name, value)

    def tree_flatten(self):
        return (), self.kinds

    @classmethod
    def tree_unflatten(cls, kinds, children):
        del children
        return cls(kinds)

    def __eq__(self, other):
        return isinstance(other, Limits) and other.kinds == self.kinds

    def __hash__(self):
        return hash(self.kinds)

    def __repr__(self):
        return f"Limits({dict(self.kinds)})"


class HyperparamsState(NamedTuple):
    """State of an optimizer built by `with_hyperparams`.

    Attributes:
      count: number of updates applied (int32), at which schedules are
        evaluated; None when no hyperparameter follows a schedule (nothing
        reads it then, and see `optlab._base.step_counter`).
      hyperparams: current value of every numeric hyperparameter (float32
        arrays): for a scheduled one, the value used by the last update (the
        value for step 0 before any update).
      schedules: the `Schedule` of each scheduled hyperparameter (data too).
      inner_state: the state of the update rule itself.
      limits: the named optimizer's `Limits` (no arrays: static structure),
        against which `set_hyperparams` checks new values; None for a
        `with_hyperparams` built by hand.
    """

    count: jax.Array | None
    hyperparams: dict
    schedules: dict
    inner_state: Any
    limits: Limits | None = None


def _as_hparam(name: str, value: Any) -> jax.Array:
    if isinstance(value, bool):
        raise TypeError(f"hyperparameter `{name}` (={value!r}) must be a number, not a bool")
    try:
        return jnp.asarray(value, dtype=real_dtype())
    except (TypeError, ValueError) as e:  # numpy raises ValueError for strings
        raise TypeError(f"hyperparameter `{name}` (={value!r}) must be a number or array") from e


def _strong(schedule: Schedule) -> Schedule:
    """The schedule with every parameter a strongly typed array.

    A Python number leaf would enter jit weakly typed, and the array that
    `set_hyperparams` puts in its place is not: the step would be retraced.
    """
    return jax.tree_util.tree_map(lambda x: jnp.array(x, dtype=jnp.asarray(x).dtype), schedule)


def with_hyperparams(build: Callable[..., Any], **hyperparams: Any) -> GradientTransformationExtraArgs:
    """Build a transform whose numeric hyperparameters live in its state.

    Args:
      build: ``build(**values) -> GradientTransformation``: constructs the update
        rule from hyperparameter values (float32 scalars or arrays, possibly
        traced). It must not branch in Python on those values.
      **hyperparams: numbers, arrays, `Schedule`s, or plain callables
        ``step -> value`` (a plain callable is kept as code, not data: it cannot
        be replaced with `set_hyperparams`). ``None`` values are passed to
        ``build`` as ``None`` and not stored.

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> tx = optlab.with_hyperparams(lambda lr: optlab.scale(-lr), lr=0.1)
      >>> state = tx.init({"w": jnp.ones(2)})
      >>> float(optlab.hyperparams(state)["lr"])
      0.10000000149011612
    """
    return with_limited_hyperparams(build, None, **hyperparams)


def with_limited_hyperparams(build: Callable[..., Any], limits: Limits | None, **hyperparams: Any):
    """`with_hyperparams` for a named optimizer whose hyperparameters have allowed ranges.

    The optimizer function checks its arguments with ``limits.check`` first
    (on the values as given, before a literal 0 switches a feature off); the
    same ``limits`` are kept in every state for `set_hyperparams`.
    """
    absent = {k for k, v in hyperparams.items() if v is None}
    # A plain callable becomes a parameterless Schedule: the function is static
    # (part of the tree structure), so set_hyperparams rejects a number for it
    # instead of storing a value the update would never read.
    scheduled = {
        k: _strong(v) if isinstance(v, Schedule) else Schedule(v, getattr(v, "__name__", "callable"), {})
        for k, v in hyperparams.items()
        if callable(v)
    }
    numeric = {k: _as_hparam(k, v) for k, v in hyperparams.items() if k not in absent and k not in scheduled}

    def values_at(count, numeric_values, schedules):
        vals = dict(numeric_values)
        for k, s in schedules.items():
            vals[k] = jnp.asarray(s(count), real_dtype())
        return vals

    def make(vals):
        kwargs = dict(vals)
        kwargs.update({k: None for k in absent})
        return with_extra_args_support(build(**kwargs))

    # The optimizer's name for errors: `build` of optlab.adam is "adam.<locals>.build".
    name = getattr(build, "__qualname__", "").split(".<locals>")[0]
    name = name if name.isidentifier() else "with_hyperparams"

    def init_fn(params):
        # Complex parameters are left to the blocks: momentum methods take them, adaptive ones refuse.
        _checks.check_params_dtypes(name, params, complex_ok=True)
        # Copies: the closure keeps `numeric` and `scheduled` for the next init, and a
        # jitted step that donates this state would otherwise free them.
        count = step_counter(bool(scheduled))
        schedules = tree_copy(scheduled)
        vals = values_at(count, tree_copy(numeric), schedules)
        inner = make(vals)
        return HyperparamsState(count, vals, schedules, inner.init(params), limits)

    def update_fn(updates, state, params=None, **extra_args):
        # Fail with both structures shown, not deep inside a tree_map of some block.
        check_same_structure(updates, params, "gradient")
        if not isinstance(state, HyperparamsState) or set(state.hyperparams) != set(numeric) | set(scheduled):
            have = sorted(state.hyperparams) if isinstance(state, HyperparamsState) else type(state).__name__
            raise TypeError(
                f"`{name}`.update was given a state its init did not make: expected one holding the "
                f"hyperparameters {sorted(set(numeric) | set(scheduled))}, got {have}"
            )
        numeric_now = {k: state.hyperparams[k] for k in numeric}
        vals = values_at(state.count, numeric_now, state.schedules)
        inner = make(vals)
        updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        return updates, HyperparamsState(safe_increment(state.count), vals, state.schedules, inner_state, limits)

    return GradientTransformationExtraArgs(init_fn, update_fn)


# --- reading and writing hyperparameters in a state -----------------------------------------


def _is_hp_state(x) -> bool:
    return isinstance(x, HyperparamsState)


def _find(state, path=()):
    """All HyperparamsState nodes in a state tree, with their paths (outermost only)."""
    if _is_hp_state(state):
        return [(path, state)]
    found = []
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (tuple, list)):
        items = enumerate(state)
    else:
        children = getattr(state, "_asdict", None)
        if children is None:
            return []
        items = children().items()
    for k, v in items:
        found.extend(_find(v, path + (k,)))
    return found


def hyperparams(state) -> dict:
    """The current hyperparameters of an optimizer state, usable inside jit.

    For one optimizer: ``{"learning_rate": Array(...), "momentum": ...}``, the
    learning rate as scheduled at the last step taken. When the state holds
    several optimizers (parameter groups), a dict keyed by group label.

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> opt = optlab.adam(optlab.schedules.exponential(0.1, gamma=0.5))
      >>> params = {"w": jnp.ones(2)}
      >>> state = opt.init(params)
      >>> for _ in range(2):
      ...     _, state = opt.update({"w": jnp.ones(2)}, state, params)
      >>> hp = optlab.hyperparams(state)
      >>> sorted(hp), round(float(hp["learning_rate"]), 4)  # the rate of the last step, t = 1
      (['b1', 'b2', 'eps', 'learning_rate'], 0.05)
    """
    found = _find(state)
    if not found:
        raise ValueError(
            "this optimizer state holds no hyperparameters; build the optimizer with an optlab "
            "optimizer function (optlab.sgd, optlab.adam, ...) or optlab.with_hyperparams"
        )
    if len(found) == 1:
        return dict(found[0][1].hyperparams)
    out = {}
    for path, s in found:
        label = _group_label(path)
        out[label] = dict(s.hyperparams)
    return out


def _group_label(path) -> str:
    # Parameter-group states are dicts keyed by label; show the last string key on the path.
    strings = [p for p in path if isinstance(p, str) and p not in ("inner_states", "inner_state")]
    return strings[-1] if strings else "/".join(map(str, path))


def set_hyperparams(state, group: str | None = None, **values):
    """Return ``state`` with hyperparameters replaced, without recompiling.

    Each value is cast to the stored dtype and shape, so a jitted step that
    takes the state as an argument sees the same abstract types. A scheduled
    hyperparameter takes a `Schedule` of the same structure as the old one.
    With parameter groups, every group that has the hyperparameter is changed
    unless ``group`` names one. Values are copied (a step that donates the
    state does not free the caller's arrays). Concrete values are checked
    against the ranges the optimizer function checks (its `Limits`, kept in
    the state), so ``b1=1.0`` for Adam is a ``ValueError`` here, not NaN in a
    jitted step; traced values (inside ``jit`` or ``vmap``) cannot be checked.

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> opt = optlab.sgd(0.1, momentum=0.9)
      >>> state = opt.init({"w": jnp.ones(2)})
      >>> state = optlab.set_hyperparams(state, learning_rate=0.05)
      >>> round(float(optlab.hyperparams(state)["learning_rate"]), 4)
      0.05
    """
    if not values:
        return state
    found = _find(state)
    if group is not None:
        found = [(p, s) for p, s in found if _group_label(p) == group]
        if not found:
            raise KeyError(f"no parameter group labelled {group!r} in this optimizer state")
    if not found:
        hyperparams(state)  # raises the explanatory error
    known = set()
    for _, s in found:
        known |= set(s.hyperparams) | set(s.schedules)
    unknown = sorted(set(values) - known)
    if unknown:
        raise KeyError(
            f"unknown hyperparameter(s) {unknown}; this optimizer state has {sorted(known)}"
            " (a feature switched off with a literal 0 is compiled out: build it with an array to make it settable)"
        )
    for _, s in found:
        if isinstance(s.limits, Limits):
            s.limits.check(values)
    replacements = {id(s): _replace(s, values) for _, s in found}

    def rebuild(node):
        if _is_hp_state(node):
            return replacements.get(id(node), node)
        if isinstance(node, dict):
            return {k: rebuild(v) for k, v in node.items()}
        if hasattr(node, "_asdict"):
            return type(node)(*[rebuild(v) for v in node])
        if isinstance(node, (tuple, list)):
            return type(node)(rebuild(v) for v in node)
        return node

    return rebuild(state)


def _replace(s: HyperparamsState, values: dict) -> HyperparamsState:
    hp = dict(s.hyperparams)
    sch = dict(s.schedules)
    for k, v in values.items():
        if k in sch:
            if not isinstance(v, Schedule):
                raise TypeError(
                    f"`{k}` follows a schedule ({sch[k]!r}); pass a Schedule of the same kind, "
                    f"not {v!r} (a constant would change the compiled program: use schedules.constant "
                    "when building the optimizer if you want to switch between them)"
                )
            if jax.tree_util.tree_structure(v) != jax.tree_util.tree_structure(sch[k]):
                raise ValueError(f"the new schedule for `{k}` ({v!r}) has a different structure from {sch[k]!r}")
            # Copies (here and below): the caller's arrays must survive a step that donates the state.
            sch[k] = jax.tree_util.tree_map(lambda new, old: jnp.array(new, old.dtype, copy=True), v, sch[k])
            hp[k] = jnp.asarray(sch[k](jnp.maximum(s.count - 1, 0)), real_dtype())
        elif k in hp:
            if isinstance(v, Schedule) or callable(v):
                raise TypeError(f"`{k}` was built as a number; it cannot be replaced by a schedule without recompiling")
            old = hp[k]
            new = _as_hparam(k, v)
            try:
                new = jnp.broadcast_to(new.astype(old.dtype), old.shape)
            except ValueError as e:
                raise ValueError(f"`{k}` has shape {old.shape}; cannot set it to a value of shape {new.shape}") from e
            hp[k] = jnp.array(new, copy=True)
    return s._replace(hyperparams=hp, schedules=sch)
