"""Glow's parts (Kingma & Dhariwal 2018), channels-last, XLA-friendly.

- `ActNorm`: per-channel affine with data-dependent initialisation.
- `Invertible1x1Conv`: LU-parametrised channel mixing with `log|s|` on the diagonal.
- `Squeeze`: 2x2 space-to-depth.
- `factor_out`: the multi-scale split, as a bijector over the whole event.

Direction: `forward` maps latent to data (TFP's convention), so the data-to-latent
pass of the Glow paper is `inverse` here.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow_probability.python.internal import dtype_util
from tensorflow_probability.python.internal import parameter_properties
from tensorflow_probability.python.internal import prefer_static as ps
from tensorflow_probability.python.internal import tensor_util

from tfp_flows.bijectors._hash import HashedOnce
from tfp_flows.bijectors._one_pass import OnePass
from tfp_flows.bijectors.coupling import AffineCoupling

tfb = tfp.bijectors

__all__ = ["ActNorm", "GlowStep", "Invertible1x1Conv", "Squeeze", "factor_out", "rotation_lu"]


def _check_channels(name: str, x: tf.Tensor, channels: int) -> None:
    given = tf.compat.dimension_value(x.shape[-1])
    if given != channels:
        raise ValueError(
            f"{name}: expected {channels} channels on the last axis; given shape "
            f"{x.shape.as_list()}."
        )


class ActNorm(HashedOnce, tfb.Bijector):
    """Per-channel affine `x = (z + bias) * exp(log_scale)`; log-det `H W sum(log_scale)`.

    Acts on the last axis (one entry per channel; any number of leading event axes).
    `bias_log_scale` (`[2, channels]`, a tensor or `tf.Variable`) holds `bias` in row 0
    and `log_scale` in row 1; zeros give the identity. Glow's data-dependent
    initialisation is an explicit step, not a side effect of a call:
    `ActNorm.initial_values(x)` returns the `bias_log_scale` that maps a batch `x`
    (data side) to zero mean and unit variance per channel; the flows of
    `tfp_flows.flows.glow` assign it through `Flow.initialize(batch)` (which
    `FlowModel.fit` runs on the first training batch). The bijector itself is a pure
    function of its parameter, so every forward/inverse pair is consistent.
    """

    def __init__(
        self,
        bias_log_scale,
        validate_args: bool = False,
        name: str = "act_norm",
    ):
        parameters = dict(locals())
        with tf.name_scope(name) as scope:
            dtype = dtype_util.common_dtype([bias_log_scale], dtype_hint=tf.float32)
            self._bias_log_scale = tensor_util.convert_nonref_to_tensor(
                bias_log_scale, dtype=dtype, name="bias_log_scale"
            )
            shape = self._bias_log_scale.shape
            if shape.rank != 2 or shape[0] != 2 or shape[1] is None:
                raise ValueError(
                    f"{name}: `bias_log_scale` must have shape [2, channels]; given "
                    f"{shape.as_list() if shape.rank is not None else shape}."
                )
            self._channels = int(shape[1])
            super().__init__(
                forward_min_event_ndims=1,
                is_constant_jacobian=True,
                validate_args=validate_args,
                dtype=dtype,
                parameters=parameters,
                name=scope,
            )

    @staticmethod
    def initial_values(x, epsilon: float = 1e-6) -> tf.Tensor:
        """`[2, C]`: `log_scale = ½ log(var(x) + ε)`, `bias = mean(x) / exp(log_scale)` per channel.

        With these values `inverse(x)` has zero mean and unit variance per channel.
        """
        x = tf.convert_to_tensor(x)
        mean, variance = tf.nn.moments(x, axes=list(range(x.shape.rank - 1)))
        log_scale = 0.5 * tf.math.log(variance + tf.cast(epsilon, x.dtype))
        return tf.stack([mean * tf.exp(-log_scale), log_scale])

    @property
    def bias_log_scale(self):
        """The parameter, `[2, channels]`: row 0 `bias`, row 1 `log_scale`."""
        return self._bias_log_scale

    @property
    def bias(self) -> tf.Tensor:
        return tf.convert_to_tensor(self._bias_log_scale)[0]

    @property
    def log_scale(self) -> tf.Tensor:
        return tf.convert_to_tensor(self._bias_log_scale)[1]

    @classmethod
    def _parameter_properties(cls, dtype):
        return {"bias_log_scale": parameter_properties.ParameterProperties(event_ndims=2)}

    def _bias_and_log_scale(self) -> tuple[tf.Tensor, tf.Tensor]:
        bias, log_scale = tf.unstack(tf.convert_to_tensor(self._bias_log_scale))
        return bias, log_scale

    def _forward(self, z):
        _check_channels(self.name, z, self._channels)
        bias, log_scale = self._bias_and_log_scale()
        return (z + bias) * tf.exp(log_scale)

    def _inverse(self, x):
        _check_channels(self.name, x, self._channels)
        bias, log_scale = self._bias_and_log_scale()
        return x * tf.exp(-log_scale) - bias

    def _forward_log_det_jacobian(self, z):
        return tf.reduce_sum(self._bias_and_log_scale()[1])


def rotation_lu(channels: int, seed: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Glow's start for the 1x1 convolution: the LU factors of a random rotation.

    Returns `(permutation, lower_upper, sign)` (float64 NumPy arrays) for
    `Invertible1x1Conv`: a QR-orthogonal matrix `P L U` with `L` below, `U` above and
    `log|s|` on the diagonal of `lower_upper`, `sign = sign(s)`.
    """
    if int(channels) != channels or channels < 1:
        raise ValueError(f"rotation_lu: `channels` must be a positive integer; given {channels!r}.")
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.standard_normal((int(channels), int(channels))))
    permutation, lower, upper = _lu_with_partial_pivoting(rotation)
    diagonal = np.diag(upper)
    packed = np.tril(lower, -1) + np.triu(upper, 1) + np.diag(np.log(np.abs(diagonal)))
    return permutation, packed, np.sign(diagonal)


