"""Export a flow as a SavedModel that needs only TensorFlow to load."""
from __future__ import annotations

from typing import Callable, Sequence

import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions

__all__ = ["export_distribution", "export_functions"]


def _checked(x: tf.Tensor, inner_shape: Sequence[int], name: str) -> tf.Tensor:
    """`x` after a run-time check that its shape is `[N, *inner_shape]` (exports and signatures)."""
    expected = "[N, " + ", ".join(str(d) for d in inner_shape) + "]"
    tf.debugging.assert_equal(
        tf.rank(x), len(inner_shape) + 1, message=f"`{name}` must have shape {expected}")
    if inner_shape:
        with tf.control_dependencies([tf.debugging.assert_equal(
                tf.shape(x)[1:], tf.constant(list(inner_shape), tf.int32),
                message=f"`{name}` must have shape {expected}")]):
            return tf.identity(x)
    return x


def export_functions(
    path: str,
    variables: Sequence[tf.Variable],
    event_shape: Sequence[int],
    dtype: tf.DType,
    log_prob: Callable,
    sample: Callable,
    forward: Callable,
    inverse: Callable,
    context_shape: Sequence[int] | None = None,
) -> str:
    """Write the four functions of a flow to `path` as a SavedModel; return `path`.

    Unconditional: `log_prob(x)` for `x` `[N, *event_shape]`, `sample(n)` for a scalar
    int32 `n`, `forward(z)` (base to data), `inverse(x)` (data to base). Conditional
    (`context_shape=[k]`): each also takes `context` `[N, k]`, and `sample(n, context)`
    with `context` `[M, k]` returns `[n, M, *event_shape]`. Every function and serving
    signature (single output `output_0`) checks the shapes it is given and refuses
    others with a message naming the argument and the expected shape.
    """
    event_shape = [int(d) for d in event_shape]
    shapes = {"x": event_shape, "z": event_shape}
    names = {"log_prob": ["x"], "sample": ["n"], "forward": ["z"], "inverse": ["x"]}
    if context_shape is not None:
        shapes["context"] = [int(d) for d in context_shape]
        names = {key: args + ["context"] for key, args in names.items()}
    specs = {key: [tf.TensorSpec([], tf.int32, name=n) if n == "n"
                   else tf.TensorSpec([None, *shapes[n]], dtype, name=n) for n in args]
             for key, args in names.items()}
    module = tf.Module()
    module.flow_variables = list(variables)  # tracked, so the functions may capture them

    def wrap(fn, names):
        def checked(*args):
            args = [a if n == "n" else _checked(a, shapes[n], n) for a, n in zip(args, names)]
            if "context" in names and names[0] != "n":
                with tf.control_dependencies([tf.debugging.assert_equal(
                        tf.shape(args[0])[0], tf.shape(args[1])[0],
                        message=f"`{names[0]}` and `context` must have the same number of rows")]):
                    args = [tf.identity(a) for a in args]
            return fn(*args)
        return checked

    functions = {}
    for key, fn in (("log_prob", log_prob), ("sample", sample), ("forward", forward),
                    ("inverse", inverse)):
        body = wrap(fn, names[key])
        body.__name__ = key
        functions[key] = tf.function(body, input_signature=specs[key])
        setattr(module, key, functions[key])
    tf.saved_model.save(module, path, signatures=functions)
    return path


def export_distribution(distribution: tfd.TransformedDistribution, path: str) -> str:
    """Write an unconditional `TransformedDistribution` to `path` (see `export_functions`).

    Load it with `tf.saved_model.load(path)`; neither tfp_flows nor TFP is needed.
    """
    if not isinstance(getattr(distribution, "bijector", None), tfp.bijectors.Bijector):
        raise TypeError(
            "`distribution` must be a tfd.TransformedDistribution; "
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
    return export_functions(
        path, distribution.variables, event_shape.as_list(), distribution.dtype,
        distribution.log_prob, distribution.sample, bijector.forward, bijector.inverse,
    )
