"""Tests of tfp_flows.vi: log Z on a grid, exact KL, and the VI fit loop."""
import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

from tfp_flows import datasets, flows, vi

tfb = tfp.bijectors
tfd = tfp.distributions

TARGET_LOC = np.array([1.0, -2.0])
TARGET_SCALE_TRIL = np.array([[1.5, 0.0], [0.8, 0.5]])
TARGET_LOG_Z = 3.0  # the Gaussian target below is multiplied by e^3


def gaussian_target(dtype=tf.float32):
    """log p̃(x) = log N(x; μ, LLᵀ) + 3, so log Z = 3 exactly."""
    normal = tfd.MultivariateNormalTriL(tf.constant(TARGET_LOC, dtype), tf.constant(TARGET_SCALE_TRIL, dtype))

    def log_p_tilde(x):
        return normal.log_prob(x) + TARGET_LOG_Z

    return normal, log_p_tilde


def affine_flow(dtype=tf.float32, loc=(0.0, 0.0), scale_tril=((1.0, 0.0), (0.0, 1.0))):
    """x = L z + m with trainable m and lower-triangular L (positive diagonal)."""
    shift = tf.Variable(tf.constant(loc, dtype), name="shift")
    scale = tfp.util.TransformedVariable(tf.constant(scale_tril, dtype), tfb.FillScaleTriL(diag_shift=None))
    return tfb.Chain([tfb.Shift(shift), tfb.ScaleMatvecTriL(scale)])


def test_inverse_temperature_rises_linearly_from_initial_beta_to_one():
    betas = [float(vi.inverse_temperature(t, 100, 0.01)) for t in (0, 50, 100, 1000)]
    np.testing.assert_allclose(betas, [0.01, 0.505, 1.0, 1.0], rtol=1e-6)
    assert float(vi.inverse_temperature(0, 0, 0.01)) == 1.0


def test_log_normalizer_on_grid_matches_analytic_gaussian():
    # log p̃(x) = -½ xᵀAx + 3 with correlated A: log Z = 3 + log 2π - ½ log det A.
    precision = np.array([[2.0, 0.9], [0.9, 1.0]])
    matrix = tf.constant(precision, tf.float32)

    def log_p_tilde(x):
        return -0.5 * tf.reduce_sum(x * tf.linalg.matvec(matrix, x), axis=-1) + 3.0

    expected = 3.0 + math.log(2 * math.pi) - 0.5 * math.log(np.linalg.det(precision))
    log_z = vi.log_normalizer_on_grid(log_p_tilde, ((-9, 9), (-12, 12)), 600)
    assert abs(log_z - expected) < 1e-5


def test_log_normalizer_on_grid_refuses_a_grid_that_cuts_off_mass():
    _, log_p_tilde = gaussian_target()
    with pytest.raises(ValueError, match="outermost cells hold .* widen bounds"):
        vi.log_normalizer_on_grid(log_p_tilde, ((-1, 3), (-4, 0)), 100)
    with pytest.raises(ValueError, match="min < max"):
        vi.log_normalizer_on_grid(log_p_tilde, ((3, -1), (-4, 0)), 100)


def test_exact_kl_matches_the_analytic_kl_between_gaussians():
    target, log_p_tilde = gaussian_target()
    q_loc, q_tril = (0.5, -1.0), ((1.0, 0.0), (0.3, 0.8))
    q = tfd.TransformedDistribution(tfd.MultivariateNormalDiag(tf.zeros(2)), affine_flow(loc=q_loc, scale_tril=q_tril))
    analytic = float(tfd.kl_divergence(tfd.MultivariateNormalTriL(q_loc, q_tril), target))
    log_z = vi.log_normalizer_on_grid(log_p_tilde, ((-8, 10), (-11, 7)), 500)
    assert abs(log_z - TARGET_LOG_Z) < 1e-5
    kl, standard_error = vi.exact_kl(q, log_p_tilde, log_z, num_samples=200_000, seed=0)
    assert 0 < standard_error < 0.02
    assert abs(kl - analytic) < 4 * standard_error, (kl, analytic, standard_error)
    # q = p: log q - log p̃ = -log Z for every sample, so the KL is 0 with no spread.
    exact = tfd.TransformedDistribution(
        tfd.MultivariateNormalDiag(tf.zeros(2)), affine_flow(loc=TARGET_LOC, scale_tril=TARGET_SCALE_TRIL)
    )
    kl, standard_error = vi.exact_kl(exact, log_p_tilde, TARGET_LOG_Z, num_samples=10_000, seed=1)
    assert abs(kl) < 1e-5 and standard_error < 1e-5


