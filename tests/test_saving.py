"""Every tf_keras save and load route keeps the whole flow (issue 9, item 1).

For each builder of `tfp_flows.flows`, a chain with TFP's own bijectors and a
conditional flow: train one epoch, save by every route, load into a fresh model
(and, for the full-model formats, in a fresh process), compare `log_prob`
bitwise and continue training against the original model continuing.
"""
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
import tf_keras

from tfp_flows import FlowModel, flows
from tfp_flows.serialization import NotRebuildableError

tfb = tfp.bijectors

# name -> (bijector factory, FlowModel keyword arguments). Tiny sizes: these tests
# prove the routes, not the flows.
CASES = {
    "planar": (lambda: flows.planar_flow(2, 2, seed=0), {"event_shape": [2]}),
    "radial": (lambda: flows.radial_flow(2, 2, seed=0), {"event_shape": [2]}),
    "maf": (lambda: flows.maf(2, 2, [8, 8], seed=0), {"event_shape": [2]}),
    "iaf": (lambda: flows.iaf(2, 2, [8, 8], seed=0), {"event_shape": [2]}),
    "nice": (lambda: flows.nice(2, 2, [8], seed=0), {"event_shape": [2]}),
    "realnvp": (lambda: flows.realnvp(2, 2, [8], seed=0), {"event_shape": [2]}),
    "glow": (lambda: flows.glow([4, 4, 1], levels=1, steps_per_level=1, hidden_channels=4,
                                seed=0), {"event_shape": [4, 4, 1]}),
    "chain": (lambda: tfb.Chain([flows.planar_flow(2, 2, seed=0), tfb.Shift([0.5, -0.5]),
                                 flows.maf(2, 2, [8, 8], seed=1),
                                 tfb.Scale(tf.Variable([1.0, 2.0]))]), {"event_shape": [2]}),
    "conditional": (lambda: flows.realnvp(2, 2, [8], seed=0, context_size=3),
                    {"event_shape": [2], "context_shape": [3]}),
}
WEIGHT_ROUTES = ["weights.h5", "checkpoint", "callback weights.h5", "callback checkpoint"]
MODEL_ROUTES = ["keras", "folder", "callback keras", "callback folder"]
# ModelCheckpoint("ck") calls the same `model.save(folder)` as the "folder" route; a
# SavedModel save traces every function (seconds), so this route runs on a few cases.
CALLBACK_FOLDER_CASES = ("chain", "conditional")


def routes(name: str) -> list:
    every = WEIGHT_ROUTES + MODEL_ROUTES
    return every if name in CALLBACK_FOLDER_CASES else [r for r in every if r != "callback folder"]


def data(name: str, rows: int, seed: int):
    """(x, context or None): float32 data of the case's shapes."""
    rng = np.random.default_rng(seed)
    if name == "glow":
        return rng.uniform(size=(rows, 4, 4, 1)).astype(np.float32), None
    context = rng.normal(size=(rows, 3)).astype(np.float32) if name == "conditional" else None
    x = rng.normal(size=(rows, 2)) * [1.0, 0.5] + [1.0, -1.0]
    if context is not None:
        x = x + context[:, :2]
    return x.astype(np.float32), context


def fresh(name: str) -> FlowModel:
    make, kwargs = CASES[name]
    return FlowModel(make(), **kwargs)


def log_prob(model: FlowModel, name: str) -> np.ndarray:
    x, context = data(name, 16, seed=7)
    return model.log_prob(x, context=context).numpy()


def one_more_step(model: FlowModel, name: str) -> list:
    """One further full-batch step on fixed data, in order; the weights after it. A
    dataset of one batch of static shape [32, ...], as fit's shuffled training batches
    are, so that a model that has trained reuses its traced step."""
    x, context = data(name, 32, seed=8)
    batch = tf.data.Dataset.from_tensor_slices(x if context is None else (x, context))
    model.fit(batch.batch(32, drop_remainder=True), epochs=1, verbose=0)
    return [w.numpy() for w in model.weights]