class Invertible1x1Conv(HashedOnce, tfb.Bijector):
    """Invertible 1x1 convolution `x = W z` per position, `W = P L U`.

    `permutation` is a constant `C x C` permutation matrix `P`, `L` unit
    lower-triangular and `U` upper-triangular with diagonal `sign * exp(log|s|)`.
    All trainable entries live in one `C x C` parameter `lower_upper` (a tensor or
    `tf.Variable`), as in TFP's `ScaleMatvecLU`: strictly below the diagonal `L`,
    strictly above it `U`, and on it `log|s|`, so `W` is non-singular for any value.
    `sign` (`[C]`, entries ±1) is constant. Log-det `H W sum(log|s|)` (per position
    `sum(log|s|)`, summed by TFP over the spatial axes). The forward pass is a matrix
    product; the inverse uses two triangular solves on `C x C` matrices. No
    determinant or general matrix inverse is computed. `rotation_lu(C, seed)` gives
    Glow's start, a random rotation.

    Glow applies `W` in the data-to-latent direction (TFP's inverse), so
    `tfp_flows.flows.glow` uses `tfb.Invert(Invertible1x1Conv(...))`: training
    (`log_prob`) then multiplies by `W`, and only sampling solves.
    """

    def __init__(
        self,
        lower_upper,
        permutation=None,
        sign=None,
        validate_args: bool = False,
        name: str = "invertible_1x1_conv",
    ):
        parameters = dict(locals())
        with tf.name_scope(name) as scope:
            dtype = dtype_util.common_dtype([lower_upper], dtype_hint=tf.float32)
            self._lower_upper = tensor_util.convert_nonref_to_tensor(
                lower_upper, dtype=dtype, name="lower_upper"
            )
            shape = self._lower_upper.shape
            if shape.rank != 2 or shape[0] is None or shape[0] != shape[1]:
                raise ValueError(
                    f"{name}: `lower_upper` must be a square matrix [C, C]; given shape "
                    f"{shape.as_list() if shape.rank is not None else shape}."
                )
            channels = int(shape[0])
            eye = np.eye(channels)
            permutation = eye if permutation is None else np.asarray(permutation, np.float64)
            sign = np.ones(channels) if sign is None else np.asarray(sign, np.float64)
            is_permutation = (
                permutation.shape == (channels, channels)
                and np.all((permutation == 0) | (permutation == 1))
                and np.all(permutation.sum(axis=0) == 1)
                and np.all(permutation.sum(axis=1) == 1)
            )
            if not is_permutation:
                raise ValueError(
                    f"{name}: `permutation` must be a {channels} x {channels} permutation matrix; "
                    f"given shape {list(permutation.shape)}."
                )
            if sign.shape != (channels,) or not np.all(np.abs(sign) == 1.0):
                raise ValueError(
                    f"{name}: `sign` must hold {channels} entries of +1 or -1; given {sign.tolist()}."
                )
            self._channels = channels
            self._permutation = tf.constant(permutation, dtype)
            self._eye = tf.constant(eye, dtype)
            self._signed_eye = tf.constant(eye * sign, dtype)
            self._lower_mask = tf.constant(np.tril(np.ones((channels, channels)), -1), dtype)
            self._upper_mask = tf.constant(np.triu(np.ones((channels, channels)), 1), dtype)
            super().__init__(
                forward_min_event_ndims=1,
                is_constant_jacobian=True,
                validate_args=validate_args,
                dtype=dtype,
                parameters=parameters,
                name=scope,
            )

    @classmethod
    def _parameter_properties(cls, dtype):
        return {"lower_upper": parameter_properties.ParameterProperties(event_ndims=2)}

    @property
    def lower_upper(self):
        """Packed factors: `L` below the diagonal, `U` above it, `log|s|` on it."""
        return self._lower_upper

    @property
    def log_abs_diagonal(self) -> tf.Tensor:
        """`log|s|`, the log-magnitudes of `U`'s diagonal; log-det per position is their sum."""
        return tf.linalg.diag_part(self._lower_upper)

    def _factors(self) -> tuple[tf.Tensor, tf.Tensor]:
        packed = tf.convert_to_tensor(self._lower_upper)
        lower = packed * self._lower_mask + self._eye
        # exp only of the diagonal: off it, exp(0) is masked out by the signed identity.
        upper = packed * self._upper_mask + self._signed_eye * tf.exp(packed * self._eye)
        return lower, upper

    def weight(self) -> tf.Tensor:
        """The `C x C` matrix `W` (x = W z per position)."""
        lower, upper = self._factors()
        return self._permutation @ lower @ upper

    def inverse_weight(self) -> tf.Tensor:
        """`W^-1 = U^-1 L^-1 P^T` by two triangular solves.

        Its gradient uses `d(W^-1) = -W^-1 dW W^-1` (two matmuls, then autodiff of
        `W = P L U`) instead of differentiating the solves, which XLA lowers to loops.
        """
        lower, upper = self._factors()
        permutation = self._permutation

        @tf.custom_gradient
        def invert(weight):
            solved = tf.linalg.triangular_solve(lower, tf.transpose(permutation), lower=True)
            inverse = tf.linalg.triangular_solve(upper, solved, lower=False)

            def gradient(upstream):
                inverse_t = tf.transpose(inverse)
                return -(inverse_t @ upstream @ inverse_t)

            return inverse, gradient

        return invert(permutation @ lower @ upper)

    def _forward(self, z):
        _check_channels(self.name, z, self._channels)
        return tf.tensordot(z, self.weight(), axes=[[-1], [1]])

    def _inverse(self, x):
        _check_channels(self.name, x, self._channels)
        return tf.tensordot(x, self.inverse_weight(), axes=[[-1], [1]])

    def _forward_log_det_jacobian(self, z):
        return tf.reduce_sum(self.log_abs_diagonal)