@pytest.mark.parametrize(
    "dtype, learning_rate",
    [(tf.float32, 2e-2), (tf.float64, tf_keras.optimizers.schedules.CosineDecay(2e-2, 2000, alpha=0.1))],
)
def test_fit_affine_flow_to_gaussian_reaches_zero_kl(dtype, learning_rate, capsys):
    _, log_p_tilde = gaussian_target(dtype)
    result = vi.fit(
        affine_flow(dtype), log_p_tilde, event_size=2, num_steps=2000, batch_size=128, seed=3,
        learning_rate=learning_rate, annealing_steps=200, dtype=dtype, steps_per_call=1000,
    )
    assert result.history.shape == (2000,)
    assert result.distribution.dtype == dtype
    # The ELBO rises towards log Z = 3 (the bound is tight only at q = p).
    assert result.history[:50].mean() < 0.0 < 2.9 < result.history[-200:].mean() < 3.0 + 0.05
    kl, standard_error = vi.exact_kl(result.distribution, log_p_tilde, TARGET_LOG_Z, 50_000, seed=0)
    assert kl < 0.01 and standard_error < 0.01
    assert "elbo" in capsys.readouterr().out  # the progress bar reports the ELBO


def test_fit_planar_k32_on_u1_reaches_a_small_exact_kl():
    # Both lobes of U1 must be covered: losing one costs log 2 ≈ 0.69 nats.
    target = datasets.energy("U1")
    log_z = vi.log_normalizer_on_grid(target, ((-6, 6), (-6, 6)), 1000)
    result = vi.fit(flows.planar_flow(2, 32, seed=0), target, 2, num_steps=3000, batch_size=256, seed=0,
                    learning_rate=3e-3, annealing_steps=1500, verbose=0)
    kl, standard_error = vi.exact_kl(result.distribution, target, log_z, 100_000, seed=1)
    assert -4 * standard_error < kl < 0.05 and standard_error < 0.002, (kl, standard_error)
    assert result.history[-100:].mean() > log_z - 0.06  # ELBO = log Z − KL, up to batch noise
    assert np.isfinite(result.seconds_per_step) and result.seconds_per_step > 0


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_fit_planar_k32_on_u1_is_reliable_over_seeds(seed):
    target = datasets.energy("U1")
    log_z = vi.log_normalizer_on_grid(target, ((-6, 6), (-6, 6)), 1000)
    result = vi.fit(flows.planar_flow(2, 32, seed=seed), target, 2, num_steps=3000, batch_size=256,
                    seed=seed, learning_rate=3e-3, annealing_steps=1500, verbose=0)
    kl, _ = vi.exact_kl(result.distribution, target, log_z, 100_000, seed=1)
    assert kl < 0.05, kl


def test_fit_is_deterministic_for_a_seed():
    _, log_p_tilde = gaussian_target()
    runs = [
        vi.fit(affine_flow(), log_p_tilde, 2, num_steps=300, batch_size=32, seed=seed, steps_per_call=128, verbose=0)
        for seed in (7, 7, 8)
    ]
    np.testing.assert_array_equal(runs[0].history, runs[1].history)
    assert not np.allclose(runs[0].history, runs[2].history)


def test_fit_trains_tfp_inverse_autoregressive_flow_and_keeps_its_masks():
    _, log_p_tilde = gaussian_target()
    network = tfb.AutoregressiveNetwork(params=2, hidden_units=[16], activation="tanh")
    iaf = tfb.Invert(tfb.MaskedAutoregressiveFlow(shift_and_log_scale_fn=network))
    result = vi.fit(iaf, log_p_tilde, 2, num_steps=3000, batch_size=128, seed=0, learning_rate=1e-2, verbose=0)
    # The MADE masks are kernel constraints; an update that ignored them would make the
    # Jacobian non-triangular, the log-det formula wrong, and the "KL" negative.
    z = tf.random.stateless_normal([16, 2], seed=[5, 6])
    with tf.GradientTape() as tape:
        tape.watch(z)
        x = iaf.forward(z)
    _, log_abs_det = tf.linalg.slogdet(tape.batch_jacobian(x, z))
    np.testing.assert_allclose(iaf.forward_log_det_jacobian(z, event_ndims=1), log_abs_det, atol=1e-4)
    kl, standard_error = vi.exact_kl(result.distribution, log_p_tilde, TARGET_LOG_Z, 50_000, seed=0)
    assert -4 * standard_error < kl < 0.05


