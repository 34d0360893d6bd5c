"""The flat update path: run any transform on a few contiguous buffers instead of many small arrays.

An optimizer step over a tree of N arrays compiles to (at least) N small
kernels, one per leaf, each with its own launch cost. For a CNN with
BatchNorm, hundreds of tiny arrays (biases, scales, offsets) make that
per-array cost dominate the step. `flatten` packs the leaves into one
contiguous buffer per dtype, runs the wrapped transform on those buffers (its
state lives in flat form too), and hands back updates with the original
structure. Inside ``jit`` the unpacking is a set of static slices that XLA
fuses into whatever consumes them (usually ``apply_updates``), so the flat
update buffer is never copied out leaf by leaf.

Why the results are the per-leaf results, bit for bit. Every element-wise
transform computes each coordinate from the same coordinate of its inputs
and from scalars (hyperparameters, bias corrections, the step counter) that
do not depend on the layout. Concatenating leaves only moves coordinates, so
each output coordinate is the same sequence of IEEE operations on the same
operands. Two details of XLA:CPU's compiler (jax 0.10) would still break
that, and the layout avoids both:

* XLA's simplifier turns ``array / scalar`` into ``array * (1 / scalar)``
  when the scalar's broadcast has a single use. optlab's own transforms give
  every leaf its own copy of their scalars (`optlab._base.leaf_scalars`), so
  they always get the rewrite; a transform that shares one scalar between
  leaves (an optax one, say) gets it on a one-buffer layout but not on a tree
  of two or more leaves. So a layout made from two or more leaves always has
  at least two arrays (a lone buffer is split in two).
* Arrays of one element take a scalar code path (a degenerate broadcast, no
  vector loop), so leaves of size one stay outside the buffers, unchanged.

Large leaves stay outside the buffers too (``max_packed_size``): their step is
bound by memory bandwidth, and packing them would only add a copy.

What remains is LLVM's choice of which multiply-add pairs to fuse into FMA
instructions, made loop by loop. ``tests/test_flat.py`` shows the flat and
per-leaf trajectories identical for every optimizer when FMA is unavailable,
and under the default flags for all of them but AdaGrad with an initial
accumulator value, whose first-step select leaves one product of a small
per-leaf array unfused (explained there),
and, with jax 0.12, AdaDelta and RMSprop with ``eps_in_sqrt``; under ``vmap``
the FMA choices differ for more of them (all agree to the last bit or two).
Transforms that reduce over the whole tree (``clip_by_global_norm``, SWATS's
projections, L-BFGS's dot products) sum in a different order over a flat
buffer than over a list of leaves, so they agree to float32 round-off, not
bit for bit.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optlab._base import GradientTransformationExtraArgs, with_extra_args_support


class FlatState(NamedTuple):
    """State of `flatten`: the wrapped transform's state, built on the flat buffers.

    ``optlab.hyperparams`` and ``optlab.set_hyperparams`` see through it.
    """

    inner_state: Any


class _Slot(NamedTuple):
    key: str  # the flat array this leaf lives in
    start: int  # offset inside that array (0 for a leaf kept apart)
    size: int
    shape: tuple
    alone: bool  # kept as its own array, shape unchanged


class FlatLayout:
    """Where each leaf of a tree lives in the flat form: a dict of 1-D buffers (and lone leaves).

    Leaves with 2 to ``max_packed_size`` elements are raveled and
    concatenated, in tree order, into one buffer per dtype, keyed by the
    dtype's name (``"float32"``, ``"bfloat16"``...). Other leaves keep their
    shape and sit under their own key (``"leaf00017"``, the leaf's index):
    one-element leaves (see the module docstring) and large ones, whose
    per-array overhead is already negligible next to the time spent moving
    their bytes, so that copying them into a buffer would only cost
    bandwidth. When that leaves a tree of two or more leaves with a single
    array, the buffer is split in two at the leaf boundary nearest its middle
    (``"float32.0"``, ``"float32.1"``); see the module docstring for why.

    The layout depends only on the tree structure, shapes and dtypes, so it is
    static under ``jit`` and can be rebuilt from any tree of the same kind.

    Example (keep parameters packed across steps, unpack them where the model reads them):
      >>> import jax.numpy as jnp, optlab
      >>> from optlab.transforms import FlatLayout
      >>> params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
      >>> layout = FlatLayout(params)
      >>> flat = layout.pack(params)
      >>> sorted(flat), [x.shape for _, x in sorted(flat.items())]
      (['float32.0', 'float32.1'], [(3,), (6,)])
      >>> layout.unpack(flat)["w"].shape
      (2, 3)
    """

    def __init__(self, tree: Any, max_packed_size: int = 4096):
        _check_max_packed_size(max_packed_size)
        leaves, self.treedef = jax.tree_util.tree_flatten(tree)
        self.dtypes = tuple(np.dtype(jnp.result_type(x)) for x in leaves)
        self.shapes = tuple(tuple(np.shape(x)) for x in leaves)
        width = max(5, len(str(len(leaves))))
        members: dict[str, list[int]] = {}
        alone = []
        for i, (shape, dtype) in enumerate(zip(self.shapes, self.dtypes)):
            if _size(shape) == 1 or _size(shape) > max_packed_size:
                alone.append(i)
            else:
                members.setdefault(dtype.name, []).append(i)
        groups = list(members.items())
        if len(leaves) >= 2 and len(groups) + len(alone) == 1:
            name, idx = groups[0]
            cut = _middle_boundary([_size(self.shapes[i]) for i in idx])
            groups = [(f"{name}.0", idx[:cut]), (f"{name}.1", idx[cut:])]
        slots: list[_Slot | None] = [None] * len(leaves)
        self.buffers: dict[str, tuple[int, ...]] = {}
        for key, idx in groups:
            self.buffers[key] = tuple(idx)
            start = 0
            for i in idx:
                size = _size(self.shapes[i])
                slots[i] = _Slot(key, start, size, self.shapes[i], False)
                start += size
        for i in alone:
            key = f"leaf{i:0{width}d}"
            self.buffers[key] = (i,)
            slots[i] = _Slot(key, 0, _size(self.shapes[i]), self.shapes[i], True)
        self.slots: tuple[_Slot, ...] = tuple(slots)  # type: ignore[arg-type]
        # What unpack accepts under each key: a packed buffer is 1-D, a leaf kept apart keeps its shape.
        self._expected: dict[str, tuple[tuple, np.dtype]] = {}
        for key, idx in self.buffers.items():
            first = self.slots[idx[0]]
            shape = first.shape if first.alone else (sum(self.slots[i].size for i in idx),)
            self._expected[key] = (shape, self.dtypes[idx[0]])

    @property
    def num_leaves(self) -> int:
        return len(self.slots)

    def pack(self, tree: Any, what: str = "tree") -> dict:
        """The flat form of ``tree`` (which must have this layout's structure, shapes and dtypes)."""
        leaves = self._leaves_of(tree, what)
        flat = {}
        for key, idx in self.buffers.items():
            if self.slots[idx[0]].alone:
                flat[key] = leaves[idx[0]]
            elif len(idx) == 1:
                flat[key] = jnp.reshape(leaves[idx[0]], (-1,))
            else:
                flat[key] = jnp.concatenate([jnp.reshape(leaves[i], (-1,)) for i in idx])
        return flat

    def unpack(self, flat: dict) -> Any:
        """The tree whose flat form is ``flat`` (static slices; XLA fuses them into their consumers)."""
        if not isinstance(flat, dict) or set(flat) != set(self.buffers):
            got = sorted(flat) if isinstance(flat, dict) else type(flat).__name__
            raise ValueError(f"expected a flat tree with keys {sorted(self.buffers)}, got {got}")
        # Static shapes and dtypes only (read while tracing): nothing is added to the compiled program.
        for key, buf in flat.items():
            shape, dtype = self._expected[key]
            got_shape, got_dtype = tuple(np.shape(buf)), np.dtype(jnp.result_type(buf))
            if got_shape != shape or got_dtype != dtype:
                error = TypeError if got_dtype != dtype else ValueError
                raise error(
                    f"flat buffer {key!r} is {got_dtype.name}{list(got_shape)}, but this layout expects "
                    f"{dtype.name}{list(shape)} ({_size(shape)} elements): unpack takes what pack made "
                    "from a tree of the layout's structure, shapes and dtypes"
                )
        leaves = []
        for s in self.slots:
            buf = flat[s.key]
            if s.alone:
                leaves.append(buf)
            elif len(self.buffers[s.key]) == 1:
                leaves.append(jnp.reshape(buf, s.shape))
            else:
                leaves.append(jnp.reshape(jax.lax.slice_in_dim(buf, s.start, s.start + s.size), s.shape))
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def _leaves_of(self, tree: Any, what: str) -> list:
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        if treedef != self.treedef:
            raise ValueError(
                f"the {what} tree does not match the parameter tree:\n  {what}: {treedef}\n  params: {self.treedef}"
            )
        for i, x in enumerate(leaves):
            shape, dtype = tuple(np.shape(x)), np.dtype(jnp.result_type(x))
            if shape != self.shapes[i] or dtype != self.dtypes[i]:
                path = jax.tree_util.keystr(jax.tree_util.tree_flatten_with_path(tree)[0][i][0])
                raise TypeError(
                    f"{what} leaf {path} is {dtype.name}{list(shape)}, but the parameter is "
                    f"{self.dtypes[i].name}{list(self.shapes[i])}; flatten packs gradients and parameters "
                    "into the same buffers, so they must agree in shape and dtype"
                )
        return leaves


def _check_max_packed_size(value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`max_packed_size` (={value!r}) must be a positive integer")


def _size(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _middle_boundary(sizes: list[int]) -> int:
    """Index in 1..len(sizes)-1 of the leaf boundary nearest half of the total size."""
    total, best, best_gap, run = sum(sizes), 1, None, 0
    for k in range(1, len(sizes)):
        run += sizes[k - 1]
        gap = abs(2 * run - total)
        if best_gap is None or gap < best_gap:
            best, best_gap = k, gap
    return best


def flatten(inner, max_packed_size: int = 4096) -> GradientTransformationExtraArgs:
    """Run ``inner`` on the parameters packed into a few contiguous buffers, one per dtype.

    For an element-wise transform :math:`T` (every optlab optimizer except
    L-BFGS and SWATS), with :math:`\\operatorname{pack}` the concatenation of
    the raveled leaves of each dtype and :math:`\\operatorname{unpack}` its
    inverse (static slices and reshapes),

    .. math::
        \\operatorname{flatten}(T)(g, s, w) = \\operatorname{unpack}\\big(T(\\operatorname{pack}(g),
        s, \\operatorname{pack}(w))\\big) = T(g, s, w) \\text{ leaf by leaf,}

    bit for bit (see the module docstring for the XLA details the layout
    takes care of and the one FMA exception, and ``tests/test_flat.py`` for
    the proof on every optimizer). What changes is the compiled program: the
    optimizer's arithmetic and state updates run as a few kernels per buffer
    instead of one to three per leaf; what is left per leaf is the slice
    that ``apply_updates`` adds to each parameter. Parameters kept packed
    between steps (`FlatLayout`) remove that too. The idea is optax's
    ``flatten`` and PyTorch's multi-tensor (``foreach``) kernels, grouped by
    dtype here so that mixed precision trees (bfloat16 and float32 leaves)
    keep their dtypes. It pays off for many small arrays (CNNs with
    BatchNorm), not for a few large ones (see ``docs/benchmarks.md``).

    * ``inner``'s state is built on the flat buffers (``FlatState.inner_state``),
      and hyperparameters stay readable with `optlab.hyperparams`.
    * Transforms that read the parameters (weight decay) receive them packed
      the same way. Gradients must match the parameters in shape and dtype.
    * The extra argument ``value_fn`` (``params -> (loss, grads)``, used by
      L-BFGS's line search) is translated to the flat form; other extra
      arguments pass through unchanged.
    * Wrap a whole optimizer or a group of `partition`, not a `partition`
      itself: labels computed from the parameters (``weight_decay_labels``
      looks at ``ndim``) would see the 1-D buffers.
    * Works under ``jit`` and ``vmap``, and with ``flax.nnx.State`` trees.

    Args:
      inner: any gradient transformation (optlab or optax).
      max_packed_size: leaves with more elements than this stay separate
        arrays (their shape kept): a step over a large array is bound by
        memory bandwidth, not by per-array overhead, and packing it would
        add a copy. The default, 4,096, is about where the two costs meet on
        a CPU (see ``docs/benchmarks.md``). Packing large leaves is slow:
        XLA fuses the concatenation into every consumer of a slice of it.

    Example:
      >>> import jax, jax.numpy as jnp, optlab
      >>> from optlab.transforms import flatten
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2), "scale": jnp.ones(2)}
      >>> opt = flatten(optlab.adamw(1e-3, weight_decay=0.1))
      >>> state = opt.init(params)
      >>> grads = jax.tree_util.tree_map(jnp.ones_like, params)
      >>> updates, state = opt.update(grads, state, params)
      >>> params = optlab.apply_updates(params, updates)
      >>> float(optlab.hyperparams(state)["learning_rate"])
      0.0010000000474974513
    """
    if not (hasattr(inner, "init") and hasattr(inner, "update")):
        raise TypeError(f"flatten() takes a gradient transformation, got `inner` (={inner!r})")
    _check_max_packed_size(max_packed_size)
    inner = with_extra_args_support(inner)

    def init_fn(params):
        layout = FlatLayout(params, max_packed_size)
        return FlatState(inner.init(layout.pack(params, "parameter")))

    def update_fn(updates, state, params=None, **extra):
        if not isinstance(state, FlatState):
            raise TypeError(f"flatten's update expects the FlatState made by its init, got {type(state).__name__}")
        layout = FlatLayout(updates if params is None else params, max_packed_size)
        flat_updates = layout.pack(updates, "gradient")
        flat_params = None if params is None else layout.pack(params, "parameter")
        if callable(extra.get("value_fn")):
            extra["value_fn"] = _flat_value_fn(extra["value_fn"], layout)
        flat_out, inner_state = inner.update(flat_updates, state.inner_state, flat_params, **extra)
        return layout.unpack(flat_out), FlatState(inner_state)

    return GradientTransformationExtraArgs(init_fn, update_fn)


def _flat_value_fn(value_fn, layout: FlatLayout):
    """``value_fn`` of the flat parameters: unpack, evaluate, pack the gradients."""

    def flat_value_fn(flat_params):
        value, grads = value_fn(layout.unpack(flat_params))
        return value, layout.pack(grads, "gradient")

    return flat_value_fn
