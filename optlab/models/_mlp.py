"""Multi-layer perceptron."""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

from optlab._checks import check_int
from optlab.models._layers import ACTIVATIONS, ModuleList, check_activation, check_num_classes, check_sizes, dense


class MLP(nnx.Module):
    """Fully connected network on flattened inputs.

    With widths ``d_0 = in_features``, ``d_1..d_L = hidden`` and activation
    ``sigma``::

        h_0 = flatten(x)                          (B, d_0)
        h_l = sigma(h_{l-1} W_l + b_l)            l = 1..L
        logits = h_L W_out + b_out                (B, num_classes)

    The same architecture as ``torch.nn.Sequential(Flatten(), Linear, act, ...,
    Linear)``. ``hidden=()`` gives multinomial logistic regression. It has
    ``sum_l (d_{l-1} + 1) d_l + (d_L + 1) num_classes`` parameters.

    Args:
      in_features: size of one flattened example (784 for 28x28x1 MNIST).
      hidden: widths of the hidden layers.
      num_classes: number of outputs (logits).
      activation: one of ``ACTIVATIONS`` ("relu", "tanh", "sigmoid", "gelu"
        (exact erf form, like torch), "gelu_tanh", "elu", "leaky_relu" (slope
        0.01), "silu", "softplus", "identity").
      init: kernel initialiser name (see ``get_initializer``); biases start at 0.
      init_scale: multiplies every initial kernel entry.
      rngs: ``nnx.Rngs`` for the parameters.

    ``__call__(x, *, train=None)`` accepts any ``(B, ...)`` input (NHWC images
    included) and flattens all but the leading axis. The MLP has no
    BatchNorm or Dropout, so ``train`` changes nothing; it is accepted so
    that every model is called the same way.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> model = MLP(784, (128, 64), 10, rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 28, 28, 1))).shape
      (2, 10)
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        num_classes: int,
        activation: str = "relu",
        init: str = "default",
        *,
        init_scale: float = 1.0,
        rngs: nnx.Rngs,
    ):
        check_int("in_features", in_features, minimum=1)
        hidden = check_sizes("hidden", hidden, allow_empty=True)
        num_classes = check_num_classes(num_classes)
        self.activation = check_activation(activation)
        self.in_features = int(in_features)

        widths = (self.in_features, *hidden, num_classes)
        self.layers = ModuleList(
            [
                dense(d_in, d_out, init=init, init_scale=init_scale, rngs=rngs)
                for d_in, d_out in zip(widths[:-1], widths[1:])
            ]
        )

    def __call__(self, x: jax.Array, *, train: bool | None = None) -> jax.Array:
        del train  # nothing mode-dependent in an MLP
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"MLP built for in_features={self.in_features} got inputs with {x.shape[1]} features per example"
            )
        act = ACTIVATIONS[self.activation]
        *hidden_layers, output_layer = self.layers
        for layer in hidden_layers:
            x = act(layer(x))
        return output_layer(x)
