"""The pure training and evaluation steps, and a whole epoch as one compiled ``lax.scan``.

Everything here is a pure function of arrays: no Python side effects, no
host round trips. ``jax.vmap`` over `TrainState` (different seeds and
hyperparameters per member) therefore turns one run into a sweep.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import optlab
from optlab._base import global_norm, with_extra_args_support
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
    # An optimizer's init may put one array in several places (several zero counters) or
    # hand out arrays its closure keeps (hyperparameter values, schedule parameters). A jit
    # that donates the state would then donate a buffer twice, or free one the optimizer
    # still needs; so the state gets its own copy of every leaf.
    return graphdef, jax.tree_util.tree_map(lambda x: x.copy(), state)


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
