"""Conditional flows p(x | c): digits by class, rotated-8gaussians KL, step time vs unconditional.

1. Digits by class: the one-hot label is the context of a conditional Glow, trained with
   the protocol of `digits_quality.py` (fixed logit layer, Adam 1e-3, batch 64, early
   stopping on a 15 % validation split of train, best weights restored, fresh
   dequantization noise per batch, test scored once) next to our unconditional Glow in
   the same run. `tfp_flows.datasets.digits` returns no labels, so the labels come from
   `sklearn.datasets.load_digits` with the same split (checked pixel by pixel). The label
   can give at most log 10 nats per image (0.052 bits/dim): reported is how much of it
   each model gets. Generative classifier `argmax_c log p(x | c)` on the test digits
   beside scikit-learn's QDA on the same logit features, `reg_param` tuned on the
   validation split. `--classifier glow-ensemble3,realnvp` adds generative classifiers: the
   equal-weight mixture of 3 conditional Glows (seeds 0, 1, 2; log-mean-exp of the densities),
   a conditional realnvp (or `maf`) on the 64 logit features, and the mixture of all of them.
   Figure: one row of samples per class.
2. rotated-8gaussians: `KL(p‖q) = E_p[log p(x|c) − log q(x|c)]` on 5000 held-out pairs
   (exact `log p` from `conditional_toy_log_prob`) for conditional `maf`, `realnvp`,
   `planar_flow` (`--variants`: wider, deeper, and a conditional rotation-scale layer),
   trained on `--toy-train` fresh pairs (the generator is exact, so pairs are free).
   Figure: learned density of the best model at four contexts beside the truth.
3. Step time: each conditional flow against its unconditional twin (XLA, Adam, median
   of interleaved steps in one process).

Run: `.venv/bin/python benchmarks/conditional.py` (time printed at the end).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import pathlib
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_probability as tfp  # noqa: E402
import tf_keras  # noqa: E402

from digits_quality import LEVELS, VALIDATION_FRACTION, bits_per_dim, logit, logit_layer, requantize  # noqa: E402
from nll_step import nll_adam_step  # noqa: E402
from tfp_flows import FlowModel, datasets, flows  # noqa: E402
from tfp_flows.definitions import Definition, Parameter  # noqa: E402
from tfp_flows.networks import MLP  # noqa: E402
from tfp_flows.plotting import plot_image_grid  # noqa: E402

tfb = tfp.bijectors
tfd = tfp.distributions

MACHINE = "2 CPU cores (shared with other jobs), no GPU"
RESULTS = pathlib.Path(__file__).parent / "results"
NUM_CLASSES = 10
TOY = "rotated-8gaussians"


# --- 1. digits by class -----------------------------------------------------------------

def digits_with_labels():
    """(images, labels) of `datasets.digits` train and test, labels from scikit-learn.

    The split is the one of `datasets.digits` (its permutation); the check that
    `floor(17 y)` equals scikit-learn's pixels makes sure each label belongs to its image.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    order = np.random.default_rng(datasets._DIGITS_SPLIT_SEED).permutation(len(bunch.images))
    num_test = int(round(datasets.DIGITS_TEST_FRACTION * len(bunch.images)))
    out = {}
    for split, chosen in (("test", order[:num_test]), ("train", order[num_test:])):
        images = datasets.digits(split)
        pixels = np.floor(images[..., 0].astype(np.float64) * LEVELS)
        if not np.array_equal(pixels, bunch.images[chosen]):
            raise RuntimeError("the digits split of tfp_flows.datasets.digits changed")
        out[split] = (images, bunch.target[chosen].astype(np.int64))
    return out["train"], out["test"]


def carve(images, labels, seed: int = 0):
    """The validation split of `digits_quality.carve_validation`, labels alongside."""
    order = np.random.default_rng(seed).permutation(len(images))
    cut = int(round(VALIDATION_FRACTION * len(images)))
    return (images[order[cut:]], labels[order[cut:]]), (images[order[:cut]], labels[order[:cut]])


