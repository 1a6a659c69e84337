"""Tests for dual ascent: the 1-D map, the rotation, the stacked flow, and the fitter."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_flows import FlowModel, datasets
from tfp_flows.bijectors import DualAscentFlow, DualAscentMap, Rotation
from tfp_flows.bijectors.dual_ascent import map_forward
from tfp_flows.dual_ascent import (
    _largest_eigenvalue_3x3,
    auto_eps,
    _solve_symmetric_3x3,
    fit,
    newton_step,
    static_batches,
    trainable_bijector,
)
from tfp_flows.export import export_distribution

tfb = tfp.bijectors


def fresh(value, dtype=None):
    """A new tensor with the same value (bypasses the bijector caches)."""
    return tf.constant(np.asarray(value), dtype=dtype)


# Map parameters spanning the valid set, near its edges included.
MAP_PARAMS = [
    dict(sigma=0.0, shift=0.0, gamma=0.0, center=0.0, eps=0.1),  # identity
    dict(sigma=0.3, shift=-1.5, gamma=0.99, center=2.0, eps=1e-3),
    dict(sigma=-2.0, shift=4.0, gamma=-0.99, center=-7.0, eps=0.05),
    dict(sigma=0.999, shift=0.2, gamma=0.5, center=0.1, eps=3.0),
]


@pytest.mark.parametrize("params", MAP_PARAMS)
def test_map_round_trip_float64_to_1e9_up_to_1e3(params):
    bijector = DualAscentMap(**{k: np.float64(v) for k, v in params.items()}, validate_args=True)
    x = np.concatenate([np.linspace(-1e3, 1e3, 20001), np.linspace(-10, 10, 20001)])
    y = bijector.forward(fresh(x)).numpy()
    np.testing.assert_allclose(bijector.inverse(fresh(y)).numpy(), x, rtol=0, atol=1e-9)
    z = bijector.inverse(fresh(x)).numpy()
    np.testing.assert_allclose(bijector.forward(fresh(z)).numpy(), x, rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("params", MAP_PARAMS)
def test_map_log_det_matches_autodiff_and_is_monotone(params, dtype):
    bijector = DualAscentMap(**{k: dtype(v) for k, v in params.items()})
    x = fresh(np.linspace(-20, 20, 4001).astype(dtype))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = bijector.forward(x)
    derivative = tape.gradient(y, x).numpy()
    assert np.all(derivative > 0)
    assert np.all(np.diff(y.numpy()) >= 0) and y.dtype == dtype
    fldj = bijector.forward_log_det_jacobian(fresh(x), event_ndims=0).numpy()
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(fldj, np.log(derivative), atol=tol)
    ildj = bijector.inverse_log_det_jacobian(fresh(y), event_ndims=0).numpy()
    np.testing.assert_allclose(ildj, -fldj, atol=10 * tol)


def test_map_parameters_broadcast_over_last_axis():
    sigma, gamma = np.array([0.1, -0.2, 0.4]), np.array([0.5, -0.5, 0.0])
    bijector = DualAscentMap(sigma, np.zeros(3), gamma, np.array([0.0, 1.0, 2.0]), 0.2)
    x = np.random.default_rng(0).normal(size=(5, 3))
    y = bijector.forward(fresh(x)).numpy()
    for k in range(3):
        single = DualAscentMap(sigma[k], 0.0, gamma[k], float(k), 0.2)
        np.testing.assert_allclose(y[:, k], single.forward(fresh(x[:, k])).numpy(), atol=1e-12)


@pytest.mark.parametrize(
    "override, message",
    [(dict(sigma=1.0), "`sigma` must be < 1"), (dict(gamma=-1.2), "`gamma` must satisfy"),
     (dict(eps=0.0), "`eps` must be > 0")],
)
def test_map_validate_args_names_the_parameter(override, message):
    params = dict(sigma=0.1, shift=0.0, gamma=0.3, center=0.0, eps=0.1)
    params.update(override)
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        DualAscentMap(**params, validate_args=True)


def test_map_validate_args_checks_variables_at_use():
    gamma = tf.Variable(0.5)
    bijector = DualAscentMap(0.0, 0.0, gamma, 0.0, 0.1, validate_args=True)
    bijector.forward(tf.constant([1.0]))
    gamma.assign(1.5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="`gamma`"):
        bijector.forward(tf.constant([1.0]))


def random_orthogonal(rng, dim):
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    return q * np.sign(np.diag(r))


def test_rotation_is_orthogonal_with_zero_log_det():
    rng = np.random.default_rng(1)
    matrix = random_orthogonal(rng, 5)
    bijector = Rotation(matrix, validate_args=True)
    x = rng.normal(size=(7, 5))
    y = bijector.forward(fresh(x)).numpy()
    np.testing.assert_allclose(y, x @ matrix.T, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), atol=1e-12)
    np.testing.assert_allclose(bijector.inverse(fresh(y)).numpy(), x, atol=1e-12)
    assert bijector.is_constant_jacobian
    assert np.all(bijector.forward_log_det_jacobian(fresh(x), event_ndims=1).numpy() == 0.0)
    assert np.all(bijector.inverse_log_det_jacobian(fresh(y), event_ndims=1).numpy() == 0.0)
    xt = fresh(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        yt = bijector.forward(xt)
    jacobian = tape.batch_jacobian(yt, xt).numpy()
    np.testing.assert_allclose(np.linalg.slogdet(jacobian)[1], 0.0, atol=1e-12)


def test_rotation_refuses_non_orthogonal_and_non_square():
    with pytest.raises(tf.errors.InvalidArgumentError, match="must be orthogonal"):
        Rotation(np.array([[1.0, 0.1], [0.0, 1.0]]), validate_args=True)
    with pytest.raises(ValueError, match=r"\[\.\.\., D, D\].*given shape \[2, 3\]"):
        Rotation(np.zeros((2, 3)))


def random_flow_params(rng, num_steps, dim, dtype=np.float64, max_abs_sigma=0.3,
                       max_abs_gamma=0.9):
    return dict(
        rotations=np.stack([random_orthogonal(rng, dim) for _ in range(num_steps)]).astype(dtype),
        sigma=rng.uniform(-max_abs_sigma, max_abs_sigma, (num_steps, dim)).astype(dtype),
        shift=rng.normal(size=(num_steps, dim)).astype(dtype),
        gamma=rng.uniform(-max_abs_gamma, max_abs_gamma, (num_steps, dim)).astype(dtype),
        center=rng.normal(size=(num_steps, dim)).astype(dtype),
        eps=dtype(0.2),
    )


def test_flow_equals_chain_of_rotations_and_maps():
    rng = np.random.default_rng(2)
    flow = DualAscentFlow(**random_flow_params(rng, 6, 3))
    chain = tfb.Chain(list(reversed(flow.steps())))
    assert [type(b).__name__ for b in flow.steps()[:2]] == ["Rotation", "DualAscentMap"]
    x = rng.normal(size=(9, 3)) * 3
    np.testing.assert_allclose(flow.forward(fresh(x)), chain.forward(fresh(x)), atol=1e-12)
    np.testing.assert_allclose(flow.forward_log_det_jacobian(fresh(x), 1),
                               chain.forward_log_det_jacobian(fresh(x), 1), atol=1e-12)
    np.testing.assert_allclose(flow.inverse(fresh(x)), chain.inverse(fresh(x)), atol=1e-12)
    np.testing.assert_allclose(flow.inverse_log_det_jacobian(fresh(x), 1),
                               chain.inverse_log_det_jacobian(fresh(x), 1), atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_flow_round_trip_and_log_det_match_autodiff(dtype):
    rng = np.random.default_rng(3)
    # Steps as mild as fitted ones: 20 extreme steps would be ill-conditioned (local
    # contraction down to 0.1^20), and float32 could not invert them.
    flow = DualAscentFlow(**random_flow_params(rng, 20, 4, dtype, 0.1, 0.3))
    x = (rng.normal(size=(11, 4)) * 2).astype(dtype)
    y = flow.forward(fresh(x)).numpy()
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(flow.inverse(fresh(y)).numpy(), x, atol=tol)
    xt = fresh(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        yt = flow.forward(xt)
    slogdet = np.linalg.slogdet(tape.batch_jacobian(yt, xt).numpy().astype(np.float64))
    assert np.all(slogdet[0] > 0)
    fldj = flow.forward_log_det_jacobian(fresh(x), 1).numpy()
    np.testing.assert_allclose(fldj, slogdet[1], atol=50 * tol)
    np.testing.assert_allclose(flow.inverse_log_det_jacobian(fresh(y), 1).numpy(), -fldj,
                               atol=50 * tol)


def test_flow_refuses_wrong_shapes_and_checks_validity():
    params = random_flow_params(np.random.default_rng(4), 3, 2)
    with pytest.raises(ValueError, match=r"`gamma` must have shape \[T, D\] = \[3, 2\].*\[3, 5\]"):
        DualAscentFlow(**{**params, "gamma": np.zeros((3, 5))})
    with pytest.raises(ValueError, match=r"`rotations` must have shape \[T, D, D\]"):
        DualAscentFlow(**{**params, "rotations": np.zeros((3, 2, 4))})
    with pytest.raises(tf.errors.InvalidArgumentError, match="`sigma` must be < 1"):
        DualAscentFlow(**{**params, "sigma": np.full((3, 2), 1.5)}, validate_args=True)


def test_closed_form_eigenvalue_and_solve_match_numpy():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(200, 3, 3))
    sym = a + np.swapaxes(a, -1, -2)
    sym[:3] = np.eye(3) * np.array([2.0, -1.0, 0.0])[:, None, None]  # repeated eigenvalues
    np.testing.assert_allclose(_largest_eigenvalue_3x3(fresh(sym)).numpy(),
                               np.linalg.eigvalsh(sym)[:, -1], atol=1e-9)
    rhs = rng.normal(size=(200, 3))
    shifted = sym[3:] - 10 * np.eye(3)
    np.testing.assert_allclose(_solve_symmetric_3x3(fresh(shifted), fresh(rhs[3:])).numpy(),
                               np.linalg.solve(shifted, rhs[3:, :, None])[..., 0], atol=1e-10)


def test_newton_step_uses_the_exact_gradient_and_hessian():
    """Uncapped, unregularised, the step is −H⁻¹G of the local objective (autodiff)."""
    rng = np.random.default_rng(6)
    z = np.stack([rng.normal(size=4000) * 1.3 + 0.2, rng.standard_t(5, size=4000)], axis=1)
    center, eps = np.array([0.3, -0.5]), np.float64(0.4)

    gradients, hessians = [], []
    for k in range(2):
        beta = tf.Variable(np.zeros(3))
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                y, log_derivative = map_forward(z[:, k], 1.0 - beta[0], beta[1], beta[2],
                                                center[k], eps)
                objective = tf.reduce_mean(log_derivative - 0.5 * tf.square(y))
            gradient = inner.gradient(objective, beta)
        gradients.append(gradient.numpy())
        hessians.append(outer.jacobian(gradient, beta).numpy())
    assert max(np.linalg.eigvalsh(h)[-1] for h in hessians) < -0.1  # so that μ = 0
    expected = np.stack([-np.linalg.solve(h, g) for h, g in zip(hessians, gradients)])
    sigma, shift, gamma = newton_step(fresh(z), fresh(center), eps, 1e9, 1e9, 1e9)
    np.testing.assert_allclose(np.stack([sigma, shift, gamma], axis=-1), expected, rtol=1e-8)


def test_newton_step_is_capped_and_clipped():
    z = np.random.default_rng(7).normal(size=(500, 3)) * np.array([0.2, 1.0, 5.0])
    sigma, shift, gamma = newton_step(fresh(z), fresh(np.zeros(3)), 0.1, 0.05, 0.02, 0.01)
    step = np.stack([sigma, shift, gamma], axis=-1)
    assert np.all(np.linalg.norm(step, axis=-1) <= 0.05 + 1e-12)
    assert np.all(np.abs(sigma) <= 0.01) and np.all(np.abs(gamma) <= 0.02)


# --- the fitter --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eight_gaussians_fit():
    x = datasets.toy("8gaussians", 3000, seed=0)
    validation = datasets.toy("8gaussians", 1000, seed=1)
    return fit(x, num_steps=800, validation_data=validation, patience=None, seed=0,
               verbose=False), validation


def test_fit_beats_gaussian_widely_and_tracks_its_log_likelihood(eight_gaussians_fit):
    result, validation = eight_gaussians_fit
    test = datasets.toy("8gaussians", 2000, seed=2)
    true_log_p = datasets.toy_log_prob("8gaussians", test)
    kl_fitted = np.mean(true_log_p - result.distribution.log_prob(test).numpy())
    kl_gaussian = np.mean(true_log_p - result.distribution_at(0).log_prob(test).numpy())
    assert kl_gaussian > 1.2 and kl_fitted < 0.45, (kl_gaussian, kl_fitted)
    # The recorded curve is the returned model's mean log-likelihood on the held-out set.
    history = result.history["validation_log_likelihood"]
    assert result.num_steps == int(np.argmax(history))
    np.testing.assert_allclose(np.mean(result.distribution.log_prob(validation).numpy()),
                               history[result.num_steps], atol=2e-4)


def test_fitted_density_integrates_to_one(eight_gaussians_fit):
    result, _ = eight_gaussians_fit
    grid = np.linspace(-6.0, 6.0, 241)
    xx, yy = np.meshgrid(grid, grid)
    points = np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.float32)
    density = np.exp(result.distribution.log_prob(points).numpy().astype(np.float64))
    mass = density.sum() * (grid[1] - grid[0]) ** 2
    assert abs(mass - 1.0) < 0.01, mass


def test_fitted_chain_log_det_matches_autodiff(eight_gaussians_fit):
    result, _ = eight_gaussians_fit
    bijector = result.bijector
    assert isinstance(bijector, tfb.Chain)
    z = fresh(np.random.default_rng(8).normal(size=(16, 2)).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(z)
        x = bijector.forward(z)
    slogdet = np.linalg.slogdet(tape.batch_jacobian(x, z).numpy().astype(np.float64))[1]
    np.testing.assert_allclose(bijector.forward_log_det_jacobian(fresh(z), 1).numpy(), slogdet,
                               atol=2e-3)
    np.testing.assert_allclose(bijector.inverse(fresh(x)).numpy(), z.numpy(), atol=2e-3)


def test_fitted_distribution_samples_near_the_data(eight_gaussians_fit):
    result, validation = eight_gaussians_fit
    samples = result.distribution.sample(4000, seed=3).numpy()
    assert samples.shape == (4000, 2) and np.all(np.isfinite(samples))
    # Every sample lies near one of the eight centres (radius 4/√2 ≈ 2.83, std 0.35).
    radius = np.linalg.norm(samples, axis=1)
    assert np.mean(np.abs(radius - 4 / np.sqrt(2)) < 1.0) > 0.9
    np.testing.assert_allclose(np.cov(samples.T), np.cov(validation.T), atol=0.4)


def test_fit_is_deterministic_for_a_seed():
    x = datasets.toy("moons", 600, seed=0).astype(np.float64)
    runs = [fit(x, num_steps=120, patience=None, seed=s, verbose=False) for s in (5, 5, 6)]
    for key in ("sigma", "shift", "gamma", "center", "rotations"):
        np.testing.assert_array_equal(getattr(runs[0].flow, key), getattr(runs[1].flow, key))
    np.testing.assert_array_equal(runs[0].history["validation_log_likelihood"],
                                  runs[1].history["validation_log_likelihood"])
    assert not np.allclose(runs[0].flow.sigma[:10], runs[2].flow.sigma[:10])
    assert runs[0].distribution.dtype == tf.float64


def test_validation_early_stopping_really_stops_and_keeps_the_best_prefix():
    """Gaussian data: the whitening is already the best model, so the steps overfit."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=(400, 2, 4)).astype(np.float32)  # any event shape
    validation = rng.normal(size=(400, 2, 4)).astype(np.float32)
    result = fit(x, num_steps=3000, validation_data=validation, patience=100, seed=0,
                 eps=0.05, chunk_size=25, verbose=False)
    curve = result.history["validation_log_likelihood"]
    steps_run = len(curve) - 1
    assert steps_run < 1000
    assert result.num_steps == int(np.argmax(curve))
    assert 100 <= steps_run - result.num_steps < 100 + 25
    assert result.flow.num_steps == result.num_steps
    assert result.distribution.event_shape == (2, 4)
    np.testing.assert_allclose(np.mean(result.distribution.log_prob(validation).numpy()),
                               curve[result.num_steps], atol=2e-4)