class Trained:
    """A case trained one epoch and saved by every route (built on first use, cached)."""

    def __init__(self, name: str, root):
        self.name, self.root = name, root
        self.paths = {
            "weights.h5": str(root / "model.weights.h5"),
            "checkpoint": str(root / "weights"),
            "keras": str(root / "model.keras"),
            "folder": str(root / "model"),
            "callback weights.h5": str(root / "cb.weights.h5"),
            "callback checkpoint": str(root / "cb_weights"),
            "callback keras": str(root / "cb.keras"),
            "callback folder": str(root / "cb_model"),
        }
        model = fresh(name)
        model.compile(learning_rate=1e-2, jit_compile=False)
        x, context = data(name, 128, seed=0)
        callbacks = [
            tf_keras.callbacks.ModelCheckpoint(self.paths["callback keras"]),
            tf_keras.callbacks.ModelCheckpoint(self.paths["callback weights.h5"],
                                               save_weights_only=True),
            tf_keras.callbacks.ModelCheckpoint(self.paths["callback checkpoint"],
                                               save_weights_only=True),
        ]
        if name in CALLBACK_FOLDER_CASES:
            callbacks.append(tf_keras.callbacks.ModelCheckpoint(self.paths["callback folder"]))
        self.history = model.fit(x, context=context, epochs=1, batch_size=32, verbose=0,
                                 callbacks=callbacks)
        model.save_weights(self.paths["weights.h5"])
        model.save_weights(self.paths["checkpoint"])
        model.save(self.paths["keras"])
        model.save(self.paths["folder"])
        self.log_prob = log_prob(model, name)
        self.iterations = int(model.optimizer.iterations.numpy())
        self.optimizer_values = [v.numpy() for v in model.optimizer.variables]
        self.learning_rate = float(model.optimizer.learning_rate.numpy())
        self.sample = model.sample(5, **self._sample_context(), seed=[1, 2]).numpy()
        self.continued = one_more_step(model, name)

    def _sample_context(self) -> dict:
        return {"context": np.ones(3, np.float32)} if self.name == "conditional" else {}

    def sample_of(self, model: FlowModel) -> np.ndarray:
        return model.sample(5, **self._sample_context(), seed=[1, 2]).numpy()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cache = {}

    def get(name: str) -> Trained:
        if name not in cache:
            cache[name] = Trained(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


def load(route: str, trained_case: Trained) -> FlowModel:
    path = trained_case.paths[route]
    if route in MODEL_ROUTES:
        return tf_keras.models.load_model(path)
    model = fresh(trained_case.name)
    model.compile(learning_rate=trained_case.learning_rate, jit_compile=False)
    model.load_weights(path)
    return model


@pytest.mark.parametrize("name, route", [(n, r) for n in CASES for r in routes(n)])
def test_every_route_gives_back_the_same_flow_bitwise(trained, name, route):
    case = trained(name)
    model = load(route, case)
    assert type(model) is FlowModel
    assert model.event_shape == tuple(CASES[name][1]["event_shape"])
    np.testing.assert_array_equal(log_prob(model, name), case.log_prob)
    np.testing.assert_array_equal(case.sample_of(model), case.sample)
    assert np.isfinite(case.sample).all() and case.sample.shape == (5, *model.event_shape)


@pytest.mark.parametrize("route", ["keras", "callback keras", "checkpoint", "callback checkpoint"])
@pytest.mark.parametrize("name", list(CASES))
def test_optimizer_state_comes_back_bitwise(trained, name, route):
    """`.keras` and TF-checkpoint weights hold Adam's iterations and slots (a TF
    checkpoint restores the slots when the optimizer creates them, as `fit` does)."""
    case = trained(name)
    model = load(route, case)
    model._build_optimizer()
    assert type(model.optimizer) is tf_keras.optimizers.Adam
    assert int(model.optimizer.iterations.numpy()) == case.iterations > 0
    assert len(model.optimizer.variables) == len(case.optimizer_values)
    for restored, saved in zip(model.optimizer.variables, case.optimizer_values):
        np.testing.assert_array_equal(restored.numpy(), saved)


# `.keras` files of every case hold the same optimizer state (bitwise, above); one step
# each (an XLA compile per model) on a few cases keeps the suite short.
@pytest.mark.parametrize("name, route", [(n, "checkpoint") for n in CASES]
                         + [(n, "keras") for n in ("planar", "chain", "glow", "conditional")])
def test_reloaded_model_continues_training_like_the_original(trained, name, route):
    """One more step from the reloaded model equals the original model's next step."""
    case = trained(name)
    model = load(route, case)
    for after, expected in zip(one_more_step(model, name), case.continued):
        np.testing.assert_allclose(after, expected, rtol=1e-6, atol=1e-7)
    assert int(model.optimizer.iterations.numpy()) == case.iterations + 1


def test_savedmodel_folder_restarts_the_optimizer_and_its_checkpoint_restores_it(trained):
    """tf_keras's SavedModel folder keeps the weights and the optimizer's class and
    learning rate, but not its state: `iterations` restarts at 0 with fresh slots
    (tf_keras logs "Slots cannot be restored from saved_model"), and training goes on
    from the saved weights. The folder's variables/ is a TF checkpoint of the model,
    optimizer included: reading it after load_model gives back the weights, iterations
    and slots, and the next step is the original's (the README's recipe). One load and
    one (XLA) compile serve both."""
    case = trained("planar")
    model = load("folder", case)
    assert type(model.optimizer) is tf_keras.optimizers.Adam
    assert float(model.optimizer.learning_rate.numpy()) == case.learning_rate
    assert int(model.optimizer.iterations.numpy()) == 0
    before = [w.numpy() for w in model.weights]
    after = one_more_step(model, "planar")
    assert int(model.optimizer.iterations.numpy()) == 1
    assert all(np.isfinite(a).all() for a in after)
    assert any(not np.array_equal(a, b) for a, b in zip(after, before))

    tf.train.Checkpoint(root=model).read(
        os.path.join(case.paths["folder"], "variables", "variables")).expect_partial()
    np.testing.assert_array_equal(log_prob(model, "planar"), case.log_prob)
    assert int(model.optimizer.iterations.numpy()) == case.iterations
    assert len(model.optimizer.variables) == len(case.optimizer_values)
    for restored, saved in zip(model.optimizer.variables, case.optimizer_values):
        np.testing.assert_array_equal(restored.numpy(), saved)
    for after, expected in zip(one_more_step(model, "planar"), case.continued):
        np.testing.assert_allclose(after, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["chain", "conditional"])
def test_reloaded_models_export(trained, tmp_path, name):
    case = trained(name)
    model = load("keras", case)
    loaded = tf.saved_model.load(model.export(str(tmp_path / name)))
    x, context = data(name, 16, seed=7)
    args = (x,) if context is None else (x, context)
    np.testing.assert_allclose(loaded.log_prob(*args).numpy(), case.log_prob, rtol=1e-5,
                               atol=1e-5)


@pytest.fixture(scope="module")
def fresh_process(trained, tmp_path_factory) -> dict:
    """One fresh Python process for what must be checked outside this one: it first
    hashes the variables every builder makes with seed 3 (`_BUILDER_CALLS`), then loads
    every `.keras` file and SavedModel folder of every case and writes its `log_prob`.
    Returns the hashes and the jobs (with the paths of their outputs)."""
    folder = tmp_path_factory.mktemp("fresh_process")
    jobs = []
    for name in CASES:
        case = trained(name)
        x, context = data(name, 16, seed=7)
        np.save(folder / f"{name}_x.npy", x)
        if context is not None:
            np.save(folder / f"{name}_c.npy", context)
        for route in ("keras", "folder"):
            jobs.append({"name": name, "route": route, "path": case.paths[route],
                         "x": str(folder / f"{name}_x.npy"),
                         "c": None if context is None else str(folder / f"{name}_c.npy"),
                         "out": str(folder / f"{name}_{route}.npy")})
    script = textwrap.dedent(f"""
        import hashlib, json
        import numpy as np
        import tf_keras
        import tfp_flows
        from tfp_flows import flows
        SEED = 3
        hashes = {{}}
        for name, call in json.loads({json.dumps(_BUILDER_CALLS)!r}).items():
            digest = hashlib.sha256()
            for v in eval(call).variables:
                digest.update(v.name.encode()); digest.update(v.numpy().tobytes())
            hashes[name] = digest.hexdigest()
        for job in json.loads({json.dumps(jobs)!r}):
            model = tf_keras.models.load_model(job["path"])
            assert type(model) is tfp_flows.FlowModel, type(model)
            c = None if job["c"] is None else np.load(job["c"])
            np.save(job["out"], model.log_prob(np.load(job["x"]), context=c).numpy())
        print(json.dumps(hashes))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0, result.stderr[-3000:]
    return {"hashes": json.loads(result.stdout.strip().splitlines()[-1]), "jobs": jobs}


def test_full_model_formats_reload_bitwise_in_a_fresh_process(trained, fresh_process):
    """Every `.keras` file and SavedModel folder of every case, loaded in a fresh process."""
    assert len(fresh_process["jobs"]) == 2 * len(CASES)
    for job in fresh_process["jobs"]:
        np.testing.assert_array_equal(np.load(job["out"]), trained(job["name"]).log_prob,
                                      err_msg=f"{job['name']} by {job['route']}")


def test_compile_settings_survive_the_keras_file(tmp_path):
    """A model compiled without XLA (or with steps_per_execution) comes back so."""
    model = fresh("planar")
    model.compile(learning_rate=1e-3, jit_compile=False, steps_per_execution=3)
    model.save(str(tmp_path / "m.keras"))
    loaded = tf_keras.models.load_model(str(tmp_path / "m.keras"))
    assert loaded._jit_compile is False
    assert int(loaded._steps_per_execution.numpy()) == 3
    assert float(loaded.optimizer.learning_rate.numpy()) == pytest.approx(1e-3)


# --- flows that cannot be rebuilt from a configuration --------------------------------


class _OwnScale(tfb.Bijector):
    """A user's own bijector with a variable: `x = a·z`, log-det `D log|a|`."""

    def __init__(self):
        self.scale = tf.Variable(1.5, name="own_scale")
        super().__init__(forward_min_event_ndims=1, name="own_scale")

    def _forward(self, z):
        return self.scale * z

    def _inverse(self, x):
        return x / self.scale

    def _forward_log_det_jacobian(self, z):
        return tf.cast(tf.shape(z)[-1], z.dtype) * tf.math.log(tf.abs(self.scale))


def _own_model():
    return FlowModel(tfb.Chain([_OwnScale(), flows.radial_flow(2, 1, seed=0)]), event_shape=[2])


@pytest.fixture(scope="module")
def own_model() -> FlowModel:
    """A trained model of a flow that cannot be rebuilt; the tests below train it on the
    same batches (one traced step serves them all)."""
    model = _own_model()
    model.compile(jit_compile=False)
    model.fit(data("planar", 64, 0)[0], epochs=1, verbose=0)
    return model


@pytest.mark.parametrize("filename", ["model.keras", "model"])
def test_unrebuildable_flow_is_refused_at_save_time_naming_the_working_routes(own_model, tmp_path,
                                                                               filename):
    path = str(tmp_path / filename)
    with pytest.raises(NotRebuildableError, match=r"_OwnScale.*save_weights.*export"):
        own_model.save(path)
    assert not os.path.exists(path)
    with pytest.raises(NotRebuildableError, match="save_weights"):
        own_model.fit(data("planar", 64, 0)[0], epochs=1, verbose=0,
                      callbacks=[tf_keras.callbacks.ModelCheckpoint(path)])


@pytest.mark.parametrize("filename", ["w.weights.h5", "w"])
def test_unrebuildable_flow_still_saves_its_weights(own_model, tmp_path, filename):
    own_model.save_weights(str(tmp_path / filename))
    other = _own_model()
    other.load_weights(str(tmp_path / filename))
    x = data("planar", 8, 1)[0]
    np.testing.assert_array_equal(other.log_prob(x).numpy(), own_model.log_prob(x).numpy())
    assert float(other.bijector.bijectors[0].scale.numpy()) != 1.5  # it trained and came back


# --- parameters: counts and seeds -------------------------------------------------------


def _flow_parameter_count(bijector) -> int:
    return sum(int(np.prod(v.shape)) for v in bijector.trainable_variables)


@pytest.mark.parametrize("name", list(CASES))
def test_summary_and_count_params_right_after_construction(name, capsys):
    model = fresh(name)
    expected = _flow_parameter_count(model.bijector)
    assert expected > 0
    assert model.count_params() == sum(int(np.prod(v.shape)) for v in model.bijector.variables)
    lines = []
    model.summary(print_fn=lines.append)
    text = "\n".join(lines)
    assert f"Trainable params: {expected:,}" in text
    assert {id(v) for v in model.weights} == {id(v) for v in model.bijector.variables}


_BUILDER_CALLS = {
    "planar_flow": "flows.planar_flow(2, 2, seed=SEED)",
    "radial_flow": "flows.radial_flow(2, 2, seed=SEED)",
    "maf": "flows.maf(2, 2, [8, 8], seed=SEED)",
    "iaf": "flows.iaf(2, 2, [8, 8], seed=SEED)",
    "nice": "flows.nice(2, 2, [8], seed=SEED)",
    "realnvp": "flows.realnvp(2, 2, [8], seed=SEED)",
    "glow": "flows.glow([4, 4, 1], levels=1, steps_per_level=1, hidden_channels=4, seed=SEED)",
    "realnvp_context": "flows.realnvp(2, 2, [8], seed=SEED, context_size=3)",
}


def _hash(call: str, seed: int) -> str:
    digest = hashlib.sha256()
    for v in eval(call.replace("SEED", str(seed))).variables:
        digest.update(v.name.encode())
        digest.update(v.numpy().tobytes())
    return digest.hexdigest()


def test_equal_seeds_give_bitwise_equal_variables_across_processes(fresh_process):
    """The fresh process's seed-3 variables equal this process's, bitwise, for every
    builder; a different seed changes every builder's values."""
    hashes = fresh_process["hashes"]
    assert set(hashes) == set(_BUILDER_CALLS)
    for name, call in _BUILDER_CALLS.items():
        assert _hash(call, 3) == hashes[name], name
        assert _hash(call, 4) != hashes[name], name
