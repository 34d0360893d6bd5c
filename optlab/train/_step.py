"""The pure training and evaluation steps, and a whole epoch as one compiled ``lax.scan``.

Everything here is a pure function of arrays: no Python side effects, no
host round trips. ``jax.vmap`` over `TrainState` (different seeds and
hyperparameters per member) therefore turns one run into a sweep.

`make_train_epoch_stepwise` is the same epoch as a Python loop over one jitted
step, for XLA:CPU, where the gradient of a convolution inside a compiled loop
takes a slow path (jax-ml/jax#12868); `choose_epoch_loop` picks between them.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import optlab
from optlab._base import global_norm, tree_copy, with_extra_args_support
from optlab.config import EPOCH_LOOPS
from optlab.models import merge_model


class TrainState(NamedTuple):
    """Everything that changes during training.

    Attributes:
      step: number of optimizer steps taken (int32).
      params: model parameters (``nnx.State`` of ``nnx.Param``).
      model_state: the rest of the model's state: BatchNorm statistics, dropout RNG counters.
      opt_state: the optimizer state (its hyperparameters included).
      rng: base PRNG key (raw uint32[2]); per-step keys are ``fold_in(rng, step)``.
    """

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    rng: jax.Array


def split_model(model: nnx.Module):
    """(graphdef, params, rest) of an NNX model."""
    return nnx.split(model, nnx.Param, ...)


def init_state(model: nnx.Module, tx, seed: int | jax.Array) -> tuple[Any, TrainState]:
    """Split ``model`` and initialise the optimizer: returns ``(graphdef, state)``."""
    graphdef, params, rest = split_model(model)
    tx = with_extra_args_support(tx)
    rng = jax.random.PRNGKey(seed)
    state = TrainState(jnp.zeros([], jnp.int32), params, rest, tx.init(params), rng)
    # optlab's transforms hand out buffers of their own (tests/test_donation.py), but an optax
    # or hand-written one may put one array in several places or hand out arrays its closure
    # keeps (optax.inject_hyperparams stores the caller's hyperparameter arrays). A jit that
    # donates the state would then donate a buffer twice, or free one still needed elsewhere;
    # so the state gets its own copy of every leaf.
    return graphdef, tree_copy(state)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean softmax cross-entropy with optional label smoothing (Szegedy et al., 2016)."""
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        targets = targets * (1 - label_smoothing) + label_smoothing / num_classes
    return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets))


def current_learning_rate(opt_state) -> jax.Array:
    """The learning rate the optimizer used last, or NaN when it keeps none in its state."""
    try:
        hp = optlab.hyperparams(opt_state)
    except ValueError:
        return jnp.asarray(jnp.nan, jnp.float32)
    if "learning_rate" in hp:
        return jnp.asarray(hp["learning_rate"], jnp.float32)
    for v in hp.values():  # parameter groups: report the first group's rate
        if isinstance(v, dict) and "learning_rate" in v:
            return jnp.asarray(v["learning_rate"], jnp.float32)
    return jnp.asarray(jnp.nan, jnp.float32)


def make_steps(
    graphdef,
    tx,
    *,
    preprocess: Callable[[jax.Array], jax.Array],
    augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    label_smoothing: float = 0.0,
):
    """Build ``train_step(state, images, labels)`` and ``eval_step(state, images, labels)``.

    ``preprocess`` turns a uint8 NHWC batch into the model's float input (the
    normalisation chosen in the config); ``augment(key, x)`` runs on the
    preprocessed batch in training only. Both run inside the compiled step, on
    the device that holds the data.
    """
    tx = with_extra_args_support(tx)

    def train_step(state: TrainState, images: jax.Array, labels: jax.Array):
        x = preprocess(images)
        if augment is not None:
            step_key = jax.random.fold_in(jax.random.fold_in(state.rng, 1), state.step)
            x = augment(step_key, x)

        def loss_fn(params):
            # merge_model copies the Variables: a bare nnx.merge would reuse ones created outside
            # jax.grad, and BatchNorm/Dropout updating them raises TraceContextError (flax#5050).
            model = merge_model(graphdef, params, state.model_state)
            logits = model(x, train=True)
            _, _, new_rest = split_model(model)
            return cross_entropy(logits, labels, label_smoothing), (logits, new_rest)

        (loss, (logits, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        # The loss reaches transforms that monitor it (reduce_on_plateau), under optax's name `value`.
        updates, opt_state = tx.update(grads, state.opt_state, state.params, value=loss)
        params = optlab.apply_updates(state.params, updates)
        # A non-finite loss must not leak into BatchNorm statistics: if the optimizer skips the
        # step (skip_nonfinite), the model state stays as it was too.
        ok = jnp.isfinite(loss)
        new_rest = jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new_rest, state.model_state)
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
            "learning_rate": current_learning_rate(opt_state),
            "grad_norm": global_norm(grads),
            "update_norm": global_norm(updates),
            "param_norm": global_norm(params),
        }
        return TrainState(state.step + 1, params, new_rest, opt_state, state.rng), metrics

    def eval_step(state: TrainState, images: jax.Array, labels: jax.Array, params=None):
        model = merge_model(graphdef, state.params if params is None else params, state.model_state)
        logits = model(preprocess(images), train=False)
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
        return {"loss_sum": jnp.sum(per_example), "correct": jnp.sum(jnp.argmax(logits, -1) == labels)}, logits

    return train_step, eval_step


