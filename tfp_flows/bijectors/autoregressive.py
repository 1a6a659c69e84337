"""Masked autoregressive affine layer (MAF, Papamakarios et al. 2017) evaluating its network once.

    forward (latent z -> data x):  x_i = z_i exp(s_i(x_{<i})) + t_i(x_{<i}),   log-det  sum_i s_i(x)
    inverse (data x -> latent z):  z = (x - t(x)) exp(-s(x)),                  log-det -sum_i s_i(x)

`(t, s) = shift_and_log_scale_fn(x)` must be autoregressive (output `i` a function of
`x_{<i}` only), e.g. `tfp_flows.networks.MADE`. The inverse is one pass of the network; its
log-det is computed with it and kept in TFP's greedy-attribute cache, so `log_prob`
(inverse, then its log-det on the same tensor) runs the network once, where TFP's
`MaskedAutoregressiveFlow` runs it twice. The forward pass is sequential: `D` passes
in a `tf.while_loop` (pass `k` fixes `x_k`), the log-det from the last one.
"""
from __future__ import annotations

from typing import Callable

import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow_probability.python.internal import cache_util

from tfp_flows.bijectors._hash import HashedOnce
from tfp_flows.checks import check_positive_integers

tfb = tfp.bijectors

__all__ = ["MaskedAutoregressiveAffine"]


class MaskedAutoregressiveAffine(HashedOnce, tfb.Bijector):
    """`x = z exp(s(x)) + t(x)` with autoregressive `(t, s)`; log-det `sum(s(x))`.

    `shift_and_log_scale_fn(x, **kwargs)` maps `x [..., event_size]` to
    `(shift, log_scale)`, both `[..., event_size]`; keyword arguments of `forward`,
    `inverse` and the log-dets (e.g. `conditional_input=c`) are passed on to it.
    """

    def __init__(
        self,
        shift_and_log_scale_fn: Callable,
        event_size: int,
        validate_args: bool = False,
        name: str = "masked_autoregressive_affine",
    ):
        parameters = dict(locals())
        if not callable(shift_and_log_scale_fn):
            raise TypeError(
                f"{name}: `shift_and_log_scale_fn` must be callable (x -> (shift, log_scale)); "
                f"given {type(shift_and_log_scale_fn).__name__}."
            )
        check_positive_integers(name, event_size=event_size)
        self._fn = shift_and_log_scale_fn
        self._event_size = int(event_size)
        super().__init__(
            forward_min_event_ndims=1,
            validate_args=validate_args,
            parameters=parameters,
            name=name,
        )

    @property
    def event_size(self) -> int:
        return self._event_size

    @property
    def shift_and_log_scale_fn(self) -> Callable:
        return self._fn

    @classmethod
    def _parameter_properties(cls, dtype):
        return {}

    def _shift_and_log_scale(self, x: tf.Tensor, kwargs: dict) -> tuple[tf.Tensor, tf.Tensor]:
        size = tf.compat.dimension_value(x.shape[-1])
        if size != self._event_size:
            raise ValueError(
                f"{self.name}: expected an input of shape [..., {self._event_size}]; given shape "
                f"{x.shape.as_list()}."
            )
        shift, log_scale = self._fn(x, **kwargs)
        shift, log_scale = tf.convert_to_tensor(shift), tf.convert_to_tensor(log_scale)
        for label, value in (("shift", shift), ("log_scale", log_scale)):
            if value.dtype != x.dtype:
                raise TypeError(
                    f"{self.name}: `shift_and_log_scale_fn` must return {label} of dtype "
                    f"{x.dtype.name} like its input; given {value.dtype.name}."
                )
            if tf.compat.dimension_value(value.shape[-1]) != self._event_size:
                raise ValueError(
                    f"{self.name}: `shift_and_log_scale_fn` must return {label} of shape "
                    f"[..., {self._event_size}]; given shape {value.shape.as_list()}."
                )
        return shift, log_scale

    _cache = cache_util.BijectorCacheWithGreedyAttrs(
        forward_name="_augmented_forward", inverse_name="_augmented_inverse"
    )

    def _augmented_inverse(self, x, **kwargs):
        shift, log_scale = self._shift_and_log_scale(x, kwargs)
        z = (x - shift) * tf.exp(-log_scale)
        return z, {"ildj": -tf.reduce_sum(log_scale, axis=-1)}

    def _augmented_forward(self, z, **kwargs):
        def body(x, _):
            shift, log_scale = self._shift_and_log_scale(x, kwargs)
            return z * tf.exp(log_scale) + shift, log_scale

        x, log_scale = tf.while_loop(
            lambda *_: True, body, (tf.zeros_like(z), tf.zeros_like(z)),
            maximum_iterations=self._event_size,
        )
        return x, {"ildj": -tf.reduce_sum(log_scale, axis=-1)}

    def _forward(self, z, **kwargs):
        return self._augmented_forward(z, **kwargs)[0]

    def _inverse(self, x, **kwargs):
        return self._augmented_inverse(x, **kwargs)[0]

    def _forward_log_det_jacobian(self, z, **kwargs):
        attributes = self._cache.forward_attributes(z, **kwargs)
        if "ildj" not in attributes:
            attributes.update(self._augmented_forward(z, **kwargs)[1])
        return -attributes["ildj"]

    def _inverse_log_det_jacobian(self, x, **kwargs):
        attributes = self._cache.inverse_attributes(x, **kwargs)
        if "ildj" not in attributes:
            attributes.update(self._augmented_inverse(x, **kwargs)[1])
        return attributes["ildj"]
