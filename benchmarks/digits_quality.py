"""Density quality of NICE, RealNVP and Glow (ours) vs TFP's MAF, RealNVP and Glow, one run.

Digits: scikit-learn's 8x8 digits (17 grey levels, dequantized to y in [0, 1)^64). Every
flow models y through the same fixed logit layer `y = (sigmoid(z) - 0.05) / 0.9`, whose
log-det enters the likelihood, and is scored in bits/dim of the 17-level data:
`bpd = (NLL_y / 64 + log 17) / log 2`. Training batches get fresh dequantization noise
each time they are drawn (validation and test keep the fixed noise of `digits()`).
Every model gets the same budget: Adam 1e-3,
batch 64, at most `--max-epochs` epochs, early stopping with patience `--patience` on a
validation set carved from the training split (never the test split), best weights
restored; then the test bits/dim. Closed-form baselines (uniform, full-covariance
Gaussians fitted on train) validate the bookkeeping.

2-D: moons, 8gaussians, checkerboard, test NLL in nats with the same protocol.

Run: `.venv/bin/python benchmarks/digits_quality.py` (883 s measured on 2 shared cores).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import pathlib
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_probability as tfp  # noqa: E402
import tf_keras  # noqa: E402

from tfp_flows import FlowModel, flows  # noqa: E402
from tfp_flows.datasets import digits, toy, toy_log_prob  # noqa: E402

tfb = tfp.bijectors
tfd = tfp.distributions

MACHINE = "2 CPU cores, no GPU"
LEVELS = 17
ALPHA = 0.05
DIGITS_SIZE = 64
VALIDATION_FRACTION = 0.15


def logit_layer() -> tfb.Chain:
    """`y = (sigmoid(z) - alpha) / (1 - 2 alpha)`: forward maps the flow's output to data."""
    return tfb.Chain([tfb.Scale(1.0 / (1.0 - 2 * ALPHA)), tfb.Shift(-ALPHA), tfb.Sigmoid()])


def bits_per_dim(nll_y: float, size: int = DIGITS_SIZE) -> float:
    return (nll_y / size + math.log(LEVELS)) / math.log(2.0)


class _KerasShiftAndLogScale(tf.Module):
    """`fn(x, output_units) -> (shift, log_scale)` for `tfb.RealNVP`, a tracked Keras MLP.

    Zero last layer and unbounded log-scale: TFP's RealNVP semantics with a start at
    the identity (TFP's own `real_nvp_default_template` gives NaN on this data before
    training and hides its variables from `trainable_variables`).
    """

    def __init__(self, num_masked: int, output_units: int, hidden_units):
        super().__init__()
        layers = [tf_keras.Input(shape=(num_masked,))]
        layers += [tf_keras.layers.Dense(h, activation="relu") for h in hidden_units]
        layers.append(tf_keras.layers.Dense(2 * output_units, kernel_initializer="zeros"))
        self.network = tf_keras.Sequential(layers)

    def __call__(self, x, output_units):
        shift, log_scale = tf.split(self.network(x), 2, axis=-1)
        return shift, log_scale


