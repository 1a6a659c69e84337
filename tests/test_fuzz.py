"""Fuzzing the public API with bad arguments (Hypothesis).

Every bad argument must raise `TypeError` or `ValueError` naming the argument, before any
work, within a few seconds: never another exception type, never a silent coercion (a
float or a bool where an integer is required, a string where a number is), never a hang.
"""
import math
import os
import re
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tfp_flows import checks, datasets, dual_ascent, plotting

LIMIT_S = 10.0
FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class _Hang(Exception):
    pass


def _call_with_limit(fn, limit_s: float = LIMIT_S):
    def on_alarm(signum, frame):
        raise _Hang()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _names(message: str, name: str) -> bool:
    """The message is about `name`: "`name` must", "`name[2]` must", "name must/has/…" or
    "name (a remark) must/has/…"."""
    pattern = (rf"(`{re.escape(name)}(\[\d+\])?`|(^|: |\b){re.escape(name)})( \([^)]*\))? "
               r"(must|has|needs|and)\b")
    return re.search(pattern, message) is not None


def assert_refused(fn, name: str, limit_s: float = LIMIT_S) -> Exception:
    try:
        result = _call_with_limit(fn, limit_s)
    except _Hang:
        pytest.fail(f"hang: bad `{name}` got no answer within {limit_s} s")
    except (TypeError, ValueError) as error:
        assert _names(str(error), name), f"the message does not name `{name}`: {error}"
        return error
    except Exception as error:  # noqa: BLE001 - any other type is the defect reported
        pytest.fail(f"bad `{name}`: undocumented {type(error).__name__}: {error}")
    pytest.fail(f"bad `{name}` accepted silently; returned {str(result)[:120]}")


# ---------------------------------------------------------------- strategies

non_finite = st.sampled_from([math.nan, math.inf, -math.inf, np.float32("nan"), np.float64("-inf")])
# Neither an integer nor a real number (never coerced: strings, bools, complex, containers).
not_numbers = st.one_of(
    st.booleans(), st.none(), st.text(max_size=4), st.complex_numbers(max_magnitude=1e3),
    st.lists(st.integers(1, 5), min_size=1, max_size=2), st.just(np.bool_(True)),
    st.just(np.array([3])),
)
not_integers = st.one_of(
    not_numbers, non_finite, st.floats(allow_nan=False, allow_infinity=False),
    st.integers(1, 50).map(float), st.integers(1, 50).map(np.float32),
)
bad_positive_integers = st.one_of(not_integers, st.integers(max_value=0),
                                  st.integers(-2**40, 0).map(np.int64))
bad_seeds = st.one_of(not_integers.filter(lambda v: v is not None), st.integers(max_value=-1),
                      st.integers(min_value=2**31), st.just(5 + 2**32))
bad_positive_numbers = st.one_of(not_numbers, non_finite, st.floats(max_value=0.0, allow_nan=False))
bad_fractions = st.one_of(not_numbers, non_finite, st.floats(min_value=1.0),
                          st.floats(max_value=-1e-9))


def bad_names(choices):
    return st.one_of(st.text(max_size=12).filter(lambda s: s not in choices), st.integers(),
                     st.none(), st.lists(st.sampled_from(list(choices)), min_size=1, max_size=1))


@st.composite
def bad_arrays(draw, event_shape=(2,)):
    """Data that is not a finite real `[N, *event_shape]` array with N >= 1."""
    kind = draw(st.sampled_from(["shape", "non-finite", "dtype", "empty", "ragged", "none"]))
    n = draw(st.integers(1, 6))
    if kind == "shape":
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=len(event_shape) + 2, min_side=1,
                                      max_side=4).filter(lambda s: s[1:] != tuple(event_shape)))
        return np.zeros(shape)
    if kind == "non-finite":
        array = np.random.default_rng(draw(st.integers(0, 99))).normal(size=(n, *event_shape))
        index = tuple(draw(st.integers(0, d - 1)) for d in array.shape)
        array[index] = draw(non_finite)
        return array.astype(draw(st.sampled_from([np.float32, np.float64])))
    if kind == "dtype":
        dtype = draw(st.sampled_from([np.complex64, np.complex128, bool, str, object]))
        return np.ones((n, *event_shape)).astype(dtype)
    if kind == "empty":
        return np.zeros((0, *event_shape), np.float32)
    if kind == "ragged":
        return [[1.0] * int(np.prod(event_shape)), [1.0]]
    return None


