"""tfp_flows.keras3: the flows of tfp_flows.definitions trained with Keras 3.

Same densities as the tf_keras path for equal weights (every builder, float64),
training lowers the NLL, every Keras 3 save route and callback works, non-finite
steps change nothing, tf_keras objects are refused with the right import named.
"""
import csv
import inspect
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

import tfp_flows
from tfp_flows import flows as tf_flows
from tfp_flows.datasets import digits, toy
from tfp_flows.keras3 import Chain, FlowLayer, FlowModel
from tfp_flows.keras3 import flows

tfb, tfd = tfp.bijectors, tfp.distributions
BUILDERS = ["planar_flow", "radial_flow", "maf", "iaf", "nice", "realnvp", "glow"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small(builder, dtype=tf.float32, context_size=None, front=flows):
    """A tiny flow of `builder` from `front` (tfp_flows.keras3.flows or tfp_flows.flows)."""
    kw = dict(seed=3, dtype=dtype, context_size=context_size)
    if builder in ("planar_flow", "radial_flow"):
        return getattr(front, builder)(2, 3, context_hidden_units=[8], **kw)
    if builder in ("maf", "iaf"):
        return getattr(front, builder)(2, 2, hidden_units=[8, 8], **kw)
    if builder in ("nice", "realnvp"):
        return getattr(front, builder)(2, 2, hidden_units=[8, 8], **kw)
    return front.glow([4, 4, 1], levels=2, steps_per_level=1, hidden_channels=4, **kw)


def event_shape(builder):
    return [4, 4, 1] if builder == "glow" else [2]


def run_python(code: str) -> str:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


# --- the builders ---------------------------------------------------------------------


@pytest.mark.parametrize("builder", BUILDERS)
def test_builders_have_the_definitions_names_arguments_and_docstrings(builder):
    mine, theirs = getattr(flows, builder), getattr(tf_flows, builder)
    assert mine.__name__ == theirs.__name__ == builder
    assert mine.__doc__ == theirs.__doc__ and mine.__doc__
    assert list(inspect.signature(mine).parameters) == list(inspect.signature(theirs).parameters)


def test_layer_variables_follow_the_definition():
    layer = small("glow", tf.float64)
    definition = layer.definition
    assert [v.name for v in layer.weights if v.trainable] == [
        p.name for p in definition.parameters if p.trainable]
    assert [v.name for v in layer.non_trainable_weights] == ["initialized"]
    for p in definition.parameters:
        value = keras.ops.convert_to_numpy(layer.parameter_variables[p.name])
        assert value.dtype == np.float64
        np.testing.assert_array_equal(value, p.initial)
    rebuilt = FlowLayer.from_config(layer.get_config())
    assert rebuilt.definition.arguments == definition.arguments and rebuilt.name == layer.name


def _random_tf_keras_flow(builder, dtype, context_size, rng):
    flow = small(builder, dtype, context_size, front=tf_flows)
    for name, variable in flow.parameter_variables.items():
        value = variable.numpy()
        if variable.trainable:
            value = value + 0.3 * rng.standard_normal(value.shape)
        else:
            value = np.ones_like(value)
        variable.assign(value.astype(dtype.as_numpy_dtype))
    return flow


@pytest.mark.parametrize("context_size", [None, 3])
@pytest.mark.parametrize("builder", BUILDERS)
def test_log_prob_equals_the_tf_keras_path_for_the_same_weights(builder, context_size):
    rng = np.random.default_rng(0)
    theirs = _random_tf_keras_flow(builder, tf.float64, context_size, rng)
    mine = small(builder, tf.float64, context_size)
    for name, variable in mine.parameter_variables.items():
        variable.assign(theirs.parameter_variables[name].numpy())
    shape = event_shape(builder)
    context_shape = None if context_size is None else [context_size]
    x = rng.standard_normal((16, *shape))
    if builder == "glow":
        x = rng.uniform(0.05, 0.95, (16, *shape))
    c = None if context_size is None else rng.standard_normal((16, context_size))
    ours = FlowModel(mine, shape, context_shape=context_shape).log_prob(x, context=c).numpy()
    reference = tfp_flows.FlowModel(theirs, shape, context_shape=context_shape)
    expected = reference.log_prob(x, context=c).numpy()
    assert np.all(np.isfinite(expected)) and np.std(expected) > 1e-3
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-9)


# --- training -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eight_gaussians():
    return toy("8gaussians", 1024, seed=0)


