"""A configurable small CNN: the lectures' CIFAR-10 classifier."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from optlab._checks import check_choice, check_int
from optlab.models._layers import (
    ModuleList,
    batch_norm,
    bn_flag,
    check_batchnorm,
    check_bn_momentum,
    check_dropout,
    check_image,
    check_num_classes,
    check_layout,
    check_sizes,
    conv3x3,
    conv_in_layout,
    dense,
    dropout_flag,
    pool_in_layout,
)


class ConvBlock(nnx.Module):
    """conv 3x3 (SAME) -> [BN] -> ReLU -> [BN] -> max-pool 2, BN placed by ``batchnorm``.

    ``batchnorm="before"`` normalises the pre-activation, ``"after"`` the
    ReLU output, ``None`` has no BatchNorm. With ``"before"`` the conv has no
    bias: BatchNorm subtracts the per-channel batch mean, which would cancel
    any bias exactly (its gradient would be identically zero).

    ``layout="channel_major"`` takes and returns (C, H, W, B) activations and
    computes the same function with `conv3x3_channel_major` and `max_pool2x2`;
    ``"nhwc"`` uses ``nnx.Conv`` and ``nnx.max_pool`` on (B, H, W, C).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        batchnorm: str | None,
        bn_momentum: float,
        init: str,
        init_scale: float,
        rngs: nnx.Rngs,
        layout: str = "nhwc",
    ):
        self.batchnorm = batchnorm
        self.layout = layout
        self.conv = conv3x3(
            in_channels, out_channels, init=init, init_scale=init_scale, use_bias=batchnorm != "before", rngs=rngs
        )
        axis = 0 if layout == "channel_major" else -1
        self.bn = batch_norm(out_channels, momentum=bn_momentum, rngs=rngs, axis=axis) if batchnorm else None

    def __call__(self, x: jax.Array, *, train: bool | None = None) -> jax.Array:
        x = conv_in_layout(self.conv, x, self.layout)
        if self.batchnorm == "before":
            x = self.bn(x, use_running_average=bn_flag(train))
        x = jax.nn.relu(x)
        if self.batchnorm == "after":
            x = self.bn(x, use_running_average=bn_flag(train))
        return pool_in_layout(x, self.layout)


