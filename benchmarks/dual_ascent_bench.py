"""Dual ascent (Tabak & Vanden-Eijnden) vs SGD-trained flows, one run.

8gaussians (true density known): 8000 training points, 2000 validation, 5000 test.
Test `KL(p‖q) = E_p[log p − log q]` of dual ascent against its number of steps and wall
time (the wall time includes XLA compilation), next to `flows.maf` and `flows.realnvp`
trained by `FlowModel` (Adam 1e-3, batch 256, best validation weights kept) for the same
wall time, and for a longer budget. Also: the time to fit 8000 points for 800 steps, an ε
sweep, and fine-tuning the fitted chain by SGD (`trainable_bijector` + `FlowModel`).

Digits (scikit-learn 8×8, 17 levels, dequantized y ∈ [0, 1)^64): dual ascent on y and on
`logit(0.05 + 0.9 y)` (Jacobian of the logit layer included), each with its defaults
(10% of the training split held out for early stopping), vs full-covariance Gaussians and
`flows.maf` trained by `FlowModel` on the logit layer for a fixed time budget. Test
log-likelihood in nats per image and bits/dim `(NLL_y/64 + log 17)/log 2`.

Run: `.venv/bin/python benchmarks/dual_ascent_bench.py` (about 5-8 minutes on 2 cores).
"""
from __future__ import annotations

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
from tfp_flows.dual_ascent import auto_eps, fit, static_batches, trainable_bijector  # noqa: E402
from tfp_flows.datasets import digits, toy, toy_log_prob  # noqa: E402

tfb = tfp.bijectors
tfd = tfp.distributions

MACHINE = "2 CPU cores, no GPU"
LEVELS = 17
ALPHA = 0.05
TOY_STEPS = 3000
TOY_CHECKPOINTS = (100, 250, 500, 1000, 2000, 3000)
LONG_BUDGET_S = 60.0
DIGITS_MAF_BUDGET_S = 120.0
FINE_TUNE_BUDGET_S = 40.0


