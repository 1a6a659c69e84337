"""Speed of a `tfp_flows.vi.fit` step against a hand-written TF loop of the same math.

Both run planar K = 32 on U1 (batch 256, annealed ELBO, Adam, stateless N(0, I) draws seeded
by (seed, step)), XLA-compiled, many steps per call in a `tf.while_loop`. The references
write the planar layers with raw TF ops (no TFP), with the parameters either stacked as
`u, w: [K, 2]`, `b: [K]` or held as three variables per layer like `flows.planar_flow`.
A fourth loop runs the raw loop's Adam around the library's TFP planar flow, which splits
the gap between vi.fit and raw TF into the flow's share and vi.fit's own (masked flat Adam,
finiteness check, ELBO history). Compile time is excluded. Repeats alternate between the
loops; the table reports the median ms/step, its ratio to the stacked raw loop's median, and
the median of the per-repeat ratios (each loop against the stacked raw loop of the same
repeat, which cancels most of the load that other processes put on a shared machine).

Run: .venv/bin/python benchmarks/vi_speed.py
"""
from __future__ import annotations

import datetime
import math
import pathlib
import platform
import time

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_flows import datasets, flows, vi

tfd = tfp.distributions

NUM_LAYERS = 32
BATCH_SIZE = 256
STEPS_PER_CALL = 2000
CALLS_PER_REPEAT = 3
REPEATS = 3
LEARNING_RATE = 1e-3
ANNEALING_STEPS = 10_000
SEED = 0
RESULTS = pathlib.Path(__file__).parent / "results" / "vi_speed.md"


def reference_trainer(target_log_prob, stacked: bool):
    """Planar-flow VI with raw TF ops; returns `run(start_step, num_steps) -> last ELBO`.

    x = z + û tanh(wᵀz + b), û = u + (softplus(wᵀu) − 1 − wᵀu) w / ‖w‖²,
    log q(x) = log N(z; 0, I) − Σ_k log(1 + (1 − tanh²) wᵀû).
    `stacked`: three variables u, w [K, 2], b [K]; otherwise three variables per layer
    (as `flows.planar_flow` holds them). Initialised as `flows.planar_flow` does.
    `wᵀx` is a multiply and a sum: written as `tf.linalg.matvec` (an XLA dot per layer and
    direction) the stacked loop took 1.28x as long on this 2-core CPU (0.422 vs 0.326 ms/step,
    medians of 4 interleaved repeats of 2000 steps, 2026-11-22).
    """
    rng = np.random.default_rng(SEED)
    w0 = rng.standard_normal((NUM_LAYERS, 2))
    u0 = np.log(np.expm1(1.0)) * w0 / np.sum(w0**2, axis=1, keepdims=True) + 0.01 * rng.standard_normal((NUM_LAYERS, 2))
    if stacked:
        u, w = tf.Variable(u0.astype(np.float32)), tf.Variable(w0.astype(np.float32))
        b = tf.Variable(np.zeros(NUM_LAYERS, np.float32))
        variables = [u, w, b]
    else:
        u = [tf.Variable(row.astype(np.float32)) for row in u0]
        w = [tf.Variable(row.astype(np.float32)) for row in w0]
        b = [tf.Variable(0.0) for _ in range(NUM_LAYERS)]
        variables = u + w + b

    def elbo_terms(step):
        z = tf.random.stateless_normal([BATCH_SIZE, 2], seed=tf.stack([SEED, step]))
        log_q = -0.5 * tf.reduce_sum(tf.square(z), axis=-1) - math.log(2.0 * math.pi)
        x = z
        for k in range(NUM_LAYERS):
            wu = tf.reduce_sum(w[k] * u[k])
            c = tf.math.softplus(wu) - 1.0
            u_hat = u[k] + (c - wu) / tf.reduce_sum(tf.square(w[k])) * w[k]
            h = tf.tanh(tf.reduce_sum(x * w[k], axis=-1) + b[k])
            log_q -= tf.math.log1p((1.0 - tf.square(h)) * c)
            x = x + h[:, None] * u_hat
        return log_q, target_log_prob(x)

    return adam_loop(elbo_terms, variables)


def tfp_flow_trainer(target_log_prob):
    """The same loop as the raw ones, but q is `flows.planar_flow` in a TransformedDistribution."""
    distribution = tfd.TransformedDistribution(
        tfd.MultivariateNormalDiag(tf.zeros(2)), flows.planar_flow(2, NUM_LAYERS, seed=SEED)
    )

    def elbo_terms(step):
        x, log_q = distribution.experimental_sample_and_log_prob(BATCH_SIZE, seed=tf.stack([SEED, step]))
        return log_q, target_log_prob(x)

    return adam_loop(elbo_terms, distribution.trainable_variables)


