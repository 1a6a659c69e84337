"""Bijectors of dual ascent of the log-likelihood (Tabak & Vanden-Eijnden 2010).

One step of the method rotates a point and then moves each coordinate by a monotone
1-D map

    φ(x) = a·x + φ0 + γ·√(ε² + (a·x − x0)²),    a = 1 − σ,

so three bijectors live here:

* `DualAscentMap`: the elementwise map φ, with its closed-form inverse.
* `Rotation`: a fixed orthogonal matrix (log-det exactly 0).
* `DualAscentFlow`: T steps `x ← φ_t(U_t x)` held as stacked arrays and run in one
  `tf.while_loop`; exactly `tfb.Chain([map_T, rotation_T, ..., map_1, rotation_1])`,
  but cheap to build and to trace when T is in the thousands.

All three map *towards* the Gaussian in their forward direction, as the steps do when
they are fitted; `tfp_flows.dual_ascent` inverts the flow to get a bijector from
N(0, I) to the data.
"""
from __future__ import annotations

import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow_probability.python.internal import (
    assert_util,
    dtype_util,
    parameter_properties,
    tensor_util,
)

from tfp_flows.bijectors._hash import HashedOnce

tfb = tfp.bijectors

__all__ = [
    "DualAscentMap", "Rotation", "DualAscentFlow", "map_forward", "map_inverse",
]

# `DualAscentFlow` projects its parameters onto this set before use, so that a
# gradient step during fine-tuning can never make a map non-invertible.
FLOW_MIN_SLOPE = 1e-3
FLOW_MAX_ABS_GAMMA = 1.0 - 1e-3


def map_forward(x, slope, shift, gamma, center, eps):
    """`y = φ(x)` and `log φ'(x)` for `φ(x) = a·x + φ0 + γ·√(ε² + (a·x − x0)²)`.

    With `u = a·x − x0` and `s = √(ε² + u²)`: `φ'(x) = a·(1 + γ·u/s)`, positive when
    `a > 0` and `|γ| < 1`.
    """
    u = slope * x - center
    s = tf.sqrt(tf.square(eps) + tf.square(u))
    y = u + center + shift + gamma * s
    log_derivative = tf.math.log(slope) + tf.math.log1p(gamma * u / s)
    return y, log_derivative


def map_inverse(y, slope, shift, gamma, center, eps):
    """`x = φ⁻¹(y)` in closed form, and `log φ'(x)`.

    With `w = y − x0 − φ0` and `R = √(w² + (1 − γ²)ε²)`, `u = a·x − x0` solves
    `u + γ√(ε² + u²) = w`: `u = (w − γR)/(1 − γ²)` when `γw ≤ 0`, else the same root in
    the cancellation-free form `u = (w² − γ²ε²)/(w + γR)`; then `x = (u + x0)/a` and
    `log φ'(x) = log a + log(1 + γ·u/√(ε² + u²))`.
    """
    w = y - center - shift
    one_minus_gamma_sq = 1.0 - tf.square(gamma)
    r = tf.sqrt(tf.square(w) + one_minus_gamma_sq * tf.square(eps))
    same_sign = gamma * w > 0
    # The unused branch of each `where` gets a harmless denominator so that neither
    # the value nor its gradient can become inf/NaN.
    safe_denominator = tf.where(same_sign, w + gamma * r, tf.ones_like(w))
    u = tf.where(
        same_sign,
        (tf.square(w) - tf.square(gamma * eps)) / safe_denominator,
        (w - gamma * r) / one_minus_gamma_sq,
    )
    log_derivative = tf.math.log(slope) + tf.math.log1p(
        gamma * u / tf.sqrt(tf.square(eps) + tf.square(u)))
    return (u + center) / slope, log_derivative


