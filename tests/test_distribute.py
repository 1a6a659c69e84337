"""`FlowModel` under tf.distribute (issue 9, item 6).

Each test runs TensorFlow in subprocesses: two logical CPU devices must be set up
before TensorFlow initialises, and multi-worker training needs one process per worker.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

_PRELUDE = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import tensorflow as tf
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    import tensorflow_probability as tfp
    import tf_keras
    from tfp_flows import FlowModel, flows
    tfb = tfp.bijectors

    def data(rows, seed):
        rng = np.random.default_rng(seed)
        return (rng.standard_normal((rows, 2)) * [1.0, 0.3] + [1.0, -1.0]).astype(np.float32)

    def make():
        # Radial, not planar: the same chain of two builders, with a closed-form inverse
        # that traces (each replica, each save and load) in a fraction of planar's time.
        return FlowModel(tfb.Chain([flows.realnvp(2, 2, [8], seed=0),
                                    flows.radial_flow(2, 2, seed=1)]), event_shape=[2])

    def weights(model):
        return [w.numpy() for w in model.weights]
""")


def _run(script: str, timeout: int, env=None) -> dict:
    result = subprocess.run([sys.executable, "-c", _PRELUDE + textwrap.dedent(script)],
                            capture_output=True, text=True, timeout=timeout,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env or {})))
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_mirrored_strategy_trains_like_one_device_and_saves(tmp_path):
    """20 steps (global batch 64, no shuffling) on two replicas give the losses and
    weights of one device; `jit_compile=True` falls back to no XLA under CPU replicas and
    stays on outside a strategy; the model saves under the strategy and loads outside it
    and inside another strategy's scope."""
    out = _run(f"""
        x = data(10 * 64, seed=0)  # two epochs of 10 steps
        probe = data(16, seed=1)

        def train(strategy, jit_compile):
            with strategy.scope():
                model = make()
                model.compile(learning_rate=1e-2, jit_compile=jit_compile)
            history = model.fit(x, epochs=2, batch_size=64, shuffle=False, verbose=0)
            return model, history.history["loss"]

        mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        two, two_loss = train(mirrored, jit_compile=True)
        # The reference without XLA, as the replicas run (an XLA compile would only cost time).
        one, one_loss = train(tf.distribute.get_strategy(), jit_compile=False)
        plain = make()
        plain.compile(jit_compile=True)
        weight_gap = max(float(np.max(np.abs(a - b) / (np.abs(b) + 1e-6)))
                         for a, b in zip(weights(two), weights(one)))

        reference = two.log_prob(probe).numpy()
        keras_path, folder = {str(tmp_path / "m.keras")!r}, {str(tmp_path / "m")!r}
        with mirrored.scope():
            two.save(keras_path)
            two.save(folder)
        reloaded = {{}}
        for path in (keras_path, folder):
            outside = tf_keras.models.load_model(path)
            with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
                inside = tf_keras.models.load_model(path)
            reloaded[path] = {{
                "outside": bool(np.array_equal(outside.log_prob(probe).numpy(), reference)),
                "inside": bool(np.array_equal(inside.log_prob(probe).numpy(), reference)),
                "inside_type": type(inside).__name__,
            }}
        # Training goes on inside the new scope, from the saved optimizer state.
        more = inside.fit(x[:256], epochs=1, batch_size=64, shuffle=False, verbose=0)
        reloaded["continued"] = {{"finite": bool(np.isfinite(more.history["loss"]).all()),
                                 "iterations": int(inside.optimizer.iterations.numpy())}}
        print(json.dumps({{"replicas": mirrored.num_replicas_in_sync, "two": two_loss,
                          "one": one_loss, "weight_gap": weight_gap,
                          "iterations": int(two.optimizer.iterations.numpy()),
                          "jit": [bool(two._jit_compile), bool(plain._jit_compile)],
                          "reloaded": reloaded}}))
    """, timeout=300)
    assert out["replicas"] == 2 and out["iterations"] == 20
    # XLA has no cross-replica step on CPUs: the mirrored model falls back (with a warning).
    assert out["jit"] == [False, True]
    np.testing.assert_allclose(out["two"], out["one"], rtol=1e-5)
    assert out["two"][1] < out["two"][0]
    assert out["weight_gap"] < 1e-4, out["weight_gap"]
    continued = out["reloaded"].pop("continued")
    for path, result in out["reloaded"].items():
        assert result == {"outside": True, "inside": True, "inside_type": "FlowModel"}, path
    # The folder (loaded last) restarts its optimizer (tf_keras's SavedModel format): 4 steps.
    assert continued == {"finite": True, "iterations": 4}


def _free_ports(count: int) -> list:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_multi_worker_mirrored_strategy_ends_with_equal_weights(tmp_path):
    """Two worker processes on 127.0.0.1 train one model; each writes its weights."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    worker = textwrap.dedent(f"""
        import json, os
        import numpy as np
        import tensorflow as tf
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        import tf_keras
        from tfp_flows import FlowModel, flows
        rng = np.random.default_rng(0)
        x = (rng.standard_normal((8 * 64, 2)) * [1.0, 0.3]).astype(np.float32)
        with strategy.scope():
            model = FlowModel(flows.realnvp(2, 2, [8], seed=0), event_shape=[2])
            model.compile(learning_rate=1e-2)
        history = model.fit(x, epochs=2, batch_size=64, shuffle=False, verbose=0)
        index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
        np.savez({str(tmp_path)!r} + f"/worker{{index}}.npz", *[w.numpy() for w in model.weights],
                 loss=np.array(history.history["loss"]),
                 iterations=model.optimizer.iterations.numpy())
    """)
    processes = []
    for index in range(2):
        config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        processes.append(subprocess.Popen(
            [sys.executable, "-c", worker], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=dict(os.environ, TF_CONFIG=config, TF_CPP_MIN_LOG_LEVEL="3")))
    try:
        errors = [p.communicate(timeout=180)[1] for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in processes] == [0, 0], [e[-3000:] for e in errors]
    first, second = (np.load(tmp_path / f"worker{i}.npz") for i in range(2))
    assert set(first.files) == set(second.files) and len(first.files) > 3
    for key in first.files:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    assert int(first["iterations"]) == 16  # 512 rows, global batch 64: 8 steps, 2 epochs
    assert np.isfinite(first["loss"]).all() and first["loss"][1] < first["loss"][0]
