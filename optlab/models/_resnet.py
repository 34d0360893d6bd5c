"""ResNet-9: the fast CIFAR-10 network of Page's "How to train your ResNet"."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from optlab._checks import check_int, check_number
from optlab.models._layers import (
    batch_norm,
    bn_flag,
    check_bn_momentum,
    check_image,
    check_layout,
    check_num_classes,
    conv3x3,
    conv_in_layout,
    dense,
    pool_in_layout,
)


class ConvBN(nnx.Module):
    """conv 3x3 (SAME, no bias) -> BatchNorm -> ReLU, then an optional 2x2 max-pool.

    The conv has no bias because the BatchNorm right after it subtracts the
    per-channel mean (and has its own learned bias). ``layout="channel_major"``
    takes and returns (C, H, W, B) activations (see ``CNN``'s ``layout``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        pool: bool,
        bn_momentum: float,
        init: str,
        init_scale: float,
        rngs: nnx.Rngs,
        layout: str = "nhwc",
    ):
        self.pool = pool
        self.layout = layout
        self.conv = conv3x3(in_channels, out_channels, init=init, init_scale=init_scale, use_bias=False, rngs=rngs)
        axis = 0 if layout == "channel_major" else -1
        self.bn = batch_norm(out_channels, momentum=bn_momentum, rngs=rngs, axis=axis)

    def __call__(self, x: jax.Array, *, train: bool | None = None) -> jax.Array:
        x = jax.nn.relu(self.bn(conv_in_layout(self.conv, x, self.layout), use_running_average=bn_flag(train)))
        return pool_in_layout(x, self.layout) if self.pool else x


class Residual(nnx.Module):
    """``x + f(x)`` with ``f`` two ``ConvBN`` at constant width."""

    def __init__(self, channels: int, **conv_bn_kwargs):
        self.conv1 = ConvBN(channels, channels, pool=False, **conv_bn_kwargs)
        self.conv2 = ConvBN(channels, channels, pool=False, **conv_bn_kwargs)

    def __call__(self, x: jax.Array, *, train: bool | None = None) -> jax.Array:
        return x + self.conv2(self.conv1(x, train=train), train=train)


class ResNet9(nnx.Module):
    """ResNet-9 (Page 2018, DAWNBench; the base of Keller Jordan's fast CIFAR-10 runs).

    With base width ``w`` (64 in the original)::

        prep    ConvBN(in_channels -> w)
        layer1  ConvBN(w -> 2w), max-pool 2, Residual(2w)
        layer2  ConvBN(2w -> 4w), max-pool 2
        layer3  ConvBN(4w -> 8w), max-pool 2, Residual(8w)
        head    global max-pool -> linear 8w -> num_classes (no bias) -> * logit_scale

    where ``ConvBN`` is conv 3x3 (no bias) -> BatchNorm -> ReLU and
    ``Residual(c)(x) = x + ConvBN(ConvBN(x))``. A 32x32 input is pooled to
    4x4 before the global max. ``logit_scale=0.125`` is Page's final
    ``Mul(0.125)``, which keeps the initial logits small. At ``w=64`` and 10
    classes the network has 6,573,120 parameters.

    BatchNorm everywhere follows ``r <- bn_momentum * r + (1 - bn_momentum) *
    batch_stat`` for its running averages; ``bn_momentum=0.9`` is PyTorch's
    ``momentum=0.1`` (Page's setting).

    Reference: D. Page, "How to train your ResNet" (2018),
    https://myrtle.ai/how-to-train-your-resnet/ ; K. Jordan, airbench (2024).

    Args:
      num_classes: number of logits.
      width: base width ``w``; tests use a tiny one (e.g. 4).
      init: kernel initialiser name (see ``get_initializer``); the
        BatchNorm layers start as the identity.
      in_channels: channels of the input images.
      logit_scale: multiplies the logits.
      init_scale: multiplies every initial kernel entry.
      bn_momentum: BatchNorm running-average decay, in [0, 1).
      layout: "auto" (channel-major matrix-product convolutions on the CPU,
        XLA's convolutions elsewhere), "channel_major" or "nhwc"; the same
        parameters and function to float32 round-off (see ``CNN``).
      rngs: ``nnx.Rngs`` for the parameters.

    Modes: built in train mode; ``model.eval()`` / ``model.train()`` switch
    every BatchNorm, and ``__call__(x, *, train=...)`` overrides the mode
    for one call (``None`` keeps it). Inputs must be NHWC and at least 8x8.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> model = ResNet9(width=4, rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 32, 32, 3)), train=False).shape
      (2, 10)
    """

    def __init__(
        self,
        num_classes: int = 10,
        width: int = 64,
        init: str = "default",
        *,
        in_channels: int = 3,
        logit_scale: float = 0.125,
        init_scale: float = 1.0,
        bn_momentum: float = 0.9,
        layout: str = "auto",
        rngs: nnx.Rngs,
    ):
        num_classes = check_num_classes(num_classes)
        check_int("width", width, minimum=1)
        check_int("in_channels", in_channels, minimum=1)
        check_number("logit_scale", logit_scale)
        bn_momentum = check_bn_momentum(bn_momentum)
        w = int(width)
        self.in_channels = int(in_channels)
        self.logit_scale = float(logit_scale)
        self.layout = check_layout(layout)
        kw = dict(bn_momentum=bn_momentum, init=init, init_scale=init_scale, rngs=rngs, layout=self.layout)

        self.prep = ConvBN(self.in_channels, w, pool=False, **kw)
        self.layer1 = ConvBN(w, 2 * w, pool=True, **kw)
        self.res1 = Residual(2 * w, **kw)
        self.layer2 = ConvBN(2 * w, 4 * w, pool=True, **kw)
        self.layer3 = ConvBN(4 * w, 8 * w, pool=True, **kw)
        self.res3 = Residual(8 * w, **kw)
        self.linear = dense(8 * w, num_classes, init=init, init_scale=init_scale, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool | None = None) -> jax.Array:
        check_image(x, self.in_channels, "ResNet9", min_size=8)
        cm = self.layout == "channel_major"
        if cm:
            x = jnp.transpose(x, (3, 1, 2, 0))  # (C, H, W, B)
        x = self.prep(x, train=train)
        x = self.res1(self.layer1(x, train=train), train=train)
        x = self.layer2(x, train=train)
        x = self.res3(self.layer3(x, train=train), train=train)
        x = jnp.max(x, axis=(1, 2))
        return self.linear(x.T if cm else x) * self.logit_scale
