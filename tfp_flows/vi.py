"""Variational inference with normalizing flows (Rezende & Mohamed 2015) and distillation.

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

Distillation (Parallel WaveNet, van den Oord et al. 2018): `distill` fits a student flow
that samples in one pass (e.g. `flows.iaf`) to a normalised teacher (e.g. a trained MAF,
whose density is one pass but whose sampling is sequential) by the same loop with
`p̃ = teacher.log_prob`, so `−ELBO = KL(student‖teacher)` and `log Z = 0`.

Evaluation: `log_normalizer_on_grid` computes `log Z` of a 2-D target on a fine grid, and
`exact_kl` then gives `KL(q‖p) = E_q[log q − log p̃] + log Z` with its Monte-Carlo error;
`kl(q, p)` is the same estimate for a normalised `p` in any dimension.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import time
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

from tfp_flows.checks import (
    check_dtype,
    check_integer,
    check_number,
    check_positive_integer,
    check_positive_number,
    check_seed,
)
from tfp_flows.training import all_finite

tfb = tfp.bijectors
tfd = tfp.distributions

TargetLogProb = Callable[[tf.Tensor], tf.Tensor]
LearningRate = float | Callable[[tf.Tensor], tf.Tensor]

_ADAM_BETA_1 = 0.9
_ADAM_BETA_2 = 0.999
_ADAM_EPSILON = 1e-8
_MAX_GRID_CELLS = 1 << 26  # 64 Mi cells: the grid's points alone take 1 GiB in float64

# Status codes of one Adam step (`_Adam.apply_if_finite`); 0 means the step was applied.
_APPLIED, _NONFINITE_LOSS, _BAD_LEARNING_RATE, _NONFINITE_UPDATE = 0, 1, 2, 3


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


def _check_initial_beta(initial_beta) -> float:
    return check_number("initial_beta", initial_beta, 0.0, 1.0, inclusive_minimum=False)


def inverse_temperature(step, annealing_steps: int, initial_beta: float) -> tf.Tensor:
    """Annealing schedule `β_t = min(1, β_0 + (1 − β_0) · t / annealing_steps)`; 1 when annealing_steps = 0."""
    annealing_steps = check_integer("annealing_steps", annealing_steps, minimum=0)
    initial_beta = _check_initial_beta(initial_beta)
    if isinstance(step, numbers.Number):
        check_integer("step", step, minimum=0)
    if annealing_steps == 0:
        return tf.ones_like(tf.cast(step, tf.float32))
    fraction = tf.cast(step, tf.float32) / float(annealing_steps)
    return tf.minimum(1.0, initial_beta + (1.0 - initial_beta) * fraction)


def _check_callable(name: str, value) -> None:
    if not callable(value):
        raise TypeError(f"`{name}` must be callable (a function of samples [N, event_size]); "
                        f"given {value!r} ({type(value).__name__}).")


def _check_vector_distribution(name: str, distribution, event_size: int | None = None) -> int:
    """A `tfd.Distribution` with scalar batch shape and event shape `[D]`; returns D."""
    if not isinstance(distribution, tfd.Distribution):
        raise TypeError(f"`{name}` must be a tfd.Distribution; given {type(distribution).__name__}.")
    event_shape = distribution.event_shape
    if event_shape.rank != 1 or not event_shape.is_fully_defined():
        raise ValueError(f"`{name}` must have event shape [event_size]; given {event_shape}.")
    if distribution.batch_shape.rank != 0:
        raise ValueError(f"`{name}` must have batch shape [] (one distribution); given "
                         f"{distribution.batch_shape}.")
    if not tf.as_dtype(distribution.dtype).is_floating:
        raise TypeError(f"`{name}` must have a floating-point dtype; given {distribution.dtype}.")
    size = int(event_shape[0])
    if event_size is not None and size != event_size:
        raise ValueError(f"`{name}` must have event shape [{event_size}] (event_size); given [{size}].")
    return size


def _check_learning_rate(learning_rate) -> LearningRate:
    if callable(learning_rate):
        return learning_rate
    return check_positive_number("learning_rate", learning_rate)


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
    `θ ← θ − lr · √(1 − β2^t) / (1 − β1^t) · m / (√v + ε)`. A step changes nothing unless the
    loss and gradient are finite, the learning rate is finite and ≥ 0, and every updated
    variable (after its constraint) is finite, so the variables stay finite.
    One flat state (instead of one per variable) keeps the compiled loop small for flows
    made of many tiny variables (a planar layer has three). Variable constraints are applied
    after each update, as Keras optimizers do.
    """

    def __init__(self, variables: Sequence[tf.Variable], learning_rate: LearningRate):
        self.variables = list(variables)
        self.dtype = self.variables[0].dtype
        self.sizes = [int(np.prod(v.shape)) for v in self.variables]
        size = sum(self.sizes)
        self.learning_rate = learning_rate
        self.iterations = tf.Variable(tf.zeros([], self.dtype), trainable=False, name="adam_iterations")
        self.first_moment = tf.Variable(tf.zeros([size], self.dtype), trainable=False, name="adam_m")
        self.second_moment = tf.Variable(tf.zeros([size], self.dtype), trainable=False, name="adam_v")

    def rate(self, iterations) -> tf.Tensor:
        """The learning rate after `iterations` updates (a schedule is evaluated there)."""
        if callable(self.learning_rate):  # a schedule of the update count, e.g. a Keras schedule
            return tf.cast(self.learning_rate(iterations), self.dtype)
        return tf.constant(self.learning_rate, self.dtype)

    def apply_if_finite(self, loss: tf.Tensor, gradients: Sequence[tf.Tensor]) -> tf.Tensor:
        """Take the step if it is valid; return its status (`_APPLIED` or the reason it was not)."""
        gradient = tf.concat([tf.reshape(g, [-1]) for g in gradients], axis=0)
        finite_inputs = all_finite([loss, gradient])
        learning_rate = self.rate(self.iterations)
        valid_rate = tf.logical_and(tf.math.is_finite(learning_rate), learning_rate >= 0.0)
        t = self.iterations + 1.0
        m = _ADAM_BETA_1 * self.first_moment + (1.0 - _ADAM_BETA_1) * gradient
        v = _ADAM_BETA_2 * self.second_moment + (1.0 - _ADAM_BETA_2) * tf.square(gradient)
        step_size = learning_rate * tf.sqrt(1.0 - _ADAM_BETA_2**t) / (1.0 - _ADAM_BETA_1**t)
        update = step_size * m / (tf.sqrt(v) + _ADAM_EPSILON)
        candidates = []
        for variable, piece in zip(self.variables, tf.split(update, self.sizes)):
            candidate = variable - tf.reshape(piece, variable.shape)
            if getattr(variable, "constraint", None) is not None:
                # e.g. the masks of TFP's AutoregressiveNetwork kernels: without them an IAF
                # loses its triangular Jacobian and its log-det formula becomes wrong.
                candidate = variable.constraint(candidate)
            candidates.append(candidate)
        finite_result = all_finite(candidates)
        status = tf.where(
            ~finite_inputs, _NONFINITE_LOSS,
            tf.where(~valid_rate, _BAD_LEARNING_RATE, tf.where(~finite_result, _NONFINITE_UPDATE, _APPLIED)),
        )
        apply = tf.equal(status, _APPLIED)
        self.iterations.assign(tf.where(apply, t, self.iterations))
        self.first_moment.assign(tf.where(apply, m, self.first_moment))
        self.second_moment.assign(tf.where(apply, v, self.second_moment))
        for variable, candidate in zip(self.variables, candidates):
            variable.assign(tf.where(apply, candidate, variable))
        return status