def test_fit_refuses_a_target_with_nan_at_the_initial_samples():
    def nan_on_left_half(x):
        return tf.where(x[:, 0] < 0.0, np.nan, -tf.reduce_sum(x**2, axis=-1))

    with pytest.raises(ValueError, match=r"target_log_prob must be finite .* NaN/inf"):
        vi.fit(affine_flow(), nan_on_left_half, 2, num_steps=10, batch_size=64, seed=0, verbose=0)


@pytest.mark.parametrize(
    "bad_target, error, message",
    [
        (lambda x: -x**2, ValueError, r"shape \[batch\] = \[64\]; given shape \[64, 2\]"),
        (lambda x: -tf.reduce_sum(x**2), ValueError, r"shape \[batch\] = \[64\]; given shape \[\]"),
        (lambda x: tf.cast(x[:, 0] > 0, tf.int32), TypeError, "floating-point .* given dtype int32"),
    ],
)
def test_fit_refuses_targets_of_wrong_shape_or_dtype(bad_target, error, message):
    with pytest.raises(error, match=message):
        vi.fit(affine_flow(), bad_target, 2, num_steps=10, batch_size=64, seed=0, verbose=0)


def test_fit_stops_on_a_loss_that_turns_nan_and_keeps_finite_variables():
    # Finite near the initial q = N(0, I), NaN beyond x1 = 4, while the target pulls q to x1 = 8.
    def nan_far_right(x):
        log_p = -0.5 * tf.reduce_sum((x - [8.0, 0.0]) ** 2, axis=-1)
        return tf.where(x[:, 0] > 4.0, tf.constant(np.nan, x.dtype), log_p)

    flow = affine_flow()
    with pytest.raises(FloatingPointError, match=r"NaN/inf at step \d+ of 2000"):
        vi.fit(flow, nan_far_right, 2, num_steps=2000, batch_size=64, seed=0, learning_rate=5e-2,
               annealing_steps=0, verbose=0)
    for variable in flow.trainable_variables:
        assert np.all(np.isfinite(variable.numpy()))
    (shift,) = [v for v in flow.trainable_variables if v.name.startswith("shift")]
    assert 0.5 < shift.numpy()[0] < 4.5  # it moved towards x1 = 8 before stopping


def _fit_args(**overrides):
    _, log_p_tilde = gaussian_target()
    arguments = dict(bijector=affine_flow(), target_log_prob=log_p_tilde, event_size=2, num_steps=10,
                     batch_size=16, seed=0, verbose=0)
    arguments.update(overrides)
    return arguments


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(bijector="planar"), TypeError, "`bijector` must be a tfb.Bijector; given str"),
        (dict(target_log_prob="U1"), TypeError, "`target_log_prob` must be callable"),
        (dict(event_size=0), ValueError, "`event_size` must be a positive integer; given 0"),
        (dict(event_size=2.0), TypeError, "`event_size` must be a positive integer; given 2.0"),
        (dict(num_steps=-1), ValueError, "`num_steps` must be a positive integer; given -1"),
        (dict(num_steps=True), TypeError, "`num_steps` must be a positive integer; given True"),
        (dict(batch_size=0), ValueError, "`batch_size` must be a positive integer; given 0"),
        (dict(seed=-1), ValueError, r"`seed` must be None or an integer in \[0, 2147483647\]; given -1"),
        (dict(seed=2**31), ValueError, "`seed` must be None or an integer"),
        (dict(seed=1.5), TypeError, "`seed` must be None or an integer"),
        (dict(learning_rate=float("nan")), ValueError, "`learning_rate` must be a finite real number > 0; given nan"),
        (dict(learning_rate=float("inf")), ValueError, "`learning_rate` must be a finite real number > 0; given inf"),
        (dict(learning_rate=-1e-3), ValueError, "`learning_rate` must be a finite real number > 0; given -0.001"),
        (dict(learning_rate=0.0), ValueError, "`learning_rate` must be a finite real number > 0; given 0.0"),
        (dict(learning_rate="1e-3"), TypeError, "`learning_rate` must be a finite real number > 0"),
        (dict(annealing_steps=-5), ValueError, "`annealing_steps` must be an integer >= 0; given -5"),
        (dict(initial_beta=0.0), ValueError, r"`initial_beta` must be a finite real number in \(0, 1\]"),
        (dict(initial_beta=float("nan")), ValueError, "`initial_beta` must be a finite real number"),
        (dict(steps_per_call=0), ValueError, "`steps_per_call` must be a positive integer; given 0"),
        (dict(verbose=2), ValueError, r"`verbose` must be an integer in \[0, 1\]; given 2"),
        (dict(dtype=tf.int32), ValueError, "`dtype` must be one of the dtypes float32, float64; given"),
        (dict(base_distribution=tfd.MultivariateNormalDiag(tf.zeros(3))), ValueError,
         r"`base_distribution` must have event shape \[2\] \(event_size\); given \[3\]"),
        (dict(base_distribution=tfd.MultivariateNormalDiag(tf.zeros([4, 2]))), ValueError,
         r"`base_distribution` must have batch shape \[\]"),
        (dict(base_distribution="normal"), TypeError, "`base_distribution` must be a tfd.Distribution"),
    ],
)
def test_fit_refuses_bad_arguments_before_any_work(overrides, error, message):
    arguments = _fit_args(**overrides)
    flow = arguments["bijector"]
    before = [v.numpy() for v in getattr(flow, "trainable_variables", [])]
    with pytest.raises(error, match=message):
        vi.fit(**arguments)
    for value, variable in zip(before, getattr(flow, "trainable_variables", [])):
        np.testing.assert_array_equal(variable.numpy(), value)


