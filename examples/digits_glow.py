"""Train Glow on the 8x8 digits and write its samples next to real digits as a PNG.

The flow models dequantized pixels y in [0, 1) through a fixed logit layer
`y = (sigmoid(z) - 0.05) / 0.9` in front of `tfp_flows.flows.glow`, trains with Keras
`fit` (XLA), early-stops on a validation split of the training digits, prints the
test bits/dim of the 17-level data, and saves a grid: the top half real test digits,
the bottom half Glow samples.

Run: `.venv/bin/python examples/digits_glow.py [--epochs 150] [--output runs/digits_glow.png]`
(on 2 CPU cores: early-stopped after 37 epochs, 2.266 test bits/dim, in under two minutes).
"""
from __future__ import annotations

import argparse
import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow_probability as tfp  # noqa: E402
import tf_keras  # noqa: E402

from tfp_flows import FlowModel  # noqa: E402
from tfp_flows.datasets import digits  # noqa: E402
from tfp_flows.flows import glow  # noqa: E402
from tfp_flows.plotting import plot_image_grid  # noqa: E402

tfb = tfp.bijectors
ALPHA = 0.05


def main() -> None:
    parser = argparse.ArgumentParser(description="Glow on 8x8 digits: samples next to real digits.")
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--output", default="runs/digits_glow.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    tf_keras.utils.set_random_seed(args.seed)
    train, test = digits("train"), digits("test")
    order = np.random.default_rng(args.seed).permutation(len(train))
    cut = len(train) // 7
    fit_data, validation = train[order[cut:]], train[order[:cut]]

    logit_layer = tfb.Chain([tfb.Scale(1 / (1 - 2 * ALPHA)), tfb.Shift(-ALPHA), tfb.Sigmoid()])
    flow = glow([8, 8, 1], levels=2, steps_per_level=4, hidden_channels=64, seed=args.seed)
    model = FlowModel(tfb.Chain([logit_layer, flow]), event_shape=[8, 8, 1])
    model.compile(learning_rate=1e-3, jit_compile=True)
    history = model.fit(
        fit_data, validation_data=validation, epochs=args.epochs, batch_size=64,
        patience=args.patience, verbose=0,
    )
    nll = -float(np.mean(model.log_prob(test).numpy()))
    bpd = (nll / 64 + math.log(17)) / math.log(2)
    print(f"trained {len(history.history['nll'])} epochs; test bits/dim {bpd:.3f}")

    samples = np.clip(model.sample(32, seed=args.seed).numpy(), 0.0, 1.0)
    grid = np.concatenate([test[:32], samples], axis=0)
    path = plot_image_grid(
        grid, args.output, nrow=8,
        title=f"top: real digits, bottom: Glow ({bpd:.2f} bpd)",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
