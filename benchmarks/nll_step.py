"""The plain training step the speed benchmarks time: Adam on the mean negative log-likelihood."""
from __future__ import annotations

import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras


def nll_adam_step(
    distribution: tfp.distributions.Distribution, variables, learning_rate: float, jit_compile: bool
):
    """A `tf.function` `step(x)`: one Adam update of `variables` on `-mean log_prob(x)`; returns the loss."""
    optimizer = tf_keras.optimizers.Adam(learning_rate)

    @tf.function(jit_compile=jit_compile)
    def step(x):
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(distribution.log_prob(x))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    return step
