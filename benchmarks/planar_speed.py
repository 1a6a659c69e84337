"""Planar flows on CPU: inverse vs forward cost, and FlowModel training steps vs plain loops.

    python benchmarks/planar_speed.py [--quick]

Everything is measured in one run, side by side, and reported as ratios:
1. one Planar layer: XLA-compiled inverse (four Newton steps, then the safeguarded
   loop only where needed) against the forward pass, and their gradients;
2. a training step of a 32-layer planar flow and of `flows.maf` 5 x [64, 64]
   (D = 2, batch 512, 100-step epochs): `FlowModel.fit` with its defaults and with
   `steps_per_execution=1`, against a plain `tf.function` loop (GradientTape +
   Adam over the same flow, no Keras, pre-made batches), with and without XLA;
   for MAF also a plain loop over a chain of TFP's `tfb.MaskedAutoregressiveFlow`
   with `tfb.AutoregressiveNetwork`. Medians of 6 passes / 6 epochs.
"""
from __future__ import annotations

import argparse
import datetime
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_probability as tfp  # noqa: E402

from epoch_clock import EpochClock  # noqa: E402
from nll_step import nll_adam_step  # noqa: E402
from report import publish  # noqa: E402
from tfp_flows import FlowModel, flows  # noqa: E402
from tfp_flows.bijectors import Planar  # noqa: E402
from tfp_flows.datasets import toy  # noqa: E402

tfb, tfd = tfp.bijectors, tfp.distributions
MACHINE = "2 CPU cores, no GPU"


def time_call(fn, repeats: int) -> float:
    """Median seconds of `fn()` after one warm-up call (which compiles)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def inverse_vs_forward(batch: int, dim: int, repeats: int) -> list[tuple[str, float]]:
    rng = np.random.default_rng(0)
    u = tf.Variable(rng.standard_normal(dim).astype(np.float32))
    w = tf.Variable(rng.standard_normal(dim).astype(np.float32))
    b = tf.Variable(np.float32(0.1))
    bijector = Planar(u, w, b)
    z = tf.constant(rng.standard_normal((batch, dim)).astype(np.float32))
    x = tf.constant(bijector.forward(z).numpy())

    def with_grad(direction):
        def run(v):
            with tf.GradientTape() as tape:
                out = tf.reduce_sum(direction(v))
            return tape.gradient(out, [u, w, b])
        return run

    rows = []
    for label, fn, arg in [
        ("forward", bijector.forward, z),
        ("inverse", bijector.inverse, x),
        ("forward + gradient", with_grad(bijector.forward), z),
        ("inverse + gradient", with_grad(bijector.inverse), x),
    ]:
        compiled = tf.function(fn, jit_compile=True)
        rows.append((label, time_call(lambda: tf.nest.map_structure(
            lambda t: t.numpy(), compiled(arg)), repeats)))
    return rows


def plain_tfp_step(bijector, dim: int, jit: bool):
    distribution = tfd.TransformedDistribution(tfd.MultivariateNormalDiag(tf.zeros(dim)), bijector)
    # Keras networks create their variables on the first call: build them before
    # collecting the variables, or the loop would train nothing (and look fast).
    bijector.forward(tf.zeros([1, dim]))
    variables = bijector.trainable_variables
    assert variables, "the plain loop must train the flow's variables"
    return nll_adam_step(distribution, variables, 1e-3, jit)


PASSES = 6


def seconds_per_plain_step(step, batches) -> float:
    """Median over `PASSES` passes over the batches of the time per step, after a compiling call."""
    step(batches[0]).numpy()
    passes = []
    for _ in range(PASSES):
        start = time.perf_counter()
        for x in batches:
            loss = step(x)
        loss.numpy()
        passes.append((time.perf_counter() - start) / len(batches))
    return float(np.median(passes))


def seconds_per_fit_step(model: FlowModel, data: np.ndarray, batch: int, jit: bool,
                         **compile_kwargs) -> float:
    """Median epoch time of `fit` (arrays in, default arguments) over its steps per epoch,
    the first (compiling) epoch excluded."""
    model.compile(learning_rate=1e-3, jit_compile=jit, **compile_kwargs)
    clock = EpochClock()
    model.fit(data, epochs=PASSES + 1, batch_size=batch, verbose=0, callbacks=[clock])
    return float(np.median(clock.seconds[1:])) / (len(data) // batch)


def training_steps(steps: int, batch: int) -> list[tuple[str, str, str, float]]:
    """Rows `(flow, mode, implementation, seconds per step)`."""
    data = toy("8gaussians", steps * batch, seed=0)
    batches = [tf.constant(data[i * batch:(i + 1) * batch]) for i in range(steps)]
    rows = []
    builders = [("planar 32", lambda: flows.planar_flow(2, 32, seed=0)),
                ("MAF 5x[64,64]", lambda: flows.maf(2, 5, [64, 64], seed=0))]
    for name, build in builders:
        for jit in (True, False):
            mode = "XLA" if jit else "no XLA"
            rows.append((name, mode, "FlowModel.fit, defaults (steps_per_execution='epoch')",
                         seconds_per_fit_step(FlowModel(build(), [2]), data, batch, jit)))
            rows.append((name, mode, "FlowModel.fit, steps_per_execution=1",
                         seconds_per_fit_step(FlowModel(build(), [2]), data, batch, jit,
                                              steps_per_execution=1)))
            rows.append((name, mode, "plain tf.function loop, same flow",
                         seconds_per_plain_step(plain_tfp_step(build(), 2, jit), batches)))
            if name.startswith("MAF"):
                tfp_maf = tfb.Chain([
                    tfb.MaskedAutoregressiveFlow(tfb.AutoregressiveNetwork(
                        params=2, hidden_units=[64, 64], activation="relu", event_shape=[2]))
                    for _ in range(5)])
                rows.append((name, mode, "plain tf.function loop, tfb.MaskedAutoregressiveFlow",
                             seconds_per_plain_step(plain_tfp_step(tfp_maf, 2, jit), batches)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    args = parser.parse_args()
    repeats, steps = (5, 30) if args.quick else (30, 100)

    lines = [f"Planar speed, {datetime.date.today()}, {MACHINE}, TF {tf.__version__}, "
             f"TFP {tfp.__version__}", ""]
    lines += ["| one Planar layer, D, batch 4096, XLA | ms | vs forward |", "| --- | --- | --- |"]
    for dim in (2, 64):
        rows = inverse_vs_forward(4096, dim, repeats)
        forward = dict(rows)["forward"]
        forward_grad = dict(rows)["forward + gradient"]
        for label, seconds in rows:
            ref = forward_grad if "gradient" in label else forward
            lines.append(f"| D={dim}: {label} | {1e3 * seconds:.3f} | {seconds / ref:.2f}x |")
    lines += ["", f"| training step, 8gaussians, batch 512, {steps}-step epochs | mode | "
              "implementation | ms/step | vs plain loop (same flow, same mode) |",
              "| --- | --- | --- | ---: | ---: |"]
    rows = training_steps(steps, 512)
    for flow, mode, how, seconds in rows:
        reference = next(s for f, m, h, s in rows
                         if (f, m) == (flow, mode) and h == "plain tf.function loop, same flow")
        lines.append(f"| {flow} | {mode} | {how} | {1e3 * seconds:.2f} | {seconds / reference:.2f}x |")
    publish(lines, os.path.join(os.path.dirname(__file__), "results", "planar_speed.md"))


if __name__ == "__main__":
    main()
