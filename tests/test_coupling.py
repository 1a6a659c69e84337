"""NICE / RealNVP coupling bijectors and the `nice` / `realnvp` builders."""
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

from tfp_flows.bijectors import AdditiveCoupling, AffineCoupling, NICERescale
from flow_checks import autodiff_log_det, fresh

tfb = tfp.bijectors


def dense_conditioner(num_in, num_out, dtype, seed=0):
    """A fixed random nonlinear map (no Keras), to test with float64 too."""
    rng = np.random.default_rng(seed)
    weights = tf.constant(rng.normal(size=(num_in, num_out)), dtype)
    return lambda a: tf.tanh(a @ weights) * 1.5


def conv_conditioner(channels_in, channels_out, dtype, seed=0):
    rng = np.random.default_rng(seed)
    kernel = tf.constant(0.5 * rng.normal(size=(3, 3, channels_in, channels_out)), dtype)
    return lambda a: tf.nn.conv2d(a, kernel, 1, "SAME")


def make_bijectors(dtype):
    """(bijector, event shape, event_ndims) cases covering every coupling form."""
    rng = np.random.default_rng(3)
    return {
        "additive": (AdditiveCoupling(dense_conditioner(2, 3, dtype), num_masked=2), [5], 1),
        "affine_sigmoid": (AffineCoupling(dense_conditioner(3, 4, dtype), num_masked=3), [5], 1),
        "affine_exp": (
            AffineCoupling(dense_conditioner(2, 6, dtype), num_masked=2, scale_type="exp"),
            [5],
            1,
        ),
        "affine_image": (
            AffineCoupling(conv_conditioner(2, 4, dtype), num_masked=2, event_ndims=3),
            [4, 4, 4],
            3,
        ),
        "additive_image": (
            AdditiveCoupling(conv_conditioner(1, 3, dtype), num_masked=1, event_ndims=3),
            [4, 2, 4],
            3,
        ),
        "rescale": (NICERescale(tf.constant(rng.normal(size=5), dtype)), [5], 1),
    }


CASES = list(make_bijectors(tf.float32))


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
@pytest.mark.parametrize("case", CASES)
def test_round_trip_and_log_det(case, dtype):
    bijector, event_shape, event_ndims = make_bijectors(dtype)[case]
    tol = 1e-4 if dtype == tf.float32 else 1e-10
    z = tf.constant(np.random.default_rng(1).normal(size=[6] + event_shape), dtype)
    x = bijector.forward(z)
    assert x.dtype == dtype
    np.testing.assert_allclose(bijector.inverse(fresh(x)).numpy(), z.numpy(), atol=tol)
    fldj = bijector.forward_log_det_jacobian(z, event_ndims=event_ndims).numpy()
    fldj = np.broadcast_to(fldj, [6])
    np.testing.assert_allclose(fldj, autodiff_log_det(bijector, z), atol=10 * tol)
    ildj = bijector.inverse_log_det_jacobian(fresh(x), event_ndims=event_ndims).numpy()
    np.testing.assert_allclose(np.broadcast_to(ildj, [6]), -fldj, atol=10 * tol)


@pytest.mark.parametrize("case", CASES)
def test_compiles_with_xla(case):
    bijector, event_shape, event_ndims = make_bijectors(tf.float32)[case]
    x = tf.constant(np.random.default_rng(2).normal(size=[3] + event_shape), tf.float32)

    def run(x):
        return (
            bijector.inverse(x),
            bijector.inverse_log_det_jacobian(x, event_ndims=event_ndims),
            bijector.forward(x),
        )

    compiled = tf.function(run, jit_compile=True)(x)
    for got, want in zip(compiled, run(fresh(x))):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


def test_sigmoid_scale_is_bounded_where_exp_overflows():
    huge = lambda a: tf.concat([tf.zeros_like(a), 1e3 * tf.ones_like(a)], axis=-1)
    z = tf.ones([2, 4])
    bounded = AffineCoupling(huge, num_masked=2)
    unbounded = AffineCoupling(huge, num_masked=2, scale_type="exp")
    np.testing.assert_allclose(
        bounded.forward_log_det_jacobian(z, event_ndims=1).numpy(), 2 * np.log(2.0), rtol=1e-6
    )
    assert np.all(np.isfinite(bounded.forward(z).numpy()))
    assert np.all(np.isinf(unbounded.forward(z).numpy()[:, 2:]))


def test_keras_conditioner_is_tracked_and_zero_init_is_identity():
    network = tf_keras.Sequential(
        [
            tf_keras.Input(shape=(2,)),
            tf_keras.layers.Dense(8, activation="relu"),
            tf_keras.layers.Dense(4, kernel_initializer="zeros"),
        ]
    )
    bijector = AffineCoupling(network, num_masked=2)
    chain = tfb.Chain([bijector])
    tracked = {id(v) for v in chain.trainable_variables}
    assert tracked == {id(v) for v in network.trainable_variables} and len(tracked) == 4
    z = tf.random.normal([5, 4], seed=1)
    np.testing.assert_allclose(bijector.forward(z).numpy(), z.numpy(), atol=1e-7)
    np.testing.assert_allclose(bijector.forward_log_det_jacobian(z, event_ndims=1), 0.0)