def _map_parameter_assertions(sigma, gamma, eps, name: str) -> list:
    """Assertions `sigma < 1`, `|gamma| < 1`, `eps > 0` with messages naming each."""
    one = tf.ones([], dtype=sigma.dtype)
    return [
        assert_util.assert_less(
            sigma, one,
            message=f"{name}: `sigma` must be < 1 (the slope a = 1 - sigma must be "
                    "positive); given values listed below."),
        assert_util.assert_less(
            tf.abs(gamma), one,
            message=f"{name}: `gamma` must satisfy |gamma| < 1 for a monotone map; "
                    "given |gamma| listed below."),
        assert_util.assert_positive(
            eps, message=f"{name}: `eps` must be > 0; given values listed below"),
    ]


class DualAscentMap(HashedOnce, tfb.AutoCompositeTensorBijector):
    """Elementwise monotone map `y = a·x + φ0 + γ·√(ε² + (a·x − x0)²)`, `a = 1 − σ`.

    Scalar bijector (`forward_min_event_ndims = 0`); the parameters broadcast against
    the input, typically one value per coordinate on the last axis.

    * log-det: `log φ'(x) = log a + log(1 + γ·u/s)`, `u = a·x − x0`, `s = √(ε² + u²)`.
    * inverse: closed form (see `map_inverse`).
    * valid (a bijection of ℝ) iff `σ < 1`, `|γ| < 1`, `ε > 0`; `validate_args=True`
      checks exactly that. At `σ = φ0 = γ = 0` it is the identity.
    """

    def __init__(self, sigma, shift, gamma, center, eps, validate_args: bool = False,
                 name: str = "dual_ascent_map"):
        parameters = dict(locals())
        with tf.name_scope(name) as name:
            dtype = dtype_util.common_dtype(
                [sigma, shift, gamma, center, eps], dtype_hint=tf.float32)
            self._sigma = tensor_util.convert_nonref_to_tensor(sigma, dtype=dtype, name="sigma")
            self._shift = tensor_util.convert_nonref_to_tensor(shift, dtype=dtype, name="shift")
            self._gamma = tensor_util.convert_nonref_to_tensor(gamma, dtype=dtype, name="gamma")
            self._center = tensor_util.convert_nonref_to_tensor(
                center, dtype=dtype, name="center")
            self._eps = tensor_util.convert_nonref_to_tensor(eps, dtype=dtype, name="eps")
            super().__init__(
                forward_min_event_ndims=0,
                validate_args=validate_args,
                dtype=dtype,
                parameters=parameters,
                name=name,
            )

    @classmethod
    def _parameter_properties(cls, dtype, num_classes=None):
        return dict(
            sigma=parameter_properties.ParameterProperties(
                default_constraining_bijector_fn=lambda: tfb.Chain(
                    [tfb.Shift(1.0), tfb.Scale(-1.0), tfb.Softplus()])),
            shift=parameter_properties.ParameterProperties(),
            gamma=parameter_properties.ParameterProperties(
                default_constraining_bijector_fn=tfb.Tanh),
            center=parameter_properties.ParameterProperties(),
            eps=parameter_properties.ParameterProperties(
                default_constraining_bijector_fn=tfb.Softplus),
        )

    @property
    def sigma(self):
        """Stretch σ; the slope is `a = 1 − σ`."""
        return self._sigma

    @property
    def shift(self):
        """Displacement φ0."""
        return self._shift

    @property
    def gamma(self):
        """Change of slope γ at the kink."""
        return self._gamma

    @property
    def center(self):
        """Location x0 of the (smoothed) kink, in units of `a·x`."""
        return self._center

    @property
    def eps(self):
        """Smoothing ε of the kink."""
        return self._eps

    def _params(self):
        return (1.0 - tf.convert_to_tensor(self._sigma), tf.convert_to_tensor(self._shift),
                tf.convert_to_tensor(self._gamma), tf.convert_to_tensor(self._center),
                tf.convert_to_tensor(self._eps))

    def _is_increasing(self):
        return True

    def _forward(self, x):
        return map_forward(x, *self._params())[0]

    def _inverse(self, y):
        return map_inverse(y, *self._params())[0]

    def _inverse_log_det_jacobian(self, y):
        return -map_inverse(y, *self._params())[1]

    def _forward_log_det_jacobian(self, x):
        return map_forward(x, *self._params())[1]

    def _parameter_control_dependencies(self, is_init):
        if not self.validate_args:
            return []
        refs = (self._sigma, self._gamma, self._eps)
        if all(is_init == tensor_util.is_ref(p) for p in refs):
            return []
        return _map_parameter_assertions(
            tf.convert_to_tensor(self._sigma), tf.convert_to_tensor(self._gamma),
            tf.convert_to_tensor(self._eps), "DualAscentMap")