@pytest.mark.parametrize("builder", [b for b in BUILDERS if b != "glow"])
def test_fit_lowers_the_nll_on_8gaussians(builder, eight_gaussians):
    keras.utils.set_random_seed(0)
    model = FlowModel(small(builder), [2])
    model.compile(learning_rate=2e-2, jit_compile=False)  # XLA: the fixtures below
    history = model.fit(eight_gaussians, epochs=3, batch_size=128, verbose=0).history
    assert history["nll"][-1] < history["nll"][0] - 0.2, history["nll"]
    assert history["loss"] == history["nll"]
    np.testing.assert_allclose(history["bits_per_dim"], np.array(history["nll"]) / (2 * np.log(2)),
                               rtol=1e-6)


def test_glow_on_the_digits_initialises_actnorm_and_lowers_the_nll():
    keras.utils.set_random_seed(0)
    x = digits("train")
    logit = tfb.Chain([tfb.Invert(tfb.Sigmoid()), tfb.Shift(0.05), tfb.Scale(0.9)])
    glow = flows.glow([8, 8, 1], levels=1, steps_per_level=2, hidden_channels=8, seed=0)
    model = FlowModel(Chain([logit, glow]), [8, 8, 1])
    model.compile(learning_rate=1e-3, jit_compile=False)  # XLA: the `trained` fixture
    before = -float(np.mean(model.log_prob(x[:256]).numpy()))
    history = model.fit(x, epochs=2, batch_size=64, verbose=0).history
    after = -float(np.mean(model.log_prob(x[:256]).numpy()))
    assert not glow.needs_initialization
    act_norm = keras.ops.convert_to_numpy(glow.parameter_variables["act_norm_0_0"])
    assert np.abs(act_norm).max() > 0.1  # set from the first batch
    assert history["nll"][-1] < history["nll"][0] and after < before - 10, (before, after)


@pytest.fixture(scope="module")
def conditional_model():
    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(1)
    c = rng.standard_normal((1024, 2)).astype(np.float32)
    x = (c * np.array([2.0, -1.0], np.float32) + 0.3 * rng.standard_normal((1024, 2))).astype(
        np.float32)
    model = FlowModel([flows.realnvp(2, 2, hidden_units=[16], context_size=2, seed=0),
                       tfb.Shift(np.float32(0.5))], [2], context_shape=[2])
    model.compile(learning_rate=2e-2, jit_compile=False)
    history = model.fit(x, context=c, epochs=3, batch_size=128, verbose=0).history
    return model, history, x, c


def test_conditional_fit_dataset_and_sample_shapes(conditional_model):
    model, history, x, c = conditional_model
    assert history["nll"][-1] < history["nll"][0] - 0.2
    data = tf.data.Dataset.from_tensor_slices((x, c)).batch(128)
    more = model.fit(data, validation_data=(x[:100], c[:100]), epochs=1, verbose=0).history
    assert set(more) >= {"loss", "nll", "bits_per_dim", "val_loss", "val_nll", "val_bits_per_dim"}
    assert model.sample(5, context=c[0], seed=1).shape == (5, 2)
    assert model.sample(5, context=c[:3], seed=1).shape == (5, 3, 2)
    # log p(x | c) depends on c: the true shift for c differs from a wrong one.
    right = model.log_prob(x[:200], context=c[:200]).numpy().mean()
    wrong = model.log_prob(x[:200], context=-c[:200]).numpy().mean()
    assert right > wrong + 1.0
    with pytest.raises(ValueError, match="context"):
        model.log_prob(x[:5])
    with pytest.raises(ValueError, match="one row per example"):
        model.log_prob(x[:5], context=c[:4])


def test_float64_model_trains_in_float64(eight_gaussians):
    model = FlowModel(flows.maf(2, 2, hidden_units=[8], dtype=tf.float64, seed=0), [2])
    model.compile(learning_rate=2e-2, jit_compile=False)
    history = model.fit(eight_gaussians.astype(np.float64), epochs=2, batch_size=256,
                        verbose=0).history
    assert history["nll"][-1] < history["nll"][0]
    assert model.log_prob(eight_gaussians[:4]).dtype == tf.float64
    assert all(v.dtype == "float64" for v in model.weights)


@pytest.fixture(scope="module")
def trained(eight_gaussians):
    keras.utils.set_random_seed(0)
    flow = Chain([flows.radial_flow(2, 3, seed=0), tfb.Shift([0.5, -0.5]),
                  flows.maf(2, 2, hidden_units=[8], seed=1)])
    model = FlowModel(flow, [2])
    model.compile(learning_rate=1e-2)
    model.fit(eight_gaussians, epochs=2, batch_size=256, verbose=0)
    assert model.jit_compile
    return model


