"""`GlowNetwork`: the packed coupling network computes Glow's three convolutions."""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from tfp_flows.networks import GlowNetwork


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_packed_network_equals_keras_convolutions_with_the_same_weights(dtype):
    network = GlowNetwork(3, 6, 5, seed=0, dtype=dtype)
    rng = np.random.default_rng(0)
    network.packed.assign(rng.normal(size=network.packed.shape))  # last layer off zero
    kernel1, bias1, kernel2, bias2, kernel3, bias3 = [t.numpy() for t in network.unpack()]
    reference = tf_keras.Sequential([
        tf_keras.Input(shape=(4, 5, 3), dtype=dtype),
        tf_keras.layers.Conv2D(5, 3, padding="same", activation="relu", dtype=dtype),
        tf_keras.layers.Conv2D(5, 1, activation="relu", dtype=dtype),
        tf_keras.layers.Conv2D(6, 3, padding="same", dtype=dtype),
    ])
    reference.set_weights([kernel1, bias1, kernel2[None, None], bias2, kernel3, bias3])
    x = tf.constant(rng.normal(size=[2, 4, 5, 3]), dtype)
    tol = 1e-4 if dtype == tf.float32 else 1e-12
    np.testing.assert_allclose(network(x).numpy(), reference(x).numpy(), rtol=tol, atol=tol)
    compiled = tf.function(network, jit_compile=True)(x)
    np.testing.assert_allclose(compiled.numpy(), reference(x).numpy(), rtol=tol, atol=tol)


def test_starts_at_zero_output_with_one_trainable_variable():
    network = GlowNetwork(2, 4, 8, seed=1)
    x = tf.random.normal([3, 4, 4, 2], seed=2)
    np.testing.assert_array_equal(network(x).numpy(), 0.0)
    assert len(network.trainable_variables) == 1
    kernel1 = network.unpack()[0].numpy()
    assert kernel1.shape == (3, 3, 2, 8) and np.abs(kernel1).max() > 0.0
    limit = np.sqrt(6.0 / (9 * (2 + 8)))  # Glorot-uniform, as Keras' Conv2D
    assert np.abs(kernel1).max() <= limit


def test_rejects_wrong_input_channels_and_bad_sizes():
    with pytest.raises(ValueError, match=r"expected input \[N, H, W, 2\]; given shape \[1, 4, 4, 3\]"):
        GlowNetwork(2, 4, 8)(tf.zeros([1, 4, 4, 3]))
    with pytest.raises(ValueError, match=r"hidden_channels.*positive integer; given 0"):
        GlowNetwork(2, 4, 0)
