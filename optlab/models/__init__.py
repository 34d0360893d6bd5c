"""Flax NNX models for the training lab.

==========  =====================================================================
``MLP``     fully connected network on flattened inputs
``ConvNet`` the lectures' 4266-parameter MNIST network (two 3x3 convs, one linear)
``CNN``     configurable CIFAR-10 CNN: conv blocks with BatchNorm before/after
            the ReLU or none, optional dropout, average-pool or flatten head
``ResNet9`` Page's fast CIFAR-10 ResNet-9, base width configurable
==========  =====================================================================

Every model takes ``init=`` (a name from ``INIT_NAMES``, see
``get_initializer``) and ``init_scale=``; biases start at zero. ``get_model``
builds one from a name and keyword arguments.

Modes: models are built in train mode. ``model.eval()`` makes BatchNorm use
its running averages (and stop updating them) and turns Dropout off;
``model.train()`` switches back. ``model(x, train=True/False)`` overrides the
mode for one call. The mode is static, so it is part of the ``graphdef``.

Functional use (what a jitted or vmapped train step does)::

    graphdef, params, rest = split_model(model)  # = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, rest, x, y):
        model = merge_model(graphdef, params, rest)  # nnx.merge(..., copy=True)
        logits = model(x, train=True)
        _, _, new_rest = split_model(model)  # updated BatchNorm stats, RNG counts
        return cross_entropy(logits, y), new_rest

Use ``merge_model`` (or ``nnx.merge(..., copy=True)``) rather than a bare
``nnx.merge`` under ``jax.grad``: since flax 0.11.2 a bare merge reuses the
Variables passed in, and BatchNorm/Dropout updating them inside the
transform raises ``TraceContextError`` (google/flax#5050).

``rest`` holds the BatchNorm running statistics (``nnx.BatchStat``) and the
Dropout RNG state; stack ``params`` and ``rest`` of several models along a
new leading axis and ``jax.vmap`` the step to train an ensemble at once.
"""

from optlab.models._cnn import CNN, ConvBlock
from optlab.models._convnet import ConvNet
from optlab.models._functional import merge_model, split_model
from optlab.models._init import INIT_NAMES, describe_inits, get_initializer
from optlab.models._layers import ACTIVATIONS, count_params
from optlab.models._mlp import MLP
from optlab.models._registry import MODELS, get_model
from optlab.models._resnet import ConvBN, Residual, ResNet9

__all__ = [
    "ACTIVATIONS",
    "CNN",
    "ConvBN",
    "ConvBlock",
    "ConvNet",
    "INIT_NAMES",
    "MLP",
    "MODELS",
    "ResNet9",
    "Residual",
    "count_params",
    "describe_inits",
    "get_initializer",
    "get_model",
    "merge_model",
    "split_model",
]
