"""Keras' names and callbacks, skipped steps, learning rates, divergence, Keras 3 objects
(issue 9, items 2, 3 and 5)."""
import re
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

from tfp_flows import FlowModel, flows, keras3
from tfp_flows.model import DivergenceWarning, divergence_threshold

tfb = tfp.bijectors


def gaussian(rows: int, mean: float, scale: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (mean + scale * rng.standard_normal((rows, 2))).astype(np.float32)


def shift_model() -> FlowModel:
    """`x = z + shift` (a learnable mean) after a planar layer: the mean moves by ~lr per step."""
    return FlowModel(tfb.Chain([tfb.Shift(tf.Variable([0.0, 0.0])),
                                flows.planar_flow(2, 1, seed=0)]), event_shape=[2])


def weights(model) -> list:
    return [w.numpy() for w in model.weights]


# --- item 2: Keras' names, default monitors ---------------------------------------------


@pytest.fixture(scope="module")
def rising_validation():
    """Train on N(3, 1), validate on N(0, 1): the model leaves the validation data, so
    `val_loss` rises every epoch (model starts at N(0, 1))."""
    return gaussian(256, 3.0, 1.0, seed=0), gaussian(64, 0.0, 1.0, seed=1)


def test_logs_carry_loss_and_val_loss_beside_nll_and_bits_per_dim(rising_validation):
    train, validation = rising_validation
    model = shift_model()
    model.compile(learning_rate=0.1, jit_compile=False)
    history = model.fit(train, validation_data=validation, epochs=2, batch_size=64, verbose=0)
    logs = history.history
    assert set(logs) == {"loss", "nll", "bits_per_dim", "val_loss", "val_nll", "val_bits_per_dim"}
    assert logs["loss"] == logs["nll"] and logs["val_loss"] == logs["val_nll"]
    np.testing.assert_allclose(logs["bits_per_dim"], np.array(logs["nll"]) / (2 * np.log(2)),
                               rtol=1e-6)
    np.testing.assert_allclose(logs["val_loss"][-1],
                               -model.log_prob(validation).numpy().mean(), rtol=1e-5)
    assert logs["val_loss"][1] > logs["val_loss"][0]  # the construction the next tests use


def test_default_callbacks_act_on_val_loss(rising_validation, tmp_path):
    train, validation = rising_validation
    model = shift_model()
    model.compile(learning_rate=0.1, jit_compile=False)
    after_epoch = []
    record = tf_keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: after_epoch.append(weights(model)))
    best = str(tmp_path / "best.weights.h5")
    history = model.fit(train, validation_data=validation, epochs=10, batch_size=64, verbose=0,
                        callbacks=[record,
                                   tf_keras.callbacks.ModelCheckpoint(best, save_best_only=True,
                                                                      save_weights_only=True),
                                   tf_keras.callbacks.ReduceLROnPlateau(patience=0),
                                   tf_keras.callbacks.EarlyStopping(patience=2)])
    # EarlyStopping (monitor val_loss): best at epoch 1, stops at the 2nd worse epoch.
    assert len(history.history["loss"]) == 3
    # ReduceLROnPlateau (monitor val_loss, factor 0.1) logs the rate, then cuts it after
    # epochs 2 and 3.
    np.testing.assert_allclose(history.history["lr"], [0.1, 0.1, 0.01], rtol=1e-6)
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(0.001, rel=1e-6)
    # ModelCheckpoint(save_best_only=True, monitor val_loss) kept epoch 1's weights.
    fresh = shift_model()
    fresh.load_weights(best)
    for loaded, expected in zip(weights(fresh), after_epoch[0]):
        np.testing.assert_array_equal(loaded, expected)
    assert not all(np.array_equal(a, b) for a, b in zip(after_epoch[0], after_epoch[-1]))


def test_early_stopping_default_patience_stops_at_the_first_rise(rising_validation):
    train, validation = rising_validation
    model = shift_model()
    model.compile(learning_rate=0.1, jit_compile=False)
    history = model.fit(train, validation_data=validation, epochs=10, batch_size=64, verbose=0,
                        callbacks=[tf_keras.callbacks.EarlyStopping()])
    assert len(history.history["loss"]) == 2


def _shrinking_scale_model() -> FlowModel:
    """`x = exp(log_scale)·z`, trained on N(0, 0.01²): `log_scale` falls by ~lr per step."""
    return FlowModel(tfb.Scale(log_scale=tf.Variable([0.0, 0.0])), event_shape=[2])


def _outlier_validation() -> np.ndarray:
    """Ordinary points and one at 1e18: its NLL 0.5·(1e18/scale)² stays finite in float32
    while scale > 0.054 and overflows to inf below, so `val_nll` becomes inf mid-training."""
    validation = gaussian(8, 0.0, 0.01, seed=2)
    validation[0] = [1e18, 0.0]
    return validation


