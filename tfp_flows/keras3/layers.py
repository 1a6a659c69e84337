"""Keras 3 layers that own a flow's variables and build its TFP bijector from their values.

`FlowLayer(definition)` holds one `keras.Variable` per parameter of a
`tfp_flows.definitions.Definition`; `bijector(context)` is the definition's TFP
bijector (base to data) for their current values, so Keras 3 tracks, trains and
saves exactly what the flow uses. `Chain([...])` composes flow layers with fixed
TFP bijectors (no variables), like `tfb.Chain`: `Chain([f, g]).forward = f ∘ g`.
"""
from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_flows import definitions
from tfp_flows.definitions import Definition
from tfp_flows.flows import Flow
from tfp_flows.serialization import bijector_config, bijector_from_config

tfb = tfp.bijectors

__all__ = ["Chain", "FlowLayer", "is_tf_keras", "refuse_tf_keras"]


def is_tf_keras(obj) -> bool:
    """Whether `obj` is a tf_keras (Keras 2) object."""
    return type(obj).__module__.split(".")[0] == "tf_keras"


def refuse_tf_keras(obj, argument: str, equivalent: str) -> None:
    """`TypeError` naming the Keras 3 import when a tf_keras object meets the Keras 3 path."""
    if is_tf_keras(obj):
        raise TypeError(
            f"`{argument}` is a tf_keras (Keras 2) object ({type(obj).__module__}."
            f"{type(obj).__name__}); tfp_flows.keras3 runs on Keras 3: use {equivalent} "
            "(`import keras`), or train tf_keras objects with tfp_flows.FlowModel."
        )


def _refuse_foreign_part(part, argument: str) -> None:
    """Refuse parts whose variables Keras 3 would neither train nor save."""
    if isinstance(part, Flow):
        raise TypeError(
            f"`{argument}` is a tfp_flows.flows.Flow ({part.definition.builder}), which holds "
            "tf.Variables that Keras 3 does not track; build it with "
            f"tfp_flows.keras3.flows.{part.definition.builder}(...) instead."
        )
    refuse_tf_keras(part, argument, "tfp_flows.keras3.flows builders or keras.layers")
    if isinstance(part, tfb.Bijector):
        inner = [type(o).__qualname__ for o in part._flatten(predicate=is_tf_keras)]
        if inner:
            raise TypeError(
                f"`{argument}` ({part.name}) holds tf_keras objects ({', '.join(sorted(set(inner)))})"
                "; Keras 3 would not train them. Use tfp_flows.keras3.flows.maf/iaf for TFP's "
                "autoregressive flows, or tfp_flows.FlowModel for tf_keras networks."
            )
        if part.variables:
            raise TypeError(
                f"`{argument}` ({part.name}) holds {len(part.variables)} tf.Variable(s); Keras 3 "
                "would neither train nor save them. Fixed TFP bijectors in a Keras 3 chain take "
                "constants; trainable parameters belong in tfp_flows.keras3.flows layers."
            )
    elif not isinstance(part, (FlowLayer, Chain)):
        raise TypeError(
            f"`{argument}` must be a tfp_flows.keras3 flow layer, a Chain of them, or a fixed "
            f"tfp.bijectors.Bijector; given {type(part).__name__}."
        )


@keras.saving.register_keras_serializable(package="tfp_flows")
class FlowLayer(keras.layers.Layer):
    """A flow `Definition` with its parameters in Keras 3 variables.

    `bijector(context)` builds the TFP bijector `f` (base to data) from the
    variables' values; `call(z, context=None)` is `f(z)`. Parameters are created
    with the definition's initial values (cast to its dtype), in its order,
    non-trainable where the definition says so. `initialize(x)` runs the
    data-dependent initialisation (Glow's ActNorm) once; `get_config` records
    `{"builder", "arguments"}` (`definitions.define(builder, **arguments)`).
    """

    def __init__(self, definition: Definition, **kwargs):
        if not isinstance(definition, Definition):
            raise TypeError(
                "FlowLayer expects a tfp_flows.definitions.Definition; given "
                f"{type(definition).__name__}."
            )
        kwargs.setdefault("name", definition.builder)
        kwargs["dtype"] = definition.dtype.name
        super().__init__(**kwargs)
        self._definition = definition
        np_dtype = definition.dtype.as_numpy_dtype
        self._parameter_variables = {
            p.name: self.add_weight(
                shape=p.initial.shape, dtype=definition.dtype.name, name=p.name,
                initializer=keras.initializers.Constant(p.initial.astype(np_dtype)),
                trainable=p.trainable, autocast=False)
            for p in definition.parameters
        }
        self.built = True

    @property
    def definition(self) -> Definition:
        return self._definition

    @property
    def parameter_variables(self) -> dict:
        """Parameter name -> its `keras.Variable`, in the definition's order."""
        return dict(self._parameter_variables)

    @property
    def context_size(self) -> int | None:
        return self._definition.context_size

    @property
    def flow_dtype(self) -> tf.DType:
        return self._definition.dtype

    def _values(self) -> dict:
        return {name: v.value for name, v in self._parameter_variables.items()}

    def bijector(self, context=None) -> tfb.Bijector:
        """The TFP bijector (base to data) for the variables' current values and `context`."""
        return self._definition.bijector(self._values(), context)

    def call(self, z, context=None):
        """`x = f(z)`."""
        return self.bijector(context).forward(z)

    def compute_output_shape(self, input_shape):
        return input_shape

    @property
    def needs_initialization(self) -> bool:
        """True while a data-dependent initialisation is defined and not yet done."""
        flag = self._definition.initialized_flag
        return flag is not None and float(
            keras.ops.convert_to_numpy(self._parameter_variables[flag])) < 0.5

    def initialize(self, x, context=None) -> None:
        """Set the data-dependent parameters from the batch `x` (data side), once; eager only."""
        if not self.needs_initialization:
            return
        if not tf.executing_eagerly():
            raise RuntimeError(f"{self.name}: initialize(batch) runs eagerly, outside tf.function.")
        found = self._definition.initial_values_from_data(self._values(), x, context)
        for key, value in found.items():
            self._parameter_variables[key].assign(value)
        self._parameter_variables[self._definition.initialized_flag].assign(1.0)

    def get_config(self) -> dict:
        config = super().get_config()
        config.pop("dtype", None)  # the definition's
        config.update(builder=self._definition.builder, arguments=dict(self._definition.arguments))
        return config

    @classmethod
    def from_config(cls, config: dict) -> "FlowLayer":
        config = dict(config)
        config.pop("dtype", None)
        definition = definitions.define(config.pop("builder"), **config.pop("arguments"))
        return cls(definition, **config)


