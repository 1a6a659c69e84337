import math

import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits

from tfp_flows import datasets


# ---------------------------------------------------------------- toy data

@pytest.mark.parametrize("name", datasets.TOY_NAMES)
@pytest.mark.parametrize("n", [1, 7, 1000])
def test_toy_shape_dtype_finite(name, n):
    x = datasets.toy(name, n, seed=3)
    assert x.shape == (n, 2)
    assert x.dtype == np.float32
    assert np.isfinite(x).all()


@pytest.mark.parametrize("name", datasets.TOY_NAMES)
def test_toy_deterministic_for_a_seed_and_different_across_seeds(name):
    a = datasets.toy(name, 500, seed=11)
    b = datasets.toy(name, 500, seed=11)
    c = datasets.toy(name, 500, seed=12)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.1


def test_eight_gaussians_statistics():
    x = datasets.toy("8gaussians", 40_000, seed=0).astype(np.float64)
    angles = np.arange(8) * np.pi / 4
    centres = 4 * np.stack([np.cos(angles), np.sin(angles)], 1) / math.sqrt(2)
    nearest = np.argmin(((x[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    # Every component gets about 1/8 of the points (binomial sd ~0.0017).
    np.testing.assert_allclose(np.bincount(nearest, minlength=8) / len(x), 1 / 8, atol=0.01)
    # Residuals from the centres: zero mean, std 0.5/√2 per coordinate, uncorrelated.
    residual = x - centres[nearest]
    np.testing.assert_allclose(residual.mean(0), 0.0, atol=0.01)
    np.testing.assert_allclose(residual.std(0), 0.5 / math.sqrt(2), rtol=0.02)
    assert abs(np.corrcoef(residual.T)[0, 1]) < 0.03


def test_eight_gaussians_log_prob_integrates_to_one_and_matches_samples():
    step = 0.02
    grid = np.arange(-6.0, 6.0, step) + step / 2
    g1, g2 = np.meshgrid(grid, grid, indexing="ij")
    points = np.stack([g1.ravel(), g2.ravel()], 1)
    log_p = datasets.toy_log_prob("8gaussians", points)
    density = np.exp(log_p)
    assert log_p.shape == (len(points),)
    np.testing.assert_allclose(density.sum() * step**2, 1.0, atol=1e-4)
    # E_p[log p] from the grid equals the sample average of log p at drawn points.
    expected_log_p = np.sum(density * log_p) * step**2
    samples = datasets.toy("8gaussians", 50_000, seed=1)
    sample_mean = datasets.toy_log_prob("8gaussians", samples).mean()
    np.testing.assert_allclose(sample_mean, expected_log_p, atol=0.02)


def test_eight_gaussians_log_prob_at_a_centre():
    # At the centre c_0 the density is (1/8)·(1/(2πs²))·Σ_k exp(-|c_0 - c_k|²/(2s²)), with
    # |c_0 - c_k| = 2R·sin(kπ/8) the chord between centres on the circle of radius R.
    radius, std = 4 / math.sqrt(2), 0.5 / math.sqrt(2)
    mixture = sum(math.exp(-((2 * radius * math.sin(k * math.pi / 8)) ** 2) / (2 * std**2)) for k in range(8))
    expected = math.log(mixture / (8 * 2 * math.pi * std**2))
    np.testing.assert_allclose(datasets.toy_log_prob("8gaussians", [[radius, 0.0]]), [expected], rtol=1e-12)


def test_checkerboard_points_lie_on_the_even_cells():
    x = datasets.toy("checkerboard", 5000, seed=0)
    cells = np.floor(x / 2).astype(int)
    assert ((cells.sum(1)) % 2 == 0).all()
    assert (x >= -4).all() and (x < 4).all()
    # All eight occupied cells are used.
    assert len({tuple(c) for c in cells}) == 8


def test_rings_radii():
    x = datasets.toy("rings", 8000, seed=0)
    radius = np.linalg.norm(x, axis=1)
    ring_radii = np.array([0.75, 1.5, 2.25, 3.0])
    ring = np.argmin(np.abs(radius[:, None] - ring_radii), axis=1)
    # Four equally populated rings; the N(0, 0.08²) noise gives a radial spread of about 0.08.
    np.testing.assert_array_equal(np.bincount(ring), [2000] * 4)
    assert 0.06 < (radius - ring_radii[ring]).std() < 0.1


def test_moons_and_pinwheel_and_spirals_are_centred_and_bounded():
    for name, bound in [("moons", 4.0), ("pinwheel", 5.0), ("2spirals", 4.5)]:
        x = datasets.toy(name, 5000, seed=0)
        assert np.abs(x).max() < bound, name
        assert np.abs(x.mean(0)).max() < 0.35, name


@pytest.mark.parametrize("args, kwargs, error, pattern", [
    (("swissroll", 10), {}, ValueError, r"`name` must be one of 'moons', '8gaussians'.*given 'swissroll'"),
    ((None, 10), {}, TypeError, "`name` must be one of"),
    (("moons", 0), {}, ValueError, r"`n` must be a positive integer; given 0 \(int\)"),
    (("moons", 2.5), {}, TypeError, r"`n` must be a positive integer; given 2\.5 \(float\)"),
    (("moons", 10.0), {}, TypeError, "`n`"),
    (("moons", "10"), {}, TypeError, "`n`"),
    (("moons", True), {}, TypeError, "`n`"),
    (("moons", 10), dict(seed=-1), ValueError, r"`seed` must be None or an integer in \[0, 2147483647\]"),
    (("moons", 10), dict(seed=5 + 2**32), ValueError, "`seed`"),
    (("moons", 10), dict(seed=2.5), TypeError, "`seed`"),
    (("moons", 10), dict(seed=True), TypeError, "`seed`"),
    (("moons", 10), dict(seed=[1, 2]), TypeError, "`seed`"),
])
def test_toy_rejects_bad_arguments(args, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        datasets.toy(*args, **kwargs)


def test_toy_accepts_numpy_integers():
    np.testing.assert_array_equal(datasets.toy("rings", np.int64(9), seed=np.int32(4)),
                                  datasets.toy("rings", 9, seed=4))


def test_toy_log_prob_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"`name` must be '8gaussians' .*given 'moons'"):
        datasets.toy_log_prob("moons", np.zeros((3, 2)))
    with pytest.raises(ValueError, match="`name` must be one of"):
        datasets.toy_log_prob("nope", np.zeros((3, 2)))
    with pytest.raises(TypeError, match="x must hold real numbers; given dtype complex128"):
        datasets.toy_log_prob("8gaussians", np.ones((3, 2), complex))
    with pytest.raises(ValueError, match=r"x must be an array of shape \[N, 2\]"):
        datasets.toy_log_prob("8gaussians", [[1.0, 2.0], [3.0]])
    with pytest.raises(ValueError, match=r"shape \[N, 2\].*\[3, 3\]"):
        datasets.toy_log_prob("8gaussians", np.zeros((3, 3)))
    with pytest.raises(ValueError, match="finite"):
        datasets.toy_log_prob("8gaussians", np.array([[np.nan, 0.0]]))


# ---------------------------------------------------------------- energies

def _reference_log_p_tilde(name, z):
    """-U(z) (and the envelope for U2-U4) written naively from the paper's formulas."""
    z1, z2 = z[:, 0], z[:, 1]
    w1 = np.sin(2 * np.pi * z1 / 4)
    w2 = 3 * np.exp(-0.5 * ((z1 - 1) / 0.6) ** 2)
    w3 = 3 / (1 + np.exp(-(z1 - 1) / 0.3))
    if name == "U1":
        u = 0.5 * ((np.sqrt(z1**2 + z2**2) - 2) / 0.4) ** 2 - np.log(
            np.exp(-0.5 * ((z1 - 2) / 0.6) ** 2) + np.exp(-0.5 * ((z1 + 2) / 0.6) ** 2)
        )
        return -u
    if name == "U2":
        u = 0.5 * ((z2 - w1) / 0.4) ** 2
    elif name == "U3":
        u = -np.log(np.exp(-0.5 * ((z2 - w1) / 0.35) ** 2) + np.exp(-0.5 * ((z2 - w1 + w2) / 0.35) ** 2))
    else:
        u = -np.log(np.exp(-0.5 * ((z2 - w1) / 0.4) ** 2) + np.exp(-0.5 * ((z2 - w1 + w3) / 0.35) ** 2))
    return -u - z1**2 / 32


@pytest.mark.parametrize("name", datasets.ENERGY_NAMES)
def test_energy_matches_the_paper_formulas(name):
    z = np.random.default_rng(0).uniform(-4, 4, size=(500, 2))
    expected = _reference_log_p_tilde(name, z)
    assert np.isfinite(expected).all()
    log_p_tilde = datasets.energy(name)
    got64 = log_p_tilde(tf.constant(z, tf.float64)).numpy()
    assert got64.dtype == np.float64 and got64.shape == (500,)
    np.testing.assert_allclose(got64, expected, rtol=1e-10, atol=1e-10)
    compiled = tf.function(log_p_tilde, jit_compile=True)
    got32 = compiled(tf.constant(z, tf.float32)).numpy()
    assert got32.dtype == np.float32
    np.testing.assert_allclose(got32, expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name", datasets.ENERGY_NAMES)
def test_energy_is_finite_with_finite_gradients_far_out_and_at_zero(name):
    z = tf.constant([[0.0, 0.0], [40.0, -30.0], [-25.0, 60.0], [1.0, 2.0]], tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(z)
        value = datasets.energy(name)(z)
    gradient = tape.gradient(value, z)
    assert np.isfinite(value.numpy()).all()
    assert np.isfinite(gradient.numpy()).all()


def test_u2_envelope_gives_the_exact_normaliser():
    # ∫ exp(-z1²/32) ∫ exp(-½((z2 - w1(z1))/0.4)²) dz2 dz1 = √(32π) · √(2π)·0.4 = 3.2π.
    step = 0.05
    z1 = np.arange(-30, 30, step) + step / 2
    z2 = np.arange(-4, 4, step) + step / 2
    g1, g2 = np.meshgrid(z1, z2, indexing="ij")
    z = tf.constant(np.stack([g1.ravel(), g2.ravel()], 1))
    total = np.exp(datasets.energy("U2")(z).numpy()).sum() * step**2
    np.testing.assert_allclose(total, 3.2 * np.pi, rtol=1e-6)


def test_energy_rejects_bad_input():
    with pytest.raises(ValueError, match="`name` must be one of 'U1', 'U2', 'U3', 'U4'; given 'U5'"):
        datasets.energy("U5")
    with pytest.raises(TypeError, match="`name`"):
        datasets.energy(1)
    log_p = datasets.energy("U1")
    with pytest.raises(ValueError, match=r"\[N, 2\].*\[4, 3\]"):
        log_p(tf.zeros([4, 3]))
    with pytest.raises(ValueError, match=r"\[N, 2\].*\[2\]"):
        log_p(tf.zeros([2]))
    with pytest.raises(TypeError, match="int32"):
        log_p(tf.zeros([4, 2], tf.int32))
    with pytest.raises(TypeError, match="z must be a float32 or float64 .* complex64"):
        log_p(np.ones((3, 2), np.complex64))
    with pytest.raises(TypeError, match="z must be a float32 or float64 .*NoneType"):
        log_p(None)
    with pytest.raises(ValueError, match=r"`z` must be finite; given 1 NaN/inf value\(s\), the first at index \(1, 0\)"):
        log_p(np.array([[0.0, 1.0], [np.nan, 0.0]], np.float32))
    # Traced (as in VI under XLA) the check adds no op that XLA cannot compile.
    compiled = tf.function(log_p, jit_compile=True)
    np.testing.assert_allclose(compiled(tf.zeros([3, 2])), log_p(tf.zeros([3, 2])), rtol=1e-6)


# ---------------------------------------------------------------- digits

def test_digits_shapes_range_and_dequantization():
    train = datasets.digits("train")
    test = datasets.digits("test")
    assert train.shape == (1438, 8, 8, 1) and test.shape == (359, 8, 8, 1)
    assert train.dtype == np.float32 and test.dtype == np.float32
    for images in (train, test):
        assert images.min() >= 0.0 and images.max() < 1.0
        scaled = images.astype(np.float64) * datasets.DIGITS_LEVELS
        fraction = scaled - np.floor(scaled)
        # The dequantization noise is U[0, 1): mean 1/2, variance 1/12.
        assert abs(fraction.mean() - 0.5) < 0.01
        assert abs(fraction.var() - 1 / 12) < 0.005


def _levels(images):
    return np.floor(images.astype(np.float64) * datasets.DIGITS_LEVELS).astype(int)[..., 0]


def test_digits_split_is_a_fixed_partition_of_the_bundled_images():
    train, test = datasets.digits("train", seed=0), datasets.digits("test", seed=0)
    original = load_digits().images.astype(int)
    as_rows = lambda a: sorted(map(bytes, a.reshape(len(a), -1).astype(np.int8)))
    # train ∪ test is exactly the 1797 bundled images (as a multiset): disjoint and complete.
    assert as_rows(np.concatenate([_levels(train), _levels(test)])) == as_rows(original)
    # The split does not depend on the noise seed, the noise does.
    other = datasets.digits("train", seed=5)
    np.testing.assert_array_equal(_levels(other), _levels(train))
    assert np.abs(other - train).max() > 0.01
    np.testing.assert_array_equal(datasets.digits("train", seed=0), train)


def test_digits_rejects_bad_arguments():
    with pytest.raises(ValueError, match="`split` must be one of 'train', 'test'; given 'valid'"):
        datasets.digits("valid")
    with pytest.raises(TypeError, match="`split`"):
        datasets.digits(1)
    for seed, error in [(-1, ValueError), ("0", TypeError), (True, TypeError), (1.0, TypeError)]:
        with pytest.raises(error, match="`seed`"):
            datasets.digits("test", seed=seed)
    assert datasets.digits("test", seed=None).shape == (359, 8, 8, 1)


# ---------------------------------------------------------------- conditional toy data

ROTATED = "rotated-8gaussians"


def test_conditional_toy_is_a_rotation_of_8gaussians_and_deterministic():
    x, c = datasets.conditional_toy(ROTATED, 2000, seed=7)
    assert x.shape == c.shape == (2000, 2) and x.dtype == c.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(c.astype(np.float64), axis=1), 1.0, atol=1e-6)
    again = datasets.conditional_toy(ROTATED, 2000, seed=7)
    np.testing.assert_array_equal(x, again[0])
    np.testing.assert_array_equal(c, again[1])
    assert np.abs(datasets.conditional_toy(ROTATED, 2000, seed=8)[0] - x).max() > 0.1
    # R(θ)ᵀ x gives back the unconditional points of the same seed.
    cos, sin = c[:, 0].astype(np.float64), c[:, 1].astype(np.float64)
    back = np.stack([cos * x[:, 0] + sin * x[:, 1], -sin * x[:, 0] + cos * x[:, 1]], axis=1)
    np.testing.assert_allclose(back, datasets.toy("8gaussians", 2000, seed=7), atol=1e-5)
    # θ is uniform: the angle of c has the moments of U[0, 2π).
    theta = np.mod(np.arctan2(c[:, 1], c[:, 0]), 2 * np.pi)
    assert abs(theta.mean() - np.pi) < 0.15 and abs(theta.var() - np.pi**2 / 3) < 0.3


@pytest.mark.parametrize("theta", [0.0, 0.3, np.pi / 8, 2.0, 5.5])
def test_conditional_toy_density_integrates_to_one_and_matches_samples(theta):
    step = 0.02
    grid = np.arange(-6.0, 6.0, step) + step / 2
    g1, g2 = np.meshgrid(grid, grid, indexing="ij")
    points = np.stack([g1.ravel(), g2.ravel()], 1)
    context = np.tile([np.cos(theta), np.sin(theta)], (len(points), 1))
    log_p = datasets.conditional_toy_log_prob(ROTATED, points, context)
    density = np.exp(log_p)
    np.testing.assert_allclose(density.sum() * step**2, 1.0, atol=1e-4)
    # The density follows the context: its modes sit at angles θ + kπ/4, and points
    # rotated from them by π/8 (halfway to the next mode) are far less likely.
    angles = theta + np.arange(8) * np.pi / 4
    centres = datasets.EIGHT_GAUSSIANS_RADIUS * np.stack([np.cos(angles), np.sin(angles)], 1)
    peak = datasets.conditional_toy_log_prob(ROTATED, centres, np.tile(context[0], (8, 1)))
    between = datasets.conditional_toy_log_prob(
        ROTATED, centres @ np.array([[np.cos(np.pi / 8), np.sin(np.pi / 8)],
                                     [-np.sin(np.pi / 8), np.cos(np.pi / 8)]]),
        np.tile(context[0], (8, 1)))
    assert np.all(peak > between + 3)
    # E[log p(x|c)] from the grid equals the mean log-density of samples (all contexts:
    # a rotation keeps the entropy).
    expected = np.sum(density * log_p) * step**2
    x, c = datasets.conditional_toy(ROTATED, 40_000, seed=1)
    np.testing.assert_allclose(datasets.conditional_toy_log_prob(ROTATED, x, c).mean(), expected,
                               atol=0.02)


def test_conditional_toy_rejects_bad_arguments():
    x, c = datasets.conditional_toy(ROTATED, 5, seed=0)
    with pytest.raises(ValueError, match="`name` must be one of 'rotated-8gaussians'"):
        datasets.conditional_toy("8gaussians", 5)
    with pytest.raises(TypeError, match="`n`"):
        datasets.conditional_toy(ROTATED, 5.0)
    with pytest.raises(ValueError, match="`seed`"):
        datasets.conditional_toy(ROTATED, 5, seed=-3)
    with pytest.raises(ValueError, match="x and c must have the same number of rows.*5 and 4"):
        datasets.conditional_toy_log_prob(ROTATED, x, c[:4])
    with pytest.raises(ValueError, match=r"c must have shape \[N, 2\].*\[5, 3\]"):
        datasets.conditional_toy_log_prob(ROTATED, x, np.ones((5, 3)))
    with pytest.raises(ValueError, match="c must be finite"):
        datasets.conditional_toy_log_prob(ROTATED, x, np.full((5, 2), np.nan))
    with pytest.raises(ValueError, match="x must be finite"):
        datasets.conditional_toy_log_prob(ROTATED, np.full((5, 2), np.inf), c)
    off_circle = c.astype(np.float64).copy()
    off_circle[2] *= 1.001
    with pytest.raises(ValueError, match=r"c must lie on the unit circle .*row 2 .* norm 1\.00"):
        datasets.conditional_toy_log_prob(ROTATED, x, off_circle)
    # Within the tolerance the context is normalised: the same density.
    nearly = c.astype(np.float64) * (1 + 5e-7)
    np.testing.assert_allclose(datasets.conditional_toy_log_prob(ROTATED, x, nearly),
                               datasets.conditional_toy_log_prob(ROTATED, x, c), rtol=1e-12)
