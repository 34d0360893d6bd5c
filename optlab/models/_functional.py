"""Split/merge helpers for pure functional train steps over NNX models."""

from __future__ import annotations

import inspect
from typing import Any

from flax import nnx

# flax >= 0.11.2 gives nnx.merge a `copy` flag that defaults to False: the
# merged model then *reuses* the Variable objects of the states passed in.
# Those were created outside any jax.grad/vmap running the step, and
# BatchNorm or Dropout updating them inside it raises TraceContextError
# (google/flax#5050). Copying creates fresh Variables at the current trace
# level, which is what older flax always did.
_MERGE_TAKES_COPY = "copy" in inspect.signature(nnx.merge).parameters


def split_model(model: nnx.Module) -> tuple[Any, nnx.State, nnx.State]:
    """``(graphdef, params, rest)``: the trainable ``nnx.Param`` state and everything else.

    ``rest`` holds BatchNorm running statistics (``nnx.BatchStat``) and the
    Dropout RNG state. The model's train/eval mode is in ``graphdef``.

    Example:
      >>> from flax import nnx
      >>> from optlab.models import ConvNet
      >>> graphdef, params, rest = split_model(ConvNet(rngs=nnx.Rngs(0)))
      >>> sorted(params)
      ['conv1', 'conv2', 'linear']
    """
    return nnx.split(model, nnx.Param, ...)


def merge_model(graphdef: Any, params: nnx.State, rest: nnx.State) -> nnx.Module:
    """Rebuild a model from ``split_model``'s output, safely inside JAX transforms.

    Equivalent to ``nnx.merge(graphdef, params, rest)`` except that the
    Variables are always fresh copies, so the model may update its BatchNorm
    statistics and RNG counters inside ``jax.grad``/``jax.vmap``/``jax.jit``.
    Read the updated state back with ``split_model`` on the merged model.

    Example (one member's step; ``jax.vmap`` it over stacked states)::

        def step(params, rest, x, y):
            def loss_fn(params):
                model = merge_model(graphdef, params, rest)
                logits = model(x, train=True)
                return loss(logits, y), split_model(model)[2]
            (value, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            return value, grads, new_rest
    """
    if _MERGE_TAKES_COPY:
        return nnx.merge(graphdef, params, rest, copy=True)
    return nnx.merge(graphdef, params, rest)