@pytest.mark.parametrize("patience", [None, 10])
def test_infinite_val_nll_ends_training_gracefully(patience):
    train = gaussian(128, 0.0, 0.01, seed=3)
    model = _shrinking_scale_model()
    model.compile(learning_rate=0.3, jit_compile=False)
    after_epoch = []
    record = tf_keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: after_epoch.append(weights(model)))
    with pytest.warns(RuntimeWarning, match="validation NLL became inf") as caught:
        history = model.fit(train, validation_data=_outlier_validation(), epochs=20,
                            batch_size=32, verbose=0, callbacks=[record], patience=patience)
    val = history.history["val_nll"]
    assert len(val) < 20 and np.isinf(val[-1]) and np.isfinite(val[:-1]).all() and len(val) > 1
    message = str([w for w in caught if w.category is RuntimeWarning][0].message)
    if patience is None:
        for now, last in zip(weights(model), after_epoch[-1]):
            np.testing.assert_array_equal(now, last)
        assert "restored" not in message
    else:
        # The outlier dominates val_nll, which rises from the first epoch: epoch 1 is best.
        assert int(np.argmin(val)) == 0 and "best epoch (1)" in message
        for now, best in zip(weights(model), after_epoch[0]):
            np.testing.assert_array_equal(now, best)
    assert np.isfinite(model.log_prob(_outlier_validation()).numpy()).all() == (patience is not None)


# --- item 3: skipped steps, learning rates, divergence -------------------------------------


def _batches(*arrays) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices(np.concatenate(arrays)).batch(len(arrays[0]))


def _state(model) -> list:
    return [keras.ops.convert_to_numpy(v).copy()
            for v in list(model.weights) + list(model.optimizer.variables)]


