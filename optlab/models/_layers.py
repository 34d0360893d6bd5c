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

import functools
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


def batch_norm(features: int, *, momentum: float, rngs: nnx.Rngs, axis: int = -1) -> nnx.BatchNorm:
    # epsilon 1e-5 is both Flax's and PyTorch's default. `axis` is the channel axis: 0 for
    # channel-major activations (C, H, W, B); the parameters have shape (features,) either way.
    return nnx.BatchNorm(
        features, momentum=momentum, epsilon=1e-5, use_running_average=False, axis=axis, rngs=rngs
    )


LAYOUTS = ("auto", "channel_major", "nhwc")


def check_layout(layout: Any) -> str:
    """Resolve a model's ``layout``: "auto" is channel-major on the CPU, NHWC elsewhere.

    On the CPU XLA's convolutions are slow for small networks and their
    gradients slower still inside a loop; the channel-major layers below are
    matrix products (the CIFAR-10 CNN's epoch: 3.1x faster, docs/benchmarks.md). On
    accelerators XLA's convolutions (cuDNN) are the better choice. The choice
    is made when the model is built and does not change its parameters.
    """
    check_choice("layout", layout, LAYOUTS)
    if layout == "auto":
        return "channel_major" if jax.default_backend() == "cpu" else "nhwc"
    return layout


def bn_flag(train: bool | None) -> bool | None:
    """``train`` -> BatchNorm's ``use_running_average`` (None: keep the module's mode)."""
    return None if train is None else not train


def dropout_flag(train: bool | None) -> bool | None:
    """``train`` -> Dropout's ``deterministic`` (None: keep the module's mode)."""
    return None if train is None else not train


def max_pool2(x: jax.Array) -> jax.Array:
    return nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))


# Channel-major layers
# --------------------
# XLA's CPU convolution is slow for the few channels of small networks (the
# lectures' ConvNet spent ~80% of a training step in it), and so is the
# select-and-scatter that differentiates ``reduce_window`` max pooling. The two
# layers below compute the same functions as matrix products and elementwise
# ops on activations laid out (channels, height, width, batch): the batch is
# the contiguous axis, so every op vectorises over it, and an image patch is
# a contiguous slab (``benchmarks/sweep_throughput.py``, docs/benchmarks.md).


