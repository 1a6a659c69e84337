"""Builders: create the trainable variables of a flow and return it as a `tfb.Chain`.

Every builder returns a bijector mapping base samples `z` to data `x`
(`forward(z) = x`). Parameters are reparametrised so that every value a
`tf.Variable` can take gives a valid (invertible) map.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

from tfp_flows.bijectors import Planar, Radial
from tfp_flows.bijectors import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    Invertible1x1Conv,
    NICERescale,
    Squeeze,
    factor_out,
)
from tfp_flows.checks import check_positive_integers
from tfp_flows.networks import GlowNetwork

tfb = tfp.bijectors

__all__ = ["planar_flow", "radial_flow", "maf", "iaf"]


def planar_flow(
    event_size: int, num_layers: int, seed: int | None = None, dtype=tf.float32
) -> tfb.Chain:
    """`num_layers` Planar bijectors, each starting close to the identity.

    `w ~ N(0, I)`; `u = s·w/‖w‖² + 0.01·N(0, I)` with `softplus(s) = 1`, so that
    `wᵀû = m(wᵀu) ≈ 0` and `û ≈ 0.01·N(0, I)`: every layer starts as a small
    perturbation of the identity. Invertibility needs no constraint on the
    variables: `Planar` reparametrises `u`.
    """
    check_positive_integers(event_size=event_size, num_layers=num_layers)
    rng = np.random.default_rng(seed)
    np_dtype = tf.as_dtype(dtype).as_numpy_dtype
    neutral = np.log(np.expm1(1.0))  # m(s) = softplus(s) - 1 = 0
    layers = []
    for k in range(num_layers):
        w0 = rng.standard_normal(event_size)
        u0 = neutral * w0 / np.dot(w0, w0) + 0.01 * rng.standard_normal(event_size)
        u = tf.Variable(u0.astype(np_dtype), name=f"u_{k}")
        w = tf.Variable(w0.astype(np_dtype), name=f"w_{k}")
        b = tf.Variable(np.zeros((), np_dtype), name=f"b_{k}")
        layers.append(Planar(u, w, b, name=f"planar_{k}"))
    return tfb.Chain(layers, name="planar_flow")


def radial_flow(
    event_size: int, num_layers: int, seed: int | None = None, dtype=tf.float32
) -> tfb.Chain:
    """`num_layers` Radial bijectors, `α = softplus(α')`, `β = −α + softplus(β')`.

    Centres start at N(0, 1) draws; `α'` and `β'` start where `α = 1`, `β = 0`
    (each layer the identity).
    """
    check_positive_integers(event_size=event_size, num_layers=num_layers)
    rng = np.random.default_rng(seed)
    np_dtype = tf.as_dtype(dtype).as_numpy_dtype
    softplus_inverse_one = np.log(np.expm1(1.0)).astype(np_dtype)
    layers = []
    for k in range(num_layers):
        center = tf.Variable(rng.standard_normal(event_size).astype(np_dtype), name=f"center_{k}")
        alpha_raw = tf.Variable(softplus_inverse_one, name=f"alpha_raw_{k}")
        beta_raw = tf.Variable(softplus_inverse_one, name=f"beta_raw_{k}")
        alpha = tfp.util.DeferredTensor(alpha_raw, tf.math.softplus)
        beta = tfp.util.DeferredTensor(
            beta_raw, lambda raw, a=alpha_raw: tf.math.softplus(raw) - tf.math.softplus(a)
        )
        layers.append(Radial(center, alpha, beta, name=f"radial_{k}"))
    return tfb.Chain(layers, name="radial_flow")


class BoundedAutoregressiveConditioner(tf.Module):
    """MADE network returning `(shift, log_scale)` with `log_scale = c·tanh(raw/c)`.

    The last layer starts at zero, so the flow layer starts as the identity; the
    soft clamp `|log_scale| < c` keeps one layer from overflowing.
    """

    def __init__(
        self,
        event_size: int,
        hidden_units: Sequence[int],
        activation: str = "relu",
        log_scale_bound: float = 3.0,
        dtype=tf.float32,
        name: str = "made",
    ):
        super().__init__(name=name)
        self.network = tfb.AutoregressiveNetwork(
            params=2,
            event_shape=[event_size],
            hidden_units=list(hidden_units),
            activation=activation,
            dtype=dtype,
        )
        self.network.build((None, event_size))
        last_kernel, last_bias = self.network.trainable_weights[-2:]
        last_kernel.assign(tf.zeros_like(last_kernel))
        last_bias.assign(tf.zeros_like(last_bias))
        self.log_scale_bound = log_scale_bound

    def __call__(self, x):
        shift, raw_log_scale = tf.unstack(self.network(x), axis=-1)
        bound = tf.cast(self.log_scale_bound, raw_log_scale.dtype)
        return shift, bound * tf.tanh(raw_log_scale / bound)


def _autoregressive_layers(
    event_size: int,
    num_layers: int,
    hidden_units: Sequence[int],
    activation: str,
    dtype,
    invert: bool,
) -> list:
    check_positive_integers(event_size=event_size, num_layers=num_layers)
    if not hidden_units or any(int(h) < 1 for h in hidden_units):
        raise ValueError(
            f"`hidden_units` must be a non-empty list of positive integers; given {hidden_units!r}."
        )
    reverse = tfb.Permute(permutation=list(range(event_size - 1, -1, -1)))
    layers = []
    for k in range(num_layers):
        conditioner = BoundedAutoregressiveConditioner(
            event_size, hidden_units, activation, dtype=dtype, name=f"made_{k}"
        )
        layer = tfb.MaskedAutoregressiveFlow(conditioner, name=f"maf_{k}")
        layers.append(tfb.Invert(layer, name=f"iaf_{k}") if invert else layer)
        if k + 1 < num_layers:
            layers.append(reverse)
    return layers


def maf(
    event_size: int,
    num_layers: int = 5,
    hidden_units: Sequence[int] = (64, 64),
    activation: str = "relu",
    dtype=tf.float32,
) -> tfb.Chain:
    """Masked autoregressive flow: TFP's `MaskedAutoregressiveFlow` layers, reversed between.

    Unlike TFP's defaults the MADE networks use a nonlinearity, a soft-clamped
    log-scale, and a zero last layer (each layer starts as the identity).
    Density evaluation (`inverse`) is one network pass per layer.
    """
    layers = _autoregressive_layers(event_size, num_layers, hidden_units, activation, dtype, False)
    return tfb.Chain(layers, name="maf")


def iaf(
    event_size: int,
    num_layers: int = 5,
    hidden_units: Sequence[int] = (64, 64),
    activation: str = "relu",
    dtype=tf.float32,
) -> tfb.Chain:
    """Inverse autoregressive flow: each layer a `tfb.Invert(MaskedAutoregressiveFlow)`.

    Sampling and `forward_log_det_jacobian` take one network pass per layer,
    which is what variational inference needs; `inverse` is sequential.
    """
    layers = _autoregressive_layers(event_size, num_layers, hidden_units, activation, dtype, True)
    return tfb.Chain(layers, name="iaf")


# --- NICE, RealNVP and Glow builders --------------------------------------------------


def _dense_conditioner(
    num_inputs: int, num_outputs: int, hidden_units: Sequence[int], dtype, name: str
) -> tf_keras.Sequential:
    """MLP `[N, num_inputs] -> [N, num_outputs]`, ReLU hidden layers, zero last layer."""
    layers = [tf_keras.Input(shape=(num_inputs,), dtype=dtype)]
    layers += [tf_keras.layers.Dense(int(h), activation="relu", dtype=dtype) for h in hidden_units]
    layers.append(tf_keras.layers.Dense(num_outputs, kernel_initializer="zeros", dtype=dtype))
    return tf_keras.Sequential(layers, name=name)


def _half_swapping_permutation(event_size: int, rng: np.random.Generator) -> tfb.Permute:
    """A fixed permutation whose inverse moves the transformed half to the front, shuffled.

    Between two couplings that both condition on the first `event_size // 2` entries,
    the entries just transformed become the next conditioning ones (as NICE's
    alternation), and the shuffle mixes entries within each half.
    """
    num_masked = event_size // 2
    order = np.concatenate(
        [rng.permutation(np.arange(num_masked, event_size)), rng.permutation(num_masked)]
    )
    return tfb.Permute(permutation=np.argsort(order).astype(np.int32))


def _coupling_stack(
    event_size: int,
    num_couplings: int,
    hidden_units: Sequence[int],
    make_coupling,
    outputs_per_entry: int,
    seed: int | None,
    dtype,
) -> list:
    check_positive_integers(num_couplings=num_couplings)
    if int(event_size) != event_size or event_size < 2:
        raise ValueError(f"`event_size` must be an integer >= 2 to split; given {event_size!r}.")
    if any(int(h) < 1 for h in hidden_units):
        raise ValueError(f"`hidden_units` must be positive integers; given {hidden_units!r}.")
    rng = np.random.default_rng(seed)
    num_masked = event_size // 2
    layers = []
    for k in range(num_couplings):
        network = _dense_conditioner(
            num_masked, outputs_per_entry * (event_size - num_masked), hidden_units, dtype,
            name=f"coupling_net_{k}",
        )
        layers.append(make_coupling(network, num_masked, k))
        if k + 1 < num_couplings:
            layers.append(_half_swapping_permutation(event_size, rng))
    return layers


def nice(
    event_size: int,
    num_couplings: int = 4,
    hidden_units: Sequence[int] = (64, 64),
    seed: int | None = None,
    dtype=tf.float32,
) -> tfb.Chain:
    """NICE: additive couplings `x_b = z_b + m(z_a)` (log-det 0), then a diagonal rescale.

    Log-det of the whole flow: `sum(log_scale)` of the `NICERescale` layer. Fixed
    permutations between couplings swap which half is transformed. Each coupling's
    MLP has a zero last layer and the rescale starts at 0, so the flow starts as the
    identity.
    """
    layers = _coupling_stack(
        event_size, num_couplings, hidden_units,
        lambda net, d, k: AdditiveCoupling(net, d, name=f"additive_coupling_{k}"),
        1, seed, dtype,
    )
    log_scale = tf.Variable(tf.zeros([event_size], dtype), name="nice_log_scale")
    layers.append(NICERescale(log_scale))
    return tfb.Chain(layers, name="nice")


def realnvp(
    event_size: int,
    num_couplings: int = 4,
    hidden_units: Sequence[int] = (64, 64),
    seed: int | None = None,
    dtype=tf.float32,
) -> tfb.Chain:
    """RealNVP: affine couplings `x_b = z_b * 2 sigmoid(h) + t` (log-det `sum log(2 sigmoid(h))`).

    The bounded scale keeps every layer's log-det below `log 2` per entry, so training
    cannot overflow; zero last layers start every coupling at the identity.
    """
    layers = _coupling_stack(
        event_size, num_couplings, hidden_units,
        lambda net, d, k: AffineCoupling(net, d, name=f"affine_coupling_{k}"),
        2, seed, dtype,
    )
    return tfb.Chain(layers, name="realnvp")


def glow(
    image_shape: Sequence[int],
    levels: int = 2,
    steps_per_level: int = 4,
    hidden_channels: int = 64,
    seed: int | None = None,
    dtype=tf.float32,
) -> tfb.Chain:
    """Multi-scale Glow on `[H, W, C]` images, shape-preserving (latent shape = image shape).

    Per level (data to latent): squeeze `[h, w, c] -> [h/2, w/2, 4c]`, then
    `steps_per_level` x (ActNorm, invertible 1x1 conv, affine coupling on channel
    halves), then half the channels are factored out to the base distribution and the
    next level works on the rest; the latent is un-squeezed back to `[h, w, c]`.
    Log-det: sum over steps of `h w (sum log_scale + sum log|s|) + sum(coupling log-scales)`.
    Every coupling network ends in a zero-initialised conv, ActNorm starts as the
    identity (initialised by the first data batch) and the 1x1 convs start at rotations.
    """
    height, width, channels = (int(d) for d in image_shape)
    check_positive_integers(
        levels=levels, steps_per_level=steps_per_level, hidden_channels=hidden_channels
    )
    factor = 2**levels
    if height % factor or width % factor or channels < 1:
        raise ValueError(
            f"glow: image height and width must be divisible by 2**levels = {factor} "
            f"(each level squeezes by 2); given image_shape {list(image_shape)}, levels={levels}."
        )
    seeds = iter(np.random.default_rng(seed).integers(0, 2**31 - 1, size=2 * levels * steps_per_level))

    def level(index: int, shape: tuple[int, int, int]) -> tfb.Chain:
        h, w, c = shape
        squeezed = (h // 2, w // 2, 4 * c)
        steps = []
        for k in range(steps_per_level):
            tag = f"{index}_{k}"
            network = GlowNetwork(
                2 * c, 4 * c, hidden_channels, seed=int(next(seeds)), dtype=dtype, name=f"glow_net_{tag}"
            )
            steps += [
                ActNorm(4 * c, dtype=dtype, name=f"act_norm_{tag}"),
                tfb.Invert(
                    Invertible1x1Conv(4 * c, seed=int(next(seeds)), dtype=dtype, name=f"conv1x1_{tag}")
                ),
                AffineCoupling(network, 2 * c, event_ndims=3, name=f"affine_coupling_{tag}"),
            ]
        parts = [tfb.Invert(Squeeze()), *steps]
        if index + 1 < levels:
            inner = level(index + 1, (squeezed[0], squeezed[1], 2 * c))
            parts.append(factor_out(inner, num_kept=2 * c, channels=4 * c))
        parts.append(Squeeze())
        return tfb.Chain(parts, name="glow" if index == 0 else f"glow_level_{index}")

    return level(0, (height, width, channels))


__all__ += ["nice", "realnvp", "glow"]
