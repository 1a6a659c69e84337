"""Planar and Radial: round trips, log-dets against autodiff, gradients, XLA, bad input."""
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from flow_checks import fresh
from tfp_flows.bijectors import Planar, Radial

TOLERANCE = {np.float64: 1e-6, np.float32: 1e-4}


def planar(rng, dim, dtype, scale=1.0, **kwargs):
    u = (scale * rng.standard_normal(dim)).astype(dtype)
    w = rng.standard_normal(dim).astype(dtype)
    return Planar(u, w, dtype(rng.standard_normal()), **kwargs)


def radial(rng, dim, dtype):
    alpha = dtype(rng.uniform(0.1, 2.0))
    beta = dtype(-alpha + rng.exponential())
    return Radial(rng.standard_normal(dim).astype(dtype), alpha, beta)


def wide_points(rng, n, dim, dtype, radius=100.0):
    """Points with norms spread over [0, radius]."""
    directions = rng.standard_normal((n, dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return (directions * rng.uniform(0, radius, (n, 1))).astype(dtype)


def relative_error(a, b):
    return np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b)))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), dim=st.integers(1, 6), scale=st.sampled_from([0.1, 1.0, 5.0]))
def test_planar_round_trip_float64(seed, dim, scale):
    rng = np.random.default_rng(seed)
    bijector = planar(rng, dim, np.float64, scale)
    z = wide_points(rng, 200, dim, np.float64)
    z_back = bijector.inverse(fresh(bijector.forward(z))).numpy()
    assert relative_error(z_back, z) < TOLERANCE[np.float64]


@pytest.mark.parametrize("seed", range(5))
def test_planar_round_trip_float32(seed):
    rng = np.random.default_rng(seed)
    bijector = planar(rng, 4, np.float32)
    z = wide_points(rng, 2000, 4, np.float32)
    z_back = bijector.inverse(fresh(bijector.forward(z))).numpy()
    assert relative_error(z_back, z) < TOLERANCE[np.float32]


def test_planar_inverse_converges_for_strong_and_nearly_flat_maps():
    rng = np.random.default_rng(7)
    for u_scale in (1e-3, 50.0):
        bijector = planar(rng, 3, np.float64, u_scale)
        z = wide_points(rng, 500, 3, np.float64)
        z_back = bijector.inverse(fresh(bijector.forward(z))).numpy()
        assert relative_error(z_back, z) < 1e-6


@settings(max_examples=50, deadline=None)
@given(u=st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=3),
       w=st.lists(st.floats(-10, 10), min_size=3, max_size=3).filter(lambda v: np.linalg.norm(v) > 1e-3),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_planar_reparametrisation_makes_every_u_invertible(u, w, dtype):
    w = np.array(w, dtype)
    bijector = Planar(np.array(u, dtype), w, dtype(0.5))
    # The steepest contraction is where wᵀz + b = 0: the log-det must stay finite there.
    z = -0.5 * w / np.dot(w, w) + np.zeros((1, 3), dtype)
    assert np.isfinite(bijector.forward_log_det_jacobian(z, event_ndims=1).numpy()).all()
    np.testing.assert_allclose(np.dot(bijector.u_hat().numpy(), w),
                               np.logaddexp(0.0, np.dot(u, w)) - 1.0,
                               atol=1e-4 * (1 + np.abs(u).max() * np.abs(w).max()))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("make", [planar, radial])
def test_log_det_matches_autodiff_jacobian(make, dtype):
    rng = np.random.default_rng(1)
    bijector = make(rng, 3, dtype)
    z = tf.constant(wide_points(rng, 64, 3, dtype, radius=4.0))
    with tf.GradientTape() as tape:
        tape.watch(z)
        x = bijector.forward(z)
    jacobian = tape.batch_jacobian(x, z).numpy().astype(np.float64)
    _, expected = np.linalg.slogdet(jacobian)
    actual = bijector.forward_log_det_jacobian(z, event_ndims=1).numpy()
    np.testing.assert_allclose(actual, expected, atol=1e-10 if dtype == np.float64 else 1e-4)
    ildj = bijector.inverse_log_det_jacobian(fresh(x), event_ndims=1).numpy()
    np.testing.assert_allclose(ildj, -actual, rtol=1e-6 if dtype == np.float64 else 1e-3,
                               atol=1e-10 if dtype == np.float64 else 1e-4)


@pytest.mark.parametrize("make", [planar, radial])
def test_inverse_jacobian_is_inverse_of_forward_jacobian(make):
    rng = np.random.default_rng(2)
    bijector = make(rng, 3, np.float64)
    z = wide_points(rng, 16, 3, np.float64, radius=3.0)
    x = tf.constant(bijector.forward(z).numpy())
    with tf.GradientTape() as tape:
        tape.watch(x)
        z_back = bijector.inverse(x)
    inverse_jacobian = tape.batch_jacobian(z_back, x).numpy()
    z_t = tf.constant(z)
    with tf.GradientTape() as tape:
        tape.watch(z_t)
        x_again = bijector.forward(z_t)
    forward_jacobian = tape.batch_jacobian(x_again, z_t).numpy()
    np.testing.assert_allclose(inverse_jacobian @ forward_jacobian,
                               np.broadcast_to(np.eye(3), (16, 3, 3)), atol=1e-9)