def test_fit_refuses_variables_of_another_dtype_or_not_finite():
    with pytest.raises(TypeError, match="base distribution's dtype float64; given other dtypes"):
        vi.fit(**_fit_args(dtype=tf.float64))  # the affine flow's variables are float32
    flow = affine_flow()
    flow.trainable_variables[0].assign([np.nan, 0.0])
    with pytest.raises(ValueError, match=r"variables must be finite before training; NaN/inf in \['shift"):
        vi.fit(**_fit_args(bijector=flow))


def test_fit_stops_on_a_learning_rate_schedule_that_turns_nan_and_keeps_finite_variables():
    def nan_after_40_updates(iterations):
        return tf.where(iterations < 40.0, tf.constant(1e-2), tf.constant(np.nan))

    flow = affine_flow()
    initial = [v.numpy() for v in flow.trainable_variables]
    with pytest.raises(FloatingPointError, match=r"learning_rate schedule gave nan after 40 updates .* at step 40 of 100"):
        vi.fit(**_fit_args(bijector=flow, num_steps=100, learning_rate=nan_after_40_updates, steps_per_call=30))
    for variable, value in zip(flow.trainable_variables, initial):
        assert np.all(np.isfinite(variable.numpy()))
        assert not np.array_equal(variable.numpy(), value)  # the 40 finite steps were kept


def test_fit_refuses_an_update_that_its_constraint_makes_nan():
    # A variable whose constraint returns NaN once the update pushes it beyond 0.5.
    shift = tf.Variable([0.0, 0.0], constraint=lambda v: tf.where(v > 0.5, tf.constant(np.nan), v))
    flow = tfb.Shift(shift)

    def far_right(x):
        return -0.5 * tf.reduce_sum((x - [5.0, 5.0]) ** 2, axis=-1)

    with pytest.raises(FloatingPointError, match="Adam update would have made a variable NaN/inf"):
        vi.fit(flow, far_right, 2, num_steps=500, batch_size=16, seed=0, learning_rate=1e-2,
               annealing_steps=0, verbose=0)
    assert np.all(np.isfinite(shift.numpy())) and 0.4 < shift.numpy().max() <= 0.5


def test_inverse_temperature_validates_its_arguments():
    with pytest.raises(ValueError, match="`annealing_steps` must be an integer >= 0; given -1"):
        vi.inverse_temperature(0, -1, 0.01)
    with pytest.raises(ValueError, match="`initial_beta` must be a finite real number in"):
        vi.inverse_temperature(0, 10, 1.5)
    with pytest.raises(ValueError, match="`step` must be an integer >= 0; given -3"):
        vi.inverse_temperature(-3, 10, 0.01)


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        (dict(samples_per_call=0), ValueError, "`samples_per_call` must be a positive integer; given 0"),
        (dict(num_samples=1), ValueError, "`num_samples` must be an integer >= 2; given 1"),
        (dict(num_samples=10.0), TypeError, "`num_samples` must be an integer >= 2"),
        (dict(log_z=float("nan")), ValueError, "`log_z` must be a finite real number; given nan"),
        (dict(seed=-2), ValueError, "`seed` must be None or an integer"),
        (dict(distribution=tfd.Normal(0.0, 1.0)), ValueError, r"`distribution` must have event shape \[event_size\]"),
        (dict(target_log_prob=None), TypeError, "`target_log_prob` must be callable"),
    ],
)
def test_exact_kl_refuses_bad_arguments(arguments, error, message):
    # samples_per_call=0 used to loop forever.
    _, log_p_tilde = gaussian_target()
    q = tfd.MultivariateNormalDiag(tf.zeros(2))
    call = dict(distribution=q, target_log_prob=log_p_tilde, log_z=3.0, num_samples=10, seed=0) | arguments
    with pytest.raises(error, match=message):
        vi.exact_kl(**call)


