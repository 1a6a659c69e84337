"""NICE and RealNVP: coupling layers on packed MLP conditioners, fixed permutations between.

Each coupling keeps the first `D // 2` entries `z_a` and transforms the rest with a
map conditioned on `z_a` (and, with `context_size`, on the context, joined to `z_a`
at the network's input).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_flows.bijectors import AdditiveCoupling, AffineCoupling, NICERescale
from tfp_flows.checks import check_int_sequence, check_integer, check_positive_integer
from tfp_flows.definitions.core import (
    Definition,
    Parameter,
    common_arguments,
    definition,
    json_arguments,
    seeded_rng,
)
from tfp_flows.networks import MLP

tfb = tfp.bijectors

__all__ = ["nice", "realnvp"]


def half_swapping_permutation(event_size: int, rng: np.random.Generator) -> np.ndarray:
    """A fixed permutation whose inverse moves the transformed half to the front, shuffled.

    Between two couplings that both condition on the first `event_size // 2` entries,
    the entries just transformed become the next conditioning ones (as NICE's
    alternation), and the shuffle mixes entries within each half.
    """
    num_masked = event_size // 2
    order = np.concatenate(
        [rng.permutation(np.arange(num_masked, event_size)), rng.permutation(num_masked)]
    )
    return np.argsort(order).astype(np.int32)


def conditioner(network, packed, context, context_size):
    """`z_a -> network(packed, z_a, context)`, the context flattened like the coupling's batch."""
    if context is None:
        return lambda z_a: network(packed, z_a)
    return lambda z_a: network(packed, z_a, tf.reshape(context, [-1, context_size]))


def _coupling_definition(builder: str, additive: bool, event_size, num_couplings, hidden_units,
                         seed, dtype, context_size) -> Definition:
    event_size, seed, dtype, context_size = common_arguments(event_size, seed, dtype, context_size)
    check_integer("event_size", event_size, minimum=2)
    num_couplings = check_positive_integer("num_couplings", num_couplings)
    hidden_units = check_int_sequence("hidden_units", hidden_units)
    num_masked = event_size // 2
    outputs = (1 if additive else 2) * (event_size - num_masked)
    network = MLP(num_masked, outputs, hidden_units, context_size=context_size)
    rng = seeded_rng(seed)
    parameters = [Parameter(f"coupling_{k}", network.initial(rng)) for k in range(num_couplings)]
    permutations = [half_swapping_permutation(event_size, rng) for _ in range(num_couplings - 1)]
    if additive:
        parameters.append(Parameter("log_scale", np.zeros(event_size)))

    def build(values, context, found):
        layers = []
        for k in range(num_couplings):
            fn = conditioner(network, values[f"coupling_{k}"], context, context_size)
            if additive:
                layers.append(AdditiveCoupling(fn, num_masked, name=f"additive_coupling_{k}"))
            else:
                layers.append(AffineCoupling(fn, num_masked, name=f"affine_coupling_{k}"))
            if k + 1 < num_couplings:
                layers.append(tfb.Permute(permutation=permutations[k], name=f"permute_{k}"))
        if additive:
            layers.append(NICERescale(values["log_scale"]))
        return tfb.Chain(layers, name=builder)

    return Definition(
        builder,
        json_arguments(event_size=event_size, num_couplings=num_couplings,
                       hidden_units=hidden_units, seed=seed, dtype=dtype, context_size=context_size),
        tuple(parameters), build, dtype, (event_size,), context_size,
    )


@definition
def nice(
    event_size: int,
    num_couplings: int = 4,
    hidden_units: Sequence[int] = (64, 64),
    seed: int | None = None,
    dtype=tf.float32,
    context_size: int | None = None,
) -> Definition:
    """NICE: additive couplings `x_b = z_b + m(z_a)` (log-det 0), then a diagonal rescale.

    Log-det of the whole flow: `sum(log_scale)` of the `NICERescale` layer. Seeded
    fixed permutations between couplings swap which half is transformed. Each
    coupling's MLP (ReLU, `hidden_units`) has a zero last layer and the rescale starts
    at 0, so the flow starts as the identity.
    """
    return _coupling_definition("nice", True, event_size, num_couplings, hidden_units, seed,
                                dtype, context_size)


@definition
def realnvp(
    event_size: int,
    num_couplings: int = 4,
    hidden_units: Sequence[int] = (64, 64),
    seed: int | None = None,
    dtype=tf.float32,
    context_size: int | None = None,
) -> Definition:
    """RealNVP: affine couplings `x_b = z_b · 2σ(h) + t` (log-det `Σ log(2σ(h))`).

    The bounded scale keeps every layer's log-det below `log 2` per entry, so training
    cannot overflow; zero last layers start every coupling at the identity.
    """
    return _coupling_definition("realnvp", False, event_size, num_couplings, hidden_units, seed,
                                dtype, context_size)
