"""`FlowModel.fit` against a plain `tf.function(jit_compile=True)` loop, per training step.

    python benchmarks/fit_overhead.py [--quick] [--steps 8,64] [--only NAME_PART]
                                      [--front tf_keras|keras3] [--out FILE]

The same `TransformedDistribution` (`model.distribution`) and the same optimizer
class (tf_keras Adam, lr 1e-3) in both; the plain loop is `nll_adam_step` over
pre-made batch tensors, `fit` runs with default arguments (arrays in, equal
shuffled batches, `steps_per_execution="epoch"`, progress bar off). Rounds
alternate plain and fit: a round is 5 plain passes over the batches, then one
`fit` call of 6 epochs; each figure is the median over all passes (plain) and all
epochs but the first of each call (fit) of the time per step (fit: an epoch's
wall time, from the previous epoch's `on_epoch_end` to its own, over its steps, so
Keras' work between epochs counts). `--steps`: the epoch lengths (batches per pass
over the data, the data sized to match); the per-epoch cost that `fit` adds is
`(fit - plain) x steps`.
Also the first call: from `fit` (or the plain step's first call) to the end of the
first step, trace and XLA compile included. `--front keras3` times
`tfp_flows.keras3.FlowModel.fit` (Keras 3, the same flows from `tfp_flows.keras3.flows`)
against the same plain loop.
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

from epoch_clock import EpochClock, Keras3EpochClock  # noqa: E402
from nll_step import nll_adam_step  # noqa: E402
from report import publish  # noqa: E402
from tfp_flows import FlowModel, flows, keras3  # noqa: E402
from tfp_flows.datasets import toy  # noqa: E402

MACHINE = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU"


EPOCHS_PER_ROUND = 5


def workloads(steps: int):
    """`(name, (builder, args), event_shape, data, batch)`, the data `steps` batches long;
    `builder` names the function in `tfp_flows.flows` and `tfp_flows.keras3.flows`."""
    rng = np.random.default_rng(0)
    rows = 512 * steps
    eight = np.concatenate([toy("8gaussians", rows, seed=s) for s in range(4)], axis=1)
    images = rng.normal(size=(32 * steps, 16, 16, 3)).astype(np.float32)
    return [
        ("planar 32, D=2, batch 512", ("planar_flow", (2, 32)), [2],
         toy("8gaussians", rows, seed=0), 512),
        ("MAF D=8, 5 x [64, 64], batch 512", ("maf", (8, 5, [64, 64])), [8], eight, 512),
        ("MAF D=8, 5 x [256, 256], batch 512", ("maf", (8, 5, [256, 256])), [8], eight, 512),
        ("RealNVP D=8, 8 x [64, 64], batch 512", ("realnvp", (8, 8, [64, 64])), [8], eight, 512),
        ("Glow 16x16x3, 2 x 4, hidden 64, batch 32", ("glow", ([16, 16, 3], 2, 4, 64)),
         [16, 16, 3], images, 32),
    ]


FRONTS = {"tf_keras": (FlowModel, flows, EpochClock),
          "keras3": (keras3.FlowModel, keras3.flows, Keras3EpochClock)}


def measure(flow, event_shape, data, batch: int, rounds: int, front: str) -> dict:
    steps = len(data) // batch
    builder, arguments = flow
    model_class, front_flows, clock_class = FRONTS[front]
    # Plain loop over the same kind of distribution, its own copy of the flow.
    plain_flow = getattr(flows, builder)(*arguments, seed=0)
    plain_model = FlowModel(plain_flow, event_shape)  # only for its distribution
    plain_flow.initialize(data[:batch])
    step = nll_adam_step(plain_model.distribution, plain_model.trainable_variables, 1e-3, True)
    batches = [tf.constant(data[i * batch:(i + 1) * batch]) for i in range(steps)]
    start = time.perf_counter()
    step(batches[0]).numpy()
    plain_first = time.perf_counter() - start
    model = model_class(getattr(front_flows, builder)(*arguments, seed=0), event_shape)
    model.compile(learning_rate=1e-3)
    clock = clock_class()
    start = time.perf_counter()
    model.fit(data, epochs=1, batch_size=batch, verbose=0, callbacks=[clock])
    fit_first_epoch = time.perf_counter() - start
    plain, fit = [], []
    for _ in range(rounds):
        # Plain: `epochs` passes over the batches; fit: one call of `epochs` epochs, so
        # that fit's iterator and per-call set-up are paid once, as in real training;
        # its first epoch (the call's set-up and first batches) is left out.
        for _ in range(EPOCHS_PER_ROUND):
            start = time.perf_counter()
            for x in batches:
                loss = step(x)
            loss.numpy()
            plain.append((time.perf_counter() - start) / steps)
        model.fit(data, epochs=EPOCHS_PER_ROUND + 1, batch_size=batch, verbose=0, callbacks=[clock])
        fit.extend(seconds / steps for seconds in clock.seconds[1:])
    return {"plain": float(np.median(plain)), "fit": float(np.median(fit)),
            "plain_first": plain_first, "fit_first_epoch": fit_first_epoch, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--steps", default="8,64", help="epoch lengths in batches, comma-separated")
    parser.add_argument("--only", default="", help="run the workloads whose name contains this")
    parser.add_argument("--front", default="tf_keras", choices=sorted(FRONTS),
                        help="whose FlowModel.fit: tf_keras (tfp_flows.FlowModel) or Keras 3")
    parser.add_argument("--out", default=None,
                        help="the table's file (default benchmarks/results/fit_overhead.md, "
                             "fit_overhead_keras3.md with --front keras3)")
    args = parser.parse_args()
    if args.out is None:
        suffix = "" if args.front == "tf_keras" else f"_{args.front}"
        args.out = os.path.join(os.path.dirname(__file__), "results", f"fit_overhead{suffix}.md")
    rounds = 2 if args.quick else 4
    front = ("tfp_flows.FlowModel.fit (tf_keras)" if args.front == "tf_keras"
             else "tfp_flows.keras3.FlowModel.fit (Keras 3)")
    lines = [f"{front} vs a plain jit loop, {datetime.date.today()}, {MACHINE}, "
             f"TF {tf.__version__}, TFP {tfp.__version__}, tf_keras {tf_keras.__version__}, "
             f"Keras {keras.__version__}", "",
             "| workload | steps per epoch | plain loop ms/step | FlowModel.fit ms/step | "
             "fit / plain | fit's extra ms per epoch | plain first step (s) | "
             "fit first epoch (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for steps in (int(s) for s in args.steps.split(",")):
        for name, flow, shape, data, batch in workloads(steps):
            if args.only not in name:
                continue
            r = measure(flow, shape, data, batch, rounds, args.front)
            extra = 1e3 * (r["fit"] - r["plain"]) * r["steps"]
            lines.append(f"| {name} | {r['steps']} | {1e3 * r['plain']:.2f} | "
                         f"{1e3 * r['fit']:.2f} | {r['fit'] / r['plain']:.2f}x | {extra:.2f} | "
                         f"{r['plain_first']:.1f} | {r['fit_first_epoch']:.1f} |")
            print(lines[-1], flush=True)
    publish(lines, args.out)


if __name__ == "__main__":
    main()
