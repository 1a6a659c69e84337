"""Density estimation by dual ascent of the log-likelihood (Tabak & Vanden-Eijnden 2010).

`fit(x)` whitens the data, then pushes the points (the "markers") towards N(0, I) by
many small steps. Step t draws a random rotation `U_t`, then for every coordinate k
fits the 1-D map `φ(z) = a·z + φ0 + γ·√(ε² + (a·z − x0)²)` (`a = 1 − σ`) by one
regularised Newton step on the local log-likelihood

    L_k(σ, φ0, γ) = mean_j [log φ'(z_jk) − φ(z_jk)²/2],

taken at the identity (gradient and Hessian in closed form, `notes/math.md`), capped in
norm and clipped so the map stays invertible. The density of the data is

    log q(x) = log N(z_T; 0, I) + Σ_t Σ_k log φ_t,k'(·) − log|det L|,

with `z_0 = L⁻¹(x − m)` the whitened point (m the mean, L L^T the covariance).
Steps run in chunks, each chunk one XLA-compiled `tf.while_loop` over all markers and
coordinates; the fitted steps are stored as stacked arrays in a `DualAscentFlow`.

Choices (measured in `benchmarks/dual_ascent_bench.py`):
* ε, the smoothing of each map's kink on whitened data, defaults to `auto_eps(N, D) =
  2·D/√N`: sharp kinks (ε ≈ 0.05) where many points fill few dimensions (2-D toys),
  smooth ones (ε ≈ 3.5) where few points fill many (the 64-D digits), where sharp kinks
  overfit within a hundred steps.
* Early stopping: if no `validation_data` is given, `validation_fraction` of the points
  are held out; fitting stops once the validation log-likelihood has not improved for
  `patience` steps, and the best prefix of steps is kept.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_flows.bijectors.dual_ascent import (
    FLOW_MAX_ABS_GAMMA, FLOW_MIN_SLOPE, DualAscentFlow, map_forward,
)
from tfp_flows.checks import (
    check_fraction, check_integer, check_number, check_positive_integer, check_positive_number,
    check_samples, check_seed,
)

tfb = tfp.bijectors
tfd = tfp.distributions

__all__ = [
    "fit", "DualAscentResult", "auto_eps", "trainable_bijector", "static_batches", "newton_step",
]


def auto_eps(num_points: int, dim: int) -> float:
    """Default kink smoothing on whitened data: `ε = 2·D/√N`.

    Chosen from measurements (benchmarks/dual_ascent_bench.py): on 8gaussians (D = 2)
    test KL is flat for ε in [0.02, 0.13] with N = 1000 to 8000 (rule: 0.05 to 0.13);
    on the digits (D = 64, N ≈ 1300) test log-likelihood peaks for ε in [2, 4] (rule:
    3.5), while ε = 0.05 overfits within ~100 steps and ε = 8 barely moves.
    """
    num_points = check_positive_integer("num_points", num_points)
    dim = check_positive_integer("dim", dim)
    return 2.0 * dim / math.sqrt(num_points)


def newton_step(z, center, eps, max_step: float, max_abs_gamma: float, max_abs_sigma: float):
    """One regularised Newton step on `L_k = mean_j[log φ'(z_jk) − φ(z_jk)²/2]` at the identity.

    `z` is `[N, D]` (rotated markers), `center` `[D]`. Returns `(sigma, shift, gamma)`,
    each `[D]`: `β = −(H − μI)⁻¹ G` with `μ = max(0, λ_max(H) + 1/10)` so that the
    system is negative definite, `‖β‖ ≤ max_step`, then `|γ| ≤ max_abs_gamma`,
    `|σ| ≤ max_abs_sigma`.
    """
    dtype = z.dtype
    eps = tf.convert_to_tensor(eps, dtype)
    max_step, max_abs_gamma, max_abs_sigma = (
        tf.convert_to_tensor(value, dtype) for value in (max_step, max_abs_gamma, max_abs_sigma))
    d = z - center
    s = tf.sqrt(tf.square(eps) + tf.square(d))
    rho = d / s
    z_sq = tf.square(z)
    mean = lambda value: tf.reduce_mean(value, axis=0)  # noqa: E731
    gradient = tf.stack([mean(z_sq - 1.0), mean(-z), mean(rho - z * s)], axis=-1)  # [D, 3]
    h_ss = mean(-1.0 - z_sq)
    h_pp = -tf.ones_like(h_ss)
    h_gg = mean(-tf.square(rho) - tf.square(s))
    h_sp = mean(z)
    h_pg = mean(-s)
    h_sg = mean(-z * tf.square(eps) / (s * s * s) + z * s + z_sq * rho)
    hessian = tf.stack([
        tf.stack([h_ss, h_sp, h_sg], axis=-1),
        tf.stack([h_sp, h_pp, h_pg], axis=-1),
        tf.stack([h_sg, h_pg, h_gg], axis=-1),
    ], axis=-2)  # [D, 3, 3]
    mu = tf.maximum(_largest_eigenvalue_3x3(hessian) + 0.1, 0.0)
    # β solves (H − μI) β = −G; H − μI is negative definite with eigenvalues <= −0.1.
    step = -_solve_symmetric_3x3(hessian - mu[:, None, None] * tf.eye(3, dtype=dtype), gradient)
    norm = tf.norm(step, axis=-1, keepdims=True)
    step = step * tf.minimum(tf.ones_like(norm), max_step / tf.maximum(norm, 1e-30))
    sigma = tf.clip_by_value(step[:, 0], -max_abs_sigma, max_abs_sigma)
    gamma = tf.clip_by_value(step[:, 2], -max_abs_gamma, max_abs_gamma)
    return sigma, step[:, 1], gamma


def _largest_eigenvalue_3x3(matrix):
    """Largest eigenvalue of symmetric `[..., 3, 3]` matrices, in closed form (trigonometric
    solution of the characteristic cubic): elementwise ops only, cheap to compile."""
    a = matrix
    q = tf.linalg.trace(a) / 3.0
    off_sq = tf.square(a[..., 0, 1]) + tf.square(a[..., 0, 2]) + tf.square(a[..., 1, 2])
    diag_dev = tf.linalg.diag_part(a) - q[..., None]
    p = tf.sqrt((tf.reduce_sum(tf.square(diag_dev), axis=-1) + 2.0 * off_sq) / 6.0)
    safe_p = tf.where(p > 0, p, tf.ones_like(p))
    b = (a - q[..., None, None] * tf.eye(3, dtype=a.dtype)) / safe_p[..., None, None]
    half_det = 0.5 * _det_3x3(b)
    angle = tf.acos(tf.clip_by_value(half_det, -1.0, 1.0)) / 3.0
    return q + 2.0 * p * tf.cos(angle)


def _det_3x3(m):
    return (m[..., 0, 0] * (m[..., 1, 1] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 1])
            - m[..., 0, 1] * (m[..., 1, 0] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 0])
            + m[..., 0, 2] * (m[..., 1, 0] * m[..., 2, 1] - m[..., 1, 1] * m[..., 2, 0]))


def _solve_symmetric_3x3(m, rhs):
    """Solve `m x = rhs` for symmetric invertible `[..., 3, 3]` `m` by the adjugate."""
    c00 = m[..., 1, 1] * m[..., 2, 2] - m[..., 1, 2] * m[..., 1, 2]
    c01 = m[..., 0, 2] * m[..., 1, 2] - m[..., 0, 1] * m[..., 2, 2]
    c02 = m[..., 0, 1] * m[..., 1, 2] - m[..., 0, 2] * m[..., 1, 1]
    c11 = m[..., 0, 0] * m[..., 2, 2] - m[..., 0, 2] * m[..., 0, 2]
    c12 = m[..., 0, 1] * m[..., 0, 2] - m[..., 0, 0] * m[..., 1, 2]
    c22 = m[..., 0, 0] * m[..., 1, 1] - m[..., 0, 1] * m[..., 0, 1]
    det = m[..., 0, 0] * c00 + m[..., 0, 1] * c01 + m[..., 0, 2] * c02
    r0, r1, r2 = rhs[..., 0], rhs[..., 1], rhs[..., 2]
    return tf.stack([c00 * r0 + c01 * r1 + c02 * r2,
                     c01 * r0 + c11 * r1 + c12 * r2,
                     c02 * r0 + c12 * r1 + c22 * r2], axis=-1) / det[..., None]


@dataclasses.dataclass
class DualAscentResult:
    """What `fit` returns.

    `bijector` maps N(0, I) to the data: `Chain([Reshape?, Shift(m), ScaleMatvecTriL(L),
    Invert(flow)])`; `distribution` is the `TransformedDistribution` of N(0, I) by it;
    `history` holds per-step arrays (index t = after t steps, t = 0 is the Gaussian):
    `train_log_likelihood`, `validation_log_likelihood` (mean nats per point; absent
    without validation data), `seconds` (wall time at the end of the chunk holding the
    step). `num_steps` is the number of steps kept (the best validation prefix).
    """

    bijector: tfb.Bijector
    distribution: tfd.TransformedDistribution
    history: dict
    num_steps: int
    eps: float
    fit_seconds: float
    flow: DualAscentFlow
    mean: np.ndarray
    cholesky: np.ndarray
    event_shape: tuple

    def bijector_at(self, num_steps: int) -> tfb.Bijector:
        """The fitted bijector truncated to its first `num_steps` steps (0 to `self.num_steps`)."""
        return _assemble_bijector(_slice_flow(self.flow, num_steps), self.mean, self.cholesky,
                                  self.event_shape)

    def distribution_at(self, num_steps: int) -> tfd.TransformedDistribution:
        """The fitted distribution truncated to its first `num_steps` steps."""
        return _distribution(self.bijector_at(num_steps), self.flow.dtype, self.event_shape)


def _slice_flow(flow: DualAscentFlow, num_steps: int) -> DualAscentFlow:
    num_steps = check_integer("num_steps", num_steps, 0, flow.num_steps)
    return DualAscentFlow(flow.rotations[:num_steps], flow.sigma[:num_steps],
                          flow.shift[:num_steps], flow.gamma[:num_steps],
                          flow.center[:num_steps], flow.eps[:num_steps])


def _assemble_bijector(flow: tfb.Bijector, mean, cholesky, event_shape) -> tfb.Chain:
    dim = int(np.prod(event_shape))
    bijectors = [
        tfb.Shift(tf.constant(mean)),
        tfb.ScaleMatvecTriL(tf.constant(cholesky)),
        tfb.Invert(flow),
    ]
    if tuple(event_shape) != (dim,):
        bijectors.insert(0, tfb.Reshape(event_shape_out=list(event_shape), event_shape_in=[dim]))
    return tfb.Chain(bijectors, name="dual_ascent")


def _distribution(bijector: tfb.Bijector, dtype, event_shape) -> tfd.TransformedDistribution:
    dim = int(np.prod(event_shape))
    base = tfd.MultivariateNormalDiag(loc=tf.zeros([dim], dtype))
    return tfd.TransformedDistribution(base, bijector, name="dual_ascent")


def trainable_bijector(result: DualAscentResult) -> tfb.Chain:
    """`result.bijector` with `sigma, shift, gamma, center` as `tf.Variable`s, for SGD.

    Rotations, ε and the whitening stay constants (a rotation must stay orthogonal for
    its log-det to be 0). `DualAscentFlow` projects the variables onto the valid set,
    so any value SGD reaches is an invertible map. Batches must have a static size:
    XLA cannot compile the gradient of the steps' while loop when the batch size is
    unknown at tracing time (TF then needs run-time shape arithmetic inside the loop).
    `FlowModel.fit` on arrays batches them so; for a `tf.data.Dataset` use
    `static_batches`. The steps compose, so the learning rate must be small (Adam 3e-5
    on 8gaussians).
    """
    if not isinstance(result, DualAscentResult):
        raise TypeError("`result` must be a DualAscentResult (what dual_ascent.fit returns); "
                        f"given {type(result).__name__}.")
    flow = result.flow
    variables = {
        key: tf.Variable(getattr(flow, key), name=f"dual_ascent_{key}")
        for key in ("sigma", "shift", "gamma", "center")
    }
    trainable_flow = DualAscentFlow(flow.rotations, eps=flow.eps, **variables)
    return _assemble_bijector(trainable_flow, result.mean, result.cholesky, result.event_shape)


def static_batches(x, batch_size: int, seed: int | None = None) -> tf.data.Dataset:
    """Shuffled batches of `x` with a static batch size (`drop_remainder=True`), one epoch.

    Use it to fine-tune `trainable_bijector(result)` under XLA from a dataset.
    """
    array = check_samples(x, None, name="x")
    batch_size = check_integer("batch_size", batch_size, 1, len(array))
    seed = check_seed("seed", seed)
    dataset = tf.data.Dataset.from_tensor_slices(array)
    dataset = dataset.shuffle(len(array), seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size, drop_remainder=True)


# A point this many robust standard deviations (1.4826·MAD) from its column's median is
# an outlier that whitening cannot absorb: the covariance would be its alone.
OUTLIER_ROBUST_SDS = 1e8


def _check_outliers(x: np.ndarray, name: str) -> None:
    """Refuse a point more than `OUTLIER_ROBUST_SDS` robust standard deviations from its
    column's median (columns with MAD = 0 are left to the constant-column check)."""
    x64 = x.astype(np.float64)
    median = np.median(x64, axis=0)
    robust_sd = 1.4826 * np.median(np.abs(x64 - median), axis=0)
    spread = np.abs(x64 - median) / np.where(robust_sd > 0, robust_sd, np.inf)
    if spread.max() > OUTLIER_ROBUST_SDS:
        row, column = np.unravel_index(int(np.argmax(spread)), spread.shape)
        raise ValueError(
            f"{name} has an extreme outlier: row {row}, flat column {column} holds "
            f"{x64[row, column]:.3g}, {spread[row, column]:.3g} robust standard deviations "
            f"(1.4826·MAD = {robust_sd[column]:.3g}) from the column's median "
            f"{median[column]:.3g} (the limit is {OUTLIER_ROBUST_SDS:.0e}). Whitening by the "
            "covariance would squash every other point together; remove or clip outliers, "
            "or rescale the data first.")


