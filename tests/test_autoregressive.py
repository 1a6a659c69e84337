"""MaskedAutoregressiveAffine: exact inverse, log-dets, one network pass for log_prob, context."""
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from flow_checks import autodiff_log_det, fresh
from tfp_flows.bijectors.autoregressive import MaskedAutoregressiveAffine
from tfp_flows.networks import MADE

tfb, tfd = tfp.bijectors, tfp.distributions
DTYPES = [tf.float32, tf.float64]


def made_layer(d, dtype, seed=0, context_size=None, scale=0.3):
    made = MADE(d, [12, 12], context_size=context_size, activation="tanh")
    packed = tf.constant(np.random.default_rng(seed).normal(scale=scale, size=made.size), dtype)
    calls = []

    def fn(x, conditional_input=None):
        calls.append(1)
        return made(packed, x, conditional_input)

    return MaskedAutoregressiveAffine(fn, d), calls


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_and_log_det_equal_autodiff_slogdet(dtype):
    bijector, _ = made_layer(4, dtype)
    z = tf.constant(np.random.default_rng(1).normal(size=[6, 4]) * 2.0, dtype)
    x = bijector.forward(z)
    tol = 1e-5 if dtype == tf.float32 else 1e-12
    np.testing.assert_allclose(bijector.inverse(fresh(x)).numpy(), z.numpy(), rtol=tol, atol=tol)
    z2 = fresh(np.random.default_rng(2).normal(size=[6, 4]))
    z2 = tf.cast(z2, dtype)
    np.testing.assert_allclose(bijector.forward(fresh(bijector.inverse(z2))).numpy(), z2.numpy(),
                               rtol=tol, atol=tol)
    fldj = bijector.forward_log_det_jacobian(fresh(z), event_ndims=1).numpy()
    np.testing.assert_allclose(fldj, autodiff_log_det(bijector, fresh(z)), rtol=tol, atol=tol)
    ildj = bijector.inverse_log_det_jacobian(fresh(x), event_ndims=1).numpy()
    np.testing.assert_allclose(ildj, -fldj, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_under_xla_forward_inverse_and_log_prob_agree_with_eager(dtype):
    bijector, _ = made_layer(3, dtype, seed=3)
    base = tfd.MultivariateNormalDiag(tf.zeros(3, dtype))
    distribution = tfd.TransformedDistribution(base, bijector)
    z = tf.constant(np.random.default_rng(4).normal(size=[5, 3]), dtype)

    @tf.function(jit_compile=True)
    def compiled(z):
        x = bijector.forward(z)
        return x, bijector.inverse(tf.identity(x)), distribution.log_prob(x)

    x, back, log_prob = compiled(z)
    tol = 1e-5 if dtype == tf.float32 else 1e-12
    np.testing.assert_allclose(back.numpy(), z.numpy(), rtol=tol, atol=tol)
    expected = base.log_prob(z).numpy() - bijector.forward_log_det_jacobian(fresh(z), 1).numpy()
    np.testing.assert_allclose(log_prob.numpy(), expected, rtol=tol, atol=tol)


def test_log_prob_runs_the_network_once_and_forward_event_size_times():
    bijector, calls = made_layer(5, tf.float64)
    distribution = tfd.TransformedDistribution(tfd.MultivariateNormalDiag(tf.zeros(5, tf.float64)), bijector)
    distribution.log_prob(tf.zeros([2, 5], tf.float64))
    assert len(calls) == 1
    calls.clear()
    bijector.forward(tf.zeros([2, 5], tf.float64))  # eager: the while loop runs in Python
    assert len(calls) == 5
    second, more_calls = made_layer(5, tf.float64, seed=1)
    chain = tfb.Chain([bijector, tfb.Permute([4, 3, 2, 1, 0]), second])
    calls.clear()
    tfd.TransformedDistribution(distribution.distribution, chain).log_prob(tf.zeros([2, 5], tf.float64))
    assert len(calls) == len(more_calls) == 1


def test_density_of_a_two_layer_flow_integrates_to_one():
    first, _ = made_layer(2, tf.float64, seed=5)
    second, _ = made_layer(2, tf.float64, seed=6)
    flow = tfb.Chain([first, tfb.Permute([1, 0]), second])
    distribution = tfd.TransformedDistribution(tfd.MultivariateNormalDiag(tf.zeros(2, tf.float64)), flow)
    grid = np.linspace(-12.0, 12.0, 481)
    points = np.stack(np.meshgrid(grid, grid), -1).reshape(-1, 2)
    density = np.exp(distribution.log_prob(points).numpy())
    mass = density.sum() * (grid[1] - grid[0]) ** 2
    assert abs(mass - 1.0) < 2e-3


def test_context_is_passed_through_and_changes_the_map():
    bijector, _ = made_layer(3, tf.float64, seed=7, context_size=2)
    z = tf.constant(np.random.default_rng(8).normal(size=[4, 3]))
    context = tf.constant(np.random.default_rng(9).normal(size=[4, 2]))
    x = bijector.forward(z, conditional_input=context)
    back = bijector.inverse(fresh(x), conditional_input=context)
    np.testing.assert_allclose(back.numpy(), z.numpy(), rtol=1e-12, atol=1e-12)
    other = bijector.forward(fresh(z), conditional_input=context + 1.0)
    assert np.abs(other.numpy() - x.numpy()).min(axis=0)[0] > 1e-6  # even the first entry moves


def test_training_under_xla_lowers_the_nll():
    d = 3
    made = MADE(d, [16])
    packed = tf.Variable(made.initial(np.random.default_rng(0)).astype(np.float32))
    bijector = MaskedAutoregressiveAffine(lambda x: made(packed, x), d)
    distribution = tfd.TransformedDistribution(tfd.MultivariateNormalDiag(tf.zeros(d)), bijector)
    rng = np.random.default_rng(1)
    a = rng.normal(size=[256, d]).astype(np.float32)
    data = tf.constant(np.stack([a[:, 0], a[:, 0] ** 2 + 0.3 * a[:, 1], a[:, 2] + a[:, 0]], -1))
    @tf.function(jit_compile=True)
    def step():
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(distribution.log_prob(data))
        packed.assign_sub(0.05 * tape.gradient(loss, packed))
        return loss

    losses = [float(step()) for _ in range(60)]
    assert losses[-1] < losses[0] - 0.3, losses[::10]


def test_arguments_are_checked():
    with pytest.raises(TypeError, match=r"shift_and_log_scale_fn.*callable.*given int"):
        MaskedAutoregressiveAffine(3, 2)
    with pytest.raises(ValueError, match=r"event_size.*positive integer; given 0"):
        MaskedAutoregressiveAffine(lambda x: (x, x), 0)
    bijector = MaskedAutoregressiveAffine(lambda x: (x, x), 2)
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 2\]; given shape \[4, 3\]"):
        bijector.inverse(tf.zeros([4, 3]))
    bad_dtype = MaskedAutoregressiveAffine(lambda x: (x, tf.cast(x, tf.float64)), 2)
    with pytest.raises(TypeError, match=r"log_scale of dtype float32.*given float64"):
        bad_dtype.inverse(tf.zeros([4, 2]))
    bad_shape = MaskedAutoregressiveAffine(lambda x: (x[..., :1], x), 2)
    with pytest.raises(ValueError, match=r"shift of shape \[\.\.\., 2\]; given shape \[4, 1\]"):
        bad_shape.inverse(tf.zeros([4, 2]))


def test_gradient_through_the_sequential_forward_under_xla_equals_finite_differences():
    made = MADE(3, [6], activation="tanh")
    packed = tf.Variable(np.random.default_rng(10).normal(scale=0.3, size=made.size))
    bijector = MaskedAutoregressiveAffine(lambda x: made(packed, x), 3)
    z = tf.constant(np.random.default_rng(11).normal(size=[4, 3]))

    def objective():
        x = bijector.forward(z)
        return tf.reduce_sum(tf.sin(x)) + tf.reduce_sum(bijector.forward_log_det_jacobian(z, 1))

    @tf.function(jit_compile=True)
    def value_and_gradient():
        with tf.GradientTape() as tape:
            value = objective()
        return value, tape.gradient(value, packed)

    _, gradient = value_and_gradient()
    direction = np.random.default_rng(12).normal(size=made.size)
    start, eps = packed.numpy(), 1e-6
    values = []
    for sign in (1.0, -1.0):
        packed.assign(start + sign * eps * direction)
        values.append(float(objective()))
    packed.assign(start)
    np.testing.assert_allclose(gradient.numpy() @ direction, (values[0] - values[1]) / (2 * eps), rtol=1e-6)
