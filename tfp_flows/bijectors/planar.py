"""Planar flow of Rezende & Mohamed (2015), with an exact inverse."""
from __future__ import annotations

import numpy as np
import tensorflow as tf
from tensorflow_probability.python.internal import (
    assert_util,
    dtype_util,
    parameter_properties,
    tensor_util,
)

from tfp_flows.bijectors._one_pass import OnePassBijector
from tfp_flows.bijectors._shapes import check_event_size, static_event_size
from tfp_flows.bijectors.stack import LayerStack

__all__ = ["Planar", "PlanarStack", "solve_projection"]


class Planar(OnePassBijector):
    """`x = z + û · tanh(wᵀz + b)`, invertible for every `u`.

    `û = u + (m(wᵀu) − wᵀu) · w / ‖w‖²` with `m(s) = −1 + softplus(s)`, so that
    `c = wᵀû = m(wᵀu) > −1` and the map is a bijection of ℝᴰ. With `t = wᵀz + b`,
    `h = tanh t`, `p = 1 + c = softplus(wᵀu)` (never formed as `c + 1`):

    log-det `log(1 + (1 − h²) c) = log(h² + sech²(t) · p)`, a sum of two positive
    terms, with `sech² t = 4e/(1 + e)²`, `e = exp(−2|t|)`.

    Inverse: `s = wᵀx + b` and the root `t` of `g(t) = t + c · tanh t = s`
    (strictly increasing, `g' = h² + sech²(t) · p`). The residual is evaluated as
    `(t − tanh t) + p · tanh t − s` (a series for `t − tanh t` at small `|t|`), so
    it has no cancellation where `c → −1`. Newton starts from a lower bound of the
    root (`max(|s| − c, |s|/p)` for `c ≥ 0`; for `c < 0` the larger of `|s|` and
    the root of the cubic `p τ + |c| τ³/3 = |s|`), from where it converges
    monotonically after at most one overshoot; bisection safeguards it, and the
    loop stops at convergence or after `inverse_iterations` steps. Then
    `z = x − û · tanh t`. Gradients through the inverse come from the
    implicit-function theorem (one Newton step on the stopped root), not from the
    iterations; the inverse's log-det is returned with it.

    Tested range (both dtypes): `wᵀu` from `−50‖w‖²` to `+50`, `|u| ≤ 50`,
    `|z| ≤ 100`. The map itself is ill-conditioned where `p ≪ 1` and `|t| ≪ 1`
    (it contracts by `g' ≈ t² + p` along `w`): there the round trip can only be as
    accurate as `eps · |wᵀx| / g'` allows in the dtype, i.e. `inverse` is backward
    stable (`forward(inverse(x)) = x` to rounding) and exact up to that condition
    number.

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
        """`(û, w, b, c, p)` with `p = 1 + c = softplus(wᵀu)` and `c = p − 1`.

        Computing `c` as `wᵀû` would cancel catastrophically when `wᵀu ≪ 0`. `p`
        is floored at the smallest normal number of the dtype (softplus underflows
        for `wᵀu ≲ −87` in float32, `−708` in float64), so `c > −1` in floating
        point and the log-det stays finite.
        """
        u = tf.convert_to_tensor(self._u)
        w = tf.convert_to_tensor(self._w)
        b = tf.convert_to_tensor(self._b)
        wu = tf.reduce_sum(w * u, axis=-1)
        p = tf.maximum(tf.math.softplus(wu), _tiny(w.dtype))
        c = p - 1.0
        w_norm_sq = tf.reduce_sum(tf.square(w), axis=-1)
        # Where w = 0 the map is a translation and needs no correction.
        w_norm_sq = tf.maximum(w_norm_sq, dtype_util.eps(w.dtype) ** 2)
        u_hat = u + ((c - wu) / w_norm_sq)[..., tf.newaxis] * w
        return u_hat, w, b, c, p

    # Each direction computes `û`, `p` and `tanh t` once for the result and its log-det
    # (`OnePassBijector`).
    def _augmented_forward(self, z):
        """`(x, {"ildj": −log-det})` from one evaluation of `û`, `p` and `tanh(wᵀz + b)`."""
        check_event_size(z, self._event_size, "z", self.name)
        u_hat, w, b, _, p = self._params()
        t = tf.reduce_sum(w * z, axis=-1) + b
        h = tf.tanh(t)
        return z + u_hat * h[..., tf.newaxis], {"ildj": -_log_det(t, h, p)}

    def _augmented_inverse(self, x):
        """`(z, {"ildj": −log-det at z})`, the log-det from the implicit-gradient root."""
        check_event_size(x, self._event_size, "x", self.name)
        u_hat, w, b, c, p = self._params()
        s = tf.reduce_sum(w * x, axis=-1) + b
        c, p = c + tf.zeros_like(s), p + tf.zeros_like(s)
        root = tf.stop_gradient(
            solve_projection(s, c, p, self._inverse_iterations)
        )
        # One Newton step on the stopped root: same value, implicit-function gradient.
        h = tf.tanh(root)
        t = root - _residual(root, h, s, p) / _slope(root, h, p)
        h = tf.tanh(t)
        return x - u_hat * h[..., tf.newaxis], {"ildj": -_log_det(t, h, p)}

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


class PlanarStack(LayerStack):
    """`L` Planar layers, `tfb.Chain([Planar(u[..., k, :], w[..., k, :], b[..., k]) for k in range(L)])`.

    The same map and log-det as that Chain (layer `L − 1` applied first in
    `forward`), computed by one loop over the layer axis: `u`, `w` of shape
    `[..., L, D]`, `b` of shape `[..., L]`, `L` static. See `Planar` for each
    layer's formula, inverse and log-det.
    """

    _layer_class = Planar

    def __init__(
        self,
        u,
        w,
        b,
        inverse_iterations: int = 50,
        validate_args: bool = False,
        name: str = "planar_stack",
    ):
        parameters = dict(locals())
        with tf.name_scope(name) as name:
            stack = Planar(u, w, b, inverse_iterations, validate_args=validate_args)
            super().__init__(stack, parameters, validate_args, name)

    u = property(lambda self: self._stack.u)
    w = property(lambda self: self._stack.w)
    b = property(lambda self: self._stack.b)


def _tiny(dtype) -> float:
    return float(np.finfo(dtype_util.as_numpy_dtype(dtype)).tiny)


# t − tanh t = Σ a_k t^(2k+1) for |t| < π/2; for |t| < 0.1 seven terms are exact to
# float64, four to float32.
_T_MINUS_TANH = (
    1 / 3, -2 / 15, 17 / 315, -62 / 2835, 1382 / 155925, -21844 / 6081075, 929569 / 638512875,
)


def _t_minus_tanh(t, h):
    """`t − tanh t` without cancellation at small `|t|` (`h = tanh t`)."""
    t2 = tf.square(t)
    series = tf.zeros_like(t)
    terms = _T_MINUS_TANH[: 4 if t.dtype == tf.float32 else 7]
    for coefficient in reversed(terms):
        series = series * t2 + coefficient
    return tf.where(tf.abs(t) < 0.1, series * t2 * t, t - h)


def _sech_squared(t):
    """`1 − tanh² t = 4e / (1 + e)²` with `e = exp(−2|t|)`, accurate for every `t`."""
    e = tf.exp(-2.0 * tf.abs(t))
    return 4.0 * e / tf.square(1.0 + e)


def _log_det(t, h, p):
    """`log(1 + (1 − h²) c) = log(h² + sech²(t) · p)`."""
    return tf.math.log(tf.square(h) + _sech_squared(t) * p)


def _slope(t, h, p):
    """`g'(t) = 1 + c (1 − h²) = h² + sech²(t) · p`."""
    return tf.square(h) + _sech_squared(t) * p


def _residual(t, h, s, p):
    """`g(t) − s = t + c tanh t − s`, written `(t − tanh t) + p · tanh t − s`."""
    return _t_minus_tanh(t, h) + p * h - s


def _starting_point(s, c, p):
    """A lower bound `τ₀ ≤ τ*` of the root's magnitude `τ* = |t*|`, with the sign of `s`.

    `g` is odd, `sign(t*) = sign(s)`, `σ = |s|`. For `τ ≥ 0` and `c ≥ 0`, `g` is
    concave, so its tangent at 0 and its asymptote `τ + c` lie above it:
    `τ* ≥ σ/p` and `τ* ≥ σ − c`. For `c < 0`, `g(τ) ≤ τ` gives `τ* ≥ σ`, and
    `tanh τ ≥ τ − τ³/3` makes the root of `p τ + k τ³ = σ`, `k = |c|/3`, a lower
    bound too (still one for any larger `k`, so `k` is floored to keep Cardano's
    terms finite): `τ = Q / (A² + P/3 + B²)`, `P = p/k`, `Q = σ/k`,
    `A³ = Q/2 + √(Q²/4 + P³/27)`, `B = P/(3A)` (`A − B` without cancellation).
    """
    sigma = tf.abs(s)
    concave = tf.maximum(sigma - c, sigma / p)
    k = tf.maximum(-c, 1e-6) / 3.0
    big_p, big_q = p / k, sigma / k
    big_a = tf.pow(0.5 * big_q + tf.sqrt(0.25 * tf.square(big_q) + tf.pow(big_p, 3.0) / 27.0), 1.0 / 3.0)
    big_b = big_p / (3.0 * tf.maximum(big_a, _tiny(s.dtype)))
    cubic = big_q / (tf.square(big_a) + big_p / 3.0 + tf.square(big_b))
    tau = tf.where(c >= 0.0, concave, tf.maximum(sigma, cubic))
    return tf.where(s < 0.0, -tau, tau)


# Plain Newton steps taken before the safeguarded loop is entered. From the lower
# bound of `_starting_point`, after 4 steps every entry has converged in about 98 %
# of the layers' calls (float32, random layers on 8gaussians; 6 or 8 steps do no
# better, 2 steps 33 %); the others continue in the loop. A fixed count compiles
# into fused kernels instead of a loop's iterations.
_UNROLLED_NEWTON_STEPS = 4


def solve_projection(s, c, p, max_iterations: int) -> tf.Tensor:
    """Root `t` of `t + c · tanh t = s` (`p = 1 + c > 0`), elementwise.

    Newton from `_starting_point`: first `_UNROLLED_NEWTON_STEPS` plain steps,
    clipped to the bracket `[s − |c|, s + |c|]` that holds the root; if any entry
    has not converged then, Newton safeguarded by bisection continues from there: a
    Newton step is taken when it stays strictly inside the current bracket and is at
    most 3/4 of the previous step, else the bracket is halved. Converged means that
    no entry moves by more than 4 ulps of `1 + |t|`; the safeguarded loop stops
    there or after `max_iterations` steps (a static bound, so it compiles with XLA).
    """
    s, c, p = tf.stop_gradient(s), tf.stop_gradient(c), tf.stop_gradient(p)
    tolerance = 4.0 * dtype_util.eps(s.dtype)
    lower, upper = s - tf.abs(c), s + tf.abs(c)
    t = tf.clip_by_value(_starting_point(s, c, p), lower, upper)
    for _ in range(_UNROLLED_NEWTON_STEPS):
        h = tf.tanh(t)
        t = tf.clip_by_value(t - _residual(t, h, s, p) / _slope(t, h, p), lower, upper)
    h = tf.tanh(t)
    newton_step = _residual(t, h, s, p) / _slope(t, h, p)
    converged = tf.reduce_all(tf.abs(newton_step) <= tolerance * (1.0 + tf.abs(t)))
    return tf.cond(
        converged,
        lambda: t - newton_step,
        lambda: _safeguarded_newton(t, s, p, lower, upper, tolerance, max_iterations),
    )


def _safeguarded_newton(t, s, p, lower, upper, tolerance, max_iterations: int) -> tf.Tensor:
    """Newton safeguarded by bisection of `[lower, upper]`, from `t` inside it."""

    def step(t, lower, upper, previous_step, _):
        h = tf.tanh(t)
        residual = _residual(t, h, s, p)
        lower = tf.where(residual < 0, t, lower)
        upper = tf.where(residual > 0, t, upper)
        newton_step = residual / _slope(t, h, p)
        newton = t - newton_step
        # 3/4, not 1/2: near a triple-like root (c → −1, t → 0) Newton shrinks its
        # steps by 2/3 per iteration, and bisecting the wide bracket instead is slower.
        # A converged entry keeps its (tiny) Newton step while others still iterate.
        converged = tf.abs(newton_step) <= tolerance * (1.0 + tf.abs(t))
        use_newton = converged | (
            (newton > lower) & (newton < upper)
            & (tf.abs(newton_step) <= 0.75 * tf.abs(previous_step))
        )
        next_t = tf.where(use_newton, newton, 0.5 * (lower + upper))
        moving = tf.reduce_any(tf.abs(next_t - t) > tolerance * (1.0 + tf.abs(t)))
        return next_t, lower, upper, next_t - t, moving

    t, *_ = tf.while_loop(
        lambda *state: state[-1],
        step,
        (t, lower, upper, upper - lower, tf.constant(True)),
        maximum_iterations=max_iterations,
    )
    return t