class GlowStep(HashedOnce, OnePass, tfb.Bijector):
    """One Glow step, `tfb.Chain([ActNorm, tfb.Invert(Invertible1x1Conv), AffineCoupling])`
    as one bijector.

    Data to latent (TFP's inverse, the training direction): `y = x e^{−log_scale} − bias`,
    then `y ↦ W y` per position, then the coupling's inverse on channel halves;
    log-det `H W (Σ log|s| − Σ log_scale) − Σ s_coupling`. `forward` (sampling) undoes
    them in reverse order: the coupling forward, the convolution's two triangular
    solves, ActNorm forward. Equal to the Chain of its parts (tested); one bijector
    instead of four, so a Glow's traced graph carries less of TFP's per-call
    bookkeeping; each direction computes its result and log-det in one pass.
    `bias_log_scale` (`[2, C]`) and `lower_upper` (`[C, C]`) are tensors
    or variables as in `ActNorm` and `Invertible1x1Conv`; `permutation` and `sign`
    are the convolution's constants, `shift_and_log_scale_fn` and `num_masked` the
    coupling's (on `[H, W, ·]` events, `scale_type="sigmoid"`).
    """

    def __init__(
        self,
        bias_log_scale,
        lower_upper,
        permutation,
        sign,
        shift_and_log_scale_fn,
        num_masked: int,
        validate_args: bool = False,
        name: str = "glow_step",
    ):
        parameters = dict(locals())
        with tf.name_scope(name) as scope:
            self._act_norm = ActNorm(bias_log_scale, validate_args=validate_args)
            self._conv = Invertible1x1Conv(lower_upper, permutation, sign,
                                           validate_args=validate_args)
            self._coupling = AffineCoupling(shift_and_log_scale_fn, num_masked, event_ndims=3,
                                            validate_args=validate_args)
            if self._act_norm.dtype != self._conv.dtype:
                raise TypeError(
                    f"{name}: `bias_log_scale` and `lower_upper` must share a dtype; given "
                    f"{self._act_norm.dtype.name} and {self._conv.dtype.name}."
                )
            if self._act_norm._channels != self._conv._channels:
                raise ValueError(
                    f"{name}: `bias_log_scale` and `lower_upper` must have the same channel "
                    f"count; given {self._act_norm._channels} and {self._conv._channels}."
                )
            super().__init__(
                forward_min_event_ndims=3,
                validate_args=validate_args,
                dtype=self._act_norm.dtype,
                parameters=parameters,
                name=scope,
            )

    @classmethod
    def _parameter_properties(cls, dtype):
        return {
            "bias_log_scale": parameter_properties.ParameterProperties(event_ndims=2),
            "lower_upper": parameter_properties.ParameterProperties(event_ndims=2),
        }

    def _per_image_constant(self, y) -> tf.Tensor:
        """`H W (Σ log|s| − Σ log_scale)`: the ActNorm and 1x1-conv part of the data-to-latent log-det."""
        positions = ps.reduce_prod(ps.shape(y)[-3:-1])
        # Both parts' log-dets per position are constants: Σ log|s| and Σ log_scale.
        per_position = (self._conv._forward_log_det_jacobian(y)
                        - self._act_norm._forward_log_det_jacobian(y))
        return tf.cast(positions, y.dtype) * per_position

    def _augmented_inverse(self, x):
        y = self._conv._forward(self._act_norm._inverse(x))
        z, coupling = self._coupling._augmented_inverse(y)
        return z, {"ildj": self._per_image_constant(x) + coupling["ildj"]}

    def _augmented_forward(self, z):
        y, coupling = self._coupling._augmented_forward(z)
        x = self._act_norm._forward(self._conv._inverse(y))
        return x, {"ildj": self._per_image_constant(z) + coupling["ildj"]}


