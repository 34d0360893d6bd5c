"""Transforms that wrap other transforms: skipping bad steps, accumulation, EMA, parameter groups."""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from optlab import _checks
from optlab._base import (
    EmptyState,
    GradientTransformationExtraArgs,
    all_finite,
    count_dtype,
    safe_increment,
    step_counter,
    tree_zeros_like,
    with_extra_args_support,
)


def _map(fn, *trees, **kw):
    return jax.tree_util.tree_map(fn, *trees, **kw)


def _select(pred, a, b):
    """Tree-wise ``a if pred else b`` without a branch (both sides are computed)."""
    return _map(lambda x, y: jnp.where(pred, x, y), a, b)


# --- skip non-finite updates -----------------------------------------------------------------


class SkipNonFiniteState(NamedTuple):
    count: jax.Array  # updates seen
    consecutive_skips: jax.Array
    total_skips: jax.Array
    inner_state: Any


def skip_nonfinite(inner, max_consecutive_skips: int | None = None) -> GradientTransformationExtraArgs:
    """Apply ``inner`` only when its result is finite; otherwise emit zeros and keep the old state.

    A NaN or inf in the incoming gradients or in the inner update makes the
    step a no-op: parameters and the inner state (moments, counters) are left
    exactly as they were, and ``total_skips`` / ``consecutive_skips`` count it.
    With ``max_consecutive_skips`` set, the wrapper stops skipping after that
    many bad steps in a row and lets the non-finite values through, so a
    diverged run shows up instead of silently standing still.

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> tx = optlab.skip_nonfinite(optlab.sgd(0.1))
      >>> params = {"w": jnp.ones(2)}
      >>> updates, state = tx.update({"w": jnp.array([1.0, jnp.nan])}, tx.init(params), params)
      >>> updates["w"].tolist(), int(state.total_skips)
      ([0.0, 0.0], 1)
    """
    inner = with_extra_args_support(inner)
    if max_consecutive_skips is not None:
        _checks.check_int("max_consecutive_skips", max_consecutive_skips, minimum=1)

    def init_fn(params):
        # Three distinct buffers: a training step that donates the state must not see one twice.
        z = lambda: jnp.zeros([], count_dtype())  # noqa: E731
        return SkipNonFiniteState(z(), z(), z(), inner.init(params))

    def update_fn(updates, state, params=None, **extra):
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra)
        ok = all_finite(updates) & all_finite(new_updates)
        if max_consecutive_skips is not None:
            ok = ok | (state.consecutive_skips >= max_consecutive_skips)
        out = _map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), new_updates)
        kept_inner = _select(ok, new_inner, state.inner_state)
        skipped = jnp.logical_not(ok).astype(count_dtype())
        return out, SkipNonFiniteState(
            safe_increment(state.count),
            jnp.where(ok, 0, state.consecutive_skips + 1).astype(count_dtype()),
            state.total_skips + skipped,
            kept_inner,
        )

    return GradientTransformationExtraArgs(init_fn, update_fn)


# --- gradient accumulation -------------------------------------------------------------------


class AccumulateState(NamedTuple):
    count: jax.Array  # micro-steps seen
    grad_sum: Any
    inner_state: Any


