"""Packed networks (MLP, MADE, ConvNet): their math, their initial values, their checks."""
import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from tfp_flows.networks import ACTIVATIONS, MADE, MLP, ConvNet

DTYPES = [tf.float32, tf.float64]


def tolerance(dtype):
    return 1e-5 if dtype == tf.float32 else 1e-12


def random_packed(network, dtype, seed=0, scale=0.5):
    """Parameters off their (partly zero) initial values, so every path carries signal."""
    return tf.constant(np.random.default_rng(seed).normal(scale=scale, size=network.size), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp_equals_numpy_layers_with_context_joined_and_batch_axes(dtype):
    network = MLP(3, 4, [5, 6], context_size=2, activation="tanh")
    packed = random_packed(network, dtype)
    rng = np.random.default_rng(1)
    x, context = rng.normal(size=[2, 3, 3]), rng.normal(size=[2, 3, 2])
    p = {k: v.numpy() for k, v in network.unpack(packed).items()}
    h = np.tanh(np.concatenate([x, context], -1) @ p["kernel_1"] + p["bias_1"])
    h = np.tanh(h @ p["kernel_2"] + p["bias_2"])
    expected = h @ p["kernel_out"] + p["bias_out"]
    got = network(packed, tf.constant(x, dtype), tf.constant(context, dtype))
    assert got.dtype == dtype and got.shape == (2, 3, 4)
    np.testing.assert_allclose(got.numpy(), expected, rtol=tolerance(dtype), atol=tolerance(dtype))
    compiled = tf.function(network, jit_compile=True)(packed, tf.constant(x, dtype), tf.constant(context, dtype))
    np.testing.assert_allclose(compiled.numpy(), expected, rtol=tolerance(dtype), atol=tolerance(dtype))


def test_mlp_initial_values_glorot_hidden_zero_last_layer_output_bias():
    network = MLP(3, 2, [50], context_size=4)
    assert network.size == (3 + 4) * 50 + 50 + 50 * 2 + 2
    values = network.initial(np.random.default_rng(0), output_bias=np.array([0.5, -1.0]))
    assert values.dtype == np.float64 and values.shape == (network.size,)
    p = {k: v.numpy() for k, v in network.unpack(values).items()}
    limit = np.sqrt(6.0 / (7 + 50))
    assert 0.9 * limit < np.abs(p["kernel_1"]).max() <= limit
    assert np.all(p["bias_1"] == 0) and np.all(p["kernel_out"] == 0)
    x = tf.random.normal([6, 3], dtype=tf.float64, seed=1)
    context = tf.random.normal([6, 4], dtype=tf.float64, seed=2)
    np.testing.assert_array_equal(network(values, x, context).numpy(), np.tile([0.5, -1.0], [6, 1]))
    with pytest.raises(ValueError, match=r"output_bias.*shape \[2\].*given shape \[3\]"):
        network.initial(np.random.default_rng(0), output_bias=np.zeros(3))


def test_every_activation_runs_and_differs_from_the_others():
    outputs = {}
    for name in ACTIVATIONS:
        network = MLP(2, 1, [4], activation=name)
        packed = random_packed(network, tf.float64)
        outputs[name] = network(packed, tf.constant([[0.3, -1.2]], tf.float64)).numpy()
    values = np.concatenate(list(outputs.values())).ravel()
    assert np.all(np.isfinite(values)) and len(np.unique(values)) == len(ACTIVATIONS)


def made_jacobians(network, packed, x, context=None):
    """Per-example Jacobians of shift and log_scale w.r.t. x, `[N, D, D]` each."""
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        shift, log_scale = network(packed, x, context)
    return tape.batch_jacobian(shift, x).numpy(), tape.batch_jacobian(log_scale, x).numpy()


@pytest.mark.parametrize("context_size", [None, 3])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_made_is_autoregressive_for_random_parameters(context_size, activation):
    d = 5
    network = MADE(d, [16, 16], context_size=context_size, activation=activation)
    packed = random_packed(network, tf.float64, seed=3)
    x = tf.constant(np.random.default_rng(4).normal(size=[8, d]))
    context = None if context_size is None else tf.constant(np.random.default_rng(5).normal(size=[8, 3]))
    for jacobian in made_jacobians(network, packed, x, context):
        # Output i never sees x_j for j >= i ...
        np.testing.assert_array_equal(np.triu(jacobian), 0.0)
        # ... and does see every x_j, j < i (in some batch member: ReLUs may be off at one point).
        reached = np.abs(jacobian).max(axis=0) > 0
        np.testing.assert_array_equal(reached, np.tril(np.ones([d, d], bool), -1))


def test_made_context_reaches_every_output_through_the_nonlinearity():
    network = MADE(4, [8, 8], context_size=2, activation="tanh")
    packed = random_packed(network, tf.float64, seed=6)
    x = tf.constant(np.random.default_rng(7).normal(size=[3, 4]))
    context = tf.constant(np.random.default_rng(8).normal(size=[3, 2]))
    with tf.GradientTape(persistent=True) as outer:
        outer.watch(context)
        with tf.GradientTape(persistent=True) as inner:
            inner.watch(context)
            shift, log_scale = network(packed, x, context)
        first = inner.batch_jacobian(shift, context)  # [3, 4, 2]
        first_sum = tf.reduce_sum(first)
    # Every output, output 1 (which sees no x) included, moves with the context ...
    assert np.all(np.abs(first.numpy()).max(axis=(0, 2)) > 1e-6)
    # ... and not linearly: the second derivative w.r.t. the context is not zero.
    second = outer.gradient(first_sum, context).numpy()
    assert np.abs(second).max() > 1e-6


def test_made_starts_at_the_identity_and_bounds_the_log_scale():
    network = MADE(3, [4], log_scale_bound=2.0)
    x = tf.random.normal([5, 3], seed=1)
    shift, log_scale = network(network.initial(np.random.default_rng(0)).astype(np.float32), x)
    np.testing.assert_array_equal(shift.numpy(), 0.0)
    np.testing.assert_array_equal(log_scale.numpy(), 0.0)
    huge = random_packed(network, tf.float64, scale=1e3)
    _, log_scale = network(huge, tf.cast(x, tf.float64))
    assert np.abs(log_scale.numpy()).max() <= 2.0 and np.abs(log_scale.numpy()).max() > 1.9


@pytest.mark.parametrize("dtype", DTYPES)
def test_made_equals_numpy_masked_layers(dtype):
    network = MADE(3, [6], context_size=2, activation="relu", log_scale_bound=3.0)
    packed = random_packed(network, dtype, seed=9)
    rng = np.random.default_rng(10)
    x, context = rng.normal(size=[2, 4, 3]), rng.normal(size=[2, 4, 2])
    p = {k: v.numpy().astype(np.float64) for k, v in network.unpack(packed).items()}
    h = np.maximum(x @ (p["kernel_1"] * network.masks[0]) + context @ p["context_kernel_1"] + p["bias_1"], 0)
    out = h @ (p["kernel_out"] * network.masks[1]) + p["bias_out"]
    shift, log_scale = tf.function(network, jit_compile=True)(
        packed, tf.constant(x, dtype), tf.constant(context, dtype))
    tol = 1e-5 if dtype == tf.float32 else 1e-12
    np.testing.assert_allclose(shift.numpy(), out[..., :3], rtol=tol, atol=tol)
    np.testing.assert_allclose(log_scale.numpy(), 3.0 * np.tanh(out[..., 3:] / 3.0), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("context_size", [None, 2])
def test_convnet_equals_keras_convolutions_with_the_same_weights(dtype, context_size):
    network = ConvNet(3, 6, 5, context_size=context_size)
    packed = random_packed(network, dtype)
    p = {k: v.numpy() for k, v in network.unpack(packed).items()}
    k = context_size or 0
    reference = tf_keras.Sequential([
        tf_keras.Input(shape=(4, 5, 3 + k), dtype=dtype),
        tf_keras.layers.Conv2D(5, 3, padding="same", activation="relu", dtype=dtype),
        tf_keras.layers.Conv2D(5, 1, activation="relu", dtype=dtype),
        tf_keras.layers.Conv2D(6, 3, padding="same", dtype=dtype),
    ])
    reference.set_weights([p["kernel_1"], p["bias_1"], p["kernel_2"][None, None], p["bias_2"],
                           p["kernel_3"], p["bias_3"]])
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=[2, 3, 4, 5, 3]), dtype)  # two batch axes
    context = None if k == 0 else tf.constant(rng.normal(size=[2, 3, k]), dtype)
    joined = tf.reshape(x, [6, 4, 5, 3])
    if k:
        joined = tf.concat([joined, tf.tile(tf.reshape(context, [6, 1, 1, k]), [1, 4, 5, 1])], -1)
    expected = tf.reshape(reference(joined), [2, 3, 4, 5, 6]).numpy()
    tol = 1e-4 if dtype == tf.float32 else 1e-12
    np.testing.assert_allclose(network(packed, x, context).numpy(), expected, rtol=tol, atol=tol)
    compiled = tf.function(network, jit_compile=True)(packed, x, context)
    np.testing.assert_allclose(compiled.numpy(), expected, rtol=tol, atol=tol)