def one_hot(labels) -> np.ndarray:
    return np.eye(NUM_CLASSES, dtype=np.float32)[labels]


def _pairs(x, y, conditional: bool, seed: int):
    """Training batches (fresh dequantization noise, reshuffled with `seed`) and held batches."""
    (x_fit, y_fit), (x_val, y_val) = x, y
    if conditional:
        train = tf.data.Dataset.from_tensor_slices((x_fit, one_hot(y_fit)))
        train = train.shuffle(len(x_fit), seed=seed).batch(64, drop_remainder=True)
        train = train.map(lambda x, c: (requantize(x), c))
        held = tf.data.Dataset.from_tensor_slices((x_val, one_hot(y_val))).batch(64, drop_remainder=True)
    else:
        train = tf.data.Dataset.from_tensor_slices(x_fit).shuffle(len(x_fit), seed=seed)
        train = train.batch(64, drop_remainder=True).map(requantize)
        held = tf.data.Dataset.from_tensor_slices(x_val).batch(64, drop_remainder=True)
    return train, held


def train_glow(conditional: bool, fit, validation, args, seed: int = 0):
    """Glow (2 levels × 4 steps) behind the logit layer, trained by the digits protocol.

    `seed` sets the Glow's initial weights, the shuffling and the dequantization noise.
    """
    tf_keras.utils.set_random_seed(seed)
    glow = flows.glow([8, 8, 1], 2, 4, args.glow_hidden, seed=seed,
                      context_size=NUM_CLASSES if conditional else None)
    model = FlowModel(tfb.Chain([logit_layer(), glow]), [8, 8, 1],
                      context_shape=[NUM_CLASSES] if conditional else None)
    model.compile(learning_rate=1e-3, jit_compile=True)
    train, held = _pairs(fit, validation, conditional, seed)
    start = time.perf_counter()
    history = model.fit(train, validation_data=held, epochs=args.digits_epochs, patience=10, verbose=0)
    return model, len(history.history["nll"]), time.perf_counter() - start


class _Flat:
    """A model on `[64]` vectors seen as `[8, 8, 1]` images by `class_log_probs`."""

    def __init__(self, model):
        self.model = model

    def log_prob(self, images, context):
        return self.model.log_prob(np.reshape(images, (len(images), -1)), context=context)


def train_vector_flow(name: str, fit, validation, args, seed: int = 0):
    """Conditional `realnvp` or `maf` on the 64 logit features (the logit layer of Glow's input).

    Same protocol as Glow: Adam 1e-3, batch 64, fresh dequantization noise per batch, early
    stopping (patience 10) on the validation split, best weights restored.
    """
    tf_keras.utils.set_random_seed(seed)
    width = args.vector_hidden
    if name == "realnvp":
        flow = flows.realnvp(64, args.vector_layers, [width, width], seed=seed, context_size=NUM_CLASSES)
    else:
        flow = flows.maf(64, args.vector_layers, [width, width], seed=seed, context_size=NUM_CLASSES)
    model = FlowModel(tfb.Chain([logit_layer(), flow]), [64], context_shape=[NUM_CLASSES])
    model.compile(learning_rate=1e-3, jit_compile=True)
    flat = [(x.reshape(len(x), -1), y) for x, y in (fit, validation)]
    train, held = _pairs(*flat, True, seed)
    start = time.perf_counter()
    history = model.fit(train, validation_data=held, epochs=args.digits_epochs, patience=10, verbose=0)
    return _Flat(model), len(history.history["nll"]), time.perf_counter() - start


def class_log_probs(model, images) -> np.ndarray:
    """`[N, 10]`: `log p(x | c)` of every image under every class."""
    n = len(images)
    columns = []
    for k in range(NUM_CLASSES):
        context = np.tile(one_hot([k]), (n, 1))
        columns.append(model.log_prob(images, context=context).numpy().astype(np.float64))
    return np.stack(columns, axis=1)


