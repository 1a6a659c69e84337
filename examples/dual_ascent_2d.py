"""Dual ascent on a 2-D toy: the markers' progress towards N(0, I), and the fitted density.

Fits `tfp_flows.dual_ascent.fit` (default settings: ε = 2·D/√N, 10% held out for early
stopping) to a toy data set and writes two PNGs:

* `<output>_markers.png`: the training points after 0, 10, 100, 1000 steps and after all
  kept steps (the whitening is step 0), next to samples of N(0, I);
* `<output>_density.png`: the data, samples of the fitted model, its log-density.

Run: `.venv/bin/python examples/dual_ascent_2d.py [--data 8gaussians] [--output
runs/dual_ascent_2d]` (about half a minute on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tfp_flows.dual_ascent import fit  # noqa: E402
from tfp_flows.datasets import toy  # noqa: E402
from tfp_flows.plotting import plot_density_2d  # noqa: E402

SNAPSHOTS = (0, 10, 100, 1000)


def plot_markers(result, x: np.ndarray, path: str) -> str:
    """Scatter the points pushed through the first t steps, for the snapshot steps."""
    steps = [t for t in SNAPSHOTS if t < result.num_steps] + [result.num_steps]
    figure, axes = plt.subplots(1, len(steps) + 1, figsize=(3.2 * (len(steps) + 1), 3.4))
    for ax, t in zip(axes, steps):
        markers = result.bijector_at(t).inverse(x).numpy()
        ax.scatter(markers[:, 0], markers[:, 1], s=1, alpha=0.3)
        ax.set_title(f"after {t} steps" + (" (whitened)" if t == 0 else ""))
    gaussian = np.random.default_rng(0).normal(size=x.shape)
    axes[-1].scatter(gaussian[:, 0], gaussian[:, 1], s=1, alpha=0.3, color="gray")
    axes[-1].set_title("N(0, I)")
    for ax in axes:
        ax.set_xlim(-4, 4)
        ax.set_ylim(-4, 4)
        ax.set_aspect("equal")
    figure.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="8gaussians",
                        choices=["moons", "8gaussians", "checkerboard", "pinwheel", "2spirals",
                                 "rings"])
    parser.add_argument("--num-points", type=int, default=8000)
    parser.add_argument("--num-steps", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="runs/dual_ascent_2d")
    args = parser.parse_args()

    x = toy(args.data, args.num_points, seed=args.seed)
    result = fit(x, num_steps=args.num_steps, seed=args.seed)
    curve = result.history["validation_log_likelihood"]
    print(f"{args.data}: kept {result.num_steps} steps, ε = {result.eps:.3f}, "
          f"{result.fit_seconds:.1f} s; held-out log-likelihood {curve[0]:.3f} (Gaussian) -> "
          f"{curve[result.num_steps]:.3f} nats")
    print("wrote", plot_markers(result, x, args.output + "_markers.png"))
    samples = result.distribution.sample(len(x), seed=args.seed).numpy()
    print("wrote", plot_density_2d(result.distribution, x, samples, args.output + "_density.png",
                                   title=f"dual ascent on {args.data}, {result.num_steps} steps"))


if __name__ == "__main__":
    main()
