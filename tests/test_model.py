"""FlowModel: training with fit (XLA), densities that integrate to 1, export, bad input."""
import contextlib
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

from tfp_flows import FlowModel, flows, training
from tfp_flows import model as model_module
from tfp_flows.bijectors import Planar
from tfp_flows.datasets import toy
from tfp_flows.training import steps_per_execution_for

tfb, tfd = tfp.bijectors, tfp.distributions


def mixed_chain(seed=0, dtype=tf.float32):
    return tfb.Chain([
        flows.planar_flow(2, 4, seed=seed, dtype=dtype),
        flows.maf(2, 2, [16, 16], dtype=dtype),
        flows.radial_flow(2, 4, seed=seed + 1, dtype=dtype),
    ])


@pytest.fixture(scope="module")
def trained_mixed_model():
    tf_keras.utils.set_random_seed(0)
    model = FlowModel(mixed_chain(), event_shape=[2])
    model.compile(learning_rate=1e-2)
    history = model.fit(toy("8gaussians", 2048, seed=0), epochs=4, batch_size=256, verbose=0)
    return model, history


def test_fit_with_xla_lowers_the_nll(trained_mixed_model):
    model, history = trained_mixed_model
    nll = history.history["nll"]
    assert nll[-1] < nll[0] - 0.5
    assert model.train_function is not None and model.jit_compile
    bits = np.array(history.history["bits_per_dim"])
    np.testing.assert_allclose(bits, np.array(nll) / (2 * np.log(2.0)), rtol=1e-5)


def test_trained_mixed_chain_density_integrates_to_one(trained_mixed_model):
    """∫ p over a box equals the fraction of the model's samples inside it.

    The box holds most of the mass; the comparison with samples checks that
    log_prob and sample describe the same, normalised, distribution.
    """
    model, _ = trained_mixed_model
    grid = np.linspace(-12.0, 12.0, 801)
    xx, yy = np.meshgrid(grid, grid)
    points = np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.float32)
    density = np.exp(model.log_prob(points).numpy().astype(np.float64))
    mass = density.sum() * (grid[1] - grid[0]) ** 2
    samples = model.sample(200_000, seed=7).numpy()
    inside = np.mean(np.abs(samples).max(axis=1) <= 12.0)
    assert inside > 0.9
    assert abs(mass - inside) < 5e-3


