"""The transformation type and the few functions everything else is built from.

An optlab transform *is* an ``optax.GradientTransformationExtraArgs``: a
NamedTuple of two pure functions,

    init(params) -> state
    update(updates, state, params=None, **extra_args) -> (updates, state)

so optax transforms compose inside optlab chains and optlab transforms inside
``optax.chain`` and ``flax.nnx.Optimizer``. We reuse optax's *types* for that
interoperability; the algorithms themselves are written in this package.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optlab import _checks

GradientTransformation = optax.GradientTransformation
GradientTransformationExtraArgs = optax.GradientTransformationExtraArgs
EmptyState = optax.EmptyState
Params = Any
Updates = Any


def count_dtype():
    return jnp.int32


def step_counter(needed: bool = True) -> jax.Array | None:
    """A transform's initial step counter (int32 zero), or None where its update never reads one.

    A counter nobody reads would still be incremented on every step, and on
    XLA:CPU that scalar ``count + 1`` is a kernel of its own: about 10 ms of
    compile time on the ResNet-9 tree, 10% of plain SGD's time to first step.
    So a counter is kept only where the update reads it (bias correction, a
    schedule, a first-step rule), as optax does; whether it does is decided
    when the transform is built and fixes the state's structure.
    """
    return jnp.zeros([], count_dtype()) if needed else None


def safe_increment(count: jax.Array | None) -> jax.Array | None:
    """``count + 1`` that saturates instead of wrapping around at int32 max; None (no counter kept) stays None."""
    if count is None:
        return None
    max_int = jnp.iinfo(count.dtype).max
    return jnp.where(count < max_int, count + 1, max_int)


def _accepts_extra_args(tx) -> bool:
    if isinstance(tx, GradientTransformationExtraArgs):
        return True
    try:
        sig = inspect.signature(tx.update)
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())


def with_extra_args_support(tx) -> GradientTransformationExtraArgs:
    """Wrap a plain optax transform so that it ignores extra keyword arguments."""
    if _accepts_extra_args(tx):
        if isinstance(tx, GradientTransformationExtraArgs):
            return tx
        return GradientTransformationExtraArgs(tx.init, tx.update)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        return tx.update(updates, state, params)

    return GradientTransformationExtraArgs(tx.init, update_fn)


def identity() -> GradientTransformationExtraArgs:
    """The transform that leaves updates unchanged (a neutral element of `chain`).

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> tx = optlab.identity()
      >>> updates, _ = tx.update({"w": jnp.array([1.0, -2.0])}, tx.init(None))
      >>> updates["w"].tolist()
      [1.0, -2.0]
    """

    def init_fn(params):
        del params
        return EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        return updates, state

    return GradientTransformationExtraArgs(init_fn, update_fn)


def chain(*transforms) -> GradientTransformationExtraArgs:
    """Compose transforms: the updates flow through them left to right.

    The state is the tuple of the members' states. Extra keyword arguments given
    to ``update`` (a loss value, a value-and-grad function) reach every member
    that accepts them; optax transforms that take none are wrapped.

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> tx = optlab.chain(optlab.clip_by_global_norm(1.0), optlab.scale_by_learning_rate(0.1))
      >>> params = {"w": jnp.ones(3)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.ones(3)}, state, params)
      >>> round(float(updates["w"][0]), 4)  # -0.1 * 1 / sqrt(3): clipped to norm 1, then scaled
      -0.0577
    """
    if not all(hasattr(t, "init") and hasattr(t, "update") for t in transforms):
        bad = [t for t in transforms if not (hasattr(t, "init") and hasattr(t, "update"))]
        raise TypeError(f"chain() takes gradient transformations, got {bad[0]!r}")
    txs = tuple(with_extra_args_support(t) for t in transforms)

    def init_fn(params):
        return tuple(t.init(params) for t in txs)

    def update_fn(updates, state, params=None, **extra_args):
        if len(state) != len(txs):
            raise ValueError(f"chain of {len(txs)} transforms got a state of length {len(state)}")
        new_state = []
        for t, s in zip(txs, state):
            updates, s = t.update(updates, s, params, **extra_args)
            new_state.append(s)
        return updates, tuple(new_state)

    return GradientTransformationExtraArgs(init_fn, update_fn)


def check_same_structure(updates, params, what: str = "updates") -> None:
    """Raise a clear error when a gradient tree does not match the parameter tree, or a leaf its shape.

    A gradient of another shape would otherwise broadcast against its
    parameter (a (1, 3) gradient for a (3,) weight) or fail deep inside a block.
    Static shapes only: nothing is added to a compiled program.
    """
    if params is None:
        return
    s_u = jax.tree_util.tree_structure(updates)
    s_p = jax.tree_util.tree_structure(params)
    if s_u != s_p:
        raise ValueError(
            f"the {what} tree does not match the parameter tree:\n"
            f"  {what}: {s_u}\n  params: {s_p}"
        )
    for (path, u), p in zip(jax.tree_util.tree_leaves_with_path(updates), jax.tree_util.tree_leaves(params)):
        if jnp.shape(u) != jnp.shape(p):
            raise ValueError(
                f"the {what} for the parameter {jax.tree_util.keystr(path)} has shape {jnp.shape(u)}; "
                f"the parameter has shape {jnp.shape(p)}"
            )


def apply_updates(params: Params, updates: Updates) -> Params:
    """``params + updates`` leaf by leaf, keeping each parameter's dtype.

    The sum is computed in the wider of the two dtypes and cast back, so
    bfloat16 parameters stay bfloat16 even when the optimizer works in float32.

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> params = {"w": jnp.ones(2, jnp.bfloat16)}
      >>> new = optlab.apply_updates(params, {"w": jnp.full(2, 0.5, jnp.float32)})
      >>> str(new["w"].dtype), new["w"].astype(jnp.float32).tolist()
      ('bfloat16', [1.5, 1.5])
    """
    check_same_structure(updates, params)

    def add(p, u):
        if p is None:
            return None
        return jnp.asarray(p + u).astype(jnp.asarray(p).dtype)

    return jax.tree_util.tree_map(add, params, updates, is_leaf=lambda x: x is None)


def leaf_scalars(tree, **scalars):
    """A tree like ``tree`` whose every leaf is a dict of its own copies of ``scalars``.

    For hyperparameters that are traced values (``with_hyperparams`` passes
    them as arrays) used inside a leaf-by-leaf update::

        hp = leaf_scalars(state.mu, b1=b1, eps=eps)
        mu = jax.tree_util.tree_map(lambda m, g, h: m + (1 - h["b1"]) * (g - m), state.mu, grads, hp)

    Scalars computed from the state may be passed too (AdaGrad's
    ``1 + t * lr_decay``). But where XLA would fuse that computation into every
    leaf's kernel anyway (a compare and a select on the step count), the
    computation is shared again: pass the raw values then and compute inside
    the per-leaf function (``tests/test_compiled.py`` catches either case).

    Why: XLA:CPU compiles each distinct fused kernel once and reuses it for
    every leaf of the same shape. When one traced scalar's broadcast is shared
    by several leaves of a shape, the fusion pass orders the operands of one of
    their kernels differently, so that kernel is compiled again (7 extra
    kernels, about 60 ms, for Adam on ResNet-9), and the arithmetic depends on
    the neighbours (a division by a scalar no other leaf uses becomes a
    multiplication by its reciprocal). An optimization barrier taken together
    with the leaf gives each leaf its own copy: the kernels come out identical
    and a leaf's update is the same bits whatever else is in the tree
    (``tests/test_compiled.py``). XLA removes the barrier before fusion; it
    costs nothing at run time. Values that are not traced (Python numbers,
    concrete arrays) are passed through unchanged.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    traced = {k: v for k, v in scalars.items() if _checks.is_traced(v)}
    out = []
    for leaf in leaves:
        private = {}
        if traced:
            _, private = jax.lax.optimization_barrier((leaf, traced))
        out.append({**scalars, **private})
    return jax.tree_util.tree_unflatten(treedef, out)