def _whitening(x: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and Cholesky factor of the covariance, refusing degenerate data.

    The checks are scale-free (each column against its own magnitude, linear dependence
    on the correlation matrix), so columns of very different scales are fine.
    """
    num_points, dim = x.shape
    if num_points <= dim:
        raise ValueError(
            f"{name} needs more points than dimensions to estimate a full covariance: "
            f"expected N >= D + 1 = {dim + 1}; given N = {num_points} points of dimension {dim}.")
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=0)
    centred = x64 - mean
    with np.errstate(over="ignore"):
        variances = np.mean(centred**2, axis=0)
        covariance = centred.T @ centred / num_points
    if not np.isfinite(covariance).all():
        raise ValueError(
            f"{name} is too large to whiten: its covariance overflows float64 (largest "
            f"|x - mean| = {np.abs(centred).max():.3g}); rescale the data first.")
    magnitude = np.max(np.abs(x64), axis=0)
    constant = np.flatnonzero(variances <= (1e-12 * magnitude) ** 2)
    if constant.size:
        raise ValueError(
            f"{name} has {constant.size} constant column(s) (zero variance), the first at "
            f"flat index {constant[:5].tolist()}: a density on a degenerate set has no finite "
            "log-likelihood. Remove these columns or dequantize (add noise) first.")
    scale = np.sqrt(variances)
    smallest = float(np.linalg.eigvalsh(covariance / np.outer(scale, scale))[0])
    if smallest <= 1e-10:
        raise ValueError(
            f"{name} has a singular covariance (smallest eigenvalue of its correlation matrix "
            f"{smallest:.3g}): its columns are linearly dependent, so it has no density. "
            "Remove dependent columns or add noise first.")
    return mean, np.linalg.cholesky(covariance)


def _mean_log_likelihood(points, log_det):
    """Mean of `log N(points; 0, I) + log_det` over the points."""
    dim = points.shape[-1]
    return tf.reduce_mean(-0.5 * dim * math.log(2.0 * math.pi)
                          - 0.5 * tf.reduce_sum(tf.square(points), axis=-1) + log_det)


@tf.function(jit_compile=True)
def _run_chunk(markers, log_det, held_out, held_out_log_det, rotations, picks, settings):
    """Run `C` steps on the markers `[N, D]` (and the held-out points `[M, D]`) in XLA.

    `rotations [C, D, D]` and `picks [C, D]` (marker indices of the kinks) are drawn
    outside, so XLA compiles no QR; `settings = (eps, max_step, max_abs_gamma,
    max_abs_sigma)`. Returns the new states and per step `(sigma, shift, gamma, center,
    train_ll, held_out_ll)` stacked over the chunk (`held_out_ll` is 0 when M = 0).
    """
    chunk_size, dim = rotations.shape[0], rotations.shape[-1]
    has_validation = held_out.shape[0] > 0
    dtype = markers.dtype
    eps, max_step, max_abs_gamma, max_abs_sigma = tf.unstack(settings)
    arrays = [tf.TensorArray(dtype, size=chunk_size, element_shape=shape) for shape in
              ([dim], [dim], [dim], [dim], [], [])]

    def body(i, markers, log_det, held_out, held_out_log_det, arrays):
        rotation = rotations[i]
        markers = tf.linalg.matvec(rotation, markers)
        center = tf.gather_nd(markers, tf.stack([picks[i], tf.range(dim)], axis=-1))
        sigma, shift, gamma = newton_step(markers, center, eps, max_step,
                                          max_abs_gamma, max_abs_sigma)
        params = (1.0 - sigma, shift, gamma, center, eps)
        markers, log_derivative = map_forward(markers, *params)
        log_det = log_det + tf.reduce_sum(log_derivative, axis=-1)
        held_out_ll = tf.zeros([], dtype)
        if has_validation:
            held_out = tf.linalg.matvec(rotation, held_out)
            held_out, log_derivative = map_forward(held_out, *params)
            held_out_log_det = held_out_log_det + tf.reduce_sum(log_derivative, axis=-1)
            held_out_ll = _mean_log_likelihood(held_out, held_out_log_det)
        values = (sigma, shift, gamma, center, _mean_log_likelihood(markers, log_det),
                  held_out_ll)
        arrays = [array.write(i, value) for array, value in zip(arrays, values)]
        return i + 1, markers, log_det, held_out, held_out_log_det, arrays

    _, markers, log_det, held_out, held_out_log_det, arrays = tf.while_loop(
        lambda i, *_: i < chunk_size, body,
        (tf.constant(0), markers, log_det, held_out, held_out_log_det, arrays),
        maximum_iterations=chunk_size)
    return (markers, log_det, held_out, held_out_log_det,
            tuple(array.stack() for array in arrays))


def _random_steps(seed: int, first_step: int, count: int, dim: int, num_markers: int):
    """Haar-random rotations `[count, D, D]` (QR of Gaussian matrices, columns times
    sign(diag R)) and kink picks (marker indices) `[count, D]`, reproducible per seed."""
    rng = np.random.default_rng([seed, first_step])
    q, r = np.linalg.qr(rng.standard_normal((count, dim, dim)))
    rotations = q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
    picks = rng.integers(0, num_markers, size=(count, dim), dtype=np.int32)
    return rotations, picks


class _ProgressBar:
    """A one-line text progress bar on stderr, refreshed between chunks."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.start = total, enabled, time.perf_counter()

    def update(self, done: int, train_ll: float, validation_ll: float | None) -> None:
        if not self.enabled:
            return
        width = 30
        filled = int(width * done / self.total)
        text = (f"\rdual ascent {done:>6}/{self.total} [{'=' * filled}{' ' * (width - filled)}]"
                f" train ll {train_ll:.4f}")
        if validation_ll is not None:
            text += f"  val ll {validation_ll:.4f}"
        text += f"  {time.perf_counter() - self.start:.1f}s"
        sys.stderr.write(text)
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def fit(
    x,
    num_steps: int = 5000,
    validation_data=None,
    validation_fraction: float = 0.1,
    patience: int | None = 300,
    seed: int | None = None,
    eps: float | None = None,
    max_step: float = 0.1,
    max_abs_gamma: float = 0.5,
    max_abs_sigma: float = 0.5,
    chunk_size: int = 50,
    verbose: bool = True,
) -> DualAscentResult:
    """Fit a density `q(x)` to `x` `[N, *event_shape]` by dual ascent; see the module docstring.

    The fit is unconditional: conditional densities `p(x|c)` are not supported. Each
    step's maps are fitted non-parametrically to the markers themselves (one `σ, φ0, γ`
    per coordinate, shared by every point), so nothing in a step can depend on a context
    `c`; a conditional flow needs parameters that are functions of `c` (a network), which
    is what the SGD-trained builders in `tfp_flows.flows` provide.

    Every argument is checked before any work; `x` and `validation_data` are copied,
    never modified.

    Args:
      x: finite real data, any event shape (flattened to `D = prod(event_shape)` inside).
      num_steps: the most steps to run (an integer >= 0).
      validation_data: held-out points for early stopping; if None, a random
        `validation_fraction` (in [0, 1)) of `x` is held out (0 disables early stopping).
      patience: stop once the validation log-likelihood has not improved for this many
        steps (checked between chunks); None runs all `num_steps`. With validation
        data the best prefix is kept either way.
      seed: None or an integer in [0, 2**31 - 1]; makes the split, the rotations and the
        kink locations reproducible.
      eps: kink smoothing ε > 0 on whitened data; None uses `auto_eps(N, D)`.
      max_step: cap (> 0) on the Euclidean norm of each Newton step `(σ, φ0, γ)`.
      max_abs_gamma: per-step clip of |γ|, in [0, 0.999] (|γ| < 1 keeps φ' > 0).
      max_abs_sigma: per-step clip of |σ|, in [0, 0.999] (the slope 1 − σ stays > 0).
      chunk_size: steps per compiled call, >= 1 (the progress bar refreshes between them).
      verbose: show the progress bar (a bool).
    """
    array = check_samples(x, None, name="x")
    event_shape = tuple(int(d) for d in array.shape[1:])
    num_steps = check_integer("num_steps", num_steps, minimum=0)
    if patience is not None:
        patience = check_positive_integer("patience", patience)
    validation_fraction = check_fraction("validation_fraction", validation_fraction)
    seed = check_seed("seed", seed)
    eps = check_number("eps", eps, 0.0, inclusive_minimum=False, allow_none=True)
    max_step = check_positive_number("max_step", max_step)
    max_abs_gamma = check_number("max_abs_gamma", max_abs_gamma, 0.0, FLOW_MAX_ABS_GAMMA)
    max_abs_sigma = check_number("max_abs_sigma", max_abs_sigma, 0.0, 1.0 - FLOW_MIN_SLOPE)
    chunk_size = check_positive_integer("chunk_size", chunk_size)
    if not isinstance(verbose, (bool, np.bool_)):
        raise TypeError(f"`verbose` must be a bool; given {verbose!r} ({type(verbose).__name__}).")
    if validation_data is not None:
        validation_data = check_samples(validation_data, event_shape, name="validation_data")
    dtype = tf.float64 if array.dtype == np.float64 else tf.float32
    np_dtype = dtype.as_numpy_dtype
    dim = int(np.prod(event_shape))
    flat = array.reshape(len(array), dim).astype(np_dtype)
    _check_outliers(flat, "x")
    seed_value = int(np.random.default_rng(seed).integers(0, 2**31 - 1))

    if validation_data is not None:
        held_out = validation_data.reshape(len(validation_data), dim).astype(np_dtype)
        markers = flat
    elif validation_fraction > 0.0:
        order = np.random.default_rng(seed_value).permutation(len(flat))
        num_held_out = max(1, int(round(validation_fraction * len(flat))))
        held_out, markers = flat[order[:num_held_out]], flat[order[num_held_out:]]
    else:
        held_out, markers = np.zeros([0, dim], np_dtype), flat
    has_validation = len(held_out) > 0

    mean, cholesky = _whitening(
        markers, "x" if len(markers) == len(flat) else "x (without its held-out part)")
    log_det_whitening = -float(np.sum(np.log(np.diag(cholesky))))
    if eps is None:
        eps = auto_eps(len(markers), dim)

    def whiten(points):
        return np.linalg.solve(cholesky, (points.astype(np.float64) - mean).T).T

    whitened_held_out = whiten(held_out)
    if validation_data is not None and len(held_out) and (
            np.abs(whitened_held_out).max() > OUTLIER_ROBUST_SDS):
        row = int(np.argmax(np.abs(whitened_held_out).max(axis=1)))
        raise ValueError(
            f"validation_data row {row} lies {np.abs(whitened_held_out[row]).max():.3g} "
            f"standard deviations of x from the mean of x (whitened; the limit is "
            f"{OUTLIER_ROBUST_SDS:.0e}): an outlier or data on another scale.")
    settings = tf.constant([eps, max_step, max_abs_gamma, max_abs_sigma], dtype)
    state = (tf.constant(whiten(markers).astype(np_dtype)), tf.zeros([len(markers)], dtype),
             tf.constant(whitened_held_out.astype(np_dtype)), tf.zeros([len(held_out)], dtype))
    train_curve = [float(_mean_log_likelihood(state[0], state[1])) + log_det_whitening]
    validation_curve = ([float(_mean_log_likelihood(state[2], state[3])) + log_det_whitening]
                        if has_validation else [])
    seconds = [0.0]
    chunks = []
    progress = _ProgressBar(num_steps, verbose)
    start = time.perf_counter()
    steps_run = 0
    while steps_run < num_steps:
        rotations, picks = _random_steps(seed_value, steps_run, chunk_size, dim, len(markers))
        *state, arrays = _run_chunk(*state, tf.constant(rotations.astype(np_dtype)),
                                    tf.constant(picks), settings)
        arrays = [a.numpy() for a in arrays]
        take = min(chunk_size, num_steps - steps_run)
        chunks.append([rotations[:take].astype(np_dtype)] + [a[:take] for a in arrays[:4]])
        train_curve.extend((arrays[4][:take] + log_det_whitening).tolist())
        if has_validation:
            validation_curve.extend((arrays[5][:take] + log_det_whitening).tolist())
        steps_run += take
        seconds.extend([time.perf_counter() - start] * take)
        progress.update(steps_run, train_curve[-1],
                        validation_curve[-1] if has_validation else None)
        if not (np.isfinite(train_curve[-1]) and np.isfinite(validation_curve[-1:]).all()):
            progress.close()
            raise FloatingPointError(
                f"dual ascent produced a non-finite log-likelihood by step {steps_run}; "
                f"try a larger eps (given {eps}) or a smaller max_step (given {max_step}).")
        if has_validation and patience is not None:
            best = int(np.argmax(validation_curve))
            if len(validation_curve) - 1 - best >= patience:
                break
    progress.close()
    fit_seconds = time.perf_counter() - start

    kept = int(np.argmax(validation_curve)) if has_validation else steps_run
    if chunks:
        stacked = [np.concatenate([chunk[k] for chunk in chunks])[:kept] for k in range(5)]
    else:
        stacked = [np.zeros([0, dim, dim], np_dtype)] + [np.zeros([0, dim], np_dtype)] * 4
    rotations, sigma, shift, gamma, center = stacked
    flow = DualAscentFlow(rotations, sigma, shift, gamma, center,
                          np.full([kept, dim], eps, np_dtype))
    mean_c, cholesky_c = mean.astype(np_dtype), cholesky.astype(np_dtype)
    bijector = _assemble_bijector(flow, mean_c, cholesky_c, event_shape)
    history = {"train_log_likelihood": np.array(train_curve),
               "seconds": np.array(seconds)}
    if has_validation:
        history["validation_log_likelihood"] = np.array(validation_curve)
    return DualAscentResult(
        bijector=bijector,
        distribution=_distribution(bijector, dtype, event_shape),
        history=history,
        num_steps=kept,
        eps=float(eps),
        fit_seconds=fit_seconds,
        flow=flow,
        mean=mean_c,
        cholesky=cholesky_c,
        event_shape=event_shape,
    )