def test_chain_with_a_fixed_bijector_is_the_tfb_chain(trained, eight_gaussians):
    flow = trained.flow
    bijector = tfb.Chain([flow.parts[0].bijector(), tfb.Shift([0.5, -0.5]),
                          flow.parts[2].bijector()])
    expected = tfd.TransformedDistribution(trained.base_distribution, bijector).log_prob(
        eight_gaussians[:64])
    np.testing.assert_array_equal(trained.log_prob(eight_gaussians[:64]).numpy(), expected.numpy())


def _weights(model):
    return [keras.ops.convert_to_numpy(v).copy() for v in model.weights]


def test_non_finite_steps_change_nothing(trained):
    """Points at 1e20 make the NLL inf: the steps are skipped and fit raises."""
    weights = _weights(trained)
    slots = [keras.ops.convert_to_numpy(v).copy() for v in trained.optimizer.variables]
    iterations = int(trained.optimizer.iterations.numpy())
    with pytest.raises(FloatingPointError, match="NLL became"):
        trained.fit(np.full((1024, 2), 1e20, np.float32), epochs=1, batch_size=256, verbose=0)
    assert int(trained.optimizer.iterations.numpy()) == iterations
    for before, after in zip(weights, _weights(trained)):
        np.testing.assert_array_equal(before, after)
    for before, v in zip(slots, trained.optimizer.variables):
        np.testing.assert_array_equal(before, keras.ops.convert_to_numpy(v))


def test_large_models_split_the_step_under_xla():
    """The rule: 100 000 trainable parameters or more, XLA, no strategy, our train_step."""
    large = FlowModel(flows.maf(8, 5, [256, 256], seed=0), [8])
    large.compile()
    small = FlowModel(flows.maf(8, 5, [64, 64], seed=0), [8])
    small.compile()
    assert large._splits_step() and not small._splits_step()
    large.compile(jit_compile=False)
    assert not large._splits_step()


def test_non_finite_validation_stops_with_a_warning(eight_gaussians):
    model = FlowModel(flows.nice(2, 2, hidden_units=[8], seed=0), [2])
    model.compile(learning_rate=1e-2, jit_compile=False)
    bad = np.full((64, 2), 1e20, np.float32)
    with pytest.warns(RuntimeWarning, match="validation NLL"):
        history = model.fit(eight_gaussians, validation_data=bad, epochs=3, batch_size=256,
                            verbose=0, patience=2)
    assert len(history.history["loss"]) == 1 and not np.isfinite(history.history["val_nll"][0])


@pytest.mark.parametrize("data, pattern", [
    (np.zeros((10, 3), np.float32), "shape"),
    (np.array([[0.0, np.nan]] * 4, np.float32), "finite"),
    (np.zeros((4, 2), bool), "real numbers"),
])
def test_bad_data_is_refused_before_training(trained, data, pattern):
    iterations = int(trained.optimizer.iterations.numpy())
    with pytest.raises((ValueError, TypeError), match=pattern):
        trained.fit(data, verbose=0)
    assert int(trained.optimizer.iterations.numpy()) == iterations


def test_bad_arguments_are_refused(trained, eight_gaussians):
    with pytest.raises(ValueError, match="`y`"):
        trained.fit(eight_gaussians, y=eight_gaussians, verbose=0)
    with pytest.raises(ValueError, match="single tensors"):
        trained.fit(tf.data.Dataset.from_tensor_slices((eight_gaussians, eight_gaussians)).batch(8),
                    verbose=0)
    model = FlowModel(flows.nice(2, 2, hidden_units=[8]), [2])
    for rate in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="learning_rate"):
            model.compile(learning_rate=rate)
    with pytest.raises(ValueError, match="loss"):
        model.compile(loss="mse")
    with pytest.raises(ValueError, match="event shape"):
        FlowModel(flows.nice(2, 2), [2], base_distribution=tfd.MultivariateNormalDiag(tf.zeros(3)))
    with pytest.raises(ValueError, match="context_shape"):
        FlowModel(flows.nice(2, 2, context_size=2), [2])


# --- tf_keras objects meet the Keras 3 path -----------------------------------------------