def test_log_prob_matches_change_of_variables_by_hand(trained_mixed_model):
    model, _ = trained_mixed_model
    x = toy("8gaussians", 16, seed=3)
    z = model.bijector.inverse(x)
    expected = tfd.MultivariateNormalDiag(tf.zeros(2)).log_prob(z) + \
        model.bijector.inverse_log_det_jacobian(x, event_ndims=1)
    np.testing.assert_allclose(model.log_prob(x).numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
    assert model.sample(7, seed=1).shape == (7, 2)


def test_trained_chain_log_det_matches_autodiff(trained_mixed_model):
    """After Adam steps the MADE masks still hold (Keras applies the kernel constraints)."""
    model, _ = trained_mixed_model
    x = tf.constant(toy("8gaussians", 32, seed=6))
    with tf.GradientTape() as tape:
        tape.watch(x)
        z = model.bijector.inverse(x)
    _, expected = np.linalg.slogdet(tape.batch_jacobian(z, x).numpy().astype(np.float64))
    actual = model.bijector.inverse_log_det_jacobian(x, event_ndims=1).numpy()
    np.testing.assert_allclose(actual, expected, atol=2e-3)


def test_float64_model_trains():
    model = FlowModel(flows.planar_flow(2, 4, seed=0, dtype=tf.float64), event_shape=[2])
    assert model.distribution.dtype == tf.float64
    model.compile(learning_rate=1e-2, jit_compile=False)  # XLA: trained_mixed_model
    history = model.fit(toy("moons", 1024, seed=0), epochs=3, batch_size=128, verbose=0)
    assert history.history["nll"][-1] < history.history["nll"][0]


def test_early_stopping_restores_the_best_weights():
    x = toy("8gaussians", 64, seed=1)
    validation = toy("8gaussians", 512, seed=2)
    model = FlowModel(flows.maf(2, 3, [64, 64]), event_shape=[2])
    model.compile(learning_rate=3e-2, jit_compile=False)
    history = model.fit(x, validation_data=validation, epochs=200, batch_size=64,
                        patience=5, verbose=0)
    val = history.history["val_nll"]
    assert len(val) < 200, "a 64-point training set must overfit and stop early"
    restored = -np.mean(model.log_prob(validation).numpy())
    assert restored == pytest.approx(min(val), rel=1e-4)


def test_checkpointed_weights_reload_into_a_fresh_model(trained_mixed_model, tmp_path):
    model, _ = trained_mixed_model
    path = str(tmp_path / "weights")
    model.save_weights(path)
    fresh = FlowModel(mixed_chain(seed=5), event_shape=[2])
    fresh.load_weights(path)
    x = toy("8gaussians", 32, seed=4)
    np.testing.assert_allclose(fresh.log_prob(x).numpy(), model.log_prob(x).numpy(), rtol=1e-6)


def test_fit_accepts_a_dataset_and_validation_split():
    data = toy("moons", 512, seed=0)
    model = FlowModel(flows.radial_flow(2, 3, seed=0), event_shape=[2])
    model.compile(learning_rate=1e-2, jit_compile=False)
    history = model.fit(tf.data.Dataset.from_tensor_slices(data).batch(128), epochs=2, verbose=0)
    assert len(history.history["nll"]) == 2
    history = model.fit(data, validation_split=0.25, epochs=2, batch_size=128, verbose=0)
    assert "val_nll" in history.history and "val_bits_per_dim" in history.history


class _RecordingModel(FlowModel):
    """Records the batches `fit` gives the step (compiled with run_eagerly)."""

    def train_step(self, data):
        self.batches.append(tuple(t.numpy() for t in data))
        return super().train_step(data)


@pytest.mark.parametrize("rows, batch", [(96, 32), (100, 32)])
def test_fit_visits_every_row_once_per_epoch_with_pairs_aligned(rows, batch):
    """fit's batches: equal size, no row twice in an epoch (the remainder of a shuffled
    epoch is dropped), a new order each epoch, context rows staying with their x rows."""
    x = np.random.default_rng(0).normal(size=(rows, 2)).astype(np.float32)
    context = 2.0 * x[:, :1] + 1.0
    model = _RecordingModel(flows.radial_flow(2, 2, seed=0, context_size=1), event_shape=[2],
                            context_shape=[1])
    model.batches = []
    model.compile(learning_rate=1e-3, jit_compile=False, run_eagerly=True)
    model.fit(x, context=context, epochs=3, batch_size=batch, verbose=0)
    steps = rows // batch
    assert len(model.batches) == 3 * steps
    index = {row.tobytes(): i for i, row in enumerate(x)}
    orders = []
    for epoch in range(3):
        seen = model.batches[epoch * steps:(epoch + 1) * steps]
        assert all(xs.shape == (batch, 2) and cs.shape == (batch, 1) for xs, cs in seen)
        xs = np.concatenate([b[0] for b in seen])
        np.testing.assert_array_equal(np.concatenate([b[1] for b in seen]), 2.0 * xs[:, :1] + 1.0)
        order = [index[row.tobytes()] for row in xs]
        assert len(set(order)) == steps * batch  # no row twice
        orders.append(order)
    assert orders[0] != orders[1] != orders[2]
    if rows % batch == 0:  # every row, in a new order each epoch
        assert sorted(orders[0]) == list(range(rows))


def test_export_reloads_in_a_process_without_tfp(trained_mixed_model, tmp_path):
    model, _ = trained_mixed_model
    path = model.export(str(tmp_path / "saved"))
    x = toy("8gaussians", 8, seed=5)
    z = np.random.default_rng(0).standard_normal((8, 2)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "z.npy", z)
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        import tensorflow as tf
        loaded = tf.saved_model.load({path!r})
        x = np.load({str(tmp_path / 'x.npy')!r}); z = np.load({str(tmp_path / 'z.npy')!r})
        samples = loaded.sample(tf.constant(5, tf.int32)).numpy()
        print(json.dumps({{
            "log_prob": loaded.log_prob(x).numpy().tolist(),
            "forward": loaded.forward(z).numpy().tolist(),
            "inverse": loaded.inverse(x).numpy().tolist(),
            "sample_shape": list(samples.shape),
            "finite": bool(np.isfinite(samples).all()),
            "signatures": sorted(loaded.signatures),
            "imported": [m for m in ("tensorflow_probability", "tfp_flows") if m in sys.modules],
        }}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["imported"] == []
    assert out["sample_shape"] == [5, 2] and out["finite"]
    assert out["signatures"] == ["forward", "inverse", "log_prob", "sample"]
    np.testing.assert_allclose(out["log_prob"], model.log_prob(x).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["forward"], model.bijector.forward(z).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["inverse"], model.bijector.inverse(x).numpy(), rtol=1e-4, atol=1e-4)


@pytest.fixture
def small_model():
    """Without XLA: a skipped non-finite step under XLA is tested in test_keras_routes."""
    model = FlowModel(flows.planar_flow(2, 2, seed=0), event_shape=[2])
    model.compile(jit_compile=False)
    return model


@pytest.mark.parametrize("data, pattern", [
    (np.zeros((10, 3), np.float32), r"shape \[N, 2\].*given shape \[10, 3\]"),
    (np.zeros((10,), np.float32), r"shape \[N, 2\].*given shape \[10\]"),
    (np.array([[0.0, 1.0], [np.nan, 0.0]], np.float32), r"finite.*1 NaN/inf.*index \(1, 0\)"),
    (np.array([[0.0, np.inf]], np.float32), r"finite.*NaN/inf"),
    (np.array([["a", "b"]]), r"real numbers; given dtype <U1"),
])
def test_fit_refuses_bad_data_before_training(small_model, data, pattern):
    weights = [w.numpy() for w in small_model.trainable_variables]
    with pytest.raises((ValueError, TypeError), match=pattern):
        small_model.fit(data, epochs=1, verbose=0)
    for before, after in zip(weights, small_model.trainable_variables):
        np.testing.assert_array_equal(before, after.numpy())


def test_fit_refuses_bad_validation_data_and_labels(small_model):
    x = toy("moons", 64, seed=0)
    with pytest.raises(ValueError, match="validation_data must be finite"):
        small_model.fit(x, validation_data=np.full((4, 2), np.nan, np.float32), verbose=0)
    with pytest.raises(ValueError, match="data only"):
        small_model.fit(x, y=x, verbose=0)
    bad_dataset = tf.data.Dataset.from_tensor_slices(np.zeros((8, 3), np.float32)).batch(4)
    with pytest.raises(ValueError, match=r"shape \[batch, 2\]; given elements TensorSpec\(shape=\(None, 3\)"):
        small_model.fit(bad_dataset, verbose=0)
    nan_dataset = tf.data.Dataset.from_tensor_slices(np.full((8, 2), np.nan, np.float32)).batch(4)
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or inf"):
        small_model.fit(nan_dataset, verbose=0)
    for steps in (0, -3, 2.5, "7"):
        error = ValueError if isinstance(steps, int) else TypeError
        with pytest.raises(error, match=r"`steps_per_epoch` must be a positive integer; given "):
            small_model.fit(x, steps_per_epoch=steps, verbose=0)


def test_non_finite_loss_stops_training_and_keeps_finite_weights(small_model):
    far_away = np.full((64, 2), 1e30, np.float32)
    with pytest.raises(FloatingPointError, match="training NLL became inf"):
        small_model.fit(far_away, epochs=3, batch_size=32, verbose=0)
    assert all(np.isfinite(v.numpy()).all() for v in small_model.trainable_variables)


def test_untracked_or_missing_variables_raise_instead_of_training_nothing():
    constant = FlowModel(Planar(np.ones(2, np.float32), np.ones(2, np.float32), 0.0), [2])
    constant.compile()
    with pytest.raises(RuntimeError, match="no trainable variables"):
        constant.fit(np.zeros((8, 2), np.float32), verbose=0)


def test_keras3_network_inside_the_bijector_is_detected():
    keras = pytest.importorskip("keras")
    if not keras.__version__.startswith("3"):
        pytest.skip("needs Keras 3 to reproduce the trap")
    dense = keras.layers.Dense(2)

    class Keras3Shift(tfb.Bijector):
        def __init__(self):
            super().__init__(forward_min_event_ndims=1, is_constant_jacobian=True)
            self.network = dense

        def _forward(self, z):
            return z + self.network(tf.ones_like(z))

        def _inverse(self, x):
            return x - self.network(tf.ones_like(x))

        def _forward_log_det_jacobian(self, z):
            return tf.zeros([], z.dtype)

    model = FlowModel(Keras3Shift(), [2])
    model.compile()
    with pytest.raises(TypeError, match="Keras 3"):
        model.fit(np.zeros((8, 2), np.float32), verbose=0)
    with pytest.raises(TypeError, match="tf_keras"):
        FlowModel(flows.planar_flow(2, 1), [2]).compile(optimizer=keras.optimizers.Adam())


def test_constructor_checks_bijector_and_base_shapes():
    with pytest.raises(TypeError, match="Bijector"):
        FlowModel("planar", [2])
    with pytest.raises(ValueError, match=r"event shape \[3\]; expected .* \[2\]"):
        FlowModel(flows.planar_flow(2, 1), [2],
                  base_distribution=tfd.MultivariateNormalDiag(tf.zeros(3)))


def _call_options() -> bytes:
    from tensorflow.python.eager import context
    return context.context().function_call_options.config_proto_serialized


def test_light_grappler_drops_the_library_passes_keeps_the_rest_and_restores():
    from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
    before = _call_options()
    with pytest.raises(RuntimeError, match="inside"):
        with training.light_grappler():
            inside = config_pb2.ConfigProto.FromString(_call_options())
            raise RuntimeError("inside")
    assert _call_options() == before
    expected = config_pb2.ConfigProto.FromString(before)
    rewrites = expected.graph_options.rewrite_options
    assert not rewrites.disable_tfg_optimizer and not rewrites.disable_meta_optimizer
    rewrites.function_optimization = rewriter_config_pb2.RewriterConfig.OFF
    rewrites.disable_tfg_optimizer = True
    assert inside == expected


@pytest.mark.parametrize("jit_compile, strategy", [(True, False), (False, False), (True, True)])
def test_the_epoch_function_runs_a_light_grappler_under_xla_with_the_same_steps(
        jit_compile, strategy, monkeypatch):
    """Under XLA on one device each epoch's call runs Grappler without its library passes
    (not without XLA, nor under a strategy); the weights equal those of a full Grappler."""
    x = toy("8gaussians", 512, seed=0)
    weights, calls = [], []

    def counted():
        calls.append(1)
        return training.light_grappler()

    for options in (counted, contextlib.nullcontext):
        monkeypatch.setattr(model_module, "light_grappler", options)
        tf_keras.utils.set_random_seed(0)
        scope = (tf.distribute.OneDeviceStrategy("/cpu:0").scope() if strategy
                 else contextlib.nullcontext())
        with scope:
            flow = tfb.Chain([flows.planar_flow(2, 4, seed=0), flows.maf(2, 2, [16, 16], seed=1)])
            model = FlowModel(flow, event_shape=[2])
            model.compile(learning_rate=1e-2, jit_compile=jit_compile)
        before = _call_options()
        model.fit(x, epochs=3, batch_size=128, verbose=0)
        assert _call_options() == before
        weights.append(model.get_weights())
    assert len(calls) == (3 if jit_compile and not strategy else 0)
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("epoch_steps, per_call", [
    (None, 1), (1, 1), (8, 8), (1000, 1000), (1001, 1001), (1500, 1500), (2500, 1250),
    (3000, 1000), (1009, 1009), (2 * 1009, 1009), (1_000_003, 1_000_003),
])
def test_steps_per_call_divide_the_epoch(epoch_steps, per_call):
    """`steps_per_execution="epoch"`: the whole epoch up to 1000 steps, past it the
    smallest divisor of the epoch's steps from 1000 up (so no call crosses an epoch's end)."""
    assert steps_per_execution_for(epoch_steps) == per_call
    if epoch_steps is not None:
        assert epoch_steps % per_call == 0
        assert per_call >= min(epoch_steps, 1000)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_all_finite_checks_every_entry_of_every_tensor(jit_compile):
    """The step's skip test: false for one NaN or inf anywhere (any shape, any position
    in the list); a float64 tensor is checked as float64 (1e300 is finite there,
    and would be inf as float32)."""
    check = tf.function(training.all_finite, jit_compile=jit_compile)

    def tensors(dtype=np.float32):
        return [np.array(1.5, np.float32), np.ones([3, 4], np.float32), np.zeros([5], dtype),
                np.full([2, 2, 2], -2.0, np.float32)]

    assert bool(check([tf.constant(t) for t in tensors()]))
    for position in range(4):
        for bad in (np.nan, np.inf, -np.inf):
            ts = tensors()
            ts[position].reshape(-1)[-1] = bad
            assert not bool(check([tf.constant(t) for t in ts])), (position, bad)
    mixed = tensors(np.float64)
    mixed[2][1] = 1e300
    assert bool(check([tf.constant(t) for t in mixed]))
    mixed[2][0] = np.nan
    assert not bool(check([tf.constant(t) for t in mixed]))
