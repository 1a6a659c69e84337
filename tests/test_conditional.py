"""Conditional flows p(x | c): exactness, normalisation, training, export and bad contexts.

Every conditional builder of `tfp_flows.flows` (`context_size=k`) is checked with
random parameters (all variables perturbed, so the context reaches the map) in
float32 and float64: `inverse(forward(z, c), c) = z`, the forward log-det equals
`log|det ∂x/∂z|` of the autodiff Jacobian for each row's own context, and the
inverse log-det is its negative.
"""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

from flow_checks import autodiff_log_det, fresh
from tfp_flows import FlowModel, flows
from tfp_flows.datasets import conditional_toy

tfb = tfp.bijectors

K = 3  # context size of the exactness and bad-context tests

BUILDERS = {
    "planar_flow": (lambda dtype, k=K: flows.planar_flow(2, 3, seed=1, dtype=dtype, context_size=k,
                                                        context_hidden_units=(8,)), [2]),
    "radial_flow": (lambda dtype, k=K: flows.radial_flow(2, 3, seed=2, dtype=dtype, context_size=k,
                                                        context_hidden_units=(8,)), [2]),
    "maf": (lambda dtype, k=K: flows.maf(3, 2, [8], seed=3, dtype=dtype, context_size=k), [3]),
    "iaf": (lambda dtype, k=K: flows.iaf(3, 2, [8], seed=4, dtype=dtype, context_size=k), [3]),
    "nice": (lambda dtype, k=K: flows.nice(3, 2, [8], seed=5, dtype=dtype, context_size=k), [3]),
    "realnvp": (lambda dtype, k=K: flows.realnvp(3, 2, [8], seed=6, dtype=dtype, context_size=k), [3]),
    "glow": (lambda dtype, k=K: flows.glow([4, 4, 1], levels=1, steps_per_level=2, hidden_channels=4,
                                            seed=7, dtype=dtype, context_size=k), [4, 4, 1]),
}


def perturbed(flow, scale: float = 0.3, seed: int = 0):
    """`flow` with Gaussian noise of std `scale` added to every trainable variable."""
    rng = np.random.default_rng(seed)
    for variable in flow.trainable_variables:
        noise = rng.standard_normal(variable.shape).astype(variable.dtype.as_numpy_dtype)
        variable.assign_add(scale * noise)
    return flow


class _WithContext:
    """`forward(z)` of `flow` at a fixed context, for `autodiff_log_det`."""

    def __init__(self, flow, context):
        self.flow, self.context = flow, context

    def forward(self, z):
        return self.flow.forward(z, context=self.context)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_round_trip_and_log_det_against_autodiff_for_random_parameters(name, dtype):
    build, event_shape = BUILDERS[name]
    flow = perturbed(build(dtype), seed=11)
    rng = np.random.default_rng(12)
    n = 5
    z = tf.constant(rng.standard_normal([n, *event_shape]), dtype)
    np_dtype = dtype.as_numpy_dtype
    f64 = dtype == tf.float64
    context = tf.constant(2.0 * rng.standard_normal([n, K]), dtype)  # n contexts, one per row
    x = flow.forward(z, context=context)
    back = flow.inverse(fresh(x), context=context)
    np.testing.assert_allclose(back.numpy(), z.numpy(), rtol=1e-6 if f64 else 2e-3,
                               atol=1e-7 if f64 else 2e-4)
    fldj = flow.forward_log_det_jacobian(fresh(z), event_ndims=len(event_shape),
                                         context=context).numpy()
    expected = autodiff_log_det(_WithContext(flow, context), fresh(z))
    np.testing.assert_allclose(fldj, expected, rtol=1e-6 if f64 else 1e-3,
                               atol=1e-8 if f64 else 1e-3)
    ildj = flow.inverse_log_det_jacobian(fresh(x), event_ndims=len(event_shape),
                                         context=context).numpy()
    np.testing.assert_allclose(ildj, -fldj, rtol=1e-6 if f64 else 1e-3, atol=1e-8 if f64 else 1e-3)
    assert x.dtype == dtype and fldj.dtype == np_dtype
    # The context matters: other contexts move every row.
    other = tf.constant(2.0 * rng.standard_normal([n, K]), dtype)
    moved = np.abs(flow.forward(fresh(z), context=other).numpy()
                   - flow.forward(fresh(z), context=context).numpy())
    assert np.all(moved.reshape(n, -1).max(axis=1) > 1e-2)


