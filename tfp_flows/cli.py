"""The `tfp-flows` command: fit a normalizing flow to data by maximum likelihood.

    tfp-flows fit --data 8gaussians --flow planar --layers 32 --epochs 50 --out runs/demo
    tfp-flows fit --resume runs/demo        # continue a run that was killed

`tfp-flows` alone (or `tfp-flows fit` alone) runs a short default fit to `runs/default`.

A run is atomic: it writes into `.<name>.tmp-<run id>` beside `--out` and is renamed to
`--out` only when complete (an earlier run there is kept until then), so `--out` always
holds exactly one run: `run.json` (run id, arguments), `checkpoints/` (`best`: the
weights with the best validation NLL; `training/`: weights, Adam state and epoch at the
last epoch end), `density.png` (2-D data), `metrics.json` (run id, NLLs, per-epoch
history, the list of files), `saved_model/` and `tensorboard/`.

Batches are a function of (seed, epoch), so `--resume` (from the last epoch-end
checkpoint) ends with the weights an uninterrupted run ends with.
SIGINT/SIGTERM stop after the current batch; the best weights so far are evaluated and
written, `metrics.json` says `"interrupted": true`, exit status 130/143; a second
signal stops at once, leaving the temporary folder. Exit status 2: a usage error (one
line, before any work); 1: a non-finite NLL (the run's files stay in its temporary folder).
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import re
import secrets
import shutil
import signal
import sys
import time
import warnings
from typing import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

from tfp_flows import datasets, flows
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
MAX_SEED = 2**31 - 1
MIN_FILE_ROWS = 10
# Flags that --resume accepts beside it; all others come from the original run.
RESUME_FLAGS = ("--resume", "--quiet")
# float32 must hold sum(x²) of a row: the standard normal base evaluates it.
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class UsageError(Exception):
    """A bad command line; `main` prints it as one line and exits with status 2."""


class _Parser(argparse.ArgumentParser):
    """`error` prints one line `tfp-flows: error: <argument>: <message>` and exits 2."""

    def error(self, message: str):
        message = message[len("argument "):] if message.startswith("argument ") else message
        sys.stderr.write(f"tfp-flows: error: {message}\n")
        raise SystemExit(2)


def _expected(what: str, text) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"expected {what}; given {text!r}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _expected("a positive integer", text) from None
    if value < 1:
        raise _expected("a positive integer", text)
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _expected(f"an integer in [0, {MAX_SEED}]", text) from None
    if not 0 <= value <= MAX_SEED:
        raise _expected(f"an integer in [0, {MAX_SEED}]", text)
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _expected("a finite number > 0", text) from None
    if not (math.isfinite(value) and value > 0):
        raise _expected("a finite number > 0", text)
    return value


def _open_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _expected("a number in (0, 1)", text) from None
    if not 0.0 < value < 1.0:
        raise _expected("a number in (0, 1)", text)
    return value


def _hidden(text: str) -> list[int]:
    what = "a comma-separated list of positive integers such as 64,64"
    parts = text.split(",")
    if not all(re.fullmatch(r"\s*\d+\s*", part) for part in parts) or any(int(p) < 1 for p in parts):
        raise _expected(what, text)
    return [int(part) for part in parts]


def _available_flows() -> list[str]:
    return [name for name, attribute in FLOW_BUILDERS.items() if hasattr(flows, attribute)]


def _flow(text: str) -> str:
    if text not in _available_flows():
        raise _expected("one of " + ", ".join(_available_flows()), text)
    return text


def _data(text: str) -> str:
    """A toy name, or the absolute path of an existing .npy file."""
    if text in datasets.TOY_NAMES:
        return text
    if not text.endswith(".npy"):
        raise _expected("one of " + ", ".join(datasets.TOY_NAMES) + " or a .npy file", text)
    if not os.path.isfile(text):
        raise _expected("an existing .npy file", text)
    return os.path.abspath(text)


def _is_run(path: str) -> bool:
    """Whether `path` is the output folder of a finished tfp-flows run (runs of versions
    before run ids have a metrics.json with `test_nll`)."""
    try:
        with open(os.path.join(path, "metrics.json")) as handle:
            metrics = json.load(handle)
    except (OSError, ValueError):
        return False
    return isinstance(metrics, dict) and ("run_id" in metrics or "test_nll" in metrics)


def _out(text: str) -> str:
    """The absolute path of the output folder: new, empty, or an earlier run's."""
    path = os.path.abspath(text)
    parent = os.path.dirname(path)
    if not text.strip() or path == parent:
        raise _expected("a folder path", text)
    if os.path.exists(path) and not os.path.isdir(path):
        raise _expected("a folder, new or from an earlier run", f"{text} (an existing file)")
    if os.path.isdir(path) and os.listdir(path) and not _is_run(path):
        raise _expected("a new folder, an empty one or one from an earlier tfp-flows run (it is "
                        "replaced)", f"{text} (a folder holding other files)")
    ancestor = parent
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise _expected("a path whose parent folders are folders", f"{text} ({ancestor} is a file)")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tfp-flows",
        allow_abbrev=False,
        description="Fit normalizing flows (TensorFlow Probability bijectors) to data.",
        epilog="With no command, runs `fit` with its defaults (planar flow on 8gaussians, "
        f"15 epochs, into {DEFAULT_OUT}); the flags of `fit` may also be given without the word `fit`. "
        "Exit status: 0 done, 1 non-finite NLL, 2 usage error, 130/143 stopped by SIGINT/SIGTERM.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    fit = commands.add_parser(
        "fit",
        allow_abbrev=False,
        help="fit a flow by maximum likelihood and write checkpoints, plots, metrics and a SavedModel",
        description="Fit a flow by maximum likelihood (Adam on the mean negative log-likelihood). "
        "The run writes into a temporary folder .NAME.tmp-RUNID beside OUT and renames it to OUT "
        "when complete (replacing an earlier run there): OUT/run.json, OUT/checkpoints/ (best and "
        "training/), OUT/density.png (2-D data), OUT/metrics.json, OUT/saved_model/, "
        "OUT/tensorboard/. Ctrl-C (SIGINT) or SIGTERM stops after the current batch and still "
        "writes the outputs (exit status 130 or 143); a killed run continues with --resume OUT.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    fit.add_argument("--data", type=_data, default="8gaussians",
                     help="a toy data set (" + ", ".join(datasets.TOY_NAMES) + ") or the path "
                     f"of a .npy file holding a float array [N, D], finite, N >= {MIN_FILE_ROWS}, "
                     "no constant column")
    fit.add_argument("--flow", type=_flow, default="planar",
                     help="the flow, a builder of tfp_flows.flows: " + ", ".join(FLOW_BUILDERS))
    fit.add_argument("--layers", type=_positive_int, default=8,
                     help="number of flow layers (couplings for nice and realnvp)")
    fit.add_argument("--hidden", type=_hidden, default="64,64",
                     help="hidden units of the networks of maf, iaf, nice and realnvp, comma "
                     "separated positive integers (planar and radial have no networks)")
    fit.add_argument("--epochs", type=_positive_int, default=15, help="maximum number of epochs")
    fit.add_argument("--batch-size", type=_positive_int, default=128,
                     help="minibatch size (the training rows if fewer)")
    fit.add_argument("--lr", type=_positive_float, default=5e-3, help="Adam learning rate")
    fit.add_argument("--patience", type=_positive_int, default=None,
                     help="stop after this many epochs without a better validation NLL; "
                     "no early stopping when not given")
    fit.add_argument("--validation-split", type=_open_fraction, default=0.1,
                     help="fraction of the training rows held out for validation (the best weights, "
                     "early stopping), at least one row")
    fit.add_argument("--n", type=_positive_int, default=5_000,
                     help="number of training points drawn from a toy data set")
    fit.add_argument("--n-test", type=_positive_int, default=2_000,
                     help="number of test points drawn from a toy data set (with a different seed)")
    fit.add_argument("--test-fraction", type=_open_fraction, default=0.2,
                     help="fraction of a .npy file's rows kept for testing, at least one row")
    fit.add_argument("--seed", type=_seed, default=0,
                     help=f"seed in [0, {MAX_SEED}] of the data, the initial parameters, the batches "
                     "and the samples")
    fit.add_argument("--out", type=_out, default=DEFAULT_OUT,
                     help="output folder: new, empty, or an earlier run's (replaced when this run completes)")
    fit.add_argument("--no-jit", action="store_true",
                     help="do not compile the training step with XLA (jit_compile=False)")
    fit.add_argument("--plot-samples", type=_positive_int, default=5_000,
                     help="number of model samples drawn for density.png")
    fit.add_argument("--quiet", action="store_true", help="no Keras progress bar")
    fit.add_argument("--resume", metavar="DIR", default=None,
                     help="continue the killed run that was writing into DIR (its --out) or the "
                     "temporary folder .NAME.tmp-RUNID itself, with its original arguments, from "
                     "its last epoch-end checkpoint; only --quiet may be given with it")
    fit.set_defaults(command_parser=fit)
    return parser


