"""Builders: a flow of `tfp_flows.definitions` with its parameters in `tf.Variable`s.

Every builder returns a `Flow`, a `tfb.Bijector` mapping base samples `z` to data
`x` (`forward(z) = x`) that owns its variables and builds the flow's TFP bijector
(a `tfb.Chain`) from their current values on every call, with an optional
`context=` keyword for conditional flows (`context_size=k`). Parameters are
reparametrised so that every value a variable can take gives a valid map. The
builders' names, arguments and docstrings are those of `tfp_flows.definitions`.
"""
from __future__ import annotations


import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from tensorflow_probability.python.internal import cache_util

from tfp_flows import definitions
from tfp_flows.bijectors._hash import HashedOnce
from tfp_flows.definitions import Definition

tfb = tfp.bijectors

__all__ = ["Flow", "planar_flow", "radial_flow", "maf", "iaf", "nice", "realnvp", "glow"]


class Flow(HashedOnce, tfb.Bijector):
    """A `Definition` and its `tf.Variable`s; the transform is built per call.

    `forward(z, context=None)`, `inverse(x, context=None)` and their log-dets are
    those of `bijector(context)`, the flow's TFP bijector for the variables' current
    values; each direction computes its transform and log-det in one pass (TFP's
    greedy-attribute cache keeps the log-det with the result). `config` rebuilds the
    flow (`Flow.from_config`); `initialize(x)` runs a data-dependent initialisation
    (Glow's ActNorm) on a batch `x` and is a no-op for flows without one.
    """

    def __init__(self, definition: Definition, validate_args: bool = False, name: str | None = None):
        if not isinstance(definition, Definition):
            raise TypeError(
                f"Flow expects a tfp_flows.definitions.Definition; given {type(definition).__name__}."
            )
        parameters = dict(locals())
        name = name or definition.builder
        np_dtype = definition.dtype.as_numpy_dtype
        with tf.name_scope(name) as scope:
            self._definition = definition
            self._variables = {
                p.name: tf.Variable(p.initial.astype(np_dtype), trainable=p.trainable, name=p.name)
                for p in definition.parameters
            }
            super().__init__(
                forward_min_event_ndims=definition.event_ndims,
                validate_args=validate_args,
                dtype=definition.dtype,
                parameters=parameters,
                name=scope.rstrip("/"),
            )

    @classmethod
    def _parameter_properties(cls, dtype):
        return {}

    @property
    def definition(self) -> Definition:
        return self._definition

    @property
    def parameter_variables(self) -> dict[str, tf.Variable]:
        """Parameter name -> its `tf.Variable`, in the definition's order."""
        return dict(self._variables)

    @property
    def config(self) -> dict:
        """`{"builder": ..., "arguments": ...}`: enough to rebuild the flow (not its values)."""
        return {"builder": self._definition.builder, "arguments": dict(self._definition.arguments)}

    @classmethod
    def from_config(cls, config: dict) -> "Flow":
        return cls(definitions.define(config["builder"], **config["arguments"]))

    @property
    def context_size(self) -> int | None:
        return self._definition.context_size

    @property
    def needs_initialization(self) -> bool:
        """True while a data-dependent initialisation is defined and not yet done."""
        flag = self._definition.initialized_flag
        return flag is not None and float(self._variables[flag].numpy()) < 0.5

    def initialize(self, x, context=None) -> None:
        """Set the data-dependent parameters from the batch `x` (data side), once; eager only."""
        if not self.needs_initialization:
            return
        if not tf.executing_eagerly():
            raise RuntimeError(f"{self.name}: initialize(batch) runs eagerly, outside tf.function.")
        found = self._definition.initial_values_from_data(self._variables, x, context)
        for key, value in found.items():
            self._variables[key].assign(value)
        self._variables[self._definition.initialized_flag].assign(1.0)
        # TFP caches results by input tensor, shared by equal bijectors: drop what was
        # computed with the old values (here and in the inner bijectors).
        self._cache.clear()
        inner = self.bijector(context)
        for part in [inner, *inner._flatten(predicate=lambda o: isinstance(o, tfb.Bijector))]:
            part._cache.clear()

    def bijector(self, context=None, batch_shape=None) -> tfb.Bijector:
        """The TFP bijector (base to data) for the variables' current values and `context`
        (checked to have shape `[*batch_shape, k]` when `batch_shape` is given)."""
        return self._definition.bijector(self._variables, context, batch_shape)

    def _batch_shape_of(self, x) -> tf.TensorShape:
        shape = tf.TensorShape(getattr(x, "shape", np.shape(x)))
        return shape[:shape.rank - self._definition.event_ndims] if shape.rank is not None else None

    _cache = cache_util.BijectorCacheWithGreedyAttrs(
        forward_name="_augmented_forward", inverse_name="_augmented_inverse"
    )

    def _augmented_forward(self, z, context=None):
        inner = self.bijector(context, self._batch_shape_of(z))
        x = inner.forward(z)
        fldj = inner.forward_log_det_jacobian(z, event_ndims=self._definition.event_ndims)
        return x, {"ildj": -fldj}

    def _augmented_inverse(self, x, context=None):
        inner = self.bijector(context, self._batch_shape_of(x))
        z = inner.inverse(x)
        return z, {"ildj": inner.inverse_log_det_jacobian(x, event_ndims=self._definition.event_ndims)}

    def _forward(self, z, context=None):
        return self._augmented_forward(z, context)[0]

    def _inverse(self, x, context=None):
        return self._augmented_inverse(x, context)[0]

    def _forward_log_det_jacobian(self, z, context=None):
        attributes = self._cache.forward_attributes(z, context=context)
        if "ildj" not in attributes:
            attributes.update(self._augmented_forward(z, context)[1])
        return -attributes["ildj"]

    def _inverse_log_det_jacobian(self, x, context=None):
        attributes = self._cache.inverse_attributes(x, context=context)
        if "ildj" not in attributes:
            attributes.update(self._augmented_inverse(x, context)[1])
        return attributes["ildj"]


planar_flow, radial_flow, maf, iaf, nice, realnvp, glow = definitions.front_end(Flow)
