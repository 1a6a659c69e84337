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


def test_toy_rejects_bad_arguments():
    with pytest.raises(ValueError, match="expected one of moons, 8gaussians"):
        datasets.toy("swissroll", 10)
    with pytest.raises(ValueError, match="n must be >= 1.*n=0"):
        datasets.toy("moons", 0)
    with pytest.raises(TypeError, match="integer"):
        datasets.toy("moons", 2.5)
    with pytest.raises(ValueError, match="only for '8gaussians'.*'moons'"):
        datasets.toy_log_prob("moons", np.zeros((3, 2)))
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
    with pytest.raises(ValueError, match="expected one of U1, U2, U3, U4"):
        datasets.energy("U5")
    log_p = datasets.energy("U1")
    with pytest.raises(ValueError, match=r"\[N, 2\].*\[4, 3\]"):
        log_p(tf.zeros([4, 3]))
    with pytest.raises(ValueError, match=r"\[N, 2\].*\[2\]"):
        log_p(tf.zeros([2]))
    with pytest.raises(TypeError, match="int32"):
        log_p(tf.zeros([4, 2], tf.int32))


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


def test_digits_rejects_unknown_split():
    with pytest.raises(ValueError, match="'train' or 'test'.*'valid'"):
        datasets.digits("valid")