# ---------------------------------------------------------------- data


def _split_sizes(num_rows: int, test_fraction: float | None, validation_split: float) -> tuple[int, int]:
    """(test rows, validation rows), each at least one: round(fraction · rows)."""
    num_test = 0 if test_fraction is None else max(1, round(test_fraction * num_rows))
    num_validation = max(1, round(validation_split * (num_rows - num_test)))
    return num_test, num_validation


def _load_data(args) -> tuple[np.ndarray, np.ndarray]:
    """Return float32 train (validation rows last) and test arrays [N, D]; UsageError if unfit."""
    if args.data in datasets.TOY_NAMES:
        _, num_validation = _split_sizes(args.n, None, args.validation_split)
        if args.n - num_validation < 1:
            raise UsageError(f"--n: expected at least 2 points, one to train on and {num_validation} "
                             f"for --validation-split {args.validation_split}; given {args.n}")
        # Different seeds for train and test: 2·seed and 2·seed + 1.
        train = datasets.toy(args.data, args.n, seed=2 * args.seed)
        test = datasets.toy(args.data, args.n_test, seed=2 * args.seed + 1)
        return train.astype(np.float32), test.astype(np.float32)
    name = f"--data: {args.data}"
    try:
        array = np.load(args.data, allow_pickle=False)
    except Exception as error:  # NumPy raises OSError, ValueError, EOFError, ... for a bad file.
        raise UsageError(f"{name}: expected a .npy file of a float array [N, D]; given a file NumPy "
                         f"cannot read ({type(error).__name__}: {str(error) or 'empty file'})") from None
    if array.dtype.kind != "f":
        raise UsageError(f"{name}: expected a float array [N, D]; given dtype {array.dtype}")
    if array.ndim != 2 or array.shape[1] < 1:
        raise UsageError(f"{name}: expected a float array [N, D]; given shape {list(array.shape)}")
    num_rows = len(array)
    num_test, num_validation = _split_sizes(num_rows, args.test_fraction, args.validation_split)
    if num_rows < MIN_FILE_ROWS or num_rows - num_test - num_validation < 1:
        raise UsageError(
            f"{name}: expected at least {MIN_FILE_ROWS} rows, leaving a training row beside the "
            f"{num_test} test row(s) of --test-fraction {args.test_fraction} and the "
            f"{num_validation} validation row(s) of --validation-split {args.validation_split}; "
            f"given {num_rows} rows")
    finite = np.isfinite(array)
    if not finite.all():
        row, column = (int(i) for i in np.argwhere(~finite)[0])
        raise UsageError(f"{name}: expected finite values; given {int((~finite).sum())} NaN/inf "
                         f"value(s), the first at row {row}, column {column}")
    squares = np.sum(np.square(array.astype(np.float64)), axis=1)
    if squares.max() >= _FLOAT32_MAX:
        raise UsageError(
            f"{name}: expected values whose squares sum to less than {_FLOAT32_MAX:.3g} per row (the "
            f"float32 log-density of the standard normal base needs it; standardise the data); "
            f"given max |x| = {np.abs(array).max():.3g}")
    order = np.random.default_rng(args.seed).permutation(num_rows)
    train, test = array[order[num_test:]], array[order[:num_test]]
    fitted = train[:-num_validation]
    constant = np.flatnonzero(np.all(fitted == fitted[:1], axis=0))
    if constant.size:
        column = int(constant[0])
        raise UsageError(
            f"{name}: expected no constant column (its density is a point mass, the likelihood "
            f"grows without bound); given column {column} equal to {fitted[0, column]:.6g} in all "
            f"{len(fitted)} training rows")
    return train.astype(np.float32), test.astype(np.float32)


