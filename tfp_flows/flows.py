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

tfb = tfp.bijectors

__all__ = ["planar_flow", "radial_flow", "maf", "iaf"]


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) != value or value < 1:
            raise ValueError(f"`{name}` must be a positive integer; given {value!r}.")


def planar_flow(
    event_size: int, num_layers: int, seed: int | None = None, dtype=tf.float32
) -> tfb.Chain:
    """`num_layers` Planar bijectors with free variables `u`, `w` (N(0, 0.1²)), `b = 0`.

    Invertibility needs no constraint on the variables: `Planar` reparametrises `u`.
    """
    _check_positive(event_size=event_size, num_layers=num_layers)
    rng = np.random.default_rng(seed)
    np_dtype = tf.as_dtype(dtype).as_numpy_dtype
    layers = []
    for k in range(num_layers):
        u = tf.Variable(0.1 * rng.standard_normal(event_size).astype(np_dtype), name=f"u_{k}")
        w = tf.Variable(0.1 * rng.standard_normal(event_size).astype(np_dtype), name=f"w_{k}")
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
    _check_positive(event_size=event_size, num_layers=num_layers)
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
    _check_positive(event_size=event_size, num_layers=num_layers)
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
