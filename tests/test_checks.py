import numpy as np
import pytest
import tensorflow as tf

from tfp_flows import checks


@pytest.mark.parametrize("value", [3, np.int64(3), np.uint8(3)])
def test_check_integer_accepts_integers_as_int(value):
    result = checks.check_integer("n", value, minimum=0, maximum=5)
    assert result == 3 and type(result) is int


@pytest.mark.parametrize("value", [2.5, 3.0, "3", True, np.bool_(True), None, [3], 3 + 0j,
                                   np.float32(3)])
def test_check_integer_refuses_non_integers(value):
    with pytest.raises(TypeError, match=r"^`n` must be an integer; given .* \(\w+\)\.$"):
        checks.check_integer("n", value)


def test_check_integer_range():
    with pytest.raises(ValueError, match=r"`n` must be an integer in \[1, 4\]; given 5 \(int\)"):
        checks.check_integer("n", 5, 1, 4)
    with pytest.raises(ValueError, match=r"`n` must be an integer >= 1; given 0 \(int\)"):
        checks.check_integer("n", 0, minimum=1)
    with pytest.raises(ValueError, match=r"<= -1"):
        checks.check_integer("n", 0, maximum=-1)


def test_check_positive_integer_and_integers():
    assert checks.check_positive_integer("k", np.int32(7)) == 7
    with pytest.raises(ValueError, match=r"`k` must be a positive integer; given 0 \(int\)"):
        checks.check_positive_integer("k", 0)
    with pytest.raises(TypeError, match=r"`k` must be a positive integer; given 2\.5 \(float\)"):
        checks.check_positive_integer("k", 2.5)
    checks.check_positive_integers(a=1, b=np.int64(2))
    with pytest.raises(ValueError, match=r"^maf: `b` must be a positive integer; given -1"):
        checks.check_positive_integers("maf", a=1, b=-1)
    with pytest.raises(TypeError, match=r"^`a` must be a positive integer; given True \(bool\)"):
        checks.check_positive_integers(a=True)


@pytest.mark.parametrize("value", [1, 1.5, np.float32(1.5), np.int8(1)])
def test_check_number_accepts_reals_as_float(value):
    result = checks.check_number("x", value)
    assert type(result) is float and result == float(value)


@pytest.mark.parametrize("value, error", [
    ("1.0", TypeError), (1 + 0j, TypeError), (True, TypeError), (None, TypeError),
    ([1.0], TypeError), (float("nan"), ValueError), (float("inf"), ValueError),
    (-np.inf, ValueError), (10**400, ValueError),
])
def test_check_number_refuses(value, error):
    with pytest.raises(error, match=r"^`x` must be a finite real number; given "):
        checks.check_number("x", value)


def test_check_number_bounds_and_none():
    assert checks.check_number("x", None, allow_none=True) is None
    assert checks.check_number("x", 0.0, 0.0) == 0.0
    with pytest.raises(ValueError, match=r"must be None or a finite real number > 0; given 0"):
        checks.check_number("x", 0, 0.0, inclusive_minimum=False, allow_none=True)
    with pytest.raises(ValueError, match=r"in \[0, 1\); given 1\.0"):
        checks.check_number("x", 1.0, 0.0, 1.0, inclusive_maximum=False)
    with pytest.raises(ValueError, match=r"> 0; given -2"):
        checks.check_positive_number("lr", -2)
    assert checks.check_positive_number("lr", 1e-300) == 1e-300


def test_check_fraction():
    assert checks.check_fraction("f", 0) == 0.0
    with pytest.raises(ValueError, match=r"`f` must be a finite real number in \(0, 1\)"):
        checks.check_fraction("f", 0.0, allow_zero=False)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="`f`"):
            checks.check_fraction("f", bad)
    with pytest.raises(TypeError, match="`f`"):
        checks.check_fraction("f", "0.1")


def test_check_seed_never_wraps():
    assert checks.check_seed("seed", None) is None
    assert checks.check_seed("seed", np.int64(2**31 - 1)) == 2**31 - 1
    for bad in (-1, 2**31, 5 + 2**32):
        with pytest.raises(ValueError, match=r"`seed` must be None or an integer in \[0, 2147483647\]"):
            checks.check_seed("seed", bad)
    for bad in (1.0, "1", True):
        with pytest.raises(TypeError, match="`seed`"):
            checks.check_seed("seed", bad)


