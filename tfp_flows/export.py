"""Export any `tfd.TransformedDistribution` as a SavedModel that needs only TensorFlow."""
from __future__ import annotations

import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions

__all__ = ["export_distribution"]


def export_distribution(distribution: tfd.TransformedDistribution, path: str) -> str:
    """Write `distribution` to `path` as a SavedModel and return `path`.

    The SavedModel has four functions returning tensors (also serving signatures,
    whose single output is named `output_0`):
    `log_prob(x)` for `x` of shape `[N, *event_shape]`, `sample(n)` for a scalar
    int32 `n`, `forward(z)` (base → data) and `inverse(x)` (data → base).
    Load it with `tf.saved_model.load(path)`; neither tfp_flows nor TFP is needed.
    """
    if not isinstance(getattr(distribution, "bijector", None), tfp.bijectors.Bijector):
        raise TypeError(
            "export_distribution expects a tfd.TransformedDistribution; "
            f"given {type(distribution).__name__}."
        )
    event_shape = distribution.event_shape
    if not event_shape.is_fully_defined():
        raise ValueError(f"The event shape must be fully defined to export; given {event_shape}.")
    if not distribution.batch_shape.is_compatible_with([]):
        raise ValueError(
            f"Only distributions with an empty batch shape can be exported; given batch shape "
            f"{distribution.batch_shape}."
        )
    bijector = distribution.bijector
    batch_of_events = tf.TensorSpec([None, *event_shape.as_list()], distribution.dtype)

    module = tf.Module()
    # Tracked by the module so that the functions below may capture them.
    module.flow_variables = list(distribution.variables)

    @tf.function(input_signature=[batch_of_events])
    def log_prob(x):
        return distribution.log_prob(x)

    @tf.function(input_signature=[tf.TensorSpec([], tf.int32)])
    def sample(n):
        return distribution.sample(n)

    @tf.function(input_signature=[batch_of_events])
    def forward(z):
        return bijector.forward(z)

    @tf.function(input_signature=[batch_of_events])
    def inverse(x):
        return bijector.inverse(x)

    module.log_prob, module.sample, module.forward, module.inverse = (
        log_prob,
        sample,
        forward,
        inverse,
    )
    tf.saved_model.save(
        module,
        path,
        signatures={"log_prob": log_prob, "sample": sample, "forward": forward, "inverse": inverse},
    )
    return path