def test_tf_keras_objects_are_refused_naming_the_keras3_import():
    model = FlowModel(flows.nice(2, 2, hidden_units=[8]), [2])
    with pytest.raises(TypeError, match=r"keras\.optimizers\.Adam"):
        model.compile(optimizer=tf_keras.optimizers.Adam())
    model.compile()
    with pytest.raises(TypeError, match=r"keras\.callbacks"):
        model.fit(np.zeros((8, 2), np.float32), callbacks=[tf_keras.callbacks.History()], verbose=0)
    schedule = tf_keras.optimizers.schedules.ExponentialDecay(1e-3, 10, 0.5)
    optimizer = keras.optimizers.Adam()
    optimizer._learning_rate = schedule  # as a Keras 3 optimizer would hold a schedule
    with pytest.raises(TypeError, match=r"keras\.optimizers\.schedules"):
        model.compile(optimizer=optimizer)
    with pytest.raises(TypeError, match=r"tfp_flows\.keras3\.flows\.maf"):
        FlowModel(tf_flows.maf(2, 2), [2])
    with pytest.raises(TypeError, match=r"tfp_flows\.keras3\.flows\.realnvp"):
        Chain([tf_flows.realnvp(2, 2)])
    with pytest.raises(TypeError, match="tf_keras"):
        Chain([tf_keras.layers.Dense(2)])
    network = tfb.AutoregressiveNetwork(params=2, hidden_units=[4])
    with pytest.raises(TypeError, match="tf_keras"):
        Chain([flows.nice(2, 2), tfb.MaskedAutoregressiveFlow(network)])
    with pytest.raises(TypeError, match="tf.Variable"):
        Chain([flows.nice(2, 2), tfb.Shift(tf.Variable([0.0, 0.0]))])
    # The tf_keras FlowModel refuses Keras 3 objects the other way round.
    reference = tfp_flows.FlowModel(tf_flows.nice(2, 2), [2])
    with pytest.raises(TypeError, match=r"tfp_flows\.keras3"):
        reference.compile(optimizer=keras.optimizers.Adam())


# --- Keras 3 habits -----------------------------------------------------------------------


def test_callbacks_with_default_monitors(eight_gaussians, tmp_path):
    model = FlowModel(flows.realnvp(2, 2, hidden_units=[8], seed=0), [2])
    model.compile(learning_rate=1e-2, jit_compile=False)
    callbacks = [
        keras.callbacks.EarlyStopping(patience=5),
        keras.callbacks.ModelCheckpoint(str(tmp_path / "best.keras")),
        keras.callbacks.ModelCheckpoint(str(tmp_path / "best.weights.h5"), save_weights_only=True),
        keras.callbacks.TensorBoard(str(tmp_path / "tb")),
        keras.callbacks.CSVLogger(str(tmp_path / "log.csv")),
        keras.callbacks.ReduceLROnPlateau(patience=0, factor=0.5, min_delta=10.0),
    ]
    history = model.fit(eight_gaussians, epochs=3, batch_size=128, validation_split=0.25,
                        callbacks=callbacks, verbose=0).history
    assert len(history["loss"]) == 3
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and {"nll", "val_nll", "bits_per_dim", "val_loss"} <= set(rows[0])
    np.testing.assert_allclose([float(r["val_nll"]) for r in rows], history["val_nll"], rtol=1e-6)
    # min_delta=10 nats is never reached: after the first epoch (which sets the best), the
    # rate halves at the end of every epoch; the logs hold the rate the epoch ran with.
    np.testing.assert_allclose(history["learning_rate"], [1e-2, 1e-2, 5e-3], rtol=1e-6)
    np.testing.assert_allclose(float(model.optimizer.learning_rate.numpy()), 2.5e-3, rtol=1e-6)
    assert any(f.startswith("events") for _, _, fs in os.walk(tmp_path / "tb") for f in fs)
    x = eight_gaussians[:32]
    reloaded = keras.models.load_model(tmp_path / "best.keras")
    np.testing.assert_array_equal(reloaded.log_prob(x).numpy(), model.log_prob(x).numpy())
    fresh = FlowModel(flows.realnvp(2, 2, hidden_units=[8], seed=5), [2])
    fresh.load_weights(tmp_path / "best.weights.h5")
    np.testing.assert_array_equal(fresh.log_prob(x).numpy(), model.log_prob(x).numpy())


