"""`L` layers of one bijector family, run as one loop over a stacked layer axis."""
from __future__ import annotations

import tensorflow as tf
from tensorflow_probability.python.bijectors import bijector
from tensorflow_probability.python.internal import prefer_static

from tfp_flows.bijectors._one_pass import OnePass, OnePassBijector
from tfp_flows.bijectors._shapes import static_num_layers

__all__ = ["LayerStack"]


class LayerStack(OnePassBijector):
    """`tfb.Chain([layer(θ₀), …, layer(θ_{L−1})])` as one `tf.while_loop` over the layers.

    Each parameter carries a layer axis just left of the layer's own event axes
    (`u` of a Planar stack is `[..., L, D]`, its `b` `[..., L]`). As in a Chain,
    `forward` applies layer `L − 1` first and layer `0` last, `inverse` the
    reverse; the log-det is the sum of the layers' log-dets. The loop body is
    traced once instead of `L` times, so the graph (and its XLA compile) does not
    grow with `L`.

    A subclass names its `_layer_class` and passes `stack`: one bijector of that
    class holding every layer's parameters, the layer axis among its batch axes
    (which converts and checks the parameters once, with the layer's own checks).
    """

    _layer_class: type

    def __init__(self, stack: bijector.Bijector, parameters: dict, validate_args: bool, name: str):
        self._stack = stack
        self._ranks = {
            key: properties.event_ndims
            for key, properties in self._layer_class.parameter_properties(stack.dtype).items()
        }
        self._num_layers = static_num_layers(
            {key: (getattr(stack, key), rank) for key, rank in self._ranks.items()}, name
        )
        super().__init__(
            forward_min_event_ndims=stack.forward_min_event_ndims,
            validate_args=validate_args,
            dtype=stack.dtype,
            parameters=parameters,
            name=name,
        )

    @classmethod
    def _parameter_properties(cls, dtype, num_classes=None):
        return {
            key: properties._replace(event_ndims=properties.event_ndims + 1)
            for key, properties in cls._layer_class.parameter_properties(dtype).items()
        }

    @property
    def num_layers(self) -> int:
        """The static number of layers `L`."""
        return self._num_layers

    def _layer(self, parameters: dict) -> bijector.Bijector:
        """Layer `k`: its slice of the parameters, the stack's other arguments (such as
        Planar's `inverse_iterations`), unchecked (the stack checked them all)."""
        return self._layer_class(**{**self._stack.parameters, **parameters, "validate_args": False})

    def _layer_forward(self, parameters: dict, z):
        """`(x, log|det ∂x/∂z|)` of the layer with these parameters, in one pass if it has one."""
        layer = self._layer(parameters)
        if isinstance(layer, OnePass):
            x, extra = layer._augmented_forward(z)
            return x, -extra["ildj"]
        return layer._forward(z), layer._forward_log_det_jacobian(z)

    def _layer_inverse(self, parameters: dict, x):
        """`(z, log|det ∂z/∂x|)` of the layer with these parameters, in one pass if it has one."""
        layer = self._layer(parameters)
        if isinstance(layer, OnePass):
            z, extra = layer._augmented_inverse(x)
            return z, extra["ildj"]
        return layer._inverse(x), layer._inverse_log_det_jacobian(x)

    def _loop(self, y, inverse: bool):
        """`(result, log-det of the direction)` after all layers, in Chain order."""
        stacked = {
            key: (tf.convert_to_tensor(getattr(self._stack, key)), rank)
            for key, rank in self._ranks.items()
        }
        batch = prefer_static.shape(y)[:-1]
        for value, rank in stacked.values():
            batch = prefer_static.broadcast_shape(batch, prefer_static.shape(value)[: -(rank + 1)])
        y = tf.broadcast_to(y, prefer_static.concat([batch, prefer_static.shape(y)[-1:]], axis=0))
        layers = self._num_layers

        def body(i, y, log_det):
            k = i if inverse else layers - 1 - i
            parameters = {
                key: tf.gather(value, k, axis=-(rank + 1)) for key, (value, rank) in stacked.items()
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

    def _parameter_control_dependencies(self, is_init):
        return self._stack._parameter_control_dependencies(is_init)