class Rotation(HashedOnce, tfb.AutoCompositeTensorBijector):
    """`y = U·x` for a fixed orthogonal `U` (`[..., D, D]`), acting on the last axis.

    Inverse `x = Uᵀ·y`; log-det exactly 0 (|det U| = 1), so no determinant is computed.
    `validate_args=True` checks `‖UᵀU − I‖_max ≤ tol` (1e-4 in float32, 1e-10 in
    float64). Keep `U` a constant: a gradient step would leave the orthogonal group.
    """

    def __init__(self, matrix, validate_args: bool = False, name: str = "rotation"):
        parameters = dict(locals())
        with tf.name_scope(name) as name:
            dtype = dtype_util.common_dtype([matrix], dtype_hint=tf.float32)
            self._matrix = tensor_util.convert_nonref_to_tensor(
                matrix, dtype=dtype, name="matrix")
            shape = self._matrix.shape
            if shape.rank is not None and (
                    shape.rank < 2 or (shape[-1] is not None and shape[-2] is not None
                                       and shape[-1] != shape[-2])):
                raise ValueError(
                    f"Rotation: `matrix` must have shape [..., D, D] (square); given "
                    f"shape {shape.as_list()}.")
            super().__init__(
                forward_min_event_ndims=1,
                is_constant_jacobian=True,
                validate_args=validate_args,
                dtype=dtype,
                parameters=parameters,
                name=name,
            )

    @classmethod
    def _parameter_properties(cls, dtype, num_classes=None):
        return dict(matrix=parameter_properties.ParameterProperties(
            event_ndims=2,
            default_constraining_bijector_fn=parameter_properties.BIJECTOR_NOT_IMPLEMENTED))

    @property
    def matrix(self):
        """The orthogonal matrix U."""
        return self._matrix

    def _forward(self, x):
        return tf.linalg.matvec(self._matrix, x)

    def _inverse(self, y):
        return tf.linalg.matvec(self._matrix, y, transpose_a=True)

    def _forward_log_det_jacobian(self, x):
        matrix = tf.convert_to_tensor(self._matrix)
        return tf.zeros(tf.shape(matrix)[:-2], dtype=matrix.dtype)

    def _inverse_log_det_jacobian(self, y):
        return self._forward_log_det_jacobian(y)

    def _parameter_control_dependencies(self, is_init):
        if not self.validate_args or is_init == tensor_util.is_ref(self._matrix):
            return []
        matrix = tf.convert_to_tensor(self._matrix)
        tol = 1e-10 if matrix.dtype == tf.float64 else 1e-4
        gram = tf.linalg.matmul(matrix, matrix, transpose_a=True)
        deviation = tf.reduce_max(tf.abs(gram - tf.eye(tf.shape(matrix)[-1], dtype=matrix.dtype)))
        return [assert_util.assert_less_equal(
            deviation, tf.constant(tol, matrix.dtype),
            message=f"Rotation: `matrix` must be orthogonal, max|U^T U - I| <= {tol}; "
                    "given deviation listed below.")]