def _lu_with_partial_pivoting(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return `P, L, U` with `matrix = P @ L @ U` (Doolittle, row pivoting)."""
    size = matrix.shape[0]
    upper = matrix.astype(np.float64).copy()
    lower = np.eye(size)
    rows = np.arange(size)
    for k in range(size - 1):
        pivot = k + int(np.argmax(np.abs(upper[k:, k])))
        upper[[k, pivot], :] = upper[[pivot, k], :]
        lower[[k, pivot], :k] = lower[[pivot, k], :k]
        rows[[k, pivot]] = rows[[pivot, k]]
        factors = upper[k + 1 :, k] / upper[k, k]
        lower[k + 1 :, k] = factors
        upper[k + 1 :, :] -= np.outer(factors, upper[k, :])
    permutation = np.zeros((size, size))
    permutation[rows, np.arange(size)] = 1.0
    return permutation, lower, np.triu(upper)


class Squeeze(HashedOnce, tfb.Bijector):
    """2x2 space-to-depth: `[..., H, W, C] -> [..., H/2, W/2, 4C]`; log-det 0.

    Output channel `(2 dy + dx) C + c` holds input pixel `(2i + dy, 2j + dx)`, channel
    `c`. The inverse is depth-to-space. Height and width must be even (and the inverse
    needs a channel count divisible by 4).
    """

    def __init__(self, validate_args: bool = False, name: str = "squeeze"):
        parameters = dict(locals())
        with tf.name_scope(name) as scope:
            super().__init__(
                forward_min_event_ndims=3,
                is_constant_jacobian=True,
                validate_args=validate_args,
                parameters=parameters,
                name=scope,
            )

    @classmethod
    def _parameter_properties(cls, dtype):
        return {}

    def _squeezed_shape(self, shape: list) -> list:
        height, width, channels = shape
        if height is not None and width is not None and (height % 2 or width % 2):
            raise ValueError(
                f"{self.name}: height and width must be even; given event shape "
                f"[{height}, {width}, {channels}]."
            )
        return [
            None if height is None else height // 2,
            None if width is None else width // 2,
            None if channels is None else channels * 4,
        ]

    def _unsqueezed_shape(self, shape: list) -> list:
        height, width, channels = shape
        if channels is not None and channels % 4:
            raise ValueError(
                f"{self.name}: the inverse needs a channel count divisible by 4; given "
                f"event shape [{height}, {width}, {channels}]."
            )
        return [
            None if height is None else height * 2,
            None if width is None else width * 2,
            None if channels is None else channels // 4,
        ]

    def _forward_event_shape(self, input_shape):
        return tf.TensorShape(self._squeezed_shape(input_shape[-3:].as_list()))

    def _inverse_event_shape(self, output_shape):
        return tf.TensorShape(self._unsqueezed_shape(output_shape[-3:].as_list()))

    def _forward_event_shape_tensor(self, input_shape):
        return ps.concat([input_shape[:-3] // 2, input_shape[-1:] * 4], axis=0)

    def _inverse_event_shape_tensor(self, output_shape):
        return ps.concat([output_shape[:-3] * 2, output_shape[-1:] // 4], axis=0)

    def _forward(self, z):
        event = z.shape[-3:].as_list()
        self._squeezed_shape(event)
        return _fold_batch(z, lambda images: tf.nn.space_to_depth(images, 2))

    def _inverse(self, x):
        event = x.shape[-3:].as_list()
        self._unsqueezed_shape(event)
        return _fold_batch(x, lambda images: tf.nn.depth_to_space(images, 2))

    def _forward_log_det_jacobian(self, z):
        return tf.zeros([], dtype=z.dtype)


def _fold_batch(x: tf.Tensor, image_fn) -> tf.Tensor:
    """Apply a `[N, H, W, C]` op to `x` of shape `[..., H, W, C]`."""
    shape = ps.shape(x)
    batch_shape = shape[:-3]
    images = tf.reshape(x, ps.concat([[-1], shape[-3:]], axis=0))
    result = image_fn(images)
    return tf.reshape(result, ps.concat([batch_shape, ps.shape(result)[1:]], axis=0))


def factor_out(inner: tfb.Bijector, num_kept: int, channels: int) -> tfb.Chain:
    """Multi-scale split over a whole `[H, W, channels]` event.

    Forward: `x = concat(inner(z[..., :k]), z[..., k:])` along channels, `k = num_kept`.
    The last `channels - k` channels are factored out: they pass unchanged to the base
    distribution, while `inner` (the remaining Glow levels, shape-preserving on
    `[H, W, k]`) transforms the first `k`. Log-det: `inner`'s log-det on the kept part.
    Built from TFP's `Split` and `JointMap`, so the kept slice is the same tensor in the
    inverse and the log-det passes and TFP's bijector cache runs `inner` only once.
    Expressing the split over the whole event lets a standard-normal base of the
    image's shape serve every level.
    """
    if int(num_kept) != num_kept or not 0 < num_kept < channels:
        raise ValueError(
            f"factor_out: `num_kept` must be an integer in [1, channels - 1] = "
            f"[1, {channels - 1}]; given {num_kept!r}."
        )
    split = tfb.Split([int(num_kept), int(channels - num_kept)], axis=-1)
    return tfb.Chain(
        [tfb.Invert(split), tfb.JointMap([inner, tfb.Identity()]), split],
        name="factor_out",
    )
