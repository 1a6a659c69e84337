"""Checks shared by the bijector tests."""
import numpy as np
import tensorflow as tf


def fresh(x):
    """A new tensor with the same values, so that TFP's bijector cache cannot answer."""
    return tf.constant(np.asarray(x))


def autodiff_log_det(bijector, z):
    """`log|det ∂forward/∂z|` per batch member from the autodiff Jacobian (events flattened)."""
    n = z.shape[0]
    event_shape = list(z.shape[1:])
    flat = tf.reshape(z, [n, -1])
    with tf.GradientTape() as tape:
        tape.watch(flat)
        x = tf.reshape(bijector.forward(tf.reshape(flat, [n] + event_shape)), [n, -1])
    jacobian = tape.batch_jacobian(x, flat)
    sign, log_abs = tf.linalg.slogdet(jacobian)
    assert np.all(sign.numpy() != 0)
    return log_abs.numpy()