def qda_accuracy(fit, validation, test):
    """QDA on the logit features, `reg_param` chosen on the validation split."""
    from sklearn.discriminant_analysis import QuadraticDiscriminantAnalysis

    features = [logit(x.reshape(len(x), -1))[0] for x, _ in (fit, validation, test)]
    scores = {}
    for reg in (0.0, 1e-3, 1e-2, 0.03, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0):
        qda = QuadraticDiscriminantAnalysis(reg_param=reg).fit(features[0], fit[1])
        scores[reg] = float(np.mean(qda.predict(features[1]) == validation[1]))
    best = max(scores, key=lambda r: (scores[r], r))
    qda = QuadraticDiscriminantAnalysis(reg_param=best).fit(features[0], fit[1])
    return float(np.mean(qda.predict(features[2]) == test[1])), best, scores[best]


def _log_mean_exp(tables) -> np.ndarray:
    """`log (1/K) Σ_k p_k`: the log-density of the equal-weight mixture of K models."""
    return np.logaddexp.reduce(np.stack(tables), axis=0) - math.log(len(tables))


CLASSIFIERS = ("glow-ensemble3", "realnvp", "maf")


def digits_section(args) -> str:
    extras = [name for name in args.classifier.split(",") if name]
    unknown = sorted(set(extras) - set(CLASSIFIERS))
    if unknown:
        raise SystemExit(f"--classifier: expected names among {list(CLASSIFIERS)}; given {unknown}.")
    train, test = digits_with_labels()
    fit, validation = carve(*train)
    conditional, epochs_c, seconds_c = train_glow(True, fit, validation, args)
    print(f"conditional Glow: {epochs_c} epochs, {seconds_c:.0f} s", flush=True)
    unconditional, epochs_u, seconds_u = train_glow(False, fit, validation, args)
    print(f"unconditional Glow: {epochs_u} epochs, {seconds_u:.0f} s", flush=True)

    x_test, y_test = test
    table = class_log_probs(conditional, x_test)
    own = table[np.arange(len(y_test)), y_test]
    nll_c = float(-own.mean())
    # log p(x) of the conditional model's own mixture Σ_c p(c) p(x|c), p(c) = 1/10.
    mixture = np.logaddexp.reduce(table, axis=1) - math.log(NUM_CLASSES)
    nll_mix = float(-mixture.mean())
    nll_u = float(-unconditional.log_prob(x_test).numpy().mean())
    accuracy = float(np.mean(np.argmax(table, axis=1) == y_test))
    qda_test, qda_reg, qda_val = qda_accuracy(fit, validation, test)
    validation_table = class_log_probs(conditional, validation[0])
    validation_accuracy = float(np.mean(np.argmax(validation_table, axis=1) == validation[1]))

    # Extra generative classifiers: (label, [test tables], [validation tables], epochs, seconds).
    tables = {"glow": ([table], [validation_table])}
    extra_rows, trained = [], []
    if "glow-ensemble3" in extras:
        for seed in (1, 2):
            model, epochs, seconds = train_glow(True, fit, validation, args, seed=seed)
            print(f"conditional Glow seed {seed}: {epochs} epochs, {seconds:.0f} s", flush=True)
            trained.append((f"conditional Glow, seed {seed}", epochs, seconds))
            tables["glow"][0].append(class_log_probs(model, x_test))
            tables["glow"][1].append(class_log_probs(model, validation[0]))
        extra_rows.append(("conditional Glow ensemble, seeds 0, 1, 2: argmax_c log (1/3) Σ_k p_k(x | c)",
                           tables["glow"][0], tables["glow"][1]))
    for name in ("realnvp", "maf"):
        if name in extras:
            model, epochs, seconds = train_vector_flow(name, fit, validation, args)
            label = (f"conditional {name} {args.vector_layers} × [{args.vector_hidden}, "
                     f"{args.vector_hidden}] on the 64 logit features")
            print(f"{label}: {epochs} epochs, {seconds:.0f} s", flush=True)
            trained.append((label, epochs, seconds))
            tables[name] = ([class_log_probs(model, x_test)], [class_log_probs(model, validation[0])])
            extra_rows.append((f"{label}, argmax_c log p(x | c)", *tables[name]))
            every = [tables["glow"][0] + tables[name][0], tables["glow"][1] + tables[name][1]]
            k = len(tables["glow"][0])
            extra_rows.append((f"equal-weight mixture of the {k} conditional Glow{'s' if k > 1 else ''} "
                               f"and the conditional {name}: argmax_c log (1/{k + 1}) Σ_k p_k(x | c)", *every))
    classifier_rows = []
    for label, test_tables, validation_tables in extra_rows:
        scores = [float(np.mean(np.argmax(_log_mean_exp(t), axis=1) == y))
                  for t, y in ((test_tables, y_test), (validation_tables, validation[1]))]
        classifier_rows.append((label, *scores))
        print(f"{label}: test {scores[0]:.4f}, validation {scores[1]:.4f}", flush=True)

    ceiling = math.log(NUM_CLASSES)
    rows = [
        ("unconditional Glow (ours), log p(x)", nll_u, epochs_u, seconds_u),
        ("conditional Glow, mixture Σ_c p(x|c)/10", nll_mix, "-", "-"),
        ("conditional Glow, log p(x | true label)", nll_c, epochs_c, seconds_c),
    ]
    lines = [
        "| model | test NLL (nats/image) | bits/dim | epochs | train s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {name} | {nll:.2f} | {bits_per_dim(nll):.3f} | {e} | "
              f"{s if isinstance(s, str) else f'{s:.0f}'} |" for name, nll, e, s in rows]
    lines += [
        "",
        f"Label information (ceiling log 10 = {ceiling:.3f} nats/image = "
        f"{ceiling / (64 * math.log(2)):.4f} bits/dim):",
        "",
        "| gain | nats/image | share of log 10 |",
        "| --- | ---: | ---: |",
        f"| conditional Glow over its own mixture, E[log p(x|c) − log p(x)] = E[log p(c|x)] + log 10 "
        f"| {nll_mix - nll_c:.3f} | {(nll_mix - nll_c) / ceiling:.0%} |",
        f"| conditional Glow over the unconditional Glow | {nll_u - nll_c:.3f} | "
        f"{(nll_u - nll_c) / ceiling:.0%} |",
        "",
        "Generative classifier on the 359 test digits:",
        "",
        "| classifier | test accuracy | validation accuracy |",
        "| --- | ---: | ---: |",
        f"| conditional Glow (seed 0), argmax_c log p(x | c) | {accuracy:.3f} ({round(accuracy * len(y_test))}"
        f"/{len(y_test)}) | {validation_accuracy:.3f} ({round(validation_accuracy * len(validation[1]))}"
        f"/{len(validation[1])}) |",
    ]
    lines += [f"| {label} | {t:.3f} ({round(t * len(y_test))}/{len(y_test)}) | {v:.3f} "
              f"({round(v * len(validation[1]))}/{len(validation[1])}) |" for label, t, v in classifier_rows]
    lines += [
        f"| QDA on logit(y), reg_param = {qda_reg:g} (best on validation) | {qda_test:.3f} "
        f"({round(qda_test * len(y_test))}/{len(y_test)}) | {qda_val:.3f} "
        f"({round(qda_val * len(validation[1]))}/{len(validation[1])}) |",
    ]
    if trained:
        lines += ["", "Extra classifier models (same protocol, early stopping on the validation split):", "",
                  "| model | epochs | train s |", "| --- | ---: | ---: |"]
        lines += [f"| {label} | {epochs} | {seconds:.0f} |" for label, epochs, seconds in trained]
    samples = conditional.sample(10, context=one_hot(np.arange(NUM_CLASSES)), seed=0).numpy()
    grid = np.transpose(samples, (1, 0, 2, 3, 4)).reshape(-1, 8, 8, 1)  # row k: class k
    plot_image_grid(np.clip(grid, 0.0, 1.0), str(RESULTS / "conditional_digits_samples.png"), nrow=10,
                    title="conditional Glow: row k = samples of digit k")
    return "\n".join(lines)


