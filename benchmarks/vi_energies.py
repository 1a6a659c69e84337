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

from tfp_flows import datasets, flows, vi

ENERGIES = ("U1", "U2", "U3", "U4")
GRID_BOUNDS = {"U1": ((-6, 6), (-6, 6))} | {name: ((-28, 28), (-8, 8)) for name in ("U2", "U3", "U4")}
GRID_POINTS = (2000, 1000)
NUM_LAYERS = (2, 8, 32)
IAF_HIDDEN_UNITS = (16, 16)
KL_SAMPLES = 200_000
TABLE_TRAINING = dict(num_steps=4_000, batch_size=256, learning_rate=3e-3, annealing_steps=2_000)
SEED_TRAINING = TABLE_TRAINING
SEED_CHECK_SEEDS = (0, 1, 2, 3, 4)
SEED_CHECK_TARGET = 0.05
RESULTS = pathlib.Path(__file__).parent / "results" / "vi_energies.md"
FIGURE = RESULTS.with_suffix(".png")


def build_flow(kind: str, num_layers: int, seed: int):
    if kind == "planar":
        return flows.planar_flow(2, num_layers, seed=seed)
    if kind == "radial":
        return flows.radial_flow(2, num_layers, seed=seed)
    return flows.iaf(2, num_layers, hidden_units=IAF_HIDDEN_UNITS, activation="tanh", seed=seed)


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
    results = [fit_and_measure("U1", "planar", 32, seed, log_z_u1, SEED_TRAINING)[:2] for seed in SEED_CHECK_SEEDS]
    kls = np.array([kl for kl, _ in results])
    verdict = "met" if kls.max() < SEED_CHECK_TARGET else "NOT met"
    return "\n".join([
        f"Planar K = 32 (`flows.planar_flow`) on U1, exact KL(q‖p) in nats over seeds (flow "
        f"initialisation and VI draws); {training_line(SEED_TRAINING)}.",
        "",
        "| " + " | ".join(f"seed {s}" for s in SEED_CHECK_SEEDS) + " | mean ± std | max |",
        "| " + " | ".join("---" for _ in SEED_CHECK_SEEDS) + " | --- | --- |",
        "| " + " | ".join(f"{kl:.4f} ± {se:.4f}" for kl, se in results)
        + f" | {kls.mean():.4f} ± {kls.std(ddof=1):.4f} | {kls.max():.4f} |",
        "",
        f"Target KL < {SEED_CHECK_TARGET} nats for every seed: {verdict}.",
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