class DualAscentFlow(HashedOnce, tfb.AutoCompositeTensorBijector):
    """T dual-ascent steps `x ← φ_t(U_t·x)`, t = 1..T, run in one `tf.while_loop`.

    Exactly `tfb.Chain([DualAscentMap(σ_T, ...), Rotation(U_T), ..., DualAscentMap(σ_1,
    ...), Rotation(U_1)])` (a Chain applies its last bijector first), with the
    parameters stacked: `rotations [T, D, D]`, `sigma, shift, gamma, center [T, D]`,
    `eps` a scalar or `[T, D]`. Forward log-det `Σ_t Σ_k log φ_t,k'(·)` at the
    intermediate points. Forward maps towards the Gaussian (as the steps were fitted).

    For fine-tuning by SGD, `sigma, shift, gamma, center` may be `tf.Variable`s; the
    rotations must stay constants. Before use the parameters are projected onto the
    valid set (`1 − σ ≥ 1e-3`, `|γ| ≤ 1 − 1e-3`), so no gradient step can break
    invertibility; `validate_args=True` instead raises on invalid values.
    """

    def __init__(self, rotations, sigma, shift, gamma, center, eps,
                 validate_args: bool = False, name: str = "dual_ascent_flow"):
        parameters = dict(locals())
        with tf.name_scope(name) as name:
            dtype = dtype_util.common_dtype(
                [rotations, sigma, shift, gamma, center, eps], dtype_hint=tf.float32)
            self._rotations = tensor_util.convert_nonref_to_tensor(
                rotations, dtype=dtype, name="rotations")
            rot_shape = self._rotations.shape
            if rot_shape.rank != 3 or rot_shape[1] != rot_shape[2]:
                raise ValueError(
                    f"DualAscentFlow: `rotations` must have shape [T, D, D]; given "
                    f"shape {rot_shape.as_list() if rot_shape.rank is not None else None}.")
            self._num_steps, self._dim = int(rot_shape[0]), int(rot_shape[1])
            expected = [self._num_steps, self._dim]
            if tensor_util.is_ref(eps):
                converted_eps = eps
            else:
                converted_eps = tf.broadcast_to(tf.convert_to_tensor(eps, dtype=dtype), expected)
            values = dict(sigma=sigma, shift=shift, gamma=gamma, center=center, eps=converted_eps)
            for key, value in values.items():
                tensor = tensor_util.convert_nonref_to_tensor(value, dtype=dtype, name=key)
                if tensor.shape.as_list() != expected:
                    raise ValueError(
                        f"DualAscentFlow: `{key}` must have shape [T, D] = {expected} "
                        f"(one value per step and coordinate); given shape "
                        f"{tensor.shape.as_list()}.")
                setattr(self, "_" + key, tensor)
            super().__init__(
                forward_min_event_ndims=1,
                validate_args=validate_args,
                dtype=dtype,
                parameters=parameters,
                name=name,
            )

    @classmethod
    def _parameter_properties(cls, dtype, num_classes=None):
        stacked = parameter_properties.ParameterProperties(
            event_ndims=2,
            default_constraining_bijector_fn=parameter_properties.BIJECTOR_NOT_IMPLEMENTED)
        return dict(
            rotations=parameter_properties.ParameterProperties(
                event_ndims=3,
                default_constraining_bijector_fn=parameter_properties.BIJECTOR_NOT_IMPLEMENTED),
            sigma=stacked, shift=stacked, gamma=stacked, center=stacked, eps=stacked)

    @property
    def num_steps(self) -> int:
        """Number of steps T."""
        return self._num_steps

    rotations = property(lambda self: self._rotations, doc="Rotations U_t, [T, D, D].")
    sigma = property(lambda self: self._sigma, doc="Stretches σ_t, [T, D].")
    shift = property(lambda self: self._shift, doc="Displacements φ0_t, [T, D].")
    gamma = property(lambda self: self._gamma, doc="Slope changes γ_t, [T, D].")
    center = property(lambda self: self._center, doc="Kink locations x0_t, [T, D].")
    eps = property(lambda self: self._eps, doc="Kink smoothings ε_t, [T, D].")

    def steps(self) -> list:
        """The equivalent list `[Rotation(U_1), DualAscentMap(step 1), ...]`, first step first.

        `tfb.Chain(list(reversed(flow.steps())))` computes the same function as `flow`.
        """
        sigma, shift, gamma, center, eps = self._projected_params()
        bijectors = []
        for t in range(self._num_steps):
            bijectors.append(Rotation(self._rotations[t]))
            bijectors.append(DualAscentMap(sigma[t], shift[t], gamma[t], center[t], eps[t]))
        return bijectors

    def _projected_params(self):
        slope = tf.maximum(1.0 - tf.convert_to_tensor(self._sigma),
                           tf.constant(FLOW_MIN_SLOPE, self.dtype))
        gamma = tf.clip_by_value(tf.convert_to_tensor(self._gamma),
                                 -FLOW_MAX_ABS_GAMMA, FLOW_MAX_ABS_GAMMA)
        return (1.0 - slope, tf.convert_to_tensor(self._shift), gamma,
                tf.convert_to_tensor(self._center), tf.convert_to_tensor(self._eps))

    def _run(self, x, inverse: bool):
        sigma, shift, gamma, center, eps = self._projected_params()
        # Eager callers get a compiled graph (no per-op dispatch in every step); inside a
        # caller's graph the loop is inlined so that it keeps the caller's static shapes.
        run = _run_steps_in_graph if tf.executing_eagerly() else _run_steps
        return run(x, tf.convert_to_tensor(self._rotations), 1.0 - sigma, shift, gamma,
                   center, eps, inverse=inverse)

    # One loop yields both the point and the log-det; the log-det goes into TFP's
    # bijector cache (as `tfb.FFJORD` does), so `log_prob` runs the loop once, not twice.
    def _forward(self, x):
        y, log_det = self._run(x, inverse=False)
        self._cache.forward_attributes(x)["summed_fldj"] = log_det
        return y

    def _inverse(self, y):
        x, log_det = self._run(y, inverse=True)
        self._cache.inverse_attributes(y)["summed_ildj"] = log_det
        return x

    def _forward_log_det_jacobian(self, x):
        cached = self._cache.forward_attributes(x)
        if "summed_fldj" in cached:
            return cached["summed_fldj"]
        if "summed_ildj" in cached:
            return -cached["summed_ildj"]
        return self._run(x, inverse=False)[1]

    def _inverse_log_det_jacobian(self, y):
        cached = self._cache.inverse_attributes(y)
        if "summed_ildj" in cached:
            return cached["summed_ildj"]
        if "summed_fldj" in cached:
            return -cached["summed_fldj"]
        return self._run(y, inverse=True)[1]

    def _parameter_control_dependencies(self, is_init):
        if not self.validate_args:
            return []
        refs = (self._sigma, self._gamma, self._eps)
        if all(is_init == tensor_util.is_ref(p) for p in refs):
            return []
        return _map_parameter_assertions(
            tf.convert_to_tensor(self._sigma), tf.convert_to_tensor(self._gamma),
            tf.convert_to_tensor(self._eps), "DualAscentFlow")