@pytest.mark.parametrize("name", ["realnvp", "maf", "planar_flow"])
def test_conditional_density_integrates_to_one_for_each_context(name):
    """∫ p(x | c) dx = 1 on a grid for several contexts, the densities themselves differing.

    float64, weights perturbed (std 0.2): 2000 samples of every context stay within
    |x| < 7, so the box [-12, 12]² (5 units further out, where the base's Gaussian tails
    under these bounded deformations leave a mass far below the tolerance) holds all but
    a negligible part; the midpoint sum with h = 0.1 of a smooth density that vanishes at
    the box's edge errs by far less than 1e-3.
    """
    def build(dtype):
        if name == "planar_flow":
            return flows.planar_flow(2, 4, seed=1, dtype=dtype, context_size=2,
                                     context_hidden_units=(8,))
        return getattr(flows, name)(2, 3, [8], seed=2, dtype=dtype, context_size=2)

    model = FlowModel(perturbed(build(tf.float64), 0.2, seed=21), [2], context_shape=[2])
    edges = np.linspace(-12.0, 12.0, 241)
    centres = 0.5 * (edges[1:] + edges[:-1])
    xx, yy = np.meshgrid(centres, centres)
    points = np.stack([xx.ravel(), yy.ravel()], axis=1)
    area = (edges[1] - edges[0]) ** 2
    densities = []
    for angle in (0.0, 2.0, 4.0):
        context = np.array([np.cos(angle), np.sin(angle)]) * 1.5
        samples = model.sample(2000, context=context, seed=3).numpy()
        assert np.abs(samples).max() < 7.0
        density = np.exp(model.log_prob(points, context=np.tile(context, (len(points), 1))).numpy())
        np.testing.assert_allclose(density.sum() * area, 1.0, atol=1e-3)
        densities.append(density)
    # Different contexts, different densities (total variation well above zero).
    assert 0.5 * np.abs(densities[0] - densities[1]).sum() * area > 0.05


def _fit_and_score(model, x, c, x_test, c_test, epochs, batch_size, learning_rate=1e-2,
                   jit_compile=False):
    before = -float(np.mean(model.log_prob(x_test, context=c_test).numpy()))
    model.compile(learning_rate=learning_rate, jit_compile=jit_compile)
    history = model.fit(x, context=c, epochs=epochs, batch_size=batch_size, verbose=0)
    after = -float(np.mean(model.log_prob(x_test, context=c_test).numpy()))
    return before, after, history


@pytest.mark.parametrize("name", ["planar_flow", "radial_flow", "maf", "iaf", "nice", "realnvp"])
def test_training_with_context_lowers_the_held_out_nll(name):
    tf_keras.utils.set_random_seed(0)
    x, c = conditional_toy("rotated-8gaussians", 1024, seed=0)
    x_test, c_test = conditional_toy("rotated-8gaussians", 512, seed=1)
    if name in ("planar_flow", "radial_flow"):
        flow = getattr(flows, name)(2, 3, seed=0, context_size=2, context_hidden_units=(16,))
    else:
        flow = getattr(flows, name)(2, 2, [16, 16], seed=0, context_size=2)
    model = FlowModel(flow, [2], context_shape=[2])
    before, after, history = _fit_and_score(model, x, c, x_test, c_test, epochs=3, batch_size=128,
                                            jit_compile=name == "realnvp")
    assert np.all(np.isfinite(history.history["nll"]))
    assert after < before - 0.3, (before, after)