def test_conditioner_sees_any_batch_shape():
    bijector = AffineCoupling(dense_conditioner(2, 4, tf.float32), num_masked=2)
    z = tf.random.normal([3, 2, 4], seed=2)
    x = bijector.forward(z)
    assert x.shape == [3, 2, 4]
    np.testing.assert_allclose(bijector.forward(z[1]).numpy(), x[1].numpy(), atol=1e-6)
    assert bijector.forward(z[0, 0]).shape == [4]


def test_bad_arguments_name_expected_and_given():
    fn = dense_conditioner(2, 4, tf.float32)
    with pytest.raises(ValueError, match=r"num_masked.*positive.*given 0"):
        AffineCoupling(fn, num_masked=0)
    with pytest.raises(ValueError, match=r"scale_type.*given 'relu'"):
        AffineCoupling(fn, num_masked=2, scale_type="relu")
    with pytest.raises(ValueError, match=r"event_ndims.*given 2"):
        AdditiveCoupling(fn, num_masked=2, event_ndims=2)
    with pytest.raises(TypeError, match=r"callable.*given int"):
        AdditiveCoupling(3, num_masked=1)
    with pytest.raises(ValueError, match=r"smaller than the last event axis \(size 2\).*given num_masked=2"):
        AffineCoupling(fn, num_masked=2).forward(tf.zeros([1, 2]))
    with pytest.raises(ValueError, match=r"ending in 6.*given output shape \[1, 4\]"):
        AffineCoupling(fn, num_masked=2).forward(tf.zeros([1, 5]))
    with pytest.raises(TypeError, match=r"dtype float64.*given float32"):
        AffineCoupling(lambda a: tf.zeros([1, 4]), num_masked=2).forward(tf.zeros([1, 4], tf.float64))
    with pytest.raises(ValueError, match=r"log_scale.*rank >= 1.*given shape \[\]"):
        NICERescale(0.5)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"log_scale.*finite"):
        NICERescale([0.0, np.inf], validate_args=True)


@pytest.mark.parametrize("builder", ["nice", "realnvp"])
@pytest.mark.parametrize("event_size", [2, 5])
def test_vector_builders_are_exact_bijections(builder, event_size):
    from tfp_flows import flows

    build = getattr(flows, builder)
    flow = build(event_size, num_couplings=3, hidden_units=[8], seed=0, dtype=tf.float64)
    rng = np.random.default_rng(0)
    for variable in flow.trainable_variables:  # leave the identity start
        variable.assign_add(0.3 * rng.normal(size=variable.shape))
    z = tf.constant(rng.normal(size=[4, event_size]))
    x = flow.forward(z)
    np.testing.assert_allclose(flow.inverse(fresh(x)).numpy(), z.numpy(), atol=1e-10)
    fldj = np.broadcast_to(flow.forward_log_det_jacobian(z, event_ndims=1).numpy(), [4])
    np.testing.assert_allclose(fldj, autodiff_log_det(flow, z), atol=1e-10)
    np.testing.assert_allclose(
        np.broadcast_to(flow.inverse_log_det_jacobian(fresh(x), event_ndims=1).numpy(), [4]), -fldj, atol=1e-10
    )


def test_vector_builders_alternate_halves():
    """After two couplings every output depends on more than one input (none passed through)."""
    from tfp_flows.flows import nice

    flow = nice(6, num_couplings=2, hidden_units=[8], seed=1)
    for variable in flow.trainable_variables:
        variable.assign(tf.random.normal(variable.shape, seed=2))
    z = tf.random.normal([1, 6], seed=3)
    with tf.GradientTape() as tape:
        tape.watch(z)
        x = flow.forward(z)
    jacobian = tape.batch_jacobian(x, z).numpy()[0]
    assert np.all((np.abs(jacobian) > 1e-6).sum(axis=1) >= 2), jacobian


@pytest.mark.parametrize("builder", ["nice", "realnvp"])
def test_vector_builders_train_with_fit_under_xla(builder):
    from tfp_flows import FlowModel, flows
    from tfp_flows.datasets import toy

    data = toy("moons", 1024, seed=0)
    flow = getattr(flows, builder)(2, num_couplings=4, hidden_units=[32, 32], seed=0)
    model = FlowModel(flow, event_shape=[2])
    assert len(model.trainable_variables) == len(model.bijector.trainable_variables) > 0
    model.compile(learning_rate=5e-3, jit_compile=True)
    history = model.fit(data, epochs=15, batch_size=64, verbose=0).history["nll"]
    assert np.all(np.isfinite(history))
    gaussian_nll = -tfp.distributions.MultivariateNormalTriL(
        data.mean(0), np.linalg.cholesky(np.cov(data.T)).astype(np.float32)
    ).log_prob(data).numpy().mean()
    # better than the best Gaussian fit (3.29 nats): the couplings learned the moons' shape
    assert history[-1] < gaussian_nll - 0.15, (history, gaussian_nll)


def test_vector_builders_reject_bad_sizes():
    from tfp_flows.flows import nice, realnvp

    with pytest.raises(ValueError, match=r"event_size.*>= 2.*given 1"):
        nice(1, num_couplings=2)
    with pytest.raises(ValueError, match=r"num_couplings.*positive integer; given 0"):
        realnvp(4, num_couplings=0)
