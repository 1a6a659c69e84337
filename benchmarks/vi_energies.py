"""Exact KL(q‖p) of planar, radial and IAF flows fitted by VI to the energies U1–U4.

The numbers behind Rezende & Mohamed's Figure 3 (which only shows pictures). For each target
`log Z` comes from a fine grid (`vi.log_normalizer_on_grid`), and
`KL(q‖p) = E_q[log q − log p̃] + log Z` is estimated from 200 000 samples of q
(`vi.exact_kl`, ± one Monte-Carlo standard error). U2–U4 carry the envelope `exp(−z1²/32)`.
A second table repeats planar K = 32 on U1 over 5 seeds (target: KL < 0.05 nats for every seed).
The K = 32 flows of the table are drawn to results/vi_energies.png (examples/vi_energies_figure.py).

Run: .venv/bin/python benchmarks/vi_energies.py [--seeds-only | --table-only]
"""
from __future__ import annotations

import argparse
import datetime
import pathlib
import platform
import sys
import time

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

from tfp_flows import datasets, flows, vi
from tfp_flows.bijectors import Planar

tfb = tfp.bijectors
SOFTPLUS_INVERSE_OF_ONE = float(np.log(np.expm1(1.0)))

ENERGIES = ("U1", "U2", "U3", "U4")
GRID_BOUNDS = {"U1": ((-6, 6), (-6, 6))} | {name: ((-28, 28), (-8, 8)) for name in ("U2", "U3", "U4")}
GRID_POINTS = (2000, 1000)
NUM_LAYERS = (2, 8, 32)
IAF_HIDDEN_UNITS = (16, 16)
KL_SAMPLES = 200_000
TABLE_TRAINING = dict(num_steps=10_000, batch_size=256, learning_rate=1e-3, annealing_steps=5_000)
SEED_TRAINING = dict(num_steps=10_000, batch_size=256, learning_rate=1e-3, annealing_steps=5_000)
SEED_CHECK_SEEDS = (0, 1, 2, 3, 4)
SEED_CHECK_TARGET = 0.05
LIBRARY_PLANAR_SEEDS = (0, 1)
RESULTS = pathlib.Path(__file__).parent / "results" / "vi_energies.md"
FIGURE = RESULTS.with_suffix(".png")


def identity_planar_flow(event_size: int, num_layers: int, seed: int) -> tfb.Chain:
    """Planar layers that start as near-identity shears: `w ~ N(0, I)`, `b = 0`, and `u` set so
    that `c = wᵀû = −1 + softplus(wᵀu) = 0` (`wᵀu = log(e − 1)`), with `û` a N(0, 0.1²) draw
    orthogonal to `w`; each layer's log-det starts at 0.

    `flows.planar_flow` starts at `wᵀu ≈ 0`, i.e. `c ≈ −0.31`: every layer contracts, 32 layers
    shrink N(0, I) to a spread of about 0.005, and VI then grows q from one point and keeps
    one lobe of U1 (measured in the second row of the seed table).
    """
    rng = np.random.default_rng(seed)
    layers = []
    for k in range(num_layers):
        w = rng.standard_normal(event_size)
        shear = 0.1 * rng.standard_normal(event_size)
        shear -= (shear @ w) / (w @ w) * w
        u = SOFTPLUS_INVERSE_OF_ONE * w / (w @ w) + shear
        layers.append(Planar(
            tf.Variable(u.astype(np.float32), name=f"u_{k}"),
            tf.Variable(w.astype(np.float32), name=f"w_{k}"),
            tf.Variable(np.float32(0.0), name=f"b_{k}"),
            name=f"planar_{k}",
        ))
    return tfb.Chain(layers, name="identity_planar_flow")


def build_flow(kind: str, num_layers: int, seed: int):
    if kind == "planar":
        return identity_planar_flow(2, num_layers, seed)
    if kind == "flows.planar_flow":
        return flows.planar_flow(2, num_layers, seed=seed)
    if kind == "radial":
        return flows.radial_flow(2, num_layers, seed=seed)
    tf_keras.utils.set_random_seed(seed)  # the MADE networks draw their initial weights from Keras
    return flows.iaf(2, num_layers, hidden_units=IAF_HIDDEN_UNITS, activation="tanh")


def fit_and_measure(energy: str, kind: str, num_layers: int, seed: int, log_z: float, training: dict):
    target = datasets.energy(energy)
    started = time.perf_counter()
    result = vi.fit(build_flow(kind, num_layers, seed), target, 2, seed=seed, verbose=0, **training)
    seconds = time.perf_counter() - started
    kl, standard_error = vi.exact_kl(result.distribution, target, log_z, KL_SAMPLES, seed=10_000 + seed)
    print(f"{energy} {kind} K={num_layers} seed={seed}: KL {kl:.4f} ± {standard_error:.4f} "
          f"({seconds:.0f} s)", flush=True)
    return kl, standard_error, result.distribution


