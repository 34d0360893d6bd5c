"""Select a model by name, as a config file does."""

from __future__ import annotations

import inspect
from types import MappingProxyType
from typing import Any

import jax
from flax import nnx

from optlab.models._cnn import CNN
from optlab.models._convnet import ConvNet
from optlab.models._mlp import MLP
from optlab.models._resnet import ResNet9

#: name -> model class; read-only.
MODELS = MappingProxyType({"mlp": MLP, "convnet": ConvNet, "cnn": CNN, "resnet9": ResNet9})


def _arguments(cls: type) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(all keyword-passable argument names, required ones) of ``cls.__init__``, ``rngs`` excluded."""
    params = [
        p
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name not in ("self", "rngs") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    return tuple(p.name for p in params), tuple(p.name for p in params if p.default is p.empty)


def get_model(name: str, *, rngs: nnx.Rngs | int | jax.Array = 0, **kwargs: Any) -> nnx.Module:
    """Build the model registered as ``name`` with keyword arguments ``kwargs``.

    ``name`` is one of ``MODELS`` ("mlp", "convnet", "cnn", "resnet9"; case
    is ignored). ``rngs`` is an ``nnx.Rngs`` or anything ``nnx.Rngs`` takes
    as a seed (an int or a key), so a config can give a plain seed.

    Raises:
      ValueError: unknown ``name`` (the message lists the registered ones).
      TypeError: an argument the model does not take, or a required one
        missing (the message names them and lists the accepted ones).

    Example:
      >>> model = get_model("mlp", in_features=784, hidden=[256], num_classes=10, rngs=0)
      >>> type(model).__name__
      'MLP'
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in MODELS:
        raise ValueError(f"`name` (={name!r}) must be one of {', '.join(map(repr, MODELS))}")
    cls = MODELS[key]
    accepted, required = _arguments(cls)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"model {key!r} got unknown argument(s) {', '.join(map(repr, unknown))}; "
            f"it accepts {', '.join(map(repr, accepted))}"
        )
    missing = [arg for arg in required if arg not in kwargs]
    if missing:
        raise TypeError(f"model {key!r} is missing required argument(s) {', '.join(map(repr, missing))}")
    if not isinstance(rngs, nnx.Rngs):
        rngs = nnx.Rngs(rngs)
    return cls(**kwargs, rngs=rngs)