def tfp_realnvp(size: int, num_couplings: int, hidden_units, seed: int = 0) -> tfb.Chain:
    rng = np.random.default_rng(seed)
    layers = []
    for k in range(num_couplings):
        layers.append(
            tfb.RealNVP(
                num_masked=size // 2,
                shift_and_log_scale_fn=_KerasShiftAndLogScale(size // 2, size - size // 2, hidden_units),
            )
        )
        if k + 1 < num_couplings:
            layers.append(tfb.Permute(rng.permutation(size).astype(np.int32)))
    return tfb.Chain(layers)


def tfp_maf(size: int, num_layers: int, hidden_units) -> tfb.Chain:
    layers = []
    for k in range(num_layers):
        network = tfb.AutoregressiveNetwork(
            params=2, event_shape=[size], hidden_units=list(hidden_units), activation="relu"
        )
        layers.append(tfb.MaskedAutoregressiveFlow(network))
        if k + 1 < num_layers:
            layers.append(tfb.Permute(np.arange(size)[::-1].astype(np.int32)))
    return tfb.Chain(layers)


def tfp_glow(hidden: int) -> tfb.Chain:
    """TFP's Glow on [8, 8, 1] (its own learned-prior exits), latent reshaped to [8, 8, 1]."""
    glow = tfb.Glow(
        output_shape=(8, 8, 1),
        num_glow_blocks=2,
        num_steps_per_block=4,
        coupling_bijector_fn=lambda shape: tfb.GlowDefaultNetwork(shape, num_hidden=hidden),
        exit_bijector_fn=tfb.GlowDefaultExitNetwork,
        seed=0,
    )
    return tfb.Chain([glow, _FlattenImage()])


class _FlattenImage(tfb.Bijector):
    """`[..., 8, 8, 1] -> [..., 64]` (tfb.Reshape fails in Keras' test step with int64 shapes)."""

    def __init__(self):
        super().__init__(forward_min_event_ndims=3, inverse_min_event_ndims=1, is_constant_jacobian=True)

    def _forward(self, x):
        return tf.reshape(x, tf.concat([tf.shape(x)[:-3], [64]], axis=0))

    def _inverse(self, y):
        return tf.reshape(y, tf.concat([tf.shape(y)[:-1], [8, 8, 1]], axis=0))

    def _forward_event_shape(self, input_shape):
        return tf.TensorShape([64])

    def _inverse_event_shape(self, output_shape):
        return tf.TensorShape([8, 8, 1])

    def _forward_event_shape_tensor(self, input_shape):
        return tf.constant([64], tf.int32)

    def _inverse_event_shape_tensor(self, output_shape):
        return tf.constant([8, 8, 1], tf.int32)

    def _forward_log_det_jacobian(self, x):
        return tf.zeros([], x.dtype)


def requantize(y: tf.Tensor) -> tf.Tensor:
    """Fresh uniform dequantization of 17-level data: `(floor(17 y) + u) / 17`, u ~ U[0, 1)."""
    return (tf.floor(y * LEVELS) + tf.random.uniform(tf.shape(y), dtype=y.dtype)) / LEVELS


def train_and_score(bijector, event_shape, train, validation, test, args, fresh_noise=False):
    """Fit with early stopping on `validation`; return (test NLL, epochs, seconds) or a failure note.

    `fresh_noise`: re-draw the dequantization noise of every training batch (digits).
    Validation and test data keep their fixed dequantization.
    """
    # Data-dependent initialisations see a real batch first: TFP's tfb.Glow ActNorm
    # initialises on its first call in either direction, and FlowModel's build pass is a
    # forward call on zeros, which would set its scales from zero variance.
    bijector.inverse(tf.constant(train[: args.batch_size]))
    model = FlowModel(bijector, event_shape=event_shape)
    model.compile(learning_rate=args.learning_rate, jit_compile=True)
    # Fixed-size batches for every model: TFP's tfb.Glow cannot trace log_prob on a
    # batch of unknown size (int32/int64 shape concat in its Reshape).
    train_batches = (
        tf.data.Dataset.from_tensor_slices(train)
        .shuffle(len(train), seed=0)
        .batch(args.batch_size, drop_remainder=True)
    )
    if fresh_noise:
        train_batches = train_batches.map(requantize)
    validation_batches = tf.data.Dataset.from_tensor_slices(validation).batch(
        args.batch_size, drop_remainder=True
    )
    start = time.perf_counter()
    try:
        history = model.fit(
            train_batches,
            validation_data=validation_batches,
            epochs=args.max_epochs,
            patience=args.patience,
            verbose=0,
        )
    except FloatingPointError as error:
        return None, f"diverged ({error})".split(". ")[0], time.perf_counter() - start
    seconds = time.perf_counter() - start
    epochs = len(history.history["nll"])
    test_log_prob = np.concatenate(
        [model.log_prob(test[i : i + 512]).numpy() for i in range(0, len(test), 512)]
    )
    if not np.all(np.isfinite(test_log_prob)):
        return None, "non-finite test log-prob", seconds
    return float(-test_log_prob.mean()), epochs, seconds


def carve_validation(train: np.ndarray, seed: int = 0):
    order = np.random.default_rng(seed).permutation(len(train))
    cut = int(round(VALIDATION_FRACTION * len(train)))
    return train[order[cut:]], train[order[:cut]]


def gaussian_nll(train: np.ndarray, test: np.ndarray) -> float:
    """Test NLL (nats/example) of the maximum-likelihood full-covariance Gaussian."""
    mean = train.mean(axis=0)
    covariance = np.cov(train, rowvar=False) + 1e-6 * np.eye(train.shape[1])
    centred = test - mean
    _, log_det = np.linalg.slogdet(covariance)
    mahalanobis = np.einsum("ni,ij,nj->n", centred, np.linalg.inv(covariance), centred)
    return float(0.5 * (mahalanobis + log_det + train.shape[1] * math.log(2 * math.pi)).mean())


def logit(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`z = logit(alpha + (1 - 2 alpha) y)` and `log|dz/dy|` summed per example."""
    p = ALPHA + (1 - 2 * ALPHA) * y.astype(np.float64)
    z = np.log(p) - np.log1p(-p)
    log_det = (math.log(1 - 2 * ALPHA) - np.log(p) - np.log1p(-p)).sum(axis=1)
    return z, log_det


def digits_table(args) -> str:
    images_train, images_test = digits("train"), digits("test")
    fit_images, val_images = carve_validation(images_train)
    fit_flat, val_flat, test_flat = (a.reshape(len(a), -1) for a in (fit_images, val_images, images_test))

    rows = [("uniform on [0, 1)^64", bits_per_dim(0.0), "-", "-")]
    rows.append(("Gaussian (full covariance) on y", bits_per_dim(gaussian_nll(fit_flat, test_flat)), "closed form", "-"))
    z_fit, _ = logit(fit_flat)
    z_test, log_det_test = logit(test_flat)
    nll_logit = gaussian_nll(z_fit, z_test) - log_det_test.mean()
    rows.append(("Gaussian (full covariance) on logit(y)", bits_per_dim(nll_logit), "closed form", "-"))

    hidden = args.hidden
    models = [
        ("NICE (ours), 8 couplings", lambda: flows.nice(64, 8, [hidden, hidden], seed=0), True),
        ("RealNVP (ours), 8 couplings", lambda: flows.realnvp(64, 8, [hidden, hidden], seed=0), True),
        ("Glow (ours), 2 levels x 4 steps", lambda: flows.glow([8, 8, 1], 2, 4, args.glow_hidden, seed=0), False),
        ("TFP MaskedAutoregressiveFlow, 5 x [256, 256]", lambda: tfp_maf(64, 5, [256, 256]), True),
        ("TFP RealNVP, 8 couplings", lambda: tfp_realnvp(64, 8, [hidden, hidden]), True),
        ("TFP Glow, 2 levels x 4 steps", lambda: tfp_glow(args.glow_hidden), False),
    ]
    for name, build, flat in models:
        tf_keras.utils.set_random_seed(0)
        bijector = tfb.Chain([logit_layer(), build()])
        data = (fit_flat, val_flat, test_flat) if flat else (fit_images, val_images, images_test)
        nll, epochs, seconds = train_and_score(bijector, data[0].shape[1:], *data, args, fresh_noise=True)
        score = bits_per_dim(nll) if nll is not None else float("nan")
        rows.append((name, score, epochs, f"{seconds:.0f}"))
        print(f"{name}: {score:.3f} bpd, {epochs} epochs, {seconds:.0f} s", flush=True)

    lines = [
        "| model | test bits/dim | epochs (early-stopped) | train time (s) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, score, epochs, seconds in rows:
        shown = f"{score:.3f}" if np.isfinite(score) else "failed"
        lines.append(f"| {name} | {shown} | {epochs} | {seconds} |")
    return "\n".join(lines)


def toy_table(args) -> str:
    datasets = ("moons", "8gaussians", "checkerboard")
    models = {
        "Gaussian (full covariance)": None,
        "NICE (ours)": lambda: flows.nice(2, 8, [64, 64], seed=0),
        "RealNVP (ours)": lambda: flows.realnvp(2, 8, [64, 64], seed=0),
        "TFP MAF 5 x [64, 64]": lambda: tfp_maf(2, 5, [64, 64]),
        "TFP RealNVP": lambda: tfp_realnvp(2, 8, [64, 64]),
    }
    results = {name: {} for name in models}
    toy_args = argparse.Namespace(**{**vars(args), "batch_size": 256, "max_epochs": args.toy_max_epochs})
    truth = {}
    for dataset in datasets:
        train = toy(dataset, args.toy_train, seed=1)
        test = toy(dataset, 5000, seed=2)
        fit, validation = carve_validation(train)
        if dataset == "8gaussians":
            truth[dataset] = float(-np.mean(toy_log_prob(dataset, test)))
        for name, build in models.items():
            if build is None:
                results[name][dataset] = gaussian_nll(fit, test)
                continue
            tf_keras.utils.set_random_seed(0)
            nll, epochs, seconds = train_and_score(build(), [2], fit, validation, test, toy_args)
            results[name][dataset] = nll
            print(f"{dataset} / {name}: {nll} nats, {epochs} epochs, {seconds:.0f} s", flush=True)
    lines = ["| model | " + " | ".join(datasets) + " |", "| --- |" + " ---: |" * len(datasets)]
    for name, scores in results.items():
        cells = [f"{scores[d]:.3f}" if scores[d] is not None else "failed" for d in datasets]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(
        "| true density (entropy) | - | " + f"{truth['8gaussians']:.3f}" + " | - |"
    )
    return "\n".join(lines)


def main() -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=100)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=256, help="coupling MLP width (vectors)")
    parser.add_argument("--glow-hidden", type=int, default=64, help="Glow conv width")
    parser.add_argument("--toy-train", type=int, default=5000)
    parser.add_argument("--toy-max-epochs", type=int, default=40)
    args = parser.parse_args()

    date = datetime.date.today().isoformat()
    digits_md = digits_table(args)
    toy_md = toy_table(args)
    text = "\n".join(
        [
            f"# Density quality on digits and 2-D data ({date}, {MACHINE})",
            "",
            f"Protocol: Adam {args.learning_rate}, at most {args.max_epochs} epochs (2-D: "
            f"{args.toy_max_epochs}), early stopping with patience {args.patience} on a "
            f"{VALIDATION_FRACTION:.0%} validation split of the training data, best weights "
            "restored, then scored once on the test split. XLA-compiled training steps. "
            "Digits training batches are re-dequantized with fresh uniform noise every epoch.",
            "",
            "## Digits (8x8, 17 levels): test bits/dim, lower is better",
            "",
            digits_md,
            "",
            f"## 2-D toy data: test NLL (nats), {args.toy_train} training points, lower is better",
            "",
            toy_md,
            "",
        ]
    )
    results = pathlib.Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / "digits_quality.md").write_text(text)
    return text


if __name__ == "__main__":
    print(main())
