"""Configurations of bijectors and distributions: what a saved model needs to rebuild its flow.

`bijector_config` describes a tree of `tfp_flows.flows.Flow`s, `tfb.Chain`s,
`tfb.Invert`s and TFP bijectors or distributions whose constructor arguments are
numbers, strings, arrays, constant tensors, `tf.Variable`s or further bijectors or
distributions; `bijector_from_config` rebuilds it. Only the structure is
described: variables come back with their shapes and dtypes, and their values
come from the saved weights. Anything else (a user's own bijector class, a Python
function, a Keras network inside a TFP bijector) raises `NotRebuildableError`.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_flows.flows import Flow

tfb = tfp.bijectors
tfd = tfp.distributions

__all__ = [
    "NotRebuildableError",
    "bijector_config",
    "bijector_from_config",
    "distribution_config",
    "distribution_from_config",
]

_PLAIN = (type(None), bool, int, float, str)


class NotRebuildableError(TypeError):
    """A bijector or distribution that cannot be rebuilt from a configuration."""


def _public_class(obj, namespace, kind: str) -> str:
    """The public name in `namespace` (tfb or tfd) of `obj`'s TFP class (`_Chain` -> `Chain`)."""
    name = type(obj).__name__.lstrip("_")
    if getattr(namespace, name, None) is None or not type(obj).__module__.startswith(
        "tensorflow_probability."
    ):
        raise NotRebuildableError(
            f"the {kind} {type(obj).__module__}.{type(obj).__qualname__} is not a TensorFlow "
            f"Probability {kind} nor a tfp_flows flow, so it cannot be rebuilt from a configuration"
        )
    return name


def _value_config(value, path: str):
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, tf.Variable):
        return {"__variable__": {"shape": value.shape.as_list(), "dtype": value.dtype.name,
                                 "trainable": bool(value.trainable)}}
    if isinstance(value, tfb.Bijector):
        return {"__bijector__": bijector_config(value)}
    if isinstance(value, tfd.Distribution):
        return {"__distribution__": distribution_config(value)}
    if isinstance(value, (list, tuple)):
        return [_value_config(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (np.ndarray, np.generic, tf.Tensor)) and not callable(value):
        array = np.asarray(value)
        if array.dtype.kind in "biuf":
            return {"__array__": array.tolist(), "dtype": array.dtype.name}
    raise NotRebuildableError(
        f"the argument `{path}` ({type(value).__name__}) cannot be described in a configuration"
    )


def _value_from_config(value):
    if isinstance(value, list):
        return [_value_from_config(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__variable__" in value:
        spec = value["__variable__"]
        return tf.Variable(tf.zeros(spec["shape"], spec["dtype"]), trainable=spec["trainable"])
    if "__bijector__" in value:
        return bijector_from_config(value["__bijector__"])
    if "__distribution__" in value:
        return distribution_from_config(value["__distribution__"])
    if "__array__" in value:
        return np.asarray(value["__array__"], value["dtype"])
    return value


def _object_config(obj, namespace, kind: str) -> dict:
    name = _public_class(obj, namespace, kind)
    return {
        "class": name,
        "parameters": {k: _value_config(v, f"{name}.{k}") for k, v in obj.parameters.items()},
    }


def bijector_config(bijector: tfb.Bijector) -> dict:
    """A JSON-able description of `bijector` (see the module docstring)."""
    if isinstance(bijector, Flow):
        return {"flow": bijector.config, "name": bijector.name}
    return _object_config(bijector, tfb, "bijector")


def bijector_from_config(config: dict) -> tfb.Bijector:
    """The bijector described by `bijector_config`, with fresh variables."""
    if "flow" in config:
        return Flow.from_config(config["flow"])
    parameters = {k: _value_from_config(v) for k, v in config["parameters"].items()}
    return getattr(tfb, config["class"])(**parameters)


def distribution_config(distribution: tfd.Distribution) -> dict:
    """A JSON-able description of a TFP distribution with constant or variable parameters."""
    return _object_config(distribution, tfd, "distribution")


def distribution_from_config(config: dict) -> tfd.Distribution:
    parameters = {k: _value_from_config(v) for k, v in config["parameters"].items()}
    return getattr(tfd, config["class"])(**parameters)