# --- 2. rotated-8gaussians ---------------------------------------------------------------

class _Rotate2D(tfb.Bijector):
    """`x = R y`, `R = [[cos, −sin], [sin, cos]]` (batch of angles given by cos, sin); log-det 0."""

    def __init__(self, cos, sin):
        self._cos, self._sin = cos, sin
        super().__init__(forward_min_event_ndims=1, is_constant_jacobian=True, name="rotate_2d")

    def _forward(self, y):
        return tf.stack([self._cos * y[..., 0] - self._sin * y[..., 1],
                         self._sin * y[..., 0] + self._cos * y[..., 1]], axis=-1)

    def _inverse(self, x):
        return tf.stack([self._cos * x[..., 0] + self._sin * x[..., 1],
                         -self._sin * x[..., 0] + self._cos * x[..., 1]], axis=-1)

    def _forward_log_det_jacobian(self, y):
        return tf.zeros_like(self._cos)


def conditional_rotation_scale(context_size: int = 2, hidden_units=(32, 32), seed: int = 0) -> flows.Flow:
    """A context-dependent linear layer `x = R(φ(c)) · diag(exp(s(c))) · y + t(c)` on R².

    An MLP maps the context to `(u, v, s₁, s₂, t₁, t₂)`, `(cos φ, sin φ) = (u, v)/‖(u, v)‖`;
    log-det `s₁ + s₂`. It starts at the identity (zero last layer, bias (1, 0, 0, 0, 0, 0)).
    The library's conditional flows have no such layer: their context only modulates
    per-coordinate affine maps (MADE, couplings) or planar/radial parameters.
    """
    network = MLP(context_size, 6, hidden_units)
    bias = np.array([1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    parameters = (Parameter("network", network.initial(np.random.default_rng(seed), output_bias=bias)),)

    def build(values, context, found):
        u, v, s1, s2, t1, t2 = tf.unstack(network(values["network"], context), axis=-1)
        norm = tf.sqrt(u * u + v * v + 1e-12)
        return tfb.Chain([tfb.Shift(tf.stack([t1, t2], -1)), _Rotate2D(u / norm, v / norm),
                          tfb.Scale(tf.exp(tf.stack([s1, s2], -1)))])

    return flows.Flow(Definition("conditional_rotation_scale", {"context_size": context_size},
                                 parameters, build, tf.float32, (2,), context_size))


TOY_MODELS = {
    "maf": ("maf 5 × [64, 64]", lambda: flows.maf(2, 5, [64, 64], seed=0, context_size=2)),
    "realnvp": ("realnvp 8 × [64, 64]", lambda: flows.realnvp(2, 8, [64, 64], seed=0, context_size=2)),
    "planar_flow": ("planar_flow 32, context MLP (64, 64)",
                    lambda: flows.planar_flow(2, 32, seed=0, context_size=2)),
}
TOY_VARIANTS = [
    ("maf 5 × [128, 128]", lambda: flows.maf(2, 5, [128, 128], seed=0, context_size=2)),
    ("maf 8 × [128, 128]", lambda: flows.maf(2, 8, [128, 128], seed=0, context_size=2)),
    ("realnvp 8 × [128, 128]", lambda: flows.realnvp(2, 8, [128, 128], seed=0, context_size=2)),
    ("planar_flow 32, context MLP (128, 128)",
     lambda: flows.planar_flow(2, 32, seed=0, context_size=2, context_hidden_units=(128, 128))),
    ("conditional rotation-scale layer ∘ planar_flow 32 (unconditional)",
     lambda: tfb.Chain([conditional_rotation_scale(), flows.planar_flow(2, 32, seed=0)])),
    ("conditional rotation-scale layer ∘ maf 5 × [64, 64] (conditional)",
     lambda: tfb.Chain([conditional_rotation_scale(), flows.maf(2, 5, [64, 64], seed=0, context_size=2)])),
]


def toy_configs(args) -> list:
    """(label, builder) of each conditional model trained: `--toy-models`, then the variants."""
    names = [name for name in args.toy_models.split(",") if name]
    unknown = sorted(set(names) - set(TOY_MODELS))
    if unknown:
        raise SystemExit(f"--toy-models: expected names among {sorted(TOY_MODELS)}; given {unknown}.")
    return [TOY_MODELS[name] for name in names] + (TOY_VARIANTS if args.variants else [])


def train_toy(build, data, args):
    """Adam `--toy-lr` with cosine decay to 1 % over all steps, XLA; no early stopping."""
    x_fit, c_fit = data
    tf_keras.utils.set_random_seed(0)
    model = FlowModel(build(), [2], context_shape=[2])
    steps = args.toy_epochs * (len(x_fit) // args.toy_batch)
    rate = tf_keras.optimizers.schedules.CosineDecay(args.toy_lr, steps, alpha=0.01)
    model.compile(optimizer=tf_keras.optimizers.Adam(rate), jit_compile=True)
    start = time.perf_counter()
    model.fit(x_fit, context=c_fit, epochs=args.toy_epochs, batch_size=args.toy_batch, verbose=0)
    return model, steps, time.perf_counter() - start


def toy_section(args) -> tuple[str, dict]:
    x, c = datasets.conditional_toy(TOY, args.toy_train, seed=0)
    x_test, c_test = datasets.conditional_toy(TOY, 5000, seed=2)
    truth = datasets.conditional_toy_log_prob(TOY, x_test, c_test)
    entropy = float(-truth.mean())
    # A model that ignores the context at best matches the marginal p(x) = E_θ p(x|θ).
    marginal = marginal_log_prob(x_test)
    ignoring = float(np.mean(truth - marginal))
    lines = [
        "| model | Adam steps | train s (compile included) | test KL(p‖q) (nats) |",
        "| --- | ---: | ---: | ---: |",
        f"| exact marginal p(x) (ignores the context) | - | - | {ignoring:.3f} |",
    ]
    models = {}
    for label, build in toy_configs(args):
        model, steps, seconds = train_toy(build, (x, c), args)
        q = model.log_prob(x_test, context=c_test).numpy().astype(np.float64)
        kl = float(np.mean(truth - q)) if np.all(np.isfinite(q)) else float("nan")
        lines.append(f"| {label} | {steps} | {seconds:.0f} | {kl:.3f} |")
        print(f"{label}: KL {kl:.4f} nats after {steps} steps, {seconds:.0f} s", flush=True)
        models[label] = (model, kl)
    lines.append(f"| (entropy of p(x|c): {entropy:.3f} nats) | | | |")
    return "\n".join(lines), models


def marginal_log_prob(x, num_angles: int = 720) -> np.ndarray:
    """`log p(x) = log E_θ p(x | θ)`, the average over θ on a fine grid of the exact density."""
    angles = (np.arange(num_angles) + 0.5) * 2 * np.pi / num_angles
    columns = [datasets.conditional_toy_log_prob(
        TOY, x, np.tile([np.cos(a), np.sin(a)], (len(x), 1))) for a in angles]
    return np.logaddexp.reduce(np.stack(columns, 1), axis=1) - math.log(num_angles)


def toy_figure(models: dict) -> None:
    label = min(models, key=lambda k: models[k][1] if np.isfinite(models[k][1]) else np.inf)
    model = models[label][0]
    angles = (0.0, np.pi / 8, np.pi / 3, 3 * np.pi / 4)
    grid = np.linspace(-5.0, 5.0, 200)
    xx, yy = np.meshgrid(grid, grid)
    points = np.stack([xx.ravel(), yy.ravel()], 1).astype(np.float32)
    figure, axes = plt.subplots(2, len(angles), figsize=(3 * len(angles), 6))
    for j, angle in enumerate(angles):
        context = np.tile([np.cos(angle), np.sin(angle)], (len(points), 1)).astype(np.float32)
        true = np.exp(datasets.conditional_toy_log_prob(TOY, points, context))
        learned = np.exp(model.log_prob(points, context=context).numpy())
        for row, (density, name) in enumerate(((true, "true"), (learned, "learned"))):
            ax = axes[row, j]
            ax.imshow(density.reshape(xx.shape), origin="lower", extent=(-5, 5, -5, 5), cmap="viridis")
            ax.set_title(f"{name}, θ = {np.degrees(angle):.0f}°", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    figure.suptitle(f"rotated-8gaussians: p(x | θ), learned by {label} (KL {models[label][1]:.3f})")
    figure.tight_layout()
    figure.savefig(RESULTS / "conditional_8gaussians.png", dpi=100)
    plt.close(figure)


# --- 3. step time ---------------------------------------------------------------------

def speed_section(args) -> str:
    """Median step time (XLA, Adam) of each conditional flow against its unconditional twin."""
    rng = np.random.default_rng(0)
    vectors = tf.constant(rng.standard_normal((512, 2)), tf.float32)
    vector_context = tf.constant(rng.standard_normal((512, 2)), tf.float32)
    images = tf.constant(rng.uniform(size=(64, 8, 8, 1)), tf.float32)
    labels = tf.constant(one_hot(rng.integers(0, 10, size=64)))
    specs = {
        "planar_flow 8": (lambda k: flows.planar_flow(2, 8, seed=0, context_size=k), vectors, vector_context),
        "radial_flow 8": (lambda k: flows.radial_flow(2, 8, seed=0, context_size=k), vectors, vector_context),
        "maf 5 × [64, 64]": (lambda k: flows.maf(2, 5, [64, 64], seed=0, context_size=k), vectors, vector_context),
        "iaf 5 × [64, 64]": (lambda k: flows.iaf(2, 5, [64, 64], seed=0, context_size=k), vectors, vector_context),
        "nice 8 × [64, 64]": (lambda k: flows.nice(2, 8, [64, 64], seed=0, context_size=k), vectors, vector_context),
        "realnvp 8 × [64, 64]": (lambda k: flows.realnvp(2, 8, [64, 64], seed=0, context_size=k), vectors, vector_context),
        "glow 8×8×1, 2 × 4, width 64 (one-hot 10)":
            (lambda k: flows.glow([8, 8, 1], 2, 4, 64, seed=0, context_size=k and 10), images, labels),
    }
    steps = {}
    for name, (build, x, context) in specs.items():
        for conditional in (False, True):
            flow = build(2 if conditional else None)
            base = tfd.Sample(tfd.Normal(0.0, 1.0), x.shape[1:])
            kwargs = {"bijector_kwargs": {"context": context}} if conditional else {}
            distribution = tfd.TransformedDistribution(base, flow)
            flow.initialize(x, context if conditional else None)
            variables = flow.trainable_variables
            step = nll_adam_step(_Conditioned(distribution, kwargs), variables, 1e-4, True)
            start = time.perf_counter()
            step(x).numpy()  # trace and compile
            print(f"{name}, {'conditional' if conditional else 'unconditional'}: compiled in "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
            steps[(name, conditional)] = step
    times = {key: [] for key in steps}
    for _ in range(args.speed_rounds):
        for key, step in steps.items():
            x = specs[key[0]][1]
            start = time.perf_counter()
            for _ in range(5):
                loss = step(x)
            loss.numpy()
            times[key].append((time.perf_counter() - start) / 5)
    lines = ["| flow | unconditional ms/step | conditional ms/step | ratio |", "| --- | ---: | ---: | ---: |"]
    for name in specs:
        plain, cond = (1e3 * float(np.median(times[(name, c)])) for c in (False, True))
        lines.append(f"| {name} | {plain:.2f} | {cond:.2f} | {cond / plain:.2f}× |")
    return "\n".join(lines)


class _Conditioned:
    """`log_prob(x)` of a distribution with fixed keyword arguments (the context)."""

    def __init__(self, distribution, kwargs):
        self.distribution, self.kwargs = distribution, kwargs

    def log_prob(self, x):
        return self.distribution.log_prob(x, **self.kwargs)


# --- main ------------------------------------------------------------------------------

def main() -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="digits,toy,speed")
    parser.add_argument("--digits-epochs", type=int, default=100)
    parser.add_argument("--glow-hidden", type=int, default=128, help="Glow coupling width (digits)")
    parser.add_argument("--classifier", default="",
                        help=f"extra digits classifiers, comma-separated, among {', '.join(CLASSIFIERS)}")
    parser.add_argument("--vector-layers", type=int, default=8, help="layers of the digits realnvp/maf")
    parser.add_argument("--vector-hidden", type=int, default=256, help="width of the digits realnvp/maf")
    parser.add_argument("--toy-models", default=",".join(TOY_MODELS),
                        help=f"comma-separated, among {', '.join(TOY_MODELS)}")
    parser.add_argument("--toy-train", type=int, default=100_000, help="training pairs (fresh, exact)")
    parser.add_argument("--toy-epochs", type=int, default=40)
    parser.add_argument("--toy-batch", type=int, default=512)
    parser.add_argument("--toy-lr", type=float, default=3e-3, help="Adam's initial rate (cosine decay)")
    parser.add_argument("--variants", action="store_true", help="also train the toy variants")
    parser.add_argument("--speed-rounds", type=int, default=10)
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    start = time.perf_counter()
    sections = args.sections.split(",")
    header = [
        f"# Conditional flows ({datetime.date.today().isoformat()}, {MACHINE})",
        "",
        f"TF {tf.__version__}, TFP {tfp.__version__}, Python {platform.python_version()}; "
        f"`{' '.join(['benchmarks/conditional.py', *sys.argv[1:]])}`.",
        "",
    ]
    body = []
    if "digits" in sections:
        body += ["## Digits by class (one-hot label as the context)", "", digits_section(args), "",
                 "![samples per class](conditional_digits_samples.png)", ""]
    if "toy" in sections:
        table, models = toy_section(args)
        toy_figure(models)
        body += [f"## rotated-8gaussians ({args.toy_train} training pairs, batch {args.toy_batch}, "
                 f"{args.toy_epochs} epochs, Adam {args.toy_lr:g} with cosine decay to 1 %, XLA; "
                 "5000 test pairs)",
                 "", table, "",
                 "![learned vs true](conditional_8gaussians.png)", ""]
    if "speed" in sections:
        body += ["## Step time, conditional vs unconditional twin (XLA, Adam, one process, "
                 f"median of {args.speed_rounds} interleaved rounds of 5 steps)", "", speed_section(args), ""]
    minutes = (time.perf_counter() - start) / 60
    text = "\n".join(header + body + [f"Run time: {minutes:.1f} min.", ""])
    name = "conditional.md" if len(sections) == 3 else f"conditional_{'_'.join(sections)}.md"
    (RESULTS / name).write_text(text)
    return text


if __name__ == "__main__":
    print(main())