@pytest.mark.parametrize(
    "make_data, error, message",
    [
        (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 7, np.nan, x), ValueError,
         r"must be finite; given 1 NaN/inf value"),
        (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 3, np.inf, x), ValueError,
         r"must be finite"),
        (lambda x: x[:4], ValueError, r"more points than dimensions.*N >= D \+ 1 = 6.*N = 4"),
        (lambda x: np.concatenate([x, np.full((len(x), 1), 2.0)], 1), ValueError,
         r"1 constant column\(s\) \(zero variance\).*\[5\]"),
        (lambda x: np.concatenate([x, x[:, :1] + x[:, 1:2]], 1), ValueError,
         r"singular covariance"),
        (lambda x: x.astype(str), TypeError, "real numbers"),
    ],
)
def test_bad_input_gets_clear_errors(make_data, error, message):
    x = np.random.default_rng(10).normal(size=(50, 5))
    with pytest.raises(error, match=message):
        fit(make_data(x), num_steps=10, validation_fraction=0.0, verbose=False)


def test_bad_validation_data_and_settings_get_clear_errors():
    x = np.random.default_rng(11).normal(size=(50, 3))
    with pytest.raises(ValueError, match=r"validation_data must have shape \[N, 3\].*\[10, 2\]"):
        fit(x, validation_data=x[:10, :2], verbose=False)
    with pytest.raises(ValueError, match="validation_data must be finite"):
        fit(x, validation_data=np.full((10, 3), np.nan), verbose=False)
    with pytest.raises(ValueError, match=r"`eps` must be None or a finite real number > 0; given -1\.0"):
        fit(x, eps=-1.0, verbose=False)
    with pytest.raises(ValueError, match="`patience` must be a positive integer; given 0"):
        fit(x, patience=0, verbose=False)


