"""Static shape checks shared by the vector bijectors."""
from __future__ import annotations

import tensorflow as tf


def static_event_size(tensor, name: str) -> int | None:
    """The static size of the last axis of a vector parameter, or None if unknown."""
    shape = tf.TensorShape(getattr(tensor, "shape", None))
    if shape.rank is None:
        return None
    if shape.rank == 0:
        raise ValueError(f"Parameter `{name}` must be a vector of shape [..., D]; given a scalar.")
    return tf.compat.dimension_value(shape[-1])


def check_event_size(x, expected: int | None, name: str, owner: str) -> None:
    """Raise if `x`'s static last dimension is known and differs from `expected`."""
    if expected is None:
        return
    shape = x.shape
    if shape.rank == 0:
        raise ValueError(f"{owner}: `{name}` must have shape [..., {expected}]; given a scalar.")
    given = tf.compat.dimension_value(shape[-1]) if shape.rank is not None else None
    if given is not None and given != expected:
        raise ValueError(
            f"{owner}: `{name}` must have shape [..., {expected}]; given shape {shape.as_list()}."
        )


def static_num_layers(stacked: dict, owner: str) -> int:
    """The static, common size `L` of the layer axis of stacked parameters.

    `stacked` maps each name to `(tensor, rank of one layer's parameter)`; the layer
    axis is the one just left of those axes.
    """
    sizes = {}
    for name, (tensor, rank) in stacked.items():
        shape = tf.TensorShape(tensor.shape)
        if shape.rank is None or shape.rank < rank + 1 or shape[-(rank + 1)] is None:
            raise ValueError(
                f"{owner}: parameter `{name}` needs a static layer axis at position {-(rank + 1)}; "
                f"given shape {shape}."
            )
        sizes[name] = int(shape[-(rank + 1)])
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{owner}: the parameters must have the same number of layers; given {sizes}.")
    return next(iter(sizes.values()))