def test_convnet_starts_at_zero_output_with_glorot_hidden_kernels():
    network = ConvNet(2, 4, 8, context_size=3)
    values = network.initial(np.random.default_rng(1))
    p = {k: v.numpy() for k, v in network.unpack(values).items()}
    limit = np.sqrt(6.0 / (9 * (2 + 3 + 8)))  # Glorot-uniform, as Keras' Conv2D
    assert 0.9 * limit < np.abs(p["kernel_1"]).max() <= limit
    assert np.all(p["kernel_3"] == 0) and np.all(p["bias_3"] == 0)
    out = network(values.astype(np.float32), tf.random.normal([3, 4, 4, 2]), tf.random.normal([3, 3]))
    np.testing.assert_array_equal(out.numpy(), 0.0)


def test_packed_may_be_a_tf_or_keras3_variable_and_gradients_reach_it():
    network = MADE(3, [4], context_size=1)
    x, context = tf.random.normal([5, 3], seed=1), tf.random.normal([5, 1], seed=2)
    values = np.random.default_rng(0).normal(size=network.size).astype(np.float32)
    tf_variable, keras_variable = tf.Variable(values), keras.Variable(values)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(network(tf_variable, x, context)[1])
    gradient = tape.gradient(loss, tf_variable)
    assert gradient.shape == (network.size,) and np.abs(gradient.numpy()).max() > 0
    np.testing.assert_array_equal(network(keras_variable, x, context)[1].numpy(),
                                  network(tf_variable, x, context)[1].numpy())


