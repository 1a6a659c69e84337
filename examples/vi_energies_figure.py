"""Figure: the energies U1–U4 (rows) and the densities of flows fitted to them by VI (columns).

Column 1 is the true density `p̃(z) / Z` (log Z on a fine grid); the others are `q(z)` of
planar, radial and IAF flows with K = 32 layers, trained exactly as in
`benchmarks/vi_energies.py` (same builders and settings, seed 0), drawn on [-4, 4]² with
`q.log_prob` (planar and radial through their exact inverses, IAF through its sequential one).
Each panel's title gives the exact KL(q‖p) of that fit. `benchmarks/vi_energies.py` calls
`plot_densities` with the flows it trains for its table, so one benchmark run also draws the figure.

Run: .venv/bin/python examples/vi_energies_figure.py [output.png]
"""
from __future__ import annotations

import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import vi_energies  # noqa: E402  (training settings and builders shared with the benchmark)

from tfp_flows import datasets, vi  # noqa: E402

NUM_LAYERS = 32
FLOW_KINDS = ("planar", "radial", "IAF")
PLOT_LIMIT = 4.0
PLOT_POINTS = 200
DEFAULT_OUTPUT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "vi_energies.png"


def density_on_grid(log_prob, points: np.ndarray) -> np.ndarray:
    values = log_prob(tf.constant(points, tf.float32)).numpy()
    return np.exp(values).reshape(PLOT_POINTS, PLOT_POINTS)


def plot_densities(fitted: dict, log_z: dict, output: pathlib.Path) -> None:
    """One row per energy: `p̃/Z`, then `q` of each `(title, distribution)` in `fitted[energy]`."""
    axis = np.linspace(-PLOT_LIMIT, PLOT_LIMIT, PLOT_POINTS)
    z1, z2 = np.meshgrid(axis, axis, indexing="xy")
    points = np.stack([z1.ravel(), z2.ravel()], axis=-1)
    num_columns = 1 + max(len(panels) for panels in fitted.values())
    figure, axes = plt.subplots(len(fitted), num_columns, figsize=(3 * num_columns, 3 * len(fitted)), squeeze=False)
    for row, (energy, panels) in enumerate(fitted.items()):
        target = datasets.energy(energy)
        densities = [(density_on_grid(lambda z: target(z) - log_z[energy], points), f"{energy}: true density")]
        densities += [(density_on_grid(q.log_prob, points), title) for title, q in panels]
        for column, (density, title) in enumerate(densities):
            ax = axes[row, column]
            ax.imshow(density, origin="lower", extent=(-PLOT_LIMIT, PLOT_LIMIT) * 2, cmap="viridis")
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    figure.suptitle("VI with flows on Rezende & Mohamed's energies (U2–U4 with envelope exp(−z1²/32))")
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=90)
    plt.close(figure)
    print(f"wrote {output}")


def main(output: pathlib.Path) -> None:
    fitted, log_z = {}, {}
    for energy in vi_energies.ENERGIES:
        target = datasets.energy(energy)
        log_z[energy] = vi.log_normalizer_on_grid(target, vi_energies.GRID_BOUNDS[energy], vi_energies.GRID_POINTS)
        fitted[energy] = []
        for kind in FLOW_KINDS:
            flow = vi_energies.build_flow(kind, NUM_LAYERS, seed=0)
            result = vi.fit(flow, target, 2, seed=0, verbose=0, **vi_energies.TABLE_TRAINING)
            kl, _ = vi.exact_kl(result.distribution, target, log_z[energy], vi_energies.KL_SAMPLES, seed=10_000)
            fitted[energy].append((f"{kind} K={NUM_LAYERS}: KL {kl:.3f}", result.distribution))
            print(f"{energy} {kind}: KL {kl:.4f}", flush=True)
    plot_densities(fitted, log_z, output)


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUTPUT)
