"""Data sets with known structure for density estimation and variational inference.

* `toy(name, n, seed)`: 2-D samples from the toy densities of FFJORD's `toy_data`
  (`moons`, `8gaussians`, `checkerboard`, `pinwheel`, `2spirals`, `rings`).
* `toy_log_prob(name, x)`: the exact log-density, known for `8gaussians` only.
* `energy(name)`: the unnormalised log-densities `log p̃(z) = -U(z)` of Rezende & Mohamed
  (2015), Table 1, as TensorFlow functions of `[N, 2]` tensors.
* `digits(split, seed)`: scikit-learn's bundled 8×8 digits, dequantized to [0, 1).
* `conditional_toy(name, n, seed)`: `(x, c)` pairs from a conditional density `p(x|c)`
  with an exact `conditional_toy_log_prob(name, x, c)` (`rotated-8gaussians`).

Every argument is checked (`tfp_flows.checks`) before any work.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import tensorflow as tf

from tfp_flows.checks import (
    check_choice, check_finite_tensor, check_positive_integer, check_samples, check_seed,
)

TOY_NAMES = ("moons", "8gaussians", "checkerboard", "pinwheel", "2spirals", "rings")
CONDITIONAL_TOY_NAMES = ("rotated-8gaussians",)
ENERGY_NAMES = ("U1", "U2", "U3", "U4")
UNIT_CIRCLE_TOLERANCE = 1e-6
"""How far from 1 the norm of a context `c = (cos θ, sin θ)` may be."""
DIGITS_LEVELS = 17
"""Number of grey levels of the digits images (integers 0..16); dequantized values are
`(v + u) / DIGITS_LEVELS`, so a bits/dim figure uses a bin width of 1/17."""
DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 20240601

# 8 Gaussians: centres 4·(cos kπ/4, sin kπ/4) with std 0.5, then everything divided by √2.
EIGHT_GAUSSIANS_RADIUS = 4.0 / math.sqrt(2.0)
EIGHT_GAUSSIANS_STD = 0.5 / math.sqrt(2.0)


def _eight_gaussians_centres() -> np.ndarray:
    angles = np.arange(8) * np.pi / 4.0
    return EIGHT_GAUSSIANS_RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _moons(n: int, rng: np.random.Generator) -> np.ndarray:
    from sklearn.datasets import make_moons

    points, _ = make_moons(n_samples=n, noise=0.1, random_state=int(rng.integers(2**31 - 1)))
    # FFJORD's scaling puts the two moons around the origin.
    return points * 2.0 + np.array([-1.0, -0.2])


def _eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    component = rng.integers(8, size=n)
    points = _eight_gaussians_centres()[component] + EIGHT_GAUSSIANS_STD * rng.standard_normal((n, 2))
    return points


def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    # x1 uniform on [-2, 2); x2 uniform on one of two unit cells chosen to alternate with
    # floor(x1), so the occupied cells form a 4×4 checkerboard; then scaled by 2.
    x1 = rng.uniform(-2.0, 2.0, size=n)
    x2 = rng.uniform(0.0, 1.0, size=n) - 2.0 * rng.integers(2, size=n) + np.mod(np.floor(x1), 2.0)
    return 2.0 * np.stack([x1, x2], axis=1)


def _pinwheel(n: int, rng: np.random.Generator) -> np.ndarray:
    # Five arms: radial N(1, 0.3²), tangential N(0, 0.1²), each point rotated by its arm's
    # angle plus 0.25·exp(radial), then scaled by 2.
    num_arms, radial_std, tangential_std, rate = 5, 0.3, 0.1, 0.25
    arm = np.arange(n) % num_arms
    radial = 1.0 + radial_std * rng.standard_normal(n)
    tangential = tangential_std * rng.standard_normal(n)
    angle = 2.0 * np.pi * arm / num_arms + rate * np.exp(radial)
    cos, sin = np.cos(angle), np.sin(angle)
    points = np.stack([radial * cos - tangential * sin, radial * sin + tangential * cos], axis=1)
    return 2.0 * points[rng.permutation(n)]


def _two_spirals(n: int, rng: np.random.Generator) -> np.ndarray:
    # Arc parameter t = √u · 3π (540 degrees), point (-t cos t, t sin t) + U[0, 0.5)² jitter,
    # the second spiral the point reflection of the first; /3 and N(0, 0.1²) noise.
    half = (n + 1) // 2
    t = np.sqrt(rng.uniform(size=half)) * 3.0 * np.pi
    arm = np.stack([-np.cos(t) * t, np.sin(t) * t], axis=1) + 0.5 * rng.uniform(size=(half, 2))
    points = np.concatenate([arm, -arm], axis=0)[:n] / 3.0
    points = points + 0.1 * rng.standard_normal(points.shape)
    return points[rng.permutation(n)]


def _rings(n: int, rng: np.random.Generator) -> np.ndarray:
    # Four concentric circles of radii 3·(1, 0.75, 0.5, 0.25), points evenly spaced in angle
    # on each, plus N(0, 0.08²) noise.
    radii = (1.0, 0.75, 0.5, 0.25)
    sizes = [n // 4] * 3
    sizes.insert(3, n - sum(sizes))
    circles = []
    for radius, size in zip(radii, sizes):
        angle = np.linspace(0.0, 2.0 * np.pi, size, endpoint=False)
        circles.append(radius * np.stack([np.cos(angle), np.sin(angle)], axis=1))
    points = 3.0 * np.concatenate(circles, axis=0)[rng.permutation(n)]
    return points + 0.08 * rng.standard_normal(points.shape)


_TOY_SAMPLERS = {
    "moons": _moons,
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "pinwheel": _pinwheel,
    "2spirals": _two_spirals,
    "rings": _rings,
}


def toy(name: str, n: int, seed: int | None = None) -> np.ndarray:
    """Draw `n` points from the 2-D toy density `name` as a float32 array `[n, 2]`.

    Names: moons, 8gaussians, checkerboard, pinwheel, 2spirals, rings (FFJORD's toy data).
    The same `seed` gives the same points (`np.random.default_rng(seed)`).
    """
    name = check_choice("name", name, TOY_NAMES)
    n = check_positive_integer("n", n)
    rng = np.random.default_rng(check_seed("seed", seed))
    return _TOY_SAMPLERS[name](n, rng).astype(np.float32)


def toy_log_prob(name: str, x) -> np.ndarray:
    """Exact log-density of the toy data set `name` at points `x` `[N, 2]` (float64 `[N]`).

    Known only for `8gaussians`: `log p(x) = log( (1/8) Σ_k N(x; μ_k, s² I) )` with
    `μ_k = 4·(cos kπ/4, sin kπ/4)/√2` and `s = 0.5/√2`.
    """
    name = check_choice("name", name, TOY_NAMES)
    if name != "8gaussians":
        raise ValueError(
            f"`name` must be '8gaussians' (the only toy data set with a known density); given {name!r}."
        )
    return _eight_gaussians_log_prob(check_samples(x, (2,), name="x").astype(np.float64))


def _eight_gaussians_log_prob(points: np.ndarray) -> np.ndarray:
    squared = np.sum((points[:, None, :] - _eight_gaussians_centres()[None]) ** 2, axis=-1)
    log_components = (
        -0.5 * squared / EIGHT_GAUSSIANS_STD**2
        - math.log(2.0 * math.pi * EIGHT_GAUSSIANS_STD**2)
        - math.log(8.0)
    )
    peak = log_components.max(axis=1, keepdims=True)
    return (peak + np.log(np.sum(np.exp(log_components - peak), axis=1, keepdims=True)))[:, 0]


def _check_energy_input(z) -> tf.Tensor:
    try:
        z = tf.convert_to_tensor(z)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"z must be a float32 or float64 tensor of shape [N, 2]; given {type(z).__name__} "
            f"that TensorFlow cannot convert ({error})") from None
    if z.dtype not in (tf.float32, tf.float64):
        raise TypeError(f"z must be a float32 or float64 tensor of shape [N, 2]; given dtype {z.dtype.name}.")
    if z.shape.rank is not None and (z.shape.rank != 2 or z.shape[-1] not in (2, None)):
        raise ValueError(f"z must have shape [N, 2]; given shape {z.shape.as_list()}.")
    # Eagerly NaN/inf points are refused at once; traced (VI under XLA) they pass through.
    return check_finite_tensor("z", z) if tf.executing_eagerly() else z


def _safe_norm(z: tf.Tensor) -> tf.Tensor:
    # ‖z‖ with a zero (rather than NaN) gradient at z = 0.
    squared = tf.reduce_sum(tf.square(z), axis=-1)
    return tf.sqrt(tf.maximum(squared, np.finfo(z.dtype.as_numpy_dtype).tiny))


def _log_sum_exp2(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    return tf.reduce_logsumexp(tf.stack([a, b], axis=-1), axis=-1)


def _w1(z1):
    return tf.sin(2.0 * math.pi * z1 / 4.0)


def _log_p_u1(z):
    z1 = z[:, 0]
    ring = -0.5 * tf.square((_safe_norm(z) - 2.0) / 0.4)
    modes = _log_sum_exp2(-0.5 * tf.square((z1 - 2.0) / 0.6), -0.5 * tf.square((z1 + 2.0) / 0.6))
    return ring + modes


def _log_p_u2(z):
    z1, z2 = z[:, 0], z[:, 1]
    return -0.5 * tf.square((z2 - _w1(z1)) / 0.4)


def _log_p_u3(z):
    z1, z2 = z[:, 0], z[:, 1]
    w2 = 3.0 * tf.exp(-0.5 * tf.square((z1 - 1.0) / 0.6))
    return _log_sum_exp2(
        -0.5 * tf.square((z2 - _w1(z1)) / 0.35), -0.5 * tf.square((z2 - _w1(z1) + w2) / 0.35)
    )


def _log_p_u4(z):
    z1, z2 = z[:, 0], z[:, 1]
    w3 = 3.0 * tf.sigmoid((z1 - 1.0) / 0.3)
    return _log_sum_exp2(
        -0.5 * tf.square((z2 - _w1(z1)) / 0.4), -0.5 * tf.square((z2 - _w1(z1) + w3) / 0.35)
    )


_ENERGIES = {"U1": _log_p_u1, "U2": _log_p_u2, "U3": _log_p_u3, "U4": _log_p_u4}


def energy(name: str) -> Callable[[tf.Tensor], tf.Tensor]:
    """The unnormalised log-density `log p̃(z) = -U(z)` of Rezende & Mohamed's target `name`.

    With `w1 = sin(2πz1/4)`, `w2 = 3·exp(-½((z1-1)/0.6)²)`, `w3 = 3·sigmoid((z1-1)/0.3)`:

    * U1 = ½((‖z‖-2)/0.4)² - log(exp(-½((z1-2)/0.6)²) + exp(-½((z1+2)/0.6)²))
    * U2 = ½((z2-w1)/0.4)²
    * U3 = -log(exp(-½((z2-w1)/0.35)²) + exp(-½((z2-w1+w2)/0.35)²))
    * U4 = -log(exp(-½((z2-w1)/0.4)²) + exp(-½((z2-w1+w3)/0.35)²))

    U2-U4 do not decay along z1, so they are not normalisable on ℝ². The returned functions
    for U2, U3 and U4 include the envelope `exp(-z1²/32)`, i.e. they return `-U(z) - z1²/32`,
    which makes `log Z` finite. U1 is returned as is. The `-log(exp + exp)` terms are
    evaluated with `reduce_logsumexp`. The function takes `[N, 2]` float32 or float64
    tensors, returns `[N]` and compiles with XLA.
    """
    name = check_choice("name", name, ENERGY_NAMES)
    log_p = _ENERGIES[name]
    with_envelope = name != "U1"

    def log_p_tilde(z: tf.Tensor) -> tf.Tensor:
        z = _check_energy_input(z)
        value = log_p(z)
        if with_envelope:
            value = value - tf.square(z[:, 0]) / 32.0
        return value

    log_p_tilde.__name__ = f"log_p_tilde_{name}"
    log_p_tilde.__doc__ = f"Unnormalised log-density -U(z) of {name} for z of shape [N, 2]."
    return log_p_tilde


def digits(split: str = "train", seed: int | None = 0) -> np.ndarray:
    """scikit-learn's 1797 bundled 8×8 digits, dequantized, as float32 `[N, 8, 8, 1]` in [0, 1).

    Each pixel `v ∈ {0, …, 16}` becomes `(v + u) / 17` with `u ~ U[0, 1)` drawn from
    `np.random.default_rng(seed)`, so a model's density on [0, 1)^64 relates to the discrete
    probability by `log P(v) ≥ E_u[log p(y)] - 64·log 17` (bits/dim use `DIGITS_LEVELS`).
    The split is fixed, independent of `seed`: a permutation with a constant seed puts the
    first 20% (359 images) in `test` and the remaining 1438 in `train`. `seed=None`
    draws fresh noise.
    """
    split = check_choice("split", split, ("train", "test"))
    seed = check_seed("seed", seed)
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float64)
    order = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(images))
    num_test = int(round(DIGITS_TEST_FRACTION * len(images)))
    chosen = order[:num_test] if split == "test" else order[num_test:]
    values = images[chosen]
    noise_rng = np.random.default_rng(None if seed is None else [seed, split == "test"])
    noise = noise_rng.uniform(size=values.shape)
    dequantized = (values + noise) / DIGITS_LEVELS
    # float32 rounding could map values just below 1 to exactly 1.0; keep them in [0, 1).
    dequantized = np.minimum(dequantized.astype(np.float32), np.float32(1.0) - np.finfo(np.float32).epsneg)
    return dequantized[..., None]


def conditional_toy(name: str, n: int, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draw `n` pairs `(x, c)` from a 2-D conditional toy density, as float32 `[n, 2]` each.

    `rotated-8gaussians`: `θ ~ U[0, 2π)`, the context `c = (cos θ, sin θ)` and
    `x = R(θ) y` with `y` an 8gaussians point and `R(θ) = [[cos θ, −sin θ], [sin θ, cos θ]]`.
    The `y` are those of `toy("8gaussians", n, seed)` (drawn first from the same
    generator), so `R(θ)ᵀ x` recovers them. The same `seed` gives the same pairs.
    """
    name = check_choice("name", name, CONDITIONAL_TOY_NAMES)
    n = check_positive_integer("n", n)
    rng = np.random.default_rng(check_seed("seed", seed))
    points = _eight_gaussians(n, rng)
    theta = rng.uniform(0.0, 2.0 * np.pi, size=n)
    cos, sin = np.cos(theta), np.sin(theta)
    x = np.stack([cos * points[:, 0] - sin * points[:, 1],
                  sin * points[:, 0] + cos * points[:, 1]], axis=1)
    return x.astype(np.float32), np.stack([cos, sin], axis=1).astype(np.float32)


def conditional_toy_log_prob(name: str, x, c) -> np.ndarray:
    """Exact `log p(x|c)` (float64 `[N]`) of the conditional toy density `name`.

    `rotated-8gaussians`: a rotation keeps volume, so `log p(x|c) = log p_8g(R(θ)ᵀ x)` with
    `(cos θ, sin θ) = c`, `R(θ)ᵀ x = (c₁x₁ + c₂x₂, −c₂x₁ + c₁x₂)` and `p_8g` the density of
    `toy_log_prob("8gaussians", ·)`. `x` and `c` are `[N, 2]` with equal N; each `c` must
    lie on the unit circle (`|‖c‖ − 1| <= 1e-6`; it is then normalised).
    """
    name = check_choice("name", name, CONDITIONAL_TOY_NAMES)
    points = check_samples(x, (2,), name="x").astype(np.float64)
    context = check_samples(c, (2,), name="c").astype(np.float64)
    if len(points) != len(context):
        raise ValueError(
            f"x and c must have the same number of rows (one context per point); given "
            f"{len(points)} and {len(context)}.")
    norm = np.linalg.norm(context, axis=1)
    off = np.abs(norm - 1.0)
    if off.max() > UNIT_CIRCLE_TOLERANCE:
        row = int(np.argmax(off))
        raise ValueError(
            f"c must lie on the unit circle (c = (cos θ, sin θ), |‖c‖ - 1| <= "
            f"{UNIT_CIRCLE_TOLERANCE:g}); given row {row} = {context[row].tolist()} of norm "
            f"{norm[row]:.9g}.")
    cos, sin = (context / norm[:, None]).T
    rotated_back = np.stack([cos * points[:, 0] + sin * points[:, 1],
                             -sin * points[:, 0] + cos * points[:, 1]], axis=1)
    return _eight_gaussians_log_prob(rotated_back)