def test_planar_inverse_parameter_gradient_matches_finite_differences():
    rng = np.random.default_rng(3)
    u0, w0 = rng.standard_normal(3), rng.standard_normal(3)
    x = tf.constant(wide_points(rng, 8, 3, np.float64, radius=3.0))

    def objective(u, w, b):
        return tf.reduce_sum(tf.sin(Planar(u, w, b).inverse(x)))

    u, w, b = tf.Variable(u0), tf.Variable(w0), tf.Variable(0.3, dtype=tf.float64)
    with tf.GradientTape() as tape:
        value = objective(u, w, b)
    grads = tape.gradient(value, [u, w, b])
    step = 1e-6
    for var, grad in zip((u, w, b), grads):
        flat = var.numpy().reshape(-1)
        numeric = []
        for i in range(flat.size):
            plus, minus = flat.copy(), flat.copy()
            plus[i] += step
            minus[i] -= step
            values = []
            for point in (plus, minus):
                params = [tf.constant(point.reshape(var.shape)) if p is var else p for p in (u, w, b)]
                values.append(float(objective(*params)))
            numeric.append((values[0] - values[1]) / (2 * step))
        np.testing.assert_allclose(np.reshape(grad.numpy(), -1), numeric, rtol=1e-5, atol=1e-7)


def test_radial_round_trip_near_the_centre_and_at_the_boundary_beta():
    rng = np.random.default_rng(4)
    center = rng.standard_normal(3)
    bijector = Radial(center, 0.7, -0.7 + 1e-3)
    z = center + wide_points(rng, 1000, 3, np.float64, radius=100.0)
    z = np.concatenate([z, center + wide_points(rng, 100, 3, np.float64, radius=1e-3)])
    z_back = bijector.inverse(fresh(bijector.forward(z))).numpy()
    assert relative_error(z_back, z) < 1e-6


@pytest.mark.parametrize("make", [planar, radial])
def test_xla_matches_eager_for_values_and_gradients(make):
    rng = np.random.default_rng(5)
    bijector = make(rng, 2, np.float32)
    z = tf.constant(wide_points(rng, 32, 2, np.float32, radius=5.0))
    x = tf.constant(bijector.forward(z).numpy())

    def everything(z, x):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([z, x])
            forward = bijector.forward(z)
            inverse = bijector.inverse(x)
            fldj = bijector.forward_log_det_jacobian(z, 1)
            ildj = bijector.inverse_log_det_jacobian(x, 1)
            total = tf.reduce_sum(forward) + tf.reduce_sum(inverse) + tf.reduce_sum(fldj + ildj)
        return forward, inverse, fldj, ildj, tape.gradient(total, z), tape.gradient(total, x)

    eager = everything(z, x)
    compiled = tf.function(everything, jit_compile=True)(z, x)
    for a, b in zip(eager, compiled):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=2e-4, atol=2e-4)


def test_planar_batch_of_parameters_broadcasts_like_separate_bijectors():
    rng = np.random.default_rng(6)
    u, w, b = rng.standard_normal((3, 2)), rng.standard_normal((3, 2)), rng.standard_normal(3)
    batched = Planar(u, w, b)
    z = rng.standard_normal((5, 1, 2))
    x = batched.forward(z).numpy()
    assert x.shape == (5, 3, 2)
    for k in range(3):
        single = Planar(u[k], w[k], b[k])
        np.testing.assert_allclose(x[:, k], single.forward(z[:, 0]).numpy(), atol=1e-12)
    np.testing.assert_allclose(batched.inverse(fresh(x)).numpy(), np.broadcast_to(z, x.shape),
                               atol=1e-10)
    assert batched.experimental_batch_shape().as_list() == [3]


def test_radial_validate_args_names_the_constraint():
    with pytest.raises(tf.errors.InvalidArgumentError, match="alpha"):
        Radial([0.0, 0.0], -1.0, 0.0, validate_args=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match="beta >= -alpha"):
        Radial([0.0, 0.0], 1.0, -2.0, validate_args=True)
    alpha = tf.Variable(1.0)
    bijector = Radial([0.0, 0.0], alpha, 0.5, validate_args=True)
    alpha.assign(-0.5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="alpha"):
        bijector.forward(tf.zeros([1, 2]))


def test_planar_rejects_mismatched_parameters_and_inputs():
    with pytest.raises(ValueError, match="u with 3 and w with 2"):
        Planar(np.zeros(3), np.ones(2), 0.0)
    bijector = Planar(np.zeros(3), np.ones(3), 0.0)
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 3\]; given shape \[4, 2\]"):
        bijector.forward(tf.zeros([4, 2], tf.float64))
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 3\]"):
        bijector.inverse(tf.zeros([4, 5], tf.float64))
    with pytest.raises(tf.errors.InvalidArgumentError, match="`w` must be finite"):
        Planar(np.zeros(3), np.array([np.nan, 1.0, 1.0]), 0.0, validate_args=True)
    with pytest.raises(ValueError, match=r"radial: `z` must have shape \[\.\.\., 3\]"):
        Radial(np.zeros(3), 1.0, 0.0).forward(tf.zeros([4, 2], tf.float64))
