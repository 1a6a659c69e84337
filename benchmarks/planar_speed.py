"""Planar flows on CPU: inverse vs forward cost, and FlowModel training steps vs plain loops.

    python benchmarks/planar_speed.py [--quick]

Everything is measured in one run, side by side, and reported as ratios:
1. one Planar layer: XLA-compiled inverse (safeguarded Newton, 50 fixed iterations)
   against the forward pass, and their gradients;
2. a training step of a 32-layer planar flow (D = 2, batch 512): `FlowModel.fit`
   with and without XLA against a plain `tf.function` loop (GradientTape + Adam on
   the same `TransformedDistribution`, no Keras), also with and without XLA; and
   the same comparison for TFP's own `MaskedAutoregressiveFlow` (our `flows.maf`
   in `FlowModel` against a plain loop over a chain of `tfb.MaskedAutoregressiveFlow`
   with TFP's `AutoregressiveNetwork`).
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
import tf_keras  # noqa: E402

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


def seconds_per_plain_step(step, batches) -> float:
    step(batches[0]).numpy()  # compile
    start = time.perf_counter()
    for x in batches:
        loss = step(x)
    loss.numpy()
    return (time.perf_counter() - start) / len(batches)


class _EpochClock(tf_keras.callbacks.Callback):
    """Epoch wall times; epoch-level hooks only, so Keras keeps dispatching steps ahead."""

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start)

    def on_train_begin(self, logs=None):
        self.seconds = []


def seconds_per_fit_step(model: FlowModel, data: np.ndarray, batch: int, jit: bool,
                         steps_per_execution: int = 1) -> float:
    """Median epoch time of `fit` over its steps per epoch, the first (compiling) epoch excluded."""
    model.compile(learning_rate=1e-3, jit_compile=jit, steps_per_execution=steps_per_execution)
    clock = _EpochClock()
    model.fit(data, epochs=4, batch_size=batch, verbose=0, shuffle=False, callbacks=[clock])
    return float(np.median(clock.seconds[1:])) / (len(data) // batch)


def training_steps(steps: int, batch: int) -> list[tuple[str, str, float]]:
    data = toy("8gaussians", steps * batch, seed=0)
    batches = [tf.constant(data[i * batch:(i + 1) * batch]) for i in range(steps)]
    rows = []
    for jit in (True, False):
        tag = "XLA" if jit else "no XLA"
        model = FlowModel(flows.planar_flow(2, 32, seed=0), event_shape=[2])
        rows.append(("planar 32", f"FlowModel.fit, {tag}", seconds_per_fit_step(model, data, batch, jit)))
        if jit:
            rows.append(("planar 32", "FlowModel.fit, XLA, steps_per_execution=10",
                         seconds_per_fit_step(model, data, batch, jit, 10)))
        rows.append(("planar 32", f"plain tf.function loop, {tag}",
                     seconds_per_plain_step(plain_tfp_step(flows.planar_flow(2, 32, seed=0), 2, jit),
                                            batches)))
    for jit in (True, False):
        tag = "XLA" if jit else "no XLA"
        model = FlowModel(flows.maf(2, 5, [64, 64]), event_shape=[2])
        rows.append(("MAF 5x[64,64]", f"FlowModel.fit (flows.maf), {tag}",
                     seconds_per_fit_step(model, data, batch, jit)))
        if jit:
            rows.append(("MAF 5x[64,64]", "FlowModel.fit (flows.maf), XLA, steps_per_execution=10",
                         seconds_per_fit_step(model, data, batch, jit, 10)))
        tfp_maf = tfb.Chain([
            tfb.MaskedAutoregressiveFlow(tfb.AutoregressiveNetwork(
                params=2, hidden_units=[64, 64], activation="relu", event_shape=[2]))
            for _ in range(5)])
        rows.append(("MAF 5x[64,64]", f"plain tf.function (tfb.MaskedAutoregressiveFlow), {tag}",
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
    lines += ["", "| training step, 8gaussians, batch 512 | implementation | ms/step | vs plain XLA loop |",
              "| --- | --- | --- | --- |"]
    rows = training_steps(steps, 512)
    for flow in dict.fromkeys(r[0] for r in rows):
        reference = next(s for f, how, s in rows if f == flow and how.startswith("plain") and how.endswith(", XLA"))
        for f, how, seconds in rows:
            if f == flow:
                lines.append(f"| {f} | {how} | {1e3 * seconds:.2f} | {seconds / reference:.2f}x |")
    publish(lines, os.path.join(os.path.dirname(__file__), "results", "planar_speed.md"))


if __name__ == "__main__":
    main()