# ---------------------------------------------------------------- the checks themselves

@FUZZ
@given(value=st.one_of(st.integers(-10**6, 10**6), st.integers(-100, 100).map(np.int64)),
       low=st.integers(-10, 0), high=st.integers(0, 10))
def test_check_integer_accepts_exactly_the_integers_in_range(value, low, high):
    if low <= value <= high:
        result = checks.check_integer("k", value, low, high)
        assert type(result) is int and result == value
    else:
        assert_refused(lambda: checks.check_integer("k", value, low, high), "k")


@FUZZ
@given(value=not_integers)
def test_check_integer_never_coerces(value):
    assert_refused(lambda: checks.check_integer("k", value), "k")


@FUZZ
@given(value=st.floats(allow_nan=False, allow_infinity=False), low=st.floats(-1, 0),
       high=st.floats(0, 1))
def test_check_number_accepts_exactly_the_reals_in_range(value, low, high):
    if low <= value <= high:
        assert checks.check_number("t", value, low, high) == value
    else:
        assert_refused(lambda: checks.check_number("t", value, low, high), "t")


@FUZZ
@given(value=bad_seeds)
def test_check_seed_never_wraps(value):
    assert_refused(lambda: checks.check_seed("seed", value), "seed")


# ---------------------------------------------------------------- datasets

@FUZZ
@given(name=st.sampled_from(datasets.TOY_NAMES), n=bad_positive_integers)
def test_toy_refuses_bad_n(name, n):
    assert_refused(lambda: datasets.toy(name, n), "n")


@FUZZ
@given(seed=bad_seeds, conditional=st.booleans())
def test_toy_refuses_bad_seeds(seed, conditional):
    sample = datasets.conditional_toy if conditional else datasets.toy
    name = "rotated-8gaussians" if conditional else "8gaussians"
    assert_refused(lambda: sample(name, 5, seed=seed), "seed")


@FUZZ
@given(name=bad_names(datasets.TOY_NAMES + datasets.CONDITIONAL_TOY_NAMES + datasets.ENERGY_NAMES),
       which=st.sampled_from(["toy", "toy_log_prob", "energy", "conditional_toy",
                              "conditional_toy_log_prob", "digits"]))
def test_unknown_names_are_refused(name, which):
    x = np.zeros((3, 2))
    calls = {
        "toy": lambda: datasets.toy(name, 5),
        "toy_log_prob": lambda: datasets.toy_log_prob(name, x),
        "energy": lambda: datasets.energy(name),
        "conditional_toy": lambda: datasets.conditional_toy(name, 5),
        "conditional_toy_log_prob": lambda: datasets.conditional_toy_log_prob(name, x, x),
        "digits": lambda: datasets.digits(name),
    }
    assert_refused(calls[which], "split" if which == "digits" else "name")


@FUZZ
@given(n=st.integers(1, 40), numpy_type=st.sampled_from([int, np.int32, np.int64, np.uint16]),
       seed=st.integers(0, 2**31 - 1))
def test_valid_sizes_and_seeds_of_any_integer_type_are_accepted(n, numpy_type, seed):
    x = datasets.toy("8gaussians", numpy_type(n), seed=np.int64(seed))
    np.testing.assert_array_equal(x, datasets.toy("8gaussians", n, seed=seed))
    assert x.shape == (n, 2) and x.dtype == np.float32


@FUZZ
@given(x=bad_arrays(), which=st.sampled_from(["toy_log_prob", "x", "c", "energy"]))
def test_log_densities_refuse_bad_points(x, which):
    good = np.tile([[1.0, 0.0]], (3, 1))
    if which == "toy_log_prob":
        assert_refused(lambda: datasets.toy_log_prob("8gaussians", x), "x")
    elif which == "energy":
        # An empty batch is fine for a TensorFlow function: it returns an empty [0] tensor.
        assume(not (isinstance(x, np.ndarray) and x.shape == (0, 2)))
        assert_refused(lambda: datasets.energy("U3")(x), "z")
    else:
        pair = (x, good) if which == "x" else (good, x)
        assert_refused(lambda: datasets.conditional_toy_log_prob("rotated-8gaussians", *pair),
                       which)


