"""MAF training step: our MADE + MaskedAutoregressiveAffine against TFP's MaskedAutoregressiveFlow.

    python benchmarks/maf_speed.py [--quick]

D = 8, 5 layers reversed between, standard-normal base, batch 512, one Adam step on the
mean NLL under `tf.function(jit_compile=True)` (benchmarks/nll_step.py), for hidden units
[64, 64] and [256, 256]. Variants (same parameter count in each):
- TFP: `tfb.MaskedAutoregressiveFlow(tfb.AutoregressiveNetwork(params=2, ..., activation="relu"))`;
- ours: `MaskedAutoregressiveAffine` around `tfp_flows.networks.MADE` (one packed variable per layer);
- two crossings that attribute the gap: TFP's bijector with our MADE, ours with TFP's network.
All variants of a size are stepped interleaved in one process, one step each per round;
the table gives medians per variant, and the first call (trace + XLA compile).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_probability as tfp  # noqa: E402

from nll_step import nll_adam_step  # noqa: E402
from report import publish  # noqa: E402
from tfp_flows.bijectors.autoregressive import MaskedAutoregressiveAffine  # noqa: E402
from tfp_flows.networks import MADE  # noqa: E402

tfb, tfd = tfp.bijectors, tfp.distributions
MACHINE = f"{os.cpu_count()} CPU cores, no GPU"
D, LAYERS, BATCH = 8, 5, 512


def tfp_network(hidden):
    network = tfb.AutoregressiveNetwork(params=2, event_shape=[D], hidden_units=list(hidden),
                                        activation="relu")
    network.build((None, D))
    return lambda x: tf.unstack(network(x), axis=-1), network.trainable_variables


def our_network(hidden, seed):
    made = MADE(D, hidden)
    packed = tf.Variable(made.initial(np.random.default_rng(seed)).astype(np.float32))
    return lambda x: made(packed, x), [packed]


def flow(bijector_kind: str, network_kind: str, hidden) -> tuple[tfb.Bijector, list]:
    reverse = tfb.Permute(list(range(D - 1, -1, -1)))
    layers, variables = [], []
    for k in range(LAYERS):
        fn, weights = tfp_network(hidden) if network_kind == "tfp" else our_network(hidden, k)
        variables += weights
        if bijector_kind == "tfp":
            layers.append(tfb.MaskedAutoregressiveFlow(shift_and_log_scale_fn=fn))
        else:
            layers.append(MaskedAutoregressiveAffine(fn, D))
        if k + 1 < LAYERS:
            layers.append(reverse)
    return tfb.Chain(layers), variables


VARIANTS = [
    ("TFP (MaskedAutoregressiveFlow + AutoregressiveNetwork)", "tfp", "tfp"),
    ("ours (MaskedAutoregressiveAffine + MADE)", "ours", "ours"),
    ("TFP bijector + our MADE", "tfp", "ours"),
    ("our bijector + TFP network", "ours", "tfp"),
]


def measure(hidden, steps: int, data: tf.Tensor) -> list[tuple[str, int, float, float]]:
    base = tfd.MultivariateNormalDiag(tf.zeros(D))
    runs = []
    for label, bijector_kind, network_kind in VARIANTS:
        bijector, variables = flow(bijector_kind, network_kind, hidden)
        count = int(sum(np.prod(v.shape) for v in variables))
        step = nll_adam_step(tfd.TransformedDistribution(base, bijector), variables, 1e-3, True)
        start = time.perf_counter()
        step(data).numpy()
        runs.append((label, count, time.perf_counter() - start, step, []))
    for _ in range(3):  # warm-up after compilation
        for run in runs:
            run[3](data).numpy()
    for _ in range(steps):
        for run in runs:
            start = time.perf_counter()
            run[3](data).numpy()
            run[4].append(time.perf_counter() - start)
    counts = {c for _, c, *_ in runs}
    assert len(counts) == 1, f"parameter counts differ: {counts}"
    return [(label, count, first, float(np.median(times))) for label, count, first, _, times in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    args = parser.parse_args()
    steps = 10 if args.quick else 60
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(D, D))
    data = tf.constant((np.tanh(rng.normal(size=(BATCH, D))) @ mixing).astype(np.float32))

    load_before = os.getloadavg()[0]
    lines = [
        f"# MAF training step ({datetime.date.today()}, {MACHINE}, {platform.processor() or platform.machine()}, "
        f"TF {tf.__version__}, TFP {tfp.__version__})", "",
        f"D={D}, {LAYERS} layers reversed between, batch {BATCH}, Adam on the mean NLL, "
        f"tf.function(jit_compile=True); step: median of {steps} steps per variant, all "
        "variants of a size interleaved (one step each per round) in one process; first call: "
        "trace + XLA compile of the first step.", "",
        "| hidden units | implementation | parameters | first call (s) | step (ms) | vs TFP |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for hidden in ([64, 64], [256, 256]):
        rows = measure(hidden, steps, data)
        reference = rows[0][3]
        for label, count, first, seconds in rows:
            lines.append(f"| {hidden} | {label} | {count} | {first:.1f} | {1e3 * seconds:.2f} | "
                         f"{seconds / reference:.2f}x |")
    lines += ["", f"1-minute load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the "
              f"end (other jobs on these {os.cpu_count()} cores slow every variant; compare ratios)."]
    publish(lines, os.path.join(os.path.dirname(__file__), "results", "maf_speed.md"))


if __name__ == "__main__":
    main()
