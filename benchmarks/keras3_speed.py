"""Training-step time: tfp_flows.keras3.FlowModel.fit vs tfp_flows.FlowModel.fit vs a plain loop.

    python benchmarks/keras3_speed.py [--quick]

For each flow (planar 32 layers D=2 batch 512; MAF D=8 5x[64,64] batch 512; RealNVP
D=8 8 couplings [64,64] batch 512; Glow 16x16x3, 2 levels x 4 steps, hidden 64,
batch 32) the same definition and initial values are trained three ways in one
process: Keras 3 `fit`, tf_keras `fit` (both XLA, one epoch per compiled call),
and a plain `tf.function(jit_compile=True)` Adam step over the same
`TransformedDistribution` (`nll_step.nll_adam_step`). Epochs are interleaved
(one epoch of each path per round); per-step time is each epoch's time (from a
callback, or the loop's wall time) divided by its steps, median over rounds.
"First call" is the first epoch's time (trace + XLA compile + one epoch).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_probability as tfp  # noqa: E402
import tf_keras  # noqa: E402

import tfp_flows  # noqa: E402
from nll_step import nll_adam_step  # noqa: E402
from report import publish  # noqa: E402
from tfp_flows import flows as tf_flows  # noqa: E402
from tfp_flows.datasets import toy  # noqa: E402
from tfp_flows.keras3 import FlowModel as Keras3FlowModel  # noqa: E402
from tfp_flows.keras3 import flows as k3_flows  # noqa: E402

tfd = tfp.distributions
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "keras3_speed.md")
LEARNING_RATE = 1e-4


class EpochTimer(keras.callbacks.Callback):
    """Wall time of each epoch (Keras 3)."""

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.model.epoch_seconds.append(time.perf_counter() - self._start)


class TfKerasEpochTimer(tf_keras.callbacks.Callback):
    """Wall time of each epoch (tf_keras)."""

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.model.epoch_seconds.append(time.perf_counter() - self._start)


def cases(quick: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    steps = 4 if quick else 40  # enough that Keras' per-epoch overhead is small per step
    mix = rng.standard_normal((8, 8)) / np.sqrt(8)
    vectors = np.tanh(rng.standard_normal((steps * 512, 8)) @ mix * 2).astype(np.float32)
    return [
        dict(name="planar, 32 layers, D=2, batch 512", builder="planar_flow",
             args=(2, 32), kwargs=dict(seed=0), shape=[2], batch=512,
             x=toy("8gaussians", steps * 512, seed=0)),
        dict(name="MAF, D=8, 5 x [64, 64], batch 512", builder="maf",
             args=(8, 5), kwargs=dict(hidden_units=[64, 64], seed=0), shape=[8], batch=512,
             x=vectors),
        dict(name="RealNVP, D=8, 8 couplings [64, 64], batch 512", builder="realnvp",
             args=(8, 8), kwargs=dict(hidden_units=[64, 64], seed=0), shape=[8], batch=512,
             x=vectors),
        dict(name="Glow, 16x16x3, 2 levels x 4 steps, hidden 64, batch 32", builder="glow",
             args=([16, 16, 3],), kwargs=dict(levels=2, steps_per_level=4, hidden_channels=64,
                                                seed=0),
             shape=[16, 16, 3], batch=32,
             x=rng.uniform(0.05, 0.95, (steps // 2 * 32, 16, 16, 3)).astype(np.float32)),
    ]


def measure(case: dict, rounds: int) -> dict:
    x, batch = case["x"], case["batch"]
    steps = len(x) // batch
    k3 = Keras3FlowModel(getattr(k3_flows, case["builder"])(*case["args"], **case["kwargs"]),
                         case["shape"])
    k3.compile(learning_rate=LEARNING_RATE)
    k2 = tfp_flows.FlowModel(getattr(tf_flows, case["builder"])(*case["args"], **case["kwargs"]),
                             case["shape"])
    k2.compile(learning_rate=LEARNING_RATE)
    plain_flow = getattr(tf_flows, case["builder"])(*case["args"], **case["kwargs"])
    plain_flow.initialize(x[:batch])
    distribution = tfd.TransformedDistribution(tfd.Sample(tfd.Normal(0.0, 1.0), case["shape"]),
                                               plain_flow)
    step = nll_adam_step(distribution, plain_flow.trainable_variables, LEARNING_RATE, True)
    batches = [tf.constant(x[i * batch:(i + 1) * batch]) for i in range(steps)]

    def plain_epoch() -> float:
        start = time.perf_counter()
        for b in batches:
            loss = step(b)
        loss.numpy()
        return time.perf_counter() - start

    for model in (k3, k2):
        model.epoch_seconds = []
    def fit_epoch(model, timer) -> float:
        model.fit(x, batch_size=batch, epochs=1, verbose=0, callbacks=[timer])
        return model.epoch_seconds[-1]

    runs = {
        "keras3": lambda: fit_epoch(k3, EpochTimer()),
        "tf_keras": lambda: fit_epoch(k2, TfKerasEpochTimer()),
        "plain": plain_epoch,
    }
    first = {key: run() for key, run in runs.items()}
    per_step = {key: [] for key in runs}
    for _ in range(rounds):
        for key, run in runs.items():
            per_step[key].append(run() / steps)
    return {"steps": steps, "first": first,
            "per_step": {k: float(np.median(v)) for k, v in per_step.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run, few steps")
    args = parser.parse_args()
    rounds = 2 if args.quick else 4
    load = os.getloadavg()[0]
    rows = []
    for case in cases(args.quick):
        result = measure(case, rounds)
        per, first = result["per_step"], result["first"]
        print(case["name"], result, flush=True)
        labels = {"keras3": "tfp_flows.keras3.FlowModel.fit (Keras 3)",
                  "tf_keras": "tfp_flows.FlowModel.fit (tf_keras)",
                  "plain": "plain tf.function loop"}
        for key in ("keras3", "tf_keras", "plain"):
            rows.append(
                f"| {case['name']} | {labels[key]} | {per[key] * 1e3:.2f} | "
                f"{per[key] / per['tf_keras']:.2f}x | {per[key] / per['plain']:.2f}x | "
                f"{first[key]:.1f} |")
    header = [
        f"Keras 3 speed, {datetime.date.today().isoformat()}, {os.cpu_count()} CPU cores "
        f"({platform.machine()}, no GPU; 1-min load average {load:.1f} at the start: shared "
        f"machine), TF {tf.__version__}, TFP {tfp.__version__}, Keras {keras.__version__}, "
        f"tf_keras {tf_keras.__version__}; XLA everywhere; median of {rounds} interleaved "
        "epochs after the first.",
        "",
        "| flow | path | ms/step | vs tf_keras | vs plain loop | first epoch (s, compile incl.) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    if args.quick:
        print("\n".join(header + rows))
    else:
        publish(header + rows, RESULTS)


if __name__ == "__main__":
    main()