def conv3x3_channel_major(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """3x3 convolution, stride 1, 'SAME' zero padding, on a (C, H, W, B) activation.

    With ``xp`` the input zero-padded by one pixel on each side of H and W::

        out[o, h, w, b] = bias[o] + sum_{i, j < 3, c} kernel[i, j, c, o] * xp[c, h + i, w + j, b]

    computed as one matrix product of the (O, 9C) kernel with the (9C, H*W*B)
    patch matrix. This is ``nnx.Conv(C, O, (3, 3), padding="SAME")`` (and
    ``torch.nn.Conv2d(C, O, 3, padding=1)``, a cross-correlation) applied in
    another layout, equal to it to float32 round-off.

    Args:
      x: activations (C, H, W, B): channel-major, batch last.
      kernel: (3, 3, C, O), Flax's HWIO layout (``nnx.Conv``'s ``kernel``).
      bias: (O,) or None.

    Returns:
      (O, H, W, B).

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.ones((1, 4, 4, 2))  # one channel, 4x4, batch of 2
      >>> out = conv3x3_channel_major(x, jnp.ones((3, 3, 1, 1)))
      >>> out[0, :, :, 0].tolist()  # how many of the 9 taps fall inside the image
      [[4.0, 6.0, 6.0, 4.0], [6.0, 9.0, 9.0, 6.0], [6.0, 9.0, 9.0, 6.0], [4.0, 6.0, 6.0, 4.0]]
    """
    if x.ndim != 4 or kernel.shape[:3] != (3, 3, x.shape[0]):
        raise ValueError(
            f"conv3x3_channel_major expects x (C, H, W, B) and kernel (3, 3, C, O); got {x.shape} and {kernel.shape}"
        )
    c, h, w, n = x.shape
    out_channels = kernel.shape[3]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    # (C, 9, H, W, B): the nine shifted copies are contiguous slabs in this layout.
    patches = jnp.stack([xp[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)], axis=1)
    weights = kernel.reshape(9, c, out_channels).transpose(2, 1, 0).reshape(out_channels, c * 9)
    # A 2-D product: with (h, w, b) as three contraction-free axes XLA:CPU's kernel-gradient
    # product transposes the patches and runs ~2.5x slower.
    out = jnp.dot(weights, patches.reshape(c * 9, h * w * n)).reshape(out_channels, h, w, n)
    if bias is not None:
        out = out + bias[:, None, None, None]
    return out


def _windows(x: jax.Array, axis: int) -> jax.Array:
    # (..., H, W, ...) -> (..., H/2, 2, W/2, 2, ...): free in a row-major layout, and the
    # derivative of a reshape is a reshape, where strided slices would transpose to padding.
    s = x.shape
    return x.reshape(s[:axis] + (s[axis] // 2, 2, s[axis + 1] // 2, 2) + s[axis + 2 :])


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _max_pool2x2(x: jax.Array, axis: int) -> jax.Array:
    return jnp.max(_windows(x, axis), axis=(axis + 1, axis + 3))


@_max_pool2x2.defjvp
def _max_pool2x2_jvp(axis, primals, tangents):
    (x,), (t,) = primals, tangents
    xw, window_axes = _windows(x, axis), (axis + 1, axis + 3)
    out = jnp.max(xw, axis=window_axes)
    # The first maximum of the window in row-major order carries the derivative (ties are
    # common in ReLU outputs of quantised images), as XLA's select_and_scatter and torch's
    # max_pool2d do; jnp.max's own rule would split it between tied entries. A window
    # without a maximum (NaNs) gives it to its last entry.
    shape = [1] * xw.ndim
    shape[axis + 1], shape[axis + 3] = 2, 1
    rank = jnp.arange(0, 4, 2).reshape(shape) + jnp.arange(2).reshape(shape[: axis + 1] + [1, 1, 2] + shape[axis + 4 :])
    hit = xw == jnp.expand_dims(out, window_axes)
    first = jnp.min(jnp.where(hit, rank, 3), axis=window_axes, keepdims=True)
    return out, jnp.sum(jnp.where(rank == first, _windows(t, axis), 0), axis=window_axes)


def max_pool2x2(x: jax.Array, axis: int = 1) -> jax.Array:
    """Max pooling over non-overlapping 2x2 windows of axes ``(axis, axis + 1)``.

    ``out[..., i, j, ...] = max(x[..., 2i, 2j, ...], x[..., 2i, 2j+1, ...],
    x[..., 2i+1, 2j, ...], x[..., 2i+1, 2j+1, ...])``; a trailing odd row or
    column is dropped ('VALID'). The derivative goes to the first maximum of
    each window in row-major order, exactly as for ``nnx.max_pool(x, (2, 2),
    strides=(2, 2))`` and ``torch.nn.MaxPool2d(2)``, but without
    select-and-scatter (slow on the CPU): the rule is elementwise, written as a
    ``jax.custom_jvp``, so forward- and reverse-mode both work.

    Args:
      x: an array with the two spatial axes next to each other.
      axis: the first spatial axis (1 for NHWC and for (C, H, W, B)).

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
      >>> max_pool2x2(x)[0, :, :, 0].tolist()
      [[5.0, 7.0], [13.0, 15.0]]
    """
    check_int("axis", axis, minimum=0)
    if axis + 1 >= x.ndim:
        raise ValueError(f"`axis` (={axis}) must leave a second spatial axis in an array of shape {tuple(x.shape)}")
    h, w = x.shape[axis] // 2 * 2, x.shape[axis + 1] // 2 * 2
    x = jax.lax.slice_in_dim(jax.lax.slice_in_dim(x, 0, h, axis=axis), 0, w, axis=axis + 1)
    return _max_pool2x2(x, int(axis))


def conv_in_layout(conv: nnx.Conv, x: jax.Array, layout: str) -> jax.Array:
    """A 3x3 'SAME' ``nnx.Conv`` applied to NHWC ``x``, or its channel-major equivalent to (C, H, W, B) ``x``."""
    if layout != "channel_major":
        return conv(x)
    bias = conv.bias[...] if conv.bias is not None else None
    return conv3x3_channel_major(x, conv.kernel[...], bias)


def pool_in_layout(x: jax.Array, layout: str) -> jax.Array:
    """2x2 max pooling over the spatial axes of NHWC or (C, H, W, B) ``x`` (the same axes: 1 and 2)."""
    return max_pool2x2(x, axis=1) if layout == "channel_major" else max_pool2(x)


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
