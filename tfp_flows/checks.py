"""Argument checks shared by the whole package: refuse bad input before any work is done.

Every check raises `TypeError` (wrong kind of value) or `ValueError` (right kind, bad
value) with a message of the form "`name` must be <expected>; given <value> (<type>)".
`bool` is never an integer or a number, strings are never parsed, NumPy scalars of the
right kind are accepted and returned as Python `int`/`float`.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Sequence

import numpy as np
import tensorflow as tf

__all__ = [
    "check_integer", "check_positive_integer", "check_positive_integers", "check_number",
    "check_positive_number", "check_fraction", "check_seed", "check_choice",
    "check_int_sequence", "check_shape", "check_dtype", "check_samples", "check_finite_tensor",
]

SEED_MAX = 2**31 - 1


def _given(value) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:60] + " ... " + text[-12:]
    return f"{text} ({type(value).__name__})"


def _message(name: str, expected: str, value) -> str:
    return f"`{name}` must be {expected}; given {_given(value)}."


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _bound(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _range_text(minimum, maximum, inclusive_minimum: bool = True, inclusive_maximum: bool = True) -> str:
    minimum = None if minimum is None else _bound(minimum)
    maximum = None if maximum is None else _bound(maximum)
    if minimum is not None and maximum is not None:
        return (f" in {'[' if inclusive_minimum else '('}{minimum}, "
                f"{maximum}{']' if inclusive_maximum else ')'}")
    if minimum is not None:
        return f" {'>=' if inclusive_minimum else '>'} {minimum}"
    if maximum is not None:
        return f" {'<=' if inclusive_maximum else '<'} {maximum}"
    return ""


def check_integer(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return `value` as an `int` if it is an integer (not a bool) in `[minimum, maximum]`.

    `TypeError` for anything else (2.5, 2.0, "3", True), `ValueError` out of range.
    """
    expected = "an integer" + _range_text(minimum, maximum)
    if not _is_integer(value):
        raise TypeError(_message(name, expected, value))
    result = int(value)
    if (minimum is not None and result < minimum) or (maximum is not None and result > maximum):
        raise ValueError(_message(name, expected, value))
    return result


def check_positive_integer(name: str, value) -> int:
    """Return `value` as an `int` if it is an integer >= 1 (`TypeError`/`ValueError` otherwise)."""
    if not _is_integer(value):
        raise TypeError(_message(name, "a positive integer", value))
    if value < 1:
        raise ValueError(_message(name, "a positive integer", value))
    return int(value)


def check_positive_integers(owner: str | None = None, **values) -> None:
    """Check that each of `values` is a positive integer; the message is prefixed by `owner`."""
    for name, value in values.items():
        try:
            check_positive_integer(name, value)
        except (TypeError, ValueError) as error:
            if owner:
                raise type(error)(f"{owner}: {error}") from None
            raise


def check_number(
    name: str,
    value,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    inclusive_minimum: bool = True,
    inclusive_maximum: bool = True,
    allow_none: bool = False,
) -> float | None:
    """Return `value` as a finite `float` within the given bounds (or None if allowed).

    `TypeError` for non-real values (strings, complex, bool), `ValueError` for NaN, ±inf
    and values out of range.
    """
    expected = ("None or " if allow_none else "") + "a finite real number" + _range_text(
        minimum, maximum, inclusive_minimum, inclusive_maximum)
    if value is None and allow_none:
        return None
    if not _is_real(value):
        raise TypeError(_message(name, expected, value))
    try:
        result = float(value)
    except OverflowError:
        raise ValueError(_message(name, expected, value)) from None
    if not math.isfinite(result):
        raise ValueError(_message(name, expected, value))
    too_low = minimum is not None and (result < minimum if inclusive_minimum else result <= minimum)
    too_high = maximum is not None and (result > maximum if inclusive_maximum else result >= maximum)
    if too_low or too_high:
        raise ValueError(_message(name, expected, value))
    return result


def check_positive_number(name: str, value) -> float:
    """Return `value` as a finite `float` > 0."""
    return check_number(name, value, 0.0, inclusive_minimum=False)


def check_fraction(name: str, value, allow_zero: bool = True) -> float:
    """Return `value` as a `float` in [0, 1) (or (0, 1) if `allow_zero` is False)."""
    return check_number(name, value, 0.0, 1.0, inclusive_minimum=allow_zero,
                        inclusive_maximum=False)


def check_seed(name: str, value) -> int | None:
    """Return None or an integer seed in [0, 2**31 - 1]; seeds are never wrapped or hashed."""
    expected = f"None or an integer in [0, {SEED_MAX}]"
    if value is None:
        return None
    if not _is_integer(value):
        raise TypeError(_message(name, expected, value))
    if not 0 <= value <= SEED_MAX:
        raise ValueError(_message(name, expected, value))
    return int(value)


def check_choice(name: str, value, choices: Iterable[str]) -> str:
    """Return `value` if it is one of the strings `choices` (`TypeError` if not a string)."""
    choices = tuple(choices)
    expected = "one of " + ", ".join(repr(choice) for choice in choices)
    if not isinstance(value, str):
        raise TypeError(_message(name, expected, value))
    if value not in choices:
        raise ValueError(_message(name, expected, value))
    return value


def _as_sequence(name: str, value, expected: str) -> list:
    if isinstance(value, tf.TensorShape):
        if value.rank is None or not value.is_fully_defined():
            raise ValueError(_message(name, expected, value))
        return value.as_list()
    if isinstance(value, np.ndarray) and value.ndim == 1:
        return list(value)
    if isinstance(value, (list, tuple)):
        return list(value)
    raise TypeError(_message(name, expected, value))


