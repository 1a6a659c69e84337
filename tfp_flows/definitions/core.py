"""What a flow is, independent of who holds its variables.

A `Definition` lists a flow's parameters (names, float64 initial values, whether
they train) and builds its TFP bijector from parameter values (tensors,
`tf.Variable`s or Keras 3 variables' values) and an optional context. The front
ends (`tfp_flows.flows.Flow` with `tf.Variable`s, `tfp_flows.keras3` layers with
Keras 3 variables) own the variables and call `bijector(values, context)` when
they need the transform, so every flow is written once.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_flows.checks import check_dtype, check_positive_integer, check_seed

tfb = tfp.bijectors

__all__ = ["Definition", "Parameter", "BUILDERS", "BUILDER_NAMES", "define", "definition",
           "front_end"]

# Builder name -> function returning a `Definition`, filled by `@definition`.
BUILDERS: dict[str, Callable[..., "Definition"]] = {}


@dataclasses.dataclass(frozen=True, eq=False)
class Parameter:
    """One array of a flow: its name, float64 initial value, and whether it trains."""

    name: str
    initial: np.ndarray
    trainable: bool = True


# `build(values, context, found)`: the bijector from parameter values. `found` is None,
# or a dict that data-dependent layers fill with their values from the batch they see
# in the inverse (data to latent) direction.
BuildFn = Callable[[Mapping[str, tf.Tensor], "tf.Tensor | None", "dict | None"], tfb.Bijector]


@dataclasses.dataclass(frozen=True, eq=False)
class Definition:
    """A flow's parameters and how its bijector is built from them.

    `builder` and `arguments` rebuild it (`define(builder, **arguments)`), which is
    what saving a model's configuration records. `data_dependent` names the
    parameters that `initial_values_from_data` sets from a batch (Glow's ActNorm);
    `initialized_flag` is then the name of a non-trainable scalar parameter that
    front ends set to 1 once that happened.
    """

    builder: str
    arguments: dict
    parameters: tuple[Parameter, ...]
    build: BuildFn = dataclasses.field(repr=False)
    dtype: tf.DType
    event_shape: tuple[int, ...]
    context_size: int | None = None
    data_dependent: tuple[str, ...] = ()
    initialized_flag: str | None = None

    @property
    def event_ndims(self) -> int:
        return len(self.event_shape)

    def check_context(self, context, owner: str, batch_shape=None) -> "tf.Tensor | None":
        """The context `[*batch_shape, k]` as a tensor of this flow's dtype, or a clear error.

        Tensors must have the flow's dtype; arrays of real numbers are converted. Eagerly
        the values must be finite; `batch_shape` (the rows of `x`), where known, must match.
        """
        if self.context_size is None:
            if context is not None:
                raise ValueError(
                    f"{owner}: this flow is unconditional (built without `context_size`); "
                    "given a context."
                )
            return None
        if context is None:
            raise ValueError(
                f"{owner}: this flow is conditional on a context of size {self.context_size}; "
                "pass `context` of shape [N, %d]." % self.context_size
            )
        if isinstance(context, (tf.Tensor, tf.Variable)):
            if context.dtype != self.dtype:
                raise TypeError(
                    f"{owner}: `context` must be a {self.dtype.name} tensor (the flow's dtype); "
                    f"given {context.dtype.name}."
                )
        else:
            array = np.asarray(context)
            if array.dtype.kind not in "iuf":
                raise TypeError(
                    f"{owner}: `context` must hold real numbers; given dtype {array.dtype}."
                )
            context = array.astype(self.dtype.as_numpy_dtype)
        context = tf.convert_to_tensor(context, self.dtype)
        size = tf.compat.dimension_value(context.shape[-1]) if context.shape.rank else None
        if context.shape.rank is not None and (context.shape.rank < 1 or size != self.context_size):
            raise ValueError(
                f"{owner}: `context` must have shape [..., {self.context_size}]; given shape "
                f"{context.shape.as_list()}."
            )
        if batch_shape is not None:
            expected = tf.TensorShape(batch_shape).concatenate([self.context_size])
            if not context.shape.is_compatible_with(expected):
                raise ValueError(
                    f"{owner}: `context` must have one row per row of the input: expected shape "
                    f"{expected.as_list()}; given {context.shape.as_list()}."
                )
        if tf.executing_eagerly() and not bool(tf.reduce_all(tf.math.is_finite(context))):
            raise ValueError(f"{owner}: `context` must be finite; given NaN or inf values.")
        return context

    def bijector(self, values: Mapping[str, tf.Tensor], context=None,
                 batch_shape=None) -> tfb.Bijector:
        """The flow's bijector (base to data) for these parameter values and context
        (`[*batch_shape, k]` when `batch_shape` is given)."""
        return self.build(values, self.check_context(context, self.builder, batch_shape), None)

    def initial_values_from_data(self, values: Mapping[str, tf.Tensor], x, context=None) -> dict:
        """Values of the `data_dependent` parameters computed from a data batch `x`.

        Runs the data-to-latent pass once; each data-dependent layer takes its values
        from the batch that reaches it, with the layers before it already set.
        """
        found: dict = {}
        x = tf.convert_to_tensor(x, self.dtype)
        context = self.check_context(context, self.builder, x.shape[:x.shape.rank - self.event_ndims])
        self.build(values, context, found).inverse(x)
        return found


def definition(function: Callable[..., Definition]) -> Callable[..., Definition]:
    """Register a function returning a `Definition` under its name (see `define`)."""
    BUILDERS[function.__name__] = function
    return function


def define(builder: str, **arguments) -> Definition:
    """The `Definition` made by the registered builder `builder` with `arguments`."""
    if builder not in BUILDERS:
        raise ValueError(
            f"`builder` must be one of {', '.join(sorted(BUILDERS))}; given {builder!r}."
        )
    return BUILDERS[builder](**arguments)


# The builders every front end offers, in the order `front_end` returns them.
BUILDER_NAMES = ("planar_flow", "radial_flow", "maf", "iaf", "nice", "realnvp", "glow")


def front_end(make: Callable[[Definition], object]) -> tuple:
    """The builders of a front end: each registered builder, its result passed to `make`.

    Same names, arguments and docstrings as the definitions' functions, in the order
    of `BUILDER_NAMES`; `make` (e.g. `Flow`, `FlowLayer`) owns the variables.
    """
    def wrap(define):
        @functools.wraps(define)
        def build(*args, **kwargs):
            return make(define(*args, **kwargs))

        build.__annotations__ = dict(build.__annotations__, **{"return": make})
        return build

    return tuple(wrap(BUILDERS[name]) for name in BUILDER_NAMES)


def common_arguments(event_size, seed, dtype, context_size) -> tuple:
    """Check the arguments every vector builder shares; return them normalised."""
    event_size = check_positive_integer("event_size", event_size)
    seed = check_seed("seed", seed)
    dtype = check_dtype("dtype", dtype)
    if context_size is not None:
        context_size = check_positive_integer("context_size", context_size)
    return event_size, seed, dtype, context_size


def json_arguments(**arguments) -> dict:
    """Builder arguments as JSON values (dtypes by name, tuples as lists)."""
    def plain(value):
        if isinstance(value, tf.DType):
            return value.name
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    return {name: plain(value) for name, value in arguments.items()}


def seeded_rng(seed: int | None) -> np.random.Generator:
    """The NumPy generator of a builder: equal seeds give bitwise-equal initial values."""
    return np.random.default_rng(seed)


@functools.lru_cache(maxsize=None)
def softplus_inverse_one() -> float:
    """`s` with `softplus(s) = 1`."""
    return float(np.log(np.expm1(1.0)))