def training_line(training: dict) -> str:
    return (
        f"{training['num_steps']} Adam steps, batch {training['batch_size']}, learning rate "
        f"{training['learning_rate']:g}, β annealed linearly from 0.01 to 1 over the first "
        f"{training['annealing_steps']} steps"
    )


def kl_table(log_z: dict[str, float], fitted: dict) -> str:
    """The 4 × 9 table; `fitted[energy]` collects `(title, q)` of the K = 32 flows for the figure."""
    columns = [(kind, k) for kind in ("planar", "radial", "IAF") for k in NUM_LAYERS]
    lines = [
        f"Exact KL(q‖p) in nats (± MC standard error, {KL_SAMPLES} samples), seed 0; "
        f"{training_line(TABLE_TRAINING)}; IAF layers with MADE {list(IAF_HIDDEN_UNITS)} tanh.",
        "",
        "| target | log Z | " + " | ".join(f"{kind} K={k}" for kind, k in columns) + " |",
        "| --- | --- | " + " | ".join("---" for _ in columns) + " |",
    ]
    for energy in ENERGIES:
        cells = []
        fitted[energy] = []
        for kind, k in columns:
            kl, standard_error, q = fit_and_measure(energy, kind, k, 0, log_z[energy], TABLE_TRAINING)
            cells.append(f"{kl:.3f} ± {standard_error:.3f}")
            if k == max(NUM_LAYERS):
                fitted[energy].append((f"{kind} K={k}: KL {kl:.3f}", q))
        lines.append(f"| {energy} | {log_z[energy]:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_table(log_z_u1: float) -> str:
    rows = []
    for kind, seeds in (("planar", SEED_CHECK_SEEDS), ("flows.planar_flow", LIBRARY_PLANAR_SEEDS)):
        results = {seed: fit_and_measure("U1", kind, 32, seed, log_z_u1, SEED_TRAINING)[:2] for seed in seeds}
        kls = np.array([kl for kl, _ in results.values()])
        cells = [f"{results[s][0]:.4f} ± {results[s][1]:.4f}" if s in results else "—" for s in SEED_CHECK_SEEDS]
        spread = f"{kls.mean():.4f} ± {kls.std(ddof=1):.4f}" if len(kls) > 1 else f"{kls.mean():.4f}"
        rows.append((kind, cells, spread, kls.max()))
    verdict = "met" if rows[0][3] < SEED_CHECK_TARGET else "NOT met"
    return "\n".join([
        f"Planar K = 32 on U1, exact KL(q‖p) in nats over seeds (flow initialisation and VI draws); "
        f"{training_line(SEED_TRAINING)}. `planar`: layers started at the identity "
        "(`identity_planar_flow` in this script); `flows.planar_flow`: the library builder as it is.",
        "",
        "| planar K=32 | " + " | ".join(f"seed {s}" for s in SEED_CHECK_SEEDS) + " | mean ± std | max |",
        "| --- | " + " | ".join("---" for _ in SEED_CHECK_SEEDS) + " | --- | --- |",
        *[f"| {kind} | " + " | ".join(cells) + f" | {spread} | {worst:.4f} |" for kind, cells, spread, worst in rows],
        "",
        f"Target KL < {SEED_CHECK_TARGET} nats for every seed (identity-initialised planar): {verdict}.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds-only", action="store_true", help="only the 5-seed U1 planar K=32 table")
    parser.add_argument("--table-only", action="store_true", help="only the 4 × 9 KL table")
    args = parser.parse_args()
    started = time.perf_counter()
    log_z = {
        name: vi.log_normalizer_on_grid(datasets.energy(name), GRID_BOUNDS[name], GRID_POINTS)
        for name in ENERGIES
    }
    sections = []
    if not args.table_only:
        sections.append(seed_table(log_z["U1"]))
    if not args.seeds_only:
        fitted = {}
        sections.append(kl_table(log_z, fitted))
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
        from vi_energies_figure import plot_densities

        plot_densities(fitted, log_z, FIGURE)
    minutes = (time.perf_counter() - started) / 60
    header = (
        f"# VI on the energies U1–U4: exact KL\n\n{datetime.date.today().isoformat()}, 2 CPU cores, "
        f"no GPU ({platform.processor() or platform.machine()}; TF {tf.__version__}); "
        f"this run took {minutes:.1f} min (machine shared with other jobs). log Z on a "
        f"{GRID_POINTS[0]}×{GRID_POINTS[1]} midpoint grid over {GRID_BOUNDS['U1']} for U1 and "
        f"{GRID_BOUNDS['U2']} for U2–U4.\n\n"
    )
    body = "\n\n".join(sections)
    print(body)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(header + body + "\n")


if __name__ == "__main__":
    main()