class CNN(nnx.Module):
    """Stack of conv blocks, then an optional dropout and a linear classifier.

    For ``channels = (c_1, ..., c_n)``::

        x (B, S, S, in_channels)
        h_k = maxpool2(ReLU(BN(conv3x3(h_{k-1}))))    k = 1..n   ("before")
        h_k = maxpool2(BN(ReLU(conv3x3(h_{k-1}))))    k = 1..n   ("after")
        z = mean over height and width of h_n  (head="avg", (B, c_n))
          | flatten(h_n)                       (head="flatten", (B, c_n * s * s), s = S // 2**n)
        logits = dropout(z) W + b

    BatchNorm (Ioffe & Szegedy 2015) in train mode normalises each channel
    with the batch mean and biased variance over (batch, height, width), then
    applies a learned scale and bias; its running averages follow
    ``r <- bn_momentum * r + (1 - bn_momentum) * batch_stat`` (the variance
    running average uses the biased batch variance, as Flax does; PyTorch
    stores the unbiased one). In eval mode it uses the running averages.
    Flax's ``momentum`` is the weight of the *old* value: ``bn_momentum=0.9``
    is PyTorch's ``BatchNorm2d(momentum=0.1)``.

    Args:
      num_classes: number of logits.
      channels: output channels of each conv block (one 2x2 max-pool each).
      batchnorm: None, "before" or "after" the ReLU (see ``ConvBlock``).
      dropout: dropout rate in [0, 1) applied to the features before the
        classifier (inverted dropout, ``nnx.Dropout``); 0 means no layer.
      init: kernel initialiser name (see ``get_initializer``); biases start at 0.
      in_channels: channels of the input images (3 for CIFAR-10).
      head: "avg" (global average pooling, any input size) or "flatten"
        (needs inputs of ``input_size`` x ``input_size``).
      input_size: image side length; only used (and checked) with
        ``head="flatten"``.
      init_scale: multiplies every initial kernel entry.
      bn_momentum: BatchNorm running-average decay, in [0, 1).
      layout: "auto" (default: "channel_major" on the CPU, "nhwc" elsewhere),
        "channel_major" (convolutions as matrix products on (C, H, W, B)
        activations, `conv3x3_channel_major`) or "nhwc" (``nnx.Conv``). The same
        parameters and the same function to float32 round-off.
      rngs: ``nnx.Rngs``; parameters use its ``params`` stream and dropout
        its ``dropout`` stream (both fall back to ``default``).

    Modes: built in train mode; ``model.eval()`` / ``model.train()`` switch
    BatchNorm and Dropout together, and ``__call__(x, *, train=...)``
    overrides the mode for one call (``None`` keeps it).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> model = CNN(channels=(8, 16), batchnorm="before", dropout=0.1, rngs=nnx.Rngs(0))
      >>> model.eval()
      >>> model(jnp.zeros((2, 32, 32, 3))).shape
      (2, 10)
    """

    def __init__(
        self,
        num_classes: int = 10,
        channels: Sequence[int] = (32, 64, 128),
        batchnorm: str | None = None,
        dropout: float = 0.0,
        init: str = "default",
        in_channels: int = 3,
        *,
        head: str = "avg",
        input_size: int = 32,
        init_scale: float = 1.0,
        bn_momentum: float = 0.9,
        layout: str = "auto",
        rngs: nnx.Rngs,
    ):
        num_classes = check_num_classes(num_classes)
        channels = check_sizes("channels", channels, allow_empty=False)
        batchnorm = check_batchnorm(batchnorm)
        dropout = check_dropout(dropout)
        check_int("in_channels", in_channels, minimum=1)
        check_choice("head", head, ("avg", "flatten"))
        bn_momentum = check_bn_momentum(bn_momentum)
        self.layout = check_layout(layout)
        self.in_channels = int(in_channels)
        self.head = head
        self.input_size = None
        features = channels[-1]
        if head == "flatten":
            check_int("input_size", input_size, minimum=2 ** len(channels))
            self.input_size = int(input_size)
            side = self.input_size
            for _ in channels:
                side //= 2  # a VALID 2x2 pool floors odd sizes
            features = channels[-1] * side * side

        widths = (self.in_channels, *channels)
        self.blocks = ModuleList(
            [
                ConvBlock(
                    c_in,
                    c_out,
                    batchnorm=batchnorm,
                    bn_momentum=bn_momentum,
                    init=init,
                    init_scale=init_scale,
                    rngs=rngs,
                    layout=self.layout,
                )
                for c_in, c_out in zip(widths[:-1], widths[1:])
            ]
        )
        self.linear = dense(features, num_classes, init=init, init_scale=init_scale, rngs=rngs)
        # Built last: forking the dropout stream may advance a shared default
        # stream, and the weights should not depend on the dropout rate.
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

    def __call__(self, x: jax.Array, *, train: bool | None = None) -> jax.Array:
        check_image(x, self.in_channels, "CNN", min_size=2 ** len(self.blocks))
        if self.head == "flatten" and x.shape[1:3] != (self.input_size, self.input_size):
            raise ValueError(
                f"CNN(head='flatten') was built for {self.input_size}x{self.input_size} images; "
                f"got shape {tuple(x.shape)}"
            )
        if self.layout == "channel_major":
            x = jnp.transpose(x, (3, 1, 2, 0))  # (C, H, W, B)
            for block in self.blocks:
                x = block(x, train=train)
            # Back to NHWC for the head: the flatten order (h, w, c) is the same in both layouts.
            x = jnp.transpose(x, (3, 1, 2, 0))
        else:
            for block in self.blocks:
                x = block(x, train=train)
        x = jnp.mean(x, axis=(1, 2)) if self.head == "avg" else x.reshape(x.shape[0], -1)
        if self.dropout is not None:
            x = self.dropout(x, deterministic=dropout_flag(train))
        return self.linear(x)
