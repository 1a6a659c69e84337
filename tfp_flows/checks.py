"""Input checks shared by the trainers and builders: refuse bad input before any work is done."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def check_samples(x, event_shape: Sequence[int], name: str = "x") -> np.ndarray:
    """Return `x` as a NumPy array of shape `[N, *event_shape]` with only finite values.

    Raises `ValueError` naming the expected and the given shape, or the number and
    position of the first non-finite value.
    """
    event_shape = tuple(int(d) for d in event_shape)
    array = np.asarray(x)
    if not np.issubdtype(array.dtype, np.floating):
        if np.issubdtype(array.dtype, np.number):
            array = array.astype(np.float32)
        else:
            raise TypeError(f"{name} must hold real numbers; given dtype {array.dtype}.")
    expected = "[N, " + ", ".join(str(d) for d in event_shape) + "]"
    if array.ndim != len(event_shape) + 1 or tuple(array.shape[1:]) != event_shape:
        raise ValueError(
            f"{name} must have shape {expected} (a batch of events of shape "
            f"{list(event_shape)}); given shape {list(array.shape)}."
        )
    if array.shape[0] == 0:
        raise ValueError(f"{name} is empty: expected shape {expected} with N >= 1.")
    finite = np.isfinite(array)
    if not finite.all():
        bad = np.argwhere(~finite)
        first = tuple(int(i) for i in bad[0])
        raise ValueError(
            f"{name} must be finite; given {len(bad)} NaN/inf value(s), the first at "
            f"index {first} (value {array[first]})."
        )
    return array


def check_positive_integers(owner: str | None = None, **values) -> None:
    """Raise `ValueError` naming the first of `values` that is not a positive integer."""
    prefix = f"{owner}: " if owner else ""
    for name, value in values.items():
        if int(value) != value or value < 1:
            raise ValueError(f"{prefix}`{name}` must be a positive integer; given {value!r}.")