def _fingerprint(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------- model


def _build_bijector(args, event_size: int) -> tfp.bijectors.Bijector:
    builder = getattr(flows, FLOW_BUILDERS[args.flow])
    # Builders name the depth num_layers (planar, radial, maf, iaf) or num_couplings (nice,
    # realnvp); only the arguments a builder takes are passed.
    offered = {"event_size": event_size, "num_layers": args.layers, "num_couplings": args.layers,
               "hidden_units": list(args.hidden), "seed": args.seed}
    accepted = inspect.signature(builder).parameters
    return builder(**{key: value for key, value in offered.items() if key in accepted})


def _epoch_batches(x: np.ndarray, batch_size: int, seed: int, first_epoch: int, epochs: int) -> tf.data.Dataset:
    """Epochs `first_epoch … epochs − 1` of batches, one after the other.

    Epoch e uses the permutation `argsort(stateless_uniform(seed=[seed, e]))` of the rows
    (the remainder dropped), so the batches depend on (seed, epoch) only and a resumed
    run sees those an uninterrupted run sees.
    """
    data = tf.constant(x)
    num_rows = len(x)
    used = (num_rows // batch_size) * batch_size

    def one_epoch(epoch):
        uniform = tf.random.stateless_uniform([num_rows], seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
        order = tf.argsort(uniform, stable=True)[:used]
        return tf.data.Dataset.from_tensor_slices(tf.gather(data, order)).batch(batch_size, drop_remainder=True)

    return tf.data.Dataset.range(first_epoch, epochs).flat_map(one_epoch).prefetch(2)


class _TrainingState:
    """Everything `--resume` needs, saved atomically at every epoch end by one checkpoint:
    the weights, Adam's slots and iterations, the epoch count, the per-epoch history and
    a copy of the weights of the best validation NLL."""

    def __init__(self, model: FlowModel, directory: str):
        self.model = model
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.history_json = tf.Variable("[]", dtype=tf.string, trainable=False)
        self.best_weights = [tf.Variable(w, trainable=False) for w in model.weights]
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer, epoch=self.epoch,
                                              history=self.history_json, best_weights=self.best_weights)
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep=2)
        self.history: list[dict] = []

    def restore(self) -> int:
        """Restore the last checkpoint if there is one; return the number of finished epochs."""
        if self.manager.latest_checkpoint:
            self.checkpoint.restore(self.manager.latest_checkpoint).assert_existing_objects_matched()
            self.history = json.loads(self.history_json.numpy().decode())
        return int(self.epoch.numpy())

    @property
    def best_epoch(self) -> int | None:
        if not self.history:
            return None
        return min(self.history, key=lambda entry: entry["val_nll"])["epoch"]

    def end_epoch(self, entry: dict) -> None:
        best = self.best_epoch
        self.history.append(entry)
        if best is None or entry["val_nll"] < self.history[best - 1]["val_nll"]:
            for copy, weight in zip(self.best_weights, self.model.weights):
                copy.assign(weight)
        self.epoch.assign(entry["epoch"])
        self.history_json.assign(json.dumps(self.history))
        self.manager.save(checkpoint_number=entry["epoch"])

    def load_best(self) -> None:
        for weight, copy in zip(self.model.weights, self.best_weights):
            weight.assign(copy)


class _Stop:
    """SIGINT/SIGTERM handler: the first asks training to stop after the current batch,
    a second exits at once (status 128 + signal), leaving the temporary folder."""

    def __init__(self):
        self.signum: int | None = None
        self.model: FlowModel | None = None
        self._previous = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signum is not None:
            sys.stderr.write(f"tfp-flows: {name} again: stopping now; the unfinished run stays in its "
                             "temporary folder (continue it with --resume).\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.signum = signum
        sys.stderr.write(f"tfp-flows: {name}: stopping after the current batch and writing the "
                         "outputs (send it again to stop at once).\n")
        sys.stderr.flush()
        if self.model is not None:
            self.model.stop_training = True


class _EpochEnd(tf_keras.callbacks.Callback):
    """Records complete, finite epochs in the training state (checkpoint included),
    applies `--patience`, and honours a stop request."""

    def __init__(self, state: _TrainingState, steps_per_epoch: int, patience: int | None, stop: _Stop):
        super().__init__()
        self.state, self.steps_per_epoch, self.patience, self.stop = state, steps_per_epoch, patience, stop
        self.non_finite: str | None = None
        self.early_stopped = False
        self._iterations = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._iterations = int(self.model.optimizer.iterations.numpy())
        if self.stop.signum is not None:  # a signal during set-up (fit resets stop_training)
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) - self._iterations != self.steps_per_epoch:
            return  # stopped within the epoch: not a complete epoch
        entry = {"epoch": epoch + 1, **{key: float(value) for key, value in (logs or {}).items()}}
        bad = [key for key in ("nll", "val_nll") if not math.isfinite(entry.get(key, math.nan))]
        if bad:
            self.non_finite = f"the {bad[0]} became {entry.get(bad[0])} in epoch {epoch + 1}"
            self.model.stop_training = True
            return
        self.state.end_epoch(entry)
        if self.patience is not None and epoch + 1 - self.state.best_epoch >= self.patience:
            self.early_stopped = True
            self.model.stop_training = True


def diverged(training_nll: Sequence[float]) -> bool:
    """Whether an epoch's training NLL exceeds the first epoch's NLL `l₁` by more than
    `max(10 nats, 0.5·|l₁|)`."""
    if not training_nll:
        return False
    first = training_nll[0]
    return any(value > first + max(10.0, 0.5 * abs(first)) for value in training_nll[1:])


def _mean_nll(model, x: np.ndarray, batch_size: int = 4096) -> float:
    total = 0.0
    for start in range(0, len(x), batch_size):
        total += -float(np.sum(model.log_prob(x[start : start + batch_size])))
    return total / len(x)


def _finite_or_none(value):
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------- run folders


def _temp_folder(out: str, run_id: str) -> str:
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.tmp-{run_id}")


def _write_json(path: str, content: dict) -> None:
    """Write `content` to `path` atomically (a sibling file renamed over it)."""
    partial = path + ".partial"
    with open(partial, "w") as handle:
        json.dump(_finite_or_none(content), handle, indent=2)
    os.replace(partial, path)


def _read_run(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, "run.json")) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _unfinished_runs(out: str) -> list[str]:
    parent, prefix = os.path.dirname(out), f".{os.path.basename(out)}.tmp-"
    if not os.path.isdir(parent):
        return []
    return sorted(os.path.join(parent, name) for name in os.listdir(parent)
                  if name.startswith(prefix) and _read_run(os.path.join(parent, name)) is not None)