@FUZZ
@given(scale=st.one_of(st.floats(0.0, 0.999), st.floats(1.000002, 10.0)), row=st.integers(0, 3))
def test_contexts_off_the_unit_circle_are_refused(scale, row):
    c = np.tile([[0.6, 0.8]], (4, 1))
    c[row] *= scale
    assert_refused(lambda: datasets.conditional_toy_log_prob("rotated-8gaussians", c, c), "c")


# ---------------------------------------------------------------- dual ascent

DUAL_ASCENT_BAD = {
    "num_steps": st.one_of(not_integers, st.integers(max_value=-1)),
    "patience": st.one_of(not_integers.filter(lambda v: v is not None), st.integers(max_value=0)),
    "validation_fraction": bad_fractions,
    "seed": bad_seeds,
    "eps": st.one_of(not_numbers.filter(lambda v: v is not None), non_finite,
                     st.floats(max_value=0.0, allow_nan=False)),
    "max_step": bad_positive_numbers,
    "max_abs_gamma": st.one_of(not_numbers, non_finite, st.floats(min_value=0.9991),
                               st.floats(max_value=-1e-9)),
    "max_abs_sigma": st.one_of(not_numbers, non_finite, st.floats(min_value=0.9991),
                               st.floats(max_value=-1e-9)),
    "chunk_size": bad_positive_integers,
    "verbose": st.one_of(st.integers(), st.text(max_size=3), st.none()),
}


@FUZZ
@given(data=st.data(), key=st.sampled_from(sorted(DUAL_ASCENT_BAD)))
def test_dual_ascent_fit_refuses_bad_settings_and_leaves_x_alone(data, key):
    x = np.random.default_rng(0).normal(size=(40, 2))
    before = x.copy()
    value = data.draw(DUAL_ASCENT_BAD[key], label=key)
    arguments = dict(num_steps=2, chunk_size=2, verbose=False)
    arguments[key] = value
    assert_refused(lambda: dual_ascent.fit(x, **arguments), key)
    np.testing.assert_array_equal(x, before)


def _finite_real_batch(x, event_shape=None) -> bool:
    """Whether `x` is valid data: a finite real array [N >= 1, *event_shape]."""
    return (isinstance(x, np.ndarray) and x.dtype.kind == "f" and x.ndim >= 2 and len(x) >= 1
            and 0 not in x.shape and (event_shape is None or x.shape[1:] == event_shape)
            and bool(np.isfinite(x).all()))


@FUZZ
@given(x=st.one_of(bad_arrays(), bad_arrays((2, 3))), as_validation=st.booleans())
def test_dual_ascent_fit_refuses_bad_data(x, as_validation):
    if as_validation:
        good = np.random.default_rng(1).normal(size=(40, 2))
        assume(x is not None and not _finite_real_batch(x, (2,)))  # None: split x
        assert_refused(lambda: dual_ascent.fit(good, validation_data=x, num_steps=1,
                                               chunk_size=1, verbose=False), "validation_data")
    else:
        # Finite real arrays of any event shape are data; these zeros then fail as
        # constant columns or too few points, which must be named too.
        assert_refused(lambda: dual_ascent.fit(x, num_steps=1, chunk_size=1, verbose=False), "x")


@FUZZ
@given(bad=bad_positive_integers, too_many=st.integers(min_value=21), seed=bad_seeds)
def test_static_batches_and_auto_eps_refuse_bad_arguments(bad, too_many, seed):
    x = np.zeros((20, 2), np.float32)
    for batch_size in (bad, too_many):
        assert_refused(lambda: dual_ascent.static_batches(x, batch_size, seed=0), "batch_size")
    assert_refused(lambda: dual_ascent.static_batches(x, 4, seed=seed), "seed")
    assert_refused(lambda: dual_ascent.auto_eps(bad, 2), "num_points")
    assert_refused(lambda: dual_ascent.auto_eps(100, bad), "dim")


# ---------------------------------------------------------------- plotting

PLOT_BAD = {
    "grid_size": st.one_of(not_integers, st.integers(max_value=1), st.integers(min_value=2001)),
    "bounds": st.one_of(
        st.lists(st.floats(-5, 5), max_size=6).filter(lambda b: len(b) != 4),
        st.tuples(st.floats(0, 1), st.floats(-1, 0), st.floats(-1, 0), st.floats(0, 1)),
        st.tuples(st.floats(-1, 0), st.floats(0, 1), st.sampled_from([math.nan, "a", None]),
                  st.floats(0, 1)),
        st.integers(), st.text(max_size=3)),
    "title": st.one_of(st.integers(), st.floats(), st.lists(st.text(), max_size=1)),
    "path": st.one_of(st.none(), st.integers(), st.just("")),
}


