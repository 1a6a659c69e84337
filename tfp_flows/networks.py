"""Backend-free conditioner networks: a parameter vector described once, applied to tensors.

Each network is a plain Python object, not a Keras layer. It knows the layout of one
flat parameter vector (`size`, `initial(rng)` in float64) and applies a vector of that
length to its inputs: `network(packed, x, context=None)`. Whoever owns the parameters
(a `tf.Variable`, a Keras 3 variable, a tf_keras weight) passes them in, so the same
network serves every front end, and each network is a single variable: under XLA
every variable brings its own optimizer kernels and graph.

Computation runs in `packed.dtype`; any number of leading batch axes (folded into
one); `context` (when the network was built with `context_size`) has the batch shape
of `x`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import tensorflow as tf
from tensorflow_probability.python.internal import prefer_static as ps

from tfp_flows.checks import check_positive_integers

__all__ = ["ACTIVATIONS", "ConvNet", "MADE", "MLP"]

ACTIVATIONS: dict[str, Callable[[tf.Tensor], tf.Tensor]] = {
    "relu": tf.nn.relu,
    "tanh": tf.math.tanh,
    "elu": tf.nn.elu,
    "softplus": tf.math.softplus,
    "gelu": tf.nn.gelu,
    "silu": tf.nn.silu,
    "sigmoid": tf.math.sigmoid,
}


def _check_activation(owner: str, activation: str) -> Callable[[tf.Tensor], tf.Tensor]:
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"{owner}: `activation` must be one of {sorted(ACTIVATIONS)}; given {activation!r}."
        )
    return ACTIVATIONS[activation]


def _check_hidden_units(owner: str, hidden_units: Sequence[int]) -> list[int]:
    if isinstance(hidden_units, (str, bytes)) or not isinstance(hidden_units, (Sequence, np.ndarray)):
        raise TypeError(
            f"{owner}: `hidden_units` must be a sequence of positive integers (one width per "
            f"hidden layer); given {hidden_units!r}."
        )
    if len(hidden_units) == 0:
        raise ValueError(f"{owner}: `hidden_units` must name at least one hidden layer; given [].")
    check_positive_integers(owner, **{f"hidden_units[{i}]": h for i, h in enumerate(hidden_units)})
    return [int(h) for h in hidden_units]


def _check_context_size(owner: str, context_size: int | None) -> int:
    if context_size is None:
        return 0
    check_positive_integers(owner, context_size=context_size)
    return int(context_size)


def _glorot(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, fan_out: int) -> np.ndarray:
    """Glorot-uniform: `U(-l, l)`, `l = sqrt(6 / (fan_in + fan_out))` (Keras' default)."""
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape)