def _move_into_place(temp: str, out: str, run_id: str) -> None:
    """Rename `temp` to `out`; an existing `out` is renamed aside first and deleted last."""
    if os.path.exists(out):
        aside = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.old-{run_id}")
        os.rename(out, aside)
        os.rename(temp, out)
        shutil.rmtree(aside)
    else:
        os.rename(temp, out)
    # Left behind by a run killed between the two renames above.
    parent, prefix = os.path.dirname(out), f".{os.path.basename(out)}.old-"
    for name in os.listdir(parent):
        if name.startswith(prefix):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _resume_target(path: str) -> tuple[str, dict]:
    """The temporary folder of the unfinished run named by `--resume` and its run.json."""
    folder = os.path.abspath(path)
    if _read_run(folder) is not None and re.fullmatch(r"\..+\.tmp-.+", os.path.basename(folder)):
        candidates = [folder]
    else:
        candidates = _unfinished_runs(folder)
    if not candidates:
        state = ("a finished run" if _is_run(folder) else "no run" if not os.path.exists(folder)
                 else "not a run")
        raise UsageError(f"--resume: expected the --out of an unfinished run (a .{os.path.basename(folder)}"
                         f".tmp-RUNID folder beside it) or that folder; given {path!r} ({state}, and "
                         "no unfinished run beside it)")
    if len(candidates) > 1:
        raise UsageError(f"--resume: expected one unfinished run; given {path!r} with {len(candidates)}: "
                         f"{', '.join(candidates)} (give one of these folders)")
    run = _read_run(candidates[0])
    if run.get("status") == "failed":
        raise UsageError(f"--resume: expected an unfinished run; given {candidates[0]!r}, which stopped "
                         "on a non-finite NLL (resuming would repeat it)")
    return candidates[0], run