def epoch_permutation(rng: jax.Array, epoch, n: int, batch_size: int) -> jax.Array:
    """Batch indices of one epoch, shape (n // batch_size, batch_size); the remainder is dropped.

    The order depends only on (rng, epoch), so a resumed run sees the same data order.
    """
    key = jax.random.fold_in(jax.random.fold_in(rng, 0), epoch)
    nb = n // batch_size
    return jax.random.permutation(key, n)[: nb * batch_size].reshape(nb, batch_size)


def make_train_epoch(train_step, batch_size: int):
    """``train_epoch(state, images, labels, epoch) -> (state, per-step metrics)`` as one ``lax.scan``.

    The dataset arrays stay on the device; each scan iteration gathers its batch.
    """

    def train_epoch(state: TrainState, images: jax.Array, labels: jax.Array, epoch):
        perm = epoch_permutation(state.rng, epoch, images.shape[0], batch_size)

        def body(s, idx):
            return train_step(s, images[idx], labels[idx])

        return jax.lax.scan(body, state, perm)

    return train_epoch


class StepwiseEpoch:
    """A training epoch as a Python loop over one jitted, donated step; built by `make_train_epoch_stepwise`."""

    def __init__(self, train_step, batch_size: int):
        self.batch_size = batch_size
        # n and batch_size fix the permutation's shape; the epoch stays a traced argument so that
        # every epoch reuses one compilation.
        self._permutation = jax.jit(epoch_permutation, static_argnums=(2, 3))

        def step(state: TrainState, images: jax.Array, labels: jax.Array, idx: jax.Array):
            return train_step(state, images[idx], labels[idx])

        self._step = jax.jit(step, donate_argnums=(0,))
        self._stack = jax.jit(lambda per_step: jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_step))

    def __call__(self, state: TrainState, images: jax.Array, labels: jax.Array, epoch):
        perm = self._permutation(state.rng, epoch, images.shape[0], self.batch_size)
        if perm.shape[0] == 0:  # what lax.scan returns for zero steps: empty stacked metrics
            _, shapes = jax.eval_shape(self._step, state, images, labels, jax.ShapeDtypeStruct((self.batch_size,), perm.dtype))
            return state, jax.tree_util.tree_map(lambda m: jnp.zeros((0, *m.shape), m.dtype), shapes)
        per_step = []
        # Iterating a device array slices it on the device; the loop only dispatches, and the
        # host waits for nothing until the caller reads the metrics.
        for idx in perm:
            state, metrics = self._step(state, images, labels, idx)
            per_step.append(metrics)
        return state, self._stack(per_step)


def make_train_epoch_stepwise(train_step, batch_size: int) -> StepwiseEpoch:
    """The epoch of `make_train_epoch` as a Python loop over one jitted step, compiled once per shape.

    ``epoch_fn(state, images, labels, epoch) -> (state, metrics)`` has the
    contract of ``jax.jit(make_train_epoch(train_step, batch_size),
    donate_argnums=(0,))``: the same batches in the same order (from
    `epoch_permutation`), ``state`` donated, and ``metrics`` the per-step
    dicts stacked along a leading axis of length ``n // batch_size``.

    Each step ``(state, images, labels, idx) -> train_step(state, images[idx],
    labels[idx])`` is jitted with the state donated, so it updates in place
    and gathers its batch on the device; the host only dispatches steps and
    never waits inside the epoch. Why it exists: on XLA:CPU the gradient of a
    convolution inside a compiled loop (the scan of `make_train_epoch`) is
    compiled to a slow path (jax-ml/jax#12868); the CIFAR-10 CNN on XLA's
    convolutions (``layout="nhwc"``) trains about 20x faster per step this
    way. Elsewhere the scan is as fast or faster (one dispatch per epoch), see
    `choose_epoch_loop`.

    Not a JAX-traceable function (it loops in Python): ``jax.vmap`` and
    ``jax.jit`` apply to `make_train_epoch`, not to this.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> import optlab
      >>> from optlab.models import MLP
      >>> model = MLP(in_features=4, hidden=[8], num_classes=3, rngs=nnx.Rngs(0))
      >>> graphdef, state = init_state(model, optlab.sgd(0.1), 0)
      >>> train_step, _ = make_steps(graphdef, optlab.sgd(0.1), preprocess=lambda x: x.reshape(x.shape[0], -1) / 255.0)
      >>> images = jnp.zeros((64, 2, 2, 1), jnp.uint8); labels = jnp.zeros((64,), jnp.int32)
      >>> state, metrics = make_train_epoch_stepwise(train_step, 16)(state, images, labels, 0)
      >>> int(state.step), metrics["loss"].shape
      (4, (4,))
    """
    return StepwiseEpoch(train_step, batch_size)


