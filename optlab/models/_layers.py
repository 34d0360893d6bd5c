"""Building blocks shared by the models: activations by name, initialised
layers, the train/eval switch and argument checks.

Train and eval mode
-------------------
Every model follows Flax NNX's convention. ``nnx.BatchNorm`` reads its
``use_running_average`` attribute and ``nnx.Dropout`` its ``deterministic``
attribute; ``model.train()`` sets both to False everywhere in the model and
``model.eval()`` sets both to True. Models are built in training mode.

These attributes are static: they live in the ``graphdef`` returned by
``nnx.split``, so a train-mode and an eval-mode graphdef are different (and
jit-compile separately). Each model's ``__call__`` also takes
``train: bool | None = None``; ``None`` follows the mode, while True/False
overrides it for that call only, so that one graphdef can serve a functional
train step and an evaluation step.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from optlab._checks import check_choice, check_int, check_probability
from optlab.models._init import get_initializer, zeros_init

# flax >= 0.12 wants lists of submodules wrapped in nnx.List; older NNX
# versions took plain lists.
ModuleList = getattr(nnx, "List", list)


def _leaky_relu(x: jax.Array) -> jax.Array:
    # PyTorch's default slope; jax.nn.leaky_relu also defaults to 0.01.
    return jax.nn.leaky_relu(x, negative_slope=0.01)


def _gelu(x: jax.Array) -> jax.Array:
    # Exact erf form, as torch.nn.GELU() by default (jax defaults to the tanh form).
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def _identity(x: jax.Array) -> jax.Array:
    return x


# Models store only the *name* and look the function up at call time, so
# that the graphdef holds a string (equal across instances) not a function.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "gelu": _gelu,
    "gelu_tanh": _gelu_tanh,
    "elu": jax.nn.elu,
    "leaky_relu": _leaky_relu,
    "silu": jax.nn.silu,
    "softplus": jax.nn.softplus,
    "identity": _identity,
}


def check_activation(name: Any) -> str:
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"`activation` (={name!r}) must be one of {', '.join(map(repr, ACTIVATIONS))}")
    return name


def check_num_classes(num_classes: Any) -> int:
    check_int("num_classes", num_classes, minimum=1)
    return int(num_classes)


def check_sizes(name: str, sizes: Any, *, allow_empty: bool) -> tuple[int, ...]:
    """A sequence of positive layer widths, as a tuple (hashable, so it can sit in a graphdef)."""
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        raise TypeError(f"`{name}` (={sizes!r}) must be a sequence of positive integers")
    if not sizes and not allow_empty:
        raise ValueError(f"`{name}` (={sizes!r}) must not be empty")
    for i, size in enumerate(sizes):
        check_int(f"{name}[{i}]", size, minimum=1)
    return tuple(int(s) for s in sizes)


def check_batchnorm(placement: Any) -> str | None:
    check_choice("batchnorm", placement, (None, "before", "after"))
    return placement


def check_bn_momentum(momentum: Any) -> float:
    check_probability("bn_momentum", momentum)
    return float(momentum)


def check_dropout(rate: Any) -> float:
    check_probability("dropout", rate)
    return float(rate)


def check_image(x: jax.Array, in_channels: int, model: str, min_size: int = 1) -> None:
    """Shapes are static, so this runs at trace time and costs nothing under jit."""
    if x.ndim != 4 or x.shape[-1] != in_channels:
        raise ValueError(
            f"{model} expects NHWC images (batch, height, width, {in_channels}); got shape {tuple(x.shape)}"
        )
    if min(x.shape[1], x.shape[2]) < min_size:
        raise ValueError(f"{model} needs images at least {min_size}x{min_size}; got shape {tuple(x.shape)}")


def dense(
    in_features: int, out_features: int, *, init: str, init_scale: float, use_bias: bool = True, rngs: nnx.Rngs
) -> nnx.Linear:
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        kernel_init=get_initializer(init, init_scale),
        bias_init=zeros_init,
        rngs=rngs,
    )


def conv3x3(
    in_channels: int, out_channels: int, *, init: str, init_scale: float, use_bias: bool = True, rngs: nnx.Rngs
) -> nnx.Conv:
    return nnx.Conv(
        in_channels,
        out_channels,
        kernel_size=(3, 3),
        padding="SAME",
        use_bias=use_bias,
        kernel_init=get_initializer(init, init_scale),
        bias_init=zeros_init,
        rngs=rngs,
    )


def batch_norm(features: int, *, momentum: float, rngs: nnx.Rngs) -> nnx.BatchNorm:
    # epsilon 1e-5 is both Flax's and PyTorch's default.
    return nnx.BatchNorm(features, momentum=momentum, epsilon=1e-5, use_running_average=False, rngs=rngs)


def bn_flag(train: bool | None) -> bool | None:
    """``train`` -> BatchNorm's ``use_running_average`` (None: keep the module's mode)."""
    return None if train is None else not train


def dropout_flag(train: bool | None) -> bool | None:
    """``train`` -> Dropout's ``deterministic`` (None: keep the module's mode)."""
    return None if train is None else not train


def max_pool2(x: jax.Array) -> jax.Array:
    return nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))


def count_params(model: nnx.Module) -> int:
    """Number of trainable scalars: the sizes of all ``nnx.Param`` leaves.

    BatchNorm's scale and bias count (as in ``torch``'s ``parameters()``);
    its running mean and variance (``nnx.BatchStat``) do not.

    Example:
      >>> from flax import nnx
      >>> from optlab.models import ConvNet
      >>> count_params(ConvNet(rngs=nnx.Rngs(0)))
      4266
    """
    return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