class _Packed:
    """The layout of a flat parameter vector: named arrays of fixed shapes, in order."""

    def __init__(self, name: str, shapes: list[tuple[str, tuple[int, ...]]]):
        self.name = name
        self._names = [n for n, _ in shapes]
        self._shapes = [tuple(s) for _, s in shapes]
        self._sizes = [int(np.prod(s)) for s in self._shapes]
        self.size = int(sum(self._sizes))

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every array in the vector, in packing order."""
        return dict(zip(self._names, self._shapes))

    def pack(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """The float64 vector holding `arrays` (name -> array of the layout's shape)."""
        return np.concatenate(
            [np.asarray(arrays[n], np.float64).reshape(-1) for n in self._names]
        )

    def unpack(self, packed) -> dict[str, tf.Tensor]:
        """Name -> shaped tensor, from a vector of length `size`."""
        packed = tf.convert_to_tensor(packed)
        if not packed.dtype.is_floating:
            raise TypeError(
                f"{self.name}: `packed` must be a floating-point vector; given dtype "
                f"{packed.dtype.name}."
            )
        length = tf.compat.dimension_value(packed.shape[0]) if packed.shape.rank == 1 else None
        if packed.shape.rank != 1 or (length is not None and length != self.size):
            raise ValueError(
                f"{self.name}: `packed` must have shape [{self.size}] (the network's `size`); "
                f"given shape {packed.shape.as_list() if packed.shape.rank is not None else None}."
            )
        pieces = tf.split(packed, self._sizes)
        return {n: tf.reshape(p, s) for n, p, s in zip(self._names, pieces, self._shapes)}


def _as_input(owner: str, value, dtype: tf.DType, name: str) -> tf.Tensor:
    """`value` as a tensor of `dtype`: tensors must already have it, arrays are converted."""
    if tf.is_tensor(value) or isinstance(value, tf.Variable):
        if value.dtype != dtype:
            raise TypeError(
                f"{owner}: `{name}` must have the parameters' dtype {dtype.name}; given "
                f"{value.dtype.name}."
            )
        return tf.convert_to_tensor(value)
    return tf.convert_to_tensor(np.asarray(value), dtype=dtype)


def _check_inputs(
    owner: str, x, context, dtype: tf.DType, event_shape: list[int], context_size: int, layout: str
) -> tuple[tf.Tensor, tf.Tensor | None]:
    """Convert `x [..., *event_shape]` and `context [..., context_size]`; raise on shapes."""
    x = _as_input(owner, x, dtype, "x")
    rank = len(event_shape)
    given = x.shape.as_list() if x.shape.rank is not None else None
    if given is None or len(given) < rank or any(
        g is not None and e is not None and g != e
        for g, e in zip(given[len(given) - rank:], event_shape)
    ):
        raise ValueError(f"{owner}: expected `x` of shape {layout}; given shape {given}.")
    if context_size == 0:
        if context is not None:
            raise ValueError(
                f"{owner}: this network was built without a context (context_size=None); "
                f"given a context. Build it with `context_size=k` to condition on one."
            )
        return x, None
    if context is None:
        raise ValueError(
            f"{owner}: this network was built with context_size={context_size}; expected a "
            f"`context` of shape [..., {context_size}], given None."
        )
    context = _as_input(owner, context, dtype, "context")
    batch = given[: len(given) - rank]
    expected = batch + [context_size]
    ctx = context.shape.as_list() if context.shape.rank is not None else None
    if ctx is None or len(ctx) != len(expected) or any(
        c is not None and e is not None and c != e for c, e in zip(ctx, expected)
    ):
        raise ValueError(
            f"{owner}: expected `context` of shape {expected} (the batch shape of `x`, then "
            f"context_size); given shape {ctx}."
        )
    return x, context


def _fold(x: tf.Tensor, event_rank: int) -> tuple[tf.Tensor, tf.Tensor]:
    """`x [..., *event]` -> (`[N, *event]`, the batch shape)."""
    shape = ps.shape(x)
    batch_shape = shape[: ps.rank(x) - event_rank]
    event_shape = shape[ps.rank(x) - event_rank:]
    return tf.reshape(x, ps.concat([[-1], event_shape], axis=0)), batch_shape


def _unfold(y: tf.Tensor, batch_shape, event_rank: int) -> tf.Tensor:
    event_shape = ps.shape(y)[ps.rank(y) - event_rank:]
    return tf.reshape(y, ps.concat([batch_shape, event_shape], axis=0))


class MLP:
    """Fully connected network `x [..., num_inputs]` (+ `context [..., k]`) -> `[..., num_outputs]`.

    `h_0 = [x, context]` (joined on the last axis), `h_l = act(h_{l-1} W_l + b_l)` for each
    hidden layer, `y = h_L W_out + b_out`. Initially the hidden kernels are Glorot-uniform
    (as Keras' `Dense`), the hidden biases zero, `W_out = 0` and `b_out = output_bias`
    (default 0), so the output starts constant. Packing order: `W_1, b_1, ..., W_out, b_out`.
    """

    def __init__(
        self,
        num_inputs: int,
        num_outputs: int,
        hidden_units: Sequence[int],
        context_size: int | None = None,
        activation: str = "relu",
    ):
        owner = "MLP"
        check_positive_integers(owner, num_inputs=num_inputs, num_outputs=num_outputs)
        self.hidden_units = _check_hidden_units(owner, hidden_units)
        self.context_size = context_size if context_size is None else int(context_size)
        self._context = _check_context_size(owner, context_size)
        self.activation = activation
        self._act = _check_activation(owner, activation)
        self.num_inputs, self.num_outputs = int(num_inputs), int(num_outputs)
        widths = [self.num_inputs + self._context] + self.hidden_units + [self.num_outputs]
        shapes = []
        for k, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            label = "out" if k == len(self.hidden_units) else str(k + 1)
            shapes += [(f"kernel_{label}", (a, b)), (f"bias_{label}", (b,))]
        self._layout = _Packed(owner, shapes)
        self.size = self._layout.size

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of each array in the packed vector, in order."""
        return self._layout.shapes

    def unpack(self, packed) -> dict[str, tf.Tensor]:
        """Name -> shaped tensor (see `shapes`)."""
        return self._layout.unpack(packed)

    def initial(self, rng: np.random.Generator, output_bias: np.ndarray | None = None) -> np.ndarray:
        """float64 `[size]`: Glorot hidden kernels, zero hidden biases, `W_out = 0`, `b_out = output_bias`."""
        if output_bias is None:
            output_bias = np.zeros(self.num_outputs)
        output_bias = np.asarray(output_bias, np.float64)
        if output_bias.shape != (self.num_outputs,):
            raise ValueError(
                f"MLP: `output_bias` must have shape [{self.num_outputs}] (num_outputs); given "
                f"shape {list(output_bias.shape)}."
            )
        arrays = {}
        for name, shape in self.shapes.items():
            if name == "bias_out":
                arrays[name] = output_bias
            elif name.startswith("kernel_") and name != "kernel_out":
                arrays[name] = _glorot(rng, shape, shape[0], shape[1])
            else:
                arrays[name] = np.zeros(shape)
        return self._layout.pack(arrays)

    def __call__(self, packed, x, context=None) -> tf.Tensor:
        params = self.unpack(packed)
        dtype = params["bias_out"].dtype
        x, context = _check_inputs(
            "MLP", x, context, dtype, [self.num_inputs], self._context,
            f"[..., {self.num_inputs}]",
        )
        h, batch_shape = _fold(x, 1)
        if context is not None:
            h = tf.concat([h, _fold(context, 1)[0]], axis=-1)
        for k in range(len(self.hidden_units)):
            h = self._act(tf.matmul(h, params[f"kernel_{k + 1}"]) + params[f"bias_{k + 1}"])
        return _unfold(tf.matmul(h, params["kernel_out"]) + params["bias_out"], batch_shape, 1)


class MADE:
    """Masked autoencoder for an affine autoregressive layer (Germain et al. 2015).

    `x [..., D]` (+ `context [..., k]`) -> `(shift [..., D], log_scale [..., D])`, output `i`
    a function of `x_j`, `j < i` only (natural order) and of the whole context:

        h_1 = act(x (W_1*M_1) + c V_1 + b_1),   h_l = act(h_{l-1} (W_l*M_l) + c V_l + b_l),
        [shift, raw] = h_L (W_out*M_out) + b_out,   log_scale = b tanh(raw / b),  b = log_scale_bound.

    Degrees: input `j` has degree `j` (1..D); hidden units cycle over `1..D-1` (over `0..D-1`
    with a context: degree-0 units see the context only, so output 1 depends on it through
    the nonlinearity); `M_1[j, u] = [deg(u) >= j]`, `M_l[u, v] = [deg(v) >= deg(u)]`,
    `M_out[u, i] = [i > deg(u)]`. Every hidden layer needs at least `D - 1` units (`D` with a
    context) so that output `i` can depend on every `x_j`, `j < i`; output 1 is a learned
    constant without context. The context kernels `V_l` are unmasked and enter every hidden
    pre-activation (never the outputs directly, so the context acts nonlinearly).

    Initially `W_l`, `V_l` are Glorot-uniform over the joined fan-in (as Keras' `Dense` on
    `[h, c]`), biases zero, `W_out = 0`, `b_out = 0`: shift 0 and log_scale 0, the identity.
    Packing order: `W_1, V_1, b_1, ..., W_out, b_out`; `W_out`'s columns are `[shift | raw]`.
    The masks are NumPy constants, applied to the unpacked kernels once per call.
    """

    def __init__(
        self,
        event_size: int,
        hidden_units: Sequence[int],
        context_size: int | None = None,
        activation: str = "relu",
        log_scale_bound: float = 3.0,
    ):
        owner = "MADE"
        check_positive_integers(owner, event_size=event_size)
        self.hidden_units = _check_hidden_units(owner, hidden_units)
        self.context_size = context_size if context_size is None else int(context_size)
        self._context = _check_context_size(owner, context_size)
        self.activation = activation
        self._act = _check_activation(owner, activation)
        bound = float(log_scale_bound) if np.isscalar(log_scale_bound) else np.nan
        if not np.isfinite(bound) or bound <= 0:
            raise ValueError(
                f"MADE: `log_scale_bound` must be a finite positive number; given {log_scale_bound!r}."
            )
        self.log_scale_bound = bound
        self.event_size = d = int(event_size)
        lowest = 0 if self._context else 1
        needed = d - lowest
        if any(h < needed for h in self.hidden_units):
            raise ValueError(
                f"MADE: every hidden layer needs at least {needed} units (event_size "
                f"{'' if self._context else '- 1 '}= {needed}"
                f"{', with a context' if self._context else ''}) so that output i can depend "
                f"on every x_j, j < i; given hidden_units={self.hidden_units}."
            )
        in_degrees = np.arange(1, d + 1)
        degrees = [in_degrees]
        for h in self.hidden_units:
            span = max(d - lowest, 1)
            degrees.append(lowest + np.arange(h) % span if d > lowest else np.full(h, d))
        masks = [degrees[1][None, :] >= in_degrees[:, None]]
        for below, above in zip(degrees[1:-1], degrees[2:]):
            masks.append(above[None, :] >= below[:, None])
        out = np.arange(1, d + 1)
        out_mask = out[None, :] > degrees[-1][:, None]
        masks.append(np.concatenate([out_mask, out_mask], axis=1))
        self.degrees = degrees
        self.masks = [m.astype(np.float64) for m in masks]
        widths = [d] + self.hidden_units
        shapes = []
        for k, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            shapes.append((f"kernel_{k + 1}", (a, b)))
            if self._context:
                shapes.append((f"context_kernel_{k + 1}", (self._context, b)))
            shapes.append((f"bias_{k + 1}", (b,)))
        shapes += [("kernel_out", (widths[-1], 2 * d)), ("bias_out", (2 * d,))]
        self._layout = _Packed(owner, shapes)
        self.size = self._layout.size

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of each array in the packed vector, in order."""
        return self._layout.shapes

    def unpack(self, packed) -> dict[str, tf.Tensor]:
        """Name -> shaped tensor (see `shapes`); kernels unmasked as stored."""
        return self._layout.unpack(packed)

    def initial(self, rng: np.random.Generator) -> np.ndarray:
        """float64 `[size]`: Glorot hidden and context kernels, zero biases, zero last layer."""
        arrays = {}
        for k, h in enumerate(self.hidden_units):
            fan_in = (self.event_size if k == 0 else self.hidden_units[k - 1]) + self._context
            for name in (f"kernel_{k + 1}", f"context_kernel_{k + 1}"):
                if name in self.shapes:
                    arrays[name] = _glorot(rng, self.shapes[name], fan_in, h)
        for name, shape in self.shapes.items():
            arrays.setdefault(name, np.zeros(shape))
        return self._layout.pack(arrays)

    def __call__(self, packed, x, context=None) -> tuple[tf.Tensor, tf.Tensor]:
        params = self.unpack(packed)
        dtype = params["bias_out"].dtype
        d = self.event_size
        x, context = _check_inputs(
            "MADE", x, context, dtype, [d], self._context, f"[..., {d}]"
        )
        h, batch_shape = _fold(x, 1)
        c = None if context is None else _fold(context, 1)[0]
        for k in range(len(self.hidden_units)):
            kernel = params[f"kernel_{k + 1}"] * tf.constant(self.masks[k], dtype)
            pre = tf.matmul(h, kernel) + params[f"bias_{k + 1}"]
            if c is not None:
                pre += tf.matmul(c, params[f"context_kernel_{k + 1}"])
            h = self._act(pre)
        kernel = params["kernel_out"] * tf.constant(self.masks[-1], dtype)
        out = _unfold(tf.matmul(h, kernel) + params["bias_out"], batch_shape, 1)
        shift, raw = out[..., :d], out[..., d:]
        bound = tf.constant(self.log_scale_bound, dtype)
        return shift, bound * tf.math.tanh(raw / bound)


class ConvNet:
    """Glow's coupling network `x [..., H, W, C_in]` (+ `context [..., k]`) -> `[..., H, W, C_out]`.

    `h_0 = [x, broadcast(context)]` (the context copied to every pixel, joined on channels),
    `h_1 = relu(conv3x3(h_0, K_1) + b_1)`, `h_2 = relu(h_1 K_2 + b_2)` (a 1x1 convolution),
    `y = conv3x3(h_2, K_3) + b_3`; 'SAME' padding. Initially `K_1`, `K_2` Glorot-uniform (as
    Keras' `Conv2D`), biases zero, `K_3 = 0`, `b_3 = 0` (a coupling starts at the identity).
    Packing order: `K_1 [3, 3, C_in + k, hidden], b_1, K_2 [hidden, hidden], b_2, K_3, b_3`.
    """

    def __init__(
        self,
        input_channels: int,
        output_channels: int,
        hidden_channels: int,
        context_size: int | None = None,
    ):
        owner = "ConvNet"
        check_positive_integers(
            owner, input_channels=input_channels, output_channels=output_channels,
            hidden_channels=hidden_channels,
        )
        self.context_size = context_size if context_size is None else int(context_size)
        self._context = _check_context_size(owner, context_size)
        self.input_channels = int(input_channels)
        self.output_channels = int(output_channels)
        self.hidden_channels = hidden = int(hidden_channels)
        self._layout = _Packed(owner, [
            ("kernel_1", (3, 3, self.input_channels + self._context, hidden)),
            ("bias_1", (hidden,)),
            ("kernel_2", (hidden, hidden)),
            ("bias_2", (hidden,)),
            ("kernel_3", (3, 3, hidden, self.output_channels)),
            ("bias_3", (self.output_channels,)),
        ])
        self.size = self._layout.size

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of each array in the packed vector, in order."""
        return self._layout.shapes

    def unpack(self, packed) -> dict[str, tf.Tensor]:
        """Name -> shaped tensor (see `shapes`)."""
        return self._layout.unpack(packed)

    def initial(self, rng: np.random.Generator) -> np.ndarray:
        """float64 `[size]`: Glorot `K_1`, `K_2` (fan = receptive field x channels), zeros elsewhere."""
        shapes = self.shapes
        k1, k2 = shapes["kernel_1"], shapes["kernel_2"]
        arrays = {name: np.zeros(shape) for name, shape in shapes.items()}
        arrays["kernel_1"] = _glorot(rng, k1, 9 * k1[2], 9 * k1[3])
        arrays["kernel_2"] = _glorot(rng, k2, k2[0], k2[1])
        return self._layout.pack(arrays)

    def __call__(self, packed, x, context=None) -> tf.Tensor:
        params = self.unpack(packed)
        dtype = params["bias_3"].dtype
        x, context = _check_inputs(
            "ConvNet", x, context, dtype, [None, None, self.input_channels], self._context,
            f"[..., H, W, {self.input_channels}]",
        )
        h, batch_shape = _fold(x, 3)
        if context is not None:
            c = _fold(context, 1)[0][:, None, None, :]
            spatial = ps.shape(h)[1:3]
            c = tf.broadcast_to(c, ps.concat([ps.shape(c)[:1], spatial, [self._context]], axis=0))
            h = tf.concat([h, c], axis=-1)
        h = tf.nn.relu(tf.nn.conv2d(h, params["kernel_1"], strides=1, padding="SAME") + params["bias_1"])
        h = tf.nn.relu(tf.tensordot(h, params["kernel_2"], 1) + params["bias_2"])
        y = tf.nn.conv2d(h, params["kernel_3"], strides=1, padding="SAME") + params["bias_3"]
        return _unfold(y, batch_shape, 3)
