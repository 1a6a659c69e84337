"""Coupling layers: NICE's additive coupling and rescaling, RealNVP's affine coupling.

A coupling layer splits the last axis of its event into a conditioning part `z_a`
(the first `num_masked` entries) and a transformed part `z_b` (the rest):

    x_a = z_a,    x_b = f(z_b; conditioner(z_a)).

Its Jacobian is block-triangular, so the log-det only involves the elementwise map `f`.
With `event_ndims=1` the event is a vector; with `event_ndims=3` it is an image
`[H, W, C]` split along its channels, and the conditioner sees whole feature maps.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow_probability.python.internal import assert_util
from tensorflow_probability.python.internal import dtype_util
from tensorflow_probability.python.internal import parameter_properties
from tensorflow_probability.python.internal import prefer_static as ps
from tensorflow_probability.python.internal import tensor_util

from tfp_flows.bijectors._hash import HashedOnce
from tfp_flows.bijectors._one_pass import OnePass

tfb = tfp.bijectors

__all__ = ["AdditiveCoupling", "AffineCoupling", "NICERescale", "max_log_scale"]

SCALE_TYPES = ("sigmoid", "exp")


def _wants_output_units(fn: Callable) -> bool:
    """Whether `fn` follows TFP's `fn(x, output_units)` convention (as `RealNVP` calls it).

    True for a `tf.compat.v1` template (what `tfb.real_nvp_default_template`
    returns) wrapping such a function, or a function with a parameter named
    `output_units` or two required positional parameters. Keras layers and
    one-argument functions are called as `fn(x)`.
    """
    if hasattr(fn, "get_config"):  # a Keras layer or model
        return False
    target = getattr(fn, "_func", fn)  # tf.compat.v1 templates keep the function here
    try:
        parameters = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return False
    required = [
        p for p in parameters
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return len(required) >= 2 or any(p.name == "output_units" for p in parameters)


def max_log_scale(dtype) -> float:
    """`L = −log(tiny) − 1` (86.3 in float32, 707.4 in float64): `exp(±L)` is a finite normal number."""
    return -math.log(float(np.finfo(dtype_util.as_numpy_dtype(dtype)).tiny)) - 1.0


class _Coupling(HashedOnce, tfb.Bijector):
    """Shared splitting and conditioner plumbing of the coupling layers."""

    def __init__(
        self,
        conditioner: Callable[[tf.Tensor], tf.Tensor],
        num_masked: int,
        event_ndims: int,
        outputs_per_entry: int,
        parameters: dict,
        validate_args: bool,
        name: str,
    ):
        if not callable(conditioner):
            raise TypeError(
                f"{name}: the conditioner must be callable (a function or Keras model); "
                f"given {type(conditioner).__name__}."
            )
        if int(num_masked) != num_masked or num_masked < 1:
            raise ValueError(
                f"{name}: `num_masked` must be a positive integer (the size of the "
                f"conditioning part); given {num_masked!r}."
            )
        if event_ndims not in (1, 3):
            raise ValueError(
                f"{name}: `event_ndims` must be 1 (vectors) or 3 (images [H, W, C]); "
                f"given {event_ndims!r}."
            )
        self._conditioner = conditioner
        self._num_masked = int(num_masked)
        self._event_ndims = int(event_ndims)
        self._outputs_per_entry = outputs_per_entry
        self._pass_output_units = _wants_output_units(conditioner)
        super().__init__(
            forward_min_event_ndims=event_ndims,
            is_constant_jacobian=outputs_per_entry == 1,
            validate_args=validate_args,
            parameters=parameters,
            name=name,
        )

    @property
    def num_masked(self) -> int:
        return self._num_masked

    @property
    def conditioner(self) -> Callable[[tf.Tensor], tf.Tensor]:
        return self._conditioner

    @classmethod
    def _parameter_properties(cls, dtype):
        return {}

    def _split(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        size = tf.compat.dimension_value(x.shape[-1])
        if size is None:
            raise ValueError(f"{self.name}: the last event axis must have a static size.")
        if self._num_masked >= size:
            raise ValueError(
                f"{self.name}: `num_masked` must be smaller than the last event axis "
                f"(size {size}) so that something is transformed; given "
                f"num_masked={self._num_masked}."
            )
        return x[..., : self._num_masked], x[..., self._num_masked :]

    def _conditioner_outputs(
        self, conditioning: tf.Tensor, num_transformed: int, allow_pair: bool = False
    ) -> tuple[list, bool]:
        """Run the conditioner on `conditioning` with all batch axes folded into one.

        Returns `(outputs, is_pair)`: one tensor of `outputs_per_entry ×
        num_transformed` entries, or (with `allow_pair`) the two tensors of a
        `(shift, log_scale)` pair of `num_transformed` entries each (either may be
        None, as in TFP). Each is reshaped back to the batch shape of `conditioning`.
        """
        shape = ps.shape(conditioning)
        batch_shape = shape[: ps.rank(conditioning) - self._event_ndims]
        event_shape = shape[ps.rank(conditioning) - self._event_ndims :]
        flat = tf.reshape(conditioning, ps.concat([[-1], event_shape], axis=0))
        if self._pass_output_units:
            raw = self._conditioner(flat, num_transformed)
        else:
            raw = self._conditioner(flat)
        is_pair = isinstance(raw, (tuple, list))
        if is_pair and (not allow_pair or len(raw) != 2):
            raise ValueError(
                f"{self.name}: the conditioner must return one tensor"
                + (" or a (shift, log_scale) pair" if allow_pair else "")
                + f"; given a {type(raw).__name__} of {len(raw)} elements."
            )
        parts = list(raw) if is_pair else [raw]
        expected = num_transformed if is_pair else self._outputs_per_entry * num_transformed
        outputs = []
        for part in parts:
            if part is None:
                outputs.append(None)
                continue
            part = tf.convert_to_tensor(part)
            given = tf.compat.dimension_value(part.shape[-1]) if part.shape.rank else None
            if given != expected or part.shape.rank != self._event_ndims + 1:
                what = (
                    f"each of shift and log_scale ending in {expected}" if is_pair else
                    f"one ending in {expected} ({self._outputs_per_entry} x "
                    f"{num_transformed} transformed entries)"
                )
                raise ValueError(
                    f"{self.name}: the conditioner must map a batch of shape [N, ..., "
                    f"{self._num_masked}] to tensors of rank {self._event_ndims + 1}, "
                    f"{what}; given output shape {part.shape.as_list()}."
                )
            if part.dtype != conditioning.dtype:
                raise TypeError(
                    f"{self.name}: the conditioner must return dtype {conditioning.dtype.name} "
                    f"like its input; given {part.dtype.name}."
                )
            out_event_shape = ps.shape(part)[1:]
            outputs.append(tf.reshape(part, ps.concat([batch_shape, out_event_shape], axis=0)))
        return outputs, is_pair

    def _sum_event(self, values: tf.Tensor) -> tf.Tensor:
        return tf.reduce_sum(values, axis=list(range(-self._event_ndims, 0)))


class AdditiveCoupling(_Coupling):
    """NICE additive coupling: `x_a = z_a`, `x_b = z_b + m(z_a)`; log-det 0.

    `shift_fn` maps the conditioning part `[N, ..., num_masked]` to the shift
    `[N, ..., D - num_masked]`. The inverse subtracts the same shift.
    """

    def __init__(
        self,
        shift_fn: Callable[[tf.Tensor], tf.Tensor],
        num_masked: int,
        event_ndims: int = 1,
        validate_args: bool = False,
        name: str = "additive_coupling",
    ):
        parameters = dict(locals())
        super().__init__(shift_fn, num_masked, event_ndims, 1, parameters, validate_args, name)

    def _shift(self, conditioning: tf.Tensor, num_transformed: int) -> tf.Tensor:
        return self._conditioner_outputs(conditioning, num_transformed)[0][0]

    def _forward(self, z):
        z_a, z_b = self._split(z)
        return tf.concat([z_a, z_b + self._shift(z_a, z_b.shape[-1])], axis=-1)

    def _inverse(self, x):
        x_a, x_b = self._split(x)
        return tf.concat([x_a, x_b - self._shift(x_a, x_b.shape[-1])], axis=-1)

    def _forward_log_det_jacobian(self, z):
        return tf.zeros([], dtype=z.dtype)


class AffineCoupling(OnePass, _Coupling):
    """RealNVP affine coupling: `x_a = z_a`, `x_b = z_b · exp(s) + t`; log-det `Σ s`.

    `shift_and_log_scale_fn` maps the conditioning part `[N, ..., d]` either to one
    tensor `[N, ..., 2 (D − d)]`, read as `[t, h]` along the last axis, or (TFP's
    `RealNVP` convention) to a pair `(t, s)` of `[N, ..., D − d]` each; a function
    taking `(x, output_units)` (e.g. `tfb.real_nvp_default_template(...)`) is
    called with `output_units = D − d`, like `RealNVP` calls it.

    - One tensor: the log-scale comes from `h` by `scale_type`: `'sigmoid'`
      (default) `exp(s) = 2 sigmoid(h)` in (0, 2), i.e. `s = log 2 − softplus(−h)`,
      the identity at h = 0 (a zero-initialised last layer starts as the identity);
      `'exp'`: the unbounded `s = h` of the RealNVP paper.
    - A pair: `s` is the log-scale as given (TFP's `x_b = z_b · exp(s) + t`);
      `scale_type` does not apply.

    In every case the applied log-scale is clipped to `[−L, L]`, `L = −log(tiny) − 1`
    (86.3 in float32, 707.4 in float64), so that `exp(±s)` are finite normal numbers:
    forward, inverse and log-det stay finite and consistent for every finite
    conditioner output (the log-det is `Σ` of the clipped `s`, the gradient
    w.r.t. `h` is zero beyond the clip; only a conditioner gone degenerate gets
    there). Inverse: `z_b = (x_b − t) · exp(−s)`, log-det `−Σ s`.
    Tested range: `|h|` and `|s|` up to 1e4, float32 and float64.
    """

    def __init__(
        self,
        shift_and_log_scale_fn: Callable[[tf.Tensor], tf.Tensor],
        num_masked: int,
        event_ndims: int = 1,
        scale_type: str = "sigmoid",
        validate_args: bool = False,
        name: str = "affine_coupling",
    ):
        parameters = dict(locals())
        if scale_type not in SCALE_TYPES:
            raise ValueError(
                f"{name}: `scale_type` must be one of {SCALE_TYPES}; given {scale_type!r}."
            )
        self._scale_type = scale_type
        super().__init__(
            shift_and_log_scale_fn, num_masked, event_ndims, 2, parameters, validate_args, name
        )

    @property
    def scale_type(self) -> str:
        return self._scale_type

    def _shift_and_log_scale(self, conditioning: tf.Tensor, num_transformed: int):
        outputs, is_pair = self._conditioner_outputs(conditioning, num_transformed, allow_pair=True)
        if is_pair:
            shift, log_scale = outputs
            reference = shift if shift is not None else log_scale
            if reference is None:
                raise ValueError(f"{self.name}: the conditioner returned (None, None).")
            shift = tf.zeros_like(reference) if shift is None else shift
            log_scale = tf.zeros_like(reference) if log_scale is None else log_scale
        else:
            shift, raw = tf.split(outputs[0], 2, axis=-1)
            if self._scale_type == "sigmoid":
                log_scale = tf.constant(math.log(2.0), raw.dtype) - tf.math.softplus(-raw)
            else:
                log_scale = raw
        bound = max_log_scale(log_scale.dtype)
        return shift, tf.clip_by_value(log_scale, -bound, bound)

    # The conditioner runs once per direction (`OnePass`: TFP's greedy-attribute cache
    # keeps the log-det computed with the transform), so `log_prob` (inverse, then its
    # log-det on the same tensor) does not trace the network twice.
    def _augmented_forward(self, z):
        z_a, z_b = self._split(z)
        shift, log_scale = self._shift_and_log_scale(z_a, z_b.shape[-1])
        x = tf.concat([z_a, z_b * tf.exp(log_scale) + shift], axis=-1)
        return x, {"ildj": -self._sum_event(log_scale)}

    def _augmented_inverse(self, x):
        x_a, x_b = self._split(x)
        shift, log_scale = self._shift_and_log_scale(x_a, x_b.shape[-1])
        z = tf.concat([x_a, (x_b - shift) * tf.exp(-log_scale)], axis=-1)
        return z, {"ildj": -self._sum_event(log_scale)}


class NICERescale(HashedOnce, tfb.Bijector):
    """NICE's diagonal scaling layer: `x = exp(log_scale) * z`; log-det `sum(log_scale)`.

    Acts on the last axis (event_ndims >= 1); the Jacobian is constant in `z`.
    """

    def __init__(self, log_scale, validate_args: bool = False, name: str = "nice_rescale"):
        parameters = dict(locals())
        with tf.name_scope(name) as name:
            dtype = dtype_util.common_dtype([log_scale], dtype_hint=tf.float32)
            self._log_scale = tensor_util.convert_nonref_to_tensor(
                log_scale, dtype=dtype, name="log_scale"
            )
            if self._log_scale.shape.rank == 0:
                raise ValueError(
                    f"{name}: `log_scale` must have rank >= 1 (one entry per event "
                    f"dimension); given shape {self._log_scale.shape.as_list()}."
                )
            super().__init__(
                forward_min_event_ndims=1,
                is_constant_jacobian=True,
                validate_args=validate_args,
                dtype=dtype,
                parameters=parameters,
                name=name,
            )

    @property
    def log_scale(self):
        return self._log_scale

    @classmethod
    def _parameter_properties(cls, dtype):
        return {"log_scale": parameter_properties.ParameterProperties(event_ndims=1)}

    def _forward(self, z):
        return z * tf.exp(self._log_scale)

    def _inverse(self, x):
        return x * tf.exp(-self._log_scale)

    def _forward_log_det_jacobian(self, z):
        return tf.reduce_sum(self._log_scale, axis=-1)

    def _parameter_control_dependencies(self, is_init):
        if not self.validate_args or is_init == tensor_util.is_ref(self._log_scale):
            return []
        return [
            assert_util.assert_equal(
                tf.reduce_all(tf.math.is_finite(self._log_scale)),
                True,
                message=f"{self.name}: `log_scale` must be finite (expected finite values).",
            )
        ]