def check_int_sequence(name: str, value, minimum: int | None = 1,
                       allow_empty: bool = False) -> tuple[int, ...]:
    """Return `value` (a list, tuple or 1-D array of integers >= `minimum`) as a tuple of ints."""
    expected = (("a" if allow_empty else "a non-empty") + " sequence of integers"
                + _range_text(minimum, None))
    items = _as_sequence(name, value, expected)
    if not items and not allow_empty:
        raise ValueError(_message(name, expected, value))
    return tuple(check_integer(f"{name}[{index}]", item, minimum) for index, item in enumerate(items))


def check_shape(name: str, value, *, allow_empty: bool = False) -> tuple[int, ...]:
    """Return a shape (a sequence of positive integers, e.g. an event shape) as a tuple."""
    return check_int_sequence(name, value, minimum=1, allow_empty=allow_empty)


def check_dtype(name: str, value, allowed: Sequence = (tf.float32, tf.float64)) -> tf.DType:
    """Return `value` (a `tf.DType`, NumPy dtype or dtype name) as a `tf.DType` in `allowed`."""
    allowed = tuple(tf.as_dtype(dtype) for dtype in allowed)
    expected = "one of the dtypes " + ", ".join(dtype.name for dtype in allowed)
    # tf.as_dtype also maps integers (enum values) to dtypes; only dtype spellings pass here.
    if not isinstance(value, (tf.DType, np.dtype, str, type)):
        raise TypeError(_message(name, expected, value))
    try:
        dtype = tf.as_dtype(value)
    except TypeError:
        raise TypeError(_message(name, expected, value)) from None
    if dtype not in allowed:
        raise ValueError(_message(name, expected, value))
    return dtype


def check_samples(x, event_shape: Sequence[int] | None, name: str = "x",
                  min_rows: int = 1) -> np.ndarray:
    """Return `x` as a NumPy array of shape `[N, *event_shape]` (N >= `min_rows`), all finite.

    `event_shape=None` accepts any event shape of rank >= 1 with no zero-size dimension.
    Floating data keeps its dtype, integer data becomes float32. `TypeError` for bool,
    complex, string or object data; `ValueError` naming the expected and the given shape,
    or the number and position of the first non-finite value.
    """
    expected = ("[N, *event_shape]" if event_shape is None
                else "[N, " + ", ".join(str(int(d)) for d in event_shape) + "]")
    if x is None:
        raise TypeError(f"{name} must be an array of shape {expected}; given None.")
    try:
        array = np.asarray(x)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"{name} must be an array of shape {expected}; given a {type(x).__name__} that "
            f"NumPy cannot make an array of ({error})."
        ) from None
    if event_shape is None:
        if array.ndim < 2 or 0 in array.shape[1:]:
            raise ValueError(
                f"{name} must have shape [N, *event_shape] (a batch of events with at least "
                f"one dimension, none of size 0); given shape {list(array.shape)}."
            )
        event_shape = array.shape[1:]
    event_shape = tuple(int(d) for d in event_shape)
    kind = array.dtype.kind
    if kind in "iu":
        array = array.astype(np.float32)
    elif kind != "f":
        what = {"b": "bool", "c": "complex (its imaginary part would be lost)"}.get(kind, "")
        raise TypeError(
            f"{name} must hold real numbers; given dtype {array.dtype}"
            + (f", {what}" if what else "") + "."
        )
    if array.ndim != len(event_shape) + 1 or tuple(array.shape[1:]) != event_shape:
        raise ValueError(
            f"{name} must have shape {expected} (a batch of events of shape "
            f"{list(event_shape)}); given shape {list(array.shape)}."
        )
    if array.shape[0] < min_rows:
        raise ValueError(
            f"{name} must have at least {min_rows} row(s) (shape {expected} with N >= "
            f"{min_rows}); given {array.shape[0]}" + (" (it is empty)." if array.shape[0] == 0 else ".")
        )
    finite = np.isfinite(array)
    if not finite.all():
        bad = np.argwhere(~finite)
        first = tuple(int(i) for i in bad[0])
        raise ValueError(
            f"{name} must be finite; given {len(bad)} NaN/inf value(s), the first at "
            f"index {first} (value {array[first]})."
        )
    return array


def check_finite_tensor(name: str, tensor) -> tf.Tensor:
    """Return `tensor` if all its values are finite; `ValueError` naming the first that is not.

    Eagerly the check runs at once; inside a `tf.function` it becomes
    `tf.debugging.assert_all_finite` (an `InvalidArgumentError` at run time).
    """
    tensor = tf.convert_to_tensor(tensor)
    if not (tensor.dtype.is_floating or tensor.dtype.is_complex):
        return tensor
    if not tf.executing_eagerly():
        return tf.debugging.assert_all_finite(tensor, f"`{name}` must be finite")
    finite = tf.math.is_finite(tf.math.real(tensor)) & tf.math.is_finite(tf.math.imag(tensor))
    if not bool(tf.reduce_all(finite)):
        bad = np.argwhere(~finite.numpy())
        first = tuple(int(i) for i in bad[0])
        raise ValueError(
            f"`{name}` must be finite; given {len(bad)} NaN/inf value(s), the first at index "
            f"{first} (value {tensor.numpy()[first]})."
        )
    return tensor
