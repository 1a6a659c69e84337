"""Training-step speed of our Glow vs TFP's `tfb.Glow`, same configuration, one run.

Both flows: 16x16x3 images, 2 levels x 4 steps (ActNorm, 1x1 conv, affine coupling),
coupling networks 3x3 conv -> 1x1 conv -> zero 3x3 conv with the same hidden width,
half the channels factored out after the first level to a standard normal (TFP's
learned-prior exit networks replaced by the identity, so both do the same work).
A step is `Adam(-mean log_prob(batch))`. Reported: Python tracing time and XLA compile
time (first call after tracing, minus one step), each the median over fresh processes
that alternate between the two flows (after a small warm-up compilation, so neither
pays XLA's one-off start-up); and the median step time with `jit_compile=True` and
without (plain `tf.function` graph), steps interleaved across the four variants in one
process so machine load hits them alike.

Run: `.venv/bin/python benchmarks/glow_speed.py` (about 4 minutes on 2 shared cores).
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_probability as tfp  # noqa: E402
import tf_keras  # noqa: E402

from nll_step import nll_adam_step  # noqa: E402
from tfp_flows.flows import glow  # noqa: E402

tfb = tfp.bijectors
tfd = tfp.distributions

IMAGE_SHAPE = (16, 16, 3)
LEVELS = 2
STEPS_PER_LEVEL = 4
HIDDEN = 64
BATCH = 32
ROUNDS = 20
STEPS_PER_ROUND = 3
COMPILE_PROCESSES = 5
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
    return nll_adam_step(distribution, distribution.trainable_variables, 1e-4, jit_compile)


BUILDERS = {"ours (tfp_flows.flows.glow)": ours, "TFP tfb.Glow": tfp_glow}


def example_batch() -> tf.Tensor:
    rng = np.random.default_rng(0)
    return tf.constant(rng.uniform(0.0, 1.0, size=(BATCH,) + IMAGE_SHAPE), tf.float32)


def warm_up_xla() -> None:
    """Compile a tiny conv + Adam step, so XLA's one-off start-up is paid before timing."""
    kernel = tf.Variable(tf.ones([3, 3, 1, 1]))
    optimizer = tf_keras.optimizers.Adam(1e-3)

    @tf.function(jit_compile=True)
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.nn.conv2d(x, kernel, 1, "SAME") ** 2)
        optimizer.apply_gradients([(tape.gradient(loss, kernel), kernel)])
        return loss

    step(tf.ones([1, 4, 4, 1])).numpy()


def time_compile(name: str) -> dict:
    """Trace and XLA-compile time of one flow's training step in this (fresh) process."""
    warm_up_xla()
    batch = example_batch()
    distribution = BUILDERS[name]()
    distribution.log_prob(batch)
    step = make_step(distribution, jit_compile=True)
    start = time.perf_counter()
    step.get_concrete_function(batch)
    trace_s = time.perf_counter() - start
    start = time.perf_counter()
    step(batch).numpy()
    first_call_s = time.perf_counter() - start
    later = []
    for _ in range(5):
        start = time.perf_counter()
        step(batch).numpy()
        later.append(time.perf_counter() - start)
    return {"trace_s": trace_s, "compile_s": first_call_s - float(np.median(later))}


def compile_times() -> dict:
    """Median trace and compile time per flow over fresh processes, alternating flows."""
    runs = {name: [] for name in BUILDERS}
    for _ in range(COMPILE_PROCESSES):
        for name in BUILDERS:
            out = subprocess.run(
                [sys.executable, __file__, "--compile-only", name],
                check=True, capture_output=True, text=True,
            ).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
            print(f"{name}: {runs[name][-1]}")
    return {
        name: {key: float(np.median([r[key] for r in results])) for key in ("trace_s", "compile_s")}
        for name, results in runs.items()
    }


def main() -> str:
    compiled = compile_times()
    warm_up_xla()
    batch = example_batch()
    flows = {name: build() for name, build in BUILDERS.items()}
    for name, distribution in flows.items():
        distribution.log_prob(batch)  # build Keras layers and run ActNorm's init
        print(f"{name}: {len(distribution.trainable_variables)} trainable variables, "
              f"{sum(int(np.prod(v.shape)) for v in distribution.trainable_variables)} parameters")

    steps = {}
    for name, distribution in flows.items():
        for xla in (True, False):
            steps[(name, xla)] = make_step(distribution, xla)
            loss = float(steps[(name, xla)](batch))
            assert np.isfinite(loss), (name, xla, loss)

    timings = {key: [] for key in steps}
    for _ in range(ROUNDS):
        for key, step in steps.items():
            for _ in range(STEPS_PER_ROUND):
                start = time.perf_counter()
                step(batch).numpy()
                timings[key].append(time.perf_counter() - start)
    median = {key: float(np.median(values)) for key, values in timings.items()}

    rows = []
    for name in flows:
        rows.append((name, compiled[name]["trace_s"], compiled[name]["compile_s"],
                     1e3 * median[(name, True)], 1e3 * median[(name, False)]))
    ours_row, theirs_row = rows
    ratios = ("ratio TFP / ours", *(t / o for t, o in zip(theirs_row[1:], ours_row[1:])))
    date = datetime.date.today().isoformat()
    lines = [
        f"# Glow training-step speed ({date}, {MACHINE})",
        "",
        f"Images {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}x{IMAGE_SHAPE[2]}, {LEVELS} levels x {STEPS_PER_LEVEL} steps, "
        f"hidden width {HIDDEN}, batch {BATCH}, Adam; step: median of {ROUNDS * STEPS_PER_ROUND} "
        f"steps per variant, interleaved; trace and compile: median of {COMPILE_PROCESSES} fresh "
        "processes per flow, alternating. GPU: not available in this run.",
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
    if len(sys.argv) == 3 and sys.argv[1] == "--compile-only":
        print(json.dumps(time_compile(sys.argv[2])))
    else:
        print(main())