def _run_steps(x, rotations, slope, shift, gamma, center, eps, inverse: bool):
    """All steps `x ← φ_t(U_t·x)` (or their inverses, last step first) in one while loop.

    Returns the point and the summed log-derivatives (negated for the inverse).
    """
    num_steps = tf.shape(rotations)[0]
    log_det = tf.zeros(tf.shape(x)[:-1], dtype=x.dtype)

    def forward_step(t, point, total):
        point = tf.linalg.matvec(rotations[t], point)
        point, log_derivative = map_forward(
            point, slope[t], shift[t], gamma[t], center[t], eps[t])
        return t + 1, point, total + tf.reduce_sum(log_derivative, axis=-1)

    def inverse_step(t, point, total):
        s = num_steps - 1 - t
        point, log_derivative = map_inverse(
            point, slope[s], shift[s], gamma[s], center[s], eps[s])
        point = tf.linalg.matvec(rotations[s], point, transpose_a=True)
        return t + 1, point, total - tf.reduce_sum(log_derivative, axis=-1)

    _, x, log_det = tf.while_loop(
        lambda t, *_: t < num_steps,
        inverse_step if inverse else forward_step,
        (tf.constant(0), x, log_det),
        maximum_iterations=num_steps,
    )
    return x, log_det


_run_steps_in_graph = tf.function(_run_steps, reduce_retracing=True, autograph=False)
