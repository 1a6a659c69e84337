"""NICE / RealNVP coupling bijectors and the `nice` / `realnvp` builders."""
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

from tfp_flows.bijectors import AdditiveCoupling, AffineCoupling, NICERescale
from tfp_flows.bijectors.coupling import max_log_scale
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


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
@pytest.mark.parametrize("scale_type", ["sigmoid", "exp"])
def test_affine_coupling_is_finite_and_consistent_at_large_h(scale_type, dtype):
    """Any finite conditioner output, |h| up to 1e4: finite forward, inverse and log-det,
    the log-det that of the applied (clipped) scale, and the round trip exact wherever
    `z_b · scale` survives being added to the shift."""
    rng = np.random.default_rng(0)
    h = np.concatenate([-np.logspace(-3, 4, 300), [0.0], np.logspace(-3, 4, 300)])
    t = np.where(rng.uniform(size=h.size) < 0.3, 0.0, rng.uniform(-10, 10, h.size))
    z_b = rng.uniform(-10, 10, h.size)
    # The conditioning entries carry (t, h) to the conditioner: x_a = z_a = (t, h).
    bijector = AffineCoupling(lambda a: a, num_masked=2, scale_type=scale_type)
    np_dtype = dtype.as_numpy_dtype
    z = tf.constant(np.stack([t, h, z_b], axis=1), dtype)
    h = h.astype(np_dtype).astype(np.float64)
    x = bijector.forward(z)
    fldj = bijector.forward_log_det_jacobian(z, event_ndims=1).numpy()
    z_back = bijector.inverse(fresh(x)).numpy()
    ildj = bijector.inverse_log_det_jacobian(fresh(x), event_ndims=1).numpy()
    assert np.all(np.isfinite(x.numpy())) and np.all(np.isfinite(z_back)) and np.isfinite(fldj).all()
    bound = max_log_scale(dtype)
    s = np.log(2.0) - np.logaddexp(0.0, -h) if scale_type == "sigmoid" else h
    np.testing.assert_allclose(fldj, np.clip(s, -bound, bound), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ildj, -fldj, rtol=1e-6, atol=1e-6)
    eps = np.finfo(np_dtype).eps
    survived = np.abs(x.numpy()[:, 2] - t.astype(np_dtype)) > 1e3 * eps * np.maximum(np.abs(t), 1.0)
    assert survived.mean() > 0.5
    np.testing.assert_allclose(z_back[survived, 2], z_b[survived], rtol=1e-3)


def test_sigmoid_inverse_is_finite_where_exp_of_minus_log_scale_overflows():
    """h < −88 (float32): exp(−log_scale) alone is inf; the inverse of the finite forward output is not."""
    z = tf.constant([[1.0, 3.0]])
    for h in (-80.0, -88.5, -95.0, -1e3):
        bijector = AffineCoupling(lambda a, h=h: tf.concat([0 * a, h + 0 * a], axis=-1), num_masked=1)
        x = bijector.forward(z)
        z_back = bijector.inverse(fresh(x)).numpy()
        assert np.all(np.isfinite(z_back)), (h, z_back)
        np.testing.assert_allclose(z_back, z.numpy(), rtol=1e-5)


def tfp_pair_cases():
    lam = lambda x, output_units: (tf.sin(x[..., :1]) + 0 * tf.zeros([output_units]),
                                   0.5 * tf.cos(x[..., :1]) + 0 * tf.zeros([output_units]))
    return {"lambda_with_output_units": lam,
            "tuple_lambda": lambda x: (tf.sin(x[..., :1]) * tf.ones([3]), 0.3 * x[..., :1] * tf.ones([3])),
            "real_nvp_default_template": tfb.real_nvp_default_template(hidden_layers=[8])}


@pytest.mark.parametrize("case", ["lambda_with_output_units", "tuple_lambda", "real_nvp_default_template"])
def test_affine_coupling_takes_tfp_pairs_like_real_nvp(case):
    fn = tfp_pair_cases()[case]
    ours = AffineCoupling(fn, num_masked=2, scale_type="sigmoid")  # scale_type does not apply to pairs
    # RealNVP always calls fn(x, output_units); ours also takes a one-argument fn.
    their_fn = (lambda x, output_units: fn(x)) if case == "tuple_lambda" else fn
    theirs = tfb.RealNVP(num_masked=2, shift_and_log_scale_fn=their_fn)
    z = tf.constant(np.random.default_rng(0).normal(size=(32, 5)), tf.float32)
    x = ours.forward(z)  # first call creates the template's variables, shared with RealNVP
    np.testing.assert_allclose(x.numpy(), theirs.forward(z).numpy(), atol=1e-6)
    np.testing.assert_allclose(ours.forward_log_det_jacobian(z, 1).numpy(),
                               theirs.forward_log_det_jacobian(z, 1).numpy(), atol=1e-6)
    np.testing.assert_allclose(ours.inverse(fresh(x)).numpy(), theirs.inverse(fresh(x)).numpy(), atol=1e-6)
    np.testing.assert_allclose(ours.inverse_log_det_jacobian(fresh(x), 1).numpy(),
                               theirs.inverse_log_det_jacobian(fresh(x), 1).numpy(), atol=1e-6)
    np.testing.assert_allclose(ours.inverse(fresh(x)).numpy(), z.numpy(), atol=1e-5)


def test_pair_conditioner_errors_name_what_was_expected():
    with pytest.raises(ValueError, match=r"each of shift and log_scale ending in 3.*given output shape \[1, 2\]"):
        AffineCoupling(lambda a: (tf.zeros([1, 2]), tf.zeros([1, 2])), num_masked=2).forward(tf.zeros([1, 5]))
    with pytest.raises(ValueError, match=r"one tensor or a \(shift, log_scale\) pair; given a tuple of 3"):
        AffineCoupling(lambda a: (a, a, a), num_masked=2).forward(tf.zeros([1, 4]))
    with pytest.raises(ValueError, match=r"must return one tensor; given a tuple of 2"):
        AdditiveCoupling(lambda a: (a, a), num_masked=2).forward(tf.zeros([1, 4]))


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