def accumulate_gradients(inner, every_k: int, *, accumulator_dtype=None) -> GradientTransformationExtraArgs:
    """Average gradients over ``every_k`` calls, then apply ``inner`` once.

    .. math:: \\bar g = \\frac{1}{k} \\sum_{i=1}^{k} g_i

    Calls 1..k-1 of each group emit zero updates and leave ``inner``'s state
    alone; call k feeds the mean gradient, in the gradients' dtype, to
    ``inner``. With a batch split in k micro-batches this equals one step on
    the full batch (for a loss that is a mean over examples). ``every_k=1`` is
    ``inner`` itself. The running sum takes the parameters' dtype unless
    ``accumulator_dtype`` says otherwise: with bfloat16 parameters, a float32
    sum keeps the small gradients that a bfloat16 sum rounds away, and the
    mean is rounded to bfloat16 once. (optax: ``optax.MultiSteps``.)

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> tx = optlab.accumulate_gradients(optlab.sgd(0.1), every_k=4, accumulator_dtype="float32")
      >>> state = tx.init({"w": jnp.ones(2, jnp.bfloat16)})
      >>> state.grad_sum["w"].dtype
      dtype('float32')
    """
    _checks.check_int("every_k", every_k, minimum=1)
    accumulator_dtype = _checks.check_float_dtype("accumulator_dtype", accumulator_dtype)
    inner = with_extra_args_support(inner)

    def init_fn(params):
        return AccumulateState(step_counter(), tree_zeros_like(params, accumulator_dtype), inner.init(params))

    def update_fn(updates, state, params=None, **extra):
        total = _map(lambda s, g: (s + g).astype(s.dtype), state.grad_sum, updates)
        last = (state.count % every_k) == every_k - 1

        def apply(_):
            mean = _map(lambda s, g: (s / every_k).astype(g.dtype), total, updates)
            u, s = inner.update(mean, state.inner_state, params, **extra)
            return u, s, tree_zeros_like(total)

        def hold(_):
            return tree_zeros_like(updates), state.inner_state, total

        u, s, acc = jax.lax.cond(last, apply, hold, None)
        return u, AccumulateState(safe_increment(state.count), acc, s)

    return GradientTransformationExtraArgs(init_fn, update_fn)


# --- exponential moving average of parameters ------------------------------------------------


class EmaState(NamedTuple):
    count: jax.Array
    ema: Any


def ema_params(decay=0.999) -> GradientTransformationExtraArgs:
    """Track an exponential moving average of the parameters *after* each update, for evaluation.

    .. math:: \\bar w_t = \\beta \\bar w_{t-1} + (1 - \\beta) w_t, \\qquad \\bar w_0 = w_0

    (Polyak & Juditsky, 1992, averaging in its exponential form.) Put it last
    in a chain: it passes updates through unchanged and reads
    ``params + updates``. Starting from the initial weights (rather than zero)
    needs no bias correction. Read the average with `optlab.ema_of(state)`.
    The average is kept in float32 at least: in bfloat16, the small steps
    ``(1 - decay) * (w - avg)`` would mostly round away.

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> tx = optlab.chain(optlab.sgd(0.5), optlab.ema_params(decay=0.9))
      >>> params = {"w": jnp.ones(1)}
      >>> updates, state = tx.update({"w": jnp.ones(1)}, tx.init(params), params)
      >>> round(float(optlab.ema_of(state)["w"][0]), 4)  # 0.9 * 1 + 0.1 * (1 - 0.5)
      0.95
    """
    _checks.check_probability("decay", decay)

    def init_fn(params):
        return EmaState(
            jnp.zeros([], count_dtype()),
            _map(lambda p: jnp.array(p, dtype=jnp.promote_types(jnp.asarray(p).dtype, jnp.float32), copy=True), params),
        )

    def update_fn(updates, state, params=None, **extra):
        del extra
        if params is None:
            raise ValueError("ema_params needs `params` in update(updates, state, params)")
        new_params = _map(lambda p, u: (p + u).astype(p.dtype), params, updates)
        ema = _map(lambda e, p: (decay * e + (1 - decay) * p.astype(e.dtype)).astype(e.dtype), state.ema, new_params)
        return updates, EmaState(safe_increment(state.count), ema)

    return GradientTransformationExtraArgs(init_fn, update_fn)