def test_constructor_arguments_are_checked():
    with pytest.raises(ValueError, match=r"activation.*one of \['elu', 'gelu'.*given 'swish'"):
        MLP(2, 2, [4], activation="swish")
    with pytest.raises(ValueError, match=r"num_outputs.*positive integer; given 0"):
        MLP(2, 0, [4])
    with pytest.raises(ValueError, match=r"hidden_units\[1\].*positive integer; given -3"):
        MADE(2, [4, -3])
    with pytest.raises(TypeError, match=r"hidden_units.*sequence.*given 64"):
        MADE(2, 64)
    with pytest.raises(ValueError, match=r"at least 4 units.*given hidden_units=\[8, 3\]"):
        MADE(5, [8, 3])
    with pytest.raises(ValueError, match=r"at least 5 units.*with a context"):
        MADE(5, [4], context_size=2)
    with pytest.raises(ValueError, match=r"log_scale_bound.*finite positive.*given 0"):
        MADE(2, [4], log_scale_bound=0)
    with pytest.raises(ValueError, match=r"context_size.*positive integer; given 0"):
        ConvNet(2, 2, 4, context_size=0)


def test_call_arguments_are_checked():
    made = MADE(3, [4], context_size=2)
    packed = tf.zeros([made.size])
    x, context = tf.zeros([5, 3]), tf.zeros([5, 2])
    with pytest.raises(ValueError, match=r"packed.*shape \[%d\].*given shape \[7\]" % made.size):
        made(tf.zeros([7]), x, context)
    with pytest.raises(ValueError, match=r"expected `x` of shape \[\.\.\., 3\]; given shape \[5, 4\]"):
        made(packed, tf.zeros([5, 4]), context)
    with pytest.raises(ValueError, match=r"expected a `context` of shape \[\.\.\., 2\], given None"):
        made(packed, x)
    with pytest.raises(ValueError, match=r"expected `context` of shape \[5, 2\].*given shape \[4, 2\]"):
        made(packed, x, tf.zeros([4, 2]))
    with pytest.raises(TypeError, match=r"`x` must have the parameters' dtype float32; given float64"):
        made(packed, tf.zeros([5, 3], tf.float64), context)
    with pytest.raises(ValueError, match=r"built without a context"):
        MLP(3, 1, [4])(tf.zeros([MLP(3, 1, [4]).size]), x, context)
    conv = ConvNet(2, 2, 4)
    with pytest.raises(ValueError, match=r"expected `x` of shape \[\.\.\., H, W, 2\]; given shape \[1, 4, 4, 3\]"):
        conv(tf.zeros([conv.size]), tf.zeros([1, 4, 4, 3]))