def test_conditional_glow_trains_on_tiny_images_with_a_one_hot_label():
    """Two classes of 4×4 images (a bright top or a bright bottom half): after training
    the true label explains a test image better than the wrong one."""
    tf_keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)

    def images(n):
        labels = rng.integers(0, 2, size=n)
        top = np.where(labels[:, None] == 0, 1.0, -1.0)
        mean = np.concatenate([np.repeat(top, 8, axis=1), np.repeat(-top, 8, axis=1)], axis=1)
        x = (mean + 0.3 * rng.standard_normal([n, 16])).reshape(n, 4, 4, 1)
        return x.astype(np.float32), np.eye(2, dtype=np.float32)[labels]

    (x, c), (x_test, c_test) = images(512), images(128)
    model = FlowModel(flows.glow([4, 4, 1], levels=1, steps_per_level=2, hidden_channels=8,
                                 seed=0, context_size=2), [4, 4, 1], context_shape=[2])
    before, after, _ = _fit_and_score(model, x, c, x_test, c_test, epochs=8, batch_size=64,
                                      learning_rate=1e-2)
    assert after < before - 3.0, (before, after)
    wrong = -float(np.mean(model.log_prob(x_test, context=1.0 - c_test).numpy()))
    assert wrong > after + 1.0, (after, wrong)


def conditional_chain(seed=0):
    """Two conditional flows of the library in one `tfb.Chain` (the context routed to both)."""
    return tfb.Chain([
        flows.realnvp(2, 2, [16], seed=seed, context_size=2),
        flows.maf(2, 2, [16], seed=seed + 1, context_size=2),
    ])


def test_sample_shapes_and_context_routing_through_a_chain():
    model = FlowModel(perturbed(conditional_chain(), seed=31), [2], context_shape=[2])
    context = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], np.float32)
    assert model.sample(4, context=context[0], seed=1).shape == (4, 2)
    samples = model.sample(6, context=context, seed=1).numpy()
    assert samples.shape == (6, 3, 2)
    # Column j of the batch is drawn at context j: its log-density under context j
    # beats the log-density of the same points under the other contexts on average.
    for j in range(3):
        own = model.log_prob(samples[:, j], context=np.tile(context[j], (6, 1))).numpy().mean()
        for i in set(range(3)) - {j}:
            other = model.log_prob(samples[:, j], context=np.tile(context[i], (6, 1))).numpy().mean()
            assert own > other
    # log_prob equals base log-density + inverse log-det of each part with the context.
    x = samples[:, 0]
    c = np.tile(context[0], (6, 1))
    kwargs = model.bijector_kwargs(tf.constant(c))
    z = model.bijector.inverse(x, **kwargs)
    expected = model.base_distribution.log_prob(z) + model.bijector.inverse_log_det_jacobian(
        x, event_ndims=1, **kwargs)
    np.testing.assert_allclose(model.log_prob(x, context=c).numpy(), expected.numpy(),
                               rtol=1e-5, atol=1e-5)