@pytest.mark.parametrize("settings, error, message", [
    (dict(max_step=-1), ValueError, r"`max_step` must be a finite real number > 0; given -1"),
    (dict(max_step=float("nan")), ValueError, "`max_step`"),
    (dict(chunk_size=0), ValueError, r"`chunk_size` must be a positive integer; given 0"),
    (dict(chunk_size=2.5), TypeError, "`chunk_size`"),
    (dict(num_steps=-1), ValueError, r"`num_steps` must be an integer >= 0; given -1"),
    (dict(num_steps=10.0), TypeError, "`num_steps`"),
    (dict(num_steps=True), TypeError, "`num_steps`"),
    (dict(max_abs_gamma=1.0), ValueError, r"`max_abs_gamma` must be .* in \[0, 0\.999\]"),
    (dict(max_abs_sigma=1.5), ValueError, r"`max_abs_sigma` must be .* in \[0, 0\.999\]"),
    (dict(max_abs_sigma=-0.1), ValueError, "`max_abs_sigma`"),
    (dict(validation_fraction="0.1"), TypeError, "`validation_fraction`"),
    (dict(validation_fraction=1.0), ValueError, r"`validation_fraction` .* in \[0, 1\)"),
    (dict(seed=5 + 2**32), ValueError, r"`seed` must be None or an integer in \[0, 2147483647\]"),
    (dict(seed=1.0), TypeError, "`seed`"),
    (dict(eps="0.1"), TypeError, "`eps`"),
    (dict(verbose="yes"), TypeError, "`verbose` must be a bool"),
])
def test_bad_settings_are_refused_before_any_work(settings, error, message):
    x = np.random.default_rng(11).normal(size=(50, 3))
    with pytest.raises(error, match=message):
        fit(x, **settings)


