"""The lectures' small MNIST convolutional network."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from optlab.models._layers import (
    check_image,
    check_num_classes,
    conv3x3,
    conv3x3_channel_major,
    dense,
    max_pool2x2,
)


class ConvNet(nnx.Module):
    """Two conv layers and a linear classifier, for 28x28 grey images::

        (B, 28, 28, 1) -conv 3x3, 1->4, SAME-> ReLU -> max-pool 2 -> (B, 14, 14, 4)
                       -conv 3x3, 4->8, SAME-> ReLU -> max-pool 2 -> (B, 7, 7, 8)
                       -flatten-> (B, 392) -linear 392->num_classes-> logits

    4266 parameters for 10 classes: conv1 4*9 + 4 = 40, conv2 8*4*9 + 8 = 296,
    linear 392*10 + 10 = 3930.

    The flatten is in NHWC (height, width, channel) order; PyTorch flattens
    NCHW, so a linear weight copied from a torch model must be permuted.

    Inside, the activations are laid out (channel, height, width, batch) and
    the convolutions are matrix products over image patches
    (`conv3x3_channel_major`, `max_pool2x2`): the same function as
    ``nnx.Conv`` + ``nnx.max_pool`` to float32 round-off, with the same
    parameters, and about 4x faster to train on the CPU, where XLA's convolution
    of 1-8 channels is slow (docs/benchmarks.md).

    Args:
      num_classes: number of logits.
      init: kernel initialiser name (see ``get_initializer``); biases start at 0.
      init_scale: multiplies every initial kernel entry.
      rngs: ``nnx.Rngs`` for the parameters.

    ``__call__(x, *, train=None)``: ``train`` is accepted for a uniform
    interface and has no effect (no BatchNorm or Dropout here).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> ConvNet(rngs=nnx.Rngs(0))(jnp.zeros((2, 28, 28, 1))).shape
      (2, 10)
    """

    def __init__(
        self, num_classes: int = 10, init: str = "default", *, init_scale: float = 1.0, rngs: nnx.Rngs
    ):
        num_classes = check_num_classes(num_classes)
        self.conv1 = conv3x3(1, 4, init=init, init_scale=init_scale, rngs=rngs)
        self.conv2 = conv3x3(4, 8, init=init, init_scale=init_scale, rngs=rngs)
        self.linear = dense(7 * 7 * 8, num_classes, init=init, init_scale=init_scale, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool | None = None) -> jax.Array:
        del train
        check_image(x, 1, "ConvNet")
        if x.shape[1:3] != (28, 28):
            raise ValueError(f"ConvNet expects 28x28 images; got shape {tuple(x.shape)}")
        x = jnp.transpose(x, (3, 1, 2, 0))  # (1, 28, 28, B)
        for conv in (self.conv1, self.conv2):
            x = max_pool2x2(jax.nn.relu(conv3x3_channel_major(x, conv.kernel[...], conv.bias[...])), axis=1)
        # (C, 7, 7, B) against the kernel's rows in NHWC flatten order (h, w, c).
        kernel = self.linear.kernel[...]
        kernel = kernel.reshape(x.shape[1], x.shape[2], x.shape[0], kernel.shape[-1])
        return jnp.einsum("chwb,hwco->bo", x, kernel) + self.linear.bias[...]