@keras.saving.register_keras_serializable(package="tfp_flows")
class Chain(keras.layers.Layer):
    """`f = f_1 ∘ … ∘ f_n` of flow layers and fixed TFP bijectors (base to data, as `tfb.Chain`).

    Log-det: the sum of the parts'. Fixed bijectors hold no variables (they are
    saved by `tfp_flows.serialization.bijector_config`); a context reaches every
    conditional part.
    """

    def __init__(self, parts: Sequence, **kwargs):
        if isinstance(parts, (str, bytes)) or not isinstance(parts, (list, tuple)) or not parts:
            raise TypeError(
                "`parts` must be a non-empty list of tfp_flows.keras3 flow layers and fixed TFP "
                f"bijectors; given {type(parts).__name__}."
            )
        for index, part in enumerate(parts):
            _refuse_foreign_part(part, f"parts[{index}]")
        layers = [p for p in parts if not isinstance(p, tfb.Bijector)]
        if not layers:
            raise ValueError("`parts` holds only fixed TFP bijectors: nothing would be trained.")
        dtypes = {p.flow_dtype for p in layers}
        sizes = {p.context_size for p in layers if p.context_size is not None}
        if len(dtypes) > 1 or len(sizes) > 1:
            raise ValueError(
                f"`parts` must share one dtype and one context size; given dtypes "
                f"{sorted(d.name for d in dtypes)}, context sizes {sorted(sizes)}."
            )
        kwargs.setdefault("name", "chain")
        kwargs["dtype"] = next(iter(dtypes)).name
        super().__init__(**kwargs)
        self.parts = list(parts)
        self._context_size = next(iter(sizes)) if sizes else None
        self.built = True

    @property
    def context_size(self) -> int | None:
        return self._context_size

    @property
    def flow_dtype(self) -> tf.DType:
        return tf.as_dtype(self.dtype)

    @property
    def flow_layers(self) -> list:
        """Every `FlowLayer` in the chain, nested chains included, in order."""
        found = []
        for part in self.parts:
            if isinstance(part, FlowLayer):
                found.append(part)
            elif isinstance(part, Chain):
                found += part.flow_layers
        return found

    @property
    def needs_initialization(self) -> bool:
        return any(layer.needs_initialization for layer in self.flow_layers)

    def initialize(self, x, context=None) -> None:
        """Initialise every part from the batch reaching it (data to latent), eagerly."""
        x = tf.convert_to_tensor(x, self.flow_dtype)
        for index, part in enumerate(self.parts):  # tfb.Chain's inverse runs parts[0] first
            last = index + 1 == len(self.parts)  # no later part takes its latent
            if isinstance(part, tfb.Bijector):
                if not last:
                    x = part.inverse(x)
                continue
            own = context if part.context_size is not None else None
            part.initialize(x, own)
            if not last:
                x = part.bijector(own).inverse(x)

    def bijector(self, context=None) -> tfb.Bijector:
        """The `tfb.Chain` of the parts' bijectors for the current values and `context`."""
        return tfb.Chain([
            part if isinstance(part, tfb.Bijector)
            else part.bijector(context if part.context_size is not None else None)
            for part in self.parts
        ], name=self.name)

    def call(self, z, context=None):
        """`x = f(z)`."""
        return self.bijector(context).forward(z)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        config = super().get_config()
        config.pop("dtype", None)
        config["parts"] = [
            {"bijector": bijector_config(p)} if isinstance(p, tfb.Bijector)
            else {"layer": keras.saving.serialize_keras_object(p)}
            for p in self.parts
        ]
        return config

    @classmethod
    def from_config(cls, config: dict) -> "Chain":
        config = dict(config)
        config.pop("dtype", None)
        parts = [
            bijector_from_config(p["bijector"]) if "bijector" in p
            else keras.saving.deserialize_keras_object(p["layer"])
            for p in config.pop("parts")
        ]
        return cls(parts, **config)