def adam_loop(elbo_terms, variables):
    """`run(start_step, num_steps)`: annealed-ELBO Adam steps in one XLA `tf.while_loop`."""
    moments = [(tf.Variable(tf.zeros_like(v)), tf.Variable(tf.zeros_like(v))) for v in variables]
    iterations = tf.Variable(0.0)

    @tf.function(jit_compile=True)
    def run(start_step, num_steps):
        def body(i, elbo):
            step = start_step + i
            beta = tf.minimum(1.0, 0.01 + 0.99 * tf.cast(step, tf.float32) / ANNEALING_STEPS)
            with tf.GradientTape() as tape:
                log_q, log_p = elbo_terms(step)
                loss = tf.reduce_mean(log_q - beta * log_p)
            gradients = tape.gradient(loss, variables)
            t = iterations + 1.0
            iterations.assign(t)
            step_size = LEARNING_RATE * tf.sqrt(1.0 - 0.999**t) / (1.0 - 0.9**t)
            for variable, gradient, (m, v) in zip(variables, gradients, moments):
                m.assign(0.9 * m + 0.1 * gradient)
                v.assign(0.999 * v + 0.001 * tf.square(gradient))
                variable.assign_sub(step_size * m / (tf.sqrt(v) + 1e-8))
            return i + 1, tf.reduce_mean(log_p - log_q)

        _, elbo = tf.while_loop(lambda i, _: i < num_steps, body, (tf.constant(0), tf.constant(0.0)))
        return elbo

    return run


def time_reference(run, start_step: int) -> float:
    started = time.perf_counter()
    for call in range(CALLS_PER_REPEAT):
        float(run(tf.constant(start_step + call * STEPS_PER_CALL), tf.constant(STEPS_PER_CALL)))
    return (time.perf_counter() - started) / (CALLS_PER_REPEAT * STEPS_PER_CALL)


def time_vi_fit(target_log_prob) -> float:
    # The first call traces and compiles; VIResult.seconds_per_step times the remaining calls.
    result = vi.fit(
        flows.planar_flow(2, NUM_LAYERS, seed=SEED), target_log_prob, 2,
        num_steps=(CALLS_PER_REPEAT + 1) * STEPS_PER_CALL, batch_size=BATCH_SIZE, seed=SEED,
        learning_rate=LEARNING_RATE, annealing_steps=ANNEALING_STEPS, steps_per_call=STEPS_PER_CALL,
        verbose=0,
    )
    return result.seconds_per_step


def main() -> None:
    target = datasets.energy("U1")
    references = {
        "raw TF loop, stacked variables u, w [K, 2], b [K]": reference_trainer(target, stacked=True),
        "raw TF loop, 3 variables per layer": reference_trainer(target, stacked=False),
        "the raw loop around `flows.planar_flow` (TFP), no vi.fit bookkeeping": tfp_flow_trainer(target),
    }
    for run in references.values():
        run(tf.constant(0), tf.constant(1))  # compile once
    times = {"`tfp_flows.vi.fit` (TFP Planar bijectors in a Chain)": []} | {name: [] for name in references}
    for repeat in range(REPEATS):
        times[next(iter(times))].append(time_vi_fit(target))
        for name, run in references.items():
            times[name].append(time_reference(run, repeat * CALLS_PER_REPEAT * STEPS_PER_CALL))
        print(f"repeat {repeat}: " + ", ".join(f"{name}: {1e3 * t[-1]:.3f} ms/step" for name, t in times.items()), flush=True)
    medians = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
    baseline_name = next(iter(references))
    baseline = medians[baseline_name]
    paired = {
        name: float(np.median(np.asarray(t) / np.asarray(times[baseline_name]))) for name, t in times.items()
    }
    table = "\n".join([
        f"VI step speed, planar K = {NUM_LAYERS} on U1, batch {BATCH_SIZE}, XLA, Adam; median of {REPEATS} "
        f"repeats of {CALLS_PER_REPEAT * STEPS_PER_CALL} steps (compilation excluded), loops interleaved.",
        "",
        "| loop | ms/step (median) | all repeats (ms/step) | ratio to raw TF (stacked) | median per-repeat ratio |",
        "| --- | --- | --- | --- | --- |",
        *[
            f"| {name} | {medians[name]:.3f} | {', '.join(f'{1e3 * t:.3f}' for t in times[name])} | "
            f"{medians[name] / baseline:.2f} | {paired[name]:.2f} |"
            for name in times
        ],
    ])
    header = (
        f"# VI step speed\n\n{datetime.date.today().isoformat()}, 2 CPU cores, no GPU "
        f"({platform.processor() or platform.machine()}; TF {tf.__version__}). "
        "GPU timings: no GPU host was available for this task.\n\n"
    )
    print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(header + table + "\n")


if __name__ == "__main__":
    main()