def tree_copy(tree):
    """Every array leaf of ``tree`` copied into a buffer of its own.

    An ``init`` must hand out state that a jitted step may donate: a leaf that
    is also held elsewhere (in the transform's closure, in the caller's
    hands, or twice in the same state) would be freed under its other owner,
    or donated twice, which XLA rejects.
    """
    return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)


def tree_zeros_like(tree, dtype=None):
    return jax.tree_util.tree_map(lambda x: jnp.zeros_like(x, dtype=dtype), tree)


def tree_full_like(tree, value, dtype=None):
    return jax.tree_util.tree_map(lambda x: jnp.full_like(x, value, dtype=dtype), tree)


def tree_vdot(a, b) -> jax.Array:
    """Sum over leaves of <a, b>, accumulated in float32 at least (float64 for float64 leaves).

    A complex leaf counts as the pairs of reals it holds: Re(conj(x) y) per
    element, so that ``tree_vdot(t, t)`` is the sum of ``|x|^2``.
    """

    def leaf(x, y):
        wide = jnp.promote_types(jnp.result_type(x, y), jnp.float32)
        return jnp.real(jnp.vdot(x.astype(wide).ravel(), y.astype(wide).ravel()))

    parts = jax.tree_util.tree_map(leaf, a, b)
    return sum(jax.tree_util.tree_leaves(parts), jnp.zeros((), jnp.float32))


def global_norm(tree) -> jax.Array:
    """sqrt(sum of squares over all leaves), in float32 at least.

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> float(optlab.global_norm({"a": jnp.array([3.0]), "b": jnp.array([[4.0]])}))
      5.0
    """
    return jnp.sqrt(tree_vdot(tree, tree))


def all_finite(tree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def cast_like(updates, like):
    """Cast every update leaf to the dtype of the corresponding leaf of ``like``."""
    return jax.tree_util.tree_map(lambda u, g: u.astype(jnp.asarray(g).dtype), updates, like)


class CountState(NamedTuple):
    """State of a transform whose only memory is the number of updates seen."""

    count: jax.Array
