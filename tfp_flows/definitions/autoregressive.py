"""MAF and IAF: affine autoregressive layers on packed MADE networks, reversed between layers.

A layer (`MaskedAutoregressiveAffine`) maps `x_i = z_i · exp(s_i(x_<i)) + t_i(x_<i)`;
log-det `Σ s_i`. MAF evaluates its density (data to latent) and its log-det together
in one network pass per layer (TFP's `MaskedAutoregressiveFlow` takes two); IAF is its inverse,
one pass per layer when sampling. With `context_size` the context enters every
hidden layer of each MADE (through the nonlinearity).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_flows.bijectors import MaskedAutoregressiveAffine
from tfp_flows.checks import check_choice, check_int_sequence, check_positive_integer
from tfp_flows.definitions.core import (
    Definition,
    Parameter,
    common_arguments,
    definition,
    json_arguments,
    seeded_rng,
)
from tfp_flows.networks import ACTIVATIONS, MADE

tfb = tfp.bijectors

__all__ = ["maf", "iaf"]


def _autoregressive(builder: str, invert: bool, event_size, num_layers, hidden_units, activation,
                    seed, dtype, context_size) -> Definition:
    event_size, seed, dtype, context_size = common_arguments(event_size, seed, dtype, context_size)
    num_layers = check_positive_integer("num_layers", num_layers)
    hidden_units = check_int_sequence("hidden_units", hidden_units)
    activation = check_choice("activation", activation, ACTIVATIONS)
    made = MADE(event_size, hidden_units, context_size=context_size, activation=activation)
    rng = seeded_rng(seed)
    parameters = tuple(Parameter(f"made_{k}", made.initial(rng)) for k in range(num_layers))
    reverse = np.arange(event_size - 1, -1, -1)

    def build(values, context, found):
        layers = []
        for k in range(num_layers):
            packed = values[f"made_{k}"]
            layer = MaskedAutoregressiveAffine(
                lambda x, packed=packed: made(packed, x, context), event_size, name=f"maf_{k}")
            layers.append(tfb.Invert(layer, name=f"iaf_{k}") if invert else layer)
            if k + 1 < num_layers:
                layers.append(tfb.Permute(permutation=reverse, name=f"reverse_{k}"))
        return tfb.Chain(layers, name=builder)

    return Definition(
        builder,
        json_arguments(event_size=event_size, num_layers=num_layers, hidden_units=hidden_units,
                       activation=activation, seed=seed, dtype=dtype, context_size=context_size),
        parameters, build, dtype, (event_size,), context_size,
    )


@definition
def maf(
    event_size: int,
    num_layers: int = 5,
    hidden_units: Sequence[int] = (64, 64),
    activation: str = "relu",
    seed: int | None = None,
    dtype=tf.float32,
    context_size: int | None = None,
) -> Definition:
    """Masked autoregressive flow: `num_layers` affine autoregressive layers, reversed between.

    Each MADE (one packed parameter `made_k`) uses `activation`, a soft-clamped
    log-scale `3·tanh(s/3)` and a zero last layer, so each layer starts as the
    identity. Density evaluation (`inverse`) is one network pass per layer.
    """
    return _autoregressive("maf", False, event_size, num_layers, hidden_units, activation,
                           seed, dtype, context_size)


@definition
def iaf(
    event_size: int,
    num_layers: int = 5,
    hidden_units: Sequence[int] = (64, 64),
    activation: str = "relu",
    seed: int | None = None,
    dtype=tf.float32,
    context_size: int | None = None,
) -> Definition:
    """Inverse autoregressive flow: each layer the inverse of a MAF layer.

    Sampling and `forward_log_det_jacobian` take one network pass per layer, which
    is what variational inference and distillation need; `inverse` is sequential.
    """
    return _autoregressive("iaf", True, event_size, num_layers, hidden_units, activation,
                           seed, dtype, context_size)