@pytest.mark.parametrize("front", ["tf_keras", "keras3"])
@pytest.mark.parametrize("jit_compile, split", [(False, False), (True, False), (True, True)])
def test_a_non_finite_step_changes_nothing(front, jit_compile, split):
    """A batch whose log-density is -inf (a point at 1e20 overflows the base density)
    leaves the weights, Adam's slots and `iterations` bitwise as they were; the finite
    batches around it train exactly as they would without it. `split`: the step as two
    XLA programs, as `fit` runs it for models of 100 000 parameters and more (the
    threshold lowered here). Both front ends: `tfp_flows.FlowModel` and Keras 3's."""
    good_a, good_b = gaussian(32, 1.0, 0.5, seed=4), gaussian(32, 1.0, 0.5, seed=5)
    bad = gaussian(32, 1.0, 0.5, seed=6)
    bad[3] = [1e20, 0.0]
    model_class, front_flows = ((FlowModel, flows) if front == "tf_keras"
                                else (keras3.FlowModel, keras3.flows))
    model, reference = (model_class(front_flows.planar_flow(2, 2, seed=0), event_shape=[2])
                        for _ in range(2))
    for m in (model, reference):
        m.compile(learning_rate=1e-2, jit_compile=jit_compile)
        if split:
            m._SPLIT_STEP_MIN_PARAMETERS = 0
        assert m._splits_step() == split
        # Two steps: fit's own compiled loop (made by the first fit, kept by the rest).
        m.fit(good_a, epochs=1, batch_size=16, shuffle=False, verbose=0)
    assert not np.isfinite(model.log_prob(bad).numpy()).all()
    before = _state(model)
    with pytest.raises(FloatingPointError, match="not applied"):
        model.fit(_batches(bad), epochs=1, verbose=0)
    after = _state(model)
    assert len(after) == len(before) and int(model.optimizer.iterations.numpy()) == 2
    for a, b in zip(after, before):
        np.testing.assert_array_equal(a, b)
    # good, bad, good: exactly the two good steps are applied.
    with pytest.raises(FloatingPointError):
        model.fit(_batches(good_b, bad, good_a), epochs=1, verbose=0)
    reference.fit(_batches(good_b, good_a), epochs=1, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 4
    for a, b in zip(_state(model), _state(reference)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("rate", [0.0, -1e-3, float("nan"), float("inf"), -float("inf")])
def test_compile_refuses_bad_learning_rates(rate):
    model = FlowModel(flows.planar_flow(2, 1, seed=0), event_shape=[2])
    with pytest.raises(ValueError, match="learning_rate"):
        model.compile(learning_rate=rate)
    with pytest.raises(ValueError, match="learning_rate"):
        model.compile(optimizer=tf_keras.optimizers.Adam(learning_rate=rate))


def test_one_default_optimizer_class_whatever_the_arguments():
    classes = set()
    for kwargs in ({}, {"learning_rate": 1e-2}, {"jit_compile": False}):
        model = FlowModel(flows.planar_flow(2, 1, seed=0), event_shape=[2])
        model.compile(**kwargs)
        classes.add(type(model.optimizer))
    assert classes == {tf_keras.optimizers.Adam}


def test_divergence_threshold_rule():
    assert divergence_threshold(4.0) == 14.0        # max(10, 2) = 10
    assert divergence_threshold(100.0) == 150.0     # max(10, 50) = 50
    assert divergence_threshold(-60.0) == -30.0     # max(10, 30) = 30


def _shift_only(mean: float) -> tuple:
    model = FlowModel(tfb.Shift(tf.Variable([0.0, 0.0])), event_shape=[2])
    return model, gaussian(256, mean, 1.0, seed=7)


@pytest.mark.parametrize("mean", [1.0, 10.0])
def test_divergence_warns_at_the_first_epoch_past_the_threshold(mean):
    """SGD on `x = z + shift` with step 2.5 > 2 (the curvature is 1): the error is
    multiplied by -1.5 each step, so the NLL's excess grows ×2.25 per epoch, finite.
    Data at 1 (first NLL ≈ 2.3: the +10 branch), at 10 (≈ 52: the |first|/2 branch)."""
    model, x = _shift_only(mean)
    model.compile(optimizer=tf_keras.optimizers.SGD(learning_rate=2.5), jit_compile=False)
    with pytest.warns(DivergenceWarning) as caught:
        history = model.fit(x, epochs=8, batch_size=256, verbose=0)
    nll = history.history["nll"]
    assert np.isfinite(nll).all() and len(nll) == 8
    assert (0.5 * abs(nll[0]) > 10) == (mean == 10.0)
    first_past = next(i for i, v in enumerate(nll) if v > divergence_threshold(nll[0]))
    messages = [str(w.message) for w in caught if w.category is DivergenceWarning]
    assert len(messages) == 1 and f"epoch {first_past + 1} " in messages[0]
    assert model.diverged


@pytest.mark.parametrize("mean", [1.0, 10.0])
def test_a_healthy_run_does_not_warn(mean):
    model, x = _shift_only(mean)
    model.compile(optimizer=tf_keras.optimizers.SGD(learning_rate=0.5), jit_compile=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)
        history = model.fit(x, epochs=6, batch_size=256, verbose=0)
    assert history.history["nll"][-1] < history.history["nll"][0]
    assert not model.diverged


# --- item 5: Keras 3 objects ---------------------------------------------------------------


def _tf_keras_name(obj) -> str:
    """`keras.callbacks.EarlyStopping` -> `tf_keras.callbacks.EarlyStopping`."""
    public = {"callbacks": keras.callbacks, "optimizers.schedules": keras.optimizers.schedules,
              "optimizers": keras.optimizers, "metrics": keras.metrics}
    for path, module in public.items():
        if getattr(module, type(obj).__name__, None) is type(obj):
            return f"tf_keras.{path}.{type(obj).__name__}"
    raise AssertionError(type(obj))


KERAS3 = {
    "callback": lambda: keras.callbacks.EarlyStopping(),
    "schedule": lambda: keras.optimizers.schedules.ExponentialDecay(1e-2, 100, 0.9),
    "adam": lambda: keras.optimizers.Adam(),
    "sgd": lambda: keras.optimizers.SGD(),
    "metric": lambda: keras.metrics.Mean(),
}


@pytest.mark.parametrize("kind", sorted(KERAS3))
def test_keras3_objects_raise_one_clear_type_error(kind):
    obj = KERAS3[kind]()
    model = FlowModel(flows.planar_flow(2, 1, seed=0), event_shape=[2])
    x = gaussian(32, 0.0, 1.0, seed=8)
    if kind == "callback":
        model.compile(jit_compile=False)
        call = lambda: model.fit(x, epochs=1, verbose=0, callbacks=[obj])  # noqa: E731
    elif kind == "schedule":
        call = lambda: model.compile(learning_rate=obj)  # noqa: E731
    elif kind == "metric":
        call = lambda: model.compile(metrics=[obj])  # noqa: E731
    else:
        call = lambda: model.compile(optimizer=obj)  # noqa: E731
    before = weights(model)
    with pytest.raises(TypeError, match=re.escape(_tf_keras_name(obj))):
        call()
    for a, b in zip(weights(model), before):
        np.testing.assert_array_equal(a, b)


def test_compile_takes_a_tf_keras_schedule_as_learning_rate():
    schedule = tf_keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=1, decay_rate=0.5)
    model = FlowModel(flows.planar_flow(2, 1, seed=0), event_shape=[2])
    model.compile(learning_rate=schedule, jit_compile=False)
    model.fit(gaussian(64, 0.0, 1.0, seed=9), epochs=1, batch_size=32, verbose=0)
    assert model.optimizer._learning_rate is schedule
    # The rate the last (second) step used: 1e-2 · 0.5^1.
    assert int(model.optimizer.iterations.numpy()) == 2
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(5e-3, rel=1e-6)
