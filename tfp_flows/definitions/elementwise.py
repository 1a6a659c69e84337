"""Planar and radial flows: `PlanarStack` / `RadialStack` (one loop over the layers), optionally conditional.

Unconditional: the layers' parameters are the flow's parameters. Conditional
(`context_size=k`): an MLP maps the context to every layer's parameters, its last
layer starting at zero with the unconditional initial values as bias, so each
context starts at the same near-identity flow. The constraints stay inside the
bijectors (`Planar`'s `û`, Radial's softplus below), so every context gives a bijection.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

from tfp_flows.bijectors import PlanarStack, RadialStack
from tfp_flows.checks import check_int_sequence, check_positive_integer
from tfp_flows.definitions.core import (
    Definition,
    Parameter,
    common_arguments,
    definition,
    json_arguments,
    seeded_rng,
    softplus_inverse_one,
)
from tfp_flows.networks import MLP

__all__ = ["planar_flow", "radial_flow"]


def _layer_parameters(names_and_shapes, initial: dict, num_layers: int, context_size,
                      context_hidden_units, rng) -> tuple[tuple[Parameter, ...], MLP | None]:
    """The flow's parameters: the arrays themselves, or a context network producing them."""
    if context_size is None:
        return tuple(Parameter(name, initial[name]) for name, _ in names_and_shapes), None
    sizes = [int(np.prod((num_layers,) + shape)) for _, shape in names_and_shapes]
    network = MLP(context_size, sum(sizes), context_hidden_units)
    bias = np.concatenate([initial[name].ravel() for name, _ in names_and_shapes])
    return (Parameter("context_network", network.initial(rng, output_bias=bias)),), network


def _layer_values(values, names_and_shapes, num_layers: int, network, context) -> dict:
    """Name -> `[..., num_layers, *shape]` tensors: the parameters, or the network's output."""
    if network is None:
        return {name: tf.convert_to_tensor(values[name]) for name, _ in names_and_shapes}
    out = network(values["context_network"], context)
    sizes = [int(np.prod((num_layers,) + shape)) for _, shape in names_and_shapes]
    batch = tf.shape(out)[:-1]
    return {
        name: tf.reshape(piece, tf.concat([batch, [num_layers, *shape]], axis=0))
        for (name, shape), piece in zip(names_and_shapes, tf.split(out, sizes, axis=-1))
    }


def _context_hidden(context_size, context_hidden_units) -> tuple | None:
    if context_size is None:
        return None
    return check_int_sequence("context_hidden_units", context_hidden_units)


@definition
def planar_flow(
    event_size: int,
    num_layers: int,
    seed: int | None = None,
    dtype=tf.float32,
    context_size: int | None = None,
    context_hidden_units: Sequence[int] = (64, 64),
) -> Definition:
    """`num_layers` Planar bijectors `x = z + û·tanh(wᵀz + b)`, each starting close to the identity.

    `w ~ N(0, I)`; `u = s·w/‖w‖² + 0.01·N(0, I)` with `softplus(s) = 1`, so that
    `wᵀû ≈ 0` and `û ≈ 0.01·N(0, I)`. Log-det of a layer `log(1 + (1 − tanh²)·wᵀû)`.
    Parameters `u`, `w` (`[num_layers, D]`), `b` (`[num_layers]`); with `context_size`
    an MLP (`context_hidden_units`, ReLU) maps the context to all of them.
    """
    event_size, seed, dtype, context_size = common_arguments(event_size, seed, dtype, context_size)
    num_layers = check_positive_integer("num_layers", num_layers)
    hidden = _context_hidden(context_size, context_hidden_units)
    rng = seeded_rng(seed)
    w = rng.standard_normal((num_layers, event_size))
    u = softplus_inverse_one() * w / np.sum(w * w, axis=1, keepdims=True)
    u = u + 0.01 * rng.standard_normal((num_layers, event_size))
    shapes = [("u", (event_size,)), ("w", (event_size,)), ("b", ())]
    initial = {"u": u, "w": w, "b": np.zeros(num_layers)}
    parameters, network = _layer_parameters(shapes, initial, num_layers, context_size, hidden, rng)

    def build(values, context, found):
        p = _layer_values(values, shapes, num_layers, network, context)
        return PlanarStack(p["u"], p["w"], p["b"], name="planar_flow")

    return Definition(
        "planar_flow",
        json_arguments(event_size=event_size, num_layers=num_layers, seed=seed, dtype=dtype,
                       context_size=context_size, context_hidden_units=hidden or list(context_hidden_units)),
        parameters, build, dtype, (event_size,), context_size,
    )


@definition
def radial_flow(
    event_size: int,
    num_layers: int,
    seed: int | None = None,
    dtype=tf.float32,
    context_size: int | None = None,
    context_hidden_units: Sequence[int] = (64, 64),
) -> Definition:
    """`num_layers` Radial bijectors `x = z + β·(z − z₀)/(α + ‖z − z₀‖)`.

    `α = softplus(α')`, `β = −α + softplus(β')` (so `β > −α`, a bijection); centres
    `z₀ ~ N(0, I)`, `α'` and `β'` start where `α = 1`, `β = 0` (each layer the
    identity). Parameters `center` (`[num_layers, D]`), `alpha_raw`, `beta_raw`
    (`[num_layers]`); with `context_size` an MLP maps the context to all of them.
    """
    event_size, seed, dtype, context_size = common_arguments(event_size, seed, dtype, context_size)
    num_layers = check_positive_integer("num_layers", num_layers)
    hidden = _context_hidden(context_size, context_hidden_units)
    rng = seeded_rng(seed)
    shapes = [("center", (event_size,)), ("alpha_raw", ()), ("beta_raw", ())]
    raw = np.full(num_layers, softplus_inverse_one())
    initial = {"center": rng.standard_normal((num_layers, event_size)), "alpha_raw": raw,
               "beta_raw": raw.copy()}
    parameters, network = _layer_parameters(shapes, initial, num_layers, context_size, hidden, rng)

    def build(values, context, found):
        p = _layer_values(values, shapes, num_layers, network, context)
        alpha = tf.math.softplus(p["alpha_raw"])
        beta = tf.math.softplus(p["beta_raw"]) - alpha
        return RadialStack(p["center"], alpha, beta, name="radial_flow")

    return Definition(
        "radial_flow",
        json_arguments(event_size=event_size, num_layers=num_layers, seed=seed, dtype=dtype,
                       context_size=context_size, context_hidden_units=hidden or list(context_hidden_units)),
        parameters, build, dtype, (event_size,), context_size,
    )