# ---------------------------------------------------------------- the command


def _run(args, train: np.ndarray, test: np.ndarray, temp: str, run: dict, resumed: bool) -> int:
    """Train, evaluate and export into `temp`, then move it to `args.out`; the exit status."""
    start = time.perf_counter()
    run_id, out, event_size = run["run_id"], args.out, train.shape[1]
    _, num_validation = _split_sizes(len(train), None, args.validation_split)
    fitted, validation = train[:-num_validation], train[-num_validation:]
    batch_size = min(args.batch_size, len(fitted))
    steps_per_epoch = len(fitted) // batch_size
    print(f"tfp-flows: run {run_id} {'resumed' if resumed else 'started'} in {temp}; it becomes {out} "
          f"when complete (if killed: tfp-flows fit --resume {out}).", flush=True)

    with _Stop() as stop:
        tf_keras.utils.set_random_seed(args.seed)
        model = FlowModel(_build_bijector(args, event_size), event_shape=[event_size])
        # One step per call, so that a signal stops training after the current batch.
        model.compile(optimizer=tf_keras.optimizers.Adam(args.lr), jit_compile=not args.no_jit,
                      steps_per_execution=1)
        model.optimizer.build(model.trainable_variables)
        stop.model = model
        state = _TrainingState(model, os.path.join(temp, "checkpoints", "training"))
        first_epoch = state.restore()
        epoch_end = _EpochEnd(state, steps_per_epoch, args.patience, stop)
        callbacks = [epoch_end, tf_keras.callbacks.TensorBoard(
            os.path.join(temp, "tensorboard"), write_graph=False, profile_batch=0)]
        fit_start = time.perf_counter()
        error = None
        # A run killed after its last epoch or after early stopping has nothing left to train.
        epoch_end.early_stopped = bool(state.history) and args.patience is not None and (
            first_epoch - state.best_epoch >= args.patience)
        if first_epoch < args.epochs and not epoch_end.early_stopped:
            with warnings.catch_warnings():
                # FlowModel's own divergence warning counts from the first epoch of this call,
                # not of the run; the command applies the rule to the whole history below.
                warnings.filterwarnings("ignore", message=".*diverg")
                try:
                    model.fit(_epoch_batches(fitted, batch_size, args.seed, first_epoch, args.epochs),
                              epochs=args.epochs, initial_epoch=first_epoch, steps_per_epoch=steps_per_epoch,
                              validation_data=validation, callbacks=callbacks,
                              verbose=0 if args.quiet else 1)
                except FloatingPointError as raised:
                    error = str(raised)
        fit_seconds = time.perf_counter() - fit_start
        if epoch_end.non_finite or error:
            _write_json(os.path.join(temp, "run.json"), {**run, "status": "failed"})
            scale = float(np.abs(train).max())
            sys.stderr.write(
                f"tfp-flows: error: training stopped: {epoch_end.non_finite or error}; lower --lr "
                f"(given {args.lr}) or standardise the data (max |x| = {scale:.3g}); the run's "
                f"checkpoints (last finite epoch) are kept in {temp}\n")
            return 1

        history = state.history
        if history:  # otherwise stopped within the first epoch: the current weights
            state.load_best()
        checkpoint_best = os.path.join(temp, "checkpoints", "best")
        model.save_weights(checkpoint_best)
        train_nll, test_nll = _mean_nll(model, train), _mean_nll(model, test)
        for split, value in (("train", train_nll), ("test", test_nll)):
            if not math.isfinite(value):
                print(f"tfp-flows: warning: the {split} NLL is {value}: some {split} points get a "
                      "non-finite log-density under the trained flow.")
        standard_normal_test_nll = float(np.mean(0.5 * np.sum(test.astype(np.float64) ** 2, axis=1))
                                         + 0.5 * event_size * math.log(2 * math.pi))
        per_dim_bits = 1.0 / (event_size * math.log(2.0))
        best_epoch = state.best_epoch
        metrics = {
            "run_id": run_id,
            "train_nll": train_nll,
            "test_nll": test_nll,
            "train_bits_per_dim": train_nll * per_dim_bits,
            "test_bits_per_dim": test_nll * per_dim_bits,
            "standard_normal_test_nll": standard_normal_test_nll,
            "epochs_run": len(history),
            "best_epoch": best_epoch,
            "best_validation_nll": history[best_epoch - 1]["val_nll"] if history else None,
            "diverged": diverged([entry["nll"] for entry in history]),
            "early_stopped": epoch_end.early_stopped,
            "resumed": resumed,
            "num_train": int(len(train)),
            "num_validation": int(num_validation),
            "num_test": int(len(test)),
            "event_size": int(event_size),
            "fit_seconds": fit_seconds,
        }
        if args.data == "8gaussians":
            # KL(p‖q) = E_p[log p − log q], estimated on the test points (0 is the physical limit).
            metrics["true_test_nll"] = float(-np.mean(datasets.toy_log_prob("8gaussians", test)))
            metrics["test_kl_estimate"] = test_nll - metrics["true_test_nll"]

        outputs = {"checkpoints": "checkpoints", "tensorboard": "tensorboard"}
        if event_size == 2:
            samples = np.asarray(model.sample(args.plot_samples, seed=args.seed))
            plot_density_2d(model.distribution, test, samples, os.path.join(temp, "density.png"),
                            title=f"{args.flow}, {args.layers} layers, on {os.path.basename(args.data)}: "
                            f"test NLL {test_nll:.3f} nats")
            outputs["density"] = "density.png"
        else:
            print(f"tfp-flows: data has {event_size} dimensions, not 2; skipping density.png.")
        model.export(os.path.join(temp, "saved_model"))
        outputs.update(saved_model="saved_model", metrics="metrics.json", run="run.json")
        _write_json(os.path.join(temp, "run.json"), {**run, "status": "complete"})
        # Read now, after the export: a signal during evaluation or export counts too.
        metrics["interrupted"] = stop.signum is not None and len(history) < args.epochs and not epoch_end.early_stopped
        metrics["signal"] = None if stop.signum is None else signal.Signals(stop.signum).name
        metrics["wall_seconds"] = time.perf_counter() - start
        metrics["arguments"] = run["arguments"]
        metrics["outputs"] = outputs
        metrics["history"] = history
        metrics["files"] = sorted(
            os.path.relpath(os.path.join(root, name), temp)
            for root, _, names in os.walk(temp) for name in names)
        metrics["files"].append("metrics.json")
        # Non-finite numbers (warned about above) become null: metrics.json stays strict JSON.
        _write_json(os.path.join(temp, "metrics.json"), metrics)
        _move_into_place(temp, out, run_id)

    if metrics["diverged"]:
        nll = [entry["nll"] for entry in history]
        worst = int(np.argmax(nll))
        print(f"tfp-flows: warning: training diverged: the training NLL rose from {nll[0]:.4g} (epoch 1) "
              f"to {nll[worst]:.4g} (epoch {worst + 1}), more than max(10, 50 % of |first|) nats; "
              f"try a smaller --lr (given {args.lr}).")
    print(
        f"tfp-flows: {args.flow} on {args.data}: test NLL {test_nll:.4f} nats "
        f"({metrics['test_bits_per_dim']:.4f} bits/dim; standard normal {standard_normal_test_nll:.4f} nats), "
        f"{metrics['epochs_run']} epochs in {fit_seconds:.1f} s"
        + (f"; stopped by {metrics['signal']}." if stop.signum else "."))
    for name, path in outputs.items():
        print(f"  {name:12s} {os.path.join(out, path)}")
    return 0 if stop.signum is None else 128 + stop.signum


