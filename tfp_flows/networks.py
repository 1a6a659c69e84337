"""Conditioner networks for coupling layers (tf_keras layers)."""
from __future__ import annotations

import numpy as np
import tensorflow as tf
import tf_keras

from tfp_flows.checks import check_positive_integers

__all__ = ["GlowNetwork"]


class GlowNetwork(tf_keras.layers.Layer):
    """Glow's coupling network `[N, H, W, C_in] -> [N, H, W, C_out]`.

    `h1 = relu(conv3x3(x, K1) + b1)`, `h2 = relu(h1 @ K2 + b2)` (a 1x1 convolution),
    `y = conv3x3(h2, K3) + b3`: 'SAME' padding, biases everywhere, the hidden kernels
    Glorot-uniform, the last kernel and bias zero (so a coupling starts at the
    identity). All six arrays live in one flat variable `packed`, in the order kernel1,
    bias1, kernel2, bias2, kernel3, bias3 (`unpack()` returns them shaped): under XLA
    every variable costs its own optimizer kernels and graph, so one variable per
    network keeps compile time and per-step overhead down.
    """

    def __init__(
        self,
        input_channels: int,
        output_channels: int,
        hidden_channels: int,
        seed: int | None = None,
        dtype=tf.float32,
        name: str = "glow_network",
    ):
        super().__init__(name=name, dtype=dtype)
        check_positive_integers(
            name, input_channels=input_channels, output_channels=output_channels,
            hidden_channels=hidden_channels,
        )
        self.input_channels = int(input_channels)
        self._shapes = [
            (3, 3, self.input_channels, int(hidden_channels)),
            (int(hidden_channels),),
            (int(hidden_channels), int(hidden_channels)),
            (int(hidden_channels),),
            (3, 3, int(hidden_channels), int(output_channels)),
            (int(output_channels),),
        ]
        rng = np.random.default_rng(seed)

        def glorot(shape):
            receptive = int(np.prod(shape[:-2]))
            limit = np.sqrt(6.0 / (receptive * (shape[-2] + shape[-1])))
            return rng.uniform(-limit, limit, size=shape)

        initial = [glorot(self._shapes[0]), np.zeros(self._shapes[1]), glorot(self._shapes[2]),
                   np.zeros(self._shapes[3]), np.zeros(self._shapes[4]), np.zeros(self._shapes[5])]
        values = np.concatenate([a.ravel() for a in initial])
        self.packed = self.add_weight(
            name="packed", shape=values.shape, dtype=self.dtype,
            initializer=tf_keras.initializers.Constant(values), trainable=True,
        )

    def unpack(self) -> list[tf.Tensor]:
        """`[kernel1, bias1, kernel2, bias2, kernel3, bias3]` as shaped tensors."""
        sizes = [int(np.prod(shape)) for shape in self._shapes]
        pieces = tf.split(tf.convert_to_tensor(self.packed), sizes)
        return [tf.reshape(piece, shape) for piece, shape in zip(pieces, self._shapes)]

    def call(self, x: tf.Tensor) -> tf.Tensor:
        given = x.shape[-1]
        if x.shape.rank != 4 or given != self.input_channels:
            raise ValueError(
                f"{self.name}: expected input [N, H, W, {self.input_channels}]; given shape "
                f"{x.shape.as_list()}."
            )
        kernel1, bias1, kernel2, bias2, kernel3, bias3 = self.unpack()
        hidden = tf.nn.relu(tf.nn.conv2d(x, kernel1, strides=1, padding="SAME") + bias1)
        hidden = tf.nn.relu(tf.tensordot(hidden, kernel2, 1) + bias2)
        return tf.nn.conv2d(hidden, kernel3, strides=1, padding="SAME") + bias3
