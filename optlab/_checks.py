"""Argument checks that run at construction time, on concrete values only.

Hyperparameters may be JAX tracers (an optimizer built inside ``jax.vmap``);
those cannot be inspected without forcing a host round trip, so every check
here silently accepts a tracer and checks everything else, element-wise for
arrays. Errors quote the argument name and the offending value.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np


def is_traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def concrete(value: Any) -> np.ndarray | None:
    """The value as a numpy array, or None when it is traced or not numeric."""
    if value is None or callable(value) or is_traced(value):
        return None
    try:
        arr = np.asarray(value)
    except Exception:  # noqa: BLE001 - anything non-numeric is simply not checked here
        return None
    if arr.dtype.kind not in "biuf":
        return None
    return arr


def _show(value: Any) -> str:
    arr = concrete(value)
    if arr is not None and arr.ndim == 0:
        return repr(arr.item())
    return repr(value)


def check_number(name: str, value: Any) -> None:
    """Reject non-numeric values (strings, lists of strings, None...)."""
    if callable(value) or is_traced(value):
        return
    if isinstance(value, bool):
        raise TypeError(f"`{name}` (={value!r}) must be a number, not a bool")
    if concrete(value) is None:
        raise TypeError(f"`{name}` (={value!r}) must be a number or an array of numbers")


def check_range(
    name: str,
    value: Any,
    lo: float = -math.inf,
    hi: float = math.inf,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    """Check ``lo <= value <= hi`` (with open ends as asked) for concrete values."""
    check_number(name, value)
    arr = concrete(value)
    if arr is None:
        return
    ok = ~np.isnan(arr)
    ok &= (arr > lo) if lo_open else (arr >= lo)
    ok &= (arr < hi) if hi_open else (arr <= hi)
    if not np.all(ok):
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise ValueError(f"`{name}` (={_show(value)}) must be in {left}{lo}, {hi}{right}")


def check_nonnegative(name: str, value: Any) -> None:
    check_range(name, value, 0.0, math.inf)


def check_positive(name: str, value: Any) -> None:
    check_range(name, value, 0.0, math.inf, lo_open=True)


def check_probability(name: str, value: Any) -> None:
    """A decay rate such as a beta or a momentum: in [0, 1)."""
    check_range(name, value, 0.0, 1.0, hi_open=True)


def check_int(name: str, value: Any, minimum: int | None = None) -> None:
    if is_traced(value):
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        arr = concrete(value)
        if arr is None or arr.ndim != 0 or arr.dtype.kind not in "iu":
            raise TypeError(f"`{name}` (={value!r}) must be an integer")
        value = int(arr)
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` (={value!r}) must be >= {minimum}")


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` (={value!r}) must be one of {', '.join(map(repr, choices))}")


def is_zero(value: Any) -> bool:
    """True for a *Python* number equal to zero.

    A literal ``0`` switches a feature off and compiles it out (no state, no
    extra memory traffic). An array, even a concrete zero, keeps the feature
    in so that it can be swept or changed later with ``set_hyperparams``.
    """
    # Exact Python types only: a numpy scalar counts as data, like an array.
    return type(value) in (int, float) and value == 0


def check_float_dtype(name: str, value: Any) -> np.dtype | None:
    """``None``, or ``value`` as a floating-point dtype (``"float32"``, ``jnp.bfloat16``...).

    For the dtype of an optimizer's per-parameter state: the name is checked
    when the optimizer is built, not at its first ``init``.
    """
    if value is None:
        return None
    try:
        dtype = jax.numpy.dtype(value)
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or not jax.numpy.issubdtype(dtype, jax.numpy.floating):
        raise ValueError(f"`{name}` (={value!r}) must be None or a floating-point dtype such as 'float32'")
    return dtype


def check_learning_rate(value: Any, *, positive: bool = False, name: str = "learning_rate") -> None:
    """A learning rate given as a number or array: finite, and >= 0 (> 0 with ``positive``).

    Schedules (callables) are checked by the schedule functions themselves.
    """
    if callable(value):
        return
    check_range(name, value, 0.0, math.inf, lo_open=positive, hi_open=True)


def check_pair(name: str, value: Any) -> tuple:
    """``value`` unpacked as a pair ``(a, b)``: a tuple, a list or an array of two (possibly traced)."""
    try:
        a, b = value
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` (={value!r}) must be a pair of numbers (a, b)") from None
    return a, b


def check_params_dtypes(transform: str, params: Any, *, complex_ok: bool = False) -> None:
    """Reject parameter leaves that ``transform`` would update wrongly, naming the leaf.

    Every update is cast back to its parameter's dtype, so an integer or bool
    leaf would have its step truncated (usually to zero, silently). Complex
    leaves are refused by the adaptive methods (``complex_ok=False``): their
    per-coordinate second moments are defined here for real numbers only.
    Called by ``init``, on shapes and dtypes only (tracers are fine).
    """
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        dtype = jax.numpy.result_type(leaf)
        if jax.numpy.issubdtype(dtype, jax.numpy.floating):
            continue
        where = jax.tree_util.keystr(path) or "(the root)"
        if jax.numpy.issubdtype(dtype, jax.numpy.complexfloating):
            if complex_ok:
                continue
            raise TypeError(
                f"`{transform}` cannot update the complex parameter {where} (dtype {dtype}): its "
                "second-moment estimates are defined for real numbers; optimize the real and "
                "imaginary parts as separate real arrays, or use sgd / momentum, which accept complex parameters"
            )
        raise TypeError(
            f"`{transform}` updates floating-point parameters only; the parameter {where} has dtype "
            f"{dtype}, and its update would be truncated to that dtype. Keep integer and bool arrays "
            "out of the tree given to the optimizer (for a Flax model: nnx.split(model, nnx.Param, ...))"
        )
