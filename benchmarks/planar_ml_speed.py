"""Planar maximum-likelihood step: today's Planar (commit 4e1da99) against the current one.

    python benchmarks/planar_ml_speed.py [--steps 40] [--out benchmarks/results/planar_ml_speed.md]

A 32-layer planar flow (D = 2, batch 512, Adam, `tf.function(jit_compile=True)`,
`tfd.TransformedDistribution(standard normal, flow)`) trained on 8gaussians by NLL;
`log_prob` runs each layer's inverse (the Newton solve). Three flows: a `tfb.Chain`
of 32 old `Planar` (read from git at run time, `git show 4e1da99:...planar.py`, into
a temporary directory and imported from there), a Chain of 32 current `Planar`, and
the `PlanarStack` that `flows.planar_flow` builds (one loop over the layers); all
start from the same parameters. Steps are timed interleaved (old, new, old, ...) after warm-up; medians
over `--steps` steps each. The first call (trace + XLA compile) is timed too.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_probability as tfp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nll_step import nll_adam_step  # noqa: E402
from report import publish  # noqa: E402
from tfp_flows.bijectors import Planar, PlanarStack  # noqa: E402
from tfp_flows.datasets import toy  # noqa: E402

tfb, tfd = tfp.bijectors, tfp.distributions
OLD_COMMIT = "4e1da99"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def old_planar_class():
    """`Planar` as of OLD_COMMIT, imported from a file written by `git show`."""
    source = subprocess.run(
        ["git", "-C", REPO, "show", f"{OLD_COMMIT}:tfp_flows/bijectors/planar.py"],
        check=True, capture_output=True, text=True,
    ).stdout
    path = os.path.join(tempfile.mkdtemp(), "old_planar.py")
    with open(path, "w") as handle:
        handle.write(source)
    spec = importlib.util.spec_from_file_location("old_planar", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Planar


def build(planar_class, num_layers: int, seed: int):
    """The flow with these parameters: a `tfb.Chain` of `planar_class` layers, or one `PlanarStack`."""
    rng = np.random.default_rng(seed)
    u, w, b = [], [], []
    for _ in range(num_layers):
        u.append(0.5 * rng.standard_normal(2).astype(np.float32))
        w.append(rng.standard_normal(2).astype(np.float32))
        b.append(np.float32(0.1 * rng.standard_normal()))
    base = tfd.MultivariateNormalDiag(loc=tf.zeros(2))
    if planar_class is PlanarStack:
        variables = [tf.Variable(np.stack(values)) for values in (u, w, b)]
        return tfd.TransformedDistribution(base, PlanarStack(*variables)), variables
    variables = [tf.Variable(value) for layer in zip(u, w, b) for value in layer]
    layers = [planar_class(*variables[3 * k:3 * k + 3]) for k in range(num_layers)]
    return tfd.TransformedDistribution(base, tfb.Chain(layers)), variables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "planar_ml_speed.md"))
    args = parser.parse_args()

    data = toy("8gaussians", 64 * args.batch, seed=0).astype(np.float32)
    batches = [tf.constant(data[i * args.batch:(i + 1) * args.batch]) for i in range(64)]
    variants = {"old (4e1da99), Chain of Planar": old_planar_class(), "new, Chain of Planar": Planar,
                "new, PlanarStack (flows.planar_flow)": PlanarStack}
    steps, first_call, losses = {}, {}, {}
    for name, cls in variants.items():
        distribution, variables = build(cls, args.layers, seed=0)
        steps[name] = nll_adam_step(distribution, variables, 1e-3, jit_compile=True)
        start = time.perf_counter()
        losses[name] = [float(steps[name](batches[0]))]
        first_call[name] = time.perf_counter() - start
    for name in variants:  # warm-up
        for k in range(1, 6):
            losses[name].append(float(steps[name](batches[k])))
    times = {name: [] for name in variants}
    for i in range(args.steps):
        for name in variants:
            x = batches[(6 + i) % len(batches)]
            start = time.perf_counter()
            losses[name].append(float(steps[name](x)))  # float() waits for the result
            times[name].append(time.perf_counter() - start)
    medians = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
    old = next(iter(variants))
    machine = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), " + (
        "GPU: " + ", ".join(d.name for d in tf.config.list_physical_devices("GPU"))
        if tf.config.list_physical_devices("GPU") else "no GPU"
    )
    lines = [
        f"Planar ML step, {datetime.date.today().isoformat()}, {machine}, "
        f"TF {tf.__version__}, TFP {tfp.__version__}; {args.layers} layers, D = 2, batch "
        f"{args.batch}, Adam 1e-3, XLA; median of {args.steps} interleaved steps after 5 warm-up steps.",
        "",
        "| Planar | ms/step (median) | vs old | first call: trace + compile (s) | NLL after the run |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in variants:
        lines.append(
            f"| {name} | {medians[name]:.2f} | {medians[name] / medians[old]:.2f}x | "
            f"{first_call[name]:.2f} | {losses[name][-1]:.3f} |"
        )
    publish(lines, args.out)


if __name__ == "__main__":
    main()
