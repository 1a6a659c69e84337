"""Planar flow of Rezende & Mohamed (2015), with an exact inverse."""
from __future__ import annotations

import tensorflow as tf
from tensorflow_probability.python.bijectors import bijector
from tensorflow_probability.python.internal import (
    assert_util,
    cache_util,
    dtype_util,
    parameter_properties,
    tensor_util,
)

from tfp_flows.bijectors._shapes import check_event_size, static_event_size

__all__ = ["Planar"]


class Planar(bijector.AutoCompositeTensorBijector):
    """`x = z + û · tanh(wᵀz + b)`, invertible for every `u`.

    `û = u + (m(wᵀu) − wᵀu) · w / ‖w‖²` with `m(s) = −1 + softplus(s)`, so that
    `c = wᵀû = m(wᵀu) > −1` and the map is a bijection of ℝᴰ.

    Log-det: `log(1 + (1 − tanh²(wᵀz + b)) · c)`.

    Inverse: with `a = wᵀz` the projection `wᵀx = a + c · tanh(a + b)` is strictly
    increasing in `a`, and its root lies in `[wᵀx − |c|, wᵀx + |c|]`. A safeguarded
    Newton iteration (bisection whenever Newton leaves the bracket), stopped at
    convergence or after `inverse_iterations` steps, finds it; then
    `z = x − û · tanh(a + b)`. Gradients through the inverse come from the
    implicit-function theorem (one Newton step on the stopped root), not from
    backpropagating through the iterations.

    Parameters: `u`, `w` of shape `[..., D]`, `b` of shape `[...]`; leading
    dimensions are batch dimensions and broadcast with each other.
    """

    def __init__(
        self,
        u,
        w,
        b,
        inverse_iterations: int = 50,
        validate_args: bool = False,
        name: str = "planar",
    ):
        parameters = dict(locals())
        with tf.name_scope(name) as name:
            dtype = dtype_util.common_dtype([u, w, b], dtype_hint=tf.float32)
            self._u = tensor_util.convert_nonref_to_tensor(u, dtype=dtype, name="u")
            self._w = tensor_util.convert_nonref_to_tensor(w, dtype=dtype, name="w")
            self._b = tensor_util.convert_nonref_to_tensor(b, dtype=dtype, name="b")
            if int(inverse_iterations) < 1:
                raise ValueError(
                    f"inverse_iterations must be a positive integer; given {inverse_iterations}."
                )
            self._inverse_iterations = int(inverse_iterations)
            size_u = static_event_size(self._u, "u")
            size_w = static_event_size(self._w, "w")
            if size_u is not None and size_w is not None and size_u != size_w:
                raise ValueError(
                    "Planar parameters `u` and `w` must have the same event size "
                    f"(last dimension); given u with {size_u} and w with {size_w}."
                )
            self._event_size = size_u if size_u is not None else size_w
            super().__init__(
                forward_min_event_ndims=1,
                validate_args=validate_args,
                dtype=dtype,
                parameters=parameters,
                name=name,
            )

    @classmethod
    def _parameter_properties(cls, dtype, num_classes=None):
        return dict(
            u=parameter_properties.ParameterProperties(event_ndims=1),
            w=parameter_properties.ParameterProperties(event_ndims=1),
            b=parameter_properties.ParameterProperties(event_ndims=0),
        )

    @property
    def u(self):
        return self._u

    @property
    def w(self):
        return self._w

    @property
    def b(self):
        return self._b

    def u_hat(self) -> tf.Tensor:
        """The reparametrised `û`, for which `wᵀû > −1`."""
        return self._params()[0]

    def _params(self):
        """`(û, w, b, c)` with `c = wᵀû = m(wᵀu)` taken from its formula.

        Computing `c` as `wᵀû` would cancel catastrophically when `wᵀu ≪ 0`.
        softplus is floored at machine epsilon (it underflows to 0 for
        `wᵀu ≲ −745` in float64, `−104` in float32) so that `c > −1` also holds
        in floating point.
        """
        u = tf.convert_to_tensor(self._u)
        w = tf.convert_to_tensor(self._w)
        b = tf.convert_to_tensor(self._b)
        wu = tf.reduce_sum(w * u, axis=-1)
        c = tf.maximum(tf.math.softplus(wu), dtype_util.eps(w.dtype)) - 1.0
        w_norm_sq = tf.reduce_sum(tf.square(w), axis=-1)
        # Where w = 0 the map is a translation and needs no correction.
        w_norm_sq = tf.maximum(w_norm_sq, dtype_util.eps(w.dtype) ** 2)
        u_hat = u + ((c - wu) / w_norm_sq)[..., tf.newaxis] * w
        return u_hat, w, b, c

    # `forward` runs `_augmented_forward`, which also returns the log-det: TFP's
    # greedy-attribute cache keeps it (as `ildj`, the key the base class reads) with
    # the result, so `sample_and_log_prob` computes `û`, `c` and `tanh(wᵀz + b)` once
    # per layer, and its gradient takes one path through them instead of two.
    _cache = cache_util.BijectorCacheWithGreedyAttrs(
        forward_name="_augmented_forward", inverse_name="_augmented_inverse"
    )

    def _augmented_forward(self, z):
        """`(x, {"ildj": −log-det})` from one evaluation of `û`, `c` and `tanh(wᵀz + b)`."""
        check_event_size(z, self._event_size, "z", self.name)
        u_hat, w, b, c = self._params()
        h, log_det = self._activation_and_log_det(z, w, b, c)
        return z + u_hat * h[..., tf.newaxis], {"ildj": -log_det}

    def _augmented_inverse(self, x):
        # The inverse's log-det stays `−fldj(z)` at the returned `z` (computed on request).
        return self._inverse(x), None

    def _forward(self, z):
        return self._augmented_forward(z)[0]

    def _forward_log_det_jacobian(self, z):
        # Reached only for a `z` that `forward` has not seen (e.g. `log_prob`'s `z = inverse(x)`).
        _, w, b, c = self._params()
        return self._activation_and_log_det(z, w, b, c)[1]

    @staticmethod
    def _activation_and_log_det(z, w, b, c):
        """`h = tanh(wᵀz + b)` and the log-det `log(1 + (1 − h²) · c)`."""
        h = tf.tanh(tf.reduce_sum(w * z, axis=-1) + b)
        return h, tf.math.log1p((1.0 - tf.square(h)) * c)

    def _inverse(self, x):
        check_event_size(x, self._event_size, "x", self.name)
        u_hat, w, b, c = self._params()
        y = tf.reduce_sum(w * x, axis=-1)
        c, b = c + tf.zeros_like(y), b + tf.zeros_like(y)
        root = tf.stop_gradient(self._solve_projection(y, c, b))
        # One Newton step on the stopped root: same value, implicit-function gradient.
        h = tf.tanh(root + b)
        a = root - (root + c * h - y) / (1.0 + c * (1.0 - tf.square(h)))
        return x - u_hat * tf.tanh(a + b)[..., tf.newaxis]

    def _solve_projection(self, y, c, b):
        """Root `a` of `a + c·tanh(a + b) = y`: Newton safeguarded by bisection.

        A Newton step is taken when it stays inside the current bracket and at
        least halves the previous step; otherwise the bracket is bisected. The
        loop stops when no root moves by more than a few ulps, and after
        `inverse_iterations` steps at most, so it compiles with XLA.
        """
        y, c, b = tf.stop_gradient(y), tf.stop_gradient(c), tf.stop_gradient(b)
        lower, upper = y - tf.abs(c), y + tf.abs(c)
        a = 0.5 * (lower + upper)
        tolerance = 4.0 * dtype_util.eps(y.dtype)

        def step(a, lower, upper, previous_step, _):
            h = tf.tanh(a + b)
            residual = a + c * h - y
            lower = tf.where(residual < 0, a, lower)
            upper = tf.where(residual > 0, a, upper)
            newton_step = residual / (1.0 + c * (1.0 - tf.square(h)))
            newton = a - newton_step
            use_newton = (
                (newton >= lower) & (newton <= upper)
                & (2.0 * tf.abs(newton_step) <= tf.abs(previous_step))
            )
            next_a = tf.where(use_newton, newton, 0.5 * (lower + upper))
            moving = tf.reduce_any(tf.abs(next_a - a) > tolerance * (1.0 + tf.abs(a)))
            return next_a, lower, upper, next_a - a, moving

        a, *_ = tf.while_loop(
            lambda *state: state[-1],
            step,
            (a, lower, upper, upper - lower, tf.constant(True)),
            maximum_iterations=self._inverse_iterations,
        )
        return a

    def _parameter_control_dependencies(self, is_init):
        if not self.validate_args:
            return []
        assertions = []
        for name, value in (("u", self._u), ("w", self._w), ("b", self._b)):
            if is_init != tensor_util.is_ref(value):
                assertions.append(
                    tf.debugging.assert_all_finite(
                        tf.convert_to_tensor(value), message=f"Planar parameter `{name}` must be finite."
                    )
                )
        if is_init != (tensor_util.is_ref(self._u) or tensor_util.is_ref(self._w)):
            assertions.append(
                assert_util.assert_equal(
                    tf.shape(self._u)[-1],
                    tf.shape(self._w)[-1],
                    message="Planar parameters `u` and `w` must have the same event size.",
                )
            )
        return assertions