def test_learning_rate_schedule_and_other_optimizers(eight_gaussians):
    schedule = keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=4, decay_rate=0.5)
    model = FlowModel(flows.nice(2, 2, hidden_units=[8], seed=0), [2])
    model.compile(optimizer=keras.optimizers.Adam(schedule), jit_compile=False)
    model.fit(eight_gaussians, epochs=1, batch_size=128, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 8
    np.testing.assert_allclose(float(model.optimizer.learning_rate.numpy()), 1e-2 * 0.5**2,
                               rtol=1e-6)
    sgd = FlowModel(flows.nice(2, 2, hidden_units=[8], seed=0), [2])
    sgd.compile(optimizer=keras.optimizers.SGD(1e-2), jit_compile=False)
    sgd.fit(eight_gaussians, epochs=1, batch_size=128, verbose=0)
    assert int(sgd.optimizer.iterations.numpy()) == 8


@pytest.fixture(scope="module")
def saved(trained, eight_gaussians, tmp_path_factory) -> dict:
    """`trained` saved as `.keras` and exported, with the points and log-densities to check."""
    folder = tmp_path_factory.mktemp("saved")
    x = eight_gaussians[:64]
    paths = {name: str(folder / name) for name in ("m.keras", "saved", "x.npy", "expected.npy",
                                                    "reloaded.npy")}
    np.save(paths["x.npy"], x)
    np.save(paths["expected.npy"], trained.log_prob(x).numpy())
    trained.save(paths["m.keras"])
    trained.export(paths["saved"])
    return paths


def test_save_load_and_summary(trained, saved):
    x, expected = np.load(saved["x.npy"]), np.load(saved["expected.npy"])
    loaded = keras.models.load_model(saved["m.keras"])
    np.testing.assert_array_equal(loaded.log_prob(x).numpy(), expected)
    assert isinstance(loaded.optimizer, keras.optimizers.Adam)
    assert int(loaded.optimizer.iterations.numpy()) == int(trained.optimizer.iterations.numpy())
    for saved_variable, restored in zip(trained.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(saved_variable),
                                      keras.ops.convert_to_numpy(restored))
    lines = []
    trained.summary(print_fn=lambda line, **kw: lines.append(line))
    text = "\n".join(lines)
    assert "chain (Chain)" in text
    assert f"{trained.count_params():,}" in text


@pytest.fixture(scope="module")
def fresh_process(saved) -> dict:
    """One fresh process (two logical CPUs, set before TensorFlow starts) for what must
    run outside this one. First plain TensorFlow loads the export, with neither TFP nor
    tfp_flows imported; then tfp_flows.keras3 is imported and the `.keras` file reloads
    (its log-densities written to `reloaded.npy`); last, the same model is trained on
    two replicas of a MirroredStrategy and on one device."""
    return json.loads(run_python(f"""
        import json, sys
        import numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        out = {{}}
        loaded = tf.saved_model.load({saved["saved"]!r})
        x = np.load({saved["x.npy"]!r})
        out["export_log_prob"] = loaded.log_prob(x).numpy().tolist()
        out["round_trip"] = loaded.forward(loaded.inverse(x)).numpy().tolist()
        out["sample_shape"] = list(loaded.sample(tf.constant(7)).shape)
        out["imported"] = [m for m in sys.modules
                           if m.startswith(("tensorflow_probability", "tfp_flows"))]
        import keras
        import tfp_flows.keras3
        np.save({saved["reloaded.npy"]!r},
                keras.models.load_model({saved["m.keras"]!r}).log_prob(x).numpy())

        from tfp_flows.keras3 import FlowModel, flows
        from tfp_flows.datasets import toy
        x = toy("8gaussians", 512, seed=0)

        def run(strategy):
            with strategy.scope():
                model = FlowModel(flows.realnvp(2, 2, hidden_units=[8], seed=0), [2])
                model.compile(learning_rate=1e-2, jit_compile=False)
            history = model.fit(x, epochs=2, batch_size=128, shuffle=False, verbose=0).history
            return history["loss"], model.log_prob(x).numpy().tolist(), model

        mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        loss2, lp2, model2 = run(mirrored)
        loss1, lp1, _ = run(tf.distribute.get_strategy())
        out["mirrored"] = {{"replicas": model2.distribute_strategy.num_replicas_in_sync,
                           "iterations": int(model2.optimizer.iterations.numpy()),
                           "loss2": loss2, "loss1": loss1, "lp2": lp2, "lp1": lp1}}
        print(json.dumps(out))
    """).strip().splitlines()[-1])


def test_export_and_keras_file_reload_in_a_fresh_process(saved, fresh_process):
    x, expected = np.load(saved["x.npy"]), np.load(saved["expected.npy"])
    assert fresh_process["imported"] == []
    np.testing.assert_allclose(fresh_process["export_log_prob"], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fresh_process["round_trip"], x, atol=1e-4)
    assert fresh_process["sample_shape"] == [7, 2]
    np.testing.assert_array_equal(np.load(saved["reloaded.npy"]), expected)


def test_conditional_export_and_keras_round_trip(conditional_model, tmp_path):
    model, _, x, c = conditional_model
    expected = model.log_prob(x[:32], context=c[:32]).numpy()
    model.save(tmp_path / "c.keras")
    loaded = keras.models.load_model(tmp_path / "c.keras")
    np.testing.assert_array_equal(loaded.log_prob(x[:32], context=c[:32]).numpy(), expected)
    model.export(str(tmp_path / "saved"))
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    np.testing.assert_allclose(loaded.log_prob(x[:32], c[:32]).numpy(), expected, rtol=1e-5,
                               atol=1e-5)
    assert loaded.sample(tf.constant(4), c[:3]).shape == (4, 3, 2)


def test_mirrored_strategy_on_two_cpus_matches_one_device(fresh_process):
    out = fresh_process["mirrored"]
    assert out["replicas"] == 2 and out["iterations"] == 8
    np.testing.assert_allclose(out["loss2"], out["loss1"], rtol=1e-5)
    np.testing.assert_allclose(out["lp2"], out["lp1"], rtol=1e-5, atol=1e-5)
    assert out["loss2"][-1] < out["loss2"][0]


def _iterations_at_epoch_ends(front: str):
    """A callback of `front`'s Keras that records the optimizer's step count at each epoch's end."""
    base = keras.callbacks.Callback if front == "keras3" else tf_keras.callbacks.Callback

    class IterationsAtEpochEnds(base):
        def on_train_begin(self, logs=None):
            self.seen = []

        def on_epoch_end(self, epoch, logs=None):
            self.seen.append(int(np.asarray(self.model.optimizer.iterations)))

    return IterationsAtEpochEnds()


@pytest.mark.parametrize("front", ["keras3", "tf_keras"])
@pytest.mark.parametrize("rows, steps_per_epoch, steps_per_execution, per_call", [
    (320, None, "epoch", 10),  # an epoch is one pass: one call
    (320, 7, "epoch", 7),  # the caller's epochs of the endless stream of passes
    (320, 7, 7, 7),
    (64, 2500, "epoch", 1250),  # past 1000 steps: equal calls that end with the epoch
])
def test_every_epoch_runs_exactly_its_steps(front, rows, steps_per_epoch, steps_per_execution,
                                            per_call):
    x = toy("8gaussians", rows, seed=1)
    if front == "keras3":
        model = FlowModel(flows.planar_flow(2, 2, seed=0), [2])
    else:
        model = tfp_flows.FlowModel(tf_flows.planar_flow(2, 2, seed=0), [2])
    model.compile(steps_per_execution=steps_per_execution)
    counter = _iterations_at_epoch_ends(front)
    kwargs = {} if steps_per_epoch is None else {"steps_per_epoch": steps_per_epoch}
    history = model.fit(x, epochs=2, batch_size=32, verbose=0, callbacks=[counter], **kwargs)
    steps = steps_per_epoch or rows // 32
    assert counter.seen == [steps, 2 * steps]
    assert len(history.history["loss"]) == 2 and np.all(np.isfinite(history.history["loss"]))
    calls = (model.steps_per_execution if front == "keras3"
             else int(model._steps_per_execution.numpy()))
    assert calls == per_call


def test_tf_keras_runs_a_last_shorter_call_and_keras3_refuses_one():
    """tf_keras shortens an epoch's last call itself; Keras 3 would run it whole into the
    next epoch, so a `steps_per_execution` that does not divide the epoch is refused."""
    x = toy("8gaussians", 320, seed=1)
    model = tfp_flows.FlowModel(tf_flows.planar_flow(2, 2, seed=0), [2])
    model.compile(steps_per_execution=3)
    model.fit(x, epochs=2, batch_size=32, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 20
    model = FlowModel(flows.planar_flow(2, 2, seed=0), [2])
    model.compile(steps_per_execution=3)
    before = [np.array(w) for w in model.get_weights()]
    with pytest.raises(ValueError, match=r"`steps_per_execution` must divide the 10 steps.*given 3"):
        model.fit(x, epochs=2, batch_size=32, verbose=0)
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)
