"""Variational inference with normalizing flows (Rezende & Mohamed 2015).

A flow `q = f_# q0` (base `q0`, by default `N(0, I)`) is fitted to an unnormalised
target density `p̃` by maximising the evidence lower bound

    ELBO = E_{z ~ q0}[log p̃(f(z)) − log q(f(z))],   log q(f(z)) = log q0(z) − log|det ∂f/∂z|,

which needs only the forward pass and the forward log-det: no inverse, so planar flows
and inverse autoregressive flows train at full speed. With `Z = ∫ p̃`,
`KL(q‖p) = log Z − ELBO ≥ 0`.

Training anneals the target (Rezende & Mohamed, section 6.2): step `t` minimises
`E[log q − β_t log p̃]` with `β_t` rising linearly from `initial_beta` to 1, meant to keep
the flow from settling on one mode of a multi-modal target early on. (Measured on U1 with
`flows.planar_flow`, which starts near the identity, runs without annealing reached the
same KL; a flow that starts contracted onto a point lost one lobe with or without it.)

Evaluation: `log_normalizer_on_grid` computes `log Z` of a 2-D target on a fine grid, and
`exact_kl` then gives `KL(q‖p) = E_q[log q − log p̃] + log Z` with its Monte-Carlo error.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

tfb = tfp.bijectors
tfd = tfp.distributions

TargetLogProb = Callable[[tf.Tensor], tf.Tensor]
LearningRate = float | Callable[[tf.Tensor], tf.Tensor]

_ADAM_BETA_1 = 0.9
_ADAM_BETA_2 = 0.999
_ADAM_EPSILON = 1e-8


@dataclasses.dataclass(frozen=True)
class VIResult:
    """Outcome of `fit`.

    distribution: the trained `tfd.TransformedDistribution` q (it holds the bijector's variables).
    history: ELBO `E_q[log p̃ − log q]` of every training step's batch (β = 1, in nats), shape [num_steps].
    seconds_per_step: wall time per step of the compiled loop, measured over the calls after the
        first (which traces and compiles); NaN when all steps ran in one call.
    """

    distribution: tfd.TransformedDistribution
    history: np.ndarray
    seconds_per_step: float


def inverse_temperature(step, annealing_steps: int, initial_beta: float) -> tf.Tensor:
    """Annealing schedule `β_t = min(1, β_0 + (1 − β_0) · t / annealing_steps)`; 1 when annealing_steps = 0."""
    if annealing_steps <= 0:
        return tf.ones_like(tf.cast(step, tf.float32))
    fraction = tf.cast(step, tf.float32) / float(annealing_steps)
    return tf.minimum(1.0, initial_beta + (1.0 - initial_beta) * fraction)


def _check_target_values(log_p: tf.Tensor, batch_size: int, name: str) -> None:
    """Refuse target outputs that are not a finite float vector of shape [batch]."""
    if not log_p.dtype.is_floating:
        raise TypeError(
            f"target_log_prob must return floating-point log-densities; given dtype {log_p.dtype.name}."
        )
    if log_p.shape.rank != 1 or log_p.shape[0] != batch_size:
        raise ValueError(
            f"target_log_prob must map samples of shape [batch, event_size] to log-densities of "
            f"shape [batch] = [{batch_size}]; given shape {log_p.shape.as_list()}."
        )
    values = log_p.numpy()
    bad = ~np.isfinite(values)
    if bad.any():
        first = int(np.argmax(bad))
        raise ValueError(
            f"{name} must be finite at samples of the initial flow; {int(bad.sum())} of "
            f"{batch_size} values are NaN/inf (the first, at index {first}, is {values[first]})."
        )


class _Adam:
    """Adam (Kingma & Ba 2015) on all variables as one flat vector, maskable inside an XLA loop.

    `m ← β1 m + (1 − β1) g`, `v ← β2 v + (1 − β2) g²`,
    `θ ← θ − lr · √(1 − β2^t) / (1 − β1^t) · m / (√v + ε)`; a step whose loss or gradient is
    not finite changes nothing.
    One flat state (instead of one per variable) keeps the compiled loop small for flows
    made of many tiny variables (a planar layer has three). Variable constraints are applied
    after each update, as Keras optimizers do.
    """

    def __init__(self, variables: Sequence[tf.Variable], learning_rate: LearningRate):
        self.variables = list(variables)
        self.dtype = self.variables[0].dtype
        mismatched = [v.name for v in self.variables if v.dtype != self.dtype]
        if mismatched:
            raise TypeError(
                f"all trainable variables must share one dtype ({self.dtype.name}, from "
                f"{self.variables[0].name}); given other dtypes for {mismatched}."
            )
        self.sizes = [int(np.prod(v.shape)) for v in self.variables]
        size = sum(self.sizes)
        self.learning_rate = learning_rate
        self.iterations = tf.Variable(tf.zeros([], self.dtype), trainable=False, name="adam_iterations")
        self.first_moment = tf.Variable(tf.zeros([size], self.dtype), trainable=False, name="adam_m")
        self.second_moment = tf.Variable(tf.zeros([size], self.dtype), trainable=False, name="adam_v")

    def apply_if_finite(self, loss: tf.Tensor, gradients: Sequence[tf.Tensor]) -> tf.Tensor:
        """Take the step only if `loss` and every gradient entry are finite; return that condition."""
        gradient = tf.concat([tf.reshape(g, [-1]) for g in gradients], axis=0)
        apply = tf.logical_and(tf.math.is_finite(loss), tf.reduce_all(tf.math.is_finite(gradient)))
        t = self.iterations + 1.0
        m = _ADAM_BETA_1 * self.first_moment + (1.0 - _ADAM_BETA_1) * gradient
        v = _ADAM_BETA_2 * self.second_moment + (1.0 - _ADAM_BETA_2) * tf.square(gradient)
        if callable(self.learning_rate):  # a schedule of the update count, e.g. a Keras schedule
            learning_rate = tf.cast(self.learning_rate(self.iterations), self.dtype)
        else:
            learning_rate = tf.constant(self.learning_rate, self.dtype)
        step_size = learning_rate * tf.sqrt(1.0 - _ADAM_BETA_2**t) / (1.0 - _ADAM_BETA_1**t)
        update = tf.where(apply, step_size * m / (tf.sqrt(v) + _ADAM_EPSILON), tf.zeros_like(m))
        self.iterations.assign(tf.where(apply, t, self.iterations))
        self.first_moment.assign(tf.where(apply, m, self.first_moment))
        self.second_moment.assign(tf.where(apply, v, self.second_moment))
        for variable, piece in zip(self.variables, tf.split(update, self.sizes)):
            variable.assign_sub(tf.reshape(piece, variable.shape))
            if getattr(variable, "constraint", None) is not None:
                # e.g. the masks of TFP's AutoregressiveNetwork kernels: without them an IAF
                # loses its triangular Jacobian and its log-det formula becomes wrong.
                variable.assign(variable.constraint(variable))
        return apply


def fit(
    bijector: tfb.Bijector,
    target_log_prob: TargetLogProb,
    event_size: int,
    num_steps: int,
    batch_size: int = 256,
    seed: int | None = None,
    *,
    learning_rate: LearningRate = 1e-3,
    annealing_steps: int | None = None,
    initial_beta: float = 0.01,
    base_distribution: tfd.Distribution | None = None,
    dtype: tf.DType = tf.float32,
    steps_per_call: int = 500,
    verbose: int = 1,
) -> VIResult:
    """Fit `q = bijector_# base` to the unnormalised density `exp(target_log_prob)` by maximising the ELBO.

    Step `t` draws `z ~ base` (stateless, seeded by `(seed, t)`, so a seed fixes the run), sets
    `x = f(z)`, `log q(x) = log base(z) − log|det ∂f/∂z|` and takes an Adam step on
    `mean(log q(x) − β_t · log p̃(x))`, β_t from `inverse_temperature` (annealing over
    `annealing_steps`, default `num_steps // 2`; 0 turns it off). `learning_rate` is a number or
    a schedule of the step (e.g. `tf_keras.optimizers.schedules.CosineDecay`). `steps_per_call` steps run
    in one XLA-compiled `tf.while_loop`; the progress bar shows their mean ELBO. `dtype` is that of
    the default base (a given `base_distribution` sets its own). The target is a TF function mapping `[batch, event_size]`
    to `[batch]`; it is checked on initial samples (shape, finiteness) before training. If a
    step's loss or gradient is not finite, training stops with `FloatingPointError` and the
    variables keep the values of the last finite step.
    """
    if not callable(target_log_prob):
        raise TypeError(f"target_log_prob must be callable; given {type(target_log_prob).__name__}.")
    for name, value, minimum in (
        ("event_size", event_size, 1),
        ("num_steps", num_steps, 1),
        ("batch_size", batch_size, 1),
        ("steps_per_call", steps_per_call, 1),
    ):
        if int(value) != value or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}; given {value!r}.")
    if not 0.0 < initial_beta <= 1.0:
        raise ValueError(f"initial_beta must lie in (0, 1]; given {initial_beta}.")
    if annealing_steps is None:
        annealing_steps = num_steps // 2
    if annealing_steps < 0:
        raise ValueError(f"annealing_steps must be >= 0; given {annealing_steps}.")

    if base_distribution is None:
        base_distribution = tfd.MultivariateNormalDiag(loc=tf.zeros([event_size], dtype))
    if base_distribution.event_shape.as_list() != [event_size]:
        raise ValueError(
            f"base_distribution must have event shape [{event_size}] (event_size); given "
            f"{base_distribution.event_shape.as_list()}."
        )
    dtype = tf.as_dtype(base_distribution.dtype)
    distribution = tfd.TransformedDistribution(base_distribution, bijector)
    if seed is None:
        seed = int(np.random.default_rng().integers(2**31 - 1))
    seed = int(seed)

    def draw(step):
        stateless_seed = tf.stack([tf.constant(seed, tf.int32), tf.cast(step, tf.int32)])
        return distribution.experimental_sample_and_log_prob(batch_size, seed=stateless_seed)

    # Eager pass on the first batch: builds lazily created variables (e.g. an IAF network)
    # and refuses a bad target before any compilation.
    x0, log_q0 = draw(0)
    _check_target_values(tf.convert_to_tensor(target_log_prob(x0)), batch_size, "target_log_prob")
    _check_target_values(log_q0, batch_size, "the flow's log q (check the bijector's parameters)")

    variables = distribution.trainable_variables
    if not variables:
        raise ValueError("the bijector (and base distribution) own no trainable tf.Variable to fit.")
    optimizer = _Adam(variables, learning_rate)
    chunk = min(int(steps_per_call), int(num_steps))

    @tf.function(jit_compile=True)
    def run_steps(start_step, steps_in_call):
        def body(i, finite, history):
            step = start_step + i
            beta = tf.cast(inverse_temperature(step, annealing_steps, initial_beta), dtype)
            with tf.GradientTape() as tape:
                x, log_q = draw(step)
                log_p = tf.cast(target_log_prob(x), dtype)
                loss = tf.reduce_mean(log_q - beta * log_p)
            elbo = tf.reduce_mean(log_p - log_q)
            finite = optimizer.apply_if_finite(loss, tape.gradient(loss, variables))
            history = tf.tensor_scatter_nd_update(history, [[i]], tf.reshape(tf.cast(elbo, tf.float64), [1]))
            return i + 1, finite, history

        def keep_going(i, finite, history):
            return tf.logical_and(i < steps_in_call, finite)

        steps_done, finite, history = tf.while_loop(
            keep_going,
            body,
            (tf.constant(0), tf.constant(True), tf.zeros([chunk], tf.float64)),
            maximum_iterations=chunk,
        )
        return steps_done, finite, history

    progress = tf_keras.utils.Progbar(num_steps, stateful_metrics=["elbo", "beta"]) if verbose else None
    history = np.zeros([num_steps], np.float64)
    done = 0
    timed_steps, timed_seconds = 0, 0.0
    while done < num_steps:
        steps_in_call = min(chunk, num_steps - done)
        started = time.perf_counter()
        steps_done, finite, chunk_history = run_steps(tf.constant(done), tf.constant(steps_in_call))
        steps_done = int(steps_done)
        if done > 0:
            timed_steps += steps_done
            timed_seconds += time.perf_counter() - started
        if not bool(finite):
            failed_step = done + steps_done - 1
            kept = f"after step {failed_step - 1}" if failed_step > 0 else "from before training"
            raise FloatingPointError(
                f"the VI loss or its gradient became NaN/inf at step {failed_step} of {num_steps}; "
                f"the flow's variables keep their values {kept}. Check where target_log_prob is "
                "finite, or lower learning_rate."
            )
        history[done : done + steps_done] = chunk_history.numpy()[:steps_done]
        done += steps_done
        if progress is not None:
            beta = float(inverse_temperature(done - 1, annealing_steps, initial_beta))
            chunk_elbo = float(np.mean(history[done - steps_done : done]))
            progress.update(done, values=[("elbo", chunk_elbo), ("beta", beta)])
    seconds_per_step = timed_seconds / timed_steps if timed_steps else float("nan")
    return VIResult(distribution=distribution, history=history, seconds_per_step=seconds_per_step)


def log_normalizer_on_grid(
    target_log_prob: TargetLogProb,
    bounds: Sequence[Sequence[float]],
    n: int | Sequence[int],
    *,
    dtype: tf.DType = tf.float32,
    edge_tolerance: float = 1e-6,
    points_per_call: int = 1 << 20,
) -> float:
    """`log Z = log ∫ p̃(z) dz` of a 2-D target by the midpoint rule on an `n × n` grid.

    `log Z ≈ logsumexp_ij log p̃(c_ij) + log(Δ1 Δ2)`, `c_ij` the cell centres of
    `bounds = ((z1_min, z1_max), (z2_min, z2_max))`. Raises `ValueError` when the outermost
    ring of cells holds more than `edge_tolerance` of the mass (the grid cuts off the target).
    """
    bounds = np.asarray(bounds, np.float64)
    if bounds.shape != (2, 2) or not np.all(bounds[:, 1] > bounds[:, 0]):
        raise ValueError(
            "bounds must be ((z1_min, z1_max), (z2_min, z2_max)) with min < max; "
            f"given {bounds.tolist()}."
        )
    counts = (int(n), int(n)) if np.ndim(n) == 0 else tuple(int(k) for k in n)
    if len(counts) != 2 or min(counts) < 3:
        raise ValueError(f"n must be an integer >= 3 or a pair of them; given {n!r}.")
    widths = (bounds[:, 1] - bounds[:, 0]) / np.asarray(counts)
    centres = [bounds[k, 0] + widths[k] * (np.arange(counts[k]) + 0.5) for k in range(2)]
    z1, z2 = np.meshgrid(centres[0], centres[1], indexing="ij")
    points = np.stack([z1.ravel(), z2.ravel()], axis=-1)

    values = []
    for start in range(0, len(points), points_per_call):
        block = tf.constant(points[start : start + points_per_call], dtype)
        log_p = tf.convert_to_tensor(target_log_prob(block))
        if log_p.shape.as_list() != [block.shape[0]]:
            raise ValueError(
                f"target_log_prob must map [N, 2] to [N] = [{block.shape[0]}]; given shape {log_p.shape.as_list()}."
            )
        values.append(log_p.numpy().astype(np.float64))
    log_p = np.concatenate(values).reshape(counts)
    if np.isnan(log_p).any() or np.isposinf(log_p).any():
        raise ValueError(
            f"target_log_prob must be finite or -inf on the grid; given {int(np.sum(~np.isfinite(log_p) & ~np.isneginf(log_p)))} NaN/+inf values."
        )
    total = _logsumexp(log_p)
    edge = np.concatenate([log_p[0], log_p[-1], log_p[1:-1, 0], log_p[1:-1, -1]])
    edge_share = math.exp(_logsumexp(edge) - total)
    if edge_share > edge_tolerance:
        raise ValueError(
            f"the grid's outermost cells hold {edge_share:.2e} of the mass (more than edge_tolerance="
            f"{edge_tolerance:.0e}): widen bounds {bounds.tolist()}."
        )
    return float(total + math.log(widths[0] * widths[1]))


def _logsumexp(values: np.ndarray) -> float:
    peak = float(np.max(values))
    if not np.isfinite(peak):
        raise ValueError("target_log_prob is -inf everywhere on the grid.")
    return peak + math.log(float(np.sum(np.exp(values - peak))))


def exact_kl(
    distribution: tfd.Distribution,
    target_log_prob: TargetLogProb,
    log_z: float,
    num_samples: int = 100_000,
    seed: int | None = None,
    *,
    samples_per_call: int = 50_000,
) -> tuple[float, float]:
    """`KL(q‖p) = E_q[log q(x) − log p̃(x)] + log Z` by Monte Carlo; returns (KL, standard error).

    Samples and `log q` come from `distribution.experimental_sample_and_log_prob` (for a
    flow: forward pass and forward log-det, no inverse). The standard error is
    `std(log q − log p̃) / √num_samples`.
    """
    if int(num_samples) != num_samples or num_samples < 2:
        raise ValueError(f"num_samples must be an integer >= 2; given {num_samples!r}.")
    if seed is None:
        seed = int(np.random.default_rng().integers(2**31 - 1))
    differences = []
    drawn = 0
    while drawn < num_samples:
        count = min(samples_per_call, num_samples - drawn)
        stateless_seed = tf.constant([int(seed), len(differences)], tf.int32)
        x, log_q = distribution.experimental_sample_and_log_prob(count, seed=stateless_seed)
        log_p = tf.convert_to_tensor(target_log_prob(x))
        if log_p.shape.as_list() != [count]:
            raise ValueError(
                f"target_log_prob must map samples of shape [N, event_size] to [N] = [{count}]; "
                f"given shape {log_p.shape.as_list()}."
            )
        differences.append(log_q.numpy().astype(np.float64) - log_p.numpy().astype(np.float64))
        drawn += count
    difference = np.concatenate(differences)
    bad = ~np.isfinite(difference)
    if bad.any():
        raise FloatingPointError(
            f"log q − log p̃ is NaN/inf at {int(bad.sum())} of {num_samples} samples of q: "
            "the KL is undefined or infinite (q puts mass where the target is 0 or not finite)."
        )
    kl = float(np.mean(difference) + log_z)
    standard_error = float(np.std(difference, ddof=1) / math.sqrt(num_samples))
    return kl, standard_error