class _TimeBudget(tf_keras.callbacks.Callback):
    """Stops training after `seconds` and restores the weights of the best validation NLL."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds, self.best, self.best_weights = seconds, math.inf, None

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if time.perf_counter() - self.start > self.seconds:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get("val_nll", math.inf)
        if value < self.best:
            self.best, self.best_weights = value, self.model.get_weights()

    def on_train_end(self, logs=None):
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)


def train_for(bijector, event_shape, train, validation, seconds, batch_size, learning_rate):
    """Train a FlowModel for a wall-time budget; return (model, seconds, epochs).

    Batches have a static size (`static_batches`), which the dual-ascent chain needs
    under XLA; the other flows get the same batches.
    """
    model = FlowModel(bijector, event_shape=event_shape)
    model.compile(learning_rate=learning_rate, jit_compile=True)
    start = time.perf_counter()
    history = model.fit(static_batches(train, batch_size, seed=0), validation_data=validation,
                        epochs=100000, callbacks=[_TimeBudget(seconds)], verbose=0)
    return model, time.perf_counter() - start, len(history.history["nll"])


def mean_log_prob(distribution_or_model, x, batch=2048) -> float:
    values = np.concatenate([distribution_or_model.log_prob(x[i:i + batch]).numpy()
                             for i in range(0, len(x), batch)])
    return float(np.mean(values))


def logit_layer() -> tfb.Chain:
    """`y = (sigmoid(x) − 0.05)/0.9`: maps the logit space to the data."""
    return tfb.Chain([tfb.Scale(1.0 / (1.0 - 2 * ALPHA)), tfb.Shift(-ALPHA), tfb.Sigmoid()])


def to_logit(y: np.ndarray) -> np.ndarray:
    p = ALPHA + (1.0 - 2 * ALPHA) * y.astype(np.float64)
    return (np.log(p) - np.log1p(-p)).astype(np.float32)


def bits_per_dim(ll_y: float, size: int = 64) -> float:
    return (-ll_y / size + math.log(LEVELS)) / math.log(2.0)


def table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def eight_gaussians_section() -> str:
    train = toy("8gaussians", 8000, seed=0)
    validation = toy("8gaussians", 2000, seed=1)
    test = toy("8gaussians", 5000, seed=2)
    true_ll = float(np.mean(toy_log_prob("8gaussians", test)))
    kl = lambda model: true_ll - mean_log_prob(model, test)  # noqa: E731
    out = []

    # Fitting 8000 points for 800 steps (all points are markers, no validation).
    first = fit(train, num_steps=800, validation_fraction=0.0, patience=None, seed=0,
                verbose=False)
    second = fit(train, num_steps=800, validation_fraction=0.0, patience=None, seed=1,
                 verbose=False)
    out.append(
        f"Fitting 8000 2-D points for 800 steps: {first.fit_seconds:.2f} s on the first call "
        f"(XLA compilation included), {second.fit_seconds:.2f} s on a second call with the "
        f"same shapes ({1e3 * second.fit_seconds / 800:.2f} ms per step); ε = "
        f"{first.eps:.3f} (auto).\n")

    result = fit(train, num_steps=TOY_STEPS, validation_data=validation, patience=None,
                 seed=0, verbose=False)
    history = result.history
    rows = []
    for steps in (0,) + TOY_CHECKPOINTS:
        rows.append((steps, f"{history['seconds'][steps]:.2f}",
                     f"{history['train_log_likelihood'][steps]:.3f}",
                     f"{history['validation_log_likelihood'][steps]:.3f}",
                     f"{kl(result.distribution_at(min(steps, result.num_steps))):.3f}"))
    out.append(f"Dual ascent on 8gaussians (ε = {result.eps:.3f} auto, best validation prefix "
               f"{result.num_steps} steps; step 0 is the full-covariance Gaussian):\n")
    out.append(table(["steps", "wall s", "train ll", "val ll", "test KL(p‖q)"], rows))
    budget = result.fit_seconds

    rows = [("dual ascent", f"{TOY_STEPS} steps", f"{budget:.1f}", f"{kl(result.distribution):.3f}")]
    for name, builder in (("maf", lambda: flows.maf(2)), ("realnvp", lambda: flows.realnvp(2))):
        for seconds in (budget, LONG_BUDGET_S):
            model, spent, epochs = train_for(builder(), (2,), train, validation, seconds,
                                             batch_size=256, learning_rate=1e-3)
            rows.append((name + " (FlowModel)", f"{epochs} epochs", f"{spent:.1f}",
                         f"{kl(model):.3f}"))
    out.append("\nFlows trained by SGD with the dual-ascent wall time as budget (checked after each "
               "batch, so they overshoot: compiling their first XLA step alone takes longer) "
               f"and with {LONG_BUDGET_S:.0f} s:\n")
    out.append(table(["model", "work", "wall s", "test KL(p‖q)"], rows))

    # Fine-tuning by SGD (beyond the paper) vs more dual-ascent steps.
    model, spent, epochs = train_for(trainable_bijector(result), (2,), train, validation,
                                     FINE_TUNE_BUDGET_S, batch_size=512, learning_rate=3e-5)
    longer = fit(train, num_steps=2 * TOY_STEPS, validation_data=validation, patience=None,
                 seed=0, verbose=False)
    rows = [
        (f"dual ascent, {TOY_STEPS} steps", f"{result.fit_seconds:.1f}",
         f"{kl(result.distribution):.3f}"),
        (f"+ SGD fine-tuning (Adam 3e-5, batch 512, {epochs} epochs)",
         f"{result.fit_seconds:.1f} + {spent:.1f}", f"{kl(model):.3f}"),
        (f"dual ascent, {2 * TOY_STEPS} steps (kept {longer.num_steps}; compiled chunk reused)",
         f"{longer.fit_seconds:.1f}", f"{kl(longer.distribution):.3f}"),
    ]
    out.append("\nFine-tuning the fitted chain by SGD (its σ, φ0, γ, x0 as variables):\n")
    out.append(table(["model", "wall s", "test KL(p‖q)"], rows))

    # ε sweep (the default is auto_eps(N, D) = 2·D/√N).
    rows = []
    for eps in (0.02, auto_eps(8000, 2), 0.2, 0.5):
        swept = fit(train, num_steps=TOY_STEPS, validation_data=validation, patience=None,
                    seed=0, eps=eps, verbose=False)
        rows.append((f"{eps:.3f}", f"{kl(swept.distribution):.3f}"))
    out.append(f"\nε sweep on 8gaussians ({TOY_STEPS} steps):\n")
    out.append(table(["ε", "test KL(p‖q)"], rows))
    return "\n".join(out)


def digits_section() -> str:
    y_train = digits("train").reshape(-1, 64)
    y_test = digits("test").reshape(-1, 64)
    x_train = to_logit(y_train)
    layer = logit_layer()
    rows = []

    def add(name, ll, seconds, note=""):
        rows.append((name, f"{ll:.2f}", f"{bits_per_dim(ll):.3f}", seconds, note))

    for space, train, wrap in (("y", y_train, lambda d: d),
                               ("logit", x_train, lambda d: tfd.TransformedDistribution(d, layer))):
        result = fit(train, seed=0, verbose=False)
        gaussian = wrap(result.distribution_at(0))
        fitted = wrap(result.distribution)
        add(f"full-covariance Gaussian on {space}", mean_log_prob(gaussian, y_test), "-")
        add(f"dual ascent on {space}", mean_log_prob(fitted, y_test),
            f"{result.fit_seconds:.1f}",
            f"ε = {result.eps:.2f}, {result.num_steps} steps kept of "
            f"{len(result.history['seconds']) - 1}")
    order = np.random.default_rng(0).permutation(len(y_train))
    held_out = order[:len(order) // 10]
    kept = order[len(order) // 10:]
    model, spent, epochs = train_for(
        tfb.Chain([layer, flows.maf(64, hidden_units=(128, 128))]), (64,), y_train[kept],
        y_train[held_out], DIGITS_MAF_BUDGET_S, batch_size=64, learning_rate=1e-3)
    add("maf on logit (FlowModel)", mean_log_prob(model, y_test), f"{spent:.1f}",
        f"5 layers, 128-128 MADE, Adam 1e-3, batch 64, {epochs} epochs, best validation")

    sweep = []
    for eps in (0.5, 2.0, 8.0):
        swept = fit(y_train, seed=0, eps=eps, verbose=False)
        sweep.append((f"{eps:.2f}", swept.num_steps, f"{mean_log_prob(swept.distribution, y_test):.2f}",
                      f"{swept.fit_seconds:.1f}"))
    out = ["Digits (test split, 359 images; log-likelihood in nats per image on y ∈ [0, 1)^64):\n",
           table(["model", "test ll", "bits/dim", "fit s", "notes"], rows),
           f"\nε sweep for dual ascent on y (auto ε = {auto_eps(int(0.9 * len(y_train)), 64):.2f}):\n",
           table(["ε", "steps kept", "test ll", "fit s"], sweep)]
    return "\n".join(out)


def main() -> None:
    start = time.perf_counter()
    sections = [eight_gaussians_section(), digits_section()]
    header = (f"# Dual ascent benchmark\n\n{datetime.date.today().isoformat()}, {MACHINE}, "
              f"TensorFlow {tf.__version__}; total {time.perf_counter() - start:.0f} s.\n")
    text = header + "\n" + "\n\n".join(sections) + "\n"
    print(text)
    path = pathlib.Path(__file__).parent / "results" / "dual_ascent_bench.md"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    main()