def _check_variables(variables: Sequence[tf.Variable], dtype: tf.DType) -> list[tf.Variable]:
    """Refuse trainable variables of another dtype than the base's, or holding NaN/inf."""
    variables = list(variables)
    distributed = [v.name for v in variables if isinstance(v, tf.distribute.DistributedValues)]
    if distributed:
        raise TypeError(f"the flow's variables must be plain tf.Variables, not distributed ones (the flow "
                        f"was built under a tf.distribute strategy's scope); given {distributed}.")
    mismatched = [v.name for v in variables if v.dtype != dtype]
    if mismatched:
        raise TypeError(f"all trainable variables must have the base distribution's dtype "
                        f"{dtype.name}; given other dtypes for {mismatched}.")
    not_finite = [v.name for v in variables if not bool(tf.reduce_all(tf.math.is_finite(v)))]
    if not_finite:
        raise ValueError(f"the flow's variables must be finite before training; NaN/inf in {not_finite}.")
    return variables


def _failure_message(status: int, step: int, num_steps: int, optimizer: _Adam) -> str:
    kept = f"after step {step - 1}" if step > 0 else "from before training"
    if status == _BAD_LEARNING_RATE:
        rate = float(optimizer.rate(optimizer.iterations))
        reason = (f"the learning_rate schedule gave {rate} after {step} updates (it must be finite "
                  "and >= 0)")
    elif status == _NONFINITE_UPDATE:
        reason = "the Adam update would have made a variable NaN/inf (overflow or its constraint)"
    else:
        reason = "the VI loss or its gradient became NaN/inf"
    return (f"{reason} at step {step} of {num_steps}; the step was not applied and the flow's "
            f"variables keep their values {kept}. Check where target_log_prob is finite, or lower "
            "learning_rate.")


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

    Step `t` draws `z ~ base` (stateless, seeded by `(seed, t)`, so a seed fixes the run; the
    default N(0, I) base by Philox), sets
    `x = f(z)`, `log q(x) = log base(z) − log|det ∂f/∂z|` and takes an Adam step on
    `mean(log q(x) − β_t · log p̃(x))`, β_t from `inverse_temperature` (annealing over
    `annealing_steps`, default `num_steps // 2`; 0 turns it off). `learning_rate` is a number > 0
    or a schedule of the step (e.g. `tf_keras.optimizers.schedules.CosineDecay`). `steps_per_call`
    steps run in one XLA-compiled `tf.while_loop`; the progress bar (verbose=1) shows their mean
    ELBO. `dtype` is that of the default base (a given `base_distribution` sets its own). The
    target is a TF function mapping `[batch, event_size]` to `[batch]`; it is checked on initial
    samples (shape, finiteness) before training. A step whose loss, gradient, learning rate or
    result is not finite is not applied: training stops with `FloatingPointError` and the
    variables keep the values of the last finite step. The variables stay finite whatever
    happens: they must be finite at the start, and each step writes either checked finite
    values or the old ones (an interruption mid-call leaves each variable at one or the other).
    """
    if not isinstance(bijector, tfb.Bijector):
        raise TypeError(f"`bijector` must be a tfb.Bijector; given {type(bijector).__name__}.")
    if tf.distribute.has_strategy():
        raise RuntimeError(
            f"vi.fit does not run under a tf.distribute strategy (called under "
            f"{type(tf.distribute.get_strategy()).__name__}): its compiled loop updates the variables "
            "on one device without a cross-replica gradient reduction. Call it outside "
            "strategy.scope() and strategy.run, on a flow built outside the scope."
        )
    _check_callable("target_log_prob", target_log_prob)
    event_size = check_positive_integer("event_size", event_size)
    num_steps = check_positive_integer("num_steps", num_steps)
    batch_size = check_positive_integer("batch_size", batch_size)
    seed = check_seed("seed", seed)
    learning_rate = _check_learning_rate(learning_rate)
    initial_beta = _check_initial_beta(initial_beta)
    annealing_steps = num_steps // 2 if annealing_steps is None else check_integer(
        "annealing_steps", annealing_steps, minimum=0)
    steps_per_call = check_positive_integer("steps_per_call", steps_per_call)
    verbose = check_integer("verbose", verbose, minimum=0, maximum=1)
    if bijector.forward_min_event_ndims > 1:
        raise ValueError(f"`bijector` must act on vectors (forward_min_event_ndims <= 1); given "
                         f"{bijector.forward_min_event_ndims}.")
    standard_base = base_distribution is None
    if standard_base:
        dtype = check_dtype("dtype", dtype)
        base_distribution = tfd.MultivariateNormalDiag(loc=tf.zeros([event_size], dtype))
    _check_vector_distribution("base_distribution", base_distribution, event_size)
    dtype = tf.as_dtype(base_distribution.dtype)
    # Variables built lazily (at the first draw) are checked again after it.
    _check_variables(list(bijector.trainable_variables) + list(base_distribution.trainable_variables), dtype)
    distribution = tfd.TransformedDistribution(base_distribution, bijector)
    if seed is None:
        seed = int(np.random.default_rng().integers(2**31 - 1))

    def draw(step):
        """`x = f(z)` and `log q(x) = log base(z) − log|det ∂f/∂z|` for a batch seeded by `(seed, step)`."""
        stateless_seed = tf.stack([tf.constant(seed, tf.int32), tf.cast(step, tf.int32)])
        if standard_base:
            # Philox explicitly: under XLA on CPU the default algorithm (which TFP's samplers
            # use) took 30x as long for 640 000 normals (1.58 s against 0.056 s, TF 2.21).
            z = tf.random.stateless_normal([batch_size, event_size], stateless_seed, dtype=dtype, alg="philox")
        else:
            z = base_distribution.sample(batch_size, seed=stateless_seed)
        x = bijector.forward(z)
        return x, base_distribution.log_prob(z) - bijector.forward_log_det_jacobian(z, event_ndims=1)

    # Eager pass on the first batch: builds lazily created variables (e.g. an IAF network)
    # and refuses a bad target before any compilation.
    x0, log_q0 = draw(0)
    _check_target_values(tf.convert_to_tensor(target_log_prob(x0)), batch_size, "target_log_prob")
    _check_target_values(log_q0, batch_size, "the flow's log q (check the bijector's parameters)")

    variables = _check_variables(distribution.trainable_variables, dtype)
    if not variables:
        raise ValueError("the bijector (and base distribution) own no trainable tf.Variable to fit.")
    optimizer = _Adam(variables, learning_rate)
    chunk = min(steps_per_call, num_steps)

    @tf.function(jit_compile=True)
    def run_steps(start_step, steps_in_call):
        def body(i, status, history):
            step = start_step + i
            beta = tf.cast(inverse_temperature(step, annealing_steps, initial_beta), dtype)
            with tf.GradientTape() as tape:
                x, log_q = draw(step)
                log_p = tf.cast(target_log_prob(x), dtype)
                loss = tf.reduce_mean(log_q - beta * log_p)
            elbo = tf.reduce_mean(log_p - log_q)
            status = optimizer.apply_if_finite(loss, tape.gradient(loss, variables))
            history = tf.tensor_scatter_nd_update(history, [[i]], tf.reshape(tf.cast(elbo, tf.float64), [1]))
            return i + 1, status, history

        def keep_going(i, status, history):
            return tf.logical_and(i < steps_in_call, tf.equal(status, _APPLIED))

        return tf.while_loop(
            keep_going,
            body,
            (tf.constant(0), tf.constant(_APPLIED), tf.zeros([chunk], tf.float64)),
            maximum_iterations=chunk,
        )

    progress = tf_keras.utils.Progbar(num_steps, stateful_metrics=["elbo", "beta"]) if verbose else None
    history = np.zeros([num_steps], np.float64)
    timed_steps, timed_seconds = 0, 0.0
    for done in range(0, num_steps, chunk):
        steps_in_call = min(chunk, num_steps - done)
        started = time.perf_counter()
        steps_done, status, chunk_history = run_steps(tf.constant(done), tf.constant(steps_in_call))
        steps_done, status = int(steps_done), int(status)
        if done > 0:
            timed_steps += steps_done
            timed_seconds += time.perf_counter() - started
        if status != _APPLIED:
            raise FloatingPointError(_failure_message(status, done + steps_done - 1, num_steps, optimizer))
        history[done : done + steps_done] = chunk_history.numpy()[:steps_done]
        if progress is not None:
            beta = float(inverse_temperature(done + steps_done - 1, annealing_steps, initial_beta))
            chunk_elbo = float(np.mean(history[done : done + steps_done]))
            progress.update(done + steps_done, values=[("elbo", chunk_elbo), ("beta", beta)])
    seconds_per_step = timed_seconds / timed_steps if timed_steps else float("nan")
    return VIResult(distribution=distribution, history=history, seconds_per_step=seconds_per_step)


def distill(
    student: tfb.Bijector,
    teacher: tfd.Distribution,
    num_steps: int,
    batch_size: int = 256,
    seed: int | None = 0,
    *,
    learning_rate: LearningRate = 1e-3,
    annealing_steps: int = 0,
    initial_beta: float = 0.01,
    base_distribution: tfd.Distribution | None = None,
    steps_per_call: int = 500,
    verbose: int = 1,
) -> VIResult:
    """Probability density distillation: `min KL(q‖p) = E_{x~q}[log q(x) − log p(x)]`.

    `q = student_# N(0, I)` (sampled through `student.forward` with its forward log-det, e.g.
    `flows.iaf`, one pass per layer), `p = teacher` a normalised `tfd.Distribution` with event
    shape `[D]` (e.g. a trained MAF, whose `log_prob` is one pass per layer). This is `fit` with
    `target_log_prob = teacher.log_prob`; since `log Z = 0`, the history is `−KL(q‖p)` per batch.
    Event size and dtype come from the teacher; only the student's (and a given base's)
    variables are trained. No annealing by default (`annealing_steps=0`): the teacher is a
    normalised density, and `β < 1` would fit `q` to the wider `p^β / Z_β` instead of `p`.
    """
    if not isinstance(student, tfb.Bijector):
        raise TypeError(f"`student` must be a tfb.Bijector; given {type(student).__name__}.")
    event_size = _check_vector_distribution("teacher", teacher)
    teacher_variables = {id(v) for v in teacher.trainable_variables}
    shared = [v.name for v in student.trainable_variables if id(v) in teacher_variables]
    if shared:
        raise ValueError(f"`student` and `teacher` must not share variables (the teacher stays "
                         f"fixed); shared: {shared}.")
    return fit(
        student, teacher.log_prob, event_size, num_steps, batch_size, seed,
        learning_rate=learning_rate, annealing_steps=annealing_steps, initial_beta=initial_beta,
        base_distribution=base_distribution, dtype=teacher.dtype, steps_per_call=steps_per_call,
        verbose=verbose,
    )


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
    At most 2^26 cells.
    """
    _check_callable("target_log_prob", target_log_prob)
    try:
        array = np.asarray(bounds, np.float64)
    except (TypeError, ValueError):
        array = None
    if array is None or array.shape != (2, 2) or not np.all(np.isfinite(array)) or not np.all(array[:, 1] > array[:, 0]):
        raise ValueError(
            "`bounds` must be ((z1_min, z1_max), (z2_min, z2_max)), finite, with min < max; "
            f"given {bounds!r}."
        )
    bounds = array
    if isinstance(n, (list, tuple, np.ndarray)):
        if len(n) != 2:
            raise ValueError(f"`n` must be an integer >= 3 or a pair of them; given {n!r}.")
        counts = (check_integer("n[0]", n[0], minimum=3), check_integer("n[1]", n[1], minimum=3))
    else:
        counts = (check_integer("n", n, minimum=3),) * 2
    if counts[0] * counts[1] > _MAX_GRID_CELLS:
        raise ValueError(f"`n` must give at most {_MAX_GRID_CELLS} grid cells; given {counts[0]} × {counts[1]}.")
    dtype = check_dtype("dtype", dtype)
    edge_tolerance = check_number("edge_tolerance", edge_tolerance, 0.0, 1.0, inclusive_minimum=False,
                                  inclusive_maximum=False)
    points_per_call = check_positive_integer("points_per_call", points_per_call)
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
    edge_share = math.exp(_logsumexp(edge) - total) if np.isfinite(edge).any() else 0.0
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
    flow: forward pass and forward log-det, no inverse), `samples_per_call` at a time. The
    standard error is `std(log q − log p̃) / √num_samples`.
    """
    _check_vector_distribution("distribution", distribution)
    _check_callable("target_log_prob", target_log_prob)
    log_z = check_number("log_z", log_z)
    num_samples = check_integer("num_samples", num_samples, minimum=2)
    seed = check_seed("seed", seed)
    samples_per_call = check_positive_integer("samples_per_call", samples_per_call)
    if seed is None:
        seed = int(np.random.default_rng().integers(2**31 - 1))
    differences = []
    for call, start in enumerate(range(0, num_samples, samples_per_call)):
        count = min(samples_per_call, num_samples - start)
        stateless_seed = tf.constant([seed, call], tf.int32)
        x, log_q = distribution.experimental_sample_and_log_prob(count, seed=stateless_seed)
        log_p = tf.convert_to_tensor(target_log_prob(x))
        if log_p.shape.as_list() != [count]:
            raise ValueError(
                f"target_log_prob must map samples of shape [N, event_size] to [N] = [{count}]; "
                f"given shape {log_p.shape.as_list()}."
            )
        differences.append(log_q.numpy().astype(np.float64) - log_p.numpy().astype(np.float64))
    difference = np.concatenate(differences)
    bad = ~np.isfinite(difference)
    if bad.any():
        raise FloatingPointError(
            f"log q − log p̃ is NaN/inf at {int(bad.sum())} of {num_samples} samples of q: "
            "the KL is undefined or infinite (q puts mass where the target is 0 or not finite)."
        )
    kl_estimate = float(np.mean(difference) + log_z)
    standard_error = float(np.std(difference, ddof=1) / math.sqrt(num_samples))
    return kl_estimate, standard_error


def kl(
    q: tfd.Distribution,
    p: tfd.Distribution,
    num_samples: int = 100_000,
    seed: int | None = None,
    *,
    samples_per_call: int = 50_000,
) -> tuple[float, float]:
    """Monte-Carlo `KL(q‖p) = E_{x~q}[log q(x) − log p(x)]` for normalised `p`; (estimate, standard error).

    `exact_kl(q, p.log_prob, 0, ...)`; both must have event shape `[D]` with the same `D`.
    """
    event_size = _check_vector_distribution("q", q)
    _check_vector_distribution("p", p, event_size)
    return exact_kl(q, p.log_prob, 0.0, num_samples, seed, samples_per_call=samples_per_call)