def test_export_reloads_in_plain_tensorflow_and_matches(tmp_path):
    flow = flows.realnvp(2, 2, [16], seed=0, context_size=2)
    model = FlowModel(perturbed(flow, seed=41), [2], context_shape=[2])
    x, c = conditional_toy("rotated-8gaussians", 16, seed=2)
    expected = model.log_prob(x, context=c).numpy()
    path = str(tmp_path / "conditional")
    model.export(path)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "c.npy", c)
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        import tensorflow as tf
        loaded = tf.saved_model.load({path!r})
        x, c = np.load({str(tmp_path / 'x.npy')!r}), np.load({str(tmp_path / 'c.npy')!r})
        log_prob = loaded.log_prob(tf.constant(x), tf.constant(c)).numpy()
        samples = loaded.sample(tf.constant(5), tf.constant(c[:3]))
        z = loaded.inverse(tf.constant(x), tf.constant(c))
        back = loaded.forward(z, tf.constant(c)).numpy()
        print(json.dumps({{
            "log_prob": log_prob.tolist(),
            "sample_shape": samples.shape.as_list(),
            "round_trip": float(np.abs(back - x).max()),
            "imported": [m for m in ("tensorflow_probability", "tfp_flows") if m in sys.modules],
        }}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["imported"] == []
    np.testing.assert_allclose(result["log_prob"], expected, rtol=1e-5, atol=1e-5)
    assert result["sample_shape"] == [5, 3, 2]
    assert result["round_trip"] < 1e-3


# --- bad contexts ----------------------------------------------------------------------

BAD_CONTEXTS = {
    # case: (context for n rows of x, error type, words the message must contain for n)
    "wrong_size": (lambda n: np.zeros((n, K + 1), np.float32), ValueError,
                   lambda n: ["context", str(K), str(K + 1)]),
    "rank_1": (lambda n: np.zeros(K, np.float32), ValueError, lambda n: ["context", str(K)]),
    "other_rows": (lambda n: np.zeros((n - 2, K), np.float32), ValueError,
                   lambda n: ["context", str(n), str(n - 2)]),
    "nan": (lambda n: np.where(np.eye(n, K) > 0, np.nan, 0.0).astype(np.float32), ValueError,
            lambda n: ["context", "finite"]),
    "inf": (lambda n: np.where(np.eye(n, K) > 0, -np.inf, 0.0).astype(np.float32), ValueError,
            lambda n: ["context", "finite"]),
    "bool": (lambda n: np.ones((n, K), bool), TypeError, lambda n: ["context", "bool"]),
    "string": (lambda n: np.full((n, K), "a"), TypeError, lambda n: ["context", "<U1"]),
    "float64_tensor": (lambda n: tf.zeros((n, K), tf.float64), TypeError,
                       lambda n: ["context", "float32", "float64"]),
}


def _message_check(error, words):
    message = str(error.value)
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("name,case", [
    (name, case) for name in sorted(BUILDERS) for case in BAD_CONTEXTS
])
def test_flow_forward_refuses_a_bad_context_clearly(name, case):
    build, event_shape = BUILDERS[name]
    flow = build(tf.float32)
    n = 4
    make, error_type, words = BAD_CONTEXTS[case]
    z = tf.zeros([n, *event_shape])
    with pytest.raises(error_type) as error:
        flow.forward(z, context=make(n))
    _message_check(error, words(n))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_flow_forward_refuses_no_context_and_a_context_for_an_unconditional_flow(name):
    build, event_shape = BUILDERS[name]
    z = tf.zeros([2, *event_shape])
    with pytest.raises(ValueError, match="conditional on a context of size 3"):
        build(tf.float32).forward(z)
    unconditional = build(tf.float32, None)
    with pytest.raises(ValueError, match="unconditional"):
        unconditional.forward(z, context=np.zeros((2, K), np.float32))


@pytest.fixture(scope="module")
def conditional_model():
    model = FlowModel(flows.realnvp(2, 2, [8], seed=0, context_size=K), [2], context_shape=[K])
    model.compile(jit_compile=False)
    return model


_MODEL_CASES = [case for case in BAD_CONTEXTS if case != "rank_1"]


@pytest.mark.parametrize("case", _MODEL_CASES)
@pytest.mark.parametrize("method", ["fit", "log_prob", "sample"])
def test_flow_model_refuses_a_bad_context_before_any_work(conditional_model, method, case):
    make, _, words = BAD_CONTEXTS[case]
    n = 6
    x = np.zeros((n, 2), np.float32)
    if method == "sample" and case == "other_rows":
        pytest.skip("sample takes any number of contexts")
    if case == "float64_tensor":  # FlowModel converts tensors of another float dtype
        context = make(n)
        if method == "sample":
            assert conditional_model.sample(2, context=context).shape == (2, n, 2)
        elif method == "log_prob":
            assert conditional_model.log_prob(x, context=context).shape == (n,)
        return
    weights = [w.numpy() for w in conditional_model.weights]
    with pytest.raises((ValueError, TypeError)) as error:
        if method == "fit":
            conditional_model.fit(x, context=make(n), epochs=1, verbose=0)
        elif method == "log_prob":
            conditional_model.log_prob(x, context=make(n))
        else:
            conditional_model.sample(3, context=make(n))
    _message_check(error, words(n))
    for before, after in zip(weights, conditional_model.weights):
        np.testing.assert_array_equal(before, after.numpy())


@pytest.mark.parametrize("method", ["fit", "log_prob", "sample"])
def test_flow_model_refuses_a_missing_or_unexpected_context(conditional_model, method):
    x = np.zeros((4, 2), np.float32)
    unconditional = FlowModel(flows.realnvp(2, 2, [8], seed=0), [2])
    calls = {
        "fit": lambda m, c: m.fit(x, context=c, epochs=1, verbose=0),
        "log_prob": lambda m, c: m.log_prob(x, context=c),
        "sample": lambda m, c: m.sample(2, context=c),
    }[method]
    with pytest.raises(ValueError, match=r"conditional \(context_shape=\[3\]\)"):
        calls(conditional_model, None)
    with pytest.raises(ValueError, match="unconditional"):
        calls(unconditional, np.zeros((4, K), np.float32))


def test_fit_refuses_bad_validation_contexts_and_datasets(conditional_model):
    x, c = np.zeros((8, 2), np.float32), np.zeros((8, K), np.float32)
    with pytest.raises(ValueError, match=r"validation_data\[1\].*finite"):
        conditional_model.fit(x, context=c, validation_data=(x, np.full((8, K), np.nan)), verbose=0)
    with pytest.raises(ValueError, match=r"validation_data\[1\].*expected 8 rows; given 3"):
        conditional_model.fit(x, context=c, validation_data=(x, c[:3]), verbose=0)
    with pytest.raises(ValueError, match=r"\(x, context\) pairs of shapes \[batch, 2\], \[batch, 3\]"):
        conditional_model.fit(tf.data.Dataset.from_tensor_slices((x, c[:, :2])).batch(4), verbose=0)
    with pytest.raises(ValueError, match=r"\(x, context\) pairs"):
        conditional_model.fit(tf.data.Dataset.from_tensor_slices(x).batch(4), verbose=0)


def test_fit_refuses_a_dataset_context_of_another_dtype(conditional_model):
    x, c = np.zeros((8, 2), np.float32), np.zeros((8, K), np.float64)
    with pytest.raises(TypeError, match="float32.*float64"):
        conditional_model.fit(tf.data.Dataset.from_tensor_slices((x, c)).batch(4), verbose=0)


def test_construction_refuses_mismatched_conditioning():
    with pytest.raises(ValueError, match="no part of the bijector takes a context"):
        FlowModel(flows.realnvp(2, 2, [8], seed=0), [2], context_shape=[K])
    with pytest.raises(ValueError, match=r"conditional parts \(realnvp\); pass context_shape"):
        FlowModel(flows.realnvp(2, 2, [8], seed=0, context_size=K), [2])
    with pytest.raises(ValueError, match=r"takes a context of size 3; given context_shape \[4\]"):
        FlowModel(flows.realnvp(2, 2, [8], seed=0, context_size=K), [2], context_shape=[4])
    with pytest.raises(ValueError, match=r"context_shape.*\[k\]"):
        FlowModel(flows.realnvp(2, 2, [8], seed=0, context_size=K), [2], context_shape=[1, K])


def test_tfp_conditional_maf_in_a_chain_with_a_planar_flow_trains():
    """TFP's conditional MAF (`conditional_input`) next to an unconditional planar flow."""
    tf_keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    c = rng.standard_normal((1024, 3)).astype(np.float32)
    x = (c[:, :2] + 0.3 * rng.standard_normal((1024, 2))).astype(np.float32)  # x | c ~ N(c_1:2, .09)
    made = tfb.AutoregressiveNetwork(params=2, event_shape=[2], conditional=True,
                                     conditional_event_shape=[3], hidden_units=[16])
    bijector = tfb.Chain([tfb.MaskedAutoregressiveFlow(made), flows.planar_flow(2, 4, seed=0)])
    model = FlowModel(bijector, [2], context_shape=[3])
    # TFP's MADE starts far from the identity (held-out NLL about 72 nats): 8 epochs
    # bring it below the context-blind marginal (about 2.9), where the context shows.
    before, after, _ = _fit_and_score(model, x[:768], c[:768], x[768:], c[768:], epochs=8,
                                      batch_size=64)
    assert after < before - 0.5, (before, after)
    shuffled = -float(np.mean(model.log_prob(x[768:], context=c[768:][::-1]).numpy()))
    assert shuffled > after + 0.5, (after, shuffled)