def ema_of(state):
    """The parameter average held by the `ema_params` found in ``state``.

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> tx = optlab.chain(optlab.adam(1e-3), optlab.ema_params(0.99))
      >>> state = tx.init({"w": jnp.array([1.0, 2.0])})
      >>> optlab.ema_of(state)["w"].tolist()  # before any update: the initial weights
      [1.0, 2.0]
    """
    found = []

    def walk(node):
        if isinstance(node, EmaState):
            found.append(node)
        elif isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, (tuple, list)):
            for v in node:
                walk(v)

    walk(state)
    if len(found) != 1:
        raise ValueError(f"expected exactly one ema_params state in this optimizer state, found {len(found)}")
    return found[0].ema


# --- parameter groups ------------------------------------------------------------------------


class PartitionState(NamedTuple):
    inner_states: dict


class _Masked(NamedTuple):
    """Placeholder for a leaf owned by another group (keeps tree structure, holds no data)."""


def _labels_for(labels, params):
    tree = labels(params) if callable(labels) else labels
    return tree


def _broadcast_prefix(prefix, tree, what: str):
    """``prefix``, a tree shaped like ``tree`` or like a prefix of it, with each leaf copied over its subtree.

    A leaf of ``prefix`` that stands where ``tree`` has a whole subtree (a
    layer's dict, an ``nnx.Variable``, a ``None``) labels every leaf below it,
    as in optax. When ``prefix`` already has the structure of ``tree``, the
    result is ``prefix`` rebuilt from its own leaves, so full trees behave as
    before.
    """

    def spread(leaf, subtree):
        return jax.tree_util.tree_map(lambda _: leaf, subtree)

    try:
        return jax.tree_util.tree_map(spread, prefix, tree)
    except ValueError as err:
        # jax's message names the key path only; show both structures so the
        # mismatch (a typo in a key, a dict where the params hold an nnx.State) is visible.
        raise ValueError(
            f"the {what} tree is neither the parameter tree nor a prefix of it:\n"
            f"  {what}: {jax.tree_util.tree_structure(prefix)}\n"
            f"  params: {jax.tree_util.tree_structure(tree)}"
        ) from err


def partition(transforms: Mapping[str, Any], labels) -> GradientTransformationExtraArgs:
    """Parameter groups: a different transform (and hyperparameters) for each labelled subset.

    ``labels`` is a pytree of strings with the structure of the parameters or
    of a prefix of it (a label on a subtree, e.g. ``{"enc": "adam", "dec":
    "sgd"}``, covers every leaf below it, as in ``optax.partition``), or a
    function ``params -> labels``; each leaf goes to ``transforms[label]``.
    Each group's transform sees only its own leaves (the others are masked
    out), so its state holds nothing for them. This is PyTorch's
    ``param_groups``; use `weight_decay_labels` for the usual "no weight decay
    on biases and normalisation scales" split. Works with plain dicts and with
    ``flax.nnx.State``.

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> params = {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}
      >>> tx = optlab.partition(
      ...     {"decay": optlab.adamw(1e-3, weight_decay=0.1), "no_decay": optlab.adam(1e-3)},
      ...     optlab.weight_decay_labels)
      >>> state = tx.init(params)
      >>> hp = optlab.hyperparams(state)  # one dict per group
      >>> round(float(hp["decay"]["weight_decay"]), 4), sorted(hp["no_decay"])
      (0.1, ['b1', 'b2', 'eps', 'learning_rate'])

    A label on a subtree (a prefix of the parameter tree) covers all of it:

      >>> params = {"enc": {"w": jnp.ones(2), "b": jnp.ones(2)}, "dec": {"w": jnp.ones(2)}}
      >>> tx = optlab.partition({"slow": optlab.sgd(0.5), "fast": optlab.sgd(2.0)}, {"enc": "slow", "dec": "fast"})
      >>> updates, _ = tx.update(params, tx.init(params), params)  # gradients = params = ones
      >>> {k: {n: v.tolist() for n, v in sub.items()} for k, sub in updates.items()}
      {'dec': {'w': [-2.0, -2.0]}, 'enc': {'b': [-0.5, -0.5], 'w': [-0.5, -0.5]}}
    """
    if not transforms:
        raise ValueError("partition() needs at least one group")
    txs = {k: with_extra_args_support(t) for k, t in transforms.items()}

    def group_view(tree, label_tree, label):
        return _map(lambda x, lab: x if lab == label else _Masked(), tree, label_tree)

    def check_labels(label_tree):
        seen = set(jax.tree_util.tree_leaves(label_tree))
        unknown = seen - set(txs)
        if unknown:
            raise ValueError(f"labels {sorted(map(str, unknown))} have no transform; groups are {sorted(txs)}")

    def full_labels(tree):
        label_tree = _labels_for(labels, tree)
        # Checked before broadcasting, so a wrong label on an empty subtree is still reported.
        check_labels(label_tree)
        return _broadcast_prefix(label_tree, tree, "labels")

    def init_fn(params):
        label_tree = full_labels(params)
        return PartitionState({k: t.init(group_view(params, label_tree, k)) for k, t in txs.items()})

    def update_fn(updates, state, params=None, **extra):
        label_tree = full_labels(updates if params is None else params)
        new_states = {}
        out = updates
        for k, t in txs.items():
            g = group_view(updates, label_tree, k)
            p = None if params is None else group_view(params, label_tree, k)
            u, new_states[k] = t.update(g, state.inner_states[k], p, **extra)
            out = _map(lambda o, uu, lab: uu if lab == k else o, out, u, label_tree, is_leaf=lambda x: isinstance(x, _Masked))
        return out, PartitionState(new_states)

    return GradientTransformationExtraArgs(init_fn, update_fn)


