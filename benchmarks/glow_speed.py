"""Training-step speed of our Glow vs TFP's `tfb.Glow`, same configuration, one run.

Both flows: 16x16x3 images, 2 levels x 4 steps (ActNorm, 1x1 conv, affine coupling),
coupling networks 3x3 conv -> 1x1 conv -> zero 3x3 conv with the same hidden width,
half the channels factored out after the first level to a standard normal (TFP's
learned-prior exit networks replaced by the identity, so both do the same work).
A step is `Adam(-mean log_prob(batch))`. Reported: Python tracing time, XLA compile
time (first call after tracing, minus one step), and the median step time with
`jit_compile=True` and without (plain `tf.function` graph). Steady-state steps are
interleaved across the four variants so machine load hits them alike.

Run: `.venv/bin/python benchmarks/glow_speed.py` (96 s measured on 2 shared cores).
"""
from __future__ import annotations

import datetime
import os
import pathlib
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_probability as tfp  # noqa: E402
import tf_keras  # noqa: E402

from tfp_flows.flows import glow  # noqa: E402

tfb = tfp.bijectors
tfd = tfp.distributions

IMAGE_SHAPE = (16, 16, 3)
LEVELS = 2
STEPS_PER_LEVEL = 4
HIDDEN = 64
BATCH = 32
ROUNDS = 7
STEPS_PER_ROUND = 3
MACHINE = "2 CPU cores, no GPU"


def ours() -> tfd.TransformedDistribution:
    flow = glow(IMAGE_SHAPE, levels=LEVELS, steps_per_level=STEPS_PER_LEVEL, hidden_channels=HIDDEN, seed=0)
    return tfd.TransformedDistribution(tfd.Sample(tfd.Normal(0.0, 1.0), IMAGE_SHAPE), flow)


def tfp_glow() -> tfd.TransformedDistribution:
    flow = tfb.Glow(
        output_shape=IMAGE_SHAPE,
        num_glow_blocks=LEVELS,
        num_steps_per_block=STEPS_PER_LEVEL,
        coupling_bijector_fn=lambda shape: tfb.GlowDefaultNetwork(shape, num_hidden=HIDDEN),
        exit_bijector_fn=lambda input_shape, output_chan: (lambda inputs: tfb.Identity()),
        seed=0,
    )
    latent_size = int(np.prod(IMAGE_SHAPE))
    return tfd.TransformedDistribution(tfd.Sample(tfd.Normal(0.0, 1.0), [latent_size]), flow)


def make_step(distribution: tfd.TransformedDistribution, jit_compile: bool):
    optimizer = tf_keras.optimizers.Adam(1e-4)
    variables = distribution.trainable_variables

    @tf.function(jit_compile=jit_compile)
    def step(x):
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(distribution.log_prob(x))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    return step


def main() -> str:
    rng = np.random.default_rng(0)
    batch = tf.constant(rng.uniform(0.0, 1.0, size=(BATCH,) + IMAGE_SHAPE), tf.float32)
    flows = {"ours (tfp_flows.flows.glow)": ours(), "TFP tfb.Glow": tfp_glow()}
    for name, distribution in flows.items():
        distribution.log_prob(batch)  # build Keras layers and run ActNorm's init
        print(f"{name}: {len(distribution.trainable_variables)} trainable variables, "
              f"{sum(int(np.prod(v.shape)) for v in distribution.trainable_variables)} parameters")

    steps, trace_s, first_call_s = {}, {}, {}
    for name, distribution in flows.items():
        for xla in (True, False):
            key = (name, xla)
            steps[key] = make_step(distribution, xla)
            start = time.perf_counter()
            steps[key].get_concrete_function(batch)
            trace_s[key] = time.perf_counter() - start
            start = time.perf_counter()
            loss = float(steps[key](batch))
            first_call_s[key] = time.perf_counter() - start
            assert np.isfinite(loss), (key, loss)
            print(f"{name}, xla={xla}: trace {trace_s[key]:.1f} s, first call {first_call_s[key]:.1f} s")

    timings = {key: [] for key in steps}
    for _ in range(ROUNDS):
        for key, step in steps.items():
            for _ in range(STEPS_PER_ROUND):
                start = time.perf_counter()
                step(batch).numpy()
                timings[key].append(time.perf_counter() - start)
    median = {key: float(np.median(values)) for key, values in timings.items()}

    names = list(flows)
    rows = []
    for name in names:
        compile_s = first_call_s[(name, True)] - median[(name, True)]
        rows.append(
            (name, trace_s[(name, True)], compile_s, 1e3 * median[(name, True)], 1e3 * median[(name, False)])
        )
    ours_row, theirs_row = rows
    ratios = ("ratio TFP / ours", *(t / o for t, o in zip(theirs_row[1:], ours_row[1:])))
    date = datetime.date.today().isoformat()
    lines = [
        f"# Glow training-step speed ({date}, {MACHINE})",
        "",
        f"Images {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}x{IMAGE_SHAPE[2]}, {LEVELS} levels x {STEPS_PER_LEVEL} steps, "
        f"hidden width {HIDDEN}, batch {BATCH}, Adam; median of {ROUNDS * STEPS_PER_ROUND} steps "
        "per variant, interleaved. GPU: not available in this run.",
        "",
        "| implementation | trace (s) | XLA compile (s) | step with XLA (ms) | step without XLA (ms) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(f"| {row[0]} | {row[1]:.1f} | {row[2]:.1f} | {row[3]:.1f} | {row[4]:.1f} |")
    lines.append(
        f"| **{ratios[0]}** | {ratios[1]:.2f}x | {ratios[2]:.2f}x | {ratios[3]:.2f}x | {ratios[4]:.2f}x |"
    )
    table = "\n".join(lines) + "\n"
    results = pathlib.Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / "glow_speed.md").write_text(table)
    return table


if __name__ == "__main__":
    print(main())
