"""`L` layers of one bijector family, run as one loop over a stacked layer axis."""
from __future__ import annotations

import abc

import tensorflow as tf
from tensorflow_probability.python.bijectors import bijector
from tensorflow_probability.python.internal import cache_util, prefer_static

__all__ = ["LayerStack"]


class LayerStack(bijector.AutoCompositeTensorBijector):
    """`tfb.Chain([layer(θ₀), …, layer(θ_{L−1})])` as one `tf.while_loop` over the layers.

    Each parameter carries a layer axis just left of the layer's own event axes
    (`u` of a Planar stack is `[..., L, D]`, its `b` `[..., L]`). As in a Chain,
    `forward` applies layer `L − 1` first and layer `0` last, `inverse` the
    reverse; the log-det is the sum of the layers' log-dets. The loop body is
    traced once instead of `L` times, so the graph (and its XLA compile) does not
    grow with `L`. Subclasses give `_stacked_parameters()` (name → (tensor, the
    layer's event rank of it)) and `_layer_forward` / `_layer_inverse` on one
    layer's parameters, each returning `(result, log-det)` of that direction.
    """

    _cache = cache_util.BijectorCacheWithGreedyAttrs(
        forward_name="_augmented_forward", inverse_name="_augmented_inverse"
    )

    @abc.abstractmethod
    def _stacked_parameters(self) -> dict:
        """Name → `(tensor, rank of one layer's parameter)`, the layer axis left of those axes."""

    @abc.abstractmethod
    def _layer_forward(self, parameters: dict, z):
        """`(x, log|det ∂x/∂z|)` of the layer with these parameters."""

    @abc.abstractmethod
    def _layer_inverse(self, parameters: dict, x):
        """`(z, log|det ∂z/∂x|)` of the layer with these parameters."""

    @property
    def num_layers(self) -> int:
        """The static number of layers `L`."""
        return self._num_layers

    def _loop(self, y, inverse: bool):
        """`(result, log-det of the direction)` after all layers, in Chain order."""
        stacked = {
            name: (tf.convert_to_tensor(value), rank)
            for name, (value, rank) in self._stacked_parameters().items()
        }
        batch = prefer_static.shape(y)[:-1]
        for value, rank in stacked.values():
            batch = prefer_static.broadcast_shape(batch, prefer_static.shape(value)[: -(rank + 1)])
        y = tf.broadcast_to(y, prefer_static.concat([batch, prefer_static.shape(y)[-1:]], axis=0))
        layers = self._num_layers

        def body(i, y, log_det):
            k = i if inverse else layers - 1 - i
            parameters = {
                name: tf.gather(value, k, axis=-(rank + 1)) for name, (value, rank) in stacked.items()
            }
            step = self._layer_inverse if inverse else self._layer_forward
            y, layer_log_det = step(parameters, y)
            return i + 1, y, log_det + layer_log_det

        _, y, log_det = tf.while_loop(
            lambda i, *_: i < layers,
            body,
            (tf.constant(0), y, tf.zeros(batch, dtype=y.dtype)),
            maximum_iterations=layers,
        )
        return y, log_det

    def _augmented_forward(self, z):
        x, log_det = self._loop(z, inverse=False)
        return x, {"ildj": -log_det}

    def _augmented_inverse(self, x):
        z, log_det = self._loop(x, inverse=True)
        return z, {"ildj": log_det}

    def _forward(self, z):
        return self._augmented_forward(z)[0]

    def _inverse(self, x):
        return self._augmented_inverse(x)[0]

    def _forward_log_det_jacobian(self, z):
        return -self._augmented_forward(z)[1]["ildj"]

    def _inverse_log_det_jacobian(self, x):
        return self._augmented_inverse(x)[1]["ildj"]