def _contains_primitive(jaxpr, name: str) -> bool:
    """Whether ``jaxpr`` or any jaxpr nested in its equations' parameters applies primitive ``name``."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == name:
            return True
        # Sub-programs sit in the parameters: pjit/custom_jvp/custom_vjp/remat carry a (Closed)Jaxpr,
        # scan/while carry `jaxpr`/`body_jaxpr`/`cond_jaxpr`, cond a tuple of `branches`.
        stack = list(eqn.params.values())
        while stack:
            p = stack.pop()
            if isinstance(p, (tuple, list)):
                stack.extend(p)
            elif hasattr(p, "eqns"):
                if _contains_primitive(p, name):
                    return True
            elif hasattr(p, "jaxpr") and hasattr(p.jaxpr, "eqns"):
                if _contains_primitive(p.jaxpr, name):
                    return True
    return False


def choose_epoch_loop(
    loop: str, train_step, state, images, labels, batch_size: int, *, backend: str | None = None
) -> str:
    """Resolve ``train.loop`` to ``"scan"`` (`make_train_epoch`) or ``"step"`` (`make_train_epoch_stepwise`).

    ``"scan"`` and ``"step"`` are returned as they are. ``"auto"`` gives
    ``"step"`` when the backend (default: ``jax.default_backend()``) is the
    CPU and the train step applies ``conv_general_dilated`` anywhere (nested
    jaxprs included): XLA:CPU compiles the gradient of a convolution inside a
    loop to a slow path (jax-ml/jax#12868), measured 20x slower per step for
    the CIFAR-10 CNN on XLA's convolutions (``layout="nhwc"``). Otherwise ``"scan"``, which dispatches once per epoch.

    ``state``, ``images`` and ``labels`` only lend their shapes and dtypes
    (arrays or ``jax.ShapeDtypeStruct``); the step is traced on one batch of
    ``batch_size`` rows, never run.

    Raises:
      ValueError: ``loop`` is not one of ``EPOCH_LOOPS``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> def conv_step(state, images, labels):
      ...     x = images.astype(jnp.float32)
      ...     y = jax.lax.conv_general_dilated(x, state, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      ...     return state, {"loss": jnp.mean(y)}
      >>> w, x, y = jnp.zeros((3, 3, 1, 2)), jnp.zeros((8, 4, 4, 1)), jnp.zeros((8,), jnp.int32)
      >>> choose_epoch_loop("auto", conv_step, w, x, y, 4, backend="cpu")
      'step'
      >>> choose_epoch_loop("auto", conv_step, w, x, y, 4, backend="gpu")
      'scan'
    """
    if loop not in EPOCH_LOOPS:
        raise ValueError(f"`loop` (={loop!r}) must be one of {', '.join(map(repr, EPOCH_LOOPS))}")
    if loop != "auto":
        return loop
    if (backend or jax.default_backend()) != "cpu":
        return "scan"

    def spec(x, rows=None):
        return jax.ShapeDtypeStruct(tuple(np.shape(x)) if rows is None else (rows, *np.shape(x)[1:]), x.dtype)

    state = jax.tree_util.tree_map(spec, state)
    jaxpr = jax.make_jaxpr(train_step)(state, spec(images, batch_size), spec(labels, batch_size))
    return "step" if _contains_primitive(jaxpr.jaxpr, "conv_general_dilated") else "scan"


def make_evaluate(eval_step, batch_size: int):
    """``evaluate(state, images, labels) -> {"loss", "accuracy"}`` over a whole split, in one compiled loop."""

    def evaluate(state: TrainState, images: jax.Array, labels: jax.Array, params=None):
        n = images.shape[0]
        bs = min(batch_size, n)
        nb = -(-n // bs)
        pad = nb * bs - n
        # Pad to whole batches and mask the padding out of the sums.
        images_p = jnp.concatenate([images, jnp.zeros((pad,) + images.shape[1:], images.dtype)])
        labels_p = jnp.concatenate([labels, jnp.zeros((pad,), labels.dtype)])
        valid = jnp.arange(nb * bs) < n

        def body(carry, i):
            sl = jax.lax.dynamic_slice_in_dim
            x, y, m = sl(images_p, i * bs, bs), sl(labels_p, i * bs, bs), sl(valid, i * bs, bs)
            _, logits = eval_step(state, x, y, params)
            per = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
            loss = carry[0] + jnp.sum(jnp.where(m, per, 0.0))
            correct = carry[1] + jnp.sum(jnp.where(m, jnp.argmax(logits, -1) == y, False))
            return (loss, correct), None

        (loss, correct), _ = jax.lax.scan(body, (jnp.zeros([]), jnp.zeros([], jnp.int32)), jnp.arange(nb))
        return {"loss": loss / n, "accuracy": correct / n}

    return evaluate