jax.tree_util.register_pytree_node(_Masked, lambda m: ((), None), lambda aux, ch: _Masked())


def weight_decay_labels(params, decay: str = "decay", no_decay: str = "no_decay"):
    """Label every leaf with ``ndim >= 2`` (kernels) ``decay`` and the rest ``no_decay``.

    Biases, BatchNorm/LayerNorm scales and offsets are vectors, so they land
    in ``no_decay``: the usual recipe of not regularising them.

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> optlab.weight_decay_labels({"b": jnp.zeros(3), "w": jnp.ones((2, 3))})
      {'b': 'no_decay', 'w': 'decay'}
    """
    return _map(lambda p: decay if jnp.ndim(p) >= 2 else no_decay, params)


def masked(inner, mask) -> GradientTransformationExtraArgs:
    """Apply ``inner`` where ``mask`` (pytree of bools or ``params -> bools``) is True; pass the rest through.

    ``mask`` has the structure of the parameters or of a prefix of it: a bool
    on a subtree (``{"enc": True, "dec": False}``) covers every leaf below it,
    as in ``optax.masked``.

    Example:
      >>> import jax.numpy as jnp, optlab
      >>> tx = optlab.masked(optlab.clip(0.5), {"b": False, "w": True})
      >>> grads = {"b": jnp.array([2.0]), "w": jnp.array([2.0])}
      >>> updates, _ = tx.update(grads, tx.init(grads))
      >>> {k: v.tolist() for k, v in updates.items()}
      {'b': [2.0], 'w': [0.5]}
      >>> tx = optlab.masked(optlab.clip(0.5), {"enc": True, "dec": False})  # a prefix of the tree
      >>> grads = {"enc": {"w": jnp.array([2.0]), "b": jnp.array([-2.0])}, "dec": {"w": jnp.array([2.0])}}
      >>> updates, _ = tx.update(grads, tx.init(grads))
      >>> {k: {n: v.tolist() for n, v in sub.items()} for k, sub in updates.items()}
      {'dec': {'w': [2.0]}, 'enc': {'b': [-0.5], 'w': [0.5]}}
    """
    def labels(params):
        m = mask(params) if callable(mask) else mask
        # Broadcast here rather than in partition, so a bad mask is reported as the mask.
        return _map(lambda b: "on" if b else "off", _broadcast_prefix(m, params, "mask"))

    from optlab._base import identity

    return partition({"on": inner, "off": identity()}, labels)