def test_check_choice():
    assert checks.check_choice("name", "b", ("a", "b")) == "b"
    with pytest.raises(ValueError, match=r"`name` must be one of 'a', 'b'; given 'c' \(str\)"):
        checks.check_choice("name", "c", ("a", "b"))
    with pytest.raises(TypeError, match="`name` must be one of"):
        checks.check_choice("name", 1, ("a", "b"))


def test_check_int_sequence_and_shape():
    assert checks.check_int_sequence("h", [64, np.int64(32)]) == (64, 32)
    assert checks.check_int_sequence("h", np.array([1, 2])) == (1, 2)
    assert checks.check_int_sequence("h", (), allow_empty=True) == ()
    assert checks.check_shape("event_shape", tf.TensorShape([8, 8, 1])) == (8, 8, 1)
    with pytest.raises(ValueError, match="`h` must be a non-empty sequence"):
        checks.check_int_sequence("h", [])
    with pytest.raises(TypeError, match=r"`h` must be a non-empty sequence of integers >= 1; given 64"):
        checks.check_int_sequence("h", 64)
    with pytest.raises(TypeError, match="`h` must be"):
        checks.check_int_sequence("h", "64")
    with pytest.raises(TypeError, match=r"`h\[1\]` must be an integer >= 1; given 2\.5"):
        checks.check_int_sequence("h", [1, 2.5])
    with pytest.raises(ValueError, match=r"`event_shape\[0\]` must be an integer >= 1; given 0"):
        checks.check_shape("event_shape", [0, 2])
    with pytest.raises(ValueError, match="`event_shape`"):
        checks.check_shape("event_shape", tf.TensorShape([None, 2]))


def test_check_dtype():
    assert checks.check_dtype("dtype", np.float64) == tf.float64
    assert checks.check_dtype("dtype", "float32") == tf.float32
    assert checks.check_dtype("dtype", tf.float32) == tf.float32
    with pytest.raises(ValueError, match=r"`dtype` must be one of the dtypes float32, float64; given tf\.int32"):
        checks.check_dtype("dtype", tf.int32)
    for bad in (1, "float3", None):
        with pytest.raises(TypeError, match="`dtype` must be one of the dtypes"):
            checks.check_dtype("dtype", bad)


def test_check_samples_accepts_and_converts():
    x64 = np.zeros((3, 2))
    assert checks.check_samples(x64, (2,)) is x64
    converted = checks.check_samples(np.ones((3, 2), np.int64), [2])
    assert converted.dtype == np.float32
    np.testing.assert_array_equal(converted, 1.0)


@pytest.mark.parametrize("data, error, pattern", [
    (np.ones((3, 2), np.complex64), TypeError, r"x must hold real numbers; given dtype complex64, complex"),
    (np.ones((3, 2), bool), TypeError, r"real numbers; given dtype bool"),
    (np.array([[1.0, None]]), TypeError, r"real numbers; given dtype object"),
    (np.array([["a", "b"]]), TypeError, r"real numbers; given dtype <U1"),
    ([[1.0, 2.0], [3.0]], ValueError, r"x must be an array of shape \[N, 2\]; given a list"),
    (np.zeros((3, 3)), ValueError, r"x must have shape \[N, 2\] .*given shape \[3, 3\]"),
    (np.zeros((0, 2)), ValueError, r"x must have at least 1 row\(s\).*given 0 \(it is empty\)"),
    (np.array([[0.0, 1.0], [np.nan, 0.0]]), ValueError, r"finite; given 1 NaN/inf.*index \(1, 0\)"),
])
def test_check_samples_refuses(data, error, pattern):
    with pytest.raises(error, match=pattern):
        checks.check_samples(data, (2,))


def test_check_samples_min_rows():
    with pytest.raises(ValueError, match=r"data must have at least 3 row\(s\).*given 2\."):
        checks.check_samples(np.zeros((2, 2)), (2,), name="data", min_rows=3)


def test_check_finite_tensor():
    tensor = tf.constant([[1.0, 2.0]])
    assert checks.check_finite_tensor("z", tensor) is tensor
    with pytest.raises(ValueError, match=r"`z` must be finite; given 2 NaN/inf value\(s\), the first at index \(0, 1\)"):
        checks.check_finite_tensor("z", tf.constant([[1.0, np.inf, np.nan]], tf.float64))

    @tf.function
    def graph(z):
        return checks.check_finite_tensor("z", z)

    np.testing.assert_array_equal(graph(tensor), tensor)
    with pytest.raises(tf.errors.InvalidArgumentError, match="`z` must be finite"):
        graph(tf.constant([[np.nan, 1.0]]))
