"""Kernel initialisers by name: the one table every model reads.

A model takes ``init="<name>"`` (and optionally ``init_scale``) and applies
the named initialiser to the kernels of all its dense and convolution layers.
Biases always start at zero, whatever the name; BatchNorm layers always start
as the identity (scale 1, bias 0).

Fans follow PyTorch's convention, which is also JAX's for these layouts: a
dense kernel ``(in, out)`` has ``fan_in = in``, ``fan_out = out``; a
convolution kernel ``(kh, kw, in, out)`` (Flax's HWIO) has
``fan_in = kh * kw * in`` and ``fan_out = kh * kw * out``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from optlab._checks import check_range

Initializer = Callable[..., jax.Array]


def _symmetric_uniform(bound: float) -> Initializer:
    # jax.nn.initializers.uniform samples [0, scale); we want [-bound, bound).
    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


_variance_scaling = jax.nn.initializers.variance_scaling

# name -> (initialiser, the distribution it draws from). The *_normal entries
# use an untruncated normal, as torch.nn.init does; only "default" is the
# truncated normal that Flax itself uses.
_KERNEL_INITS: dict[str, tuple[Initializer, str]] = {
    "default": (
        nnx.initializers.lecun_normal(),
        "Flax's own default (LeCun normal): normal truncated at 2 sigma, rescaled to std 1/sqrt(fan_in)",
    ),
    "uniform": (_symmetric_uniform(0.1), "U(-0.1, 0.1)"),
    "normal": (jax.nn.initializers.normal(0.1), "N(0, 0.1^2), std 0.1"),
    "xavier_uniform": (
        _variance_scaling(1.0, "fan_avg", "uniform"),
        "Glorot uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out))",
    ),
    "xavier_normal": (
        _variance_scaling(1.0, "fan_avg", "normal"),
        "Glorot normal: N(0, 2 / (fan_in + fan_out))",
    ),
    "he_uniform": (
        _variance_scaling(2.0, "fan_in", "uniform"),
        "Kaiming uniform (gain sqrt 2, fan_in): U(-a, a), a = sqrt(6 / fan_in)",
    ),
    "he_normal": (
        _variance_scaling(2.0, "fan_in", "normal"),
        "Kaiming normal (gain sqrt 2, fan_in): N(0, 2 / fan_in)",
    ),
}

INIT_NAMES: tuple[str, ...] = tuple(_KERNEL_INITS)

#: Every bias starts at zero.
zeros_init: Initializer = nnx.initializers.zeros_init()


def describe_inits() -> dict[str, str]:
    """``{name: distribution}`` for every valid ``init`` name (for docs and CLIs)."""
    return {name: text for name, (_, text) in _KERNEL_INITS.items()}


def get_initializer(name: str, scale: float = 1.0) -> Initializer:
    """The kernel initialiser called ``name``, its samples multiplied by ``scale``.

    ======================  ==========================================================
    name                    kernel distribution (``scale`` = 1)
    ======================  ==========================================================
    ``default``             Flax's default, LeCun normal: truncated N, std 1/sqrt(fan_in)
    ``uniform``             U(-0.1, 0.1)
    ``normal``              N(0, 0.1^2)
    ``xavier_uniform``      U(-a, a), a = sqrt(6 / (fan_in + fan_out))   (Glorot & Bengio 2010)
    ``xavier_normal``       N(0, 2 / (fan_in + fan_out))
    ``he_uniform``          U(-a, a), a = sqrt(6 / fan_in)               (He et al. 2015)
    ``he_normal``           N(0, 2 / fan_in)
    ======================  ==========================================================

    ``scale`` multiplies every sample, so it scales the uniform bounds and the
    standard deviations alike: ``get_initializer("normal", 0.1)`` draws from
    N(0, 0.01^2). The ``xavier_*``/``he_*`` entries match ``torch.nn.init``'s
    ``xavier_*_`` and ``kaiming_*_(nonlinearity="relu")``.

    Raises:
      TypeError: ``name`` is not a string.
      ValueError: ``name`` is unknown (the message lists the valid names), or
        ``scale`` is not a finite positive number.

    Example:
      >>> import jax
      >>> w = get_initializer("he_normal")(jax.random.key(0), (512, 256))
      >>> round(float(w.std() * (512 / 2) ** 0.5), 1)
      1.0
    """
    if not isinstance(name, str):
        raise TypeError(f"`init` (={name!r}) must be a string, one of {', '.join(map(repr, INIT_NAMES))}")
    if name not in _KERNEL_INITS:
        raise ValueError(f"`init` (={name!r}) must be one of {', '.join(map(repr, INIT_NAMES))}")
    # Finite as well as positive: an infinite scale turns every initial weight into inf or nan.
    check_range("init_scale", scale, 0.0, math.inf, lo_open=True, hi_open=True)
    base = _KERNEL_INITS[name][0]
    if isinstance(scale, (int, float)) and scale == 1:
        return base

    def scaled(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return base(key, shape, dtype) * jnp.asarray(scale, dtype)

    return scaled