def test_an_extreme_outlier_is_named_as_such():
    x = np.random.default_rng(12).normal(size=(200, 2))
    x[17, 1] = 1e30
    with pytest.raises(ValueError, match=r"x has an extreme outlier: row 17, flat column 1 holds 1e\+30"):
        fit(x, num_steps=2, verbose=False)
    validation = np.random.default_rng(13).normal(size=(20, 2))
    validation[3, 0] = -1e30
    with pytest.raises(ValueError, match=r"validation_data row 3 lies .* an outlier"):
        fit(np.random.default_rng(14).normal(size=(100, 2)), validation_data=validation,
            num_steps=2, verbose=False)


def test_columns_of_very_different_scales_fit_and_inputs_are_not_modified():
    """Checks are scale-free: a column of scale 1e-7 next to one of scale 1e7 is no
    "constant column"; the log-likelihood is the unit-scale one shifted by the log-det."""
    rng = np.random.default_rng(15)
    unit = datasets.toy("8gaussians", 400, seed=3).astype(np.float64)
    scales = np.array([1e-7, 1e7])
    x, validation = unit * scales, rng.normal(size=(50, 2)) * scales
    x_before, validation_before = x.copy(), validation.copy()
    kwargs = dict(num_steps=20, chunk_size=10, seed=0, patience=None, verbose=False)
    scaled = fit(x, validation_data=validation, **kwargs)
    reference = fit(unit, validation_data=validation / scales, **kwargs)
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(validation, validation_before)
    shift = -np.sum(np.log(scales))
    np.testing.assert_allclose(scaled.history["train_log_likelihood"],
                               reference.history["train_log_likelihood"] + shift, atol=1e-6)
    assert scaled.history["train_log_likelihood"][-1] > scaled.history["train_log_likelihood"][0]


