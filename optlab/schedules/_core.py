"""The `Schedule` type: a learning-rate (or any hyperparameter) schedule as data.

A schedule is a callable ``step -> value`` that is also a JAX pytree: its
numeric parameters (peak value, decay rate, boundaries, ...) are the leaves,
and the formula plus any structural choice (a mode string, the number of
milestones) is static. Because the parameters are leaves, a schedule can live
inside an optimizer state, be vmapped over (sweeping a peak learning rate),
and be replaced with ``optlab.set_hyperparams`` without recompiling, as long
as the replacement has the same structure.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def real_dtype():
    """The dtype of hyperparameters, schedule values and the scalars derived from the step count.

    float32, or float64 when JAX's 64-bit mode is on (``jax_enable_x64``), so
    that float64 parameters get float64-accurate updates, as in PyTorch.
    """
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def as_param(value: Any) -> Any:
    """Numeric schedule parameter -> `real_dtype` array (sub-schedules pass through)."""
    if isinstance(value, Schedule):
        return value
    return jnp.asarray(value, dtype=real_dtype())


@jax.tree_util.register_pytree_node_class
class Schedule:
    """A jit-safe schedule ``step -> value`` whose numeric parameters are pytree leaves.

    Args:
      fn: ``fn(step, **params, **static) -> value``, a pure function written with
        ``jnp`` only (no Python control flow on ``params``).
      name: shown in ``repr``.
      params: numeric parameters (arrays or nested `Schedule`s): the data.
      static: hashable structural settings (strings, bools, counts).
    """

    def __init__(self, fn: Callable[..., jax.Array], name: str, params: dict, static: dict | None = None):
        self.fn = fn
        self.name = name
        self.params = dict(params)
        self.static = dict(static or {})

    def __call__(self, step) -> jax.Array:
        step = jnp.asarray(step)
        return self.fn(step, **self.params, **self.static)

    def tree_flatten(self):
        # Factories always insert params in the same order, so keeping that
        # order (rather than sorting) costs no cache hits and keeps the repr
        # of a round-tripped schedule in the factory's argument order.
        keys = tuple(self.params)
        children = tuple(self.params[k] for k in keys)
        aux = (self.fn, self.name, keys, tuple(sorted(self.static.items())))
        return children, aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        fn, name, keys, static = aux
        obj = object.__new__(cls)
        obj.fn, obj.name = fn, name
        obj.params = dict(zip(keys, children))
        obj.static = dict(static)
        return obj

    def __repr__(self) -> str:
        args = [f"{k}={_show(v)}" for k, v in self.params.items()]
        args += [f"{k}={_show_static(v)}" for k, v in self.static.items()]
        return f"{self.name}({', '.join(args)})"


def _show(value: Any) -> str:
    """Short text for a parameter: ``0.1`` rather than ``0.10000000149011612``."""
    if isinstance(value, Schedule):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, jax.core.Tracer):
        return f"<traced {value.dtype}{list(value.shape)}>"
    try:
        arr = np.asarray(jax.device_get(value))
    except Exception:  # noqa: BLE001 - anything unprintable is shown by type only
        return type(value).__name__
    if arr.dtype.kind != "f" or arr.ndim > 1:
        return repr(arr.tolist())
    text = [np.format_float_positional(x, unique=True, trim="-") for x in arr.ravel()]
    return text[0] if arr.ndim == 0 else "[" + ", ".join(text) + "]"


def _show_static(value: Any) -> str:
    if callable(value):
        return getattr(value, "__qualname__", None) or getattr(value, "__name__", None) or repr(value)
    return repr(value)