@FUZZ
@given(data=st.data(), key=st.sampled_from(sorted(PLOT_BAD) + ["data", "samples"]))
def test_plot_density_2d_refuses_bad_arguments(data, key, tmp_path_factory):
    good = np.random.default_rng(2).normal(size=(30, 2))
    arguments = dict(distribution_or_log_prob_fn=lambda x: -0.5 * np.sum(np.square(x), axis=1),
                     data=good, samples=good, path=str(tmp_path_factory.mktemp("plot") / "d.png"),
                     grid_size=8)
    if key in ("data", "samples"):
        arguments[key] = data.draw(bad_arrays(), label=key)
    else:
        arguments[key] = data.draw(PLOT_BAD[key], label=key)
    name = "bounds" if key == "bounds" else key
    assert_refused(lambda: plotting.plot_density_2d(**arguments), name)
    if isinstance(arguments["path"], str) and arguments["path"]:
        assert not os.path.exists(arguments["path"])  # refused before drawing


@FUZZ
@given(images=bad_arrays((4, 4, 1)), nrow=bad_positive_integers)
def test_plot_image_grid_refuses_bad_arguments(images, nrow, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("grid") / "g.png")
    good = np.full((3, 4, 4, 1), 0.5)
    assert_refused(lambda: plotting.plot_image_grid(images, path), "images")
    assert_refused(lambda: plotting.plot_image_grid(good, path, nrow=nrow), "nrow")
    assert not os.path.exists(path)


# ---------------------------------------------------------------- builders and FlowModel

BUILDERS = ("planar_flow", "radial_flow", "maf", "iaf", "nice", "realnvp")


@FUZZ
@given(builder=st.sampled_from(BUILDERS), data=st.data(),
       key=st.sampled_from(["event_size", "depth", "seed", "dtype", "hidden_units"]))
def test_flow_builders_refuse_bad_arguments(builder, data, key):
    from tfp_flows import flows

    depth_name = "num_couplings" if builder in ("nice", "realnvp") else "num_layers"
    arguments = {"event_size": 2, depth_name: 2}
    if key == "hidden_units" and builder in ("planar_flow", "radial_flow"):
        key = "seed"
    if key == "event_size":
        arguments["event_size"] = data.draw(bad_positive_integers, label=key)
    elif key == "depth":
        key = depth_name
        arguments[depth_name] = data.draw(bad_positive_integers, label=key)
    elif key == "seed":
        arguments["seed"] = data.draw(bad_seeds, label=key)
    elif key == "dtype":
        arguments["dtype"] = data.draw(st.one_of(st.sampled_from([tf.int32, tf.float16, "int8", np.complex64]),
                                                 st.integers(1, 20), st.none()), label=key)
    else:
        arguments["hidden_units"] = data.draw(st.one_of(
            st.lists(st.one_of(st.integers(max_value=0), not_integers), min_size=1, max_size=2),
            st.integers(), st.just([])), label=key)
    assert_refused(lambda: getattr(flows, builder)(**arguments), key, limit_s=30)


