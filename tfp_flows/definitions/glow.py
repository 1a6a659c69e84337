"""Glow (Kingma & Dhariwal 2018): multi-scale ActNorm, 1x1 convolution and affine coupling steps.

Per level (data to latent): squeeze `[h, w, c] -> [h/2, w/2, 4c]`, then
`steps_per_level` x (ActNorm, invertible 1x1 conv, affine coupling on channel halves),
then half the channels are factored out and the next level works on the rest; the
latent is un-squeezed back to `[h, w, c]` (shape-preserving, so a standard-normal base
of the image's shape serves every level). With `context_size` the context vector is
broadcast over the image and joined to each coupling network's input channels.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_flows.bijectors import (
    ActNorm,
    AffineCoupling,
    GlowStep,
    Invertible1x1Conv,
    Squeeze,
    factor_out,
    rotation_lu,
)
from tfp_flows.bijectors._hash import HashedOnce
from tfp_flows.checks import check_dtype, check_positive_integer, check_seed, check_shape
from tfp_flows.definitions.core import Definition, Parameter, definition, json_arguments, seeded_rng
from tfp_flows.definitions.coupling import conditioner
from tfp_flows.networks import ConvNet

tfb = tfp.bijectors

__all__ = ["glow"]


class _ActNormFromData(HashedOnce, tfb.Bijector):
    """ActNorm whose values come from the batch its inverse sees; records them in `found`.

    Used once, eagerly, by `Definition.initial_values_from_data`.
    """

    def __init__(self, key: str, found: dict, dtype):
        self._key, self._found = key, found
        super().__init__(forward_min_event_ndims=1, dtype=dtype, name="act_norm_from_data")

    def _inverse(self, x):
        values = ActNorm.initial_values(x)
        self._found[self._key] = values
        return ActNorm(values).inverse(x)


@definition
def glow(
    image_shape: Sequence[int],
    levels: int = 2,
    steps_per_level: int = 4,
    hidden_channels: int = 64,
    seed: int | None = None,
    dtype=tf.float32,
    context_size: int | None = None,
) -> Definition:
    """Multi-scale Glow on `[H, W, C]` images; latent shape = image shape.

    Log-det: sum over steps of `h w (Σ log_scale + Σ log|s|) + Σ (coupling log-scales)`.
    Every coupling network ends in a zero-initialised conv, the 1x1 convs start at
    seeded random rotations, and ActNorm starts as the identity until
    `initialize(batch)` (run by `FlowModel.fit` on its first training batch) sets it
    from data. Parameters per step: `act_norm_<l>_<k>` `[2, 4c]`, `conv1x1_<l>_<k>`
    `[4c, 4c]`, `coupling_<l>_<k>` (packed), plus the non-trainable flag `initialized`.
    """
    image_shape = check_shape("image_shape", image_shape)
    if len(image_shape) != 3:
        raise ValueError(
            f"`image_shape` must be [height, width, channels]; given {list(image_shape)}."
        )
    levels = check_positive_integer("levels", levels)
    steps_per_level = check_positive_integer("steps_per_level", steps_per_level)
    hidden_channels = check_positive_integer("hidden_channels", hidden_channels)
    seed = check_seed("seed", seed)
    dtype = check_dtype("dtype", dtype)
    if context_size is not None:
        context_size = check_positive_integer("context_size", context_size)
    height, width, channels = image_shape
    factor = 2**levels
    if height % factor or width % factor:
        raise ValueError(
            f"glow: `image_shape` height and width must be divisible by 2**levels = {factor} "
            f"(each level squeezes by 2); given image_shape {list(image_shape)}, levels={levels}."
        )
    rng = seeded_rng(seed)
    parameters, constants, data_dependent = [], {}, []
    c = channels
    for index in range(levels):
        network = ConvNet(2 * c, 4 * c, hidden_channels, context_size=context_size)
        for k in range(steps_per_level):
            tag = f"{index}_{k}"
            permutation, lower_upper, sign = rotation_lu(4 * c, int(rng.integers(2**31 - 1)))
            constants[tag] = (network, permutation, sign)
            parameters += [
                Parameter(f"act_norm_{tag}", np.zeros((2, 4 * c))),
                Parameter(f"conv1x1_{tag}", lower_upper),
                Parameter(f"coupling_{tag}", network.initial(rng)),
            ]
            data_dependent.append(f"act_norm_{tag}")
        c = 2 * c
    parameters.append(Parameter("initialized", np.zeros(()), trainable=False))

    def build(values, context, found):
        def level(index: int, c: int) -> tfb.Chain:
            steps = []
            for k in range(steps_per_level):
                tag = f"{index}_{k}"
                network, permutation, sign = constants[tag]
                shift_and_log_scale = conditioner(network, values[f"coupling_{tag}"], context,
                                                  context_size)
                if found is None:
                    steps.append(GlowStep(values[f"act_norm_{tag}"], values[f"conv1x1_{tag}"],
                                          permutation, sign, shift_and_log_scale, 2 * c,
                                          name=f"step_{tag}"))
                    continue
                # The data-dependent initialisation: the same step as its three parts,
                # ActNorm taking its values from the batch that reaches it.
                steps += [
                    _ActNormFromData(f"act_norm_{tag}", found, dtype),
                    tfb.Invert(Invertible1x1Conv(values[f"conv1x1_{tag}"], permutation, sign,
                                                 name=f"conv1x1_{tag}")),
                    AffineCoupling(shift_and_log_scale, 2 * c, event_ndims=3,
                                   name=f"affine_coupling_{tag}"),
                ]
            parts = [tfb.Invert(Squeeze()), *steps]
            if index + 1 < levels:
                parts.append(factor_out(level(index + 1, 2 * c), num_kept=2 * c, channels=4 * c))
            parts.append(Squeeze())
            return tfb.Chain(parts, name="glow" if index == 0 else f"glow_level_{index}")

        return level(0, channels)

    return Definition(
        "glow",
        json_arguments(image_shape=list(image_shape), levels=levels,
                       steps_per_level=steps_per_level, hidden_channels=hidden_channels,
                       seed=seed, dtype=dtype, context_size=context_size),
        tuple(parameters), build, dtype, tuple(image_shape), context_size,
        data_dependent=tuple(data_dependent), initialized_flag="initialized",
    )