def test_helpers_check_their_arguments():
    x = np.random.default_rng(16).normal(size=(20, 2)).astype(np.float32)
    with pytest.raises(ValueError, match=r"`batch_size` must be an integer in \[1, 20\]; given 0"):
        static_batches(x, 0)
    with pytest.raises(TypeError, match="`batch_size`"):
        static_batches(x, True)
    with pytest.raises(ValueError, match="`seed`"):
        static_batches(x, 4, seed=-1)
    with pytest.raises(TypeError, match="x must hold real numbers"):
        static_batches(x.astype(str), 4)
    with pytest.raises(ValueError, match="x must be finite"):
        static_batches(np.full((5, 2), np.nan), 2)
    with pytest.raises(TypeError, match="`result` must be a DualAscentResult"):
        trainable_bijector(None)
    with pytest.raises(TypeError, match="`num_points`"):
        auto_eps(2.5, 2)
    with pytest.raises(ValueError, match="`dim` must be a positive integer; given 0"):
        auto_eps(100, 0)
    assert auto_eps(100, 2) == pytest.approx(0.4)
    result = fit(x.astype(np.float64), num_steps=3, chunk_size=3, validation_fraction=0.0,
                 verbose=False)
    with pytest.raises(ValueError, match=r"`num_steps` must be an integer in \[0, 3\]; given 4"):
        result.bijector_at(4)
    with pytest.raises(TypeError, match="`num_steps`"):
        result.distribution_at(1.0)