def _flow_model_cases():
    """(label, argument name, call) for FlowModel construction and its methods."""
    from tfp_flows import FlowModel, flows

    x = datasets.toy("8gaussians", 64, seed=0)

    def model():
        return FlowModel(flows.planar_flow(2, num_layers=1, seed=0), event_shape=[2])

    def fitted(**kwargs):
        built = model()
        built.compile(learning_rate=1e-3)
        return built.fit(x, epochs=kwargs.pop("epochs", 1), verbose=0, **kwargs)

    return [
        ("FlowModel(event_shape=[0])", "event_shape",
         lambda: FlowModel(flows.planar_flow(2, 1), event_shape=[0])),
        ("FlowModel(event_shape=2.5)", "event_shape",
         lambda: FlowModel(flows.planar_flow(2, 1), event_shape=2.5)),
        ("FlowModel(event_shape=[2.0])", "event_shape",
         lambda: FlowModel(flows.planar_flow(2, 1), event_shape=[2.0])),
        ("compile(learning_rate=-1)", "learning_rate", lambda: model().compile(learning_rate=-1.0)),
        ("compile(learning_rate='0.1')", "learning_rate", lambda: model().compile(learning_rate="0.1")),
        ("fit(batch_size=0)", "batch_size", lambda: fitted(batch_size=0)),
        ("fit(batch_size=2.5)", "batch_size", lambda: fitted(batch_size=2.5)),
        ("fit(batch_size=True)", "batch_size", lambda: fitted(batch_size=True)),
        ("fit(patience=-1)", "patience", lambda: fitted(patience=-1)),
        ("fit(patience=1.5)", "patience", lambda: fitted(patience=1.5)),
        ("fit(validation_split='0.1')", "validation_split", lambda: fitted(validation_split="0.1")),
        ("fit(validation_split=1.0)", "validation_split", lambda: fitted(validation_split=1.0)),
        ("fit(validation_split=nan)", "validation_split", lambda: fitted(validation_split=math.nan)),
        ("fit(epochs=2.5)", "epochs", lambda: fitted(epochs=2.5)),
        ("fit(epochs=0)", "epochs", lambda: fitted(epochs=0)),
        ("fit(epochs=True)", "epochs", lambda: fitted(epochs=True)),
        ("sample(2.5)", "n", lambda: model().sample(2.5)),
        ("sample(-1)", "n", lambda: model().sample(-1)),
        ("sample(True)", "n", lambda: model().sample(True)),
        ("sample('3')", "n", lambda: model().sample("3")),
    ]


def test_flow_model_refuses_bad_arguments():
    failures = []
    for label, name, call in _flow_model_cases():
        try:
            assert_refused(call, name, limit_s=60)
        except pytest.fail.Exception as failure:
            failures.append(f"{label}: {failure}")
        except AssertionError as failure:
            failures.append(f"{label}: {failure}")
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------- the command line

CLI_SCRIPT = textwrap.dedent("""
    import contextlib, io, math, signal, sys
    from hypothesis import given, settings, strategies as st
    from tfp_flows import cli

    out = sys.argv[1]
    problems = []
    flags = {
        "--epochs": "int", "--layers": "int", "--batch-size": "int", "--patience": "int",
        "--n": "int", "--n-test": "int", "--plot-samples": "int", "--seed": "seed",
        "--lr": "positive", "--validation-split": "fraction", "--test-fraction": "fraction",
        "--flow": "name", "--data": "name", "--hidden": "hidden",
    }
    bad = {
        "int": st.sampled_from(["0", "-3", "2.5", "1e3", "x", "", "True", "nan"]),
        "seed": st.sampled_from(["-1", "2.5", "4294967301", "x", ""]),
        "positive": st.sampled_from(["0", "-1", "nan", "inf", "x", "", "1e400"]),
        "fraction": st.sampled_from(["1", "1.5", "-0.1", "nan", "x", "", "0.1.2"]),
        "name": st.sampled_from(["nope", "", "8GAUSSIANS", "planar,", "/no/such/file.npy"]),
        "hidden": st.sampled_from(["", "0", "64,,64", "-1", "a", "64,2.5"]),
    }

    def on_alarm(signum, frame):
        raise TimeoutError

    signal.signal(signal.SIGALRM, on_alarm)

    @settings(max_examples=int(sys.argv[2]), deadline=None, derandomize=True, database=None)
    @given(flag=st.sampled_from(sorted(flags)), data=st.data())
    def fuzz(flag, data):
        value = data.draw(bad[flags[flag]])
        argv = ["fit", "--out", out, "--epochs", "1", "--n", "64", flag + "=" + value]
        stderr = io.StringIO()
        signal.alarm(60)
        try:
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                try:
                    status = cli.main(argv)
                except SystemExit as exit:
                    status = exit.code
        except TimeoutError:
            status = "hang"
        except Exception as error:
            status = f"{type(error).__name__}: {error}"
        finally:
            signal.alarm(0)
        text = stderr.getvalue()
        if status != 2 or "Traceback" in text or flag not in text:
            problems.append(f"{argv[-1]!r}: status {status!r}, stderr {text[-300:]!r}")

    fuzz()
    print("\\n".join(problems) if problems else "OK")
""")


def test_cli_refuses_bad_flags_with_status_2(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", CLI_SCRIPT, str(tmp_path / "run"), "20"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "OK", done.stdout[-4000:]