def _given_flags(argv: Sequence[str]) -> list[str]:
    return [token.split("=", 1)[0] for token in argv if token.startswith("--")]


def _prepare(argv: list[str]) -> tuple:
    """Parse and check everything (UsageError/SystemExit(2) on a bad command line);
    return (args, train, test, temp folder, run record, resumed)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume is None:
        train, test = _load_data(args)
        run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
        arguments = {key: value for key, value in vars(args).items()
                     if key not in ("command", "command_parser", "resume")}
        run = {"run_id": run_id, "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "arguments": arguments, "data_sha256": _fingerprint(train, test)}
        return args, train, test, _temp_folder(args.out, run_id), run, False
    extra = [flag for flag in _given_flags(argv) if flag not in RESUME_FLAGS]
    if extra:
        raise UsageError(f"--resume: expected no other flag than --quiet (the run keeps its original "
                         f"arguments); given also {', '.join(extra)}")
    temp, run = _resume_target(args.resume)
    resumed = argparse.Namespace(**run["arguments"])
    resumed.quiet = args.quiet or resumed.quiet
    try:
        resumed.out = _out(resumed.out)
    except argparse.ArgumentTypeError as error:
        raise UsageError(f"--resume: the run's --out: {error}") from None
    if resumed.data not in datasets.TOY_NAMES and not os.path.isfile(resumed.data):
        raise UsageError(f"--resume: expected the run's data file; given a run whose --data {resumed.data!r} "
                         "no longer exists")
    train, test = _load_data(resumed)
    if _fingerprint(train, test) != run["data_sha256"]:
        raise UsageError(f"--resume: expected the data the run started with; given a run whose --data "
                         f"{resumed.data!r} has changed since")
    return resumed, train, test, temp, run, True


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tfp-flows` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("fit", "-h", "--help"):
        argv = ["fit", *argv]
    try:
        try:
            args, train, test, temp, run, resumed = _prepare(argv)
        except UsageError as error:
            sys.stderr.write(f"tfp-flows: error: {error}\n")
            return 2
        if run["status"] == "complete":  # killed while moving a complete run into place
            _move_into_place(temp, args.out, run["run_id"])
            print(f"tfp-flows: run {run['run_id']} was complete; moved it to {args.out}.")
            return 0
        if not resumed:
            for other in _unfinished_runs(args.out):
                print(f"tfp-flows: note: an unfinished run of {args.out} is in {other} (continue it "
                      f"with: tfp-flows fit --resume {other}, or delete it).")
            os.makedirs(temp)
            _write_json(os.path.join(temp, "run.json"), run)
        return _run(args, train, test, temp, run, resumed)
    except KeyboardInterrupt:  # before the signal handlers are installed or after they are removed
        sys.stderr.write("tfp-flows: interrupted.\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