def test_export_reloads_without_tfp(tmp_path, eight_gaussians_fit):
    result, validation = eight_gaussians_fit
    path = export_distribution(result.distribution, str(tmp_path / "dual_ascent"))
    points = validation[:64]
    np.save(tmp_path / "points.npy", points)
    expected = result.distribution.log_prob(points).numpy()
    script = textwrap.dedent(f"""
        import sys, numpy as np, tensorflow as tf
        loaded = tf.saved_model.load({path!r})
        points = np.load({str(tmp_path / 'points.npy')!r})
        log_prob = loaded.log_prob(tf.constant(points)).numpy()
        samples = loaded.sample(tf.constant(5)).numpy()
        round_trip = loaded.inverse(loaded.forward(tf.constant(points))).numpy()
        assert 'tensorflow_probability' not in sys.modules
        assert samples.shape == (5, 2) and np.isfinite(samples).all()
        np.save({str(tmp_path / 'out.npy')!r}, log_prob)
        print(np.abs(round_trip - points).max())
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-4)
    assert float(done.stdout.strip().splitlines()[-1]) < 1e-3


def test_trainable_chain_starts_at_the_fit_and_fine_tunes_with_flow_model(eight_gaussians_fit):
    """Fine-tuning: the same density at the start, then FlowModel (XLA) lowers the NLL."""
    result, validation = eight_gaussians_fit
    bijector = trainable_bijector(result)
    assert len(bijector.trainable_variables) == 4
    model = FlowModel(bijector, event_shape=(2,))
    np.testing.assert_allclose(model.log_prob(validation).numpy(),
                               result.distribution.log_prob(validation).numpy(), atol=1e-5)
    # The steps compose: a per-step change of 1e-3 compounds over 800 steps, so the
    # learning rate must be small.
    model.compile(learning_rate=3e-5, jit_compile=True)
    train = datasets.toy("8gaussians", 2048, seed=4)
    history = model.fit(static_batches(train, 256, seed=0), epochs=3, verbose=0).history
    assert history["nll"][-1] < history["nll"][0] - 0.005, history["nll"]
    assert not np.allclose(bijector.trainable_variables[0].numpy(), result.flow.sigma.numpy())


def test_flow_with_variables_stays_a_bijection_outside_the_valid_set():
    """SGD may push σ ≥ 1 or |γ| ≥ 1; the flow projects them and stays invertible."""
    params = random_flow_params(np.random.default_rng(12), 2, 2)
    sigma, gamma = tf.Variable(params.pop("sigma")), tf.Variable(params.pop("gamma"))
    flow = DualAscentFlow(sigma=sigma, gamma=gamma, **params)
    sigma.assign(np.array([[3.0, 0.1], [0.2, 1.0]]))
    gamma.assign(np.array([[1.7, -0.2], [-5.0, 0.3]]))
    x = np.random.default_rng(13).normal(size=(50, 2))
    xt = fresh(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = flow.forward(xt)
    slogdet = np.linalg.slogdet(tape.batch_jacobian(y, xt).numpy())
    assert np.all(slogdet[0] > 0) and np.all(np.isfinite(y.numpy()))
    np.testing.assert_allclose(flow.forward_log_det_jacobian(fresh(x), 1), slogdet[1], atol=1e-8)
    np.testing.assert_allclose(flow.inverse(fresh(y)).numpy(), x, atol=1e-8)
