"""The `tfp-flows` command: fit a normalizing flow to data by maximum likelihood.

    tfp-flows fit --data 8gaussians --flow planar --layers 32 --epochs 50 --out runs/demo

`tfp-flows` alone (or `tfp-flows fit` alone) runs a short default fit to `runs/default`.
Outputs in `--out`: `checkpoints/` (the weights with the best validation NLL),
`density.png` (2-D data only), `metrics.json` and `saved_model/`.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
from typing import Sequence

import numpy as np
import tensorflow_probability as tfp
import tf_keras

from tfp_flows import datasets, flows
from tfp_flows.checks import check_samples
from tfp_flows.model import FlowModel
from tfp_flows.plotting import plot_density_2d

# CLI name -> builder in tfp_flows.flows, looked up by name so that a missing one only
# removes that choice.
FLOW_BUILDERS = {
    "planar": "planar_flow",
    "radial": "radial_flow",
    "maf": "maf",
    "iaf": "iaf",
    "nice": "nice",
    "realnvp": "realnvp",
}
DEFAULT_OUT = os.path.join("runs", "default")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tfp-flows",
        description="Fit normalizing flows (TensorFlow Probability bijectors) to data.",
        epilog="With no command, runs `fit` with its defaults (planar flow on 8gaussians, "
        f"15 epochs, into {DEFAULT_OUT}); the flags of `fit` may also be given without the word `fit`.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    fit = commands.add_parser(
        "fit",
        help="fit a flow by maximum likelihood and write checkpoints, plots, metrics and a SavedModel",
        description="Fit a flow by maximum likelihood (Adam on the mean negative log-likelihood) "
        "and write OUT/checkpoints/, OUT/density.png (2-D data), OUT/metrics.json and OUT/saved_model/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    fit.add_argument("--data", default="8gaussians",
                     help="a toy data set (" + ", ".join(datasets.TOY_NAMES) + ") or the path "
                     "of a .npy file holding a float array [N, D]")
    fit.add_argument("--flow", default="planar",
                     help="the flow, a builder of tfp_flows.flows: " + ", ".join(FLOW_BUILDERS))
    fit.add_argument("--layers", type=int, default=8, help="number of flow layers (couplings for nice and realnvp)")
    fit.add_argument("--hidden", default="64,64",
                     help="hidden units of the networks of maf, iaf, nice and realnvp, comma "
                     "separated (planar and radial have no networks)")
    fit.add_argument("--epochs", type=int, default=15, help="maximum number of epochs")
    fit.add_argument("--batch-size", type=int, default=128, help="minibatch size")
    fit.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate")
    fit.add_argument("--patience", type=int, default=None,
                     help="stop after this many epochs without a better validation NLL and restore "
                     "the best weights; no early stopping when not given")
    fit.add_argument("--validation-split", type=float, default=0.1,
                     help="fraction of the training points held out for validation (best checkpoint, early stopping)")
    fit.add_argument("--n", type=int, default=5_000,
                     help="number of training points drawn from a toy data set")
    fit.add_argument("--n-test", type=int, default=2_000,
                     help="number of test points drawn from a toy data set (with a different seed)")
    fit.add_argument("--test-fraction", type=float, default=0.2,
                     help="fraction of a .npy file's rows kept for testing")
    fit.add_argument("--seed", type=int, default=0,
                     help="seed of the data, the initial parameters and the samples")
    fit.add_argument("--out", default=DEFAULT_OUT, help="output directory")
    fit.add_argument("--no-jit", action="store_true",
                     help="do not compile the training step with XLA (jit_compile=False)")
    fit.add_argument("--plot-samples", type=int, default=5_000,
                     help="number of model samples drawn for density.png")
    fit.add_argument("--quiet", action="store_true", help="no Keras progress bar")
    fit.set_defaults(command_parser=fit)
    return parser


def _load_data(args, parser) -> tuple[np.ndarray, np.ndarray]:
    """Return float32 train and test arrays [N, D]."""
    if args.data in datasets.TOY_NAMES:
        # Different seeds for train and test: 2·seed and 2·seed + 1.
        train = datasets.toy(args.data, args.n, seed=2 * args.seed)
        test = datasets.toy(args.data, args.n_test, seed=2 * args.seed + 1)
        return train, test
    if not args.data.endswith(".npy"):
        parser.error(f"--data must be one of {', '.join(datasets.TOY_NAMES)} or a .npy file; given {args.data!r}.")
    if not os.path.isfile(args.data):
        parser.error(f"--data file {args.data!r} does not exist.")
    try:
        array = np.load(args.data, allow_pickle=False)
    except (OSError, ValueError) as error:
        parser.error(f"--data file {args.data!r} is not a readable .npy array of numbers: {error}")
    if array.ndim != 2:
        parser.error(f"--data file must hold an array [N, D]; given shape {list(array.shape)}.")
    try:
        array = check_samples(array, (array.shape[1],), name=f"--data {args.data}").astype(np.float32)
    except (ValueError, TypeError) as error:
        parser.error(str(error))
    if len(array) < 10:
        parser.error(f"--data file needs at least 10 rows; given {len(array)}.")
    order = np.random.default_rng(args.seed).permutation(len(array))
    num_test = max(1, int(round(args.test_fraction * len(array))))
    return array[order[num_test:]], array[order[:num_test]]


def _build_bijector(args, event_size: int, parser) -> tfp.bijectors.Bijector:
    builder = getattr(flows, FLOW_BUILDERS.get(args.flow, ""), None)
    if builder is None:
        available = [name for name, attribute in FLOW_BUILDERS.items() if hasattr(flows, attribute)]
        parser.error(f"--flow must be one of {', '.join(available)}; given {args.flow!r}.")
    try:
        hidden_units = [int(h) for h in args.hidden.split(",") if h.strip()]
    except ValueError:
        parser.error(f"--hidden must be comma-separated integers such as 64,64; given {args.hidden!r}.")
    # Builders name the depth num_layers (planar, radial, maf, iaf) or num_couplings (nice, realnvp).
    offered = {"event_size": event_size, "num_layers": args.layers, "num_couplings": args.layers,
               "hidden_units": hidden_units, "seed": args.seed}
    accepted = inspect.signature(builder).parameters
    return builder(**{key: value for key, value in offered.items() if key in accepted})


def _check_arguments(args, parser) -> None:
    positive = {"--layers": args.layers, "--epochs": args.epochs, "--batch-size": args.batch_size,
                "--n": args.n, "--n-test": args.n_test, "--plot-samples": args.plot_samples}
    for flag, value in positive.items():
        if value < 1:
            parser.error(f"{flag} must be >= 1; given {value}.")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error(f"--lr must be a positive number; given {args.lr}.")
    if args.patience is not None and args.patience < 1:
        parser.error(f"--patience must be >= 1; given {args.patience}.")
    if not 0.0 < args.validation_split < 1.0:
        parser.error(f"--validation-split must lie in (0, 1); given {args.validation_split}.")
    if not 0.0 < args.test_fraction < 1.0:
        parser.error(f"--test-fraction must lie in (0, 1); given {args.test_fraction}.")


def _mean_nll(model, x: np.ndarray, batch_size: int = 4096) -> float:
    total = 0.0
    for start in range(0, len(x), batch_size):
        total += -float(np.sum(model.log_prob(x[start : start + batch_size])))
    return total / len(x)


def _finite_or_none(value):
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def fit(args, parser) -> dict:
    """Train, evaluate and export one flow; return the metrics written to metrics.json."""
    _check_arguments(args, parser)
    start = time.perf_counter()
    train, test = _load_data(args, parser)
    event_size = train.shape[1]

    tf_keras.utils.set_random_seed(args.seed)
    bijector = _build_bijector(args, event_size, parser)
    model = FlowModel(bijector, event_shape=[event_size])
    model.compile(optimizer=tf_keras.optimizers.Adam(args.lr), jit_compile=not args.no_jit)

    os.makedirs(args.out, exist_ok=True)
    checkpoint_path = os.path.join(args.out, "checkpoints", "best")
    epoch_logs: list[dict] = []
    callbacks = [
        tf_keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: epoch_logs.append(dict(logs or {}))),
        tf_keras.callbacks.ModelCheckpoint(
            checkpoint_path, monitor="val_nll", mode="min", save_best_only=True, save_weights_only=True
        ),
    ]
    fit_start = time.perf_counter()
    diverged = None
    try:
        model.fit(
            train,
            epochs=args.epochs,
            batch_size=args.batch_size,
            validation_split=args.validation_split,
            patience=args.patience,
            callbacks=callbacks,
            verbose=0 if args.quiet else 1,
        )
    except FloatingPointError as error:
        diverged = str(error)
    fit_seconds = time.perf_counter() - fit_start
    validation_nll = [float(logs.get("val_nll", math.nan)) for logs in epoch_logs]
    finite_epochs = [i for i, value in enumerate(validation_nll) if math.isfinite(value)]
    if not finite_epochs:
        raise SystemExit(
            f"tfp-flows: training diverged before any epoch had a finite validation NLL ({diverged}); "
            f"try a smaller --lr (given {args.lr})."
        )
    if diverged:
        print(f"tfp-flows: {diverged} Continuing with the best checkpoint.")
    # The reported metrics, the plot and the export all use the best validation weights.
    model.load_weights(checkpoint_path).expect_partial()
    best_epoch = min(finite_epochs, key=lambda i: validation_nll[i])

    train_nll = _mean_nll(model, train)
    test_nll = _mean_nll(model, test)
    for split, value in (("train", train_nll), ("test", test_nll)):
        if not math.isfinite(value):
            print(f"tfp-flows: warning: the {split} NLL is {value}: some {split} points get a "
                  "non-finite log-density under the trained flow.")
    standard_normal_test_nll = float(np.mean(0.5 * np.sum(test.astype(np.float64) ** 2, axis=1))
                                     + 0.5 * event_size * math.log(2 * math.pi))
    per_dim_bits = 1.0 / (event_size * math.log(2.0))
    metrics = {
        "train_nll": train_nll,
        "test_nll": test_nll,
        "train_bits_per_dim": train_nll * per_dim_bits,
        "test_bits_per_dim": test_nll * per_dim_bits,
        "standard_normal_test_nll": standard_normal_test_nll,
        "epochs_run": len(epoch_logs),
        "diverged": diverged,
        "best_epoch": best_epoch + 1,
        "best_validation_nll": validation_nll[best_epoch],
        "num_train": int(len(train)),
        "num_test": int(len(test)),
        "event_size": int(event_size),
        "fit_seconds": fit_seconds,
    }
    if args.data == "8gaussians":
        # KL(p‖q) = E_p[log p − log q], estimated on the test points (0 is the physical limit).
        metrics["true_test_nll"] = float(-np.mean(datasets.toy_log_prob("8gaussians", test)))
        metrics["test_kl_estimate"] = test_nll - metrics["true_test_nll"]

    outputs = {"checkpoints": os.path.dirname(checkpoint_path)}
    if event_size == 2:
        samples = np.asarray(model.sample(args.plot_samples, seed=args.seed))
        outputs["density"] = plot_density_2d(
            model.distribution, test, samples, os.path.join(args.out, "density.png"),
            title=f"{args.flow}, {args.layers} layers, on {os.path.basename(args.data)}: "
            f"test NLL {test_nll:.3f} nats",
        )
    else:
        print(f"tfp-flows: data has {event_size} dimensions, not 2; skipping density.png.")
    outputs["saved_model"] = os.path.join(args.out, "saved_model")
    model.export(outputs["saved_model"])
    outputs["metrics"] = os.path.join(args.out, "metrics.json")
    metrics["wall_seconds"] = time.perf_counter() - start
    metrics["arguments"] = {
        key: value for key, value in vars(args).items() if key not in ("command", "command_parser")
    }
    metrics["outputs"] = outputs
    with open(outputs["metrics"], "w") as handle:
        # Non-finite numbers (warned about above) become null: metrics.json stays strict JSON.
        json.dump(_finite_or_none(metrics), handle, indent=2)

    print(
        f"tfp-flows: {args.flow} on {args.data}: test NLL {test_nll:.4f} nats "
        f"({metrics['test_bits_per_dim']:.4f} bits/dim; standard normal {standard_normal_test_nll:.4f} nats), "
        f"{metrics['epochs_run']} epochs in {fit_seconds:.1f} s."
    )
    for name, path in outputs.items():
        print(f"  {name:12s} {path}")
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tfp-flows` console script; returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("fit", "-h", "--help"):
        argv = ["fit", *argv]
    args = parser.parse_args(argv)
    fit(args, args.command_parser)
    return 0


if __name__ == "__main__":
    sys.exit(main())