def test_exact_kl_takes_every_sample_in_uneven_calls():
    # 10 samples 3 per call: 4 calls (3, 3, 3, 1), the same KL as in one call of the same first draw.
    target, _ = gaussian_target()
    q = tfd.MultivariateNormalDiag(tf.zeros(2))
    kl_uneven, _ = vi.exact_kl(q, target.log_prob, 0.0, num_samples=10, seed=0, samples_per_call=3)
    x, log_q = q.experimental_sample_and_log_prob(3, seed=tf.constant([0, 0]))
    assert np.isfinite(kl_uneven)
    kl_first, _ = vi.exact_kl(q, target.log_prob, 0.0, num_samples=3, seed=0, samples_per_call=3)
    np.testing.assert_allclose(kl_first, np.mean(log_q - target.log_prob(x)), rtol=1e-6)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(bounds=((-1, float("inf")), (-1, 1))), "`bounds` must be .*finite"),
        (dict(bounds=((-1, 1),)), "`bounds` must be"),
        (dict(bounds="wide"), "`bounds` must be"),
        (dict(n=2), "`n` must be an integer >= 3; given 2"),
        (dict(n=(10, 2)), r"`n\[1\]` must be an integer >= 3; given 2"),
        (dict(n=(10, 10, 10)), "`n` must be an integer >= 3 or a pair"),
        (dict(n=100_000), "at most 67108864 grid cells; given 100000 × 100000"),
        (dict(edge_tolerance=0.0), "`edge_tolerance` must be a finite real number in"),
        (dict(points_per_call=0), "`points_per_call` must be a positive integer; given 0"),
    ],
)
def test_log_normalizer_on_grid_refuses_bad_arguments(arguments, message):
    _, log_p_tilde = gaussian_target()
    call = dict(target_log_prob=log_p_tilde, bounds=((-8, 10), (-11, 7)), n=10) | arguments
    with pytest.raises((TypeError, ValueError), match=message):
        vi.log_normalizer_on_grid(**call)


def test_kl_of_two_gaussians_matches_the_analytic_value():
    q = tfd.MultivariateNormalTriL(tf.constant([0.5, -1.0], tf.float64), tf.constant([[1.0, 0.0], [0.3, 0.8]], tf.float64))
    p = tfd.MultivariateNormalTriL(tf.constant(TARGET_LOC), tf.constant(TARGET_SCALE_TRIL))
    estimate, standard_error = vi.kl(q, p, 200_000, seed=0)
    analytic = float(tfd.kl_divergence(q, p))
    assert 0 < standard_error < 0.02 and abs(estimate - analytic) < 4 * standard_error
    with pytest.raises(ValueError, match=r"`p` must have event shape \[2\] \(event_size\); given \[3\]"):
        vi.kl(q, tfd.MultivariateNormalDiag(tf.zeros(3, tf.float64)), 10)
    with pytest.raises(TypeError, match="`q` must be a tfd.Distribution"):
        vi.kl(None, p, 10)


MIRRORED_SCRIPT = """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from tfp_flows import datasets, flows, vi
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert strategy.num_replicas_in_sync == 2
with strategy.scope():
    flow = flows.planar_flow(2, 2, seed=0)
    try:
        vi.fit(flow, datasets.energy("U1"), 2, num_steps=5, verbose=0)
    except RuntimeError as error:
        print("scope:", error)
try:
    vi.fit(flow, datasets.energy("U1"), 2, num_steps=5, verbose=0)
except TypeError as error:
    print("mirrored variables:", error)
"""


def test_fit_refuses_a_distribution_strategy_with_a_clear_error():
    # Logical devices must be configured before any TF op, hence a fresh process.
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "scope: vi.fit does not run under a tf.distribute strategy (called under MirroredStrategy)" in run.stdout
    assert "mirrored variables: the flow's variables must be plain tf.Variables, not distributed" in run.stdout
